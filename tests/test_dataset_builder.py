"""Issue 12 item 6: a dataset built in the browser (core/builder.py and the Data tab's "Make your
own dataset"): class names and file names made safe, refusals naming the file, the limits, a zip
with one folder per class, and through the page's API: three classes of uploaded images, "Use this
dataset" (loaded as an upload, source kind "zip") and a one-epoch training that finishes."""
from __future__ import annotations

import copy
import json
import re
import shutil
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from core import builder, datasets
from core.errors import DataError
from tests.test_app_client import lab  # noqa: F401  (the dashboard fixture, one per module)
from tests.test_server_files import jpeg

CLASSES = ("airplane", "cat", "ship")


def image_files(folder: Path, cls: str, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for k in range(n):
        path = folder / f"{cls}-{k}.jpg"
        path.write_bytes(jpeg(cls, k))
        out.append(path)
    return out


def filled(tmp_path, n: int = 3) -> builder.Builder:
    b = builder.Builder()
    for cls in CLASSES:
        b.add_class(cls)
        assert b.add_images(cls, image_files(tmp_path / "in" / cls, cls, n)) == n
    return b


def test_zip_has_one_folder_per_class_and_loads_as_an_upload(tmp_path):
    b = filled(tmp_path)
    try:
        path = b.write_zip()
        assert path.name == "my-dataset.zip" and b.root in path.parents
        with zipfile.ZipFile(path) as zf:
            names = sorted(zf.namelist())
        assert names == sorted(f"my-dataset/{c}/{k:04d}_{c}-{k}.jpg" for c in CLASSES for k in range(3))
        ds = datasets.load_dataset("zip", str(path), data_dir=tmp_path / "data")
        assert ds.classes == list(CLASSES) and len(ds) == 9 and not ds.skipped
        assert ds.source["kind"] == "zip"
        assert b.write_zip() == path  # the same classes and images: the same zip (a change makes a new one)
    finally:
        b.discard()
    assert not path.exists()


@pytest.mark.parametrize("name, fragment", [
    ("", "Type a class name"), ("  ", "Type a class name"), ("a/b", "may not contain"),
    ("..\\x", "may not contain"), (".hidden", "hidden folder"), ("..", "hidden folder"),
    ("__MACOSX", "hidden folder"), ("tab\there", "control characters"), ("x" * 65, "the limit is 64"),
])
def test_bad_class_names_are_refused(name, fragment):
    with pytest.raises(DataError, match=re.escape(fragment)):
        builder.clean_class_name(name)


def test_class_names_are_nfc_and_unique():
    b = builder.Builder()
    assert b.add_class("  cafe\u0301 ") == "caf\u00e9"
    assert len(b.add_class("x" * 64)) == 64
    with pytest.raises(DataError, match="already a class"):
        b.add_class("CAF\u00c9")


@pytest.mark.parametrize("raw, clean", [
    ("../../etc/passwd.jpg", "passwd.jpg"), ("a\\b\\c.png", "c.png"),
    (".hidden.jpg", "hidden.jpg"), ("x..y.jpg", "x_y.jpg"), ("e\u0301.jpg", "\u00e9.jpg"),
    ("", "image"), ("..", "image"), ("a\x00b.jpg", "ab.jpg"),
])
def test_file_names_are_made_safe(raw, clean):
    assert builder.clean_file_name(raw) == clean


def test_long_file_names_keep_their_extension():
    name = builder.clean_file_name("n" * 300 + ".jpeg")
    assert len(name) == builder.MAX_FILE_NAME and name.endswith(".jpeg")


def test_a_non_image_is_refused_by_name_and_nothing_is_added(tmp_path):
    b = builder.Builder()
    b.add_class("cat")
    good = image_files(tmp_path, "cat", 2)
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a picture")
    with pytest.raises(DataError, match=r"notes\.jpg is not an image"):
        b.add_images("cat", good + [bad])
    assert b.counts() == [("cat", 0)]


def test_a_too_big_image_is_refused_by_name(tmp_path, monkeypatch):
    b = builder.Builder()
    b.add_class("cat")
    big = tmp_path / "huge.png"
    Image.new("RGB", (100, 100)).save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)
    with pytest.raises(DataError, match=r"huge\.png is too large"):
        b.add_images("cat", [big])


