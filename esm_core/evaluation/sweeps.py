"""Sweeps: the papers' figures reproduced on the loaded pool, each point one ordinary evaluation.

- :func:`ablation`: SVD directions → SVD + polarised scaling → ESD → ESD + inter-layer scaling → ESD + all three
  scalings (= ESM), each at its own α chosen on validation (the ESM paper's ablation rows, docs/methods.md §6);
- :func:`task_count`: accuracy against the number of tasks merged (2 … T), averaged over seeded task subsets;
- :func:`rank_sweep`: ESM against its rank fraction and ESM++ against its expert rank, next to the ESD energy
  kept at that rank;
- :func:`proxy_sweep`: ESM against the number of proxy samples per task, and with every task's statistics
  taken on another task's proxy inputs (the paper's out-of-distribution check).

Every point is :func:`~esm_core.evaluation.runs.evaluate_method` (or
:func:`~esm_core.evaluation.esmpp.evaluate_esmpp`) on the pool or on a view of it — a task subset or fewer
evaluation images per task (``max_images``), sharing the pool's tensors, never copying weights — so a point
equals the single evaluation it stands for. Accuracies come with the number of test inputs ``n`` and 95 % Wilson
intervals (per task; the mean's half-width combines the per-task ones, tasks independent).

A sweep returns ``{"kind", "pool", "params", "rows": [plain dicts], "points": [...], "seconds", "cached"}``.
Finished sweeps are cached on the pool (``pool.cache``) per kind and parameters. ``progress(frac, desc)`` is
called inside every evaluation (per α, per task); a sweep stops when it raises or when ``should_stop()`` returns
True (:class:`SweepCancelled`), and then leaves ``pool.cache`` as it found it.
"""
from __future__ import annotations

import csv
import io
import json
import math
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from PIL import Image, ImageDraw

from .. import models
from ..device import resolve_device
from ..esmpp import ESMPP
from ..merging import get_method
from ..merging.esd import esd
from ..merging.esm import new_cache
from ..merging.stats import task_layer_stats
from ..probe import probe, probe_pool
from .esmpp import evaluate_esmpp
from .runs import evaluate_method
from ..pools.taskpool import subset_pool
from .accuracy import binomial_halfwidth, reference_accuracies, subset_ids
from .esmpp import wilson_interval

Progress = Callable[[float, str], None]

KINDS = ("ablation", "tasks", "rank", "proxy")
CACHE_KEY = "sweeps"                 # pool.cache[CACHE_KEY] = {(kind, params): result}

# (row id, label, ESM parameters): the ESM paper's ablation. "Without polarised scaling" = the three polarised
# exponents p_task = p_dim = p_layer = 0; the eigenvalue weight (eig_exp 0.15) is not one of them and stays on.
ABLATION_ROWS = (
    ("svd", "SVD directions", {"directions": "svd", "p_task": 0.0, "p_dim": 0.0, "p_layer": 0.0}),
    ("svd+polar", "SVD + polarised scaling", {"directions": "svd"}),
    ("esd", "ESD", {"p_task": 0.0, "p_dim": 0.0, "p_layer": 0.0}),
    ("esd+layer", "ESD + inter-layer scaling", {"p_task": 0.0, "p_dim": 0.0, "p_layer": 2.0}),
    ("esm", "ESD + all three scalings (ESM)", {}),
)
DEFAULT_FRACTIONS = (0.25, 0.5, 1.0, 2.0)
DEFAULT_EXPERT_RANKS = (2, 8, 32)
DEFAULT_PROXY_NS = (1, 2, 4, 8, 16, 32)
DEFAULT_TASK_METHODS = ("esm", "tsv_m", "task_arithmetic")
MAX_POINTS = 200                     # a sweep asking for more evaluations than this is refused before any work
MAX_SEEDS = 20
MAX_PROXY = 4096


class SweepCancelled(Exception):
    """The sweep's ``should_stop()`` said stop; nothing it computed was kept."""


# ---------------------------------------------------------------------------
# Plumbing: progress with cancellation, the cache, views of the pool
# ---------------------------------------------------------------------------


