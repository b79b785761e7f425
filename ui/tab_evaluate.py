"""Evaluate tab: confusion matrix, per-class metrics, top-k accuracy and the misclassified images
of a finished run (its best checkpoint on the test split, computed by the engine at the end of
training and saved as eval.json), each accuracy with its 95 % interval (core.stats); Grad-CAM
heat-maps (core.explain) on the mistakes, and the test images behind any square of the matrix.

Also the run-list rule Evaluate, Predict and Compare share (``pick_value``, ``refreshed_run_list``,
``follow_runs``) and ``whose_run``."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import numpy as np
import pandas as pd

from core import explain, identity, runrecord, stats
from core.errors import ConfigError, DataError
from ui import plots
from ui.common import AppContext, Controller, md_text, predictors, run_history, safe, seen_run, who_is

GALLERY_LIMIT = 24
PER_CLASS_HEADERS = ["class", "precision", "recall", "f1", "support"]
NO_RUN = "Train a model on the Train tab, then pick its run here."
NO_HEATMAP, HEAT_PRED, HEAT_TRUE = "No heat-map", "Heat-map of the predicted class", "Heat-map of the true class"
OVERLAYS = [NO_HEATMAP, HEAT_PRED, HEAT_TRUE]
HEAT_OPACITY = 0.5
# Each heat-map is a forward and a backward pass in the server: two such requests at a time.
HEATMAP_LIMIT = {"concurrency_limit": 2, "concurrency_id": "eval_heatmaps"}
OWNER_ONLY = "Their images are shown only to the run's owner: they come from their upload."
CELL_PROMPT = ("Click a square of the confusion matrix, or choose its two classes here and press "
               "**Show these images**.")
MISTAKE_PROMPT = "Click a mistake above to see where the model looked, for the class it chose and for the right one."
HOW_TO_READ = ("Warm colours (brightest yellow) show where the image pushed the model towards that class; where "
               "the image shows through unchanged, it did not. If the bright area is the background rather than "
               "the object, the model may have learned a shortcut.")
DETAIL_LABELS = ("The image as the model sees it", "Heat-map of the predicted class", "Heat-map of the true class")
# A click on a square of the plotly matrix in #eval_confusion writes "row<TAB>column<TAB>time" into
# the hidden #eval_cell_pick box (gr.Plot has no click event); the DOM input event updates the box's
# value and Gradio sends its change event (its own "input" event follows key presses only, in 6.31;
# the time makes a second click on the same square a change). Gradio redraws the matrix with
# Plotly.react on the same element, which keeps the handler; a new element (the plot re-mounted)
# gets one when the observer sees it.
CELL_CLICK_JS = """() => {
  if (window.labCellBridge) return;
  window.labCellBridge = true;
  const attach = () => {
    const gd = document.querySelector('#eval_confusion .js-plotly-plot');
    if (!gd || gd.labCell || typeof gd.on !== 'function') return;
    gd.labCell = true;
    gd.on('plotly_click', (ev) => {
      const pt = ev && ev.points && ev.points[0];
      const ij = pt && (Array.isArray(pt.pointIndex) ? pt.pointIndex : pt.pointNumber);
      const box = document.querySelector('#eval_cell_pick textarea, #eval_cell_pick input');
      if (!Array.isArray(ij) || ij.length !== 2 || !box) return;
      const setter = Object.getOwnPropertyDescriptor(Object.getPrototypeOf(box), 'value').set;
      setter.call(box, ij[0] + '\\t' + ij[1] + '\\t' + Date.now());
      box.dispatchEvent(new Event('input', {bubbles: true}));
    });
  };
  new MutationObserver(attach).observe(document.body, {childList: true, subtree: true});
  attach();
}"""


class EvaluateTab(Controller):
    """The Evaluate tab's handlers."""

    def _access(self, run_id: str | None, browser_id, request):
        """(record, whose-run sentence or None, whether this caller may see the run's images) of a
        run this caller may see; ConfigError without a run."""
        run_dir, owner, who = seen_run(self.ctx, run_id, browser_id, request, NO_RUN)
        record = runrecord.load_run(run_dir, live_ids=set(self.ctx.manager.running()))
        return record, whose_run(owner, who), images_allowed(record, owner, who)

    @safe
    def refresh_runs(self, session: dict, current: str | None, browser_id, request: gr.Request):
        # The finished runs with a test evaluation this caller may see (a public endpoint: a
        # docstring would be its API description).
        return refreshed_run_list(self.ctx, session, current, browser_id, request, need="eval", view="eval")

    @safe
    def show(self, run_id: str | None, normalize_rows: bool, browser_id, request: gr.Request):
        ctx = self.ctx
        if not run_id:
            return NO_RUN, plots.empty_figure("No run selected"), pd.DataFrame(columns=PER_CLASS_HEADERS), []
        record, whose, allowed = self._access(run_id, browser_id, request)
        whose = f"_{whose}_\n\n" if whose else ""   # someone else's run says so, before anything else
        label = md_text(run_history(ctx).label(run_id))
        report = record.report()
        if report is None:
            return (f"{whose}Run {label} has no test evaluation yet ({record.status}).",
                    plots.empty_figure("No evaluation yet"), pd.DataFrame(columns=PER_CLASS_HEADERS), [])
        split = record.eval.get("split", "test")
        text = whose + summary_text(record, report, label)
        fig = plots.confusion_heatmap(report.confusion, report.class_names, normalize=normalize_rows,
                                      title=f"Confusion matrix ({split}, {'row-normalised' if normalize_rows else 'counts'})")
        if not allowed:   # someone's upload is theirs: its images reach only them (and the teacher)
            return text + "\n\nThe mistakes are shown only to the run's owner: its images come from their upload.", \
                fig, _per_class_table(report), []
        gallery = runrecord.misclassified_images(record, limit=GALLERY_LIMIT, data_dir=ctx.data_dir)
        return text, fig, _per_class_table(report), gallery

    @safe
    def run_details(self, run_id: str | None, browser_id, request: gr.Request):
        """A run was shown: the cell picker lists its classes; the cell and mistake views start empty."""
        names = []
        if run_id:
            record, _, _ = self._access(run_id, browser_id, request)
            names = [str(c) for c in (record.eval or {}).get("class_names", [])]
        return (gr.Dropdown(choices=names, value=None), gr.Dropdown(choices=names, value=None), [],
                CELL_PROMPT if names else "", *empty_detail())

    @safe
    def errors_gallery(self, run_id: str | None, overlay: str, browser_id, request: gr.Request):
        """The most confident mistakes, plain or with the heat-map of their predicted or true class."""
        record, _, allowed = self._access(run_id, browser_id, request)
        if not allowed:
            return []
        items = runrecord.misclassified_items(record, GALLERY_LIMIT, data_dir=self.ctx.data_dir)
        return self._gallery(record, items, overlay, [item["caption"] for item in items])

    @safe
    def errors_gallery_if_overlay(self, run_id: str | None, overlay: str, browser_id, request: gr.Request):
        """After a new run or matrix is shown: its mistakes again with heat-maps, when they are on."""
        if overlay == NO_HEATMAP or not run_id:
            return gr.skip()
        return self.errors_gallery(run_id, overlay, browser_id, request)

    @safe
    def error_detail(self, run_id: str | None, browser_id, evt: gr.SelectData, request: gr.Request):
        """A mistake was clicked: the image as the model sees it, the heat-maps of its predicted
        and of its true class, and a note in words."""
        record, _, allowed = self._access(run_id, browser_id, request)
        if not allowed:
            raise DataError(f"This run was trained on someone else's upload. {OWNER_ONLY}")
        items = runrecord.misclassified_items(record, GALLERY_LIMIT, data_dir=self.ctx.data_dir)
        index = getattr(evt, "index", None)
        if not isinstance(index, int) or not 0 <= index < len(items):
            raise ConfigError("Click one of the mistakes in the gallery to see its heat-maps.")
        item = items[index]
        predictor = predictors(self.ctx).for_run(record.run_dir)
        pred = explain.explain_image(predictor, item["image"], item["predicted"], HEAT_OPACITY)
        true = explain.explain_image(predictor, item["image"], item["true"], HEAT_OPACITY)
        return (gr.update(value=pred["image"], label=DETAIL_LABELS[0]),
                gr.update(value=pred["overlay"], label=f"Why '{item['predicted']}' (predicted, {pred['probability']:.0%})"),
                gr.update(value=true["overlay"],
                          label=f"Where it saw '{item['true']}' (true class, {true['probability']:.0%})"),
                mistake_note(item, pred["probability"], true["probability"]))

    @safe
    def show_cell(self, run_id: str | None, true_class: str | None, predicted_class: str | None, overlay: str,
                  browser_id, request: gr.Request):
        """The test images of one square of the confusion matrix (true class, predicted class),
        most confident first, with their file names (and heat-maps when they are on)."""
        if not true_class or not predicted_class:
            raise ConfigError("Choose a true class and a predicted class first (the lists fill in when a run is "
                              "shown), or click a square of the confusion matrix.")
        record, _, allowed = self._access(run_id, browser_id, request)
        return self._cell(record, allowed, true_class, predicted_class, overlay)

    @safe
    def refresh_cell(self, run_id: str | None, true_class: str | None, predicted_class: str | None, overlay: str,
                     browser_id, request: gr.Request):
        """The heat-map choice changed: the chosen square's images again, if a square is chosen."""
        if not run_id or not true_class or not predicted_class:
            return gr.skip(), gr.skip()
        return self.show_cell(run_id, true_class, predicted_class, overlay, browser_id, request)

    @safe
    def pick_cell(self, run_id: str | None, pick: str | None, overlay: str, browser_id, request: gr.Request):
        """A square of the matrix was clicked (``pick``: "row<TAB>column", indices or class names, as
        the page's script writes it): both lists name its classes and its images are shown."""
        parts = str(pick or "").split("\t")
        if len(parts) < 2 or not parts[0].strip() or not parts[1].strip():
            raise ConfigError("That click did not land on a square of the matrix; choose the two classes below instead.")
        record, _, allowed = self._access(run_id, browser_id, request)
        if not record.eval:
            raise DataError(f"Run {record.run_id} has no test evaluation yet: let it finish first.")
        names = [str(c) for c in record.eval["class_names"]]
        wanted = [int(x) if x.strip().isdigit() else x for x in parts[:2]]
        t, p = (names[runrecord.class_index(names, v, what)] for v, what in zip(wanted, ("true", "predicted")))
        gallery, note = self._cell(record, allowed, t, p, overlay)
        return gr.update(value=t), gr.update(value=p), gallery, note

    def _cell(self, record, allowed: bool, true_class: str, predicted_class: str, overlay: str):
        """(gallery, note) of the square (true_class, predicted_class) of ``record``'s matrix."""
        if not record.eval:
            raise DataError(f"Run {record.run_id} has no test evaluation yet: let it finish first.")
        names = [str(c) for c in record.eval["class_names"]]
        t = runrecord.class_index(names, true_class, "true")
        p = runrecord.class_index(names, predicted_class, "predicted")
        count = int(np.asarray(record.eval["confusion"])[t, p])
        if not allowed:
            return [], f"{cell_sentence(count, 0, names[t], names[p], ranked=False)} {OWNER_ONLY}"
        items = runrecord.cell_images(record, t, p, limit=GALLERY_LIMIT, data_dir=self.ctx.data_dir)
        captions = [f"{Path(str(item['file'])).name} · {item['confidence']:.0%}" for item in items]
        return self._gallery(record, items, overlay, captions), cell_sentence(count, len(items), names[t], names[p])

    def _gallery(self, record, items: list[dict], overlay: str, captions: list[str]) -> list[tuple]:
        """(image, caption) pairs of ``items``: the images, or their heat-maps (of the predicted or
        the true class, ``overlay``) over the image as the model sees it; at most GALLERY_LIMIT."""
        items = items[:GALLERY_LIMIT]
        if overlay not in OVERLAYS:
            raise ConfigError(f"Choose one of: {', '.join(OVERLAYS)}.")
        if overlay == NO_HEATMAP or not items:
            return [(item["image"], caption) for item, caption in zip(items, captions)]
        key = "predicted" if overlay == HEAT_PRED else "true"
        predictor = predictors(self.ctx).for_run(record.run_dir)
        return [(explain.explain_image(predictor, item["image"], item[key], HEAT_OPACITY)["overlay"], caption)
                for item, caption in zip(items, captions)]


