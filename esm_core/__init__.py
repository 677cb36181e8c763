"""esm_core — Essential Subspace Merging (ESM, ESM++) and baselines for fine-tuned models.

The library behind ESM Studio: no gradio in here (the web app is the ``app``
extra, :mod:`esm_core.app`). ``esm-studio methods`` lists the methods. The layers,
bottom up: :mod:`.checkpoints` → :mod:`.models` → :mod:`.pools` →
:mod:`.probe` → :mod:`.merging` → :mod:`.evaluation` / :mod:`.esmpp` →
:mod:`.studio`; :mod:`.cli` and :mod:`.bench` sit on top.

The public API, probe → merge → ESM++ → evaluate, for any model family::

    import esm_core as esm
    pool = esm.load_demo_pool()          # or esm.load_text_pool(folder), esm.image_pool_from_files(...)[0],
                                         # esm.text_pool_from_files(...)[0], esm.proxy_pool(base, tasks, proxy)
    stats = esm.probe_pool(pool, n=32, seed=0)          # each task in its own model, on its proxy samples
    merged = esm.merge_pool(pool, "esm", {"alpha": 0.8}, stats=stats)   # or esm.merge("esm", base, tasks, ...)
    accs = esm.evaluate(pool, merged)                   # per-task test accuracy (each task's own head)
    own = esm.task_model(merged, pool.tasks["t"])       # task t's model: merged + its own biases (methods §8)
    routed = esm.build_esmpp(pool, stats, rank=32, alpha=0.8)           # ESM++: merge + routed experts
    accs, log = esm.evaluate_routed(pool, routed)       # routed accuracy and every routing decision
    per_layer = esm.routing_accuracy(log)               # share routed to their own task, per routed layer
    esm.save_esmpp("bundle.safetensors", routed.merged_sd, routed.experts, routed.config)

Merging alone needs no pool: :func:`merge` takes a base state dict and ``{task: state dict}`` (or
``.safetensors`` paths), and for the ESM family activation statistics (:func:`probe_pool`, or
:func:`stats_from_inputs` from your own per-layer inputs). α is checked against a wide library bound
(finite, 0 to 100); each method's slider range in the app is not a limit.

The names below are loaded on first use, so that ``import esm_core.cli`` (and
``esm-studio --help``) does not pay for importing torch.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name → module (the same name there), or (module, name there)
_EXPORTS = {
    # checkpoints and merging
    "CheckpointError": "checkpoints", "check_compatible": "checkpoints", "load_checkpoint": "checkpoints",
    "save_safetensors": "checkpoints", "resolve_device": "device", "METHODS": "merging",
    "apply_updates": "merging", "get_method": "merging", "merge": "merging", "merge_updates": "merging",
    # pools: a base, its fine-tuned tasks, their heads and data
    "load_demo_pool": "pools.demo", "load_text_pool": ("pools.text_pool", "load_text_task_pool"),
    "image_pool_from_files": ("pools.upload", "pool_from_upload"),
    "text_pool_from_files": ("pools.upload_text", "text_pool_from_upload"),
    "proxy_pool": "evaluation.proxy",
    # probe → statistics → merge
    "probe_pool": "probe", "probe_proxy": "evaluation.proxy", "stats_from_inputs": "merging.stats",
    "merge_pool": "evaluation.proxy", "task_model": "evaluation.proxy",
    # evaluate, ESM++
    "evaluate": "evaluation.accuracy", "evaluate_method": "evaluation.runs", "search_alpha": "evaluation.runs",
    "build_esmpp": "evaluation.esmpp", "evaluate_routed": "evaluation.esmpp", "routing_accuracy": "esmpp",
    "save_esmpp": "esmpp", "load_esmpp": "esmpp", "load_routed": "esmpp",
    "read_recipe": "evaluation.recipes",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        where = _EXPORTS[name]
        module, attr = where if isinstance(where, tuple) else (where, name)
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'esm_core' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
