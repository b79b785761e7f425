"""Optional TensorBoard logging of training runs (needs ``pip install tensorboard``).

Each run writes its TensorBoard event file into its own run folder, so
``tensorboard --logdir runs/`` shows every run by its id. Logged: batch loss and learning rate
(per step), train/val loss and accuracy, learning rate and images/s (per epoch), test accuracy
and macro F1, the confusion matrix (a heat-map image drawn with PIL, so matplotlib is not needed,
and the same numbers as a text table),
the configuration, and a batch of input images (training images resized to the model's input
size, before augmentation).

Three ways to turn it on: for every run of a server (``launch.py --tensorboard``, which attaches
``TensorBoardLogger().attach(manager)``); for one run, by its configuration (``tensorboard: true``
in RunConfig, which ``core.trainer.fit`` honours whoever starts the run: the dashboard, the job
manager, ``python -m core.train --tensorboard``); or by hand around ``core.trainer.fit``, as an
event sink (``fit(config, on_event=TensorBoardLogger().sink(config))``).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from core import events as ev
from core.errors import ConfigError, LabError

_log = logging.getLogger(__name__)

INSTALL_HINT = "pip install tensorboard"
IMAGES = 16


def available() -> bool:
    """True when the tensorboard package (needed by torch.utils.tensorboard) is installed."""
    try:
        return importlib.util.find_spec("tensorboard") is not None
    except (ImportError, ValueError):
        return False


def require() -> None:
    if not available():
        raise ConfigError("TensorBoard logging needs the tensorboard package, which is not installed here: "
                          f"{INSTALL_HINT} (then restart the lab). Training works without it.")


class _RunLog:
    """The writer and state of one run."""

    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir))
        self.epoch = 0
        self.image_thread: threading.Thread | None = None


class TensorBoardLogger:
    """Writes TensorBoard events for runs; a JobManager listener or a per-run event sink."""

    def __init__(self, data_dir: str | Path | None = None, images: int = IMAGES):
        require()
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.images = images
        self._runs: dict[str, _RunLog] = {}
        self._lock = threading.Lock()

    # ---- wiring --------------------------------------------------------------------------
    def attach(self, manager) -> "TensorBoardLogger":
        """Log every run of ``manager`` (``launch.py --tensorboard``).

        Runs whose configuration says ``tensorboard: true`` are left out: the trainer logs those
        itself (core.trainer), and two writers in one folder would show every curve twice."""
        if self.data_dir is None:
            self.data_dir = Path(manager.data_dir)

        def listener(job, event: ev.Event) -> None:
            if not getattr(job.config, "tensorboard", False):
                self.log(job.job_id, job.config, event)
        manager.add_listener(listener)
        return self

    def sink(self, config, key: str | None = None) -> Callable[[ev.Event], None]:
        """An ``on_event`` callable for ``core.trainer.fit(config, on_event=...)``."""
        state = {"key": key}

        def on_event(event: ev.Event) -> None:
            if isinstance(event, ev.RunStarted):
                state["key"] = state["key"] or event.run_id
            if state["key"]:
                self.log(state["key"], config, event)
        return on_event

    # ---- logging -------------------------------------------------------------------------
    def log(self, key: str, config, event: ev.Event) -> None:
        """Write what ``event`` says about run ``key`` (its folder comes from RunStarted)."""
        if isinstance(event, ev.RunStarted):
            with self._lock:
                old = self._runs.pop(key, None)
                if old is not None:
                    old.writer.close()
                run = self._runs[key] = _RunLog(Path(event.run_dir))
            self._started(run, config, event)
            return
        run = self._runs.get(key)
        if run is None:
            return
        w = run.writer
        if isinstance(event, ev.BatchEnded):
            w.add_scalar("batch/loss", event.loss, event.step)
            w.add_scalar("batch/lr", event.lr, event.step)
        elif isinstance(event, ev.EpochEnded):
            run.epoch = event.epoch
            w.add_scalar("loss/train", event.train_loss, event.epoch)
            w.add_scalar("accuracy/train", event.train_accuracy, event.epoch)
            if event.val_loss is not None:
                w.add_scalar("loss/val", event.val_loss, event.epoch)
            if event.val_accuracy is not None:
                w.add_scalar("accuracy/val", event.val_accuracy, event.epoch)
            w.add_scalar("lr", event.lr, event.epoch)
            w.add_scalar("speed/images_per_sec", event.images_per_sec, event.epoch)
            w.flush()
        elif isinstance(event, ev.Evaluated):
            w.add_scalar(f"{event.split}/accuracy", event.accuracy, run.epoch)
            w.add_scalar(f"{event.split}/macro_f1", event.macro_f1, run.epoch)
            if event.top5_accuracy is not None:
                w.add_scalar(f"{event.split}/top5_accuracy", event.top5_accuracy, run.epoch)
            self._confusion(run, event)
        elif isinstance(event, ev.RunFinished):
            w.add_text("status", f"{event.status}: {event.message}", run.epoch)
            if run.image_thread is not None:
                run.image_thread.join(timeout=30)
            with self._lock:
                self._runs.pop(key, None)
            w.close()

    def close(self) -> None:
        with self._lock:
            runs, self._runs = list(self._runs.values()), {}
        for run in runs:
            run.writer.close()

    # ---- pieces --------------------------------------------------------------------------
    def _started(self, run: _RunLog, config, event: ev.RunStarted) -> None:
        run.epoch = event.start_epoch
        text = json.dumps(config.to_dict(), indent=2, ensure_ascii=False) if config is not None else "{}"
        run.writer.add_text("config", "```\n" + text + "\n```", event.start_epoch)
        if event.notes:
            run.writer.add_text("notes", "\n".join(f"- {n}" for n in event.notes), event.start_epoch)
        if config is not None and self.images > 0:
            # Reading the data again may take a moment on a big folder: not in the training thread.
            run.image_thread = threading.Thread(target=self._input_images, args=(run, config, event),
                                                daemon=True, name=f"tb-images-{event.run_id}")
            run.image_thread.start()

    def _input_images(self, run: _RunLog, config, event: ev.RunStarted) -> None:
        """The images thread: they are a nicety, so nothing here fails the run. Data that cannot be
        read again is noted in TensorBoard; anything else is a bug, logged with its traceback."""
        try:
            self._write_input_images(run, config, event)
        except (LabError, OSError, ValueError) as err:   # data moved, deleted, unreadable
            _log.warning("input images of run %s not logged: %s: %s", event.run_id, type(err).__name__, err)
            _note(run, f"input images not logged: {type(err).__name__}: {err}")
        except Exception as err:
            _log.exception("input images of run %s not logged", event.run_id)
            _note(run, f"input images not logged: {type(err).__name__}: {err} (a bug: the server log has "
                       f"its traceback)")

    def _write_input_images(self, run: _RunLog, config, event: ev.RunStarted) -> None:
        from core import datasets

        ds = datasets.load_dataset(config.data.source, config.data.location,
                                   data_dir=self.data_dir or datasets.DEFAULT_DATA_DIR, download=False)
        c, h, w = event.input_shape
        samples = datasets.preview_samples(ds, n=self.images, seed=config.seed)
        arrays = []
        for image, _ in samples:
            image = image.convert("L" if c == 1 else "RGB").resize((w, h))
            a = np.asarray(image, dtype=np.uint8)
            arrays.append(a[:, :, None] if a.ndim == 2 else a)
        if arrays:
            run.writer.add_images("inputs", np.stack(arrays), event.start_epoch, dataformats="NHWC")
            run.writer.add_text("inputs", ", ".join(caption for _, caption in samples), event.start_epoch)

    def _confusion(self, run: _RunLog, event: ev.Evaluated) -> None:
        try:
            data = json.loads(Path(event.report_path).read_text(encoding="utf-8"))
            names, cm = data["class_names"], np.asarray(data["confusion"], dtype=np.int64)
        except (OSError, ValueError, KeyError):
            return
        # Both: the image to look at, the table to read exact numbers from (or copy).
        run.writer.add_image(f"{event.split}/confusion_matrix", confusion_image(cm, names).pixels,
                             run.epoch, dataformats="HWC")
        run.writer.add_text(f"{event.split}/confusion_matrix", confusion_text(cm, names), run.epoch)


def _note(run: _RunLog, text: str) -> None:
    """``text`` under the run's "inputs" tag; when even that cannot be written (the folder is gone,
    the disk full), the server log says so."""
    try:
        run.writer.add_text("inputs", text)
    except OSError as err:
        _log.warning("%s (not written to TensorBoard either: %s)", text, err)


def confusion_text(cm: Any, names: list[str]) -> str:
    """The confusion matrix as a Markdown table (rows = true class, columns = predicted)."""
    cm = np.asarray(cm)
    head = "| true \\ predicted | " + " | ".join(names) + " |"
    sep = "|---" * (len(names) + 1) + "|"
    rows = [f"| {n} | " + " | ".join(str(int(v)) for v in cm[i]) + " |" for i, n in enumerate(names)]
    return "\n".join([head, sep, *rows])


# ---- the confusion matrix as an image ------------------------------------------------------
# Drawn with numpy and PIL's default font: matplotlib is not a dependency of the lab, and
# TensorBoard only needs pixels. Colours run from white to dark blue with the count (like
# matplotlib's "Blues"), so the darkest cell is the most frequent (true, predicted) pair.
_BLUES = np.array([[247, 251, 255], [107, 174, 214], [8, 48, 107]], dtype=np.float64)  # at 0, 0.5, 1
MAX_NAME_CHARS = 16
PAD = 6


@dataclass
class ConfusionImage:
    """The rendered matrix: ``pixels`` (H×W×3 uint8) and where the cells are, for tests and
    callers that want to point at a cell: cell (i, j) (true i, predicted j) covers
    ``x0 + j*cell ≤ x < x0 + (j+1)*cell``, ``y0 + i*cell ≤ y < y0 + (i+1)*cell``."""
    pixels: np.ndarray
    x0: int
    y0: int
    cell: int

    def cell_box(self, i: int, j: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom), right and bottom exclusive."""
        left, top = self.x0 + j * self.cell, self.y0 + i * self.cell
        return left, top, left + self.cell, top + self.cell


