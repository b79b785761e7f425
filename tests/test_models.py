"""core.models: every registry entry builds, runs forward/backward on gray/RGB/large/rectangular
input; parameter counts and minimum sizes agree with torchvision; weights files (hub cache, user
files, corrupt/foreign/malicious files); freezing, init, param groups and the layer table.

Parametrised over the registry, so a new entry is tested without new test code.
"""
from __future__ import annotations

import io
import math
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.models import get_model, get_model_weights

from core import models as M
from core.errors import LabError, MissingFileError, ModelError

NAMES = M.MODELS.names()

# (in_channels, native size, small-input stem, batch, classes). Small inputs use the stem, the
# 224 case the plain model with 1000 classes (so its size is torchvision's published one).
KINDS = {
    "gray28": (1, (28, 28), True, 1, 7),
    "rgb32": (3, (32, 32), True, 1, 10),
    "rect": (3, (20, 36), True, 2, 10),  # same model as rgb32 where the size allows
    "rgb224": (3, (224, 224), False, 1, 1000),
}


def _file_name(tv_name: str) -> str:
    return get_model_weights(tv_name).DEFAULT.url.rsplit("/", 1)[-1]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # No test may try the network: a missing ImageNet file must fail fast.
    monkeypatch.setenv(M.OFFLINE_ENV, "1")


@pytest.fixture(scope="module")
def real_batch(sample_zip):
    """4 real CIFAR-10 images (one of each of four classes) in [-1, 1] with their labels."""
    classes = ["airplane", "cat", "ship", "truck"]
    xs, ys = [], []
    with zipfile.ZipFile(sample_zip) as z:
        for label, c in enumerate(classes):
            img = Image.open(io.BytesIO(z.read(f"cifar10-sample/train/{c}/0000.jpg"))).convert("RGB")
            xs.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1)
            ys.append(label)
    return torch.stack(xs), torch.tensor(ys)


# ---------------------------------------------------------------------------------------------
# Every entry, every input kind
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_cache():
    """One built model kept between cases: 'rgb32' and 'rect' share a model where they can."""
    cache: dict = {}
    yield cache
    cache.clear()


def _created(cache: dict, name: str, c: int, size, stem: bool, classes: int) -> M.CreatedModel:
    spec = M.get_model_spec(name)
    key = (name, c, stem, classes, tuple(size) if spec.fixed_size else None)
    if key not in cache:
        cache.clear()  # keep one model alive: VGG weighs half a gigabyte
        cache[key] = M.create_model(name, classes, in_channels=c, input_size=size, small_input_stem=stem)
    return cache[key]


def _every_entry_and_kind():
    """Every entry at every input kind. Building a model takes most of a case's time, so the fast
    tier keeps the lab's default path (rgb32: 32×32 RGB, small-input stem) for the lab's own nets,
    ResNet-18 and every entry of at most 4M parameters (MobileNet-V2/V3-small, ShuffleNet,
    SqueezeNet); the larger models (DenseNet, VGG, ViT, ...) and the other kinds are slow."""
    def small(name):
        return name == "resnet18" or (M.get_model_spec(name).imagenet_params or 0) <= 4_000_000
    return [pytest.param(n, k, marks=() if k == "rgb32" and small(n) else pytest.mark.slow)
            for n in NAMES for k in KINDS]


