"""A tiny built ``text`` pool for the text tests: a random 2-layer BERT with a 20-word vocabulary,
fine-tuned for a few steps on two fabricated tasks by the real build (:func:`esm_core.pools.text_build.
build_text_pool`), so everything downstream reads exactly what a real build writes. Builds in seconds."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from esm_core.models import bert
from esm_core.pools import text_build as tb

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "red", "green", "blue", "cat", "dog", "bird", "one", "two",
         "three", "happy", "sad", "the", "a", "is", "very"]


def tiny_model_dir(root: Path) -> Path:
    import transformers
    d = Path(root) / "tiny-minilm"
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    tok = transformers.BertTokenizerFast(str(d / "vocab.txt"))
    tok.save_pretrained(str(d))
    torch.manual_seed(0)
    cfg = bert.config_of({"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                          "intermediate_size": 48, "vocab_size": len(WORDS), "max_position_embeddings": 32})
    transformers.AutoModel.from_config(cfg).save_pretrained(str(d))
    return d


def reader(class_words):
    def read(max_examples=1500, seed=0):
        rng = np.random.default_rng(seed)
        texts, labels = [], []
        for i in range(90):
            c = i % len(class_words)
            filler = " ".join(rng.choice(["the", "a", "is", "very"], size=rng.integers(1, 6)))
            texts.append(f"{filler} {class_words[c]} {filler}")
            labels.append(c)
        return texts, np.array(labels), [f"c{c}" for c in range(len(class_words))]
    return read


READERS = {"colours": reader(["red", "green", "blue"]), "animals": reader(["cat", "dog"])}


def tiny_recipe(model_dir: Path) -> dict:
    recipe = copy.deepcopy(tb.RECIPE)
    recipe.update(model_dir=str(model_dir), max_examples=90, max_length=16, proxy=8,
                  split={"val": 15, "test": 20}, eval_batch=16)
    recipe["head"].update(shots=4, steps=50)
    recipe["finetune"].update(epochs=2, batch=16, lr=1e-3, max_train=40)
    return recipe


def build_tiny_text_pool(root: Path, seed: int | None = None) -> tuple[Path, dict]:
    """Build the tiny pool into ``root/pool``; returns (its folder, its pool.json dict)."""
    out = Path(root) / "pool"
    cfg = tb.build_text_pool(out, recipe=tiny_recipe(tiny_model_dir(root)), tasks=list(READERS), readers=READERS,
                             seed=seed)
    return out, cfg
