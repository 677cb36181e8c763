"""SVD-family baselines: TSV-M, Iso-C, Iso-CTS (methods §3–§4), and the subspace alignment ratio.

Each method works per 2-D key (role MATRIX) on the stacked task matrices of
that key only; every other float key (role VECTOR) gets the mean of the task
vectors. The result is scaled by α for all keys: ``θ = θ0 + α ΔW``.

Precision and speed: the task matrices arrive as float32 on the merge device.
Top-k singular triplets (:func:`top_svd`) come from the eigendecomposition of
the small Gram matrix in float64 (``D Dᵀ = U diag(σ²) Uᵀ``, ``Vᵀ = diag(1/σ) Uᵀ D``),
several times faster than a full float32 SVD on a CPU and at least as accurate
for the kept triplets; a matrix whose top k includes (near-)zero singular values
falls back to ``torch.linalg.svd``. Iso-C is :func:`esm_core.merging.polar.isotropic`
of the sum (polar factor and singular values from one decomposition).
Polar factors always come from :func:`esm_core.merging.polar.polar`.
"""
from __future__ import annotations

import torch

from ..models.roles import MATRIX
from .cache import DecompositionCache, ResultKey, task_deltas
from .kernels import eigh64, gram
from .polar import isotropic, polar
from ..schemas import SPECS
from .registry import Method, register


# ---------------------------------------------------------------------------
# One 2-D key: stacked task matrices D (T × m × n) → merged ΔW (m × n)
# ---------------------------------------------------------------------------


