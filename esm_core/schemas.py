"""Every merging method's typed parameters, declared once.

A method is a function plus the :class:`MethodSpec` here: its name, title,
help, parameters (:class:`Param`: type, default, range, help) and α search
grid. The function takes exactly these parameters, with no defaults of its own
(:func:`esm_core.merging.registry.register` refuses a function whose signature
differs), so each default is stated here and nowhere else. The app builds its
controls, ``esm-studio methods`` prints its list and ``esm_core.merge`` checks
its arguments from these specs. This module imports nothing heavy: the command
line reads it without loading torch.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

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
    # the library's bounds (lo, hi) where they are wider than the UI range [min, max] (α: a slider range is not
    # a limit on what a script may ask for); None: [min, max] is both
    limit: tuple[float | None, float | None] | None = None

    @property
    def bounds(self) -> tuple[float | None, float | None]:
        """What :meth:`check` enforces: :attr:`limit` when given, else ``(min, max)``."""
        return self.limit if self.limit is not None else (self.min, self.max)

    def check(self, value: Any) -> Any:
        """Coerce ``value`` to the declared type and check it against :attr:`bounds`; raise ValueError naming
        the parameter. ``min`` / ``max`` are the UI's range; a Param with a :attr:`limit` accepts values
        outside that range up to the limit (α of every method: finite, in [0, :data:`ALPHA_LIMIT`]).

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
        lo, hi = self.bounds
        if lo is not None and value < lo:
            raise ValueError(f"parameter {self.name!r} must be >= {lo}, got {value!r}")
        if hi is not None and value > hi:
            raise ValueError(f"parameter {self.name!r} must be <= {hi}, got {value!r}")
        return value

    def to_dict(self) -> dict:
        return {"name": self.name, "type": self.type.__name__, "default": self.default, "min": self.min,
                "max": self.max, "choices": list(self.choices) if self.choices else None, "help": self.help,
                **({"limit": list(self.limit)} if self.limit is not None else {})}


def resolve_params(schema: tuple[Param, ...], params: dict, owner: str) -> dict:
    """``params`` checked against ``schema``: defaults filled in, every value checked, unknown names refused."""
    known = {p.name: p for p in schema}
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ValueError(f"{owner} has no parameter(s) {unknown}; its parameters are {sorted(known)}")
    return {name: p.check(params[name]) if name in params else p.default for name, p in known.items()}


ALPHA_HELP = "global scaling coefficient of the merged update (chosen on validation by the α search)"
# The library's sanity bound on α (every method): finite and in [0, ALPHA_LIMIT]. Each method's [0, max] is the
# UI's slider range and where its α search starts, not a limit: a script may merge Iso-CTS at α = 3.125.
ALPHA_LIMIT = 100.0


def alpha_param(default: float, hi: float) -> Param:
    """The ``alpha`` Param: UI range [0, hi], library bounds [0, :data:`ALPHA_LIMIT`]."""
    return Param("alpha", float, default, ALPHA_HELP, min=0.0, max=hi, step=0.01, limit=(0.0, ALPHA_LIMIT))


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


@dataclass(frozen=True)
class MethodSpec(Schema):
    """What a merging method is, without its code (``esm_core.merging.registry.Method`` adds the function)."""
    alpha_grid: tuple[float, float, int] = (0.0, 1.0, 31)   # linspace(lo, hi, n)[1:] for the α search (methods §0)
    needs_stats: bool = False                                 # needs activation statistics (ESM family)
    # the update is α times one fixed update on every key (U(0) = 0): one merge at α = 1 gives every α
    alpha_linear: bool = False
    aliases: tuple[str, ...] = ()     # other names it is known by (mergekit, FusionBench)

    def to_dict(self) -> dict:
        return {"name": self.name, "title": self.title, "help": self.help, "aliases": list(self.aliases),
                "params": [p.to_dict() for p in self.params]}


# ---------------------------------------------------------------- the methods (methods §1-§6)

_K = Param("k", float, 20.0, "TIES trim: keep the top-k % of each task vector's entries by magnitude "
           "(over the whole model; ties at the threshold are kept)", min=0.0, max=100.0, step=1.0)
_P = Param("p", float, 0.9, "DARE drop rate: each entry of each task vector is dropped with probability p, "
           "survivors are rescaled by 1/(1-p)", min=0.0, max=0.99, step=0.01)
_SEED = Param("seed", int, 0, "random seed of DARE's drop masks (same seed and device: same merge); an integer "
              "in [0, 2**63 - 1]", min=0, max=2 ** 63 - 1, step=1)

AUTO = "auto"                 # esd_types: the model family's ESD layer types
DIRECTIONS = ("esd", "svd")   # where each task's directions P come from: its ESD (§5) or the SVD of ΔWt (ablation)
MAX_RANK_FRACTION = 4.0       # the largest rank_fraction ESM offers: ESD entries keep the columns this can use

