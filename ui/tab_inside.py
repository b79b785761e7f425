"""Look inside tab: what a trained run's model has learned and how its training went inside —
the first layer's filters (trained beside initial), the feature maps of any layer for an image,
and the weight and gradient distributions recorded epoch by epoch (with vanishing / exploding
gradients said in words). The engine is core.internals and core.gradstats; ``InsideTab`` holds
the handlers, ``layout`` the widgets, ``build`` wires them.

Three sub-tabs under one Run picker: their three names are visible at once at the top of the
tab, and each view fits a projector screen without scrolling past the others."""
from __future__ import annotations

from types import SimpleNamespace

import gradio as gr
import numpy as np

from core import gradstats, internals
from core.errors import ConfigError, ModelError
from ui import plots
from ui.common import AppContext, Controller, md_text, predictors, run_history, safe, seen_run
from ui.tab_evaluate import NO_RUN, follow_runs, refreshed_run_list, whose_run
from ui.tab_predict import EXAMPLES, friendly_image_errors

INTRO = ("**Look inside a trained model**: the filters its first layer learned, what any layer "
         "\"sees\" in an image, and whether its gradients stayed healthy during training. "
         "(Heat-maps of *where* a model looks are on the Predict and Evaluate tabs.)")
NO_IMAGE = "Drop an image above, or click one of the examples, to see what this layer responds to."
HOW_TO_RECORD = ("To record them, tick **'Record weight and gradient distributions'** under More settings on "
                 "the Train tab before training; it costs about 1 % of training time.")
STATUS_WORDS = {"ok": "✅ **No warning.**", "vanishing": "⚠️ **Vanishing gradients.**",
                "exploding": "⚠️ **Exploding gradients.**", "no data": "ℹ️ **No gradients recorded.**"}
BARELY_CHANGED = ("They barely changed: normal when training started from pretrained weights or has just begun; "
                  "otherwise try more epochs or a higher learning rate.")
MAPS_LIMIT = {"concurrency_limit": 2, "concurrency_id": "inside_model"}   # model loads and forward passes


class InsideTab(Controller):
    """The Look inside tab's handlers, over the server's one cache of loaded models."""

    def _run(self, run_id: str | None, browser_id, request):
        """(run folder, whose-run sentence or None) of a run this caller may see; never a path."""
        run_dir, owner, who = seen_run(self.ctx, run_id, browser_id, request, NO_RUN)
        return run_dir, whose_run(owner, who)

    def _predictor(self, run_dir):
        return predictors(self.ctx).for_run(run_dir)

    @safe
    def refresh_runs(self, session: dict, current: str | None, browser_id, request: gr.Request):
        # The runs with a checkpoint this caller may see (no docstring: it would be the API description).
        return refreshed_run_list(self.ctx, session, current, browser_id, request, need="checkpoint", view="inside")

    @safe
    def show_run(self, run_id: str | None, browser_id, request: gr.Request):
        """A run was picked: whose it is, its first-layer filters, its layer list (a middle conv
        layer chosen) and its recorded distributions."""
        if not run_id:
            empty = plots.empty_figure("No run selected")
            return (NO_RUN, None, None, "", gr.Dropdown(choices=[], value=None), gr.Dropdown(choices=[], value=None),
                    empty, "")
        run_dir, whose = self._run(run_id, browser_id, request)
        predictor = self._predictor(run_dir)
        who_text = (f"_{whose}_\n\n" if whose else "") + (
            f"**{md_text(run_history(self.ctx).label(run_id))}** — model **{predictor.model_name}**, "
            f"input {predictor.input_shape[2]}×{predictor.input_shape[1]}, {len(predictor.classes)} classes.")
        trained, initial, kernel_note = kernels_view(run_dir)
        table = internals.run_feature_layers(predictor)
        frame = gradstats.read_distributions(run_dir)
        dist_choices = list(dict.fromkeys(frame["layer"]))
        dist_layer = default_dist_layer(dist_choices)
        fig, dist_note = distributions_view(frame, dist_layer)
        return (who_text, trained, initial, kernel_note,
                gr.Dropdown(choices=layer_choices(table), value=default_layer(table)),
                gr.Dropdown(choices=dist_choices, value=dist_layer), fig, dist_note)

    @safe
    def feature_maps(self, run_id: str | None, image, layer: str | None, channels, browser_id,
                     request: gr.Request):
        """The most active channels of ``layer`` for this page's image, as a grid, and what it shows."""
        if not run_id:
            return None, NO_RUN
        run_dir, _ = self._run(run_id, browser_id, request)
        if image is None:
            return None, NO_IMAGE
        if not layer:
            raise ConfigError("Pick a layer first (the list fills in when a run is chosen).")
        try:
            count = int(channels)
        except (TypeError, ValueError):
            raise ConfigError(f"The number of channels must be a whole number from 4 to 64; got {channels!r}.") from None
        if not 4 <= count <= 64:
            raise ConfigError(f"The number of channels must be from 4 to 64; got {count}.")
        out = internals.run_feature_maps(self._predictor(run_dir), image, layer, max_channels=count)
        return out["grid"], maps_note(out)

    @safe
    def distributions(self, run_id: str | None, layer: str | None, browser_id, request: gr.Request):
        """The recorded distributions of a run, with ``layer``'s weights as bands, and diagnose's verdict."""
        run_dir, _ = self._run(run_id, browser_id, request)
        frame = gradstats.read_distributions(run_dir)
        if layer and not frame.empty and layer not in set(frame["layer"]):
            raise ModelError(f"{layer[:80]!r} is not a recorded layer of this run; pick one from the list.")
        return distributions_view(frame, layer or default_dist_layer(list(dict.fromkeys(frame["layer"]))))


