"""Baselines that act entry by entry: weight averaging, Task Arithmetic, TIES, DARE (methods §1–§2).

Every method here treats all merged float keys alike (roles MATRIX and VECTOR)
and returns ``{key: update}`` with the scaling coefficient already applied, so
``θ = θ0 + update``. Updates are moved to the CPU key by key, so on a GPU the
device memory stays at about one layer times the number of tasks.

TIES trims each task vector over the *whole* model, so it needs one threshold
per task first: each task's magnitudes are gathered into one flat float32
buffer (one model's worth of floats, filled key by key) and the threshold is
selected in place. A second pass, key by key, trims, elects signs and takes
the disjoint mean. Entries whose trimmed sum is exactly zero take the model-wide
majority sign, which is only known at the end of that pass; they are patched
afterwards from a small list kept on the side.

DARE masks are drawn from a ``torch.Generator`` on the merge device seeded from
``(seed, task index, crc32(key))``: the same seed on the same device gives the
same merge, whatever the key order or which other keys are merged.
"""
from __future__ import annotations

import math
import zlib

import torch

from ..schemas import SPECS
from .registry import Method, register

# ---------------------------------------------------------------------------
# Task deltas (optionally with DARE's random drop and rescale)
# ---------------------------------------------------------------------------


def dare_generator(seed: int, task_index: int, key: str, device: torch.device) -> torch.Generator:
    """The generator of DARE's drop mask for one task and one key (deterministic)."""
    s = (int(seed) * 1_000_003 + int(task_index)) * 4_294_967_311 + zlib.crc32(key.encode("utf-8"))
    g = torch.Generator(device=device)
    g.manual_seed(s % (2 ** 63 - 1))
    return g


def dare_drop(delta: torch.Tensor, p: float, seed: int, task_index: int, key: str) -> torch.Tensor:
    """DARE on one task's delta of one key: drop each entry with probability ``p``, rescale survivors by 1/(1−p)."""
    if p <= 0.0:
        return delta
    g = dare_generator(seed, task_index, key, delta.device)
    keep = torch.rand(delta.shape, generator=g, device=delta.device, dtype=torch.float32) >= p
    return torch.where(keep, delta / (1.0 - p), torch.zeros((), dtype=delta.dtype, device=delta.device))


def _task_delta(ctx, t: int, key: str, dare: dict | None) -> torch.Tensor:
    """``θt − θ0`` of one key for task number ``t`` (float32, on the merge device), DARE applied if asked."""
    name = ctx.names[t]
    d = ctx.tasks[name][key].to(ctx.device, torch.float32) - ctx.base[key].to(ctx.device, torch.float32)
    return dare_drop(d, dare["p"], dare["seed"], t, key) if dare else d


def _deltas(ctx, key: str, dare: dict | None) -> torch.Tensor:
    """Stacked task deltas of one key (T × shape), DARE applied if asked."""
    d = ctx.deltas(key)
    if dare:
        d = torch.stack([dare_drop(d[t], dare["p"], dare["seed"], t, key) for t in range(d.shape[0])])
    return d


def _cpu(x: torch.Tensor) -> torch.Tensor:
    return x.to("cpu", torch.float32)


# ---------------------------------------------------------------------------
# Weight averaging and Task Arithmetic
# ---------------------------------------------------------------------------


def _sum_or_mean(ctx, alpha: float, reduce: str, dare: dict | None, label: str) -> dict[str, torch.Tensor]:
    out = {}
    for key in ctx.walk(label):
        d = _deltas(ctx, key, dare)
        red = d.mean(0) if reduce == "mean" else d.sum(0)
        out[key] = _cpu(alpha * red)
    return out


def average(ctx, alpha: float) -> dict[str, torch.Tensor]:
    """Weight averaging: ``θ = θ0 + α · mean_t τt`` (α = 1: the plain average of the models)."""
    return _sum_or_mean(ctx, alpha, "mean", None, "average")


def task_arithmetic(ctx, alpha: float) -> dict[str, torch.Tensor]:
    """Task Arithmetic: ``θ = θ0 + α Σt τt``."""
    return _sum_or_mean(ctx, alpha, "sum", None, "task arithmetic")


def dare_ta(ctx, alpha: float, p: float, seed: int) -> dict[str, torch.Tensor]:
    """DARE + Task Arithmetic: drop-and-rescale every task vector, then ``θ0 + α Σt τ̃t``."""
    return _sum_or_mean(ctx, alpha, "sum", {"p": p, "seed": seed}, "DARE-TA")


# ---------------------------------------------------------------------------
# TIES
# ---------------------------------------------------------------------------


def ties_kept_count(d: int, k: float) -> int:
    """Rank (1-based, ascending) of the threshold magnitude: ``d − ⌊k·d/100⌋`` (0 means keep everything)."""
    return d - int(math.floor(k * d / 100.0))


