"""Uploads that never finish leave nothing on disk.

Gradio streams every uploaded file into a temporary file of its upload folder (``GRADIO_TEMP_DIR``) while the
request body arrives. A file that is too large (``max_file_size``) or a malformed request is deleted by gradio
at once, but when the client goes away mid-upload (tab closed, network lost, a hostile client that sends half a
body) gradio 6 leaves the partial file behind, and no ``delete_cache`` sweep ever sees it (it is not one of the
app's tracked files). :func:`install` makes gradio's upload parser delete its temporary files whenever parsing
ends in any error, the disconnect included (tests/test_hostile_http.py checks it against the installed gradio).
"""
from __future__ import annotations

import logging
from pathlib import Path

from gradio import route_utils

log = logging.getLogger("esm_studio.app")

_PARSER = getattr(route_utils, "GradioMultiPartParser", None)


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
            return await original(self)
        except BaseException:            # ClientDisconnect, cancellation, a refused size or format
            n = _remove_partial_files(self)
            if n:
                log.warning("upload aborted or refused: %d partial file(s) deleted", n)
            raise

    parse.esm_removes_partial_files = True
    _PARSER.parse = parse
    return True
