"""Decompositions shared by the methods: polar factor, ESD (SPEC §5) and their cache.

* :func:`polar` — the orthogonal polar factor ``P Qᵀ`` of ``x = P Σ Qᵀ``,
  computed from the eigen-decomposition of the small Gram matrix (float64),
  with the SVD route (:func:`polar_svd`) as fall-back when ``x`` is
  ill-conditioned or rank-deficient (there the factor is not unique and the
  SVD's choice is the reference's).
* :func:`esd` — Essential Subspace Decomposition of one task matrix given the
  Gram matrix ``G = XᵀX`` of the layer's inputs: the eigenvectors of
  ``ΔW G ΔWᵀ`` (= the principal directions of the output shift ``ΔO = XΔWᵀ``,
  no mean-centring) and the eigenvalues ``λ = s²/(n − 1)``.
* :class:`DecompositionCache` — keeps ESD results (and any per-key result a
  method wants to memoise) between merges, each entry with a fingerprint of
  the inputs it came from, so a re-merge with another rank, exponent or α
  skips the decompositions while a changed checkpoint or new statistics are
  never silently reused.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable

import torch

# Singular-value ratio below which the Gram route of the polar factor is not trusted: its
# error grows like eps64 · cond², so 1e-5 keeps it below ~1e-6 (in the weakest directions
# only). ESM's concatenated factors often have cond ~1e4–1e5; the SVD fall-back of a
# 3072 × 3072 matrix costs minutes on a laptop CPU.
POLAR_RCOND = 1e-5


# ---------------------------------------------------------------------------
# Polar factor
# ---------------------------------------------------------------------------


def polar_svd(x: torch.Tensor) -> torch.Tensor:
    """Orthogonal polar factor of ``x`` by SVD: ``x = P Σ Qᵀ → P Qᵀ`` (reference route)."""
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh


def polar_and_singular_values(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(polar factor of x, singular values of x)``; singular values descending, ``min(m, n)`` of them.

    Route: for ``m ≥ n``, ``xᵀx = Q diag(μ) Qᵀ`` (n × n, float64) and
    ``polar(x) = x Q diag(μ^-½) Qᵀ``, ``σ = sqrt(μ)``; for ``m < n`` the same on
    ``xᵀ``. Falls back to the SVD (float64) when ``σ_min / σ_max`` is below
    :data:`POLAR_RCOND` or anything is not finite. Results in ``x``'s dtype.
    """
    if x.ndim != 2:
        raise ValueError(f"polar factor needs a 2-D matrix, got shape {tuple(x.shape)}")
    m, n = x.shape
    if m < n:
        f, s = polar_and_singular_values(x.mT)
        return f.mT, s
    if n == 0:
        return x.clone(), x.new_zeros(0)
    x64 = x.to(torch.float64)
    mu, q = torch.linalg.eigh(x64.mT @ x64)            # xᵀx = Q diag(μ) Qᵀ, μ ascending
    top = mu[-1]
    if bool(torch.isfinite(mu).all()) and top > 0 and mu[0] > (POLAR_RCOND ** 2) * top:
        s = mu.sqrt()
        f = (x64 @ (q / s)) @ q.mT                     # x (xᵀx)^-½
        return f.to(x.dtype), s.flip(0).to(x.dtype)
    u, s, vh = torch.linalg.svd(x64, full_matrices=False)
    return (u @ vh).to(x.dtype), s.to(x.dtype)


def isotropic(x: torch.Tensor) -> torch.Tensor:
    """``polar(x) · mean(sv(x))``: ``x`` with all its singular values set to their mean (Iso-C, ESM §6.5)."""
    f, s = polar_and_singular_values(x)
    return f * s.mean()


def polar(x: torch.Tensor) -> torch.Tensor:
    """Orthogonal polar factor ``P Qᵀ`` of ``x`` (m × n): orthonormal columns if m ≥ n, rows otherwise."""
    return polar_and_singular_values(x)[0]


