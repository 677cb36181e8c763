import pytest
import torch

from esm_core.merging import cache as cache_mod, esd as esd_mod, kernels, polar as polar_mod
from esm_core.merging.cache import DecompositionCache, EsdKey, ResultKey, fingerprint
from esm_core.merging.esd import Esd, esd, esd_truncate
from esm_core.merging.polar import polar, polar_and_singular_values, polar_svd


def _rand(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


@pytest.mark.parametrize("shape", [(7, 7), (12, 5), (5, 12), (30, 1)])
def test_polar_matches_svd_route(shape):
    x = _rand(*shape, seed=1)
    f = polar(x)
    torch.testing.assert_close(f, polar_svd(x), rtol=0, atol=1e-10)
    m, n = shape
    eye = torch.eye(min(m, n), dtype=x.dtype)
    gram = f.mT @ f if m >= n else f @ f.mT
    torch.testing.assert_close(gram, eye, rtol=0, atol=1e-12)


def test_polar_singular_values_and_float32():
    x = _rand(9, 4, seed=2)
    _, s = polar_and_singular_values(x)
    torch.testing.assert_close(s, torch.linalg.svdvals(x), rtol=1e-12, atol=0)
    x32 = x.float()
    f32 = polar(x32)
    assert f32.dtype == torch.float32
    torch.testing.assert_close(f32, polar_svd(x).float(), rtol=0, atol=1e-5)


def test_polar_ill_conditioned_and_rank_deficient_fall_back(monkeypatch):
    # condition number 1e7: the Gram route would lose ~half the digits; the fall-back must be exact
    u = torch.linalg.qr(_rand(10, 4, seed=3))[0]
    v = torch.linalg.qr(_rand(4, 4, seed=4))[0]
    x = u @ torch.diag(torch.tensor([1.0, 1e-2, 1e-4, 1e-7], dtype=torch.float64)) @ v.mT
    torch.testing.assert_close(polar(x), u @ v.mT, rtol=0, atol=1e-9)
    # rank deficient (a zero column): the polar factor is the SVD's (reference) one
    y = _rand(8, 3, seed=5)
    y[:, 1] = 0
    torch.testing.assert_close(polar(y), polar_svd(y), rtol=0, atol=1e-12)
    _, s = polar_and_singular_values(y)
    assert s[-1].abs() < 1e-12 and s.shape == (3,)


def test_polar_refuses_non_matrix():
    with pytest.raises(ValueError, match="2-D"):
        polar(torch.ones(3))


def _esd_case(d_out=6, d_in=4, N=20, seed=0):
    X = _rand(N, d_in, seed=seed)
    W = _rand(d_out, d_in, seed=seed + 1)
    return X, W, X.mT @ X


@pytest.mark.parametrize("d_out,d_in,N", [(4, 6, 20), (6, 4, 20), (9, 3, 2), (5, 5, 3)])
def test_esd_eigenvalues_are_output_shift_singular_values(d_out, d_in, N):
    X, W, G = _esd_case(d_out, d_in, N, seed=d_out)
    P, lam, _ = esd(W, G, N)
    s = torch.linalg.svdvals(X @ W.mT)                      # ΔO = X ΔWᵀ
    expect = torch.zeros(d_out, dtype=torch.float64)
    expect[: s.numel()] = s.square() / (N - 1)
    torch.testing.assert_close(lam, expect, rtol=1e-9, atol=1e-12)
    assert P.shape == (d_out, d_out)
    torch.testing.assert_close(P.mT @ P, torch.eye(d_out, dtype=torch.float64), rtol=0, atol=1e-10)
    assert bool((lam[:-1] >= lam[1:]).all()) and bool((lam >= 0).all())
    # P's columns are eigenvectors of ΔW G ΔWᵀ with eigenvalues λ (N − 1)
    C = W @ G @ W.mT
    torch.testing.assert_close(C @ P, P * (lam * (N - 1)), rtol=0, atol=1e-8 * float(C.norm()))


def test_esd_columns_option_returns_leading_columns():
    X, W, G = _esd_case(7, 3, 10)
    P, lam, _ = esd(W, G, 10)
    for c in (2, 3, 5):
        Pc, lc, _ = esd(W, G, 10, columns=c)
        assert Pc.shape == (7, c)
        torch.testing.assert_close(lc, lam)
        torch.testing.assert_close(Pc @ Pc.mT @ W, P[:, :c] @ P[:, :c].mT @ W, rtol=0, atol=1e-10)


def test_esd_truncation_is_the_best_output_fit():
    X, W, G = _esd_case(8, 6, 30, seed=7)
    P, _, _ = esd(W, G, 30)
    U, S, Vh = torch.linalg.svd(W)
    for k in (1, 2, 4):
        e_esd = torch.linalg.matrix_norm(X @ (W - esd_truncate(W, P, k)).mT)
        w_svd = (U[:, :k] * S[:k]) @ Vh[:k]
        e_svd = torch.linalg.matrix_norm(X @ (W - w_svd).mT)
        assert e_esd < e_svd * (1 - 1e-6)             # strictly better on a generic case
        # and it equals the optimum: the tail singular values of ΔO
        s = torch.linalg.svdvals(X @ W.mT)
        torch.testing.assert_close(e_esd, s[k:].square().sum().sqrt(), rtol=1e-9, atol=0)


def test_esd_refuses_bad_inputs():
    W = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="Gram matrix must be 4×4"):
        esd(W, torch.eye(3), 10)
    with pytest.raises(ValueError, match="at least 2"):
        esd(W, torch.eye(4), 1)
    with pytest.raises(ValueError, match="2-D"):
        esd(torch.zeros(3), torch.eye(3), 5)


