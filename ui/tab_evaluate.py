"""Evaluate tab: confusion matrix, per-class metrics, top-k accuracy and the misclassified images
of a finished run (its best checkpoint on the test split, computed by the engine at the end of
training and saved as eval.json).

Also the run-list rule Evaluate, Predict and Compare share (``pick_value``, ``refreshed_run_list``,
``follow_runs``) and ``whose_run``."""
from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import gradio as gr
import pandas as pd

from core import identity, runrecord
from ui import plots
from ui.common import AppContext, Controller, md_text, run_history, safe, who_is

GALLERY_LIMIT = 24
PER_CLASS_HEADERS = ["class", "precision", "recall", "f1", "support"]
NO_RUN = "Train a model on the Train tab, then pick its run here."


class EvaluateTab(Controller):
    """The Evaluate tab's handlers."""

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
        history = run_history(ctx)   # the id must be a run of the history, one this caller may see
        who = who_is(ctx, request, browser_id)
        owner = history.check_access(run_id, who, private=ctx.private_runs)
        whose = whose_run(owner, who)   # someone else's run says so, before anything else
        whose = f"_{whose}_\n\n" if whose else ""
        record = runrecord.load_run(history.run_dir(run_id), live_ids=set(ctx.manager.running()))
        report = record.report()
        if report is None:
            return (f"{whose}Run {md_text(history.label(run_id))} has no test evaluation yet ({record.status}).",
                    plots.empty_figure("No evaluation yet"), pd.DataFrame(columns=PER_CLASS_HEADERS), [])
        split = record.eval.get("split", "test")
        topk = " · ".join(f"top-{k}: **{v:.1%}**" for k, v in sorted(report.topk.items()) if k != 1)
        text = (f"{whose}**{md_text(history.label(run_id))}** — {record.config.model.name if record.config else '?'} on "
                f"{report.num_samples} {split} images: accuracy **{report.accuracy:.1%}**"
                f"{' · ' + topk if topk else ''} · macro F1 **{report.macro_f1:.3f}** · "
                f"weighted F1 {report.weighted_f1:.3f}")
        fig = plots.confusion_heatmap(report.confusion, report.class_names, normalize=normalize_rows,
                                      title=f"Confusion matrix ({split}, {'row-normalised' if normalize_rows else 'counts'})")
        if record.config and record.config.data.source == "zip" and not identity.can_change(owner, who):
            # Someone's upload is theirs: its images reach only them (and the teacher).
            text += "\n\nThe mistakes are shown only to the run's owner: its images come from their upload."
            return text, fig, _per_class_table(report), []
        gallery = runrecord.misclassified_images(record, limit=GALLERY_LIMIT, data_dir=ctx.data_dir)
        return text, fig, _per_class_table(report), gallery


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
    # 6 columns: a caption such as "airplane → automobile 61%" fits under a thumbnail (8 cut it off).
    # The mistakes come as pixels (PNG: small images stay sharp), never as paths into the data folder.
    w.errors = gr.Gallery(label="Most confident mistakes (true class → predicted class, confidence)", columns=6,
                          height=560, elem_id="eval_errors", object_fit="contain", format="png")
    return w


def build(ctx: AppContext) -> EvaluateTab:
    tab = EvaluateTab(ctx)
    w = tab.w = layout()
    outputs = [w.summary, w.matrix, w.per_class, w.errors]
    w.refresh.click(tab.refresh_runs, [ctx.session, w.run, ctx.browser_id], w.run, api_name="eval_runs",
                    concurrency_limit=None)
    w.run.change(tab.show, [w.run, w.normalize, ctx.browser_id], outputs, api_name="evaluate_run",
                 concurrency_limit=None)
    w.normalize.change(tab.show, [w.run, w.normalize, ctx.browser_id], outputs, api_visibility="private",
                       concurrency_limit=None)
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
