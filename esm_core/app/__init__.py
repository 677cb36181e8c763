"""ESM Studio, the Gradio web app: one module per view, each with its layout (``layout(ui)``) and its event
wiring (``wire(ui)``); :mod:`.common` holds what they share. The only part of ``esm_core`` that imports gradio
(``pip install "esm-studio[app]"``).

Every computation lives in the studio back end (``common.studio``: the state and logic of one browser session)
and every figure in ``common.viz``. ``ui`` is a namespace of the components, filled by the views' ``layout`` in tab
order and read by every ``wire`` (the pool view's load events, for instance, reset the other views and merge).
"""
from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any, Callable

import gradio as gr

from .. import settings
from ..device import bound_heap_fragmentation
from . import export, interference, lessons, merge, pool, routing, spectra, uploads
from . import common
from .common import CONCURRENCY, DELETE_CACHE, MAX_FILE_SIZE, SessionGate, close_tab, max_sessions, studio, viz

VIEWS = (pool, spectra, interference, merge, routing, export, lessons)

INTRO = """# ESM Studio
Merge models fine-tuned from one pre-trained checkpoint into one model — and see *why* a merge works.
**Essential Subspace Merging (ESM)**, its routed extension **ESM++**, and the strongest baselines, side by side.
The app starts on a small built-in demo (a tiny vision transformer fine-tuned on six image tasks); it runs on a CPU."""

CSS = """
.esm-intro p {font-size: 0.95em; color: #444;}
footer {display: none !important;}
"""


def _after_pool(ui) -> Callable:
    def after_pool(s):
        """Reset the views that depend on the pool: layer and task choices, the α curve, the routing samples."""
        if s is None or s.pool is None:
            return [gr.update()] * 8
        keys = studio.esd_keys(s)
        choices = [(viz.short_key(k), k) for k in keys]
        tasks = list(s.pool.task_names)
        return (gr.update(choices=choices, value=keys[0]), gr.update(choices=tasks, value=tasks[0]),
                gr.update(choices=choices, value=keys[0]), merge.curve_hint(), None, gr.update(choices=[], value=None),
                gr.update(choices=["auto", *studio.layer_type_names(s)], value=["auto"]),
                gr.update(value=routing.SOURCES[0]))
    ui.after_pool = after_pool
    ui.after_pool_outs = [ui.spec_layer, ui.spec_task, ui.int_layer, ui.curve_plot, ui.curve_state, ui.r_sample,
                          ui.esd_types_ctl, ui.r_source]


def build_app(pool_loader: Callable[[], Any] | None = None, max_open: int | None = None) -> gr.Blocks:
    """The ESM Studio Blocks. ``pool_loader``: returns the starting pool (default: the built-in demo pool);
    ``max_open``: sessions at once (default: ``ESM_MAX_SESSIONS`` or 8)."""
    uploads.install()                          # an aborted upload leaves no partial file behind
    common.install_quiet_bounds()              # an out-of-range number posted as JSON: one log line, no traceback
    gate = SessionGate(max_open or max_sessions())
    with gr.Blocks(title="ESM Studio", delete_cache=DELETE_CACHE) as demo:
        ui = SimpleNamespace(demo=demo, pool_loader=pool_loader, gate=gate)
        ui.state = gr.State(None, time_to_live=common.SESSION_TTL_S, delete_callback=gate.close)
        ui.history = gr.BrowserState(None)     # the session's merge table, kept by the browser across a reload
        gr.Markdown(INTRO, elem_classes="esm-intro")
        with gr.Tabs() as ui.tabs:
            for view in VIEWS:
                view.layout(ui)
        _after_pool(ui)
        merge.register(ui)                     # the pool view's load events chain into the merge
        for view in VIEWS:
            view.wire(ui)
        demo.unload(close_tab(demo, ui.state, gate))   # a closed tab frees its session at once
    demo.esm_gate = gate
    uploads.start_sweeper(demo)                # uploads no session used go after uploads.ORPHAN_S
    return demo


def launch_kwargs() -> dict:
    """What ``launch()`` needs besides the address (Gradio 6: theme and css go here, not to Blocks)."""
    return {"max_file_size": MAX_FILE_SIZE, "theme": gr.themes.Soft(), "css": CSS, "show_error": True}


def make_demo(pool_loader: Callable[[], Any] | None = None, max_open: int | None = None) -> gr.Blocks:
    """The app with its queue configured (one heavy merge does not freeze the other sessions)."""
    demo = build_app(pool_loader, max_open)
    demo.queue(default_concurrency_limit=CONCURRENCY)
    return demo


def main(port: int | None = None, share: bool = False, **kwargs) -> None:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    settings.check_all()                # a mistyped limit stops the server here, naming the variable
    bound_heap_fragmentation()          # freed tensors go back to the system: bounded peaks (esm_core.device)
    make_demo().launch(server_port=port, share=share, **launch_kwargs(), **kwargs)
