"""Llama-style decoder classifiers (Llama, Qwen2 with grouped-query attention) uploaded through the Pool view over
HTTP (gradio_client): base + task ``*ForSequenceClassification`` safetensors + config.json + tokenizer.json +
tokenizer_config.json + ``<task>.jsonl`` / ``.csv`` load as a text pool named after its family; TA and ESM merges
through the Merge view give the accuracies the library's ``evaluate_method`` gives on the same files (the exported
merge is ``merge_pool``'s, tensor for tensor; a typed sentence is routed); refused uploads (a config that does not
fit the weights, a tokenizer holding a foreign regular expression, a task of another family) name the problem, keep
the previous pool (it still merges) and leave no ``pool-*`` folder in the session's workdir."""
import csv
import html
import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
pytest.importorskip("transformers")
import gradio_client  # noqa: E402

from esm_core.evaluation import evaluate_method  # noqa: E402
from esm_core.evaluation.proxy import merge_pool  # noqa: E402
from esm_core.pools.upload_text import text_pool_from_upload  # noqa: E402
from esm_core.probe import probe_pool  # noqa: E402
from fake_pool import launch_app  # noqa: E402
from test_app_http import _merged_trace, _values  # noqa: E402
from test_hostile_http_round3 import _session_of  # noqa: E402
from test_upload_text import _upload as bert_upload  # noqa: E402
from tiny_decoder import decoder_upload, tokenizer_files  # noqa: E402

h = gradio_client.handle_file


@pytest.fixture(scope="module")
def served(pool):
    demo, url = launch_app(lambda: pool)
    yield demo, url
    demo.close()


def _client(url):
    c = gradio_client.Client(url, verbose=False, download_files=True)
    c.predict(api_name="/init")
    return c


def _args(d, base, tasks: dict, texts: dict, config: dict, tok: dict):
    """The Pool view's upload inputs: base, task checkpoints, names (empty: file names), data files, architecture,
    config files (config.json + tokenizer files), head width, normalisation."""
    (d / "config.json").write_text(json.dumps(config))
    return [h(str(base)), [h(str(p)) for p in tasks.values()], "", [h(str(p)) for p in texts.values()], "auto",
            [h(str(d / "config.json")), *[h(str(p)) for p in tok.values()]], 0, ""]


def _library(base, tasks, texts, config, tok, method: str, params: dict, alpha: float, merged: bool = False):
    """``evaluate_method`` on the pool the library builds from the same files (the app's proxy draw: 32, seed 0);
    with ``merged``, also ``merge_pool``'s merged state dict."""
    pool, _ = text_pool_from_upload(base, tasks, texts, config, tok)
    stats = probe_pool(pool, n=32, seed=0, device="cpu") if method == "esm" else None
    res = evaluate_method(pool, method, params, alpha=alpha, stats=stats, device="cpu")
    if not merged:
        return res
    return res, merge_pool(pool, method, {**params, "alpha": alpha}, stats=stats, device="cpu")


def _app_accs(c, method: str, alpha: float) -> list[float]:
    plot, note, table = c.predict(method, *_values(method, alpha=alpha), api_name="/merge")
    trace = _merged_trace(plot)
    assert "test sentences per task" in note
    return list(trace["x"]), list(trace["y"])


def _want(res: dict, tasks) -> list[float]:
    vals = [100 * res["tasks"][t]["abs"] for t in tasks]
    return [*vals, sum(vals) / len(vals)]


def _pool_folders(s) -> set:
    return {p.name for p in s.workdir.glob("pool-*")}


