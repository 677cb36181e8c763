"""ESM rows of ``esm-studio bench``: a cold merge and re-merges from a warm decomposition cache.

ESM needs activation statistics; the benchmark uses random Gram matrices of
the right shapes instead of a probe (``XᵀX`` of ``N = 32 · 50`` random token
rows per ESD layer, shared by the tasks: every task still gets its own ESD,
since its task matrix differs). Rows:

* ``esm`` — cold merge: every ESD decomposition is computed;
* ``esm_remerge`` — the cache is warm (filled by an untimed cold merge) and the
  rank changes (``rank_fraction=0.5``): only the recombination runs;
* ``esm_exponent`` — the cache is warm and the dimension exponent changes
  (``p_dim=1``) at the default rank: the input-side factors ``V'`` and the
  products ``U'V'`` are recomputed (the output-side ``U'`` is cached);
* ``esm_alpha`` — the cache is warm and only α changes: the memoised per-key
  updates are rescaled.
"""
from __future__ import annotations

import functools

import torch

from ..merging import merge_updates
from ..merging.esm import new_cache
from ..merging.stats import LayerStats
from ..models import openclip_vit as vit
from .jobs import TOKENS, Job

PROXY_IMAGES = 32


def random_stats(base: dict, tasks: dict, seed: int = 0, rows: int = PROXY_IMAGES * TOKENS) -> dict:
    """A ``Stats`` dict with random Gram matrices ``XᵀX`` (float64) for every ESD key of ``base``."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for key in vit.esd_keys(base):
        d_in = base[key].shape[1]
        x = torch.randn(rows, d_in, generator=g)
        layers[key] = LayerStats(gram=(x.T @ x).to(torch.float64), n=rows, mean=x.mean(0).to(torch.float64))
    return {"tasks": {name: layers for name in tasks}, "proxy_ids": {}, "n": PROXY_IMAGES, "seed": seed}


def _setup_stats(base, tasks, device):
    return {"stats": random_stats(base, tasks)}


def _setup_warm(base, tasks, device):
    state = _setup_stats(base, tasks, device)
    state["cache"] = new_cache()
    merge_updates("esm", base, tasks, device=device, check=False, stats=state["stats"], cache=state["cache"])
    return state


def _run_esm(base, tasks, device, state, **params):
    # every repeat starts from the cache as the set-up left it (a repeat must not hit the previous run's result)
    cache = state["cache"].snapshot() if "cache" in state else None
    return merge_updates("esm", base, tasks, device=device, check=False, stats=state["stats"], cache=cache,
                         **params)


def esm_jobs() -> list[Job]:
    """The ESM benchmark rows (see the module docstring)."""
    return [
        Job("esm", "ESM (cold: decompositions)", _run_esm, _setup_stats, {"cache": "cold"}),
        Job("esm_remerge", "ESM re-merge (rank changed)", functools.partial(_run_esm, rank_fraction=0.5),
            _setup_warm, {"cache": "warm"}),
        Job("esm_exponent", "ESM re-merge (exponent changed)", functools.partial(_run_esm, p_dim=1.0),
            _setup_warm, {"cache": "warm"}),
        Job("esm_alpha", "ESM re-merge (alpha changed)", functools.partial(_run_esm, alpha=0.7),
            _setup_warm, {"cache": "warm"}),
    ]
