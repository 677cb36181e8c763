"""``esm-studio merge``: merge checkpoint files into one safetensors file, or a folder that loads in the ecosystem.

    esm-studio merge --base zeroshot.pt --task cars=cars.pt --task dtd=dtd.pt \\
        --method ta --set alpha=0.3 --out merged.safetensors

``--out <new folder>`` writes a transformers folder (text models; config.json and tokenizer files from next to
the base, or ``--model``) or an open_clip folder (``--model <name | config.json>``), with the recipe and a model
card (:func:`esm_core.package.write_export`, the writer the app's Export view uses). The merge config (method,
resolved parameters, task files, base file, versions) is stored in the output's metadata (read it back with
:func:`esm_core.package.read_export`). Methods that need activation
statistics (the ESM family) need a task pool with data: use ``esm-studio eval``.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable, TextIO

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
              log: Callable[[str], None] | None = None, format: str = "auto", dtype: str = "float32",
              model: str | None = None, command: str | None = None) -> dict:
    """Load, merge, save (:func:`esm_core.package.write_export`: a .safetensors file, or a folder that loads in
    transformers / open_clip, with the recipe and a model card). Returns the summary printed by ``--json``."""
    from .. import package
    from ..checkpoints import load_checkpoint, visual_only
    from ..lazy import LazyCheckpoint
    from ..merging import apply_updates, get_method, merge_updates

    log = log or (lambda msg: None)
    m = get_method(method)
    if m.needs_stats:
        raise ValueError(f"method {method!r} needs activation statistics of each task: give each task's proxy "
                         f"data with --proxy TASK=<folder | zip | csv | jsonl> (run_proxy_merge)")
    resolved = m.resolve(params)
    package.check_target(out, format)                 # before loading anything
    package._dtype(dtype)

    t0 = time.perf_counter()
    log(f"loading base {base_path}")
    base = load_checkpoint(base_path, max_bytes=None)
    if visual:
        base = visual_only(base)
        if not base:
            raise ValueError(f"--visual-only: base {base_path} has no image-tower keys")
    family = package.family_for_keys(base)            # the output's format and model files, before any task is read
    fmt = package.export_format(out, family, format)
    info = {} if fmt == "safetensors" else package.model_info_from_files(family, base_path, model)
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
    _check_heads(base, task_sds, family)
    log(f"merging {len(task_sds)} task(s) with {method!r} {resolved}")
    ups = merge_updates(method, base, task_sds, device=device, progress=progress,
                        check=any(isinstance(sd, LazyCheckpoint) for sd in task_sds.values()), **resolved)
    if progress is not None:
        progress(1.0, "merged")
    merged = apply_updates(base, ups)
    config = {"method": method, "params": resolved, "tasks": dict(tasks), "base": str(base_path),
              "visual_only": bool(visual), "source": "cli"}
    package.write_export(out, merged, base_sd=base, family=family, model_info=info, recipe=config, format=fmt,
                         dtype=dtype, command=command)
    log(f"wrote {out}")
    return {"method": method, "params": resolved, "tasks": dict(tasks), "base": str(base_path), "out": str(out),
            "seconds": round(time.perf_counter() - t0, 3), "keys_merged": len(ups), "keys_total": len(merged)}


def _check_heads(base, task_sds, family: str) -> None:
    """Refuse, pointing to --proxy, tasks whose own keys (classifier heads: methods §8) differ in shape from the
    base's: merging checkpoints alone keeps the base's head, which cannot hold a head of another size."""
    from .. import models
    from ..lazy import is_lazy
    fam = models.FAMILIES.get(family)
    if fam is None:
        return
    own = [k for k, role in fam.roles_of(base).items() if role == models.OWN]
    for name, sd in task_sds.items():
        shapes = {k: tuple(sd.shape(k) if is_lazy(sd) else sd[k].shape) for k in own if k in sd}   # headers only
        bad = [f"{k}: {s} vs base {tuple(base[k].shape)}" for k, s in shapes.items() if s != tuple(base[k].shape)]
        if bad:
            raise ValueError(f"task {name!r}: its own head has another size than the base's ({'; '.join(bad[:3])}); "
                             "merging checkpoints alone keeps the base's head. Give every task's labelled data with "
                             "--proxy TASK=<folder | zip | csv | jsonl> (with --config): each task is then scored "
                             "with its own head")


def _command(args) -> str:
    """The command line of this merge, for the model card (options in a fixed order, paths as given)."""
    import shlex
    parts = ["esm-studio", "merge", "--base", args.base, *[x for t in args.task for x in ("--task", t)],
             "--method", args.method, *[x for kv in args.set or [] for x in ("--set", kv)], "--out", args.out]
    for opt in ("format", "dtype", "model", "config"):
        val = getattr(args, opt, None)
        if val and val not in ("auto", "float32"):
            parts += [f"--{opt}", val]
    if args.visual_only:
        parts.append("--visual-only")
    return shlex.join(parts)


PROXY_METHODS = ("esmpp",)      # besides the methods that need statistics: ESM++ (written as its bundle)


def _read_json(path, what: str, max_bytes: int = 4 * 1024 ** 2) -> dict:
    """A JSON object from a file: bounded in size, strict (NaN / Infinity refused), duplicate keys refused."""
    from ..pools.upload_text import loads_bounded
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{what}: {p} is not a file")
    if p.stat().st_size > max_bytes:
        raise ValueError(f"{what}: {p.name} is larger than {max_bytes // 1024 ** 2} MiB")
    try:
        obj = loads_bounded(p.read_text(encoding="utf-8"), f"{what} {p.name}", 64)
    except UnicodeDecodeError:
        raise ValueError(f"{what}: {p.name} is not UTF-8 text") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{what}: {p.name} does not hold a JSON object")
    return obj


def _esmpp_params(params: dict) -> tuple[dict, dict]:
    """``--set`` values of ``--method esmpp`` split into ESM++'s own (rank, routed_types) and ESM's (α, ...),
    each checked by its schema; α defaults to ESM's default."""
    from ..merging import get_method
    from ..schemas import ESMPP
    own = {k: v for k, v in params.items() if k in {p.name for p in ESMPP.params}}
    esm = get_method("esm").resolve({k: v for k, v in params.items() if k not in own})
    return ESMPP.resolve(own), esm


