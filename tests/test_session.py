"""esm_core.studio: the logic behind one browser session, driven directly (no gradio)."""
import io
import pickle
import zipfile

import numpy as np
import pytest
import torch

import esm_core
from esm_core import studio as S
from esm_core.checkpoints import CheckpointError, read_config, save_safetensors
from esm_core.esmpp import load_esmpp
from esm_core.evaluation.alpha import extend_curve
from esm_core.pools.upload import _one_per_class_first, infer_vit_config
from fake_pool import FAKE_TASKS


@pytest.fixture(scope="module")
def esm_sess(pool):
    """One session shared by the ESM tests (its decompositions are reused, as in the app)."""
    s = S.new_session("cpu", live_per_task=16)
    S.load_demo(s, loader=lambda: pool)
    S.merge(s, "esm", {"alpha": 0.8})
    yield s
    S.close(s)


def test_pool_info(sess, pool):
    info = S.pool_info(sess)
    assert info["parameters"] == sum(v.numel() for v in pool.base.values())
    assert info["blocks"] == 2 and info["width"] == 32
    assert [t["task"] for t in info["tasks"]] == list(FAKE_TASKS)
    assert info["tasks"][0]["classes"] == 4 and info["tasks"][0]["test images"] == 24
    imgs = S.sample_images(sess, 2, size=48)
    assert len(imgs) == 2 * len(FAKE_TASKS) and imgs[0][0].shape[:2] == (48, 48)


def test_merge_two_methods_and_comparison(sess, pool):
    r1 = S.merge(sess, "ta", {"alpha": 0.4})
    r2 = S.merge(sess, "ties", {})
    rows = S.comparison_rows(sess)
    assert [r["#"] for r in rows] == [1, 2] and [r["method"] for r in rows] == ["Task Arithmetic", "TIES-Merging"]
    assert rows[0]["α"] == 0.4 and rows[1]["α"] == 0.3
    # the current merge is the method's own update at that α
    want = esm_core.merge_updates("ties", pool.base, pool.tasks, alpha=0.3)
    for k, v in want.items():
        torch.testing.assert_close(sess.current["updates"][k], v, rtol=1e-5, atol=1e-6)
    # normalised accuracy = merged / fine-tuned on the same subset
    ft = S.references(sess)["finetuned"]
    for t in FAKE_TASKS:
        assert r1["summary"]["tasks"][t]["norm"] == pytest.approx(r1["accs"][t] / ft[t])
    # accuracies are those of the merged model, evaluated independently
    sd = esm_core.apply_updates(pool.base, want)
    assert S.accuracies(sess, sd, "test", 16) == r2["accs"]
    # an α-only change recombines from the cache (no new parameter set) and matches a direct merge
    S.merge(sess, "ta", {"alpha": 0.9})
    assert len([k for k in sess.affine if k[0] == "ta"]) == 1
    direct = esm_core.merge_updates("ta", pool.base, pool.tasks, alpha=0.9)
    for k, v in direct.items():
        torch.testing.assert_close(sess.current["updates"][k], v, rtol=1e-5, atol=1e-6)
    assert len(S.comparison_rows(sess)) == 3
    assert r1["config"]["method"] == "ta" and r1["config"]["params"]["alpha"] == 0.4


def test_tsv_m_after_esm_reuses_its_tsv_m_keys_and_merges_once(sess, monkeypatch):
    """In the app, TSV-M after ESM computes only the ESD layers (ESM merged the others the TSV-M way and the
    session's cache holds them), in one merge (its update is α times a fixed one), and equals a direct merge."""
    import esm_core.merging.svd as svd
    S.merge(sess, "esm", {"alpha": 0.8})
    calls = []
    real = svd.tsv_merge_matrix
    monkeypatch.setattr(svd, "tsv_merge_matrix", lambda D, *a: calls.append(1) or real(D, *a))
    S.merge(sess, "tsv_m", {"alpha": 0.5})
    assert len(calls) == len(S.esd_keys(sess))
    direct = esm_core.merge_updates("tsv_m", sess.pool.base, sess.pool.tasks, alpha=0.5)
    for k, v in direct.items():
        torch.testing.assert_close(sess.current["updates"][k], v, rtol=1e-6, atol=1e-8)


