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


def test_sign_in_throttle_allows_five_failures_a_minute_per_session():
    now = [1000.0]
    throttle = identity.SignInThrottle(clock=lambda: now[0])
    for _ in range(5):
        assert throttle.wait_s("s1") == 0
        throttle.failed("s1")
    assert throttle.wait_s("s1") == pytest.approx(60.0)
    assert throttle.wait_s("s2") == 0                  # another session is not held up
    now[0] += 30
    assert throttle.wait_s("s1") == pytest.approx(30.0)
    now[0] += 30.5                                     # the oldest failure has left the window
    assert throttle.wait_s("s1") == 0
    assert "s2" not in throttle._failures              # and nothing is kept for sessions with no failure
