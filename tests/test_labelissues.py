"""core.labelissues on real images: planted label flips in a part of the shared CIFAR-10 subset are
ranked high, every image's probabilities come from a model that did not train on it, a seed gives
the same ranking, the frozen-features path runs from a weights file on disk, and bad input gets a
LabError saying what to change."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core import labelissues as li
from core.datasets import _copy_dataset, load_dataset
from core.errors import ConfigError, DataError, MissingFileError

CLASSES = ("airplane", "frog", "truck")      # three classes a small CNN tells apart in seconds
PER_CLASS = 60


@pytest.fixture(scope="module")
def mini(shared_zip, tmp_path_factory):
    return load_dataset("zip", shared_zip, data_dir=tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def planted(mini):
    """(noisy dataset copy, examined indices, set of flipped indices): 60 training images of each of
    three classes, 10 % of them given a seeded random other class of the three."""
    keep = [mini.classes.index(c) for c in CLASSES]
    train = mini.splits["train"]
    idx = [i for c in keep for i in [j for j in train if mini.targets[j] == c][:PER_CLASS]]
    rng = np.random.default_rng(7)
    flips = rng.choice(idx, size=len(idx) // 10, replace=False)
    noisy = _copy_dataset(mini)
    for i in flips:
        others = [c for c in keep if c != mini.targets[i]]
        noisy.targets[int(i)] = int(others[rng.integers(len(others))])
    return noisy, idx, {int(i) for i in flips}


def _find(planted, **kw):
    noisy, idx, _ = planted
    kw = {"folds": 3, "method": "cnn", "seed": 0, "epochs": 20, **kw}
    return li.find_label_issues(noisy, idx, **kw)


@pytest.fixture(scope="module")
def result(planted):
    return _find(planted, splits={i: "train" for i in planted[1]})


def test_planted_flips_rank_high_and_most_flagged_are_flips(planted, result):
    _, idx, flips = planted
    r = result.ranking
    top = set(r["index"][:2 * len(flips)])
    assert len(top & flips) >= 0.7 * len(flips)            # most flips among the first 2×(their number)
    flagged = set(result.flagged()["index"])
    by_cleanlab = set(r.loc[r["cleanlab"], "index"])
    assert flagged <= by_cleanlab                          # the lab's cut only narrows cleanlab's issues
    assert len(by_cleanlab & flips) >= 0.7 * len(flips)    # most flips are among cleanlab's issues
    assert len(flagged & flips) >= 0.5 * len(flips)        # and at least half survive the cut
    assert len(flagged & flips) >= 2.5 * 0.1 * len(flagged)   # flips are 10 %: the flagged far above that
    assert set(r["index"][:len(flagged)]) == flagged       # the flagged are the top of the ranking
    # every examined image once, the documented columns, most suspicious first
    assert sorted(r["index"]) == sorted(idx)
    assert list(r.columns[:9]) == ["index", "file", "split", "given", "suggested", "given_prob",
                                   "suggested_prob", "quality", "flagged"]
    assert r["quality"].is_monotonic_increasing
    assert set(r["split"]) == {"train"} and set(r["given"]) <= set(CLASSES)
    assert r["file"].iloc[0].startswith("train/")
    assert 0.5 < result.oos_accuracy <= 1 and result.folds == 3
    assert "3-fold cross-validation of a small CNN" in result.method


def test_a_flipped_images_suggestion_is_mostly_its_true_class(mini, planted, result):
    _, _, flips = planted
    rows = result.ranking[result.ranking["index"].isin(flips)]
    true = [mini.classes[mini.targets[i]] for i in rows["index"]]
    assert np.mean(rows["suggested"].to_numpy() == np.asarray(true)) >= 0.6


def test_probabilities_are_out_of_sample(planted, monkeypatch):
    """The model that predicts an image never trained on it: each fold's model trains on exactly the
    other folds' images, and the predicted parts cover every image once (the ranking's fold column)."""
    noisy, idx, _ = planted
    calls = []
    real_train, real_predict = li._train_fold, li._predict

    def train(data, train_pos, *a, **k):
        calls.append(("train", set(train_pos.tolist())))
        return real_train(data, train_pos, *a, **k)

    def predict(model, data, held):
        calls.append(("held", set(held.tolist())))
        return real_predict(model, data, held)

    monkeypatch.setattr(li, "_train_fold", train)
    monkeypatch.setattr(li, "_predict", predict)
    res = li.find_label_issues(noisy, idx, folds=3, method="cnn", epochs=1)
    trains = [s for kind, s in calls if kind == "train"]
    helds = [s for kind, s in calls if kind == "held"]
    assert len(trains) == len(helds) == 3
    for tr, held in zip(trains, helds):
        assert not tr & held and len(tr | held) == len(idx)
    assert sorted(p for h in helds for p in h) == list(range(len(idx)))
    by_index = dict(zip(res.ranking["index"], res.ranking["fold"]))
    for k, held in enumerate(helds):
        assert {by_index[idx[p]] for p in held} == {k}
    # stratified: each fold holds about a third of each class
    counts = res.ranking.groupby(["given", "fold"]).size().unstack()
    assert (counts.min(axis=1) >= counts.max(axis=1) - 2).all()


def test_a_seed_gives_the_same_ranking(planted, result):
    again = _find(planted, splits={i: "train" for i in planted[1]})
    pd.testing.assert_frame_equal(again.ranking, result.ranking)
    other = _find(planted, seed=1, epochs=1)
    folds = lambda res: res.ranking.set_index("index")["fold"].sort_index()   # noqa: E731
    assert not folds(other).equals(folds(result))          # another seed, other folds


def test_round_trip_and_csv(result, tmp_path):
    back = li.LabelIssues.from_dict(result.to_dict())
    pd.testing.assert_frame_equal(back.ranking, result.ranking, check_dtype=False)
    assert back.method == result.method and back.notes == result.notes
    result.to_csv(tmp_path / "r.csv")
    csv = pd.read_csv(tmp_path / "r.csv")
    assert list(csv["index"]) == list(result.ranking["index"])
    assert "look mislabelled" in result.summary()


def test_progress_goes_forward_to_one(planted):
    seen = []
    _find(planted, epochs=1, progress=lambda f, t: seen.append((f, t)))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any("Fold 2 of 3" in t for _, t in seen)


def test_max_seconds_plans_the_epochs_and_says_so(planted):
    res = _find(planted, epochs=None, max_seconds=0.5)
    assert any("Time limit" in n and "1 epochs per fold" in n for n in res.notes)


def _write_resnet18_weights(folder):
    """A random resnet18 state dict saved under the name torchvision's ImageNet file has."""
    import torch
    import torchvision

    from core.models import pretrained_status

    name = pretrained_status("resnet18", folder).file_name
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), folder / name)


