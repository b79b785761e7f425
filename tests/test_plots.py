"""ui.plots: every figure builds from realistic input, keeps the style rules, and survives empty
input. Figures are also written to HTML (plotly.js inlined) to check that they serialise."""
from __future__ import annotations

import importlib.util
import json
import re

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from ui import plots as P

CIFAR = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _history(epochs=8, splits=("train", "val")):
    rows = []
    for e in range(1, epochs + 1):
        for s in splits:
            gap = 0.15 if s == "val" else 0.0
            rows.append((e, s, 2.0 / e + gap, min(0.95, 0.3 + 0.08 * e) - gap / 3))
    return pd.DataFrame(rows, columns=["epoch", "split", "loss", "accuracy"])


def _steps(n, steps_per_epoch=391, seed=0):
    rng = np.random.default_rng(seed)
    step = np.arange(1, n + 1)
    return pd.DataFrame({"step": step, "epoch_float": step / steps_per_epoch,
                         "loss": 2.3 * np.exp(-step / 3000) + 0.3 * rng.random(n)})


def _check_style(fig: go.Figure):
    layout = fig.layout
    assert layout.template.layout.paper_bgcolor is not None          # a template is applied
    assert layout.font.size >= 14
    assert layout.title.text
    assert layout.hoverlabel.font.size >= 14
    text = fig.to_json()
    for bad in ("mapbox", "googleapis", "cdn."):
        assert bad not in text
    for tr in fig.data:
        if getattr(tr, "textfont", None) is not None and tr.textfont.size is not None:
            assert tr.textfont.size >= 14


def _plotly_white_applied(fig):
    import plotly.io as pio
    return fig.layout.template == pio.templates["plotly_white"]


def _is_empty_message(fig, words="No data yet"):
    return (len(fig.data) == 0 and len(fig.layout.annotations) == 1
            and words in fig.layout.annotations[0].text)


# --------------------------------------------------------------------------- training curves --
def test_training_curves_two_panels_same_colour_per_split():
    fig = P.training_curves(_history())
    _check_style(fig)
    assert _plotly_white_applied(fig)
    assert all(isinstance(t, go.Scatter) for t in fig.data)
    assert len(fig.data) == 4
    by_split = {}
    for t in fig.data:
        by_split.setdefault(t.name, []).append(t)
    assert set(by_split) == {"train", "val"}
    for traces in by_split.values():
        assert {t.xaxis for t in traces} == {"x", "x2"}                 # one per panel
        assert len({t.line.color for t in traces}) == 1                  # same colour in both
        assert sum(bool(t.showlegend) for t in traces) == 1              # one legend entry
    assert by_split["train"][0].line.color != by_split["val"][0].line.color
    assert fig.layout.yaxis.title.text == "loss" and fig.layout.yaxis2.title.text == "accuracy"
    assert fig.layout.xaxis.title.text == "epoch"
    assert "%" in fig.layout.yaxis2.tickformat
    assert all(t.hovertemplate for t in fig.data)


def test_training_curves_wide_format_percent_and_step_axis():
    wide = pd.DataFrame({"step": [100, 200, 300], "train_loss": [2.0, 1.5, 1.2],
                         "val_loss": [2.1, 1.7, np.nan], "train_acc": [30.0, 45.0, 55.0],
                         "val_accuracy": [28.0, 40.0, np.nan]})
    fig = P.training_curves(wide, x="step")
    assert fig.layout.xaxis.title.text == "step"
    acc = [t for t in fig.data if t.xaxis == "x2"]
    assert max(max(t.y) for t in acc) <= 1.0                              # percent → fraction
    val_loss = next(t for t in fig.data if t.name == "val" and t.xaxis == "x")
    assert len(val_loss.x) == 2                                           # NaN row dropped


@pytest.mark.parametrize("empty", [None, pd.DataFrame(), pd.DataFrame(columns=["epoch", "split", "loss", "accuracy"])])
def test_training_curves_empty(empty):
    fig = P.training_curves(empty)
    assert _is_empty_message(fig)
    assert fig.layout.template is not None


