"""A dataset built in the browser: classes typed by name, images added to each (files or webcam
shots), written as a .zip with one folder per class so it loads exactly like an uploaded archive
(``datasets.load_dataset("zip", path)``). One builder belongs to one browser session: its images are
copied into that session's own temporary folder, never shared with another user."""
from __future__ import annotations

import hashlib
import logging
import re
import shutil
import tempfile
import unicodedata
import uuid
import weakref
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import UnidentifiedImageError

from core import datasets
from core.errors import DataError

MAX_CLASSES = 50
MAX_IMAGES = 5_000
MAX_TOTAL_BYTES = 200 * 1024 * 1024
MAX_CLASS_NAME = 64
MAX_FILE_NAME = 100
DATASET_NAME = "my-dataset"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
log = logging.getLogger(__name__)


def clean_class_name(name: str | None) -> str:
    """The class name as typed (NFC, trimmed), or a DataError that says what is wrong with it."""
    text = unicodedata.normalize("NFC", str(name or "")).strip()
    if not text:
        raise DataError("Type a class name first.")
    if len(text) > MAX_CLASS_NAME:
        raise DataError(f"Class name {text[:20]!r}… is {len(text)} characters long; the limit is {MAX_CLASS_NAME}.")
    if "/" in text or "\\" in text or _CONTROL.search(text):
        raise DataError(f"Class name {text!r} may not contain / or \\ or control characters.")
    if text.startswith(".") or text == "__MACOSX":
        raise DataError(f"Class name {text!r} would be a hidden folder: it may not start with a dot.")
    return text


def clean_file_name(name: str | None) -> str:
    """A safe file name inside a class folder: the last part of the name only (no folders), NFC,
    no control characters, no leading dots or '..', at most MAX_FILE_NAME characters."""
    base = re.split(r"[/\\]", unicodedata.normalize("NFC", str(name or "")))[-1]
    base = _CONTROL.sub("", base).lstrip(". ").replace("..", "_").strip()
    if len(base) > MAX_FILE_NAME:
        stem, dot, ext = base.rpartition(".")
        base = (stem[:MAX_FILE_NAME - len(ext) - 1] + "." + ext) if dot and len(ext) <= 8 else base[:MAX_FILE_NAME]
    return base or "image"


def _check_image(path: Path, label: str) -> str:
    """The image's format (e.g. "JPEG"); a DataError naming the file when it is not a readable image
    or is over Pillow's pixel limit."""
    try:
        with datasets.open_image_file(path) as im:
            fmt = im.format or "PNG"
            if im.size[0] * im.size[1] <= datasets.FULL_DECODE_MAX_PIXELS:
                im.load()
            else:
                im.verify()
    except datasets.TooManyPixels as e:
        raise DataError(f"{label} is too large: {e}. Shrink the image and add it again.") from None
    except UnidentifiedImageError:
        raise DataError(f"{label} is not an image (Pillow cannot read it). Add JPEG, PNG, BMP or similar files.") from None
    except FileNotFoundError:
        raise DataError(f"{label} is gone from the server: upload it again.") from None
    except Exception as e:  # decoders raise OSError, SyntaxError, ValueError...
        text = (e.strerror if isinstance(e, OSError) and e.strerror else str(e)) or type(e).__name__
        raise DataError(f"{label} is not a readable image ({text}).") from None
    return fmt


def _with_extension(label: str, fmt: str) -> str:
    """The zip loader lists files by extension: a name without an image one gets the format's."""
    if Path(label).suffix.lower() in datasets.IMAGE_EXTENSIONS:
        return label
    return f"{label}.{'jpg' if fmt == 'JPEG' else fmt.lower()}"


