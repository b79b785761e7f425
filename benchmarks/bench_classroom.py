"""Thirty students on one server: page-action latency and training speed, side by side.

    python benchmarks/bench_classroom.py [--students 30] [--seconds 60] [--warmup 15]
                                         [--python .venv/bin/python]

What it does, all on loopback (127.0.0.1) and bounded in time and count:
1. starts ``launch.py`` as its own process (a fresh data and runs folder, one training slot),
   as a teacher would for a class;
2. **alone**: one student loads the embedded sample and starts a long run of the default model
   (the tutorial net); its page polls once a second, as the Train tab does. After ``--warmup``
   seconds the images trained in the next ``--seconds`` are counted from the run's
   ``events.jsonl`` (BatchEnded steps and times, written by the training process);
3. **with the class**: the same run goes on while ``--students`` more gradio_client sessions (one
   Client each = one browser page) work in a loop until the window ends: load the sample, change
   the split, estimate memory, show the layer table, predict an example image, list runs, and poll
   the Train tab once a second in between. Every call is timed; a failed call is counted, not
   retried. The images trained in this window are counted the same way.

It prints p50/p95/max per action, the error count, and training speed alone vs with the class
(the goal: with 30 pages open training keeps >= 80 % of its speed alone, and every page action
answers in <= 2 s at the 95th percentile). The clients run in this process and share the same 2
cores as the server and the training process, as a real class on one machine would not: their
own cost counts against the figures, so the goals are checked on the pessimistic side.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

EXAMPLE = ROOT / "assets" / "examples" / "cat.jpg"
SAMPLE = "Embedded CIFAR-10 sample"
MAX_CALLS_PER_STUDENT = 2_000      # a hard bound besides the time window
POLL_EVERY_S = 1.0                 # the Train tab's timer period a page polls with
SERVER_START_TIMEOUT_S = 120
TRAIN_EPOCHS = 200                 # the slider's maximum: about a minute of the default run here
DONE = ("Finished", "Stopped", "Failed", "Interrupted")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(python: str, work: Path, port: int) -> subprocess.Popen:
    """launch.py in its own process on 127.0.0.1; returns once the page answers."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log = open(work / "server.log", "w")
    proc = subprocess.Popen([python, str(ROOT / "launch.py"), "--host", "127.0.0.1", "--port", str(port),
                             "--data-dir", str(work / "data"), "--runs-dir", str(work / "runs"),
                             "--max-jobs", "1"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + SERVER_START_TIMEOUT_S
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}; see {work / 'server.log'}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2):
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"the server did not answer within {SERVER_START_TIMEOUT_S} s; see {work / 'server.log'}")


def new_client(url: str):
    from gradio_client import Client
    return Client(url, verbose=False, analytics_enabled=False, download_files=False)


def endpoint_args(client, endpoint: str, **by_label) -> list:
    """Every parameter of ``endpoint`` at the page's default, some set by their label."""
    params = client.view_api(print_info=False, return_format="dict")["named_endpoints"][endpoint]["parameters"]
    values = [p.get("parameter_default") for p in params]
    for i, p in enumerate(params):
        if p["label"] in by_label:
            values[i] = by_label[p["label"]]
    return values


def load_sample(client):
    return client.predict(SAMPLE, "CIFAR10", None, "", "per class", 10, 10, 0, api_name="/load_data")


