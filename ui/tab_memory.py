"""Memory tab: how much memory training and inference of the chosen model need, by component
(weights, gradients, optimiser state, saved activations, input), per layer, and the largest batch
that fits a memory budget. Computed without allocating real memory: the model is traced on tensors
that hold no data, and one whole training step is simulated (core/memory.py).
``MemoryTab`` holds the handler, ``layout`` the widgets, ``build`` wires them."""
from __future__ import annotations

from types import SimpleNamespace

import gradio as gr
import pandas as pd

from core import choices, memory
from core.errors import ConfigError
from ui import plots
from ui.common import AppContext, Controller, safe
from ui.tab_model import model_shape

MiB = 2**20
# The training bar's segments: the table's component rows (core.memory.MemoryEstimate fields) they
# add up, so the bar's total is the table's "training total (sum of the above)".
SEGMENTS = [("weights", {"param_bytes": "parameters", "buffer_bytes": "buffers"}),
            ("gradients", {"gradient_bytes": ""}),
            ("optimizer state", {"optimizer_bytes": ""}),
            ("activations", {"activation_bytes": "saved", "weight_copy_bytes": "half-precision weight copies",
                             "output_bytes": "logits + loss"}),
            ("input batch", {"input_bytes": "images + labels"}),
            ("device overhead", {"overhead_bytes": ""})]


def fmt_mib(n: float) -> str:
    """Every memory number of the tab (text, bars, table): MiB with one decimal, on one line."""
    return f"{n / MiB:,.1f}\u00a0MiB"


def bar_components(est: memory.MemoryEstimate) -> tuple[dict, dict]:
    """(training, inference) segments in bytes; they sum to the table's training and inference totals."""
    train = {}
    for segment, parts in SEGMENTS:
        shown = {f: label for f, label in parts.items() if getattr(est, f)}
        if shown:
            labels = [label for label in shown.values() if label]
            name = f"{segment} ({' + '.join(labels)})" if labels else segment
            train[name] = sum(getattr(est, f) for f in shown)
    if est.inference_total_bytes is None:
        return train, {}
    weights = est.param_bytes + est.buffer_bytes
    act, overhead = est.inference_activation_bytes or 0, est.overhead_bytes
    infer = {"weights (parameters + buffers)": weights, "activations (peak live)": act,
             "input batch (images)": est.inference_total_bytes - weights - act - overhead,
             "device overhead": overhead}
    return train, {k: v for k, v in infer.items() if v}


def _peak_sentence(est: memory.MemoryEstimate) -> str:
    """The one peak (``required_bytes``) and how it relates to the bars' total (the sum of components)."""
    peak, total = fmt_mib(est.required_bytes), fmt_mib(est.training_total_bytes)
    if est.step_peak_bytes is None:
        head = f"training needs **{peak}** (the sum of the components, as the training bar shows)"
    else:
        relation = _relation(est)
        head = (f"training needs **{peak}** at its peak (the simulated step, the table's 'training step peak'); "
                f"the training bar adds up the components as if all were held at once, {total} (the table's "
                f"'training total'), and the peak is {relation}")
    inference = est.inference_total_bytes
    return head + (f"; inference **{fmt_mib(inference)}**" if inference is not None else "")


def _relation(est: memory.MemoryEstimate) -> str:
    """Why the simulated peak is below or above the sum of the components (checked against
    ``est.peak_phase``, the phase of the step where the peak is)."""
    if est.step_peak_bytes <= est.training_total_bytes:
        return "below it: backward frees saved activations as gradients appear"
    if est.peak_phase == "optimizer step":
        return "above it: the optimiser step makes temporaries"
    held = ("the earlier batches' gradients are held from the start, so everything coexists at the end of "
            "the forward pass, and " if est.accumulation_steps > 1 else "")
    return f"above it: {held}backward makes temporaries (each layer's new gradients, those flowing between layers)"