def _cell_size(k: int) -> int:
    """Pixels per cell: big enough for a count and a percentage up to 10 classes, shrinking with
    more classes so the image stays about 500-1,200 px wide (at least 1 px per cell)."""
    if k <= 100:
        return int(np.clip(560 // max(k, 1), 12, 48))
    return max(1, 1200 // k)


def _colours(values: np.ndarray) -> np.ndarray:
    """values in [0, 1] → RGB floats along the white → blue ramp (every channel falls with the value)."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    low = _BLUES[0] + (_BLUES[1] - _BLUES[0]) * np.clip(v * 2, 0, 1)
    high = _BLUES[1] + (_BLUES[2] - _BLUES[1]) * np.clip(v * 2 - 1, 0, 1)
    return np.where(v <= 0.5, low, high)


def _short(name: str) -> str:
    name = str(name)
    return name if len(name) <= MAX_NAME_CHARS else name[:MAX_NAME_CHARS - 2] + ".."


def confusion_image(cm: Any, names: list[str]) -> ConfusionImage:
    """Render a confusion matrix (rows = true class, columns = predicted) as a heat map.

    Each cell's colour follows its count (relative to the largest count); when the cells are big
    enough they also show the count and, below it, the share of the true class (row percent).
    Class names label both axes when a line of text fits a cell. Needs only numpy and PIL."""
    from PIL import Image, ImageDraw

    cm = np.asarray(cm, dtype=np.int64)
    names = [_short(n) for n in names]
    pen = _Pen()
    lay = _layout(pen, names, cm.shape[0])
    x0, y0, grid = lay.x0, lay.y0, lay.grid
    pixels = np.full((lay.height, lay.width, 3), 255, dtype=np.uint8)
    peak = cm.max() if cm.size and cm.max() > 0 else 1
    colours = _colours(cm / peak)
    # each count becomes a cell×cell block
    pixels[y0:y0 + grid, x0:x0 + grid] = np.round(colours).astype(np.uint8).repeat(lay.cell, 0).repeat(lay.cell, 1)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    draw.rectangle([x0 - 1, y0 - 1, x0 + grid, y0 + grid], outline=(160, 160, 160))
    draw.text((PAD, PAD), _TITLE, fill=(0, 0, 0), font=pen.font)
    _write_counts(draw, pen, cm, colours, lay)
    _label_axes(image, draw, pen, names, lay)
    return ConfusionImage(np.asarray(image, dtype=np.uint8).copy(), x0, y0, lay.cell)


_TITLE = "confusion matrix: rows true class, columns predicted; count and row %"


class _Pen:
    """PIL's default font, and the size of a text written with it."""

    def __init__(self):
        from PIL import Image, ImageDraw, ImageFont

        self.font = ImageFont.load_default()
        self._measure = ImageDraw.Draw(Image.new("L", (1, 1)))
        self.line = self.size("Ag")[1]

    def size(self, text: str) -> tuple[int, int]:
        left, top, right, bottom = self._measure.textbbox((0, 0), text, font=self.font)
        return right, bottom   # from the origin, so text drawn at (x, y) stays inside the box


@dataclass
class _Layout:
    """Where things go: the grid of ``cell``-pixel cells starts at (x0, y0) and is ``grid`` wide."""
    cell: int
    x0: int
    y0: int
    grid: int
    width: int
    height: int
    show_names: bool
    axis_h: int   # height of the rotated "true" and of the "predicted" line


def _layout(pen: _Pen, names: list[str], k: int) -> _Layout:
    cell = _cell_size(k)
    show_names = cell >= pen.line
    name_w = max((pen.size(n)[0] for n in names), default=0) if show_names else 0
    title_w, title_h = pen.size(_TITLE)
    axis_h = pen.line
    x0 = PAD + axis_h + PAD + name_w + PAD
    y0 = PAD + title_h + PAD
    grid = k * cell
    width = max(x0 + grid + PAD, PAD + title_w + PAD)
    height = y0 + grid + PAD + name_w + PAD + axis_h + PAD
    return _Layout(cell, x0, y0, grid, width, height, show_names, axis_h)


def _write_counts(draw, pen: _Pen, cm: np.ndarray, colours: np.ndarray, lay: _Layout) -> None:
    """Each cell's count (and row percent, when two lines fit), centred, where the text fits."""
    cell, line = lay.cell, pen.line
    row_sums = cm.sum(axis=1)
    two_lines = cell >= 2 * line + 4
    for i in range(cm.shape[0]):
        for j in range(cm.shape[0]):
            texts = [str(int(cm[i, j]))]
            if two_lines:
                share = cm[i, j] / row_sums[i] if row_sums[i] else 0.0
                texts.append(f"{share:.0%}")
            if not (cell >= line + 2 and all(pen.size(t)[0] <= cell - 2 for t in texts)):
                continue   # too small to write in: the colour alone tells
            dark = colours[i, j].mean() < 140   # white text on dark cells, black on light ones
            ink = (255, 255, 255) if dark else (0, 0, 0)
            left, top = lay.x0 + j * cell, lay.y0 + i * cell
            y = top + (cell - line * len(texts)) // 2
            for t in texts:
                draw.text((left + (cell - pen.size(t)[0]) // 2, y), t, fill=ink, font=pen.font)
                y += line


def _label_axes(image, draw, pen: _Pen, names: list[str], lay: _Layout) -> None:
    """Class names left of the rows and under the columns (when they fit), "predicted" under the
    grid and "true" beside it."""
    x0, y0, cell, grid = lay.x0, lay.y0, lay.cell, lay.grid
    if lay.show_names:
        for i, n in enumerate(names):   # true classes, right-aligned left of their row
            w, _ = pen.size(n)
            draw.text((x0 - PAD - w, y0 + i * cell + (cell - pen.line) // 2), n, fill=(0, 0, 0), font=pen.font)
        for j, n in enumerate(names):   # predicted classes, written upwards, ending under their column
            label = _rotated(n, pen.size(n), pen.font)
            image.paste((0, 0, 0), (x0 + j * cell + (cell - label.width) // 2, y0 + grid + PAD), label)
    predicted_w = pen.size("predicted")[0]
    draw.text((x0 + max(0, (grid - predicted_w) // 2), lay.height - PAD - lay.axis_h), "predicted",
              fill=(0, 0, 0), font=pen.font)
    true_label = _rotated("true", pen.size("true"), pen.font)
    image.paste((0, 0, 0), (PAD, y0 + max(0, (grid - true_label.height) // 2)), true_label)


def _rotated(text: str, wh: tuple[int, int], font):
    """``text`` as a mask ('L' image) turned 90° anticlockwise (it reads bottom to top)."""
    from PIL import Image, ImageDraw

    mask = Image.new("L", (max(1, wh[0]), max(1, wh[1])), 0)
    ImageDraw.Draw(mask).text((0, 0), text, fill=255, font=font)
    return mask.rotate(90, expand=True)
