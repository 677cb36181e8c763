"""Issue 23 items 2–5 (teaching and usability, round 3), below the browser: the figures' contents, the Wilson
interval, the user's own input on the routing map, the α curve that follows its parameter set, and the controls
set back after a refused merge."""
import math

import numpy as np
import pytest
import torch

from esm_core.evaluation.esmpp import wilson_interval
from esm_core.studio import viz


def _wilson(k, n, z=1.96):
    """The textbook formula, written out independently of the code under test."""
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return centre - half, centre + half


# ---------------------------------------------------------------- the Wilson interval

@pytest.mark.parametrize("k,n,expected", [(3, 10, (0.10779, 0.60323)), (18, 36, (0.34474, 0.65526)),
                                          (50, 100, (0.40383, 0.59617))])
def test_wilson_interval_known_values(k, n, expected):
    lo, hi = wilson_interval(k, n)
    assert (lo, hi) == pytest.approx(expected, abs=1e-5)
    assert (lo, hi) == pytest.approx(_wilson(k, n), abs=1e-12)


def test_wilson_interval_edges_and_refusals():
    lo, hi = wilson_interval(0, 36)
    assert lo == 0.0 and hi == pytest.approx(_wilson(0, 36)[1]) and hi > 0.05     # not empty at 0 of 36
    lo, hi = wilson_interval(36, 36)
    assert hi == 1.0 and lo == pytest.approx(_wilson(36, 36)[0]) and lo < 0.95
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    with pytest.raises(ValueError, match="0 <= successes <= n, got 5 of 4"):
        wilson_interval(5, 4)
    with pytest.raises(ValueError, match="got -1 of 4"):
        wilson_interval(-1, 4)


# ---------------------------------------------------------------- the routing figures

def test_routing_accuracy_figure_chance_line_interval_and_n():
    hits, n, T = [12, 30, 36], 36, 6
    acc = [k / n for k in hits]
    ci = [wilson_interval(k, n) for k in hits]
    fig = viz.routing_accuracy_figure(["L0", "L1", "L2"], acc, n=n, chance=1 / T,
                                      interval=([lo for lo, _ in ci], [hi for _, hi in ci]))
    bar = fig.data[0]
    np.testing.assert_allclose(bar.y, [100 * a for a in acc])
    # the error bars reach the Wilson bounds exactly (asymmetric: above up to hi, below down to lo)
    np.testing.assert_allclose(np.asarray(bar.y) + np.asarray(bar.error_y.array), [100 * _wilson(k, n)[1] for k in hits])
    np.testing.assert_allclose(np.asarray(bar.y) - np.asarray(bar.error_y.arrayminus),
                               [100 * max(0.0, _wilson(k, n)[0]) for k in hits])
    assert bar.error_y.symmetric is False
    # a dashed horizontal line across the plot at 1/T
    lines = [s for s in fig.layout.shapes if s.type == "line"]
    assert len(lines) == 1 and lines[0].y0 == lines[0].y1 == pytest.approx(100 / T) and lines[0].line.dash == "dash"
    assert lines[0].xref == "x domain" and (lines[0].x0, lines[0].x1) == (0, 1)
    title = fig.layout.title.text
    assert "n = 36 samples per layer" in title and "95 % Wilson interval" in title and "1/6 = 16.7 %" in title
    assert bar.hovertext[0] == "L0: 33 % (20–50 %, 95 %), n = 36"        # 12 of 36: Wilson 20.2–49.8 %
    # 8 tasks: 12.5 %
    fig8 = viz.routing_accuracy_figure(["L0"], [0.5], n=48, chance=1 / 8)
    assert fig8.layout.shapes[0].y0 == pytest.approx(12.5) and "1/8 = 12.5 %" in fig8.layout.title.text


def test_oracle_figure_intervals_and_n():
    tasks = ["a", "b"]
    n = {"a": 100, "b": 40}
    routed, oracle = {"a": 0.61, "b": 0.5}, {"a": 0.9, "b": 0.75}
    iv = {"ESM++ (routed)": ([wilson_interval(61, 100)[0], wilson_interval(20, 40)[0]],
                             [wilson_interval(61, 100)[1], wilson_interval(20, 40)[1]])}
    fig = viz.oracle_figure(tasks, routed, oracle, n=n, intervals=iv)
    assert [t.name for t in fig.data] == ["ESM++ (routed)", "ESM++ (oracle routing)"]
    r = fig.data[0]
    np.testing.assert_allclose(np.asarray(r.y) + np.asarray(r.error_y.array),
                               [100 * _wilson(61, 100)[1], 100 * _wilson(20, 40)[1]])
    assert fig.data[1].error_y.array is None                        # no interval given for it: none drawn
    assert "n = 40–100 test samples per task" in fig.layout.title.text and "n = 40" in r.hovertext[1]


