"""ESM++ on a pool (methods §7): the ESM merge at its α, experts, routed tower, routed and oracle evaluation."""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import torch

from ..progress import Progress, reporter
from ..device import resolve_device
from ..esmpp import ESMPP, DecisionLog, RoutedModel, build_experts, build_routed, routed_keys_of, routing_accuracy
from ..merging import get_method
from ..pools.taskpool import TaskPool
from ..probe import probe_pool
from .accuracy import evaluate, summarize
from .runs import merged_state, search_alpha



WILSON_Z = 1.96                   # 95 %


def wilson_interval(successes: int, n: int, z: float = WILSON_Z) -> tuple[float, float]:
    """The 95 % Wilson score interval ``(low, high)`` of a proportion: ``successes`` out of ``n`` trials.

    ``(c ∓ h) / (1 + z²/n)`` with ``c = p̂ + z²/(2n)`` and ``h = z·√(p̂(1−p̂)/n + z²/(4n²))``: unlike p̂ ± 1.96·SE it
    stays inside [0, 1] and is not empty at 0 or n successes (routing accuracy on 36 samples, say).
    ``n = 0``: ``(nan, nan)``; ``successes`` outside [0, n] is refused.
    """
    n, k = int(n), int(successes)
    if n < 0 or not 0 <= k <= max(n, 0):
        raise ValueError(f"a proportion needs 0 <= successes <= n, got {k} of {n}")
    if n == 0:
        return float("nan"), float("nan")
    p, z2 = k / n, z * z
    centre = p + z2 / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    lo, hi = (centre - half) / (1 + z2 / n), (centre + half) / (1 + z2 / n)
    return max(0.0, lo), min(1.0, hi)


def build_esmpp(pool, stats=None, *, rank: int = ESMPP.default("rank"),
                routed_types: str = ESMPP.default("routed_types"), alpha: float | None = None,
                esm_params: Mapping[str, Any] | None = None, progress: Progress | None = None,
                device: str | torch.device = "auto", cache=None, check: bool = True,
                merged: Mapping[str, torch.Tensor] | None = None) -> RoutedModel:
    """ESM++ for a TaskPool: ESM merge → experts → prototypes → routed model.

    The routed model follows what ``pool.build_model`` returns: an open_clip image tower, or a
    ``bert.TextEncoder`` (a text pool: Q, K, V and intermediate routed on non-padding tokens, methods §8).

    ``stats``: the pool's ``Stats`` (:func:`esm_core.probe.probe_pool`; probed
    here when None). ``alpha``: ESM's α; None = chosen on validation with
    :func:`esm_core.evaluation.search_alpha` (golden section). ``esm_params``:
    other ESM parameters. ``cache``: a decomposition cache reused by the ESM
    merges. ``check=False``: the pool's checkpoints were checked when it was
    loaded (the app's pools), so the ESM merge does not read every tensor to
    check it again. Returns a :class:`RoutedModel` whose ``config`` records all
    of it (save it with ``save_esmpp(path, m.merged_sd, m.experts, m.config)``). ``merged``: the ESM-merged
    state dict at ``alpha`` with ``esm_params`` when the caller holds it (the app's current merge): it is not
    merged again, and the routed model takes its tensors over.
    """
    report = reporter(progress)
    dev = resolve_device(device)
    if merged is not None:
        if alpha is None:
            raise ValueError("a merged state dict given to build_esmpp needs the α it was merged at")
        if set(merged) != set(pool.base):
            odd = sorted(set(merged) ^ set(pool.base))
            raise ValueError(f"the merged state dict does not have the pool's keys: {odd[:5]}")
    if stats is None:
        stats = probe_pool(pool, device=dev, progress=lambda f, d: report(0.2 * f, d))
    p = {k: v for k, v in dict(esm_params or {}).items() if k != "alpha"}
    curve = None
    if alpha is None:
        alpha, curve = search_alpha(pool, "esm", p, stats=stats, cache=cache, device=dev,
                                    progress=lambda f, d: report(0.2 + 0.5 * f, d))
    alpha = float(alpha)
    report(0.7, f"ESM merge at α = {alpha:.3f}")
    if merged is None:
        merged = merged_state(pool, "esm", p, alpha, stats=stats, cache=cache, device=dev, check=check)
    rank = ESMPP.resolve({"rank": rank, "routed_types": routed_types})["rank"]
    keys = routed_keys_of(list(merged), routed_types)
    experts = build_experts(merged, pool.tasks, stats, rank=rank, routed_keys=keys, device=dev,
                            progress=lambda f, d: report(0.75 + 0.2 * f, d))
    config = {"method": "esm++", "rank": int(rank), "routed_types": routed_types, "alpha": alpha,
              "esm_params": get_method("esm").resolve({**p, "alpha": alpha}),
              "tasks": list(pool.task_names), "pool": getattr(pool, "name", None),
              "proxy": {"n": stats.get("n"), "seed": stats.get("seed"), "ids": stats.get("proxy_ids")}
              if isinstance(stats, Mapping) else None}
    if curve is not None:
        config["alpha_curve"] = [[float(a), float(s)] for a, s in curve]
    # an image tower takes the merged tensors themselves (nothing else holds them, nothing writes into its
    # weights): one copy of the model, not two; a text encoder copies (a text pool writes each task's biases in)
    share = {"share": True} if isinstance(pool, TaskPool) else {}
    routed = build_routed(merged, experts, lambda sd: pool.build_model(sd, device=dev, **share), device=dev,
                          config=config)
    report(1.0, "ESM++ ready")
    return routed