def run_proxy_merge(base_path: str, tasks: dict[str, str], method: str, params: dict, proxy: dict[str, str], *,
                    out: str, n: int = 32, seed: int = 0, arch: str = "auto", config: str | None = None,
                    preprocessor: str | None = None, head_width: int | None = None,
                    normalisation: str | None = None, tokenizer: list[str] | None = None, device: str = "auto",
                    format: str = "auto", dtype: str = "float32", model: str | None = None,
                    command: str | None = None, expect_ids: dict | None = None,
                    progress: Callable[[float, str], None] | None = None,
                    log: Callable[[str], None] | None = None) -> dict:
    """Probe each task on its own proxy data, merge, write (ESM and every method; ``method="esmpp"`` writes the
    ESM++ bundle). The merge is the app's for the same pool and proxy samples
    (:mod:`esm_core.evaluation.proxy`). ``expect_ids``: ``{task: ids}`` a recipe recorded — refused, naming the
    task, when the samples drawn now differ. Returns the summary printed by ``--json``."""
    from .. import package
    from ..esmpp import save_esmpp
    from ..evaluation import proxy as P
    from ..evaluation.esmpp import build_esmpp
    from ..merging import get_method
    from ..merging.esm import new_cache

    log = log or (lambda msg: None)
    report = progress or (lambda f, d: None)
    if method == "esmpp":
        own, resolved = _esmpp_params(params)
        if Path(out).suffix.lower() != ".safetensors":
            raise ValueError(f"--out {out!r}: the ESM++ bundle is one .safetensors file; give it a .safetensors name")
    else:
        resolved = get_method(method).resolve(params)
        package.check_target(out, format)                 # before loading anything
        package._dtype(dtype)
    unknown = sorted(set(proxy) - set(tasks))
    if unknown:
        raise ValueError(f"--proxy for {unknown}, which are not among the tasks {sorted(tasks)}")
    cfg = _read_json(config, "--config") if config else None
    pre = _read_json(preprocessor, "--preprocessor") if preprocessor else None
    tok = None
    if tokenizer:
        tok = {Path(f).name: f for f in tokenizer}
    elif config and any(str(v).lower().endswith((".csv", ".jsonl")) for v in proxy.values()):
        tok = {f: str(Path(config).parent / f) for f in package.TOKENIZER_NAMES
               if (Path(config).parent / f).is_file()}
    t0 = time.perf_counter()
    log(f"reading the base, {len(tasks)} task(s) and {n} proxy sample(s) per task (seed {seed})")
    pool = P.proxy_pool(base_path, tasks, proxy, n=n, seed=seed, arch=arch, config=cfg, preprocessor=pre,
                        head_width=head_width, normalisation=normalisation, tokenizer_files=tok,
                        progress=lambda f, d: report(0.25 * f, d))
    for note in [pool.meta.get("architecture"), *pool.meta.get("notes", [])]:
        if note:
            log(note)
    stats = P.probe_proxy(pool, device=device, progress=lambda f, d: report(0.25 + 0.25 * f, d))
    if expect_ids is not None:
        for t in pool.task_names:
            want = [int(i) for i in (expect_ids.get(t) or [])]
            if want != list(stats["proxy_ids"][t]):
                raise ValueError(f"task {t!r}: the proxy samples drawn now ({len(stats['proxy_ids'][t])}, ids "
                                 f"{list(stats['proxy_ids'][t])[:6]}…) are not the recipe's ({len(want)}, ids "
                                 f"{want[:6]}…): its proxy data or sample count differs")
    proxy_rec = {"n": stats["n"], "seed": stats["seed"], "ids": stats["proxy_ids"],
                 "sources": {t: str(v) for t, v in proxy.items()}}
    recipe = {"method": method, "params": resolved, "tasks": dict(tasks), "base": str(base_path),
              "visual_only": False, "source": "cli", "proxy": proxy_rec,
              "model_args": {k: v for k, v in (("arch", arch), ("config", config), ("preprocessor", preprocessor),
                                                ("head_width", head_width), ("normalisation", normalisation),
                                                ("tokenizer", [str(f) for f in tokenizer] if tokenizer else None))
                             if v is not None and v != "auto"}}
    if method == "esmpp":
        cache = new_cache()
        routed = build_esmpp(pool, stats, rank=own["rank"], routed_types=own["routed_types"],
                             alpha=resolved["alpha"], esm_params=resolved, device=device, cache=cache, check=False,
                             progress=lambda f, d: report(0.5 + 0.5 * f, d))
        recipe["params"] = {**resolved, **own}
        save_esmpp(out, routed.merged_sd, routed.experts, {**routed.config, "recipe": recipe},
                   model=package.rebuild_info_of(pool))          # load_routed rebuilds it from the file alone
        keys = len(routed.keys)
        merged = routed.merged_sd
    else:
        merged = P.merge_pool(pool, method, resolved, stats=stats, device=device,
                               progress=lambda f, d: report(0.5 + 0.45 * f, d))
        family = package.family_of_pool(pool)
        fmt = package.export_format(out, family, format)
        info = {} if fmt == "safetensors" else package.model_info_of(pool)
        package.write_export(out, merged, base_sd=pool.base, family=family, model_info=info, recipe=recipe,
                             format=fmt, dtype=dtype, command=command)
        keys = sum(1 for k in merged if not torch_equal(merged[k], pool.base[k]))
    report(1.0, "written")
    log(f"wrote {out}")
    return {"method": method, "params": recipe["params"], "tasks": dict(tasks), "base": str(base_path),
            "out": str(out), "proxy": {"n": stats["n"], "seed": stats["seed"], "ids": stats["proxy_ids"]},
            "seconds": round(time.perf_counter() - t0, 3), "keys_merged": keys, "keys_total": len(merged)}


