"""Uploaded Llama-style decoder classifiers (Llama, Qwen2, Mistral) as a text pool, built offline
(tests/tiny_decoder.py): each task scores exactly as its own Hugging Face classifier does on each sentence
alone, whatever the padding; the tokenizer pads as ``score`` expects; known tokenizers' pre-tokenizer patterns
are accepted and any other regular expression refused; a LoRA task equals its dense version; merges run."""
from __future__ import annotations

import inspect
import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

from esm_core.checkpoints import save_safetensors
from esm_core.evaluation import evaluate
from esm_core.evaluation.proxy import merge_pool
from esm_core.evaluation.runs import evaluate_method
from esm_core.pools.upload_text import KNOWN_SPLIT_PATTERNS, check_tokenizer_json, text_pool_from_upload
from tiny_decoder import QWEN2_PATTERN, decoder_upload, tokenizer_files


def _own_model(config: dict, path, classes: int):
    cfg = transformers.AutoConfig.for_model(config["model_type"], **{
        **{k: v for k, v in config.items() if k != "model_type"}, "num_labels": classes})
    m = transformers.AutoModelForSequenceClassification.from_config(cfg)
    m.load_state_dict(load_file(str(path)))
    return m.eval()


@pytest.mark.parametrize("model_type,over", [("llama", {"pad_token_id": 2}), ("qwen2", {}),
                                             ("mistral", {"sliding_window": 4})])
def test_each_task_scores_as_its_own_classifier_on_each_sentence_alone(tmp_path, model_type, over):
    base, paths, texts, config, tok = decoder_upload(tmp_path, model_type, **over)
    pool, notes = text_pool_from_upload(base, paths, texts, config, tok)
    assert (pool.family, pool.pooling, pool.task_names) == ("llama", "last", ["colours", "animals"])
    assert any("last real token" in n and model_type in n for n in notes)
    from esm_core.app.pool import task_rows                 # the Pool view's table: head source and split rule
    rows = task_rows(pool, [{"task": t} for t in pool.task_names])
    assert rows[0] == {"task": "colours", "head": "own classifier", "splits": "seeded half / half per class"}
    for t in pool.task_names:
        hf = _own_model(config, paths[t], len(pool.class_names[t]))
        x, y = pool.inputs(t, "test")
        sentences, _ = pool.texts(t, "test")
        assert (x[:, 1] == 0).any()                              # the batch is padded (on the right)
        assert (x[:, 1, 0] == 1).all()
        with torch.no_grad():
            got = pool.logits(t, pool.build_model(pool.tasks[t])(x))
            alone = torch.cat([hf(**pool.tokenizer([s], return_tensors="pt")).logits for s in sentences])
        torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-6)
        want = float((alone.argmax(-1) == y).float().mean())
        assert evaluate(pool, pool.tasks[t], "test", [t], device="cpu")[t] == pytest.approx(want)


def test_padding_side_and_pad_token_are_set_as_score_reads_them(tmp_path):
    base, paths, texts, config, _ = decoder_upload(tmp_path, "llama")
    left = tokenizer_files(tmp_path / "left", padding_side="left", pad=True)
    pool, notes = text_pool_from_upload(base, paths, texts, config, left)
    assert pool.tokenizer.padding_side == "right" and any("padding_side 'left' → 'right'" in n for n in notes)
    assert pool.tokenizer.pad_token == "<pad>"                        # its own pad token (config names none)
    no_pad = tokenizer_files(tmp_path / "nopad")
    pool, notes = text_pool_from_upload(base, paths, texts, config, no_pad)
    assert pool.tokenizer.pad_token == "</s>" and any("end-of-sequence token '</s>'" in n for n in notes)
    pool, notes = text_pool_from_upload(base, paths, texts, {**config, "pad_token_id": 1}, no_pad)
    assert pool.tokenizer.pad_token_id == 1 and any("pad_token_id 1" in n for n in notes)


