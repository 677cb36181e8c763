"""The state and logic behind one ESM Studio browser session (what ``app.py`` calls).

A :class:`Session` holds one user's pool (the built-in demo or uploaded
checkpoints), the expensive caches computed on first use (activation
statistics, decompositions, spectra), every merge of the session (the
comparison table), the current merge's update and the ESM++ routed model.
The module functions below are the operations of the views; each takes the
session first and an optional ``progress(fraction, description)`` callback.
Nothing here imports gradio: bad input raises :class:`ValueError` (or
:class:`~esm_core.checkpoints.CheckpointError`), and ``app.py`` turns it into
a message for the user.

Live merging: every method's update is affine in α, so the first merge with
a given set of parameters computes the update at α = 0 and α = 1 once
(:func:`esm_core.evaluate.affine_updates`); moving α afterwards only
recombines. Accuracy in the live view is measured on a fixed, seeded subset
of each task's test split (``live_per_task`` images); :func:`full_evaluation`
measures the whole split.
"""
from __future__ import annotations

import io
import json
import math
import re
import shutil
import tempfile
import threading
import time
import uuid
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from . import __version__, vit
from .evaluate import _accuracies, affine_updates, normalised
from .merge import apply_updates, resolve_device
from .methods import METHODS, get_method
from .methods.esm import esm_rank
from .pool import cosine_head

Progress = Callable[[float, str], None]

LIVE_PER_TASK = 100          # test images per task behind the live accuracy bars
ALPHA_PER_TASK = 50          # validation images per task behind the α curve
ALPHA_POINTS = 12            # at most this many α values on the curve
ALPHA_EXTRA = 6              # at most this many points added when the best α is at an end of the grid
EVAL_SEED = 0
AFFINE_CACHE = 3             # parameter sets whose α=0 / α=1 updates are kept
MAX_ZIP_FILES = 20_000
MAX_ZIP_BYTES = 512 * 1024 ** 2
MAX_IMAGE_PIXELS = 4096 * 4096
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


def _noop(frac: float, desc: str) -> None:
    pass


@dataclass
class Session:
    """Everything one browser session owns. Create with :func:`new_session`; free with :func:`close`.

    ``device_pref`` ("auto", "cpu", "cuda") is resolved at every use, so a
    session created where no GPU is visible uses one inside a GPU worker
    (Hugging Face ZeroGPU). Sessions pickle (without their lock) for the same reason.
    """
    device_pref: str
    workdir: Path
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    live_per_task: int = LIVE_PER_TASK
    alpha_per_task: int = ALPHA_PER_TASK
    pool: Any = None
    origin: str = ""                         # "demo" or "upload"
    notes: list = field(default_factory=list)  # what the user should know about the pool (refusals, choices)
    stats: Any = None                        # probe_pool result (first use)
    cache: Any = None                        # DecompositionCache shared by ESM merges and the analysis
    spectra_rows: list | None = None
    cosines: dict | None = None
    refs: dict = field(default_factory=dict)  # {split: {"zeroshot": .., "finetuned": ..}} on the capped subsets
    affine: OrderedDict = field(default_factory=OrderedDict)   # (method, params) -> (u0, slope)
    merges: list = field(default_factory=list)                # every merge of the session (comparison table)
    current: dict | None = None              # the latest merge, with its update
    curves: dict = field(default_factory=dict)                # (method, params) -> α curve
    esmpp: Any = None                        # ESM++ routed model + its build record
    routing: dict | None = None              # the latest routing run
    _visual: Any = None                      # one image tower, reloaded for every evaluation
    lock: Any = field(default_factory=threading.RLock, repr=False)
    closed: bool = False

    @property
    def device(self) -> torch.device:
        return resolve_device(self.device_pref)

    def __getstate__(self):
        d = dict(self.__dict__)
        d.pop("lock", None)
        d["_visual"] = None
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self.lock = threading.RLock()


def new_session(device: str | torch.device = "auto", *, live_per_task: int = LIVE_PER_TASK,
                alpha_per_task: int = ALPHA_PER_TASK) -> Session:
    """A fresh, empty session with its own temporary folder (for exports)."""
    resolve_device(device)                 # refuse an unusable device now
    return Session(device_pref=str(device), workdir=Path(tempfile.mkdtemp(prefix="esm-studio-session-")),
                   live_per_task=int(live_per_task), alpha_per_task=int(alpha_per_task))


def close(s: Session | None) -> None:
    """Free a session: drop its tensors and delete its files (the gr.State delete callback)."""
    if s is None or not isinstance(s, Session):
        return
    with s.lock:
        s.closed = True
        s.pool = s.stats = s.cache = s.current = s.esmpp = s.routing = s._visual = None
        s.affine.clear()
        s.merges.clear()
        shutil.rmtree(s.workdir, ignore_errors=True)


