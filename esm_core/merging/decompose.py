"""Decompositions shared by the methods: polar factor, ESD (methods §5) and their cache.

* :func:`polar` — the orthogonal polar factor ``P Qᵀ`` of ``x = P Σ Qᵀ``,
  computed from the eigen-decomposition of the small Gram matrix (float64),
  with the SVD route (:func:`polar_svd`) as fall-back when ``x`` is
  ill-conditioned or rank-deficient (there the factor is not unique and the
  SVD's choice is the reference's); :func:`polar_newton_schulz` — the same
  factor by float64 products only, the route :func:`isotropic` takes on CUDA
  (:data:`POLAR_ROUTES`).
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

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

import numpy as np
import torch

from ..device import one_torch_thread, torch_threads_back

try:  # optional: SciPy's LAPACK / BLAS are faster than torch's eigh and xᵀx on one CPU core
    import scipy.linalg as sl
    from scipy.linalg.blas import dsyrk as _blas_syrk, dtrmm as _blas_trmm
except ImportError:  # pragma: no cover
    sl = None
    _blas_syrk = _blas_trmm = None


def scipy_threads(device="cpu"):
    """A context in which torch runs on one thread while SciPy's LAPACK / BLAS (their own threads) carry the
    parallel work — on the CPU with SciPy installed; elsewhere it changes nothing
    (:func:`esm_core.device.one_torch_thread` says why)."""
    if sl is None or torch.device(device).type != "cpu":
        return contextlib.nullcontext()
    return one_torch_thread()


# Acceptance of the Gram route of the polar factor ``z qᵀ`` (z = x q μ^-½, xᵀx = q diag(μ) qᵀ).
# To first order its error is W·M with M = x's H times the perturbed Gram's inverse root − I, and
# |antisym(M)| ≤ |sym(M)| entrywise, while zᵀz − I = 2 sym(M): the relative Frobenius error of the
# factor is at most ~0.7 × the orthogonality defect ‖zᵀz − I‖F / √n. The route is taken when the a
# priori estimate eps64 · sqrt(mean_i (μ_max/μ_i)²) is at most POLAR_TOL, or, when that estimate
# is below POLAR_GIVE_UP, when the defect measured on 8 random probe vectors (negligible cost) is
# at most POLAR_TOL / 2; else the SVD (exact, ~30–60 s for a 3072² matrix on one laptop core) runs.
# The a priori estimate overshoots: ESM's 3072 × 3072 output factor of a ViT-B/32 c_fc layer
# (cond 2.5e5) gets 2.4e-7 where the measured error against the SVD is 1.6e-9. Until fd9a028 the
# test was σ_min/σ_max ≥ 1e-5 (POLAR_RCOND), which sent that factor to the SVD.
POLAR_TOL = 1e-6
POLAR_GIVE_UP = 1e-2
_EPS64 = float(torch.finfo(torch.float64).eps)
_PROBES = 8


# ---------------------------------------------------------------------------
# Polar factor
# ---------------------------------------------------------------------------


def polar_svd(x: torch.Tensor) -> torch.Tensor:
    """Orthogonal polar factor of ``x`` by SVD: ``x = P Σ Qᵀ → P Qᵀ`` (reference route)."""
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh


def _gram_route_estimate(mu: torch.Tensor) -> float:
    """A priori relative Frobenius error of the Gram route from the Gram eigenvalues ``mu`` (ascending); inf if unusable."""
    if mu.numel() == 0 or not bool(torch.isfinite(mu).all()):
        return float("inf")
    top = mu[-1]
    if not top > 0 or not mu[0] > 0:
        return float("inf")
    return _EPS64 * float((top / mu).square().mean().sqrt())


def _gram_route_ok(mu: torch.Tensor) -> bool:
    """True when eigenvalues ``mu`` (ascending) of a Gram matrix let the Gram route meet :data:`POLAR_TOL` a priori."""
    return _gram_route_estimate(mu) <= POLAR_TOL


def orthogonality_defect(z: torch.Tensor, probes: int = _PROBES, seed: int = 0) -> float:
    """``‖zᵀz − I‖F / √n`` estimated on ``probes`` Gaussian vectors (z: m × n, float64): ``‖zᵀ(zw) − w‖F / ‖w‖F``."""
    n = z.shape[1]
    g = torch.Generator(device="cpu").manual_seed(seed)
    w = torch.randn(n, probes, generator=g, dtype=z.dtype).to(z.device)
    r = z.mT @ (z @ w) - w
    return float(torch.linalg.vector_norm(r) / torch.linalg.vector_norm(w))


# Sizes from which the CPU float64 helpers below call SciPy's LAPACK / BLAS instead of torch's (one thread,
# measured: eigh 768² 0.068 s with dsyevd against 0.086 s with torch, 3072² 4.2 s against 7.5 s; a Gram
# matrix by dsyrk (one triangle) 0.040 s against 0.064 s for xᵀx with x 3072 × 768).
EIGH_SCIPY_MIN = 256
GRAM_SYRK_MIN = 64
# Below this size SciPy's eigh runs with its BLAS on one thread (:func:`blas_one_thread`). LAPACK's
# tridiagonal reduction is memory-bound with a barrier per column, so a second thread gains little on a small
# matrix — and on a machine whose cores are shared with other work it loses badly: measured on this project's
# 2-core machine under load (load average 12), syevd 384² took 0.10–0.12 s on one thread and 0.27–0.70 s on
# two, 768² 0.85–1.0 s against 6.4–8.7 s (the Spectra view of the MiniLM text pool runs 288 of them). The
# Gram matrices of :func:`gram` (BLAS ``syrk``) below this size run on one thread too.
EIGH_ONE_THREAD_MAX = 1024

_BLAS_CONTROLLER: list = []       # threadpoolctl's controller (made once: it scans the loaded libraries), or None


def _blas_controller():
    if not _BLAS_CONTROLLER:
        try:
            from threadpoolctl import ThreadpoolController
            _BLAS_CONTROLLER.append(ThreadpoolController())
        except Exception:          # not installed (an optional dependency), or a library it cannot read
            _BLAS_CONTROLLER.append(None)
    return _BLAS_CONTROLLER[0]


def blas_one_thread():
    """A context in which SciPy's / NumPy's BLAS runs on one thread (with ``threadpoolctl`` installed; else it
    changes nothing), put back to its count on exit. OpenBLAS's count is the process's: every thread's BLAS
    calls run on one thread meanwhile."""
    ctl = _blas_controller()
    if ctl is None:
        return contextlib.nullcontext()
    return ctl.limit(limits=1, user_api="blas")


def eigh64(g: torch.Tensor, top: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` of a symmetric float64 matrix (eigenvalues ascending); on the CPU for
    n ≥ :data:`EIGH_SCIPY_MIN`, SciPy's LAPACK divide-and-conquer ``syevd`` when SciPy is installed (not a
    dependency; the fastest of torch / ``syevr`` / ``syevd`` on one core at every size measured, 384–3072).

    ``top``: only the largest ``top`` eigenpairs are needed; when ``top ≤ n / 4`` SciPy's ``syevr`` computes
    just those (768²: 0.051 s for 96 pairs against 0.068 s for all) and only they are returned (ascending).
    Otherwise every pair is returned. Below :data:`EIGH_ONE_THREAD_MAX` SciPy's BLAS runs on one thread."""
    if (sl is not None and g.device.type == "cpu" and g.dtype == torch.float64 and g.ndim == 2
            and g.shape[-1] >= EIGH_SCIPY_MIN):
        n = g.shape[-1]
        g = g.detach()
        with blas_one_thread() if n < EIGH_ONE_THREAD_MAX else contextlib.nullcontext():
            if top is not None and 0 < top <= n // 4:
                w, v = sl.eigh(g.numpy(), driver="evr", check_finite=False, subset_by_index=[n - top, n - 1])
            else:
                w, v = sl.eigh(g.numpy(), driver="evd", check_finite=False)
        return torch.from_numpy(w), torch.from_numpy(v)
    return torch.linalg.eigh(g)


