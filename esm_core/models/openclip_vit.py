"""What esm_core knows about open_clip ViT image towers.

Only key names live here: which tensors are 2-D weight matrices, which are
"non-matrix" (biases, LayerNorm, embeddings, conv patch embedding), which are
never merged (integer/bool buffers), and the layer *type* of each transformer
linear layer (for ESM's inter-layer scaling and for ESD / routing).

Any other architecture can be merged by passing ``roles`` and ``layer_types``
explicitly to :func:`esm_core.merge`.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch

MATRIX = "matrix"   # 2-D weight: SVD / ESD methods act on it
VECTOR = "vector"   # every other float tensor: averaged by the SVD-family methods
SKIP = "skip"       # integer / bool buffers: never merged, copied from the base

# Layer types of an open_clip ViT transformer block (SPEC §5-§7).
IN_PROJ = "attn.in_proj_weight"
OUT_PROJ = "attn.out_proj.weight"
C_FC = "mlp.c_fc.weight"
C_PROJ = "mlp.c_proj.weight"
LAYER_TYPES = (IN_PROJ, OUT_PROJ, C_FC, C_PROJ)
ESD_TYPES = (IN_PROJ, C_FC, C_PROJ)          # reference: out_proj goes the TSV-M way
ROUTED_TYPES = (IN_PROJ, C_FC)               # ESM++ routed layers

_BLOCK = re.compile(r"(?:^|\.)resblocks\.(\d+)\.(attn\.in_proj_weight|attn\.out_proj\.weight|mlp\.c_fc\.weight|mlp\.c_proj\.weight)$")
# 2-D keys treated as non-matrix by the reference code.
_NON_MATRIX_2D = ("text_projection",)


def key_role(key: str, tensor: torch.Tensor) -> str:
    """Role of one state-dict entry: MATRIX, VECTOR or SKIP."""
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return SKIP
    if tensor.ndim == 2 and not any(s in key for s in _NON_MATRIX_2D):
        return MATRIX
    return VECTOR


def roles_of(state_dict: Mapping[str, torch.Tensor]) -> dict[str, str]:
    return {k: key_role(k, v) for k, v in state_dict.items()}


def layer_type(key: str) -> str | None:
    """Layer type of a transformer linear weight ("mlp.c_fc.weight", ...), else None."""
    m = _BLOCK.search(key)
    return m.group(2) if m else None


def block_index(key: str) -> int | None:
    m = _BLOCK.search(key)
    return int(m.group(1)) if m else None


def layer_types_of(keys) -> dict[str, str]:
    """{key: layer type} for every transformer linear weight among ``keys``."""
    out = {}
    for k in keys:
        t = layer_type(k)
        if t is not None:
            out[k] = t
    return out


def esd_keys(keys, types=ESD_TYPES) -> list[str]:
    """Keys whose layer type is in ``types`` (default: the reference ESD layers)."""
    return [k for k in keys if layer_type(k) in types]


def short_key(key: str) -> str:
    """``visual.transformer.resblocks.3.mlp.c_fc.weight`` → ``3 · mlp.c_fc``."""
    parts = key.split(".")
    if "resblocks" in parts:
        i = parts.index("resblocks")
        rest = ".".join(parts[i + 2:])
        for suf in (".weight", "_weight"):
            if rest.endswith(suf):
                rest = rest[: -len(suf)]
        return f"{parts[i + 1]} · {rest}"
    return key[len("visual."):] if key.startswith("visual.") else key
