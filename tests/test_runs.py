"""Run history index (core.runs.RunHistory): built from the run folders, survives restarts and a
lost index, keeps names/tags/owners in meta.json, deletes only with confirmation, detects
interrupted runs and resumes them."""
from __future__ import annotations

import json
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from core import events as ev
from core.config import RunConfig
from core.errors import ConfigError
from core.jobs import JobManager
from core.runs import CARD_FILE, INDEX_FILE, META_FILE, RunHistory, read_meta
from core.trainer import fit
from tests import job_fits


def _config(tiny_folder, **changes) -> RunConfig:
    raw = {"data": {"source": "folder", "location": str(tiny_folder), "batch_size": 16},
           "model": {"name": "tutorial_net"}, "optim": {"lr": 0.01}, "epochs": 1, "device": "cpu", "seed": 1}
    raw.update(changes)
    return RunConfig.from_dict(raw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_folder):
    """A runs folder with two finished runs: one trained through a JobManager with the history
    attached (owner 'alice'), one by plain fit() as the command line does (no index); both have
    their card.json."""
    runs_dir = tmp_path_factory.mktemp("runs")
    manager = JobManager(runs_dir=runs_dir, max_jobs=1)
    RunHistory(runs_dir).attach(manager)
    job = manager.submit(_config(tiny_folder, name="first"), owner="alice")
    manager.wait(job.job_id, timeout=120)
    assert job.status == ev.FINISHED, job.message
    cli = fit(_config(tiny_folder, name="from the command line"), runs_dir=runs_dir)
    assert cli.status == ev.FINISHED
    (runs_dir / INDEX_FILE).unlink()  # each test builds its own index on a copy
    return runs_dir, job.job_id, cli.run_id


@pytest.fixture
def runs_copy(trained, tmp_path):
    runs_dir, managed, cli = trained
    dest = tmp_path / "runs"
    shutil.copytree(runs_dir, dest)
    for p in dest.glob(INDEX_FILE + "*"):
        p.unlink()
    return dest, managed, cli


def test_the_index_is_built_from_the_folders_with_every_column(runs_copy):
    runs_dir, managed, cli = runs_copy
    history = RunHistory(runs_dir)
    assert (runs_dir / INDEX_FILE).is_file()
    df = history.list()
    assert set(df["run_id"]) == {managed, cli}
    row = df.set_index("run_id").loc[managed]
    assert row["name"] == "first" and row["owner"] == "alice" and row["model"] == "tutorial_net"
    assert row["dataset"] == "tiny" and row["status"] == ev.FINISHED
    assert row["epochs_done"] == 1 and row["epochs"] == 1
    assert 0 <= row["best_val_accuracy"] <= 1 and 0 <= row["test_accuracy"] <= 1 and 0 <= row["macro_f1"] <= 1
    assert row["params"] > 60_000 and row["trainable_params"] == row["params"]
    assert row["train_seconds"] > 0 and row["images_per_sec"] > 0
    assert row["checkpoint_bytes"] == (runs_dir / managed / "best.pth").stat().st_size
    assert row["has_last"] == 1 and row["has_eval"] == 1
    # The command-line run has no owner (nobody recorded one) but everything else.
    assert pd_isna(df.set_index("run_id").loc[cli, "owner"])
    # The run card written by the listener.
    card = json.loads((runs_dir / managed / CARD_FILE).read_text(encoding="utf-8"))
    assert card["model"]["name"] == "tutorial_net" and card["model"]["params"] == row["params"]
    assert card["dataset"]["name"] == "tiny" and card["dataset"]["source"] == "folder"
    assert card["dataset"]["split_sizes"] == {"train": 105, "val": 15, "test": 30}
    assert card["seed"] == 1 and card["device"] == "cpu" and card["status"] == ev.FINISHED
    assert card["duration_s"] > 0 and {"torch", "torchvision", "python", "platform"} <= set(card["versions"])
    # Written once per session although both the trainer and the listener touch it; the owner
    # comes from the listener.
    assert card["sessions"] == 1 and len(card["session_seconds"]) == 1 and card["owner"] == "alice"
    # The plain fit() run (as the command line does it) has its card too, without an owner.
    cli_card = json.loads((runs_dir / cli / CARD_FILE).read_text(encoding="utf-8"))
    assert cli_card["status"] == ev.FINISHED and cli_card["sessions"] == 1 and "owner" not in cli_card
    assert cli_card["dataset"]["split_sizes"] == card["dataset"]["split_sizes"] and cli_card["duration_s"] > 0