def torch_equal(a, b) -> bool:
    import torch
    return a.shape == b.shape and bool(torch.equal(a, b.to(a.dtype)))


def _proxy_command(args) -> str:
    """The command line of a proxy merge, for the model card."""
    import shlex
    parts = ["esm-studio", "merge", "--base", args.base, *[x for t in args.task for x in ("--task", t)],
             *[x for t in args.proxy or [] for x in ("--proxy", t)], "--method", args.method,
             *[x for kv in args.set or [] for x in ("--set", kv)], "--proxy-samples", str(args.proxy_samples),
             "--seed", str(args.seed), "--out", args.out]
    for opt in ("arch", "config", "preprocessor", "head_width", "normalisation", "format", "dtype", "model"):
        val = getattr(args, opt, None)
        if val is not None and val not in ("auto", "float32"):
            parts += [f"--{opt.replace('_', '-')}", str(val)]
    parts += [x for f in getattr(args, "tokenizer", None) or [] for x in ("--tokenizer", f)]   # maybe not beside it
    return shlex.join(parts)


def _needs_proxy(method: str) -> bool:
    from ..merging import get_method
    return method in PROXY_METHODS or get_method(method).needs_stats


def _files(given: list[str] | None, recorded: dict | None, what: str, tasks: list[str]) -> dict[str, str]:
    files = parse_tasks(given) if given else dict(recorded or {})
    if not files:
        raise ValueError(f"the recipe names no {what} files (an app export names its pool): give "
                         f"--{what} TASK=PATH for each of its tasks {tasks}")
    if list(files) != list(tasks):
        raise ValueError(f"--{what}: the recipe's tasks are {tasks} (in this order), given {list(files)}")
    return files


