"""Llama-style decoder sequence classifiers: ``LlamaForSequenceClassification`` / Qwen2 / Mistral (one key layout).

Pool keys are the ``*ForSequenceClassification`` file layout: ``model.embed_tokens.weight``, per layer
``model.layers.N.self_attn.{q,k,v,o}_proj``, ``model.layers.N.mlp.{gate,up,down}_proj``,
``model.layers.N.{input,post_attention}_layernorm.weight``, ``model.norm.weight``; the head ``score``. A bare
``LlamaModel`` file (no ``model.`` prefix) is renamed to it by :func:`convert`. Grouped-query attention: K and V
are ``num_key_value_heads · head_dim`` wide, narrower than Q (shapes come from the config).

Roles (the text rule of methods §8): ``MATRIX`` — the seven linear weights of every layer; ``VECTOR`` — the RMSNorm
weights and the embedding table (ESM merges the table the TSV-M way, :data:`TSV_EVERY_2D`); ``OWN`` — ``score``
(each task's own head) and every bias (Qwen2's Q / K / V biases): never merged; ``SKIP`` — integer buffers and
stale rotary ``inv_freq`` buffers of old checkpoints.

Layer types (seven): ``attn.query``, ``attn.key``, ``attn.value``, ``attn.output``, ``mlp.gate``, ``mlp.up``,
``mlp.down``. ESD on all seven (§8's text rule); α scales every merged key (:data:`ALPHA_ON_ALL`). Routed types
(ESM++): Q, K, V (they read ``input_layernorm``'s output: one prototype set, one decision) and gate / up (they
read ``post_attention_layernorm``'s output: one decision) — the layers reading a block's normalised hidden state.

Features: the hidden state after the final ``norm`` at the token ``score`` reads — the rightmost token whose id
is not ``pad_token_id`` (transformers' rule, right or left padding alike; without a pad token, the rightmost
token of the attention mask), so ``features @ score.weightᵀ`` are the task's own logits. Inputs are packed
``(N, 2, L)`` token ids and attention mask (:func:`esm_core.models.bert.pack`).
"""
from __future__ import annotations

import re
from typing import Mapping

import torch

from ..device import resolve_device
from .bert import check_config_values, pack, unpack  # noqa: F401  (pack re-exported: the family's input packing)
from .protocol import RecordPoint
from .roles import MATRIX, OWN, SKIP, VECTOR

NAME = "llama"
DESCRIPTION = "Llama-style decoder sequence classifier (Llama, Qwen2, Mistral; last-token pooling, methods §8)"
MODALITY = "text"
FOLDER_FORMAT = "transformers"  # exports: the folder format, also the library that loads it
FOLDER_WRITER = "transformers-decoder"  # its writer in esm_core.package.WRITERS

QUERY = "attn.query"
KEY = "attn.key"
VALUE = "attn.value"
ATTN_OUT = "attn.output"
GATE = "mlp.gate"
UP = "mlp.up"
DOWN = "mlp.down"
LAYER_TYPES = (QUERY, KEY, VALUE, ATTN_OUT, GATE, UP, DOWN)
ESD_TYPES = LAYER_TYPES                              # §8's text rule: ESD on every linear type
ROUTED_TYPES = (QUERY, KEY, VALUE, GATE, UP)         # the layers reading a block's normalised hidden state
PROBED_TYPES = LAYER_TYPES
ALPHA_ON_ALL = True                                  # §8: α scales every merged key
TSV_EVERY_2D = True                                  # §8: the embedding table the TSV-M way
TSV_MIN_RANK = 1                                     # §8: k = max(1, ⌊min(m, n) / T⌋)
PROXY_SAMPLES = 32

PREFIX = "model."
_LINEARS = {"self_attn.q_proj": QUERY, "self_attn.k_proj": KEY, "self_attn.v_proj": VALUE,
            "self_attn.o_proj": ATTN_OUT, "mlp.gate_proj": GATE, "mlp.up_proj": UP, "mlp.down_proj": DOWN}
