"""The Hugging Face ViT family: ``ViTForImageClassification`` / ``ViTModel`` image classifiers (google/vit-*).

Pool keys are the ``google/vit-*`` file layout of ``ViTForImageClassification`` (what ``save_pretrained``
writes and the Hub holds): ``vit.embeddings.{cls_token, position_embeddings, patch_embeddings.projection}``,
per layer ``vit.encoder.layer.N.attention.attention.{query,key,value}``, ``attention.output.dense``,
``intermediate.dense``, ``output.dense``, ``layernorm_before``, ``layernorm_after``; ``vit.layernorm``; the head
``classifier``. A bare ``ViTModel`` file (no ``vit.`` prefix) and the in-memory layout of transformers ≥ 5
(``vit.layers.N.attention.q_proj``, ``mlp.fc1`` ...) are renamed to it by :func:`convert`; the built module is
whatever the installed transformers makes, reached through :func:`module_key`.

Roles (the image-family rule of methods §6): ``MATRIX`` — the six linear weights of every layer; ``VECTOR`` —
every other float tensor: biases, LayerNorms, the class token, the position embeddings and the patch
projection (a 4-D convolution), merged like vectors (the mean of the task vectors, coefficient 1); ``OWN`` —
the ``classifier`` (each task's own head, never merged) and a ``ViTModel``'s ``pooler`` (not read by the
features); ``SKIP`` — integer / bool buffers.

Layer types: the six of the BERT family (``attn.query`` ... ``ffn.output``). ESD types (methods §6, image
families): Q, K, V, intermediate and output — the layers the ViT reference decomposes (its packed
``in_proj`` is Q, K and V; ``c_fc``; ``c_proj``); the attention output goes the TSV-M way, as ``out_proj`` does
there. Q, K and V are separate matrices here and each gets its own ESD, as in the reference's RoBERTa code.
α scales the ESD keys only (:data:`ALPHA_ON_ALL` False). Routed types (ESM++, methods §7): Q, K, V (they read
the same input — ``layernorm_before``'s output — and share one prototype set and one decision) and
``ffn.intermediate`` (``layernorm_after``'s output), as ``in_proj`` and ``c_fc`` in the ViT reference.

Features: the ``[CLS]`` token of the last hidden state after the final ``layernorm`` — what
``ViTForImageClassification.classifier`` reads, so ``logits = f @ Wᵀ + b`` with a task's own classifier are that
task's Hugging Face logits. Inputs: ``preprocessor_config.json`` (resize to ``size``, ``x · rescale_factor``,
``(x − image_mean) / image_std``).
"""
from __future__ import annotations

import functools
import math
import re
from typing import Any, Mapping

import numpy as np
import torch
from PIL import Image

from ..device import resolve_device
from .bert import check_config_values
from .protocol import RecordPoint
from .roles import MATRIX, OWN, SKIP, VECTOR

NAME = "hf_vit"
DESCRIPTION = "Hugging Face ViT image classifier (ViTForImageClassification, google/vit-* layout)"
MODALITY = "image"
FOLDER_FORMAT = "transformers"  # exports: the folder format, also the library that loads it
FOLDER_WRITER = "transformers-vit"  # its writer in esm_core.package.WRITERS

QUERY = "attn.query"
KEY = "attn.key"
VALUE = "attn.value"
ATTN_OUT = "attn.output"
INTERMEDIATE = "ffn.intermediate"
OUTPUT = "ffn.output"
LAYER_TYPES = (QUERY, KEY, VALUE, ATTN_OUT, INTERMEDIATE, OUTPUT)
ESD_TYPES = (QUERY, KEY, VALUE, INTERMEDIATE, OUTPUT)     # the ViT reference's in_proj, c_fc, c_proj (see above)
ROUTED_TYPES = (QUERY, KEY, VALUE, INTERMEDIATE)          # the ViT reference's in_proj and c_fc
PROBED_TYPES = LAYER_TYPES
ALPHA_ON_ALL = False                                      # methods §6.8: α on the ESD keys only
PROXY_SAMPLES = 32

PREFIX = "vit."
_LINEARS = {"attention.attention.query": QUERY, "attention.attention.key": KEY, "attention.attention.value": VALUE,
            "attention.output.dense": ATTN_OUT, "intermediate.dense": INTERMEDIATE, "output.dense": OUTPUT}
