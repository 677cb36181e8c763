"""Activation probe: streaming input statistics of the ESD layers (methods §5.1, §7.5).

Forward hooks on an open_clip ``VisionTransformer`` record, for every block and
every requested layer type, the *input* of that linear layer:

* ``attn.in_proj_weight`` — the query input of ``block.attn`` (the ``ln_1``
  output; open_clip 3.3 calls ``self.attn(q_x, k_x, v_x, ...)`` positionally,
  and in a ViT tower ``k_x = v_x = q_x``),
* ``mlp.c_fc.weight`` — the input of ``block.mlp.c_fc`` (the ``ln_2`` output),
* ``mlp.c_proj.weight`` — the input of ``block.mlp.c_proj`` (the activation
  output, 4·width).

Tokens are flattened (rows = batch · tokens, whatever the layout). Per layer
the cheaper of two exact forms is kept: the rows themselves (float32, or
float64 when the inputs are) while they take no more memory than the Gram
matrix, i.e. ``n ≤ 2 · d_in`` for float32 rows, and from there on float64
running sums ``G += XᵀX`` (memory does not grow with the number of samples).
``n`` and the float64 sum of the rows are always kept. For a ViT-B/32
``mlp.c_proj`` input (d_in 3072) probed on 32 images (1,600 rows) that is 20 MB
of rows instead of a 75 MB Gram matrix.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from .device import resolve_device
from .merging.stats import (LayerStats, _Accumulator, stats_from_inputs, stats_nbytes,  # noqa: F401 (re-exported)
                            task_layer_stats)
from .models import bert
from .models import openclip_vit as vit


def _batches(images, batch_size: int) -> Iterable[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise ValueError(f"images must be a N×C×H×W tensor, got shape {tuple(images.shape)}")
        for i in range(0, images.shape[0], batch_size):
            yield images[i:i + batch_size]
    else:
        yield from images


@torch.no_grad()
def probe(visual: torch.nn.Module, images, *, key_prefix: str = "visual.", layer_types=vit.ESD_TYPES,
          batch_size: int = 64, device: str | torch.device = "cpu") -> dict[str, LayerStats]:
    """Input statistics of the ESD layers of ``visual`` on ``images``.

    ``images``: an N×3×H×W tensor (already normalised) or an iterable of such
    batches. Returns ``{weight key: LayerStats}``, e.g. key
    ``"visual.transformer.resblocks.0.mlp.c_fc.weight"``. The module runs in
    eval mode on ``device`` and is put back on its device and mode afterwards;
    the hooks are removed even when the forward pass fails.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(visual, bert.TextEncoder):
        return probe_text(visual, images, batch_size=batch_size, device=device)
    dev = resolve_device(device)
    points = vit.hook_points(visual, key_prefix, tuple(layer_types))
    acc = {key: _Accumulator() for key, _, _ in points}
    handles = []

    def query_hook(key):
        def fn(module, args, kwargs):
            q = args[0] if args else kwargs["query"]
            acc[key].add(q)
        return fn

    def input_hook(key):
        def fn(module, args):
            acc[key].add(args[0])
        return fn

    p0 = next(visual.parameters(), None)
    old_device = p0.device if p0 is not None else dev
    was_training = visual.training
    try:
        for key, mod, how in points:
            if how == "query":
                handles.append(mod.register_forward_pre_hook(query_hook(key), with_kwargs=True))
            else:
                handles.append(mod.register_forward_pre_hook(input_hook(key)))
        visual.to(dev).eval()
        for x in _batches(images, batch_size):
            visual(x.to(dev, next(visual.parameters()).dtype))
    finally:
        for h in handles:
            h.remove()
        visual.train(was_training)
        visual.to(old_device)
    empty = [k for k, a in acc.items() if a.n == 0]
    if empty:
        raise ValueError(f"no activations were recorded for {empty[:3]} (no images given?)")
    return {k: a.result() for k, a in acc.items()}


@torch.no_grad()
def probe_text(encoder: "bert.TextEncoder", inputs: torch.Tensor, *, keys=None, batch_size: int = 64,
               device: str | torch.device = "cpu") -> dict[str, LayerStats]:
    """Input statistics of a text encoder's ESD layers (§8: all six linear types) on packed (N, 2, L)
    inputs, padding tokens excluded. Q, K and V of a layer read the same input: they share one
    :class:`LayerStats` object (recorded once)."""
    if not isinstance(inputs, torch.Tensor):
        raise ValueError("text inputs must be one packed (N, 2, L) tensor")
    bert.unpack(inputs)                                       # checks the layout
    model = encoder.model
    keys = list(keys) if keys is not None else bert.esd_keys([k for k, _ in model.named_parameters()])
    groups = {k: bert.input_group(k) for k in keys}
    heads = list(dict.fromkeys(groups.values()))              # one recorded key per input group
    acc = {g: _Accumulator() for g in heads}
    dev = resolve_device(device)
    p0 = next(model.parameters())
    old_device, was_training = p0.device, model.training
    try:
        model.to(dev).eval()
        for s in range(0, inputs.shape[0], batch_size):
            batch = bert.unpack(inputs[s:s + batch_size].to(dev))
            for g, x in bert.layer_inputs(model, batch, heads).items():
                acc[g].add(x)
    finally:
        model.train(was_training)
        model.to(old_device)
    empty = [g for g, a in acc.items() if a.n == 0]
    if empty:
        raise ValueError(f"no activations were recorded for {empty[:3]} (no sentences given?)")
    res = {g: a.result() for g, a in acc.items()}
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
    # A text encoder is built once and each task's checkpoint loaded into it: building one initialises every weight
    # at random first (sampled with py-spy: 14 % of the MiniLM text pool's probe went to building the 8 encoders).
    text = None
    for i, task in enumerate(names):
        if progress is not None:
            progress(i / max(len(names), 1), f"probing {task}")
        x, ids = pool.proxy(task, n, seed)
        if text is not None:
            text.load_state_dict(pool.tasks[task])                    # strict: every key of the task's own
            visual = text
        else:
            visual = pool.build_visual(pool.tasks[task], device=dev)
            if isinstance(visual, bert.TextEncoder):
                text = visual
        out["tasks"][task] = probe(visual, x, device=dev)
        out["proxy_ids"][task] = list(ids)
        del visual
    del text
    if progress is not None:
        progress(1.0, "probing done")
    return out
