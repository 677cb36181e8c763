"""Folder exports of Llama-style decoder pools (Llama, Qwen2, Mistral): a transformers folder that ``AutoModel``
loads as the bare ``LlamaModel`` / ``Qwen2Model`` / ``MistralModel``, whose last-token features times each task's
head file are the studio's logits of that task (its own biases, Qwen2's Q / K / V, loaded from the head file,
methods §8); the tokenizer in the folder tokenises as the pool's (a tokenizer that would read back otherwise is
refused); the model card's own code gives those features; a config that does not fit the weights is refused before
anything is written; the command line reads config.json + tokenizer files next to the base. Tiny random models and
byte-level BPE / word-level tokenizers built offline; nothing downloads."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import esm_core
from esm_core import cli, package
from esm_core.checkpoints import save_safetensors
from esm_core.models import llama
from esm_core.pools.text_pool import TextTaskPool
from esm_core.pools.upload_text import load_tokenizer_files

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers, trainers  # noqa: E402
from transformers import (AutoModel, AutoTokenizer, LlamaConfig, LlamaForSequenceClassification,  # noqa: E402
                          MistralConfig, MistralForSequenceClassification, PreTrainedTokenizerFast, Qwen2Config,
                          Qwen2ForSequenceClassification)

CFG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           vocab_size=300, pad_token_id=0)
TEXTS = ["the red cat", "a very happy blue dog is sad", "two", "one green bird is very very happy", "a purple zebra!"]
KINDS = {"llama": (LlamaForSequenceClassification, LlamaConfig, "LlamaModel"),
         "qwen2": (Qwen2ForSequenceClassification, Qwen2Config, "Qwen2Model"),
         "mistral": (MistralForSequenceClassification, MistralConfig, "MistralModel")}
CLASSES = {"colours": ["r", "g", "b"], "animals": ["cat", "dog"]}


def _tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE of 300 tokens (``<pad>`` = 0), trained offline on a few sentences (deterministic): the
    kind of tokenizer Llama 3 / Qwen2 / Mistral models have."""
    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS * 4 + ["the colours red green blue and the animals cat dog bird"],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<eos>"], show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", padding_side="right")


def _upload_tokenizer(kind: str, folder: Path):
    """The tokenizer as an upload reads it (its files + the config's model_type; a Qwen2 one is a Qwen2Tokenizer)."""
    _tokenizer().save_pretrained(str(folder))
    tok = load_tokenizer_files({p.name: p for p in folder.iterdir()}, {"model_type": kind})
    assert tok(TEXTS)["input_ids"] == _tokenizer()(TEXTS)["input_ids"] and tok.pad_token_id == 0
    return tok


def _hf(kind: str, seed: int, num_labels: int, **over):
    cls, config, _ = KINDS[kind]
    torch.manual_seed(seed)
    return cls(config(**{**CFG, **over}, num_labels=num_labels)).eval()


def _tasks(kind: str, **over):
    """Base and two fine-tuned classifiers (every float tensor moved, Qwen2's biases too): pool-layout state dicts
    without ``score``, and each task's ``score`` head (the animals one given a bias: heads may have one)."""
    base_hf = _hf(kind, 0, 3, **over)
    base = llama.encoder_state(base_hf.state_dict())
    g = torch.Generator().manual_seed(1)
    tasks, heads = {}, {}
    for t, names in CLASSES.items():
        tasks[t] = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        heads[t] = {"weight": torch.randn(len(names), CFG["hidden_size"], generator=g)}
    heads["animals"]["bias"] = torch.randn(2, generator=g)
    return base_hf, base, tasks, heads


