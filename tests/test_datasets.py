"""Dataset sources, summary, preview and splits, on the real CIFAR-10 images of the embedded sample."""
from __future__ import annotations

import copy
import functools
import gzip
import io
import json
import pickle
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core import datasets as D
from core.errors import ConfigError, DataError, MissingFileError

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ---- helpers: real JPEGs from the embedded sample -----------------------------------------------

def jpeg(sample_zip: Path, cls: str, k: int, split: str = "train") -> bytes:
    return _zip_member(str(sample_zip), f"cifar10-sample/{split}/{cls}/{k:04d}.jpg")


@functools.lru_cache(maxsize=None)
def _open_zip(path: str) -> zipfile.ZipFile:
    return zipfile.ZipFile(path)  # parsing the 6,000-entry directory once, not per image


def _zip_member(path: str, name: str) -> bytes:
    return _open_zip(path).read(name)


def make_tree(root: Path, sample_zip: Path, counts: dict[str, int], start: int = 0) -> Path:
    """root/<class>/<k>.jpg with real CIFAR images (class names map onto sample classes in turn)."""
    for j, (cls, n) in enumerate(counts.items()):
        d = root / cls
        d.mkdir(parents=True, exist_ok=True)
        for k in range(n):
            (d / f"{k:03d}.jpg").write_bytes(jpeg(sample_zip, CLASSES[j % 10], start + k))
    return root


@pytest.fixture(scope="module")
def sample(session_data_dir):
    return D.load_dataset("sample", data_dir=session_data_dir)


# ---- the embedded sample --------------------------------------------------------------------------

def test_sample_counts_and_predefined_split(sample):
    assert sample.name == D.SAMPLE_NAME
    assert sample.classes == CLASSES
    assert len(sample) == 6000 and sample.mode == "RGB"
    assert {k: len(v) for k, v in sample.splits.items()} == {"train": 5000, "test": 1000}
    assert sample.skipped == [] and sample.warnings == []
    assert sample.source == {"kind": "sample"}
    s = D.summarize(sample)
    assert s.total == 6000
    assert s.per_class["class"].tolist() == CLASSES
    assert s.per_class["images"].tolist() == [600] * 10
    assert s.per_class["share"].tolist() == pytest.approx([0.1] * 10)
    assert s.sizes.to_dict("records") == [{"width": 32, "height": 32, "mode": "RGB", "images": 6000}]
    assert s.skipped.empty and list(s.skipped.columns) == ["file", "reason"]
    # the split tables of the source: 500 train + 100 test per class
    table = D.split_table(sample, D.split_dataset(sample, val_fraction=0.0))
    assert list(table.columns) == ["class", "train", "val", "test", "total"]
    assert table["train"].tolist() == [500] * 10 and table["test"].tolist() == [100] * 10
    assert table["val"].tolist() == [0] * 10 and table["total"].tolist() == [600] * 10


def test_sample_item_api(sample):
    i = sample.splits["test"][0]
    assert sample.describe(i) == "test/airplane/0000.jpg"
    assert Path(sample.image_path(i)).is_file()
    assert sample.image_size(i) == (32, 32) and sample.image_mode(i) == "RGB"
    im = sample.load_image(i)
    assert im.mode == "RGB" and im.size == (32, 32)
    assert sample.targets[i] == 0


def test_sample_extracted_once_and_reused(session_data_dir, sample):
    folder = session_data_dir / D.SAMPLE_FOLDER
    marker = folder / "train" / "airplane" / "0000.jpg"
    before = marker.stat().st_mtime_ns
    again = D.load_dataset("sample", data_dir=session_data_dir)
    assert marker.stat().st_mtime_ns == before
    assert again.targets == sample.targets
    assert not [p for p in session_data_dir.iterdir() if "partial" in p.name]


