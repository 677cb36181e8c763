"""The library a user scripts against: α bounds (a UI range is not a library limit) and the public API of esm_core."""
import math

import pytest
import torch

from esm_core.evaluation import alpha as A
from esm_core.schemas import ALPHA_LIMIT, SPECS


def _sds(T=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(6, 5, generator=g), "b": torch.randn(6, generator=g)}
    tasks = {f"t{i}": {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for i in range(T)}
    return base, tasks


# ---------------------------------------------------------------- α: the UI range is not a library limit

@pytest.mark.parametrize("method", sorted(SPECS))
def test_alpha_beyond_the_ui_range_is_accepted_up_to_the_library_bound(method):
    spec = SPECS[method]
    a = next(p for p in spec.params if p.name == "alpha")
    assert a.max < ALPHA_LIMIT and a.bounds == (0.0, ALPHA_LIMIT)
    assert spec.resolve({"alpha": a.max + 0.125})["alpha"] == a.max + 0.125
    assert spec.resolve({"alpha": ALPHA_LIMIT})["alpha"] == ALPHA_LIMIT
    for bad, msg in ((ALPHA_LIMIT + 1, f"must be <= {ALPHA_LIMIT}"), (-0.5, "must be >= 0.0"),
                     (math.inf, "finite"), (math.nan, "finite")):
        with pytest.raises(ValueError, match=rf"parameter 'alpha' {msg}" if "must" in msg else msg):
            spec.resolve({"alpha": bad})


def test_iso_cts_merges_at_the_alpha_a_script_found_best():
    import esm_core
    base, tasks = _sds(T=3)
    at1 = esm_core.merge("iso_cts", base, tasks, alpha=1.0, device="cpu")
    at = esm_core.merge("iso_cts", base, tasks, alpha=3.125, device="cpu")      # "alpha must be <= 3.0" before
    for k in base:
        assert torch.allclose(at[k] - base[k], 3.125 * (at1[k] - base[k]), atol=1e-5)
    ta = esm_core.merge("ta", base, tasks, alpha=2.5, device="cpu")             # TA's slider stops at 2.0
    assert torch.allclose(ta["w"], base["w"] + 2.5 * sum(t["w"] - base["w"] for t in tasks.values()), atol=1e-5)


def test_ui_range_stays_the_slider_range():
    p = next(p for p in SPECS["iso_cts"].params if p.name == "alpha")
    assert (p.min, p.max) == (0.0, 3.0) and p.to_dict()["limit"] == [0.0, ALPHA_LIMIT]


def test_grid_search_goes_on_past_its_upper_end_and_says_so():
    info = {}
    best, curve = A.search(lambda a: -(a - 1.5) ** 2, "ta", info=info)      # TA's grid ends at 1.0
    step = A.grid_step("ta")
    assert best == pytest.approx(1.5, abs=step / 2)
    assert len(info["extended"]) == round(0.5 / step) + 1      # up to 1.5, then one more that is worse
    assert info["extended"] == pytest.approx([1.0 + step * i for i in range(1, len(info["extended"]) + 1)])
    assert not info["at_edge"] and "upper end (1)" in info["note"] and f"{best:.4g}" in info["note"]
    assert curve == sorted(curve) and max(curve, key=lambda e: e[1])[0] == best


def test_grid_search_interior_optimum_adds_nothing():
    info = {}
    best, curve = A.search(lambda a: -(a - 0.5) ** 2, "ta", info=info)
    assert best == pytest.approx(0.5) and len(curve) == 30
    assert info == {"extended": [], "at_edge": False, "note": ""}


def test_golden_search_extends_too_and_stops_at_its_budget():
    info = {}
    best, curve = A.search(lambda a: -(a - 2.4) ** 2, "esm", info=info)     # golden on [0, 2]
    assert best == pytest.approx(2.4, abs=A.grid_step("esm"))
    assert info["extended"] and not info["at_edge"]
    info = {}
    best, _ = A.search(lambda a: a, "ta", info=info)                          # increasing: never interior
    assert len(info["extended"]) == A.EXTEND_MAX and info["at_edge"] and "still the largest" in info["note"]
    assert best == pytest.approx(1.0 + A.EXTEND_MAX * A.grid_step("ta"))
    best, curve = A.search(lambda a: a, "ta", extend=False)
    assert best == 1.0 and len(curve) == 30


def test_extension_never_passes_the_library_bound(monkeypatch):
    monkeypatch.setattr(A, "EXTEND_MAX", 10_000)
    info = {}
    best, curve = A.search(lambda a: a, "tsv_m", info=info)
    assert best == pytest.approx(ALPHA_LIMIT) and max(a for a, _ in curve) <= ALPHA_LIMIT and info["at_edge"]


# ---------------------------------------------------------------- the public API, end to end

def test_public_api_names_load_without_torch_until_used():
    import subprocess
    import sys
    code = ("import sys, esm_core; assert 'torch' not in sys.modules; "
            "assert {'probe_pool', 'merge_pool', 'task_model', 'build_esmpp', 'evaluate_routed', "
            "'routing_accuracy', 'load_text_pool', 'proxy_pool'} <= set(esm_core.__all__); "
            "esm_core.merge_pool; assert 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_api_walks_probe_merge_esmpp_evaluate_on_a_tiny_pool(tmp_path):
    import esm_core as esm
    from fake_pool import make_fake_pool
    pool = make_fake_pool()
    stats = esm.probe_pool(pool, n=16, seed=0, device="cpu")
    assert set(stats["tasks"]) == set(pool.task_names) and stats["n"] == 16
    merged = esm.merge_pool(pool, "esm", {"alpha": 0.8}, stats=stats, device="cpu")
    direct = esm.merge("esm", pool.base, pool.tasks, stats=stats, alpha=0.8, device="cpu")
    assert set(merged) == set(direct) == set(pool.base)
    for k in merged:                        # the app's route (U0 + α·slope) and a direct merge agree
        torch.testing.assert_close(merged[k], direct[k], rtol=1e-5, atol=1e-6)
    accs = esm.evaluate(pool, merged, device="cpu")
    assert list(accs) == pool.task_names and all(0.0 <= a <= 1.0 for a in accs.values())
    own = esm.task_model(merged, pool.tasks["alpha"])             # an image tower has no own keys
    assert all(own[k] is merged[k] for k in merged)
    routed = esm.build_esmpp(pool, stats, rank=4, alpha=0.8, device="cpu")
    r_accs, log = esm.evaluate_routed(pool, routed)
    per_layer = esm.routing_accuracy(log)
    assert list(r_accs) == pool.task_names and per_layer.shape == (len(routed.keys),)
    assert bool(((per_layer >= 0) & (per_layer <= 1)).all())
    path = esm.save_esmpp(tmp_path / "b.safetensors", routed.merged_sd, routed.experts, routed.config)
    again = esm.load_routed(path, lambda sd: pool.build_model(sd, device="cpu"))
    x, _ = pool.inputs(pool.task_names[0], "test")
    with torch.no_grad():
        torch.testing.assert_close(again(x[:4]), routed(x[:4]))


def test_task_model_puts_the_tasks_own_biases_back_on_a_text_merge():
    transformers = pytest.importorskip("transformers")
    import esm_core as esm
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=16)
    base = {k: v.detach().clone() for k, v in transformers.BertModel(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(1)
    tasks = {t: {k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
                 for k, v in base.items()} for t in ("a", "b")}
    merged = esm.merge("ta", base, tasks, alpha=0.5, device="cpu")
    bias = "encoder.layer.0.attention.self.query.bias"
    weight = "encoder.layer.0.attention.self.query.weight"
    assert torch.equal(merged[bias], base[bias])                  # what the merged dict silently holds
    own = esm.task_model(merged, tasks["b"])
    assert torch.equal(own[bias], tasks["b"][bias]) and own[weight] is merged[weight]
    with pytest.raises(ValueError, match="lacks its own keys"):
        esm.task_model(merged, {k: v for k, v in tasks["b"].items() if k != bias})
