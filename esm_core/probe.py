"""Activation probe: streaming input statistics of the ESD layers (methods §5.1, §7.5).

Forward hooks record, for every requested layer of a built model, the *input*
of that linear layer; where each input is read is the model family's business
(``record_points`` of the family protocol, :mod:`esm_core.models.protocol`):
e.g. for an open_clip tower the query input of a block's attention (in_proj),
and the inputs of its MLP linears. Layers that read the same input (a text
encoder's Q, K and V) are recorded once and share one :class:`LayerStats`.

Tokens are flattened (rows = batch · tokens, whatever the layout); where the
family marks padding (``sample_mask``), padding rows are left out (methods §8).
Per layer the cheaper of two exact forms is kept: the rows themselves (float32,
or float64 when the inputs are) while they take no more memory than the Gram
matrix, i.e. ``n ≤ 2 · d_in`` for float32 rows, and from there on float64
running sums ``G += XᵀX`` (memory does not grow with the number of samples).
``n`` and the float64 sum of the rows are always kept. For a ViT-B/32
``mlp.c_proj`` input (d_in 3072) probed on 32 images (1,600 rows) that is 20 MB
of rows instead of a 75 MB Gram matrix.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from . import models
from .device import resolve_device
from .merging.stats import (LayerStats, _Accumulator, stats_from_inputs, stats_nbytes,  # noqa: F401 (re-exported)
                            task_layer_stats)


def _batches(fam, inputs, batch_size: int) -> Iterable[torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        fam.sample_mask(inputs[:1])                           # the family checks its inputs' layout
        for i in range(0, inputs.shape[0], batch_size):
            yield inputs[i:i + batch_size]
    elif fam.MODALITY == "text":
        raise ValueError("text inputs must be one packed (N, 2, L) tensor")
    else:
        yield from inputs


def _rows(x: torch.Tensor, mask: torch.Tensor | None, batch_first: bool) -> torch.Tensor:
    """A recorded layer input as rows: every token, or (``mask``) the tokens that count."""
    if mask is None:
        return x
    xb = x if batch_first else x.transpose(0, 1)
    if xb.shape[:2] != mask.shape:
        raise ValueError(f"input {tuple(xb.shape)} does not fit the token mask {tuple(mask.shape)}")
    return xb[mask.to(xb.device)]


@torch.no_grad()
def probe(model: torch.nn.Module, inputs, *, layer_types=None, keys=None, batch_size: int = 64,
          device: str | torch.device = "cpu") -> dict[str, LayerStats]:
    """Input statistics of the ESD layers of ``model`` (built by a model family's ``build_model``) on
    ``inputs``.

    ``inputs``: the model's inputs as one tensor (images N×3×H×W, already normalised; packed text N×2×L) or,
    for images, an iterable of such batches. ``keys``: the layers (pool keys); default: those of
    ``layer_types`` (default: the family's ESD types). Returns ``{weight key: LayerStats}``, e.g. key
    ``"visual.transformer.resblocks.0.mlp.c_fc.weight"``. The module runs in eval mode on ``device`` and is
    put back on its device and mode afterwards; the hooks are removed even when the forward pass fails.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    fam = models.family_of_model(model)
    if fam is None:
        raise ValueError(f"probe expects a model built by a model family ({', '.join(models.FAMILIES)}: e.g. an "
                         f"open_clip VisionTransformer or a text encoder), got a {type(model).__name__}")
    if keys is None:
        types = tuple(fam.ESD_TYPES if layer_types is None else layer_types)
        bad = [t for t in types if t not in fam.PROBED_TYPES]
        if bad:
            raise ValueError(f"probe cannot record the input of layer type(s) {bad}; supported: "
                             f"{list(fam.PROBED_TYPES)}")
        keys = fam.esd_keys(fam.model_keys(model), types)
    keys = list(keys)
    groups = {k: fam.input_group(k) for k in keys}
    points = fam.record_points(model, keys)                   # one per input group
    acc = {pt.key: _Accumulator() for pt in points}
    state = {"mask": None}
    dev = resolve_device(device)
    handles = []

    def hook(pt):
        def fn(module, args, kwargs):
            x = args[0] if args or pt.how != "query" else kwargs["query"]
            acc[pt.key].add(_rows(x, state["mask"], pt.batch_first))
        return fn

    p0 = next(model.parameters(), None)
    old_device = p0.device if p0 is not None else dev
    was_training = model.training
    try:
        for pt in points:
            handles.append(pt.module.register_forward_pre_hook(hook(pt), with_kwargs=True))
        model.to(dev).eval()
        dtype = next(model.parameters()).dtype
        for x in _batches(fam, inputs, batch_size):
            x = x.to(dev, dtype) if x.is_floating_point() else x.to(dev)
            state["mask"] = fam.sample_mask(x)
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        model.to(old_device)
    empty = [k for k, a in acc.items() if a.n == 0]
    if empty:
        raise ValueError(f"no activations were recorded for {empty[:3]} (no inputs given?)")
    res = {k: a.result() for k, a in acc.items()}
    return {k: res[g] for k, g in groups.items()}


def probe_pool(pool, n: int = 32, seed: int = 0, *, device: str | torch.device = "auto",
               progress: Callable[[float, str], None] | None = None) -> dict:
    """Probe every task of a TaskPool inside its own fine-tuned model, on its own proxy samples.

    Returns the ``Stats`` dict ``{"tasks": {task: {key: LayerStats}}, "proxy_ids":
    {task: ids}, "n": n, "seed": seed}``.
    """
    if n < 1:
        raise ValueError(f"the number of proxy samples must be >= 1, got {n}")
    dev = resolve_device(device)
    names = list(pool.task_names)
    out = {"tasks": {}, "proxy_ids": {}, "n": int(n), "seed": int(seed)}
    # The model is built once and each further task's checkpoint loaded into it (the family's load_state): building
    # a text encoder initialises every weight at random first (sampled with py-spy: 14 % of the MiniLM text pool's
    # probe went to building the 8 encoders).
    model = fam = None
    for i, task in enumerate(names):
        if progress is not None:
            progress(i / max(len(names), 1), f"probing {task}")
        x, ids = pool.proxy(task, n, seed)
        if model is not None:
            fam.load_state(model, pool.tasks[task])                   # strict: every key of the task's own
        else:
            model = pool.build_model(pool.tasks[task], device=dev)
            fam = models.family_of_model(model)
        out["tasks"][task] = probe(model, x, device=dev)
        out["proxy_ids"][task] = list(ids)
    del model
    if progress is not None:
        progress(1.0, "probing done")
    return out