def test_extract_once_is_atomic_under_concurrency(tmp_path, sample_zip):
    src = tmp_path / "small.zip"
    with zipfile.ZipFile(src, "w") as z:
        for k in range(30):
            z.writestr(f"top/c{k % 3}/{k}.jpg", jpeg(sample_zip, "cat", k))
    dest = tmp_path / "data" / "top"
    results, errors = [], []

    def work():
        try:
            results.append(D._extract_once(src, dest, inner="top"))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [dest] * 4
    assert len(list(dest.rglob("*.jpg"))) == 30
    assert sorted(p.name for p in dest.parent.iterdir()) == ["top"]  # no partial folders left


def test_to_uint8_array_file_backed(sample):
    idx = sample.splits["train"][:5]
    a = sample.to_uint8_array(idx)
    assert a.shape == (5, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a[2], np.asarray(sample.load_image(idx[2])))
    b = sample.to_uint8_array(idx, size=(16, 24))
    assert b.shape == (5, 16, 24, 3)
    assert sample.to_uint8_array(idx, size=8).shape == (5, 8, 8, 3)


# ---- splits ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def unsplit(sample):
    ds = copy.copy(sample)
    ds.splits = None
    return ds


def test_random_split_stratified_disjoint_covering(unsplit):
    sp = D.split_dataset(unsplit, val_fraction=0.1, test_fraction=0.2, seed=3)
    tr, va, te = set(sp.train), set(sp.val), set(sp.test)
    assert not (tr & va or tr & te or va & te)
    assert tr | va | te == set(range(len(unsplit)))
    table = D.split_table(unsplit, sp)
    assert table["val"].tolist() == [60] * 10  # 600 per class × 0.1
    assert table["test"].tolist() == [120] * 10
    assert table["train"].tolist() == [420] * 10
    assert sp.warnings == [] and "random" in sp.note
    assert sp.train == sorted(sp.train)


def test_split_deterministic_per_seed(unsplit):
    a = D.split_dataset(unsplit, seed=1)
    b = D.split_dataset(unsplit, seed=1)
    c = D.split_dataset(unsplit, seed=2)
    assert (a.train, a.val, a.test) == (b.train, b.val, b.test)
    assert a.val != c.val and a.test != c.test
    assert D.split_table(unsplit, a).equals(D.split_table(unsplit, c))  # same counts, other images


def test_predefined_split_train_test_carves_val_from_train(sample):
    sp = D.split_dataset(sample, val_fraction=0.1, test_fraction=0.3, seed=0)
    assert sp.test == sorted(sample.splits["test"])  # test used as is; test_fraction unused
    assert set(sp.train) | set(sp.val) == set(sample.splits["train"])
    assert not set(sp.train) & set(sp.val)
    # val = 0.1 of the WHOLE dataset (600 images), stratified: 60 per class
    table = D.split_table(sample, sp)
    assert table["val"].tolist() == [60] * 10 and table["train"].tolist() == [440] * 10
    assert "predefined" in sp.note
    assert D.split_dataset(sample, seed=5).val != sp.val


def test_predefined_split_too_big_fraction(sample):
    with pytest.raises(ConfigError, match="predefined train split"):
        D.split_dataset(sample, val_fraction=0.85, test_fraction=0.1)


@pytest.mark.parametrize("val,test", [(-0.1, 0.1), (1.0, 0.0), (0.5, 0.5), (0.1, float("nan")), ("0.1", 0.1),
                                      (True, 0.1)])
def test_split_fractions_validated(unsplit, val, test):
    with pytest.raises(ConfigError, match="fraction"):
        D.split_dataset(unsplit, val_fraction=val, test_fraction=test)


def test_split_zero_fractions(unsplit):
    sp = D.split_dataset(unsplit, val_fraction=0.0, test_fraction=0.0)
    assert len(sp.train) == len(unsplit) and sp.val == [] and sp.test == [] and sp.warnings == []


# ---- folder source -----------------------------------------------------------------------------------