def pd_isna(value) -> bool:
    import pandas as pd
    return value is None or bool(pd.isna(value))


def test_the_index_survives_a_restart_and_is_rebuilt_when_lost_or_outdated(runs_copy):
    runs_dir, managed, cli = runs_copy
    first = RunHistory(runs_dir)
    first.rename(cli, "renamed run")
    first.set_tags(cli, "baseline, cpu")
    # A new server on the same folder: same runs, same names and tags.
    again = RunHistory(runs_dir).list().set_index("run_id")
    assert set(again.index) == {managed, cli}
    assert again.loc[cli, "name"] == "renamed run" and again.loc[cli, "tags"] == "baseline, cpu"
    # The index file is lost: rebuilt from the folders (names and tags come from meta.json).
    (runs_dir / INDEX_FILE).unlink()
    rebuilt = RunHistory(runs_dir).list().set_index("run_id")
    assert rebuilt.loc[cli, "name"] == "renamed run" and rebuilt.loc[cli, "tags"] == "baseline, cpu"
    assert rebuilt.loc[managed, "owner"] == "alice"
    # An index of another schema version is rebuilt too.
    with sqlite3.connect(runs_dir / INDEX_FILE) as con:
        con.execute("UPDATE info SET value='0' WHERE key='schema_version'")
        con.execute("DELETE FROM runs")
    assert len(RunHistory(runs_dir).list()) == 2
    # A corrupt index file as well.
    for p in runs_dir.glob(INDEX_FILE + "*"):
        p.unlink()
    (runs_dir / INDEX_FILE).write_bytes(b"this is not a database")
    assert len(RunHistory(runs_dir).list()) == 2


def test_folders_added_or_removed_behind_its_back_are_noticed(runs_copy, tmp_path):
    runs_dir, managed, cli = runs_copy
    history = RunHistory(runs_dir)
    moved = tmp_path / "elsewhere"
    shutil.move(str(runs_dir / cli), moved)
    assert list(history.list()["run_id"]) == [managed]
    shutil.move(str(moved), runs_dir / cli)
    assert set(history.list()["run_id"]) == {managed, cli}


def test_rename_tags_filter_and_sort(runs_copy):
    runs_dir, managed, cli = runs_copy
    history = RunHistory(runs_dir)
    history.rename(managed, "  my   best run ")
    history.set_tags(managed, "a, b,, a ")
    history.set_tags(cli, ["b", "c"])
    assert read_meta(runs_dir / managed) ["name"] == "my best run"
    assert read_meta(runs_dir / managed)["tags"] == ["a", "b"]
    assert list(history.list(tag="a")["run_id"]) == [managed]
    assert set(history.list(tag="b")["run_id"]) == {managed, cli}
    assert list(history.list(filter_text="BEST run")["run_id"]) == [managed]
    assert list(history.list(filter_text="command line")["run_id"]) == [cli]
    assert history.list(filter_text="nothing like this").empty
    assert set(history.list(status=ev.FINISHED, model="tutorial_net")["run_id"]) == {managed, cli}
    by_created = history.list(sort="created", descending=False)
    assert list(by_created["run_id"]) == [managed, cli]  # the command-line run came second
    assert list(history.list(sort="created")["run_id"]) == [cli, managed]
    with pytest.raises(ConfigError, match="sort"):
        history.list(sort="colour")
    history.rename(managed, "")  # clears: back to the config's name
    assert history.get(managed)["name"] == "first"
    with pytest.raises(ConfigError, match="No run"):
        history.rename("20990101-000000-nothing-000000", "x")
    with pytest.raises(ConfigError, match="not a run id"):
        history.rename("../escape", "x")


