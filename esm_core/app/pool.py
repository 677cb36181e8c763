"""View 1 · Pool: what is loaded (summary, task table, a few images of each task); reload the demo or upload a pool."""
from __future__ import annotations

import datetime
import html
import json
import logging
import time
from pathlib import Path

import gradio as gr
import pandas as pd

from esm_core.pools.heads import HeadSource, head_warning
from esm_core.pools.hf_vit_pool import is_hf_vit_config
from esm_core.pools.text_data import MissingData
from esm_core.pools.upload_text import TEXT_EXTS, TOKENIZER_FILES

from . import uploads
from .common import (CKPT_TYPES, HEAVY, LIGHT, MAX_ARCH_CHARS, TOAST_S, bounded_text, file_path, friendly,
                     need_session, progress_fn, short_name, studio, studio_session)

log = logging.getLogger("esm_studio.app")

TEXT = """A **pool** is one pre-trained model plus several copies of it, each fine-tuned on one task.
Merging combines the task copies into a single model that should solve all tasks at once. The difference between a
fine-tuned weight matrix and the pre-trained one, ΔW, is that task's *update*; every method here only combines updates.
**Zero-shot** is the pre-trained model used as it is, with each task's classifier head but none of the task
updates: the score a merge must beat to be worth anything. **Fine-tuned** is each task's own model, the ceiling."""

UPLOAD_HELP = ("Give the pre-trained checkpoint, two or more task checkpoints fine-tuned from it "
               "(`.safetensors`, `.pt`, `.pth`, `.bin`, `.ckpt`; read without running any pickled code) or PEFT "
               "LoRA adapters (a `.zip` of the adapter folder: `adapter_config.json` + `adapter_model.safetensors`, "
               "read as the base plus scale · B·A, its `modules_to_save` classifier as the task's head), and "
               "for each task a zip of class folders named `<task>.zip` (`<class>/<image>.png`). "
               "A zip with split folders (`val/<class>/…` and `test/<class>/…`, `train/` optional) keeps its "
               "splits; otherwise half of each class becomes validation (proxy samples, α), half test (seeded). "
               "Tasks named like the demo's keep the demo's images when the checkpoints have "
               "the demo's architecture.\n\n"
               "**Heads** (each task's frozen classifier), per task, the first that applies: a head you upload with "
               "the data (`<task>.head.safetensors` or a weights-only `<task>.head.pt`: C × D, its class names in "
               "the safetensors metadata `class_names` or in `<task>.head.json`); the zero-shot head of the "
               "class-folder names when the base checkpoint holds its CLIP text tower (prompts: a `templates.txt` "
               "with one template per line, `{}` = the class name; otherwise generic ones); else the class means "
               "of the task's own images — then accuracies are *not comparable to the model's own*.\n\n"
               "**Architecture and input normalisation are never guessed.** Upload the model's config "
               "(open_clip model JSON, or Hugging Face `config.json` + `preprocessor_config.json`), or choose: "
               "`demo` (this app's demo architecture), an open_clip model name (its config, CLIP normalisation), "
               "or `infer` (shapes from the weights, plus the attention head width and normalisation you give: "
               "CLIP models use head width 64 and 'clip'). With `auto` and no config the app lists the choices.\n\n"
               "**Text models** — BERT-family encoders (BERT, RoBERTa, DistilBERT, MiniLM) or Llama-style "
               "decoders (Llama, Qwen2, Mistral; read at the last real token): upload each task's "
               "`*ForSequenceClassification` checkpoint (its classifier is the task's head), the model's "
               "`config.json` and tokenizer files (`tokenizer.json`, or `vocab.txt` / `vocab.json` + `merges.txt`, "
               "with `tokenizer_config.json`), and per task `<task>.csv` (columns `text`, `label` = class index) "
               "or `<task>.jsonl`.")
ARCH_CHOICES = ["auto", "demo", "infer", "ViT-B-32-quickgelu", "ViT-B-16-quickgelu", "ViT-L-14-quickgelu"]
NORM_CHOICES = [("from the config / architecture", ""), ("OpenAI CLIP mean/std ('clip')", "clip"),
                ("mean 0.5, std 0.5 ('half')", "half")]
MAX_CONFIG_BYTES = 64 * 1024      # a model config JSON is a few KB
TEXT_POOL_HELP = ("**Text pool** (docs/methods.md §8): all-MiniLM-L6-v2, fully fine-tuned on 8 real text tasks (topic, "
                  "sentiment, authorship, spam, genre, word sense, language, BBC news topic). It is built on this "
                  "machine into a cache folder (some sources may not be redistributed): about 20–50 minutes on a "
                  "CPU, a few on a GPU, once; afterwards it loads in seconds. The build needs the registry packages "
                  "listed in the README (PyPI, Debian and npm packages; whatever is missing is listed, all at once, "
                  "with its install commands).")
