"""Recipes that round-trip: esm-studio merge --recipe <export | config.json> repeats a merge bit for bit."""
import json

import pytest
import torch
from safetensors.torch import load_file

from esm_core import studio as S
from esm_core.cli import main
from esm_core.cli.merge import run_merge, run_proxy_merge
from esm_core.evaluation.recipes import parse_recipe, pool_difference, read_recipe
from esm_core.merging import apply_updates
from fake_pool import FAKE_MODEL
from test_cli_esm import files  # noqa: F401  (the tiny pool as files)

MODEL = ["--arch", FAKE_MODEL, "--normalisation", "half"]


def _same(a, b):
    a, b = load_file(a), load_file(b)
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_ta_recipe_round_trips_bit_for_bit(files, tmp_path, capsys):
    first = tmp_path / "ta.safetensors"
    run_merge(files["base"], files["tasks"], "ties", {"alpha": 0.7, "k": 30.0}, out=str(first), device="cpu")
    again = tmp_path / "again.safetensors"
    assert main(["merge", "--recipe", str(first), "--out", str(again), "--device", "cpu"]) == 0
    _same(first, again)
    r = read_recipe(again)
    assert (r.method, r.params, r.tasks) == ("ties", {"alpha": 0.7, "k": 30.0}, list(files["tasks"]))
    assert "recipe ta.safetensors: ties: alpha=0.7, k=30.0" in capsys.readouterr().err


def test_esm_recipe_round_trips_bit_for_bit_from_file_and_json(files, tmp_path):
    first = tmp_path / "esm.safetensors"
    run_proxy_merge(files["base"], files["tasks"], "esm", {"alpha": 0.8, "eig_exp": 0.3}, files["proxy"],
                    out=str(first), n=16, seed=5, arch=FAKE_MODEL, normalisation="half", device="cpu")
    again = tmp_path / "again.safetensors"
    assert main(["merge", "--recipe", str(first), "--out", str(again), "--device", "cpu", "--quiet"]) == 0
    _same(first, again)
    meta = json.dumps(read_recipe_raw(first))
    cfg = tmp_path / "config.json"
    cfg.write_text(meta)
    third = tmp_path / "third.safetensors"
    assert main(["merge", "--recipe", str(cfg), "--out", str(third), "--device", "cpu", "--quiet"]) == 0
    _same(first, third)
    r = read_recipe(cfg)
    assert r.proxy["n"] == 16 and r.proxy["seed"] == 5 and r.model_args == {"arch": FAKE_MODEL, "normalisation": "half"}


def read_recipe_raw(path):
    from esm_core.checkpoints import read_config
    return read_config(path)


def test_the_apps_recipe_repeats_the_apps_merge_from_files(files, tmp_path):
    pool = files["pool"]
    s = S.new_session("cpu", live_per_task=8)
    try:
        S.load_demo(s, loader=lambda: pool)
        S.merge(s, "esm", {"alpha": 0.6, "p_task": 1.0})
        app = apply_updates(pool.base, s.current["updates"])
        cfg = tmp_path / "app-config.json"
        cfg.write_text(S.export_config(s).read_text())          # the session's folder goes with it
    finally:
        S.close(s)
    out = tmp_path / "from-app.safetensors"
    tasks = [x for t, p in files["tasks"].items() for x in ("--task", f"{t}={p}")]
    proxy = [x for t, p in files["proxy"].items() for x in ("--proxy", f"{t}={p}")]
    # the app's recipe names its pool, not files: the base and task files are given
    assert main(["merge", "--recipe", str(cfg), "--out", str(out), "--device", "cpu", "--quiet"]) == 2
    assert main(["merge", "--recipe", str(cfg), "--base", files["base"], *tasks, *proxy, *MODEL, "--out", str(out),
                 "--device", "cpu", "--quiet"]) == 0
    got = load_file(out)
    for k, v in app.items():
        assert torch.equal(got[k], v), k


def test_recipe_for_other_tasks_or_other_proxy_data_is_refused(files, tmp_path, capsys):
    first = tmp_path / "esm.safetensors"
    run_proxy_merge(files["base"], files["tasks"], "esm", {}, files["proxy"], out=str(first), n=8,
                    arch=FAKE_MODEL, normalisation="half", device="cpu")
    out = tmp_path / "x.safetensors"
    names = list(files["tasks"])
    swapped = [x for t in reversed(names) for x in ("--task", f"{t}={files['tasks'][t]}")]
    assert main(["merge", "--recipe", str(first), *swapped, "--out", str(out)]) == 2
    assert f"the recipe's tasks are {names} (in this order)" in capsys.readouterr().err
    fewer = tmp_path / "fewer"
    fewer.mkdir()
    for f in sorted(__import__("pathlib").Path(files["proxy"][names[1]]).iterdir())[:30]:
        (fewer / f.name).write_bytes(f.read_bytes())
    proxy = [x for t in names for x in ("--proxy", f"{t}={fewer if t == names[1] else files['proxy'][t]}")]
    assert main(["merge", "--recipe", str(first), *proxy, "--out", str(out)]) == 2
    assert f"task {names[1]!r}: the proxy samples drawn now" in capsys.readouterr().err
    assert main(["merge", "--recipe", str(first), "--method", "ta", "--out", str(out)]) == 2
    assert "leave out --method and --set" in capsys.readouterr().err
    assert not out.exists()
    assert pool_difference(read_recipe(first), "other", names) is None      # CLI recipes name no pool
    assert "not in this pool: ['gamma']" in pool_difference(read_recipe(first), None, names[:2])


