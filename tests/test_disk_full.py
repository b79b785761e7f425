"""A full disk and failing writes (issue 11, item 5): a run that cannot save says so plainly and
ends failed with the status agreeing with its last checkpoint; the run history lists, and deletes
to make room, on a full disk; Resume works once space is freed.

The end-to-end tests mount a 4 MiB tmpfs as the runs folder (root only; skipped with the reason
elsewhere) and fill it from an ``on_event`` hook after epoch 1. The error translation is also
tested without a mount, by making ``torch.save`` (or the event log) fail with a given errno.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import sqlite3
import subprocess
from collections import namedtuple
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from core import events as ev, storage, trainer
from core.config import RunConfig
from core.errors import StorageError
from core.runindex import IndexFile
from core.runs import INDEX_FILE, RunHistory, read_meta
from core.trainer import fit

KiB, MiB = 1 << 10, 1 << 20
DISK_SIZE = 4 * MiB   # room for a finished run (~1 MiB) and a run's first epoch, then the ballast
FULL_MESSAGE = (r"The disk holding runs/ is full \([\d.]+ (B|KiB|MiB) free of 4\.0 MiB\) while {doing}\. "
                r"Delete old runs \(Compare → Run history\) or free space, then Resume: epoch 1 is saved\.")


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """``runs/`` on a 4 MiB tmpfs, in a fresh working folder (so the lab calls it ``runs/``, as a
    server started there would). Unmounted afterwards, whatever the test did."""
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("needs root to mount a tmpfs: no mount command here")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE}", "tmpfs", str(runs_dir)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"needs root to mount a tmpfs: {proc.stderr.strip() or f'mount exited {proc.returncode}'}")
    monkeypatch.chdir(tmp_path)
    try:
        yield Path("runs")
    finally:
        if subprocess.run(["umount", str(runs_dir)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(runs_dir)], check=False)   # still busy: detach it anyway


def _fill(folder: Path, leave: int = 0, name: str = "ballast") -> Path:
    """Take the free space of ``folder``'s disk down to ``leave`` bytes (0: until the disk refuses)."""
    path = folder / name
    remaining = shutil.disk_usage(folder).free - leave if leave else None
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    chunk = b"\0" * (64 * KiB)
    try:
        while remaining is None or remaining > 0:
            n = len(chunk) if remaining is None else min(len(chunk), remaining)
            written = os.write(fd, chunk[:n])
            if remaining is not None:
                remaining -= written
    except OSError as err:
        assert err.errno == errno.ENOSPC and leave == 0, err
    finally:
        os.close(fd)
    return path


def _fill_after_epoch_1(folder: Path, leave: int):
    def on_event(event):
        if isinstance(event, ev.EpochEnded) and event.epoch == 1:
            _fill(folder, leave)
    return on_event


def _status_and_checkpoint_epochs(run_dir: Path) -> tuple[dict, int]:
    status = json.loads((run_dir / "status.json").read_text(encoding="utf-8"))
    return status, torch.load(run_dir / "last.pth", weights_only=True)["epoch"]


def _one_epoch(config):
    """A 1-epoch copy of ``config`` (the test goes on using the 2-epoch original)."""
    return RunConfig.from_dict({**config.to_dict(), "epochs": 1})


