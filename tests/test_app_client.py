"""The dashboard driven through its named API with gradio_client, as a second program (or a
student's notebook) would: one Client = one browser session.

Covers: loading the embedded sample and an uploaded zip, the split, the augmentation editor, the
model description and layer table, the memory estimate, a real training run polled to the end,
evaluation (confusion matrix), prediction (top-5) and batch prediction, bad input giving a plain
message, two users at once (isolated sessions) and the training queue (max_jobs=1).
"""
from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "assets" / "examples"
SAMPLE_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TINY = ["airplane", "cat", "ship"]
DONE = ("Finished", "Stopped", "Failed", "Interrupted")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory, session_data_dir, tiny_folder):
    """The dashboard on a free local port, one training slot, runs in a temporary folder; the page
    may load from the data folder and from ``tiny_folder`` (its data roots)."""
    from core.jobs import JobManager
    from ui.app import build_app, launch_kwargs

    runs_dir = tmp_path_factory.mktemp("client-runs")
    manager = JobManager(runs_dir=runs_dir, data_dir=session_data_dir, max_jobs=1)
    demo = build_app(manager, data_dir=session_data_dir, runs_dir=runs_dir, data_roots=[session_data_dir, tiny_folder])
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, server_name="127.0.0.1",
                            server_port=_free_port(), **launch_kwargs(session_data_dir, runs_dir))
    yield {"url": url, "manager": manager, "runs_dir": runs_dir, "demo": demo}
    demo.close()
    manager.shutdown(timeout=20)




def new_client(lab) -> Client:
    return Client(lab["url"], verbose=False, analytics_enabled=False, download_files=False)


# ---- endpoint helpers -----------------------------------------------------------------------------
def load_sample(c: Client):
    return c.predict("Embedded CIFAR-10 sample", "CIFAR10", None, "", "per class", 10, 10, 0, api_name="/load_data")


def load_zip(c: Client, path: Path):
    return c.predict("Upload a .zip", "CIFAR10", handle_file(str(path)), "", "per class", 10, 10, 0,
                     api_name="/load_zip")


def start_args(c: Client, endpoint: str = "/start_training", browser_id=None, **by_label) -> list:
    """/start_training takes every config widget positionally (set-style inputs, in component order)
    with generic names param_1…param_N, plus the browser id first: map them by their labels."""
    params = c.view_api(print_info=False, return_format="dict")["named_endpoints"][endpoint]["parameters"]
    values = {p["label"]: p.get("parameter_default") for p in params}
    unknown = set(by_label) - set(values)
    assert not unknown, f"no such widget: {unknown}"
    values.update(by_label)
    out = [values[p["label"]] for p in params]
    out[0] = browser_id  # the gr.BrowserState (label "parameter_N"): None = owner is this session
    return out


def start(c: Client, **by_label):
    return c.predict(*start_args(c, **by_label), api_name="/start_training")


def poll(c: Client):
    return c.predict(None, api_name="/poll_training")


def poll_until_done(c: Client, timeout: float = 150.0) -> tuple[tuple, list[str]]:
    seen, deadline = [], time.time() + timeout
    while time.time() < deadline:
        out = poll(c)
        status = out[0] if isinstance(out[0], str) else ""
        seen.append(status)
        if status.startswith(DONE):
            return out, seen
        time.sleep(0.5)
    raise AssertionError(f"training did not end within {timeout} s; last statuses {seen[-3:]}")


def plot_json(value: dict) -> dict:
    assert value["type"] == "plotly"
    return json.loads(value["plot"])


def table_rows(value: dict) -> list[list]:
    return value["data"]