def evaluate_routed(pool, routed: RoutedModel, split: str = "test", tasks: Sequence[str] | None = None, *,
                    mode: str = "route", batch_size: int = 256, keep_inputs: bool = False,
                    progress: Progress | None = None) -> tuple[dict[str, float], DecisionLog]:
    """Per-task accuracy of a routed model and the log of every decision (true task recorded).

    Each task is evaluated with ``routed.using(mode=mode, true_task=task)``, so
    "oracle" forces the right expert and the log knows every sample's task.
    """
    names = list(pool.task_names) if tasks is None else list(tasks)
    accs: dict[str, float] = {}
    dims = [routed.experts.A[k].shape[2] for k in routed.keys] if keep_inputs else None
    full = DecisionLog.empty(routed.tasks, routed.keys, dims)
    for i, t in enumerate(names):
        with routed.using(mode=mode, true_task=t), routed.logging(keep_inputs) as log:
            accs[t] = evaluate(pool, routed, split, [t], batch_size=batch_size)[t]
        full.extend(log)
        if progress is not None:
            progress((i + 1) / len(names), f"ESM++ ({mode}) {t}: {100 * accs[t]:.1f} %")
    return accs, full


@torch.no_grad()
def expert_scores(routed: RoutedModel, x: torch.Tensor, y: torch.Tensor,
                  logits_fn: Callable[[torch.Tensor], torch.Tensor], *, batch_size: int = 256) -> torch.Tensor:
    """"Which expert would have been best": (N, T) log-probability of the true label with each expert forced.

    Runs the model once per task in mode ``"fixed:<task>"`` (all layers use
    that expert); ``logits_fn(features) -> logits`` is the task's head, e.g.
    ``lambda f: pool.logits(task, f)``. ``scores.argmax(1)`` is the best expert
    per sample; compare with :func:`majority_task` of the routed log.
    """
    dev = next(routed.parameters()).device
    out = torch.zeros(x.shape[0], len(routed.tasks), dtype=torch.float64)
    y = y.reshape(-1).long()
    for j, t in enumerate(routed.tasks):
        for s in range(0, x.shape[0], batch_size):
            f = routed(x[s:s + batch_size].to(dev), mode=f"fixed:{t}")
            lp = torch.log_softmax(logits_fn(f.float()).double(), -1).cpu()
            out[s:s + batch_size, j] = lp.gather(1, y[s:s + batch_size, None])[:, 0]
    return out


def evaluate_esmpp(pool, params: Mapping[str, Any] | None = None, esm_params: Mapping[str, Any] | None = None, *,
                   alpha: float | str = "auto", split: str = "test", stats=None, cache=None,
                   device: str | torch.device = "auto", progress: Progress | None = None) -> dict[str, dict]:
    """ESM++ (methods §7) on ``pool``: rows ``esmpp-r{rank}`` (routed) and ``esmpp-r{rank}-oracle``.

    ``params``: ESM++'s own schema (:data:`esm_core.esmpp.ESMPP`: ``rank``, ``routed_types``);
    ``esm_params``: the static ESM merge's parameters; ``alpha`` is ESM's α ("auto": the α policy of ESM).
    The routed row carries routing accuracy per routed layer and the storage the experts add.
    """
    pp = ESMPP.resolve(dict(params or {}))
    report = reporter(progress)
    routed = build_esmpp(pool, stats, **pp, alpha=None if alpha == "auto" else float(alpha),
                         esm_params=dict(esm_params or {}), cache=cache, device=device,
                         progress=lambda f, d: report(0.6 * f, d))
    rows = {}
    for i, mode in enumerate(("route", "oracle")):
        accs, log = evaluate_routed(pool, routed, split, mode=mode,
                                    progress=lambda f, d, i=i: report(0.6 + 0.2 * (i + f), d))
        out = summarize(pool, accs, split)
        out.update({"alpha": routed.config["alpha"], "params": {**pp, **routed.config["esm_params"]}})
        if mode == "route":
            out["routing_accuracy"] = {k: float(a) for k, a in zip(log.keys, routing_accuracy(log).tolist())}
            out["storage"] = routed.experts.storage()
        rows[f"esmpp-r{pp['rank']}" + ("-oracle" if mode == "oracle" else "")] = out
    return rows