# --------------------------------------------------------------------------- downsampling -----
def test_bucket_means_limits_points_and_preserves_mean():
    df = _steps(123_457)
    out = P.bucket_means(df[["epoch_float", "loss"]])
    assert len(out) <= P.MAX_POINTS
    assert out["n"].sum() == len(df)
    weighted = (out["loss"] * out["n"]).sum() / out["n"].sum()
    assert weighted == pytest.approx(df["loss"].mean(), rel=1e-12)
    assert out["loss"].mean() == pytest.approx(df["loss"].mean(), rel=1e-3)
    assert np.all(np.diff(out["epoch_float"]) > 0)                        # order kept
    # first bucket is the mean of the first ceil(n/1000) rows
    size = int(np.ceil(len(df) / P.MAX_POINTS))
    assert out["loss"].iloc[0] == pytest.approx(df["loss"].iloc[:size].mean())
    # short frames are unchanged
    small = P.bucket_means(df.iloc[:50][["epoch_float", "loss"]])
    np.testing.assert_array_equal(small["loss"], df["loss"].iloc[:50])


def test_bucket_means_ignores_nan():
    df = pd.DataFrame({"x": np.arange(4000.0), "y": np.r_[np.full(4, np.nan), np.ones(3996)]})
    out = P.bucket_means(df, max_points=1000)
    assert len(out) == 1000 and np.isnan(out["y"].iloc[0]) and out["y"].iloc[1:].eq(1).all()


def test_live_curves_downsamples_and_shares_colours():
    steps = _steps(50_000)
    fig = P.live_curves(steps, _history(5))
    _check_style(fig)
    assert all(len(t.x) <= P.MAX_POINTS for t in fig.data)
    step_trace = fig.data[0]
    assert "mean of" in step_trace.name
    assert len(step_trace.x) <= 1000
    # step curve mean equals the raw mean within bucket rounding
    assert np.mean(step_trace.y) == pytest.approx(steps["loss"].mean(), rel=1e-3)
    assert step_trace.x[-1] == pytest.approx(steps["epoch_float"].iloc[-500:].mean(), rel=0.01)
    per_epoch = [t for t in fig.data if t.legendgroup in ("train", "val")]
    for split in ("train", "val"):
        colors = {t.line.color for t in per_epoch if t.legendgroup == split}
        panels = {t.xaxis for t in per_epoch if t.legendgroup == split}
        assert len(colors) == 1 and panels == {"x", "x2"}
    assert fig.layout.xaxis.title.text == "epoch"


def test_live_curves_partial_and_empty_inputs():
    assert _is_empty_message(P.live_curves(None, None))
    assert _is_empty_message(P.live_curves(pd.DataFrame(), pd.DataFrame()))
    only_steps = P.live_curves(_steps(30), None)                          # first epoch running
    assert len(only_steps.data) == 1 and only_steps.data[0].name == "train (per step)"
    only_epochs = P.live_curves(None, _history(2))
    assert len(only_epochs.data) == 4
    # step frame with an 'epoch' column instead of 'epoch_float'
    renamed = _steps(20).rename(columns={"epoch_float": "epoch"})
    assert len(P.live_curves(renamed, None).data) == 1


def test_live_curves_wide_epochs_with_missing_val():
    """The dashboard's form: wide per-epoch rows, val columns None while no val split exists."""
    steps = pd.DataFrame({"step": range(1, 25), "epoch": [s / 10 for s in range(1, 25)],
                          "loss": [1 / s for s in range(1, 25)]})
    epochs = pd.DataFrame([{"epoch": e, "train_loss": 1 / e, "train_accuracy": 0.5,
                            "val_loss": 0.9 if e == 2 else None, "val_accuracy": None} for e in (1, 2)])
    fig = P.live_curves(steps, epochs)
    names = [(t.name, t.xaxis) for t in fig.data]
    assert ("val (per epoch)", "x") in names and ("val (per epoch)", "x2") not in names
    assert len(next(t for t in fig.data if t.name == "val (per epoch)").x) == 1