class MemoryTab(Controller):
    """The Memory tab's handler."""

    @safe
    def calculate(self, session, name, stem, freeze, stages, batch_size, opt, prec, budget_label, size_px=0,
                  accumulation=1, progress=gr.Progress()):
        classes, channels, size = model_shape(session, name, stem, size_px)
        factory = memory.ZooFactory(name, classes, channels, tuple(size), bool(stem), freeze, int(stages or 0))
        progress(0.2, desc="Tracing the model on the meta device…")
        accumulation = _whole_steps(accumulation)
        est = memory.estimate_memory(factory, factory.input_shape, int(batch_size), optimizer=opt, precision=prec,
                                     accumulation_steps=accumulation)
        train, infer = bar_components(est)
        gb = float(budget_label.split()[0])
        progress(0.6, desc="Finding the largest batch…")
        best = memory.max_batch_size(factory, factory.input_shape, gb * 1e9, optimizer=opt, precision=prec,
                                     accumulation_steps=accumulation)
        fits = f"**Largest batch for {budget_label}: {int(best):,}**" if int(best) else \
            f"**Nothing fits in {budget_label}**: {best.reason}"
        accumulated = (f" accumulated over {accumulation} (the peak of the 2nd and later batches, which hold "
                       f"the gradients; the largest batch below is the batch of one step)" if accumulation > 1 else "")
        text = (f"{name}, {channels}×{size[0]}×{size[1]} input, batch {int(batch_size)}{accumulated}, {opt}, {prec}: "
                f"{_peak_sentence(est)} · {est.trainable_params:,} of {est.num_params:,} parameters trainable · "
                f"{fits}. A GPU also needs its CUDA context and library workspaces (0.3–1 GB) on top.")
        fig = plots.memory_breakdown(train, title="Memory for one step", inference=infer)
        return (text, _in_mib(fig, train, infer), plots.memory_per_layer(_layer_names(est.layers)),
                _readable(est.as_table()))


def layout() -> SimpleNamespace:
    w = SimpleNamespace()
    gr.Markdown("The model, freezing and input size come from the **Model** tab (the channels and the images' "
                "own size from the dataset loaded on the **Data** tab). "
                "Counted from what autograd really saves for the backward pass and a simulated training "
                "step, not a rule of thumb; nothing is allocated.")
    with gr.Row():
        w.batch = gr.Slider(1, 1024, value=64, step=1, label="Batch size", elem_id="mem_batch")
        w.optimizer = gr.Dropdown(choices.OPTIMIZERS.names(), value="sgd", label="Optimizer",
                                  info="SGD with momentum 0.9 keeps 1 extra copy of the weights, Adam/AdamW 2",
                                  elem_id="mem_optimizer")
        w.precision = gr.Radio(choices.PRECISIONS.names(), value="fp32", label="Precision (mixed for bf16/fp16)",
                               elem_id="mem_precision")
        w.budget = gr.Dropdown([f"{g} GB" for g in memory.MEMORY_BUDGETS_GB], value="8 GB",
                               label="Memory budget", elem_id="mem_budget")
        w.accumulation = gr.Number(1, label="Gradient accumulation (batches)", precision=0, minimum=1,
                                   info="from the 2nd batch of a group on, the gradients are held all step long",
                                   elem_id="mem_accumulation")
        w.compute = gr.Button("Compute", variant="primary", elem_id="mem_compute")
    w.summary = gr.Markdown("", elem_id="mem_summary")
    with gr.Row():
        w.breakdown = gr.Plot(None, label="Training vs inference", elem_id="mem_breakdown")
        w.per_layer = gr.Plot(None, label="Saved activations per layer", elem_id="mem_layers")
    w.table = gr.Dataframe(pd.DataFrame(columns=["component", "bytes", "MiB"]), interactive=False,
                           elem_id="mem_table", elem_classes="lab-numbers-right", datatype=["str", "number", "number"])
    return w


