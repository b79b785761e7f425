"""Plotly figures for the dashboard: pure functions from DataFrames, arrays and dicts to
``go.Figure`` (shown with ``gr.Plot``). No Gradio, no torch, no I/O.

Readability rules shared by every figure (they are shown on a projector as well as on laptops):

* ``template="plotly_white"``, base font 14 px (titles 18 px, hover labels 14 px), and a system
  font stack only: nothing is fetched from a CDN, no map tiles, no MathJax.
* Colours come from the Okabe–Ito palette (Okabe & Ito 2008, distinguishable with the common
  colour-vision deficiencies) and a single-hue sequential scale (``Blues``) for the heat map.
  A split (train / val / test) and a memory component keep the same colour in every figure.
* Every trace has a hover template written for people, and every axis a title.
* Empty input never raises: the figure says "No data yet — start training" (or a given message).

Live plots must stay light: the Gradio notes measured that plots with thousands of points lag by
seconds, so per-step curves are reduced to at most ``MAX_POINTS`` bucket means (``bucket_means``).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from core.storage import format_size   # the one size format of the lab

# ---------------------------------------------------------------------------------------------
# Style constants (one source for every figure)
# ---------------------------------------------------------------------------------------------
TEMPLATE = "plotly_white"
FONT_SIZE = 14            # px; nothing in a figure is written smaller
TITLE_SIZE = 18
# System fonts only: a web font would be fetched from a CDN, which the offline class server lacks.
FONT_FAMILY = ("system-ui, -apple-system, 'Segoe UI', Roboto, 'Noto Sans', 'DejaVu Sans', "
               "Arial, sans-serif")
NO_DATA = "No data yet — start training"
#: Most points one line may carry (the notes measured lag from ~1,000 points per update).
MAX_POINTS = 1000
#: Above this many classes the confusion matrix has no numbers in its cells.
MAX_CELL_TEXT_CLASSES = 20
#: Normalised cells: one decimal ("87.5%") up to ONE_DECIMAL_CLASSES classes, whole percents
#: ("88%") up to WHOLE_PERCENT_CLASSES, then bare numbers ("88") up to MAX_CELL_TEXT_CLASSES.
ONE_DECIMAL_CLASSES = 5
WHOLE_PERCENT_CLASSES = 10
#: Layers shown by memory_per_layer when a model has more.
TOP_LAYERS = 40
#: Lines with more points than this are drawn without markers.
MARKER_MAX_POINTS = 60

# Okabe–Ito: blue, orange, bluish green, vermillion, reddish purple, sky blue, black.
# (Its yellow, #F0E442, is left out: too pale for a line on white.)
OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000"]
RUN_PALETTE = OKABE_ITO
#: Runs beyond the palette reuse its colours with another marker symbol.
RUN_SYMBOLS = ["circle", "square", "diamond", "triangle-up", "x", "star"]
SPLIT_COLORS = {"train": "#0072B2", "val": "#D55E00", "test": "#009E73"}
SPLIT_ORDER = ["train", "val", "test"]
SPLIT_DASH = {"train": "dot", "val": "solid", "test": "dash"}
STEP_COLOR = "rgba(86, 180, 233, 0.55)"   # sky blue, lighter than the per-epoch train line
OTHER_COLOR = "#999999"
HEATMAP_SCALE = "Blues"
# Memory components: canonical key → (label, colour); names are matched by keyword.
MEMORY_COMPONENTS = {
    "weights": ("weights", "#0072B2"),
    "gradients": ("gradients", "#E69F00"),
    "optimizer": ("optimizer state", "#009E73"),
    "activations": ("activations", "#D55E00"),
    "input": ("input batch", "#CC79A7"),
}
MEMORY_KEYWORDS = [("grad", "gradients"), ("optim", "optimizer"), ("activ", "activations"),
                   ("saved", "activations"), ("input", "input"), ("batch", "input"),
                   ("weight", "weights"), ("param", "weights")]
#: What an inference pass keeps when no inference breakdown is given: weights and the input.
INFERENCE_COMPONENTS = ("weights", "input")


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------
def _style(fig: go.Figure, title: str | None, height: int | None = None,
           legend: bool = True) -> go.Figure:
    fig.update_layout(
        template=TEMPLATE,
        font=dict(family=FONT_FAMILY, size=FONT_SIZE, color="#222222"),
        title=dict(text=title or "", font=dict(size=TITLE_SIZE), x=0.01, xanchor="left"),
        hoverlabel=dict(font=dict(family=FONT_FAMILY, size=FONT_SIZE)),
        legend=dict(font=dict(size=FONT_SIZE), orientation="h", x=1, xanchor="right",
                    y=1.02, yanchor="bottom"),
        showlegend=legend,
        margin=dict(l=70, r=30, t=90 if title else 50, b=60),
    )
    if height:
        fig.update_layout(height=height)
    return fig


def empty_figure(message: str = NO_DATA, title: str | None = None) -> go.Figure:
    """A blank figure with a friendly message in the middle (no axes, no traces)."""
    fig = go.Figure()
    fig.add_annotation(text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                       font=dict(size=TITLE_SIZE, color="#555555"))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _style(fig, title, height=320, legend=False)


def _is_empty(df: Any) -> bool:
    return df is None or (isinstance(df, pd.DataFrame) and df.empty) or (
        not isinstance(df, pd.DataFrame) and len(df) == 0)


def _unique_labels(labels: Sequence[Any]) -> list[str]:
    """Category axes merge equal labels, so repeated names get " (2)", " (3)"... appended."""
    seen: dict[str, int] = {}
    out = []
    for label in map(str, labels):
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} ({seen[label]})")
    return out


def _category_axis(names: Sequence[str]) -> dict:
    # type="category": names such as "0", "1" or "2024" would otherwise become a numeric axis.
    return dict(type="category", categoryorder="array", categoryarray=list(names), automargin=True)


def _byte_unit(max_bytes: float) -> tuple[str, float]:
    """The unit an axis should use for values up to ``max_bytes``: (name, bytes per unit)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if max_bytes >= scale:
            return unit, float(scale)
    return "B", 1.0