def images_allowed(record, owner: str | None, who: identity.Who) -> bool:
    """Whether ``who`` may see the run's test images: a run trained on an uploaded zip shows them
    only to its owner and the teacher."""
    return not (record.config and record.config.data.source == "zip" and not identity.can_change(owner, who))


def summary_text(record, report, label: str) -> str:
    """One paragraph: the run, its accuracy with its Wilson interval (top-k too, where k is fewer
    than the classes), macro F1 with its bootstrap interval, weighted F1, and a warning when the
    test split is too small to tell runs apart."""
    split, n = record.eval.get("split", "test"), report.num_samples
    acc = stats.wilson_interval(int(np.trace(np.asarray(report.confusion))), n)
    topk = " · ".join(f"top-{k}: **{v:.1%}** ({stats.accuracy_interval(v, n).span()})"
                      for k, v in sorted(report.topk.items()) if 1 < k < len(report.class_names))
    f1 = stats.kept_macro_f1_interval(record.run_dir)
    f1_text = (f"95 % CI {f1.span(percent=False)}" if f1 is not None
               else "no interval: this run was tested before per-image predictions were saved")
    text = (f"**{label}** — {record.config.model.name if record.config else '?'} on {n:,} {split} images: "
            f"accuracy **{report.accuracy:.1%}** (95 % CI {acc.span()}, ±{100 * acc.half_width:.1f} points)"
            f"{' · ' + topk if topk else ''} · macro F1 **{report.macro_f1:.3f}** ({f1_text}) · "
            f"weighted F1 {report.weighted_f1:.3f}.")
    warning = stats.small_split_warning(acc)
    return f"{text} {warning}" if warning else text


