"""JobManager with the real trainer: queueing, stop, failure isolation, reconnect by owner; each job
in its own process (a killed or crashing one fails its run only); admission by memory."""
import json
import logging
import os
import signal
import time

import pytest

from core import events as ev, resources
from core.config import RunConfig
from core.errors import ConfigError
from core.jobs import JobManager, describe_exit
from core.runs import read_status
from tests import job_fits


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
    assert running._process.exitcode == 0   # the child checkpointed and exited on its own


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


# ---- each job in its own process -------------------------------------------------------------
def _wait_for_batches(job, n: int = 1) -> None:
    while sum(isinstance(e, ev.BatchEnded) for e in job.events) < n:
        assert not job.done, job.message
        time.sleep(0.02)


def test_a_killed_training_process_fails_its_run_and_the_manager_keeps_working(tmp_path, tiny_config):
    """SIGKILL is what the kernel's out-of-memory killer sends: the run is failed with the reason
    in words (in the job, in status.json for the history after a restart), the server goes on."""
    manager = JobManager(runs_dir=tmp_path, max_jobs=1, max_job_memory=1 << 30)
    tiny_config.epochs = 50
    doomed = manager.submit(tiny_config, owner="alice")
    _wait_for_batches(doomed)
    assert doomed.pid is not None and doomed.pid != os.getpid()
    os.kill(doomed.pid, signal.SIGKILL)
    manager.wait(doomed.job_id, timeout=60)
    assert doomed.status == ev.FAILED
    assert "killed (signal 9, SIGKILL)" in doomed.message and "ran out of memory" in doomed.message
    assert "batch 16 fits in what is free now (" in doomed.message, doomed.message
    status = json.loads((tmp_path / doomed.job_id / "status.json").read_text(encoding="utf-8"))
    assert status["status"] == ev.FAILED and status["message"] == doomed.message
    assert read_status(tmp_path / doomed.job_id) == (ev.FAILED, doomed.message)   # what a restarted server shows
    last = json.loads((tmp_path / doomed.job_id / "events.jsonl").read_text(encoding="utf-8").splitlines()[-1])
    assert last["kind"] == "RunFinished" and last["status"] == ev.FAILED
    tiny_config.epochs = 1
    after = manager.submit(tiny_config, owner="alice")
    manager.wait(after.job_id, timeout=120)
    assert after.status == ev.FINISHED, after.message


def test_a_run_whose_server_has_gone_stops_with_a_checkpoint(tmp_path, tiny_config):
    """The end of file on the stop pipe is what a child sees when the server dies: it stops at
    the next batch and leaves a checkpoint instead of training on unseen."""
    manager = JobManager(runs_dir=tmp_path, max_jobs=1)
    tiny_config.epochs = 50
    orphan = manager.submit(tiny_config, owner="alice")
    _wait_for_batches(orphan)
    with orphan._lock:
        orphan._control.close()   # the server's end of the stop pipe, as a dead server leaves it
    manager.wait(orphan.job_id, timeout=60)
    assert orphan.status == ev.STOPPED and orphan._process.exitcode == 0
    assert (tmp_path / orphan.job_id / "last.pth").exists()
    assert len([e for e in orphan.events if isinstance(e, ev.EpochEnded)]) < 50


def test_a_segfault_in_the_training_process_is_reported_as_a_crash(tmp_path):
    manager = JobManager(runs_dir=tmp_path / "runs", data_dir=tmp_path / "data", fit=job_fits.segfault_fit)
    job = manager.submit(RunConfig(), owner="alice")
    manager.wait(job.job_id, timeout=60)
    assert job.status == ev.FAILED
    assert "crashed (segmentation fault, signal 11, SIGSEGV)" in job.message, job.message
    assert manager.running() == []


def test_an_error_that_escapes_fit_fails_the_run_with_its_reason(tmp_path):
    manager = JobManager(runs_dir=tmp_path / "runs", data_dir=tmp_path / "data", fit=job_fits.raising_fit)
    job = manager.submit(RunConfig(), owner="alice")
    manager.wait(job.job_id, timeout=60)
    assert job.status == ev.FAILED
    assert job.message == "internal error: RuntimeError: a bug outside fit's own error handling"


def test_a_failing_listener_is_logged_and_the_run_goes_on(tmp_path):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("classifier_lab.jobs")
    logger.addHandler(handler)
    manager = JobManager(runs_dir=tmp_path / "runs", data_dir=tmp_path / "data", fit=job_fits.fit_until_released)
    manager.add_listener(lambda job, event: 1 / 0)
    job_fits.release(tmp_path / "runs")
    try:
        job = manager.submit(RunConfig(), owner="alice")
        manager.wait(job.job_id, timeout=60)
    finally:
        logger.removeHandler(handler)
    assert job.status == ev.FINISHED
    failures = [r for r in records if "listener" in r.getMessage()]
    assert failures and failures[0].exc_info[0] is ZeroDivisionError


