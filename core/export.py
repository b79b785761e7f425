"""Export a trained model for use outside the lab: TorchScript, ONNX, and metrics as CSV.

Both model formats take a float32 batch N×C×H×W (any N), already preprocessed the way the run's
eval transform does it (resize/crop, scale to 0..1, normalise), and return logits N×K (apply a
softmax for probabilities). Beside each exported file a sidecar named after the whole file name
(``model.pt.json``, ``model.onnx.json``: ``sidecar_path``, so two exports into one folder never
overwrite each other's) says what that input and output are: class names, input shape, the eval
transform (normalisation mean/std...), the model name and the exporter used. The TorchScript
file also carries it inside
(``torch.jit.load(path, _extra_files={"classifier_lab.json": ""})``) and the ONNX file in its
metadata (``classes``, ``input_shape``, ``transform``).

ONNX needs the ``onnx`` package (the exporter builds the file with it); it is optional (not in
requirements.txt), and the error that says so gives the command that installs it into the
interpreter running this code (``install_command``). With ``onnxscript``
also installed the torch.export-based exporter (PyTorch's default since 2.9) is used, else the
TorchScript-based one (deprecated by PyTorch but complete and much faster on a CPU). When
``onnxruntime`` is installed the exported file is run once and compared with PyTorch.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from core import storage
from core.errors import ConfigError, DataError, ModelError

EXPORTERS = ("auto", "dynamo", "legacy")
CHECK_TOLERANCE = 1e-4   # max |difference| of logits between PyTorch and the exported model
INFO_ENTRY = "classifier_lab.json"
# The optional ONNX packages, pinned to the versions tests/test_export.py passes with beside the pinned
# torch (requirements-dev.txt gives only lower bounds). Not in requirements.txt: training needs none of them.
ONNX_PINS = {"onnx": "onnx==1.23.2", "onnxruntime": "onnxruntime==1.32.0", "onnxscript": "onnxscript==0.7.2"}


def install_command(*packages: str) -> str:
    """The pip command that installs ``packages`` (names from ONNX_PINS, pinned) for the Python
    running this code (``sys.executable -m pip``): a bare ``pip`` may belong to another Python
    than the server's virtual environment."""
    python = sys.executable or "python3"
    try:   # the README's .venv/bin/python: relative, so a page user is not told where the lab lives
        inside = Path(python).resolve(strict=False).relative_to(Path.cwd().resolve())
        python = inside.as_posix()
    except ValueError:
        pass
    if any(c.isspace() for c in python):
        python = f'"{python}"'
    return f"{python} -m pip install " + " ".join(ONNX_PINS.get(p, p) for p in packages)


def sidecar_path(model_path: str | Path) -> Path:
    """Where the JSON description of an exported model file lives: its whole file name plus
    ``.json`` (``run.pt`` -> ``run.pt.json``, ``run.onnx`` -> ``run.onnx.json``), so the
    TorchScript and ONNX exports of one run, side by side, each keep their own."""
    path = Path(model_path)
    return path.with_name(path.name + ".json")


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def onnx_available() -> bool:
    return _has("onnx")


def onnxscript_available() -> bool:
    return _has("onnxscript") and _has("onnx")


def onnxruntime_available() -> bool:
    return _has("onnxruntime")


def _load(checkpoint: str | Path):
    """(Predictor, info dict) for a checkpoint file or a run folder (its best, else last, checkpoint)."""
    from core.inference import Predictor, find_checkpoint

    path = Path(checkpoint)
    if path.is_dir():
        path = find_checkpoint(path)
    predictor = Predictor(path, device="cpu")
    predictor.model.eval()
    info = {"model": predictor.model_name, "classes": predictor.classes,
            "input_shape": list(predictor.input_shape), "input": "float32 N×C×H×W, preprocessed by 'transform'",
            "output": "logits N×K (softmax gives probabilities), K = len(classes)",
            "transform": predictor.transform_state, "epoch": predictor.epoch, "checkpoint": str(path)}
    return predictor, info


