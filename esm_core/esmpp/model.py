"""ESM++: the ESM-merged model plus routed low-rank experts (SPEC §7).

The pipeline, for a pool of tasks fine-tuned from one base model:

1. ``W_ESM``: the ESM-merged model (SPEC §6) at its chosen α.
2. For every task t and routed layer (``attn.in_proj_weight`` and
   ``mlp.c_fc.weight`` of every block), the residual ``δWt = Wt − W_ESM``.
3. An expert per (layer, task) by ESD of the residual (SPEC §5) with task t's
   input Gram matrix: ``Bt`` = the top-r essential directions (d_out × r),
   ``At = Btᵀ δWt`` (r × d_in). Only these factors are stored, never a dense
   per-task delta (:func:`build_experts`, :class:`Experts`).
4. A prototype per (layer, task): the mean of that layer's input over all
   tokens of task t's proxy samples inside fine-tuned model t, L2-normalised.
5. At inference (:class:`RoutedModel`), per sample and per routed layer, from
   the dynamic model's own hidden state: ``x̄`` = mean of the layer input over
   the sample's tokens, ``t* = argmax_t cos(x̄, prototype_t)`` (hard top-1),
   output ``= W_ESM x + b + Bt*(At* x)``. A mixed batch routes every sample on
   its own (the factors are gathered per sample; no Python loop over samples).
6. Every decision is recorded in a :class:`DecisionLog` (chosen expert, all
   cosines, the true task when known) for routing accuracy per layer,
   confusion matrices and the oracle mode.

Modes of a :class:`RoutedModel`: ``"route"`` (default), ``"oracle"`` (force
each sample's true task), ``"base"`` (no experts: plain ESM) and
``"fixed:<task>"`` (one expert for everything).

How the open_clip tower is modified (open_clip 3.3): ``ResidualAttentionBlock``
calls ``self.attn(q_x, k_x, v_x, need_weights=False, attn_mask=mask)[0]`` with
``k_x = v_x = q_x`` for a ViT, and ``self.mlp(ln_2(x))`` with ``mlp.c_fc`` an
``nn.Linear``. ``mlp.c_fc`` becomes a :class:`RoutedLinear`;
``nn.MultiheadAttention`` becomes a :class:`RoutedAttention` that computes
``qkv`` with a :class:`RoutedLinear` and then scaled dot-product attention
with the same heads and ``out_proj``. With zero experts both are numerically
equal to the original modules.

Using it (this is how ``esm_core.evaluate.evaluate_esmpp`` calls it for the
``esmpp`` rows)::

    routed = build_esmpp(pool, stats, rank=32)            # alpha=None: chosen on validation
    accs, log = evaluate_routed(pool, routed, "test")     # per-task accuracy + every decision
    summary = summarize(pool, accs, "test")               # esm_core.evaluate.summarize
    routing_accuracy(log)                                 # per routed layer
    accs_oracle, _ = evaluate_routed(pool, routed, "test", mode="oracle")
    save_esmpp("model.safetensors", routed.merged_sd, routed.experts, routed.config)

``routed`` is also a plain ``nn.Module`` image tower (``routed(images) ->
features``), so ``esm_core.evaluate.evaluate(pool, routed, ...)`` works as is
(routing mode "route", no true task known).
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import vit
from .checkpoints import CheckpointError, check_compatible, read_config, save_safetensors
from .decompose import esd

Progress = Callable[[float, str], None]
FACTOR_PREFIX = "esmpp."          # tensor names of the factors in a saved ESM++ file
EMBED_MIN_POINTS = 15             # below this many points routing_embedding uses PCA instead of UMAP


# ---------------------------------------------------------------------------
# Experts: factors and prototypes
# ---------------------------------------------------------------------------


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

        ``factors_per_task`` = Σ over routed layers of r·(d_out + d_in) (SPEC §7:
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


def routed_keys_of(keys) -> list[str]:
    """The ESM++ routed layers among ``keys`` (open_clip ViT: in_proj and c_fc of every block)."""
    return [k for k in keys if vit.layer_type(k) in vit.ROUTED_TYPES]


def _layer_stats(stats, task: str, key: str):
    from .probe import task_layer_stats   # accepts a Stats dict or {task: {key: LayerStats}}
    return task_layer_stats(stats, task, key)


@torch.no_grad()
def build_experts(merged_sd: Mapping[str, torch.Tensor], tasks: Mapping[str, Mapping[str, torch.Tensor]], stats,
                  *, rank: int = 32, routed_keys: Sequence[str] | None = None, device: str | torch.device = "cpu",
                  progress: Progress | None = None) -> Experts:
    """Experts and prototypes of ESM++ (SPEC §7.2–7.5).

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
        raise ValueError("no routed layers: the merged state dict has no attn.in_proj_weight / mlp.c_fc.weight keys "
                         "(pass routed_keys= for other models)")
    from .merge import resolve_device
    dev = resolve_device(device)
    A, B, protos = {}, {}, {}
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
            if tuple(tasks[t][key].shape) != (d_out, d_in):
                raise ValueError(f"task {t!r}: {key!r} has shape {tuple(tasks[t][key].shape)}, "
                                 f"the merged model {(d_out, d_in)}")
            st = _layer_stats(stats, t, key)
            delta = tasks[t][key].to(dev, torch.float64) - w64              # δWt = Wt − W_ESM
            P, _ = esd(delta, st.gram.to(dev), st.n, columns=r)
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


