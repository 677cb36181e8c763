"""``esm-studio bench --app-memory``: time and resident memory of the app's path on an uploaded pool.

    esm-studio bench --app-memory [--app-memory-tasks 8] [--app-memory-blocks 12] [--json]

Writes a random pool with the exact shapes of an open_clip ViT-B/32 image tower
(a base and ``tasks`` task checkpoints as float32 safetensors, made by
:func:`esm_core.bench.core.write_checkpoints`) and one zip of images per task
(5 classes × 12 PNGs of 224 × 224), then drives :mod:`esm_core.studio` exactly
as the app's handlers do, in one process, one step after the other:

1. ``upload``: ``new_session`` + ``load_uploaded`` (the Pool view's upload);
2. ``spectra``: ``spectra_at`` (the Spectra view: probe statistics, every ESD);
3. ``merge ta``: ``merge(s, "ta")`` (Merge view, Task Arithmetic);
4. ``merge esm``: ``merge(s, "esm")`` (Merge view, ESM with its defaults);
5. ``esm++``: ``run_routing`` with a few samples per task (Routing view).

After each step a row gives the wall seconds, the process's resident size
(``VmRSS``; ``RssFile`` is the part mapped from files — safetensors checkpoints are memory-mapped, so
their pages count here), its peak during the step (``VmHWM`` after resetting it with
``/proc/self/clear_refs``) and since the start, and the bytes the session holds
in probe statistics (:func:`esm_core.merging.stats.stats_nbytes`), in the
decomposition cache (:attr:`DecompositionCache.nbytes`), in the pool's
checkpoints, in the merges' cached updates (α = 0 and slope per parameter set,
and the current merge) and in the ESM++ model. Tensors sharing storage are
counted once. ``limit_gib`` stops the run (rows so far kept) when the
resident size passes it, so a run on a shared machine cannot take it over.
"""
from __future__ import annotations

import io
import os
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import open_clip
import torch
from PIL import Image

from ..progress import reporter
from .. import studio
from ..device import bound_heap_fragmentation, trim_heap
from ..merging.stats import stats_nbytes
from .core import MODELS, _proc_status_kib, _reset_peak_rss, write_checkpoints

MIB = 1024 ** 2
STEPS = ("written", "upload", "spectra", "merge ta", "merge esm", "esm++")


def write_image_zips(folder, tasks: list[str], classes: int = 5, per_class: int = 12, size: int = 224,
                     seed: int = 0) -> dict[str, str]:
    """One zip of class folders per task (``classes`` × ``per_class`` PNGs of ``size`` px) → ``{task: path}``.

    Images are smooth random colour fields (a random 7 × 7 grid, upscaled), different per task and class.
    """
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    out = {}
    for t in tasks:
        p = folder / f"{t}.zip"
        with zipfile.ZipFile(p, "w") as z:
            for c in range(classes):
                centre = rng.integers(0, 256, size=3)
                for i in range(per_class):
                    grid = np.clip(centre + rng.normal(0, 40, size=(7, 7, 3)), 0, 255).astype(np.uint8)
                    b = io.BytesIO()
                    Image.fromarray(grid).resize((size, size), Image.BILINEAR).save(b, "PNG")
                    z.writestr(f"class{c}/{i:03d}.png", b.getvalue())
        out[t] = str(p)
    return out


def session_bytes(s) -> dict[str, int]:
    """Bytes the session holds in memory, by part: probe statistics, decomposition cache, pool checkpoints, pool
    images, cached merge updates, ESM++ model (storage shared between parts is counted in the first part only);
    and ``disk``: the session folder's files (uploaded task checkpoints read lazily, spilled statistics)."""
    seen: set = set()
    pool = s.pool
    out = {"stats": stats_nbytes(s.stats) if s.stats is not None else 0,
           "cache": int(s.cache.nbytes) if s.cache is not None else 0}
    studio.tensor_bytes(s.stats, seen=seen)
    studio.tensor_bytes(s.cache, seen=seen)
    out["checkpoints"] = studio.tensor_bytes(pool.base, pool.tasks, seen=seen) if pool is not None else 0
    out["images"] = studio.tensor_bytes(getattr(pool, "data", None), seen=seen) if pool is not None else 0
    out["merges"] = studio.tensor_bytes(s.affine, s.current, seen=seen)
    out["esmpp"] = studio.tensor_bytes(s.esmpp, seen=seen)
    out["disk"] = sum(f.stat().st_size for f in Path(s.workdir).rglob("*") if f.is_file())
    return out


class _Watchdog(threading.Thread):
    """Ends the process (exit code 3) once its resident size passes ``limit_bytes``, after ``on_abort``."""

    def __init__(self, limit_bytes: int, on_abort: Callable[[int], None]):
        super().__init__(daemon=True)
        self.limit, self.on_abort, self.stop = limit_bytes, on_abort, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.2):
            rss = _proc_status_kib("VmRSS") * 1024
            if rss > self.limit:
                self.on_abort(rss)
                os._exit(3)


