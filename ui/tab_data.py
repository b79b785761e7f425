"""Data tab: pick a dataset, preview it, see its balance and sizes, split it, and build the
augmentation pipeline with a live preview on a real image. Everything is per browser session.
``DataTab`` holds the handlers, ``layout`` the widgets, ``build`` wires them."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pandas as pd
from PIL import Image

from core import builder, datasets, runs, transforms
from core.config import DataConfig
from ui import plots
from ui.common import AppContext, Controller, bind, md_text, run_history, safe

SOURCES = {  # label → core.datasets source kind
    "Embedded CIFAR-10 sample": "sample",
    "Built-in set (torchvision)": "torchvision",
    "Upload a .zip": "zip",
    "Folder on the server": "folder",
    "Index file (.txt / .csv)": "index",
}
TV_SETS = ["CIFAR10", "CIFAR100", "MNIST", "FashionMNIST"]
PREVIEW_N = 32
THUMB_MIN = 96  # tiny images (CIFAR 32 px) are scaled up with NEAREST so a projector shows pixels
AUG_PREVIEW_N = 8
# Loads a user starts (a folder or an upload can take a while to list and check) share this many
# slots, apart from every other event: a few large scans make other loads wait, not the whole page.
# The sample a new page loads is cached in the engine and has its own event (see on_load).
LOAD_SLOTS = 3
STEP_COLUMNS = ["#", "step", "parameters"]
BUILDER_COLUMNS = ["class", "images"]
SPLIT_COLUMNS = ["class", "train", "val", "test", "total"]
# The steps the pipeline editor offers (the TTA-only crops are Predict's).
AUG_STEPS = {name: info for name, info in transforms.describe_steps().items() if not info["tta_only"]}
_DATA = DataConfig()


def _thumb(img: Image.Image) -> Image.Image:
    small = min(img.size)
    if small >= THUMB_MIN:
        return img
    k = -(-THUMB_MIN // small)
    return img.resize((img.size[0] * k, img.size[1] * k), Image.NEAREST)


def _steps_table(spec: list[dict] | None) -> pd.DataFrame:
    rows = [(i + 1, s["name"], json.dumps(s.get("params", {}), ensure_ascii=False)) for i, s in enumerate(spec or [])]
    return pd.DataFrame(rows, columns=STEP_COLUMNS)


def zip_in_use(ctx: AppContext, path: Path) -> bool:
    """Whether a job or a run of the history trained (or will train) on the zip at ``path``."""
    same = lambda location: location is not None and Path(str(location)) == path   # noqa: E731
    if ctx.manager is not None and any(same(job.config.data.location) for job in ctx.manager.jobs()):
        return True
    history = run_history(ctx)
    df = history.list()
    for run_id in df.loc[df["dataset"] == path.name, "run_id"]:
        record = runs.load_run(history.run_dir(run_id))
        if record.config is not None and same(record.config.data.location):
            return True
    return False


def close_session(ctx: AppContext, session) -> None:
    """Gradio drops a page's session state (the tab was closed, an hour before): the dataset built
    in it removes its images, and the zips of it that no run trained on (``gr.State(delete_callback=)``)."""
    b = session.get("builder") if isinstance(session, dict) else None
    if b is not None:
        b.close(lambda path: zip_in_use(ctx, path))


class DataTab(Controller):
    """The Data tab's handlers. The dataset, its split and the augmentation pipeline live in the
    page's session (``ctx.session``): every browser tab has its own."""

    @safe
    def show_inputs(self, label):
        kind = SOURCES[label]
        return (gr.Dropdown(visible=kind == "torchvision"), gr.File(visible=kind == "zip"),
                gr.Textbox(visible=kind in ("folder", "index"),
                           label="Folder on the server" if kind == "folder" else "Index file on the server"))

    @safe
    def load_data(self, session, label, tv, zip_value, path_value, mode, val, test, seed, progress=gr.Progress()):
        kind = SOURCES.get(label)
        if kind is None:
            raise gr.Error(f"Unknown source {label!r}: choose one of {', '.join(SOURCES)}.")
        location = {"sample": None, "torchvision": tv, "folder": (path_value or "").strip(),
                    "index": (path_value or "").strip()}.get(kind)
        if kind == "zip":
            if not zip_value:
                raise gr.Error("Choose a .zip file to upload first.")
            # str(): Gradio hands over a gradio.utils.NamedString, which would end up in the run
            # config and make every checkpoint unreadable with torch.load(weights_only=True).
            location = str(zip_value) if isinstance(zip_value, str) else str(zip_value.name)
        if kind in ("folder", "index") and not location:
            raise gr.Error("Type the path of the folder or index file on the server.")
        progress(0.1, desc=f"Loading {label.lower()} (checking every image)…")
        return self._load_source(session, kind, location, mode, val, test, seed, progress)

    def _load_source(self, session, kind, location, mode, val, test, seed, progress):
        # Page users reach only the data roots, and no listing runs unbounded (core/paths.py).
        ds = datasets.load_dataset(kind, location, data_dir=self.ctx.data_dir, roots=self.ctx.data_roots,
                                   limits=datasets.ScanLimits())
        progress(0.7, desc="Summarising…")
        return _loaded(session, ds, kind, location, mode, val, test, seed)

    @safe
    def open_sample(self, session, mode, val, test, seed):
        """What a new page shows at once: the embedded sample, whatever the inputs say (this event
        has no concurrency limit, so it must stay cheap: the engine keeps the sample checked)."""
        ds = datasets.load_dataset("sample", data_dir=self.ctx.data_dir)
        return _loaded(session, ds, "sample", None, mode, val, test, seed)

    # ---- the dataset built in this browser (core/builder.py; kept in this session only) ----
    @safe
    def builder_add_class(self, session, name):
        b = _builder(session)
        added = b.add_class(name)
        return ("",) + _builder_view(b, added, f"Added class **{md_text(added)}**.") + (session,)

    @safe
    def builder_add_files(self, session, chosen, files):
        b = _builder(session)
        values = files if isinstance(files, list) else ([files] if files else [])
        paths = [str(f) if isinstance(f, str) else str(f.name) for f in values]
        n = b.add_images(chosen, paths)  # Gradio's cache keeps each upload's own file name
        return (None,) + _builder_view(b, chosen, f"Added {n} image(s) to **{md_text(chosen)}**.") + (session,)

    @safe
    def builder_remove(self, session, chosen):
        b = _builder(session)
        b.remove_class(chosen)
        return _builder_view(b, None, f"Removed class **{md_text(chosen)}**.")

    @safe
    def builder_use(self, session, mode, val, test, seed, progress=gr.Progress()):
        progress(0.1, desc="Packing your images…")
        location = str(_builder(session).write_zip())
        return self._load_source(session, "zip", location, mode, val, test, seed, progress)

    # ---- preview and split ----
    @safe
    def preview(self, session, mode):
        return _preview(session, mode)

    @safe
    def reshuffle_preview(self, session, mode):
        session["preview_seed"] = session.get("preview_seed", 0) + 1
        return _preview(session, mode)

    @safe
    def resplit(self, session, val, test, seed):
        return _split(session, val, test, seed)

    @safe
    def split_sliders(self, session):
        """A dataset that comes with its own val or test set keeps it: that slider does not apply."""
        ds = (session or {}).get("dataset")
        splits = getattr(ds, "splits", None) or {}
        out = []
        for name in ("val", "test"):
            if name in splits:
                out.append(gr.update(interactive=False, info=f"not used: this dataset comes with its own {name} "
                                                             f"set ({len(splits[name]):,} images)"))
            else:
                out.append(gr.update(interactive=True, info=""))
        return tuple(out)

    # ---- the augmentation pipeline ----
    @safe
    def pick_step(self, name):
        info = AUG_STEPS[name]
        return json.dumps(info["params"], ensure_ascii=False), info["doc"]

    @safe
    def show_spec(self, session, index, seed):
        return _spec_outputs(session, index, seed)

    @safe
    def edit_spec(self, session, action, name, params_text, row_value, index, seed):
        spec = [dict(s) for s in current_spec(session)]
        k = int(row_value or 1) - 1
        if action == "add":
            try:
                params = json.loads(params_text or "{}")
            except json.JSONDecodeError as err:
                raise gr.Error(f"The parameters of {name} are not valid JSON: {err}.") from None
            spec.append({"name": name, "params": params})
        elif action == "reset":
            session["train_augment"] = None
            return _spec_outputs(session, index, seed)
        elif not 0 <= k < len(spec):
            raise gr.Error(f"There is no step #{k + 1}: the pipeline has {len(spec)} step(s).")
        elif action == "remove":
            spec.pop(k)
        elif action == "up" and k > 0:
            spec[k - 1], spec[k] = spec[k], spec[k - 1]
        elif action == "down" and k < len(spec) - 1:
            spec[k + 1], spec[k] = spec[k], spec[k + 1]
        session["train_augment"] = transforms.normalize_spec(spec)  # validates every step
        return _spec_outputs(session, index, seed)

    @safe
    def apply_spec_json(self, session, text, index, seed):
        session["train_augment"] = transforms.spec_from_json(text)
        return _spec_outputs(session, index, seed)

    @safe
    def redraw(self, session, index, seed):
        return _aug_preview(session, current_spec(session), index, seed)


