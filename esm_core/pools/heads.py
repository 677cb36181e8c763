"""Where each task's frozen classification head comes from, and the readers behind each source.

A pool scores task t with ``normalise(features) @ W_t.T`` (methods §0; ``W_t`` is C × D and carries its scale).
For an uploaded pool each task's head comes from the first source that applies, in this order:

1. ``uploaded`` — a head file the user gives (``<task>.head.safetensors`` or a weights-only ``.pt``): one C × D
   weight, its class names in the safetensors metadata (``class_names``: a JSON list) or in a sidecar
   ``<task>.head.json``; checked against the class folders (names matched, order taken from the head), the
   tower's output width D, finite values (:func:`read_head_file`, :func:`match_head`);
2. ``zero-shot`` — for a CLIP base that holds its text tower: the zero-shot head of the class-folder names,
   built offline with open_clip's text tower and its bundled BPE tokenizer (methods §0: normalised text
   embeddings averaged over prompt templates, normalised again, times ``exp(logit_scale)``; :func:`zero_shot_head`);
3. ``own classifier`` — ``*ForImageClassification`` / ``*ForSequenceClassification`` checkpoints: the task's
   own classifier (text pools; Hugging Face ViT pools);
4. ``class means`` — the last resort: the normalised class means of the fine-tuned model's features on the
   task's own images. Its accuracies measure the images, not the model: every view says so
   (:data:`CLASS_MEANS_WARNING`).

Tasks of an upload that keep the demo's images keep the demo's trained heads (``demo``).
Pools record the sources in ``pool.meta["head_sources"]`` (``{task: HeadSource value}``).
"""
from __future__ import annotations

import json
import math
import re
from enum import Enum
from pathlib import Path
from typing import Mapping, Sequence

import torch
from safetensors import safe_open

from ..checkpoints import load_checkpoint
from ..errors import CheckpointError


class HeadSource(str, Enum):
    """Where a task's head comes from (the value is what the Pool view shows)."""
    UPLOADED = "uploaded"
    ZERO_SHOT = "zero-shot"
    OWN = "own classifier"
    DEMO = "demo's trained head"
    CLASS_MEANS = "class means"


CLASS_MEANS_WARNING = "head built from your images — not comparable to the model's own accuracy"
# Generic prompts (CLIP's prompt-engineering notebook's seven, plus the plain one); "{}" is the class name.
DEFAULT_TEMPLATES = ("a photo of a {}.", "itap of a {}.", "a bad photo of the {}.", "a origami {}.",
                     "a photo of the large {}.", "a {} in a video game.", "art of the {}.", "a photo of the small {}.")
MAX_HEAD_BYTES = 256 * 1024 ** 2         # a head file: 30,000 classes × 2,048 dims in float32 is 234 MiB
MAX_CLASSES = 100_000
MAX_SIDECAR_BYTES = 4 * 1024 ** 2        # a class-name list
MAX_TEMPLATES = 100
MAX_TEMPLATE_CHARS = 300
HEAD_EXTS = (".safetensors", ".pt", ".pth", ".bin")


def source_of(pool, task: str) -> str:
    """The head source recorded for ``task`` of ``pool`` (pools built before sources were recorded: '?')."""
    return str((getattr(pool, "meta", None) or {}).get("head_sources", {}).get(task, "?"))


def class_means_tasks(pool) -> list[str]:
    """The tasks of ``pool`` whose head is the class means of their own images (:data:`CLASS_MEANS_WARNING`)."""
    return [t for t in pool.task_names if source_of(pool, t) == HeadSource.CLASS_MEANS.value]


def head_warning(pool) -> str | None:
    """One line saying which tasks' heads were built from the user's images, or None when none were."""
    tasks = class_means_tasks(pool)
    if not tasks:
        return None
    return f"{', '.join(tasks)}: {CLASS_MEANS_WARNING}"


# ---------------------------------------------------------------- uploaded heads

def name_key(name: str) -> str:
    """How a head's class name is matched with a class folder: a folder name cannot hold '/' or '\\', so both
    are compared with those written as '_' ("T-shirt/top" matches the folder "T-shirt_top")."""
    return str(name).replace("/", "_").replace("\\", "_").strip()


