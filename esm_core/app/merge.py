"""View 4 · Merge: pick a method, move its knobs, see the live accuracy (with its noise), the α curve, full eval."""
from __future__ import annotations

import html

import gradio as gr
import pandas as pd

from esm_core.evaluation.recipes import pool_difference, proxy_difference, read_recipe
from esm_core.models import openclip_vit as vit

from .common import (HEAVY, LIGHT, METHODS, ROUTING_RANKS, TOAST_S, friendly, gpu, need_session, progress_fn,
                     stoppable, studio, viz)

TEXT = """Pick a method and move its knobs: the model is re-merged from cached decompositions and re-evaluated at once.
ESM ends with a **flat spectrum** — every direction of the merged update gets the same strength — so the large
directions of one task cannot drown the small but essential directions of another. α scales the whole merged update."""
DEFAULT_METHOD = "ta"

# One plain line per control (the label); the schema's technical help stays below it.
PLAIN = {
    "alpha": "strength of the merged update (0 = the pre-trained model)",
    "rank": "directions each task keeps per layer (0 = automatic: d_out / number of tasks)",
    "rank_fraction": "the same, as a share of the automatic number (0 = use rank instead)",
    "p_task": "how much more say tasks with larger updates get",
    "p_dim": "how much more say the busiest input features get",
    "p_layer": "how much more say layers with larger updates get",
    "eig_exp": "how much more say each task's strongest directions get",
    "ortho_factor": "overall scale after the tasks' directions are made independent",
    "esd_types": "which kinds of layers ESM merges (the others: TSV-M)",
}


def control(method: str, p) -> gr.components.Component:
    """The input control of one method parameter, built from its schema."""
    plain = PLAIN.get(p.name) if (method == "esm" or p.name == "alpha") else None
    kw = dict(label=f"{p.name}: {plain}" if plain else p.name, info=p.help, elem_id=f"ctl-{method}-{p.name}")
    if method == "esm" and p.name == "esd_types":         # a choice of layer types, not free text
        return gr.Dropdown(choices=["auto", *vit.LAYER_TYPES], value=[t for t in str(p.default).split(",") if t],
                           multiselect=True, **kw)
    if p.choices:
        return gr.Dropdown(choices=list(p.choices), value=p.default, **kw)
    if p.type is bool:
        return gr.Checkbox(value=bool(p.default), **kw)
    if p.type in (int, float) and p.min is not None and p.max is not None:
        step = p.step if p.step else (1 if p.type is int else (p.max - p.min) / 100)
        if p.type is int and (p.max - p.min) / step > 1000:
            # no precision=0, for ints either: gradio would round 2.5 to 2 and fail on NaN without naming the
            # parameter; the schema (Param.check) refuses both with a message that names it
            return gr.Number(value=p.default, minimum=p.min, maximum=p.max, **kw)
        return gr.Slider(p.min, p.max, value=p.default, step=step, **kw)
    if p.type in (int, float):
        return gr.Number(value=p.default, minimum=p.min, maximum=p.max, **kw)
    return gr.Textbox(value=str(p.default), **kw)


