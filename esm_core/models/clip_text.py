"""CLIP text towers (open_clip's text transformer), read from a base checkpoint to build zero-shot heads.

An open_clip CLIP state dict holds its text tower at the top level (``token_embedding``, ``positional_embedding``,
``transformer.resblocks.N``, ``ln_final``, ``text_projection``, ``logit_scale``); a Hugging Face ``CLIPModel``
holds it as ``text_model.*`` + ``text_projection.weight``, renamed here to open_clip's layout
(:func:`hf_text_to_open_clip`; q/k/v concatenated into ``in_proj``) with its ``text_config`` turned into an
open_clip ``text_cfg`` (:func:`hf_text_config`). Both are built as open_clip's ``TextTransformer`` — with the
BPE tokenizer open_clip ships, nothing is downloaded — after the shapes are compared with the config on the meta
device. Used by :mod:`esm_core.pools.heads` (methods §0).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import torch
from open_clip.model import _build_text_tower    # the constructor open_clip's CLIP uses for its text tower
from open_clip.tokenizer import SimpleTokenizer

from ..checkpoints import hf_clip_block_key, join_hf_qkv

BPE_VOCAB = 49408                        # open_clip's bundled BPE tokenizer (every OpenAI-style CLIP text tower)
TEXT_KEYS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")


def text_tower_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The text tower of an open_clip CLIP state dict (top-level ``token_embedding`` … ``text_projection``)."""
    return {k: v for k, v in sd.items() if k.startswith(TEXT_KEYS)}


def has_text_tower(sd: Mapping[str, torch.Tensor]) -> bool:
    return "token_embedding.weight" in sd and any(k.startswith("transformer.resblocks.") for k in sd)


def check_text_config(text_cfg) -> dict:
    """A plain open_clip text tower config (the BPE tokenizer open_clip ships, no Hugging Face text model), with
    its sizes bounded; raises ValueError saying why a zero-shot head cannot be built from it."""
    if not isinstance(text_cfg, Mapping):
        raise ValueError("the model config has no text_cfg")
    c = dict(text_cfg)
    for k in ("hf_model_name", "hf_tokenizer_name"):
        if c.get(k):
            raise ValueError(f"its text tower is a Hugging Face model ({k}={c[k]!r}): only open_clip's own text "
                             "transformer with its bundled BPE tokenizer is built offline")
    bounds = {"width": (1, 4096), "layers": (1, 64), "heads": (1, 128), "context_length": (2, 512),
              "vocab_size": (1, 1_000_000)}
    for k, (lo, hi) in bounds.items():
        v = c.get(k, {"context_length": 77, "vocab_size": BPE_VOCAB, "width": 512, "heads": 8, "layers": 12}[k])
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ValueError(f"text_cfg {k}={v!r} is outside [{lo}, {hi}]")
        c[k] = v
    if c["width"] % c["heads"]:
        raise ValueError(f"text_cfg heads={c['heads']} does not divide width={c['width']}")
    if c["vocab_size"] != BPE_VOCAB:
        raise ValueError(f"text_cfg vocab_size={c['vocab_size']} is not open_clip's BPE vocabulary ({BPE_VOCAB})")
    if c.get("pool_type", "argmax") != "argmax" or c.get("embed_cls") or c.get("no_causal_mask"):
        raise ValueError("only CLIP's text pooling (argmax token, causal mask, no class embedding) is supported")
    return c


def check_text_shapes(cfg: Mapping, text_sd: Mapping[str, torch.Tensor]) -> None:
    """Refuse a text tower whose tensors do not fit the config's ``text_cfg`` (compared on the meta device: no
    memory) or hold non-finite values."""
    text_cfg = check_text_config(cfg.get("text_cfg"))
    with torch.device("meta"):
        meta = _build_text_tower(int(cfg.get("embed_dim", 0)), text_cfg, quick_gelu=bool(cfg.get("quick_gelu")))
    want = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in text_sd.items()}
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    wrong = [f"{k} {got[k]} (expected {want[k]})" for k in want if k in got and got[k] != want[k]]
    if missing or extra or wrong:
        raise ValueError("the base's text tower does not fit the config's text_cfg: "
                         + "; ".join(x for x in (f"missing {missing[:4]}" if missing else "",
                                                  f"unexpected {extra[:4]}" if extra else "",
                                                  f"other shapes: {wrong[:3]}" if wrong else "") if x))
    bad = [k for k, v in text_sd.items() if not torch.isfinite(v.float()).all()]
    if bad:
        raise ValueError(f"the base's text tower holds non-finite values in {bad[:4]}")


