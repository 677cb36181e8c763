"""Pickled whole modules (task_vectors-style ``torch.save(ImageEncoder)`` files), read through inert stubs.

The globals a pickle names are replaced by stub classes that only record
state; ``torch.load(weights_only=True)`` runs inside ``safe_globals`` of those
stubs, so no pickle code from the file ever runs; modules known to be
dangerous are refused even when merely referenced, and nesting is bounded
(:data:`MAX_MODULE_DEPTH`). :func:`esm_core.checkpoints.load_checkpoint` is the
public entry.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Mapping

import torch

from .errors import CheckpointError, _fmt_keys

MAX_MODULE_DEPTH = 100                   # pickled whole modules nested deeper are refused (real models: < 15)
# Containers unwrapped when the top level holds no tensors itself (first match wins).
_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "module", "network", "net")


def _tensors_of(obj: Mapping) -> dict[str, torch.Tensor]:
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}



# Globals a pickle may *call* although their names are not CapWords: plain data constructors.
_CALLABLE_DATA_GLOBALS = {
    "functools.partial", "collections.defaultdict", "collections.deque", "builtins.frozenset",
    "builtins.slice", "builtins.range",
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
}
# Modules whose globals are refused even when only referenced.
_DANGEROUS_MODULES = {
    "os", "posix", "nt", "sys", "subprocess", "builtins", "__builtin__", "shutil", "socket", "importlib",
    "runpy", "pty", "ctypes", "pickle", "_pickle", "marshal", "code", "codeop", "webbrowser", "multiprocessing",
    "signal", "pdb", "timeit", "operator", "types", "_thread", "threading", "asyncio",
}
_STUB_LOCK = threading.Lock()   # safe_globals is process-wide: one stubbed load at a time


def _make_stub(full_name: str, called: list):
    """An inert class standing in for ``full_name``: records constructor arguments and pickled state."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):     # only reached when the pickle *calls* the global (REDUCE)
        called.append(full_name)
        self.__dict__["_stub_args"] = args

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)):
            state, slots = state
            state = {**(state or {}), **(slots or {})}
        if isinstance(state, dict):
            self.__dict__.update({str(k): v for k, v in state.items()})
        else:
            self.__dict__["_stub_state"] = state

    name = full_name.rpartition(".")[2]
    return type(name or "Stub", (), {"__new__": __new__, "__init__": __init__, "__setstate__": __setstate__,
                                     "__module__": "esm_core.checkpoints._stubs", "_stub_of": full_name})


def _looks_like_class(full_name: str) -> bool:
    last = full_name.rpartition(".")[2].lstrip("_")
    return bool(last) and last[0].isupper()


def _refuse_dangerous(globals_: list[str], name: str) -> None:
    bad = [g for g in globals_ if g.split(".")[0] in _DANGEROUS_MODULES and g not in _CALLABLE_DATA_GLOBALS]
    if bad:
        raise CheckpointError(f"{name}: refused — the pickle refers to {', '.join(sorted(bad))}, which could run "
                              "code when unpickled; ESM Studio never runs code from a checkpoint")


def _walk_module(obj: Any, prefix: str, out: dict[str, torch.Tensor], seen: set[int],
                 max_depth: int | None = None) -> None:
    """Rebuild ``module.state_dict()`` from a stubbed module's ``_parameters`` / ``_buffers`` / ``_modules``.

    Iterative (a hostile pickle can nest modules deeper than Python's recursion
    limit) and bounded: nesting deeper than ``max_depth`` (default
    :data:`MAX_MODULE_DEPTH`) is refused with a :class:`CheckpointError`. Keys
    come out in ``state_dict()`` order (each module's own entries, then its
    children, depth first).
    """
    max_depth = MAX_MODULE_DEPTH if max_depth is None else max_depth
    stack = [(obj, prefix, 0)]
    while stack:
        node, pre, depth = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        d = getattr(node, "__dict__", {})
        skip = d.get("_non_persistent_buffers_set") or set()
        for field in ("_parameters", "_buffers"):
            for k, v in (d.get(field) or {}).items():
                if isinstance(v, torch.Tensor) and not (field == "_buffers" and k in skip):
                    out[pre + str(k)] = v.detach()
        children = [(k, sub) for k, sub in (d.get("_modules") or {}).items() if sub is not None]
        if children and depth >= max_depth:
            where = f"{pre}{children[0][0]}"
            where = where if len(where) <= 60 else f"{where[:28]}…{where[-28:]}"
            raise CheckpointError(f"modules nested more than {max_depth} levels deep (at {where}); no real model "
                                  "is built like this, so the file is refused")
        for k, sub in reversed(children):
            stack.append((sub, f"{pre}{k}.", depth + 1))


def _is_stub_module(obj: Any) -> bool:
    return hasattr(type(obj), "_stub_of") and isinstance(getattr(obj, "__dict__", {}).get("_modules"), dict)


def _torch_load_stubbed(path: Path, name: str) -> Any:
    """``torch.load(weights_only=True)`` with every non-allowlisted global replaced by an inert stub."""
    try:
        unsafe = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except ValueError as e:       # TorchScript archive, not a torch.save file
        raise CheckpointError(f"{name}: not a torch.save checkpoint ({e})") from None
    except Exception as e:
        raise CheckpointError(f"{name}: cannot read the file (truncated or corrupt?): {e}") from None
    _refuse_dangerous(unsafe, name)
    called: list[str] = []
    stubs = [(_make_stub(g, called), g) for g in unsafe]
    with _STUB_LOCK:
        try:
            if stubs:
                with torch.serialization.safe_globals(stubs):
                    obj = torch.load(path, map_location="cpu", weights_only=True)
            else:
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{name}: cannot be read safely (truncated, corrupt or unsupported pickle): "
                                  f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    funcs = sorted({g for g in called if not _looks_like_class(g) and g not in _CALLABLE_DATA_GLOBALS})
    if funcs:
        raise CheckpointError(f"{name}: refused — the pickle asks to call {', '.join(funcs)} while loading, i.e. to "
                              "run code; ESM Studio never runs code from a checkpoint (nothing was executed)")
    return obj


def _state_dict_from_object(obj: Any, name: str) -> dict[str, torch.Tensor]:
    """Tensors out of whatever ``torch.load`` returned: a dict, a container dict, or a stubbed module."""
    if _is_stub_module(obj):
        out: dict[str, torch.Tensor] = {}
        try:
            _walk_module(obj, "", out, set())
        except CheckpointError as e:
            raise CheckpointError(f"{name}: {e}") from None
        return out
    if isinstance(obj, Mapping):
        if not obj:
            raise CheckpointError(f"{name}: is an empty state dict")
        top = _tensors_of(obj)
        if top:
            return top
        for key in _CONTAINER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and _tensors_of(inner):
                return _tensors_of(inner)
            if _is_stub_module(inner):
                return _state_dict_from_object(inner, name)
        raise CheckpointError(f"{name}: holds no tensors (top-level entries: {_fmt_keys(map(str, obj))})")
    raise CheckpointError(f"{name}: holds a {type(obj).__name__}, not a state dict or a model")
