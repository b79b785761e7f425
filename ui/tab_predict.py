"""Predict tab: drop, paste or photograph an image → top-5 classes, with a trained run or an
uploaded checkpoint; example images one click away; several images at once as a table.
``PredictTab`` holds the handlers, ``layout`` the widgets, ``build`` wires them."""
from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pandas as pd

from core import datasets, explain, rundir
from core.inference import TTA_CHOICES, Predictor, find_checkpoint
from ui.common import ASSETS, TOAST_S, AppContext, Controller, md_text, predictors, run_history, safe, who_is
from ui.tab_evaluate import follow_runs, refreshed_run_list, whose_run

EXAMPLES = sorted(str(p) for p in (ASSETS / "examples").glob("*.jpg"))
TABLE_COLUMNS = ["image", "prediction", "probability", "top_k", "error"]
TOP_CLASS = "Top class"   # the heat-map's default class: whichever the model ranks first
CAM_HELP = "Drop an image above: the heat-map shows where it made the model think of a class."


FRIENDLY_IMAGE_CLASS = "lab-friendly-image"   # elem_classes marker of the image inputs patched below


def friendly_image_errors(component: gr.Image) -> gr.Image:
    """Make an unreadable upload (a renamed text file, an HEIC photo, a truncated JPEG) give a plain
    message instead of Gradio's "Could not preprocess input component at index 0…" text.

    Gradio decodes the upload in ``Image.preprocess``, before any handler runs. Patching this one
    instance is not enough: a session that gets a new value for the component (an Examples click)
    holds a fresh instance built from its properties. So the class method is wrapped, once, and
    acts only on images that carry the marker class (``elem_classes`` survives that rebuild).
    Not a gr.Image subclass: Gradio writes a .pyi stub next to any module that defines one."""
    if not getattr(gr.Image.preprocess, "_lab_friendly", False):
        original = gr.Image.preprocess

        def preprocess(self, payload):
            if FRIENDLY_IMAGE_CLASS not in (self.elem_classes or []):
                return original(self, payload)
            name = getattr(payload, "orig_name", None) or "The uploaded file"
            try:
                if getattr(payload, "path", None):   # the header only: Gradio would decode it whole
                    datasets.open_image_file(payload.path).close()
                return original(self, payload)
            except gr.Error:
                raise
            except datasets.TooManyPixels as err:
                raise gr.Error(f"{name} has {err}: shrink it and try again.", duration=TOAST_S) from None
            except Exception as err:
                raise gr.Error(f"{name} cannot be read as an image ({type(err).__name__}). "
                               "Use a JPEG, PNG, BMP, GIF, WebP or TIFF file.", duration=TOAST_S) from None

        preprocess._lab_friendly = True
        gr.Image.preprocess = preprocess
    classes = list(component.elem_classes or [])
    if FRIENDLY_IMAGE_CLASS not in classes:
        component.elem_classes = classes + [FRIENDLY_IMAGE_CLASS]
    return component


def _trained_text(p: Predictor) -> str:
    """Which weights these are: a run's best checkpoint is the best epoch, not its last."""
    where = f" of {p.planned_epochs}" if p.planned_epochs else ""
    if p.path.name == rundir.BEST_CKPT:
        return f"the run's best weights, after epoch {p.epoch}{where} (best validation score)"
    if p.path.name == rundir.LAST_CKPT:
        return f"the run's latest weights, after epoch {p.epoch}{where}"
    return f"trained {p.epoch} epoch(s)"


