"""esm_core.studio.viz: every figure function returns a plotly Figure with the traces and values expected."""
import numpy as np
import plotly.graph_objects as go
import pytest

from esm_core.studio import viz

TASKS = ["a", "b", "c"]


def _summary(vals, ft):
    return {"tasks": {t: {"abs": v, "norm": v / ft[t]} for t, v in zip(TASKS, vals)},
            "mean_abs": float(np.mean(vals)), "mean_norm": float(np.mean([v / ft[t] for t, v in zip(TASKS, vals)]))}


def test_accuracy_figure_traces_and_values():
    ft = {"a": 0.9, "b": 0.8, "c": 1.0}
    zs = {"a": 0.3, "b": 0.4, "c": 0.5}
    fig = viz.accuracy_figure(_summary([0.45, 0.4, 0.5], ft), {"zeroshot": zs, "finetuned": ft})
    assert isinstance(fig, go.Figure)
    names = [t.name for t in fig.data]
    assert names == ["zero-shot", "merged", "fine-tuned", "zero-shot (normalised)", "merged (normalised)"]
    merged = fig.data[1]
    assert list(merged.x) == TASKS + ["mean"]
    np.testing.assert_allclose(merged.y, [45, 40, 50, 45])
    np.testing.assert_allclose(fig.data[4].y[:3], [50, 50, 50])        # 0.45/0.9, 0.4/0.8, 0.5/1.0
    np.testing.assert_allclose(fig.data[3].y[:3], [100 / 3, 50, 50])    # zero-shot normalised
    np.testing.assert_allclose(fig.data[2].y, [90, 80, 100, 90])


def test_accuracy_figure_interval():
    """Issue 12 item 11: the merged bars carry their 95 % interval and sample size."""
    ft = {"a": 0.9, "b": 0.8, "c": 1.0}
    ci = {"n": {"a": 100, "b": 100, "c": 50}, "tasks": {"a": 0.05, "b": 0.06, "c": 0.1}, "mean_abs": 0.04}
    fig = viz.accuracy_figure(_summary([0.45, 0.4, 0.5], ft), {"zeroshot": ft, "finetuned": ft}, interval=ci)
    merged = fig.data[1]
    np.testing.assert_allclose(merged.error_y.array, [5, 6, 10, 4])
    assert "n = 50 images" in merged.hovertext[2] and "n = 250 images" in merged.hovertext[3]
    assert fig.data[0].error_y.array is None                          # references: no interval drawn


def test_spectrum_figure_marks_rank_and_keeps_curves():
    row = {"key": "visual.transformer.resblocks.0.mlp.c_fc.weight", "task": "a", "k": 2,
           "esd_lambda": [4.0, 1.0, 0.0], "svd_sigma2": [2.0, 2.0, 1.0],
           "esd_energy_kept": [0.8, 1.0, 1.0], "svd_energy_kept": [0.5, 0.9, 1.0]}
    fig = viz.spectrum_figure(row)
    assert [t.name for t in fig.data] == ["ESD λ (activations)", "SVD σ² (weights)", "ESD energy kept",
                                          "SVD energy kept"]
    assert len({t.line.color for t in fig.data}) == 4                # issue 12: no two curves share a colour
    np.testing.assert_allclose(fig.data[0].y[:2], [0.8, 0.2])     # shares of the spectrum
    assert np.isnan(fig.data[0].y[2])                              # zero eigenvalue: not drawn on the log axis
    np.testing.assert_allclose(fig.data[3].y, [50, 90, 100])
    assert any(s.x0 == 2 for s in fig.layout.shapes)               # the rank marker


def test_layer_task_heatmap_layout():
    rows = [{"key": f"visual.transformer.resblocks.{b}.mlp.c_fc.weight", "task": t, "esd_kept_at_k": 0.1 * (b + i)}
            for b in range(2) for i, t in enumerate(TASKS)]
    fig = viz.layer_task_heatmap(rows)
    h = fig.data[0]
    assert isinstance(h, go.Heatmap)
    assert list(h.x) == TASKS and list(h.y) == ["0 · mlp.c_fc", "1 · mlp.c_fc"]
    np.testing.assert_allclose(np.asarray(h.z), [[0, 10, 20], [10, 20, 30]])


