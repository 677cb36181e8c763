"""Per-task accuracy, absolute and normalised (methods §0).

- :func:`evaluate`: top-1 accuracy of one model on each task of a pool, with
  that task's frozen head.
- :func:`summarize`: absolute and normalised accuracy (acc / fine-tuned acc),
  per task and averaged.
- :func:`reference_accuracies`: "zeroshot" (base + heads) and "finetuned"
  (each task's own model), cached on the pool.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch

from ..progress import Progress
from ..device import resolve_device



# ---------------------------------------------------------------- accuracy

def _module_device(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def subset_ids(n_total: int, n: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of a seeded subset of ``n`` out of ``n_total`` (all of them when ``n_total ≤ n``)."""
    if n_total <= n:
        return np.arange(n_total)
    return np.sort(np.random.default_rng(seed).choice(n_total, n, replace=False))


TEXT_BATCH_TOKENS = 8192      # at most this many padded tokens in one batch of a text evaluation
# What one more batch costs, in padded tokens: the forward's fixed work (≈ 120 small ops on a BERT-6). A cut
# is made where it saves more padding than this. On this project's 2-core machine one forward of 96 sentences
# × 64 tokens took 3.1 s of CPU time in one batch and 4.4 s in three (torch on 2 threads, cores shared with
# other work: every op's thread barrier waits for a descheduled thread), 2.4 s and 2.5 s on one thread.
TEXT_BATCH_COST = 1024


def _is_text(x: torch.Tensor) -> bool:
    """Packed text inputs (N, 2, L) of token ids and attention mask (:func:`esm_core.models.bert.pack`)."""
    return x.ndim == 3 and x.shape[1] == 2 and not x.is_floating_point()


