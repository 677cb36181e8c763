"""Sweeps (esm_core.evaluation.sweeps), ESM's ``directions`` knob, the ``esm-studio sweep`` command."""
from __future__ import annotations

import pytest
import torch

import esm_core
from esm_core.models import openclip_vit as vit

from test_esm import _case, _polar_svd, _upd


# ---------------------------------------------------------------------------
# ESM with directions="svd": the formula written out with torch.linalg.svd
# ---------------------------------------------------------------------------


def _ref_esm_svd(base, tasks, alpha=1.0, rank=0, p_task=2.0, p_dim=2.0, p_layer=2.0, eig=0.15, f=2.0):
    """ESM (methods §6) with each task's directions P the left singular vectors of ΔWt and λ = s² — every other
    step as in the ESD version; TSV-M keys and the mean of the other keys as there."""
    names = list(tasks)
    T = len(names)
    ups, esd_keys = {}, vit.esd_keys(base)
    for key, b in base.items():
        Ds = [tasks[n][key].double() - b.double() for n in names]
        if key in esd_keys:
            m, n_in = Ds[0].shape
            k = rank or m // T
            norms = [float(d.norm()) for d in Ds]
            us, vs = [], []
            for t in range(T):
                U, s, _ = torch.linalg.svd(Ds[t], full_matrices=True)     # all m left singular vectors
                lam = torch.zeros(m, dtype=torch.float64)
                lam[: s.numel()] = s ** 2
                Ph = U[:, :k]
                e = (lam[:k] / lam[:k].mean()) ** eig
                e = e / e.mean()
                us.append(Ph * e)
                vs.append(e[:, None] * (Ph.T @ Ds[t]) * (norms[t] / (sum(norms) / T)) ** p_task)
            Uc, V = torch.cat(us, 1), torch.cat(vs, 0)
            c = V.norm(dim=0) / V.norm(dim=0).mean()
            V = V * c ** p_dim
            ups[key] = f * (_polar_svd(Uc) * torch.linalg.svdvals(Uc).mean()) @ (
                _polar_svd(V) * torch.linalg.svdvals(V).mean())
        elif b.ndim == 2:
            k = int(min(b.shape) / T)
            svs = [torch.linalg.svd(d, full_matrices=False) for d in Ds]
            Uc = torch.cat([u[:, :k] for u, _, _ in svs], 1)
            sc = torch.cat([s[:k] for _, s, _ in svs])
            Vc = torch.cat([vh[:k] for _, _, vh in svs], 0)
            ups[key] = (_polar_svd(Uc) * sc) @ _polar_svd(Vc)
        else:
            ups[key] = sum(Ds) / T
    for typ in vit.LAYER_TYPES:
        ks = [k for k in ups if vit.layer_type(k) == typ]
        nrm = {k: float(ups[k].norm()) for k in ks}
        mean = sum(nrm.values()) / len(ks)
        for k in ks:
            ups[k] = ups[k] * (nrm[k] / mean) ** p_layer
    return {k: (alpha * v if k in esd_keys else v) for k, v in ups.items()}


@pytest.mark.parametrize("params", [{}, {"rank": 2, "alpha": 0.7},
                                    {"p_task": 0.0, "p_dim": 0.0, "p_layer": 0.0},
                                    {"p_task": 1.0, "p_dim": 3.0, "eig_exp": 0.4, "p_layer": 0.5}])
def test_svd_directions_equal_the_formula_written_out(params):
    base, tasks, _ = _case(T=3)
    got = _upd(esm_core.merge("esm", base, tasks, directions="svd", **params), base)   # no statistics given
    ref = _ref_esm_svd(base, tasks, alpha=params.get("alpha", 1.0), rank=params.get("rank", 0),
                       p_task=params.get("p_task", 2.0), p_dim=params.get("p_dim", 2.0),
                       p_layer=params.get("p_layer", 2.0), eig=params.get("eig_exp", 0.15))
    assert set(got) == set(ref)
    for k in ref:
        err = float((got[k] - ref[k]).norm() / ref[k].norm().clamp_min(1e-30))
        assert err < 1e-5, (k, err)