def test_folder_without_split(tmp_path, sample_zip):
    root = make_tree(tmp_path / "pets", sample_zip, {"cats": 10, "dogs": 12, "birds": 8})
    ds = D.load_dataset("folder", root)
    assert ds.name == "pets" and ds.classes == ["birds", "cats", "dogs"]
    assert ds.splits is None and len(ds) == 30
    assert ds.class_counts() == [8, 10, 12]
    assert ds.source == {"kind": "folder", "location": str(root.resolve())}
    assert ds.describe(0) == "birds/000.jpg"
    sp = D.split_dataset(ds, 0.2, 0.2, seed=0)
    assert D.split_table(ds, sp)[["train", "val", "test"]].values.tolist() == [[4, 2, 2], [6, 2, 2], [8, 2, 2]]


def test_folder_with_train_valid_test(tmp_path, sample_zip):
    root = tmp_path / "ds"
    make_tree(root / "train", sample_zip, {"a": 6, "b": 6})
    make_tree(root / "valid", sample_zip, {"a": 2, "b": 2}, start=10)
    make_tree(root / "test", sample_zip, {"a": 3, "c": 3}, start=20)  # class c only in test
    ds = D.load_dataset("folder", root)
    assert ds.classes == ["a", "b", "c"]  # union, sorted
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 12, "val": 4, "test": 6}
    sp = D.split_dataset(ds)
    assert (sp.train, sp.val, sp.test) == (ds.splits["train"], ds.splits["val"], ds.splits["test"])
    assert sp.note == "predefined split from the source"
    assert any("'c' has no training images" in w for w in sp.warnings)
    assert any("'c' has no validation images" in w for w in sp.warnings)
    assert ds.describe(ds.splits["val"][0]).startswith("valid/a/")


def test_folder_train_only_carves_both(tmp_path, sample_zip):
    root = tmp_path / "ds"
    make_tree(root / "train", sample_zip, {"a": 20, "b": 20})
    ds = D.load_dataset("folder", root)
    sp = D.split_dataset(ds, 0.1, 0.2)
    assert D.split_table(ds, sp)[["train", "val", "test"]].values.tolist() == [[14, 2, 4], [14, 2, 4]]


def test_folder_single_wrapper_folder(tmp_path, sample_zip):
    make_tree(tmp_path / "outer" / "mydata" / "train", sample_zip, {"x": 3, "y": 3})
    make_tree(tmp_path / "outer" / "mydata" / "test", sample_zip, {"x": 2, "y": 2}, start=5)
    (tmp_path / "outer" / ".DS_Store").write_bytes(b"\0")
    ds = D.load_dataset("folder", tmp_path / "outer")
    assert ds.classes == ["x", "y"] and set(ds.splits) == {"train", "test"}


def test_folder_errors(tmp_path, sample_zip):
    with pytest.raises(DataError, match="does not exist"):
        D.load_dataset("folder", tmp_path / "nope")
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.jpg").write_bytes(jpeg(sample_zip, "cat", 0))
    with pytest.raises(DataError, match="no class sub-folders"):
        D.load_dataset("folder", flat)
    mixed = tmp_path / "mixed"
    make_tree(mixed / "train", sample_zip, {"a": 2, "b": 2})
    make_tree(mixed, sample_zip, {"extra": 1})
    with pytest.raises(DataError, match="mixes split folders"):
        D.load_dataset("folder", mixed)
    with pytest.raises(DataError, match="No folder given"):
        D.load_dataset("folder", None)


def test_unknown_kind_lists_sources():
    with pytest.raises(ConfigError, match="sample, folder, zip, index, torchvision"):
        D.load_dataset("s3")


# ---- zip source ----------------------------------------------------------------------------------------

def test_zip_with_wrapper_folder(tmp_path, sample_zip):
    z = tmp_path / "animals.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for cls in ("cat", "dog", "frog"):
            for k in range(4):
                zf.writestr(f"mydata/{cls}/{k}.jpg", jpeg(sample_zip, cls, k))
    data_dir = tmp_path / "data"
    ds = D.load_dataset("zip", z, data_dir=data_dir)
    assert ds.name == "animals" and ds.classes == ["cat", "dog", "frog"] and len(ds) == 12
    uploads = list((data_dir / "uploads").iterdir())
    assert len(uploads) == 1 and uploads[0].name == D._file_hash(z)
    assert ds.source["kind"] == "zip" and ds.source["extracted"] == str(uploads[0])
    stamp = (uploads[0] / "mydata" / "cat" / "0.jpg").stat().st_mtime_ns
    again = D.load_dataset("zip", z, data_dir=data_dir)  # same content hash → reused, not re-extracted
    assert (uploads[0] / "mydata" / "cat" / "0.jpg").stat().st_mtime_ns == stamp
    assert again.targets == ds.targets
    # reload from the source after the upload is gone
    z.unlink()
    back = D.load_from_source(ds.source, data_dir=data_dir)
    assert back.classes == ds.classes and len(back) == 12