def test_a_name_without_extension_gets_the_image_format(tmp_path):
    b = builder.Builder()
    b.add_class("cat")
    shot = tmp_path / "webcam"
    Image.new("RGB", (8, 8)).save(shot, format="PNG")
    b.add_images("cat", [shot])
    assert b.classes["cat"][0][0] == "webcam.png"
    b.discard()


def test_a_dropped_session_takes_its_images_but_leaves_its_zips(tmp_path):
    import gc

    b = filled(tmp_path, n=1)
    images, zipped = b.root / "images", b.write_zip()
    assert copy.deepcopy({"builder": b})["builder"] is b
    assert len(list(images.iterdir())) == 3
    del b
    gc.collect()
    assert not images.exists() and zipped.is_file()
    shutil.rmtree(zipped.parents[2])


def test_limits(tmp_path, monkeypatch):
    b = builder.Builder()
    monkeypatch.setattr(builder, "MAX_CLASSES", 2)
    b.add_class("a")
    b.add_class("b")
    with pytest.raises(DataError, match="at most 2 classes"):
        b.add_class("c")
    files = image_files(tmp_path, "cat", 3)
    monkeypatch.setattr(builder, "MAX_IMAGES", 2)
    with pytest.raises(DataError, match="at most 2 images"):
        b.add_images("a", files)
    monkeypatch.setattr(builder, "MAX_IMAGES", 100)
    monkeypatch.setattr(builder, "MAX_TOTAL_BYTES", files[0].stat().st_size)
    with pytest.raises(DataError, match="MB of images"):
        b.add_images("a", files)
    assert b.n_images == 0


def test_too_few_classes_or_an_empty_class_is_refused(tmp_path):
    b = builder.Builder()
    b.add_class("cat")
    b.add_images("cat", image_files(tmp_path, "cat", 1))
    with pytest.raises(DataError, match="at least 2 classes"):
        b.write_zip()
    b.add_class("dog")
    with pytest.raises(DataError, match="without images: dog"):
        b.write_zip()
    with pytest.raises(DataError, match="no class 'cow'"):
        b.add_images("cow", image_files(tmp_path, "cat", 1))
    b.remove_class("cat")
    assert b.counts() == [("dog", 0)] and not list((b.root / "images").iterdir())
    b.discard()


