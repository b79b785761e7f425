"""Dataset revisions (core/revisions.py): non-destructive label decisions on real images (a copy of
the tiny_folder fixture cut from the embedded CIFAR-10 sample), applied at training time."""
from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core import datasets, revisions
from core.errors import ConfigError
from core.identity import Who


def _hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def tiny_copy(tiny_folder, tmp_path) -> Path:
    """A private copy of tiny_folder (tests change or delete its files)."""
    dest = tmp_path / "tiny"
    shutil.copytree(tiny_folder, dest)
    return dest


@pytest.fixture
def data_dir(tmp_path) -> Path:
    return tmp_path / "data"


def _load(folder: Path, data_dir: Path):
    return datasets.load_dataset("folder", str(folder), data_dir=data_dir)


def _split(ds):
    return datasets.split_dataset(ds, val_fraction=0.1, test_fraction=0.1, seed=0)


def _other_class(ds, i: int) -> str:
    return next(c for c in ds.classes if c != ds.classes[ds.targets[i]])


# ---- the action log ----------------------------------------------------------------------------
def test_round_trip_undo_and_immutable_refs(tiny_copy, data_dir):
    before = _hashes(tiny_copy)
    ds = _load(tiny_copy, data_dir)
    rev = revisions.create_revision(ds, data_dir, owner="user:ann")
    assert rev.name == "cleaned 1" and revisions.ID_RE.fullmatch(rev.id) and rev.version == 0
    rev.relabel(ds, 0, _other_class(ds, 0), split="train")
    rev.remove(ds, 1, split="train")
    rev.keep(ds, 2)
    rev.relabel(ds, 3, 0 if ds.targets[3] != 0 else 1)      # a class index works too
    rev.save(data_dir)
    ref4, frozen = rev.ref(), rev.decisions()
    assert ref4 == f"{rev.id}@4" and set(frozen) == {ds.describe(i) for i in range(4)}
    assert frozen[ds.describe(1)]["op"] == "remove" and frozen[ds.describe(1)]["hash"] == \
        revisions.content_hash(ds, 1)

    undone = [rev.undo(), rev.undo()]                       # the relabel of 3, then the keep of 2
    assert [u["file"] for u in undone] == [ds.describe(3), ds.describe(2)]
    rev.keep(ds, 0)                                         # overrides the relabel of 0...
    assert rev.decisions()[ds.describe(0)]["op"] == "keep"
    assert rev.undo()["op"] == "keep"                       # ...and its undo brings the relabel back
    assert rev.decisions()[ds.describe(0)]["op"] == "relabel"
    rev.save(data_dir)

    loaded, version = revisions.load_revision(rev.id, data_dir)
    assert version == loaded.version == rev.version == 8
    assert loaded.decisions() == rev.decisions() and set(loaded.decisions()) == {ds.describe(0), ds.describe(1)}
    again, v4 = revisions.load_revision(ref4, data_dir)
    assert v4 == 4 and again.decisions(version=4) == frozen  # id@4 is what it was, after four more actions
    assert loaded.summary() == {"relabelled": 1, "removed": 1, "kept": 0, "test_edits": 0}
    assert loaded.describe() == "cleaned 1 @8: 1 relabelled, 1 removed; test images unchanged"
    assert loaded.describe(4) == "cleaned 1 @4: 2 relabelled, 1 removed; test images unchanged"
    for _ in range(3):
        loaded.undo()
    assert loaded.decisions() == {} and loaded.undo() is None
    assert _hashes(tiny_copy) == before                     # no image was changed, added or deleted
    assert [p.name for p in (data_dir / "revisions").glob("*.json")] == [f"{rev.id}.json"]


def test_edits_are_checked(tiny_copy, data_dir):
    ds = _load(tiny_copy, data_dir)
    rev = revisions.create_revision(ds, data_dir)
    with pytest.raises(ConfigError, match="is not a class of .*; the classes are: airplane, cat, ship"):
        rev.relabel(ds, 0, "unicorn")
    with pytest.raises(ConfigError, match="already labelled"):
        rev.relabel(ds, 0, ds.classes[ds.targets[0]])
    with pytest.raises(ConfigError, match="not in"):
        rev.remove(ds, len(ds))
    with pytest.raises(ConfigError, match="split must be"):
        rev.remove(ds, 0, split="../etc")
    other = datasets.load_dataset("sample", data_dir=data_dir)
    with pytest.raises(ConfigError, match="belongs to the dataset 'tiny'"):
        rev.remove(other, 0)
    assert rev.actions == []
    with pytest.raises(ConfigError, match="name"):
        revisions.create_revision(ds, data_dir, name="   ")
    assert revisions.create_revision(ds, data_dir).name == "cleaned 2"


