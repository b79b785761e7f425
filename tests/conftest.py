"""Shared fixtures. Tests run offline on real images: the embedded CIFAR-10 sample in assets/,
the shared CIFAR-10 subset beside the project (../shared/data), or files a test writes."""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest

# No test may reach the network: gradio_client and huggingface_hub phone home unless told not to.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_ZIP = ROOT / "assets" / "cifar10-sample.zip"
SHARED_ZIP = ROOT.parent / "shared" / "data" / "cifar10-jpg-mini.zip"


def pytest_configure(config):
    import torch

    # 2-core machines: one intra-op thread per test process keeps the suite predictable.
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def sample_zip() -> Path:
    return SAMPLE_ZIP


@pytest.fixture(scope="session")
def shared_zip() -> Path:
    if not SHARED_ZIP.exists():
        pytest.skip(f"shared CIFAR-10 subset not found at {SHARED_ZIP}")
    return SHARED_ZIP


@pytest.fixture(scope="session")
def session_data_dir(tmp_path_factory) -> Path:
    """A data directory shared by the whole test session (the embedded sample is extracted once)."""
    return tmp_path_factory.mktemp("data")


TINY_CLASSES = ("airplane", "cat", "ship")


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """A small real dataset cut from the embedded sample: 3 classes, 40 train + 10 test images each,
    in the ImageFolder layout with train/ and test/ folders (trains in about a second on a CPU)."""
    import zipfile

    root = tmp_path_factory.mktemp("tiny") / "tiny"
    with zipfile.ZipFile(SAMPLE_ZIP) as zf:
        names = sorted(zf.namelist())
        for split, keep in (("train", 40), ("test", 10)):
            for cls in TINY_CLASSES:
                prefix = f"cifar10-sample/{split}/{cls}/"
                files = [n for n in names if n.startswith(prefix) and n.endswith(".jpg")][:keep]
                out = root / split / cls
                out.mkdir(parents=True)
                for n in files:
                    (out / Path(n).name).write_bytes(zf.read(n))
    return root


@pytest.fixture
def tiny_config(tiny_folder):
    """A RunConfig that trains the tutorial net on ``tiny_folder`` for 2 epochs on the CPU."""
    from core.config import RunConfig

    return RunConfig.from_dict({
        "data": {"source": "folder", "location": str(tiny_folder), "batch_size": 16},
        "model": {"name": "tutorial_net"},
        "optim": {"lr": 0.01},
        "epochs": 2, "device": "cpu", "seed": 1,
    })


@pytest.fixture(scope="session")
def tiny_zip(tiny_folder, tmp_path_factory) -> Path:
    """The ``tiny_folder`` fixture (3 classes, 120 train + 30 test images) as an upload."""
    path = tmp_path_factory.mktemp("zips") / "tiny.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for f in sorted(tiny_folder.rglob("*.jpg")):
            zf.write(f, f"tiny/{f.relative_to(tiny_folder).as_posix()}")
    return path