def _pool(kind: str, tmp: Path, **over) -> TextTaskPool:
    """A decoder pool as an upload makes it: checked config, pooling "last", right-padding tokenizer."""
    base_hf, base, tasks, heads = _tasks(kind, **over)
    (tmp / "tok").mkdir()
    data = {t: {"val": (TEXTS[:2], [0, 1]), "test": (TEXTS[2:], [1, 0]), "proxy_ids": [0]} for t in tasks}
    return TextTaskPool(name=f"tiny-{kind}", model_config=llama.check_config(base_hf.config.to_dict()), base=base,
                        tasks=tasks, heads=heads, class_names=dict(CLASSES), data=data, tokenizer=_upload_tokenizer(kind, tmp / "tok"),
                        max_length=16, family=llama.NAME, pooling="last")


def _export(pool, out: Path, merged, **kw) -> Path:
    """What the app's Export view does (studio/export.py)."""
    return package.write_export(out, merged, base_sd=package.base_of(pool), family=package.family_of_pool(pool),
                                model_info=package.model_info_of(pool), heads=package.heads_of(pool),
                                recipe={"method": "ta", "params": {"alpha": 0.4}, "tasks": list(pool.task_names),
                                        "base": pool.model_name, "source": "test"}, **kw)


def _card_features(folder: Path, texts: list[str], own: dict | None = None) -> torch.Tensor:
    """The features the model card's own code computes (its ``python`` block run as written), with a task's own
    biases loaded into the model right after it is loaded."""
    card = (folder / "README.md").read_text()
    code = re.search(r"## Use\n\n```python\n(.*?)\n```", card, re.S).group(1)
    load = 'model = AutoModel.from_pretrained("<this folder>")'
    assert load in code and '["a sentence"]' in code
    code = code.replace(load, load + "\nassert not model.load_state_dict(OWN, strict=False).unexpected_keys")
    code = code.replace("<this folder>", str(folder)).replace('["a sentence"]', "TEXTS")
    ns = {"OWN": own or {}, "TEXTS": texts}
    with torch.no_grad():
        exec(code, ns)
    return ns["features"]


@pytest.mark.parametrize("kind", list(KINDS))
def test_decoder_folder_loads_in_automodel_and_gives_each_tasks_logits(kind, tmp_path):
    pool = _pool(kind, tmp_path)
    merged = esm_core.merge("ta", pool.base, pool.tasks, alpha=0.4)
    out = _export(pool, tmp_path / "dec", merged)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "heads", "README.md",
            "merge_recipe.json"} <= names
    model = AutoModel.from_pretrained(str(out)).eval()
    assert type(model).__name__ == KINDS[kind][2]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == [KINDS[kind][2]] and cfg["model_type"] == kind and cfg["pad_token_id"] == 0
    saved = load_file(str(out / "model.safetensors"))               # the bare *Model layout, no head
    assert set(saved) == {llama.strip_prefix(k) for k in merged} and not any(k.startswith("score") for k in saved)
    # the folder's tokenizer tokenises as the pool's (same ids, same right padding)
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok(TEXTS)["input_ids"] == pool.tokenizer(TEXTS)["input_ids"] and tok.padding_side == "right"
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    x = llama.pack({k: batch[k] for k in ("input_ids", "attention_mask")})
    assert torch.equal(x, pool.encode(TEXTS))
    studio = pool.build_model(merged)
    for t in pool.task_names:
        h = load_file(str(out / "heads" / f"{t}.safetensors"))
        own = {k[len("encoder."):]: v for k, v in h.items() if k.startswith("encoder.")}
        want_own = {llama.strip_prefix(k): v for k, v in pool.tasks[t].items() if k.endswith(".bias")}
        assert own.keys() == want_own.keys() and all(torch.equal(own[k], want_own[k]) for k in own)
        assert bool(own) == (kind == "qwen2")                        # Qwen2's Q / K / V biases are the task's own
        assert torch.equal(h["weight"], pool.heads[t]["weight"]) and ("bias" in h) == ("bias" in pool.heads[t])
        pool.prepare(studio, t)
        with torch.no_grad():
            want = pool.logits(t, studio(x))
        feats = _card_features(out, TEXTS, own)
        got = feats @ h["weight"].T + (h["bias"] if "bias" in h else 0)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        if own:                                   # without the task's own biases the model is not the task's
            other = _card_features(out, TEXTS) @ h["weight"].T + (h["bias"] if "bias" in h else 0)
            assert (other - got).abs().max() > 1e-3
    meta = json.loads((out / "merge_recipe.json").read_text())
    assert meta["family"] == "llama" and meta["format"] == "transformers"
    card = (out / "README.md").read_text()
    assert package.front_matter(card) == {"base_model": pool.model_name, "tags": ["merge", "ta", "esm-studio"],
                                          "library_name": "transformers"}
    assert "rightmost token that is not padding" in card