def _pct_format(values: np.ndarray) -> str:
    """d3 tick format for fractions: one decimal when the spread is under 5 points."""
    finite = values[np.isfinite(values)] if values.size else values
    if finite.size and (finite.max() - finite.min()) < 0.05:
        return ".1%"
    return ".0%"


# ---------------------------------------------------------------------------------------------
# Downsampling
# ---------------------------------------------------------------------------------------------
def bucket_means(df: pd.DataFrame, max_points: int = MAX_POINTS) -> pd.DataFrame:
    """Reduce ``df`` to at most ``max_points`` rows by averaging consecutive buckets.

    All rows are split, in order, into buckets of ``ceil(len / max_points)`` rows (the last one
    may be shorter); every numeric column becomes its bucket mean, NaNs ignored. A column ``n``
    holds each bucket's row count, so ``(mean * n).sum() / n.sum()`` equals the mean of the input
    exactly. Frames with ``max_points`` rows or fewer come back unchanged (plus ``n`` = 1).
    Vectorised (``np.add.reduceat``): ~1 ms for 100,000 rows.
    """
    out_cols = [c for c in df.columns if pd.api.types.is_numeric_dtype(df[c])]
    n = len(df)
    if n <= max_points:
        out = df[out_cols].copy()
        out["n"] = 1
        return out.reset_index(drop=True)
    size = math.ceil(n / max_points)
    starts = np.arange(0, n, size)
    counts = np.diff(np.append(starts, n))
    data = {}
    for c in out_cols:
        v = df[c].to_numpy(dtype=np.float64)
        ok = np.isfinite(v)
        sums = np.add.reduceat(np.where(ok, v, 0.0), starts)
        k = np.add.reduceat(ok.astype(np.int64), starts)
        data[c] = np.divide(sums, k, out=np.full(len(starts), np.nan), where=k > 0)
    data["n"] = counts
    return pd.DataFrame(data)


# ---------------------------------------------------------------------------------------------
# Training curves
# ---------------------------------------------------------------------------------------------
def _long_history(history: pd.DataFrame) -> pd.DataFrame:
    """Accept the long format ``[x, split, loss, accuracy]`` or a wide one with columns such as
    ``train_loss, val_loss, train_accuracy, val_accuracy`` (also ``*_acc``); return long."""
    if "split" in history.columns:
        return history
    wide = [c for c in history.columns if "_" in str(c) and str(c).split("_", 1)[1] in
            ("loss", "accuracy", "acc")]
    if not wide:
        out = history.copy()
        out["split"] = "train"
        return out
    ids = [c for c in history.columns if c not in wide]
    frames = []
    for split in dict.fromkeys(str(c).split("_", 1)[0] for c in wide):
        part = history[ids].copy()
        part["split"] = split
        for metric in ("loss", "accuracy"):
            for name in (f"{split}_{metric}", f"{split}_acc" if metric == "accuracy" else None):
                if name in history.columns:
                    part[metric] = history[name].to_numpy()
        frames.append(part)
    return pd.concat(frames, ignore_index=True)


def _splits(df: pd.DataFrame) -> list[str]:
    present = [str(s) for s in pd.unique(df["split"])]
    return [s for s in SPLIT_ORDER if s in present] + [s for s in present if s not in SPLIT_ORDER]


def _split_color(split: str, i: int) -> str:
    return SPLIT_COLORS.get(split, OKABE_ITO[(i + 3) % len(OKABE_ITO)])


def _x_column(df: pd.DataFrame, x: str) -> str:
    if x in df.columns:
        return x
    for alt in ("epoch", "step"):
        if alt in df.columns:
            return alt
    raise ValueError(f"history has no {x!r} column; columns are {list(df.columns)}")


def _accuracy_axis(fig: go.Figure, values: np.ndarray, row: int = 1, col: int = 2) -> None:
    fig.update_yaxes(title_text="accuracy", tickformat=_pct_format(values), row=row, col=col)


def _as_fraction(acc: pd.Series) -> pd.Series:
    """Accuracy is plotted as a fraction 0..1; a column given in percent (max > 1) is divided
    by 100 (a fraction can never exceed 1, so this guess is safe)."""
    acc = pd.to_numeric(acc, errors="coerce")
    return acc / 100.0 if acc.max(skipna=True) > 1.0 else acc


