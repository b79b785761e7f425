"""Which server files a page user may reach: the data roots.

The dashboard is served to a class whose page users are not trusted with the server's disk, so a
dataset typed on the page (a folder, an index file, and every image an index lists) must resolve,
symlinks followed, inside one of the roots the teacher configured (``launch.py --data-root``).
The command line (``python -m core.train``) is run by the server's owner and passes no roots.

A path outside the roots gets one message whether it exists or not, so the page cannot be used to
probe which files exist.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from core.errors import DataError

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "assets"

Roots = Sequence[str | os.PathLike]


class OutsideRootsError(DataError):
    """A page user asked for a path outside the data roots."""


def default_roots(data_dir: str | os.PathLike) -> list[str]:
    """The data folder (uploads, the extracted sample) and assets/, as messages should show them."""
    try:
        assets = ASSETS.relative_to(Path.cwd()).as_posix()
    except ValueError:  # started from another folder: the full path is the only honest name
        assets = str(ASSETS)
    return [os.fspath(data_dir), assets]


def real_roots(roots: Roots) -> list[str]:
    """The roots as absolute paths with symlinks resolved (a root need not exist yet)."""
    return [os.path.realpath(os.path.expanduser(os.fspath(r))) for r in roots]


UPLOADS = "uploads"   # <data_dir>/uploads/<hash>/: each extracted upload is its uploader's alone


class Reach(list):
    """Resolved folders a page may read (a list, as ``is_inside`` takes them), less the ``hidden``
    folders below them: the data folder's uploads/, whose extracted archives belong to the users who
    uploaded them. A page reaches its own upload through the upload, never by typing its path."""

    def __init__(self, inside: Sequence[str], hidden: Sequence[str] = ()):
        super().__init__(inside)
        self.hidden = list(hidden)


def page_reach(roots: Roots, data_dir: str | os.PathLike, also: Sequence[str] = ()) -> Reach:
    """What a page's folder or index load may read: ``also`` (resolved) and the roots, without the
    uploads of ``data_dir``."""
    return Reach(list(also) + real_roots(roots), real_roots([Path(data_dir) / UPLOADS]))


def _under(real: str, reals: Sequence[str]) -> bool:
    return any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in reals)


def is_inside(real: str, reals: Sequence[str]) -> bool:
    """True when ``real`` (an already resolved path) is one of ``reals`` or below one, and not in a
    folder a ``Reach`` hides."""
    return _under(real, reals) and not _under(real, getattr(reals, "hidden", ()))


def is_hidden(real: str, reals: Sequence[str]) -> bool:
    """True when ``real`` is a folder (or below one) that a ``Reach`` hides: a scan leaves it out
    without a word, as if it were not there."""
    return _under(real, getattr(reals, "hidden", ()))


def shorten(text: str, limit: int = 200) -> str:
    """A path as a message may quote it: at most ``limit`` characters (a page can send megabytes)."""
    return text if len(text) <= limit else text[:limit] + "…"


def check_typed(path: str) -> None:
    """Refuse a path no file can have (a NUL character) with a message, before the OS raises."""
    if "\x00" in path:
        raise DataError(f"The path {shorten(path.replace(chr(0), '?'))!r} contains a NUL character, which no "
                        "file name can hold. Type the path again.")


def outside_message(given: str | os.PathLike, roots: Roots) -> str:
    """The one message for any path outside the roots: it names what the user typed and the roots
    as configured, never anything found on disk."""
    shown = [os.fspath(r) for r in roots]
    given = shorten(os.fspath(given))
    names = " and ".join(shown) if len(shown) <= 2 else ", ".join(shown[:-1]) + " and " + shown[-1]
    return (f"{given} is outside this server's data folders. Only folders and index files under "
            f"{names} can be loaded from this page (the server's --data-root). Ask the teacher to add a data "
            f"root, or upload a .zip.")


def resolve_inside(path: str | os.PathLike, roots: Roots, reach: Reach | None = None) -> Path:
    """``path`` resolved (symlinks followed), or ``OutsideRootsError`` when it is not under a root.

    A path that does not exist is judged by where it would be; inside a root it is returned as is
    (the caller says "does not exist"), outside it gets the same refusal as an existing one.
    ``reach`` (default: the roots themselves) may hide folders below them, such as the uploads.
    """
    p = Path(os.fspath(path)).expanduser()
    try:
        real = str(p.resolve(strict=True))
    except (OSError, RuntimeError):  # missing, unreadable, or a symlink loop
        real = os.path.realpath(p)   # where it would be; never raises
    if not is_inside(real, real_roots(roots) if reach is None else reach):
        raise OutsideRootsError(outside_message(path, roots))
    return Path(real)
