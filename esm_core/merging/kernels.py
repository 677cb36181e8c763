"""Dense float64 kernels the decompositions share: SciPy's LAPACK / BLAS where they beat torch's on the CPU.

* :func:`eigh64` — the symmetric eigendecomposition (``syevd``, or ``syevr`` for the top pairs only);
* :func:`gram` — ``xᵀx``, exactly symmetric (``syrk``: one triangle);
* :func:`trmm_ok`, :func:`lt_s_l`, :func:`l_times`, :func:`times_l` — products with a lower-triangular factor
  (``trmm``: half the flops of a general product);
* :func:`scipy_threads`, :func:`blas_one_thread` — who carries the threads (torch or SciPy's BLAS).

SciPy is optional: without it every kernel falls back to torch.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from ..device import one_torch_thread

try:  # optional: SciPy's LAPACK / BLAS are faster than torch's eigh and xᵀx on one CPU core
    import scipy.linalg as sl
    from scipy.linalg.blas import dsyrk as _blas_syrk, dtrmm as _blas_trmm
except ImportError:  # pragma: no cover
    sl = None
    _blas_syrk = _blas_trmm = None


def scipy_threads(device="cpu"):
    """A context in which torch runs on one thread while SciPy's LAPACK / BLAS (their own threads) carry the
    parallel work — on the CPU with SciPy installed; elsewhere it changes nothing
    (:func:`esm_core.device.one_torch_thread` says why)."""
    if sl is None or torch.device(device).type != "cpu":
        return contextlib.nullcontext()
    return one_torch_thread()


# Sizes from which the CPU float64 helpers below call SciPy's LAPACK / BLAS instead of torch's (faster on one
# core from these sizes on).
EIGH_SCIPY_MIN = 256
GRAM_SYRK_MIN = 64
# Below this size SciPy's eigh runs with its BLAS on one thread (:func:`blas_one_thread`): LAPACK's
# tridiagonal reduction is memory-bound with a barrier per column, so a second thread gains little on a small
# matrix and loses badly on a machine whose cores are shared with other work. The Gram matrices of
# :func:`gram` (BLAS ``syrk``) below this size run on one thread too.
EIGH_ONE_THREAD_MAX = 1024

_BLAS_CONTROLLER: list = []       # threadpoolctl's controller (made once: it scans the loaded libraries), or None


def _blas_controller():
    if not _BLAS_CONTROLLER:
        try:
            from threadpoolctl import ThreadpoolController
            _BLAS_CONTROLLER.append(ThreadpoolController())
        except Exception:          # not installed (an optional dependency), or a library it cannot read
            _BLAS_CONTROLLER.append(None)
    return _BLAS_CONTROLLER[0]


def blas_one_thread():
    """A context in which SciPy's / NumPy's BLAS runs on one thread (with ``threadpoolctl`` installed; else it
    changes nothing), put back to its count on exit. OpenBLAS's count is the process's: every thread's BLAS
    calls run on one thread meanwhile."""
    ctl = _blas_controller()
    if ctl is None:
        return contextlib.nullcontext()
    return ctl.limit(limits=1, user_api="blas")


def eigh64(g: torch.Tensor, top: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` of a symmetric float64 matrix (eigenvalues ascending); on the CPU for
    n ≥ :data:`EIGH_SCIPY_MIN`, SciPy's LAPACK divide-and-conquer ``syevd`` when SciPy is installed (not a
    dependency; the fastest of torch / ``syevr`` / ``syevd`` on one core).

    ``top``: only the largest ``top`` eigenpairs are needed; when ``top ≤ n / 4`` SciPy's ``syevr`` computes
    just those and only they are returned (ascending).
    Otherwise every pair is returned. Below :data:`EIGH_ONE_THREAD_MAX` SciPy's BLAS runs on one thread."""
    if (sl is not None and g.device.type == "cpu" and g.dtype == torch.float64 and g.ndim == 2
            and g.shape[-1] >= EIGH_SCIPY_MIN):
        n = g.shape[-1]
        g = g.detach()
        with blas_one_thread() if n < EIGH_ONE_THREAD_MAX else contextlib.nullcontext():
            if top is not None and 0 < top <= n // 4:
                w, v = sl.eigh(g.numpy(), driver="evr", check_finite=False, subset_by_index=[n - top, n - 1])
            else:
                w, v = sl.eigh(g.numpy(), driver="evd", check_finite=False)
        return torch.from_numpy(w), torch.from_numpy(v)
    return torch.linalg.eigh(g)


