"""ESM and ESM++ on your own proxy data: files → a proxy pool → activation statistics → the merge (methods §5.1).

What ``esm-studio merge --method esm --proxy <task>=<data>`` runs, and the library call behind it:

1. :func:`proxy_pool` reads the base and task checkpoints and ``n`` proxy samples per task, drawn with ``seed``
   from that task's data (:func:`esm_core.pools.taskpool.proxy_ids` over the files listed in sorted order, the
   draw the app makes from a pool's validation split), into a pool:

   - images: a folder or a ``.zip`` of images, in class folders or flat (labels are not needed to probe); only
     the ``n`` drawn files are decoded, each bounded like an upload's (bytes, pixels), at the tower's input
     size. The base is an open_clip / Hugging Face CLIP vision checkpoint whose architecture is read from a
     config or chosen (:func:`esm_core.pools.upload.resolve_architecture`: ``arch``, ``config``,
     ``head_width``, ``normalisation``);
   - text (BERT family): ``<task>.csv`` / ``.jsonl`` labelled sentences, the base's ``config.json`` and
     tokenizer files, read exactly as the Pool view reads a text upload
     (:func:`esm_core.pools.upload_text.text_pool_from_upload`: half of each class is validation, the proxy
     sentences come from it).

2. :func:`probe_proxy` probes each task inside its own fine-tuned model (:func:`esm_core.probe.probe_pool`,
   the app's probe) and records which samples it used.
3. :func:`merge_pool` merges the way the app does: the update at α = 0 and its slope in α
   (:func:`esm_core.evaluation.alpha.affine_updates`), then ``θ0 + U0 + α · slope``. The same pool, proxy
   samples and parameters therefore give the app's merge tensor for tensor.

Image pools built here carry no heads (probing and merging need none): they are for merging, not for scoring.
"""
from __future__ import annotations

import io
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..progress import Progress, reporter
from .. import settings
from .. import models
from ..merging import apply_updates, get_method
from ..models.roles import OWN
from ..merging.esm import new_cache
from ..pools import upload as U
from ..pools.taskpool import TaskPool, proxy_ids
from ..pools.upload_text import text_pool_from_upload
from ..probe import probe_pool
from . import alpha as A

PROXY_SAMPLES = 32                  # proxy samples per task by default (methods §5.1)
MAX_PROXY_SAMPLES = 4096            # the most proxy samples per task a merge reads
TEXT_EXTS = (".csv", ".jsonl")


@dataclass
class ProxySource:
    """One task's proxy data on disk, listed (nothing decoded): its kind ("folder", "zip", "text") and, for
    images, the image files in sorted order (paths relative to the folder / zip member names)."""
    task: str
    path: Path
    kind: str
    names: list[str] = field(default_factory=list)