def test_zip_with_split_folders(tmp_path, sample_zip):
    z = tmp_path / "s.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for split, n in (("train", 5), ("val", 2)):
            for cls in ("ship", "truck"):
                for k in range(n):
                    zf.writestr(f"{split}/{cls}/{k}.jpg", jpeg(sample_zip, cls, k))
    ds = D.load_dataset("zip", z, data_dir=tmp_path / "data")
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 10, "val": 4}


# ---- index files -----------------------------------------------------------------------------------------

def _images(root: Path, sample_zip: Path, names: dict[str, tuple[str, int]]) -> None:
    for rel, (cls, k) in names.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(jpeg(sample_zip, cls, k))


def test_index_txt_space_separated(tmp_path, sample_zip):
    _images(tmp_path, sample_zip, {"img/a 1.jpg": ("cat", 0), "img/b.jpg": ("cat", 1),
                                   "img/c.jpg": ("dog", 0), "img/d.jpg": ("dog", 1)})
    index = tmp_path / "labels.txt"
    index.write_text("# my labels\n\nimg/a 1.jpg cat\nimg/b.jpg\tcat\nimg/c.jpg   dog\nimg/d.jpg dog\n"
                     "img/missing.jpg dog\n", encoding="utf-8")
    ds = D.load_dataset("index", index)
    assert ds.name == "labels" and ds.classes == ["cat", "dog"] and ds.targets == [0, 0, 1, 1]
    assert ds.splits is None
    assert ds.describe(0) == "img/a 1.jpg"
    assert ds.skipped == [("img/missing.jpg", "file not found (line 7)")]
    assert ds.source == {"kind": "index", "location": str(index.resolve())}


def test_index_csv_header_split_and_integer_labels(tmp_path, sample_zip):
    rows = []
    for k in range(12):
        label = k % 3 * 5  # integer labels 0, 5, 10: classes ordered numerically
        split = "train" if k < 6 else ("val" if k < 9 else "test")
        rel = f"data/{k}.jpg"
        _images(tmp_path, sample_zip, {rel: (CLASSES[k % 3], k)})
        rows.append(f"{rel},{label},{split}")
    index = tmp_path / "meta" / "index.csv"
    index.parent.mkdir()
    index.write_text("path,label,split\n" + "\n".join(f"../{r}" for r in rows) + "\n", encoding="utf-8")
    ds = D.load_dataset("index", index)
    assert ds.classes == ["0", "5", "10"]
    assert ds.targets == [k % 3 for k in range(12)]
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 6, "val": 3, "test": 3}
    sp = D.split_dataset(ds)
    assert sp.val == ds.splits["val"]


def test_index_csv_header_in_other_order(tmp_path, sample_zip):
    _images(tmp_path, sample_zip, {"x.jpg": ("cat", 0), "y.jpg": ("dog", 0)})
    index = tmp_path / "i.csv"
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "y.jpg").write_bytes((tmp_path / "y.jpg").read_bytes())
    index.write_text("class,file\ncat,x.jpg\ndog,sub\\y.jpg\n")  # a Windows path separator
    ds = D.load_dataset("index", index)
    assert ds.classes == ["cat", "dog"] and ds.targets == [0, 1]


