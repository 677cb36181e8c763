"""ESM — Essential Subspace Merging (static), methods §5–§6.

Per ESD layer (default ``attn.in_proj_weight``, ``mlp.c_fc.weight``,
``mlp.c_proj.weight``): each task matrix is decomposed by ESD in the basis of
its essential output directions; the top-k coordinates of every task are
rescaled by three polarised scalings (task norm, eigenvalue weight, input
column norm), concatenated, orthogonalised by polar factors and recombined into
an update with a flat spectrum. Other 2-D keys go the TSV-M way (in the text
family every 2-D key, embedding tables included, with at least one triplet per
task: methods §8), other float keys are averaged; finally each transformer linear layer is rescaled by its
norm relative to the layers of the same type (inter-layer scaling) and α
multiplies the ESD keys only.

Activation statistics come from ``ctx.stats`` (``probe_pool``'s ``Stats``) or
``ctx.inputs`` (``{task: {key: X}}``). ``ctx.cache`` (see :func:`new_cache`)
keeps the decompositions (with the coordinates ``P̂ᵀΔW``), the TSV-M keys,
each ESD key's isotropic output factor ``U'`` and its recombination ``U'V'``,
so a re-merge with another rank or ``eig_exp`` recomputes only the
recombination, one with another task or dimension exponent only the input side
``V'`` and the product, and one with another α, ``p_layer`` or
``ortho_factor`` only rescales; none of them reads the task matrices again
(their fingerprints are memoised per tensor object and version).

Precision: decompositions and the polar factors run in float64 (on the CPU by
the Gram matrix's eigen-decomposition, on CUDA by Newton–Schulz products:
``polar.POLAR_ROUTES``); the products of well-conditioned factors (``polar(x)·Q``'s product
with ``Qᵀ``, ``U'V'``) run in float32 and the cached ``U'``, ``P`` and
coordinates are float32. Against an all-float64 route (kept in
``esm_core.bench.esm_rows.esm_reference``) the merged updates differ by < 1e-6
relative (Frobenius) on the benchmark's ViT-B/32 block.
"""
from __future__ import annotations

import torch

from ..models.roles import MATRIX
from ..schemas import AUTO, DIRECTIONS, MAX_RANK_FRACTION, SPECS  # noqa: F401  (AUTO, DIRECTIONS re-exported)
from .cache import DecompositionCache, EsdEntry, ResultKey, task_deltas
from .esd import completion
from .polar import isotropic, polar_route
from .stats import stats_from_inputs, task_layer_stats
from .registry import Method, register
from .svd import tsv_key



def new_cache(max_columns: int | None = None) -> DecompositionCache:
    """A fresh decomposition cache to pass as ``cache=`` to repeated ESM merges (and to the analysis)."""
    return DecompositionCache(max_columns=max_columns)


# ---------------------------------------------------------------------------
# Rank and key selection
# ---------------------------------------------------------------------------


def esm_rank(d_out: int, T: int, rank: int = 0, rank_fraction: float = 0.0, info: dict | None = None) -> int:
    """Per-task rank k of one ESD layer (methods §5.4).

    ``rank > 0``: that rank; ``rank_fraction > 0``: ``floor(rank_fraction · d_out / T)``
    (1.0 = the default); neither: ``floor(d_out / T)``. Always clamped to [1, d_out];
    when a clamp changes the asked rank and ``info`` is given (the merge's
    ``ctx.info``), a note saying so is added to ``info["notes"]`` (once per distinct note).
    """
    if rank > 0 and rank_fraction > 0:
        raise ValueError("give either rank or rank_fraction, not both (set the other to 0)")
    if rank > 0:
        k = int(rank)
    elif rank_fraction > 0:
        k = int(rank_fraction * d_out / T)        # floor(fraction · d_out / T)
    else:
        k = d_out // T                            # §5.4: floor(d_out / T)
    used = max(1, min(k, d_out))
    if used != k and info is not None:
        asked = f"rank {rank}" if rank > 0 else f"rank_fraction {rank_fraction:g} (k = {k})"
        note = (f"ESM: {asked} is more than a layer's {d_out} output dimensions; k = {d_out} (all of them) used there"
                if k > d_out else f"ESM: {asked} rounds to k = {k}; k = 1 used")
        notes = info.setdefault("notes", [])
        if note not in notes:
            notes.append(note)
    return used


