"""What esm_core knows about Hugging Face BERT-family encoders (methods §8).

Covers whatever ``transformers.AutoModel`` builds from a BERT-style
``config.json``: BERT, RoBERTa, MiniLM (``model_type`` "bert"), DistilBERT.
Key names may carry a ``bert.`` / ``roberta.`` / ``distilbert.`` prefix (the
``*ForSequenceClassification`` layout) or none (the bare ``AutoModel``).
Plain module-level constants and functions, like :mod:`esm_core.models.openclip_vit`.

Roles (methods §8 — "biases and classifier heads are excluded from merging and
come from each task's own model"):

* ``MATRIX`` — the six linear weights of every encoder layer (Q, K, V,
  attention output, intermediate, output). SVD / ESD methods act on them.
* ``VECTOR`` — LayerNorm weights and the embedding tables (word, position,
  token type). The baselines average / add them like every non-matrix key;
  ESM follows the reference's RoBERTa code (:data:`TSV_EVERY_2D`): every 2-D
  key it does not decompose — the embedding tables included — goes the TSV-M
  way with ``k = max(1, ⌊min(m, n) / T⌋)`` triplets per task
  (:data:`TSV_MIN_RANK`); LayerNorm weights get the mean of the task vectors.
* ``OWN`` — every bias (linear and LayerNorm) and every head (``pooler``,
  ``classifier``, ``pre_classifier``, ``lm_head``, ``cls``): never merged;
  evaluating task t uses task t's own values (:func:`with_own`). A single
  exported merged model holds the **base's** values for these keys (the merge
  leaves OWN keys out, so they are copied from the base).
* ``SKIP`` — integer / bool buffers (``position_ids``): copied from the base.

Layer types (six, independent of the layer index and of the family's
spelling; the inter-layer scaling of ESM groups by them): ``attn.query``,
``attn.key``, ``attn.value``, ``attn.output``, ``ffn.intermediate``,
``ffn.output``. ESD runs on all six (§8). α scales every merged key
(:data:`ALPHA_ON_ALL`: ``esm_core.merge`` finds this family from the key
names and applies α to every merged key, and leaves OWN keys at the base's
values, with no explicit roles).

Routed types (ESM++, §7 mapped to §8): ``attn.query``, ``attn.key``,
``attn.value`` and ``ffn.intermediate`` — the layers that read a block's
normalised hidden state, as ``attn.in_proj_weight`` and ``mlp.c_fc`` do in a
ViT. Q, K and V read the *same* input (the previous layer's output), so
they share one prototype and one routing decision per layer
(:func:`input_group`); ``ffn.intermediate`` reads the attention sub-layer's
output. Inputs, prototypes and routing means exclude padding tokens
(:func:`token_mask`, :func:`masked_rows`, :func:`sample_means`).
"""
from __future__ import annotations

import math
import re
from contextlib import contextmanager
from typing import Callable, Mapping

import torch

from .protocol import RecordPoint
from .roles import MATRIX, OWN, SKIP, VECTOR  # noqa: F401  (re-exported)

FAMILY = NAME = "bert"

QUERY = "attn.query"
KEY = "attn.key"
VALUE = "attn.value"
ATTN_OUT = "attn.output"
INTERMEDIATE = "ffn.intermediate"
OUTPUT = "ffn.output"
LAYER_TYPES = (QUERY, KEY, VALUE, ATTN_OUT, INTERMEDIATE, OUTPUT)
ESD_TYPES = LAYER_TYPES                                   # §8: ESD on all six types
ROUTED_TYPES = (QUERY, KEY, VALUE, INTERMEDIATE)          # layers reading a block's hidden state (see above)
ALPHA_ON_EVERY_KEY = ALPHA_ON_ALL = True                  # §8: α scales every merged key, not only ESD keys
PROXY_SAMPLES = 32                                        # §8: 32 validation sentences per task
TSV_EVERY_2D = True             # §8: ESM merges every 2-D key it does not decompose (embedding tables too) by TSV-M
TSV_MIN_RANK = 1                # §8: TSV-M keeps max(1, ⌊min(m, n) / T⌋) triplets per task (the reference's max)

PREFIXES = ("bert.", "roberta.", "distilbert.")
# family spelling of each linear layer → canonical type
_BERT_LINEARS = {
    "attention.self.query": QUERY, "attention.self.key": KEY, "attention.self.value": VALUE,
    "attention.output.dense": ATTN_OUT, "intermediate.dense": INTERMEDIATE, "output.dense": OUTPUT,
}
_DISTIL_LINEARS = {
    "attention.q_lin": QUERY, "attention.k_lin": KEY, "attention.v_lin": VALUE,
    "attention.out_lin": ATTN_OUT, "ffn.lin1": INTERMEDIATE, "ffn.lin2": OUTPUT,
}
_PFX = r"(?P<prefix>(?:bert|roberta|distilbert)\.)?"
_BLOCK = re.compile(
    r"^" + _PFX + r"(?:encoder\.layer\.(?P<i>\d+)\.(?P<bert>" + "|".join(map(re.escape, _BERT_LINEARS)) + r")"
    r"|transformer\.layer\.(?P<j>\d+)\.(?P<distil>" + "|".join(map(re.escape, _DISTIL_LINEARS)) + r"))"
    r"\.weight$")