def test_index_errors(tmp_path, sample_zip):
    _images(tmp_path, sample_zip, {"x.jpg": ("cat", 0), "y.jpg": ("dog", 0)})
    bad = tmp_path / "bad.txt"
    bad.write_text("x.jpg cat\ny.jpg\n")
    with pytest.raises(DataError, match=r"bad.txt, line 2: expected 'path,label'"):
        D.load_dataset("index", bad)
    bad.write_text("x.jpg,cat,train\ny.jpg,dog,holdout\n")
    with pytest.raises(DataError, match=r"line 2: the split field is not one of train, val") as e:
        D.load_dataset("index", bad)
    assert "holdout" not in str(e.value)  # a message never quotes the file's contents
    bad.write_text("# nothing\n")
    with pytest.raises(DataError, match="no data lines"):
        D.load_dataset("index", bad)
    with pytest.raises(DataError, match="does not exist"):
        D.load_dataset("index", tmp_path / "none.csv")


# ---- summary and preview ------------------------------------------------------------------------------------

def test_preview_seeded(sample):
    a = D.preview_samples(sample, n=12, seed=4)
    b = D.preview_samples(sample, n=12, seed=4)
    c = D.preview_samples(sample, n=12, seed=5)
    assert len(a) == 12
    assert all(isinstance(im, Image.Image) and cap in CLASSES for im, cap in a)
    assert [im.tobytes() for im, _ in a] == [im.tobytes() for im, _ in b]
    assert [im.tobytes() for im, _ in a] != [im.tobytes() for im, _ in c]


def test_preview_per_class(sample):
    p = D.preview_samples(sample, per_class=2, seed=0)
    assert [cap for _, cap in p] == [c for c in CLASSES for _ in range(2)]
    same, other = D.preview_samples(sample, per_class=2, seed=0), D.preview_samples(sample, per_class=2, seed=1)
    assert [im.tobytes() for im, _ in p] == [im.tobytes() for im, _ in same]    # seeded
    assert [im.tobytes() for im, _ in p] != [im.tobytes() for im, _ in other]   # reshuffle shows others
    assert len(D.preview_samples(sample, n=40)) == 40


def test_summary_sizes_mixed(tmp_path, sample_zip):
    root = make_tree(tmp_path / "m", sample_zip, {"a": 3, "b": 2})
    Image.new("RGB", (40, 30), "red").save(root / "a" / "big.png")
    Image.new("L", (40, 30), 128).save(root / "b" / "gray.png")
    s = D.summarize(D.load_dataset("folder", root))
    assert s.total == 7
    assert s.sizes.to_dict("records") == [
        {"width": 32, "height": 32, "mode": "RGB", "images": 5},
        {"width": 40, "height": 30, "mode": "L", "images": 1},
        {"width": 40, "height": 30, "mode": "RGB", "images": 1}]
    assert s.per_class["images"].tolist() == [4, 3]


def test_common_image_size(sample, tmp_path, sample_zip):
    assert D.common_image_size(sample) == (32, 32)
    root = make_tree(tmp_path / "m", sample_zip, {"a": 2, "b": 2})
    Image.new("RGB", (40, 30), "red").save(root / "a" / "big.png")
    ds = D.load_dataset("folder", root)
    assert D.common_image_size(ds) is None
    with pytest.raises(DataError, match="different sizes"):
        ds.to_uint8_array(range(len(ds)))
    assert ds.to_uint8_array(range(len(ds)), size=32).shape == (5, 32, 32, 3)


# ---- torchvision sets, offline, in their real on-disk formats -------------------------------------------

def _cifar_images(sample_zip: Path, n: int) -> tuple[np.ndarray, list[int]]:
    imgs, labels = [], []
    for k in range(n):
        c = k % 10
        imgs.append(np.asarray(Image.open(io.BytesIO(jpeg(sample_zip, CLASSES[c], k))).convert("RGB")))
        labels.append(c)
    return np.stack(imgs), labels


