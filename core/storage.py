"""Writing files that must survive a full or failing disk, and saying plainly when a write fails.

``atomic_write_text`` / ``atomic_write_json`` write a temporary file beside the target and
``os.replace`` it only once complete, so a failed write never leaves a half-written file where a
good one was (the trainer's status, the history's meta.json and card.json all use them).

``storage_error`` turns an ``OSError`` from a write into a ``StorageError`` whose message says
which folder (as the user knows it: ``runs/``, not a long absolute path), what went wrong (the
disk is full, with the free space; an I/O error; a read-only disk; no permission), and what to do.
``disk_looks_full`` recognises a full disk behind errors that carry no errno (PyTorch's zip
writer raises a RuntimeError) by asking the file system how much space is left.
"""
from __future__ import annotations

import errno
import getpass
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any

from core.errors import StorageError

# errnos that mean "no room": the disk is full or the user's quota is used up (EDQUOT is missing
# on Windows).
FULL_ERRNOS = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})
# A write that failed while less than this is left has most likely failed for lack of space: a
# failed checkpoint write leaves its partial file behind until cleaned up, so the free space seen
# then is what the write could not get past (tmpfs, ext4 and XFS report it as ~0).
NEARLY_FULL_BYTES = 1 << 20
FREE_SPACE_ADVICE = "Delete old runs (Compare → Run history) or free space"


def format_size(n_bytes: float) -> str:
    """'0 B', '256 KiB', '4.0 MiB', '12 MiB', '3.0 GiB': one decimal below 10 units, else none."""
    n = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            if unit == "B":
                return f"{n:.0f} B"
            return f"{n:.1f} {unit}" if abs(n) < 10 else f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.0f} TiB"


def folder_label(folder: str | Path) -> str:
    """The folder as the user knows it: relative to where the lab was started when it lies below
    it (``runs/``), else the path as given; always with a trailing slash, to read as a folder."""
    path = Path(folder)
    if path.is_absolute():
        try:
            path = path.relative_to(Path.cwd())
        except ValueError:  # elsewhere on the machine: the full path is the only name it has
            pass
    text = str(path)
    return text if text.endswith(os.sep) else text + os.sep


def free_space(folder: str | Path) -> tuple[int, int] | None:
    """(free, total) bytes of the disk holding ``folder`` (or its nearest existing parent);
    None when the file system cannot say."""
    try:
        usage = shutil.disk_usage(_nearest_existing(folder))
    except OSError:
        return None
    return usage.free, usage.total


def _nearest_existing(folder: str | Path) -> Path:
    """``folder``, or its nearest parent that exists (a run folder may not be made yet)."""
    path = Path(folder).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disk_looks_full(folder: str | Path) -> bool:
    space = free_space(folder)
    return space is not None and space[0] < NEARLY_FULL_BYTES


def os_error_behind(err: BaseException) -> OSError | None:
    """The OSError with an errno that ``err`` is or was raised from (PyTorch wraps the OSError of a
    failed file write in its own RuntimeError, keeping it as the context)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno is not None:
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def os_error_for(err: BaseException, folder: str | Path) -> OSError | None:
    """The OSError a failed write really was, for errors that hide it (PyTorch's zip writer raises
    a RuntimeError): the OSError it was raised from, else ENOSPC when the disk is (nearly) full —
    ask while the failed write's partial file still holds its space. None: not a disk problem."""
    behind = os_error_behind(err)
    if behind is not None:
        return OSError(behind.errno, behind.strerror or os.strerror(behind.errno))
    if disk_looks_full(folder):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return None


def storage_error(err: OSError, folder: str | Path, doing: str) -> StorageError:
    """A plain-language StorageError for ``err``, raised while ``doing`` (e.g. 'saving the
    checkpoint of epoch 2') in ``folder`` (the runs folder, as the user chose it)."""
    label, code = folder_label(folder), err.errno
    if code in FULL_ERRNOS:
        problem, remedy = _no_room(folder, label, code, doing), FREE_SPACE_ADVICE
    elif code == errno.EIO:
        problem = f"The disk holding {label} reported an input/output error (EIO) while {doing}."
        remedy = ("The disk may be failing or disconnected: check it (the system log says more) "
                  "or start the lab with --runs-dir on another disk")
    elif code == errno.EROFS:
        problem = f"The disk holding {label} is read-only (EROFS) while {doing}."
        remedy = "Remount it writable or start the lab with --runs-dir pointing to a writable folder"
    elif code in (errno.EACCES, errno.EPERM):
        problem = f"No permission to write in {label} while {doing}."
        remedy = f"Give the user running the lab ({_user()}) write access to {label}"
    else:
        problem = f"Writing in {label} failed while {doing}: {err.strerror or err}."
        remedy = f"Check the disk holding {label}"
    return StorageError(problem, remedy, errno=code)


def _no_room(folder: str | Path, label: str, code: int, doing: str) -> str:
    """What ENOSPC or EDQUOT means here: the free space (the disk's figure does not show a quota,
    and a disk out of inodes — too many files — still shows free bytes)."""
    if code != errno.ENOSPC:
        return f"Your disk quota on the disk holding {label} is used up while {doing}."
    space = free_space(folder)
    if space is None:
        return f"The disk holding {label} is full while {doing}."
    amount = f"{format_size(space[0])} free of {format_size(space[1])}"
    if space[0] >= NEARLY_FULL_BYTES and _out_of_inodes(folder):
        return f"The disk holding {label} has no free inodes left (too many files; {amount}) while {doing}."
    return f"The disk holding {label} is full ({amount}) while {doing}."


def _out_of_inodes(folder: str | Path) -> bool:
    try:
        stats = os.statvfs(_nearest_existing(folder))
    except (OSError, AttributeError):   # not POSIX (Windows has no statvfs), or gone
        return False
    return stats.f_files > 0 and stats.f_favail == 0


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (containers)
        return f"uid {os.getuid()}" if hasattr(os, "getuid") else "the server's user"


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``:
    the old file stays whole if the write fails (disk full), and the partial copy is removed so a
    full disk does not fill up further. Raises the OSError."""
    path = Path(path)
    # Unique per process and thread: two writers of the same file never share a temporary.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())   # the new content is on disk before the name points at it
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_folder(folder: str | Path) -> None:
    """Make a rename in ``folder`` durable (POSIX: fsync the directory). Windows cannot open a
    folder for that; its renames are journaled by NTFS, so there is nothing to do there."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_json(path: str | Path, data: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(data, ensure_ascii=False, indent=indent))
