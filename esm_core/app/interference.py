"""View 3 · Interference: do the tasks compete for the same directions? Overlaps, cosines and the merge's SAR."""
from __future__ import annotations

import gradio as gr

from .common import HEAVY, friendly, gpu, need_session, progress_fn, stoppable, studio, viz

TEXT = """Tasks **interfere** when their updates use the same directions in different ways. An overlap near 1
means two tasks' essential subspaces share directions (they compete for them); near 0 they sit side by side.
Compare with **chance**: two *random* k-dimensional subspaces of a d-dimensional layer already overlap by k/d on
average, so only an overlap well above k/d means the tasks really pick the same directions.
The subspace alignment ratio (SAR) says how much of each task's update lies inside the space the merged update spans:
a task with a low SAR has been drowned by the others."""


# what the plots show before their first drawing: when they are drawn (there is nothing to press)
WAIT = viz.empty_figure("Drawn when this tab opens: its first visit reads the essential subspaces of every layer<br>"
                        "(computed with the Spectra view's decompositions, with a progress bar).")


def layout(ui) -> None:
    with gr.Tab("3 · Interference", id="interference") as ui.tab_inter:
        gr.Markdown(TEXT, elem_classes="esm-intro")
        ui.int_layer = gr.Dropdown(label="layer", choices=[], allow_custom_value=True, elem_id="int-layer")
        ui.int_note = gr.Markdown(elem_id="int-note")
        with gr.Row():
            ui.int_overlap = gr.Plot(WAIT, label="essential-subspace overlap", show_label=False,
                                     elem_id="int-overlap")
            ui.int_cos = gr.Plot(WAIT, label="task-vector cosines (this layer)", show_label=False, elem_id="int-cos")
        with gr.Row():
            ui.int_cos_model = gr.Plot(WAIT, label="task-vector cosines (whole model)", show_label=False)
            ui.int_sar = gr.Plot(WAIT, label="SAR against the current merge", show_label=False, elem_id="int-sar")


def chance_note(k: int, d: int) -> str:
    """What the overlap of two random k-dim subspaces of R^d is on average (E‖P1ᵀP2‖F² / k = k / d)."""
    return (f"**Chance level:** two random {k}-dimensional subspaces of this layer's {d}-dimensional output space "
            f"overlap by k/d = {k}/{d} = **{k / d:.2f}** on average; overlaps near that are what chance gives.")


@gpu
@friendly
@stoppable(6)
def show(s, key, progress=gr.Progress()):
    s = need_session(s)
    key = key or studio.esd_keys(s)[0]
    ov = studio.overlap(s, key, progress=progress_fn(progress, s))
    k, d = int(ov["k"][key]), int(s.pool.base[key].shape[0])
    cos = studio.cosines(s)
    tasks = cos["tasks"]
    f_ov = viz.task_matrix_figure(ov["layers"][key], tasks, f"overlap of essential subspaces, {viz.short_key(key)} "
                                  f"(k = {k}; chance k/d = {k / d:.2f})", zmin=0, zmax=1)
    f_cos = viz.task_matrix_figure(cos["layers"][key], tasks, f"task-vector cosine, {viz.short_key(key)}",
                                   zmin=-1, zmax=1, colorscale="RdBu")
    f_model = viz.task_matrix_figure(cos["model"], tasks, "task-vector cosine, whole model", zmin=-1, zmax=1,
                                     colorscale="RdBu")
    al = studio.alignment(s)
    f_sar = (viz.sar_figure(al, key, title=f"SAR with the current merge (#{s.current['id']} {s.current['title']})")
             if al else viz.empty_figure("merge first (tab 4) to see the alignment with the merge"))
    return s, chance_note(k, d), f_ov, f_cos, f_model, f_sar


def wire(ui) -> None:
    outs = [ui.state, ui.int_note, ui.int_overlap, ui.int_cos, ui.int_cos_model, ui.int_sar]
    ui.tab_inter.select(show, [ui.state, ui.int_layer], outs, api_name="interference", **HEAVY)
    ui.int_layer.input(show, [ui.state, ui.int_layer], outs, **HEAVY, trigger_mode="always_last",
                       api_visibility="private")