def test_delete_needs_the_run_id_typed_and_refuses_live_runs(runs_copy):
    runs_dir, managed, cli = runs_copy
    manager = JobManager(runs_dir=runs_dir, max_jobs=1, fit=job_fits.fit_until_released)
    history = RunHistory(runs_dir).attach(manager)
    with pytest.raises(ConfigError, match="type its id"):
        history.delete(cli, confirm="yes")
    assert (runs_dir / cli).is_dir()
    live = manager.submit(RunConfig(), owner="bob", job_id=managed)
    try:
        with pytest.raises(ConfigError, match="stop it first"):
            history.delete(managed, confirm=managed)
        assert (runs_dir / managed).is_dir()
    finally:
        job_fits.release(runs_dir)
        manager.wait(live.job_id, timeout=30)
    message = history.delete(cli, confirm=f" {cli} ")
    assert cli in message and not (runs_dir / cli).exists()
    assert list(history.list()["run_id"]) == [managed]
    assert list(RunHistory(runs_dir).list()["run_id"]) == [managed]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _pretend_it_was_running(run_dir: Path) -> None:
    """What a server killed mid-training leaves: status 'running' written by a process now gone."""
    (run_dir / "status.json").write_text(json.dumps(
        {"status": "running", "message": "training", "updated": time.time(), "pid": _dead_pid()}), encoding="utf-8")


def test_the_last_run_is_the_one_last_active_not_the_one_created_last(runs_copy):
    runs_dir, managed, cli = runs_copy
    import os
    (runs_dir / cli / META_FILE).write_text(json.dumps({"owner": "alice"}), encoding="utf-8")
    history = RunHistory(runs_dir)
    history.rebuild()
    now = time.time()
    for run_id, t in ((managed, now + 200), (cli, now + 100)):
        os.utime(runs_dir / run_id / "status.json", (t, t))
    history.rescan()   # changed in place by someone else: seen at the next full look
    assert history.last_run("alice")["run_id"] == managed
    os.utime(runs_dir / cli / "status.json", (now + 300, now + 300))   # e.g. resumed and stopped since
    history.rescan()
    assert history.last_run("alice")["run_id"] == cli


def test_a_run_training_in_another_live_process_is_not_called_interrupted(runs_copy):
    """The command line trains a run while the dashboard lists it: it is running, not resumable
    and not deletable; once that process is gone (or its pid reused later) it is interrupted."""
    runs_dir, managed, cli = runs_copy
    history = RunHistory(runs_dir)
    trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.2)
        (runs_dir / cli / "status.json").write_text(json.dumps(
            {"status": "running", "message": "training", "updated": time.time(), "pid": trainer.pid}), encoding="utf-8")
        row = history.get(cli)
        assert row["status"] == ev.RUNNING and f"pid {trainer.pid}" in row["message"]
        with pytest.raises(ConfigError, match="still training in another process"):
            history.delete(cli, confirm=cli)
        assert (runs_dir / cli).is_dir()
        # the same pid, but a process that started after the status was written: a reused pid
        (runs_dir / cli / "status.json").write_text(json.dumps(
            {"status": "running", "message": "training", "updated": time.time() - 3600, "pid": trainer.pid}),
            encoding="utf-8")
        assert history.get(cli)["status"] == ev.INTERRUPTED
    finally:
        trainer.kill()
        trainer.wait()
    (runs_dir / cli / "status.json").write_text(json.dumps(
        {"status": "running", "message": "training", "updated": time.time(), "pid": trainer.pid}), encoding="utf-8")
    assert history.get(cli)["status"] == ev.INTERRUPTED     # its process is gone


def test_interrupted_runs_are_detected_and_the_latest_one_is_resumable(runs_copy):
    runs_dir, managed, cli = runs_copy
    history = RunHistory(runs_dir)
    last = history.last_run("alice")
    assert last["run_id"] == managed and last["status"] == ev.FINISHED   # finished: only more epochs
    assert history.last_run("bob") is None
    _pretend_it_was_running(runs_dir / managed)
    rows = history.list(rescan=True).set_index("run_id")   # as a restarted server's first look
    assert rows.loc[managed, "status"] == ev.INTERRUPTED
    assert history.interrupted() == [runs_dir / managed]
    last = history.last_run("alice")
    assert last["run_id"] == managed and last["status"] == ev.INTERRUPTED   # resumable where it stopped
    assert history.last_run("bob") is None
    # The command-line run has no owner: nobody's run, even once interrupted.
    _pretend_it_was_running(runs_dir / cli)
    history.rescan()
    assert history.last_run("alice")["run_id"] == managed


