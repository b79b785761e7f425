"""Export (core.export): TorchScript and ONNX give the same logits as PyTorch on real images, the
metrics CSVs hold the run's numbers, and TensorBoard logging writes an event file."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from core import events as ev, export, tb
from core.checkpoints import save_checkpoint
from core.config import RunConfig
from core.errors import ConfigError
from core.inference import Predictor
from core.jobs import JobManager
from core.runs import load_run
from core.trainer import fit, prepare

TOL = 1e-4


def _config(tiny_folder, model="tutorial_net", epochs=1) -> RunConfig:
    return RunConfig.from_dict({
        "data": {"source": "folder", "location": str(tiny_folder), "batch_size": 16},
        "model": {"name": model, "small_input_stem": True}, "optim": {"lr": 0.01},
        "epochs": epochs, "device": "cpu", "seed": 3})


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_folder) -> Path:
    """The tutorial net trained for 2 epochs on the tiny set (a real run folder)."""
    result = fit(_config(tiny_folder, epochs=2), runs_dir=tmp_path_factory.mktemp("runs"))
    assert result.status == ev.FINISHED, result.message
    return result.run_dir


@pytest.fixture(scope="module")
def mobilenet_checkpoint(tmp_path_factory, tiny_folder) -> Path:
    """A MobileNetV3-Small (small-input stem) checkpoint in the lab's format. Training it takes
    too long for a unit test on a CPU, so its BatchNorm statistics are set by forward passes over
    the real training images (what matters here is that the exported graph computes the same
    function, BatchNorm in eval mode, hardswish and squeeze-excitation included)."""
    config = _config(tiny_folder, model="mobilenet_v3_small")
    prep = prepare(config)
    model = prep.model.train()
    with torch.no_grad():
        for i, (x, _) in enumerate(prep.train_loader):
            if i == 3:
                break
            model(x)
    path = tmp_path_factory.mktemp("mnv3") / "best.pth"
    save_checkpoint(path, {"model": model.state_dict(), "model_name": config.model.name, "epoch": 0,
                           "config": config.to_dict(), "classes": prep.classes, "transform": prep.transform_state,
                           "input_shape": [prep.in_channels, *prep.input_size]})
    return path


def _real_batch(predictor: Predictor, tiny_folder: Path) -> torch.Tensor:
    """The tiny set's test images, preprocessed with the run's own eval transform."""
    files = sorted((tiny_folder / "test").rglob("*.jpg"))
    assert len(files) == 30
    from core.inference import open_image
    return torch.stack([predictor._eval_tf(open_image(f, predictor.mode)) for f in files])


def _checkpoint(run_or_ckpt) -> Path:
    path = Path(run_or_ckpt)
    return path / "best.pth" if path.is_dir() else path


@pytest.mark.filterwarnings("ignore:`torch.jit")
@pytest.mark.parametrize("which", ["tutorial_net", pytest.param("mobilenet_v3_small", marks=pytest.mark.slow)])
def test_torchscript_and_onnx_match_pytorch_on_real_images(which, trained_run, mobilenet_checkpoint,
                                                          tiny_folder, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    ckpt = _checkpoint(trained_run if which == "tutorial_net" else mobilenet_checkpoint)
    predictor = Predictor(ckpt)
    x = _real_batch(predictor, tiny_folder)                     # 30 images: not the export batch size
    with torch.no_grad():
        expected = predictor.model(x)
    assert expected.shape == (30, 3) and expected.std() > 0

    ts_path = export.export_torchscript(ckpt, tmp_path / "model.pt")
    extra = {export.INFO_ENTRY: ""}
    scripted = torch.jit.load(str(ts_path), _extra_files=extra)
    with torch.no_grad():
        got_ts = scripted(x)
    assert (got_ts - expected).abs().max().item() <= TOL
    info = json.loads(extra[export.INFO_ENTRY])
    assert info["classes"] == ["airplane", "cat", "ship"] and info["model"] == which
    assert info["input_shape"] == list(x.shape[1:])

    onnx_path = export.export_onnx(ckpt, tmp_path / "model.onnx", exporter="legacy")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    assert inp.name == "input" and not isinstance(inp.shape[0], int)   # dynamic batch axis
    got_onnx = session.run(None, {"input": x.numpy()})[0]
    assert np.abs(got_onnx - expected.numpy()).max() <= TOL
    assert np.abs(session.run(None, {"input": x[:1].numpy()})[0] - expected[:1].numpy()).max() <= TOL
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["classes"]) == ["airplane", "cat", "ship"]
    side = json.loads(export.sidecar_path(onnx_path).read_text(encoding="utf-8"))
    assert side["format"] == "onnx" and side["opset"] >= 13 and "dynamo=False" in side["exporter"]
    assert side["transform"] == predictor.transform_state


@pytest.mark.parametrize("which", ["tutorial_net", pytest.param("mobilenet_v3_small", marks=pytest.mark.slow)])
def test_onnx_with_the_torch_export_based_exporter(which, trained_run, mobilenet_checkpoint, tiny_folder, tmp_path):
    """The path the dashboard takes: export_onnx with its default exporter ("auto"), which with
    onnxscript installed is the torch.export-based one."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    ckpt = _checkpoint(trained_run if which == "tutorial_net" else mobilenet_checkpoint)
    path = export.export_onnx(ckpt, tmp_path / "dynamo.onnx")     # exporter="auto", as ui/tab_compare.py calls it
    side = json.loads(export.sidecar_path(path).read_text(encoding="utf-8"))
    assert "dynamo=True" in side["exporter"] and side["model"] == which
    assert not list(tmp_path.glob("*.data"))   # weights inside the one file
    predictor = Predictor(ckpt)
    x = _real_batch(predictor, tiny_folder)   # 30 real images, not the batch size it was exported with
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    assert inp.name == "input" and not isinstance(inp.shape[0], int)   # dynamic batch axis
    with torch.no_grad():
        expected = predictor.model(x).numpy()
    assert expected.shape == (30, 3) and expected.std() > 0
    assert np.abs(session.run(None, {"input": x.numpy()})[0] - expected).max() <= TOL
    assert np.abs(session.run(None, {"input": x[:1].numpy()})[0] - expected[:1]).max() <= TOL
    assert json.loads(session.get_modelmeta().custom_metadata_map["classes"]) == ["airplane", "cat", "ship"]