# ---- through the page's API ----------------------------------------------------------------
def test_build_use_and_train_through_the_api(lab, tmp_path):  # noqa: F811 (the imported fixture)
    from gradio_client import handle_file

    from tests.test_app_client import new_client, poll_until_done, start

    c = new_client(lab)
    with pytest.raises(Exception, match="at least 2 classes"):
        c.predict("per class", 10, 10, 0, api_name="/builder_use")
    for cls in CLASSES:
        name, chosen, counts, note = c.predict(cls, api_name="/builder_add_class")
        assert name == "" and f"Added class **{cls}**" in note
        assert chosen["value"] == cls and [c_[0] for c_ in chosen["choices"]][-1] == cls
        chosen = chosen["value"]
        files = [handle_file(str(p)) for p in image_files(tmp_path / cls, cls, 12)]
        _, chosen, counts, note = c.predict(chosen, files, api_name="/builder_add_images")
        assert f"Added 12 image(s) to **{cls}**" in note
    assert counts["data"] == [[cls, 12] for cls in CLASSES]
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a picture")
    with pytest.raises(Exception, match=r"notes\.jpg is not an image"):
        c.predict("cat", [handle_file(str(bad))], api_name="/builder_add_images")
    # A webcam shot goes to the chosen class; a class removed is gone from the table and the zip.
    chosen = c.predict("extra", api_name="/builder_add_class")[1]["value"]
    shot = tmp_path / "shot.png"
    Image.open(image_files(tmp_path / "shot", "cat", 1)[0]).save(shot)
    _, _, counts, note = c.predict(chosen, handle_file(str(shot)), api_name="/builder_add_shot")
    assert "Added 1 image(s) to **extra**" in note and counts["data"][-1] == ["extra", 1]
    _, counts, note = c.predict("extra", api_name="/builder_remove_class")
    assert "Removed class **extra**" in note and counts["data"] == [[cls, 12] for cls in CLASSES]
    info = c.predict("per class", 10, 10, 0, api_name="/builder_use")[0]
    assert "**my-dataset** — 36 images, 3 classes" in info

    status = start(c, **{"Epochs": 1, "Batch size": 8, "Device": "cpu"})[0]
    assert status.startswith(("Starting", "Training", "Queued")), status
    status = poll_until_done(c)[0][0]
    assert status.startswith("Finished — tutorial_net — run "), status
    run_id = re.search(r"run (\S+):", status).group(1)
    config = (lab["runs_dir"] / run_id / "config.json").read_text()
    assert '"source": "zip"' in config and "my-dataset.zip" in config
    # The zip it trained on stays when the page's session ends; a later version no run used, and
    # the collected images, go (gr.State's delete_callback: tab_data.close_session).
    trained_on = Path(json.loads(config)["data"]["location"])
    c.predict("frog", api_name="/builder_add_class")
    c.predict("frog", [handle_file(str(p)) for p in image_files(tmp_path / "frog", "frog", 2)],
              api_name="/builder_add_images")
    c.predict("per class", 10, 10, 0, api_name="/builder_use")
    holder = lab["demo"].state_holder
    b = next(v["builder"] for v in holder[c.session_hash].state_data.values()
             if isinstance(v, dict) and v.get("builder") is not None)
    assert b.zips[0] == trained_on and len(b.zips) == 2 and all(z.is_file() for z in b.zips)
    unused, images = b.zips[1], b.root / "images"
    holder.delete_state(c.session_hash)
    assert trained_on.is_file() and not unused.exists() and not images.exists()


def test_use_again_without_a_change_reuses_the_zip_and_close_keeps_only_used_ones(tmp_path):
    b = filled(tmp_path, n=1)
    first = b.write_zip()
    assert b.write_zip() == first and b.zips == [first]          # nothing changed: the same file
    b.add_images("cat", image_files(tmp_path / "more", "cat", 1))
    second = b.write_zip()
    assert second != first and b.zips == [first, second]
    images = b.root / "images"
    assert b.close(lambda path: path == first) == [first]
    assert first.is_file() and not second.exists() and not images.exists()
    shutil.rmtree(b.root)


def test_close_keeps_a_zip_when_the_history_cannot_be_read_and_removes_all_when_none_is_used(tmp_path):
    b = filled(tmp_path, n=1)
    zipped = b.write_zip()

    def broken(path):
        raise OSError("index locked")

    assert b.close(broken) == [zipped] and zipped.is_file()
    root = b.root
    assert b.close(lambda path: False) == [] and not root.exists()


def test_class_names_show_as_typed_in_the_note_never_as_html_or_markdown(tmp_path):
    """A class name is the user's text: the note under the builder (Markdown, which would render an
    <img> tag or **bold**) carries it escaped, so the page shows it literally."""
    from ui import tab_data
    from ui.common import AppContext

    tab = tab_data.DataTab(AppContext(manager=None, data_dir=tmp_path, runs_dir=tmp_path / "runs"))
    session = {}
    name = "<img src=x onerror=alert(1)> **bold** _x_"
    for note in (tab.builder_add_class(session, name)[3], tab.builder_remove(session, name)[2]):
        assert "<img" not in note and "**bold**" not in note and " _x_" not in note, note
        assert r"&lt;img src=x onerror=alert\(1\)&gt; \*\*bold\*\* \_x\_" in note, note
