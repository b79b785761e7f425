"""The page reaches only the server's data roots and the user's own uploads (issue 11).

Through the engine (``load_dataset(..., roots=...)``) and through the real app with gradio_client:
folders and index files outside the roots are refused with one message that names the roots and
says the same whether the path exists or not; an index's rows, symlinks followed, stay inside; an
upload is named by its own file name and its contents stay inside it; listings are bounded; the
command line (no roots) still reads any path; the embedded sample is checked once.
"""
from __future__ import annotations

import functools
import os
import socket
import zipfile
from pathlib import Path

import pytest

from core import datasets as D
from core import paths
from core.errors import DataError

ROOT = Path(__file__).resolve().parent.parent
PASSWD = Path("/etc/passwd")


@functools.lru_cache(maxsize=None)
def _sample(name: str) -> bytes:
    with zipfile.ZipFile(ROOT / "assets" / "cifar10-sample.zip") as zf:
        return zf.read(f"cifar10-sample/train/{name}")


def jpeg(cls: str = "cat", k: int = 0) -> bytes:
    return _sample(f"{cls}/{k:04d}.jpg")


def image_folder(root: Path, classes=("cat", "dog"), n: int = 3) -> Path:
    """``root/<class>/<k>.jpg``: real CIFAR images from the embedded sample."""
    for cls in classes:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            (root / cls / f"{k}.jpg").write_bytes(jpeg(cls, k))
    return root


@pytest.fixture
def roots(tmp_path):
    """Two data roots (a data folder and an extra one) and a folder of real images outside both."""
    data, extra = tmp_path / "data", tmp_path / "extra"
    data.mkdir()
    extra.mkdir()
    outside = image_folder(tmp_path / "outside")
    return {"data": data, "extra": extra, "outside": outside, "roots": [str(data), str(extra)]}


def refusal(kind: str, location, r) -> str:
    with pytest.raises(paths.OutsideRootsError) as e:
        D.load_dataset(kind, location, data_dir=r["data"], roots=r["roots"])
    return str(e.value)


def assert_no_content(message: str, path: Path) -> None:
    """No line of ``path`` (e.g. /etc/passwd), nor the shape of one, is in ``message``."""
    for line in path.read_text(errors="replace").splitlines():
        assert line.strip() not in message, f"the message quotes a line of {path}"
    assert ":x:" not in message and "nologin" not in message


# ---- folders and index files outside the roots ---------------------------------------------------------

@pytest.mark.parametrize("kind,location", [("folder", "/usr/share/doc"), ("folder", "/etc"),
                                           ("index", str(PASSWD))])
def test_paths_outside_the_roots_are_refused_with_the_roots_message(roots, kind, location):
    text = refusal(kind, location, roots)
    assert text.startswith(f"{location} is outside this server's data folders.")
    assert f"under {roots['data']} and {roots['extra']} can be loaded from this page" in text
    assert "--data-root" in text and "upload a .zip" in text
    assert_no_content(text, PASSWD)


def test_same_message_for_an_existing_and_a_missing_outside_path(roots, tmp_path):
    pairs = [("folder", roots["outside"], tmp_path / "no-such-folder"),
             ("index", PASSWD, Path("/etc/no-such-index.csv")),
             ("folder", roots["data"] / ".." / "outside", roots["data"] / ".." / "nope")]
    for kind, there, missing in pairs:
        a = refusal(kind, str(there), roots).replace(str(there), "<PATH>")
        b = refusal(kind, str(missing), roots).replace(str(missing), "<PATH>")
        assert a == b


def test_a_symlinked_folder_under_a_root_that_points_outside_is_refused(roots):
    link = roots["data"] / "shortcut"
    link.symlink_to(roots["outside"], target_is_directory=True)
    text = refusal("folder", str(link), roots)
    assert text.startswith(f"{link} is outside")


