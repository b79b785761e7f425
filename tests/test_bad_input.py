"""Every kind of bad input a user can hand the data layer: each is skipped, converted or refused with
a message that names the file, says what is wrong and what to do."""
from __future__ import annotations

import functools
import os
import stat
import unicodedata
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core import datasets as D
from core.errors import DataError


def jpeg(sample_zip: Path, cls: str = "cat", k: int = 0) -> bytes:
    return _zip_member(str(sample_zip), f"cifar10-sample/train/{cls}/{k:04d}.jpg")


@functools.lru_cache(maxsize=None)
def _open_zip(path: str) -> zipfile.ZipFile:
    return zipfile.ZipFile(path)  # parsing the 6,000-entry directory once, not per image


def _zip_member(path: str, name: str) -> bytes:
    return _open_zip(path).read(name)


def two_classes(root: Path, sample_zip: Path, n: int = 3) -> Path:
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            (root / cls / f"{k}.jpg").write_bytes(jpeg(sample_zip, cls, k))
    return root


def truncated_jpeg(sample_zip: Path) -> bytes:
    data = jpeg(sample_zip, "cat", 5)
    sos = data.find(b"\xff\xda")  # keep the headers, cut the entropy-coded data in half
    return data[: sos + (len(data) - sos) // 2]


# ---- files inside a dataset --------------------------------------------------------------------------

def test_non_image_files_skipped_and_counted(tmp_path, sample_zip):
    root = two_classes(tmp_path / "ds", sample_zip)
    (root / "cat" / "notes.txt").write_text("hello")
    (root / "dog" / "labels.csv").write_text("a,b")
    (root / "README.md").write_text("top-level files are not in any class: ignored")
    ds = D.load_dataset("folder", root)
    assert len(ds) == 6
    assert sorted(ds.skipped) == [("cat/notes.txt", "not an image"), ("dog/labels.csv", "not an image")]
    assert D.summarize(ds).skipped["reason"].tolist().count("not an image") == 2


def test_corrupt_and_truncated_jpegs_skipped_and_listed(tmp_path, sample_zip):
    root = two_classes(tmp_path / "ds", sample_zip)
    (root / "cat" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 3)
    (root / "cat" / "empty.png").write_bytes(b"")
    (root / "dog" / "truncated.jpg").write_bytes(truncated_jpeg(sample_zip))
    (root / "dog" / "headless.jpg").write_bytes(jpeg(sample_zip, "dog", 9)[200:])  # lost its first bytes
    ds = D.load_dataset("folder", root)
    reasons = dict(ds.skipped)
    assert set(reasons) == {"cat/corrupt.jpg", "cat/empty.png", "dog/truncated.jpg", "dog/headless.jpg"}
    assert reasons["cat/corrupt.jpg"].startswith(("corrupt image", "truncated image"))  # Pillow: header cut short
    assert reasons["cat/empty.png"].startswith("corrupt image")
    assert reasons["dog/truncated.jpg"].startswith("truncated image")
    assert reasons["dog/headless.jpg"].startswith("corrupt image")
    assert len(ds) == 6
    table = D.summarize(ds).skipped
    assert set(table["file"]) == set(reasons)


def test_load_image_error_names_the_file(tmp_path, sample_zip):
    root = two_classes(tmp_path / "ds", sample_zip)
    ds = D.load_dataset("folder", root)
    path = Path(ds.image_path(1))
    path.write_bytes(truncated_jpeg(sample_zip))  # damaged after the scan
    with pytest.raises(DataError, match=rf"{path.name}.*(corrupt|changed)"):
        ds.load_image(1)
    path.unlink()
    with pytest.raises(DataError, match="no longer exists"):
        ds.load_image(1)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_skipped(tmp_path, sample_zip, monkeypatch):
    root = tmp_path / "ds"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for k in range(2):
            Image.new("RGB", (16, 16), (k * 50, 0, 0)).save(root / cls / f"{k}.png")
    Image.new("RGB", (100, 100)).save(root / "a" / "huge.png")
    Image.new("RGB", (200, 200)).save(root / "b" / "huger.png")  # > 2× the limit: Pillow raises itself
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)
    ds = D.load_dataset("folder", root)
    reasons = dict(ds.skipped)
    assert len(ds) == 4
    assert reasons["a/huge.png"].startswith("image too large") and "10,000 pixels" in reasons["a/huge.png"]
    assert reasons["b/huger.png"].startswith("image too large")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)  # lowered after the scan: load_image refuses too
    with pytest.raises(DataError, match="too large to open safely"):
        ds.load_image(0)


# ---- class folders --------------------------------------------------------------------------------------

