"""Model tab: the zoo with descriptions and sizes, pretrained weights (and whether they are on
disk), your own weights file, freezing, initialisation, a head learning rate and the layer table.
``ModelTab`` holds the handlers, ``layout`` the widgets, ``build`` wires them."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import gradio as gr
import pandas as pd

from core import datasets, models
from core.config import FREEZE_CHOICES, ModelConfig
from ui.common import AppContext, Controller, bind, none_if_empty, safe

_M = ModelConfig()
LAYER_COLUMNS = ["layer", "type", "output_shape", "params", "trainable"]


class InputPlan(NamedTuple):
    """What a run of this model feeds it for this session's dataset (core.trainer.input_size_for)."""
    classes: int
    channels: int
    native: tuple[int, int] | None    # (h, w) shared by every image; None: sizes differ
    size: tuple[int, int]             # (h, w) fed to the model
    minimum: int                      # the smallest side the model accepts (with this stem)


def input_plan(session: dict, name: str, stem: bool, image_size: int | None = None) -> InputPlan:
    """The input size a run will use, as core.trainer.input_size_for and create_model decide it:
    data.image_size when set (rounded as the model rounds it), else the images' own size when the
    model accepts it, else the model's resize target. Without a dataset: the sample's 32×32 RGB."""
    ds = session.get("dataset") if session else None
    classes = len(ds.classes) if ds is not None else 10
    channels = 1 if ds is not None and ds.mode == "L" else 3
    wh = datasets.common_image_size(ds) if ds is not None else (32, 32)
    native = (wh[1], wh[0]) if wh else None
    minimum = models.min_input_size(name, bool(stem))
    if image_size:
        s = int(image_size)
        size = models.resolve_input_size(name, (s, s), bool(stem)) if s >= minimum else (s, s)
    else:
        size = models.resolve_input_size(name, native or (224, 224), bool(stem))
    return InputPlan(classes, channels, native, tuple(size), minimum)


def model_shape(session: dict, name: str, stem: bool,
                image_size: int | None = None) -> tuple[int, int, tuple[int, int]]:
    """(classes, channels, (h, w)) the model would be built for with this session's dataset."""
    plan = input_plan(session, name, stem, image_size)
    return plan.classes, plan.channels, plan.size


def _wh(size) -> str:
    return f"{size[1]}×{size[0]}"


def size_line(plan: InputPlan, name: str, stem: bool, image_size: int | None) -> str:
    """One line: the input size the run will use and why ("fed 32×32 …" / "resized to 224×224 …")."""
    kind = "grayscale" if plan.channels == 1 else "RGB"
    low = max(plan.minimum, 8)   # the config refuses fewer than 8 pixels (core.config)
    if image_size and int(image_size) < low:
        return (f"⚠️ input size {_wh(plan.size)} is below the {low}×{low} {name} accepts"
                f"{' with the small-input stem' if stem else ''}: a run would stop before training. Set at "
                f"least {low}, or 0 for the model's own size.")
    if plan.native == plan.size:
        return f"fed {_wh(plan.size)} {kind} images (their own size)"
    seen = f"they are {_wh(plan.native)}" if plan.native else "their sizes differ"
    if image_size:
        why = "the input size set here" + (", rounded to a multiple of the patch size"
                                           if plan.size != (int(image_size),) * 2 else "")
    elif plan.native and min(plan.native) >= plan.minimum:
        why = "a multiple of the patch size"
    elif plan.native:
        why = (f"{name} needs at least {plan.minimum}×{plan.minimum}"
               f"{' even with the small-input stem' if stem else ''}")
    else:
        why = "the model's default size"
    return f"{kind} images resized to {_wh(plan.size)} ({seen}; {why})"


