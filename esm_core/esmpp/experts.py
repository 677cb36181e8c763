"""ESM++ experts and prototypes (methods §7.2–7.5): low-rank factors of what ESM lost, per task and routed layer."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from ..progress import Progress
from .. import models
from ..device import resolve_device
from ..merging.esd import esd
from ..merging.kernels import scipy_threads
from ..merging.stats import task_layer_stats



@dataclass(eq=False)
class Experts:
    """Low-rank experts and prototypes of every routed layer, stacked over tasks.

    ``A[key]``: (T, r, d_in), ``B[key]``: (T, d_out, r), ``prototypes[key]``:
    (T, d_in), L2-normalised; the task axis follows ``tasks``. The expert of
    task t at layer ``key`` is the update ``B[key][t] @ A[key][t]``; its rank r
    is ``min(rank, d_out)``. ``base_params`` is the parameter count of the
    model the experts are added to (for :meth:`storage`).
    """
    tasks: list[str]
    keys: list[str]
    rank: int
    A: dict[str, torch.Tensor]
    B: dict[str, torch.Tensor]
    prototypes: dict[str, torch.Tensor]
    base_params: int | None = None

    def task_index(self, task: str) -> int:
        if task not in self.tasks:
            raise ValueError(f"no expert for task {task!r}; tasks: {self.tasks}")
        return self.tasks.index(task)

    def expert(self, key: str, task: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of one task at one layer: (r × d_in, d_out × r)."""
        if key not in self.A:
            raise ValueError(f"no routed layer {key!r}")
        t = self.task_index(task)
        return self.A[key][t], self.B[key][t]

    def delta(self, key: str, task: str) -> torch.Tensor:
        """The dense update ``B A`` of one expert (for inspection; never stored)."""
        a, b = self.expert(key, task)
        return b @ a

    def storage(self) -> dict[str, Any]:
        """Parameters the experts add to the merged model.

        ``factors_per_task`` = Σ over routed layers of r·(d_out + d_in) (methods §7:
        82,944·r for ViT-B); ``prototypes_per_task`` = Σ d_in; ``per_task`` is
        their sum and ``total`` = T · ``per_task``. ``share_per_task`` /
        ``share_total`` are fractions of ``base_params`` (None when unknown).
        """
        factors = sum(int(self.A[k][0].numel() + self.B[k][0].numel()) for k in self.keys)
        protos = sum(int(self.prototypes[k].shape[1]) for k in self.keys)
        per_task = factors + protos
        total = per_task * len(self.tasks)
        base = self.base_params
        return {"tasks": len(self.tasks), "rank": self.rank, "layers": len(self.keys),
                "factors_per_task": factors, "prototypes_per_task": protos, "per_task": per_task,
                "total": total, "base_params": base,
                "share_per_task": per_task / base if base else None,
                "share_total": total / base if base else None}


def routed_keys_of(keys, routed_types: str | Sequence[str] = "auto") -> list[str]:
    """The ESM++ routed layers among ``keys``: those whose layer type is in ``routed_types``
    ("auto": the model family's ROUTED_TYPES — open_clip ViT: in_proj and c_fc of every block; BERT family:
    ``attn.query``, ``attn.key``, ``attn.value``, ``ffn.intermediate`` of every layer)."""
    keys = list(keys)
    if isinstance(routed_types, str):
        if routed_types.strip() == "auto":
            fam = models.family_of(keys)
            routed_types = tuple(fam.ROUTED_TYPES) if fam is not None else ()
        else:
            routed_types = tuple(t.strip() for t in routed_types.split(",") if t.strip())
    types = models.layer_types_of(keys)
    known = set(types.values())
    bad = [t for t in routed_types if t not in known]
    if bad:
        raise ValueError(f"routed_types {bad} are not layer types of this model (it has {sorted(known)})")
    return [k for k in keys if types.get(k) in routed_types]


