import math

import pytest
import torch

import esm_core
from esm_core import analysis
from esm_core.merging import cache as cache_mod, esd as esd_mod
from esm_core.merging.esm import new_cache

KEY = "visual.transformer.resblocks.0.mlp.c_fc.weight"
OUT = "visual.transformer.resblocks.0.attn.out_proj.weight"


def _case(seed=0, d_out=6, d_in=4, N=30):
    g = torch.Generator().manual_seed(seed)
    base = {KEY: torch.randn(d_out, d_in, generator=g), OUT: torch.randn(d_in, d_in, generator=g),
            "visual.ln_post.weight": torch.randn(d_in, generator=g)}
    tasks = {n: {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for n in ("a", "b")}
    inputs = {n: {KEY: torch.randn(N, d_in, generator=g, dtype=torch.float64)} for n in tasks}
    return base, tasks, inputs


def test_spectra_rows_are_exact():
    base, tasks, inputs = _case()
    rows = analysis.spectra(base, tasks, inputs, k=2)
    assert [(r["key"], r["task"]) for r in rows] == [(KEY, "a"), (KEY, "b")]
    for r in rows:
        W = (tasks[r["task"]][KEY] - base[KEY]).double()
        X = inputs[r["task"]][KEY]
        assert r["layer_type"] == "mlp.c_fc.weight" and r["block"] == 0 and r["k"] == 2
        s_out = torch.linalg.svdvals(X @ W.T)
        torch.testing.assert_close(torch.tensor(r["esd_lambda"], dtype=torch.float64), s_out[:4].square() / 29)  # rank ≤ d_in
        torch.testing.assert_close(torch.tensor(r["svd_sigma2"], dtype=torch.float64), torch.linalg.svdvals(W).square(),
                                   rtol=1e-6, atol=1e-9)
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        tot = (X @ W.T).square().sum()
        for rr in (1, 2, 4):
            Wr = (U[:, :rr] * S[:rr]) @ Vh[:rr]
            assert math.isclose(r["svd_energy_kept"][rr - 1], float((X @ Wr.T).square().sum() / tot), rel_tol=1e-6)
            P = esd_mod.esd(W, X.T @ X, 30).P
            We = esd_mod.esd_truncate(W, P, rr)
            assert math.isclose(r["esd_energy_kept"][rr - 1], float((X @ We.T).square().sum() / tot), rel_tol=1e-6)
        # ESD is the best rank-r fit of the output shift: it keeps at least as much energy as SVD
        assert all(e >= s - 1e-12 for e, s in zip(r["esd_energy_kept"], r["svd_energy_kept"]))
        assert r["esd_energy_kept"][-1] == pytest.approx(1.0) and r["svd_energy_kept"][-1] == pytest.approx(1.0)
        assert r["esd_kept_at_k"] == r["esd_energy_kept"][1]
        assert r["esd_rank95"] <= r["svd_energy_kept"].index(next(x for x in r["svd_energy_kept"] if x >= .95)) + 1


def test_effective_rank_by_hand():
    # ΔW = diag(3, 1) with white inputs (G = I·N): λ ∝ (9, 1) → 90 % at rank 1, 100 % at rank 2
    base = {KEY: torch.zeros(2, 2)}
    tasks = {"a": {KEY: torch.diag(torch.tensor([3.0, 1.0]))}}
    X = torch.cat([torch.eye(2), -torch.eye(2)]).double()
    row = analysis.spectra(base, tasks, {"a": {KEY: X}}, k=1)[0]
    assert row["esd_energy_kept"] == pytest.approx([0.9, 1.0])
    assert row["esd_rank95"] == 2 and row["svd_rank95"] == 2
    assert row["esd_lambda"] == pytest.approx([18 / 3, 2 / 3])
    row = analysis.spectra(base, tasks, {"a": {KEY: X}}, energy=0.85)[0]
    assert row["esd_rank95"] == 1 and row["k"] == 2          # default k = floor(d_out / T)


def test_overlap_self_one_orthogonal_zero():
    e = torch.eye(4)
    base = {KEY: torch.zeros(4, 4)}
    tasks = {"a": {KEY: e[:, :2] @ e[:2]}, "b": {KEY: e[:, 2:] @ e[2:]}, "c": {KEY: e[:, :2] @ e[:2] * 2}}
    X = torch.randn(20, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    inputs = {n: {KEY: X} for n in tasks}
    ov = analysis.subspace_overlap(base, tasks, inputs, k=2)
    M = torch.tensor(ov["layers"][KEY], dtype=torch.float64)
    torch.testing.assert_close(M.diagonal(), torch.ones(3, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    assert abs(M[0, 1]) < 1e-6 and abs(M[1, 2]) < 1e-6 and M[0, 2] == pytest.approx(1.0, abs=1e-6)
    assert ov["k"][KEY] == 2 and ov["mean"] == ov["layers"][KEY]


def test_cosines_by_hand():
    base = {KEY: torch.zeros(2, 2), "visual.ln_post.weight": torch.zeros(2)}
    tasks = {"a": {KEY: torch.tensor([[1.0, 0], [0, 0]]), "visual.ln_post.weight": torch.tensor([0.0, 1.0])},
             "b": {KEY: torch.tensor([[1.0, 1.0], [0, 0]]), "visual.ln_post.weight": torch.tensor([0.0, -1.0])}}
    cs = analysis.task_cosines(base, tasks)
    assert cs["layers"][KEY][0][1] == pytest.approx(1 / math.sqrt(2))
    assert cs["layers"][KEY][0][0] == pytest.approx(1.0)
    # whole model: a = (1,0,0,0 | 0,1), b = (1,1,0,0 | 0,-1): dot 0
    assert cs["model"][0][1] == pytest.approx(0.0) and cs["model"][1][1] == pytest.approx(1.0)


def test_alignment_and_interference_reuse_the_cache(monkeypatch):
    base, tasks, inputs = _case()
    cache = new_cache()
    ups = esm_core.merge_updates("esm", base, tasks, inputs=inputs, cache=cache, esd_keys=[KEY],
                                 layer_types={KEY: "mlp.c_fc.weight", OUT: "attn.out_proj.weight"})
    calls = []
    real = cache_mod.esd
    monkeypatch.setattr(cache_mod, "esd", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    res = analysis.interference(base, tasks, inputs, merged_updates=ups, cache=cache)
    analysis.spectra(base, tasks, inputs, cache=cache)
    assert calls == []                                    # every ESD came from the merge's cache
    sar = res["alignment"]
    assert set(sar["layers"]) == {KEY, OUT}
    for n in tasks:
        assert 0.0 <= sar["layers"][KEY][n] <= 1.0 + 1e-9
        assert sar["mean"][n] == pytest.approx((sar["layers"][KEY][n] + sar["layers"][OUT][n]) / 2)
    # a rank-1 task against its own scaled copy: SAR 1; against an orthogonal direction: 0
    u, v = torch.zeros(6), torch.zeros(4)
    u[0], v[1] = 1.0, 1.0
    t1 = {KEY: base[KEY] + torch.outer(u, v)}
    one = analysis.alignment(base, {"a": t1}, merged_updates={KEY: 3 * torch.outer(u, v)}, keys=[KEY])
    assert one["layers"][KEY]["a"] == pytest.approx(1.0) and one["mean"]["a"] == pytest.approx(1.0)
    u2 = torch.zeros(6)
    u2[3] = 1.0
    zero = analysis.alignment(base, {"a": t1}, merged_updates={KEY: torch.outer(u2, v)}, keys=[KEY])
    assert zero["layers"][KEY]["a"] == pytest.approx(0.0, abs=1e-6)
    assert res["overlap"]["layers"][KEY][0][0] == pytest.approx(1.0, abs=1e-6)
    assert analysis.interference(base, tasks)["overlap"] is None


def test_errors():
    base, tasks, inputs = _case()
    with pytest.raises(ValueError, match="activation statistics"):
        analysis.spectra(base, tasks, None)
    with pytest.raises(ValueError, match="merged_updates"):
        analysis.alignment(base, tasks)
    with pytest.raises(ValueError, match="no entry"):
        analysis.alignment(base, tasks, merged_updates={}, keys=[KEY])
    with pytest.raises(ValueError, match="not in the base"):
        analysis.task_cosines(base, tasks, keys=["nope"])
    with pytest.raises(ValueError, match="pass keys"):
        analysis.spectra({"w": torch.zeros(2, 2)}, {"a": {"w": torch.ones(2, 2)}}, {"a": {"w": torch.ones(3, 2)}})


@pytest.mark.parametrize("shape", [(12, 5), (5, 12), (7, 7)])
@pytest.mark.parametrize("form", ["gram", "rows"])
@pytest.mark.parametrize("spectrum", ["random", "ill", "deficient"])
def test_svd_spectrum_equals_the_svd(shape, form, spectrum):
    """σ² and each triplet's output energy σ² vᵀGv from the short side's Gram matrix equal the SVD's (σ² to
    ~eps · σ_max² absolute, the energies to the same relative to their total)."""
    from esm_core.merging.stats import LayerStats
    g = torch.Generator().manual_seed(len(form) + shape[0])
    m, n = shape
    r = min(m, n)
    u = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))[0]
    sv = {"random": torch.rand(r, generator=g, dtype=torch.float64) + 0.5,
          "ill": torch.logspace(0, -7, r, dtype=torch.float64),
          "deficient": torch.cat([torch.linspace(2, 1, r - 2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)])
          }[spectrum]                   # distinct nonzero values: each triplet (and its energy) is unique
    W = (u * sv) @ v.mT
    X = torch.randn(4 if form == "rows" else 40, n, generator=g, dtype=torch.float64)   # rows: fewer than inputs
    st = LayerStats(rows=X, n=X.shape[0]) if form == "rows" else LayerStats(gram=X.mT @ X, n=X.shape[0])
    assert (st.factor() is not None) == (form == "rows" and X.shape[0] <= n)
    s2, out = analysis.svd_spectrum(W, st)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    torch.testing.assert_close(s2, S.square(), rtol=0, atol=1e-13)
    ref = S.square() * ((Vh @ (X.mT @ X)) * Vh).sum(1)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12 * float(ref.sum()))
    assert float(out.sum()) == pytest.approx(float((X @ W.mT).square().sum()), rel=1e-9)   # = tr(ΔW G ΔWᵀ)
    # the products the Spectra view shares with the ESD (ΔWᵀΔW; ΔW G ΔWᵀ of a wide update with a rows factor
    # wider than ΔW is tall) give the same spectrum and energies
    if m < n and form == "rows":            # a wide update whose rows factor is wider than it is tall (c_proj)
        X = torch.randn(n - 1, n, generator=g, dtype=torch.float64)
        st = LayerStats(rows=X, n=X.shape[0])
        ref = S.square() * ((Vh @ (X.mT @ X)) * Vh).sum(1)
    pre = analysis._shared_products(W, st.factor())
    assert set(pre) == ({"wtw"} if m >= n else {"shift_gram"} if form == "rows" else set())
    s2p, outp = analysis.svd_spectrum(W, st, **pre)
    torch.testing.assert_close(s2p, s2, rtol=0, atol=1e-13)
    torch.testing.assert_close(outp, ref, rtol=0, atol=1e-12 * float(ref.sum()))


def test_spectra_and_overlap_decompose_on_one_torch_thread(monkeypatch):
    """The Spectra and overlap views run their decompositions with torch on one thread (SciPy's LAPACK carries
    the threads) and hand the count back, also to a thread that starts meanwhile."""
    import threading
    from esm_core import device
    base, tasks, inputs = _case()
    seen, real = [], esd_mod.eigh64

    def spy(*a, **kw):
        seen.append(torch.get_num_threads())
        return real(*a, **kw)

    want = analysis.spectra(base, tasks, inputs, k=2)
    monkeypatch.setattr(esd_mod, "eigh64", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert analysis.spectra(base, tasks, inputs, k=2) == want
        analysis.subspace_overlap(base, tasks, inputs, k=2)
        assert seen and set(seen) == {1} and torch.get_num_threads() == 2
        # torch's count is per thread: a section lowers only its own, and a thread that starts while one is
        # open (another session's handler) starts at the process's count, not at one
        inside, go, seen = threading.Event(), threading.Event(), []

        def other():
            with device.one_torch_thread():
                seen.append(torch.get_num_threads())
                inside.set()
                go.wait(10)

        th = threading.Thread(target=other)
        th.start()
        assert inside.wait(10)
        assert torch.get_num_threads() == 2
        late = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        late.start()
        late.join(10)
        with device.one_torch_thread():
            with device.one_torch_thread():
                assert torch.get_num_threads() == 1
            assert torch.get_num_threads() == 1            # the outer section is still open
        assert torch.get_num_threads() == 2
        go.set()
        th.join(10)
        assert seen == [1, 2] and torch.get_num_threads() == 2
        with pytest.raises(RuntimeError):
            with device.one_torch_thread():
                raise RuntimeError("boom")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
