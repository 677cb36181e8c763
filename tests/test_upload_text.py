"""Uploaded text pools (esm_core.pools.upload_text): BERT-family sequence classifiers + labelled sentences.
Tiny random models built in code (no download): the pool scores each task exactly as the task's own
Hugging Face classifier does, and every bad upload is refused with a message naming the problem."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

from esm_core.checkpoints import save_safetensors
from esm_core.evaluation import evaluate
from esm_core.models import bert
from esm_core.pools.upload_text import read_labelled_text, task_head, text_pool_from_upload
from fake_text_pool import WORDS

SIZES = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 48,
         "vocab_size": len(WORDS) + 2, "max_position_embeddings": 40}
CONFIGS = {"bert": {"model_type": "bert", **SIZES},
           "roberta": {"model_type": "roberta", **SIZES, "pad_token_id": 0},
           "distilbert": {"model_type": "distilbert", "dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 48,
                          "vocab_size": len(WORDS) + 2, "max_position_embeddings": 40}}


def _classifier(model_type: str, num_labels: int, seed: int):
    torch.manual_seed(seed)
    cfg = bert.config_of({**CONFIGS[model_type], "num_labels": num_labels})
    return transformers.AutoModelForSequenceClassification.from_config(cfg).eval()


def _upload(tmp_path, model_type: str):
    """Base + two task classifiers (3 and 2 classes) as safetensors, their labelled text, config, tokenizer."""
    base = _classifier(model_type, 2, 0)
    paths, texts = {}, {}
    save_safetensors({k: v.contiguous() for k, v in base.state_dict().items()}, tmp_path / "base.safetensors")
    rng = np.random.default_rng(0)
    for i, (t, C) in enumerate((("colours", 3), ("animals", 2))):
        m = _classifier(model_type, C, 10 + i)
        sd = {k: v.contiguous() for k, v in m.state_dict().items()}
        for k, v in base.state_dict().items():                      # a fine-tuned copy of the base's encoder
            if k in sd and "classifier" not in k and not k.startswith("pre_classifier") and v.is_floating_point():
                sd[k] = (v + 0.02 * torch.randn_like(v)).contiguous()
        save_safetensors(sd, tmp_path / f"{t}.safetensors")
        paths[t] = tmp_path / f"{t}.safetensors"
        words = WORDS[5:]
        rows = [{"text": " ".join(rng.choice(words, size=rng.integers(2, 8))), "label": int(j % C)} for j in range(24)]
        texts[t] = tmp_path / f"{t}.jsonl"
        texts[t].write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    return paths, texts, dict(CONFIGS[model_type]), {"vocab.txt": tmp_path / "vocab.txt"}


@pytest.mark.parametrize("model_type", ["bert", "roberta", "distilbert"])
def test_uploaded_classifiers_score_as_their_own_hugging_face_models(tmp_path, model_type):
    paths, texts, cfg, tok = _upload(tmp_path, model_type)
    keep = tmp_path / "keep" if model_type == "roberta" else None     # the app's way: tasks read lazily from disk
    pool, notes = text_pool_from_upload(tmp_path / "base.safetensors", paths, texts, cfg, tok, keep_dir=keep)
    if keep is not None:
        from esm_core.lazy import LazyCheckpoint
        assert all(isinstance(pool.tasks[t], LazyCheckpoint) and pool.tasks[t].path.parent == keep
                   for t in pool.task_names)
    assert pool.task_names == ["colours", "animals"] and pool.pooling == "cls"
    assert any(model_type in n for n in notes)
    for t in pool.task_names:
        hf = transformers.AutoModelForSequenceClassification.from_config(
            bert.config_of({**cfg, "num_labels": len(pool.class_names[t])}))
        from safetensors.torch import load_file
        hf.load_state_dict(load_file(str(paths[t])))
        hf.eval()
        x, y = pool.inputs(t, "test")
        b = bert.unpack(x)
        with torch.no_grad():
            want_logits = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            enc = pool.build_model(pool.tasks[t])
            got_logits = pool.logits(t, enc(x))
        torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-5)
        want = float((want_logits.argmax(-1) == y).float().mean())
        assert evaluate(pool, pool.tasks[t], "test", [t], device="cpu")[t] == pytest.approx(want)
    # merging works on it with §8's rules (the family is found from the keys)
    from esm_core.evaluation.runs import evaluate_method
    res = evaluate_method(pool, "ta", alpha=0.5, device="cpu")
    assert set(res["tasks"]) == {"colours", "animals"}


def test_bad_text_uploads_are_refused_with_a_reason(tmp_path):
    paths, texts, cfg, tok = _upload(tmp_path, "bert")
    base = tmp_path / "base.safetensors"
    with pytest.raises(ValueError, match="config.json"):
        text_pool_from_upload(base, paths, texts, {}, tok)
    with pytest.raises(ValueError, match="no labelled text for task"):
        text_pool_from_upload(base, paths, {"colours": texts["colours"]}, cfg, tok)
    with pytest.raises(ValueError, match="no tokenizer"):
        text_pool_from_upload(base, paths, texts, cfg, {})
    with pytest.raises(ValueError, match="unexpected tokenizer file"):
        text_pool_from_upload(base, paths, texts, cfg, {**tok, "evil.py": tok["vocab.txt"]})
    bad_cfg = {**cfg, "hidden_size": 64, "num_attention_heads": 2}
    with pytest.raises(ValueError, match="does not fit"):
        text_pool_from_upload(base, paths, texts, bad_cfg, tok)

    f = tmp_path / "x.csv"
    f.write_text("sentence,label\nhello,0\n")
    with pytest.raises(ValueError, match="header row with the columns 'text' and 'label'"):
        read_labelled_text(f, "x")
    f.write_text("text,label\nred cat,0\nblue dog,positive\n")
    with pytest.raises(ValueError, match="not a class index"):
        read_labelled_text(f, "x")
    f.write_text("text,label\nred cat,0\nblue dog,1\n")
    texts_, y = read_labelled_text(f, "x")
    assert texts_ == ["red cat", "blue dog"] and y.tolist() == [0, 1]
    j = tmp_path / "x.jsonl"
    j.write_text('{"text": "a", "label": NaN}\n')
    with pytest.raises(ValueError, match="NaN"):
        read_labelled_text(j, "x")
    j.write_text('{"text": "a", "label": 7}\n{"text": "b", "label": 0}\n')
    bad = dict(texts, animals=j)
    with pytest.raises(ValueError, match="label 7 but its classifier has 2 outputs"):
        text_pool_from_upload(base, paths, bad, cfg, tok)
    from safetensors.torch import load_file
    headless = {k: v for k, v in load_file(str(paths["colours"])).items() if not k.startswith("classifier")}
    with pytest.raises(ValueError, match="no sequence-classification head"):
        task_head(headless, "colours")
