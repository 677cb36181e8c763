"""ESM rows of ``esm-studio bench``: a cold merge, fd9a028's route, and re-merges from a warm cache.

ESM needs activation statistics; the benchmark uses random token rows of the
right shapes instead of a probe (``N = 32 · 50`` rows per ESD layer, held as
the probe holds them: the rows where they are cheaper than the Gram matrix,
else the float64 Gram; shared by the tasks, but every task still gets its own
ESD since its task matrix differs). Rows:

* ``esm`` — cold merge: every ESD decomposition is computed;
* ``esm_reference`` — the same cold merge by fd9a028's route (:func:`esm_reference`:
  float64 throughout, eigh of ``ΔW G ΔWᵀ`` / SVD of ``ΔW G^½``, polar factors
  with the SVD fall-back below σ_min/σ_max = 1e-5); its row also carries the
  relative (Frobenius) difference of the new route's merged updates from it
  (``max_rel_diff``, worst key; computed untimed in the same process) and the
  new route's seconds (``new_seconds``) measured in that same process;
* ``esm_remerge`` (rank: ``rank_fraction=0.5``), ``esm_p_task``, ``esm_exponent``
  (``p_dim``), ``esm_p_layer``, ``esm_eig_exp``, ``esm_ortho``, ``esm_alpha`` —
  the cache is warm (filled by an untimed cold merge) and one knob changes;
* ``polar_gram``, ``polar_ns`` (only when named) — the isotropic factors
  ``polar(x)·mean sv(x)`` of every ESD key's ``U`` and ``V`` (taken from a warm
  cache, float64) by each route: the Gram matrix's eigendecomposition, and
  Newton–Schulz products (:func:`~esm_core.merging.polar.polar_newton_schulz`),
  whose row also prints its largest relative difference from the Gram route,
  its most steps and its fall-backs.

Warm rows report the bytes held by the statistics and by the cache
(``stats_bytes``, ``cache_bytes``).
"""
from __future__ import annotations

import functools
import time

import torch

from ..device import resolve_device
from ..lazy import LazyCheckpoint, as_state
from ..merging import merge_updates
from ..merging.api import MergeContext, _inputs
from ..merging.cache import EsdKey
from ..merging.esd import esd_exact
from ..merging.polar import isotropic, polar_newton_schulz
from ..merging.esm import _esd_keys, _stats_of, esm_rank, esm_u, esm_v, esm_v_from_coords, new_cache
from ..merging.stats import LayerStats, _Accumulator, stats_nbytes, task_layer_stats  # noqa: F401
from ..merging.svd import tsv_merge_matrix
from ..models import openclip_vit as vit
from ..models.roles import MATRIX
from ..schemas import SPECS
from .jobs import TOKENS, Job

ESM_DEFAULTS = {q.name: q.default for q in SPECS["esm"].params}

PROXY_IMAGES = 32


def random_stats(base: dict, tasks: dict, seed: int = 0, rows: int = PROXY_IMAGES * TOKENS) -> dict:
    """A ``Stats`` dict from random token rows (held as the probe holds them) for every ESD key of ``base``."""
    base = as_state(base, name="base")
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for key in vit.esd_keys(base):
        d_in = base.shape(key)[1] if isinstance(base, LazyCheckpoint) else base[key].shape[1]
        a = _Accumulator()
        a.add(torch.randn(rows, d_in, generator=g))
        layers[key] = a.result()
    return {"tasks": {name: layers for name in tasks}, "proxy_ids": {}, "n": PROXY_IMAGES, "seed": seed}


# ---------------------------------------------------------------------------
# fd9a028's ESM route, kept to time and check the new one against
# ---------------------------------------------------------------------------

_REF_RCOND = 1e-5


def _ref_isotropic(x: torch.Tensor) -> torch.Tensor:
    """fd9a028's ``isotropic``: float64 Gram route, SVD when σ_min/σ_max < 1e-5."""
    m, n = x.shape
    if m < n:
        return _ref_isotropic(x.mT).mT
    x64 = x.to(torch.float64)
    mu, q = torch.linalg.eigh(x64.mT @ x64)
    top = mu[-1]
    if bool(torch.isfinite(mu).all()) and top > 0 and mu[0] > (_REF_RCOND ** 2) * top:
        s = mu.sqrt()
        return ((x64 @ (q / s)) @ q.mT) * s.mean()
    u, s, vh = torch.linalg.svd(x64, full_matrices=False)
    return (u @ vh) * s.mean()


