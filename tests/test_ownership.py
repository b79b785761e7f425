"""Ownership and file serving, tried from outside as an attacker would: raw HTTP requests against
Gradio's file route, and several gradio_client sessions (one Client = one browser) acting on each
other's runs through the named API.

Covers issue 11 items 2 and 3: no server file is downloadable by path (the signing secret, the run
index, meta.json, checkpoints, another user's extracted upload); only a run's owner or the teacher
stops, resumes, deletes, renames, tags or exports it; a raw browser id or a forged token is worth
nothing; the teacher (page sign-in, or --teacher with --auth) manages every run; --private-runs hides
other people's runs.
"""
from __future__ import annotations

import os
import re
import socket
import time
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

gradio_client = pytest.importorskip("gradio_client")
import httpx  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from core import identity  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
TEACHER = ("tea", "chalk-and-talk")
DONE = ("Finished", "Stopped", "Failed", "Interrupted")
REFUSED = "only its owner or the teacher can"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(manager, data_dir: Path, runs_dir: Path, **options):
    from ui.app import build_app, launch_kwargs
    auth = options.pop("auth", None)
    demo = build_app(manager, data_dir=data_dir, runs_dir=runs_dir, teacher=TEACHER, **options)
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, server_name="127.0.0.1", server_port=_free_port(),
                            auth=auth, **launch_kwargs(data_dir, runs_dir))
    return demo, url




@pytest.fixture(scope="module")
def lab(tmp_path_factory, tiny_zip):
    """The lab with a teacher sign-in box (--teacher, no --auth), runs visible to all (the default),
    and one finished run trained by browser A, whose page holds a server-signed token."""
    from core.jobs import JobManager
    data_dir, runs_dir = tmp_path_factory.mktemp("own-data"), tmp_path_factory.mktemp("own-runs")
    manager = JobManager(runs_dir=runs_dir, data_dir=data_dir, max_jobs=1)
    demo, url = _launch(manager, data_dir, runs_dir)
    secret = (runs_dir / ".browser-secret").read_text()
    token = identity.new_token(secret)   # what the page-load handler hands browser A's page
    a = _client(url)
    _load_zip(a, tiny_zip)
    status = _start(a, token, Epochs=1)[0]
    assert status.startswith(("Starting", "Training", "Queued")), status
    run_id = re.search(r"run (\S+):", _poll_until_done(a, token)[0]).group(1)
    yield {"url": url, "manager": manager, "runs_dir": runs_dir, "data_dir": data_dir, "token": token,
           "a": a, "run_id": run_id, "secret": secret}
    demo.close()
    manager.shutdown(timeout=20)


def _client(url: str, auth=None) -> Client:
    return Client(url, verbose=False, analytics_enabled=False, download_files=False, auth=auth)


def _load_zip(c: Client, path: Path):
    return c.predict("Upload a .zip", "CIFAR10", handle_file(str(path)), "", "per class", 10, 10, 0,
                     api_name="/load_zip")


def _start(c: Client, token, **by_label):
    params = c.view_api(print_info=False, return_format="dict")["named_endpoints"]["/start_training"]["parameters"]
    values = {p["label"]: p.get("parameter_default") for p in params}
    values.update({"Batch size": 16, "Device": "cpu", **by_label})
    args = [values[p["label"]] for p in params]
    args[0] = token   # the gr.BrowserState comes first
    return c.predict(*args, api_name="/start_training")