def _syrk(x: torch.Tensor) -> torch.Tensor | None:
    """``xᵀx`` by BLAS ``dsyrk`` (one triangle computed, then mirrored: exactly symmetric), or None where unavailable."""
    if _blas_syrk is None or x.device.type != "cpu" or x.dtype != torch.float64 or x.ndim != 2:
        return None
    x = x.detach()
    with blas_one_thread() if x.shape[1] < EIGH_ONE_THREAD_MAX else contextlib.nullcontext():   # as eigh64's
        if x.is_contiguous():
            c = _blas_syrk(1.0, x.mT.numpy(), trans=0)          # x.mT is Fortran-ordered: no copy
        elif x.mT.is_contiguous():
            c = _blas_syrk(1.0, x.numpy(), trans=1)             # x itself is Fortran-ordered
        else:
            c = _blas_syrk(1.0, x.contiguous().mT.numpy(), trans=0)
    n, b = c.shape[0], 256                                  # upper triangle filled, strictly lower zero:
    for i in range(0, n, b):                                # mirror in place, by column blocks
        c[i + b:, i:i + b] = c[i:i + b, i + b:].T
        blk = c[i:i + b, i:i + b]
        c[i:i + b, i:i + b] = np.triu(blk) + np.triu(blk, 1).T
    return torch.from_numpy(c)


def gram(x: torch.Tensor, block: int = 512) -> torch.Tensor:
    """``xᵀx``, exactly symmetric: BLAS ``dsyrk`` for a CPU float64 ``x`` (one triangle, half the flops of
    ``x.mT @ x``), else computed by column blocks, upper blocks only and mirrored (≈ 45 % fewer flops than
    ``x.mT @ x`` for n ≥ 2·block)."""
    n = x.shape[1]
    if n >= GRAM_SYRK_MIN:
        g = _syrk(x)
        if g is not None:
            return g
    if n < 2 * block:
        g = x.mT @ x
        return (g + g.mT) / 2
    nb = -(-n // block)
    size = -(-n // nb)
    edges = list(range(0, n, size)) + [n]
    g = x.new_empty(n, n)
    for i in range(len(edges) - 1):
        a0, a1 = edges[i], edges[i + 1]
        xa = x[:, a0:a1]
        row = xa.mT @ x[:, a0:]                        # blocks (i, j ≥ i)
        g[a0:a1, a0:] = row
        g[a0:, a0:a1] = row.mT
    for i in range(len(edges) - 1):
        a0, a1 = edges[i], edges[i + 1]
        blk = g[a0:a1, a0:a1]
        g[a0:a1, a0:a1] = (blk + blk.mT) / 2           # diagonal blocks: exactly symmetric
    return g


def trmm_ok(*xs: torch.Tensor) -> bool:
    """Whether the ``trmm`` helpers below can take ``xs``: SciPy's BLAS present, CPU float64 tensors, no autograd."""
    return _blas_trmm is not None and all(x.device.type == "cpu" and x.dtype == torch.float64
                                          and not x.requires_grad for x in xs)


def lt_s_l(L: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """``Lᵀ S L`` for a lower-triangular ``L`` and an exactly symmetric ``S``, by two BLAS ``dtrmm`` (half the
    flops of two general products), exactly symmetrised."""
    a = L.mT.numpy()                                    # Lᵀ (upper triangular)
    y = _blas_trmm(1.0, a, S.numpy().T, side=1, lower=0, trans_a=1)          # S L (S = Sᵀ: a Fortran view)
    k = torch.from_numpy(_blas_trmm(1.0, a, y, side=0, lower=0, trans_a=0, overwrite_b=1))   # Lᵀ (S L)
    return (k + k.mT) / 2


def l_times(L: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``L X`` for a lower-triangular ``L`` by BLAS ``dtrmm``."""
    return torch.from_numpy(_blas_trmm(1.0, L.mT.numpy(), X.numpy(), side=0, lower=0, trans_a=1))


def times_l(X: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """``X L`` for a lower-triangular ``L`` by BLAS ``dtrmm`` (computed as ``(Lᵀ Xᵀ)ᵀ``: no copies)."""
    mt = _blas_trmm(1.0, L.mT.numpy(), X.mT.numpy(), side=0, lower=0, trans_a=0)   # Lᵀ Xᵀ (Fortran views)
    return torch.from_numpy(mt).mT