def test_a_folder_in_an_extra_root_loads_and_links_inside_it_that_point_out_are_skipped(roots):
    pets = image_folder(roots["extra"] / "pets")
    (pets / "cat" / "stolen.jpg").symlink_to(roots["outside"] / "cat" / "0.jpg")
    (pets / "bird").symlink_to(roots["outside"] / "dog", target_is_directory=True)
    ds = D.load_dataset("folder", pets, data_dir=roots["data"], roots=roots["roots"])
    assert ds.classes == ["cat", "dog"] and len(ds) == 6
    assert ("cat/stolen.jpg", D.REASON_OUTSIDE) in ds.skipped and ("bird/", D.REASON_OUTSIDE) in ds.skipped
    assert not any("0.jpg" in f and f.startswith("bird") for f, _ in ds.skipped)  # an outside folder is not listed


def test_the_command_line_still_reads_any_path(roots, tiny_config):
    """No roots (the server's owner, python -m core.train): the folder outside every root loads."""
    ds = D.load_from_source({"kind": "folder", "location": str(roots["outside"])})
    assert ds.classes == ["cat", "dog"] and len(ds) == 6
    from core.trainer import prepare
    prepared = prepare(tiny_config, data_dir=roots["data"])   # tiny_folder is a tmp folder, in no root
    assert len(prepared.dataset) == 150


# ---- index files under a root ---------------------------------------------------------------------------

def test_index_rows_outside_the_roots_are_refused_and_listed_without_contents(roots):
    images = image_folder(roots["data"] / "mine")
    (images / "cat" / "link.jpg").symlink_to(roots["outside"] / "cat" / "1.jpg")
    index = roots["data"] / "labels.csv"
    index.write_text("path,label\n"
                     "mine/cat/0.jpg,cat\nmine/dog/0.jpg,dog\n"
                     f"{PASSWD},cat\n"                      # line 4: absolute, outside
                     "../../../../../../etc/hostname,dog\n"  # line 5: climbs out
                     "mine/cat/link.jpg,cat\n"              # line 6: a link that points outside
                     f"{roots['outside']}/no-such.jpg,dog\n"  # line 7: outside and missing: same reason
                     "mine/cat/gone.jpg,cat\n", encoding="utf-8")  # line 8: inside and missing
    ds = D.load_dataset("index", index, data_dir=roots["data"], roots=roots["roots"])
    assert len(ds) == 2 and ds.classes == ["cat", "dog"]
    skipped = dict(ds.skipped)
    assert skipped[str(PASSWD)] == f"{D.REASON_OUTSIDE} (line 4)"
    assert skipped["../../../../../../etc/hostname"] == f"{D.REASON_OUTSIDE} (line 5)"
    assert skipped["mine/cat/link.jpg"] == f"{D.REASON_OUTSIDE} (line 6)"
    assert skipped[f"{roots['outside']}/no-such.jpg"] == f"{D.REASON_OUTSIDE} (line 7)"
    assert skipped["mine/cat/gone.jpg"] == f"{D.REASON_NOT_FOUND} (line 8)"
    assert all(str(roots["outside"]) not in p for p in ds.paths)


def test_an_index_in_an_extra_root_may_list_images_in_another_root(roots):
    image_folder(roots["data"] / "shared")
    index = roots["extra"] / "labels.csv"
    index.write_text(f"{roots['data']}/shared/cat/0.jpg,cat\n{roots['data']}/shared/dog/0.jpg,dog\n")
    assert len(D.load_dataset("index", index, data_dir=roots["data"], roots=roots["roots"])) == 2


def test_a_file_that_is_no_index_gives_a_message_that_quotes_none_of_it(roots):
    copy = roots["data"] / "passwd.txt"
    copy.write_bytes(PASSWD.read_bytes())
    with pytest.raises(DataError) as e:
        D.load_dataset("index", copy, data_dir=roots["data"], roots=roots["roots"])
    assert "passwd.txt, line 1: expected 'path,label'" in str(e.value)
    assert_no_content(str(e.value), PASSWD)
    # two fields a line, none a file: refused as a whole, no row listed
    secrets = roots["data"] / "secrets.csv"
    secrets.write_text("alice,hunter2\nbob,correct-horse\n")
    with pytest.raises(DataError, match="none of its 2 lines names an image file") as e2:
        D.load_dataset("index", secrets, data_dir=roots["data"], roots=roots["roots"])
    assert "hunter2" not in str(e2.value) and "alice" not in str(e2.value)


# ---- uploads ----------------------------------------------------------------------------------------------

