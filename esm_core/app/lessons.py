"""Lessons: a guided tour as a short sequence of steps, each a small YAML or JSON file a teacher can write.

A lesson file::

    {"title": "Which part of ESM helps?", "pool": "demo",
     "steps": [
       {"title": "One merge", "text": "Markdown shown with the step.",
        "action": {"kind": "merge", "method": "esm", "params": {"rank_fraction": 0.5}}},
       {"title": "The ablation", "text": "…", "action": {"kind": "sweep", "sweep": "ablation",
                                                         "params": {"max_images": 50}}},
       {"title": "Read", "text": "…"}]}

``action`` is optional: ``merge`` (a method of the registry and its parameters, checked against the method's
schema), ``sweep`` (one of :data:`esm_core.evaluation.sweeps.KINDS` and keyword arguments of that sweep). A file
with a bad step is refused with an error naming the step (its number and title) before anything runs.
A lesson and its step open from the URL: ``?lesson=<name>&step=<n>`` (:func:`from_query`), the name being a
file of ``assets/lessons`` (letters, digits, ``-`` and ``_``).

This module only reads and checks lessons; it imports no gradio of its own.
"""
from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import Any, Mapping

import gradio as gr

from ..cli.sweep import table
from ..evaluation import sweeps
from ..merging import get_method
from .common import HEAVY, LIGHT, friendly, need_session, progress_fn, stoppable, studio, user_error, viz

LESSONS_DIR = Path(__file__).resolve().parents[2] / "assets" / "lessons"
MAX_BYTES = 256 * 1024             # a lesson file larger than this is refused before it is parsed
MAX_STEPS = 50
MAX_TEXT = 8000                    # characters of a step's text
MAX_TITLE = 200
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
ACTIONS = ("merge", "sweep")
_SWEEP_FIXED = {"pool", "progress", "should_stop", "use_cache", "device"}     # not a lesson's to set


class LessonError(ValueError):
    """A lesson file that cannot be used; the message names the file and, for a bad step, the step."""


def _str(v: Any, what: str, limit: int, required: bool = True) -> str:
    if v is None and not required:
        return ""
    if not isinstance(v, str) or (required and not v.strip()):
        raise ValueError(f"{what} must be a non-empty string")
    if len(v) > limit:
        raise ValueError(f"{what} has {len(v)} characters, more than {limit}")
    return v


def sweep_arguments(kind: str) -> set[str]:
    """The keyword arguments a lesson may give the sweep ``kind``."""
    if kind not in sweeps.SWEEPS:
        raise ValueError(f"sweep must be one of {list(sweeps.KINDS)}, got {kind!r}")
    return {n for n in inspect.signature(sweeps.SWEEPS[kind]).parameters if n not in _SWEEP_FIXED}


def _check_action(a: Any) -> dict | None:
    if a is None:
        return None
    if not isinstance(a, Mapping):
        raise ValueError("action must be an object with a 'kind'")
    kind = a.get("kind")
    if kind not in ACTIONS:
        raise ValueError(f"action kind must be one of {list(ACTIONS)}, got {kind!r}")
    params = a.get("params", {}) or {}
    if not isinstance(params, Mapping):
        raise ValueError("action params must be an object")
    extra = set(a) - {"kind", "params", "method", "sweep"}
    if extra:
        raise ValueError(f"unknown action fields {sorted(extra)}")
    if kind == "merge":
        m = get_method(str(a.get("method", "")))                    # unknown method: ValueError naming it
        return {"kind": "merge", "method": m.name, "params": m.resolve(dict(params))}
    allowed = sweep_arguments(str(a.get("sweep", "")))
    bad = sorted(set(params) - allowed)
    if bad:
        raise ValueError(f"sweep {a['sweep']!r} has no parameter {bad[0]!r}; it takes {sorted(allowed)}")
    return {"kind": "sweep", "sweep": a["sweep"], "params": dict(params)}


def parse_lesson(data: Any, source: str = "lesson") -> dict:
    """A checked lesson ``{"title", "pool", "steps": [{"title", "text", "action"}]}`` from parsed YAML/JSON."""
    if not isinstance(data, Mapping):
        raise LessonError(f"{source}: a lesson is an object with 'title' and 'steps'")
    try:
        title = _str(data.get("title"), "title", MAX_TITLE)
        pool = _str(data.get("pool", "demo"), "pool", MAX_TITLE)
    except ValueError as e:
        raise LessonError(f"{source}: {e}") from None
    steps = data.get("steps")
    if not isinstance(steps, list) or not 1 <= len(steps) <= MAX_STEPS:
        raise LessonError(f"{source}: 'steps' must be a list of 1 to {MAX_STEPS} steps")
    out = []
    for i, st in enumerate(steps, 1):
        name = st.get("title") if isinstance(st, Mapping) and isinstance(st.get("title"), str) else None
        where = f"{source}: step {i}" + (f" ({name!r})" if name else "")
        try:
            if not isinstance(st, Mapping):
                raise ValueError("a step is an object with 'title' and 'text'")
            extra = set(st) - {"title", "text", "action"}
            if extra:
                raise ValueError(f"unknown step fields {sorted(extra)}")
            out.append({"title": _str(st.get("title"), "title", MAX_TITLE),
                        "text": _str(st.get("text"), "text", MAX_TEXT, required=False),
                        "action": _check_action(st.get("action"))})
        except ValueError as e:
            raise LessonError(f"{where}: {e}") from None
    return {"title": title, "pool": pool, "steps": out}