def test_svd_directions_beyond_the_rank_of_the_update():
    """T = 1 on a 12 × 8 c_fc: k = 12 > rank(ΔW) = 8, the last 4 directions have λ = 0 (completed, zero weight)."""
    base, tasks, _ = _case(T=1)
    got = _upd(esm_core.merge("esm", base, tasks, directions="svd"), base)
    ref = _ref_esm_svd(base, tasks)
    for k in ref:
        err = float((got[k] - ref[k]).norm() / ref[k].norm().clamp_min(1e-30))
        assert err < 3e-5, (k, err)


def test_svd_and_esd_directions_differ_and_are_cached_apart():
    base, tasks, inputs = _case(T=2)
    cache = esm_core.merging.esm.new_cache()
    info = {}
    a = esm_core.merge("esm", base, tasks, inputs=inputs, cache=cache)
    b = esm_core.merge("esm", base, tasks, inputs=inputs, cache=cache, directions="svd", info=info)
    c = esm_core.merge("esm", base, tasks, inputs=inputs, directions="svd")
    key = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    assert not torch.allclose(a[key], b[key])
    assert info["esm"]["directions"] == "svd"
    for k in b:
        assert torch.equal(b[k], c[k])
    with pytest.raises(ValueError, match="directions"):
        esm_core.merge("esm", base, tasks, inputs=inputs, directions="pca")


# ---------------------------------------------------------------------------
# Sweeps: every point is the single evaluation it stands for
# ---------------------------------------------------------------------------

import json  # noqa: E402

import numpy as np  # noqa: E402

from esm_core.evaluation import evaluate_method, sweeps  # noqa: E402
from esm_core.evaluation.esmpp import evaluate_esmpp  # noqa: E402
from esm_core.studio.export import export_sweep  # noqa: E402
from esm_core.probe import probe, probe_pool  # noqa: E402
from fake_pool import make_fake_pool  # noqa: E402

IMG = 12          # evaluation inputs per task and split in these tests (the fake pool has 24)
PROXY = 4


@pytest.fixture(scope="module")
def pool():
    return make_fake_pool()


def _same(row, summary, view):
    """The sweep's row holds exactly the single evaluation's numbers."""
    assert row["alpha"] == summary["alpha"]
    assert row["mean_abs"] == summary["mean_abs"] and row["mean_norm"] == summary["mean_norm"]
    for t, v in summary["tasks"].items():
        assert row[f"acc:{t}"] == v["abs"]
        assert row[f"n:{t}"] == len(view.inputs(t, "test")[1]) == IMG


def test_eval_view_shares_weights_and_subsets_inputs(pool):
    view = sweeps.eval_view(pool, ["beta", "gamma"], IMG)
    assert view.task_names == ["beta", "gamma"]
    assert view.tasks["beta"] is pool.tasks["beta"] and view.base is pool.base
    x, y = pool.inputs("beta", "test")
    ids = torch.from_numpy(np.sort(np.random.default_rng(0).choice(len(y), IMG, replace=False)))
    vx, vy = view.inputs("beta", "test")
    assert torch.equal(vx, x[ids]) and torch.equal(vy, y[ids])
    assert sweeps.eval_view(pool) is pool
    with pytest.raises(ValueError, match="max_images must be >= 1"):
        sweeps.eval_view(pool, None, 0)
    with pytest.raises(ValueError, match="no task 'delta'"):
        sweeps.eval_view(pool, ["delta"], IMG)


def test_ablation_rows_equal_single_evaluations(pool):
    res = sweeps.ablation(pool, max_images=IMG, proxy_n=PROXY, use_cache=False)
    assert [r["row"] for r in res["rows"]] == ["svd", "svd+polar", "esd", "esd+layer", "esm"]
    view = sweeps.eval_view(pool, None, IMG)
    stats = probe_pool(pool, n=PROXY)
    for row, (_, _, params) in zip(res["rows"], sweeps.ABLATION_ROWS):
        if row["row"] in ("svd", "esd+layer"):                  # one of each kind (all of them: 3× the time)
            _same(row, evaluate_method(view, "esm", params, stats=stats), view)
        assert json.loads(row["params"]) == params
        lo, hi = row["mean_abs"] - row["mean_abs_hw"], row["mean_abs"] + row["mean_abs_hw"]
        assert 0 < row["mean_abs_hw"] < 0.5 and lo < row["mean_abs"] < hi and row["n"] == 3 * IMG
        for t in pool.task_names:
            assert row[f"lo:{t}"] <= row[f"acc:{t}"] <= row[f"hi:{t}"]
    assert sweeps.ABLATION_ROWS[3][2] == {"p_task": 0.0, "p_dim": 0.0, "p_layer": 2.0}