def make_zip(path: Path, entries: dict[str, bytes | None]) -> Path:
    """A zip of ``entries``; a name ending in / with None is a folder entry."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            if data is None:
                zf.writestr(zipfile.ZipInfo(name), b"")
            else:
                zf.writestr(name, data)
    return path


def assert_names_only_the_upload(message: str, zip_name: str, data_dir: Path) -> None:
    assert zip_name in message
    assert "/tmp/" not in message and str(data_dir) not in message and "uploads" not in message


def test_a_zip_holding_only_an_index_of_absolute_paths_is_refused(roots, tmp_path):
    z = make_zip(tmp_path / "photos.zip", {"labels.csv": f"path,label\n{PASSWD},a\n"
                                                          f"{roots['outside']}/cat/0.jpg,b\n"
                                                          "../../outside/dog/0.jpg,b\n".encode()})
    with pytest.raises(DataError) as e:
        D.load_dataset("zip", z, data_dir=roots["data"], roots=roots["roots"])
    text = str(e.value)
    assert text.startswith("Index file photos.zip/labels.csv: none of its 3 lines names an image file")
    assert "3 outside the archive" in text
    assert_names_only_the_upload(text, "photos.zip", roots["data"])
    # the same from the command line: an archive's index reaches nothing outside the archive
    with pytest.raises(DataError, match="3 outside the archive"):
        D.load_dataset("zip", z, data_dir=roots["data"])


def test_a_zip_with_images_and_an_index_loads_what_is_inside_it(roots, tmp_path):
    z = make_zip(tmp_path / "pets.zip", {
        "pets/labels.csv": b"file,class\nimg/a.jpg,cat\nimg/b.jpg,dog\nimg/c.jpg,cat\n../../x.jpg,dog\n",
        "pets/img/a.jpg": jpeg("cat", 0), "pets/img/b.jpg": jpeg("dog", 0), "pets/img/c.jpg": jpeg("cat", 1)})
    ds = D.load_dataset("zip", z, data_dir=roots["data"], roots=roots["roots"])
    assert ds.classes == ["cat", "dog"] and len(ds) == 3
    assert ds.skipped == [("../../x.jpg", "outside the archive (line 5)")]


def test_a_zip_symlink_is_refused(roots, tmp_path):
    import stat
    z = make_zip(tmp_path / "link.zip", {"cat/0.jpg": jpeg("cat", 0)})
    with zipfile.ZipFile(z, "a") as zf:
        info = zipfile.ZipInfo("dog/0.jpg")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, str(roots["outside"] / "dog" / "0.jpg"))
    with pytest.raises(DataError, match="link.zip contains a symbolic link"):
        D.load_dataset("zip", z, data_dir=roots["data"], roots=roots["roots"])


def test_upload_messages_name_the_zip_not_the_extraction_folder(roots, tmp_path):
    no_classes = make_zip(tmp_path / "holiday.zip", {"notes.txt": b"hello"})
    broken = make_zip(tmp_path / "broken.zip", {f"{c}/{k}.jpg": b"not a jpeg" for c in ("cat", "dog")
                                                for k in range(4)})
    one_class = make_zip(tmp_path / "cats.zip", {"cats/0.jpg": jpeg("cat", 0), "cats/1.jpg": jpeg("cat", 1)})
    for z, words in ((no_classes, "has no class sub-folders"),
                     (broken, "No usable images found in broken.zip (8 files skipped: cat/0.jpg (corrupt image"),
                     (one_class, "found 1: 'cats' in cats.zip")):
        with pytest.raises(DataError) as e:
            D.load_dataset("zip", z, data_dir=roots["data"], roots=roots["roots"])
        assert words in str(e.value)
        assert_names_only_the_upload(str(e.value), z.name, roots["data"])
    assert "and 3 more" in str(pytest.raises(DataError, D.load_dataset, "zip", broken, data_dir=roots["data"]).value)


def test_an_empty_class_folder_in_a_zip_is_warned_about_like_a_server_folder(roots, tmp_path):
    z = make_zip(tmp_path / "three.zip", {"three/": None, "three/cat/0.jpg": jpeg("cat", 0),
                                          "three/dog/0.jpg": jpeg("dog", 0), "three/bird/": None})
    ds = D.load_dataset("zip", z, data_dir=roots["data"], roots=roots["roots"])
    folder = image_folder(tmp_path / "server", n=1)
    (folder / "bird").mkdir()
    on_server = D.load_dataset("folder", folder)
    assert ds.classes == on_server.classes == ["cat", "dog"]
    assert ds.warnings == on_server.warnings == ["Class 'bird' has no usable images; it was left out."]


def test_a_page_reload_of_an_upload_reaches_only_its_extraction_folder(roots, tmp_path):
    z = make_zip(tmp_path / "pets.zip", {"cat/0.jpg": jpeg("cat", 0), "dog/0.jpg": jpeg("dog", 0)})
    source = D.load_dataset("zip", z, data_dir=roots["data"], roots=roots["roots"]).source
    z.unlink()   # the upload is gone; its extracted folder is reused
    assert len(D.load_from_source(source, data_dir=roots["data"], roots=roots["roots"])) == 2
    forged = dict(source, extracted=str(roots["outside"]))
    with pytest.raises(DataError, match="pets.zip is no longer on the server") as e:
        D.load_from_source(forged, data_dir=roots["data"], roots=roots["roots"])
    assert str(roots["outside"]) not in str(e.value)


def test_other_users_uploads_cannot_be_reached_by_typing_their_path(roots, tmp_path):
    """uploads/ sits in the default data root, but each extracted archive is its uploader's alone:
    typed as a folder, reached through the data folder, or listed by an index, it is not read."""
    z = make_zip(tmp_path / "private.zip", {"cat/0.jpg": jpeg("cat", 0), "dog/0.jpg": jpeg("dog", 0)})
    extracted = Path(D.load_dataset("zip", z, data_dir=roots["data"], roots=roots["roots"]).source["extracted"])
    assert extracted.parent == roots["data"] / "uploads"
    for folder in (extracted, extracted.parent, extracted / "cat"):
        msg = refusal("folder", folder, roots)
        assert "outside this server's data folders" in msg and extracted.name not in msg.replace(str(folder), "")
    image_folder(roots["data"] / "mine", classes=("cat",), n=1)
    image_folder(roots["data"] / "yours", classes=("dog",), n=1)
    whole = D.load_dataset("folder", roots["data"], data_dir=roots["data"], roots=roots["roots"])
    assert whole.classes == ["mine", "yours"] and len(whole) == 2 and not any("uploads" in f for f, _ in whole.skipped)
    (roots["extra"] / "peek.csv").write_text(f"{extracted / 'cat' / '0.jpg'},cat\n{roots['data'] / 'mine/cat/0.jpg'},x\n"
                                             f"{roots['data'] / 'yours/dog/0.jpg'},y\n")
    ds = D.load_dataset("index", roots["extra"] / "peek.csv", data_dir=roots["data"], roots=roots["roots"])
    assert len(ds) == 2 and ds.skipped[0][1].startswith(D.REASON_OUTSIDE)
    assert len(D.load_dataset("folder", extracted)) == 2   # the command line still reads it


# ---- bounded listings -----------------------------------------------------------------------------------

def test_a_listing_stops_at_the_file_limit(roots):
    big = image_folder(roots["data"] / "big", classes=("cat", "dog"), n=12)
    with pytest.raises(DataError) as e:
        D.load_dataset("folder", big, data_dir=roots["data"], roots=roots["roots"],
                       limits=D.ScanLimits(max_files=20))
    assert str(e.value) == f"{big} has more than 20 files; point at a smaller folder or use an index file."
    ds = D.load_dataset("folder", big, data_dir=roots["data"], roots=roots["roots"], limits=D.ScanLimits())
    assert len(ds) == 24   # the module's limits (MAX_SCAN_FILES) let a real folder through
    index = roots["data"] / "big.csv"
    index.write_text("".join(f"big/cat/{k}.jpg,cat\n" for k in range(12)))
    with pytest.raises(DataError, match=r"big.csv has more than 10 lines; split it into smaller index files"):
        D.load_dataset("index", index, data_dir=roots["data"], roots=roots["roots"],
                       limits=D.ScanLimits(max_files=10))


def test_a_listing_stops_at_the_time_limit(roots):
    folder = image_folder(roots["data"] / "slow")
    with pytest.raises(DataError, match=r"Listing .*slow took more than 0 s \(1 files so far\); point at a smaller"):
        D.load_dataset("folder", folder, data_dir=roots["data"], roots=roots["roots"],
                       limits=D.ScanLimits(max_seconds=0))


# ---- the embedded sample is checked once --------------------------------------------------------------------

def test_the_sample_is_checked_once_per_data_folder_and_each_load_gets_its_own_copy(tmp_path, monkeypatch):
    checked = []
    real_check = D.check_image
    monkeypatch.setattr(D, "check_image", lambda p: checked.append(p) or real_check(p))
    first = D.load_dataset("sample", data_dir=tmp_path / "data")
    n = len(checked)
    assert n == len(first) == 6000
    second = D.load_dataset("sample", data_dir=tmp_path / "data")
    assert len(checked) == n                       # no image decoded again
    assert second is not first and second.targets == first.targets and second.paths == first.paths
    second.warnings.append("mine")
    second.splits["train"].pop()
    assert first.warnings == [] and len(first.splits["train"]) == len(second.splits["train"]) + 1
    D.load_dataset("sample", data_dir=tmp_path / "other")
    assert len(checked) == 2 * n                   # another data folder is another sample


# ---- the real app, through gradio_client --------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory, session_data_dir):
    """The dashboard with two data roots: the session's data folder and an extra one holding real images."""
    pytest.importorskip("gradio_client")
    from core.jobs import JobManager
    from ui.app import build_app, launch_kwargs

    tmp = tmp_path_factory.mktemp("server-files")
    extra = tmp / "class-data"
    image_folder(extra / "pets")
    outside = image_folder(tmp / "private")
    runs_dir = tmp / "runs"
    manager = JobManager(runs_dir=runs_dir, data_dir=session_data_dir, max_jobs=1)
    demo = build_app(manager, data_dir=session_data_dir, runs_dir=runs_dir,
                     data_roots=[session_data_dir, extra])
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, server_name="127.0.0.1",
                            server_port=_free_port(), **launch_kwargs(session_data_dir, runs_dir))
    yield {"url": url, "demo": demo, "extra": extra, "outside": outside, "data": session_data_dir, "tmp": tmp}
    demo.close()
    manager.shutdown(timeout=20)


