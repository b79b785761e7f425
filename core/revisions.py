"""Dataset revisions: a user's label decisions, kept beside the dataset and applied at training time.

A revision never changes or deletes an image file. It is a JSON file, ``<data_dir>/revisions/<id>.json``,
holding an append-only log of actions::

    {"op": "relabel", "file": "train/cat/0001.jpg", "hash": "3f2a…", "label": "dog", "old": "cat",
     "split": "train", "time": 1700000000.0}
    {"op": "remove" | "keep", "file", "hash", "old", "split", "time"}
    {"op": "undo", "target": 4, "file", "time"}          # takes back action 4 (when still in force)
    {"op": "edit_test", "value": true, "time"}          # apply decisions on test images too

``id@N`` names the first N actions, and the log is only ever appended to, so a run that trained on
``r0123456789@7`` gets the same decisions later, however many edits follow. Decisions are keyed by the
image's file key (``ds.describe(i)``) and its content hash: at apply time a decision whose file is gone
or whose content changed is skipped, and the notes say which and why.

Saving re-reads the file, appends this object's new actions and replaces the file atomically under a
lock, so two browser tabs editing one revision both keep their edits.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core import identity, storage
from core.errors import ConfigError, DataError

try:   # POSIX: a lock between processes too (the server and the command line)
    import fcntl
except ImportError:   # Windows: the lock covers this process's threads only
    fcntl = None

log = logging.getLogger(__name__)

FOLDER = "revisions"            # under the data folder, beside the datasets
FORMAT = 1
ID_RE = re.compile(r"r[0-9a-f]{10}")
REF_RE = re.compile(r"(r[0-9a-f]{10})@(\d{1,9})")
DECISION_OPS = ("relabel", "remove", "keep")
SPLITS = ("", "train", "val", "test")
MAX_NAME_CHARS = 80
REF_EXAMPLE = "r0123456789@7"


class RevisionMissing(ConfigError):
    """The revision's file is not in the data folder (deleted, or another server's)."""


# ---- keys ----------------------------------------------------------------------------------------
def content_hash(ds, i: int) -> str:
    """First 16 hex digits of sha256 of image ``i``'s file bytes (array-backed sets: of its pixels).
    DataError naming the image when its file cannot be read."""
    path = ds.image_path(i)
    h = hashlib.sha256()
    if path is None:
        data = getattr(ds, "data", None)
        h.update(data[i].tobytes() if data is not None else ds.to_uint8_array([i]).tobytes())
        return h.hexdigest()[:16]
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    except OSError as err:
        raise DataError(f"Image {ds.describe(i)} of {ds.name} cannot be read ({err.strerror or err}). "
                        "Reload the dataset.") from None
    return h.hexdigest()[:16]


def dataset_key(source: dict) -> str:
    """A stable id of a dataset from its ``ds.source``: 'sample', 'torchvision:CIFAR10', 'folder:<path>',
    'index:<path>'; an upload 'zip:<content hash>' (its extraction folder's name, the same whatever
    name or temporary path the zip was uploaded under)."""
    kind = str((source or {}).get("kind") or "")
    if kind == "sample":
        return "sample"
    if kind == "zip" and source.get("extracted"):
        return "zip:" + Path(str(source["extracted"])).name
    return f"{kind}:{source.get('location') or ''}"


def parse_ref(ref: Any, label: str = "revision") -> tuple[str, int | None]:
    """'r0123456789@7' → ('r0123456789', 7); 'r0123456789' → (id, None). Anything else → ConfigError
    (a reference is never a path: only this exact form is accepted)."""
    if isinstance(ref, str):
        text = ref.strip()
        m = REF_RE.fullmatch(text)
        if m:
            return m.group(1), int(m.group(2))
        if ID_RE.fullmatch(text):
            return text, None
    shown = repr(ref)[:60]
    raise ConfigError(f"The {label} {shown} is not a revision reference: it must look like {REF_EXAMPLE} "
                      "(the revision's id, '@' and its version).")


def _folder(data_dir) -> Path:
    return Path(data_dir).expanduser() / FOLDER


def _path(data_dir, rev_id: str) -> Path:
    if not ID_RE.fullmatch(rev_id):   # never a path from the user
        raise ConfigError(f"{rev_id!r:.40} is not a revision id (like r0123456789).")
    return _folder(data_dir) / f"{rev_id}.json"


# ---- the action log --------------------------------------------------------------------------------
def _replay(actions: list[dict]) -> tuple[list[int], bool]:
    """(indices of the decision actions in force, in order; edit_test) after ``actions``. An undo takes
    back its target when that is still in force, and does nothing otherwise (another tab undid it)."""
    live: list[int] = []
    edit_test = False
    for k, a in enumerate(actions):
        op = a.get("op")
        if op in DECISION_OPS:
            live.append(k)
        elif op == "undo" and a.get("target") in live:
            live.remove(a["target"])
        elif op == "edit_test":
            edit_test = bool(a.get("value"))
    return live, edit_test


def _digest(decisions: dict[str, dict], edit_test: bool) -> str:
    core = {f: {k: d.get(k) for k in ("op", "label", "hash")} for f, d in decisions.items()}
    text = json.dumps({"decisions": core, "edit_test": bool(edit_test)}, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _counts(decisions: dict[str, dict]) -> dict[str, int]:
    ops = [d["op"] for d in decisions.values()]
    return {"relabelled": ops.count("relabel"), "removed": ops.count("remove"), "kept": ops.count("keep"),
            "test_edits": sum(1 for d in decisions.values() if d.get("split") == "test" and d["op"] != "keep")}


def _counts_text(relabelled: int, removed: int, test_words: str) -> str:
    return f"{relabelled} relabelled, {removed} removed; {test_words}"


@dataclass
class Revision:
    id: str
    name: str
    owner: str | None
    source: dict
    dataset: str
    created: float
    actions: list[dict] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    _saved: int = field(default=0, repr=False)   # actions[:_saved] are the file's (the rest: not saved yet)

    @property
    def version(self) -> int:
        return len(self.actions)

    @property
    def key(self) -> str:
        return dataset_key(self.source)

    def _upto(self, version: int | None) -> list[dict]:
        if version is None:
            return self.actions
        if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version <= len(self.actions):
            raise ConfigError(f"Revision '{self.name}' ({self.id}) has versions 0 to {len(self.actions)}; "
                              f"got {version!r}.")
        return self.actions[:version]

    def ref(self, version: int | None = None) -> str:
        return f"{self.id}@{len(self._upto(version))}"

    def decisions(self, version: int | None = None) -> dict[str, dict]:
        """File key → the decision in force for it (the latest one, undos applied), at ``version``."""
        actions = self._upto(version)
        out: dict[str, dict] = {}
        for k in _replay(actions)[0]:
            out[actions[k]["file"]] = dict(actions[k])
        return out

    def edit_test(self, version: int | None = None) -> bool:
        return _replay(self._upto(version))[1]

    def summary(self, version: int | None = None) -> dict[str, int]:
        return _counts(self.decisions(version))

    def describe(self, version: int | None = None) -> str:
        """'cleaned 1 @7: 5 relabelled, 2 removed; test images unchanged'."""
        s, n = self.summary(version), len(self._upto(version))
        test = (f"{s['test_edits']} test image(s) edited" if self.edit_test(version) and s["test_edits"]
                else "test images unchanged")
        return f"{self.name} @{n}: {_counts_text(s['relabelled'], s['removed'], test)}"

    def digest(self, version: int | None = None) -> str:
        return _digest(self.decisions(version), self.edit_test(version))

    # ---- edits (in memory until save) ------------------------------------------------------------
    def _image(self, ds, index, split) -> dict:
        if dataset_key(ds.source) != self.key:
            raise ConfigError(f"Revision '{self.name}' belongs to the dataset '{self.dataset}', not to "
                              f"'{ds.name}': load that dataset to edit it.")
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(ds):
            raise ConfigError(f"Image number {index!r} is not in {ds.name} (0 to {len(ds) - 1}).")
        if split not in SPLITS:
            raise ConfigError(f"split must be one of train, val, test or empty; got {split!r:.40}.")
        return {"file": ds.describe(index), "hash": content_hash(ds, index),
                "old": ds.classes[ds.targets[index]], "split": split, "time": time.time()}

    def relabel(self, ds, index: int, label, split: str = "") -> None:
        """Give image ``index`` the class ``label`` (a class name or index)."""
        entry = self._image(ds, index, split)
        if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(ds.classes):
            label = ds.classes[label]
        if not isinstance(label, str) or label not in ds.classes:
            raise ConfigError(f"{label!r:.60} is not a class of {ds.name}; the classes are: "
                              f"{', '.join(ds.classes)}.")
        if label == entry["old"]:
            raise ConfigError(f"{entry['file']} is already labelled '{label}' in the dataset. To take back "
                              "a relabel, use Undo, or Keep to confirm the given label.")
        self.actions.append({"op": "relabel", "label": label, **entry})

    def remove(self, ds, index: int, split: str = "") -> None:
        """Leave image ``index`` out of training (the file stays where it is)."""
        self.actions.append({"op": "remove", **self._image(ds, index, split)})

    def keep(self, ds, index: int, split: str = "") -> None:
        """'Looked at it, the label is right': kept out of the suspects; overrides an earlier decision."""
        self.actions.append({"op": "keep", **self._image(ds, index, split)})

    def undo(self) -> dict | None:
        """Take back the latest decision in force (relabel, remove or keep); the decision, or None."""
        live, _ = _replay(self.actions)
        if not live:
            return None
        target = self.actions[live[-1]]
        self.actions.append({"op": "undo", "target": live[-1], "file": target["file"], "time": time.time()})
        return dict(target)

    def set_edit_test(self, value: bool) -> None:
        """Apply the decisions on test images too (then a run's test accuracy is not comparable)."""
        if not isinstance(value, bool):
            raise ConfigError(f"edit_test must be true or false, got {value!r:.40}.")
        if value != self.edit_test():
            self.actions.append({"op": "edit_test", "value": value, "time": time.time()})

    # ---- file ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": FORMAT, "id": self.id, "name": self.name, "owner": self.owner, "source": self.source,
                "dataset_key": self.key, "dataset": self.dataset, "classes": self.classes,
                "created": self.created, "actions": self.actions}

    @classmethod
    def from_dict(cls, d: dict) -> "Revision":
        rev = cls(id=d["id"], name=d["name"], owner=d.get("owner"), source=dict(d["source"]),
                  dataset=d.get("dataset", ""), created=float(d.get("created", 0.0)),
                  actions=list(d.get("actions", [])), classes=list(d.get("classes", [])))
        rev._saved = len(rev.actions)
        return rev

    def save(self, data_dir) -> None:
        """Append this object's new actions to the file (re-read under the lock: actions another tab
        saved meanwhile are kept, before ours), atomically."""
        path = _path(data_dir, self.id)
        with _locked(path):
            on_disk = _read(path).actions if path.is_file() else []
            if on_disk[:self._saved] != self.actions[:self._saved]:
                raise ConfigError(f"Revision file {FOLDER}/{path.name} was changed by something other than "
                                  "the lab (its history differs); it was not saved.")
            shift = len(on_disk) - self._saved
            mine = [dict(a) for a in self.actions[self._saved:]]
            for a in mine:   # an undo of one of our own unsaved actions: that action moves by `shift`
                if a.get("op") == "undo" and a.get("target", -1) >= self._saved:
                    a["target"] += shift
            self.actions = on_disk + mine
            try:
                storage.atomic_write_json(path, self.to_dict())
            except OSError as err:
                raise storage.storage_error(err, path.parent, f"saving revision '{self.name}'") from err
            self._saved = len(self.actions)