def test_export_in_half_precision_loads_in_it_whatever_the_uploaded_config_said(tmp_path):
    """transformers loads a folder in its config's dtype: the config written says the weights' dtype, not the
    uploaded config's (a Qwen2 config.json says bfloat16)."""
    pool = _pool("qwen2", tmp_path)
    pool.model_config["torch_dtype"] = "bfloat16"
    merged = esm_core.merge("ta", pool.base, pool.tasks, alpha=0.4)
    m32 = AutoModel.from_pretrained(str(_export(pool, tmp_path / "f32", merged)))
    m16 = AutoModel.from_pretrained(str(_export(pool, tmp_path / "f16", merged, dtype="float16")))
    assert next(m32.parameters()).dtype == torch.float32 and next(m16.parameters()).dtype == torch.float16
    assert torch.equal(m32.layers[1].mlp.up_proj.weight, merged["model.layers.1.mlp.up_proj.weight"])


def test_a_config_that_does_not_fit_the_weights_is_refused_before_writing(tmp_path):
    pool = _pool("llama", tmp_path)
    merged = esm_core.merge("ta", pool.base, pool.tasks, alpha=0.4)
    exports = tmp_path / "exports"
    exports.mkdir()
    pool.model_config["intermediate_size"] = 48
    with pytest.raises(ValueError, match="intermediate_size = 48 does not fit the checkpoint"):
        _export(pool, exports / "bad", merged)
    pool.model_config.update(intermediate_size=64, num_key_value_heads=4)
    with pytest.raises(ValueError, match="num_key_value_heads × head_dim = 32 does not fit"):
        _export(pool, exports / "bad", merged)
    pool.model_config = {}
    with pytest.raises(ValueError, match="config.json"):
        _export(pool, exports / "bad", merged)
    missing = {k: v for k, v in merged.items() if "layers.1.mlp.down_proj" not in k}
    pool.model_config = llama.check_config(_hf("llama", 0, 3).config.to_dict())
    with pytest.raises(ValueError, match="not a Llama-style decoder checkpoint"):
        _export(pool, exports / "bad", missing)
    assert list(exports.iterdir()) == []                          # nothing written, no temporary folder left


def _word_level():
    """A word-level tokenizer (not a byte-level BPE): transformers reads it back as what it was written, except
    under a model_type whose tokenizer class transformers imposes (Qwen2's rebuilds a byte-level pipeline)."""
    words = ["<pad>", "<unk>", "<eos>", "the", "red", "cat", "a", "very", "happy", "blue", "dog", "is", "sad"]
    tok = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>",
                                   padding_side="right")


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_tokenizer_that_would_not_read_back_the_same_is_refused(kind, tmp_path):
    pool = _pool(kind, tmp_path)
    pool.tokenizer = _word_level()
    merged = esm_core.merge("ta", pool.base, pool.tasks, alpha=0.4)
    exports = tmp_path / "exports"
    exports.mkdir()
    if kind != "qwen2":                                          # read back as written
        out = _export(pool, exports / "ok", merged)
        assert AutoTokenizer.from_pretrained(str(out))(TEXTS)["input_ids"] == pool.tokenizer(TEXTS)["input_ids"]
        return
    with pytest.raises(ValueError, match="reads back through transformers' AutoTokenizer as a Qwen2Tokenizer"):
        _export(pool, exports / "bad", merged)
    assert list(exports.iterdir()) == []


