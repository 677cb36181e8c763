"""``esm-studio eval``: evaluate merging methods (and ESM++) on a pool, α chosen on validation."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .common import parse_sets

ALL_ESMPP_RANKS = (8, 32)            # ESM++ rows of `--method all` (methods §7: r = 8 and 32)


def load_pool_arg(spec: str):
    """``demo``, ``text`` (the built text pool), a demo-style or built-text-pool folder, or a pool file (.json)."""
    from ..pools.demo import load_demo_pool
    from ..pools.poolfile import load_pool
    from ..pools.text_pool import load_text_task_pool

    if spec == "demo":
        return load_demo_pool()
    if spec == "text":
        return load_text_task_pool()
    p = Path(spec)
    if p.is_dir() and (p / "config.json").is_file():
        return load_demo_pool(p)
    if p.is_dir() and (p / "pool.json").is_file():
        return load_text_task_pool(p)
    if p.suffix == ".json":
        return load_pool(p)
    raise ValueError(f"--pool must be 'demo', 'text', a demo-style or text-pool folder or a pool file (.json), "
                     f"got {spec!r}")


def _row(summary: dict) -> dict:
    return {"tasks": summary["tasks"], "mean_abs": summary["mean_abs"], "mean_norm": summary["mean_norm"],
            **{k: summary[k] for k in ("alpha", "params", "val_curve", "routing_accuracy", "storage", "alpha_note")
               if k in summary}}


def table(pool, rows: dict[str, dict], split: str) -> str:
    tasks = pool.task_names
    w = max(10, *(len(t) for t in tasks))
    head = f"{'method':14s}{'alpha':>7s} " + " ".join(f"{t[:w]:>{w}s}" for t in tasks) + f" {'mean':>7s} {'norm':>7s}"
    lines = [f"pool {pool.name!r}, split {split!r}: top-1 accuracy % (norm = mean of acc / fine-tuned acc)", head,
             "-" * len(head)]
    for name, r in rows.items():
        a = f"{r['alpha']:.3f}" if "alpha" in r else "-"
        cells = " ".join(f"{100 * r['tasks'][t]['abs']:>{w}.1f}" for t in tasks)
        lines.append(f"{name:14s}{a:>7s} {cells} {100 * r['mean_abs']:7.2f} {100 * r['mean_norm']:7.2f}")
    return "\n".join(lines)


def plan(method: str, params: dict) -> list[tuple[str, dict, dict]]:
    """``[(method or "esmpp", method params, ESM++ params)]`` to run for ``--method`` and its ``--set`` values.

    For ESM++, ``--set`` names of :data:`ESMPP` (rank, routed_types) go to ESM++, every other one to the
    static ESM merge (so ESM's own rank can be set for an ESM++ run)."""
    from ..esmpp import ESMPP
    from ..merging import METHODS, get_method

    if method == "all":
        if params:
            raise ValueError("--set cannot be combined with --method all")
        return [(m, {}, {}) for m in METHODS] + [("esmpp", {}, {"rank": r}) for r in ALL_ESMPP_RANKS]
    if method == "esmpp":
        own = {p.name for p in ESMPP.params}
        pp = ESMPP.resolve({k: v for k, v in params.items() if k in own})
        esm = {k: v for k, v in params.items() if k not in own}
        get_method("esm").resolve(esm)                  # refuse a bad ESM parameter before any work
        return [("esmpp", esm, pp)]
    get_method(method)
    return [(method, params, {})]


def cmd_eval(args) -> int:
    from ..evaluation import evaluate_esmpp, evaluate_method, reference_accuracies, summarize
    from ..evaluation.accuracy import suspicious_references
    from ..merging import get_method
    from ..probe import probe_pool

    quiet = args.json or args.quiet

    def progress(frac, desc):
        if not quiet:
            print(f"\r[{100 * frac:5.1f} %] {desc[:90]:90s}", end="", file=sys.stderr, flush=True)

    pool = load_pool_arg(args.pool)
    params = parse_sets(args.set)
    refs = reference_accuracies(pool, args.split, device=args.device)
    warnings = suspicious_references(refs["finetuned"], refs["zeroshot"])
    rows = {"zeroshot": _row(summarize(pool, refs["zeroshot"], args.split)),
            "finetuned": _row(summarize(pool, refs["finetuned"], args.split))}
    if args.method in ("zeroshot", "finetuned"):
        rows, runs = {args.method: rows[args.method]}, []
    else:
        runs = plan(args.method, params)
    alpha = args.alpha if args.alpha == "auto" else float(args.alpha)
    stats = None
    for name, p, pp in runs:
        needs_stats = name == "esmpp" or get_method(name).needs_stats
        if needs_stats and stats is None:
            stats = probe_pool(pool, progress=progress)
        if name == "esmpp":
            # Under --method all, ESM++ starts from the ESM row's α rather than searching again.
            a = rows["esm"]["alpha"] if "esm" in rows and alpha == "auto" else alpha
            for key, r in evaluate_esmpp(pool, pp, p, alpha=a, split=args.split, stats=stats, device=args.device,
                                         progress=progress).items():
                rows[key] = _row(r)
            continue
        r = evaluate_method(pool, name, p, alpha=alpha, split=args.split, stats=stats if needs_stats else None,
                            device=args.device, progress=progress)
        rows[name] = _row(r)
    if not quiet:
        print("", file=sys.stderr)
    if args.json:
        print(json.dumps({"pool": pool.name, "split": args.split, "tasks": pool.task_names, "results": rows,
                          "warnings": warnings}, indent=2))
    else:
        print(table(pool, rows, args.split))
        for w in warnings:                # they qualify the table's normalised numbers: printed with it
            print(f"warning: {w}")
        for name, r in rows.items():      # the α search went past its grid: how far, and why
            if r.get("alpha_note"):
                print(f"note ({name}): {r['alpha_note']}")
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate a merging method on a pool (per-task accuracy, α search)",
                              description="Evaluate a merging method (or ESM++, or all of them) on a pool: α chosen "
                                          "on the validation split, then top-1 accuracy per task on --split, absolute "
                                          "and normalised by each fine-tuned model's accuracy.")
    p.add_argument("--pool", default="demo",
                   help="'demo' (built-in), 'text' (the built text pool: esm-studio build-pool text), a demo-style or "
                        "text-pool folder, or a pool file")
    p.add_argument("--method", required=True, help="a method name, 'esmpp' (ESM++: --set rank=8|32, routed and "
                   "oracle rows; other --set names go to the static ESM merge), 'all', 'zeroshot' or 'finetuned'")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="method parameter (repeatable)")
    p.add_argument("--alpha", default="auto", help="'auto' (chosen on validation) or a number")
    p.add_argument("--split", default="test", choices=("val", "test"),
                   help="the split the table reports (α is always chosen on val; default: test)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda[:i]")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=cmd_eval)
