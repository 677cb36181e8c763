"""``esm-studio bench --app-memory`` end to end on a tiny pool: every step's row with resident memory and the
bytes of statistics and caches (structure, not speed: nothing here is timed)."""
from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout

import pytest

from esm_core import cli
from esm_core.bench import app_memory as am
from esm_core.bench import core

# a tower open_clip does not name: the upload infers it (width 64, head width 32, 32 px images)
TINY = dict(width=64, patch=8, image=32, mlp=256, out_dim=32, blocks=2)
STEPS = ["written", "upload", "spectra", "merge ta", "merge esm", "esm++"]


@pytest.fixture(scope="module")
def run():
    mp = pytest.MonkeyPatch()
    mp.setitem(core.MODELS, "tiny", TINY)
    mp.setenv("ESM_STUDIO_MMAP_THRESHOLD_MIB", "0")      # the app's allocator setting is process-wide: not here
    mp.setattr(am, "write_image_zips",
               lambda folder, tasks, classes, per_class, size, seed: _zips(folder, tasks, classes, per_class, seed))
    out, err = io.StringIO(), io.StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            rc = cli.main(["bench", "--app-memory", "--model", "tiny", "--app-memory-tasks", "2",
                           "--app-memory-threads", "1", "--json"])
    finally:
        mp.undo()
    assert rc == 0, err.getvalue()
    return json.loads(out.getvalue()), err.getvalue()


def _zips(folder, tasks, classes, per_class, seed):
    return ORIG_ZIPS(folder, tasks, classes=3, per_class=4, size=32, seed=seed)


ORIG_ZIPS = am.write_image_zips


def test_every_step_has_a_row_with_resident_memory_and_statistics_and_cache_sizes(run):
    res, _ = run
    assert res["config"]["model"] == "tiny" and res["config"]["tasks"] == 2 and res["config"]["blocks"] == 2
    assert res["config"]["mmap_threshold_mib"] is None                  # ESM_STUDIO_MMAP_THRESHOLD_MIB=0
    rows = res["rows"]
    assert [r["step"] for r in rows] == STEPS
    for r in rows:
        assert r["rss_anon_mib"] + r["rss_file_mib"] <= r["rss_mib"] + 1
        assert r["seconds"] >= 0 and r["rss_mib"] > 0 and r["peak_mib"] >= r["rss_mib"] * 0.5
        assert r["peak_so_far_mib"] >= r["peak_mib"]
    by = {r["step"]: r for r in rows}
    for name in STEPS[1:]:
        assert {"stats_mib", "cache_mib", "checkpoints_mib", "images_mib", "merges_mib", "esmpp_mib"} <= set(by[name])
    assert by["upload"]["stats_mib"] == 0 and by["upload"]["checkpoints_mib"] > 0
    # the tasks' checkpoints are on the session's disk, read lazily: in memory, the base alone
    assert by["upload"]["disk_mib"] >= 2 * by["upload"]["checkpoints_mib"] * 0.99
    # the Spectra view fills the cache; its statistics then go to the session's disk (the means stay)
    assert by["spectra"]["cache_mib"] > 0 and by["spectra"]["disk_mib"] > by["upload"]["disk_mib"]
    assert by["spectra"]["stats_mib"] < 0.05 * (by["spectra"]["disk_mib"] - by["upload"]["disk_mib"])
    assert by["merge ta"]["merges_mib"] > 0
    assert by["esm++"]["esmpp_mib"] > 0


def test_rows_are_printed_as_each_step_ends(run):
    _, err = run
    lines = [ln for ln in err.splitlines() if ln.startswith("step ")]
    assert [ln.split("  ")[0][len("step "):] for ln in lines] == STEPS
    assert all("RSS MiB" in ln and "stats MiB" in ln and "caches MiB" in ln for ln in lines)


def test_table_lists_every_step(run):
    res, _ = run
    table = am.format_table(res)
    assert all(f"| {s} |" in table for s in STEPS)


def test_session_bytes_counts_each_storage_in_its_first_part(sess):
    from esm_core import studio as S
    S.merge(sess, "ta", {"alpha": 0.4})
    sess.current["alias"] = sess.pool.base                # storage the checkpoints part already counted
    b = am.session_bytes(sess)
    assert b["checkpoints"] == S.tensor_bytes(sess.pool.base, sess.pool.tasks) > 0
    assert b["merges"] == S.tensor_bytes(sess.affine, sess.current) - S.tensor_bytes(sess.pool.base) > 0


def test_the_current_merge_holds_no_update_of_its_own(sess):
    """The current merge's update is ``U0 + α · slope`` over the cached affine pair, formed when read: it adds no
    storage to the session's (one model's worth less), and the export, full evaluation and alignment read it."""
    import torch
    from esm_core import studio as S
    from esm_core.evaluation.alpha import UpdatesAt
    S.merge(sess, "ta", {"alpha": 0.4})
    seen: set = set()
    S.tensor_bytes(sess.affine, seen=seen)
    assert S.tensor_bytes(sess.current, seen=seen) == 0
    ups = sess.current["updates"]
    (u0, slope), = sess.affine.values()
    assert isinstance(ups, UpdatesAt) and set(ups) == set(u0) and len(ups) == len(u0)
    key = next(iter(u0))
    assert key in ups and "no such key" not in ups
    torch.testing.assert_close(ups[key], u0[key] + 0.4 * slope[key], rtol=0, atol=0)
    with pytest.raises(KeyError):
        ups["no such key"]
    assert S.export_merged(sess).stat().st_size > 0 and S.alignment(sess)