def test_resume_an_interrupted_run_through_the_job_manager(runs_copy):
    runs_dir, managed, cli = runs_copy
    manager = JobManager(runs_dir=runs_dir, max_jobs=1)
    history = RunHistory(runs_dir).attach(manager)
    with pytest.raises(ConfigError, match="finished all its 1 epoch\\..*more epochs in all than 1"):
        history.resume(managed, owner="alice")            # finished: only with more epochs
    with pytest.raises(ConfigError, match="finished all its 1 epoch\\."):
        history.resume(managed, owner="alice", epochs=1)
    _pretend_it_was_running(runs_dir / managed)
    job = history.resume(managed, owner="alice")
    assert job.job_id == managed and job.resume_from == str(runs_dir / managed / "last.pth")
    manager.wait(job.job_id, timeout=120)
    assert job.status == ev.FINISHED, job.message
    row = history.get(managed)
    assert row["status"] == ev.FINISHED and row["epochs_done"] == 2 and row["epochs"] == 2
    assert read_meta(runs_dir / managed)["owner"] == "alice"
    card = json.loads((runs_dir / managed / CARD_FILE).read_text(encoding="utf-8"))
    assert card["sessions"] == 2 and len(card["session_seconds"]) == 2


def test_a_finished_run_trains_on_for_more_epochs(runs_copy):
    runs_dir, managed, cli = runs_copy
    manager = JobManager(runs_dir=runs_dir, max_jobs=1)
    history = RunHistory(runs_dir).attach(manager)
    before = torch.load(runs_dir / managed / "last.pth", weights_only=True)
    job = history.resume(managed, owner="alice", epochs=2)
    manager.wait(job.job_id, timeout=120)
    assert job.status == ev.FINISHED, job.message
    trained = [e.epoch for e in job.events if isinstance(e, ev.EpochEnded)]
    assert trained == [2]                                   # epoch 1 is not trained again
    row = history.get(managed)
    assert row["epochs_done"] == 2 and row["epochs"] == 2
    after = torch.load(runs_dir / managed / "last.pth", weights_only=True)
    assert after["epoch"] == 2
    assert any(not torch.equal(before["model"][k], after["model"][k]) for k in before["model"])
    # A comparison's run is left to the Compare tab when the Train tab looks for its last run.
    meta = read_meta(runs_dir / managed)
    (runs_dir / managed / META_FILE).write_text(json.dumps({**meta, "group_id": "cmp-y"}), encoding="utf-8")
    history.rebuild()
    assert history.last_run("alice")["run_id"] == managed
    assert history.last_run("alice", exclude_groups=True) is None


def test_queued_runs_are_indexed_before_their_folder_exists(runs_copy):
    runs_dir, managed, cli = runs_copy
    manager = JobManager(runs_dir=runs_dir, max_jobs=1, fit=job_fits.fit_until_released)
    history = RunHistory(runs_dir).attach(manager)
    blocker = manager.submit(RunConfig(), owner="bob")
    history.register_queued("20990101-000000-tutorial_net-abcdef", RunConfig(name="waiting"), owner="carol",
                            group_id="cmp-x")
    queued = manager.submit(RunConfig(name="waiting"), owner="carol", job_id="20990101-000000-tutorial_net-abcdef")
    try:
        rows = history.list().set_index("run_id")
        assert rows.loc[queued.job_id, "status"] == ev.QUEUED and rows.loc[queued.job_id, "group_id"] == "cmp-x"
        history.rename(queued.job_id, "renamed while queued")
        assert history.get(queued.job_id)["name"] == "renamed while queued"
        manager.stop(queued.job_id)  # removed from the queue: never gets a folder
        assert queued.job_id not in set(history.list()["run_id"])
    finally:
        job_fits.release(runs_dir)
        manager.wait(blocker.job_id, timeout=30)


def test_many_threads_can_use_the_index_at_once(runs_copy):
    runs_dir, managed, cli = runs_copy
    history = RunHistory(runs_dir)
    errors = []

    def work(k):
        try:
            for i in range(8):
                history.set_tags(managed if k % 2 else cli, f"t{k}-{i}")
                history.list(filter_text="run")
                history.get(managed, refresh=False)
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert len(history.list()) == 2
    assert json.loads((runs_dir / managed / META_FILE).read_text(encoding="utf-8"))["tags"]


