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
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch

from ..progress import Progress
from .. import models
from ..checkpoints import check_compatible, check_finite
from ..lazy import LazyCheckpoint, as_state, check_compatible_lazy
from ..device import all_finite, resolve_device
from ..models.roles import OWN, SKIP
from .registry import get_method



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
    family_esd_types: tuple = ()        # the model family's default ESD layer types (ESM's esd_types="auto")
    alpha_all: bool = False             # α scales every merged key (text encoders, methods §8), not ESM's ESD keys only
    tsv_every_2d: bool = False          # ESM merges every non-ESD 2-D key by TSV-M, VECTOR ones too (methods §8)
    tsv_min_rank: int = 0               # TSV-M keeps max(tsv_min_rank, ⌊min(m, n) / T⌋) triplets per task (§3, §8)
    info: dict = field(default_factory=dict)   # methods may report diagnostics here

    @property
    def names(self) -> list[str]:
        return list(self.tasks)

    @property
    def keys(self) -> list[str]:
        """Merged keys (everything but SKIP and OWN), in the base's order."""
        return [k for k in self.base if self.roles.get(k) not in (SKIP, OWN)]

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

    def walk(self, label: str, keys: Iterable[str] | None = None, start: float = 0.0, end: float = 1.0
             ) -> Iterator[str]:
        """The merged keys (or ``keys``) one by one; once the caller is done with key i of n, progress
        ``start + (end − start)·i/n`` is reported as ``"{label}: {key}"`` — the one key walk every method's loop
        uses (a progress function that raises stops the merge between two keys)."""
        keys = self.keys if keys is None else list(keys)
        n = len(keys)
        for i, key in enumerate(keys):
            yield key
            self.report(start + (end - start) * (i + 1) / n, f"{label}: {key}")


def _inputs(base, tasks):
    """Paths and lazy checkpoints → (base dict read whole, {name: mapping}, tasks read lazily)."""
    base = as_state(base, name="base")
    if isinstance(base, LazyCheckpoint):
        base = base.load()
    if isinstance(tasks, (list, tuple)):          # a list of paths: named by their file stems
        tasks = {Path(t).stem if isinstance(t, (str, Path)) else f"task{i}": t for i, t in enumerate(tasks)}
    if not isinstance(tasks, Mapping):
        raise ValueError(f"tasks must be {{name: state dict or path}}, got {type(tasks).__name__}")
    return base, {name: as_state(sd, name=f"task {name!r}") for name, sd in tasks.items()}


def merge_updates(method: str, base, tasks, *, device="auto", family=None, roles=None, layer_types=None,
                  progress=None, stats=None, inputs=None, cache=None, esd_keys=None, check=True, info=None,
                  **params) -> dict:
    """Like :func:`merge` but returns only ``{key: update}`` (float32, CPU) for the merged keys."""
    m = get_method(method)
    p = m.resolve(params)
    if not tasks:
        raise ValueError("no task checkpoints given: merging needs at least one task")
    base, tasks = _inputs(base, tasks)
    if check:
        check_finite(base, "base")                 # judged in float32, the dtype of the maths below
        for name, sd in tasks.items():
            if isinstance(sd, LazyCheckpoint):
                check_compatible_lazy(base, sd, name)
            else:
                check_compatible(base, sd, name)
    fam = models.get_family(family) if family else models.family_of(base)
    roles = dict(roles) if roles is not None else models.roles_of(base, fam.NAME if fam else None)
    missing = [k for k in base if k not in roles]
    if missing:
        raise ValueError(f"roles given for some keys but not for {missing[:5]}{' …' if len(missing) > 5 else ''}")
    types = dict(layer_types) if layer_types is not None else models.layer_types_of(base, fam.NAME if fam else None)
    # ESM's esd_types="auto": the family's ESD types; for an unknown family every layer type given (methods §8)
    auto_esd = tuple(fam.ESD_TYPES) if fam is not None else tuple(sorted(set(types.values())))
    ctx = MergeContext(base=base, tasks=tasks, roles=roles, layer_types=types, device=resolve_device(device),
                       progress=progress, stats=stats, inputs=inputs, cache=cache, esd_keys=esd_keys,
                       family_esd_types=auto_esd, alpha_all=bool(getattr(fam, "ALPHA_ON_ALL", False)),
                       tsv_every_2d=bool(getattr(fam, "TSV_EVERY_2D", False)),
                       tsv_min_rank=int(getattr(fam, "TSV_MIN_RANK", 0)))
    ups = m.fn(ctx, **p)
    if info is not None:
        info.update(ctx.info)
    out = {k: v.detach().to("cpu", torch.float32) for k, v in ups.items()}
    bad = [k for k, v in out.items() if not all_finite(v)]
    if bad:     # finite inputs can still overflow float32 (θt − θ0 near ±3.4e38): never hand back inf / NaN weights
        raise ValueError(f"{m.title}: the merge produced non-finite values (NaN/inf) in "
                         f"{', '.join(bad[:5])}{' …' if len(bad) > 5 else ''}; the checkpoints' values are too "
                         "large for float32 arithmetic")
    return out


def apply_updates(base: Mapping[str, torch.Tensor], updates: Mapping[str, torch.Tensor], *,
                  consume: bool = False) -> dict[str, torch.Tensor]:
    """θ0 + update for every updated key (computed in float32, stored in the base's dtype); others copied.

    ``consume``: ``updates`` is a dict the caller hands over; each key is removed from it once added, so its
    tensor can be freed then (peak: the merged model plus one update, not two models' worth).
    Refuses (ValueError naming the keys) a result that is not finite once stored
    in the base's dtype, e.g. a float16 base whose merged values pass 65504."""
    out, bad = {}, []
    for k, v in base.items():
        if k in updates:
            u = updates.pop(k) if consume else updates[k]
            out[k] = (v.to(torch.float32) + u.to(v.device, torch.float32)).to(v.dtype)
            del u
            if out[k].is_floating_point() and not all_finite(out[k]):
                bad.append(k)
        else:
            out[k] = v.clone()
    if bad:
        raise ValueError(f"the merged weights are not finite once stored in the base's dtype "
                         f"({', '.join(sorted({str(base[k].dtype) for k in bad}))}) in {', '.join(bad[:5])}"
                         f"{' …' if len(bad) > 5 else ''}: the update is too large for it (lower α?)")
    return out


def merge(method: str, base, tasks, **kwargs) -> dict[str, torch.Tensor]:
    """Merge task checkpoints into the base with a registered method.

    ``base``: state dict of the pre-trained model; ``tasks``: ``{name: state dict}``
    of models fine-tuned from it (a state dict may also be a path to a
    ``.safetensors`` file or a :class:`esm_core.lazy.LazyCheckpoint`, read lazily). Keyword arguments are the method's parameters
    (see ``esm-studio methods``; ``alpha`` for every method) plus ``device``
    ("auto", "cpu", "cuda"), ``family`` (a name of :data:`esm_core.models.FAMILIES`;
    default: found from the key names), ``roles`` / ``layer_types`` (for other
    state dicts), ``progress`` (``fn(fraction, description)``), and for the ESM
    family ``stats`` / ``inputs`` / ``cache``. Returns the full merged state dict.
    """
    base, tasks = _inputs(base, tasks)
    return apply_updates(base, merge_updates(method, base, tasks, **kwargs))
