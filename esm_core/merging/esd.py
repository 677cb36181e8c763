"""Essential Subspace Decomposition of one task matrix (methods §5).

:func:`esd` — the eigenvectors ``P`` of ``ΔW G ΔWᵀ`` (``G = XᵀX`` of the layer's inputs; the principal
directions of the output shift ``ΔO = XΔWᵀ``, no mean-centring) and the eigenvalues ``λ = s²/(n − 1)``, by the
fastest route that meets its stated tolerance; :func:`esd_exact` — the reference route (float64 eigh / SVD);
:func:`esd_truncate` — the rank-k truncation ``P̂ P̂ᵀ ΔW``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..device import torch_threads_back
from .kernels import eigh64, gram as gram_of, l_times, lt_s_l, times_l, trmm_ok


class Esd(NamedTuple):
    """The result of :func:`esd`: ``P`` (d_out × c, float64, orthonormal, leading eigenvectors first), ``lam``
    (float64, descending) and, when asked (``coords=True``), the coordinates ``A = PᵀΔW`` (c × d_in, float64)."""
    P: torch.Tensor
    lam: torch.Tensor
    A: torch.Tensor | None = None


def _check_esd_inputs(delta: torch.Tensor, gram: torch.Tensor | None, n: int, factor=None) -> None:
    if delta.ndim != 2:
        raise ValueError(f"ESD needs a 2-D task matrix, got shape {tuple(delta.shape)}")
    d_in = delta.shape[1]
    if gram is not None and gram.shape != (d_in, d_in):
        raise ValueError(f"Gram matrix must be {d_in}×{d_in} to match the task matrix "
                         f"{tuple(delta.shape)}, got {tuple(gram.shape)}")
    if factor is not None and (factor.ndim != 2 or factor.shape[0] != d_in):
        raise ValueError(f"Gram factor must be {d_in} × r to match the task matrix {tuple(delta.shape)}, "
                         f"got {tuple(factor.shape)}")
    if gram is None and factor is None:
        raise ValueError("ESD needs the Gram matrix or a factor of it")
    if int(n) < 2:
        raise ValueError(f"ESD needs statistics over at least 2 input rows, got n={n}")


# Relative eigenvalue (μ_i / μ_max of MᵀM) below which the Gram route of the ESD does not trust a
# column it is asked for: the column's error grows like eps64 · μ_max / μ_i (≤ 1e-8 here); the
# exact route (thin SVD of M) runs instead.
ESD_GRAM_RCOND = 1e-8


def gram_factor(gram: torch.Tensor) -> torch.Tensor:
    """``L`` (d_in × d_in, float64) with ``L Lᵀ = G``: Cholesky, or ``Q diag(√g)`` when G is singular."""
    return _gram_factor(gram)[0]


def _gram_factor(gram: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """:func:`gram_factor` and whether it is the (lower-triangular) Cholesky factor."""
    G = gram.to(torch.float64)
    G = (G + G.mT) / 2
    L, info = torch.linalg.cholesky_ex(G)
    if int(info) == 0 and bool(torch.isfinite(L).all()):
        return L, True
    g, Q = torch.linalg.eigh(G)
    return Q * g.clamp_min(0).sqrt(), False


def completion(P: torch.Tensor, m: int) -> torch.Tensor:
    """``m`` orthonormal columns orthogonal to the orthonormal columns of ``P`` (d × c, m ≤ d − c).

    They span directions with λ = 0, an eigenspace with no preferred basis: seeded Gaussian columns with
    ``P`` projected out twice, then a thin QR — O(d·c·m), where a complete QR of ``P`` would form a d × d
    factor."""
    g = torch.Generator(device="cpu").manual_seed(0)
    Z = torch.randn(P.shape[0], m, generator=g, dtype=P.dtype).to(P.device)
    for _ in range(2):                                     # twice is enough (Kahan–Parlett)
        Z = Z - P @ (P.mT @ Z)
    return torch.linalg.qr(Z)[0]


def _check_shape(x: torch.Tensor, shape: tuple, what: str) -> None:
    if tuple(x.shape) != shape:
        raise ValueError(f"{what} must be {shape[0]} × {shape[1]}, got {tuple(x.shape)}")


def _esd_svd(W: torch.Tensor, L: torch.Tensor, tri: bool, n: int, want: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P, λ)`` from the thin SVD of ``M = ΔW L`` (``M Mᵀ = ΔW G ΔWᵀ`` for any ``L Lᵀ = G``): the exact
    route of :func:`esd_exact` without its eigendecomposition of ``G`` (an SVD of ``ΔW Q diag(√g)``
    differs from this one only in the orthogonal factor on ``M``'s right), from the factor :func:`esd`
    already holds. Columns beyond ``M``'s thin factor (λ = 0) are completed as in :func:`esd`."""
    d_out = W.shape[0]
    M = times_l(W, L) if tri else W @ L                   # d_out × r
    with torch_threads_back():                            # torch's SVD uses the threads a section took away
        U, s, _ = torch.linalg.svd(M, full_matrices=False)     # s descending
    P = U[:, :want]
    if want > P.shape[1]:
        P = torch.cat([P, completion(P, want - P.shape[1])], dim=1)
    ev = torch.cat([s.square(), s.new_zeros(d_out - s.numel())])
    return P.contiguous(), ev.clamp_min(0) / (int(n) - 1)