class _Steps:
    """Progress over ``total`` evaluations: the i-th :meth:`step` reports on [i/total, (i+1)/total]; every report
    first asks ``should_stop()`` (→ :class:`SweepCancelled`); whatever ``progress`` raises goes up unchanged."""

    def __init__(self, total: int, progress: Progress | None, should_stop: Callable[[], bool] | None):
        self.total, self.next = max(int(total), 1), 0
        self.progress, self.should_stop = progress, should_stop

    def report(self, frac: float, desc: str) -> None:
        if self.should_stop is not None and self.should_stop():
            raise SweepCancelled("sweep cancelled")
        if self.progress is not None:
            self.progress(min(1.0, max(0.0, frac)), desc)

    def step(self, label: str) -> Progress:
        """The progress function of the next evaluation (its descriptions prefixed with ``label``)."""
        i = self.next
        self.next += 1
        return lambda f, d: self.report((i + min(max(float(f), 0.0), 1.0)) / self.total, f"{label}: {d}")


def _freeze(x):
    if isinstance(x, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in x.items()))
    if isinstance(x, (list, tuple)):
        return tuple(_freeze(v) for v in x)
    return x


def sweep_cache(pool) -> dict:
    """The finished sweeps cached on ``pool``: ``{(kind, frozen params): result}`` (a copy: read-only view)."""
    return dict(pool.cache.get(CACHE_KEY, {}))


def _run(pool, kind: str, params: dict, body: Callable[[_Steps], tuple[list, list]], total: int,
         progress: Progress | None, should_stop: Callable[[], bool] | None, use_cache: bool) -> dict:
    """Run ``body`` once (or return the cached result); on any failure, ``pool.cache`` is put back as it was."""
    if kind not in KINDS:
        raise ValueError(f"sweep kind must be one of {list(KINDS)}, got {kind!r}")
    if total > MAX_POINTS:
        raise ValueError(f"this {kind} sweep asks for {total} evaluations, more than {MAX_POINTS}: fewer values")
    key = (kind, _freeze(params))
    hit = pool.cache.get(CACHE_KEY, {}).get(key)
    if use_cache and hit is not None:
        return {**hit, "cached": True}
    before = set(pool.cache)
    steps = _Steps(total, progress, should_stop)
    t0 = time.perf_counter()
    try:
        steps.report(0.0, f"{kind} sweep: {total} evaluations")
        rows, points = body(steps)
    except BaseException:
        for k in [k for k in pool.cache if k not in before]:       # what the cancelled work cached on the pool
            pool.cache.pop(k, None)
        raise
    out = {"kind": kind, "pool": getattr(pool, "name", None), "params": params, "rows": rows, "points": points,
           "seconds": round(time.perf_counter() - t0, 3), "cached": False}
    pool.cache.setdefault(CACHE_KEY, {})[key] = out
    if progress is not None:
        progress(1.0, f"{kind} sweep done")
    return out


def _input_key(pool, task: str, split: str) -> tuple:
    return ("inputs", task, split)


def eval_view(pool, tasks: Sequence[str] | None = None, max_images: int | None = None, seed: int = 0):
    """``pool`` restricted to ``tasks`` (None: all) and, with ``max_images``, to a seeded subset of at most that many
    validation and test inputs per task (:func:`~esm_core.evaluation.accuracy.subset_ids`). No tensor of the model
    is copied; the pool's reference accuracies are reused when the evaluation inputs are the pool's own."""
    names = list(pool.task_names) if tasks is None else list(tasks)
    if not names:
        raise ValueError("a sweep point needs at least one task")
    if max_images is not None and int(max_images) < 1:
        raise ValueError(f"max_images must be >= 1 (or None: every image), got {max_images!r}")
    if tasks is None and max_images is None:
        return pool
    view = subset_pool(pool, names)
    for t in names:
        for split in ("val", "test"):
            x, y = pool.inputs(t, split)
            if max_images is not None and len(y) > int(max_images):
                ids = torch.from_numpy(subset_ids(len(y), int(max_images), seed))
                x, y = x[ids], y[ids]
            view.cache[_input_key(view, t, split)] = (x, y)
            if view.inputs(t, split)[1] is not y:          # the pool type keeps its inputs elsewhere: say so
                raise ValueError(f"cannot restrict the evaluation inputs of a {type(pool).__name__}")
    if max_images is None:
        for split in ("val", "test"):
            ref = pool.cache.get(("reference_accuracies", split))
            if ref is not None:
                view.cache[("reference_accuracies", split)] = {w: {t: v[t] for t in names} for w, v in ref.items()}
    return view