# Anything a BERT-family checkpoint may hold besides the encoder (used by matches()).
_BODY = re.compile(r"^" + _PFX + r"(?:embeddings\.|encoder\.layer\.\d+\.|transformer\.layer\.\d+\.)")
_HEAD = re.compile(r"^(?:pooler\.|classifier\.|pre_classifier\.|lm_head\.|cls\.|qa_outputs\.|vocab_)"
                   r"|^(?:bert|roberta|distilbert)\.pooler\.")
# Buffers that transformers no longer keeps in state dicts but old checkpoints hold.
_NON_PERSISTENT = ("embeddings.position_ids", "embeddings.token_type_ids")


# ---------------------------------------------------------------- key names

def _match(key: str):
    return _BLOCK.match(key)


def strip_prefix(key: str) -> str:
    """``roberta.encoder.layer.0...`` → ``encoder.layer.0...`` (keys of the bare ``AutoModel``)."""
    for p in PREFIXES:
        if key.startswith(p):
            return key[len(p):]
    return key


def is_head(key: str) -> bool:
    """Classifier / pooler / LM-head keys (not read by the mean-pooled features)."""
    return bool(_HEAD.match(key))


def key_role(key: str, tensor: torch.Tensor) -> str:
    """Role of one state-dict entry: MATRIX, VECTOR, OWN or SKIP (see the module docstring)."""
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return SKIP
    if is_head(key) or key.endswith(".bias"):
        return OWN
    if tensor.ndim == 2 and layer_type(key) is not None:
        return MATRIX
    return VECTOR


def roles_of(state_dict: Mapping[str, torch.Tensor]) -> dict[str, str]:
    return {k: key_role(k, v) for k, v in state_dict.items()}


def with_own(merged: Mapping[str, torch.Tensor], task: Mapping[str, torch.Tensor],
             roles: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """The merged state dict with task ``task``'s own values on its OWN keys (biases, heads): §8 evaluation."""
    return {k: (task[k] if roles.get(k) == OWN else v) for k, v in merged.items()}


def scale_updates(updates: Mapping[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """α on every merged key (§8): use with ``merge_updates(..., alpha=1)`` then ``apply_updates``."""
    return {k: v * alpha for k, v in updates.items()}


def layer_type(key: str) -> str | None:
    """Canonical layer type of an encoder linear weight (``"attn.query"``, ...), else None."""
    m = _match(key)
    if m is None:
        return None
    return _BERT_LINEARS[m.group("bert")] if m.group("bert") else _DISTIL_LINEARS[m.group("distil")]


def block_index(key: str) -> int | None:
    m = _match(key)
    if m is None:
        return None
    return int(m.group("i") if m.group("i") is not None else m.group("j"))


def layer_types_of(keys) -> dict[str, str]:
    """{key: layer type} for every encoder linear weight among ``keys``."""
    return {k: t for k in keys if (t := layer_type(k)) is not None}


def esd_keys(keys, types=ESD_TYPES) -> list[str]:
    """Keys whose layer type is in ``types`` (default: all six, §8)."""
    return [k for k in keys if layer_type(k) in types]


def routed_keys(keys, types=ROUTED_TYPES) -> list[str]:
    return [k for k in keys if layer_type(k) in types]


def input_group(key: str) -> str:
    """Keys that read the same input share a group: K and V → the query key of their layer; others → themselves."""
    t = layer_type(key)
    if t in (KEY, VALUE):
        m = _match(key)
        if m.group("bert"):
            return key.replace(m.group("bert"), "attention.self.query")
        return key.replace(m.group("distil"), "attention.q_lin")
    return key


def routing_groups(keys) -> list[tuple[str, list[str]]]:
    """Routed keys grouped by input, in execution order: ``[(group name, [member keys]), ...]``.

    Keys that read the same input (Q, K, V of one layer: :func:`input_group`) form one group; its name is
    its first member in execution order (the query key when Q is routed), so it is itself a routed key.
    Order: by layer, then :data:`LAYER_TYPES` order (Q, K, V, attention output, intermediate, output)."""
    keys = list(keys)
    bad = [k for k in keys if layer_type(k) is None]
    if bad:
        raise ValueError(f"cannot route {bad[:3]}: not linear weights of a BERT-family encoder layer")
    ordered = sorted(keys, key=lambda k: (block_index(k), LAYER_TYPES.index(layer_type(k))))
    groups: dict[str, list[str]] = {}
    for k in ordered:
        groups.setdefault(input_group(k), []).append(k)
    return [(members[0], members) for members in groups.values()]


def short_key(key: str) -> str:
    """``roberta.encoder.layer.3.intermediate.dense.weight`` → ``3 · ffn.intermediate``."""
    t = layer_type(key)
    if t is not None:
        return f"{block_index(key)} · {t}"
    return strip_prefix(key)


def prefix_of(state_dict) -> str | None:
    """The key prefix of a BERT-family state dict ("", "bert.", ...), or None when it is not one."""
    found = {}
    for k in state_dict:
        m = _match(k)
        if m is not None:
            found.setdefault(m.group("prefix") or "", set()).add((block_index(k), layer_type(k)))
    for p, seen in found.items():
        blocks = {b for b, _ in seen}
        if all((b, t) in seen for b in blocks for t in LAYER_TYPES):
            return p
    return None


def matches(state_dict) -> bool:
    """True for a BERT-family state dict: every encoder layer has all six linear weights (one prefix, or
    none), and every key is an embedding, encoder, pooler / head key of that layout."""
    p = prefix_of(state_dict)
    if p is None:
        return False
    for k in state_dict:
        if is_head(k):
            continue
        m = _BODY.match(k)
        if m is None or (m.group("prefix") or "") != p:
            return False
    return True


# ---------------------------------------------------------------- building

def config_of(config) -> "transformers.PretrainedConfig":  # noqa: F821
    """A ``transformers`` config from a ``config.json`` dict (needs ``model_type``) or a config object."""
    from transformers import AutoConfig, PretrainedConfig
    if isinstance(config, PretrainedConfig):
        return config
    if not isinstance(config, Mapping) or "model_type" not in config:
        raise ValueError("a BERT-family config must be a config.json dict with 'model_type' "
                         "(e.g. 'bert', 'roberta', 'distilbert')")
    c = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "_name_or_path",
                                                      "transformers_version")}
    return AutoConfig.for_model(config["model_type"], **c)


# ---------------------------------------------------------------- config bounds (before anything is built)
#
# An uploaded config.json decides how large a model transformers builds, even on the meta device (160,000 layers
# took minutes and gigabytes before a single shape was compared). So every size field is checked first: a whole
# number under an absolute cap, and equal to what the uploaded checkpoint itself holds (its layer count, its
# tensors' shapes); every number finite; only then is anything built.

SUPPORTED_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "distilbert")
# absolute caps on the size fields (far above every published BERT-family encoder)
MAX_FIELD = {"layers": 128, "width": 16_384, "heads": 1_024, "ffn": 65_536, "vocab": 1_048_576,
             "positions": 65_536, "type_vocab": 1_024}
