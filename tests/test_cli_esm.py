"""ESM and ESM++ from the command line on your own proxy data (esm-studio merge --method esm --proxy ...)."""
import json
import zipfile

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from esm_core import studio as S
from esm_core.checkpoints import save_safetensors
from esm_core.cli import main
from esm_core.cli.merge import run_proxy_merge
from esm_core.evaluation import proxy as P
from esm_core.merging import apply_updates
from esm_core.pools.taskpool import proxy_ids
from fake_pool import FAKE_MODEL, make_fake_pool


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny pool (40 validation images per task) as files: base and task checkpoints, and each task's
    validation images as a folder of PNGs whose sorted names follow the split's order."""
    d = tmp_path_factory.mktemp("byo")
    pool = make_fake_pool(n_val=40)
    base = save_safetensors(pool.base, d / "base.safetensors")
    tasks, proxy = {}, {}
    for t in pool.task_names:
        tasks[t] = str(save_safetensors(dict(pool.tasks[t]), d / f"{t}.safetensors"))
        folder = d / "proxy" / t
        folder.mkdir(parents=True)
        for i, img in enumerate(pool.data[t]["val"][0]):
            Image.fromarray(img).save(folder / f"img_{i:04d}.png")
        proxy[t] = str(folder)
    return {"pool": pool, "base": str(base), "tasks": tasks, "proxy": proxy, "dir": d}


def _app_merge(pool, method, params):
    s = S.new_session("cpu", live_per_task=8)
    try:
        S.load_demo(s, loader=lambda: pool)
        S.merge(s, method, params)
        return apply_updates(pool.base, s.current["updates"]), {t: list(v) for t, v in s.stats["proxy_ids"].items()}
    finally:
        S.close(s)


def test_cli_esm_merge_equals_the_apps_merge_of_the_same_pool_and_proxy_ids(files, tmp_path):
    app, app_ids = _app_merge(files["pool"], "esm", {"alpha": 0.8})
    out = tmp_path / "esm.safetensors"
    summary = run_proxy_merge(files["base"], files["tasks"], "esm", {"alpha": 0.8}, files["proxy"], out=str(out),
                              arch=FAKE_MODEL, normalisation="half", device="cpu")
    assert summary["proxy"]["ids"] == app_ids == {t: proxy_ids(40, 32, 0) for t in files["tasks"]}
    got = load_file(out)
    assert set(got) == set(app)
    for k, v in app.items():
        assert torch.equal(got[k], v), k                       # tensor for tensor, not approximately
    assert summary["keys_merged"] > 0


def test_cli_command_line_with_a_zip_and_flat_folders_and_progress_on_stderr(files, tmp_path, capsys):
    # one task's proxy data as a zip of class folders: the same files, listed in the same sorted order
    t0 = next(iter(files["tasks"]))
    z = tmp_path / f"{t0}.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for f in sorted((files["dir"] / "proxy" / t0).iterdir()):
            zf.write(f, f"all/{f.name}")
    proxy = {**files["proxy"], t0: str(z)}
    out = tmp_path / "cli.safetensors"
    args = ["merge", "--base", files["base"], *[x for t, p in files["tasks"].items() for x in ("--task", f"{t}={p}")],
            *[x for t, p in proxy.items() for x in ("--proxy", f"{t}={p}")], "--method", "esm", "--set", "alpha=0.8",
            "--arch", FAKE_MODEL, "--normalisation", "half", "--device", "cpu", "--out", str(out), "--json"]
    assert main(args) == 0
    cap = capsys.readouterr()
    summary = json.loads(cap.out)
    assert summary["proxy"]["n"] == 32 and summary["proxy"]["seed"] == 0
    ref = tmp_path / "ref.safetensors"
    run_proxy_merge(files["base"], files["tasks"], "esm", {"alpha": 0.8}, files["proxy"], out=str(ref),
                    arch=FAKE_MODEL, normalisation="half", device="cpu")
    a, b = load_file(out), load_file(ref)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # without --json the progress bar and log lines go to stderr, the summary line to stdout
    out2 = tmp_path / "cli2.safetensors"
    assert main([x if x != str(out) else str(out2) for x in args if x != "--json"]) == 0
    cap = capsys.readouterr()
    assert "probing" in cap.err and "%" in cap.err and cap.out.startswith("merged 3 task(s) with esm")


def test_other_seed_and_sample_count_draw_other_samples(files, tmp_path):
    s = run_proxy_merge(files["base"], files["tasks"], "esm", {}, files["proxy"], out=str(tmp_path / "a.safetensors"),
                        n=8, seed=3, arch=FAKE_MODEL, normalisation="half", device="cpu")
    assert all(ids == proxy_ids(40, 8, 3) for ids in s["proxy"]["ids"].values())
    assert s["params"]["alpha"] == 1.0                         # ESM's default α