def _esd_keys(ctx, esd_types: str) -> list[str]:
    """ESD keys: ``ctx.esd_keys`` if given, else the 2-D keys whose layer type is in ``esd_types``."""
    if ctx.esd_keys is not None:
        bad = [k for k in ctx.esd_keys if k not in ctx.roles or ctx.roles[k] != MATRIX]
        if bad:
            raise ValueError(f"esd_keys must be 2-D weight keys of the base model; not: {bad[:5]}")
        return [k for k in ctx.keys if k in set(ctx.esd_keys)]
    types = [t.strip() for t in esd_types.split(",") if t.strip()]
    if AUTO in types:                                  # the family's ESD types (plus any listed beside "auto")
        types = list(ctx.family_esd_types) + [t for t in types if t != AUTO]
    if not types:
        return []
    known = set(ctx.layer_types.values())
    bad = [t for t in types if t not in known]
    if bad:
        raise ValueError(f"esd_types {bad} are not layer types of this model (it has {sorted(known)}); "
                         "pass esd_keys= / layer_types= for other architectures")
    return [k for k in ctx.keys if ctx.roles[k] == MATRIX and ctx.layer_types.get(k) in types]


def _stats_of(ctx, esd_keys: list[str]):
    """The Stats to read Gram matrices from (converted from ``ctx.inputs`` if that is what was given)."""
    if not esd_keys:
        return None
    if ctx.stats is not None:
        return ctx.stats
    if ctx.inputs is not None:
        return stats_from_inputs(ctx.inputs)
    raise ValueError("ESM needs activation statistics: pass stats= (from esm_core.probe.probe_pool) or "
                     "inputs={task: {key: X}} with the inputs X of every ESD layer")


# ---------------------------------------------------------------------------
# One ESD key (methods §6.1–§6.5)
# ---------------------------------------------------------------------------


def _eig_weights(lam: torch.Tensor, k: int, eig_exp: float) -> torch.Tensor:
    """§6.2 ``e = (λ[:k] / mean λ[:k])^eig_exp``, then ``e /= mean e`` (float64)."""
    lk = lam[:k].to(torch.float64)
    if lk.numel() < k:                                             # (k beyond d_out cannot happen: k ≤ d_out)
        raise ValueError("ESD has fewer eigenvalues than the rank asked")
    lm = lk.mean()
    e = (lk / lm).pow(eig_exp) if lm > 0 else torch.ones_like(lk)
    return e / e.mean()


def esm_u(Ps, lams, k: int, eig_exp: float) -> torch.Tensor:
    """``U = [P̂1·e1 … P̂T·eT]`` (d_out × Tk, float64): the output-side factor of methods §6.2–§6.3.

    It depends on the essential bases, the rank and ``eig_exp`` only — not on
    the task or dimension exponents — so ESM caches its polar factor.
    """
    us = []
    for P, lam in zip(Ps, lams):
        Ph = P[:, :k].to(torch.float64)                            # §5.3 P̂t = first k columns of Pt
        us.append(Ph * _eig_weights(lam, k, eig_exp).to(Ph.device))   # §6.2 column i of P̂t × e_i
    return torch.cat(us, dim=1)                                    # §6.3 U = [P̂1 … P̂T]


def esm_v(Ps, lams, deltas, k: int, p_task: float, p_dim: float, eig_exp: float) -> torch.Tensor:
    """``V = [Â1; …; ÂT]`` (Tk × d_in, float64) with the eigenvalue, task and dimension scalings (§6.1–§6.4)."""
    norms = [torch.linalg.vector_norm(d.to(torch.float64)) for d in deltas]   # §6.1 nt = ‖PᵀΔWt‖F = ‖ΔWt‖F
    coords = []
    for t, W in enumerate(deltas):
        W = W.to(torch.float64)
        Ph = Ps[t][:, :k].to(W.device, torch.float64)
        coords.append(Ph.mT @ W)                                   # §5.3 Ât = P̂tᵀ ΔWt (k × d_in)
    return esm_v_from_coords(coords, lams, norms, k, p_task, p_dim, eig_exp)