def layout(ui) -> None:
    with gr.Tab("4 · Merge", id="merge"):
        gr.Markdown(TEXT, elem_classes="esm-intro")
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                ui.method_dd = gr.Dropdown(choices=studio.method_choices(), value=DEFAULT_METHOD, label="method",
                                           elem_id="method")
                ui.method_help = gr.Markdown(f"*{METHODS[DEFAULT_METHOD].help}*")
                ui.groups, ui.controls, ui.slices = {}, [], {}
                for name, m in METHODS.items():
                    with gr.Group(visible=(name == DEFAULT_METHOD)) as ui.groups[name]:
                        lo = len(ui.controls)
                        ui.controls += [control(name, p) for p in m.params]
                        if name == "esm":
                            ui.esd_types_ctl = next(c for c in ui.controls[lo:] if c.elem_id == "ctl-esm-esd_types")
                        ui.slices[name] = (lo, len(ui.controls))
                with gr.Row():
                    ui.curve_btn = gr.Button("α curve on validation", size="sm", elem_id="curve-btn")
                    ui.best_btn = gr.Button("use the best α", size="sm", interactive=False, elem_id="best-btn")
                ui.full_btn = gr.Button("Evaluate on the full test split", size="sm")
                ui.cancel_btn = gr.Button("Cancel the running merge / α curve / evaluation", size="sm",
                                          variant="stop", elem_id="cancel-btn")
                ui.recipe_file = gr.File(label="load a recipe: an exported merge (.safetensors) or its config "
                                               "(.json) sets the method and every control", height=90,
                                         file_types=[".safetensors", ".json"], elem_id="recipe-file")
                ui.recipe_md = gr.Markdown(elem_id="recipe-note")
            with gr.Column(scale=2):
                ui.acc_plot = gr.Plot(label="per-task accuracy", show_label=False, elem_id="acc-plot")
                ui.merge_md = gr.Markdown(elem_id="merge-note")
        ui.curve_plot = gr.Plot(curve_hint(), label="α curve", show_label=False, visible=True,
                                elem_id="curve-plot")
        ui.full_md = gr.Markdown()
        ui.cmp_df = gr.Dataframe(label="every merge of this session", interactive=False, elem_id="cmp-table",
                                 wrap=True)
        ui.curve_state = gr.State(None)      # (method, best α, curve, title, parameter key) of the last α curve


def params_of(method: str, values: tuple, slices: dict) -> dict:
    """The method's parameters from the values of every control (a multi-select becomes a comma list)."""
    lo, hi = slices[method]
    vals = [",".join(v) if isinstance(v, (list, tuple)) else v for v in values[lo:hi]]
    return dict(zip([p.name for p in METHODS[method].params], vals))


def merge_outputs(s, rec) -> tuple:
    """Accuracy figure (with 95 % intervals), the note under it, the comparison table."""
    refs = studio.references(s)
    sizes = studio.sample_sizes(s)
    ci = studio.accuracy_interval(rec["summary"], sizes, refs["finetuned"])
    sm, alpha = rec["summary"], float(rec["params"]["alpha"])
    lo, hi = min(sizes.values()), max(sizes.values())
    unit = studio.pool_info(s)["inputs"]                 # "images" or "sentences"
    n_txt = f"n = {lo if lo == hi else f'{lo}–{hi}'} test {unit} per task"
    title = (f"#{rec['id']} {rec['title']} (α = {alpha:.2f}): mean {100 * sm['mean_abs']:.1f} ± "
             f"{100 * ci['mean_abs']:.1f} % absolute · {100 * sm['mean_norm']:.1f} ± {100 * ci['mean_norm']:.1f} % "
             f"normalised<br><sub>{n_txt}; ± = 95 % interval (error bars: each task's)</sub>")
    fig = viz.accuracy_figure(sm, refs, title=title, interval=ci)
    md = (f"Merged and evaluated in **{rec['seconds']:.2f} s**. Live accuracy is measured on a fixed subset "
          f"({n_txt}, the same {unit} for every merge and for the references), so it is noisy: **± "
          f"{100 * ci['mean_abs']:.1f} points** on the mean (95 % binomial interval; the error bars show each "
          "task's). **Evaluate on the full test split** below measures the whole split.")
    zs = sum(refs["zeroshot"].values()) / len(refs["zeroshot"])
    if sm["mean_abs"] < zs:
        md += (f"\n\n**This merge is worse than zero-shot** ({100 * sm['mean_abs']:.1f} % against "
               f"{100 * zs:.1f} % for the pre-trained model alone): at α = {alpha:.2f} the task updates, added "
               "together, interfere — each pushes the shared weights away from what the other tasks need. A "
               "smaller α usually helps: run the **α curve on validation** and **use the best α**.")
    return fig, md, comparison_table(s, sizes, refs["finetuned"])


