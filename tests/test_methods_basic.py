"""Weight averaging, Task Arithmetic, TIES, DARE (esm_core/merging/basic.py) on hand-made tensors."""
from __future__ import annotations

import pytest
import torch

from esm_core import merge, merge_updates
from esm_core.merging.basic import ties_kept_count

W, B = "visual.transformer.resblocks.0.mlp.c_fc.weight", "visual.transformer.resblocks.0.mlp.c_fc.bias"


def two_tasks():
    """Base and two tasks: a 4×3 matrix and a bias of 4, with integer-ish task vectors."""
    base = {W: torch.arange(12, dtype=torch.float32).reshape(4, 3) / 10, B: torch.tensor([1.0, -1.0, 0.5, 0.0])}
    t1 = {W: torch.tensor([[1.0, 0, -2], [0, 3, 0], [1, 1, 1], [-1, 0, 2]]), B: torch.tensor([1.0, 0, 0, -2])}
    t2 = {W: torch.tensor([[3.0, 1, 0], [-2, 1, 0], [0, 0, 1], [1, 0, -4]]), B: torch.tensor([0.0, 2, 0, 2])}
    tasks = {"a": {k: base[k] + t1[k] for k in base}, "b": {k: base[k] + t2[k] for k in base}}
    return base, tasks, t1, t2


# ---------------------------------------------------------------------------
# Average and Task Arithmetic
# ---------------------------------------------------------------------------


def test_average_is_the_mean_of_the_models():
    base, tasks, t1, t2 = two_tasks()
    out = merge("average", base, tasks)
    for k in base:
        torch.testing.assert_close(out[k], (tasks["a"][k] + tasks["b"][k]) / 2)
    half = merge_updates("average", base, tasks, alpha=0.5)
    torch.testing.assert_close(half[W], 0.25 * (t1[W] + t2[W]))


def test_task_arithmetic_is_base_plus_alpha_sum():
    base, tasks, t1, t2 = two_tasks()
    out = merge("ta", base, tasks, alpha=0.3)
    for k in base:
        torch.testing.assert_close(out[k], base[k] + 0.3 * (t1[k] + t2[k]))
    assert merge_updates("ta", base, tasks)[B].tolist() == pytest.approx([0.3, 0.6, 0.0, 0.0])   # default α 0.3


# ---------------------------------------------------------------------------
# TIES
# ---------------------------------------------------------------------------


def ties_example():
    """Three tasks, a 2×2 matrix and a bias of 2: d = 6 entries per task vector.

    k = 50: ⌊50·6/100⌋ = 3, so the threshold is the (6 − 3) = 3rd smallest magnitude.
      τ1 = [[3, −1], [2, 0.5]], [−2, 1]   |τ1| sorted .5 1 1 2 2 3  → thr 1  → keeps 5 (tie at 1 kept)
           trimmed [[3, −1], [2, 0]], [−2, 1]
      τ2 = [[−3, 4], [1, −.25]], [2, −.5] sorted .25 .5 1 2 3 4   → thr 1
           trimmed [[−3, 4], [1, 0]], [2, 0]
      τ3 = [[.1, .2], [−.3, .4]], [−5, .6] sorted .1 .2 .3 .4 .6 5 → thr .3
           trimmed [[0, 0], [−.3, .4]], [−5, .6]
    Sums: [[0, 3], [2.7, .4]], [−5, 1.6] → signs [[0, +], [+, +]], [−, +]; Σγ = 3 → majority +,
    so the zero-sum entry (0, 0) is elected +.
    Disjoint means: (0,0) mean{3} = 3; (0,1) mean{4} = 4 (−1 disagrees); (1,0) mean{2, 1} = 1.5
    (−.3 disagrees); (1,1) mean{.4} = .4; bias0 mean{−2, −5} = −3.5 (2 disagrees); bias1 mean{1, .6} = .8.
    """
    m, b = "m.weight", "m.bias"
    base = {m: torch.tensor([[1.0, 2.0], [3.0, 4.0]]), b: torch.tensor([0.5, -0.5])}
    taus = [{m: torch.tensor([[3.0, -1.0], [2.0, 0.5]]), b: torch.tensor([-2.0, 1.0])},
            {m: torch.tensor([[-3.0, 4.0], [1.0, -0.25]]), b: torch.tensor([2.0, -0.5])},
            {m: torch.tensor([[0.1, 0.2], [-0.3, 0.4]]), b: torch.tensor([-5.0, 0.6])}]
    expected = {m: torch.tensor([[3.0, 4.0], [1.5, 0.4]]), b: torch.tensor([-3.5, 0.8])}
    return base, taus, expected


