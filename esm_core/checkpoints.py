"""Reading, validating and writing checkpoints (see DESIGN.md, "Models and checkpoints").

:func:`load_checkpoint` turns a file into a plain ``{key: tensor}`` state dict
with open_clip key names, whatever it was written as:

- ``.safetensors``: read with safetensors (no code can run). Hugging Face
  ``CLIPVisionModel`` files (keys ``vision_model.…``) are renamed to open_clip's
  ``visual.…`` names (:func:`hf_clip_vision_to_open_clip`).
- ``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt``: ``torch.load(weights_only=True)``.
  Containers such as ``{"state_dict": …}`` are unwrapped and non-tensor entries
  (a ``model_name`` string, an epoch counter) dropped.
- a folder or a ``.zip``: a PEFT LoRA adapter (:mod:`esm_core.adapters`), read on ``base=`` as the dense
  task ``W0 + s·BA`` (methods §1).
- task_vectors-style files that pickle a whole module (``src.modeling.ImageEncoder``
  holding an open_clip CLIP): every class the pickle names is replaced by an
  inert stub, the pickle is read with the weights-only unpickler, and the
  stubs' ``_parameters`` / ``_buffers`` / ``_modules`` are walked to rebuild
  the state dict. Nothing named in the file is imported and no pickle code
  runs; a pickle that asks to *call* a function is refused.

Leading ``model.`` / ``module.`` prefixes are removed, so task_vectors keys
``model.visual.*`` become ``visual.*``. With ``base=`` the result is checked
against the base (keys, shapes, float dtypes, finite values); when the base is
a visual tower only (all keys ``visual.*``) and the file also carries the text
tower (task_vectors ``ImageEncoder`` files keep ``token_embedding`` & co.), only
the ``visual.*`` keys are kept before the check.
"""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from . import adapters
from .device import all_finite
from .errors import CheckpointError, _fmt_keys
from .pickled import MAX_MODULE_DEPTH, _state_dict_from_object, _tensors_of, _torch_load_stubbed  # noqa: F401

MAX_CHECKPOINT_BYTES = 2 * 1024 ** 3     # uploads larger than this are refused (2 GiB)
MAX_CHECKPOINT_TENSORS = 20_000          # tensors in one file (ViT-bigG's whole CLIP: < 1,000; BERT-large: ~400)
MAX_SAFETENSORS_HEADER_BYTES = 8 * 1024 ** 2   # a safetensors JSON header (20,000 entries take ~2 MiB)
MAX_PICKLE_BYTES = 64 * 1024 ** 2        # the pickle inside a torch.save archive (real ones: < 1 MiB)
# dtypes a checkpoint may hold: float weights the merge maths reads in float32, integer / bool buffers
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.int32,
                    torch.int16, torch.int8, torch.uint8, torch.bool)
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
_SUPPORTED_NOTE = ("supported: float16, bfloat16, float32 and float64 weights, integer and bool buffers; "
                   "convert the checkpoint to one of them")

SAFETENSORS_EXTS = (".safetensors",)
TORCH_EXTS = (".pt", ".pth", ".bin", ".ckpt")
CHECKPOINT_EXTS = SAFETENSORS_EXTS + TORCH_EXTS   # every extension load_checkpoint reads (upload boxes: accept these)

# Prefixes stripped while every key carries them.
_STRIP_PREFIXES = ("module.", "model.")


_F32_MAX = torch.finfo(torch.float32).max


def _finite_problems(sd: Mapping[str, torch.Tensor], keys=None) -> list[str]:
    """What is not finite in ``sd`` once in float32, the dtype the merge maths uses ([] if all is well).

    A float64 value such as 1e300 is finite where it is but becomes inf in
    float32, so every float tensor wider than float32 is checked *after* the
    conversion; narrower ones convert exactly and are checked as they are.
    """
    nonfinite, overflow = [], []
    for k in (sd if keys is None else keys):
        v = sd[k]
        if not isinstance(v, torch.Tensor) or not v.is_floating_point() or v.numel() == 0:
            continue
        if not all_finite(v):
            nonfinite.append(k)
        elif torch.finfo(v.dtype).max > _F32_MAX:
            lo, hi = torch.aminmax(v.detach())               # rounding is monotonic: the extremes decide
            if not bool(torch.isfinite(torch.stack([lo, hi]).to(torch.float32)).all()):
                overflow.append(k)
    problems = []
    if nonfinite:
        problems.append(f"non-finite values (NaN/inf) in: {_fmt_keys(nonfinite)}")
    if overflow:
        problems.append(f"values too large for float32 (|x| > {_F32_MAX:.3g}, they would become inf) in: "
                        f"{_fmt_keys(overflow)}")
    return problems