def kernels_view(run_dir) -> tuple:
    """(trained grid, initial grid or None, note) of a run's first-layer filters, in plain words."""
    try:
        k = internals.conv_kernels(run_dir, upscale=None)
    except ModelError as err:
        return None, None, f"ℹ️ {err}"
    out_ch, in_ch, kh, kw = k["trained"].shape
    colour = ("shown in colour (red, green and blue input channels)" if in_ch == 3
              else f"the mean of its {in_ch} input channels, in grey")
    note = (f"**{k['layer']}**: {out_ch} filters of {kh} × {kw} pixels, each {colour}. "
            "Grey is 0, lighter is positive, darker is negative — one shared scale for both pictures, "
            "so they compare.")
    if k["initial"] is None:
        return k["trained_grid"], None, note + ("\n\nThis run was trained before the lab saved the starting "
                                                "filters, so there is nothing to compare with.")
    start = np.sqrt((k["initial"] ** 2).reshape(out_ch, -1).sum(1))
    rel = float(np.mean(k["change"] / np.maximum(start, 1e-12)))
    most = int(np.argmax(k["change"]))
    note += (f"\n\nTraining changed each filter by **{rel:.0%}** of its starting size on average "
             f"(filter {most + 1} the most). " + (BARELY_CHANGED if rel < 0.02 else ""))
    return k["trained_grid"], k["initial_grid"], note.strip()


def layer_choices(table) -> list[tuple[str, str]]:
    """("features.3 — Conv2d, 16 × 14 × 14", "features.3") for each layer that has feature maps."""
    return [(f"{r.layer} — {r.type}, {r.channels} × {r.height} × {r.width}", r.layer) for r in table.itertuples()]


