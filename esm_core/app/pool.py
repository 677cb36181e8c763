"""View 1 · Pool: what is loaded (summary, task table, a few images of each task); reload the demo or upload a pool."""
from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
import pandas as pd

from esm_core.pools.upload_text import TEXT_EXTS, TOKENIZER_FILES

from .common import (CKPT_TYPES, HEAVY, MAX_ARCH_CHARS, bounded_text, file_path, friendly, need_session,
                     progress_fn, short_name, studio)

TEXT = """A **pool** is one pre-trained model plus several copies of it, each fine-tuned on one task.
Merging combines the task copies into a single model that should solve all tasks at once. The difference between a
fine-tuned weight matrix and the pre-trained one, ΔW, is that task's *update*; every method here only combines updates.
**Zero-shot** is the pre-trained model used as it is, with each task's classifier head but none of the task
updates: the score a merge must beat to be worth anything. **Fine-tuned** is each task's own model, the ceiling."""

UPLOAD_HELP = ("Give the pre-trained checkpoint, two or more task checkpoints fine-tuned from it "
               "(`.safetensors`, `.pt`, `.pth`, `.bin`, `.ckpt`; read without running any pickled code), and "
               "for each task a zip of class folders named `<task>.zip` (`<class>/<image>.png`). "
               "Half of each task's images become validation (proxy samples, heads, α), half test. "
               "Tasks named like the demo's keep the demo's images when the checkpoints have "
               "the demo's architecture.\n\n"
               "**Architecture and input normalisation are never guessed.** Upload the model's config "
               "(open_clip model JSON, or Hugging Face `config.json` + `preprocessor_config.json`), or choose: "
               "`demo` (this app's demo architecture), an open_clip model name (its config, CLIP normalisation), "
               "or `infer` (shapes from the weights, plus the attention head width and normalisation you give: "
               "CLIP models use head width 64 and 'clip'). With `auto` and no config the app lists the choices.\n\n"
               "**Text models** (BERT, RoBERTa, DistilBERT, MiniLM): upload each task's "
               "`*ForSequenceClassification` checkpoint (its classifier is the task's head), the model's "
               "`config.json` and tokenizer files (`tokenizer.json`, or `vocab.txt` / `vocab.json` + `merges.txt`, "
               "with `tokenizer_config.json`), and per task `<task>.csv` (columns `text`, `label` = class index) "
               "or `<task>.jsonl`.")
ARCH_CHOICES = ["auto", "demo", "infer", "ViT-B-32-quickgelu", "ViT-B-16-quickgelu", "ViT-L-14-quickgelu"]
NORM_CHOICES = [("from the config / architecture", ""), ("OpenAI CLIP mean/std ('clip')", "clip"),
                ("mean 0.5, std 0.5 ('half')", "half")]
MAX_CONFIG_BYTES = 64 * 1024      # a model config JSON is a few KB
TEXT_POOL_HELP = ("**Text pool** (SPEC §8): all-MiniLM-L6-v2, fully fine-tuned on 8 real text tasks (topic, "
                  "sentiment, authorship, spam, genre, word sense, language, BBC news topic). It is built on this "
                  "machine into a cache folder (some sources may not be redistributed): about 20–50 minutes on a "
                  "CPU, a few on a GPU, once; afterwards it loads in seconds. The build needs the registry packages "
                  "listed in the README (a missing one is named with its install command).")
SENTENCES_PER_TASK = 3            # sample sentences of each task of a text pool
IMAGES_PER_TASK = 6               # gallery: one row per task, each image of another class where the task has them


