"""PEFT LoRA adapters read as dense task checkpoints (methods §1, "LoRA adapters as task checkpoints").

A LoRA adapter (Hugging Face PEFT's ``save_pretrained`` output: ``adapter_config.json`` plus
``adapter_model.safetensors`` or a weights-only ``adapter_model.bin``), given as a folder or as a ``.zip``
of that folder, becomes the task's dense checkpoint ``W_t = W_0 + s · B A`` for every module it targets:

- ``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``); ``r`` and ``lora_alpha`` per module
  from ``rank_pattern`` / ``alpha_pattern`` when a pattern matches (PEFT's rule: the first pattern ``p`` with
  ``re.match(rf"(.*\\.)?({p})$", module)``); ``fan_in_fan_out`` and embeddings (``lora_embedding_A/B``) are
  transposed as PEFT does; an ``nn.MultiheadAttention`` target (open_clip's ``attn``) updates
  ``attn.in_proj_weight`` (its ``lora_A/B``) and ``attn.out_proj.weight`` (``attn.base_layer.out_proj``).
- Tensors of ``modules_to_save`` (e.g. the classifier) and, with ``bias`` other than ``"none"``, biases are
  taken whole: they replace the base's tensor of that name, or become the task's own keys when the base has
  none (a text task's head).
- Adapter key ``base_model.model.<module>.lora_A[.<adapter>].weight`` targets the base key ``<module>.weight``;
  a base that carries one prefix more or less (``bert.``, ``visual.``) is matched when exactly one base key
  fits, never by choosing between two.

Refused, naming what is wrong, before any dense tensor is built: adapter types other than LoRA, DoRA and the
PEFT variants whose weights are not ``B A`` (LoRA biases, layer replication, …), target modules the base does
not have, ranks and shapes that disagree with the config or with the base weight, non-finite values, missing
files. A ``.zip`` is listed before anything is extracted: members counted from its end record, names,
sizes (declared and compressed) and the free disk space checked; only the adapter's two files are extracted,
into a private temporary folder that is removed whatever happens.

The adapter's file is read by the function the caller passes (:func:`esm_core.checkpoints.load_checkpoint`:
safetensors bounded before parsing, ``.bin`` through the weights-only reader, no pickle code run); this
module stays below :mod:`esm_core.checkpoints`, which calls it for folders and ``.zip`` files.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Mapping

import torch

from .device import all_finite
from .errors import CheckpointError, _fmt_keys

try:                                   # the regular-expression parser (Python 3.11+: re._parser)
    from re import _parser as _sre_parse
except ImportError:                    # pragma: no cover — older Pythons
    import sre_parse as _sre_parse     # type: ignore[no-redef]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")   # PEFT prefers the first
MAX_ADAPTER_CONFIG_BYTES = 1024 ** 2   # real adapter_config.json files: ~1-5 KB
MAX_ZIP_MEMBERS = 64                   # a saved adapter folder: config, weights, README, a few tokenizer files
MAX_ZIP_DIRECTORY_BYTES = 1024 ** 2    # the zip's central directory for those members (~100 bytes each)
MAX_COMPRESSION_RATIO = 200            # float weights compress < 10:1; a member beyond this (and > 1 MiB) is a bomb
MAX_PATTERNS = 4096                    # rank_pattern / alpha_pattern entries
MAX_PATTERN_CHARS = 256
MAX_PATTERN_REPEATS = 2             # unbounded repetitions in one pattern (each multiplies the matching time)
MAX_MODULE_CHARS = 512               # an adapter's module names (real ones: < 120 characters)
MAX_RANK = 65_536
DISK_MARGIN_BYTES = 64 * 1024 ** 2     # free space left on the temporary disk after extracting a zip
_BOMB_FLOOR = 1024 ** 2

# Config fields of PEFT variants whose weights are not W0 + s·BA (or whose update is not merged into W):
# refused when set, naming the field.
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora) rescales each column of W0 + s·BA by a learned magnitude; a DoRA adapter is not a "
                "low-rank update — merge it into the model first (peft's merge_and_unload) and give the dense "
                "checkpoint",
    "lora_bias": "LoRA biases (lora_bias) are not supported",
    "layer_replication": "layer replication (layer_replication) changes the model's layers and is not supported",
    "use_qalora": "QA-LoRA (use_qalora) is not supported",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not supported",
    "target_parameters": "LoRA on bare parameters (target_parameters) is not supported",
    "trainable_token_indices": "trainable token indices (trainable_token_indices) are not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) applies only after its invocation "
                               "tokens; it is not a weight update and is not supported",
    "megatron_config": "Megatron-parallel LoRA (megatron_config) is not supported",
    "kasa_config": "KaSA (kasa_config) truncates the base weight and scales BA by learned singular values; not "
                   "supported",
    "monteclora_config": "MonteCLoRA (monteclora_config) samples its update; not supported",
    "arrow_config": "Arrow routing (arrow_config) mixes several adapters per input; not supported",
    "loftq_config": "LoftQ (loftq_config) trains against a quantised base, not this one; not supported",
}
# Initialisations that change W0 itself (the saved A, B are relative to W0 − B₀A₀): PEFT converts such an adapter
# to a plain LoRA on the original base when saved with path_initial_model_for_weight_conversion.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "astra", "lora_ga")
_PEFT_PREFIX = "base_model.model."
_LORA = re.compile(r"^(?P<mod>.+)\.(?P<kind>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.weight\Z")
_LORA_EMB = re.compile(r"^(?P<mod>.+)\.(?P<kind>lora_embedding_A|lora_embedding_B)(?:\.(?P<adapter>[^.]+))?\Z")
_SAVED = re.compile(r"\.modules_to_save(?:\.default)?(?=\.)")


def is_adapter_path(path: str | os.PathLike) -> bool:
    """True for what :func:`load_adapter` reads: a folder (an adapter folder) or a ``.zip`` file — and a missing
    path without an extension or ending in ``/``, so that it is refused as a missing adapter folder."""
    p = Path(path)
    missing_folder = not p.exists() and (p.suffix == "" or str(path).endswith(("/", os.sep)))
    return p.is_dir() or p.suffix.lower() == ".zip" or missing_folder


# ---------------------------------------------------------------------------------------------- the config


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _nested_repeat(items, inside: bool = False) -> bool:
    """True when a parsed regular expression repeats something that itself repeats or branches (``(a+)+``,
    ``(a|a)*``) or uses a back-reference: the shapes that backtrack exponentially."""
    for op, av in items:
        name = str(op)
        if name == "GROUPREF" or name == "GROUPREF_EXISTS":
            return True
        if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            lo, hi, sub = av
            if hi != 0 and (hi is _sre_parse.MAXREPEAT or hi > 1):
                if inside:
                    return True
                if _nested_repeat(sub, True):
                    return True
            elif _nested_repeat(sub, inside):
                return True
        elif name == "BRANCH":
            if inside:
                return True
            if any(_nested_repeat(b, inside) for b in av[1]):
                return True
        elif name == "SUBPATTERN":
            if _nested_repeat(av[-1], inside):
                return True
        elif name in ("ASSERT", "ASSERT_NOT"):
            if _nested_repeat(av[1], inside):
                return True
    return False


def _unbounded(items) -> int:
    """How many repetitions without an upper bound (``*``, ``+``, ``{n,}``) a parsed expression holds."""
    n = 0
    for op, av in items:
        name = str(op)
        if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            n += (av[1] == _sre_parse.MAXREPEAT) + _unbounded(av[2])
        elif name == "SUBPATTERN":
            n += _unbounded(av[-1])
        elif name == "BRANCH":
            n += sum(_unbounded(b) for b in av[1])
        elif name in ("ASSERT", "ASSERT_NOT"):
            n += _unbounded(av[1])
    return n


def _patterns(cfg: Mapping, field: str, name: str, want_int: bool) -> list[tuple[re.Pattern, str, float]]:
    """``rank_pattern`` / ``alpha_pattern`` as compiled ``(regex, pattern, value)``, in the config's order."""
    raw = cfg.get(field)
    if raw is None:
        return []
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{name}: adapter_config.json: {field} must be an object of pattern → value, "
                              f"not {type(raw).__name__}")
    if len(raw) > MAX_PATTERNS:
        raise CheckpointError(f"{name}: adapter_config.json: {field} has {len(raw):,} entries, more than "
                              f"{MAX_PATTERNS:,}")
    out = []
    for p, v in raw.items():
        if not isinstance(p, str) or not p or len(p) > MAX_PATTERN_CHARS:
            raise CheckpointError(f"{name}: adapter_config.json: {field} pattern {str(p)[:40]!r} must be a "
                                  f"non-empty string of at most {MAX_PATTERN_CHARS} characters")
        ok = (_is_int(v) and 1 <= v <= MAX_RANK) if want_int else _is_number(v)
        if not ok:
            what = f"a whole number in 1..{MAX_RANK}" if want_int else "a finite number"
            raise CheckpointError(f"{name}: adapter_config.json: {field}[{p!r}] = {v!r} is not {what}")
        full = rf"(.*\.)?({p})$"
        try:
            nested = _nested_repeat(_sre_parse.parse(full))
            rx = re.compile(full)
        except (re.error, RecursionError, OverflowError) as e:
            raise CheckpointError(f"{name}: adapter_config.json: {field} pattern {p!r} is not a valid regular "
                                  f"expression ({e})") from None
        if nested:
            raise CheckpointError(f"{name}: adapter_config.json: {field} pattern {p!r} nests repetitions or uses "
                                  "back-references (it could take exponential time to match); write it without them")
        if _unbounded(_sre_parse.parse(p)) > MAX_PATTERN_REPEATS:
            raise CheckpointError(f"{name}: adapter_config.json: {field} pattern {p!r} has more than "
                                  f"{MAX_PATTERN_REPEATS} unbounded repetitions (*, +, {{n,}}); matching it could take "
                                  "very long — refused")
        out.append((rx, p, v))
    return out


