"""A 2-D map (PCA or UMAP) of routed samples and the task prototypes at one routed layer."""
from __future__ import annotations

import sys
import warnings
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .experts import Experts
from .log import DecisionLog

EMBED_MIN_POINTS = 15             # below this many points routing_embedding uses PCA instead of UMAP


def _import_umap():
    """Import umap-learn without its optional TensorFlow part.

    ``import umap`` also tries ``umap.parametric_umap`` (TensorFlow); where a
    TensorFlow is installed that import is slow and can crash the process, so
    it is blocked for the duration of the import (umap then skips it)."""
    if "umap" in sys.modules:
        return sys.modules["umap"]
    block = "tensorflow" not in sys.modules
    if block:
        sys.modules["tensorflow"] = None          # makes `import tensorflow` raise ImportError
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import umap
    finally:
        if block and sys.modules.get("tensorflow", 0) is None:
            del sys.modules["tensorflow"]
    return umap


def pca_fit(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and 2-column basis of the first two principal directions of the rows of ``z`` (deterministic signs;
    zero-padded if rank < 2): ``(x - mean) @ basis`` places any row ``x`` on the same map."""
    mean = z.mean(0)
    _, _, vh = torch.linalg.svd(z - mean, full_matrices=False)
    v = vh[:2].mT
    if v.shape[1] < 2:
        v = torch.cat([v, v.new_zeros(v.shape[0], 2 - v.shape[1])], 1)
    idx = v.abs().argmax(0)
    signs = torch.sign(v[idx, torch.arange(v.shape[1])])
    signs[signs == 0] = 1
    return mean, v * signs


def _pca2(z: torch.Tensor) -> torch.Tensor:
    """First two principal coordinates of the rows of z (:func:`pca_fit`)."""
    mean, basis = pca_fit(z)
    return (z - mean) @ basis


def routing_embedding(log_or_inputs: DecisionLog | torch.Tensor, layer: int | str,
                      prototypes: Experts | torch.Tensor, *, seed: int = 0, tasks: Sequence[str] | None = None,
                      true: torch.Tensor | Sequence[int] | None = None, routed: torch.Tensor | None = None,
                      method: str = "umap") -> dict:
    """2-D map of per-sample mean-pooled inputs at one routed layer, together with the prototypes.

    ``log_or_inputs``: a :class:`DecisionLog` recorded with pooled inputs
    (``routed.logging(keep_inputs=True)`` or ``routed.last_log``) or an
    (N, d) tensor of pooled inputs (then ``tasks`` and optionally ``true`` /
    ``routed`` come as arguments; ``routed`` defaults to the nearest
    prototype by cosine). ``prototypes``: :class:`Experts` or a (T, d) tensor.
    Points are L2-normalised (routing is by cosine) and embedded with UMAP
    (umap-learn, ``random_state=seed``: deterministic); with fewer than
    :data:`EMBED_MIN_POINTS` points in all, PCA is used and ``note`` says so.
    ``method="pca"``: the first two principal coordinates instead (instant;
    UMAP compiles on its first use in a process).

    Returns ``{"layer", "method" ("umap" | "pca"), "note", "seed", "tasks",
    "points" (N × 2 numpy), "prototype_points" (T × 2), "true" (task name or
    None per point), "routed" (task name per point)}``.
    """
    if method not in ("umap", "pca"):
        raise ValueError(f"method must be 'umap' or 'pca', got {method!r}")
    if isinstance(log_or_inputs, DecisionLog):
        log = log_or_inputs
        li = log.layer_index(layer)
        key: int | str = log.keys[li]
        if log.pooled is None:
            raise ValueError("the decision log has no pooled inputs: record it with routed.logging(keep_inputs=True)")
        x = log.pooled[li]
        tasks = log.tasks
        true = log.true
        routed = log.routed[:, li]
    else:
        x = log_or_inputs
        if not isinstance(x, torch.Tensor) or x.ndim != 2:
            raise ValueError("inputs must be a DecisionLog or an (N, d) tensor of mean-pooled inputs")
        key = layer
    if isinstance(prototypes, Experts):
        pkey = key if isinstance(key, str) else prototypes.keys[int(key)]
        if pkey not in prototypes.prototypes:
            raise ValueError(f"the experts have no routed layer {pkey!r}")
        protos = prototypes.prototypes[pkey]
        tasks = tasks if tasks is not None else prototypes.tasks
    else:
        protos = prototypes
    if tasks is None:
        tasks = [str(i) for i in range(protos.shape[0])]
    tasks = list(tasks)
    if protos.ndim != 2 or protos.shape[1] != x.shape[1] or protos.shape[0] != len(tasks):
        raise ValueError(f"prototypes {tuple(protos.shape)} do not fit {x.shape[1]}-d inputs and {len(tasks)} tasks")
    if x.shape[0] == 0:
        raise ValueError("no points to embed")
    xn = F.normalize(x.double(), dim=-1)
    pn = F.normalize(protos.double(), dim=-1)
    if routed is None:
        routed = (xn @ pn.mT).argmax(-1)
    z = torch.cat([xn, pn])
    if method == "pca":
        note = "PCA of L2-normalised inputs"
        coords = _pca2(z).numpy()
    elif z.shape[0] < EMBED_MIN_POINTS:
        method, note = "pca", f"PCA: only {z.shape[0]} points (UMAP needs at least {EMBED_MIN_POINTS})"
        coords = _pca2(z).numpy()
    else:
        umap = _import_umap()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reducer = umap.UMAP(n_components=2, n_neighbors=min(15, z.shape[0] - 1), random_state=seed)
            coords = np.asarray(reducer.fit_transform(z.numpy()), dtype=np.float64)
        method, note = "umap", f"UMAP of L2-normalised inputs (seed {seed})"
    n = x.shape[0]
    true_names = [None] * n if true is None else [tasks[int(t)] if int(t) >= 0 else None for t in list(true)]
    return {"layer": key, "method": method, "note": note, "seed": seed, "tasks": tasks,
            "points": coords[:n], "prototype_points": coords[n:],
            "true": true_names, "routed": [tasks[int(t)] for t in routed]}