def _hidden(parts) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def list_proxy(path: str | Path, task: str) -> ProxySource:
    """List one task's proxy data: a folder or ``.zip`` of images (any depth, hidden files skipped) or a
    ``.csv`` / ``.jsonl`` of sentences. Bounded before anything is read: at most
    :data:`esm_core.pools.upload.MAX_ZIP_FILES` images, each at most ``MAX_ENTRY_BYTES`` on disk / declared."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"proxy data of task {task!r}: {p} does not exist")
    if p.is_file() and p.suffix.lower() in TEXT_EXTS:
        return ProxySource(task, p, "text")
    names: list[str] = []
    if p.is_dir():
        root = p.resolve()
        for dirpath, dirnames, filenames in os.walk(root):          # symlinked folders are not followed
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX")
            for f in sorted(filenames):
                if f.startswith(".") or not f.lower().endswith(U.IMAGE_EXTS):
                    continue
                full = Path(dirpath) / f
                if full.is_symlink() or not full.is_file():
                    continue
                if full.stat().st_size > U.MAX_ENTRY_BYTES:
                    raise ValueError(f"proxy data of task {task!r}: {full.relative_to(root)} is larger than "
                                     f"{U.MAX_ENTRY_BYTES / 1024 ** 2:.0f} MiB")
                names.append(full.relative_to(root).as_posix())
                if len(names) > U.MAX_ZIP_FILES:
                    raise ValueError(f"proxy data of task {task!r}: more than {U.MAX_ZIP_FILES} images in {p}")
        kind = "folder"
    elif p.is_file() and p.suffix.lower() == ".zip":
        try:
            with zipfile.ZipFile(p) as zf:
                members = [m for m in zf.infolist() if not m.is_dir()]
        except (zipfile.BadZipFile, OSError) as e:
            raise ValueError(f"proxy data of task {task!r}: {p.name} is not a readable zip file ({e})") from None
        if len(members) > U.MAX_ZIP_FILES:
            raise ValueError(f"proxy data of task {task!r}: {len(members)} files in {p.name}, more than the "
                             f"{U.MAX_ZIP_FILES} allowed")
        for m in members:
            parts = [q for q in m.filename.split("/") if q]
            if not parts or _hidden(parts) or not parts[-1].lower().endswith(U.IMAGE_EXTS):
                continue
            if m.file_size > U.MAX_ENTRY_BYTES:
                raise ValueError(f"proxy data of task {task!r}: {m.filename!r} declares more than "
                                 f"{U.MAX_ENTRY_BYTES / 1024 ** 2:.0f} MiB")
            names.append(m.filename)
        names.sort()
        kind = "zip"
    else:
        raise ValueError(f"proxy data of task {task!r}: {p.name} is neither a folder, a .zip of images nor a "
                         f".csv / .jsonl of sentences")
    if not names:
        raise ValueError(f"proxy data of task {task!r}: no images in {p} (allowed: {', '.join(U.IMAGE_EXTS)})")
    return ProxySource(task, p, kind, names)


def _decode(data: bytes, where: str, image_size: int) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.size[0] * im.size[1] > U.MAX_IMAGE_PIXELS:
                raise ValueError(f"{where} is too large ({im.size[0]}×{im.size[1]} pixels)")
            rgb = im.convert("RGB")
            return np.asarray(rgb.resize((image_size, image_size), Image.BILINEAR), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"{where} cannot be decoded as an image ({type(e).__name__})") from None


def read_proxy_images(src: ProxySource, ids: list[int], image_size: int) -> np.ndarray:
    """The images ``src.names[i]`` for ``i`` in ``ids``, decoded at ``image_size`` (uint8 n×S×S×3): one image
    in flight at a time, each read bounded (``MAX_ENTRY_BYTES``, ``MAX_IMAGE_PIXELS``) and refused naming it."""
    out = np.empty((len(ids), image_size, image_size, 3), dtype=np.uint8)
    zf = zipfile.ZipFile(src.path) if src.kind == "zip" else None
    try:
        for j, i in enumerate(ids):
            name = src.names[int(i)]
            where = f"proxy data of task {src.task!r}: {name!r}"
            if zf is not None:
                try:
                    with zf.open(name) as f:
                        data = f.read(U.MAX_ENTRY_BYTES + 1)
                except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError) as e:
                    raise ValueError(f"{where} cannot be read from the zip ({type(e).__name__})") from None
            else:
                with open(src.path / name, "rb") as f:
                    data = f.read(U.MAX_ENTRY_BYTES + 1)
            if len(data) > U.MAX_ENTRY_BYTES:
                raise ValueError(f"{where} is larger than {U.MAX_ENTRY_BYTES / 1024 ** 2:.0f} MiB")
            out[j] = _decode(data, where, image_size)
    finally:
        if zf is not None:
            zf.close()
    return out


def _check_n(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= int(n) <= MAX_PROXY_SAMPLES:
        raise ValueError(f"proxy samples per task must be an integer from 1 to {MAX_PROXY_SAMPLES}, got {n!r}")
    return int(n)


def proxy_pool(base_path, task_paths: Mapping[str, str | Path], proxy: Mapping[str, str | Path], *,
               n: int = PROXY_SAMPLES, seed: int = 0, arch: str = "auto", config: Mapping | None = None,
               preprocessor: Mapping | None = None, head_width: int | None = None,
               normalisation: str | None = None, tokenizer_files: Mapping[str, str | Path] | None = None,
               progress: Progress | None = None):
    """A pool of the base, the tasks and each task's proxy samples, ready for :func:`probe_proxy`.

    ``task_paths`` / ``proxy``: ``{task: file}`` with the same task names (at least two). Image data (folders /
    zips) make an image pool: only the ``n`` samples drawn with ``seed`` are decoded (the pool's validation
    split holds them; ``pool.meta["proxy"]`` records, per task, the source and the drawn files and ids).
    Sentences (``.csv`` / ``.jsonl``) make a text pool through the Pool view's text upload (needs ``config``,
    the base's config.json as a dict, and ``tokenizer_files``). Every bound is checked before the work: the
    number of samples, the files listed, the decoded images' memory against ``ESM_SESSION_MEMORY_MB``."""
    report = reporter(progress)
    n = _check_n(n)
    seed = int(seed)
    names = list(task_paths)
    if len(names) < 2:
        raise ValueError(f"merging needs at least two task checkpoints; got {len(names)}")
    missing, extra = [t for t in names if t not in proxy], sorted(set(proxy) - set(names))
    if missing:
        raise ValueError(f"no proxy data for task(s) {missing}: give --proxy TASK=<folder | zip | csv | jsonl> "
                         "for every task")
    if extra:
        raise ValueError(f"proxy data for {extra}, which are not among the task names {names}")
    U._check_names(names, {})
    sources = {t: list_proxy(proxy[t], t) for t in names}
    kinds = {"text" if s.kind == "text" else "image" for s in sources.values()}
    if len(kinds) > 1:
        raise ValueError("proxy data must be all images (folders / zips) or all sentences (.csv / .jsonl), not both")
    if kinds == {"text"}:
        return _text_proxy_pool(base_path, task_paths, sources, n, seed, config, tokenizer_files, report)

    report(0.02, "reading the base checkpoint")
    base = U._read_base(base_path)
    cfg, mean, std, note = U.resolve_architecture(base, arch=arch, config=config, head_width=head_width,
                                                  normalisation=normalisation, preprocessor=preprocessor)
    size = int(cfg["vision_cfg"]["image_size"])
    chosen = {t: proxy_ids(len(s.names), n, seed) for t, s in sources.items()}
    need = sum(U.decoded_image_bytes(len(ids), size) for ids in chosen.values())
    if need > (budget := settings.session_memory_bytes()):
        raise ValueError(f"{sum(map(len, chosen.values()))} proxy images at {size}×{size} px need "
                         f"{need / 2 ** 20:,.1f} MiB once decoded, more than the {budget / 2 ** 20:,.1f} MiB allowed "
                         "(ESM_SESSION_MEMORY_MB): use fewer proxy samples")
    tasks = U._read_tasks(base, task_paths, names, report)
    data, record = {}, {}
    for i, t in enumerate(names):
        report(0.4 + 0.5 * i / len(names), f"proxy images of {t}")
        raw = read_proxy_images(sources[t], chosen[t], size)
        data[t] = {"val": (raw, np.zeros(len(raw), dtype=np.int64))}
        record[t] = {"source": str(sources[t].path), "files": [sources[t].names[i] for i in chosen[t]],
                     "ids": list(chosen[t]), "listed": len(sources[t].names)}
    width = int(cfg.get("embed_dim") or cfg["vision_cfg"]["width"])
    pool = TaskPool(name="proxy", model_name=cfg, base=base, tasks=tasks,
                    heads={t: torch.zeros(1, width) for t in names}, class_names={t: ["(proxy)"] for t in names},
                    data=data, mean=mean, std=std, quick_gelu=cfg["quick_gelu"],
                    meta={"proxy": record, "proxy_n": n, "proxy_seed": seed, "architecture": note})
    report(1.0, "proxy pool ready")
    return pool