# ---- what the handlers show (plain functions of the session) ------------------------------------
def _builder(session) -> builder.Builder:
    if session.get("builder") is None:
        session["builder"] = builder.Builder()
    return session["builder"]


def _builder_view(b: builder.Builder, chosen, note: str):
    names = list(b.classes)
    table = pd.DataFrame(b.counts(), columns=BUILDER_COLUMNS)
    total = f"{len(names)} class(es), {b.n_images:,} image(s)."
    return (gr.update(choices=names, value=chosen if chosen in names else (names[-1] if names else None)),
            table, f"{note} {total}".strip())


def _loaded(session, ds, kind, location, mode, val, test, seed):
    session["dataset"] = ds
    session["data_source"] = {"source": kind, "location": location}
    session["preview_seed"] = 0
    return _describe(session, ds, mode, val, test, seed)


def _describe(session, ds, mode, val, test, seed):
    summary = datasets.summarize(ds)
    notes = [f"**{ds.name}** — {summary.total:,} images, {len(ds.classes)} classes, "
             f"{'grayscale' if ds.mode == 'L' else 'colour'}"]
    if ds.splits:
        notes.append("It comes with its own split: " + ", ".join(f"{k} {len(v):,}" for k, v in ds.splits.items()))
    if ds.skipped:
        notes.append(f"⚠ {len(ds.skipped)} file(s) skipped (see *Skipped files*).")
    notes += [f"⚠ {w}" for w in ds.warnings]
    return ("\n\n".join(notes), _preview(session, mode), plots.class_distribution(summary.per_class),
            summary.sizes, summary.skipped) + _split(session, val, test, seed)


