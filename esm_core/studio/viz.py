"""Plotly figures for the ESM Studio views: pure functions, data in, figure out.

This is the only module that imports plotly. Every function takes plain
Python / numpy data (the tables of :mod:`esm_core.analysis`, the summaries of
:mod:`esm_core.evaluation`, the routing log) and returns a ``plotly.graph_objects.Figure``;
nothing here computes a merge or touches a model.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..evaluation import sweeps
from ..models import short_key  # noqa: F401  (re-exported: the app labels layers with viz.short_key)

# One colour per task, in task order (Plotly's qualitative "D3" + "Set2" palettes, repeated if needed).
TASK_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                "#bcbd22", "#17becf", "#66c2a5", "#fc8d62", "#8da0cb", "#e78ac3", "#a6d854", "#ffd92f"]
REF_COLOURS = {"zero-shot": "#bdbdbd", "fine-tuned": "#636363", "merged": "#e6550d"}
_LAYOUT = dict(template="plotly_white", margin=dict(l=60, r=20, t=60, b=50), font=dict(size=12))


def task_colour(i: int) -> str:
    return TASK_COLOURS[i % len(TASK_COLOURS)]


def _pct(v) -> float:
    return float("nan") if v is None else 100.0 * float(v)


def empty_figure(message: str) -> go.Figure:
    """A blank figure carrying one centred message (e.g. "merge first")."""
    fig = go.Figure()
    fig.add_annotation(text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                       font=dict(size=14, color="#666"))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.update_layout(**_LAYOUT, height=300)
    return fig


# ---------------------------------------------------------------- merge view

def accuracy_figure(summary: Mapping, refs: Mapping[str, Mapping[str, float]], title: str = "",
                    interval: Mapping | None = None) -> go.Figure:
    """Per-task accuracy bars of a merge: absolute (with zero-shot and fine-tuned) and normalised.

    ``summary``: ``{"tasks": {task: {"abs": a, "norm": n}}, "mean_abs", "mean_norm"}``
    (:func:`esm_core.evaluation.summarize`); ``refs``: ``{"zeroshot": {task: a}, "finetuned": {task: a}}``;
    ``interval``: 95 % half-widths of the merged accuracies (``session.accuracy_interval``), drawn as error bars
    with the sample size in the hover text.
    Traces: zero-shot, merged, fine-tuned (top, %), zero-shot and merged normalised (bottom, %).
    """
    tasks = list(summary["tasks"])
    zs, ft = refs["zeroshot"], refs["finetuned"]
    xs = tasks + ["mean"]

    def with_mean(vals):
        return vals + [float(np.mean(vals))] if vals else vals

    merged_abs = with_mean([_pct(summary["tasks"][t]["abs"]) for t in tasks])
    merged_norm = with_mean([_pct(summary["tasks"][t]["norm"]) for t in tasks])
    zs_abs = with_mean([_pct(zs.get(t)) for t in tasks])
    ft_abs = with_mean([_pct(ft.get(t)) for t in tasks])
    zs_norm = with_mean([_pct(zs[t] / ft[t]) if ft.get(t) else float("nan") for t in tasks])

    err = None
    if interval is not None:
        err = dict(type="data", array=[_pct(interval["tasks"][t]) for t in tasks] + [_pct(interval["mean_abs"])],
                   color="#7f2704", thickness=1.5, width=4)
        n = interval["n"]
        hover = [f"{t}: n = {n[t]} images, ± {_pct(interval['tasks'][t]):.1f} (95 %)" for t in tasks]
        hover.append(f"mean: n = {sum(n.values())} images, ± {_pct(interval['mean_abs']):.1f} (95 %)")
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.12,
                        subplot_titles=("absolute top-1 accuracy (%)", "normalised: merged / fine-tuned (%)"))
    for name, vals, col in (("zero-shot", zs_abs, REF_COLOURS["zero-shot"]),
                            ("merged", merged_abs, REF_COLOURS["merged"]),
                            ("fine-tuned", ft_abs, REF_COLOURS["fine-tuned"])):
        extra = ({"error_y": err, "hovertext": hover} if err is not None and name == "merged" else {})
        # the merged bar's value goes above its error bar (a label inside the bar would sit on the error bar)
        text = {} if err is not None and name == "merged" else _bar_text(vals)
        fig.add_trace(go.Bar(name=name, x=xs, y=vals, marker_color=col, legendgroup=name, offsetgroup=name,
                             **text, **extra), row=1, col=1)
    for name, vals, col in (("zero-shot", zs_norm, REF_COLOURS["zero-shot"]),
                            ("merged", merged_norm, REF_COLOURS["merged"])):
        fig.add_trace(go.Bar(name=f"{name} (normalised)", x=xs, y=vals, marker_color=col, legendgroup=name,
                             offsetgroup=name, showlegend=False, **_bar_text(vals)), row=2, col=1)
    if err is not None:             # in the merged bar's column (same offset group), just above its error bar
        tops = [v + e if np.isfinite(v) else float("nan") for v, e in zip(merged_abs, err["array"])]
        fig.add_trace(go.Scatter(name="merged (value)", x=xs, y=tops, mode="text", offsetgroup="merged",
                                 text=[f"{v:.1f}" if np.isfinite(v) else "" for v in merged_abs],
                                 textposition="top center", textfont=dict(size=10, color="#7f2704"),
                                 showlegend=False, hoverinfo="skip", cliponaxis=False), row=1, col=1)
    fig.add_hline(y=100, line_dash="dot", line_color=REF_COLOURS["fine-tuned"], row=2, col=1)
    fig.update_yaxes(range=[0, 105], row=1, col=1)
    fig.update_yaxes(range=[0, max(110.0, np.nanmax(merged_norm + [0.0]) + 8)], row=2, col=1)
    # the title in the top margin, anchored at its top inside the figure (a 2-line title anchored lower was cut off)
    # (plotly anchors a title's top by its first line: a 2-line title reaches ~15 px above it, hence the padding)
    fig.update_layout(**{**_LAYOUT, "margin": dict(l=60, r=20, t=150, b=40)}, barmode="group", height=580,
                      scattermode="group",
                      title=dict(text=title, x=0, xanchor="left", xref="paper", y=1, yref="container",
                                 yanchor="top", pad=dict(t=26)) if title else None,
                      legend=dict(orientation="h", yanchor="bottom", y=1.06, x=0))
    return fig


def _bar_text(vals) -> dict:
    """Value labels written upright along each bar, inside at its top (just above a bar too short to hold it):
    they do not run into the labels of the neighbouring bars ("92.097.096.0"). Bars with error bars get theirs
    above the error bar instead (:func:`accuracy_figure`)."""
    return dict(text=[f"{v:.1f}" if np.isfinite(v) else "" for v in vals], textposition="auto",
                textangle=-90, insidetextanchor="end", textfont=dict(size=10), cliponaxis=False)


def alpha_curve_figure(curve: Sequence[tuple[float, float]], best: float | None = None,
                       current: float | None = None, title: str = "") -> go.Figure:
    """Mean normalised validation accuracy against α, with the best and the current α marked."""
    a = [float(x) for x, _ in curve]
    s = [_pct(y) for _, y in curve]
    fig = go.Figure(go.Scatter(x=a, y=s, mode="lines+markers", name="mean normalised accuracy (val)",
                               line=dict(color=REF_COLOURS["merged"])))
    if best is not None:
        fig.add_vline(x=best, line_dash="dash", line_color="#31a354", annotation_text=f"best α = {best:.2f}")
    if current is not None:
        fig.add_vline(x=current, line_dash="dot", line_color="#636363", annotation_text=f"current α = {current:.2f}",
                      annotation_position="bottom right")
    fig.update_layout(**_LAYOUT, height=340, title=title or "α curve", xaxis_title="α",
                      yaxis_title="mean normalised accuracy (%)")
    return fig


# ---------------------------------------------------------------- spectra view

def spectrum_figure(row: Mapping, k: int | None = None, title: str = "") -> go.Figure:
    """One layer and task: ESD energy spectrum against the SVD spectrum of ΔW.

    ``row``: a row of :func:`esm_core.analysis.spectra`. Left: both spectra,
    each divided by its sum (log scale). Right: share of the output-shift energy
    kept by a rank-r truncation (ESD vs SVD), with the chosen rank ``k`` marked.
    """
    lam = np.asarray(row["esd_lambda"], dtype=float)
    s2 = np.asarray(row["svd_sigma2"], dtype=float)
    r = np.arange(1, max(len(lam), len(s2)) + 1)
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12,
                        subplot_titles=("spectrum (share of total, log)", "output-shift energy kept at rank r"))
    for name, v, col in (("ESD λ (activations)", lam, "#e6550d"), ("SVD σ² (weights)", s2, "#3182bd")):
        tot = v.sum()
        share = v / tot if tot > 0 else np.zeros_like(v)
        share = np.where(share > 1e-10, share, np.nan)     # numerical zeros would stretch the log axis
        fig.add_trace(go.Scatter(x=r[:len(v)], y=share, mode="lines", name=name, line=dict(color=col),
                                 legendgroup=name), row=1, col=1)
    for name, v, col in (("ESD", row["esd_energy_kept"], "#31a354"), ("SVD", row["svd_energy_kept"], "#756bb1")):
        v = [_pct(x) for x in v]
        fig.add_trace(go.Scatter(x=r[:len(v)], y=v, mode="lines", name=f"{name} energy kept", line=dict(color=col,
                                 dash="solid" if name == "ESD" else "dash"), legendgroup=name), row=1, col=2)
    k = row.get("k") if k is None else k
    if k:
        fig.add_vline(x=k, line_dash="dot", line_color="#636363", row=1, col=2,
                      annotation_text=f"k = {k}", annotation_position="bottom right")
        fig.add_vline(x=k, line_dash="dot", line_color="#636363", row=1, col=1)
    fig.update_yaxes(type="log", exponentformat="power", row=1, col=1)
    fig.update_yaxes(range=[0, 102], row=1, col=2)
    if k:                                             # zoom on the ranks around k, where ESD and SVD differ
        fig.update_xaxes(range=[0.5, min(len(r), max(4 * int(k), 10)) + 0.5], row=1, col=2)
    fig.update_xaxes(title_text="rank r", row=1, col=1)
    fig.update_xaxes(title_text="rank r", row=1, col=2)
    fig.update_layout(**{**_LAYOUT, "margin": dict(l=60, r=20, t=95, b=50)}, height=420,
                      legend=dict(orientation="h", y=-0.2),
                      title=title or f"{row.get('key', '')} · {row.get('task', '')}")
    return fig


def layer_task_heatmap(rows: Sequence[Mapping], field: str = "esd_kept_at_k", title: str = "",
                       percent: bool = True) -> go.Figure:
    """Layer × task overview of one field of the spectra rows (default: ESD energy kept at rank k)."""
    layers = list(dict.fromkeys(r["key"] for r in rows))
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    z = np.full((len(layers), len(tasks)), np.nan)
    for r in rows:
        v = r[field]
        z[layers.index(r["key"]), tasks.index(r["task"])] = _pct(v) if percent else float(v)
    labels = [short_key(k) for k in layers]
    fig = go.Figure(go.Heatmap(z=z, x=tasks, y=labels, colorscale="Viridis",
                               text=np.vectorize(lambda v: f"{v:.0f}" if np.isfinite(v) else "")(z),
                               texttemplate="%{text}", colorbar=dict(title="%" if percent else "")))
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(**_LAYOUT, height=max(300, 28 * len(layers) + 120), title=title or field)
    return fig


# ---------------------------------------------------------------- interference view

def task_matrix_figure(matrix: Sequence[Sequence[float]], tasks: Sequence[str], title: str = "",
                       zmin: float | None = None, zmax: float | None = None, colorscale: str = "Blues") -> go.Figure:
    """A task × task heatmap (subspace overlap, task-vector cosines), values written in the cells."""
    z = np.asarray(matrix, dtype=float)
    fig = go.Figure(go.Heatmap(z=z, x=list(tasks), y=list(tasks), zmin=zmin, zmax=zmax, colorscale=colorscale,
                               text=np.vectorize(lambda v: f"{v:.2f}" if np.isfinite(v) else "")(z),
                               texttemplate="%{text}"))
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(**_LAYOUT, height=380, title=title)
    return fig


def sar_figure(alignment: Mapping, key: str | None = None, title: str = "") -> go.Figure:
    """Subspace alignment ratio of each task against the merge: mean over layers, and one layer if ``key``."""
    tasks = list(alignment["tasks"])
    fig = go.Figure()
    for i, t in enumerate(tasks):          # one trace per task: the legend shows each task's colour
        fig.add_trace(go.Bar(name=f"{t} (mean over layers)", x=[t], y=[_pct(alignment["mean"][t])],
                             marker_color=task_colour(i)))
    if key is not None and key in alignment["layers"]:
        fig.add_trace(go.Scatter(name=f"layer {short_key(key)}", x=tasks,
                                 y=[_pct(alignment["layers"][key][t]) for t in tasks], mode="markers",
                                 marker=dict(symbol="diamond", size=12, color="#252525")))
    fig.update_layout(**_LAYOUT, height=340, title=title or "subspace alignment ratio with the current merge",
                      yaxis=dict(title="SAR (%)", range=[0, 105]), legend=dict(orientation="h", y=-0.2))
    return fig


# ---------------------------------------------------------------- routing view

def routing_heatmap(choices: np.ndarray, tasks: Sequence[str], sample_labels: Sequence[str],
                    layer_labels: Sequence[str], title: str = "") -> go.Figure:
    """Samples × routed layers, each cell coloured by the task whose expert was chosen.

    ``choices``: int array (samples × layers) of task indices.
    """
    c = np.asarray(choices, dtype=float)
    T = max(len(tasks), 1)
    scale = []
    for i in range(T):   # a discrete colour scale: band i of [0, 1] has task i's colour
        scale += [[i / T, task_colour(i)], [(i + 1) / T, task_colour(i)]]
    names = np.vectorize(lambda v: tasks[int(v)] if np.isfinite(v) and 0 <= int(v) < len(tasks) else "")(c) \
        if c.size else c
    fig = go.Figure(go.Heatmap(z=c, x=list(layer_labels), y=list(sample_labels), zmin=-0.5, zmax=T - 0.5,
                               colorscale=scale, customdata=names, xgap=1, ygap=1,
                               hovertemplate="sample %{y}<br>layer %{x}<br>expert: %{customdata}<extra></extra>",
                               colorbar=dict(tickvals=list(range(T)), ticktext=list(tasks), title="expert")))
    fig.update_yaxes(autorange="reversed", title="sample (true task)")
    fig.update_xaxes(title="routed layer")
    fig.update_layout(**_LAYOUT, height=max(320, 16 * len(sample_labels) + 140),
                      title=title or "which task's expert each sample chose, per layer")
    return fig


def cosine_figure(cosines: np.ndarray, tasks: Sequence[str], layer_labels: Sequence[str], title: str = "") -> go.Figure:
    """One sample: cosine of its mean hidden state with every task prototype, per routed layer (layers × tasks)."""
    z = np.asarray(cosines, dtype=float)
    fig = go.Figure(go.Heatmap(z=z, x=list(tasks), y=list(layer_labels), colorscale="RdBu", zmid=0,
                               text=np.vectorize(lambda v: f"{v:.2f}")(z) if z.size else z, texttemplate="%{text}"))
    if z.size:                     # the chosen task of each layer: its cell outlined along the cell's border
        for row, b in enumerate(z.argmax(1)):
            fig.add_shape(type="rect", x0=b - 0.48, x1=b + 0.48, y0=row - 0.45, y1=row + 0.45, xref="x", yref="y",
                          line=dict(color="#000", width=2), fillcolor="rgba(0,0,0,0)", name="chosen")
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(**_LAYOUT, height=max(340, 34 * len(layer_labels) + 160),
                      title=title or "cosine with each task prototype", showlegend=False)
    return fig


def _interval_bars(vals: Sequence[float], interval) -> dict:
    """Asymmetric error bars (%) from ``interval = (lows, highs)`` (fractions) around ``vals`` (%)."""
    if interval is None:
        return {}
    lo, hi = interval
    up = [max(0.0, _pct(h) - v) for h, v in zip(hi, vals)]
    down = [max(0.0, v - _pct(l_)) for l_, v in zip(lo, vals)]
    return {"error_y": dict(type="data", symmetric=False, array=up, arrayminus=down, color="#252525",
                            thickness=1.5, width=4)}


def routing_accuracy_figure(layer_labels: Sequence[str], accuracy: Sequence[float], title: str = "",
                            n: int | None = None, interval=None, chance: float | None = None) -> go.Figure:
    """Share of samples routed to their own task's expert, per routed layer.

    ``n``: the samples behind each bar (in the title and the hover text); ``interval``: ``(lows, highs)`` per layer,
    as fractions (the 95 % Wilson interval), drawn as error bars; ``chance``: the share a router picking a task at
    random would reach (1/T), a dashed line.
    """
    ys = [_pct(a) for a in accuracy]
    hover = None
    if interval is not None:
        hover = [f"{lab}: {y:.0f} % ({_pct(l_):.0f}–{_pct(h):.0f} %, 95 %)" + (f", n = {n}" if n else "")
                 for lab, y, l_, h in zip(layer_labels, ys, *interval)]
    fig = go.Figure(go.Bar(x=list(layer_labels), y=ys, marker_color="#756bb1", name="routing accuracy",
                           text=[f"{y:.0f}" for y in ys], textposition="inside", insidetextanchor="start",
                           hovertext=hover, **_interval_bars(ys, interval)))
    notes = []
    if n:
        notes.append(f"n = {n} samples per layer")
    if interval is not None:
        notes.append("error bars: 95 % Wilson interval")
    if chance is not None:          # named in the title: a label on the line would sit on the bars
        fig.add_hline(y=_pct(chance), line_dash="dash", line_color="#d62728", name="chance")
        notes.append(f"<span style='color:#d62728'>dashed: chance, 1/{round(1 / chance)} = {_pct(chance):.1f} %</span>")
    if not title:
        title = "routing accuracy per layer" + (f"<br><sub>{'; '.join(notes)}</sub>" if notes else "")
    fig.update_layout(**{**_LAYOUT, "margin": dict(l=60, r=20, t=80, b=50)}, height=340, title=title,
                      yaxis=dict(title="routed to the true task (%)", range=[0, 105]))
    return fig


def oracle_figure(tasks: Sequence[str], routed: Mapping[str, float], oracle: Mapping[str, float],
                  merged: Mapping[str, float] | None = None, title: str = "", n: Mapping[str, int] | None = None,
                  intervals: Mapping[str, tuple] | None = None) -> go.Figure:
    """Per-task accuracy of ESM++ with its own routing against the oracle (true task forced), and the static merge.

    ``n``: test samples per task (in the title and the hover text); ``intervals``: per series name ("static ESM",
    "ESM++ (routed)", "ESM++ (oracle routing)") the ``(lows, highs)`` per task as fractions (95 % Wilson), drawn as
    error bars.
    """
    fig = go.Figure()
    series = [("static ESM", merged, REF_COLOURS["zero-shot"])] if merged else []
    series += [("ESM++ (routed)", routed, "#756bb1"), ("ESM++ (oracle routing)", oracle, REF_COLOURS["fine-tuned"])]
    for name, vals, col in series:
        ys = [_pct(vals.get(t)) for t in tasks]
        iv = (intervals or {}).get(name)
        hover = [f"{name}, {t}: {y:.1f} %" + (f" ({_pct(iv[0][i]):.0f}–{_pct(iv[1][i]):.0f} %, 95 %)" if iv else "")
                 + (f", n = {n[t]}" if n and t in n else "") for i, (t, y) in enumerate(zip(tasks, ys))]
        fig.add_trace(go.Bar(name=name, x=list(tasks), y=ys, marker_color=col, hovertext=hover,
                             **_interval_bars(ys, iv)))
    if not title:
        title = "routed vs oracle accuracy"
        if n:
            lo, hi = min(n.values()), max(n.values())
            title += (f"<br><sub>n = {lo if lo == hi else f'{lo}–{hi}'} test samples per task"
                      + ("; error bars: 95 % Wilson interval" if intervals else "") + "</sub>")
    fig.update_layout(**{**_LAYOUT, "margin": dict(l=60, r=20, t=80, b=90)}, barmode="group", height=380,
                      title=title, yaxis=dict(title="accuracy (%)", range=[0, 105]),
                      legend=dict(orientation="h", yanchor="top", y=-0.12, x=0))
    return fig


def embedding_figure(points: np.ndarray, labels: Sequence[str], proto_points: np.ndarray | None = None,
                     proto_labels: Sequence[str] | None = None, tasks: Sequence[str] | None = None,
                     title: str = "", method: str = "pca", own: Mapping | None = None) -> go.Figure:
    """2-D map (UMAP or PCA) of the samples' hidden states, coloured by true task, with task prototypes as stars.

    ``own``: the user's own input, ``{"point": (x, y), "label": "your image", "text": what it was routed to}``,
    projected by the same fitted map; drawn as a large black cross, labelled, in its own legend entry.
    """
    pts = np.asarray(points, dtype=float)
    tasks = list(tasks) if tasks is not None else list(dict.fromkeys(list(labels) + list(proto_labels or [])))
    fig = go.Figure()
    labels = list(labels)
    for i, t in enumerate(tasks):
        idx = [j for j, lab in enumerate(labels) if lab == t]
        if idx:
            fig.add_trace(go.Scatter(x=pts[idx, 0], y=pts[idx, 1], mode="markers", name=t, legendgroup=t,
                                     marker=dict(color=task_colour(i), size=8, opacity=0.8)))
    if proto_points is not None and proto_labels is not None:
        pp = np.asarray(proto_points, dtype=float)
        for i, t in enumerate(tasks):
            idx = [j for j, lab in enumerate(proto_labels) if lab == t]
            if idx:
                fig.add_trace(go.Scatter(x=pp[idx, 0], y=pp[idx, 1], mode="markers", name=f"{t} prototype",
                                         legendgroup=t, showlegend=False,
                                         marker=dict(color=task_colour(i), size=18, symbol="star",
                                                     line=dict(color="#000", width=1))))
    if own is not None:
        x, y = (float(v) for v in own["point"])
        fig.add_trace(go.Scatter(x=[x], y=[y], mode="markers+text", name=own.get("label", "your input"),
                                 text=[own.get("label", "your input")], textposition="top center",
                                 hovertext=[own.get("text", "")], textfont=dict(size=13, color="#000"),
                                 marker=dict(symbol="x", size=18, color="#000", line=dict(color="#fff", width=1.5))))
    axis = ("principal component 1", "principal component 2") if method == "pca" else ("UMAP 1", "UMAP 2")
    fig.update_xaxes(showticklabels=False, title=f"{axis[0]} (of the hidden states)")
    fig.update_yaxes(showticklabels=False, title=axis[1])
    fig.update_layout(**{**_LAYOUT, "margin": dict(l=60, r=20, t=80, b=50)}, height=440,
                      title=title or "samples and task prototypes (★)")
    return fig


def sweep_figure(result: Mapping):
    """A plotly figure of the sweep: bars (ablation) or lines with error bars (the others), test accuracy %."""
    xlabel, xof, series = sweeps.axis_of(result)
    rows = list(result["rows"])
    kind = result["kind"]
    fig = go.Figure()
    y_key, hw_key = ("mean_norm", "norm_sd") if kind == "tasks" else ("mean_abs", "mean_abs_hw")
    for name in dict.fromkeys(series(r) for r in rows):
        rs = [r for r in rows if series(r) == name]
        x = [xof(r) for r in rs]
        y = [100 * r[y_key] for r in rs]
        err = dict(type="data", array=[100 * r[hw_key] for r in rs], visible=True)
        if kind == "ablation":
            fig.add_trace(go.Bar(x=x, y=y, error_y=err, name=name, text=[f"{v:.1f}" for v in y],
                                 textposition="inside"))
        else:
            fig.add_trace(go.Scatter(x=x, y=y, error_y=err, mode="lines+markers", name=name))
    if kind == "tasks" and rows:
        ks = [k for k in rows[0] if k.startswith("rank:")]
        ticks = sorted({r["tasks_merged"] for r in rows})
        text = [f"{T}<br>k={'/'.join(str(next(r[k] for r in rows if r['tasks_merged'] == T)) for k in ks)}"
                for T in ticks]
        fig.update_xaxes(tickmode="array", tickvals=ticks, ticktext=text)
    if kind == "rank":
        fig.update_xaxes(type="log")
    ylab = ("normalised accuracy % (mean over task subsets, ± sd)" if kind == "tasks"
            else "test accuracy % (± 95 % interval)")
    fig.update_layout(title=f"{kind} sweep on pool {result.get('pool')!r}", xaxis_title=xlabel, yaxis_title=ylab,
                      template="plotly_white", margin=dict(t=60, l=60, r=20, b=60))
    return fig