HEAD_FILE_TYPES = (".safetensors", ".pt", ".pth", ".bin", ".json", ".txt")   # heads, their class names, templates
MAX_TEMPLATES_BYTES = 64 * 1024   # templates.txt: prompt templates, one per line
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
        ui.demo_btn = gr.Button("Reload the built-in demo pool", size="sm", elem_id="demo-load")
        ui.demo_status = gr.Markdown("", elem_id="demo-status")
        with gr.Accordion("Language models: the text pool (MiniLM on 8 text tasks)", open=False):
            ui.text_md = gr.Markdown(text_section_md, elem_id="text-status")    # read again at every page load
            with gr.Row():
                ui.text_btn = gr.Button("Load the text pool", variant="primary", size="sm", elem_id="text-load")
                ui.text_build_btn = gr.Button("Build the text pool", size="sm", elem_id="text-build")
        with gr.Accordion("Upload your own pool (ViT image models, or text classifiers: BERT family, Llama, Qwen2, "
                          "Mistral)", open=False):
            gr.Markdown(UPLOAD_HELP)
            with gr.Row():
                ui.base_file = gr.File(label="base checkpoint", file_types=CKPT_TYPES, elem_id="up-base")
                ui.task_files = gr.File(label="task checkpoints (or LoRA adapter .zip)", file_count="multiple",
                                        file_types=[*CKPT_TYPES, ".zip"],    # .zip: a PEFT LoRA adapter folder
                                        elem_id="up-tasks")
                ui.zip_files = gr.File(label="data: <task>.zip of images (+ <task>.head.safetensors / .pt / .json, "
                                             "templates.txt), or <task>.csv / .jsonl of labelled text",
                                       file_count="multiple", file_types=[".zip", *TEXT_EXTS, *HEAD_FILE_TYPES],
                                       elem_id="up-zips")
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
            ui.upload_status = gr.Markdown("", elem_id="upload-status")       # progress, then what was loaded


def text_section_md() -> str:
    """The text-pool section: what it is and whether it is built (a callable value: gradio reads it again at every
    page load, so a build made since the app started shows)."""
    return TEXT_POOL_HELP + "\n\n" + text_status_md()


def loaded_md(s, what: str, seconds: float) -> str:
    """What a load step reports under its button: which pool, its tasks, how long it took, and when (a re-upload
    of the same files says so again, with a new time)."""
    info = studio.pool_info(s)
    tasks = ", ".join(t["task"] for t in info["tasks"])
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M:%S UTC")
    return (f"**Loaded {html.escape(what)}** `{html.escape(info['name'])}` ({len(info['tasks'])} tasks: "
            f"{html.escape(tasks)}) in {seconds:.1f} s, at {when}. The other views now show this pool; the "
            "comparison table starts again.")


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
    warning = head_warning(s.pool)
    if warning:
        md += f"\n\n**⚠ {html.escape(warning)}.**"
    if info["notes"]:
        md += "\n\n" + "\n".join(f"- {html.escape(n, quote=False)}" for n in info["notes"])   # '</s>' shows
    texts = studio.sample_texts(s, SENTENCES_PER_TASK)
    images = studio.sample_images(s, IMAGES_PER_TASK)
    return (md, pd.DataFrame(task_rows(s.pool, info["tasks"])), gr.Gallery(value=images, visible=not texts),
            gr.Dataframe(value=pd.DataFrame(texts) if texts else None, visible=bool(texts)))


def task_rows(pool, rows: list[dict]) -> list[dict]:
    """The task table's rows with each task's head source and split rule (pools that record them:
    ``pool.meta["head_sources"]`` / ``["splits"]``, e.g. uploads)."""
    meta = getattr(pool, "meta", None) or {}
    sources, splits = meta.get("head_sources") or {}, meta.get("splits") or {}
    out = []
    for r in rows:
        r = dict(r)
        t = r["task"]
        if t in sources:
            r["head"] = sources[t] + (" ⚠ not comparable" if sources[t] == HeadSource.CLASS_MEANS.value else "")
        if t in splits:
            sp = splits[t]
            r["splits"] = sp["rule"] + (f" (train {sp['train']})" if sp.get("train") else "")
        out.append(r)
    return out


