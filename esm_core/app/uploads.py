"""Uploads that never finish leave nothing on disk; uploads nobody uses go soon; the upload folder is bounded.

Gradio streams every uploaded file into a temporary file of its upload folder (``GRADIO_TEMP_DIR``) while the
request body arrives. A file that is too large (``max_file_size``) or a malformed request is deleted by gradio
at once, but when the client goes away mid-upload (tab closed, network lost, a hostile client that sends half a
body) gradio 6 leaves the partial file behind, and no ``delete_cache`` sweep ever sees it (it is not one of the
app's tracked files). :func:`install` makes gradio's upload parser delete its temporary files whenever parsing
ends in any error, the disconnect included (tests/test_hostile_http.py checks it against the installed gradio).

Gradio's ``POST /gradio_api/upload`` takes files from anyone, with or without a session, and keeps them until the
hourly ``delete_cache`` sweep. Here the parser also refuses a request once the upload folder would hold more than
:func:`upload_space_bytes` (``ESM_UPLOAD_SPACE_MB``, default 16 GiB: two sessions' worth of checkpoints), counting
the bytes as they arrive, and :func:`sweep_orphans` (every minute, :func:`start_sweeper`) deletes the uploads that
no session has used (:func:`claim`, called by the Pool view's load) within :data:`ORPHAN_S` seconds of arriving.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from pathlib import Path

from gradio import route_utils
from starlette.formparsers import MultiPartException
from .. import settings

log = logging.getLogger("esm_studio.app")

_PARSER = getattr(route_utils, "GradioMultiPartParser", None)
ORPHAN_S = 10 * 60                 # an upload no session used within this many seconds is deleted
CLAIM_KEEP_S = 2 * 60 * 60         # claims older than this are forgotten (gradio's hourly sweep took the file)
_CLAIMS: dict[str, float] = {}     # resolved path -> when a session last used it
_CLAIMS_LOCK = threading.Lock()
_SIZE_CACHE: dict[str, tuple[float, int]] = {}


def upload_space_bytes() -> int:
    """Bytes the upload folder may hold: ``ESM_UPLOAD_SPACE_MB`` (MiB) or 16 GiB (:mod:`esm_core.settings`)."""
    return settings.upload_space_bytes()


def _size(n: float) -> str:
    return f"{n / 2 ** 30:.1f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.0f} MiB"


def _full() -> MultiPartException:
    return MultiPartException(f"Upload refused: the server's upload space is full (it holds at most "
                              f"{_size(upload_space_bytes())} of uploads); try again in a few minutes")


def folder_bytes(folder, max_age_s: float = 2.0) -> int:
    """Bytes of the files under ``folder`` (cached for ``max_age_s``: a burst of uploads walks it once)."""
    key, now = str(folder), time.monotonic()
    hit = _SIZE_CACHE.get(key)
    if hit is not None and now - hit[0] < max_age_s:
        return hit[1]
    total = 0
    for root, _, files in os.walk(folder):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_size
            except OSError:
                pass
    _SIZE_CACHE[key] = (now, total)
    return total


def claim(paths) -> None:
    """Mark uploaded files as used by a session (the Pool view's load): :func:`sweep_orphans` leaves them to the
    hourly sweep."""
    now = time.time()
    with _CLAIMS_LOCK:
        for p in paths:
            if p:
                _CLAIMS[str(Path(p).resolve())] = now
        for k, t in list(_CLAIMS.items()):
            if now - t > CLAIM_KEEP_S:
                del _CLAIMS[k]


def sweep_orphans(blocks, orphan_s: float | None = None) -> tuple[int, int]:
    """Delete the files uploaded to ``blocks`` (``upload_file_set``) that are older than ``orphan_s`` (default
    :data:`ORPHAN_S`) and that no session used (:func:`claim`); returns ``(files, bytes)`` deleted."""
    orphan_s = ORPHAN_S if orphan_s is None else orphan_s
    files = getattr(blocks, "upload_file_set", None)
    if files is None:
        return 0, 0
    now, n, size = time.time(), 0, 0
    for name in list(files):
        path = Path(name)
        try:
            st = path.stat()
        except OSError:
            files.discard(name)                          # gone already (gradio's sweep, a refused upload)
            continue
        with _CLAIMS_LOCK:
            used = str(path.resolve()) in _CLAIMS
        if used or now - st.st_mtime <= orphan_s:
            continue
        path.unlink(missing_ok=True)
        files.discard(name)
        n, size = n + 1, size + st.st_size
        try:
            path.parent.rmdir()                          # gradio's per-upload <hash> folder, when empty
        except OSError:
            pass
    if n:
        _SIZE_CACHE.clear()
        log.warning("deleted %d upload(s) no session used within %.0f s (%.1f MiB)", n, orphan_s, size / 2 ** 20)
    return n, size


_BLOCKS: "weakref.WeakSet" = weakref.WeakSet()
_SWEEPER: list[threading.Thread] = []


def start_sweeper(blocks, every_s: float = 60.0) -> None:
    """Run :func:`sweep_orphans` on ``blocks`` every ``every_s`` seconds (one daemon thread for every app)."""
    _BLOCKS.add(blocks)
    if _SWEEPER and _SWEEPER[0].is_alive():
        return

    def run():
        while True:
            time.sleep(every_s)
            for b in list(_BLOCKS):
                try:
                    sweep_orphans(b)
                except Exception as e:  # noqa: BLE001 - the sweeper must outlive one bad file
                    log.warning("upload sweep: %s", e)
    _SWEEPER[:] = [threading.Thread(target=run, name="esm-upload-sweeper", daemon=True)]
    _SWEEPER[0].start()


def _space_left(upload_dir) -> int:
    cap = upload_space_bytes()
    used = folder_bytes(upload_dir) if upload_dir and Path(upload_dir).is_dir() else 0
    if used >= cap:                                      # full: first delete what nobody uses
        for b in list(_BLOCKS):
            sweep_orphans(b)
        used = folder_bytes(upload_dir, 0.0)
    return cap - used


async def _bounded(stream, limit: int):
    """The request body, refused (MultiPartException: the parser deletes what it wrote) past ``limit`` bytes."""
    n = 0
    async for chunk in stream:
        n += len(chunk)
        if n > limit:
            raise _full()
        yield chunk


def _remove_partial_files(parser) -> int:
    n = 0
    for f in list(getattr(parser, "_files_to_close_on_error", None) or []):
        try:
            f.close()
        except Exception:  # noqa: BLE001 - closing a half-written temp file must not hide the real error
            pass
        path = Path(getattr(f, "name", "") or "")
        if path.name and path.exists():
            path.unlink(missing_ok=True)
            n += 1
    return n


def install() -> bool:
    """Patch gradio's upload parser once (idempotent); False when this gradio has no parser to patch."""
    if _PARSER is None or not hasattr(_PARSER, "parse"):
        log.warning("gradio has no GradioMultiPartParser: aborted uploads are left to the delete_cache sweep")
        return False
    if getattr(_PARSER.parse, "esm_removes_partial_files", False):
        return True
    original = _PARSER.parse

    async def parse(self):
        try:
            left = _space_left(getattr(self, "upload_dir", None))
            try:
                size = int(self.headers.get("content-length") or 0)
            except ValueError:
                size = 0                                  # counted as it arrives instead
            if left <= 0 or size > left + 64 * 1024:      # the body includes a little multipart framing
                raise _full()
            self.stream = _bounded(self.stream, max(left, 0) + 64 * 1024)
            return await original(self)
        except BaseException:            # ClientDisconnect, cancellation, a refused size or format
            n = _remove_partial_files(self)
            if n:
                log.warning("upload aborted or refused: %d partial file(s) deleted", n)
            raise

    parse.esm_removes_partial_files = True
    _PARSER.parse = parse
    return True