def _pattern_value(patterns, module: str, default):
    for rx, _, v in patterns:                    # PEFT's get_pattern_key: the first pattern that matches
        if rx.match(module):
            return v
    return default


def check_adapter_config(cfg, name: str = "adapter") -> dict:
    """The checked fields of an ``adapter_config.json``: ``r``, ``lora_alpha``, ``use_rslora``,
    ``fan_in_fan_out``, ``bias``, ``modules_to_save``, the compiled patterns and ``base_model_name_or_path``.
    Raises :class:`CheckpointError` naming the field for another adapter type, DoRA, the unsupported variants
    and malformed values."""
    if not isinstance(cfg, Mapping):
        raise CheckpointError(f"{name}: adapter_config.json must hold a JSON object, not {type(cfg).__name__}")
    kind = cfg.get("peft_type")
    if not isinstance(kind, str) or kind.upper() != "LORA":
        raise CheckpointError(f"{name}: adapter type {kind!r} (peft_type) is not LoRA; only LoRA adapters "
                              "(peft_type \"LORA\") are read as task checkpoints")
    for field, why in _UNSUPPORTED.items():
        if cfg.get(field) not in (None, False, [], {}, ""):
            raise CheckpointError(f"{name}: {why} — refused")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise CheckpointError(f"{name}: init_lora_weights = {init!r} changes the base weights themselves, so this "
                              "adapter's B·A is relative to a modified base — convert it to a plain LoRA with peft "
                              "(save_pretrained(..., path_initial_model_for_weight_conversion=...)) and give that")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not (_is_int(r) and 1 <= r <= MAX_RANK):
        raise CheckpointError(f"{name}: adapter_config.json: r = {r!r} is not a whole number in 1..{MAX_RANK}")
    if not _is_number(alpha):
        raise CheckpointError(f"{name}: adapter_config.json: lora_alpha = {alpha!r} is not a finite number")
    flags = {}
    for field in ("use_rslora", "fan_in_fan_out"):
        v = cfg.get(field, False)
        if not isinstance(v, bool):
            raise CheckpointError(f"{name}: adapter_config.json: {field} = {v!r} is not true or false")
        flags[field] = v
    bias = cfg.get("bias", "none")
    if bias not in ("none", "all", "lora_only"):
        raise CheckpointError(f"{name}: adapter_config.json: bias = {bias!r} is not one of 'none', 'all', "
                              "'lora_only'")
    saved = cfg.get("modules_to_save") or []
    if isinstance(saved, str):
        saved = [saved]
    if not isinstance(saved, list) or not all(isinstance(s, str) and s for s in saved) or len(saved) > MAX_PATTERNS:
        raise CheckpointError(f"{name}: adapter_config.json: modules_to_save must be a list of module names")
    base_model = cfg.get("base_model_name_or_path")
    if base_model is not None and not isinstance(base_model, str):
        raise CheckpointError(f"{name}: adapter_config.json: base_model_name_or_path is not a string")
    return {"r": r, "lora_alpha": alpha, **flags, "bias": bias, "modules_to_save": saved,
            "rank_pattern": _patterns(cfg, "rank_pattern", name, True),
            "alpha_pattern": _patterns(cfg, "alpha_pattern", name, False),
            "base_model_name_or_path": (base_model or "")[:500] or None}