@torch.no_grad()
def build_experts(merged_sd: Mapping[str, torch.Tensor], tasks: Mapping[str, Mapping[str, torch.Tensor]], stats,
                  *, rank: int = 32, routed_keys: Sequence[str] | None = None, device: str | torch.device = "cpu",
                  progress: Progress | None = None) -> Experts:
    """Experts and prototypes of ESM++ (methods §7.2–7.5).

    ``merged_sd``: the ESM-merged state dict (``W_ESM``); ``tasks``: ``{name:
    fine-tuned state dict}``; ``stats``: ``{task: {key: LayerStats}}`` or the
    ``Stats`` dict of :func:`esm_core.probe.probe_pool` (Gram matrix, row
    count and mean of each layer's input inside fine-tuned model t). For every
    routed key (default: :func:`routed_keys_of`) and task t: ``δWt = Wt −
    W_ESM``, ``(P, λ) = esd(δWt, G_t, n_t)``, ``Bt = P[:, :r]``, ``At = Btᵀ δWt``
    (float64 maths, stored float32), prototype = ``mean_t / ‖mean_t‖``.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"expert rank must be an integer >= 1, got {rank!r} (use mode 'base' for no experts)")
    names = list(tasks)
    if not names:
        raise ValueError("no task checkpoints given: ESM++ needs at least one task")
    keys = list(routed_keys) if routed_keys is not None else routed_keys_of(merged_sd)
    if not keys:
        kinds = "; ".join(f"{f.NAME}: {', '.join(f.ROUTED_TYPES)}" for f in models.FAMILIES.values())
        raise ValueError(f"no routed layers: the merged state dict has none of its family's routed layer types "
                         f"({kinds}) — pass routed_keys= for other models")
    dev = resolve_device(device)
    A, B, protos = {}, {}, {}
    with scipy_threads(dev):          # SciPy's eigh / products carry the threads (-13 % on 2 cores)
        for i, key in enumerate(keys):
            if progress is not None:
                progress(i / len(keys), f"experts: {key}")
            if key not in merged_sd:
                raise ValueError(f"routed layer {key!r} is not in the merged state dict")
            w = merged_sd[key]
            if w.ndim != 2:
                raise ValueError(f"routed layer {key!r} must be a 2-D weight, got shape {tuple(w.shape)}")
            d_out, d_in = w.shape
            r = min(rank, d_out)
            w64 = w.to(dev, torch.float64)
            a_t, b_t, p_t = [], [], []
            for t in names:
                if key not in tasks[t]:
                    raise ValueError(f"task {t!r} has no {key!r}")
                wt = tasks[t][key]                              # read once (a lazy checkpoint reads it from disk)
                if tuple(wt.shape) != (d_out, d_in):
                    raise ValueError(f"task {t!r}: {key!r} has shape {tuple(wt.shape)}, "
                                     f"the merged model {(d_out, d_in)}")
                st = task_layer_stats(stats, t, key)
                delta = wt.to(dev, torch.float64) - w64                          # δWt = Wt − W_ESM
                del wt
                P = esd(delta, st.gram.to(dev), st.n, columns=r, all_values=False).P    # λ unread: top r pairs
                b = P[:, :r]                                                      # top-r essential directions
                a_t.append(b.mT @ delta)                                          # At = Btᵀ δWt
                b_t.append(b)
                if st.mean is None:
                    raise ValueError(f"activation statistics of task {t!r}, layer {key!r} have no mean (prototype)")
                m = st.mean.to(dev, torch.float64).reshape(-1)
                if m.shape[0] != d_in:
                    raise ValueError(f"prototype of task {t!r}, layer {key!r} has {m.shape[0]} entries, "
                                     f"the layer has {d_in} inputs")
                nrm = torch.linalg.vector_norm(m)
                if not bool(torch.isfinite(nrm)) or nrm == 0:
                    raise ValueError(f"prototype of task {t!r}, layer {key!r} is zero or not finite")
                p_t.append(m / nrm)
            A[key] = torch.stack(a_t).to("cpu", torch.float32)
            B[key] = torch.stack(b_t).to("cpu", torch.float32)
            protos[key] = torch.stack(p_t).to("cpu", torch.float32)
    if progress is not None:
        progress(1.0, "experts done")
    base_params = sum(int(v.numel()) for v in merged_sd.values() if v.is_floating_point())
    return Experts(tasks=names, keys=keys, rank=int(rank), A=A, B=B, prototypes=protos, base_params=base_params)
