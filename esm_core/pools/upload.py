"""Pools from uploaded files: checkpoints (any format of :mod:`esm_core.checkpoints`) and zips of images.

Every upload is hostile until checked: zip members are bounded in number and
size, images are decoded with a pixel cap, checkpoints are read without
running pickle code and refused when they do not fit the base.
"""
from __future__ import annotations

import io
import json
import math
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import open_clip
import torch
from PIL import Image, UnidentifiedImageError
from safetensors import SafetensorError, safe_open

from ..progress import Progress, reporter
from .. import settings
from ..checkpoints import load_checkpoint, save_safetensors
from ..lazy import LazyCheckpoint
from ..models import clip_text, hf_clip_vision
from ..models import openclip_vit as vit
from ..models.openclip_vit import CLIP_MEAN, CLIP_STD
from . import heads as H
from .demo import DEMO_DIR, load_demo_pool
from .taskpool import TaskPool, cosine_head


MAX_ZIP_FILES = 20_000
MAX_ZIP_BYTES = 512 * 1024 ** 2          # bytes actually inflated from one zip, all members together
MAX_ENTRY_BYTES = 32 * 1024 ** 2         # bytes actually inflated from one zip member
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_INPUT_SIZE = 512                     # input side (px) of an uploaded tower: CLIP towers use 224 to 448
MAX_GRID = 32                            # patches per side (1,024 tokens): ViT-L/14-336 has 24, SigLIP-384/14 27
IMAGE_BYTES_PER_VALUE = 1 + 4            # a decoded image: its uint8 copy (the pool's) + float32 (what the model reads)
HEAD_BATCH_BYTES = 512 * 1024 ** 2       # activations of one batch while the heads' features are computed
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}\Z")   # \Z: "$" would also match before a final "\n"


def _mib(n: float) -> str:
    return f"{n / 2 ** 20:,.1f} MiB"


def upload_memory_budget() -> int:
    """Bytes of tensors an upload may make a pool hold when the caller names no budget: what one session may
    hold (``ESM_SESSION_MEMORY_MB``, default 8 GiB). The studio passes its own budget and the model-sized
    working copies it keeps while merging (``working_copies``)."""
    return settings.session_memory_bytes()