# the same layers in the in-memory layout of transformers >= 5
_NATIVE = {"attention.attention.query": "attention.q_proj", "attention.attention.key": "attention.k_proj",
           "attention.attention.value": "attention.v_proj", "attention.output.dense": "attention.o_proj",
           "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"}
_LIN = "|".join(map(re.escape, _LINEARS))
_LAYER = re.compile(r"^(?:vit\.)?encoder\.layer\.(?P<i>\d+)\.(?P<lin>" + _LIN + r")\.weight$")
# every key of the file layout (prefix optional: a bare ViTModel)
_FILE_KEY = re.compile(
    r"^(?P<p>vit\.)?(?:embeddings\.(?:cls_token|mask_token|position_embeddings|patch_embeddings\.projection\."
    r"(?:weight|bias))|encoder\.layer\.\d+\.(?:" + _LIN + r"|layernorm_before|layernorm_after)\.(?:weight|bias)"
    r"|layernorm\.(?:weight|bias)|pooler\.dense\.(?:weight|bias))$")
_HEAD = re.compile(r"^(?:classifier\.|(?:vit\.)?pooler\.)")
# transformers >= 5 in-memory names (prefix optional) → file names
_NATIVE_KEY = re.compile(r"^(?P<p>vit\.)?layers\.(?P<i>\d+)\.(?P<rest>.+)$")
_NATIVE_BACK = {v: k for k, v in _NATIVE.items()}


# ---------------------------------------------------------------- key names

def strip_prefix(key: str) -> str:
    return key[len(PREFIX):] if key.startswith(PREFIX) else key


def is_head(key: str) -> bool:
    """The task's own classifier, or a ViTModel's pooler (neither is read by the features)."""
    return bool(_HEAD.match(key))


def layer_type(key: str) -> str | None:
    """Canonical layer type of a layer's linear weight (``"attn.query"`` ...), else None."""
    m = _LAYER.match(key)
    return _LINEARS[m.group("lin")] if m else None


def block_index(key: str) -> int | None:
    m = _LAYER.match(key)
    return int(m.group("i")) if m else None


def layer_types_of(keys) -> dict[str, str]:
    return {k: t for k in keys if (t := layer_type(k)) is not None}


def esd_keys(keys, types=ESD_TYPES) -> list[str]:
    return [k for k in keys if layer_type(k) in types]


def routed_keys(keys, types=ROUTED_TYPES) -> list[str]:
    return [k for k in keys if layer_type(k) in types]


def key_role(key: str, tensor: torch.Tensor) -> str:
    """MATRIX (the six linears), VECTOR (other floats: biases, LayerNorms, embeddings), OWN (heads), SKIP."""
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return SKIP
    if is_head(key):
        return OWN
    if tensor.ndim == 2 and layer_type(key) is not None:
        return MATRIX
    return VECTOR


def roles_of(state_dict: Mapping[str, torch.Tensor]) -> dict[str, str]:
    return {k: key_role(k, v) for k, v in state_dict.items()}


def short_key(key: str) -> str:
    """``vit.encoder.layer.3.intermediate.dense.weight`` → ``3 · ffn.intermediate``."""
    t = layer_type(key)
    return f"{block_index(key)} · {t}" if t is not None else strip_prefix(key)


def input_group(key: str) -> str:
    """Q, K and V of a layer read the same input (``layernorm_before``'s output): their group is the Q key."""
    m = _LAYER.match(key)
    if m and _LINEARS[m.group("lin")] in (KEY, VALUE):
        return key[:m.start("lin")] + "attention.attention.query.weight"
    return key


def routing_groups(keys) -> list[tuple[str, list[str]]]:
    """Routed keys grouped by input, in execution order (layer, then Q, K, V, attention output, intermediate,
    output); a group is named by its first member."""
    keys = list(keys)
    bad = [k for k in keys if layer_type(k) is None]
    if bad:
        raise ValueError(f"cannot route {bad[:3]}: not linear weights of a Hugging Face ViT layer")
    groups: dict[str, list[str]] = {}
    for k in sorted(keys, key=lambda k: (block_index(k), LAYER_TYPES.index(layer_type(k)))):
        groups.setdefault(input_group(k), []).append(k)
    return [(m[0], m) for m in groups.values()]