_LIN = "|".join(map(re.escape, _LINEARS))
_LAYER = re.compile(r"^model\.layers\.(?P<i>\d+)\.(?P<lin>" + _LIN + r")\.weight$")
_ROTARY = re.compile(r"^(?:model\.)?(?:layers\.\d+\.self_attn\.)?rotary_emb\.(?:original_)?inv_freq$")
_FILE_KEY = re.compile(
    r"^(?P<p>model\.)?(?:embed_tokens\.weight|norm\.weight"
    r"|layers\.\d+\.(?:(?:" + _LIN + r")\.(?:weight|bias)|input_layernorm\.weight|post_attention_layernorm\.weight))$")
_HEAD = re.compile(r"^score\.(?:weight|bias)$")


# ---------------------------------------------------------------- key names

def strip_prefix(key: str) -> str:
    return key[len(PREFIX):] if key.startswith(PREFIX) else key


def is_head(key: str) -> bool:
    """The task's own ``score`` head (not part of the feature module)."""
    return bool(_HEAD.match(key))


def layer_type(key: str) -> str | None:
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
    """MATRIX (the seven linears), VECTOR (RMSNorm weights, the embedding table), OWN (score, biases), SKIP."""
    if not (tensor.is_floating_point() or tensor.is_complex()) or _ROTARY.match(key):
        return SKIP
    if is_head(key) or key.endswith(".bias"):
        return OWN
    if tensor.ndim == 2 and layer_type(key) is not None:
        return MATRIX
    return VECTOR


def roles_of(state_dict: Mapping[str, torch.Tensor]) -> dict[str, str]:
    return {k: key_role(k, v) for k, v in state_dict.items()}


def short_key(key: str) -> str:
    """``model.layers.3.mlp.gate_proj.weight`` → ``3 · mlp.gate``."""
    t = layer_type(key)
    return f"{block_index(key)} · {t}" if t is not None else strip_prefix(key)


def input_group(key: str) -> str:
    """K and V read Q's input (``input_layernorm``'s output); up reads gate's (``post_attention_layernorm``'s)."""
    m = _LAYER.match(key)
    if m is None:
        return key
    t = _LINEARS[m.group("lin")]
    if t in (KEY, VALUE):
        return key[:m.start("lin")] + "self_attn.q_proj.weight"
    if t == UP:
        return key[:m.start("lin")] + "mlp.gate_proj.weight"
    return key


def routing_groups(keys) -> list[tuple[str, list[str]]]:
    """Routed keys grouped by input, in execution order (layer, then :data:`LAYER_TYPES` order); a group is named
    by its first member."""
    keys = list(keys)
    bad = [k for k in keys if layer_type(k) is None]
    if bad:
        raise ValueError(f"cannot route {bad[:3]}: not linear weights of a Llama-style decoder layer")
    groups: dict[str, list[str]] = {}
    for k in sorted(keys, key=lambda k: (block_index(k), LAYER_TYPES.index(layer_type(k)))):
        groups.setdefault(input_group(k), []).append(k)
    return [(m[0], m) for m in groups.values()]


def matches(keys) -> bool:
    """True for a Llama-style decoder state dict (``model.``-prefixed or a bare ``LlamaModel``): every layer has
    its seven linear weights, an embedding table is there, and every key is a decoder key, ``score`` or a rotary
    buffer. BERT, ViT and open_clip keys are not of this layout."""
    keys = list(keys)
    prefixes, seen, blocks = set(), set(), set()
    for k in keys:
        if is_head(k) or _ROTARY.match(k):
            continue
        m = _FILE_KEY.match(k)
        if m is None:
            return False
        prefixes.add(m.group("p") or "")
        lm = _LAYER.match(PREFIX + strip_prefix(k))
        if lm:
            seen.add((int(lm.group("i")), _LINEARS[lm.group("lin")]))
            blocks.add(int(lm.group("i")))
    return (len(prefixes) == 1 and bool(blocks) and all((b, t) in seen for b in blocks for t in LAYER_TYPES)
            and any(strip_prefix(k) == "embed_tokens.weight" for k in keys))


