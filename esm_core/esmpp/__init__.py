"""ESM++ (methods §7): the ESM-merged model plus routed low-rank experts, chosen per input and layer.

- :mod:`.experts` — factors ``Bt``, ``At`` and prototypes per task and routed layer;
- :mod:`.model` — the routed model (:class:`RoutedModel`: open_clip image tower or BERT-family text
  encoder) and its router;
- :mod:`.log` — the decision log (routing accuracy, confusion, majority task);
- :mod:`.io` — saving / loading an ESM++ bundle (:func:`load_routed` rebuilds a text model from the file); :mod:`.embedding` — the 2-D map.

ESM++'s own knobs form the typed schema :data:`ESMPP` (the static ESM merge
keeps ESM's schema). The pipeline on a pool (α search, evaluation) lives in
:mod:`esm_core.evaluation.esmpp`.
"""
from ..schemas import ESMPP as _ESMPP
from .experts import Experts, build_experts, routed_keys_of  # noqa: F401
from .io import FACTOR_PREFIX, load_esmpp, load_routed, save_esmpp  # noqa: F401
from .log import DecisionLog, confusion, majority_task, routing_accuracy  # noqa: F401
from .model import RoutedAttention, RoutedLinear, RoutedModel, build_routed  # noqa: F401
from .embedding import routing_embedding  # noqa: F401

ESMPP = _ESMPP     # its typed parameters (rank, routed_types): esm_core.schemas
