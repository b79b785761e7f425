"""Datasets: every source becomes one ``LabDataset``.

Sources (``load_dataset(kind, ...)``, dispatched through ``SOURCES``):

* ``"sample"``      the embedded CIFAR-10 sample (assets/cifar10-sample.zip), extracted and checked once;
* ``"torchvision"`` CIFAR10, CIFAR100, MNIST, FashionMNIST through ``torchvision.datasets``
                    (downloaded when possible and the offline switch is off, else read from files
                    placed by hand);
* ``"folder"``      an ImageFolder tree (one sub-folder per class, optionally inside train/ val/ test/);
* ``"zip"``         an uploaded .zip of such a tree (or of images with an index .csv), safely extracted
                    under ``<data_dir>/uploads/``;
* ``"index"``       a .txt/.csv file of ``path,label[,split]`` lines.

Loads from the page pass ``roots`` (the server's data roots, see core/paths.py) and ``limits``
(``ScanLimits``): nothing outside the roots is read, and no listing runs unbounded.

File-backed sources check every image when they are loaded (cheaply: header plus a reduced-size
decode), so corrupt, truncated or oversized files are listed in ``ds.skipped`` instead of crashing
a training run an hour later. Images are converted to one mode per dataset ("RGB" or "L").
"""
from __future__ import annotations

import copy
import csv
import gzip
import hashlib
import math
import os
import re
import shutil
import tarfile
import tempfile
import threading
import time
import unicodedata
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from core import paths
from core.errors import ConfigError, DataError, MissingFileError
from core.offline import DOWNLOAD_PROBE_TIMEOUT_S, downloads_off, probe_network  # noqa: F401 (re-exported)
from core.registry import Registry

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = ROOT / "data"
SAMPLE_ZIP = ROOT / "assets" / "cifar10-sample.zip"
SAMPLE_FOLDER = "cifar10-sample"  # top folder inside the sample zip, and its name under data_dir
SAMPLE_NAME = "CIFAR-10 sample"

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm"}
)
# File modes whose pixels carry no colour: a dataset made only of these is loaded as "L".
GRAYSCALE_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
# Folder (and index-file) names of a predefined split → canonical split name.
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
SPLIT_ORDER = ("train", "val", "test")

# Reasons written in ds.skipped (the text after the colon gives details).
REASON_NOT_IMAGE = "not an image"
REASON_CORRUPT = "corrupt image"
REASON_TRUNCATED = "truncated image"
REASON_TOO_LARGE = "image too large"
REASON_NO_CLASS = "not inside a class folder"
REASON_NOT_FOUND = "file not found"
REASON_OUTSIDE = "outside the data folders"
# How many skipped files a failed load names in its message (the UI shows no table for a failure).
SKIPPED_IN_MESSAGE = 5

# Page loads (``limits=ScanLimits()``) stop listing a folder or an index after this many files, or
# when listing takes longer than this: pointing at /usr or a slow network mount must not hold a
# request for minutes. The time covers the listing only; checking the (at most MAX_SCAN_FILES)
# images afterwards is bounded by the count, so a large but real dataset is not refused for its
# image sizes.
MAX_SCAN_FILES = 200_000
MAX_SCAN_SECONDS = 20.0

# Non-JPEG images up to this many pixels are fully decoded at scan time (cheap for small images);
# larger ones get Pillow's structural verify() only, and load_image reports problems later.
FULL_DECODE_MAX_PIXELS = 1 << 20

# Upload limits: a zip that would unpack beyond these is refused before anything is written.
MAX_ZIP_TOTAL_BYTES = 2 * 1024**3
MAX_ZIP_ENTRIES = 200_000
MAX_COMPRESSION_RATIO = 100  # JPEG/PNG barely compress; 100:1 is zeros or text, i.e. a zip bomb
RATIO_CHECK_MIN_BYTES = 1 << 20  # a small entry cannot be a bomb whatever its ratio
# Many small entries can be a bomb together (20,000 zero files of 1 MiB − 1 deflate to ~25 MB and
# unpack to 20 GB): the same ratio applies to the whole archive once it unpacks to more than this.
ARCHIVE_RATIO_CHECK_MIN_BYTES = 16 << 20
# The largest file a torchvision set unpacks from a placed .gz (MNIST's train-images: 47 MB raw).
MAX_GZ_UNPACKED_BYTES = 256 << 20

# Torchvision sets: checked against the official MD5 sums unless turned off (custom subsets saved in
# the official on-disk format, and the test suite, use the unverified path).
VERIFY_CHECKSUMS = True


# --------------------------------------------------------------------------------------------------
# Image conversion and checking
# --------------------------------------------------------------------------------------------------

def convert_image(image: Image.Image, mode: str) -> Image.Image:
    """Convert any Pillow image to ``mode`` ("RGB" or "L").

    16-bit and 32-bit images are scaled to 8 bits (Pillow's own convert clips them to 255),
    palettes are expanded, and transparent pixels are composited on white.
    """
    if image.mode == mode:
        return image
    if image.mode.startswith("I") or image.mode == "F":
        image = _to_8bit(image)
    if image.mode in ("P", "PA") or "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image.convert(mode)


def _to_8bit(image: Image.Image) -> Image.Image:
    """I;16* (0..65535) and I (assumed 16-bit range) → L by /257; F (assumed 0..1) → L by ×255."""
    a = np.asarray(image)
    if image.mode == "F":
        out = np.clip(np.nan_to_num(a.astype(np.float64)) * 255.0 + 0.5, 0, 255)
    else:
        out = (np.clip(a.astype(np.int64), 0, 65535) * 255 + 32767) // 65535
    return Image.fromarray(out.astype(np.uint8))  # 2-D uint8 → "L"


class _Skip(Exception):
    """A file to leave out; the message is the reason shown in ``ds.skipped``."""


class TooManyPixels(DataError):
    """An image over Pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``)."""


def _amount(pixels: int) -> str:
    return f"{pixels / 1e6:,.0f} Mpx" if pixels >= 1_000_000 else f"{pixels:,} pixels"


def too_many_pixels(pixels: int, limit: int) -> str:
    """The one wording for an image over the limit, wherever an image is read (scan, training, Predict)."""
    return f"too many pixels ({_amount(pixels)}, the limit is {_amount(limit)})"


def _bomb_pixels(err: Exception) -> int | None:
    # Pillow's own refusal (above 2x the limit) gives only the count: "Image size (225000000 pixels) exceeds..."
    m = re.search(r"\((\d+) pixels\)", str(err))
    return int(m.group(1)) if m else None


def open_image_file(source) -> Image.Image:
    """``Image.open`` (lazy: reads the header only) that raises ``TooManyPixels`` for any image over
    ``Image.MAX_IMAGE_PIXELS``: Pillow itself only warns up to twice the limit and refuses with a
    message about attacks beyond it. Other errors are Pillow's. The caller closes the image."""
    limit = Image.MAX_IMAGE_PIXELS
    try:
        im = Image.open(source)
    except Image.DecompressionBombError as e:
        pixels = _bomb_pixels(e)
        raise TooManyPixels(too_many_pixels(pixels, limit) if pixels and limit else
                            f"too many pixels (the limit is {_amount(limit or 0)})") from None
    if limit is not None and im.size[0] * im.size[1] > limit:
        im.close()
        raise TooManyPixels(too_many_pixels(im.size[0] * im.size[1], limit))
    return im


