"""Memory tab: how much memory training and inference of the chosen model need, by component
(weights, gradients, optimiser state, saved activations, input), per layer, and the largest batch
that fits a memory budget. Computed without allocating real memory: the model is traced on tensors
that hold no data, and one whole training step is simulated (core/memory.py)."""
from __future__ import annotations

import gradio as gr
import pandas as pd

from core import memory
from ui import plots
from ui.common import AppContext, fmt_bytes, safe
from ui.tab_model import model_shape

OPTIMIZERS = ["sgd", "adam", "adamw", "rmsprop"]


def build(ctx: AppContext) -> None:
    m = ctx.shared["model"]
    gr.Markdown("The model, freezing and input size come from the **Model** and **Data** tabs. "
                "Counted from what autograd really saves for the backward pass and a simulated training "
                "step, not a rule of thumb; nothing is allocated.")
    with gr.Row():
        batch = gr.Slider(1, 1024, value=64, step=1, label="Batch size", elem_id="mem_batch")
        optimizer = gr.Dropdown(OPTIMIZERS, value="sgd", label="Optimizer", info="SGD with momentum 0.9 keeps 1 extra copy of the weights, Adam/AdamW 2", elem_id="mem_optimizer")
        precision = gr.Radio(["fp32", "bf16", "fp16"], value="fp32", label="Precision (mixed for bf16/fp16)",
                             elem_id="mem_precision")
        budget = gr.Dropdown([f"{g} GB" for g in memory.MEMORY_BUDGETS_GB], value="8 GB",
                             label="Memory budget", elem_id="mem_budget")
        compute = gr.Button("Compute", variant="primary", elem_id="mem_compute")
    summary = gr.Markdown("", elem_id="mem_summary")
    with gr.Row():
        breakdown = gr.Plot(None, label="Training vs inference", elem_id="mem_breakdown")
        per_layer = gr.Plot(None, label="Saved activations per layer",
                            elem_id="mem_layers")
    table = gr.Dataframe(pd.DataFrame(columns=["component", "bytes", "MiB"]), interactive=False, elem_id="mem_table",
                         elem_classes="lab-numbers-right", datatype=["str", "number", "number"])

    @safe
    def calculate(session, name, stem, freeze, stages, batch_size, opt, prec, budget_label, progress=gr.Progress()):
        classes, channels, size = model_shape(session, name, stem)
        factory = memory.ZooFactory(name, classes, channels, tuple(size), bool(stem), freeze, int(stages or 0))
        progress(0.2, desc="Tracing the model on the meta device…")
        est = memory.estimate_memory(factory, factory.input_shape, int(batch_size), optimizer=opt, precision=prec)
        train = {"weights": est.param_bytes + est.buffer_bytes, "gradients": est.gradient_bytes,
                 "optimizer state": est.optimizer_bytes,
                 "activations": est.activation_bytes + est.weight_copy_bytes + est.output_bytes,
                 "input": est.input_bytes}
        infer = {"weights": est.param_bytes + est.buffer_bytes,
                 "activations": est.inference_activation_bytes or 0, "input": est.input_bytes}
        gb = float(budget_label.split()[0])
        progress(0.6, desc="Finding the largest batch…")
        best = memory.max_batch_size(factory, factory.input_shape, gb * 1e9, optimizer=opt, precision=prec)
        fits = f"**Largest batch for {budget_label}: {int(best):,}**" if int(best) else \
            f"**Nothing fits in {budget_label}**: {best.reason}"
        text = (f"{name}, {channels}×{size[0]}×{size[1]} input, batch {int(batch_size)}, {opt}, {prec}: "
                f"training needs **{fmt_bytes(est.required_bytes)}** at its peak (the bars show what is held "
                f"together at the end of the forward pass: {fmt_bytes(est.training_total_bytes)}), inference "
                f"**{fmt_bytes(est.inference_total_bytes or 0)}** · {est.trainable_params:,} of "
                f"{est.num_params:,} parameters trainable · {fits}. A GPU also needs its CUDA context and "
                "library workspaces (0.3–1 GB) on top.")
        return (text, plots.memory_breakdown(train, title="Memory for one step", inference=infer),
                plots.memory_per_layer(_layer_names(est.layers)), _readable(est.as_table()))

    inputs = [ctx.session, m["name"], m["stem"], m["freeze"], m["stages"], batch, optimizer, precision, budget]
    outputs = [summary, breakdown, per_layer, table]
    compute.click(calculate, inputs, outputs, api_name="memory", show_progress_on=[summary], concurrency_limit=4)
    for comp in (optimizer, precision, budget):
        comp.change(calculate, inputs, outputs, api_visibility="private", show_progress_on=[summary],
                    concurrency_limit=4)
    batch.release(calculate, inputs, outputs, api_visibility="private", show_progress_on=[summary], concurrency_limit=4)
    ctx.shared["memory_calc"] = (calculate, inputs, outputs)


def _layer_names(layers: pd.DataFrame | None) -> pd.DataFrame | None:
    """What the model's own forward() saves outside its sub-modules (F.relu, view, x + y...) is
    the engine's "(model)" row; on the chart it says where it comes from."""
    if layers is None or layers.empty or "layer" not in layers.columns:
        return layers
    return layers.assign(layer=layers["layer"].replace({"(model)": "ops in forward()"}))


def _readable(table: pd.DataFrame):
    """The engine's table as a Styler, as the leaderboard and the per-class table do: the cells
    keep their numbers and read "248,024" bytes, "0.24" MiB."""
    return table.style.format({"bytes": "{:,}", "MiB": "{:,.2f}"})


def on_load(ctx: AppContext, demo: gr.Blocks) -> None:
    calculate, inputs, outputs = ctx.shared["memory_calc"]
    ctx.shared["tab"]["Memory"].select(calculate, inputs, outputs, api_visibility="private",
                                       show_progress_on=[outputs[0]], concurrency_limit=4)
