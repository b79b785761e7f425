"""Model comparison (core.compare): the plan, a real comparison through the job queue, the
leaderboard and its CSV, the confusion difference of two runs, and the Compare tab's handlers."""
from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

from core import compare, events as ev
from core.config import RunConfig
from core.errors import ConfigError, DataError, ModelError
from core.jobs import JobManager
from core.metrics import evaluate_predictions
from core.runs import META_FILE, RunHistory, load_run, read_meta


def _base(tiny_folder, **changes) -> RunConfig:
    raw = {"data": {"source": "folder", "location": str(tiny_folder), "batch_size": 16, "val_fraction": 0.1},
           "model": {"name": "tutorial_net"}, "optim": {"lr": 0.01}, "epochs": 1, "device": "cpu", "seed": 7}
    raw.update(changes)
    return RunConfig.from_dict(raw)


# ---- planning --------------------------------------------------------------------------------
def test_plan_is_the_cartesian_product_with_readable_names(tiny_folder):
    base = _base(tiny_folder, epochs=3)
    plan = compare.plan_comparison(base, ["tutorial_net", "resnet18"], lrs=[0.1, 0.01],
                                   freeze_modes=["none", "stages:2"])
    assert len(plan) == 8
    assert [c.name for c in plan[:4]] == ["tutorial_net lr=0.1 freeze=none", "tutorial_net lr=0.1 freeze=stages:2",
                                          "tutorial_net lr=0.01 freeze=none", "tutorial_net lr=0.01 freeze=stages:2"]
    assert [(c.model.name, c.optim.lr, c.model.freeze, c.model.freeze_stages) for c in plan[4:6]] == [
        ("resnet18", 0.1, "none", 0), ("resnet18", 0.1, "stages", 2)]
    for cfg in plan:  # everything but the compared settings is the base's
        assert cfg.data == base.data and cfg.seed == base.seed and cfg.epochs == 3
        assert cfg.optim.optimizer == base.optim.optimizer and cfg.data.train_augment == base.data.train_augment
    simple = compare.plan_comparison(base, ["resnet18", "lenet5", "resnet18"])
    assert [c.name for c in simple] == ["resnet18 lr=0.01", "lenet5 lr=0.01"]
    assert base.model.name == "tutorial_net" and base.name is None  # the base is not modified


def test_plan_rejects_bad_input_with_clear_messages(tiny_folder):
    base = _base(tiny_folder)
    with pytest.raises(ModelError, match="resnet18"):
        compare.plan_comparison(base, ["resnet-eighteen"])
    with pytest.raises(ConfigError, match="at least one model"):
        compare.plan_comparison(base, [])
    with pytest.raises(ConfigError, match="at most"):
        compare.plan_comparison(base, ["tutorial_net", "lenet5", "resnet18"], lrs=[0.1 / 2**i for i in range(9)])
    assert compare.parse_lrs(" 0.1, 1e-3;0.1 0.05") == [0.1, 0.001, 0.05]
    assert compare.parse_lrs("  ") is None
    with pytest.raises(ConfigError, match="not a number"):
        compare.parse_lrs("0.1, fast")
    with pytest.raises(ConfigError, match="positive"):
        compare.parse_lrs("-1")
    assert compare.parse_freeze_modes("none, Features, stages = 2") == ["none", "features", "stages:2"]
    with pytest.raises(ConfigError, match="stages:N"):
        compare.parse_freeze_modes("everything")


def test_a_comparison_with_a_run_that_cannot_fit_queues_nothing(tmp_path, tiny_folder):
    """Every run is checked against the memory it may use before any is queued: no half-queued
    group, no "queued" rows left in the history for runs that never start."""
    from core import resources
    base = _base(tiny_folder)
    cap = resources.training_memory(base, 3, [3, 32, 32], "cpu")   # what tutorial_net at batch 16 needs
    manager = JobManager(runs_dir=tmp_path / "runs", max_jobs=1, max_job_memory=cap)
    history = RunHistory(tmp_path / "runs").attach(manager)
    plan = compare.plan_comparison(base, ["tutorial_net", "resnet18"])
    with pytest.raises(ConfigError) as refused:
        compare.submit_comparison(manager, plan, owner="alice", history=history)
    text = str(refused.value)
    assert text.startswith("Run 2 of the comparison (resnet18, lr 0.01): This run needs about "), text
    assert "per training run (--max-job-memory)" in text and text.endswith("Nothing was queued.")
    assert manager.jobs() == [] and len(history.list()) == 0