def client(app):
    from gradio_client import Client
    return Client(app["url"], verbose=False, analytics_enabled=False, download_files=False)


def load(c, source: str, path: str = "", upload=None):
    return c.predict(source, "CIFAR10", upload, path, "per class", 10, 10, 0,
                     api_name="/load_zip" if upload is not None else "/load_data")


def refused(c, source: str, path: str = "", upload=None) -> str:
    from gradio_client.exceptions import AppError
    with pytest.raises(AppError) as e:
        load(c, source, path, upload)
    text = str(e.value)
    assert "Traceback" not in text and "Internal error" not in text
    return text


def test_app_refuses_server_paths_outside_the_roots(app):
    c = client(app)
    roots_named = f"under {app['data']} and {app['extra']} can be loaded from this page"
    for source, path in (("Folder on the server", "/usr/share/doc"), ("Folder on the server", "/etc"),
                         ("Index file (.txt / .csv)", str(PASSWD))):
        text = refused(c, source, path)
        assert text.startswith(f"{path} is outside this server's data folders") and roots_named in text
        assert_no_content(text, PASSWD)
    there = refused(c, "Folder on the server", str(app["outside"])).replace(str(app["outside"]), "<P>")
    missing = refused(c, "Folder on the server", str(app["tmp"] / "nope")).replace(str(app["tmp"] / "nope"), "<P>")
    assert there == missing