def esm_v_from_coords(coords, lams, norms, k: int, p_task: float, p_dim: float, eig_exp: float) -> torch.Tensor:
    """:func:`esm_v` from the coordinates ``Ât`` (≥ k rows each, first k used) and the norms ‖ΔWt‖F."""
    norms = torch.as_tensor([float(x) for x in norms], dtype=torch.float64)
    mean_norm = norms.mean()
    T = len(coords)
    if T == 0:
        raise ValueError("no coordinates")
    d_in = coords[0].shape[1]
    V = torch.empty(T * k, d_in, dtype=torch.float64, device=coords[0].device)
    rows = []
    for t, A in enumerate(coords):
        V[t * k:(t + 1) * k] = A[:k]                               # §6.3 V = [Â1; …; ÂT] (Tk × d_in), float64
        rows.append(_eig_weights(lams[t], k, eig_exp) * float(norms[t].pow(p_task)))  # §6.2 e_i; §6.1 nt^p
    r = torch.cat(rows)
    if mean_norm > 0:
        r = r / float(mean_norm.pow(p_task))                       # §6.1 ÷ mean_t(nt)^p → factor (nt / mean nt)^p
    V.mul_(r.to(V.device)[:, None])                                # one pass: row i × e_i (nt / mean n)^p
    col = V.square().sum(0).sqrt_()       # §6.4 ‖V[:, j]‖ (vector_norm(V, dim=0) is slower: a strided reduction)
    cm = col.mean()
    if cm > 0:
        V.mul_((col / cm).pow(p_dim))                              # §6.4 column j × (cj / mean c)^p
    return V


def _live_columns(U: torch.Tensor) -> torch.Tensor | None:
    """Indices of the columns of ``U`` that are not all zero; None when every column is nonzero (nothing to
    leave out) or every one is zero (the full route handles it)."""
    nz = (U != 0).any(dim=0)
    n = int(nz.sum())
    return None if n in (0, nz.numel()) else nz.nonzero().squeeze(1)


def _isotropic_on(x: torch.Tensor, lines: torch.Tensor | None, dim: int, route: str) -> torch.Tensor:
    """``isotropic(x)`` (float32) restricted to the columns (``dim=1``) / rows (``dim=0``) ``lines``, every
    other one of ``x`` being exactly zero.

    ESM's ``U`` has a zero column, and ``V`` a zero row at the same place, for each direction with λ = 0 (a rank
    k above the structural rank of ``ΔW G ΔWᵀ``: few tasks, few probe rows, a large rank). There the polar
    factor of ``U`` (and of ``V``) is not unique, but ``U'V'`` is: the factor's columns on the zero lines meet
    zero rows of the other factor. The reduced matrix has the same nonzero singular values, so its polar factor
    (full rank: no SVD fall-back) times ``Σσ / min(x.shape)`` gives the same product without the zero lines."""
    if lines is None:
        return isotropic(x, torch.float32, route)
    xr = x.index_select(dim, lines)
    return isotropic(xr, torch.float32, route) * (min(xr.shape) / min(x.shape))


def _stats_fp(st) -> tuple:
    return st.fingerprint()


# ---------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------


