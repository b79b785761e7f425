"""Data health: exact and near-duplicate images (within a split and across train/val/test: leaks),
outliers and class imbalance, each with counts and advice in words.

``check_health(ds, split)`` reads every image once into a small thumbnail (32×32, area-averaged;
big JPEGs are decoded at a reduced scale first with Pillow's draft mode) and a hash of its decoded
pixels:

* exact duplicates: identical pixel hashes (uint8 pixels + shape), grouped;
* near duplicates: candidates from 8×8 thumbnails (each channel mean-centred, L2-normalised) compared
  all against all by matrix products in blocks, one side as is, mirrored or cropped a little
  (``COARSE_THRESHOLD``); each candidate verified on 16×16 views over 22 alignments
  (``NEAR_THRESHOLD``) and on their high-pass detail (``DETAIL_THRESHOLD``), which keeps out
  different pictures that only share a layout (a ship on a grey sea);
* outliers (conservative): almost blank images, sizes or aspect ratios far from the rest, and
  images unlike any other of their class (the similarity to their k-th nearest neighbour of the
  same class far below the class's robust spread);
* balance: images per class and split, with advice at a 1.5× ratio and for very small classes.

The thresholds were tuned on the shared CIFAR-10 subset: see docs/architecture.md ("Data health").
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from core.datasets import ArrayDataset, LabDataset, Split, convert_image, open_image_file
from core.errors import DataError
from core.storage import atomic_write_json

# Near duplicates: cosine similarity of the mean-centred, L2-normalised 16×16 thumbnails (or one
# against the other's mirror image), then of the 32×32 ones. See docs/architecture.md for figures.
COARSE_THRESHOLD = 0.90   # 8×8 views, best of 12 alignments: finds the candidates
NEAR_THRESHOLD = 0.88     # 16×16 views, best of 22 alignments: the same picture ...
DETAIL_THRESHOLD = 0.75   # ... and the same fine detail (16×16 high-pass), which different pictures
                          # with one layout (a ship on a grey sea) do not share
FINE = 32                 # thumbnail side kept per image
# Outliers: thumbnail standard deviation (0..255) under this is "one colour".
BLANK_STD = 4.0
# Size and aspect outliers: robust z above this, with the spread floored (all 32×32 has no spread).
SIZE_Z = 3.0
SIZE_SPREAD_FLOOR = np.log(2.0)      # area: flagged from 8× (or 1/8) the median (2.8× the side)
ASPECT_SPREAD_FLOOR = np.log(1.25)   # aspect: flagged from about 2× (or 1/2) the median
# "Unlike any other of its class": similarity to the K-th nearest same-class neighbour, robust z.
KNN_K = 5
KNN_Z = 4.0                          # the mini CIFAR-10 set peaks at 2.96: nothing flagged
KNN_MIN_CLASS = 20                   # classes smaller than this are not judged (no spread to judge by)
# Balance: advice from this ratio of the largest to the smallest class; "very few" below this.
IMBALANCE_RATIO = 1.5
FEW_IMAGES = 20
# Exact groups larger than this give star pairs (each member with the first of each split), not all pairs.
ALL_PAIRS_MAX = 20
# A near pair search that finds more than this many pairs stops there and says so.
MAX_NEAR_PAIRS = 200_000
BLOCK = 1024
PROGRESS_EVERY = 250
# Big JPEGs are decoded at a reduced scale (Pillow's draft mode) when every side is above this.
DRAFT_ABOVE = 256
CACHE_VERSION = 1

PAIR_COLUMNS = ["a", "b", "split_a", "split_b", "kind", "similarity", "leak", "mirrored",
                "file_a", "file_b", "class_a", "class_b"]
OUTLIER_COLUMNS = ["index", "split", "reason", "score", "file", "class"]
BALANCE_COLUMNS = ["class", "train", "val", "test", "total", "share"]
SPLITS = ("train", "val", "test")

Progress = Callable[[float, str], None] | None


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------

@dataclass
class HealthReport:
    dataset: str
    images: int
    seconds: float
    pairs: pd.DataFrame
    outliers: pd.DataFrame
    balance: pd.DataFrame
    advice: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)   # how it was checked, anything left out

    def leaks(self) -> pd.DataFrame:
        return self.pairs[self.pairs["leak"].astype(bool)].reset_index(drop=True)

    def duplicates(self) -> pd.DataFrame:
        return self.pairs[~self.pairs["leak"].astype(bool)].reset_index(drop=True)

    def counts(self) -> dict:
        """The figures the summary and the advice quote."""
        leaks, dups = self.leaks(), self.duplicates()
        return {"images": self.images, "leak_pairs": len(leaks), "duplicate_pairs": len(dups),
                "exact_pairs": int((self.pairs["kind"] == "exact").sum()),
                "near_pairs": int((self.pairs["kind"] == "near").sum()),
                "outliers": len(self.outliers),
                "leaked_test": _count_side(leaks, "test"), "leaked_val": _count_side(leaks, "val")}

    def summary(self) -> str:
        c = self.counts()
        lines = [f"**{self.dataset}: {self.images:,} images checked in {self.seconds:.1f} s.**", "",
                 f"- Leaks (the same picture in two splits): {c['leak_pairs']:,} pairs",
                 f"- Duplicates within a split: {c['duplicate_pairs']:,} pairs "
                 f"({c['exact_pairs']:,} exact and {c['near_pairs']:,} near pairs in all)",
                 f"- Outliers: {c['outliers']:,}",
                 f"- Classes: {len(self.balance)}, {_balance_words(self.balance)}"]
        if self.advice:
            lines += ["", "**What to do**", ""] + [f"- {a}" for a in self.advice]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        def frame(df: pd.DataFrame) -> dict:
            return {"columns": list(df.columns), "rows": json.loads(df.to_json(orient="values"))}
        return {"dataset": self.dataset, "images": self.images, "seconds": self.seconds,
                "pairs": frame(self.pairs), "outliers": frame(self.outliers), "balance": frame(self.balance),
                "advice": list(self.advice), "notes": list(self.notes)}

    @classmethod
    def from_dict(cls, d: dict) -> HealthReport:
        def frame(f: dict, types: dict) -> pd.DataFrame:
            df = pd.DataFrame(f["rows"], columns=f["columns"])
            return df.astype({k: v for k, v in types.items() if k in df.columns})
        pairs = frame(d["pairs"], {"a": "int64", "b": "int64", "similarity": "float64", "leak": "bool",
                                   "mirrored": "bool"})
        outliers = frame(d["outliers"], {"index": "int64", "score": "float64"})
        balance = frame(d["balance"], {"train": "int64", "val": "int64", "test": "int64", "total": "int64",
                                       "share": "float64"})
        return cls(dataset=d["dataset"], images=int(d["images"]), seconds=float(d["seconds"]), pairs=pairs,
                   outliers=outliers, balance=balance, advice=list(d.get("advice", [])),
                   notes=list(d.get("notes", [])))


def _count_side(leaks: pd.DataFrame, split: str) -> int:
    """Distinct images of ``split`` that have a copy in another split."""
    a = leaks.loc[leaks["split_a"] == split, "a"]
    b = leaks.loc[leaks["split_b"] == split, "b"]
    return len(set(a.tolist()) | set(b.tolist()))


def _balance_words(balance: pd.DataFrame) -> str:
    if balance.empty:
        return "no images"
    big, small = balance.loc[balance["total"].idxmax()], balance.loc[balance["total"].idxmin()]
    return (f"largest {big['class']} ({int(big['total']):,}), smallest {small['class']} "
            f"({int(small['total']):,})")


# --------------------------------------------------------------------------------------------------
# Reading: one pass over the images → pixel hashes, 32×32 thumbnails, sizes
# --------------------------------------------------------------------------------------------------

@dataclass
class _Scan:
    hashes: list[str]
    thumbs: np.ndarray        # N×FINE×FINE×C uint8 (area-averaged)
    sizes: np.ndarray         # N×2 (width, height) as stored


def _pixel_hash(a: np.ndarray, size: tuple[int, int]) -> str:
    h = hashlib.sha256(f"{size[0]}x{size[1]}:{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:20]


def _read_file(ds: LabDataset, i: int) -> tuple[str, Image.Image, tuple[int, int]]:
    """(pixel hash, image in ds.mode, stored size). Big JPEGs are decoded at 1/2..1/8 scale (the
    hash is then of that decode: byte-identical files still match)."""
    path = ds.image_path(i)
    try:
        with open_image_file(path) as im:
            size = im.size
            if im.format == "JPEG" and min(size) > DRAFT_ABOVE:
                im.draft(im.mode if im.mode in ("RGB", "L") else None, (FINE * 4, FINE * 4))
            im.load()
            im = convert_image(im, ds.mode)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"Image {ds.describe(i)} of {ds.name} cannot be read ({e}): it was changed or removed "
                        "after the dataset was loaded. Reload the dataset.") from None
    return _pixel_hash(np.asarray(im), size), im, size


def _thumb(im: Image.Image) -> np.ndarray:
    t = im.resize((FINE, FINE), Image.BOX) if im.size != (FINE, FINE) else im
    a = np.asarray(t, dtype=np.uint8)
    return a[..., None] if a.ndim == 2 else a


def _scan(ds: LabDataset, progress: Progress, share: float) -> _Scan:
    n = len(ds)
    channels = 1 if ds.mode == "L" else 3
    thumbs = np.empty((n, FINE, FINE, channels), dtype=np.uint8)
    sizes = np.empty((n, 2), dtype=np.int64)
    hashes: list[str] = []
    if isinstance(ds, ArrayDataset):
        return _scan_array(ds, thumbs, sizes, progress, share)
    for i in range(n):
        h, im, size = _read_file(ds, i)
        hashes.append(h)
        thumbs[i] = _thumb(im)
        sizes[i] = size
        if progress and (i + 1) % PROGRESS_EVERY == 0:
            progress(share * (i + 1) / n, f"Read {i + 1:,} of {n:,} images")
    return _Scan(hashes, thumbs, sizes)


def _scan_array(ds: ArrayDataset, thumbs: np.ndarray, sizes: np.ndarray, progress: Progress,
                share: float) -> _Scan:
    n = len(ds)
    data = ds.data if ds.data.ndim == 4 else ds.data[..., None]
    h, w = data.shape[1:3]
    sizes[:] = (w, h)
    hashes = [_pixel_hash(data[i], (w, h)) for i in range(n)]
    if (h, w) == (FINE, FINE):
        thumbs[:] = data
    else:
        for i in range(n):
            thumbs[i] = _thumb(ds.load_image(i))
            if progress and (i + 1) % PROGRESS_EVERY == 0:
                progress(share * (i + 1) / n, f"Read {i + 1:,} of {n:,} images")
    return _Scan(hashes, thumbs, sizes)


# --------------------------------------------------------------------------------------------------
# Features: normalised thumbnails, their mirror images and slightly cropped variants
# --------------------------------------------------------------------------------------------------

# Crops tried when aligning two pictures: (fraction of the side, where the kept part sits).
CROP_ANCHORS = ("tl", "tr", "bl", "br", "c")
COARSE_CROPS = tuple((0.05, p) for p in CROP_ANCHORS)
FINE_CROPS = tuple((f, p) for f in (0.03, 0.06) for p in CROP_ANCHORS)


def _normalise(x: np.ndarray) -> np.ndarray:
    """Each channel mean-centred (brightness, colour cast), each row L2-normalised (contrast);
    a one-colour image stays all zeros (similar to nothing)."""
    x = x.astype(np.float32)
    x = x - x.mean(axis=(1, 2), keepdims=True)
    x = x.reshape(len(x), -1)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 1e-3)


def _down(t: np.ndarray, size: int) -> np.ndarray:
    """N×S×S×C uint8 → N×size×size×C float32 by area averaging (S a multiple of size)."""
    f = t.shape[1] // size
    return t.astype(np.float32).reshape(len(t), size, f, size, f, t.shape[3]).mean(axis=(2, 4))


def _detail(x: np.ndarray) -> np.ndarray:
    """High-pass: each pixel minus the mean of its 3×3 neighbourhood (edges replicated)."""
    p = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = x.shape[1:3]
    blur = sum(p[:, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) / 9.0
    return x - blur


def _crop(thumbs: np.ndarray, frac: float, anchor: str) -> np.ndarray:
    """The thumbnails cropped by ``frac`` of their side (the kept part at ``anchor``), resized back."""
    n = thumbs.shape[1]
    d = max(1, round(n * frac))
    box = {"tl": (d, d, n, n), "tr": (0, d, n - d, n), "bl": (d, 0, n, n - d), "br": (0, 0, n - d, n - d),
           "c": ((d + 1) // 2, (d + 1) // 2, n - d // 2, n - d // 2)}[anchor]
    out = np.empty_like(thumbs)
    for i, t in enumerate(thumbs):
        im = Image.fromarray(t[..., 0] if t.shape[2] == 1 else t)
        out[i] = np.asarray(im.crop(box).resize((n, n), Image.BOX)).reshape(t.shape)
    return out


def _views(thumbs: np.ndarray, size: int, detail: bool = False) -> np.ndarray:
    """V×N×D: the normalised thumbnails at ``size`` (high-passed when ``detail``) and their mirror images."""
    x = _down(thumbs, size)
    if detail:
        x = _detail(x)
    return np.stack([_normalise(x), _normalise(x[:, :, ::-1])])


def _coarse_candidates(thumbs: np.ndarray, threshold: float, progress: Progress, span: tuple[float, float]
                       ) -> np.ndarray:
    """P×2 (a < b) pairs whose 8×8 views match above ``threshold`` in some alignment: one image
    as it is, mirrored, or cropped a little (five places), against the other as it is."""
    n = len(thumbs)
    target = _views(thumbs, 8)[0]
    queries = np.concatenate([_views(thumbs, 8)] + [_views(_crop(thumbs, f, p), 8) for f, p in COARSE_CROPS])
    found = []
    for start in range(0, n, BLOCK):
        stop = min(n, start + BLOCK)
        best = np.full((stop - start, n), -1.0, dtype=np.float32)
        for q in queries:
            np.maximum(best, q[start:stop] @ target.T, out=best)
        best[np.arange(stop - start), np.arange(start, stop)] = -1.0
        rows, cols = np.nonzero(best > threshold)
        found.append(np.stack([rows + start, cols], axis=1))
        if progress:
            progress(span[0] + (span[1] - span[0]) * stop / n, f"Compared {stop:,} of {n:,} images")
    pairs = np.concatenate(found) if found else np.zeros((0, 2), dtype=np.int64)
    pairs = np.sort(pairs, axis=1)
    return np.unique(pairs, axis=0) if len(pairs) else pairs.reshape(0, 2)


def _aligned(thumbs: np.ndarray, pairs: np.ndarray, detail: bool) -> tuple[np.ndarray, np.ndarray]:
    """For each pair, the best cosine similarity of the 16×16 views over the alignments (as is,
    mirrored, cropped 3 % or 6 % at five places, on either side), and whether the best was mirrored."""
    used = np.unique(pairs)
    where = np.full(len(thumbs), -1)
    where[used] = np.arange(len(used))
    t = thumbs[used]
    plain = _views(t, 16, detail)                     # 2×U×D (as is, mirrored)
    crops = [_views(_crop(t, f, p), 16, detail) for f, p in FINE_CROPS]
    a, b = where[pairs[:, 0]], where[pairs[:, 1]]
    best = np.full(len(pairs), -1.0, dtype=np.float32)
    mirrored = np.zeros(len(pairs), dtype=bool)
    for views in [plain] + crops:
        for m in (0, 1):
            s = np.maximum(np.einsum("pd,pd->p", views[m][a], plain[0][b]),
                           np.einsum("pd,pd->p", plain[0][a], views[m][b]))
            better = s > best
            best[better], mirrored[better] = s[better], bool(m)
    return best, mirrored


# --------------------------------------------------------------------------------------------------
# Pairs: exact groups and verified near pairs → one table
# --------------------------------------------------------------------------------------------------

def _exact_pairs(hashes: list[str], where: np.ndarray) -> list[tuple[int, int]]:
    groups: dict[str, list[int]] = {}
    for i, h in enumerate(hashes):
        groups.setdefault(h, []).append(i)
    out: list[tuple[int, int]] = []
    for members in groups.values():
        if len(members) < 2:
            continue
        if len(members) <= ALL_PAIRS_MAX:
            out += [(a, b) for k, a in enumerate(members) for b in members[k + 1:]]
            continue
        anchors = {}
        for m in members:                       # the first member of each split
            anchors.setdefault(where[m], m)
        out += sorted({(min(a, m), max(a, m)) for a in anchors.values() for m in members if m != a})
    return out


def _near_pairs(thumbs: np.ndarray, exact: list[tuple[int, int]], threshold: float, progress: Progress,
                span: tuple[float, float], notes: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    cand = _coarse_candidates(thumbs, COARSE_THRESHOLD, progress, span)
    if len(cand) and exact:
        known = {(a, b) for a, b in exact}
        cand = cand[[(int(a), int(b)) not in known for a, b in cand]]
    if len(cand) > MAX_NEAR_PAIRS:
        notes.append(f"{len(cand):,} candidate pairs of near duplicates: only the first {MAX_NEAR_PAIRS:,} "
                     "were verified (a set of many near-identical pictures).")
        cand = cand[:MAX_NEAR_PAIRS]
    if not len(cand):
        return cand.reshape(0, 2), np.zeros(0, np.float32), np.zeros(0, bool)
    sim, mirrored = _aligned(thumbs, cand, detail=False)
    keep = sim >= threshold
    cand, sim, mirrored = cand[keep], sim[keep], mirrored[keep]
    if len(cand):
        detail, _ = _aligned(thumbs, cand, detail=True)
        keep = detail >= DETAIL_THRESHOLD
        cand, sim, mirrored = cand[keep], sim[keep], mirrored[keep]
    return cand, sim, mirrored


def _pair_table(ds: LabDataset, where: np.ndarray, exact: list[tuple[int, int]], near: np.ndarray,
                sim: np.ndarray, mirrored: np.ndarray) -> pd.DataFrame:
    a = np.array([p[0] for p in exact] + near[:, 0].tolist(), dtype=np.int64)
    b = np.array([p[1] for p in exact] + near[:, 1].tolist(), dtype=np.int64)
    df = pd.DataFrame({"a": a, "b": b, "split_a": where[a] if len(a) else [], "split_b": where[b] if len(b) else [],
                       "kind": ["exact"] * len(exact) + ["near"] * len(near),
                       "similarity": [1.0] * len(exact) + np.round(sim.astype(float), 4).tolist(),
                       "mirrored": [False] * len(exact) + mirrored.tolist()})
    df["leak"] = (df["split_a"] != df["split_b"]) & (df["split_a"] != "") & (df["split_b"] != "")
    df["file_a"] = [ds.describe(int(i)) for i in df["a"]]
    df["file_b"] = [ds.describe(int(i)) for i in df["b"]]
    df["class_a"] = [ds.classes[ds.targets[int(i)]] for i in df["a"]]
    df["class_b"] = [ds.classes[ds.targets[int(i)]] for i in df["b"]]
    df = df.astype({"split_a": str, "split_b": str, "leak": bool, "mirrored": bool, "similarity": "float64"})
    order = df.assign(_k=df["kind"] != "exact").sort_values(["leak", "_k", "similarity", "a", "b"],
                                                            ascending=[False, True, False, True, True])
    return order[PAIR_COLUMNS].reset_index(drop=True)


# --------------------------------------------------------------------------------------------------
# Outliers
# --------------------------------------------------------------------------------------------------

def _robust_z(x: np.ndarray, floor: float) -> np.ndarray:
    med = np.median(x)
    spread = max(1.4826 * float(np.median(np.abs(x - med))), floor)
    return (x - med) / spread


def _size_outliers(sizes: np.ndarray) -> list[tuple[int, str, float]]:
    out = []
    w, h = sizes[:, 0].astype(float), sizes[:, 1].astype(float)
    med_w, med_h = np.median(w), np.median(h)
    za = _robust_z(np.log(w * h), SIZE_SPREAD_FLOOR)
    zr = _robust_z(np.log(w / h), ASPECT_SPREAD_FLOOR)
    for i in np.nonzero((np.abs(za) > SIZE_Z) | (np.abs(zr) > SIZE_Z))[0]:
        i = int(i)
        what = "larger" if za[i] > SIZE_Z else "smaller" if za[i] < -SIZE_Z else "shaped differently"
        out.append((i, f"size {int(w[i])}×{int(h[i])}: much {what} than most ({med_w:.0f}×{med_h:.0f})"
                    if what != "shaped differently" else
                    f"aspect ratio {w[i] / h[i]:.2f}: far from most images ({med_w / med_h:.2f})",
                    round(float(max(abs(za[i]), abs(zr[i])) / SIZE_Z), 3)))
    return out


def _blank_outliers(thumbs: np.ndarray) -> list[tuple[int, str, float]]:
    std = thumbs.reshape(len(thumbs), -1, thumbs.shape[3]).astype(np.float32).std(axis=1).max(axis=1)
    return [(int(i), f"almost blank: one colour (pixel spread {std[i]:.1f} of 255)",
             round(float(BLANK_STD / max(std[i], 0.1)), 3)) for i in np.nonzero(std < BLANK_STD)[0]]


def _class_outliers(thumbs: np.ndarray, targets: np.ndarray, classes: list[str], skip: set[int]
                    ) -> list[tuple[int, str, float]]:
    """Images whose K-th most similar image of the same class is far less similar than usual there."""
    views = _views(thumbs, 16)
    out = []
    for c in np.unique(targets):
        members = np.array([i for i in np.nonzero(targets == c)[0] if int(i) not in skip])
        if len(members) < KNN_MIN_CLASS:
            continue
        x, xm = views[0][members], views[1][members]
        kth = np.empty(len(members), np.float32)
        for s in range(0, len(members), BLOCK):
            sim = np.maximum(x[s:s + BLOCK] @ x.T, x[s:s + BLOCK] @ xm.T)
            sim[np.arange(len(sim)), np.arange(s, s + len(sim))] = -1.0
            kth[s:s + len(sim)] = -np.partition(-sim, KNN_K - 1, axis=1)[:, KNN_K - 1]
        z = -_robust_z(kth, 0.01)
        for k in np.nonzero(z > KNN_Z)[0]:
            out.append((int(members[k]), f"unlike the other {classes[int(c)]} images (its {KNN_K}th most similar "
                        f"one matches {kth[k]:.2f}, typical {np.median(kth):.2f})", round(float(z[k] / KNN_Z), 3)))
    return out


def _outlier_table(ds: LabDataset, scan: _Scan, where: np.ndarray) -> pd.DataFrame:
    blank = _blank_outliers(scan.thumbs)
    rows = blank + _size_outliers(scan.sizes)
    rows += _class_outliers(scan.thumbs, np.asarray(ds.targets), ds.classes, {i for i, _, _ in blank})
    merged: dict[int, tuple[list[str], float]] = {}
    for i, reason, score in rows:
        reasons, best = merged.get(i, ([], 0.0))
        merged[i] = (reasons + [reason], max(best, score))
    df = pd.DataFrame([{"index": i, "split": str(where[i]), "reason": "; ".join(r), "score": s,
                        "file": ds.describe(i), "class": ds.classes[ds.targets[i]]} for i, (r, s) in merged.items()],
                      columns=OUTLIER_COLUMNS)
    df = df.astype({"index": "int64", "score": "float64"})
    return df.sort_values(["score", "index"], ascending=[False, True]).reset_index(drop=True)


# --------------------------------------------------------------------------------------------------
# Balance and advice
# --------------------------------------------------------------------------------------------------

def _balance_table(ds: LabDataset, where: np.ndarray) -> pd.DataFrame:
    targets = np.asarray(ds.targets, dtype=np.int64)
    k = len(ds.classes)
    cols = {s: np.bincount(targets[where == s], minlength=k) for s in SPLITS}
    total = np.bincount(targets, minlength=k)
    df = pd.DataFrame({"class": ds.classes, **cols, "total": total})
    df["share"] = np.round(total / max(1, total.sum()), 4)
    return df[BALANCE_COLUMNS].astype({s: "int64" for s in (*SPLITS, "total")})


def _n(count: int, one: str, many: str | None = None) -> str:
    return f"{count:,} {one if count == 1 else (many or one + 's')}"


def _leak_advice(pairs: pd.DataFrame) -> list[str]:
    leaks = pairs[pairs["leak"]]
    out = []
    for split, what, harm in (("test", "test", "test accuracy is inflated"),
                              ("val", "validation", "validation accuracy (and the best epoch) is flattered")):
        with_train = leaks[((leaks["split_a"] == split) & (leaks["split_b"] == "train")) |
                           ((leaks["split_b"] == split) & (leaks["split_a"] == "train"))]
        n = _count_side(with_train, split)
        if n:
            out.append(f"{_n(n, what + ' image')} also {'sits' if n == 1 else 'sit'} in the training set "
                       f"(as {'an exact or near' if n == 1 else 'exact or near'} copies): {harm}. Remove their "
                       f"training copies ({_n(len(leak_removals_of(with_train)), 'image')}, one click) so the "
                       f"{what} set measures pictures the model has never seen.")
    vt = leaks[leaks["split_a"].isin(["val", "test"]) & leaks["split_b"].isin(["val", "test"])]
    if len(vt):
        out.append(f"{_n(_count_side(vt, 'test'), 'test image')} also {'sits' if len(vt) == 1 else 'sit'} in the "
                   "validation set: remove the validation copies.")
    return out


def _duplicate_advice(pairs: pd.DataFrame) -> list[str]:
    out = []
    dups = pairs[~pairs["leak"]]
    for split, what in (("train", "training"), ("val", "validation"), ("test", "test"), ("", "")):
        inside = dups[(dups["split_a"] == split) & (dups["split_b"] == split)]
        extra = len(_extra_copies(inside))
        if not extra:
            continue
        where = f"{what} " if what else ""
        effect = ("they count twice in the test accuracy" if split == "test" else
                  "the model sees them more often than the rest")
        out.append(f"{_n(extra, where + 'image')} {'is a copy' if extra == 1 else 'are copies'} of another "
                   f"{where}image ({_n(len(inside), 'pair')}, exact or near): {effect}. Remove the extra "
                   "copies (keep one of each).")
    return out


def _outlier_advice(outliers: pd.DataFrame) -> list[str]:
    if outliers.empty:
        return []
    kinds = [("almost blank", "almost blank"), ("size ", "of an unusual size"), ("aspect", "of an unusual shape"),
             ("unlike", "unlike the other images of their class")]
    parts = [f"{int(outliers['reason'].str.contains(key, regex=False).sum()):,} {words}" for key, words in kinds
             if outliers["reason"].str.contains(key, regex=False).any()]
    return [f"{_n(len(outliers), 'image')} {'looks' if len(outliers) == 1 else 'look'} unlike the rest "
            f"({', '.join(parts)}): look at them and remove those that are not a picture of their class."]


def _balance_advice(balance: pd.DataFrame, with_split: bool) -> list[str]:
    col = "train" if with_split and balance["train"].sum() else "total"
    counts = balance.set_index("class")[col]
    if counts.empty:
        return []
    out = []
    big, small = counts.idxmax(), counts.idxmin()
    what = "training images" if col == "train" else "images"
    if counts[small] > 0 and counts[big] >= IMBALANCE_RATIO * counts[small]:
        out.append(f"The largest class ({big}, {counts[big]:,} {what}) has {counts[big] / counts[small]:.1f}× as "
                   f"many as the smallest ({small}, {counts[small]:,}): the model will lean towards the large "
                   f"classes. Use Class weights: balanced under Train → More settings, or add images of {small}.")
    few = [c for c, v in counts.items() if v < FEW_IMAGES]
    if few:
        out.append(f"{_n(len(few), 'class', 'classes')} {'has' if len(few) == 1 else 'have'} fewer than "
                   f"{FEW_IMAGES} {what} ({', '.join(f'{c}: {counts[c]}' for c in few[:8])}): add images of "
                   f"{'it' if len(few) == 1 else 'them'}, at least 50 each is a sensible start.")
    return out


# --------------------------------------------------------------------------------------------------
# What the one-click fixes remove
# --------------------------------------------------------------------------------------------------

def _extra_copies(pairs: pd.DataFrame) -> list[int]:
    """All but the first (lowest index) image of each group of pairs linked together."""
    parent: dict[int, int] = {}

    def root(x: int) -> int:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in zip(pairs["a"].tolist(), pairs["b"].tolist()):
        ra, rb = root(int(a)), root(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return sorted(x for x in parent if root(x) != x)


def leak_removals_of(leaks: pd.DataFrame) -> list[int]:
    """The training-side image of each leak pair (the validation side of a validation/test pair):
    the test set stays as it is."""
    out = set()
    rank = {"train": 0, "val": 1, "test": 2}
    for a, b, sa, sb in zip(leaks["a"], leaks["b"], leaks["split_a"], leaks["split_b"]):
        out.add(int(a) if rank.get(sa, 3) <= rank.get(sb, 3) else int(b))
    return sorted(out)


def leak_removals(report: HealthReport) -> list[int]:
    """What "remove the training copies of leaks" removes: the train-side index of every leak pair."""
    return leak_removals_of(report.leaks())


def duplicate_removals(report: HealthReport) -> list[int]:
    """Within-train duplicates: all but the first of each group (exact and near)."""
    dups = report.duplicates()
    return _extra_copies(dups[(dups["split_a"] == "train") & (dups["split_b"] == "train")])


# --------------------------------------------------------------------------------------------------
# The check
# --------------------------------------------------------------------------------------------------

def _split_names(ds: LabDataset, split: Split | None) -> np.ndarray:
    """The split of each image: from ``split``, else the source's own (ds.splits), else ""."""
    where = np.full(len(ds), "", dtype=object)
    parts = split.to_dict() if split is not None else (ds.splits or {})
    for name in SPLITS:
        idx = [int(i) for i in parts.get(name, []) or []]
        if idx:
            where[idx] = name
    return where