def _reset(s: Session) -> None:
    """Forget everything derived from the previous pool."""
    s.stats = s.spectra_rows = s.cosines = s.current = s.esmpp = s.routing = s._visual = None
    s.cache = None
    s.refs.clear()
    s.affine.clear()
    s.merges.clear()
    s.curves.clear()
    s.notes = []


def _need_pool(s: Session):
    if s.closed:
        raise ValueError("this session has ended: reload the page")
    if s.pool is None:
        raise ValueError("no pool is loaded yet: load the demo pool or upload checkpoints first")
    return s.pool


# ---------------------------------------------------------------- loading a pool

def load_pool(s: Session, pool, origin: str, notes: list[str] | None = None) -> dict:
    """Make ``pool`` (a TaskPool) the session's pool; returns :func:`pool_info`."""
    if len(pool.task_names) < 2:
        raise ValueError(f"merging needs at least two task models; this pool has {len(pool.task_names)}")
    with s.lock:
        _reset(s)
        s.pool, s.origin, s.notes = pool, origin, list(notes or [])
        return pool_info(s)


def load_demo(s: Session, loader: Callable[[], Any] | None = None, progress: Progress | None = None) -> dict:
    """Load the built-in demo pool (``loader`` overrides :func:`esm_core.demo.load_demo_pool`)."""
    report = progress or _noop
    report(0.1, "loading the demo pool")
    if loader is None:
        from .demo import load_demo_pool as loader
    pool = loader()
    report(1.0, "demo pool loaded")
    return load_pool(s, pool, "demo")


def pool_info(s: Session) -> dict:
    """What the Pool view shows: name, architecture, parameter count, tasks (classes, images), notes."""
    pool = _need_pool(s)
    base = pool.base
    n_params = int(sum(v.numel() for v in base.values()))
    blocks = sorted({vit.block_index(k) for k in base if vit.block_index(k) is not None})
    width = int(base["visual.conv1.weight"].shape[0]) if "visual.conv1.weight" in base else None
    tasks = []
    for t in pool.task_names:
        sizes = {split: int(len(pool.data[t][split][1])) for split in ("val", "test")
                 if t in getattr(pool, "data", {}) and split in pool.data[t]}
        tasks.append({"task": t, "classes": len(pool.class_names[t]), "val images": sizes.get("val", 0),
                      "test images": sizes.get("test", 0),
                      "example classes": ", ".join(pool.class_names[t][:4]) + (" …" if len(pool.class_names[t]) > 4 else "")})
    return {"name": pool.name, "origin": s.origin, "model": getattr(pool, "model_name", "?"),
            "parameters": n_params, "blocks": len(blocks), "width": width,
            "matrices": sum(1 for k, v in base.items() if vit.key_role(k, v) == vit.MATRIX),
            "tasks": tasks, "notes": list(s.notes), "device": str(s.device)}


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
    from PIL import Image, UnidentifiedImageError
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
def _one_per_class_first(y: np.ndarray, k: int) -> np.ndarray:
    """Indices of ``k`` items of ``y`` taken round-robin over the classes (for display samples)."""
    by_class = [list(np.flatnonzero(y == c)) for c in np.unique(y)]
    out = []
    while len(out) < min(k, len(y)):
        for ids in by_class:
            if ids and len(out) < k:
                out.append(ids.pop(0))
    return np.asarray(sorted(out), dtype=np.int64)


def _centroid_head(visual, x: torch.Tensor, y: np.ndarray, n_classes: int, scale: float = 30.0) -> torch.Tensor:
    """A frozen cosine head: the normalised class means of the fine-tuned model's features (× scale)."""
    feats = torch.cat([visual(x[i:i + 128]).float() for i in range(0, len(x), 128)])
    feats = torch.nn.functional.normalize(feats, dim=-1)
    yt = torch.from_numpy(y)
    return cosine_head(torch.stack([feats[yt == c].mean(0) for c in range(n_classes)]), scale)