def _svd_entry(cache, name: str, key: str, dfp_t: tuple, deltas, t: int, k: int, keep: int) -> EsdEntry:
    """``directions="svd"`` (the paper's ablation row "SVD directions"): P = the left singular vectors of ΔWt,
    λ = its squared singular values (only their ratios matter: §6.2 normalises), A = PᵀΔWt = diag(s)Vᵀ; directions
    beyond the rank of ΔWt are completed with orthonormal ones of λ = 0 (as §5.2 does). Cached per task and key."""
    fp = (dfp_t, "svd")
    e = cache.lookup(name, key, fp, k, source="svd")
    if e is not None and e.A is not None:
        return e
    W = deltas()[t].to(torch.float64)
    d_out = W.shape[0]
    U, s, Vh = torch.linalg.svd(W, full_matrices=False)
    c = max(k, min(U.shape[1], keep))
    U, A = U[:, :c], s[:c, None] * Vh[:c]
    if U.shape[1] < c:                                             # k above rank(ΔWt): λ = 0 directions
        extra = c - U.shape[1]
        U = torch.cat([U, completion(U, extra)], dim=1)
        A = torch.cat([A, A.new_zeros(extra, A.shape[1])])
    lam = torch.zeros(d_out, dtype=torch.float64)
    lam[:s.numel()] = s.square()
    return cache.store(name, key, EsdEntry(fp=fp, P=U.to(torch.float32).contiguous(), lam=lam, rows=0,
                                           complete=(U.shape[1] == d_out), norm=float(torch.linalg.vector_norm(W)),
                                           A=A.to(torch.float32)), source="svd")


def _esd_update(ctx, cache, key: str, stats, dfp: tuple, deltas, rank: int, rank_fraction: float, p_task: float,
                p_dim: float, eig_exp: float, directions: str = "esd") -> torch.Tensor:
    """``U'V'`` of one ESD key (§5, §6.1–§6.5 before the factor f), from the cache where its inputs are unchanged:
    the decompositions and coordinates per task, the output factor ``U'`` (bases, k, eig_exp) and the product."""
    names, T = ctx.names, len(ctx.names)
    shape = ctx.base[key].shape
    if len(shape) != 2:
        raise ValueError(f"ESD key {key!r} is not a 2-D matrix")
    d_out = shape[0]
    k = esm_rank(d_out, T, rank, rank_fraction, ctx.info)          # a clamp is noted in ctx.info
    keep = max(k, esm_rank(d_out, T, rank_fraction=MAX_RANK_FRACTION))   # the columns any offered rank uses
    svd = directions == "svd"                                      # no activation statistics read
    sts = None if svd else [task_layer_stats(stats, name, key) for name in names]
    gfps = ("svd",) * T if svd else tuple(_stats_fp(st) for st in sts)
    ns = (0,) * T if svd else tuple(int(st.n) for st in sts)
    route = polar_route(ctx.device)                                # CPU: Gram eigh; CUDA: Newton–Schulz
    fp = (("esm", rank, rank_fraction, p_task, p_dim, eig_exp, route, directions), k, dfp, gfps, ns)
    dw = cache.get_result(ResultKey("esm", key), fp)
    if dw is not None:
        return dw
    entries = []
    for t, name in enumerate(names):                               # §5 (cached)
        if svd:
            entries.append(_svd_entry(cache, name, key, dfp[t], deltas, t, k, keep))
            continue
        e = cache.lookup(name, key, (dfp[t], gfps[t], ns[t]), k)
        if e is None or e.A is None:
            st = sts[t]
            factor = st.factor()
            gram = None if factor is not None else st.gram
            e = cache.esd(name, key, deltas()[t], gram, ns[t], k=k, gram_fp=gfps[t], delta_fp=dfp[t],
                          factor=factor, keep=keep, coords=True)
        entries.append(e)
    lams = [e.lam for e in entries]
    fp_u = (k, eig_exp, route, tuple(e.fp for e in entries))
    hit = cache.get_result(ResultKey("esm-U", key), fp_u)        # U' depends on the bases, k and eig_exp only
    if hit is None:
        Ps = [e.P.to(ctx.device) for e in entries]
        U = esm_u(Ps, lams, k, eig_exp)                                                      # §6.2–§6.3
        live = _live_columns(U)
        hit = (_isotropic_on(U, live, 1, route), live)                                       # §6.5
        del U
        cache.put_result(ResultKey("esm-U", key), fp_u, hit)
    Up, live = hit
    V = esm_v_from_coords([e.A.to(ctx.device) for e in entries], lams, [e.norm for e in entries],
                          k, p_task, p_dim, eig_exp)                                         # §6.1–§6.4
    dw = (Up.to(V.device) @ _isotropic_on(V, live, 0, route)).to("cpu")                     # §6.5 U'V'
    cache.put_result(ResultKey("esm", key), fp, dw)
    return dw


