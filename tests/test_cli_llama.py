"""A tiny Llama-style decoder classifier pool merged from the command line (esm-studio merge, in-process): ESM with
``--config`` / ``--tokenizer`` / ``--proxy <task>.jsonl`` writes exactly the library's ``proxy_pool`` + ``probe_proxy``
+ ``merge_pool`` of the same files, and its recipe (tokenizer files included) repeats it bit for bit; TA without
proxy data merges checkpoints alone when the heads agree, and is refused, naming the head, when they do not."""
import json

import pytest
import torch
from safetensors.torch import load_file

from esm_core import package
from esm_core.cli import main
from esm_core.evaluation import proxy as P
from esm_core.evaluation.recipes import read_recipe
from esm_core.pools.upload_text import read_labelled_text
from tiny_decoder import decoder_upload


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama-cli")
    base, tasks, texts, cfg, tok = decoder_upload(d, "llama")
    (d / "config.json").write_text(json.dumps(cfg))           # not beside the tokenizer files (those are in tok/)
    return {"dir": d, "base": str(base), "tasks": {t: str(p) for t, p in tasks.items()},
            "texts": {t: str(p) for t, p in texts.items()}, "config": str(d / "config.json"), "cfg": cfg,
            "tok": {n: str(p) for n, p in tok.items()}}


def _argv(f, method: str, out, *, proxy: bool = True, tokenizer: bool = True, extra=()) -> list[str]:
    return ["merge", "--base", f["base"], "--config", f["config"],
            *[x for p in (f["tok"].values() if tokenizer else []) for x in ("--tokenizer", p)],
            *[x for t, p in f["tasks"].items() for x in ("--task", f"{t}={p}")],
            *[x for t, p in (f["texts"].items() if proxy else []) for x in ("--proxy", f"{t}={p}")],
            "--method", method, "--device", "cpu", "--out", str(out), *extra]


def _library(f, method: str, params: dict):
    pool = P.proxy_pool(f["base"], f["tasks"], f["texts"], config=f["cfg"], tokenizer_files=f["tok"])
    stats = P.probe_proxy(pool, device="cpu")
    return pool, stats, P.merge_pool(pool, method, params, stats=stats, device="cpu")


def test_cli_esm_on_a_llama_pool_equals_the_librarys_proxy_merge_and_its_recipe_repeats_it(files, tmp_path, capsys):
    out = tmp_path / "esm.safetensors"
    assert main(_argv(files, "esm", out, extra=("--set", "alpha=0.7", "--json"))) == 0
    summary = json.loads(capsys.readouterr().out)
    pool, stats, want = _library(files, "esm", {"alpha": 0.7})
    assert pool.family == "llama" and pool.meta["notes"][0].startswith("family: llama (from config.json")
    half = len(read_labelled_text(files["texts"]["colours"], "colours")[0]) // 2      # the validation half
    assert summary["proxy"]["ids"] == {t: list(v) for t, v in stats["proxy_ids"].items()} == {
        t: list(range(half)) for t in files["tasks"]}                 # 12 sentences < 32: all of them, in order
    got = load_file(out)
    assert set(got) == set(want) and "model.layers.1.mlp.down_proj.weight" in got
    for k, v in want.items():
        assert torch.equal(got[k], v), k                              # tensor for tensor, not approximately
    changed = [k for k in want if not torch.equal(want[k], pool.base[k])]
    assert summary["keys_merged"] == len(changed) > 0

    again = tmp_path / "again.safetensors"          # the recipe names config.json and the tokenizer files (not beside
    assert main(["merge", "--recipe", str(out), "--out", str(again), "--device", "cpu", "--quiet"]) == 0   # it)
    b = load_file(again)
    assert all(torch.equal(got[k], b[k]) for k in got)
    recipe = read_recipe(out)
    assert recipe.model_args == {"config": files["config"], "tokenizer": list(files["tok"].values())}
    raw = package.read_export(out)                                   # a recipe's tokenizer entry is checked
    for bad, says in (("tok.json", "must be a list of 1 to 8 tokenizer files"), ([""], "must be a non-empty string")):
        f = tmp_path / "bad.json"
        f.write_text(json.dumps({**raw, "model_args": {**raw["model_args"], "tokenizer": bad}}))
        with pytest.raises(ValueError, match=says):
            read_recipe(f)


