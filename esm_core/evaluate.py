"""Per-task accuracy (absolute and normalised) and the α search (SPEC §0).

- :func:`evaluate`: top-1 accuracy of one model on each task of a pool, with
  that task's frozen head.
- :func:`summarize`: absolute and normalised accuracy (acc / fine-tuned acc),
  per task and averaged.
- :func:`reference_accuracies`: "zeroshot" (base + heads) and "finetuned"
  (each task's own model), cached on the pool.
- :func:`search_alpha`: picks α by the best mean normalised *validation*
  accuracy, on the grid ``linspace(lo, hi, n)[1:]`` of the method or by
  golden-section search on [0, 2] (ESM family). Every method's update is affine
  in α, so the updates at α = 0 and α = 1 are computed once and each candidate
  is ``θ0 + U0 + α (U1 − U0)``: a search costs two merges, not thirty.
"""
from __future__ import annotations

import json
import math
import sys
from typing import Any, Callable, Mapping

import numpy as np
import torch

from .merge import merge_updates, resolve_device
from .methods.registry import get_method

Progress = Callable[[float, str], None]
GOLDEN_RANGE = (0.0, 2.0)
GOLDEN_TOL = 0.01
GOLDEN_MAX_EVALS = 15


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


@torch.inference_mode()
def _accuracies(pool, visual: torch.nn.Module, split: str, tasks: list[str], batch_size: int,
                progress: Progress | None, prefix: str = "", per_task: int | None = None,
                seed: int = 0) -> dict[str, float]:
    """Top-1 per task; ``per_task``: only a fixed seeded subset of that many images of each task."""
    dev = _module_device(visual)
    out = {}
    for i, t in enumerate(tasks):
        x, y = pool.images(t, split)
        if per_task:
            ids = subset_ids(len(y), per_task, seed)
            x, y = x[ids], y[ids]
        if len(y) == 0:
            raise ValueError(f"task {t!r} has no {split!r} images")
        correct = 0
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
             device: str | torch.device = "auto", progress: Progress | None = None) -> dict[str, float]:
    """Top-1 accuracy in [0, 1] of ``model`` on each task's ``split``, with the task's frozen head.

    ``model``: a state dict with the pool's keys (built with ``pool.build_visual``
    on ``device``) or an ``nn.Module`` image tower (used where it is).
    """
    tasks = _task_list(pool, tasks)
    if isinstance(model, torch.nn.Module):
        visual = model.eval()
    elif isinstance(model, Mapping):
        visual = pool.build_visual(model, device=resolve_device(device))
    else:
        raise ValueError(f"model must be a state dict or an nn.Module, got {type(model).__name__}")
    return _accuracies(pool, visual, split, tasks, batch_size, progress)