def test_resumed_epochs_rule():
    from core.resume import resumed_epochs
    assert resumed_epochs(3, 10, False, None) == 10      # stopped: as planned
    assert resumed_epochs(3, 10, False, 2) == 4          # ...and at least one more epoch
    assert resumed_epochs(10, 10, True, None) is None    # finished: only when asked for more
    assert resumed_epochs(10, 10, True, 10) is None
    assert resumed_epochs(10, 10, True, 15) == 15


# ---- who may see and change a run; run lists that show names, not folders --------------------------
def test_a_damaged_status_file_reads_as_failed_with_its_reason_not_as_interrupted(runs_copy):
    from core.runs import UNREADABLE_STATUS, read_status
    runs_dir, managed, _ = runs_copy
    run_dir = runs_dir / managed
    for damaged in ('{"status": "fini', "[1, 2]", '{"message": "no status"}', "\udcff"):
        (run_dir / "status.json").write_text(damaged, encoding="utf-8", errors="surrogateescape")
        assert read_status(run_dir) == (ev.FAILED, UNREADABLE_STATUS)
    assert "status file (status.json) is unreadable" in UNREADABLE_STATUS
    row = RunHistory(runs_dir).get(managed)
    assert (row["status"], row["message"]) == (ev.FAILED, UNREADABLE_STATUS)
    (run_dir / "status.json").unlink()   # no file at all: the run never got past its start
    assert read_status(run_dir)[0] == ev.INTERRUPTED


def test_run_lists_are_named_and_hold_ids_filtered_by_who_may_see(runs_copy):
    from core.identity import Who
    from core.runs import run_label
    runs_dir, managed, cli = runs_copy
    history = RunHistory(runs_dir)
    history.rename(cli, "")          # no name at all: model, epochs and start time
    choices = dict((v, label) for label, v in history.choices(need="checkpoint"))
    assert set(choices) == {managed, cli}
    assert choices[managed].startswith("first · test ")
    assert re.fullmatch(r"from the command line · test [\d.]+% ±[\d.]+", choices[cli]) or \
        re.fullmatch(r"tutorial_net · 1 epoch · \d\d:\d\d · test [\d.]+% ±[\d.]+", choices[cli])
    assert not any("/" in label or managed in label for label in choices.values())
    assert run_label({"model": "resnet18", "epochs": 3, "created": time.time()}).startswith("resnet18 · 3 epochs · ")
    alice, bob = Who("alice"), Who("bob")
    assert {v for _, v in history.choices(who=bob, private=False)} == {managed, cli}     # a class leaderboard
    assert [v for _, v in history.choices(who=bob, private=True)] == []
    assert [v for _, v in history.choices(who=alice, private=True)] == [managed]
    assert len(history.choices(who=Who("t", teacher=True), private=True)) == 2


def test_check_access_refuses_unknown_ids_paths_and_other_peoples_runs(runs_copy):
    from core.identity import Who
    runs_dir, managed, cli = runs_copy
    history = RunHistory(runs_dir)
    alice, bob, teacher = Who("alice"), Who("bob"), Who("t", teacher=True)
    assert history.check_access(managed, bob) == "alice"                       # viewing is open by default
    with pytest.raises(ConfigError, match="runs are private"):
        history.check_access(managed, bob, private=True)
    for action in ("delete", "rename", "tag", "resume", "export", "stop"):
        with pytest.raises(ConfigError, match=f"only its owner or the teacher can {action} it"):
            history.check_access(managed, bob, action)
        history.check_access(managed, alice, action)
        history.check_access(managed, teacher, action)
    with pytest.raises(ConfigError, match="only its owner or the teacher can delete"):
        history.check_access(cli, alice, "delete")               # a command-line run: the teacher's to change
    history.check_access(cli, teacher, "delete")
    with pytest.raises(ConfigError, match="No run '20990101-000000-nope-abcdef' in the run history"):
        history.check_access("20990101-000000-nope-abcdef", teacher)
    for path in (str(runs_dir / managed), f"../{managed}", f"{runs_dir.name}/{managed}"):
        with pytest.raises(ConfigError, match="is not a run id"):
            history.check_access(path, teacher)
    # the editing methods ask the same rule when told who asks
    with pytest.raises(ConfigError, match="can rename it"):
        history.rename(managed, "mine now", who=bob)
    with pytest.raises(ConfigError, match="can tag it"):
        history.set_tags(managed, "x", who=bob)
    with pytest.raises(ConfigError, match="can delete it"):
        history.delete(managed, managed, who=bob)
    assert history.get(managed)["name"] == "first" and (runs_dir / managed).is_dir()
    assert history.rename(managed, "renamed by alice", who=alice)["name"] == "renamed by alice"
    assert history.delete(managed, managed, who=teacher) == f"Deleted run {managed}."