@pytest.mark.parametrize("name,kind", _every_entry_and_kind())
def test_forward_backward_every_entry(name, kind, model_cache):
    c, native, stem, batch, classes = KINDS[kind]
    size = M.resolve_input_size(name, native, small_input_stem=stem)
    assert min(size) >= M.min_input_size(name, stem)
    if kind != "rgb224":
        assert size == native or M.get_model_spec(name).fixed_size, "small-stem sizes are fed as they are"
    cm = _created(model_cache, name, c, size, stem, classes)
    assert cm.spec.name == name and cm.notes
    if cm.spec.fixed_size:
        assert cm.input_size == size
    torch.manual_seed(0)
    x = torch.randn(batch, c, *size)
    out = cm.model(x)
    assert out.shape == (batch, classes)
    assert torch.isfinite(out).all()
    F.cross_entropy(out, torch.arange(batch) % classes).backward()
    grads = [p.grad for p in cm.model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    if kind == "rgb224" and M.get_model_spec(name).tv_name:
        published = get_model_weights(M.get_model_spec(name).tv_name).DEFAULT.meta["num_params"]
        assert sum(p.numel() for p in cm.model.parameters()) == published
    for p in cm.model.parameters():
        p.grad = None


@pytest.mark.parametrize("name", NAMES)
def test_parameter_counts(name):
    spec = M.get_model_spec(name)
    if spec.tv_name:
        # torchvision's published count for the 1000-class ImageNet model
        assert spec.imagenet_params == get_model_weights(spec.tv_name).DEFAULT.meta["num_params"]
    else:
        assert spec.imagenet_params is None
    assert M.count_params(name, 10) > 0
    assert M.count_params(name, 11) > M.count_params(name, 10)  # the head grows with the classes


def test_published_counts_examples():
    assert M.get_model_spec("resnet18").imagenet_params == 11_689_512
    assert M.get_model_spec("vgg16").imagenet_params == 138_357_544
    assert M.count_params("tutorial_net", 10) == 62_006  # the tutorial's Net


@pytest.mark.parametrize("name", NAMES)
def test_minimum_input_size_is_measured_and_enforced(name):
    spec = M.get_model_spec(name)
    m, ms = M.min_input_size(name, False), M.min_input_size(name, True)
    assert spec.min_input_size == m and 1 <= ms <= m <= spec.default_input_size
    if spec.tv_name and name != "vit_b_16":  # torchvision's ViT takes one size only; ours any
        assert (m, m) == tuple(get_model_weights(spec.tv_name).DEFAULT.meta["min_size"])
    for stem, low in ((False, m), (True, ms)):
        if low > 1:
            with pytest.raises(ModelError) as err:
                M.create_model(name, 10, input_size=(low - 1, low + 5), small_input_stem=stem)
            assert f"at least {low}×{low}" in str(err.value) and name in str(err.value)


def test_min_size_examples_and_message():
    assert M.min_input_size("alexnet") == 63
    assert M.min_input_size("vgg16") == 32
    assert M.min_input_size("tutorial_net") == 16
    with pytest.raises(ModelError) as err:
        M.create_model("alexnet", 10, input_size=32)
    msg = str(err.value)
    assert "alexnet needs at least 63×63 input (got 32×32)" in msg
    assert "small-input stem" in msg and "224" in msg
    # at exactly the minimum the model really runs (a CPU forward, not just the meta check)
    cm = M.create_model("tutorial_net", 2, input_size=16)
    assert cm.model(torch.zeros(1, 3, 16, 16)).shape == (1, 2)


def test_resolve_input_size():
    assert M.resolve_input_size("alexnet", 32, False) == (224, 224)
    assert M.resolve_input_size("alexnet", 32, True) == (32, 32)
    assert M.resolve_input_size("resnet18", (48, 64), False) == (48, 64)
    assert M.resolve_input_size("vgg16", 28, False) == (224, 224)
    assert M.resolve_input_size("vgg16", 28, True) == (28, 28)
    assert M.resolve_input_size("tutorial_net", 8, False) == (32, 32)
    assert M.resolve_input_size("vit_b_16", 28, False) == (32, 32)  # a multiple of the 16-px patch
    h, w = M.resolve_input_size("vit_b_16", (30, 50), True)
    assert h % 4 == 0 and w % 4 == 0
    with pytest.raises(ModelError):
        M.resolve_input_size("resnet18", 0)


def test_fixed_size_models_say_so():
    cm = M.create_model("tutorial_net", 10, input_size=32)
    with pytest.raises(ModelError, match="built for 32×32"):
        cm.model(torch.zeros(1, 3, 28, 28))
    vit = M.create_model("vit_b_16", 10, input_size=(20, 30), small_input_stem=True)
    assert vit.input_size == (20, 28) or vit.input_size == (20, 32)
    assert any("rounded" in n for n in vit.notes)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

def test_unknown_model_lists_valid_names():
    with pytest.raises(ModelError) as err:
        M.create_model("resnet19", 10)
    assert "resnet19" in str(err.value) and "resnet18" in str(err.value) and "tutorial_net" in str(err.value)
    with pytest.raises(LabError):
        M.get_model_spec("nope")


@pytest.mark.parametrize("classes", [1, 0, -3, 2.5, True, "10"])
def test_class_count_must_be_at_least_two(classes):
    with pytest.raises(ModelError, match="at least 2 classes"):
        M.create_model("tutorial_net", classes)


def test_two_classes_and_odd_channels_work():
    cm = M.create_model("squeezenet1_1", 2, in_channels=4, input_size=32, small_input_stem=True)
    assert cm.model(torch.zeros(2, 4, 32, 32)).shape == (2, 2)


@pytest.mark.parametrize("kwargs,match", [
    ({"in_channels": 0}, "in_channels"),
    ({"input_size": (0, 32)}, "positive"),
    ({"input_size": "big"}, "input_size"),
    ({"init": "he"}, "Unknown initialisation 'he'"),
    ({"pretrained": True}, "no pretrained weights"),
])
def test_other_bad_arguments(kwargs, match):
    with pytest.raises(ModelError, match=match):
        M.create_model("tutorial_net", 10, **kwargs)


# ---------------------------------------------------------------------------------------------
# ImageNet weights: hub cache, weights_dir, missing file, download
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mnv3_imagenet_file(tmp_path_factory):
    """A real 1000-class mobilenet_v3_small state dict saved under torchvision's file name."""
    torch.manual_seed(1)
    model = get_model("mobilenet_v3_small", weights=None)
    folder = tmp_path_factory.mktemp("weights")
    path = folder / _file_name("mobilenet_v3_small")
    torch.save(model.state_dict(), path)
    return path, model.state_dict()


def test_pretrained_from_weights_dir(mnv3_imagenet_file):
    path, sd = mnv3_imagenet_file
    st = M.pretrained_status("mobilenet_v3_small", weights_dir=path.parent)
    assert st.available and st.file_name == path.name and st.folder == str(path.parent)
    cm = M.create_model("mobilenet_v3_small", 10, input_size=32, small_input_stem=True,
                        pretrained=True, weights_dir=path.parent, init="xavier_uniform")
    got = cm.model.state_dict()
    for k, v in sd.items():
        if k.startswith("classifier.3."):
            continue
        assert torch.equal(got[k], v), k
    head = cm.model.classifier[3]
    assert head.weight.shape == (10, 1024) and torch.all(head.bias == 0)  # new head, init applied
    assert set(cm.load_report.missing) == {"classifier.3.weight", "classifier.3.bias"}
    assert len(cm.load_report.matched) == len(sd) - 2 and not cm.load_report.mismatched_shapes
    assert any("pretrained" in n for n in cm.notes)


def test_pretrained_grayscale_sums_rgb_filters(mnv3_imagenet_file):
    path, sd = mnv3_imagenet_file
    cm = M.create_model("mobilenet_v3_small", 5, in_channels=1, input_size=28, small_input_stem=True,
                        pretrained=True, weights_dir=path.parent)
    w = cm.model.features[0][0].weight
    assert w.shape == (16, 1, 3, 3)
    assert torch.allclose(w, sd["features.0.0.weight"].sum(dim=1, keepdim=True))
    assert cm.model(torch.zeros(2, 1, 28, 28)).shape == (2, 5)


def test_pretrained_from_torch_home_and_resampled_stem(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.manual_seed(2)
    sd = get_model("resnet18", weights=None).state_dict()
    torch.save(sd, folder / _file_name("resnet18"))
    st = M.pretrained_status("resnet18")
    assert st.available and Path(st.folder) == folder
    cm = M.create_model("resnet18", 10, input_size=32, small_input_stem=True, pretrained=True)
    (folder / _file_name("resnet18")).unlink()
    conv1 = cm.model.conv1.weight
    assert conv1.shape == (64, 3, 3, 3)  # CIFAR stem, initialised from the 7×7 filters
    assert torch.allclose(conv1.sum(dim=(2, 3)), sd["conv1.weight"].sum(dim=(2, 3)), atol=1e-4)
    assert torch.equal(cm.model.layer4[1].conv2.weight, sd["layer4.1.conv2.weight"])


@pytest.mark.slow   # builds ViT-B/16 (86M parameters) twice
def test_pretrained_vit_interpolates_position_embedding(tmp_path):
    torch.manual_seed(3)
    sd = get_model("vit_b_16", weights=None).state_dict()
    path = tmp_path / _file_name("vit_b_16")
    torch.save(sd, path)
    del sd
    cm = M.create_model("vit_b_16", 10, input_size=(32, 48), pretrained=True, weights_dir=tmp_path)
    path.unlink()  # 350 MB: pytest keeps the last runs' temporary folders
    assert cm.model.encoder.pos_embedding.shape == (1, 1 + 2 * 3, 768)
    assert any("position embedding" in n for n in cm.notes)
    assert cm.model(torch.zeros(1, 3, 32, 48)).shape == (1, 10)


def test_missing_imagenet_file_names_file_and_folder(tmp_path):
    st = M.pretrained_status("squeezenet1_1", weights_dir=tmp_path)
    name = _file_name("squeezenet1_1")
    assert not st.available and st.file_name == name and st.folder == str(tmp_path)
    assert name in st.message and str(tmp_path) in st.message
    with pytest.raises(MissingFileError) as err:
        M.create_model("squeezenet1_1", 10, pretrained=True, weights_dir=tmp_path)
    e = err.value
    assert e.files == [name] and e.folder == str(tmp_path)
    assert name in str(e) and str(tmp_path) in str(e) and "random weights" in str(e)
    assert not M.pretrained_status("tutorial_net").available


def test_download_when_network_allows(tmp_path, monkeypatch):
    monkeypatch.delenv(M.OFFLINE_ENV)
    monkeypatch.setattr("core.offline.probe_network", lambda url, timeout=3.0: None)   # the host answers
    sd = get_model("squeezenet1_1", weights=None).state_dict()
    calls = []

    def fake_download(url, dst, timeout=M.DOWNLOAD_TIMEOUT_S):
        calls.append(url)
        torch.save(sd, dst)

    monkeypatch.setattr(M, "_download", fake_download)
    cm = M.create_model("squeezenet1_1", 10, pretrained=True, weights_dir=tmp_path)
    assert calls == [get_model_weights("squeezenet1_1").DEFAULT.url]
    assert (tmp_path / _file_name("squeezenet1_1")).is_file()
    assert torch.equal(cm.model.features[0].weight, sd["features.0.weight"])


def test_failed_download_is_a_missing_file(tmp_path, monkeypatch):
    import urllib.error

    monkeypatch.delenv(M.OFFLINE_ENV)
    monkeypatch.setattr("core.offline.probe_network", lambda url, timeout=3.0: None)

    def cut(url, dst, timeout=M.DOWNLOAD_TIMEOUT_S):
        raise urllib.error.URLError("connection reset by peer")

    monkeypatch.setattr(M, "_download", cut)
    with pytest.raises(MissingFileError, match=r"could not be downloaded \(connection reset by peer\)") as err:
        M.create_model("squeezenet1_1", 10, pretrained=True, weights_dir=tmp_path)
    assert "URLError" not in str(err.value) and "urlopen" not in str(err.value)


def test_offline_pretrained_is_refused_before_a_run_is_queued(tmp_path, monkeypatch):
    """No file and no network: the message names the file, the folder and the host, at once."""
    from core.config import RunConfig
    from core.jobs import JobManager

    monkeypatch.delenv(M.OFFLINE_ENV)
    monkeypatch.setattr(M, "_hub_folder", lambda weights_dir=None: tmp_path)
    monkeypatch.setattr("core.offline.probe_network",
                        lambda url, timeout=3.0: "cannot reach download.pytorch.org: [Errno -2] Name or service not known")
    monkeypatch.setattr(M, "_download", lambda *a, **k: pytest.fail("no download without a network"))
    name = _file_name("squeezenet1_1")
    with pytest.raises(MissingFileError) as err:
        M.check_pretrained("squeezenet1_1")
    text = str(err.value)
    assert name in text and str(tmp_path) in text and "cannot reach download.pytorch.org" in text
    assert "untick 'Start from ImageNet weights'" in text and err.value.files == [name]
    manager = JobManager(runs_dir=tmp_path / "runs", max_jobs=1)
    config = RunConfig.from_dict({"model": {"name": "squeezenet1_1", "pretrained": True}, "device": "cpu"})
    with pytest.raises(MissingFileError, match=name):
        manager.submit(config, owner="teacher")
    assert manager.jobs() == []                                   # nothing was queued
    with pytest.raises(MissingFileError, match="cannot reach download.pytorch.org"):   # a run says the same
        M.create_model("squeezenet1_1", 10, pretrained=True)
    M.check_pretrained("tutorial_net")                            # no ImageNet weights exist: nothing to check
    (tmp_path / name).write_bytes(b"x")
    M.check_pretrained("squeezenet1_1")                           # on disk: fine, no probe needed


def test_corrupt_hub_file_says_delete_it(tmp_path):
    (tmp_path / _file_name("squeezenet1_1")).write_bytes(b"\x00" * 100)
    with pytest.raises(ModelError, match="Delete"):
        M.create_model("squeezenet1_1", 10, pretrained=True, weights_dir=tmp_path)


# ---------------------------------------------------------------------------------------------
# The user's own weights files
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def squeeze_sd():
    torch.manual_seed(4)
    return get_model("squeezenet1_1", weights=None).state_dict()  # 1000-class head


@pytest.mark.parametrize("wrap", ["plain", "model", "state_dict+module", "model_state+epoch"])
def test_user_weights_load_with_report(tmp_path, squeeze_sd, wrap):
    sd = squeeze_sd
    obj = {"plain": sd, "model": {"model": sd, "epoch": 3},
           "state_dict+module": {"state_dict": {"module." + k: v for k, v in sd.items()}},
           "model_state+epoch": {"model_state": sd, "epoch": 7, "classes": ["a", "b"]}}[wrap]
    path = tmp_path / "mine.pth"
    torch.save(obj, path)
    cm = M.create_model("squeezenet1_1", 10, input_size=32, small_input_stem=True, weights_path=path)
    r = cm.load_report
    assert {k for k, _, _ in r.mismatched_shapes} == {"classifier.1.weight", "classifier.1.bias"}
    assert ("classifier.1.weight", (1000, 512, 1, 1), (10, 512, 1, 1)) in r.mismatched_shapes
    assert len(r.matched) == len(sd) - 2 and not r.unexpected
    assert torch.equal(cm.model.features[3].expand1x1.weight, sd["features.3.expand1x1.weight"])
    assert any("mine.pth" in n for n in cm.notes)


def test_user_weights_report_names_every_key_exactly(tmp_path):
    """A fine-tuned tutorial Net's file, edited: one tensor removed, one the model has no place
    for, and a 10-class head loaded into a 5-class model."""
    torch.manual_seed(5)
    sd = M.create_model("tutorial_net", 10, input_size=32).model.state_dict()
    del sd["fc2.bias"]
    sd["fc4.weight"] = torch.ones(3, 84)
    path = tmp_path / "edited.pth"
    torch.save(sd, path)
    torch.manual_seed(6)
    model = M.create_model("tutorial_net", 5, input_size=32).model
    before = {k: v.clone() for k, v in model.state_dict().items()}

    report, notes = M.load_weights_file(model, "tutorial_net", path)

    assert report.matched == ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias",
                              "fc1.weight", "fc1.bias", "fc2.weight"]
    assert report.missing == ["fc2.bias"]
    assert report.unexpected == ["fc4.weight"]
    assert report.mismatched_shapes == [("fc3.weight", (10, 84), (5, 84)), ("fc3.bias", (10,), (5,))]
    after = model.state_dict()
    for k in report.matched:
        assert torch.equal(after[k], sd[k]), k
    for k in ["fc2.bias", "fc3.weight", "fc3.bias"]:  # not filled: they keep their initial values
        assert torch.equal(after[k], before[k]), k
    assert report.summary() == ("7 tensors loaded; 2 skipped for a different shape (fc3.weight, fc3.bias); "
                                "1 not taken from the file (kept their initial values); "
                                "1 in the file but not in the model (ignored)")
    assert notes == [f"weights file edited.pth: {report.summary()}."]
    # create_model reports the same for the same file
    assert M.create_model("tutorial_net", 5, input_size=32, weights_path=path).load_report == report


def test_user_weights_report_missing_buffers_but_not_batch_counters(tmp_path):
    """A BatchNorm statistic missing from the file is reported; absent num_batches_tracked
    counters are not (files from before PyTorch 0.4 have none, and they are not weights)."""
    torch.manual_seed(7)
    sd = M.create_model("resnet18", 10, input_size=32, small_input_stem=True).model.state_dict()
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    del sd["layer1.0.bn1.running_var"]
    path = tmp_path / "resnet.pth"
    torch.save(sd, path)
    model = M.create_model("resnet18", 10, input_size=32, small_input_stem=True).model
    report, _ = M.load_weights_file(model, "resnet18", path)
    assert report.missing == ["layer1.0.bn1.running_var"]
    assert not report.unexpected and not report.mismatched_shapes
    assert report.matched == list(sd)


def test_tutorial_checkpoint_loads_into_tutorial_net(tmp_path):
    class Net(nn.Module):  # verbatim from the PyTorch CIFAR-10 tutorial
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 6, 5)
            self.pool = nn.MaxPool2d(2, 2)
            self.conv2 = nn.Conv2d(6, 16, 5)
            self.fc1 = nn.Linear(16 * 5 * 5, 120)
            self.fc2 = nn.Linear(120, 84)
            self.fc3 = nn.Linear(84, 10)

        def forward(self, x):
            x = self.pool(F.relu(self.conv1(x)))
            x = self.pool(F.relu(self.conv2(x)))
            x = torch.flatten(x, 1)
            return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))

    net = Net()
    torch.save(net.state_dict(), tmp_path / "cifar_net.pth")
    cm = M.create_model("tutorial_net", 10, input_size=32, weights_path=tmp_path / "cifar_net.pth")
    assert len(cm.load_report.matched) == 10 and not cm.load_report.missing
    x = torch.randn(3, 3, 32, 32)
    assert torch.allclose(cm.model(x), net(x))


