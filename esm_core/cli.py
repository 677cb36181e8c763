"""The ``esm-studio`` command line.

Sub-commands: ``methods`` (list methods and their parameters), ``merge``
(merge checkpoint files), ``eval`` (evaluate a method on a pool), ``bench``
(speed and memory of every method), ``build-demo`` (rebuild the demo pool),
``app`` (start the web app).
"""
from __future__ import annotations

import argparse
import json
import sys


def parse_sets(items: list[str] | None) -> dict:
    """``["k=v", ...]`` → ``{k: v}`` (values stay strings; the method schema coerces them)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def cmd_methods(args) -> int:
    from .methods import METHODS
    if args.json:
        print(json.dumps([m.to_dict() for m in METHODS.values()], indent=2))
        return 0
    for m in METHODS.values():
        print(f"{m.name:12s} {m.title}\n{'':12s} {m.help}")
        if m.aliases:
            print(f"{'':12s} also accepted as: {', '.join(m.aliases)}")
        for p in m.params:
            rng = f" choices={list(p.choices)}" if p.choices else (
                f" range=[{p.min}, {p.max}]" if p.min is not None or p.max is not None else "")
            print(f"{'':14s}{p.name} ({p.type.__name__}, default {p.default}{rng}): {p.help}")
        print()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="esm-studio", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("methods", help="list merging methods and their parameters")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_methods)

    # Each remaining sub-command lives with the module it drives.
    for modname in ("esm_core.cli_merge", "esm_core.bench", "esm_core.evaluate", "esm_core.demo", "esm_core.app_launch"):
        try:
            mod = __import__(modname, fromlist=["add_cli"])
        except ModuleNotFoundError as e:
            if e.name != modname:
                raise
            continue
        mod.add_cli(sub)

    args = ap.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"esm-studio {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