@dataclass
class Builder:
    """The classes and images of one session's dataset in the making. ``root`` is created on first
    use (a private temporary folder) and removed by ``discard``."""
    classes: dict[str, list[tuple[str, Path]]] = field(default_factory=dict)  # class -> [(shown name, copy)]
    root: Path | None = None
    total_bytes: int = 0
    zips: list[Path] = field(default_factory=list)   # written by write_zip, oldest first

    def _folder(self) -> Path:
        if self.root is None:
            self.root = Path(tempfile.mkdtemp(prefix="lab-builder-"))
            # When the session is dropped, its collected images go too; the zips stay (a run that
            # trained on one is evaluated from it later, like an upload in Gradio's cache).
            weakref.finalize(self, shutil.rmtree, self.root / "images", True)
        return self.root

    def __deepcopy__(self, memo):
        """A handle on files, like an open file: a copy of the session shares it (two owners of
        one folder would let the first to go delete the other's images)."""
        return self

    @property
    def n_images(self) -> int:
        return sum(len(v) for v in self.classes.values())

    def add_class(self, name: str | None) -> str:
        text = clean_class_name(name)
        if any(c.casefold() == text.casefold() for c in self.classes):
            raise DataError(f"There is already a class {text!r}.")
        if len(self.classes) >= MAX_CLASSES:
            raise DataError(f"A dataset built here has at most {MAX_CLASSES} classes; remove one first.")
        self.classes[text] = []
        return text

    def remove_class(self, name: str | None) -> None:
        if name not in self.classes:
            raise DataError(f"There is no class {name!r} to remove." if name else "Choose a class to remove.")
        for _, copy in self.classes.pop(name):
            self.total_bytes -= copy.stat().st_size if copy.exists() else 0
            copy.unlink(missing_ok=True)

    def add_images(self, name: str | None, files, shown_names=None) -> int:
        """Check every file, then copy them all into the session folder under class ``name``. All or
        nothing: one refused file (named in the message) adds none. Returns how many were added."""
        if not name or name not in self.classes:
            raise DataError("Add a class and choose it before adding images." if not name
                            else f"There is no class {name!r}; add it first.")
        paths = [Path(str(f)) for f in (files or [])]
        if not paths:
            raise DataError("Choose one or more images (or take a webcam shot) first.")
        labels = [clean_file_name(n) for n in (shown_names or [p.name for p in paths])]
        if self.n_images + len(paths) > MAX_IMAGES:
            raise DataError(f"A dataset built here has at most {MAX_IMAGES:,} images; it has {self.n_images:,} "
                            f"and these are {len(paths):,} more.")
        size, formats = 0, []
        for path, label in zip(paths, labels):
            if not path.is_file():
                raise DataError(f"{label} is gone from the server: upload it again.")
            formats.append(_check_image(path, label))
            size += path.stat().st_size
        if self.total_bytes + size > MAX_TOTAL_BYTES:
            raise DataError(f"A dataset built here holds at most {MAX_TOTAL_BYTES >> 20} MB of images; these "
                            f"would make it {(self.total_bytes + size) / 2**20:,.1f} MB.")
        folder = self._folder() / "images"
        folder.mkdir(exist_ok=True)
        for path, label, fmt in zip(paths, labels, formats):
            label = _with_extension(label, fmt)
            copy = folder / f"{uuid.uuid4().hex}{Path(label).suffix[:8]}"
            shutil.copyfile(path, copy)
            self.classes[name].append((label, copy))
        self.total_bytes += size
        return len(paths)

    def counts(self) -> list[tuple[str, int]]:
        return [(c, len(v)) for c, v in self.classes.items()]

    def check_ready(self) -> None:
        if len(self.classes) < 2:
            raise DataError(f"A dataset needs at least 2 classes; this one has {len(self.classes)}. Add classes by name.")
        empty = [c for c, v in self.classes.items() if not v]
        if empty:
            raise DataError(f"Class(es) without images: {', '.join(empty)}. Add images to each class, or remove it.")

    def _members(self) -> list[tuple[Path, str]]:
        return [(copy, f"{DATASET_NAME}/{cls}/{k:04d}_{label}")
                for cls, items in self.classes.items() for k, (label, copy) in enumerate(items)]

    def write_zip(self) -> Path:
        """The .zip ``my-dataset/<class>/<nnnn>_<file>`` of the classes as they are now, in the session
        folder. Each version of the dataset gets its own zip (a run that trained on an earlier version
        still finds its own); pressing Use again without a change reuses the last one."""
        self.check_ready()
        members = self._members()
        version = hashlib.sha256(repr([(c.name, m) for c, m in members]).encode()).hexdigest()[:12]
        out = self._folder() / "zips" / version / f"{DATASET_NAME}.zip"
        if out in self.zips and out.is_file():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
            for copy, member in members:
                zf.write(copy, member)
        self.zips.append(out)
        return out

    def close(self, in_use: Callable[[Path], bool]) -> list[Path]:
        """The session has ended: remove its collected images and every zip no run trained on
        (``in_use(zip)``, asked of the run history); returns the zips kept. A zip whose use cannot be
        told is kept (a run's evaluation and resume read it)."""
        kept = []
        for path in self.zips:
            try:
                used = in_use(path)
            except Exception:   # the history could not be read: keep the file rather than lose a run's data
                log.exception("could not tell whether a run uses %s; kept", path)
                used = True
            if used:
                kept.append(path)
            else:
                shutil.rmtree(path.parent, ignore_errors=True)
        if self.root is not None:
            shutil.rmtree(self.root / "images", ignore_errors=True)
            if not kept:
                shutil.rmtree(self.root, ignore_errors=True)
        self.classes, self.total_bytes, self.zips = {}, 0, kept
        return kept

    def discard(self) -> None:
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
        self.root, self.classes, self.total_bytes, self.zips = None, {}, 0, []