def _text_proxy_pool(base_path, task_paths, sources, n, seed, config, tokenizer_files, report):
    if config is None or not tokenizer_files:
        raise ValueError("sentences as proxy data need the base's config.json and its tokenizer files "
                         "(--config, --tokenizer)")
    pool, notes = text_pool_from_upload(base_path, task_paths, {t: s.path for t, s in sources.items()}, config,
                                        tokenizer_files, progress=report)
    pool.meta["proxy"] = {t: {"source": str(s.path)} for t, s in sources.items()}
    pool.meta["proxy_n"], pool.meta["proxy_seed"] = n, seed
    pool.meta["notes"] = notes
    return pool


def probe_proxy(pool, *, n: int | None = None, seed: int | None = None, device: str | torch.device = "auto",
                progress: Progress | None = None) -> dict:
    """Activation statistics of every task of ``pool`` on its proxy samples (:func:`esm_core.probe.probe_pool`,
    the app's probe: each task inside its own fine-tuned model). ``n`` / ``seed`` default to the ones
    :func:`proxy_pool` drew with. For a pool from :func:`proxy_pool` of images, ``proxy_ids`` are the drawn
    files' ids in each task's sorted listing (``proxy_files`` their names); otherwise ids into the pool's
    validation split, as in the app."""
    meta = getattr(pool, "meta", {}) or {}
    n = _check_n(meta.get("proxy_n", PROXY_SAMPLES) if n is None else n)
    seed = int(meta.get("proxy_seed", 0) if seed is None else seed)
    stats = probe_pool(pool, n=n, seed=seed, device=device, progress=progress)
    rec = meta.get("proxy") or {}
    if rec and all("ids" in rec.get(t, {}) for t in pool.task_names):   # the val split holds just the drawn ones
        stats["proxy_ids"] = {t: list(rec[t]["ids"]) for t in pool.task_names}
        stats["proxy_files"] = {t: list(rec[t]["files"]) for t in pool.task_names}
    return stats


