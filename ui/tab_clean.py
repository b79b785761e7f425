"""Clean data tab: find what is wrong with the loaded dataset and fix it without touching a file.

Data health (core.health: duplicates, train/test leaks, outliers, class balance), likely label
errors (core.labelissues: K-fold out-of-sample probabilities fed to cleanlab) in a review gallery
with Keep / Relabel / Remove, decisions kept as a dataset revision (core.revisions: the original
files never change; undo; a revision is what the Train tab trains on once picked here), and one
click that trains the same configuration on the original and on the cleaned labels as a comparison
(core.compare.plan_retrain), shown on the Compare tab.

Every handler checks who is asking: a page may change only its own revisions (the teacher: all),
and file keys always come from the server's own ranking or report, never from the page."""
from __future__ import annotations

import hashlib
import json
import logging
import threading
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
from PIL import Image

from core import compare, health, labelissues, revisions
from core.errors import ConfigError
from core.storage import atomic_write_text
from ui import plots
from ui.common import AppContext, Controller, config_from_widgets, md_text, run_history, safe, who_is

log = logging.getLogger(__name__)

PAGE = 12                      # review gallery images per page
MAX_FINDER_IMAGES = 20_000     # the finder trains K models in the server process: bounded
FINDER_SECONDS = 240           # and stops planning epochs beyond this
MAX_HEALTH_IMAGES = 50_000
GALLERY_MAX = 24
ORIGINAL = "Original labels"
FILTERS = ("Flagged as likely errors", "All, most suspicious first", "Already decided")
NO_DATA = "Load a dataset on the Data tab first."
NO_FINDER = "Press **Find likely label errors** first."
INTRO = ("**Find and fix the data.** Check it for duplicates, test images that also sit in the training set, "
         "odd images and class imbalance; let a quick model point at labels that look wrong; decide image by "
         "image. Your decisions are saved as a *revision*: the image files are never changed, and **Undo** "
         "takes any decision back. Then train the same model on the original and the cleaned labels and see "
         "what changed.")