@pytest.mark.parametrize("text,msg", [
    ('{"method": "ta", "params": {"alpha": NaN}, "tasks": ["a", "b"]}', "NaN"),
    ('{"method": "ta", "method": "ties", "tasks": ["a", "b"]}', r"key\(s\) \['method'\] given twice"),
    ('{"method": "ta", "tasks": ["a", "b"], "exec": "rm -rf /"}', r"unknown key\(s\) \['exec'\]"),
    ('{"method": "ta", "params": {"alpha": 1e3}, "tasks": ["a", "b"]}', "must be <= 100.0"),
    ('{"method": "ta", "params": {"beta": 1}, "tasks": ["a", "b"]}', r"has no parameter\(s\) \['beta'\]"),
    ('{"method": "nope", "tasks": ["a", "b"]}', "nope"),
    ('{"method": "ta", "tasks": ["a", "../b"]}', "task names must be"),
    ('{"method": "ta", "tasks": {"a": 1, "b": "x"}}', "the file of task 'a'"),
    ('{"method": "esm", "tasks": ["a", "b"], "proxy": {"n": 4, "seed": 0, "ids": {"a": [0, 9, 1, 2, 3]}}}',
     "for the tasks"),
    ('{"method": "esm", "tasks": ["a"], "proxy": {"n": 4, "seed": 0, "ids": {"a": [3, 1]}}}', "increasing"),
    ('[1, 2]', "not a JSON object"),
    ('{"method": "ta", "tasks": ' + "[" * 40 + "]" * 40 + "}", "nested more than"),
])
def test_hostile_recipes_are_refused_naming_what_is_wrong(tmp_path, text, msg):
    p = tmp_path / "r.json"
    p.write_text(text)
    with pytest.raises(ValueError, match=msg):
        read_recipe(p)


def test_oversized_recipe_and_non_exports_refused_before_parsing(tmp_path, monkeypatch):
    from esm_core.checkpoints import save_safetensors
    from esm_core.evaluation import recipes
    monkeypatch.setattr(recipes, "MAX_RECIPE_BYTES", 100)
    p = tmp_path / "big.json"
    p.write_text('{"method": "ta", "tasks": ["a", "b"], "pool": "' + "x" * 200 + '"}')
    with pytest.raises(ValueError, match="larger than"):
        read_recipe(p)
    bare = save_safetensors({"w": torch.zeros(2)}, tmp_path / "bare.safetensors")
    with pytest.raises(ValueError, match="holds no merge recipe"):
        read_recipe(bare)


def test_esmpp_bundle_record_reads_as_a_recipe():
    r = parse_recipe({"method": "esm++", "rank": 8, "routed_types": "auto", "alpha": 0.5,
                      "esm_params": {"alpha": 0.5}, "tasks": ["a", "b"], "esmpp": {"tasks": ["a", "b"]}})
    assert r.is_esmpp and r.params["rank"] == 8 and r.params["alpha"] == 0.5 and r.tasks == ["a", "b"]
    # a record without routed_types takes ESM++'s default (it was refused as "not a plain value")
    r = parse_recipe({"method": "esm++", "rank": 8, "esm_params": {"alpha": 0.5}, "tasks": ["a", "b"]})
    assert r.params["routed_types"] == "auto" and r.params["rank"] == 8


# ---------------------------------------------------------------- the Merge view's "load a recipe"

def _controls():
    """Every control's default value, in the Merge view's order (as the browser would send them)."""
    from esm_core.app.common import METHODS
    values, slices = [], {}
    for name, m in METHODS.items():
        lo = len(values)
        values += [[t for t in str(p.default).split(",") if t] if (name, p.name) == ("esm", "esd_types")
                   else p.default for p in m.params]
        slices[name] = (lo, len(values))
    return tuple(values), slices