def split_head_files(paths: list[str]) -> tuple[list[str], dict[str, str], dict[str, str], str | None]:
    """``(data files, {task: head file}, {task: class-names json}, templates text or None)`` of the data box:
    ``<task>.head.safetensors`` / ``.pt`` / ``.pth`` / ``.bin`` are heads, ``<task>.head.json`` their class names,
    ``templates.txt`` the zero-shot prompt templates (one per line, at most 64 KB)."""
    data, heads, names, templates = [], {}, {}, None
    for p in paths:
        name = Path(p).name
        low = name.lower()
        if low == "templates.txt":
            with open(p, "rb") as f:
                raw = f.read(MAX_TEMPLATES_BYTES + 1)
            if len(raw) > MAX_TEMPLATES_BYTES:
                raise ValueError(f"templates.txt is larger than {MAX_TEMPLATES_BYTES // 1024} KB")
            try:
                templates = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError("templates.txt is not UTF-8 text") from None
        elif ".head." in low and low.endswith(HEAD_FILE_TYPES) and not low.endswith(".txt"):
            task = name[:low.rindex(".head.")]
            into = names if low.endswith(".json") else heads
            if task in into:
                raise ValueError(f"two head files for task {task!r}: {Path(into[task]).name} and {name}")
            into[task] = p
        elif low.endswith(HEAD_FILE_TYPES):
            raise ValueError(f"{name}: a head file is named <task>.head.safetensors (or .pt, with its class names "
                             "in <task>.head.json), and prompt templates go in templates.txt")
        else:
            data.append(p)
    return data, heads, names, templates


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
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            why = "nested too deeply" if isinstance(e, RecursionError) else type(e).__name__
            raise ValueError(f"{short_name(p)}: not a JSON file ({why})") from None
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


def _done(s, what: str, t0: float):
    """A load step's outputs: the session and the message under its button (no toast: nothing covers the pool
    view once it is loaded)."""
    return s, loaded_md(s, what, time.perf_counter() - t0)


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
        s, t0 = need_session(s), time.perf_counter()
        studio.load_demo(s, loader=loader, progress=progress_fn(progress))
        return _done(s, "the built-in demo pool", t0)

    @friendly
    def load_upload(s, base_file, task_files, names_text, zip_files, arch, config_files=None, head_width=0,
                    normalisation="", progress=gr.Progress()):
        s, t0 = need_session(s), time.perf_counter()
        progress(0.0, desc="checking the uploaded files")
        arch = bounded_text(arch, "architecture", MAX_ARCH_CHARS).strip() or "auto"
        if base_file is None:
            raise ValueError("upload the base (pre-trained) checkpoint first")
        files = [file_path(f) for f in (task_files or [])]
        if len(files) < 2:
            raise ValueError(f"upload at least two task checkpoints (got {len(files)})")
        names = task_names(names_text, files)
        given = [file_path(z) for z in (zip_files or [])]
        cfg_paths = [file_path(f) for f in (config_files or [])]
        used = [file_path(base_file), *files, *given, *cfg_paths]
        uploads.claim(used)                                                   # used: not an orphan upload
        gone = [Path(u).name for u in used if u and not Path(u).is_file()]
        if gone:
            raise ValueError(f"{', '.join(gone[:5])}: no longer on the server (uploads no session used within "
                             f"{uploads.ORPHAN_S // 60} minutes are deleted, all uploads after an hour): upload "
                             "the file(s) again")
        data, head_files, head_names, templates = split_head_files(given)
        tok = {Path(p).name: p for p in cfg_paths if Path(p).name in TOKENIZER_FILES}
        config, preprocessor = read_configs([p for p in cfg_paths if Path(p).name not in TOKENIZER_FILES])
        texts = {short_name(p): p for p in data if p.lower().endswith(TEXT_EXTS)}
        if texts:                                       # labelled sentences: a text pool (encoder or decoder)
            if len(texts) != len(data):
                raise ValueError("upload either image zips or labelled text files (.csv / .jsonl), not both")
            if head_files or head_names or templates is not None:
                raise ValueError("head files and templates.txt are for image tasks; a text task's head is its "
                                 "checkpoint's own classifier")
            studio.load_uploaded_text(s, file_path(base_file), dict(zip(names, files)), texts, config=config,
                                      tokenizer_files=tok, progress=progress_fn(progress, s))
            return _done(s, "the uploaded text pool", t0)
        zips = {short_name(p): p for p in data}
        if is_hf_vit_config(config):                    # Hugging Face ViT classifiers: each task's own classifier
            if head_files or head_names or templates is not None:
                raise ValueError("head files and templates.txt are not read for a ViT classifier upload: each "
                                 "task's head is its checkpoint's own classifier")
            studio.session.load_uploaded_hf_vit(s, file_path(base_file), dict(zip(names, files)), zips,
                                                config=config, preprocessor=preprocessor,
                                                progress=progress_fn(progress, s))
            return _done(s, "the uploaded ViT classifier pool", t0)
        hw = int(head_width) if head_width else None
        studio.load_uploaded(s, file_path(base_file), dict(zip(names, files)), zips, arch=arch, config=config,
                             preprocessor=preprocessor, head_width=hw, normalisation=normalisation or None,
                             demo_loader=loader, progress=progress_fn(progress, s), heads=head_files,
                             head_names=head_names, templates=templates)
        return _done(s, "the uploaded pool", t0)

    @friendly
    def load_text(s, progress=gr.Progress()):
        s, t0 = need_session(s), time.perf_counter()
        studio.load_text(s, progress=progress_fn(progress))
        s, md = _done(s, "the text pool", t0)
        return s, text_section_md() + "\n\n" + md

    @friendly
    def build_text(s, progress=gr.Progress()):
        need_session(s)                  # the session stays alive while the build runs (friendly: keep_alive)
        try:
            studio.build_text(progress=progress_fn(progress))
        except MissingData as e:
            log.warning("text pool not built: %.300s", str(e).replace("\n", " "))
            gr.Warning("The text pool cannot be built yet: packages are missing (listed in the text-pool section).",
                       duration=TOAST_S)
            return text_section_md() + "\n\n**Cannot build yet.** " + missing_md(e)
        return text_section_md()

    return init, reload_demo, load_upload, load_text, build_text


