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
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Callable

from core.errors import ConfigError

TOKEN_ID_BYTES = 16
SIGN_IN_WINDOW_S = 60.0     # at most SIGN_IN_TRIES failed teacher sign-ins per session in this window
SIGN_IN_TRIES = 5


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
    """At most ``tries`` failed sign-ins per key (a Gradio session) in ``window`` seconds."""

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
            self._failures.pop(key, None)   # the table does not grow with every session ever seen
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
            self._recent(key)
            self._failures.setdefault(key, []).append(self.clock())