def test_embedding_figure_draws_the_own_input_apart():
    pts = np.arange(10.0).reshape(5, 2)
    fig = viz.embedding_figure(pts, ["a", "a", "b", "b", "your image"], np.zeros((2, 2)), ["a", "b"], ["a", "b"],
                               own={"point": (7.5, -1.0), "label": "your image", "text": "your image: b expert"})
    mine = [t for t in fig.data if t.name == "your image"]
    assert len(mine) == 1 and list(mine[0].x) == [7.5] and list(mine[0].y) == [-1.0]
    assert mine[0].marker.symbol == "x" and mine[0].marker.size > max(t.marker.size for t in fig.data[:2])
    assert list(mine[0].text) == ["your image"]
    # the task traces hold the task samples only
    assert [len(t.x) for t in fig.data if t.name in ("a", "b")] == [2, 2]


def test_accuracy_figure_labels_clear_of_error_bars_and_title_inside():
    tasks = ["a", "b"]
    summary = {"tasks": {"a": {"abs": 0.5, "norm": 0.625}, "b": {"abs": 0.9, "norm": 1.0}},
               "mean_abs": 0.7, "mean_norm": 0.8125}
    refs = {"zeroshot": {"a": 0.4, "b": 0.6}, "finetuned": {"a": 0.8, "b": 0.9}}
    ci = {"n": {"a": 100, "b": 100}, "tasks": {"a": 0.09, "b": 0.06}, "mean_abs": 0.05}
    fig = viz.accuracy_figure(summary, refs, title="line one<br><sub>line two</sub>", interval=ci)
    merged = next(t for t in fig.data if t.name == "merged")
    assert merged.text is None                                       # no label inside the bar, on its error bar
    labels = next(t for t in fig.data if t.name == "merged (value)")
    np.testing.assert_allclose(labels.y, [50 + 9, 90 + 6, 70 + 5])  # just above each error bar
    assert list(labels.text) == ["50.0", "90.0", "70.0"] and labels.offsetgroup == merged.offsetgroup == "merged"
    assert fig.layout.scattermode == "group"
    for t in fig.data:                                               # the other bars: upright, in the bar's column
        if t.type == "bar" and t.name != "merged":
            assert t.textposition == "auto" and t.textangle == -90 and t.insidetextanchor == "end"
    title = fig.layout.title
    assert title.yref == "container" and title.y == 1 and title.yanchor == "top" and title.pad.t >= 20


# ---------------------------------------------------------------- the Merge view's α curve and controls

def test_curve_follows_alpha_and_clears_for_other_parameters():
    pytest.importorskip("gradio")
    from esm_core.app import merge as M
    params = M.METHODS["esm"].resolve({"alpha": 0.1})
    data = ("esm", 0.1, [(0.0, 0.5), (0.1, 0.8), (0.2, 0.7)], "ESM curve", M.param_key("esm", params),
            M.param_text("esm", params))
    assert data[5] == "default parameters"
    # α moved: the same curve, its "current α" marker at the new α
    fig, state, btn = M.curve_follow(data, "esm", {**params, "alpha": 0.3})
    assert [a.text for a in fig.layout.annotations] == ["best α = 0.10", "current α = 0.30"]
    assert state == {"__type__": "update"} and btn == {"__type__": "update"}
    # another parameter moved: the curve is cleared, saying what it was drawn for and what to press
    fig, state, btn = M.curve_follow(data, "esm", {**params, "rank": 4})
    note = fig.layout.annotations[0].text
    assert "was drawn for ESM with default parameters" in note and "rank=4" in note and "α curve on validation" in note
    assert state is None and btn["interactive"] is False and btn["value"] == "use the best α"
    # another method: cleared too
    _, state, _ = M.curve_follow(data, "ta", M.METHODS["ta"].resolve({}))
    assert state is None
    assert M.curve_follow(None, "esm", params) == ({"__type__": "update"},) * 3


def test_controls_back_to_the_merge_on_screen():
    pytest.importorskip("gradio")
    from esm_core.app import merge as M
    names = [p.name for p in M.METHODS["esm"].params]
    slices = {"ta": (0, 1), "esm": (1, 1 + len(names))}
    cur = {"method": "esm", "params": M.METHODS["esm"].resolve({"alpha": 0.1, "rank": 16})}
    shown = [cur["params"][n] if n != "esd_types" else ["auto"] for n in names]
    values = ["ta-alpha", *shown]
    values[1 + names.index("alpha")] = 0.3                   # the controls moved on, the merge was refused
    values[1 + names.index("rank_fraction")] = 0.25
    out = M.controls_back("esm", tuple(values), cur, slices)
    changed = {names[i - 1]: u["value"] for i, u in enumerate(out) if "value" in u}
    assert changed == {"alpha": 0.1, "rank_fraction": 0.0}   # back to the merge on screen; the rest left alone
    # when the merge on screen is another method's: the method's defaults
    out = M.controls_back("esm", tuple(values), {"method": "ta", "params": {}}, slices)
    changed = {names[i - 1]: u["value"] for i, u in enumerate(out) if "value" in u}
    assert changed == {"alpha": M.METHODS["esm"].resolve({})["alpha"], "rank": 0, "rank_fraction": 0.0}


