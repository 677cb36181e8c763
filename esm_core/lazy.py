"""Lazy checkpoints: a read-only mapping over a safetensors file that reads one tensor per access.

    from esm_core.lazy import LazyCheckpoint
    ck = LazyCheckpoint("task.safetensors")
    ck.shape("visual.proj"), ck.dtype("visual.proj")   # from the header, nothing read
    w = ck["visual.proj"]                                # reads that tensor only

``esm_core.merge`` / ``merge_updates`` accept such mappings, or plain paths
(``str`` / ``Path`` of a ``.safetensors`` file), for the base and for every
task. The base is read whole (it is the result's starting point); the tasks are
read key by key as the methods walk the keys, so peak memory stays near the
base plus one layer times the number of tasks (plus a method's own state, e.g.
TIES' one-model trim buffer). Every access opens the file with
``safetensors.safe_open`` and closes it again: no mapping of the whole file is
kept, and a tensor that is dropped frees its memory.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .checkpoints import (SAFETENSORS_DTYPES, CheckpointError, check_compatible, safetensors_header,
                          structure_problems)
from .device import all_finite

_DTYPES = SAFETENSORS_DTYPES


class LazyCheckpoint(Mapping):
    """Read-only ``{key: tensor}`` over a safetensors file; ``ck[key]`` reads one tensor (counted in ``reads``).

    The header is bounded and dtype-checked before it is parsed (:func:`esm_core.checkpoints.safetensors_header`).
    The file's size and modification time are recorded when it is opened and checked again at every read, and
    every tensor read must have the shape and dtype the header had: a file rewritten meanwhile is refused with a
    :class:`CheckpointError` naming it (``name``: what the messages call it, e.g. ``task 'cars'``)."""

    def __init__(self, path: str | os.PathLike, prefix: str | None = None, name: str | None = None):
        self.path = Path(path)
        self.name = name or self.path.name
        if not self.path.is_file():
            raise FileNotFoundError(f"no checkpoint file {self.path}")
        st = self.path.stat()
        try:
            entries = safetensors_header(self.path, self.name)
        except CheckpointError as e:
            raise CheckpointError(f"{self.path}: {str(e).removeprefix(self.name + ': ')}") from None
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        try:
            with safe_open(str(self.path), framework="pt") as f:
                for k in f.keys():
                    if prefix is not None and not k.startswith(prefix):
                        continue
                    sl = f.get_slice(k)
                    self._meta[k] = (tuple(int(s) for s in sl.get_shape()), _DTYPES.get(sl.get_dtype(), None))
        except Exception as e:      # noqa: BLE001 — safetensors raises its own error types
            raise ValueError(f"{self.path}: not a readable safetensors file ({e})") from None
        if any(k not in entries for k in self._meta):      # rewritten between the two reads of the header
            raise ValueError(f"{self.path}: the file changed while it was being opened")
        self._stamp = (str(self.path.resolve()), st.st_size, st.st_mtime_ns)
        self.reads = 0
        self.read_keys: list[str] = []

    def _check_unchanged(self) -> None:
        """Refuse to read on when the file's size or modification time differ from those recorded at opening."""
        try:
            st = self.path.stat()
            now = (st.st_size, st.st_mtime_ns)
        except OSError:
            now = None
        if now != self._stamp[1:]:
            what = "is gone" if now is None else (f"is now {now[0]:,} bytes (was {self._stamp[1]:,})"
                                                  if now[0] != self._stamp[1] else "was modified")
            raise CheckpointError(f"{self.name}: the file changed on disk since it was loaded ({self.path.name} {what}); "
                                  "reload the pool")

    def _check_read(self, key: str, t: torch.Tensor) -> torch.Tensor:
        shape, dtype = self._meta[key]
        if tuple(t.shape) != shape or (dtype is not None and t.dtype != dtype):
            raise CheckpointError(f"{self.name}: the file changed on disk since it was loaded ({key!r} is now "
                                  f"{tuple(t.shape)} {t.dtype}, was {shape} {dtype}); reload the pool")
        return t

    # Mapping protocol ------------------------------------------------------
    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._meta:
            raise KeyError(key)
        self._check_unchanged()
        try:
            with safe_open(str(self.path), framework="pt") as f:
                t = f.get_tensor(key)
        except Exception as e:      # noqa: BLE001 — rewritten without the key, truncated, gone
            raise CheckpointError(f"{self.name}: cannot read {key!r} any more ({type(e).__name__}: {e}); the file "
                                  "changed on disk since it was loaded? reload the pool") from None
        self._check_read(key, t)
        self.reads += 1
        self.read_keys.append(key)
        return t

    def __iter__(self):
        return iter(self._meta)

    def __len__(self) -> int:
        return len(self._meta)

    def __contains__(self, key) -> bool:
        return key in self._meta

    def __repr__(self) -> str:
        return f"LazyCheckpoint({str(self.path)!r}, {len(self)} keys)"

    # Metadata without reading ----------------------------------------------
    def shape(self, key: str) -> tuple[int, ...]:
        return self._meta[key][0]

    def dtype(self, key: str) -> torch.dtype | None:
        return self._meta[key][1]

    def meta(self) -> dict[str, torch.Tensor]:
        """``{key: tensor on the 'meta' device}`` with each entry's shape and dtype (no data, nothing read)."""
        return {k: torch.empty(s, dtype=d or torch.uint8, device="meta") for k, (s, d) in self._meta.items()}

    def fingerprint(self, key: str) -> tuple:
        """Identity of one entry's content without reading it: the file (path, size, mtime) and the key."""
        return ("file",) + self._stamp + (key,)

    def load(self) -> dict[str, torch.Tensor]:
        """Every tensor, read at once (one open of the file)."""
        self._check_unchanged()
        out = load_file(str(self.path))
        missing = [k for k in self._meta if k not in out]
        if missing:
            raise CheckpointError(f"{self.name}: the file changed on disk since it was loaded ({missing[0]!r} is "
                                  "gone); reload the pool")
        out = {k: self._check_read(k, out[k]) for k in self._meta}
        self.reads += len(out)
        self.read_keys.extend(out)
        return out


