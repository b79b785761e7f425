"""The command line, run as a user would: a subprocess from the project root."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(*args, cwd=ROOT, timeout=300):
    return subprocess.run([sys.executable, "-m", "core.train", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def test_cli_trains_and_writes_a_run_folder(tmp_path, tiny_folder):
    proc = run("--source", "folder", "--location", str(tiny_folder), "--epochs", "1", "--batch-size", "16",
               "--device", "cpu", "--runs-dir", str(tmp_path / "runs"), "--data-dir", str(tmp_path / "data"),
               "--set", "optim.momentum=0.8", "--name", "cli test")
    assert proc.returncode == 0, proc.stderr
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    assert run_dir.parent == tmp_path / "runs"
    assert (run_dir / "best.pth").exists() and (run_dir / "eval.json").exists()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["optim"]["momentum"] == 0.8 and config["name"] == "cli test"
    assert "epoch 1/1" in proc.stderr and "test: accuracy" in proc.stderr
    # The run card: what was trained on what, where, how long, with which libraries.
    card = json.loads((run_dir / "card.json").read_text())
    assert card["run_id"] == run_dir.name and card["name"] == "cli test"
    assert card["model"]["name"] == "tutorial_net" and card["model"]["params"] > 60_000
    assert card["dataset"]["source"] == "folder" and card["dataset"]["location"] == str(tiny_folder)
    assert card["dataset"]["split_sizes"] == {"train": 105, "val": 15, "test": 30}
    assert card["seed"] == config["seed"] and card["device"] == "cpu"
    assert card["status"] == "finished" and card["sessions"] == 1 and card["duration_s"] > 0
    assert {"python", "torch", "torchvision", "numpy"} <= set(card["versions"])


@pytest.mark.slow   # a Python of its own per call
def test_cli_config_file_and_print_config(tmp_path):
    proc = run("--print-config", "--model", "resnet18", "--lr", "0.1")
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads(proc.stdout)
    assert cfg["model"]["name"] == "resnet18" and cfg["optim"]["lr"] == 0.1
    path = tmp_path / "run.json"
    path.write_text(proc.stdout)
    again = run("--print-config", "--config", str(path), "--set", "epochs=7")
    assert json.loads(again.stdout)["epochs"] == 7 and json.loads(again.stdout)["model"]["name"] == "resnet18"


@pytest.mark.slow   # a Python of its own per call; core's checks are in test_bad_input
def test_cli_rejects_bad_input_with_a_message_not_a_traceback(tmp_path):
    proc = run("--print-config", "--set", "optim.learning_rate=1")
    assert proc.returncode == 2
    assert "optim.learning_rate" in proc.stderr and "Traceback" not in proc.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    proc = run("--config", str(bad))
    assert proc.returncode == 2 and "not valid JSON" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow   # a Python of its own
def test_cli_lists_models():
    proc = run("--list-models")
    assert proc.returncode == 0 and "tutorial_net" in proc.stdout and "resnet18" in proc.stdout


@pytest.mark.slow   # a Python of its own, and a run
def test_cli_tensorboard_writes_an_event_file(tmp_path, tiny_folder):
    import pytest
    pytest.importorskip("tensorboard")
    proc = run("--source", "folder", "--location", str(tiny_folder), "--epochs", "1", "--device", "cpu",
               "--runs-dir", str(tmp_path / "runs"), "--tensorboard", "--quiet")
    assert proc.returncode == 0, proc.stderr
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    assert len(list(run_dir.rglob("events.out.tfevents.*"))) == 1, list(run_dir.iterdir())
    # --tensorboard is the configuration's field, so the run folder says it was logged.
    assert json.loads((run_dir / "config.json").read_text())["tensorboard"] is True


def test_cli_resume_follows_the_same_rule_as_the_dashboard(tmp_path, tiny_folder):
    """--resume asks core.resume: a finished run goes on only for more epochs in all, from its last
    checkpoint (the folder or its last.pth), and never from another file."""
    common = ("--device", "cpu", "--runs-dir", str(tmp_path / "runs"), "--data-dir", str(tmp_path / "data"), "--quiet")
    proc = run("--source", "folder", "--location", str(tiny_folder), "--epochs", "1", "--batch-size", "16", *common)
    assert proc.returncode == 0, proc.stderr
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    refused = run("--resume", str(run_dir), *common)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"Run {run_dir.name} finished all its 1 epoch. To train it further, ask for more epochs" in refused.stderr
    refused = run("--resume", str(run_dir / "best.pth"), "--epochs", "2", *common)
    assert refused.returncode == 2 and "--resume takes a run folder or its last.pth, not best.pth" in refused.stderr
    proc = run("--resume", str(run_dir / "last.pth"), "--epochs", "2", *common)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip().splitlines()[-1]) == run_dir
    assert "epoch 2/2" in proc.stderr and "epoch 1/2" not in proc.stderr
