"""app.py over HTTP: launch the real Blocks on a free port and drive it with gradio_client.

Uses the tiny random pool of tests/fake_pool.py as the starting pool (the
wiring is what is tested here; the numbers are tested in test_session.py).
"""
import json
import os

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
import gradio as gr  # noqa: E402
import gradio_client  # noqa: E402

from esm_core.checkpoints import read_config, save_safetensors  # noqa: E402
from esm_core.merging import METHODS  # noqa: E402
from fake_pool import FAKE_TASKS, launch_app  # noqa: E402


@pytest.fixture(scope="module")
def served(pool):
    demo, local_url = launch_app(lambda: pool)
    yield demo, local_url
    demo.close()


@pytest.fixture(scope="module")
def url(served):
    return served[1]


def _client(url):
    return gradio_client.Client(url, verbose=False, download_files=True)


def _values(method: str, **changes):
    """The merge endpoint's inputs: method, then every parameter of every method (schema order)."""
    vals = []
    for m in METHODS.values():
        for p in m.params:
            v = changes.get(p.name, p.default) if m.name == method else p.default
            if m.name == "esm" and p.name == "esd_types" and isinstance(v, str):   # a multi-select in the app
                v = [t for t in v.split(",") if t]
            vals.append(v)
    return vals


def _merged_trace(plot_value):
    fig = json.loads(plot_value["plot"]) if isinstance(plot_value.get("plot"), str) else plot_value["plot"]
    return next(t for t in fig["data"] if t.get("name") == "merged")


def test_load_merge_compare_export(url):
    c = _client(url)
    md, tasks_df, gallery, sentences = c.predict(api_name="/init")
    assert "fake" in md and "32,384 parameters" in md
    assert [row[0] for row in tasks_df["data"]] == list(FAKE_TASKS)

    plot1, note1, cmp1 = c.predict("ta", *_values("ta", alpha=0.5), api_name="/merge")
    assert len(cmp1["data"]) == 1 and "Task Arithmetic" in cmp1["data"][0]
    assert "test images per task" in note1
    plot2, _, cmp2 = c.predict("iso_c", *_values("iso_c"), api_name="/merge")
    assert [r[1] for r in cmp2["data"]] == ["Task Arithmetic", "Iso-C"]           # the table keeps every merge
    merged = _merged_trace(plot2)
    assert list(merged["x"]) == list(FAKE_TASKS) + ["mean"]
    mean_col = cmp2["headers"].index("mean abs %")
    assert merged["y"][-1] == pytest.approx(cmp2["data"][1][mean_col], abs=0.01)

    path, note, shown = c.predict(api_name="/export_model")
    cfg = read_config(path)
    assert shown["method"] == "iso_c"
    assert cfg["method"] == "iso_c" and cfg["params"]["alpha"] == METHODS["iso_c"].params[0].default
    assert "written" in note
    cpath, _, _ = c.predict(api_name="/export_config")
    assert json.loads(open(cpath).read())["method"] == "iso_c"

    # the session is per client: a second visitor sees none of it
    c2 = _client(url)
    c2.predict(api_name="/init")
    with pytest.raises(Exception, match="merge first"):
        c2.predict(api_name="/export_model")


def test_views_and_errors(url, pool, tmp_path):
    c = _client(url)
    c.predict(api_name="/init")
    with pytest.raises(Exception, match="less than minimum"):          # gradio checks the slider range
        c.predict("ta", *_values("ta", alpha=-1.0), api_name="/merge")
    with pytest.raises(Exception, match=r"'bogus'.* is not in the list of choices"):   # esd_types is a multi-select
        c.predict("esm", *_values("esm", esd_types=["bogus"]), api_name="/merge")
    key = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    heat, spec = c.predict(1.0, "SVD energy kept at k", key, "beta", api_name="/spectra")
    assert heat is not None and spec is not None
    note, ov, cos, cos_model, sar = c.predict(key, api_name="/interference")
    assert ov is not None and cos_model is not None

    # a bad upload is refused with a message naming the file and the problem
    save_safetensors(pool.base, tmp_path / "base.safetensors")
    save_safetensors(pool.tasks["alpha"], tmp_path / "alpha.safetensors")
    (tmp_path / "beta.safetensors").write_bytes(b"definitely not safetensors")
    h = gradio_client.handle_file
    # (the architecture is resolved first — from the base alone — then every task file is read)
    with pytest.raises(Exception, match="beta.safetensors: not a valid safetensors"):
        c.predict(h(str(tmp_path / "base.safetensors")),
                  [h(str(tmp_path / "alpha.safetensors")), h(str(tmp_path / "beta.safetensors"))],
                  "", [], "infer", [], 16, "clip", api_name="/load_upload")
    # the session still holds its pool after the refusal
    plot, _, table = c.predict("ta", *_values("ta"), api_name="/merge")
    assert len(table["data"]) == 1


# ---------------------------------------------------------------- issue 12: the app as a teacher, and its limits

