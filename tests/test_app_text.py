"""The app on the text pool over HTTP (gradio_client): build it from the Pool view (with progress), load it,
see sample sentences, merge, inspect, route a typed sentence, export. A tiny pool (random 2-layer BERT, two
fabricated tasks) stands in for the real one; the build is the real build on tiny readers."""
import os

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
import gradio_client  # noqa: E402

from esm_core.checkpoints import read_config  # noqa: E402
from esm_core.pools import text_build, text_data  # noqa: E402
from fake_pool import launch_app  # noqa: E402
from fake_text_pool import READERS, tiny_model_dir, tiny_recipe  # noqa: E402
from test_app_http import _merged_trace, _values  # noqa: E402


@pytest.fixture(scope="module")
def served(pool, tmp_path_factory):
    root = tmp_path_factory.mktemp("apptext")
    mp = pytest.MonkeyPatch()
    mp.setattr(text_build, "TEXT_POOL_DIR", root / "text-pool")                  # the cache folder, empty
    mp.setattr(text_build, "RECIPE", {**tiny_recipe(tiny_model_dir(root)), "tasks": list(READERS)})
    mp.setattr(text_data, "READERS", {**text_data.READERS, **READERS})
    demo, url = launch_app(lambda: pool)
    yield url, root
    demo.close()
    mp.undo()


def test_build_load_merge_route_export(served):
    url, root = served
    c = gradio_client.Client(url, verbose=False, download_files=True)
    c.predict(api_name="/init")
    with pytest.raises(Exception, match="not built yet"):
        c.predict(api_name="/load_text")
    status = c.predict(api_name="/build_text")
    assert "Built in" in status and "colours, animals" in status
    assert (root / "text-pool" / "pool.json").is_file()

    c.predict(api_name="/load_text")
    md, tasks, gallery, sentences = c.predict(api_name="/load_text_view")
    assert "`text`" in md and "2 transformer blocks of width 32" in md
    assert [r[0] for r in tasks["data"]] == ["colours", "animals"] and "test sentences" in tasks["headers"]
    assert gallery["visible"] is False and not gallery["value"]            # no images for a text pool
    assert sentences["visible"] is True
    rows = sentences["value"]["data"]
    assert [r[0] for r in rows] == ["colours"] * 3 + ["animals"] * 3            # 3 sentences per task,
    assert {r[1] for r in rows[:3]} == {"c0", "c1", "c2"}                        # each of another class where possible
    assert all(isinstance(r[2], str) and r[2] for r in rows)

    plot, note, cmp = c.predict("esm", *_values("esm", alpha=1.0), api_name="/merge")
    assert list(_merged_trace(plot)["x"]) == ["colours", "animals", "mean"]
    assert "test sentences per task" in note
    key = "encoder.layer.1.intermediate.dense.weight"
    heat, spec = c.predict(1.0, "SVD energy kept at k", key, "animals", api_name="/spectra")
    assert heat is not None and spec is not None

    out = c.predict(4, "my sentence", 2, None, False, "the red cat is very happy", api_name="/route")
    summary = out[0]
    assert "Your sentence** went to the **" in summary
    choices = out[4]
    with pytest.raises(Exception, match="type a sentence first"):
        c.predict(4, "my sentence", 2, None, False, "   ", api_name="/route")

    assert [lab for lab, _ in choices["choices"]][-1] == "your sentence"

    path, note, shown = c.predict(api_name="/export_model")
    cfg = read_config(path)
    assert cfg["method"] == "esm" and shown["method"] == "esm"
    from safetensors import safe_open
    with safe_open(path, "pt") as f:                                     # the merged encoder, BERT key names
        assert "encoder.layer.0.attention.self.query.weight" in set(f.keys())


def test_upload_a_text_pool_through_the_pool_view(served, tmp_path):
    """BERT sequence classifiers + config.json + vocab.txt + <task>.jsonl through the upload form: loaded as a
    text pool (sample sentences, the classifiers' own heads); image zips mixed with text files are refused."""
    from test_upload_text import _upload
    url, _ = served
    paths, texts, cfg, tok = _upload(tmp_path, "bert")
    (tmp_path / "config.json").write_text(__import__("json").dumps(cfg))
    c = gradio_client.Client(url, verbose=False, download_files=True)
    c.predict(api_name="/init")
    h = gradio_client.handle_file
    args = (h(str(tmp_path / "base.safetensors")), [h(str(paths["colours"])), h(str(paths["animals"]))], "",
            [h(str(texts["colours"])), h(str(texts["animals"]))], "auto",
            [h(str(tmp_path / "config.json")), h(str(tok["vocab.txt"]))], 0, "")
    c.predict(*args, api_name="/load_upload")
    md, table, gallery, sentences = c.predict(api_name="/load_upload_view")
    assert "(upload)" in md and [r[0] for r in table["data"]] == ["colours", "animals"]
    assert sentences["visible"] is True and gallery["visible"] is False
    no_config = args[:5] + ([h(str(tok["vocab.txt"]))],) + args[6:]
    with pytest.raises(Exception, match="config.json"):
        c.predict(*no_config, api_name="/load_upload")
