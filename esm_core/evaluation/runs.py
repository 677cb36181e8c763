"""Whole evaluation runs on a pool: α chosen on validation, then the test split (what ``esm-studio eval`` does).

- :func:`search_alpha`: the α policy (:mod:`.alpha`) scored by mean normalised accuracy on a split;
- :func:`evaluate_method`: one merging method, α searched or given;
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ..progress import Progress, reporter
from ..device import resolve_device
from ..merging import apply_updates, get_method, merge_updates
from . import alpha as A
from .accuracy import accuracies_of, evaluate, normalised, reference_accuracies, summarize



def search_alpha(pool, method: str, params: Mapping[str, Any] | None = None, *, stats=None, cache=None,
                 split: str = "val", progress: Progress | None = None, strategy: str | None = None,
                 device: str | torch.device = "auto", batch_size: int = 256,
                 info: dict | None = None) -> tuple[float, list[tuple[float, float]]]:
    """Choose α for ``method`` by the best mean normalised accuracy on ``split`` (validation), following
    :func:`esm_core.evaluation.alpha.search` (which goes on past the grid's upper end while the optimum sits
    there; ``info`` receives what it added). Returns ``(best α, [(α, mean normalised accuracy)] sorted by α)``."""
    dev = resolve_device(device)
    report = reporter(progress)
    report(0.0, f"{method}: merging at α = 0 and α = 1")
    u0, slope, _ = A.affine_updates(pool.base, pool.tasks, method, params, stats=stats, cache=cache, device=dev)
    ft = reference_accuracies(pool, split, device=dev)["finetuned"]
    visual = pool.build_model(pool.base, device=dev)
    n_total = A.evaluations(method, strategy)
    done = [0]

    def score(alpha: float) -> float:
        sd = A.state_at(pool.base, u0, slope, alpha)
        pool.family_module.load_state(visual, sd)
        s = normalised(accuracies_of(pool, visual, split, pool.task_names, batch_size, None), ft)["mean_norm"]
        done[0] += 1
        report(min(done[0] / n_total, 1.0), f"{method}: α = {alpha:.3f} → {100 * s:.2f} % normalised ({split})")
        return s

    return A.search(score, method, strategy, info=info)


def merged_state(pool, method: str, params: Mapping[str, Any] | None = None, alpha: float | None = None, *,
                 stats=None, cache=None, device: str | torch.device = "auto",
                 check: bool = True) -> dict[str, torch.Tensor]:
    """θ0 + the method's update at ``alpha`` (the method's default α when None). ``check=False`` skips the merge's
    check of the checkpoints (finite values, shapes) for a pool whose checkpoints were checked when it was loaded."""
    p = dict(params or {})
    if alpha is not None:
        p["alpha"] = alpha
    updates = merge_updates(method, pool.base, pool.tasks, stats=stats, cache=cache, device=device, check=check, **p)
    return apply_updates(pool.base, updates, consume=True)      # each update freed once added


def evaluate_method(pool, method: str, params: Mapping[str, Any] | None = None, *, alpha: float | str = "auto",
                    split: str = "test", stats=None, cache=None, device: str | torch.device = "auto",
                    progress: Progress | None = None) -> dict:
    """Merge with ``method`` (α chosen on validation when ``alpha="auto"``) and summarise it on ``split``."""
    report = reporter(progress)
    p = {k: v for k, v in dict(params or {}).items() if k != "alpha"}
    curve, info = None, {}
    if alpha == "auto":
        alpha, curve = search_alpha(pool, method, p, stats=stats, cache=cache, device=device,
                                    progress=lambda f, d: report(0.9 * f, d), info=info)
    alpha = float(alpha)
    sd = merged_state(pool, method, p, alpha, stats=stats, cache=cache, device=device)
    accs = evaluate(pool, sd, split, device=device, progress=lambda f, d: report(0.9 + 0.1 * f, d))
    out = summarize(pool, accs, split)
    out.update({"method": method, "alpha": alpha, "params": get_method(method).resolve({**p, "alpha": alpha})})
    if curve is not None:
        out["val_curve"] = curve
    if info.get("extended"):                  # the optimum sat at the grid's upper end: say how far the search went
        out["alpha_extended"] = info["extended"]
        out["alpha_note"] = info["note"]
    return out
