"""Method registry: each merging method is one function plus a typed parameter schema.

The schema (:class:`Param`) is what ``esm-studio methods`` prints and what the
app builds its controls from. :func:`esm_core.merge` validates parameters
against it, so a typo or an out-of-range value fails with a message that names
the parameter and the allowed values.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


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
        """Coerce ``value`` to the declared type and check its range; raise ValueError naming the parameter."""
        try:
            if self.type is bool:
                if isinstance(value, str):
                    low = value.strip().lower()
                    if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                        raise ValueError
                    value = low in ("1", "true", "yes", "on")
                else:
                    value = bool(value)
            elif self.type is int:
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError
                value = int(value)
            elif self.type is float:
                value = float(value)
            else:
                value = self.type(value)
        except (TypeError, ValueError):
            raise ValueError(f"parameter {self.name!r} must be of type {self.type.__name__}, got {value!r}") from None
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
    alpha_grid: tuple[float, float, int] = (0.0, 1.0, 31)   # linspace(lo, hi, n)[1:] for the α search (SPEC §0)
    needs_stats: bool = False                                 # needs activation statistics (ESM family)
    extra: dict = field(default_factory=dict)

    def resolve(self, params: dict) -> dict:
        """Defaults filled in, every value checked; unknown names refused."""
        known = {p.name: p for p in self.params}
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise ValueError(f"method {self.name!r} has no parameter(s) {unknown}; its parameters are {sorted(known)}")
        return {name: p.check(params[name]) if name in params else p.default for name, p in known.items()}

    def to_dict(self) -> dict:
        return {"name": self.name, "title": self.title, "help": self.help,
                "params": [p.to_dict() for p in self.params]}


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} registered twice")
    if not any(p.name == "alpha" for p in method.params):
        raise ValueError(f"method {method.name!r} must declare an 'alpha' parameter")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {sorted(METHODS)}") from None


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
        known = {p.name: p for p in self.params}
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise ValueError(f"{self.name!r} has no parameter(s) {unknown}; its parameters are {sorted(known)}")
        return {name: p.check(params[name]) if name in params else p.default for name, p in known.items()}

    def default(self, name: str) -> Any:
        return next(p.default for p in self.params if p.name == name)

    def to_dict(self) -> dict:
        return {"name": self.name, "title": self.title, "help": self.help,
                "params": [p.to_dict() for p in self.params]}
