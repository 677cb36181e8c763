"""Method registry: each merging method is one function plus a typed parameter schema.

The schemas live in :mod:`esm_core.schemas` (each default stated once); the schema is what ``esm-studio methods`` prints and what the
app builds its controls from. :func:`esm_core.merge` validates parameters
against it, so a typo or an out-of-range value fails with a message that names
the parameter and the allowed values.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

from ..schemas import (ALPHA_HELP, INT_LIMIT, MethodSpec, Param, Schema, alpha_param,  # noqa: F401  (re-exported)
                       resolve_params)


@dataclass(frozen=True)
class Method:
    """A merging method.

    ``fn(ctx, **params) -> dict[key, update]`` returns, for every merged key, the
    update to add to the base (already multiplied by whatever coefficients the
    method applies, ``alpha`` included), as float32 tensors on any device.
    Keys absent from the result are copied from the base.
    """
    name: str
    title: str
    fn: Callable
    params: tuple[Param, ...]
    help: str
    alpha_grid: tuple[float, float, int] = (0.0, 1.0, 31)   # linspace(lo, hi, n)[1:] for the α search (methods §0)
    needs_stats: bool = False                                 # needs activation statistics (ESM family)
    # the update is α times one fixed update on every key (U(0) = 0): one merge at α = 1 gives every α
    alpha_linear: bool = False
    extra: dict = field(default_factory=dict)
    aliases: tuple[str, ...] = ()     # other names it is known by (mergekit, FusionBench); get_method accepts them

    def resolve(self, params: dict) -> dict:
        """Defaults filled in, every value checked; unknown names refused."""
        return resolve_params(self.params, params, f"method {self.name!r}")

    def to_dict(self) -> dict:
        return {"name": self.name, "title": self.title, "help": self.help, "aliases": list(self.aliases),
                "params": [p.to_dict() for p in self.params]}


    @classmethod
    def of(cls, spec: MethodSpec, fn: Callable, **extra) -> "Method":
        """The method ``spec`` (esm_core.schemas) computed by ``fn``."""
        return cls(spec.name, spec.title, fn, spec.params, spec.help, alpha_grid=spec.alpha_grid,
                   needs_stats=spec.needs_stats, alpha_linear=spec.alpha_linear, aliases=spec.aliases, extra=extra)


def check_signature(method: Method) -> None:
    """``method.fn(ctx, <its parameters>)``: the same names as its schema, in order, and no defaults of its own —
    every default is stated once, in the schema (esm_core.schemas)."""
    params = list(inspect.signature(method.fn).parameters.values())[1:]
    names = [p.name for p in params]
    want = [p.name for p in method.params]
    if names != want:
        raise ValueError(f"method {method.name!r}: its function takes {names}, its schema declares {want}")
    with_default = [p.name for p in params if p.default is not inspect.Parameter.empty]
    if with_default:
        raise ValueError(f"method {method.name!r}: defaults belong to the schema, not the function "
                         f"(defaults given for {with_default})")


METHODS: dict[str, Method] = {}      # canonical names only
ALIASES: dict[str, str] = {}         # alias → canonical name


def register(method: Method) -> Method:
    """Add ``method`` to :data:`METHODS` (and its aliases to :data:`ALIASES`); a name used twice is refused."""
    if method.name in METHODS or method.name in ALIASES:
        raise ValueError(f"method {method.name!r} registered twice")
    if not any(p.name == "alpha" for p in method.params):
        raise ValueError(f"method {method.name!r} must declare an 'alpha' parameter")
    check_signature(method)
    clash = [a for a in method.aliases if a in METHODS or a in ALIASES or a == method.name]
    if clash or len(set(method.aliases)) != len(method.aliases):
        taken = {a: ALIASES.get(a, a) for a in clash}
        raise ValueError(f"method {method.name!r}: alias(es) {sorted(set(clash)) or list(method.aliases)} already "
                         f"name a method ({taken}) or are repeated")
    METHODS[method.name] = method
    ALIASES.update({a: method.name for a in method.aliases})
    return method


def get_method(name: str) -> Method:
    """The method registered as ``name`` or under the alias ``name`` (e.g. ``task_arithmetic`` → ``ta``)."""
    try:
        return METHODS[ALIASES.get(name, name)]
    except (KeyError, TypeError):
        aka = f" (or an alias: {sorted(ALIASES)})" if ALIASES else ""
        raise ValueError(f"unknown method {name!r}; available: {sorted(METHODS)}{aka}") from None
