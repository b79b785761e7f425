"""Confusion-matrix cell → its test images (core/runrecord.py cell_images), on a real run."""
import shutil

import numpy as np
import pytest
from PIL import Image

from core import rundir, runrecord
from core.config import RunConfig
from core.errors import DataError
from core.trainer import fit


@pytest.fixture(scope="module")
def record(tiny_folder, tmp_path_factory):
    cfg = RunConfig.from_dict({"data": {"source": "folder", "location": str(tiny_folder), "batch_size": 16},
                               "model": {"name": "tutorial_net"}, "optim": {"lr": 0.02}, "epochs": 3,
                               "device": "cpu", "seed": 4})
    result = fit(cfg, runs_dir=tmp_path_factory.mktemp("cells"))
    assert result.status == "finished", result.message
    return runrecord.load_run(result.run_dir)


def test_every_cell_gives_its_images_most_confident_first(record, tiny_folder):
    confusion = np.array(record.eval["confusion"])
    assert confusion.trace() > 0 and confusion.sum() - confusion.trace() > 0   # right and wrong images
    preds = rundir.read_predictions(record.run_dir)
    for t in range(3):
        for p in range(3):
            items = runrecord.cell_images(record, t, p, limit=None)
            assert len(items) == confusion[t, p]
            conf = [it["confidence"] for it in items]
            assert conf == sorted(conf, reverse=True)
            for it in items:
                k = preds["index"].index(it["index"])
                assert (preds["target"][k], preds["predicted"][k]) == (t, p)
                assert it["confidence"] == preds["confidence"][k]
                assert it["file"] == record.eval["files"][str(it["index"])]
                assert it["file"].startswith(f"test/{record.eval['class_names'][t]}/")
                with Image.open(tiny_folder / it["file"]) as im:
                    assert np.array_equal(np.asarray(it["image"].convert("RGB")), np.asarray(im.convert("RGB")))


def test_cells_by_class_name_and_limit(record):
    names = record.eval["class_names"]
    by_name = runrecord.cell_images(record, names[0], names[0], limit=2)
    by_index = runrecord.cell_images(record, 0, 0, limit=2)
    assert [i["index"] for i in by_name] == [i["index"] for i in by_index] and len(by_name) <= 2
    with pytest.raises(DataError, match="not one of this run's classes: airplane, cat, ship"):
        runrecord.cell_images(record, "dog", 0)


def test_a_run_without_per_image_predictions_still_shows_its_errors(record, tmp_path):
    old = tmp_path / record.run_id
    shutil.copytree(record.run_dir, old)
    (old / rundir.PREDICTIONS_FILE).unlink()
    old_record = runrecord.load_run(old)
    confusion = np.array(record.eval["confusion"])
    t, p = np.unravel_index(np.argmax(confusion - np.diag(np.diag(confusion))), confusion.shape)
    assert [i["index"] for i in runrecord.cell_images(old_record, int(t), int(p), limit=None)] == \
        [i["index"] for i in runrecord.cell_images(record, int(t), int(p), limit=None)]
    with pytest.raises(DataError, match="only its errors"):
        runrecord.cell_images(old_record, 0, 0)


def test_the_misclassified_gallery_is_the_off_diagonal_cells(record):
    errors = int(np.array(record.eval["confusion"]).sum() - np.trace(record.eval["confusion"]))
    gallery = runrecord.misclassified_images(record, limit=100)
    assert len(gallery) == errors
    assert all(isinstance(im, Image.Image) and " → " in caption for im, caption in gallery)


def test_mistake_items_name_their_classes_and_files_like_cell_images(record):
    items = runrecord.misclassified_items(record, limit=None)
    mis = record.report().misclassified
    assert [i["index"] for i in items] == [int(s) for s in mis["sample"]]
    assert all(i["true"] != i["predicted"] for i in items)
    for item in items:   # the same image, file and numbers as its confusion-matrix cell gives
        same = [c for c in runrecord.cell_images(record, item["true"], item["predicted"], limit=None)
                if c["index"] == item["index"]]
        assert len(same) == 1
        assert {k: same[0][k] for k in ("file", "true", "predicted", "caption")} == \
            {k: item[k] for k in ("file", "true", "predicted", "caption")}
        assert same[0]["confidence"] == pytest.approx(item["confidence"], abs=1e-4)
    assert [c for _, c in runrecord.misclassified_images(record, limit=3)] == [i["caption"] for i in items[:3]]