_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock(key: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(key, threading.Lock())


def _data(session) -> tuple:
    """(dataset, split) the Data tab loaded, or a ConfigError saying to load one."""
    ds = (session or {}).get("dataset")
    split = (session or {}).get("split")
    if ds is None or split is None:
        raise ConfigError(NO_DATA)
    return ds, split


def _split_of(split) -> dict[int, str]:
    return {i: name for name in ("train", "val", "test") for i in getattr(split, name)}


class CleanTab(Controller):
    """The Clean data tab's handlers; the dataset, split and finder result live in the page's session."""

    def _who(self, browser_id, request):
        return who_is(self.ctx, request, browser_id)

    def _cache_dir(self) -> Path:
        return Path(self.ctx.data_dir) / "cleaning"

    # ---- revisions --------------------------------------------------------------------
    def _mine(self, ds, who) -> list:
        return revisions.list_revisions(self.ctx.data_dir, source=ds.source,
                                        owner=None if who.teacher else who.owner)

    def _choices(self, ds, who) -> list[tuple[str, str]]:
        return [(ORIGINAL, "")] + [(r.describe(), r.id) for r in self._mine(ds, who)]

    def _current(self, session):
        """(revision, version) the session trains on, or (None, 0) for the original labels."""
        ref = ((session or {}).get("data_source") or {}).get("revision")
        if not ref:
            return None, 0
        try:
            return revisions.load_revision(ref.split("@")[0], self.ctx.data_dir)
        except ConfigError:
            session["data_source"].pop("revision", None)
            return None, 0

    def _use(self, session, rev) -> None:
        source = session.setdefault("data_source", {"source": "sample", "location": None})
        if rev is None:
            source.pop("revision", None)
        else:
            source["revision"] = rev.ref()

    def _editable(self, session, ds, who):
        """The revision decisions go to: the session's (checked to be the caller's), else a new one."""
        rev, _ = self._current(session)
        if rev is None:
            rev = revisions.create_revision(ds, self.ctx.data_dir, owner=who.owner)
            self._use(session, rev)
            return rev, f"Started revision **{md_text(rev.name)}** for your decisions. "
        revisions.require_change(rev, who)
        return rev, ""

    def _bar(self, session, ds, who, lead: str = "") -> tuple:
        """(dropdown update, note) of the revision bar."""
        rev, _ = self._current(session)
        choices = self._choices(ds, who)
        if rev is None:
            note = "Training uses the dataset's **original labels**."
        else:
            note = (f"Training (Train and Compare tabs) uses **{md_text(rev.describe())}**. "
                    "The image files are unchanged.")
            if rev.edit_test():
                note += ("\n\n⚠️ Decisions on **test images** are applied too: test accuracy of runs on this "
                         "revision does not compare with runs on the original labels.")
        return gr.update(choices=choices, value=rev.id if rev else ""), lead + note

    @safe
    def refresh(self, session, browser_id, request: gr.Request):
        """The revision list and note for the dataset this page loaded."""
        ds = (session or {}).get("dataset")
        if ds is None:
            return gr.update(choices=[(ORIGINAL, "")], value=""), NO_DATA, gr.update(value=False)
        rev, _ = self._current(session)
        return self._bar(session, ds, self._who(browser_id, request)) + (gr.update(value=bool(rev and rev.edit_test())),)

    @safe
    def pick(self, session, rev_id, browser_id, request: gr.Request):
        ds, _ = _data(session)
        who = self._who(browser_id, request)
        if rev_id:
            rev = next((r for r in self._mine(ds, who) if r.id == rev_id), None)
            if rev is None:
                raise ConfigError("No such revision of this dataset among yours: pick one from the list.")
            self._use(session, rev)
        else:
            self._use(session, None)
        return self._bar(session, ds, who) + self._review(session)

    @safe
    def new_revision(self, session, browser_id, request: gr.Request):
        ds, _ = _data(session)
        who = self._who(browser_id, request)
        rev = revisions.create_revision(ds, self.ctx.data_dir, owner=who.owner)
        self._use(session, rev)
        return self._bar(session, ds, who, f"New revision **{md_text(rev.name)}** (no decisions yet). ") + \
            self._review(session)

    @safe
    def undo(self, session, browser_id, request: gr.Request):
        ds, _ = _data(session)
        who = self._who(browser_id, request)
        rev, _ = self._current(session)
        if rev is None:
            raise ConfigError("Nothing to undo: training uses the original labels (no revision picked).")
        revisions.require_change(rev, who)
        done = rev.undo()
        rev.save(self.ctx.data_dir)
        self._use(session, rev)
        lead = (f"Undone: {done['op']} of {md_text(done.get('file', ''))}. " if done else "Nothing left to undo. ")
        return self._bar(session, ds, who, lead) + self._review(session)

    @safe
    def edit_test(self, session, value, browser_id, request: gr.Request):
        ds, _ = _data(session)
        who = self._who(browser_id, request)
        rev, _ = self._current(session)
        if rev is None and not value:
            return self._bar(session, ds, who)
        rev, lead = self._editable(session, ds, who)
        rev.set_edit_test(bool(value))
        rev.save(self.ctx.data_dir)
        self._use(session, rev)
        return self._bar(session, ds, who, lead)

    # ---- data health ------------------------------------------------------------------
    @safe
    def check_health(self, session, progress=gr.Progress()):
        """Duplicates, leaks, outliers and balance of the loaded dataset (cached per dataset)."""
        ds, split = _data(session)
        progress(0.0, desc="Reading every image…")
        report = health.cached_check_health(ds, split, self._cache_dir(), max_images=MAX_HEALTH_IMAGES,
                                            progress=lambda f, text: progress(f, desc=text))
        session["clean_health"] = report
        return health_view(ds, report)

    def _remove_many(self, session, indices, browser_id, request, what: str):
        ds, split = _data(session)
        who = self._who(browser_id, request)
        if not indices:
            raise ConfigError(f"There are no {what} to remove: run the health check first, or it found none.")
        rev, lead = self._editable(session, ds, who)
        where = _split_of(split)
        for i in indices:
            rev.remove(ds, int(i), split=where.get(int(i), ""))
        rev.save(self.ctx.data_dir)
        self._use(session, rev)
        return self._bar(session, ds, who, f"{lead}Removed {len(indices)} {what} (in the revision only). ")

    @safe
    def fix_leaks(self, session, browser_id, request: gr.Request):
        report = (session or {}).get("clean_health")
        return self._remove_many(session, health.leak_removals(report) if report else [], browser_id, request,
                                 "training copies of leaked images")

    @safe
    def fix_duplicates(self, session, browser_id, request: gr.Request):
        report = (session or {}).get("clean_health")
        return self._remove_many(session, health.duplicate_removals(report) if report else [], browser_id,
                                 request, "duplicate training images")

    # ---- likely label errors ----------------------------------------------------------
    @safe
    def find(self, session, folds, method, progress=gr.Progress()):
        ds, split = _data(session)
        indices = list(split.train) + list(split.val)
        if len(indices) > MAX_FINDER_IMAGES:
            raise ConfigError(f"The label finder checks at most {MAX_FINDER_IMAGES:,} images here and this "
                              f"dataset has {len(indices):,} to check. Run `python -m core.clean labels` on the "
                              "server for big sets.")
        folds = int(folds or labelissues.DEFAULT_FOLDS)
        issues = self._find_cached(ds, split, indices, folds, str(method or "auto"), progress)
        session["clean_issues"] = issues
        session["clean_page"], session["clean_pos"] = 0, 0
        session["clean_filter"] = FILTERS[0]
        return (finder_note(issues), gr.update(value=FILTERS[0])) + self._review(session)

    def _find_cached(self, ds, split, indices, folds, method, progress):
        key = hashlib.sha256(json.dumps([revisions.dataset_key(ds.source), len(ds), indices, folds, method],
                                        default=str).encode()).hexdigest()[:20]
        path = self._cache_dir() / f"labels-{key}.json"
        with _lock(key):
            if path.is_file():
                try:
                    return labelissues.LabelIssues.from_dict(json.loads(path.read_text(encoding="utf-8")))
                except (OSError, ValueError, KeyError) as err:
                    log.warning("label finder cache %s unreadable (%s): computing again", path, err)
            progress(0.0, desc="Training quick models on each fold…")
            issues = labelissues.find_label_issues(
                ds, indices, folds=folds, method=method, max_seconds=FINDER_SECONDS, splits=_split_of(split),
                progress=lambda f, text: progress(f, desc=text))
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(issues.to_dict()))
            return issues

    @safe
    def set_filter(self, session, which):
        if which not in FILTERS:
            raise ConfigError(f"Show one of: {', '.join(FILTERS)}.")
        session["clean_filter"], session["clean_page"], session["clean_pos"] = which, 0, 0
        return self._review(session)

    @safe
    def page(self, session, step: int):
        rows = self._rows(session)
        pages = max(1, -(-len(rows) // PAGE))
        session["clean_page"] = min(max(0, session.get("clean_page", 0) + step), pages - 1)
        session["clean_pos"] = session["clean_page"] * PAGE
        return self._review(session)

    @safe
    def prev_page(self, session):
        return self.page(session, -1)

    @safe
    def next_page(self, session):
        return self.page(session, 1)

    @safe
    def select(self, session, evt: gr.SelectData):
        session["clean_pos"] = session.get("clean_page", 0) * PAGE + int(evt.index)
        return self._review(session)

    def _rows(self, session):
        issues = (session or {}).get("clean_issues")
        if issues is None:
            return None
        ranking = issues.ranking
        which = session.get("clean_filter", FILTERS[0])
        if which == FILTERS[0]:
            return ranking[ranking["flagged"]].reset_index(drop=True)
        if which == FILTERS[2]:
            rev, version = self._current(session)
            decided = set(rev.decisions(version)) if rev else set()
            return ranking[ranking["file"].isin(decided)].reset_index(drop=True)
        return ranking

    def _review(self, session) -> tuple:
        """(gallery, page text, detail image, detail text, relabel dropdown) for the session's page."""
        rows = self._rows(session)
        if rows is None:
            return [], NO_FINDER, None, "", gr.update(choices=[], value=None)
        ds, _ = _data(session)
        rev, version = self._current(session)
        decided = rev.decisions(version) if rev else {}
        pages = max(1, -(-len(rows) // PAGE))
        page = min(session.get("clean_page", 0), pages - 1)
        chunk = rows.iloc[page * PAGE:(page + 1) * PAGE]
        gallery = [(_thumb(ds.load_image(int(r["index"]))), caption(r, decided.get(r["file"])))
                   for _, r in chunk.iterrows()]
        text = f"Page {page + 1} of {pages} · {len(rows):,} image(s) · {session.get('clean_filter', FILTERS[0])}"
        pos = session.get("clean_pos", 0)
        if not len(rows) or pos >= len(rows):
            return gallery, text, None, "Nothing selected: click an image above.", gr.update(choices=[], value=None)
        row = rows.iloc[pos]
        detail = detail_text(row, pos, len(rows), decided.get(row["file"]))
        return (gallery, text, _big(ds.load_image(int(row["index"]))), detail,
                gr.update(choices=list(ds.classes), value=row["suggested"]))

    def _decide(self, session, op: str, label, browser_id, request):
        ds, _ = _data(session)
        rows = self._rows(session)
        if rows is None:
            raise ConfigError(NO_FINDER)
        pos = session.get("clean_pos", 0)
        if pos >= len(rows):
            raise ConfigError("Click an image in the gallery first.")
        row = rows.iloc[pos]
        who = self._who(browser_id, request)
        rev, lead = self._editable(session, ds, who)
        index, split = int(row["index"]), str(row.get("split", "") or "")
        if op == "relabel":
            rev.relabel(ds, index, label, split=split)
        else:
            getattr(rev, op)(ds, index, split=split)
        rev.save(self.ctx.data_dir)
        self._use(session, rev)
        if session.get("clean_filter") != FILTERS[2] and pos + 1 < len(rows):
            session["clean_pos"] = pos + 1                  # on to the next suspect
            session["clean_page"] = (pos + 1) // PAGE
        return self._bar(session, ds, who, lead) + self._review(session)

    @safe
    def keep(self, session, browser_id, request: gr.Request):
        return self._decide(session, "keep", None, browser_id, request)

    @safe
    def relabel(self, session, label, browser_id, request: gr.Request):
        if not label:
            raise ConfigError("Pick the class this image really shows in the list next to Relabel.")
        return self._decide(session, "relabel", label, browser_id, request)

    @safe
    def remove(self, session, browser_id, request: gr.Request):
        return self._decide(session, "remove", None, browser_id, request)

    # ---- retrain and compare -------------------------------------------------------------
    @safe
    def retrain(self, values: dict, request: gr.Request):
        """Train the Train tab's configuration on the original and on the picked revision, as one
        comparison, and open it on the Compare tab."""
        ctx = self.ctx
        session, browser_id = values[ctx.session], values[ctx.browser_id]
        ds, _ = _data(session)
        rev, version = self._current(session)
        if rev is None or not rev.summary(version)["relabelled"] + rev.summary(version)["removed"]:
            raise ConfigError("Relabel or remove at least one image first (or pick a revision that does): "
                              "there is nothing to compare with the original yet.")
        base = config_from_widgets(ctx, values, session)
        configs = compare.plan_retrain(base, rev.ref(version), ctx.data_dir)
        who = self._who(browser_id, request)
        group = compare.submit_comparison(ctx.manager, configs, who.owner, run_history(ctx))
        session["cmp_group"] = str(group)
        note = (f"Queued **{len(configs)} runs** of {md_text(base.model.name)} for {base.epochs} epoch(s), one on the "
                f"original labels and one on **{md_text(rev.describe(version))}**, same split and seed "
                f"(comparison {group}). The Compare tab follows them: curves, test accuracy with intervals, "
                "McNemar's test and the images one gets right and the other wrong.")
        cmp_tab = ctx.shared.get("compare")
        out = (gr.Tabs(selected="compare"), note)
        if cmp_tab is None:
            return out
        groups = cmp_tab.refresh_groups(session, browser_id, request)
        return out + (groups,) + tuple(cmp_tab.pick_group(str(group), session, browser_id, request))


def _thumb(img: Image.Image, size: int = 112) -> Image.Image:
    img = img.convert("RGB")
    scale = size / max(img.size)
    return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.NEAREST
                      if scale > 1 else Image.BILINEAR)


def _big(img: Image.Image) -> Image.Image:
    return _thumb(img, 256)


def caption(row, decision: dict | None) -> str:
    """'cat → dog? 87 %' and, once decided, what was decided."""
    text = f"{row['given']} → {row['suggested']}? {row['suggested_prob']:.0%}"
    if row["given"] == row["suggested"]:
        text = f"{row['given']} (model agrees, {row['given_prob']:.0%})"
    return text + (f" · {decision_words(decision)}" if decision else "")


def decision_words(decision: dict) -> str:
    op = decision.get("op")
    if op == "relabel":
        return f"✎ now {decision.get('label')}"
    return {"remove": "✗ removed", "keep": "✓ kept"}.get(op, op or "")


def detail_text(row, pos: int, total: int, decision: dict | None) -> str:
    lines = [f"**{md_text(row['file'])}** ({row.get('split') or 'train'}) — suspect {pos + 1} of {total}",
             f"Given label: **{md_text(row['given'])}** (the model gives it {row['given_prob']:.0%})",
             f"The model suggests: **{md_text(row['suggested'])}** ({row['suggested_prob']:.0%})"]
    if decision:
        lines.append(f"Decided: **{decision_words(decision)}** (Undo takes it back)")
    return "\n\n".join(lines)


def finder_note(issues) -> str:
    n, k = len(issues.ranking), int(issues.ranking["flagged"].sum())
    return (f"**{k:,} of {n:,} images** look mislabelled ({issues.method}; {issues.seconds:.0f} s). "
            f"Out of sample, the quick model agrees with {issues.oos_accuracy:.0%} of the given labels. "
            + " ".join(md_text(x) for x in issues.notes[1:3]))


def health_view(ds, report) -> tuple:
    """(summary, leaks gallery, duplicates gallery, outliers gallery, balance plot, fix-leaks button,
    fix-duplicates button) of a health report."""
    leaks, dups = report.leaks(), report.duplicates()
    pair = [(health.pair_image(ds, int(r["a"]), int(r["b"])),
             f"{r['file_a']} = {r['file_b']} ({r['kind']}{', mirrored' if r.get('mirrored') else ''})")
            for frame in (leaks, dups) for _, r in frame.head(GALLERY_MAX).iterrows()]
    outliers = [(_thumb(ds.load_image(int(r["index"]))), f"{r['file']}: {r['reason']}")
                for _, r in report.outliers.head(GALLERY_MAX).iterrows()]
    n_leaks, n_dups = len(health.leak_removals(report)), len(health.duplicate_removals(report))
    table = report.balance[[c for c in ("class", "train", "val", "test") if c in report.balance.columns]]
    return (report.summary(), pair[:min(len(leaks), GALLERY_MAX)], pair[min(len(leaks), GALLERY_MAX):], outliers,
            plots.class_distribution(table, title="Images per class and split"),
            gr.update(value=f"Remove the training copies of the {n_leaks} leaks", interactive=n_leaks > 0),
            gr.update(value=f"Remove {n_dups} duplicates (keep one of each)", interactive=n_dups > 0))


def layout(ctx: AppContext) -> SimpleNamespace:
    w = SimpleNamespace()
    gr.Markdown(INTRO, elem_id="clean_intro")
    with gr.Row():
        w.revision = gr.Dropdown([(ORIGINAL, "")], value="", label="Labels to train on", elem_id="clean_revision",
                                 scale=3)
        w.new = gr.Button("New revision", elem_id="clean_new", scale=1)
        w.undo = gr.Button("Undo last change", elem_id="clean_undo", scale=1)
    w.edit_test = gr.Checkbox(False, label="Also apply decisions to test images (test accuracy then no longer "
                                           "compares with the original)", elem_id="clean_edit_test")
    w.note = gr.Markdown(NO_DATA, elem_id="clean_revision_note")
    with gr.Accordion("1 · Data health: duplicates, leaks, outliers, balance", open=True):
        w.health_btn = gr.Button("Check data health", variant="primary", elem_id="clean_health_btn")
        w.health_summary = gr.Markdown("", elem_id="clean_health_summary")
        with gr.Row():
            w.leaks = gr.Gallery(label="Leaks: the same image in training and test/validation", columns=3, fit_columns=False, object_fit="contain",
                                 height=260, elem_id="clean_leaks", allow_preview=False)
            w.dups = gr.Gallery(label="Duplicates within one split", columns=3, height=260, fit_columns=False, object_fit="contain", elem_id="clean_dups",
                                allow_preview=False)
        with gr.Row():
            w.outliers = gr.Gallery(label="Outliers", columns=4, height=260, fit_columns=False, object_fit="contain", elem_id="clean_outliers",
                                    allow_preview=False)
            w.balance = gr.Plot(None, label="Class balance", elem_id="clean_balance")
        with gr.Row():
            w.fix_leaks = gr.Button("Remove the training copies of leaks", interactive=False, elem_id="clean_fix_leaks")
            w.fix_dups = gr.Button("Remove duplicates (keep one of each)", interactive=False, elem_id="clean_fix_dups")
    _review_box(w)
    with gr.Accordion("3 · Retrain and compare", open=True):
        gr.Markdown("Trains the **Train tab's settings** twice, on the original labels and on the revision picked "
                    "above, with the same split, seed and test images; the Compare tab then shows what changed.")
        w.retrain = gr.Button("Retrain on original and cleaned labels", variant="primary", size="lg",
                              elem_id="clean_retrain")
        w.retrain_note = gr.Markdown("", elem_id="clean_retrain_note")
    return w


def _review_box(w: SimpleNamespace) -> None:
    with gr.Accordion("2 · Likely label errors", open=True):
        with gr.Row():
            w.folds = gr.Slider(2, 10, value=labelissues.DEFAULT_FOLDS, step=1, label="Folds (K)",
                                elem_id="clean_folds", info="each image is judged by a model that never saw it")
            w.method = gr.Radio(["auto", "features", "cnn"], value="auto", label="Quick model", elem_id="clean_method",
                                info="auto: pretrained features when the weights are on disk, else a small CNN")
        w.find_btn = gr.Button("Find likely label errors", variant="primary", elem_id="clean_find_btn")
        w.find_note = gr.Markdown("", elem_id="clean_find_note")
        with gr.Row():
            w.filter = gr.Radio(list(FILTERS), value=FILTERS[0], label="Show", elem_id="clean_filter", scale=3)
            w.prev = gr.Button("◀ Previous page", elem_id="clean_prev", scale=1)
            w.next = gr.Button("Next page ▶", elem_id="clean_next", scale=1)
        w.page = gr.Markdown(NO_FINDER, elem_id="clean_page")
        with gr.Row():
            w.review = gr.Gallery(label="Suspects (click one)", columns=6, height=420, elem_id="clean_review",
                                  allow_preview=False, scale=3)
            with gr.Column(scale=2):
                w.detail_img = gr.Image(None, label="Selected image", interactive=False, height=256,
                                        elem_id="clean_detail_img")
                w.detail = gr.Markdown("", elem_id="clean_detail_text")
                w.keep = gr.Button("✓ Keep: the label is right", size="lg", elem_id="clean_keep")
                with gr.Row():
                    w.relabel_to = gr.Dropdown([], value=None, label="Relabel as", elem_id="clean_relabel_to", scale=2)
                    w.relabel = gr.Button("✎ Relabel", size="lg", elem_id="clean_relabel", scale=1)
                w.remove = gr.Button("✗ Remove from training", size="lg", variant="stop", elem_id="clean_remove")


def build(ctx: AppContext) -> CleanTab:
    w = layout(ctx)
    tab = CleanTab(ctx)
    tab.w = w
    ctx.shared["clean"] = tab
    me = ctx.browser_id
    bar = [w.revision, w.note]
    review = [w.review, w.page, w.detail_img, w.detail, w.relabel_to]
    private = {"api_visibility": "private"}
    w.revision.input(tab.pick, [ctx.session, w.revision, me], bar + review, **private)
    w.new.click(tab.new_revision, [ctx.session, me], bar + review, **private)
    w.undo.click(tab.undo, [ctx.session, me], bar + review, **private)
    w.edit_test.input(tab.edit_test, [ctx.session, w.edit_test, me], bar, **private)
    w.health_btn.click(tab.check_health, [ctx.session], [w.health_summary, w.leaks, w.dups, w.outliers, w.balance,
                                                          w.fix_leaks, w.fix_dups],
                       api_name="data_health", concurrency_limit=2, concurrency_id="data_health")
    w.fix_leaks.click(tab.fix_leaks, [ctx.session, me], bar, **private)
    w.fix_dups.click(tab.fix_duplicates, [ctx.session, me], bar, **private)
    w.find_btn.click(tab.find, [ctx.session, w.folds, w.method], [w.find_note, w.filter] + review,
                     api_name="find_label_errors", concurrency_limit=1, concurrency_id="label_finder")
    w.filter.input(tab.set_filter, [ctx.session, w.filter], review, **private)
    w.prev.click(tab.prev_page, [ctx.session], review, **private)
    w.next.click(tab.next_page, [ctx.session], review, **private)
    w.review.select(tab.select, [ctx.session], review, **private)
    w.keep.click(tab.keep, [ctx.session, me], bar + review, **private)
    w.relabel.click(tab.relabel, [ctx.session, w.relabel_to, me], bar + review, **private)
    w.remove.click(tab.remove, [ctx.session, me], bar + review, **private)
    return tab


def on_load(ctx: AppContext, demo: gr.Blocks) -> None:
    tab, w = ctx.shared["clean"], ctx.shared["clean"].w
    page_tab = ctx.shared.get("tab", {}).get("Clean data")
    if page_tab is not None:   # the dataset may have changed on the Data tab since
        page_tab.select(tab.refresh, [ctx.session, ctx.browser_id], [w.revision, w.note, w.edit_test],
                        api_visibility="private", show_progress="hidden")
    inputs = set(ctx.field_widgets()) | {ctx.session, ctx.browser_id}
    cmp_tab, tabs = ctx.shared.get("compare"), ctx.shared.get("tabs")
    outputs = [w.retrain_note]
    if cmp_tab is not None and tabs is not None:
        outputs = [tabs, w.retrain_note, cmp_tab.w.group, cmp_tab.w.selected] + cmp_tab.w.show_outputs

    @safe
    def retrain(values, request: gr.Request):
        out = tab.retrain(values, request)     # under safe: an error is a toast, not a tuple
        return out[1] if len(outputs) == 1 else out
    w.retrain.click(retrain, inputs, outputs, api_name="retrain_cleaned", concurrency_limit=2,
                    concurrency_id="retrain")

