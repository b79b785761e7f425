"""Assemble the dashboard: one module per tab (``TABS``), each with ``build(ctx)`` (its layout and
wiring) and ``on_load(ctx, demo)`` (its page-load events).

The app never trains inside a request handler: the Train tab submits jobs to the engine's
JobManager and polls them with a gr.Timer (see core/jobs.py for why).
"""
from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path

import gradio as gr

from core import identity
from core.runs import RunHistory
from ui import tab_clean, tab_compare, tab_data, tab_evaluate, tab_inside, tab_memory, tab_model, tab_predict, tab_train
from ui.common import AppContext, Controller, safe

TITLE = "Classifier Lab"
# Events without their own limit run this many at once (Gradio's default is 1 app-wide, so a class
# opening the page together would wait in one line behind each page-load handler). Training never
# runs in a handler, and the heavy handlers (memory, exports) keep their own lower limits.
DEFAULT_CONCURRENCY = 8
SECRET_FILE = ".browser-secret"   # in the runs folder: the browser tokens outlive a server restart
SIGN_IN_CONCURRENCY = 2           # teacher sign-in tries at a time (each is quick; a flood waits in line)

# Larger type and roomier controls read well on a projector and stay usable on a laptop.
CSS = """
.gradio-container { max-width: 1400px !important; }
#lab-header h1 { margin-bottom: 0; }
#lab-header p { margin-top: 4px; opacity: 0.8; }
.lab-status textarea { font-weight: 600; }
.lab-progress { height: 22px; border-radius: 6px; background: var(--neutral-200); overflow: hidden; }
.lab-progress > div { height: 100%; background: var(--primary-500); transition: width 0.4s; }
.lab-log textarea { font-family: var(--font-mono); font-size: 13px !important; }
.lab-word-headers thead th, .lab-word-headers thead th * { word-break: normal !important;
  overflow-wrap: normal !important; font-size: 13px; }
.lab-numbers-right [role=gridcell]:not(.first-column) .cell-wrap { justify-content: flex-end; text-align: right; }
/* A dropped 32-pixel CIFAR image would otherwise sit as a speck in the middle of the drop zone. */
/* A handler that refuses bad input says why in a toast and leaves its outputs as they were; Gradio
   would also lay an "Error" badge over every output (over a JSON the user typed, over the dataset
   line), which hides what is still valid. */
[data-testid="status-tracker"]:has(> span.error) { display: none !important; }
/* Toasts sit at the bottom right, and clicks go through them (only their × takes one): at the top
   right a refusal's toast covered Stop and Resume. They close by themselves (ui.common.TOAST_S),
   and the Status line of the tab keeps a refusal. */
.toast-wrap { top: auto !important; bottom: 12px; }
.toast-body { pointer-events: none !important; }
.toast-body .toast-close { pointer-events: auto !important; }
/* Mistake captions ("automobile → truck 51%") wrap inside the thumbnail instead of ending in "…". */
#eval_errors .caption-label, #eval_cell_gallery .caption-label, #cmp_diff_a .caption-label, #cmp_diff_b .caption-label,
#clean_review .caption-label { white-space: normal; max-width: calc(100% - 8px); left: 4px; right: 4px;
  text-align: center; line-height: 1.25; }
#predict_image img, #inside_image img { min-width: 60%; max-height: 100%; object-fit: contain;
  image-rendering: pixelated; }
/* Look inside: 5×5 filters and 10×10 feature maps shown large stay crisp squares, not blurs. */
.lab-pixelated img { image-rendering: pixelated; object-fit: contain; padding-top: 36px; box-sizing: border-box; }
#projector_toggle { max-width: 24em; margin: 0 auto 0 0 !important; }
/* Projector mode (the header's toggle, remembered in this browser): the full width of a 1920-px
   screen, larger type, help text as dark as the rest, labels that wrap instead of being clipped. */
body.lab-projector, body.lab-projector .gradio-container {
  --text-xxs: 13px !important; --text-xs: 15px !important; --text-sm: 17px !important;
  --text-md: 20px !important; --text-lg: 22px !important; --text-xl: 26px !important; --text-xxl: 30px !important;
  --checkbox-label-text-size: 18px !important; --body-text-size: 20px !important; --block-label-text-size: 18px !important;
  --block-info-text-size: 17px !important; --block-title-text-size: 19px !important;
  --input-text-size: 20px !important; --button-large-text-size: 20px !important;
  --button-small-text-size: 18px !important; --section-header-text-size: 20px !important;
  --body-text-color-subdued: var(--body-text-color) !important; --block-info-text-color: var(--body-text-color) !important;
  --block-label-text-color: var(--body-text-color) !important;
}
body.lab-projector .gradio-container { max-width: 100% !important; }
body.lab-projector label span, body.lab-projector .label-wrap span { white-space: normal !important;
  overflow: visible !important; text-overflow: clip !important; }
body.lab-projector .prose, body.lab-projector .prose * { font-size: 20px; }
body.lab-projector .prose h1 { font-size: 34px; }
"""
PROJECTOR_KEY = "classifier-lab-projector"
# Client-side only (no server round trip): the toggle sets a class on <body> and remembers it.
PROJECTOR_JS = ("(on) => { document.body.classList.toggle('lab-projector', !!on); "
                f"try {{ localStorage.setItem('{PROJECTOR_KEY}', on ? '1' : '0'); }} catch (e) {{}} return on; }}")
