"""``esm-studio bench`` (esm_core/bench/) on one block and two tasks: structure, not speed."""
from __future__ import annotations

import functools
import io
import json
from contextlib import redirect_stdout

import pytest
import open_clip
import torch

from esm_core import cli
from esm_core.models import openclip_vit as vit
from esm_core.bench.core import (JOB_PROVIDERS, Job, _run_cpu_job, bench, format_table, make_checkpoints, register_jobs,
                            select_jobs, vit_b32_shapes)

MiB = 1024 ** 2


@pytest.fixture(scope="module")
def cli_result():
    """One real run through the CLI (on the CPU the method runs in its own child process)."""
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = cli.main(["bench", "--blocks", "1", "--tasks", "2", "--methods", "ta", "--json"])
    assert rc == 0
    return json.loads(buf.getvalue())


def test_bench_json_structure_and_positive_peak_memory(cli_result):
    r = cli_result
    assert {"device", "blocks", "tasks", "params_per_model", "rows"} <= set(r)
    assert r["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert (r["blocks"], r["tasks"]) == (1, 2)
    assert r["params_per_model"] == sum(torch.Size(s).numel() for s in vit_b32_shapes(1).values())
    assert [row["name"] for row in r["rows"]] == ["ta"]
    out_mib = r["params_per_model"] * 4 / MiB        # the returned updates alone (float32)
    for row in r["rows"]:
        assert row["seconds"] > 0 and row["seconds"] == min(row["seconds_all"]) and len(row["seconds_all"]) == 1
        assert row["peak_extra_mib"] > 0
        assert row["peak_extra_mib"] < 50 * out_mib
        if row["memory"] == "cpu-rss":
            # the update dict the job returns is alive at the peak: a real lower bound for a fresh process
            assert row["peak_extra_mib"] >= 0.9 * out_mib
        else:
            assert row["memory"] == "cuda-allocated"


def test_table_lists_every_row(cli_result):
    text = format_table(cli_result)
    assert "peak extra MiB" in text and "1 block(s), 2 tasks" in text
    assert any(line.startswith("ta ") for line in text.splitlines())


def test_shapes_are_exactly_the_open_clip_vit_b32_visual_tower():
    model = open_clip.create_model("ViT-B-32", pretrained=None, device="meta")     # shapes only, no init
    ref = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith("visual.")}
    assert vit_b32_shapes(12) == ref
    assert list(vit_b32_shapes(12)) == list(ref)               # same key order
    assert sum(torch.Size(s).numel() for s in ref.values()) == 87_849_216
    assert len(vit.layer_types_of(vit_b32_shapes(3))) == 3 * 4


def test_checkpoints_are_seeded_and_tasks_are_small_low_rank_ish_updates():
    b1, t1 = make_checkpoints(blocks=1, tasks=2, seed=3)
    b2, t2 = make_checkpoints(blocks=1, tasks=2, seed=3)
    b3, _ = make_checkpoints(blocks=1, tasks=2, seed=4)
    k = "visual.proj"
    assert torch.equal(b1[k], b2[k]) and torch.equal(t1["task1"][k], t2["task1"][k])
    assert not torch.equal(b1[k], b3[k])
    assert set(t1) == {"task0", "task1"} and all(set(sd) == set(b1) for sd in t1.values())
    d = (t1["task0"][k] - b1[k]).double()
    s = torch.linalg.svdvals(d)
    assert s[:32].pow(2).sum() / s.pow(2).sum() > 0.9        # most energy in the low-rank part
    assert d.abs().max() < 0.1 * b1[k].abs().max()           # small next to the weights


def test_unknown_method_is_refused_and_bad_sizes_too():
    with pytest.raises(ValueError, match="unknown benchmark method"):
        select_jobs(["ta", "nope"])
    with pytest.raises(ValueError, match="blocks"):
        bench(blocks=0, tasks=2, methods=["ta"])
    with pytest.raises(ValueError, match="repeat"):
        bench(blocks=1, tasks=2, methods=["ta"], repeat=0)
    assert [j.name for j in select_jobs(["tsv_m", "ta"])] == ["tsv_m", "ta"]


def _setup_sum(base, tasks, device):
    return {"n": len(tasks)}


def _run_sum(base, tasks, device, state, scale=1.0):
    return {k: scale * state["n"] * torch.ones_like(v) for k, v in base.items()}


def _extra_jobs():
    return [Job("extra_sum", "an extra row", functools.partial(_run_sum, scale=2.0), _setup_sum, {"kind": "test"})]


def test_jobs_can_be_added_and_run_with_setup():
    register_jobs(_extra_jobs)
    try:
        assert "extra_sum" in [j.name for j in select_jobs(None)]
        job = select_jobs(["extra_sum"])[0]
        row = _run_cpu_job(job, blocks=1, tasks=1, seed=0, repeat=2)
        assert row["name"] == "extra_sum" and row["kind"] == "test" and len(row["seconds_all"]) == 2
        assert row["peak_extra_mib"] > 0
    finally:
        JOB_PROVIDERS.remove(_extra_jobs)