def column_widths(df: pd.DataFrame, char_px: float = 8.5, pad_px: int = 30, widest: int = 260) -> list[str]:
    """Each column at least as wide as the longest word of its header and cells (the table font is monospaced),
    so that no header breaks inside a word ("fashio n %"); the table scrolls sideways when they do not all fit."""
    def longest(v) -> int:
        return max((len(w) for w in str(v).split()), default=0)
    out = []
    for c in df.columns:
        chars = max([longest(c), *(longest(v) for v in df[c].tolist())])
        out.append(f"{min(widest, int(chars * char_px + pad_px))}px")
    return out


def comparison_table(s, sizes: dict, finetuned: dict) -> pd.DataFrame:
    """Every merge of the session, with the 95 % interval of its mean and the sample size behind it."""
    df = pd.DataFrame(studio.comparison_rows(s))
    ci = [studio.accuracy_interval(r["summary"], sizes, finetuned)["mean_abs"] for r in s.merges]
    df.insert(df.columns.get_loc("mean abs %") + 1, "± (95 %)", [round(100 * h, 1) for h in ci])
    df.insert(df.columns.get_loc("± (95 %)") + 1, "n / task", min(sizes.values()))
    return df


CURVE_HINT = "Press <b>α curve on validation</b> to draw the validation accuracy against α for these controls."


def curve_hint(text: str = CURVE_HINT):
    """The α curve's place before there is a curve (or once it no longer fits the controls): what to press."""
    return viz.empty_figure(text)


def param_text(method: str, params: dict) -> str:
    """A merge's parameters other than α that differ from their defaults, as "k=v, …" ("default parameters")."""
    changed = [f"{p.name}={params[p.name]}" for p in METHODS[method].params
               if p.name != "alpha" and p.name in params and params[p.name] != p.default]
    return ", ".join(changed) or "default parameters"


def param_key(method: str, params: dict) -> tuple:
    """What an α curve belongs to: the method and every parameter but α (checked and completed by the schema)."""
    p = METHODS[method].resolve(dict(params))
    return method, tuple(sorted((k, v) for k, v in p.items() if k != "alpha"))


def curve_figure(data, current: float | None):
    """``data``: (method, best α, curve, title, parameter key, parameter text) of an α curve (``curve_state``)."""
    method, best, curve, title = data[:4]
    return viz.alpha_curve_figure(curve, best, current, title)


def curve_follow(data, method: str, params: dict) -> tuple:
    """The α curve after a merge (updates of curve plot, curve state, best-α button): its "current α" marker moves
    to the merge's α when the curve belongs to the merge's parameter set; otherwise it is cleared, saying for which
    parameters it was drawn (its best α does not apply to the new ones)."""
    if data is None:
        return gr.update(), gr.update(), gr.update()
    if data[4] == param_key(method, params):
        return curve_figure(data, float(params["alpha"])), gr.update(), gr.update()
    note = (f"The α curve was drawn for {METHODS[data[0]].title} with {html.escape(data[5])};<br>this merge is "
            f"{METHODS[method].title} with {html.escape(param_text(method, params))}.<br>{CURVE_HINT}")
    return curve_hint(note), None, gr.update(interactive=False, value="use the best α")


def controls_back(method: str, values: tuple, cur, slices: dict) -> list:
    """Updates of every control (``values``: all of them, in order) that set ``method``'s controls to the merge on
    screen ``cur`` (the method's defaults when that merge is another method's); a control already showing its value
    is left alone (no change event, no new merge)."""
    out = [gr.update() for _ in values]
    lo, _ = slices[method]
    m = METHODS[method]
    shown = cur["params"] if cur is not None and cur["method"] == method else m.resolve({})
    for i, p in enumerate(m.params):
        want, have = shown[p.name], values[lo + i]
        if isinstance(have, (list, tuple)):                  # the esd_types multi-select
            want = [t for t in str(want).split(",") if t]
            have = list(have)
        if have != want:
            out[lo + i] = gr.update(value=want)
    return out