def test_task_count_points_equal_single_evaluations(pool):
    res = sweeps.task_count(pool, ["esm", "average"], [0, 1], max_images=IMG, proxy_n=PROXY,
                            use_cache=False)
    subsets2 = sweeps.task_subsets(pool.task_names, 2, [0, 1])
    assert len(subsets2) == 2 and len(res["points"]) == 2 * (len(subsets2) + 1)
    stats = probe_pool(pool, n=PROXY)
    for p in res["points"]:
        if p["tasks_merged"] == 2 and p["tasks"] == "+".join(subsets2[0]):
            sv = sweeps.eval_view(pool, list(subsets2[0]), IMG)    # (subset_pool(view, …) would read every image)
            r = evaluate_method(sv, p["method"], {}, stats=stats if p["method"] == "esm" else None)
            assert p["alpha"] == r["alpha"] and p["mean_norm"] == r["mean_norm"] and p["mean_abs"] == r["mean_abs"]
    for row in res["rows"]:
        ps = [p["mean_norm"] for p in res["points"] if p["method"] == row["method"]
              and p["tasks_merged"] == row["tasks_merged"]]
        assert row["subsets"] == len(ps) and row["mean_norm"] == pytest.approx(np.mean(ps))
        assert row["norm_min"] == min(ps) and row["norm_max"] == max(ps)
        T = row["tasks_merged"]
        assert row["rank:attn.in_proj"] == 96 // T and row["rank:mlp.c_fc"] == 128 // T   # d_out / T
    with pytest.raises(ValueError, match="task counts must lie in 1 … 3"):
        sweeps.task_count(pool, ["tsv_m"], [0], counts=[2, 5])
    with pytest.raises(ValueError, match="unknown method|no method"):
        sweeps.task_count(pool, ["nope"], [0])


def test_rank_sweep_points_and_energy(pool):
    res = sweeps.rank_sweep(pool, [0.5], [2], max_images=IMG, proxy_n=PROXY, use_cache=False)
    esm_row, pp_row = res["rows"]
    view = sweeps.eval_view(pool, None, IMG)
    stats = probe_pool(pool, n=PROXY)
    _same(esm_row, evaluate_method(view, "esm", {"rank_fraction": 0.5}, stats=stats), view)
    a1 = evaluate_method(view, "esm", {}, stats=stats)["alpha"]
    pp = evaluate_esmpp(view, {"rank": 2}, {}, alpha=a1, stats=stats)["esmpp-r2"]
    assert pp_row["expert_rank"] == 2 and pp_row["mean_abs"] == pp["mean_abs"] and pp_row["alpha"] == a1
    # energy: Σλ[:k] / Σλ of ΔWt G ΔWtᵀ, written out for one key and task, and 1 at full rank
    key = "visual.transformer.resblocks.0.mlp.c_proj.weight"
    st = stats["tasks"]["alpha"][key]
    X = st.rows.double() if getattr(st, "rows", None) is not None else None
    d = pool.tasks["alpha"][key].double() - pool.base[key].double()
    G = X.T @ X if X is not None else st.gram.double()
    lam = torch.linalg.eigvalsh(d @ G @ d.T).flip(0).clamp_min(0)
    assert sweeps.esd_energy(pool, stats, lambda dout: 3, keys=[key]) != 1.0
    one = sweeps.esd_energy(sweeps.eval_view(pool, ["alpha"]), stats, lambda dout: 3, keys=[key])
    assert one == pytest.approx(float(lam[:3].sum() / lam.sum()), rel=1e-6)
    assert sweeps.esd_energy(pool, stats, lambda dout: dout) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="rank_fraction"):
        sweeps.rank_sweep(pool, [9.0], [])


