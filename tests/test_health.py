"""Data health (core/health.py) on real images: a verified-clean cut of the shared CIFAR-10 subset,
the same with planted exact and near copies, leaks, a blank and an odd-size image."""
from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path

import pytest
from PIL import Image, ImageEnhance, ImageOps

from core import health
from core.datasets import load_dataset
from core.errors import DataError

CLASSES = ("airplane", "cat", "ship")
# Every image of these ranges was checked (the whole subset's 15 near-duplicate pairs lie outside them,
# and the top candidates were looked at side by side): no duplicates among them.
RANGES = {"train": range(0, 120), "val": range(40, 50), "test": range(0, 40)}


def _build_clean(shared_zip: Path, root: Path) -> Path:
    with zipfile.ZipFile(shared_zip) as zf:
        for split, numbers in RANGES.items():
            src = "test" if split == "val" else split
            for cls in CLASSES:
                out = root / split / cls
                out.mkdir(parents=True)
                for k in numbers:
                    (out / f"{k:04d}.jpg").write_bytes(zf.read(f"cifar10-mini/{src}/{cls}/{k:04d}.jpg"))
    return root


def _jpeg(im: Image.Image, path: Path, quality: int) -> None:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    path.write_bytes(buf.getvalue())


# (source in train, planted file, how, kind, split of the copy)
PLANTS = [
    ("airplane/0005.jpg", "train/airplane/copy.jpg", "bytes", "exact", "train"),
    ("cat/0007.jpg", "test/cat/leak.jpg", "bytes", "exact", "test"),
    ("ship/0009.jpg", "val/ship/leak.jpg", "bytes", "exact", "val"),
    ("airplane/0011.jpg", "test/airplane/q60.jpg", "jpeg60", "near", "test"),
    ("cat/0013.jpg", "train/cat/up.png", "upscale", "near", "train"),
    ("ship/0015.jpg", "test/ship/bright.jpg", "brighten", "near", "test"),
    ("airplane/0017.jpg", "train/airplane/mirror.png", "mirror", "near", "train"),
    ("cat/0019.jpg", "test/cat/crop.png", "crop", "near", "test"),
    ("ship/0021.jpg", "train/ship/down.png", "downscale", "near", "train"),
    ("airplane/0023.jpg", "val/airplane/contrast.jpg", "contrast", "near", "val"),
]