def test_bad_parameters_refused(sess):
    with pytest.raises(ValueError, match="alpha"):
        S.merge(sess, "ta", {"alpha": 999})          # past the library's bound (the slider's range is no limit)
    with pytest.raises(ValueError, match="unknown method"):
        S.merge(sess, "nope", {})
    with pytest.raises(ValueError, match="merge first"):
        S.export_merged(sess)


def test_export_has_config_metadata(sess, pool):
    S.merge(sess, "ties", {"alpha": 0.5, "k": 30})
    p = S.export_merged(sess)
    cfg = read_config(p)
    assert cfg["method"] == "ties" and cfg["params"]["k"] == 30 and cfg["params"]["alpha"] == 0.5
    assert cfg["tasks"] == list(FAKE_TASKS) and "summary" in cfg
    sd = esm_core.load_checkpoint(p, base=pool.base)
    want = esm_core.merge("ties", pool.base, pool.tasks, alpha=0.5, k=30)
    for k in want:
        torch.testing.assert_close(sd[k], want[k], rtol=1e-5, atol=1e-6)
    cj = S.export_config(sess)
    assert '"method": "ties"' in cj.read_text()


def test_alpha_curve(sess, monkeypatch):
    monkeypatch.setattr(S.live, "ALPHA_POINTS", 5)
    best, curve = S.alpha_curve(sess, "ta", {})
    lo, hi, n = esm_core.get_method("ta").alpha_grid
    grid = np.linspace(lo, hi, n)[1:]                         # 30 values thinned to 5: every 6th
    alphas = [a for a, _ in curve]
    assert set(np.round(grid[5::6], 9)) <= set(np.round(alphas, 9)) and alphas == sorted(alphas)
    assert best == max(curve, key=lambda e: e[1])[0]
    assert all(0 <= a <= esm_core.get_method("ta").params[0].bounds[1] for a in alphas)
    # the optimum is interior, at a bound of α, or where the extension's budget stopped
    i = alphas.index(best)
    assert 0 < i < len(curve) - 1 or best == 0.0 or len(alphas) == 5 + S.live.ALPHA_EXTRA


def test_alpha_curve_goes_past_the_sliders_end_and_use_best_widens_the_slider(sess, monkeypatch):
    """The best α above the slider's maximum (TA: 2.0): the curve goes on past it (α's library bound is 100), and
    the Merge view's "use the best α" sets the slider to it, widening the slider."""
    monkeypatch.setattr(S.live, "ALPHA_POINTS", 5)
    monkeypatch.setattr(S.live.A, "state_at", lambda base, u0, slope, a: {"alpha": a})
    monkeypatch.setattr(S.live, "accuracies", lambda s, sd, *a, **k: {t: min(1.0, 0.2 + sd.get("alpha", 8) / 10)
                                                                     for t in s.pool.task_names})
    best, curve = S.alpha_curve(sess, "ta", {})
    slider_max = esm_core.get_method("ta").params[0].max
    assert slider_max == 2.0 and best == max(a for a, _ in curve) > slider_max      # rising: its last point
    assert len(curve) == 5 + S.live.ALPHA_EXTRA                                   # the extension's budget
    gr = pytest.importorskip("gradio")
    from types import SimpleNamespace
    from esm_core.app import merge as M
    ui = SimpleNamespace(controls=[gr.Slider() for m in M.METHODS.values() for _ in m.params], slices={})
    i = 0
    for name, m in M.METHODS.items():
        ui.slices[name] = (i, i + len(m.params))
        i += len(m.params)
    use_best = M.make_handlers(ui)[4]
    out = use_best("ta", ("ta", best, curve, "title", None, "alpha = 1"))
    lo, _ = ui.slices["ta"]
    assert out[lo]["value"] == best and out[lo]["maximum"] == best
    assert all("value" not in u for j, u in enumerate(out[:-1]) if j != lo)