def test_old_densenet_keys_are_renamed(tmp_path):
    """torchvision's DenseNet ImageNet files use 'norm.1'-style keys from before PyTorch 0.4."""
    import re

    sd = get_model("densenet121", weights=None, num_classes=10).state_dict()
    old = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v for k, v in sd.items()
           if not k.endswith("num_batches_tracked")}
    assert "features.denseblock1.denselayer1.norm.1.weight" in old
    torch.save(old, tmp_path / "densenet_old.pth")
    cm = M.create_model("densenet121", 10, weights_path=tmp_path / "densenet_old.pth", input_size=32,
                        small_input_stem=True)
    r = cm.load_report
    assert len(r.matched) == len(old) and not (r.unexpected or r.missing or r.mismatched_shapes)
    assert torch.equal(cm.model.features.denseblock1.denselayer1.norm1.weight,
                       sd["features.denseblock1.denselayer1.norm1.weight"])
    assert any("features.conv0 adapted" in n for n in cm.notes)  # 7×7 file stem → 3×3 small stem


def test_corrupt_weights_file(tmp_path, squeeze_sd):
    good = tmp_path / "good.pth"
    torch.save(squeeze_sd, good)
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ModelError) as err:
        M.create_model("squeezenet1_1", 10, weights_path=bad)
    assert "truncated.pth" in str(err.value) and "corrupt" in str(err.value)