@pytest.mark.parametrize("ref", ["../../etc/passwd", "r012345678@1", "R0123456789@1", "r0123456789@", "r0123456789@-1",
                                 "r0123456789/../x@1", "", None, 7, "r0123456789@1 extra"])
def test_bad_refs_are_refused(ref, data_dir):
    with pytest.raises(ConfigError, match="not a revision reference"):
        revisions.load_revision(ref, data_dir)


def test_unknown_revision_and_version(tiny_copy, data_dir):
    with pytest.raises(revisions.RevisionMissing, match="not on this server"):
        revisions.load_revision("r0123456789@1", data_dir)
    ds = _load(tiny_copy, data_dir)
    rev = revisions.create_revision(ds, data_dir)
    rev.remove(ds, 0)
    rev.save(data_dir)
    with pytest.raises(ConfigError, match="has 1 action.*no version 5"):
        revisions.load_revision(f"{rev.id}@5", data_dir)
    (data_dir / "revisions" / f"{rev.id}.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError, match="damaged"):
        revisions.load_revision(rev.id, data_dir)
    assert revisions.list_revisions(data_dir) == []        # a damaged file is left out of the list


def test_ownership_and_lists(tiny_copy, data_dir):
    ds = _load(tiny_copy, data_dir)
    ann = revisions.create_revision(ds, data_dir, owner="user:ann")
    bob = revisions.create_revision(ds, data_dir, owner="user:bob")
    revisions.create_revision(datasets.load_dataset("sample", data_dir=data_dir), data_dir, owner="user:ann")
    revisions.require_change(ann, Who("user:ann"))
    revisions.require_change(ann, Who("user:bob", teacher=True))
    with pytest.raises(ConfigError, match="belongs to someone else; only its owner or the teacher"):
        revisions.require_change(ann, Who("user:bob"))
    with pytest.raises(ConfigError, match="someone else"):
        revisions.require_change(revisions.create_revision(ds, data_dir), Who("user:bob"))  # command line's
    mine = revisions.list_revisions(data_dir, source=ds.source, owner="user:ann")
    assert [r.id for r in mine] == [ann.id]
    assert {r.id for r in revisions.list_revisions(data_dir, source=ds.source)} >= {ann.id, bob.id}
    assert len(revisions.list_revisions(data_dir, owner="user:ann")) == 2


def test_two_tabs_editing_one_revision_keep_both_edits(tiny_copy, data_dir):
    ds = _load(tiny_copy, data_dir)
    rev = revisions.create_revision(ds, data_dir)
    tab_a, _ = revisions.load_revision(rev.id, data_dir)
    tab_b, _ = revisions.load_revision(rev.id, data_dir)
    tab_a.relabel(ds, 0, _other_class(ds, 0))
    tab_b.remove(ds, 5)
    tab_b.relabel(ds, 6, _other_class(ds, 6))
    tab_b.undo()                                  # its own relabel of 6, not yet saved
    tab_a.save(data_dir)
    tab_b.save(data_dir)                          # re-reads tab A's action and appends after it
    tab_a.remove(ds, 7)
    tab_a.save(data_dir)
    final, version = revisions.load_revision(rev.id, data_dir)
    assert version == 5
    assert set(final.decisions()) == {ds.describe(0), ds.describe(5), ds.describe(7)}
    assert final.actions[3] == {**final.actions[3], "op": "undo", "target": 2}   # remapped to where 6's relabel went
    assert tab_a.actions == final.actions

    errors = []

    def edit(k):
        try:
            mine, _ = revisions.load_revision(rev.id, data_dir)
            mine.remove(ds, 20 + k)
            mine.save(data_dir)
        except Exception as err:   # noqa: BLE001 - reported below
            errors.append(err)
    threads = [threading.Thread(target=edit, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    final, version = revisions.load_revision(rev.id, data_dir)
    assert version == 11 and {ds.describe(20 + k) for k in range(6)} <= set(final.decisions())


# ---- applying ------------------------------------------------------------------------------------
def _pick(split, part, n):
    return list(getattr(split, part)[:n])


def test_apply_relabels_removes_and_leaves_test_alone(tiny_copy, data_dir):
    ds = _load(tiny_copy, data_dir)
    split = _split(ds)
    rev = revisions.create_revision(ds, data_dir)
    t0, t1, t2 = _pick(split, "train", 3)
    (v0,), (s0, s1) = _pick(split, "val", 1), _pick(split, "test", 2)
    rev.relabel(ds, t0, _other_class(ds, t0), "train")
    rev.remove(ds, t1, "train")
    rev.keep(ds, t2, "train")
    rev.remove(ds, v0, "val")
    rev.relabel(ds, s0, _other_class(ds, s0), "test")
    rev.remove(ds, s1, "test")
    rev.save(data_dir)

    a = revisions.apply_revision(ds, split, rev.ref(), data_dir)
    assert a.ref == rev.ref() and len(a.digest) == 16 and not a.test_edited
    assert a.dataset.targets[t0] == ds.classes.index(_other_class(ds, t0)) and ds.targets[t0] != a.dataset.targets[t0]
    assert sum(x != y for x, y in zip(a.dataset.targets, ds.targets)) == 1   # the test relabel is not applied
    assert a.split.train == [i for i in split.train if i != t1] and a.split.val == [i for i in split.val if i != v0]
    assert a.split.test == split.test
    assert (a.relabelled, a.removed, a.test_ignored) == (1, 2, 2)
    assert a.notes[0] == "labels: revision 'cleaned 1' @6 (1 relabelled, 2 removed; test images unchanged)"
    assert any("2 decision(s) on test images are stored but not applied" in n for n in a.notes)
    assert revisions.apply_revision(ds, split, rev.ref(), data_dir).digest == a.digest   # reproducible

    rev.set_edit_test(True)
    rev.save(data_dir)
    b = revisions.apply_revision(ds, split, rev.ref(), data_dir)
    assert b.test_edited and b.split.test == [i for i in split.test if i != s1]
    assert b.dataset.targets[s0] != ds.targets[s0] and b.digest != a.digest
    assert "test labels edited" in b.notes[0] and any("not comparable" in n for n in b.notes)
    assert rev.describe() == "cleaned 1 @7: 2 relabelled, 3 removed; 2 test image(s) edited"
    # the reference before the switch still applies without the test edits
    assert revisions.apply_revision(ds, split, f"{rev.id}@6", data_dir).digest == a.digest
    assert ds.targets == _load(tiny_copy, data_dir).targets                      # the dataset given is untouched


def test_changed_or_deleted_files_are_skipped_with_a_note(tiny_copy, data_dir):
    ds = _load(tiny_copy, data_dir)
    split = _split(ds)
    rev = revisions.create_revision(ds, data_dir)
    a, b, c = _pick(split, "train", 3)
    rev.relabel(ds, a, _other_class(ds, a))
    rev.remove(ds, b)
    rev.remove(ds, c)
    rev.save(data_dir)
    Path(ds.image_path(a)).write_bytes(Path(ds.image_path(c)).read_bytes())   # new content, same name
    Path(ds.image_path(b)).unlink()
    ds2 = _load(tiny_copy, data_dir)
    applied = revisions.apply_revision(ds2, _split(ds2), rev.ref(), data_dir)
    assert set(applied.applied) == {ds.describe(c)}
    reasons = {s["file"]: s["reason"] for s in applied.skipped}
    assert reasons == {ds.describe(a): "the file's content changed since the decision",
                       ds.describe(b): "the file is not in the dataset any more"}
    assert any(ds.describe(a) in n and "content changed" in n for n in applied.notes)
    assert applied.dataset.targets == ds2.targets


def test_a_revision_of_another_dataset_is_refused(tiny_copy, data_dir):
    ds = _load(tiny_copy, data_dir)
    rev = revisions.create_revision(ds, data_dir, name="tidy")
    sample = datasets.load_dataset("sample", data_dir=data_dir)
    with pytest.raises(ConfigError, match="'tidy'.*made for the dataset 'tiny', not for 'CIFAR-10 sample'"):
        revisions.apply_revision(sample, _split(sample), rev.ref(), data_dir)


def test_array_datasets_hash_their_pixels():
    data = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    data[2] = 7
    ds = datasets.ArrayDataset(data=data, name="toy", classes=["a", "b"], targets=[0, 1, 0, 1], splits=None,
                               source={"kind": "torchvision", "location": "TOY"})
    assert revisions.content_hash(ds, 0) == revisions.content_hash(ds, 1) != revisions.content_hash(ds, 2)
    assert revisions.dataset_key(ds.source) == "torchvision:TOY"
    assert revisions.dataset_key({"kind": "zip", "location": "/tmp/x/a.zip", "extracted": "/d/uploads/ab12"}) == \
        "zip:ab12"
    assert json.loads(json.dumps(revisions.dataset_key({"kind": "sample"}))) == "sample"


# ---- the run configuration and training ---------------------------------------------------------------
def test_config_names_a_revision(tmp_path):
    from core.config import RunConfig
    from core.train import build_parser, config_from_args

    cfg = RunConfig.from_dict({"data": {"revision": "r0123456789@7"}})
    assert RunConfig.from_json(cfg.to_json()).data.revision == "r0123456789@7"
    assert RunConfig.from_dict({}).data.revision is None                      # older configs load as before
    for bad in ("../../etc/passwd", "r0123456789", "r0123456789@x", "r0123456789@7/..", 7):
        with pytest.raises(ConfigError, match="data.revision must be"):
            RunConfig.from_dict({"data": {"revision": bad}})
    args = build_parser().parse_args(["--revision", "r00000000ff@2", "--epochs", "1"])
    assert config_from_args(args).data.revision == "r00000000ff@2"


def _revised(tiny_copy, data_dir, edit_test=False):
    """A revision of tiny_copy: 4 training images relabelled, 3 removed, one test image relabelled."""
    ds = _load(tiny_copy, data_dir)
    split = _split(ds)
    rev = revisions.create_revision(ds, data_dir, name="cleaned 1")
    for i in split.train[:4]:
        rev.relabel(ds, i, _other_class(ds, i), "train")
    for i in split.train[10:13]:
        rev.remove(ds, i, "train")
    rev.relabel(ds, split.test[0], _other_class(ds, split.test[0]), "test")
    rev.set_edit_test(edit_test)
    rev.save(data_dir)
    return ds, split, rev


def test_prepare_applies_the_revision_after_the_split(tiny_copy, tiny_config, data_dir, tmp_path):
    from core import trainer
    ds, split, rev = _revised(tiny_copy, data_dir)
    tiny_config.data.location, tiny_config.data.revision = str(tiny_copy), rev.ref()
    prep = trainer.prepare(tiny_config, data_dir=data_dir)
    assert prep.split.test == split.test and prep.split.val == split.val   # the original labels' split
    assert prep.split.train == [i for i in split.train if i not in split.train[10:13]]
    assert [prep.dataset.targets[i] != ds.targets[i] for i in split.train[:4]] == [True] * 4
    assert prep.dataset.targets[split.test[0]] == ds.targets[split.test[0]]
    assert "labels: revision 'cleaned 1' @8 (4 relabelled, 3 removed; test images unchanged)" in prep.notes
    # the revision's file gone: a run folder's revision.json gives the same decisions, and says so
    saved = prep.revision_record
    (data_dir / "revisions" / f"{rev.id}.json").unlink()
    with pytest.raises(revisions.RevisionMissing):
        trainer.prepare(tiny_config, data_dir=data_dir)
    again = trainer.prepare(tiny_config, data_dir=data_dir, saved_revision=json.loads(json.dumps(saved)))
    assert again.revision.digest == prep.revision.digest and again.split.train == prep.split.train
    assert any("taken from this run folder's revision.json" in n for n in again.notes)
    # a revision of another dataset is refused, naming both
    sample = datasets.load_dataset("sample", data_dir=data_dir)
    other = revisions.create_revision(sample, data_dir, name="sample fix")
    tiny_config.data.revision = other.ref()
    with pytest.raises(ConfigError, match="'sample fix'.*made for the dataset 'CIFAR-10 sample', not for 'tiny'"):
        trainer.prepare(tiny_config, data_dir=data_dir)


def _weights(run_dir: Path) -> dict:
    import torch
    return torch.load(run_dir / "last.pth", map_location="cpu", weights_only=True)["model"]


def test_a_run_on_a_revision_records_it_and_reproduces(tiny_copy, tiny_config, data_dir, tmp_path):
    import torch

    from core import trainer
    from core.runs import RunHistory
    before = _hashes(tiny_copy)
    ds, split, rev = _revised(tiny_copy, data_dir)
    runs = tmp_path / "runs"
    tiny_config.data.location, tiny_config.deterministic = str(tiny_copy), True
    original = trainer.fit(tiny_config, runs_dir=runs, data_dir=data_dir, run_id="original")
    tiny_config.data.revision = rev.ref()
    rev.remove(ds, split.train[20])              # edits after the ref was taken change nothing for it
    rev.save(data_dir)
    first = trainer.fit(tiny_config, runs_dir=runs, data_dir=data_dir, run_id="cleaned-a")
    second = trainer.fit(tiny_config, runs_dir=runs, data_dir=data_dir, run_id="cleaned-b")
    assert [r.status for r in (original, first, second)] == ["finished"] * 3, first.message

    a, b, o = _weights(first.run_dir), _weights(second.run_dir), _weights(original.run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)                     # the same ref reproduces
    assert any(not torch.equal(a[k], o[k]) for k in a)                 # and trains on other labels
    saved = json.loads((first.run_dir / "revision.json").read_text(encoding="utf-8"))
    assert saved["ref"] == rev.ref(8) and saved["digest"] == json.loads(
        (second.run_dir / "revision.json").read_text(encoding="utf-8"))["digest"]
    assert len(saved["applied"]) == 7 and saved["test_edited"] is False and len(saved["decisions"]) == 8
    assert json.loads((first.run_dir / "config.json").read_text())["data"]["revision"] == rev.ref(8)
    card = json.loads((first.run_dir / "card.json").read_text(encoding="utf-8"))
    line = "labels: revision 'cleaned 1' @8 (4 relabelled, 3 removed; test images unchanged)"
    assert line in card["notes"] and card["dataset"]["revision"] == rev.ref(8)
    assert card["dataset"]["split_sizes"]["train"] == len(split.train) - 3
    assert not (original.run_dir / "revision.json").exists()
    p_o, p_a = (json.loads((r.run_dir / "predictions.json").read_text()) for r in (original, first))
    assert sorted(p_o["index"]) == sorted(p_a["index"]) == split.test and p_o["target"] == p_a["target"]
    rows = RunHistory(runs).list(rescan=True).set_index("run_id")
    assert rows.loc["cleaned-a", "revision"] == rev.ref(8) and pd.isna(rows.loc["original", "revision"])
    assert rows.loc["cleaned-a", "dataset"] == rows.loc["original", "dataset"] == "tiny"
    assert list(RunHistory(runs).list(filter_text=rev.id)["run_id"].sort_values()) == ["cleaned-a", "cleaned-b"]
    assert _hashes(tiny_copy) == before                                # training changed no image file


def test_plan_retrain_pairs_original_and_cleaned(tiny_copy, tiny_config, data_dir):
    from core.compare import plan_retrain
    _, _, rev = _revised(tiny_copy, data_dir)
    tiny_config.data.location, tiny_config.name = str(tiny_copy), "my run"
    original, cleaned = plan_retrain(tiny_config, rev.id, data_dir)          # a bare id: pinned to the latest
    assert (original.name, original.data.revision) == ("original labels", None)
    assert (cleaned.name, cleaned.data.revision) == ("cleaned 1 @8", rev.ref(8))
    for cfg in (original, cleaned):
        d = cfg.to_dict()
        d["data"].pop("revision"), d.pop("name")
        base = tiny_config.to_dict()
        base["data"].pop("revision"), base.pop("name")
        assert d == base                                                      # seed, split, epochs... alike
    tiny_config.data.revision = rev.ref(3)                                    # already on a revision
    original, cleaned = plan_retrain(tiny_config, rev.ref(5), data_dir)
    assert original.data.revision is None and cleaned.data.revision == rev.ref(5) and cleaned.name == "cleaned 1 @5"
    with pytest.raises(ConfigError, match="not a revision reference"):
        plan_retrain(tiny_config, "../x", data_dir)
    with pytest.raises(ConfigError, match="no version 99"):
        plan_retrain(tiny_config, rev.ref(8).replace("@8", "@99"), data_dir)
