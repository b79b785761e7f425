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
        {"name": "RandomCrop", "params": {"size": 32, "padding": 2, "padding_mode": "reflect"}},
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
    assert T.default_train_spec(16, 16)[0]["params"]["padding"] == 1


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


# ---- limits: a spec from an untrusted page must not be able to exhaust the server ----------------

class _Untouchable:
    """Stands in for an image that must not be looked at: any attribute access fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"the image was touched ({name}) before the spec was refused")


def _nest(depth: int) -> dict:
    step = {"name": "RandomHorizontalFlip", "params": {"p": 0.5}}
    for _ in range(depth):
        step = {"name": "RandomApply", "params": {"p": 0.5, "steps": [step]}}
    return step


def test_pad_30000_refused_before_any_image_is_touched():
    spec = [{"name": "Pad", "params": {"padding": 30000}}]
    words = (r"step 1 \(Pad\): padding 30000 would make images their size \+ 60,000 px a side "
             r"\(60,032 px for a 32-px image\); the limit is 4,096 px a side.*padding of at most 2,048")
    with pytest.raises(ConfigError, match=words):
        T.normalize_spec(spec)
    with pytest.raises(ConfigError, match=words):   # the Data tab's preview (runs in the server)
        T.augment_preview(_Untouchable(), spec, n=8, seed=0, mode="RGB")
    with pytest.raises(ConfigError, match=words):   # training builds its transform the same way
        T.build_transform(spec, "tutorial", "RGB")
    with pytest.raises(ConfigError, match=r"RandomCrop\): padding 30000 would make images"):
        T.normalize_spec([{"name": "RandomCrop", "params": {"size": 32, "padding": 30000}}])


def test_resize_14000_refused():
    for step in ({"name": "Resize", "params": {"size": 14000}}, {"name": "Resize", "params": {"size": [32, 14000]}},
                 {"name": "RandomResizedCrop", "params": {"size": 14000}}, {"name": "CenterCrop", "params": {"size": 5000}}):
        with pytest.raises(ConfigError, match=rf"\({step['name']}\): size .* would make images [\d,]+ px a side; "
                                              r"the limit is 4,096 px a side. Use a whole number of pixels from 1 to 4,096"):
            T.augment_preview(_Untouchable(), [step], mode="RGB")


def test_padding_and_expanding_rotations_add_up():
    with pytest.raises(ConfigError, match=r"step 2 \(Pad\): padding 100 would make images their size \+ 4,200 px.*"
                                          r"padding of at most 48"):
        T.normalize_spec([{"name": "Pad", "params": {"padding": 2000}}, {"name": "Pad", "params": {"padding": 100}}])
    with pytest.raises(ConfigError, match=r"step 2 \(RandomRotation\): expand=true would make images 5,657 px a side"):
        T.normalize_spec([{"name": "Resize", "params": {"size": 4000}},
                          {"name": "RandomRotation", "params": {"expand": True}}])
    rotate = {"name": "RandomRotation", "params": {"expand": True}}
    T.normalize_spec([rotate, rotate])  # at most double the size
    with pytest.raises(ConfigError, match=r"step 3 \(RandomRotation\): expand=true would make images 2.83 × their size"):
        T.normalize_spec([rotate, rotate, rotate])
    # A Resize or crop sets the size again, so padding after it starts from there.
    T.normalize_spec([{"name": "Pad", "params": {"padding": 2048}}, {"name": "CenterCrop", "params": {"size": 32}},
                      {"name": "Pad", "params": {"padding": [2032, 0, 2032, 0]}}])


def test_nested_steps_count_their_worst_case():
    pad = lambda p: {"name": "Pad", "params": {"padding": p}}
    crop = {"name": "CenterCrop", "params": {"size": 32}}
    T.normalize_spec([{"name": "RandomOrder", "params": {"steps": [crop, pad(1500)]}}])  # worst order: 3,032 px
    with pytest.raises(ConfigError, match=r"step 1.\d \(Pad\): padding \d+ would make images their size \+ 4,200 px"):
        T.normalize_spec([{"name": "RandomOrder", "params": {"steps": [crop, pad(1500), pad(600)]}}])
    choice = lambda side: {"name": "RandomChoice", "params": {"steps": [
        crop, {"name": "Resize", "params": {"size": side}}]}}
    T.normalize_spec([choice(1096), pad(1500)])  # the larger choice + 3,000 px: 4,096
    with pytest.raises(ConfigError, match=r"step 2 \(Pad\): padding 1500 would make images 4,200 px a side.*"
                                          r"padding of at most 1,448"):
        T.normalize_spec([choice(1200), pad(1500)])
    with pytest.raises(ConfigError, match=r"step 2 \(Pad\): padding 1500 would make images their size \+ 5,000 px"):
        T.normalize_spec([{"name": "RandomApply", "params": {"p": 0.1, "steps": [pad(1000)]}}, pad(1500)])
    with pytest.raises(ConfigError, match="7 nested steps; the limit is 6 in one RandomOrder"):
        T.normalize_spec([{"name": "RandomOrder", "params": {"steps": [pad(1)] * 7}}])


def test_nesting_3000_deep_refused_without_recursion_error():
    deep = [_nest(3000)]
    with pytest.raises(ConfigError, match=r"step 1(\.1){8}: steps are nested 9 levels deep .* the limit is 8 levels"):
        T.normalize_spec(deep)
    with pytest.raises(ConfigError, match="nested 9 levels deep"):
        T.augment_preview(_Untouchable(), deep, mode="RGB")
    text = "[" + '{"name": "RandomApply", "params": {"steps": [' * 3000 + '{"name": "Grayscale"}' + "]}}" * 3000 + "]"
    with pytest.raises(ConfigError, match="nested too deeply to read; the limit is 8 levels"):
        T.spec_from_json(text)
    T.normalize_spec([_nest(7)])  # 8 levels with the flip inside: the limit itself
    with pytest.raises(ConfigError, match="nested 9 levels deep"):
        T.normalize_spec([_nest(8)])
    with pytest.raises(ConfigError, match="params.fill must be a number, text, true/false, null or a flat list"):
        T.normalize_spec([{"name": "Pad", "params": {"fill": [[[0]]]}}])


def test_too_many_steps_refused():
    flip = {"name": "RandomHorizontalFlip", "params": {"p": 0.5}}
    T.normalize_spec([flip] * 64)
    with pytest.raises(ConfigError, match="more than 64 steps .*the limit is 64"):
        T.normalize_spec([flip] * 65)
    with pytest.raises(ConfigError, match="more than 64 steps"):
        T.normalize_spec([flip] * 40 + [{"name": "RandomChoice", "params": {"steps": [flip] * 30}}])


@pytest.mark.parametrize("step,words", [
    ({"name": "RandomRotation", "params": {"degrees": 1e308}},
     r"RandomRotation\): degrees 1e\+308: use a number from 0 to 360 .*-360 <= min <= max <= 360"),
    ({"name": "RandomRotation", "params": {"degrees": [100, 50]}}, "degrees"),
    ({"name": "RandomRotation", "params": {"degrees": float("nan")}}, "params.degrees must hold finite numbers"),
    ({"name": "RandomAffine", "params": {"shear": 1e308}}, r"RandomAffine\): shear 1e\+308"),
    ({"name": "RandomAffine", "params": {"degrees": [-1e308, 0]}}, "degrees"),
    ({"name": "RandomAffine", "params": {"scale": [1e300, 1e300]}}, "zoom factors with 0.1 <= min <= max <= 10"),
    ({"name": "RandomAffine", "params": {"translate": [float("inf"), 0]}}, "finite"),
    ({"name": "RandomResizedCrop", "params": {"ratio": [0, 1]}}, r"ratio \[0, 1\]: use \[min, max\] aspect ratios"),
    ({"name": "RandomResizedCrop", "params": {"scale": [5, 10]}}, "fractions of the image area"),
    ({"name": "ColorJitter", "params": {"brightness": 1e308}}, "brightness 1e\\+308: use a number from 0 to 10"),
    ({"name": "RandomRotation", "params": {"fill": 1e308}}, "fill 1e\\+308: use a pixel value from 0 to 255"),
    ({"name": "Pad", "params": {"padding": -10}}, r"padding -10: use a whole number of pixels \(0 or more\)"),
    ({"name": "Resize", "params": {"size": True}}, "size True: Use a whole number of pixels from 1 to 4,096"),
    ({"name": "RandomCrop", "params": {"size": 0}}, "size 0: Use a whole number"),
])
def test_numbers_out_of_range_are_config_errors(step, words):
    with pytest.raises(ConfigError, match=words):
        T.augment_preview(_Untouchable(), [step], mode="RGB")


def test_fill_channels_and_huge_json_numbers():
    with pytest.raises(ConfigError, match=r"fill \[0, 0, 0\] has 3 values; these L images have 1 channel"):
        T.build_transform([{"name": "Pad", "params": {"fill": [0, 0, 0]}}], "none", "L")
    with pytest.raises(ConfigError, match="not valid JSON: Exceeds the limit"):
        T.spec_from_json('[{"name": "Resize", "params": {"size": ' + "9" * 5000 + "}}]")


def test_preview_seed_bounded(image):
    with pytest.raises(ConfigError, match="preview seed must be a whole number from 0 to 4,294,967,295"):
        T.augment_preview(image, [], n=1, seed=2**70)
    with pytest.raises(ConfigError, match="preview seed"):
        T.augment_preview(image, [], n=1, seed=-1)
    assert T.augment_preview(image, [], n=1, seed=2**32 - 1)[0].size == (32, 32)


def test_preview_crop_larger_than_the_image_is_a_config_error(image):
    with pytest.raises(ConfigError, match=r"cannot run on this 32×32-px image: Required crop size \(64, 64\)"):
        T.augment_preview(image, [{"name": "RandomCrop", "params": {"size": 64, "padding": 0}}], n=1)


def test_resize_to_a_short_side_caps_the_long_side():
    wide = Image.new("RGB", (4000, 10))
    assert T.augment_preview(wide, [{"name": "Resize", "params": {"size": 100}}], n=1)[0].size == (4096, 10)
    assert T.augment_preview(wide, [{"name": "Resize", "params": {"size": 4096}}], n=1)[0].size == (4096, 10)
    x = T.build_transform([{"name": "Resize", "params": {"size": 16}}], "none", "RGB")(Image.new("RGB", (64, 32)))
    assert x.shape == (3, 16, 32)  # ordinary images keep the usual behaviour


def test_normal_pipelines_still_validate():
    for size, native in ((32, (32, 32)), (28, (32, 32)), (224, (500, 375)), ((384, 512), None)):
        T.normalize_spec(T.default_train_spec(size, native_size=native))
        T.normalize_spec(T.default_eval_spec(size, native_size=native))
    T.normalize_spec([{"name": name, "params": params} for name, params in T.list_steps().items()
                      if name not in T.TTA_ONLY_STEPS])
    T.normalize_spec([{"name": "Resize", "params": {"size": [4096, 4096]}}, {"name": "Pad", "params": {"padding": 0}},
                      {"name": "RandomResizedCrop", "params": {"size": 32, "scale": [0.08, 1.0]}},
                      {"name": "Pad", "params": {"padding": [0, 2032]}},  # 32 + 2 × 2,032 = 4,096
                      {"name": "RandomAffine", "params": {"degrees": [-360, 360], "shear": [-10, 10, -5, 5],
                                                          "scale": [0.1, 10]}},
                      {"name": "ColorJitter", "params": {"brightness": [0.5, 10], "hue": 0.5}},
                      {"name": "RandomRotation", "params": {"degrees": 360, "fill": [255, 0, 127.5]}}])
    assert T.tta_transform_from_state(T.transform_state([], "tutorial", "RGB", 224))  # Resize 256 inside
