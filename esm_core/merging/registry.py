"""Method registry: each merging method is one function plus a typed parameter schema.

The schemas live in :mod:`esm_core.schemas` (each default stated once); the schema is what ``esm-studio methods`` prints and what the
app builds its controls from. :func:`esm_core.merge` validates parameters
against it, so a typo or an out-of-range value fails with a message that names
the parameter and the allowed values.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

from ..schemas import ALPHA_HELP, INT_LIMIT, MethodSpec, Param, Schema, alpha_param  # noqa: F401  (re-exported)


@dataclass(frozen=True)
class Method:
    """A merging method: its :class:`~esm_core.schemas.MethodSpec` (name, title, help, typed parameters, α search
    grid — declared once, in :mod:`esm_core.schemas`) and the function that computes it.

    ``fn(ctx, **params) -> dict[key, update]`` returns, for every merged key, the
    update to add to the base (already multiplied by whatever coefficients the
    method applies, ``alpha`` included), as float32 tensors on any device.
    Keys absent from the result are copied from the base. The spec's fields read
    through the method (``method.name``, ``method.params``, …).
    """
    spec: MethodSpec
    fn: Callable

    def __post_init__(self):
        if not isinstance(self.spec, MethodSpec):
            raise TypeError(f"Method(spec, fn) needs a MethodSpec, got {type(self.spec).__name__}")
        if not callable(self.fn):
            raise TypeError(f"method {self.spec.name!r}: fn must be callable, got {type(self.fn).__name__}")

    name = property(lambda self: self.spec.name)
    title = property(lambda self: self.spec.title)
    params = property(lambda self: self.spec.params)
    help = property(lambda self: self.spec.help)
    alpha_grid = property(lambda self: self.spec.alpha_grid)     # linspace(lo, hi, n)[1:] for the α search (methods §0)
    needs_stats = property(lambda self: self.spec.needs_stats)   # needs activation statistics (ESM family)
    alpha_linear = property(lambda self: self.spec.alpha_linear)  # α × one fixed update: one merge gives every α
    aliases = property(lambda self: self.spec.aliases)           # other names get_method accepts (mergekit, FusionBench)

    def resolve(self, params: dict) -> dict:
        """Defaults filled in, every value checked; unknown names refused."""
        return self.spec.resolve(params)

    def to_dict(self) -> dict:
        return self.spec.to_dict()


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
