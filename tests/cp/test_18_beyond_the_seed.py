"""Beyond the seed, through a real Envoy configured over ECDS: a token reads
itself (`apitokens:self`: the filter's built-in rules let every role through
in its own namespace only, the control plane answers with the token's own
fields), and a leaked secret reported to `credentials:revoke` (no token) is
refused on the next request."""

from __future__ import annotations

import pytest

from testkit.clients import request
from testkit.controlplane import APP, ControlPlane, create, shipped_envoy, tokens_path, version_of
from testkit.harness import poll


def test_every_role_reads_itself_through_the_gateway(envoy, cp, owner):
    secrets = {}
    for role in ("viewer", "editor"):
        r = create(envoy.port, owner, f"self-{role}", role, expireTime="2031-01-01T00:00:00Z")
        assert r.status == 200, r
        cp.wait_applied(version_of(r))
        secrets[role] = r.json()["apiToken"]["secret"]
    secrets["owner"] = owner
    names = {"viewer": "self-viewer", "editor": "self-editor", "owner": "admin"}
    for role, secret in secrets.items():
        r = envoy.get(tokens_path() + ":self", secret)
        assert r.status == 200, (role, r)
        token = r.json()["apiToken"]
        assert token["name"] == f"namespaces/default/apitokens/{names[role]}"
        assert token["role"] == role
        assert set(token) <= {"name", "role", "createTime", "expireTime", "lastUseTime"}, token
        assert secret not in r.body.decode()
    assert envoy.get(tokens_path() + ":self", secrets["viewer"]).json()["apiToken"]["expireTime"] == \
        "2031-01-01T00:00:00Z"
    # Its own namespace only (refused by the filter: the control plane
    # never sees it), and nothing else of the token API for a viewer.
    r = envoy.get(tokens_path("other") + ":self", secrets["viewer"])
    assert r.status == 403 and 'error="insufficient_scope"' in r.headers["www-authenticate"], r
    for path in (tokens_path(), tokens_path(token="self-viewer"), tokens_path() + ":events",
                 tokens_path() + ":selfish"):
        assert envoy.get(path, secrets["viewer"]).status == 403, path
    assert envoy.get(tokens_path() + ":self").status == 401


# ---------------------------------------------------------------------------
# Leak reports: POST /apitokens/v1/credentials:revoke, no token needed.

REVOKE = "/apitokens/v1/credentials:revoke"


def checksum_broken(secret: str) -> str:
    return secret[:-1] + ("B" if secret[-1] == "A" else "A")


def report(port: int, credentials, source: str | None = None, headers=None):
    return request(port, "POST", REVOKE, body={"credentials": credentials}, headers=headers, source=source)


def test_a_leaked_secret_reported_at_the_gateway_is_refused_on_the_next_request(envoy, cp, owner):
    r = create(envoy.port, owner, "leak-victim", "editor")
    assert r.status == 200, r
    cp.wait_applied(version_of(r))
    leaked = r.json()["apiToken"]["secret"]
    assert envoy.get(APP, leaked).status == 200
    before = cp.metrics()
    r = report(envoy.port, ["apt_not-a-secret", leaked])
    assert r.status == 202 and r.json() == {}, r
    # Read-your-writes: the first request after the answer is refused.
    r = envoy.get(APP, leaked)
    assert r.status == 401 and 'error="invalid_token"' in r.headers["www-authenticate"], r
    assert envoy.get(tokens_path(token="leak-victim"), owner).status == 404
    # The namespace's owners see why, and from where (the gateway's peer:
    # this control plane trusts no proxy's X-Forwarded-For).
    events = envoy.get(tokens_path() + ":events?pageSize=5", owner).json()["events"]
    revoked = [e for e in events if e["event"] == "apitoken.revoke"]
    assert revoked and revoked[0]["token"] == "namespaces/default/apitokens/leak-victim", events
    assert revoked[0]["actor"] == "reported leaked" and revoked[0]["clientAddress"] == "127.0.0.1"
    after = cp.metrics()
    assert after["apitokens_leaked_tokens_revoked_total"] == before.get("apitokens_leaked_tokens_revoked_total", 0) + 1
    assert leaked not in cp.log_text()


def test_unknown_malformed_and_checksum_broken_reports_change_nothing(envoy, cp, owner):
    r = create(envoy.port, owner, "leak-bystander", "viewer")
    cp.wait_applied(version_of(r))
    secret = r.json()["apiToken"]["secret"]
    version = cp.metrics()["apitokens_published_revision"]
    answers = [report(port, [checksum_broken(secret), secret[:30], "apt_" + "0" * 38, "", "x" * 300])
               for port in (envoy.port, cp.api_port)]
    assert [(a.status, a.json()) for a in answers] == [(202, {}), (202, {})], answers
    assert cp.metrics()["apitokens_published_revision"] == version
    assert envoy.get(APP, secret).status == 200
    # Malformed input: a JSON error naming the field, never the value.
    for body, field in (({"credentials": secret}, "credentials"), ({"credentials": [secret, 1]}, "credentials[1]"),
                        ({}, "credentials"), ({"credentials": ["x"] * 1001}, "credentials")):
        r = request(envoy.port, "POST", REVOKE, body=body)
        assert r.status == 400 and r.json()["field"] == field, (body, r)
        assert secret not in r.body.decode()
    # Only this spelling skips the filter: any other is the token API's
    # route, where a report without a token is refused by the filter.
    for path in ("/APITOKENS/v1/credentials:revoke", "/apitokens/v1/credentials:REVOKE"):
        assert request(envoy.port, "POST", path, body={"credentials": [secret]}).status == 401, path
    assert envoy.get(APP, secret).status == 200


@pytest.fixture(scope="module")
def trusting(workdir, upstream):
    """A control plane of its own that believes its Envoy's X-Forwarded-For,
    with a small report rate, and that Envoy."""
    plane = ControlPlane(workdir / "cp-leaks", name="cp-leaks")
    plane.owner = plane.bootstrap("default", "admin")  # type: ignore[attr-defined]
    plane.start("--trusted-proxy", "127.0.0.1/32", "--leak-report-burst", "2",
                "--leak-reports-per-second", "0.01")
    proxy = shipped_envoy(workdir / "envoy-leaks", plane, upstream.server_address[1], node="leaks-envoy").start()
    poll(lambda: plane.envoy_status("leaks-envoy").get("ackedVersion"), 15, "first ACK")
    yield plane, proxy
    proxy.stop()
    plane.stop()


def test_reports_are_rate_limited_per_client_behind_the_gateway(trusting):
    plane, proxy = trusting
    for _ in range(2):
        assert report(proxy.port, ["nothing"], source="127.0.0.2").status == 202
    # The client's address is what Envoy saw: a forged X-Forwarded-For
    # changes nothing.
    r = report(proxy.port, ["nothing"], source="127.0.0.2", headers={"X-Forwarded-For": "198.51.100.9"})
    assert r.status == 429 and int(r.headers["retry-after"]) >= 1, r
    # Another client has its own allowance.
    assert report(proxy.port, ["nothing"], source="127.0.0.3").status == 202
    r = create(proxy.port, plane.owner, "leak-rate", "viewer")
    plane.wait_applied(version_of(r))
    secret = r.json()["apiToken"]["secret"]
    assert report(proxy.port, [secret], source="127.0.0.4").status == 202
    assert proxy.get(APP, secret).status == 401
    events = proxy.get(tokens_path() + ":events?pageSize=1", plane.owner).json()["events"]
    assert events[0]["event"] == "apitoken.revoke" and events[0]["clientAddress"] == "127.0.0.4", events
