"""Optional TensorBoard logging of training runs (needs ``pip install tensorboard``).

Each run writes its TensorBoard event file into its own run folder, so
``tensorboard --logdir runs/`` shows every run by its id. Logged: batch loss and learning rate
(per step), train/val loss and accuracy, learning rate and images/s (per epoch), test accuracy
and macro F1, the confusion matrix (a figure when matplotlib is installed, else a text table),
the configuration, and a batch of input images (training images resized to the model's input
size, before augmentation).

Use it as a JobManager listener (``TensorBoardLogger().attach(manager)``) or, around
``core.trainer.fit``, as an event sink (``fit(config, on_event=TensorBoardLogger().sink(config))``).
"""
from __future__ import annotations

import importlib.util
import json
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np

from core import events as ev
from core.errors import ConfigError

INSTALL_HINT = "pip install tensorboard"
IMAGES = 16


def available() -> bool:
    """True when the tensorboard package (needed by torch.utils.tensorboard) is installed."""
    try:
        return importlib.util.find_spec("tensorboard") is not None
    except (ImportError, ValueError):
        return False


def _matplotlib() -> bool:
    try:
        return importlib.util.find_spec("matplotlib") is not None
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
        """Log every run of ``manager``."""
        if self.data_dir is None:
            self.data_dir = Path(manager.data_dir)
        manager.add_listener(lambda job, event: self.log(job.job_id, job.config, event))
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
        try:
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
        except Exception as err:  # images are a nicety: never fail a run for them
            try:
                run.writer.add_text("inputs", f"input images not logged: {type(err).__name__}: {err}")
            except Exception:
                pass

    def _confusion(self, run: _RunLog, event: ev.Evaluated) -> None:
        try:
            data = json.loads(Path(event.report_path).read_text(encoding="utf-8"))
            names, cm = data["class_names"], np.asarray(data["confusion"], dtype=np.int64)
        except (OSError, ValueError, KeyError):
            return
        if _matplotlib():
            run.writer.add_figure(f"{event.split}/confusion_matrix", _confusion_figure(cm, names), run.epoch)
        else:
            run.writer.add_text(f"{event.split}/confusion_matrix", confusion_text(cm, names), run.epoch)


def confusion_text(cm: Any, names: list[str]) -> str:
    """The confusion matrix as a Markdown table (rows = true class, columns = predicted)."""
    cm = np.asarray(cm)
    head = "| true \\ predicted | " + " | ".join(names) + " |"
    sep = "|---" * (len(names) + 1) + "|"
    rows = [f"| {n} | " + " | ".join(str(int(v)) for v in cm[i]) + " |" for i, n in enumerate(names)]
    return "\n".join([head, sep, *rows])


def _confusion_figure(cm: np.ndarray, names: list[str]):  # pragma: no cover - needs matplotlib
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(names)
    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * k, 1 + 0.5 * k))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(k), names, rotation=45, ha="right")
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 20:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=8)
    fig.tight_layout()
    return fig
