import numpy as np
import pytest
import torch

from esm_core.evaluation import accuracy, runs
from esm_core.evaluation import alpha as A
from esm_core.merging import merge
from esm_core.merging import METHODS, Method, alpha_param
from esm_core.schemas import MethodSpec
from esm_core.pools.taskpool import TaskPool


class ScalarTower(torch.nn.Module):
    """Reads a scalar s from each 1×1 image (s = 2 · pixel/255) and returns features (|s − w|, 0.25).

    With the head below (identity rows), class 1 wins iff |s − w| < 0.25."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        s = (x[:, 0, 0, 0] * 0.5 + 0.5) * 2.0
        return torch.stack([(s - self.w).abs(), torch.full_like(s, 0.25)], dim=1)


class FakePool:
    """Just the attributes evaluate / search_alpha use; the tower is ScalarTower with its one weight."""

    def __init__(self, values, labels, task_w):
        raw = np.clip(np.round(np.asarray(values) / 2.0 * 255), 0, 255).astype(np.uint8)[:, None, None]
        self._pool = TaskPool(name="fake", model_name="none", base={"visual.w": torch.zeros(1)},
                              tasks={"t": {"visual.w": torch.tensor([float(task_w)])}},
                              heads={"t": torch.eye(2)}, class_names={"t": ["far", "near"]},
                              data={"t": {"val": (raw, np.asarray(labels)), "test": (raw, np.asarray(labels))}})
        self.name, self.base, self.tasks, self.cache = "fake", self._pool.base, self._pool.tasks, {}
        self.task_names = ["t"]
        self.family_module = self._pool.family_module     # its load_state: the keys without the prefix
        self.builds = 0

    def inputs(self, task, split):
        return self._pool.inputs(task, split)

    def logits(self, task, f):
        return self._pool.logits(task, f)

    def build_model(self, sd, device="cpu"):
        self.builds += 1
        m = ScalarTower()
        m.load_state_dict({k[len("visual."):]: v for k, v in sd.items()})
        return m.eval()


def _values():
    # dense around 0.7, sparse away from it: accuracy(w) = share of values within 0.25 of w, peaked at w = 0.7
    u = np.linspace(-1, 1, 201)
    return 0.7 + np.sign(u) * u ** 2 * 1.2


def test_evaluate_counts_hits_exactly():
    values = [0.1, 0.2, 0.6, 1.9]          # with w = 0.3: |s − w| < 0.25 for the first two only
    pool = FakePool(values, [1, 1, 1, 0], task_w=0.3)
    accs = accuracy.evaluate(pool, pool.tasks["t"], "test")
    assert accs == {"t": 0.75}            # 0.1, 0.2 → near (right); 0.6 → far (wrong); 1.9 → far (right)
    m = pool.build_model(pool.tasks["t"])
    assert accuracy.evaluate(pool, m, "test", batch_size=1) == accs
    with pytest.raises(ValueError, match="state dict or an nn.Module"):
        accuracy.evaluate(pool, [1, 2], "test")
    with pytest.raises(ValueError, match="no task 'x'"):
        accuracy.evaluate(pool, m, "test", tasks=["x"])


def test_summarize_normalises_by_finetuned():
    pool = FakePool([0.5], [1], task_w=0.5)
    pool.task_names = ["a", "b"]
    pool.cache[("reference_accuracies", "test")] = {"zeroshot": {}, "finetuned": {"a": 0.8, "b": 0.5}}
    s = accuracy.summarize(pool, {"a": 0.4, "b": 0.5})
    assert s["tasks"]["a"] == {"abs": 0.4, "norm": 0.5} and s["tasks"]["b"]["norm"] == 1.0
    assert s["mean_abs"] == pytest.approx(0.45) and s["mean_norm"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="no fine-tuned accuracy for task 'c'"):
        accuracy.summarize(pool, {"c": 0.1})


def test_reference_accuracies_cached():
    pool = FakePool(_values(), np.ones(201, np.int64), task_w=0.7)
    r = accuracy.reference_accuracies(pool, "val")
    assert r["zeroshot"]["t"] < r["finetuned"]["t"]
    n = pool.builds
    assert accuracy.reference_accuracies(pool, "val") is r and pool.builds == n


@pytest.fixture
def fake_ta(monkeypatch):
    def fn(ctx, alpha):
        return {k: alpha * ctx.deltas(k).sum(0) for k in ctx.keys}
    m = Method(MethodSpec("fake_ta", "fake", (alpha_param(0.3, 2.0),), "test method", alpha_grid=(0.0, 2.0, 21)), fn)
    monkeypatch.setitem(METHODS, "fake_ta", m)
    return m


def test_search_alpha_grid_finds_known_best(fake_ta):
    pool = FakePool(_values(), np.ones(201, np.int64), task_w=1.0)   # α = w; the best w is 0.7
    seen = []
    best, curve = runs.search_alpha(pool, "fake_ta", progress=lambda f, d: seen.append(f))
    assert best == pytest.approx(0.7)
    assert [a for a, _ in curve] == pytest.approx(list(np.linspace(0, 2, 21)[1:]))
    assert max(curve, key=lambda e: e[1])[0] == best
    assert len(seen) >= 20 and seen[-1] == pytest.approx(1.0)


def test_search_alpha_golden(fake_ta):
    pool = FakePool(_values(), np.ones(201, np.int64), task_w=1.0)
    best, curve = runs.search_alpha(pool, "fake_ta", strategy="golden")
    assert len(curve) <= 15 and abs(best - 0.7) < 0.06
    assert curve == sorted(curve)
    with pytest.raises(ValueError, match="strategy"):
        runs.search_alpha(pool, "fake_ta", strategy="random")


def test_golden_section_converges_on_unimodal():
    calls = []

    def f(x):
        calls.append(x)
        return -(x - 0.737) ** 2
    best, evals = A.golden_section_max(f, 0.0, 2.0)
    assert abs(best - 0.737) < 0.01 and len(evals) <= 15 and len(calls) == len(evals)
    best, evals = A.golden_section_max(lambda x: -abs(x - 1.9), 0.0, 2.0, max_evals=6)
    assert len(evals) == 6 and best > 1.5
    with pytest.raises(ValueError):
        A.golden_section_max(f, 1.0, 1.0)


def test_affine_trick_equals_direct_merge(fake_ta):
    pool = FakePool(_values(), np.ones(201, np.int64), task_w=1.0)
    u0, diff, a1 = A.affine_updates(pool.base, pool.tasks, "fake_ta")
    direct = merge("fake_ta", pool.base, pool.tasks, alpha=0.37)
    assert torch.allclose(pool.base["visual.w"] + u0["visual.w"] + 0.37 * diff["visual.w"], direct["visual.w"])


# ---------------------------------------------------------------- on the committed demo pool

@pytest.fixture(scope="module")
def demo(demo_pool):
    return demo_pool.subset(["cvdigits", "skdigits"])


def test_demo_pool_shapes_and_references(demo):
    x, y = demo.inputs("skdigits", "val")
    assert x.shape[1:] == (3, 28, 28) and len(x) == len(y) > 50
    assert set(demo.base) == set(demo.tasks["cvdigits"]) and all(k.startswith("visual.") for k in demo.base)
    r = accuracy.reference_accuracies(demo, "val")
    for t in demo.task_names:
        assert r["finetuned"][t] > r["zeroshot"][t] + 0.05      # fine-tuning helps every task
        assert 1.0 / len(demo.class_names[t]) < r["zeroshot"][t]   # the heads are better than chance


def test_demo_affine_trick_matches_ta(demo):
    u0, diff, _ = A.affine_updates(demo.base, demo.tasks, "ta")
    direct = merge("ta", demo.base, demo.tasks, alpha=0.43)
    for k in direct:
        assert torch.allclose(demo.base[k] + u0.get(k, 0) + 0.43 * diff.get(k, 0), direct[k], atol=1e-6), k


def test_methods_flagged_alpha_linear_are_and_affine_updates_merges_them_once(demo, monkeypatch):
    """Every method but ESM says its update is α times a fixed one: checked on the demo pool (α = 0 gives no
    update, α = 0.7 gives 0.7 × the α = 1 update); affine_updates then merges once, with the same result
    as the two merges; ESM (its non-ESD keys are added with coefficient 1) is not flagged and is merged twice."""
    from esm_core.merging import METHODS, merge_updates
    from esm_core.probe import probe_pool
    stats = probe_pool(demo, n=8, device="cpu")
    real = A.merge_updates
    for name, m in METHODS.items():
        kw = {"stats": stats} if m.needs_stats else {}
        u1 = merge_updates(name, demo.base, demo.tasks, alpha=1.0, **kw)
        u0 = merge_updates(name, demo.base, demo.tasks, alpha=0.0, **kw)
        linear = all(not bool(v.any()) for v in u0.values())
        assert m.alpha_linear == linear, name
        if not linear:
            continue
        u7 = merge_updates(name, demo.base, demo.tasks, alpha=0.7, **kw)
        for k in u1:
            torch.testing.assert_close(u7[k], 0.7 * u1[k], rtol=1e-6, atol=1e-9)
        calls = []
        monkeypatch.setattr(A, "merge_updates", lambda *a, **k: calls.append(k["alpha"]) or real(*a, **k))
        a0, slope, a1 = A.affine_updates(demo.base, demo.tasks, name)
        monkeypatch.setattr(A, "merge_updates", real)
        assert calls == [1.0] and a1 == 1.0
        for k in u1:
            assert a0[k].shape == u1[k].shape and not bool(a0[k].any()) and a0[k].untyped_storage().nbytes() <= 4
            assert torch.equal(slope[k], u1[k])
    calls = []
    monkeypatch.setattr(A, "merge_updates", lambda *a, **k: calls.append(k["alpha"]) or real(*a, **k))
    A.affine_updates(demo.base, demo.tasks, "esm", stats=stats)
    assert calls == [0.0, 1.0]


def test_subset_ids_are_a_seeded_sorted_subset():
    a = accuracy.subset_ids(1000, 100, seed=0)
    assert len(a) == 100 == len(set(a.tolist())) and (np.diff(a) > 0).all() and a.max() < 1000
    assert (a == accuracy.subset_ids(1000, 100, seed=0)).all() and not (a == accuracy.subset_ids(1000, 100, seed=1)).all()
    assert (accuracy.subset_ids(50, 100) == np.arange(50)).all()