def cell_sentence(count: int, shown: int, true_name: str, pred_name: str, ranked: bool = True) -> str:
    """What a square of the matrix holds, in words ("12 test images are cat but were predicted dog; ...");
    ``ranked``: the images are shown, most confident first."""
    t, p = f"**{md_text(true_name)}**", f"**{md_text(pred_name)}**"
    if count == 0:
        return (f"No test image of {t} was recognised as {t}." if true_name == pred_name
                else f"No test image is {t} but was predicted {p}: this square is empty.")
    noun, are, were = ("test image", "is", "was") if count == 1 else ("test images", "are", "were")
    order = "; most confident first." if ranked else "."
    text = (f"{count:,} {noun} {are} {t} and {were} predicted {t} (correct){order}"
            if true_name == pred_name else f"{count:,} {noun} {are} {t} but {were} predicted {p}{order}")
    if 0 < shown < count:
        text += f" The {shown} most confident are shown."
    return text


def mistake_note(item: dict, pred_prob: float, true_prob: float) -> str:
    """A clicked mistake in words: file, true and predicted class, confidences, how to read it."""
    name = md_text(Path(str(item["file"])).name)
    return (f"**{name}** is labelled **{md_text(item['true'])}**; the model said **{md_text(item['predicted'])}** "
            f"({pred_prob:.0%} sure) and gave {md_text(item['true'])} {true_prob:.0%}. {HOW_TO_READ}")