# ------------------------------------------------------------------------------------ adapter → dense task


class _KeyIndex:
    """Maps an adapter's parameter name onto the base's keys: the same name, or one base key that carries a
    prefix more (``visual.`` + name) or less (name = ``bert.`` + key); several candidates are refused."""

    def __init__(self, keys):
        self.keys = set(keys)
        self.by_suffix: dict[str, list[str]] = {}
        for k in self.keys:
            parts = k.split(".")
            for i in range(1, len(parts)):
                self.by_suffix.setdefault(".".join(parts[i:]), []).append(k)

    def find(self, key: str) -> list[str]:
        if key in self.keys:
            return [key]
        parts = key.split(".")
        found = list(self.by_suffix.get(key, ()))                           # the base has a prefix more
        found += [s for i in range(1, len(parts)) if (s := ".".join(parts[i:])) in self.keys]   # … or less
        return sorted(set(found))


def _one(index: _KeyIndex, names: list[str], name: str, what: str) -> str | None:
    for n in names:
        found = index.find(n)
        if len(found) > 1:
            raise CheckpointError(f"{name}: {what} {n!r} fits several base keys ({_fmt_keys(found)}); the adapter's "
                                  "names must identify one — refused rather than guessed")
        if found:
            return found[0]
    return None


def _split_keys(sd: Mapping[str, torch.Tensor], name: str):
    """``({module: {"A": t, "B": t, "embedding": bool}}, {full-tensor key: t})`` with PEFT's prefix and the
    adapter name removed; a second adapter name, DoRA vectors and unknown LoRA tensors are refused."""
    keys = list(sd)
    if any(k.startswith(_PEFT_PREFIX) for k in keys):
        odd = [k for k in keys if not k.startswith(_PEFT_PREFIX)]
        if odd:
            raise CheckpointError(f"{name}: some keys start with {_PEFT_PREFIX!r} and some do not: {_fmt_keys(odd)}")
        keys = [k[len(_PEFT_PREFIX):] for k in keys]
    long = [k for k in keys if len(k) > MAX_MODULE_CHARS]
    if long:
        raise CheckpointError(f"{name}: key(s) longer than {MAX_MODULE_CHARS} characters: "
                              f"{', '.join(repr(k[:60] + '…') for k in long[:3])}")
    lora: dict[str, dict] = {}
    full: dict[str, torch.Tensor] = {}
    adapters = set()
    for raw, k in zip(sd, keys):
        t = sd[raw]
        m = _LORA.match(k) or _LORA_EMB.match(k)
        if m is not None:
            if m.group("adapter"):
                adapters.add(m.group("adapter"))
            emb = m.group("kind").startswith("lora_embedding")
            entry = lora.setdefault(m.group("mod"), {"embedding": emb})
            if entry["embedding"] != emb:
                raise CheckpointError(f"{name}: module {m.group('mod')!r} has both linear and embedding LoRA factors")
            side = m.group("kind")[-1]
            if side in entry:
                raise CheckpointError(f"{name}: module {m.group('mod')!r} has two lora_{side} tensors (several "
                                      "adapters in one file?)")
            entry[side] = t
        elif "lora_magnitude_vector" in k:
            raise CheckpointError(f"{name}: {raw!r} is a DoRA magnitude vector: {_UNSUPPORTED['use_dora']} — refused")
        elif ".lora_" in k or k.startswith("lora_"):
            raise CheckpointError(f"{name}: {raw!r} is a LoRA tensor this reader does not know (only lora_A / "
                                  "lora_B weights and lora_embedding_A / _B are read) — refused")
        else:
            full[_SAVED.sub("", k)] = t
    if len(adapters) > 1:
        raise CheckpointError(f"{name}: the file holds several adapters ({', '.join(sorted(adapters))}); give one")
    half = [f"{m} (lora_{'A' if 'B' in e else 'B'} missing)" for m, e in lora.items() if not ("A" in e and "B" in e)]
    if half:
        raise CheckpointError(f"{name}: incomplete LoRA factors: {_fmt_keys(half)}")
    return lora, full


