"""Evaluate tab: confusion matrix, per-class metrics, top-k accuracy and the misclassified images
of a finished run (its best checkpoint on the test split, computed by the engine at the end of
training and saved as eval.json)."""
from __future__ import annotations

import gradio as gr
import pandas as pd

from core import runs
from ui import plots
from ui.common import AppContext, safe

GALLERY_LIMIT = 24
PER_CLASS_HEADERS = ["class", "precision", "recall", "f1", "support"]


def build(ctx: AppContext) -> None:
    with gr.Row():
        run = gr.Dropdown(label="Run", choices=[], elem_id="eval_run", scale=4,
                          info="Finished runs with a test evaluation (newest first)")
        refresh = gr.Button("Refresh", scale=1, elem_id="eval_refresh")
        normalize = gr.Checkbox(True, label="Row-normalised (recall per class)", scale=2, elem_id="eval_normalize")
    summary = gr.Markdown("Train a model on the Train tab, then pick its run here.", elem_id="eval_summary")
    with gr.Row():
        with gr.Column(scale=3):
            matrix = gr.Plot(None, label="Confusion matrix", elem_id="eval_confusion")
        with gr.Column(scale=2):
            per_class = gr.Dataframe(pd.DataFrame(columns=PER_CLASS_HEADERS), label="Per-class metrics",
                                     interactive=False, elem_id="eval_per_class", wrap=True, max_height=720,
                                     elem_classes="lab-numbers-right",
                                     datatype=["str", "number", "number", "number", "number"],
                                     column_widths=["28%", "22%", "16%", "15%", "19%"])  # no "precisi/on"
    # 6 columns: a caption such as "airplane → automobile 61%" fits under a thumbnail (8 cut it off).
    errors = gr.Gallery(label="Most confident mistakes (true class → predicted class, confidence)", columns=6,
                        height=560, elem_id="eval_errors", object_fit="contain")

    @safe
    def refresh_runs(session: dict, current: str | None):
        choices = runs.run_choices(ctx.runs_dir, need="eval")
        paths = [p for _, p in choices]
        value = current if current in paths else None
        last = session.get("last_run_dir") if session else None
        if value is None and last in paths:
            value = last
        if value is None and paths:
            value = paths[0]
        return gr.Dropdown(choices=choices, value=value)

    @safe
    def show(run_dir: str | None, normalize_rows: bool):
        if not run_dir:
            return ("Train a model on the Train tab, then pick its run here.", plots.empty_figure("No run selected"),
                    pd.DataFrame(columns=PER_CLASS_HEADERS), [])
        record = runs.load_run(run_dir, live_ids=set(ctx.manager.running()))
        report = record.report()
        if report is None:
            return (f"Run {record.run_id} has no test evaluation yet ({record.status}).",
                    plots.empty_figure("No evaluation yet"), pd.DataFrame(columns=PER_CLASS_HEADERS), [])
        split = record.eval.get("split", "test")
        topk = " · ".join(f"top-{k}: **{v:.1%}**" for k, v in sorted(report.topk.items()) if k != 1)
        text = (f"**{record.label}** — {record.config.model.name if record.config else '?'} on "
                f"{report.num_samples} {split} images: accuracy **{report.accuracy:.1%}**"
                f"{' · ' + topk if topk else ''} · macro F1 **{report.macro_f1:.3f}** · "
                f"weighted F1 {report.weighted_f1:.3f}")
        table = report.per_class.copy()
        averages = report.averages.rename(columns={"average": "class"})
        averages["class"] = averages["class"].map(lambda a: f"({a} average)")
        table = pd.concat([table, averages[PER_CLASS_HEADERS]], ignore_index=True)
        # Numbers stay numbers (the ⋮ menu sorts them as such); they read "0.370" (not "0.37" next
        # to "0.478") and "1,000" through the Styler's display values.
        table = table.astype({"precision": float, "recall": float, "f1": float, "support": int}).style.format(
            {"precision": "{:.3f}", "recall": "{:.3f}", "f1": "{:.3f}", "support": "{:,}"}, na_rep="")
        fig = plots.confusion_heatmap(report.confusion, report.class_names, normalize=normalize_rows,
                                      title=f"Confusion matrix ({split}, {'row-normalised' if normalize_rows else 'counts'})")
        gallery = runs.misclassified_images(record, limit=GALLERY_LIMIT, data_dir=ctx.data_dir)
        return text, fig, table, gallery

    outputs = [summary, matrix, per_class, errors]
    refresh.click(refresh_runs, [ctx.session, run], run, api_name="eval_runs", concurrency_limit=None)
    run.change(show, [run, normalize], outputs, api_name="evaluate_run", concurrency_limit=None)
    normalize.change(show, [run, normalize], outputs, api_visibility="private", concurrency_limit=None)
    ctx.shared["eval_refresh"] = (refresh_runs, run)


def on_load(ctx: AppContext, demo: gr.Blocks) -> None:
    refresh_runs, run = ctx.shared["eval_refresh"]
    demo.load(refresh_runs, [ctx.session, run], run, api_visibility="private")
    # The list is refreshed whenever the Evaluate tab is opened, so a run that just finished appears.
    ctx.shared["tab"]["Evaluate"].select(refresh_runs, [ctx.session, run], run, api_visibility="private")