def check_health(ds: LabDataset, split: Split | None = None, *, near_threshold: float = NEAR_THRESHOLD,
                 progress: Progress = None, max_images: int | None = None) -> HealthReport:
    """Duplicates, leaks, outliers and balance of ``ds`` (see the module docstring)."""
    if max_images is not None and len(ds) > max_images:
        raise DataError(f"{ds.name} has {len(ds):,} images; the health check here takes at most {max_images:,}. "
                        f"Check a smaller dataset (or a subset of it), or run `python -m core.clean health` on "
                        f"the server's command line, which has no limit.")
    if not 0 < near_threshold <= 1:
        raise DataError(f"near_threshold must be in (0, 1], got {near_threshold!r}.")
    start = time.perf_counter()
    where = _split_names(ds, split)
    notes: list[str] = []
    scan = _scan(ds, progress, 0.5)
    exact = _exact_pairs(scan.hashes, where)
    near, sim, mirrored = _near_pairs(scan.thumbs, exact, near_threshold, progress, (0.5, 0.9), notes)
    pairs = _pair_table(ds, where, exact, near, sim, mirrored)
    if progress:
        progress(0.9, "Looking for outliers")
    outliers = _outlier_table(ds, scan, where)
    balance = _balance_table(ds, where)
    with_split = bool((where != "").any())
    advice = _leak_advice(pairs) + _duplicate_advice(pairs) + _outlier_advice(outliers)
    advice += _balance_advice(balance, with_split)
    if not advice:
        advice = ["No duplicates, leaks or outliers found, and the classes are balanced: nothing to fix."]
    if not with_split:
        notes.append("No split given: duplicates are listed, but leaks between train/val/test cannot be told.")
    if progress:
        progress(1.0, "Done")
    return HealthReport(dataset=ds.name, images=len(ds), seconds=round(time.perf_counter() - start, 2),
                        pairs=pairs, outliers=outliers, balance=balance, advice=advice, notes=notes)