def recipe_updates(s, path, values: tuple, slices: dict) -> tuple[str, list, str, int | None]:
    """What loading the recipe file ``path`` does: ``(method, updates of every Merge-view control, note, the
    Routing view's expert rank or None)``.

    The recipe is read as hostile input (:func:`esm_core.evaluation.recipes.read_recipe`: bounded, strict JSON,
    known keys only, every value through the method's schema) and refused (ValueError naming the difference) when
    it was made on another pool — other tasks, another pool name, other proxy samples. An ESM++ recipe sets its ESM
    merge here and its rank in the Routing view (when the rank fits that view's slider; the note says so). Only
    controls that change are updated."""
    pool = s.pool
    if pool is None:
        raise ValueError("load a pool first: a recipe sets the controls of a merge of the pool it was made on")
    r = read_recipe(path)
    why = pool_difference(r, getattr(pool, "name", None), list(pool.task_names))
    if why:
        raise ValueError(f"this recipe is for another pool: {why}")
    stats = s.stats or {}
    why = proxy_difference(r, stats.get("proxy_ids"), stats.get("n", 32), stats.get("seed", 0))
    if why:
        raise ValueError(f"this recipe is for other proxy samples: {why}")
    method = "esm" if r.is_esmpp else r.method
    m = METHODS[method]
    params = m.resolve({k: v for k, v in r.params.items() if k in {p.name for p in m.params}})
    out = [gr.update() for _ in values]
    lo, _ = slices[method]
    for i, p in enumerate(m.params):
        want = params[p.name]
        if isinstance(values[lo + i], (list, tuple)) or (method == "esm" and p.name == "esd_types"):
            want = [t for t in str(want).split(",") if t]
        if values[lo + i] != want:
            out[lo + i] = gr.update(value=want)
    set_text = ", ".join(f"{k} = {v}" for k, v in params.items())
    note = f"Recipe loaded: **{m.title}** with {set_text}."
    rank = None
    if r.is_esmpp:
        rank = int(r.params["rank"])
        lo_r, hi_r, step = ROUTING_RANKS
        if lo_r <= rank <= hi_r and (rank - lo_r) % step == 0:
            note += f" It is an ESM++ recipe: its ESM merge is set here, and the Routing view's rank to {rank}."
        else:
            note += (f" It is an ESM++ recipe: its ESM merge is set here; its rank {rank} is outside the Routing "
                     f"view's {lo_r}–{hi_r} (build it with `esm-studio merge --recipe`).")
            rank = None
    if r.proxy is not None:
        note += f" Proxy samples: {r.proxy['n']} per task, seed {r.proxy['seed']} (the same as this session's)."
    return method, out, note, rank


def table_widths(df):
    """The comparison table's column widths for its columns (a change of the table's value sets them; the widths
    alone are no change of value, so this does not run again)."""
    if df is None or not len(getattr(df, "columns", ())):
        return gr.update()
    return gr.update(column_widths=column_widths(df))