def test_live_curves_thins_long_runs():
    """A long run's page stays light: per-step curves are cut to at most MAX_POINTS bucket means,
    so the figure the browser gets does not grow with the run (its build time is printed, not judged)."""
    import time
    steps, hist = _steps(200_000), _history(50)
    P.live_curves(steps, hist)                                            # warm up imports
    t0 = time.perf_counter()
    fig = P.live_curves(steps, hist)
    size = len(fig.to_json())
    print(f"live_curves on 200,000 steps: {time.perf_counter() - t0:.3f} s, {size:,} bytes of JSON")
    step_traces = [t for t in fig.data if t.legendgroup == "steps"]
    assert step_traces and all(len(t.x) <= P.MAX_POINTS for t in step_traces)
    assert step_traces[0].name.startswith("train (mean of ")
    assert all(len(t.x) <= 50 for t in fig.data if t.legendgroup != "steps")   # one point per epoch
    assert size < 500_000


# --------------------------------------------------------------------------- comparing runs ---
def test_run_colors_consistent():
    labels = [f"run {i}" for i in range(9)]
    c1, c2 = P.run_colors(labels), P.run_colors(labels)
    assert c1 == c2 and list(c1) == labels
    assert len(set(list(c1.values())[:7])) == 7                           # distinct up to 7
    s = P.run_symbols(labels)
    assert (c1["run 0"], s["run 0"]) != (c1["run 7"], s["run 7"])         # repeat colour, new symbol
    assert P.run_colors(["b", "a"])["b"] == P.run_colors(["b", "x", "y"])["b"]


def test_compare_curves_one_colour_per_run():
    runs = {"resnet18 lr=0.1": _history(6), "tutorial net": _history(4), "vgg11": _history(3)}
    colors = P.run_colors(list(runs))
    fig = P.compare_curves(runs, "loss")
    _check_style(fig)
    assert [t.name for t in fig.data] == list(runs)
    assert [t.line.color for t in fig.data] == [colors[r] for r in runs]
    acc = P.compare_curves(runs, "accuracy", splits=("train", "val"))
    assert len(acc.data) == 6
    assert {t.line.dash for t in acc.data} == {"dot", "solid"}
    assert "%" in acc.layout.yaxis.tickformat


def test_compare_loss_accuracy_same_colour_in_both_panels():
    runs = {"a": _history(5), "b": _history(5), "c (no val)": _history(5, splits=("train",))}
    fig = P.compare_loss_accuracy(runs)
    _check_style(fig)
    colors = P.run_colors(list(runs))
    assert len(fig.data) == 4                                              # run c has no val split
    for run in ("a", "b"):
        traces = [t for t in fig.data if t.name == run]
        assert {t.xaxis for t in traces} == {"x", "x2"}
        assert {t.line.color for t in traces} == {colors[run]}
        assert sum(bool(t.showlegend) for t in traces) == 1


def test_compare_empty():
    assert _is_empty_message(P.compare_curves({}, "loss"), "No runs")
    assert _is_empty_message(P.compare_loss_accuracy({}), "No runs")
    assert len(P.compare_curves({"a": pd.DataFrame()}, "loss").data) == 0


# --------------------------------------------------------------------------- confusion --------
def _cm(k, seed=0):
    rng = np.random.default_rng(seed)
    cm = rng.integers(0, 5, size=(k, k))
    cm[np.diag_indices(k)] += 60
    return cm


