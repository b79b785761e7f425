"""Who is asking, and what they may do with a run.

Identity. A page keeps a browser token ``<id>.<HMAC-SHA256(secret, id)>`` that the server issued;
every event sends it back, and only a token whose signature checks out names a browser. Anything
else a caller sends (a raw id read from a run's meta.json, a forged signature) is worth nothing:
the caller is then only its own Gradio session. The key is the server-only secret kept in the
runs folder, so tokens outlive a restart. It is never given to the page: Gradio publishes a
BrowserState's ``secret`` in the page config, so the BrowserState gets a key derived from it
(``storage_key``) that says nothing about the signing key.

Permissions. ``can_view`` and ``can_change`` are the one rule every handler that acts on a run
asks: the owner or the teacher may change a run (stop, resume, delete, rename, tag, export); others
may look at it unless the lab runs with private runs. A run with no owner (the command line) is
the server owner's: only the teacher changes it.

Sign-in. ``SignInGuard`` checks a password against a budget of wrong ones per client address (the
page's teacher sign-in) or per login name (``LoginCheck``, Gradio's ``auth`` with --auth) and one
for everyone together; over budget, every password is refused at once, unchecked.
"""
from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Callable

from core.errors import ConfigError

TOKEN_ID_BYTES = 16
# Password guessing (SignInGuard): in any SIGN_IN_WINDOW_S, at most SIGN_IN_TRIES wrong passwords
# from one computer (the page's teacher sign-in) or for one login name (--auth), and at most
# SIGN_IN_TRIES_ALL from everyone together. The global budget is what bounds a class with many
# computers: 20 a minute is 28,800 guesses a day, so a password of 8 random letters and digits
# (2.8e12) or three random dictionary words is out of reach for years, while a word from a
# list of common passwords is not: pick the teacher password accordingly.
SIGN_IN_WINDOW_S = 60.0
SIGN_IN_TRIES = 5
SIGN_IN_TRIES_ALL = 20


@dataclass(frozen=True)
class Who:
    """The person behind a request: an owner string (``user:<login>``, ``browser:<id>`` or
    ``session:<digest>``) and whether they are the teacher."""
    owner: str
    teacher: bool = False


# ---- browser tokens ---------------------------------------------------------------------------
def _mac(secret: str, ident: str) -> str:
    return hmac.new(secret.encode("utf-8"), ident.encode("utf-8"), hashlib.sha256).hexdigest()


def sign(secret: str, ident: str) -> str:
    """The token for browser id ``ident``."""
    return f"{ident}.{_mac(secret, ident)}"


def new_token(secret: str) -> str:
    """A fresh browser id, signed."""
    return sign(secret, secrets.token_hex(TOKEN_ID_BYTES))


def verify(secret: str | None, token) -> str | None:
    """The browser id a token names when its signature is the server's; else None (a raw id, a
    forged or truncated signature, anything that is not a string)."""
    if not secret or not isinstance(token, str) or token.count(".") != 1:
        return None
    ident, mac = token.split(".")
    if not ident or not all(c in "0123456789abcdef" for c in ident):
        return None
    return ident if hmac.compare_digest(mac, _mac(secret, ident)) else None


def ensure_token(secret: str, token) -> str:
    """``token`` when it is valid, else a fresh signed one (an old page's raw id is replaced, not
    signed: signing an id the caller chose would let anyone claim someone else's runs)."""
    return token if verify(secret, token) else new_token(secret)


def storage_key(secret: str) -> str:
    """The key for the BrowserState's own encryption, which Gradio sends to every page: derived one
    way from ``secret``, so publishing it reveals nothing that signs tokens."""
    return _mac(secret, "browser-state-storage-key")[:32]


def session_owner(session_hash: str | None) -> str:
    """The owner string of a Gradio session. A digest, not the hash itself: the session hash is the
    bearer secret of that session, and owners are written to meta.json and shown in tables."""
    if not session_hash:
        return "session:local"
    return "session:" + hashlib.sha256(session_hash.encode("utf-8")).hexdigest()[:24]


# ---- permissions ------------------------------------------------------------------------------
def can_view(owner: str | None, who: Who, private: bool) -> bool:
    """Whether ``who`` may see a run of ``owner``: anyone, unless runs are private; then only
    the owner and the teacher."""
    return not private or who.teacher or (owner is not None and owner == who.owner)


def can_change(owner: str | None, who: Who) -> bool:
    """Whether ``who`` may stop, resume, delete, rename, tag or export a run of ``owner``."""
    return who.teacher or (owner is not None and owner == who.owner)


def refusal(action: str) -> str:
    return f"This run belongs to someone else; only its owner or the teacher can {action} it."


def require_change(owner: str | None, who: Who, action: str) -> None:
    """ConfigError with the plain refusal when ``who`` may not ``action`` the run."""
    if not can_change(owner, who):
        raise ConfigError(refusal(action))


def require_view(owner: str | None, who: Who, private: bool) -> None:
    if not can_view(owner, who, private):
        raise ConfigError("This run belongs to someone else, and runs are private on this server: "
                          "only its owner or the teacher can see it.")


