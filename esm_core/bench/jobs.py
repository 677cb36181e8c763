"""What a benchmark row is (:class:`Job`) and the shapes the rows share (open_clip ViT-B/32 visual tower)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

# open_clip ViT-B/32 visual tower
WIDTH, PATCH, IMAGE, HEADS, MLP, OUT_DIM = 768, 32, 224, 12, 3072, 512
TOKENS = (IMAGE // PATCH) ** 2 + 1          # 50 tokens (49 patches + class token)
FULL_BLOCKS = 12


@dataclass
class Job:
    """One benchmark row. ``run(base, tasks, device, state)`` is timed; ``setup(base, tasks, device) -> state`` is not.

    Both must be picklable (module-level functions or ``functools.partial`` of
    them): on the CPU each job runs in a fresh child process.
    """
    name: str
    title: str
    run: Callable[[dict, dict, torch.device, Any], Any]
    setup: Callable[[dict, dict, torch.device], Any] | None = None
    extra: dict = field(default_factory=dict)       # copied into the row
    # untimed, after the timed runs: ``check(base, tasks, device, state, last result) -> dict`` merged into the row
    check: Callable[[dict, dict, torch.device, Any, Any], dict] | None = None
    default: bool = True            # in the run when no job is named (False: only when asked by name)