class PredictTab(Controller):
    """The Predict tab's handlers, over one cache of loaded models shared by every browser."""

    def __init__(self, ctx: AppContext):
        super().__init__(ctx)
        self.cache = predictors(ctx)

    def checkpoint_path(self, source_value: str, run_id: str | None, uploaded, browser_id, request) -> str:
        """The checkpoint to use: the uploaded file, or the best one of a run this caller may see."""
        if source_value.startswith("A checkpoint"):
            if not uploaded:
                raise gr.Error(f"Upload a .pth checkpoint first (a {rundir.BEST_CKPT} or {rundir.LAST_CKPT} from a "
                               "run folder).")
            return uploaded if isinstance(uploaded, str) else uploaded.name
        if not run_id:
            raise gr.Error("No trained run yet: train one on the Train tab, or upload a checkpoint.")
        history = run_history(self.ctx)   # an id of the history that this caller may see; never a path
        history.check_access(run_id, who_is(self.ctx, request, browser_id), private=self.ctx.private_runs)
        return str(find_checkpoint(history.run_dir(run_id)))

    @safe
    def refresh_runs(self, session: dict, current: str | None, browser_id, request: gr.Request):
        # The runs with a checkpoint this caller may see (no docstring: it would be the API description).
        return refreshed_run_list(self.ctx, session, current, browser_id, request, need="checkpoint", view="predict")

    @safe
    def describe(self, source_value, run_id, uploaded, browser_id, request: gr.Request):
        if (source_value.startswith("A trained") and not run_id) or (source_value.startswith("A checkpoint") and not uploaded):
            return ""
        p = self.cache.get(self.checkpoint_path(source_value, run_id, uploaded, browser_id, request))
        c, h, w = p.input_shape
        whose = None
        if source_value.startswith("A trained"):   # checked by checkpoint_path: a run this caller may see
            whose = whose_run(run_history(self.ctx).owner(run_id)[1], who_is(self.ctx, request, browser_id))
        return ((f"_{whose}_\n\n" if whose else "")
                + f"**{p.model_name}**, {len(p.classes)} classes ({', '.join(p.classes[:12])}"
                f"{'…' if len(p.classes) > 12 else ''}); input {w}×{h} {'grayscale' if c == 1 else 'RGB'}; "
                f"{_trained_text(p)}. Images are resized and normalised as in training.")

    @safe
    def model_changed(self, source_value, run_id, uploaded, img, tta_value, browser_id, request: gr.Request):
        """Another run, source or checkpoint file: its description, and the top-5 of the image
        shown recomputed with it; the many-images table (the previous model's) is emptied. A model
        that cannot be used says why in the description, and leaves no top-5 of the previous one."""
        empty = (pd.DataFrame(columns=TABLE_COLUMNS), None)
        try:
            text = self.describe(source_value, run_id, uploaded, browser_id, request)
            top5 = self.predict(img, source_value, run_id, uploaded, tta_value, browser_id, request) if text else None
            classes = self.classes(source_value, run_id, uploaded, browser_id, request) if text else []
        except gr.Error as err:
            return (f"⚠️ {err.message}", {}) + empty + (gr.Dropdown(choices=[TOP_CLASS], value=TOP_CLASS),)
        return (text, top5 if top5 is not None else {}) + empty + (
            gr.Dropdown(choices=[TOP_CLASS, *classes], value=TOP_CLASS),)

    def classes(self, source_value, run_id, uploaded, browser_id, request) -> list[str]:
        return list(self.cache.get(self.checkpoint_path(source_value, run_id, uploaded, browser_id, request)).classes)

    @safe
    def explain(self, img, source_value, run_id, uploaded, cam_class, opacity, session: dict, browser_id,
                request: gr.Request):
        # The Grad-CAM overlay of the image for the chosen class (no docstring: it would be the API's
        # description). An opacity change re-blends the page's last heat-map: no new backward pass.
        if img is None:
            return None, CAM_HELP
        path = self.checkpoint_path(source_value, run_id, uploaded, browser_id, request)
        target = None if cam_class in (None, "", TOP_CLASS) else str(cam_class)
        p = Path(path)
        key = (str(p.resolve()), p.stat().st_mtime_ns, hashlib.sha1(img.tobytes()).hexdigest(), img.size, target)
        last = session.get("predict_cam") if isinstance(session, dict) else None
        if last is None or last["key"] != key:
            found = explain.explain_image(self.cache.get(path), img, target_class=target, opacity=0.0)
            last = {"key": key, **{k: found[k] for k in ("heatmap", "image", "class", "probability", "top", "method")}}
            if isinstance(session, dict):
                session["predict_cam"] = last
        opacity = min(max(float(opacity if opacity is not None else 0.5), 0.0), 1.0)
        return explain.overlay(last["image"], last["heatmap"], opacity), cam_note(last, target is None)

    @safe
    def predict(self, img, source_value, run_id, uploaded, tta_value, browser_id, request: gr.Request):
        if img is None:
            return None
        p = self.cache.get(self.checkpoint_path(source_value, run_id, uploaded, browser_id, request))
        return dict(p.predict(img, topk=5, tta=tta_value))

    @safe
    def predict_files(self, files, source_value, run_id, uploaded, tta_value, browser_id, request: gr.Request):
        if not files:
            return pd.DataFrame(columns=TABLE_COLUMNS), None
        p = self.cache.get(self.checkpoint_path(source_value, run_id, uploaded, browser_id, request))
        paths = [f if isinstance(f, str) else f.name for f in files]
        df = p.predict_many(paths, topk=5, tta=tta_value, names=[Path(x).name for x in paths])
        out = Path(tempfile.mkdtemp(prefix="lab-predictions-")) / "predictions.csv"
        df.to_csv(out, index=False)   # the file keeps every digit; the page shows "36.3%"
        shown = df.astype({"probability": float}).style.format({"probability": "{:.1%}"}, na_rep="")
        return shown, str(out)

    @safe
    def toggle(self, source_value):
        from_run = source_value.startswith("A trained")
        return gr.Dropdown(visible=from_run), gr.Button(visible=from_run), gr.File(visible=not from_run)