def _write_cifar10(folder: Path, sample_zip: Path, per_batch: int = 4) -> np.ndarray:
    """cifar-10-batches-py/ with data_batch_1..5, test_batch and batches.meta (pickled dicts, CHW rows)."""
    folder.mkdir(parents=True, exist_ok=True)
    imgs, labels = _cifar_images(sample_zip, per_batch * 6)
    rows = imgs.transpose(0, 3, 1, 2).reshape(len(imgs), 3072)  # the official layout: R plane, G, B
    names = [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]
    for b, name in enumerate(names):
        sl = slice(b * per_batch, (b + 1) * per_batch)
        entry = {"batch_label": name, "labels": labels[sl], "data": rows[sl],
                 "filenames": [f"{k}.png" for k in range(per_batch)]}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps(
        {"label_names": CLASSES, "num_cases_per_batch": per_batch, "num_vis": 3072}, protocol=2))
    return imgs


def test_cifar10_offline_files(tmp_path, sample_zip, monkeypatch):
    monkeypatch.setattr(D, "VERIFY_CHECKSUMS", False)  # our small files cannot match the official MD5s
    imgs = _write_cifar10(tmp_path / "CIFAR10" / "cifar-10-batches-py", sample_zip)
    ds = D.load_dataset("torchvision", "CIFAR10", data_dir=tmp_path, download=False)
    assert isinstance(ds, D.ArrayDataset) and ds.name == "CIFAR-10" and ds.mode == "RGB"
    assert ds.classes == CLASSES and len(ds) == 24
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 20, "test": 4}
    assert ds.data.shape == (24, 32, 32, 3) and ds.data.dtype == np.uint8
    assert np.array_equal(np.asarray(ds.load_image(7)), imgs[7])
    assert ds.targets[:10] == list(range(10))
    assert ds.describe(21) == "CIFAR-10 test #1" and ds.describe(3) == "CIFAR-10 train #3"
    assert ds.image_path(0) is None and ds.image_size(0) == (32, 32)
    assert ds.source == {"kind": "torchvision", "location": "CIFAR10"}
    assert ds.to_uint8_array([1, 2]).shape == (2, 32, 32, 3)
    assert ds.to_uint8_array([1, 2], size=16).shape == (2, 16, 16, 3)
    s = D.summarize(ds)
    assert s.sizes.to_dict("records") == [{"width": 32, "height": 32, "mode": "RGB", "images": 24}]
    # aliases of the name
    assert len(D.load_dataset("torchvision", "cifar-10", data_dir=tmp_path, download=False)) == 24


def test_cifar10_checksums_checked_by_default(tmp_path, sample_zip):
    _write_cifar10(tmp_path / "CIFAR10" / "cifar-10-batches-py", sample_zip)
    with pytest.raises(DataError, match="checksum mismatch") as e:
        D.load_dataset("torchvision", "CIFAR10", data_dir=tmp_path, download=False)
    assert "data_batch_1" in str(e.value) and "cifar-10-python.tar.gz" in str(e.value)


def test_cifar10_placed_tarball_is_unpacked(tmp_path, sample_zip, monkeypatch):
    monkeypatch.setattr(D, "VERIFY_CHECKSUMS", False)
    staging = tmp_path / "staging"
    _write_cifar10(staging / "cifar-10-batches-py", sample_zip, per_batch=2)
    root = tmp_path / "data" / "CIFAR10"
    root.mkdir(parents=True)
    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(staging / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    ds = D.load_dataset("torchvision", "CIFAR10", data_dir=tmp_path / "data", download=False)
    assert len(ds) == 12 and (root / "cifar-10-batches-py" / "test_batch").is_file()


def test_cifar100_offline_files(tmp_path, sample_zip, monkeypatch):
    monkeypatch.setattr(D, "VERIFY_CHECKSUMS", False)
    folder = tmp_path / "CIFAR100" / "cifar-100-python"
    folder.mkdir(parents=True)
    imgs, _ = _cifar_images(sample_zip, 8)
    rows = imgs.transpose(0, 3, 1, 2).reshape(8, 3072)
    fine = [f"class{k:02d}" for k in range(100)]
    for name, sl, labels in (("train", slice(0, 6), [0, 1, 2, 97, 98, 99]), ("test", slice(6, 8), [5, 99])):
        (folder / name).write_bytes(pickle.dumps({"data": rows[sl], "fine_labels": labels,
                                                  "coarse_labels": [0] * len(labels)}, protocol=2))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": fine, "coarse_label_names": ["x"] * 20}))
    ds = D.load_dataset("torchvision", "CIFAR100", data_dir=tmp_path, download=False)
    assert len(ds.classes) == 100 and ds.targets == [0, 1, 2, 97, 98, 99, 5, 99]
    assert np.array_equal(np.asarray(ds.load_image(6)), imgs[6])


def _idx_images(arr: np.ndarray) -> bytes:
    n, h, w = arr.shape
    return bytes([0, 0, 8, 3]) + np.array([n, h, w], ">u4").tobytes() + arr.astype(np.uint8).tobytes()


def _idx_labels(labels: list[int]) -> bytes:
    return bytes([0, 0, 8, 1]) + np.array([len(labels)], ">u4").tobytes() + bytes(labels)


def _digits(sample_zip: Path, n: int, offset: int = 0) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(jpeg(sample_zip, CLASSES[k % 10], k + offset)))
                                .convert("L").resize((28, 28))) for k in range(n)])