# ---- a real comparison ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def comparison(tmp_path_factory, tiny_folder):
    runs_dir = tmp_path_factory.mktemp("cmp-runs")
    manager = JobManager(runs_dir=runs_dir, max_jobs=1)
    history = RunHistory(runs_dir).attach(manager)
    plan = compare.plan_comparison(_base(tiny_folder, epochs=2), ["tutorial_net", "lenet5"])
    group = compare.submit_comparison(manager, plan, owner="alice", history=history)
    queued_at_once = [manager.queue_position(r) for r in group.run_ids]
    for run_id in group.run_ids:
        manager.wait(run_id, timeout=180)
    return runs_dir, manager, history, group, queued_at_once


def test_a_comparison_queues_every_run_and_records_its_group(comparison):
    runs_dir, manager, history, group, queued_at_once = comparison
    assert str(group).startswith("cmp-") and len(group.run_ids) == 2
    assert queued_at_once[0] is None and queued_at_once[1] == 1   # one slot: the second one waited
    assert all(manager.get(r).status == ev.FINISHED for r in group.run_ids)
    rows = history.list(group_id=str(group))
    assert set(rows["run_id"]) == set(group.run_ids)
    assert set(rows["owner"]) == {"alice"}
    assert compare.group_run_ids(str(group)) == group.run_ids
    for run_id in group.run_ids:
        assert read_meta(runs_dir / run_id)["group_id"] == str(group)
    # After a restart the group is still known (from meta.json through the index).
    compare._GROUPS.pop(str(group))
    fresh = RunHistory(runs_dir)
    assert set(compare.group_run_ids(str(group), fresh)) == set(group.run_ids)
    (listed,) = compare.list_groups(fresh)     # the group is listed for the Compare tab, by owner too
    assert listed["group_id"] == str(group) and listed["run_ids"] == group.run_ids
    assert listed["owner"] == "alice" and listed["label"].endswith("2 run(s): tutorial_net, lenet5")
    assert [g["group_id"] for g in compare.list_groups(fresh, owner="alice")] == [str(group)]
    assert compare.list_groups(fresh, owner="bob") == []


def test_leaderboard_fills_every_column_and_sorts(comparison):
    runs_dir, manager, history, group, _ = comparison
    board = compare.leaderboard(history, group.run_ids)
    assert list(board.columns) == compare.LEADERBOARD_COLUMNS
    assert len(board) == 2 and not board.isna().any().any(), board.T
    assert set(board["model"]) == {"tutorial_net", "lenet5"}
    assert set(board["run"]) == {"tutorial_net lr=0.01", "lenet5 lr=0.01"}
    acc = list(board["test accuracy"])
    assert acc == sorted(acc, reverse=True)
    for _, row in board.iterrows():
        run_dir = runs_dir / row["run id"]
        assert row["checkpoint size (bytes)"] == (run_dir / "best.pth").stat().st_size
        assert 0 <= row["best val accuracy"] <= 1 and row["training time (s)"] > 0 and row["images/s"] > 0
        assert row["parameters"] >= row["trainable parameters"] > 0
        assert row["predicted training memory (bytes)"] > row["parameters"] * 4  # weights alone are 4 B each
        # The estimate is cached in the index and in meta.json.
        assert read_meta(run_dir)["predicted_memory"]["bytes"] == row["predicted training memory (bytes)"]
        assert history.get(row["run id"], refresh=False)["predicted_memory_bytes"] == \
            row["predicted training memory (bytes)"]
    by_params = compare.leaderboard(history, group.run_ids, sort_by="parameters")
    assert list(by_params["parameters"]) == sorted(by_params["parameters"])
    by_speed = compare.leaderboard(history, group.run_ids, sort_by="images/s")
    assert list(by_speed["images/s"]) == sorted(by_speed["images/s"], reverse=True)
    with pytest.raises(ConfigError, match="sort"):
        compare.leaderboard(history, group.run_ids, sort_by="beauty")
    # From RunRecords (no index) the same numbers come out.
    records = [load_run(runs_dir / r) for r in group.run_ids]
    from_records = compare.leaderboard(records)
    pd.testing.assert_frame_equal(from_records.drop(columns="training time (s)"),
                                  board.drop(columns="training time (s)"))