MAX_CONFIG_INT = 2 ** 31 - 1           # any whole number in a config (ids, sizes, flags)
MAX_CONFIG_DEPTH = 8                   # nesting of a config's objects / lists
MAX_CONFIG_ENTRIES = 10_000            # values in a config, all levels together
# (size, config field) per family; the checkpoint tensor that shows each size is in _checkpoint_sizes
_SIZE_FIELDS = {
    "bert": (("layers", "num_hidden_layers"), ("width", "hidden_size"), ("heads", "num_attention_heads"),
             ("ffn", "intermediate_size"), ("vocab", "vocab_size"), ("positions", "max_position_embeddings"),
             ("type_vocab", "type_vocab_size")),
    "distilbert": (("layers", "n_layers"), ("width", "dim"), ("heads", "n_heads"), ("ffn", "hidden_dim"),
                   ("vocab", "vocab_size"), ("positions", "max_position_embeddings")),
}
_PROBABILITIES = ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout", "dropout",
                  "attention_dropout", "qa_dropout", "seq_classif_dropout")
_LAYER_INDEX = re.compile(r"^(?:encoder|transformer)\.layer\.(\d+)\.")


def check_config_values(config: Mapping, what: str = "config.json") -> None:
    """Refuse a config holding a non-finite number (``1e400`` parses as inf), a whole number beyond
    :data:`MAX_CONFIG_INT`, or more nesting / values than a model config has; the message names the field."""
    stack, seen = [("", config, 0)], 0
    while stack:
        path, v, depth = stack.pop()
        seen += 1
        if seen > MAX_CONFIG_ENTRIES:
            raise ValueError(f"{what} holds more than {MAX_CONFIG_ENTRIES:,} values: not a model config")
        if depth > MAX_CONFIG_DEPTH:
            raise ValueError(f"{what}: {path} is nested more than {MAX_CONFIG_DEPTH} levels deep: not a model config")
        if isinstance(v, Mapping):
            stack += [(f"{path}.{k}" if path else str(k), x, depth + 1) for k, x in v.items()]
        elif isinstance(v, (list, tuple)):
            stack += [(f"{path}[{i}]", x, depth + 1) for i, x in enumerate(v)]
        elif isinstance(v, bool):
            continue
        elif isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{what}: {path} = {v} is not a finite number")
        elif isinstance(v, int) and abs(v) > MAX_CONFIG_INT:
            raise ValueError(f"{what}: {path} = {_short_int(v)} is out of range (at most {MAX_CONFIG_INT:,})")