def _example(input_shape, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *input_shape), generator=g)


def _write_info(out_path: Path, info: dict) -> Path:
    side = sidecar_path(out_path)
    storage.atomic_write_json(side, info)
    return side


def _check_close(expected: torch.Tensor, got, what: str, path: Path) -> float:
    got = torch.as_tensor(np.asarray(got)) if not isinstance(got, torch.Tensor) else got
    if tuple(got.shape) != tuple(expected.shape):
        raise ModelError(f"The exported {what} model {path.name} gives output of shape {tuple(got.shape)}, "
                         f"PyTorch {tuple(expected.shape)}: the export is wrong; please report it.")
    diff = float((got.float() - expected.float()).abs().max()) if expected.numel() else 0.0
    if not diff <= CHECK_TOLERANCE:
        raise ModelError(f"The exported {what} model {path.name} differs from PyTorch by {diff:.2g} "
                         f"(more than {CHECK_TOLERANCE:g}) on a test batch; do not use it, and please report it.")
    return diff


def _prepare_out(out_path: str | Path, suffix: str) -> Path:
    out = Path(out_path)
    if out.suffix == "":
        out = out.with_suffix(suffix)
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def export_torchscript(checkpoint: str | Path, out_path: str | Path) -> Path:
    """Trace the checkpoint's model into a TorchScript file (``.pt``) with a free batch size.

    Load it with ``torch.jit.load(path)`` (no lab code needed). The traced model is run on a
    batch of another size and compared with PyTorch before the file is kept. Returns the file's
    path; its description is written to ``sidecar_path(path)``."""
    predictor, info = _load(checkpoint)
    out = _prepare_out(out_path, ".pt")
    model = predictor.model
    info.update(format="torchscript", exporter=f"torch.jit.trace (torch {torch.__version__})")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export; tracer notes
        traced = torch.jit.trace(model, _example(predictor.input_shape, 2), check_trace=False)
        x = _example(predictor.input_shape, 3, seed=1)
        _check_close(model(x), traced(x), "TorchScript", out)
        tmp = out.with_name(out.name + ".tmp")
        torch.jit.save(traced, str(tmp), _extra_files={INFO_ENTRY: json.dumps(info, ensure_ascii=False)})
    os.replace(tmp, out)
    _write_info(out, info)
    return out


def _check_onnx_options(opset, exporter: str) -> None:
    """ConfigError, before any work, for a bad opset or exporter or a missing package (with the
    command that installs it for this Python)."""
    if exporter not in EXPORTERS:
        raise ConfigError(f"ONNX exporter must be one of {', '.join(EXPORTERS)}; got {exporter!r}.")
    if not onnx_available():
        raise ConfigError("ONNX export needs the onnx package, which is not installed for the Python that "
                          f"runs the lab. Install it (with onnxruntime, which checks the exported file) by "
                          f"running {install_command('onnx', 'onnxruntime')}.")
    if exporter == "dynamo" and not onnxscript_available():
        raise ConfigError("The torch.export-based ONNX exporter needs the onnxscript package: "
                          f"{install_command('onnxscript')}, or choose the 'legacy' exporter.")
    if opset is not None and (not isinstance(opset, int) or isinstance(opset, bool) or opset < 7):
        raise ConfigError(f"ONNX opset must be a whole number of at least 7 (or empty for the exporter's "
                          f"choice); got {opset!r}.")