class ModelTab(Controller):
    """The Model tab's handlers."""

    @safe
    def describe(self, session, model_name, stem_on, size_px=0):
        spec = models.get_model_spec(model_name)
        plan = input_plan(session, model_name, stem_on, size_px)
        n = models.count_params(model_name, plan.classes, plan.channels, small_input_stem=stem_on)
        stage_names = models.list_stages(model_name)
        lines = [f"**{spec.name}** — {spec.description}",
                 f"{n:,} parameters for {plan.classes} classes · {size_line(plan, model_name, stem_on, size_px)}"]
        if spec.imagenet_params:
            lines.append(f"ImageNet version: {spec.imagenet_params:,} parameters, {spec.default_input_size} px input")
        lines.append(f"Stages: {', '.join(stage_names)}")
        status = models.pretrained_status(model_name)
        note = status.message if spec.has_pretrained else "No ImageNet weights exist for this model in torchvision."
        icon = "✅" if status.available else "⚠️"
        return ("\n\n".join(lines), f"{icon} {note}", gr.Slider(maximum=max(1, len(stage_names))),
                gr.Checkbox(interactive=True) if spec.has_pretrained else gr.Checkbox(value=False, interactive=False))

    @safe
    def layer_table(self, session, model_name, stem_on, freeze_mode, n_stages, pretrained_on, size_px=0):
        classes, channels, size = model_shape(session, model_name, stem_on, size_px)
        created = models.create_model(model_name, classes, in_channels=channels, input_size=size,
                                      small_input_stem=stem_on)
        trainable, total = models.apply_freeze(created.model, model_name, freeze_mode, int(n_stages or 0))
        table = models.layer_table(created.model, (channels, *size))
        text = (f"**{trainable:,} of {total:,} parameters trainable** ({trainable / max(total, 1):.1%}) with "
                f"freezing '{freeze_mode}'" + (f" of {int(n_stages)} stage(s)" if freeze_mode == "stages" else ""))
        if freeze_mode != "none" and not pretrained_on:
            text += ("\n\n⚠️ The frozen layers keep their random initial weights: freezing is meant for a "
                     "pretrained feature extractor (tick 'Start from ImageNet weights', or load your own .pth).")
        if created.notes:
            text += "\n\n" + "\n".join(f"- {n}" for n in created.notes)
        return text, _readable_layers(table)

    @safe
    def use_weights(self, session, upload, model_name, stem_on, size_px=0):
        if not upload:
            return "", ""
        src = Path(upload if isinstance(upload, str) else upload.name)
        digest = hashlib.sha256(src.read_bytes()).hexdigest()[:12]
        dest = self.ctx.data_dir / "weights" / f"{digest}-{src.name}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        copied = not dest.exists()
        if copied:  # keep a copy: Gradio's upload cache is not ours to rely on
            shutil.copyfile(src, dest)
        classes, channels, size = model_shape(session, model_name, stem_on, size_px)
        try:
            created = models.create_model(model_name, classes, in_channels=channels, input_size=size,
                                          small_input_stem=stem_on, weights_path=dest)
        except Exception:
            if copied:   # a refused file is not kept
                dest.unlink(missing_ok=True)
            raise
        # The page shows the file's name; only this session's uploads map to a file on the server
        # (common.config_from_widgets), so no path typed through the API reaches a file.
        session.setdefault("weights_files", {})[src.name] = str(dest)
        report = created.load_report
        lines = [f"**{src.name}** fits {model_name}: {report.summary()}."]
        lines += [f"- skipped `{k}`: file {tuple(a)} vs model {tuple(b)}" for k, a, b in report.mismatched_shapes[:8]]
        return src.name, "\n".join(lines)

    @safe
    def clear_weights(self):
        """The weights file was removed: the model starts from its own initialisation again."""
        return "", ""


def layout(ctx: AppContext) -> SimpleNamespace:
    """The tab's widgets; the model choices are bound to their RunConfig fields (the Memory tab
    reads them too: ``w.name``, ``w.stem``, ``w.freeze``, ``w.stages``, ``w.image_size``)."""
    w = SimpleNamespace()
    with gr.Row():
        with gr.Column(scale=1, min_width=320):
            _model_choices(ctx, w)
            with gr.Accordion("Your own weights (.pth)", open=False):
                w.weights_file = gr.File(label="A state_dict or checkpoint", file_types=[".pth", ".pt"],
                                         elem_id="model_weights_file")
                w.weights_path = bind(ctx, gr.Textbox("", label="Weights file used", interactive=False,
                                                      elem_id="model_weights_path"), "model.weights_path",
                                      lambda v: v or None, lambda v: Path(v).name if v else "")
                w.weights_report = gr.Markdown("")
        with gr.Column(scale=2):
            w.show = gr.Button("Show the layer table", elem_id="model_layers_btn")
            w.params = gr.Markdown("", elem_id="model_params")
            w.layers = gr.Dataframe(pd.DataFrame(columns=LAYER_COLUMNS), interactive=False, max_height=520,
                                    elem_id="model_layers")
    return w


