"""The CUDA path, checked against the CPU: every method, ESM's re-merges, probe, evaluation, ESM++ routing, the app.

These tests run where CUDA is (``.ci/gpu-check`` runs them on a lent GPU
machine); elsewhere they are skipped. ``ESM_TEST_DEVICE=cpu`` runs them with
the CPU as the device under test, which checks the tests themselves (each
comparison is then CPU against CPU).
"""
from __future__ import annotations

import os

import pytest
import torch

from esm_core.bench.core import make_checkpoints
from esm_core.bench.esm_rows import max_rel_diff, random_stats
from esm_core.merging import METHODS, merge_updates
from esm_core.merging.esm import new_cache

DEVICE = os.environ.get("ESM_TEST_DEVICE", "cuda")

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs CUDA")]

# Relative Frobenius difference allowed between the device's and the CPU's merged updates, per key: float32
# products in other orders and other eigen/SVD kernels (every matrix here has a spread spectrum, so the
# decompositions are unique up to signs, which the methods cancel).
TOL = 1e-4


@pytest.fixture(scope="module")
def small():
    """A ViT-B/32-shaped block, 4 tasks, and random ESD statistics of the probe's size."""
    base, tasks = make_checkpoints(blocks=1, tasks=4)
    return base, tasks, random_stats(base, tasks)


def test_the_devices_polar_route_equals_the_cpus_gram_route():
    """On CUDA the isotropic factor takes Newton–Schulz products (float64); within 1e-6 of the CPU's Gram route
    on an ill-conditioned matrix (σ from 1 to 1e-5) and, on its row space, a rank-deficient one (which falls
    back to the SVD: its polar factor is not unique off that space)."""
    from esm_core.merging import polar as polar_mod
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(600, 400, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(400, 400, generator=g, dtype=torch.float64))[0]
    x = u @ torch.diag(torch.logspace(0, -5, 400, dtype=torch.float64)) @ v.mT
    deficient = x.clone()
    deficient[:, 200:] = deficient[:, :200]                       # rank 200 of 400
    rows = torch.linalg.svd(deficient)[2][:200].mT            # its row space: there the polar factor is unique
    for m, on in ((x, torch.eye(400, dtype=torch.float64)), (deficient, rows)):
        dev = polar_mod.isotropic(m.to(DEVICE))
        cpu = polar_mod.isotropic(m, route="gram")
        assert dev.device.type == torch.device(DEVICE).type
        assert float(((dev.cpu() - cpu) @ on).norm() / (cpu @ on).norm()) < 1e-6
    if torch.device(DEVICE).type == "cuda":
        assert polar_mod.polar_route(DEVICE) == "newton_schulz"
        assert polar_mod.polar_newton_schulz(x.to(DEVICE))[2] <= 30
        assert polar_mod.polar_newton_schulz(deficient.to(DEVICE)) is None


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_on_the_device_equals_the_cpu(small, method):
    base, tasks, stats = small
    kw = {"stats": stats} if METHODS[method].needs_stats else {}
    if method.startswith("dare"):      # masks come from a generator on the merge device: p = 0 keeps every entry
        kw["p"] = 0.0
    dev = merge_updates(method, base, tasks, device=DEVICE, check=False, **kw)
    cpu = merge_updates(method, base, tasks, device="cpu", check=False, **kw)
    assert set(dev) == set(cpu) and all(v.device.type == "cpu" for v in dev.values())
    assert max_rel_diff(dev, cpu) < TOL