def _base_name_note(wanted: str | None, base_name: str | None, name: str) -> str | None:
    if not wanted:
        return None
    if not base_name:
        return f"{name}: adapter made for base {wanted!r} (base_model_name_or_path); check it is this base"

    def norm(s: str) -> str:
        s = s.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].lower()
        for ext in (".safetensors", ".pt", ".pth", ".bin", ".ckpt"):
            s = s.removesuffix(ext)
        return s

    if norm(wanted) == norm(base_name):
        return None
    return (f"warning: {name} was made for base {wanted!r} (base_model_name_or_path), the base here is "
            f"{base_name!r}; merged anyway — check they are the same model")


def dense_from_adapter(base: Mapping[str, torch.Tensor], config: Mapping, weights: Mapping[str, torch.Tensor], *,
                       name: str = "adapter", base_name: str | None = None,
                       notes: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The dense task checkpoint of a LoRA adapter (``config``: its ``adapter_config.json``; ``weights``: its
    tensors) on ``base``: every base key, ``W0 + s·BA`` where the adapter targets it (float32, float64 for a
    float64 base), the adapter's whole tensors (``modules_to_save``, biases) in place of the base's or as own
    keys, the rest copied from the base. Everything is checked before the first dense tensor is built;
    ``notes`` receives one line on the adapter and a warning when ``base_model_name_or_path`` differs from
    ``base_name``. Raises :class:`CheckpointError` naming what is wrong."""
    cfg = check_adapter_config(config, name)
    lora, full = _split_keys(weights, name)
    if not lora and not full:
        raise CheckpointError(f"{name}: the adapter holds no tensors")
    index = _KeyIndex(base)
    plan = []                                    # (base key, A, B, scale, transpose, rank)
    missing, problems, targets = [], [], {}
    for mod, e in sorted(lora.items()):
        A, B = e["A"], e["B"]
        if A.ndim != 2 or B.ndim != 2:
            what = "a convolution" if A.ndim == 4 else f"{A.ndim}-D"
            problems.append(f"{mod}: LoRA on {what} layers is not supported (lora_A {tuple(A.shape)})")
            continue
        if not (A.is_floating_point() and B.is_floating_point()):
            problems.append(f"{mod}: LoRA factors must be float tensors ({A.dtype}, {B.dtype})")
            continue
        owner = mod.split(".base_layer")[0]      # patterns match the module PEFT wrapped (an attention's attn)
        path = mod.replace(".base_layer", "")
        names = [f"{path}.weight"] if e["embedding"] else [f"{path}.weight", f"{path}.in_proj_weight"]
        key = _one(index, names, name, "target module")
        if key is None:
            missing.append(path)
            continue
        if key in targets:
            problems.append(f"{mod} and {targets[key]} both target {key}")
            continue
        targets[key] = mod
        r = _pattern_value(cfg["rank_pattern"], owner, cfg["r"])
        alpha = _pattern_value(cfg["alpha_pattern"], owner, cfg["lora_alpha"])
        W = base[key]
        transpose = e["embedding"] or cfg["fan_in_fan_out"]
        want = tuple(W.shape[::-1]) if transpose else tuple(W.shape)
        if A.shape[0] != B.shape[1]:
            problems.append(f"{mod}: lora_A is {tuple(A.shape)} and lora_B {tuple(B.shape)}: their ranks differ")
        elif A.shape[0] != r:
            problems.append(f"{mod}: rank {A.shape[0]} (lora_A {tuple(A.shape)}) but the config says r = {r}")
        elif W.ndim != 2 or (B.shape[0], A.shape[1]) != want:
            layout = "(in × out, fan_in_fan_out)" if cfg["fan_in_fan_out"] and not e["embedding"] else ""
            problems.append(f"{mod}: B·A is {B.shape[0]} × {A.shape[1]}, the base's {key} is "
                            f"{tuple(W.shape)}{' ' + layout if layout else ''}")
        elif not W.is_floating_point():
            problems.append(f"{mod}: the base's {key} is {W.dtype}, not a float weight")
        else:
            scale = alpha / math.sqrt(r) if cfg["use_rslora"] else alpha / r
            plan.append((key, A, B, scale, transpose, r))
    if missing:
        raise CheckpointError(f"{name}: target module(s) not in the base: {_fmt_keys(missing)} (the adapter was "
                              "made for another model, or the base checkpoint lacks them)")
    if problems:
        raise CheckpointError(f"{name}: the adapter does not fit the base — " + " | ".join(problems[:8])
                              + (f" … and {len(problems) - 8} more" if len(problems) > 8 else ""))
    saved = cfg["modules_to_save"]
    own, replace, unexpected = {}, {}, []
    for k, t in full.items():
        mod = k.rpartition(".")[0]
        is_saved = any(mod == s or mod.startswith(s + ".") or mod.endswith("." + s) or f".{s}." in f".{mod}."
                       for s in saved)
        is_bias = cfg["bias"] != "none" and k.endswith(".bias")
        if not (is_saved or is_bias):
            unexpected.append(k)
            continue
        key = _one(index, [k], name, "tensor")
        if key is None:
            own[k] = t
        elif tuple(base[key].shape) != tuple(t.shape) or base[key].is_floating_point() != t.is_floating_point():
            problems.append(f"{k}: {tuple(t.shape)} {t.dtype} vs the base's {key} {tuple(base[key].shape)} "
                            f"{base[key].dtype}")
        elif key in targets or key in replace:
            problems.append(f"{k}: the base's {key} is given twice")
        else:
            replace[key] = t
    if unexpected:
        raise CheckpointError(f"{name}: tensors that are neither LoRA factors nor in modules_to_save "
                              f"({saved or 'none listed'}): {_fmt_keys(unexpected)}")
    if problems:
        raise CheckpointError(f"{name}: the adapter does not fit the base — " + " | ".join(problems[:8]))
    bad = [k for k, t in list(full.items()) if t.is_floating_point() and not all_finite(t)]
    bad += [targets[k] for k, A, B, *_ in plan if not (all_finite(A) and all_finite(B))]
    if bad:
        raise CheckpointError(f"{name}: non-finite values (NaN/inf) in: {_fmt_keys(bad)}")

    out: dict[str, torch.Tensor] = {}
    changed = {}
    for key, A, B, scale, transpose, _ in plan:
        W = base[key]
        ct = torch.promote_types(W.dtype, torch.float32)
        delta = (B.to(ct) @ A.to(ct)).mul_(scale)       # (B A) · s, then Wt = W0 + it: one layer-sized temporary
        w = W.detach().to("cpu", ct, copy=True).add_(delta.T if transpose else delta)
        del delta
        if not all_finite(w):
            raise CheckpointError(f"{name}: W0 + s·BA of {key} overflows (non-finite values in float32)")
        changed[key] = w.contiguous()
    for k, v in base.items():
        out[k] = changed[k] if k in changed else replace[k].detach().clone() if k in replace else v.detach().clone()
    for k, t in own.items():
        out[k] = t.detach().clone()
    if notes is not None:
        ranks = sorted({p[5] for p in plan})
        notes.append(f"{name}: LoRA adapter, {len(plan)} module(s) of rank {', '.join(map(str, ranks)) or '–'}"
                     f"{' (rsLoRA scaling)' if cfg['use_rslora'] else ''}; {len(replace) + len(own)} whole tensor(s) "
                     f"from modules_to_save / biases{f' ({len(own)} own: {_fmt_keys(own, 4)})' if own else ''}")
        warn = _base_name_note(cfg["base_model_name_or_path"], base_name, name)
        if warn:
            notes.append(warn)
    return out


# ------------------------------------------------------------------------------------------ folder and zip


def _read_config(path: Path, name: str) -> dict:
    try:
        size = path.stat().st_size
        if size > MAX_ADAPTER_CONFIG_BYTES:
            raise CheckpointError(f"{name}: adapter_config.json is {size / 1024 ** 2:.1f} MiB, more than the "
                                  f"{MAX_ADAPTER_CONFIG_BYTES // 1024 ** 2} MiB a config can need")
        raw = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{name}: cannot read adapter_config.json ({e})") from None
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{name}: adapter_config.json is not valid JSON ({str(e)[:200]})") from None


def _read_folder(folder: Path, name: str, base, read_weights, base_name, notes) -> dict[str, torch.Tensor]:
    cfg_path = folder / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise CheckpointError(f"{name}: not a PEFT adapter — no {ADAPTER_CONFIG} in it (an adapter folder holds "
                              f"{ADAPTER_CONFIG} and {' or '.join(ADAPTER_WEIGHTS)})")
    config = _read_config(cfg_path, name)
    check_adapter_config(config, name)                      # refused before the weights are read
    weights = next((folder / w for w in ADAPTER_WEIGHTS if (folder / w).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{name}: the adapter's weights are missing: no {' or '.join(ADAPTER_WEIGHTS)} "
                              f"next to {ADAPTER_CONFIG}")
    try:
        sd = read_weights(weights)
    except CheckpointError as e:
        raise CheckpointError(f"{name}: {e}") from None
    return dense_from_adapter(base, config, sd, name=name, base_name=base_name, notes=notes)


def _size(n: float) -> str:
    return f"{n / 1024 ** 3:.2f} GiB" if n >= 1024 ** 3 else f"{n / 1024 ** 2:.1f} MiB"


def _bad_member_name(n: str) -> bool:
    parts = n.rstrip("/").split("/")
    return (not n or len(n) > 255 or n.startswith("/") or "\\" in n or "\x00" in n or ":" in n
            or any(p in ("", ".", "..") for p in parts))


def _zip_plan(p: Path, name: str, max_bytes: int | None) -> tuple[zipfile.ZipInfo, zipfile.ZipInfo]:
    """The zip's adapter_config.json and weights members, after every check that needs no extraction."""
    try:
        with open(p, "rb") as f:
            end = zipfile._EndRecData(f)          # the end record: member count and directory size, nothing listed
    except OSError as e:
        raise CheckpointError(f"{name}: cannot read the zip ({e})") from None
    if not end:
        raise CheckpointError(f"{name}: not a zip file (no end-of-archive record)")
    count, directory = end[zipfile._ECD_ENTRIES_TOTAL], end[zipfile._ECD_SIZE]
    if count > MAX_ZIP_MEMBERS:
        raise CheckpointError(f"{name}: the zip holds {count:,} members, more than the {MAX_ZIP_MEMBERS} an adapter "
                              "folder has; refused before listing them")
    if directory > MAX_ZIP_DIRECTORY_BYTES:
        raise CheckpointError(f"{name}: the zip's directory is {directory / 1024 ** 2:.1f} MiB, more than "
                              f"{MAX_ZIP_DIRECTORY_BYTES // 1024 ** 2} MiB; refused before listing it")
    try:
        with zipfile.ZipFile(p) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError) as e:
        raise CheckpointError(f"{name}: truncated or corrupt zip ({e})") from None
    if len(infos) > MAX_ZIP_MEMBERS:
        raise CheckpointError(f"{name}: the zip holds {len(infos):,} members, more than {MAX_ZIP_MEMBERS}")
    bad = [i.filename for i in infos if _bad_member_name(i.filename)]
    if bad:
        raise CheckpointError(f"{name}: the zip has member names that are paths outside a folder or not plain "
                              f"names: {', '.join(repr(b[:80]) for b in bad[:4])}; refused")
    names = [i.filename for i in infos]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise CheckpointError(f"{name}: the zip holds the same name twice ({', '.join(dup[:4])}); refused")
    files = [i for i in infos if not i.is_dir() and not i.filename.startswith("__MACOSX/")]
    configs = [i for i in files if i.filename.rsplit("/", 1)[-1] == ADAPTER_CONFIG]
    if not configs:
        raise CheckpointError(f"{name}: not a PEFT adapter zip — no {ADAPTER_CONFIG} in it (zip the adapter folder: "
                              f"{ADAPTER_CONFIG} and {' or '.join(ADAPTER_WEIGHTS)})")
    if len(configs) > 1:
        raise CheckpointError(f"{name}: the zip holds {len(configs)} adapters "
                              f"({', '.join(c.filename for c in configs[:4])}); zip one adapter")
    cfg = configs[0]
    folder = cfg.filename.rpartition("/")[0]
    if folder.count("/") > 0:
        raise CheckpointError(f"{name}: {cfg.filename!r} is nested more than one folder deep; zip the adapter "
                              "folder itself")
    by_name = {i.filename: i for i in files}
    weights = next((by_name[f"{folder}/{w}" if folder else w] for w in ADAPTER_WEIGHTS
                    if (f"{folder}/{w}" if folder else w) in by_name), None)
    if weights is None:
        raise CheckpointError(f"{name}: the adapter's weights are missing: no {' or '.join(ADAPTER_WEIGHTS)} next to "
                              f"{cfg.filename!r} in the zip")
    if cfg.file_size > MAX_ADAPTER_CONFIG_BYTES:
        raise CheckpointError(f"{name}: {cfg.filename!r} declares {cfg.file_size / 1024 ** 2:.1f} MiB, more than "
                              f"the {MAX_ADAPTER_CONFIG_BYTES // 1024 ** 2} MiB a config can need")
    if max_bytes is not None and weights.file_size > max_bytes:
        raise CheckpointError(f"{name}: {weights.filename!r} declares {_size(weights.file_size)}, more than the "
                              f"{_size(max_bytes)} limit; refused before extracting it")
    for i in (cfg, weights):
        if i.flag_bits & 0x1:
            raise CheckpointError(f"{name}: {i.filename!r} is encrypted")
        if i.file_size > _BOMB_FLOOR and i.file_size > MAX_COMPRESSION_RATIO * max(i.compress_size, 1):
            raise CheckpointError(f"{name}: {i.filename!r} declares {i.file_size / 1024 ** 2:.0f} MiB packed into "
                                  f"{i.compress_size / 1024:.0f} KiB (ratio over {MAX_COMPRESSION_RATIO}:1, a zip "
                                  "bomb?); refused before extracting it")
        if stat.S_ISLNK(i.external_attr >> 16):
            raise CheckpointError(f"{name}: {i.filename!r} is a symbolic link; refused")
    return cfg, weights


