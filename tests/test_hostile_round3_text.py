"""Hostile text (BERT-family) uploads, third round: every one is refused before the work it would cost, with a
message naming the file, field or component at fault. Tiny models built in code (tests/test_upload_text.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

from esm_core import studio
from esm_core.checkpoints import CheckpointError, save_safetensors
from esm_core.models import bert
from esm_core.pools import upload_text as ut
from esm_core.pools.upload_text import load_tokenizer_files, read_labelled_text, text_pool_from_upload
from fake_text_pool import WORDS
from test_upload_text import _upload


class Built(AssertionError):
    pass


@pytest.fixture
def nothing_built(monkeypatch):
    """Fails the test if a model (even a meta-device one) is built."""
    def refuse(*a, **k):
        raise Built("a model was built")
    monkeypatch.setattr(bert, "_expected_shapes", refuse)
    monkeypatch.setattr(transformers.AutoModel, "from_config", refuse)


@pytest.fixture
def up(tmp_path):
    paths, texts, cfg, tok = _upload(tmp_path, "bert")
    return tmp_path / "base.safetensors", paths, texts, cfg, tok


# ---------------------------------------------------------------- 8: config sizes against the checkpoint

def test_a_160000_layer_config_is_refused_before_anything_is_built(up, nothing_built):
    base, paths, texts, cfg, tok = up
    with pytest.raises(ValueError, match=r"num_hidden_layers = 160000 must be a whole number from 1 to 128 "
                                         r"\(the checkpoint: it holds 2 layers \(encoder\.layer\.0 … encoder\.layer\.1\)"):
        text_pool_from_upload(base, paths, texts, {**cfg, "num_hidden_layers": 160_000}, tok)


def test_a_layer_count_under_the_cap_must_equal_the_checkpoints(up, nothing_built):
    base, paths, texts, cfg, tok = up
    with pytest.raises(ValueError, match=r"num_hidden_layers = 100 does not fit the checkpoint: it holds 2 layers"
                                         r".*missing keys of layers"):
        text_pool_from_upload(base, paths, texts, {**cfg, "num_hidden_layers": 100}, tok)
    with pytest.raises(ValueError, match=r"num_hidden_layers = 1 does not fit .*unexpected keys of layers"):
        text_pool_from_upload(base, paths, texts, {**cfg, "num_hidden_layers": 1}, tok)


@pytest.mark.parametrize("field,value,shows", [
    ("hidden_size", 64, r"embeddings\.word_embeddings\.weight has shape \(22, 32\)"),
    ("vocab_size", 5000, r"embeddings\.word_embeddings\.weight has shape \(22, 32\)"),
    ("max_position_embeddings", 4096, r"embeddings\.position_embeddings\.weight has shape \(40, 32\)"),
    ("type_vocab_size", 3, r"embeddings\.token_type_embeddings\.weight has shape \(2, 32\)"),
    ("intermediate_size", 96, r"encoder\.layer\.0\.intermediate\.dense\.weight has shape \(48, 32\)"),
])
def test_each_size_field_must_equal_the_checkpoints_tensors(up, nothing_built, field, value, shows):
    base, paths, texts, cfg, tok = up
    with pytest.raises(ValueError, match=rf"config\.json: {field} = {value:,} does not fit the checkpoint: {shows} "
                                         r"\(shape mismatch\)"):
        text_pool_from_upload(base, paths, texts, {**cfg, field: value}, tok)


@pytest.mark.parametrize("value,msg", [
    (3, r"num_attention_heads = 3 does not divide hidden_size = 32"),
    (64, r"num_attention_heads = 64 does not divide hidden_size = 32"),
    (2 ** 40, r"num_attention_heads = 1099511627776 is out of range \(at most 2,147,483,647\)"),
    (2000, r"num_attention_heads = 2000 must be a whole number from 1 to 1,024"),
    (0, r"num_attention_heads = 0 must be a whole number"),
    ("2", r"num_attention_heads = '2' must be a whole number"),
])
def test_attention_heads_must_divide_the_width(up, nothing_built, value, msg):
    base, paths, texts, cfg, tok = up
    with pytest.raises(ValueError, match=msg):
        text_pool_from_upload(base, paths, texts, {**cfg, "num_attention_heads": value}, tok)


def test_distilbert_fields_are_checked_by_their_own_names(tmp_path, nothing_built):
    sd = transformers.AutoModel.__dict__  # noqa: F841  (the fixture patched from_config: build by hand below)
    from transformers import DistilBertConfig, DistilBertModel
    with torch.device("meta"):
        m = DistilBertModel(DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=48, vocab_size=22,
                                             max_position_embeddings=40))
    state = {k: torch.zeros(v.shape) for k, v in m.state_dict().items()}
    cfg = {"model_type": "distilbert", "dim": 32, "n_layers": 10_000, "n_heads": 2, "hidden_dim": 48,
           "vocab_size": 22, "max_position_embeddings": 40}
    with pytest.raises(ValueError, match=r"n_layers = 10000 must be a whole number from 1 to 128 .*2 layers "
                                         r"\(transformer\.layer\.0"):
        bert.check_shapes(state, cfg)
    with pytest.raises(ValueError, match=r"hidden_dim = 64 does not fit .*transformer\.layer\.0\.ffn\.lin1\.weight"):
        bert.check_shapes(state, {**cfg, "n_layers": 2, "hidden_dim": 64})


def test_the_parameter_cap_applies_to_what_the_config_describes(up):
    base, paths, texts, cfg, tok = up
    from safetensors.torch import load_file
    sd = bert.encoder_state(load_file(str(base)))
    with pytest.raises(ValueError, match=r"config\.json describes a model of about 0 M parameters, more than the "
                                         r"0 M this server builds"):
        bert.check_shapes(sd, cfg, max_params=1000)
    assert bert.check_shapes(sd, cfg, max_params=10 ** 6) == {}


# ---------------------------------------------------------------- 12: numbers in config.json

@pytest.mark.parametrize("text,msg", [
    ('"layer_norm_eps": 1e400', r"config\.json: layer_norm_eps = inf is not a finite number"),
    ('"layer_norm_eps": 5', r"config\.json: layer_norm_eps = 5 must be a number between 0 and 1"),
    ('"layer_norm_eps": 0', r"config\.json: layer_norm_eps = 0 must be a number between 0 and 1"),
    ('"hidden_dropout_prob": -1e400', r"config\.json: hidden_dropout_prob = -inf is not a finite number"),
    ('"attention_probs_dropout_prob": 1.5', r"attention_probs_dropout_prob = 1\.5 must be a probability"),
    ('"pad_token_id": 1000000000000000000000000000000', r"pad_token_id = about 10\^30 is out of range"),
    ('"pad_token_id": 22', r"pad_token_id = 22 is not a token of the vocabulary \(vocab_size 22\)"),
    ('"model_type": "gpt2"', r"model_type 'gpt2' is not a BERT-family encoder"),
    ('"initializer_range": "abc"', r"config\.json: transformers cannot read it \(TypeError: Field 'initializer_range' "
                                   r"expected float, got str"),
    ('"x": ' + "[" * 40 + "]" * 40, r"config\.json: x" + r"\[0\]" * 8 + r" is nested more than 8 levels deep"),
])
def test_numbers_in_the_config_are_finite_and_in_range(up, nothing_built, text, msg):
    base, paths, texts, cfg, tok = up
    bad = json.loads(json.dumps(cfg)[:-1] + ", " + text + "}")       # as the app reads config.json
    with pytest.raises(ValueError, match=msg):
        text_pool_from_upload(base, paths, texts, bad, tok)


# ---------------------------------------------------------------- 12: labels, nesting, integer weights

@pytest.mark.parametrize("label,msg", [
    (-1, r"row 2: label -1 is not a class index"),
    (2 ** 40, r"row 2: label 1099511627776 is not a class index"),
    (10 ** 30, r"row 2: label about 10\^30 is not a class index"),
    ("²", r"row 2: label '²' is not a class index"),
    ("99999999999999999999", r"row 2: label '99999999999999999999' is not a class index"),
    (1.0, r"row 2: label '1\.0' is not a class index"),
    ({"a": 1}, r"row 2: label 'dict' is not a class index"),
])
def test_labels_are_bounded_class_indices(tmp_path, label, msg):
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"text": "red cat", "label": 0}) + "\n" + json.dumps({"text": "dog", "label": label}) + "\n")
    with pytest.raises(ValueError, match=r"t: t\.jsonl " + msg):
        read_labelled_text(f, "t")


def test_a_deeply_nested_jsonl_row_is_refused_before_parsing(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": ' + "[" * 200_000 + "]" * 200_000 + "}\n")
    with pytest.raises(ValueError, match=r"t: t\.jsonl line 2 is nested more than 4 levels deep"):
        read_labelled_text(f, "t")
    # brackets inside a sentence are text, not nesting
    f.write_text('{"text": "' + "[{" * 100 + ' red", "label": 0}\n{"text": "b", "label": 1}\n')
    texts, y = read_labelled_text(f, "t")
    assert texts[0].startswith("[{[{") and y.tolist() == [0, 1]


def test_a_deeply_nested_tokenizer_file_is_refused(up):
    base, paths, texts, cfg, tok = up
    deep = base.parent / "tokenizer_config.json"
    deep.write_text('{"x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json is nested more than 32 levels deep"):
        load_tokenizer_files({**tok, "tokenizer_config.json": deep})


def _set_dtype(path, key, dtype):
    from safetensors.torch import load_file
    sd = load_file(str(path))
    sd[key] = sd[key].to(dtype)
    save_safetensors(sd, path)


def test_an_int32_weight_in_a_text_task_is_refused_as_for_images(up):
    base, paths, texts, cfg, tok = up
    _set_dtype(paths["animals"], "bert.encoder.layer.0.attention.self.query.weight", torch.int32)
    with pytest.raises(CheckpointError, match=r"checkpoint 'animals\.safetensors' does not fit the base model — "
                                              r"dtype mismatch \(float vs non-float\): "
                                              r"encoder\.layer\.0\.attention\.self\.query\.weight: torch\.int32"):
        text_pool_from_upload(base, paths, texts, cfg, tok)


def test_an_int32_weight_in_the_base_is_refused(up):
    base, paths, texts, cfg, tok = up
    _set_dtype(base, "bert.encoder.layer.1.output.dense.weight", torch.int32)
    with pytest.raises(ValueError, match=r"checkpoint weights must be floating point: "
                                         r"\['encoder\.layer\.1\.output\.dense\.weight \(int32\)'\] are not"):
        text_pool_from_upload(base, paths, texts, cfg, tok)


def test_a_classifier_with_more_outputs_than_the_class_cap_is_refused(up, monkeypatch):
    base, paths, texts, cfg, tok = up
    texts["colours"].write_text("".join(json.dumps({"text": f"red {i}", "label": i % 2}) + "\n" for i in range(24)))
    monkeypatch.setattr(ut, "MAX_CLASSES", 2)           # the colours task's classifier has 3 outputs
    with pytest.raises(ValueError, match=r"task 'colours': its classifier has 3 outputs, more than the 2 classes"):
        text_pool_from_upload(base, paths, texts, cfg, tok)


# ---------------------------------------------------------------- 9: tokenizers

def _fast_tokenizer_files(tmp_path, edit=None, tokenizer_class="PreTrainedTokenizerFast"):
    """A real BERT tokenizer.json (as BertTokenizerFast saves it), optionally edited, + tokenizer_config.json."""
    d = tmp_path / "tok"
    d.mkdir(exist_ok=True)
    (d / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    transformers.BertTokenizerFast(str(d / "vocab.txt")).save_pretrained(str(d))
    j = json.loads((d / "tokenizer.json").read_text())
    if edit is not None:
        edit(j)
    (d / "tokenizer.json").write_text(json.dumps(j))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": tokenizer_class, "pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]",
        "unk_token": "[UNK]", "mask_token": "[MASK]"}))
    return {"tokenizer.json": d / "tokenizer.json", "tokenizer_config.json": d / "tokenizer_config.json"}


def _split(pattern, behavior="Isolated"):
    return {"type": "Split", "pattern": pattern, "behavior": behavior, "invert": False}


def test_a_backtracking_regex_tokenizer_is_refused_before_it_runs(up, monkeypatch):
    base, paths, texts, cfg, _ = up
    for t, f in texts.items():                             # the sentences: 21 × "a" + "!"
        f.write_text("".join(json.dumps({"text": "a" * 21 + "!", "label": i % 2}) + "\n" for i in range(24)))
    tok = _fast_tokenizer_files(base.parent, lambda j: j.update(pre_tokenizer=_split({"Regex": "(a|a)*$"})))

    def never(*a, **k):
        raise Built("the uploaded tokenizer ran")
    monkeypatch.setattr(bert, "tokenize", never)
    with pytest.raises(ValueError, match=r"tokenizer\.json: pre_tokenizer \(Split\) has the pattern '\(a\|a\)\*\$', a "
                                         r"regular expression: this server runs no regular expression of an upload"):
        text_pool_from_upload(base, paths, texts, cfg, tok)


@pytest.mark.parametrize("field,comp,where", [
    ("normalizer", {"type": "Replace", "pattern": {"Regex": "x+"}, "content": "y"}, r"normalizer \(Replace\)"),
    ("pre_tokenizer", {"type": "Sequence", "pretokenizers": [{"type": "Whitespace"}, _split({"Regex": "(a+)+"})]},
     r"pre_tokenizer\.pretokenizers\[1\] \(Split\)"),
    ("decoder", {"type": "Replace", "pattern": {"Regex": "x"}, "content": ""}, r"decoder \(Replace\)"),
    ("post_processor", {"type": "TemplateProcessing", "single": [], "pair": [], "special_tokens": {},
                        "extra": {"Regex": "(a|a)*"}}, r"post_processor\.extra holds a regular expression"),
    ("pre_tokenizer", {"type": "FancyRegexSplitter"}, r"pre_tokenizer is of type 'FancyRegexSplitter', which this "
                                                      r"server does not run"),
    ("model", {"type": "Mystery", "vocab": {}}, r"model is of type 'Mystery'"),
])
def test_tokenizer_components_are_whitelisted_and_regex_free(tmp_path, field, comp, where):
    tok = _fast_tokenizer_files(tmp_path, lambda j: j.update({field: comp}))
    with pytest.raises(ValueError, match=r"tokenizer\.json: " + where):
        load_tokenizer_files(tok, {"model_type": "bert"})


def test_a_tokenizer_class_outside_the_family_is_refused(tmp_path):
    tok = _fast_tokenizer_files(tmp_path, tokenizer_class="LlamaTokenizerFast")
    with pytest.raises(ValueError, match=r"tokenizer_class 'LlamaTokenizerFast' is not a BERT-family tokenizer"):
        load_tokenizer_files(tok, {"model_type": "bert"})


def test_real_bert_tokenizer_json_and_plain_string_splits_are_accepted(up):
    base, paths, texts, cfg, _ = up
    tok = _fast_tokenizer_files(base.parent)
    pool, _ = text_pool_from_upload(base, paths, texts, cfg, tok)
    x, _ = pool.inputs("colours", "test")
    assert x.shape[0] == 12 and x.shape[1] == 2
    seq = {"type": "Sequence", "pretokenizers": [{"type": "BertPreTokenizer"}, _split({"String": "x"}, "Removed")]}
    t = load_tokenizer_files(_fast_tokenizer_files(base.parent, lambda j: j.update(pre_tokenizer=seq)),
                             {"model_type": "bert"})
    assert t.tokenize("redxcat dog") == ["red", "cat", "dog"]


def test_chunked_encoding_equals_one_call(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    tok = transformers.BertTokenizerFast(str(tmp_path / "vocab.txt"))
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS[5:], size=rng.integers(1, 12))) for _ in range(23)]
    seen = []
    one = bert.encode_texts(tok, texts, 16)
    chunked = bert.encode_texts(tok, texts, 16, chunk=5, check=lambda d, n: seen.append((d, n)))
    assert torch.equal(one, chunked)
    assert seen == [(5, 23), (10, 23), (15, 23), (20, 23), (23, 23)]
    tok.padding_side = "left"
    assert torch.equal(bert.encode_texts(tok, texts, 16), bert.encode_texts(tok, texts, 16, chunk=4))


class Stop(Exception):
    pass


def test_tokenising_an_upload_is_chunked_and_cancel_stops_it(up, monkeypatch):
    base, paths, texts, cfg, tok = up
    monkeypatch.setattr(bert, "TOKENIZE_CHUNK", 4)
    calls = []
    real = bert.tokenize
    monkeypatch.setattr(bert, "tokenize", lambda *a, **k: calls.append(1) or real(*a, **k))

    def progress(frac, desc):
        if desc.startswith("tokenising the sentences of") and len(calls) >= 2:
            raise Stop(desc)
    with pytest.raises(Stop, match=r"tokenising the sentences of colours \(8 of 48\)"):
        text_pool_from_upload(base, paths, texts, cfg, tok, progress=progress)
    assert len(calls) == 2                                 # stopped after the second chunk of 4 sentences


def test_tokenising_an_upload_is_time_bounded(up, monkeypatch):
    base, paths, texts, cfg, tok = up
    monkeypatch.setattr(bert, "TOKENIZE_CHUNK", 4)
    monkeypatch.setattr(ut, "MAX_TOKENIZE_SECONDS", -1.0)
    with pytest.raises(ValueError, match=r"task 'colours': tokenising stopped after -?0 s at 4 of 48 sentences, more "
                                         r"than the -1 s this server gives the tokenizer of one upload"):
        text_pool_from_upload(base, paths, texts, cfg, tok)


def test_an_uploaded_pool_is_tokenised_before_any_merge(up, monkeypatch):
    base, paths, texts, cfg, tok = up
    pool, _ = text_pool_from_upload(base, paths, texts, cfg, tok)
    monkeypatch.setattr(bert, "tokenize", lambda *a, **k: (_ for _ in ()).throw(Built("tokenised during a merge")))
    for t in pool.task_names:
        for split in ("val", "test"):
            x, y = pool.inputs(t, split)
            assert len(x) == len(y) == len(pool.texts(t, split)[0])


def test_the_app_path_honours_cancel_while_tokenising(up, monkeypatch):
    base, paths, texts, cfg, tok = up
    s = studio.new_session("cpu")
    try:
        monkeypatch.setattr(bert, "TOKENIZE_CHUNK", 4)
        guard = studio.guarded(s)

        def progress(frac, desc):
            if desc.startswith("tokenising the sentences of"):
                studio.cancel(s)                           # the user presses Cancel while the tokenizer runs
            guard(frac, desc)
        with pytest.raises(studio.Cancelled):
            studio.load_uploaded_text(s, base, paths, texts, config=cfg, tokenizer_files=tok, progress=progress)
        assert s.pool is None and not list(s.workdir.glob("pool-*"))
    finally:
        studio.close(s)


# ---------------------------------------------------------------- 11: size and task count up front

def test_too_many_tasks_are_refused_before_anything_is_read(up, monkeypatch):
    base, paths, texts, cfg, tok = up
    monkeypatch.setattr(ut, "load_checkpoint", lambda *a, **k: (_ for _ in ()).throw(Built("a checkpoint was read")))
    many = {f"t{i}": paths["colours"] for i in range(ut.MAX_TASKS + 1)}
    with pytest.raises(ValueError, match=rf"{ut.MAX_TASKS + 1} task checkpoints: this server merges at most "
                                         rf"{ut.MAX_TASKS} tasks"):
        text_pool_from_upload(base, many, {t: texts["colours"] for t in many}, cfg, tok)


def test_the_memory_budget_is_checked_before_task_checkpoints_are_read(up, monkeypatch):
    base, paths, texts, cfg, tok = up
    read = []
    real = ut.load_checkpoint
    monkeypatch.setattr(ut, "load_checkpoint", lambda p, *a, **k: read.append(p.name) or real(p, *a, **k))
    many = {f"t{i}": paths["colours"] for i in range(40)}
    with pytest.raises(ValueError, match=r"this upload \(40 tasks, 960 sentences\) needs about .* of tokenised "
                                         r"sentences \(38 tokens each\).* more than the 1\.4 MiB a session may hold"):
        text_pool_from_upload(base, many, {t: texts["colours"] for t in many}, cfg, tok,
                              memory_budget=int(1.5e6))
    assert read == ["base.safetensors"]                      # the base only: no task checkpoint


def test_a_session_refuses_text_files_over_its_budget_before_reading(up, monkeypatch):
    base, paths, texts, cfg, tok = up
    monkeypatch.setenv("ESM_SESSION_MEMORY_MB", "0.01")
    monkeypatch.setattr(ut, "load_checkpoint", lambda *a, **k: (_ for _ in ()).throw(Built("a checkpoint was read")))
    s = studio.new_session("cpu")
    try:
        with pytest.raises(ValueError, match=r"this upload \(5 files\) needs about .* more than the 0\.0 MiB a "
                                             r"session may hold"):
            studio.load_uploaded_text(s, base, paths, texts, config=cfg, tokenizer_files=tok)
    finally:
        studio.close(s)


def test_a_subset_of_an_uploaded_pool_keeps_its_tokenised_inputs(up, monkeypatch):
    base, paths, texts, cfg, tok = up
    pool, _ = text_pool_from_upload(base, paths, texts, cfg, tok)
    sub = pool.subset(["animals"])
    monkeypatch.setattr(bert, "tokenize", lambda *a, **k: (_ for _ in ()).throw(Built("tokenised again")))
    assert sub.inputs("animals", "test")[0] is pool.inputs("animals", "test")[0]
    assert ("inputs", "colours", "test") not in sub.cache


def test_a_deeply_nested_config_json_is_refused_by_the_app_with_a_reason(tmp_path):
    from esm_core.app.pool import read_configs
    f = tmp_path / "config.json"
    f.write_text('{"model_type": "bert", "x": ' + "[" * 30_000 + "]" * 30_000 + "}")
    with pytest.raises(ValueError, match=r"config: not a JSON file \(nested too deeply\)"):
        read_configs([str(f)])
