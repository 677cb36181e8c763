"""The decomposition cache: ESD results and per-key results kept between merges, each with a fingerprint of
its inputs, so a re-merge with another rank, exponent or α skips the decompositions while a changed
checkpoint or new statistics are never silently reused.

* :func:`fingerprint` — a cheap content checksum of a tensor;
* :class:`DecompositionCache` — :class:`EsdEntry` per :class:`EsdKey` (task, key, source of the directions),
  memoised values per :class:`ResultKey` (what, key, task), and the fingerprints of the merge's inputs per
  tensor object (:meth:`DecompositionCache.tensor_fingerprint`);
* :func:`task_deltas` — the fingerprints of a key's task updates and the updates themselves, formed on demand.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch

from .esd import _check_esd_inputs, esd


def fingerprint(x: torch.Tensor) -> tuple:
    """A cheap content checksum of a tensor: shape, dtype, sum, sum of squares and a strided signed sum.

    Equal inputs give equal fingerprints (deterministic reductions on one device);
    any realistic change of the values changes it.
    """
    f = x.detach().reshape(-1)
    if not f.is_floating_point():
        f = f.to(torch.float64)
    if f.numel() == 0:
        return (tuple(x.shape), str(x.dtype))
    step = max(1, f.numel() // 97)
    probe = f[::step].to(torch.float64)
    signs = torch.ones_like(probe)
    signs[1::2] = -1
    w = torch.arange(1, probe.numel() + 1, dtype=torch.float64, device=f.device)
    # float64 accumulation without a float64 copy of the whole tensor
    return (tuple(x.shape), str(x.dtype), float(f.sum(dtype=torch.float64)),
            float(torch.linalg.vector_norm(f, dtype=torch.float64)) ** 2, float((probe * signs * w).sum()))


@dataclass
class EsdEntry:
    """One cached ESD: the first ``P.shape[1]`` eigenvectors, all eigenvalues, ‖ΔW‖F, and its fingerprint.

    ``A`` (optional) holds the coordinates ``P[:, :c]ᵀ ΔW`` (c × d_in, float32) of
    the same columns, so a re-merge needs neither the task matrix nor a product with it.
    """
    fp: tuple                  # fingerprint of (ΔW, G, n) it was computed from
    P: torch.Tensor            # d_out × c (float32)
    lam: torch.Tensor          # d_out (float64), descending
    norm: float                # ‖ΔW‖F
    rows: int                  # n
    complete: bool             # True when P holds all d_out columns
    A: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return int(sum(t.numel() * t.element_size() for t in (self.P, self.lam, self.A) if t is not None))


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    return 0


class EsdKey(NamedTuple):
    """Where an :class:`EsdEntry` is kept: its task, its weight key, and where its directions come from
    (``"esd"``: the ESD of methods §5; ``"svd"``: ESM's ablation, the left singular vectors of ΔWt)."""
    task: str
    key: str
    source: str = "esd"


class ResultKey(NamedTuple):
    """Where a memoised per-key value is kept: what it is (``"tsvm"``, ``"esm"``, ``"esm-U"``, ``"mean"``,
    ``"dfp"``, ``"svd-spectrum"`` …), its weight key and, for a per-task value, its task."""
    what: str
    key: str
    task: str = ""


@dataclass
class DecompositionCache:
    """Decompositions kept between merges (the studio's "live" re-merge).

    ``esd_entries[EsdKey]`` holds an :class:`EsdEntry`; ``results[ResultKey]``
    holds ``(fingerprint, value)`` for per-key results a method memoises (e.g.
    ESM's TSV-M keys and its per-key update before α). ``max_columns`` caps the
    eigenvector columns stored per entry (memory); by default every column up
    to the structural rank ``min(d_in, n)`` (or the rank asked, if larger) is
    kept, or fewer when the caller says how many it can ever use (``keep=``).
    Counters: ``esd_calls`` (decompositions computed), ``esd_hits`` (reused).

    ``tensor_fps`` memoises :func:`fingerprint` per live tensor object (by ``id``, checked against a weak
    reference and the tensor's version counter): a re-merge of unchanged inputs does not read them again.
    """
    max_columns: int | None = None
    esd_entries: dict[EsdKey, EsdEntry] = field(default_factory=dict)
    results: dict[ResultKey, tuple] = field(default_factory=dict)
    esd_calls: int = 0
    esd_hits: int = 0
    tensor_fps: dict[int, tuple] = field(default_factory=dict, repr=False)

    def snapshot(self) -> "DecompositionCache":
        """A copy whose later additions leave this cache as it is (entries are shared: they are never mutated;
        so is the fingerprint memo, whose entries depend on the tensors only)."""
        return DecompositionCache(self.max_columns, dict(self.esd_entries), dict(self.results),
                                  self.esd_calls, self.esd_hits, self.tensor_fps)

    def clear(self) -> None:
        self.esd_entries.clear()
        self.results.clear()

    @property
    def nbytes(self) -> int:
        """Bytes of tensors held (ESD entries and memoised results)."""
        return (sum(e.nbytes for e in self.esd_entries.values())
                + sum(_nbytes(v) for _, v in self.results.values()))

    def lookup(self, task: str, key: str, fp: tuple, k: int = 0, source: str = "esd") -> EsdEntry | None:
        """The stored entry of ``(task, key, source)`` if its fingerprint is ``fp`` and it has ≥ ``k`` columns (a
        hit), else None."""
        e = self.esd_entries.get(EsdKey(task, key, source))
        if e is not None and e.fp == fp and (e.complete or e.P.shape[1] >= k):
            self.esd_hits += 1
            return e
        return None

    def store(self, task: str, key: str, entry: EsdEntry, source: str = "esd") -> EsdEntry:
        """Keep ``entry`` (a decomposition just computed: counted in ``esd_calls``) under ``(task, key, source)``."""
        self.esd_calls += 1
        self.esd_entries[EsdKey(task, key, source)] = entry
        return entry

    def esd(self, task: str, key: str, delta: torch.Tensor, gram: torch.Tensor | None, n: int, k: int = 0,
            gram_fp: tuple | None = None, delta_fp: tuple | None = None, *, factor: torch.Tensor | None = None,
            keep: int | None = None, coords: bool = False, wtw: torch.Tensor | None = None,
            shift_gram: torch.Tensor | None = None) -> EsdEntry:
        """The ESD of ``delta`` (task ``task``, key ``key``) with at least ``k`` eigenvector columns.

        Reused when the fingerprints of ``delta`` and ``gram`` and ``n`` match the
        stored entry and it has enough columns; computed (and stored) otherwise.
        ``factor`` (``L Lᵀ = G``) may stand in for ``gram`` (then give ``gram_fp``);
        ``keep`` caps the columns stored (never below ``k``; fewer than ``keep`` where only the exact route
        could give the rest: :func:`~esm_core.merging.esd.esd`'s ``need``); ``coords`` also
        stores the coordinates ``A = P̂ᵀ ΔW``; ``wtw`` / ``shift_gram`` as in :func:`~esm_core.merging.esd.esd`.
        """
        if gram is None and gram_fp is None:
            raise ValueError("give gram_fp with a factor instead of the Gram matrix")
        fp = (delta_fp if delta_fp is not None else fingerprint(delta),
              gram_fp if gram_fp is not None else fingerprint(gram), int(n))
        d_out, d_in = delta.shape
        k = max(0, min(int(k), d_out))
        e = self.lookup(task, key, fp, k)
        if e is not None and (e.A is not None or not coords):
            return e
        c = min(d_in, int(n))
        if keep is not None:
            c = min(c, int(keep))
        if self.max_columns is not None:
            c = min(c, int(self.max_columns))
        c = min(d_out, max(k, c))
        _check_esd_inputs(delta, gram, n, factor)
        r = esd(delta, gram, n, columns=c, factor=factor, coords=coords, wtw=wtw, shift_gram=shift_gram,
                need=k)                  # the columns beyond k are kept where the fast route gives them
        return self.store(task, key, EsdEntry(
            fp=fp, P=r.P.to(torch.float32), lam=r.lam, rows=int(n), complete=(r.P.shape[1] == d_out),
            norm=float(torch.linalg.vector_norm(delta, dtype=torch.float64)),
            A=r.A.to(torch.float32) if coords else None))

    def get_result(self, tag: ResultKey, fp: Any):
        """A memoised value stored under ``tag`` if its fingerprint equals ``fp``, else None."""
        hit = self.results.get(_result_key(tag))
        if hit is not None and hit[0] == fp:
            return hit[1]
        return None

    def put_result(self, tag: ResultKey, fp: Any, value) -> None:
        self.results[_result_key(tag)] = (fp, value)

    def tensor_fingerprint(self, t: torch.Tensor) -> tuple:
        """:func:`fingerprint` of ``t``, memoised while the same tensor object lives at the same version.

        In-place changes bump the tensor's version counter, so they are seen; a new
        tensor (e.g. each read of a lazy checkpoint) is fingerprinted afresh.
        """
        try:
            ver = t._version
        except (RuntimeError, AttributeError):          # inference tensors have no version counter
            return fingerprint(t)
        key, memo = id(t), self.tensor_fps
        hit = memo.get(key)
        if hit is not None and hit[0]() is t and hit[1] == ver:
            return hit[2]
        fp = fingerprint(t)
        try:
            ref = weakref.ref(t, lambda _r, key=key: memo.pop(key, None))
        except TypeError:
            return fp
        memo[key] = (ref, ver, fp)
        return fp

    def source_fingerprint(self, sd, key: str) -> tuple:
        """Fingerprint of ``sd[key]``: a lazy checkpoint's file identity (nothing read), else
        :meth:`tensor_fingerprint`."""
        fp = getattr(sd, "fingerprint", None)
        if callable(fp):
            return fp(key)
        return self.tensor_fingerprint(sd[key])


def _result_key(tag) -> ResultKey:
    if not isinstance(tag, ResultKey):
        raise TypeError(f"cache results are keyed by ResultKey, got {type(tag).__name__} {tag!r}")
    return tag


def task_deltas(ctx, cache: DecompositionCache, key: str) -> tuple[tuple, Callable[[], torch.Tensor]]:
    """``(fingerprints of the T task updates of key, deltas())``: ``deltas()`` forms the updates (T × shape,
    float32 on the merge device) once, on first call. The fingerprints are memoised in ``cache`` under the
    sources' identities (a lazy checkpoint's file, a tensor object at its version), so a re-merge of unchanged
    inputs finds them without forming the updates; methods that cache per-key results key them by these."""
    src = (tuple(cache.source_fingerprint(sd, key) for sd in ctx.tasks.values()),
           cache.source_fingerprint(ctx.base, key), str(ctx.device))
    dfp = cache.get_result(ResultKey("dfp", key), src)
    D = [None]
    if dfp is None:
        D[0] = ctx.deltas(key)
        dfp = tuple(fingerprint(D[0][t]) for t in range(D[0].shape[0]))
        cache.put_result(ResultKey("dfp", key), src, dfp)

    def deltas() -> torch.Tensor:
        if D[0] is None:
            D[0] = ctx.deltas(key)
        return D[0]
    return dfp, deltas