def test_a_flood_of_tags_is_refused_at_once_and_duplicates_go_in_one_pass():
    from core.runs import MAX_TAGS, normalize_tags
    assert normalize_tags(" a, b,,a , " + "x" * 80) == ["a", "b", "x" * 50]
    with pytest.raises(ConfigError, match="got 1,488,889 characters"):
        normalize_tags(",".join(f"t{i}" for i in range(200_000)))
    with pytest.raises(ConfigError, match=f"At most {MAX_TAGS} tags"):
        normalize_tags([f"t{i}" for i in range(MAX_TAGS + 1)])


def test_tags_that_read_the_same_once_cut_to_length_are_one_tag(runs_copy):
    """A tag is cut to 50 characters; one cut just after a word ends in a space, which the
    duplicate check must not tell apart from the same word without it."""
    from core.runs import normalize_tags
    runs_dir, managed, _ = runs_copy
    word = "x" * 49
    assert normalize_tags([f"{word} first", word, f"{word} second"]) == [word]
    RunHistory(runs_dir).set_tags(managed, f"{word} first, {word}")
    assert read_meta(runs_dir / managed)["tags"] == [word]


def test_a_renamed_run_reads_back_with_its_new_name(runs_copy):
    """Evaluate and Compare name a run by its record: a rename (kept in meta.json) shows there."""
    from core.runs import load_run
    runs_dir, managed, _ = runs_copy
    assert load_run(runs_dir / managed).label == "first"
    RunHistory(runs_dir).rename(managed, "renamed since")
    assert load_run(runs_dir / managed).label == "renamed since"


# ---- what a listing and the listener read ------------------------------------------------------
def test_a_listing_looks_into_the_folders_only_when_their_set_changed_or_when_asked(runs_copy, monkeypatch):
    from core import rundir, runindex
    runs_dir, managed, cli = runs_copy
    history = RunHistory(runs_dir)
    assert len(history.list()) == 2
    looks, reads = [], []
    list_run_dirs, read_row = rundir.list_run_dirs, runindex.read_row
    monkeypatch.setattr(rundir, "list_run_dirs", lambda d: looks.append(1) or list_run_dirs(d))
    monkeypatch.setattr(runindex, "read_row", lambda d, *a, **k: reads.append(Path(d).name) or read_row(d, *a, **k))
    for _ in range(3):
        assert set(history.list()["run_id"]) == {managed, cli}
        history.choices(need="eval")
    assert looks == [] and reads == []                   # nothing changed: no folder looked into
    later = time.time() + 60
    import os
    os.utime(runs_dir / managed / "status.json", (later, later))   # changed in place by someone else
    history.list()
    assert looks == [] and reads == []
    history.list(rescan=True)                            # asked: a full look, only the changed run re-read
    assert looks == [1] and reads == [managed]
    looks.clear(), reads.clear()
    shutil.copytree(runs_dir / cli, runs_dir / "20990101-000000-tutorial_net-abcdef")
    assert "20990101-000000-tutorial_net-abcdef" in set(history.list()["run_id"])   # a new folder: looked
    assert looks == [1] and reads == ["20990101-000000-tutorial_net-abcdef"]
    shutil.rmtree(runs_dir / "20990101-000000-tutorial_net-abcdef")
    assert set(history.list()["run_id"]) == {managed, cli}
    monkeypatch.setattr(runindex, "RESCAN_EVERY_S", 0.0)   # and at least every RESCAN_EVERY_S
    looks.clear()
    history.list()
    assert looks == [1]