def test_fingerprint_sees_changes():
    x = _rand(5, 5)
    assert fingerprint(x) == fingerprint(x.clone())
    y = x.clone()
    y[4, 4] += 1e-3
    assert fingerprint(x) != fingerprint(y)
    assert fingerprint(x) != fingerprint(x.reshape(25))


def test_cache_reuses_and_refreshes(monkeypatch):
    calls = []
    real = cache_mod.esd

    def counting(*a, **kw):
        calls.append(kw.get("columns"))
        return real(*a, **kw)

    monkeypatch.setattr(cache_mod, "esd", counting)
    X, W, G = _esd_case(9, 3, 10)
    c = DecompositionCache()
    e1 = c.esd("a", "w", W, G, 10, k=2)
    assert e1.P.shape == (9, 3) and not e1.complete     # structural rank min(d_in, n) = 3 columns kept
    assert c.esd("a", "w", W, G, 10, k=3) is e1 and len(calls) == 1 and c.esd_hits == 1
    e2 = c.esd("a", "w", W, G, 10, k=5)                  # more columns than stored: recomputed
    assert e2.P.shape == (9, 5) and len(calls) == 2
    torch.testing.assert_close(e2.P[:, :3], e1.P)
    W2 = W.clone()
    W2[0, 0] += 1.0                                      # changed task matrix: never silently reused
    c.esd("a", "w", W2, G, 10, k=2)
    assert len(calls) == 3
    c.esd("a", "w", W2, G * 2, 10, k=2)                  # changed statistics
    assert len(calls) == 4 and c.esd_calls == 4
    capped = DecompositionCache(max_columns=1)
    assert capped.esd("a", "w", W, G, 10, k=2).P.shape == (9, 2)


# ---------------------------------------------------------------------------
# Fast routes against the exact ones (issue 13): stated tolerances, ill-conditioned and rank-deficient cases
# ---------------------------------------------------------------------------

from esm_core.merging.esd import esd_exact, gram_factor  # noqa: E402
from esm_core.merging.polar import POLAR_TOL  # noqa: E402


def _with_spectrum(m, n, svals, seed):
    u = torch.linalg.qr(_rand(m, len(svals), seed=seed))[0]
    v = torch.linalg.qr(_rand(n, len(svals), seed=seed + 1))[0]
    return u @ torch.diag(torch.tensor(svals, dtype=torch.float64)) @ v.mT


@pytest.mark.parametrize("cond", [1e3, 1e5, 3e5, 1e6, 3e6, 1e7])
def test_polar_gram_route_within_its_tolerance_when_ill_conditioned(cond):
    # cond 1e5 / 3e5: below fd9a028's σ-ratio test (1e-5) the SVD ran; now the Gram route is accepted when its
    # estimated relative Frobenius error ≤ POLAR_TOL (1e-6) and must then be that close to the SVD's factor
    n = 40
    svals = torch.logspace(0, -float(torch.log10(torch.tensor(cond))), n).tolist()
    x = _with_spectrum(60, n, svals, seed=11)
    f, s = polar_and_singular_values(x)
    ref = polar_svd(x)
    assert float((f - ref).norm() / ref.norm()) < POLAR_TOL
    torch.testing.assert_close(s, torch.linalg.svdvals(x), rtol=0, atol=1e-10)     # absolute: eps · σ_max
    x32 = x.float()                              # float32 out: z Qᵀ in float32, still close (to the rounded input's)
    ref32 = polar_svd(x32.double())
    assert float((polar(x32).double() - ref32).norm() / ref32.norm()) < 1e-6