def calculate_io(ctx: AppContext, w: SimpleNamespace) -> tuple[list, list]:
    """(inputs, outputs) of MemoryTab.calculate: the model choices are the Model tab's widgets."""
    m = ctx.shared["model"].w
    inputs = [ctx.session, m.name, m.stem, m.freeze, m.stages, w.batch, w.optimizer, w.precision, w.budget,
              m.image_size, w.accumulation]
    return inputs, [w.summary, w.breakdown, w.per_layer, w.table]


def build(ctx: AppContext) -> MemoryTab:
    tab = MemoryTab(ctx)
    w = tab.w = layout()
    inputs, outputs = calculate_io(ctx, w)
    w.compute.click(tab.calculate, inputs, outputs, api_name="memory", show_progress_on=[w.summary],
                    concurrency_limit=4)
    for comp in (w.optimizer, w.precision, w.budget, w.accumulation):
        comp.change(tab.calculate, inputs, outputs, api_visibility="private", show_progress_on=[w.summary],
                    concurrency_limit=4)
    w.batch.release(tab.calculate, inputs, outputs, api_visibility="private", show_progress_on=[w.summary],
                    concurrency_limit=4)
    ctx.shared["memory"] = tab   # on_load
    return tab


MAX_ACCUMULATION = 4096   # far above any real use; the estimate is the same from 2 on (every later batch alike)


def _whole_steps(value) -> int:
    """The accumulation box as a whole number of batches (empty: 1)."""
    wrong = ConfigError(f"Gradient accumulation must be a whole number of batches from 1 to {MAX_ACCUMULATION:,}; "
                        f"got {value!r}.")
    try:
        steps = int(value or 1)
    except (TypeError, ValueError, OverflowError):
        raise wrong from None
    if not 1 <= steps <= MAX_ACCUMULATION or steps != float(value or 1):
        raise wrong
    return steps


def _layer_names(layers: pd.DataFrame | None) -> pd.DataFrame | None:
    """What the model's own forward() saves outside its sub-modules (F.relu, view, x + y...) is
    the engine's "(model)" row; on the chart it says where it comes from."""
    if layers is None or layers.empty or "layer" not in layers.columns:
        return layers
    return layers.assign(layer=layers["layer"].replace({"(model)": "ops in forward()"}))


def _in_mib(fig, train: dict, infer: dict):
    """The breakdown chart in MiB with the tab's rounding: segment labels, hover and totals read as
    the text and the table do (plots.memory_breakdown picks its own unit and 3 significant digits)."""
    totals = {"training": sum(train.values()), "inference": sum(infer.values())}
    for trace in fig.data:
        sizes = [train.get(trace.name) or 0, infer.get(trace.name) or 0]
        trace.x = [v / MiB for v in sizes]
        trace.text = [fmt_mib(v) if v else "" for v in sizes]
        trace.customdata = [[fmt_mib(v), row[1]] for v, row in zip(sizes, trace.customdata)]
    for note in fig.layout.annotations:
        if note.y in totals:
            note.x, note.text = totals[note.y] / MiB, f"<b>{fmt_mib(totals[note.y])}</b>"
    fig.update_xaxes(title_text="memory (MiB)", range=[0, 1.2 * max(totals.values()) / MiB])
    return fig


def _readable(table: pd.DataFrame):
    """The engine's table as a Styler, as the leaderboard and the per-class table do: the cells
    keep their numbers and read "248,024" bytes, "0.2" MiB (the text's and the bars' rounding),
    numbers on one line."""
    table = table.assign(MiB=(table["bytes"] / MiB).round(1))
    return table.style.format({"bytes": "{:,}", "MiB": "{:,.1f}"}).set_properties(
        subset=["bytes", "MiB"], **{"white-space": "nowrap"})


def on_load(ctx: AppContext, demo: gr.Blocks) -> None:
    tab = ctx.shared["memory"]
    inputs, outputs = calculate_io(ctx, tab.w)
    ctx.shared["tab"]["Memory"].select(tab.calculate, inputs, outputs, api_visibility="private",
                                       show_progress_on=[outputs[0]], concurrency_limit=4)