def _fig(plot_value):
    return json.loads(plot_value["plot"]) if isinstance(plot_value.get("plot"), str) else plot_value["plot"]


def _by_elem_id(demo, elem_id):
    return next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == elem_id)


def test_live_numbers_carry_n_and_interval(url):
    """Item 11: every live accuracy shows its sample size and a 95 % interval (error bars on the merged bars)."""
    c = _client(url)
    c.predict(api_name="/init")
    plot, note, _ = c.predict("ta", *_values("ta", alpha=0.5), api_name="/merge")
    fig = _fig(plot)
    title = fig["layout"]["title"]["text"]
    assert "±" in title and "n = 24 test images per task" in title        # the fake pool has 24 test images
    assert "n = 24 test images per task" in note and "95 %" in note
    merged = _merged_trace(plot)
    assert len(merged["error_y"]["array"]) == len(FAKE_TASKS) + 1 and all(e > 0 for e in merged["error_y"]["array"])
    _, _, table = c.predict("ta", *_values("ta", alpha=0.5), api_name="/merge")
    row = dict(zip(table["headers"], table["data"][-1]))
    assert row["n / task"] == 24 and 0 < row["± (95 %)"] < 50
    curve = c.predict("ta", *_values("ta", alpha=0.5), api_name="/alpha_curve")
    assert "n = " in _fig(curve)["layout"]["title"]["text"]


def test_teaching_texts(url, pool):
    """Item 12: chance level of the overlaps, the spectra title of the ESD − SVD map."""
    c = _client(url)
    c.predict(api_name="/init")
    key = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    note, ov, *_ = c.predict(key, api_name="/interference")
    d = pool.base[key].shape[0]
    k = d // len(FAKE_TASKS)
    assert f"k/d = {k}/{d} = **{k / d:.2f}**" in note
    assert f"chance k/d = {k / d:.2f}" in _fig(ov)["layout"]["title"]["text"]
    heat, _ = c.predict(1.0, "ESD − SVD (points)", key, "beta", api_name="/spectra")
    title = _fig(heat)["layout"]["title"]["text"]
    assert "ESD's gain over the SVD of ΔW" in title and "by at rank" not in title


def test_merge_worse_than_zero_shot_says_why(pool):
    """Item 12: a merge below zero-shot gets a sentence saying why and what to try."""
    from esm_core.app import merge as merge_view
    from esm_core.app.common import studio
    s = studio.new_session("cpu", live_per_task=16)
    try:
        studio.load_demo(s, loader=lambda: pool)
        rec = studio.merge(s, "ta", {"alpha": 0.3})
        zs = studio.references(s)["zeroshot"]
        worse = {**rec, "summary": {**rec["summary"], "mean_abs": min(zs.values()) / 2}}
        _, md, _ = merge_view.merge_outputs(s, worse)
        assert "worse than zero-shot" in md and "interfere" in md and "α curve" in md
        better = {**rec, "summary": {**rec["summary"], "mean_abs": 1.0}}
        assert "zero-shot" not in merge_view.merge_outputs(s, better)[1]
    finally:
        studio.close(s)


def test_export_names_its_merge_and_rank(url):
    """Item 12: the Export view says which merge each button exports and takes its own ESM++ rank."""
    c = _client(url)
    c.predict(api_name="/init")
    assert "Merge first" in c.predict(8, api_name="/export_info")
    c.predict("ta", *_values("ta", alpha=0.5), api_name="/merge")
    info = c.predict(8, api_name="/export_info")
    assert "Task Arithmetic (α = 0.50)" in info and "r = 8" in info and "default parameters" in info


def test_controls_and_resource_settings(served):
    """Item 12 and 4-5, in the Blocks: ESM's plain labels and multi-select, the export's own rank, the light
    queue for α moves, the cache cleaner, the idle lifetime, .ckpt uploads."""
    demo, _ = served
    from esm_core.app import common
    assert _by_elem_id(demo, "ctl-esm-rank").label.startswith("rank: directions each task keeps")
    esd = _by_elem_id(demo, "ctl-esm-esd_types")
    assert isinstance(esd, gr.Dropdown) and esd.multiselect
    assert demo.delete_cache == common.DELETE_CACHE and demo.delete_cache[1] <= 3600
    state = next(b for b in demo.blocks.values() if isinstance(b, gr.State) and b.time_to_live != float("inf"))
    assert 10 * 60 <= state.time_to_live <= 20 * 60
    assert ".ckpt" in _by_elem_id(demo, "up-base").file_types
    alpha_ids = {_by_elem_id(demo, f"ctl-{m}-alpha")._id for m in METHODS}
    rank_id = _by_elem_id(demo, "export-rank")._id
    for fn in demo.fns.values():
        trig = {t[0] for t in fn.targets}
        if fn.name == "do_merge" and trig & alpha_ids:
            assert fn.concurrency_id == "light"                       # α moves do not wait behind merges
        if fn.name in ("use_best", "show_method"):
            assert fn.concurrency_id != "heavy"
        if fn.name == "ex_esmpp":
            assert rank_id in {b._id for b in fn.inputs}              # not the Routing view's slider


