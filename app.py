"""ESM Studio — the Gradio web app (layout and event wiring only).

Every computation lives in :mod:`esm_core.session` (state and logic of one
browser session) and every figure in :mod:`esm_core.viz`. Run with
``esm-studio app`` or ``python app.py``; this file is also the Hugging Face
Space's ``app_file``.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Callable

import gradio as gr
import pandas as pd

from esm_core import studio as S
from esm_core.studio import viz
from esm_core.checkpoints import CheckpointError
from esm_core.merging import METHODS

SESSION_TTL_S = 2 * 3600          # a session's tensors are dropped this long after its last event
MAX_FILE_SIZE = "2gb"             # uploads above this are refused by Gradio before they reach us
CONCURRENCY = 4                   # events running at once (across all sessions)
HEAVY_CONCURRENCY = 2             # merges / decompositions / routing running at once
HEAVY = {"concurrency_id": "heavy", "concurrency_limit": HEAVY_CONCURRENCY}
DEFAULT_METHOD = "ta"

try:  # Hugging Face ZeroGPU: GPU work must run inside @spaces.GPU functions; elsewhere unchanged
    import spaces  # type: ignore
    gpu = spaces.GPU(duration=120)
except ImportError:  # pragma: no cover - the usual case off Spaces
    def gpu(fn: Callable) -> Callable:
        return fn

INTRO = """# ESM Studio
Merge models fine-tuned from one pre-trained checkpoint into one model — and see *why* a merge works.
**Essential Subspace Merging (ESM)**, its routed extension **ESM++**, and the strongest baselines, side by side.
The app starts on a small built-in demo (a tiny vision transformer fine-tuned on six image tasks); it runs on a CPU."""

TEXT = {
    "pool": """A **pool** is one pre-trained model plus several copies of it, each fine-tuned on one task.
Merging combines the task copies into a single model that should solve all tasks at once. The difference between a
fine-tuned weight matrix and the pre-trained one, ΔW, is that task's *update*; every method here only combines updates.""",
    "spectra": """Fine-tuning changes each weight matrix by ΔW, but on the task's real inputs only a few output directions
of that change actually move the layer's activations: they form the task's **essential subspace**, found by the
Essential Subspace Decomposition (ESD) of the activation shift. When the ESD curve rises steeply, a low rank keeps
almost all of the task's effect — more than the same rank of the plain SVD of ΔW, which ignores the data.""",
    "interference": """Tasks **interfere** when their updates use the same directions in different ways. An overlap near 1
means two tasks' essential subspaces share directions (they compete for them); near 0 they sit side by side.
The subspace alignment ratio (SAR) says how much of each task's update lies inside the space the merged update spans:
a task with a low SAR has been drowned by the others.""",
    "merge": """Pick a method and move its knobs: the model is re-merged from cached decompositions and re-evaluated at once.
ESM ends with a **flat spectrum** — every direction of the merged update gets the same strength — so the large
directions of one task cannot drown the small but essential directions of another. α scales the whole merged update.""",
    "routing": """ESM++ keeps the static ESM merge and adds one small low-rank **expert** per task in some layers. For each input
and layer, a **routing decision** compares the input's mean hidden state with every task's *prototype* (the mean hidden
state of that task's samples) and switches on the closest task's expert. When routing picks the true task, the input
gets almost its own fine-tuned model back; the oracle forces the true task to show the ceiling.""",
    "export": """Download the merged model as `.safetensors`. The merge's recipe (method, every parameter, the proxy sample ids,
the versions) is stored in the file's metadata, so anyone can reproduce it. The ESM++ bundle stores the static merge
plus the low-rank expert factors and prototypes — never a dense copy per task.""",
}

CSS = """
.esm-intro p {font-size: 0.95em; color: #444;}
footer {display: none !important;}
"""


# ---------------------------------------------------------------- helpers

