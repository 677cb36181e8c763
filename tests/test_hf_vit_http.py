"""Hugging Face ViT classifiers uploaded through the Pool view over HTTP (gradio_client): base + per-task
``model.safetensors`` + config.json + preprocessor_config.json + image zips give a ViT pool scored with each task's
own classifier; ESM merges it; a refused upload names the problem and leaves the previous pool in place."""
import json
import os

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
pytest.importorskip("transformers")
import gradio_client  # noqa: E402

from fake_pool import launch_app, make_fake_pool  # noqa: E402
from test_app_http import _merged_trace, _values  # noqa: E402
from test_hf_vit import CLASSES, _zip, hf, upload_files  # noqa: E402, F401  (fixtures)


@pytest.fixture(scope="module")
def url():
    pool = make_fake_pool()
    demo, url = launch_app(lambda: pool)
    yield url
    demo.close()


@pytest.mark.slow                       # an app, an upload, a probe and an ESM merge over HTTP (~50 s here)
def test_upload_a_vit_classifier_pool_through_the_pool_view(url, upload_files, tmp_path):
    u = upload_files
    (tmp_path / "config.json").write_text(json.dumps(u["config"]))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(u["pre"]))
    h = gradio_client.handle_file
    c = gradio_client.Client(url, verbose=False, download_files=True)
    c.predict(api_name="/init")
    args = [h(str(u["base"])), [h(str(u["tasks"][t])) for t in CLASSES], ", ".join(CLASSES),
            [h(str(u["zips"][t])) for t in CLASSES], "auto",
            [h(str(tmp_path / "config.json")), h(str(tmp_path / "preprocessor_config.json"))], 0, ""]
    c.predict(*args, api_name="/load_upload")
    md, table, gallery, sentences = c.predict(api_name="/load_upload_view")
    assert "(upload)" in md and [r[0] for r in table["data"]] == list(CLASSES)
    assert gallery["visible"] is True and sentences["visible"] is False
    assert "own classifier" in json.dumps(table)

    plot, note, cmp = c.predict("esm", *_values("esm", alpha=0.5), api_name="/merge")
    assert list(_merged_trace(plot)["x"]) == [*CLASSES, "mean"]

    wrong = _zip(tmp_path / "a.zip", 5, 2, 0)                      # 5 class folders for a 3-class classifier
    bad = list(args)
    bad[3] = [h(str(wrong)), *[h(str(u["zips"][t])) for t in list(CLASSES)[1:]]]
    with pytest.raises(Exception, match="its classifier has 3 classes but a.zip has 5 class folders"):
        c.predict(*bad, api_name="/load_upload")
    md2, table2, _, _ = c.predict(api_name="/load_upload_view")       # the previous (ViT) pool stays
    assert [r[0] for r in table2["data"]] == list(CLASSES)
