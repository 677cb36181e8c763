"""View 2 · Spectra: how much of each task's activation shift a rank-k ESD keeps, against the SVD of ΔW."""
from __future__ import annotations

import gradio as gr

from .common import HEAVY, finite_number, friendly, gpu, need_session, progress_fn, stoppable, studio, viz

TEXT = """Fine-tuning changes each weight matrix by ΔW, but on the task's real inputs only a few output directions
of that change actually move the layer's activations: they form the task's **essential subspace**, found by the
Essential Subspace Decomposition (ESD) of the activation shift. When the ESD curve rises steeply, a low rank keeps
almost all of the task's effect — more than the same rank of the plain SVD of ΔW, which ignores the data."""

# overview choice -> (field of the spectra rows, heatmap title before "at rank k = ...")
FIELDS = {
    "ESD energy kept at k": ("esd_kept_at_k", "share of each task's activation-shift energy kept by ESD (%)"),
    "SVD energy kept at k": ("svd_kept_at_k", "share of each task's activation-shift energy kept by the SVD of ΔW (%)"),
    "ESD − SVD (points)": ("esd_gain_at_k", "ESD's gain over the SVD of ΔW: energy kept by ESD minus energy kept "
                                            "by SVD (percentage points)"),
}


# what the plots show before their first drawing: when they are drawn (there is nothing to press)
WAIT = viz.empty_figure("Drawn when this tab opens: its first visit measures the spectra of every layer and task<br>"
                        "(a probe of the task models and their decompositions, with a progress bar: "
                        "up to a few minutes on a CPU).")


def layout(ui) -> None:
    with gr.Tab("2 · Spectra", id="spectra") as ui.tab_spectra:
        gr.Markdown(TEXT, elem_classes="esm-intro")
        with gr.Row():
            ui.spec_frac = gr.Slider(0.05, 2.0, value=0.25, step=0.05, label="rank k as a fraction of ESM's "
                                     "default d_out / T", elem_id="spec-frac", scale=2)
            ui.spec_field = gr.Radio(list(FIELDS), value=next(iter(FIELDS)), label="overview shows", scale=2,
                                     elem_id="spec-field")
        ui.spec_heat = gr.Plot(WAIT, label="layer × task overview", show_label=False, elem_id="spec-heat")
        with gr.Row():
            ui.spec_layer = gr.Dropdown(label="layer", choices=[], allow_custom_value=True, elem_id="spec-layer")
            ui.spec_task = gr.Dropdown(label="task", choices=[], allow_custom_value=True, elem_id="spec-task")
        ui.spec_plot = gr.Plot(WAIT, label="ESD vs SVD spectrum", show_label=False, elem_id="spec-plot")


def overview_title(field: str, frac: float) -> str:
    _, what = FIELDS.get(field, next(iter(FIELDS.values())))
    return f"{what} at rank k = {frac:g} × d_out / T"


def overview(s, frac: float, field: str, progress) -> tuple:
    """The layer × task heatmap of the chosen field, and the spectra rows behind it."""
    rows = studio.spectra_at(s, frac, progress=progress_fn(progress, s))
    rows = [{**r, "esd_gain_at_k": r["esd_kept_at_k"] - r["svd_kept_at_k"]} for r in rows]
    key, _ = FIELDS.get(field, next(iter(FIELDS.values())))
    return viz.layer_task_heatmap(rows, key, title=overview_title(field, frac)), rows


@gpu
@friendly
@stoppable(3)
def show(s, frac, field, key, task, progress=gr.Progress()):
    s = need_session(s)
    frac = finite_number(frac, "the rank fraction k")
    heat, rows = overview(s, frac, field, progress)
    row = next((r for r in rows if r["key"] == key and r["task"] == task), rows[0])
    return s, heat, viz.spectrum_figure(row, title=f"{viz.short_key(row['key'])} · task {row['task']}: "
                                                   f"ESD vs SVD at k = {row['k']}")


def wire(ui) -> None:
    """Computed on the first visit (probe + decompositions, with progress); every user change redraws."""
    ins, outs = [ui.state, ui.spec_frac, ui.spec_field, ui.spec_layer, ui.spec_task], [ui.state, ui.spec_heat,
                                                                                         ui.spec_plot]
    ui.tab_spectra.select(show, ins, outs, api_name="spectra", **HEAVY)
    for c in (ui.spec_frac, ui.spec_field, ui.spec_layer, ui.spec_task):   # .input: user changes only
        c.input(show, ins, outs, **HEAVY, trigger_mode="always_last", api_visibility="private")
