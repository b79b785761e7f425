"""The Look inside tab (issue 14), through its handlers on real tiny runs of two browsers (no
server, no browser): first-layer filters trained beside initial, the layer list and feature maps
of an example image, recorded weight and gradient distributions with their verdict, a run that
recorded none, and access (someone else's run in --private-runs mode is refused)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

gr = pytest.importorskip("gradio")

from PIL import Image

from core import events as ev
from core import explain, gradstats, internals
from core.config import RunConfig
from tests.test_follow_run import Page, lab_context
from ui import app, tab_inside

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = sorted((ROOT / "assets" / "examples").glob("*.jpg"))[0]

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")



def _train(ctx, page: Page, folder: Path, record: bool, epochs: int) -> str:
    config = RunConfig.from_dict({"data": {"source": "folder", "location": str(folder), "batch_size": 16,
                                           "num_workers": 0}, "model": {"name": "tutorial_net"},
                                  "optim": {"lr": 0.02}, "epochs": epochs, "device": "cpu", "seed": 4,
                                  "record_distributions": record})
    job = ctx.manager.submit(config, owner=page.owner)
    ctx.manager.wait(job.job_id, timeout=180)
    assert job.status == ev.FINISHED, job.message
    page.session["last_run_id"] = job.job_id
    return job.job_id


@pytest.fixture(scope="module")
def lab(tmp_path_factory, tiny_folder):
    """Browser A trains 2 epochs with distributions recorded; browser B trains 1 epoch without."""
    ctx, _, (tab,) = lab_context(tmp_path_factory.mktemp("inside"), tab_inside)
    manager = ctx.manager
    a, b = Page("A", "a1a1"), Page("B", "b2b2")
    ids = {"run_b": _train(ctx, b, tiny_folder, record=False, epochs=1),
           "run_a": _train(ctx, a, tiny_folder, record=True, epochs=2)}
    yield {"ctx": ctx, "tab": tab, "a": a, "b": b, **ids}
    manager.shutdown(timeout=10)


def show(lab, page: Page, run_id: str):
    return dict(zip(["who", "trained", "initial", "kernel_note", "layer", "dist_layer", "plot", "dist_note"],
                    lab["tab"].show_run(run_id, page.token, page.request)))


def test_the_list_follows_this_browsers_own_run(lab):
    for page, own in ((lab["a"], lab["run_a"]), (lab["b"], lab["run_b"])):
        update = lab["tab"].refresh_runs(page.session, None, page.token, page.request)
        assert update.value == own
        assert {v for _, v in update.choices} == {lab["run_a"], lab["run_b"]}


def test_kernels_come_back_trained_beside_initial_and_the_note_names_the_layer(lab):
    out = show(lab, lab["a"], lab["run_a"])
    assert isinstance(out["trained"], Image.Image) and isinstance(out["initial"], Image.Image)
    assert out["trained"].size == out["initial"].size
    assert not np.array_equal(np.asarray(out["trained"]), np.asarray(out["initial"]))   # training moved them
    note = out["kernel_note"]
    assert "**conv1**: 6 filters of 5 × 5 pixels" in note and "Grey is 0" in note
    assert "changed each filter by" in note
    assert "tutorial_net" in out["who"] and "another browser" not in out["who"]
    assert "another browser" in show(lab, lab["a"], lab["run_b"])["who"]   # B's run, seen from A


def test_the_layer_list_is_the_models_feature_layers_with_a_middle_conv_chosen(lab):
    layer = show(lab, lab["a"], lab["run_a"])["layer"]
    model = explain.load_predictor(lab["ctx"].history.run_dir(lab["run_a"])).model
    table = internals.feature_layers(model, (3, 32, 32))
    assert [v for _, v in layer.choices] == table["layer"].tolist() == ["conv1", "conv2", "pool"]
    assert dict(layer.choices)["conv2 — Conv2d, 16 × 10 × 10"] == "conv2"
    assert layer.value == "conv2"


def test_feature_maps_of_an_example_show_the_chosen_number_of_channels(lab):
    a, tab = lab["a"], lab["tab"]
    grid, note = tab.feature_maps(lab["run_a"], Image.open(EXAMPLE), "conv2", 4, a.token, a.request)
    expected = internals.run_feature_maps(lab["ctx"].history.run_dir(lab["run_a"]), EXAMPLE, "conv2", max_channels=4)
    assert expected["maps"].shape[0] == 4
    assert np.array_equal(np.asarray(grid), np.asarray(expected["grid"]))
    assert note.startswith("The 4 most active of 16 channels of **conv2**") and "bright = strong" in note
    _, note = tab.feature_maps(lab["run_a"], Image.open(EXAMPLE), "conv1", 16, a.token, a.request)
    assert note.startswith("All 6 channels of **conv1**")
    grid, note = tab.feature_maps(lab["run_a"], None, "conv2", 16, a.token, a.request)
    assert grid is None and note == tab_inside.NO_IMAGE


def test_an_unknown_layer_or_channel_count_gets_a_clear_error(lab):
    a, tab = lab["a"], lab["tab"]
    with pytest.raises(gr.Error, match="choose one of: conv1, conv2, pool"):
        tab.feature_maps(lab["run_a"], Image.open(EXAMPLE), "fc1", 8, a.token, a.request)
    with pytest.raises(gr.Error, match="from 4 to 64"):
        tab.feature_maps(lab["run_a"], Image.open(EXAMPLE), "conv2", 500, a.token, a.request)
    with pytest.raises(gr.Error, match="not a recorded layer"):
        tab.distributions(lab["run_a"], "nope.weight", a.token, a.request)


def test_distributions_have_one_gradient_line_per_layer_and_the_verdict(lab):
    out = show(lab, lab["a"], lab["run_a"])
    frame = gradstats.read_distributions(lab["ctx"].history.run_dir(lab["run_a"]))
    weights = [n for n in dict.fromkeys(frame["layer"]) if n.endswith("weight")]
    grad_lines = [t for t in out["plot"].data if t.yaxis == "y"]
    assert [t.name for t in grad_lines] == [n.removesuffix(".weight") for n in weights]
    assert all(len(t.x) == 2 for t in grad_lines)   # 2 epochs
    verdict = gradstats.diagnose(frame)
    assert verdict["status"] == "ok"
    assert tab_inside.STATUS_WORDS["ok"] in out["dist_note"] and verdict["messages"][0] in out["dist_note"]
    assert out["dist_layer"].value == "conv1.weight" and "fc3.bias" in out["dist_layer"].choices[-1]
    a = lab["a"]
    fig, _ = lab["tab"].distributions(lab["run_a"], "fc1.weight", a.token, a.request)
    median = [t for t in fig.data if t.name == "weights median"][0]
    assert list(median.y) == frame[frame["layer"] == "fc1.weight"]["median"].tolist()


def test_a_run_without_records_says_how_to_turn_them_on(lab):
    note = show(lab, lab["b"], lab["run_b"])["dist_note"]
    assert "did not record" in note and "Record weight and gradient distributions" in note
    assert "Train tab" in note and "1 %" in note


def test_another_browsers_run_is_refused_in_private_mode(lab, monkeypatch):
    a, tab = lab["a"], lab["tab"]
    monkeypatch.setattr(lab["ctx"], "private_runs", True)
    calls = [lambda: tab.show_run(lab["run_b"], a.token, a.request),
             lambda: tab.feature_maps(lab["run_b"], Image.open(EXAMPLE), "conv2", 8, a.token, a.request),
             lambda: tab.distributions(lab["run_b"], None, a.token, a.request)]
    for call in calls:
        with pytest.raises(gr.Error) as err:
            call()
        assert lab["run_b"] not in err.value.message and "runs" + "/" not in err.value.message
    assert [v for _, v in tab.refresh_runs(a.session, None, a.token, a.request).choices] == [lab["run_a"]]
    assert show(lab, a, lab["run_a"])["trained"] is not None   # one's own run still shows


def test_the_tab_sits_between_evaluate_and_compare():
    labels = [label for label, _ in app.TABS]
    assert labels == ["Data", "Clean data", "Model", "Memory", "Train", "Evaluate", "Look inside", "Compare", "Predict"]
    assert dict(app.TABS)["Look inside"] is tab_inside
