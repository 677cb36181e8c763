import pytest
import torch

import esm_core
from esm_core.merging import cache as cache_mod, polar as polar_mod
from esm_core.models import openclip_vit as vit
from esm_core.merging import get_method
from esm_core.merging.esm import esm_rank, esm_u, esm_v, new_cache
from esm_core.merging.stats import stats_from_inputs

D = 8                 # width
H = 12                # MLP hidden width (keeps every default rank within the structural rank with 3 tasks)
BLOCKS = 2


def _sd(g, scale=1.0):
    sd = {"visual.class_embedding": torch.randn(D, generator=g), "visual.proj": torch.randn(D, 6, generator=g),
          "visual.ln_post.weight": torch.randn(D, generator=g)}
    for i in range(BLOCKS):
        p = f"visual.transformer.resblocks.{i}."
        sd[p + "ln_1.weight"] = torch.randn(D, generator=g)
        sd[p + "attn.in_proj_weight"] = torch.randn(3 * D, D, generator=g)
        sd[p + "attn.in_proj_bias"] = torch.randn(3 * D, generator=g)
        sd[p + "attn.out_proj.weight"] = torch.randn(D, D, generator=g)
        sd[p + "mlp.c_fc.weight"] = torch.randn(H, D, generator=g)
        sd[p + "mlp.c_proj.weight"] = torch.randn(D, H, generator=g)
    return {k: v * scale for k, v in sd.items()}


