"""esm_core — Essential Subspace Merging (ESM, ESM++) and baselines for fine-tuned models.

The library behind ESM Studio: no gradio in here. Start with :func:`merge`
and :func:`load_checkpoint`; ``esm-studio methods`` lists the methods.
"""
from .checkpoints import CheckpointError, check_compatible  # noqa: F401
from .merge import apply_updates, merge, merge_updates, resolve_device  # noqa: F401
from .methods import METHODS, get_method  # noqa: F401

try:  # filled in by the checkpoint module
    from .checkpoints import load_checkpoint, save_safetensors  # noqa: F401
except ImportError:  # pragma: no cover
    pass

__version__ = "0.1.0"