_thread_locks: dict[str, threading.Lock] = {}
_thread_locks_guard = threading.Lock()


@contextlib.contextmanager
def _locked(path: Path):
    """One writer of ``path`` at a time: a lock per file in this process, and flock between processes."""
    with _thread_locks_guard:
        lock = _thread_locks.setdefault(str(path), threading.Lock())
    with lock:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(path.with_suffix(".lock"), "a")
        except OSError as err:
            raise storage.storage_error(err, path.parent, "locking a revision file") from err
        with fh:
            if fcntl is not None:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            yield


def _read(path: Path) -> Revision:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        rev = Revision.from_dict(data)
    except FileNotFoundError:
        raise RevisionMissing(f"Revision {path.stem} is not on this server (no {FOLDER}/{path.name} in the "
                              "data folder). Pick one from the list of revisions.") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"Revision file {FOLDER}/{path.name} is damaged ({type(err).__name__}); it cannot "
                          "be used. Delete it or make a new revision.") from None
    if rev.id != path.stem:
        raise ConfigError(f"Revision file {FOLDER}/{path.name} names another revision ({rev.id!r:.20}).")
    return rev


# ---- the revisions of a data folder --------------------------------------------------------------
def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ConfigError("A revision's name must be some text, e.g. 'cleaned 1'.")
    name = " ".join(name.split())
    if len(name) > MAX_NAME_CHARS or any(not c.isprintable() for c in name):
        raise ConfigError(f"A revision's name must be at most {MAX_NAME_CHARS} printable characters.")
    return name


