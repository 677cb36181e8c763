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
