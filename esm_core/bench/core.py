"""``esm-studio bench``: speed and peak memory of every merging method on ViT-B/32-shaped checkpoints.

    esm-studio bench [--blocks 12] [--tasks 8] [--methods ta,ties] [--device auto] [--repeat 1] [--json]
    esm-studio bench --model ViT-L-14 --tasks 20 --methods ta,ties     # lazy: checkpoints on disk

The checkpoints are random but have the exact shapes of an open_clip ViT-B/32
visual tower (width 768, patch 32, 224 px → 50 tokens, 12 heads, MLP 3072,
output 512); ``--blocks`` keeps the first N transformer blocks. Task
checkpoints are the base plus small, mostly low-rank random updates. Everything
is seeded, so two runs merge the same numbers.

What is timed is one *job*: by default one job per registered method that needs
no activation statistics, each running :func:`esm_core.merge_updates` (the
method itself plus moving its updates to the CPU; no compatibility check). A
job may have an untimed ``setup`` (e.g. a cold merge that fills a cache, so that
``run`` measures a re-merge). Other modules add jobs with :func:`register_jobs`.

Rows give wall-clock ``seconds`` and, on the CPU, ``cpu_seconds`` (process
time of the job): on a machine shared with other work the wall clock of
identical runs varied 1.5×, CPU time far less, so speed-ups are printed for both.

Peak memory is the extra memory a job needs on top of the loaded checkpoints:

- CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before the job
  (the checkpoints stay on the CPU, as in a real merge; layers travel to the GPU
  one at a time).
- CPU: every job runs in a fresh child process (``multiprocessing`` spawn) that
  builds the checkpoints, returns freed heap to the OS (``malloc_trim``), resets
  the kernel's peak-RSS mark (``/proc/self/clear_refs``) and reads ``VmHWM``
  after the job: peak RSS minus the RSS before the job. Numbers are therefore
  per job and comparable (the result dict the job returns is included).
"""
from __future__ import annotations

import functools
import multiprocessing as mp
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from ..device import resolve_device, trim_heap
from ..merging import METHODS, merge_updates
from ..models import openclip_vit as vit
from .esm_rows import esm_jobs
from .jobs import FULL_BLOCKS, HEADS, IMAGE, MLP, OUT_DIM, PATCH, TOKENS, WIDTH, Job  # noqa: F401

# open_clip visual towers the bench can imitate: width, patch, image, MLP width, output dim, blocks
MODELS = {
    "ViT-B-32": dict(width=768, patch=32, image=224, mlp=3072, out_dim=512, blocks=12),
    "ViT-B-16": dict(width=768, patch=16, image=224, mlp=3072, out_dim=512, blocks=12),
    "ViT-L-14": dict(width=1024, patch=14, image=224, mlp=4096, out_dim=768, blocks=24),
}


# ---------------------------------------------------------------------------
# Synthetic checkpoints
# ---------------------------------------------------------------------------


def vit_shapes(model: str = "ViT-B-32", blocks: int | None = None) -> dict[str, tuple[int, ...]]:
    """Key → shape of an open_clip visual tower (``MODELS``) with its first ``blocks`` blocks (open_clip order)."""
    if model not in MODELS:
        raise ValueError(f"unknown bench model {model!r}; known: {sorted(MODELS)}")
    cfg = MODELS[model]
    blocks = cfg["blocks"] if blocks is None else blocks
    if blocks < 0:
        raise ValueError(f"blocks must be >= 0, got {blocks}")
    return vit.tower_shapes(cfg["width"], cfg["patch"], cfg["mlp"], cfg["image"], cfg["out_dim"], blocks)


def vit_b32_shapes(blocks: int = FULL_BLOCKS) -> dict[str, tuple[int, ...]]:
    """Key → shape of an open_clip ViT-B/32 visual tower with ``blocks`` transformer blocks (open_clip order)."""
    return vit_shapes("ViT-B-32", blocks)


