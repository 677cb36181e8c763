"""Key roles shared by every model family (what a merging method does with a state-dict entry)."""
from __future__ import annotations

from typing import Mapping

import torch

MATRIX = "matrix"   # 2-D weight: SVD / ESD methods act on it
VECTOR = "vector"   # every other float tensor: averaged by the SVD-family methods
SKIP = "skip"       # integer / bool buffers: never merged, copied from the base
OWN = "own"         # task-specific (text encoders' biases and heads, methods §8): never merged; the merged model
                    # holds the base's value and each task is evaluated with its own model's value


def generic_role(tensor: torch.Tensor) -> str:
    """The role of a tensor of an unknown family: 2-D float → MATRIX, other float → VECTOR, else SKIP."""
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return SKIP
    return MATRIX if tensor.ndim == 2 else VECTOR


def generic_roles(state_dict: Mapping[str, torch.Tensor]) -> dict[str, str]:
    return {k: generic_role(v) for k, v in state_dict.items()}