def cmd_recipe(args) -> int:
    """``esm-studio merge --recipe FILE``: repeat a merge from its recipe (:mod:`esm_core.evaluation.recipes`: an
    export's metadata, an export folder or a config ``.json``), bit for bit. ``--base`` / ``--task`` / ``--proxy``
    replace the recipe's files (an app export names its pool, not files: give them); the task names must be the
    recipe's, in its order, and an ESM merge must draw the same proxy samples, or it is refused naming the
    difference before anything is written."""
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
            normalisation=args.normalisation or ma.get("normalisation"),
            tokenizer=args.tokenizer or ma.get("tokenizer"),
            device=args.device, format=args.format, dtype=args.dtype, model=args.model,
            command=f"esm-studio merge --recipe {args.recipe} --out {args.out}", expect_ids=r.proxy["ids"],
            progress=progress, log=log)
    else:
        summary = run_merge(base, tasks, r.method, dict(r.params), out=args.out, device=args.device,
                            visual=r.visual_only, format=args.format, dtype=args.dtype, model=args.model,
                            command=f"esm-studio merge --recipe {args.recipe} --out {args.out}",
                            progress=progress, log=log)
    return _print_summary(args, summary)


def cmd_merge(args) -> int:
    quiet = args.json or args.quiet
    if getattr(args, "recipe", None):
        return cmd_recipe(args)
    missing = [f"--{o}" for o in ("base", "task", "method") if not getattr(args, o)]
    if missing:
        raise ValueError(f"merge needs {', '.join(missing)} (or --recipe FILE to repeat a merge)")
    if args.proxy or _needs_proxy(args.method):
        if not args.proxy:
            raise ValueError(f"method {args.method!r} probes each task on its own data: give "
                             "--proxy TASK=<folder | zip | csv | jsonl> for every task")
        summary = run_proxy_merge(
            args.base, parse_tasks(args.task), args.method, parse_sets(args.set), parse_tasks(args.proxy),
            out=args.out, n=args.proxy_samples, seed=args.seed, arch=args.arch, config=args.config,
            preprocessor=args.preprocessor, head_width=args.head_width, normalisation=args.normalisation,
            tokenizer=args.tokenizer, device=args.device, format=args.format, dtype=args.dtype, model=args.model,
            command=_proxy_command(args), progress=None if args.quiet else progress_bar(sys.stderr),
            log=None if quiet else (lambda msg: print(msg, file=sys.stderr)))
        return _print_summary(args, summary)
    summary = run_merge(args.base, parse_tasks(args.task), args.method, parse_sets(args.set), out=args.out,
                        device=args.device, visual=args.visual_only, format=args.format, dtype=args.dtype,
                        model=args.model or args.config, command=_command(args),
                        progress=None if args.quiet else progress_bar(sys.stderr),
                        log=None if quiet else (lambda msg: print(msg, file=sys.stderr)))
    return _print_summary(args, summary)