def test_polar_float32_output_of_a_float64_input():
    x = _rand(30, 12, seed=12)
    f, s = polar_and_singular_values(x, torch.float32)
    assert f.dtype == torch.float32 and s.dtype == torch.float32
    assert float((f.double() - polar_svd(x)).norm() / polar_svd(x).norm()) < 1e-6


def _subspace_gap(P, Q):
    """‖P Pᵀ − Q Qᵀ‖F / √k: 0 for the same span (sign and degenerate-rotation free)."""
    return float((P @ P.mT - Q @ Q.mT).norm()) / max(P.shape[1], 1) ** 0.5


@pytest.mark.parametrize("d_out,d_in,N", [(12, 5, 30), (12, 5, 4), (5, 12, 30), (5, 12, 8), (9, 9, 9)])
@pytest.mark.parametrize("form", ["gram", "rows"])
def test_fast_esd_equals_exact_route(d_out, d_in, N, form):
    X, W, G = _esd_case(d_out, d_in, N, seed=d_out + d_in + N)
    r = min(d_out, d_in, N)
    kw = {"factor": X.mT} if form == "rows" else {}
    for c in sorted({1, r // 2, r}):
        if c < 1:
            continue
        P, lam, _ = esd(W, G if form == "gram" else None, N, columns=c, **kw)
        Pe, le = esd_exact(W, G, N, columns=c)
        assert P.shape == (d_out, c)
        torch.testing.assert_close(lam, le, rtol=1e-9, atol=1e-9 * float(le[0]))
        # stated bound: a column's error ≲ eps64 / ESD_GRAM_RCOND ≈ 2e-8 (else the exact route runs)
        torch.testing.assert_close(P.mT @ P, torch.eye(c, dtype=torch.float64), rtol=0, atol=1e-7)
        for j in range(1, c + 1):                  # every leading span (gaps are generic here)
            assert _subspace_gap(P[:, :j], Pe[:, :j]) < 1e-7, (c, j)
        _, _, A = esd(W, G if form == "gram" else None, N, columns=c, coords=True, **kw)
        torch.testing.assert_close(A, P.mT @ W, rtol=0, atol=1e-9 * float(W.norm()))


def test_fast_esd_ill_conditioned_and_rank_deficient():
    # output shift with singular values spanning 1e6 (λ spans 1e12): the asked columns are still exact
    X = _with_spectrum(50, 10, torch.logspace(0, -3, 10).tolist(), seed=21)
    W = _with_spectrum(14, 10, torch.logspace(0, -3, 10).tolist(), seed=23)
    G = X.mT @ X
    for c in (3, 6):
        P, lam, _ = esd(W, G, 50, columns=c)
        Pe, le = esd_exact(W, G, 50, columns=c)
        torch.testing.assert_close(lam, le, rtol=1e-6, atol=1e-12 * float(le[0]))
        assert _subspace_gap(P, Pe) < 1e-6
    # rank-deficient task matrix (rank 3 < d_in): columns beyond the rank fall back to the exact route
    Wd = _rand(14, 3, seed=24) @ _rand(3, 10, seed=25)
    P, lam, _ = esd(Wd, G, 50, columns=6)
    Pe, le = esd_exact(Wd, G, 50, columns=6)
    assert P.shape == (14, 6)
    torch.testing.assert_close(P.mT @ P, torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-10)
    assert _subspace_gap(P[:, :3], Pe[:, :3]) < 1e-8
    assert float(lam[3:].abs().max()) < 1e-9 * float(lam[0])
    # singular Gram (fewer rows than inputs): the factor falls back from Cholesky to eigh
    Xs = _rand(4, 10, seed=26)
    L = gram_factor(Xs.mT @ Xs)
    torch.testing.assert_close(L @ L.mT, Xs.mT @ Xs, rtol=0, atol=1e-10)
    P, lam, _ = esd(W, Xs.mT @ Xs, 4, columns=3)
    Pe, le = esd_exact(W, Xs.mT @ Xs, 4, columns=3)
    assert _subspace_gap(P, Pe) < 1e-8


@pytest.mark.parametrize("form", ["gram", "rows"])
def test_esd_exact_fallback_uses_the_factor_in_hand(form, monkeypatch):
    # the output shift's λ spans 1e12 (real probe statistics: cond(G) 1e10-1e14) and every column is asked, so the
    # Gram route's trailing columns are not trusted: the thin SVD of ΔW·L runs, from the Cholesky factor (dtrmm) or
    # the rows (fewer than inputs), with no eigendecomposition of G (esd_exact's route) — and equals esd_exact
    dec = esd_mod
    N = 50 if form == "gram" else 8                    # rows: 8 < d_in = 10, the factor is Xᵀ (rank 8)
    X = _with_spectrum(N, 10, torch.logspace(0, -4, min(N, 10)).tolist(), seed=31)
    W = _with_spectrum(14, 10, torch.logspace(0, -3, 10).tolist(), seed=33)
    G = X.mT @ X
    r = min(N, 10)
    ref = {c: esd_exact(W, G, N, columns=c) for c in (r, 12)}
    svds = []
    real_svd = torch.linalg.svd
    monkeypatch.setattr(dec, "esd_exact", lambda *a, **k: pytest.fail("esd_exact's eigh of G ran"))
    monkeypatch.setattr(dec.torch.linalg, "svd", lambda m, **k: svds.append(tuple(m.shape)) or real_svd(m, **k))
    for c in (r, 12):                                  # 12 > rank: completed columns with λ = 0
        kw = {"factor": X.mT} if form == "rows" else {}
        P, lam, A = esd(W, G if form == "gram" else None, N, columns=c, coords=True, **kw)
        Pe, le = ref[c]
        assert P.shape == (14, c)
        torch.testing.assert_close(lam, le, rtol=1e-6, atol=1e-13 * float(le[0]))
        torch.testing.assert_close(P.mT @ P, torch.eye(c, dtype=torch.float64), rtol=0, atol=1e-12)
        for j in range(1, r + 1):                      # every leading span within the rank (both: eps·σ_max/gap)
            assert _subspace_gap(P[:, :j], Pe[:, :j]) < 1e-7, (c, j)
        torch.testing.assert_close(A, P.mT @ W, rtol=0, atol=1e-12)
    assert svds == [(14, r)] * 2


@pytest.mark.parametrize("form", ["tall-gram", "tall-rows", "wide-rows"])
def test_esd_with_shared_products_is_the_same(form):
    # the Spectra view hands esd() the ΔWᵀΔW / ΔW G ΔWᵀ it forms for the SVD spectrum: bit-identical results
    from esm_core.merging.kernels import gram as gram_of
    d_out, d_in, N = {"tall-gram": (14, 6, 30), "tall-rows": (14, 10, 8), "wide-rows": (6, 14, 10)}[form]
    X, W, G = _esd_case(d_out, d_in, N, seed=51)
    kw = {} if form == "tall-gram" else {"factor": X.mT}
    pre = ({"wtw": gram_of(W)} if form.startswith("tall") else {"shift_gram": gram_of((W @ X.mT).mT)})
    a = esd(W, G if form == "tall-gram" else None, N, columns=4, coords=True, **kw)
    b = esd(W, G if form == "tall-gram" else None, N, columns=4, coords=True, **kw, **pre)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    with pytest.raises(ValueError, match="must be"):
        bad = {k: v[:-1] for k, v in pre.items()}
        esd(W, G if form == "tall-gram" else None, N, columns=4, **kw, **bad)


def test_times_l_is_the_product_with_a_lower_triangular_factor():
    from esm_core.merging.kernels import times_l as _times_l, trmm_ok as _trmm_ok
    L = torch.linalg.cholesky(_rand(30, 7, seed=41).mT @ _rand(30, 7, seed=41))
    X = _rand(5, 7, seed=42)
    if not _trmm_ok(L, X):
        pytest.skip("SciPy's BLAS is not installed")
    torch.testing.assert_close(_times_l(X, L), X @ L, rtol=0, atol=1e-13)
    torch.testing.assert_close(_times_l(X.mT.contiguous().mT, L), X @ L, rtol=0, atol=1e-13)   # a strided X


def test_cache_keeps_coordinates_and_at_most_keep_columns():
    X, W, G = _esd_case(9, 6, 30)
    c = DecompositionCache()
    e = c.esd("a", "w", W, G, 30, k=2, keep=3, coords=True)
    assert e.P.shape == (9, 3) and e.A.shape == (3, 6) and e.A.dtype == torch.float32
    torch.testing.assert_close(e.A.double(), e.P.double().mT @ W, rtol=1e-5, atol=1e-6)
    assert c.nbytes == e.nbytes > 0
    assert c.lookup("a", "w", e.fp, 3) is e and c.lookup("a", "w", e.fp, 4) is None
    # the rows as the factor give the same decomposition
    e2 = DecompositionCache().esd("a", "w", W, None, 30, k=3, gram_fp=("rows",), factor=X.mT, coords=True)
    assert _subspace_gap(e2.P[:, :3].double(), e.P.double()) < 1e-6


def test_polar_measured_defect_decides_between_the_routes():
    # a priori estimate above POLAR_TOL: the probed orthogonality defect decides; the result meets POLAR_TOL
    x = _with_spectrum(80, 50, torch.logspace(0, -6, 50).tolist(), seed=31)
    mu = torch.linalg.eigvalsh(x.mT @ x)
    assert polar_mod.POLAR_TOL < polar_mod._gram_route_estimate(mu) <= polar_mod.POLAR_GIVE_UP
    f = polar(x)
    ref = polar_svd(x)
    assert float((f - ref).norm() / ref.norm()) < POLAR_TOL
    assert polar_mod.orthogonality_defect(polar_svd(x)) < 1e-13 and polar_mod.orthogonality_defect(x) > 0.1


# ---------------------------------------------------------------------------
# The CPU BLAS / LAPACK routes (dsyrk, syevd, syevr subset, dtrmm) against plain torch, at sizes that take them
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["C", "F", "strided"])
@pytest.mark.parametrize("m,n", [(300, 70), (40, 300), (700, 513)])
def test_gram_by_syrk_equals_the_product_and_is_exactly_symmetric(m, n, order):
    x = _with_spectrum(m, n, torch.logspace(0, -8, min(m, n)).tolist(), seed=m + n)   # ill-conditioned
    if order == "F":
        x = x.mT.contiguous().mT
    elif order == "strided":
        x = _rand(m, 2 * n, seed=3)[:, ::2]
    assert n >= kernels.GRAM_SYRK_MIN
    g = kernels.gram(x)
    ref = x.mT @ x
    assert torch.equal(g, g.mT)
    assert float((g - ref).abs().max()) <= 1e-14 * float(ref.abs().max())


@pytest.mark.parametrize("spectrum", ["generic", "ill", "rank_deficient"])
def test_eigh64_routes_equal_torch(spectrum):
    n = 300                                                     # ≥ EIGH_SCIPY_MIN: LAPACK syevd / syevr
    assert n >= kernels.EIGH_SCIPY_MIN
    if spectrum == "generic":
        a = _rand(n, n, seed=41)
        g = a @ a.mT
    elif spectrum == "ill":
        g = _with_spectrum(n, n, torch.logspace(0, -12, n).tolist(), seed=42)
        g = (g @ g.mT + (g @ g.mT).mT) / 2
    else:
        a = _rand(n, 40, seed=43)
        g = a @ a.mT                                            # rank 40
    w, v = kernels.eigh64(g)
    w_ref = torch.linalg.eigvalsh(g)
    scale = float(w_ref.abs().max())
    torch.testing.assert_close(w, w_ref, rtol=0, atol=1e-12 * scale)
    torch.testing.assert_close(v.mT @ v, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(g @ v, v * w, rtol=0, atol=1e-12 * scale)
    top = 40
    wt, vt = kernels.eigh64(g, top=top)                       # only the largest pairs (syevr subset)
    assert wt.shape == (top,) and vt.shape == (n, top)
    torch.testing.assert_close(wt, w_ref[-top:], rtol=0, atol=1e-12 * scale)
    torch.testing.assert_close(g @ vt, vt * wt, rtol=0, atol=1e-12 * scale)
    assert _subspace_gap(vt[:, -10:], v[:, -10:]) < 1e-9        # a well separated leading span


@pytest.mark.parametrize("case", ["generic", "ill_gram", "rank_deficient"])
def test_esd_cholesky_dtrmm_route_equals_the_general_products_and_the_exact_route(case, monkeypatch):
    d_out, d_in, N = 400, 270, 600
    if case == "ill_gram":                                      # inputs spanning 1e4 (Gram 1e8)
        X = _rand(N, d_in, seed=51) * torch.logspace(0, -4, d_in, dtype=torch.float64)
    else:
        X = _rand(N, d_in, seed=51)
    W = _rand(d_out, 20, seed=52) @ _rand(20, d_in, seed=53) if case == "rank_deficient" else _rand(d_out, d_in, seed=52)
    G = X.mT @ X
    c = 20 if case == "rank_deficient" else 150
    used = []
    real = esd_mod.lt_s_l
    monkeypatch.setattr(esd_mod, "lt_s_l", lambda *a: (used.append(1), real(*a))[1])
    P1, l1, A1 = esd(W, G, N, columns=c, coords=True)
    assert used == [1]                                          # the dtrmm route ran (Cholesky factor of G)
    monkeypatch.setattr(esd_mod, "trmm_ok", lambda *a: False)
    P0, l0, A0 = esd(W, G, N, columns=c, coords=True)
    torch.testing.assert_close(l1, l0, rtol=0, atol=1e-11 * float(l0[0]))
    for j in (1, c // 2, c):
        assert _subspace_gap(P1[:, :j], P0[:, :j]) < 1e-8, j
    Pe, le = esd_exact(W, G, N, columns=c)
    torch.testing.assert_close(l1, le, rtol=0, atol=1e-9 * float(le[0]))
    assert _subspace_gap(P1, Pe) < 1e-7
    torch.testing.assert_close(A1, P1.mT @ W, rtol=0, atol=1e-9 * float(W.norm()))


def test_top_svd_with_the_leading_eigenpairs_only_equals_the_svd():
    from esm_core.merging.svd import top_svd
    D = torch.stack([_with_spectrum(300, 280, torch.logspace(0, -3, 280).tolist(), seed=61 + t) for t in range(2)])
    k = 50                                                      # ≤ 280 / 4: the syevr subset route
    U, S, Vh = top_svd(D, k)
    u, s, vh = torch.linalg.svd(D)
    torch.testing.assert_close(S, s[:, :k], rtol=1e-10, atol=0)
    torch.testing.assert_close(U @ torch.diag_embed(S) @ Vh, u[..., :k] @ torch.diag_embed(s[:, :k]) @ vh[:, :k],
                               rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------
# Polar factor by Newton–Schulz products (the CUDA route)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("cond", [1.0, 10.0, 1e3, 1e5, 1e7])
@pytest.mark.parametrize("shape", [(60, 40), (40, 60), (50, 50)])
def test_newton_schulz_polar_equals_the_svd_route_when_ill_conditioned(cond, shape):
    from esm_core.merging.polar import NS_MAX_ITER, polar_newton_schulz
    n = min(shape)
    svals = torch.logspace(0, -float(torch.log10(torch.tensor(cond))), n).tolist()
    x = _with_spectrum(*shape, svals, seed=21) * 7.0
    q, smean, steps = polar_newton_schulz(x)
    ref = polar_svd(x)
    # stated: relative Frobenius error ≈ 0.4 · NS_DEFECT² plus rounding ~ eps64 · cond (cond ≤ 1e7: < 1e-8)
    assert float((q - ref).norm() / ref.norm()) < 1e-8
    assert float(smean) == pytest.approx(float(torch.linalg.svdvals(x).mean()), rel=1e-8)
    assert 1 <= steps <= NS_MAX_ITER
    assert steps <= 12 + 2 * float(torch.log10(torch.tensor(cond))) + 2      # ≈ 12 + log(cond)/log(2.6)
    iso, gram_iso = polar_mod.isotropic(x, route="newton_schulz"), polar_mod.isotropic(x, route="gram")
    assert float((iso - gram_iso).norm() / gram_iso.norm()) < POLAR_TOL        # the Gram route's own tolerance


def test_newton_schulz_declines_what_it_cannot_do_and_isotropic_takes_the_exact_route():
    from esm_core.merging.polar import polar_newton_schulz
    deficient = _with_spectrum(40, 30, [1.0] * 20 + [0.0] * 10, seed=22)      # rank 20 of 30
    assert polar_newton_schulz(deficient) is None
    torch.testing.assert_close(polar_mod.isotropic(deficient, route="newton_schulz"),
                               polar_mod.isotropic(deficient, route="gram"), rtol=0, atol=0)
    assert polar_newton_schulz(torch.zeros(5, 3, dtype=torch.float64)) is None
    bad = _rand(6, 4, seed=23)
    bad[2, 1] = float("nan")
    assert polar_newton_schulz(bad) is None
    assert polar_newton_schulz(_rand(6, 0, seed=24)) is None
    huge = _with_spectrum(30, 30, torch.logspace(0, -12, 30).tolist(), seed=25)   # cond 1e12: beyond its reach
    assert polar_newton_schulz(huge) is None
    with pytest.raises(ValueError, match="2-D"):
        polar_newton_schulz(torch.ones(3))
    with pytest.raises(ValueError, match="unknown polar route 'qr'"):
        polar_mod.isotropic(_rand(4, 3), route="qr")


def test_newton_schulz_float32_input_and_output():
    x = _rand(30, 12, seed=26)
    iso = polar_mod.isotropic(x.float(), route="newton_schulz")
    assert iso.dtype == torch.float32
    ref = polar_mod.isotropic(x.float().double(), route="gram")
    assert float((iso.double() - ref).norm() / ref.norm()) < 1e-6


def test_polar_route_per_device():
    assert polar_mod.polar_route("cpu") == "gram"
    assert polar_mod.polar_route(torch.device("cuda")) == "newton_schulz"
    assert polar_mod.polar_route("cuda:1") == "newton_schulz"
    assert polar_mod.polar_route("meta") == "gram"


def test_esd_completion_beyond_the_rank_is_orthonormal_and_reproducible():
    """Columns asked beyond rank(ΔW G ΔWᵀ) (λ = 0) complete P to an orthonormal set without a d × d QR factor."""
    from esm_core.merging.esd import completion as _completion
    X = _rand(50, 10, seed=31)
    W = _rand(30, 10, seed=32)
    P, lam, _ = esd(W, X.mT @ X, 50, columns=18)                 # rank 10: 8 completion columns
    assert P.shape == (30, 18)
    torch.testing.assert_close(P.mT @ P, torch.eye(18, dtype=torch.float64), rtol=0, atol=1e-12)
    assert float(lam[10:].abs().max()) == 0.0
    Pe, _ = esd_exact(W, X.mT @ X, 50, columns=10)
    assert _subspace_gap(P[:, :10], Pe) < 1e-10                # the first 10 are the exact ESD's
    P2, _, _ = esd(W, X.mT @ X, 50, columns=18)
    assert torch.equal(P, P2)                                  # seeded: the same completion every time
    C = _completion(P[:, :10], 20)                             # the whole complement
    torch.testing.assert_close(torch.cat([P[:, :10], C], 1).mT @ torch.cat([P[:, :10], C], 1),
                               torch.eye(30, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("form", ["gram", "rows"])
def test_esd_need_keeps_the_trusted_leading_columns_without_the_svd(form, monkeypatch):
    """With ``need``, an ESD whose trailing columns the Gram route cannot give to ~1e-8 returns the leading ones it
    can (at least ``need``, each equal to the exact route's), with no SVD; asking more than it trusts runs the SVD.
    The cache keeps such a shorter entry (not complete) and decomposes again, exactly, for a larger rank."""
    dec = esd_mod
    N = 50 if form == "gram" else 8
    X = _with_spectrum(N, 10, torch.logspace(0, -4, min(N, 10)).tolist(), seed=31)
    W = _with_spectrum(14, 10, torch.logspace(0, -3, 10).tolist(), seed=33)
    G = X.mT @ X
    r = min(N, 10)
    kw = {"factor": X.mT} if form == "rows" else {}
    g = None if form == "rows" else G
    Pe, le = esd_exact(W, G, N, columns=r)
    svds = []
    real_svd = torch.linalg.svd
    monkeypatch.setattr(dec.torch.linalg, "svd", lambda m, **k: svds.append(tuple(m.shape)) or real_svd(m, **k))
    P, lam, A = esd(W, g, N, columns=r, coords=True, need=2, **kw)
    assert svds == []
    t = P.shape[1]
    mu = le * (N - 1)
    assert 2 <= t < r and t == int((mu[:r] > esd_mod.ESD_GRAM_RCOND * mu[0]).sum())   # the trusted run, no more
    torch.testing.assert_close(lam, le, rtol=1e-6, atol=1e-13 * float(le[0]))
    torch.testing.assert_close(P.mT @ P, torch.eye(t, dtype=torch.float64), rtol=0, atol=1e-10)
    for j in range(1, t + 1):
        assert _subspace_gap(P[:, :j], Pe[:, :j]) < 1e-7, j
    torch.testing.assert_close(A, P.mT @ W, rtol=0, atol=1e-12)
    esd(W, g, N, columns=r, need=t + 1, **kw)          # more than it trusts: the exact route
    assert svds == [(14, r)]
    # the cache: a rank within the trusted run is served by the short entry; a larger one decomposes again
    cache = DecompositionCache()
    fkw = {"factor": X.mT, "gram_fp": ("rows",)} if form == "rows" else {}
    e = cache.esd("a", "k", W, g, N, k=2, keep=r, **fkw)
    assert e.P.shape[1] == t and not e.complete and len(svds) == 1
    assert cache.lookup("a", "k", e.fp, t) is e and cache.lookup("a", "k", e.fp, t + 1) is None
    e2 = cache.esd("a", "k", W, g, N, k=t + 1, keep=r, **fkw)
    assert e2.P.shape[1] == r and len(svds) == 2 and cache.esd_calls == 2
    for j in range(1, r + 1):
        assert _subspace_gap(e2.P[:, :j].double(), Pe[:, :j]) < 1e-6, j


def test_torch_threads_back_restores_the_count_a_section_lowered():
    from esm_core import device
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with device.torch_threads_back():              # outside a section: nothing changes
            assert torch.get_num_threads() == 2
        with device.one_torch_thread():
            with device.torch_threads_back():
                assert torch.get_num_threads() == 2
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("form", ["gram", "rows"])
def test_esd_all_values_false_computes_only_the_leading_pairs(form, monkeypatch):
    """all_values=False (ESM++'s experts): only the leading ``columns`` eigenpairs are computed (eigh64's top), and
    they equal those of the full decomposition — columns, eigenvalues and coordinates."""
    dec = esd_mod
    N = 400 if form == "gram" else 200                 # rows: 200 < d_in = 260 (the factor is Xᵀ)
    X = _with_spectrum(N, 260, torch.logspace(0, -2, min(N, 260)).tolist(), seed=41)
    W = _with_spectrum(300, 260, torch.logspace(0, -1, 260).tolist(), seed=43)
    G = X.mT @ X
    kw = {"factor": X.mT} if form == "rows" else {}
    g = None if form == "rows" else G
    P, lam, A = esd(W, g, N, columns=32, coords=True, **kw)
    tops = []
    real = dec.eigh64
    monkeypatch.setattr(dec, "eigh64", lambda m, top=None: tops.append(top) or real(m, top))
    Pt, lt, At = esd(W, g, N, columns=32, coords=True, all_values=False, **kw)
    assert tops == [32] and Pt.shape == (300, 32) and lt.numel() >= 32
    torch.testing.assert_close(lt[:32], lam[:32], rtol=1e-10, atol=0)
    for j in (1, 8, 32):
        assert _subspace_gap(Pt[:, :j], P[:, :j]) < 1e-9, j
    torch.testing.assert_close(At, Pt.mT @ W, rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------
# Typed results and keys (issue 25)
# ---------------------------------------------------------------------------


def test_esd_returns_one_typed_result_whatever_the_flags():
    X, W, G = _esd_case(9, 6, 30)
    plain, with_coords = esd(W, G, 30, columns=3), esd(W, G, 30, columns=3, coords=True)
    assert isinstance(plain, Esd) and isinstance(with_coords, Esd) and len(plain) == len(with_coords) == 3
    assert plain.A is None and with_coords.A.shape == (3, 6)
    assert torch.equal(plain.P, with_coords.P) and torch.equal(plain.lam, with_coords.lam)
    torch.testing.assert_close(with_coords.A, with_coords.P.mT @ W, rtol=0, atol=1e-12)


def test_cache_keys_are_typed_and_hand_built_tuples_are_refused():
    X, W, G = _esd_case(9, 6, 30)
    c = DecompositionCache()
    e = c.esd("a", "w", W, G, 30, k=2)
    assert list(c.esd_entries) == [EsdKey("a", "w", "esd")] and c.esd_entries[EsdKey("a", "w")] is e
    assert c.lookup("a", "w", e.fp, 2, source="svd") is None            # another source of directions: a miss
    c.put_result(ResultKey("tsvm", "w"), ("fp",), 1)
    assert c.get_result(ResultKey("tsvm", "w"), ("fp",)) == 1 and c.get_result(ResultKey("tsvm", "w"), ("x",)) is None
    with pytest.raises(TypeError, match="ResultKey"):
        c.put_result(("tsvm", "w"), ("fp",), 1)
    with pytest.raises(TypeError, match="ResultKey"):
        c.get_result(("tsvm", "w"), ("fp",))


def test_the_fingerprint_memo_belongs_to_the_cache_and_sees_in_place_changes():
    t = _rand(4, 5, seed=3)
    a, b = DecompositionCache(), DecompositionCache()
    fp = a.tensor_fingerprint(t)
    assert fp == fingerprint(t) and id(t) in a.tensor_fps and not b.tensor_fps   # one memo per cache
    assert a.snapshot().tensor_fps is a.tensor_fps                               # shared with its snapshots
    t[0, 0] += 1.0                                                               # version bumped: fingerprinted again
    assert a.tensor_fingerprint(t) == fingerprint(t) != fp
    key = id(t)
    del t
    import gc
    gc.collect()
    assert key not in a.tensor_fps                                               # dropped with the tensor