def layout(ui) -> None:
    with gr.Tab("1 · Pool", id="pool"):
        gr.Markdown(TEXT, elem_classes="esm-intro")
        ui.pool_md = gr.Markdown("Loading the demo pool …", elem_id="pool-summary")
        ui.pool_df = gr.Dataframe(label="tasks", interactive=False, elem_id="pool-tasks")
        ui.pool_gallery = gr.Gallery(label="a few images of each task (one row per task, one image per class)",
                                     columns=IMAGES_PER_TASK, height="fit-content", object_fit="contain",
                                     allow_preview=False, elem_id="pool-gallery")
        ui.pool_texts = gr.Dataframe(label="a few test sentences of each task", interactive=False, wrap=True,
                                     visible=False, elem_id="pool-sentences")
        ui.demo_btn = gr.Button("Reload the built-in demo pool", size="sm")
        with gr.Accordion("Language models: the text pool (MiniLM on 8 text tasks)", open=False):
            ui.text_md = gr.Markdown(TEXT_POOL_HELP + "\n\n" + text_status_md(), elem_id="text-status")
            with gr.Row():
                ui.text_btn = gr.Button("Load the text pool", variant="primary", size="sm", elem_id="text-load")
                ui.text_build_btn = gr.Button("Build the text pool", size="sm", elem_id="text-build")
        with gr.Accordion("Upload your own pool (open_clip ViT image towers, or BERT-family text classifiers)",
                          open=False):
            gr.Markdown(UPLOAD_HELP)
            with gr.Row():
                ui.base_file = gr.File(label="base checkpoint", file_types=CKPT_TYPES, elem_id="up-base")
                ui.task_files = gr.File(label="task checkpoints", file_count="multiple", file_types=CKPT_TYPES,
                                        elem_id="up-tasks")
                ui.zip_files = gr.File(label="data: <task>.zip of images, or <task>.csv / .jsonl of labelled text",
                                       file_count="multiple", file_types=[".zip", *TEXT_EXTS], elem_id="up-zips")
            with gr.Row():
                ui.names_box = gr.Textbox(label="task names (comma separated, upload order; empty: file names)",
                                          elem_id="up-names")
                ui.arch_box = gr.Dropdown(ARCH_CHOICES, value="auto", allow_custom_value=True,
                                          label="architecture (or type an open_clip model name)", elem_id="up-arch")
            with gr.Row():
                ui.config_files = gr.File(label="model config (JSON) — and for text models config.json + tokenizer "
                                                "files", file_count="multiple", file_types=[".json", ".txt"],
                                          elem_id="up-config")
                ui.head_box = gr.Number(0, precision=0, minimum=0, maximum=4096, elem_id="up-head",
                                        label="attention head width (for 'infer'; 0 = not given)")
                ui.norm_dd = gr.Dropdown(NORM_CHOICES, value="", label="input normalisation", elem_id="up-norm")
            ui.upload_btn = gr.Button("Load the uploaded pool", variant="primary", elem_id="upload-btn")


def text_status_md() -> str:
    st = studio.text_pool_status()
    if st["built"]:
        return f"Built in `{st['path']}`: tasks {', '.join(st['tasks'])}."
    return f"Not built yet (cache folder `{st['path']}`): press *Build the text pool*, or run `esm-studio build-pool text`."


def pool_outputs(s) -> tuple:
    """Summary markdown, task table, gallery (image pools) and sample sentences (text pools) of the session's pool."""
    info = studio.pool_info(s)
    md = (f"**Pool:** `{info['name']}` ({info['origin']}) · **model:** `{info['model']}` · "
          f"**{info['parameters']:,} parameters** · {info['blocks']} transformer blocks of width {info['width']} · "
          f"{info['matrices']} weight matrices · {len(info['tasks'])} tasks · device: `{info['device']}`")
    if info["notes"]:
        md += "\n\n" + "\n".join(f"- {n}" for n in info["notes"])
    texts = studio.sample_texts(s, SENTENCES_PER_TASK)
    images = studio.sample_images(s, IMAGES_PER_TASK)
    return (md, pd.DataFrame(info["tasks"]), gr.Gallery(value=images, visible=not texts),
            gr.Dataframe(value=pd.DataFrame(texts) if texts else None, visible=bool(texts)))


def task_names(names_text: str | None, files: list[str]) -> list[str]:
    """The task names of an upload: the box's (one per file, upload order) or the files' names."""
    text = bounded_text(names_text, "task names")
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names and len(names) != len(files):
        raise ValueError(f"{len(names)} task names for {len(files)} task checkpoints: give one name per file, "
                         "in upload order (or leave the names empty to use the file names)")
    names = names or [short_name(f) for f in files]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {names}")
    return names


