"""Start the Classifier Lab dashboard.

    python launch.py [--host 127.0.0.1] [--port 7860] [--data-dir DIR] [--runs-dir DIR]
                     [--data-root DIR ...] [--max-jobs N] [--max-job-memory SIZE] [--train-threads N]
                     [--auth USER:PASS] [--teacher USER:PASS] [--private-runs] [--share]

Works with no network at all: analytics, the version check, hub telemetry and the /monitoring
page are turned off before Gradio is imported, and the page uses only bundled fonts and scripts.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

# Offline and private by default: no analytics or version check from
# the server, no huggingface_hub telemetry. Set before gradio is imported.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_RUN_HISTORY", "False")

import core  # noqa: E402,F401  (before anything loads torch: it sets the CPU threads' short spin-wait)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Classifier Lab: train, inspect, compare and use image classifiers.")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this computer only; 0.0.0.0 for a classroom LAN)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--data-dir", default="data", help="dataset cache and uploads (default data/)")
    p.add_argument("--data-root", dest="data_roots", action="append", default=None, metavar="DIR",
                   help="a folder whose datasets page users may load (repeat for several); nothing outside "
                        "these is readable from the page (default: the --data-dir folder and assets/)")
    p.add_argument("--runs-dir", default="runs", help="run history: configs, metrics, checkpoints (default runs/)")
    p.add_argument("--max-jobs", type=int, default=None,
                   help="training jobs at once; more are queued (default 1 on CPU, 1 per GPU)")
    p.add_argument("--max-job-memory", type=_size, default=None, metavar="SIZE",
                   help="memory one training run may use at most, e.g. 4GiB, 512MiB or 3G (default: what is "
                        "free); a run that needs more is refused with the batch size that fits")
    p.add_argument("--train-threads", type=int, default=None, metavar="N",
                   help="CPU threads of each training run (default: every core for a server on this computer "
                        "only; with --host for a class, one core fewer, left to the pages, shared by --max-jobs)")
    p.add_argument("--auth", action="append", default=None, metavar="USER:PASS",
                   help="require a login (repeat the flag: one login per student); each login is one user, who "
                        "finds their own runs again from any browser. A login several people share makes "
                        "them one user")
    p.add_argument("--teacher", default=None, metavar="USER:PASS",
                   help="a teacher, who may stop, resume, rename, tag, export and delete every run: with --auth "
                        "they log in as USER; without it, the page has a 'Teacher sign-in' box for PASS")
    p.add_argument("--private-runs", action="store_true",
                   help="each user sees only their own runs (the teacher sees all); by default everyone may "
                        "view every run, and only its owner or the teacher may change it")
    p.add_argument("--share", action="store_true", help="ask Gradio for a public share link (needs internet)")
    p.add_argument("--tensorboard", action="store_true",
                   help="also log every run for TensorBoard (needs `pip install tensorboard`; "
                        "then: tensorboard --logdir runs/)")
    return p.parse_args(argv)


def _size(text: str) -> int:
    """--max-job-memory: bytes from 4GiB, 512MiB, 3G... (argparse prints the message and exits)."""
    from core.resources import parse_size
    from core.errors import ConfigError
    try:
        return parse_size(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def default_train_threads(host: str, max_jobs: int, cores: int | None = None) -> int | None:
    """Threads per training run. On this computer only (loopback): None, every core (torch's own
    default). Served to a class: one core is left to the pages, the rest shared by the runs. On 2
    cores a run with 1 thread trains a little slower alone than with 2, but keeps most of its speed
    with 30 pages open, where 2 threads lose about half (benchmarks/bench_classroom.py measures it)."""
    if host in LOOPBACK:
        return None
    cores = cores or len(os.sched_getaffinity(0))
    return max(1, (cores - 1) // max(1, max_jobs))


def default_max_jobs() -> int:
    import torch
    return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1


def parse_logins(args: argparse.Namespace):
    """(auth for demo.launch, teacher (name, password)) from --auth and --teacher; ValueError with
    the message for a malformed one. With both, the teacher is one more login of Gradio's page."""
    auth, teacher = [], None
    for given in args.auth or []:
        login = tuple(given.split(":", 1))
        if len(login) != 2 or not all(login):
            raise ValueError(f"--auth needs USER:PASS, e.g. --auth ana:secret1 (got {login[0]!r} without a password)")
        if login[0] in {name for name, _ in auth}:
            raise ValueError(f"--auth names the user {login[0]!r} twice; give each student one login")
        auth.append(login)
    if args.teacher:
        teacher = tuple(args.teacher.split(":", 1))
        if len(teacher) != 2 or not all(teacher):
            raise ValueError("--teacher needs USER:PASS, e.g. --teacher teacher:secret")
        if teacher[0] in {name for name, _ in auth}:
            raise ValueError(f"--auth and --teacher both name the user {teacher[0]!r}; give the teacher "
                             "another name, e.g. --auth ana:pass1 --teacher teacher:pass2")
        if auth:
            auth.append(teacher)
    return (auth or None), teacher