def cam_note(found: dict, top: bool) -> str:
    """What the heat-map shows, in words."""
    name = md_text(found["class"])
    rank = " — the top class" if top or found["top"][0][0] == found["class"] else ""
    if not found["heatmap"].any():
        return (f"Nothing in this image raised the score of **{name}** ({found['probability']:.0%}{rank}): "
                "the heat-map is empty. Pick another class to compare.")
    return (f"Heat-map for **{name}** ({found['probability']:.0%}{rank}). Warm colours show where the image "
            f"raised this class's score most ({found['method']}); pick another class to see what would speak "
            "for it. The heat-map uses the image as the model sees it, without test-time augmentation.")


def layout() -> SimpleNamespace:
    w = SimpleNamespace()
    with gr.Row():
        with gr.Column(scale=1, min_width=440):
            w.source = gr.Radio(["A trained run", "A checkpoint file (.pth)"], value="A trained run",
                                label="Model", elem_id="predict_source")
            # the run's label (name, id, test accuracy) needs the column's whole width to be read
            w.run = gr.Dropdown(label="Run", choices=[], elem_id="predict_run")
            w.refresh = gr.Button("Refresh the list of runs", size="sm", elem_id="predict_refresh")
            w.upload = gr.File(label="Checkpoint (.pth saved by the lab)", file_types=[".pth"], visible=False,
                               elem_id="predict_ckpt")
            w.tta = gr.Radio(list(TTA_CHOICES), value="none", label="Test-time augmentation",
                             info="average over 5 or 10 crops (slower, often a little more accurate)")
            w.info = gr.Markdown("", elem_id="predict_info")
        with gr.Column(scale=2):
            with gr.Row():
                w.image = friendly_image_errors(gr.Image(type="pil", sources=["upload", "clipboard", "webcam"],
                                                         label="Drop an image here", elem_id="predict_image",
                                                         height=300))
                w.label = gr.Label(num_top_classes=5, label="Top-5", elem_id="predict_top5")
            if EXAMPLES:
                gr.Examples(EXAMPLES, inputs=w.image, label="Example images (CIFAR-10 test images the sample does "
                            "not contain)", examples_per_page=10, elem_id="predict_examples")
            _cam_panel(w)
    with gr.Accordion("Predict many images at once", open=False):
        w.many = gr.File(file_count="multiple", file_types=["image"], label="Images", elem_id="predict_many")
        w.table = gr.Dataframe(pd.DataFrame(columns=TABLE_COLUMNS), interactive=False, elem_id="predict_table")
        w.download = gr.File(label="Predictions as CSV", interactive=False)
    return w