def load_lesson(path) -> dict:
    """Read and check a lesson file (``.json``, ``.yaml`` / ``.yml``); its size is checked before it is parsed."""
    p = Path(path)
    if not p.is_file():
        raise LessonError(f"no lesson file {p}")
    size = p.stat().st_size
    if size > MAX_BYTES:
        raise LessonError(f"{p.name}: {size} bytes, more than a lesson's {MAX_BYTES}")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text)                       # plain data only: no Python objects built
        elif p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            raise LessonError(f"{p.name}: a lesson file ends in .json, .yaml or .yml")
    except LessonError:
        raise
    except Exception as e:                                    # the parser's own message, with the file named
        raise LessonError(f"{p.name}: not valid {p.suffix[1:].upper()}: {e}") from None
    return parse_lesson(data, p.name)


def lesson_names(folder=LESSONS_DIR) -> list[str]:
    """The lessons of ``folder`` (file names without their extension), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(f.stem for f in folder.iterdir()
                  if f.suffix.lower() in (".json", ".yaml", ".yml") and NAME.match(f.stem))


def lesson_path(name: str, folder=LESSONS_DIR) -> Path:
    """The file of lesson ``name`` in ``folder``; the name is checked (no path can be smuggled in)."""
    if not isinstance(name, str) or not NAME.match(name):
        raise LessonError(f"a lesson name is 1–64 letters, digits, '-' or '_', got {name!r}")
    for ext in (".json", ".yaml", ".yml"):
        p = Path(folder) / f"{name}{ext}"
        if p.is_file():
            return p
    raise LessonError(f"no lesson {name!r}; lessons: {lesson_names(folder)}")


def from_query(params: Mapping[str, str], folder=LESSONS_DIR) -> tuple[dict, int] | None:
    """``(lesson, step index from 0)`` for the URL query ``?lesson=<name>&step=<n>`` (n from 1; default 1);
    None when the query names no lesson. A bad name or step number is refused naming it."""
    name = params.get("lesson")
    if not name:
        return None
    lesson = load_lesson(lesson_path(name, folder))
    raw = params.get("step", "1")
    try:
        n = int(str(raw))
    except ValueError:
        raise LessonError(f"step must be a number from 1 to {len(lesson['steps'])}, got {raw!r}") from None
    if not 1 <= n <= len(lesson["steps"]):
        raise LessonError(f"lesson {name!r} has steps 1 to {len(lesson['steps'])}, not {n}")
    return lesson, n - 1


# ---------------------------------------------------------------------------
# The Lessons view (gradio): layout(ui) and wire(ui), like the other views
# ---------------------------------------------------------------------------

TEXT = """A guided tour: each lesson is a short sequence of steps, each step a few sentences and, where it has one, an
action — a merge, or a sweep (many merges, each at its own α chosen on validation). A lesson is a small JSON or YAML
file in `assets/lessons/`; a lesson and its step open from the address: `?lesson=ablation&step=3`."""


def step_markdown(lesson: Mapping | None, i: int) -> str:
    """The step's title, position and text (Markdown), with what its action does."""
    if not lesson:
        return "Choose a lesson."
    st = lesson["steps"][i]
    a = st["action"]
    what = ""
    if a is not None and a["kind"] == "merge":
        what = f"\n\n**Run this step:** merge with `{a['method']}` (the merge appears in tab 4)."
    elif a is not None:
        what = f"\n\n**Run this step:** the `{a['sweep']}` sweep" + (
            f" with {', '.join(f'{k} = {v}' for k, v in a['params'].items())}." if a["params"] else ".")
    return f"### {lesson['title']} — step {i + 1} of {len(lesson['steps'])}: {st['title']}\n\n{st['text']}{what}"