def test_merge_view_loads_a_recipe_setting_every_control_and_refuses_another_pools(files, tmp_path):
    pytest.importorskip("gradio")
    from esm_core.app.merge import recipe_updates
    from fake_pool import make_fake_pool
    pool = files["pool"]
    s = S.new_session("cpu", live_per_task=8)
    try:
        S.load_demo(s, loader=lambda: pool)
        S.merge(s, "esm", {"alpha": 0.6, "p_task": 1.0, "esd_types": "mlp.c_fc.weight"})
        cfg = tmp_path / "app.json"
        cfg.write_text(S.export_config(s).read_text())
        values, slices = _controls()
        method, ups, note, rank = recipe_updates(s, str(cfg), values, slices)
        assert method == "esm" and rank is None
        lo, hi = slices["esm"]
        from esm_core.merging import get_method
        names = [p.name for p in get_method("esm").params]
        changed = {names[i - lo]: u["value"] for i, u in enumerate(ups[lo:hi], lo) if "value" in u}
        assert changed == {"alpha": 0.6, "p_task": 1.0, "esd_types": ["mlp.c_fc.weight"]}
        assert all("value" not in u for i, u in enumerate(ups) if not lo <= i < hi)
        assert "Recipe loaded: **ESM** with alpha = 0.6" in note and "esd_types = mlp.c_fc.weight" in note
        # a CLI recipe of the same tasks (it names no pool) loads too; TIES sets TIES's controls
        ta = tmp_path / "ties.safetensors"
        run_merge(files["base"], files["tasks"], "ties", {"alpha": 0.9}, out=str(ta), device="cpu")
        method, ups, note, _ = recipe_updates(s, str(ta), values, slices)
        lo, hi = slices["ties"]
        assert method == "ties" and [u.get("value") for u in ups[lo:hi]] == [0.9, None]
        # an ESM++ recipe: its ESM merge here, its rank in the Routing view when that view's slider holds it
        for rank, want in ((8, 8), (5, None), (128, None)):
            pp = tmp_path / f"esmpp{rank}.json"
            pp.write_text(json.dumps({"method": "esm++", "rank": rank, "routed_types": "auto", "alpha": 0.5,
                                      "esm_params": {"alpha": 0.5},
                                      "tasks": list(pool.task_names), "esmpp": {"tasks": list(pool.task_names)}}))
            method, ups, note, got = recipe_updates(s, str(pp), values, slices)
            assert method == "esm" and got == want, rank
            assert ("the Routing view's rank to 8" in note) if want else (f"its rank {rank} is outside" in note)
    finally:
        S.close(s)
    other = make_fake_pool(tasks=("alpha", "beta"))
    s = S.new_session("cpu", live_per_task=8)
    try:
        S.load_demo(s, loader=lambda: other)
        with pytest.raises(ValueError, match=r"for another pool: .*not in this pool: \['gamma'\]"):
            recipe_updates(s, str(cfg), values, slices)
        bad = tmp_path / "bad.json"
        bad.write_text('{"method": "ta", "tasks": ["alpha", "beta"], "params": {"alpha": "1e999"}}')
        with pytest.raises(ValueError, match="'alpha' must be a finite number"):
            recipe_updates(s, str(bad), values, slices)
    finally:
        S.close(s)


def test_load_recipe_over_http_sets_the_controls_and_says_what_it_set(tmp_path):
    """The wiring: the Merge view's file input posts to /load_recipe; the reply sets the method and the controls."""
    gradio_client = pytest.importorskip("gradio_client")
    import os
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from esm_core.merging import METHODS
    from fake_pool import FAKE_TASKS, launch_app, make_fake_pool
    pool = make_fake_pool()
    demo, url = launch_app(lambda: pool)
    try:
        c = gradio_client.Client(url, verbose=False)
        c.predict(api_name="/init")
        values, slices = _controls()
        rec = tmp_path / "ties.json"
        rec.write_text(json.dumps({"method": "ties", "params": {"alpha": 0.9, "k": 30.0}, "tasks": list(FAKE_TASKS),
                                   "pool": "fake", "esm_studio": "0.1.0"}))
        out = c.predict(gradio_client.handle_file(str(rec)), "ta", *values, api_name="/load_recipe")
        got = [v.get("value") if isinstance(v, dict) and v.get("__type__") == "update" else v for v in out]
        method, controls, note, rank = got[0], got[1:-2], got[-2], got[-1]
        assert rank is None                                           # a TIES recipe leaves the Routing view
        lo, hi = slices["ties"]
        assert method == "ties" and list(controls[lo:hi]) == [0.9, 30.0]
        assert all(v is None for i, v in enumerate(controls) if not lo <= i < hi)     # nothing else changed
        assert "Recipe loaded: **TIES-Merging** with alpha = 0.9, k = 30.0" in note
        other = tmp_path / "other.json"
        other.write_text(json.dumps({"method": "ta", "tasks": ["cars", "dtd"]}))
        with pytest.raises(Exception, match=r"this recipe is for another pool: the recipe.{1,6}s tasks are .*cars.*dtd.*not in this pool"):
            c.predict(gradio_client.handle_file(str(other)), "ta", *values, api_name="/load_recipe")
        assert len(METHODS) == len(slices)
    finally:
        demo.close()
