"""Prediction from a trained run: top-k, any image form, TTA, batches, and bad input."""
import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from core import events as ev
from core.errors import DataError
from core.inference import Predictor, find_checkpoint
from core.trainer import fit


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_folder):
    from core.config import RunConfig
    cfg = RunConfig.from_dict({"data": {"source": "folder", "location": str(tiny_folder), "batch_size": 16},
                               "model": {"name": "tutorial_net"}, "epochs": 3, "device": "cpu", "seed": 0,
                               "optim": {"lr": 0.02}})
    result = fit(cfg, runs_dir=tmp_path_factory.mktemp("runs"))
    assert result.status == ev.FINISHED, result.message
    return result


def test_top_k_is_sorted_sums_to_one_and_matches_the_run_classes(trained_run, tiny_folder):
    p = Predictor.from_run(trained_run.run_dir)
    assert p.classes == ["airplane", "cat", "ship"]
    image = next((tiny_folder / "test" / "ship").glob("*.jpg"))
    top = p.predict(image, topk=5)
    assert len(top) == 3                      # k is clipped to the number of classes
    probs = [q for _, q in top]
    assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-5)


def test_predictions_agree_with_the_runs_own_test_evaluation(trained_run, tiny_folder):
    """The Predictor's preprocessing is the training eval transform: its test accuracy must equal
    the accuracy the trainer measured on the same test images."""
    import json
    report = json.loads((trained_run.run_dir / "eval.json").read_text())
    p = Predictor(trained_run.run_dir / "best.pth")
    files = sorted((tiny_folder / "test").rglob("*.jpg"))
    df = p.predict_many(files, names=[f.parent.name for f in files])
    acc = float((df["prediction"] == df["image"]).mean())
    assert acc == pytest.approx(report["accuracy"], abs=1e-9)


def test_any_image_form_and_mode_is_accepted(trained_run, tiny_folder):
    p = Predictor.from_run(trained_run.run_dir)
    path = next((tiny_folder / "test" / "cat").glob("*.jpg"))
    rgb = Image.open(path).convert("RGB")
    expected = p.predict(path)[0][0]
    big = rgb.resize((300, 200))                       # any size: resized by the eval transform
    gray16 = Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)   # a 16-bit image
    buf = io.BytesIO()
    rgb.convert("RGBA").save(buf, format="PNG")
    for form in (rgb, np.asarray(rgb), buf.getvalue(), str(path), big, gray16, rgb.convert("P")):
        assert p.predict(form)[0][0] in p.classes
    assert p.predict(rgb)[0][0] == expected


def test_test_time_augmentation_averages_crops(trained_run, tiny_folder):
    p = Predictor.from_run(trained_run.run_dir)
    path = next((tiny_folder / "test" / "airplane").glob("*.jpg"))
    plain = p.probabilities([path])[0]
    for kind in ("five", "ten"):
        tta = p.probabilities([path], tta=kind)[0]
        assert tta.sum() == pytest.approx(1.0, abs=1e-5)
        assert not np.allclose(tta, plain)            # several views, not the plain image again
    with pytest.raises(DataError, match="five"):
        p.predict(path, tta="twenty")


def test_five_crop_tta_is_the_mean_softmax_of_the_five_crops(trained_run, tiny_folder):
    """By hand: the 32 px image resized to 32 / 0.875 = 37 px, its four corner crops and its centre
    crop at 32 px, each normalised as the run was, through the predictor's model; TTA must give
    the mean of their softmax."""
    import torch
    from torchvision.transforms.v2 import functional as F
    p = Predictor.from_run(trained_run.run_dir)
    assert p.input_shape == (3, 32, 32)
    path = next((tiny_folder / "test" / "ship").glob("*.jpg"))
    image = Image.open(path).convert("RGB")
    assert image.size == (32, 32)
    big = F.resize(image, [37, 37])                    # bilinear with antialias, as the eval Resize
    corners = [F.crop(big, top, left, 32, 32) for top, left in ((0, 0), (0, 5), (5, 0), (5, 5))]
    crops = corners + [F.center_crop(big, [32, 32])]
    norm = p.transform_state["normalization"]
    mean = torch.tensor(norm["mean"]).view(3, 1, 1)
    std = torch.tensor(norm["std"]).view(3, 1, 1)
    x = torch.stack([(torch.from_numpy(np.array(c)).permute(2, 0, 1).float() / 255 - mean) / std for c in crops])
    with torch.no_grad():
        expected = torch.softmax(p.model(x), dim=1).mean(0).numpy()
    got = p.probabilities([path], tta="five")[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    assert not np.allclose(got, p.probabilities([path])[0], atol=1e-4)   # the crops matter


def test_a_folder_in_batches_and_unreadable_files_reported_per_row(trained_run, tiny_folder, tmp_path):
    p = Predictor.from_run(trained_run.run_dir)
    (tmp_path / "ok").mkdir()
    for f in list((tiny_folder / "test" / "ship").glob("*.jpg"))[:5]:
        (tmp_path / "ok" / f.name).write_bytes(f.read_bytes())
    (tmp_path / "ok" / "broken.png").write_bytes(b"not an image at all")
    df = p.predict_folder(tmp_path / "ok", batch_size=2)
    assert len(df) == 6
    broken = df[df["image"] == "broken.png"].iloc[0]
    assert "broken.png" in broken["error"] and pd.isna(broken["prediction"])
    assert (df[df["error"] == ""]["probability"] > 0).all()


def test_bad_checkpoints_and_images_give_clear_messages(trained_run, tmp_path):
    with pytest.raises(DataError, match="no checkpoint"):
        find_checkpoint(tmp_path)
    junk = tmp_path / "junk.pth"
    junk.write_text("hello")
    with pytest.raises(DataError, match="junk.pth"):
        Predictor(junk)
    p = Predictor.from_run(trained_run.run_dir)
    with pytest.raises(DataError, match="cannot be read as an image"):
        p.predict(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DataError, match="does not exist"):
        p.predict(str(tmp_path / "missing.jpg"))