def export_onnx(checkpoint: str | Path, out_path: str | Path, opset: int | None = None,
                exporter: str = "auto") -> Path:
    """Export the checkpoint's model to ONNX (``.onnx``, weights inside, dynamic batch axis).

    opset: None lets the exporter choose (its recommended opset). exporter: "auto" (the
    torch.export-based exporter when onnxscript is installed, else the TorchScript-based one),
    "dynamo" or "legacy". Input name ``input``, output name ``logits``. Returns the file's path;
    its description is written to ``sidecar_path(path)``."""
    _check_onnx_options(opset, exporter)
    use_dynamo = exporter == "dynamo" or (exporter == "auto" and onnxscript_available())
    predictor, info = _load(checkpoint)
    out = _prepare_out(out_path, ".onnx")
    model = predictor.model
    example = _example(predictor.input_shape, 2)
    tmp = out.with_name(out.name + ".tmp.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice, tracer notes
        try:
            if use_dynamo:
                batch = torch.export.Dim("batch", min=1)
                torch.onnx.export(model, (example,), str(tmp), dynamo=True, external_data=False,
                                  opset_version=opset, input_names=["input"], output_names=["logits"],
                                  dynamic_shapes=({0: batch},), verbose=False)
            else:
                torch.onnx.export(model, (example,), str(tmp), dynamo=False, opset_version=opset,
                                  input_names=["input"], output_names=["logits"],
                                  dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                                  do_constant_folding=True)
        except Exception as err:
            tmp.unlink(missing_ok=True)
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            raise ModelError(f"ONNX export of {predictor.model_name} from {predictor.path} failed "
                             f"({type(err).__name__}: {first}). "
                             + ("Try exporter='legacy'." if use_dynamo else
                                "Try another opset, or TorchScript export instead.")) from None
    import onnx

    proto = onnx.load(str(tmp))
    used_opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    info.update(format="onnx", opset=used_opset,
                exporter=("torch.onnx.export(dynamo=True)" if use_dynamo else "torch.onnx.export(dynamo=False)")
                + f" (torch {torch.__version__})")
    for key in ("classes", "input_shape", "transform", "model"):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(info[key], ensure_ascii=False)
    onnx.save(proto, str(tmp))
    if onnxruntime_available():
        import onnxruntime as ort

        x = _example(predictor.input_shape, 3, seed=1)
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            _check_close(model(x), got, "ONNX", out)
        info["checked_with"] = f"onnxruntime {ort.__version__}"
    os.replace(tmp, out)
    _write_info(out, info)
    return out


EPOCH_COLUMNS = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "seconds",
                 "images_per_sec", "is_best"]


def export_metrics_csv(run_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """Write a run's metrics as CSV files into ``out_dir`` and return their paths:
    ``<run>-epochs.csv`` (one row per epoch: losses, accuracies 0..1, learning rate, seconds,
    images/s), and when the run was evaluated ``<run>-per-class.csv`` (precision, recall, F1,
    support per class, then the macro and weighted averages) and ``<run>-confusion.csv``
    (counts; rows = true class, columns = predicted class)."""
    from core.runrecord import load_run

    record = load_run(run_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    if not record.epochs.empty:
        df = record.epochs.reindex(columns=EPOCH_COLUMNS)
        path = out_dir / f"{record.run_id}-epochs.csv"
        df.to_csv(path, index=False, encoding="utf-8")
        paths.append(path)
    report = record.report()
    if report is not None:
        per_class = report.per_class.copy()
        averages = report.averages.rename(columns={"average": "class"})
        averages["class"] = averages["class"].map(lambda a: f"({a} average)")
        table = pd.concat([per_class, averages[list(per_class.columns)]], ignore_index=True)
        path = out_dir / f"{record.run_id}-per-class.csv"
        table.to_csv(path, index=False, encoding="utf-8")
        paths.append(path)
        confusion = pd.DataFrame(np.asarray(report.confusion), index=pd.Index(report.class_names, name="true"),
                                 columns=report.class_names)
        path = out_dir / f"{record.run_id}-confusion.csv"
        confusion.to_csv(path, encoding="utf-8")
        paths.append(path)
    if not paths:
        raise DataError(f"Run {record.run_id} has no metrics yet (no finished epoch and no evaluation): "
                        "train it for at least one epoch first.")
    return paths
