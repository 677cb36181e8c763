"""``esm-studio merge --recipe FILE``: repeat a merge from its recipe, bit for bit.

The recipe (:mod:`esm_core.evaluation.recipes`: an export's metadata, an export folder or a config ``.json``)
gives the method, its parameters, the tasks and — from the command line's exports — the base, task and proxy
files. ``--base`` / ``--task`` / ``--proxy`` replace those files (an app export names its pool, not files:
give them); the task names must be the recipe's, in its order, and an ESM merge must draw the same proxy
samples (the same data, count and seed), or the merge is refused naming the difference before it is written.
"""
from __future__ import annotations

import sys
from pathlib import Path

from .merge import _print_summary, parse_tasks, progress_bar, run_merge, run_proxy_merge


def _files(given: list[str] | None, recorded: dict | None, what: str, tasks: list[str]) -> dict[str, str]:
    files = parse_tasks(given) if given else dict(recorded or {})
    if not files:
        raise ValueError(f"the recipe names no {what} files (an app export names its pool): give "
                         f"--{what} TASK=PATH for each of its tasks {tasks}")
    if list(files) != list(tasks):
        raise ValueError(f"--{what}: the recipe's tasks are {tasks} (in this order), given {list(files)}")
    return files


def cmd_recipe(args) -> int:
    from ..evaluation.recipes import read_recipe
    from ..merging import get_method

    if args.method or args.set:
        raise ValueError("--recipe repeats the recipe's method and parameters: leave out --method and --set")
    r = read_recipe(args.recipe)
    quiet = args.json or args.quiet
    log = None if quiet else (lambda msg: print(msg, file=sys.stderr))
    if log:
        log(f"recipe {Path(args.recipe).name}: {r.describe()}; tasks {r.tasks}")
    base = args.base or r.base
    if not base or not Path(base).is_file():
        raise ValueError(f"the recipe's base {base!r} is not a file here: give --base" if base else
                         "the recipe names no base file: give --base")
    tasks = _files(args.task, r.task_files, "task", r.tasks)
    progress = None if args.quiet else progress_bar(sys.stderr)
    if r.proxy is not None or r.is_esmpp or get_method(r.method).needs_stats:
        if r.proxy is None:
            raise ValueError("the recipe records no proxy samples; an ESM merge cannot be repeated without them")
        proxy = _files(args.proxy, r.proxy.get("sources"), "proxy", r.tasks)
        ma = r.model_args
        summary = run_proxy_merge(
            base, tasks, r.method, dict(r.params), proxy, out=args.out, n=r.proxy["n"], seed=r.proxy["seed"],
            arch=args.arch if args.arch != "auto" else ma.get("arch", "auto"),
            config=args.config or ma.get("config"), preprocessor=args.preprocessor or ma.get("preprocessor"),
            head_width=args.head_width or ma.get("head_width"),
            normalisation=args.normalisation or ma.get("normalisation"), tokenizer=args.tokenizer,
            device=args.device, format=args.format, dtype=args.dtype, model=args.model,
            command=f"esm-studio merge --recipe {args.recipe} --out {args.out}", expect_ids=r.proxy["ids"],
            progress=progress, log=log)
    else:
        summary = run_merge(base, tasks, r.method, dict(r.params), out=args.out, device=args.device,
                            visual=r.visual_only, format=args.format, dtype=args.dtype, model=args.model,
                            command=f"esm-studio merge --recipe {args.recipe} --out {args.out}",
                            progress=progress, log=log)
    return _print_summary(args, summary)