# ---------------------------------------------------------------------------------------------
# On a real full disk (a tmpfs)
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow   # trains into epoch 2, then resumes to the end
def test_a_disk_full_in_epoch_2_fails_plainly_the_history_still_works_and_resume_finishes(
        small_disk, tiny_config, tiny_folder, caplog):
    runs_dir = small_disk
    other = fit(_one_epoch(tiny_config), runs_dir=runs_dir)   # deleted later to make room
    assert other.status == ev.FINISHED, other.message
    history = RunHistory(runs_dir)
    assert list(history.list()["run_id"]) == [other.run_id]   # indexed before the disk fills

    # Room for the events and the status after epoch 1, not for a checkpoint (~0.5 MiB).
    result = fit(tiny_config, on_event=_fill_after_epoch_1(runs_dir, leave=256 * KiB), runs_dir=runs_dir)
    assert result.status == ev.FAILED
    assert re.fullmatch(FULL_MESSAGE.format(doing="saving the checkpoint of epoch 2"), result.message), result.message
    status, saved = _status_and_checkpoint_epochs(result.run_dir)
    assert status["status"] == ev.FAILED and status["message"] == result.message
    assert status["epochs_completed"] == saved == result.epochs_completed == 1
    assert not list(result.run_dir.glob("*.tmp"))   # the partial checkpoint gave its space back

    # The disk now full to the last byte: the history lists (from the folders), says why once...
    _fill(runs_dir, leave=0, name="ballast2")
    assert shutil.disk_usage(runs_dir).free == 0
    with caplog.at_level(logging.WARNING, logger="core.runindex"):
        for _ in range(2):
            rows = history.list().set_index("run_id")
            assert set(rows.index) == {other.run_id, result.run_id}
            assert rows.loc[result.run_id, "status"] == ev.FAILED and rows.loc[result.run_id, "epochs_done"] == 1
    assert len([r for r in caplog.records if "cannot be used" in r.getMessage()]) == 1
    # ...a rename fails with the plain message and loses nothing...
    with pytest.raises(StorageError) as info:
        history.rename(result.run_id, "kept")
    assert re.match(r"The disk holding runs/ is full \(0 B free of 4\.0 MiB\) while saving the name and tags "
                    rf"of run {result.run_id} \(meta\.json\)\. Delete old runs", str(info.value)), str(info.value)
    assert read_meta(result.run_dir) == {}
    # ...and deleting another run works and frees its space; the index catches up.
    assert history.delete(other.run_id, confirm=other.run_id).startswith(f"Deleted run {other.run_id}")
    assert not (runs_dir / other.run_id).exists() and shutil.disk_usage(runs_dir).free > 512 * KiB
    assert list(history.list()["run_id"]) == [result.run_id]
    assert history.get(result.run_id, refresh=False)["status"] == ev.FAILED   # read back from the index

    for ballast in ("ballast", "ballast2"):
        (runs_dir / ballast).unlink()
    resumed = fit(tiny_config, runs_dir=runs_dir, resume_from=result.run_dir / "last.pth")
    assert resumed.status == ev.FINISHED, resumed.message
    status, saved = _status_and_checkpoint_epochs(result.run_dir)
    assert status["epochs_completed"] == saved == 2


@pytest.mark.slow   # trains until a small disk is full
def test_a_disk_filled_to_the_last_byte_mid_run_still_ends_failed_with_agreeing_status(small_disk, tiny_config):
    """No room even for the events or a new status file: the run still ends failed, with the
    reason, and status.json (rewritten in place) says failed after the 1 epoch last.pth holds."""
    seen = []
    fill = _fill_after_epoch_1(small_disk, leave=0)

    def on_event(event):
        seen.append(event)
        fill(event)

    with pytest.warns(UserWarning, match="card.json not written"):
        result = fit(tiny_config, on_event=on_event, runs_dir=small_disk)
    assert result.status == ev.FAILED
    doing = r"(saving the checkpoint of epoch 2|writing the run's events \(events\.jsonl\))"
    assert re.fullmatch(FULL_MESSAGE.format(doing=doing), result.message), result.message
    assert isinstance(seen[-1], ev.RunFinished) and seen[-1].message == result.message
    status, saved = _status_and_checkpoint_epochs(result.run_dir)
    assert status["status"] == ev.FAILED and status["epochs_completed"] == saved == 1