def _short_int(v: int) -> str:
    return str(v) if abs(v) < 10 ** 15 else f"{'-' if v < 0 else ''}about 10^{len(str(abs(v))) - 1}"


def _checkpoint_sizes(sd: Mapping[str, torch.Tensor], family: str) -> dict[str, tuple[int, str]]:
    """``{size: (value, what shows it)}`` read from the checkpoint's own tensors (bare AutoModel keys)."""
    out = {}
    idx = {int(m.group(1)) for k in sd if (m := _LAYER_INDEX.match(k))}
    layer = "transformer.layer" if family == "distilbert" else "encoder.layer"
    if idx:
        out["layers"] = (len(idx), f"it holds {len(idx)} layers ({layer}.{min(idx)} … {layer}.{max(idx)})")
    else:
        out["layers"] = (0, f"it holds no {layer}.N keys")

    def shape(key, dim, size):
        v = sd.get(key)
        if isinstance(v, torch.Tensor) and v.ndim == 2:
            out.setdefault(size, (int(v.shape[dim]), f"{key} has shape {tuple(v.shape)}"))
    shape("embeddings.word_embeddings.weight", 0, "vocab")
    shape("embeddings.word_embeddings.weight", 1, "width")
    shape("embeddings.position_embeddings.weight", 0, "positions")
    shape("embeddings.token_type_embeddings.weight", 0, "type_vocab")
    first = min(idx) if idx else 0
    shape(f"{layer}.{first}.{'ffn.lin1' if family == 'distilbert' else 'intermediate.dense'}.weight", 0, "ffn")
    return out


_ABSENT = object()


def _check_field_values(get, family: str, have: Mapping[str, tuple[int, str]]) -> None:
    """Each size field a whole number from 1 to its cap, ``layer_norm_eps`` in (0, 1), dropouts in [0, 1];
    ``get(name)`` gives a field's value (``_ABSENT``: not given, not checked)."""
    for what, name in _SIZE_FIELDS[family]:
        v = get(name)
        if v is _ABSENT:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_FIELD[what]:
            shown = _short_int(v) if isinstance(v, int) and not isinstance(v, bool) else repr(v)[:40]
            raise ValueError(f"config.json: {name} = {shown} must be a whole number from 1 to "
                             f"{MAX_FIELD[what]:,}" + (f" (the checkpoint: {have[what][1]})" if what in have else ""))
    eps = get("layer_norm_eps") if family == "bert" else _ABSENT
    if eps is not _ABSENT and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1):
        raise ValueError(f"config.json: layer_norm_eps = {eps!r} must be a number between 0 and 1")
    for name in _PROBABILITIES:
        p = get(name)
        if p is not _ABSENT and p is not None and (isinstance(p, bool) or not isinstance(p, (int, float))
                                                   or not 0 <= p <= 1):
            raise ValueError(f"config.json: {name} = {p!r} must be a probability from 0 to 1")


def check_config(config, state_dict: Mapping[str, torch.Tensor], max_params: int | None = None):
    """The ``transformers`` config of ``config`` after checking, without building anything, that it fits the
    checkpoint ``state_dict`` (bare AutoModel keys, :func:`encoder_state`): every number finite, every size field
    (layers, width, heads, feed-forward width, vocabulary, positions, token types) a whole number within
    :data:`MAX_FIELD` and equal to what the checkpoint holds, the heads dividing the width, ``layer_norm_eps``
    in (0, 1), dropout probabilities in [0, 1], and the parameter count within ``max_params``. Raises ValueError
    naming the field, its value and what the checkpoint says."""
    from transformers import PretrainedConfig
    raw = config.to_dict() if isinstance(config, PretrainedConfig) else config
    if isinstance(raw, Mapping):
        check_config_values(raw)
        mt = raw.get("model_type")
        if "model_type" in raw and mt not in SUPPORTED_TYPES:
            raise ValueError(f"config.json: model_type {str(mt)[:40]!r} is not a BERT-family encoder this server "
                             f"reads (one of {', '.join(SUPPORTED_TYPES)})")
    family = "distilbert" if isinstance(raw, Mapping) and raw.get("model_type") == "distilbert" else "bert"
    have = _checkpoint_sizes(state_dict, family)
    if isinstance(raw, Mapping):                # the fields it gives, before transformers reads (and judges) them
        _check_field_values(lambda name: raw.get(name, _ABSENT), family, have)
    try:
        cfg = config_of(config)
    except Exception as e:                       # transformers' own checks (a strict-dataclass error is no ValueError)
        if not isinstance(raw, Mapping) or "model_type" not in raw:
            raise                                # config_of's own message: no model_type
        msg = str(e).strip().splitlines()[-1].strip() if str(e).strip() else type(e).__name__
        raise ValueError(f"config.json: transformers cannot read it ({msg[:200]})") from None
    family = "distilbert" if cfg.model_type == "distilbert" else "bert"
    have = _checkpoint_sizes(state_dict, family)
    _check_field_values(lambda name: getattr(cfg, name, None), family, have)
    size = {}
    for what, name in _SIZE_FIELDS[family]:
        v = getattr(cfg, name, None)
        if what in have and have[what][0] != v:
            why = (("missing keys of layers" if v > have[what][0] else "unexpected keys of layers")
                   if what == "layers" else "shape mismatch")
            raise ValueError(f"config.json: {name} = {v:,} does not fit the checkpoint: {have[what][1]} ({why})")
        size[what] = v
    if size["heads"] > size["width"] or size["width"] % size["heads"]:
        w, h = _SIZE_FIELDS[family][1][1], _SIZE_FIELDS[family][2][1]
        raise ValueError(f"config.json: {h} = {size['heads']:,} does not divide {w} = {size['width']:,}")
    pad = getattr(cfg, "pad_token_id", None)
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or not 0 <= pad < size["vocab"]):
        raise ValueError(f"config.json: pad_token_id = {pad!r} is not a token of the vocabulary "
                         f"(vocab_size {size['vocab']:,})")
    if max_params is not None:
        H, ffn, L = size["width"], size["ffn"], size["layers"]
        emb = (size["vocab"] + size["positions"] + size.get("type_vocab", 0)) * H + 2 * H
        per_layer = 4 * (H * H + H) + 2 * (ffn * H) + ffn + H + 4 * H
        n = emb + L * per_layer + (H * H + H)
        if n > max_params:
            raise ValueError(f"config.json describes a model of about {n / 1e6:,.0f} M parameters, more than the "
                             f"{max_params / 1e6:,.0f} M this server builds")
    return cfg