def test_app_loads_a_folder_in_an_extra_root_and_sessions_stay_apart(app):
    a, b = client(app), client(app)
    info = load(a, "Folder on the server", str(app["extra"] / "pets"))[0]
    assert "6 images, 2 classes" in info
    refused(b, "Folder on the server", str(app["outside"]))
    gallery = a.predict("per class", api_name="/reshuffle")   # A still previews its own data
    assert {g["caption"] for g in gallery} == {"cat", "dog"}


def test_app_upload_messages_name_the_zip_and_refuse_an_index_of_absolute_paths(app, tmp_path):
    from gradio_client import handle_file
    c = client(app)
    z = make_zip(tmp_path / "photos.zip", {"labels.csv": f"path,label\n{PASSWD},a\n"
                                                          f"{app['outside']}/cat/0.jpg,b\n".encode()})
    text = refused(c, "Upload a .zip", upload=handle_file(str(z)))
    assert "Index file photos.zip/labels.csv: none of its 2 lines" in text
    assert_names_only_the_upload(text, "photos.zip", app["data"])
    empty = make_zip(tmp_path / "notes.zip", {"readme.txt": b"hi"})
    text = refused(c, "Upload a .zip", upload=handle_file(str(empty)))
    assert "notes.zip has no class sub-folders" in text
    assert_names_only_the_upload(text, "notes.zip", app["data"])


