"""TSV-M, Iso-C, Iso-CTS and the subspace alignment ratio (esm_core/merging/svd.py)."""
from __future__ import annotations

import math

import pytest
import torch

from esm_core import merge_updates
from esm_core.merging.svd import (energy_rank, iso_c_matrix, iso_cts_dims, iso_cts_matrix, subspace_alignment_ratio,
                                  top_svd, tsv_merge_matrix)

M, V = "enc.layer.weight", "enc.layer.bias"


def pool(m=6, n=5, T=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {M: torch.randn(m, n, generator=g), V: torch.randn(n, generator=g)}
    tasks = {f"t{i}": {k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for i in range(T)}
    D = torch.stack([tasks[t][M] - base[M] for t in tasks]).double()
    return base, tasks, D


def polar64(x):
    u, _, vh = torch.linalg.svd(x.double(), full_matrices=False)
    return u @ vh


def close(a, b, tol=1e-4):
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)


# ---------------------------------------------------------------------------
# Top-k SVD through the Gram matrix
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 9, 5), (3, 5, 9), (2, 6, 6)])
def test_top_svd_matches_the_svd(shape):
    D = torch.randn(shape, generator=torch.Generator().manual_seed(11))
    k = 3
    U, s, Vh = top_svd(D, k)
    u, sv, vh = torch.linalg.svd(D.double(), full_matrices=False)
    close(s, sv[:, :k])
    close(U @ torch.diag_embed(s) @ Vh, u[:, :, :k] @ torch.diag_embed(sv[:, :k]) @ vh[:, :k])   # best rank-k part
    eye = torch.eye(k, dtype=torch.float64).expand(shape[0], k, k)
    close(U.transpose(1, 2).double() @ U.double(), eye)
    close(Vh.double() @ Vh.transpose(1, 2).double(), eye)


def test_top_svd_rank_deficient_falls_back_to_orthonormal_completion():
    a, b = torch.tensor([1.0, 2.0, 0.0, -1.0, 3.0]), torch.tensor([0.5, -1.0, 2.0, 1.0])
    D = torch.outer(a, b)[None]                                # rank 1, asked for 3 triplets
    U, s, Vh = top_svd(D, 3)
    close(s[0], torch.tensor([a.norm() * b.norm(), 0.0, 0.0]), tol=1e-5)
    close(U[0].T.double() @ U[0].double(), torch.eye(3, dtype=torch.float64))
    close(Vh[0].double() @ Vh[0].T.double(), torch.eye(3, dtype=torch.float64))
    close(U[0, :, :1] * s[0, 0] @ Vh[0, :1], D[0])


# ---------------------------------------------------------------------------
# TSV-M
# ---------------------------------------------------------------------------


def tsv_reference(D):
    """Straightforward TSV-M: loop over tasks, concatenate the top-k triplets, polar-orthogonalise."""
    T, m, n = D.shape
    k = int(min(m, n) / T)
    us, ss, vs = [], [], []
    for t in range(T):
        u, s, vh = torch.linalg.svd(D[t], full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k])
    return polar64(torch.cat(us, 1)) @ torch.diag(torch.cat(ss)) @ polar64(torch.cat(vs, 0)), torch.cat(ss)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tsv_m_matches_a_straightforward_reimplementation(seed):
    base, tasks, D = pool(seed=seed)
    ref, _ = tsv_reference(D)
    up = merge_updates("tsv_m", base, tasks, alpha=1.0)
    close(up[M], ref)
    up2 = merge_updates("tsv_m", base, tasks, alpha=0.7)
    close(up2[M], 0.7 * ref)


@pytest.mark.parametrize("T", [2, 3])
def test_tsv_m_rank_and_orthonormal_factors(T):
    """ΔW = P diag(s_cat) Q with orthonormal P, Q: its singular values are exactly s_cat, its rank T·k."""
    _, _, D = pool(T=T, seed=4)
    k = int(5 / T)
    dw = tsv_merge_matrix(D.float()).double()
    _, s_cat = tsv_reference(D)
    sv = torch.linalg.svdvals(dw)
    close(sv[:T * k], torch.sort(s_cat, descending=True).values)
    assert sv[T * k:].abs().max() < 1e-5                   # rank-k truncation per task respected
    assert int((sv > 1e-5).sum()) == T * k


def test_tsv_m_more_tasks_than_rank_gives_zero_matrix_update():
    base, tasks, _ = pool(m=6, n=5, T=6)
    up = merge_updates("tsv_m", base, tasks, alpha=1.0)
    assert torch.equal(up[M], torch.zeros(6, 5))


@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts"])
def test_non_matrix_keys_get_alpha_times_the_mean(method):
    base, tasks, _ = pool(T=3)
    up = merge_updates(method, base, tasks, alpha=1.7)
    mean = torch.stack([tasks[t][V] - base[V] for t in tasks]).mean(0)
    close(up[V], 1.7 * mean)


# ---------------------------------------------------------------------------
# Iso-C
# ---------------------------------------------------------------------------