def _case(T=3, N=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = _sd(g)
    tasks = {}
    for t in range(T):
        d = _sd(g, scale=0.05 * (t + 1))       # tasks of different strength
        tasks[f"task{t}"] = {k: base[k] + d[k] for k in base}
    inputs = {name: {k: torch.randn(N, base[k].shape[1], generator=g, dtype=torch.float64)
                     for k in vit.esd_keys(base)} for name in tasks}
    return base, tasks, inputs


ESD_KEYS = [f"visual.transformer.resblocks.{i}.{t}" for i in range(BLOCKS) for t in vit.ESD_TYPES]
OUT_KEYS = [f"visual.transformer.resblocks.{i}.attn.out_proj.weight" for i in range(BLOCKS)]


def _upd(merged, base):
    return {k: merged[k].double() - base[k].double() for k in base}


# ---------------------------------------------------------------------------
# An independent, straightforward reimplementation of methods §5–§6 (SVD everywhere)
# ---------------------------------------------------------------------------


def _polar_svd(x):
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh


def _ref_esm(base, tasks, inputs, alpha=1.0, rank=0, p_task=2.0, p_dim=2.0, p_layer=2.0, eig=0.15, f=2.0):
    names = list(tasks)
    T = len(names)
    ups, esd_keys = {}, vit.esd_keys(base)
    for key, b in base.items():
        Ds = [tasks[n][key].double() - b.double() for n in names]
        if key in esd_keys:
            m, n_in = Ds[0].shape
            k = rank or m // T
            norms = [float(d.norm()) for d in Ds]
            mean_n = sum(norms) / T
            us, vs = [], []
            for t, name in enumerate(names):
                X = inputs[name][key]
                dO = X @ Ds[t].T                                   # output shift
                _, s, Vh = torch.linalg.svd(dO, full_matrices=True)
                P = Vh.T                                           # principal directions (no centring)
                lam = torch.zeros(m, dtype=torch.float64)
                lam[: s.numel()] = s ** 2 / (X.shape[0] - 1)
                Ph, A = P[:, :k], P[:, :k].T @ Ds[t]
                e = (lam[:k] / lam[:k].mean()) ** eig
                e = e / e.mean()
                us.append(Ph * e)
                vs.append(e[:, None] * A * norms[t] ** p_task)
            U, V = torch.cat(us, 1), torch.cat(vs, 0) / mean_n ** p_task
            c = V.norm(dim=0) / V.norm(dim=0).mean()
            V = V * c ** p_dim
            ups[key] = f * (_polar_svd(U) * torch.linalg.svdvals(U).mean()) @ (_polar_svd(V) * torch.linalg.svdvals(V).mean())
        elif b.ndim == 2:                                          # TSV-M, written out
            m, n_in = b.shape
            k = int(min(m, n_in) / T)
            svs = [torch.linalg.svd(d, full_matrices=False) for d in Ds]
            Uc = torch.cat([u[:, :k] for u, _, _ in svs], 1)
            sc = torch.cat([s[:k] for _, s, _ in svs])
            Vc = torch.cat([vh[:k] for _, _, vh in svs], 0)
            ups[key] = (_polar_svd(Uc) * sc) @ _polar_svd(Vc)
        else:
            ups[key] = sum(Ds) / T
    for typ in vit.LAYER_TYPES:                                    # inter-layer, per type
        ks = [k for k in ups if vit.layer_type(k) == typ]
        nrm = {k: float(ups[k].norm()) for k in ks}
        mean = sum(nrm.values()) / len(ks)
        for k in ks:
            ups[k] = ups[k] * (nrm[k] / mean) ** p_layer
    return {k: (alpha * v if k in esd_keys else v) for k, v in ups.items()}


@pytest.mark.parametrize("params", [{}, {"rank": 3, "alpha": 0.7},
                                    {"p_task": 1.0, "p_dim": 3.0, "eig_exp": 0.4, "p_layer": 0.5, "ortho_factor": 1.5}])
def test_matches_independent_reimplementation(params):
    base, tasks, inputs = _case(T=3)
    got = _upd(esm_core.merge("esm", base, tasks, inputs=inputs, **params), base)
    ref = _ref_esm(base, tasks, inputs, alpha=params.get("alpha", 1.0), rank=params.get("rank", 0),
                   p_task=params.get("p_task", 2.0), p_dim=params.get("p_dim", 2.0),
                   p_layer=params.get("p_layer", 2.0), eig=params.get("eig_exp", 0.15),
                   f=params.get("ortho_factor", 2.0))
    assert set(got) == set(ref)
    for k in ref:
        err = float((got[k] - ref[k]).norm() / ref[k].norm().clamp_min(1e-30))
        assert err < 1e-5, (k, err)


@pytest.mark.parametrize("T, N, params", [(3, 40, {"rank": 10}), (2, 5, {}), (1, 40, {"eig_exp": 0.3}),
                                           (3, 5, {"rank": 7, "p_dim": 1.0})])
def test_ranks_beyond_the_structural_rank_match_the_reimplementation(T, N, params):
    """k above rank(ΔW G ΔWᵀ) (few tasks, few rows, a large rank): the trailing directions have λ = 0, so their
    U columns and V rows are exactly zero — U'V' is still unique: it equals the all-float64 SVD reimplementation
    to 3e-5 (P is cached in float32; with rank 10 the reduced U is ill-conditioned enough to take fd9a028's route
    ~1e-5 from it too) and, with rows enough (N ≥ d_in), fd9a028's route (SVD fall-back) to 1e-5. With N = 5 < d_in
    fd9a028's route is 2e-3–6e-3 off the reimplementation: its G = XᵀX has rounding-noise eigenvalues where the
    rank ends, so λ ≈ 1e-16 and e = λ^0.15 ≈ 4e-3 ≠ 0 weights arbitrary null directions into U."""
    from esm_core.bench.esm_rows import reference_updates
    base, tasks, inputs = _case(T=T, N=N, seed=12)
    got = _upd(esm_core.merge("esm", base, tasks, inputs=inputs, **params), base)
    ref = _ref_esm(base, tasks, inputs, rank=params.get("rank", 0), p_dim=params.get("p_dim", 2.0),
                   eig=params.get("eig_exp", 0.15))
    old = reference_updates(base, tasks, stats=stats_from_inputs(inputs), **params)
    for k in ref:
        assert _rel(got[k], ref[k]) < 3e-5, (k, _rel(got[k], ref[k]))
    if N >= D:
        for k in old:
            assert _rel(got[k], old[k]) < 1e-5, (k, _rel(got[k], old[k]))


def test_zero_directions_are_left_out_of_the_polar_factors(monkeypatch):
    """With λ = 0 directions U is rank-deficient: its polar factor used to take the SVD fall-back (a 3072² SVD per
    c_fc key of a ViT-B/32 with 2 or 3 tasks); the zero columns are now left out and no SVD of U or V runs."""
    import esm_core.merging.esm as esm_mod
    base, tasks, inputs = _case(T=3, N=40, seed=13)
    svd_shapes, iso_shapes = [], []
    real_svd, real_iso = torch.linalg.svd, esm_mod.isotropic
    monkeypatch.setattr(torch.linalg, "svd", lambda x, *a, **k: (svd_shapes.append(tuple(x.shape)), real_svd(x, *a, **k))[1])
    monkeypatch.setattr(esm_mod, "isotropic", lambda x, *a: (iso_shapes.append(tuple(x.shape)), real_iso(x, *a))[1])
    esm_core.merge_updates("esm", base, tasks, inputs=inputs, rank=10)      # k = 10 > d_in = 8 for in_proj, c_fc
    assert (H, 3 * 8) in iso_shapes and (3 * 8, D) in iso_shapes        # U, V of c_fc: 8 live directions per task
    assert not [s for s in svd_shapes if s in ((H, 30), (3 * D, 30), (30, D))], svd_shapes   # U of c_fc / in_proj, V


# ---------------------------------------------------------------------------
# Each polarised scaling by hand
# ---------------------------------------------------------------------------

def esm_factors(Ps, lams, deltas, k, p_task=2.0, p_dim=2.0, eig_exp=0.15):
    """ESM's concatenated factors (U, V) of one layer before orthogonalisation (methods §6.1–§6.4)."""
    return esm_u(Ps, lams, k, eig_exp), esm_v(Ps, lams, deltas, k, p_task, p_dim, eig_exp)


I2 = torch.eye(2, dtype=torch.float64)
FLAT = torch.ones(2, dtype=torch.float64)


def test_inter_task_factor_by_hand():
    d1 = torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=torch.float64)      # ‖·‖ = 5
    d2 = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)      # ‖·‖ = 1; mean = 3
    U, V = esm_factors([I2, I2], [FLAT, FLAT], [d1, d2], k=2, p_task=2, p_dim=0, eig_exp=0.15)
    torch.testing.assert_close(U, torch.cat([I2, I2], 1))
    torch.testing.assert_close(V, torch.cat([d1 * 25 / 9, d2 / 9]))         # (5/3)², (1/3)²
    U0, V0 = esm_factors([I2, I2], [FLAT, FLAT], [d1, d2], k=2, p_task=0, p_dim=0, eig_exp=0.15)
    torch.testing.assert_close(V0, torch.cat([d1, d2]))                     # exponent 0: off