def test_a_failed_decoder_export_leaves_nothing(tmp_path, monkeypatch):
    pool = _pool("qwen2", tmp_path)
    merged = esm_core.merge("ta", pool.base, pool.tasks, alpha=0.4)

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(pool.tokenizer, "save_pretrained", boom)  # after the weights and config.json are written
    exports = tmp_path / "exports"
    exports.mkdir()
    with pytest.raises(OSError, match="disk full"):
        _export(pool, exports / "dec", merged)
    assert list(exports.iterdir()) == []


# ---------------------------------------------------------------- the command line

@pytest.fixture(scope="module")
def decoder_files(tmp_path_factory):
    """Tiny Qwen2 sequence classifiers as a user has them: base / task files next to config.json + tokenizer."""
    d = tmp_path_factory.mktemp("qwen2")
    base_hf, base, tasks, _ = _tasks("qwen2")
    base_hf.config.architectures = ["Qwen2ForSequenceClassification"]
    (d / "config.json").write_text(base_hf.config.to_json_string())
    _tokenizer().save_pretrained(str(d))
    save_safetensors(base_hf.state_dict(), d / "base.safetensors")
    for t, sd in tasks.items():
        save_safetensors({**sd, "score.weight": base_hf.score.weight.detach()}, d / f"{t}.safetensors")
    return d, base_hf, tasks


def test_model_info_from_files_reads_config_and_tokenizer_next_to_the_base(decoder_files):
    d, base_hf, _ = decoder_files
    info = package.model_info_from_files("llama", d / "base.safetensors")
    assert info["model_config"] == llama.check_config(json.loads((d / "config.json").read_text()))
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(info["tokenizer_files"])
    assert all(Path(p).parent == d for p in info["tokenizer_files"].values())
    assert info["pooling"] == "last"
    assert package.model_info_from_files("llama", "elsewhere.safetensors", str(d))["model_config"] == \
        info["model_config"]                                           # --model <folder holding config.json>


def test_model_info_from_files_refuses_a_bad_decoder_config_naming_it(tmp_path):
    with pytest.raises(ValueError, match="needs the model's config.json: none at"):
        package.model_info_from_files("llama", tmp_path / "base.safetensors")
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({**CFG, "model_type": "qwen2", "num_key_value_heads": 3}))
    with pytest.raises(ValueError, match=r"config\.json: num_key_value_heads = 3 does not divide"):
        package.model_info_from_files("llama", tmp_path / "base.safetensors")
    bad.write_text(json.dumps({**CFG, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not a Llama-style decoder"):
        package.model_info_from_files("llama", tmp_path / "base.safetensors")
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must be a JSON object, got list"):
        package.model_info_from_files("llama", tmp_path / "base.safetensors")


def test_cli_merge_writes_a_decoder_folder_that_automodel_loads(decoder_files, capsys):
    d, base_hf, tasks = decoder_files
    out = d / "merged-ta"
    rc = cli.main(["merge", "--base", str(d / "base.safetensors"), "--task", f"colours={d / 'colours.safetensors'}",
                   "--task", f"animals={d / 'animals.safetensors'}", "--method", "ta", "--set", "alpha=0.4",
                   "--device", "cpu", "--out", str(out), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    model = AutoModel.from_pretrained(str(out)).eval()
    assert type(model).__name__ == "Qwen2Model"
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok(TEXTS)["input_ids"] == _tokenizer()(TEXTS)["input_ids"]
    base = llama.encoder_state(base_hf.state_dict())
    merged = esm_core.merge("ta", base, tasks, alpha=0.4)
    studio = llama.build_model(merged, base_hf.config.to_dict())
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        want = studio(llama.pack({k: batch[k] for k in ("input_ids", "attention_mask")}))
    torch.testing.assert_close(_card_features(out, TEXTS), want, rtol=0, atol=1e-5)
    assert package.front_matter((out / "README.md").read_text())["library_name"] == "transformers"
    assert package.read_export(out)["family"] == "llama"