def _with_refs(view, parent) -> None:
    """Copy ``parent``'s reference accuracies (restricted to ``view``'s tasks) when both evaluate the same inputs."""
    for split in ("val", "test"):
        ref = parent.cache.get(("reference_accuracies", split))
        if ref is not None:
            view.cache[("reference_accuracies", split)] = {w: {t: v[t] for t in view.task_names}
                                                           for w, v in ref.items()}
    for t in view.task_names:
        for split in ("val", "test"):
            k = _input_key(parent, t, split)
            if k in parent.cache:
                view.cache[k] = parent.cache[k]


# ---------------------------------------------------------------------------
# One point
# ---------------------------------------------------------------------------


def point_row(pool, summary: Mapping, split: str = "test") -> dict:
    """A flat row of one evaluation: mean absolute / normalised accuracy with 95 % half-widths (per-task Wilson
    half-widths combined, tasks independent), n (test inputs in all), α, and per task its accuracy, n and
    Wilson interval."""
    refs = reference_accuracies(pool, split)["finetuned"]
    row: dict[str, Any] = {}
    hw_abs, hw_norm, n_all = [], [], 0
    for t, v in summary["tasks"].items():
        n = int(len(pool.inputs(t, split)[1]))
        a = float(v["abs"])
        lo, hi = wilson_interval(int(round(a * n)), n)
        h = binomial_halfwidth(a, n)
        hw_abs.append(h)
        if refs.get(t):
            hw_norm.append(h / refs[t])
        n_all += n
        row[f"acc:{t}"] = a
        row[f"n:{t}"] = n
        row[f"lo:{t}"], row[f"hi:{t}"] = lo, hi
    T = max(len(hw_abs), 1)
    head = {"mean_abs": float(summary["mean_abs"]), "mean_abs_hw": math.sqrt(sum(h * h for h in hw_abs)) / T,
            "mean_norm": float(summary["mean_norm"]), "mean_norm_hw": math.sqrt(sum(h * h for h in hw_norm)) / T,
            "n": n_all}
    if "alpha" in summary:
        head["alpha"] = float(summary["alpha"])
    return {**head, **row}


def _evaluate(view, method: str, params: Mapping, *, stats, cache, alpha, device, progress) -> dict:
    return evaluate_method(view, method, dict(params), alpha=alpha, split="test", stats=stats, cache=cache,
                           device=device, progress=progress)


def _needs_stats(method: str, params: Mapping) -> bool:
    return get_method(method).needs_stats and dict(params).get("directions", "esd") != "svd"


def _probe(pool, n: int, seed: int, device, progress: Progress | None, source: Mapping[str, str] | None = None):
    """``probe_pool``'s Stats; ``source``: task t probed (in fine-tuned model t) on task ``source[t]``'s proxy inputs."""
    if source is None:
        return probe_pool(pool, n=n, seed=seed, device=device, progress=progress)
    dev = resolve_device(device)
    names = list(pool.task_names)
    out = {"tasks": {}, "proxy_ids": {}, "n": int(n), "seed": int(seed), "source": dict(source)}
    for i, t in enumerate(names):
        if progress is not None:
            progress(i / len(names), f"probing {t} on {source[t]}'s proxy inputs")
        x, ids = pool.proxy(source[t], n, seed)
        visual = pool.build_model(pool.tasks[t], device=dev)
        out["tasks"][t] = probe(visual, x, device=dev)
        out["proxy_ids"][t] = list(ids)
        del visual
    return out