def test_friendly_errors_escaped_logged_once(caplog):
    """Items 5 and 10: a user error becomes an escaped message that closes by itself; one log line, no traceback."""
    from esm_core.app.common import TOAST_S, friendly

    @friendly
    def bad():
        raise ValueError("no images for task(s) ['x']: upload <task>.zip with one folder per class")

    with caplog.at_level("INFO", logger="esm_studio.app"):
        with pytest.raises(gr.Error) as e:
            bad()
    assert "upload &lt;task&gt;.zip with one folder per class" in e.value.message
    assert e.value.duration == TOAST_S and not e.value.print_exception
    recs = [r for r in caplog.records if r.name == "esm_studio.app"]
    assert len(recs) == 1 and recs[0].exc_info is None and "bad" in recs[0].getMessage()


def test_long_text_refused_not_echoed(url, pool, tmp_path):
    """Item 5: a huge task-names box is refused with a short message that does not echo it."""
    c = _client(url)
    c.predict(api_name="/init")
    save_safetensors(pool.base, tmp_path / "base.safetensors")
    for t in ("alpha", "beta"):
        save_safetensors(pool.tasks[t], tmp_path / f"{t}.safetensors")
    h = gradio_client.handle_file
    names = "x" * 6000 + "," + "y" * 6000
    with pytest.raises(Exception) as e:
        c.predict(h(str(tmp_path / "base.safetensors")),
                  [h(str(tmp_path / "alpha.safetensors")), h(str(tmp_path / "beta.safetensors"))],
                  names, [], "auto", [], 0, "", api_name="/load_upload")
    msg = str(e.value)
    assert "at most 4,096 are accepted" in msg and "xxxxxxxxxx" not in msg and len(msg) < 500


def test_ckpt_upload_accepted(url, pool, tmp_path):
    """Item 8: the library reads .ckpt, so the upload box accepts it."""
    import torch
    c = _client(url)
    c.predict(api_name="/init")
    for name, sd in (("base", pool.base), ("alpha", pool.tasks["alpha"]), ("beta", pool.tasks["beta"])):
        torch.save(sd, tmp_path / f"{name}.ckpt")
    h = gradio_client.handle_file
    with pytest.raises(Exception, match="cannot be read from the weights alone. Choose: .*infer"):
        c.predict(h(str(tmp_path / "base.ckpt")), [h(str(tmp_path / "alpha.ckpt")), h(str(tmp_path / "beta.ckpt"))],
                  "", [], "auto", [], 0, "", api_name="/load_upload")      # never guessed: the user is asked
    c.predict(h(str(tmp_path / "base.ckpt")), [h(str(tmp_path / "alpha.ckpt")), h(str(tmp_path / "beta.ckpt"))],
              "", [], "infer", [], 16, "half", api_name="/load_upload")
    md, table, _, _ = c.predict(api_name="/load_upload_view")
    assert "(upload)" in md and [r[0] for r in table["data"]] == ["alpha", "beta"]


def test_session_cap(pool, monkeypatch):
    """Item 4: at most ESM_MAX_SESSIONS sessions; the next visitor is told why, and gets in once one closes."""
    monkeypatch.setenv("ESM_MAX_SESSIONS", "2")
    demo, url = launch_app(lambda: pool)
    try:
        a, b, c = _client(url), _client(url), _client(url)
        a.predict(api_name="/init")
        b.predict(api_name="/init")
        with pytest.raises(Exception, match="busy: 2 people are using it"):
            c.predict(api_name="/init")
        assert len(demo.esm_gate) == 2
        demo.state_holder.delete_all_expired_state()                 # nothing expired: still full
        assert len(demo.esm_gate) == 2
        for sid in list(demo.state_holder.session_data):             # a tab closes: gradio deletes its state
            demo.state_holder.delete_state(sid)
            if len(demo.esm_gate) < 2:
                break
        assert len(demo.esm_gate) == 1
        md, _, _, _ = c.predict(api_name="/init")
        assert "parameters" in md
    finally:
        demo.close()


def test_session_gate_counts_and_forgets():
    """Item 4: the gate counts open sessions, frees a place on close, and forgets a session no event used for
    its ttl (gradio can drop a state without calling its delete callback)."""
    import time
    from esm_core.app.common import SessionGate
    gate = SessionGate(1, ttl_s=0.2)
    s = gate.open()
    with pytest.raises(gr.Error, match="busy"):
        gate.open()
    gate.close(s)
    assert s.closed and len(gate) == 0
    s2 = gate.open()
    time.sleep(0.3)
    s3 = gate.open()                               # s2 was forgotten: nothing used it for the ttl
    assert len(gate) == 1
    for x in (s2, s3):
        gate.close(x)