def test_alpha_grid_extends_until_the_optimum_is_interior():
    """Issue 12 item 11: when the best α is the grid's first (last) point, points are added below (above),
    within α's bounds, until it is interior."""
    calls = []

    def score(a):
        calls.append(a)
        return -(a - 0.03) ** 2                              # optimum at α = 0.03, below the grid's first point

    curve = [(a, score(a)) for a in (0.2, 0.4, 0.6, 0.8, 1.0)]
    added = extend_curve(curve, score, 0.0, 2.0, 6)
    alphas = [a for a, _ in curve]
    best_i = max(range(len(curve)), key=lambda j: curve[j][1])
    assert added and alphas == sorted(alphas) and all(0.0 <= a < 0.2 for a in added)
    assert 0 < best_i < len(curve) - 1 and abs(alphas[best_i] - 0.03) < 0.05
    # optimum above the grid: extended one step at a time, never past α's maximum
    curve = [(a, -(a - 5.0) ** 2) for a in (0.2, 0.4, 0.6, 0.8, 1.0)]
    added = extend_curve(curve, lambda a: -(a - 5.0) ** 2, 0.0, 1.5, 6)
    assert added == pytest.approx([1.2, 1.4, 1.5]) and curve[-1][0] == 1.5
    # already interior: nothing added
    curve = [(a, -(a - 0.5) ** 2) for a in (0.2, 0.4, 0.6, 0.8)]
    assert extend_curve(curve, lambda a: -(a - 0.5) ** 2, 0.0, 2.0, 6) == []


def test_live_accuracy_interval(sess):
    """Issue 12 item 11: every live accuracy comes with its sample size and a 95 % binomial interval."""
    assert S.sample_sizes(sess) == {t: 16 for t in FAKE_TASKS}          # live_per_task = 16 ≤ 24 test images
    assert S.sample_sizes(sess, "val") == {t: 12 for t in FAKE_TASKS}
    hw = S.binomial_halfwidth(0.5, 100)
    assert 0.09 < hw < 0.1                                  # ≈ 1.96 · sqrt(.25 / 100) = 0.098
    assert S.binomial_halfwidth(0.5, 400) < hw / 1.9       # shrinks like 1 / sqrt(n)
    assert 0 < S.binomial_halfwidth(1.0, 16) < 0.25         # Wilson: not 0 at a perfect score
    rec = S.merge(sess, "ta", {"alpha": 0.3})
    ci = S.accuracy_interval(rec["summary"], S.sample_sizes(sess), S.references(sess)["finetuned"])
    assert ci["n"] == {t: 16 for t in FAKE_TASKS}
    assert ci["mean_abs"] < max(ci["tasks"].values())       # the mean over 3 tasks is less noisy than one task
    assert ci["mean_abs"] == pytest.approx(np.sqrt(sum(h * h for h in ci["tasks"].values())) / 3)


def test_sample_images_show_several_classes(sess, pool):
    """Issue 12 item 12: the gallery shows several classes of each task, not the first class only."""
    imgs = S.sample_images(sess, 4)
    for t in FAKE_TASKS:
        caps = [c for _, c in imgs if c.startswith(f"{t}:")]
        assert len(caps) == 4
        _, y, _ = pool.samples(t, 64)
        assert len(set(caps)) == min(4, len(set(y.tolist())))
    sorted_y = np.repeat(np.arange(4), 10)                  # an upload's test split sorted by class
    picks = _one_per_class_first(sorted_y, 8)
    assert len(picks) == 8 and len(set(sorted_y[picks].tolist())) == 4


def test_esm_spectra_interference(esm_sess, pool):
    sess = esm_sess
    rec = sess.merges[0]
    assert rec["config"]["proxy"]["n"] == 32 and set(rec["config"]["proxy"]["ids"]) == set(FAKE_TASKS)
    calls = sess.cache.esd_calls
    rows = S.spectra_at(sess, 1.0)
    assert sess.cache.esd_calls == calls                      # the merge's decompositions are reused
    keys = S.esd_keys(sess)
    assert len(rows) == len(keys) * len(FAKE_TASKS) == 6 * 3
    half = S.spectra_at(sess, 0.5)
    r0, h0 = rows[0], half[0]
    d_out = pool.base[r0["key"]].shape[0]
    assert r0["k"] == d_out // 3 and h0["k"] == int(0.5 * d_out / 3)
    assert h0["esd_kept_at_k"] == r0["esd_energy_kept"][h0["k"] - 1] <= r0["esd_kept_at_k"]
    ov = S.overlap(sess, keys[0])
    m = np.asarray(ov["layers"][keys[0]])
    np.testing.assert_allclose(np.diag(m), 1.0, atol=1e-6)
    assert m.shape == (3, 3) and np.allclose(m, m.T)
    al = S.alignment(sess)
    assert set(al["mean"]) == set(FAKE_TASKS) and all(0 <= v <= 1 + 1e-9 for v in al["mean"].values())


