"""ESM++: the ESM-merged model plus routed low-rank experts (methods §7).

The pipeline, for a pool of tasks fine-tuned from one base model:

1. ``W_ESM``: the ESM-merged model (methods §6) at its chosen α.
2. For every task t and routed layer (``attn.in_proj_weight`` and
   ``mlp.c_fc.weight`` of every block), the residual ``δWt = Wt − W_ESM``.
3. An expert per (layer, task) by ESD of the residual (methods §5) with task t's
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

How the model is modified is its family's business (``route`` of the family protocol,
:mod:`esm_core.models.protocol`): every routed linear layer becomes a :class:`RoutedLinear` (made here, put in
place by the family, which wraps it where the weight sits inside a bigger module — open_clip's packed
attention in_proj becomes a :class:`RoutedAttention` calling it). With zero experts the routed model is
numerically equal to the original. Layers that read the same input (a text encoder's Q, K and V;
``routing_groups``) share one prototype set, one decision and one log entry per input group, named by its
first routed key. x̄ is the mean over the tokens that count (``sample_mask``: a text batch's non-padding
tokens, methods §8).

Using it (this is how :func:`esm_core.evaluation.runs.evaluate_esmpp` calls it for the
``esmpp`` rows; :mod:`esm_core.evaluation.esmpp` holds the pipeline)::

    routed = build_esmpp(pool, stats, rank=32)            # alpha=None: chosen on validation
    accs, log = evaluate_routed(pool, routed, "test")     # per-task accuracy + every decision
    summary = summarize(pool, accs, "test")               # esm_core.evaluation.summarize
    routing_accuracy(log)                                 # per routed layer
    accs_oracle, _ = evaluate_routed(pool, routed, "test", mode="oracle")
    save_esmpp("model.safetensors", routed.merged_sd, routed.experts, routed.config)

``routed`` is also a plain ``nn.Module`` image tower (``routed(images) ->
features``), so ``esm_core.evaluation.evaluate(pool, routed, ...)`` works as is
(routing mode "route", no true task known).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .. import models
from ..device import resolve_device
from ..models.openclip_vit import RoutedAttention  # noqa: F401  (re-exported: esm_core.esmpp.RoutedAttention)
from ..models.roles import OWN
from .experts import Experts
from .log import DecisionLog



# ---------------------------------------------------------------------------
# Routed layers
# ---------------------------------------------------------------------------


class _Router:
    """State shared by the routed layers of one model during a forward call: mode, forced tasks, records.

    ``index`` of :meth:`decide` is the routing decision's index (one per input group: layers that read the
    same input, e.g. a text encoder's Q, K and V, share one index and, within a forward call of
    :class:`RoutedModel`, one decision). ``mask`` (B, tokens) bool, when set: x̄ is the mean over the True
    (non-padding) tokens only (methods §8); None: over every token (ViT).
    """

    def __init__(self, n_layers: int):
        self.n_layers = n_layers
        self.kind = "route"          # "route" | "oracle" | "fixed" | "base"
        self.forced: torch.Tensor | None = None
        self.fixed: int | None = None
        self.records: list | None = None
        self.mask: torch.Tensor | None = None
        self.shared: dict[int, torch.Tensor | None] | None = None    # decisions of the current forward call

    def decide(self, index: int, x: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor | None:
        """Expert index per sample for batch-first input ``x`` (B, tokens, d_in), or None (no expert)."""
        if self.shared is not None and index in self.shared:
            return self.shared[index]                                        # same input group: same decision
        if self.mask is None:
            pooled = x.mean(1)                                               # x̄ per sample
        else:
            if tuple(self.mask.shape) != tuple(x.shape[:2]):
                raise ValueError(f"token mask {tuple(self.mask.shape)} does not fit the layer input "
                                 f"{tuple(x.shape)}")
            m = self.mask.to(x.device, x.dtype).unsqueeze(-1)                # x̄ over non-padding tokens (§8)
            pooled = (x * m).sum(1) / m.sum(1).clamp_min(1.0)
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
        if self.shared is not None:
            self.shared[index] = chosen
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


# ---------------------------------------------------------------------------
# The routed model
# ---------------------------------------------------------------------------


class RoutedModel(nn.Module):
    """An open_clip image tower, or a BERT-family :class:`~esm_core.models.bert.TextEncoder`, whose routed
    layers carry ESM++ experts.

    ``routed(x, true_task=None, mode=None) -> features``; ``x``: images, or packed (N, 2, L) text inputs
    (then the router reads the attention mask ``x[:, 1]``, so x̄ excludes padding).
    ``keys``: one name per routing decision, in execution order — the routed layers of a ViT; for text,
    one per input group (Q, K, V of a layer share one decision, logged under the group's first member, the
    query key: :func:`esm_core.models.bert.routing_groups`). ``routed.visual.model`` of a text model is the
    Hugging Face module with every routed ``nn.Linear`` replaced by a :class:`RoutedLinear` at the same path
    (parameters still ``weight`` / ``bias``, so ``bert.load_own`` puts a task's biases in). ``mode``: None
    (use ``routed.mode``, default "route"), "route", "oracle", "base" or
    "fixed:<task>". ``true_task``: a task name or index for the whole batch, or
    one per sample (list / LongTensor); needed by "oracle", recorded in the log
    otherwise. After every call ``routed.last_log`` is the :class:`DecisionLog`
    of that call (with pooled inputs); inside ``with routed.logging() as log:``
    every call is also appended to ``log``. ``with routed.using(mode=...,
    true_task=...):`` sets the defaults for calls that do not pass them (for
    code such as :func:`esm_core.evaluation.evaluate` that calls ``routed(x)``).
    Attributes kept for saving: ``merged_sd``, ``experts``, ``config``.
    """

    def __init__(self, visual: nn.Module, experts: Experts, keys: list[str], router: _Router,
                 merged_sd: Mapping[str, torch.Tensor] | None = None, config: dict | None = None, family=None):
        super().__init__()
        self.visual = visual
        self.family = family if family is not None else models.family_of_model(visual)
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
        r.shared = {}
        r.mask = self.family.sample_mask(x) if self.family is not None else None
        try:
            out = self.visual(x)
            records = r.records
        finally:
            r.kind, r.fixed, r.forced, r.records, r.shared, r.mask = "route", None, None, None, None, None
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


def _shared_with(visual: nn.Module, merged_sd: Mapping[str, torch.Tensor], fam) -> dict[str, torch.Tensor]:
    """``merged_sd`` with every tensor that ``visual`` holds an exact copy of (same key, shape, dtype, device and
    values) replaced by the module's own: the routed model keeps one copy of the merged weights, not two (a
    ViT-B/32: 335 MB). Only for modules whose weights nothing writes into (not a family with OWN keys: its pool
    loads each task's own values into the module)."""
    own = visual.state_dict()
    out = {}
    for k, v in merged_sd.items():
        name = fam.module_key(k)
        p = own.get(name) if name is not None else None
        same = (p is not None and p.shape == v.shape and p.dtype == v.dtype and p.device == v.device
                and ((p.data_ptr() == v.data_ptr() and p.stride() == v.stride()) or torch.equal(p, v)))
        out[k] = p if same else v
    return out


def build_routed(merged_sd: Mapping[str, torch.Tensor], experts: Experts,
                 build_visual: Callable[[Mapping[str, torch.Tensor]], nn.Module], *,
                 device: str | torch.device = "cpu", config: dict | None = None) -> RoutedModel:
    """The routed model: ``build_visual(merged_sd)`` (e.g. ``pool.build_model``: a module of a registered model
    family) with the linear layer of every routed key of ``experts`` replaced by a :class:`RoutedLinear` (the
    family's ``route`` puts it in place; an open_clip in_proj inside a :class:`RoutedAttention`). Keys that read
    the same input form one routing decision (the family's ``routing_groups``). ``config`` gains ``family`` and
    what the family records to rebuild the module without its pool (``saved_config``: a text encoder's
    ``model_config`` and ``pooling``), so that :func:`esm_core.esmpp.io.load_routed` rebuilds it."""
    visual = build_visual(merged_sd)
    fam = models.family_of_model(visual)
    if fam is None:
        raise ValueError(f"build_visual must return a module of a registered model family "
                         f"({', '.join(models.FAMILIES)}: e.g. an open_clip VisionTransformer), got a "
                         f"{type(visual).__name__}")
    groups = fam.routing_groups(experts.keys)
    if not any(role == OWN for role in fam.roles_of(merged_sd).values()):
        merged_sd = _shared_with(visual, merged_sd, fam)
    router = _Router(len(groups))
    for i, (name, members) in enumerate(groups):
        P = experts.prototypes[name]                 # one prototype set per input group
        for key in members:
            def make(weight, bias, batch_first, key=key, i=i, P=P):
                return RoutedLinear(weight, bias, experts.A[key], experts.B[key], P, router, i,
                                    batch_first=batch_first)
            fam.route(visual, key, make)
    cfg = dict(config or {})
    saved = fam.saved_config(visual)
    if saved:
        cfg.update(saved)
        cfg["family"] = fam.NAME                     # what load_routed needs to rebuild the module
    model = RoutedModel(visual, experts, [name for name, _ in groups], router, merged_sd=merged_sd,
                        config=cfg, family=fam)
    return model.to(resolve_device(device)).eval()
