"""``esm-studio merge``: merge checkpoint files into one safetensors file.

    esm-studio merge --base zeroshot.pt --task cars=cars.pt --task dtd=dtd.pt \\
        --method ta --set alpha=0.3 --out merged.safetensors

The merge config (method, resolved parameters, task files, base file, version)
is stored in the output's metadata (read it back with
:func:`esm_core.checkpoints.read_config`). Methods that need activation
statistics (the ESM family) need a task pool with data: use ``esm-studio eval``.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable, TextIO

from .. import __version__
from .common import parse_sets


def parse_tasks(items: list[str]) -> dict[str, str]:
    """``["name=path", "path", ...]`` → ``{name: path}``; a bare path is named after its file stem."""
    out: dict[str, str] = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).stem, item
        name, path = name.strip(), path.strip()
        if not name or not path:
            raise ValueError(f"--task expects NAME=PATH, got {item!r}")
        if name in out:
            raise ValueError(f"task name {name!r} given twice (use NAME=PATH to name tasks apart)")
        out[name] = path
    if not out:
        raise ValueError("no task checkpoints given: use --task NAME=PATH at least once")
    return out


def progress_bar(stream: TextIO = sys.stderr, width: int = 30) -> Callable[[float, str], None]:
    """A ``fn(fraction, description)`` progress callback drawing a one-line text bar on ``stream``."""
    last = {"pct": -1, "desc": None, "done": False}

    def draw(frac: float, desc: str = "") -> None:
        frac = min(max(float(frac), 0.0), 1.0)
        pct = int(frac * 100)
        if (pct == last["pct"] and desc == last["desc"]) or (last["done"] and pct == 100):
            return
        last["pct"], last["desc"], last["done"] = pct, desc, pct == 100
        filled = int(round(frac * width))
        stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {pct:3d}% {desc[:60]:<60}")
        if pct == 100:
            stream.write("\n")
        stream.flush()

    return draw


def _lazy(path: str):
    """A lazy reader (``LazyCheckpoint``) for a plain safetensors checkpoint with open_clip names; None for
    anything that needs converting on load (other formats, Hugging Face CLIP names)."""
    from ..checkpoints import CheckpointError, is_hf_clip_vision
    from ..lazy import LazyCheckpoint

    if Path(path).suffix.lower() != ".safetensors":
        return None
    try:
        lazy = LazyCheckpoint(path)
    except (CheckpointError, OSError, ValueError):
        return None                               # load_checkpoint gives the precise error
    return None if is_hf_clip_vision(dict.fromkeys(lazy.keys())) else lazy


def run_merge(base_path: str, tasks: dict[str, str], method: str, params: dict, *, out: str, device: str = "auto",
              visual: bool = False, progress: Callable[[float, str], None] | None = None,
              log: Callable[[str], None] | None = None) -> dict:
    """Load, merge, save. Returns the summary printed by ``--json``."""
    from ..checkpoints import load_checkpoint, save_safetensors, visual_only
    from ..lazy import LazyCheckpoint
    from ..merging import apply_updates, get_method, merge_updates

    log = log or (lambda msg: None)
    m = get_method(method)
    if m.needs_stats:
        raise ValueError(f"method {method!r} needs activation statistics of each task (a task pool with data); "
                         f"it cannot merge bare checkpoint files — use `esm-studio eval --pool ... --method {method}`")
    resolved = m.resolve(params)
    if Path(out).suffix.lower() != ".safetensors":
        raise ValueError(f"--out {out!r}: merged models are written as safetensors; give it a .safetensors name")

    t0 = time.perf_counter()
    log(f"loading base {base_path}")
    base = load_checkpoint(base_path, max_bytes=None)
    if visual:
        base = visual_only(base)
        if not base:
            raise ValueError(f"--visual-only: base {base_path} has no visual.* keys")
    task_sds = {}
    for name, path in tasks.items():
        lazy = _lazy(path) if not visual else None
        if lazy is not None:                      # read key by key during the merge: peak ≈ base + one layer × T
            log(f"task {name!r}: {path} (read lazily)")
            task_sds[name] = lazy
            continue
        log(f"loading task {name!r} from {path}")
        notes: list[str] = []                     # a LoRA adapter (folder / .zip, methods §1) says what it holds
        task_sds[name] = load_checkpoint(path, base=base, max_bytes=None, base_name=Path(base_path).name, notes=notes)
        own = [k for k in task_sds[name] if k not in base]   # its modules_to_save the base lacks: not mergeable
        for k in own:
            del task_sds[name][k]
        for line in notes + ([f"task {name!r}: left out of the merge (the base has no such keys): "
                              f"{', '.join(own[:4])}{' …' if len(own) > 4 else ''}"] if own else []):
            log(line)
    log(f"merging {len(task_sds)} task(s) with {method!r} {resolved}")
    ups = merge_updates(method, base, task_sds, device=device, progress=progress,
                        check=any(isinstance(sd, LazyCheckpoint) for sd in task_sds.values()), **resolved)
    if progress is not None:
        progress(1.0, "merged")
    merged = apply_updates(base, ups)
    config = {"method": method, "params": resolved, "tasks": dict(tasks), "base": str(base_path),
              "visual_only": bool(visual), "esm_studio_version": __version__}
    save_safetensors(merged, out, config)
    log(f"wrote {out}")
    return {"method": method, "params": resolved, "tasks": dict(tasks), "base": str(base_path), "out": str(out),
            "seconds": round(time.perf_counter() - t0, 3), "keys_merged": len(ups), "keys_total": len(merged)}


def cmd_merge(args) -> int:
    quiet = args.json or args.quiet
    summary = run_merge(args.base, parse_tasks(args.task), args.method, parse_sets(args.set), out=args.out,
                        device=args.device, visual=args.visual_only,
                        progress=None if args.quiet else progress_bar(sys.stderr),
                        log=None if quiet else (lambda msg: print(msg, file=sys.stderr)))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"merged {len(summary['tasks'])} task(s) with {summary['method']} into {summary['out']} "
              f"({summary['keys_merged']} keys updated, {summary['seconds']:.1f} s)")
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("merge", help="merge task checkpoint files into one safetensors file",
                              description="Merge task checkpoint files into one safetensors file "
                                          "(the merge config goes into its metadata).")
    p.add_argument("--base", required=True, help="pre-trained checkpoint (.safetensors/.pt/.pth/.bin/.ckpt)")
    p.add_argument("--task", action="append", required=True, metavar="NAME=PATH",
                   help="a fine-tuned checkpoint; repeat for every task")
    p.add_argument("--method", required=True, help="merging method (see `esm-studio methods`)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="a method parameter, e.g. alpha=0.3")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda[:i]")
    p.add_argument("--out", required=True, help="output file (.safetensors)")
    p.add_argument("--visual-only", action="store_true",
                   help="merge and save only the visual.* tower (drops the text tower of full CLIP checkpoints)")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bar or log lines on stderr")
    p.set_defaults(func=cmd_merge)
