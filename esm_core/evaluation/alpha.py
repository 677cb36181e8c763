"""The α policy: one place that says how α is searched, for the CLI, the app and ESM++ (methods §0).

- α is the parameter named ``alpha`` of a method's schema (never "the first
  parameter"); its range is that Param's [min, max].
- Every method's update is affine in α, so the updates at α = 0 and α = a1 are
  computed once (:func:`affine_updates`) and each candidate is
  ``θ0 + U0 + α · slope`` (:func:`state_at`): a search costs two merges.
- Selection is by the best mean normalised *validation* accuracy, on the grid
  ``linspace(lo, hi, n)[1:]`` of the method (:func:`alpha_grid`; "grid") or by
  golden-section search on [0, 2] ∩ the α range (methods that need activation
  statistics, the ESM family; "golden"): :func:`default_strategy`.
- The method's α range (its Param's [min, max]) is the UI's slider range and
  where the search starts, not a limit: when the best α is the largest one
  scored, :func:`search` goes on past it one grid step at a time (at most
  :data:`EXTEND_MAX` steps, never past the library's bound
  :data:`esm_core.schemas.ALPHA_LIMIT`) and says so in its ``info``.
- The app's α curve uses at most ``max_points`` values of the same grid
  (:func:`curve_grid`), extended past either end while the best point sits on
  it (:func:`extend_curve`).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from ..progress import Progress
from ..merging import get_method, merge_updates
from ..merging.registry import Param

GOLDEN_RANGE = (0.0, 2.0)
GOLDEN_TOL = 0.01
GOLDEN_MAX_EVALS = 15
EXTEND_MAX = 30              # α values the search may add past the upper end of its grid / golden range


def alpha_param(method: str) -> Param:
    """The ``alpha`` Param of ``method``'s schema."""
    m = get_method(method)
    for p in m.params:
        if p.name == "alpha":
            return p
    raise ValueError(f"method {method!r} has no 'alpha' parameter")


def alpha_grid(method: str) -> list[float]:
    """The method's grid ``linspace(lo, hi, n)[1:]`` (methods §0)."""
    lo, hi, n = get_method(method).alpha_grid
    return [float(a) for a in np.linspace(lo, hi, n)[1:]]


def default_strategy(method: str) -> str:
    """"golden" for methods that need activation statistics (ESM family), else "grid"."""
    return "golden" if get_method(method).needs_stats else "grid"


def curve_grid(method: str, max_points: int) -> list[float]:
    """At most ``max_points`` evenly spaced values of :func:`alpha_grid` (every ⌈n / max_points⌉-th)."""
    grid = alpha_grid(method)
    if len(grid) > max_points:
        step = math.ceil(len(grid) / max_points)
        grid = grid[step - 1::step]
    return grid


def extend_curve(curve: list, score: Callable[[float], float], a_min: float | None, a_max: float | None,
                 max_extra: int, *, step: float | None = None, below: bool = True) -> list[float]:
    """Add points to ``curve`` (in place, kept sorted) while its best α is its first / last point: halfway to α's
    lower bound below (the bound itself once close; not when ``below`` is False), one step above (up to α's upper
    bound; ``step``: the curve's mean spacing when None). Returns the α values added; afterwards the optimum is
    interior or at a bound of α (or ``max_extra`` points were added)."""
    added = []
    if step is None:
        step = (curve[-1][0] - curve[0][0]) / max(len(curve) - 1, 1) if len(curve) > 1 else 0.1
    a_min = 0.0 if a_min is None else float(a_min)
    a_max = math.inf if a_max is None else float(a_max)
    while len(added) < max_extra:
        curve.sort()
        i = max(range(len(curve)), key=lambda j: curve[j][1])
        if below and i == 0 and curve[0][0] > a_min + 1e-9:
            a0 = curve[0][0]
            a = a_min if a0 - a_min <= step / 4 else a_min + (a0 - a_min) / 2
        elif i == len(curve) - 1 and curve[-1][0] < a_max - 1e-9:
            a = min(a_max, curve[-1][0] + step)
        else:
            break
        curve.append((float(a), score(float(a))))
        added.append(float(a))
    curve.sort()
    return added


