"""Thirty students on one server: page-action latency and training speed, side by side.

    python benchmarks/bench_classroom.py [--students 30] [--seconds 60] [--warmup 15] [--think 10]
                                         [--arrival 10] [--train-threads N] [--python .venv/bin/python]

What it does, all on loopback (127.0.0.1) and bounded in time and count:
1. starts ``launch.py`` as its own process (a fresh data and runs folder, one training slot, the
   training threads a class server gets: ``launch.default_train_threads`` leaves a core to the pages);
2. **alone**: one page loads the embedded sample and starts a long run of the default model (the
   tutorial net; a finished run is followed by the next); its Train tab polls once a second. After
   ``--warmup`` seconds the images trained in the next ``--seconds`` are counted from the runs'
   ``events.jsonl`` (BatchEnded steps and times, written by the training process);
3. **with the class**: ``--students`` more pages open, one after another over ``--arrival`` seconds
   (a gradio_client Client each = one browser session), then for ``--seconds`` each clicks an action
   every ``--think`` seconds (load the sample, change the split, estimate memory, show the layer
   table, list runs, predict an example image), all through gradio_client, while its Train tab
   polls once a second, as every open page with a run would. The poll is sent as the browser sends
   it (a plain POST: it is a ``queue=False`` event): gradio_client would add ~45 ms of its own CPU
   per call (measured) on the 2 cores the benchmark measures. Every call is timed; a failed call is
   counted, not retried. The images trained in this window are counted the same way.

It prints p50/p95/max per action, the error count, training speed alone vs with the class (the
goal: with 30 pages open training keeps >= 80 % of its speed alone, and every page action answers
in <= 2 s at the 95th percentile), and the cores used by the server, the training processes and
the simulated pages (which share the server's 2 cores here, as a real class's browsers would not).
"""
from __future__ import annotations

import argparse
import json
import os
import random
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
sys.path.insert(0, str(ROOT))   # core.rundir names the run folder's files
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


def start_server(python: str, work: Path, port: int, threads: int) -> subprocess.Popen:
    """launch.py in its own process on 127.0.0.1, with the training threads a class server gets
    (``--host 0.0.0.0`` leaves a core to the pages); returns once the page answers."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log = open(work / "server.log", "w")
    proc = subprocess.Popen([python, str(ROOT / "launch.py"), "--host", "127.0.0.1", "--port", str(port),
                             "--data-dir", str(work / "data"), "--runs-dir", str(work / "runs"),
                             "--max-jobs", "1", "--train-threads", str(threads)],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
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


def poll_page(url: str, session_hash: str) -> list:
    """One tick of a page's Train-tab timer, sent as the browser sends it: the poll is a
    ``queue=False`` event, so the page posts it straight to its API route (no queue, no event
    stream). gradio_client would send it through the queue and spend ~45 ms of this machine's CPU
    per call on its own side (measured), which a student's laptop, not the server, pays in class."""
    body = json.dumps({"data": [None, None], "session_hash": session_hash}).encode()
    req = urllib.request.Request(url + "gradio_api/api/poll_training/", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())["data"]


def open_page(url: str, timings: Timings, index: int, pages: dict, delay: float) -> None:
    """A student arrives ``delay`` seconds after the first and opens the page (gradio_client's
    Client fetches the config and the API description, more than a browser does)."""
    time.sleep(delay)
    timings.call("open page", lambda: pages.__setitem__(index, new_client(url)))


def student(url: str, client, timings: Timings, deadline: float, index: int, think: float) -> None:
    """One open page: an action every ``think`` seconds (load the sample, change the split, estimate
    memory, show the layer table, list runs, predict), its Train-tab timer polling once a second."""
    from gradio_client import handle_file
    memory_args = endpoint_args(client, "/memory")
    actions = [
        ("load sample", lambda: load_sample(client)),
        ("split", lambda: client.predict(20, 10, index, api_name="/split")),
        ("memory estimate", lambda: client.predict(*memory_args, api_name="/memory")),
        ("layer table", lambda: client.predict(*endpoint_args(client, "/layer_table"), api_name="/layer_table")),
        ("predict runs", lambda: client.predict(*endpoint_args(client, "/predict_runs"), api_name="/predict_runs")),
        ("predict", lambda: predict(client, handle_file(str(EXAMPLE)))),
    ]
    rng = random.Random(index)
    calls, next_action, next_poll = index, time.time() + rng.uniform(0, think), time.time() + rng.uniform(0, 1)
    while time.time() < deadline and calls < MAX_CALLS_PER_STUDENT + index:
        if time.time() >= next_action:
            name, fn = actions[calls % len(actions)]
            timings.call(name, fn)
            calls += 1
            next_action = time.time() + think
        if time.time() >= next_poll:
            timings.call("poll (Train tab)", poll_page, url, client.session_hash)
            next_poll += POLL_EVERY_S
        time.sleep(max(0.0, min(next_action, next_poll, deadline) - time.time()))


def start_training(url: str):
    """The trainer's page: load the sample, train one short run (so that the class has a finished
    run to predict with), then start the long one that is measured."""
    client = new_client(url)
    load_sample(client)
    client.predict(*endpoint_args(client, "/start_training", Epochs=1), api_name="/start_training")
    while not str(poll_page(url, client.session_hash)[0]).startswith(DONE):
        time.sleep(POLL_EVERY_S)
    client.predict(*endpoint_args(client, "/start_training", Epochs=TRAIN_EPOCHS), api_name="/start_training")
    return client