def convert(state_dict: Mapping[str, torch.Tensor], name: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The checkpoint under the pool's keys (a bare ``LlamaModel`` gets the ``model.`` prefix; rotary buffers of
    old checkpoints dropped); ValueError naming the file when it is not of this layout."""
    sd = dict(state_dict)
    if not matches(sd):
        raise ValueError(f"{name}: not a Llama-style decoder checkpoint (no complete 'model.layers.N.self_attn."
                         f"q_proj/k_proj/v_proj/o_proj' + 'mlp.gate_proj/up_proj/down_proj' layers and "
                         f"'model.embed_tokens'; found e.g. {sorted(sd)[:4]})")
    return {(k if is_head(k) or k.startswith(PREFIX) else PREFIX + k): v for k, v in sd.items()
            if not _ROTARY.match(k)}


def encoder_state(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The feature module's keys of a pool state dict: the head and stale rotary buffers dropped."""
    return {k: v for k, v in state_dict.items() if not is_head(k) and not _ROTARY.match(k)}


def module_key(key: str) -> str | None:
    """Pool key → the name in a built :class:`DecoderFeatures`' state (the same: ``model.`` + the LlamaModel's
    own name); None for the ``score`` head and rotary buffers."""
    return None if is_head(key) or _ROTARY.match(key) else key


# ---------------------------------------------------------------- config bounds (before anything is built)

SUPPORTED_TYPES = ("llama", "qwen2", "mistral")
MAX_FIELD = {"num_hidden_layers": 256, "hidden_size": 32_768, "num_attention_heads": 1_024,
             "num_key_value_heads": 1_024, "intermediate_size": 262_144, "vocab_size": 1_048_576,
             "head_dim": 1_024, "max_position_embeddings": 16_777_216}