def make_handlers(ui):
    slices = ui.slices

    n_controls = len(ui.controls)

    def merge_or_shown(s, method: str, params: dict, progress) -> tuple[dict, bool]:
        """(the merge record, True) — or (the merge on screen, False) when ``params`` are exactly its parameters
        (controls set back to it, or a control's change event sent twice): it is not merged again. Checked under the
        session's lock, so that two events with the same parameters merge once."""
        with s.lock:
            cur = s.current
            try:
                resolved = METHODS[method].resolve(dict(params))
            except ValueError:
                resolved = None                  # refused by studio.merge, with its message
            if resolved is not None and cur is not None and cur["method"] == method and cur["params"] == resolved:
                return cur, False
            return studio.merge(s, method, params, progress=progress_fn(progress, s)), True

    @gpu
    @friendly
    @stoppable(4)
    def merge_shown(s, method, *values, progress=gr.Progress()):
        """Merge with the method's controls (the API's "merge", a method switch, a newly loaded pool): a refused
        parameter set is an error message."""
        s = need_session(s)          # an explicit merge request always merges (the API's contract): a new row
        rec = studio.merge(s, method, params_of(method, values, slices), progress=progress_fn(progress, s))
        return (s, *merge_outputs(s, rec))

    @gpu
    @friendly
    @stoppable(7 + n_controls)
    def do_merge(s, method, curve, *values, progress=gr.Progress()):
        """A control moved: merge, move the α curve's marker (or clear a curve drawn for other parameters).

        A refused parameter set (e.g. rank and rank_fraction both set) changes no merge: the message says why, and
        the controls go back to the merge on screen, so that every later change merges again. Controls that equal
        the merge on screen (set back, or moved there and back) do not merge again."""
        s = need_session(s)
        keep = [gr.update() for _ in range(n_controls)]
        params = params_of(method, values, slices)
        cur = s.current
        try:
            rec, merged = merge_or_shown(s, method, params, progress)
        except ValueError as e:
            where = (f"merge #{cur['id']}, {cur['title']} at α = {float(cur['params']['alpha']):.2f}"
                     if cur is not None and cur["method"] == method else "the method's defaults")
            gr.Warning(html.escape(f"Not merged: {e}. The controls are set back to the merge on screen ({where}); "
                                   "change one parameter at a time from there."), duration=TOAST_S, title="Not merged")
            return (s, gr.update(), gr.update(), gr.update(), gr.update(), gr.update(), gr.update(),
                    *controls_back(method, values, cur, slices))
        if not merged:
            return (s, gr.update(), gr.update(), gr.update(), *curve_follow(curve, method, rec["params"]), *keep)
        return (s, *merge_outputs(s, rec), *curve_follow(curve, method, rec["params"]), *keep)

    def show_method(method):
        """Show the method's controls; the α curve and best α of the previous method no longer apply."""
        return ([gr.update(visible=(n == method)) for n in METHODS]
                + [f"*{METHODS[method].help}*", curve_hint(), None,
                   gr.update(interactive=False, value="use the best α")])

    @gpu
    @friendly
    @stoppable(4)
    def do_curve(s, method, *values, progress=gr.Progress()):
        s = need_session(s)
        params = params_of(method, values, slices)
        best, curve = studio.alpha_curve(s, method, params, progress=progress_fn(progress, s))
        n = studio.sample_sizes(s, "val")
        ptext = param_text(method, METHODS[method].resolve(dict(params)))
        title = (f"{METHODS[method].title}: mean normalised accuracy on ≤ {max(n.values())} validation "
                 f"{studio.pool_info(s)['inputs']} "
                 f"per task (n = {sum(n.values())} in all)<br><sub>for {html.escape(ptext)}; only α varies "
                 "(another parameter moved clears the curve)</sub>")
        data = (method, best, curve, title, param_key(method, params), ptext)
        return s, curve_figure(data, float(params["alpha"])), data, gr.update(
            interactive=True, value=f"use the best α ({best:.2f})")

    def use_best(method, data):
        """Set the method's α to the curve's best (which re-merges) and mark it on the curve."""
        out = [gr.update() for _ in ui.controls]
        if data is None or data[0] != method:
            return [*out, gr.update()]
        lo, hi = slices[method]
        names = [p.name for p in METHODS[method].params]
        a_param = METHODS[method].params[names.index("alpha")]
        wider = {"maximum": data[1]} if data[1] > a_param.max else {}     # the curve went past the slider's end
        out[lo + names.index("alpha")] = gr.update(value=data[1], **wider)
        return [*out, curve_figure(data, data[1])]

    @gpu
    @friendly
    @stoppable(2)
    def do_full(s, progress=gr.Progress()):
        s = need_session(s)
        res = studio.full_evaluation(s, progress=progress_fn(progress, s))
        sm = res["summary"]
        lines = [f"**Full test split** (current merge #{s.current['id']}): mean {100 * sm['mean_abs']:.2f} % "
                 f"absolute, {100 * sm['mean_norm']:.2f} % normalised.", "",
                 "| task | merged | fine-tuned | zero-shot |", "|---|---|---|---|"]
        for t, v in sm["tasks"].items():
            lines.append(f"| {t} | {100 * v['abs']:.1f} | {100 * res['refs']['finetuned'][t]:.1f} | "
                         f"{100 * res['refs']['zeroshot'][t]:.1f} |")
        return s, "\n".join(lines)

    @friendly
    def load_recipe(s, path, method_now, *values):
        """Set the method and every control from a recipe file; the controls' change events merge."""
        s = need_session(s)
        if not path:
            return (gr.update(), *[gr.update() for _ in values], gr.update(), gr.update())
        method, updates, note, rank = recipe_updates(s, path, values, slices)
        return (gr.update(value=method) if method != method_now else gr.update(), *updates, note,
                gr.update() if rank is None else gr.update(value=rank))

    return merge_shown, do_merge, show_method, do_curve, use_best, do_full, load_recipe