def merge_pool(pool, method: str, params: Mapping[str, Any] | None = None, *, stats=None, cache=None,
                device: str | torch.device = "auto", progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """The merged state dict of ``pool`` with ``method`` (parameters resolved by its schema; ``stats`` from
    :func:`probe_proxy` for the ESM family), computed as the app computes it: the update at α = 0 and its slope
    (:func:`esm_core.evaluation.alpha.affine_updates`), then ``θ0 + U0 + α · slope``.

    For a text pool this is the shared encoder (every merged key) with the *base's* biases and heads in their
    place: scoring task t needs its own (methods §8) — :func:`task_model` gives task t's state. Any pool works
    (the demo, the text pool, an upload, :func:`proxy_pool`)."""
    report = reporter(progress)
    m = get_method(method)
    p = m.resolve(dict(params or {}))
    if m.needs_stats and stats is None:
        stats = probe_proxy(pool, device=device, progress=lambda f, d: report(0.4 * f, d))
    cache = new_cache() if cache is None and m.needs_stats else cache
    u0, slope, _ = A.affine_updates(pool.base, pool.tasks, method, p, stats=stats, cache=cache, device=device,
                                    check=False, progress=lambda f, d: report(0.4 + 0.6 * f, d))
    merged = apply_updates(pool.base, A.UpdatesAt(u0, slope, float(p["alpha"])))
    report(1.0, "merged")
    return merged


def task_model(merged: Mapping[str, torch.Tensor], task: Mapping[str, torch.Tensor], *,
               family: str | None = None) -> dict[str, torch.Tensor]:
    """Task t's model after a merge: ``merged`` with task t's own values on its OWN keys.

    A merge leaves the keys no method merges (role OWN) at the *base's* values. For BERT-family text encoders
    those are every bias (methods §8: each task keeps its own biases and its own classifier head), so the merged
    dict alone is the shared encoder with the base's biases — not what task t is scored with. ``task``: task t's
    fine-tuned state dict (``pool.tasks[t]``); its head stays in ``pool.heads[t]``. For image towers no key is
    OWN and this is ``merged`` itself (a new dict, no tensor copied). ``family``: a name of
    :data:`esm_core.models.FAMILIES` (default: found from the keys)."""
    roles = models.roles_of(merged, family)
    missing = [k for k, r in roles.items() if r == OWN and k not in task]
    if missing:
        raise ValueError(f"the task's state dict lacks its own keys {missing[:5]}{' …' if len(missing) > 5 else ''}")
    return {k: (task[k] if roles.get(k) == OWN else v) for k, v in merged.items()}