def test_onnx_export_explains_missing_packages_and_bad_options(trained_run, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="exporter"):
        export.export_onnx(trained_run, tmp_path / "m.onnx", exporter="fast")
    with pytest.raises(ConfigError, match="opset"):
        export.export_onnx(trained_run, tmp_path / "m.onnx", opset=3)
    monkeypatch.setattr(export, "onnxscript_available", lambda: False)
    with pytest.raises(ConfigError, match="pip install onnxscript"):
        export.export_onnx(trained_run, tmp_path / "m.onnx", exporter="dynamo")
    monkeypatch.setattr(export, "onnx_available", lambda: False)
    with pytest.raises(ConfigError, match="pip install onnx"):
        export.export_onnx(trained_run, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_missing_onnx_hint_installs_into_the_python_running_the_server(trained_run, tmp_path, monkeypatch):
    """A bare 'pip install onnx' may install into another Python than the server's .venv: the
    hint is '<this interpreter> -m pip install' with pinned versions."""
    import sys

    monkeypatch.setattr(export, "onnx_available", lambda: False)
    monkeypatch.setattr(sys, "executable", "/srv/lab/.venv/bin/python")
    with pytest.raises(ConfigError) as err:
        export.export_onnx(trained_run, tmp_path / "m.onnx")
    assert "/srv/lab/.venv/bin/python -m pip install onnx==1.23.2 onnxruntime==1.32.0" in str(err.value)
    monkeypatch.setattr(export, "onnx_available", lambda: True)
    monkeypatch.setattr(export, "onnxscript_available", lambda: False)
    monkeypatch.setattr(sys, "executable", r"C:\Program Files\Lab\.venv\Scripts\python.exe")
    with pytest.raises(ConfigError) as err:
        export.export_onnx(trained_run, tmp_path / "m.onnx", exporter="dynamo")
    assert r'"C:\Program Files\Lab\.venv\Scripts\python.exe" -m pip install onnxscript==0.7.2' in str(err.value)
    assert not list(tmp_path.iterdir())
    # the README's .venv under the lab's folder: named relative to it (a page user is not told where
    # the lab is installed)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "executable", str(tmp_path / ".venv" / "bin" / "python"))
    with pytest.raises(ConfigError) as err:
        export.export_onnx(trained_run, tmp_path / "m.onnx", exporter="dynamo")
    assert ".venv/bin/python -m pip install onnxscript" in str(err.value) and str(tmp_path) not in str(err.value)


@pytest.mark.filterwarnings("ignore:`torch.jit")
def test_torchscript_and_onnx_exports_side_by_side_keep_their_own_sidecars(trained_run, tmp_path):
    """run.pt and run.onnx in one folder: each its own description (run.pt.json, run.onnx.json);
    the ONNX export, done second, leaves the TorchScript one as it was."""
    pytest.importorskip("onnx")
    ts = export.export_torchscript(trained_run, tmp_path / "run.pt")
    ts_side = tmp_path / "run.pt.json"
    ts_text = ts_side.read_text(encoding="utf-8")
    onnx_path = export.export_onnx(trained_run, tmp_path / "run.onnx", exporter="legacy")
    onnx_side = tmp_path / "run.onnx.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.onnx", "run.onnx.json", "run.pt", "run.pt.json"]
    assert ts_side.read_text(encoding="utf-8") == ts_text          # untouched by the ONNX export
    ts_info, onnx_info = json.loads(ts_text), json.loads(onnx_side.read_text(encoding="utf-8"))
    assert ts_info["format"] == "torchscript" and "torch.jit.trace" in ts_info["exporter"]
    assert onnx_info["format"] == "onnx" and "dynamo=False" in onnx_info["exporter"]
    extra = {export.INFO_ENTRY: ""}
    torch.jit.load(str(ts), _extra_files=extra)
    assert json.loads(extra[export.INFO_ENTRY]) == ts_info          # the sidecar is this file's own description
    assert ts_info["classes"] == onnx_info["classes"] == ["airplane", "cat", "ship"]
    assert export.sidecar_path(ts) == ts_side and export.sidecar_path(onnx_path) == onnx_side   # what a caller lists