# ---- tests ----------------------------------------------------------------------------------------
def test_named_endpoints_and_start_training_parameters(lab):
    c = new_client(lab)
    api = c.view_api(print_info=False, return_format="dict")["named_endpoints"]
    for name in ("/load_data", "/load_zip", "/reshuffle", "/split", "/aug_add", "/aug_json", "/describe_model",
                 "/layer_table", "/memory", "/start_training", "/stop_training", "/resume_training",
                 "/poll_training", "/eval_runs", "/evaluate_run", "/predict", "/predict_many", "/predict_runs"):
        assert name in api, name
    params = api["/start_training"]["parameters"]
    labels = [p["label"] for p in params]
    # The set-style inputs reach the client as positional param_1..param_N: labels are the only
    # stable handle, so they must be unique and cover the important settings.
    assert len(labels) == len(set(labels))
    for label in ("Epochs", "Batch size", "Learning rate", "Optimizer", "Model", "Validation %", "Device", "Seed"):
        assert label in labels
    assert [p["parameter_name"] for p in params] == [f"param_{i}" for i in range(1, len(params) + 1)]
    # gr.State (the session) is not an API input; the browser id (gr.BrowserState) is, first
    assert params[0]["parameter_has_default"] is False


def test_browse_sample_split_augment_model_and_memory(lab):
    c = new_client(lab)
    info, gallery, dist, sizes, skipped, note, table, split_plot = load_sample(c)
    assert "**CIFAR-10 sample** — 6,000 images, 10 classes, colour" in info
    assert "train 5,000, test 1,000" in info
    assert len(gallery) == 30 and {g["caption"] for g in gallery} == set(SAMPLE_CLASSES)
    assert all(g["image"]["path"] for g in gallery)
    assert table_rows(sizes) == [[32, 32, "RGB", 6000]] and table_rows(skipped) == []
    assert note.startswith("4,400 train · 600 validation · 1,000 test")
    assert [r[0] for r in table_rows(table)] == SAMPLE_CLASSES
    assert plot_json(dist)["data"] and plot_json(split_plot)["data"]

    note, table, _ = c.predict(20, 10, 1, api_name="/split")
    assert note.startswith("3,800 train · 1,200 validation · 1,000 test") and "seed 1" in note
    assert table_rows(table)[0] == ["airplane", 380, 120, 100, 600]

    assert len(c.predict("random", api_name="/reshuffle")) == 32

    steps, spec, _, aug = c.predict("RandomRotation", '{"degrees": 15}', 1, 0, 0, api_name="/aug_add")
    assert table_rows(steps)[-1][1] == "RandomRotation" and "RandomRotation" in spec
    assert len(aug) == 8 and aug[0]["caption"].startswith("original: ")
    with pytest.raises(AppError, match="not valid JSON"):
        c.predict("RandomRotation", "{degrees: 15", 1, 0, 0, api_name="/aug_add")

    about, weights_note, stages, pretrained = c.predict("resnet18", True, api_name="/describe_model")
    assert "11,173,962 parameters for 10 classes" in about and "Stages: stem, layer1" in about
    assert "resnet18" in weights_note

    text, layers = c.predict("tutorial_net", True, "none", 0, False, api_name="/layer_table")
    assert text.startswith("**62,006 of 62,006 parameters trainable**")
    assert [r[0] for r in table_rows(layers)][:2] == ["conv1", "pool"]

    summary, breakdown, per_layer, mem_table = c.predict("tutorial_net", True, "none", 0, 64, "adam", "fp32", "8 GB",
                                                          api_name="/memory")
    assert "batch 64, adam, fp32: training needs **" in summary and "Largest batch for 8 GB" in summary
    rows = {r[0]: r for r in table_rows(mem_table)}
    shown = {r[0]: r for r in mem_table["metadata"]["display_value"]}
    assert rows["parameters"][1] == 248_024 and shown["parameters"][1:] == ["248,024", "0.2"]   # 62,006 fp32 weights
    assert plot_json(breakdown)["data"] and plot_json(per_layer)["data"]
    # F.relu and view in Net.forward() save tensors outside any sub-module: the chart names them so
    assert "ops in forward()" in plot_json(per_layer)["data"][0]["y"]


