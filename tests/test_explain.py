"""Grad-CAM (core/explain.py): it points at what decides the class on images made for the test,
works for every model of the zoo, and explains a trained run's image."""
import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from core import explain, models
from core.config import RunConfig
from core.errors import DataError
from core.trainer import fit

PATCH = 8          # side of the bright square that decides the class
SIZE = 32


@contextlib.contextmanager
def one_thread():
    """One intra-op thread: on a loaded 2-core machine two threads of tiny convolutions spin-wait."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def patch_images(n, seed):
    """Noise in [0, 0.6] with a white PATCH×PATCH square: class 0 top-left, class 1 bottom-right,
    class 2 none. The third class makes each patch's *presence* the evidence of its class (with
    two classes, "no square top-left" alone would decide class 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, SIZE, SIZE, generator=g) * 0.6
    y = torch.randint(0, 3, (n,), generator=g)
    x[y == 0, :, :PATCH, :PATCH] = 1.0
    x[y == 1, :, SIZE - PATCH:, SIZE - PATCH:] = 1.0
    return (x - 0.5) / 0.5, y


def train_tutorial_net(x, y, epochs=8, seed=0):
    torch.manual_seed(seed)
    model = models.create_model("tutorial_net", 3, 3, SIZE).model
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(x), 32):
            idx = order[i:i + 32]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def peaks_inside_patch(model, x, y):
    """How many images of classes 0 and 1 have their Grad-CAM peak (for their class) inside their patch."""
    hits = total = 0
    for img, label in zip(x, y.tolist()):
        if label == 2:
            continue
        heat = explain.grad_cam(model, img, label, "tutorial_net")
        r, c = np.unravel_index(int(heat.argmax()), heat.shape)
        lo = 0 if label == 0 else SIZE - PATCH
        hits += lo <= r < lo + PATCH and lo <= c < lo + PATCH
        total += 1
    return hits, total


def test_grad_cam_peaks_on_the_patch_that_decides_the_class_and_not_for_shuffled_labels():
    """Measured: trained model 46/51 peaks inside the patch; the same net trained on shuffled
    labels 24/51 (the bright square draws activations in any net, hence above the 6 % of the
    area a random peak would hit)."""
    with one_thread():
        x_train, y_train = patch_images(512, seed=0)
        x_test, y_test = patch_images(75, seed=1)
        model = train_tutorial_net(x_train, y_train)
        assert (model(x_test).argmax(1) == y_test).float().mean() >= 0.95   # it did learn the rule
        hits, total = peaks_inside_patch(model, x_test, y_test)
        shuffled = y_train[torch.randperm(len(y_train), generator=torch.Generator().manual_seed(5))]
        control = train_tutorial_net(x_train, shuffled)
        control_hits, _ = peaks_inside_patch(control, x_test, y_test)
    assert hits / total >= 0.8, f"trained: {hits}/{total} peaks inside the patch"
    assert control_hits / total <= 0.6, f"shuffled labels: {control_hits}/{total} peaks inside the patch"
    assert hits - control_hits >= 0.3 * total


def _random_model(spec):
    torch.manual_seed(0)
    size = max(32, models.min_input_size(spec.name, True))
    created = models.create_model(spec.name, 10, 3, size, small_input_stem=True)
    if spec.name == "vit_b_16":   # torchvision zeroes a ViT's head: every class score would be flat
        nn.init.normal_(created.model.heads.head.weight, std=0.02)
    return created


@pytest.mark.parametrize("spec", models.list_models(), ids=lambda s: s.name)
def test_every_zoo_model_gives_a_heatmap_of_its_input_size(spec):
    with one_thread():
        created = _random_model(spec)
        x = torch.randn(3, *created.input_size, generator=torch.Generator().manual_seed(1))
        maps = [explain.grad_cam(created.model, x, c, spec.name) for c in range(10)]
    assert all(m.shape == tuple(created.input_size) and m.dtype == np.float32 for m in maps)
    assert all(np.isfinite(m).all() and m.min() >= 0 and m.max() <= 1 for m in maps)
    assert any(m.max() == 1.0 and m.min() < 1.0 for m in maps)   # a real map: a peak, and less elsewhere
    assert created.model.training                                 # the train mode is put back