ACTIVATIONS = ("silu", "swish", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")
_META_KEYS = ("model_type", "architectures", "_name_or_path", "transformers_version", "auto_map")


def _whole(cfg: Mapping, name: str, lo: int, hi: int) -> int:
    v = cfg.get(name)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        shown = repr(v)[:40] if not isinstance(v, int) or abs(v) < 10 ** 15 else f"about 10^{len(str(abs(v))) - 1}"
        raise ValueError(f"config.json: {name} = {shown} must be a whole number from {lo} to {hi:,}")
    return v


def check_config(config) -> dict:
    """A bounded copy of a decoder ``config.json`` (hostile until checked): ``model_type`` one of
    :data:`SUPPORTED_TYPES`, every number finite, each size field a whole number within :data:`MAX_FIELD`, the
    heads dividing the width (unless ``head_dim`` is given), the KV heads dividing the heads, an even
    ``head_dim`` (rotary), a known activation, ``rms_norm_eps`` in (0, 1), ``pad_token_id`` in the vocabulary.
    Nothing is built, no transformers config made. Raises ValueError naming the field."""
    from transformers import PretrainedConfig
    if isinstance(config, PretrainedConfig):
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise ValueError(f"config.json must be a JSON object, got {type(config).__name__}")
    check_config_values(config)
    mt = config.get("model_type")
    if mt not in SUPPORTED_TYPES:
        raise ValueError(f"config.json: model_type {str(mt)[:40]!r} is not a Llama-style decoder this server reads "
                         f"(one of {', '.join(SUPPORTED_TYPES)})")
    out = {k: v for k, v in config.items() if k not in _META_KEYS}
    out["model_type"] = mt
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if name not in config:
            raise ValueError(f"config.json: {name} is missing")
        out[name] = _whole(config, name, 1, MAX_FIELD[name])
    H, heads = out["hidden_size"], out["num_attention_heads"]
    if config.get("num_key_value_heads") is None:
        out["num_key_value_heads"] = heads
    kv = out["num_key_value_heads"] = _whole(out, "num_key_value_heads", 1, MAX_FIELD["num_key_value_heads"])
    if config.get("head_dim") is None:
        if heads > H or H % heads:
            raise ValueError(f"config.json: num_attention_heads = {heads:,} does not divide hidden_size = {H:,}")
        out.pop("head_dim", None)
        hd = H // heads
    else:
        hd = _whole(config, "head_dim", 1, MAX_FIELD["head_dim"])
    if kv > heads or heads % kv:
        raise ValueError(f"config.json: num_key_value_heads = {kv:,} does not divide num_attention_heads = "
                         f"{heads:,} (grouped-query attention shares each K/V head among a whole number of heads)")
    if hd % 2:
        raise ValueError(f"config.json: the head width {hd} is odd; rotary position embeddings need an even one")
    if "max_position_embeddings" in config:
        out["max_position_embeddings"] = _whole(config, "max_position_embeddings", 1,
                                                MAX_FIELD["max_position_embeddings"])
    act = config.get("hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise ValueError(f"config.json: hidden_act = {repr(act)[:40]} is not one of {', '.join(ACTIVATIONS)}")
    eps = config.get("rms_norm_eps", 1e-6)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise ValueError(f"config.json: rms_norm_eps = {repr(eps)[:40]} must be a number between 0 and 1")
    p = config.get("attention_dropout", 0.0)
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
        raise ValueError(f"config.json: attention_dropout = {repr(p)[:40]} must be a probability from 0 to 1")
    for name in ("attention_bias", "mlp_bias"):
        if name in config and not isinstance(config[name], bool):
            raise ValueError(f"config.json: {name} = {repr(config[name])[:40]} must be true or false")
    pad = config.get("pad_token_id")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or not 0 <= pad < out["vocab_size"]):
        raise ValueError(f"config.json: pad_token_id = {repr(pad)[:40]} is not a token of the vocabulary "
                         f"(vocab_size {out['vocab_size']:,})")
    lt = config.get("layer_types")
    if lt is not None and (not isinstance(lt, list) or len(lt) != out["num_hidden_layers"]):
        raise ValueError(f"config.json: layer_types must list one entry per layer ({out['num_hidden_layers']})")
    return out


def head_dim(cfg: Mapping) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def param_count(cfg: Mapping) -> int:
    """About the parameters of the feature module of a checked config (no head; biases left out)."""
    H, F, L, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    q, kv = cfg["num_attention_heads"] * head_dim(cfg), cfg["num_key_value_heads"] * head_dim(cfg)
    return V * H + L * (2 * H * q + 2 * H * kv + 3 * H * F + 2 * H) + H


def _checkpoint_sizes(sd: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, str]]:
    """``{config field: (value, what in the checkpoint shows it)}`` read from a checkpoint's own tensors."""
    out = {}
    idx = {int(m.group(1)) for k in sd if (m := re.match(r"^model\.layers\.(\d+)\.", k))}
    if idx:
        out["num_hidden_layers"] = (len(idx), f"it holds {len(idx)} layers (model.layers.{min(idx)} … {max(idx)})")

    def shape(key, dim, field):
        v = sd.get(key)
        if isinstance(v, torch.Tensor) and v.ndim == 2:
            out.setdefault(field, (int(v.shape[dim]), f"{key} has shape {tuple(v.shape)}"))
    shape("model.embed_tokens.weight", 0, "vocab_size")
    shape("model.embed_tokens.weight", 1, "hidden_size")
    first = f"model.layers.{min(idx) if idx else 0}."
    shape(first + "mlp.gate_proj.weight", 0, "intermediate_size")
    shape(first + "self_attn.q_proj.weight", 0, "q_width")
    shape(first + "self_attn.k_proj.weight", 0, "kv_width")
    return out