def _expected_shapes(cfg, **kwargs) -> dict[str, tuple]:
    from transformers import AutoModel
    with torch.device("meta"):
        m = AutoModel.from_config(cfg, **kwargs)
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def encoder_state(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The bare ``AutoModel`` keys of a state dict: prefix stripped, heads and stale buffers dropped."""
    out = {}
    for k, v in state_dict.items():
        if strip_prefix(k).startswith("pooler.") or not is_head(k):
            s = strip_prefix(k)
            if s in _NON_PERSISTENT:
                continue
            out[s] = v
    return out


def check_shapes(state_dict: Mapping[str, torch.Tensor], config, max_params: int | None = None) -> dict:
    """Validate a state dict against a config without building the model; returns ``AutoModel`` kwargs.

    The config's fields are checked against the checkpoint first (:func:`check_config`: nothing is built for a
    config that does not fit, or is larger than ``max_params``); then the meta-device model's keys and shapes.
    Raises ValueError naming the field, or the missing, unexpected, mismatching and non-float keys."""
    sd = encoder_state(state_dict)
    cfg = check_config(config, sd, max_params)
    kwargs = {}
    try:
        expected = _expected_shapes(cfg)
    except ValueError as e:
        raise ValueError(f"transformers cannot build model_type {cfg.model_type!r}: {e}") from None
    pooler = [k for k in expected if k.startswith("pooler.")]
    if pooler and not any(k in sd for k in pooler):          # a checkpoint saved without the pooler
        expected = _expected_shapes(cfg, add_pooling_layer=False)
        kwargs["add_pooling_layer"] = False
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f"{k}: checkpoint {tuple(sd[k].shape)} vs config {expected[k]}" for k in expected
             if k in sd and tuple(sd[k].shape) != expected[k]]
    not_float = [f"{k} ({str(sd[k].dtype).replace('torch.', '')})" for k in expected
                 if k in sd and not sd[k].is_floating_point()]
    if not_float:                                   # every weight of the model is a float parameter
        raise ValueError(f"checkpoint weights must be floating point: {not_float[:8]}"
                         f"{' …' if len(not_float) > 8 else ''} are not")
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"shape mismatches {wrong[:8]}{' …' if len(wrong) > 8 else ''}")
        if missing:
            parts.append(f"missing keys {missing[:8]}{' …' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:8]}{' …' if len(unexpected) > 8 else ''}")
        raise ValueError(f"checkpoint does not fit the {cfg.model_type} config: " + "; ".join(parts))
    return kwargs


def build(state_dict: Mapping[str, torch.Tensor], config, *, device="cpu") -> torch.nn.Module:
    """The bare ``AutoModel`` (eval mode, float32) holding ``state_dict``, after validating every shape
    against ``config`` (a ``config.json`` dict). Heads and a key prefix are ignored; nothing is guessed."""
    from transformers import AutoModel
    cfg = config_of(config)
    kwargs = check_shapes(state_dict, cfg)
    model = AutoModel.from_config(cfg, **kwargs)
    sd = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in encoder_state(state_dict).items()}
    model.load_state_dict(sd, strict=True)
    return model.to(device).eval()


def load_state(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load another checkpoint of the same shapes into a built model or :class:`TextEncoder` (strict; prefix /
    heads ignored)."""
    sd = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in encoder_state(state_dict).items()}
    _hf(model).load_state_dict(sd, strict=True)