def read_configs(paths: list[str]) -> tuple[dict | None, dict | None]:
    """(model config, preprocessor config) from uploaded JSON files: a Hugging Face ``preprocessor_config.json``
    is recognised by its ``image_mean``; anything else is the model config. Each file ≤ 64 KB, strict JSON."""
    config = preprocessor = None
    for p in paths:
        with open(p, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ValueError(f"{short_name(p)}: a model config is at most {MAX_CONFIG_BYTES // 1024} KB")
        try:
            obj = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{short_name(p)}: not a JSON file ({type(e).__name__})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{short_name(p)}: a config must be a JSON object")
        if "image_mean" in obj:
            preprocessor = obj
        elif config is None:
            config = obj
        else:
            raise ValueError("upload one model config (and at most one preprocessor_config.json)")
    return config, preprocessor


def _no_constant(name: str):
    raise ValueError(f"non-finite number {name} in a config")


def make_handlers(ui):
    """init (first visit), reload_demo and load_upload, closed over the app's pool loader and session gate."""
    loader, gate = ui.pool_loader, ui.gate

    @friendly
    def init(s, progress=gr.Progress()):
        if s is None or s.closed:
            s = gate.open()
        if s.pool is None:
            studio.load_demo(s, loader=loader, progress=progress_fn(progress))
        return (s, *pool_outputs(s))

    @friendly
    def reload_demo(s, progress=gr.Progress()):
        s = need_session(s)
        studio.load_demo(s, loader=loader, progress=progress_fn(progress))
        return s

    @friendly
    def load_upload(s, base_file, task_files, names_text, zip_files, arch, config_files=None, head_width=0,
                    normalisation="", progress=gr.Progress()):
        s = need_session(s)
        arch = bounded_text(arch, "architecture", MAX_ARCH_CHARS).strip() or "auto"
        if base_file is None:
            raise ValueError("upload the base (pre-trained) checkpoint first")
        files = [file_path(f) for f in (task_files or [])]
        if len(files) < 2:
            raise ValueError(f"upload at least two task checkpoints (got {len(files)})")
        names = task_names(names_text, files)
        data = [file_path(z) for z in (zip_files or [])]
        cfg_paths = [file_path(f) for f in (config_files or [])]
        tok = {Path(p).name: p for p in cfg_paths if Path(p).name in TOKENIZER_FILES}
        config, preprocessor = read_configs([p for p in cfg_paths if Path(p).name not in TOKENIZER_FILES])
        texts = {short_name(p): p for p in data if p.lower().endswith(TEXT_EXTS)}
        if texts:                                       # labelled sentences: a BERT-family text pool
            if len(texts) != len(data):
                raise ValueError("upload either image zips or labelled text files (.csv / .jsonl), not both")
            studio.load_uploaded_text(s, file_path(base_file), dict(zip(names, files)), texts, config=config,
                                      tokenizer_files=tok, progress=progress_fn(progress, s))
            return s
        zips = {short_name(p): p for p in data}
        hw = int(head_width) if head_width else None
        studio.load_uploaded(s, file_path(base_file), dict(zip(names, files)), zips, arch=arch, config=config,
                             preprocessor=preprocessor, head_width=hw, normalisation=normalisation or None,
                             demo_loader=loader, progress=progress_fn(progress, s))
        return s

    @friendly
    def load_text(s, progress=gr.Progress()):
        s = need_session(s)
        studio.load_text(s, progress=progress_fn(progress))
        return s

    @friendly
    def build_text(s, progress=gr.Progress()):
        need_session(s)
        studio.build_text(progress=progress_fn(progress))
        return TEXT_POOL_HELP + "\n\n" + text_status_md()

    return init, reload_demo, load_upload, load_text, build_text


def wire(ui) -> None:
    """Loading a pool resets the other views and runs the first merge. A refused upload changes nothing on screen:
    the load step's only output is the session, the pool view is redrawn only after a success."""
    init, reload_demo, load_upload, load_text, build_text = make_handlers(ui)
    shown = [ui.pool_md, ui.pool_df, ui.pool_gallery, ui.pool_texts]

    def show_pool(s):
        return pool_outputs(need_session(s))

    ui.demo.load(init, [ui.state], [ui.state, *shown], api_name="init", **HEAVY).success(
        ui.after_pool, [ui.state], ui.after_pool_outs, api_visibility="private").then(
        ui.do_merge, ui.merge_inputs, ui.merge_outs, **HEAVY, trigger_mode="always_last", api_visibility="private")
    ui.text_build_btn.click(build_text, [ui.state], [ui.text_md], api_name="build_text", **HEAVY)
    for btn, fn, inputs, api in ((ui.demo_btn, reload_demo, [ui.state], "load_demo"),
                                 (ui.text_btn, load_text, [ui.state], "load_text"),
                                 (ui.upload_btn, load_upload, [ui.state, ui.base_file, ui.task_files, ui.names_box,
                                                               ui.zip_files, ui.arch_box, ui.config_files,
                                                               ui.head_box, ui.norm_dd], "load_upload")):
        btn.click(fn, inputs, [ui.state], api_name=api, **HEAVY).success(
            friendly(show_pool), [ui.state], shown, api_name=f"{api}_view").success(
            ui.after_pool, [ui.state], ui.after_pool_outs, api_visibility="private").then(
            ui.do_merge, ui.merge_inputs, ui.merge_outs, api_visibility="private", **HEAVY)