def build_text_tower(cfg: Mapping, text_sd: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """open_clip's text transformer for the model config ``cfg`` (``embed_dim``, ``text_cfg``, ``quick_gelu``)
    with ``text_sd`` loaded, eval mode; the shapes are checked first (:func:`check_text_shapes`)."""
    check_text_shapes(cfg, text_sd)
    text_cfg = check_text_config(cfg.get("text_cfg"))
    tower = _build_text_tower(int(cfg.get("embed_dim", 0)), text_cfg, quick_gelu=bool(cfg.get("quick_gelu")))
    tower.load_state_dict({k: v.float() for k, v in text_sd.items()}, strict=True)
    return tower.eval()


def text_tower_bytes(cfg: Mapping) -> int:
    """float32 bytes of the config's text tower (what building it costs), from the config alone."""
    c = check_text_config(cfg.get("text_cfg"))
    w, lay = c["width"], c["layers"]
    hidden = int(w * float(c.get("mlp_ratio", 4.0)))
    block = 4 * w * w + 4 * w + 4 * w + 2 * w * hidden + hidden + w     # attention (in + out), 2 LayerNorms, MLP
    n = c["vocab_size"] * w + c["context_length"] * w + lay * block + 2 * w + w * int(cfg.get("embed_dim", w))
    return int(4 * n)


def tokenizer_for(cfg: Mapping) -> SimpleTokenizer:
    """open_clip's bundled BPE tokenizer at the config's context length (no download)."""
    return SimpleTokenizer(context_length=int(check_text_config(cfg.get("text_cfg"))["context_length"]))


# ---------------------------------------------------------------- Hugging Face CLIPModel's text tower

_HF_TEXT_LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(.+)\Z")
_HF_TEXT_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight", "text_model.final_layer_norm.bias": "ln_final.bias",
}


def is_hf_text_key(key: str) -> bool:
    """Keys of a Hugging Face CLIPModel's text tower (and its projection and logit scale)."""
    return key.startswith("text_model.") or key in ("text_projection.weight", "logit_scale")


def hf_text_to_open_clip(sd: Mapping[str, torch.Tensor], name: str = "checkpoint") -> dict[str, torch.Tensor]:
    """A Hugging Face CLIPModel's text tower (``text_model.*``, ``text_projection.weight``, ``logit_scale``) with
    open_clip's key names: q/k/v concatenated (q, k, v order) into ``attn.in_proj_*``, the projection transposed
    (open_clip computes ``x @ text_projection``). Anything else under ``text_model.`` is refused by name."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for k, v in sd.items():
        if not is_hf_text_key(k) or k.endswith("position_ids"):
            continue
        if k in _HF_TEXT_TOP:
            out[_HF_TEXT_TOP[k]] = v
        elif k == "text_projection.weight":
            out["text_projection"] = v.t().contiguous()
        elif k == "logit_scale":
            out["logit_scale"] = v
        elif (m := _HF_TEXT_LAYER.match(k)) is not None:
            if not hf_clip_block_key(m.group(2), v, int(m.group(1)), "transformer.resblocks.", out, qkv):
                unknown.append(k)
        else:
            unknown.append(k)
    if unknown:
        raise ValueError(f"{name}: unknown Hugging Face CLIP text keys {sorted(unknown)[:4]}")
    for i, kind, parts in join_hf_qkv(qkv, "transformer.resblocks.", out):
        raise ValueError(f"{name}: text layer {i} lacks {sorted({'q', 'k', 'v'} - set(parts))} projection {kind}")
    return out


def hf_text_config(cfg: Mapping[str, Any]) -> dict:
    """An open_clip ``text_cfg`` (bounded by :func:`check_text_config`) from a Hugging Face CLIP ``config.json``'s
    ``text_config``; ValueError naming the field when it cannot be one."""
    t = cfg.get("text_config")
    if not isinstance(t, Mapping):
        raise ValueError("the Hugging Face config has no text_config")
    act = t.get("hidden_act", "quick_gelu")
    if act != "quick_gelu":
        raise ValueError(f"text_config hidden_act {act!r}: only CLIP's quick_gelu text towers are built")
    width, inter = t.get("hidden_size", 512), t.get("intermediate_size", 2048)
    if isinstance(width, bool) or not isinstance(width, int) or width < 1 or not isinstance(inter, int):
        raise ValueError(f"text_config hidden_size {width!r} / intermediate_size {inter!r} must be integers")
    return check_text_config({"width": width, "heads": t.get("num_attention_heads", 8),
                              "layers": t.get("num_hidden_layers", 12), "mlp_ratio": inter / width,
                              "context_length": t.get("max_position_embeddings", 77),
                              "vocab_size": t.get("vocab_size", BPE_VOCAB)})