def _check_image_size(image_size, patch_size: int | None = None, label: str = "uploaded") -> None:
    """Refuse an input size no real tower has: every image is decoded at it and the tower's tokens grow with
    its square (``MAX_INPUT_SIZE`` px, at most ``MAX_GRID`` patches per side)."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 1 <= image_size <= MAX_INPUT_SIZE:
        raise ValueError(f"the {label} image tower reads {image_size!r} px images; this server decodes uploaded "
                         f"images at most at {MAX_INPUT_SIZE}×{MAX_INPUT_SIZE} px")
    grid = image_size // max(int(patch_size), 1) if patch_size is not None else 0
    if grid > MAX_GRID:
        raise ValueError(f"the {label} image tower cuts {image_size} px images into {grid}×{grid} patches of "
                         f"{patch_size} px; at most {MAX_GRID}×{MAX_GRID} are allowed (real CLIP towers have at "
                         "most 27×27)")


def _visual_keys(sd: dict, name: str) -> dict:
    """The image tower of a checkpoint under the pool's keys (the open_clip family's ``convert``)."""
    return vit.convert(sd, name)


infer_vit_config = vit.infer_config     # an open_clip config read from a tower's shapes (the family knows its keys)


def _same_shapes(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(tuple(a[k].shape) == tuple(b[k].shape) for k in a)


@dataclass
class ImageZipPlan:
    """What a zip of class folders holds, listed from its directory without decoding anything: the image
    members in label order, their labels and the sorted class names."""
    path: Path
    task: str
    members: list
    labels: np.ndarray
    classes: list
    split: np.ndarray | None = None     # per member: TRAIN / VAL / TEST when the zip has split folders, else None

    def ids(self, code: int) -> np.ndarray:
        """Indices of the members of one split (split folders only)."""
        return np.flatnonzero(self.split == code) if self.split is not None else np.zeros(0, np.int64)


def list_image_zip(path: str | Path, task: str = "task") -> ImageZipPlan:
    """The images of one task's zip of class folders (``class/xxx.png`` at any depth), listed and checked
    (number of members, declared sizes, names, class folders) from the zip's directory: nothing is inflated
    or decoded, so what decoding will cost is known first (:func:`decoded_image_bytes`)."""
    p = Path(path)
    try:
        zf = zipfile.ZipFile(p)
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"images of task {task!r}: {p.name} is not a readable zip file ({e})") from None
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
    members = [m for m in members if not any(part.startswith(".") or part == "__MACOSX"
                                             for part in m.filename.split("/"))]
    if len(members) > MAX_ZIP_FILES:
        raise ValueError(f"images of task {task!r}: {len(members)} files, more than the {MAX_ZIP_FILES} allowed")
    declared = sum(m.file_size for m in members)     # what the headers claim: a first, cheap refusal
    if declared > MAX_ZIP_BYTES:
        raise ValueError(f"images of task {task!r}: {declared / 1024 ** 2:.0f} MiB uncompressed, more than "
                         f"{MAX_ZIP_BYTES / 1024 ** 2:.0f} MiB")
    by_class: dict[str, list] = {}
    for m in members:
        parts = [q for q in m.filename.split("/") if q]
        if len(parts) < 2:
            raise ValueError(f"images of task {task!r}: {m.filename!r} is not inside a class folder "
                             "(expected <class>/<image>)")
        if not parts[-1].lower().endswith(IMAGE_EXTS):
            raise ValueError(f"images of task {task!r}: {m.filename!r} is not an image "
                             f"(allowed: {', '.join(IMAGE_EXTS)})")
        by_class.setdefault(parts[-2], []).append(m)
    if len(by_class) < 2:
        raise ValueError(f"images of task {task!r}: found {len(by_class)} class folder(s); "
                         "a classification task needs at least 2")
    split_of = _split_folders(members, task)
    classes = sorted(by_class)
    ordered, labels = [], []
    for ci, c in enumerate(classes):
        if split_of is None and len(by_class[c]) < 2:
            raise ValueError(f"images of task {task!r}: class {c!r} has {len(by_class[c])} image; "
                             "each class needs at least 2 (one for validation, one for test)")
        ordered += by_class[c]
        labels += [ci] * len(by_class[c])
    split = None
    if split_of is not None:
        split = np.asarray([split_of[m.filename] for m in ordered], dtype=np.int64)
        lab = np.asarray(labels)
        have = {code: {classes[c] for c in np.unique(lab[split == code])} for code in (TRAIN, VAL, TEST)}
        if have[VAL] != have[TEST]:
            only_v, only_t = sorted(have[VAL] - have[TEST]), sorted(have[TEST] - have[VAL])
            raise ValueError(f"images of task {task!r}: the class folders of val/ and test/ differ"
                             + (f"; only in val/: {only_v[:5]}" if only_v else "")
                             + (f"; only in test/: {only_t[:5]}" if only_t else ""))
        if have[TRAIN] - have[VAL]:
            raise ValueError(f"images of task {task!r}: class folder(s) {sorted(have[TRAIN] - have[VAL])[:5]} "
                             "of train/ are in neither val/ nor test/")
    return ImageZipPlan(p, task, ordered, np.asarray(labels, dtype=np.int64), classes, split)


TRAIN, VAL, TEST = 0, 1, 2
SPLIT_FOLDERS = {"train": TRAIN, "training": TRAIN, "val": VAL, "valid": VAL, "validation": VAL, "test": TEST}


def _split_folders(members: list, task: str) -> dict[str, int] | None:
    """``{member name: TRAIN / VAL / TEST}`` when the zip holds split folders (``val/<class>/…`` and
    ``test/<class>/…``, optionally ``train/<class>/…``, at any depth), else None (one set of class folders, split
    by the seeded rule). A zip with one of val/ and test/ but not the other, or with images outside the split
    folders, is refused naming what is wrong."""
    found = {}
    for m in members:
        parts = [q for q in m.filename.split("/") if q]
        if len(parts) >= 3 and parts[-3].lower() in SPLIT_FOLDERS:
            found[m.filename] = SPLIT_FOLDERS[parts[-3].lower()]
    codes = set(found.values())
    if not codes & {VAL, TEST}:
        return None                       # no split folders (a lone train/ folder of classes is a plain zip)
    if not {VAL, TEST} <= codes:
        has, lacks = ("val/", "test/") if VAL in codes else ("test/", "val/")
        raise ValueError(f"images of task {task!r}: the zip has a {has} folder but no {lacks} folder; a zip with "
                         "split folders needs both val/<class>/… and test/<class>/… (train/ optional), or upload "
                         "one set of class folders to have it split for you")
    stray = [m.filename for m in members if m.filename not in found]
    if stray:
        raise ValueError(f"images of task {task!r}: {stray[0]!r} is outside the split folders (train/, val/, "
                         "test/); with split folders every image must be in <split>/<class>/")
    return found


def decoded_image_bytes(n_images: int, image_size: int) -> int:
    """Bytes ``n_images`` images cost once decoded at ``image_size`` and used: their uint8 RGB copy (what the
    pool keeps) and the float32 copy the model reads (what a session caches): S² × 3 × (1 + 4) each."""
    return int(n_images) * int(image_size) ** 2 * 3 * IMAGE_BYTES_PER_VALUE


def _decode_into(plan: ImageZipPlan, image_size: int, order: np.ndarray, out: np.ndarray) -> None:
    """Decode ``plan.members[order[j]]`` into ``out[j]`` (preallocated uint8 ``len(order)×S×S×3``): one image
    in flight at a time, no list of arrays to stack; every member is checked (inflated size, pixel count,
    decodability) and a bad one refused with a message naming it."""
    task = plan.task
    try:
        zf = zipfile.ZipFile(plan.path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"images of task {task!r}: {plan.path.name} is not a readable zip file ({e})") from None
    budget = [MAX_ZIP_BYTES]                          # what is really inflated is bounded too (headers can lie)
    with zf:
        for j, i in enumerate(order):
            m = plan.members[int(i)]
            try:
                with Image.open(io.BytesIO(_read_member(zf, m, task, budget))) as im:
                    if im.size[0] * im.size[1] > MAX_IMAGE_PIXELS:
                        raise ValueError(f"images of task {task!r}: {m.filename!r} is too large "
                                         f"({im.size[0]}×{im.size[1]} pixels)")
                    rgb = im.convert("RGB")
                    out[j] = np.asarray(rgb.resize((image_size, image_size), Image.BILINEAR), dtype=np.uint8)
                    del rgb
            except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
                raise ValueError(f"images of task {task!r}: {m.filename!r} cannot be decoded as an image "
                                 f"({type(e).__name__})") from None


def read_image_zip(path: str | Path, image_size: int, task: str = "task",
                   max_bytes: int | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images of one task from a zip of class folders (``class/xxx.png`` at any depth).

    Returns (uint8 N×S×S×3, labels int64 N, class names sorted). Nothing is
    extracted to disk; every member is checked (size, type, decodability) and
    a bad one is refused with a message naming it. The zip is listed first and
    refused, before anything is decoded, when its images would take more than
    ``max_bytes`` once decoded and used (:func:`decoded_image_bytes`; None: the
    session memory budget).
    """
    _check_image_size(image_size)
    plan = list_image_zip(path, task)
    limit = upload_memory_budget() if max_bytes is None else int(max_bytes)
    need = decoded_image_bytes(len(plan.members), image_size)
    if need > limit:
        raise ValueError(f"images of task {task!r}: {len(plan.members)} images at {image_size}×{image_size} px "
                         f"need {_mib(need)} once decoded (uint8 + float32 copies), more than the {_mib(limit)} "
                         "allowed: upload fewer images")
    x = np.empty((len(plan.members), image_size, image_size, 3), dtype=np.uint8)
    _decode_into(plan, image_size, np.arange(len(plan.members)), x)
    return x, plan.labels, plan.classes