def _plant(root: Path) -> None:
    for src, dst, how, _, _ in PLANTS:
        src_path, dst_path = root / "train" / src, root / dst
        if how == "bytes":
            shutil.copyfile(src_path, dst_path)
            continue
        im = Image.open(src_path).convert("RGB")
        if how == "jpeg60":
            _jpeg(im, dst_path, 60)
        elif how == "brighten":
            _jpeg(ImageEnhance.Brightness(im).enhance(1.2), dst_path, 95)
        elif how == "contrast":
            _jpeg(ImageEnhance.Contrast(im).enhance(0.8), dst_path, 90)
        else:
            change = {"upscale": lambda x: x.resize((64, 64), Image.BICUBIC), "mirror": ImageOps.mirror,
                      "crop": lambda x: x.crop((1, 1, 32, 32)), "downscale": lambda x: x.resize((28, 28), Image.BILINEAR)}
            change[how](im).save(dst_path)
    Image.new("RGB", (32, 32), (90, 140, 200)).save(root / "train" / "cat" / "blank.png")
    tiles = [Image.open(root / "test" / c / f"{k:04d}.jpg").convert("RGB") for c in CLASSES for k in (30, 31)]
    big = Image.new("RGB", (96, 64))
    for n, t in enumerate(tiles):
        big.paste(t, ((n % 3) * 32, (n // 3) * 32))
    big.resize((240, 160), Image.BICUBIC).save(root / "train" / "ship" / "big.png")


@pytest.fixture(scope="module")
def clean_root(shared_zip, tmp_path_factory) -> Path:
    return _build_clean(shared_zip, tmp_path_factory.mktemp("health") / "clean")


@pytest.fixture(scope="module")
def planted(clean_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("health") / "planted"
    shutil.copytree(clean_root, root)
    _plant(root)
    ds = load_dataset("folder", root)
    return ds, health.check_health(ds)


def _key(ds, i: int) -> str:
    return ds.describe(int(i))


def test_clean_subset_flags_nothing(clean_root):
    ds = load_dataset("folder", clean_root)
    report = health.check_health(ds)
    assert report.images == len(ds) == 3 * (120 + 10 + 40)
    assert report.pairs.empty, report.pairs[["file_a", "file_b", "kind", "similarity"]].to_string()
    assert report.outliers.empty, report.outliers.to_string()
    assert report.advice == ["No duplicates, leaks or outliers found, and the classes are balanced: nothing to fix."]


def test_planted_copies_all_found_and_nothing_else(planted):
    ds, report = planted
    found = {(_key(ds, a), _key(ds, b)): (kind, sa, sb) for a, b, kind, sa, sb in
             zip(report.pairs["a"], report.pairs["b"], report.pairs["kind"], report.pairs["split_a"],
                 report.pairs["split_b"])}
    expected = {}
    for src, dst, _, kind, split in PLANTS:
        pair = tuple(sorted([f"train/{src}", dst], key=lambda f: ds.describe(0) and _index(ds, f)))
        splits = ("train", split) if pair[0] == f"train/{src}" else (split, "train")
        expected[pair] = (kind, *splits)
    assert found == expected
    leaks = report.leaks()
    assert sorted(zip(leaks["file_a"], leaks["file_b"])) == sorted(p for p, v in expected.items() if v[1] != v[2])
    assert (report.pairs.loc[report.pairs["kind"] == "exact", "similarity"] == 1.0).all()
    mirrored = report.pairs[report.pairs["mirrored"]]
    assert mirrored["file_b"].tolist() == ["train/airplane/mirror.png"]


def _index(ds, key: str) -> int:
    return [ds.describe(i) for i in range(len(ds))].index(key)


def test_removals(planted):
    ds, report = planted
    removed = {ds.describe(i) for i in health.leak_removals(report)}
    assert removed == {f"train/{src}" for src, _, _, _, split in PLANTS if split != "train"}
    dup = {ds.describe(i) for i in health.duplicate_removals(report)}
    # all but the first of each group: the planted copy or its source, whichever comes later in the dataset
    assert len(dup) == sum(1 for p in PLANTS if p[4] == "train")
    for src, dst, _, _, split in PLANTS:
        if split == "train":
            assert len({f"train/{src}", dst} & dup) == 1


def test_outliers_balance_and_advice(planted):
    ds, report = planted
    reasons = dict(zip(report.outliers["file"], report.outliers["reason"]))
    assert "almost blank" in reasons["train/cat/blank.png"]
    assert "size 240×160" in reasons["train/ship/big.png"]
    assert set(reasons) == {"train/cat/blank.png", "train/ship/big.png"}
    assert list(report.outliers["score"]) == sorted(report.outliers["score"], reverse=True)
    bal = report.balance.set_index("class")
    assert bal.loc["cat", "train"] == 120 + 2 and bal.loc["cat", "test"] == 40 + 2 and bal.loc["cat", "val"] == 10
    assert bal.loc["airplane", "val"] == 11 and bal.loc["ship", "val"] == 11 and bal.loc["ship", "train"] == 122
    assert bal["total"].sum() == len(ds) and abs(bal["share"].sum() - 1) < 1e-3
    text = " ".join(report.advice)
    assert "4 test images also sit in the training set" in text      # cat leak, q60, bright, crop
    assert "2 validation images also sit in the training set" in text
    assert "4 training images are copies of another training image" in text
    assert "2 images look unlike the rest (1 almost blank, 1 of an unusual size" in text
    summary = report.summary()
    assert "two splits): 6 pairs" in summary and "within a split: 4 pairs" in summary and "Outliers: 2" in summary and all(a in summary for a in report.advice)


def test_imbalance_advice(clean_root, tmp_path):
    root = tmp_path / "imb"
    shutil.copytree(clean_root / "train", root)
    for f in sorted((root / "ship").glob("*.jpg"))[:70]:
        f.unlink()
    for f in sorted((root / "cat").glob("*.jpg"))[:105]:
        f.unlink()
    report = health.check_health(load_dataset("folder", root))
    text = " ".join(report.advice)
    assert "The largest class (airplane, 120 images) has 8.0× as many as the smallest (cat, 15)" in text
    assert "Class weights: balanced" in text and "add images of cat" in text
    assert "1 class has fewer than 20 images (cat: 15)" in text


def test_round_trip_and_cache(planted, clean_root, tmp_path):
    ds, report = planted
    again = health.HealthReport.from_dict(json.loads(json.dumps(report.to_dict())))
    for name in ("pairs", "outliers", "balance"):
        assert getattr(again, name).equals(getattr(report, name)), name
    assert again.advice == report.advice and again.summary() == report.summary()
    root = tmp_path / "c"
    shutil.copytree(clean_root, root)
    calls = []
    kept = health.check_health
    health.check_health = lambda *a, **k: calls.append(1) or kept(*a, **k)
    try:
        first = health.cached_check_health(load_dataset("folder", root), None, tmp_path / "cache")
        second = health.cached_check_health(load_dataset("folder", root), None, tmp_path / "cache")
        assert len(calls) == 1 and second.to_dict() == first.to_dict()
        shutil.copyfile(root / "train" / "cat" / "0003.jpg", root / "train" / "cat" / "again.jpg")
        third = health.cached_check_health(load_dataset("folder", root), None, tmp_path / "cache")
        assert len(calls) == 2 and third.pairs["file_b"].tolist() == ["train/cat/again.jpg"]
    finally:
        health.check_health = kept


def test_max_images_and_pair_image(planted):
    ds, report = planted
    with pytest.raises(DataError, match=f"has {len(ds):,} images; the health check here takes at most 100"):
        health.check_health(ds, max_images=100)
    im = health.pair_image(ds, int(report.pairs["a"][0]), int(report.pairs["b"][0]), size=64)
    assert im.size == (2 * 64 + 2, 64) and im.mode == "RGB"


def test_progress_is_reported(clean_root):
    seen = []
    health.check_health(load_dataset("folder", clean_root), progress=lambda f, t: seen.append((f, t)))
    assert seen[-1][0] == 1.0 and any("Read 250" in t for _, t in seen)
    assert [f for f, _ in seen] == sorted(f for f, _ in seen)
