"""``esm-studio build-demo``: rebuild the demo pool from the registry packages."""
from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path



def cmd_build_demo(args) -> int:
    from ..pools.demo import DEMO_DIR, RECIPE, build_demo
    from ..settings import cache_dir

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
    cfg = build_demo(args.out or DEMO_DIR, recipe=recipe, device=args.device,
                     cache_dir=Path(args.cache) if args.cache else cache_dir(), progress=progress)
    print(json.dumps(cfg["build_accuracy"], indent=2))
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("build-demo", help="rebuild the demo pool (tiny ViT, real image tasks) from scratch")
    p.add_argument("--out", default=None, help="output folder (default: the repository's assets/demo)")
    p.add_argument("--steps", type=int, default=None, help="pre-training steps (default: the recipe's, 2000)")
    p.add_argument("--ft-steps", type=int, default=None,
                   help="fine-tuning steps per task (default: the recipe's, 200)")
    p.add_argument("--device", default="cpu", help="cpu (reference) or cuda")
    p.add_argument("--cache", default=None, help="raw-data cache folder (default: ESM_STUDIO_CACHE or ~/.cache/esm-studio)")
    p.set_defaults(func=cmd_build_demo)