def create_revision(ds, data_dir, name: str | None = None, owner: str | None = None) -> Revision:
    """A new, empty revision of ``ds`` (saved at once). Default name: 'cleaned N', the first N not
    taken among the revisions of this dataset."""
    if name is None:
        taken = {r.name for r in list_revisions(data_dir, source=ds.source)}
        name = next(f"cleaned {n}" for n in range(1, len(taken) + 2) if f"cleaned {n}" not in taken)
    rev = Revision(id="r" + secrets.token_hex(5), name=_check_name(name), owner=owner, source=dict(ds.source),
                   dataset=ds.name, created=time.time(), classes=list(ds.classes))
    rev.save(data_dir)
    return rev


def load_revision(ref_or_id: str, data_dir) -> tuple[Revision, int]:
    """(revision, version): the version a reference names, or the latest for a bare id. Unknown id or a
    version beyond its history → ConfigError."""
    rev_id, version = parse_ref(ref_or_id)
    rev = _read(_path(data_dir, rev_id))
    if version is None:
        return rev, rev.version
    if version > rev.version:
        raise ConfigError(f"Revision '{rev.name}' ({rev_id}) has {rev.version} action(s); there is no "
                          f"version {version}. The latest is {rev.ref()}.")
    return rev, version


def list_revisions(data_dir, source: dict | None = None, owner: str | None = None) -> list[Revision]:
    """Revisions in the data folder, newest first; only those of the dataset ``source`` and of ``owner``
    when given. A damaged file is left out (and logged)."""
    folder = _folder(data_dir)
    if not folder.is_dir():
        return []
    key = dataset_key(source) if source is not None else None
    out = []
    for path in folder.glob("r*.json"):
        if not ID_RE.fullmatch(path.stem):
            continue
        try:
            rev = _read(path)
        except ConfigError as err:
            log.warning("%s", err)
            continue
        if (key is None or rev.key == key) and (owner is None or rev.owner == owner):
            out.append(rev)
    return sorted(out, key=lambda r: (r.created, r.id), reverse=True)