# ---------------------------------------------------------------------------
# The sweeps
# ---------------------------------------------------------------------------


def ablation(pool, *, max_images: int | None = None, proxy_n: int = 32, seed: int = 0,
             device: str | torch.device = "auto", progress: Progress | None = None,
             should_stop: Callable[[], bool] | None = None, use_cache: bool = True) -> dict:
    """The ESM paper's ablation rows (:data:`ABLATION_ROWS`), each at its own α chosen on validation."""
    _check_n(proxy_n, "proxy_n")
    params = {"max_images": max_images, "proxy_n": int(proxy_n), "seed": int(seed)}

    def body(steps: _Steps):
        view = eval_view(pool, None, max_images)
        stats = _probe(pool, proxy_n, seed, device, steps.step("probe"))
        cache = new_cache()
        rows = []
        for rid, label, p in ABLATION_ROWS:
            r = _evaluate(view, "esm", p, stats=stats, cache=cache, alpha="auto", device=device,
                          progress=steps.step(label))
            rows.append({"row": rid, "label": label, "method": "esm", "params": json.dumps(p, sort_keys=True),
                         **point_row(view, r)})
        return rows, []

    return _run(pool, "ablation", params, body, 1 + len(ABLATION_ROWS), progress, should_stop, use_cache)


def task_subsets(names: Sequence[str], T: int, seeds: Sequence[int]) -> list[tuple[str, ...]]:
    """The distinct subsets of ``T`` of ``names`` drawn with each seed (in the pool's order; with T = len(names)
    only one)."""
    out = []
    for s in seeds:
        ids = np.sort(np.random.default_rng(int(s)).choice(len(names), size=T, replace=False))
        sub = tuple(names[i] for i in ids)
        if sub not in out:
            out.append(sub)
    return out