# ---------------------------------------------------------------------------
# Decision log
# ---------------------------------------------------------------------------


@dataclass(eq=False)
class DecisionLog:
    """Every routing decision of one or more forward calls.

    N samples, L routed layers (in ``keys`` order = execution order), T tasks:
    ``cos`` (N, L, T) cosine of each sample's mean layer input with each
    prototype; ``routed`` (N, L) the router's choice = ``cos.argmax(-1)``;
    ``chosen`` (N, L) the expert actually applied (= ``routed`` in mode
    "route", the true task in "oracle", the fixed task in "fixed:…", −1 in
    "base"); ``true`` (N,) the true task index (−1 = unknown); ``pooled``:
    per layer the (N, d_in) mean-pooled inputs, or None when not recorded.
    ``modes``: the mode of each sample's forward call.
    """
    tasks: list[str]
    keys: list[str]
    cos: torch.Tensor
    routed: torch.Tensor
    chosen: torch.Tensor
    true: torch.Tensor
    modes: list[str] = field(default_factory=list)
    pooled: list[torch.Tensor] | None = None

    @classmethod
    def empty(cls, tasks: Sequence[str], keys: Sequence[str], dims: Sequence[int] | None = None) -> "DecisionLog":
        T, L = len(tasks), len(keys)
        pooled = None if dims is None else [torch.zeros(0, d) for d in dims]
        return cls(list(tasks), list(keys), torch.zeros(0, L, T), torch.zeros(0, L, dtype=torch.long),
                   torch.zeros(0, L, dtype=torch.long), torch.zeros(0, dtype=torch.long), [], pooled)

    @property
    def n(self) -> int:
        return int(self.true.shape[0])

    def layer_index(self, layer: int | str) -> int:
        """Index of a routed layer given as an index or a key."""
        if isinstance(layer, str):
            if layer not in self.keys:
                raise ValueError(f"no routed layer {layer!r} in the log")
            return self.keys.index(layer)
        if not -len(self.keys) <= int(layer) < len(self.keys):
            raise ValueError(f"layer index {layer} out of range: {len(self.keys)} routed layers")
        return int(layer) % len(self.keys)

    def extend(self, other: "DecisionLog") -> None:
        """Append another log of the same tasks and layers (in place)."""
        if other.tasks != self.tasks or other.keys != self.keys:
            raise ValueError("cannot join decision logs of different tasks or layers")
        self.cos = torch.cat([self.cos, other.cos])
        self.routed = torch.cat([self.routed, other.routed])
        self.chosen = torch.cat([self.chosen, other.chosen])
        self.true = torch.cat([self.true, other.true])
        self.modes = self.modes + other.modes
        if self.pooled is not None:
            if other.pooled is None:
                self.pooled = None
            else:
                self.pooled = [torch.cat([a, b]) for a, b in zip(self.pooled, other.pooled)]


def _known(log: DecisionLog) -> torch.Tensor:
    mask = log.true >= 0
    if not bool(mask.any()):
        raise ValueError("the decision log has no sample with a known true task (pass true_task=...)")
    return mask


def routing_accuracy(log: DecisionLog) -> torch.Tensor:
    """Per routed layer, the share of samples (with a known true task) the router sent to their own task: (L,)."""
    mask = _known(log)
    return (log.routed[mask] == log.true[mask, None]).double().mean(0)


def confusion(log: DecisionLog, layer: int | str | None = None) -> torch.Tensor:
    """Counts (T × T), rows = true task, columns = routed task; summed over all layers when ``layer`` is None."""
    mask = _known(log)
    T = len(log.tasks)
    routed = log.routed[mask] if layer is None else log.routed[mask][:, log.layer_index(layer)][:, None]
    true = log.true[mask][:, None].expand_as(routed)
    idx = (true * T + routed).reshape(-1)
    return torch.bincount(idx, minlength=T * T).reshape(T, T)


