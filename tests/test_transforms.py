"""Augmentation specs → v2 pipelines, on real CIFAR-10 images from the embedded sample."""
from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from core import datasets as D
from core import transforms as T
from core.errors import ConfigError


@pytest.fixture(scope="module")
def image(sample_zip) -> Image.Image:
    with zipfile.ZipFile(sample_zip) as z:
        return Image.open(io.BytesIO(z.read("cifar10-sample/train/horse/0003.jpg"))).convert("RGB")


@pytest.fixture(scope="module")
def sample(session_data_dir):
    return D.load_dataset("sample", data_dir=session_data_dir)


def _runnable_params(name: str) -> dict:
    params = T.list_steps()[name]
    if name == "RandomResizedCrop":
        params["size"] = 32  # the default 224 also runs, but keep the test fast
    return params


STEPS = [n for n in T.list_steps() if n not in T.TTA_ONLY_STEPS]


@pytest.mark.parametrize("name", STEPS)
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_every_step_builds_and_runs(image, name, mode):
    spec = [{"name": name, "params": _runnable_params(name)}]
    t = T.build_transform(spec, "tutorial", mode)
    src = image if mode == "RGB" else image.convert("L")
    torch.manual_seed(0)
    x = t(src)
    side = 40 if name == "Pad" else 32
    assert x.shape == (3 if mode == "RGB" else 1, side, side) and x.dtype == torch.float32
    assert -1.0 - 1e-6 <= x.min() and x.max() <= 1.0 + 1e-6


def test_list_steps_complete_and_copied():
    steps = T.list_steps()
    assert set(steps) == {"Resize", "RandomCrop", "CenterCrop", "RandomResizedCrop", "FiveCrop", "TenCrop",
                          "RandomHorizontalFlip", "RandomVerticalFlip", "RandomRotation", "Pad", "ColorJitter",
                          "Grayscale", "RandomGrayscale", "RandomAffine", "RandomApply", "RandomChoice",
                          "RandomOrder"}
    assert steps["RandomCrop"]["padding_mode"] == "constant"
    json.dumps(steps)  # the UI gets plain JSON values
    steps["RandomCrop"]["size"] = 999
    assert T.list_steps()["RandomCrop"]["size"] == 32
    assert T.describe_steps()["TenCrop"]["tta_only"] is True


def test_grayscale_step_keeps_three_channels_in_rgb(image):
    x = T.build_transform([{"name": "Grayscale"}], "none", "RGB")(image)
    assert x.shape == (3, 32, 32)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    assert T.build_transform([{"name": "Grayscale"}], "none", "L")(image).shape == (1, 32, 32)


def test_random_crop_padding_modes(image):
    for mode in ("constant", "edge", "reflect", "symmetric"):
        t = T.build_transform([{"name": "RandomCrop", "params": {"size": 32, "padding": 4, "padding_mode": mode}}],
                              "none", "RGB")
        assert t(image).shape == (3, 32, 32)


def test_nested_steps(image):
    spec = [{"name": "RandomApply", "params": {"p": 1.0, "steps": [
        {"name": "RandomChoice", "params": {"steps": [{"name": "RandomVerticalFlip", "params": {"p": 1.0}}]}}]}}]
    x = T.build_transform(spec, "none", "RGB")(image)
    flipped = torch.from_numpy(np.asarray(image)[::-1].copy()).permute(2, 0, 1).float() / 255
    assert torch.allclose(x, flipped)
    order = [{"name": "RandomOrder", "params": {"steps": [{"name": "Pad", "params": {"padding": 2}},
                                                          {"name": "CenterCrop", "params": {"size": 30}}]}}]
    assert T.build_transform(order, "none", "RGB")(image).shape[-1] in (30, 34)


@pytest.mark.parametrize("spec,words", [
    ([{"name": "RandomBlur"}], "unknown step 'RandomBlur'. Valid steps: Resize, RandomCrop"),
    ([{"name": "RandomCrop", "params": {"size": 32, "pading": 4}}], "unknown params pading. Valid params: size, padding"),
    ([{"name": "RandomCrop", "params": {"size": 32, "padding_mode": "wrap"}}], r"RandomCrop\): invalid params"),
    ([{"name": "RandomHorizontalFlip", "params": {"p": 2}}], "RandomHorizontalFlip"),
    ([{"name": "RandomApply", "params": {"steps": []}}], "'steps' must be a non-empty list"),
    ([{"name": "RandomChoice", "params": {"steps": [{"name": "Nope"}]}}], r"RandomChoice.steps\[0\]: unknown step"),
    ([{"name": "FiveCrop"}], "test-time augmentation only"),
    ([{"name": "Resize", "params": {"size": 32}, "enabled": True}], "unknown keys"),
    ([{"params": {}}], "expected {'name'"),
    ({"name": "Resize"}, "must be a list of steps"),
    ([{"name": "Resize", "params": [32]}], "params must be a dict"),
    ([{"name": "Grayscale", "params": {"num_output_channels": 1}}], "Valid params: none"),
])
def test_bad_specs_raise_config_error(spec, words):
    with pytest.raises(ConfigError, match=words):
        T.build_transform(spec, "tutorial", "RGB")


