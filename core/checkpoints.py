"""Checkpoints: one plain dict, written atomically, read with ``weights_only=True``.

Contents: model/optimizer/scheduler/scaler state, epochs completed, the run configuration, class
names, the eval transform (as data, see ``core.transforms.transform_state``), RNG states and the
metric history. A checkpoint written by a stop in the middle of an epoch also has
``batches_done`` > 0 and ``partial_epoch``: the epoch's running loss/accuracy sums and, when the stop
cut a gradient-accumulation group, that group's gradients so far; its RNG states are those from
before the next batch was fetched. Together they let a resumed run continue exactly. Nothing in it needs this project to load: ``torch.load(path, weights_only=True)``
gives the dict, and ``ckpt["model"]`` is a state_dict for the torchvision architecture named in
``ckpt["model_name"]`` (see README, "Using a checkpoint without the lab").
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core import rundir, storage
from core.errors import DataError

FORMAT = "classifier-lab/1"


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, then a rename,
    so a crash, a stop or a full disk mid-write never leaves a half-written checkpoint where a good
    one was. The rename is made durable before returning (the trainer writes the status that
    describes this checkpoint only after). A failed write raises an OSError with its errno, also
    when PyTorch hid it in a RuntimeError (see ``storage.os_error_for``); the partial file is
    removed, giving its space back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format": FORMAT, **state}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        # Asked before the partial file is removed: its bytes are what the disk could not hold.
        reason = storage.os_error_for(err, path.parent) if isinstance(err, RuntimeError) else None
        Path(tmp).unlink(missing_ok=True)
        if reason is not None:
            raise reason from err
        raise
    storage.fsync_folder(path.parent)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` (nothing in the file is executed).

    Raises DataError naming the file (never where the server keeps it) when it is missing, not a
    PyTorch file, holds code a safe load refuses, is damaged, or is not a lab checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Checkpoint {path.name} does not exist. Pick a run with a saved checkpoint "
                        "or upload a .pth file.")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # any parse failure of a foreign or damaged file (torch raises many kinds)
        raise DataError(_unreadable_reason(path, err)) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise DataError(f"{path.name} is a PyTorch file but not a Classifier Lab checkpoint "
                        "(no 'format' entry). To use plain weights, pick them as 'your own "
                        "weights (.pth)' on the Model tab instead.")
    return state


# How a torch.save file starts: a zip archive (the format since PyTorch 1.6) or, for the legacy
# format, a pickle (protocol 2+ starts with the PROTO opcode 0x80).
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_PICKLE_PROTO = b"\x80"


def _unreadable_reason(path: Path, err: Exception) -> str:
    """Why torch.load refused ``path``, in the lab's words. PyTorch's own text is long, advises
    weights_only=False (exactly what must not be done with an untrusted file) and was cut off
    mid-sentence when quoted; so it is classified, not quoted."""
    try:
        with path.open("rb") as fh:
            head = fh.read(4)
    except OSError:
        head = b""
    if not head.startswith(_ZIP_MAGIC) and not head.startswith(_PICKLE_PROTO):
        return (f"{path.name} is not a PyTorch file (not a zip archive or pickle). Upload a .pth "
                f"checkpoint saved by the lab ({rundir.BEST_CKPT} or {rundir.LAST_CKPT} of a run).")
    if "weights only load failed" in str(err).lower():
        return (f"{path.name} contains code objects that a safe load refuses (weights_only), so it "
                "was not loaded; only load checkpoints saved by the lab.")
    return (f"{path.name} is a damaged or incomplete PyTorch file ({type(err).__name__}); save or "
            "download it again.")


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states in weights_only-loadable types (lists and tensors)."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    if not state:
        return
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