def check_image(path: str | os.PathLike) -> tuple[int, int, str]:
    """Return (width, height, file mode) of an image file, or raise ``_Skip`` with the reason.

    JPEGs are decoded at 1/8 scale (reads the whole entropy stream, so truncation shows, for a
    fraction of the cost); other formats are decoded fully when small, else structurally verified.
    """
    path = os.fspath(path)
    try:
        # open_image_file refuses above 1x the limit, where Pillow only warns. (No
        # warnings.catch_warnings here: it is not thread-safe and the UI is threaded.)
        with open_image_file(path) as im:
            w, h = im.size
            mode, fmt = im.mode, im.format
            if fmt == "JPEG":
                im.draft(None, (max(1, w // 8), max(1, h // 8)))
                im.load()
            elif w * h <= FULL_DECODE_MAX_PIXELS:
                im.load()
            else:
                im.verify()
    except TooManyPixels as e:
        raise _Skip(f"{REASON_TOO_LARGE}: {e}; shrink the image") from None
    except UnidentifiedImageError:
        raise _Skip(f"{REASON_CORRUPT}: Pillow cannot identify the file as an image") from None
    except FileNotFoundError:
        raise _Skip(REASON_NOT_FOUND) from None
    except Exception as e:  # decoders raise OSError, SyntaxError, ValueError, struct.error...
        # An OSError's text carries the full path ("Permission denied: '/srv/...'"); the skipped list
        # already names the file, and the full path of an upload is the server's business.
        text = (e.strerror if isinstance(e, OSError) and e.filename and e.strerror else str(e)) or type(e).__name__
        if "truncat" in text.lower():
            raise _Skip(f"{REASON_TRUNCATED}: {text}") from None
        raise _Skip(f"{REASON_CORRUPT}: {text}") from None
    return w, h, mode


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def _nfc(name: str) -> str:
    # macOS writes decomposed (NFD) names: "é" in train/ and test/ must be one class.
    return unicodedata.normalize("NFC", name)


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


# --------------------------------------------------------------------------------------------------
# The dataset objects
# --------------------------------------------------------------------------------------------------

class LabDataset:
    """One uniform dataset whatever the source (see docs/architecture.md).

    Attributes: ``name``, ``classes``, ``targets``, ``mode``, ``splits``, ``skipped``, ``source``,
    ``warnings`` (messages for the user, e.g. a dropped empty class folder).
    """

    def __init__(self, *, name: str, classes: list[str], targets: list[int], mode: str,
                 splits: dict[str, list[int]] | None, skipped: list[tuple[str, str]] | None = None,
                 source: dict | None = None, warnings: list[str] | None = None):
        self.name = name
        self.classes = list(classes)
        self.targets = [int(t) for t in targets]
        self.mode = mode
        self.splits = splits
        self.skipped = list(skipped or [])
        self.source = dict(source or {})
        self.warnings = list(warnings or [])

    def __len__(self) -> int:
        return len(self.targets)

    def __repr__(self) -> str:
        splits = {k: len(v) for k, v in (self.splits or {}).items()}
        return (f"{type(self).__name__}(name={self.name!r}, images={len(self)}, "
                f"classes={len(self.classes)}, mode={self.mode!r}, splits={splits or None})")

    # subclasses implement these four
    def _open(self, i: int) -> Image.Image:
        raise NotImplementedError

    def describe(self, i: int) -> str:
        """Where sample ``i`` comes from: a path, or e.g. "MNIST train #12"."""
        raise NotImplementedError

    def image_path(self, i: int) -> str | None:
        """The file of sample ``i`` on disk, or None for array-backed sets."""
        raise NotImplementedError

    def image_size(self, i: int) -> tuple[int, int]:
        """(width, height) of sample ``i`` as stored (known from the scan: no decoding)."""
        raise NotImplementedError

    def image_mode(self, i: int) -> str:
        """Pillow mode of sample ``i`` as stored (before conversion to ``self.mode``)."""
        raise NotImplementedError

    def load_image(self, i: int) -> Image.Image:
        """Sample ``i`` as a PIL image in ``self.mode``."""
        return convert_image(self._open(i), self.mode)

    def class_counts(self) -> list[int]:
        """Number of images of each class, in ``classes`` order."""
        return np.bincount(np.asarray(self.targets, dtype=np.int64), minlength=len(self.classes)).tolist()

    def to_uint8_array(self, indices: Iterable[int], size: int | Sequence[int] | None = None) -> np.ndarray:
        """Images ``indices`` as one N×H×W×C uint8 array (C = 1 for "L", 3 for "RGB").

        ``size`` = (height, width) (or an int for square) resizes each image (bilinear, antialiased);
        without it every image must already have the same size.
        """
        idx = [int(i) for i in indices]
        channels = 1 if self.mode == "L" else 3
        if size is not None:
            h, w = _pair(size)
        elif idx:
            w, h = self.image_size(idx[0])
        else:
            return np.zeros((0, 0, 0, channels), dtype=np.uint8)
        out = np.empty((len(idx), h, w, channels), dtype=np.uint8)
        for k, i in enumerate(idx):
            im = self.load_image(i)
            if im.size != (w, h):
                if size is None:
                    raise DataError(
                        f"{self.describe(i)} is {im.size[0]}x{im.size[1]} but {self.describe(idx[0])} is "
                        f"{w}x{h}: images of different sizes need a target size (size=(height, width)).")
                im = im.resize((w, h), Image.BILINEAR)
            out[k] = np.asarray(im).reshape(h, w, channels)
        return out


class FileDataset(LabDataset):
    """Images stored as files (sample, folder, zip, index sources)."""

    def __init__(self, *, root: str | os.PathLike, paths: list[str], sizes: list[tuple[int, int]],
                 file_modes: list[str], **kw):
        super().__init__(**kw)
        self.root = str(root)
        self.paths = list(paths)
        self.sizes = [tuple(s) for s in sizes]
        self.file_modes = list(file_modes)

    def _open(self, i: int) -> Image.Image:
        path = self.paths[i]
        # Named as in the dataset (relative to its folder): an upload's extraction folder is not shown.
        shown = f"{self.describe(i)} of {self.name}"
        try:
            with open_image_file(path) as im:
                im.load()  # decode now: the file is closed on leaving the block
                return im
        except FileNotFoundError:
            raise DataError(f"Image {shown} no longer exists. Reload the dataset.") from None
        except TooManyPixels as e:
            raise DataError(f"Image {shown} is too large to open safely: {e}. Shrink it or remove it, "
                            "and reload the dataset.") from None
        except Exception as e:
            text = e.strerror if isinstance(e, OSError) and e.strerror else (str(e) or type(e).__name__)
            raise DataError(f"Image {shown} cannot be read ({text}): the file is corrupt or was changed after "
                            f"the dataset was loaded. Remove it and reload the dataset.") from None

    def describe(self, i: int) -> str:
        path = Path(self.paths[i])
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return str(path)

    def image_path(self, i: int) -> str | None:
        return self.paths[i]

    def image_size(self, i: int) -> tuple[int, int]:
        return self.sizes[i]

    def image_mode(self, i: int) -> str:
        return self.file_modes[i]


class ArrayDataset(LabDataset):
    """Images held in one uint8 array: N×H×W ("L") or N×H×W×C (C = 1, 3)."""

    def __init__(self, *, data: np.ndarray, split_names: Sequence[tuple[str, int]] | None = None, **kw):
        data = np.asarray(data)
        if data.dtype != np.uint8:
            raise DataError(f"Array data for {kw.get('name')!r} is {data.dtype}; uint8 images are expected.")
        if data.ndim == 4 and data.shape[3] == 1:
            data = data[..., 0]
        if not (data.ndim == 3 or (data.ndim == 4 and data.shape[3] == 3)):
            raise DataError(f"Array data for {kw.get('name')!r} has shape {data.shape}; expected N×H×W or N×H×W×3.")
        kw.setdefault("mode", "L" if data.ndim == 3 else "RGB")
        super().__init__(**kw)
        if len(data) != len(self.targets):
            raise DataError(f"{self.name}: {len(data)} images but {len(self.targets)} labels.")
        self.data = data
        # (split name, first index) in order, for describe(): "MNIST test #12"
        self._split_starts = list(split_names or [])

    def _open(self, i: int) -> Image.Image:
        return Image.fromarray(self.data[i])  # H×W uint8 → "L", H×W×3 → "RGB"

    def describe(self, i: int) -> str:
        split, start = "", 0
        for name, first in self._split_starts:
            if i >= first:
                split, start = name, first
        return f"{self.name} {split} #{i - start}" if split else f"{self.name} #{i}"

    def image_path(self, i: int) -> str | None:
        return None

    def image_size(self, i: int) -> tuple[int, int]:
        return int(self.data.shape[2]), int(self.data.shape[1])

    def image_mode(self, i: int) -> str:
        return "L" if self.data.ndim == 3 else "RGB"

    def to_uint8_array(self, indices: Iterable[int], size: int | Sequence[int] | None = None) -> np.ndarray:
        idx = np.asarray(list(indices), dtype=np.int64)
        h, w = self.data.shape[1:3]
        if size is None or _pair(size) == (h, w):
            out = self.data[idx]
            return out[..., None] if out.ndim == 3 else out
        return super().to_uint8_array(idx.tolist(), size)


def common_image_size(ds: LabDataset) -> tuple[int, int] | None:
    """(width, height) shared by every image of ``ds``, or None when sizes differ."""
    if isinstance(ds, ArrayDataset):
        return ds.image_size(0) if len(ds) else None
    sizes = {ds.image_size(i) for i in range(len(ds))}
    return sizes.pop() if len(sizes) == 1 else None


# --------------------------------------------------------------------------------------------------
# Building a file-backed dataset from (path, class, split) entries
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ScanLimits:
    """How much one load may list (see MAX_SCAN_FILES). The Data tab passes ``ScanLimits()``; the
    command line passes none, so the server's owner can still load a folder of any size."""
    max_files: int = MAX_SCAN_FILES
    max_seconds: float = MAX_SCAN_SECONDS


class _Budget:
    """Counts what a load lists and stops it at its ``ScanLimits`` (no limits: never stops)."""

    def __init__(self, limits: ScanLimits | None, what: str, unit: str, hint: str):
        self.limits, self.what, self.unit, self.hint = limits, what, unit, hint
        self.count = 0
        self.deadline = None if limits is None else time.monotonic() + limits.max_seconds

    def add(self, n: int = 1) -> None:
        if self.limits is None:
            return
        self.count += n
        if self.count > self.limits.max_files:
            raise DataError(f"{self.what} has more than {self.limits.max_files:,} {self.unit}; {self.hint}")
        if time.monotonic() >= self.deadline:
            raise DataError(f"Listing {self.what} took more than {self.limits.max_seconds:g} s "
                            f"({self.count:,} {self.unit} so far); {self.hint}")


@dataclass(frozen=True)
class _Where:
    """How messages name a scanned folder and the folders inside it: the path as given for a folder
    on the server, the upload's own name (``photos.zip``) for an archive, never its extraction folder."""
    base: Path
    shown: str

    def __call__(self, p: Path) -> str:
        try:
            rel = Path(p).relative_to(self.base).as_posix()
        except ValueError:
            return self.shown
        return self.shown if rel == "." else f"{self.shown}/{rel}"


def _skipped_inline(skipped: list[tuple[str, str]]) -> str:
    """The first few skipped files for a message: a failed load shows no skipped table."""
    shown = "; ".join(f"{f} ({r})" for f, r in skipped[:SKIPPED_IN_MESSAGE])
    more = f"; and {len(skipped) - SKIPPED_IN_MESSAGE:,} more" if len(skipped) > SKIPPED_IN_MESSAGE else ""
    return f" ({len(skipped):,} files skipped: {shown}{more})"


def _build_file_dataset(*, name: str, root: Path, where: str, class_names: Iterable[str],
                        entries: Iterable[tuple[Path, str, str | None]], skipped: list[tuple[str, str]],
                        warnings: list[str], source: dict) -> FileDataset:
    """Scan every entry, drop files that are not usable images, drop empty classes, check ≥ 2 classes."""
    root = Path(root)

    def rel(p: Path) -> str:
        try:
            return p.relative_to(root).as_posix()
        except ValueError:
            return str(p)

    good: list[tuple[str, str, str | None, int, int, str]] = []
    skipped_per_class: dict[str, int] = {}
    for path, cls, split in entries:
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            reason = REASON_NOT_IMAGE
        else:
            try:
                w, h, fmode = check_image(path)
                good.append((str(path), cls, split, w, h, fmode))
                continue
            except _Skip as s:
                reason = str(s)
        skipped.append((rel(path), reason))
        skipped_per_class[cls] = skipped_per_class.get(cls, 0) + 1

    present = {g[1] for g in good}
    classes = []
    for cls in class_names:
        if cls in present:
            classes.append(cls)
        else:
            extra = f" ({skipped_per_class[cls]} unusable files skipped)" if cls in skipped_per_class else ""
            warnings.append(f"Class '{cls}' has no usable images{extra}; it was left out.")
    if not classes:
        detail = _skipped_inline(skipped) if skipped else ""
        raise DataError(f"No usable images found in {where}{detail}. Expected one sub-folder per class "
                        f"holding image files ({', '.join(sorted(IMAGE_EXTENSIONS))}).")
    if len(classes) == 1:
        raise DataError(f"A classifier needs at least 2 classes, found 1: '{classes[0]}' in {where}. "
                        f"Add images of at least one more class (one sub-folder, or label, per class).")
    index = {c: k for k, c in enumerate(classes)}
    gray = all(g[5] in GRAYSCALE_MODES for g in good)
    splits: dict[str, list[int]] | None = None
    if any(g[2] is not None for g in good):
        splits = {}
        for i, g in enumerate(good):
            splits.setdefault(g[2] or "train", []).append(i)
        splits = {k: splits[k] for k in SPLIT_ORDER if k in splits}
    return FileDataset(
        name=name, classes=classes, targets=[index[g[1]] for g in good], mode="L" if gray else "RGB",
        splits=splits, skipped=skipped, source=source, warnings=warnings, root=root,
        paths=[g[0] for g in good], sizes=[(g[3], g[4]) for g in good], file_modes=[g[5] for g in good])


class _FolderScan:
    """One listing of an ImageFolder tree: the (file, class, split) entries, the skipped files and
    the warnings. With ``allowed`` (resolved data roots) a folder or file whose real path (symlinks
    followed) is elsewhere is skipped, and an outside folder is not even listed."""

    def __init__(self, folder: Path, where: _Where, allowed: list[str] | None, budget: _Budget):
        self.folder, self.where, self.allowed, self.budget = folder, where, allowed, budget
        self.entries: list[tuple[Path, str, str | None]] = []
        self.class_names: set[str] = set()
        self.skipped: list[tuple[str, str]] = []
        self.warnings: list[str] = []

    def ok(self, p: Path) -> bool:
        return self.allowed is None or paths.is_inside(os.path.realpath(p), self.allowed)

    def visible(self, folder: Path) -> tuple[list[Path], list[Path]]:
        """Sorted (sub-folders, files) of ``folder``, hidden entries and __MACOSX left out."""
        dirs, files = [], []
        for p in sorted(folder.iterdir(), key=lambda p: p.name):
            self.budget.add()
            if _is_hidden(p.name) or (self.allowed is not None and paths.is_hidden(os.path.realpath(p), self.allowed)):
                continue
            (dirs if p.is_dir() else files).append(p)
        return dirs, files

    def class_files(self, folder: Path) -> list[Path]:
        """Every visible file below a class folder (nested folders included; os.walk does not
        follow links to folders), sorted."""
        out = []
        for dirpath, dirnames, filenames in os.walk(folder):
            self.budget.add(len(dirnames) + len(filenames))
            dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
            out.extend(Path(dirpath) / f for f in sorted(filenames) if not _is_hidden(f))
        return out

    def refuse(self, p: Path, is_dir: bool = False) -> None:
        self.skipped.append((p.relative_to(self.folder).as_posix() + ("/" if is_dir else ""), REASON_OUTSIDE))

    def add_group(self, split: str | None, top: Path) -> None:
        """The class folders directly in ``top`` (the tree itself, or its train/ val/ test/)."""
        class_dirs, loose = self.visible(top)
        loose_images = [f for f in loose if f.suffix.lower() in IMAGE_EXTENSIONS]
        for f in loose_images:
            self.skipped.append((f.relative_to(self.folder).as_posix(), REASON_NO_CLASS))
        if loose_images:
            self.warnings.append(f"{len(loose_images)} images directly in {self.where(top)} are not inside a "
                                 f"class folder and were left out.")
        for d in class_dirs:
            if not self.ok(d):
                self.refuse(d, is_dir=True)
                continue
            cls = _nfc(d.name)
            self.class_names.add(cls)
            for f in self.class_files(d):
                if self.ok(f):
                    self.entries.append((f, cls, split))
                else:
                    self.refuse(f)


def _unwrap(scan: _FolderScan, folder: Path) -> Path:
    """Step into single wrapper folders (a zip of ``mydata/<class>/...``)."""
    for _ in range(4):
        dirs, files = scan.visible(folder)
        has_images = any(f.suffix.lower() in IMAGE_EXTENSIONS for f in files)
        if (len(dirs) == 1 and not has_images and dirs[0].name.lower() not in SPLIT_ALIASES
                and scan.ok(dirs[0]) and scan.visible(dirs[0])[0]):
            folder = dirs[0]
        else:
            break
    return folder


def _split_groups(scan: _FolderScan, folder: Path) -> list[tuple[str | None, Path]]:
    """(split, folder) pairs: train/ val|valid|validation/ test/ when present, else the folder itself."""
    dirs, _ = scan.visible(folder)
    split_dirs = [d for d in dirs if d.name.lower() in SPLIT_ALIASES]
    if not split_dirs:
        return [(None, folder)]
    others = [d.name for d in dirs if d.name.lower() not in SPLIT_ALIASES]
    if others:
        raise DataError(
            f"Folder {scan.where(folder)} mixes split folders ({', '.join(d.name for d in split_dirs)}) with "
            f"other folders ({', '.join(others)}). Put every class folder inside train/, val/ and test/, or "
            f"use no split folders at all.")
    for d in split_dirs:
        if not scan.ok(d):
            scan.refuse(d, is_dir=True)
    return sorted(((SPLIT_ALIASES[d.name.lower()], d) for d in split_dirs if scan.ok(d)),
                  key=lambda g: (SPLIT_ORDER.index(g[0]), g[1].name))


def _load_folder_tree(folder: Path, *, name: str, source: dict, label: str | None = None,
                      allowed: list[str] | None = None, limits: ScanLimits | None = None) -> FileDataset:
    """ImageFolder layout, optionally split into train/ val|valid|validation/ test/ first.

    ``label`` names ``folder`` in messages (default: its path); ``allowed`` (resolved data roots)
    keeps the scan inside them; ``limits`` bounds the listing (``ScanLimits``)."""
    where = _Where(folder, label or str(folder))
    if not folder.is_dir():
        raise DataError(f"Folder {where.shown} does not exist or is not a folder. Give the path of a folder "
                        f"that holds one sub-folder per class.")
    scan = _FolderScan(folder, where, allowed,
                       _Budget(limits, where.shown, "files", "point at a smaller folder or use an index file."))
    scan.folder = folder = _unwrap(scan, folder)
    for split, top in _split_groups(scan, folder):
        scan.add_group(split, top)
    if not scan.class_names:
        shown = where(folder)
        detail = _skipped_inline(scan.skipped) if scan.skipped else ""
        raise DataError(f"Folder {shown} has no class sub-folders{detail}. Expected {shown}/<class>/<image> "
                        f"(or {shown}/train/<class>/<image>), e.g. cats/001.jpg and dogs/001.jpg.")
    return _build_file_dataset(name=name, root=folder, where=where(folder), class_names=sorted(scan.class_names),
                               entries=scan.entries, skipped=scan.skipped, warnings=scan.warnings, source=source)


# --------------------------------------------------------------------------------------------------
# Zip archives
# --------------------------------------------------------------------------------------------------

def _zip_parts(name: str, label: str) -> list[str] | None:
    """Path components of a zip entry; None for entries to ignore; DataError for unsafe ones."""
    n = name.replace("\\", "/")
    if n.startswith("/") or re.match(r"^[A-Za-z]:", n):
        raise DataError(f"Archive {label} has an entry with an absolute path ({name!r}); it could write outside "
                        f"the upload folder, so the archive was rejected. Zip the dataset folder with relative paths.")
    parts = [p for p in n.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise DataError(f"Archive {label} has an entry that points outside the archive ({name!r}, a 'zip slip'); "
                        f"the archive was rejected. Re-create the zip from inside the dataset folder.")
    if not parts or n.endswith("/") or any(_is_hidden(p) for p in parts):
        return None
    return parts


def check_zip(zf: zipfile.ZipFile, label: str) -> list[tuple[zipfile.ZipInfo, list[str]]]:
    """Validate every entry of an open archive; return the (entry, path parts) to extract."""
    infos = zf.infolist()
    if len(infos) > MAX_ZIP_ENTRIES:
        raise DataError(f"Archive {label} has {len(infos):,} entries, more than the limit of {MAX_ZIP_ENTRIES:,}. "
                        f"Upload a smaller dataset, or unzip it yourself and load the folder.")
    members, total, packed = [], 0, 0
    for info in infos:
        parts = _zip_parts(info.filename, label)
        if stat_is_link(info):
            raise DataError(f"Archive {label} contains a symbolic link ({info.filename!r}); links are not allowed "
                            f"in uploads. Zip the real files instead.")
        if parts is None or info.is_dir():
            continue
        if info.flag_bits & 0x1:
            raise DataError(f"Archive {label} is password-protected ({info.filename!r}). Upload an unencrypted zip.")
        if (info.file_size >= RATIO_CHECK_MIN_BYTES
                and info.file_size > MAX_COMPRESSION_RATIO * max(info.compress_size, 1)):
            ratio = info.file_size / max(info.compress_size, 1)
            raise DataError(
                f"Archive {label}: entry {info.filename!r} expands {ratio:,.0f}:1 ({info.compress_size:,} → "
                f"{info.file_size:,} bytes), above the {MAX_COMPRESSION_RATIO}:1 limit; it looks like a zip bomb "
                f"and the archive was rejected. Images do not compress like that: check the archive.")
        total += info.file_size
        packed += info.compress_size
        members.append((info, parts))
    if total >= ARCHIVE_RATIO_CHECK_MIN_BYTES and total > MAX_COMPRESSION_RATIO * max(packed, 1):
        raise DataError(
            f"Archive {label} expands {total / max(packed, 1):,.0f}:1 in all ({packed:,} → {total:,} bytes over "
            f"{len(members):,} files), above the {MAX_COMPRESSION_RATIO}:1 limit; it looks like a zip bomb and the "
            f"archive was rejected. Images do not compress like that: check the archive.")
    if total > MAX_ZIP_TOTAL_BYTES:
        raise DataError(f"Archive {label} would unpack to {total / 1e9:,.2f} GB, more than the limit of "
                        f"{MAX_ZIP_TOTAL_BYTES / 1e9:,.2f} GB. Upload a smaller dataset, or unzip it yourself "
                        f"and load the folder.")
    if not members:
        raise DataError(f"Archive {label} contains no files (hidden files and __MACOSX/ are ignored).")
    return members


def stat_is_link(info: zipfile.ZipInfo) -> bool:
    """True when a zip entry is a Unix symbolic link (mode bits in the high word of external_attr)."""
    return (info.external_attr >> 16) & 0o170000 == 0o120000


def _zip_folders(zf: zipfile.ZipFile, label: str) -> list[list[str]]:
    """Path parts of the archive's folder entries: an empty class folder must be extracted too, so
    the load warns about it as it does for a folder on the server instead of silently dropping it."""
    out = []
    for info in zf.infolist():
        if info.is_dir() and not stat_is_link(info):
            parts = _zip_parts(info.filename.replace("\\", "/").rstrip("/"), label)
            if parts:
                out.append(parts)
    return out


def _write_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, label: str) -> None:
    """Copy one entry, refusing it as soon as it grows past the size its header declares."""
    target.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with zf.open(info) as src, open(target, "wb") as out:
        while chunk := src.read(1 << 20):
            written += len(chunk)
            if written > info.file_size:  # the header lied about the size
                raise DataError(f"Archive {label}: entry {info.filename!r} is larger than it declares; "
                                f"the archive was rejected.")
            out.write(chunk)


def safe_extract(zip_path: str | os.PathLike, dest: str | os.PathLike, label: str | None = None) -> None:
    """Extract a zip into ``dest`` after ``check_zip``; each entry is bounded by its declared size.
    ``label`` names the archive in messages (default: its file name, an upload's original name)."""
    zip_path, dest = Path(zip_path), Path(dest)
    label = label or zip_path.name
    try:
        with zipfile.ZipFile(zip_path) as zf:
            members = check_zip(zf, label)
            free = shutil.disk_usage(dest).free
            need = sum(i.file_size for i, _ in members)
            if need > free:
                raise DataError(f"Archive {label} needs {need / 1e9:.2f} GB but only {free / 1e9:.2f} GB is free "
                                f"on the server. Ask the teacher to free some disk space, or upload less.")
            root = dest.resolve()
            for parts in _zip_folders(zf, label):
                dest.joinpath(*parts).mkdir(parents=True, exist_ok=True)
            for info, parts in members:
                target = dest.joinpath(*parts)
                if root not in target.resolve().parents:  # belt and braces after _zip_parts
                    raise DataError(f"Archive {label}: entry {info.filename!r} escapes the upload folder; rejected.")
                _write_entry(zf, info, target, label)
    except zipfile.BadZipFile as e:
        raise DataError(f"{label} is not a valid zip archive ({e}). Re-create it with a zip tool.") from None
    except zipfile.LargeZipFile as e:
        raise DataError(f"Archive {label} is too large ({e}).") from None


def _extract_once(zip_path: Path, dest: Path, inner: str | None = None) -> Path:
    """Extract ``zip_path`` to ``dest`` atomically: into a temporary folder beside it, then one rename.

    Another process (or user) never sees a half-extracted folder; whoever renames first wins and the
    others reuse its result. ``inner`` picks one top-level folder of the archive as ``dest``.
    """
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-partial-", dir=dest.parent))
    try:
        safe_extract(zip_path, tmp)
        src = tmp / inner if inner else tmp
        if not src.is_dir():
            raise DataError(f"Archive {zip_path.name} has no top-level folder {inner}/.")
        try:
            os.rename(src, dest)
        except OSError:
            if not dest.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _file_hash(path: Path, length: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()[:length]


# --------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------

SOURCES: Registry[Callable[..., LabDataset]] = Registry("dataset source")
# Every loader takes (location, data_dir, download, roots=None, limits=None). ``roots`` (the page's
# data roots; None = the command line, any path) confines what a path may reach; ``limits`` bounds
# the listing (ScanLimits). See load_dataset.

# The embedded sample, checked once per data folder: a class opening the page together would
# otherwise decode its 6,000 images once per student. Keyed by (sample folder, source); the folder's
# mtime tells a re-extracted sample from the one in the cache.
_SAMPLE_CACHE: dict[tuple[str, str], tuple[int, LabDataset]] = {}
_SAMPLE_LOCK = threading.Lock()


def _copy_dataset(ds: LabDataset) -> LabDataset:
    """A copy whose lists and dicts one session may change without touching the cached original."""
    clone = copy.copy(ds)
    for key, value in vars(ds).items():
        if isinstance(value, list):
            setattr(clone, key, list(value))
        elif isinstance(value, dict):
            setattr(clone, key, {k: list(v) if isinstance(v, list) else v for k, v in value.items()})
    return clone


@SOURCES.register("sample")
def _load_sample(location: str | None, data_dir: Path, download: bool, roots=None, limits=None) -> LabDataset:
    folder = data_dir / SAMPLE_FOLDER
    with _SAMPLE_LOCK:  # the first of many simultaneous loads extracts and checks; the others wait for it
        if not folder.is_dir():
            if not SAMPLE_ZIP.is_file():
                raise MissingFileError(f"The embedded sample {SAMPLE_ZIP.name} is missing from {SAMPLE_ZIP.parent}. "
                                       f"Restore it from the repository (git checkout assets/).",
                                       files=[SAMPLE_ZIP.name], folder=str(SAMPLE_ZIP.parent))
            _extract_once(SAMPLE_ZIP, folder, inner=SAMPLE_FOLDER)
        key, stamp = (os.path.realpath(folder), "sample"), folder.stat().st_mtime_ns
        hit = _SAMPLE_CACHE.get(key)
        if hit is None or hit[0] != stamp:
            hit = _SAMPLE_CACHE[key] = (stamp, _load_folder_tree(folder, name=SAMPLE_NAME, source={"kind": "sample"}))
    return _copy_dataset(hit[1])


@SOURCES.register("folder")
def _load_folder(location: str | None, data_dir: Path, download: bool, roots=None, limits=None) -> LabDataset:
    if not location:
        raise DataError("No folder given. Enter the path of a folder with one sub-folder per class.")
    folder = Path(location).expanduser()
    allowed = None
    if roots is not None:
        allowed = paths.page_reach(roots, data_dir)
        paths.resolve_inside(location, roots, allowed)  # before any look at the disk: nothing outside is probed
    return _load_folder_tree(folder, name=folder.name or str(folder), allowed=allowed, limits=limits,
                             source={"kind": "folder", "location": str(folder.resolve())})


@SOURCES.register("zip")
def _load_zip(location: str | None, data_dir: Path, download: bool, roots=None, limits=None) -> LabDataset:
    """An uploaded archive, extracted under <data_dir>/uploads/<content hash>/. Messages name it by
    its own file name (an upload keeps its original name), never the extraction folder; what it holds
    (class folders, or an index file) may reach nothing outside it, whoever loads it."""
    if not location:
        raise DataError("No zip file given. Upload a .zip of a folder with one sub-folder per class.")
    path = Path(location).expanduser()
    label = path.name
    if not path.is_file():
        raise DataError(f"Zip file {label} does not exist (any more). Upload it again.")
    if not zipfile.is_zipfile(path):
        raise DataError(f"{label} is not a zip archive. Upload a .zip of a folder with one sub-folder per class.")
    dest = _extract_once(path, data_dir / "uploads" / _file_hash(path))
    source = {"kind": "zip", "location": str(path.resolve()), "extracted": str(dest)}
    return _load_extracted(dest, label=label, name=path.stem, source=source, limits=limits)


def _load_extracted(dest: Path, *, label: str, name: str, source: dict, limits: ScanLimits | None) -> LabDataset:
    """An extracted upload: an index .csv inside it if it has one, else its class folders."""
    inside = paths.real_roots([dest])
    index = _zip_index(dest)
    if index is not None:
        return _load_index_file(index, name=name, label=f"{label}/{index.relative_to(dest).as_posix()}",
                                allowed=inside, outside="outside the archive", limits=limits, source=source)
    return _load_folder_tree(dest, name=name, source=source, label=label, allowed=inside, limits=limits)


# ---- index files -----------------------------------------------------------------------------------

_PATH_HEADERS = {"path", "file", "filename", "file_name", "filepath", "image", "image_path", "img", "name"}
_LABEL_HEADERS = {"label", "class", "target", "category", "class_name", "y"}
_SPLIT_HEADERS = {"split", "subset", "set", "fold", "partition"}


def _is_index_header(fields: Sequence[str]) -> bool:
    low = [f.strip().lower() for f in fields]
    return any(f in _LABEL_HEADERS for f in low) and any(f in _PATH_HEADERS for f in low)


def _zip_index(folder: Path) -> Path | None:
    """The index file of an archive that has one: the one .csv at its top (or inside single wrapper
    folders) whose header names a path and a label column. Other .csv files (notes, metadata beside
    class folders) are not taken for an index."""
    for _ in range(5):
        dirs, files = [], []
        for p in sorted(folder.iterdir(), key=lambda p: p.name):
            if not _is_hidden(p.name):
                (dirs if p.is_dir() else files).append(p)
        found = []
        for f in files:
            if f.suffix.lower() == ".csv":
                with open(f, encoding="utf-8-sig", errors="replace") as fh:
                    if _is_index_header(next(csv.reader([fh.readline(1 << 16)]), [])):
                        found.append(f)
        if len(found) == 1:
            return found[0]
        if len(dirs) != 1 or files:
            return None
        folder = dirs[0]
    return None


def _index_rows(path: Path, label: str, budget: _Budget) -> list[tuple[int, list[str]]]:
    """(line number, fields) of every data line; comments and blank lines dropped."""
    rows = []
    try:
        with open(path, encoding="utf-8-sig") as f:
            for no, line in enumerate(f, 1):
                s = line.strip()
                if not s or s.startswith("#"):
                    continue
                budget.add()
                if "," in s:
                    fields = next(csv.reader([s]))
                elif "\t" in s:
                    fields = s.split("\t")
                else:
                    fields = s.split()
                    # "my file.jpg cat" → the path may contain spaces: the label (and split) are the last tokens
                    if len(fields) > 2:
                        n_tail = 2 if fields[-1].lower() in SPLIT_ALIASES else 1
                        fields = s.rsplit(None, n_tail)
                rows.append((no, [f.strip() for f in fields]))
    except UnicodeDecodeError:
        # no detail from the decoder: it would quote the file's bytes
        raise DataError(f"Index file {label} is not UTF-8 text. Save it as UTF-8.") from None
    return rows


def _index_columns(rows: list[tuple[int, list[str]]]) -> tuple[dict, list[tuple[int, list[str]]]]:
    """Which field is the path, the label and the split: from a header line when there is one
    (dropped from the rows), else path,label[,split]."""
    cols = {"path": 0, "label": 1, "split": None}
    first = [f.lower() for f in rows[0][1]]
    if _is_index_header(first):
        for k, f in enumerate(first):
            if f in _PATH_HEADERS:
                cols["path"] = k
            elif f in _LABEL_HEADERS:
                cols["label"] = k
            elif f in _SPLIT_HEADERS:
                cols["split"] = k
        return cols, rows[1:]
    if len(rows[0][1]) >= 3:
        cols["split"] = 2
    return cols, rows


def _index_items(rows, cols: dict, base: Path, label: str) -> list[tuple[int, str, Path, str, str | None]]:
    """(line, path as written, path, label, split) of each row. Messages say what is wrong with a
    line without quoting it: the file may be anything (/etc/passwd copied under a data root)."""
    items = []
    need = max(c for c in cols.values() if c is not None) + 1
    expected = "path,label,split" if cols["split"] is not None else "path,label"
    for no, fields in rows:
        if len(fields) < need or not fields[cols["path"]] or not fields[cols["label"]]:
            raise DataError(f"Index file {label}, line {no}: expected '{expected}' but that line has "
                            f"{len(fields)} field(s){' with an empty one' if len(fields) >= need else ''}. "
                            f"Fix or remove that line.")
        split = None
        if cols["split"] is not None:
            raw = fields[cols["split"]].lower()
            if raw not in SPLIT_ALIASES:
                raise DataError(f"Index file {label}, line {no}: the split field is not one of train, val, "
                                f"valid, validation, test.")
            split = SPLIT_ALIASES[raw]
        written = fields[cols["path"]]
        p = Path(written.replace("\\", "/") if os.sep == "/" else written)  # Windows-made index
        items.append((no, written, p if p.is_absolute() else base / p, _nfc(fields[cols["label"]]), split))
    return items


def _index_classes(items) -> tuple[dict[str, str], list[str]]:
    """(label as written → class name, class names in order)."""
    labels = {it[3] for it in items}
    if all(re.fullmatch(r"[+-]?\d+", lab) for lab in labels):
        # integer labels: ordered numerically so "10" comes after "9", and stored as canonical "7" not "07"
        norm = {lab: str(int(lab)) for lab in labels}
        return norm, sorted(set(norm.values()), key=int)
    return {lab: lab for lab in labels}, sorted(labels)


def _index_entries(items, norm: dict[str, str], label: str, allowed: list[str] | None, outside: str,
                   budget: _Budget) -> tuple[list[tuple[Path, str, str | None]], list[tuple[str, str]]]:
    """The rows that name a file (inside ``allowed``, symlinks followed, when given), and the others
    as skipped (path as written, reason with its line). A path outside gets the same reason whether
    it exists or not. When no row names a file the load fails without listing them: the file is then
    no index at all, and its lines are not for the page to show."""
    entries, skipped, n_out = [], [], 0
    for no, written, p, lab, split in items:
        budget.add(0)  # the time limit: resolving rows on a slow mount
        if allowed is not None and not paths.is_inside(os.path.realpath(p), allowed):
            skipped.append((written, f"{outside} (line {no})"))
            n_out += 1
        elif not p.is_file():
            skipped.append((written, f"{REASON_NOT_FOUND} (line {no})"))
        else:
            entries.append((p, norm[lab], split))
    if not entries:
        raise DataError(f"Index file {label}: none of its {len(items):,} lines names an image file that can be "
                        f"read ({n_out:,} {outside}, {len(items) - n_out:,} not found). Write one 'path,label' "
                        f"line per image, the path relative to the index file's folder.")
    return entries, skipped


def _load_index_file(index: Path, *, name: str, label: str, source: dict, allowed: list[str] | None = None,
                     outside: str = REASON_OUTSIDE, limits: ScanLimits | None = None) -> FileDataset:
    """An index file's rows as a dataset. ``label`` names the file in messages; with ``allowed``
    (resolved folders) a row whose file is elsewhere is skipped as ``outside``."""
    budget = _Budget(limits, f"Index file {label}", "lines", "split it into smaller index files.")
    rows = _index_rows(index, label, budget)
    if not rows:
        raise DataError(f"Index file {label} has no data lines. Write one 'path,label' line per image.")
    cols, rows = _index_columns(rows)
    if not rows:
        raise DataError(f"Index file {label} has a header but no data lines.")
    items = _index_items(rows, cols, index.parent, label)
    norm, class_names = _index_classes(items)
    entries, skipped = _index_entries(items, norm, label, allowed, outside, budget)
    return _build_file_dataset(name=name, root=index.parent, where=label, class_names=class_names,
                               entries=entries, skipped=skipped, warnings=[], source=source)


@SOURCES.register("index")
def _load_index(location: str | None, data_dir: Path, download: bool, roots=None, limits=None) -> LabDataset:
    if not location:
        raise DataError("No index file given. Give a .txt or .csv file with one 'path,label' line per image.")
    index = Path(location).expanduser()
    allowed = None
    if roots is not None:
        # before any look at the disk: nothing outside can be probed (other users' uploads included)
        real = paths.resolve_inside(location, roots, paths.page_reach(roots, data_dir))
        allowed = paths.page_reach(roots, data_dir, also=[str(real.parent)])  # rows: beside the index, or in a root
    if not index.is_file():
        raise DataError(f"Index file {index} does not exist or is not a file.")
    return _load_index_file(index, name=index.stem, label=str(index), allowed=allowed, limits=limits,
                            source={"kind": "index", "location": str(index.resolve())})


# ---- torchvision ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class _TvSet:
    name: str          # torchvision class name, also the folder under data_dir
    display: str
    family: str        # "cifar" or "mnist"


TORCHVISION_SETS = {
    "CIFAR10": _TvSet("CIFAR10", "CIFAR-10", "cifar"),
    "CIFAR100": _TvSet("CIFAR100", "CIFAR-100", "cifar"),
    "MNIST": _TvSet("MNIST", "MNIST", "mnist"),
    "FashionMNIST": _TvSet("FashionMNIST", "Fashion-MNIST", "mnist"),
}


def _tv_lookup(location: str | None) -> _TvSet:
    key = re.sub(r"[-_ ]", "", (location or "")).lower()
    for name, s in TORCHVISION_SETS.items():
        if key == name.lower():
            return s
    raise ConfigError(f"Unknown torchvision dataset {location!r}. Choose one of: {', '.join(TORCHVISION_SETS)}.")


def _tv_class(s: _TvSet, verify: bool):
    import torchvision.datasets as tvd

    cls = getattr(tvd, s.name)
    if verify or s.family != "cifar":  # MNIST checks only that the raw files exist
        return cls
    # Same class with the MD5 sums cleared: torchvision's check_integrity(path, None) only tests existence.
    return type(f"_Unverified{s.name}", (cls,), {
        "train_list": [[f, None] for f, _ in cls.train_list],
        "test_list": [[f, None] for f, _ in cls.test_list],
        "meta": {**cls.meta, "md5": None},
    })


def _tv_expected(s: _TvSet, data_dir: Path) -> tuple[Path, list[str], list[str], str]:
    """(folder, expected files, archives that can replace them, download url)."""
    cls = _tv_class(s, verify=True)
    if s.family == "cifar":
        root = data_dir / s.name
        files = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        return root, [f"{cls.base_folder}/{f}" for f in files], [cls.filename], cls.url
    raw = data_dir / s.name / "raw"
    gz = [f for f, _ in cls.resources]
    return raw, [f[: -len(".gz")] for f in gz], gz, cls.mirrors[0]


def _prepare_placed_files(s: _TvSet, data_dir: Path) -> None:
    """Unpack archives placed by hand so torchvision finds the files without downloading."""
    folder, files, archives, _ = _tv_expected(s, data_dir)
    if s.family == "cifar":
        if all((folder / f).is_file() for f in files):
            return
        tgz = folder / archives[0]
        if not tgz.is_file():
            return
        cls = _tv_class(s, verify=True)
        if VERIFY_CHECKSUMS and not _md5_ok(tgz, cls.tgz_md5):
            raise DataError(f"{tgz.name} in {folder} is damaged or not the official file (checksum mismatch). "
                            f"Delete it and download it again from {cls.url}.")
        # unpack beside the target and move into place, so a concurrent load never reads half a file
        tmp = Path(tempfile.mkdtemp(prefix=f".{cls.base_folder}-partial-", dir=folder))
        try:
            with tarfile.open(tgz, "r:gz") as tar:
                members = [m for m in tar.getmembers() if m.name.split("/")[0] == cls.base_folder]
                tar.extractall(tmp, members=members, filter="data")
            target = folder / cls.base_folder
            target.mkdir(exist_ok=True)
            for f in (tmp / cls.base_folder).iterdir():
                if not (target / f.name).exists():
                    os.replace(f, target / f.name)
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"{tgz} cannot be unpacked ({e}). Delete it and download it again from {cls.url}.") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    for f in files:
        target, gz = folder / f, folder / f"{f}.gz"
        if target.is_file() or not gz.is_file():
            continue
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.partial-", dir=folder)
        tmp = Path(name)
        try:
            with gzip.open(gz, "rb") as src, os.fdopen(fd, "wb") as out:
                written = 0
                while chunk := src.read(1 << 20):
                    written += len(chunk)
                    if written > MAX_GZ_UNPACKED_BYTES:  # a gzip bomb placed under the right name
                        raise DataError(f"{gz} unpacks to more than {MAX_GZ_UNPACKED_BYTES >> 20} MiB, far more "
                                        f"than the real {s.name} file; it is not the official file. Delete it and "
                                        f"download it again from {_tv_expected(s, data_dir)[3]}.")
                    out.write(chunk)
            os.replace(tmp, target)
        except (OSError, EOFError) as e:
            raise DataError(f"{gz} cannot be decompressed ({e}). Delete it and place the file again.") from None
        finally:
            tmp.unlink(missing_ok=True)


def _md5_ok(path: Path, md5: str) -> bool:
    from torchvision.datasets.utils import check_integrity

    return check_integrity(str(path), md5)


@SOURCES.register("torchvision")
def _load_torchvision(location: str | None, data_dir: Path, download: bool, roots=None, limits=None) -> LabDataset:
    # roots and limits do not apply: the files are torchvision's own names under data_dir
    s = _tv_lookup(location)
    folder, files, archives, url = _tv_expected(s, data_dir)
    tv_root = data_dir / s.name if s.family == "cifar" else data_dir
    _prepare_placed_files(s, data_dir)
    missing = [f for f in files if not (folder / f).is_file()]
    legacy = data_dir / s.name / "processed"  # torchvision < 0.9 cached MNIST as training.pt/test.pt
    if s.family == "mnist" and (legacy / "training.pt").is_file() and (legacy / "test.pt").is_file():
        missing = []
    if missing:
        reason = "download is turned off"
        if download:
            reason = downloads_off() or probe_network(url)
            if reason is None:
                reason = _tv_download(s, tv_root)
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            alt = (f"{archives[0]} (from {url})" if s.family == "cifar"
                   else f"the .gz files ({', '.join(archives)}) or the same files unpacked")
            raise MissingFileError(
                f"{s.display} is not in {folder} and could not be downloaded ({reason}). Place {alt} in {folder}, "
                f"or these files: {', '.join(missing)}; then load it again.",
                files=missing + ([archives[0]] if s.family == "cifar" else []), folder=str(folder))
    if VERIFY_CHECKSUMS and s.family == "cifar":
        cls = _tv_class(s, verify=True)
        bad = [f for f, md5 in cls.train_list + cls.test_list + [[cls.meta["filename"], cls.meta["md5"]]]
               if not _md5_ok(folder / cls.base_folder / f, md5)]
        if bad:
            raise DataError(f"{', '.join(bad)} in {folder / cls.base_folder} do not match the official "
                            f"{s.display} files (checksum mismatch). Delete them and place {archives[0]} again "
                            f"(from {url}).")
    cls = _tv_class(s, verify=VERIFY_CHECKSUMS)
    try:
        parts = [cls(str(tv_root), train=t, download=False) for t in (True, False)]
    except Exception as e:  # torchvision raises RuntimeError/AssertionError/ValueError/pickle errors
        raise DataError(f"The {s.display} files in {folder} cannot be read ({type(e).__name__}: {e}). "
                        f"Delete them and place the official files again.") from None
    arrays, targets = [], []
    for p in parts:
        data = p.data.numpy() if hasattr(p.data, "numpy") else np.asarray(p.data)
        t = p.targets.tolist() if hasattr(p.targets, "tolist") else list(p.targets)
        if len(data) != len(t):
            raise DataError(f"The {s.display} files in {folder} disagree: {len(data)} images but {len(t)} labels.")
        arrays.append(data)
        targets.extend(int(x) for x in t)
    classes = list(parts[0].classes)
    if targets and max(targets) >= len(classes):
        raise DataError(f"The {s.display} files in {folder} have label {max(targets)} but only {len(classes)} classes.")
    n_train = len(arrays[0])
    return ArrayDataset(
        name=s.display, classes=classes, targets=targets, data=np.concatenate(arrays),
        splits={"train": list(range(n_train)), "test": list(range(n_train, len(targets)))},
        split_names=[("train", 0), ("test", n_train)], source={"kind": "torchvision", "location": s.name})


def _tv_download(s: _TvSet, tv_root: Path) -> str | None:
    """Download through torchvision; None on success, else the reason."""
    from urllib.error import URLError

    cls = _tv_class(s, verify=True)
    try:
        cls(str(tv_root), train=True, download=True)
        cls(str(tv_root), train=False, download=True)
    except (URLError, OSError, RuntimeError) as e:
        return f"download failed: {e}"
    return None


# --------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------

def load_dataset(kind: str = "sample", location: str | os.PathLike | None = None,
                 data_dir: str | os.PathLike = DEFAULT_DATA_DIR, download: bool = True,
                 roots: Sequence[str | os.PathLike] | None = None, limits: ScanLimits | None = None) -> LabDataset:
    """Load a dataset: kind "sample" | "torchvision" | "folder" | "zip" | "index" (see module doc).

    ``roots`` (the Data tab passes the server's --data-root folders) confines a folder, an index
    file and every file they reach to those folders, symlinks followed; None (the command line, run
    by the server's owner) accepts any path. ``limits`` (``ScanLimits()`` from the page) bounds how
    many files a load lists and for how long; None: no bound.
    """
    loader = SOURCES.get(kind)
    if isinstance(location, str):
        paths.check_typed(location)
    data_dir = Path(data_dir).expanduser()
    return loader(None if location is None else os.fspath(location), data_dir, download,
                  roots=None if roots is None else list(roots), limits=limits)


def load_from_source(source: dict, data_dir: str | os.PathLike = DEFAULT_DATA_DIR, download: bool = False,
                     roots: Sequence[str | os.PathLike] | None = None, limits: ScanLimits | None = None) -> LabDataset:
    """Reload a dataset from its ``ds.source`` dict (a zip whose upload is gone reuses its extracted
    folder). ``roots`` and ``limits`` as in ``load_dataset``; with roots, that folder must be one of
    this data folder's uploads."""
    kind = source.get("kind")
    if kind == "zip" and not Path(source.get("location", "")).is_file() and source.get("extracted"):
        folder = Path(source["extracted"])
        label = Path(source["location"]).name
        uploads = os.path.realpath(Path(data_dir).expanduser() / "uploads")
        if roots is not None and os.path.dirname(os.path.realpath(folder)) != uploads:
            # a page may reload only an upload's own extraction folder, and is told nothing more
            raise DataError(f"The uploaded archive {label} is no longer on the server. Upload it again.")
        return _load_extracted(folder, label=label, name=Path(source["location"]).stem, source=dict(source),
                               limits=limits)
    return load_dataset(kind, source.get("location"), data_dir=data_dir, download=download, roots=roots,
                        limits=limits)


# --------------------------------------------------------------------------------------------------
# Summary and preview
# --------------------------------------------------------------------------------------------------

@dataclass
class DatasetSummary:
    """Counts for the Data tab. ``per_class``: class, images, share (fraction of all images, 0..1);
    ``sizes``: width, height, mode (as stored), images; ``skipped``: file, reason."""
    per_class: pd.DataFrame
    sizes: pd.DataFrame
    total: int
    skipped: pd.DataFrame


def summarize(ds: LabDataset) -> DatasetSummary:
    """Per-class counts, image sizes/modes and skipped files (from the load-time scan: no decoding)."""
    counts = ds.class_counts()
    total = len(ds)
    per_class = pd.DataFrame({"class": ds.classes, "images": counts,
                              "share": [c / total if total else 0.0 for c in counts]})
    if isinstance(ds, ArrayDataset):
        w, h = ds.image_size(0) if total else (0, 0)
        sizes = pd.DataFrame({"width": [w], "height": [h], "mode": [ds.image_mode(0) if total else ds.mode],
                              "images": [total]})
    else:
        frame = pd.DataFrame([(*ds.image_size(i), ds.image_mode(i)) for i in range(total)],
                             columns=["width", "height", "mode"])
        sizes = (frame.groupby(["width", "height", "mode"], sort=False).size().reset_index(name="images")
                 .sort_values(["images", "width", "height", "mode"], ascending=[False, True, True, True]).reset_index(drop=True))
    skipped = pd.DataFrame(ds.skipped, columns=["file", "reason"])
    return DatasetSummary(per_class=per_class, sizes=sizes, total=total, skipped=skipped)


def preview_samples(ds: LabDataset, n: int = 24, per_class: int | None = None,
                    seed: int = 0) -> list[tuple[Image.Image, str]]:
    """(image, class name) pairs: ``n`` random images, or ``per_class`` images of each class in class order."""
    rng = np.random.default_rng(seed)
    if per_class is not None:
        targets = np.asarray(ds.targets)
        picks = []
        for c in range(len(ds.classes)):
            idx = np.flatnonzero(targets == c)
            picks.extend(rng.choice(idx, size=min(per_class, len(idx)), replace=False).tolist())
    else:
        picks = rng.choice(len(ds), size=min(n, len(ds)), replace=False).tolist()
    return [(ds.load_image(i), ds.classes[ds.targets[i]]) for i in picks]


# --------------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------------

@dataclass
class Split:
    """Disjoint sorted index lists covering the dataset. ``note`` says how they were made."""
    train: list[int]
    val: list[int]
    test: list[int]
    warnings: list[str] = field(default_factory=list)
    note: str = ""

    def to_dict(self) -> dict:
        return {"train": self.train, "val": self.val, "test": self.test, "warnings": self.warnings, "note": self.note}


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for label, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or not 0 <= f < 1:
            raise ConfigError(f"{label} must be a number in [0, 1), got {f!r}.")
    if val_fraction + test_fraction >= 1:
        raise ConfigError(f"val_fraction + test_fraction must be below 1 so some images are left to train on; "
                          f"got {val_fraction} + {test_fraction}.")


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5 + 1e-9))


def _carve(indices: Sequence[int], targets: np.ndarray, fractions: dict[str, float],
           rng: np.random.Generator) -> dict[str, list[int]]:
    """Stratified random carving of ``indices``: each class gives round(n × fraction) to each part and
    keeps at least one image in "rest". Classes are visited in label order, so a seed fixes the result."""
    out: dict[str, list[int]] = {k: [] for k in fractions}
    out["rest"] = []
    idx = np.asarray(sorted(indices), dtype=np.int64)
    labels = targets[idx] if len(idx) else np.zeros(0, dtype=np.int64)
    for c in np.unique(labels):
        members = rng.permutation(idx[labels == c])
        n = len(members)
        counts = {k: _round_half_up(n * f) for k, f in fractions.items()}
        while sum(counts.values()) > n - 1 and any(counts.values()):
            biggest = max(counts, key=lambda k: counts[k])
            counts[biggest] -= 1
        start = 0
        for k in fractions:
            out[k].extend(members[start:start + counts[k]].tolist())
            start += counts[k]
        out["rest"].extend(members[start:].tolist())
    return {k: sorted(v) for k, v in out.items()}


def split_dataset(ds: LabDataset, val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0) -> Split:
    """Stratified train/val/test split, deterministic for a seed.

    Without a predefined split, each class gives round(n × fraction) images to val and to test (at
    least one stays in train). With one: train/val/test are used as they are; a missing val (or test)
    is carved out of train, stratified, sized ``val_fraction`` (or ``test_fraction``) **of the whole
    dataset** — so the sliders mean the same for every source — and the other fraction is unused.
    A source split without train/ is ignored (random split of everything, with a warning).
    """
    _check_fractions(val_fraction, test_fraction)
    rng = np.random.default_rng(seed)
    targets = np.asarray(ds.targets, dtype=np.int64)
    n = len(ds)
    pre = {k: list(v) for k, v in (ds.splits or {}).items() if v}
    warnings: list[str] = []
    if "train" not in pre:
        if pre:
            warnings.append(f"The source has {'/'.join(pre)} but no train split; it was ignored and the images "
                            f"were split at random.")
        parts = _carve(range(n), targets, {"val": val_fraction, "test": test_fraction}, rng)
        train, val, test = parts["rest"], parts["val"], parts["test"]
        note = f"random stratified split (val {val_fraction:g}, test {test_fraction:g}, seed {seed})"
    else:
        train = pre["train"]
        missing = {k: f for k, f in (("val", val_fraction), ("test", test_fraction)) if k not in pre}
        # of the whole dataset → of the train part
        scaled = {k: f * n / len(train) for k, f in missing.items()}
        if sum(scaled.values()) >= 1:
            raise ConfigError(
                f"The predefined train split has {len(train)} of {n} images: it cannot also give "
                f"{' + '.join(f'{k}_fraction={f:g}' for k, f in missing.items())} of the whole dataset. "
                f"Lower the fraction.")
        parts = _carve(train, targets, scaled, rng) if missing else {"rest": sorted(train)}
        train = parts["rest"]
        val = sorted(pre["val"]) if "val" in pre else parts["val"]
        test = sorted(pre["test"]) if "test" in pre else parts["test"]
        carved = ", ".join(f"{k} carved from train ({missing[k]:g} of all images)" for k in missing)
        note = "predefined split from the source" + (f"; {carved}, seed {seed}" if carved else "")
    for label, part, wanted in (("training", train, True), ("validation", val, bool(val) or val_fraction > 0),
                                ("test", test, bool(test) or test_fraction > 0)):
        if not wanted:
            continue
        have = np.bincount(targets[np.asarray(part, dtype=np.int64)], minlength=len(ds.classes)) if part else \
            np.zeros(len(ds.classes), dtype=np.int64)
        for c, k in enumerate(have):
            if k == 0:
                warnings.append(f"Class '{ds.classes[c]}' has no {label} images "
                                f"({int((targets == c).sum())} images in all); add images or change the fractions.")
    return Split(train=list(train), val=list(val), test=list(test), warnings=warnings, note=note)


def split_table(ds: LabDataset, split: Split) -> pd.DataFrame:
    """Images per class in each part: columns class, train, val, test, total."""
    targets = np.asarray(ds.targets, dtype=np.int64)
    k = len(ds.classes)

    def count(part: list[int]) -> list[int]:
        if not part:
            return [0] * k
        return np.bincount(targets[np.asarray(part, dtype=np.int64)], minlength=k).tolist()

    table = pd.DataFrame({"class": ds.classes, "train": count(split.train), "val": count(split.val),
                          "test": count(split.test)})
    table["total"] = table["train"] + table["val"] + table["test"]
    return table
