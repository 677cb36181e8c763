"""Pools from uploaded files: checkpoints (any format of :mod:`esm_core.checkpoints`) and zips of images.

Every upload is hostile until checked: zip members are bounded in number and
size, images are decoded with a pixel cap, checkpoints are read without
running pickle code and refused when they do not fit the base.
"""
from __future__ import annotations

import io
import math
import re
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import open_clip
import torch
from PIL import Image, UnidentifiedImageError

from ..checkpoints import load_checkpoint
from ..models import openclip_vit as vit
from ..models.openclip_vit import CLIP_MEAN, CLIP_STD, register_model_config
from .demo import load_demo_pool
from .taskpool import TaskPool, cosine_head

Progress = Callable[[float, str], None]

MAX_ZIP_FILES = 20_000
MAX_ZIP_BYTES = 512 * 1024 ** 2
MAX_IMAGE_PIXELS = 4096 * 4096
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


def _visual_keys(sd: dict, name: str) -> dict:
    """The ``visual.*`` image tower of a checkpoint (bare VisionTransformer dicts get the prefix)."""
    if any(k.startswith("visual.") for k in sd):
        return {k: v for k, v in sd.items() if k.startswith("visual.")}
    if "conv1.weight" in sd and any(k.startswith("transformer.resblocks.") for k in sd):
        return {f"visual.{k}": v for k, v in sd.items()}
    raise ValueError(f"{name}: not an open_clip ViT image tower (no 'visual.conv1.weight' / "
                     f"'transformer.resblocks.*' keys; found e.g. {sorted(sd)[:4]})")


def infer_vit_config(sd: Mapping[str, torch.Tensor], head_width: int = 64) -> dict:
    """An open_clip model config whose image tower fits the ``visual.*`` state dict ``sd``.

    Width, patch size, image size, depth, MLP ratio and output dimension are read
    from the shapes; the attention head width cannot be (default 64, as in CLIP).
    """
    try:
        conv = sd["visual.conv1.weight"]
        pos = sd["visual.positional_embedding"]
    except KeyError as e:
        raise ValueError(f"cannot infer the architecture: the checkpoint has no {e.args[0]!r}") from None
    width, patch = int(conv.shape[0]), int(conv.shape[-1])
    grid = int(round(math.sqrt(pos.shape[0] - 1)))
    if grid * grid != pos.shape[0] - 1:
        raise ValueError(f"cannot infer the image size: {pos.shape[0]} positional embeddings is not 1 + a square")
    layers = len({vit.block_index(k) for k in sd if vit.block_index(k) is not None})
    if layers == 0:
        raise ValueError("cannot infer the architecture: no transformer blocks (visual.transformer.resblocks.*)")
    fc = sd.get("visual.transformer.resblocks.0.mlp.c_fc.weight")
    mlp_ratio = float(fc.shape[0]) / width if fc is not None else 4.0
    embed = int(sd["visual.proj"].shape[1]) if "visual.proj" in sd else width
    hw = head_width if width % head_width == 0 else math.gcd(width, head_width)
    return {"embed_dim": embed, "quick_gelu": True,
            "vision_cfg": {"image_size": grid * patch, "layers": layers, "width": width, "patch_size": patch,
                           "head_width": hw, "mlp_ratio": mlp_ratio},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1}}


