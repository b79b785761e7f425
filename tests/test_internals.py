"""Inside a trained run (core/internals.py): first-layer kernels trained beside initial, and the
feature maps of a chosen layer for a real image."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from core import explain, internals, rundir
from core.checkpoints import load_checkpoint
from core.config import RunConfig
from core.errors import ModelError
from core.trainer import fit


def _config(tiny_folder, epochs=2):
    return RunConfig.from_dict({"data": {"source": "folder", "location": str(tiny_folder), "batch_size": 16},
                                "model": {"name": "tutorial_net"}, "optim": {"lr": 0.05}, "epochs": epochs,
                                "device": "cpu", "seed": 3})


@pytest.fixture(scope="module")
def trained_run(tiny_folder, tmp_path_factory):
    result = fit(_config(tiny_folder), runs_dir=tmp_path_factory.mktemp("internals"))
    assert result.status == "finished", result.message
    return result.run_dir


def test_trained_kernels_are_the_checkpoints_and_differ_from_the_initial_ones(trained_run):
    k = internals.conv_kernels(trained_run)
    best = load_checkpoint(rundir.checkpoint(trained_run))["model"]["conv1.weight"].numpy()
    assert k["layer"] == "conv1" and k["trained"].shape == (6, 3, 5, 5)
    assert np.array_equal(k["trained"], best)
    assert k["initial"] is not None and k["initial"].shape == best.shape
    assert not np.allclose(k["initial"], k["trained"])
    assert np.allclose(k["change"], np.linalg.norm((k["trained"] - k["initial"]).reshape(6, -1), axis=1))
    assert (k["change"] > 0).all()
    # 6 filters: 3 a row, 2 rows, each 5×5 pixels × 6, 1-pixel gaps
    assert k["trained_grid"].size == k["initial_grid"].size == (3 * 31 + 1, 2 * 31 + 1)


def test_initial_kernels_are_the_weights_before_the_first_step(tiny_folder, tmp_path):
    """A run stopped before its first batch saves a checkpoint of untrained weights: the saved
    initial kernels are exactly those."""
    calls = iter([False])                      # the epoch starts, then a stop before batch 1
    result = fit(_config(tiny_folder, epochs=1), should_stop=lambda: next(calls, True), runs_dir=tmp_path)
    assert result.status == "stopped", result.message
    untrained = load_checkpoint(result.run_dir / rundir.LAST_CKPT)
    assert untrained["batches_done"] == 0
    k = internals.conv_kernels(result.run_dir / rundir.LAST_CKPT)
    assert np.array_equal(k["initial"], untrained["model"]["conv1.weight"].numpy())
    assert np.array_equal(k["initial"], k["trained"])


def test_kernel_grid_maps_zero_to_grey_and_the_extremes_to_black_and_white():
    w = torch.zeros(2, 3, 1, 1)
    w[0, :, 0, 0] = 1.0
    w[1, :, 0, 0] = -1.0
    grid = internals.kernel_grid(w, upscale=1, pad=0)
    assert grid.shape == (1, 2, 3)
    assert grid[0, 0].tolist() == [255, 255, 255] and grid[0, 1].tolist() == [0, 0, 0]
    assert internals.kernel_grid(torch.zeros(1, 3, 1, 1), scale=1.0, upscale=1, pad=0)[0, 0].tolist() == [128] * 3
    gray = internals.kernel_grid(torch.ones(4, 1, 3, 3), upscale=2, pad=1)
    assert gray.shape == (2 * 7 + 1, 2 * 7 + 1, 1)


def test_feature_layers_list_the_maps_a_tutorial_net_makes(trained_run):
    model = explain.load_predictor(trained_run).model
    table = internals.feature_layers(model, (3, 32, 32))
    rows = {r.layer: (r.channels, r.height, r.width) for r in table.itertuples()}
    assert rows == {"conv1": (6, 28, 28), "conv2": (16, 10, 10), "pool": (16, 5, 5)}   # pool: its last call


def test_feature_maps_are_the_layers_activations_most_active_first(trained_run, tiny_folder):
    predictor = explain.load_predictor(trained_run)
    image_file = sorted((tiny_folder / "test" / "airplane").glob("*.jpg"))[0]
    view, x = predictor.model_input(Image.open(image_file))
    out = internals.run_feature_maps(trained_run, image_file, "conv1", max_channels=4)
    conv = predictor.model.conv1
    expected = F.conv2d(x[None], conv.weight, conv.bias)[0].detach().numpy()
    assert out["maps"].shape == (4, 28, 28) and len(out["channels"]) == 4 and out["total"] == 6
    assert np.allclose(out["maps"], expected[out["channels"]], atol=1e-5)
    activity = np.abs(expected).mean(axis=(1, 2))
    assert out["channels"] == np.argsort(-activity)[:4].tolist()
    assert list(out["activity"]) == sorted(out["activity"], reverse=True)
    assert out["image"].size == view.size == (32, 32) and isinstance(out["grid"], Image.Image)
    with pytest.raises(ModelError, match="choose one of: conv1, conv2, pool"):
        internals.feature_maps(predictor.model, x, "fc1")


class _RecordingLock:
    """Stands in for Predictor.hooks_lock: says whether it is held right now."""

    def __init__(self):
        self.held = False

    def __enter__(self):
        assert not self.held
        self.held = True

    def __exit__(self, *exc):
        self.held = False


def test_feature_maps_and_layers_hold_the_shared_models_hooks_lock(trained_run, tiny_folder):
    """A Predictor is shared by every browser (ui.common.predictors): the hooks that record a
    layer's output go on only while its hooks_lock is held, and the lock is free again after."""
    predictor = explain.load_predictor(trained_run)
    predictor.hooks_lock = lock = _RecordingLock()
    seen = []
    predictor.model.conv1.register_forward_hook(lambda *_: seen.append(lock.held))
    image_file = sorted((tiny_folder / "test" / "airplane").glob("*.jpg"))[0]
    out = internals.run_feature_maps(predictor, image_file, "conv2", max_channels=3)
    assert out["maps"].shape == (3, 10, 10)
    table = internals.run_feature_layers(predictor)
    assert table["layer"].tolist() == ["conv1", "conv2", "pool"]
    assert seen == [True, True] and not lock.held
    with pytest.raises(ModelError):
        internals.run_feature_maps(predictor, image_file, "fc1")
    assert not lock.held


def test_a_checkpoint_without_first_conv_kernels_says_so(trained_run, tmp_path):
    ckpt = load_checkpoint(rundir.checkpoint(trained_run))
    del ckpt["model"]["conv1.weight"]
    torch.save(ckpt, tmp_path / "no_conv.pth")
    with pytest.raises(ModelError, match="no convolution as its first layer"):
        internals.conv_kernels(tmp_path / "no_conv.pth")


def test_auto_upscale_keeps_big_kernel_grids_projector_sized(trained_run):
    assert internals.auto_upscale(6, 5) == 6                  # the tutorial net: as large as before
    assert internals.auto_upscale(64, 7) == 6                 # ResNet's 64 filters of 7×7: 8 × 8 × 6 px
    assert internals.auto_upscale(768, 16) == 2               # a ViT's patch embedding
    assert internals.auto_upscale(10_000, 32) == 1
    auto = internals.conv_kernels(trained_run, upscale=None)
    assert auto["trained_grid"].size == internals.conv_kernels(trained_run)["trained_grid"].size