def test_eigenvalue_weight_by_hand():
    P = torch.tensor([[0.6, -0.8], [0.8, 0.6]], dtype=torch.float64)
    d = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    lam = torch.tensor([4.0, 1.0], dtype=torch.float64)
    # eig_exp 0.5: (λ / 2.5)^½ = (√1.6, √0.4) ∝ (2, 1) → normalised to mean 1: (4/3, 2/3)
    U, V = esm_factors([P], [lam], [d], k=2, p_task=2, p_dim=0, eig_exp=0.5)
    e = torch.tensor([4 / 3, 2 / 3], dtype=torch.float64)
    torch.testing.assert_close(U, P * e)                      # columns of P̂ × e
    torch.testing.assert_close(V, e[:, None] * (P.T @ d))     # rows of Â × e (T = 1: task factor 1)
    # the reference exponent 0.15
    e15 = torch.tensor([1.6 ** 0.15, 0.4 ** 0.15], dtype=torch.float64)
    e15 = e15 / e15.mean()
    U, _ = esm_factors([P], [lam], [d], k=2, p_task=2, p_dim=0, eig_exp=0.15)
    torch.testing.assert_close(U, P * e15)
    U, V = esm_factors([P], [lam], [d], k=2, p_task=2, p_dim=0, eig_exp=0.0)
    torch.testing.assert_close(U, P)
    torch.testing.assert_close(V, P.T @ d)
    # truncation: k = 1 keeps the top direction only, e = 1
    U, V = esm_factors([P], [lam], [d], k=1, p_task=2, p_dim=0, eig_exp=0.5)
    torch.testing.assert_close(U, P[:, :1])
    torch.testing.assert_close(V, P[:, :1].T @ d)


def test_inter_dimension_factor_by_hand():
    d = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)        # column norms 1, 3; mean 2
    _, V = esm_factors([I2], [FLAT], [d], k=2, p_task=2, p_dim=2, eig_exp=0.15)
    torch.testing.assert_close(V, torch.tensor([[0.25, 0.0], [0.0, 6.75]], dtype=torch.float64))  # × (½)², (3/2)²
    _, V1 = esm_factors([I2], [FLAT], [d], k=2, p_task=2, p_dim=1, eig_exp=0.15)
    torch.testing.assert_close(V1, torch.tensor([[0.5, 0.0], [0.0, 4.5]], dtype=torch.float64))


