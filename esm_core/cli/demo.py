"""``esm-studio build-demo``: rebuild the demo pool from the registry packages."""
from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

from ..pools.demo import CACHE_DIR, DEMO_DIR, RECIPE, build_demo


def cmd_build_demo(args) -> int:
    recipe = copy.deepcopy(RECIPE)
    if args.steps is not None:
        recipe["pretrain"]["steps"] = args.steps
    if args.ft_steps is not None:
        recipe["finetune"]["steps"] = args.ft_steps
    last = [0.0]

    def progress(frac, desc):
        now = time.time()
        if now - last[0] > 2 or frac >= 1.0:
            print(f"[{frac * 100:5.1f} %] {desc}", file=sys.stderr, flush=True)
            last[0] = now
    cfg = build_demo(args.out, recipe=recipe, device=args.device, cache_dir=Path(args.cache), progress=progress)
    print(json.dumps(cfg["build_accuracy"], indent=2))
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("build-demo", help="rebuild the demo pool (tiny ViT, real image tasks) from scratch")
    p.add_argument("--out", default=str(DEMO_DIR), help="output folder (default: assets/demo)")
    p.add_argument("--steps", type=int, default=None, help=f"pre-training steps (default {RECIPE['pretrain']['steps']})")
    p.add_argument("--ft-steps", type=int, default=None,
                   help=f"fine-tuning steps per task (default {RECIPE['finetune']['steps']})")
    p.add_argument("--device", default="cpu", help="cpu (reference) or cuda")
    p.add_argument("--cache", default=str(CACHE_DIR), help="raw-data cache folder (default ~/.cache/esm-studio)")
    p.set_defaults(func=cmd_build_demo)