def login_check(auth):
    """Gradio's ``auth`` for the --auth logins (None without them): core.identity.LoginCheck, a
    constant-time comparison throttled per login name and for everyone together, so POST /login
    cannot be hammered (Gradio's own list check has no throttle). A throttled try is answered 400,
    the one status Gradio's login page reports ("Incorrect credentials"), with a detail that says
    when to try again; ``login_message`` on that page explains the lock."""
    if not auth:
        return None
    from fastapi import HTTPException

    from core import identity
    check = identity.LoginCheck(auth)

    def login(username, password) -> bool:
        try:
            return check(username, password)
        except identity.TooManyTries as err:
            raise HTTPException(status_code=400, detail=str(err)) from None

    return login


def login_message() -> str:
    """The note Gradio's login page shows above the form (it cannot show a refusal's own text)."""
    from core import identity
    return (f"After {identity.SIGN_IN_TRIES} wrong passwords for one login within a minute, that login "
            f"refuses every password for the rest of the minute (after {identity.SIGN_IN_TRIES_ALL} from "
            "everyone together, every login does): wait a minute, then try again.")


def _argument_problem(args: argparse.Namespace, max_jobs: int) -> str | None:
    """What is wrong with the numbers and folders given, in words (None: nothing)."""
    if max_jobs < 1:
        return f"--max-jobs must be at least 1, got {max_jobs}"
    if args.train_threads is not None and args.train_threads < 1:
        return f"--train-threads must be at least 1, got {args.train_threads}"
    for root in args.data_roots or []:
        if not os.path.isdir(os.path.expanduser(root)):
            return f"--data-root {root} is not a folder on this server; give an existing folder"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        auth, teacher = parse_logins(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    max_jobs = args.max_jobs if args.max_jobs is not None else default_max_jobs()
    problem = _argument_problem(args, max_jobs)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    threads = args.train_threads or default_train_threads(args.host, max_jobs)

    from ui.app import build_app, launch_kwargs
    from core.jobs import JobManager
    from core.resources import format_size

    # One line per refused input in the console ("12:03:04 load_data: Folder ... does not
    # exist"), the trace only for real bugs; other libraries' INFO chatter stays off. "ui": the
    # page's handlers (ui.common.safe logs as ui.common); "classifier_lab": the job manager.
    for name in ("classifier_lab", "ui"):
        lab_log = logging.getLogger(name)
        if not lab_log.handlers:   # main() called again in one process (tests) adds no second one
            console = logging.StreamHandler()
            console.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
            lab_log.addHandler(console)
        lab_log.setLevel(logging.INFO)
        lab_log.propagate = False

    manager = JobManager(runs_dir=args.runs_dir, data_dir=args.data_dir, max_jobs=max_jobs,
                         max_job_memory=args.max_job_memory, train_threads=threads,
                         multi_gpu_jobs=args.host in LOOPBACK)   # "use all GPUs" for this computer's user only
    if args.tensorboard:
        from core import tb
        from core.errors import LabError
        try:
            tb.TensorBoardLogger(data_dir=args.data_dir).attach(manager)
        except LabError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    demo = build_app(manager, data_dir=args.data_dir, runs_dir=args.runs_dir, data_roots=args.data_roots,
                     teacher=teacher, login=auth is not None, private_runs=args.private_runs)
    print(f"Classifier Lab: http://{args.host}:{args.port}  (data {args.data_dir}, runs {args.runs_dir}, "
          f"{max_jobs} training job(s) at a time"
          + (f" with {threads} thread(s) each" if threads else "")
          + (f", at most {format_size(args.max_job_memory)} each" if args.max_job_memory else "") + ")", flush=True)
    try:
        demo.launch(server_name=args.host, server_port=args.port, auth=login_check(auth),
                    auth_message=login_message() if auth else None, share=args.share,
                    **launch_kwargs(args.data_dir, args.runs_dir))
    except OSError as err:
        print(f"error: cannot listen on {args.host}:{args.port} ({err}). Is another lab running? "
              f"Try --port {args.port + 1}.", file=sys.stderr)
        return 1
    finally:
        manager.shutdown(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
