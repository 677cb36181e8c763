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

from .checkpoints import CheckpointError, check_compatible, structure_problems
from .device import all_finite

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class LazyCheckpoint(Mapping):
    """Read-only ``{key: tensor}`` over a safetensors file; ``ck[key]`` reads one tensor (counted in ``reads``)."""

    def __init__(self, path: str | os.PathLike, prefix: str | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no checkpoint file {self.path}")
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
        st = self.path.stat()
        self._stamp = (str(self.path.resolve()), st.st_size, st.st_mtime_ns)
        self.reads = 0
        self.read_keys: list[str] = []

    # Mapping protocol ------------------------------------------------------
    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._meta:
            raise KeyError(key)
        with safe_open(str(self.path), framework="pt") as f:
            t = f.get_tensor(key)
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
        out = load_file(str(self.path))
        self.reads += len(out)
        self.read_keys.extend(out)
        return {k: out[k] for k in self._meta}


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