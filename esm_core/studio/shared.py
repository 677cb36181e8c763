"""Results that depend only on a pool's files, computed by the first session that needs them and read by the others.

A pool read from a folder — the built-in demo, the built text pool — is stamped when a session loads it with the
identity of that folder's files (:func:`folder_identity`: every file's relative path, size, modification and change
times, inode and device; a rebuilt, edited or replaced pool gets another identity, since the kernel sets a file's
change time on every write). Work whose result depends only on that content and on fixed settings the key names —
the zero-shot and fine-tuned reference accuracies on the live subsets (same split, subset size, seed, device type),
the Spectra view's rows (same probe size and seed) — is kept here under that identity, so a second session's first
merge and Spectra view read the numbers the first session computed: the same numbers it would compute itself
(methods §0). Uploaded pools are each session's own and are never stamped, so nothing of theirs is shared.

Bounded: at most :data:`MAX_BYTES` of estimated Python memory (a float in a list ≈ 32 bytes) and
:data:`MAX_ENTRIES` results, least recently used dropped first; a result larger than the bound alone is not kept.
"""
from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Hashable

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
    for e in entries:
        h.update(b"\n" + e.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def load_stamped(path, load):
    """``load()`` (which reads the pool in ``path``) with the pool stamped with the folder's identity — when the
    identity is the same before and after reading (no file changed while it was read); else unstamped."""
    before = folder_identity(path)
    pool = load()
    if before is not None and folder_identity(path) == before:
        stamp(pool, before)
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

    def put(self, key: Hashable | None, value: Any) -> bool:
        """Keep ``value`` (never mutated afterwards: readers share it); False when it alone exceeds the bound."""
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
        return True

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
    import numpy as np
    import torch
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
    import json
    from collections.abc import Mapping
    import numpy as np
    import torch

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
