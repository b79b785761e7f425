"""Build the embedded sample (assets/cifar10-sample.zip) and the Predict examples (assets/examples/)
from the shared CIFAR-10 subset.

    python scripts/make_sample.py [--source ../shared/data/cifar10-jpg-mini.zip]

The sample keeps the first TRAIN_PER_CLASS train and TEST_PER_CLASS test images of every class in
the ImageFolder layout ``cifar10-sample/{train,test}/<class>/NNNN.jpg`` (about 2.3 MB: each
32x32 JPEG is ~0.9 KB). The examples are test images that are *not* in the sample, one per class,
so a prediction on them is a prediction on unseen data.
"""
from __future__ import annotations

import argparse
import zipfile
from pathlib import Path

TRAIN_PER_CLASS = 200  # enough for the tutorial net to beat chance clearly in a few CPU epochs
TEST_PER_CLASS = 50    # 500 test images: accuracy is known to about ±2 %
ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=str(ROOT.parent / "shared/data/cifar10-jpg-mini.zip"))
    args = parser.parse_args()
    src = zipfile.ZipFile(args.source)
    by_dir: dict[tuple[str, str], list[str]] = {}
    for name in sorted(src.namelist()):
        parts = name.split("/")
        if len(parts) == 4 and parts[3].endswith(".jpg"):
            by_dir.setdefault((parts[1], parts[2]), []).append(name)
    out = ROOT / "assets/cifar10-sample.zip"
    examples = ROOT / "assets/examples"
    examples.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:  # JPEGs do not compress further
        for (split, cls), names in sorted(by_dir.items()):
            keep = TRAIN_PER_CLASS if split == "train" else TEST_PER_CLASS
            for name in names[:keep]:
                dst.writestr(f"cifar10-sample/{split}/{cls}/{Path(name).name}", src.read(name))
            if split == "test":
                (examples / f"{cls}.jpg").write_bytes(src.read(names[keep]))
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB) and {len(list(examples.glob('*.jpg')))} examples")


if __name__ == "__main__":
    main()