def test_text_file_is_not_weights(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("these are not weights\n")
    with pytest.raises(ModelError, match="notes.pth.*not a PyTorch weights file"):
        M.create_model("tutorial_net", 10, weights_path=path)


class _Payload:
    """Unpickling this calls open(marker, 'w'): proof of code execution if the marker appears."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    control = tmp_path / "control_marker"
    pickle.loads(pickle.dumps(_Payload(control)))  # a plain unpickle does run the payload...
    assert control.exists()
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    torch.save({"model": _Payload(marker)}, path)
    with pytest.raises(ModelError) as err:
        M.create_model("tutorial_net", 10, weights_path=path)
    assert "evil.pth" in str(err.value) and "refused" in str(err.value)
    assert not marker.exists()  # ...weights_only=True never does


def test_non_tensor_file_is_rejected(tmp_path):
    path = tmp_path / "dict.pth"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(ModelError, match="no weight tensors"):
        M.create_model("tutorial_net", 10, weights_path=path)


def test_weights_of_another_architecture(tmp_path):
    path = tmp_path / "mnv3.pth"
    torch.save(get_model("mobilenet_v3_small", weights=None).state_dict(), path)
    with pytest.raises(ModelError) as err:
        M.create_model("squeezenet1_1", 10, weights_path=path)
    msg = str(err.value)
    assert "does not fit squeezenet1_1" in msg and "another architecture" in msg


def test_missing_weights_path(tmp_path):
    with pytest.raises(MissingFileError) as err:
        M.create_model("tutorial_net", 10, weights_path=tmp_path / "nope.pth")
    assert err.value.files == ["nope.pth"] and "nope.pth" in str(err.value)


# ---------------------------------------------------------------------------------------------
# Stages, freezing, train mode, param groups
# ---------------------------------------------------------------------------------------------

def _meta_model(name: str, classes: int = 10, size=None) -> nn.Module:
    spec = M.get_model_spec(name)
    s = size or spec.default_input_size
    with torch.device("meta"):
        return M.create_model(name, classes, input_size=s).model


@pytest.mark.parametrize("name", NAMES)
def test_stages_partition_the_backbone(name):
    model = _meta_model(name)
    stages = M._stages(name)
    assert [s for s, _ in stages] == M.list_stages(name) and len(stages) >= 3
    head = {id(p) for p in M.head_parameters(model, name)}
    assert head
    owners = {n: [] for n, p in model.named_parameters() if id(p) not in head}
    for stage, prefixes in stages:
        for n in owners:
            if M._in(n, prefixes):
                owners[n].append(stage)
    assert all(len(v) == 1 for v in owners.values()), {n: v for n, v in owners.items() if len(v) != 1}
    total = sum(p.numel() for p in model.parameters())
    n_head = sum(p.numel() for p in M.head_parameters(model, name))
    assert M.apply_freeze(model, name, "features") == (n_head, total)
    assert M.apply_freeze(model, name, "stages", len(stages)) == (n_head, total)
    t1, _ = M.apply_freeze(model, name, "stages", 1)
    assert n_head < t1 < total
    assert M.apply_freeze(model, name, "none") == (total, total)
    assert M.apply_freeze(model, name, "stages", 0) == (total, total)


@pytest.mark.parametrize("name", NAMES)
def test_architecture_does_not_depend_on_pretrained(name):
    """A fine-tuned model's state dict fits a freshly built one with the same settings (what a
    checkpoint reload does), including the grayscale small-stem variants."""
    size = M.resolve_input_size(name, (28, 36), small_input_stem=True)
    with torch.device("meta"):
        a = M.create_model(name, 5, in_channels=1, input_size=size, small_input_stem=True).model
        b = M.create_model(name, 5, in_channels=1, input_size=size, small_input_stem=True).model
    report, notes = M._load_state(b, name, a.state_dict(), "checkpoint")
    assert len(report.matched) == len(a.state_dict())
    assert not (report.missing or report.unexpected or report.mismatched_shapes or notes)


def test_freeze_argument_errors():
    model = _meta_model("resnet18")
    assert M.list_stages("resnet18") == ["stem", "layer1", "layer2", "layer3", "layer4"]
    with pytest.raises(ModelError, match="5 stages"):
        M.apply_freeze(model, "resnet18", "stages", 6)
    with pytest.raises(ModelError, match="Unknown freeze mode"):
        M.apply_freeze(model, "resnet18", "half")


def _bn_stats(model):
    return {n: (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
            for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}


@pytest.mark.parametrize("name,mode,stages", [
    ("resnet18", "stages", 2),
    ("mobilenet_v3_small", "features", 0),
    ("cifar_fast_small", "stages", 2),   # stem and group1 frozen, group2/3 and the head train
    pytest.param("vgg11_bn", "stages", 3, marks=pytest.mark.slow),   # a 133M-parameter model
])
def test_frozen_params_and_bn_stats_do_not_move(name, mode, stages, real_batch):
    x, y = real_batch
    torch.manual_seed(0)
    model = M.create_model(name, 4, input_size=32, small_input_stem=True).model
    # Calibrate BatchNorm statistics, as a pretrained backbone has them: with init-time
    # statistics the eval-mode features of a random MobileNet vanish (~1e-8) and nothing learns.
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.momentum = None  # cumulative average
    with torch.no_grad():
        model(x)
    for m in bns:
        m.momentum = 0.1
    trainable, total = M.apply_freeze(model, name, mode, stages)
    assert 0 < trainable < total
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    bn_before = _bn_stats(model)
    M.set_train_mode(model, True)
    frozen_bn = {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and not m.training}
    assert frozen_bn  # the frozen part has BatchNorm layers, now in eval mode
    opt = torch.optim.SGD(M.param_groups(model, name, lr=1.0, weight_decay=1e-2), lr=1.0)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[n]), f"trainable {n} did not change"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} changed"
    for n, (mean, var, count) in _bn_stats(model).items():
        if n in frozen_bn:
            assert torch.equal(mean, bn_before[n][0]) and torch.equal(var, bn_before[n][1])
            assert count == bn_before[n][2]
        else:
            assert not torch.equal(mean, bn_before[n][0])  # a trained BN layer does update
    M.set_train_mode(model, False)
    assert not any(m.training for m in model.modules())


# ---------------------------------------------------------------------------------------------
# FastCIFAR (airbench94 in plain modules)
# ---------------------------------------------------------------------------------------------

def _airbench_params(widths, classes=10, c_in=3):
    """Parameters of airbench's network counted by hand: stem 2×2 conv with bias (24 ch), per group
    two bias-free 3×3 convs and two BatchNorms (scale + shift), bias-free head."""
    n, prev = c_in * 24 * 4 + 24, 24
    for w in widths:
        n += prev * w * 9 + w * w * 9 + 2 * 2 * w
        prev = w
    return n + prev * classes


def test_fast_cifar_shapes_parameters_and_layers():
    assert M.count_params("cifar_fast", 10) == _airbench_params((64, 256, 256)) == 1_972_792
    assert M.count_params("cifar_fast_small", 10) == _airbench_params((32, 64, 128)) == 295_096
    assert M.count_params("cifar_fast", 10, in_channels=1) == _airbench_params((64, 256, 256), c_in=1)
    for name in ("cifar_fast", "cifar_fast_small"):
        spec = M.get_model_spec(name)
        assert spec.family == "FastCIFAR" and not spec.fixed_size and not spec.has_pretrained
        cm = M.create_model(name, 10, input_size=32)
        assert cm.model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
        assert cm.model(torch.zeros(2, 3, 64, 64)).shape == (2, 10)   # one model, any size
        assert cm.model(torch.zeros(1, 3, 24, 40)).shape == (1, 10)
        # 32×32: the 2×2 stem leaves 31×31, each group halves it: 15, 7, 3 (airbench's 3×3 map)
        df = M.layer_table(cm.model, (3, 32, 32)).set_index("layer")
        assert df.loc["stem.0", "output_shape"] == "[1, 24, 31, 31]"
        assert df.loc["group3.6", "output_shape"] == f"[1, {cm.model.head.in_features}, 3, 3]"
        assert M.first_conv_name(name) == "stem.0" and M.cam_layer(name) == ("group3", "conv")
        assert M.list_stages(name) == ["stem", "group1", "group2", "group3"]
        assert [id(p) for p in M.head_parameters(cm.model, name)] == [id(cm.model.head.weight)]
    with pytest.raises(ModelError, match="three positive group widths"):
        M.FastCIFAR(widths=(32, 64))


def _sample_batch(sample_zip, per_class: int = 4):
    """``per_class`` real training images of each of the sample's 10 classes, in [-1, 1]."""
    xs, ys = [], []
    with zipfile.ZipFile(sample_zip) as z:
        classes = sorted({n.split("/")[2] for n in z.namelist() if n.count("/") == 3})
        for label, c in enumerate(classes):
            for i in range(per_class):
                img = Image.open(io.BytesIO(z.read(f"cifar10-sample/train/{c}/{i:04d}.jpg"))).convert("RGB")
                xs.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1)
                ys.append(label)
    return torch.stack(xs), torch.tensor(ys)


