"""Analysis tables for the spectra and interference views: plain dicts and lists, no plotting.

Per layer and task (:func:`spectra`):
  * the ESD energy spectrum λ (methods §5) and the SVD spectrum σ² of ΔW;
  * the share of output-shift energy ``‖X ΔŴᵀ‖² / ‖X ΔWᵀ‖²`` kept by a rank-r
    truncation, for ESD (``Σ_{i≤r} λi / Σ λi``) and for SVD
    (``Σ_{i≤r} σi² viᵀ G vi / tr(ΔW G ΔWᵀ)``), both computed from the Gram matrix;
  * effective ranks at 95 % energy.
Between tasks:
  * :func:`subspace_overlap` — ``‖P̂sᵀ P̂t‖F² / k`` of the essential subspaces;
  * :func:`task_cosines` — cosine of task vectors per layer and over the whole model;
  * :func:`alignment` — the subspace alignment ratio (methods §4) of each task
    against a merged update, per layer and averaged over layers.
:func:`interference` bundles the three. Every function takes
``(base, tasks, stats, merged_updates=None, keys=None, k=None, cache=None)``;
``stats`` is a ``Stats`` dict (``probe_pool``) or ``{task: {key: X}}`` inputs;
``cache`` (``esm_core.merging.esm.new_cache()``) shares ESD decompositions with
ESM merges, so a view after a merge computes no decomposition again.
"""
from __future__ import annotations

import functools
from typing import Mapping

import torch

from .device import torch_threads_back
from .merging.cache import DecompositionCache, ResultKey, fingerprint
from .merging.kernels import eigh64, gram, scipy_threads
from .merging.esm import esm_rank
from .schemas import MAX_RANK_FRACTION
from .merging.stats import stats_from_inputs, task_layer_stats
from .merging.svd import subspace_alignment_ratio
from .models import family_of_key, family_or_vit, roles_of
from .models.roles import SKIP

ENERGY = 0.95


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _as_stats(stats):
    """A ``Stats`` dict, converting raw ``{task: {key: X}}`` inputs if that is what was given."""
    if stats is None:
        raise ValueError("this analysis needs activation statistics: pass stats= (probe_pool) or inputs {task: {key: X}}")
    if isinstance(stats, Mapping) and "tasks" not in stats:
        first = next((v for layers in stats.values() for v in layers.values()), None)
        if isinstance(first, torch.Tensor):
            return stats_from_inputs(stats)
    return stats


def _delta(base, tasks, name: str, key: str) -> torch.Tensor:
    """ΔW of one task and key, float32 on the CPU (bit-identical to what a CPU merge sees)."""
    return tasks[name][key].to("cpu", torch.float32) - base[key].to("cpu", torch.float32)


def _keys(base, keys, esd_only: bool) -> list[str]:
    if keys is not None:
        missing = [k for k in keys if k not in base]
        if missing:
            raise ValueError(f"keys not in the base model: {missing[:5]}")
        return list(keys)
    fam = family_or_vit(base)
    found = fam.esd_keys(list(base)) if esd_only else list(fam.layer_types_of(list(base)))
    if not found:
        raise ValueError("no transformer linear layers recognised in this model: pass keys=[...] explicitly")
    return found


def _first_reaching(cum: torch.Tensor, energy: float) -> int:
    """Smallest r (1-based) with ``cum[r-1] ≥ energy`` (0 when the spectrum is empty or zero)."""
    if cum.numel() == 0 or not bool(torch.isfinite(cum[-1])):
        return 0
    hits = (cum >= energy - 1e-12).nonzero()
    return int(hits[0]) + 1 if hits.numel() else int(cum.numel())