def test_a_llama_pool_uploads_merges_as_the_library_and_refusals_keep_it(served, tmp_path):
    demo, url = served
    base, tasks, texts, cfg, tok = decoder_upload(tmp_path / "llama", "llama")
    c = _client(url)
    c.predict(*_args(tmp_path, base, tasks, texts, cfg, tok), api_name="/load_upload")
    md, table, gallery, sentences = c.predict(api_name="/load_upload_view")
    assert "(upload)" in md and "`uploaded llama`" in md and "family: llama (from config.json" in md
    assert "2 transformer blocks of width 32" in md                   # the residual width, not the MLP's 64
    assert "padding with its end-of-sequence token '&lt;/s&gt;'" in md     # no pad token: the note says which (escaped)
    assert [r[0] for r in table["data"]] == ["colours", "animals"]
    assert sentences["visible"] is True and gallery["visible"] is False

    names = ["colours", "animals"]
    for method, alpha in (("ta", 0.3), ("esm", 1.0)):
        x, y = _app_accs(c, method, alpha)
        assert x == [*names, "mean"]
        res, merged = _library(base, tasks, texts, cfg, tok, method, {}, alpha, merged=True)
        assert y == pytest.approx(_want(res, names), abs=1e-9), method
    path, _, shown = c.predict(api_name="/export_model")               # the ESM merge on screen, as a file
    got = load_file(path)
    assert shown["method"] == "esm" and set(got) == set(merged)
    assert all(torch.equal(got[k], v) for k, v in merged.items())        # the library's merge, tensor for tensor
    summary = c.predict(4, "my sentence", 2, None, False, "the red cat is very happy", api_name="/route")[0]
    assert "Your sentence** went to the **" in summary                  # ESM++ routes a typed sentence

    s = _session_of(demo, c.session_hash)
    pool_before, folders = s.pool, _pool_folders(s)
    assert len(folders) == 1                                          # the accepted upload's task files

    dirs = {n: tmp_path / n for n in ("cfg", "regex", "bert")}       # each bad upload's own config.json
    for d in dirs.values():
        d.mkdir()
    bad_cfg = _args(dirs["cfg"], base, tasks, texts, {**cfg, "hidden_size": 64}, tok)
    regex_tok = tokenizer_files(dirs["regex"] / "tok", split_pattern=r"(a|a)*$")
    bad_regex = _args(dirs["regex"], base, tasks, texts, cfg, regex_tok)
    bert_tasks, _, _, _ = bert_upload(dirs["bert"], "bert")
    bad_family = _args(dirs["bert"], base, {"colours": tasks["colours"], "animals": bert_tasks["animals"]}, texts,
                       cfg, tok)
    for args, says in ((bad_cfg, r"config\.json: hidden_size = 64 does not fit the checkpoint: "
                                 r"model\.embed_tokens\.weight has shape \(320, 32\)"),
                       (bad_regex, r"tokenizer\.json: .*\(Split\) has the pattern '\(a\|a\)\*\$', a regular "
                                   r"expression: this server runs no regular expression of an upload"),
                       (bad_family, r"task 'animals': not a checkpoint of the base's layout \(Llama-style decoder")):
        with pytest.raises(Exception) as e:
            c.predict(*args, api_name="/load_upload")
        text = html.unescape(str(e.value))
        assert re.search(says, text), text
        assert s.pool is pool_before and _pool_folders(s) == folders, says   # the llama pool stays, nothing added
        _, table2, _, _ = c.predict(api_name="/load_upload_view")
        assert [r[0] for r in table2["data"]] == names
    x, y = _app_accs(c, "ta", 0.3)                                   # and it still merges, to the same numbers
    assert y == pytest.approx(_want(_library(base, tasks, texts, cfg, tok, "ta", {}, 0.3), names), abs=1e-9)


def test_a_qwen2_pool_with_grouped_query_attention_uploads_and_merges_as_the_library(served, tmp_path):
    demo, url = served
    base, tasks, texts, cfg, tok = decoder_upload(tmp_path, "qwen2", classes=(3, 2, 4))
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]    # grouped-query attention
    rows = [json.loads(line) for line in texts["sizes"].read_text().splitlines()]
    texts["sizes"] = tmp_path / "sizes.csv"                            # one task's sentences as a .csv
    with open(texts["sizes"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerows([("text", "label"), *[(r["text"], r["label"]) for r in rows]])
    c = _client(url)
    c.predict(*_args(tmp_path, base, tasks, texts, cfg, tok), api_name="/load_upload")
    md, table, _, _ = c.predict(api_name="/load_upload_view")
    assert "`uploaded qwen2`" in md and "family: qwen2 (from config.json" in md
    names = ["colours", "animals", "sizes"]
    assert [r[0] for r in table["data"]] == names and [r[1] for r in table["data"]] == [3, 2, 4]
    x, y = _app_accs(c, "ta", 0.3)
    assert x == [*names, "mean"]
    assert y == pytest.approx(_want(_library(base, tasks, texts, cfg, tok, "ta", {}, 0.3), names), abs=1e-9)
