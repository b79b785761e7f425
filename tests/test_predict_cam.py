"""The Predict tab's "Why this class?" panel (issue 14, item 1), through its handlers on real tiny
runs of two browsers: the Grad-CAM overlay of the dropped image for the top class or a class
picked, an opacity slider that only re-blends, the class list following the model, an uploaded
checkpoint, clear refusals, and one shared model that two threads explain at once without mixing.
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

gr = pytest.importorskip("gradio")

from PIL import Image

from core import explain
from core.inference import Predictor
from tests.test_follow_run import RUN, Page, lab_context, train
from ui import tab_evaluate, tab_predict

ROOT = Path(__file__).resolve().parent.parent
CAT = ROOT / "assets" / "examples" / "cat.jpg"
CKPT = "A checkpoint file (.pth)"

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


@pytest.fixture(scope="module")
def lab(tmp_path_factory, tiny_folder):
    ctx, blocks, (_, tab) = lab_context(tmp_path_factory.mktemp("cam"), tab_evaluate, tab_predict)
    manager = ctx.manager
    a, b = Page("A", "a1a1"), Page("B", "b2b2")
    runs = {"a": train(ctx, a, tiny_folder, seed=0), "b": train(ctx, b, tiny_folder, seed=1)}
    yield {"ctx": ctx, "blocks": blocks, "tab": tab, "a": a, "b": b, "runs": runs}
    manager.shutdown(timeout=10)


def explain_with(lab, page, run_id, cam_class=tab_predict.TOP_CLASS, opacity=0.5, img=None, source=RUN,
                 uploaded=None):
    img = img if img is not None else Image.open(CAT).convert("RGB")
    return lab["tab"].explain(img, source, run_id, uploaded, cam_class, opacity, page.session, page.token,
                              page.request)


def test_the_overlay_is_the_heatmap_of_the_top_class_over_the_image_as_the_model_sees_it(lab):
    a, run = lab["a"], lab["runs"]["a"]
    shown, note = explain_with(lab, a, run)
    predictor = Predictor(lab["ctx"].runs_dir / run / "best.pth")
    found = explain.explain_image(predictor, Image.open(CAT).convert("RGB"))
    assert shown.size == found["image"].size == (32, 32)
    assert np.asarray(shown).tolist() == np.asarray(explain.overlay(found["image"], found["heatmap"], 0.5)).tolist()
    assert np.asarray(shown).tolist() != np.asarray(found["image"]).tolist()   # a heat-map is drawn
    top_class, top_p = predictor.predict(Image.open(CAT).convert("RGB"), topk=1)[0]
    assert f"**{top_class}** ({top_p:.0%} — the top class)" in note and "Grad-CAM at layer conv2" in note


def test_opacity_only_reblends_the_pages_last_heatmap(lab, monkeypatch):
    a, run = lab["a"], lab["runs"]["a"]
    explain_with(lab, a, run)
    calls = []
    real = explain.explain_image
    monkeypatch.setattr(explain, "explain_image", lambda *args, **kw: calls.append(1) or real(*args, **kw))
    plain, _ = explain_with(lab, a, run, opacity=0.0)
    full, _ = explain_with(lab, a, run, opacity=1.0)
    assert calls == []   # no new backward pass for an opacity change
    last = a.session["predict_cam"]
    assert np.asarray(plain).tolist() == np.asarray(last["image"]).tolist()   # 0: the image alone
    assert np.asarray(full).tolist() == np.asarray(explain.overlay(last["image"], last["heatmap"], 1.0)).tolist()
    explain_with(lab, a, run, img=Image.open(CAT).convert("RGB").rotate(90))   # another image: computed anew
    assert calls == [1]


def test_another_class_gives_its_own_heatmap_and_says_so(lab):
    a, run = lab["a"], lab["runs"]["a"]
    classes = Predictor(lab["ctx"].runs_dir / run / "best.pth").classes
    maps = {}
    for name in classes:
        shown, note = explain_with(lab, a, run, cam_class=name)
        maps[name] = a.session["predict_cam"]["heatmap"]
        assert f"**{name}** (" in note and "%" in note
    assert len({m.tobytes() for m in maps.values()}) > 1   # the classes look at different places
    with pytest.raises(gr.Error, match="not one of this model's classes"):
        explain_with(lab, a, run, cam_class="unicorn")


def test_the_class_list_follows_the_model_and_an_uploaded_checkpoint_works(lab):
    a, run = lab["a"], lab["runs"]["a"]
    img = Image.open(CAT).convert("RGB")
    out = lab["tab"].model_changed(RUN, run, None, img, "none", a.token, a.request)
    classes = Predictor(lab["ctx"].runs_dir / run / "best.pth").classes
    assert out[4].choices == [(c, c) for c in [tab_predict.TOP_CLASS, *classes]]
    assert out[4].value == tab_predict.TOP_CLASS
    refused = lab["tab"].model_changed(RUN, "no-such-run", None, img, "none", a.token, a.request)
    assert refused[4].choices == [(tab_predict.TOP_CLASS, tab_predict.TOP_CLASS)]
    upload = str(lab["ctx"].runs_dir / run / "last.pth")
    shown, note = explain_with(lab, a, None, source=CKPT, uploaded=upload)
    assert shown.size == (32, 32) and "Heat-map for" in note


def test_no_image_gives_the_prompt_and_a_private_run_of_another_browser_is_refused(lab):
    a, b = lab["a"], lab["b"]
    assert lab["tab"].explain(None, RUN, lab["runs"]["a"], None, tab_predict.TOP_CLASS, 0.5, a.session,
                              a.token, a.request) == (None, tab_predict.CAM_HELP)
    lab["ctx"].private_runs = True
    try:
        with pytest.raises(gr.Error):
            explain_with(lab, a, lab["runs"]["b"])
        assert explain_with(lab, b, lab["runs"]["b"])[0] is not None
    finally:
        lab["ctx"].private_runs = False


def test_two_threads_explaining_one_shared_model_get_what_they_would_alone(lab):
    predictor = Predictor(lab["ctx"].runs_dir / lab["runs"]["a"] / "best.pth")
    img = Image.open(CAT).convert("RGB")
    alone = {k: explain.explain_image(predictor, img, target_class=k)["heatmap"] for k in range(3)}
    together, errors = {}, []

    def work(k):
        try:
            for _ in range(5):
                together.setdefault(k, []).append(explain.explain_image(predictor, img, target_class=k)["heatmap"])
                predictor.predict(img)
        except Exception as err:   # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for k, maps in together.items():
        assert all(np.array_equal(m, alone[k]) for m in maps), k


def test_a_failed_heatmap_after_a_new_image_or_model_empties_the_panel(lab):
    # A refused image or an unusable model leaves no heat-map of the previous image or model beside it.
    fns, w = lab["blocks"].fns, lab["tab"].w
    panel = {w.cam._id, w.cam_note._id}
    name = {i: getattr(f.fn, "__name__", None) for i, f in fns.items()}
    model_changes = {i for i in fns if name[i] == "model_changed"}
    after_new_input = {i for i, f in fns.items() if name[i] == "explain" and (
        f.trigger_after in model_changes or any(t[0] == w.image._id for t in f.targets))}
    cleared = {f.trigger_after for f in fns.values()
               if f.trigger_only_on_failure and {o._id for o in f.outputs} == panel}
    assert len(model_changes) == 3 and len(after_new_input) == 4   # source, run, upload; image
    assert after_new_input <= cleared


@pytest.mark.parametrize("size", [(33, 33), (500, 300), (20, 64)])
def test_an_image_of_any_size_is_explained_at_the_models_input_size(lab, size):
    """A phone photo or any image not at the model's size: the model sees it resized and cropped
    like its eval images (a PIL image, not a tensor), and the heat-map is drawn over that view."""
    predictor = Predictor(lab["ctx"].runs_dir / lab["runs"]["a"] / "best.pth")
    img = Image.open(CAT).convert("RGB").resize(size)
    view, tensor = predictor.model_input(img)
    assert isinstance(view, Image.Image) and view.size == (32, 32) and tuple(tensor.shape) == (3, 32, 32)
    shown, note = explain_with(lab, lab["a"], lab["runs"]["a"], img=img)
    assert shown.size == (32, 32) and "Heat-map for" in note