def test_train_evaluate_and_predict_on_an_uploaded_zip(lab, tiny_zip, tmp_path):
    import torch

    c = new_client(lab)
    info = load_zip(c, tiny_zip)[0]
    assert "**tiny** — 150 images, 3 classes" in info

    status, progress, curves, log, timer = start(c, **{"Epochs": 2, "Batch size": 16, "Device": "cpu"})
    assert status.startswith(("Starting", "Training", "Queued")) and timer["active"] is True
    out, seen = poll_until_done(c)
    status, progress, curves, log, timer = out
    assert status.startswith("Finished — tutorial_net — run "), status
    assert "100% — epoch 2/2" in progress and timer["active"] is False
    assert "epoch 2/2" in log and re.search(r"test accuracy [\d.]+%", log)
    names = {t.get("name") for t in plot_json(curves)["data"]}
    assert any("train" in (n or "") for n in names)
    run_id = re.search(r"run (\S+):", status).group(1)
    run_dir = lab["runs_dir"] / run_id

    # The checkpoint is loadable without the lab (weights_only) and the config holds a plain path.
    ckpt = torch.load(run_dir / "best.pth", weights_only=True)
    assert ckpt["classes"] == TINY and ckpt["config"]["data"]["source"] == "zip"
    assert json.loads((run_dir / "config.json").read_text())["data"]["location"].endswith("tiny.zip")

    choice = c.predict(None, None, api_name="/eval_runs")
    assert choice["value"] == run_id   # lists hold run ids, labelled by name: never a server folder
    assert all(str(lab["runs_dir"]) not in label for label, _ in choice["choices"])
    summary, matrix, per_class, mistakes = c.predict(run_id, True, None, api_name="/evaluate_run")
    assert re.search(r"on 30 test images: accuracy \*\*[\d.]+%\*\*", summary)
    heat = [t for t in plot_json(matrix)["data"] if t["type"] == "heatmap"]
    assert heat and list(heat[0]["x"]) == TINY and list(heat[0]["y"]) == TINY
    rows = table_rows(per_class)
    assert [r[0] for r in rows[:3]] == TINY and rows[-1][0] == "(weighted average)"
    assert [r[4] for r in rows] == [10, 10, 10, 30, 30]          # support: the test images, as numbers
    shown = per_class["metadata"]["display_value"]                 # ...and as the page shows them
    assert all(re.fullmatch(r"[01]\.\d{3}", v) for r in shown for v in r[1:4])   # three decimals each
    # each mistake captioned "true → predicted confidence", two different classes of the run
    assert mistakes   # two epochs on 120 images leave plenty of errors among the 30 test images
    for m in mistakes:
        cap = re.fullmatch(r"(\w+) → (\w+) (\d+)%", m["caption"])
        assert cap and cap[1] in TINY and cap[2] in TINY and cap[1] != cap[2], m["caption"]

    assert c.predict(None, None, api_name="/predict_runs")["value"] == run_id
    label = c.predict(handle_file(str(EXAMPLES / "cat.jpg")), "A trained run", run_id, None, "none", None,
                      api_name="/predict")
    confs = label["confidences"]
    assert label["label"] in TINY and [x["label"] for x in confs][0] == label["label"]
    assert len(confs) == 3  # top-5 of a 3-class model
    assert [x["confidence"] for x in confs] == sorted((x["confidence"] for x in confs), reverse=True)
    assert 0.99 < sum(x["confidence"] for x in confs) <= 1.0001

    # The same checkpoint uploaded as a file (the Predict tab's other source) gives the same answer.
    upload = c.predict(handle_file(str(EXAMPLES / "cat.jpg")), "A checkpoint file (.pth)", None,
                       handle_file(str(run_dir / "best.pth")), "none", None, api_name="/predict")
    assert upload["label"] == label["label"]
    assert [x["confidence"] for x in upload["confidences"]] == pytest.approx([x["confidence"] for x in confs])

    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    table, csv = c.predict([handle_file(str(EXAMPLES / "ship.jpg")), handle_file(str(EXAMPLES / "dog.jpg")),
                            handle_file(str(bad))], "A trained run", run_id, None, "none", None,
                           api_name="/predict_many")
    rows = table_rows(table)
    assert sorted(r[0] for r in rows) == ["dog.jpg", "notes.png", "ship.jpg"]
    assert all(r[1] in TINY and r[-1] == "" for r in rows if r[0] != "notes.png")
    bad_row = next(r for r in rows if r[0] == "notes.png")
    assert "cannot be read as an image" in bad_row[-1]
    assert csv["path"].endswith("predictions.csv")