# ---- teacher sign-in ----------------------------------------------------------------------------
def password_matches(given, expected: str) -> bool:
    """Constant-time comparison (no timing hint about how much of a guess was right)."""
    if not isinstance(given, str):
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


class SignInThrottle:
    """At most ``tries`` failures per key in ``window`` seconds (a sliding window). Used by
    SignInGuard, which decides what the keys are; keys are never anything the client chooses."""

    def __init__(self, tries: int = SIGN_IN_TRIES, window: float = SIGN_IN_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic):
        self.tries, self.window, self.clock = tries, window, clock
        self._failures: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: str) -> list[float]:
        now = self.clock()
        recent = [t for t in self._failures.get(key, []) if now - t < self.window]
        if recent:
            self._failures[key] = recent
        else:
            self._failures.pop(key, None)   # the table does not grow with every key ever seen
        return recent

    def wait_s(self, key: str) -> float:
        """Seconds before ``key`` may try again (0: now)."""
        with self._lock:
            recent = self._recent(key)
            if len(recent) < self.tries:
                return 0.0
            return max(0.0, self.window - (self.clock() - recent[0]))

    def failed(self, key: str) -> None:
        with self._lock:
            for old in list(self._failures):   # forget every key whose failures are all old
                self._recent(old)
            self._failures.setdefault(key, []).append(self.clock())


class TooManyTries(ConfigError):
    """A sign-in refused without looking at the password; ``wait_s``: when to try again."""

    def __init__(self, message: str, wait_s: float):
        super().__init__(message)
        self.wait_s = wait_s


EVERYONE = "\0everyone"   # the global budget's key (no address or login name contains a NUL)


class SignInGuard:
    """Password checks that cannot be hammered: per ``key`` (the client's address for the page's
    teacher sign-in, the login name for --auth; never a session id, which the client chooses) at
    most ``tries`` wrong passwords per ``window``, and at most ``tries_all`` from all keys together.
    Beyond either, every password, right or wrong, is refused at once until the window has room:
    the refusal says nothing about the guess, and no thread waits.

    The trade-off of the global budget: students on ``tries_all / tries`` computers can keep the
    teacher's sign-in closed, a minute at a time. The teacher can always start the server with
    --auth logins instead, or manage runs from the server's console."""

    def __init__(self, per: str = "computer", tries: int = SIGN_IN_TRIES, tries_all: int = SIGN_IN_TRIES_ALL,
                 window: float = SIGN_IN_WINDOW_S, clock: Callable[[], float] = time.monotonic):
        self.per = per   # what a key is, in messages: "computer" or "login"
        self.each = SignInThrottle(tries, window, clock)
        self.all = SignInThrottle(tries_all, window, clock)
        self._lock = threading.Lock()   # check, compare and count as one step (no burst slips through)

    def attempt(self, key: str, given, expected: str | None) -> bool:
        """Whether ``given`` is ``expected`` (None: no such login, always wrong); a wrong one counts
        against ``key`` and everyone. TooManyTries, before any comparison, when over a budget."""
        key = str(key)[:200]
        with self._lock:
            self._refuse_if_throttled(key)
            # an unknown login is compared too (with a stand-in), so it answers as fast as a known one
            if password_matches(given, "-" * 16 if expected is None else expected) and expected is not None:
                return True
            self.each.failed(key)
            self.all.failed(EVERYONE)
            return False

    def _refuse_if_throttled(self, key: str) -> None:
        everyone, own = self.all.wait_s(EVERYONE), self.each.wait_s(key)
        if max(everyone, own) <= 0:
            return
        wait = math.ceil(max(everyone, own))
        window = "a minute" if self.each.window == 60 else f"per {self.each.window:g} s"
        if everyone >= own:
            way_out = ("The teacher can always start the server with --auth logins, or manage runs from the "
                       "server's console." if self.per == "computer" else
                       "The teacher can always manage runs from the server's console.")
            raise TooManyTries(
                f"Too many wrong passwords from everyone together (at most {self.all.tries} {window}): "
                f"signing in is closed for everyone for {wait} s more; try again then. {way_out}", wait)
        if self.per == "login":
            raise TooManyTries(
                f"Too many wrong passwords for the login {key[:60]!r}: it is locked for {wait} s more; try "
                f"again then (each login may get its password wrong {self.each.tries} times {window}).", wait)
        raise TooManyTries(
            f"Too many wrong passwords from this computer: try again in {wait} s (each computer may get "
            f"the teacher password wrong {self.each.tries} times {window}).", wait)


class LoginCheck:
    """Gradio's ``auth`` callable for --auth logins, ``(username, password) -> bool``: a constant-time
    comparison, throttled per login name and for everyone together (Gradio's login route gives no
    address). A student can therefore lock one login, the teacher's too, for a minute with
    wrong passwords; the teacher can still manage runs from the server's console."""

    def __init__(self, logins, guard: SignInGuard | None = None):
        self.logins = {str(name): str(password) for name, password in logins}
        self.guard = guard or SignInGuard(per="login")

    def __call__(self, username, password) -> bool:
        name = username if isinstance(username, str) else ""
        return self.guard.attempt(name, password, self.logins.get(name))