def friendly(fn: Callable) -> Callable:
    """Turn the session's ValueError / CheckpointError / FileNotFoundError into a clear gr.Error for the user."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (ValueError, CheckpointError, FileNotFoundError) as e:
            raise gr.Error(str(e), duration=None) from None
    return wrapper


def _progress(progress) -> Callable[[float, str], None]:
    return lambda frac, desc: progress(frac, desc=desc)


def _need_session(s):
    if s is None:
        raise gr.Error("the session is still starting (or has expired): reload the page", duration=None)
    return s


def _path(f) -> str | None:
    if f is None:
        return None
    return f if isinstance(f, str) else getattr(f, "name", None) or getattr(f, "path", None)


# ---------------------------------------------------------------- pool view

def _pool_outputs(s):
    info = S.pool_info(s)
    md = (f"**Pool:** `{info['name']}` ({info['origin']}) · **model:** `{info['model']}` · "
          f"**{info['parameters']:,} parameters** · {info['blocks']} transformer blocks of width {info['width']} · "
          f"{info['matrices']} weight matrices · {len(info['tasks'])} tasks · device: `{info['device']}`")
    if info["notes"]:
        md += "\n\n" + "\n".join(f"- {n}" for n in info["notes"])
    return md, pd.DataFrame(info["tasks"]), S.sample_images(s, 4)


def make_handlers(pool_loader: Callable[[], Any] | None):
    """All event handlers, closed over the demo-pool loader (tests inject a small pool)."""

    @friendly
    def init(s, progress=gr.Progress()):
        if s is None or s.closed:
            s = S.new_session()
        if s.pool is None:
            S.load_demo(s, loader=pool_loader, progress=_progress(progress))
        return (s, *_pool_outputs(s))

    @friendly
    def reload_demo(s, progress=gr.Progress()):
        s = _need_session(s)
        S.load_demo(s, loader=pool_loader, progress=_progress(progress))
        return (s, *_pool_outputs(s))

    @friendly
    def load_upload(s, base_file, task_files, names_text, zip_files, arch, progress=gr.Progress()):
        s = _need_session(s)
        if base_file is None:
            raise ValueError("upload the base (pre-trained) checkpoint first")
        files = [_path(f) for f in (task_files or [])]
        if len(files) < 2:
            raise ValueError(f"upload at least two task checkpoints (got {len(files)})")
        names = [n.strip() for n in (names_text or "").split(",") if n.strip()]
        if names and len(names) != len(files):
            raise ValueError(f"{len(names)} task names for {len(files)} task checkpoints: give one name per file, "
                             "in upload order (or leave the names empty to use the file names)")
        if not names:
            names = [Path(f).name.split(".")[0] for f in files]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        zips = {Path(_path(z)).name.rsplit(".", 1)[0]: _path(z) for z in (zip_files or [])}
        S.load_uploaded(s, _path(base_file), dict(zip(names, files)), zips, arch=(arch or "auto").strip(),
                        demo_loader=pool_loader, progress=_progress(progress))
        return (s, *_pool_outputs(s))

    return init, reload_demo, load_upload


# ---------------------------------------------------------------- merge view

def _control(p) -> gr.components.Component:
    """The input control of one method parameter, built from its schema."""
    label = p.name
    if p.choices:
        return gr.Dropdown(choices=list(p.choices), value=p.default, label=label, info=p.help)
    if p.type is bool:
        return gr.Checkbox(value=bool(p.default), label=label, info=p.help)
    if p.type in (int, float) and p.min is not None and p.max is not None:
        step = p.step if p.step else (1 if p.type is int else (p.max - p.min) / 100)
        if p.type is int and (p.max - p.min) / step > 1000:
            return gr.Number(value=p.default, label=label, info=p.help, precision=0, minimum=p.min, maximum=p.max)
        return gr.Slider(p.min, p.max, value=p.default, step=step, label=label, info=p.help)
    if p.type in (int, float):
        return gr.Number(value=p.default, label=label, info=p.help, precision=0 if p.type is int else None,
                         minimum=p.min, maximum=p.max)
    return gr.Textbox(value=str(p.default), label=label, info=p.help)


def _params_of(method: str, values: tuple, slices: dict) -> dict:
    lo, hi = slices[method]
    return dict(zip([p.name for p in METHODS[method].params], values[lo:hi]))


def _merge_outputs(s, rec):
    refs = S.references(s)
    n = s.live_per_task
    title = (f"#{rec['id']} {rec['title']} (α = {float(rec['params']['alpha']):.2f}): mean "
             f"{100 * rec['summary']['mean_abs']:.1f} % absolute · {100 * rec['summary']['mean_norm']:.1f} % normalised")
    fig = viz.accuracy_figure(rec["summary"], refs, title=title)
    md = (f"Merged and evaluated in **{rec['seconds']:.2f} s**. Live accuracy is measured on a fixed subset of at most "
          f"**{n} test images per task** (the same images for every merge and for the references); "
          "**Evaluate on the full test split** below measures the whole split.")
    return fig, md, pd.DataFrame(S.comparison_rows(s))


SPEC_FIELDS = {"ESD energy kept at k": "esd_kept_at_k", "SVD energy kept at k": "svd_kept_at_k",
               "ESD − SVD (points)": "esd_gain_at_k"}


def _spectra_overview(s, frac, field, progress):
    rows = S.spectra_at(s, frac, progress=_progress(progress))
    rows = [{**r, "esd_gain_at_k": r["esd_kept_at_k"] - r["svd_kept_at_k"]} for r in rows]
    what = {"esd_kept_at_k": "kept by ESD", "svd_kept_at_k": "kept by the SVD of ΔW",
            "esd_gain_at_k": "ESD keeps more than SVD by"}[SPEC_FIELDS.get(field, "esd_kept_at_k")]
    return viz.layer_task_heatmap(rows, SPEC_FIELDS.get(field, "esd_kept_at_k"),
                                  title=f"share of each task's activation-shift energy {what} at rank k "
                                        f"= {frac:g} × d_out / T (%)"), rows


# ---------------------------------------------------------------- the app

def build_app(pool_loader: Callable[[], Any] | None = None) -> gr.Blocks:
    """The ESM Studio Blocks. ``pool_loader``: returns the starting pool (default: the built-in demo pool)."""
    init, reload_demo, load_upload = make_handlers(pool_loader)
    method_names = list(METHODS)
    with gr.Blocks(title="ESM Studio") as demo:
        state = gr.State(None, time_to_live=SESSION_TTL_S, delete_callback=S.close)
        gr.Markdown(INTRO, elem_classes="esm-intro")
        with gr.Tabs() as tabs:
            # ---------------------------------------------------- 1 pool
            with gr.Tab("1 · Pool", id="pool") as tab_pool:
                gr.Markdown(TEXT["pool"], elem_classes="esm-intro")
                pool_md = gr.Markdown("Loading the demo pool …", elem_id="pool-summary")
                pool_df = gr.Dataframe(label="tasks", interactive=False, elem_id="pool-tasks")
                pool_gallery = gr.Gallery(label="a few images of each task", columns=12, height="auto",
                                          object_fit="contain", allow_preview=False, elem_id="pool-gallery")
                demo_btn = gr.Button("Reload the built-in demo pool", size="sm")
                with gr.Accordion("Upload your own pool (open_clip ViT image towers)", open=False):
                    gr.Markdown("Give the pre-trained checkpoint, two or more task checkpoints fine-tuned from it "
                                "(`.safetensors`, `.pt`, `.pth`, `.bin`; read without running any pickled code), and "
                                "for each task a zip of class folders named `<task>.zip` (`<class>/<image>.png`). "
                                "Half of each task's images become validation (proxy samples, heads, α), half test. "
                                "Tasks named like the demo's keep the demo's images when the checkpoints have "
                                "the demo's architecture.")
                    with gr.Row():
                        base_file = gr.File(label="base checkpoint", file_types=[".safetensors", ".pt", ".pth", ".bin"])
                        task_files = gr.File(label="task checkpoints", file_count="multiple",
                                             file_types=[".safetensors", ".pt", ".pth", ".bin"])
                        zip_files = gr.File(label="images: <task>.zip per task", file_count="multiple",
                                            file_types=[".zip"])
                    with gr.Row():
                        names_box = gr.Textbox(label="task names (comma separated, upload order; empty: file names)")
                        arch_box = gr.Textbox("auto", label="architecture: 'auto' or an open_clip model name")
                    upload_btn = gr.Button("Load the uploaded pool", variant="primary")

            # ---------------------------------------------------- 2 spectra
            with gr.Tab("2 · Spectra", id="spectra") as tab_spectra:
                gr.Markdown(TEXT["spectra"], elem_classes="esm-intro")
                with gr.Row():
                    spec_frac = gr.Slider(0.05, 2.0, value=0.25, step=0.05, label="rank k as a fraction of ESM's "
                                          "default d_out / T", elem_id="spec-frac", scale=2)
                    spec_field = gr.Radio(list(SPEC_FIELDS), value=next(iter(SPEC_FIELDS)), label="overview shows",
                                          scale=2)
                spec_heat = gr.Plot(label="layer × task overview", show_label=False, elem_id="spec-heat")
                with gr.Row():
                    spec_layer = gr.Dropdown(label="layer", choices=[], allow_custom_value=True, elem_id="spec-layer")
                    spec_task = gr.Dropdown(label="task", choices=[], allow_custom_value=True, elem_id="spec-task")
                spec_plot = gr.Plot(label="ESD vs SVD spectrum", show_label=False, elem_id="spec-plot")

            # ---------------------------------------------------- 3 interference
            with gr.Tab("3 · Interference", id="interference") as tab_inter:
                gr.Markdown(TEXT["interference"], elem_classes="esm-intro")
                int_layer = gr.Dropdown(label="layer", choices=[], allow_custom_value=True, elem_id="int-layer")
                with gr.Row():
                    int_overlap = gr.Plot(label="essential-subspace overlap", show_label=False, elem_id="int-overlap")
                    int_cos = gr.Plot(label="task-vector cosines (this layer)", show_label=False, elem_id="int-cos")
                with gr.Row():
                    int_cos_model = gr.Plot(label="task-vector cosines (whole model)", show_label=False)
                    int_sar = gr.Plot(label="SAR against the current merge", show_label=False, elem_id="int-sar")

            # ---------------------------------------------------- 4 merge
            with gr.Tab("4 · Merge", id="merge") as tab_merge:
                gr.Markdown(TEXT["merge"], elem_classes="esm-intro")
                with gr.Row():
                    with gr.Column(scale=1, min_width=320):
                        method_dd = gr.Dropdown(choices=S.method_choices(), value=DEFAULT_METHOD, label="method",
                                                elem_id="method")
                        method_help = gr.Markdown(f"*{METHODS[DEFAULT_METHOD].help}*")
                        groups, controls, slices = {}, [], {}
                        for name in method_names:
                            with gr.Group(visible=(name == DEFAULT_METHOD)) as g:
                                lo = len(controls)
                                for p in METHODS[name].params:
                                    c = _control(p)
                                    c.elem_id = f"ctl-{name}-{p.name}"
                                    controls.append(c)
                                slices[name] = (lo, len(controls))
                            groups[name] = g
                        with gr.Row():
                            curve_btn = gr.Button("α curve on validation", size="sm", elem_id="curve-btn")
                            best_btn = gr.Button("use the best α", size="sm", interactive=False)
                        full_btn = gr.Button("Evaluate on the full test split", size="sm")
                    with gr.Column(scale=2):
                        acc_plot = gr.Plot(label="per-task accuracy", show_label=False, elem_id="acc-plot")
                        merge_md = gr.Markdown(elem_id="merge-note")
                curve_plot = gr.Plot(label="α curve", show_label=False, visible=True, elem_id="curve-plot")
                full_md = gr.Markdown()
                cmp_df = gr.Dataframe(label="every merge of this session", interactive=False, elem_id="cmp-table",
                                      wrap=True)
                best_alpha = gr.State(None)

            # ---------------------------------------------------- 5 routing
            with gr.Tab("5 · Routing (ESM++)", id="routing") as tab_routing:
                gr.Markdown(TEXT["routing"], elem_classes="esm-intro")
                with gr.Row():
                    with gr.Column(scale=1, min_width=300):
                        r_rank = gr.Slider(2, 64, value=32, step=2, label="expert rank r",
                                           info="rank of each task's low-rank expert (reference: 32, also 8)")
                        r_source = gr.Radio(["samples of the pool's tasks", "my image"],
                                            value="samples of the pool's tasks", label="inputs")
                        r_per_task = gr.Slider(1, 16, value=6, step=1, label="samples per task")
                        r_image = gr.Image(label="an image of your own", type="numpy", height=160)
                        r_umap = gr.Checkbox(False, label="map with UMAP instead of PCA",
                                             info="UMAP compiles on its first use: that run takes up to a minute")
                        r_btn = gr.Button("Route!", variant="primary", elem_id="route-btn")
                        r_md = gr.Markdown(elem_id="route-note")
                    with gr.Column(scale=2):
                        r_heat = gr.Plot(label="routing decisions", show_label=False, elem_id="route-heat")
                with gr.Row():
                    r_acc = gr.Plot(label="routing accuracy per layer", show_label=False, elem_id="route-acc")
                    r_oracle = gr.Plot(label="routed vs oracle", show_label=False, elem_id="route-oracle")
                with gr.Row():
                    r_sample = gr.Dropdown(label="sample", choices=[], allow_custom_value=True, elem_id="route-sample")
                with gr.Row():
                    r_cos = gr.Plot(label="cosines of the chosen sample", show_label=False, elem_id="route-cos")
                    r_map = gr.Plot(label="map of samples and prototypes", show_label=False, elem_id="route-map")

            # ---------------------------------------------------- 6 export
            with gr.Tab("6 · Export", id="export") as tab_export:
                gr.Markdown(TEXT["export"], elem_classes="esm-intro")
                export_md = gr.Markdown()
                with gr.Row():
                    ex_model_btn = gr.Button("Merged model (.safetensors)")
                    ex_esmpp_btn = gr.Button("ESM++ bundle")
                    ex_cfg_btn = gr.Button("Merge config (.json)")
                ex_file = gr.File(label="download", elem_id="export-file")
                ex_json = gr.JSON(label="the recipe stored with the export", open=False)

        # ======================================================== wiring
        pool_outs = [state, pool_md, pool_df, pool_gallery]
        merge_inputs = [state, method_dd, *controls]
        merge_outs = [state, acc_plot, merge_md, cmp_df]

        @gpu
        @friendly
        def do_merge(s, method, *values, progress=gr.Progress()):
            s = _need_session(s)
            rec = S.merge(s, method, _params_of(method, values, slices), progress=_progress(progress))
            return (s, *_merge_outputs(s, rec))

        def after_pool(s):
            """Reset the views that depend on the pool."""
            if s is None or s.pool is None:
                return [gr.update()] * 5
            keys = S.esd_keys(s)
            choices = [(viz.short_key(k), k) for k in keys]
            tasks = list(s.pool.task_names)
            return (gr.update(choices=choices, value=keys[0]), gr.update(choices=tasks, value=tasks[0]),
                    gr.update(choices=choices, value=keys[0]), None, gr.update(choices=[], value=None))

        after_outs = [spec_layer, spec_task, int_layer, curve_plot, r_sample]
        load_ev = demo.load(init, [state], pool_outs, api_name="init", **HEAVY)
        load_ev.then(after_pool, [state], after_outs, api_visibility="private").then(
            do_merge, merge_inputs, merge_outs, **HEAVY, trigger_mode="always_last", api_visibility="private")
        for btn, fn, inputs, api in ((demo_btn, reload_demo, [state], "load_demo"),
                                     (upload_btn, load_upload, [state, base_file, task_files, names_box, zip_files,
                                                                arch_box], "load_upload")):
            btn.click(fn, inputs, pool_outs, api_name=api, **HEAVY).success(
                after_pool, [state], after_outs, api_visibility="private").then(
                do_merge, merge_inputs, merge_outs, api_visibility="private", **HEAVY)

        # merge: method switch shows its controls; any control change re-merges (the last change wins)
        def show_method(method):
            """Show the method's controls; the α curve and best α of the previous method no longer apply."""
            return ([gr.update(visible=(n == method)) for n in method_names]
                    + [f"*{METHODS[method].help}*", None, None,
                       gr.update(interactive=False, value="use the best α")])

        method_dd.change(show_method, [method_dd], [*groups.values(), method_help, curve_plot, best_alpha, best_btn],
                         queue=False,
                         api_visibility="private").then(
            do_merge, merge_inputs, merge_outs, **HEAVY, trigger_mode="always_last", api_name="merge")
        for c in controls:
            c.change(do_merge, merge_inputs, merge_outs, **HEAVY, trigger_mode="always_last",
                     show_progress="minimal", api_visibility="private")

        @gpu
        @friendly
        def do_curve(s, method, *values, progress=gr.Progress()):
            s = _need_session(s)
            params = _params_of(method, values, slices)
            best, curve = S.alpha_curve(s, method, params, progress=_progress(progress))
            title = (f"{METHODS[method].title}: mean normalised accuracy on ≤ {s.alpha_per_task} validation images "
                     f"per task")
            return s, viz.alpha_curve_figure(curve, best, float(params["alpha"]), title), best, gr.update(
                interactive=True, value=f"use the best α ({best:.2f})")

        curve_btn.click(do_curve, merge_inputs, [state, curve_plot, best_alpha, best_btn], api_name="alpha_curve", **HEAVY)

        def use_best(method, best):
            lo, hi = slices[method]
            out = [gr.update() for _ in controls]
            if best is not None:
                out[lo] = gr.update(value=best)     # alpha is the first parameter of every method
            return out

        best_btn.click(use_best, [method_dd, best_alpha], controls, api_visibility="private")

        @gpu
        @friendly
        def do_full(s, progress=gr.Progress()):
            s = _need_session(s)
            res = S.full_evaluation(s, progress=_progress(progress))
            sm = res["summary"]
            lines = [f"**Full test split** (current merge #{s.current['id']}): mean {100 * sm['mean_abs']:.2f} % "
                     f"absolute, {100 * sm['mean_norm']:.2f} % normalised.", "",
                     "| task | merged | fine-tuned | zero-shot |", "|---|---|---|---|"]
            for t, v in sm["tasks"].items():
                lines.append(f"| {t} | {100 * v['abs']:.1f} | {100 * res['refs']['finetuned'][t]:.1f} | "
                             f"{100 * res['refs']['zeroshot'][t]:.1f} |")
            return s, "\n".join(lines)

        full_btn.click(do_full, [state], [state, full_md], api_name="full_evaluation", **HEAVY)

        # spectra: computed on first visit (probe + decompositions, with progress)
        @gpu
        @friendly
        def do_spectra(s, frac, field, key, task, progress=gr.Progress()):
            s = _need_session(s)
            heat, rows = _spectra_overview(s, frac, field, progress)
            row = next((r for r in rows if r["key"] == key and r["task"] == task), rows[0])
            return s, heat, viz.spectrum_figure(row, title=f"{viz.short_key(row['key'])} · task {row['task']}: "
                                                           f"ESD vs SVD at k = {row['k']}")

        spec_ins, spec_outs = [state, spec_frac, spec_field, spec_layer, spec_task], [state, spec_heat, spec_plot]
        tab_spectra.select(do_spectra, spec_ins, spec_outs, api_name="spectra", **HEAVY)
        for c in (spec_frac, spec_field, spec_layer, spec_task):   # .input: user changes only
            c.input(do_spectra, spec_ins, spec_outs, **HEAVY, trigger_mode="always_last", api_visibility="private")

        # interference
        @gpu
        @friendly
        def do_interference(s, key, progress=gr.Progress()):
            s = _need_session(s)
            if not key:
                key = S.esd_keys(s)[0]
            ov = S.overlap(s, key, progress=_progress(progress))
            cos = S.cosines(s)
            tasks = cos["tasks"]
            f_ov = viz.task_matrix_figure(ov["layers"][key], tasks, f"overlap of essential subspaces, {viz.short_key(key)}"
                                          f" (k = {ov['k'][key]})", zmin=0, zmax=1)
            f_cos = viz.task_matrix_figure(cos["layers"][key], tasks, f"task-vector cosine, {viz.short_key(key)}",
                                           zmin=-1, zmax=1, colorscale="RdBu")
            f_model = viz.task_matrix_figure(cos["model"], tasks, "task-vector cosine, whole model", zmin=-1, zmax=1,
                                             colorscale="RdBu")
            al = S.alignment(s)
            f_sar = (viz.sar_figure(al, key, title=f"SAR with the current merge (#{s.current['id']} "
                                                   f"{s.current['title']})") if al else
                     viz.empty_figure("merge first (tab 4) to see the alignment with the merge"))
            return s, f_ov, f_cos, f_model, f_sar

        int_outs = [state, int_overlap, int_cos, int_cos_model, int_sar]
        tab_inter.select(do_interference, [state, int_layer], int_outs, api_name="interference", **HEAVY)
        int_layer.input(do_interference, [state, int_layer], int_outs, **HEAVY,
                         trigger_mode="always_last", api_visibility="private")

        # routing
        @gpu
        @friendly
        def do_route(s, rank, source, per_task, image, umap, progress=gr.Progress()):
            s = _need_session(s)
            if source == "my image" and image is None:
                raise ValueError("upload an image first (or route the samples of the pool's tasks)")
            run = S.run_routing(s, rank=int(rank), per_task=int(per_task),
                                image=image if source == "my image" else None, umap=bool(umap),
                                progress=_progress(progress))
            figs = _routing_figures(run, 0)
            labels = [(lab, i) for i, lab in enumerate(run["sample_labels"])]
            return (s, run["summary_md"], figs["heat"], figs["acc"], figs["oracle"],
                    gr.update(choices=labels, value=0), figs["cos"], figs["map"])

        r_btn.click(do_route, [state, r_rank, r_source, r_per_task, r_image, r_umap],
                    [state, r_md, r_heat, r_acc, r_oracle, r_sample, r_cos, r_map], api_name="route", **HEAVY)

        @friendly
        def pick_sample(s, idx):
            s = _need_session(s)
            if s.routing is None or idx is None:
                return gr.update()
            return _routing_figures(s.routing, int(idx))["cos"]

        r_sample.input(pick_sample, [state, r_sample], [r_cos], api_visibility="private")

        # export
        @friendly
        def ex_model(s, progress=gr.Progress()):
            s = _need_session(s)
            progress(0.2, desc="writing safetensors")
            p = S.export_merged(s)
            return (str(p), f"Merged model of merge #{s.current['id']} ({s.current['title']}) written: `{p.name}`.",
                    S.read_export_config(p))

        @gpu
        @friendly
        def ex_esmpp(s, rank, progress=gr.Progress()):
            s = _need_session(s)
            p = S.export_esmpp(s, rank=int(rank), progress=_progress(progress))
            return str(p), f"ESM++ bundle written: `{p.name}`.", S.read_export_config(p)

        @friendly
        def ex_cfg(s):
            s = _need_session(s)
            p = S.export_config(s)
            return str(p), f"Config of merge #{s.current['id']} written: `{p.name}`.", S.read_export_config(p)

        ex_model_btn.click(ex_model, [state], [ex_file, export_md, ex_json], api_name="export_model")
        ex_esmpp_btn.click(ex_esmpp, [state, r_rank], [ex_file, export_md, ex_json], api_name="export_esmpp", **HEAVY)
        ex_cfg_btn.click(ex_cfg, [state], [ex_file, export_md, ex_json], api_name="export_config")
    return demo