def esd_layers(base: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """``{key: layer type}`` of the ESD keys of ESM's default ``esd_types="auto"`` (the model family's ESD types)."""
    fam = models.family_of(base)
    types = models.layer_types_of(base, fam.NAME if fam else None)
    esd = set(fam.ESD_TYPES) if fam is not None else set(types.values())
    return {k: t for k, t in types.items() if t in esd and getattr(base[k], "ndim", 0) == 2}


def esd_ranks(pool, T: int) -> dict[str, int]:
    """The default per-task rank ``⌊d_out / T⌋`` of each ESD layer type of the pool's model (its d_out the first
    such key's)."""
    out: dict[str, int] = {}
    for k, t in esd_layers(pool.base).items():
        out.setdefault(t.removesuffix(".weight").removesuffix("_weight"), int(pool.base[k].shape[0]) // T)
    return out


def task_count(pool, methods: Sequence[str] = DEFAULT_TASK_METHODS, seeds: Sequence[int] = (0, 1, 2), *,
               counts: Sequence[int] | None = None, max_images: int | None = None, proxy_n: int = 32,
               device: str | torch.device = "auto", progress: Progress | None = None,
               should_stop: Callable[[], bool] | None = None, use_cache: bool = True) -> dict:
    """Normalised accuracy against the number of tasks merged (``counts``, default 2 … T), per method, averaged over
    the task subsets the ``seeds`` draw; each row has the mean, standard deviation, min and max over subsets."""
    names = list(pool.task_names)
    methods = [get_method(m).name for m in methods]
    if not methods:
        raise ValueError("give at least one method")
    seeds = [int(s) for s in seeds]
    if not seeds or len(seeds) > MAX_SEEDS:
        raise ValueError(f"give between 1 and {MAX_SEEDS} seeds, got {len(seeds)}")
    counts = list(range(2, len(names) + 1)) if counts is None else sorted({int(c) for c in counts})
    bad = [c for c in counts if not 1 <= c <= len(names)]
    if bad or not counts:
        raise ValueError(f"task counts must lie in 1 … {len(names)} (the pool's tasks), got {bad or counts}")
    plan = [(T, sub) for T in counts for sub in task_subsets(names, T, seeds)]
    total = len(plan) * len(methods)
    params = {"methods": methods, "seeds": seeds, "counts": counts, "max_images": max_images,
              "proxy_n": int(proxy_n)}

    def body(steps: _Steps):
        view = eval_view(pool, None, max_images)
        reference_accuracies(view, "val")
        reference_accuracies(view, "test")
        stats = None
        if any(_needs_stats(m, {}) for m in methods):
            stats = _probe(pool, proxy_n, 0, device, None)
        cache = new_cache()
        points = []
        for T, sub in plan:
            sv = subset_pool(view, list(sub))
            _with_refs(sv, view)
            for m in methods:
                r = _evaluate(sv, m, {}, stats=stats if _needs_stats(m, {}) else None, cache=cache,
                              alpha="auto", device=device, progress=steps.step(f"{m}, {T} tasks"))
                points.append({"method": m, "tasks_merged": T, "tasks": "+".join(sub), **point_row(sv, r)})
        rows = []
        for m in methods:
            for T in counts:
                ps = [p for p in points if p["method"] == m and p["tasks_merged"] == T]
                norm = np.array([p["mean_norm"] for p in ps])
                ab = np.array([p["mean_abs"] for p in ps])
                rows.append({"method": m, "tasks_merged": T, "subsets": len(ps),
                             "mean_norm": float(norm.mean()), "norm_sd": float(norm.std(ddof=1)) if len(ps) > 1
                             else 0.0, "norm_min": float(norm.min()), "norm_max": float(norm.max()),
                             "mean_abs": float(ab.mean()), "abs_sd": float(ab.std(ddof=1)) if len(ps) > 1 else 0.0,
                             **{f"rank:{k}": v for k, v in esd_ranks(pool, T).items()}})
        return rows, points

    return _run(pool, "tasks", params, body, total, progress, should_stop, use_cache)


def esd_energy(pool, stats, k_of: Callable[[int], int], keys: Sequence[str] | None = None) -> float:
    """Mean over tasks and ESD keys of the share of the ESD eigenvalue mass ``Σλ[:k] / Σλ`` kept at rank
    ``k = k_of(d_out)`` (the eigenvalues of ``ΔWt G ΔWtᵀ``: the energy of the output shift, methods §5)."""
    keys = list(keys) if keys is not None else _esd_keys(pool)
    shares = []
    for t in pool.task_names:
        for key in keys:
            st = task_layer_stats(stats, t, key)
            delta = pool.tasks[t][key].double() - pool.base[key].double()
            factor = st.factor()
            lam = esd(delta, None if factor is not None else st.gram, int(st.n), columns=1, factor=factor).lam
            total = float(lam.sum())
            k = max(1, min(int(k_of(delta.shape[0])), lam.numel()))
            shares.append(float(lam[:k].sum()) / total if total > 0 else 1.0)
    return float(np.mean(shares)) if shares else float("nan")


def _esd_keys(pool) -> list[str]:
    return list(esd_layers(pool.base))


def rank_sweep(pool, fractions: Sequence[float] = DEFAULT_FRACTIONS,
               expert_ranks: Sequence[int] = DEFAULT_EXPERT_RANKS, *, max_images: int | None = None,
               proxy_n: int = 32, device: str | torch.device = "auto", progress: Progress | None = None,
               should_stop: Callable[[], bool] | None = None, use_cache: bool = True) -> dict:
    """ESM at each rank fraction ``f`` (k = ⌊f·d_out/T⌋, α on validation each) and ESM++ at each expert rank r (on
    the ESM merge at f = 1 and its α), each row with the ESD energy kept at that rank (:func:`esd_energy`)."""
    fractions = [float(f) for f in fractions]
    for f in fractions:
        get_method("esm").resolve({"rank_fraction": f})
        if f <= 0:
            raise ValueError(f"rank fractions must be > 0, got {f}")
    expert_ranks = [int(r) for r in expert_ranks]
    for r in expert_ranks:
        ESMPP.resolve({"rank": r})
    total = 1 + len(fractions) + (1 if expert_ranks and 1.0 not in fractions else 0) + len(expert_ranks)
    params = {"fractions": fractions, "expert_ranks": expert_ranks, "max_images": max_images,
              "proxy_n": int(proxy_n)}

    def body(steps: _Steps):
        view = eval_view(pool, None, max_images)
        stats = _probe(pool, proxy_n, 0, device, steps.step("probe"))
        cache = new_cache()
        T = len(pool.task_names)
        rows, alpha_at_1 = [], None
        for f in (fractions if 1.0 in fractions or not expert_ranks else [*fractions, 1.0]):
            r = _evaluate(view, "esm", {"rank_fraction": f}, stats=stats, cache=cache, alpha="auto", device=device,
                          progress=steps.step(f"ESM rank fraction {f:g}"))
            if f == 1.0:
                alpha_at_1 = r["alpha"]
            if f in fractions:
                rows.append({"method": "esm", "rank_fraction": f, "expert_rank": None,
                             "energy": esd_energy(pool, stats, lambda d, f=f: int(f * d / T)),
                             **point_row(view, r)})
        for rk in expert_ranks:
            rr = evaluate_esmpp(view, {"rank": rk}, {}, alpha=alpha_at_1, stats=stats, cache=cache, device=device,
                                progress=steps.step(f"ESM++ rank {rk}"))
            r = rr[f"esmpp-r{rk}"]
            rows.append({"method": "esm++", "rank_fraction": None, "expert_rank": rk,
                         "energy": esd_energy(pool, stats, lambda d, rk=rk: rk), **point_row(view, r)})
        return rows, []

    return _run(pool, "rank", params, body, total, progress, should_stop, use_cache)


def _check_n(n, what: str) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= int(n) <= MAX_PROXY:
        raise ValueError(f"{what} must be an integer in 1 … {MAX_PROXY}, got {n!r}")


def proxy_sweep(pool, ns: Sequence[int] = DEFAULT_PROXY_NS, *, ood_n: int | None = 32, seed: int = 0,
                max_images: int | None = None, device: str | torch.device = "auto",
                progress: Progress | None = None, should_stop: Callable[[], bool] | None = None,
                use_cache: bool = True) -> dict:
    """ESM with ``n`` proxy samples per task for each ``n`` in ``ns`` (its own validation images), and — with
    ``ood_n`` — ESM whose task t's statistics come from task t+1's ``ood_n`` proxy inputs (the last task: the
    first's), run through fine-tuned model t: the out-of-distribution check. α on validation for each."""
    ns = [int(n) for n in ns]
    for n in ns:
        _check_n(n, "a proxy size")
    if ood_n is not None:
        _check_n(ood_n, "ood_n")
    names = list(pool.task_names)
    if ood_n is not None and len(names) < 2:
        raise ValueError("the out-of-distribution point needs at least two tasks")
    total = 2 * len(ns) + (2 if ood_n is not None else 0)
    params = {"ns": ns, "ood_n": ood_n, "seed": int(seed), "max_images": max_images}

    def body(steps: _Steps):
        view = eval_view(pool, None, max_images)
        cache = new_cache()
        plan = [(n, None) for n in ns]
        if ood_n is not None:
            plan.append((int(ood_n), {t: names[(i + 1) % len(names)] for i, t in enumerate(names)}))
        rows = []
        for n, source in plan:
            what = "own" if source is None else "other task"
            stats = _probe(pool, n, seed, device, steps.step(f"probe n = {n} ({what})"), source)
            r = _evaluate(view, "esm", {}, stats=stats, cache=cache, alpha="auto", device=device,
                          progress=steps.step(f"ESM, {n} proxy samples ({what})"))
            rows.append({"proxy_n": n, "proxy_from": what, "method": "esm", **point_row(view, r)})
        return rows, []

    return _run(pool, "proxy", params, body, total, progress, should_stop, use_cache)


SWEEPS = {"ablation": ablation, "tasks": task_count, "rank": rank_sweep, "proxy": proxy_sweep}


# ---------------------------------------------------------------------------
# Export: CSV, JSON, a plotly figure (HTML), PNG (kaleido, else Pillow)
# ---------------------------------------------------------------------------


def to_csv(result: Mapping) -> str:
    """The sweep's rows as CSV (columns: the union of the rows' keys, in first-seen order)."""
    rows = list(result["rows"])
    cols = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    return buf.getvalue()


def axis_of(result: Mapping) -> tuple[str, Callable[[dict], Any], Callable[[dict], str]]:
    kind = result["kind"]
    if kind == "ablation":
        return "variant", lambda r: r["label"], lambda r: "esm"
    if kind == "tasks":
        return "tasks merged", lambda r: r["tasks_merged"], lambda r: r["method"]
    if kind == "rank":
        return ("rank fraction (ESM) / expert rank (ESM++)",
                lambda r: r["rank_fraction"] if r["method"] == "esm" else r["expert_rank"], lambda r: r["method"])
    return ("proxy samples per task", lambda r: r["proxy_n"],
            lambda r: "ESM (own proxy)" if r["proxy_from"] == "own" else "ESM (another task's proxy)")


def png_backend() -> str | None:
    """'kaleido' when plotly can write images, else 'pillow' (:func:`png_pillow`'s plain chart), else None."""
    for name in ("kaleido", "PIL"):
        try:
            __import__(name)
            return "kaleido" if name == "kaleido" else "pillow"
        except ImportError:
            pass
    return None


def png_pillow(result: Mapping, width: int = 900, height: int = 500) -> bytes:
    """A plain PNG chart of the sweep drawn with Pillow (where plotly cannot render images): one series per method,
    points with 95 % bars (the task sweep: ± sd), x at equal spacing labelled with the sweep's values."""
    xlabel, xof, series = axis_of(result)
    rows = list(result["rows"])
    y_key, hw_key = ("mean_norm", "norm_sd") if result["kind"] == "tasks" else ("mean_abs", "mean_abs_hw")
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    L, R, T, B = 70, width - 20, 40, height - 70
    xs = list(dict.fromkeys(str(xof(r)) for r in rows))
    lo = min([100 * (r[y_key] - r[hw_key]) for r in rows] or [0.0])
    hi = max([100 * (r[y_key] + r[hw_key]) for r in rows] or [100.0])
    lo, hi = math.floor(lo / 5) * 5, math.ceil(hi / 5) * 5 + (5 if hi == lo else 0)
    ypix = lambda v: B - (v - lo) / (hi - lo) * (B - T)                       # noqa: E731
    xpix = lambda i: L + (i + 0.5) * (R - L) / max(len(xs), 1)                # noqa: E731
    d.line([(L, T), (L, B), (R, B)], fill="black")
    for v in range(int(lo), int(hi) + 1, 5 if hi - lo <= 50 else 10):
        d.line([(L - 4, ypix(v)), (R, ypix(v))], fill=(225, 225, 225))
        d.text((L - 40, ypix(v) - 6), f"{v}", fill="black")
    for i, x in enumerate(xs):
        d.text((xpix(i) - 3 * len(x[:32]), B + 8), x[:32], fill="black")
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
    for j, name in enumerate(dict.fromkeys(series(r) for r in rows)):
        c = colours[j % len(colours)]
        pts = []
        for r in (r for r in rows if series(r) == name):
            i = xs.index(str(xof(r)))
            x, y, h = xpix(i) + 6 * j, 100 * r[y_key], 100 * r[hw_key]
            d.line([(x, ypix(y - h)), (x, ypix(y + h))], fill=c, width=2)
            d.ellipse([x - 4, ypix(y) - 4, x + 4, ypix(y) + 4], fill=c)
            pts.append((x, ypix(y)))
        if len(pts) > 1 and result["kind"] != "ablation":
            d.line(pts, fill=c, width=1)
        d.text((L + 10 + 200 * j, 8), f"- {name}", fill=c)
    d.text((L, height - 30), xlabel, fill="black")
    d.text((L + 300, 24), "test accuracy %" if result["kind"] != "tasks" else "normalised accuracy %", fill="black")
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()