def _syrk(x: torch.Tensor) -> torch.Tensor | None:
    """``xᵀx`` by BLAS ``dsyrk`` (one triangle computed, then mirrored: exactly symmetric), or None where unavailable."""
    if _blas_syrk is None or x.device.type != "cpu" or x.dtype != torch.float64 or x.ndim != 2:
        return None
    x = x.detach()
    with blas_one_thread() if x.shape[1] < EIGH_ONE_THREAD_MAX else contextlib.nullcontext():   # as eigh64's
        if x.is_contiguous():
            c = _blas_syrk(1.0, x.mT.numpy(), trans=0)          # x.mT is Fortran-ordered: no copy
        elif x.mT.is_contiguous():
            c = _blas_syrk(1.0, x.numpy(), trans=1)             # x itself is Fortran-ordered
        else:
            c = _blas_syrk(1.0, x.contiguous().mT.numpy(), trans=0)
    n, b = c.shape[0], 256                                  # upper triangle filled, strictly lower zero:
    for i in range(0, n, b):                                # mirror in place, by column blocks
        c[i + b:, i:i + b] = c[i:i + b, i + b:].T
        blk = c[i:i + b, i:i + b]
        c[i:i + b, i:i + b] = np.triu(blk) + np.triu(blk, 1).T
    return torch.from_numpy(c)