def _kth_smallest(buf: torch.Tensor, rank: int) -> float:
    """The ``rank``-th smallest value (1-based) of a flat tensor; may reorder ``buf`` in place."""
    if buf.device.type == "cpu":
        a = buf.numpy()
        a.partition(rank - 1)          # in place: no second model-sized buffer
        return float(a[rank - 1])
    # on a GPU, kthvalue works one thread block per slice (slow on one huge slice); topk is far faster
    return float(torch.topk(buf, buf.numel() - rank + 1, sorted=False).values.min())


def ties_thresholds(ctx, keys: list[str], k: float, dare: dict | None = None) -> list[float]:
    """Per task, the magnitude threshold of TIES' trim over the whole flattened task vector (methods §2).

    Every entry with ``|τ| >= threshold`` is kept. The flattened vector is all
    ``keys`` sorted by name; the threshold does not depend on that order.
    """
    keys = sorted(keys)
    d = sum(ctx.base[key].numel() for key in keys)
    rank = ties_kept_count(d, k)
    T = len(ctx.names)
    out = []
    for t in range(T):
        if rank <= 0 or d == 0:
            out.append(0.0)                  # k = 100: keep every entry
            continue
        buf = torch.empty(d, dtype=torch.float32, device=ctx.device)
        pos = 0
        for key in keys:
            v = _task_delta(ctx, t, key, dare).reshape(-1)
            buf[pos:pos + v.numel()] = v.abs()
            pos += v.numel()
        out.append(_kth_smallest(buf, rank))
        del buf
        ctx.report(0.3 * (t + 1) / T, f"TIES: trim threshold of task {ctx.names[t]}")
    return out


def ties_merge_key(deltas: torch.Tensor, thresholds: torch.Tensor):
    """TIES on one key, before the model-wide majority sign is known.

    ``deltas``: T × shape; ``thresholds``: T. Returns ``(merged, sign_sum, zero_idx,
    pos_mean, neg_mean)``: the disjoint mean where the elected sign is decided by
    the sum, the sum of elected signs (for the majority), and, for the entries
    whose trimmed sum is exactly 0 but that hold a kept non-zero value, their flat
    indices and the means over the positive / negative kept values.
    """
    thr = thresholds.reshape((-1,) + (1,) * (deltas.ndim - 1)).to(deltas.device, deltas.dtype)
    kept = torch.where(deltas.abs() >= thr, deltas, torch.zeros((), dtype=deltas.dtype, device=deltas.device))
    total = kept.sum(0)
    gamma = torch.sign(total)
    pos, neg = kept > 0, kept < 0
    n_pos, n_neg = pos.sum(0), neg.sum(0)
    pos_mean = torch.where(pos, kept, 0.0).sum(0) / n_pos.clamp(min=1)
    neg_mean = torch.where(neg, kept, 0.0).sum(0) / n_neg.clamp(min=1)
    merged = torch.where(gamma > 0, pos_mean, torch.where(gamma < 0, neg_mean, torch.zeros_like(pos_mean)))
    undecided = ((total == 0) & ((n_pos + n_neg) > 0)).reshape(-1)
    idx = undecided.nonzero().reshape(-1)
    return (merged, int(gamma.sum().item()), idx, pos_mean.reshape(-1)[idx], neg_mean.reshape(-1)[idx])


def _ties(ctx, alpha: float, k: float, dare: dict | None, label: str) -> dict[str, torch.Tensor]:
    keys = ctx.keys
    thr = torch.tensor(ties_thresholds(ctx, keys, k, dare), dtype=torch.float32, device=ctx.device)
    out, fixes, sign_sum = {}, {}, 0
    for key in ctx.walk(label, keys, start=0.3):
        merged, s, idx, pm, nm = ties_merge_key(_deltas(ctx, key, dare), thr)
        sign_sum += s
        out[key] = _cpu(merged)
        if idx.numel():
            fixes[key] = (_cpu(idx).long(), _cpu(pm), _cpu(nm))
    majority = (sign_sum > 0) - (sign_sum < 0)
    for key, (idx, pm, nm) in fixes.items():
        flat = out[key].view(-1)
        flat[idx] = pm if majority > 0 else (nm if majority < 0 else torch.zeros_like(pm))
    for key in keys:
        out[key].mul_(alpha)
    ctx.info["ties"] = {"thresholds": thr.tolist(), "majority_sign": majority, "undecided_entries":
                        sum(int(f[0].numel()) for f in fixes.values())}
    return out


def ties(ctx, alpha: float, k: float) -> dict[str, torch.Tensor]:
    """TIES-Merging: trim (top-k % per task, whole model), elect sign, disjoint mean; ``θ0 + α τm``."""
    return _ties(ctx, alpha, k, None, "TIES")


def dare_ties(ctx, alpha: float, p: float, seed: int, k: float) -> dict[str, torch.Tensor]:
    """DARE + TIES: drop-and-rescale every task vector, then TIES with top-k %."""
    return _ties(ctx, alpha, k, {"p": p, "seed": seed}, "DARE-TIES")


# ---------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------

for _name, _fn in (("average", average), ("ta", task_arithmetic), ("ties", ties), ("dare_ta", dare_ta),
                  ("dare_ties", dare_ties)):
    register(Method(SPECS[_name], _fn))