def golden_section_max(f: Callable[[float], float], lo: float = GOLDEN_RANGE[0], hi: float = GOLDEN_RANGE[1], *,
                       tol: float = GOLDEN_TOL, max_evals: int = GOLDEN_MAX_EVALS) -> tuple[float, list[tuple[float, float]]]:
    """Golden-section search for the maximum of a unimodal ``f`` on [lo, hi].

    Stops when the bracket is narrower than ``tol`` or after ``max_evals``
    evaluations. Returns (best evaluated x, [(x, f(x)) in evaluation order]).
    """
    if not hi > lo:
        raise ValueError(f"golden-section search needs lo < hi, got [{lo}, {hi}]")
    if max_evals < 2:
        raise ValueError("golden-section search needs at least 2 evaluations")
    r = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - r * (b - a), a + r * (b - a)
    evals = [(c, f(c)), (d, f(d))]
    fc, fd = evals[0][1], evals[1][1]
    while b - a > tol and len(evals) < max_evals:
        if fc >= fd:          # maximum in [a, d]
            b, d, fd = d, c, fc
            c = b - r * (b - a)
            fc = f(c)
            evals.append((c, fc))
        else:                 # maximum in [c, b]
            a, c, fc = c, d, fd
            d = a + r * (b - a)
            fd = f(d)
            evals.append((d, fd))
    best = max(evals, key=lambda e: e[1])
    return best[0], evals


def golden_range(method: str) -> tuple[float, float]:
    """[0, 2] clipped to the α Param's maximum."""
    lo, hi = GOLDEN_RANGE
    amax = alpha_param(method).max
    return lo, (min(hi, float(amax)) if amax is not None else hi)


def affine_updates(base, tasks, method: str, params: Mapping[str, Any] | None = None, *, stats=None, cache=None,
                   device: str | torch.device = "auto", check: bool = True,
                   progress: Progress | None = None) -> tuple[dict, dict, float]:
    """(U0, slope, a1): the method's update at α = 0 and its slope in α, ``U(α) = U0 + α · slope``.

    The slope is measured at ``a1 = min(1, max α)`` of the method's schema; a method whose update is α times a
    fixed one (``Method.alpha_linear``: every method but ESM) is merged once, at a1, with U0 = 0. Keys whose U0
    is all zero (ESM's ESD keys, every key of an ``alpha_linear`` method) get a one-element zero view
    (:func:`zero_view`), not a model-sized tensor of zeros.
    ``check=False`` skips validating the checkpoints (a pool already checked)."""
    p = {k: v for k, v in dict(params or {}).items() if k != "alpha"}
    amax = alpha_param(method).max
    a1 = 1.0 if amax is None else min(1.0, float(amax))
    kw = dict(stats=stats, cache=cache, device=device)
    if get_method(method).alpha_linear:               # U(α) = α · U(1): one merge, U0 = 0
        u1 = merge_updates(method, base, tasks, alpha=a1, check=check, **kw, **p, progress=progress)
        return ({k: zero_view(v) for k, v in u1.items()},
                {k: (v if a1 == 1.0 else v / a1) for k, v in u1.items()}, a1)
    u0 = merge_updates(method, base, tasks, alpha=0.0, check=check, **kw, **p,
                       progress=None if progress is None else (lambda f, d: progress(0.5 * f, d)))
    u0 = {k: zero_view(v) if not bool(v.any()) else v for k, v in u0.items()}   # freed before the α = a1 merge
    u1 = merge_updates(method, base, tasks, alpha=a1, check=False, **kw, **p,
                       progress=None if progress is None else (lambda f, d: progress(0.5 + 0.5 * f, d)))
    # key by key, each α = a1 update dropped once its slope is formed: at most two model-sized sets live at once
    # (a model-sized dict of zeros and all three sets at once cost 0.7 GB more on a ViT-B/32 ESM merge)
    out0, diff = {}, {}
    for k in list(dict.fromkeys([*u0, *u1])):
        a = u0.pop(k, None)
        if a is None:
            a = zero_view(torch.empty((), dtype=torch.float32).expand(base[k].shape))
        b = u1.pop(k, None)
        diff[k] = (b - a) / a1 if b is not None else a / -a1
        out0[k] = a
    return out0, diff, a1


