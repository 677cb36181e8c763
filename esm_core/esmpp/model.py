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

How the open_clip tower is modified (open_clip 3.3): ``ResidualAttentionBlock``
calls ``self.attn(q_x, k_x, v_x, need_weights=False, attn_mask=mask)[0]`` with
``k_x = v_x = q_x`` for a ViT, and ``self.mlp(ln_2(x))`` with ``mlp.c_fc`` an
``nn.Linear``. ``mlp.c_fc`` becomes a :class:`RoutedLinear`;
``nn.MultiheadAttention`` becomes a :class:`RoutedAttention` that computes
``qkv`` with a :class:`RoutedLinear` and then scaled dot-product attention
with the same heads and ``out_proj``. With zero experts both are numerically
equal to the original modules.

Text encoders (methods §8; ``build_visual`` returns a :class:`esm_core.models.bert.TextEncoder`, inputs are
packed (N, 2, L) token ids + attention mask): each routed ``nn.Linear`` of the Hugging Face module (Q, K, V,
``intermediate.dense`` of every layer; DistilBERT's ``q_lin`` / ``k_lin`` / ``v_lin`` / ``ffn.lin1``)
becomes a :class:`RoutedLinear` at the same path, so its parameters keep the names ``weight`` / ``bias``
(``bert.load_own`` puts a task's own biases in). x̄ is the mean over the sample's non-padding tokens: the
routed model hands the batch's attention mask to the router. Q, K and V read the same input: one prototype
set, one decision and one log entry per input group, named by its first routed key (the query key).

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
from typing import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..device import resolve_device
from ..models import bert
from ..models import openclip_vit as vit
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
            pooled = bert.sample_means(x, self.mask)                         # x̄ over non-padding tokens (§8)
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
        r.shared = {}
        r.mask = bert.unpack(x)["attention_mask"].bool() if isinstance(self.visual, bert.TextEncoder) else None
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


def _route_text(encoder: bert.TextEncoder, merged_sd, experts: Experts, config: dict | None) -> RoutedModel:
    """Replace every routed ``nn.Linear`` of a text encoder by a :class:`RoutedLinear` at the same path."""
    hf = encoder.model
    groups = bert.routing_groups(experts.keys)
    router = _Router(len(groups))
    for i, (name, members) in enumerate(groups):
        P = experts.prototypes[name]                 # one prototype set per input group (Q = K = V input)
        for key in members:
            path = bert.module_path(hf, key)
            old = hf.get_submodule(path)
            if not isinstance(old, nn.Linear):
                raise ValueError(f"routed layer {key!r} is a {type(old).__name__}, not an nn.Linear")
            hf.set_submodule(path, RoutedLinear(old.weight, old.bias, experts.A[key], experts.B[key], P,
                                                router, i, batch_first=True))
    cfg = dict(config or {})
    cfg["family"] = bert.NAME                        # what load_routed needs to rebuild the encoder
    cfg["model_config"] = hf.config.to_dict()
    cfg["pooling"] = encoder.pooling
    return RoutedModel(encoder, experts, [name for name, _ in groups], router, merged_sd=merged_sd, config=cfg)


def _shared_with(visual: nn.Module, merged_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``merged_sd`` with every tensor that ``visual`` holds an exact copy of (same key, shape, dtype, device and
    values) replaced by the module's own: the routed model keeps one copy of the merged weights, not two (a
    ViT-B/32: 335 MB). Only for modules whose weights nothing writes into (not a text encoder: a text pool
    loads each task's biases into it)."""
    own = visual.state_dict()
    out = {}
    for k, v in merged_sd.items():
        p = own.get(k[len("visual."):] if k.startswith("visual.") else k)
        same = (p is not None and p.shape == v.shape and p.dtype == v.dtype and p.device == v.device
                and ((p.data_ptr() == v.data_ptr() and p.stride() == v.stride()) or torch.equal(p, v)))
        out[k] = p if same else v
    return out


def build_routed(merged_sd: Mapping[str, torch.Tensor], experts: Experts,
                 build_visual: Callable[[Mapping[str, torch.Tensor]], nn.Module], *,
                 device: str | torch.device = "cpu", config: dict | None = None) -> RoutedModel:
    """The routed model: ``build_visual(merged_sd)`` (e.g. ``pool.build_visual``) with every routed layer of
    ``experts`` replaced. An open_clip VisionTransformer: in_proj → :class:`RoutedAttention`, c_fc / c_proj →
    :class:`RoutedLinear`. A :class:`~esm_core.models.bert.TextEncoder`: Q / K / V / intermediate (any
    encoder linear) → :class:`RoutedLinear`, one decision per input group; ``config`` gains ``family`` and
    ``model_config`` (the Hugging Face config) so that :func:`esm_core.esmpp.io.load_routed` rebuilds it."""
    visual = build_visual(merged_sd)
    if isinstance(visual, bert.TextEncoder):
        return _route_text(visual, merged_sd, experts, config).to(resolve_device(device)).eval()
    try:
        blocks = visual.transformer.resblocks
        batch_first = bool(getattr(visual.transformer, "batch_first", True))
    except AttributeError:
        raise ValueError("build_visual must return an open_clip VisionTransformer (visual.transformer.resblocks)") \
            from None
    merged_sd = _shared_with(visual, merged_sd)
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