def test_proxy_sweep_in_and_out_of_distribution(pool):
    res = sweeps.proxy_sweep(pool, [2], ood_n=PROXY, max_images=IMG, use_cache=False)
    own, ood = res["rows"]
    assert (own["proxy_n"], own["proxy_from"], ood["proxy_n"], ood["proxy_from"]) == (2, "own", PROXY, "other task")
    view = sweeps.eval_view(pool, None, IMG)
    _same(own, evaluate_method(view, "esm", {}, stats=probe_pool(pool, n=2)), view)
    names = pool.task_names                                 # task t's statistics from task t+1's proxy images
    stats = {"tasks": {}, "n": PROXY, "seed": 0}
    for i, t in enumerate(names):
        x, _ = pool.proxy(names[(i + 1) % len(names)], PROXY, 0)
        stats["tasks"][t] = probe(pool.build_model(pool.tasks[t]), x)
    _same(ood, evaluate_method(view, "esm", {}, stats=stats), view)
    with pytest.raises(ValueError, match="a proxy size must be an integer in 1"):
        sweeps.proxy_sweep(pool, [0])


# ---------------------------------------------------------------------------
# Cancellation, cache, bounds, export
# ---------------------------------------------------------------------------


def test_a_cancelled_sweep_changes_nothing(pool):
    p = sweeps.eval_view(pool, None, IMG)             # a pool of its own: its cache starts empty
    before_keys = set(p.cache)
    before = {(t, k): p.tasks[t][k].clone() for t in p.task_names for k in list(p.base)[:3]}
    calls = []

    def should_stop():
        calls.append(1)
        return len(calls) > 5                         # stop in the middle of the first evaluations

    with pytest.raises(sweeps.SweepCancelled):
        sweeps.proxy_sweep(p, [1, 2], ood_n=None, should_stop=should_stop)
    assert set(p.cache) == before_keys and sweeps.sweep_cache(p) == {}

    class Stop(Exception):
        pass

    def progress(frac, desc):                         # a progress function that raises stops it as well
        if frac > 0.3:
            raise Stop
    with pytest.raises(Stop):
        sweeps.proxy_sweep(p, [1, 2], ood_n=None, progress=progress)
    assert set(p.cache) == before_keys and sweeps.sweep_cache(p) == {}
    for t in p.task_names:
        for k in list(p.base)[:3]:
            assert torch.equal(p.tasks[t][k], before[(t, k)])


def test_a_finished_sweep_is_cached_per_parameters(pool, monkeypatch):
    p = sweeps.eval_view(pool, None, IMG)
    fracs = []
    first = sweeps.proxy_sweep(p, [2], ood_n=None, progress=lambda f, d: fracs.append(f))
    assert not first["cached"] and fracs == sorted(fracs) and fracs[-1] == 1.0
    def evaluate_again(*a, **k):
        raise RuntimeError("evaluated again")
    monkeypatch.setattr(sweeps, "evaluate_method", evaluate_again)
    again = sweeps.proxy_sweep(p, [2], ood_n=None)
    assert again["cached"] and again["rows"] == first["rows"]
    assert len(sweeps.sweep_cache(p)) == 1
    with pytest.raises(RuntimeError, match="evaluated again"):       # other parameters: a new sweep
        sweeps.proxy_sweep(p, [3], ood_n=None)


