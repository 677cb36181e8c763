"""HFViTTaskPool: a pool of Hugging Face ViT image classifiers (``ViTForImageClassification``) fine-tuned from
one base (``ViTModel`` or ``ViTForImageClassification``), each task with its own classifier as its head.

The pool protocol (:mod:`esm_core.pools.taskpool`'s, modality "image"): inputs are normalised images as the
task's ``preprocessor_config.json`` says (:func:`esm_core.models.hf_vit.check_preprocessor`); the model is
:func:`esm_core.models.hf_vit.build_model` (features = the ``[CLS]`` token after the final layernorm); the head
of task t is t's own classifier: ``logits = f @ Wᵀ + b``, so the pool's logits of task t on t's own
checkpoint are t's Hugging Face logits. The state dicts (``base``, ``tasks``) hold the feature module's keys
only (the classifiers are the heads; a ``ViTModel``'s pooler is dropped): every task has the base's keys and
shapes, checked before anything is built.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

from .. import settings
from ..adapters import is_adapter_path
from ..checkpoints import check_compatible, check_finite, load_checkpoint, save_safetensors
from ..errors import CheckpointError
from ..lazy import LazyCheckpoint
from ..models import hf_vit
from ..progress import Progress, reporter
from . import upload, upload_text
from .heads import HeadSource
from .taskpool import proxy_ids, subset_pool

SPLITS = ("val", "test", "samples")


@dataclass
class HFViTTaskPool:
    """Base + fine-tuned ViT feature modules, each task's classifier and (optionally) its images.

    ``model_config``: the checked ``config.json`` (:func:`~esm_core.models.hf_vit.check_config`);
    ``preprocess``: the checked preprocessor (size, mean, std, rescale, resample); ``heads[task] = {"weight":
    C×d, "bias": C}``; ``data[task][split] = (uint8 N×S×S×3 at the model's size, labels int64 N)``.
    """
    name: str
    model_config: dict
    preprocess: dict
    base: dict[str, torch.Tensor]
    tasks: dict[str, dict[str, torch.Tensor]]
    heads: dict[str, dict[str, torch.Tensor]]
    class_names: dict[str, list[str]]
    data: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict, repr=False)
    family: str = hf_vit.NAME
    modality: str = hf_vit.MODALITY

    def __post_init__(self):
        for t in self.tasks:
            if t not in self.heads:
                raise ValueError(f"pool {self.name!r}: task {t!r} has no classifier")
            if t not in self.class_names:
                raise ValueError(f"pool {self.name!r}: task {t!r} has no class names")
            if self.heads[t]["weight"].shape[0] != len(self.class_names[t]):
                raise ValueError(f"pool {self.name!r}: the classifier of {t!r} has {self.heads[t]['weight'].shape[0]}"
                                 f" rows but {len(self.class_names[t])} class names")

    @property
    def family_module(self):
        return hf_vit

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    @property
    def model_name(self) -> str:
        c = self.model_config
        return self.meta.get("model") or (f"ViT ({c['num_hidden_layers']} layers, width {c['hidden_size']}, "
                                          f"{c['image_size']} px / {c['patch_size']})")

    def _check_task(self, task: str) -> None:
        if task not in self.tasks:
            raise ValueError(f"pool {self.name!r} has no task {task!r}; tasks: {self.task_names}")

    # -- models ---------------------------------------------------------------

    def build_model(self, state_dict: Mapping[str, torch.Tensor], device: str | torch.device = "cpu",
                    share: bool = False) -> torch.nn.Module:
        """The feature module holding ``state_dict`` (shapes checked against the pool's config first)."""
        return hf_vit.build_model(state_dict, self.model_config, device=device, share=share)

    def prepare(self, module: torch.nn.Module, task: str | None) -> None:
        """Nothing to put in: biases are merged (methods §6), each task's classifier is its head."""
        if task is not None:
            self._check_task(task)

    # -- data -----------------------------------------------------------------

    def _raw(self, task: str, split: str) -> tuple[np.ndarray, np.ndarray]:
        self._check_task(task)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        try:
            return self.data[task][split]
        except KeyError:
            raise ValueError(f"pool {self.name!r} carries no {split!r} images for task {task!r}") from None

    def encode(self, raw, check: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """uint8 images (N×H×W[×3]) → the model's inputs: resized to the model's size when they are not at it,
        rescaled and normalised as the preprocessor says."""
        p = self.preprocess
        a = np.asarray(raw) if not isinstance(raw, (list, tuple)) else None
        if a is None or a.ndim not in (3, 4) or a.shape[1:3] != (p["size"], p["size"]):
            a = hf_vit.resize_images(list(raw), p)
        return hf_vit.normalise_images(a, p["mean"], p["std"], p["rescale"])

    def inputs(self, task: str, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
        """(x float N×3×S×S, y LongTensor N) of one task's split; cached."""
        key = ("inputs", task, split)
        if key not in self.cache:
            raw, y = self._raw(task, split)
            self.cache[key] = (self.encode(raw), torch.from_numpy(np.asarray(y, dtype=np.int64)))
        return self.cache[key]

    def proxy(self, task: str, n: int = hf_vit.PROXY_SAMPLES, seed: int = 0) -> tuple[torch.Tensor, list[int]]:
        """``n`` validation images of ``task`` drawn with ``seed`` (methods §5.1)."""
        x, _ = self.inputs(task, "val")
        ids = proxy_ids(len(x), n, seed)
        return x[ids], ids

    def logits(self, task: str, features: torch.Tensor) -> torch.Tensor:
        """The task's own classifier: ``f @ Wᵀ + b``."""
        self._check_task(task)
        h = self.heads[task]
        return features @ h["weight"].to(features.device, features.dtype).T + h["bias"].to(features.device,
                                                                                             features.dtype)

    def samples(self, task: str, k: int = 8) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """A few images for display: (x normalised, y, raw uint8 k×S×S×3)."""
        self._check_task(task)
        split = "samples" if "samples" in self.data.get(task, {}) else "test"
        raw, y = self._raw(task, split)
        raw, y = raw[:k], np.asarray(y[:k], dtype=np.int64)
        return self.encode(raw), torch.from_numpy(y), raw

    def subset(self, tasks: list[str]) -> "HFViTTaskPool":
        return subset_pool(self, tasks)


# ---------------------------------------------------------------- building a pool

def _check_images(task: str, split: str, item, size: int, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise ValueError(f"images of task {task!r} ({split}): expected (images, labels)")
    x, y = np.asarray(item[0]), np.asarray(item[1])
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (size, size, 3):
        raise ValueError(f"images of task {task!r} ({split}): expected uint8 N×{size}×{size}×3 (the model's "
                         f"size), got {x.dtype} {tuple(x.shape)}")
    if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels of task {task!r} ({split}): expected {x.shape[0]} integers, got {y.dtype} "
                         f"{tuple(y.shape)}")
    if len(y) and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"labels of task {task!r} ({split}) must lie in [0, {n_classes}) (its classifier's "
                         f"classes), got {int(y.min())} … {int(y.max())}")
    return x, y.astype(np.int64)


def build_hf_vit_pool(name: str, config: Mapping, base: Mapping[str, torch.Tensor],
                      tasks: Mapping[str, Mapping[str, torch.Tensor]], *,
                      class_names: Mapping[str, list[str]] | None = None,
                      data: Mapping[str, Mapping[str, tuple]] | None = None,
                      preprocessor: Mapping | None = None, meta: Mapping | None = None,
                      max_params: int | None = None) -> HFViTTaskPool:
    """A pool from a ``config.json`` dict, the base's and each task's state dicts (any layout
    :func:`~esm_core.models.hf_vit.convert` reads) and per-task images at the model's size.

    Checked before anything is built: the config (bounded, :func:`~esm_core.models.hf_vit.check_config`), the
    preprocessor, every checkpoint's keys and shapes against the config (so every task fits the base), each
    classifier (C×hidden weight, C bias, finite), the class names (one per classifier row; default ``id2label``
    when it has as many entries, else "0" … "C−1") and the images (uint8 at the model's size, labels in range)."""
    cfg = hf_vit.check_config(config)
    pre = hf_vit.check_preprocessor(preprocessor, cfg["image_size"])
    if not tasks:
        raise ValueError("a pool needs at least one task checkpoint")
    base_sd = hf_vit.encoder_state(hf_vit.convert(base, "base"))
    hf_vit.check_shapes(base_sd, cfg, max_params)
    task_sds, heads, names = {}, {}, {}
    for t, sd in tasks.items():
        label = f"task {t!r}"
        enc, head = hf_vit.split_head(hf_vit.convert(sd, label), label, cfg["hidden_size"])
        try:
            hf_vit.check_shapes(enc, cfg, max_params)
        except ValueError as e:
            raise ValueError(f"{label}: {e}") from None
        C = head["weight"].shape[0]
        given = (class_names or {}).get(t)
        if given is None:
            lab = cfg.get("id2label") or {}
            given = [lab.get(str(i), str(i)) for i in range(C)] if len(lab) == C else [str(i) for i in range(C)]
        if len(given) != C:
            raise ValueError(f"{label}: its classifier has {C} classes but {len(given)} class names were given "
                             f"({list(given)[:5]}…)")
        task_sds[t], heads[t], names[t] = enc, head, [str(c) for c in given]
    images = {}
    for t, splits in (data or {}).items():
        if t not in task_sds:
            raise ValueError(f"images given for {t!r}, which is not a task of the pool ({list(task_sds)})")
        images[t] = {s: _check_images(t, s, v, cfg["image_size"], len(names[t])) for s, v in splits.items()
                     if s in SPLITS}
    meta = {**dict(meta or {}), "head_sources": {t: HeadSource.OWN.value for t in task_sds}}
    return HFViTTaskPool(name=name, model_config=cfg, preprocess=pre, base=base_sd, tasks=task_sds, heads=heads,
                         class_names=names, data=images, meta=meta)


# ---------------------------------------------------------------- a pool from uploaded files

def _read_task(path, base: Mapping[str, torch.Tensor], base_name: str, notes: list[str]) -> dict:
    """A task checkpoint: a file (any layout :func:`~esm_core.models.hf_vit.convert` reads), or a PEFT LoRA
    adapter (folder or .zip: ``W0 + s·BA`` on the base, its ``modules_to_save`` — the classifier — as the task's
    own tensors). An adapter names the modules as the transformers that made it did: the installed version's
    names are tried first, then the Hub file layout's (transformers 4)."""
    if not is_adapter_path(path):
        return load_checkpoint(path)
    try:
        return load_checkpoint(path, base=hf_vit.installed_names(base), base_name=base_name, notes=notes)
    except CheckpointError as e:
        if "not in the base" not in str(e) or hf_vit.installed_names(base).keys() == base.keys():
            raise
    return load_checkpoint(path, base=base, base_name=base_name, notes=notes)


def is_hf_vit_config(config) -> bool:
    """True for an uploaded ``config.json`` of this family (what the Pool view asks before choosing the path)."""
    return isinstance(config, Mapping) and config.get("model_type") == "vit"


def hf_vit_pool_from_upload(base_path, task_paths: Mapping[str, str | Path], image_zips: Mapping[str, str | Path],
                            config: Mapping, preprocessor: Mapping | None = None, *,
                            progress: Progress | None = None, keep_dir: str | Path | None = None,
                            memory_budget: int | None = None, working_copies: int = 0
                            ) -> tuple[HFViTTaskPool, list[str]]:
    """A pool from uploads: the base (``ViTModel`` or ``ViTForImageClassification`` weights), one
    ``ViTForImageClassification`` checkpoint per task (its classifier is the task's head), the model's
    ``config.json``, optionally its ``preprocessor_config.json``, and ``<task>.zip`` of class folders per task
    (or ``val/`` and ``test/`` split folders, used as given; otherwise a seeded half / half split per class).
    Returns ``(pool, notes for the user)``.

    Bounded before the work, with :mod:`esm_core.pools.upload`'s readers and bounds: the task names and count,
    the config and the preprocessor (:func:`~esm_core.models.hf_vit.check_config`; the input size within the
    upload bounds), every zip listed (not decoded), the base's parameter count (``ESM_MAX_MODEL_PARAMS``) and
    shapes against the config; then the decoded images, the checkpoints held and ``working_copies`` model-sized
    copies against ``memory_budget`` (None: the session budget) before any task checkpoint is read or any image
    decoded. Each task: its keys, shapes and finite values equal to the base's, its classifier's classes equal
    to its class folders. ``keep_dir``: each checked task is written there (safetensors) and read lazily."""
    report = reporter(progress)
    names = list(task_paths)
    if len(names) > upload_text.MAX_TASKS:
        raise ValueError(f"{len(names)} task checkpoints: this server merges at most {upload_text.MAX_TASKS} tasks "
                         "of one upload")
    upload._check_names(names, image_zips)
    missing = [t for t in names if t not in image_zips]
    if missing:
        raise ValueError(f"no images for task(s) {missing}: upload <task>.zip of class folders per task (a ViT "
                         "task is scored with its own classifier on its own images)")
    cfg = hf_vit.check_config(config)
    pre = hf_vit.check_preprocessor(preprocessor, cfg["image_size"])
    S = cfg["image_size"]
    upload._check_image_size(S, cfg["patch_size"], "uploaded ViT")
    plans = {t: upload.list_image_zip(image_zips[t], t) for t in names}
    report(0.02, "reading the base checkpoint")
    raw = load_checkpoint(base_path)
    base = {k: v.float() if v.is_floating_point() else v
            for k, v in hf_vit.encoder_state(hf_vit.convert(raw, Path(base_path).name)).items()}
    del raw
    cap = settings.max_model_params()
    n_params = sum(v.numel() for v in base.values())
    if n_params > cap:
        raise ValueError(f"the base checkpoint holds {n_params / 1e6:.0f} M parameters, more than the "
                         f"{cap / 1e6:.0f} M this server merges")
    hf_vit.check_shapes(base, cfg, cap)
    check_finite(base, "base")
    counts = {t: len(p.members) if p.split is None else len(p.ids(upload.VAL)) + len(p.ids(upload.TEST))
              for t, p in plans.items()}                          # train/ images are not decoded: no class means
    base_bytes = sum(v.numel() * v.element_size() for v in base.values())
    upload._check_upload_memory(plans, S, 0, base_bytes, 0 if keep_dir is not None else len(names),
                                upload.upload_memory_budget() if memory_budget is None else int(memory_budget),
                                working_copies, counts=counts)
    tasks, heads, notes = {}, {}, []
    for i, t in enumerate(names):
        report(0.05 + 0.45 * i / len(names), f"reading task checkpoint {t}")
        label = f"task {t!r}"
        raw = _read_task(task_paths[t], base, Path(base_path).name, notes)
        enc, head = hf_vit.split_head(hf_vit.convert(raw, f"{label} ({Path(task_paths[t]).name})"), label,
                                      cfg["hidden_size"])
        del raw
        check_compatible(base, enc, Path(task_paths[t]).name)     # keys, shapes, float-ness, finite values
        C, folders = head["weight"].shape[0], plans[t].classes
        if C != len(folders):
            raise ValueError(f"{label}: its classifier has {C} classes but {Path(image_zips[t]).name} has "
                             f"{len(folders)} class folders ({', '.join(folders[:6])}{' …' if len(folders) > 6 else ''})")
        tasks[t] = {k: enc[k].float() for k in base}
        del enc
        heads[t] = head
        if keep_dir is not None:
            Path(keep_dir).mkdir(parents=True, exist_ok=True)
            tasks[t] = LazyCheckpoint(save_safetensors(tasks[t], Path(keep_dir) / f"task-{i}.safetensors"),
                                      name=label)
    data, class_names = {}, {}
    notes[:0] = [f"family: Hugging Face ViT ({cfg['num_hidden_layers']} layers, width {cfg['hidden_size']}, "
             f"{S} px / patch {cfg['patch_size']}; from config.json); features: the [CLS] token after the final "
             "layernorm; heads: each task's own classifier, its classes = the zip's class folders sorted by name; "
             f"inputs: resized to {S} px, × {pre['rescale']:.6g}, normalised with mean {list(pre['mean'])} and std "
             f"{list(pre['std'])}" + ("" if preprocessor is not None else " (no preprocessor_config.json: "
                                            "ViTImageProcessor's defaults)")]
    for i, t in enumerate(names):
        report(0.5 + 0.5 * i / len(names), f"decoding the images of {t}")
        plan = plans[t]
        if plan.split is not None:
            val, test, rule = plan.ids(upload.VAL), plan.ids(upload.TEST), "val/ and test/ folders as given"
        else:
            val, test = upload._split_val_test(plan.labels)
            rule = "split half validation / half test per class (seed 0)"
        data[t] = {}
        for split, ids in (("val", val), ("test", test)):
            x = np.empty((len(ids), S, S, 3), dtype=np.uint8)
            upload._decode_into(plan, S, np.asarray(ids), x)
            data[t][split] = (x, plan.labels[ids].astype(np.int64))
        class_names[t] = list(plan.classes)
        notes.append(f"{t}: {len(val)} validation / {len(test)} test images, {len(plan.classes)} classes, {rule}")
    meta = {"model": f"uploaded ViT ({cfg['num_hidden_layers']} layers, width {cfg['hidden_size']})",
            "head_sources": {t: HeadSource.OWN.value for t in names}}
    pool = HFViTTaskPool(name="upload", model_config=cfg, preprocess=pre, base=base, tasks=tasks, heads=heads,
                         class_names=class_names, data=data, meta=meta)
    report(1.0, "pool ready")
    return pool, notes
