"""The Spectra and Interference views' operations: activation statistics, decompositions, overlaps, SAR."""
from __future__ import annotations

import math
import shutil

from .. import analysis
from . import shared
from ..device import trim_heap
from ..merging.esm import esm_rank, new_cache
from ..merging.stats import spill_stats
from ..models import family_or_vit
from ..probe import probe_pool
from .session import Progress, Session, _need_pool, _noop, stats_folder


def ensure_stats(s: Session, n: int = 32, seed: int = 0, progress: Progress | None = None):
    """Activation statistics of every task (probe inside each fine-tuned model on its proxy samples); cached.

    They live in the session's folder, not in memory (:meth:`~esm_core.merging.stats.LayerStats.spill`: the
    Gram matrices / input rows; the means and fingerprints stay): each is read back when a decomposition
    needs it — once per ESD layer and task for the Spectra view and ESM (then cached), once per routed
    layer and task for ESM++. A ViT-B/32 × 8 pool's statistics are 2.5 GiB."""
    pool = _need_pool(s)
    with s.lock:
        if s.stats is None or s.stats.get("n") != n or s.stats.get("seed") != seed:
            s.stats = None
            shutil.rmtree(stats_folder(s), ignore_errors=True)
            stats = probe_pool(pool, n=n, seed=seed, device=s.device,
                               progress=(lambda f, d: progress(f, f"activation statistics: {d}")) if progress else None)
            spill_stats(stats, stats_folder(s))
            trim_heap()                 # else the freed pages stay resident (glibc keeps them)
            s.stats = stats
        return s.stats


def ensure_cache(s: Session):
    if s.cache is None:
        s.cache = new_cache()
    return s.cache


def layer_type_names(s: Session) -> list[str]:
    """The layer types of the pool's model family (the choices of ESM's ``esd_types``)."""
    base = list(_need_pool(s).base)
    return list(family_or_vit(base).LAYER_TYPES)


def esd_keys(s: Session) -> list[str]:
    """The layers with an ESD (attn.in_proj, mlp.c_fc, mlp.c_proj of every block)."""
    base = list(_need_pool(s).base)
    return family_or_vit(base).esd_keys(base)


def spectra(s: Session, progress: Progress | None = None) -> list[dict]:
    """Spectra rows of every ESD layer and task (:func:`esm_core.analysis.spectra`); computed once per pool."""
    pool = _need_pool(s)
    report = progress or _noop
    with s.lock:
        keys = esd_keys(s)          # the rows of a pool read from files are shared by its sessions (studio.shared)
        skey = shared.key(pool, s.device, "spectra", 32, 0, tuple(pool.task_names), tuple(keys))
        if s.spectra_rows is None:
            s.spectra_rows = shared.RESULTS.get(skey)
        if s.spectra_rows is None:
            stats = ensure_stats(s, progress=lambda f, d: report(0.3 * f, d))
            cache = ensure_cache(s)
            rows = []
            for i, key in enumerate(keys):       # decomposed as ESM does: a later ESM merge reuses every entry
                rows += analysis.spectra(pool.base, pool.tasks, stats, keys=[key], cache=cache, esm_entries=True)
                trim_heap()                      # each key's freed working memory, before the next key's
                report(0.3 + 0.7 * (i + 1) / len(keys), f"decomposing {key}")
            s.spectra_rows = rows
            shared.RESULTS.put(skey, rows)
            trim_heap()
        return s.spectra_rows


def spectra_at(s: Session, rank_fraction: float = 1.0, progress: Progress | None = None) -> list[dict]:
    """Spectra rows with ``k``, ``esd_kept_at_k`` and ``svd_kept_at_k`` re-read at ``rank_fraction`` of the default rank."""
    if not (isinstance(rank_fraction, (int, float)) and math.isfinite(rank_fraction) and rank_fraction > 0):
        raise ValueError(f"the rank fraction must be a finite number above 0, got {rank_fraction!r}")
    rows = spectra(s, progress)
    T = len(s.pool.task_names)
    out = []
    for r in rows:
        d_out = int(s.pool.base[r["key"]].shape[0])
        k = esm_rank(d_out, T, rank_fraction=rank_fraction)
        kk = min(k, len(r["esd_energy_kept"])) - 1
        out.append({**r, "k": k, "esd_kept_at_k": r["esd_energy_kept"][kk], "svd_kept_at_k": r["svd_energy_kept"][kk]})
    return out


def overlap(s: Session, key: str, rank_fraction: float = 1.0, progress: Progress | None = None) -> dict:
    """Task × task overlap of the rank-k essential subspaces of one layer."""
    pool = _need_pool(s)
    if key not in pool.base:
        raise ValueError(f"no layer {key!r} in this model")
    with s.lock:
        stats = ensure_stats(s, progress=progress)
        k = esm_rank(int(pool.base[key].shape[0]), len(pool.task_names), rank_fraction=rank_fraction)
        return analysis.subspace_overlap(pool.base, pool.tasks, stats, keys=[key], k=k, cache=ensure_cache(s))


def cosines(s: Session) -> dict:
    """Task-vector cosines per layer and over the whole model (cached)."""
    pool = _need_pool(s)
    with s.lock:
        if s.cosines is None:
            s.cosines = analysis.task_cosines(pool.base, pool.tasks)
        return s.cosines


def alignment(s: Session) -> dict | None:
    """Subspace alignment ratio of every task against the current merge (None before the first merge)."""
    pool = _need_pool(s)
    if s.current is None:
        return None
    with s.lock:
        ups = s.current["updates"]
        keys = [k for k in family_or_vit(list(pool.base)).layer_types_of(list(pool.base)) if k in ups]
        return analysis.alignment(pool.base, pool.tasks, merged_updates=ups, keys=keys)