def test_task_matrix_and_sar():
    fig = viz.task_matrix_figure([[1, 0.5, 0], [0.5, 1, 0.2], [0, 0.2, 1]], TASKS, "overlap", zmin=0, zmax=1)
    assert fig.data[0].zmin == 0 and fig.data[0].zmax == 1 and list(fig.data[0].x) == TASKS
    al = {"tasks": TASKS, "mean": {"a": 0.5, "b": 0.6, "c": 0.7},
          "layers": {"k1": {"a": 0.1, "b": 0.2, "c": 0.3}}}
    fig = viz.sar_figure(al, "k1")
    bars = [d for d in fig.data if isinstance(d, go.Bar)]
    np.testing.assert_allclose([b.y[0] for b in bars], [50, 60, 70])
    np.testing.assert_allclose(fig.data[-1].y, [10, 20, 30])
    assert len(viz.sar_figure(al).data) == 3
    # issue 12: the legend shows one colour per task (one bar trace per task, each named after its task)
    assert [b.x[0] for b in bars] == TASKS and all(b.name.startswith(x) for b, x in zip(bars, TASKS))
    assert len({b.marker.color for b in bars}) == 3 and all(b.showlegend is not False for b in bars)


def test_alpha_curve_and_empty():
    fig = viz.alpha_curve_figure([(0.1, 0.5), (0.2, 0.7)], best=0.2, current=0.1)
    np.testing.assert_allclose(fig.data[0].y, [50, 70])
    assert len(fig.layout.shapes) == 2
    assert viz.empty_figure("merge first").layout.annotations[0].text == "merge first"


def test_routing_figures():
    choices = np.array([[0, 0, 1], [2, 2, 2]])
    fig = viz.routing_heatmap(choices, TASKS, ["s0 (a)", "s1 (c)"], ["0 · in_proj", "0 · c_fc", "1 · in_proj"])
    h = fig.data[0]
    np.testing.assert_array_equal(np.asarray(h.z), choices)
    assert h.zmin == -0.5 and h.zmax == 2.5
    assert h.customdata[0][2] == "b" and h.customdata[1][0] == "c"
    cos = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.1]])
    fig = viz.cosine_figure(cos, TASKS, ["L0", "L1"])
    # the chosen (argmax) task per layer is outlined at its cell's border (issue 12: a marker drawn over the cell
    # hid the digits, "0.77" showed as ".77"): no trace but the heatmap, one rectangle per layer
    assert len(fig.data) == 1 and list(fig.data[0].text[0]) == ["0.90", "0.10", "0.00"]
    boxes = [s for s in fig.layout.shapes if s.type == "rect"]
    assert [(s.x0 + s.x1) / 2 for s in boxes] == [0, 1] and [(s.y0 + s.y1) / 2 for s in boxes] == [0, 1]
    assert all(s.x1 - s.x0 > 0.9 for s in boxes)                   # the whole cell, around the text
    fig = viz.routing_accuracy_figure(["L0", "L1"], [0.5, 1.0])
    np.testing.assert_allclose(fig.data[0].y, [50, 100])
    fig = viz.oracle_figure(TASKS, {"a": 0.5, "b": 0.6, "c": 0.7}, {"a": 0.9, "b": 0.9, "c": 0.9},
                            {"a": 0.4, "b": 0.4, "c": 0.4})
    assert [t.name for t in fig.data] == ["static ESM", "ESM++ (routed)", "ESM++ (oracle routing)"]
    pts = np.arange(8.0).reshape(4, 2)
    fig = viz.embedding_figure(pts, ["a", "a", "b", "c"], np.zeros((3, 2)), TASKS, TASKS)
    assert [t.name for t in fig.data[:3]] == ["a", "b", "c"]
    assert len(fig.data[0].x) == 2
    assert sum(1 for t in fig.data if t.marker.symbol == "star") == 3
    assert "principal component 1" in fig.layout.xaxis.title.text and fig.layout.yaxis.title.text   # axis labels
    fig = viz.embedding_figure(pts, ["a", "a", "b", "c"], tasks=TASKS, method="umap")
    assert fig.layout.xaxis.title.text.startswith("UMAP 1") and fig.layout.yaxis.title.text == "UMAP 2"


@pytest.mark.parametrize("key,short", [("visual.transformer.resblocks.3.mlp.c_fc.weight", "3 · mlp.c_fc"),
                                       ("visual.transformer.resblocks.0.attn.in_proj_weight", "0 · attn.in_proj"),
                                       ("visual.proj", "proj")])
def test_short_key(key, short):
    assert viz.short_key(key) == short