def test_confusion_heatmap_counts():
    cm = _cm(10)
    fig = P.confusion_heatmap(cm, CIFAR, normalize=False, title="Confusion matrix (test)")
    _check_style(fig)
    (hm,) = fig.data
    assert isinstance(hm, go.Heatmap)
    assert list(fig.layout.xaxis.categoryarray) == CIFAR
    assert list(fig.layout.yaxis.categoryarray) == CIFAR
    assert fig.layout.xaxis.type == fig.layout.yaxis.type == "category"
    assert fig.layout.yaxis.autorange == "reversed"                        # row 0 on top
    assert fig.layout.yaxis.scaleanchor == "x"                             # square cells
    assert fig.layout.xaxis.title.text == "predicted class"
    assert fig.layout.yaxis.title.text == "true class"
    assert hm.texttemplate == "%{text}"
    assert hm.text[3][5] == str(cm[3, 5])
    np.testing.assert_array_equal(np.asarray(hm.z), cm)
    assert "→" in hm.hovertemplate and "true" in hm.hovertemplate
    assert hm.showscale is not False and hm.colorbar.title.text == "count"


def test_confusion_heatmap_normalized_and_empty_rows():
    cm = np.array([[8, 2, 0], [0, 0, 0], [1, 1, 2]])                       # class 1 has no samples
    fig = P.confusion_heatmap(cm, ["chat", "chien", "oiseau"], normalize=True)
    (hm,) = fig.data
    z = np.asarray(hm.z, dtype=float)
    np.testing.assert_allclose(z, [[.8, .2, 0], [0, 0, 0], [.25, .25, .5]])
    assert not np.isnan(z).any()
    assert hm.text[0][0] == "80.0%" and hm.text[2][2] == "50.0%"           # 1 decimal up to 10
    assert hm.zmin == 0 and hm.zmax == 1
    custom = np.asarray(hm.customdata, dtype=float)
    assert custom[0, 1, 0] == 2 and custom[0, 1, 1] == pytest.approx(20.0)  # count and percent


def test_confusion_heatmap_ten_classes_whole_percents():
    """At 10 classes "16.0%" ran into the next cell: whole percents with the sign."""
    (hm,) = P.confusion_heatmap(_cm(10), CIFAR, normalize=True).data
    assert all(re.fullmatch(r"\d{1,3}%", t) for row in hm.text for t in row)


def test_confusion_heatmap_compact_for_side_by_side():
    cm = np.array([[8, 2, 0], [0, 0, 0], [1, 1, 2]])
    (hm,) = P.confusion_heatmap(cm, ["a", "b", "c"], normalize=True, compact=True).data
    assert [list(r) for r in hm.text] == [["80", "20", ""], ["", "", ""], ["25", "25", "50"]]
    (hm,) = P.confusion_heatmap(cm, ["a", "b", "c"], normalize=False, compact=True).data
    assert [list(r) for r in hm.text] == [["8", "2", ""], ["", "", ""], ["1", "1", "2"]]
    np.testing.assert_array_equal(np.asarray(hm.z), cm)                     # colours unchanged


def test_compare_legend_below_and_whole_epoch_ticks():
    fig = P.compare_loss_accuracy({"a": _history(3), "b": _history(3)}, splits=("train", "val"))
    assert fig.layout.legend.y < 0 and fig.layout.legend.yanchor == "top"   # not over the title
    assert fig.layout.xaxis.dtick == 1 and fig.layout.xaxis2.dtick == 1


def test_confusion_heatmap_cell_text_rules_and_non_ascii():
    names = ["猫", "Hund", "oiseau d'été", "Ψάρι", "лиса", "0", "1", "2", "3", "4", "5", "6"]
    fig = P.confusion_heatmap(_cm(12), names, normalize=True)
    assert list(fig.layout.xaxis.categoryarray) == names                   # "0".."6" stay labels
    assert fig.data[0].text[0][0].isdigit()                                # 0 decimals, no "%"
    fig.to_json()                                                          # unicode serialises
    big = [f"class {i}" for i in range(25)]
    fig = P.confusion_heatmap(_cm(25), big, normalize=False)
    assert fig.data[0].text is None and fig.data[0].texttemplate is None   # K > 20: no cell text
    assert list(fig.layout.yaxis.categoryarray) == big