def test_shutdown_ends_a_process_that_does_not_stop(tmp_path):
    manager = JobManager(runs_dir=tmp_path / "runs", data_dir=tmp_path / "data", fit=job_fits.stubborn_fit)
    job = manager.submit(RunConfig(), owner="alice")
    while job.status != ev.RUNNING:
        time.sleep(0.02)
    manager.shutdown(timeout=0.2)
    assert job.status == ev.INTERRUPTED and "server shut down" in job.message
    assert not job._process.is_alive()
    with pytest.raises(ConfigError, match="shut down"):
        manager.submit(RunConfig(), owner="alice")


def test_a_fit_the_child_cannot_receive_is_refused_at_once(tmp_path):
    def local_fit(config, on_event, should_stop, **kwargs):
        pass

    with pytest.raises(TypeError, match="module-level function"):
        JobManager(runs_dir=tmp_path, fit=local_fit)


@pytest.mark.parametrize("exitcode, words", [
    (-signal.SIGKILL, "killed (signal 9, SIGKILL), most likely because the system ran out of memory. Lower the batch size."),
    (-signal.SIGSEGV, "crashed (segmentation fault, signal 11, SIGSEGV)"),
    (-signal.SIGBUS, "shared memory in /dev/shm"),
    (-signal.SIGABRT, "crashed (aborted, signal 6, SIGABRT)"),
    (-signal.SIGTERM, "terminated (signal 15, SIGTERM)"),
    (-signal.SIGUSR1, "ended by signal 10 (SIGUSR1)"),
    (3, "exited with code 3 before reporting a result"),
    (0, "ended without a final status"),
])
def test_how_a_dead_training_process_is_described(exitcode, words):
    assert words in describe_exit(exitcode)


def test_describe_exit_puts_the_batch_advice_after_an_out_of_memory_kill():
    text = describe_exit(-signal.SIGKILL, "Try a smaller batch: batch 64 fits in what is free now (2.0 GiB).")
    assert text.endswith("ran out of memory. Try a smaller batch: batch 64 fits in what is free now (2.0 GiB).")


# ---- admission by memory ---------------------------------------------------------------------
def test_a_run_that_cannot_fit_is_refused_before_it_is_queued(tmp_path, tiny_config):
    """tiny_folder: 3 classes of 32×32 RGB images. The cap is what batch 8 needs, so batch 16 is
    refused naming batch 8, and batch 8 is admitted and trains."""
    tiny_config.epochs = 1
    tiny_config.data.batch_size = 8
    cap = resources.training_memory(tiny_config, 3, [3, 32, 32], "cpu")
    tiny_config.data.batch_size = 9
    assert resources.training_memory(tiny_config, 3, [3, 32, 32], "cpu") > cap
    manager = JobManager(runs_dir=tmp_path, max_jobs=1, max_job_memory=cap)
    tiny_config.data.batch_size = 16
    with pytest.raises(ConfigError) as refused:
        manager.submit(tiny_config, owner="alice")
    text = str(refused.value)
    assert text.startswith("This run needs about ") and "(tutorial_net, batch 16, 32×32)" in text
    assert "per training run (--max-job-memory)" in text and "Batch 8 fits; lower the batch size" in text
    assert manager.jobs() == [] and list(tmp_path.iterdir()) == []
    tiny_config.data.batch_size = 8
    job = manager.submit(tiny_config, owner="alice")
    manager.wait(job.job_id, timeout=120)
    assert job.status == ev.FINISHED, job.message


def test_the_memory_check_counts_gradient_accumulation(tmp_path, tiny_config):
    """Issue 16: the Train tab's Start checks the run's memory with its accumulation steps. ResNet-18
    (small stem, 32×32, batch 16) needs about 10 % more from the 2nd micro-batch of a group on (the
    gradients are held through forward and backward): a cap that fits the plain run refuses it
    accumulated, and names a smaller batch that fits accumulated. Nothing trains here."""
    tiny_config.model.name, tiny_config.model.small_input_stem = "resnet18", True
    plain = resources.training_memory(tiny_config, 3, [3, 32, 32], "cpu")
    tiny_config.optim.accumulation_steps = 2
    accumulated = resources.training_memory(tiny_config, 3, [3, 32, 32], "cpu")
    assert accumulated > plain * 1.05
    manager = JobManager(runs_dir=tmp_path, max_jobs=1, max_job_memory=plain)
    with pytest.raises(ConfigError) as refused:
        manager.check_fits(tiny_config, now=True)
    fits = int(str(refused.value).split(" Batch ")[1].split()[0])
    assert 1 <= fits < 16
    assert resources.largest_fitting_batch(tiny_config, 3, [3, 32, 32], plain, "cpu", limit=16) == fits
    tiny_config.optim.accumulation_steps = 1
    manager.check_fits(tiny_config, now=True)   # the plain run is admitted under the same cap