def training_rate(runs_dir: Path, t0: float, t1: float) -> tuple[float, int]:
    """Images/s trained between wall times t0 and t1, from the BatchEnded events of every run
    (a run that ends inside the window is followed by the next): the steps each run advanced
    inside the window times its batch size, over the window's length."""
    from core.rundir import CONFIG_FILE, EVENTS_FILE
    images, events = 0, 0
    for run in runs_dir.iterdir():
        if not (run / EVENTS_FILE).exists():
            continue
        batch = json.loads((run / CONFIG_FILE).read_text())["data"]["batch_size"]
        steps = [e["step"] for e in map(json.loads, (run / EVENTS_FILE).read_text().splitlines())
                 if e.get("kind") == "BatchEnded" and t0 <= e["time"] <= t1]
        events += len(steps)
        if len(steps) >= 2:
            images += (steps[-1] - steps[0]) * batch
    return images / (t1 - t0), events


def poll_while(url: str, client, seconds: float) -> None:
    """The trainer's own page polls once a second (in both windows alike); a run that has
    finished is followed by a new one, so training never pauses for long."""
    end = time.time() + seconds
    while time.time() < end:
        status = str(poll_page(url, client.session_hash)[0])
        if status.startswith(DONE):
            client.predict(*endpoint_args(client, "/start_training", Epochs=TRAIN_EPOCHS),
                           api_name="/start_training")
        time.sleep(POLL_EVERY_S)


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


class CpuMeter:
    """Cores used, on average over a window, by the server process, by its descendants (the fork
    server and the training processes, sampled every 0.2 s so a run that ends in the window still
    counts) and by this benchmark (the simulated pages). Linux /proc only."""

    def __init__(self, server_pid: int):
        self.server_pid = server_pid

    def _tree(self) -> dict[int, float]:
        seen, todo = {}, _children(self.server_pid)
        while todo:
            pid = todo.pop()
            seen[pid] = _cpu_seconds(pid)
            todo += _children(pid)
        return seen

    def measure(self, during, *args) -> str:
        first, last, stop = self._tree(), {}, threading.Event()
        starts = {"server": _cpu_seconds(self.server_pid), "pages": _cpu_seconds(os.getpid())}

        def follow():
            while not stop.wait(0.2):
                last.update(self._tree())

        watcher = threading.Thread(target=follow, daemon=True)
        t0 = time.time()
        watcher.start()
        during(*args)
        stop.set()
        watcher.join()
        seconds = time.time() - t0
        training = sum(v - first.get(pid, 0.0) for pid, v in last.items())
        used = {"server": _cpu_seconds(self.server_pid) - starts["server"], "training": training,
                "pages": _cpu_seconds(os.getpid()) - starts["pages"]}
        return ", ".join(f"{k} {v / seconds:.2f}" for k, v in used.items()) + " cores"


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
    p.add_argument("--think", type=float, default=10.0,
                   help="seconds between one student's clicks (default 10: read the result, then click)")
    p.add_argument("--arrival", type=float, default=10.0,
                   help="seconds over which the students open their pages, one after another (default 10)")
    p.add_argument("--train-threads", type=int, default=None,
                   help="threads of the training run (default: what launch.py --host 0.0.0.0 gives a class)")
    p.add_argument("--python", default=sys.executable, help="interpreter that runs launch.py")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-classroom-"))
    port = free_port()
    sys.path.insert(0, str(ROOT))
    from launch import default_train_threads
    train_threads = args.train_threads or default_train_threads("0.0.0.0", 1)
    server = start_server(args.python, work, port, train_threads)
    url = f"http://127.0.0.1:{port}/"
    try:
        trainer = start_training(url)
        poll_while(url, trainer, args.warmup)
        meter = CpuMeter(server.pid)
        t0 = time.time()
        cpu_alone = meter.measure(poll_while, url, trainer, args.seconds)
        alone, n_alone = training_rate(work / "runs", t0, time.time())
        timings, pages = Timings(), {}
        openers = [threading.Thread(target=open_page, daemon=True,
                                    args=(url, timings, i, pages, i * args.arrival / max(1, args.students)))
                   for i in range(args.students)]
        for t in openers:
            t.start()
        poll_while(url, trainer, args.arrival)
        for t in openers:
            t.join(timeout=SERVER_START_TIMEOUT_S)
        deadline = time.time() + args.seconds
        threads = [threading.Thread(target=student, args=(url, pages[i], timings, deadline, i, args.think),
                                    daemon=True) for i in sorted(pages)]
        t1 = time.time()
        for t in threads:
            t.start()
        cpu_crowded = meter.measure(poll_while, url, trainer, args.seconds)
        crowded, n_crowded = training_rate(work / "runs", t1, time.time())
        for t in threads:
            t.join(timeout=60)
        print(f"training with {train_threads} thread(s) on {os.cpu_count()} cores; "
              f"{args.students} students ({len(pages)} pages opened over {args.arrival:.0f} s), an action every {args.think:.0f} s each and "
              f"a poll a second; windows of {args.seconds:.0f} s after {args.warmup:.0f} s of warm-up; batch "
              f"events counted: {n_alone} alone, {n_crowded} with the class")
        report(timings, alone, crowded, args.students)
        print(f"CPU alone: {cpu_alone}\nCPU with the class: {cpu_crowded}")
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
