"""Model families: everything that depends on the kind of model lives below this package.

One module per family: :mod:`.openclip_vit` (open_clip ViT image towers),
:mod:`.bert` (Hugging Face BERT-family text encoders: BERT, RoBERTa,
DistilBERT, MiniLM; methods §8), and :mod:`.hf_clip_vision` (Hugging Face CLIP
vision configs; its weights load under open_clip names). A family module answers,
as plain constants and functions: ``matches(keys)``, ``key_role``/``roles_of``,
``layer_type``/``layer_types_of``, ``LAYER_TYPES``/``ESD_TYPES``/``ROUTED_TYPES``,
``block_index``, ``short_key``, how to build the module, where the probe hooks
(``hook_points``) and how raw inputs become model inputs. Nothing above this
package matches key names (``tests/test_layers.py`` checks it). Adding a family = one module here with the
names of :data:`~esm_core.models.protocol.REQUIRED` + its tests + one line in :data:`FAMILIES`.
"""
from __future__ import annotations

from types import ModuleType
from typing import Mapping

import torch

from . import bert, hf_vit, llama, openclip_vit
from .protocol import REQUIRED, RecordPoint, check_family  # noqa: F401  (re-exported)
from .roles import MATRIX, OWN, SKIP, VECTOR, generic_role, generic_roles  # noqa: F401


def register(*families: ModuleType) -> dict[str, ModuleType]:
    """``{NAME: module}`` of the given family modules, each checked against the protocol
    (:func:`~esm_core.models.protocol.check_family`: ValueError naming what a module lacks)."""
    out: dict[str, ModuleType] = {}
    for fam in families:
        check_family(fam)
        if fam.NAME in out:
            raise ValueError(f"two model families are named {fam.NAME!r}")
        out[fam.NAME] = fam
    return out


# One line per family: the order is the order family_of() tries them in.
FAMILIES: dict[str, ModuleType] = register(
    openclip_vit,
    bert,
    hf_vit,
    llama,
)


def get_family(name: str) -> ModuleType:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}") from None


def family_of(keys) -> ModuleType | None:
    """The family whose key names ``keys`` (a state dict or its keys) have, or None."""
    keys = list(keys)
    for fam in FAMILIES.values():
        if fam.matches(keys):
            return fam
    return None


def roles_of(state_dict: Mapping[str, torch.Tensor], family: str | None = None) -> dict[str, str]:
    """Role of every key: the family's rules when the family is known (or found), else the generic rule."""
    fam = get_family(family) if family else family_of(state_dict)
    return fam.roles_of(state_dict) if fam is not None else generic_roles(state_dict)


def layer_types_of(keys, family: str | None = None) -> dict[str, str]:
    """``{key: layer type}`` of the family's transformer linear weights (empty for an unknown family)."""
    keys = list(keys)
    fam = get_family(family) if family else family_of(keys)
    return fam.layer_types_of(keys) if fam is not None else {}


def family_of_model(module: torch.nn.Module) -> ModuleType | None:
    """The family whose ``build_model`` makes modules like ``module`` (``is_model``), or None."""
    for fam in FAMILIES.values():
        if fam.is_model(module):
            return fam
    return None


def family_or_vit(keys) -> ModuleType:
    """The family of ``keys``, or the open_clip ViT family when none matches (the views' historical default:
    a model with no recognised layers then shows none)."""
    return family_of(keys) or openclip_vit


def family_of_key(key: str) -> ModuleType | None:
    """The family that knows ``key`` as one of its layers (a layer type), or None."""
    for fam in FAMILIES.values():
        if fam.layer_type(key) is not None:
            return fam
    return None


def short_key(key: str) -> str:
    """A layer's short label (``"3 · mlp.c_fc"``, ``"3 · ffn.intermediate"``) in whichever family names it."""
    fam = family_of_key(key)
    # other keys: without the image tower's "visual." prefix
    return (fam or openclip_vit).short_key(key)