def test_a_refused_plain_run_is_offered_a_batch_that_fits_accumulated(tmp_path, tiny_config):
    """The refusal of a run without accumulation names the batch that fits as it is, and the batch
    to pair with accumulation to keep the effective batch: that one must fit with accumulation (the
    gradients held all step long), which is less. ResNet-18 (small stem, 32×32, batch 16) under a
    cap that batch 12 fits without accumulation (it suggested batch 12 with accumulation before)."""
    tiny_config.model.name, tiny_config.model.small_input_stem = "resnet18", True
    tiny_config.data.batch_size = 12
    cap = resources.training_memory(tiny_config, 3, [3, 32, 32], "cpu")
    tiny_config.data.batch_size = 16
    manager = JobManager(runs_dir=tmp_path, max_jobs=1, max_job_memory=cap)
    with pytest.raises(ConfigError) as refused:
        manager.check_fits(tiny_config, now=True)
    text = str(refused.value)
    assert "Batch 12 fits; lower the batch size" in text
    batch = int(text.split("use batch ")[1].split()[0])
    steps = int(text.split("gradient accumulation over ")[1].split()[0])
    assert 1 <= batch < 12 and steps == -(-16 // batch) >= 2
    assert "the gradients are held all step long, so less fits" in text
    tiny_config.data.batch_size, tiny_config.optim.accumulation_steps = batch, steps
    manager.check_fits(tiny_config, now=True)   # what it suggests is admitted under the same cap
    tiny_config.data.batch_size = batch + 1
    with pytest.raises(ConfigError):   # and it is the largest such batch
        manager.check_fits(tiny_config, now=True)


def test_a_run_the_memory_check_cannot_size_is_admitted(tmp_path, tiny_config):
    """A dataset that is not there cannot be sized: the run is queued and says what is wrong itself."""
    tiny_config.data.location = str(tmp_path / "nope")
    manager = JobManager(runs_dir=tmp_path, max_jobs=1, max_job_memory=1)
    job = manager.submit(tiny_config, owner="alice")
    manager.wait(job.job_id, timeout=60)
    assert job.status == ev.FAILED and "nope" in job.message


def test_each_child_trains_with_the_threads_it_is_given(tmp_path, tiny_config):
    """A class server leaves a core to the pages (launch.py --train-threads, default_train_threads)."""
    import torch
    manager = JobManager(runs_dir=tmp_path, max_jobs=1, fit=job_fits.threads_fit, train_threads=1)
    try:
        job = manager.submit(tiny_config, owner="alice")
        manager.wait(job.job_id, timeout=60)
        assert job.message == "1 threads"
        manager.train_threads = None   # as many as the server's own torch
        job = manager.submit(tiny_config, owner="alice")
        manager.wait(job.job_id, timeout=60)
        assert job.message == f"{torch.get_num_threads()} threads"
    finally:
        manager.shutdown(timeout=10)
    with pytest.raises(ConfigError, match="train_threads must be at least 1"):
        JobManager(runs_dir=tmp_path, train_threads=0)


def test_two_resumes_of_one_run_at_the_same_moment_queue_it_once(tmp_path, monkeypatch):
    """The "already running or queued" check and the queueing are one step: two Resume clicks
    that both pass a slow memory check must not queue the run twice."""
    import threading

    from core.jobs import Job

    manager = JobManager(runs_dir=tmp_path / "runs", data_dir=tmp_path / "data", fit=job_fits.fit_until_released)
    monkeypatch.setattr(manager, "check_fits", lambda config: time.sleep(0.3))
    last = tmp_path / "runs" / "20250101-000000-tutorial_net-abcdef" / "last.pth"
    results = []

    def resume():
        try:
            results.append(manager.submit(RunConfig(), owner="alice", resume_from=last))
        except ConfigError as err:
            results.append(err)

    threads = [threading.Thread(target=resume) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    job_fits.release(tmp_path / "runs")
    jobs = [r for r in results if isinstance(r, Job)]
    refused = [r for r in results if isinstance(r, ConfigError)]
    assert len(jobs) == 1 and len(refused) == 1, results
    assert "already running or queued" in str(refused[0])
    manager.wait(jobs[0].job_id, timeout=60)
    assert jobs[0].status == ev.FINISHED
    assert manager.jobs() == jobs


def test_work_that_starts_now_counts_no_running_job_memory_as_free(tmp_path, tiny_config, monkeypatch):
    """A run that waits for the busy slot starts after the running one, so that one's memory counts
    as free for it; the LR finder runs at once beside it (check_fits(now=True)), so it does not."""
    manager = JobManager(runs_dir=tmp_path / "runs", data_dir=tmp_path / "data", max_jobs=1,
                         fit=job_fits.fit_until_released)
    seen = []
    monkeypatch.setattr(manager, "_free_memory", lambda device_type, will_wait: seen.append(will_wait))
    try:
        job = manager.submit(tiny_config, owner="alice")   # the slot was free: nothing to wait for
        manager.check_fits(tiny_config)                     # a second run would wait for the slot
        manager.check_fits(tiny_config, now=True)           # the finder would not
        assert seen == [False, True, False]
    finally:
        job_fits.release(tmp_path / "runs")
        manager.wait(job.job_id, timeout=60)
        manager.shutdown(timeout=10)
