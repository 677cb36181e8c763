"""Real CLIP pools described by a pool file (``assets/pools/*.json``).

A pool file names the base open_clip model + pretrained tag, task checkpoints
(on the Hugging Face hub or local), class names and prompt templates; the heads
are zero-shot heads built from the text tower (:func:`zero_shot_head`). Hub
downloads are a real code path that needs network; offline they fail fast.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import open_clip
import torch
from huggingface_hub import hf_hub_download, snapshot_download

from ..progress import Progress, reporter
from .. import settings
from ..checkpoints import load_checkpoint
from ..models import openclip_vit as vit
from .taskpool import TaskPool


# ---------------------------------------------------------------- real CLIP pools: pool files

POOL_FORMAT = "esm-studio-pool/1"


class PoolFileError(ValueError):
    """A pool file is malformed, or what it names cannot be found."""


@dataclass
class TaskSpec:
    name: str
    checkpoint: str                  # "hf:org/repo", "org/repo" (hub model repo), or a local file/folder
    dataset: str | None = None       # hub dataset id (documentation / class names)
    classes: list[str] | None = None
    classes_from: str | None = None  # hub dataset id whose card lists the class names
    templates: list[str] | None = None


@dataclass
class PoolSpec:
    name: str
    model: str                       # open_clip model name
    pretrained: str                  # open_clip pretrained tag, or a local file
    templates: list[str]
    tasks: list[TaskSpec]
    quick_gelu: bool | None = None
    path: Path | None = None


def _need(obj: Mapping, key: str, typ, where: str):
    if key not in obj:
        raise PoolFileError(f"{where}: missing required field {key!r}")
    val = obj[key]
    if not isinstance(val, typ):
        raise PoolFileError(f"{where}: field {key!r} must be {getattr(typ, '__name__', typ)}, "
                            f"got {type(val).__name__}")
    return val


def _str_list(val, where: str, field_name: str, placeholder: bool = False) -> list[str]:
    if not isinstance(val, list) or not val or not all(isinstance(s, str) and s for s in val):
        raise PoolFileError(f"{where}: {field_name!r} must be a non-empty list of strings")
    if placeholder:
        bad = [s for s in val if "{}" not in s]
        if bad:
            raise PoolFileError(f"{where}: template(s) without a '{{}}' placeholder: {bad[:3]}")
    return list(val)


def parse_pool(obj: Any, source: str = "pool file") -> PoolSpec:
    """Validate a pool description (the parsed JSON) and return a :class:`PoolSpec`."""
    if not isinstance(obj, dict):
        raise PoolFileError(f"{source}: top level must be a JSON object")
    fmt = obj.get("format")
    if fmt != POOL_FORMAT:
        raise PoolFileError(f"{source}: 'format' must be {POOL_FORMAT!r}, got {fmt!r}")
    name = _need(obj, "name", str, source)
    model = _need(obj, "model", dict, source)
    mname = _need(model, "open_clip", str, f"{source}: model")
    pretrained = _need(model, "pretrained", str, f"{source}: model")
    qg = model.get("quick_gelu")
    if qg is not None and not isinstance(qg, bool):
        raise PoolFileError(f"{source}: model: 'quick_gelu' must be true or false")
    templates = _str_list(_need(obj, "templates", list, source), source, "templates", placeholder=True)
    tasks_raw = _need(obj, "tasks", list, source)
    if not tasks_raw:
        raise PoolFileError(f"{source}: 'tasks' is empty")
    tasks, seen = [], set()
    for i, t in enumerate(tasks_raw):
        where = f"{source}: tasks[{i}]"
        if not isinstance(t, dict):
            raise PoolFileError(f"{where}: must be an object")
        tname = _need(t, "name", str, where)
        where = f"{source}: task {tname!r}"
        if tname in seen:
            raise PoolFileError(f"{where}: duplicate task name")
        seen.add(tname)
        unknown = sorted(set(t) - {"name", "checkpoint", "dataset", "classes", "classes_from", "templates"})
        if unknown:
            raise PoolFileError(f"{where}: unknown field(s) {unknown}")
        ckpt = _need(t, "checkpoint", str, where)
        classes = t.get("classes")
        classes_from = t.get("classes_from")
        if classes is None and classes_from is None:
            raise PoolFileError(f"{where}: give either 'classes' (a list) or 'classes_from' (a hub dataset id)")
        if classes is not None:
            classes = _str_list(classes, where, "classes")
            if len(set(classes)) != len(classes):
                raise PoolFileError(f"{where}: duplicate class names")
        if classes_from is not None and not isinstance(classes_from, str):
            raise PoolFileError(f"{where}: 'classes_from' must be a string (hub dataset id)")
        ttemps = t.get("templates")
        if ttemps is not None:
            ttemps = _str_list(ttemps, where, "templates", placeholder=True)
        ds = t.get("dataset")
        if ds is not None and not isinstance(ds, str):
            raise PoolFileError(f"{where}: 'dataset' must be a string")
        tasks.append(TaskSpec(tname, ckpt, ds, classes, classes_from, ttemps))
    return PoolSpec(name=name, model=mname, pretrained=pretrained, templates=templates, tasks=tasks, quick_gelu=qg)


def load_pool_file(path: str | os.PathLike) -> PoolSpec:
    """Read and validate a pool file (JSON); errors name the file and the field."""
    p = Path(path)
    if not p.is_file():
        raise PoolFileError(f"pool file {p} not found")
    try:
        obj = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise PoolFileError(f"{p.name}: not valid JSON: {e}") from None
    spec = parse_pool(obj, p.name)
    spec.path = p
    return spec


# ---------------------------------------------------------------- resolving what a pool file names

def hub_offline() -> bool:
    return settings.hub_offline()


def _local_path(ref: str, rel_to: Path | None) -> Path | None:
    if ref.startswith(("hf:", "hf-hub:")):
        return None
    p = Path(os.path.expanduser(ref))
    if not p.is_absolute() and rel_to is not None:
        p = rel_to / p
    if p.exists() or ref.startswith((".", "/", "~")):
        return p
    return None


def _hub_id(ref: str) -> str:
    for pre in ("hf-hub:", "hf:"):
        if ref.startswith(pre):
            return ref[len(pre):]
    return ref


def resolve_checkpoint(ref: str, *, rel_to: Path | None = None, what: str = "checkpoint") -> Path:
    """A local checkpoint file for ``ref``: a local file, a folder holding one, or a hub model repo.

    Hub repos are fetched with huggingface_hub (``local_files_only`` when
    ``HF_HUB_OFFLINE`` is set). Raises :class:`PoolFileError` naming ``ref``.
    """
    p = _local_path(ref, rel_to)
    if p is None:
        repo = _hub_id(ref)
        try:
            p = Path(snapshot_download(repo, allow_patterns=["*.safetensors", "*.json", "*.bin", "*.pt"],
                                       local_files_only=hub_offline()))
        except Exception as e:  # noqa: BLE001  (offline, missing repo, network)
            mode = "HF_HUB_OFFLINE is set and it is not in the local cache" if hub_offline() else type(e).__name__
            raise PoolFileError(f"cannot fetch {what} from the Hugging Face hub repo {repo!r} ({mode})") from None
    if p.is_dir():
        files = sorted(p.glob("*.safetensors")) or sorted(list(p.glob("*.bin")) + list(p.glob("*.pt")))
        if not files:
            raise PoolFileError(f"{what}: folder {p} holds no .safetensors/.bin/.pt checkpoint")
        if len(files) > 1:
            named = [f for f in files if f.stem in ("model", "pytorch_model")]
            if len(named) != 1:
                raise PoolFileError(f"{what}: folder {p} holds several checkpoints {[f.name for f in files]}")
            files = named
        return files[0]
    if not p.is_file():
        raise PoolFileError(f"{what}: {p} not found")
    return p


def class_names_from_card(repo: str) -> list[str]:
    """Class names from a hub dataset card (``dataset_info.features[*].dtype.class_label.names``)."""
    import yaml
    try:
        card = Path(hf_hub_download(repo, "README.md", repo_type="dataset", local_files_only=hub_offline()))
    except Exception as e:  # noqa: BLE001
        mode = "HF_HUB_OFFLINE is set and it is not in the local cache" if hub_offline() else type(e).__name__
        raise PoolFileError(f"cannot fetch the dataset card of {repo!r} for its class names ({mode})") from None
    text = card.read_text(encoding="utf-8")
    if not text.startswith("---"):
        raise PoolFileError(f"dataset card of {repo!r} has no YAML header")
    meta = yaml.safe_load(text.split("---", 2)[1]) or {}
    infos = meta.get("dataset_info")
    for info in infos if isinstance(infos, list) else [infos]:
        for feat in (info or {}).get("features", []) or []:
            names = ((feat.get("dtype") or {}) if isinstance(feat.get("dtype"), dict) else {}).get("class_label", {})
            names = names.get("names") if isinstance(names, dict) else None
            if isinstance(names, dict):
                return [str(names[k]) for k in sorted(names, key=lambda k: int(k))]
            if isinstance(names, list):
                return [str(n) for n in names]
    raise PoolFileError(f"dataset card of {repo!r} lists no class_label names")


def pretrained_weights(model: str, pretrained: str, *, rel_to: Path | None = None) -> Path:
    """Local file of an open_clip pretrained tag (fetched from the hub) or a local weights file."""
    p = _local_path(pretrained, rel_to)
    if p is not None:
        if not p.is_file():
            raise PoolFileError(f"base weights {p} not found")
        return p
    cfg = open_clip.get_pretrained_cfg(model, pretrained)
    if not cfg or not cfg.get("hf_hub"):
        raise PoolFileError(f"open_clip knows no pretrained tag {pretrained!r} for model {model!r}")
    repo = cfg["hf_hub"].rstrip("/")
    try:
        last = None
        for fname in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            try:
                return Path(hf_hub_download(repo, fname, local_files_only=hub_offline()))
            except Exception as e:  # noqa: BLE001
                last = e
        raise last  # type: ignore[misc]
    except Exception as e:  # noqa: BLE001
        mode = "HF_HUB_OFFLINE is set and it is not in the local cache" if hub_offline() else type(e).__name__
        raise PoolFileError(f"cannot fetch the base model {model}/{pretrained} from the Hugging Face hub "
                            f"repo {repo!r} ({mode})") from None


@torch.no_grad()
def zero_shot_head(clip_model, tokenizer, class_names: list[str], templates: list[str],
                   device: str | torch.device = "cpu") -> torch.Tensor:
    """Zero-shot head (C × D): per class the mean of the normalised text embeddings over the templates,
    normalised again, times ``logit_scale.exp()`` (methods §0)."""
    rows = []
    for c in class_names:
        tokens = tokenizer([t.format(c) for t in templates]).to(device)
        e = torch.nn.functional.normalize(clip_model.encode_text(tokens).float(), dim=-1)
        rows.append(torch.nn.functional.normalize(e.mean(0), dim=-1))
    return torch.stack(rows) * clip_model.logit_scale.exp().float()


def load_pool(path_or_spec: str | os.PathLike | PoolSpec, *, device: str | torch.device = "cpu",
              progress: Progress | None = None) -> TaskPool:
    """Load a real CLIP pool from a pool file: base + task image towers and zero-shot heads.

    Everything the file names is located first (hub downloads, or the local
    cache when ``HF_HUB_OFFLINE`` is set); if anything is missing it fails at
    once with one error naming every item it tried to fetch. The returned pool
    carries no evaluation images.
    """
    spec = path_or_spec if isinstance(path_or_spec, PoolSpec) else load_pool_file(path_or_spec)
    rel = spec.path.parent if spec.path is not None else None
    report = reporter(progress)
    errors, files, classes = [], {}, {}
    report(0.0, "locating the base model")
    try:
        base_file = pretrained_weights(spec.model, spec.pretrained, rel_to=rel)
    except PoolFileError as e:
        errors.append(str(e))
    for t in spec.tasks:
        try:
            files[t.name] = resolve_checkpoint(t.checkpoint, rel_to=rel, what=f"checkpoint of task {t.name!r}")
        except PoolFileError as e:
            errors.append(str(e))
        if t.classes is not None:
            classes[t.name] = t.classes
        else:
            try:
                classes[t.name] = class_names_from_card(t.classes_from)
            except PoolFileError as e:
                errors.append(f"task {t.name!r}: {e}")
    if errors:
        raise PoolFileError(f"pool {spec.name!r} cannot be loaded:\n  - " + "\n  - ".join(errors))

    report(0.05, "building the base model")
    model = open_clip.create_model(spec.model, pretrained=None,
                                   **({"force_quick_gelu": True} if spec.quick_gelu else {}))
    full = load_checkpoint(base_file, max_bytes=None)
    missing, unexpected = model.load_state_dict(full, strict=False)
    if [k for k in missing if vit.module_key(k) != k]:                   # keys of the image tower
        raise PoolFileError(f"base weights {base_file.name} lack image-tower keys: {missing[:5]}")
    model = model.to(device).eval()
    base = {k: v.float() for k, v in vit.tower_state(model.visual).items()}
    tokenizer = open_clip.get_tokenizer(spec.model)
    tasks, heads = {}, {}
    for i, t in enumerate(spec.tasks):
        report(0.1 + 0.9 * i / len(spec.tasks), f"loading task {t.name}")
        tasks[t.name] = {k: v.float() for k, v in load_checkpoint(files[t.name], base=base, max_bytes=None).items()}
        heads[t.name] = zero_shot_head(model, tokenizer, classes[t.name], t.templates or spec.templates, device).cpu()
    report(1.0, "pool loaded")
    pre = open_clip.get_pretrained_cfg(spec.model, spec.pretrained) or {}
    return TaskPool(name=spec.name, model_name=spec.model, base=base, tasks=tasks, heads=heads, class_names=classes,
                    mean=tuple(pre.get("mean", (0.48145466, 0.4578275, 0.40821073))),
                    std=tuple(pre.get("std", (0.26862954, 0.26130258, 0.27577711))),
                    quick_gelu=spec.quick_gelu, meta={"pool_file": str(spec.path) if spec.path else None})