def test_leaderboard_csv_round_trip(comparison, tmp_path):
    _, _, history, group, _ = comparison
    board = compare.leaderboard(history, group.run_ids)
    path = compare.leaderboard_csv(board, tmp_path / "out" / "board.csv")
    assert path.read_text(encoding="utf-8").splitlines()[0] == ",".join(compare.LEADERBOARD_COLUMNS)
    back = compare.read_leaderboard_csv(path)
    pd.testing.assert_frame_equal(back, board, check_exact=False, rtol=1e-12)


# ---- two runs side by side ------------------------------------------------------------------
def _report(preds, names=("cat", "dog", "fox"), targets=(0, 0, 1, 1, 2, 2)):
    probs = np.eye(len(names))[list(preds)]
    return evaluate_predictions(probs, list(targets), list(names))


def test_confusion_difference_by_hand():
    a = _report([0, 0, 1, 0, 2, 2])   # recall cat 1, dog .5 (one dog → cat), fox 1
    b = _report([0, 1, 1, 1, 2, 0])   # recall cat .5 (cat → dog), dog 1, fox .5 (fox → cat)
    diff = compare.confusion_difference(a, b)
    assert list(diff.columns) == compare.DIFF_COLUMNS
    recall = diff[diff["kind"] == "recall"].set_index("true class")
    assert recall.loc["cat", ["A", "B", "difference"]].tolist() == [1.0, 0.5, -0.5]
    assert recall.loc["dog", ["A", "B", "difference"]].tolist() == [0.5, 1.0, 0.5]
    assert recall.loc["fox", ["A", "B", "difference"]].tolist() == [1.0, 0.5, -0.5]
    pairs = diff[diff["kind"] == "confusion"]
    got = {(r["true class"], r["predicted class"]): r["difference"] for _, r in pairs.iterrows()}
    assert got == {("cat", "dog"): 0.5, ("dog", "cat"): -0.5, ("fox", "cat"): 0.5}
    assert list(diff["kind"]) == ["recall"] * 3 + ["confusion"] * 3
    assert len(compare.confusion_difference(a, b, top_classes=1, top_pairs=1)) == 2
    assert compare.confusion_difference(a, a)["difference"].abs().max() == 0  # identical: only zero recall rows


def test_confusion_difference_reorders_classes_and_rejects_other_datasets():
    a = _report([0, 0, 1, 0, 2, 2])
    # The same predictions with the classes listed in another order.
    b_perm = _report([1, 1, 0, 1, 2, 2], names=("dog", "cat", "fox"), targets=(1, 1, 0, 0, 2, 2))
    same = compare.confusion_difference(a, b_perm)
    assert same["difference"].abs().max() == 0
    other = _report([0, 0, 1, 0, 2, 2], names=("cat", "dog", "owl"))
    with pytest.raises(DataError, match="different classes.*fox.*owl"):
        compare.confusion_difference(a, other)
    # eval.json dicts are accepted as they are.
    assert len(compare.confusion_difference(a.to_dict(), b_perm.to_dict())) == 3


# ---- the Compare tab's handlers, called as plain functions -----------------------------------
class _Request:
    """What a handler reads of a gr.Request: no login, one Gradio session."""
    username = None

    def __init__(self, session_hash: str):
        self.session_hash = session_hash


TEACHER = _Request("teacher-session")


def _ctx(comparison, tmp_path):
    from ui.common import AppContext

    runs_dir, manager, history, group, _ = comparison
    ctx = AppContext(manager=manager, data_dir=tmp_path / "data", runs_dir=runs_dir, history=history,
                     secret="k" * 32)
    ctx.teacher_sessions.add(TEACHER.session_hash)   # signed in on the page (the runs are alice's)
    return ctx, group


@pytest.fixture
def tab(comparison, tmp_path):
    """The tab's controller on its own: its handlers need no gr.Blocks."""
    from ui import tab_compare

    ctx, group = _ctx(comparison, tmp_path)
    yield ctx, tab_compare.CompareTab(ctx), group