SPECS: dict[str, MethodSpec] = {s.name: s for s in (
    MethodSpec("average", "Weight averaging", (alpha_param(1.0, 2.0),),
               help="θ0 + α · mean of the task vectors (α = 1: plain average of the fine-tuned weights)",
               alpha_grid=(0.0, 2.0, 31), aliases=("simple_average",), alpha_linear=True),   # FusionBench
    MethodSpec("ta", "Task Arithmetic", (alpha_param(0.3, 2.0),),
               help="θ0 + α · sum of the task vectors (Ilharco et al. 2023)", alpha_grid=(0.0, 1.0, 31),
               aliases=("task_arithmetic",), alpha_linear=True),                            # mergekit, FusionBench
    MethodSpec("ties", "TIES-Merging", (alpha_param(0.3, 2.0), _K),
               help="trim each task vector to its top-k % entries, elect a sign per entry, average the agreeing "
                    "entries (Yadav et al. 2023)", alpha_grid=(0.0, 1.0, 31),
               aliases=("ties_merging",), alpha_linear=True),                               # FusionBench (mergekit: ties)
    MethodSpec("dare_ta", "DARE + Task Arithmetic", (alpha_param(0.3, 2.0), _P, _SEED),
               help="randomly drop a fraction p of every task vector, rescale the rest, then Task Arithmetic "
                    "(Yu et al. 2024)", alpha_grid=(0.0, 1.0, 31),
               aliases=("dare_linear", "dare/task_arithmetic"), alpha_linear=True),         # mergekit, FusionBench
    MethodSpec("dare_ties", "DARE + TIES", (alpha_param(0.3, 2.0), _P, _SEED, _K),
               help="randomly drop a fraction p of every task vector, rescale the rest, then TIES",
               alpha_grid=(0.0, 1.0, 31), aliases=("dare/ties_merging",), alpha_linear=True),
    MethodSpec("tsv_m", "TSV-M", (alpha_param(1.0, 3.0),),
               help="Task Singular Vectors: keep each task's top 1/T singular triplets per matrix, decorrelate "
                    "the concatenated factors by polar decomposition (Gargiulo et al. 2025)",
               alpha_grid=(0.0, 3.0, 31), aliases=("tsvm", "task_singular_vector"), alpha_linear=True),
    MethodSpec("iso_c", "Iso-C", (alpha_param(1.3, 3.0),),
               help="Isotropic merging: the sum of the task matrices with every singular value set to their mean "
                    "(Marczak et al. 2025)", alpha_grid=(0.0, 3.0, 31), alpha_linear=True),
    MethodSpec("iso_cts", "Iso-CTS",
               (alpha_param(1.5, 3.0),
                Param("common_fraction", float, 0.8, "fraction of each matrix's rank given to the common subspace "
                       "(top singular directions of the sum); the rest is shared equally by the tasks' own "
                       "directions outside it", min=0.0, max=1.0, step=0.05)),
               help="Isotropic merging in common and task-specific subspaces (Marczak et al. 2025)",
               alpha_grid=(0.0, 3.0, 31), alpha_linear=True),
    MethodSpec(
        "esm", "ESM",
        (alpha_param(1.0, 3.0),
     Param("rank", int, 0, "per-task rank k of each ESD layer; 0 = floor(d_out / T); at most 65536, and a rank "
           "above a layer's output size d_out is clamped to d_out (noted in the merge's info['notes'])",
           min=0, max=65_536, step=1),
     Param("rank_fraction", float, 0.0, "alternative to rank: k = floor(rank_fraction · d_out / T) (1.0 = the "
           "default rank); 0 = unused", min=0.0, max=MAX_RANK_FRACTION, step=0.05),
     Param("p_task", float, 2.0, "inter-task scaling exponent: coordinates × (‖ΔWt‖ / mean ‖ΔW‖)^p",
           min=-4.0, max=4.0, step=0.5),
     Param("p_dim", float, 2.0, "inter-dimension (input column) scaling exponent: column j × (cj / mean c)^p",
           min=-4.0, max=4.0, step=0.5),
     Param("p_layer", float, 2.0, "inter-layer scaling exponent: layer × (‖ΔWℓ‖ / mean over its type)^p",
           min=-4.0, max=4.0, step=0.5),
     Param("eig_exp", float, 0.15, "eigenvalue weight exponent: directions × (λi / mean λ)^eig_exp",
           min=0.0, max=2.0, step=0.05),
     Param("ortho_factor", float, 2.0, "factor applied to the orthogonalised product U'V' (2 in the reference)",
           min=0.0, max=10.0, step=0.1),
     Param("esd_types", str, AUTO, "layer types merged by ESD (others: TSV-M): 'auto' = the model family's ESD types (open_clip ViT: attn.in_proj_weight, mlp.c_fc.weight, mlp.c_proj.weight; BERT-family text encoders: all six of attn.query, attn.key, attn.value, attn.output, ffn.intermediate, ffn.output), or a comma-separated list of the model's layer types; empty = none"),
     Param("directions", str, "esd", "each task's directions in an ESD layer: 'esd' (essential directions of the "
           "output shift, from activations) or 'svd' (left singular vectors of ΔW, λ = squared singular values: "
           "the paper's ablation baseline; needs no activations)", choices=DIRECTIONS)),
    help="Essential Subspace Merging: per-task essential output directions from activations (ESD), "
         "polarised task / eigenvalue / dimension / layer scalings, isotropic recombination",
        alpha_grid=(0.0, 2.0, 31), needs_stats=True),
)}

ESMPP = Schema(
    "esmpp", "ESM++",
    (Param("rank", int, 32, "rank r of each task's expert in every routed layer (methods §7: 32, also 8)",
           min=1, max=4096, step=1),
     Param("routed_types", str, "auto", "layer types that get routed experts: 'auto' = the model family's "
           "(open_clip ViT: attn.in_proj_weight, mlp.c_fc.weight; BERT family: attn.query, attn.key, attn.value, "
           "ffn.intermediate), or a comma-separated list")),
    help="ESM merge + per-task low-rank experts of what ESM lost, routed per input and layer by prototype cosine")