def check_finite(sd: Mapping[str, torch.Tensor], name: str = "checkpoint") -> None:
    """Refuse ``sd`` if a float tensor holds NaN / ±inf, or values that overflow float32 (naming the keys)."""
    problems = _finite_problems(sd)
    if problems:
        raise CheckpointError(f"checkpoint {name!r}: " + " | ".join(problems))


def structure_problems(base: Mapping[str, Any], sd: Mapping[str, Any]) -> list[str]:
    """What differs between two checkpoints' keys, shapes and float-ness (values are not read: the entries
    only need ``.shape``, ``.dtype`` and ``.is_floating_point()``, as lazy header entries have)."""
    missing = set(base) - set(sd)
    extra = set(sd) - set(base)
    problems = []
    if missing:
        problems.append(f"missing keys: {_fmt_keys(missing)}")
    if extra:
        problems.append(f"unexpected keys: {_fmt_keys(extra)}")
    shapes = [f"{k}: {tuple(sd[k].shape)} vs base {tuple(base[k].shape)}"
              for k in base if k in sd and tuple(sd[k].shape) != tuple(base[k].shape)]
    if shapes:
        problems.append("shape mismatch: " + "; ".join(shapes[:8]) + (f" … and {len(shapes) - 8} more" if len(shapes) > 8 else ""))
    kinds = [f"{k}: {sd[k].dtype} vs base {base[k].dtype}" for k in base
             if k in sd and base[k].is_floating_point() != sd[k].is_floating_point()]
    if kinds:
        problems.append("dtype mismatch (float vs non-float): " + "; ".join(kinds[:8]))
    return problems


def check_compatible(base: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor], name: str = "task") -> None:
    """Refuse ``sd`` unless it has exactly the base's keys, shapes, float dtypes and finite values.

    "Finite" is judged in float32, the dtype the merge maths uses: a float64
    1e300 is refused although it is finite as stored."""
    problems = structure_problems(base, sd) + _finite_problems(sd, [k for k in base if k in sd])
    if problems:
        raise CheckpointError(f"checkpoint {name!r} does not fit the base model — " + " | ".join(problems))


# ---------------------------------------------------------------------------
# Small helpers


