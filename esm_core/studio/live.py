"""The Merge view's operations: live merging from cached affine updates, evaluation on capped subsets, α curve."""
from __future__ import annotations

import time
from typing import Any, Mapping

import torch

from .. import __version__
from ..device import trim_heap
from ..evaluation import alpha as A
from ..evaluation.accuracy import accuracies_of, normalised
from ..merging import METHODS, apply_updates, get_method
from ..pools.heads import head_warning
from . import shared
from .inspect import ensure_cache, ensure_stats
from .session import AFFINE_CACHE, Progress, Session, _need_pool, _noop, trim_caches

ALPHA_POINTS = 12            # at most this many α values on the curve
ALPHA_EXTRA = 6              # at most this many points added when the best α is at an end of the grid
EVAL_SEED = 0


def _visual(s: Session, state_dict: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """The session's model with ``state_dict`` loaded (built once; the family's ``load_state``)."""
    dev = s.device
    if s._visual is None or next(s._visual.parameters()).device.type != dev.type:
        s._visual = s.pool.build_model(s.pool.base, device=dev)
    s.pool.family_module.load_state(s._visual, state_dict)
    return s._visual


def accuracies(s: Session, model, split: str = "test", per_task: int | None = None,
               tasks: list[str] | None = None, progress: Progress | None = None, own: bool = True
               ) -> dict[str, float]:
    """Top-1 accuracy per task on a fixed seeded subset (``per_task`` images; None: the whole split).

    ``model``: a state dict (loaded into the session's image tower) or an nn.Module.
    """
    pool = _need_pool(s)
    visual = model if isinstance(model, torch.nn.Module) else _visual(s, model)
    tasks = list(pool.task_names) if tasks is None else tasks
    return accuracies_of(pool, visual, split, tasks, 256, progress, per_task=per_task, seed=EVAL_SEED, own=own)


def references(s: Session, split: str = "test", progress: Progress | None = None) -> dict:
    """Zero-shot (base) and fine-tuned accuracies on the same capped subset as the live view; cached."""
    pool = _need_pool(s)
    with s.lock:
        if split not in s.refs:
            n = s.live_per_task if split == "test" else s.alpha_per_task
            report = progress or _noop
            # per task, shared by the sessions of a pool read from files (studio.shared): the same numbers
            keys = {(kind, t): shared.key(pool, s.device, "reference", kind, split, n, EVAL_SEED, t)
                    for kind in ("zeroshot", "finetuned") for t in pool.task_names}
            have = {k: shared.RESULTS.get(v) for k, v in keys.items()}
            todo = [t for t in pool.task_names if have[("zeroshot", t)] is None]
            zs = accuracies(s, pool.base, split, n, tasks=todo, own=False,
                            progress=lambda f, d: report(0.5 * f, f"zero-shot: {d}")) if todo else {}
            ft = {}
            for i, t in enumerate(pool.task_names):
                if t in zs:
                    shared.RESULTS.put(keys[("zeroshot", t)], zs[t])
                ft[t] = have[("finetuned", t)]
                if ft[t] is None:
                    ft[t] = accuracies(s, pool.tasks[t], split, n, [t])[t]
                    shared.RESULTS.put(keys[("finetuned", t)], ft[t])
                report(0.5 + 0.5 * (i + 1) / len(pool.task_names), f"fine-tuned model of {t}")
            zs = {t: zs[t] if t in zs else have[("zeroshot", t)] for t in pool.task_names}
            s.refs[split] = {"zeroshot": zs, "finetuned": ft}
        return s.refs[split]


def method_choices() -> list[tuple[str, str]]:
    """(label, name) of every registered method, for a dropdown."""
    return [(f"{m.title} ({m.name})", m.name) for m in METHODS.values()]


def _frozen(params: Mapping[str, Any]) -> tuple:
    return tuple(sorted((k, v) for k, v in params.items() if k != "alpha"))


def _affine(s: Session, method: str, params: Mapping[str, Any], progress: Progress | None):
    """(U0, slope) of ``method`` with ``params`` (α excluded), from the per-session cache or computed.

    Every method's update is affine in α: ``U(α) = U0 + α · slope``, measured
    from two merges (α = 0 and α = a1), or one for a method whose update is α
    times a fixed one (``Method.alpha_linear``). The pool's checkpoints were checked
    when it was loaded, so the merges skip that check. Keys whose U0 is all
    zero are one-element zero views (:func:`esm_core.evaluation.alpha.affine_updates`).
    """
    key = (method, _frozen(params))
    if key in s.affine:
        s.affine.move_to_end(key)
        return s.affine[key]
    report = progress or _noop
    stats = None
    if get_method(method).needs_stats:
        stats = ensure_stats(s, progress=lambda f, d: report(0.4 * f, d))
    cache = ensure_cache(s)        # ESM's decompositions; TSV-M and ESM share their TSV-M keys through it
    u0, slope, _ = A.affine_updates(s.pool.base, s.pool.tasks, method, params, stats=stats, cache=cache,
                                    device=s.device, check=False,
                                    progress=lambda f, d: report(0.4 + 0.6 * f, d))
    s.affine[key] = (u0, slope)
    while len(s.affine) > AFFINE_CACHE:
        s.affine.popitem(last=False)
    trim_heap()        # the merges' working tensors are freed: their pages go back before the evaluation allocates
    return u0, slope


def merge(s: Session, method: str, params: Mapping[str, Any] | None = None, progress: Progress | None = None) -> dict:
    """Merge the session's pool with ``method`` and evaluate it on the live subset.

    Adds a row to the comparison table and makes this the current merge.
    Returns the record: ``{"id", "method", "title", "params", "accs", "summary",
    "seconds", "config"}`` (the update is kept in ``s.current`` as ``U0 + α · slope``, formed when read).
    """
    pool = _need_pool(s)
    m = get_method(method)
    p = m.resolve(dict(params or {}))            # ValueError naming a bad parameter
    report = progress or _noop
    with s.lock:
        t0 = time.perf_counter()
        refs = references(s, "test", progress=(lambda f, d: report(0.1 * f, d)) if progress else None)
        computed = (method, _frozen(p)) not in s.affine
        u0, slope = _affine(s, method, p, (lambda f, d: report(0.1 + 0.8 * f, d)) if progress else None)
        ups = A.UpdatesAt(u0, slope, float(p["alpha"]))      # formed key by key as the merged model is built
        report(0.9, "evaluating the merged model")
        # a pool read from files: the same merge evaluated by another session is read, not evaluated (studio.shared)
        akey = shared.key(pool, s.device, "merge", method, tuple(sorted(p.items())), "test", s.live_per_task,
                          EVAL_SEED, tuple(pool.task_names))
        accs = shared.RESULTS.get(akey)
        if accs is None:
            visual = _visual(s, apply_updates(pool.base, ups))   # the merged state dict is freed once loaded
            accs = accuracies(s, visual, "test", s.live_per_task, progress=lambda f, d: report(0.9 + 0.09 * f, d))
            shared.RESULTS.put(akey, dict(accs))
        else:
            accs = dict(accs)
        summary = normalised(accs, refs["finetuned"])
        report(1.0, f"{m.title}: mean normalised accuracy {100 * summary['mean_norm']:.1f} %")
        # the last progress report (a cancelled merge stops at one) is above: nothing below can stop half-way
        rec = {"id": len(s.merges) + 1, "method": method, "title": m.title, "params": p, "accs": accs,
               "summary": summary, "seconds": round(time.perf_counter() - t0, 3),
               "config": merge_config(s, method, p)}
        s.merges.append(rec)
        s.current = {**rec, "updates": ups}
        trim_caches(s)                           # within the session's memory budget
        if computed:
            trim_heap()                          # the merge's working tensors are freed: give their pages back
        return rec


def merge_config(s: Session, method: str, params: Mapping[str, Any]) -> dict:
    """Everything needed to reproduce a merge: method, parameters, pool, proxy sample ids, versions."""
    pool = s.pool
    cfg = {"esm_studio": __version__, "method": method, "params": dict(params), "pool": pool.name,
           "origin": s.origin, "model": getattr(pool, "model_name", None), "tasks": list(pool.task_names),
           "evaluation": {"split": "test", f"{'sentences' if pool.modality == 'text' else 'images'}_per_task":
                          s.live_per_task, "subset_seed": EVAL_SEED}}
    if get_method(method).needs_stats and s.stats is not None:
        cfg["proxy"] = {"n": s.stats.get("n"), "seed": s.stats.get("seed"), "ids": s.stats.get("proxy_ids")}
    return cfg


def comparison_rows(s: Session) -> list[dict]:
    """One row per merge of the session: id, method, α, other parameters changed, means, per-task accuracy (%);
    on a pool whose heads were built from the user's images, a "heads" column says so in every row."""
    rows = []
    warning = head_warning(s.pool) if s.pool is not None else None
    for r in s.merges:
        m = get_method(r["method"])
        changed = {p.name: r["params"][p.name] for p in m.params
                   if p.name != "alpha" and r["params"][p.name] != p.default}
        row = {"#": r["id"], "method": r["title"], "α": round(float(r["params"]["alpha"]), 3),
               "changed parameters": ", ".join(f"{k}={v}" for k, v in changed.items()) or "defaults",
               "mean abs %": round(100 * r["summary"]["mean_abs"], 2),
               "mean norm %": round(100 * r["summary"]["mean_norm"], 2)}
        for t, v in r["summary"]["tasks"].items():
            row[f"{t} %"] = round(100 * v["abs"], 1)
        if warning:
            row["heads"] = f"⚠ {warning}"
        rows.append(row)
    return rows


def full_evaluation(s: Session, progress: Progress | None = None) -> dict:
    """The current merge on the whole test split (not the capped live subset), with full-split references."""
    pool = _need_pool(s)
    if s.current is None:
        raise ValueError("merge first: there is no current merge to evaluate")
    report = progress or _noop
    with s.lock:
        sd = apply_updates(pool.base, s.current["updates"])
        accs = accuracies(s, sd, "test", None, progress=lambda f, d: report(0.4 * f, d))
        zs = accuracies(s, pool.base, "test", None, progress=lambda f, d: report(0.4 + 0.3 * f, f"zero-shot {d}"))
        ft = {}
        for i, t in enumerate(pool.task_names):
            ft[t] = accuracies(s, pool.tasks[t], "test", None, [t])[t]
            report(0.7 + 0.3 * (i + 1) / len(pool.task_names), f"fine-tuned {t}")
        return {"summary": normalised(accs, ft), "refs": {"zeroshot": zs, "finetuned": ft}}


def alpha_curve(s: Session, method: str, params: Mapping[str, Any] | None = None,
                progress: Progress | None = None) -> tuple[float, list[tuple[float, float]]]:
    """Mean normalised accuracy on the validation subset over the method's α grid (≤ ALPHA_POINTS values),
    extended below / above while the best α is the grid's first / last point (at most ALPHA_EXTRA points, within
    α's library bounds — past the slider's range, which the Merge view then widens), so that the optimum is
    interior or at a bound of α (:func:`esm_core.evaluation.alpha.extend_curve`).

    Returns ``(best α, [(α, mean normalised accuracy)])`` sorted by α.
    """
    pool = _need_pool(s)
    m = get_method(method)
    p = m.resolve(dict(params or {}))
    report = progress or _noop
    with s.lock:
        refs = references(s, "val", progress=lambda f, d: report(0.1 * f, f"references (val): {d}"))
        u0, slope = _affine(s, method, p, lambda f, d: report(0.1 + 0.2 * f, d))
        grid = A.curve_grid(method, ALPHA_POINTS)

        def score(a: float) -> float:
            sd = A.state_at(pool.base, u0, slope, a)         # the α policy's candidate state, as in the CLI search
            accs = accuracies(s, sd, "val", s.alpha_per_task, progress=lambda f, d: report(
                min(0.95, 0.3 + 0.6 * len(curve) / len(grid)), f"α = {a:.2f}: {d}"))
            return normalised(accs, refs["finetuned"])["mean_norm"]

        curve = []
        for i, a in enumerate(grid):
            curve.append((float(a), score(float(a))))
            report(0.3 + 0.6 * (i + 1) / len(grid), f"α = {a:.2f}: {100 * curve[-1][1]:.1f} % normalised (val)")
        lo, hi = A.alpha_param(method).bounds         # α's library bounds, not the slider's range (the app widens it)
        for a in A.extend_curve(curve, score, lo, hi, ALPHA_EXTRA):
            report(0.95, f"α = {a:.2f}: extending the grid (the best α was at its end)")
        best = max(curve, key=lambda e: e[1])[0]
        s.curves[(method, _frozen(p))] = (best, curve)
        trim_heap()
        return best, curve


def sample_sizes(s: Session, split: str = "test", per_task: int | None = None) -> dict[str, int]:
    """Images per task behind a capped accuracy (``per_task``, default: the live subset of ``split``)."""
    pool = _need_pool(s)
    if per_task is None:
        per_task = s.live_per_task if split == "test" else s.alpha_per_task
    return {t: min(int(per_task), len(pool.inputs(t, split)[1])) for t in pool.task_names}