def test_empty_class_folder_dropped_with_warning(tmp_path, sample_zip):
    root = two_classes(tmp_path / "ds", sample_zip)
    (root / "empty").mkdir()
    (root / "junk").mkdir()
    (root / "junk" / "x.txt").write_text("no images here")
    ds = D.load_dataset("folder", root)
    assert ds.classes == ["cat", "dog"]
    assert any("'empty'" in w and "left out" in w for w in ds.warnings)
    assert any("'junk'" in w and "1 unusable files skipped" in w for w in ds.warnings)


def test_one_class_dataset_refused(tmp_path, sample_zip):
    root = tmp_path / "pets"
    (root / "cats").mkdir(parents=True)
    for k in range(3):
        (root / "cats" / f"{k}.jpg").write_bytes(jpeg(sample_zip, "cat", k))
    with pytest.raises(DataError, match=r"needs at least 2 classes, found 1: 'cats' in .*pets"):
        D.load_dataset("folder", root)


def test_one_usable_class_after_skipping_refused(tmp_path, sample_zip):
    root = two_classes(tmp_path / "ds", sample_zip, n=1)
    (root / "dog" / "0.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match="found 1: 'cat'"):
        D.load_dataset("folder", root)


def test_no_images_at_all(tmp_path):
    root = tmp_path / "ds"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "a" / "x.txt").write_text("x")
    with pytest.raises(DataError, match="No usable images found"):
        D.load_dataset("folder", root)


def test_images_outside_class_folders_listed(tmp_path, sample_zip):
    root = two_classes(tmp_path / "ds", sample_zip)
    (root / "stray.jpg").write_bytes(jpeg(sample_zip))
    ds = D.load_dataset("folder", root)
    assert ("stray.jpg", "not inside a class folder") in ds.skipped
    assert any("not inside a class folder" in w for w in ds.warnings)


def test_non_ascii_class_names_kept(tmp_path, sample_zip):
    root = tmp_path / "ds"
    nfd = unicodedata.normalize("NFD", "café")
    names = ["猫", "собака", nfd]
    for j, cls in enumerate(names):
        (root / cls).mkdir(parents=True)
        for k in range(2):
            (root / cls / f"{k}.jpg").write_bytes(jpeg(sample_zip, "cat", j * 2 + k))
    ds = D.load_dataset("folder", root)
    assert ds.classes == sorted(["猫", "собака", "café"])  # NFC: one "café" whatever the OS wrote
    assert "café" in ds.classes and len(ds) == 6
    z = tmp_path / "u.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for cls in ("猫", "犬"):
            zf.writestr(f"{cls}/0.jpg", jpeg(sample_zip))
            zf.writestr(f"{cls}/1.jpg", jpeg(sample_zip, "dog"))
    assert D.load_dataset("zip", z, data_dir=tmp_path / "data").classes == ["犬", "猫"]


def test_hidden_files_and_macosx_ignored_in_folder(tmp_path, sample_zip):
    root = two_classes(tmp_path / "ds", sample_zip)
    (root / "cat" / ".DS_Store").write_bytes(b"\0\0")
    (root / "cat" / "._0.jpg").write_bytes(b"AppleDouble")
    (root / "__MACOSX" / "cat").mkdir(parents=True)
    (root / "__MACOSX" / "cat" / "._0.jpg").write_bytes(b"AppleDouble")
    (root / ".hidden_class").mkdir()
    (root / ".hidden_class" / "0.jpg").write_bytes(jpeg(sample_zip))
    ds = D.load_dataset("folder", root)
    assert ds.classes == ["cat", "dog"] and len(ds) == 6 and ds.skipped == []


# ---- split warnings ---------------------------------------------------------------------------------------

def test_split_that_leaves_a_class_out_is_warned(tmp_path, sample_zip):
    root = two_classes(tmp_path / "ds", sample_zip, n=10)
    (root / "rare").mkdir()
    (root / "rare" / "0.jpg").write_bytes(jpeg(sample_zip, "frog", 0))
    (root / "rare" / "1.jpg").write_bytes(jpeg(sample_zip, "frog", 1))
    ds = D.load_dataset("folder", root)
    sp = D.split_dataset(ds, 0.1, 0.1)
    table = D.split_table(ds, sp).set_index("class")
    assert table.loc["rare"].tolist() == [2, 0, 0, 2]  # too few images for val/test; train keeps ≥ 1
    assert any("'rare' has no validation images" in w for w in sp.warnings)
    assert any("'rare' has no test images" in w for w in sp.warnings)
    assert not any("'cat'" in w for w in sp.warnings)