def _names_from(obj, where: str) -> list[str]:
    if isinstance(obj, dict):
        obj = obj.get("class_names", obj.get("classes"))
    if not isinstance(obj, list) or not obj or not all(isinstance(c, str) and c.strip() for c in obj):
        raise ValueError(f"{where}: the class names must be a non-empty JSON list of strings "
                         "(or an object with 'class_names')")
    if len(obj) > MAX_CLASSES:
        raise ValueError(f"{where}: {len(obj)} class names, more than the {MAX_CLASSES:,} allowed")
    return [str(c) for c in obj]


def sidecar_path(head_path: str | Path) -> Path:
    """``<task>.head.json`` next to ``<task>.head.safetensors`` / ``.pt``."""
    p = Path(head_path)
    return p.with_suffix(".json")


def read_class_names(path: str | Path, where: str) -> list[str]:
    """Class names from a sidecar JSON file (a list, or ``{"class_names": [...]}``), bounded in size."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_SIDECAR_BYTES + 1)
    except OSError as e:
        raise ValueError(f"{where}: cannot read {p.name} ({e})") from None
    if len(raw) > MAX_SIDECAR_BYTES:
        raise ValueError(f"{where}: {p.name} is larger than {MAX_SIDECAR_BYTES // 1024 ** 2} MiB")
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ValueError(f"{where}: {p.name} is not a JSON file") from None
    return _names_from(obj, f"{where} ({p.name})")


def read_head_file(path: str | Path, task: str, names_path: str | Path | None = None
                   ) -> tuple[torch.Tensor, list[str]]:
    """``(weight C × D float32, class names)`` of an uploaded head file, refused with a message naming the task
    and the file when it is not one finite 2-D weight (an all-zero bias beside it is accepted: the pool's heads
    have none) with C class names. The file is read without running pickle code
    (:func:`esm_core.checkpoints.load_checkpoint`), bounded at :data:`MAX_HEAD_BYTES`."""
    p = Path(path)
    where = f"head of task {task!r} ({p.name})"
    if p.suffix.lower() not in HEAD_EXTS:
        raise ValueError(f"{where}: a head is a .safetensors or weights-only .pt file")
    try:
        sd = load_checkpoint(p, max_bytes=MAX_HEAD_BYTES)
    except CheckpointError as e:
        raise ValueError(f"head of task {task!r}: {e}") from None
    mats = {k: v for k, v in sd.items() if v.ndim == 2}
    if len(mats) != 1:
        pick = {k: v for k, v in mats.items() if k.split(".")[-1] in ("weight", task) or k in ("head", task)}
        if len(pick) != 1:
            raise ValueError(f"{where}: expected one C × D weight matrix, found {len(mats)} 2-D tensors "
                             f"({sorted(mats)[:6]})")
        mats = pick
    key, w = next(iter(mats.items()))
    others = {k: v for k, v in sd.items() if k != key}
    for k, v in others.items():
        if k.split(".")[-1] == "bias" and v.ndim == 1 and v.numel() == w.shape[0] and not v.float().any():
            continue                                    # task_vectors' heads carry an all-zero bias
        raise ValueError(f"{where}: unexpected tensor {k!r} {tuple(v.shape)} beside the weight {key!r}: a head "
                         "is applied as normalise(features) @ Wᵀ, with no bias")
    if w.shape[0] < 2 or w.shape[0] > MAX_CLASSES or w.shape[1] < 1:
        raise ValueError(f"{where}: weight {key!r} has shape {tuple(w.shape)}; expected C × D with 2 ≤ C ≤ "
                         f"{MAX_CLASSES:,}")
    w = w.float()
    if not torch.isfinite(w).all():
        raise ValueError(f"{where}: weight {key!r} holds non-finite values (NaN or inf)")
    names = None
    if names_path is not None:
        names = read_class_names(names_path, where)
    elif p.suffix.lower() == ".safetensors":
        with safe_open(str(p), "pt") as f:
            meta = f.metadata() or {}
        text = meta.get("class_names") or meta.get("classes")
        if text is not None:
            try:
                names = _names_from(json.loads(text), f"{where}: metadata 'class_names'")
            except (json.JSONDecodeError, RecursionError):
                raise ValueError(f"{where}: metadata 'class_names' is not a JSON list") from None
    if names is None and sidecar_path(p).is_file():
        names = read_class_names(sidecar_path(p), where)
    if names is None:
        raise ValueError(f"{where}: no class names — put them in the safetensors metadata ('class_names': a JSON "
                         f"list, in the head's row order) or in {task}.head.json beside it")
    if len(names) != w.shape[0]:
        raise ValueError(f"{where}: {w.shape[0]} rows but {len(names)} class names")
    return w.contiguous(), names


def match_head(weight: torch.Tensor, names: Sequence[str], folders: Sequence[str], width: int, task: str,
               file: str) -> list[int]:
    """Check an uploaded head against the task's class folders and the tower's output width; returns, per class
    folder (in ``folders``' order), its row in the head. Refused naming the task, the file and what differs:
    C ≠ the number of class folders, names that match no folder (:func:`name_key`), D ≠ ``width``."""
    where = f"head of task {task!r} ({file})"
    if weight.shape[1] != width:
        raise ValueError(f"{where}: {weight.shape[1]} columns, but the image tower's output width D is {width}")
    if weight.shape[0] != len(folders):
        raise ValueError(f"{where}: {weight.shape[0]} classes (rows), but the images have {len(folders)} class "
                         f"folders")
    keys = [name_key(n) for n in names]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"{where}: class names repeat ({dup[:5]})")
    row = {k: i for i, k in enumerate(keys)}
    missing = [f for f in folders if name_key(f) not in row]
    if missing:
        extra = sorted(set(keys) - {name_key(f) for f in folders})
        raise ValueError(f"{where}: class folder(s) {missing[:5]} match no class name of the head (unmatched "
                         f"names: {extra[:5]}; '/' in a name matches '_' in a folder name)")
    return [row[name_key(f)] for f in folders]


# ---------------------------------------------------------------- zero-shot heads (methods §0)

def check_templates(templates: Sequence[str] | None) -> list[str]:
    """The prompt templates, each holding one class-name placeholder (``{}`` or ``{c}``), bounded in number and
    length; None or empty: :data:`DEFAULT_TEMPLATES`."""
    if templates is None:
        return list(DEFAULT_TEMPLATES)
    if isinstance(templates, str):
        templates = [t for t in templates.splitlines()]
    out = [str(t).strip().replace("{c}", "{}") for t in templates if str(t).strip()]
    if not out:
        return list(DEFAULT_TEMPLATES)
    if len(out) > MAX_TEMPLATES:
        raise ValueError(f"{len(out)} prompt templates, more than the {MAX_TEMPLATES} allowed")
    for t in out:
        if len(t) > MAX_TEMPLATE_CHARS:
            raise ValueError(f"prompt template {t[:40]!r}… is longer than {MAX_TEMPLATE_CHARS} characters")
        if t.count("{}") != 1 or re.search(r"\{(?!\})|(?<!\{)\}", t):
            raise ValueError(f"prompt template {t!r} must hold exactly one '{{}}' (or '{{c}}') where the class "
                             "name goes, and no other braces")
    return out


def prompt_name(folder: str) -> str:
    """A class folder's name as it goes into a prompt: '_' read as a space ("ankle_boot" → "ankle boot")."""
    return folder.replace("_", " ").strip()


@torch.inference_mode()
def zero_shot_head(tower: torch.nn.Module, tokenizer, class_names: Sequence[str], templates: Sequence[str],
                   logit_scale: float) -> torch.Tensor:
    """methods §0: per class the mean over ``templates`` of the normalised text embeddings of
    ``template.format(name)``, normalised again; all rows times ``exp(logit_scale)``. C × D float32."""
    rows = []
    for c in class_names:
        tokens = tokenizer([t.format(c) for t in templates])
        e = torch.nn.functional.normalize(tower(tokens).float(), dim=-1)
        rows.append(torch.nn.functional.normalize(e.mean(0), dim=-1))
    return torch.stack(rows) * math.exp(float(logit_scale))


def logit_scale_of(sd: Mapping[str, torch.Tensor]) -> tuple[float, bool]:
    """``(logit_scale, read)``: the checkpoint's ``logit_scale`` (a log), or log(100) — CLIP's trained value —
    when it has none (``read`` False). The scale never changes a top-1 prediction."""
    v = sd.get("logit_scale")
    if v is not None and v.numel() == 1 and math.isfinite(float(v)) and abs(float(v)) < 20:
        return float(v), True
    return math.log(100.0), False


__all__ = ["HeadSource", "CLASS_MEANS_WARNING", "DEFAULT_TEMPLATES", "read_head_file", "match_head",
           "zero_shot_head", "check_templates", "head_warning", "class_means_tasks",
           "source_of"]