@pytest.fixture
def built_tab(comparison, tmp_path):
    """The tab as the app builds it: "Train all" reads its inputs by widget."""
    import gradio as gr
    from ui import tab_compare

    ctx, group = _ctx(comparison, tmp_path)
    with gr.Blocks() as demo:
        ctx.session = gr.State(dict)
        ctx.browser_id = gr.BrowserState(None)
        ctx.shared["tab"] = {}
        controller = tab_compare.build(ctx)
        tab_compare.on_load(ctx, demo)
    assert ctx.shared["compare"] is controller and controller.w is not None
    yield ctx, controller, controller.w, group
    demo.close()


def test_the_controller_never_shows_the_context_in_a_repr(tab):
    """Gradio can put a callable's repr in the page config: a handler's must not show ctx (its
    teacher password, its secret)."""
    ctx, h, _ = tab
    ctx.teacher = ("tea", "chalk-and-talk")
    for text in (repr(h), repr(h.poll), repr(h.exporter("onnx"))):
        assert "k" * 32 not in text and "chalk-and-talk" not in text and "AppContext" not in text


def test_tab_shows_curves_leaderboard_and_side_by_side(tab):
    ctx, h, group = tab
    fig, board, queue, timer, pick_a, pick_b = h.show_selected(list(group.run_ids), None, None)
    assert [pick_a["value"], pick_b["value"]] == list(group.run_ids)   # the pair view starts with them
    assert len(fig.data) == 8      # 2 runs × (train, val) × (loss, accuracy)
    colors = {t.name: t.line.color for t in fig.data if t.showlegend}
    assert len(set(colors.values())) == 2   # one colour per run, the same in both panels
    from ui.tab_compare import LEADERBOARD_DISPLAY
    import gradio as gr
    cells = gr.Dataframe().postprocess(board)   # what the page gets: numbers, and text to show
    board = board.data
    assert list(board.columns) == LEADERBOARD_DISPLAY
    assert len(board) == 2 and board["predicted memory (MiB)"].notna().all()
    col = LEADERBOARD_DISPLAY.index("params")
    for row, shown in zip(cells.data, cells.metadata["display_value"]):
        assert isinstance(row[col], int) and shown[col] == f"{row[col]:,}" and "," in shown[col]   # 62,006
    assert "tutorial_net lr=0.01: finished" in queue
    csv_file = h.leaderboard_csv(list(group.run_ids))
    assert csv_file["visible"] is True   # the download box appears once there is a file
    assert pd.read_csv(csv_file["value"])["run"].tolist() == board["run"].tolist()   # same runs, same order
    a, b = group.run_ids
    cm_a, cm_b, summary, table, paired = h.show_pair(a, b, True)
    assert "A" in summary and "B" in summary and len(table) >= 3
    # honest numbers: each accuracy with its Wilson interval, the F1 with its bootstrap one, and
    # McNemar's paired test of the two runs on their shared test images, in words
    from core import stats
    from ui.common import md_text, run_history
    dirs = [run_history(ctx).run_dir(r) for r in (a, b)]
    for run_dir in dirs:
        acc, f1 = stats.run_accuracy_interval(run_dir), stats.run_macro_f1_interval(run_dir)
        assert f"(95 % CI {acc.span()})" in summary and f"({f1.span(percent=False)})" in summary
        assert acc.span() in set(board["test acc 95 % CI"])
    expected = stats.compare_runs(dirs[0], dirs[1], names=("A", "B"))
    assert paired.startswith(f"**Paired test (McNemar, on the same {expected.n:,} test images):**")
    assert md_text(expected.sentence) in paired
    assert "same run" in h.show_pair(a, a, True)[4]
    assert cm_a.data[0].type == "heatmap" and cm_b.data[0].type == "heatmap"
    plan = h.preview_plan(["tutorial_net", "lenet5"], "0.1, 0.01", "", 2)
    assert "4 run(s)" in plan
    assert "not a number" in h.preview_plan(["tutorial_net"], "abc", "", 2)


