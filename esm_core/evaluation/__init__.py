"""Evaluation: per-task accuracy (:mod:`.accuracy`), the one α policy (:mod:`.alpha`), whole runs (:mod:`.runs`),
ESM++ on a pool (:mod:`.esmpp`)."""
from .accuracy import evaluate, normalised, reference_accuracies, summarize  # noqa: F401
from .runs import evaluate_method, merged_state, search_alpha  # noqa: F401
from .esmpp import build_esmpp, evaluate_esmpp, evaluate_routed  # noqa: F401
