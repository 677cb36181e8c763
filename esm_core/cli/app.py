"""``esm-studio app``: start the ESM Studio web app (:mod:`esm_core.app`, the ``[app]`` extra).

gradio is imported only when the command runs, so the rest of the CLI works without the extra.
"""
from __future__ import annotations


def cmd_app(args) -> int:
    try:
        from esm_core.app import main
    except ImportError as e:           # gradio / plotly missing: say how to get them
        raise SystemExit(f"the web app needs the [app] extra ({e}): pip install \"esm-studio[app]\"") from None
    main(port=args.port, share=(args.share == "yes"), server_name=args.host)
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("app", help="start the ESM Studio web app (built-in demo pool)")
    p.add_argument("--port", type=int, default=None, help="port (default: GRADIO_SERVER_PORT or 7860)")
    p.add_argument("--host", default=None, help="address to listen on (default: GRADIO_SERVER_NAME or 127.0.0.1)")
    p.add_argument("--share", choices=("no", "yes"), default="no",
                   help="create a public gradio.live link (needs network; default: no)")
    p.set_defaults(func=cmd_app)