def _tasks(base, taus, sign=1.0):
    return {f"t{i}": {k: base[k] + sign * tau[k] for k in base} for i, tau in enumerate(taus)}


def test_ties_worked_example():
    base, taus, expected = ties_example()
    info = {}
    up = merge_updates("ties", base, _tasks(base, taus), alpha=0.5, k=50, info=info)
    for k in base:
        torch.testing.assert_close(up[k], 0.5 * expected[k])
    assert info["ties"]["thresholds"] == pytest.approx([1.0, 1.0, 0.3])
    assert info["ties"]["majority_sign"] == 1
    assert info["ties"]["undecided_entries"] == 1


def test_ties_majority_sign_negative_for_zero_sum_entries():
    """All task vectors negated: the majority is −, the zero-sum entry (0, 0) takes mean{−3} = −3."""
    base, taus, expected = ties_example()
    info = {}
    up = merge_updates("ties", base, _tasks(base, taus, sign=-1.0), alpha=1.0, k=50, info=info)
    for k in base:
        torch.testing.assert_close(up[k], -expected[k])
    assert info["ties"]["majority_sign"] == -1


def test_ties_trim_is_over_the_whole_model_not_per_key():
    """A key with only small entries is zeroed entirely when the other key holds the large ones."""
    base = {"a": torch.zeros(2, 2), "b": torch.zeros(3)}
    task = {"a": torch.tensor([[10.0, 20.0], [30.0, 40.0]]), "b": torch.tensor([0.1, 0.2, 0.3])}
    up = merge_updates("ties", base, {"t": task}, alpha=1.0, k=50)    # d = 7: ⌊3.5⌋ = 3, thr = 4th smallest = 10
    assert up["b"].tolist() == [0.0, 0.0, 0.0]
    torch.testing.assert_close(up["a"], task["a"])


@pytest.mark.parametrize("k", [1.0, 20.0, 37.5, 90.0])
def test_ties_keeps_floor_kd_plus_one_entries_without_ties(k):
    g = torch.Generator().manual_seed(1)
    base = {"x.weight": torch.zeros(7, 9), "x.bias": torch.zeros(11)}
    task = {key: torch.randn(v.shape, generator=g) for key, v in base.items()}   # distinct magnitudes
    up = merge_updates("ties", base, {"t": task}, alpha=1.0, k=k)
    d = 7 * 9 + 11
    kept = sum(int((v != 0).sum()) for v in up.values())
    assert kept == int(k * d / 100) + 1
    # one task: the kept entries are the task's own values, the largest ones
    flat = torch.cat([task[key].reshape(-1) for key in sorted(task)])
    got = torch.cat([up[key].reshape(-1) for key in sorted(up)])
    assert torch.equal(got[got != 0], flat[got != 0])
    assert flat[got != 0].abs().min() >= flat[got == 0].abs().max()


def test_ties_k100_keeps_everything_and_counts():
    assert ties_kept_count(6, 50) == 3
    assert ties_kept_count(10, 20) == 8
    assert ties_kept_count(10, 100) == 0
    base, tasks, t1, _ = two_tasks()
    up = merge_updates("ties", base, {"a": tasks["a"]}, alpha=1.0, k=100)
    for key in base:
        torch.testing.assert_close(up[key], t1[key])


def test_ties_disjoint_mean_two_tasks_no_trim():
    """k = 100 (no trim), two tasks: agreeing entries are averaged, disagreeing ones follow the larger sum."""
    base, tasks, t1, t2 = two_tasks()
    up = merge_updates("ties", base, tasks, alpha=1.0, k=100)
    # W row 0: t1 [1, 0, -2], t2 [3, 1, 0] → [2, 1, -2]; row 1: [0,3,0] + [-2,1,0] → [-2, 2, 0]
    # row 3: t1 [-1, 0, 2], t2 [1, 0, -4] → sums [0, 0, -2]: entry (3,0) is a zero-sum entry
    sums_sign = torch.sign(torch.cat([(t1[k] + t2[k]).reshape(-1) for k in sorted(base)])).sum()
    maj = 1.0 if sums_sign > 0 else -1.0
    torch.testing.assert_close(up[W][0], torch.tensor([2.0, 1.0, -2.0]))
    torch.testing.assert_close(up[W][1], torch.tensor([-2.0, 2.0, 0.0]))
    torch.testing.assert_close(up[W][3], torch.tensor([maj * 1.0, 0.0, -4.0]))
    torch.testing.assert_close(up[B], torch.tensor([1.0, 2.0, 0.0, maj * 2.0]))   # b3: -2 + 2 = 0 → majority (+)
    assert maj == 1.0


# ---------------------------------------------------------------------------
# DARE
# ---------------------------------------------------------------------------


