"""The orthogonal polar factor ``P Qᵀ`` of ``x = P Σ Qᵀ`` and the isotropic matrix ``polar(x) · mean σ`` (methods §3–§4, §6.5).

Two routes compute it in float64:

* "gram" (:func:`polar_and_singular_values`) — the eigendecomposition of the small Gram matrix, with the SVD
  (:func:`polar_svd`) as fall-back where ``x`` is ill-conditioned or rank-deficient (there the factor is not
  unique and the SVD's choice is the reference's); the CPU's route;
* "newton_schulz" (:func:`polar_newton_schulz`) — matrix products only, the route :func:`isotropic` takes on
  CUDA (:data:`POLAR_ROUTES`), the Gram route where the iteration does not converge.
"""
from __future__ import annotations

import torch

from .kernels import eigh64, gram

# Acceptance of the Gram route of the polar factor ``z qᵀ`` (z = x q μ^-½, xᵀx = q diag(μ) qᵀ).
# To first order its error is W·M with M = x's H times the perturbed Gram's inverse root − I, and
# |antisym(M)| ≤ |sym(M)| entrywise, while zᵀz − I = 2 sym(M): the relative Frobenius error of the
# factor is at most ~0.7 × the orthogonality defect ‖zᵀz − I‖F / √n. The route is taken when the a
# priori estimate eps64 · sqrt(mean_i (μ_max/μ_i)²) is at most POLAR_TOL, or, when that estimate
# is below POLAR_GIVE_UP, when the defect measured on 8 random probe vectors (negligible cost) is
# at most POLAR_TOL / 2; else the SVD (exact, and far slower) runs. The a priori estimate overshoots (by
# two orders of magnitude on ESM's output factors of ViT c_fc layers), hence the measured second test.
POLAR_TOL = 1e-6
POLAR_GIVE_UP = 1e-2
_EPS64 = float(torch.finfo(torch.float64).eps)
_PROBES = 8


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


def orthogonality_defect(z: torch.Tensor, probes: int = _PROBES, seed: int = 0) -> float:
    """``‖zᵀz − I‖F / √n`` estimated on ``probes`` Gaussian vectors (z: m × n, float64): ``‖zᵀ(zw) − w‖F / ‖w‖F``."""
    n = z.shape[1]
    g = torch.Generator(device="cpu").manual_seed(seed)
    w = torch.randn(n, probes, generator=g, dtype=z.dtype).to(z.device)
    r = z.mT @ (z @ w) - w
    return float(torch.linalg.vector_norm(r) / torch.linalg.vector_norm(w))


def polar_and_singular_values(x: torch.Tensor, dtype: torch.dtype | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(polar factor of x, singular values of x)``; singular values descending, ``min(m, n)`` of them.

    Route: for ``m ≥ n``, ``xᵀx = Q diag(μ) Qᵀ`` (n × n, float64) and
    ``polar(x) = x Q diag(μ^-½) Qᵀ``, ``σ = sqrt(μ)``; for ``m < n`` the same on
    ``xᵀ``. Falls back to the SVD (float64) when the error of that route may
    exceed :data:`POLAR_TOL` (a priori, then measured; see :data:`POLAR_TOL`'s comment) —
    ill-conditioned or rank-deficient ``x``, where the factor is not unique and the SVD's choice is the
    reference's — or anything is not finite. Results in ``dtype`` (default: ``x``'s dtype).

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
# the Gram matrix, SVD fall-back: the fastest on the CPU, where a float64 eigh costs several products of
# its size) or "newton_schulz" (float64 products only: a GPU multiplies large matrices far faster than it
# runs eigh; each factor's error is measured, the Gram route runs where the iteration does not reach it).
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

