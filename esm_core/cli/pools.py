"""``esm-studio build-pool text`` and ``esm-studio eval-text``: the pre-trained text pool (SPEC §8).

The text pool (all-MiniLM-L6-v2 fully fine-tuned on 8 real text tasks read from
registry packages) is built on the user's machine into a cache folder outside
the repository (several sources may not be redistributed); ``eval-text`` prints
the merging methods' table on it.
"""
from __future__ import annotations

from ..evaluation import text_runs
from ..pools import text_build


def cmd_build_pool(args) -> int:
    if args.name != "text":
        raise ValueError(f"unknown pool {args.name!r}: the buildable pools are 'text' (and the demo: build-demo)")
    argv = [args.out] + ["--device", args.device] + (["--tasks", args.tasks] if args.tasks else []) \
        + (["--no-reuse"] if args.no_reuse else [])
    return text_build.main(argv)


def cmd_eval_text(args) -> int:
    argv = [args.pool, "--methods", args.methods, "--n-val", str(args.n_val), "--n-test", str(args.n_test)]
    return text_runs.main(argv + (["--out", args.out] if args.out else []))


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("build-pool", help="build the text pool (MiniLM fine-tuned on 8 real text tasks) "
                                                 "into the cache folder")
    p.add_argument("name", choices=("text",), help="which pool")
    p.add_argument("--out", default=str(text_build.TEXT_POOL_DIR), help="output folder (default: the cache)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--tasks", default=None, help="comma-separated subset of the tasks")
    p.add_argument("--no-reuse", action="store_true", help="fine-tune every task again (default: reuse the tasks "
                   "of the pool already there that the same recipe, model and task position would rebuild)")
    p.set_defaults(func=cmd_build_pool)
    p = subparsers.add_parser("eval-text", help="merging methods on the built text pool (SPEC §8 rules)")
    p.add_argument("--pool", default=str(text_build.TEXT_POOL_DIR))
    p.add_argument("--methods", default="ta,ties,tsv_m,esm")
    p.add_argument("--n-val", type=int, default=100, help="validation sentences per task for the α choice")
    p.add_argument("--n-test", type=int, default=0, help="test sentences per task (0 = all)")
    p.add_argument("--out", default=None, help="also write the results as JSON")
    p.set_defaults(func=cmd_eval_text)