def empty_detail() -> tuple:
    """The mistake detail row with nothing clicked yet."""
    return (*(gr.update(value=None, label=label) for label in DETAIL_LABELS), MISTAKE_PROMPT)


def _per_class_table(report):
    """Per-class rows and the macro / weighted averages. Numbers stay numbers (the ⋮ menu sorts them
    as such); they read "0.370" (not "0.37" next to "0.478") and "1,000" through the Styler's
    display values."""
    averages = report.averages.rename(columns={"average": "class"})
    averages["class"] = averages["class"].map(lambda a: f"({a} average)")
    table = pd.concat([report.per_class.copy(), averages[PER_CLASS_HEADERS]], ignore_index=True)
    return table.astype({"precision": float, "recall": float, "f1": float, "support": int}).style.format(
        {"precision": "{:.3f}", "recall": "{:.3f}", "f1": "{:.3f}", "support": "{:,}"}, na_rep="")


def layout() -> SimpleNamespace:
    w = SimpleNamespace()
    with gr.Row():
        w.run = gr.Dropdown(label="Run", choices=[], elem_id="eval_run", scale=4,
                            info="Finished runs with a test evaluation (newest first)")
        w.refresh = gr.Button("Refresh", scale=1, elem_id="eval_refresh")
        w.normalize = gr.Checkbox(True, label="Row-normalised (recall per class)", scale=2, elem_id="eval_normalize")
    w.summary = gr.Markdown(NO_RUN, elem_id="eval_summary")
    with gr.Row():
        with gr.Column(scale=3):
            w.matrix = gr.Plot(None, label="Confusion matrix", elem_id="eval_confusion")
        with gr.Column(scale=2):
            w.per_class = gr.Dataframe(pd.DataFrame(columns=PER_CLASS_HEADERS), label="Per-class metrics",
                                       interactive=False, elem_id="eval_per_class", wrap=True, max_height=720,
                                       elem_classes="lab-numbers-right",
                                       datatype=["str", "number", "number", "number", "number"],
                                       column_widths=["28%", "22%", "16%", "15%", "19%"])  # no "precisi/on"
    w.overlay = gr.Radio(OVERLAYS, value=NO_HEATMAP, label="Heat-maps on the images below", elem_id="eval_errors_overlay",
                         info="Where the model looked: bright areas pushed it towards the predicted (or the true) "
                              "class. Each picture takes a moment to compute.")
    _cell_layout(w)
    # 6 columns: a caption such as "airplane → automobile 61%" fits under a thumbnail (8 cut it off).
    # The mistakes come as pixels (PNG: small images stay sharp), never as paths into the data folder.
    w.errors = gr.Gallery(label="Most confident mistakes (true class → predicted class, confidence)", columns=6,
                          height=560, elem_id="eval_errors", object_fit="contain", format="png",
                          allow_preview=False)   # a click shows the detail row below, not an overlay over the grid
    with gr.Row():   # full-width thirds: a label such as "Why 'truck' (predicted, 51%)" fits
        images = {"interactive": False, "format": "png", "height": 260, "elem_classes": "lab-pixelated",
                  "buttons": ["fullscreen"]}
        w.error_image = gr.Image(None, label=DETAIL_LABELS[0], elem_id="eval_error_image", **images)
        w.cam_pred = gr.Image(None, label=DETAIL_LABELS[1], elem_id="eval_cam_pred", **images)
        w.cam_true = gr.Image(None, label=DETAIL_LABELS[2], elem_id="eval_cam_true", **images)
    w.error_note = gr.Markdown(MISTAKE_PROMPT, elem_id="eval_error_note")
    return w