@pytest.mark.parametrize("name,gz", [("MNIST", False), ("FashionMNIST", True)])
def test_mnist_family_raw_idx_files(tmp_path, sample_zip, name, gz):
    raw = tmp_path / name / "raw"
    raw.mkdir(parents=True)
    train, test = _digits(sample_zip, 6), _digits(sample_zip, 3, offset=50)
    files = {"train-images-idx3-ubyte": _idx_images(train), "train-labels-idx1-ubyte": _idx_labels([0, 1, 2, 3, 4, 9]),
             "t10k-images-idx3-ubyte": _idx_images(test), "t10k-labels-idx1-ubyte": _idx_labels([7, 8, 9])}
    for fname, data in files.items():
        if gz:
            (raw / f"{fname}.gz").write_bytes(gzip.compress(data))
        else:
            (raw / fname).write_bytes(data)
    ds = D.load_dataset("torchvision", name, data_dir=tmp_path, download=False)
    assert ds.mode == "L" and ds.data.shape == (9, 28, 28)
    assert ds.targets == [0, 1, 2, 3, 4, 9, 7, 8, 9]
    assert len(ds.classes) == 10 and {k: len(v) for k, v in ds.splits.items()} == {"train": 6, "test": 3}
    im = ds.load_image(7)
    assert im.mode == "L" and np.array_equal(np.asarray(im), test[1])
    assert ds.to_uint8_array([0, 1]).shape == (2, 28, 28, 1)
    assert ds.describe(8) == f"{ds.name} test #2"


def test_placed_gzip_bomb_is_refused(tmp_path, monkeypatch):
    """A .gz placed under MNIST's name that unpacks far beyond the real file is not unpacked."""
    monkeypatch.setattr(D, "MAX_GZ_UNPACKED_BYTES", 4 << 20)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(bytes(8 << 20)))
    with pytest.raises(DataError, match=r"unpacks to more than 4 MiB") as e:
        D.load_dataset("torchvision", "MNIST", data_dir=tmp_path, download=False)
    assert "train-images-idx3-ubyte.gz" in str(e.value) and "not the official file" in str(e.value)
    assert sorted(p.name for p in raw.iterdir()) == ["train-images-idx3-ubyte.gz"]   # no partial file left


def test_mnist_inconsistent_files(tmp_path, sample_zip):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte").write_bytes(_idx_images(_digits(sample_zip, 4)))
    (raw / "train-labels-idx1-ubyte").write_bytes(_idx_labels([1, 2]))  # 4 images, 2 labels
    (raw / "t10k-images-idx3-ubyte").write_bytes(b"garbage")
    (raw / "t10k-labels-idx1-ubyte").write_bytes(_idx_labels([1]))
    with pytest.raises(DataError, match="MNIST"):
        D.load_dataset("torchvision", "MNIST", data_dir=tmp_path, download=False)