def iter_checkpoints(blocks: int | None = FULL_BLOCKS, tasks: int = 8, seed: int = 0, rank: int = 32,
                     scale: float = 1e-3, model: str = "ViT-B-32"):
    """Yield ``("base", base)`` then ``(f"task{i}", state dict)`` one at a time (see :func:`make_checkpoints`)."""
    if tasks < 1:
        raise ValueError(f"tasks must be >= 1, got {tasks}")
    g = torch.Generator().manual_seed(seed)
    shapes = vit_shapes(model, blocks)
    base = {}
    for k, s in shapes.items():
        t = torch.randn(s, generator=g) * 0.02
        if k.endswith(("ln_pre.weight", "ln_1.weight", "ln_2.weight", "ln_post.weight")):
            t += 1.0
        base[k] = t
    yield "base", base
    for ti in range(tasks):
        sd = {}
        for k, s in shapes.items():
            noise = torch.randn(s, generator=g)
            if len(s) == 2:
                m, n = s
                r = min(rank, m, n)
                decay = 1.0 / torch.arange(1, r + 1, dtype=torch.float32)
                a = torch.randn(m, r, generator=g) * decay
                low = a @ torch.randn(r, n, generator=g)
                low *= (m * n) ** 0.5 / low.norm().clamp(min=1e-12)     # entries of order 1
                delta = low.add_(noise, alpha=0.1)
            else:
                delta = noise
            sd[k] = base[k] + delta.mul_(scale)
        yield f"task{ti}", sd


def make_checkpoints(blocks: int = FULL_BLOCKS, tasks: int = 8, seed: int = 0, rank: int = 32,
                     scale: float = 1e-3, model: str = "ViT-B-32"
                     ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """Random ``(base, {task: state dict})`` with ViT-B/32 shapes (float32, CPU), deterministic in ``seed``.

    Base: N(0, 0.02²) weights, LayerNorm weights near 1. Each task adds, per
    2-D key, a rank-``rank`` update with a decaying spectrum plus a little dense
    noise, and small dense noise elsewhere (entries of order ``scale``).
    """
    it = iter_checkpoints(blocks, tasks, seed, rank, scale, model)
    _, base = next(it)
    return base, dict(it)


def write_checkpoints(folder, blocks: int | None, tasks: int, seed: int = 0, model: str = "ViT-B-32"
                      ) -> tuple[str, dict[str, str]]:
    """:func:`iter_checkpoints` written to ``folder`` as safetensors, one model in memory at a time → paths."""
    folder = Path(folder)
    paths = {}
    for name, sd in iter_checkpoints(blocks, tasks, seed, model=model):
        p = folder / f"{name}.safetensors"
        save_file(sd, str(p))
        paths[name] = str(p)
        del sd
    base = paths.pop("base")
    return base, paths


def params_per_model(base: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in base.values())


# ---------------------------------------------------------------------------
# Jobs: what gets timed
# ---------------------------------------------------------------------------


def _finish_row(job: Job, row: dict, base, tasks, device, state, res) -> dict:
    """Add the set-up's ``state["extra"]`` (e.g. bytes of statistics and caches) and the job's check to the row."""
    if isinstance(state, dict):
        row.update(state.get("extra", {}))
    if job.check is not None:
        if isinstance(state, dict):
            state["_ref_seconds"] = row["seconds"]
            state["_ref_cpu_seconds"] = row.get("cpu_seconds")
        row.update(job.check(base, tasks, device, state, res))
    return row


def run_method(method: str, base, tasks, device, state=None, **params):
    """Job body of a plain method: ``merge_updates`` without the compatibility check."""
    return merge_updates(method, base, tasks, device=device, check=False, **params)


def method_jobs() -> list[Job]:
    """One job per registered method that needs no activation statistics."""
    return [Job(m.name, m.title, functools.partial(run_method, m.name))
            for m in METHODS.values() if not m.needs_stats]


JOB_PROVIDERS: list[Callable[[], list[Job]]] = [method_jobs]


def register_jobs(provider: Callable[[], list[Job]]) -> None:
    """Add a function returning more :class:`Job` rows (e.g. ESM cold merge / re-merge)."""
    if provider not in JOB_PROVIDERS:
        JOB_PROVIDERS.append(provider)


register_jobs(esm_jobs)      # ESM rows: cold merge, warm re-merges (random Gram statistics)


def all_jobs() -> list[Job]:
    jobs: list[Job] = []
    for provider in JOB_PROVIDERS:
        jobs.extend(provider())
    return jobs


def select_jobs(names: list[str] | None) -> list[Job]:
    """The jobs named in ``names`` (in that order), or every default job; unknown names are refused."""
    jobs = all_jobs()
    if not names:
        return [j for j in jobs if j.default]
    by_name = {j.name: j for j in jobs}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        stats = [n for n in unknown if n in METHODS and METHODS[n].needs_stats]
        hint = f" ({stats} need activation statistics and have no benchmark job)" if stats else ""
        raise ValueError(f"unknown benchmark method(s) {unknown}{hint}; available: {sorted(by_name)}")
    return [by_name[n] for n in names]


# ---------------------------------------------------------------------------
# Memory probes
# ---------------------------------------------------------------------------

MiB = 1024 ** 2


def _proc_status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def cpu_peak_supported() -> bool:
    """True where per-job peak RSS can be measured (Linux with a writable /proc/self/clear_refs)."""
    try:
        _reset_peak_rss()
        _proc_status_kib("VmHWM")
        return True
    except OSError:
        return False
    except RuntimeError:
        return False


# ---------------------------------------------------------------------------
# Running jobs
# ---------------------------------------------------------------------------


def _row(job: Job, times: list[float], peak_bytes: int, memory: str) -> dict:
    return {"name": job.name, "title": job.title, "seconds": min(times), "seconds_all": times,
            "peak_extra_mib": peak_bytes / MiB, "memory": memory, **job.extra}


def _run_cpu_job(job: Job, blocks: int, tasks: int, seed: int, repeat: int, paths=None) -> dict:
    """Body of the child process: build checkpoints (or take their ``paths``: read lazily by the job), then time
    and measure ``job`` on the CPU."""
    dev = torch.device("cpu")
    base, tsk = paths if paths is not None else make_checkpoints(blocks, tasks, seed)
    state = job.setup(base, tsk, dev) if job.setup is not None else None
    times, cpu, peak, res = [], [], 0, None
    for _ in range(repeat):
        res = None
        trim_heap(collect=True)
        before = _proc_status_kib("VmRSS")
        _reset_peak_rss()
        t0, c0 = time.perf_counter(), time.process_time()
        res = job.run(base, tsk, dev, state)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        peak = max(peak, (_proc_status_kib("VmHWM") - before) * 1024)
    row = _row(job, times, peak, "cpu-rss")
    row["cpu_seconds"], row["cpu_seconds_all"] = min(cpu), cpu
    return _finish_row(job, row, base, tsk, dev, state, res)


def _child_main(conn, job: Job, blocks: int, tasks: int, seed: int, repeat: int, paths=None) -> None:
    try:
        conn.send(("ok", _run_cpu_job(job, blocks, tasks, seed, repeat, paths)))
    except BaseException as e:  # noqa: BLE001 — report anything to the parent
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


def _run_in_child(job: Job, blocks: int, tasks: int, seed: int, repeat: int, paths=None) -> dict:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(child, job, blocks, tasks, seed, repeat, paths), daemon=True)
    proc.start()
    child.close()
    try:
        status, payload = parent.recv()
    except EOFError:
        proc.join()
        hint = " (killed: out of memory?)" if proc.exitcode == -9 else " (see its error above)"
        raise RuntimeError(f"benchmark of {job.name!r} died with exit code {proc.exitcode}{hint}") from None
    proc.join()
    if status != "ok":
        raise RuntimeError(f"benchmark of {job.name!r} failed: {payload}")
    return payload


