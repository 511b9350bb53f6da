"""No token outlives or outranks what made it, on the real control plane and
its SQLite store: a token created by an expiring token expires with it at the
latest; an expiring token cannot regenerate (take over) a longer-lived one; a
previous secret (a rotation's overlap) reads and never writes, so whoever
holds a leaked secret cannot out-rotate the owner who rotated it; a
namespace's maximum lifetime bounds new tokens; the audit trail records which
credential acted and a client address no client can choose."""

from __future__ import annotations

import time
from datetime import datetime

import pytest

from testkit.controlplane import ControlPlane, create, tokens_path
from testkit.harness import remember_secret, rfc3339


@pytest.fixture(scope="module")
def plane(workdir):
    cp = ControlPlane(workdir / "cp-bounds", name="cp-bounds")
    cp.owner = cp.bootstrap("default", "admin")  # type: ignore[attr-defined]
    cp.team = cp.bootstrap("team", "lead")  # type: ignore[attr-defined]
    cp.start("--max-token-lifetime", "team=1h")
    yield cp
    cp.stop()


def epoch(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def secret_of(r) -> str:
    assert r.status == 200, r
    return remember_secret(r.json()["apiToken"]["secret"])


def regenerate(cp, token_id: str, caller: str, body=None, ns: str = "default"):
    return cp.api("POST", tokens_path(ns, f"{token_id}:regenerate"), caller, body if body is not None else {})


def test_a_token_never_outlives_the_token_that_created_it(plane):
    expires = rfc3339(time.time() + 300)
    contractor = secret_of(create(plane.api_port, plane.owner, "contractor", "owner", expireTime=expires))
    # Asked for no expiry: it gets the creator's, and the answer says so.
    r = create(plane.api_port, contractor, "made-by-contractor", "owner")
    assert r.status == 200, r
    assert epoch(r.json()["apiToken"]["expireTime"]) == epoch(expires)
    # Asked for more: refused, naming the field and the bound.
    r = create(plane.api_port, contractor, "longer", "owner", expireTime=rfc3339(time.time() + 3600))
    assert r.status == 400, r
    assert r.json()["field"] == "expireTime"
    assert "calling token expires" in r.json()["message"]
    # Asked for less: granted as asked.
    sooner = rfc3339(time.time() + 120)
    r = create(plane.api_port, contractor, "shorter", "viewer", expireTime=sooner)
    assert r.status == 200, r
    assert epoch(r.json()["apiToken"]["expireTime"]) == epoch(sooner)
    # A token without expiry (the bootstrap owner) bounds nothing.
    r = create(plane.api_port, plane.owner, "long-lived", "viewer")
    assert r.status == 200 and "expireTime" not in r.json()["apiToken"], r


def test_an_expiring_token_cannot_take_over_a_longer_lived_one(plane):
    short = secret_of(create(plane.api_port, plane.owner, "short-owner", "owner",
                             expireTime=rfc3339(time.time() + 300)))
    r = regenerate(plane, "admin", short)
    assert r.status == 403, r
    assert "expire" in r.json()["message"] and "secret" not in r.json()
    # The long-lived owner's secret still works.
    assert plane.api("GET", tokens_path(), plane.owner).status == 200
    # It may regenerate what does not outlive it, itself included.
    r = regenerate(plane, "short-owner", short)
    assert r.status == 200, r
    remember_secret(r.json()["apiToken"]["secret"])


def test_a_previous_secret_reads_and_never_writes(plane):
    leaked = secret_of(create(plane.api_port, plane.owner, "rotor", "owner"))
    # The owner rotates the leaked secret, keeping an overlap (which the
    # docs/api.md says never to do for a leak: this is why).
    current = secret_of(regenerate(plane, "rotor", leaked, {"previousSecretTtl": "3600s"}))
    # Whoever holds the leaked (now previous) secret can read ...
    assert plane.api("GET", tokens_path(), leaked).status == 200
    assert plane.api("GET", tokens_path(token="rotor"), leaked).status == 200
    assert plane.api("GET", tokens_path() + ":events", leaked).status == 200
    # ... and not rotate the owner out, create or delete.
    for r in (
        regenerate(plane, "rotor", leaked, {"previousSecretTtl": "604800s"}),
        create(plane.api_port, leaked, "backdoor", "owner"),
        plane.api("DELETE", tokens_path(token="admin"), leaked),
    ):
        assert r.status == 403, r
        assert "previous secret" in r.json()["message"], r
        assert "apiToken" not in r.json()
    assert plane.api("GET", tokens_path(token="backdoor"), current).status == 404
    assert plane.api("GET", tokens_path(token="admin"), current).status == 200
    # The current secret manages tokens, and ends the overlap by regenerating again.
    secret_of(regenerate(plane, "rotor", current))
    assert plane.api("GET", tokens_path(), leaked).status == 401
    # The audit trail says which credential acted: the rotation, by the current one.
    events = plane.api("GET", tokens_path() + ":events?pageSize=5", plane.owner).json()["events"]
    rotor = [e for e in events if e.get("token") == "namespaces/default/apitokens/rotor"]
    assert [e["event"] for e in rotor] == ["apitoken.regenerate", "apitoken.regenerate", "apitoken.create"]
    assert all(e["credential"] == "current" for e in rotor), rotor
    assert rotor[2]["actor"] == "namespaces/default/apitokens/admin"


def test_a_namespace_bounds_the_lifetime_of_new_tokens(plane):
    before = time.time()
    r = create(plane.api_port, plane.team, "ci", "editor", ns="team")
    assert r.status == 200, r
    expire = epoch(r.json()["apiToken"]["expireTime"])
    assert before + 3600 - 1 <= expire <= time.time() + 3600
    r = create(plane.api_port, plane.team, "ci-long", "editor", ns="team", expireTime=rfc3339(time.time() + 7200))
    assert r.status == 400, r
    assert r.json()["field"] == "expireTime" and "at most 3600s" in r.json()["message"]
    # Other namespaces keep their own (none here).
    r = create(plane.api_port, plane.owner, "no-limit", "editor")
    assert r.status == 200 and "expireTime" not in r.json()["apiToken"], r


def test_a_spoofed_forwarded_address_is_not_recorded(plane):
    # A client calling the API port directly sends its own X-Forwarded-For:
    # no trusted proxy (--trusted-proxy) appended it, so it is not believed.
    r = plane.api("POST", tokens_path(), plane.owner,
                  {"name": "namespaces/default/apitokens/spoofer", "role": "viewer"},
                  headers={"x-forwarded-for": "203.0.113.9"})
    secret_of(r)
    events = plane.api("GET", tokens_path() + ":events?pageSize=1", plane.owner).json()["events"]
    assert events[0]["token"] == "namespaces/default/apitokens/spoofer"
    assert events[0]["clientAddress"] == "127.0.0.1"
    assert events[0]["peerAddress"] == "127.0.0.1"
    assert "203.0.113.9" not in plane.log_text()