def _layer_sets(keys) -> tuple[set, set]:
    seen, blocks = set(), set()
    for k in keys:
        m = _LAYER.match(k)
        if m:
            seen.add((int(m.group("i")), _LINEARS[m.group("lin")]))
            blocks.add(int(m.group("i")))
    return seen, blocks


def matches(keys) -> bool:
    """True for a ViT state dict in the file layout (``vit.``-prefixed or a bare ViTModel) or in transformers
    5's in-memory layout: every layer has its six linear weights and every key is a ViT key or a head."""
    keys = list(keys)
    if any(_NATIVE_KEY.match(k) for k in keys):
        try:
            keys = list(_renamed_native(keys).values())
        except ValueError:
            return False
    seen, blocks = _layer_sets(keys)
    if not blocks or not all((b, t) in seen for b in blocks for t in LAYER_TYPES):
        return False
    prefixes = set()
    for k in keys:
        if k.startswith("classifier."):
            continue
        m = _FILE_KEY.match(k)
        if m is None:
            return False
        prefixes.add(m.group("p") or "")
    return len(prefixes) == 1 and any("patch_embeddings.projection.weight" in k for k in keys)


def _renamed_native(keys) -> dict[str, str]:
    """{transformers-5 name: file name} of every key (others unchanged)."""
    out = {}
    for k in keys:
        m = _NATIVE_KEY.match(k)
        if m is None:
            out[k] = k
            continue
        rest = m.group("rest")
        for native, file in _NATIVE_BACK.items():
            if rest.startswith(native + "."):
                rest = file + rest[len(native):]
                break
        out[k] = f"{m.group('p') or ''}encoder.layer.{m.group('i')}.{rest}"
    return out


def convert(state_dict: Mapping[str, torch.Tensor], name: str = "checkpoint") -> dict[str, torch.Tensor]:
    """A ViT checkpoint under the pool's keys (``vit.``-prefixed file layout): a bare ``ViTModel`` gets the
    prefix, transformers 5's in-memory names are renamed; the family's own layout comes back unchanged
    (heads included). ValueError naming the file when it is no ViT."""
    sd = dict(state_dict)
    if not matches(sd):
        raise ValueError(f"{name}: not a Hugging Face ViT checkpoint (no complete "
                         f"'vit.encoder.layer.N.attention.attention.query/key/value' ... layers; found e.g. "
                         f"{sorted(sd)[:4]})")
    ren = _renamed_native(sd)
    out = {}
    for k, v in sd.items():
        n = ren[k]
        if not n.startswith("classifier.") and not n.startswith(PREFIX):
            n = PREFIX + n
        out[n] = v
    return out