# --------------------------------------------------------------------------------------------------
# Cache and gallery pictures
# --------------------------------------------------------------------------------------------------

_CACHE_LOCKS: dict[str, threading.Lock] = {}
_CACHE_LOCKS_GUARD = threading.Lock()


def health_key(ds: LabDataset, split: Split | None, **kw) -> str:
    """Digest of the dataset's source, its file list (name, label, size and modification time of each
    file), the split and the settings: equal keys give equal reports."""
    h = hashlib.sha256(json.dumps({"v": CACHE_VERSION, "source": ds.source, "name": ds.name, "classes": ds.classes,
                                   "split": split.to_dict() if split is not None else ds.splits,
                                   "kw": {k: kw[k] for k in sorted(kw) if k not in ("progress", "max_images")}},
                                  sort_keys=True, default=str).encode())
    for i in range(len(ds)):
        path = ds.image_path(i)
        try:
            st = os.stat(path) if path else None
        except OSError:
            st = None
        h.update(f"{ds.describe(i)}\t{ds.targets[i]}\t{st.st_size if st else ''}\t"
                 f"{st.st_mtime_ns if st else ''}\n".encode())
    if isinstance(ds, ArrayDataset):
        h.update(hashlib.sha256(np.ascontiguousarray(ds.data).tobytes()).digest())
    return h.hexdigest()[:24]