def default_layer(table) -> str | None:
    """A middle convolution (early ones see edges, late ones are tiny): the middle row otherwise."""
    convs = table[table["type"].str.startswith("Conv")]
    rows = convs if not convs.empty else table
    return rows["layer"].iloc[len(rows) // 2] if not rows.empty else None


def default_dist_layer(layers: list[str]) -> str | None:
    """The first layer's weights (where vanishing gradients show first)."""
    return next((n for n in layers if n.endswith("weight")), layers[0] if layers else None)


def maps_note(out: dict) -> str:
    """"The 16 most active of 32 channels of features.3 for this image, …" (or "All 6 channels")."""
    shown, total = len(out["channels"]), out["total"]
    which = f"All {shown} channels" if shown >= total else f"The {shown} most active of {total} channels"
    return (f"{which} of **{out['layer']}** for this image, most active first; bright = strong response "
            "(each map on its own scale).")


def distributions_view(frame, layer: str | None) -> tuple:
    """(figure, note) of recorded distributions; a run that recorded none says how to record."""
    if frame.empty:
        return (plots.gradient_and_weights(None, None),
                f"This run did not record weight and gradient distributions. {HOW_TO_RECORD}")
    verdict = gradstats.diagnose(frame)
    epochs = frame["epoch"].nunique()
    note = (f"{STATUS_WORDS.get(verdict['status'], verdict['status'])} " + " ".join(verdict["messages"])
            + f"\n\nRecorded over {epochs} epoch{'s' if epochs != 1 else ''}. Top: how big each layer's "
            "gradient was (lines falling towards the bottom = vanishing, shooting up = exploding). "
            "Bottom: the spread of the chosen layer's weights.")
    return plots.gradient_and_weights(frame, layer), note


def layout() -> SimpleNamespace:
    w = SimpleNamespace()
    gr.Markdown(INTRO, elem_id="inside_intro")
    with gr.Row():
        w.run = gr.Dropdown(label="Run", choices=[], elem_id="inside_run", scale=4,
                            info="Runs with a checkpoint (newest first); this browser's own run is picked first")
        w.refresh = gr.Button("Refresh", scale=1, elem_id="inside_refresh")
    w.who = gr.Markdown(NO_RUN, elem_id="inside_who")
    with gr.Tabs(elem_id="inside_sections"):
        with gr.Tab("First-layer filters", elem_id="inside_sec_kernels"):
            _kernels_layout(w)
        with gr.Tab("Feature maps", elem_id="inside_sec_maps"):
            _maps_layout(w)
        with gr.Tab("Weights & gradients", elem_id="inside_sec_dist"):
            _dist_layout(w)
    return w


def _kernels_layout(w: SimpleNamespace) -> None:
    gr.Markdown("### The filters of the first layer\nEach square is one filter: the small pattern the model "
                "looks for everywhere in the image (edges, colours, stripes).")
    with gr.Row():
        w.kernels_trained = gr.Image(label="After training", type="pil", interactive=False, format="png",
                                     elem_id="inside_kernels_trained", elem_classes="lab-pixelated", height=360)
        w.kernels_initial = gr.Image(label="Before training (random start)", type="pil", interactive=False,
                                     format="png", elem_id="inside_kernels_initial", elem_classes="lab-pixelated",
                                     height=360)
    w.kernels_note = gr.Markdown("", elem_id="inside_kernels_note")


def _maps_layout(w: SimpleNamespace) -> None:
    gr.Markdown("### Feature maps: what one layer sees in an image\nEvery small picture is one channel of the "
                "layer; bright where it responds strongly.")
    with gr.Row():
        with gr.Column(scale=1, min_width=320):
            w.image = friendly_image_errors(gr.Image(type="pil", sources=["upload", "clipboard"], height=260,
                                                     label="Your image", elem_id="inside_image"))
            if EXAMPLES:
                gr.Examples(EXAMPLES, inputs=w.image, label="Example images", examples_per_page=10,
                            elem_id="inside_examples")
            w.layer = gr.Dropdown(label="Layer", choices=[], elem_id="inside_layer",
                                  info="layer — type, channels × height × width; early layers see edges and "
                                       "colours, later ones bigger parts")
            w.channels = gr.Slider(4, 64, value=16, step=1, label="Channels to show", elem_id="inside_channels",
                                   info="the most active channels come first")
        with gr.Column(scale=2):
            w.maps = gr.Image(label="Feature maps (most active first)", type="pil", interactive=False, format="png",
                              elem_id="inside_maps", elem_classes="lab-pixelated", height=520)
            w.maps_note = gr.Markdown(NO_IMAGE, elem_id="inside_maps_note")


def _dist_layout(w: SimpleNamespace) -> None:
    gr.Markdown("### Weights and gradients during training\nHow big each layer's gradient was, epoch by "
                "epoch, and how one layer's weights spread out.")
    w.dist_layer = gr.Dropdown(label="Layer whose weights are shown below", choices=[], elem_id="inside_dist_layer",
                               info="the band is where 90 % (light) and 50 % (dark) of its weights lie")
    w.dist_note = gr.Markdown("", elem_id="inside_dist_note")
    w.dist_plot = gr.Plot(None, label="Gradients and weights per epoch", elem_id="inside_dist_plot")


def build(ctx: AppContext) -> InsideTab:
    tab = InsideTab(ctx)
    w = tab.w = layout()
    w.refresh.click(tab.refresh_runs, [ctx.session, w.run, ctx.browser_id], w.run, api_name="inside_runs",
                    concurrency_limit=None)
    maps_inputs = [w.run, w.image, w.layer, w.channels, ctx.browser_id]
    run_outputs = [w.who, w.kernels_trained, w.kernels_initial, w.kernels_note, w.layer, w.dist_layer,
                   w.dist_plot, w.dist_note]
    w.run.change(tab.show_run, [w.run, ctx.browser_id], run_outputs, api_name="inside_run", **MAPS_LIMIT).success(
        tab.feature_maps, maps_inputs, [w.maps, w.maps_note], api_visibility="private", **MAPS_LIMIT)
    w.image.change(tab.feature_maps, maps_inputs, [w.maps, w.maps_note], api_name="inside_feature_maps",
                   **MAPS_LIMIT)
    w.layer.input(tab.feature_maps, maps_inputs, [w.maps, w.maps_note], api_visibility="private", **MAPS_LIMIT)
    w.channels.release(tab.feature_maps, maps_inputs, [w.maps, w.maps_note], api_visibility="private",
                       **MAPS_LIMIT)
    w.dist_layer.input(tab.distributions, [w.run, w.dist_layer, ctx.browser_id], [w.dist_plot, w.dist_note],
                       api_name="inside_distributions", concurrency_limit=None)
    ctx.shared["inside"] = tab   # on_load; the Train tab's Look inside
    return tab


def on_load(ctx: AppContext, demo: gr.Blocks) -> None:
    tab = ctx.shared["inside"]
    follow_runs(ctx, demo, tab.refresh_runs, tab.w.run, "Look inside")