def test_features_path_runs_from_a_weights_file_on_disk(planted, tmp_path, monkeypatch):
    monkeypatch.setattr(li, "FEATURE_SIZE", 64)
    _write_resnet18_weights(tmp_path)
    noisy, idx, _ = planted
    res = li.find_label_issues(noisy, idx[::2], folds=3, method="auto", weights_dir=tmp_path)
    assert res.method == "3-fold cross-validation of frozen resnet18 features + linear head"
    assert len(res.ranking) == len(idx[::2]) and res.ranking["quality"].is_monotonic_increasing
    assert any("resnet18 (ImageNet weights, frozen) at 64 px, 512 per image" in n for n in res.notes)


def test_features_without_a_weights_file_says_where_to_put_it(planted, tmp_path):
    noisy, idx, _ = planted
    with pytest.raises(MissingFileError, match="method 'cnn'") as err:
        li.find_label_issues(noisy, idx, folds=3, method="features", weights_dir=tmp_path)
    assert err.value.folder == str(tmp_path)


def test_bad_input_gets_a_clear_error(planted):
    noisy, idx, _ = planted
    one_class = [i for i in idx if noisy.targets[i] == noisy.targets[idx[0]]]
    with pytest.raises(DataError, match="at least 2 classes"):
        li.find_label_issues(noisy, one_class, folds=3)
    few = idx[:3] + idx[-3:]    # fewer images of a class than folds
    with pytest.raises(DataError, match="at least 5 images of each class"):
        li.find_label_issues(noisy, few)
    with pytest.raises(DataError, match="same index twice"):
        li.find_label_issues(noisy, idx + idx[:1], folds=3)
    with pytest.raises(DataError, match="out of range"):
        li.find_label_issues(noisy, idx + [len(noisy)], folds=3)
    with pytest.raises(DataError, match="No images"):
        li.find_label_issues(noisy, [], folds=3)
    with pytest.raises(ConfigError, match="method must be one of auto, features, cnn"):
        li.find_label_issues(noisy, idx, method="magic")
    with pytest.raises(ConfigError, match="folds must be"):
        li.find_label_issues(noisy, idx, folds=1)
    with pytest.raises(ConfigError, match="max_seconds"):
        li.find_label_issues(noisy, idx, folds=3, max_seconds=-1)
