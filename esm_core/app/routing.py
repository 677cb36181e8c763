"""View 5 · Routing (ESM++): which task's expert each input switches on, how often right, the oracle."""
from __future__ import annotations

import gradio as gr

from .common import (HEAVY, LIGHT, ROUTING_RANKS, bounded_text, finite_number, friendly, gpu, need_session,
                     progress_fn, stoppable, studio, viz)

TEXT = """ESM++ keeps the static ESM merge and adds one small low-rank **expert** per task in some layers. For each input
and layer, a **routing decision** compares the input's mean hidden state with every task's *prototype* (the mean hidden
state of that task's samples) and switches on the closest task's expert. When routing picks the true task, the input
gets almost its own fine-tuned model back; the oracle forces the true task to show the ceiling."""
SOURCES = ["samples of the pool's tasks", "my image", "my sentence"]
MAX_SENTENCE_CHARS = 2000


def layout(ui) -> None:
    with gr.Tab("5 · Routing (ESM++)", id="routing"):
        gr.Markdown(TEXT, elem_classes="esm-intro")
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                ui.r_rank = gr.Slider(*ROUTING_RANKS[:2], value=32, step=ROUTING_RANKS[2], label="expert rank r",
                                      elem_id="route-rank",
                                      info="rank of each task's low-rank expert (reference: 32, also 8)")
                ui.r_source = gr.Radio(SOURCES, value=SOURCES[0], label="inputs")
                ui.r_per_task = gr.Slider(1, 16, value=6, step=1, label="samples per task")
                ui.r_image = gr.Image(label="an image of your own (image pools)", type="numpy", height=160,
                                      elem_id="route-image")
                ui.r_text = gr.Textbox(label="a sentence of your own (text pools)", lines=2, max_length=MAX_SENTENCE_CHARS,
                                       placeholder="e.g. The striker scored twice in the second half.",
                                       elem_id="route-text")
                ui.r_umap = gr.Checkbox(False, label="map with UMAP instead of PCA",
                                        info="UMAP compiles on its first use: that run takes up to a minute")
                ui.r_btn = gr.Button("Route!", variant="primary", elem_id="route-btn")
                ui.r_md = gr.Markdown(elem_id="route-note")
            with gr.Column(scale=2):
                ui.r_heat = gr.Plot(hint("the routing decisions: which task's expert each sample switched on, per "
                                         "layer"), label="routing decisions", show_label=False, elem_id="route-heat")
        with gr.Row():
            ui.r_acc = gr.Plot(hint("routing accuracy per layer, with its 95 % interval and the chance line"),
                               label="routing accuracy per layer", show_label=False, elem_id="route-acc")
            ui.r_oracle = gr.Plot(hint("accuracy with ESM++'s own routing against the oracle"),
                                  label="routed vs oracle", show_label=False, elem_id="route-oracle")
        with gr.Row():
            ui.r_sample = gr.Dropdown(label="sample", choices=[], allow_custom_value=True, elem_id="route-sample")
        with gr.Row():
            ui.r_cos = gr.Plot(hint("one sample's cosine with each task prototype"),
                               label="cosines of the chosen sample", show_label=False, elem_id="route-cos")
            ui.r_map = gr.Plot(hint("a map of the samples, the prototypes and your own input"),
                               label="map of samples and prototypes", show_label=False, elem_id="route-map")


def hint(what: str):
    """An empty plot that says what to press to fill it."""
    return viz.empty_figure(f"Press <b>Route!</b> (left) to draw {what}.")


def figures(run: dict, idx: int) -> dict:
    """Figures of one routing run (``studio.run_routing``); ``idx`` picks the sample whose cosines are shown."""
    tasks, layers = run["tasks"], [viz.short_key(k) for k in run["layers"]]
    idx = min(max(idx, 0), len(run["sample_labels"]) - 1)
    out = {"heat": viz.routing_heatmap(run["choices"], tasks, run["sample_labels"], layers),
           "cos": viz.cosine_figure(run["cosines"][idx], tasks, layers,
                                    title=f"sample {run['sample_labels'][idx]}: cosine with each task prototype"
                                          "<br><sub>□ = the expert chosen in each layer</sub>")}
    if run.get("layer_accuracy") is not None:
        ci = run.get("layer_interval")
        out["acc"] = viz.routing_accuracy_figure(
            layers, run["layer_accuracy"], n=run.get("layer_n"), chance=run.get("chance"),
            interval=None if ci is None else ([lo for lo, _ in ci], [hi for _, hi in ci]))
    else:
        out["acc"] = viz.empty_figure("routing accuracy needs samples with a known task")
    if run.get("routed_accuracy"):
        ci = run.get("accuracy_interval") or {}
        names = {"base": "static ESM", "route": "ESM++ (routed)", "oracle": "ESM++ (oracle routing)"}
        intervals = {names[m]: ([ci[m][t][0] for t in tasks], [ci[m][t][1] for t in tasks]) for m in ci}
        out["oracle"] = viz.oracle_figure(tasks, run["routed_accuracy"], run["oracle_accuracy"],
                                          run.get("static_accuracy"), n=run.get("test_n"),
                                          intervals=intervals or None)
    else:
        out["oracle"] = viz.empty_figure("the oracle comparison needs samples with a known task")
    emb = run.get("embedding")
    out["map"] = (viz.embedding_figure(emb["points"], emb["labels"], emb["proto_points"], emb["proto_labels"], tasks,
                                       title=emb.get("title", ""), method=emb.get("method", "pca"),
                                       own=emb.get("own"))
                  if emb else viz.empty_figure("no map"))
    return out


@gpu
@friendly
@stoppable(8)
def route(s, rank, source, per_task, image, umap, text=None, progress=gr.Progress()):
    s = need_session(s)
    text = bounded_text(text, "sentence", MAX_SENTENCE_CHARS).strip()
    if source == "my image" and image is None:
        raise ValueError("upload an image first (or route the samples of the pool's tasks)")
    if source == "my sentence" and not text:
        raise ValueError("type a sentence first (or route the samples of the pool's tasks)")
    rank, per_task = finite_number(rank, "the expert rank r", True), finite_number(per_task, "samples per task", True)
    run = studio.run_routing(s, rank=rank, per_task=per_task, image=image if source == "my image" else None,
                             text=text if source == "my sentence" else None, umap=bool(umap),
                             progress=progress_fn(progress, s))
    idx = len(run["sample_labels"]) - 1 if source in ("my image", "my sentence") else 0    # show yours first
    figs = figures(run, idx)
    labels = [(lab, i) for i, lab in enumerate(run["sample_labels"])]
    return (s, run["summary_md"], figs["heat"], figs["acc"], figs["oracle"], gr.update(choices=labels, value=idx),
            figs["cos"], figs["map"])


@friendly
def pick_sample(s, idx):
    s = need_session(s)
    if s.routing is None or idx is None:
        return gr.update()
    return figures(s.routing, int(idx))["cos"]


def wire(ui) -> None:
    ui.r_btn.click(route, [ui.state, ui.r_rank, ui.r_source, ui.r_per_task, ui.r_image, ui.r_umap, ui.r_text],
                   [ui.state, ui.r_md, ui.r_heat, ui.r_acc, ui.r_oracle, ui.r_sample, ui.r_cos, ui.r_map],
                   api_name="route", **HEAVY)
    ui.r_sample.input(pick_sample, [ui.state, ui.r_sample], [ui.r_cos], api_visibility="private", **LIGHT)