def visual_only(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``visual.*`` entries of a CLIP state dict (the image tower)."""
    return {k: v for k, v in sd.items() if k.startswith("visual.")}


def _sniff(path: Path) -> str:
    """Format from the first bytes: "safetensors", "zip" (torch.save), "pickle" (legacy torch.save) or "unknown"."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) == 9 and head[8:9] == b"{":
        n = int.from_bytes(head[:8], "little")
        if 0 < n <= path.stat().st_size - 8:
            return "safetensors"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"
    return "unknown"


def safetensors_header(path: str | os.PathLike, name: str | None = None) -> dict[str, dict]:
    """The tensor entries of a safetensors file's JSON header, checked before the file is parsed any further:
    the header's size (:data:`MAX_SAFETENSORS_HEADER_BYTES`) and number of entries
    (:data:`MAX_CHECKPOINT_TENSORS`, counted in the raw bytes before they become Python objects) are bounded
    and every dtype must be one the merge supports (:data:`SAFETENSORS_DTYPES`), so a hostile header is refused
    in milliseconds, holding at most the bounded header. Raises :class:`CheckpointError` naming what is wrong."""
    p = Path(path)
    name = name or p.name
    try:
        with open(p, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or n > p.stat().st_size - 8:
                raise CheckpointError(f"{name}: not a valid safetensors file (header length {n})")
            if n > MAX_SAFETENSORS_HEADER_BYTES:
                raise CheckpointError(f"{name}: safetensors header of {n / 1024 ** 2:.1f} MiB, more than the "
                                      f"{MAX_SAFETENSORS_HEADER_BYTES / 1024 ** 2:.0f} MiB a checkpoint of at most "
                                      f"{MAX_CHECKPOINT_TENSORS:,} tensors needs; refused before reading it")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{name}: cannot read the file ({e})") from None
    count = raw.count(b'"data_offsets"')
    if count > MAX_CHECKPOINT_TENSORS:
        raise CheckpointError(f"{name}: holds {count:,} tensors, more than the {MAX_CHECKPOINT_TENSORS:,} any model "
                              "this server merges has; refused before reading them")
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{name}: corrupt safetensors header ({e})") from None
    del raw
    if not isinstance(header, dict):
        raise CheckpointError(f"{name}: corrupt safetensors header (not a JSON object)")
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    if len(entries) > MAX_CHECKPOINT_TENSORS:
        raise CheckpointError(f"{name}: holds {len(entries):,} tensors, more than the {MAX_CHECKPOINT_TENSORS:,} "
                              "any model this server merges has")
    bad = [f"{k!r} ({v.get('dtype') if isinstance(v, dict) else type(v).__name__})" for k, v in entries.items()
           if not isinstance(v, dict) or v.get("dtype") not in SAFETENSORS_DTYPES]
    if bad:
        raise CheckpointError(f"{name}: unsupported tensor dtype for {', '.join(bad[:4])}"
                              f"{f' and {len(bad) - 4} more' if len(bad) > 4 else ''} — {_SUPPORTED_NOTE}")
    return entries


def dtype_problems(sd: Mapping[str, torch.Tensor]) -> list[str]:
    """Entries whose dtype the merge does not support (float8, complex, unsigned 16-64 bit, quantized …)."""
    bad = [f"{k!r} ({v.dtype})" for k, v in sd.items() if v.dtype not in SUPPORTED_DTYPES]
    if not bad:
        return []
    return [f"unsupported tensor dtype for {', '.join(bad[:4])}{f' and {len(bad) - 4} more' if len(bad) > 4 else ''}"
            f" — {_SUPPORTED_NOTE}"]


def _zip_entry_count(p: Path) -> int | None:
    """The number of members a zip's end-of-central-directory record declares (zip64 too), read from the
    file's last bytes without listing the members; None when there is no such record."""
    size = p.stat().st_size
    with open(p, "rb") as f:
        f.seek(max(0, size - 65_557))
        tail = f.read()
        i = tail.rfind(b"PK\x05\x06")
        if i < 0 or len(tail) < i + 22:
            return None
        n = int.from_bytes(tail[i + 10:i + 12], "little")
        if n != 0xFFFF:
            return n
        j = i - 20                                     # zip64 end-of-central-directory locator
        if j < 0 or tail[j:j + 4] != b"PK\x06\x07":
            return None
        f.seek(int.from_bytes(tail[j + 8:j + 16], "little"))
        rec = f.read(56)
        if rec[:4] != b"PK\x06\x06" or len(rec) < 40:
            return None
        return int.from_bytes(rec[32:40], "little")


def _check_torch_archive(p: Path, name: str) -> None:
    """Bound a torch.save archive before it is unpickled: its members (one per tensor storage) and its pickle."""
    n = _zip_entry_count(p)
    if n is not None and n > MAX_CHECKPOINT_TENSORS + 16:
        raise CheckpointError(f"{name}: archive of {n:,} members, more than a checkpoint of at most "
                              f"{MAX_CHECKPOINT_TENSORS:,} tensors has; refused before reading it")
    try:
        with zipfile.ZipFile(p) as z:      # reads the central directory only: catches truncation cheaply
            big = [i for i in z.infolist() if i.filename.endswith(".pkl") and i.file_size > MAX_PICKLE_BYTES]
    except zipfile.BadZipFile as e:
        raise CheckpointError(f"{name}: truncated or corrupt torch.save archive: {e}") from None
    if big:
        raise CheckpointError(f"{name}: its pickle {big[0].filename!r} is {big[0].file_size / 1024 ** 2:.0f} MiB, "
                              f"more than the {MAX_PICKLE_BYTES / 1024 ** 2:.0f} MiB any real checkpoint's is")


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove ``module.`` / ``model.`` while every key starts with one of them."""
    changed = True
    while changed and sd:
        changed = False
        for p in _STRIP_PREFIXES:
            if all(k.startswith(p) for k in sd):
                sd = {k[len(p):]: v for k, v in sd.items()}
                changed = True
    return sd


# ---------------------------------------------------------------------------
# Hugging Face CLIPVisionModel → open_clip names

_HF_LAYER = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.(.+)\Z")   # \Z: "$" matches before a final "\n"
HF_CLIP_LAYER_MAP = {      # one block of either Hugging Face CLIP tower (vision or text) → open_clip's names
    "self_attn.out_proj.weight": "attn.out_proj.weight",
    "self_attn.out_proj.bias": "attn.out_proj.bias",
    "layer_norm1.weight": "ln_1.weight", "layer_norm1.bias": "ln_1.bias",
    "layer_norm2.weight": "ln_2.weight", "layer_norm2.bias": "ln_2.bias",
    "mlp.fc1.weight": "mlp.c_fc.weight", "mlp.fc1.bias": "mlp.c_fc.bias",
    "mlp.fc2.weight": "mlp.c_proj.weight", "mlp.fc2.bias": "mlp.c_proj.bias",
}
_HF_TOP_MAP = {
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
}


def is_hf_clip_vision(sd: Mapping[str, Any]) -> bool:
    """True for Hugging Face CLIP state dicts (keys ``vision_model.…``)."""
    return any(k.startswith("vision_model.") for k in sd)


def hf_clip_vision_to_open_clip(sd: Mapping[str, torch.Tensor], name: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Rename a Hugging Face ``CLIPVisionModel`` state dict to open_clip's ``visual.*`` keys.

    q/k/v projections are concatenated (in q, k, v order) into
    ``attn.in_proj_weight`` / ``attn.in_proj_bias``; ``visual_projection.weight``
    (if present) becomes ``visual.proj`` transposed. ``position_ids`` buffers and
    the text tower (``text_model.*``, ``text_projection``, ``logit_scale``) are
    dropped. Anything else unknown is refused.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for k, v in sd.items():
        if k.endswith("position_ids") or k.startswith("text_model.") or k in ("text_projection.weight", "logit_scale"):
            continue
        if k in _HF_TOP_MAP:
            out[_HF_TOP_MAP[k]] = v
        elif k == "visual_projection.weight":
            out["visual.proj"] = v.t().contiguous()
        elif (m := _HF_LAYER.match(k)) is not None:
            i, rest = int(m.group(1)), m.group(2)
            if not hf_clip_block_key(rest, v, i, "visual.transformer.resblocks.", out, qkv):
                unknown.append(k)
        else:
            unknown.append(k)
    if unknown:
        raise CheckpointError(f"{name}: Hugging Face CLIP checkpoint with keys this converter does not know: "
                              f"{_fmt_keys(unknown)}")
    for i, kind, parts in join_hf_qkv(qkv, "visual.transformer.resblocks.", out):
        raise CheckpointError(f"{name}: layer {i} has only {sorted(parts)} of the q/k/v projection {kind}s")
    return out


def hf_clip_block_key(rest: str, v: torch.Tensor, i: int, prefix: str, out: dict, qkv: dict) -> bool:
    """One key of block ``i`` of a Hugging Face CLIP tower (``rest``: the name after ``encoder.layers.i.``) into
    ``out`` under open_clip's ``{prefix}{i}.`` names, or its q/k/v part into ``qkv`` (joined by
    :func:`join_hf_qkv`); False for a key this mapping does not know."""
    if rest in HF_CLIP_LAYER_MAP:
        out[f"{prefix}{i}.{HF_CLIP_LAYER_MAP[rest]}"] = v
    elif (q := re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)) is not None:
        qkv.setdefault((i, q.group(2)), {})[q.group(1)] = v
    else:
        return False
    return True


def join_hf_qkv(qkv: dict, prefix: str, out: dict) -> list[tuple[int, str, dict]]:
    """Each block's q, k, v projections concatenated (q, k, v order) into open_clip's ``attn.in_proj_*`` in
    ``out``; returns the incomplete groups ``(block, "weight" | "bias", parts)`` for the caller to refuse."""
    missing = []
    for (i, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            missing.append((i, kind, parts))
        else:
            out[f"{prefix}{i}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
    return missing


# ---------------------------------------------------------------------------
# Public API


def load_checkpoint(path: str | os.PathLike, *, base: Mapping[str, torch.Tensor] | None = None,
                    max_bytes: int | None = MAX_CHECKPOINT_BYTES, base_name: str | None = None,
                    notes: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a ``{key: tensor}`` state dict (CPU, open_clip key names).

    ``base``: if given, the result must fit it (:func:`check_compatible`); a
    file carrying a whole CLIP is cut down to ``visual.*`` when the base is a
    visual tower only, and a Hugging Face vision model without a projection
    gets the base's ``visual.proj``. ``max_bytes``: larger files are refused
    (``None``: no limit). Raises :class:`CheckpointError` naming the file and
    the reason.

    A folder or a ``.zip`` is a PEFT LoRA adapter (:mod:`esm_core.adapters`, methods §1): it needs ``base``
    and becomes the dense task ``W0 + s·BA`` with the base's keys (plus its ``modules_to_save`` tensors the
    base lacks, as own keys); ``notes`` receives a line on it and a warning when its
    ``base_model_name_or_path`` differs from ``base_name``.
    """
    p = Path(path)
    name = p.name
    if adapters.is_adapter_path(p):
        return adapters.load_adapter(p, base, base_name=base_name, max_bytes=max_bytes, notes=notes,
                                     read_weights=lambda f: load_checkpoint(f, max_bytes=max_bytes))
    ext = p.suffix.lower()
    if ext not in CHECKPOINT_EXTS:
        raise CheckpointError(f"{name}: unknown checkpoint extension {ext or '(none)'!r}; "
                              f"expected one of {', '.join(CHECKPOINT_EXTS)}")
    if not p.is_file():
        raise CheckpointError(f"{name}: no such file ({p})")
    size = p.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise CheckpointError(f"{name}: file is {size / 1024 ** 3:.2f} GiB, larger than the "
                              f"{max_bytes / 1024 ** 3:.2f} GiB limit")
    if size == 0:
        raise CheckpointError(f"{name}: file is empty")
    kind = _sniff(p)

    if ext in SAFETENSORS_EXTS:
        if kind != "safetensors":
            hint = " (it looks like a torch.save file: use a .pt name)" if kind in ("zip", "pickle") else ""
            raise CheckpointError(f"{name}: not a valid safetensors file{hint}")
        safetensors_header(p, name)       # bounded and dtype-checked before safetensors parses it
        try:
            sd = load_file(str(p), device="cpu")
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{name}: cannot read safetensors file (truncated or corrupt?): {e}") from None
    else:
        if kind == "zip":
            _check_torch_archive(p, name)
            obj = _torch_load_stubbed(p, name)
        elif kind == "pickle":     # legacy (pre-1.6) torch.save: weights-only, no stubs
            try:
                obj = torch.load(p, map_location="cpu", weights_only=True)
            except Exception as e:
                m = re.search(r"GLOBAL ([\w.]+)", str(e))
                why = f"it refers to {m.group(1)}, which weights-only loading refuses" if m else type(e).__name__
                raise CheckpointError(f"{name}: cannot be read safely as a legacy torch.save file ({why}); "
                                      "re-save it as a plain state dict") from None
        elif kind == "safetensors":
            raise CheckpointError(f"{name}: this is a safetensors file: give it a .safetensors name")
        else:
            raise CheckpointError(f"{name}: not a torch.save checkpoint (unrecognised content)")
        try:
            sd = _state_dict_from_object(obj, name)
        except RecursionError:      # the walk is iterative; this guards whatever else a hostile pickle nests
            raise CheckpointError(f"{name}: nested too deeply to be read safely") from None

    sd = _strip_prefixes(dict(sd))
    from_hf = is_hf_clip_vision(sd)
    if from_hf:
        sd = hf_clip_vision_to_open_clip(sd, name)
    if not sd:
        raise CheckpointError(f"{name}: holds no tensors")
    if len(sd) > MAX_CHECKPOINT_TENSORS:
        raise CheckpointError(f"{name}: holds {len(sd):,} tensors, more than the {MAX_CHECKPOINT_TENSORS:,} any "
                              "model this server merges has")
    odd = [k for k, v in sd.items() if v.layout != torch.strided or v.is_quantized]
    if odd:
        raise CheckpointError(f"{name}: sparse or quantized tensors are not supported: {_fmt_keys(odd)}")
    problems = dtype_problems(sd)
    if problems:
        raise CheckpointError(f"{name}: " + " | ".join(problems))
    sd = {k: v.detach() for k, v in sd.items()}

    if base is not None:
        if base and all(k.startswith("visual.") for k in base):
            if any(k.startswith("visual.") for k in sd):
                sd = visual_only(sd)
            elif all(f"visual.{k}" in base for k in sd):     # a bare VisionTransformer state dict
                sd = {f"visual.{k}": v for k, v in sd.items()}
        if from_hf and "visual.proj" in base and "visual.proj" not in sd:
            sd["visual.proj"] = base["visual.proj"].clone()   # CLIPVisionModel has no projection: keep the base's
        check_compatible(base, sd, name)
    else:
        problems = _finite_problems(sd)
        if problems:
            raise CheckpointError(f"{name}: " + " | ".join(problems))
    return sd


def _non_finite_path(obj: Any, path: str = "") -> str | None:
    """Where in a JSON-like ``obj`` the first NaN / ±inf float sits (``['params']['alpha']``), or None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return path or "the value"
    if isinstance(obj, Mapping):
        items = ((f"{path}[{k!r}]", v) for k, v in obj.items())
    elif isinstance(obj, (list, tuple)):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(obj))
    else:
        return None
    for sub_path, v in items:
        found = _non_finite_path(v, sub_path)
        if found is not None:
            return found
    return None


def strict_json_dumps(obj: Any, what: str = "config", **kwargs) -> str:
    """``json.dumps(obj, allow_nan=False, **kwargs)``: strict JSON, which has no NaN or Infinity.

    Raises ValueError naming where the non-finite number is, instead of writing
    ``NaN``, which is not JSON and which most parsers outside Python refuse)."""
    try:
        return json.dumps(obj, allow_nan=False, **kwargs)
    except ValueError as e:
        where = _non_finite_path(obj)
        if where is None:
            raise
        raise ValueError(f"{what}: {where} is not a finite number (NaN/inf), which strict JSON cannot hold; "
                         "nothing was written") from None


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, config: dict | None = None) -> Path:
    """Write ``state_dict`` as safetensors, atomically, with ``config`` in the metadata.

    The file is written next to its target and moved into place with
    :func:`os.replace`, so a failure never leaves a half-written file. Metadata:
    ``{"format": "pt", "esm_studio_config": json.dumps(config)}`` (read it back
    with :func:`read_config`); the JSON is strict, so a config holding NaN or
    ±inf is refused (naming the entry) before anything is written.
    """
    p = Path(path)
    if p.suffix.lower() != ".safetensors":
        raise CheckpointError(f"{p.name}: merged models are written as safetensors; give the file a .safetensors name")
    if not state_dict:
        raise CheckpointError(f"{p.name}: nothing to save (empty state dict)")
    tensors, storages = {}, set()
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{p.name}: entry {k!r} is a {type(v).__name__}, not a tensor")
        t = v.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages and t.numel():        # safetensors refuses shared memory: give each its own copy
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        tensors[str(k)] = t
    metadata = {"format": "pt"}
    if config is not None:
        try:
            metadata["esm_studio_config"] = strict_json_dumps(config, "merge config")
        except ValueError as e:
            raise CheckpointError(f"{p.name}: {e}") from None
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return p


def read_config(path: str | os.PathLike) -> dict | None:
    """The config :func:`save_safetensors` stored in a file's metadata (None if there is none)."""
    p = Path(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{p.name}: cannot read safetensors metadata: {e}") from None
    raw = meta.get("esm_studio_config")
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p.name}: esm_studio_config metadata is not valid JSON: {e}") from None