def test_known_pre_tokenizer_patterns_are_the_libraries_own_and_others_are_refused(tmp_path):
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
    import importlib
    slow = importlib.import_module("transformers.convert_slow_tokenizer")     # the module (a function shadows it)
    assert KNOWN_SPLIT_PATTERNS["Qwen2"] == PRETOKENIZE_REGEX == QWEN2_PATTERN
    assert KNOWN_SPLIT_PATTERNS["Llama 3"] in inspect.getsource(slow)
    # a Qwen2-style tokenizer.json (Split with its pattern, then byte level) uploads and tokenises
    base, paths, texts, config, _ = decoder_upload(tmp_path, "qwen2")
    qwen_tok = tokenizer_files(tmp_path / "qwen", split_pattern=QWEN2_PATTERN, tokenizer_class="Qwen2Tokenizer")
    pool, _ = text_pool_from_upload(base, paths, texts, config, qwen_tok)
    assert pool.inputs("colours", "test")[0].shape[0] == 12
    # a decoder's tokenizer class with a decoder config, not with a BERT one (and the other way round)
    from esm_core.pools.upload_text import load_tokenizer_files
    assert load_tokenizer_files(qwen_tok, config).tokenize("red cat") == pool.tokenizer.tokenize("red cat")
    with pytest.raises(ValueError, match=r"tokenizer_class 'Qwen2Tokenizer' is not a BERT-family tokenizer"):
        load_tokenizer_files(qwen_tok, {"model_type": "bert"})
    bert_cls = tokenizer_files(tmp_path / "bertcls", tokenizer_class="BertTokenizerFast")
    with pytest.raises(ValueError, match=r"'BertTokenizerFast' is not a Llama-style decoder tokenizer"):
        load_tokenizer_files(bert_cls, config)
    # the same file with one character of the pattern changed is a foreign regular expression
    obj = json.loads(qwen_tok["tokenizer.json"].read_text())
    obj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = QWEN2_PATTERN.replace(r"\p{N}|", r"(\p{N}+)+|")
    with pytest.raises(ValueError, match=r"pre_tokenizer.pretokenizers\[0\] \(Split\) has the pattern"):
        check_tokenizer_json(obj)
    qwen_tok["tokenizer.json"].write_text(json.dumps(obj))
    with pytest.raises(ValueError, match="a regular expression"):
        text_pool_from_upload(base, paths, texts, config, qwen_tok)
    # a known pattern elsewhere (a Replace, a normalizer) is still a regular expression of the upload
    with pytest.raises(ValueError, match="regular expression"):
        check_tokenizer_json({"model": {"type": "BPE"}, "normalizer": {"type": "Replace", "content": "",
                                                                       "pattern": {"Regex": QWEN2_PATTERN}}})


def test_bad_decoder_uploads_are_refused_naming_the_problem(tmp_path):
    base, paths, texts, config, tok = decoder_upload(tmp_path, "qwen2")
    with pytest.raises(ValueError, match="num_key_value_heads × head_dim = 32 does not fit"):
        text_pool_from_upload(base, paths, texts, {**config, "num_key_value_heads": 4}, tok)
    with pytest.raises(ValueError, match="tokenizer has .* tokens but config.json's vocab_size is 200"):
        small = decoder_upload(tmp_path / "small", "qwen2", vocab_size=200)
        text_pool_from_upload(*small[:4], tok)
    with pytest.raises(ValueError, match="pad_token_id = 310 is not a token of the uploaded tokenizer"):
        text_pool_from_upload(base, paths, texts, {**config, "pad_token_id": 310}, tok)
    sd = load_file(str(paths["animals"]))
    save_safetensors({k: v for k, v in sd.items() if not k.startswith("score")}, tmp_path / "headless.safetensors")
    with pytest.raises(ValueError, match="task 'animals': its checkpoint has no 'score' head"):
        text_pool_from_upload(base, {**paths, "animals": tmp_path / "headless.safetensors"}, texts, config, tok)
    from test_upload_text import _upload
    bert_paths, _, _, _ = _upload(tmp_path / "bert", "bert") if (tmp_path / "bert").mkdir() is None else None
    with pytest.raises(ValueError, match="task 'animals': not a checkpoint of the base's layout"):
        text_pool_from_upload(base, {**paths, "animals": bert_paths["animals"]}, texts, config, tok)
    with pytest.raises(ValueError, match="model_type 'bert' is not a Llama-style decoder"):
        text_pool_from_upload(base, paths, texts, {**config, "model_type": "bert"}, tok)
    img = {"visual.conv1.weight": torch.zeros(4, 3, 2, 2)}
    save_safetensors(img, tmp_path / "img.safetensors")
    with pytest.raises(ValueError, match="img.safetensors: no text model's layout"):
        text_pool_from_upload(tmp_path / "img.safetensors", paths, texts, config, tok)