def check_shapes(state_dict: Mapping[str, torch.Tensor], config, max_params: int | None = None):
    """(checked config dict, transformers config) after comparing the checkpoint (pool keys) with ``config``:
    first its size fields against the checkpoint's own sizes and ``max_params`` (nothing made yet), then key by
    key against the module transformers builds on the meta device. Raises ValueError naming what is wrong."""
    cfg = check_config(config)
    if max_params is not None and param_count(cfg) > max_params:
        raise ValueError(f"config.json describes a model of about {param_count(cfg) / 1e6:,.0f} M parameters, "
                         f"more than the {max_params / 1e6:,.0f} M this server builds")
    sd = encoder_state(state_dict)
    hd = head_dim(cfg)
    want = dict(cfg, q_width=cfg["num_attention_heads"] * hd, kv_width=cfg["num_key_value_heads"] * hd)
    names = {"q_width": "num_attention_heads × head_dim", "kv_width": "num_key_value_heads × head_dim"}
    for field, (have, why) in _checkpoint_sizes(sd).items():
        if want[field] != have:
            raise ValueError(f"config.json: {names.get(field, field)} = {want[field]:,} does not fit the "
                             f"checkpoint: {why}")
    tcfg = transformers_config(cfg)
    expected = _expected_shapes(tcfg)

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
        raise ValueError(f"checkpoint does not fit the {cfg['model_type']} config.json: " + "; ".join(parts))
    return cfg, tcfg


def transformers_config(cfg: Mapping):
    """The transformers config of a checked config dict (:func:`check_config` first)."""
    from transformers import AutoConfig
    try:
        return AutoConfig.for_model(cfg["model_type"], **{k: v for k, v in cfg.items() if k != "model_type"})
    except Exception as e:                      # transformers' own validation (not always a ValueError)
        msg = str(e).strip().splitlines()[-1].strip() if str(e).strip() else type(e).__name__
        raise ValueError(f"config.json: transformers cannot read it ({msg[:200]})") from None


def _meta_model(tcfg):
    from transformers import AutoModel
    with torch.device("meta"):
        return AutoModel.from_config(tcfg)


def _expected_shapes(tcfg) -> dict[str, tuple[int, ...]]:
    return {PREFIX + k: tuple(v.shape) for k, v in _meta_model(tcfg).state_dict().items()}


# ---------------------------------------------------------------- building

def last_token(ids: torch.Tensor, mask: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """(B,) index of the token a sequence-classification head reads: the rightmost token whose id is not the pad
    token (transformers' rule, either padding side), or without a pad token the rightmost real token."""
    real = (ids != pad_token_id) if pad_token_id is not None else mask.bool()
    pos = torch.arange(ids.shape[-1], device=ids.device, dtype=torch.int32)
    return (pos * real.to(torch.int32)).argmax(-1)


class DecoderFeatures(torch.nn.Module):
    """A built decoder (``LlamaModel`` / ``Qwen2Model`` / ``MistralModel``, as ``.model``) as the feature module:
    ``features(x) -> (B, hidden)`` on packed (B, 2, L) inputs — the final-norm hidden state at :func:`last_token`,
    what ``score`` reads."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.pooling = "last"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = unpack(x)
        dev = next(self.model.parameters()).device
        ids, mask = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
        h = self.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        idx = last_token(ids, mask, self.model.config.pad_token_id)
        return h[torch.arange(h.shape[0], device=dev), idx]


def is_model(module: torch.nn.Module) -> bool:
    return isinstance(module, DecoderFeatures)


def _model(module: torch.nn.Module) -> torch.nn.Module:
    if not is_model(module):
        raise ValueError(f"expected a decoder feature module (llama.DecoderFeatures), got a {type(module).__name__}")
    return module.model


def build_model(state_dict: Mapping[str, torch.Tensor], config, *, device: str | torch.device = "cpu",
                share: bool = False, pooling: str = "last", max_params: int | None = None) -> DecoderFeatures:
    """The feature module holding ``state_dict`` (pool keys; ``score`` ignored), eval mode, float32: the config
    checked against the checkpoint first (:func:`check_shapes`), then built on the meta device and the tensors
    assigned (no random init); the rotary tables (not in checkpoints) are computed from the config. ``share``: it
    holds ``state_dict``'s float32 tensors themselves. ``pooling``: only ``"last"`` (what ``score`` reads)."""
    if pooling != "last":
        raise ValueError(f"a decoder sequence classifier reads the last token: pooling must be 'last', got "
                         f"{pooling!r}")
    _, tcfg = check_shapes(state_dict, config, max_params)
    model = _meta_model(tcfg)
    sd = {k[len(PREFIX):]: v.to(torch.float32, copy=not share) for k, v in encoder_state(state_dict).items()}
    model.load_state_dict(sd, strict=True, assign=True)
    model.rotary_emb = type(model.rotary_emb)(config=model.config)      # non-persistent buffers: made on the CPU
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):   # pragma: no cover  (a buffer added
        raise ValueError("the decoder module holds tensors the checkpoint does not give")   # by a newer transformers)
    return DecoderFeatures(model).to(resolve_device(device)).eval()