def top_svd(D: torch.Tensor, k: int, rel_tol: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` singular triplets of every matrix of a stack ``D`` (T × m × n).

    Returns ``U`` (T × m × k), ``s`` (T × k, descending), ``Vh`` (T × k × n) in
    ``D``'s dtype. Computed per matrix from the float64 Gram matrix of its short
    side; a matrix whose k-th singular value is below ``rel_tol`` times its first
    goes through ``torch.linalg.svd`` instead (its trailing vectors are then an
    orthonormal completion, as with the SVD).
    """
    T, m, n = D.shape
    k = min(k, m, n)
    U = torch.empty(T, m, k, dtype=D.dtype, device=D.device)
    S = torch.empty(T, k, dtype=D.dtype, device=D.device)
    Vh = torch.empty(T, k, n, dtype=D.dtype, device=D.device)
    if k == 0:
        return U, S, Vh
    for t in range(T):
        x = D[t].to(torch.float64)
        wide = m <= n
        a = x if wide else x.transpose(0, 1)                  # short side first: a is min(m,n) × max(m,n)
        lam, q = eigh64(gram(a.transpose(0, 1)), top=k)      # a aᵀ (float64, syrk / syevd or syevr on the CPU)
        lam, q = lam.flip(0)[:k].clamp(min=0), q.flip(1)[:, :k]
        s = lam.sqrt()
        if s[0] == 0 or s[-1] <= rel_tol * s[0]:
            u, sv, vh = torch.linalg.svd(D[t], full_matrices=False)
            U[t], S[t], Vh[t] = u[:, :k], sv[:k], vh[:k]
            continue
        w = (q.transpose(0, 1) @ a) / s[:, None]              # k × long side: the other singular vectors
        if wide:
            U[t], Vh[t] = q, w
        else:
            U[t], Vh[t] = w.transpose(0, 1), q.transpose(0, 1)
        S[t] = s
    return U, S, Vh


def tsv_rank(m: int, n: int, T: int, min_rank: int = 0) -> int:
    """Triplets kept per task by TSV-M: ``max(min_rank, ⌊min(m, n) / T⌋)`` (methods §3; the text family's
    ``min_rank`` is 1, methods §8), never more than ``min(m, n)``."""
    return min(max(int(min_rank), int(min(m, n) / T)), min(m, n))


def tsv_merge_matrix(D: torch.Tensor, min_rank: int = 0) -> torch.Tensor:
    """TSV-M on one key: top-k SVD triplets of every task, blocks concatenated, factors orthogonalised.

    ``ΔW = polar(U_cat) · diag(s_cat) · polar(V_catᵀ)`` with ``k = tsv_rank(m, n, T, min_rank)``.
    """
    T, m, n = D.shape
    k = tsv_rank(m, n, T, min_rank)
    if k == 0:
        return torch.zeros(m, n, dtype=D.dtype, device=D.device)
    U, S, Vh = top_svd(D, k)                                     # T×m×k, T×k, T×k×n
    u_cat = U.permute(1, 0, 2).reshape(m, T * k)                # task blocks side by side
    s_cat = S.reshape(T * k)
    vt_cat = Vh.reshape(T * k, n)                               # task blocks stacked
    return (polar(u_cat) * s_cat) @ polar(vt_cat)


def iso_c_matrix(D: torch.Tensor) -> torch.Tensor:
    """Iso-C on one key: SVD of the sum ``Σ = U diag(σ) Vᵀ`` → ``mean(σ) U Vᵀ``."""
    return isotropic(D.sum(0))                                   # U Vᵀ (the polar factor of Σ) · mean σ


def iso_cts_dims(r: int, T: int, f: float) -> tuple[int, int]:
    """Iso-CTS sizes ``(kc, nt)``: common rank and per-task rank, with ``kc + T·nt = r`` (methods §4).

    ``kc = int(r f)``; ``s = round((r − kc)/T)·T``; ``kc = r − s``; ``nt = s/T``.
    Only when that would make ``kc`` negative (tiny r, many tasks) is ``nt``
    capped at ``r // T``.
    """
    kc = int(r * f)
    nt = min(round((r - kc) / T), r // T)
    return r - nt * T, nt


def iso_cts_matrix(D: torch.Tensor, f: float = 0.8) -> torch.Tensor:
    """Iso-CTS on one key: common subspace of the sum + top task-specific directions outside it, flat spectrum."""
    T, m, n = D.shape
    kc, nt = iso_cts_dims(min(m, n), T, f)
    Uc, Sc, Vhc = (x[0] for x in top_svd(D.sum(0)[None], kc))   # common: top-kc of Σt ΔWt
    us, ss, vs = [], [], []
    if nt > 0:
        resid = D - Uc @ (Uc.transpose(0, 1) @ D)                # ΔWt⊥ = ΔWt − Uc Ucᵀ ΔWt
        Ut, St, Vht = top_svd(resid, nt)
        us.append(Ut.permute(1, 0, 2).reshape(m, T * nt))
        ss.append(St.reshape(T * nt))
        vs.append(Vht.reshape(T * nt, n))
    U = torch.cat(us + [Uc], dim=1)                              # [task blocks…, common block]
    S = torch.cat(ss + [Sc])
    V = torch.cat(vs + [Vhc], dim=0)
    return (polar(U) * S.mean()) @ polar(V)


# ---------------------------------------------------------------------------
# The methods: walk the keys
# ---------------------------------------------------------------------------


def _per_key(ctx, alpha: float, matrix_fn, label: str) -> dict[str, torch.Tensor]:
    out = {}
    for key in ctx.walk(label):
        D = ctx.deltas(key)
        dw = matrix_fn(D) if ctx.roles[key] == MATRIX and D.ndim == 3 else D.mean(0)
        out[key] = (alpha * dw).to("cpu", torch.float32)
    return out


def tsv_key(cache: DecompositionCache, key: str, dfp: tuple, deltas, store: bool = True,
            min_rank: int = 0) -> torch.Tensor:
    """TSV-M's ΔW of one 2-D key (before α; float32, CPU) from ``cache`` when the task updates' fingerprints
    ``dfp`` (and ``min_rank``) match, else computed from ``deltas()`` and (``store``) kept. ESM merges its
    non-ESD 2-D keys the TSV-M way and keeps them under the same tag: either method reuses the other's."""
    fp = (dfp, int(min_rank))
    dw = cache.get_result(ResultKey("tsvm", key), fp)
    if dw is None:
        dw = tsv_merge_matrix(deltas(), min_rank).to("cpu", torch.float32)
        if store:
            cache.put_result(ResultKey("tsvm", key), fp, dw)
    return dw


def tsv_m(ctx, alpha: float) -> dict[str, torch.Tensor]:
    """TSV-M (Gargiulo et al. 2025): per-task singular vectors, decorrelated by polar factors.

    With ``ctx.cache`` (a :class:`DecompositionCache`), each 2-D key's ΔW is looked up there first (ESM keeps its
    non-ESD keys' TSV-M updates in it) and the keys ESM would not merge by ESD are stored for it: the model
    family's ESD layer types are left out (a model-sized copy nobody else reads)."""
    if not isinstance(ctx.cache, DecompositionCache):
        return _per_key(ctx, alpha, lambda D: tsv_merge_matrix(D, ctx.tsv_min_rank), "TSV-M")
    out, esd_types = {}, set(ctx.family_esd_types)
    for key in ctx.walk("TSV-M"):
        dfp, deltas = task_deltas(ctx, ctx.cache, key)
        if ctx.roles[key] == MATRIX and len(ctx.base[key].shape) == 2:
            dw = tsv_key(ctx.cache, key, dfp, deltas, store=ctx.layer_types.get(key) not in esd_types,
                         min_rank=ctx.tsv_min_rank)
        else:
            dw = deltas().mean(0)
        out[key] = (alpha * dw).to("cpu", torch.float32)
    return out


def iso_c(ctx, alpha: float) -> dict[str, torch.Tensor]:
    """Iso-C (Marczak et al. 2025): the task-arithmetic sum with a flat (isotropic) spectrum."""
    return _per_key(ctx, alpha, iso_c_matrix, "Iso-C")


def iso_cts(ctx, alpha: float, common_fraction: float) -> dict[str, torch.Tensor]:
    """Iso-CTS (Marczak et al. 2025): common + task-specific subspaces, flat spectrum."""
    return _per_key(ctx, alpha, lambda D: iso_cts_matrix(D, common_fraction), "Iso-CTS")


# ---------------------------------------------------------------------------
# Diagnostic: subspace alignment ratio (methods §4)
# ---------------------------------------------------------------------------


def energy_rank(merged: torch.Tensor, energy: float = 0.95) -> int:
    """Smallest k with ``sqrt(Σ_{i≤k} σi² / Σ σi²) > energy`` (0 for a zero matrix)."""
    s = torch.linalg.svdvals(merged.to(torch.float64))
    e = s.pow(2)
    tot = e.sum()
    if tot <= 0:
        return 0
    frac = torch.sqrt(torch.cumsum(e, 0) / tot)
    hits = (frac > energy).nonzero()
    return int(hits[0]) + 1 if hits.numel() else int(s.numel())


def subspace_alignment_ratio(delta_t: torch.Tensor, merged: torch.Tensor, energy: float = 0.95):
    """SAR of task matrix(es) against a merged matrix: ``‖U_k U_kᵀ ΔWt‖F / ‖ΔWt‖F``.

    ``U_k``: the top-k left singular vectors of ``merged``, k = :func:`energy_rank`.
    ``delta_t``: one task matrix (m × n) → a float, or a stack (T × m × n) → a
    list of floats. A zero task matrix gives NaN (no direction to align); a zero
    merged matrix gives 0. Computed in float64.
    """
    if merged.ndim != 2:
        raise ValueError(f"merged must be a 2-D matrix, got shape {tuple(merged.shape)}")
    if delta_t.shape[-2:] != merged.shape or delta_t.ndim not in (2, 3):
        raise ValueError(f"delta_t must be m×n or T×m×n with m×n = {tuple(merged.shape)}, got {tuple(delta_t.shape)}")
    M = merged.to(torch.float64)
    D = delta_t.to(M.device, torch.float64)
    k = energy_rank(M, energy)
    U = torch.linalg.svd(M, full_matrices=False)[0][:, :k]
    proj = U @ (U.transpose(0, 1) @ D)
    num = torch.linalg.matrix_norm(proj)
    den = torch.linalg.matrix_norm(D)
    ratio = torch.where(den > 0, num / den.clamp(min=torch.finfo(torch.float64).tiny),
                        torch.full_like(den, float("nan")))
    return float(ratio) if D.ndim == 2 else [float(x) for x in ratio]


# ---------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------

for _name, _fn in (("tsv_m", tsv_m), ("iso_c", iso_c), ("iso_cts", iso_cts)):
    register(Method(SPECS[_name], _fn))
