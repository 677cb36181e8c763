"""esm_core — Essential Subspace Merging (ESM, ESM++) and baselines for fine-tuned models.

The library behind ESM Studio: no gradio in here (the web app is the ``app``
extra, :mod:`esm_core.app`). Start with :func:`merge` and
:func:`load_checkpoint`; ``esm-studio methods`` lists the methods. The layers,
bottom up: :mod:`.checkpoints` → :mod:`.models` → :mod:`.pools` →
:mod:`.probe` → :mod:`.merging` → :mod:`.evaluation` / :mod:`.esmpp` →
:mod:`.studio`; :mod:`.cli` and :mod:`.bench` sit on top.
"""
__version__ = "0.1.0"

from .checkpoints import CheckpointError, check_compatible, load_checkpoint, save_safetensors  # noqa: F401,E402
from .device import resolve_device  # noqa: F401,E402
from .merging import METHODS, apply_updates, get_method, merge, merge_updates  # noqa: F401,E402
