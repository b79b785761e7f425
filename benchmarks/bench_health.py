"""Data health speed: python benchmarks/bench_health.py [PATH]

Without PATH: builds 10,000 image files in a temporary folder from the shared CIFAR-10 subset
(../shared/data/cifar10-jpg-mini.zip: all 6,000, plus 4,000 copies re-encoded at JPEG quality 70 or
resized to 48×48 and saved as PNG) and runs core.health.check_health on them. With PATH: an image
folder (ImageFolder layout, optionally train/ val/ test/) or a folder holding the CIFAR-10 python
layout (cifar-10-batches-py). Prints images, seconds, images/s and what was found; no assertions.
"""
from __future__ import annotations

import io
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED_ZIP = ROOT.parent / "shared" / "data" / "cifar10-jpg-mini.zip"


def build(folder: Path, total: int = 10_000) -> Path:
    with zipfile.ZipFile(SHARED_ZIP) as zf:
        names = sorted(n for n in zf.namelist() if n.endswith(".jpg"))
        zf.extractall(folder, members=names)
        root = folder / "cifar10-mini"
        for k, n in enumerate(names[: total - len(names)]):
            im = Image.open(io.BytesIO(zf.read(n))).convert("RGB")
            dst = root / Path(n).relative_to("cifar10-mini")
            if k % 2:
                im.save(dst.with_name(f"copy-{dst.stem}.jpg"), quality=70)
            else:
                im.resize((48, 48), Image.BICUBIC).save(dst.with_name(f"copy-{dst.stem}.png"))
    return root


def load(path: Path):
    from core.datasets import load_dataset
    if (path / "cifar-10-batches-py").is_dir():
        return load_dataset("torchvision", "CIFAR10", data_dir=path)
    return load_dataset("folder", path)


def main() -> None:
    from core.health import check_health
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(sys.argv[1]) if len(sys.argv) > 1 else build(Path(tmp))
        t = time.perf_counter()
        ds = load(path)
        loaded = time.perf_counter() - t
        t = time.perf_counter()
        report = check_health(ds)
        seconds = time.perf_counter() - t
    c = report.counts()
    print(f"dataset        {ds.name} ({path})")
    print(f"load (scan)    {loaded:.1f} s (not part of the check)")
    print(f"images         {report.images:,}")
    print(f"seconds        {seconds:.1f}")
    print(f"images/s       {report.images / seconds:,.0f}")
    print(f"found          {c['exact_pairs']:,} exact pairs, {c['near_pairs']:,} near pairs, {c['leak_pairs']:,} "
          f"leak pairs, {c['outliers']:,} outliers")


if __name__ == "__main__":
    main()
