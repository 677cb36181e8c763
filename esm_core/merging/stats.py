"""Activation statistics as data: what the ESM family reads (methods §5.1).

:class:`LayerStats` holds the input statistics of one linear layer — the rows
``X`` while they take less memory than the float64 Gram matrix ``XᵀX``, else
the Gram matrix; a ``Stats`` dict is ``{"tasks": {task: {weight key:
LayerStats}}, ...}``. :mod:`esm_core.probe` fills them from forward hooks;
here they can also be made from plain input matrices (:func:`stats_from_inputs`).
The merging layer never runs a model: statistics come in as data.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from .cache import fingerprint


class LayerStats:
    """Input statistics of one linear layer: ``gram = XᵀX`` (float64), ``n`` rows, ``mean`` of the rows.

    Holds either the Gram matrix or the rows ``X`` (``rows``, n × d_in); ``gram``
    is then computed on access (float64, not stored). :meth:`factor` gives an
    ``L`` with ``L Lᵀ = G`` without forming G when that is cheaper (the rows,
    when there are no more of them than inputs), for :func:`esm_core.merging.esd.esd`.

    :meth:`spill` moves the Gram matrix or rows to a file and releases them: every later access reads them
    back (and does not keep them), the fingerprint, ``n`` and ``mean`` stay in memory. The app spills a pool's
    statistics once its decompositions are cached, when few accesses remain.
    """
    __slots__ = ("_gram", "_rows", "n", "mean", "_fp", "_file")

    def __init__(self, gram: torch.Tensor | None = None, n: int = 0, mean: torch.Tensor | None = None,
                 rows: torch.Tensor | None = None):
        if gram is None and rows is None:
            raise ValueError("LayerStats needs the Gram matrix or the rows")
        self._gram = gram
        self._rows = rows
        self.n = int(n)
        self.mean = mean
        self._fp = None
        self._file = None          # (path, "gram" | "rows", shape) once spilled

    def _read(self, kind: str) -> torch.Tensor | None:
        if self._file is None or self._file[1] != kind:
            return None
        return torch.from_numpy(np.load(self._file[0], allow_pickle=False))

    @property
    def rows(self) -> torch.Tensor | None:
        return self._rows if self._file is None else self._read("rows")

    @rows.setter
    def rows(self, value: torch.Tensor | None) -> None:
        self._rows, self._file, self._fp = value, None, None

    @property
    def gram(self) -> torch.Tensor:
        g = self._gram if self._file is None else self._read("gram")
        if g is not None:
            return g
        x = self.rows.to(torch.float64)
        return x.mT @ x

    @gram.setter
    def gram(self, value: torch.Tensor) -> None:
        self._gram, self._rows, self._file, self._fp = value, None, None, None

    @property
    def d_in(self) -> int:
        if self._file is not None:
            return int(self._file[2][-1])
        return int((self._gram if self._gram is not None else self._rows).shape[-1])

    def factor(self) -> torch.Tensor | None:
        """``Xᵀ`` (d_in × n) when rows are held and ``n ≤ d_in`` (a cheaper factor of G than its Cholesky), else None."""
        if self._file is not None:
            kind, shape = self._file[1], self._file[2]
            if kind == "rows" and shape[0] <= shape[1]:
                return self._read("rows").mT
            return None
        if self._rows is not None and self._rows.shape[0] <= self._rows.shape[1]:
            return self._rows.mT
        return None

    def fingerprint(self) -> tuple:
        """Content checksum of the statistics (memoised: statistics are not modified in place)."""
        if self._fp is None:                # a held Gram: exactly fingerprint(gram), as callers without this method use
            self._fp = fingerprint(self._gram) if self._gram is not None else ("rows", fingerprint(self.rows))
        return self._fp

    @property
    def spilled(self) -> bool:
        return self._file is not None

    def spill(self, path: str | os.PathLike) -> int:
        """Write the Gram matrix or rows to ``path`` (``.npy``, atomically) and release them; returns the bytes
        released (0 when already spilled). Later accesses read the file back."""
        if self._file is not None:
            return 0
        kind, t = ("gram", self._gram) if self._gram is not None else ("rows", self._rows)
        self.fingerprint()                  # memoised before the data leaves memory
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                np.save(f, t.detach().cpu().numpy(), allow_pickle=False)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        freed = t.numel() * t.element_size()
        self._file = (str(path), kind, tuple(t.shape))
        self._gram = self._rows = None
        return int(freed)

    @property
    def nbytes(self) -> int:
        """Bytes held in memory (Gram or rows unless spilled, and the mean)."""
        b = sum(t.numel() * t.element_size() for t in (self._gram, self._rows, self.mean) if t is not None)
        return int(b)

    def __repr__(self) -> str:
        if self._file is not None:
            return f"LayerStats({self._file[1]} {self._file[2]} in {self._file[0]}, n={self.n})"
        form = f"gram {tuple(self._gram.shape)}" if self._gram is not None else f"rows {tuple(self._rows.shape)}"
        return f"LayerStats({form}, n={self.n})"


def spill_stats(stats, folder: str | os.PathLike) -> int:
    """:meth:`LayerStats.spill` every layer statistic of a ``Stats`` dict into ``folder`` (created); returns the
    bytes released."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    per_task = stats["tasks"] if isinstance(stats, Mapping) and "tasks" in stats else stats
    freed = 0
    for i, layers in enumerate(per_task.values()):
        for j, st in enumerate(layers.values()):
            if isinstance(st, LayerStats):
                freed += st.spill(folder / f"t{i}-l{j}.npy")
    return freed


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
    """Bytes held by a ``Stats`` dict's layer statistics (Gram matrices or rows, means); an entry shared by
    several keys or tasks (a text layer's Q, K and V; the benchmark's one set of random rows) counts once."""
    per_task = stats["tasks"] if isinstance(stats, Mapping) and "tasks" in stats else stats
    total, seen = 0, set()
    for layers in per_task.values():
        for st in layers.values():
            if id(st) in seen:
                continue
            seen.add(id(st))
            if isinstance(st, LayerStats):
                total += st.nbytes
            else:
                total += sum(t.numel() * t.element_size() for t in (getattr(st, "gram", None),
                             getattr(st, "mean", None)) if isinstance(t, torch.Tensor))
    return total