def test_a_lora_task_equals_the_same_task_given_dense(tmp_path):
    base, paths, texts, config, tok = decoder_upload(tmp_path, "llama")
    base_sd = load_file(str(base))
    g = torch.Generator().manual_seed(3)
    lora, dense = {}, dict(base_sd)
    for i in range(2):
        for m, (o, n) in {f"model.layers.{i}.self_attn.q_proj": (32, 32), f"model.layers.{i}.self_attn.k_proj":
                          (16, 32), f"model.layers.{i}.mlp.down_proj": (32, 64)}.items():
            A, B = torch.randn(4, n, generator=g) * 0.1, torch.randn(o, 4, generator=g) * 0.1
            lora[f"base_model.model.{m}.lora_A.weight"], lora[f"base_model.model.{m}.lora_B.weight"] = A, B
            dense[f"{m}.weight"] = base_sd[f"{m}.weight"] + 2.0 * (B @ A)
    score = torch.randn(2, 32, generator=g)
    lora["base_model.model.score.weight"], dense["score.weight"] = score, score
    folder = tmp_path / "animals-adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "down_proj"],
        "modules_to_save": ["score"], "task_type": "SEQ_CLS"}))
    save_safetensors(lora, folder / "adapter_model.safetensors")
    save_safetensors({k: v.contiguous() for k, v in dense.items()}, tmp_path / "animals-dense.safetensors")
    a, _ = text_pool_from_upload(base, {**paths, "animals": folder}, texts, config, tok)
    d, _ = text_pool_from_upload(base, {**paths, "animals": tmp_path / "animals-dense.safetensors"}, texts, config, tok)
    assert all(torch.allclose(a.tasks["animals"][k], d.tasks["animals"][k], atol=1e-6) for k in d.tasks["animals"])
    assert torch.equal(a.heads["animals"]["weight"], score)
    for method in ("ta", "ties", "esm"):
        ma, md = (merge_pool(p, method, {"alpha": 0.5}, device="cpu") for p in (a, d))
        assert ma.keys() == md.keys() and all(torch.allclose(ma[k], md[k], atol=1e-5) for k in md), method
    from esm_core.probe import probe_pool
    res = evaluate_method(a, "esm", alpha=0.5, device="cpu", stats=probe_pool(a, n=8, device="cpu"))
    assert set(res["tasks"]) == {"colours", "animals"}             # scored end to end, each task with its head


def test_esmpp_routes_an_uploaded_decoder_pool_and_oracle_routing_equals_each_tasks_dense_expert(tmp_path):
    import esm_core as esm
    from esm_core.evaluation.proxy import task_model
    base, paths, texts, config, tok = decoder_upload(tmp_path, "qwen2")     # Qwen2: its Q / K / V biases are own
    pool, _ = text_pool_from_upload(base, paths, texts, config, tok)
    stats = esm.probe_pool(pool, n=8, seed=0, device="cpu")
    routed = esm.build_esmpp(pool, stats, rank=4, alpha=0.5, device="cpu")
    accs, log = esm.evaluate_routed(pool, routed)
    per_layer = esm.routing_accuracy(log)                  # one share per routed layer: 2 groups (QKV, gate/up) × 2
    assert set(accs) == {"colours", "animals"} and per_layer.shape == (4,) and ((per_layer >= 0) & (per_layer <= 1)).all()
    # oracle: task t's sentences through W_ESM + B_t A_t on every routed layer, with t's own biases (Qwen2's
    # Q / K / V), are task t's dense model
    ex, t = routed.experts, "animals"
    i = ex.task_index(t)
    x, _ = pool.inputs(t, "test")
    dense = {k: (v + ex.B[k][i] @ ex.A[k][i] if k in ex.keys else v) for k, v in routed.merged_sd.items()}
    with torch.no_grad():
        want = pool.logits(t, pool.build_model(task_model(dense, pool.tasks[t], family="llama"))(x))
        pool.prepare(routed, t)
        got = pool.logits(t, routed(x, true_task=[t] * len(x), mode="oracle"))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