def test_confusion_heatmap_empty_and_mismatch():
    assert _is_empty_message(P.confusion_heatmap([], []), "No evaluation")
    with pytest.raises(ValueError, match="does not match"):
        P.confusion_heatmap(_cm(3), ["a", "b"])


# --------------------------------------------------------------------------- data, predictions -
def test_class_distribution_single_and_split_table():
    per_class = pd.DataFrame({"class": CIFAR, "images": [500 + i for i in range(10)]})
    fig = P.class_distribution(per_class)
    _check_style(fig)
    assert len(fig.data) == 1 and isinstance(fig.data[0], go.Bar)
    assert list(fig.layout.xaxis.categoryarray) == CIFAR
    assert list(fig.data[0].y) == list(per_class["images"])
    split = pd.DataFrame({"class": CIFAR, "train": [400] * 10, "val": [50] * 10, "test": [50] * 10,
                          "total": [500] * 10})
    fig = P.class_distribution(split, title="Split per class")
    assert [t.name for t in fig.data] == ["train", "val", "test"]         # total ignored
    assert fig.layout.barmode == "stack"
    assert [t.marker.color for t in fig.data] == [P.SPLIT_COLORS[s] for s in ("train", "val", "test")]
    assert _is_empty_message(P.class_distribution(pd.DataFrame()), "No dataset")


def test_topk_bar_largest_on_top():
    probs = {"cat": 0.1, "dog": 0.7, "frog": 0.05, "bird": 0.15}
    fig = P.topk_bar(probs)
    _check_style(fig)
    (bar,) = fig.data
    assert bar.orientation == "h"
    assert list(bar.y) == ["dog", "bird", "cat", "frog"]
    assert fig.layout.yaxis.autorange == "reversed"                        # first = top
    assert list(fig.layout.yaxis.categoryarray) == ["dog", "bird", "cat", "frog"]
    assert bar.text[0] == "70.0%"
    assert list(P.topk_bar(probs, k=2).data[0].y) == ["dog", "bird"]
    assert _is_empty_message(P.topk_bar({}), "No prediction")


# --------------------------------------------------------------------------- memory -----------
MIB = 2**20


def test_memory_breakdown_training_and_inference():
    comps = {"weights": 42.7 * MIB, "gradients": 42.7 * MIB, "optimizer state": 42.7 * MIB,
             "activations": 310 * MIB, "input": 1.5 * MIB}
    fig = P.memory_breakdown(comps, title="ResNet-18, batch 128")
    _check_style(fig)
    assert [t.name for t in fig.data] == list(comps)
    assert all(isinstance(t, go.Bar) and t.orientation == "h" for t in fig.data)
    assert fig.layout.barmode == "stack"
    assert "MiB" in fig.layout.xaxis.title.text
    train = {t.name: t.x[0] for t in fig.data}
    infer = {t.name: t.x[1] for t in fig.data}
    assert train["activations"] == pytest.approx(310)
    assert infer["gradients"] == 0 and infer["weights"] == pytest.approx(42.7)
    assert len({t.marker.color for t in fig.data}) == 5
    texts = [a.text for a in fig.layout.annotations]
    assert any("440" in t and "MiB" in t for t in texts)                    # training total
    assert fig.layout.legend.y < 0 and fig.layout.legend.yanchor == "top"   # under the bars, not on the title
    # explicit inference breakdown, GiB scale, odd names keep keyword colours
    fig = P.memory_breakdown({"Parameters": 2 * 2**30, "Adam state": 4 * 2**30, "Saved tensors": 3 * 2**30},
                             inference={"Parameters": 2 * 2**30, "activations (peak)": 0.5 * 2**30})
    assert "GiB" in fig.layout.xaxis.title.text
    colors = {t.name: t.marker.color for t in fig.data}
    assert colors["Parameters"] == P.MEMORY_COMPONENTS["weights"][1]
    assert colors["Saved tensors"] == colors["activations (peak)"] == P.MEMORY_COMPONENTS["activations"][1]
    assert _is_empty_message(P.memory_breakdown({}), "No memory")


