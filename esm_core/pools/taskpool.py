"""TaskPool: a base model, its fine-tuned task models, their frozen heads and evaluation data.

Two kinds of pool share this one class:
- the built-in demo pool (a tiny open_clip ViT on real 28×28 image tasks,
  :func:`esm_core.pools.demo.load_demo_pool`), which carries its validation and test
  images; uploaded pools (:mod:`esm_core.pools.upload`) likewise;
- real CLIP pools described by a pool file (``assets/pools/*.json``), loaded
  with :func:`esm_core.pools.poolfile.load_pool`.

Heads are stored with their scale included: ``logits = normalise(f) @ W.T``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import torch

from .. import models
from ..models.openclip_vit import normalise_images


# ---------------------------------------------------------------- the pool

@dataclass
class TaskPool:
    """Base + fine-tuned image models of one family, with frozen heads and (optionally) evaluation data.

    ``data[task][split] = (images uint8 N×H×W (grey) or N×H×W×3, labels int64 N)``
    for splits "val", "test" and "samples". ``family``: the model family (a name of
    :data:`esm_core.models.FAMILIES`) that builds the models from ``model_name`` (its config) and a state dict.
    """
    name: str
    model_name: str | dict            # open_clip model name, or its config dict (uploads: never registered)
    base: dict[str, torch.Tensor]
    tasks: dict[str, dict[str, torch.Tensor]]
    heads: dict[str, torch.Tensor]
    class_names: dict[str, list[str]]
    data: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    quick_gelu: bool | None = None
    meta: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict, repr=False)   # images, reference accuracies, ...
    family: str = models.openclip_vit.NAME

    def __post_init__(self):
        models.get_family(self.family)                          # an unknown family is refused by name
        for t in self.tasks:
            if t not in self.heads:
                raise ValueError(f"pool {self.name!r}: task {t!r} has no head")
            if t not in self.class_names:
                raise ValueError(f"pool {self.name!r}: task {t!r} has no class names")
            if self.heads[t].shape[0] != len(self.class_names[t]):
                raise ValueError(f"pool {self.name!r}: head of {t!r} has {self.heads[t].shape[0]} rows but "
                                 f"{len(self.class_names[t])} class names")

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    def _check_task(self, task: str) -> None:
        if task not in self.tasks:
            raise ValueError(f"pool {self.name!r} has no task {task!r}; tasks: {self.task_names}")

    @property
    def family_module(self):
        """The model family (its module: the protocol of :mod:`esm_core.models.protocol`)."""
        return models.get_family(self.family)

    @property
    def modality(self) -> str:
        return self.family_module.MODALITY

    def build_model(self, state_dict: Mapping[str, torch.Tensor], device: str | torch.device = "cpu",
                    share: bool = False) -> torch.nn.Module:
        """The family's model (``model(x) -> features``) with ``state_dict`` (the pool's keys) loaded, eval mode;
        ``share``: it holds ``state_dict``'s own tensors, not copies (see the family's ``build_model``)."""
        options = {} if self.quick_gelu is None else {"quick_gelu": self.quick_gelu}
        return self.family_module.build_model(state_dict, self.model_name, device=device, share=share, **options)

    def prepare(self, module: torch.nn.Module, task: str | None) -> None:
        """Before scoring ``task``: its own values (the family's OWN keys, if any) into ``module``; ``None``: the
        base's."""
        if task is not None:
            self._check_task(task)
        self.family_module.load_own(getattr(module, "visual", module), self.base if task is None
                                    else self.tasks[task])

    def _raw(self, task: str, split: str) -> tuple[np.ndarray, np.ndarray]:
        self._check_task(task)
        if split not in ("val", "test", "samples"):
            raise ValueError(f"split must be 'val', 'test' or 'samples', got {split!r}")
        try:
            return self.data[task][split]
        except KeyError:
            raise ValueError(f"pool {self.name!r} carries no {split!r} images for task {task!r}") from None

    def normalise(self, raw: np.ndarray) -> torch.Tensor:
        """uint8 images (N×H×W grey or N×H×W×3) → float N×3×H×W, normalised with the pool's mean/std."""
        return normalise_images(raw, self.mean, self.std)

    def encode(self, raw: np.ndarray, check=None) -> torch.Tensor:
        """Raw inputs (uint8 images) → the model's inputs (the pool protocol's name for :meth:`normalise`)."""
        return self.normalise(raw)

    def inputs(self, task: str, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
        """(x float N×3×H×W normalised, y LongTensor N) of one task's split; cached."""
        key = ("inputs", task, split)
        if key not in self.cache:
            raw, y = self._raw(task, split)
            self.cache[key] = (self.normalise(raw), torch.from_numpy(np.asarray(y, dtype=np.int64)))
        return self.cache[key]

    def proxy(self, task: str, n: int = 32, seed: int = 0) -> tuple[torch.Tensor, list[int]]:
        """``n`` validation images of ``task`` drawn with ``seed`` (sorted ids into the val split)."""
        x, _ = self.inputs(task, "val")
        ids = proxy_ids(len(x), n, seed)
        return x[ids], ids

    def logits(self, task: str, features: torch.Tensor) -> torch.Tensor:
        """The task's frozen head: ``normalise(features) @ W.T`` (W carries the scale)."""
        self._check_task(task)
        w = self.heads[task].to(features.device, features.dtype)
        return torch.nn.functional.normalize(features, dim=-1) @ w.T

    def samples(self, task: str, k: int = 8) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """A few images for display: (x normalised, y, raw uint8 k×H×W)."""
        self._check_task(task)
        split = "samples" if "samples" in self.data.get(task, {}) else "test"
        raw, y = self._raw(task, split)
        raw, y = raw[:k], np.asarray(y[:k], dtype=np.int64)
        return self.normalise(raw), torch.from_numpy(y), raw

    def subset(self, tasks: list[str]) -> "TaskPool":
        """A pool with only ``tasks`` (same tensors, no copies)."""
        return subset_pool(self, tasks)


def subset_pool(pool, tasks: list[str]):
    """``pool`` (a TaskPool or TextTaskPool) with only ``tasks``: its per-task fields sliced, everything else shared
    (no tensor copied), a fresh ``cache``."""
    for t in tasks:
        pool._check_task(t)
    per_task = {f: {t: getattr(pool, f)[t] for t in tasks if t in getattr(pool, f)}
                for f in ("tasks", "heads", "class_names", "data")}
    return dataclasses.replace(pool, **per_task, meta=dict(pool.meta), cache={})


def proxy_ids(size: int, n: int, seed: int) -> list[int]:
    """The proxy samples' ids (methods §5.1): ``min(n, size)`` of ``range(size)`` drawn without replacement with
    ``seed``, sorted."""
    if n < 1:
        raise ValueError(f"proxy size n must be >= 1, got {n}")
    return [int(i) for i in np.sort(np.random.default_rng(seed).choice(size, size=min(n, size), replace=False))]


def cosine_head(weight: torch.Tensor, scale: float = 30.0) -> torch.Tensor:
    """CLIP-style head matrix: ``scale · normalise(rows of weight)``."""
    return scale * torch.nn.functional.normalize(weight.float(), dim=-1)