def test_spec_json_round_trip(image):
    spec = T.default_train_spec(32, native_size=(32, 32)) + [
        {"name": "RandomApply", "params": {"p": 0.3, "steps": [{"name": "ColorJitter", "params": {"hue": 0.1}}]}},
        {"name": "RandomAffine", "params": {"translate": [0.2, 0.1]}}]
    text = T.spec_to_json(spec)
    back = T.spec_from_json(text)
    assert back == json.loads(text) and T.spec_to_json(back) == text
    assert back[2]["params"]["steps"][0]["params"]["brightness"] == 0.2  # defaults filled in
    a, b = T.build_transform(spec, "tutorial", "RGB"), T.build_transform(back, "tutorial", "RGB")
    torch.manual_seed(5)
    xa = a(image)
    torch.manual_seed(5)
    assert torch.equal(xa, b(image))
    with pytest.raises(ConfigError, match="not valid JSON"):
        T.spec_from_json("[{'name': 'Resize'}]")


def test_presets():
    p = T.NORMALIZE_PRESETS
    assert p["tutorial"].mean == (0.5,) * 3 and p["tutorial"].std == (0.5,) * 3
    assert p["imagenet"].mean == (0.485, 0.456, 0.406) and p["imagenet"].std == (0.229, 0.224, 0.225)
    assert p["dataset"] is None and p["none"].preset == "none"
    assert T.make_normalization("tutorial", "L").mean == (0.5,)
    gray = T.make_normalization("imagenet", "L")
    assert gray.mean == pytest.approx((0.449,)) and gray.std == pytest.approx((0.226,))
    with pytest.raises(ConfigError, match="tutorial, imagenet, dataset, none"):
        T.make_normalization("zscore")
    with pytest.raises(ConfigError, match="needs the dataset"):
        T.make_normalization("dataset")
    n = T.Normalization.from_dict(json.loads(json.dumps(p["imagenet"].to_dict())))
    assert n == p["imagenet"]


def test_normalized_ranges(image):
    raw = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
    assert torch.allclose(T.build_transform([], "none", "RGB")(image), raw)
    assert torch.allclose(T.build_transform([], "tutorial", "RGB")(image), raw * 2 - 1, atol=1e-6)
    net = T.build_transform([], "imagenet", "RGB")(image)
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    assert torch.allclose(net, (raw - mean) / std, atol=1e-5)