def esm_reference(ctx, esd_types: str = ",".join(vit.ESD_TYPES), **params) -> dict[str, torch.Tensor]:
    """ESM by the straightforward route (one large eigendecomposition per task and layer), cold, no cache: the
    benchmark's and tests' reference. ``params``: ESM's (its schema's defaults for those not given; ESD
    directions only)."""
    p = {q.name: params.get(q.name, q.default) for q in SPECS["esm"].params}
    alpha, rank, rank_fraction, p_task, p_dim, p_layer, eig_exp, ortho_factor = (
        p[n] for n in ("alpha", "rank", "rank_fraction", "p_task", "p_dim", "p_layer", "eig_exp", "ortho_factor"))
    names, T = ctx.names, len(ctx.names)
    esd_keys = _esd_keys(ctx, esd_types)
    stats = _stats_of(ctx, esd_keys)
    updates, pre = {}, {}
    for key in ctx.keys:
        D = ctx.deltas(key)
        if key in esd_keys:
            k = esm_rank(D.shape[1], T, rank, rank_fraction)
            Ps, lams = [], []
            for t, name in enumerate(names):
                st = task_layer_stats(stats, name, key)
                c = min(D.shape[1], max(k, min(D.shape[2], int(st.n))))
                P, lam = esd_exact(D[t], st.gram, st.n, columns=c)
                Ps.append(P.to(torch.float32))                     # fd9a028 cached P in float32
                lams.append(lam)
            Up = _ref_isotropic(esm_u(Ps, lams, k, eig_exp)).to(torch.float32)
            V = esm_v(Ps, lams, list(D), k, p_task, p_dim, eig_exp)
            updates[key] = (Up.to(torch.float64) @ _ref_isotropic(V)).to("cpu", torch.float32)
            pre[key] = ortho_factor
        elif ctx.roles[key] == MATRIX and D.ndim == 3:
            updates[key] = tsv_merge_matrix(D).to("cpu", torch.float32)
        else:
            updates[key] = D.mean(0).to("cpu")
    groups: dict[str, list[str]] = {}
    for key in ctx.keys:
        t = ctx.layer_types.get(key)
        if t is not None and ctx.roles[key] == MATRIX:
            groups.setdefault(t, []).append(key)
    betas = {}
    for ks in groups.values():
        norms = torch.stack([torch.linalg.vector_norm(updates[k].to(torch.float64)) * pre.get(k, 1.0) for k in ks])
        m = norms.mean()
        for k_, nrm in zip(ks, norms):
            betas[k_] = float((nrm / m).pow(p_layer)) if m > 0 else 1.0
    return {key: dw * (pre.get(key, 1.0) * betas.get(key, 1.0) * (alpha if key in esd_keys else 1.0))
            for key, dw in updates.items()}


def reference_updates(base, tasks, *, stats, device="cpu", **params) -> dict[str, torch.Tensor]:
    """:func:`esm_reference` through the same context ``merge_updates`` builds (no compatibility check)."""
    base, tasks = _inputs(base, tasks)
    ctx = MergeContext(base=base, tasks=tasks, roles=vit.roles_of(base), layer_types=vit.layer_types_of(base),
                       device=resolve_device(device), stats=stats)
    return {k: v.to("cpu", torch.float32) for k, v in esm_reference(ctx, **params).items()}


def max_rel_diff(a: dict, b: dict) -> float:
    """Worst relative Frobenius difference ‖a − b‖ / ‖b‖ over the keys of ``b``."""
    worst = 0.0
    for k, v in b.items():
        den = float(torch.linalg.vector_norm(v.double()))
        num = float(torch.linalg.vector_norm(a[k].double() - v.double()))
        worst = max(worst, num / den if den > 0 else num)
    return worst


# ---------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------


def _setup_stats(base, tasks, device):
    stats = random_stats(base, tasks)
    return {"stats": stats, "extra": {"stats_bytes": stats_nbytes(stats)}}


def _setup_warm(base, tasks, device):
    state = _setup_stats(base, tasks, device)
    state["cache"] = new_cache()
    merge_updates("esm", base, tasks, device=device, check=False, stats=state["stats"], cache=state["cache"])
    state["extra"]["cache_bytes"] = state["cache"].nbytes
    return state


def _run_esm(base, tasks, device, state, **params):
    # every repeat starts from the cache as the set-up left it (a repeat must not hit the previous run's result)
    cache = state["cache"].snapshot() if "cache" in state else None
    return merge_updates("esm", base, tasks, device=device, check=False, stats=state["stats"], cache=cache,
                         **params)