# ---------------------------------------------------------------------------
# ESD (SPEC §5)
# ---------------------------------------------------------------------------


def _check_esd_inputs(delta: torch.Tensor, gram: torch.Tensor, n: int) -> None:
    if delta.ndim != 2:
        raise ValueError(f"ESD needs a 2-D task matrix, got shape {tuple(delta.shape)}")
    d_in = delta.shape[1]
    if gram.shape != (d_in, d_in):
        raise ValueError(f"Gram matrix must be {d_in}×{d_in} to match the task matrix "
                         f"{tuple(delta.shape)}, got {tuple(gram.shape)}")
    if int(n) < 2:
        raise ValueError(f"ESD needs statistics over at least 2 input rows, got n={n}")


def esd(delta: torch.Tensor, gram: torch.Tensor, n: int, *, columns: int | None = None
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Essential Subspace Decomposition of one task matrix (SPEC §5).

    ``delta``: ΔW (d_out × d_in); ``gram``: ``G = XᵀX`` (d_in × d_in) of the
    layer's inputs over ``n`` rows. Returns ``(P, λ)``: ``P`` (d_out × d_out,
    float64) orthonormal eigenvectors of ``ΔW G ΔWᵀ`` ordered by the
    eigenvalues ``λ`` (d_out, float64, descending, ``λ = s²/(n − 1)`` with s the
    singular values of ``ΔO = XΔWᵀ``; tiny negatives clamped to 0; orthonormal
    completion with λ = 0 beyond the rank). ``columns`` keeps only the first
    columns of ``P`` (λ is always complete).

    Route (both exact in float64): for ``d_out ≤ d_in`` the eigh of the
    d_out × d_out matrix ``ΔW G ΔWᵀ``; otherwise ``G = Q diag(g) Qᵀ``,
    ``M = ΔW Q diag(√g)`` (so ``M Mᵀ = ΔW G ΔWᵀ``) and the thin SVD of M
    (d_out × d_in), completed by a QR only when more than d_in columns are asked.
    """
    _check_esd_inputs(delta, gram, n)
    d_out, d_in = delta.shape
    want = d_out if columns is None else max(0, min(int(columns), d_out))
    W = delta.to(torch.float64)
    G = gram.to(W.device, torch.float64)
    G = (G + G.mT) / 2
    if d_out <= d_in:
        C = W @ G @ W.mT                                   # ΔW G ΔWᵀ = ΔOᵀΔO (d_out × d_out)
        C = (C + C.mT) / 2
        ev, P = torch.linalg.eigh(C)                       # ascending
        ev, P = ev.flip(0), P.flip(1)[:, :want]
    else:
        g, Q = torch.linalg.eigh(G)
        M = W @ (Q * g.clamp_min(0).sqrt())                # M Mᵀ = ΔW G ΔWᵀ
        U, s, _ = torch.linalg.svd(M, full_matrices=False)  # U: d_out × d_in, s descending
        ev = torch.cat([s.square(), s.new_zeros(d_out - d_in)])
        if want <= d_in:
            P = U[:, :want]
        else:                                              # orthonormal completion of span(U)
            Qc = torch.linalg.qr(U, mode="complete")[0]
            P = torch.cat([U, Qc[:, d_in:want]], dim=1)
    lam = ev.clamp_min(0) / (int(n) - 1)                   # λ = s²/(n − 1)
    return P.contiguous(), lam


def esd_truncate(delta: torch.Tensor, P: torch.Tensor, k: int) -> torch.Tensor:
    """Rank-k ESD truncation ``ΔŴ = P̂ P̂ᵀ ΔW`` with ``P̂ = P[:, :k]`` (SPEC §5.3), in ``delta``'s dtype."""
    if P.shape[0] != delta.shape[0]:
        raise ValueError(f"P has {P.shape[0]} rows but the task matrix has {delta.shape[0]} outputs")
    Ph = P[:, :k].to(delta.device, torch.float64)
    return (Ph @ (Ph.mT @ delta.to(torch.float64))).to(delta.dtype)


