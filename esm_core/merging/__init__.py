"""The merging layer: pure tensor maths, no model running, no pools, no UI.

- :mod:`.api` — ``merge`` / ``merge_updates`` / ``apply_updates`` and the per-key
  :class:`~.api.MergeContext` every method walks;
- :mod:`.registry` — each method is one function plus a typed parameter schema;
- :mod:`.basic` (average, TA, TIES, DARE), :mod:`.svd` (TSV-M, Iso-C, Iso-CTS),
  :mod:`.esm` (ESM) — the methods, registered on import;
- :mod:`.kernels` (float64 LAPACK / BLAS kernels), :mod:`.polar` (polar factor, isotropic matrix),
  :mod:`.esd` (Essential Subspace Decomposition), :mod:`.cache` (fingerprints, the decomposition cache) and
  :mod:`.stats` (activation statistics as data).

Add a method: its :class:`~esm_core.schemas.MethodSpec` in :mod:`esm_core.schemas`, one function
``fn(ctx, alpha, ...) -> {key: update}`` taking exactly its parameters, and one
``register(Method(spec, fn))`` call in a module here (imported below).
"""
from .registry import METHODS, Method, Param, alpha_param, get_method, register  # noqa: F401
from . import basic, esm, svd  # noqa: F401,E402  (registration side effect)
from .api import MergeContext, apply_updates, merge, merge_updates  # noqa: F401,E402
