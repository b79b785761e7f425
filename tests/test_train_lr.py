"""The Train tab's part of "See inside the model" (issue 14), through its handlers on real tiny data:
the learning-rate finder (its plot, note and Use button, the server-safety settings of its event),
the "record distributions" switch, and the 95 % interval of the test accuracy a finished run shows."""
from __future__ import annotations

import re

import pytest

gr = pytest.importorskip("gradio")

from core import events as ev, rundir, stats  # noqa: E402
from core.config import RunConfig  # noqa: E402
from core.jobs import JobManager  # noqa: E402
from tests.test_explain import one_thread  # noqa: E402
from ui import tab_train  # noqa: E402
from ui.common import AppContext  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A Train tab built alone over a real job manager: (ctx, tab, demo)."""
    tmp = tmp_path_factory.mktemp("train_lr")
    manager = JobManager(runs_dir=tmp / "runs", data_dir=tmp / "data", max_jobs=1)
    ctx = AppContext(manager=manager, data_dir=tmp / "data", runs_dir=tmp / "runs", secret="k" * 32)
    with gr.Blocks() as demo:
        ctx.session = gr.State({})
        ctx.browser_id = gr.BrowserState(None)
        tab = tab_train.build(ctx)
    yield ctx, tab, demo
    manager.shutdown(timeout=10)


def values(ctx, session: dict, **by_field) -> dict:
    """What the finder receives: every config widget's value (its default unless given by its config
    field, e.g. ``data.batch_size``) and the session."""
    out = {w: by_field.get(f, w.value) for w, f in ctx.config_fields.items()}
    out[ctx.session] = session
    return out


@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory):
    """Three classes any model learns within a few dozen steps: reddish, greenish and bluish noise
    (the tiny CIFAR cut does not: its loss moves by 1 % in 100 steps, and the finder rightly says so)."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for split, n in (("train", 60), ("test", 10)):
        for k, name in enumerate(("red", "green", "blue")):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 120, (32, 32, 3))
                pixels[..., k] += 120
                Image.fromarray(pixels.astype("uint8")).save(root / split / name / f"{i}.png")
    return root


def folder_session(folder) -> dict:
    """A page whose Data tab loaded ``folder``."""
    return {"data_source": {"source": "folder", "location": str(folder)}}


def test_the_finder_plots_the_loss_on_a_log_axis_and_use_puts_its_suggestion_into_lr(lab, colour_folder):
    ctx, tab, _ = lab
    session = folder_session(colour_folder)
    with one_thread():
        plot, note, use = tab.find_lr(values(ctx, session, **{"data.batch_size": 16, "device": "cpu"}))
    fig = plot["value"]
    assert plot["visible"] and fig.layout.xaxis.type == "log"
    assert [t.name for t in fig.data][:2] == ["loss of each step", "smoothed loss"]
    assert fig.data[1].line.width > fig.data[0].line.width   # smoothed bold, raw faint
    suggestion = session["lr_suggestion"]
    assert suggestion is not None and tab_train.LR_FINDER_START <= suggestion <= 10
    assert len(fig.data[0].x) <= tab_train.LR_FINDER_STEPS and min(fig.data[0].x) == pytest.approx(tab_train.LR_FINDER_START)
    assert use == {"__type__": "update", "value": f"Use {suggestion:g}", "visible": True}
    assert f"Suggested learning rate: {suggestion:g}" in note and ("steepest descent" in note or "lowest smoothed loss" in note)
    assert "rule of thumb" in note and "threw it away" in note and "tutorial\\_net" in note
    assert ("stopped early" in note) or ("without diverging" in note)
    assert str(colour_folder) not in note   # no server path in a message
    assert tab.use_lr(session) == suggestion   # exactly what the button says
    # nothing was trained for keeps: no run, no run folder
    assert ctx.manager.jobs() == [] and not any(ctx.runs_dir.glob("*/config.json"))


def test_use_without_a_suggestion_says_what_to_do(lab):
    _, tab, _ = lab
    with pytest.raises(gr.Error, match="press Find a learning rate first"):
        tab.use_lr({})


def test_without_a_dataset_the_finder_uses_the_sample_as_start_does_and_says_so(lab, session_data_dir, monkeypatch):
    ctx, tab, _ = lab
    monkeypatch.setattr(ctx, "data_dir", session_data_dir)   # the embedded sample, extracted once
    monkeypatch.setattr(tab_train, "LR_FINDER_STEPS", 20)
    session = {}
    with one_thread():
        _, note, _ = tab.find_lr(values(ctx, session, **{"data.batch_size": 16, "device": "cpu"}))
    assert "embedded CIFAR-10 sample (no other dataset was loaded on the Data tab)" in note
    assert session["data_source"] == {"source": "sample", "location": None}   # what Start would train on


