"""Errors meant for the user.

Every error raised for bad input or a missing file is a ``LabError``: its message says what was
received, what is wrong and what to do next, so the UI can show it as it is (never a traceback).
"""
from __future__ import annotations


class LabError(Exception):
    """Base class: an error whose message is written for the person using the lab."""


class DataError(LabError, ValueError):
    """A dataset, image, archive or split problem."""


class ModelError(LabError, ValueError):
    """An unknown model, an impossible input size, or weights that do not fit."""


class ConfigError(LabError, ValueError):
    """An unknown or invalid configuration field."""


class MissingFileError(LabError, FileNotFoundError):
    """A file that must be placed by hand (offline) is missing.

    ``files`` lists the file names expected and ``folder`` where to put them.
    """

    def __init__(self, message: str, files: list[str] | None = None, folder: str | None = None):
        super().__init__(message)
        self.files = list(files or [])
        self.folder = folder


class StorageError(LabError, OSError):
    """A write in the runs folder failed: the disk is full, read-only, failing, or not ours.

    Also an OSError (with the original ``errno``), so code that tolerates a failed best-effort
    write (``except OSError``) tolerates this one too. The message is ``problem`` (what failed,
    where, how much space is left) and ``remedy`` (what to do), ending with what to do next:
    ``sentence(then)`` lets the trainer say "then Resume: epoch 1 is saved" instead of "then try
    again".
    """

    def __init__(self, problem: str, remedy: str, errno: int | None = None, then: str = "try again"):
        self.problem, self.remedy = problem, remedy
        super().__init__(self.sentence(then))
        self.errno = errno

    def sentence(self, then: str) -> str:
        return f"{self.problem} {self.remedy}, then {then}."

    def __reduce__(self):   # picklable (a run in a child process reports it to the server)
        return type(self), (self.problem, self.remedy, self.errno)