def encoder_state(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The feature module's keys of a pool state dict: heads (classifier, pooler) and the unused mask token
    dropped."""
    return {k: v for k, v in state_dict.items() if not is_head(k) and k != "vit.embeddings.mask_token"}


def split_head(state_dict: Mapping[str, torch.Tensor], name: str, width: int | None = None) -> tuple[dict, dict]:
    """(feature-module state, head ``{"weight", "bias"}``) of a ``ViTForImageClassification`` checkpoint in the
    pool's keys; ValueError naming the file when its classifier is missing or malformed."""
    w, b = state_dict.get("classifier.weight"), state_dict.get("classifier.bias")
    if not isinstance(w, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise ValueError(f"{name}: no classifier ('classifier.weight' and 'classifier.bias'): a task checkpoint "
                         "must be a ViTForImageClassification")
    if w.ndim != 2 or b.shape != (w.shape[0],) or not w.is_floating_point() or not b.is_floating_point():
        raise ValueError(f"{name}: classifier.weight {tuple(w.shape)} and classifier.bias {tuple(b.shape)} are not "
                         "a linear classifier (C×d float weight, C bias)")
    if width is not None and w.shape[1] != width:
        raise ValueError(f"{name}: classifier.weight {tuple(w.shape)} does not read the model's width {width}")
    if w.shape[0] < 2:
        raise ValueError(f"{name}: the classifier has {w.shape[0]} class; a classification task needs at least 2")
    if not (torch.isfinite(w).all() and torch.isfinite(b).all()):
        raise ValueError(f"{name}: the classifier holds non-finite values (NaN / inf)")
    return encoder_state(state_dict), {"weight": w.to(torch.float32), "bias": b.to(torch.float32)}


# ---------------------------------------------------------------- the built module's names

@functools.lru_cache(maxsize=1)
def _native_layout() -> bool:
    """True when the installed transformers names ViT layers ``layers.N.attention.q_proj`` (≥ 5)."""
    from transformers import ViTConfig, ViTModel
    with torch.device("meta"):
        m = ViTModel(ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8,
                               image_size=8, patch_size=8), add_pooling_layer=False)
    return any(k.startswith("layers.0.attention.q_proj") for k in m.state_dict())


def _inner_name(key: str) -> str | None:
    """Pool key → parameter name inside the Hugging Face ``ViTModel``; None for heads."""
    if is_head(key) or not key.startswith(PREFIX):
        return None
    name = key[len(PREFIX):]
    if _native_layout() and name.startswith("encoder.layer."):
        i, rest = name[len("encoder.layer."):].split(".", 1)
        for file, native in _NATIVE.items():
            if rest.startswith(file + "."):
                rest = native + rest[len(file):]
                break
        name = f"layers.{i}.{rest}"
    return name


def installed_names(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A pool state dict under the names the installed transformers' ``ViTForImageClassification`` gives its
    modules (``vit.layers.N.attention.q_proj.weight`` with transformers ≥ 5, the pool's own names before): the
    names a PEFT adapter made with it targets. :func:`convert` maps them back."""
    return {(PREFIX + n if (n := _inner_name(k)) is not None else k): v for k, v in state_dict.items()}


def module_key(key: str) -> str | None:
    """Pool key → parameter name inside the built feature module (:class:`ViTFeatures`: ``model.`` + the
    ``ViTModel``'s own name); None for the heads it does not hold."""
    n = _inner_name(key)
    return None if n is None else "model." + n


def model_keys(module: torch.nn.Module) -> list[str]:
    """The pool keys of a built feature module's state."""
    back = {}
    for k in _expected_of_module(module):
        back[module_key(k)] = k
    return [back.get(k, k) for k in module.state_dict()]


def _expected_of_module(module) -> list[str]:
    return list(expected_shapes(_model(module).config.to_dict()))


# ---------------------------------------------------------------- config bounds (before anything is built)

MAX_FIELD = {"num_hidden_layers": 128, "hidden_size": 16_384, "num_attention_heads": 1_024,
             "intermediate_size": 65_536, "image_size": 1_024, "patch_size": 1_024}
MAX_GRID = 64                          # patches per side (ViT-H/14 at 518 px: 37)
ACTIVATIONS = ("gelu", "gelu_new", "gelu_fast", "gelu_python", "gelu_pytorch_tanh", "gelu_accurate", "quick_gelu",
               "relu", "silu", "swish", "tanh")
_PROBABILITIES = ("hidden_dropout_prob", "attention_probs_dropout_prob")


def _whole(cfg: Mapping, name: str, lo: int, hi: int) -> int:
    v = cfg.get(name)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"config.json: {name} = {repr(v)[:40]} must be a whole number from {lo} to {hi:,}")
    return v


def check_config(config: Mapping[str, Any]) -> dict:
    """A bounded copy of a ViT ``config.json`` (hostile until checked): ``model_type`` "vit", every number
    finite, each size field a whole number within :data:`MAX_FIELD`, the heads dividing the width, the patch
    size dividing a square image size (at most :data:`MAX_GRID` patches per side), 3 channels, a known
    activation, ``layer_norm_eps`` in (0, 1), dropouts in [0, 1]. Raises ValueError naming the field."""
    from transformers import PretrainedConfig
    if isinstance(config, PretrainedConfig):
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise ValueError(f"config.json must be a JSON object, got {type(config).__name__}")
    check_config_values(config)
    mt = config.get("model_type")
    if mt != "vit":
        raise ValueError(f"config.json: model_type {str(mt)[:40]!r} is not 'vit' (a Hugging Face ViT image "
                         "classifier, ViTForImageClassification / ViTModel)")
    out = {"model_type": "vit"}
    img = config.get("image_size", 224)
    if isinstance(img, (list, tuple)):
        if len(img) != 2 or img[0] != img[1]:
            raise ValueError(f"config.json: image_size = {list(img)[:4]} is not square; only square inputs are read")
        img = img[0]
    c = dict(config, image_size=img)
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if name not in config:
            raise ValueError(f"config.json: {name} is missing")
        out[name] = _whole(c, name, 1, MAX_FIELD[name])
    out["image_size"] = _whole(c, "image_size", 1, MAX_FIELD["image_size"])
    out["patch_size"] = _whole(dict(c, patch_size=c.get("patch_size", 16)), "patch_size", 1, out["image_size"])
    if out["hidden_size"] % out["num_attention_heads"]:
        raise ValueError(f"config.json: num_attention_heads = {out['num_attention_heads']:,} does not divide "
                         f"hidden_size = {out['hidden_size']:,}")
    if out["image_size"] % out["patch_size"]:
        raise ValueError(f"config.json: patch_size = {out['patch_size']} does not divide image_size = "
                         f"{out['image_size']}")
    if out["image_size"] // out["patch_size"] > MAX_GRID:
        raise ValueError(f"config.json: image_size {out['image_size']} / patch_size {out['patch_size']} gives "
                         f"{out['image_size'] // out['patch_size']} patches per side; at most {MAX_GRID} are read")
    ch = config.get("num_channels", 3)
    if ch != 3 or isinstance(ch, bool):
        raise ValueError(f"config.json: num_channels = {repr(ch)[:20]}; only 3-channel (RGB) models are read")
    out["num_channels"] = 3
    act = config.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise ValueError(f"config.json: hidden_act = {repr(act)[:40]} is not one of {', '.join(ACTIVATIONS)}")
    out["hidden_act"] = act
    eps = config.get("layer_norm_eps", 1e-12)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise ValueError(f"config.json: layer_norm_eps = {repr(eps)[:40]} must be a number between 0 and 1")
    out["layer_norm_eps"] = float(eps)
    for name in _PROBABILITIES:
        p = config.get(name, 0.0)
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise ValueError(f"config.json: {name} = {repr(p)[:40]} must be a probability from 0 to 1")
        out[name] = float(p)
    qkv = config.get("qkv_bias", True)
    if not isinstance(qkv, bool):
        raise ValueError(f"config.json: qkv_bias = {repr(qkv)[:40]} must be true or false")
    out["qkv_bias"] = qkv
    labels = config.get("id2label")
    if isinstance(labels, Mapping):
        out["id2label"] = {str(k): str(v)[:200] for k, v in labels.items()}
    return out


def param_count(cfg: Mapping) -> int:
    """Parameters of the feature module (no head) of a checked config."""
    H, F, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    P, S = cfg["patch_size"], cfg["image_size"]
    tokens = (S // P) ** 2 + 1
    emb = H + tokens * H + 3 * P * P * H + H
    per_layer = 4 * H * H + (3 * H if cfg.get("qkv_bias", True) else 0) + H + 2 * H * F + F + H + 4 * H
    return emb + L * per_layer + 2 * H


def expected_shapes(config: Mapping) -> dict[str, tuple[int, ...]]:
    """``{pool key: shape}`` of the feature module of ``config`` (computed from the checked fields: nothing
    is built)."""
    cfg = check_config(config)
    H, F, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    P, S = cfg["patch_size"], cfg["image_size"]
    out = {"vit.embeddings.cls_token": (1, 1, H), "vit.embeddings.position_embeddings": (1, (S // P) ** 2 + 1, H),
           "vit.embeddings.patch_embeddings.projection.weight": (H, 3, P, P),
           "vit.embeddings.patch_embeddings.projection.bias": (H,)}
    for i in range(L):
        p = f"vit.encoder.layer.{i}."
        for lin in ("attention.attention.query", "attention.attention.key", "attention.attention.value"):
            out[p + lin + ".weight"] = (H, H)
            if cfg["qkv_bias"]:
                out[p + lin + ".bias"] = (H,)
        out[p + "attention.output.dense.weight"] = (H, H)
        out[p + "attention.output.dense.bias"] = (H,)
        out[p + "intermediate.dense.weight"] = (F, H)
        out[p + "intermediate.dense.bias"] = (F,)
        out[p + "output.dense.weight"] = (H, F)
        out[p + "output.dense.bias"] = (H,)
        for ln in ("layernorm_before", "layernorm_after"):
            out[p + ln + ".weight"] = (H,)
            out[p + ln + ".bias"] = (H,)
    out["vit.layernorm.weight"] = (H,)
    out["vit.layernorm.bias"] = (H,)
    return out


def _checkpoint_sizes(sd: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, str]]:
    """``{config field: (value, what in the checkpoint shows it)}`` read from a checkpoint's own tensors."""
    out = {}
    idx = {int(m.group(1)) for k in sd if (m := re.match(r"^vit\.encoder\.layer\.(\d+)\.", k))}
    if idx:
        out["num_hidden_layers"] = (len(idx), f"it holds {len(idx)} layers (vit.encoder.layer.{min(idx)} … "
                                              f"{max(idx)})")

    def shape(key, dim, field, f=lambda n: n):
        v = sd.get(key)
        if isinstance(v, torch.Tensor) and v.ndim > dim:
            out.setdefault(field, (f(int(v.shape[dim])), f"{key} has shape {tuple(v.shape)}"))
    shape("vit.embeddings.cls_token", 2, "hidden_size")
    shape("vit.embeddings.patch_embeddings.projection.weight", 2, "patch_size")
    shape(f"vit.encoder.layer.{min(idx) if idx else 0}.intermediate.dense.weight", 0, "intermediate_size")
    return out


def check_shapes(state_dict: Mapping[str, torch.Tensor], config, max_params: int | None = None) -> dict:
    """The checked config after comparing the checkpoint (pool keys; heads ignored) with it key by key, without
    building anything. Refuses, naming them: a model over ``max_params`` parameters, shape mismatches, missing,
    unexpected and non-float keys."""
    cfg = check_config(config)
    if max_params is not None and param_count(cfg) > max_params:
        raise ValueError(f"config.json describes a model of about {param_count(cfg) / 1e6:,.0f} M parameters, "
                         f"more than the {max_params / 1e6:,.0f} M this server builds")
    sd = encoder_state(state_dict)
    for name, (have, why) in _checkpoint_sizes(sd).items():
        if cfg[name] != have:
            raise ValueError(f"config.json: {name} = {cfg[name]:,} does not fit the checkpoint: {why}")
    expected = expected_shapes(cfg)

    def few(xs):
        return f"{xs[:8]}{' …' if len(xs) > 8 else ''}"
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f"{k}: checkpoint {tuple(sd[k].shape)} vs config {expected[k]}" for k in expected
             if k in sd and tuple(sd[k].shape) != expected[k]]
    not_float = [k for k in expected if k in sd and not sd[k].is_floating_point()]
    if not_float:
        raise ValueError(f"checkpoint weights must be floating point: {few(not_float)} are not")
    if missing or unexpected or wrong:
        parts = ([f"shape mismatches {few(wrong)}"] if wrong else []) + \
                ([f"missing keys {few(missing)}"] if missing else []) + \
                ([f"unexpected keys {few(unexpected)}"] if unexpected else [])
        raise ValueError("checkpoint does not fit the ViT config.json: " + "; ".join(parts))
    return cfg


# ---------------------------------------------------------------- building

def vit_config(cfg: Mapping):
    """The ``transformers.ViTConfig`` of a checked config (transformers' default attention, as
    ``ViTForImageClassification.from_pretrained`` picks it)."""
    from transformers import ViTConfig
    return ViTConfig(**{k: v for k, v in cfg.items() if k not in ("model_type", "id2label")})


class ViTFeatures(torch.nn.Module):
    """A built ``ViTModel`` as the feature module: ``features(x) -> (B, hidden)``, the ``[CLS]`` token of the
    last hidden state after the final layernorm (what ``ViTForImageClassification.classifier`` reads).
    ``.model`` is the Hugging Face module."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"ViT inputs must be N×3×H×W images, got shape {tuple(x.shape)}")
        dev = next(self.model.parameters()).device
        return self.model(pixel_values=x.to(dev)).last_hidden_state[:, 0]


def is_model(module: torch.nn.Module) -> bool:
    return isinstance(module, ViTFeatures)


def _model(module: torch.nn.Module) -> torch.nn.Module:
    if not is_model(module):
        raise ValueError(f"expected a Hugging Face ViT feature module (hf_vit.ViTFeatures), got a "
                         f"{type(module).__name__}")
    return module.model


def build_model(state_dict: Mapping[str, torch.Tensor], config, *, device: str | torch.device = "cpu",
                share: bool = False, max_params: int | None = None) -> ViTFeatures:
    """The feature module holding ``state_dict`` (pool keys; heads ignored), eval mode, float32: every shape
    checked against ``config`` first (:func:`check_shapes`), then built on the meta device and the tensors
    assigned (no random init). ``share``: it holds ``state_dict``'s float32 tensors themselves (no copy)."""
    from transformers import ViTModel
    cfg = check_shapes(state_dict, config, max_params)
    with torch.device("meta"):
        model = ViTModel(vit_config(cfg), add_pooling_layer=False)
    sd = {_inner_name(k): v.to(torch.float32, copy=not share) for k, v in encoder_state(state_dict).items()}
    model.load_state_dict(sd, strict=True, assign=True)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):   # pragma: no cover  (a buffer added
        raise ValueError("the ViT module holds tensors the checkpoint does not give")  # by a newer transformers)
    return ViTFeatures(model).to(resolve_device(device)).eval()


build = build_model


def load_state(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Another checkpoint of the same shapes into a built feature module (strict; heads ignored)."""
    _model(module).load_state_dict({_inner_name(k): v.to(torch.float32) for k, v in encoder_state(state_dict).items()},
                                   strict=True)


def load_own(module: torch.nn.Module, task: Mapping[str, torch.Tensor]) -> None:
    """Nothing to put in: a task's own values (its classifier) are its head, outside the feature module."""


def saved_config(module: torch.nn.Module) -> dict:
    """What an ESM++ file records to rebuild the feature module: the checked config."""
    c = _model(module).config
    return {"model_config": check_config({**c.to_dict(), "model_type": "vit"})}


def rebuild(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> ViTFeatures:
    cfg = config.get("model_config") if isinstance(config, Mapping) else None
    if not isinstance(cfg, Mapping):
        raise ValueError("an ESM++ file of a ViT model needs its 'model_config'")
    return build_model(state_dict, cfg)


# ---------------------------------------------------------------- probe and ESM++ surgery

def sample_mask(x: torch.Tensor) -> None:
    """Every token of an image counts."""
    return None


def linear_of(module: torch.nn.Module, key: str) -> tuple[str, torch.nn.Module]:
    """(path inside ``module``, the ``nn.Linear`` or routed layer) of the layer whose weight is ``key``."""
    if layer_type(key) is None:
        raise ValueError(f"{key!r} is not a linear weight of a Hugging Face ViT layer")
    name = module_key(key)[: -len(".weight")]
    try:
        return name, module.get_submodule(name)
    except AttributeError:
        raise ValueError(f"the model has no layer for {key!r}") from None


def record_points(module: torch.nn.Module, keys) -> list:
    """One :class:`~esm_core.models.protocol.RecordPoint` per input group of ``keys``: the input of the group
    key's linear (Q, K and V: the query linear's input, ``layernorm_before``'s output)."""
    _model(module)
    points = []
    for key in dict.fromkeys(input_group(k) for k in keys):
        _, lin = linear_of(module, key)
        points.append(RecordPoint(key, lin, "input", True))
    return points


def route(module: torch.nn.Module, key: str, make) -> None:
    """Replace the linear layer of weight ``key`` by ``make(weight, bias, batch_first=True)`` at the same path."""
    _model(module)
    path, old = linear_of(module, key)
    if not isinstance(old, torch.nn.Linear):
        raise ValueError(f"routed layer {key!r} is a {type(old).__name__}, not an nn.Linear")
    module.set_submodule(path, make(old.weight, old.bias, True))


@torch.no_grad()
def layer_inputs(module: torch.nn.Module, x: torch.Tensor, keys) -> dict[str, torch.Tensor]:
    """``{key: (B · tokens, d_in)}``: the inputs of ``keys``' linears on images ``x`` (K and V: their group's)."""
    got: dict[str, list] = {}
    handles = []
    try:
        for p in record_points(module, keys):
            got[p.key] = []
            handles.append(p.module.register_forward_pre_hook(
                lambda m, args, k=p.key: got[k].append(args[0].detach().reshape(-1, args[0].shape[-1]))))
        module.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(got[input_group(k)]) for k in keys}


# ---------------------------------------------------------------- inputs (preprocessor_config.json)

RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _three(vals, what: str) -> tuple[float, float, float]:
    if isinstance(vals, (int, float)) and not isinstance(vals, bool):
        vals = [vals] * 3
    if not isinstance(vals, (list, tuple)) or len(vals) != 3 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in vals):
        raise ValueError(f"preprocessor_config.json: {what} must be three finite numbers, got {repr(vals)[:60]}")
    if what == "image_std" and min(vals) <= 0:
        raise ValueError(f"preprocessor_config.json: image_std must be positive, got {list(vals)}")
    return tuple(float(v) for v in vals)


def check_preprocessor(pre: Mapping[str, Any] | None, image_size: int) -> dict:
    """``{"size", "mean", "std", "rescale", "resample"}`` from a ``preprocessor_config.json`` (None: the
    ``ViTImageProcessor`` defaults at ``image_size``). The size must equal the model's ``image_size`` (the
    position embeddings are not interpolated); a disabled rescale / normalisation becomes 1 / (0, 1)."""
    pre = {} if pre is None else pre
    if not isinstance(pre, Mapping):
        raise ValueError(f"preprocessor_config.json must be a JSON object, got {type(pre).__name__}")
    check_config_values(pre, "preprocessor_config.json")
    size = pre.get("size", {"height": image_size, "width": image_size})
    if isinstance(size, Mapping):
        if "height" in size or "width" in size:
            h, w = size.get("height"), size.get("width")
        elif "shortest_edge" in size:
            h = w = size["shortest_edge"]
        else:
            raise ValueError(f"preprocessor_config.json: size {dict(size)} has no height / width")
    else:
        h = w = size
    if h != w or isinstance(h, bool) or not isinstance(h, int):
        raise ValueError(f"preprocessor_config.json: size {repr(size)[:60]} is not one square size in pixels")
    if pre.get("do_resize", True) is not False and h != image_size:
        raise ValueError(f"preprocessor_config.json: size {h} px differs from the model's image_size {image_size} "
                         "(position embeddings are not interpolated)")
    rs = pre.get("resample", 2)
    if rs not in RESAMPLE or isinstance(rs, bool):
        raise ValueError(f"preprocessor_config.json: resample = {repr(rs)[:20]} is not a PIL filter (0 to 5)")
    rescale = pre.get("rescale_factor", 1 / 255) if pre.get("do_rescale", True) else 1.0
    if isinstance(rescale, bool) or not isinstance(rescale, (int, float)) or not 0 < rescale <= 1:
        raise ValueError(f"preprocessor_config.json: rescale_factor = {repr(rescale)[:40]} must be in (0, 1]")
    if pre.get("do_normalize", True):
        mean = _three(pre.get("image_mean", (0.5, 0.5, 0.5)), "image_mean")
        std = _three(pre.get("image_std", (0.5, 0.5, 0.5)), "image_std")
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return {"size": image_size, "mean": mean, "std": std, "rescale": float(rescale), "resample": int(rs)}


def normalise_images(raw: np.ndarray, mean, std, rescale: float = 1 / 255) -> torch.Tensor:
    """uint8 images (N×H×W grey or N×H×W×3, already at the model's size) → float N×3×H×W,
    ``(x · rescale − mean) / std`` per channel (``ViTImageProcessor``'s rescale and normalise)."""
    a = np.asarray(raw)
    if a.ndim == 3:
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"images must be N×H×W or N×H×W×3, got shape {tuple(np.shape(raw))}")
    x = a.astype(np.float32) * np.float32(rescale)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def resize_images(images, pre: Mapping) -> np.ndarray:
    """PIL images or uint8 arrays of any size → uint8 N×S×S×3 at the checked preprocessor's size, with its
    resampling filter (``ViTImageProcessor``'s resize)."""
    S, out = pre["size"], []
    for im in images:
        if not isinstance(im, Image.Image):
            im = Image.fromarray(np.asarray(im, dtype=np.uint8))
        im = im.convert("RGB")
        if im.size != (S, S):
            im = im.resize((S, S), resample=pre["resample"])
        out.append(np.asarray(im, dtype=np.uint8))
    return np.stack(out) if out else np.zeros((0, S, S, 3), np.uint8)