def test_esmpp_bundle_from_the_command_line(files, tmp_path):
    from esm_core.esmpp import load_esmpp
    out = tmp_path / "pp.safetensors"
    s = run_proxy_merge(files["base"], files["tasks"], "esmpp", {"alpha": 0.8, "rank": 4}, files["proxy"],
                        out=str(out), arch=FAKE_MODEL, normalisation="half", device="cpu")
    merged, experts, cfg = load_esmpp(out)
    assert experts.rank == 4 and list(experts.tasks) == list(files["tasks"])
    assert cfg["recipe"]["proxy"]["ids"] == s["proxy"]["ids"] and cfg["alpha"] == 0.8
    esm = tmp_path / "esm.safetensors"
    run_proxy_merge(files["base"], files["tasks"], "esm", {"alpha": 0.8}, files["proxy"], out=str(esm),
                    arch=FAKE_MODEL, normalisation="half", device="cpu")
    ref = load_file(esm)
    for k, v in ref.items():                                   # its static part is the ESM merge at that α
        torch.testing.assert_close(merged[k].float(), v, rtol=1e-5, atol=1e-6)
    from esm_core.esmpp import load_routed                     # and it loads from the file alone
    pool = files["pool"]
    routed = load_routed(out)
    x, _ = pool.inputs(pool.task_names[0], "test")
    with torch.no_grad():
        assert routed(x[:4]).shape == (4, 16)


def test_refusals_name_what_is_wrong_before_the_work(files, tmp_path, capsys):
    out = str(tmp_path / "x.safetensors")
    kw = dict(out=out, arch=FAKE_MODEL, normalisation="half", device="cpu")
    some = dict(list(files["proxy"].items())[:2])
    with pytest.raises(ValueError, match=r"no proxy data for task\(s\) \['gamma'\]"):
        run_proxy_merge(files["base"], files["tasks"], "esm", {}, some, **kw)
    with pytest.raises(ValueError, match="proxy samples per task must be an integer from 1 to 4096"):
        run_proxy_merge(files["base"], files["tasks"], "esm", {}, files["proxy"], n=0, **kw)
    with pytest.raises(ValueError, match="parameter 'alpha' must be a finite number"):
        run_proxy_merge(files["base"], files["tasks"], "esm", {"alpha": "nan"}, files["proxy"], **kw)
    with pytest.raises(ValueError, match=r"cannot be read from the weights alone\. Choose: .*'infer'"):
        run_proxy_merge(files["base"], files["tasks"], "esm", {}, files["proxy"], out=out, device="cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"proxy data of task 'alpha': no images in"):
        run_proxy_merge(files["base"], files["tasks"], "esm", {}, {**files["proxy"], "alpha": str(empty)}, **kw)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"proxy data of task 'alpha': 'x.png' cannot be decoded"):
        run_proxy_merge(files["base"], files["tasks"], "esm", {}, {**files["proxy"], "alpha": str(tmp_path / "bad")},
                        **kw)
    assert main(["merge", "--base", files["base"], *[x for t, p in files["tasks"].items() for x in ("--task", f"{t}={p}")],
                 "--method", "esm", "--out", out]) == 2
    assert "method 'esm' probes each task on its own data: give --proxy TASK=" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_listing_is_bounded_before_anything_is_decoded(tmp_path, monkeypatch):
    from esm_core.pools import upload as U
    monkeypatch.setattr(U, "MAX_ZIP_FILES", 3)
    d = tmp_path / "many"
    d.mkdir()
    for i in range(5):
        (d / f"{i}.png").write_bytes(b"x")
    with pytest.raises(ValueError, match="more than 3 images"):
        P.list_proxy(d, "t")
    monkeypatch.setattr(U, "MAX_ENTRY_BYTES", 10)
    z = tmp_path / "big.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a/0.png", b"\0" * 1000)                     # a small bomb: 1000 bytes declared
    with pytest.raises(ValueError, match="declares more than"):
        P.list_proxy(z, "t")


def test_text_proxy_merge_equals_the_apps_merge_of_the_same_upload(tmp_path):
    """Text (BERT family): labelled sentences as proxy data, read as the Pool view reads a text upload; the CLI's
    ESM merge equals the app's merge of the same upload, tensor for tensor."""
    from test_upload_text import _upload
    paths, texts, cfg, tok = _upload(tmp_path, "bert")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    s = S.new_session("cpu", live_per_task=8)
    try:
        S.load_uploaded_text(s, tmp_path / "base.safetensors", paths, texts, config=cfg, tokenizer_files=tok)
        S.merge(s, "esm", {"alpha": 0.7})
        app = apply_updates(s.pool.base, s.current["updates"])
        app_ids = {t: list(v) for t, v in s.stats["proxy_ids"].items()}
    finally:
        S.close(s)
    out = tmp_path / "text-esm.safetensors"
    summary = run_proxy_merge(str(tmp_path / "base.safetensors"), {t: str(p) for t, p in paths.items()}, "esm",
                              {"alpha": 0.7}, {t: str(p) for t, p in texts.items()}, out=str(out),
                              config=str(tmp_path / "config.json"), device="cpu")
    assert summary["proxy"]["ids"] == app_ids
    got = load_file(out)
    assert set(got) == set(app)
    for k, v in app.items():
        assert torch.equal(got[k], v), k
    again = tmp_path / "again.safetensors"                     # and its recipe repeats it bit for bit
    assert main(["merge", "--recipe", str(out), "--out", str(again), "--device", "cpu", "--quiet"]) == 0
    b = load_file(again)
    assert all(torch.equal(got[k], b[k]) for k in got)