def cached_check_health(ds: LabDataset, split: Split | None, cache_dir: str | os.PathLike, **kw) -> HealthReport:
    """``check_health`` through a JSON cache in ``cache_dir``: callers with the same dataset, files and
    split wait for one computation and share its report (in this process; across processes, the file)."""
    key = health_key(ds, split, **kw)
    path = Path(cache_dir) / f"health-{key}.json"
    with _CACHE_LOCKS_GUARD:
        lock = _CACHE_LOCKS.setdefault(key, threading.Lock())
    with lock:
        if path.is_file():
            try:
                return HealthReport.from_dict(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError, KeyError, TypeError):
                pass   # a damaged cache file is computed again
        report = check_health(ds, split, **kw)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, report.to_dict(), indent=None)
        except OSError:
            pass       # a cache that cannot be written costs time, not the answer
        return report


def _fit(im: Image.Image, size: int) -> Image.Image:
    im = im.convert("RGB")
    im.thumbnail((size, size), Image.BICUBIC if max(im.size) < size else Image.LANCZOS)
    if max(im.size) < size:
        scale = size / max(im.size)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.NEAREST)
    tile = Image.new("RGB", (size, size), "white")
    tile.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
    return tile


def pair_image(ds: LabDataset, a: int, b: int, size: int = 96) -> Image.Image:
    """Images ``a`` and ``b`` side by side, each fitted into a ``size``×``size`` square (for galleries)."""
    gap = max(2, size // 24)
    out = Image.new("RGB", (2 * size + gap, size), "white")
    out.paste(_fit(ds.load_image(int(a)), size), (0, 0))
    out.paste(_fit(ds.load_image(int(b)), size), (size + gap, 0))
    ImageDraw.Draw(out).line([(size + gap // 2, 0), (size + gap // 2, size)], fill=(200, 200, 200))
    return out