def test_dataset_mean_std(sample):
    idx = sample.splits["train"][::10]
    mean, std = T.compute_mean_std(sample, idx)
    arr = sample.to_uint8_array(idx).reshape(-1, 3) / 255.0
    assert mean == pytest.approx(tuple(arr.mean(0)), abs=1e-9)
    assert std == pytest.approx(tuple(arr.std(0)), abs=1e-7)
    assert len(T.compute_mean_std(sample, idx, max_images=7)[0]) == 3
    norm = T.make_normalization("dataset", "RGB", ds=sample, indices=idx)
    x = T.build_transform([], norm, "RGB")
    batch = torch.stack([x(sample.load_image(i)) for i in idx])
    assert batch.mean(dim=(0, 2, 3)).abs().max() < 1e-4  # standardised over the same images
    assert (batch.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-2


def test_mode_conversion_inside_pipeline():
    t = T.build_transform([], "none", "RGB")
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert torch.allclose(t(rgba), torch.ones(3, 8, 8))  # transparent → white
    g16 = Image.fromarray(np.full((8, 8), 65535, np.uint16))
    assert torch.allclose(t(g16), torch.ones(3, 8, 8))
    lt = T.build_transform([], "none", "L")
    assert lt(Image.new("RGB", (8, 8), (255, 255, 255))).shape == (1, 8, 8)
    assert lt(torch.rand(3, 8, 8)).shape == (1, 8, 8)  # tensors get their channels fixed too
    assert t(torch.rand(1, 8, 8)).shape == (3, 8, 8)


@pytest.mark.parametrize("kind,n", [("five", 5), ("ten", 10)])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_tta_shapes(image, kind, n, mode):
    t = T.build_tta_transform([{"name": "Pad", "params": {"padding": 4}}], "tutorial", mode, kind=kind, crop_size=32)
    x = t(image)
    assert x.shape == (n, 3 if mode == "RGB" else 1, 32, 32) and x.dtype == torch.float32
    assert not torch.equal(x[0], x[1])  # corners differ
    if kind == "ten":
        assert torch.equal(x[5 + 4], x[4].flip(-1))  # flipped centre crop


@pytest.mark.parametrize("kind,n", [("five", 5), ("ten", 10)])
def test_tta_from_state(image, kind, n):
    state = json.loads(json.dumps(T.transform_state([], "tutorial", "RGB", 32)))
    x = T.tta_transform_from_state(state, kind)(image)
    assert x.shape == (n, 3, 32, 32)
    gray = T.transform_state(T.default_eval_spec(64, (32, 32)), "imagenet", "L", 64)
    assert T.tta_transform_from_state(gray, kind)(image).shape == (n, 1, 64, 64)


def test_tta_bad_kind(image):
    with pytest.raises(ConfigError, match="'five' or 'ten'"):
        T.build_tta_transform([], "tutorial", "RGB", kind="three", crop_size=28)


def test_default_specs():
    assert T.default_train_spec(32, (32, 32)) == T.normalize_spec([
        {"name": "RandomCrop", "params": {"size": 32, "padding": 4}},
        {"name": "RandomHorizontalFlip", "params": {"p": 0.5}}])
    assert T.default_eval_spec(32, (32, 32)) == []
    big = T.default_train_spec(224)
    assert [s["name"] for s in big] == ["RandomResizedCrop", "RandomHorizontalFlip"]
    assert big[0]["params"]["size"] == 224
    ev = T.default_eval_spec(224)
    assert ev[0]["params"]["size"] == 256 and ev[1]["params"]["size"] == 224
    assert T.default_train_spec(32) == T.default_train_spec(32, (32, 32))  # None: already that size
    assert T.default_eval_spec(32) == []
    mnist = T.default_train_spec(32, native_size=(28, 28), hflip=False)
    assert [s["name"] for s in mnist] == ["Resize", "CenterCrop", "RandomCrop"]
    assert [s["name"] for s in T.default_eval_spec(32, native_size=28)] == ["Resize", "CenterCrop"]
    assert T.default_eval_spec(96, native_size=(96, 96)) == []
    assert T.default_train_spec(64, 64)[0]["name"] == "RandomResizedCrop"
    assert T.default_train_spec(16, 16)[0]["params"]["padding"] == 2


def test_default_specs_produce_the_right_size(image):
    for size, native in ((32, (32, 32)), (24, (32, 32)), (96, None), (96, (32, 32)), (32, None)):
        for spec in (T.default_train_spec(size, native), T.default_eval_spec(size, native)):
            assert T.build_transform(spec, "imagenet", "RGB")(image).shape == (3, size, size)
    wide = Image.new("RGB", (80, 40))
    assert T.build_transform(T.default_eval_spec(32, (80, 40)), "none", "RGB")(wide).shape == (3, 32, 32)
    assert T.build_transform(T.default_eval_spec(224), "none", "RGB")(wide).shape == (3, 224, 224)


def test_transform_state_round_trip(image):
    norm = T.make_normalization("imagenet", "RGB")
    spec = T.default_eval_spec(48)
    state = T.transform_state(spec, norm, "RGB", 48)
    state = json.loads(json.dumps(state))  # it is stored in checkpoints as JSON-able data
    assert state["mode"] == "RGB" and state["image_size"] == [48, 48]
    rebuilt = T.eval_transform_from_state(state)
    assert torch.equal(rebuilt(image), T.build_transform(spec, norm, "RGB")(image))
    with pytest.raises(ConfigError, match="needs 'eval_spec'"):
        T.eval_transform_from_state({"mode": "RGB"})
    with pytest.raises(ConfigError, match="newer"):
        T.eval_transform_from_state({**state, "version": 99})


def test_augment_preview_seeded_and_distinct(image):
    spec = [{"name": "RandomResizedCrop", "params": {"size": 32, "scale": [0.3, 1.0]}},
            {"name": "ColorJitter", "params": {"brightness": 0.5, "hue": 0.2}}]
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = T.augment_preview(image, spec, n=6, seed=1)
    assert torch.equal(torch.rand(1), before)  # the global RNG is left as it was
    b = T.augment_preview(image, spec, n=6, seed=1)
    c = T.augment_preview(image, spec, n=6, seed=2)
    assert len(a) == 6 and all(isinstance(im, Image.Image) and im.size == (32, 32) for im in a)
    assert len({im.tobytes() for im in a}) == 6
    assert [im.tobytes() for im in a] == [im.tobytes() for im in b]
    assert [im.tobytes() for im in a] != [im.tobytes() for im in c]
    assert T.augment_preview(image.convert("L"), spec, n=2)[0].mode == "L"
    with pytest.raises(ConfigError):
        T.augment_preview(image, [{"name": "TenCrop"}])