# ---- image modes -----------------------------------------------------------------------------------------------

def _mode_images(root: Path) -> None:
    (root / "gray").mkdir(parents=True)
    (root / "colour").mkdir(parents=True)
    g16 = np.array([[0, 257, 32768, 65535]] * 4, dtype=np.uint16)
    Image.fromarray(g16).save(root / "gray" / "g16.png")  # I;16
    Image.fromarray(np.full((4, 4), 77, np.uint8)).save(root / "gray" / "g8.png")
    Image.fromarray(np.eye(4, dtype=bool)).save(root / "gray" / "bilevel.png")  # mode "1"
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 200, 10, 20] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.info["transparency"] = 0  # index 0 transparent
    pal.save(root / "colour" / "pal.png", transparency=0)
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255  # red
    rgba[0, :, 3] = 0    # first row fully transparent
    rgba[1, :, 3] = 255  # second row opaque
    rgba[2:, :, 3] = 128
    Image.fromarray(rgba, "RGBA").save(root / "colour" / "rgba.png")
    Image.fromarray(np.full((4, 4, 3), (10, 20, 30), np.uint8)).save(root / "colour" / "rgb.png")


def test_grayscale_palette_rgba_16bit_converted_to_rgb(tmp_path):
    _mode_images(tmp_path / "ds")
    ds = D.load_dataset("folder", tmp_path / "ds")
    assert ds.mode == "RGB"  # colour images present
    by_name = {Path(ds.image_path(i)).name: i for i in range(len(ds))}
    assert ds.image_mode(by_name["g16.png"]) == "I;16" and ds.image_mode(by_name["pal.png"]) == "P"
    g16 = np.asarray(ds.load_image(by_name["g16.png"]))
    assert g16.shape == (4, 4, 3)
    assert g16[0, :, 0].tolist() == [0, 1, 128, 255]  # scaled by 255/65535, not clipped at 255
    pal = np.asarray(ds.load_image(by_name["pal.png"]))
    assert pal[0, 0].tolist() == [255, 255, 255] and pal[1, 1].tolist() == [200, 10, 20]
    rgba = np.asarray(ds.load_image(by_name["rgba.png"]))
    assert rgba[0, 0].tolist() == [255, 255, 255]  # transparent → white
    assert rgba[1, 0].tolist() == [255, 0, 0]
    assert rgba[2, 0, 0] == 255 and 120 <= rgba[2, 0, 1] <= 135  # half alpha → pink
    assert np.asarray(ds.load_image(by_name["bilevel.png"]))[0, 0].tolist() == [255, 255, 255]
    arr = ds.to_uint8_array(range(len(ds)))
    assert arr.shape == (len(ds), 4, 4, 3)


def test_all_grayscale_dataset_is_L(tmp_path):
    root = tmp_path / "ds"
    _mode_images(root)
    for p in (root / "colour").iterdir():
        p.unlink()
    Image.fromarray(np.array([[1000, 65535]], np.uint16)).save(root / "colour" / "x16.png")
    Image.new("LA", (3, 3), (90, 0)).save(root / "colour" / "la.png")  # transparent gray → white
    ds = D.load_dataset("folder", root)
    assert ds.mode == "L"
    by_name = {Path(ds.image_path(i)).name: i for i in range(len(ds))}
    assert np.asarray(ds.load_image(by_name["g16.png"]))[0].tolist() == [0, 1, 128, 255]
    assert np.asarray(ds.load_image(by_name["x16.png"])).tolist() == [[4, 255]]
    assert np.asarray(ds.load_image(by_name["la.png"]))[0, 0] == 255
    assert ds.to_uint8_array(range(3), size=4).shape == (3, 4, 4, 1)


def test_convert_image_32bit_and_float():
    i32 = Image.fromarray(np.array([[0, 65535, 70000, -5]], np.int32), "I")
    assert np.asarray(D.convert_image(i32, "L")).tolist() == [[0, 255, 255, 0]]
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0, 2.0]], np.float32), "F")
    assert np.asarray(D.convert_image(f, "L")).tolist() == [[0, 128, 255, 255]]
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))
    assert np.asarray(D.convert_image(cmyk, "RGB"))[0, 0].tolist() == [255, 0, 0]


# ---- zip archives --------------------------------------------------------------------------------------------