def _extract(z: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path, name: str) -> None:
    """Copy one member to ``dest``, never writing more than it declares."""
    left = info.file_size
    with z.open(info) as src, open(dest, "wb") as out:
        while True:
            chunk = src.read(min(1024 ** 2, left + 1))
            if not chunk:
                break
            left -= len(chunk)
            if left < 0:
                raise CheckpointError(f"{name}: {info.filename!r} inflates to more than it declares; refused")
            out.write(chunk)


def _read_zip(p: Path, name: str, base, read_weights, base_name, notes, max_bytes) -> dict[str, torch.Tensor]:
    cfg_info, w_info = _zip_plan(p, name, max_bytes)
    tmp_root = Path(tempfile.gettempdir())
    need = cfg_info.file_size + w_info.file_size
    free = shutil.disk_usage(tmp_root).free
    if need + DISK_MARGIN_BYTES > free:
        raise CheckpointError(f"{name}: extracting the adapter needs {need / 1024 ** 2:.0f} MiB of temporary disk, "
                              f"{free / 1024 ** 2:.0f} MiB are free; refused before extracting")
    folder = Path(tempfile.mkdtemp(prefix="esm-adapter-", dir=tmp_root))
    try:
        try:
            with zipfile.ZipFile(p) as z:
                _extract(z, cfg_info, folder / ADAPTER_CONFIG, name)
                config = _read_config(folder / ADAPTER_CONFIG, name)
                check_adapter_config(config, name)          # a refused config: the weights are never extracted
                _extract(z, w_info, folder / w_info.filename.rsplit("/", 1)[-1], name)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, RuntimeError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{name}: cannot extract the adapter from the zip ({e})") from None
        return _read_folder(folder, name, base, read_weights, base_name, notes)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def load_adapter(path: str | os.PathLike, base: Mapping[str, torch.Tensor] | None, *,
                 read_weights: Callable[[Path], Mapping[str, torch.Tensor]], base_name: str | None = None,
                 max_bytes: int | None = None, notes: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The dense task checkpoint of the LoRA adapter at ``path`` (a folder, or a ``.zip`` of one) on ``base``
    (:func:`dense_from_adapter`). ``read_weights(file)`` reads the adapter's weights file (the caller's checked
    reader); ``max_bytes`` bounds the zip and the weights it declares. Raises :class:`CheckpointError`."""
    p = Path(path)
    name = p.name or str(p)
    if not p.exists():
        raise CheckpointError(f"{name}: no such adapter folder or .zip ({p})")
    if base is None:
        raise CheckpointError(f"{name}: a LoRA adapter holds only changes to a base model; it is read together "
                              "with the base checkpoint (give the base)")
    if p.is_dir():
        return _read_folder(p, name, base, read_weights, base_name, notes)
    if not p.is_file():
        raise CheckpointError(f"{name}: not a file or a folder ({p})")
    size = p.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise CheckpointError(f"{name}: file is {_size(size)}, larger than the {_size(max_bytes)} limit")
    return _read_zip(p, name, base, read_weights, base_name, notes, max_bytes)