def _dare_pool():
    g = torch.Generator().manual_seed(3)
    base = {"l.weight": torch.randn(20, 30, generator=g), "l.bias": torch.randn(30, generator=g)}
    tasks = {f"t{i}": {k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for i in range(2)}
    return base, tasks


@pytest.mark.parametrize("method", ["dare_ta", "dare_ties"])
def test_dare_same_seed_same_result_other_seed_other_result(method):
    base, tasks = _dare_pool()
    a = merge_updates(method, base, tasks, seed=5)
    b = merge_updates(method, base, tasks, seed=5)
    c = merge_updates(method, base, tasks, seed=6)
    for k in base:
        assert torch.equal(a[k], b[k])
        assert not torch.equal(a[k], c[k])


def test_dare_mask_of_a_key_does_not_depend_on_other_keys():
    base, tasks = _dare_pool()
    full = merge_updates("dare_ta", base, tasks, seed=2)
    only = merge_updates("dare_ta", {"l.bias": base["l.bias"]},
                         {n: {"l.bias": sd["l.bias"]} for n, sd in tasks.items()}, seed=2)
    assert torch.equal(full["l.bias"], only["l.bias"])


def test_dare_drops_about_p_and_rescales_survivors():
    base, tasks = _dare_pool()
    one = {"t0": tasks["t0"]}
    up = merge_updates("dare_ta", base, one, alpha=1.0, p=0.9, seed=0)
    tau = tasks["t0"]["l.weight"] - base["l.weight"]
    kept = up["l.weight"] != 0
    assert abs(kept.float().mean().item() - 0.1) < 0.04          # 600 entries, fixed seed
    torch.testing.assert_close(up["l.weight"][kept], tau[kept] / (1 - 0.9))


def test_dare_p0_is_the_undropped_method():
    base, tasks = _dare_pool()
    for dare, plain, extra in (("dare_ta", "ta", {}), ("dare_ties", "ties", {"k": 30.0})):
        a = merge_updates(dare, base, tasks, alpha=0.4, p=0.0, **extra)
        b = merge_updates(plain, base, tasks, alpha=0.4, **extra)
        for k in base:
            torch.testing.assert_close(a[k], b[k])


def test_dare_mean_over_seeds_approaches_task_arithmetic():
    """E[drop-and-rescale] = τ: averaged over 300 fixed seeds the DARE-TA update is close to TA's."""
    base, tasks = _dare_pool()
    ta = merge_updates("ta", base, tasks, alpha=1.0)
    acc = {k: torch.zeros_like(v) for k, v in ta.items()}
    n = 300
    for s in range(n):
        up = merge_updates("dare_ta", base, tasks, alpha=1.0, p=0.5, seed=s, check=False)
        for k in acc:
            acc[k] += up[k] / n
    for k in ta:
        rel = ((acc[k] - ta[k]).norm() / ta[k].norm()).item()
        assert rel < 0.15, (k, rel)          # expected about sqrt(1/300) ≈ 0.06
    # and a single draw is far from it (the test above is not trivially true)
    one = merge_updates("dare_ta", base, tasks, alpha=1.0, p=0.5, seed=0)
    assert ((one["l.weight"] - ta["l.weight"]).norm() / ta["l.weight"].norm()).item() > 0.5


# ---------------------------------------------------------------------------
# One key walk with progress for every method's loop (issue 25)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("method,label,start", [("ta", "task arithmetic", 0.0), ("average", "average", 0.0),
                                                ("ties", "TIES", 0.3), ("tsv_m", "TSV-M", 0.0),
                                                ("iso_c", "Iso-C", 0.0), ("iso_cts", "Iso-CTS", 0.0)])
def test_every_key_loop_reports_after_each_key(method, label, start):
    base, tasks, _, _ = two_tasks()
    seen = []
    merge_updates(method, base, tasks, roles={W: "matrix", B: "vector"}, layer_types={W: "mlp.c_fc.weight"},
                  device="cpu", progress=lambda f, d: seen.append((round(f, 6), d)))
    walk = [s for s in seen if not s[1].startswith("TIES: trim")]
    assert walk == [(round(start + (1 - start) * 0.5, 6), f"{label}: {W}"), (1.0, f"{label}: {B}")]


def test_a_raising_progress_stops_the_walk_between_two_keys():
    base, tasks, _, _ = two_tasks()
    seen = []

    def stop(frac, desc):
        seen.append(desc)
        raise KeyboardInterrupt("stop")

    with pytest.raises(KeyboardInterrupt):
        merge_updates("ta", base, tasks, roles={W: "matrix", B: "vector"}, layer_types={}, device="cpu", progress=stop)
    assert seen == [f"task arithmetic: {W}"]                     # the second key was never started