def test_tab_history_panel_rename_tag_export_and_delete(tab, tmp_path):
    import gradio as gr

    ctx, h, group = tab
    run_id = group.run_ids[0]
    msg, table = h.rename(run_id, "renamed in the UI", "", "(all)", None, TEACHER)
    assert "renamed in the UI" in msg and "renamed in the UI" in set(table["name"])
    from core import stats
    from ui.common import run_history
    row = table[table["run id"] == run_id].iloc[0]   # the test accuracy with its Wilson interval
    assert row["test acc 95 % CI"] == stats.run_accuracy_interval(run_history(ctx).run_dir(run_id)).span()
    msg, table = h.save_tags(run_id, "ui, test", "ui", "(all)", None, TEACHER)
    assert list(table["run id"]) == [run_id]   # the filter 'ui' applies
    assert list(table["owner"]) == ["alice"]
    from ui.tab_compare import owner_label
    assert [owner_label(o) for o in ("user:alice", None, "browser:3f9a2c77-e1", "")] == \
        ["alice", "command line", "browser 3f9a2c", "command line"]
    files, msg = h.export_metrics(run_id, None, TEACHER)
    assert any(f.endswith("-epochs.csv") for f in files)
    files, msg = h.export_checkpoint(run_id, None, TEACHER)
    assert files[0].endswith(f"{run_id}-best.pth")
    with pytest.raises(gr.Error, match="type its id"):
        h.delete(group.run_ids[1], "no", "", "(all)", list(group.run_ids), None, TEACHER)
    with pytest.raises(gr.Error, match="finished all its 2 epochs\\..*more epochs in all than 2"):
        h.resume(run_id, None, [], None, TEACHER)   # finished: only with more epochs
    with pytest.raises(gr.Error, match="finished all its 2 epochs"):
        h.resume(run_id, 0, [], None, TEACHER)      # the box's 0 means "as planned" too
    msg, chosen, _, box = h.resume(run_id, 3, [], None, TEACHER)
    assert msg.startswith(f"Resuming {run_id} from its last checkpoint, up to epoch 3") and chosen["value"] == [run_id]
    assert box == 0   # back to "as planned", so that it does not re-plan the next run resumed
    job = ctx.manager.wait(run_id, timeout=120)
    assert job.owner == "alice"   # resumed by the teacher, still alice's run
    assert job.status == ev.FINISHED and [e.epoch for e in job.events if isinstance(e, ev.EpochEnded)] == [3]
    with pytest.raises(gr.Error, match="Pick a run"):
        h.export_onnx(None, None, TEACHER)
    assert (ctx.runs_dir / run_id / META_FILE).is_file()
    # the new name shows in every run list: the Compare dropdowns and the Evaluate/Predict ones
    # (labels are names, values are run ids: never a folder)
    from ui.tab_compare import run_choices
    assert any(label.startswith("renamed in the UI · test ") for label, value in run_choices(ctx) if value == run_id)
    assert [label for label, value in ctx.history.choices(need="checkpoint") if value == run_id][0] \
        .startswith("renamed in the UI · test ")
    h.rename(run_id, "", "", "(all)", None, TEACHER)  # leave the shared comparison as it was
    h.save_tags(run_id, "", "", "(all)", None, TEACHER)
    labels = [label for label, value in run_choices(ctx) if value == run_id]
    assert labels and not labels[0].startswith("nan")   # no name: the config's, never "nan"


def test_a_run_that_ends_during_a_poll_keeps_the_timer_for_one_more_tick(tab, monkeypatch):
    """The leaderboard of a live run comes from the index (it can still say 'running'); when the
    run ends while that render is drawn, the timer must go on, or the page stays 'running'."""
    from ui import tab_compare
    ctx, h, group = tab
    h.show_selected(list(group.run_ids), None, None)   # memory estimates cached: busy stays False
    answers = iter([True])   # live when the poll looks first, ended ever after
    monkeypatch.setattr(tab_compare, "_live", lambda ctx_, ids: next(answers, False))
    out = h.poll(list(group.run_ids), None, None)
    assert out[4].active is True       # one more tick...
    out = h.poll(list(group.run_ids), None, None)
    assert out[4].active is False      # ...which re-reads the folders, then stops
    assert set(out[2].data["status"]) == {ev.FINISHED}


def test_the_timer_handlers_turn_a_failure_into_a_message(tab, monkeypatch):
    """A tick that fails shows a short message (ui.common.safe), never a stack trace."""
    import gradio as gr

    from ui import tab_compare
    _, h, group = tab

    def broken(ctx_, ids):
        raise RuntimeError("disk gone")
    monkeypatch.setattr(tab_compare, "_live", broken)
    with pytest.raises(gr.Error, match="Internal error in poll: RuntimeError: disk gone"):
        h.poll(list(group.run_ids), None, None)
    monkeypatch.setattr(tab_compare, "group_choices", lambda *a, **k: 1 / 0)
    with pytest.raises(gr.Error, match="Internal error in refresh_groups"):
        h.refresh_groups({}, None, None)