def majority_task(log: DecisionLog) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, the task most layers routed to (ties: lowest index) and the share of layers that agree."""
    T = len(log.tasks)
    counts = F.one_hot(log.routed, T).sum(1)                     # (N, T)
    top = counts.argmax(1)
    return top, counts.gather(1, top[:, None])[:, 0].double() / max(len(log.keys), 1)


# ---------------------------------------------------------------------------
# Routed layers
# ---------------------------------------------------------------------------


class _Router:
    """State shared by the routed layers of one model during a forward call: mode, forced tasks, records."""

    def __init__(self, n_layers: int):
        self.n_layers = n_layers
        self.kind = "route"          # "route" | "oracle" | "fixed" | "base"
        self.forced: torch.Tensor | None = None
        self.fixed: int | None = None
        self.records: list | None = None

    def decide(self, index: int, x: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor | None:
        """Expert index per sample for batch-first input ``x`` (B, tokens, d_in), or None (no expert)."""
        pooled = x.mean(1)                                                   # x̄ per sample
        cos = F.normalize(pooled.float(), dim=-1) @ prototypes.float().mT    # (B, T); prototypes are unit
        routed = cos.argmax(-1)
        if self.kind == "route":
            chosen = routed
        elif self.kind == "oracle":
            if self.forced is None or self.forced.shape[0] != x.shape[0]:
                raise ValueError("oracle mode: the true task of every sample in the batch is needed")
            chosen = self.forced.to(x.device)
        elif self.kind == "fixed":
            chosen = torch.full_like(routed, self.fixed)
        else:
            chosen = None
        if self.records is not None:
            self.records[index] = (cos.detach(), routed, routed.new_full(routed.shape, -1) if chosen is None
                                   else chosen, pooled.detach().float())
        return chosen


class RoutedLinear(nn.Module):
    """``y = W_ESM x + b + B_t*(A_t* x)`` with t* chosen per sample by the shared router.

    ``A`` (T, r, d_in), ``B`` (T, d_out, r), ``prototypes`` (T, d_in) are
    buffers; ``weight`` / ``bias`` are W_ESM and its bias. ``batch_first``:
    input layout (B, tokens, d) when True, (tokens, B, d) when False.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor,
                 prototypes: torch.Tensor, router: _Router, index: int, batch_first: bool = True):
        super().__init__()
        d_out, d_in = weight.shape
        if A.ndim != 3 or A.shape[2] != d_in or B.shape != (A.shape[0], d_out, A.shape[1]):
            raise ValueError(f"expert factors do not fit a {d_out}×{d_in} layer: "
                             f"A {tuple(A.shape)}, B {tuple(B.shape)}")
        if prototypes.shape != (A.shape[0], d_in):
            raise ValueError(f"prototypes must be {A.shape[0]}×{d_in}, got {tuple(prototypes.shape)}")
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.register_buffer("A", A.detach().to(weight.dtype))       # shares memory with the Experts on CPU
        self.register_buffer("B", B.detach().to(weight.dtype))
        self.register_buffer("prototypes", prototypes.detach().to(weight.dtype))
        self.router = router
        self.index = index
        self.batch_first = batch_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3:
            raise ValueError(f"routed layer expects a 3-D (batch, tokens, features) input, got {tuple(x.shape)}")
        xb = x if self.batch_first else x.transpose(0, 1)
        out = F.linear(xb, self.weight, self.bias)
        t = self.router.decide(self.index, xb, self.prototypes)
        if t is not None:
            low = torch.bmm(xb, self.A[t].mT)                   # (B, tokens, r) = A_t* x
            out = out + torch.bmm(low, self.B[t].mT)           # + B_t* (A_t* x)
        return out if self.batch_first else out.transpose(0, 1)


