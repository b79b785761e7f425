"""Prediction: a run folder or checkpoint file → top-k classes for any image.

The Predictor rebuilds the model from the checkpoint's configuration, loads its weights with
``weights_only=True`` and applies the run's own eval transform (stored in the checkpoint as data),
so an image of any size, mode or format gets exactly the preprocessing the model was trained with.
Optional test-time augmentation averages the softmax over FiveCrop or TenCrop views.
"""
from __future__ import annotations

import io
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2

from core import datasets, models, rundir, transforms
from core.checkpoints import load_checkpoint
from core.errors import DataError

TTA_CHOICES = ("none", "five", "ten")


def find_checkpoint(run_dir: str | Path) -> Path:
    """The run's best checkpoint, else its last one; DataError naming the run (its folder's name,
    not where the server keeps it) when neither exists."""
    run_dir = Path(run_dir)
    found = rundir.checkpoint(run_dir)
    if found is None:
        raise DataError(f"Run {run_dir.name} has no checkpoint ({rundir.BEST_CKPT} or {rundir.LAST_CKPT}) yet: "
                        "train it for at least one epoch, or pick another run.")
    return found


def open_image(image, mode: str) -> Image.Image:
    """Accept a PIL image, a path, bytes or an H×W(×C) uint8 array; return it converted to ``mode``."""
    limit = Image.MAX_IMAGE_PIXELS
    if isinstance(image, Image.Image):
        if limit is not None and image.size[0] * image.size[1] > limit:
            raise DataError(f"The image has {datasets.too_many_pixels(image.size[0] * image.size[1], limit)}: "
                            "shrink it and try again.")
        return datasets.convert_image(image, mode)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise DataError(f"An image array must be uint8 (got {image.dtype}).")
        return datasets.convert_image(Image.fromarray(image), mode)
    if isinstance(image, (bytes, bytearray)):
        source, label = io.BytesIO(image), "the uploaded image"
    else:
        source = os.fspath(image)
        label = Path(source).name   # the name, not where the server keeps it
        if not Path(source).is_file():
            raise DataError(f"{label} does not exist.")
    try:
        with datasets.open_image_file(source) as im:
            im.load()
            return datasets.convert_image(im, mode)
    except datasets.TooManyPixels as err:
        raise DataError(f"{label} has {err}: shrink it and try again.") from None
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError, ValueError) as err:
        # The exception's type only: Pillow's text quotes the file's full path on the server.
        raise DataError(f"{label} cannot be read as an image ({type(err).__name__}). "
                        "Use a JPEG, PNG, BMP, GIF, WebP or TIFF file.") from None


