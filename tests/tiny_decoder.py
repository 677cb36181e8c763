"""A tiny Llama-style decoder upload built offline (no download): a byte-level BPE tokenizer trained on a
20-word corpus (``tokenizer.json`` + ``tokenizer_config.json``, as ``save_pretrained`` writes them), a random base
``*ForSequenceClassification`` and task classifiers fine-tuned by noise, their labelled sentences and config.json.
Used by the decoder upload tests (library, CLI and the Pool view over HTTP)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import transformers

from esm_core.checkpoints import save_safetensors

WORDS = "red green blue cat dog bird one two three happy sad the a is very big small fast slow old".split()
SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=320, max_position_embeddings=64)
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


def tokenizer_files(folder: Path, *, split_pattern: str | None = None, pad: bool = False,
                    padding_side: str | None = None, tokenizer_class: str | None = None) -> dict[str, Path]:
    """``{file name: path}`` of a byte-level BPE tokenizer (vocabulary < 320) with ``<s>`` / ``</s>`` (and
    ``<pad>`` when ``pad``); ``split_pattern``: a Split pre-tokenizer with that regular expression first (as
    Qwen2 / Llama 3 tokenizers have)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split_pattern is None)
    tok.pre_tokenizer = byte_level if split_pattern is None else pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split_pattern), behavior="isolated"), byte_level])
    tok.decoder = decoders.ByteLevel()
    corpus = [" ".join(WORDS[i:i + 4]) for i in range(len(WORDS))] * 4
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>" if pad else None)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(folder))
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    if padding_side is not None:
        cfg["padding_side"] = padding_side
    if tokenizer_class is not None:
        cfg["tokenizer_class"] = tokenizer_class
    cfg_path.write_text(json.dumps(cfg))
    return {n: folder / n for n in ("tokenizer.json", "tokenizer_config.json")}


def classifier(model_type: str, num_labels: int, seed: int, **over):
    """A random ``AutoModelForSequenceClassification`` of ``model_type`` (llama, qwen2, mistral)."""
    torch.manual_seed(seed)
    cfg = transformers.AutoConfig.for_model(model_type, **{**SIZES, "num_labels": num_labels, **over})
    return transformers.AutoModelForSequenceClassification.from_config(cfg).eval()


def decoder_upload(folder: Path, model_type: str = "llama", *, classes=(3, 2), rows: int = 24, **over):
    """(base path, {task: checkpoint path}, {task: jsonl path}, config dict, {tokenizer file: path}) of a base
    and ``len(classes)`` fine-tuned tasks (``colours``, ``animals``, ``sizes``, ...)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = classifier(model_type, 2, 0, **over)
    save_safetensors({k: v.contiguous() for k, v in base.state_dict().items()}, folder / "base.safetensors")
    names = ["colours", "animals", "sizes", "speeds"][:len(classes)]
    paths, texts, rng = {}, {}, np.random.default_rng(0)
    for i, (t, C) in enumerate(zip(names, classes)):
        m = classifier(model_type, C, 10 + i, **over)
        sd = {k: v.contiguous() for k, v in m.state_dict().items()}
        for k, v in base.state_dict().items():                   # a fine-tuned copy of the base's decoder
            if not k.startswith("score"):
                sd[k] = (v + 0.02 * torch.randn_like(v)).contiguous()
        save_safetensors(sd, folder / f"{t}.safetensors")
        paths[t] = folder / f"{t}.safetensors"
        lines = [{"text": " ".join(rng.choice(WORDS, size=rng.integers(1, 9))), "label": int(j % C)}
                 for j in range(rows)]
        texts[t] = folder / f"{t}.jsonl"
        texts[t].write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    config = {k: v for k, v in base.config.to_dict().items() if k not in ("id2label", "label2id")}
    return folder / "base.safetensors", paths, texts, config, tokenizer_files(folder / "tok")