def test_sessions_are_isolated(pool):
    a, b = S.new_session("cpu", live_per_task=8), S.new_session("cpu", live_per_task=8)
    try:
        S.load_demo(a, loader=lambda: pool)
        S.load_demo(b, loader=lambda: pool)
        S.merge(a, "ta", {})
        assert len(a.merges) == 1 and b.merges == [] and b.current is None
        assert a.workdir != b.workdir
        p = S.export_merged(a)
        assert p.parent == a.workdir and not any(b.workdir.iterdir())
        with pytest.raises(ValueError, match="merge first"):
            S.export_merged(b)
        b2 = pickle.loads(pickle.dumps(b))                     # sessions pickle (ZeroGPU workers)
        assert b2.pool.task_names == pool.task_names and b2.lock is not b.lock
    finally:
        S.close(a)
        S.close(b)
    assert not a.workdir.exists()
    with pytest.raises(ValueError, match="session has ended"):
        S.merge(a, "ta", {})


# ---------------------------------------------------------------- uploads

def _png(value: int, size: int = 16) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _zip(path, classes=("cat", "dog"), per_class=3, extra=None):
    with zipfile.ZipFile(path, "w") as z:
        for ci, c in enumerate(classes):
            for i in range(per_class):
                z.writestr(f"data/{c}/{i}.png", _png(40 * ci + i))
        for name, data in (extra or {}).items():
            z.writestr(name, data)
    return path


@pytest.fixture(scope="module")
def files(pool, tmp_path_factory):
    d = tmp_path_factory.mktemp("upload")
    save_safetensors(pool.base, d / "base.safetensors")
    for t in FAKE_TASKS[:2]:
        save_safetensors(pool.tasks[t], d / f"{t}.safetensors")
    bad = dict(pool.tasks["alpha"])
    k = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    bad[k] = torch.zeros(bad[k].shape[0] + 1, bad[k].shape[1])
    save_safetensors(bad, d / "wrong.safetensors")
    (d / "junk.safetensors").write_bytes(b"this is not a checkpoint")
    return d


def test_upload_with_image_zips(files, tmp_path):
    s = S.new_session("cpu", live_per_task=8)
    try:
        zips = {t: _zip(tmp_path / f"{t}.zip") for t in FAKE_TASKS[:2]}
        info = S.load_uploaded(s, files / "base.safetensors",
                               {t: files / f"{t}.safetensors" for t in FAKE_TASKS[:2]}, zips,
                               arch="infer", head_width=16, normalisation="half",
                               demo_loader=lambda: (_ for _ in ()).throw(FileNotFoundError("no demo")))
        assert info["origin"] == "upload" and [t["task"] for t in info["tasks"]] == list(FAKE_TASKS[:2])
        assert info["tasks"][0]["classes"] == 2 and s.pool.class_names["alpha"] == ["cat", "dog"]
        assert any("inferred" in n and "head width 16" in n and "std (0.5, 0.5, 0.5)" in n for n in info["notes"])
        x, y = s.pool.inputs("alpha", "test")
        assert x.shape[1:] == (3, 16, 16) and sorted(set(y.tolist())) == [0, 1]
        rec = S.merge(s, "ta", {})
        assert set(rec["accs"]) == set(FAKE_TASKS[:2])
    finally:
        S.close(s)


def test_upload_keeps_demo_data(files, pool):
    s = S.new_session("cpu", live_per_task=8)
    try:
        info = S.load_uploaded(s, files / "base.safetensors",
                               {t: files / f"{t}.safetensors" for t in FAKE_TASKS[:2]}, {}, arch="infer",
                               head_width=16, normalisation="half", demo_loader=lambda: pool)
        assert any("demo's images" in n for n in info["notes"])
        assert s.pool.model_name["vision_cfg"]["head_width"] == 16         # a config dict: nothing registered
        torch.testing.assert_close(s.pool.heads["beta"], pool.heads["beta"])
    finally:
        S.close(s)