class Predictor:
    """Top-k predictions with a trained checkpoint. Thread-safe for concurrent ``predict`` calls;
    whatever puts hooks on ``model`` holds ``hooks_lock``."""

    def __init__(self, checkpoint: str | Path, device: str = "cpu"):
        self.path = Path(checkpoint)
        ckpt = load_checkpoint(self.path, map_location="cpu")
        cfg = ckpt["config"]["model"]
        self.classes: list[str] = list(ckpt["classes"])
        self.transform_state: dict = ckpt["transform"]
        self.mode: str = self.transform_state["mode"]
        c, h, w = ckpt["input_shape"]
        created = models.create_model(cfg["name"], num_classes=len(self.classes), in_channels=c,
                                      input_size=(h, w), pretrained=False, weights_path=None,
                                      small_input_stem=cfg["small_input_stem"], init="default")
        self.model = created.model
        self.model.load_state_dict(ckpt["model"])
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        self.model_name: str = cfg["name"]
        self.input_shape = (c, h, w)
        self.epoch: int = ckpt.get("epoch", 0)
        self.planned_epochs: int | None = ckpt["config"].get("epochs")   # of the run it comes from
        self.best_epoch: int | None = ckpt.get("best_epoch")
        self._eval_tf = transforms.eval_transform_from_state(self.transform_state)
        self._tta: dict[str, object] = {}
        # A run trained at the images' native size stores no resize step; an image of any other
        # size must still reach the model at its input size (shorter side, then centre crop).
        self._resizes = any(step["name"] in ("Resize", "RandomResizedCrop")
                            for step in self.transform_state["eval_spec"])
        # Held while hooks are on the model (Grad-CAM, feature maps) and around every forward pass:
        # the model is shared by every browser through PredictorCache, and a hook records whatever
        # passes through its module, another request's images included.
        self.hooks_lock = threading.RLock()

    def _fit(self, image: Image.Image) -> Image.Image:
        _, h, w = self.input_shape
        if self._resizes or image.size == (w, h):
            return image
        fit = transforms.build_transform(transforms.default_eval_spec((h, w), native_size=image.size),
                                         "none", self.mode)
        # its geometry only (a PIL image out): no tensor step, whichever form the spec ends in
        steps = [t for t in fit.transforms
                 if not isinstance(t, (v2.ToImage, v2.ToDtype, v2.Normalize, transforms.ToNormalizedTensor))]
        return v2.Compose(steps)(image)

    def model_input(self, image) -> tuple[Image.Image, torch.Tensor]:
        """(the image as the model sees it, before normalisation: resized and cropped like the
        run's eval images; its C×H×W normalised tensor). ``image``: anything ``open_image`` takes."""
        view = self._fit(open_image(image, self.mode))
        *geometry, to_tensor = self._eval_tf.transforms
        view = v2.Compose(geometry)(view)
        return view, to_tensor(view)

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "cpu") -> "Predictor":
        return cls(find_checkpoint(run_dir), device=device)

    def _tta_transform(self, kind: str):
        if kind not in self._tta:
            self._tta[kind] = transforms.tta_transform_from_state(self.transform_state, kind)
        return self._tta[kind]

    @torch.inference_mode()
    def probabilities(self, images: Sequence, tta: str = "none") -> np.ndarray:
        """Softmax probabilities (N×K) for a batch of images (any form ``open_image`` accepts)."""
        if tta not in TTA_CHOICES:
            raise DataError(f"Test-time augmentation must be one of {', '.join(TTA_CHOICES)}; got {tta!r}.")
        pil = [self._fit(open_image(im, self.mode)) for im in images]
        if tta == "none":
            x = torch.stack([self._eval_tf(im) for im in pil]).to(self.device)
            with self.hooks_lock:   # no other request's hooks see (or record) this forward pass
                return torch.softmax(self.model(x).float(), dim=1).cpu().numpy()
        tf = self._tta_transform(tta)
        views = torch.stack([tf(im) for im in pil])            # N × V × C × H × W
        n, v = views.shape[:2]
        with self.hooks_lock:
            probs = torch.softmax(self.model(views.flatten(0, 1).to(self.device)).float(), dim=1)
        return probs.view(n, v, -1).mean(1).cpu().numpy()

    def predict(self, image, topk: int = 5, tta: str = "none") -> list[tuple[str, float]]:
        """[(class, probability), ...] best first, for one image."""
        probs = self.probabilities([image], tta=tta)[0]
        order = np.argsort(-probs)[: max(1, min(topk, len(self.classes)))]
        return [(self.classes[i], float(probs[i])) for i in order]

    def predict_many(self, images: Iterable, topk: int = 5, tta: str = "none", batch_size: int = 64,
                     names: Sequence[str] | None = None) -> pd.DataFrame:
        """One row per image: name, top-1 class and probability, and the top-k list. Unreadable
        images get an 'error' entry instead of stopping the batch."""
        items = list(images)
        names = list(names) if names is not None else [str(getattr(i, "name", i)) if not isinstance(i, Image.Image)
                                                       else f"image {k}" for k, i in enumerate(items)]
        rows = []
        k = max(1, min(topk, len(self.classes)))
        for start in range(0, len(items), batch_size):
            chunk, chunk_names = items[start:start + batch_size], names[start:start + batch_size]
            good, good_names = [], []
            for item, name in zip(chunk, chunk_names):
                try:
                    good.append(item if isinstance(item, Image.Image) else open_image(item, self.mode))
                    good_names.append(name)
                except DataError as err:
                    rows.append({"image": name, "prediction": None, "probability": None, "top_k": "", "error": str(err)})
            if not good:
                continue
            probs = self.probabilities(good, tta=tta)
            for name, p in zip(good_names, probs):
                order = np.argsort(-p)[:k]
                rows.append({"image": name, "prediction": self.classes[order[0]], "probability": float(p[order[0]]),
                             "top_k": ", ".join(f"{self.classes[i]} {p[i]:.1%}" for i in order), "error": ""})
        return pd.DataFrame(rows, columns=["image", "prediction", "probability", "top_k", "error"])

    def predict_folder(self, folder: str | Path, **kwargs) -> pd.DataFrame:
        """Predict every image file under ``folder`` (recursively, sorted)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise DataError(f"{folder} is not a folder.")
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in datasets.IMAGE_EXTENSIONS
                       and not any(part.startswith(".") for part in p.relative_to(folder).parts))
        if not files:
            raise DataError(f"No image files in {folder} (looked for {', '.join(sorted(datasets.IMAGE_EXTENSIONS))}).")
        return self.predict_many(files, names=[str(p.relative_to(folder)) for p in files], **kwargs)


CACHE_SIZE = 4  # predictors kept in memory (one model each), shared by all browsers and views


class PredictorCache:
    """A few loaded models keyed by checkpoint path and modification time (a re-trained run reloads)."""

    def __init__(self, size: int = CACHE_SIZE):
        self.size = size
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: str) -> Predictor:
        p = Path(path)
        key = (str(p.resolve()), p.stat().st_mtime_ns if p.exists() else 0)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        predictor = Predictor(p)  # outside the lock: loading can take a second
        with self._lock:
            self._items[key] = predictor
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return predictor

    def for_run(self, run_dir: str | Path) -> Predictor:
        """The predictor of a run folder's best checkpoint (else its last: ``find_checkpoint``)."""
        return self.get(str(find_checkpoint(run_dir)))
