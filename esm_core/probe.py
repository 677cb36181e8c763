"""Activation probe: streaming input statistics of the ESD layers (SPEC §5.1, §7.5).

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

from typing import Callable, Iterable, Mapping

import torch

from . import vit


class LayerStats:
    """Input statistics of one linear layer: ``gram = XᵀX`` (float64), ``n`` rows, ``mean`` of the rows.

    Holds either the Gram matrix or the rows ``X`` (``rows``, n × d_in); ``gram``
    is then computed on access (float64, not stored). :meth:`factor` gives an
    ``L`` with ``L Lᵀ = G`` without forming G when that is cheaper (the rows,
    when there are no more of them than inputs), for :func:`esm_core.decompose.esd`.
    """
    __slots__ = ("_gram", "rows", "n", "mean", "_fp")

    def __init__(self, gram: torch.Tensor | None = None, n: int = 0, mean: torch.Tensor | None = None,
                 rows: torch.Tensor | None = None):
        if gram is None and rows is None:
            raise ValueError("LayerStats needs the Gram matrix or the rows")
        self._gram = gram
        self.rows = rows
        self.n = int(n)
        self.mean = mean
        self._fp = None

    @property
    def gram(self) -> torch.Tensor:
        if self._gram is not None:
            return self._gram
        x = self.rows.to(torch.float64)
        return x.mT @ x

    @gram.setter
    def gram(self, value: torch.Tensor) -> None:
        self._gram, self.rows, self._fp = value, None, None

    @property
    def d_in(self) -> int:
        return int((self._gram if self._gram is not None else self.rows).shape[-1])

    def factor(self) -> torch.Tensor | None:
        """``Xᵀ`` (d_in × n) when rows are held and ``n ≤ d_in`` (a cheaper factor of G than its Cholesky), else None."""
        if self.rows is not None and self.rows.shape[0] <= self.rows.shape[1]:
            return self.rows.mT
        return None

    def fingerprint(self) -> tuple:
        """Content checksum of the statistics (memoised: statistics are not modified in place)."""
        if self._fp is None:                # a held Gram: exactly fingerprint(gram), as callers without this method use
            from .decompose import fingerprint
            self._fp = fingerprint(self._gram) if self._gram is not None else ("rows", fingerprint(self.rows))
        return self._fp

    @property
    def nbytes(self) -> int:
        """Bytes held (Gram or rows, and the mean)."""
        b = sum(t.numel() * t.element_size() for t in (self._gram, self.rows, self.mean) if t is not None)
        return int(b)

    def __repr__(self) -> str:
        form = f"gram {tuple(self._gram.shape)}" if self._gram is not None else f"rows {tuple(self.rows.shape)}"
        return f"LayerStats({form}, n={self.n})"


class _Accumulator:
    def __init__(self):
        self.gram = None
        self.chunks: list[torch.Tensor] = []
        self.sum = None
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        keep = torch.float64 if x.dtype == torch.float64 else torch.float32
        x = x.to(keep)
        d = x.shape[1]
        if self.sum is None:
            self.sum = torch.zeros(d, dtype=torch.float64, device=x.device)
        self.sum += x.sum(0, dtype=torch.float64)
        self.n += x.shape[0]
        if self.gram is None:
            self.chunks.append(x.clone())
            # rows while they take no more memory than the float64 Gram matrix
            if self.n * x.element_size() > d * 8:
                self.gram = torch.zeros(d, d, dtype=torch.float64, device=x.device)
                for c in self.chunks:
                    c64 = c.to(torch.float64)
                    self.gram += c64.mT @ c64
                self.chunks = []
        else:
            x64 = x.to(torch.float64)
            self.gram += x64.mT @ x64

    def result(self) -> LayerStats:
        mean = (self.sum / self.n).cpu()
        if self.gram is not None:
            return LayerStats(gram=self.gram.cpu(), n=self.n, mean=mean)
        return LayerStats(rows=torch.cat(self.chunks).cpu(), n=self.n, mean=mean)


def _hook_points(visual: torch.nn.Module, key_prefix: str, layer_types) -> list[tuple[str, torch.nn.Module, str]]:
    """``[(weight key, module to hook, how)]`` for every block and layer type."""
    try:
        blocks = visual.transformer.resblocks
    except AttributeError:
        raise ValueError("probe expects an open_clip VisionTransformer (visual.transformer.resblocks)") from None
    known = (vit.IN_PROJ, vit.C_FC, vit.C_PROJ)
    bad = [t for t in layer_types if t not in known]
    if bad:
        raise ValueError(f"probe cannot record the input of layer type(s) {bad}; supported: {list(known)}")
    points = []
    for i, blk in enumerate(blocks):
        for t in layer_types:
            key = f"{key_prefix}transformer.resblocks.{i}.{t}"
            if t == vit.IN_PROJ:
                points.append((key, blk.attn, "query"))
            elif t == vit.C_FC:
                points.append((key, blk.mlp.c_fc, "input"))
            else:
                points.append((key, blk.mlp.c_proj, "input"))
    return points


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
    from .merge import resolve_device   # (merge → methods → esm → probe: import here, not at the top)
    dev = resolve_device(device)
    points = _hook_points(visual, key_prefix, tuple(layer_types))
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


def probe_pool(pool, n: int = 32, seed: int = 0, *, device: str | torch.device = "auto",
               progress: Callable[[float, str], None] | None = None) -> dict:
    """Probe every task of a TaskPool inside its own fine-tuned model, on its own proxy samples.

    Returns the ``Stats`` dict ``{"tasks": {task: {key: LayerStats}}, "proxy_ids":
    {task: ids}, "n": n, "seed": seed}``.
    """
    if n < 1:
        raise ValueError(f"the number of proxy samples must be >= 1, got {n}")
    from .merge import resolve_device
    dev = resolve_device(device)
    names = list(pool.task_names)
    out = {"tasks": {}, "proxy_ids": {}, "n": int(n), "seed": int(seed)}
    for i, task in enumerate(names):
        if progress is not None:
            progress(i / max(len(names), 1), f"probing {task}")
        x, ids = pool.proxy(task, n, seed)
        visual = pool.build_visual(pool.tasks[task], device=dev)
        out["tasks"][task] = probe(visual, x, device=dev)
        out["proxy_ids"][task] = list(ids)
        del visual
    if progress is not None:
        progress(1.0, "probing done")
    return out


# ---------------------------------------------------------------------------
# Reading statistics (used by the ESM family and the analysis)
# ---------------------------------------------------------------------------


def stats_from_inputs(inputs: Mapping[str, Mapping[str, torch.Tensor]]) -> dict:
    """``{task: {key: X}}`` (X: rows × d_in, or any shape ending in d_in) → a ``Stats`` dict."""
    tasks = {}
    for task, layers in inputs.items():
        tasks[task] = {}
        for key, x in layers.items():
            if not isinstance(x, torch.Tensor) or x.ndim < 2:
                raise ValueError(f"inputs[{task!r}][{key!r}] must be a tensor of rows × d_in")
            a = _Accumulator()
            a.add(x)
            tasks[task][key] = a.result()
    return {"tasks": tasks}


def task_layer_stats(stats, task: str, key: str) -> LayerStats:
    """The :class:`LayerStats` of ``key`` for ``task`` from a ``Stats`` dict (or ``{task: {key: LayerStats}}``)."""
    per_task = stats["tasks"] if isinstance(stats, Mapping) and "tasks" in stats else stats
    if task not in per_task:
        raise ValueError(f"activation statistics have no task {task!r} (they have {sorted(per_task)})")
    layers = per_task[task]
    if key not in layers:
        raise ValueError(f"activation statistics of task {task!r} have no layer {key!r}")
    st = layers[key]
    if isinstance(st, Mapping):
        st = LayerStats(gram=st.get("gram"), n=int(st["n"]), mean=st.get("mean"), rows=st.get("rows"))
    return st


def stats_nbytes(stats) -> int:
    """Bytes held by a ``Stats`` dict's layer statistics (Gram matrices or rows, means)."""
    per_task = stats["tasks"] if isinstance(stats, Mapping) and "tasks" in stats else stats
    total = 0
    for layers in per_task.values():
        for st in layers.values():
            if isinstance(st, LayerStats):
                total += st.nbytes
            else:
                total += sum(t.numel() * t.element_size() for t in (getattr(st, "gram", None),
                             getattr(st, "mean", None)) if isinstance(t, torch.Tensor))
    return total