PROJECTOR_RESTORE_JS = (f"() => {{ let on = false; try {{ on = localStorage.getItem('{PROJECTOR_KEY}') === '1'; }} "
                        "catch (e) {} document.body.classList.toggle('lab-projector', on); return on; }")

# (label, module): each module's build(ctx) lays out and wires its tab, on_load(ctx, demo) adds the
# page-load events (after every tab is built, so a tab can link to those after it).
TABS = [("Data", tab_data), ("Clean data", tab_clean), ("Model", tab_model), ("Memory", tab_memory), ("Train", tab_train),
        ("Evaluate", tab_evaluate), ("Look inside", tab_inside), ("Compare", tab_compare), ("Predict", tab_predict)]


class PageHandlers(Controller):
    """What belongs to the page rather than to a tab: its browser token and its session state."""

    @safe
    def ensure_token(self, token):
        """One stable, server-signed token per browser (kept in localStorage): a reloaded page finds
        its jobs again. A missing, legacy (unsigned) or forged token is replaced by a new one."""
        return identity.ensure_token(self.ctx.secret, token)

    @safe
    def same_session(self, session: dict) -> dict:
        """Gradio drops a page's session state an hour after the page closes, but only a State that
        an event has set: this one is changed in place, so the page load sets it (to itself) once.
        Without it every closed page's dataset stayed in memory for the life of the server."""
        return session

    def close_session(self, session) -> None:
        """Gradio dropped this page's state (the tab was closed): the dataset built in it cleans up."""
        tab_data.close_session(self.ctx, session)


def build_app(manager, data_dir: str | Path = "data", runs_dir: str | Path = "runs",
              data_roots: list[str | Path] | None = None, teacher: tuple[str, str] | None = None,
              login: bool = False, private_runs: bool = False) -> gr.Blocks:
    """Build the Blocks for ``manager`` (a core.jobs.JobManager). Nothing heavy runs here.

    data_roots: the only folders the Data tab may load from (default: ``data_dir`` and assets/);
    teacher: (login name, password) of --teacher; login: the app runs with --auth (the teacher
    then logs in with that name; without it, the page has a teacher sign-in box); private_runs:
    nobody but the teacher sees others' runs."""
    ctx = AppContext(manager=manager, data_dir=Path(data_dir), runs_dir=Path(runs_dir),
                     data_roots=None if data_roots is None else [str(r) for r in data_roots],
                     teacher=teacher, login=login, private_runs=private_runs)
    ctx.secret = browser_secret(ctx.runs_dir)
    ctx.history = RunHistory(ctx.runs_dir)
    ctx.history.attach(manager)
    page = PageHandlers(ctx)
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        _page_state(ctx, page)
        _header(demo)
        if teacher is not None and not login:
            _teacher_sign_in(ctx)
        ctx.shared["tab"] = {}
        with gr.Tabs(elem_id="lab-tabs") as ctx.shared["tabs"]:
            for label, module in TABS:
                slug = label.lower().replace(" ", "-")   # "Look inside" → id look-inside, #tab-look-inside
                with gr.Tab(label, id=slug, elem_id=f"tab-{slug}") as tab:
                    ctx.shared["tab"][label] = tab
                    module.build(ctx)
        demo.load(page.ensure_token, ctx.browser_id, ctx.browser_id, api_visibility="private")
        demo.load(page.same_session, ctx.session, ctx.session, api_visibility="private", queue=False)
        for _, module in TABS:
            module.on_load(ctx, demo)
    demo.queue(default_concurrency_limit=DEFAULT_CONCURRENCY)
    return demo


def _page_state(ctx: AppContext, page: PageHandlers) -> None:
    """The page's session state and its browser token."""
    # A plain {} (deep-copied for each new session), not gr.State(dict): a callable value adds a
    # page-load event (and a public "/dict" endpoint) that resets the state to a fresh dict; it
    # raced the Data tab's load and sometimes wiped the dataset a page had just loaded.
    # When Gradio drops a page's state (tab closed), the dataset built in it cleans up. Gradio puts
    # the callback's repr in the page config: a bound method of PageHandlers shows no ctx.
    ctx.session = gr.State({}, delete_callback=page.close_session)
    # The browser token (core.identity) is kept in localStorage. Gradio puts a BrowserState's
    # secret in the page config, so it gets a key derived from the signing secret, never the
    # secret itself; both last across restarts, so a browser keeps its runs (Resume, the
    # Compare tab's last comparison).
    ctx.browser_id = gr.BrowserState(None, storage_key="classifier-lab-browser-id",
                                     secret=identity.storage_key(ctx.secret))


