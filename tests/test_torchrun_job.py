"""Issue 17: "use all GPUs" runs the job through torchrun in its own process group; progress,
events and Stop work as for any run. Checked here on the CPU with 2 Gloo processes
(JobManager(cpu_processes=2)), the path a machine with several GPUs takes with NCCL."""
from __future__ import annotations

import time

import pytest

from core import events as ev
from core.config import RunConfig
from core.errors import ConfigError
from core.jobs import JobManager


def _config(tiny_folder, epochs: int) -> RunConfig:
    return RunConfig.from_dict({"data": {"source": "folder", "location": str(tiny_folder), "batch_size": 16},
                                "model": {"name": "tutorial_net"}, "optim": {"lr": 0.02}, "epochs": epochs,
                                "device": "cpu", "seed": 1, "multi_gpu": True})


@pytest.fixture
def manager(tmp_path):
    m = JobManager(runs_dir=tmp_path / "runs", data_dir=tmp_path / "data", max_jobs=1, cpu_processes=2)
    yield m
    m.shutdown(timeout=60)


def test_a_multi_process_job_reports_like_any_run(manager, tiny_folder):
    job = manager.submit(_config(tiny_folder, 2), owner="browser:a")
    manager.wait(job.job_id, timeout=240)
    assert job.status == ev.FINISHED, job.message
    kinds = [e.kind for e in job.events]
    assert kinds.count("EpochEnded") == 2 and "Evaluated" in kinds and kinds[-1] == "RunFinished"
    started = next(e for e in job.events if isinstance(e, ev.RunStarted))
    assert any("2 processes × 8" in n for n in started.notes), started.notes
    run_dir = manager.runs_dir / job.job_id
    assert (run_dir / "last.pth").is_file() and (run_dir / "eval.json").is_file()


def test_stop_ends_every_process_with_a_checkpoint(manager, tiny_folder):
    job = manager.submit(_config(tiny_folder, 200), owner="browser:a")
    deadline = time.time() + 180
    while not any(isinstance(e, ev.EpochEnded) for e in job.events):
        assert time.time() < deadline and not job.done, job.message
        time.sleep(0.2)
    manager.stop(job.job_id)
    manager.wait(job.job_id, timeout=120)
    assert job.status == ev.STOPPED, job.message
    assert (manager.runs_dir / job.job_id / "last.pth").is_file()
    assert sum(isinstance(e, ev.EpochEnded) for e in job.events) < 200


def test_a_class_server_refuses_use_all_gpus(tmp_path, tiny_folder):
    """Served to a class (launch.py on a non-loopback host), one student's run on every GPU would take
    them from the others: the manager refuses it before queueing, and says what to do."""
    m = JobManager(runs_dir=tmp_path / "runs", data_dir=tmp_path / "data", max_jobs=1, multi_gpu_jobs=False)
    try:
        with pytest.raises(ConfigError, match="Use all GPUs is off on this server"):
            m.submit(_config(tiny_folder, 1), owner="browser:student")
        assert m.jobs() == []
    finally:
        m.shutdown(timeout=10)
