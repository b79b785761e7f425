"""DataLoaders over the embedded sample: worker rule, shuffling, batches."""
from __future__ import annotations

import math

import pytest
import torch

from core import datasets as D
from core import loaders as L
from core import transforms as T
from core.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def sample(session_data_dir):
    return D.load_dataset("sample", data_dir=session_data_dir)


@pytest.fixture(scope="module")
def split(sample):
    return D.split_dataset(sample, 0.1, 0.1, seed=0)


@pytest.mark.parametrize("cores,batch,expected", [(16, 4, 4), (16, 64, 8), (4, 64, 4), (2, 1, 1), (None, 32, 1)])
def test_tutorial_num_workers(monkeypatch, cores, batch, expected):
    monkeypatch.setattr(L.os, "cpu_count", lambda: cores)
    assert L.tutorial_num_workers(batch) == expected


@pytest.mark.parametrize("cores,expected", [(1, 0), (2, 0), (4, 4), (16, 8)])
def test_auto_workers_is_zero_on_small_machines(monkeypatch, cores, expected):
    monkeypatch.setattr(L.os, "cpu_count", lambda: cores)
    assert L.resolve_num_workers("auto", 64) == expected


def test_explicit_workers_used_as_is(monkeypatch):
    monkeypatch.setattr(L.os, "cpu_count", lambda: 2)
    assert L.resolve_num_workers(0, 64) == 0
    assert L.resolve_num_workers(6, 64) == 6
    assert L.resolve_num_workers("3", 64) == 3


@pytest.mark.parametrize("bad", [-1, "many", 1.5, True, None])
def test_bad_workers(bad):
    with pytest.raises(ConfigError, match="num_workers"):
        L.resolve_num_workers(bad, 4)


def test_transformed_subset(sample, split):
    t = T.build_transform([], "tutorial", "RGB")
    sub = L.TransformedSubset(sample, split.val, t)
    assert len(sub) == len(split.val)
    x, y = sub[3]
    assert x.shape == (3, 32, 32) and y == sample.targets[split.val[3]]


def test_train_loader_shuffles_deterministically(sample, split):
    t = T.build_transform([], "tutorial", "RGB")
    idx = split.train[::20]  # spread over every class

    def labels(seed):
        dl = L.make_loader(sample, idx, t, batch_size=32, train=True, num_workers=0, seed=seed)
        return torch.cat([y for _, y in dl]).tolist()

    a, b, c = labels(0), labels(0), labels(1)
    in_order = [sample.targets[i] for i in idx]
    assert a == b and a != c and a != in_order
    assert sorted(a) == sorted(in_order)  # every image exactly once


def test_set_epoch_reseeds_and_skips(sample, split):
    t = T.build_transform([], "none", "RGB")
    idx = split.train[::63]  # 70 images → batches of 16, 16, 16, 16, 6
    dl = L.make_loader(sample, idx, t, batch_size=16, train=True, num_workers=0, seed=0)
    assert len(dl) == 5 and dl.batch_sampler.batch_size == 16
    L.set_epoch(dl, 7)
    full = [y.tolist() for _, y in dl]
    L.set_epoch(dl, 7, skip_batches=2)
    assert [y.tolist() for _, y in dl] == full[2:]  # resume mid-epoch: the same remaining batches
    assert [len(y) for _, y in dl] == [16, 16, 16, 16, 6]  # the skip applied once
    L.set_epoch(dl, 8)
    assert [y.tolist() for _, y in dl] != full


def test_eval_loader_keeps_order_and_last_batch(sample, split):
    t = T.build_transform([], "tutorial", "RGB")
    dl = L.make_loader(sample, split.val, t, batch_size=64, train=False, num_workers=0)
    assert len(dl) == math.ceil(len(split.val) / 64) and dl.drop_last is False
    ys = torch.cat([y for _, y in dl]).tolist()
    assert ys == [sample.targets[i] for i in split.val]


def test_batches_shape_dtype_range(sample, split):
    t = T.build_transform(T.default_train_spec(32, (32, 32)), "tutorial", "RGB")
    dl = L.make_loader(sample, split.train, t, batch_size=16, train=True, num_workers=0)
    x, y = next(iter(dl))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (16,) and y.dtype == torch.int64
    assert x.min() >= -1.0 and x.max() <= 1.0 and x.min() < -0.5 and x.max() > 0.5