def do_cancel(s) -> None:
    """Stop this session's running work at its next progress report; it ends with a "Cancelled" message and
    leaves the session and the screen as they were (studio.cancel, checked by every view's progress callback)."""
    if s is not None and not getattr(s, "closed", False):
        studio.cancel(s)


def register(ui) -> None:
    """Define the merge handler before the other views wire events that chain into it (the pool view)."""
    # ui.do_merge (the pool view chains into it, and the API's "merge"): refusals are errors; ui.do_merge_live (a
    # control moved): also keeps the α curve and the controls equal to the merge on screen
    (ui.do_merge, ui.do_merge_live, ui.show_method, ui.do_curve, ui.use_best, ui.do_full,
     ui.load_recipe) = make_handlers(ui)
    ui.merge_inputs = [ui.state, ui.method_dd, *ui.controls]
    ui.merge_outs = [ui.state, ui.acc_plot, ui.merge_md, ui.cmp_df]
    ui.merge_live_inputs = [ui.state, ui.method_dd, ui.curve_state, *ui.controls]
    ui.merge_live_outs = [*ui.merge_outs, ui.curve_plot, ui.curve_state, ui.best_btn, *ui.controls]


def wire(ui) -> None:
    """A method switch shows its controls (light) and merges; α moves recombine from the cache (light queue);
    other knobs re-merge (heavy queue); the last change wins."""
    ins, outs = ui.merge_inputs, ui.merge_outs
    ui.method_dd.change(ui.show_method, [ui.method_dd], [*ui.groups.values(), ui.method_help, ui.curve_plot,
                                                          ui.curve_state, ui.best_btn],
                        queue=False, api_visibility="private").then(
        ui.do_merge, ins, outs, **HEAVY, trigger_mode="always_last", api_name="merge")
    alpha_ids = {id(ui.controls[ui.slices[m][0] + [p.name for p in METHODS[m].params].index("alpha")])
                 for m in METHODS}
    for c in ui.controls:
        queue = LIGHT if id(c) in alpha_ids else HEAVY
        c.change(ui.do_merge_live, ui.merge_live_inputs, ui.merge_live_outs, **queue, trigger_mode="always_last",
                 show_progress="minimal", show_progress_on=[ui.acc_plot], api_visibility="private")
    ui.curve_btn.click(ui.do_curve, ins, [ui.state, ui.curve_plot, ui.curve_state, ui.best_btn],
                       api_name="alpha_curve", **HEAVY)
    ui.best_btn.click(ui.use_best, [ui.method_dd, ui.curve_state], [*ui.controls, ui.curve_plot],
                      api_visibility="private", **LIGHT)
    ui.cmp_df.change(table_widths, [ui.cmp_df], [ui.cmp_df], queue=False, show_progress="hidden",
                     api_visibility="private")
    ui.full_btn.click(ui.do_full, [ui.state], [ui.state, ui.full_md], api_name="full_evaluation", **HEAVY)
    ui.recipe_file.upload(ui.load_recipe, [ui.state, ui.recipe_file, ui.method_dd, *ui.controls],
                          [ui.method_dd, *ui.controls, ui.recipe_md, ui.r_rank], api_name="load_recipe", **LIGHT)
    # its own queue, without a limit: a Cancel never waits behind the heavy work it stops
    ui.cancel_btn.click(do_cancel, [ui.state], None, api_name="cancel", concurrency_id="cancel",
                        concurrency_limit=None)