def test_ortho_factor_scales_the_esd_keys_only():
    base, tasks, inputs = _case(T=3)
    two = esm_core.merge_updates("esm", base, tasks, inputs=inputs, p_layer=0.0)
    one = esm_core.merge_updates("esm", base, tasks, inputs=inputs, p_layer=0.0, ortho_factor=1.0)
    for k in two:
        torch.testing.assert_close(one[k] * (2.0 if k in ESD_KEYS else 1.0), two[k], rtol=1e-5, atol=1e-8)


def test_inter_layer_factor_by_hand():
    base, tasks, inputs = _case(T=3)
    raw = _upd(esm_core.merge("esm", base, tasks, inputs=inputs, p_layer=0.0, alpha=1.0), base)
    scaled = _upd(esm_core.merge("esm", base, tasks, inputs=inputs, p_layer=2.0, alpha=0.5), base)
    for typ in vit.LAYER_TYPES:
        ks = [f"visual.transformer.resblocks.{i}.{typ}" for i in range(BLOCKS)]
        n0, n1 = (float(raw[k].norm()) for k in ks)
        mean = (n0 + n1) / 2
        a = 0.5 if typ in vit.ESD_TYPES else 1.0               # α on ESD keys only; out_proj is scaled by β only
        for k, n in zip(ks, (n0, n1)):
            torch.testing.assert_close(scaled[k], raw[k] * a * (n / mean) ** 2, rtol=1e-5, atol=1e-7)
    for k in ("visual.proj", "visual.class_embedding", "visual.transformer.resblocks.0.attn.in_proj_bias"):
        torch.testing.assert_close(scaled[k], raw[k])          # no layer type: coefficient 1, no α
    torch.testing.assert_close(raw["visual.class_embedding"],
                               sum(tasks[t]["visual.class_embedding"] - base["visual.class_embedding"]
                                   for t in tasks).double() / 3, rtol=1e-5, atol=1e-6)


def test_flat_spectrum_per_esd_key():
    base, tasks, inputs = _case(T=3)
    for p_layer in (0.0, 2.0):
        up = _upd(esm_core.merge("esm", base, tasks, inputs=inputs, p_layer=p_layer), base)
        for k in ESD_KEYS:
            s = torch.linalg.svdvals(up[k])
            m, n = up[k].shape
            r = min(m, n, 3 * esm_rank(m, 3))
            assert float(s[:r].max() - s[:r].min()) < 1e-5 * float(s[0]), (k, s)
            assert r == s.numel() or float(s[r:].max()) < 1e-5 * float(s[0])


def test_rank_rules():
    assert esm_rank(24, 3) == 8 and esm_rank(10, 3) == 3
    assert esm_rank(24, 3, rank=5) == 5 and esm_rank(24, 3, rank=99) == 24
    assert esm_rank(24, 3, rank_fraction=0.5) == 4 and esm_rank(24, 3, rank_fraction=0.01) == 1
    with pytest.raises(ValueError, match="either rank or rank_fraction"):
        esm_rank(24, 3, rank=2, rank_fraction=0.5)


def test_schema_defaults():
    m = get_method("esm")
    assert m.needs_stats and m.alpha_grid == (0.0, 2.0, 31)
    p = m.resolve({})
    assert p == {"alpha": 1.0, "rank": 0, "rank_fraction": 0.0, "p_task": 2.0, "p_dim": 2.0, "p_layer": 2.0,
                 "eig_exp": 0.15, "ortho_factor": 2.0,
                 "esd_types": "auto", "directions": "esd"}   # the model family's ESD types: checked next
    base, tasks, inputs = _case(T=2)
    info_auto, info_listed = {}, {}
    esm_core.merge("esm", base, tasks, inputs=inputs, info=info_auto)
    esm_core.merge("esm", base, tasks, inputs=inputs, info=info_listed,
                   esd_types="attn.in_proj_weight,mlp.c_fc.weight,mlp.c_proj.weight")
    assert info_auto["esm"]["esd_keys"] == info_listed["esm"]["esd_keys"] == ESD_KEYS


# ---------------------------------------------------------------------------
# Inputs, errors, reproducibility, cache
# ---------------------------------------------------------------------------


def test_stats_and_inputs_give_the_same_merge_and_it_is_reproducible():
    base, tasks, inputs = _case(T=2, seed=3)
    a = esm_core.merge("esm", base, tasks, inputs=inputs, rank=3)
    b = esm_core.merge("esm", base, tasks, stats=stats_from_inputs(inputs), rank=3)
    c = esm_core.merge("esm", base, tasks, inputs=inputs, rank=3)
    for k in a:
        assert torch.equal(a[k], b[k]) and torch.equal(a[k], c[k])


