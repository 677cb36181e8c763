"""``esm-studio push``: upload an export (a folder written by ``esm-studio merge --out <folder>`` or the app's
Export view, or a merged ``.safetensors``) to a Hugging Face Hub model repository.

    esm-studio push merged-folder --repo user/my-merge [--private]

The token is ``HF_TOKEN`` or huggingface_hub's stored login (``hf auth login``); without one, or offline
(``HF_HUB_OFFLINE=1``, or no answer from the Hub within seconds), it stops at once and says why.
"""
from __future__ import annotations

import json


def cmd_push(args) -> int:
    from ..package import push_export
    out = push_export(args.path, args.repo, private=args.private)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"pushed {len(out['files'])} file(s) to {out['url']}")
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("push", help="upload an export folder or merged .safetensors to the Hugging Face Hub",
                              description="Upload an export (folder or .safetensors) to a Hub model repository, "
                                          "created if missing, with your token (HF_TOKEN or the stored login).")
    p.add_argument("path", help="an export folder (with README.md and merge_recipe.json) or a merged .safetensors")
    p.add_argument("--repo", required=True, metavar="USER/NAME", help="the model repository on the Hub")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    p.set_defaults(func=cmd_push)
