"""Decompositions shared by the methods: SVD, polar factor, ESD (and their cache)."""
from __future__ import annotations

import torch


def polar_svd(x: torch.Tensor) -> torch.Tensor:
    """Orthogonal polar factor of ``x`` by SVD: ``x = P Σ Qᵀ → P Qᵀ`` (reference route)."""
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh


def polar(x: torch.Tensor) -> torch.Tensor:
    """Orthogonal polar factor ``P Qᵀ`` of ``x`` (m × n)."""
    return polar_svd(x)