def load_uploaded(s: Session, base_path: str | Path, task_paths: Mapping[str, str | Path],
                  image_zips: Mapping[str, str | Path] | None = None, *, arch: str = "auto",
                  demo_loader: Callable[[], Any] | None = None, progress: Progress | None = None) -> dict:
    """Build a pool from uploaded checkpoints and make it the session's pool.

    ``task_paths``: ``{task name: checkpoint file}`` (at least two);
    ``image_zips``: ``{task name: zip of class folders}``. A task without a zip
    keeps the demo's images and head when the base has the demo's shapes and
    the task is one of the demo's tasks; otherwise it is refused. Heads of
    uploaded image sets are the class means of the task's fine-tuned features
    on its validation half. ``arch``: "auto" (infer from the shapes) or an
    open_clip model name. Raises ValueError / CheckpointError naming the problem.
    """
    from .checkpoints import load_checkpoint
    from .pool import TaskPool, register_model_config
    report = progress or _noop
    image_zips = dict(image_zips or {})
    if base_path is None:
        raise ValueError("no base (pre-trained) checkpoint uploaded")
    names = list(task_paths)
    if len(names) < 2:
        raise ValueError(f"merging needs at least two task checkpoints; got {len(names)}")
    bad = [n for n in names if not _NAME_OK.match(n)]
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
            demo = (demo_loader or _default_demo_loader)()
        except (FileNotFoundError, ValueError):
            demo = None
        demo_ok = demo is not None and _same_shapes(demo.base, base)
        no_data = [n for n in missing_data if not (demo_ok and n in demo.task_names)]
        if no_data:
            why = ("" if demo_ok else " (the demo's images only fit checkpoints with the demo's architecture)")
            raise ValueError(f"no images for task(s) {no_data}: upload <task>.zip with one folder per class{why}")
    notes = []
    if arch and arch != "auto":
        import open_clip
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
            few = _one_per_class_first(y[test], 16)
            data[n] = {"val": (x[val], y[val]), "test": (x[test], y[test]), "samples": (x[test][few], y[test][few])}
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
    return load_pool(s, pool, "upload", notes)


def _default_demo_loader():
    from .demo import load_demo_pool
    return load_demo_pool()


# ---------------------------------------------------------------- evaluation on capped subsets

