"""``esm-studio methods``: every merging method with its typed parameters (the app's schema too)."""
from __future__ import annotations

import json



def cmd_methods(args) -> int:
    from ..schemas import ESMPP, SPECS as METHODS      # the schemas alone: no torch

    if args.json:
        print(json.dumps([m.to_dict() for m in METHODS.values()] + [{**ESMPP.to_dict(), "esm_params": "every ESM "
                                                                       "parameter, for the static merge"}], indent=2))
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
    print(f"{ESMPP.name:12s} {ESMPP.title} (`esm-studio eval --method esmpp`; ESM's parameters set the static merge)"
          f"\n{'':12s} {ESMPP.help}")
    for p in ESMPP.params:
        print(f"{'':14s}{p.name} ({p.type.__name__}, default {p.default}): {p.help}")
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("methods", help="list merging methods and their parameters",
                              description="List every merging method (and ESM++) with its typed parameters: name, type, "
                                          "default, range and help — the schema the app builds its controls from.")
    p.add_argument("--json", action="store_true", help="print the schemas as JSON")
    p.set_defaults(func=cmd_methods)