def test_a_dataset_that_is_gone_or_a_bad_setting_gets_starts_message(lab, tmp_path):
    ctx, tab, _ = lab
    gone = {"data_source": {"source": "zip", "location": str(tmp_path / "upload.zip")}}
    with pytest.raises(gr.Error, match=r"Zip file upload\.zip does not exist \(any more\)\. Upload it again\."):
        tab.find_lr(values(ctx, gone, device="cpu"))
    with pytest.raises(gr.Error, match="Batch size must be a whole number such as 64, got 'abc'"):
        tab.find_lr(values(ctx, {}, **{"data.batch_size": "abc"}))


def test_the_finder_is_refused_when_the_run_would_not_fit_in_memory(lab, tiny_folder, monkeypatch):
    ctx, tab, _ = lab
    monkeypatch.setattr(ctx.manager, "max_job_memory", 1024)   # 1 KiB: no training run fits
    trained = []
    monkeypatch.setattr(tab_train.lrfinder, "find_lr", lambda *a, **k: trained.append(1))
    with pytest.raises(gr.Error, match="(?i)memory"):
        tab.find_lr(values(ctx, folder_session(tiny_folder), **{"data.batch_size": 16, "device": "cpu"}))
    assert trained == []


def test_the_finder_event_runs_one_at_a_time_with_its_progress_on_the_note(lab):
    ctx, tab, demo = lab
    fn = next(f for f in demo.fns.values() if f.name == "find_lr")
    assert fn.concurrency_limit == 1 and fn.concurrency_id == "lr_finder"
    assert [b._id for b in fn.show_progress_on] == [tab.w.lr_find_note._id]
    use = next(f for f in demo.fns.values() if f.name == "use_lr")
    assert [b._id for b in use.outputs] == [tab.w.lr._id]
    ids = {"lr_find_btn", "lr_find_plot", "lr_find_note", "lr_use_btn", "record_distributions", "lr"}
    assert ids <= {b.elem_id for b in demo.blocks.values()}


def test_the_record_switch_reaches_the_run_config(lab, tiny_folder):
    ctx, _, _ = lab
    box = next(w for w, f in ctx.config_fields.items() if f == "record_distributions")
    assert box.elem_id == "record_distributions" and box.value is False
    assert "Look inside" in box.label and "1 %" in box.info
    for on in (True, False):
        config = tab_train.page_config(ctx, values(ctx, folder_session(tiny_folder), record_distributions=on))
        assert config.record_distributions is on


def test_a_finished_run_shows_its_test_accuracy_with_the_wilson_interval(lab, tiny_folder):
    ctx, _, _ = lab
    config = RunConfig.from_dict({"data": {"source": "folder", "location": str(tiny_folder), "batch_size": 16,
                                           "num_workers": 0},
                                  "model": {"name": "tutorial_net"}, "epochs": 1, "device": "cpu", "seed": 0})
    job = ctx.manager.submit(config, owner="browser:x")
    ctx.manager.wait(job.job_id, timeout=180)
    assert job.status == ev.FINISHED, job.message
    status, _, _, log = tab_train._render(ctx, job, {})[:4]
    saved = rundir.read_eval(ctx.runs_dir / job.job_id)
    n = int(saved["num_samples"])
    assert n == 30   # tiny_folder's test split: 3 classes × 10 images
    iv = stats.wilson_interval(round(saved["accuracy"] * n), n)
    assert iv == stats.run_accuracy_interval(ctx.runs_dir / job.job_id)
    interval = f"(95 % CI {100 * iv.low:.1f}–{100 * iv.high:.1f} %, {n} images)"
    accuracy = f"test accuracy {saved['accuracy']:.1%} {interval}"
    assert accuracy in status.splitlines()[0]   # the Status line of the finished run
    evaluated = [line for line in log.splitlines() if re.search(r"\d\d  test accuracy", line)]
    assert len(evaluated) == 1 and accuracy in evaluated[0]   # the log line of the final evaluation
    assert sum(accuracy in line for line in log.splitlines()) >= 2   # and the finish line


def test_the_finder_stops_at_its_time_limit_and_the_note_says_so(lab, colour_folder, monkeypatch):
    """The finder runs in the server: a slow model is stopped after LR_FINDER_MAX_S, not left running."""
    ctx, tab, _ = lab
    monkeypatch.setattr(tab_train, "LR_FINDER_MAX_S", 0)
    with one_thread():
        plot, note, use = tab.find_lr(values(ctx, folder_session(colour_folder), **{"data.batch_size": 16,
                                                                                   "device": "cpu"}))
    assert "It stopped after 0 s" in note and f"(step 1 of {tab_train.LR_FINDER_STEPS})" in note
    assert "No suggestion" in note and "try the suggestion" not in note   # no caveat about a rate not given
    assert use["visible"] is False