def module_path(model: torch.nn.Module, key: str) -> str:
    """The submodule path (in ``model``) of the layer whose weight is ``key`` (a prefix is dropped if needed)."""
    if not key.endswith(".weight"):
        raise ValueError(f"{key!r} is not a weight key")
    path = key[: -len(".weight")]
    for p in (path, strip_prefix(path)):
        try:
            model.get_submodule(p)
        except AttributeError:
            continue
        return p
    raise ValueError(f"model has no module for key {key!r}")


def module_for_key(model: torch.nn.Module, key: str) -> torch.nn.Linear:
    """The ``nn.Linear`` whose weight is ``key`` (its input is what the probe records for that key)."""
    mod = model.get_submodule(module_path(model, key))
    if isinstance(mod, torch.nn.Linear):
        return mod
    raise ValueError(f"{key!r} belongs to a {type(mod).__name__}, not an nn.Linear")


# ---------------------------------------------------------------- inputs and features

def tokenize(tokenizer, texts, max_length: int = 64) -> dict[str, torch.Tensor]:
    """``{"input_ids", "attention_mask"}`` (padded to the longest text, truncated to ``max_length``)."""
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def token_mask(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """(B, L) bool: True on real tokens, False on padding."""
    return batch["attention_mask"].bool()


def masked_rows(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L, d) layer input → (real tokens, d): padding rows dropped (§8)."""
    if x.shape[:2] != mask.shape:
        raise ValueError(f"input {tuple(x.shape)} does not fit the token mask {tuple(mask.shape)}")
    return x[mask.to(x.device)]


def sample_means(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L, d) → (B, d): each sample's mean over its non-padding tokens (routing / prototypes, §7–§8)."""
    m = mask.to(x.device, x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


def _forward(model, batch):
    dev = next(model.parameters()).device
    return model(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev))


def features(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean-pooled last hidden state over non-padding tokens, (B, hidden): what the task heads read."""
    h = _forward(model, batch).last_hidden_state
    return sample_means(h, token_mask(batch))


@contextmanager
def recording(model: torch.nn.Module, keys, mask: torch.Tensor | None = None, *, per_sample: bool = False):
    """Hooks recording the input of each key's linear layer during forwards inside the block.

    Yields ``{key: [tensor, ...]}`` (one entry per forward): token rows without padding (``mask`` given),
    or per-sample means over real tokens (``per_sample=True``). Before each forward of another batch, set
    the yielded dict's ``"__mask__"`` entry to that batch's :func:`token_mask`."""
    out: dict = {k: [] for k in keys}
    out["__mask__"] = mask
    handles = []

    def hook_for(k):
        def fn(module, args):
            x = args[0].detach()
            m = out["__mask__"]
            if per_sample:
                out[k].append(sample_means(x, m) if m is not None else x.mean(1))
            else:
                out[k].append(masked_rows(x, m) if m is not None else x.reshape(-1, x.shape[-1]))
        return fn
    try:
        for k in keys:
            handles.append(module_for_key(model, k).register_forward_pre_hook(hook_for(k)))
        yield out
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def layer_inputs(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], keys, *,
                 per_sample: bool = False) -> dict[str, torch.Tensor]:
    """Inputs of the given keys' linear layers on one batch, padding excluded: ``{key: (tokens, d_in)}``
    (ESM's ``inputs=``), or ``{key: (B, d_in)}`` per-sample means with ``per_sample=True`` (prototypes)."""
    model.eval()
    with recording(model, keys, token_mask(batch), per_sample=per_sample) as rec:
        _forward(model, batch)
    return {k: torch.cat(rec[k]) for k in keys}


# ---------------------------------------------------------------- packed inputs and the encoder module
#
# A text pool hands its inputs around as one LongTensor ``x`` of shape (N, 2, L): ``x[:, 0]`` the token ids,
# ``x[:, 1]`` the attention mask (1 on real tokens, 0 on padding). One tensor (not a dict) so that the code
# written for image pools (batching by slicing ``x[s:s + b]``, ``.to(device)``, caching) runs unchanged.

def pack(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``{"input_ids", "attention_mask"}`` (B, L) each → (B, 2, L) int64."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if ids.shape != mask.shape or ids.ndim != 2:
        raise ValueError(f"input_ids {tuple(ids.shape)} and attention_mask {tuple(mask.shape)} must be equal (B, L)")
    return torch.stack([ids.long(), mask.long()], dim=1)


def unpack(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """(B, 2, L) packed inputs → ``{"input_ids", "attention_mask"}``."""
    if x.ndim != 3 or x.shape[1] != 2 or x.is_floating_point():
        raise ValueError(f"text inputs must be an integer (N, 2, L) tensor of token ids and mask, got "
                         f"{tuple(x.shape)} {x.dtype}")
    return {"input_ids": x[:, 0], "attention_mask": x[:, 1]}


TOKENIZE_CHUNK = 256          # sentences per tokenizer call in encode_texts(chunk=...)


def encode_texts(tokenizer, texts, max_length: int = 64, *, chunk: int | None = None,
                 check: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Texts → packed (N, 2, L) inputs (padded to the longest, truncated to ``max_length``).

    ``chunk``: the tokenizer is called on that many sentences at a time, and ``check(done, total)`` runs after
    each call — it may raise to stop the work (Cancel, a time bound), which one call on every sentence could not;
    the result is the same as one call (each chunk padded on the tokenizer's side to the longest of all)."""
    texts = list(texts)
    if chunk is None or (len(texts) <= chunk and check is None):
        return pack(tokenize(tokenizer, texts, max_length))
    parts = []
    for s in range(0, len(texts), chunk):
        parts.append(pack(tokenize(tokenizer, texts[s:s + chunk], max_length)))
        if check is not None:
            check(min(s + chunk, len(texts)), len(texts))
    longest = max(p.shape[-1] for p in parts)
    left = getattr(tokenizer, "padding_side", "right") == "left"
    for i, p in enumerate(parts):
        if p.shape[-1] < longest:
            fill = torch.zeros(p.shape[0], 2, longest - p.shape[-1], dtype=p.dtype)
            fill[:, 0] = tokenizer.pad_token_id
            parts[i] = torch.cat([fill, p] if left else [p, fill], dim=-1)
    return torch.cat(parts)


class TextEncoder(torch.nn.Module):
    """A built BERT-family model as a feature extractor on packed inputs: ``encoder(x) -> (B, hidden)``, the
    mean of the last hidden state over non-padding tokens (``pooling="mean"``) or the first token's last hidden
    state (``"cls"``, what a sequence-classification head reads). ``.model`` is the
    Hugging Face module; its parameter names are the state dict's (without a prefix)."""

    def __init__(self, model: torch.nn.Module, pooling: str = "mean"):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.model = model
        self.pooling = pooling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = unpack(x)
        if self.pooling == "cls":                  # what a sequence-classification head reads
            return _forward(self.model, batch).last_hidden_state[:, 0]
        return features(self.model, batch)

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False):
        """Load a checkpoint of the encoder's shapes: the state dict's own keys (a prefix and heads are
        ignored, as in :func:`build`), not ``model.``-prefixed ones."""
        sd = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in encoder_state(state_dict).items()}
        return self.model.load_state_dict(sd, strict=strict, assign=assign)


def load_own(model: torch.nn.Module, task: Mapping[str, torch.Tensor]) -> None:
    """Put task ``task``'s own values (OWN keys: every bias; heads are not in the encoder) into a built model,
    in place (§8: evaluating task t uses t's biases). Works on a model whose linear layers were replaced by
    modules that keep the parameter names (``weight``, ``bias``), as ESM++'s routed layers do. ``model``: the
    Hugging Face module or its :class:`TextEncoder`."""
    params = dict(_hf(model).named_parameters())
    with torch.no_grad():
        for k, v in encoder_state(task).items():
            if key_role(k, v) != OWN:
                continue
            p = params.get(k)
            if p is None:
                continue                       # a pooler the built model does not have
            if tuple(p.shape) != tuple(v.shape):
                raise ValueError(f"{k!r}: task value {tuple(v.shape)} does not fit the model's {tuple(p.shape)}")
            p.copy_(v.to(p.device, p.dtype))


# ---------------------------------------------------------------- sequence-classification heads

# (first layer, second layer, activation) of each family's sequence-classification head, without the prefix
SEQUENCE_HEADS = (("pooler.dense", "classifier", "tanh"),                        # BERT, MiniLM
         ("classifier.dense", "classifier.out_proj", "tanh"),           # RoBERTa
         ("pre_classifier", "classifier", "relu"))                      # DistilBERT


def sequence_head(sd: Mapping[str, torch.Tensor], task: str) -> dict:
    """The task's own classification head (two layers and their activation) from its checkpoint."""
    bare = {strip_prefix(k): v for k, v in sd.items()}
    for first, second, act in SEQUENCE_HEADS:
        keys = [f"{first}.weight", f"{first}.bias", f"{second}.weight", f"{second}.bias"]
        if all(k in bare for k in keys):
            w1, b1, w2, b2 = (bare[k].float() for k in keys)
            if w1.ndim != 2 or w2.ndim != 2 or w2.shape[1] != w1.shape[0] or b1.shape != (w1.shape[0],) \
                    or b2.shape != (w2.shape[0],):
                raise ValueError(f"task {task!r}: its classification head has inconsistent shapes "
                                 f"({first}: {tuple(w1.shape)}, {second}: {tuple(w2.shape)})")
            return {"w1": w1, "b1": b1, "w2": w2, "b2": b2, "act": act}
    raise ValueError(f"task {task!r}: its checkpoint has no sequence-classification head (BERT: pooler.dense + "
                     "classifier, RoBERTa: classifier.dense + classifier.out_proj, DistilBERT: pre_classifier + "
                     "classifier) — upload the *ForSequenceClassification checkpoint of each task")


# ---------------------------------------------------------------- the family protocol (models/protocol.py)

DESCRIPTION = "Hugging Face BERT-family text encoder (BERT, RoBERTa, DistilBERT, MiniLM; methods §8)"
MODALITY = "text"
FOLDER_FORMAT = "transformers"  # exports: the folder format, also the library that loads it
FOLDER_WRITER = "transformers-encoder"  # its writer in esm_core.package.WRITERS
PROBED_TYPES = LAYER_TYPES                                # every encoder linear reads a recordable input


def module_key(key: str) -> str | None:
    """Pool key → the name in a built :class:`TextEncoder`'s ``state_dict()`` (``model.`` + the bare key);
    None for heads (the encoder does not hold them)."""
    if is_head(key) and not strip_prefix(key).startswith("pooler."):
        return None
    return "model." + strip_prefix(key)


def convert(state_dict: Mapping[str, torch.Tensor], name: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The family reads its own layout only: the state dict unchanged."""
    return dict(state_dict)


# ---------------------------------------------------------------- uploads (pools/upload_text: the optional text names)

SEQUENCE_POOLING = "cls"                                  # what the sequence-classification heads read
TOKENIZER_KIND = "BERT-family"
TOKENIZER_CLASSES = {"BertTokenizer", "BertTokenizerFast", "DistilBertTokenizer", "DistilBertTokenizerFast",
                     "RobertaTokenizer", "RobertaTokenizerFast", "XLMRobertaTokenizer", "XLMRobertaTokenizerFast",
                     "CamembertTokenizer", "CamembertTokenizerFast", "MPNetTokenizer", "MPNetTokenizerFast"}


def max_tokens(config) -> int:
    """The most tokens one input may have: ``max_position_embeddings`` less 2 (RoBERTa's position offset)."""
    return int(config_of(config).max_position_embeddings) - 2


def prepare_tokenizer(tokenizer, config) -> list[str]:
    """Nothing to change: BERT-family tokenizers carry their pad token (notes for the user: none)."""
    if tokenizer.pad_token is None:
        raise ValueError("the uploaded tokenizer has no pad token: sentences of different lengths cannot be batched")
    return []


def is_model(module: torch.nn.Module) -> bool:
    return isinstance(module, TextEncoder)


def _hf(module: torch.nn.Module) -> torch.nn.Module:
    return module.model if isinstance(module, TextEncoder) else module


def model_keys(module: torch.nn.Module) -> list[str]:
    """The pool keys (bare ``AutoModel`` keys) of a built encoder's state."""
    return list(_hf(module).state_dict())


def build_model(state_dict: Mapping[str, torch.Tensor], config, *, device: str | torch.device = "cpu",
                share: bool = False, pooling: str = "mean") -> "TextEncoder":
    """The protocol's builder: a :class:`TextEncoder` over :func:`build` (shapes checked against ``config``, a
    ``config.json`` dict, before anything is built). ``share`` is accepted and ignored: a text pool writes each
    task's biases into the module, so it holds copies."""
    return TextEncoder(build(state_dict, config, device=device), pooling).eval()


def saved_config(module: torch.nn.Module) -> dict:
    """What an ESM++ file records to rebuild the encoder without its pool: the Hugging Face config and pooling."""
    return {"model_config": _hf(module).config.to_dict(),
            "pooling": module.pooling if isinstance(module, TextEncoder) else "mean"}


def rebuild(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> "TextEncoder":
    """The encoder from :func:`saved_config`'s entries (a ``config.json`` dict: nothing downloaded)."""
    if not isinstance(config.get("model_config"), Mapping):
        raise ValueError("no 'model_config' (the encoder's config.json) recorded")
    return build_model(state_dict, config["model_config"], pooling=config.get("pooling", "mean"))


def sample_mask(x: torch.Tensor) -> torch.Tensor:
    """(B, L) bool of the real tokens of packed (B, 2, L) inputs."""
    return unpack(x)["attention_mask"].bool()


def record_points(module: torch.nn.Module, keys) -> list:
    """One :class:`~esm_core.models.protocol.RecordPoint` per input group of ``keys`` (Q, K and V of a layer
    read the same input: recorded once, under the group's key): the input of that group's ``nn.Linear``."""
    hf = _hf(module)
    groups = list(dict.fromkeys(input_group(k) for k in keys))
    return [RecordPoint(g, module_for_key(hf, g), "input", True) for g in groups]


def route(module: torch.nn.Module, key: str, make) -> None:
    """The ``nn.Linear`` of ``key`` replaced, at the same path, by ``make(weight, bias, True)`` (its parameters
    keep the names ``weight`` / ``bias``, so :func:`load_own` still finds them)."""
    hf = _hf(module)
    path = module_path(hf, key)
    old = hf.get_submodule(path)
    if not isinstance(old, torch.nn.Linear):
        raise ValueError(f"routed layer {key!r} is a {type(old).__name__}, not an nn.Linear")
    hf.set_submodule(path, make(old.weight, old.bias, True))