def _zip(path: Path, entries: dict[str, bytes], sample_zip: Path | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        if sample_zip is not None:
            for cls in ("cat", "dog"):
                for k in range(2):
                    zf.writestr(f"{cls}/{k}.jpg", jpeg(sample_zip, cls, k))
        for name, data in entries.items():
            zf.writestr(zipfile.ZipInfo(name), data, compress_type=zipfile.ZIP_DEFLATED)
    return path


@pytest.mark.parametrize("entry,words", [
    ("../evil.jpg", "points outside the archive"),
    ("cat/../../evil.jpg", "points outside the archive"),
    ("/tmp/evil.jpg", "absolute path"),
    ("C:/evil.jpg", "absolute path"),
    ("..\\evil.jpg", "points outside the archive"),
])
def test_zip_slip_rejected(tmp_path, sample_zip, entry, words):
    z = _zip(tmp_path / "bad.zip", {entry: jpeg(sample_zip)}, sample_zip)
    data_dir = tmp_path / "data"
    with pytest.raises(DataError, match=words) as e:
        D.load_dataset("zip", z, data_dir=data_dir)
    assert "bad.zip" in str(e.value) and "rejected" in str(e.value)
    assert not (tmp_path / "evil.jpg").exists() and not (data_dir / "evil.jpg").exists()
    assert not (data_dir / "uploads").exists() or not any((data_dir / "uploads").iterdir())


def test_zip_symlink_rejected(tmp_path, sample_zip):
    z = tmp_path / "link.zip"
    _zip(z, {}, sample_zip)
    with zipfile.ZipFile(z, "a") as zf:
        info = zipfile.ZipInfo("cat/link.jpg")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(DataError, match="symbolic link"):
        D.load_dataset("zip", z, data_dir=tmp_path / "data")


def test_zip_bomb_ratio_rejected(tmp_path, sample_zip):
    z = _zip(tmp_path / "bomb.zip", {"cat/zeros.jpg": bytes(8 * 1024 * 1024)}, sample_zip)
    assert z.stat().st_size < 100_000  # 8 MB of zeros deflates to a few KB
    with pytest.raises(DataError, match=r"zip bomb") as e:
        D.load_dataset("zip", z, data_dir=tmp_path / "data")
    assert "cat/zeros.jpg" in str(e.value) and "100:1" in str(e.value)


def test_zip_bomb_of_many_small_entries_rejected(tmp_path, sample_zip):
    """Each entry stays under the per-entry check (1 MiB), the archive as a whole is a bomb."""
    entries = {f"cat/zeros{k:02d}.jpg": bytes((1 << 20) - 1) for k in range(20)}
    z = _zip(tmp_path / "many.zip", entries, sample_zip)
    assert z.stat().st_size < 200_000
    dest = tmp_path / "data"
    with pytest.raises(DataError, match=r"zip bomb") as e:
        D.load_dataset("zip", z, data_dir=dest)
    assert "many.zip" in str(e.value) and "in all" in str(e.value) and "100:1" in str(e.value)
    written = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file()) if dest.exists() else 0
    assert written == 0   # rejected before anything was unpacked


def test_zip_total_size_and_entry_limits(tmp_path, sample_zip, monkeypatch):
    z = _zip(tmp_path / "big.zip", {}, sample_zip)
    monkeypatch.setattr(D, "MAX_ZIP_TOTAL_BYTES", 1000)
    with pytest.raises(DataError, match="would unpack to .* more than the limit"):
        D.load_dataset("zip", z, data_dir=tmp_path / "data")
    monkeypatch.setattr(D, "MAX_ZIP_TOTAL_BYTES", 2 * 1024**3)
    monkeypatch.setattr(D, "MAX_ZIP_ENTRIES", 3)
    with pytest.raises(DataError, match="4 entries, more than the limit of 3"):
        D.load_dataset("zip", z, data_dir=tmp_path / "data")