def _read_member(zf: zipfile.ZipFile, m: zipfile.ZipInfo, task: str, budget: list[int]) -> bytes:
    """The bytes of one member, inflating at most MAX_ENTRY_BYTES of it and the zip's remaining budget."""
    limit = min(MAX_ENTRY_BYTES, budget[0])
    try:
        with zf.open(m) as f:
            data = f.read(limit + 1)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, NotImplementedError, RuntimeError) as e:
        raise ValueError(f"images of task {task!r}: {m.filename!r} cannot be read from the zip "
                         f"({type(e).__name__})") from None
    if len(data) > limit:
        raise ValueError(f"images of task {task!r}: {m.filename!r} inflates to more than "
                         f"{limit / 1024 ** 2:.0f} MiB (per image at most {MAX_ENTRY_BYTES / 1024 ** 2:.0f} MiB, "
                         f"per zip {MAX_ZIP_BYTES / 1024 ** 2:.0f} MiB)")
    budget[0] -= len(data)
    return data


def _split_val_test(y: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stratified half / half split of the indices (each class: ≥ 1 in each part)."""
    rng = np.random.default_rng(seed)
    val, test = [], []
    for c in np.unique(y):
        ids = rng.permutation(np.nonzero(y == c)[0])
        h = max(1, len(ids) // 2)
        val += list(ids[:h])
        test += list(ids[h:])
    return np.sort(np.asarray(val)), np.sort(np.asarray(test))


def _one_per_class_first(y: np.ndarray, k: int) -> np.ndarray:
    """Indices of ``k`` items of ``y`` taken round-robin over the classes (for display samples)."""
    by_class = [list(np.flatnonzero(y == c)) for c in np.unique(y)]
    out = []
    while len(out) < min(k, len(y)):
        for ids in by_class:
            if ids and len(out) < k:
                out.append(ids.pop(0))
    return np.asarray(sorted(out), dtype=np.int64)


def _head_batch(cfg: Mapping) -> int:
    """Images per forward pass while the heads' features are computed, so that one batch's activations (tokens ×
    width, one attention map per head, the normalised input's float copies) stay near :data:`HEAD_BATCH_BYTES`:
    128 for ViT-B/32 at 224 px, 12 for ViT-L/14 at 336 px."""
    return int(max(1, min(128, HEAD_BATCH_BYTES // _head_image_bytes(cfg))))


def _head_image_bytes(cfg: Mapping) -> int:
    """Estimated bytes one image takes in the heads' feature pass (:func:`_head_batch`)."""
    v = cfg["vision_cfg"]
    tokens = (v["image_size"] // v["patch_size"]) ** 2 + 1
    heads = max(1, v["width"] // v.get("head_width", 64))
    return 4 * (tokens * v["width"] * 8 + heads * tokens * tokens) + 3 * 4 * 3 * v["image_size"] ** 2


@torch.inference_mode()
def _centroid_head(visual, normalise: Callable[[np.ndarray], torch.Tensor], raw: np.ndarray, y: np.ndarray,
                   n_classes: int, batch: int = 128, scale: float = 30.0) -> torch.Tensor:
    """A frozen cosine head: the normalised class means of the fine-tuned model's features (× scale). ``raw``:
    uint8 images, normalised ``batch`` at a time (no float copy of the whole set)."""
    feats = torch.cat([visual(normalise(raw[i:i + batch])).float() for i in range(0, len(raw), batch)])
    feats = torch.nn.functional.normalize(feats, dim=-1)
    yt = torch.from_numpy(y)
    return cosine_head(torch.stack([feats[yt == c].mean(0) for c in range(n_classes)]), scale)


class ArchitectureChoice(ValueError):
    """The architecture or the input normalisation cannot be read from the upload: the user must choose.

    ``candidates``: ``[(arch value, what it implies)]`` for the Pool view's choice."""

    def __init__(self, message: str, candidates: list[tuple[str, str]]):
        super().__init__(message + " Choose: " + "; ".join(f"{v!r} = {d}" for v, d in candidates))
        self.candidates = candidates


NORMALISATIONS = {"clip": (CLIP_MEAN, CLIP_STD), "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}


def _demo_config() -> dict | None:
    """The demo's recorded model config and normalisation (assets/demo/config.json), or None."""
    f = DEMO_DIR / "config.json"
    if not f.is_file():
        return None
    c = json.loads(f.read_text())
    return {**c["model_config"], "preprocess_cfg": {"mean": c["mean"], "std": c["std"]}, "_name": c["model_name"]}


def _shapes(sd: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def _check_fits(base: Mapping[str, torch.Tensor], cfg: dict, label: str) -> None:
    """Refuse (before anything is built) a config whose image tower is too large or whose shapes differ from
    the uploaded base's; the comparison runs on the meta device, so it costs no memory."""
    _check_image_size(cfg["vision_cfg"].get("image_size"), cfg["vision_cfg"].get("patch_size"), label)
    want = vit.expected_shapes(cfg, cfg.get("quick_gelu"))
    n = sum(math.prod(s) for s in want.values())
    if n > (cap := settings.max_model_params()):          # ESM_MAX_MODEL_PARAMS; ViT-L/14's tower fits
        raise ValueError(f"the {label} image tower has {n / 1e6:.0f} M parameters, more than the "
                         f"{cap / 1e6:.0f} M this server builds for an upload")
    got = _shapes(base)
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    wrong = [f"{k} {got[k]} (expected {want[k]})" for k in want if k in got and got[k] != want[k]]
    if missing or extra or wrong:
        raise ValueError(f"the base checkpoint does not fit the {label} architecture: "
                         + "; ".join(x for x in (f"missing {missing[:4]}" if missing else "",
                                                  f"unexpected {extra[:4]}" if extra else "",
                                                  f"other shapes: {wrong[:3]}" if wrong else "") if x))


def resolve_architecture(base: Mapping[str, torch.Tensor], *, arch: str = "auto", config: Mapping | None = None,
                         head_width: int | None = None, normalisation: str | None = None,
                         preprocessor: Mapping | None = None) -> tuple[dict, tuple, tuple, str]:
    """``(model config, mean, std, note)`` of an uploaded open_clip image tower — read, never guessed.

    ``config`` (an uploaded open_clip model config JSON, its ``preprocess_cfg`` giving mean/std, or a Hugging
    Face CLIP ``config.json`` with its ``preprocessor_config.json`` as ``preprocessor``) wins;
    else ``arch``: ``"demo"`` (this project's demo architecture and normalisation), an open_clip model name
    (its config; OpenAI CLIP normalisation unless the config says otherwise), or ``"infer"`` (shapes plus an
    explicit ``head_width``). ``normalisation`` ("clip" or "half") overrides or supplies mean/std. With
    ``arch="auto"`` and no config the choice is the user's: :class:`ArchitectureChoice` lists the candidates.
    Every config is bounded and compared with the base's shapes on the meta device before anything is built.
    """
    demo = _demo_config()
    if config is not None and hf_clip_vision.is_config(config):
        cfg, label = hf_clip_vision.open_clip_config(config, preprocessor), "Hugging Face config's"
    elif config is not None:
        cfg, label = vit.check_config(config), "uploaded config's"
    elif arch == "demo":
        if demo is None:
            raise ValueError("the demo pool's config is not available in this installation")
        cfg, label = vit.check_config(demo), f"demo ({demo['_name']})"
    elif arch == "infer":
        if head_width is None or normalisation is None:
            raise ValueError("arch 'infer' reads the shapes but needs the attention head width (head_width=) "
                             "and the input normalisation (normalisation='clip' or 'half') from you")
        cfg, label = vit.check_config(infer_vit_config(base, int(head_width))), "inferred"
    elif arch and arch != "auto":
        if open_clip.get_model_config(arch) is None:
            raise ValueError(f"unknown open_clip model {arch!r}; choose 'demo', 'infer' or upload its config JSON")
        cfg, label = vit.check_config(open_clip.get_model_config(arch)), f"open_clip {arch}"
        cfg["quick_gelu"] = cfg["quick_gelu"] or arch.endswith("quickgelu")
        cfg.setdefault("preprocess_cfg", {"mean": CLIP_MEAN, "std": CLIP_STD})
    else:
        cands = []
        if demo is not None and _shapes(base) == vit.expected_shapes(demo, True):
            cands.append(("demo", f"the demo's {demo['_name']} (head width {demo['vision_cfg']['head_width']}, "
                                  f"mean/std {demo['preprocess_cfg']['mean'][0]}/{demo['preprocess_cfg']['std'][0]})"))
        cands += [("infer", "shapes from the weights, with the head width and normalisation you give "
                            "(CLIP: head width 64, normalisation 'clip')"),
                  ("<open_clip name>", "e.g. ViT-B-32-quickgelu: that model's config"),
                  ("config JSON", "upload the model's open_clip config (with preprocess_cfg mean/std)")]
        raise ArchitectureChoice("The attention head width and the input normalisation cannot be read from the "
                                 "weights alone.", cands)
    _check_fits(base, cfg, label)
    if normalisation is not None:
        if normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {sorted(NORMALISATIONS)}, got {normalisation!r}")
        mean, std = NORMALISATIONS[normalisation]
    elif "preprocess_cfg" in cfg:
        mean, std = tuple(cfg["preprocess_cfg"]["mean"]), tuple(cfg["preprocess_cfg"]["std"])
    else:
        raise ArchitectureChoice("The config does not say how images are normalised.",
                                 [("clip", f"OpenAI CLIP mean/std {CLIP_MEAN}"), ("half", "mean 0.5, std 0.5")])
    v = cfg["vision_cfg"]
    note = (f"architecture: {label} — ViT width {v['width']}, {v['layers']} blocks, patch {v['patch_size']}, "
            f"{v['image_size']} px, head width {v.get('head_width', 64)}, "
            f"{'QuickGELU' if cfg['quick_gelu'] else 'GELU'}; normalisation mean {mean}, std {std}")
    return cfg, mean, std, note


def _read_base(base_path, text: dict | None = None) -> dict:
    """The base's ``visual.*`` tensors in float32, bounded in parameters. ``text`` (a dict): filled with the
    base's CLIP text tower and ``logit_scale`` when it holds them (bounded the same way), for zero-shot heads."""
    full = load_checkpoint(base_path)
    base = _visual_keys(full, Path(base_path).name)
    n = sum(v.numel() for v in base.values())
    if n > (cap := settings.max_model_params()):          # ESM_MAX_MODEL_PARAMS; ViT-L/14's tower fits
        raise ValueError(f"the base checkpoint holds {n / 1e6:.0f} M parameters, more than the "
                         f"{cap / 1e6:.0f} M this server merges")
    if text is not None and not clip_text.has_text_tower(full):
        full = _hf_text_tower(base_path) or full
    if text is not None and clip_text.has_text_tower(full):
        tower = clip_text.text_tower_keys(full)
        n = sum(v.numel() for v in tower.values())
        if n > settings.max_model_params():
            raise ValueError(f"the base checkpoint's text tower holds {n / 1e6:.0f} M parameters, more than the "
                             f"{settings.max_model_params() / 1e6:.0f} M this server builds")
        text.update(tower)
        if "logit_scale" in full:
            text["logit_scale"] = full["logit_scale"]
    del full
    return {k: v.float() for k, v in base.items()}


def _hf_text_tower(base_path) -> dict | None:
    """A Hugging Face CLIPModel base's text tower (``text_model.*``, dropped when the image tower is read) from its
    safetensors file, in open_clip's layout; None for any other file."""
    p = Path(base_path)
    if p.suffix.lower() != ".safetensors":
        return None
    try:
        with safe_open(str(p), "pt") as f:
            keys = [k for k in f.keys() if clip_text.is_hf_text_key(k)]
            if not any(k.startswith("text_model.") for k in keys):
                return None
            return clip_text.hf_text_to_open_clip({k: f.get_tensor(k) for k in keys}, p.name)
    except (OSError, SafetensorError) as e:
        raise ValueError(f"{p.name}: cannot read its text tower ({e})") from None


def _file_id(path) -> tuple:
    """The identity of an uploaded file (device, inode): one file given for several tasks is read once."""
    try:
        st = os.stat(path)
    except (OSError, TypeError, ValueError):
        return ("path", str(path))                           # load_checkpoint names what is wrong with it
    return (st.st_dev, st.st_ino) if st.st_ino else ("path", str(Path(path).resolve()))


def _read_tasks(base: dict, task_paths, names, report, keep_dir: Path | None = None, base_name: str | None = None,
               notes: list[str] | None = None) -> dict:
    """``{task: float32 visual.* tensors}``, each checked against the base. With ``keep_dir``, each task is
    written there as a float32 safetensors file and kept as a :class:`~esm_core.lazy.LazyCheckpoint` over it
    (read key by key when used: the pool's resident memory is the base alone); one task is in memory at a time.
    One file given for several tasks is read and written once; those tasks share it."""
    tasks, first_of = {}, {}
    for i, t in enumerate(names):
        fid = _file_id(task_paths[t])
        if fid in first_of:                                      # the same file again: share, do not copy
            src = tasks[first_of[fid]]
            lazy = isinstance(src, LazyCheckpoint)
            tasks[t] = LazyCheckpoint(src.path, name=f"task {t!r}") if lazy else dict(src)
            continue
        report(0.05 + 0.3 * i / len(names), f"reading task checkpoint {t}")
        # refuses a mismatch, naming what differs; a LoRA adapter (folder / .zip) is read on the base (methods §1)
        sd = load_checkpoint(task_paths[t], base=base, base_name=base_name, notes=notes)
        tasks[t] = {k: sd[k].float() for k in base}
        del sd
        if keep_dir is not None:
            path = save_safetensors(tasks[t], Path(keep_dir) / f"task-{i}.safetensors")
            tasks[t] = LazyCheckpoint(path, name=f"task {t!r}")
        first_of[fid] = t
    return tasks


def _check_upload_memory(plans: Mapping[str, ImageZipPlan], image_size: int, demo_bytes: int, base_bytes: int,
                         in_memory_tasks: int, budget: int, copies: int, head_pass: int = 0,
                         limit: str = "a session may hold (ESM_SESSION_MEMORY_MB)",
                         counts: Mapping[str, int] | None = None) -> None:
    """Refuse, before any checkpoint is read for the tasks or any image decoded, an upload whose images (at the
    tower's input size, :func:`decoded_image_bytes`), checkpoints held in memory and the session's model-sized
    working copies, plus one batch of the heads' feature pass (``head_pass`` bytes), exceed ``budget``; the message
    names the task with most images, the counts and the sizes. ``counts``: images decoded per task (default: all
    of its zip's; a zip with split folders decodes its train/ images only for a class-means head)."""
    counts = {t: len(p.members) for t, p in plans.items()} if counts is None else dict(counts)
    images = {t: decoded_image_bytes(counts[t], image_size) for t in plans}
    ckpt = base_bytes * (1 + in_memory_tasks)
    head_pass = head_pass if plans else 0
    need = sum(images.values()) + demo_bytes + ckpt + copies * base_bytes + head_pass
    if need <= budget:
        return
    big = max(plans, key=lambda t: counts[t]) if plans else None
    listed = ", ".join(f"{t}: {counts[t]}" for t in plans)
    lead = (f"images of task {big!r}: {counts[big]} images at {image_size}×{image_size} px need "
            f"{_mib(images[big])} once decoded (uint8 + float32 copies, {image_size}² × 3 × "
            f"{IMAGE_BYTES_PER_VALUE} bytes each); " if big else "")
    raise ValueError(f"{lead}this upload ({listed + ' images' if listed else 'the demo' + chr(39) + 's images'}; "
                     f"{_mib(sum(images.values()) + demo_bytes)} of "
                     f"images, {_mib(ckpt)} of checkpoints held, {copies} model-sized working copies of "
                     f"{_mib(base_bytes)}, {_mib(head_pass)} for the heads' feature pass) needs about {_mib(need)}, "
                     f"more than the {_mib(budget)} {limit}: upload fewer images "
                     "or a tower with a smaller input size")


def _check_names(names: list[str], image_zips: Mapping, heads: Mapping | None = None) -> None:
    if len(names) < 2:
        raise ValueError(f"merging needs at least two task checkpoints; got {len(names)}")
    bad = [n for n in names if not isinstance(n, str) or not NAME_OK.fullmatch(n)]
    if bad:
        raise ValueError(f"task names must be 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit; "
                         f"not {bad}")
    unknown = sorted(set(image_zips) - set(names))
    if unknown:
        raise ValueError(f"image zip(s) for {unknown}, which are not among the task names {names} "
                         "(name each zip <task>.zip)")
    unknown = sorted(set(heads or {}) - set(names))
    if unknown:
        raise ValueError(f"head file(s) for {unknown}, which are not among the task names {names} "
                         "(name each head <task>.head.safetensors)")
    orphan = sorted(set(heads or {}) - set(image_zips))
    if orphan:
        raise ValueError(f"a head for task(s) {orphan} without their images: a head is checked against the task's "
                         "class folders, so upload <task>.zip with it")


def pool_from_upload(base_path: str | Path, task_paths: Mapping[str, str | Path],
                     image_zips: Mapping[str, str | Path] | None = None, *, arch: str = "auto",
                     config: Mapping | None = None, preprocessor: Mapping | None = None,
                     head_width: int | None = None, normalisation: str | None = None, demo_loader: Callable[[], Any] | None = None,
                     progress: Progress | None = None, keep_dir: str | Path | None = None,
                     memory_budget: int | None = None, working_copies: int = 0,
                     heads: Mapping[str, str | Path] | None = None, head_names: Mapping[str, str | Path] | None = None,
                     templates: Sequence[str] | str | None = None) -> tuple[TaskPool, list[str]]:
    """Build a pool from uploaded checkpoints: ``(TaskPool, notes for the user)``.

    ``task_paths``: ``{task name: checkpoint file}`` (at least two); ``image_zips``: ``{task name: zip of
    class folders}`` — one set of class folders (split seeded 50/50 per class into validation and test), or
    split folders ``val/<class>/…`` and ``test/<class>/…`` (``train/`` optional), used as given. A task without
    a zip keeps the demo's images and head when the architecture is the demo's and the task is one of the demo's
    tasks; otherwise it is refused. The architecture and the input normalisation come from
    :func:`resolve_architecture` (never guessed). Raises ValueError / CheckpointError naming the problem;
    nothing is built before the shapes are checked.

    Heads (methods §0; :mod:`esm_core.pools.heads`), per task, the first that applies: ``heads[task]`` (a
    ``<task>.head.safetensors`` / weights-only ``.pt`` file, class names in its metadata, in ``head_names[task]``
    or in ``<task>.head.json`` beside it; checked against the class folders and the tower's output width); the
    zero-shot head of the class-folder names when the base holds its CLIP text tower and the config describes it
    (``templates``: prompt templates with one ``{}``, default :data:`~esm_core.pools.heads.DEFAULT_TEMPLATES`);
    else the class means of the fine-tuned model's features on the task's train/ images (or its validation
    images), flagged as not comparable. ``pool.meta`` records each task's head source and split rule and sizes.

    ``keep_dir`` (a folder that outlives the uploads, e.g. the session's): the checked task checkpoints are
    written there (float32 safetensors) and read lazily, key by key, whenever they are used — the pool holds
    the base in memory, not every task (what the app does: 8 ViT-B/32 tasks are 2.8 GB). Without it every
    task is held in memory (the library's default).

    Memory is bounded before any task checkpoint is read or any image decoded: every zip is listed first, and
    the upload is refused when its images at the tower's input size (uint8 + float32 copies,
    :func:`decoded_image_bytes`), the checkpoints it holds in memory, the text tower a zero-shot head builds and
    the session's model-sized working copies exceed ``memory_budget`` (None: ``ESM_SESSION_MEMORY_MB`` or 8 GiB),
    counting ``working_copies`` model-sized copies besides (the studio passes those it keeps while merging:
    :func:`esm_core.studio.session.check_memory`). Images are decoded one at a time straight into the pool's arrays.
    """
    report = reporter(progress)
    image_zips = dict(image_zips or {})
    head_files, head_names = dict(heads or {}), dict(head_names or {})
    if base_path is None:
        raise ValueError("no base (pre-trained) checkpoint uploaded")
    names = list(task_paths)
    _check_names(names, image_zips, {**head_files, **head_names})
    templates = H.check_templates(templates)
    report(0.02, "reading the base checkpoint")
    text: dict = {}
    base = _read_base(base_path, text)
    demo = None
    missing_data = [n for n in names if n not in image_zips]
    if missing_data:
        try:
            demo = (demo_loader or load_demo_pool)()
        except (FileNotFoundError, ValueError):
            demo = None
        demo_ok = demo is not None and _same_shapes(demo.base, base)
        no_data = [n for n in missing_data if not (demo_ok and n in demo.task_names)]
        if no_data:
            why = ("" if demo_ok else " (the demo's images only fit checkpoints with the demo's architecture)")
            raise ValueError(f"no images for task(s) {no_data}: upload <task>.zip with one folder per class{why}")
    cfg, mean, std, note = resolve_architecture(base, arch=arch, config=config, head_width=head_width,
                                                normalisation=normalisation, preprocessor=preprocessor)
    size = cfg["vision_cfg"]["image_size"]
    # every zip is listed (nothing inflated) and every uploaded head read and checked, then the whole upload's
    # memory checked, before any task checkpoint is read or any image decoded
    plans = {n: list_image_zip(image_zips[n], n) for n in names if n in image_zips}
    width = vit.feature_width(base)
    text_cfg, text_note = _text_config(arch, config, cfg, text)
    sources, uploaded = {}, {}
    for n in names:
        if n not in plans:
            sources[n] = H.HeadSource.DEMO
        elif n in head_files:
            w, hn = H.read_head_file(head_files[n], n, head_names.get(n))
            rows = H.match_head(w, hn, plans[n].classes, width, n, Path(head_files[n]).name)
            uploaded[n] = (w, hn, np.asarray(rows, dtype=np.int64))
            sources[n] = H.HeadSource.UPLOADED
        else:
            sources[n] = H.HeadSource.ZERO_SHOT if text_cfg is not None else H.HeadSource.CLASS_MEANS
    means = [n for n in plans if sources[n] == H.HeadSource.CLASS_MEANS]
    counts = {n: (len(p.members) if p.split is None else
                  len(p.ids(VAL)) + len(p.ids(TEST)) + (len(p.ids(TRAIN)) if n in means else 0))
              for n, p in plans.items()}
    demo_bytes = sum(a.nbytes * IMAGE_BYTES_PER_VALUE for n in missing_data for split in demo.data[n].values()
                     for a in split[:1]) if missing_data else 0
    budget, copies = upload_memory_budget() if memory_budget is None else int(memory_budget), int(working_copies)
    base_bytes = sum(v.numel() * v.element_size() for v in base.values())
    in_memory = 0 if keep_dir is not None else len({_file_id(task_paths[n]) for n in names})
    batch = _head_batch(cfg)
    most = max((len(plans[n].members) for n in means), default=0)
    zero_shot = any(v == H.HeadSource.ZERO_SHOT for v in sources.values())
    head_pass = (min(batch, most) * _head_image_bytes(cfg) + (2 * clip_text.text_tower_bytes(text_cfg) if zero_shot else 0)
                 + sum(w.numel() * w.element_size() for w, _, _ in uploaded.values()))   # the heads the pool keeps
    _check_upload_memory(plans, size, demo_bytes, base_bytes, in_memory, budget, copies, head_pass,
                         *(() if memory_budget is None else ("allowed (memory_budget)",)), counts=counts)
    if not zero_shot:
        text.clear()
    if keep_dir is not None:
        Path(keep_dir).mkdir(parents=True, exist_ok=True)
    lora_notes: list[str] = []                           # what each LoRA adapter task holds, base-name warnings
    tasks = _read_tasks(base, task_paths, names, report, keep_dir, Path(base_path).name, lora_notes)
    notes = [note] + ([text_note] if text_note else []) + lora_notes
    shell = TaskPool(name="upload", model_name=cfg, base=base, tasks={}, heads={}, class_names={},
                     mean=mean, std=std, quick_gelu=cfg["quick_gelu"])
    tower = tokenizer = text_tower = None
    if zero_shot:
        report(0.38, "building the text tower for the zero-shot heads")
        tower = clip_text.build_text_tower(text_cfg, {k: v for k, v in text.items() if k != "logit_scale"})
        tokenizer = clip_text.tokenizer_for(text_cfg)
        scale, read = H.logit_scale_of(text)
        text_tower = dict(text)             # kept (counted in the check above): an open_clip export holds full CLIP
        text.clear()
        if not read:
            notes.append("the base has no logit_scale: zero-shot heads scaled by 100 (CLIP's; top-1 is unaffected)")
    heads_out, class_names, data, splits = {}, {}, {}, {}
    for i, n in enumerate(names):
        report(0.4 + 0.55 * i / len(names), f"images and head of {n}")
        src = sources[n]
        if n not in plans:
            data[n], heads_out[n], class_names[n] = demo.data[n], demo.heads[n], demo.class_names[n]
            splits[n] = {"rule": "the demo's own splits", "val": len(demo.data[n]["val"][1]),
                         "test": len(demo.data[n]["test"][1]), "train": 0}
            notes.append(f"{n}: the demo's images and head")
            continue
        plan = plans[n]
        y, classes = plan.labels, list(plan.classes)
        if plan.split is not None:
            val, test, train = plan.ids(VAL), plan.ids(TEST), plan.ids(TRAIN)
            rule = "as given: the zip's val/ and test/ folders"
            if len(train):
                rule += "; train/ " + ("used for the class means" if src == H.HeadSource.CLASS_MEANS else "ignored")
        else:
            (val, test), train = _split_val_test(y), np.zeros(0, np.int64)
            rule = "seeded 50 / 50 per class (seed 0): half validation, half test"
        if src == H.HeadSource.UPLOADED:                 # the head's class order: labels renumbered to its rows
            w, hn, rows = uploaded[n]
            y, classes = rows[y], list(hn)
        x_val = np.empty((len(val), size, size, 3), dtype=np.uint8)     # decoded straight into place
        x_test = np.empty((len(test), size, size, 3), dtype=np.uint8)
        _decode_into(plan, size, val, x_val)
        _decode_into(plan, size, test, x_test)
        few = _one_per_class_first(y[test], 16)
        data[n] = {"val": (x_val, y[val]), "test": (x_test, y[test]), "samples": (x_test[few], y[test][few])}
        if src == H.HeadSource.UPLOADED:
            heads_out[n] = uploaded[n][0]
        elif src == H.HeadSource.ZERO_SHOT:
            heads_out[n] = H.zero_shot_head(tower, tokenizer, [H.prompt_name(c) for c in classes], templates, scale)
        else:
            visual = shell.build_model(tasks[n])
            if len(train):
                x_train = np.empty((len(train), size, size, 3), dtype=np.uint8)
                _decode_into(plan, size, train, x_train)
                heads_out[n] = _centroid_head(visual, shell.normalise, x_train, y[train], len(classes), batch)
                del x_train
            else:
                heads_out[n] = _centroid_head(visual, shell.normalise, x_val, y[val], len(classes), batch)
            del visual
        class_names[n] = classes
        splits[n] = {"rule": rule, "val": int(len(val)), "test": int(len(test)), "train": int(len(train))}
        msg = (f"{n}: {len(y)} images in {len(classes)} classes; splits {rule} — {len(val)} validation, "
               f"{len(test)} test; head: {src.value}")
        if src == H.HeadSource.CLASS_MEANS:
            msg += f" of the fine-tuned model's features on its {'train' if len(train) else 'validation'} images"
        notes.append(msg)
    del tower
    meta = {"head_sources": {n: sources[n].value for n in names}, "splits": splits,
            "templates": templates if zero_shot else None}
    if text_tower:                                       # the base's CLIP text tower, for a full open_clip export
        meta["text_tower"], meta["text_cfg"] = text_tower, dict(text_cfg["text_cfg"])
    pool = TaskPool(name="upload", model_name=cfg, base=base, tasks=tasks, heads=heads_out,
                    class_names=class_names, data=data, mean=mean, std=std, quick_gelu=cfg["quick_gelu"], meta=meta)
    warning = H.head_warning(pool)
    if warning:
        notes.append(f"⚠ {warning}")
    meta["head_warning"] = warning
    report(1.0, "pool ready")
    return pool, notes


def _text_config(arch: str, config: Mapping | None, cfg: Mapping, text: Mapping) -> tuple[dict | None, str | None]:
    """``(model config for the text tower, None)`` when the base holds a CLIP text tower that the upload's config
    describes (an uploaded open_clip config's ``text_cfg``, or a named open_clip model's), else ``(None, why
    not)`` (``why`` None when the base has no text tower). A text tower that does not fit its config is refused."""
    if not text:
        return None, None
    raw = None
    if config is not None and hf_clip_vision.is_config(config):
        if not isinstance(config.get("text_config"), Mapping):
            return None, ("the base holds a text tower, but its config.json has no text_config: upload the full "
                          "CLIP config.json to use zero-shot heads")
        try:
            raw = clip_text.hf_text_config(config)
        except ValueError as e:
            return None, f"no zero-shot heads from the base's text tower: {e}"
    elif config is not None:
        raw = config.get("text_cfg")
    elif config is None and arch not in ("auto", "infer", "demo") and open_clip.get_model_config(arch) is not None:
        raw = open_clip.get_model_config(arch).get("text_cfg")
    if raw is None:
        return None, ("the base holds a text tower, but the config does not describe it (no text_cfg): upload the "
                      "open_clip model config to use zero-shot heads")
    tcfg = {"embed_dim": cfg["embed_dim"], "quick_gelu": cfg["quick_gelu"], "text_cfg": raw}
    try:
        clip_text.check_text_config(raw)
    except ValueError as e:
        return None, f"no zero-shot heads from the base's text tower: {e}"
    clip_text.check_text_shapes(tcfg, {k: v for k, v in text.items() if k != "logit_scale"})
    return tcfg, None
