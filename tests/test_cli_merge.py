"""``esm-studio merge`` end to end on tiny checkpoints (esm_core/cli/merge.py)."""
from __future__ import annotations

import io
import json
import os
import uuid

import pytest
import torch

from esm_core import cli
from esm_core.checkpoints import load_checkpoint, read_config, save_safetensors
from esm_core.cli.merge import parse_tasks, progress_bar
from esm_core.merging import METHODS, Method, Param, alpha_param, register
from esm_core.schemas import MethodSpec


def tiny(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"visual.transformer.resblocks.0.mlp.c_fc.weight": torch.randn(6, 4, generator=g),
            "visual.transformer.resblocks.0.mlp.c_fc.bias": torch.randn(6, generator=g),
            "visual.ln_post.weight": torch.randn(4, generator=g),
            "visual.proj": torch.randn(4, 3, generator=g)}


def _scaled_sum(ctx, alpha, shift):
    """θ0 + α Σt τt + shift, per key, reporting progress (a throwaway method for these tests)."""
    out = {}
    for i, k in enumerate(ctx.keys):
        out[k] = alpha * ctx.deltas(k).sum(0) + shift
        ctx.report((i + 1) / len(ctx.keys), k)
    return out


@pytest.fixture
def method():
    name = f"_cli_test_{uuid.uuid4().hex[:8]}"
    register(Method(MethodSpec(name, "test", (alpha_param(0.5, 2.0), Param("shift", float, 0.0, "added")), "test"),
                    _scaled_sum))
    yield name
    METHODS.pop(name, None)


@pytest.fixture
def stats_method():
    name = f"_cli_test_stats_{uuid.uuid4().hex[:8]}"
    register(Method(MethodSpec(name, "needs stats", (alpha_param(0.5, 2.0),), "test", needs_stats=True),
                    lambda ctx, alpha: _scaled_sum(ctx, alpha, 0.0)))
    yield name
    METHODS.pop(name, None)


@pytest.fixture
def files(tmp_path):
    """A base (.pt, task_vectors-style keys) and two tasks (.safetensors and a {"state_dict"} .ckpt)."""
    base, a, b = tiny(0), tiny(1), tiny(2)
    torch.save({**{f"model.{k}": v for k, v in base.items()}, "model_name": "tiny"}, tmp_path / "zeroshot.pt")
    save_safetensors(a, tmp_path / "a.safetensors")
    torch.save({"state_dict": b, "epoch": 1}, tmp_path / "b.ckpt")
    return tmp_path, base, a, b


