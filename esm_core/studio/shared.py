"""Results that depend only on a pool's files, computed by the first session that needs them and read by the others.

A pool read from a folder — the built-in demo, the built text pool — is stamped when a session loads it with the
identity of that folder's files (:func:`folder_identity`: every file's relative path, size, modification and change
times, inode and device; a rebuilt, edited or replaced pool gets another identity, since the kernel sets a file's
change time on every write) and of this library's code (:func:`code_digest`: an upgrade computes afresh). Work whose result depends only on that content and on fixed settings the key names —
the zero-shot and fine-tuned reference accuracies on the live subsets (same split, subset size, seed, device type),
the Spectra view's rows (same probe size and seed) — is kept here under that identity, so a second session's first
merge and Spectra view read the numbers the first session computed: the same numbers it would compute itself
(methods §0). Uploaded pools are each session's own and are never stamped, so nothing of theirs is shared.

Bounded: at most :data:`MAX_BYTES` of estimated Python memory (a float in a list ≈ 32 bytes) and
:data:`MAX_ENTRIES` results, least recently used dropped first; a result larger than the bound alone is not kept.

A pool folder inside the app's cache folder (``ESM_STUDIO_CACHE``: the built text pool) also keeps its results on
disk, as JSON (never pickle), in ``<cache>/results/<identity>.json``: written a moment after the last new result
(:data:`WRITE_DELAY_S`), read back when a session loads the same files — so the first visitor after a restart of
the app finds them too. At most :data:`MAX_DISK_FILES` such files (the oldest go) of :data:`MAX_DISK_BYTES` each.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Hashable

import numpy as np
import torch

from .. import settings

log = logging.getLogger("esm_core.studio.shared")

MAX_FILES = 10_000            # a pool folder with more files than this is not stamped (nothing shared)
MAX_ENTRIES = 4096            # results kept at once (a reference accuracy is one)
MAX_BYTES = 64 * 2 ** 20      # estimated bytes of the results kept at once (the text pool's Spectra rows: ≈ 14 MiB)
STAMP = "files_identity"      # the key of a pool's ``meta`` holding its identity


def folder_identity(path) -> str | None:
    """A digest of the identity of every regular file under ``path`` (relative path, size, modification and
    change times in ns, inode, device), in sorted order; None when ``path`` is no folder or holds more than
    :data:`MAX_FILES` files. Reads no file content: microseconds per file."""
    try:
        root = Path(path).expanduser().resolve()
    except (OSError, RuntimeError, TypeError, ValueError):
        return None
    if not root.is_dir():
        return None
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            try:
                st = p.stat()
            except OSError:
                return None                       # a file vanished while we looked: no identity
            if not p.is_file():
                continue
            entries.append(f"{p.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0"
                           f"{st.st_ino}\0{st.st_dev}")
            if len(entries) > MAX_FILES:
                return None
    h = hashlib.sha256(str(root).encode("utf-8", "surrogatepass"))
    h.update(code_digest().encode())          # results computed by other code (an upgrade) are never read back
    for e in entries:
        h.update(b"\n" + e.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


_CODE_DIGEST: list[str] = []


def code_digest() -> str:
    """A digest of this library's source files (every ``esm_core/**/*.py``, read once per process, a few ms):
    part of every pool identity, so that results kept on disk by an earlier version of the code — whose
    methods may compute other numbers — are not served after an upgrade."""
    if not _CODE_DIGEST:
        root = Path(__file__).resolve().parent.parent
        h = hashlib.sha256()
        for p in sorted(root.rglob("*.py")):
            h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
        _CODE_DIGEST.append(h.hexdigest())
    return _CODE_DIGEST[0]


def load_stamped(path, load):
    """``load()`` (which reads the pool in ``path``) with the pool stamped with the folder's identity — when the
    identity is the same before and after reading (no file changed while it was read); else unstamped. A folder
    inside the app's cache folder keeps its results on disk too: those written earlier are read back now."""
    before = folder_identity(path)
    pool = load()
    if before is not None and folder_identity(path) == before:
        stamp(pool, before)
        if _in_cache(path):
            _PERSIST.add(before)
            read_disk(before)
    return pool