def _cell_layout(w: SimpleNamespace) -> None:
    """The images behind one square of the matrix: two class lists and a button (a click on a
    square fills them through the hidden #eval_cell_pick box), a sentence and a gallery."""
    gr.Markdown("### The images behind a square of the matrix")
    with gr.Row(equal_height=True):
        w.cell_true = gr.Dropdown(label="True class", choices=[], elem_id="eval_cell_true", scale=2,
                                  info="What the images really are (a row of the matrix)")
        w.cell_pred = gr.Dropdown(label="Predicted class", choices=[], elem_id="eval_cell_pred", scale=2,
                                  info="What the model said (a column of the matrix)")
        w.cell_show = gr.Button("Show these images", elem_id="eval_cell_show", scale=1)
    w.cell_pick = gr.Textbox("", visible="hidden", elem_id="eval_cell_pick",
                             show_label=False, container=False)
    w.cell_note = gr.Markdown("", elem_id="eval_cell_note")
    w.cell_gallery = gr.Gallery(label="Images of that square (file name, confidence), most confident first",
                                columns=6, height=420, elem_id="eval_cell_gallery", object_fit="contain", format="png")


def build(ctx: AppContext) -> EvaluateTab:
    tab = EvaluateTab(ctx)
    w = tab.w = layout()
    outputs = [w.summary, w.matrix, w.per_class, w.errors]
    details = [w.cell_true, w.cell_pred, w.cell_gallery, w.cell_note, w.error_image, w.cam_pred, w.cam_true,
               w.error_note]
    cell = [w.cell_gallery, w.cell_note]
    run_in = [w.run, w.overlay, ctx.browser_id]
    cell_in = [w.run, w.cell_true, w.cell_pred, w.overlay, ctx.browser_id]
    private = {"api_visibility": "private"}
    w.refresh.click(tab.refresh_runs, [ctx.session, w.run, ctx.browser_id], w.run, api_name="eval_runs",
                    concurrency_limit=None)
    w.run.change(tab.show, [w.run, w.normalize, ctx.browser_id], outputs, api_name="evaluate_run",
                 concurrency_limit=None).success(
        tab.run_details, [w.run, ctx.browser_id], details, concurrency_limit=None, **private).success(
        tab.errors_gallery_if_overlay, run_in, w.errors, **HEATMAP_LIMIT, **private)
    w.normalize.change(tab.show, [w.run, w.normalize, ctx.browser_id], outputs, concurrency_limit=None,
                       **private).success(tab.errors_gallery_if_overlay, run_in, w.errors, **HEATMAP_LIMIT, **private)
    w.overlay.change(tab.errors_gallery, run_in, w.errors, **HEATMAP_LIMIT, **private).success(
        tab.refresh_cell, cell_in, cell, **HEATMAP_LIMIT, **private)
    w.errors.select(tab.error_detail, [w.run, ctx.browser_id], [w.error_image, w.cam_pred, w.cam_true, w.error_note],
                    **HEATMAP_LIMIT, **private)
    w.cell_show.click(tab.show_cell, cell_in, cell, api_name="eval_cell", **HEATMAP_LIMIT)
    w.cell_pick.change(tab.pick_cell, [w.run, w.cell_pick, w.overlay, ctx.browser_id],
                      [w.cell_true, w.cell_pred, *cell], **HEATMAP_LIMIT, **private)
    ctx.shared["evaluate"] = tab   # on_load; the Train tab's See results
    return tab