def _visual(s: Session, state_dict: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """The session's image tower with ``state_dict`` loaded (built once)."""
    dev = s.device
    if s._visual is None or next(s._visual.parameters()).device.type != dev.type:
        s._visual = s.pool.build_visual(s.pool.base, device=dev)
    s._visual.load_state_dict({k[len("visual."):] if k.startswith("visual.") else k: v
                               for k, v in state_dict.items()})
    return s._visual


def accuracies(s: Session, model, split: str = "test", per_task: int | None = None,
               tasks: list[str] | None = None, progress: Progress | None = None) -> dict[str, float]:
    """Top-1 accuracy per task on a fixed seeded subset (``per_task`` images; None: the whole split).

    ``model``: a state dict (loaded into the session's image tower) or an nn.Module.
    """
    pool = _need_pool(s)
    visual = model if isinstance(model, torch.nn.Module) else _visual(s, model)
    tasks = list(pool.task_names) if tasks is None else tasks
    return _accuracies(pool, visual, split, tasks, 256, progress, per_task=per_task, seed=EVAL_SEED)


def references(s: Session, split: str = "test", progress: Progress | None = None) -> dict:
    """Zero-shot (base) and fine-tuned accuracies on the same capped subset as the live view; cached."""
    pool = _need_pool(s)
    with s.lock:
        if split not in s.refs:
            n = s.live_per_task if split == "test" else s.alpha_per_task
            report = progress or _noop
            zs = accuracies(s, pool.base, split, n, progress=lambda f, d: report(0.5 * f, f"zero-shot: {d}"))
            ft = {}
            for i, t in enumerate(pool.task_names):
                ft[t] = accuracies(s, pool.tasks[t], split, n, [t])[t]
                report(0.5 + 0.5 * (i + 1) / len(pool.task_names), f"fine-tuned model of {t}")
            s.refs[split] = {"zeroshot": zs, "finetuned": ft}
        return s.refs[split]


# ---------------------------------------------------------------- statistics and caches

def ensure_stats(s: Session, n: int = 32, seed: int = 0, progress: Progress | None = None):
    """Activation statistics of every task (probe inside each fine-tuned model on its proxy samples); cached."""
    pool = _need_pool(s)
    with s.lock:
        if s.stats is None or s.stats.get("n") != n or s.stats.get("seed") != seed:
            from .probe import probe_pool
            s.stats = probe_pool(pool, n=n, seed=seed, device=s.device,
                                 progress=(lambda f, d: progress(f, f"activation statistics: {d}")) if progress else None)
        return s.stats


def ensure_cache(s: Session):
    if s.cache is None:
        from .methods.esm import new_cache
        s.cache = new_cache()
    return s.cache


# ---------------------------------------------------------------- merging

def method_choices() -> list[tuple[str, str]]:
    """(label, name) of every registered method, for a dropdown."""
    return [(f"{m.title} ({m.name})", m.name) for m in METHODS.values()]


def _frozen(params: Mapping[str, Any]) -> tuple:
    return tuple(sorted((k, v) for k, v in params.items() if k != "alpha"))


def _affine(s: Session, method: str, params: Mapping[str, Any], progress: Progress | None):
    """(U0, slope) of ``method`` with ``params`` (α excluded), from the per-session cache or computed.

    Every method's update is affine in α: ``U(α) = U0 + α · slope``, measured
    from two merges (α = 0 and α = a1). The pool's checkpoints were checked
    when it was loaded, so the merges skip that check.
    """
    key = (method, _frozen(params))
    if key in s.affine:
        s.affine.move_to_end(key)
        return s.affine[key]
    report = progress or _noop
    stats = cache = None
    if get_method(method).needs_stats:
        stats = ensure_stats(s, progress=lambda f, d: report(0.4 * f, d))
        cache = ensure_cache(s)
    u0, slope, _ = affine_updates(s.pool, method, params, stats=stats, cache=cache, device=s.device, check=False,
                                  progress=lambda f, d: report(0.4 + 0.6 * f, d))
    s.affine[key] = (u0, slope)
    while len(s.affine) > AFFINE_CACHE:
        s.affine.popitem(last=False)
    return u0, slope


def updates_at(u0: Mapping[str, torch.Tensor], slope: Mapping[str, torch.Tensor], alpha: float) -> dict:
    """The method's update at α: ``U0 + α · slope``."""
    return {k: u0[k] + alpha * slope[k] for k in u0}


def merge(s: Session, method: str, params: Mapping[str, Any] | None = None, progress: Progress | None = None) -> dict:
    """Merge the session's pool with ``method`` and evaluate it on the live subset.

    Adds a row to the comparison table and makes this the current merge.
    Returns the record: ``{"id", "method", "title", "params", "accs", "summary",
    "seconds", "config"}`` (the update itself is kept in ``s.current``).
    """
    pool = _need_pool(s)
    m = get_method(method)
    p = m.resolve(dict(params or {}))            # ValueError naming a bad parameter
    report = progress or _noop
    with s.lock:
        t0 = time.perf_counter()
        refs = references(s, "test", progress=(lambda f, d: report(0.1 * f, d)) if progress else None)
        u0, slope = _affine(s, method, p, (lambda f, d: report(0.1 + 0.8 * f, d)) if progress else None)
        ups = updates_at(u0, slope, float(p["alpha"]))
        report(0.9, "evaluating the merged model")
        sd = apply_updates(pool.base, ups)
        accs = accuracies(s, sd, "test", s.live_per_task)
        summary = normalised(accs, refs["finetuned"])
        rec = {"id": len(s.merges) + 1, "method": method, "title": m.title, "params": p, "accs": accs,
               "summary": summary, "seconds": round(time.perf_counter() - t0, 3),
               "config": merge_config(s, method, p)}
        s.merges.append(rec)
        s.current = {**rec, "updates": ups}
        report(1.0, f"{m.title}: mean normalised accuracy {100 * summary['mean_norm']:.1f} %")
        return rec


def merge_config(s: Session, method: str, params: Mapping[str, Any]) -> dict:
    """Everything needed to reproduce a merge: method, parameters, pool, proxy sample ids, versions."""
    pool = s.pool
    cfg = {"esm_studio": __version__, "method": method, "params": dict(params), "pool": pool.name,
           "origin": s.origin, "model": getattr(pool, "model_name", None), "tasks": list(pool.task_names),
           "evaluation": {"split": "test", "images_per_task": s.live_per_task, "subset_seed": EVAL_SEED}}
    if get_method(method).needs_stats and s.stats is not None:
        cfg["proxy"] = {"n": s.stats.get("n"), "seed": s.stats.get("seed"), "ids": s.stats.get("proxy_ids")}
    return cfg


def comparison_rows(s: Session) -> list[dict]:
    """One row per merge of the session: id, method, α, other parameters changed, means, per-task accuracy (%)."""
    rows = []
    for r in s.merges:
        m = get_method(r["method"])
        changed = {p.name: r["params"][p.name] for p in m.params
                   if p.name != "alpha" and r["params"][p.name] != p.default}
        row = {"#": r["id"], "method": r["title"], "α": round(float(r["params"]["alpha"]), 3),
               "changed parameters": ", ".join(f"{k}={v}" for k, v in changed.items()) or "defaults",
               "mean abs %": round(100 * r["summary"]["mean_abs"], 2),
               "mean norm %": round(100 * r["summary"]["mean_norm"], 2)}
        for t, v in r["summary"]["tasks"].items():
            row[f"{t} %"] = round(100 * v["abs"], 1)
        rows.append(row)
    return rows


def full_evaluation(s: Session, progress: Progress | None = None) -> dict:
    """The current merge on the whole test split (not the capped live subset), with full-split references."""
    pool = _need_pool(s)
    if s.current is None:
        raise ValueError("merge first: there is no current merge to evaluate")
    report = progress or _noop
    with s.lock:
        sd = apply_updates(pool.base, s.current["updates"])
        accs = accuracies(s, sd, "test", None, progress=lambda f, d: report(0.4 * f, d))
        zs = accuracies(s, pool.base, "test", None, progress=lambda f, d: report(0.4 + 0.3 * f, f"zero-shot {d}"))
        ft = {}
        for i, t in enumerate(pool.task_names):
            ft[t] = accuracies(s, pool.tasks[t], "test", None, [t])[t]
            report(0.7 + 0.3 * (i + 1) / len(pool.task_names), f"fine-tuned {t}")
        return {"summary": normalised(accs, ft), "refs": {"zeroshot": zs, "finetuned": ft}}


def alpha_curve(s: Session, method: str, params: Mapping[str, Any] | None = None,
                progress: Progress | None = None) -> tuple[float, list[tuple[float, float]]]:
    """Mean normalised accuracy on the validation subset over the method's α grid (≤ ALPHA_POINTS values),
    extended below / above while the best α is the grid's first / last point (within α's bounds), so that the
    optimum is interior or at a bound of α.

    Returns ``(best α, [(α, mean normalised accuracy)])`` sorted by α.
    """
    pool = _need_pool(s)
    m = get_method(method)
    p = m.resolve(dict(params or {}))
    report = progress or _noop
    with s.lock:
        refs = references(s, "val", progress=lambda f, d: report(0.1 * f, f"references (val): {d}"))
        u0, slope = _affine(s, method, p, lambda f, d: report(0.1 + 0.2 * f, d))
        lo, hi, n = m.alpha_grid
        grid = list(np.linspace(lo, hi, n)[1:])
        if len(grid) > ALPHA_POINTS:
            step = math.ceil(len(grid) / ALPHA_POINTS)
            grid = grid[step - 1::step]

        def score(a: float) -> float:
            sd = apply_updates(pool.base, updates_at(u0, slope, a))
            return normalised(accuracies(s, sd, "val", s.alpha_per_task), refs["finetuned"])["mean_norm"]

        curve = []
        for i, a in enumerate(grid):
            curve.append((float(a), score(float(a))))
            report(0.3 + 0.6 * (i + 1) / len(grid), f"α = {a:.2f}: {100 * curve[-1][1]:.1f} % normalised (val)")
        a_param = next(q for q in m.params if q.name == "alpha")
        for a in _extend_alpha(curve, score, a_param.min, a_param.max):
            report(0.95, f"α = {a:.2f}: extending the grid (the best α was at its end)")
        best = max(curve, key=lambda e: e[1])[0]
        s.curves[(method, _frozen(p))] = (best, curve)
        return best, curve


def _extend_alpha(curve: list, score: Callable[[float], float], a_min: float | None, a_max: float | None,
                  max_extra: int = ALPHA_EXTRA) -> list[float]:
    """Add points to ``curve`` (in place, kept sorted) while its best α is its first / last point: halfway to α's
    lower bound below (the bound itself once close), one grid step above (up to α's upper bound)."""
    added = []
    step = (curve[-1][0] - curve[0][0]) / max(len(curve) - 1, 1) if len(curve) > 1 else 0.1
    a_min = 0.0 if a_min is None else float(a_min)
    a_max = math.inf if a_max is None else float(a_max)
    while len(added) < max_extra:
        curve.sort()
        i = max(range(len(curve)), key=lambda j: curve[j][1])
        if i == 0 and curve[0][0] > a_min + 1e-9:
            a0 = curve[0][0]
            a = a_min if a0 - a_min <= step / 4 else a_min + (a0 - a_min) / 2
        elif i == len(curve) - 1 and curve[-1][0] < a_max - 1e-9:
            a = min(a_max, curve[-1][0] + step)
        else:
            break
        curve.append((float(a), score(float(a))))
        added.append(float(a))
    curve.sort()
    return added


def sample_sizes(s: Session, split: str = "test", per_task: int | None = None) -> dict[str, int]:
    """Images per task behind a capped accuracy (``per_task``, default: the live subset of ``split``)."""
    pool = _need_pool(s)
    if per_task is None:
        per_task = s.live_per_task if split == "test" else s.alpha_per_task
    return {t: min(int(per_task), len(pool.images(t, split)[1])) for t in pool.task_names}


def binomial_halfwidth(p: float, n: int, z: float = 1.96) -> float:
    """Half-width of the 95 % Wilson interval of an accuracy ``p`` measured on ``n`` images."""
    if n <= 0:
        return float("nan")
    return z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)