def test_vit_grad_cam_is_the_gradient_weighted_patch_tokens_in_grid_order():
    """A hand computation of Grad-CAM on the last block's LayerNorm tokens, reshaped row by row
    to the patch grid, gives what explain.grad_cam gives (Captum and the token-grid hook)."""
    with one_thread():
        created = _random_model(models.get_model_spec("vit_b_16"))
        model = created.model.eval()
        x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
        layer, _ = models.cam_layer("vit_b_16")
        kept = {}
        handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: kept.setdefault("tokens", o))
        score = model(x)[0, 3]
        handle.remove()
        tokens = kept["tokens"][0, 1:]                                  # (h·w) × D patch tokens
        grads = torch.autograd.grad(score, kept["tokens"])[0][0, 1:]
        cam = torch.relu((tokens * grads.mean(0)).sum(1)).reshape(1, 1, *model.grid)
        expected = F.interpolate(cam, (32, 32), mode="bilinear")[0, 0]
        expected = (expected / expected.max()).detach().numpy()
        got = explain.grad_cam(model, x[0], 3, "vit_b_16")
    assert np.allclose(got, expected, atol=1e-5)


def test_overlay_mixes_the_colour_in_by_heat_and_opacity():
    image = Image.fromarray(np.full((4, 6, 3), 100, np.uint8))
    heat = np.zeros((4, 6), np.float32)
    heat[0, 0] = 1.0
    out = np.asarray(explain.overlay(image, heat, opacity=1.0))
    assert out.shape == (4, 6, 3)
    assert out[0, 0].tolist() == explain.colorize(np.ones((1, 1)))[0, 0].tolist()   # full heat: the colour
    assert (out[1:, 1:] == 100).all()                                               # no heat: the image
    half = np.asarray(explain.overlay(image, heat, opacity=0.5))[0, 0].astype(int)
    assert np.abs(half - (100 + explain.colorize(np.ones((1, 1)))[0, 0].astype(int)) / 2).max() <= 1
    assert (np.asarray(explain.overlay(image, heat, opacity=0.0)) == 100).all()
    small = np.ones((2, 3), np.float32)                                            # resized to the image
    assert explain.overlay(image, small).size == (6, 4)
    with pytest.raises(DataError, match="opacity"):
        explain.overlay(image, heat, opacity=1.5)


def test_explain_image_uses_the_runs_best_checkpoint_and_its_preprocessing(tiny_folder, tmp_path):
    cfg = RunConfig.from_dict({"data": {"source": "folder", "location": str(tiny_folder), "batch_size": 16},
                               "model": {"name": "tutorial_net"}, "optim": {"lr": 0.02}, "epochs": 2,
                               "device": "cpu", "seed": 1})
    result = fit(cfg, runs_dir=tmp_path)
    assert result.status == "finished", result.message
    image_file = sorted((tiny_folder / "test" / "ship").glob("*.jpg"))[0]
    top = explain.explain_image(result.run_dir, image_file)
    assert top["heatmap"].shape == (32, 32) and top["overlay"].size == (32, 32) == top["image"].size
    assert top["class"] == top["top"][0][0] and top["probability"] == pytest.approx(top["top"][0][1])
    assert top["layer"] == "conv2"
    chosen = explain.explain_image(result.run_dir, Image.open(image_file), target_class="cat")
    assert chosen["class"] == "cat" and chosen["class_index"] == 1
    with pytest.raises(DataError, match="not one of this model's classes: airplane, cat, ship"):
        explain.explain_image(result.run_dir, image_file, target_class="dog")
    with pytest.raises(DataError, match="index from 0 to 2"):
        explain.explain_image(result.run_dir, image_file, target_class=7)