def pick_value(choices: list[tuple[str, str]], current: str | None, session: dict | None,
               view: str = "eval", own: Callable[[], set] | None = None) -> str | None:
    """Which run a refreshed list (``view``: 'eval', 'predict') shows.

    1. The run this page trained last (``session['last_run_id']``, set by the Train tab), the
       first time this view finds it listed: a page that has just trained shows its new run.
    2. The run shown before, when the user picked it or the view followed it there: an explicit
       pick of another run stays until this page trains again.
    3. The run this page trained last (when the shown run is gone or was a default).
    4. This browser's newest listed run (``own()``: the ids it owns), e.g. after a reload.
    5. The newest run, someone else's: only until this browser has one (the page says whose).
    ``session['followed_run'][view]`` is the run 1 or 4 followed; ``session['default_run'][view]``
    the run 5 picked, which a later refresh may replace."""
    ids = [v for _, v in choices]
    session = session if session is not None else {}
    followed = session.setdefault("followed_run", {})
    default = session.setdefault("default_run", {})
    latest = session.get("last_run_id")
    if latest in ids and followed.get(view) != latest:
        followed[view], default[view] = latest, None
        return latest
    if current in ids and current != default.get(view):
        return current
    default[view] = None
    if latest in ids:
        return latest
    mine = own() if own is not None else set()
    for run_id in ids:   # newest first
        if run_id in mine:
            followed[view] = run_id   # the Train tab may name it last_run_id later: nothing new
            return run_id
    default[view] = ids[0] if ids else None
    return default[view]


def own_run_ids(history, who: identity.Who) -> set:
    """The ids of the runs ``who`` started (their owner is ``who``)."""
    df = history.list()
    return set(df.loc[df["owner"] == who.owner, "run_id"])


def whose_run(owner: str | None, who: identity.Who) -> str | None:
    """Whose run this is, in words, when it is not ``who``'s own: a login name, or 'another
    browser' (never the owner string, which holds a browser's id); None for one's own run."""
    if owner is not None and owner == who.owner:
        return None
    if owner is None:
        return "This run was started on the server (from the command line), not in this browser."
    if owner.startswith("user:"):
        name = md_text(owner[len("user:"):])
        return f"This run was trained by {name}, not by you."
    return "This run was trained by another browser, not this one."


def refreshed_run_list(ctx: AppContext, session: dict, current: str | None, browser_id, request, *,
                       need: str, view: str):
    """A tab's refreshed run list (Evaluate: need='eval', Predict: 'checkpoint'): the runs this
    caller may see, showing the one ``pick_value`` picks for ``view``."""
    who = who_is(ctx, request, browser_id)
    history = run_history(ctx)
    choices = history.choices(need=need, who=who, private=ctx.private_runs)
    return gr.Dropdown(choices=choices, value=pick_value(choices, current, session, view=view,
                                                         own=lambda: own_run_ids(history, who)))


def follow_runs(ctx: AppContext, demo: gr.Blocks, refresh_runs: Callable, run, tab_label: str) -> None:
    """Keep a tab's run list ``run`` current with its ``refresh_runs`` handler: when the page loads,
    whenever the tab is opened (a run that just finished appears), and once the page has its
    browser token (the list can depend on who asks: --private-runs)."""
    inputs = [ctx.session, run, ctx.browser_id]
    demo.load(refresh_runs, inputs, run, api_visibility="private")
    ctx.shared["tab"][tab_label].select(refresh_runs, inputs, run, api_visibility="private")
    ctx.browser_id.change(refresh_runs, inputs, run, api_visibility="private", show_progress="hidden")


def on_load(ctx: AppContext, demo: gr.Blocks) -> None:
    tab = ctx.shared["evaluate"]
    follow_runs(ctx, demo, tab.refresh_runs, tab.w.run, "Evaluate")
    demo.load(None, None, None, js=CELL_CLICK_JS, api_visibility="private")   # clicks on the matrix