def accuracy_interval(summary: Mapping, sizes: Mapping[str, int], finetuned: Mapping[str, float]) -> dict:
    """95 % half-widths of a merge's live accuracies (binomial, tasks independent): per task, of the mean absolute
    and of the mean normalised accuracy (fine-tuned references taken as exact)."""
    tasks = list(summary["tasks"])
    hw = {t: binomial_halfwidth(float(summary["tasks"][t]["abs"]), int(sizes[t])) for t in tasks}
    T = max(len(tasks), 1)
    mean_abs = math.sqrt(sum(h * h for h in hw.values())) / T
    mean_norm = math.sqrt(sum((hw[t] / finetuned[t]) ** 2 for t in tasks if finetuned.get(t))) / T
    return {"n": {t: int(sizes[t]) for t in tasks}, "tasks": hw, "mean_abs": mean_abs, "mean_norm": mean_norm}


# ---------------------------------------------------------------- spectra and interference

def esd_keys(s: Session) -> list[str]:
    """The layers with an ESD (attn.in_proj, mlp.c_fc, mlp.c_proj of every block)."""
    return vit.esd_keys(list(_need_pool(s).base))


def spectra(s: Session, progress: Progress | None = None) -> list[dict]:
    """Spectra rows of every ESD layer and task (:func:`esm_core.analysis.spectra`); computed once per pool."""
    from . import analysis
    pool = _need_pool(s)
    report = progress or _noop
    with s.lock:
        if s.spectra_rows is None:
            stats = ensure_stats(s, progress=lambda f, d: report(0.3 * f, d))
            cache = ensure_cache(s)
            rows, keys = [], esd_keys(s)
            for i, key in enumerate(keys):
                rows += analysis.spectra(pool.base, pool.tasks, stats, keys=[key], cache=cache)
                report(0.3 + 0.7 * (i + 1) / len(keys), f"decomposing {key}")
            s.spectra_rows = rows
        return s.spectra_rows


