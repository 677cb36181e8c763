"""``esm-studio app``: start the ESM Studio web app (``app.py`` at the repository root).

The app itself is not part of the library (gradio is imported only by
``app.py``); this module finds ``app.py`` next to the package and launches its
``main()``.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

APP_FILE = Path(__file__).resolve().parents[2] / "app.py"


def load_app_module(path: str | Path = APP_FILE):
    """Import ``app.py`` from ``path`` as a module (it holds ``build_app`` / ``make_demo`` / ``main``)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"app.py not found at {p}: run `esm-studio app` from a source checkout "
                                "(pip install -e .), or `python app.py` in the repository")
    spec = importlib.util.spec_from_file_location("esm_studio_app", p)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def cmd_app(args) -> int:
    mod = load_app_module()
    mod.main(port=args.port, share=(args.share == "yes"), server_name=args.host)
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("app", help="start the ESM Studio web app (built-in demo pool)")
    p.add_argument("--port", type=int, default=None, help="port (default: GRADIO_SERVER_PORT or 7860)")
    p.add_argument("--host", default=None, help="address to listen on (default: GRADIO_SERVER_NAME or 127.0.0.1)")
    p.add_argument("--share", choices=("no", "yes"), default="no",
                   help="create a public gradio.live link (needs network; default: no)")
    p.set_defaults(func=cmd_app)