def require_change(rev: Revision, who: identity.Who) -> None:
    """ConfigError with a plain refusal unless ``who`` owns the revision or is the teacher."""
    if not identity.can_change(rev.owner, who):
        raise ConfigError(f"Revision '{rev.name}' belongs to someone else; only its owner or the teacher can "
                          "change it. Make your own revision of this dataset instead.")


# ---- applying ---------------------------------------------------------------------------------------
@dataclass
class Applied:
    dataset: Any                 # a copy of the LabDataset whose targets carry the relabels
    split: Any                   # removed images out of train/val (and test only with edit_test)
    ref: str
    digest: str                  # sha256[:16] of the applied decisions and edit_test
    notes: list[str]
    test_edited: bool
    name: str = ""
    applied: dict[str, dict] = field(default_factory=dict)   # file → decision actually applied
    skipped: list[dict] = field(default_factory=list)        # {file, op, reason}
    relabelled: int = 0
    removed: int = 0
    test_ignored: int = 0        # decisions on test images stored but not applied (edit_test off)

    def label_line(self) -> str:
        """"labels: revision 'cleaned 1' @7 (5 relabelled, 2 removed; test images unchanged)"."""
        version = self.ref.split("@")[1]
        test = ("test labels edited: test accuracy not comparable with the original labels" if self.test_edited
                else "test images unchanged")
        return f"labels: revision '{self.name}' @{version} ({_counts_text(self.relabelled, self.removed, test)})"

    def record(self, source: dict) -> dict:
        """What the run folder's revision.json holds: ``source`` (the record applied: the revision's
        decisions at its version) and what came of it; enough to apply the same decisions again."""
        return {"ref": self.ref, "name": self.name, "dataset": source.get("dataset", ""),
                "dataset_key": source["dataset_key"], "edit_test": bool(source["edit_test"]),
                "digest": self.digest, "decisions": source["decisions"], "applied": sorted(self.applied),
                "skipped": self.skipped, "notes": self.notes, "test_edited": self.test_edited,
                "relabelled": self.relabelled, "removed": self.removed}