def _print_summary(args, summary: dict) -> int:
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
    p.add_argument("--base", help="pre-trained checkpoint (.safetensors/.pt/.pth/.bin/.ckpt)")
    p.add_argument("--task", action="append", metavar="NAME=PATH",
                   help="a fine-tuned checkpoint; repeat for every task")
    p.add_argument("--method", help="merging method (see `esm-studio methods`), or esmpp (writes the ESM++ bundle)")
    p.add_argument("--recipe", metavar="FILE",
                   help="repeat a merge: an export (.safetensors / folder) or its config .json; --base, --task, "
                        "--proxy given here replace the recipe's files")
    p.add_argument("--proxy", action="append", metavar="NAME=PATH",
                   help="a task's proxy data for ESM / ESM++ (and any method): a folder or .zip of images (class "
                        "folders or flat), or .csv / .jsonl labelled sentences (text classifiers: BERT family, "
                        "Llama, Qwen2, Mistral; needed by every method when the tasks' heads differ in size); "
                        "repeat per task")
    p.add_argument("--proxy-samples", type=int, default=32, help="proxy samples per task (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the proxy samples' draw (default 0)")
    p.add_argument("--arch", default="auto",
                   help="image base's architecture: an open_clip model name, 'demo' or 'infer' (with --head-width "
                        "and --normalisation); default: read from --config")
    p.add_argument("--config", default=None,
                   help="the base's config: an open_clip model config .json, a Hugging Face CLIP config.json, or "
                        "a text model's config.json (BERT family, Llama, Qwen2, Mistral; its tokenizer files are "
                        "read from beside it unless --tokenizer names them)")
    p.add_argument("--preprocessor", default=None, help="Hugging Face preprocessor_config.json (image mean / std)")
    p.add_argument("--head-width", type=int, default=None, help="attention head width (with --arch infer)")
    p.add_argument("--normalisation", default=None, choices=("clip", "half"),
                   help="image mean / std: OpenAI CLIP's or 0.5 / 0.5")
    p.add_argument("--tokenizer", action="append", metavar="FILE",
                   help="a tokenizer file of a text model: tokenizer.json, tokenizer_config.json, ...; repeat per "
                        "file (default: those beside --config)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="a method parameter, e.g. alpha=0.3")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda[:i]")
    p.add_argument("--out", required=True,
                   help="a .safetensors file (the merged state dict), or a new folder: a transformers folder for "
                        "text models, an open_clip folder for image models (with heads, recipe and README.md)")
    p.add_argument("--format", default="auto", choices=("auto", "safetensors", "transformers", "open_clip"),
                   help="auto: by --out's name and the model family")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="floating-point type of the written weights (default float32)")
    p.add_argument("--model", default=None,
                   help="for a folder: the open_clip model name or config .json (image models), or the "
                        "config.json of a text model (default: --config, else the config.json next to --base, "
                        "with its tokenizer files)")
    p.add_argument("--visual-only", action="store_true",
                   help="merge and save only the image tower (drops the text tower of full CLIP checkpoints)")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bar or log lines on stderr")
    p.set_defaults(func=cmd_merge)
