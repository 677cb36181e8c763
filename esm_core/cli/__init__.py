"""The ``esm-studio`` command line.

Sub-commands: ``methods`` (list methods and their parameters), ``merge``
(merge checkpoint files), ``push`` (upload an export to the Hub), ``eval`` (evaluate a method on a pool), ``bench``
(speed and memory of every method), ``build-demo`` (rebuild the demo pool),
``build-pool text`` (the text pool; ``eval --pool text`` evaluates it), ``app`` (start the web app).

Each sub-command module imports torch and the rest of the library inside its
command, never at its top, so that ``--help`` answers without loading them.
"""
from __future__ import annotations

import argparse
import sys

from .. import settings

from . import app, bench, demo, eval, merge, methods, pools, push, sweep

SUBCOMMANDS = (methods, merge, push, eval, sweep, bench, demo, pools, app)     # each module: add_cli(subparsers) + its cmd_*


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="esm-studio", description="ESM Studio: merge fine-tuned models with ESM, "
                                 "ESM++ and the strongest baselines, evaluate them, and start the web app.",
                                 epilog="`esm-studio COMMAND --help` describes each command.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for mod in SUBCOMMANDS:
        mod.add_cli(sub)
    args = ap.parse_args(argv)
    try:
        settings.check_all()            # every environment variable the library reads, checked once at start
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"esm-studio {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