def test_bad_input_gives_a_plain_message_not_a_traceback(lab, tmp_path):
    c = new_client(lab)
    corrupt = tmp_path / "holiday-photos.zip"
    corrupt.write_bytes(b"PK\x03\x04" + b"garbage" * 50)
    with pytest.raises(AppError) as info:
        load_zip(c, corrupt)
    assert "holiday-photos.zip is not a zip archive" in str(info.value)

    not_image = tmp_path / "essay.jpg"
    not_image.write_text("Once upon a time")
    with pytest.raises(AppError) as info2:
        c.predict(handle_file(str(not_image)), "A trained run", None, None, "none", None, api_name="/predict")
    assert str(info2.value).startswith("essay.jpg cannot be read as an image")

    with pytest.raises(AppError) as info3:
        c.predict(handle_file(str(EXAMPLES / "cat.jpg")), "A trained run", None, None, "none", None,
                  api_name="/predict")
    assert "No trained run yet" in str(info3.value)

    with pytest.raises(AppError) as info4:
        start(c, **{"Batch size": "sixty-four"})
    assert "Batch size must be a whole number such as 64, got 'sixty-four'" in str(info4.value)

    with pytest.raises(AppError) as info5:
        start(c, **{"Freezing": "stages", "Stages to freeze": 0})
    assert "model.freeze_stages must be at least 1" in str(info5.value)

    with pytest.raises(AppError) as info6:
        c.predict(*start_args(c, "/resume_training"), api_name="/resume_training")
    assert "Nothing to resume" in str(info6.value)

    for err in (info, info2, info3, info4, info5, info6):
        text = str(err.value)
        assert "Traceback" not in text and 'File "' not in text and "Internal error" not in text


def test_a_refused_input_prints_no_trace_in_the_server_console(lab, capfd):
    """A teacher's console shows no Gradio stack trace for each student's typo."""
    capfd.readouterr()
    with pytest.raises(AppError, match="/nope/none is outside this server's data folders"):
        new_client(lab).predict("Folder on the server", "CIFAR10", None, "/nope/none", "per class", 10, 10, 0,
                                api_name="/load_data")
    err = capfd.readouterr().err
    assert "Traceback" not in err and "gradio.exceptions.Error" not in err


def test_two_users_at_once_do_not_see_each_other(lab, tiny_zip):
    a, b = new_client(lab), new_client(lab)
    assert "3 classes" in load_zip(a, tiny_zip)[0]
    assert "10 classes" in load_sample(b)[0]
    # each session splits its own dataset
    assert [r[0] for r in table_rows(a.predict(10, 10, 0, api_name="/split")[1])] == TINY
    assert [r[0] for r in table_rows(b.predict(10, 10, 0, api_name="/split")[1])] == SAMPLE_CLASSES

    status = start(a, **{"Epochs": 1, "Batch size": 16, "Device": "cpu"})[0]
    assert status.startswith(("Starting", "Training", "Queued"))
    # B has no run: its poll changes nothing and switches its timer off; Stop and Resume say so
    b_status, _, _, _, b_timer = poll(b)
    assert "value" not in b_status and b_timer["active"] is False
    assert b.predict(None, api_name="/stop_training") == "No run in progress."
    out, _ = poll_until_done(a)
    assert out[0].startswith("Finished")
    assert "value" not in poll(b)[0]
    # and B's data choice is still its own after A trained on the zip
    assert b.predict(10, 10, 0, api_name="/split")[0].startswith("4,400 train · 600 validation · 1,000 test")