def raw_call(app, api_name: str, data: list) -> dict:
    """One event through Gradio's queue protocol, as a hand-made request would send it (the Python
    client would upload a local path first); returns the final message."""
    import json
    import uuid

    import httpx
    fn_index = next(i for i, fn in app["demo"].fns.items() if fn.api_name == api_name)
    session = uuid.uuid4().hex
    httpx.post(app["url"] + "gradio_api/queue/join", json={"data": data, "fn_index": fn_index,
                                                            "session_hash": session}).raise_for_status()
    with httpx.stream("GET", app["url"] + "gradio_api/queue/data", params={"session_hash": session},
                      timeout=60) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:") and json.loads(line[5:]).get("msg") == "process_completed":
                return json.loads(line[5:])
    raise AssertionError("the event never completed")


def test_app_a_server_zip_cannot_be_passed_as_an_upload(app):
    """The zip source reads only files Gradio received as uploads, never a server path written into
    the request: Gradio refuses it before the handler runs."""
    server_zip = make_zip(app["tmp"] / "exam.zip", {"cat/0.jpg": jpeg("cat", 0), "dog/0.jpg": jpeg("dog", 0)})
    done = raw_call(app, "load_zip", [None, "Upload a .zip", "CIFAR10",
                                      {"path": str(server_zip), "meta": {"_type": "gradio.FileData"}},
                                      "", "per class", 10, 10, 0])
    assert done["success"] is False and "not uploaded by a user" in done["output"]["error"]


def test_app_loads_run_in_their_own_few_slots_and_the_page_open_sample_load_does_not_wait(app):
    fns = {fn.api_name: fn for fn in app["demo"].fns.values()}
    for name in ("load_data", "load_zip"):
        assert fns[name].concurrency_id == "data_load" and fns[name].concurrency_limit == 3
    on_open = [fn for fn in app["demo"].fns.values() if fn.name == "open_sample"]
    assert len(on_open) == 1 and on_open[0].concurrency_limit is None
    assert on_open[0].concurrency_id != "data_load"


# ---- launch.py --data-root and the UI context ----------------------------------------------------------------

def test_launch_takes_repeatable_data_roots_and_refuses_a_missing_one(tmp_path, capsys):
    import launch

    args = launch.parse_args(["--data-root", str(tmp_path), "--data-root", "/srv/datasets"])
    assert args.data_roots == [str(tmp_path), "/srv/datasets"]
    assert launch.parse_args([]).data_roots is None   # the default: the data folder and assets/
    assert launch.main(["--max-jobs", "1", "--data-root", str(tmp_path / "typo")]) == 2
    assert f"--data-root {tmp_path / 'typo'} is not a folder" in capsys.readouterr().err


def test_the_ui_context_defaults_to_the_data_folder_and_assets(tmp_path):
    from ui.common import AppContext

    ctx = AppContext(manager=None, data_dir=tmp_path / "data", runs_dir=tmp_path / "runs")
    assert ctx.data_roots[0] == str(tmp_path / "data")
    assert Path(ctx.data_roots[1]).resolve() == ROOT / "assets"
    given = AppContext(manager=None, data_dir=tmp_path, runs_dir=tmp_path, data_roots=["/srv/datasets"])
    assert given.data_roots == ["/srv/datasets"]