def test_errors():
    base, tasks, inputs = _case(T=2)
    with pytest.raises(ValueError, match="activation statistics"):
        esm_core.merge("esm", base, tasks)
    bad = {t: {k: v for k, v in d.items() if "resblocks.1.mlp.c_fc" not in k} for t, d in inputs.items()}
    with pytest.raises(ValueError, match="no layer 'visual.transformer.resblocks.1.mlp.c_fc.weight'"):
        esm_core.merge("esm", base, tasks, inputs=bad)
    with pytest.raises(ValueError, match="not layer types"):
        esm_core.merge("esm", base, tasks, inputs=inputs, esd_types="mlp.fc1.weight")
    with pytest.raises(ValueError, match="either rank or rank_fraction"):
        esm_core.merge("esm", base, tasks, inputs=inputs, rank=2, rank_fraction=0.5)
    with pytest.raises(ValueError, match="new_cache"):
        esm_core.merge("esm", base, tasks, inputs=inputs, cache={})


def test_explicit_esd_keys_and_no_esd():
    base, tasks, inputs = _case(T=2)
    only = ["visual.transformer.resblocks.0.mlp.c_fc.weight"]
    info = {}
    got = esm_core.merge_updates("esm", base, tasks, inputs={t: {only[0]: x[only[0]]} for t, x in inputs.items()},
                                 esd_keys=only, info=info)
    assert info["esm"]["esd_keys"] == only
    # every other c_fc key went the TSV-M way
    from esm_core.merging.svd import tsv_merge_matrix
    k = "visual.transformer.resblocks.1.mlp.c_fc.weight"
    D = torch.stack([tasks[t][k] - base[k] for t in tasks])
    assert not torch.allclose(got[k], tsv_merge_matrix(D))   # scaled by β …
    n0, n1 = float(got[only[0]].norm()), float(got[k].norm())
    # … with β of that pair: ‖β1 X1‖ / ‖β0 X0‖ = (‖X1‖/‖X0‖)³
    esd_only = esm_core.merge_updates("esm", base, tasks, inputs=inputs, esd_keys=only, p_layer=0.0)
    r = float(esd_only[k].norm()) / float(esd_only[only[0]].norm())
    assert abs(n1 / n0 - r ** 3) < 1e-4 * r ** 3
    none = esm_core.merge_updates("esm", base, tasks, esd_types="", p_layer=0.0)     # no ESD keys: no stats needed
    torch.testing.assert_close(none[k], tsv_merge_matrix(D), rtol=1e-5, atol=1e-7)


def test_cache_skips_decompositions_on_re_merge(monkeypatch):
    calls = []
    real = cache_mod.esd

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(cache_mod, "esd", counting)
    base, tasks, inputs = _case(T=3)
    cache = new_cache()
    esm_core.merge("esm", base, tasks, inputs=inputs, cache=cache)
    cold = len(calls)
    assert cold == 3 * len(ESD_KEYS) and cache.esd_calls == cold
    for params in ({"rank": 2}, {"p_task": 1.0, "eig_exp": 0.3}, {"alpha": 0.4}, {"rank_fraction": 0.5},
                   {"p_dim": 1.0}, {"ortho_factor": 1.5, "p_layer": 1.0}):
        before = len(calls)
        warm = esm_core.merge("esm", base, tasks, inputs=inputs, cache=cache, **params)
        assert len(calls) == before, params             # no decomposition recomputed
        fresh = esm_core.merge("esm", base, tasks, inputs=inputs, cache=new_cache(), **params)
        for k in warm:
            torch.testing.assert_close(warm[k], fresh[k], rtol=1e-6, atol=1e-7)
    n_fresh = len(calls)
    # a changed checkpoint: only that task's decompositions of the changed key are recomputed
    k = ESD_KEYS[0]
    tasks2 = dict(tasks)
    tasks2["task1"] = dict(tasks["task1"])
    tasks2["task1"][k] = tasks["task1"][k] + 0.01
    esm_core.merge("esm", base, tasks2, inputs=inputs, cache=cache)
    assert len(calls) == n_fresh + 1
    # changed statistics of one task and layer: recomputed too
    inputs2 = {t: dict(v) for t, v in inputs.items()}
    inputs2["task2"][k] = inputs["task2"][k] * 1.5
    out = esm_core.merge("esm", base, tasks2, inputs=inputs2, cache=cache)
    assert len(calls) == n_fresh + 2
    ref = esm_core.merge("esm", base, tasks2, inputs=inputs2)
    for kk in out:
        torch.testing.assert_close(out[kk], ref[kk], rtol=1e-6, atol=1e-7)