def as_state(x, *, name: str = "checkpoint") -> Mapping:
    """A path (``str`` / ``Path``, safetensors) → :class:`LazyCheckpoint`; a mapping is returned as it is."""
    if isinstance(x, (str, os.PathLike)):
        return LazyCheckpoint(x)
    if isinstance(x, Mapping):
        return x
    raise ValueError(f"{name} must be a state dict, a LazyCheckpoint or a path to a .safetensors file, "
                     f"got {type(x).__name__}")


def is_lazy(x) -> bool:
    return isinstance(x, LazyCheckpoint)


def check_compatible_lazy(base: Mapping[str, torch.Tensor], sd: LazyCheckpoint, name: str = "task") -> None:
    """:func:`esm_core.checkpoints.check_compatible` for a lazy task: keys, shapes and dtypes from the header,
    finiteness by reading one tensor at a time."""
    meta = sd.meta()
    base_meta = {k: torch.empty(tuple(v.shape), dtype=v.dtype, device="meta") for k, v in base.items()}
    _check_structure(base_meta, meta, name)
    bad = [k for k in base if k in meta and meta[k].is_floating_point() and not all_finite(sd[k])]
    if bad:    # let check_compatible word the error exactly as for a loaded checkpoint
        check_compatible({k: base[k] for k in bad}, {k: sd[k] for k in bad}, name)


def _check_structure(base_meta: dict, meta: dict, name: str) -> None:
    problems = structure_problems(base_meta, meta)
    if problems:
        raise CheckpointError(f"checkpoint {name!r} does not fit the base model — " + " | ".join(problems))