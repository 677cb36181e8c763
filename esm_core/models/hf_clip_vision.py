"""The Hugging Face ``CLIPVisionModel`` family, served through the open_clip ViT family.

A Hugging Face CLIP vision checkpoint (keys ``vision_model.…``) is renamed to
open_clip's ``visual.*`` keys when it is read (:func:`to_open_clip`; q/k/v are
concatenated into ``in_proj``), so merging, probing and ESM++ run on the same
code path as open_clip towers. Its ``config.json`` (and
``preprocessor_config.json``) give the architecture and the input
normalisation exactly (:func:`open_clip_config`): nothing about an uploaded
HF model is guessed.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import torch

from ..checkpoints import hf_clip_vision_to_open_clip
from . import openclip_vit

NAME = "hf_clip_vision"
_LAYER = re.compile(r"(?:^|\.)vision_model\.encoder\.layers\.\d+\.")
_ACTS = {"quick_gelu": True, "gelu": False}


def matches(keys) -> bool:
    """True for Hugging Face CLIP vision state dicts (``vision_model.encoder.layers.N.…``)."""
    return any(_LAYER.search(k) for k in keys)


def to_open_clip(state_dict: Mapping[str, torch.Tensor], name: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The state dict with open_clip ``visual.*`` names (see :func:`esm_core.checkpoints.hf_clip_vision_to_open_clip`)."""
    return hf_clip_vision_to_open_clip(state_dict, name)


def is_config(cfg: Mapping[str, Any]) -> bool:
    """True for a Hugging Face CLIP ``config.json`` (a vision model's, or a full CLIP's with ``vision_config``)."""
    return isinstance(cfg, Mapping) and (str(cfg.get("model_type", "")).startswith("clip")
                                         or isinstance(cfg.get("vision_config"), Mapping))


def _int(cfg: Mapping, key: str) -> int:
    v = cfg.get(key)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"Hugging Face CLIP config: {key!r} must be an integer, got {v!r}")
    return v


def open_clip_config(cfg: Mapping[str, Any], preprocessor: Mapping[str, Any] | None = None) -> dict:
    """The open_clip model config (bounded by :func:`~esm_core.models.openclip_vit.check_config`) of a
    Hugging Face CLIP ``config.json``; ``preprocessor`` (``preprocessor_config.json``) adds mean/std."""
    if not is_config(cfg):
        raise ValueError("not a Hugging Face CLIP config.json (model_type 'clip…' or a 'vision_config')")
    v = cfg.get("vision_config", cfg)
    width, heads = _int(v, "hidden_size"), _int(v, "num_attention_heads")
    if heads < 1 or width % heads:
        raise ValueError(f"Hugging Face CLIP config: {heads} heads do not divide hidden_size {width}")
    act = v.get("hidden_act", "quick_gelu")
    if act not in _ACTS:
        raise ValueError(f"Hugging Face CLIP config: hidden_act {act!r} is not one of {sorted(_ACTS)}")
    out = {"embed_dim": _int(cfg, "projection_dim") if "projection_dim" in cfg else
           _int(v, "projection_dim") if "projection_dim" in v else width,
           "quick_gelu": _ACTS[act],
           "vision_cfg": {"image_size": _int(v, "image_size"), "layers": _int(v, "num_hidden_layers"),
                          "width": width, "patch_size": _int(v, "patch_size"), "head_width": width // heads,
                          "mlp_ratio": _int(v, "intermediate_size") / width}}
    if preprocessor is not None:
        out["preprocess_cfg"] = {"mean": preprocessor.get("image_mean"), "std": preprocessor.get("image_std")}
    return openclip_vit.check_config(out)