def test_zip_that_lies_about_its_size(tmp_path, sample_zip):
    z = _zip(tmp_path / "liar.zip", {}, sample_zip)
    data = bytearray(z.read_bytes())
    # shrink the declared size of the first entry in its central-directory record (offset 24)
    cd = data.find(b"PK\x01\x02")
    real = int.from_bytes(data[cd + 24: cd + 28], "little")
    data[cd + 24: cd + 28] = (real // 2).to_bytes(4, "little")
    z.write_bytes(bytes(data))
    with pytest.raises(DataError, match="liar.zip"):
        D.load_dataset("zip", z, data_dir=tmp_path / "data")


def test_macosx_and_hidden_entries_ignored_in_zip(tmp_path, sample_zip):
    z = _zip(tmp_path / "mac.zip", {"__MACOSX/cat/._0.jpg": b"AppleDouble", "cat/.DS_Store": b"\0",
                                    ".hidden/0.jpg": jpeg(sample_zip), "cat/._1.jpg": b"x"}, sample_zip)
    ds = D.load_dataset("zip", z, data_dir=tmp_path / "data")
    assert ds.classes == ["cat", "dog"] and len(ds) == 4 and ds.skipped == []
    extracted = Path(ds.source["extracted"])
    assert not (extracted / "__MACOSX").exists() and not (extracted / "cat" / ".DS_Store").exists()


def test_not_a_zip_and_empty_zip(tmp_path):
    fake = tmp_path / "fake.zip"
    fake.write_bytes(b"PK but not really")
    with pytest.raises(DataError, match="fake.zip is not a zip archive"):
        D.load_dataset("zip", fake, data_dir=tmp_path / "data")
    empty = _zip(tmp_path / "empty.zip", {"__MACOSX/x": b"1"})
    with pytest.raises(DataError, match="contains no files"):
        D.load_dataset("zip", empty, data_dir=tmp_path / "data")
    with pytest.raises(DataError, match="does not exist"):
        D.load_dataset("zip", tmp_path / "gone.zip", data_dir=tmp_path / "data")


def test_zip_one_class(tmp_path, sample_zip):
    z = tmp_path / "one.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("mydata/cats/0.jpg", jpeg(sample_zip))
        zf.writestr("mydata/cats/1.jpg", jpeg(sample_zip, k=1))
    with pytest.raises(DataError, match="found 1: 'cats'"):
        D.load_dataset("zip", z, data_dir=tmp_path / "data")


# ---- index files with bad entries ---------------------------------------------------------------------------------

def test_index_bad_entries_skipped(tmp_path, sample_zip):
    (tmp_path / "a.jpg").write_bytes(jpeg(sample_zip, "cat", 0))
    (tmp_path / "b.jpg").write_bytes(jpeg(sample_zip, "dog", 0))
    (tmp_path / "c.jpg").write_bytes(truncated_jpeg(sample_zip))
    (tmp_path / "d.txt").write_text("text")
    (tmp_path / "e.jpg").write_bytes(jpeg(sample_zip, "dog", 1))
    index = tmp_path / "index.csv"
    index.write_text("a.jpg,cat\nb.jpg,dog\nc.jpg,cat\nd.txt,dog\nmissing.jpg,cat\ne.jpg,dog\n")
    ds = D.load_dataset("index", index)
    assert len(ds) == 3 and ds.classes == ["cat", "dog"]
    reasons = dict(ds.skipped)
    assert reasons["c.jpg"].startswith("truncated image")
    assert reasons["d.txt"] == "not an image"
    assert reasons["missing.jpg"] == "file not found (line 5)"


def test_index_not_utf8(tmp_path):
    index = tmp_path / "latin.txt"
    index.write_bytes("caf\xe9.jpg cat\n".encode("latin-1"))
    with pytest.raises(DataError, match="latin.txt is not UTF-8"):
        D.load_dataset("index", index)


def test_sample_zip_missing(tmp_path, monkeypatch):
    from core.errors import MissingFileError

    monkeypatch.setattr(D, "SAMPLE_ZIP", tmp_path / "nope" / "cifar10-sample.zip")
    with pytest.raises(MissingFileError, match="cifar10-sample.zip"):
        D.load_dataset("sample", data_dir=tmp_path / "data")
    assert not os.path.exists(tmp_path / "data" / "cifar10-sample")


# ---- checkpoints a user uploads on the Predict tab ---------------------------------------------------
class _Payload:
    """Runs a shell command when unpickled: what a malicious .pth does under a plain torch.load."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_refused_checkpoints_say_what_is_wrong_in_full_sentences(tmp_path):
    import torch

    from core.checkpoints import load_checkpoint

    malicious = tmp_path / "free-weights.pth"
    torch.save({"model": _Payload()}, malicious)
    garbage = tmp_path / "holiday.pth"
    garbage.write_bytes(b"\x00\x01 this is not a checkpoint at all " * 20)
    damaged = tmp_path / "half.pth"
    damaged.write_bytes(malicious.read_bytes()[:200])     # a zip cut short (a broken download)
    messages = {}
    for path in (malicious, garbage, damaged):
        with pytest.raises(DataError) as err:
            load_checkpoint(path)
        messages[path.name] = str(err.value)
    assert messages["free-weights.pth"].startswith("free-weights.pth contains code objects that a safe load refuses")
    assert messages["holiday.pth"].startswith("holiday.pth is not a PyTorch file")
    assert messages["half.pth"].startswith("half.pth is a damaged or incomplete PyTorch file")
    assert len(set(messages.values())) == 3
    for text in messages.values():
        assert text.endswith(".") and "weights_only=False" not in text and str(tmp_path) not in text