class _Manager:
    """What the history's listener needs of a JobManager: its jobs and a listener slot."""

    def __init__(self, *jobs):
        self.listeners, self._jobs = [], {j.job_id: j for j in jobs}

    def add_listener(self, fn):
        self.listeners.append(fn)

    def jobs(self, owner=None):
        return list(self._jobs.values())

    def find(self, job_id):
        return self._jobs.get(job_id)


def test_the_listener_follows_a_live_run_by_the_new_lines_of_its_events(runs_copy, monkeypatch):
    """The listener runs on the job's thread at every epoch: it must read what was appended since,
    not the whole events.jsonl again (batch reports make it long)."""
    from types import SimpleNamespace

    from core.runrecord import RunEvents
    runs_dir, managed, _ = runs_copy
    run_dir = runs_dir / managed
    job = SimpleNamespace(job_id=managed, owner="alice", config=RunConfig.load(run_dir / "config.json"),
                          status=ev.RUNNING, message="", done=False)
    manager = _Manager(job)
    history = RunHistory(runs_dir).attach(manager)
    taken = []
    real = RunEvents._take_lines
    monkeypatch.setattr(RunEvents, "_take_lines", lambda self, data: taken.append(len(data)) or real(self, data))
    events = run_dir / "events.jsonl"

    def deliver(*appended):
        with events.open("a", encoding="utf-8") as fh:
            for e in appended:
                fh.write(json.dumps(e.to_dict()) + "\n")
        taken.clear()
        for fn in manager.listeners:
            fn(job, appended[-1])

    deliver(ev.RunStarted(run_id=managed, run_dir=str(run_dir), device="cpu", classes=["a", "b", "c"],
                          split_sizes={"train": 105, "val": 15, "test": 30}, input_shape=[3, 32, 32],
                          params_total=1, params_trainable=1, batches_per_epoch=7, start_epoch=1, epochs=3))
    assert taken == [events.stat().st_size]              # the first look reads the file once
    for epoch in (2, 3):
        before = events.stat().st_size
        batches = [ev.BatchEnded(epoch=epoch, batch=b, batches=7, step=7 * (epoch - 1) + b, loss=1.0, lr=0.01,
                                 images_per_sec=100.0) for b in range(1, 8)]
        deliver(*batches, ev.EpochEnded(epoch=epoch, epochs=3, train_loss=1.0, train_accuracy=0.5, val_loss=1.0,
                                        val_accuracy=0.5, lr=0.01, seconds=1.0, eta_seconds=1.0,
                                        images_per_sec=100.0, is_best=False))
        assert taken == [events.stat().st_size - before]  # only the lines appended since
        assert history.get(managed, refresh=False)["epochs_done"] == epoch
    job.done = True
    deliver(ev.RunFinished(status=ev.FINISHED, message="finished 3 epoch(s)", best_epoch=1, best_metric=0.5,
                           seconds=2.0))
    assert len(taken) == 1 and taken[0] < events.stat().st_size
    taken.clear()
    history.get(managed)                                  # no longer followed: read afresh
    assert taken == [events.stat().st_size]


def test_the_cached_memory_estimate_is_keyed_by_gradient_accumulation():
    """Issue 16: accumulation raises a run's predicted training memory (the gradients are held all
    step long), so a cached estimate of an accumulated run made before the estimator counted it must
    not match; the keys of plain runs stay what they were (their estimate did not change)."""
    from core.runrecord import memory_key

    config = RunConfig()
    plain = memory_key(config, 10, [3, 32, 32])
    assert json.loads(plain) == [config.model.name, 10, [3, 32, 32], config.data.batch_size, config.optim.optimizer,
                                 config.optim.momentum, config.precision, config.model.freeze,
                                 config.model.freeze_stages, config.model.small_input_stem]
    config.optim.accumulation_steps = 4
    accumulated = memory_key(config, 10, [3, 32, 32])
    assert accumulated != plain and json.loads(accumulated)[-1] == {"accumulation_steps": 4}
    config.optim.accumulation_steps = 2
    assert memory_key(config, 10, [3, 32, 32]) not in (plain, accumulated)