def gram(x: torch.Tensor, block: int = 512) -> torch.Tensor:
    """``xᵀx``, exactly symmetric: BLAS ``dsyrk`` for a CPU float64 ``x`` (one triangle, half the flops of
    ``x.mT @ x``), else computed by column blocks, upper blocks only and mirrored (≈ 45 % fewer flops than
    ``x.mT @ x`` for n ≥ 2·block)."""
    n = x.shape[1]
    if n >= GRAM_SYRK_MIN:
        g = _syrk(x)
        if g is not None:
            return g
    if n < 2 * block:
        g = x.mT @ x
        return (g + g.mT) / 2
    nb = -(-n // block)
    size = -(-n // nb)
    edges = list(range(0, n, size)) + [n]
    g = x.new_empty(n, n)
    for i in range(len(edges) - 1):
        a0, a1 = edges[i], edges[i + 1]
        xa = x[:, a0:a1]
        row = xa.mT @ x[:, a0:]                        # blocks (i, j ≥ i)
        g[a0:a1, a0:] = row
        g[a0:, a0:a1] = row.mT
    for i in range(len(edges) - 1):
        a0, a1 = edges[i], edges[i + 1]
        blk = g[a0:a1, a0:a1]
        g[a0:a1, a0:a1] = (blk + blk.mT) / 2           # diagonal blocks: exactly symmetric
    return g


_xtx = gram          # for functions whose ``gram`` argument shadows it


def polar_and_singular_values(x: torch.Tensor, dtype: torch.dtype | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(polar factor of x, singular values of x)``; singular values descending, ``min(m, n)`` of them.

    Route: for ``m ≥ n``, ``xᵀx = Q diag(μ) Qᵀ`` (n × n, float64) and
    ``polar(x) = x Q diag(μ^-½) Qᵀ``, ``σ = sqrt(μ)``; for ``m < n`` the same on
    ``xᵀ``. Falls back to the SVD (float64) when the error of that route may
    exceed :data:`POLAR_TOL` (a priori, then measured; see the module constants)
    (ill-conditioned or rank-deficient ``x``:
    there the factor is not unique and the SVD's choice is the reference's) or
    anything is not finite. Results in ``dtype`` (default: ``x``'s dtype).

    ``x Q diag(μ^-½)`` (= polar(x)·Q, orthonormal columns) is formed in float64;
    its product with ``Qᵀ`` — two orthogonal factors, no error amplification —
    runs in float32 when the result is float32 (relative error ~1e-7).
    """
    dtype = x.dtype if dtype is None else dtype
    if x.ndim != 2:
        raise ValueError(f"polar factor needs a 2-D matrix, got shape {tuple(x.shape)}")
    m, n = x.shape
    if m < n:
        f, s = polar_and_singular_values(x.mT, dtype)
        return f.mT, s
    if n == 0:
        return x.clone(), x.new_zeros(0)
    x64 = x.to(torch.float64)
    mu, q = eigh64(gram(x64))                          # xᵀx = Q diag(μ) Qᵀ, μ ascending
    est = _gram_route_estimate(mu)
    z = None
    if est <= POLAR_GIVE_UP:
        s = mu.sqrt()
        z = x64 @ (q / s)                              # = polar(x) Q: orthonormal columns
        if est > POLAR_TOL and not orthogonality_defect(z) <= POLAR_TOL / 2:
            z = None                                   # measured defect too large: the SVD decides
    if z is not None:
        if dtype == torch.float32:
            f = z.to(torch.float32) @ q.to(torch.float32).mT
        else:
            f = (z @ q.mT).to(dtype)
        return f, s.flip(0).to(dtype)
    u, s, vh = torch.linalg.svd(x64, full_matrices=False)
    return (u @ vh).to(dtype), s.to(dtype)


# ---------------------------------------------------------------------------
# Polar factor by products only (the GPU route)
# ---------------------------------------------------------------------------

# Which route :func:`isotropic` takes on each device type when none is asked: "gram" (eigendecomposition of
# the Gram matrix, SVD fall-back: the fastest on the CPU, where one float64 3072² eigh costs ≈ 7 products of
# that size) or "newton_schulz" (float64 products only: a GPU multiplies 3072² matrices in milliseconds while
# its eigh does not; each factor's error is measured, the Gram route runs where the iteration does not reach it).
POLAR_ROUTES = {"cuda": "newton_schulz"}
NS_DEFECT = 1e-4            # stop once ‖XᵀX − I‖F / √n ≤ this, then one last step: error ≈ 0.4 · defect²
NS_MAX_ITER = 40            # scaled steps; ≈ 12 + log(σ_max/σ_min)/log(2.6) are needed (cond 1e7: ≈ 29)
NS_L_FLOOR = 1e-8           # the smallest σ_min/σ_max the scaled steps are tuned for


def polar_route(device) -> str:
    """The polar route :func:`isotropic` takes on ``device`` by default (see :data:`POLAR_ROUTES`)."""
    return POLAR_ROUTES.get(torch.device(device).type, "gram")


def _sigma_min_ratio(a: torch.Tensor, steps: int = 8) -> float | None:
    """An estimate (from above, within a small factor) of ``sqrt(λ_min(a))`` for a symmetric ``a`` with
    ``λ_max ≤ 1``: inverse power steps on 4 vectors through a Cholesky factor; None if ``a`` is numerically singular."""
    L, info = torch.linalg.cholesky_ex(a)
    if int(info) != 0 or not bool(torch.isfinite(L).all()):
        return None
    g = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(a.shape[0], 4, generator=g, dtype=a.dtype).to(a.device)
    inv_norm = 0.0
    for _ in range(steps):
        v = v / torch.linalg.vector_norm(v, dim=0)
        w = torch.cholesky_solve(v, L)                     # a⁻¹ v
        inv_norm = float(torch.linalg.vector_norm(w, dim=0).max())      # ≤ ‖a⁻¹‖, rising towards it
        v = w
    return (1.0 / inv_norm) ** 0.5 if inv_norm > 0 else None


def polar_newton_schulz(x: torch.Tensor, max_iter: int = NS_MAX_ITER
                        ) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """``(polar factor of x, mean of its singular values, steps)`` by the scaled Newton–Schulz iteration in
    float64 — matrix products only — or None where it does not converge (x numerically rank-deficient or
    with σ_max/σ_min above ~1e8, not finite, zero): the caller then takes the exact route.

    ``x`` is scaled so that σ ≤ 1 (σ_max² ≤ the largest absolute row sum of xᵀx), ``ℓ`` estimates σ_min
    (inverse power steps, from above), then ``X ← X (a I + b XᵀX)`` with the cubic
    ``p(σ) = 1.5cσ − 0.5c³σ³``, ``c² = 3 / (1 + ℓ + ℓ²)``, which maps ``[ℓ, 1]`` onto ``[p(ℓ), 1]``
    (``p(ℓ) = p(1)``: the best of its family; ℓ → p(ℓ)), down to the classical step (c = 1) as ℓ → 1. Every
    ``X`` is ``x`` times a polynomial in ``xᵀx``, so it keeps ``x``'s singular vectors: its only error is
    in the singular values, which the defect ``‖XᵀX − I‖F / √n`` measures; the loop ends once that is
    ≤ :data:`NS_DEFECT` with one classical step (relative Frobenius error ≈ 0.4 · defect² ≈ 4e-9, plus
    rounding ~ eps64 · σ_max/σ_min). The mean singular value is ``trace(Qᵀx) / n``."""
    if x.ndim != 2:
        raise ValueError(f"polar factor needs a 2-D matrix, got shape {tuple(x.shape)}")
    m, n = x.shape
    if m < n:
        r = polar_newton_schulz(x.mT, max_iter)
        return None if r is None else (r[0].mT, r[1], r[2])
    if n == 0:
        return None
    x64 = x.to(torch.float64)
    a = gram(x64)
    if not bool(torch.isfinite(a).all()):
        return None
    bound = float(a.abs().sum(1).max())                    # ≥ λ_max(xᵀx) = σ_max²
    if not bound > 0:
        return None
    X, a = x64 / bound ** 0.5, a / bound
    ell = _sigma_min_ratio(a)
    if ell is None:
        return None
    ell = min(max(0.5 * ell, NS_L_FLOOR), 1.0)
    eye = torch.eye(n, dtype=torch.float64, device=x.device)
    for step in range(1, max_iter + 1):
        defect = float(torch.linalg.matrix_norm(a - eye)) / n ** 0.5
        if not defect < float("inf"):
            return None
        if defect <= NS_DEFECT:
            X = X @ (1.5 * eye - 0.5 * a)                  # last classical step: defect → ~defect²
            return X, (X * x64).sum() / n, step
        c2 = 3.0 / (1.0 + ell + ell * ell)
        c = c2 ** 0.5
        X = X @ ((1.5 * c) * eye - (0.5 * c * c2) * a)    # p(σ) = 1.5cσ − 0.5c³σ³ on every singular value
        ell = min(1.5 * c * ell - 0.5 * c * c2 * ell ** 3, 1.0)
        a = gram(X)
    return None


def isotropic(x: torch.Tensor, dtype: torch.dtype | None = None, route: str | None = None) -> torch.Tensor:
    """``polar(x) · mean(sv(x))``: ``x`` with all its singular values set to their mean (Iso-C, ESM §6.5).

    ``route``: "gram" (:func:`polar_and_singular_values`) or "newton_schulz" (:func:`polar_newton_schulz`,
    the Gram route where it does not converge); default :func:`polar_route` of ``x``'s device."""
    route = polar_route(x.device) if route is None else route
    if route == "newton_schulz":
        r = polar_newton_schulz(x)
        if r is not None:
            f, smean, _ = r
            return (f * smean).to(x.dtype if dtype is None else dtype)
    elif route != "gram":
        raise ValueError(f"unknown polar route {route!r}: 'gram' or 'newton_schulz'")
    f, s = polar_and_singular_values(x, dtype)
    return f * s.mean()


def polar(x: torch.Tensor) -> torch.Tensor:
    """Orthogonal polar factor ``P Qᵀ`` of ``x`` (m × n): orthonormal columns if m ≥ n, rows otherwise."""
    return polar_and_singular_values(x)[0]


# ---------------------------------------------------------------------------
# ESD (methods §5)
# ---------------------------------------------------------------------------


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


def _trmm_ok(*xs: torch.Tensor) -> bool:
    return _blas_trmm is not None and all(x.device.type == "cpu" and x.dtype == torch.float64
                                          and not x.requires_grad for x in xs)


def _lt_s_l(L: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """``Lᵀ S L`` for a lower-triangular ``L`` and an exactly symmetric ``S``, by two BLAS ``dtrmm`` (half the
    flops of two general products), exactly symmetrised."""
    a = L.mT.numpy()                                    # Lᵀ (upper triangular)
    y = _blas_trmm(1.0, a, S.numpy().T, side=1, lower=0, trans_a=1)          # S L (S = Sᵀ: a Fortran view)
    k = torch.from_numpy(_blas_trmm(1.0, a, y, side=0, lower=0, trans_a=0, overwrite_b=1))   # Lᵀ (S L)
    return (k + k.mT) / 2


def _l_times(L: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``L X`` for a lower-triangular ``L`` by BLAS ``dtrmm``."""
    return torch.from_numpy(_blas_trmm(1.0, L.mT.numpy(), X.numpy(), side=0, lower=0, trans_a=1))


def _times_l(X: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """``X L`` for a lower-triangular ``L`` by BLAS ``dtrmm`` (computed as ``(Lᵀ Xᵀ)ᵀ``: no copies)."""
    mt = _blas_trmm(1.0, L.mT.numpy(), X.mT.numpy(), side=0, lower=0, trans_a=0)   # Lᵀ Xᵀ (Fortran views)
    return torch.from_numpy(mt).mT


def _completion(P: torch.Tensor, m: int) -> torch.Tensor:
    """``m`` orthonormal columns orthogonal to the orthonormal columns of ``P`` (d × c, m ≤ d − c).

    They span directions with λ = 0, an eigenspace with no preferred basis: seeded Gaussian columns with
    ``P`` projected out twice, then a thin QR — O(d·c·m), where a complete QR of ``P`` forms a d × d
    factor (3072²: 0.67 s per task on one core for the 256 columns a 3-task c_fc key asks)."""
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
    M = _times_l(W, L) if tri else W @ L                   # d_out × r
    with torch_threads_back():                            # torch's SVD uses the threads a section took away
        U, s, _ = torch.linalg.svd(M, full_matrices=False)     # s descending
    P = U[:, :want]
    if want > P.shape[1]:
        P = torch.cat([P, _completion(P, want - P.shape[1])], dim=1)
    ev = torch.cat([s.square(), s.new_zeros(d_out - s.numel())])
    return P.contiguous(), ev.clamp_min(0) / (int(n) - 1)


def esd(delta: torch.Tensor, gram: torch.Tensor | None, n: int, *, columns: int | None = None,
        factor: torch.Tensor | None = None, coords: bool = False, wtw: torch.Tensor | None = None,
        shift_gram: torch.Tensor | None = None, need: int | None = None, all_values: bool = True):
    """Essential Subspace Decomposition of one task matrix (methods §5).

    ``delta``: ΔW (d_out × d_in); ``gram``: ``G = XᵀX`` (d_in × d_in) of the
    layer's inputs over ``n`` rows — or ``factor``: any ``L`` (d_in × r) with
    ``L Lᵀ = G``, e.g. the rows ``Xᵀ`` themselves when there are fewer rows than
    inputs. Returns ``(P, λ)``: ``P`` (d_out × c, float64, c = ``columns`` or
    d_out) orthonormal leading eigenvectors of ``ΔW G ΔWᵀ`` ordered by the
    eigenvalues ``λ`` (d_out, float64, descending, ``λ = s²/(n − 1)`` with s the
    singular values of ``ΔO = XΔWᵀ``; tiny negatives clamped to 0). With
    ``coords=True``, ``(P, λ, A)`` with the coordinates ``A = PᵀΔW`` (c × d_in, float64).

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
    larger ranks: on activations with an ill-conditioned Gram matrix (LayerNorm outputs: condition 1e10–1e13)
    the trailing columns of every ``in_proj`` / ``c_fc`` ESD sent each one to the SVD, 3–4× the time.

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

    def done(P, lam, WtW=None, B=None):
        if not coords:
            return P, lam
        if WtW is not None and B is not None and B.shape[1] == P.shape[1]:
            return P, lam, B.mT @ WtW                      # PᵀΔW = Bᵀ ΔWᵀΔW
        return P, lam, P.mT @ W

    if factor is None and d_out <= d_in:                   # no factor of G needed: eigh of ΔW G ΔWᵀ
        return done(*esd_exact(delta, gram, n, columns=columns))
    if factor is None:
        L, tri = _gram_factor(gram.to(W.device))       # tri: lower-triangular (Cholesky): dtrmm products
    else:
        L, tri = factor.to(W.device, torch.float64), False
    tri = tri and _trmm_ok(L, W)
    r = L.shape[1]
    if r > d_out:
        if shift_gram is not None:
            _check_shape(shift_gram, (d_out, d_out), "shift_gram (ΔW G ΔWᵀ)")
            C = shift_gram.to(W.device, torch.float64)
        else:
            C = _xtx((W @ L).mT)                           # M Mᵀ = ΔW G ΔWᵀ (M = ΔW L: d_out × r), symmetric
        ev, P = eigh64(C, top=None if all_values else want)
        ev, P = ev.flip(0), P.flip(1)[:, :want]
        return done(P.contiguous(), ev.clamp_min(0) / (int(n) - 1))
    if wtw is not None:
        _check_shape(wtw, (d_in, d_in), "wtw (ΔWᵀΔW)")
        WtW = wtw.to(W.device, torch.float64)
    else:
        WtW = _xtx(W)                                      # d_in × d_in (one triangle: syrk)
    if tri:
        K = _lt_s_l(L, WtW)                                # = MᵀM (r × r)
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
    B = (_l_times(L, Q[:, :c]) if tri else L @ Q[:, :c]) / mu[:c].sqrt()     # P = M Q μ^-½ = ΔW B
    P = W @ B
    if want > c:                                           # orthonormal completion, only when asked
        P = torch.cat([P, _completion(P, want - c)], dim=1)
    ev = torch.cat([mu, mu.new_zeros(d_out - r)]) if mu.numel() == r else mu
    return done(P.contiguous(), ev.clamp_min(0) / (int(n) - 1), WtW, B)


def esd_exact(delta: torch.Tensor, gram: torch.Tensor, n: int, *, columns: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference ESD route (fd9a028's :func:`esd`; both branches exact in float64), same contract as :func:`esd`.

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


@dataclass
class DecompositionCache:
    """Decompositions kept between merges (the "live" re-merge of DESIGN.md).

    ``esd_entries[(task, key)]`` holds an :class:`EsdEntry`; ``results[tag]``
    holds ``(fingerprint, value)`` for per-key results a method memoises (e.g.
    ESM's TSV-M keys and its per-key update before α). ``max_columns`` caps the
    eigenvector columns stored per entry (memory); by default every column up
    to the structural rank ``min(d_in, n)`` (or the rank asked, if larger) is
    kept, or fewer when the caller says how many it can ever use (``keep=``).
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

    @property
    def nbytes(self) -> int:
        """Bytes of tensors held (ESD entries and memoised results)."""
        return (sum(e.nbytes for e in self.esd_entries.values())
                + sum(_nbytes(v) for _, v in self.results.values()))

    def lookup(self, task: str, key: str, fp: tuple, k: int = 0) -> EsdEntry | None:
        """The stored entry of ``(task, key)`` if its fingerprint is ``fp`` and it has ≥ ``k`` columns (a hit), else None."""
        e = self.esd_entries.get((task, key))
        if e is not None and e.fp == fp and (e.complete or e.P.shape[1] >= k):
            self.esd_hits += 1
            return e
        return None

    def esd(self, task: str, key: str, delta: torch.Tensor, gram: torch.Tensor | None, n: int, k: int = 0,
            gram_fp: tuple | None = None, delta_fp: tuple | None = None, *, factor: torch.Tensor | None = None,
            keep: int | None = None, coords: bool = False, wtw: torch.Tensor | None = None,
            shift_gram: torch.Tensor | None = None) -> EsdEntry:
        """The ESD of ``delta`` (task ``task``, key ``key``) with at least ``k`` eigenvector columns.

        Reused when the fingerprints of ``delta`` and ``gram`` and ``n`` match the
        stored entry and it has enough columns; computed (and stored) otherwise.
        ``factor`` (``L Lᵀ = G``) may stand in for ``gram`` (then give ``gram_fp``);
        ``keep`` caps the columns stored (never below ``k``; fewer than ``keep`` where only the exact route
        could give the rest: :func:`esd`'s ``need``); ``coords`` also
        stores the coordinates ``A = P̂ᵀ ΔW``; ``wtw`` / ``shift_gram`` as in :func:`esd`.
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
        out = esd(delta, gram, n, columns=c, factor=factor, coords=coords, wtw=wtw, shift_gram=shift_gram,
                  need=k)                  # the columns beyond k are kept where the fast route gives them
        P, lam = out[0], out[1]
        A = out[2].to(torch.float32) if coords else None
        self.esd_calls += 1
        e = EsdEntry(fp=fp, P=P.to(torch.float32), lam=lam, rows=int(n), complete=(P.shape[1] == d_out),
                     norm=float(torch.linalg.vector_norm(delta, dtype=torch.float64)), A=A)
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


# ---------------------------------------------------------------------------
# Fingerprints of a merge's inputs, memoised per tensor object (ESM and TSV-M share per-key results)
# ---------------------------------------------------------------------------

_FP_MEMO: dict[int, tuple] = {}


def _tensor_fp(t: torch.Tensor) -> tuple:
    """:func:`fingerprint` of ``t``, memoised while the same tensor object lives at the same version.

    In-place changes bump the tensor's version counter, so they are seen; a new
    tensor (e.g. each read of a lazy checkpoint) is fingerprinted afresh.
    """
    try:
        ver = t._version
    except (RuntimeError, AttributeError):          # inference tensors have no version counter
        return fingerprint(t)
    key = id(t)
    hit = _FP_MEMO.get(key)
    if hit is not None and hit[0]() is t and hit[1] == ver:
        return hit[2]
    fp = fingerprint(t)
    try:
        ref = weakref.ref(t, lambda _r, key=key: _FP_MEMO.pop(key, None))
    except TypeError:
        return fp
    _FP_MEMO[key] = (ref, ver, fp)
    return fp


def _source_fp(sd, key: str) -> tuple:
    """Fingerprint of ``sd[key]``: a lazy checkpoint's file identity (nothing read), else :func:`_tensor_fp`."""
    fp = getattr(sd, "fingerprint", None)
    if callable(fp):
        return fp(key)
    return _tensor_fp(sd[key])


def task_deltas(ctx, cache: "DecompositionCache", key: str) -> tuple[tuple, Callable[[], torch.Tensor]]:
    """``(fingerprints of the T task updates of key, deltas())``: ``deltas()`` forms the updates (T × shape,
    float32 on the merge device) once, on first call. The fingerprints are memoised in ``cache`` under the
    sources' identities (a lazy checkpoint's file, a tensor object at its version), so a re-merge of unchanged
    inputs finds them without forming the updates; methods that cache per-key results key them by these."""
    src = (tuple(_source_fp(sd, key) for sd in ctx.tasks.values()), _source_fp(ctx.base, key), str(ctx.device))
    dfp = cache.get_result(("dfp", key), src)
    D = [None]
    if dfp is None:
        D[0] = ctx.deltas(key)
        dfp = tuple(fingerprint(D[0][t]) for t in range(D[0].shape[0]))
        cache.put_result(("dfp", key), src, dfp)

    def deltas() -> torch.Tensor:
        if D[0] is None:
            D[0] = ctx.deltas(key)
        return D[0]
    return dfp, deltas
