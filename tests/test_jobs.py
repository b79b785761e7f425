"""JobManager with the real trainer: queueing, stop, failure isolation, reconnect by owner."""
import time

import pytest

from core import events as ev
from core.errors import ConfigError
from core.jobs import JobManager


def test_second_job_waits_in_the_queue_then_runs(tmp_path, tiny_config):
    manager = JobManager(runs_dir=tmp_path, max_jobs=1)
    tiny_config.epochs = 1
    first = manager.submit(tiny_config, owner="alice")
    second = manager.submit(tiny_config, owner="bob")
    assert manager.queue_position(second.job_id) == 1
    assert second.status == ev.QUEUED
    manager.wait(first.job_id, timeout=120)
    manager.wait(second.job_id, timeout=120)
    assert first.status == second.status == ev.FINISHED
    assert second.started >= first.ended - 0.5   # it started only once a slot was free
    assert manager.queue_position(second.job_id) is None


def test_stop_a_running_job_and_remove_a_queued_one(tmp_path, tiny_config):
    manager = JobManager(runs_dir=tmp_path, max_jobs=1)
    tiny_config.epochs = 50
    running = manager.submit(tiny_config, owner="alice")
    queued = manager.submit(tiny_config, owner="bob")
    deadline = time.time() + 60
    while not any(isinstance(e, ev.BatchEnded) for e in running.events):
        assert time.time() < deadline, "the first job never started training"
        time.sleep(0.05)
    manager.stop(queued.job_id)
    assert queued.status == ev.STOPPED and queued.started is None
    manager.stop(running.job_id)
    manager.wait(running.job_id, timeout=60)
    assert running.status == ev.STOPPED
    assert (tmp_path / running.job_id / "last.pth").exists()


def test_a_failed_job_reports_its_reason_and_the_manager_keeps_working(tmp_path, tiny_config):
    manager = JobManager(runs_dir=tmp_path, max_jobs=1)
    good = tiny_config
    bad = type(tiny_config).from_dict({**tiny_config.to_dict(),
                                       "data": {**tiny_config.to_dict()["data"], "location": str(tmp_path / "nope")}})
    good.epochs = 1
    failed = manager.submit(bad, owner="alice")
    manager.wait(failed.job_id, timeout=60)
    assert failed.status == ev.FAILED and "nope" in failed.message
    ok = manager.submit(good, owner="alice")
    manager.wait(ok.job_id, timeout=120)
    assert ok.status == ev.FINISHED


def test_jobs_are_found_again_by_owner_and_id(tmp_path, tiny_config):
    manager = JobManager(runs_dir=tmp_path, max_jobs=2)
    tiny_config.epochs = 1
    a = manager.submit(tiny_config, owner="alice")
    b = manager.submit(tiny_config, owner="bob")
    assert manager.latest_for("alice") is a and manager.latest_for("bob") is b
    assert manager.jobs("alice") == [a]
    assert manager.get(a.job_id) is a
    with pytest.raises(ConfigError, match="No training job"):
        manager.get("missing")
    manager.wait(a.job_id, timeout=120)
    manager.wait(b.job_id, timeout=120)
    snap = a.snapshot()
    assert snap["status"] == ev.FINISHED and snap["started"].run_id == a.job_id
    new, cursor = a.events_since(0)
    assert cursor == len(a.events) and a.events_since(cursor) == ([], cursor)


def test_max_jobs_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match="max_jobs"):
        JobManager(runs_dir=tmp_path, max_jobs=0)