def esd(delta: torch.Tensor, gram: torch.Tensor | None, n: int, *, columns: int | None = None,
        factor: torch.Tensor | None = None, coords: bool = False, wtw: torch.Tensor | None = None,
        shift_gram: torch.Tensor | None = None, need: int | None = None, all_values: bool = True) -> Esd:
    """Essential Subspace Decomposition of one task matrix (methods §5).

    ``delta``: ΔW (d_out × d_in); ``gram``: ``G = XᵀX`` (d_in × d_in) of the
    layer's inputs over ``n`` rows — or ``factor``: any ``L`` (d_in × r) with
    ``L Lᵀ = G``, e.g. the rows ``Xᵀ`` themselves when there are fewer rows than
    inputs. Returns an :class:`Esd`: ``P`` (d_out × c, float64, c = ``columns`` or
    d_out) orthonormal leading eigenvectors of ``ΔW G ΔWᵀ`` ordered by the
    eigenvalues ``lam`` (d_out, float64, descending, ``λ = s²/(n − 1)`` with s the
    singular values of ``ΔO = XΔWᵀ``; tiny negatives clamped to 0) and, with
    ``coords=True``, the coordinates ``A = PᵀΔW`` (c × d_in, float64; None otherwise).

    Route: without a factor and with ``d_out ≤ d_in``, the eigh of ``ΔW G ΔWᵀ``
    (d_out × d_out, as :func:`esd_exact`). Else, with ``M = ΔW L`` (d_out × r,
    ``M Mᵀ = ΔW G ΔWᵀ``; L from a Cholesky of G if no factor is given): for
    ``r ≤ d_out`` the eigh of ``MᵀM = Lᵀ(ΔWᵀΔW)L`` (r × r) gives ``λ``, and
    ``P = ΔW B`` with ``B = L Q diag(μ^-½)`` for the columns asked (``A = Bᵀ(ΔWᵀΔW)``)
    — M itself is never formed and no orthonormal completion is, unless more
    columns than the rank are asked; for ``r > d_out`` the eigh of ``MMᵀ``
    (d_out × d_out). When a column asked has ``μ_i < ESD_GRAM_RCOND · μ_max``
    (error of the Gram route above ~1e-8) the exact route runs: the thin SVD of ``M`` (as
    :func:`esd_exact`, from the factor in hand instead of an eigendecomposition of ``G``) — unless ``need``
    columns are enough and the first ``need`` are trusted: then ``P`` holds the leading trusted columns only
    (between ``need`` and ``columns``; ``A`` the same rows). The cache asks so for the columns it keeps for
    larger ranks: on activations with an ill-conditioned Gram matrix (LayerNorm outputs) the trailing
    columns would otherwise send every ESD to the SVD.

    ``all_values=False``: the caller reads no eigenvalue beyond the ``columns`` leading ones (ESM++'s experts,
    32 of 768): the eigendecomposition may then compute only those pairs (:func:`eigh64`'s ``top``), and ``λ``
    may hold only them (at least ``columns`` entries, the leading ones).

    ``wtw`` / ``shift_gram``: ``ΔWᵀΔW`` (``gram(ΔW)``) and ``ΔW G ΔWᵀ`` (``gram((ΔW L)ᵀ)`` for the
    ``factor`` L), float64, from a caller that needs them as well (the Spectra view's SVD spectrum); used
    where this route forms them, so the result is the same.
    """
    _check_esd_inputs(delta, gram, n, factor)
    d_out, d_in = delta.shape
    want = d_out if columns is None else max(0, min(int(columns), d_out))
    W = delta.to(torch.float64)

    def done(P, lam, WtW=None, B=None) -> Esd:
        if not coords:
            return Esd(P, lam)
        if WtW is not None and B is not None and B.shape[1] == P.shape[1]:
            return Esd(P, lam, B.mT @ WtW)                 # PᵀΔW = Bᵀ ΔWᵀΔW
        return Esd(P, lam, P.mT @ W)

    if factor is None and d_out <= d_in:                   # no factor of G needed: eigh of ΔW G ΔWᵀ
        return done(*esd_exact(delta, gram, n, columns=columns))
    if factor is None:
        L, tri = _gram_factor(gram.to(W.device))       # tri: lower-triangular (Cholesky): dtrmm products
    else:
        L, tri = factor.to(W.device, torch.float64), False
    tri = tri and trmm_ok(L, W)
    r = L.shape[1]
    if r > d_out:
        if shift_gram is not None:
            _check_shape(shift_gram, (d_out, d_out), "shift_gram (ΔW G ΔWᵀ)")
            C = shift_gram.to(W.device, torch.float64)
        else:
            C = gram_of((W @ L).mT)                           # M Mᵀ = ΔW G ΔWᵀ (M = ΔW L: d_out × r), symmetric
        ev, P = eigh64(C, top=None if all_values else want)
        ev, P = ev.flip(0), P.flip(1)[:, :want]
        return done(P.contiguous(), ev.clamp_min(0) / (int(n) - 1))
    if wtw is not None:
        _check_shape(wtw, (d_in, d_in), "wtw (ΔWᵀΔW)")
        WtW = wtw.to(W.device, torch.float64)
    else:
        WtW = gram_of(W)                                      # d_in × d_in (one triangle: syrk)
    if tri:
        K = lt_s_l(L, WtW)                                # = MᵀM (r × r)
    else:
        K = L.mT @ WtW @ L
        K = (K + K.mT) / 2
    mu, Q = eigh64(K, top=None if all_values else want)    # ascending (only the top pairs: see all_values)
    mu, Q = mu.flip(0), Q.flip(1)
    top = float(mu[0]) if r > 0 else 0.0
    c = min(want, r)
    if c > 0 and not (top > 0 and float(mu[c - 1]) > ESD_GRAM_RCOND * top):
        trusted = int((mu[:c] > ESD_GRAM_RCOND * top).sum()) if top > 0 else 0      # a leading run (μ descends)
        if trusted < max(1, want if need is None else min(int(need), want)):
            return done(*_esd_svd(W, L, tri, n, want))         # the exact route, from the factor in hand
        c = want = trusted                                     # the columns it can give (≥ need), no more
    B = (l_times(L, Q[:, :c]) if tri else L @ Q[:, :c]) / mu[:c].sqrt()     # P = M Q μ^-½ = ΔW B
    P = W @ B
    if want > c:                                           # orthonormal completion, only when asked
        P = torch.cat([P, completion(P, want - c)], dim=1)
    ev = torch.cat([mu, mu.new_zeros(d_out - r)]) if mu.numel() == r else mu
    return done(P.contiguous(), ev.clamp_min(0) / (int(n) - 1), WtW, B)


def esd_exact(delta: torch.Tensor, gram: torch.Tensor, n: int, *, columns: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference ESD route (both branches exact in float64): ``(P, λ)`` as :func:`esd` gives them.

    For ``d_out ≤ d_in`` the eigh of the d_out × d_out matrix ``ΔW G ΔWᵀ``;
    otherwise ``G = Q diag(g) Qᵀ``, ``M = ΔW Q diag(√g)`` and the thin SVD of M
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
    """Rank-k ESD truncation ``ΔŴ = P̂ P̂ᵀ ΔW`` with ``P̂ = P[:, :k]`` (methods §5.3), in ``delta``'s dtype."""
    if P.shape[0] != delta.shape[0]:
        raise ValueError(f"P has {P.shape[0]} rows but the task matrix has {delta.shape[0]} outputs")
    Ph = P[:, :k].to(delta.device, torch.float64)
    return (Ph @ (Ph.mT @ delta.to(torch.float64))).to(delta.dtype)

