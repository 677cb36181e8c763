"""``esm-studio sweep``: the papers' figures on a pool (ablation, task count, rank, proxy size), as a table or JSON."""
from __future__ import annotations

import json
import sys

KINDS = ("ablation", "tasks", "rank", "proxy")


def _ints(text: str | None, what: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None


def _floats(text: str | None, what: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated numbers, got {text!r}") from None


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def table(result: dict) -> str:
    """The sweep as a Markdown table (test accuracy %, ± the 95 % half-width; the task sweep: mean ± sd)."""
    kind, rows = result["kind"], result["rows"]
    if kind == "tasks":
        ranks = [k for k in (rows[0] if rows else {}) if k.startswith("rank:")]
        head = ["method", "tasks merged", "subsets", "normalised % (mean ± sd)", "min", "max", "absolute %",
                *[f"k {k[5:]}" for k in ranks]]
        body = [[r["method"], str(r["tasks_merged"]), str(r["subsets"]),
                 f"{_pct(r['mean_norm'])} ± {_pct(r['norm_sd'])}", _pct(r["norm_min"]), _pct(r["norm_max"]),
                 _pct(r["mean_abs"]), *[str(r[k]) for k in ranks]] for r in rows]
    else:
        first = {"ablation": ["variant"], "rank": ["method", "rank", "ESD energy kept %"],
                 "proxy": ["proxy samples / task", "proxy from"]}[kind]
        head = [*first, "α", "test acc % (± 95 %)", "normalised % (± 95 %)", "n"]
        body = []
        for r in rows:
            if kind == "ablation":
                lead = [r["label"]]
            elif kind == "rank":
                lead = [r["method"], (f"fraction {r['rank_fraction']:g}" if r["method"] == "esm"
                                      else f"r = {r['expert_rank']}"), _pct(r["energy"])]
            else:
                lead = [str(r["proxy_n"]), r["proxy_from"]]
            body.append([*lead, f"{r['alpha']:.3f}" if r.get("alpha") is not None else "-",
                         f"{_pct(r['mean_abs'])} ± {_pct(r['mean_abs_hw'])}",
                         f"{_pct(r['mean_norm'])} ± {_pct(r['mean_norm_hw'])}", str(r["n"])])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def cmd_sweep(args) -> int:
    from ..evaluation import sweeps
    from ..studio.export import export_sweep
    from .eval import load_pool_arg

    def progress(frac, desc):
        if not args.quiet:
            print(f"\r[{100 * frac:5.1f} %] {desc[:90]:90s}", end="", file=sys.stderr, flush=True)

    common = {"max_images": args.max_images, "device": args.device, "progress": progress}
    if args.max_images is not None and args.max_images < 1:
        raise ValueError(f"--max-images must be >= 1, got {args.max_images}")
    if args.kind == "ablation":
        run = lambda pool: sweeps.ablation(pool, proxy_n=args.proxy_n, **common)           # noqa: E731
    elif args.kind == "tasks":
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        seeds = _ints(args.seeds, "--seeds")
        counts = _ints(args.counts, "--counts")
        from ..merging import get_method
        for m in methods:
            get_method(m)                                   # an unknown method is refused before the pool loads
        run = lambda pool: sweeps.task_count(pool, methods, seeds, counts=counts, proxy_n=args.proxy_n,  # noqa: E731
                                             **common)
    elif args.kind == "rank":
        fr = _floats(args.fractions, "--fractions")
        er = _ints(args.expert_ranks, "--expert-ranks")
        run = lambda pool: sweeps.rank_sweep(pool, fr, er, proxy_n=args.proxy_n, **common)  # noqa: E731
    else:
        ns = _ints(args.ns, "--ns")
        run = lambda pool: sweeps.proxy_sweep(pool, ns, ood_n=None if args.ood_n == 0 else args.ood_n,  # noqa: E731
                                              **common)
    pool = load_pool_arg(args.pool)
    result = run(pool)
    if not args.quiet:
        print("", file=sys.stderr)
    if args.out:
        files = export_sweep(result, args.out)
        if not args.quiet:
            print("wrote " + ", ".join(files.values()), file=sys.stderr)
    if args.json:
        print(json.dumps({k: result[k] for k in ("kind", "pool", "params", "rows", "points", "seconds")},
                         indent=1, default=str))
    else:
        print(f"{args.kind} sweep on pool {result['pool']!r} ({result['seconds']:.0f} s)")
        print(table(result))
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="the papers' figures on a pool: ablation, task count, rank, proxy size",
                              description="Run a sweep on a pool — many evaluations, each with α chosen on "
                                          "validation — and print its table (or --json rows). ablation: SVD "
                                          "directions → + polarised scaling → ESD → + inter-layer scaling → ESM; "
                                          "tasks: accuracy against the number of tasks merged; rank: ESM rank "
                                          "fraction and ESM++ expert rank with the ESD energy kept; proxy: ESM with "
                                          "1 … 32 proxy samples per task and with another task's proxy inputs.")
    p.add_argument("kind", choices=KINDS, help="which sweep")
    p.add_argument("--pool", default="demo", help="'demo' (built-in), 'text' (the built text pool), a demo-style or "
                   "text-pool folder, or a pool file")
    p.add_argument("--max-images", type=int, default=None, metavar="N",
                   help="evaluate on a seeded subset of at most N validation and N test inputs per task (faster; "
                        "wider intervals); default: all of them")
    p.add_argument("--proxy-n", type=int, default=32, help="proxy samples per task for the statistics (default 32)")
    p.add_argument("--methods", default="esm,tsv_m,task_arithmetic", help="tasks: comma-separated methods")
    p.add_argument("--seeds", default="0,1,2", help="tasks: seeds of the task subsets (comma-separated)")
    p.add_argument("--counts", default=None, help="tasks: numbers of tasks merged (default 2 … T)")
    p.add_argument("--fractions", default="0.25,0.5,1,2", help="rank: ESM rank fractions")
    p.add_argument("--expert-ranks", default="2,8,32", help="rank: ESM++ expert ranks (empty: none)")
    p.add_argument("--ns", default="1,2,4,8,16,32", help="proxy: proxy samples per task")
    p.add_argument("--ood-n", type=int, default=32,
                   help="proxy: samples of the out-of-distribution point (another task's inputs); 0 = none")
    p.add_argument("--out", default=None, metavar="FOLDER", help="also write CSV, JSON and HTML (and PNG where "
                   "plotly can write images) into FOLDER")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda[:i]")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=cmd_sweep)