def _same_shapes(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(tuple(a[k].shape) == tuple(b[k].shape) for k in a)


def read_image_zip(path: str | Path, image_size: int, task: str = "task") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images of one task from a zip of class folders (``class/xxx.png`` at any depth).

    Returns (uint8 N×S×S×3, labels int64 N, class names sorted). Nothing is
    extracted to disk; every member is checked (size, type, decodability) and
    a bad one is refused with a message naming it.
    """
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
        total = sum(m.file_size for m in members)
        if total > MAX_ZIP_BYTES:
            raise ValueError(f"images of task {task!r}: {total / 1024 ** 2:.0f} MiB uncompressed, more than "
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
        classes = sorted(by_class)
        xs, ys = [], []
        for ci, c in enumerate(classes):
            if len(by_class[c]) < 2:
                raise ValueError(f"images of task {task!r}: class {c!r} has {len(by_class[c])} image; "
                                 "each class needs at least 2 (one for validation, one for test)")
            for m in by_class[c]:
                try:
                    with Image.open(io.BytesIO(zf.read(m))) as im:
                        if im.size[0] * im.size[1] > MAX_IMAGE_PIXELS:
                            raise ValueError(f"images of task {task!r}: {m.filename!r} is too large "
                                             f"({im.size[0]}×{im.size[1]} pixels)")
                        im = im.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
                        xs.append(np.asarray(im, dtype=np.uint8))
                except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
                    raise ValueError(f"images of task {task!r}: {m.filename!r} cannot be decoded as an image "
                                     f"({type(e).__name__})") from None
                ys.append(ci)
    return np.stack(xs), np.asarray(ys, dtype=np.int64), classes


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


@torch.inference_mode()
def _centroid_head(visual, x: torch.Tensor, y: np.ndarray, n_classes: int, scale: float = 30.0) -> torch.Tensor:
    """A frozen cosine head: the normalised class means of the fine-tuned model's features (× scale)."""
    feats = torch.cat([visual(x[i:i + 128]).float() for i in range(0, len(x), 128)])
    feats = torch.nn.functional.normalize(feats, dim=-1)
    yt = torch.from_numpy(y)
    return cosine_head(torch.stack([feats[yt == c].mean(0) for c in range(n_classes)]), scale)


def pool_from_upload(base_path: str | Path, task_paths: Mapping[str, str | Path],
                     image_zips: Mapping[str, str | Path] | None = None, *, arch: str = "auto",
                     demo_loader: Callable[[], Any] | None = None,
                     progress: Progress | None = None) -> tuple[TaskPool, list[str]]:
    """Build a pool from uploaded checkpoints: ``(TaskPool, notes for the user)``.

    ``task_paths``: ``{task name: checkpoint file}`` (at least two);
    ``image_zips``: ``{task name: zip of class folders}``. A task without a zip
    keeps the demo's images and head when the base has the demo's shapes and
    the task is one of the demo's tasks; otherwise it is refused. Heads of
    uploaded image sets are the class means of the task's fine-tuned features
    on its validation half. ``arch``: "auto" (infer from the shapes) or an
    open_clip model name. Raises ValueError / CheckpointError naming the problem.
    """
    report = progress or (lambda f, d: None)
    image_zips = dict(image_zips or {})
    if base_path is None:
        raise ValueError("no base (pre-trained) checkpoint uploaded")
    names = list(task_paths)
    if len(names) < 2:
        raise ValueError(f"merging needs at least two task checkpoints; got {len(names)}")
    bad = [n for n in names if not NAME_OK.match(n)]
    if bad:
        raise ValueError(f"task names must be 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit; "
                         f"not {bad}")
    unknown = sorted(set(image_zips) - set(names))
    if unknown:
        raise ValueError(f"image zip(s) for {unknown}, which are not among the task names {names} "
                         "(name each zip <task>.zip)")
    report(0.02, "reading the base checkpoint")
    base = _visual_keys(load_checkpoint(base_path), Path(base_path).name)
    base = {k: v.float() for k, v in base.items()}
    tasks = {}
    for i, n in enumerate(names):
        report(0.05 + 0.35 * i / len(names), f"reading task checkpoint {n}")
        sd = load_checkpoint(task_paths[n], base=base)          # refuses a mismatch, naming what differs
        tasks[n] = {k: sd[k].float() for k in base}

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
    notes = []
    if arch and arch != "auto":
        if open_clip.get_model_config(arch) is None:
            raise ValueError(f"unknown open_clip model {arch!r}; use 'auto' to infer the architecture")
        model_name, quick = arch, None
    elif demo is not None and _same_shapes(demo.base, base):
        model_name, quick = demo.model_name, demo.quick_gelu
        notes.append(f"architecture: the demo's ({model_name})")
    else:
        cfg = infer_vit_config(base)
        v = cfg["vision_cfg"]
        model_name = register_model_config(
            f"esm-upload-w{v['width']}-l{v['layers']}-p{v['patch_size']}-i{v['image_size']}-e{cfg['embed_dim']}", cfg)
        quick = True
        notes.append(f"architecture inferred from the weights: ViT width {v['width']}, {v['layers']} blocks, patch "
                     f"{v['patch_size']}, {v['image_size']} px, head width {v['head_width']}, QuickGELU")
    use_demo_norm = demo is not None and _same_shapes(demo.base, base)
    mean, std = (demo.mean, demo.std) if use_demo_norm else (CLIP_MEAN, CLIP_STD)
    probe_pool_ = TaskPool(name="upload", model_name=model_name, base=base, tasks={}, heads={}, class_names={},
                           mean=mean, std=std, quick_gelu=quick)
    try:
        ref = probe_pool_.build_visual(base)
    except (ValueError, RuntimeError) as e:
        raise ValueError(f"the base checkpoint does not fit the {model_name} architecture: {e}") from None
    size = getattr(ref, "image_size", None)
    if size is None:
        raise ValueError(f"{model_name} is not an open_clip ViT image tower (no image_size)")
    image_size = int(size[0] if isinstance(size, (tuple, list)) else size)

    heads, class_names, data = {}, {}, {}
    for i, n in enumerate(names):
        report(0.45 + 0.5 * i / len(names), f"images and head of {n}")
        if n in image_zips:
            x, y, classes = read_image_zip(image_zips[n], image_size, n)
            val, test = _split_val_test(y)
            data[n] = {"val": (x[val], y[val]), "test": (x[test], y[test]), "samples": (x[test][:16], y[test][:16])}
            visual = probe_pool_.build_visual(tasks[n])
            heads[n] = _centroid_head(visual, probe_pool_.normalise(x[val]), y[val], len(classes))
            class_names[n] = classes
            notes.append(f"{n}: {len(y)} images in {len(classes)} classes, split half validation / half test; "
                         "head = class means of the fine-tuned model's features")
        else:
            data[n] = demo.data[n]
            heads[n] = demo.heads[n]
            class_names[n] = demo.class_names[n]
            notes.append(f"{n}: the demo's images and head")
    pool = TaskPool(name="upload", model_name=model_name, base=base, tasks=tasks, heads=heads,
                    class_names=class_names, data=data, mean=mean, std=std, quick_gelu=quick)
    report(1.0, "pool ready")
    return pool, notes