def stamp(pool, identity: str | None) -> None:
    """Stamp ``pool`` with ``identity`` unless it has one: a pool object kept by its loader across sessions (the
    demo's) keeps the identity of the files it was read from."""
    meta = getattr(pool, "meta", None)
    if isinstance(meta, dict) and identity:
        meta.setdefault(STAMP, identity)


def identity_of(pool) -> str | None:
    """The pool's stamp (None: nothing of it is shared)."""
    meta = getattr(pool, "meta", None)
    return meta.get(STAMP) if isinstance(meta, dict) else None


def _cost(value: Any, depth: int = 0) -> int:
    """Estimated bytes of a plain result (floats, ints, strings, lists, tuples, dicts of them)."""
    if depth > 8:
        return 64
    if isinstance(value, dict):
        return 232 + sum(_cost(k, depth + 1) + _cost(v, depth + 1) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return 56 + sum(8 + _cost(v, depth + 1) for v in value)
    if isinstance(value, str):
        return 49 + len(value)
    return 32


class SharedResults:
    """A thread-safe LRU of plain results keyed by tuples that start with a pool's identity; bounded by entries
    and estimated bytes."""

    def __init__(self, max_entries: int = MAX_ENTRIES, max_bytes: int = MAX_BYTES):
        self.max_entries, self.max_bytes = int(max_entries), int(max_bytes)
        self._d: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable | None, default=None):
        if key is None:
            return default
        with self._lock:
            hit = self._d.get(key)
            if hit is None:
                return default
            self._d.move_to_end(key)
            return hit[0]

    def put(self, key: Hashable | None, value: Any, persist: bool = True) -> bool:
        """Keep ``value`` (never mutated afterwards: readers share it); False when it alone exceeds the bound.
        A result of a pool kept on disk (:func:`load_stamped`) is written there soon (``persist``)."""
        if key is None:
            return False
        cost = _cost(value)
        if cost > self.max_bytes:
            return False
        with self._lock:
            old = self._d.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._d[key] = (value, cost)
            self._bytes += cost
            while len(self._d) > self.max_entries or self._bytes > self.max_bytes:
                _, (_, c) = self._d.popitem(last=False)
                self._bytes -= c
        if persist and isinstance(key, tuple) and key and key[0] in _PERSIST:
            _schedule_write(key[0])
        return True

    def items_of(self, identity: str) -> list:
        """The (key, value) pairs of one pool identity, least recently used first."""
        with self._lock:
            return [(k, v[0]) for k, v in self._d.items() if isinstance(k, tuple) and k and k[0] == identity]

    def clear(self) -> None:
        with self._lock:
            self._d.clear()
            self._bytes = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._d)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes


RESULTS = SharedResults()


# ---------------------------------------------------------------- on disk, for pools in the app's cache folder
WRITE_DELAY_S = 2.0           # a pool's file is written this long after its last new result
MAX_DISK_FILES = 8            # result files kept (the least recently written go first)
MAX_DISK_BYTES = 32 * 2 ** 20  # a larger result file is neither written nor read
_PERSIST: set[str] = set()    # identities of pools whose results go to disk
_TIMERS: dict[str, threading.Timer] = {}
_TIMERS_LOCK = threading.Lock()


def results_dir() -> Path:
    return settings.cache_dir() / "results"


def _in_cache(path) -> bool:
    try:
        return Path(path).expanduser().resolve().is_relative_to(settings.cache_dir().resolve())
    except (OSError, RuntimeError, ValueError):
        return False


def _disk_file(identity: str) -> Path | None:
    if not (isinstance(identity, str) and len(identity) == 64 and all(c in "0123456789abcdef" for c in identity)):
        return None
    return results_dir() / f"{identity}.json"


def _schedule_write(identity: str) -> None:
    with _TIMERS_LOCK:
        old = _TIMERS.pop(identity, None)
        if old is not None:
            old.cancel()
        timer = threading.Timer(WRITE_DELAY_S, write_disk, args=(identity,))
        timer.daemon = True
        _TIMERS[identity] = timer
        timer.start()