def test_one_shot_merge_keeps_one_keys_decompositions_at_a_time(monkeypatch):
    """Without a caller's cache nothing is kept from one key to the next (ViT-L/14 × 20 kept 16 GB by
    mid-model); the result is the same as with a cache."""
    import esm_core.merging.esm as esm_mod
    held = []

    class Counting(cache_mod.DecompositionCache):
        def esd(self, *a, **kw):
            e = super().esd(*a, **kw)
            held.append(len(self.esd_entries))
            return e

    monkeypatch.setattr(esm_mod, "DecompositionCache", Counting)
    base, tasks, inputs = _case(T=3)
    once = esm_core.merge("esm", base, tasks, inputs=inputs)
    assert len(held) == 3 * len(ESD_KEYS) and max(held) == 3
    cached = esm_core.merge("esm", base, tasks, inputs=inputs, cache=new_cache())
    assert all(torch.equal(once[k], cached[k]) for k in once)


def test_tsv_m_and_esm_share_their_tsv_m_keys(monkeypatch):
    """ESM merges its non-ESD 2-D keys the TSV-M way: with one cache, TSV-M after ESM computes only the ESD keys,
    ESM after TSV-M none of its TSV-M keys, and both give what they give without a cache."""
    import esm_core.merging.svd as svd
    calls = []
    real = svd.tsv_merge_matrix
    monkeypatch.setattr(svd, "tsv_merge_matrix", lambda D, *a: calls.append(1) or real(D, *a))
    base, tasks, inputs = _case(T=3)
    plain = esm_core.merge("tsv_m", base, tasks)                   # no cache: every 2-D key
    n_matrix = len(calls)
    assert n_matrix == len(ESD_KEYS) + len(OUT_KEYS) + 1          # + visual.proj
    cache = new_cache()
    esm_plain = esm_core.merge("esm", base, tasks, inputs=inputs, cache=cache)
    assert len(calls) == 2 * n_matrix - len(ESD_KEYS)
    before = len(calls)
    shared = esm_core.merge("tsv_m", base, tasks, cache=cache)
    assert len(calls) - before == len(ESD_KEYS)
    assert all(torch.equal(shared[k], plain[k]) for k in plain)
    cache2 = new_cache()                                           # TSV-M first
    esm_core.merge("tsv_m", base, tasks, cache=cache2)
    assert not any(("tsvm", k) in cache2.results for k in ESD_KEYS)   # ESM never reads those: not kept
    before = len(calls)
    again = esm_core.merge("esm", base, tasks, inputs=inputs, cache=cache2)
    assert len(calls) == before
    assert all(torch.equal(again[k], esm_plain[k]) for k in esm_plain)


def test_re_merge_reuses_the_output_factor(monkeypatch):
    """A task / dimension exponent change orthogonalises only V; α, p_layer, ortho_factor none at all."""
    import esm_core.merging.esm as esm_mod
    base, tasks, inputs = _case(T=3)
    cache = new_cache()
    esm_core.merge("esm", base, tasks, inputs=inputs, cache=cache)
    shapes = []
    real = esm_mod.isotropic
    monkeypatch.setattr(esm_mod, "isotropic", lambda x, *a: (shapes.append(tuple(x.shape)), real(x, *a))[1])
    esm_core.merge("esm", base, tasks, inputs=inputs, cache=cache, p_dim=1.0, p_task=0.5)
    assert len(shapes) == len(ESD_KEYS)                          # one polar per ESD key: V (Tk × d_in) only
    assert all(s[1] == base[k].shape[1] for s, k in zip(shapes, ESD_KEYS))
    shapes.clear()
    esm_core.merge("esm", base, tasks, inputs=inputs, cache=cache, p_dim=1.0, p_task=0.5, alpha=0.3,
                   ortho_factor=1.0, p_layer=0.0)
    assert shapes == []
    esm_core.merge("esm", base, tasks, inputs=inputs, cache=cache, eig_exp=0.5)
    assert len(shapes) == 2 * len(ESD_KEYS)                      # eig_exp changes U too