def app_memory(tasks: int = 8, blocks: int | None = None, model: str = "ViT-B-32", *, per_task: int = 2,
               classes: int = 5, per_class: int = 12, image_size: int = 224, seed: int = 0,
               head_width: int = 64, threads: int | None = None, limit_gib: float | None = None,
               folder=None, on_row: Callable[[dict], None] | None = None,
               progress: Callable[[float, str], None] | None = None) -> dict:
    """Run the app's steps on a random uploaded pool; ``{"config", "rows"}`` (one row per step, see module doc).

    ``blocks``: transformer blocks kept (default: all of ``model``'s; the upload then names the open_clip
    model, else — fewer blocks, or a model open_clip does not know — its architecture is inferred with
    ``head_width`` and CLIP normalisation). ``on_row`` gets each row as it is made.
    """
    if threads:
        torch.set_num_threads(int(threads))
    heap_bound = bound_heap_fragmentation()        # as the app's server does at start
    full = MODELS[model]["blocks"]
    blocks = full if blocks is None else int(blocks)
    names = [f"task{i}" for i in range(int(tasks))]
    config = {"model": model, "blocks": blocks, "tasks": len(names), "classes": classes, "per_class": per_class,
              "image_size": image_size, "routing_per_task": per_task, "threads": torch.get_num_threads(),
              "seed": seed, "rss_start_mib": round(_proc_status_kib("VmRSS") / 1024, 1),
              "mmap_threshold_mib": heap_bound}
    rows: list[dict] = []
    report = reporter(progress)
    state = {"step": "start", "peak": 0}

    def abort(rss: int) -> None:
        print(f"app-memory: stopped during {state['step']!r}: resident {rss / MIB:.0f} MiB passed the limit of "
              f"{limit_gib} GiB", file=sys.stderr, flush=True)

    dog = _Watchdog(int(limit_gib * 1024 ** 3), abort) if limit_gib else None
    if dog:
        dog.start()
    tmp = tempfile.TemporaryDirectory(prefix="esm-app-memory-") if folder is None else None
    work = Path(folder or tmp.name)
    s = None
    try:
        def step(name: str, fn: Callable[[], None]) -> None:
            state["step"] = name
            report(len(rows) / len(STEPS), name)
            trim_heap(collect=True)
            _reset_peak_rss()
            t0 = time.perf_counter()
            c0 = time.process_time()
            fn()
            sec, cpu = time.perf_counter() - t0, time.process_time() - c0
            peak = _proc_status_kib("VmHWM") * 1024
            state["peak"] = max(state["peak"], peak)
            row = {"step": name, "seconds": round(sec, 2), "cpu_seconds": round(cpu, 2),
                   "rss_mib": round(_proc_status_kib("VmRSS") / 1024, 1),
                   "rss_anon_mib": round(_proc_status_kib("RssAnon") / 1024, 1),
                   "rss_file_mib": round(_proc_status_kib("RssFile") / 1024, 1), "peak_mib": round(peak / MIB, 1),
                   "peak_so_far_mib": round(state["peak"] / MIB, 1)}
            if s is not None:
                row.update({f"{k}_mib": round(v / MIB, 1) for k, v in session_bytes(s).items()})
            rows.append(row)
            if on_row is not None:
                on_row(row)

        paths = {}

        def write() -> None:
            base, ckpts = write_checkpoints(work, blocks, len(names), seed=seed, model=model)
            paths["base"] = base
            paths["tasks"] = {t: ckpts[f"task{i}"] for i, t in enumerate(names)}
            paths["zips"] = write_image_zips(work, names, classes, per_class, image_size, seed)

        step("written", write)
        s = studio.new_session("cpu")
        named = blocks == full and open_clip.get_model_config(model) is not None
        arch = dict(arch=model) if named else dict(arch="infer", head_width=head_width, normalisation="clip")
        step("upload", lambda: studio.load_uploaded(s, paths["base"], paths["tasks"], paths["zips"], **arch))
        step("spectra", lambda: studio.spectra_at(s, 1.0))
        step("merge ta", lambda: studio.merge(s, "ta"))
        step("merge esm", lambda: studio.merge(s, "esm"))
        step("esm++", lambda: studio.run_routing(s, per_task=per_task))
        report(1.0, "done")
    finally:
        if dog:
            dog.stop.set()
        studio.close(s)
        if tmp is not None:
            tmp.cleanup()
    return {"config": config, "rows": rows}


COLUMNS = (("step", "step", "{}"), ("seconds", "s", "{:.1f}"), ("cpu_seconds", "CPU s", "{:.1f}"),
           ("rss_mib", "RSS MiB", "{:.0f}"), ("rss_file_mib", "of it files MiB", "{:.0f}"),
           ("peak_mib", "peak MiB", "{:.0f}"),
           ("stats_mib", "stats MiB", "{:.0f}"), ("cache_mib", "caches MiB", "{:.0f}"),
           ("checkpoints_mib", "ckpts MiB", "{:.0f}"), ("images_mib", "images MiB", "{:.0f}"),
           ("merges_mib", "merges MiB", "{:.0f}"), ("esmpp_mib", "ESM++ MiB", "{:.0f}"),
           ("disk_mib", "session disk MiB", "{:.0f}"))


def format_row(row: dict) -> str:
    return "  ".join(f"{label} " + (fmt.format(row[k]) if k in row else "-") for k, label, fmt in COLUMNS)


def format_table(res: dict) -> str:
    c = res["config"]
    head = (f"app on a {c['model']} × {c['tasks']} upload ({c['blocks']} blocks, {c['classes']} classes × "
            f"{c['per_class']} images per task, {c['threads']} thread(s), allocations from "
            + (f"{c['mmap_threshold_mib']:g} MiB mapped apart)" if c.get("mmap_threshold_mib") else
               "glibc's default threshold mapped apart)"))
    lines = [head, "| " + " | ".join(label for _, label, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in res["rows"]:
        lines.append("| " + " | ".join(fmt.format(r[k]) if k in r else "-" for k, _, fmt in COLUMNS) + " |")
    return "\n".join(lines)