@pytest.mark.parametrize("name", ["cifar_fast_small", pytest.param("cifar_fast", marks=pytest.mark.slow)])
def test_fast_cifar_learns_a_batch_of_the_sample(name, sample_zip):
    x, y = _sample_batch(sample_zip)
    assert len(set(y.tolist())) == 10
    torch.manual_seed(0)
    model = M.create_model(name, 10, input_size=32).model.train()
    opt = torch.optim.SGD(M.param_groups(model, name, lr=0.01, weight_decay=5e-4), lr=0.01, momentum=0.9,
                          nesterov=True)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert math.isfinite(losses[-1]) and losses[-1] < 0.5 * losses[0], losses


def test_param_groups():
    model = M.create_model("resnet18", 10, input_size=32, small_input_stem=True).model
    M.apply_freeze(model, "resnet18", "stages", 1)
    groups = M.param_groups(model, "resnet18", lr=0.01, head_lr=0.1, weight_decay=5e-4)
    by = {g["name"]: g for g in groups}
    assert set(by) == {"backbone", "backbone (no decay)", "head", "head (no decay)"}
    assert by["head"]["lr"] == 0.1 and by["backbone"]["lr"] == 0.01
    assert by["backbone (no decay)"]["weight_decay"] == 0.0 and by["backbone"]["weight_decay"] == 5e-4
    assert all(p.ndim == 1 for p in by["backbone (no decay)"]["params"] + by["head (no decay)"]["params"])
    assert all(p.ndim > 1 for p in by["backbone"]["params"])
    assert [id(p) for p in by["head"]["params"]] == [id(model.fc.weight)]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    torch.optim.AdamW(groups, lr=0.01)  # a real optimizer accepts them
    no_wd = M.param_groups(model, "resnet18", lr=0.01)
    assert [g["name"] for g in no_wd] == ["backbone", "head"] and no_wd[1]["lr"] == 0.01
    M.apply_freeze(model, "resnet18", "features")
    M.head_parameters(model, "resnet18")[0].requires_grad_(False)
    M.head_parameters(model, "resnet18")[1].requires_grad_(False)
    with pytest.raises(ModelError, match="nothing to train"):
        M.param_groups(model, "resnet18", lr=0.01)