def spectra_at(s: Session, rank_fraction: float = 1.0, progress: Progress | None = None) -> list[dict]:
    """Spectra rows with ``k``, ``esd_kept_at_k`` and ``svd_kept_at_k`` re-read at ``rank_fraction`` of the default rank."""
    rows = spectra(s, progress)
    T = len(s.pool.task_names)
    out = []
    for r in rows:
        d_out = int(s.pool.base[r["key"]].shape[0])
        k = esm_rank(d_out, T, rank_fraction=rank_fraction)
        kk = min(k, len(r["esd_energy_kept"])) - 1
        out.append({**r, "k": k, "esd_kept_at_k": r["esd_energy_kept"][kk], "svd_kept_at_k": r["svd_energy_kept"][kk]})
    return out


def overlap(s: Session, key: str, rank_fraction: float = 1.0, progress: Progress | None = None) -> dict:
    """Task × task overlap of the rank-k essential subspaces of one layer."""
    from . import analysis
    pool = _need_pool(s)
    if key not in pool.base:
        raise ValueError(f"no layer {key!r} in this model")
    with s.lock:
        stats = ensure_stats(s, progress=progress)
        k = esm_rank(int(pool.base[key].shape[0]), len(pool.task_names), rank_fraction=rank_fraction)
        return analysis.subspace_overlap(pool.base, pool.tasks, stats, keys=[key], k=k, cache=ensure_cache(s))


def cosines(s: Session) -> dict:
    """Task-vector cosines per layer and over the whole model (cached)."""
    from . import analysis
    pool = _need_pool(s)
    with s.lock:
        if s.cosines is None:
            s.cosines = analysis.task_cosines(pool.base, pool.tasks)
        return s.cosines


def alignment(s: Session) -> dict | None:
    """Subspace alignment ratio of every task against the current merge (None before the first merge)."""
    from . import analysis
    pool = _need_pool(s)
    if s.current is None:
        return None
    with s.lock:
        ups = s.current["updates"]
        keys = [k for k in vit.layer_types_of(list(pool.base)) if k in ups]
        return analysis.alignment(pool.base, pool.tasks, merged_updates=ups, keys=keys)


# ---------------------------------------------------------------- export

def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "merge"


def export_merged(s: Session) -> Path:
    """The current merged model as .safetensors, its merge config in the metadata."""
    from .checkpoints import save_safetensors
    pool = _need_pool(s)
    if s.current is None:
        raise ValueError("merge first: there is no merged model to export")
    with s.lock:
        cur = s.current
        sd = apply_updates(pool.base, cur["updates"])
        name = _safe_name(f"{pool.name}-{cur['method']}-alpha{float(cur['params']['alpha']):.2f}-{cur['id']}")
        return save_safetensors(sd, s.workdir / f"{name}.safetensors", {**cur["config"], "summary": cur["summary"]})


def export_config(s: Session) -> Path:
    """The current merge's config (and its live accuracies) as JSON."""
    _need_pool(s)
    if s.current is None:
        raise ValueError("merge first: there is no merge config to export")
    cur = s.current
    p = s.workdir / f"{_safe_name(cur['method'])}-{cur['id']}-config.json"
    p.write_text(json.dumps({**cur["config"], "summary": cur["summary"], "comparison": comparison_rows(s)}, indent=2,
                            default=str) + "\n")
    return p


