"""``esm-studio build-pool text``: the pre-trained text pool (methods §8).

The text pool (all-MiniLM-L6-v2 fully fine-tuned on 8 real text tasks read from
registry packages) is built on the user's machine into a cache folder outside
the repository (several sources may not be redistributed); ``esm-studio eval
--pool text`` evaluates every method on it, like on any other pool.
"""
from __future__ import annotations

import sys

from .merge import progress_bar


def cmd_build_pool(args) -> int:
    from ..pools import text_build

    if args.name != "text":
        raise ValueError(f"unknown pool {args.name!r}: the buildable pools are 'text' (and the demo: build-demo)")
    argv = [args.out or str(text_build.TEXT_POOL_DIR)] + ["--device", args.device] + (["--tasks", args.tasks] if args.tasks else []) \
        + (["--no-reuse"] if args.no_reuse else [])
    rc = text_build.main(argv)
    if rc or args.no_warm or args.out is not None:
        return rc                      # the app reads the pool (and its kept results) from the default folder only
    try:
        from ..studio.warm import warm_text_pool
    except ImportError as e:           # the library alone: no app to warm for
        print(f"not warmed for the app ({e.name} is not installed: pip install -e \".[app]\")", file=sys.stderr)
        return rc
    print("warming the pool for the app: references, the first merge, the Spectra view", file=sys.stderr)
    seconds = warm_text_pool(progress=progress_bar(sys.stderr))
    print("warmed: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()), file=sys.stderr)
    return rc


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("build-pool", help="build the text pool (MiniLM fine-tuned on 8 real text tasks) "
                                                 "into the cache folder")
    p.add_argument("name", choices=("text",), help="which pool")
    p.add_argument("--out", default=None, help="output folder (default: <ESM_STUDIO_CACHE or ~/.cache/esm-studio>/text-pool)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--tasks", default=None, help="comma-separated subset of the tasks")
    p.add_argument("--no-reuse", action="store_true", help="fine-tune every task again (default: reuse the tasks "
                   "of the pool already there that the same recipe, model and task position would rebuild)")
    p.add_argument("--no-warm", action="store_true", help="skip computing, once after the build, what every app "
                   "session reads first (reference accuracies, the first merge, the Spectra view: about 2 CPU min)")
    p.set_defaults(func=cmd_build_pool)