@pytest.mark.parametrize("name,archive,inner,meta", [
    ("CIFAR10", "cifar-10-python.tar.gz", "cifar-10-batches-py/data_batch_1", "cifar-10-batches-py/batches.meta"),
    ("CIFAR100", "cifar-100-python.tar.gz", "cifar-100-python/train", "cifar-100-python/meta")])
def test_missing_files_message_cifar(tmp_path, name, archive, inner, meta):
    with pytest.raises(MissingFileError) as e:
        D.load_dataset("torchvision", name, data_dir=tmp_path, download=False)
    msg = str(e.value)
    assert archive in msg and str(tmp_path / name) in msg
    assert "download is turned off" in msg
    assert e.value.folder == str(tmp_path / name)
    assert inner in e.value.files and archive in e.value.files and meta in e.value.files


def test_missing_files_message_fashion_mnist_names_the_gz_files(tmp_path):
    with pytest.raises(MissingFileError) as e:
        D.load_dataset("torchvision", "FashionMNIST", data_dir=tmp_path, download=False)
    raw = tmp_path / "FashionMNIST" / "raw"
    assert e.value.folder == str(raw) and str(raw) in str(e.value)
    for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        assert f in e.value.files and f"{f}.gz" in str(e.value)


def test_missing_files_message_mnist_lists_only_missing(tmp_path, sample_zip):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte").write_bytes(_idx_images(_digits(sample_zip, 2)))
    with pytest.raises(MissingFileError) as e:
        D.load_dataset("torchvision", "MNIST", data_dir=tmp_path, download=False)
    assert e.value.files == ["train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    assert e.value.folder == str(raw) and str(raw) in str(e.value)


def test_download_without_network(tmp_path, monkeypatch):
    # the probe fails as it does offline: no download is attempted, the message says why
    monkeypatch.setattr(D, "probe_network", lambda url, timeout=1.0: "cannot reach www.cs.toronto.edu: offline")
    with pytest.raises(MissingFileError, match="cannot reach"):
        D.load_dataset("torchvision", "CIFAR10", data_dir=tmp_path, download=True)


def test_download_failure_is_caught(tmp_path, monkeypatch):
    from urllib.error import URLError

    import torchvision.datasets.mnist as tv_mnist

    def refuse(*a, **k):
        raise URLError("connection refused")

    monkeypatch.setattr(D, "probe_network", lambda url, timeout=1.0: None)
    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", refuse)
    with pytest.raises(MissingFileError, match="download failed") as e:
        D.load_dataset("torchvision", "MNIST", data_dir=tmp_path, download=True)
    assert "train-images-idx3-ubyte" in e.value.files


def test_unknown_torchvision_set():
    with pytest.raises(ConfigError, match="CIFAR10, CIFAR100, MNIST, FashionMNIST"):
        D.load_dataset("torchvision", "ImageNet")


def test_source_is_json(sample, tmp_path):
    assert json.loads(json.dumps(sample.source)) == sample.source
    assert len(D.load_from_source(sample.source, data_dir=Path(sample.root).parent)) == len(sample)


def test_the_offline_switch_stops_dataset_downloads_too(tmp_path, monkeypatch):
    """CLASSIFIER_LAB_OFFLINE kept ImageNet weights from downloading but not torchvision sets."""
    from core.models import OFFLINE_ENV

    monkeypatch.setenv(OFFLINE_ENV, "1")
    monkeypatch.setattr(D, "probe_network", lambda url, timeout=1.0: None)   # as if the host answered
    monkeypatch.setattr(D, "_tv_download", lambda *a, **k: pytest.fail("downloaded although offline"))
    with pytest.raises(MissingFileError) as e:
        D.load_dataset("torchvision", "CIFAR10", data_dir=tmp_path, download=True)
    folder = tmp_path / "CIFAR10"
    assert f"downloads are off: {OFFLINE_ENV} is set" in str(e.value)
    assert f"Place cifar-10-python.tar.gz (from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz) in {folder}" \
        in str(e.value)
    assert e.value.folder == str(folder) and "cifar-10-python.tar.gz" in e.value.files