# ---- an image with too many pixels gets the same message wherever it is read (issue 11, item 6) -------------

def huge_png(path: Path, w: int = 15000, h: int = 15000) -> Path:
    """A valid PNG header for a ``w``×``h`` greyscale image (and an empty image stream): what Pillow
    reads to learn the size, without writing 225 MB of pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


TOO_MANY = "has too many pixels (225 Mpx, the limit is 89 Mpx): shrink it"


def test_a_huge_png_is_told_too_many_pixels_by_predict_not_use_a_jpeg(tmp_path):
    from core.inference import open_image

    png = huge_png(tmp_path / "poster.png")
    for given, label in ((png, png.name), (png.read_bytes(), "the uploaded image")):   # the name, never the server path
        with pytest.raises(DataError) as e:
            open_image(given, "RGB")
        assert str(e.value).startswith(f"{label} {TOO_MANY}") and "JPEG" not in str(e.value)
    small = huge_png(tmp_path / "small.png", 4, 4)   # the same header path, under the limit: no refusal
    with pytest.raises(DataError, match="cannot be read as an image"):  # (its image stream is empty)
        open_image(small, "RGB")


def test_a_huge_png_uploaded_on_the_predict_tab_is_told_too_many_pixels(tmp_path):
    import gradio as gr
    from gradio.data_classes import ImageData

    from ui import tab_predict

    comp = tab_predict.friendly_image_errors(gr.Image(type="pil", render=False))
    png = huge_png(tmp_path / "poster.png")
    with pytest.raises(gr.Error) as e:
        comp.preprocess(ImageData(path=str(png), orig_name="poster.png"))
    assert e.value.message.startswith(f"poster.png {TOO_MANY}") and "JPEG" not in e.value.message


def test_a_huge_png_in_a_folder_is_skipped_as_too_many_pixels(roots):
    folder = image_folder(roots["data"] / "posters")
    huge_png(folder / "cat" / "poster.png")
    ds = D.load_dataset("folder", folder, data_dir=roots["data"], roots=roots["roots"])
    assert len(ds) == 6
    assert dict(ds.skipped)["cat/poster.png"] == \
        "image too large: too many pixels (225 Mpx, the limit is 89 Mpx); shrink the image"


def test_app_a_stuck_folder_scan_does_not_stall_other_users(app, monkeypatch):
    """While one user's load is stuck listing a folder (held here by a gate, not by a clock), another
    user loads a folder of their own and reshuffles their preview."""
    import threading

    entered, release = threading.Event(), threading.Event()
    real_load = D.load_dataset

    def gated(kind, location=None, **kw):
        if location and os.fspath(location).endswith("stuck"):
            entered.set()
            release.wait(120)
            location = os.fspath(location)[:-len("stuck")] + "pets"
        return real_load(kind, location, **kw)

    monkeypatch.setattr(D, "load_dataset", gated)
    a, b = client(app), client(app)
    job = a.submit("Folder on the server", "CIFAR10", None, str(app["extra"] / "stuck"), "per class", 10, 10, 0,
                   api_name="/load_data")
    try:
        assert entered.wait(120), "the first load never started"
        assert "6 images, 2 classes" in load(b, "Folder on the server", str(app["extra"] / "pets"))[0]
        assert {g["caption"] for g in b.predict("per class", api_name="/reshuffle")} == {"cat", "dog"}
        assert not job.done()   # A's load was still waiting at the gate all along
    finally:
        release.set()
    assert "6 images, 2 classes" in job.result(timeout=120)[0]


def test_a_nul_byte_or_a_megabyte_path_gets_a_short_clear_message(roots):
    with pytest.raises(DataError, match="contains a NUL character"):
        D.load_dataset("folder", "/etc\x00/x", data_dir=roots["data"], roots=roots["roots"])
    with pytest.raises(DataError, match="contains a NUL character"):
        D.load_dataset("index", "a\x00.csv")   # the command line too: no 'embedded null byte'
    msg = refusal("folder", "/" + "x" * 1_000_000, roots)
    assert len(msg) < 1_000 and "outside this server's data folders" in msg
