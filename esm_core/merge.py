"""The public merge API: ``merge(method, base, tasks, **params) -> state dict``.

A method only sees a :class:`MergeContext`; it walks the merged keys one at a
time (``ctx.deltas(key)`` gives the stacked task updates of one key, upcast to
float32 on the merge device), so peak memory beyond the base model stays at
about one layer times the number of tasks.

``base`` and each task may also be a path to a ``.safetensors`` file or an
:class:`esm_core.lazy.LazyCheckpoint`: the base is then read whole, the tasks
key by key as the method asks for them (see :mod:`esm_core.lazy`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from . import vit
from .checkpoints import check_compatible
from .methods.registry import get_method

Progress = Callable[[float, str], None]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"unknown device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here")
    return dev


@dataclass
class MergeContext:
    base: Mapping[str, torch.Tensor]
    tasks: Mapping[str, Mapping[str, torch.Tensor]]
    roles: dict[str, str]
    layer_types: dict[str, str]
    device: torch.device
    progress: Progress | None = None
    stats: Any = None          # activation statistics (probe result) for the ESM family
    inputs: Any = None         # or plain per-layer input matrices {task: {key: X}}
    cache: Any = None          # decomposition cache (ESM family), reused across re-merges
    esd_keys: list[str] | None = None   # explicit ESD keys (non-open_clip models)
    info: dict = field(default_factory=dict)   # methods may report diagnostics here

    @property
    def names(self) -> list[str]:
        return list(self.tasks)

    @property
    def keys(self) -> list[str]:
        """Merged keys (everything but SKIP), in the base's order."""
        return [k for k in self.base if self.roles.get(k) != vit.SKIP]

    def keys_with_role(self, role: str) -> list[str]:
        return [k for k in self.keys if self.roles[k] == role]

    def base_tensor(self, key: str, dtype=torch.float32) -> torch.Tensor:
        return self.base[key].to(self.device, dtype)

    def deltas(self, key: str, dtype=torch.float32) -> torch.Tensor:
        """Stacked task updates ``θt − θ0`` of one key: shape (T, *shape)."""
        b = self.base[key].to(self.device, dtype)
        return torch.stack([sd[key].to(self.device, dtype) - b for sd in self.tasks.values()])

    def report(self, frac: float, desc: str) -> None:
        if self.progress is not None:
            self.progress(min(max(frac, 0.0), 1.0), desc)


def _inputs(base, tasks):
    """Paths and lazy checkpoints → (base dict read whole, {name: mapping}, tasks read lazily)."""
    from .lazy import LazyCheckpoint, as_state
    base = as_state(base, name="base")
    if isinstance(base, LazyCheckpoint):
        base = base.load()
    if isinstance(tasks, (list, tuple)):          # a list of paths: named by their file stems
        from pathlib import Path
        tasks = {Path(t).stem if isinstance(t, (str, Path)) else f"task{i}": t for i, t in enumerate(tasks)}
    if not isinstance(tasks, Mapping):
        raise ValueError(f"tasks must be {{name: state dict or path}}, got {type(tasks).__name__}")
    return base, {name: as_state(sd, name=f"task {name!r}") for name, sd in tasks.items()}


def merge_updates(method: str, base, tasks, *, device="auto", roles=None, layer_types=None, progress=None,
                  stats=None, inputs=None, cache=None, esd_keys=None, check=True, info=None, **params) -> dict:
    """Like :func:`merge` but returns only ``{key: update}`` (float32, CPU) for the merged keys."""
    from .lazy import LazyCheckpoint, check_compatible_lazy
    m = get_method(method)
    p = m.resolve(params)
    if not tasks:
        raise ValueError("no task checkpoints given: merging needs at least one task")
    base, tasks = _inputs(base, tasks)
    if check:
        for name, sd in tasks.items():
            if isinstance(sd, LazyCheckpoint):
                check_compatible_lazy(base, sd, name)
            else:
                check_compatible(base, sd, name)
    roles = dict(roles) if roles is not None else vit.roles_of(base)
    missing = [k for k in base if k not in roles]
    if missing:
        raise ValueError(f"roles given for some keys but not for {missing[:5]}{' …' if len(missing) > 5 else ''}")
    ctx = MergeContext(base=base, tasks=tasks, roles=roles,
                       layer_types=dict(layer_types) if layer_types is not None else vit.layer_types_of(base),
                       device=resolve_device(device), progress=progress, stats=stats, inputs=inputs,
                       cache=cache, esd_keys=esd_keys)
    ups = m.fn(ctx, **p)
    if info is not None:
        info.update(ctx.info)
    return {k: v.detach().to("cpu", torch.float32) for k, v in ups.items()}


def apply_updates(base: Mapping[str, torch.Tensor], updates: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """θ0 + update for every updated key (computed in float32, stored in the base's dtype); others copied."""
    out = {}
    for k, v in base.items():
        if k in updates:
            out[k] = (v.to(torch.float32) + updates[k].to(v.device, torch.float32)).to(v.dtype)
        else:
            out[k] = v.clone()
    return out


def merge(method: str, base, tasks, **kwargs) -> dict[str, torch.Tensor]:
    """Merge task checkpoints into the base with a registered method.

    ``base``: state dict of the pre-trained model; ``tasks``: ``{name: state dict}``
    of models fine-tuned from it (a state dict may also be a path to a
    ``.safetensors`` file or a :class:`esm_core.lazy.LazyCheckpoint`, read lazily). Keyword arguments are the method's parameters
    (see ``esm-studio methods``; ``alpha`` for every method) plus ``device``
    ("auto", "cpu", "cuda"), ``roles`` / ``layer_types`` (for non-open_clip
    state dicts), ``progress`` (``fn(fraction, description)``), and for the ESM
    family ``stats`` / ``inputs`` / ``cache``. Returns the full merged state dict.
    """
    base, tasks = _inputs(base, tasks)
    return apply_updates(base, merge_updates(method, base, tasks, **kwargs))