def test_loader_flags(sample, split):
    t = T.build_transform([], "none", "RGB")
    cpu = L.make_loader(sample, split.val, t, batch_size=8, train=False, num_workers=0, device="cpu")
    assert cpu.pin_memory is False and cpu.persistent_workers is False and cpu.num_workers == 0
    cuda = L.make_loader(sample, split.val, t, batch_size=8, train=False, num_workers=2, device="cuda:0")
    assert cuda.pin_memory is True and cuda.persistent_workers is True and cuda.num_workers == 2
    assert L.make_loader(sample, split.val, t, 8, False, device=torch.device("cuda")).pin_memory is True


def test_worker_process_loads_batches(sample, split):
    # one real worker: the dataset and the transform must survive the trip to another process
    t = T.build_transform(T.default_train_spec(32, (32, 32)), "imagenet", "RGB")
    dl = L.make_loader(sample, split.test[:24], t, batch_size=12, train=True, num_workers=1, seed=3)
    batches = [x.shape for x, _ in dl]
    assert batches == [torch.Size([12, 3, 32, 32])] * 2


def test_grayscale_array_dataset_batches():
    import numpy as np

    data = (np.arange(10 * 28 * 28) % 251).astype(np.uint8).reshape(10, 28, 28)
    ds = D.ArrayDataset(name="digits", classes=["a", "b"], targets=[0, 1] * 5, data=data, splits=None)
    t = T.build_transform(T.default_eval_spec(32, native_size=28), "tutorial", ds.mode)
    x, y = next(iter(L.make_loader(ds, range(10), t, batch_size=10, train=False, num_workers=0)))
    assert x.shape == (10, 1, 32, 32) and y.tolist() == [0, 1] * 5


def test_bad_loader_arguments(sample, split):
    t = T.build_transform([], "none", "RGB")
    with pytest.raises(ConfigError, match="batch_size"):
        L.make_loader(sample, split.val, t, batch_size=0, train=False)
    with pytest.raises(DataError, match="split is empty"):
        L.make_loader(sample, [], t, batch_size=4, train=True)
    with pytest.raises(ConfigError, match="Unknown device"):
        L.make_loader(sample, split.val, t, batch_size=4, train=False, device="gpu0")


@pytest.mark.parametrize("mode", ["constant", "reflect"])
def test_tensor_loader_crops_and_flips_exactly_like_per_image_indexing(sample_zip, mode):
    """The batched crop/flip (two gathers) gives, pixel for pixel, the crop at the drawn offsets of
    the zero- or reflect-padded image (torch's own padding of the float image), mirrored when its
    flip was drawn, then normalised."""
    import torch

    import io
    import zipfile

    import numpy as np
    from PIL import Image

    from core.tensorloader import TensorLoader

    with zipfile.ZipFile(sample_zip) as zf:
        names = sorted(n for n in zf.namelist() if n.endswith(".jpg"))[:37]
        arr = np.stack([np.asarray(Image.open(io.BytesIO(zf.read(n))).convert("RGB")) for n in names])
    images = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()          # 37×3×32×32 uint8
    mean, std, pad, seed, epoch, bs = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3], 4, 7, 3, 16
    loader = TensorLoader(images, list(range(37)), bs, train=True, mean=mean, std=std, padding=pad,
                          flip_p=0.5, seed=seed, padding_mode=mode)
    loader.set_epoch(epoch)
    batches = list(loader)
    # the same draws, in the same order, from the loader's documented generator
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(37, generator=gen)
    padded = torch.nn.functional.pad(images.float(), [pad] * 4, mode=mode)
    m = torch.tensor(mean).view(3, 1, 1) * 255
    s = torch.tensor(std).view(3, 1, 1) * 255
    flipped_some = kept_some = False
    for b, (x, y) in enumerate(batches):
        idx = order[b * bs:(b + 1) * bs]
        oy = torch.randint(0, 2 * pad + 1, (len(idx),), generator=gen)
        ox = torch.randint(0, 2 * pad + 1, (len(idx),), generator=gen)
        flip = torch.rand(len(idx), generator=gen) < 0.5
        assert torch.equal(y, idx)
        for i, k in enumerate(idx.tolist()):
            crop = padded[k, :, oy[i]:oy[i] + 32, ox[i]:ox[i] + 32]
            crop = crop.flip(2) if flip[i] else crop
            torch.testing.assert_close(x[i], (crop.float() - m) / s, rtol=0, atol=1e-6)
            flipped_some |= bool(flip[i])
            kept_some |= not bool(flip[i])
    assert flipped_some and kept_some and sum(len(y) for _, y in batches) == 37