def test_sweeps_refuse_too_many_points_before_work(pool, monkeypatch):
    monkeypatch.setattr(sweeps, "evaluate_method", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(ValueError, match="more than 200"):
        sweeps.proxy_sweep(pool, list(range(1, 150)), ood_n=None)
    with pytest.raises(ValueError, match="between 1 and 20 seeds"):
        sweeps.task_count(pool, ["tsv_m"], list(range(30)))


def test_export_writes_csv_json_html(pool, tmp_path):
    res = {"kind": "proxy", "pool": "fake", "params": {"ns": [1]}, "seconds": 1.0, "points": [],
           "rows": [{"proxy_n": 1, "proxy_from": "own", "method": "esm", "mean_abs": 0.5, "mean_abs_hw": 0.1,
                     "mean_norm": 0.6, "mean_norm_hw": 0.1, "n": 10, "alpha": 0.5},
                    {"proxy_n": 4, "proxy_from": "other task", "method": "esm", "mean_abs": 0.4,
                     "mean_abs_hw": 0.1, "mean_norm": 0.5, "mean_norm_hw": 0.1, "n": 10, "alpha": None}]}
    files = export_sweep(res, tmp_path)
    assert sweeps.to_csv(res).splitlines() == [
        "proxy_n,proxy_from,method,mean_abs,mean_abs_hw,mean_norm,mean_norm_hw,n,alpha",
        "1,own,esm,0.5,0.1,0.6,0.1,10,0.5", "4,other task,esm,0.4,0.1,0.5,0.1,10,"]
    assert (tmp_path / "sweep-proxy.csv").read_text() == sweeps.to_csv(res)
    assert json.loads((tmp_path / "sweep-proxy.json").read_text())["rows"][1]["proxy_from"] == "other task"
    assert "plotly" in (tmp_path / "sweep-proxy.html").read_text()
    assert ("png" in files) == (sweeps.png_backend() is not None)
    if sweeps.png_backend() == "pillow":                   # plotly cannot render images here: a Pillow chart
        from PIL import Image
        with Image.open(files["png"]) as im:
            assert im.format == "PNG" and im.size == (900, 500)
    assert sorted(x.name for x in tmp_path.iterdir()) == sorted(f"sweep-proxy.{e}" for e in files)
    with pytest.raises(ValueError, match="file stem"):
        export_sweep(res, tmp_path, stem="../x")


# ---------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------


def test_cli_module_imports_nothing_heavy_at_its_top():
    """`esm-studio sweep --help` must not need torch: the module's top-level imports are the standard library's
    (the library is imported inside cmd_sweep)."""
    import ast
    import esm_core.cli.sweep as mod
    tree = ast.parse(open(mod.__file__, encoding="utf-8").read())
    top = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            top.add("." * node.level + (node.module or ""))
    assert top <= {"__future__", "json", "sys"}, top


def test_cli_sweep_json_and_table(pool, monkeypatch, capsys, tmp_path):
    from esm_core.cli import eval as cli_eval
    from esm_core.cli import main
    monkeypatch.setattr(cli_eval, "load_pool_arg", lambda spec: sweeps.eval_view(pool, None, IMG))
    assert main(["sweep", "proxy", "--pool", "fake", "--ns", "2", "--ood-n", "0", "--json", "--quiet",
                 "--out", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kind"] == "proxy" and [r["proxy_n"] for r in out["rows"]] == [2]
    assert (tmp_path / "sweep-proxy.csv").is_file()
    assert main(["sweep", "proxy", "--pool", "fake", "--ns", "2", "--ood-n", "0", "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "| 2 | own |" in table and "proxy sweep on pool" in table
    assert main(["sweep", "tasks", "--methods", "nope", "--quiet"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["sweep", "proxy", "--ns", "1,x", "--quiet"]) == 2
    assert "--ns must be comma-separated integers" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_sweep_on_the_demo_pool(capsys):
    from esm_core.cli import main
    assert main(["sweep", "proxy", "--pool", "demo", "--ns", "1", "--ood-n", "0", "--max-images", "10",
                 "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["pool"] == "demo" and out["rows"][0]["n"] == 60 and 0 <= out["rows"][0]["mean_abs"] <= 1


# ---------------------------------------------------------------------------
# Lesson files (the guided tour's data; the app view is not built yet)
# ---------------------------------------------------------------------------


def _lesson(tmp_path, steps, name="t.json"):
    p = tmp_path / name
    p.write_text(json.dumps({"title": "A lesson", "steps": steps}))
    return p


def test_bundled_lessons_load_and_open_from_the_url():
    from esm_core.app import lessons
    assert "ablation" in lessons.lesson_names()
    for name in lessons.lesson_names():
        lessons.load_lesson(lessons.lesson_path(name))
    lesson, i = lessons.from_query({"lesson": "ablation", "step": "3"})
    assert i == 2 and lesson["steps"][2]["action"] == {"kind": "sweep", "sweep": "ablation",
                                                        "params": {"max_images": 50}}
    assert lessons.from_query({}) is None and lessons.from_query({"lesson": "ablation"})[1] == 0
    with pytest.raises(lessons.LessonError, match="steps 1 to 4, not 9"):
        lessons.from_query({"lesson": "ablation", "step": "9"})
    with pytest.raises(lessons.LessonError, match="a lesson name is"):
        lessons.from_query({"lesson": "../../etc/passwd"})


@pytest.mark.parametrize("bad, message", [
    ({"title": "Merge", "action": {"kind": "merge", "method": "nope"}}, r"step 2 \('Merge'\): unknown method 'nope'"),
    ({"title": "Merge", "action": {"kind": "merge", "method": "esm", "params": {"p_task": 99}}},
     r"step 2 \('Merge'\): parameter 'p_task' must be <= 4"),
    ({"title": "Sweep", "action": {"kind": "sweep", "sweep": "ablation", "params": {"rank": 3}}},
     r"step 2 \('Sweep'\): sweep 'ablation' has no parameter 'rank'"),
    ({"title": "Sweep", "action": {"kind": "sweep", "sweep": "zoom"}}, r"step 2 \('Sweep'\): sweep must be one of"),
    ({"title": "Odd", "action": {"kind": "dance"}}, r"step 2 \('Odd'\): action kind must be one of"),
    ({"text": "no title"}, r"step 2: title must be a non-empty string"),
    ("just text", r"step 2: a step is an object"),
])
def test_a_lesson_with_a_bad_step_is_refused_naming_the_step(tmp_path, bad, message):
    from esm_core.app import lessons
    good = {"title": "Read", "text": "Fine."}
    with pytest.raises(lessons.LessonError, match=r"t\.json: " + message):
        lessons.load_lesson(_lesson(tmp_path, [good, bad]))


def test_lesson_files_yaml_and_bounds(tmp_path):
    from esm_core.app import lessons
    y = tmp_path / "y.yaml"
    y.write_text("title: Y\nsteps:\n  - title: One\n    text: hello\n    action: {kind: merge, method: esm}\n")
    assert lessons.load_lesson(y)["steps"][0]["action"]["method"] == "esm"
    y.write_text("title: Y\nsteps: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(lessons.LessonError, match="not valid YAML"):            # safe_load: no Python objects
        lessons.load_lesson(y)
    big = tmp_path / "big.json"
    big.write_text(" " * (lessons.MAX_BYTES + 1))
    with pytest.raises(lessons.LessonError, match="more than a lesson's"):
        lessons.load_lesson(big)
    with pytest.raises(lessons.LessonError, match="1 to 50 steps"):
        lessons.load_lesson(_lesson(tmp_path, []))


# ---------------------------------------------------------------------------
# The Lessons view: HTTP and a real browser (a URL-opened step, then the tour)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lessons_app():
    import os
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from fake_pool import launch_app
    p = make_fake_pool()
    demo, url = launch_app(lambda: p)
    yield url
    demo.close()


@pytest.mark.slow
def test_lessons_view_over_http(lessons_app):
    from gradio_client import Client
    c = Client(lessons_app, verbose=False)
    c.predict(api_name="/init")                                   # this client's session and its pool
    md = c.predict("ablation", api_name="/lesson_open")
    assert "step 1 of 4" in md and "Task vectors share one layer" in md
    md = c.predict(api_name="/lesson_next")
    assert "step 2 of 4" in md and "`directions = svd`" in md
    out, plot = c.predict(api_name="/lesson_run")                 # ESM with SVD directions: a merge of the pool
    assert out.startswith("Merge #1 (ESM") and "normalised" in out
    md = c.predict(api_name="/lesson_prev")
    assert "step 1 of 4" in md


@pytest.mark.slow
@pytest.mark.browser
def test_browser_opens_a_step_from_the_url_and_walks_the_tour(lessons_app, tmp_path):
    import shutil
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian chromium is not installed (apt-get install chromium)")
    from playwright import sync_api
    with sync_api.sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=chromium, headless=True,
                                                    args=["--headless", "--no-sandbox", "--disable-gpu"])
        pg = ctx.new_page()
        pg.set_default_timeout(90_000)
        try:
            pg.goto(lessons_app.rstrip("/") + "/?lesson=ablation&step=2")
            step = pg.locator("#lesson-step")
            sync_api.expect(step).to_contain_text("step 2 of 4")           # the URL's step, on the Lessons tab
            sync_api.expect(step).to_contain_text("SVD directions, then ESD")
            pg.locator("#lesson-next").click()
            sync_api.expect(step).to_contain_text("step 3 of 4")
            pg.locator("#lesson-prev").click()
            pg.locator("#lesson-prev").click()
            sync_api.expect(step).to_contain_text("step 1 of 4")
            pg.locator("#lesson-run").click()                          # step 1: a TSV-M merge of the pool
            sync_api.expect(pg.locator("#lesson-out")).to_contain_text("Merge #", timeout=180_000)
        finally:
            ctx.close()