def test_column_widths_fit_the_longest_word():
    pytest.importorskip("gradio")
    import pandas as pd
    from esm_core.app import merge as M
    df = pd.DataFrame({"#": [1], "changed parameters": ["rank=4, p_task=3"], "clipart-objects %": [12.5]})
    w = [int(x[:-2]) for x in M.column_widths(df)]
    assert w[0] == int(1 * 8.5 + 30) and w[1] == int(len("parameters") * 8.5 + 30)
    assert w[2] == int(len("clipart-objects") * 8.5 + 30)


# ---------------------------------------------------------------- the routing run: n, intervals, your input

def test_run_routing_counts_intervals_and_own_input_on_the_fitted_map(sess, pool):
    from esm_core import studio as S
    from esm_core.esmpp import routing_embedding
    S.merge(sess, "esm", {"alpha": 0.8})
    plain = S.run_routing(sess, rank=4, per_task=3)
    img = (np.random.default_rng(0).random((20, 20, 3)) * 255).astype(np.uint8)
    run = S.run_routing(sess, rank=4, per_task=3, image=img)
    T, N = len(run["tasks"]), 3 * len(run["tasks"])
    true = np.asarray(run["true"][:-1])
    hits = (run["choices"][:-1] == true[:, None]).sum(0)
    assert run["layer_n"] == N and run["layer_hits"] == hits.tolist() and run["chance"] == 1 / T
    for (lo, hi), k in zip(run["layer_interval"], hits):
        want = _wilson(int(k), N)
        assert (lo, hi) == pytest.approx((max(0.0, want[0]), min(1.0, want[1])), abs=1e-12)
    n = run["test_n"]
    assert n == {t: 16 for t in run["tasks"]}                        # the session's live subset
    for m, key in (("route", "routed_accuracy"), ("oracle", "oracle_accuracy"), ("base", "static_accuracy")):
        for t in run["tasks"]:
            k = round(run[key][t] * n[t])
            assert run["accuracy_interval"][m][t] == pytest.approx(wilson_interval(k, n[t]))
    # the map is fitted on the samples: your image does not move them, it is placed on that map
    emb, emb0 = run["embedding"], plain["embedding"]
    np.testing.assert_allclose(emb["points"][:-1], emb0["points"], atol=1e-9)
    np.testing.assert_allclose(emb["proto_points"], emb0["proto_points"], atol=1e-9)
    assert emb["own"]["point"] == pytest.approx(tuple(emb["points"][-1])) and emb["own"]["label"] == "your image"
    # … by the same projection: the first two principal axes of the samples and prototypes
    model = sess.esmpp["model"]
    x = torch.nn.functional.normalize(_pooled(sess, model, img, pool).double(), dim=-1)
    ref = routing_embedding(x[:-1], run["layers"][-1], model.experts, tasks=run["tasks"], method="pca")
    np.testing.assert_allclose(ref["points"], emb["points"][:-1], atol=1e-9)
    z = torch.cat([x[:-1], torch.nn.functional.normalize(model.experts.prototypes[run["layers"][-1]].double(), dim=-1)])
    from esm_core.esmpp.embedding import pca_fit
    mean, basis = pca_fit(z)
    assert emb["own"]["point"] == pytest.approx(tuple(((x[-1] - mean) @ basis).tolist()))
    # its predicted class, with the chosen task's head
    task, cls = run["predicted"]
    assert f"went to the **{task}** expert" in run["summary_md"] and f"predicts the class **{cls}**" in run["summary_md"]
    assert cls in pool.class_names[task]
    assert "chance: 1/3 = 33.3 %" in run["summary_md"] and f"n = {sum(n.values())} in all" in run["summary_md"]
    from esm_core.app.routing import figures
    figs = figures(run, 0)
    assert [t.name for t in figs["map"].data if t.name == "your image"] == ["your image"]
    assert figs["acc"].layout.shapes[0].y0 == pytest.approx(100 / 3)


def _pooled(sess, model, img, pool):
    """The pooled inputs of the deepest routed layer for the run's samples and the image, recomputed."""
    from esm_core.studio.routing import _image_to_input
    xs = [pool.samples(t, 3)[0] for t in pool.task_names] + [_image_to_input(pool, img)]
    with torch.inference_mode(), model.logging(keep_inputs=True) as log:
        for x in xs:
            model(x)
    return log.pooled[-1]