def test_second_user_is_queued_while_the_only_slot_trains(lab):
    assert lab["manager"].max_jobs == 1
    a, b = new_client(lab), new_client(lab)
    first = start(a, **{"Epochs": 1, "Batch size": 64, "Device": "cpu"})[0]  # the embedded sample
    assert first.startswith(("Starting", "Training")), first
    queued = start(b, **{"Epochs": 1, "Batch size": 64, "Device": "cpu"})[0]
    assert queued.startswith("Queued: position 1 — 1 run(s) training on this server (at most 1 at a time)")
    assert poll(b)[0].startswith("Queued: position 1")
    assert b.predict(None, api_name="/stop_training").startswith("Removed from the queue")
    stopped, _ = poll_until_done(b, timeout=10)
    assert stopped[0].startswith("Stopped") and "removed from the queue" in stopped[0]

    out, _ = poll_until_done(a)
    assert out[0].startswith("Finished"), out[0]
    run_id = re.search(r"run (\S+):", out[0]).group(1)
    assert a.predict(None, None, api_name="/predict_runs")["value"] == run_id  # the newest run, A's own
    label = a.predict(handle_file(str(EXAMPLES / "airplane.jpg")), "A trained run", run_id, None, "none", None,
                      api_name="/predict")
    top5 = label["confidences"]
    assert len(top5) == 5 and {x["label"] for x in top5} <= set(SAMPLE_CLASSES)
    assert top5[0]["label"] == label["label"]


@pytest.mark.slow   # several runs trained through the server at once
def test_stop_a_running_run_resume_it_while_others_keep_working(lab, tiny_zip):
    """A student stops a run mid-way and resumes it; meanwhile another browser computes memory,
    browses and reads the model table without waiting for the training slot."""
    a, b = new_client(lab), new_client(lab)
    load_zip(a, tiny_zip)
    status = start(a, **{"Epochs": 200, "Batch size": 16, "Device": "cpu"})[0]
    assert status.startswith(("Starting", "Training")), status
    deadline = time.time() + 60
    # a poll with nothing new sends no value (a dict without "value", as in the test above): wait on
    while not (isinstance((out := poll(a))[0], str) and out[0].startswith("Training") and "batch" in out[1]):
        assert time.time() < deadline, out[0]
        time.sleep(0.3)
    run_id = re.search(r"run (\S+):", out[0]).group(1)
    job = lab["manager"].find(run_id)

    # B is not queued behind A's training: each answer comes while A is still training.
    summary = b.predict("resnet18", True, "none", 0, 32, "sgd", "fp32", "8 GB", api_name="/memory")[0]
    assert "training needs **" in summary and not job.done
    assert "6,000 images" in load_sample(b)[0] and not job.done
    assert len(b.predict("random", api_name="/reshuffle")) == 32 and not job.done
    assert b.predict("lenet5", True, "none", 0, False, api_name="/layer_table")[0].startswith("**62,006 of")
    assert not job.done

    assert a.predict(None, api_name="/stop_training").startswith("Stopping after the current batch")
    out, _ = poll_until_done(a, timeout=60)
    assert out[0].startswith(f"Stopped — tutorial_net — run {run_id}: stopped by request"), out[0]
    epochs_done = len([e for e in job.events if type(e).__name__ == "EpochEnded"])
    assert 0 < epochs_done < 200
    last = torch_load(lab["runs_dir"] / run_id / "last.pth")
    assert last["epoch"] <= epochs_done and last["batches_done"] >= 0

    # Resume, asking for 1 epoch: the run goes on in the same folder for at least one more epoch.
    status = a.predict(*start_args(a, "/resume_training", **{"Epochs": 1}), api_name="/resume_training")[0]
    assert run_id in status
    out, _ = poll_until_done(a, timeout=90)
    assert out[0].startswith(f"Finished — tutorial_net — run {run_id}"), out[0]
    target = last["epoch"] + 1
    assert f"epoch {target}/{target}" in out[1] and f"epoch {target}/{target}: train loss" in out[3]

    # The run finished: Resume with no more epochs says how to go on; with one more it trains on.
    with pytest.raises(AppError, match=f"finished all its {target} epochs?\\..*set Epochs above {target}"):
        a.predict(*start_args(a, "/resume_training", **{"Epochs": target}), api_name="/resume_training")
    eval_file = lab["runs_dir"] / run_id / "eval.json"
    os.utime(eval_file, (0, 0))  # so that the re-evaluation at the end shows as a newer file
    status = a.predict(*start_args(a, "/resume_training", **{"Epochs": target + 1}),
                       api_name="/resume_training")[0]
    assert run_id in status
    out, _ = poll_until_done(a, timeout=90)
    assert out[0].startswith(f"Finished — tutorial_net — run {run_id}"), out[0]
    assert f"epoch {target + 1}/{target + 1}: train loss" in out[3]
    assert f"epoch {target}/{target + 1}" not in out[3]          # the earlier epochs are not re-trained
    assert torch_load(lab["runs_dir"] / run_id / "last.pth")["epoch"] == target + 1
    assert lab["manager"].find(run_id).status == "finished"
    assert eval_file.stat().st_mtime > 0                              # the test split evaluated again