class RoutedAttention(nn.Module):
    """Drop-in for open_clip's self-attention ``nn.MultiheadAttention`` with a routed ``in_proj``.

    ``forward(query, key, value, need_weights=False, attn_mask=None)`` returns
    ``(output, None)`` like the original (attention weights are not computed).
    ``qkv = in_proj(x)`` (a :class:`RoutedLinear`), heads split as in
    ``nn.MultiheadAttention``, scaled dot-product attention, ``out_proj``.
    Self-attention only (key and value must be the query tensor, or None).
    """

    def __init__(self, mha: nn.MultiheadAttention, in_proj: RoutedLinear):
        super().__init__()
        if not mha._qkv_same_embed_dim or mha.in_proj_weight is None:
            raise ValueError("routed attention needs a MultiheadAttention with a packed in_proj_weight")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("routed attention does not support bias_k/bias_v or add_zero_attn")
        self.in_proj = in_proj
        self.out_proj = mha.out_proj
        self.num_heads = mha.num_heads
        self.embed_dim = mha.embed_dim
        self.dropout = mha.dropout
        self.batch_first = mha.batch_first

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None, value: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = False,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, None]:
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise NotImplementedError("ESM++ routed attention supports self-attention only (key = value = query)")
        if key_padding_mask is not None:
            raise NotImplementedError("ESM++ routed attention does not support key_padding_mask")
        x = query if self.batch_first else query.transpose(0, 1)         # (B, L, D)
        Bn, L, D = x.shape
        H = self.num_heads
        qkv = self.in_proj(x)                                            # (B, L, 3D)
        q, k, v = (z.reshape(Bn, L, H, D // H).transpose(1, 2) for z in qkv.chunk(3, dim=-1))
        mask = attn_mask
        if mask is not None:
            if mask.dtype == torch.bool:
                mask = ~mask                                             # MHA: True = masked; SDPA: True = kept
            if mask.ndim == 3:
                mask = mask.reshape(Bn, H, L, -1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None,
                                           dropout_p=self.dropout if self.training else 0.0)
        o = self.out_proj(o.transpose(1, 2).reshape(Bn, L, D))
        return (o if self.batch_first else o.transpose(0, 1)), None


# ---------------------------------------------------------------------------
# The routed model
# ---------------------------------------------------------------------------


def _sort_keys(keys: Sequence[str]) -> list[str]:
    """Routed keys in execution order: by block, then in_proj before c_fc before c_proj."""
    order = {vit.IN_PROJ: 0, vit.C_FC: 1, vit.C_PROJ: 2}
    for k in keys:
        if vit.block_index(k) is None or vit.layer_type(k) not in order:
            raise ValueError(f"cannot route layer {k!r}: supported are attn.in_proj_weight, mlp.c_fc.weight and "
                             "mlp.c_proj.weight of open_clip transformer blocks")
    return sorted(keys, key=lambda k: (vit.block_index(k), order[vit.layer_type(k)]))


class RoutedModel(nn.Module):
    """An open_clip image tower whose routed layers carry ESM++ experts.

    ``routed(images, true_task=None, mode=None) -> features``. ``mode``: None
    (use ``routed.mode``, default "route"), "route", "oracle", "base" or
    "fixed:<task>". ``true_task``: a task name or index for the whole batch, or
    one per sample (list / LongTensor); needed by "oracle", recorded in the log
    otherwise. After every call ``routed.last_log`` is the :class:`DecisionLog`
    of that call (with pooled inputs); inside ``with routed.logging() as log:``
    every call is also appended to ``log``. ``with routed.using(mode=...,
    true_task=...):`` sets the defaults for calls that do not pass them (for
    code such as :func:`esm_core.evaluate.evaluate` that calls ``routed(x)``).
    Attributes kept for saving: ``merged_sd``, ``experts``, ``config``.
    """

    def __init__(self, visual: nn.Module, experts: Experts, keys: list[str], router: _Router,
                 merged_sd: Mapping[str, torch.Tensor] | None = None, config: dict | None = None):
        super().__init__()
        self.visual = visual
        self.experts = experts
        self.keys = keys
        self.tasks = list(experts.tasks)
        self._router = router
        self.mode = "route"
        self.true_task = None
        self.last_log: DecisionLog | None = None
        self._collectors: list[tuple[DecisionLog, bool]] = []
        self.merged_sd = merged_sd
        self.config = dict(config or {})

    # -- arguments ---------------------------------------------------------

    def _parse_mode(self, mode: str) -> tuple[str, int | None]:
        if mode in ("route", "oracle", "base"):
            return mode, None
        if isinstance(mode, str) and mode.startswith("fixed:"):
            return "fixed", self.experts.task_index(mode[len("fixed:"):])
        raise ValueError(f"unknown routing mode {mode!r}: use 'route', 'oracle', 'base' or 'fixed:<task>'")

    def task_ids(self, true_task, n: int) -> torch.Tensor | None:
        """``true_task`` (name, index, list of names/indices or LongTensor) as a LongTensor of n task indices."""
        if true_task is None:
            return None
        T = len(self.tasks)

        def one(t) -> int:
            if isinstance(t, str):
                return self.experts.task_index(t)
            i = int(t)
            if not 0 <= i < T:
                raise ValueError(f"task index {i} out of range: {T} tasks")
            return i

        if isinstance(true_task, (str, int)):
            return torch.full((n,), one(true_task), dtype=torch.long)
        ids = torch.tensor([one(t) for t in (true_task.tolist() if isinstance(true_task, torch.Tensor)
                                             else true_task)], dtype=torch.long)
        if ids.shape[0] != n:
            raise ValueError(f"true_task has {ids.shape[0]} entries for a batch of {n} samples")
        return ids

    # -- forward -----------------------------------------------------------

    def forward(self, x: torch.Tensor, true_task=None, mode: str | None = None) -> torch.Tensor:
        kind, fixed = self._parse_mode(mode if mode is not None else self.mode)
        true = self.task_ids(true_task if true_task is not None else self.true_task, x.shape[0])
        if kind == "oracle" and true is None:
            raise ValueError("oracle mode needs the true task of the samples (true_task=...)")
        r = self._router
        r.kind, r.fixed, r.forced = kind, fixed, true
        r.records = [None] * r.n_layers
        try:
            out = self.visual(x)
            records = r.records
        finally:
            r.kind, r.fixed, r.forced, r.records = "route", None, None, None
        missing = [self.keys[i] for i, rec in enumerate(records) if rec is None]
        if missing:
            raise RuntimeError(f"routed layers were not called in the forward pass: {missing[:3]}")
        n = x.shape[0]
        log = DecisionLog(
            tasks=self.tasks, keys=list(self.keys),
            cos=torch.stack([rec[0] for rec in records], 1).cpu(),
            routed=torch.stack([rec[1] for rec in records], 1).cpu(),
            chosen=torch.stack([rec[2] for rec in records], 1).cpu(),
            true=true.cpu() if true is not None else torch.full((n,), -1, dtype=torch.long),
            modes=[mode if mode is not None else self.mode] * n,
            pooled=[rec[3].cpu() for rec in records])
        self.last_log = log
        for collector, keep_inputs in self._collectors:
            collector.extend(log if keep_inputs else DecisionLog(**{**log.__dict__, "pooled": None}))
        return out

    @contextlib.contextmanager
    def logging(self, keep_inputs: bool = False) -> Iterator[DecisionLog]:
        """Collect the decisions of every forward call inside the block into one :class:`DecisionLog`.

        ``keep_inputs``: also keep the per-sample mean-pooled inputs of every
        layer (for :func:`routing_embedding`; N × d floats per layer).
        """
        dims = [self.experts.A[k].shape[2] for k in self.keys] if keep_inputs else None
        log = DecisionLog.empty(self.tasks, self.keys, dims)
        entry = (log, keep_inputs)
        self._collectors.append(entry)
        try:
            yield log
        finally:
            self._collectors = [e for e in self._collectors if e is not entry]

    @contextlib.contextmanager
    def using(self, mode: str | None = None, true_task=None) -> Iterator["RoutedModel"]:
        """Temporarily set the default ``mode`` and ``true_task`` of forward calls."""
        if mode is not None:
            self._parse_mode(mode)
        old = (self.mode, self.true_task)
        if mode is not None:
            self.mode = mode
        if true_task is not None:
            self.true_task = true_task
        try:
            yield self
        finally:
            self.mode, self.true_task = old


def build_routed(merged_sd: Mapping[str, torch.Tensor], experts: Experts,
                 build_visual: Callable[[Mapping[str, torch.Tensor]], nn.Module], *,
                 device: str | torch.device = "cpu", config: dict | None = None) -> RoutedModel:
    """The routed image tower: ``build_visual(merged_sd)`` (an open_clip VisionTransformer, e.g.
    ``pool.build_visual``) with every routed layer of ``experts`` replaced (in_proj → :class:`RoutedAttention`,
    c_fc / c_proj → :class:`RoutedLinear`)."""
    from .merge import resolve_device
    visual = build_visual(merged_sd)
    try:
        blocks = visual.transformer.resblocks
        batch_first = bool(getattr(visual.transformer, "batch_first", True))
    except AttributeError:
        raise ValueError("build_visual must return an open_clip VisionTransformer (visual.transformer.resblocks)") \
            from None
    keys = _sort_keys(experts.keys)
    router = _Router(len(keys))
    for i, key in enumerate(keys):
        b, typ = vit.block_index(key), vit.layer_type(key)
        if b >= len(blocks):
            raise ValueError(f"routed layer {key!r}: the model has only {len(blocks)} blocks")
        blk = blocks[b]
        A, B, P = experts.A[key], experts.B[key], experts.prototypes[key]
        if typ == vit.IN_PROJ:
            mha = blk.attn
            if not isinstance(mha, nn.MultiheadAttention):
                raise ValueError(f"routed layer {key!r}: block attention is a {type(mha).__name__}, "
                                 "not nn.MultiheadAttention")
            lin = RoutedLinear(mha.in_proj_weight, mha.in_proj_bias, A, B, P, router, i, batch_first=True)
            blk.attn = RoutedAttention(mha, lin)
        else:
            name = "c_fc" if typ == vit.C_FC else "c_proj"
            old = getattr(blk.mlp, name)
            setattr(blk.mlp, name, RoutedLinear(old.weight, old.bias, A, B, P, router, i, batch_first=batch_first))
    model = RoutedModel(visual, experts, keys, router, merged_sd=merged_sd, config=config)
    return model.to(resolve_device(device)).eval()


# ---------------------------------------------------------------------------
# Whole pipeline and evaluation on a TaskPool
# ---------------------------------------------------------------------------


def build_esmpp(pool, stats=None, *, rank: int = 32, alpha: float | None = None,
                esm_params: Mapping[str, Any] | None = None, progress: Progress | None = None,
                device: str | torch.device = "auto", cache=None) -> RoutedModel:
    """ESM++ for a TaskPool: ESM merge → experts → prototypes → routed image tower.

    ``stats``: the pool's ``Stats`` (:func:`esm_core.probe.probe_pool`; probed
    here when None). ``alpha``: ESM's α; None = chosen on validation with
    :func:`esm_core.evaluate.search_alpha` (golden section). ``esm_params``:
    other ESM parameters. ``cache``: a decomposition cache reused by the ESM
    merges. Returns a :class:`RoutedModel` whose ``config`` records all of it
    (save it with ``save_esmpp(path, m.merged_sd, m.experts, m.config)``).
    """
    from .evaluate import merged_state, search_alpha
    from .merge import resolve_device
    from .methods.registry import get_method
    report = progress or (lambda f, d: None)
    dev = resolve_device(device)
    if stats is None:
        from .probe import probe_pool
        stats = probe_pool(pool, device=dev, progress=lambda f, d: report(0.2 * f, d))
    p = {k: v for k, v in dict(esm_params or {}).items() if k != "alpha"}
    curve = None
    if alpha is None:
        alpha, curve = search_alpha(pool, "esm", p, stats=stats, cache=cache, device=dev,
                                    progress=lambda f, d: report(0.2 + 0.5 * f, d))
    alpha = float(alpha)
    report(0.7, f"ESM merge at α = {alpha:.3f}")
    merged = merged_state(pool, "esm", p, alpha, stats=stats, cache=cache, device=dev)
    experts = build_experts(merged, pool.tasks, stats, rank=rank, device=dev,
                            progress=lambda f, d: report(0.75 + 0.2 * f, d))
    config = {"method": "esm++", "rank": int(rank), "alpha": alpha,
              "esm_params": get_method("esm").resolve({**p, "alpha": alpha}),
              "tasks": list(pool.task_names), "pool": getattr(pool, "name", None),
              "proxy": {"n": stats.get("n"), "seed": stats.get("seed"), "ids": stats.get("proxy_ids")}
              if isinstance(stats, Mapping) else None}
    if curve is not None:
        config["alpha_curve"] = [[float(a), float(s)] for a, s in curve]
    routed = build_routed(merged, experts, lambda sd: pool.build_visual(sd, device=dev), device=dev, config=config)
    report(1.0, "ESM++ ready")
    return routed


def evaluate_routed(pool, routed: RoutedModel, split: str = "test", tasks: Sequence[str] | None = None, *,
                    mode: str = "route", batch_size: int = 256, keep_inputs: bool = False,
                    progress: Progress | None = None) -> tuple[dict[str, float], DecisionLog]:
    """Per-task accuracy of a routed model and the log of every decision (true task recorded).

    Each task is evaluated with ``routed.using(mode=mode, true_task=task)``, so
    "oracle" forces the right expert and the log knows every sample's task.
    """
    from .evaluate import evaluate
    names = list(pool.task_names) if tasks is None else list(tasks)
    accs: dict[str, float] = {}
    dims = [routed.experts.A[k].shape[2] for k in routed.keys] if keep_inputs else None
    full = DecisionLog.empty(routed.tasks, routed.keys, dims)
    for i, t in enumerate(names):
        with routed.using(mode=mode, true_task=t), routed.logging(keep_inputs) as log:
            accs[t] = evaluate(pool, routed, split, [t], batch_size=batch_size)[t]
        full.extend(log)
        if progress is not None:
            progress((i + 1) / len(names), f"ESM++ ({mode}) {t}: {100 * accs[t]:.1f} %")
    return accs, full


@torch.no_grad()
def expert_scores(routed: RoutedModel, x: torch.Tensor, y: torch.Tensor,
                  logits_fn: Callable[[torch.Tensor], torch.Tensor], *, batch_size: int = 256) -> torch.Tensor:
    """"Which expert would have been best": (N, T) log-probability of the true label with each expert forced.

    Runs the model once per task in mode ``"fixed:<task>"`` (all layers use
    that expert); ``logits_fn(features) -> logits`` is the task's head, e.g.
    ``lambda f: pool.logits(task, f)``. ``scores.argmax(1)`` is the best expert
    per sample; compare with :func:`majority_task` of the routed log.
    """
    dev = next(routed.parameters()).device
    out = torch.zeros(x.shape[0], len(routed.tasks), dtype=torch.float64)
    y = y.reshape(-1).long()
    for j, t in enumerate(routed.tasks):
        for s in range(0, x.shape[0], batch_size):
            f = routed(x[s:s + batch_size].to(dev), mode=f"fixed:{t}")
            lp = torch.log_softmax(logits_fn(f.float()).double(), -1).cpu()
            out[s:s + batch_size, j] = lp.gather(1, y[s:s + batch_size, None])[:, 0]
    return out


# ---------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------


def save_esmpp(path: str | Path, merged_sd: Mapping[str, torch.Tensor], experts: Experts,
               config: dict | None = None) -> Path:
    """Write merged weights + expert factors + prototypes as one ``.safetensors`` (atomic).

    Factor tensors are named ``esmpp.A.<key>``, ``esmpp.B.<key>``,
    ``esmpp.proto.<key>``; the metadata holds ``config`` plus
    ``config["esmpp"] = {"tasks", "keys", "rank", "base_params"}``.
    """
    if merged_sd is None:
        raise ValueError("save_esmpp needs the merged state dict")
    clash = [k for k in merged_sd if k.startswith(FACTOR_PREFIX)]
    if clash:
        raise ValueError(f"merged state dict keys may not start with {FACTOR_PREFIX!r}: {clash[:3]}")
    tensors = dict(merged_sd)
    for k in experts.keys:
        tensors[f"{FACTOR_PREFIX}A.{k}"] = experts.A[k]
        tensors[f"{FACTOR_PREFIX}B.{k}"] = experts.B[k]
        tensors[f"{FACTOR_PREFIX}proto.{k}"] = experts.prototypes[k]
    cfg = dict(config or {})
    cfg["esmpp"] = {"tasks": list(experts.tasks), "keys": list(experts.keys), "rank": int(experts.rank),
                    "base_params": experts.base_params}
    return save_safetensors(tensors, path, cfg)


def load_esmpp(path: str | Path, base: Mapping[str, torch.Tensor] | None = None
               ) -> tuple[dict[str, torch.Tensor], Experts, dict]:
    """Read a file written by :func:`save_esmpp`: ``(merged state dict, Experts, config)``.

    Refuses (:class:`CheckpointError`, naming the key) a file that is not an
    ESM++ file, whose factors or prototypes do not fit their layer or the task
    count, or whose merged weights do not fit ``base`` (keys, shapes, dtypes).
    """
    from safetensors.torch import load_file
    p = Path(path)
    cfg = read_config(p)
    meta = (cfg or {}).get("esmpp")
    if not isinstance(meta, Mapping) or not {"tasks", "keys", "rank"} <= set(meta):
        raise CheckpointError(f"{p.name}: not an ESM++ file (no 'esmpp' entry in its metadata)")
    tensors = load_file(str(p))
    merged = {k: v for k, v in tensors.items() if not k.startswith(FACTOR_PREFIX)}
    tasks, keys, T = list(meta["tasks"]), list(meta["keys"]), len(meta["tasks"])
    A, B, protos = {}, {}, {}
    for k in keys:
        if k not in merged or merged[k].ndim != 2:
            raise CheckpointError(f"{p.name}: routed layer {k!r} has no 2-D merged weight")
        d_out, d_in = merged[k].shape
        parts = {}
        for part in ("A", "B", "proto"):
            name = f"{FACTOR_PREFIX}{part}.{k}"
            if name not in tensors:
                raise CheckpointError(f"{p.name}: missing {name!r}")
            parts[part] = tensors[name]
        a, b, pr = parts["A"], parts["B"], parts["proto"]
        r = a.shape[1] if a.ndim == 3 else -1
        if a.ndim != 3 or tuple(a.shape) != (T, r, d_in) or tuple(b.shape) != (T, d_out, r) \
                or tuple(pr.shape) != (T, d_in):
            raise CheckpointError(f"{p.name}: expert of {k!r} does not fit the {d_out}×{d_in} layer and {T} tasks: "
                                  f"A {tuple(a.shape)}, B {tuple(b.shape)}, prototypes {tuple(pr.shape)}")
        A[k], B[k], protos[k] = a, b, pr
    extra = sorted(k for k in tensors if k.startswith(FACTOR_PREFIX)
                   and k.split(".", 2)[-1] not in A)
    if extra:
        raise CheckpointError(f"{p.name}: factors of layers not listed in the metadata: {extra[:3]}")
    if base is not None:
        check_compatible(base, merged, p.name)
    experts = Experts(tasks=tasks, keys=keys, rank=int(meta["rank"]), A=A, B=B, prototypes=protos,
                      base_params=meta.get("base_params"))
    return merged, experts, cfg


# ---------------------------------------------------------------------------
# 2-D view of the routing (for the app)
# ---------------------------------------------------------------------------


def _import_umap():
    """Import umap-learn without its optional TensorFlow part.

    ``import umap`` also tries ``umap.parametric_umap`` (TensorFlow); where a
    TensorFlow is installed that import is slow and can crash the process, so
    it is blocked for the duration of the import (umap then skips it)."""
    if "umap" in sys.modules:
        return sys.modules["umap"]
    block = "tensorflow" not in sys.modules
    if block:
        sys.modules["tensorflow"] = None          # makes `import tensorflow` raise ImportError
    try:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import umap
    finally:
        if block and sys.modules.get("tensorflow", 0) is None:
            del sys.modules["tensorflow"]
    return umap


def _pca2(z: torch.Tensor) -> torch.Tensor:
    """First two principal coordinates of the rows of z (deterministic signs; zero-padded if rank < 2)."""
    zc = z - z.mean(0)
    _, _, vh = torch.linalg.svd(zc, full_matrices=False)
    v = vh[:2].mT
    if v.shape[1] < 2:
        v = torch.cat([v, v.new_zeros(v.shape[0], 2 - v.shape[1])], 1)
    idx = v.abs().argmax(0)
    signs = torch.sign(v[idx, torch.arange(v.shape[1])])
    signs[signs == 0] = 1
    return zc @ (v * signs)


def routing_embedding(log_or_inputs: DecisionLog | torch.Tensor, layer: int | str,
                      prototypes: Experts | torch.Tensor, *, seed: int = 0, tasks: Sequence[str] | None = None,
                      true: torch.Tensor | Sequence[int] | None = None, routed: torch.Tensor | None = None,
                      method: str = "umap") -> dict:
    """2-D map of per-sample mean-pooled inputs at one routed layer, together with the prototypes.

    ``log_or_inputs``: a :class:`DecisionLog` recorded with pooled inputs
    (``routed.logging(keep_inputs=True)`` or ``routed.last_log``) or an
    (N, d) tensor of pooled inputs (then ``tasks`` and optionally ``true`` /
    ``routed`` come as arguments; ``routed`` defaults to the nearest
    prototype by cosine). ``prototypes``: :class:`Experts` or a (T, d) tensor.
    Points are L2-normalised (routing is by cosine) and embedded with UMAP
    (umap-learn, ``random_state=seed``: deterministic); with fewer than
    :data:`EMBED_MIN_POINTS` points in all, PCA is used and ``note`` says so.
    ``method="pca"``: the first two principal coordinates instead (instant;
    UMAP compiles on its first use in a process).

    Returns ``{"layer", "method" ("umap" | "pca"), "note", "seed", "tasks",
    "points" (N × 2 numpy), "prototype_points" (T × 2), "true" (task name or
    None per point), "routed" (task name per point)}``.
    """
    import numpy as np
    if method not in ("umap", "pca"):
        raise ValueError(f"method must be 'umap' or 'pca', got {method!r}")
    if isinstance(log_or_inputs, DecisionLog):
        log = log_or_inputs
        li = log.layer_index(layer)
        key: int | str = log.keys[li]
        if log.pooled is None:
            raise ValueError("the decision log has no pooled inputs: record it with routed.logging(keep_inputs=True)")
        x = log.pooled[li]
        tasks = log.tasks
        true = log.true
        routed = log.routed[:, li]
    else:
        x = log_or_inputs
        if not isinstance(x, torch.Tensor) or x.ndim != 2:
            raise ValueError("inputs must be a DecisionLog or an (N, d) tensor of mean-pooled inputs")
        key = layer
    if isinstance(prototypes, Experts):
        pkey = key if isinstance(key, str) else prototypes.keys[int(key)]
        if pkey not in prototypes.prototypes:
            raise ValueError(f"the experts have no routed layer {pkey!r}")
        protos = prototypes.prototypes[pkey]
        tasks = tasks if tasks is not None else prototypes.tasks
    else:
        protos = prototypes
    if tasks is None:
        tasks = [str(i) for i in range(protos.shape[0])]
    tasks = list(tasks)
    if protos.ndim != 2 or protos.shape[1] != x.shape[1] or protos.shape[0] != len(tasks):
        raise ValueError(f"prototypes {tuple(protos.shape)} do not fit {x.shape[1]}-d inputs and {len(tasks)} tasks")
    if x.shape[0] == 0:
        raise ValueError("no points to embed")
    xn = F.normalize(x.double(), dim=-1)
    pn = F.normalize(protos.double(), dim=-1)
    if routed is None:
        routed = (xn @ pn.mT).argmax(-1)
    z = torch.cat([xn, pn])
    if method == "pca":
        note = "PCA of L2-normalised inputs"
        coords = _pca2(z).numpy()
    elif z.shape[0] < EMBED_MIN_POINTS:
        method, note = "pca", f"PCA: only {z.shape[0]} points (UMAP needs at least {EMBED_MIN_POINTS})"
        coords = _pca2(z).numpy()
    else:
        umap = _import_umap()
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reducer = umap.UMAP(n_components=2, n_neighbors=min(15, z.shape[0] - 1), random_state=seed)
            coords = np.asarray(reducer.fit_transform(z.numpy()), dtype=np.float64)
        method, note = "umap", f"UMAP of L2-normalised inputs (seed {seed})"
    n = x.shape[0]
    true_names = [None] * n if true is None else [tasks[int(t)] if int(t) >= 0 else None for t in list(true)]
    return {"layer": key, "method": method, "note": note, "seed": seed, "tasks": tasks,
            "points": coords[:n], "prototype_points": coords[n:],
            "true": true_names, "routed": [tasks[int(t)] for t in routed]}