# ---------------------------------------------------------------------------
# The fast route against fd9a028's float64 route (issue 13: ≤ 1e-5 relative in the merged weights)
# ---------------------------------------------------------------------------


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("params", [{}, {"rank": 2}, {"rank_fraction": 2.0}, {"p_dim": 0.5, "eig_exp": 0.4}])
def test_fast_route_equals_the_reference_route(params):
    from esm_core.bench.esm_rows import reference_updates
    base, tasks, inputs = _case(T=3, seed=5)
    stats = stats_from_inputs(inputs)
    got = esm_core.merge_updates("esm", base, tasks, stats=stats, **params)
    ref = reference_updates(base, tasks, stats=stats, **params)
    assert set(got) == set(ref)
    for k in ref:
        assert _rel(got[k], ref[k]) < 1e-5, (k, _rel(got[k], ref[k]))


def test_fast_route_on_ill_conditioned_inputs():
    """Inputs whose Gram spans 1e8 (tokens nearly collinear) and rank-deficient task matrices."""
    from esm_core.bench.esm_rows import reference_updates
    base, tasks, _ = _case(T=3, seed=6)
    g = torch.Generator().manual_seed(7)
    inputs = {}
    for name in tasks:
        inputs[name] = {}
        for k in ESD_KEYS:
            d_in = base[k].shape[1]
            scale = torch.logspace(0, -4, d_in, dtype=torch.float64)
            inputs[name][k] = torch.randn(40, d_in, generator=g, dtype=torch.float64) * scale
    low = {n: dict(sd) for n, sd in tasks.items()}
    k0 = ESD_KEYS[1]                                           # a c_fc key: rank-2 task updates
    for n in low:
        a = torch.randn(base[k0].shape[0], 2, generator=g) @ torch.randn(2, base[k0].shape[1], generator=g)
        low[n][k0] = base[k0] + 0.05 * a
    stats = stats_from_inputs(inputs)
    got = esm_core.merge_updates("esm", base, low, stats=stats, rank=2)
    ref = reference_updates(base, low, stats=stats, rank=2)
    for k in ref:
        assert _rel(got[k], ref[k]) < 1e-5, (k, _rel(got[k], ref[k]))


def test_rows_and_gram_statistics_give_the_same_merge():
    from esm_core.merging.stats import LayerStats
    base, tasks, inputs = _case(T=3, N=10, seed=8)
    rows = stats_from_inputs(inputs)                       # N = 10 float64 rows: kept as rows where d_in ≥ 10
    assert any(st.rows is not None for st in rows["tasks"]["task0"].values())
    gram = {"tasks": {t: {k: LayerStats(gram=st.gram, n=st.n, mean=st.mean) for k, st in layers.items()}
                      for t, layers in rows["tasks"].items()}}
    a = esm_core.merge_updates("esm", base, tasks, stats=rows)
    b = esm_core.merge_updates("esm", base, tasks, stats=gram)
    for k in a:
        assert _rel(a[k], b[k]) < 1e-6, k


@pytest.mark.parametrize("params", [{"rank": 2}, {"rank": 7}, {"rank_fraction": 3.0}, {"p_task": 0.5},
                                    {"p_dim": 1.0}, {"p_layer": 1.0}, {"eig_exp": 0.3}, {"ortho_factor": 1.5},
                                    {"alpha": 0.6}])
def test_every_re_merge_equals_a_fresh_merge(params):
    base, tasks, inputs = _case(T=3, seed=9)
    stats = stats_from_inputs(inputs)
    cache = new_cache()
    esm_core.merge_updates("esm", base, tasks, stats=stats, cache=cache)
    calls = cache.esd_calls
    warm = esm_core.merge_updates("esm", base, tasks, stats=stats, cache=cache, **params)
    fresh = esm_core.merge_updates("esm", base, tasks, stats=stats, cache=new_cache(), **params)
    if params.get("rank", 0) <= 4 and "rank_fraction" not in params:   # within the kept columns: no ESD rerun
        assert cache.esd_calls == calls
    for k in fresh:
        torch.testing.assert_close(warm[k], fresh[k], rtol=1e-6, atol=1e-7)