def _header(demo: gr.Blocks) -> None:
    """The title and the projector toggle (client-side only, remembered in this browser)."""
    gr.Markdown(f"# {TITLE}\nTrain, inspect, compare and use image classifiers — "
                "go through the tabs from left to right.", elem_id="lab-header")
    projector = gr.Checkbox(False, label="Projector mode (large, high-contrast text, full width)",
                            elem_id="projector_toggle", container=False)
    projector.change(None, projector, None, js=PROJECTOR_JS, api_visibility="private")
    demo.load(None, None, projector, js=PROJECTOR_RESTORE_JS, api_visibility="private")


def browser_secret(runs_dir: Path) -> str:
    """The key the browser ids are encrypted with: made once, kept (owner-readable only) in the
    runs folder, so that it lasts as long as the runs it gives access to."""
    path = Path(runs_dir) / SECRET_FILE
    try:
        value = path.read_text(encoding="ascii").strip()
        if len(value) >= 16:
            return value
    except (OSError, UnicodeDecodeError):
        pass
    value = secrets.token_urlsafe(24)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(value)
    except OSError:   # a read-only runs folder: ids then last until the server stops
        pass
    return value


class TeacherSignIn(Controller):
    """The teacher sign-in (no --auth): a right password marks this Gradio session as the teacher's,
    on the server; nothing the page holds can claim it. Guessing is throttled per computer and for
    everyone together (core.identity.SignInGuard), never per session, which the client picks; a
    throttled try is refused at once."""

    def __init__(self, ctx: AppContext):
        super().__init__(ctx)
        self.guard = identity.SignInGuard(per="computer")

    @safe
    def check(self, given: str, request: gr.Request):
        session = getattr(request, "session_hash", None)
        if not session:
            raise gr.Error("Teacher sign-in needs a page session; open the lab in a browser.")
        if not self.guard.attempt(_client_address(request), given, self.ctx.teacher[1]):
            raise gr.Error("Wrong teacher password.")
        self.ctx.teacher_sessions.add(session)
        return "", "Signed in as the teacher for this page: you can stop, resume, rename, tag, export and " \
                   "delete every run, and see all of them. A reload signs you out."


def _teacher_sign_in(ctx: AppContext) -> TeacherSignIn:
    """A small password box under the header; at most SIGN_IN_CONCURRENCY tries run at a time, so a
    flood of guesses holds no worker that other pages need."""
    sign = TeacherSignIn(ctx)
    with gr.Accordion("Teacher sign-in", open=False, elem_id="teacher_signin"):
        with gr.Row():
            password = gr.Textbox(label="Teacher password", type="password", scale=3, elem_id="teacher_password")
            sign_in = gr.Button("Sign in", scale=1, elem_id="teacher_signin_btn")
        note = gr.Markdown("", elem_id="teacher_note")
    limits = {"concurrency_limit": SIGN_IN_CONCURRENCY, "concurrency_id": "teacher_sign_in"}
    sign_in.click(sign.check, password, [password, note], api_name="teacher_sign_in", **limits)
    password.submit(sign.check, password, [password, note], api_visibility="private", **limits)
    return sign


def _client_address(request) -> str:
    """The address the request came from: the socket's peer as uvicorn reports it, which a page
    cannot pick the way it picks its session hash (uvicorn believes X-Forwarded-For only from a
    proxy on the server itself, 127.0.0.1). "unknown" when Gradio gives none: such tries then
    share one budget, besides the global one."""
    client = getattr(request, "client", None)
    host = getattr(client, "host", None)
    return str(host) if host else "unknown"


def _served_folder_ok(folder: Path) -> bool:
    """Whether ``folder`` can be put in ``blocked_paths``: not when it holds Gradio's own upload and
    cache folder (a runs folder of /tmp would block every upload and every image)."""
    cache = Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio").resolve()
    return not cache.is_relative_to(folder.resolve())


def launch_kwargs(data_dir: str | Path, runs_dir: str | Path) -> dict:
    """Options for ``demo.launch``: offline-safe, and no folder served by path. Images go to the
    page as values (Gradio writes them to its cache) and downloads are copied out by the handler
    that checked who asks; the data and runs folders are even blocked, so no path there (the
    signing secret, the index, checkpoints, meta.json, uploads) is served or returned by mistake."""
    # As the server's owner wrote them (Gradio resolves them when it checks): its refusal message
    # quotes this list to whoever sent the path, and need not tell them where the lab is installed.
    blocked = [os.fspath(f) for f in (data_dir, runs_dir) if _served_folder_ok(Path(f))]
    return {
        "theme": gr.themes.Soft(),          # bundled fonts only (no Google Fonts request)
        "css": CSS,
        "footer_links": ["settings"],
        "allowed_paths": [],
        "blocked_paths": blocked,
        "enable_monitoring": False,
        "max_file_size": "1gb",
        "show_error": True,
        "run_history": False,
    }