# ---------------------------------------------------------------- pool display

def sample_images(s: Session, k: int = 4, size: int = 96) -> list[tuple[np.ndarray, str]]:
    """``k`` images of every task for display, of as many different classes as the task's samples have,
    upscaled (nearest) to about ``size`` pixels, captioned with the task and class."""
    pool = _need_pool(s)
    out = []
    for t in pool.task_names:
        try:
            _, y, raw = pool.samples(t, max(64, k))
        except ValueError:
            continue
        y = y.tolist()
        first = list(dict.fromkeys(y))                      # classes in order of first appearance
        picks = [y.index(c) for c in first[:k]]
        picks += [i for i in range(len(y)) if i not in picks][:k - len(picks)]
        for i in picks:
            img = np.asarray(raw[i])
            f = max(1, size // max(img.shape[0], 1))
            img = np.repeat(np.repeat(img, f, axis=0), f, axis=1)
            out.append((img, f"{t}: {pool.class_names[t][int(y[i])]}"))
    return out


# ---------------------------------------------------------------- ESM++ routing

def _routing_module():
    try:
        from . import routing
    except ModuleNotFoundError as e:
        if e.name != "esm_core.routing":
            raise
        raise ValueError("ESM++ routing is not available in this build (esm_core.routing is missing)") from None
    return routing


def esmpp_model(s: Session, rank: int = 32, progress: Progress | None = None):
    """The ESM++ routed model of the session's pool (built on first use, rebuilt when the recipe changes).

    Its static part is the session's latest ESM merge (α and parameters), or
    ESM with its defaults when the session has not merged with ESM yet.
    """
    routing = _routing_module()
    pool = _need_pool(s)
    last = next((r for r in reversed(s.merges) if r["method"] == "esm"), None)
    params = dict(last["params"]) if last else get_method("esm").resolve({})
    alpha = float(params.pop("alpha"))
    recipe = (int(rank), alpha, _frozen(params))
    with s.lock:
        if s.esmpp is None or s.esmpp["recipe"] != recipe:
            report = progress or _noop
            stats = ensure_stats(s, progress=lambda f, d: report(0.3 * f, d))
            model = routing.build_esmpp(pool, stats, rank=int(rank), alpha=alpha, esm_params=params,
                                        cache=ensure_cache(s), device=s.device,
                                        progress=lambda f, d: report(0.3 + 0.7 * f, d))
            s.esmpp = {"recipe": recipe, "model": model, "rank": int(rank), "alpha": alpha,
                       "from_merge": last["id"] if last else None, "accs": None}
        return s.esmpp


def _image_to_input(pool, image) -> torch.Tensor:
    """An uploaded image (H×W, H×W×3 or H×W×4 uint8) → one normalised input for the pool's model."""
    from PIL import Image
    arr = np.asarray(image)
    if arr.ndim not in (2, 3) or arr.size == 0:
        raise ValueError(f"the uploaded image has an unexpected shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    x_ref, _ = pool.images(pool.task_names[0], "val")
    size = int(x_ref.shape[-1])
    grey = pool.data[pool.task_names[0]]["val"][0].ndim == 3      # the pool's own images are grey
    im = Image.fromarray(arr).convert("L" if grey else "RGB").resize((size, size), Image.BILINEAR)
    return pool.normalise(np.asarray(im, dtype=np.uint8)[None])


@torch.inference_mode()
def _routed_accuracies(s: Session, model) -> dict:
    """Static ESM ("base"), routed and oracle accuracy on the live test subset (cached per ESM++ build)."""
    out = {}
    for mode in ("base", "route", "oracle"):
        out[mode] = {}
        for t in s.pool.task_names:
            with model.using(mode=mode, true_task=t):
                out[mode][t] = accuracies(s, model, "test", s.live_per_task, [t])[t]
    return out


def run_routing(s: Session, rank: int = 32, per_task: int = 6, image=None, umap: bool = False,
                progress: Progress | None = None) -> dict:
    """Route ``per_task`` sample images of every task (and the uploaded ``image``, if any) through ESM++.

    Returns ``{"tasks", "layers", "sample_labels", "true" (task index or −1), "choices" (N × L expert index),
    "cosines" (N × L × T), "layer_accuracy" (L), "routed_accuracy" / "oracle_accuracy" / "static_accuracy"
    ({task: acc} on the live test subset), "embedding", "summary_md"}``; also kept in ``s.routing``.
    The map of the samples is PCA unless ``umap`` (UMAP compiles on its first use in a process: tens of seconds).
    """
    routing = _routing_module()
    pool = _need_pool(s)
    if not 1 <= int(per_task) <= 64:
        raise ValueError(f"samples per task must be between 1 and 64, got {per_task}")
    report = progress or _noop
    with s.lock:
        built = esmpp_model(s, rank, progress=lambda f, d: report(0.6 * f, d))
        model = built["model"]
        labels, xs, trues = [], [], []
        for t in pool.task_names:
            x, y, _ = pool.samples(t, int(per_task))
            xs.append((x, t))
            labels += [f"{t} #{i} ({pool.class_names[t][int(c)]})" for i, c in enumerate(y.tolist())]
        if image is not None:
            xs.append((_image_to_input(pool, image), None))
            labels.append("your image")
        dev = next(model.parameters()).device
        report(0.65, "routing the samples")
        with torch.inference_mode(), model.logging(keep_inputs=True) as log:
            for x, t in xs:
                model(x.to(dev), true_task=t)
        if built["accs"] is None:
            report(0.75, "routed vs oracle accuracy")
            built["accs"] = _routed_accuracies(s, model)
        accs = built["accs"]
        li = len(log.keys) - 1                      # the deepest routed layer: tasks are most separated there
        if umap:
            report(0.85, "UMAP of the samples (the first use compiles UMAP: this can take a minute)")
        emb = routing.routing_embedding(log, li, model.experts, seed=0, method="umap" if umap else "pca")
        known = log.true >= 0
        layer_acc = routing.routing_accuracy(log).tolist() if bool(known.any()) else None
        T = len(log.tasks)
        mean_norm = {m: float(np.mean([accs[m][t] / max(s.refs["test"]["finetuned"][t], 1e-12)
                                       for t in log.tasks])) for m in accs} if "test" in s.refs else None
        lines = [f"**ESM++** with rank-{built['rank']} experts on {len(log.keys)} routed layers, static part: ESM at "
                 f"α = {built['alpha']:.2f}" + (f" (merge #{built['from_merge']})" if built["from_merge"] else
                                                " (defaults; merge with ESM in tab 4 to change it)") + "."]
        if layer_acc is not None:
            lines.append(f"Routing picked the sample's own task in **{100 * float(np.mean(layer_acc)):.0f} %** of "
                         f"the decisions ({int(known.sum())} samples × {len(log.keys)} layers).")
        if mean_norm:
            lines.append(f"Mean normalised accuracy on ≤ {s.live_per_task} test images per task: static ESM "
                         f"{100 * mean_norm['base']:.1f} %, ESM++ routed {100 * mean_norm['route']:.1f} %, "
                         f"oracle routing {100 * mean_norm['oracle']:.1f} %.")
        if image is not None:
            top, share = routing.majority_task(log)
            lines.append(f"**Your image** went to the **{log.tasks[int(top[-1])]}** expert in "
                         f"{100 * float(share[-1]):.0f} % of the layers.")
        storage = model.experts.storage()
        lines.append(f"The experts add {storage['per_task']:,} parameters per task "
                     f"({100 * (storage['share_per_task'] or 0):.1f} % of the model).")
        true_names = [n if n is not None else "your image" for n in emb["true"]]
        run = {"tasks": list(log.tasks), "layers": list(log.keys), "sample_labels": labels,
               "true": log.true.tolist(), "choices": log.chosen.numpy(), "cosines": log.cos.numpy(),
               "layer_accuracy": layer_acc, "routed_accuracy": accs["route"], "oracle_accuracy": accs["oracle"],
               "static_accuracy": accs["base"],
               "embedding": {"points": emb["points"], "labels": true_names, "proto_points": emb["prototype_points"],
                             "method": emb["method"],
                             "proto_labels": list(emb["tasks"]),
                             "title": f"{emb['note']}, layer {vit.short_key(str(emb['layer']))}; "
                                      "★ = task prototypes"},
               "summary_md": "\n\n".join(lines), "n_tasks": T}
        s.routing = run
        report(1.0, "routing done")
        return run


def read_export_config(path: str | Path) -> dict | None:
    """The recipe stored with an exported file (safetensors metadata, or the JSON file itself)."""
    p = Path(path)
    if p.suffix == ".json":
        return json.loads(p.read_text())
    from .checkpoints import read_config
    return read_config(p)


def export_esmpp(s: Session, rank: int = 32, progress: Progress | None = None) -> Path:
    """The ESM++ bundle (static ESM merge + expert factors + prototypes) as one .safetensors."""
    routing = _routing_module()
    pool = _need_pool(s)
    with s.lock:
        built = esmpp_model(s, rank, progress)
        m = built["model"]
        name = _safe_name(f"{pool.name}-esmpp-r{built['rank']}-alpha{built['alpha']:.2f}")
        return routing.save_esmpp(s.workdir / f"{name}.safetensors", m.merged_sd, m.experts, m.config)