def test_export_takes_a_run_folder_and_explains_a_missing_checkpoint(trained_run, tmp_path):
    path = export.export_torchscript(trained_run, tmp_path / "from-folder")   # suffix added
    assert path.name == "from-folder.pt" and path.is_file()
    empty = tmp_path / "empty-run"
    empty.mkdir()
    with pytest.raises(Exception, match="no checkpoint"):
        export.export_torchscript(empty, tmp_path / "x.pt")


def test_metrics_csv_content(trained_run, tmp_path):
    paths = export.export_metrics_csv(trained_run, tmp_path / "csv")
    names = [p.name for p in paths]
    run_id = trained_run.name
    assert names == [f"{run_id}-epochs.csv", f"{run_id}-per-class.csv", f"{run_id}-confusion.csv"]
    record = load_run(trained_run)
    epochs = pd.read_csv(paths[0])
    assert list(epochs.columns) == export.EPOCH_COLUMNS and list(epochs["epoch"]) == [1, 2]
    assert np.allclose(epochs["val_accuracy"], record.epochs["val_accuracy"])
    assert epochs["train_loss"].gt(0).all() and np.allclose(epochs["lr"], record.epochs["lr"])
    assert list(epochs["lr"]) == pytest.approx([0.01, 0.005])   # cosine over 2 epochs: the rate each trained at
    per_class = pd.read_csv(paths[1])
    report = record.report()
    assert list(per_class["class"]) == ["airplane", "cat", "ship", "(macro average)", "(weighted average)"]
    assert np.allclose(per_class["recall"][:3], report.per_class["recall"])
    assert per_class["support"][:3].sum() == report.num_samples == 30
    confusion = pd.read_csv(paths[2], index_col=0)
    assert list(confusion.index) == list(confusion.columns) == ["airplane", "cat", "ship"]
    assert confusion.to_numpy().sum() == 30
    assert np.trace(confusion.to_numpy()) / 30 == pytest.approx(report.accuracy)