def _poll_until_done(c: Client, token, timeout: float = 150.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = c.predict(token, api_name="/poll_training")
        if isinstance(out[0], str) and out[0].startswith(DONE):
            return out
        time.sleep(0.5)
    raise AssertionError(f"training did not end within {timeout} s")


def _lists(c: Client, token) -> None:
    """Refresh this session's run lists, as opening the tabs does: Gradio checks a dropdown's value
    against the choices this session was given, so a run must be listed before it is picked."""
    c.predict(None, token, api_name="/eval_runs")
    c.predict(None, token, api_name="/predict_runs")
    c.predict([], None, None, None, token, api_name="/compare_runs")


def _acts(c: Client, run_id: str, token) -> dict:
    """Every change a person can ask for on a run through the API: the error text, or None when done."""
    _lists(c, token)
    calls = {
        "rename": lambda: c.predict(run_id, "mine now", "", "(all)", token, api_name="/rename_run"),
        "tag": lambda: c.predict(run_id, "hijacked", "", "(all)", token, api_name="/tag_run"),
        "export": lambda: c.predict(run_id, token, api_name="/export_metrics"),
        "resume": lambda: c.predict(run_id, 2, [], token, api_name="/resume_run"),
        "delete": lambda: c.predict(run_id, run_id, "", "(all)", [], token, api_name="/delete_run"),
    }
    out = {}
    for action, call in calls.items():
        try:
            call()
            out[action] = None
        except AppError as err:
            out[action] = str(err)
    return out


# ---- item 2: nothing served by path ---------------------------------------------------------------
def test_server_files_are_never_served_by_path(lab):
    runs_dir, run_id, data_dir = lab["runs_dir"], lab["run_id"], lab["data_dir"]
    uploads = sorted((data_dir / "uploads").rglob("*.jpg"))
    assert uploads, "A's zip was extracted under the data folder"
    targets = [runs_dir / ".browser-secret", runs_dir / "index.sqlite", runs_dir / run_id / "meta.json",
               runs_dir / run_id / "best.pth", runs_dir / run_id / "last.pth", runs_dir / run_id / "config.json",
               uploads[0]]
    for target in targets:
        assert target.is_file(), target
        for form in (str(target), str(target.resolve())):
            r = httpx.get(f"{lab['url']}gradio_api/file={form}", timeout=10)
            assert r.status_code != 200, (form, r.status_code)
            assert lab["secret"] not in r.text
    # the relative spelling a student might try, from the server's working directory
    for rel in ("runs/.browser-secret", "runs/index.sqlite", "data/uploads"):
        assert httpx.get(f"{lab['url']}gradio_api/file={rel}", timeout=10).status_code != 200


def test_lists_galleries_and_exports_hold_no_server_paths(lab):
    a, token, run_id = lab["a"], lab["token"], lab["run_id"]
    folders = (str(lab["runs_dir"]), str(lab["data_dir"]))
    choices = a.predict(None, token, api_name="/eval_runs")["choices"]
    assert run_id in {v for _, v in choices}
    assert not any(f in str(choices) for f in folders)
    summary, _, _, mistakes = a.predict(run_id, True, token, api_name="/evaluate_run")
    assert mistakes and not any(f in str(m) for m in mistakes for f in folders)   # pixels, copied to the cache
    assert not any(f in summary for f in folders)
    _lists(a, token)
    files, message = a.predict(run_id, token, api_name="/export_metrics")
    paths = [f["path"] if isinstance(f, dict) else f for f in files]
    assert paths and not any(p.startswith(folders) for p in paths) and not any(f in message for f in folders)
    # the exported copy is served (it is a value the handler gave this page)
    assert httpx.get(f"{lab['url']}gradio_api/file={paths[0]}", timeout=10).status_code == 200
    with pytest.raises(AppError):   # a path instead of a run id is refused
        a.predict(str(lab["runs_dir"] / run_id), True, token, api_name="/evaluate_run")


# ---- item 3: ownership that cannot be forged ---------------------------------------------------
def test_another_browser_may_view_but_not_change_a_run(lab):
    run_id, token = lab["run_id"], lab["token"]
    ident = identity.verify(lab["secret"], token)
    b = _client(lab["url"])
    _lists(b, None)
    summary, _, _, mistakes = b.predict(run_id, True, None, api_name="/evaluate_run")   # a leaderboard: viewing is open
    assert "accuracy" in summary
    # ...but the run trained on A's upload: its images (the mistakes) are A's alone
    assert mistakes in ([], None) and "shown only to the run's owner" in summary
    forged = [None, ident, f"{ident}.{'0' * 64}", f"{ident}.{identity.sign('guessed-secret', ident).split('.')[1]}",
              token + "0", "browser:" + ident]
    for attempt in forged:
        for action, error in _acts(b, run_id, attempt).items():
            assert error is not None and f"{REFUSED} {action} it" in error, (attempt, action, error)
    row = lab["manager"].find(run_id)
    assert (lab["runs_dir"] / run_id).is_dir() and (row is None or row.owner == f"browser:{ident}")
    from core.runs import RunHistory
    meta = RunHistory(lab["runs_dir"]).get(run_id)
    assert meta["name"] != "mine now" and "hijacked" not in (meta["tags"] or "")


def test_stop_is_refused_for_someone_elses_running_run(lab):
    a, token = lab["a"], lab["token"]
    status = _start(a, token, Epochs=200)[0]
    run_id = re.search(r"run ([\w-]+)", status).group(1)
    b = _client(lab["url"])
    _lists(b, None)
    text = b.predict([run_id], None, api_name="/compare_stop")
    assert "1 run(s) belong to someone else and were left running" in text
    assert b.predict(None, api_name="/stop_training") == "No run in progress."   # B's own page has none
    job = lab["manager"].find(run_id)
    assert not job.done and job.status != "stopping"
    assert a.predict(token, api_name="/stop_training").startswith(("Stopping", "Removed"))
    assert lab["manager"].wait(run_id, timeout=60).status == "stopped"


def test_the_owner_and_the_signed_in_teacher_may_change_the_run(lab):
    run_id, token = lab["run_id"], lab["token"]
    a = lab["a"]
    _lists(a, token)
    msg, _ = a.predict(run_id, "A's first run", "", "(all)", token, api_name="/rename_run")
    assert "A's first run" in msg
    t = _client(lab["url"])
    with pytest.raises(AppError, match="Wrong teacher password"):
        t.predict("chalk", api_name="/teacher_sign_in")
    assert _acts(t, run_id, None)["rename"].startswith("This run belongs to someone else")
    assert "Signed in as the teacher" in t.predict(TEACHER[1], api_name="/teacher_sign_in")[1]
    _lists(t, None)
    msg, _ = t.predict(run_id, "checked by the teacher", "", "(all)", None, api_name="/rename_run")
    assert "checked by the teacher" in msg
    assert "Tags of" in t.predict(run_id, "graded", "", "(all)", None, api_name="/tag_run")[0]
    files, _ = t.predict(run_id, None, api_name="/export_checkpoint")
    assert files
    msg = t.predict(run_id, 2, [], None, api_name="/resume_run")[0]
    assert msg.startswith(f"Resuming {run_id}")
    job = lab["manager"].wait(run_id, timeout=120)
    assert job.owner == f"browser:{identity.verify(lab['secret'], token)}"   # still A's run
    # a fresh session of the same Client host is not the teacher: the sign-in is the session's
    assert _acts(_client(lab["url"]), run_id, None)["tag"] is not None
    msg = t.predict(run_id, run_id, "", "(all)", [], None, api_name="/delete_run")[0]
    assert msg == f"Deleted run {run_id}." and not (lab["runs_dir"] / run_id).exists()


# ---- --teacher with --auth, and --private-runs ----------------------------------------------------
@pytest.fixture(scope="module")
def private_lab(tmp_path_factory, tiny_zip):
    from core.jobs import JobManager
    data_dir, runs_dir = tmp_path_factory.mktemp("priv-data"), tmp_path_factory.mktemp("priv-runs")
    manager = JobManager(runs_dir=runs_dir, data_dir=data_dir, max_jobs=1)
    demo, url = _launch(manager, data_dir, runs_dir, login=True, private_runs=True,
                        auth=[("ana", "pw-ana"), ("ben", "pw-ben"), TEACHER])
    ana = _client(url, auth=("ana", "pw-ana"))
    _load_zip(ana, tiny_zip)
    _start(ana, None, Epochs=1)
    run_id = re.search(r"run (\S+):", _poll_until_done(ana, None)[0]).group(1)
    yield {"url": url, "run_id": run_id, "ana": ana, "runs_dir": runs_dir}
    demo.close()
    manager.shutdown(timeout=20)


@pytest.mark.slow   # a second server of its own (--private-runs) and runs trained on it
def test_private_runs_are_hidden_from_others_and_the_teacher_login_manages_them(private_lab):
    run_id, url = private_lab["run_id"], private_lab["url"]
    ana = private_lab["ana"]
    _lists(ana, None)
    assert run_id in {v for _, v in ana.predict(None, None, api_name="/eval_runs")["choices"]}
    ben = _client(url, auth=("ben", "pw-ben"))
    assert run_id not in {v for _, v in ben.predict(None, None, api_name="/eval_runs")["choices"]}
    assert run_id not in {v for _, v in ben.predict(None, None, api_name="/predict_runs")["choices"]}
    assert run_id not in str(ben.predict("", "(all)", None, api_name="/compare_history"))
    with pytest.raises(AppError):   # not even offered: Gradio refuses a value that is not in the list
        ben.predict(run_id, True, None, api_name="/evaluate_run")
    assert all(e is not None for e in _acts(ben, run_id, None).values())
    teacher = _client(url, auth=TEACHER)
    _lists(teacher, None)
    assert run_id in str(teacher.predict("", "(all)", None, api_name="/compare_history"))
    assert "accuracy" in teacher.predict(run_id, True, None, api_name="/evaluate_run")[0]
    msg, _ = teacher.predict(run_id, "seen by the teacher", "", "(all)", None, api_name="/rename_run")
    assert "seen by the teacher" in msg
    # a student's login name typed as a browser token is nobody
    assert _acts(ben, run_id, "user:ana")["rename"] is not None