def test_tab_train_all_queues_a_comparison_on_the_data_tab_data(built_tab, tiny_folder):
    ctx, h, w, _ = built_tab
    from core import identity
    token = identity.sign(ctx.secret, "b0b1")   # this page's browser token (id b0b1)
    values = {ctx.session: {"data_source": {"source": "folder", "location": str(tiny_folder)}},
              ctx.browser_id: token, w.models: ["lenet5"], w.lrs: "0.05", w.freeze: "",
              w.epochs: 1}
    selected, fig, board, queue, timer = h.train_all(values, None)
    run_ids = selected["value"]
    assert len(run_ids) == 1 and "Queued 1 run" in queue
    job = ctx.manager.get(run_ids[0])
    assert job.owner == "browser:b0b1" and job.config.name == "lenet5 lr=0.05"
    assert job.config.data.location == str(tiny_folder) and job.config.epochs == 1
    ctx.manager.wait(run_ids[0], timeout=120)
    deadline = time.time() + 60
    while True:   # the timer keeps polling until the memory estimate of the finished run is in
        selected, fig, board, queue, timer, pick_a, pick_b, history = h.poll(run_ids, None, None)
        if isinstance(selected, dict) and "value" in selected or time.time() > deadline:
            break
        time.sleep(0.2)
    assert job.status == ev.FINISHED and "lenet5 lr=0.05: finished" in queue
    assert board.data["predicted memory (MiB)"].notna().all()
    assert selected["value"] == run_ids and any(run_ids[0] == v for _, v in selected["choices"])
    assert run_ids[0] in set(history["run id"])   # the last poll also shows the run in the history table
    from ui import tab_train   # a reloaded Train tab does not take the comparison's run for its own
    assert tab_train._current_job(ctx, {}, "browser:b0b1") is None

    # The comparison is listed, and a reloaded page (a fresh session, same browser) gets it back.
    session = {}
    group_update = h.refresh_groups(session, token, None)
    group_id = group_update["value"]
    assert group_id and group_id in {v for _, v in group_update["choices"]}
    group_update, selected, timer = h.reconnect(session, token, None)
    assert group_update["value"] == group_id and selected["value"] == run_ids and timer.active
    assert session["cmp_group"] == group_id
    group_update, _, _ = h.reconnect({}, "b0b1", None)   # the raw id is nobody: nothing picked
    assert "value" not in group_update
    # Picking the comparison in the list shows its runs, curves and leaderboard.
    selected, fig, board, queue, timer, pick_a, pick_b = h.pick_group(group_id, {})
    assert selected["value"] == run_ids and list(board.data["run"]) == ["lenet5 lr=0.05"]
    assert {t.name for t in fig.data if t.showlegend} == {"lenet5 lr=0.05 · train", "lenet5 lr=0.05 · val"}
    ctx.history.delete(run_ids[0], confirm=run_ids[0])   # keep the shared comparison as it was


def test_a_failing_memory_estimate_is_logged_with_its_trace_not_swallowed(tab, monkeypatch, caplog):
    """The leaderboard's memory column is filled in the background; a bug there used to vanish in
    an 'except Exception: pass'."""
    import logging
    import time as _time

    from ui import tab_compare

    ctx, _, group = tab
    run_id = group.run_ids[0]
    monkeypatch.setattr(ctx.history, "get", lambda r, refresh=False: {"run_id": r, "status": "finished",
                                                                       "predicted_memory_bytes": None, "params": 62006})

    def broken(history, run_ids, memory=False, **kwargs):
        raise ZeroDivisionError("a bug in the estimate")

    monkeypatch.setattr(tab_compare.compare, "leaderboard", broken)
    with caplog.at_level(logging.INFO, logger="ui.tab_compare"):
        assert tab_compare._estimate_memory_later(ctx, [run_id]) is True
        for _ in range(100):
            if not tab_compare._MEMORY_BUSY:
                break
            _time.sleep(0.05)
    records = [r for r in caplog.records if "memory estimate" in r.getMessage()]
    assert len(records) == 1 and records[0].exc_info[0] is ZeroDivisionError