def test_vit_embeddings_get_no_weight_decay():
    model = _meta_model("vit_b_16", size=32)
    groups = M.param_groups(model, "vit_b_16", lr=1e-3, weight_decay=0.05)
    nd = {id(p) for g in groups if "no decay" in g["name"] for p in g["params"]}
    assert id(model.class_token) in nd and id(model.encoder.pos_embedding) in nd


# ---------------------------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", M.INITS.names())
def test_init_schemes(scheme):
    torch.manual_seed(0)
    default = M.create_model("tutorial_net", 10, input_size=32).model
    torch.manual_seed(0)
    cm = M.create_model("tutorial_net", 10, input_size=32, init=scheme)
    layers = [m for m in cm.model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if scheme == "default":
        assert all(torch.equal(a, b) for a, b in zip(cm.model.state_dict().values(), default.state_dict().values()))
        return
    assert all(torch.all(m.bias == 0) for m in layers)
    assert any(f"'{scheme}'" in n for n in cm.notes)
    w = cm.model.fc1.weight  # 120 × 400
    fan_in, fan_out = w.shape[1], w.shape[0]
    if scheme == "constant":
        assert all(torch.all(m.weight == 0.01) for m in layers)
    elif scheme == "orthogonal":
        assert torch.allclose(w @ w.T, torch.eye(fan_out), atol=1e-4)
    elif scheme == "normal":
        assert abs(w.std().item() - 0.01) < 0.001
    elif scheme == "uniform":
        assert w.abs().max() <= 0.05
    elif scheme == "xavier_uniform":
        assert w.abs().max() <= math.sqrt(6 / (fan_in + fan_out)) + 1e-6
    elif scheme == "xavier_normal":
        assert abs(w.std().item() - math.sqrt(2 / (fan_in + fan_out))) < 0.01
    elif scheme == "kaiming_uniform":
        assert w.abs().max() <= math.sqrt(6 / fan_in) + 1e-6 and w.abs().max() > math.sqrt(1 / fan_in)
    elif scheme == "kaiming_normal":
        assert abs(w.std().item() - math.sqrt(2 / fan_in)) < 0.01
    else:  # a scheme added to the registry without a check here still must change the weights
        assert not torch.equal(w, default.fc1.weight)


def test_init_applies_to_every_layer_of_a_torchvision_model():
    cm = M.create_model("squeezenet1_1", 10, input_size=32, small_input_stem=True, init="constant")
    convs = [m for m in cm.model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 26 and all(torch.all(m.weight == 0.01) for m in convs)


# ---------------------------------------------------------------------------------------------
# Layer table
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_layer_table_totals(name):
    spec = M.get_model_spec(name)
    model = _meta_model(name, classes=10)
    M.apply_freeze(model, name, "stages", 1)
    s = spec.default_input_size
    df = M.layer_table(model, (3, s, s))
    assert list(df.columns) == ["layer", "type", "output_shape", "params", "trainable"]
    assert df["params"].sum() == sum(p.numel() for p in model.parameters())
    assert df["trainable"].sum() == sum(p.numel() for p in model.parameters() if p.requires_grad)
    head = M._fam(name).head_name(name)
    row = df[df["layer"] == head].iloc[0]
    assert "10" in row["output_shape"] and row["params"] > 0
    assert model.training  # the table leaves the mode alone


def test_layer_table_on_a_real_model():
    model = M.create_model("tutorial_net", 10, input_size=32).model
    df = M.layer_table(model, (3, 32, 32)).set_index("layer")
    assert df.loc["conv1", "output_shape"] == "[1, 6, 28, 28]"
    assert df.loc["pool", "output_shape"] == "[1, 6, 14, 14]; [1, 16, 5, 5]"  # reused module
    assert df.loc["fc3", "output_shape"] == "[1, 10]"
    assert df.loc["fc1", "params"] == 400 * 120 + 120
    assert df["params"].sum() == 62_006
    with pytest.raises(ModelError, match="built for 32×32"):
        M.layer_table(model, (3, 28, 28))


def test_layer_table_counts_parameters_outside_leaf_modules():
    model = _meta_model("vit_b_16", size=32)
    df = M.layer_table(model, (3, 32, 32)).set_index("layer")
    assert df.loc["(model)", "params"] == 768  # the class token
    assert df.loc["encoder", "params"] == 5 * 768  # position embedding: 2×2 patches + class token
