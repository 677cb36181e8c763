"""The model-family protocol: what every family module in :mod:`esm_core.models` provides.

A family is one module with the names of :data:`REQUIRED` (plain constants and
functions) and one registration line in :data:`esm_core.models.FAMILIES`.
Everything above :mod:`esm_core.models` reaches a model only through these
names (found with ``models.family_of(keys)``, ``models.get_family(name)``,
``models.family_of_model(module)`` or a pool's ``family_module``), so no code
there knows a family's key names; ``tests/test_layers.py`` checks that.

Keys are always the *pool's* key names (with whatever prefix the family's
checkpoints carry); :func:`module_key` maps them into the built module.
"""
from __future__ import annotations

from types import ModuleType
from typing import NamedTuple

import torch

# name → what it is (the docstring of the protocol; check_family() verifies presence)
REQUIRED: dict[str, str] = {
    # identity
    "NAME": "registry key, also written into saved files",
    "DESCRIPTION": "one line for the UI",
    "MODALITY": "'image' or 'text': what the pool's inputs are",
    # keys
    "matches": "matches(keys) -> bool: the keys (or a state dict) have this family's layout",
    "roles_of": "roles_of(sd) -> {key: role} (roles.MATRIX / VECTOR / OWN / SKIP)",
    "layer_type": "layer_type(key) -> canonical layer type of a transformer linear weight, or None",
    "layer_types_of": "layer_types_of(keys) -> {key: layer type}",
    "block_index": "block_index(key) -> the transformer block of a layer key, or None",
    "esd_keys": "esd_keys(keys, types=ESD_TYPES) -> the keys of those layer types",
    "short_key": "short_key(key) -> a UI label ('3 · mlp.c_fc'); other keys without the prefix",
    "LAYER_TYPES": "every layer type",
    "ESD_TYPES": "the default ESD layer types (others go the TSV-M way)",
    "ROUTED_TYPES": "the default ESM++ routed layer types",
    "PROBED_TYPES": "the layer types whose input the probe can record",
    "ALPHA_ON_ALL": "True: α scales every merged key (methods §8)",
    "input_group": "input_group(key) -> the key naming the group of keys that read the same input",
    "routing_groups": "routing_groups(keys) -> [(group key, [member keys])] in execution order",
    "module_key": "module_key(key) -> the parameter name inside the built module (prefix stripped)",
    "convert": "convert(sd, name) -> the checkpoint under the family's own key names (foreign layouts renamed)",
    # building
    "build_model": "build_model(sd, config, *, device, share, **options) -> module(x) -> features (B, d)",
    "is_model": "is_model(module) -> True for a module build_model makes",
    "model_keys": "model_keys(module) -> the pool keys of a built module's state",
    "load_state": "load_state(module, sd): another checkpoint of the same shapes into a built module",
    "load_own": "load_own(module, task_sd): the task's OWN values into a built or routed module (methods §8)",
    "saved_config": "saved_config(module) -> entries an ESM++ file records to rebuild the module ({}: none)",
    "rebuild": "rebuild(sd, config) -> the module from saved_config's entries",
    # probe and ESM++
    "sample_mask": "sample_mask(x) -> (B, tokens) bool of the tokens that count (padding excluded), or None",
    "record_points": "record_points(module, keys) -> [RecordPoint]: where each key's input is read",
    "route": "route(module, key, make): the linear of `key` replaced by make(weight, bias, batch_first)",
}

# optional names, read with a default where they are missing: name → what it is
OPTIONAL: dict[str, str] = {
    "TSV_EVERY_2D": "True: ESM merges every 2-D key it does not decompose the TSV-M way (methods §8); default False",
    "TSV_MIN_RANK": "the least rank of that TSV-M merge (k = max(TSV_MIN_RANK, ⌊min(m, n) / T⌋)); default 0",
    "FOLDER_FORMAT": "the folder format of its exports, also the library that loads them ('transformers', "
                     "'open_clip'); without it (or FOLDER_WRITER) exports are a .safetensors file only",
    "FOLDER_WRITER": "the writer of that folder, a key of esm_core.package.WRITERS ('transformers-decoder', ...)",
}

# what a text family needs besides REQUIRED for uploads of its sequence classifiers (pools/upload_text)
TEXT_UPLOAD: dict[str, str] = {
    "SEQUENCE_POOLING": "build_model's pooling that gives what the task's classifier head reads",
    "SUPPORTED_TYPES": "the config.json model_type values of the family",
    "TOKENIZER_KIND": "a few words naming the family's tokenizers in messages ('BERT-family')",
    "TOKENIZER_CLASSES": "the tokenizer_class values its tokenizer_config.json may name (besides the generic ones)",
    "sequence_head": "sequence_head(sd, task) -> the task's own head ({'weight', 'bias'} or two layers)",
    "encoder_state": "encoder_state(sd) -> the feature module's keys of a checkpoint (heads dropped)",
    "check_shapes": "check_shapes(sd, config, max_params) -> checks config.json against the checkpoint, or raises",
    "max_tokens": "max_tokens(config) -> the most tokens one input may have",
    "prepare_tokenizer": "prepare_tokenizer(tokenizer, config) -> [notes]: pad token and side as the head expects",
}


class RecordPoint(NamedTuple):
    """Where the probe reads a weight's input."""
    key: str                    # the weight's pool key
    module: torch.nn.Module     # the module whose forward input is that weight's input
    how: str                    # "input": args[0]; "query": args[0] or kwargs["query"] (attention)
    batch_first: bool           # layout of that input: (B, tokens, d) when True, (tokens, B, d) when False


def check_family(module: ModuleType) -> ModuleType:
    """``module`` when it provides every :data:`REQUIRED` name; ValueError naming the missing ones."""
    missing = [n for n in REQUIRED if not hasattr(module, n)]
    if missing:
        raise ValueError(f"model family {getattr(module, '__name__', module)!r} lacks {missing}")
    if module.MODALITY not in ("image", "text"):
        raise ValueError(f"model family {module.NAME!r}: MODALITY must be 'image' or 'text', got "
                         f"{module.MODALITY!r}")
    return module