def _run_cuda_jobs(jobs: list[Job], dev: torch.device, blocks: int, tasks: int, seed: int, repeat: int,
                   progress: Callable[[float, str], None] | None = None, paths=None) -> list[dict]:
    base, tsk = paths if paths is not None else make_checkpoints(blocks, tasks, seed)
    # initialise cuBLAS / cuSOLVER once, so the first job does not pay for it
    x = torch.randn(64, 64, device=dev)
    torch.linalg.svd(x @ x)
    torch.linalg.eigh(x @ x.T)
    torch.cuda.synchronize(dev)
    rows = []
    for i, job in enumerate(jobs):
        if progress is not None:
            progress(i / len(jobs), f"bench: {job.name}")
        state = job.setup(base, tsk, dev) if job.setup is not None else None
        times, peak, res = [], 0, None
        for _ in range(repeat):
            res = None
            torch.cuda.synchronize(dev)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
            before = torch.cuda.memory_allocated(dev)
            t0 = time.perf_counter()
            res = job.run(base, tsk, dev, state)
            torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - t0)
            peak = max(peak, torch.cuda.max_memory_allocated(dev) - before)
        rows.append(_finish_row(job, _row(job, times, peak, "cuda-allocated"), base, tsk, dev, state, res))
        del state, res
    return rows