@pytest.mark.parametrize("method, params", [("ta", {"alpha": 0.4}), ("esm", {"alpha": 0.8}),
                                            ("ties", {"alpha": 0.7})])
def test_cached_zero_u0_takes_no_memory_and_merges_are_unchanged(pool, method, params):
    """Task Arithmetic's update (ESM's on its ESD layers, most of the model) at α = 0 is zero: the session keeps it as a one-element view, and the
    merge (and a later α change, recombined from the cache) still equals the method's own update."""
    import torch

    import esm_core
    from esm_core import studio as S
    s = S.new_session("cpu", live_per_task=8)
    S.load_demo(s, loader=lambda: pool)
    try:
        S.merge(s, method, params)
        (u0, slope), = s.affine.values()
        held = {k: S.tensor_bytes(v) for k, v in u0.items()}
        if method == "ta":
            assert all(b == 4 for b in held.values())        # one float32 per key
        if method == "esm":                                  # its ESD layers (the others do not scale with α)
            assert all(held[k] == 4 for k in S.esd_keys(s))
        assert {k: tuple(v.shape) for k, v in u0.items()} == {k: tuple(v.shape) for k, v in slope.items()}
        stats = S.ensure_stats(s) if method == "esm" else None
        for alpha in (params["alpha"], 0.25):
            if alpha != params["alpha"]:
                S.merge(s, method, {**params, "alpha": alpha})
            want = esm_core.merge_updates(method, pool.base, pool.tasks, alpha=alpha, stats=stats)
            for k, v in want.items():
                torch.testing.assert_close(s.current["updates"][k], v, rtol=1e-4, atol=1e-6)
            assert all(s.current["updates"][k].stride() == v.contiguous().stride() for k, v in want.items())
    finally:
        S.close(s)


def test_spectra_first_then_esm_reuses_every_decomposition(pool):
    """The app's order (Spectra view, then an ESM merge): the merge computes no ESD again, its update is the
    method's own, and the spectra rows are those of the analysis on its own cache."""
    import numpy as np
    import torch

    import esm_core
    from esm_core import analysis
    from esm_core import studio as S
    s = S.new_session("cpu", live_per_task=8)
    S.load_demo(s, loader=lambda: pool)
    formed, trims = [], []
    real_delta = analysis._delta
    import esm_core.studio.inspect as inspect_mod
    real_trim = inspect_mod.trim_heap
    try:
        analysis._delta = lambda *a: formed.append(a[2:]) or real_delta(*a)
        inspect_mod.trim_heap = lambda *a, **k: trims.append(len(formed)) or real_trim(*a, **k)
        try:
            rows = S.spectra_at(s, 1.0)
        finally:
            analysis._delta = real_delta
            inspect_mod.trim_heap = real_trim
        assert sorted(formed) == sorted(set(formed))      # each (task, key) update formed (and read) once
        # freed working memory goes back to the system after every layer, not once at the end (peak 6.2 → 4.8 GiB)
        T, n_keys = len(pool.task_names), len(S.esd_keys(s))
        after_each_key = [t for t in trims if t > 0][:n_keys]     # (updates formed so far, at each trim)
        assert after_each_key == [T * (i + 1) for i in range(n_keys)]
        # the statistics went to the session's folder once decomposed (the means stay in memory)
        assert all(st.spilled for layers in s.stats["tasks"].values() for st in layers.values())
        assert list((s.workdir / "stats").glob("*.npy"))
        calls = s.cache.esd_calls
        assert calls == len(S.esd_keys(s)) * len(pool.task_names)
        S.merge(s, "esm", {"alpha": 0.8})
        assert s.cache.esd_calls == calls
        want = esm_core.merge_updates("esm", pool.base, pool.tasks, alpha=0.8, stats=s.stats)
        for k, v in want.items():
            torch.testing.assert_close(s.current["updates"][k], v, rtol=1e-4, atol=1e-6)
        ref = analysis.spectra(pool.base, pool.tasks, s.stats, keys=S.esd_keys(s))
        assert [(r["key"], r["task"]) for r in rows] == [(r["key"], r["task"]) for r in ref]
        for a, b in zip(rows, ref):
            for f in ("esd_energy_kept", "svd_energy_kept", "esd_lambda"):
                np.testing.assert_allclose(np.asarray(a[f], dtype=float), np.asarray(b[f], dtype=float),
                                           rtol=1e-5, atol=1e-9)
        ov = S.overlap(s, S.esd_keys(s)[0])
        assert s.cache.esd_calls == calls and len(ov["layers"]) == 1
    finally:
        S.close(s)