def test_memory_per_layer_top_n_keeps_execution_order():
    rng = np.random.default_rng(1)
    layers = [f"layer{i}.conv" for i in range(120)]
    sizes = rng.integers(1, 10_000_000, size=120)
    df = pd.DataFrame({"layer": layers, "type": "Conv2d", "saved_bytes": sizes})
    fig = P.memory_per_layer(df)
    _check_style(fig)
    (bar,) = fig.data
    assert len(bar.y) == 40
    kept = sorted(np.argsort(-sizes, kind="stable")[:40])
    assert list(bar.y) == [layers[i] for i in kept]                         # execution order
    assert fig.layout.yaxis.autorange == "reversed"
    assert "largest 40 of 120" in fig.layout.title.text
    small = P.memory_per_layer(df.iloc[:5])
    assert list(small.data[0].y) == layers[:5] and "largest" not in small.layout.title.text
    assert _is_empty_message(P.memory_per_layer(pd.DataFrame(columns=["layer", "saved_bytes"])), "No layers")


def test_memory_figures_write_sizes_as_the_rest_of_the_lab():
    """One size format (core.storage.format_size): segment labels, totals and hover texts."""
    fig = P.memory_breakdown({"weights": 512, "activations": 3 * MIB})
    assert {t.name: t.text[0] for t in fig.data} == {"weights": "512 B", "activations": "3.0 MiB"}
    assert "<b>3.0 MiB</b>" in {a.text for a in fig.layout.annotations}
    layers = pd.DataFrame({"layer": ["a", "b"], "saved_bytes": [527.79 * MIB, 1.5 * 2**30]})
    assert [row[0] for row in P.memory_per_layer(layers).data[0].customdata] == ["528 MiB", "1.5 GiB"]


# --------------------------------------------------------------------------- rendering --------
def _all_figures():
    return {
        "training_curves": P.training_curves(_history()),
        "live_curves": P.live_curves(_steps(20_000), _history(50)),
        "compare": P.compare_loss_accuracy({f"run {i}": _history(6 + i) for i in range(3)}),
        "confusion_counts": P.confusion_heatmap(_cm(10), CIFAR),
        "confusion_norm": P.confusion_heatmap(_cm(10), CIFAR, normalize=True),
        "class_distribution": P.class_distribution(pd.DataFrame(
            {"class": CIFAR, "train": [400] * 10, "val": [50] * 10, "test": [50] * 10})),
        "memory": P.memory_breakdown({"weights": 42.7 * MIB, "gradients": 42.7 * MIB,
                                      "optimizer state": 42.7 * MIB, "activations": 310 * MIB,
                                      "input": 1.5 * MIB}),
        "memory_per_layer": P.memory_per_layer(pd.DataFrame(
            {"layer": [f"layer{i}" for i in range(60)], "saved_bytes": np.arange(60) * 1e5})),
        "topk": P.topk_bar({"dog": 0.7, "cat": 0.2, "bird": 0.1}),
        "empty": P.training_curves(None),
    }


def test_figures_serialise_and_render(tmp_path):
    """JSON round trip for all; PNG when kaleido happens to be installed, else self-contained HTML
    (plotly.js inlined, nothing loaded from a CDN)."""
    have_kaleido = importlib.util.find_spec("kaleido") is not None
    for name, fig in _all_figures().items():
        again = go.Figure(json.loads(fig.to_json()))
        assert len(again.data) == len(fig.data)
        if have_kaleido:
            fig.write_image(tmp_path / f"{name}.png")
        else:
            path = tmp_path / f"{name}.html"
            fig.write_html(path, include_plotlyjs=True, full_html=True)
            html = path.read_text(encoding="utf-8")
            # plotly.js is inlined; the library's own default URLs (topojson for maps) are unused
            assert not re.search(r"<(script|link)[^>]+(src|href)=[\"']?https?:", html)
            assert "http" not in fig.to_json()