def bench(blocks: int | None = FULL_BLOCKS, tasks: int = 8, methods: list[str] | None = None, device: str = "auto",
          repeat: int = 1, seed: int = 0, progress: Callable[[float, str], None] | None = None,
          model: str = "ViT-B-32", lazy: bool | None = None) -> dict:
    """Time every selected job and measure its peak extra memory; returns a JSON-ready dict.

    ``model`` picks the tower's shapes (``MODELS``; ``blocks=None``: all of its
    blocks). ``lazy`` (default: for every model but ViT-B-32) writes the
    checkpoints to a temporary folder as safetensors (deleted afterwards) and
    the jobs merge from the paths, reading the tasks key by key: the peak is
    then that of the whole job, base read included.

    ``{"device", "blocks", "tasks", "params_per_model", "repeat", "seed", "memory",
    "rows": [{"name", "title", "seconds" (best of ``repeat``), "seconds_all",
    "peak_extra_mib", "memory"[, "cache", "speedup_vs_cold"]}, ...]}``; warm-cache ESM rows
    carry their speed-up over the cold ESM row of the same run.
    """
    if model not in MODELS:
        raise ValueError(f"unknown bench model {model!r}; known: {sorted(MODELS)}")
    blocks = MODELS[model]["blocks"] if blocks is None else blocks
    lazy = (model != "ViT-B-32") if lazy is None else lazy
    if blocks < 1 or blocks > 64:
        raise ValueError(f"blocks must be in [1, 64], got {blocks}")
    if tasks < 1:
        raise ValueError(f"tasks must be >= 1, got {tasks}")
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    dev = resolve_device(device)
    jobs = select_jobs(methods)
    n_params = sum(torch.Size(s).numel() for s in vit_shapes(model, blocks).values())
    result = {"device": str(dev), "model": model, "blocks": blocks, "tasks": tasks, "params_per_model": n_params,
              "repeat": repeat, "seed": seed, "torch": torch.__version__, "machine": platform.machine(),
              "lazy": bool(lazy), "rows": []}
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"bench runs on 'cpu' or 'cuda', not {dev.type!r}")
    if dev.type == "cpu" and not cpu_peak_supported():
        raise ValueError("CPU peak memory needs Linux /proc/self/clear_refs, which is not available here")
    if not lazy:
        return _bench(result, jobs, dev, blocks, tasks, seed, repeat, progress, None)
    folder = tempfile.mkdtemp(prefix="esm-bench-")
    try:
        if progress is not None:
            progress(0.0, f"bench: writing {tasks + 1} {model} checkpoints to {folder}")
        paths = write_checkpoints(folder, blocks, tasks, seed, model)
        return _bench(result, jobs, dev, blocks, tasks, seed, repeat, progress, paths)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _bench(result: dict, jobs: list[Job], dev, blocks, tasks, seed, repeat, progress, paths) -> dict:
    if dev.type == "cuda":
        result["device_name"] = torch.cuda.get_device_name(dev)
        result["memory"] = "peak torch.cuda allocation during the job, minus the allocation before it"
        result["rows"] = _run_cuda_jobs(jobs, dev, blocks, tasks, seed, repeat, progress, paths)
        return _add_speedups(result)
    result["memory"] = ("peak RSS of a fresh process during the job, minus its RSS before it (checkpoints read "
                        "by the job: base whole, tasks key by key)" if paths is not None else
                        "peak RSS of a fresh process during the job, minus its RSS after building the checkpoints")
    for i, job in enumerate(jobs):
        if progress is not None:
            progress(i / len(jobs), f"bench: {job.name}")
        result["rows"].append(_run_in_child(job, blocks, tasks, seed, repeat, paths))
    if progress is not None:
        progress(1.0, "bench: done")
    return _add_speedups(result)


def _add_speedups(result: dict) -> dict:
    """Warm-cache rows get ``speedup_vs_cold``: the cold ``esm`` row's seconds over theirs (same run); the
    reference row (fd9a028's route) gets ``cold_speedup``: its seconds over the cold ``esm`` row's."""
    cold_row = next((r for r in result["rows"] if r.get("cache") == "cold"), None)
    cold = cold_row["seconds"] if cold_row else None
    cold_cpu = cold_row.get("cpu_seconds") if cold_row else None
    for r in result["rows"]:
        if r.get("cache") == "warm" and cold is not None and r["seconds"] > 0:
            r["speedup_vs_cold"] = cold / r["seconds"]
            if cold_cpu and r.get("cpu_seconds"):
                r["cpu_speedup_vs_cold"] = cold_cpu / r["cpu_seconds"]
        if r.get("cache") == "reference" and cold:
            r["cold_speedup"] = r["seconds"] / cold
            if cold_cpu and r.get("cpu_seconds"):
                r["cold_cpu_speedup"] = r["cpu_seconds"] / cold_cpu
    summary = esm_summary(result["rows"])
    if summary:
        result["esm_summary"] = summary
    return result