def test_iso_c_flat_spectrum_equal_to_mean_singular_value_of_the_sum():
    base, tasks, D = pool(m=7, n=5, T=3, seed=5)
    up = merge_updates("iso_c", base, tasks, alpha=1.0)[M].double()
    sigma = torch.linalg.svdvals(D.sum(0))
    sv = torch.linalg.svdvals(up)
    close(sv, torch.full_like(sv, float(sigma.mean())))
    close(polar64(up), polar64(D.sum(0)))                  # same singular vectors as the sum
    close(merge_updates("iso_c", base, tasks, alpha=2.0)[M], 2.0 * up)


# ---------------------------------------------------------------------------
# Iso-CTS
# ---------------------------------------------------------------------------


def test_iso_cts_dims():
    assert iso_cts_dims(768, 8, 0.8) == (616, 19)       # int(614.4) = 614; round(154/8) = 19 → 152 task dims
    assert iso_cts_dims(10, 3, 0.5) == (4, 2)           # round(5/3) = 2 → 6 task dims
    assert iso_cts_dims(10, 2, 1.0) == (10, 0)
    assert iso_cts_dims(5, 3, 0.0) == (2, 1)            # round(5/3)·3 = 6 > 5: capped at r // T
    for r, T, f in ((768, 8, 0.8), (3072, 20, 0.3), (50, 14, 0.9), (7, 2, 0.0)):
        kc, nt = iso_cts_dims(r, T, f)
        assert kc >= 0 and nt >= 0 and kc + T * nt == r


def iso_cts_reference(D, f):
    T, m, n = D.shape
    kc, nt = iso_cts_dims(min(m, n), T, f)
    u, s, vh = torch.linalg.svd(D.sum(0), full_matrices=False)
    uc, sc, vc = u[:, :kc], s[:kc], vh[:kc]
    us, ss, vs = [], [], []
    for t in range(T):
        r = D[t] - uc @ uc.T @ D[t]
        ut, st, vt = torch.linalg.svd(r, full_matrices=False)
        us.append(ut[:, :nt])
        ss.append(st[:nt])
        vs.append(vt[:nt])
    U, S, Vh = torch.cat(us + [uc], 1), torch.cat(ss + [sc]), torch.cat(vs + [vc], 0)
    return polar64(U) * S.mean() @ polar64(Vh), uc, us


def test_iso_cts_matches_reference_flat_spectrum_and_common_subspace_in_span():
    base, tasks, D = pool(m=12, n=10, T=3, seed=6)
    f = 0.5
    up = merge_updates("iso_cts", base, tasks, alpha=1.0, common_fraction=f)[M].double()
    ref, uc, us = iso_cts_reference(D, f)
    close(up, ref)
    sv = torch.linalg.svdvals(up)
    assert sv.numel() == 10
    close(sv, torch.full_like(sv, float(sv.mean())))       # flat spectrum: orthonormal factors, equal weights
    # the column space of ΔW (10 of 12 dimensions) holds the common and the task-specific directions
    q = torch.linalg.svd(up, full_matrices=False)[0]
    proj = q @ q.T
    assert uc.shape[1] == 4
    assert (uc - proj @ uc).norm() < 1e-5
    for u_t in us:
        assert (u_t - proj @ u_t).norm() < 1e-5
    # a random direction is not in it (the check above can fail)
    x = torch.randn(12, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert (x - proj @ x).norm() > 1e-2


def test_iso_cts_f1_is_iso_c():
    _, _, D = pool(m=6, n=5, T=2, seed=8)
    close(iso_cts_matrix(D.float(), 1.0), iso_c_matrix(D.float()))


# ---------------------------------------------------------------------------
# Subspace alignment ratio
# ---------------------------------------------------------------------------


def test_energy_rank():
    assert energy_rank(torch.diag(torch.tensor([4.0, 3.0, 0.0]))) == 2      # sqrt(16/25) = 0.8 ≤ 0.95
    assert energy_rank(torch.diag(torch.tensor([10.0, 1.0, 0.0]))) == 1     # sqrt(100/101) > 0.95
    assert energy_rank(torch.zeros(3, 3)) == 0


def test_subspace_alignment_ratio():
    merged = torch.diag(torch.tensor([10.0, 1.0, 0.0]))                  # kM = 1, U = e1
    delta = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 0, 0]])
    assert subspace_alignment_ratio(delta, merged) == pytest.approx(1 / math.sqrt(2))
    assert subspace_alignment_ratio(torch.diag(torch.tensor([2.0, 0, 0])), merged) == pytest.approx(1.0)
    assert subspace_alignment_ratio(torch.diag(torch.tensor([0.0, 0, 5.0])), merged) == pytest.approx(0.0)
    stack = torch.stack([delta, torch.diag(torch.tensor([0.0, 3.0, 0]))])
    assert subspace_alignment_ratio(stack, merged) == pytest.approx([1 / math.sqrt(2), 0.0])
    assert subspace_alignment_ratio(delta, torch.zeros(3, 3)) == 0.0
    assert math.isnan(subspace_alignment_ratio(torch.zeros(3, 3), merged))
    with pytest.raises(ValueError, match="m×n"):
        subspace_alignment_ratio(torch.zeros(2, 3), merged)


def test_sar_of_task_arithmetic_is_high_for_its_own_tasks():
    """Each task matrix lies in the span of the TA sum when there are as many directions as needed."""
    _, _, D = pool(m=8, n=8, T=2, seed=9)
    ratios = subspace_alignment_ratio(D, D.sum(0))
    assert all(0.5 < r <= 1.0 + 1e-9 for r in ratios)