build = build_model


def model_keys(module: torch.nn.Module) -> list[str]:
    """The pool keys of a built feature module's state (they are its state dict's names)."""
    _model(module)
    return list(module.state_dict())


def load_state(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Another checkpoint of the same shapes into a built feature module (strict; ``score`` ignored)."""
    _model(module).load_state_dict({k[len(PREFIX):]: v.to(torch.float32)
                                    for k, v in encoder_state(state_dict).items()}, strict=True)


def load_own(module: torch.nn.Module, task: Mapping[str, torch.Tensor]) -> None:
    """Task ``task``'s OWN values that live in the feature module (its biases, e.g. Qwen2's Q / K / V biases) into
    a built or routed module, in place (§8). Its ``score`` is its head, outside the module."""
    params = dict(_model(module).named_parameters())
    with torch.no_grad():
        for k, v in encoder_state(task).items():
            if key_role(k, v) != OWN:
                continue
            p = params.get(k[len(PREFIX):])
            if p is None:
                continue
            if tuple(p.shape) != tuple(v.shape):
                raise ValueError(f"{k!r}: task value {tuple(v.shape)} does not fit the model's {tuple(p.shape)}")
            p.copy_(v.to(p.device, p.dtype))


def saved_config(module: torch.nn.Module) -> dict:
    """What an ESM++ file records to rebuild the feature module: the checked config and the pooling."""
    c = _model(module).config
    return {"model_config": check_config({**c.to_dict(), "model_type": c.model_type}), "pooling": "last"}


def rebuild(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> DecoderFeatures:
    cfg = config.get("model_config") if isinstance(config, Mapping) else None
    if not isinstance(cfg, Mapping):
        raise ValueError("an ESM++ file of a decoder model needs its 'model_config'")
    return build_model(state_dict, cfg)


# ---------------------------------------------------------------- probe and ESM++ surgery

def sample_mask(x: torch.Tensor) -> torch.Tensor:
    """(B, L) bool of the real tokens of packed (B, 2, L) inputs (padding left out of the statistics)."""
    return unpack(x)["attention_mask"].bool()


def linear_of(module: torch.nn.Module, key: str) -> tuple[str, torch.nn.Module]:
    """(path inside ``module``, the ``nn.Linear`` or routed layer) of the layer whose weight is ``key``."""
    if layer_type(key) is None:
        raise ValueError(f"{key!r} is not a linear weight of a Llama-style decoder layer")
    path = key[: -len(".weight")]
    try:
        return path, module.get_submodule(path)
    except AttributeError:
        raise ValueError(f"the model has no layer for {key!r}") from None


def record_points(module: torch.nn.Module, keys) -> list:
    """One :class:`~esm_core.models.protocol.RecordPoint` per input group of ``keys``: the input of the group key's
    linear (Q, K, V: q_proj's; gate, up: gate_proj's), (B, L, d) batch-first."""
    _model(module)
    return [RecordPoint(g, linear_of(module, g)[1], "input", True)
            for g in dict.fromkeys(input_group(k) for k in keys)]


def route(module: torch.nn.Module, key: str, make) -> None:
    """Replace the linear layer of weight ``key`` by ``make(weight, bias, batch_first=True)`` at the same path."""
    _model(module)
    path, old = linear_of(module, key)
    if not isinstance(old, torch.nn.Linear):
        raise ValueError(f"routed layer {key!r} is a {type(old).__name__}, not an nn.Linear")
    module.set_submodule(path, make(old.weight, old.bias, True))


def logits(features: torch.Tensor, head: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """A task's logits from the features and its ``score`` head (``{"weight": C×d}``, an optional ``"bias"``)."""
    out = features @ head["weight"].to(features.dtype).T
    b = head.get("bias")
    return out if b is None else out + b.to(features.dtype)