def flush() -> list[Path]:
    """Write every pending result file now (what the timers would do a moment later)."""
    with _TIMERS_LOCK:
        pending = list(_TIMERS)
        for ident in pending:
            _TIMERS.pop(ident).cancel()
    return [p for p in (write_disk(i) for i in pending) if p is not None]


def _plain(x):
    """Tuples as lists, recursively (JSON has no tuples); :func:`_tuples` undoes it for keys."""
    return [_plain(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def write_disk(identity: str) -> Path | None:
    """Write the identity's results to its file now (atomically: a temporary file renamed); the oldest files beyond
    :data:`MAX_DISK_FILES` are deleted. None when nothing was written (nothing to write, too large, no space)."""
    with _TIMERS_LOCK:
        _TIMERS.pop(identity, None)
    path = _disk_file(identity)
    items = RESULTS.items_of(identity)
    if path is None or not items:
        return None
    try:
        text = json.dumps({"version": 1, "identity": identity, "entries": [[_plain(k), v] for k, v in items]})
        if len(text) > MAX_DISK_BYTES:
            log.warning("results of pool %s not written: %d bytes", identity[:12], len(text))
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".results-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        files = sorted((p for p in path.parent.glob("*.json") if p != path), key=lambda p: p.stat().st_mtime_ns)
        for old in files[:len(files) - (MAX_DISK_FILES - 1)]:     # the oldest others; this one stays
            old.unlink(missing_ok=True)
        return path
    except (OSError, TypeError, ValueError) as e:
        log.warning("results of pool %s not written: %s", identity[:12], e)
        return None


def _valid_value(v, depth: int = 0) -> bool:
    if isinstance(v, bool) or v is None or isinstance(v, (int, str)):
        return True
    if isinstance(v, float):
        return True
    if depth > 4:
        return False
    if isinstance(v, list):
        return all(_valid_value(x, depth + 1) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _valid_value(x, depth + 1) for k, x in v.items())
    return False


def read_disk(identity: str) -> int:
    """Read the identity's result file back into :data:`RESULTS` (plain JSON, checked: every key names this
    identity; a malformed or oversized file is ignored and deleted). Returns how many results were read."""
    path = _disk_file(identity)
    if path is None or not path.is_file():
        return 0
    try:
        if path.stat().st_size > MAX_DISK_BYTES:
            raise ValueError("too large")
        data = json.loads(path.read_text(encoding="utf-8"))
        entries = data["entries"] if isinstance(data, dict) and data.get("identity") == identity else None
        if not isinstance(entries, list):
            raise ValueError("no entries")
        good = []
        for e in entries:
            if not (isinstance(e, list) and len(e) == 2 and isinstance(e[0], list) and e[0][:1] == [identity]
                    and _valid_value(e[1])):
                raise ValueError("a malformed entry")
            if isinstance(e[1], float) and not math.isfinite(e[1]):
                raise ValueError("a non-finite accuracy")
            good.append((_tuples(e[0]), e[1]))
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        log.warning("results file %s ignored: %s", path.name, e)
        path.unlink(missing_ok=True)
        return 0
    for k, v in good:
        if RESULTS.get(k) is None:
            RESULTS.put(k, v, persist=False)
    return len(good)


def key(pool, device, *parts) -> tuple | None:
    """The key of a result of ``pool`` computed on ``device`` (its type counts: CPU and CUDA round differently)
    with the settings ``parts``; None for a pool that is not stamped (nothing shared)."""
    ident = identity_of(pool)
    if ident is None:
        return None
    return (ident, str(getattr(device, "type", device)), *parts)


# ---------------------------------------------------------------- a pool's content, sampled (the merge history's key)
FINGERPRINT = "content_fingerprint"   # the key of a pool's ``meta`` caching :func:`content_fingerprint`
SAMPLES = 64                  # values read from every tensor (evenly spaced), chunks read from every task file
CHUNK = 4096                  # bytes of each chunk of a file
MAX_ITEMS = 200_000           # strings / list items hashed at most (a pool's sentences and labels fit)


def _tensor_bytes(x) -> bytes:
    if isinstance(x, torch.Tensor):
        x = x.detach()
        flat = x.reshape(-1)
        n = flat.numel()
        idx = torch.linspace(0, n - 1, min(n, SAMPLES)).long() if n else torch.zeros(0, dtype=torch.long)
        vals = flat[idx].cpu()
        vals = vals.to(torch.float64) if vals.is_floating_point() else vals.to(torch.int64)
        return f"T{tuple(x.shape)}{x.dtype}".encode() + vals.numpy().tobytes()
    a = np.asarray(x)
    flat = a.reshape(-1)
    idx = np.linspace(0, flat.size - 1, min(flat.size, SAMPLES)).astype(np.int64) if flat.size else np.zeros(0, np.int64)
    return f"A{a.shape}{a.dtype}".encode() + np.ascontiguousarray(flat[idx]).tobytes()


def _file_bytes(path: Path) -> bytes:
    """A file's size, its first 64 KiB (a safetensors header names every key, dtype and shape) and
    :data:`SAMPLES` chunks of :data:`CHUNK` bytes spread over it."""
    size = path.stat().st_size
    out = [str(size).encode()]
    with open(path, "rb") as f:
        out.append(f.read(64 * 1024))
        for i in range(SAMPLES):
            f.seek(size * i // SAMPLES)
            out.append(f.read(CHUNK))
    return b"".join(out)


def content_fingerprint(pool) -> str:
    """A digest of what a pool holds, sampled so that it costs milliseconds whatever the pool's size: its name, tasks,
    class names, model config; of every tensor of the base, the tasks and the heads its key, shape, dtype and
    :data:`SAMPLES` evenly spaced values (a task read lazily from a file: the file's header and chunks); every
    label and sentence of the evaluation data, and samples of its images. Two pools with the same content get
    the same fingerprint (a re-upload of the same files, the same pool after a server restart); any real change
    of a model, head or data gives another one with overwhelming likelihood. Not a security boundary: it keys the
    user's own merge table, which the browser keeps and could change anyway. Cached in the pool's ``meta``."""
    meta = getattr(pool, "meta", None)
    if isinstance(meta, dict) and isinstance(meta.get(FINGERPRINT), str):
        return meta[FINGERPRINT]
    h = hashlib.sha256()
    budget = [MAX_ITEMS]

    def add(x, depth: int = 0) -> None:
        if depth > 6 or budget[0] <= 0:
            return
        budget[0] -= 1
        if isinstance(x, (torch.Tensor, np.ndarray)):
            h.update(_tensor_bytes(x))
        elif hasattr(x, "path") and isinstance(x, Mapping) and Path(getattr(x, "path")).is_file():
            h.update(b"F" + _file_bytes(Path(x.path)))            # a lazily read checkpoint
        elif isinstance(x, Mapping):
            for k in sorted(x, key=str):
                h.update(b"K" + str(k).encode("utf-8", "surrogatepass"))
                add(x[k], depth + 1)
        elif isinstance(x, (list, tuple)):
            if x and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in x[:16]):
                h.update(_tensor_bytes(np.asarray(x, dtype=np.float64)))
                return
            h.update(f"L{len(x)}".encode())
            for v in x:
                add(v, depth + 1)
        else:
            h.update(b"S" + str(x).encode("utf-8", "surrogatepass"))

    h.update(type(pool).__name__.encode())
    add(str(getattr(pool, "name", "")))
    add(list(getattr(pool, "task_names", [])))
    add(getattr(pool, "class_names", {}))
    cfg = getattr(pool, "model_config", None) or getattr(pool, "model_name", None)
    add(json.dumps(cfg, sort_keys=True, default=str))
    for what in ("pooling", "max_length", "mean", "std"):
        add(str(getattr(pool, what, None)))
    add(getattr(pool, "base", {}))
    tasks = getattr(pool, "tasks", {})
    for t in getattr(pool, "task_names", []):
        add(t)
        add(tasks[t])
    add(getattr(pool, "heads", {}))
    add(getattr(pool, "data", {}))
    digest = h.hexdigest()
    if isinstance(meta, dict):
        meta[FINGERPRINT] = digest
    return digest