def test_dare_on_the_device_is_reproducible_and_drops_what_it_says(small):
    base, tasks, _ = small
    a = merge_updates("dare_ta", base, tasks, device=DEVICE, check=False, p=0.5, seed=3)
    b = merge_updates("dare_ta", base, tasks, device=DEVICE, check=False, p=0.5, seed=3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    one = {"t": tasks["task0"]}
    d = merge_updates("dare_ta", base, one, device=DEVICE, check=False, p=0.5, seed=3, alpha=1.0)
    key = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    kept = float((d[key] != 0).double().mean())
    assert abs(kept - 0.5) < 0.01
    nz = d[key] != 0                   # survivors are rescaled by 1 / (1 − p)
    torch.testing.assert_close(d[key][nz], 2 * (tasks["task0"][key] - base[key])[nz], rtol=1e-5, atol=1e-7)


def test_esm_remerges_on_the_device_equal_fresh_merges(small):
    """Every knob's re-merge from a warm cache on the device equals a cold merge there (and the cache is hit)."""
    base, tasks, stats = small
    cache = new_cache()
    merge_updates("esm", base, tasks, device=DEVICE, check=False, stats=stats, cache=cache)
    calls = cache.esd_calls
    for knob in ({"rank_fraction": 0.5}, {"p_task": 1.0}, {"p_dim": 1.0}, {"p_layer": 1.0}, {"eig_exp": 0.3},
                 {"ortho_factor": 1.5}, {"alpha": 0.7}):
        warm = merge_updates("esm", base, tasks, device=DEVICE, check=False, stats=stats, cache=cache, **knob)
        cold = merge_updates("esm", base, tasks, device=DEVICE, check=False, stats=stats, **knob)
        assert max_rel_diff(warm, cold) < 1e-5, knob
    assert cache.esd_calls == calls            # no decomposition recomputed


def _stats_close(a: dict, b: dict) -> None:
    assert set(a["tasks"]) == set(b["tasks"])
    for t in a["tasks"]:
        assert set(a["tasks"][t]) == set(b["tasks"][t])
        for k, sa in a["tasks"][t].items():
            sb = b["tasks"][t][k]
            assert sa.n == sb.n
            ga, gb = sa.gram.double(), sb.gram.double()
            assert float((ga - gb).norm() / gb.norm()) < 1e-4, (t, k)


@pytest.fixture(scope="module")
def demo_stats(demo_pool):
    from esm_core.probe import probe_pool
    return probe_pool(demo_pool, device="cpu")


def test_probe_on_the_device_matches_the_cpu(demo_pool, demo_stats):
    from esm_core.probe import probe_pool
    _stats_close(probe_pool(demo_pool, device=DEVICE), demo_stats)


def _accs_close(a: dict, b: dict, sizes: dict | None = None) -> None:
    """Accuracies equal up to predictions at near-ties: 0.5 % of a task's samples, or one sample of a small set."""
    assert set(a) == set(b)
    for t in a:
        n = (sizes or {}).get(t)
        tol = max(0.005, 1.0 / n) if n else 0.005
        assert abs(a[t] - b[t]) <= tol + 1e-12, (t, a[t], b[t], n)


def test_evaluation_and_a_merge_on_the_device_match_the_cpu(demo_pool, demo_stats):
    from esm_core.evaluation import evaluate, merged_state
    sizes = {t: int(demo_pool.inputs(t, "test")[1].shape[0]) for t in demo_pool.task_names}
    _accs_close(evaluate(demo_pool, demo_pool.base, "test", device=DEVICE),
                evaluate(demo_pool, demo_pool.base, "test", device="cpu"), sizes)
    dev = merged_state(demo_pool, "esm", None, 1.0, stats=demo_stats, device=DEVICE)
    cpu = merged_state(demo_pool, "esm", None, 1.0, stats=demo_stats, device="cpu")
    assert max_rel_diff(dev, cpu) < TOL
    _accs_close(evaluate(demo_pool, dev, "test", device=DEVICE), evaluate(demo_pool, cpu, "test", device="cpu"),
                sizes)


def test_esmpp_routing_on_the_device_matches_the_cpu(demo_pool, demo_stats):
    """ESM++ built and routed on the device: the routed model lives there, and its per-layer choices and
    accuracies agree with the CPU's."""
    from esm_core.evaluation.esmpp import build_esmpp, evaluate_routed
    dev = build_esmpp(demo_pool, demo_stats, rank=8, alpha=1.0, device=DEVICE)
    cpu = build_esmpp(demo_pool, demo_stats, rank=8, alpha=1.0, device="cpu")
    assert {p.device.type for p in dev.parameters()} == {torch.device(DEVICE).type}
    for mode in ("route", "oracle"):
        a_dev, log_dev = evaluate_routed(demo_pool, dev, "test", mode=mode)
        a_cpu, log_cpu = evaluate_routed(demo_pool, cpu, "test", mode=mode)
        _accs_close(a_dev, a_cpu)
        assert torch.equal(log_dev.true, log_cpu.true)
        agree = float((log_dev.chosen == log_cpu.chosen).double().mean())
        assert agree >= 0.99, (mode, agree)


def test_text_esmpp_on_the_device_matches_the_cpu(tiny_text_pool_dir):
    """The text family on the device: probe, ESM merge, ESM++ routing on non-padding tokens."""
    from esm_core.evaluation.esmpp import build_esmpp, evaluate_routed
    from esm_core.pools.text_pool import load_text_task_pool
    from esm_core.probe import probe_pool
    tpool = load_text_task_pool(tiny_text_pool_dir[0])
    stats = probe_pool(tpool, n=8, device="cpu")
    _stats_close(probe_pool(tpool, n=8, device=DEVICE), stats)
    dev = build_esmpp(tpool, stats, rank=4, alpha=1.0, device=DEVICE)
    cpu = build_esmpp(tpool, stats, rank=4, alpha=1.0, device="cpu")
    a_dev, log_dev = evaluate_routed(tpool, dev, "test")
    a_cpu, log_cpu = evaluate_routed(tpool, cpu, "test")
    _accs_close(a_dev, a_cpu)
    assert float((log_dev.chosen == log_cpu.chosen).double().mean()) >= 0.99


def test_the_apps_session_on_the_device_matches_the_cpu(pool):
    """The studio (what the app's handlers call) with its device set to the one under test: spectra, a TA and an
    ESM merge with their live accuracies, and an ESM++ routing run agree with a CPU session."""
    from esm_core import studio as S
    runs = {}
    for dev in (DEVICE, "cpu"):
        s = S.new_session(dev, live_per_task=16, alpha_per_task=12)
        try:
            S.load_demo(s, loader=lambda: pool)
            ta = S.merge(s, "ta", {"alpha": 0.4})
            esm = S.merge(s, "esm", {"alpha": 0.8})
            spectra = S.spectra_at(s, 1.0)
            routing = S.run_routing(s, rank=4, per_task=3)
            runs[dev] = (ta["accs"], esm["accs"], spectra, routing)
        finally:
            S.close(s)
    (ta_d, esm_d, sp_d, ro_d), (ta_c, esm_c, sp_c, ro_c) = runs[DEVICE], runs["cpu"]
    sizes = {t: 16 for t in ta_c}
    _accs_close(ta_d, ta_c, sizes)
    _accs_close(esm_d, esm_c, sizes)
    assert len(sp_d) == len(sp_c)
    for rd, rc in zip(sp_d, sp_c):                 # the Spectra view's numbers: ESD energy kept at the default k
        assert rd["k"] == rc["k"] and abs(rd["esd_kept_at_k"] - rc["esd_kept_at_k"]) < 1e-4
    agree = float((torch.as_tensor(ro_d["choices"]) == torch.as_tensor(ro_c["choices"])).double().mean())
    assert agree >= 0.95 and ro_d["true"] == ro_c["true"]
    _accs_close(ro_d["routed_accuracy"], ro_c["routed_accuracy"], sizes)