def _model_choices(ctx: AppContext, w: SimpleNamespace) -> None:
    specs = models.list_models()
    w.name = bind(ctx, gr.Dropdown([(f"{s.name}  ({s.family})", s.name) for s in specs], value=_M.name,
                                   label="Model", elem_id="model_name"), "model.name")
    w.about = gr.Markdown("", elem_id="model_about")
    w.pretrained = bind(ctx, gr.Checkbox(_M.pretrained, label="Start from ImageNet weights (transfer learning)",
                                         elem_id="model_pretrained"), "model.pretrained")
    w.weights_note = gr.Markdown("", elem_id="model_weights_note")
    w.stem = bind(ctx, gr.Checkbox(_M.small_input_stem, label="Small-input stem (less downsampling in "
                                   "the first layers: small images stay small)",
                                   info="Without it, images are fed at their own size when the model "
                                        "accepts it, else resized to the model's default (224 px for "
                                        "ImageNet models).", elem_id="model_stem"), "model.small_input_stem")
    w.image_size = bind(ctx, gr.Number(0, label="Input size in pixels (0 = the model's own size)", minimum=0,
                                       precision=0, info="Images are resized to this square size; 224 "
                                       "gives the ImageNet-size estimate on the Memory tab.",
                                       elem_id="model_input_size"),
                        "data.image_size", none_if_empty, lambda v: v or 0)
    w.freeze = bind(ctx, gr.Radio(list(FREEZE_CHOICES), value=_M.freeze, label="Freezing",
                                  info="none: train everything · features: train only the new head · "
                                       "stages: freeze the first N stages", elem_id="model_freeze"),
                    "model.freeze")
    w.stages = bind(ctx, gr.Slider(0, 8, value=_M.freeze_stages, step=1, label="Stages to freeze",
                                   elem_id="model_stages"), "model.freeze_stages", int)
    w.init = bind(ctx, gr.Dropdown(models.INITS.names(), value=_M.init, label="Initialisation of layers "
                                   "that are not pretrained", elem_id="model_init"), "model.init")
    bind(ctx, gr.Number(0, label="Head learning rate (0 = same as the Train tab's)", minimum=0,
                        elem_id="model_head_lr"), "optim.head_lr", none_if_empty)


def describe_io(w: SimpleNamespace) -> tuple[list, list]:
    """(inputs, outputs) of ModelTab.describe."""
    return [w.name, w.stem, w.image_size], [w.about, w.weights_note, w.stages, w.pretrained]


def table_io(w: SimpleNamespace) -> tuple[list, list]:
    """(inputs, outputs) of ModelTab.layer_table, without the session."""
    return [w.name, w.stem, w.freeze, w.stages, w.pretrained, w.image_size], [w.params, w.layers]


def build(ctx: AppContext) -> ModelTab:
    tab = ModelTab(ctx)
    w = tab.w = layout(ctx)
    table_in, table_out = table_io(w)
    table_inputs = [ctx.session, *table_in]
    describe_in, describe_out = describe_io(w)
    # First: the public endpoint keeps the name "layer_table" (private events reuse the function's name).
    w.show.click(tab.layer_table, table_inputs, table_out, api_name="layer_table", concurrency_limit=4)
    # The table follows the choices: a table of another model (or freezing) than the one picked
    # would teach the wrong numbers on a projector.
    private = {"api_visibility": "private"}
    # The size box follows on blur/Enter: while "224" is typed, 2 and 22 are no input sizes to show.
    for trigger, api in ((w.name.change, {"api_name": "describe_model"}), (w.stem.change, private),
                         (w.image_size.blur, private), (w.image_size.submit, private)):
        trigger(tab.describe, [ctx.session, *describe_in], describe_out, concurrency_limit=None,
                **api).then(tab.layer_table, table_inputs, table_out, api_visibility="private",
                            show_progress_on=[w.params], concurrency_limit=4)
    for trigger in (w.freeze.change, w.stages.release, w.pretrained.change):
        trigger(tab.layer_table, table_inputs, table_out, api_visibility="private", show_progress_on=[w.params],
                concurrency_limit=4)
    w.weights_file.upload(tab.use_weights, [ctx.session, w.weights_file, w.name, w.stem, w.image_size],
                          [w.weights_path, w.weights_report], api_name="load_weights", concurrency_limit=4)
    w.weights_file.clear(tab.clear_weights, None, [w.weights_path, w.weights_report], api_visibility="private")
    ctx.shared["model"] = tab   # on_load; the Memory tab reads the model choices (tab.w)
    return tab


def _readable_layers(table: pd.DataFrame):
    """Parameter counts with thousands separators, on one line ("11,173,962" never wraps in a cell)."""
    count = lambda v: f"{int(v):,}" if pd.notna(v) else ""
    cols = [c for c in ("params", "trainable") if c in table.columns and pd.api.types.is_numeric_dtype(table[c])]
    return table.style.format({c: count for c in cols}).set_properties(subset=cols, **{"white-space": "nowrap"})


def on_load(ctx: AppContext, demo: gr.Blocks) -> None:
    tab = ctx.shared["model"]
    describe_in, describe_out = describe_io(tab.w)
    table_in, table_out = table_io(tab.w)
    demo.load(tab.describe, [ctx.session, *describe_in], describe_out, api_visibility="private")
    # The tab shows the table of what is picked when it is opened (the dataset may have changed).
    ctx.shared["tab"]["Model"].select(tab.describe, [ctx.session, *describe_in], describe_out,
                                      api_visibility="private").then(
        tab.layer_table, [ctx.session, *table_in], table_out, api_visibility="private",
        show_progress_on=[table_out[0]], concurrency_limit=4)