@pytest.mark.parametrize("case,match", [
    ("shape", r"wrong.safetensors.*does not fit the base.*c_fc"),
    ("junk", r"junk.safetensors: not a valid safetensors"),
    ("one_task", r"at least two task"),
    ("no_images", r"no images for task\(s\) \['gamma'\]"),
    ("zip_one_class", r"found 1 class folder"),
    ("zip_not_image", r"'data/readme.txt' is not an image"),
    ("zip_broken_png", r"'data/cat/bad.png' cannot be decoded"),
    ("not_zip", r"not a readable zip"),
    ("bad_name", r"task names must be"),
])
def test_bad_uploads_refused(files, tmp_path, pool, case, match):
    s = S.new_session("cpu")
    base = files / "base.safetensors"
    good = {t: files / f"{t}.safetensors" for t in FAKE_TASKS[:2]}
    no_demo = lambda: (_ for _ in ()).throw(FileNotFoundError("no demo"))  # noqa: E731
    zips = {t: _zip(tmp_path / f"{t}.zip") for t in FAKE_TASKS[:2]}
    args = {"shape": (base, {"alpha": files / "wrong.safetensors", "beta": good["beta"]}, zips),
            "junk": (base, {"alpha": files / "junk.safetensors", "beta": good["beta"]}, zips),
            "one_task": (base, {"alpha": good["alpha"]}, zips),
            "no_images": (base, {**good, "gamma": good["beta"]}, zips),
            "zip_one_class": (base, good, {**zips, "beta": _zip(tmp_path / "one.zip", classes=("x",))}),
            "zip_not_image": (base, good, {**zips, "beta": _zip(tmp_path / "txt.zip", extra={"data/readme.txt": b"hi"})}),
            "zip_broken_png": (base, good, {**zips, "beta": _zip(tmp_path / "bp.zip",
                                                                 extra={"data/cat/bad.png": b"\x89PNG broken"})}),
            "not_zip": (base, good, {**zips, "beta": files / "junk.safetensors"}),
            "bad_name": (base, {"al pha!": good["alpha"], "beta": good["beta"]}, {}),
            }[case]
    try:
        with pytest.raises((ValueError, CheckpointError), match=match):
            S.load_uploaded(s, *args, arch="infer", head_width=16, normalisation="half", demo_loader=no_demo)
        assert s.pool is None                                 # nothing half-loaded stays behind
        assert not list(s.workdir.glob("pool-*"))             # nor any task file it had written
    finally:
        S.close(s)


def test_uploaded_tasks_are_read_lazily_from_the_session_folder(files, tmp_path, pool):
    """The app's upload keeps the checked task checkpoints in the session's folder and reads them key by key:
    the pool holds the base, not the tasks; merges equal those of the same checkpoints held in memory; the files
    go when another pool replaces the upload, and with the session."""
    import esm_core
    from esm_core.lazy import LazyCheckpoint
    s = S.new_session("cpu", live_per_task=8)
    try:
        zips = {t: _zip(tmp_path / f"{t}.zip") for t in FAKE_TASKS[:2]}
        S.load_uploaded(s, files / "base.safetensors", {t: files / f"{t}.safetensors" for t in FAKE_TASKS[:2]},
                        zips, arch="infer", head_width=16, normalisation="half",
                        demo_loader=lambda: (_ for _ in ()).throw(FileNotFoundError("no demo")))
        folders = list(s.workdir.glob("pool-*"))
        assert len(folders) == 1
        for t in FAKE_TASKS[:2]:
            ck = s.pool.tasks[t]
            assert isinstance(ck, LazyCheckpoint) and ck.path.parent == folders[0]
            assert sorted(ck) == sorted(pool.base)
            assert all(torch.equal(ck[k], pool.tasks[t][k].float()) for k in pool.base)
        assert S.tensor_bytes(s.pool.tasks) == 0
        S.merge(s, "ties", {})
        want = esm_core.merge_updates("ties", pool.base, {t: pool.tasks[t] for t in FAKE_TASKS[:2]})
        for k, v in want.items():
            torch.testing.assert_close(s.current["updates"][k], v, rtol=1e-5, atol=1e-7)
        S.load_demo(s, loader=lambda: pool)                   # another pool: the upload's files are deleted
        assert not folders[0].exists()
    finally:
        S.close(s)
    assert not s.workdir.exists()


