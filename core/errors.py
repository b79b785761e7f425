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