def test_re_merge_does_not_read_task_matrices_again():
    base, tasks, inputs = _case(T=3)
    stats = stats_from_inputs(inputs)

    class Counting(dict):
        reads = 0

        def __getitem__(self, k):
            Counting.reads += 1
            return dict.__getitem__(self, k)

    counted = {n: Counting(sd) for n, sd in tasks.items()}
    cache = new_cache()
    esm_core.merge_updates("esm", base, counted, stats=stats, cache=cache, check=False)
    cold = Counting.reads
    esm_core.merge_updates("esm", base, counted, stats=stats, cache=cache, check=False, p_dim=1.0, rank=2)
    # a re-merge looks each tensor up once (for its memoised fingerprint) and forms no task update
    assert Counting.reads - cold == len(tasks) * len(base)


def test_v_from_coordinates_equals_the_formula_step_by_step():
    """esm_v_from_coords (one buffer, rows scaled once) against methods §6.1–§6.4 written out per task."""
    from esm_core.merging.esm import esm_v_from_coords
    g = torch.Generator().manual_seed(71)
    T, k, d_in = 3, 4, 9
    coords = [torch.randn(6, d_in, generator=g) for _ in range(T)]          # more rows than k: first k used
    lams = [torch.sort(torch.rand(10, generator=g, dtype=torch.float64) * 10 ** t, descending=True)[0]
            for t in range(T)]
    norms = [1.0, 2.5, 0.4]
    for p_task, p_dim, eig in ((2.0, 2.0, 0.15), (0.5, -1.0, 0.4), (0.0, 0.0, 0.0)):
        mean_n = sum(norms) / T
        blocks = []
        for t in range(T):
            lk = lams[t][:k]
            e = (lk / lk.mean()) ** eig
            e = e / e.mean()
            blocks.append(e[:, None] * coords[t][:k].double() * (norms[t] / mean_n) ** p_task)
        V = torch.cat(blocks)
        c = V.norm(dim=0)
        V = V * (c / c.mean()) ** p_dim
        got = esm_v_from_coords(coords, lams, norms, k, p_task, p_dim, eig)
        torch.testing.assert_close(got, V, rtol=1e-12, atol=0)


@pytest.mark.parametrize("params", [{}, {"rank": 2}, {"p_dim": 0.5, "eig_exp": 0.4}])
def test_newton_schulz_route_equals_the_reference_route(params, monkeypatch):
    """The CUDA polar route, run here on the CPU, within 1e-5 of fd9a028's route (and 1e-6 of the Gram route)."""
    from esm_core.bench.esm_rows import reference_updates
    base, tasks, inputs = _case(T=3, seed=5)
    stats = stats_from_inputs(inputs)
    gram_route = esm_core.merge_updates("esm", base, tasks, stats=stats, **params)
    monkeypatch.setattr(polar_mod, "POLAR_ROUTES", {"cpu": "newton_schulz"})
    got = esm_core.merge_updates("esm", base, tasks, stats=stats, **params)
    ref = reference_updates(base, tasks, stats=stats, **params)
    for k in ref:
        assert _rel(got[k], ref[k]) < 1e-5, (k, _rel(got[k], ref[k]))
        assert _rel(got[k], gram_route[k]) < 1e-6, (k, _rel(got[k], gram_route[k]))


def test_output_factor_cache_knows_the_polar_route(monkeypatch):
    """U' cached by one route is not served to a merge that takes the other one."""
    import esm_core.merging.esm as esm_mod
    base, tasks, inputs = _case(T=3, seed=10)
    stats = stats_from_inputs(inputs)
    cache = new_cache()
    esm_core.merge_updates("esm", base, tasks, stats=stats, cache=cache)
    routes = []
    real = esm_mod.isotropic
    monkeypatch.setattr(esm_mod, "isotropic", lambda x, dtype, route: (routes.append(route), real(x, dtype, route))[1])
    monkeypatch.setattr(polar_mod, "POLAR_ROUTES", {"cpu": "newton_schulz"})
    warm = esm_core.merge_updates("esm", base, tasks, stats=stats, cache=cache, p_task=1.0)
    assert routes == ["newton_schulz"] * (2 * len(ESD_KEYS))       # U' and V' of every key, by the new route
    fresh = esm_core.merge_updates("esm", base, tasks, stats=stats, cache=new_cache(), p_task=1.0)
    for k in fresh:
        torch.testing.assert_close(warm[k], fresh[k], rtol=0, atol=0)
    routes.clear()
    monkeypatch.setattr(polar_mod, "POLAR_ROUTES", {})              # back to the Gram route, same parameters:
    esm_core.merge_updates("esm", base, tasks, stats=stats, cache=cache, p_task=1.0)
    assert routes == ["gram"] * (2 * len(ESD_KEYS))                # no update of the other route is served
