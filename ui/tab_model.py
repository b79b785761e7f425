"""Model tab: the zoo with descriptions and sizes, pretrained weights (and whether they are on
disk), your own weights file, freezing, initialisation, a head learning rate and the layer table."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import gradio as gr
import pandas as pd

from core import datasets, models
from core.config import FREEZE_CHOICES, ModelConfig
from ui.common import AppContext, bind, none_if_empty, safe

_M = ModelConfig()
LAYER_COLUMNS = ["layer", "type", "output_shape", "params", "trainable"]


def model_shape(session: dict, name: str, stem: bool) -> tuple[int, int, tuple[int, int]]:
    """(classes, channels, (h, w)) the model would be built for with this session's dataset."""
    ds = session.get("dataset") if session else None
    classes = len(ds.classes) if ds is not None else 10
    channels = 1 if ds is not None and ds.mode == "L" else 3
    size = datasets.common_image_size(ds) if ds is not None else (32, 32)
    native = (size[1], size[0]) if size else (224, 224)
    return classes, channels, tuple(models.resolve_input_size(name, native, stem))


def build(ctx: AppContext) -> None:
    specs = models.list_models()
    with gr.Row():
        with gr.Column(scale=1, min_width=320):
            name = bind(ctx, gr.Dropdown([(f"{s.name}  ({s.family})", s.name) for s in specs], value=_M.name,
                                         label="Model", elem_id="model_name"), "model.name")
            about = gr.Markdown("", elem_id="model_about")
            pretrained = bind(ctx, gr.Checkbox(_M.pretrained, label="Start from ImageNet weights (transfer learning)",
                                               elem_id="model_pretrained"), "model.pretrained")
            weights_note = gr.Markdown("", elem_id="model_weights_note")
            stem = bind(ctx, gr.Checkbox(_M.small_input_stem, label="Small-input stem (keep small images small "
                                         "instead of resizing to 224)", elem_id="model_stem"), "model.small_input_stem")
            freeze = bind(ctx, gr.Radio(list(FREEZE_CHOICES), value=_M.freeze, label="Freezing",
                                        info="none: train everything · features: train only the new head · "
                                             "stages: freeze the first N stages", elem_id="model_freeze"),
                          "model.freeze")
            stages = bind(ctx, gr.Slider(0, 8, value=_M.freeze_stages, step=1, label="Stages to freeze",
                                         elem_id="model_stages"), "model.freeze_stages", int)
            init = bind(ctx, gr.Dropdown(models.INITS.names(), value=_M.init, label="Initialisation of layers "
                                         "that are not pretrained", elem_id="model_init"), "model.init")
            bind(ctx, gr.Number(0, label="Head learning rate (0 = same as the Train tab's)", minimum=0,
                                elem_id="model_head_lr"), "optim.head_lr", none_if_empty)
            with gr.Accordion("Your own weights (.pth)", open=False):
                weights_file = gr.File(label="A state_dict or checkpoint", file_types=[".pth", ".pt"],
                                       elem_id="model_weights_file")
                weights_path = bind(ctx, gr.Textbox("", label="Weights file used", interactive=False,
                                                    elem_id="model_weights_path"), "model.weights_path",
                                    lambda v: v or None, lambda v: Path(v).name if v else "")
                weights_report = gr.Markdown("")
        with gr.Column(scale=2):
            show = gr.Button("Show the layer table", elem_id="model_layers_btn")
            params = gr.Markdown("", elem_id="model_params")
            layers = gr.Dataframe(pd.DataFrame(columns=LAYER_COLUMNS), interactive=False, max_height=520,
                                  elem_id="model_layers")
    ctx.shared["model"] = {"name": name, "pretrained": pretrained, "stem": stem, "freeze": freeze,
                           "stages": stages, "init": init, "weights_path": weights_path}

    @safe
    def describe(session, model_name, stem_on):
        spec = models.get_model_spec(model_name)
        classes, channels, size = model_shape(session, model_name, stem_on)
        n = models.count_params(model_name, classes, channels, small_input_stem=stem_on)
        stage_names = models.list_stages(model_name)
        lines = [f"**{spec.name}** — {spec.description}",
                 f"{n:,} parameters for {classes} classes · fed {size[1]}×{size[0]} "
                 f"{'grayscale' if channels == 1 else 'RGB'} images"]
        if spec.imagenet_params:
            lines.append(f"ImageNet version: {spec.imagenet_params:,} parameters, {spec.default_input_size} px input")
        lines.append(f"Stages: {', '.join(stage_names)}")
        status = models.pretrained_status(model_name)
        note = status.message if spec.has_pretrained else "No ImageNet weights exist for this model in torchvision."
        icon = "✅" if status.available else "⚠️"
        return ("\n\n".join(lines), f"{icon} {note}", gr.Slider(maximum=max(1, len(stage_names))),
                gr.Checkbox(interactive=True) if spec.has_pretrained else gr.Checkbox(value=False, interactive=False))

    @safe
    def layer_table(session, model_name, stem_on, freeze_mode, n_stages, pretrained_on):
        classes, channels, size = model_shape(session, model_name, stem_on)
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
        return text, table

    @safe
    def use_weights(session, upload, model_name, stem_on):
        if not upload:
            return "", ""
        src = Path(upload if isinstance(upload, str) else upload.name)
        digest = hashlib.sha256(src.read_bytes()).hexdigest()[:12]
        dest = ctx.data_dir / "weights" / f"{digest}-{src.name}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        copied = not dest.exists()
        if copied:  # keep a copy: Gradio's upload cache is not ours to rely on
            shutil.copyfile(src, dest)
        classes, channels, size = model_shape(session, model_name, stem_on)
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

    table_inputs, table_outputs = [ctx.session, name, stem, freeze, stages, pretrained], [params, layers]
    # First: the public endpoint keeps the name "layer_table" (private events reuse the function's name).
    show.click(layer_table, table_inputs, table_outputs, api_name="layer_table", concurrency_limit=4)
    # The table follows the choices: a table of another model (or freezing) than the one picked
    # would teach the wrong numbers on a projector.
    for trigger, api in ((name.change, {"api_name": "describe_model"}), (stem.change, {"api_visibility": "private"})):
        trigger(describe, [ctx.session, name, stem], [about, weights_note, stages, pretrained], concurrency_limit=None,
                **api).then(layer_table, table_inputs, table_outputs, api_visibility="private",
                            show_progress_on=[params], concurrency_limit=4)
    for trigger in (freeze.change, stages.release, pretrained.change):
        trigger(layer_table, table_inputs, table_outputs, api_visibility="private", show_progress_on=[params],
                concurrency_limit=4)
    weights_file.upload(use_weights, [ctx.session, weights_file, name, stem], [weights_path, weights_report],
                        api_name="load_weights", concurrency_limit=4)
    weights_file.clear(lambda: ("", ""), None, [weights_path, weights_report], api_visibility="private")
    ctx.shared["model_describe"] = (describe, [ctx.session, name, stem], [about, weights_note, stages, pretrained])
    ctx.shared["model_table"] = (layer_table, table_inputs, table_outputs)


def on_load(ctx: AppContext, demo: gr.Blocks) -> None:
    describe, inputs, outputs = ctx.shared["model_describe"]
    layer_table, table_inputs, table_outputs = ctx.shared["model_table"]
    demo.load(describe, inputs, outputs, api_visibility="private")
    # The tab shows the table of what is picked when it is opened (the dataset may have changed).
    ctx.shared["tab"]["Model"].select(describe, inputs, outputs, api_visibility="private").then(
        layer_table, table_inputs, table_outputs, api_visibility="private", show_progress_on=[table_outputs[0]],
        concurrency_limit=4)