def _on_scipy_threads(fn):
    """Decorator: the whole of ``fn`` (CPU work, mostly decompositions) runs in :func:`scipy_threads`. The whole
    call, not each decomposition: switching at every one kept half the cost (one ViT-B/32 block's spectra on
    2 cores: 7.7–7.8 s; switching per decomposition 7.1–7.3 s; the whole call 6.3–6.5 s)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with scipy_threads():
            return fn(*args, **kwargs)
    return run


def _share(cum: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    return cum / total if total > 0 else torch.zeros_like(cum)


def _shared_products(d: torch.Tensor, f: torch.Tensor | None) -> dict:
    """The products both the ESD and :func:`svd_spectrum` form from ΔW (``d``) and the statistics' factor ``f``:
    ``ΔWᵀΔW`` of a tall (or square) update, ``ΔW G ΔWᵀ = gram((ΔW f)ᵀ)`` of a wide one whose factor has more
    columns than ΔW has rows (the ESD's route there; e.g. ``c_proj`` with 1,600 probe rows): keyword arguments
    for both."""
    W = d.to(torch.float64)
    if W.shape[0] >= W.shape[1]:
        return {"wtw": gram(W)}
    if f is not None and f.shape[1] > W.shape[0]:
        with torch_threads_back():                  # one large torch product (768 × 3072 × 1,600 on c_proj)
            M = W @ f.to(torch.float64)
        return {"shift_gram": gram(M.mT)}
    return {}


def _esd_entry(cache: DecompositionCache, base, tasks, stats, name: str, key: str, k: int, esm_like: bool = False,
               share: bool = False):
    """``(ESD entry, ΔW, statistics, fingerprint of ΔW, Gram matrix or None, shared products)`` of one
    task and key, from ``cache`` when it holds it. The Gram matrix is returned when it was read for the
    decomposition (None otherwise), so a caller that needs it too does not read (or form) it again; with
    ``share``, a decomposition computed here is given the products :func:`svd_spectrum` needs too
    (:func:`_shared_products`), and they are returned ({} otherwise). A decomposition computed here gets ΔW in
    float64 (converted once, returned so for the SVD spectrum too); a cached one costs no conversion.

    ``esm_like``: decompose as an ESM merge at its default rank does — the columns the largest offered rank can use,
    with the coordinates P̂ᵀΔW — so the entry is the one a later ESM merge looks up (decomposed the analysis' own
    way, every column up to min(d_in, n) and no coordinates, ESM would compute it a second time). ESM's CPU merge
    sees bit-identical ΔW and the same statistics' fingerprint, so the entries match."""
    st = task_layer_stats(stats, name, key)
    d = _delta(base, tasks, name, key)
    dfp = fingerprint(d)                # of the float32 ΔW, as ESM's merge fingerprints it
    kw = {}
    if esm_like:
        d_out, T = int(d.shape[0]), len(tasks)
        k = max(k, esm_rank(d_out, T))       # ESM's default rank (it can exceed min(d_in, n) on small layers)
        kw = {"keep": max(k, esm_rank(d_out, T, rank_fraction=MAX_RANK_FRACTION)), "coords": True}
    # the same fingerprint and factor ESM uses (shared entries)
    e = cache.lookup(name, key, (dfp, st.fingerprint(), int(st.n)), k)
    if e is not None and (e.A is not None or not esm_like):
        return e, d, st, dfp, None, {}  # (spilled statistics are not read back for a cached entry)
    d = d.to(torch.float64)             # converted once: the ESD, the shared products and the SVD spectrum read it
    f = st.factor()
    g = None if f is not None else st.gram
    pre = _shared_products(d, f) if share else {}
    return cache.esd(name, key, d, g, int(st.n), k=k, gram_fp=st.fingerprint(), delta_fp=dfp, factor=f,
                     **kw, **pre), d, st, dfp, g, pre


def _info(key: str) -> dict:
    fam = family_of_key(key)
    if fam is None:
        return {"key": key, "layer_type": None, "block": None}
    return {"key": key, "layer_type": fam.layer_type(key), "block": fam.block_index(key)}


# ---------------------------------------------------------------------------
# Spectra
# ---------------------------------------------------------------------------


def svd_spectrum(delta: torch.Tensor, st, gram_matrix: torch.Tensor | None = None, *,
                 wtw: torch.Tensor | None = None, shift_gram: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(σi², σi² viᵀ G vi)`` of ``ΔW = Σ σi ui viᵀ`` (descending, float64): the squared singular values and
    the output energy ``‖X σi vi‖²`` of each triplet on the layer's inputs (``st``: its statistics).

    From the eigendecomposition of the short side's Gram matrix (``ΔWᵀΔW`` or ``ΔWΔWᵀ``, at most
    768² on a ViT-B/32: about a third of the time of the 3072 × 768 SVD with its vectors) and,
    for the energies, ``σi vi`` (``V diag(σ)`` or ``ΔWᵀU``) against the input rows when the statistics
    hold them, else the Gram matrix (``gram_matrix`` when the caller has read it already). σ² carries an
    absolute error ~ eps64 · σ_max², far below what the spectrum plots and energy shares resolve.

    ``wtw`` (``gram(ΔW)``) stands in for the tall side's Gram matrix; ``shift_gram`` (``ΔW G ΔWᵀ``) gives a
    wide update's energies as ``uiᵀ (ΔW G ΔWᵀ) ui`` (d_out³ flops instead of ``ΔWᵀU`` and its product with the
    input rows; the same energies to ~eps64 · σ_max² of the output shift). Both from :func:`_shared_products`."""
    W = delta.to(torch.float64)
    if W.shape[0] >= W.shape[1]:
        s2, V = eigh64(gram(W) if wtw is None else wtw)               # ΔWᵀΔW = V diag(σ²) Vᵀ
        s2 = s2.clamp_min(0)
        sv = V * s2.sqrt()                                            # columns σi vi
    else:
        s2, U = eigh64(gram(W.mT))                                    # ΔWΔWᵀ = U diag(σ²) Uᵀ
        s2 = s2.clamp_min(0)
        if shift_gram is not None:                                    # σi² viᵀ G vi = uiᵀ (ΔW G ΔWᵀ) ui
            U = U.flip(1)
            return s2.flip(0), ((shift_gram.to(torch.float64) @ U) * U).sum(0).clamp_min(0)
        sv = W.mT @ U                                                 # ΔWᵀ ui = σi vi
    s2, sv = s2.flip(0), sv.flip(1)
    f = st.factor()
    if f is not None:                                                 # G = f fᵀ (f = Xᵀ): ‖fᵀ σi vi‖²
        out = (f.mT.to(torch.float64) @ sv).square().sum(0)
    else:
        G = st.gram if gram_matrix is None else gram_matrix
        out = ((G.to(torch.float64) @ sv) * sv).sum(0)
    return s2, out


@_on_scipy_threads
def spectra(base, tasks, stats, merged_updates=None, keys=None, k=None, cache=None,
            energy: float = ENERGY, esm_entries: bool = False) -> list[dict]:
    """One row per (layer, task): ESD and SVD spectra, energy kept by rank-r truncation, effective ranks.

    Row fields: ``key, layer_type, block, task, k, esd_lambda, svd_sigma2, esd_energy_kept,
    svd_energy_kept`` (lists: entry r−1 is the share kept at rank r, r ≤ min(d_out, d_in)),
    ``esd_kept_at_k, svd_kept_at_k, esd_rank95, svd_rank95`` (ranks reaching ``energy`` of
    the ESD λ and of the SVD σ² spectrum).

    ``esm_entries``: decompose as an ESM merge does (see :func:`_esd_entry`), so ``cache`` then serves an ESM
    merge at its default rank with no decomposition of its own. Each update is formed and read once.
    """
    stats = _as_stats(stats)
    cache = cache if cache is not None else DecompositionCache()
    names = list(tasks)
    rows = []
    for key in _keys(base, keys, esd_only=True):
        for name in names:
            d_out, d_in = base[key].shape
            kk = esm_rank(d_out, len(names), rank=int(k or 0))
            e, d, st, dfp, g, pre = _esd_entry(cache, base, tasks, stats, name, key, 0, esm_like=esm_entries,
                                               share=True)
            r = min(d_out, d_in)
            fp = (dfp, st.fingerprint(), int(st.n))
            svd = cache.get_result(ResultKey("svd-spectrum", key, name), fp)
            if svd is None:
                svd = svd_spectrum(d, st, g, **pre)                   # (σi², output energy of triplet i)
                cache.put_result(ResultKey("svd-spectrum", key, name), fp, svd)
            s2, out_e = svd
            lam = e.lam[:r]
            total = lam.sum()                                         # = tr(ΔW G ΔWᵀ) / (n − 1)
            esd_kept = _share(torch.cumsum(lam, 0), total)
            svd_kept = _share(torch.cumsum(out_e, 0), out_e.sum())    # out_e.sum() = tr(ΔW G ΔWᵀ) too
            rows.append({**_info(key), "task": name, "k": kk,
                         "esd_lambda": lam.tolist(), "svd_sigma2": s2.tolist(),
                         "esd_energy_kept": esd_kept.tolist(), "svd_energy_kept": svd_kept.tolist(),
                         "esd_kept_at_k": float(esd_kept[min(kk, r) - 1]),
                         "svd_kept_at_k": float(svd_kept[min(kk, r) - 1]),
                         "esd_rank95": _first_reaching(esd_kept, energy),
                         "svd_rank95": _first_reaching(_share(torch.cumsum(s2, 0), s2.sum()), energy)})
    return rows


# ---------------------------------------------------------------------------
# Between tasks
# ---------------------------------------------------------------------------


@_on_scipy_threads
def subspace_overlap(base, tasks, stats, merged_updates=None, keys=None, k=None, cache=None) -> dict:
    """Overlap of the tasks' rank-k essential subspaces: ``‖P̂sᵀ P̂t‖F² / k`` (1 = same, 0 = orthogonal).

    Returns ``{"tasks": names, "k": {key: k}, "layers": {key: T×T list}, "mean": T×T list}``.
    """
    stats = _as_stats(stats)
    cache = cache if cache is not None else DecompositionCache()
    names = list(tasks)
    T = len(names)
    out = {"tasks": names, "k": {}, "layers": {}}
    acc = torch.zeros(T, T, dtype=torch.float64)
    keys = _keys(base, keys, esd_only=True)
    for key in keys:
        kk = esm_rank(base[key].shape[0], T, rank=int(k or 0))
        Ph = [_esd_entry(cache, base, tasks, stats, n, key, kk)[0].P[:, :kk].to(torch.float64) for n in names]
        M = torch.tensor([[float((Ph[s].mT @ Ph[t]).square().sum()) / kk for t in range(T)] for s in range(T)],
                         dtype=torch.float64)
        out["k"][key] = kk
        out["layers"][key] = M.tolist()
        acc += M
    out["mean"] = (acc / len(keys)).tolist()
    return out


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = a.norm(), b.norm()
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else float("nan")


def task_cosines(base, tasks, stats=None, merged_updates=None, keys=None, k=None, cache=None) -> dict:
    """Cosine similarity of task vectors per layer and over the whole model (every merged float key).

    Returns ``{"tasks": names, "layers": {key: T×T list}, "model": T×T list}``.
    """
    names = list(tasks)
    T = len(names)
    out = {"tasks": names, "layers": {}}
    for key in _keys(base, keys, esd_only=False):
        vs = [_delta(base, tasks, n, key).reshape(-1).to(torch.float64) for n in names]
        out["layers"][key] = [[_cos(vs[s], vs[t]) for t in range(T)] for s in range(T)]
    dots = torch.zeros(T, T, dtype=torch.float64)
    roles = roles_of(base)
    for key, v in base.items():
        if roles[key] == SKIP:
            continue
        X = torch.stack([_delta(base, tasks, n, key).reshape(-1).to(torch.float64) for n in names])
        dots += X @ X.mT
    nrm = dots.diagonal().sqrt()
    model = dots / (nrm[:, None] * nrm[None, :])
    out["model"] = [[float(model[s, t]) if nrm[s] > 0 and nrm[t] > 0 else float("nan") for t in range(T)]
                    for s in range(T)]
    return out


def alignment(base, tasks, stats=None, merged_updates=None, keys=None, k=None, cache=None) -> dict:
    """Subspace alignment ratio (methods §4) of every task against the merged update, per layer and averaged.

    ``merged_updates``: ``{key: merged ΔW}`` (e.g. :func:`esm_core.merge_updates`). Returns
    ``{"tasks": names, "layers": {key: {task: sar}}, "mean": {task: mean over layers}}``.
    """
    if merged_updates is None:
        raise ValueError("the subspace alignment ratio needs merged_updates={key: merged update}")
    names = list(tasks)
    if keys is None:
        keys = [kk for kk in _keys(base, None, esd_only=False) if kk in merged_updates]
    missing = [kk for kk in keys if kk not in merged_updates]
    if missing:
        raise ValueError(f"merged_updates has no entry for {missing[:5]}")
    out = {"tasks": names, "layers": {}}
    for key in keys:
        D = torch.stack([_delta(base, tasks, n, key) for n in names])
        sar = subspace_alignment_ratio(D, merged_updates[key])
        out["layers"][key] = dict(zip(names, sar))
    out["mean"] = {n: (sum(out["layers"][kk][n] for kk in keys) / len(keys) if keys else float("nan"))
                   for n in names}
    return out


def interference(base, tasks, stats=None, merged_updates=None, keys=None, k=None, cache=None) -> dict:
    """``{"cosine": task_cosines(...), "overlap": subspace_overlap(...) or None, "alignment": alignment(...) or None}``.

    The overlap needs ``stats``, the alignment ``merged_updates``; each is None without them.
    """
    return {"cosine": task_cosines(base, tasks, stats, merged_updates, keys, k, cache),
            "overlap": subspace_overlap(base, tasks, stats, merged_updates, keys, k, cache) if stats is not None else None,
            "alignment": alignment(base, tasks, stats, merged_updates, keys, k, cache)
            if merged_updates is not None else None}
