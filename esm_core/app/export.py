"""View 6 · Export: the current merge (.safetensors), its recipe (.json), or the ESM++ bundle at a chosen rank."""
from __future__ import annotations

import gradio as gr

from .. import settings
from .common import HEAVY, LIGHT, finite_number, friendly, gpu, need_session, progress_fn, stoppable, studio

TEXT = """Download the merged model as `.safetensors`, or as a **model folder** (.zip) that loads in its ecosystem —
`transformers.AutoModel.from_pretrained(folder)` for text models, `open_clip.create_model_and_transforms("local-dir:" +
folder)` for image models — with each task's head, the recipe and a model card (`README.md`: the recipe, per-task
accuracy with n and interval, the command that reproduces it). The recipe (method, every parameter, the proxy sample
ids, the versions of torch, transformers / open_clip and ESM Studio) is stored with every export, so anyone can
reproduce it. **Push to the Hub** uploads the model folder to your repository with your token (`HF_TOKEN` on the
server, or its stored login). The ESM++ bundle stores the static merge plus the low-rank expert factors and
prototypes — never a dense copy per task."""


def layout(ui) -> None:
    with gr.Tab("6 · Export", id="export") as ui.tab_export:
        gr.Markdown(TEXT, elem_classes="esm-intro")
        ui.export_what = gr.Markdown("Merge first (tab 4): there is nothing to export yet.", elem_id="export-what")
        ui.ex_rank = gr.Slider(2, 64, value=32, step=2, label="ESM++ bundle: expert rank r", elem_id="export-rank",
                               info="rank of each task's low-rank expert in the bundle (reference: 32, also 8)")
        with gr.Row():
            ui.ex_model_btn = gr.Button("Merged model (.safetensors)")
            ui.ex_esmpp_btn = gr.Button("ESM++ bundle")
            ui.ex_cfg_btn = gr.Button("Merge config (.json)")
            ui.ex_folder_btn = gr.Button("Model folder (.zip): transformers / open_clip")
        with gr.Row():
            ui.ex_repo = gr.Textbox(label="Hugging Face Hub repository", placeholder="user/name", elem_id="export-repo",
                                    max_lines=1, scale=3)
            ui.ex_token = gr.Textbox(label="your Hub token (write access; used for this push only)", type="password",
                                     elem_id="export-token", max_lines=1, scale=2,
                                     info="empty: the server's HF_TOKEN or stored login (never on a public Space)")
            ui.ex_private = gr.Checkbox(label="private", value=True, elem_id="export-private", scale=1)
            ui.ex_push_btn = gr.Button("Push to the Hub", elem_id="export-push", scale=1)
        ui.export_md = gr.Markdown()
        ui.ex_file = gr.File(label="download", elem_id="export-file")
        ui.ex_json = gr.JSON(label="the recipe stored with the export", open=False)


def _merge_name(rec) -> str:
    return f"merge #{rec['id']} · {rec['title']} (α = {float(rec['params']['alpha']):.2f})"


@friendly
def describe(s, rank):
    """Which merge each button exports."""
    s = need_session(s)
    rank = finite_number(rank, "the expert rank r", True)
    if s.current is None:
        return "Merge first (tab 4): there is nothing to export yet."
    last_esm = next((r for r in reversed(s.merges) if r["method"] == "esm"), None)
    static = (f"your latest ESM merge, {_merge_name(last_esm)}" if last_esm else
              "ESM with its default parameters (you have not merged with ESM yet)")
    return (f"**Merged model** and **merge config**: the current merge, **{_merge_name(s.current)}** (tab 4).  \n"
            f"**ESM++ bundle**: static part = {static}; experts of rank **r = {int(rank)}** (the slider below).")


@friendly
def ex_model(s, progress=gr.Progress()):
    s = need_session(s)
    progress(0.2, desc="writing safetensors")
    p = studio.export_merged(s)
    return str(p), f"Merged model of merge #{s.current['id']} ({s.current['title']}) written: `{p.name}`.", \
        studio.read_export_config(p)


@gpu
@friendly
@stoppable(3)
def ex_esmpp(s, rank, progress=gr.Progress()):
    s = need_session(s)
    rank = finite_number(rank, "the expert rank r", True)
    p = studio.export_esmpp(s, rank=rank, progress=progress_fn(progress, s))
    return str(p), f"ESM++ bundle (expert rank {int(rank)}) written: `{p.name}`.", studio.read_export_config(p)


@friendly
def ex_folder(s, progress=gr.Progress()):
    s = need_session(s)
    progress(0.2, desc="writing the model folder")
    folder, zp = studio.export_folder(s)
    files = ", ".join(f"`{p.name}`" for p in sorted(folder.iterdir()))
    return str(zp), f"Model folder of merge #{s.current['id']} written as `{zp.name}`: {files}.", \
        studio.read_export_config(folder)


@friendly
def ex_push(s, repo, token, private, progress=gr.Progress()):
    s = need_session(s)
    progress(0.1, desc="checking the repository and the token")
    out = studio.push_merged(s, str(repo or ""), bool(private), token=str(token or "") or None,
                             stored_token=settings.space_id() is None)
    return gr.update(), f"Pushed {len(out['files'])} file(s) of merge #{s.current['id']} to {out['url']}.", out


@friendly
def ex_cfg(s):
    s = need_session(s)
    p = studio.export_config(s)
    return str(p), f"Config of merge #{s.current['id']} written: `{p.name}`.", studio.read_export_config(p)


def wire(ui) -> None:
    outs = [ui.ex_file, ui.export_md, ui.ex_json]
    ui.tab_export.select(describe, [ui.state, ui.ex_rank], [ui.export_what], api_name="export_info", **LIGHT)
    ui.ex_rank.input(describe, [ui.state, ui.ex_rank], [ui.export_what], api_visibility="private", **LIGHT)
    ui.ex_model_btn.click(ex_model, [ui.state], outs, api_name="export_model")
    ui.ex_esmpp_btn.click(ex_esmpp, [ui.state, ui.ex_rank], outs, api_name="export_esmpp", **HEAVY)
    ui.ex_cfg_btn.click(ex_cfg, [ui.state], outs, api_name="export_config")
    ui.ex_folder_btn.click(ex_folder, [ui.state], outs, api_name="export_folder")
    ui.ex_push_btn.click(ex_push, [ui.state, ui.ex_repo, ui.ex_token, ui.ex_private], outs, api_name="export_push")