class Timings:
    """Per-action latencies and errors, shared by the student threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.seconds: dict[str, list[float]] = defaultdict(list)
        self.errors: dict[str, list[str]] = defaultdict(list)

    def call(self, name: str, fn, *args, **kw):
        t0 = time.perf_counter()
        try:
            fn(*args, **kw)
        except Exception as err:   # a benchmark counts failures; it does not stop on them
            with self.lock:
                self.errors[name].append(f"{type(err).__name__}: {str(err)[:160]}")
        finally:
            with self.lock:
                self.seconds[name].append(time.perf_counter() - t0)


def predict(client, image) -> None:
    """Predict with the first finished run the page lists (the trainer's short run)."""
    runs = client.predict(*endpoint_args(client, "/predict_runs"), api_name="/predict_runs")
    run_value = runs.get("value") if isinstance(runs, dict) else runs   # the dropdown's pick: the newest
    args = endpoint_args(client, "/predict")
    args[0] = image
    if len(args) > 2:
        args[2] = run_value
    client.predict(*args, api_name="/predict")


def student(url: str, timings: Timings, deadline: float, index: int) -> None:
    """One page: a loop of the actions a student clicks, polling the Train tab once a second."""
    from gradio_client import handle_file
    timings.call("open page", lambda: setattr(student, f"c{index}", new_client(url)))
    client = getattr(student, f"c{index}", None)
    if client is None:
        return
    memory_args = endpoint_args(client, "/memory")
    actions = [
        ("load sample", lambda: load_sample(client)),
        ("split", lambda: client.predict(20, 10, index, api_name="/split")),
        ("memory estimate", lambda: client.predict(*memory_args, api_name="/memory")),
        ("layer table", lambda: client.predict(*endpoint_args(client, "/layer_table"), api_name="/layer_table")),
        ("predict runs", lambda: client.predict(*endpoint_args(client, "/predict_runs"), api_name="/predict_runs")),
        ("predict", lambda: predict(client, handle_file(str(EXAMPLE)))),
    ]
    calls, last_poll = 0, 0.0
    while time.time() < deadline and calls < MAX_CALLS_PER_STUDENT:
        name, fn = actions[calls % len(actions)]
        timings.call(name, fn)
        calls += 1
        while time.time() - last_poll >= POLL_EVERY_S and time.time() < deadline:
            last_poll = time.time()
            timings.call("poll (Train tab)", lambda: client.predict(None, api_name="/poll_training"))
        time.sleep(max(0.0, POLL_EVERY_S - (time.time() - last_poll)))


def start_training(url: str):
    """The trainer's page: load the sample, train one short run (so that the class has a finished
    run to predict with), then start the long one that is measured."""
    client = new_client(url)
    load_sample(client)
    client.predict(*endpoint_args(client, "/start_training", Epochs=1), api_name="/start_training")
    while not str(client.predict(None, api_name="/poll_training")[0]).startswith(DONE):
        time.sleep(POLL_EVERY_S)
    client.predict(*endpoint_args(client, "/start_training", Epochs=TRAIN_EPOCHS), api_name="/start_training")
    return client


def training_rate(runs_dir: Path, t0: float, t1: float) -> tuple[float, int]:
    """Images/s trained between wall times t0 and t1, from the BatchEnded events of every run
    (a run that ends inside the window is followed by the next): the steps each run advanced
    inside the window times its batch size, over the window's length."""
    images, events = 0, 0
    for run in runs_dir.iterdir():
        if not (run / "events.jsonl").exists():
            continue
        batch = json.loads((run / "config.json").read_text())["data"]["batch_size"]
        steps = [e["step"] for e in map(json.loads, (run / "events.jsonl").read_text().splitlines())
                 if e.get("kind") == "BatchEnded" and t0 <= e["time"] <= t1]
        events += len(steps)
        if len(steps) >= 2:
            images += (steps[-1] - steps[0]) * batch
    return images / (t1 - t0), events


def poll_while(client, seconds: float) -> None:
    """The trainer's own page polls once a second (in both windows alike); a run that has
    finished is followed by a new one, so training never pauses for long."""
    end = time.time() + seconds
    while time.time() < end:
        status = str(client.predict(None, api_name="/poll_training")[0])
        if status.startswith(DONE):
            client.predict(*endpoint_args(client, "/start_training", Epochs=TRAIN_EPOCHS),
                           api_name="/start_training")
        time.sleep(POLL_EVERY_S)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def report(timings: Timings, alone: float, crowded: float, students: int) -> None:
    print(f"\n{'action':<18} {'calls':>6} {'p50 s':>7} {'p95 s':>7} {'max s':>7} {'errors':>7}")
    worst = 0.0
    for name in sorted(timings.seconds):
        vals = timings.seconds[name]
        p95 = percentile(vals, 0.95)
        worst = max(worst, p95)
        print(f"{name:<18} {len(vals):>6} {statistics.median(vals):>7.2f} {p95:>7.2f} {max(vals):>7.2f} "
              f"{len(timings.errors[name]):>7}")
    for name, errs in timings.errors.items():
        if errs:
            print(f"  first error in {name}: {errs[0]}")
    ratio = crowded / alone if alone else float("nan")
    print(f"\ntraining speed alone: {alone:,.0f} images/s; with {students} pages: {crowded:,.0f} images/s "
          f"(ratio {ratio:.2f}; goal >= 0.80)")
    print(f"worst p95 of any page action: {worst:.2f} s (goal <= 2 s)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--students", type=int, default=30)
    p.add_argument("--seconds", type=float, default=60.0, help="length of each measured window")
    p.add_argument("--warmup", type=float, default=15.0, help="seconds of training before measuring")
    p.add_argument("--python", default=sys.executable, help="interpreter that runs launch.py")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-classroom-"))
    port = free_port()
    server = start_server(args.python, work, port)
    url = f"http://127.0.0.1:{port}/"
    try:
        trainer = start_training(url)
        poll_while(trainer, args.warmup)
        t0 = time.time()
        poll_while(trainer, args.seconds)
        alone, n_alone = training_rate(work / "runs", t0, time.time())
        timings = Timings()
        deadline = time.time() + args.seconds
        threads = [threading.Thread(target=student, args=(url, timings, deadline, i), daemon=True)
                   for i in range(args.students)]
        t1 = time.time()
        for t in threads:
            t.start()
        poll_while(trainer, args.seconds)
        crowded, n_crowded = training_rate(work / "runs", t1, time.time())
        for t in threads:
            t.join(timeout=60)
        print(f"{args.students} students, windows of {args.seconds:.0f} s after {args.warmup:.0f} s of warm-up; "
              f"batch events counted: {n_alone} alone, {n_crowded} with the class")
        report(timings, alone, crowded, args.students)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