def _inter_layer_betas(ctx, updates: dict, pre: dict, p_layer: float) -> dict[str, float]:
    """§6.7 inter-layer: ``βℓ = (‖ΔWℓ‖F / mean_{same type} ‖ΔW‖F)^p`` per layer type (norms with the factor f)."""
    groups: dict[str, list[str]] = {}
    for key in ctx.keys:
        t = ctx.layer_types.get(key)
        if t is not None and key in updates and ctx.roles[key] == MATRIX:
            groups.setdefault(t, []).append(key)
    betas = {}
    for ks in groups.values():
        norms = torch.stack([torch.linalg.vector_norm(updates[k].to(torch.float64)) * pre.get(k, 1.0) for k in ks])
        m = norms.mean()
        for k_, nrm in zip(ks, norms):
            betas[k_] = float((nrm / m).pow(p_layer)) if m > 0 else 1.0
    return betas


def esm(ctx, alpha: float, rank: int, rank_fraction: float, p_task: float, p_dim: float, p_layer: float,
        eig_exp: float, ortho_factor: float, esd_types: str, directions: str) -> dict[str, torch.Tensor]:
    """Essential Subspace Merging (methods §6): ESD layers merged in essential subspaces, polarised scalings.
    ``directions="svd"``: each task's directions are the left singular vectors of ΔWt instead (no statistics)."""
    if directions not in DIRECTIONS:
        raise ValueError(f"directions must be one of {list(DIRECTIONS)}, got {directions!r}")
    esd_keys = _esd_keys(ctx, esd_types)
    esd_set = set(esd_keys)
    stats = _stats_of(ctx, esd_keys) if directions == "esd" else None
    own = ctx.cache is None                    # a one-shot merge: nothing is kept from one key to the next
    cache = DecompositionCache() if own else ctx.cache
    if not isinstance(cache, DecompositionCache):
        raise ValueError(f"cache must come from esm_core.merging.esm.new_cache(), got {type(cache).__name__}")
    updates: dict[str, torch.Tensor] = {}
    pre: dict[str, float] = {}                                     # per-key factor not yet applied to updates[key]
    for key in ctx.walk("ESM"):
        dfp, deltas = task_deltas(ctx, cache, key)                 # fingerprints; the updates formed on demand
        if key in esd_set:
            dw = _esd_update(ctx, cache, key, stats, dfp, deltas, rank, rank_fraction, p_task, p_dim, eig_exp,
                             directions)
            pre[key] = ortho_factor                                # §6.5 ΔW = f · U'V'
        elif len(ctx.base[key].shape) == 2 and (ctx.roles[key] == MATRIX or ctx.tsv_every_2d):
            # §6 other 2-D keys: TSV-M (§3), shared with it; §8: every 2-D key (embedding tables too), k ≥ 1
            dw = tsv_key(cache, key, dfp, deltas, min_rank=ctx.tsv_min_rank)
        else:
            dw = cache.get_result(ResultKey("mean", key), dfp)
            if dw is None:
                dw = deltas().mean(0).to("cpu")                                         # §6 non-matrix keys: mean
                cache.put_result(ResultKey("mean", key), dfp, dw)
        updates[key] = dw                                          # kept on the CPU (one model's worth)
        if own:
            cache.clear()          # decompositions of this key (a large model's would fill the memory if kept)

    betas = _inter_layer_betas(ctx, updates, pre, p_layer)
    out = {}
    for key, dw in updates.items():
        coef = pre.get(key, 1.0) * betas.get(key, 1.0)             # §6.7 ΔWℓ ← βℓ ΔWℓ
        if key in esd_set or ctx.alpha_all:
            coef *= alpha                                          # θ = θ0 + α ΔW on ESD keys only (§6.8; §8: all)
        out[key] = (dw * coef).to("cpu", torch.float32)           # a new tensor: cached values stay intact
    ctx.info["esm"] = {"esd_keys": esd_keys, "betas": betas, "esd_calls": cache.esd_calls,
                       "esd_hits": cache.esd_hits, "directions": directions}
    return out


register(Method(SPECS["esm"], esm))