def revision_record(ref: str, data_dir) -> dict:
    """The decisions ``ref`` names, as a record apply_record takes (and revision.json keeps)."""
    rev, version = load_revision(ref, data_dir)
    return {"ref": rev.ref(version), "name": rev.name, "dataset": rev.dataset, "dataset_key": rev.key,
            "decisions": rev.decisions(version), "edit_test": rev.edit_test(version)}


def apply_revision(ds, split, ref: str, data_dir) -> Applied:
    """``ds`` and ``split`` with revision ``ref``'s decisions: relabels in a copy's targets, removed images
    out of train/val (test only when the revision edits test images). The split itself is the one given
    (made on the original labels), so train/val/test membership does not move."""
    return apply_record(ds, split, revision_record(ref, data_dir))


def apply_record(ds, split, record: dict) -> Applied:
    """apply_revision from a record (revision_record's, or a run folder's revision.json)."""
    if record["dataset_key"] != dataset_key(ds.source):
        raise ConfigError(f"Revision '{record['name']}' ({record['ref']}) was made for the dataset "
                          f"'{record.get('dataset') or record['dataset_key'].split(':')[0]}', not for "
                          f"'{ds.name}'. Pick a revision of {ds.name}, or train on its original labels.")
    where = {i: part for part in ("train", "val", "test") for i in getattr(split, part)}
    index_of = {ds.describe(i): i for i in range(len(ds))}
    targets, removed, applied, skipped, ignored = list(ds.targets), set(), {}, [], 0
    for file, d in record["decisions"].items():
        reason, i = _why_skip(ds, index_of, file, d)
        if reason:
            skipped.append({"file": file, "op": d["op"], "reason": reason})
            continue
        if where.get(i) == "test" and not record["edit_test"]:
            ignored += d["op"] != "keep"
            continue
        applied[file] = d
        if d["op"] == "relabel":
            targets[i] = ds.classes.index(d["label"])
        elif d["op"] == "remove":
            removed.add(i)
    out = copy.copy(ds)
    out.targets = targets
    test_edited = any(where.get(index_of[f]) == "test" and d["op"] != "keep" for f, d in applied.items())
    new_split = _split_without(split, removed, record["ref"])
    result = Applied(dataset=out, split=new_split, ref=record["ref"], name=record["name"], applied=applied,
                     digest=_digest(applied, record["edit_test"]), notes=[], test_edited=test_edited,
                     skipped=skipped, test_ignored=ignored,
                     relabelled=sum(d["op"] == "relabel" for d in applied.values()),
                     removed=sum(d["op"] == "remove" for d in applied.values()))
    result.notes = _notes(result)
    return result


def _why_skip(ds, index_of: dict[str, int], file: str, d: dict) -> tuple[str, int | None]:
    """('', index) when decision ``d`` on ``file`` applies; else (the reason in words, None)."""
    i = index_of.get(file)
    if i is None:
        return "the file is not in the dataset any more", None
    try:
        if content_hash(ds, i) != d.get("hash"):
            return "the file's content changed since the decision", None
    except DataError:
        return "the file cannot be read", None
    if d["op"] == "relabel" and d.get("label") not in ds.classes:
        return f"the class '{d.get('label')}' is not in the dataset any more", None
    return "", i


def _split_without(split, removed: set[int], ref: str):
    from core.datasets import Split   # here: importing core.revisions stays light
    keep = (lambda part: [i for i in part if i not in removed])
    return Split(train=keep(split.train), val=keep(split.val), test=keep(split.test),
                 warnings=list(split.warnings), note=f"{split.note}; revision {ref}" if split.note else "")


def _notes(a: Applied) -> list[str]:
    notes = [a.label_line()]
    for s in a.skipped:
        notes.append(f"revision: the decision to {s['op']} {s['file']} was skipped: {s['reason']}")
    if a.test_ignored:
        notes.append(f"revision: {a.test_ignored} decision(s) on test images are stored but not applied "
                     "(the revision does not edit test images)")
    if a.test_edited:
        notes.append("revision: test labels were edited, so this run's test accuracy is not comparable with "
                     "runs on the original labels")
    return notes


def revision_file_note(ref: str) -> str:
    return (f"revision {ref} is no longer in the data folder: its decisions were taken from this run "
            "folder's revision.json")