def esm_summary(rows: list[dict]) -> dict:
    """The ESM rows' ratios side by side: reference ÷ new cold merge, cold ÷ each re-merge (CPU seconds where
    measured, else wall seconds), and the new route's largest relative difference from the reference."""
    cold = next((r for r in rows if r.get("cache") == "cold"), None)
    ref = next((r for r in rows if r.get("cache") == "reference"), None)
    warm = [r for r in rows if r.get("cache") == "warm"]
    if cold is None and ref is None:
        return {}
    unit = "cpu_seconds" if all("cpu_seconds" in r for r in [cold, ref, *warm] if r is not None) else "seconds"
    out: dict = {"unit": unit}
    if cold is not None:
        out["cold"] = cold[unit]
    if ref is not None:
        out["reference"] = ref[unit]
        if cold is not None and cold[unit] > 0:
            out["reference_over_cold"] = ref[unit] / cold[unit]
        new_key = "new_cpu_seconds" if unit == "cpu_seconds" else "new_seconds"
        if ref.get(new_key):
            out["in_process_reference_over_new"] = ref[unit] / ref[new_key]
        if "max_rel_diff" in ref:
            out["max_rel_diff"] = ref["max_rel_diff"]
    if cold is not None:
        out["cold_over_remerge"] = {r["name"]: cold[unit] / r[unit] for r in warm if r[unit] > 0}
    return out


def _summary_lines(result: dict) -> list[str]:
    s = result.get("esm_summary")
    if not s:
        return []
    unit = "CPU s" if s["unit"] == "cpu_seconds" else "wall s"
    lines = ["", f"ESM side by side ({unit}, this run):"]
    if "reference_over_cold" in s:
        lines.append(f"  cold merge: reference route {s['reference']:.2f}, new {s['cold']:.2f} → "
                     f"{s['reference_over_cold']:.2f}× faster"
                     + (f" (in the reference's process: {s['in_process_reference_over_new']:.2f}×)"
                        if "in_process_reference_over_new" in s else "")
                     + (f"; max rel diff {s['max_rel_diff']:.1e}" if "max_rel_diff" in s else ""))
    for name, x in s.get("cold_over_remerge", {}).items():
        lines.append(f"  {name:<15} cold ÷ re-merge = {x:7.1f}×")
    return lines


def _notes(r: dict) -> str:
    out = []
    if "cpu_seconds" in r:
        out.append(f"cpu {r['cpu_seconds']:.2f} s" + (f" ({r['cpu_speedup_vs_cold']:.1f}×)"
                                                      if "cpu_speedup_vs_cold" in r else ""))
    if "cold_speedup" in r:
        out.append(f"new cold {r['cold_speedup']:.1f}× faster" + (f" ({r['cold_cpu_speedup']:.1f}× in cpu s)"
                                                                 if "cold_cpu_speedup" in r else ""))
    if "new_seconds" in r:
        out.append(f"in-process: new {r['new_seconds']:.2f} s ({r['speedup_new_vs_reference']:.1f}×"
                   + (f", {r['cpu_speedup_new_vs_reference']:.1f}× in cpu s" if "cpu_speedup_new_vs_reference" in r
                      else "") + f"), max rel diff {r['max_rel_diff']:.1e}")
    if "polar_max_rel_diff" in r:
        out.append(f"vs the Gram route: max rel diff {r['polar_max_rel_diff']:.1e}, "
                   f"{r['ns_steps_max']} steps at most, {r['ns_fallbacks']} fall-back(s)")
    if "stats_bytes" in r:
        out.append(f"stats {r['stats_bytes'] / MiB:.0f} MiB")
    if "cache_bytes" in r:
        out.append(f"cache {r['cache_bytes'] / MiB:.0f} MiB")
    return "  " + "; ".join(out) if out else ""


def format_table(result: dict) -> str:
    """The bench result as a plain-text table."""
    head = (f"esm-studio bench: {result.get('model', 'ViT-B-32')}, {result['blocks']} block(s), {result['tasks']} tasks, "
            f"{result['params_per_model'] / 1e6:.2f} M parameters per model, device {result['device']}"
            + (f" ({result['device_name']})" if result.get("device_name") else ""))
    lines = [head, f"peak extra memory = {result['memory']}", "",
             f"{'method':<15}{'title':<38}{'seconds':>10}{'peak extra MiB':>17}{'vs cold':>10}"]
    for r in result["rows"]:
        ratio = f"{r['speedup_vs_cold']:>9.1f}×" if "speedup_vs_cold" in r else " " * 10
        lines.append(f"{r['name']:<15}{r['title'][:37]:<38}{r['seconds']:>10.3f}{r['peak_extra_mib']:>17.1f}{ratio}"
                     f"{_notes(r)}".rstrip())
    return "\n".join(lines + _summary_lines(result))


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------