def test_warm_esm_rows_repeat_from_the_same_cache_state():
    """Each repeat of a warm ESM row recombines again instead of hitting the previous repeat's result."""
    from esm_core.bench.esm_rows import _run_esm, _setup_warm
    base, tasks = make_checkpoints(blocks=1, tasks=2)
    state = _setup_warm(base, tasks, torch.device("cpu"))
    before = {tag: fp for tag, (fp, _) in state["cache"].results.items()}
    a = _run_esm(base, tasks, torch.device("cpu"), state, rank_fraction=0.5)
    assert {tag: fp for tag, (fp, _) in state["cache"].results.items()} == before
    b = _run_esm(base, tasks, torch.device("cpu"), state, rank_fraction=0.5)
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_warm_rows_get_their_speedup_over_the_cold_row():
    from esm_core.bench.core import _add_speedups
    rows = [{"name": "ta", "title": "TA", "seconds": 1.0, "peak_extra_mib": 1.0},
            {"name": "esm", "title": "cold", "seconds": 12.0, "peak_extra_mib": 1.0, "cache": "cold"},
            {"name": "esm_alpha", "title": "warm", "seconds": 0.5, "peak_extra_mib": 1.0, "cache": "warm"}]
    res = _add_speedups({"blocks": 1, "tasks": 2, "params_per_model": 1e6, "device": "cpu", "memory": "m",
                         "rows": rows})
    assert res["rows"][2]["speedup_vs_cold"] == 24.0 and "speedup_vs_cold" not in res["rows"][0]
    text = format_table(res).splitlines()
    assert "24.0×" in next(line for line in text if line.startswith("esm_alpha "))
    assert res["esm_summary"] == {"unit": "seconds", "cold": 12.0, "cold_over_remerge": {"esm_alpha": 24.0}}


def test_esm_summary_sets_every_ratio_side_by_side_in_cpu_seconds():
    from esm_core.bench.core import _add_speedups
    rows = [{"name": "esm", "title": "cold", "seconds": 12.0, "cpu_seconds": 10.0, "peak_extra_mib": 1.0,
             "cache": "cold"},
            {"name": "esm_reference", "title": "ref", "seconds": 30.0, "cpu_seconds": 28.0, "peak_extra_mib": 1.0,
             "cache": "reference", "new_seconds": 11.0, "new_cpu_seconds": 8.0, "max_rel_diff": 4e-7,
             "speedup_new_vs_reference": 30 / 11},
            {"name": "esm_p_task", "title": "warm", "seconds": 0.6, "cpu_seconds": 0.5, "peak_extra_mib": 1.0,
             "cache": "warm"},
            {"name": "esm_alpha", "title": "warm", "seconds": 0.5, "cpu_seconds": 0.4, "peak_extra_mib": 1.0,
             "cache": "warm"}]
    res = _add_speedups({"blocks": 1, "tasks": 2, "params_per_model": 1e6, "device": "cpu", "memory": "m",
                         "rows": rows})
    s = res["esm_summary"]
    assert s["unit"] == "cpu_seconds" and s["reference_over_cold"] == 2.8 and s["max_rel_diff"] == 4e-7
    assert s["in_process_reference_over_new"] == 3.5
    assert s["cold_over_remerge"] == {"esm_p_task": 20.0, "esm_alpha": 25.0}
    text = format_table(res)
    assert "2.80× faster" in text and "esm_p_task      cold ÷ re-merge =    20.0×" in text
    assert json.loads(json.dumps(res))["esm_summary"] == s              # carried by --json


def test_lazy_bench_merges_from_files_and_removes_them(tmp_path, monkeypatch):
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    res = bench(blocks=1, tasks=2, methods=["ta"], device="cpu", model="ViT-B-32", lazy=True)
    assert res["lazy"] is True and res["model"] == "ViT-B-32" and [r["name"] for r in res["rows"]] == ["ta"]
    assert res["rows"][0]["peak_extra_mib"] > 0
    assert list(tmp_path.iterdir()) == []                  # the checkpoints were deleted


def test_model_shapes_and_written_checkpoints(tmp_path):
    from esm_core.bench.core import vit_shapes, write_checkpoints
    from esm_core.lazy import LazyCheckpoint
    l14 = vit_shapes("ViT-L-14")
    assert l14["visual.positional_embedding"] == (257, 1024) and l14["visual.proj"] == (1024, 768)
    assert l14["visual.transformer.resblocks.23.mlp.c_fc.weight"] == (4096, 1024)
    assert "visual.transformer.resblocks.24.ln_1.weight" not in l14
    assert sum(torch.Size(s).numel() for s in l14.values()) == 303_966_208
    base_path, paths = write_checkpoints(tmp_path, 1, 2, seed=3)
    base, tasks = make_checkpoints(blocks=1, tasks=2, seed=3)
    ck = LazyCheckpoint(paths["task1"])
    k = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    assert torch.equal(ck[k], tasks["task1"][k]) and torch.equal(LazyCheckpoint(base_path)[k], base[k])


def test_polar_rows_run_on_request_and_compare_newton_schulz_with_the_gram_route():
    from esm_core.bench.core import _notes
    names = [j.name for j in select_jobs(None)]
    assert "esm" in names and "polar_gram" not in names and "polar_ns" not in names
    job = select_jobs(["polar_ns"])[0]
    g = torch.Generator().manual_seed(0)
    full = torch.randn(30, 20, generator=g, dtype=torch.float64)
    deficient = torch.randn(20, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 20, generator=g,
                                                                                   dtype=torch.float64)
    state = {"factors": [full, deficient.mT.contiguous(), full.mT]}
    res = job.run(None, None, torch.device("cpu"), state)
    row = job.check(None, None, torch.device("cpu"), state, res)
    assert row["ns_fallbacks"] == 1 and 1 <= row["ns_steps_max"] <= 40
    assert row["polar_max_rel_diff"] < 1e-8 and row["factors"] == [[30, 20], [20, 20], [20, 30]]
    assert "1 fall-back(s)" in _notes({**row, "name": "polar_ns"})
    gram_rows = select_jobs(["polar_gram"])[0].run(None, None, torch.device("cpu"), state)
    assert [s for _, s in gram_rows] == [None] * 3