def reference_accuracies(pool, split: str = "test", *, device: str | torch.device = "auto",
                         progress: Progress | None = None) -> dict[str, dict[str, float]]:
    """``{"zeroshot": {task: acc}, "finetuned": {task: acc}}``: base + heads, and each task's own model.

    Cached on the pool (``pool.cache``) per split."""
    key = ("reference_accuracies", split)
    if key not in pool.cache:
        dev = resolve_device(device)
        tasks = pool.task_names
        zs = evaluate(pool, pool.base, split, device=dev,
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


def summarize(pool, accs: Mapping[str, float], split: str = "test") -> dict:
    """``{"tasks": {task: {"abs": a, "norm": a / finetuned}}, "mean_abs", "mean_norm"}`` (SPEC §0)."""
    return normalised(accs, reference_accuracies(pool, split)["finetuned"])


# ---------------------------------------------------------------- α search

def alpha_grid(method: str) -> list[float]:
    """The method's grid ``linspace(lo, hi, n)[1:]`` (SPEC §0)."""
    lo, hi, n = get_method(method).alpha_grid
    return [float(a) for a in np.linspace(lo, hi, n)[1:]]


def golden_section_max(f: Callable[[float], float], lo: float = GOLDEN_RANGE[0], hi: float = GOLDEN_RANGE[1], *,
                       tol: float = GOLDEN_TOL, max_evals: int = GOLDEN_MAX_EVALS) -> tuple[float, list[tuple[float, float]]]:
    """Golden-section search for the maximum of a unimodal ``f`` on [lo, hi].

    Stops when the bracket is narrower than ``tol`` or after ``max_evals``
    evaluations. Returns (best evaluated x, [(x, f(x)) in evaluation order]).
    """
    if not hi > lo:
        raise ValueError(f"golden-section search needs lo < hi, got [{lo}, {hi}]")
    if max_evals < 2:
        raise ValueError("golden-section search needs at least 2 evaluations")
    r = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - r * (b - a), a + r * (b - a)
    evals = [(c, f(c)), (d, f(d))]
    fc, fd = evals[0][1], evals[1][1]
    while b - a > tol and len(evals) < max_evals:
        if fc >= fd:          # maximum in [a, d]
            b, d, fd = d, c, fc
            c = b - r * (b - a)
            fc = f(c)
            evals.append((c, fc))
        else:                 # maximum in [c, b]
            a, c, fc = c, d, fd
            d = a + r * (b - a)
            fd = f(d)
            evals.append((d, fd))
    best = max(evals, key=lambda e: e[1])
    return best[0], evals


def _interpolated(base, u0, diff, alpha: float) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in base.items():
        if k in u0:
            out[k] = v.float() + u0[k] + alpha * diff[k]
        else:
            out[k] = v
    return out


def affine_updates(pool, method: str, params: Mapping[str, Any] | None = None, *, stats=None, cache=None,
                   device: str | torch.device = "auto", check: bool = True,
                   progress: Progress | None = None) -> tuple[dict, dict, float]:
    """(U0, U1 − U0 scaled to α = 1, a1): the method's update at α = 0 and its slope in α.

    The slope is measured at ``a1 = min(1, max α)`` of the method's schema.
    ``check=False`` skips validating the checkpoints (a pool already checked)."""
    m = get_method(method)
    p = {k: v for k, v in dict(params or {}).items() if k != "alpha"}
    amax = next(q.max for q in m.params if q.name == "alpha")
    a1 = 1.0 if amax is None else min(1.0, float(amax))
    kw = dict(stats=stats, cache=cache, device=device)
    u0 = merge_updates(method, pool.base, pool.tasks, alpha=0.0, check=check, **kw, **p,
                       progress=None if progress is None else (lambda f, d: progress(0.5 * f, d)))
    u1 = merge_updates(method, pool.base, pool.tasks, alpha=a1, check=False, **kw, **p,
                       progress=None if progress is None else (lambda f, d: progress(0.5 + 0.5 * f, d)))
    keys = set(u0) | set(u1)
    zero = {k: torch.zeros_like(pool.base[k], dtype=torch.float32) for k in keys}
    u0 = {k: u0.get(k, zero[k]) for k in keys}
    diff = {k: (u1.get(k, zero[k]) - u0[k]) / a1 for k in keys}
    return u0, diff, a1


def search_alpha(pool, method: str, params: Mapping[str, Any] | None = None, *, stats=None, cache=None,
                 split: str = "val", progress: Progress | None = None, strategy: str | None = None,
                 device: str | torch.device = "auto", batch_size: int = 256) -> tuple[float, list[tuple[float, float]]]:
    """Choose α for ``method`` by the best mean normalised accuracy on ``split`` (validation).

    ``strategy``: "grid" (the method's ``linspace(lo, hi, n)[1:]``) or "golden"
    (golden-section on [0, 2], tol 0.01, ≤ 15 evaluations); default "golden" for
    methods that need activation statistics (ESM family), else "grid".
    Returns ``(best α, [(α, mean normalised accuracy)] sorted by α)``.
    """
    m = get_method(method)
    strategy = strategy or ("golden" if m.needs_stats else "grid")
    if strategy not in ("grid", "golden"):
        raise ValueError(f"strategy must be 'grid' or 'golden', got {strategy!r}")
    dev = resolve_device(device)
    report = progress or (lambda f, d: None)
    report(0.0, f"{method}: merging at α = 0 and α = 1")
    u0, diff, _ = affine_updates(pool, method, params, stats=stats, cache=cache, device=dev)
    ft = reference_accuracies(pool, split, device=dev)["finetuned"]
    visual = pool.build_visual(pool.base, device=dev)
    amax = next(q.max for q in m.params if q.name == "alpha")
    n_total = [len(alpha_grid(method)) if strategy == "grid" else GOLDEN_MAX_EVALS]
    done = [0]

    def score(alpha: float) -> float:
        sd = _interpolated(pool.base, u0, diff, alpha)
        visual.load_state_dict({k[len("visual."):] if k.startswith("visual.") else k: v for k, v in sd.items()})
        accs = _accuracies(pool, visual, split, pool.task_names, batch_size, None)
        s = normalised(accs, ft)["mean_norm"]
        done[0] += 1
        report(min(done[0] / n_total[0], 1.0), f"{method}: α = {alpha:.3f} → {100 * s:.2f} % normalised ({split})")
        return s

    if strategy == "grid":
        curve = [(a, score(a)) for a in alpha_grid(method)]
        best = max(curve, key=lambda e: e[1])[0]   # first maximum in grid order
    else:
        lo, hi = GOLDEN_RANGE
        if amax is not None:
            hi = min(hi, float(amax))
        best, evals = golden_section_max(score, lo, hi)
        curve = sorted(evals)
    return float(best), [(float(a), float(s)) for a, s in curve]


def merged_state(pool, method: str, params: Mapping[str, Any] | None = None, alpha: float | None = None, *,
                 stats=None, cache=None, device: str | torch.device = "auto") -> dict[str, torch.Tensor]:
    """θ0 + the method's update at ``alpha`` (the method's default α when None)."""
    from .merge import apply_updates
    p = dict(params or {})
    if alpha is not None:
        p["alpha"] = alpha
    return apply_updates(pool.base, merge_updates(method, pool.base, pool.tasks, stats=stats, cache=cache,
                                                  device=device, **p))


def evaluate_method(pool, method: str, params: Mapping[str, Any] | None = None, *, alpha: float | str = "auto",
                    split: str = "test", stats=None, cache=None, device: str | torch.device = "auto",
                    progress: Progress | None = None) -> dict:
    """Merge with ``method`` (α chosen on validation when ``alpha="auto"``) and summarise it on ``split``."""
    report = progress or (lambda f, d: None)
    p = {k: v for k, v in dict(params or {}).items() if k != "alpha"}
    curve = None
    if alpha == "auto":
        alpha, curve = search_alpha(pool, method, p, stats=stats, cache=cache, device=device,
                                    progress=lambda f, d: report(0.9 * f, d))
    alpha = float(alpha)
    sd = merged_state(pool, method, p, alpha, stats=stats, cache=cache, device=device)
    accs = evaluate(pool, sd, split, device=device, progress=lambda f, d: report(0.9 + 0.1 * f, d))
    out = summarize(pool, accs, split)
    out.update({"method": method, "alpha": alpha, "params": get_method(method).resolve({**p, "alpha": alpha})})
    if curve is not None:
        out["val_curve"] = curve
    return out


# ---------------------------------------------------------------- CLI

def _load_pool_arg(spec: str):
    from pathlib import Path
    if spec == "demo":
        from .demo import load_demo_pool
        return load_demo_pool()
    p = Path(spec)
    if p.is_dir() and (p / "config.json").is_file():
        from .demo import load_demo_pool
        return load_demo_pool(p)
    if p.suffix == ".json":
        from .pool import load_pool
        return load_pool(p)
    raise ValueError(f"--pool must be 'demo', a demo-style folder or a pool file (.json), got {spec!r}")


def _stats_for(pool, progress):
    try:
        from .probe import probe_pool
    except ModuleNotFoundError as e:
        if e.name != "esm_core.probe":
            raise
        raise ValueError("this method needs activation statistics, but esm_core.probe is not available") from None
    return probe_pool(pool, progress=progress)


def _row(summary: dict) -> dict:
    return {"tasks": summary["tasks"], "mean_abs": summary["mean_abs"], "mean_norm": summary["mean_norm"],
            **{k: summary[k] for k in ("alpha", "params", "val_curve", "routing_accuracy", "storage")
               if k in summary}}


def evaluate_esmpp(pool, params: Mapping[str, Any] | None = None, *, alpha: float | str = "auto",
                   split: str = "test", stats=None, cache=None, device: str | torch.device = "auto",
                   progress: Progress | None = None) -> dict[str, dict]:
    """ESM++ (SPEC §7) on ``pool``: rows ``esmpp-r{rank}`` (routed) and ``esmpp-r{rank}-oracle``.

    ``params``: ``rank`` (default 32) plus any ESM parameter; ``alpha`` is ESM's α
    ("auto": golden-section search on validation, as for ESM). The routed row
    carries routing accuracy per routed layer and the storage the experts add.
    """
    from .routing import build_esmpp, evaluate_routed, routing_accuracy
    p = dict(params or {})
    rank = int(p.pop("rank", 32))
    report = progress or (lambda f, d: None)
    routed = build_esmpp(pool, stats, rank=rank, alpha=None if alpha == "auto" else float(alpha), esm_params=p,
                         cache=cache, device=device, progress=lambda f, d: report(0.6 * f, d))
    rows = {}
    for i, mode in enumerate(("route", "oracle")):
        accs, log = evaluate_routed(pool, routed, split, mode=mode,
                                    progress=lambda f, d, i=i: report(0.6 + 0.2 * (i + f), d))
        out = summarize(pool, accs, split)
        out.update({"alpha": routed.config["alpha"], "params": {"rank": rank, **routed.config["esm_params"]}})
        if mode == "route":
            out["routing_accuracy"] = {k: float(a) for k, a in zip(log.keys, routing_accuracy(log).tolist())}
            out["storage"] = routed.experts.storage()
        rows[f"esmpp-r{rank}" + ("-oracle" if mode == "oracle" else "")] = out
    return rows


def _table(pool, rows: dict[str, dict], split: str) -> str:
    tasks = pool.task_names
    w = max(10, *(len(t) for t in tasks))
    head = f"{'method':14s}{'alpha':>7s} " + " ".join(f"{t[:w]:>{w}s}" for t in tasks) + f" {'mean':>7s} {'norm':>7s}"
    lines = [f"pool {pool.name!r}, split {split!r}: top-1 accuracy % (norm = mean of acc / fine-tuned acc)", head,
             "-" * len(head)]
    for name, r in rows.items():
        a = f"{r['alpha']:.3f}" if "alpha" in r else "-"
        cells = " ".join(f"{100 * r['tasks'][t]['abs']:>{w}.1f}" for t in tasks)
        lines.append(f"{name:14s}{a:>7s} {cells} {100 * r['mean_abs']:7.2f} {100 * r['mean_norm']:7.2f}")
    return "\n".join(lines)


def cmd_eval(args) -> int:
    from .cli import parse_sets
    from .methods import METHODS
    quiet = args.json or args.quiet

    def progress(frac, desc):
        if not quiet:
            print(f"\r[{100 * frac:5.1f} %] {desc[:90]:90s}", end="", file=sys.stderr, flush=True)

    pool = _load_pool_arg(args.pool)
    params = parse_sets(args.set)
    refs = reference_accuracies(pool, args.split, device=args.device)
    warnings = suspicious_references(refs["finetuned"], refs["zeroshot"])
    rows = {"zeroshot": _row(summarize(pool, refs["zeroshot"], args.split)),
            "finetuned": _row(summarize(pool, refs["finetuned"], args.split))}
    if args.method in ("zeroshot", "finetuned"):
        rows = {args.method: rows[args.method]}
        methods = []
    elif args.method == "all":
        if params:
            raise ValueError("--set cannot be combined with --method all")
        methods = list(METHODS) + ["esmpp:8", "esmpp:32"]
    elif args.method == "esmpp":
        methods = [f"esmpp:{params.pop('rank', 32)}"]
    else:
        get_method(args.method)
        methods = [args.method]
    alpha = args.alpha if args.alpha == "auto" else float(args.alpha)
    stats = None
    for name in methods:
        if name.startswith("esmpp:"):
            if stats is None:
                stats = _stats_for(pool, progress)
            # Under --method all, ESM++ starts from the ESM row's α rather than searching again.
            a = rows["esm"]["alpha"] if "esm" in rows and alpha == "auto" else alpha
            for key, r in evaluate_esmpp(pool, {**params, "rank": name.split(":")[1]}, alpha=a, split=args.split,
                                         stats=stats, device=args.device, progress=progress).items():
                rows[key] = _row(r)
            continue
        m = get_method(name)
        if m.needs_stats and stats is None:
            stats = _stats_for(pool, progress)
        r = evaluate_method(pool, name, params if args.method != "all" else None, alpha=alpha, split=args.split,
                            stats=stats if m.needs_stats else None, device=args.device, progress=progress)
        rows[name] = _row(r)
    if not quiet:
        print("", file=sys.stderr)
    if args.json:
        print(json.dumps({"pool": pool.name, "split": args.split, "tasks": pool.task_names, "results": rows,
                          "warnings": warnings}, indent=2))
    else:
        print(_table(pool, rows, args.split))
        for w in warnings:                # they qualify the table's normalised numbers: printed with it
            print(f"warning: {w}")
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate a merging method on a pool (per-task accuracy, α search)")
    p.add_argument("--pool", default="demo", help="'demo' (built-in), a demo-style folder, or a pool file")
    p.add_argument("--method", required=True, help="a method name, 'esmpp' (ESM++: --set rank=8|32, routed and oracle rows), 'all', "
                   "'zeroshot' or 'finetuned'")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="method parameter (repeatable)")
    p.add_argument("--alpha", default="auto", help="'auto' (chosen on validation) or a number")
    p.add_argument("--split", default="test", choices=("val", "test"))
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=cmd_eval)
