"""Reading, validating and writing checkpoints (see DESIGN.md, "Models and checkpoints")."""
from __future__ import annotations

from typing import Mapping

import torch


class CheckpointError(ValueError):
    """A checkpoint could not be read, or does not fit the base model."""


def _fmt_keys(keys, n=8) -> str:
    keys = sorted(keys)
    more = f" … and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def check_compatible(base: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor], name: str = "task") -> None:
    """Refuse ``sd`` unless it has exactly the base's keys, shapes, float dtypes and finite values."""
    missing = set(base) - set(sd)
    extra = set(sd) - set(base)
    problems = []
    if missing:
        problems.append(f"missing keys: {_fmt_keys(missing)}")
    if extra:
        problems.append(f"unexpected keys: {_fmt_keys(extra)}")
    shapes = [f"{k}: {tuple(sd[k].shape)} vs base {tuple(base[k].shape)}"
              for k in base if k in sd and tuple(sd[k].shape) != tuple(base[k].shape)]
    if shapes:
        problems.append("shape mismatch: " + "; ".join(shapes[:8]) + (f" … and {len(shapes) - 8} more" if len(shapes) > 8 else ""))
    kinds = [f"{k}: {sd[k].dtype} vs base {base[k].dtype}" for k in base
             if k in sd and base[k].is_floating_point() != sd[k].is_floating_point()]
    if kinds:
        problems.append("dtype mismatch (float vs non-float): " + "; ".join(kinds[:8]))
    nonfinite = [k for k in base if k in sd and sd[k].is_floating_point() and not bool(torch.isfinite(sd[k]).all())]
    if nonfinite:
        problems.append(f"non-finite values (NaN/inf) in: {_fmt_keys(nonfinite)}")
    if problems:
        raise CheckpointError(f"checkpoint {name!r} does not fit the base model — " + " | ".join(problems))