def test_metrics_csv_of_a_run_without_metrics_says_so(trained_run, tmp_path):
    import shutil
    bare = tmp_path / "bare-run"
    bare.mkdir()
    shutil.copy(trained_run / "config.json", bare / "config.json")
    with pytest.raises(Exception, match="no metrics yet"):
        export.export_metrics_csv(bare, tmp_path / "out")


# ---- TensorBoard -----------------------------------------------------------------------------
def test_tensorboard_missing_package_gives_the_install_command(monkeypatch, tmp_path, tiny_folder):
    monkeypatch.setattr(tb, "available", lambda: False)
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        tb.TensorBoardLogger()
    assert "| cat |" in tb.confusion_text([[1, 0], [2, 3]], ["cat", "dog"])
    # A run asking for its own log fails fast, with the command, instead of training unlogged:
    # at submit for the job manager (nothing is queued, no folder is made) ...
    config = _config(tiny_folder)
    config.tensorboard = True
    manager = JobManager(runs_dir=tmp_path / "runs", data_dir=tmp_path / "data", max_jobs=1)
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        manager.submit(config)
    assert manager.jobs() == [] and not (tmp_path / "runs").exists()
    # ... and as a failed run, with the same message, for a plain fit() call.
    result = fit(config, runs_dir=tmp_path / "fit")
    assert result.status == ev.FAILED and "pip install tensorboard" in result.message
    assert result.epochs_completed == 0 and not (result.run_dir / "last.pth").exists()


def _cell_darkness(pixels: np.ndarray, image: tb.ConfusionImage, i: int, j: int) -> float:
    """How dark cell (i, j) is, read from a corner where no count is written."""
    left, top, _, _ = image.cell_box(i, j)
    return 255.0 - float(pixels[top + 2, left + 2].mean())


def test_confusion_image_colours_follow_the_counts_and_names_label_the_axes():
    cm = np.array([[50, 3, 0], [10, 20, 1], [0, 7, 35]])
    names = ["airplane", "cat", "ship"]
    image = tb.confusion_image(cm, names)
    px = image.pixels
    assert px.dtype == np.uint8 and px.ndim == 3 and px.shape[2] == 3
    left, top, _, _ = image.cell_box(0, 0)
    _, _, right, bottom = image.cell_box(2, 2)
    assert 0 < left < right <= px.shape[1] and 0 < top < bottom <= px.shape[0]
    dark = {(i, j): _cell_darkness(px, image, i, j) for i in range(3) for j in range(3)}
    by_count = sorted(dark, key=lambda ij: cm[ij])
    assert [dark[ij] for ij in by_count] == sorted(dark.values())      # more counts, darker cell
    assert max(dark, key=dark.get) == (0, 0) and dark[(0, 2)] == dark[(2, 0)] < 10   # zero: near white
    # Counts are written in the cells (pixels of another colour than the cell's own) ...
    x0, y0, x1, y1 = image.cell_box(0, 0)
    assert (np.abs(px[y0:y1, x0:x1].astype(int) - px[y0 + 2, x0 + 2]).sum(axis=2) > 100).any()
    # ... and the class names left of the grid and under it (ink outside the grid and title).
    assert (px[top:bottom, :left - 8] < 128).any() and (px[bottom + 4:, left:right] < 128).any()
    # Many classes: smaller cells without text, still one colour per count, still an image.
    big = tb.confusion_image(np.diag(np.arange(1, 151)), [f"class {k}" for k in range(150)])
    assert big.cell >= 1 and max(big.pixels.shape[:2]) < 1600
    assert _cell_darkness(big.pixels, big, 149, 149) > _cell_darkness(big.pixels, big, 10, 10) > 0


def _decode(image_event) -> np.ndarray:
    import io

    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(image_event.encoded_image_string)).convert("RGB"))


