"""The studio: the state and operations behind one browser session (no gradio here).

The app calls every operation as ``studio.<name>(session, ...)``; they live in
:mod:`.session` (lifetime, pool), :mod:`.live` (merging, α curve),
:mod:`.inspect` (spectra, interference), :mod:`.routing` (ESM++) and
:mod:`.export`; :mod:`.viz` draws the figures (plotly, the ``app`` extra).
"""
from .session import (ALPHA_PER_TASK, LIVE_PER_TASK, Cancelled, Session, build_text, cancel, close,  # noqa: F401
                      guarded, load_demo, load_pool, load_text, load_uploaded, load_uploaded_text, memory,
                      memory_budget, new_session, pool_info, sample_images, sample_texts, tensor_bytes,
                      text_pool_status)
from .inspect import (alignment, cosines, ensure_cache, ensure_stats, esd_keys, layer_type_names, overlap,  # noqa: F401
                      spectra, spectra_at)
from ..evaluation.accuracy import accuracy_interval, binomial_halfwidth  # noqa: F401
from .live import (ALPHA_POINTS, EVAL_SEED, accuracies, alpha_curve, comparison_rows, full_evaluation,  # noqa: F401
                   merge, merge_config, method_choices, references, sample_sizes)
from . import live  # noqa: F401  (tests patch live.ALPHA_POINTS)
from .routing import esmpp_model, run_routing  # noqa: F401
from .export import (export_config, export_esmpp, export_folder, export_merged, push_merged,  # noqa: F401
                     read_export_config)
