"""Method registry: each merging method is one function plus a typed parameter schema.

The schema (:class:`Param`) is what ``esm-studio methods`` prints and what the
app builds its controls from. :func:`esm_core.merge` validates parameters
against it, so a typo or an out-of-range value fails with a message that names
the parameter and the allowed values.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

INT_LIMIT = 2 ** 63          # int parameters must satisfy -2**63 <= value < 2**63 (torch's int64)


def _as_int(value: Any) -> int:
    """``value`` as an int if it is one exactly; ValueError otherwise (bools, 1.5, "1.5", NaN, inf)."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        raise ValueError
    if isinstance(value, str):
        return int(value.strip())                # "7" → 7; "1.5", "1e3", "nan" refused
    try:
        return operator.index(value)             # int, numpy / torch integer scalars
    except TypeError:
        pass
    f = float(value)                             # float, numpy float32 / float64, …
    if not math.isfinite(f) or not f.is_integer():
        raise ValueError
    return int(f)


@dataclass(frozen=True)
class Param:
    name: str
    type: type                      # float, int, bool or str
    default: Any
    help: str
    min: float | None = None
    max: float | None = None
    choices: tuple | None = None
    step: float | None = None       # UI slider step (None: derived)

    def check(self, value: Any) -> Any:
        """Coerce ``value`` to the declared type and check its range; raise ValueError naming the parameter.

        Floats must be finite (NaN and ±inf are refused, whatever the bounds).
        Ints must be integral: ``1.5`` or ``"1.5"`` is refused rather than rounded,
        and a bool is not an int; every int must also fit in 64 bits.
        """
        try:
            if self.type is bool:
                if isinstance(value, str):
                    low = value.strip().lower()
                    if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                        raise ValueError
                    value = low in ("1", "true", "yes", "on")
                elif isinstance(value, bool) or value in (0, 1):   # a NaN or a 2 is not a truth value
                    value = bool(value)
                else:
                    raise ValueError
            elif self.type is int:
                value = _as_int(value)
            elif self.type is float:
                if isinstance(value, bool):
                    raise ValueError
                value = float(value)
            else:
                value = self.type(value)
        except (TypeError, ValueError, OverflowError, RuntimeError):
            raise ValueError(f"parameter {self.name!r} must be of type {self.type.__name__}, got {value!r}") from None
        if self.type is float and not math.isfinite(value):
            raise ValueError(f"parameter {self.name!r} must be a finite number, got {value!r}")
        if self.type is int and not -INT_LIMIT <= value < INT_LIMIT:
            raise ValueError(f"parameter {self.name!r} must fit in 64 bits (|value| < 2**63), got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"parameter {self.name!r} must be one of {list(self.choices)}, got {value!r}")
        if self.min is not None and value < self.min:
            raise ValueError(f"parameter {self.name!r} must be >= {self.min}, got {value!r}")
        if self.max is not None and value > self.max:
            raise ValueError(f"parameter {self.name!r} must be <= {self.max}, got {value!r}")
        return value

    def to_dict(self) -> dict:
        return {"name": self.name, "type": self.type.__name__, "default": self.default, "min": self.min,
                "max": self.max, "choices": list(self.choices) if self.choices else None, "help": self.help}


def resolve_params(schema: tuple[Param, ...], params: dict, owner: str) -> dict:
    """``params`` checked against ``schema``: defaults filled in, every value checked, unknown names refused."""
    known = {p.name: p for p in schema}
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ValueError(f"{owner} has no parameter(s) {unknown}; its parameters are {sorted(known)}")
    return {name: p.check(params[name]) if name in params else p.default for name, p in known.items()}


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


METHODS: dict[str, Method] = {}      # canonical names only
ALIASES: dict[str, str] = {}         # alias → canonical name


def register(method: Method) -> Method:
    """Add ``method`` to :data:`METHODS` (and its aliases to :data:`ALIASES`); a name used twice is refused."""
    if method.name in METHODS or method.name in ALIASES:
        raise ValueError(f"method {method.name!r} registered twice")
    if not any(p.name == "alpha" for p in method.params):
        raise ValueError(f"method {method.name!r} must declare an 'alpha' parameter")
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


ALPHA_HELP = "global scaling coefficient of the merged update (chosen on validation by the α search)"


def alpha_param(default: float, hi: float) -> Param:
    return Param("alpha", float, default, ALPHA_HELP, min=0.0, max=hi, step=0.01)


@dataclass(frozen=True)
class Schema:
    """A typed parameter schema of something that is not a merging method (e.g. ESM++'s own knobs)."""
    name: str
    title: str
    params: tuple[Param, ...]
    help: str

    def resolve(self, params: dict) -> dict:
        """Defaults filled in, every value checked; unknown names refused."""
        return resolve_params(self.params, params, repr(self.name))

    def default(self, name: str) -> Any:
        return next(p.default for p in self.params if p.name == name)

    def to_dict(self) -> dict:
        return {"name": self.name, "title": self.title, "help": self.help,
                "params": [p.to_dict() for p in self.params]}