def _split_points(df: pd.DataFrame, split: str, metric: str, xcol: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(x, y) of ``metric`` for ``split`` in a long history, sorted by ``xcol``, without missing
    values (accuracy as a fraction); None when the split has no value of it."""
    part = df[df["split"].astype(str) == split].sort_values(xcol)
    y = part[metric] if metric == "loss" else _as_fraction(part[metric])
    keep = y.notna().to_numpy()
    if not keep.any():
        return None
    return part[xcol].to_numpy()[keep], y.to_numpy(dtype=float)[keep]


def _add_split_traces(fig: go.Figure, df: pd.DataFrame, xcol: str, acc_values: list, *, name_suffix: str = "",
                      always_markers: bool = False, marker_size: int = 7) -> None:
    """Loss (left) and accuracy (right) traces per split of a long history, one colour per split in
    both panels; appends the plotted accuracies to ``acc_values`` (for the accuracy axis range)."""
    for i, split in enumerate(_splits(df)):
        color = _split_color(split, i)
        shown = False
        for col, metric in ((1, "loss"), (2, "accuracy")):
            points = _split_points(df, split, metric, xcol) if metric in df.columns else None
            if points is None:
                continue
            xs, ys = points
            if metric == "accuracy":
                acc_values.append(ys)
            fmt = ".4f" if metric == "loss" else ".2%"
            fig.add_trace(go.Scatter(
                x=xs, y=ys, name=f"{split}{name_suffix}", legendgroup=split, showlegend=not shown,
                mode="lines+markers" if always_markers or len(xs) <= MARKER_MAX_POINTS else "lines",
                line=dict(color=color, width=2.5), marker=dict(color=color, size=marker_size),
                hovertemplate=f"{split} · {xcol} %{{x}}<br>{metric} %{{y:{fmt}}}<extra></extra>",
            ), row=1, col=col)
            shown = True


def training_curves(history: pd.DataFrame | None, x: str = "epoch",
                    title: str = "Training curves") -> go.Figure:
    """Loss (left) and accuracy (right) per split, one colour per split in both panels.

    Args:
        history: long format, one row per (x, split) with columns ``[x, split, loss, accuracy]``
            (split "train"/"val"/"test"); a wide frame (``train_loss, val_accuracy``...) works too.
            Accuracy as a fraction 0..1 (a percent column is recognised and converted).
        x: the x column, "epoch" or "step".
    """
    if _is_empty(history):
        return empty_figure(NO_DATA, title)
    df = _long_history(history)
    xcol = _x_column(df, x)
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12)
    acc_values: list = []
    _add_split_traces(fig, df, xcol, acc_values)
    if not fig.data:
        return empty_figure(NO_DATA, title)
    fig.update_xaxes(title_text=xcol)
    fig.update_yaxes(title_text="loss", row=1, col=1)
    _accuracy_axis(fig, np.concatenate(acc_values) if acc_values else np.zeros(0))
    return _style(fig, title, height=420)


def live_curves(step_df: pd.DataFrame | None, epoch_df: pd.DataFrame | None,
                title: str = "Training progress", max_points: int = MAX_POINTS) -> go.Figure:
    """Live view: per-step train loss plus per-epoch train/val loss (left) and accuracy (right).

    Args:
        step_df: one row per optimiser step, ``[step, epoch_float, loss]`` (``epoch`` is accepted
            for ``epoch_float``); an ``accuracy`` column is drawn too when present. Longer than
            ``max_points`` → bucket means (``bucket_means``).
        epoch_df: per-epoch rows as for ``training_curves`` (``[epoch, split, loss, accuracy]``).
    The x axis is epochs on one scale for both: an epoch row at ``epoch = 3`` is the end of the
    third epoch, and a step half-way through the first epoch has ``epoch_float = 0.5``.
    """
    has_steps = not _is_empty(step_df)
    has_epochs = not _is_empty(epoch_df)
    if not has_steps and not has_epochs:
        return empty_figure(NO_DATA, title)
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12)
    acc_values = []
    if has_steps:
        xcol = "epoch_float" if "epoch_float" in step_df.columns else "epoch"
        cols = [c for c in (xcol, "loss", "accuracy") if c in step_df.columns]
        steps = bucket_means(step_df[cols], max_points)
        label = "train (per step)" if steps["n"].max() == 1 else \
            f"train (mean of {int(steps['n'].max())} steps)"
        for col, metric in ((1, "loss"), (2, "accuracy")):
            if metric not in steps.columns:
                continue
            ys = steps[metric].to_numpy() if metric == "loss" else _as_fraction(steps[metric]).to_numpy()
            if metric == "accuracy":
                acc_values.append(ys)
            fmt = ".4f" if metric == "loss" else ".2%"
            fig.add_trace(go.Scatter(
                x=steps[xcol].to_numpy(), y=ys, name=label, legendgroup="steps",
                showlegend=col == 1, mode="lines", line=dict(color=STEP_COLOR, width=1.5),
                hovertemplate=f"epoch %{{x:.2f}}<br>train {metric} %{{y:{fmt}}}<extra>step</extra>",
            ), row=1, col=col)
    if has_epochs:
        df = _long_history(epoch_df)
        ecol = _x_column(df, "epoch")
        _add_split_traces(fig, df, ecol, acc_values, name_suffix=" (per epoch)", always_markers=True,
                          marker_size=8)
    if not fig.data:
        return empty_figure(NO_DATA, title)
    fig.update_xaxes(title_text="epoch", rangemode="tozero")
    fig.update_yaxes(title_text="loss", row=1, col=1)
    _accuracy_axis(fig, np.concatenate(acc_values) if acc_values else np.zeros(0))
    # uirevision keeps the user's zoom when the figure is replaced on the next live update.
    fig.update_layout(uirevision="live")
    return _style(fig, title, height=420)


# ---------------------------------------------------------------------------------------------
# Comparing runs
# ---------------------------------------------------------------------------------------------
def run_colors(labels: Sequence[str]) -> dict[str, str]:
    """Colour of each run by its position in ``labels``: the same order gives the same colours
    in every call and in every figure. Past 7 runs the palette repeats (see ``run_symbols``)."""
    return {str(label): RUN_PALETTE[i % len(RUN_PALETTE)] for i, label in enumerate(labels)}


def run_symbols(labels: Sequence[str]) -> dict[str, str]:
    """Marker symbol of each run: runs 1–7 circles, 8–14 squares... so repeated colours differ."""
    return {str(label): RUN_SYMBOLS[(i // len(RUN_PALETTE)) % len(RUN_SYMBOLS)]
            for i, label in enumerate(labels)}


def _add_run_traces(fig: go.Figure, runs: Mapping[str, pd.DataFrame], metric: str,
                    splits: Sequence[str], x: str, row: int | None, col: int | None,
                    legend: bool) -> list[np.ndarray]:
    colors, symbols = run_colors(list(runs)), run_symbols(list(runs))
    values = []
    for label, hist in runs.items():
        label = str(label)
        if _is_empty(hist):
            continue
        df = _long_history(hist)
        if metric not in df.columns:
            continue
        xcol = _x_column(df, x)
        for split in splits:
            points = _split_points(df, split, metric, xcol)
            if points is None:
                continue
            xs, ys = points
            values.append(ys)
            fmt = ".4f" if metric == "loss" else ".2%"
            name = label if len(splits) == 1 else f"{label} · {split}"
            fig.add_trace(go.Scatter(
                x=xs, y=ys, name=name, legendgroup=name,
                showlegend=legend,
                mode="lines+markers" if len(ys) <= MARKER_MAX_POINTS else "lines",
                line=dict(color=colors[label], width=2.5, dash=SPLIT_DASH.get(split, "solid")),
                marker=dict(color=colors[label], size=7, symbol=symbols[label]),
                hovertemplate=(f"<b>{label}</b> · {split}<br>{xcol} %{{x}}<br>"
                               f"{metric} %{{y:{fmt}}}<extra></extra>"),
            ), row=row, col=col)
    return values


def compare_curves(runs: Mapping[str, pd.DataFrame], metric: str = "loss",
                   splits: Sequence[str] = ("val",), x: str = "epoch",
                   title: str | None = None) -> go.Figure:
    """One metric ("loss" or "accuracy") of several runs overlaid, one colour per run.

    Args:
        runs: run label → per-epoch history (the format of ``training_curves``); the dict order
            fixes the colours (``run_colors``).
        splits: which splits to draw; with several, train is dotted, val solid, test dashed.
    """
    title = title or f"{metric.capitalize()} by run"
    if not runs:
        return empty_figure("No runs selected", title)
    fig = go.Figure()
    values = _add_run_traces(fig, runs, metric, splits, x, None, None, legend=True)
    if not fig.data:
        return empty_figure(f"No {'/'.join(splits)} {metric} in these runs yet", title)
    fig.update_xaxes(title_text=x)
    if metric == "accuracy":
        fig.update_yaxes(title_text="accuracy", tickformat=_pct_format(np.concatenate(values)))
    else:
        fig.update_yaxes(title_text=metric)
    return _style(fig, title, height=420)


def compare_loss_accuracy(runs: Mapping[str, pd.DataFrame], splits: Sequence[str] = ("val",),
                          x: str = "epoch", title: str = "Runs compared") -> go.Figure:
    """Loss (left) and accuracy (right) of several runs; a run has the same colour in both."""
    if not runs:
        return empty_figure("No runs selected", title)
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12)
    _add_run_traces(fig, runs, "loss", splits, x, 1, 1, legend=True)
    acc = _add_run_traces(fig, runs, "accuracy", splits, x, 1, 2, legend=False)
    if not fig.data:
        return empty_figure(f"No {'/'.join(splits)} metrics in these runs yet", title)
    fig.update_xaxes(title_text=x)
    xs = [v for t in fig.data for v in (t.x if t.x is not None else ())]
    if x == "epoch" and xs and max(xs) <= 15:
        fig.update_xaxes(dtick=1)   # whole epochs: no "1.5" tick between two points
    fig.update_yaxes(title_text="loss", row=1, col=1)
    _accuracy_axis(fig, np.concatenate(acc) if acc else np.zeros(0))
    fig = _style(fig, title, height=420 + 30 * ((len(runs) * len(splits) + 2) // 3))
    # One legend entry per run and split: below the panels, where it does not cover the title.
    fig.update_layout(legend=dict(orientation="h", x=0, xanchor="left", y=-0.22, yanchor="top"),
                      margin=dict(b=60 + 30 * ((len(runs) * len(splits) + 2) // 3)))
    return fig


# ---------------------------------------------------------------------------------------------
# Confusion matrix
# ---------------------------------------------------------------------------------------------
def _percent_text(frac: np.ndarray, k: int, compact: bool = False) -> np.ndarray:
    pct = 100.0 * frac
    if compact:   # half-width panels: whole percents without the sign, empty cells for 0
        return np.vectorize(lambda p: f"{p:.0f}" if p > 0 else "")(pct)
    if k <= ONE_DECIMAL_CLASSES:
        return np.vectorize(lambda p: f"{p:.1f}%")(pct)
    if k <= WHOLE_PERCENT_CLASSES:   # "16.0%" ran into its neighbours at 10 classes in a 3/5 column
        return np.vectorize(lambda p: f"{p:.0f}%")(pct)
    # 11–20 classes: cells are narrow; whole percents without the sign (the colour bar says %).
    return np.vectorize(lambda p: f"{p:.0f}")(pct)


def confusion_heatmap(matrix: Any, class_names: Sequence[str], normalize: bool = False,
                      title: str = "Confusion matrix", compact: bool = False) -> go.Figure:
    """Heat map of a K×K confusion matrix of counts (rows = true class, as ``core.metrics``).

    True class on y (row 0 at the top), predicted class on x, both in ``class_names`` order.
    ``normalize=True`` colours each row by its fraction of the true class (rows with no samples
    stay 0). Cells carry the count, or the percent (one decimal up to 10 classes, none up to 20);
    above 20 classes they are left blank and the hover tells the numbers. ``compact`` is for two
    matrices side by side: whole percents without the sign, and nothing in empty cells.
    """
    counts = np.asarray(matrix, dtype=np.int64) if len(matrix) else np.zeros((0, 0), np.int64)
    k = len(class_names)
    if k == 0 or counts.size == 0:
        return empty_figure("No evaluation yet", title)
    if counts.shape != (k, k):
        raise ValueError(f"confusion matrix of shape {counts.shape} does not match "
                         f"{k} class names")
    names = _unique_labels(class_names)
    rows = counts.sum(axis=1, keepdims=True)
    frac = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    z = frac if normalize else counts
    trace = dict(
        z=z, x=names, y=names, colorscale=HEATMAP_SCALE, zmin=0,
        zmax=1 if normalize else max(int(counts.max()), 1),
        customdata=np.dstack([counts, 100.0 * frac]), xgap=1, ygap=1, hoverongaps=False,
        hovertemplate=("true %{y} → predicted %{x}: %{customdata[0]:,} "
                       "(%{customdata[1]:.1f} %)<extra></extra>"),
        colorbar=dict(title=dict(text="% of true class" if normalize else "count"),
                      tickformat=".0%" if normalize else ",d", thickness=16),
    )
    if k <= MAX_CELL_TEXT_CLASSES:
        if normalize:
            text = _percent_text(frac, k, compact)
        else:
            text = np.where(counts > 0, counts.astype(str), "") if compact else counts.astype(str)
        trace.update(text=text, texttemplate="%{text}", textfont=dict(size=FONT_SIZE))
    fig = go.Figure(go.Heatmap(**trace))
    fig.update_xaxes(title_text="predicted class", tickangle=-45 if k > 6 else 0,
                     **_category_axis(names), constrain="domain", showgrid=False)
    fig.update_yaxes(title_text="true class", autorange="reversed", **_category_axis(names),
                     scaleanchor="x", scaleratio=1, constrain="domain", showgrid=False)
    # Square cells (scaleanchor) big enough for their text at 14 px: "100.0%" needs ~50 px, a
    # whole number ~30 px; 240 px go to the title, tick labels and margins. 480..900 px in all.
    cell = 56 if k <= WHOLE_PERCENT_CLASSES else 34
    height = int(min(900, max(480, 240 + cell * k)))
    return _style(fig, title, height=height, legend=False)


# ---------------------------------------------------------------------------------------------
# Dataset and predictions
# ---------------------------------------------------------------------------------------------
def class_distribution(table: pd.DataFrame | None, title: str = "Images per class") -> go.Figure:
    """Bar chart of images per class, in the table's class order.

    ``table`` is either ``[class, images]`` (one bar per class) or a split table
    ``[class, train, val, test(, total)]`` (bars stacked by split, ``total`` ignored).
    """
    if _is_empty(table):
        return empty_figure("No dataset loaded", title)
    if "class" not in table.columns:
        raise ValueError(f"class_distribution needs a 'class' column; got {list(table.columns)}")
    names = _unique_labels(table["class"].tolist())
    split_cols = [s for s in SPLIT_ORDER if s in table.columns]
    if split_cols:
        series = [(s, SPLIT_COLORS[s]) for s in split_cols]
    else:
        numeric = [c for c in table.columns if c != "class"
                   and pd.api.types.is_numeric_dtype(table[c])]
        col = "images" if "images" in table.columns else (numeric[0] if numeric else None)
        if col is None:
            raise ValueError("class_distribution needs an 'images' column or split columns")
        series = [(col, OKABE_ITO[0])]
    totals = sum(table[c].fillna(0).to_numpy(dtype=float) for c, _ in series)
    fig = go.Figure()
    for col, color in series:
        counts = table[col].fillna(0).to_numpy(dtype=float)
        share = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
        single = len(series) == 1
        fig.add_trace(go.Bar(
            x=names, y=counts, name=col, marker_color=color,
            customdata=np.column_stack([100 * share, totals]),
            text=counts.astype(int).astype(str) if single and len(names) <= 30 else None,
            textposition="outside" if single else None, cliponaxis=False,  # labels above the top bar
            hovertemplate=(f"%{{x}}<br>{col}: %{{y:,}} images" +
                           ("" if single else " (%{customdata[0]:.1f} % of the class)") +
                           "<extra></extra>"),
        ))
    fig.update_layout(barmode="stack", bargap=0.2)
    # Ten names like "airplane" and "automobile" already collide at half width: slant from 7 on.
    fig.update_xaxes(title_text="class", **_category_axis(names),
                     tickangle=-35 if len(names) > 6 else 0)
    top = float(totals.max()) if len(totals) else 0.0
    fig.update_yaxes(title_text="images", rangemode="tozero", range=[0, top * 1.15 or 1])
    return _style(fig, title, height=420, legend=len(series) > 1)


def topk_bar(probs: Mapping[str, float] | None, k: int | None = None,
             title: str = "Top predictions") -> go.Figure:
    """Horizontal bars of class probabilities, largest on top (at most ``k`` bars if given)."""
    if not probs:
        return empty_figure("No prediction yet", title)
    items = sorted(((str(c), float(p)) for c, p in probs.items()), key=lambda cp: -cp[1])
    if k is not None:
        items = items[: max(1, int(k))]
    names = _unique_labels([c for c, _ in items])
    values = np.array([p for _, p in items])
    colors = [OKABE_ITO[0]] + [OKABE_ITO[5]] * (len(items) - 1)
    fig = go.Figure(go.Bar(
        x=values, y=names, orientation="h", marker_color=colors,
        text=[f"{100 * p:.1f}%" for p in values], textposition="outside", cliponaxis=False,
        hovertemplate="%{y}: %{x:.2%}<extra></extra>",
    ))
    fig.update_xaxes(title_text="probability", range=[0, 1.15], tickformat=".0%",
                     tickvals=[0, 0.25, 0.5, 0.75, 1.0])
    fig.update_yaxes(**_category_axis(names), autorange="reversed")
    return _style(fig, title, height=int(max(260, 120 + 40 * len(items))), legend=False)


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------
def _memory_key(name: str) -> str | None:
    low = str(name).lower()
    for word, key in MEMORY_KEYWORDS:
        if word in low:
            return key
    return None


def memory_breakdown(components: Mapping[str, float] | None, title: str = "Memory estimate",
                     inference: Mapping[str, float] | None = None) -> go.Figure:
    """Two stacked horizontal bars: training (top) and inference, in MiB or GiB.

    Args:
        components: training memory, name → bytes, e.g. ``{"weights": ..., "gradients": ...,
            "optimizer state": ..., "activations": ..., "input": ...}``. Names are matched by
            keyword (weight/param, grad, optim, activ/saved, input/batch) so each component keeps
            its colour; other names are drawn in grey, in the order given.
        inference: the inference breakdown, same form. When None it is the weights and the input
            of ``components`` (an inference pass keeps no gradients, optimiser state or saved
            activations; its transient activations are not in ``components``).
    """
    if not components:
        return empty_figure("No memory estimate yet", title)
    train = {str(k): float(v) for k, v in components.items()}
    if inference is None:
        infer = {k: v for k, v in train.items() if _memory_key(k) in INFERENCE_COMPONENTS}
    else:
        infer = {str(k): float(v) for k, v in inference.items()}
    totals = {"training": sum(train.values()), "inference": sum(infer.values())}
    unit, scale = _byte_unit(max(totals.values()))
    bars = ["training", "inference"]
    names = list(dict.fromkeys([*train, *infer]))
    canonical = list(MEMORY_COMPONENTS)
    names.sort(key=lambda n: canonical.index(_memory_key(n)) if _memory_key(n) else len(canonical))
    fig = go.Figure()
    for name in names:
        key = _memory_key(name)
        color = MEMORY_COMPONENTS[key][1] if key else OTHER_COLOR
        vals = [train.get(name), infer.get(name)]
        sizes = [v or 0.0 for v in vals]
        share = [100 * s / totals[b] if totals[b] else 0.0 for s, b in zip(sizes, bars)]
        fig.add_trace(go.Bar(
            y=bars, x=[s / scale for s in sizes], name=name, orientation="h", marker_color=color,
            # the label is written inside the segment; segments too small for 14 px text hide it
            text=[format_size(s) if s else "" for s in sizes], textposition="inside",
            insidetextanchor="middle",
            customdata=np.column_stack([[format_size(s) for s in sizes], share]),
            hovertemplate=(f"<b>{name}</b> (%{{y}}): %{{customdata[0]}}"
                           f" — %{{customdata[1]:.1f}} % of %{{y}}<extra></extra>"),
        ))
    for bar in bars:
        fig.add_annotation(x=totals[bar] / scale, y=bar, text=f"<b>{format_size(totals[bar])}</b>",
                           showarrow=False, xanchor="left", xshift=8, font=dict(size=FONT_SIZE))
    fig.update_layout(barmode="stack", bargap=0.35,
                      uniformtext=dict(minsize=FONT_SIZE, mode="hide"))
    fig.update_xaxes(title_text=f"memory ({unit})", range=[0, 1.2 * max(totals.values()) / scale],
                     rangemode="tozero")
    fig.update_yaxes(**_category_axis(bars), autorange="reversed")
    fig = _style(fig, title, height=380)
    # The legend goes under the axis title: above the bars it ran into the figure's title.
    fig.update_layout(legend=dict(x=0, xanchor="left", y=-0.32, yanchor="top"),
                      margin=dict(t=70, b=120))
    return fig


def memory_per_layer(per_layer: pd.DataFrame | None, top_n: int = TOP_LAYERS,
                     title: str = "Saved activations per layer") -> go.Figure:
    """Horizontal bars of activation bytes per layer, in execution order (first layer on top).

    ``per_layer`` has columns ``[layer, saved_bytes]`` (an optional ``type`` column is shown on
    hover), rows in execution order. With more than ``top_n`` layers only the ``top_n`` largest
    are drawn, still in execution order, and the title says which share of the total they hold.
    """
    if _is_empty(per_layer):
        return empty_figure("No layers to show", title)
    df = per_layer.reset_index(drop=True)
    total_layers = len(df)
    sizes_all = df["saved_bytes"].fillna(0).to_numpy(dtype=float)
    if total_layers > top_n:
        keep = np.sort(np.argsort(-sizes_all, kind="stable")[:top_n])
        df = df.iloc[keep].reset_index(drop=True)
        share = 100 * df["saved_bytes"].sum() / sizes_all.sum() if sizes_all.sum() else 0.0
        title = f"{title} — largest {top_n} of {total_layers} layers ({share:.0f} % of the total)"
    sizes = df["saved_bytes"].fillna(0).to_numpy(dtype=float)
    unit, scale = _byte_unit(sizes.max() if sizes.size else 0)
    names = _unique_labels(df["layer"].tolist())
    types = df["type"].astype(str).tolist() if "type" in df.columns else [""] * len(df)
    fig = go.Figure(go.Bar(
        x=sizes / scale, y=names, orientation="h", marker_color=MEMORY_COMPONENTS["activations"][1],
        customdata=np.column_stack([[format_size(s) for s in sizes], types]),
        hovertemplate="<b>%{y}</b> %{customdata[1]}<br>saved: %{customdata[0]}<extra></extra>",
    ))
    fig.update_xaxes(title_text=f"saved for backward ({unit})", rangemode="tozero")
    fig.update_yaxes(**_category_axis(names), autorange="reversed")
    return _style(fig, title, height=int(max(320, 160 + 22 * len(names))), legend=False)


__all__ = [
    "MAX_POINTS", "NO_DATA", "bucket_means", "class_distribution", "compare_curves",
    "compare_loss_accuracy", "confusion_heatmap", "empty_figure", "live_curves",
    "memory_breakdown", "memory_per_layer", "run_colors", "run_symbols", "topk_bar",
    "training_curves",
]


# ---- Look inside
GRAD_COLORS = "Viridis"   # first layer dark purple … last layer yellow: depth reads as colour
BAND_COLOR = "0, 114, 178"   # Okabe–Ito blue as r, g, b (the bands are shades of it)


def _depth_colors(n: int) -> list[str]:
    from plotly.colors import sample_colorscale
    return sample_colorscale(GRAD_COLORS, [0.85 * k / max(1, n - 1) for k in range(n)])


def gradient_and_weights(frame: pd.DataFrame | None, layer: str | None,
                         title: str = "Weights and gradients across epochs") -> go.Figure:
    """Two panels over epochs from ``core.gradstats.read_distributions``: on top the gradient norm
    of every layer's weights (one line each, first layer dark → last layer yellow, log scale);
    below, the weights of ``layer`` as bands (5–95 %, 25–75 %) around their median."""
    if _is_empty(frame):
        return empty_figure("No distributions recorded for this run", title)
    weights = frame[frame["layer"].str.endswith("weight")]
    weights = weights if not weights.empty else frame
    names = list(dict.fromkeys(weights["layer"]))
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.12, subplot_titles=(
        "Gradient size of each layer (log scale)", f"Weights of {layer or '–'}: median, middle 50 % and 90 %"))
    for name, color in zip(names, _depth_colors(len(names))):
        rows = weights[(weights["layer"] == name) & weights["grad_norm"].gt(0)]
        fig.add_trace(go.Scatter(x=rows["epoch"], y=rows["grad_norm"], name=name.removesuffix(".weight"),
                                 mode="lines+markers", line=dict(color=color, width=2), legendgroup="grad",
                                 hovertemplate=f"<b>{name}</b><br>epoch %{{x}}<br>gradient norm %{{y:.3g}}"
                                               "<extra></extra>"), row=1, col=1)
    band = frame[frame["layer"] == layer].sort_values("epoch")
    for lo, hi, alpha, label in (("q05", "q95", 0.18, "5–95 %"), ("q25", "q75", 0.38, "25–75 %")):
        fig.add_trace(go.Scatter(x=band["epoch"], y=band[lo], mode="lines", line=dict(width=0),
                                 showlegend=False, hoverinfo="skip"), row=2, col=1)
        fig.add_trace(go.Scatter(x=band["epoch"], y=band[hi], mode="lines", line=dict(width=0), fill="tonexty",
                                 fillcolor=f"rgba({BAND_COLOR}, {alpha})", name=f"weights {label}",
                                 legendgroup="band", hoverinfo="skip"), row=2, col=1)
    fig.add_trace(go.Scatter(x=band["epoch"], y=band["median"], mode="lines+markers", name="weights median",
                             line=dict(color=f"rgb({BAND_COLOR})", width=3), legendgroup="band",
                             customdata=band[["q05", "q25", "q75", "q95"]].to_numpy(),
                             hovertemplate="epoch %{x}<br>median %{y:.3g}<br>25–75 %: %{customdata[1]:.3g} … "
                                           "%{customdata[2]:.3g}<br>5–95 %: %{customdata[0]:.3g} … "
                                           "%{customdata[3]:.3g}<extra></extra>"), row=2, col=1)
    fig.update_yaxes(type="log", dtick=1, exponentformat="power", title_text="gradient norm", row=1, col=1)  # decades only: "3" read as 0.03
    fig.update_yaxes(title_text="weight value", zeroline=True, row=2, col=1)
    few = frame["epoch"].nunique() <= 20   # a tick per epoch while they fit
    fig.update_xaxes(title_text="epoch", dtick=1 if few else None, row=2, col=1)
    fig.update_xaxes(dtick=1 if few else None, row=1, col=1)
    fig = _style(fig, title, height=720, legend=len(names) <= 12)
    # "normal": first layer first (plotly reverses a legend holding filled areas by default)
    fig.update_layout(legend=dict(orientation="v", x=1.02, xanchor="left", y=1, yanchor="top", traceorder="normal"))
    return fig


# ---- LR finder
LR_RAW_COLOR = "rgba(0, 114, 178, 0.3)"    # Okabe–Ito blue, faint: the loss of each step
LR_SMOOTH_COLOR = "#0072B2"
LR_SUGGESTION_COLOR = "#D55E00"


def lr_finder_curve(curve: pd.DataFrame | None, suggestion: float | None = None,
                    title: str = "Loss while the learning rate rises") -> go.Figure:
    """The learning-rate range test (core.lrfinder): the loss of each step (faint) and its smoothed
    curve (bold) against the rate on a log axis, the suggested rate marked by a dashed line.
    ``curve``: DataFrame[step, lr, loss, smoothed]. The y axis stops a little above the smoothed
    curve: the last steps of a diverging run would squash the rest."""
    if _is_empty(curve):
        return empty_figure("No learning-rate test yet — press Find a learning rate", title)
    lr, raw, smooth = (curve[c].to_numpy(dtype=float) for c in ("lr", "loss", "smoothed"))
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=lr, y=raw, name="loss of each step", mode="lines",
                             line=dict(color=LR_RAW_COLOR, width=1.5),
                             hovertemplate="rate %{x:.3g}<br>loss %{y:.4f}<extra>step</extra>"))
    fig.add_trace(go.Scatter(x=lr, y=smooth, name="smoothed loss", mode="lines",
                             line=dict(color=LR_SMOOTH_COLOR, width=3.5),
                             hovertemplate="rate %{x:.3g}<br>smoothed loss %{y:.4f}<extra></extra>"))
    if suggestion is not None:
        at = float(np.interp(np.log(suggestion), np.log(lr), smooth))
        fig.add_vline(x=suggestion, line=dict(color=LR_SUGGESTION_COLOR, width=2, dash="dash"))
        fig.add_trace(go.Scatter(x=[suggestion], y=[at], name=f"suggested rate {suggestion:.3g}", mode="markers",
                                 marker=dict(color=LR_SUGGESTION_COLOR, size=13, symbol="diamond"),
                                 hovertemplate="suggested rate %{x:.3g}<extra></extra>"))
    # the top stops at 1.5× the starting loss: a diverging tail (a loss of 350) squashed the rest flat
    start = float(np.median(smooth[:max(1, len(smooth) // 10)]))
    low, high = float(np.nanmin([raw.min(), smooth.min()])), min(float(smooth.max()), 1.5 * start)
    pad = 0.15 * max(high - low, 1e-6)
    fig.update_xaxes(type="log", title_text="learning rate (log scale)", exponentformat="power")
    fig.update_yaxes(title_text="training loss", range=[low - pad, high + pad])
    return _style(fig, title, height=340)