def test_cli_ta_with_proxy_equals_the_library_and_finds_the_tokenizer_beside_config(files, tmp_path):
    """TA reads the pool as ESM does (--proxy); without --tokenizer the files beside --config are read."""
    tok_dir = files["dir"] / "tok"
    (tok_dir / "config.json").write_text(json.dumps(files["cfg"]))
    beside = {**files, "config": str(tok_dir / "config.json")}
    out = tmp_path / "ta.safetensors"
    assert main(_argv(beside, "ta", out, tokenizer=False, extra=("--set", "alpha=0.4", "--quiet"))) == 0
    _, _, want = _library(files, "ta", {"alpha": 0.4})
    got = load_file(out)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_cli_ta_without_proxy_merges_checkpoints_alone_when_the_heads_agree(tmp_path, capsys):
    base, tasks, texts, cfg, tok = decoder_upload(tmp_path, "llama", classes=(2, 2))
    f = {"base": str(base), "tasks": {t: str(p) for t, p in tasks.items()},
         "texts": {t: str(p) for t, p in texts.items()}, "cfg": cfg, "tok": {n: str(p) for n, p in tok.items()}}
    out = tmp_path / "ta.safetensors"
    argv = ["merge", "--base", f["base"], *[x for t, p in f["tasks"].items() for x in ("--task", f"{t}={p}")],
            "--method", "ta", "--set", "alpha=0.4", "--device", "cpu", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    got = load_file(out)
    _, _, want = _library(f, "ta", {"alpha": 0.4})                   # the decoder merged as from the pool
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-7)
    assert torch.equal(got["score.weight"], load_file(base)["score.weight"])   # a task's own head: the base's kept


def test_cli_ta_without_proxy_refuses_heads_of_other_sizes_naming_them(files, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    assert main(_argv(files, "ta", out, proxy=False)) == 2
    err = capsys.readouterr().err
    assert "its own head has another size than the base's (score.weight: (3, 32) vs base (2, 32))" in err and "--proxy" in err
    assert not out.exists()


def test_cli_esm_on_sentences_needs_the_tokenizer(files, tmp_path, capsys):
    """Sentences without tokenizer files (none given, none beside --config): refused before anything is read."""
    out = tmp_path / "x.safetensors"
    assert main(_argv(files, "esm", out, tokenizer=False)) == 2
    assert "sentences as proxy data need the base's config.json and its tokenizer files" in capsys.readouterr().err
    assert not out.exists()


def test_the_model_cards_command_names_the_tokenizer_files(files, tmp_path, monkeypatch):
    """The command written into an export's model card repeats the merge: with the --tokenizer files (they are not
    beside --config here, so without them it would be refused)."""
    import shlex

    from esm_core.cli import merge as M
    seen = []
    monkeypatch.setattr(M, "run_proxy_merge", lambda *a, **k: seen.append(k) or {
        "tasks": a[1], "method": a[2], "out": k["out"], "keys_merged": 0, "seconds": 0.0})
    assert main(_argv(files, "esm", tmp_path / "x.safetensors", extra=("--quiet",))) == 0
    cmd = shlex.split(seen[0]["command"])
    assert [cmd[i + 1] for i, x in enumerate(cmd) if x == "--tokenizer"] == list(files["tok"].values())
    assert main(cmd[1:]) == 0                                         # and it parses to the same merge
    assert seen[1]["tokenizer"] == seen[0]["tokenizer"] == list(files["tok"].values())
    assert seen[1]["config"] == files["config"] and seen[1]["command"] == seen[0]["command"]