def _cam_panel(w: SimpleNamespace) -> None:
    """Why this class? The Grad-CAM overlay, its class and opacity, and what it shows in words."""
    gr.Markdown("### Why this class? Where the model looked", elem_id="predict_cam_title")
    with gr.Row():
        w.cam = gr.Image(None, type="pil", label="Heat-map over the image", interactive=False, format="png",
                         elem_id="predict_cam", elem_classes="lab-pixelated", height=300)
        with gr.Column():
            w.cam_class = gr.Dropdown([TOP_CLASS], value=TOP_CLASS, label="Heat-map for class",
                                      info="the top class, or any class: where would the model see it?",
                                      elem_id="predict_cam_class")
            w.cam_opacity = gr.Slider(0, 1, value=0.5, step=0.05, label="Heat-map opacity",
                                      info="0: the image alone; 1: full colour where the model looked", elem_id="predict_cam_opacity")
            w.cam_note = gr.Markdown(CAM_HELP, elem_id="predict_cam_note")


def build(ctx: AppContext) -> PredictTab:
    tab = PredictTab(ctx)
    w = tab.w = layout()
    model_inputs = [w.source, w.run, w.upload]
    w.source.change(tab.toggle, w.source, [w.run, w.refresh, w.upload], api_visibility="private")
    w.refresh.click(tab.refresh_runs, [ctx.session, w.run, ctx.browser_id], w.run, api_name="predict_runs",
                    concurrency_limit=None)
    # A change of model (the list following a new run included) leaves no output of the previous one.
    cam_inputs = [w.image, *model_inputs, w.cam_class, w.cam_opacity, ctx.session, ctx.browser_id]
    cam = {"concurrency_limit": 2, "concurrency_id": "grad_cam", "show_progress": "hidden"}
    cam_clear = {"fn": None, "inputs": None, "outputs": [w.cam, w.cam_note], "js": f"() => [null, {CAM_HELP!r}]",
                 "api_visibility": "private", "show_progress": "hidden"}
    for trigger in (w.source.change, w.run.change, w.upload.change):
        trigger(tab.model_changed, [*model_inputs, w.image, w.tta, ctx.browser_id],
                [w.info, w.label, w.table, w.download, w.cam_class], api_visibility="private",
                concurrency_limit=None, show_progress="hidden").then(
            tab.explain, cam_inputs, [w.cam, w.cam_note], api_visibility="private", **cam).failure(**cam_clear)
    w.image.change(tab.explain, cam_inputs, [w.cam, w.cam_note], api_name="predict_heatmap", **cam).failure(**cam_clear)
    w.cam_class.input(tab.explain, cam_inputs, [w.cam, w.cam_note], api_visibility="private", **cam)
    w.cam_opacity.release(tab.explain, cam_inputs, [w.cam, w.cam_note], api_visibility="private", **cam)
    # A refused image (or model) leaves no top-5 of the previous image beside it: {} is what the
    # Label gets for None from Python (null itself breaks the Label in the page).
    # (In the page itself: no round trip, and nothing an API caller could call.)
    predict_inputs = [w.image, *model_inputs, w.tta, ctx.browser_id]
    w.image.change(tab.predict, predict_inputs, w.label, api_name="predict", concurrency_limit=None).failure(
        None, None, w.label, js="() => ({})", api_visibility="private", show_progress="hidden")
    w.tta.change(tab.predict, predict_inputs, w.label, api_visibility="private", concurrency_limit=None)
    w.many.upload(tab.predict_files, [w.many, *model_inputs, w.tta, ctx.browser_id], [w.table, w.download],
                  api_name="predict_many", concurrency_limit=None)
    ctx.shared["predict"] = tab   # on_load; the Train tab's Try it
    return tab


def on_load(ctx: AppContext, demo: gr.Blocks) -> None:
    tab = ctx.shared["predict"]
    follow_runs(ctx, demo, tab.refresh_runs, tab.w.run, "Predict")
