"""``esm-studio bench``: speed and peak memory of every merging method (see :mod:`esm_core.bench`)."""
from __future__ import annotations

import json
import sys



def cmd_app_memory(args) -> int:
    from ..bench import app_memory as am

    def row(r: dict) -> None:
        print(am.format_row(r), file=sys.stderr if args.json else sys.stdout, flush=True)

    res = am.app_memory(tasks=args.app_memory_tasks, blocks=args.app_memory_blocks or args.blocks,
                        model=args.model, seed=args.seed, threads=args.app_memory_threads,
                        limit_gib=args.app_memory_limit_gib, on_row=row)
    print(json.dumps(res, indent=2) if args.json else am.format_table(res))
    return 0


def cmd_text_speed(args) -> int:
    from ..bench import text_speed as ts

    def progress(frac: float, desc: str) -> None:
        print(f"[{frac:4.0%}] {desc}", file=sys.stderr, flush=True)

    res = ts.text_speed(repeat=args.repeat, tasks=args.tasks, seed=args.seed, folder=args.text_speed_folder,
                        progress=None if args.quiet else progress)
    print(json.dumps(res, indent=2) if args.json else ts.format_table(res))
    return 0


def cmd_bench(args) -> int:
    from ..bench import bench, format_table
    from ..bench.core import MODELS

    if args.model not in MODELS:
        raise ValueError(f"--model must be one of {sorted(MODELS)}, got {args.model!r}")

    if args.app_memory:
        return cmd_app_memory(args)
    if args.text_speed:
        return cmd_text_speed(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    def progress(frac: float, desc: str) -> None:
        print(f"[{frac:4.0%}] {desc}", file=sys.stderr, flush=True)

    res = bench(blocks=args.blocks, tasks=args.tasks, methods=methods, device=args.device, repeat=args.repeat,
                seed=args.seed, progress=None if args.quiet else progress, model=args.model,
                lazy=True if args.lazy else None)
    print(json.dumps(res, indent=2) if args.json else format_table(res))
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("bench", help="time every merging method and measure its peak memory",
                              description="Time every merging method and measure its peak memory on random "
                                          "checkpoints with the exact shapes of an open_clip ViT image tower "
                                          "(side by side in one run, each method in a fresh process on the CPU).")
    p.add_argument("--blocks", type=int, default=None, help="transformer blocks kept (default: all of the model's)")
    p.add_argument("--model", default="ViT-B-32",
                   help="tower shapes: ViT-B-32 (default), ViT-B-16 or ViT-L-14; other models are written to disk and merged lazily")
    p.add_argument("--lazy", action="store_true", help="write the checkpoints to a temporary folder as safetensors "
                                                       "and merge from the paths (key by key)")
    p.add_argument("--tasks", type=int, default=8, help="number of task checkpoints (default 8)")
    p.add_argument("--methods", default=None, help="comma-separated job names (default: every method that "
                                                   "needs no activation statistics, plus the ESM rows: esm, esm_reference, esm_remerge, esm_p_task, "
                                                   "esm_exponent, esm_p_layer, esm_eig_exp, esm_ortho, esm_alpha; "
                                                   "on request: polar_gram, polar_ns)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--repeat", type=int, default=1, help="runs per method; the best time is reported")
    p.add_argument("--seed", type=int, default=0, help="seed of the random checkpoints")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--app-memory", action="store_true",
                   help="instead: drive the app's steps (upload, Spectra, TA and ESM merges, ESM++) on a random "
                        "uploaded pool and print seconds, resident memory and the bytes of statistics and caches")
    p.add_argument("--app-memory-tasks", type=int, default=8, help="task checkpoints of --app-memory (default 8)")
    p.add_argument("--app-memory-blocks", type=int, default=None,
                   help="transformer blocks of --app-memory (default: all; fewer: architecture inferred)")
    p.add_argument("--app-memory-threads", type=int, default=None, help="torch threads of --app-memory")
    p.add_argument("--app-memory-limit-gib", type=float, default=None,
                   help="stop --app-memory once the process is resident above this many GiB")
    p.add_argument("--text-speed", action="store_true",
                   help="instead: time the app's steps (load, Spectra, TA merge and re-merge, ESM merge, ESM++ routing "
                        "of a sentence) on a text pool shaped like the built one (all-MiniLM-L6-v2, --tasks tasks, "
                        "the recipe's sentence counts); --repeat sessions, one after the other: the first's seconds and "
                        "the best of the later ones' (they read what the first computed)")
    p.add_argument("--text-speed-folder", default=None,
                   help="folder for --text-speed's pool (kept and reused; default: a temporary folder)")
    p.set_defaults(func=cmd_bench)
