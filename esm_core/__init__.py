"""esm_core — Essential Subspace Merging (ESM, ESM++) and baselines for fine-tuned models.

The library behind ESM Studio: no gradio in here (the web app is the ``app``
extra, :mod:`esm_core.app`). Start with :func:`merge` and
:func:`load_checkpoint`; ``esm-studio methods`` lists the methods. The layers,
bottom up: :mod:`.checkpoints` → :mod:`.models` → :mod:`.pools` →
:mod:`.probe` → :mod:`.merging` → :mod:`.evaluation` / :mod:`.esmpp` →
:mod:`.studio`; :mod:`.cli` and :mod:`.bench` sit on top.

The names below are loaded on first use, so that ``import esm_core.cli`` (and
``esm-studio --help``) does not pay for importing torch.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "CheckpointError": "checkpoints", "check_compatible": "checkpoints", "load_checkpoint": "checkpoints",
    "save_safetensors": "checkpoints", "resolve_device": "device", "METHODS": "merging",
    "apply_updates": "merging", "get_method": "merging", "merge": "merging", "merge_updates": "merging",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'esm_core' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