def _preview(session, mode):
    ds = session.get("dataset")
    if ds is None:
        return []
    seed = session.get("preview_seed", 0)
    per_class = max(1, PREVIEW_N // len(ds.classes)) if mode == "per class" else None
    return [(_thumb(img), cap) for img, cap in datasets.preview_samples(ds, n=PREVIEW_N, per_class=per_class, seed=seed)]


def _split(session, val, test, seed):
    ds = session.get("dataset")
    if ds is None:
        return "", pd.DataFrame(columns=SPLIT_COLUMNS), plots.empty_figure("Load a dataset")
    split = datasets.split_dataset(ds, val_fraction=float(val) / 100, test_fraction=float(test) / 100, seed=int(seed))
    session["split"] = split
    table = datasets.split_table(ds, split)
    note = f"{len(split.train):,} train · {len(split.val):,} validation · {len(split.test):,} test. {split.note}"
    note += "".join(f"\n\n⚠ {w}" for w in split.warnings)
    return note, table, plots.class_distribution(table, title="Images per class and split")


def current_spec(session) -> list[dict]:
    spec = session.get("train_augment")
    if spec is not None:
        return spec
    ds = session.get("dataset")
    size = datasets.common_image_size(ds) if ds is not None else None
    side = min(size) if size else 32
    return transforms.default_train_spec(side, native_size=size)


def _spec_outputs(session, index, seed):
    spec = current_spec(session)
    custom = session.get("train_augment") is not None
    note = ("Custom pipeline (used for every model)." if custom else
            "Default pipeline shown for the images' own size; the trainer adapts it to the model's input "
            "size (e.g. resizing for 224-pixel models). Change a step to make it yours.")
    return (_steps_table(spec), json.dumps(spec, indent=1, ensure_ascii=False), note,
            _aug_preview(session, spec, index, seed))


def _aug_preview(session, spec, index, seed):
    ds = session.get("dataset")
    if ds is None or not len(ds):
        return []
    split = session.get("split")
    pool = split.train if split is not None and split.train else list(range(len(ds)))
    i = pool[int(index or 0) % len(pool)]
    image = ds.load_image(i)
    out = [(_thumb(image), f"original: {ds.classes[ds.targets[i]]}")]
    out += [(_thumb(im), f"augmented {k + 1}")
            for k, im in enumerate(transforms.augment_preview(image, spec, n=AUG_PREVIEW_N - 1, seed=int(seed or 0)))]
    return out


# ---- layout --------------------------------------------------------------------------------
def layout(ctx: AppContext) -> SimpleNamespace:
    w = SimpleNamespace()
    with gr.Row():
        with gr.Column(scale=1, min_width=320):
            _source_column(w)
            with gr.Accordion("Make your own dataset", open=False, elem_id="builder"):
                _builder_box(w)
        with gr.Column(scale=2):
            _preview_box(w)
    _summary_row(w)
    gr.Markdown("### 2. Split into train / validation / test")
    _split_section(ctx, w)
    gr.Markdown("### 3. Augmentation (training only) and normalisation")
    with gr.Row():
        with gr.Column(scale=2):
            _pipeline_editor(ctx, w)
        with gr.Column(scale=2):
            _augment_preview(w)
    return w


def _source_column(w: SimpleNamespace) -> None:
    gr.Markdown("### 1. Choose the data")
    w.source = gr.Radio(list(SOURCES), value="Embedded CIFAR-10 sample", label="Source", elem_id="data_source")
    w.tv_name = gr.Dropdown(TV_SETS, value="CIFAR10", label="Built-in set", visible=False, elem_id="data_tv")
    w.zip_file = gr.File(label="A .zip with one folder per class (optionally inside train/ val/ test/)",
                         file_types=[".zip"], visible=False, elem_id="zip_in")
    w.path = gr.Textbox(label="Path on the server", visible=False, elem_id="data_path",
                        placeholder="/data/my-images  or  /data/labels.csv")
    w.load = gr.Button("Load data", variant="primary", elem_id="data_load")
    w.info = gr.Markdown("Loading the embedded CIFAR-10 sample…", elem_id="data_info")


def _builder_box(w: SimpleNamespace) -> None:
    with gr.Row():
        w.b_name = gr.Textbox(label="New class name", max_length=builder.MAX_CLASS_NAME,
                              placeholder="e.g. cat", elem_id="builder_name", scale=3)
        w.b_add = gr.Button("Add class", elem_id="builder_add", scale=1)
    w.b_class = gr.Dropdown([], value=None, label="Class to add images to", elem_id="builder_class")
    w.b_files = gr.File(label="Drop images for this class", file_count="multiple", file_types=["image"],
                        elem_id="builder_files")
    w.b_shot = gr.Image(sources=["webcam"], type="filepath", label="Webcam shot", elem_id="builder_shot")
    with gr.Row():
        w.b_add_shot = gr.Button("Add this shot", elem_id="builder_add_shot")
        w.b_remove = gr.Button("Remove class", elem_id="builder_remove")
    w.b_counts = gr.Dataframe(pd.DataFrame(columns=BUILDER_COLUMNS), label="Your dataset",
                              interactive=False, elem_id="builder_counts")
    w.b_note = gr.Markdown("", elem_id="builder_note")
    w.b_use = gr.Button("Use this dataset", variant="primary", elem_id="builder_use")


def _preview_box(w: SimpleNamespace) -> None:
    with gr.Row():
        w.preview_mode = gr.Radio(["random", "per class"], value="per class", label="Preview",
                                  elem_id="preview_mode", scale=3)
        w.reshuffle = gr.Button("Reshuffle", scale=1, elem_id="preview_shuffle")
    # 6 columns: Gradio's gallery cells are at least 100 px wide, so 8 overflowed this ~800 px column.
    w.gallery = gr.Gallery(label="Preview", columns=6, height=360, elem_id="data_gallery", object_fit="contain",
                           allow_preview=True)


def _summary_row(w: SimpleNamespace) -> None:
    with gr.Row():
        with gr.Column(scale=3):
            w.distribution = gr.Plot(None, label="Images per class", elem_id="data_distribution")
        with gr.Column(scale=2):
            w.sizes = gr.Dataframe(pd.DataFrame(columns=["width", "height", "mode", "images"]),
                                   label="Image sizes and modes", interactive=False, elem_id="data_sizes")
            with gr.Accordion("Skipped files", open=False):
                w.skipped = gr.Dataframe(pd.DataFrame(columns=["file", "reason"]), interactive=False,
                                         elem_id="data_skipped")


def _split_section(ctx: AppContext, w: SimpleNamespace) -> None:
    with gr.Row():
        w.val_pct = bind(ctx, gr.Slider(0, 50, value=_DATA.val_fraction * 100, step=1, label="Validation %",
                                        elem_id="split_val"), "data.val_fraction", lambda v: float(v) / 100)
        w.test_pct = bind(ctx, gr.Slider(0, 50, value=_DATA.test_fraction * 100, step=1, label="Test %",
                                         elem_id="split_test"), "data.test_fraction", lambda v: float(v) / 100)
        w.split_seed = bind(ctx, gr.Number(_DATA.split_seed, label="Split seed", precision=0, elem_id="split_seed"),
                            "data.split_seed", int)
    w.split_note = gr.Markdown("", elem_id="split_note")
    with gr.Row():
        w.split_table = gr.Dataframe(pd.DataFrame(columns=SPLIT_COLUMNS), label="Images per class and split",
                                     interactive=False, elem_id="split_table")
        w.split_plot = gr.Plot(None, label="Split", elem_id="split_plot")


def _pipeline_editor(ctx: AppContext, w: SimpleNamespace) -> None:
    w.spec_table = gr.Dataframe(_steps_table([]), label="Training pipeline (applied top to bottom)",
                                interactive=False, elem_id="aug_table")
    w.aug_default = gr.Markdown("Using the default pipeline for the chosen model (crop with padding and "
                                "flip for small images, random resized crop and flip for large ones).",
                                elem_id="aug_default")
    with gr.Row():
        w.step_name = gr.Dropdown(list(AUG_STEPS), value="RandomHorizontalFlip", label="Step", elem_id="aug_step")
        w.step_params = gr.Textbox(json.dumps(AUG_STEPS["RandomHorizontalFlip"]["params"]),
                                   label="Parameters (JSON)", elem_id="aug_params")
    w.step_doc = gr.Markdown(AUG_STEPS["RandomHorizontalFlip"]["doc"])
    with gr.Row():
        w.add = gr.Button("Add step", elem_id="aug_add")
        w.row = gr.Number(1, label="Step #", precision=0, minimum=1, elem_id="aug_row")
        w.remove = gr.Button("Remove #", elem_id="aug_remove")
        w.up = gr.Button("Move # up", elem_id="aug_up")
        w.down = gr.Button("Move # down", elem_id="aug_down")
        w.reset = gr.Button("Use default", elem_id="aug_reset")
    with gr.Accordion("Edit the pipeline as JSON", open=False):
        w.spec_json = gr.Code("[]", language="json", label="Pipeline", elem_id="aug_json")
        w.apply_json = gr.Button("Apply JSON", elem_id="aug_apply")
    bind(ctx, gr.Radio(["auto", "tutorial", "imagenet", "dataset", "none"], value=_DATA.normalize,
                       label="Normalisation", elem_id="normalize",
                       info="auto: ImageNet mean/std for pretrained weights, else [-1, 1] as in the "
                            "tutorials; dataset: mean/std of the training split"), "data.normalize")


def _augment_preview(w: SimpleNamespace) -> None:
    with gr.Row():
        w.aug_index = gr.Number(0, label="Image #", precision=0, minimum=0, elem_id="aug_image")
        w.aug_seed = gr.Number(0, label="Seed", precision=0, elem_id="aug_seed")
        w.aug_refresh = gr.Button("New draws", elem_id="aug_redraw")
    w.aug_gallery = gr.Gallery(label="Augmented versions of one training image", columns=4, height=360,
                               elem_id="aug_gallery", object_fit="contain")


# ---- wiring --------------------------------------------------------------------------------
def build(ctx: AppContext) -> DataTab:
    tab = DataTab(ctx)
    w = tab.w = layout(ctx)
    _wire_loads(ctx, tab, w)
    _wire_builder(ctx, tab, w)
    _wire_preview_and_split(ctx, tab, w)
    _wire_pipeline(ctx, tab, w)
    ctx.shared["data"] = tab   # on_load
    return tab


def load_outputs(w: SimpleNamespace) -> list:
    """What every dataset load shows: the summary, preview, sizes, skipped files and the split."""
    return [w.info, w.gallery, w.distribution, w.sizes, w.skipped, w.split_note, w.split_table, w.split_plot]


def _after_load(ctx: AppContext, tab: DataTab, w: SimpleNamespace, event) -> None:
    """What follows every dataset load: the augmentation preview and the split sliders."""
    event.then(tab.show_spec, [ctx.session, w.aug_index, w.aug_seed], _spec_widgets(w), api_visibility="private")
    event.then(tab.split_sliders, ctx.session, [w.val_pct, w.test_pct], api_visibility="private",
               show_progress="hidden")


def _spec_widgets(w: SimpleNamespace) -> list:
    return [w.spec_table, w.spec_json, w.aug_default, w.aug_gallery]


def _wire_loads(ctx: AppContext, tab: DataTab, w: SimpleNamespace) -> None:
    w.source.change(tab.show_inputs, w.source, [w.tv_name, w.zip_file, w.path], api_visibility="private")
    inputs = [ctx.session, w.source, w.tv_name, w.zip_file, w.path, w.preview_mode, w.val_pct, w.test_pct,
              w.split_seed]
    slots = {"show_progress_on": [w.info], "concurrency_limit": LOAD_SLOTS, "concurrency_id": "data_load"}
    _after_load(ctx, tab, w, w.load.click(tab.load_data, inputs, load_outputs(w), api_name="load_data", **slots))
    _after_load(ctx, tab, w, w.zip_file.upload(tab.load_data, inputs, load_outputs(w), api_name="load_zip", **slots))


def _wire_builder(ctx: AppContext, tab: DataTab, w: SimpleNamespace) -> None:
    view = [w.b_class, w.b_counts, w.b_note]
    slots = {"concurrency_limit": LOAD_SLOTS, "concurrency_id": "data_load"}
    # The session is an output too: Gradio drops a State (calling close_session) only once an event
    # has set it, so a session that holds builder files is registered for that here.
    add_class = dict(fn=tab.builder_add_class, inputs=[ctx.session, w.b_name],
                     outputs=[w.b_name] + view + [ctx.session])
    w.b_add.click(**add_class, api_name="builder_add_class", concurrency_limit=None)
    w.b_name.submit(**add_class, api_visibility="private", concurrency_limit=None)
    w.b_files.upload(tab.builder_add_files, [ctx.session, w.b_class, w.b_files], [w.b_files] + view + [ctx.session],
                     api_name="builder_add_images", **slots)
    w.b_add_shot.click(tab.builder_add_files, [ctx.session, w.b_class, w.b_shot], [w.b_shot] + view + [ctx.session],
                       api_name="builder_add_shot", **slots)
    w.b_remove.click(tab.builder_remove, [ctx.session, w.b_class], view, api_name="builder_remove_class",
                     concurrency_limit=None)
    _after_load(ctx, tab, w, w.b_use.click(
        tab.builder_use, [ctx.session, w.preview_mode, w.val_pct, w.test_pct, w.split_seed], load_outputs(w),
        api_name="builder_use", show_progress_on=[w.info, w.b_note], **slots))


def _wire_preview_and_split(ctx: AppContext, tab: DataTab, w: SimpleNamespace) -> None:
    w.reshuffle.click(tab.reshuffle_preview, [ctx.session, w.preview_mode], w.gallery, api_name="reshuffle",
                      concurrency_limit=None)
    w.preview_mode.change(tab.preview, [ctx.session, w.preview_mode], w.gallery, api_visibility="private",
                          concurrency_limit=None)
    inputs, outputs = [ctx.session, w.val_pct, w.test_pct, w.split_seed], [w.split_note, w.split_table, w.split_plot]
    w.val_pct.release(tab.resplit, inputs, outputs, api_visibility="private", concurrency_limit=None)
    w.test_pct.release(tab.resplit, inputs, outputs, api_visibility="private", concurrency_limit=None)
    w.split_seed.change(tab.resplit, inputs, outputs, api_name="split", concurrency_limit=None)


def _wire_pipeline(ctx: AppContext, tab: DataTab, w: SimpleNamespace) -> None:
    w.step_name.change(tab.pick_step, w.step_name, [w.step_params, w.step_doc], api_visibility="private")
    for button, action in ((w.add, "add"), (w.remove, "remove"), (w.up, "up"), (w.down, "down"), (w.reset, "reset")):
        button.click(safe(lambda s, n, p, r, i, sd, a=action: tab.edit_spec(s, a, n, p, r, i, sd)),
                     [ctx.session, w.step_name, w.step_params, w.row, w.aug_index, w.aug_seed], _spec_widgets(w),
                     api_name=f"aug_{action}", concurrency_limit=None)
    w.apply_json.click(tab.apply_spec_json, [ctx.session, w.spec_json, w.aug_index, w.aug_seed], _spec_widgets(w),
                       api_name="aug_json", concurrency_limit=None)
    for trigger in (w.aug_refresh.click, w.aug_index.submit, w.aug_seed.submit):
        trigger(tab.redraw, [ctx.session, w.aug_index, w.aug_seed], w.aug_gallery, api_visibility="private",
                concurrency_limit=None)


def on_load(ctx: AppContext, demo: gr.Blocks) -> None:
    """Load the default (embedded sample) when a page opens, so the preview is there at once.
    A new page always has a new session, so this never replaces data a user chose."""
    tab = ctx.shared["data"]
    w = tab.w
    # Its own event without a limit: every page needs it, so it must never wait behind a user's
    # large folder scan in the "data_load" slots. It loads only the cached sample, whatever it is sent.
    _after_load(ctx, tab, w, demo.load(tab.open_sample, [ctx.session, w.preview_mode, w.val_pct, w.test_pct,
                                                         w.split_seed], load_outputs(w), api_visibility="private",
                                       show_progress_on=[w.info], concurrency_limit=None))
