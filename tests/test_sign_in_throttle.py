"""The teacher password cannot be guessed by flooding the server (security review, HIGH): the page's
teacher sign-in is throttled per client address and for everyone together, not per Gradio session
(which the client picks), and with --auth Gradio's POST /login is throttled per login name and for
everyone together (launch.login_check). Tried from outside, as a student would."""
from __future__ import annotations

import os
import socket
import uuid

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

gradio_client = pytest.importorskip("gradio_client")
import httpx
from gradio_client import Client
from gradio_client.exceptions import AppError

from core import identity

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
TEACHER = ("tea", "chalk-and-talk")
TRIES, TRIES_ALL = identity.SIGN_IN_TRIES, identity.SIGN_IN_TRIES_ALL


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def serve(tmp_path_factory):
    """Start labs (no training happens in these tests); all are closed at the end of the module."""
    from core.jobs import JobManager
    from ui.app import build_app, launch_kwargs
    started = []

    def start(auth=None, **options):
        data_dir, runs_dir = tmp_path_factory.mktemp("throttle-data"), tmp_path_factory.mktemp("throttle-runs")
        manager = JobManager(runs_dir=runs_dir, data_dir=data_dir, max_jobs=1)
        demo = build_app(manager, data_dir=data_dir, runs_dir=runs_dir, teacher=TEACHER, **options)
        _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, server_name="127.0.0.1",
                                server_port=_free_port(), auth=auth, **launch_kwargs(data_dir, runs_dir))
        started.append((demo, manager))
        return demo, url

    yield start
    for demo, manager in started:
        demo.close()
        manager.shutdown(timeout=20)


def _sign_in(c: Client, password: str):
    """The page's teacher sign-in from a brand-new session each time (the client picks the hash)."""
    c.session_hash = uuid.uuid4().hex[:11]
    try:
        return c.predict(password, api_name="/teacher_sign_in")[1]
    except AppError as err:
        return str(err)


def test_page_sign_in_is_throttled_per_address_and_globally_not_per_session(serve):
    demo, url = serve()
    c = Client(url, verbose=False, analytics_enabled=False, download_files=False)
    for _ in range(TRIES):
        assert _sign_in(c, "guess") == "Wrong teacher password."
    # a fresh session does not escape: even the right password is refused, and says when to retry
    refused = _sign_in(c, TEACHER[1])
    assert refused.startswith("Too many wrong passwords from this computer: try again in "), refused
    # other computers (uvicorn takes X-Forwarded-For from a proxy on 127.0.0.1 only, as here) are
    # not held up by this one, but all of them together have one budget
    for n in range(1, TRIES_ALL // TRIES):
        other = Client(url, verbose=False, analytics_enabled=False, download_files=False,
                       headers={"X-Forwarded-For": f"10.0.0.{n}"})
        for _ in range(TRIES):
            assert _sign_in(other, "guess") == "Wrong teacher password."
    last = Client(url, verbose=False, analytics_enabled=False, download_files=False,
                  headers={"X-Forwarded-For": "10.0.0.99"})
    refused = _sign_in(last, TEACHER[1])
    assert "Too many wrong passwords from everyone together" in refused and "--auth" in refused, refused
    # refusals are immediate (no sleeping worker), and a flood of guesses holds at most 2 workers
    limits = {fn.concurrency_limit for fn in demo.fns.values() if fn.concurrency_id == "teacher_sign_in"}
    assert limits == {2}, "a flood of guesses may hold at most 2 workers"


def _login(url: str, name: str, password: str) -> httpx.Response:
    return httpx.post(f"{url}login", data={"username": name, "password": password}, timeout=10)


def test_auth_login_is_throttled_per_login_name_and_globally(serve):
    import launch
    _, url = serve(auth=launch.login_check([("ana", "pw-ana"), ("ben", "pw-ben"), TEACHER]), login=True)
    assert _login(url, "ana", "pw-ana").status_code == 200
    for _ in range(TRIES):
        r = _login(url, "tea", "guess")
        assert (r.status_code, r.json()["detail"]) == (400, "Incorrect credentials.")
    r = _login(url, "tea", TEACHER[1])                      # right, but the login is locked
    assert r.status_code == 400
    assert r.json()["detail"].startswith("Too many wrong passwords for the login 'tea': it is locked for ")
    assert _login(url, "ben", "pw-ben").status_code == 200   # other logins still work
    for i in range(TRIES_ALL - TRIES):                       # spread over names: the global budget
        assert _login(url, f"student{i}", "guess").status_code == 400
    r = _login(url, "ben", "pw-ben")
    assert r.status_code == 400 and "from everyone together" in r.json()["detail"]