def _routing_figures(run: dict, idx: int) -> dict:
    """Figures of one routing run (``S.run_routing``); ``idx`` picks the sample whose cosines are shown."""
    tasks, layers = run["tasks"], [viz.short_key(k) for k in run["layers"]]
    idx = min(max(idx, 0), len(run["sample_labels"]) - 1)
    out = {"heat": viz.routing_heatmap(run["choices"], tasks, run["sample_labels"], layers),
           "cos": viz.cosine_figure(run["cosines"][idx], tasks, layers,
                                    title=f"sample {run['sample_labels'][idx]}: cosine with each task prototype")}
    if run.get("layer_accuracy") is not None:
        out["acc"] = viz.routing_accuracy_figure(layers, run["layer_accuracy"])
    else:
        out["acc"] = viz.empty_figure("routing accuracy needs samples with a known task")
    if run.get("routed_accuracy"):
        out["oracle"] = viz.oracle_figure(tasks, run["routed_accuracy"], run["oracle_accuracy"],
                                          run.get("static_accuracy"))
    else:
        out["oracle"] = viz.empty_figure("the oracle comparison needs samples with a known task")
    emb = run.get("embedding")
    out["map"] = (viz.embedding_figure(emb["points"], emb["labels"], emb["proto_points"], emb["proto_labels"], tasks,
                                       title=emb.get("title", "")) if emb else viz.empty_figure("no map"))
    return out


def launch_kwargs() -> dict:
    """What ``launch()`` needs besides the address (Gradio 6: theme and css go here, not to Blocks)."""
    return {"max_file_size": MAX_FILE_SIZE, "theme": gr.themes.Soft(), "css": CSS, "show_error": True}


def make_demo(pool_loader: Callable[[], Any] | None = None) -> gr.Blocks:
    """The app with its queue configured (one heavy merge does not freeze the other sessions)."""
    demo = build_app(pool_loader)
    demo.queue(default_concurrency_limit=CONCURRENCY)
    return demo


def main(port: int | None = None, share: bool = False, **kwargs) -> None:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    make_demo().launch(server_port=port, share=share, **launch_kwargs(), **kwargs)


if __name__ == "__main__":
    main()