def text_batches(x: torch.Tensor, batch_size: int, keep_order: bool = False,
                 max_tokens: int = TEXT_BATCH_TOKENS, batch_cost: int = TEXT_BATCH_COST) -> list[torch.Tensor]:
    """Index batches of packed text inputs ``x`` (N, 2, L) for an evaluation, each to be cut to its longest
    sentence (:func:`_cut`): the sentences sorted by their number of real tokens (stable) and split where that
    saves padding — the split with the fewest padded tokens plus ``batch_cost`` per batch, each batch at most
    ``batch_size`` sentences and ``max_tokens`` padded tokens (or one sentence). So short sentences are not
    computed at the length of the longest one. ``keep_order``: consecutive slices in the inputs' order instead
    (a caller that logs every sample in order)."""
    n = x.shape[0]
    if keep_order:
        return [torch.arange(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    lengths = x[:, 1].sum(1)
    order = torch.sort(lengths, stable=True).indices
    ln = np.maximum(lengths[order].numpy().astype(np.int64), 1)
    best = np.zeros(n + 1, dtype=np.float64)           # best[i]: cost of the first i sorted sentences
    cut = np.zeros(n + 1, dtype=np.int64)
    for i in range(1, n + 1):                          # a batch j..i-1 is ln[i-1] long (sorted ascending)
        lo = max(0, i - int(batch_size), i - max(int(max_tokens) // int(ln[i - 1]), 1))
        j = np.arange(lo, i)
        c = best[lo:i] + ln[i - 1] * (i - j) + batch_cost
        k = int(np.argmin(c))
        best[i], cut[i] = c[k], j[k]
    out, i = [], n
    while i > 0:
        out.append(order[cut[i]:i])
        i = int(cut[i])
    return out[::-1]


def _cut(x: torch.Tensor) -> torch.Tensor:
    """A batch of packed text inputs cut to its longest sentence (the columns after it are padding in every row)."""
    return x[:, :, :max(int(x[:, 1].sum(1).max()), 1)]


@torch.inference_mode()
def accuracies_of(pool, visual: torch.nn.Module, split: str, tasks: list[str], batch_size: int,
                progress: Progress | None, prefix: str = "", per_task: int | None = None,
                seed: int = 0, own: bool = True) -> dict[str, float]:
    """Top-1 per task; ``per_task``: only a fixed seeded subset of that many images of each task.

    ``own``: for pools whose tasks keep their own biases (text, methods §8: ``pool.prepare``), put task t's
    into ``visual`` before scoring t (in place); False for the zero-shot reference (the base's own)."""
    dev = _module_device(visual)
    prepare = getattr(pool, "prepare", None) if own else None
    out = {}
    for i, t in enumerate(tasks):
        if prepare is not None:
            prepare(visual, t)
        x, y = pool.inputs(t, split)
        if per_task:
            ids = subset_ids(len(y), per_task, seed)
            x, y = x[ids], y[ids]
        if len(y) == 0:
            raise ValueError(f"task {t!r} has no {split!r} images")
        correct = 0
        if _is_text(x):                  # by length, each batch cut to its longest sentence (padding skipped)
            logging = bool(getattr(visual, "_collectors", None))       # an ESM++ model logging every sample
            for ids in text_batches(x, batch_size, keep_order=logging):
                f = visual(_cut(x[ids]).to(dev))
                pred = pool.logits(t, f.float()).argmax(-1).cpu()
                correct += int((pred == y[ids]).sum())
        else:
            for s in range(0, len(y), batch_size):
                f = visual(x[s:s + batch_size].to(dev))
                pred = pool.logits(t, f.float()).argmax(-1).cpu()
                correct += int((pred == y[s:s + batch_size]).sum())
        out[t] = correct / len(y)
        if progress is not None:
            progress((i + 1) / len(tasks), f"{prefix}{t}: {100 * out[t]:.1f} %")
    return out


def _task_list(pool, tasks) -> list[str]:
    tasks = list(pool.task_names) if tasks is None else list(tasks)
    for t in tasks:
        if t not in pool.task_names:
            raise ValueError(f"pool {pool.name!r} has no task {t!r}; tasks: {pool.task_names}")
    if not tasks:
        raise ValueError("no tasks to evaluate")
    return tasks


def evaluate(pool, model, split: str = "test", tasks: list[str] | None = None, *, batch_size: int = 256,
             device: str | torch.device = "auto", progress: Progress | None = None, own: bool = True
             ) -> dict[str, float]:
    """Top-1 accuracy in [0, 1] of ``model`` on each task's ``split``, with the task's frozen head.

    ``model``: a state dict with the pool's keys (built with ``pool.build_model``
    on ``device``) or an ``nn.Module`` image tower (used where it is). ``own``: see :func:`accuracies_of`.
    """
    tasks = _task_list(pool, tasks)
    if isinstance(model, torch.nn.Module):
        visual = model.eval()
    elif isinstance(model, Mapping):
        visual = pool.build_model(model, device=resolve_device(device))
    else:
        raise ValueError(f"model must be a state dict or an nn.Module, got {type(model).__name__}")
    return accuracies_of(pool, visual, split, tasks, batch_size, progress, own=own)


def reference_accuracies(pool, split: str = "test", *, device: str | torch.device = "auto",
                         progress: Progress | None = None) -> dict[str, dict[str, float]]:
    """``{"zeroshot": {task: acc}, "finetuned": {task: acc}}``: base + heads, and each task's own model.

    Cached on the pool (``pool.cache``) per split."""
    key = ("reference_accuracies", split)
    if key not in pool.cache:
        dev = resolve_device(device)
        tasks = pool.task_names
        zs = evaluate(pool, pool.base, split, device=dev, own=False,
                      progress=None if progress is None else (lambda f, d: progress(0.5 * f, f"zero-shot {d}")))
        ft = {}
        for i, t in enumerate(tasks):
            ft[t] = evaluate(pool, pool.tasks[t], split, [t], device=dev)[t]
            if progress is not None:
                progress(0.5 + 0.5 * (i + 1) / len(tasks), f"fine-tuned {t}: {100 * ft[t]:.1f} %")
        pool.cache[key] = {"zeroshot": zs, "finetuned": ft}
    return pool.cache[key]


def normalised(accs: Mapping[str, float], finetuned: Mapping[str, float]) -> dict:
    """The summary of :func:`summarize` given the fine-tuned accuracies directly."""
    out = {}
    for t, a in accs.items():
        if t not in finetuned:
            raise ValueError(f"no fine-tuned accuracy for task {t!r}")
        ref = finetuned[t]
        out[t] = {"abs": float(a), "norm": float(a) / ref if ref > 0 else float("nan")}
    if not out:
        raise ValueError("no accuracies to summarise")
    return {"tasks": out, "mean_abs": float(np.mean([v["abs"] for v in out.values()])),
            "mean_norm": float(np.mean([v["norm"] for v in out.values()]))}


def suspicious_references(finetuned: Mapping[str, float], zero_shot: Mapping[str, float], *,
                          margin: float = 0.0) -> list[str]:
    """Warnings for tasks whose fine-tuned model scores below the zero-shot base on its own task.

    Normalised accuracy divides by the fine-tuned accuracy, so it only means
    something when the fine-tuned model is the better one on its task. A
    fine-tuned model more than ``margin`` (in accuracy, 0.05 = 5 points) below
    the zero-shot base almost always means the checkpoints are attached to the
    wrong task names (swapped files) or broken; merges then show "254 %
    normalised". Returns one message per such task, in ``finetuned``'s order
    ([] when all is well); tasks missing from either mapping are skipped.
    """
    margin = float(margin)
    if not math.isfinite(margin) or margin < 0:
        raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
    out = []
    for t, ft in finetuned.items():
        zs = zero_shot.get(t)
        if zs is None or not (math.isfinite(ft) and math.isfinite(zs)):
            continue
        if ft < zs - margin:
            out.append(f"task {t!r}: its fine-tuned model scores {100 * ft:.1f} % on its own task, below the "
                       f"zero-shot base ({100 * zs:.1f} %): the checkpoint probably belongs to another task (swapped "
                       f"files?) or is broken, so normalised accuracies on {t!r} are not meaningful")
    return out


def binomial_halfwidth(p: float, n: int, z: float = 1.96) -> float:
    """Half-width of the 95 % Wilson interval of an accuracy ``p`` measured on ``n`` images."""
    if n <= 0:
        return float("nan")
    return z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)


def accuracy_interval(summary: Mapping, sizes: Mapping[str, int], finetuned: Mapping[str, float]) -> dict:
    """95 % half-widths of a merge's accuracies (binomial, tasks independent): per task, of the mean absolute
    and of the mean normalised accuracy (fine-tuned references taken as exact)."""
    tasks = list(summary["tasks"])
    hw = {t: binomial_halfwidth(float(summary["tasks"][t]["abs"]), int(sizes[t])) for t in tasks}
    T = max(len(tasks), 1)
    mean_abs = math.sqrt(sum(h * h for h in hw.values())) / T
    mean_norm = math.sqrt(sum((hw[t] / finetuned[t]) ** 2 for t in tasks if finetuned.get(t))) / T
    return {"n": {t: int(sizes[t]) for t in tasks}, "tasks": hw, "mean_abs": mean_abs, "mean_norm": mean_norm}


def summarize(pool, accs: Mapping[str, float], split: str = "test") -> dict:
    """``{"tasks": {task: {"abs": a, "norm": a / finetuned}}, "mean_abs", "mean_norm"}`` (methods §0)."""
    return normalised(accs, reference_accuracies(pool, split)["finetuned"])
