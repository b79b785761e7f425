"""core.identity: server-signed browser tokens, the one permission rule, the teacher sign-in throttle."""
from __future__ import annotations

import pytest

from core import identity
from core.errors import ConfigError
from core.identity import Who

SECRET = "x" * 32


def test_a_signed_token_verifies_and_names_its_browser():
    token = identity.new_token(SECRET)
    ident, mac = token.split(".")
    assert len(ident) == 2 * identity.TOKEN_ID_BYTES and len(mac) == 64
    assert identity.verify(SECRET, token) == ident
    assert identity.sign(SECRET, ident) == token                  # deterministic: survives a restart
    assert identity.verify("another secret of the same length", token) is None


@pytest.mark.parametrize("forged", [
    "3f9a2c77e1d04b5c9a1b2c3d4e5f6a7b",              # a raw (legacy) browser id, as read from meta.json
    "3f9a2c77e1d04b5c9a1b2c3d4e5f6a7b." + "0" * 64,  # with a made-up signature
    "3f9a2c77e1d04b5c9a1b2c3d4e5f6a7b.",             # with none
    ".abc", "", None, 42, {"id": "x"}, "a.b.c",
])
def test_anything_but_a_server_signed_token_names_nobody(forged):
    assert identity.verify(SECRET, forged) is None
    assert identity.verify(None, identity.new_token(SECRET)) is None   # no secret: nothing verifies


def test_a_token_for_one_id_does_not_verify_for_another():
    token = identity.sign(SECRET, "aa11")
    other = "bb22." + token.split(".")[1]     # someone else's id with this (valid) signature
    assert identity.verify(SECRET, other) is None


def test_ensure_token_keeps_a_valid_token_and_replaces_anything_else():
    token = identity.new_token(SECRET)
    assert identity.ensure_token(SECRET, token) == token
    legacy = "3f9a2c77e1d04b5c9a1b2c3d4e5f6a7b"
    fresh = identity.ensure_token(SECRET, legacy)
    assert identity.verify(SECRET, fresh) and not fresh.startswith(legacy)   # a new id, not the old one signed
    assert identity.verify(SECRET, identity.ensure_token(SECRET, None))


def test_the_storage_key_given_to_the_page_is_not_the_signing_secret():
    key = identity.storage_key(SECRET)
    assert key != SECRET and SECRET not in key and len(key) == 32
    assert identity.storage_key(SECRET) == key     # stable across restarts: stored values stay readable


def test_session_owners_are_digests_of_the_session_hash():
    owner = identity.session_owner("abc123session")
    assert owner.startswith("session:") and "abc123session" not in owner
    assert owner == identity.session_owner("abc123session") != identity.session_owner("other")
    assert identity.session_owner(None) == "session:local"


def test_the_permission_rule():
    alice, bob, teacher = Who("browser:a"), Who("browser:b"), Who("session:t", teacher=True)
    # the owner and the teacher may change a run; nobody else; a command-line run (no owner) only the teacher
    assert identity.can_change("browser:a", alice) and identity.can_change("browser:a", teacher)
    assert not identity.can_change("browser:a", bob)
    assert not identity.can_change(None, alice) and identity.can_change(None, teacher)
    # by default everyone may view; with private runs only the owner and the teacher
    assert identity.can_view("browser:a", bob, private=False) and identity.can_view(None, bob, private=False)
    assert not identity.can_view("browser:a", bob, private=True) and not identity.can_view(None, bob, private=True)
    assert identity.can_view("browser:a", alice, private=True) and identity.can_view("browser:a", teacher, private=True)
    with pytest.raises(ConfigError, match=r"^This run belongs to someone else; only its owner or the teacher "
                                          r"can delete it\.$"):
        identity.require_change("browser:a", bob, "delete")
    identity.require_change("browser:a", alice, "delete")
    with pytest.raises(ConfigError, match="runs are private"):
        identity.require_view("browser:a", bob, private=True)


def test_password_comparison():
    assert identity.password_matches("s3cret", "s3cret")
    assert not identity.password_matches("s3cre", "s3cret") and not identity.password_matches(None, "s3cret")
    assert identity.password_matches("pässwort", "pässwort")


def test_the_sliding_window_allows_five_failures_a_minute_per_key():
    now = [1000.0]
    throttle = identity.SignInThrottle(clock=lambda: now[0])
    for _ in range(5):
        assert throttle.wait_s("s1") == 0
        throttle.failed("s1")
    assert throttle.wait_s("s1") == pytest.approx(60.0)
    assert throttle.wait_s("s2") == 0                  # another key is not held up
    now[0] += 30
    assert throttle.wait_s("s1") == pytest.approx(30.0)
    now[0] += 30.5                                     # the oldest failure has left the window
    assert throttle.wait_s("s1") == 0
    assert "s2" not in throttle._failures              # and nothing is kept for keys with no failure