def missing_md(e: Exception) -> str:
    """A missing-prerequisites error as markdown: its explanation, then its install commands in one code block."""
    text = str(e)
    head, _, cmds = text.partition("\n")
    out = html.escape(head)
    if cmds.strip():
        out += "\n\n```bash\n" + cmds.strip("\n") + "\n```"
    return out


def save_history(s, stored=None):
    """The session's merge table for the browser to keep (gr.BrowserState), beside the other pools' tables it keeps
    (:func:`studio.session.remember`: one per pool, by the pool's content); unchanged when there is none."""
    if not isinstance(s, studio.Session) or s.closed:
        return gr.update()
    h = studio_session.remember(s, stored)
    return gr.update() if h is None else h


def restore_history(s, stored):
    """After a page (re)load: the merge table the browser kept comes back into the new session when it was made
    on the same pool. It comes from the client: checked field by field, a malformed one is dropped (one log line)."""
    if not isinstance(s, studio.Session) or s.closed or stored is None:
        return
    try:
        n = studio_session.restore_history(s, stored)
    except (ValueError, TypeError, KeyError) as e:
        log.warning("stored merge history refused: %.200s", e)
        return
    if n:
        log.info("session %s: %d merges restored from the browser", s.id, n)


def wire(ui) -> None:
    """Loading a pool resets the other views and runs the first merge. A refused upload changes nothing on screen:
    the load step's outputs are the session and the message under its button, the pool view is redrawn only after
    a success. The comparison table is kept by the browser (``ui.history``) and restored after a page reload."""
    init, reload_demo, load_upload, load_text, build_text = make_handlers(ui)
    shown = [ui.pool_md, ui.pool_df, ui.pool_gallery, ui.pool_texts]

    def show_pool(s):
        return pool_outputs(need_session(s))

    ui.demo.load(init, [ui.state], [ui.state, *shown], api_name="init", **HEAVY).success(
        restore_history, [ui.state, ui.history], None, api_visibility="private").then(
        ui.after_pool, [ui.state], ui.after_pool_outs, api_visibility="private").then(
        ui.do_merge, ui.merge_inputs, ui.merge_outs, **HEAVY, trigger_mode="always_last", api_visibility="private")
    ui.cmp_df.change(save_history, [ui.state, ui.history], [ui.history], api_visibility="private", **LIGHT)
    ui.text_build_btn.click(build_text, [ui.state], [ui.text_md], api_name="build_text", **HEAVY)
    for btn, fn, inputs, status, api in (
            (ui.demo_btn, reload_demo, [ui.state], ui.demo_status, "load_demo"),
            (ui.text_btn, load_text, [ui.state], ui.text_md, "load_text"),
            (ui.upload_btn, load_upload, [ui.state, ui.base_file, ui.task_files, ui.names_box, ui.zip_files,
                                          ui.arch_box, ui.config_files, ui.head_box, ui.norm_dd], ui.upload_status,
             "load_upload")):
        btn.click(fn, inputs, [ui.state, status], api_name=api, **HEAVY).success(
            friendly(show_pool), [ui.state], shown, api_name=f"{api}_view").success(
            restore_history, [ui.state, ui.history], None, api_visibility="private").then(   # this pool's table
            ui.after_pool, [ui.state], ui.after_pool_outs, api_visibility="private").then(
            ui.do_merge, ui.merge_inputs, ui.merge_outs, api_visibility="private", **HEAVY)
