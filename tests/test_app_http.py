"""app.py over HTTP: launch the real Blocks on a free port and drive it with gradio_client.

Uses the tiny random pool of tests/fake_pool.py as the starting pool (the
wiring is what is tested here; the numbers are tested in test_session.py).
"""
import json
import os

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from esm_core.checkpoints import read_config, save_safetensors  # noqa: E402
from esm_core.methods import METHODS  # noqa: E402
from fake_pool import FAKE_TASKS, launch_app, make_fake_pool  # noqa: E402


@pytest.fixture(scope="module")
def pool():
    return make_fake_pool()


@pytest.fixture(scope="module")
def url(pool):
    demo, local_url = launch_app(lambda: pool)
    yield local_url
    demo.close()


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
    md, tasks_df, gallery = c.predict(api_name="/init")
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
    with pytest.raises(Exception, match="beta.safetensors: not a valid safetensors"):
        c.predict(h(str(tmp_path / "base.safetensors")),
                  [h(str(tmp_path / "alpha.safetensors")), h(str(tmp_path / "beta.safetensors"))],
                  "", [], "auto", api_name="/load_upload")
    # the session still holds its pool after the refusal
    plot, _, table = c.predict("ta", *_values("ta"), api_name="/merge")
    assert len(table["data"]) == 1