def test_a_failed_run_shows_its_reason_and_the_server_goes_on(lab, tiny_zip):
    a = new_client(lab)
    load_zip(a, tiny_zip)
    start(a, **{"Epochs": 2, "Batch size": 16, "Device": "cpu", "Learning rate": 100})
    out, _ = poll_until_done(a, timeout=60)
    assert out[0].startswith("Failed — tutorial_net — run "), out[0]
    assert "learning rate" in out[0] and "too high" in out[0]
    assert "Traceback" not in out[0] + out[3]
    failed = re.search(r"run (\S+):", out[0]).group(1)
    assert not (lab["runs_dir"] / failed / "last.pth").exists()   # it diverged in its first epoch
    with pytest.raises(AppError, match=rf"Your last run \({failed}\) ended \(failed\) before its first checkpoint"):
        a.predict(*start_args(a, "/resume_training", **{"Epochs": 5}), api_name="/resume_training")
    # the next run on the same server trains normally
    start(a, **{"Epochs": 1, "Batch size": 16, "Device": "cpu"})
    out = poll_until_done(a, timeout=90)[0]
    assert out[0].startswith("Finished")
    # Resume now speaks of that last run, not of an older one
    finished = re.search(r"run ([^\s:]+)", out[0]).group(1)
    with pytest.raises(AppError, match=rf"Your last run \({finished}\) finished all its 1 epoch\."):
        a.predict(*start_args(a, "/resume_training", **{"Epochs": 1}), api_name="/resume_training")


def torch_load(path: Path) -> dict:
    import torch
    return torch.load(path, weights_only=True)


def test_server_folder_index_file_and_offline_builtin_set_sources(lab, tiny_folder, tmp_path):
    """The Data tab's other sources: a folder on the server, an index file (paths relative to it),
    and a built-in torchvision set that is not on this offline machine (a message naming the file)."""
    c = new_client(lab)
    info = c.predict("Folder on the server", "CIFAR10", None, str(tiny_folder), "per class", 10, 10, 0,
                     api_name="/load_data")[0]
    assert "150 images, 3 classes" in info and "train 120, test 30" in info

    rows = [f"{p.relative_to(tiny_folder).as_posix()},{p.parent.name}" for p in sorted(tiny_folder.rglob("*.jpg"))]
    index = tiny_folder / "labels.csv"
    index.write_text("path,label\n" + "\n".join(rows[::2]) + "\n", encoding="utf-8")
    try:
        info, gallery, _, sizes, _, note, table, _ = c.predict("Index file (.txt / .csv)", "CIFAR10", None, str(index),
                                                                "per class", 10, 10, 0, api_name="/load_data")
    finally:
        index.unlink()
    assert "75 images, 3 classes" in info
    assert {g["caption"] for g in gallery} == set(TINY) and table_rows(sizes) == [[32, 32, "RGB", 75]]
    assert [r[0] for r in table_rows(table)] == TINY

    with pytest.raises(AppError) as err:
        c.predict("Built-in set (torchvision)", "CIFAR100", None, "", "per class", 10, 10, 0, api_name="/load_data")
    text = str(err.value)
    assert "cifar-100-python.tar.gz" in text and str(Path(lab["manager"].data_dir) / "CIFAR100") in text
    assert "Traceback" not in text