def zero_view(t: torch.Tensor) -> torch.Tensor:
    """An all-zero tensor of ``t``'s shape, dtype and device that holds one element (a stride-0 view)."""
    return torch.zeros((), dtype=t.dtype, device=t.device).expand(t.shape)


class UpdatesAt(Mapping):
    """The method's update at α, ``U0 + α · slope``, formed key by key when read: a read-only mapping that holds
    no model-sized tensor of its own (the app keeps its current merge this way: one model's worth less)."""

    def __init__(self, u0: Mapping[str, torch.Tensor], slope: Mapping[str, torch.Tensor], alpha: float):
        self.u0, self.slope, self.alpha = u0, slope, float(alpha)

    def __getitem__(self, k: str) -> torch.Tensor:
        return self.u0[k] + self.alpha * self.slope[k]

    def __contains__(self, k) -> bool:           # no tensor formed to answer it
        return k in self.u0

    def __iter__(self):
        return iter(self.u0)

    def __len__(self) -> int:
        return len(self.u0)


def state_at(base: Mapping[str, torch.Tensor], u0: Mapping[str, torch.Tensor], slope: Mapping[str, torch.Tensor],
             alpha: float) -> dict[str, torch.Tensor]:
    """The merged state dict at α, ``θ0 + U0 + α · slope`` (float32) for the updated keys; others are the base's."""
    return {k: (v.float() + u0[k] + alpha * slope[k]) if k in u0 else v for k, v in base.items()}


def grid_step(method: str) -> float:
    """The spacing of the method's α grid (the step :func:`search` extends it by)."""
    lo, hi, n = get_method(method).alpha_grid
    return (float(hi) - float(lo)) / max(int(n) - 1, 1)


def search(score: Callable[[float], float], method: str, strategy: str | None = None, *, extend: bool = True,
           info: dict | None = None) -> tuple[float, list[tuple[float, float]]]:
    """Run the α policy of ``method`` on ``score(α)`` (higher is better).

    Returns ``(best α, [(α, score)] sorted by α)``; on the grid the first maximum in grid order wins. When the
    best α is the largest one scored (the optimum sits at the upper edge of the grid or of the golden range) and
    ``extend`` is on, the search goes on one grid step (:func:`grid_step`) at a time past it while that keeps
    improving, at most :data:`EXTEND_MAX` steps and never past the α Param's library bound. ``info`` (a dict)
    receives ``extended`` (the α values added, [] when none), ``at_edge`` (the best α is still the largest
    scored: the extension's budget or the bound stopped it) and ``note`` (a sentence saying so, or "")."""
    strategy = strategy or default_strategy(method)
    if strategy not in ("grid", "golden"):
        raise ValueError(f"strategy must be 'grid' or 'golden', got {strategy!r}")
    if strategy == "grid":
        curve = [(a, score(a)) for a in alpha_grid(method)]
        best = max(curve, key=lambda e: e[1])[0]
    else:
        best, evals = golden_section_max(score, *golden_range(method))
        curve = sorted(evals)
    edge = max(a for a, _ in curve)
    added: list[float] = []
    if extend and best == edge:
        lo, hi = alpha_param(method).bounds
        added = extend_curve(curve, score, lo, hi, EXTEND_MAX, step=grid_step(method), below=False)
        if added:
            best = max(curve, key=lambda e: e[1])[0]          # curve sorted by α: the first maximum wins
    top = max(a for a, _ in curve)
    if info is not None:
        info["extended"] = list(added)
        info["at_edge"] = bool(extend and best == top)
        info["note"] = (f"the best α on the {strategy} search was its upper end ({edge:.3g}); the search went on past "
                        f"it to α = {top:.3g} ({len(added)} more value(s)), best α = {best:.4g}"
                        + (" — still the largest α tried" if best == top else "") if added else "")
    return float(best), [(float(a), float(s)) for a, s in curve]


def evaluations(method: str, strategy: str | None = None) -> int:
    """How many α values :func:`search` scores before any extension past the grid (for progress bars)."""
    return len(alpha_grid(method)) if (strategy or default_strategy(method)) == "grid" else GOLDEN_MAX_EVALS