# ---------------------------------------------------------------- uploads (pools/upload_text: the optional text names)

SEQUENCE_POOLING = "last"                            # what ``score`` reads (build_model's only pooling)
TOKENIZER_KIND = "Llama-style decoder"
# Llama 2 / Mistral (sentencepiece BPE written out in tokenizer.json), Llama 3 and Qwen2 (byte-level BPE), GPT-2-style
TOKENIZER_CLASSES = {"LlamaTokenizer", "LlamaTokenizerFast", "Qwen2Tokenizer", "Qwen2TokenizerFast", "GPT2Tokenizer",
                     "GPT2TokenizerFast"}
DEFAULT_POSITIONS = 2048                             # transformers' LlamaConfig default max_position_embeddings


def sequence_head(sd: Mapping[str, torch.Tensor], task: str) -> dict:
    """The task's own ``score`` head from its checkpoint: ``{"weight": C×d}`` and ``"bias"`` when it has one."""
    w, b = sd.get("score.weight"), sd.get("score.bias")
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"task {task!r}: its checkpoint has no 'score' head — upload the "
                         "*ForSequenceClassification checkpoint of each task (LlamaForSequenceClassification, ...)")
    if w.ndim != 2 or not w.is_floating_point() or (b is not None and (b.ndim != 1 or b.shape[0] != w.shape[0])):
        raise ValueError(f"task {task!r}: its score head has the shapes {tuple(w.shape)}"
                         f"{'' if b is None else f' / bias {tuple(b.shape)}'}; expected C × hidden (and C)")
    head = {"weight": w.float()}
    if b is not None:
        head["bias"] = b.float()
    return head


def max_tokens(config: Mapping) -> int:
    """The most tokens one input may have: the config's ``max_position_embeddings`` (checked config)."""
    return int(config.get("max_position_embeddings") or DEFAULT_POSITIONS)


def prepare_tokenizer(tokenizer, config: Mapping) -> list[str]:
    """Make an uploaded tokenizer pad as the task's own classifier expects, in place; notes for the user.

    * Right padding, whatever its config says: with causal attention a right-padded sentence's tokens see
      exactly what they would alone (left padding shifts the rotary positions, so a sentence's score would
      depend on the longest sentence of its batch).
    * The pad token is ``config.pad_token_id``'s token when the config names one (``score`` reads the last
      token that is not it); else the tokenizer's own; else its end-of-sequence token (the last real token is
      then found from the attention mask). A tokenizer with none of these is refused."""
    notes = []
    if getattr(tokenizer, "padding_side", "right") != "right":
        notes.append(f"tokenizer: padding_side {tokenizer.padding_side!r} → 'right' (causal attention: a sentence's "
                     "features then do not depend on its batch)")
    tokenizer.padding_side = "right"
    pad = config.get("pad_token_id")
    if pad is not None:
        if not 0 <= int(pad) < len(tokenizer):
            raise ValueError(f"config.json: pad_token_id = {pad} is not a token of the uploaded tokenizer "
                             f"({len(tokenizer):,} tokens)")
        if tokenizer.pad_token_id != pad:
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(int(pad))
            notes.append(f"tokenizer: pad token = config.json's pad_token_id {pad} ({tokenizer.pad_token!r})")
    elif tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the uploaded tokenizer has no pad token and no end-of-sequence token, and config.json "
                             "no pad_token_id: sentences of different lengths cannot be batched")
        tokenizer.pad_token = tokenizer.eos_token
        notes.append(f"tokenizer: no pad token; padding with its end-of-sequence token {tokenizer.eos_token!r} "
                     "(the last real token is read from the attention mask)")
    return notes