def test_tensorboard_log_for_one_run_from_the_train_tab(lab, tiny_zip):
    c = new_client(lab)
    load_zip(c, tiny_zip)
    start(c, **{"Epochs": 1, "Batch size": 16, "Device": "cpu", "TensorBoard log": True})
    out, _ = poll_until_done(c, timeout=90)
    assert out[0].startswith("Finished"), out[0]
    run_dir = lab["runs_dir"] / re.search(r"run (\S+):", out[0]).group(1)
    assert json.loads((run_dir / "config.json").read_text())["tensorboard"] is True
    assert list(run_dir.glob("events.out.tfevents.*"))   # the event file sits in the run folder


@pytest.mark.slow   # the refusal itself is in the fast tier: test_jobs
def test_a_run_too_big_for_its_memory_is_refused_before_it_starts(lab):
    """Issue 11's server killer: ResNet-50 without the small-input stem, batch 4096, on a server
    whose runs may use 3 GiB (the limit the issue saw the kernel kill the server under). The memory
    check refuses it with the largest batch that fits, queues nothing, and the page goes on."""
    c = new_client(lab)
    labels = {p["label"] for p in c.view_api(print_info=False, return_format="dict")["named_endpoints"]
              ["/start_training"]["parameters"]}
    stem = next(label for label in labels if label.startswith("Small-input stem"))
    before = len(lab["manager"].jobs())
    lab["manager"].max_job_memory = 3 * 2**30
    try:
        with pytest.raises(AppError) as e:
            start(c, **{"Model": "resnet50", stem: False, "Batch size": "4096", "Device": "cpu"})
    finally:
        lab["manager"].max_job_memory = None
    text = str(e.value)
    assert "resnet50" in text and "4096" in text.replace(",", "") and "--max-job-memory" in text, text
    fits = re.search(r"[Bb]atch (\d+) fits", text)
    assert fits and 1 <= int(fits.group(1)) < 4096, text
    assert len(lab["manager"].jobs()) == before   # nothing queued, no run folder started
    assert poll(c)[-1]["active"] is False           # the page has no run to follow, and answers


def test_own_weights_reach_a_run_only_through_this_pages_upload(lab, tmp_path, session_data_dir):
    """The 'Weights file used' box is read-only on the page but free text through the API: a server
    path typed there (another user's checkpoint, any file) is refused without a look at the disk; an
    upload is shown by its name, and a refused upload is not kept on the server."""
    import torch

    from core import models as M
    c = new_client(lab)
    weights_dir = Path(session_data_dir) / "weights"
    for typed in (str(Path(__file__)), "/nonexistent/x.pth", "../runs/best.pth"):
        with pytest.raises(AppError) as e:
            start(c, **{"Weights file used": typed})
        assert "was not uploaded on this page" in str(e.value) and "/" not in str(e.value).split("'")[1]
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    before = set(weights_dir.glob("*")) if weights_dir.exists() else set()
    with pytest.raises(AppError):
        c.predict(handle_file(str(junk)), "tutorial_net", True, api_name="/load_weights")
    assert (set(weights_dir.glob("*")) if weights_dir.exists() else set()) == before
    good = tmp_path / "mine.pth"
    torch.save(M.create_model("tutorial_net", 10, input_size=32).model.state_dict(), good)
    shown, report = c.predict(handle_file(str(good)), "tutorial_net", True, api_name="/load_weights")
    assert shown == "mine.pth" and "fits tutorial_net" in report
    start(c, **{"Weights file used": shown, "Epochs": 1})
    job = next(j for j in reversed(lab["manager"].jobs()) if j.config.model.weights_path)
    assert Path(job.config.model.weights_path).resolve().parent == weights_dir.resolve()
    poll_until_done(c)