def _run_reference(base, tasks, device, state, **params):
    return reference_updates(base, tasks, stats=state["stats"], device=device, **params)


def _check_reference(base, tasks, device, state, result) -> dict:
    """After the timed reference merge: time the new route once and compare its updates with the reference's."""
    t0, c0 = time.perf_counter(), time.process_time()
    new = _run_esm(base, tasks, device, {"stats": state["stats"]})
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    out = {"new_seconds": secs, "speedup_new_vs_reference": (state.get("_ref_seconds") or 0) / secs,
           "new_cpu_seconds": cpu, "max_rel_diff": max_rel_diff(new, result)}
    if state.get("_ref_cpu_seconds"):
        out["cpu_speedup_new_vs_reference"] = state["_ref_cpu_seconds"] / cpu
    return out


def _setup_factors(base, tasks, device):
    """A warm cache's ``U`` and ``V`` of every ESD key at the default parameters (float64, on ``device``)."""
    state = _setup_warm(base, tasks, device)
    cache, names = state.pop("cache"), list(tasks)
    factors = []
    for key in dict.fromkeys(e.key for e in cache.esd_entries if e.source == "esd"):
        es = [cache.esd_entries[EsdKey(n, key)] for n in names]
        k = esm_rank(es[0].P.shape[0], len(names))
        lams = [e.lam for e in es]
        factors.append(esm_u([e.P.to(device) for e in es], lams, k, ESM_DEFAULTS["eig_exp"]))
        factors.append(esm_v_from_coords([e.A.to(device) for e in es], lams, [e.norm for e in es], k,
                                         *(ESM_DEFAULTS[n] for n in ("p_task", "p_dim", "eig_exp"))))
    state["factors"] = factors
    return state


def _run_polar(base, tasks, device, state, route: str):
    """The isotropic factor of every ``U`` and ``V`` by ``route``, with Newton–Schulz's steps (0: fell back)."""
    out = []
    for x in state["factors"]:
        if route == "newton_schulz":
            r = polar_newton_schulz(x)
            out.append((isotropic(x, torch.float64, "gram"), 0) if r is None else (r[0] * r[1], r[2]))
        else:
            out.append((isotropic(x, torch.float64, "gram"), None))
    return out


def _check_polar(base, tasks, device, state, result) -> dict:
    """Newton–Schulz against the Gram route on the same factors (untimed)."""
    worst = 0.0
    for x, (f, _) in zip(state["factors"], result):
        ref = isotropic(x, torch.float64, "gram")
        worst = max(worst, float(torch.linalg.vector_norm(f - ref) / torch.linalg.vector_norm(ref)))
    steps = [s for _, s in result]
    return {"polar_max_rel_diff": worst, "ns_steps_max": max(steps), "ns_fallbacks": steps.count(0),
            "factors": [list(x.shape) for x in state["factors"]]}


REMERGES = [
    ("esm_remerge", "rank changed", {"rank_fraction": 0.5}),
    ("esm_p_task", "p_task changed", {"p_task": 1.0}),
    ("esm_exponent", "p_dim changed", {"p_dim": 1.0}),
    ("esm_p_layer", "p_layer changed", {"p_layer": 1.0}),
    ("esm_eig_exp", "eig_exp changed", {"eig_exp": 0.3}),
    ("esm_ortho", "ortho_factor changed", {"ortho_factor": 1.5}),
    ("esm_alpha", "alpha changed", {"alpha": 0.7}),
]


def esm_jobs() -> list[Job]:
    """The ESM benchmark rows (see the module docstring)."""
    jobs = [Job("esm", "ESM (cold: decompositions)", _run_esm, _setup_stats, {"cache": "cold"}),
            Job("esm_reference", "ESM cold, fd9a028 route", _run_reference, _setup_stats, {"cache": "reference"},
                check=_check_reference)]
    for name, what, params in REMERGES:
        jobs.append(Job(name, f"ESM re-merge ({what})", functools.partial(_run_esm, **params), _setup_warm,
                        {"cache": "warm"}))
    jobs.append(Job("polar_gram", "ESM's U, V isotropic: Gram eigh", functools.partial(_run_polar, route="gram"),
                    _setup_factors, {"route": "gram"}, default=False))
    jobs.append(Job("polar_ns", "ESM's U, V isotropic: Newton–Schulz",
                    functools.partial(_run_polar, route="newton_schulz"), _setup_factors, {"route": "newton_schulz"},
                    check=_check_polar, default=False))
    return jobs