class Clock:
    """A clock the test moves by hand (no sleeps)."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def _guess(guard, key, password="wrong", expected="s3cret-Password"):
    """True/False for a password checked, or the refusal (TooManyTries) when throttled."""
    try:
        return guard.attempt(key, password, expected)
    except identity.TooManyTries as err:
        return err


def test_the_guard_throttles_each_computer_and_refuses_even_the_right_password_at_once():
    clock = Clock()
    guard = identity.SignInGuard(per="computer", clock=clock)
    for _ in range(identity.SIGN_IN_TRIES):
        assert _guess(guard, "10.0.0.7") is False
    refused = _guess(guard, "10.0.0.7", password="s3cret-Password")   # right, but throttled: says nothing
    assert isinstance(refused, identity.TooManyTries) and refused.wait_s == 60
    assert str(refused) == ("Too many wrong passwords from this computer: try again in 60 s (each computer may "
                            "get the teacher password wrong 5 times a minute).")
    assert _guess(guard, "10.0.0.8", password="s3cret-Password") is True   # another computer is not held up
    clock.now += 45.2
    assert _guess(guard, "10.0.0.7").wait_s == 15                         # rounded up, never "0 s"
    clock.now += 15                                                       # the first failure left the window
    assert _guess(guard, "10.0.0.7", password="s3cret-Password") is True


def test_the_global_budget_holds_however_many_computers_guess():
    clock = Clock()
    guard = identity.SignInGuard(per="computer", clock=clock)
    assert identity.SIGN_IN_TRIES_ALL == 20 and identity.SIGN_IN_WINDOW_S == 60
    for i in range(identity.SIGN_IN_TRIES_ALL):        # 4 computers x 5 (each stays within its own limit)
        clock.now += 1
        assert _guess(guard, f"10.0.0.{i // identity.SIGN_IN_TRIES}") is False
    refused = _guess(guard, "10.0.0.99", password="s3cret-Password")   # a fresh computer, the right password
    assert isinstance(refused, identity.TooManyTries) and refused.wait_s == 41
    assert "from everyone together (at most 20 a minute)" in str(refused)
    assert "closed for everyone for 41 s more" in str(refused) and "--auth" in str(refused)
    clock.now += 41                                    # the oldest failure leaves: one guess has room again
    assert _guess(guard, "10.0.0.99") is False
    assert isinstance(_guess(guard, "10.0.0.98"), identity.TooManyTries)
    # nothing is kept for keys whose failures all left the window
    clock.now += 61
    assert _guess(guard, "10.0.0.50") is False
    assert set(guard.each._failures) == {"10.0.0.50"} and len(guard.all._failures[identity.EVERYONE]) == 1


def test_a_burst_cannot_slip_past_the_budget_between_check_and_count():
    import threading
    guard = identity.SignInGuard(per="computer", clock=Clock())
    results = []
    threads = [threading.Thread(target=lambda i=i: results.append(_guess(guard, f"h{i}"))) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(False) == identity.SIGN_IN_TRIES_ALL   # exactly 20 checked, 80 refused unchecked
    assert sum(isinstance(r, identity.TooManyTries) for r in results) == 80


def test_the_login_check_for_auth_throttles_per_login_name_and_for_everyone():
    clock = Clock()
    check = identity.LoginCheck([("ana", "pw-ana"), ("tea", "chalk-and-talk")],
                                identity.SignInGuard(per="login", clock=clock))
    assert check("ana", "pw-ana") and not check("ana", "pw-an") and not check("ana", None)
    assert not check("nobody", "pw-ana") and not check(None, "x")   # unknown or odd names are just wrong
    for _ in range(identity.SIGN_IN_TRIES):
        assert check("tea", "guess") is False
    with pytest.raises(identity.TooManyTries, match=r"^Too many wrong passwords for the login 'tea': it is locked "
                                                    r"for 60 s more; try again then \(each login may get its "
                                                    r"password wrong 5 times a minute\)\.$"):
        check("tea", "chalk-and-talk")
    assert check("ana", "pw-ana")                                   # other logins still work
    for i in range(identity.SIGN_IN_TRIES_ALL - 9):                 # 9 failures so far: fill the budget
        assert check(f"student{i}", "guess") is False
    with pytest.raises(identity.TooManyTries, match="from everyone together") as refused:
        check("ana", "pw-ana")
    assert "server's console" in str(refused.value) and "--auth" not in str(refused.value)   # already on
    clock.now += 60
    assert check("tea", "chalk-and-talk") and check("ana", "pw-ana")