def test_infer_vit_config(pool):
    cfg = infer_vit_config(pool.base, 16)
    v = cfg["vision_cfg"]
    assert (v["width"], v["layers"], v["patch_size"], v["image_size"], v["head_width"]) == (32, 2, 8, 16, 16)
    assert cfg["embed_dim"] == 16 and v["mlp_ratio"] == 4.0
    with pytest.raises(ValueError, match="visual.conv1.weight"):
        infer_vit_config({"visual.positional_embedding": torch.zeros(5, 4)}, 64)


# ---------------------------------------------------------------- ESM++ routing

def test_routing_run_and_export(esm_sess, pool, monkeypatch):
    import esm_core.merging.api as api
    sess = esm_sess
    img = np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8)
    checked = []                    # the pool's checkpoints were checked when loaded: ESM++'s merge does not re-read them
    monkeypatch.setattr(api, "check_finite", lambda *a, **k: checked.append(a[1]))
    from esm_core.pools.taskpool import TaskPool
    built = []                      # the routed tower takes the merged tensors (one copy of the model, not two)
    real_build = TaskPool.build_model
    monkeypatch.setattr(TaskPool, "build_model", lambda self, sd, device="cpu", share=False: (
        built.append((share, sd)), real_build(self, sd, device=device, share=share))[1])
    import esm_core.evaluation.esmpp as eesmpp
    monkeypatch.setattr(eesmpp, "merged_state", lambda *a, **k: pytest.fail("ESM merged again for ESM++"))
    run = S.run_routing(sess, rank=4, per_task=3, image=img)
    assert checked == []
    assert [sh for sh, _ in built] == [True]
    from esm_core.evaluation.alpha import UpdatesAt   # the static part: the weights the Merge view evaluated
    last = [r for r in sess.merges if r["method"] == "esm"][-1]
    pair = sess.affine[("esm", S.live._frozen(last["params"]))]
    want = esm_core.apply_updates(pool.base, UpdatesAt(*pair, last["params"]["alpha"]))
    assert all(torch.equal(sess.esmpp["model"].merged_sd[k], want[k]) for k in want)
    m = sess.esmpp["model"]
    own = {p.data_ptr() for p in m.visual.parameters()}
    assert all(v.data_ptr() in own for v in built[0][1].values() if v.is_floating_point())
    assert all(m.merged_sd[k].data_ptr() == v.data_ptr() for k, v in built[0][1].items())
    T, L = len(FAKE_TASKS), len(run["layers"])
    assert L == 4 and run["tasks"] == list(FAKE_TASKS)          # in_proj and c_fc of 2 blocks
    assert run["choices"].shape == (3 * T + 1, L) and run["cosines"].shape == (3 * T + 1, L, T)
    assert run["sample_labels"][-1] == "your image" and run["true"][-1] == -1
    # hard top-1 routing: the chosen expert is the argmax of the cosines
    np.testing.assert_array_equal(run["choices"], run["cosines"].argmax(-1))
    true = np.asarray(run["true"][:-1])
    np.testing.assert_allclose(run["layer_accuracy"], (run["choices"][:-1] == true[:, None]).mean(0))
    assert sess.esmpp["alpha"] == 0.8                          # the static part is the session's ESM merge
    assert run["embedding"]["points"].shape == (3 * T + 1, 2) and run["embedding"]["proto_points"].shape == (T, 2)
    assert set(run["oracle_accuracy"]) == set(FAKE_TASKS)
    p = S.export_esmpp(sess, rank=4)
    merged, experts, cfg = load_esmpp(p, base=pool.base)
    assert experts.rank == 4 and cfg["alpha"] == 0.8 and experts.tasks == list(FAKE_TASKS)
    with pytest.raises(ValueError, match="samples per task"):
        S.run_routing(sess, rank=4, per_task=0)