# ---------------------------------------------------------------------------------------------
# Without a mount: the same failures, raised on purpose
# ---------------------------------------------------------------------------------------------
def _fail_saving_epoch_2(monkeypatch, make_error):
    """torch.save writes part of epoch 2's checkpoint, then fails as ``make_error()`` says."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("epoch") == 2:
            f.write(b"PK\x03\x04 partial")
            raise make_error()
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


@pytest.mark.parametrize("code, problem", [
    (errno.ENOSPC, r"The disk holding runs/ is full \([\d.]+ \w+ free of [\d.]+ \w+\)"),
    # the same path with other codes: only their words differ
    pytest.param(errno.EIO, r"The disk holding runs/ reported an input/output error \(EIO\)", marks=pytest.mark.slow),
    pytest.param(errno.EROFS, r"The disk holding runs/ is read-only \(EROFS\)", marks=pytest.mark.slow),
    (errno.EACCES, r"No permission to write in runs/"),
])
def test_a_failed_checkpoint_write_ends_the_run_with_a_plain_reason_and_keeps_epoch_1(
        tmp_path, tiny_config, monkeypatch, code, problem):
    monkeypatch.chdir(tmp_path)
    _fail_saving_epoch_2(monkeypatch, lambda: OSError(code, os.strerror(code)))
    result = fit(tiny_config, runs_dir=Path("runs"))
    assert result.status == ev.FAILED
    assert re.fullmatch(rf"{problem} while saving the checkpoint of epoch 2\. .+, then Resume: epoch 1 is saved\.",
                        result.message), result.message
    assert "internal error" not in result.message
    status, saved = _status_and_checkpoint_epochs(result.run_dir)
    assert status["status"] == ev.FAILED and status["epochs_completed"] == saved == 1
    assert not list(result.run_dir.glob("*.tmp"))
    assert not (result.run_dir / "error.log").exists()   # not a bug: no trace kept as one


def _disk_usage_full_while_a_partial_file_exists(monkeypatch, free_after: int):
    """The file system as PyTorch's zip writer leaves it on a full disk: nothing free while its
    partial file exists, ``free_after`` once that is removed."""
    usage = namedtuple("usage", "total used free")

    def disk_usage(path):
        partial = any(Path(path).rglob("*.pth.*.tmp"))
        free = 0 if partial else free_after
        return usage(3 * 2**30, 3 * 2**30 - free, free)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)


def test_torchs_zip_writer_error_on_a_full_disk_is_recognised_by_the_free_space(tmp_path, tiny_config, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _fail_saving_epoch_2(monkeypatch, lambda: RuntimeError(
        "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"))
    _disk_usage_full_while_a_partial_file_exists(monkeypatch, free_after=12 * MiB)
    result = fit(tiny_config, runs_dir=Path("runs"))
    assert result.message == ("The disk holding runs/ is full (12 MiB free of 3.0 GiB) while saving the checkpoint "
                              "of epoch 2. Delete old runs (Compare → Run history) or free space, then Resume: "
                              "epoch 1 is saved.")


def test_the_same_error_with_space_left_is_an_internal_error_not_a_full_disk(tmp_path, tiny_config, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _fail_saving_epoch_2(monkeypatch, lambda: RuntimeError("[enforce fail at inline_container.cc:672] . bug"))
    result = fit(tiny_config, runs_dir=Path("runs"))
    assert result.status == ev.FAILED and result.message.startswith("internal error: RuntimeError")
    assert "inline_container" in (result.run_dir / "error.log").read_text(encoding="utf-8")
    status, saved = _status_and_checkpoint_epochs(result.run_dir)
    assert status["epochs_completed"] == saved == 1


def test_a_failed_event_append_ends_the_run_with_the_disk_full_reason(tmp_path, tiny_config, monkeypatch):
    monkeypatch.chdir(tmp_path)
    real = trainer._RunLog._append

    def append(self, event):
        if isinstance(event, ev.BatchEnded) and event.epoch == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(self, event)

    monkeypatch.setattr(trainer._RunLog, "_append", append)
    seen = []
    result = fit(tiny_config, on_event=seen.append, runs_dir=Path("runs"))
    assert re.fullmatch(r"The disk holding runs/ is full \(.+\) while writing the run's events \(events\.jsonl\)\. "
                        r"Delete old runs \(Compare → Run history\) or free space, then Resume: epoch 1 is saved\.",
                        result.message), result.message
    assert isinstance(seen[-1], ev.RunFinished) and seen[-1].status == ev.FAILED
    status, saved = _status_and_checkpoint_epochs(result.run_dir)
    assert status["epochs_completed"] == saved == 1


def test_a_failed_status_write_keeps_the_previous_status_whole(tmp_path, monkeypatch):
    trainer.write_status(tmp_path, ev.RUNNING, "training")
    before = (tmp_path / "status.json").read_text(encoding="utf-8")

    def no_room(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_room)
    with pytest.raises(OSError):
        trainer.write_status(tmp_path, ev.RUNNING, "still training", epochs_completed=1)
    assert (tmp_path / "status.json").read_text(encoding="utf-8") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]   # no temporary left behind


def test_the_final_status_is_rewritten_in_place_when_no_new_file_fits(tmp_path, monkeypatch):
    trainer.write_status(tmp_path, ev.RUNNING, "training with a long message " * 3)

    def no_room(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(storage, "atomic_write_json", no_room)
    trainer.write_status(tmp_path, ev.FAILED, "disk full", final=True, epochs_completed=1)
    status = json.loads((tmp_path / "status.json").read_text(encoding="utf-8"))
    assert status["status"] == ev.FAILED and status["epochs_completed"] == 1


def test_the_history_lists_and_deletes_from_the_folders_when_its_index_cannot_be_used(
        tmp_path, tiny_config, monkeypatch, caplog):
    runs_dir = tmp_path / "runs"
    kept = fit(_one_epoch(tiny_config), runs_dir=runs_dir)
    gone = fit(_one_epoch(tiny_config), runs_dir=runs_dir)
    history = RunHistory(runs_dir)

    def broken(self):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(IndexFile, "_connect", broken)
    with caplog.at_level(logging.WARNING, logger="core.runindex"):
        assert set(history.list()["run_id"]) == {kept.run_id, gone.run_id}
        assert history.delete(gone.run_id, confirm=gone.run_id).startswith(f"Deleted run {gone.run_id}")
        assert list(history.list()["run_id"]) == [kept.run_id]
    assert len([r for r in caplog.records if "cannot be used" in r.getMessage()]) == 1
    monkeypatch.undo()
    assert list(history.list()["run_id"]) == [kept.run_id]   # the index catches up once it works


def test_a_rename_on_a_full_disk_says_so_and_keeps_the_old_name(tmp_path, tiny_config, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = fit(_one_epoch(tiny_config), runs_dir=Path("runs"))
    history = RunHistory(Path("runs"))
    history.rename(run.run_id, "first name")

    def no_room(path, data, indent=2):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(storage, "atomic_write_json", no_room)   # the one atomic JSON write
    with pytest.raises(StorageError, match=r"^The disk holding runs/ is full \(.+\) while saving the name and tags"):
        history.set_tags(run.run_id, "a, b")
    assert read_meta(run.run_dir)["name"] == "first name" and not read_meta(run.run_dir).get("tags")


def test_an_index_written_in_wal_mode_is_switched_to_a_journal_that_reads_without_writing(tmp_path, tiny_config):
    runs_dir = tmp_path / "runs"
    fit(_one_epoch(tiny_config), runs_dir=runs_dir)
    RunHistory(runs_dir)
    con = sqlite3.connect(runs_dir / INDEX_FILE)
    con.execute("PRAGMA journal_mode=WAL")
    con.close()
    assert len(RunHistory(runs_dir).list()) == 1
    con = sqlite3.connect(runs_dir / INDEX_FILE)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    con.close()
    assert not list(runs_dir.glob(INDEX_FILE + "-*"))


def test_folder_label_and_sizes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.folder_label("runs") == "runs/"
    assert storage.folder_label(tmp_path / "runs") == "runs/"            # below the working folder
    assert storage.folder_label("/srv/lab/runs") == "/srv/lab/runs/"     # elsewhere: the full path
    assert [storage.format_size(n) for n in (0, 256 * KiB, 4 * MiB, 12 * MiB, 3 * 2**30)] == \
        ["0 B", "256 KiB", "4.0 MiB", "12 MiB", "3.0 GiB"]


def test_a_quota_and_a_disk_out_of_inodes_are_named_as_such(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    quota = storage.storage_error(OSError(errno.EDQUOT, "Disk quota exceeded"), "runs", "saving x")
    assert str(quota) == ("Your disk quota on the disk holding runs/ is used up while saving x. Delete old runs "
                          "(Compare → Run history) or free space, then try again.")
    real = os.statvfs

    def statvfs(path):   # as the file system says, except that no inode is free
        fields = {name: getattr(real(path), name) for name in dir(real(path)) if name.startswith("f_")}
        return SimpleNamespace(**{**fields, "f_favail": 0, "f_ffree": 0})

    monkeypatch.setattr(os, "statvfs", statvfs)
    no_inodes = storage.storage_error(OSError(errno.ENOSPC, "No space left on device"), "runs", "saving x")
    assert re.match(r"The disk holding runs/ has no free inodes left \(too many files; [\d.]+ \w+ free of", str(no_inodes))
