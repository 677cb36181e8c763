"""Activation statistics as data: what the ESM family reads (SPEC §5.1).

:class:`LayerStats` holds the input statistics of one linear layer; a
``Stats`` dict is ``{"tasks": {task: {weight key: LayerStats}}, ...}``.
:mod:`esm_core.probe` fills them from forward hooks; here they can also be
made from plain input matrices (:func:`stats_from_inputs`). The merging layer
never runs a model: statistics come in as data.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch


@dataclass
class LayerStats:
    """Input statistics of one linear layer: ``gram = XᵀX`` (float64), ``n`` rows, ``mean`` of the rows."""
    gram: torch.Tensor
    n: int
    mean: torch.Tensor


class _Accumulator:
    def __init__(self):
        self.gram = None
        self.sum = None
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        if self.gram is None:
            self.gram = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
            self.sum = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
        self.gram += x.mT @ x
        self.sum += x.sum(0)
        self.n += x.shape[0]

    def result(self) -> LayerStats:
        return LayerStats(gram=self.gram.cpu(), n=self.n, mean=(self.sum / self.n).cpu())


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
        st = LayerStats(gram=st["gram"], n=int(st["n"]), mean=st.get("mean"))
    return st