def layout(ui) -> None:
    names = lesson_names()
    with gr.Tab("7 · Lessons", id="lessons") as ui.tab_lessons:
        gr.Markdown(TEXT, elem_classes="esm-intro")
        ui.ls_pick = gr.Dropdown(choices=names, value=names[0] if names else None, label="lesson",
                                 elem_id="lesson-pick")
        ui.ls_state = gr.State(None)                          # {"name", "lesson", "i"}
        ui.ls_step = gr.Markdown(elem_id="lesson-step")
        with gr.Row():
            ui.ls_prev = gr.Button("← previous step", size="sm", elem_id="lesson-prev")
            ui.ls_next = gr.Button("next step →", size="sm", elem_id="lesson-next")
            ui.ls_run = gr.Button("Run this step", variant="primary", size="sm", elem_id="lesson-run")
            ui.ls_cancel = gr.Button("Cancel", variant="stop", size="sm", elem_id="lesson-cancel")
        ui.ls_out = gr.Markdown(elem_id="lesson-out")
        ui.ls_plot = gr.Plot(label="sweep", elem_id="lesson-plot")


def _open(name: str, i: int = 0):
    lesson = load_lesson(lesson_path(name))
    i = max(0, min(int(i), len(lesson["steps"]) - 1))
    return {"name": name, "lesson": lesson, "i": i}, step_markdown(lesson, i)


def wire(ui) -> None:


    tabs = getattr(ui, "tabs", None)                 # the app's gr.Tabs: a URL-opened lesson selects its tab

    @friendly
    def pick(name):
        if not name:
            return None, step_markdown(None, 0)
        try:
            return _open(name)
        except LessonError as e:
            raise user_error(str(e)) from None

    @friendly
    def move(st, delta):
        if not st:
            return st, step_markdown(None, 0)
        i = max(0, min(st["i"] + int(delta), len(st["lesson"]["steps"]) - 1))
        st = {**st, "i": i}
        return st, step_markdown(st["lesson"], i)

    def from_url(request: gr.Request):
        """``?lesson=<name>&step=<n>``: that lesson at that step, on the Lessons tab; else the first lesson."""
        tab = [gr.update()] if tabs is not None else []
        try:
            hit = from_query(dict(request.query_params)) if request is not None else None
        except LessonError as e:
            return gr.update(), None, f"**{e}**", *tab
        if hit is None:
            st, md = _open(ui.ls_pick.value) if ui.ls_pick.value else (None, step_markdown(None, 0))
            return gr.update(), st, md, *tab
        lesson, i = hit
        name = dict(request.query_params)["lesson"]
        return (gr.update(value=name), {"name": name, "lesson": lesson, "i": i}, step_markdown(lesson, i),
                *([gr.update(selected="lessons")] if tabs is not None else []))

    from_url.__annotations__["request"] = gr.Request     # (postponed annotations: gradio must see the class)

    @friendly
    @stoppable(2)
    def run(s, st, progress=gr.Progress()):
        s = need_session(s)
        if not st:
            raise user_error("Choose a lesson first.")
        step = st["lesson"]["steps"][st["i"]]
        a = step["action"]
        if a is None:
            return "This step has nothing to run: read it, then go on.", None
        report = progress_fn(progress, s)
        if a["kind"] == "merge":
            rec = studio.merge(s, a["method"], a["params"], report)
            sm = rec["summary"]
            return (f"Merge #{rec['id']} ({rec['title']}, α = {float(rec['params']['alpha']):.2f}): "
                    f"{100 * sm['mean_abs']:.1f} % absolute, {100 * sm['mean_norm']:.1f} % normalised on the live "
                    "test subset — it is now the current merge (tab 4)."), None
        if s.pool is None:
            raise user_error("Load a pool first (tab 1).")
        with s.lock:
            res = sweeps.SWEEPS[a["sweep"]](s.pool, **a["params"], device=s.device, progress=report)
        head = (f"**{a['sweep']} sweep** on pool `{res['pool']}`" +
                (" (cached)" if res["cached"] else f" ({res['seconds']:.0f} s)") + "\n\n")
        return head + table(res), viz.sweep_figure(res)

    ui.ls_pick.change(pick, [ui.ls_pick], [ui.ls_state, ui.ls_step], api_name="lesson_open", **LIGHT)
    ui.ls_prev.click(lambda st: move(st, -1), [ui.ls_state], [ui.ls_state, ui.ls_step], api_name="lesson_prev",
                     **LIGHT)
    ui.ls_next.click(lambda st: move(st, 1), [ui.ls_state], [ui.ls_state, ui.ls_step], api_name="lesson_next",
                     **LIGHT)
    ui.ls_run.click(run, [ui.state, ui.ls_state], [ui.ls_out, ui.ls_plot], api_name="lesson_run", **HEAVY)
    ui.ls_cancel.click(lambda s: studio.cancel(s) if s is not None else None, [ui.state], None,
                       api_visibility="private", concurrency_id="cancel", concurrency_limit=None)
    ui.demo.load(from_url, None, [ui.ls_pick, ui.ls_state, ui.ls_step, *([tabs] if tabs is not None else [])],
                 api_visibility="private")