def test_tensorboard_event_file_written(tmp_path, tiny_folder):
    if not tb.available():
        pytest.skip("tensorboard is not installed (pip install tensorboard; it is in requirements-dev.txt)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    manager = JobManager(runs_dir=tmp_path, data_dir=tmp_path / "data", max_jobs=1)
    logger = tb.TensorBoardLogger(images=8).attach(manager)
    job = manager.submit(_config(tiny_folder, epochs=2), owner="alice")
    manager.wait(job.job_id, timeout=120)
    assert job.status == ev.FINISHED, job.message
    run_dir = tmp_path / job.job_id
    event_files = list(run_dir.glob("events.out.tfevents.*"))
    assert len(event_files) == 1
    acc = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("loss/train", "loss/val", "accuracy/train", "accuracy/val", "lr"):
        assert [s.step for s in acc.Scalars(tag)] == [1, 2], tag
    report = json.loads((run_dir / "eval.json").read_text(encoding="utf-8"))   # the run trained in another process
    assert acc.Scalars("test/accuracy")[0].value == pytest.approx(report["accuracy"], abs=1e-6)
    assert len(acc.Scalars("batch/loss")) >= 2
    assert "inputs" in tags["images"]
    texts = set(tags["tensors"])   # add_text is stored as tensors
    assert {"config/text_summary", "status/text_summary", "test/confusion_matrix/text_summary"} <= texts
    # The confusion matrix as an image (no matplotlib needed): the run's own counts, drawn.
    assert "test/confusion_matrix" in tags["images"]
    logged = acc.Images("test/confusion_matrix")[-1]
    cm = np.asarray(report["confusion"])
    expected = tb.confusion_image(cm, report["class_names"])
    assert (logged.height, logged.width) == expected.pixels.shape[:2]
    pixels = _decode(logged)
    assert np.array_equal(pixels, expected.pixels)   # PNG is lossless: exactly what was drawn
    dark = {(i, j): _cell_darkness(pixels, expected, i, j) for i in range(3) for j in range(3)}
    assert [dark[ij] for ij in sorted(dark, key=lambda ij: cm[ij])] == sorted(dark.values())
    assert dark[max(dark, key=lambda ij: cm[ij])] == max(dark.values())   # the largest count is the darkest
    logger.close()


def test_a_run_asks_for_its_own_tensorboard_log(tmp_path, tiny_folder):
    """config.tensorboard: an event file for that run although the server logs no run (no
    TensorBoardLogger attached), and only one when the server logs every run as well."""
    if not tb.available():
        pytest.skip("tensorboard is not installed (pip install tensorboard; it is in requirements-dev.txt)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = _config(tiny_folder)
    config.tensorboard = True
    plain = JobManager(runs_dir=tmp_path / "a", data_dir=tmp_path / "data", max_jobs=1)
    job = plain.wait(plain.submit(config).job_id, timeout=120)
    assert job.status == ev.FINISHED, job.message
    run_dir = tmp_path / "a" / job.job_id
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    acc = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    assert [s.step for s in acc.Scalars("loss/train")] == [1]
    assert "test/confusion_matrix" in acc.Tags()["images"]
    assert json.loads((run_dir / "config.json").read_text(encoding="utf-8"))["tensorboard"] is True
    # A server with --tensorboard as well: the attached logger leaves this run to the trainer.
    logged = JobManager(runs_dir=tmp_path / "b", data_dir=tmp_path / "data", max_jobs=1)
    logger = tb.TensorBoardLogger(images=0).attach(logged)
    job = logged.wait(logged.submit(config).job_id, timeout=120)
    assert job.status == ev.FINISHED, job.message
    assert len(list((tmp_path / "b" / job.job_id).glob("events.out.tfevents.*"))) == 1
    logger.close()


@pytest.mark.filterwarnings("ignore:`torch.jit")
def test_the_history_export_hands_over_the_model_and_its_own_description(trained_run):
    """Compare → Run history → TorchScript: both files it lists exist (the description is the
    model file's own, run.pt.json, not a shared run.json)."""
    from ui.common import AppContext
    from ui.tab_compare import export_files
    ctx = AppContext(manager=None, data_dir=trained_run.parent, runs_dir=trained_run.parent)
    files = [Path(f) for f in export_files(ctx, trained_run.name, "torchscript")]
    assert [f.name for f in files] == [f"{trained_run.name}.pt", f"{trained_run.name}.pt.json"]
    assert all(f.is_file() for f in files)