# ---------------------------------------------------------------------------
# Fingerprints and the decomposition cache
# ---------------------------------------------------------------------------


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
    # float64 accumulation without a float64 copy of the whole tensor (5× faster on a CPU)
    return (tuple(x.shape), str(x.dtype), float(f.sum(dtype=torch.float64)),
            float(torch.linalg.vector_norm(f, dtype=torch.float64)) ** 2, float((probe * signs * w).sum()))


@dataclass
class EsdEntry:
    """One cached ESD: the first ``P.shape[1]`` eigenvectors, all eigenvalues, ‖ΔW‖F, and its fingerprint."""
    fp: tuple                  # fingerprint of (ΔW, G, n) it was computed from
    P: torch.Tensor            # d_out × c (float32)
    lam: torch.Tensor          # d_out (float64), descending
    norm: float                # ‖ΔW‖F
    rows: int                  # n
    complete: bool             # True when P holds all d_out columns


@dataclass
class DecompositionCache:
    """Decompositions kept between merges (the "live" re-merge of DESIGN.md).

    ``esd_entries[(task, key)]`` holds an :class:`EsdEntry`; ``results[tag]``
    holds ``(fingerprint, value)`` for per-key results a method memoises (e.g.
    ESM's TSV-M keys and its per-key update before α). ``max_columns`` caps the
    eigenvector columns stored per entry (memory); by default every column up
    to the structural rank ``min(d_in, n)`` (or the rank asked, if larger) is kept.
    Counters: ``esd_calls`` (decompositions computed), ``esd_hits`` (reused).
    """
    max_columns: int | None = None
    esd_entries: dict = field(default_factory=dict)
    results: dict = field(default_factory=dict)
    esd_calls: int = 0
    esd_hits: int = 0

    def snapshot(self) -> "DecompositionCache":
        """A copy whose later additions leave this cache as it is (entries are shared: they are never mutated)."""
        return DecompositionCache(self.max_columns, dict(self.esd_entries), dict(self.results),
                                  self.esd_calls, self.esd_hits)

    def clear(self) -> None:
        self.esd_entries.clear()
        self.results.clear()

    def esd(self, task: str, key: str, delta: torch.Tensor, gram: torch.Tensor, n: int, k: int = 0,
            gram_fp: tuple | None = None, delta_fp: tuple | None = None) -> EsdEntry:
        """The ESD of ``delta`` (task ``task``, key ``key``) with at least ``k`` eigenvector columns.

        Reused when the fingerprints of ``delta`` and ``gram`` and ``n`` match the
        stored entry and it has enough columns; computed (and stored) otherwise.
        """
        fp = (delta_fp if delta_fp is not None else fingerprint(delta),
              gram_fp if gram_fp is not None else fingerprint(gram), int(n))
        d_out, d_in = delta.shape
        k = max(0, min(int(k), d_out))
        e = self.esd_entries.get((task, key))
        if e is not None and e.fp == fp and (e.complete or e.P.shape[1] >= k):
            self.esd_hits += 1
            return e
        keep = min(d_in, int(n))
        if self.max_columns is not None:
            keep = min(keep, int(self.max_columns))
        c = min(d_out, max(k, keep))
        _check_esd_inputs(delta, gram, n)
        P, lam = esd(delta, gram, n, columns=c)
        self.esd_calls += 1
        e = EsdEntry(fp=fp, P=P.to(torch.float32), lam=lam, rows=int(n), complete=(c == d_out),
                     norm=float(torch.linalg.vector_norm(delta.to(torch.float64))))
        self.esd_entries[(task, key)] = e
        return e

    def get_result(self, tag: Hashable, fp: Any):
        """A memoised value stored under ``tag`` if its fingerprint equals ``fp``, else None."""
        hit = self.results.get(tag)
        if hit is not None and hit[0] == fp:
            return hit[1]
        return None

    def put_result(self, tag: Hashable, fp: Any, value) -> None:
        self.results[tag] = (fp, value)