def test_merge_end_to_end_json(files, method, capsys):
    d, base, a, b = files
    out = d / "merged.safetensors"
    rc = cli.main(["merge", "--base", str(d / "zeroshot.pt"), "--task", f"cars={d / 'a.safetensors'}",
                   "--task", f"dtd={d / 'b.ckpt'}", "--method", method, "--set", "alpha=0.25",
                   "--device", "cpu", "--out", str(out), "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["method"] == method and summary["params"] == {"alpha": 0.25, "shift": 0.0}
    assert summary["tasks"] == {"cars": str(d / "a.safetensors"), "dtd": str(d / "b.ckpt")}
    assert summary["out"] == str(out) and summary["keys_merged"] == 4 and summary["seconds"] >= 0
    assert "100%" in captured.err and "[" in captured.err                      # progress bar on stderr
    merged = load_checkpoint(out)
    for k in base:
        torch.testing.assert_close(merged[k], base[k] + 0.25 * ((a[k] - base[k]) + (b[k] - base[k])),
                                   rtol=0, atol=1e-6)
    cfg = read_config(out)
    assert cfg["method"] == method and cfg["params"] == {"alpha": 0.25, "shift": 0.0}
    assert cfg["tasks"] == summary["tasks"] and cfg["base"] == str(d / "zeroshot.pt")
    assert cfg["esm_studio"] and cfg["versions"]["esm_studio"] == cfg["esm_studio"] and cfg["versions"]["torch"]


def test_merge_default_params_and_text_summary(files, method, capsys):
    d, base, a, b = files
    out = d / "m.safetensors"
    rc = cli.main(["merge", "--base", str(d / "zeroshot.pt"), "--task", str(d / "a.safetensors"),
                   "--method", method, "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0 and "merged 1 task(s)" in captured.out and captured.err == ""
    assert read_config(out)["params"] == {"alpha": 0.5, "shift": 0.0}          # defaults recorded
    assert read_config(out)["tasks"] == {"a": str(d / "a.safetensors")}        # bare path: named by stem
    merged = load_checkpoint(out)
    for k in base:
        torch.testing.assert_close(merged[k], base[k] + 0.5 * (a[k] - base[k]), rtol=0, atol=1e-6)


def test_visual_only_flag(files, method, capsys):
    d, base, a, b = files
    torch.save({**base, "token_embedding.weight": torch.ones(5, 2)}, d / "full.pt")
    argv = ["merge", "--base", str(d / "full.pt"), "--task", str(d / "a.safetensors"), "--method", method,
            "--out", str(d / "v.safetensors"), "--quiet"]
    assert cli.main(argv) == 2 and "missing keys: token_embedding.weight" in capsys.readouterr().err
    assert cli.main(argv + ["--visual-only"]) == 0
    merged = load_checkpoint(d / "v.safetensors")
    assert sorted(merged) == sorted(base) and read_config(d / "v.safetensors")["visual_only"] is True


def _fails(argv, capsys) -> str:
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    errors = [ln for ln in lines if "error" in ln]
    assert len(errors) == 1 and errors[0] == lines[-1], err                  # one error line, at the end
    assert errors[0].startswith("esm-studio merge: error: ")
    return errors[0]


def test_method_needing_stats_without_proxy_data_is_refused(files, stats_method, capsys):
    d, *_ = files
    err = _fails(["merge", "--base", str(d / "zeroshot.pt"), "--task", f"a={d / 'a.safetensors'}",
                  "--method", stats_method, "--out", str(d / "m.safetensors")], capsys)
    assert f"method {stats_method!r} probes each task on its own data: give --proxy TASK=" in err
    assert not (d / "m.safetensors").exists()


def test_bad_inputs_exit_2_without_output(files, method, capsys, tmp_path):
    d, *_ = files
    out = str(d / "m.safetensors")
    common = ["--base", str(d / "zeroshot.pt"), "--method", method, "--out", out]
    torch.save(tiny(3) | {"visual.proj": torch.zeros(5, 3)}, d / "wrong.pt")
    assert "wrong.pt" in _fails(["merge", *common, "--task", f"w={d / 'wrong.pt'}"], capsys)
    assert "missing.pt" in _fails(["merge", *common, "--task", f"m={d / 'missing.pt'}"], capsys)
    assert "alpha" in _fails(["merge", *common, "--task", str(d / "a.safetensors"), "--set", "alpha=999"], capsys)
    assert "unknown method" in _fails(["merge", "--base", str(d / "zeroshot.pt"), "--task", str(d / "a.safetensors"),
                                       "--method", "no-such-method", "--out", out], capsys)
    assert ".safetensors" in _fails(["merge", "--base", str(d / "zeroshot.pt"), "--task", str(d / "a.safetensors"),
                                     "--method", method, "--out", str(d / "m.pt")], capsys)
    assert "twice" in _fails(["merge", *common, "--task", f"x={d / 'a.safetensors'}",
                              "--task", f"x={d / 'b.ckpt'}"], capsys)
    assert not os.path.exists(out) and not (d / "m.pt").exists()


def test_parse_tasks_and_progress_bar():
    assert parse_tasks(["cars=/x/a.pt", "/y/dtd.safetensors"]) == {"cars": "/x/a.pt", "dtd": "/y/dtd.safetensors"}
    with pytest.raises(ValueError, match="NAME=PATH"):
        parse_tasks(["=a.pt"])
    with pytest.raises(ValueError, match="no task"):
        parse_tasks([])
    s = io.StringIO()
    bar = progress_bar(s, width=10)
    bar(0.5, "half")
    bar(0.5, "half")                                                           # unchanged: not redrawn
    bar(1.0, "done")
    bar(1.0, "done again")                                                     # finished: stays finished
    assert s.getvalue().count("\r") == 2 and "[#####.....]  50% half" in s.getvalue()
    assert "[##########] 100% done" in s.getvalue() and s.getvalue().endswith("\n")


def test_task_arithmetic(files, capsys):
    d, base, a, b = files
    out = d / "ta.safetensors"
    rc = cli.main(["merge", "--base", str(d / "zeroshot.pt"), "--task", f"a={d / 'a.safetensors'}",
                   "--task", f"b={d / 'b.ckpt'}", "--method", "ta", "--set", "alpha=0.3", "--out", str(out),
                   "--json"])
    assert rc == 0, capsys.readouterr().err
    merged = load_checkpoint(out)
    for k in base:   # methods §1: θ = θ0 + λ Σt τt
        torch.testing.assert_close(merged[k], base[k] + 0.3 * ((a[k] - base[k]) + (b[k] - base[k])),
                                   rtol=0, atol=1e-6)


def test_python_dash_m_runs_the_cli_without_the_entry_point():
    """``python -m esm_core.cli`` (what .ci/gpu-check calls on a GPU image where the package is not installed)."""
    import json
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "esm_core.cli", "methods", "--json"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "esm" in {m["name"] for m in json.loads(out.stdout)}
    bad = subprocess.run([sys.executable, "-m", "esm_core.cli", "bench", "--device", "tpu"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "device" in bad.stderr
