"""The ESM++ decision log: every routing decision (chosen expert, all cosines, true task) and what it tells."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F


@dataclass(eq=False)
class DecisionLog:
    """Every routing decision of one or more forward calls.

    N samples, L routed layers (in ``keys`` order = execution order), T tasks:
    ``cos`` (N, L, T) cosine of each sample's mean layer input with each
    prototype; ``routed`` (N, L) the router's choice = ``cos.argmax(-1)``;
    ``chosen`` (N, L) the expert actually applied (= ``routed`` in mode
    "route", the true task in "oracle", the fixed task in "fixed:…", −1 in
    "base"); ``true`` (N,) the true task index (−1 = unknown); ``pooled``:
    per layer the (N, d_in) mean-pooled inputs, or None when not recorded.
    ``modes``: the mode of each sample's forward call.
    """
    tasks: list[str]
    keys: list[str]
    cos: torch.Tensor
    routed: torch.Tensor
    chosen: torch.Tensor
    true: torch.Tensor
    modes: list[str] = field(default_factory=list)
    pooled: list[torch.Tensor] | None = None

    @classmethod
    def empty(cls, tasks: Sequence[str], keys: Sequence[str], dims: Sequence[int] | None = None) -> "DecisionLog":
        T, L = len(tasks), len(keys)
        pooled = None if dims is None else [torch.zeros(0, d) for d in dims]
        return cls(list(tasks), list(keys), torch.zeros(0, L, T), torch.zeros(0, L, dtype=torch.long),
                   torch.zeros(0, L, dtype=torch.long), torch.zeros(0, dtype=torch.long), [], pooled)

    @property
    def n(self) -> int:
        return int(self.true.shape[0])

    def layer_index(self, layer: int | str) -> int:
        """Index of a routed layer given as an index or a key."""
        if isinstance(layer, str):
            if layer not in self.keys:
                raise ValueError(f"no routed layer {layer!r} in the log")
            return self.keys.index(layer)
        if not -len(self.keys) <= int(layer) < len(self.keys):
            raise ValueError(f"layer index {layer} out of range: {len(self.keys)} routed layers")
        return int(layer) % len(self.keys)

    def extend(self, other: "DecisionLog") -> None:
        """Append another log of the same tasks and layers (in place)."""
        if other.tasks != self.tasks or other.keys != self.keys:
            raise ValueError("cannot join decision logs of different tasks or layers")
        self.cos = torch.cat([self.cos, other.cos])
        self.routed = torch.cat([self.routed, other.routed])
        self.chosen = torch.cat([self.chosen, other.chosen])
        self.true = torch.cat([self.true, other.true])
        self.modes = self.modes + other.modes
        if self.pooled is not None:
            if other.pooled is None:
                self.pooled = None
            else:
                self.pooled = [torch.cat([a, b]) for a, b in zip(self.pooled, other.pooled)]


def _known(log: DecisionLog) -> torch.Tensor:
    mask = log.true >= 0
    if not bool(mask.any()):
        raise ValueError("the decision log has no sample with a known true task (pass true_task=...)")
    return mask


def routing_accuracy(log: DecisionLog) -> torch.Tensor:
    """Per routed layer, the share of samples (with a known true task) the router sent to their own task: (L,)."""
    mask = _known(log)
    return (log.routed[mask] == log.true[mask, None]).double().mean(0)


def confusion(log: DecisionLog, layer: int | str | None = None) -> torch.Tensor:
    """Counts (T × T), rows = true task, columns = routed task; summed over all layers when ``layer`` is None."""
    mask = _known(log)
    T = len(log.tasks)
    routed = log.routed[mask] if layer is None else log.routed[mask][:, log.layer_index(layer)][:, None]
    true = log.true[mask][:, None].expand_as(routed)
    idx = (true * T + routed).reshape(-1)
    return torch.bincount(idx, minlength=T * T).reshape(T, T)


def majority_task(log: DecisionLog) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, the task most layers routed to (ties: lowest index) and the share of layers that agree."""
    T = len(log.tasks)
    counts = F.one_hot(log.routed, T).sum(1)                     # (N, T)
    top = counts.argmax(1)
    return top, counts.gather(1, top[:, None])[:, 0].double() / max(len(log.keys), 1)
