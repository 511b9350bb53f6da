"""Suspending a token without deleting it, through a real Envoy on ECDS and
the delta channel: after a disable's answer the very first request with any
of the token's secrets is refused (401 `invalid_token`, response details
`apitokens_disabled`, the filter's `disabled` counter), a refused request is
no use of the token (its last use stays), an enable brings back the same
secrets, both are audited, and a repeat changes nothing."""

from __future__ import annotations

import json
import time

import pytest

from testkit import checks
from testkit.controlplane import APP, create, reporting_plane, stop_reporting_plane, tokens_path, version_of
from testkit.harness import poll, remember_secret

NODE = "disable-envoy"
INVALID_TOKEN = 'Bearer realm="apitokens", error="invalid_token"'


@pytest.fixture(scope="module")
def plane(workdir, upstream):
    """A control plane whose filters report usage every second, and its
    Envoy on the shipped configuration with a JSON access log."""
    cp = reporting_plane(workdir, upstream, "cp-disable", NODE)
    yield cp
    stop_reporting_plane(cp)


def act(plane, token_id: str, action: str, body=None):
    """`POST .../{token_id}:{action}` by the owner, through Envoy (the filter
    checks the owner, then the control plane does)."""
    r = plane.envoy.get(tokens_path(token=f"{token_id}:{action}"), plane.owner, method="POST",
                        body=body if body is not None else {})
    assert r.status == 200, r
    assert r.headers["x-apitokens-applied"] == "true", r.headers
    assert r.headers["x-apitokens-envoys"] == "1/1", r.headers
    assert "secret" not in r.json()["apiToken"]
    return r


def get(plane, token_id: str) -> dict:
    """The token as the owner reads it, straight from the control plane (a
    read through Envoy would be a use of the owner's token)."""
    r = plane.api("GET", tokens_path(token=token_id), plane.owner)
    assert r.status == 200, r
    return r.json()["apiToken"]


def refused_as_disabled(envoy, secret: str, tag: str, path: str = APP) -> None:
    """One request on a fresh connection: refused as a disabled token's."""
    r = envoy.get(path, secret, headers={"x-e2e-id": tag})
    assert r.status == 401, r
    assert r.headers["www-authenticate"] == INVALID_TOKEN, r.headers
    # The client reads what an unknown secret reads; the gateway tells them apart.
    assert r.json() == {"code": 401, "message": "The bearer token is invalid or expired."}
    assert envoy.access_log_entry(tag)["details"] == "apitokens_disabled"


def digests_reported(plane) -> int:
    return plane.status()["usageReports"]["digests"]


def quiet_reports(plane) -> int:
    """The digests reported so far, once no report has come for 2.5 s (every
    VM reports each second what it saw used)."""
    last = [digests_reported(plane), time.monotonic()]

    def settled():
        now = digests_reported(plane)
        if now != last[0]:
            last[:] = [now, time.monotonic()]
        return now if time.monotonic() - last[1] >= 2.5 else None

    return poll(settled, 20, "usage reports to settle", interval=0.25)


def test_a_disabled_token_is_refused_at_once_counted_apart_and_not_used(plane):
    envoy, owner = plane.envoy, plane.owner
    secret = remember_secret(create(plane.api_port, owner, "suspended", "editor").json()["apiToken"]["secret"])
    assert envoy.get(APP, secret).status == 200
    used = poll(lambda: get(plane, "suspended").get("lastUseTime"), 10, "the last use of the token")
    before = checks.counters(envoy)
    r = act(plane, "suspended", "disable")
    assert r.json()["apiToken"]["state"] == "disabled"
    # The very first request after the answer, then more on fresh
    # connections (Envoy has two workers, each with its own VM).
    for i in range(12):
        refused_as_disabled(envoy, secret, f"disabled-{i}")
    after = checks.counters(envoy)
    assert after["disabled"] - before.get("disabled", 0) == 12, (before, after)
    for other in ("unknown", "expired"):
        assert after.get(other, 0) == before.get(other, 0), (other, before, after)
    # Envoy's Prometheus view has it too, as every filter counter.
    prometheus = [line for line in envoy.prometheus().splitlines() if line.startswith("apitokens_disabled")]
    assert prometheus and float(prometheus[0].rsplit(" ", 1)[1]) == after["disabled"], prometheus
    # Listed, kept, disabled.
    token = get(plane, "suspended")
    assert (token["state"], token["role"], token["lastUseTime"]) == ("disabled", "editor", used)
    listed = plane.api("GET", tokens_path(), owner).json()["apiTokens"]
    states = {t["name"].rsplit("/", 1)[-1]: t["state"] for t in listed}
    assert states["suspended"] == "disabled" and states["admin"] == "enabled"
    # A refused request is no use of the token: with no other traffic, its
    # requests make no usage report at all.
    quiet = quiet_reports(plane)
    for i in range(10):
        assert envoy.get(APP, secret).status == 401
    time.sleep(3)  # three report rounds
    assert digests_reported(plane) == quiet
    assert get(plane, "suspended")["lastUseTime"] == used


def test_enable_brings_back_the_same_secret_at_once(plane):
    envoy, owner = plane.envoy, plane.owner
    secret = remember_secret(create(plane.api_port, owner, "paused", "viewer").json()["apiToken"]["secret"])
    created = get(plane, "paused")
    act(plane, "paused", "disable")
    refused_as_disabled(envoy, secret, "paused-off")
    before = checks.counters(envoy)
    r = act(plane, "paused", "enable")
    assert r.json()["apiToken"]["state"] == "enabled"
    # The very first request after the answer, with the secret it always had.
    first = envoy.get(APP, secret)
    assert first.status == 200, first
    assert first.json()["headers"]["x-apitoken-name"] == "namespaces/default/apitokens/paused"
    assert all(envoy.get(APP, secret).status == 200 for _ in range(10))
    after = checks.counters(envoy)
    assert after["allowed"] - before.get("allowed", 0) >= 11
    assert after.get("disabled", 0) == before.get("disabled", 0)
    # Nothing else changed: no new secret, the same name, role and times.
    token = get(plane, "paused")
    assert {k: v for k, v in token.items() if k not in ("lastUseTime", "access", "lastAddresses")} == created


def test_both_secrets_of_a_rotation_are_disabled_and_enabled_together(plane):
    envoy, owner = plane.envoy, plane.owner
    old = remember_secret(create(plane.api_port, owner, "rotated", "viewer").json()["apiToken"]["secret"])
    r = plane.api("POST", tokens_path(token="rotated:regenerate"), owner, {"previousSecretTtl": "600s"})
    assert r.status == 200, r
    new = remember_secret(r.json()["apiToken"]["secret"])
    act(plane, "rotated", "disable")
    refused_as_disabled(envoy, new, "rotated-new")
    refused_as_disabled(envoy, old, "rotated-old")
    # Regenerated while disabled: the new secret is disabled too.
    r = plane.api("POST", tokens_path(token="rotated:regenerate"), owner, {"previousSecretTtl": "600s"})
    assert r.status == 200 and r.json()["apiToken"]["state"] == "disabled", r
    newest = remember_secret(r.json()["apiToken"]["secret"])
    refused_as_disabled(envoy, newest, "rotated-newest")
    refused_as_disabled(envoy, new, "rotated-previous")
    act(plane, "rotated", "enable")
    assert envoy.get(APP, newest).status == 200
    assert envoy.get(APP, new).status == 200, "the previous secret, in its overlap"
    assert envoy.get(APP, old).status == 401


def test_a_disabled_owner_cannot_use_the_api_and_a_repeat_changes_nothing(plane):
    envoy, owner = plane.envoy, plane.owner
    deputy = remember_secret(create(plane.api_port, owner, "deputy", "owner").json()["apiToken"]["secret"])
    assert envoy.get(tokens_path(), deputy).status == 200
    r = act(plane, "deputy", "disable")
    version = version_of(r)
    # Refused at the gateway, and by the control plane when called directly.
    refused_as_disabled(envoy, deputy, "deputy-api", path=tokens_path())
    direct = plane.api("GET", tokens_path(), deputy)
    assert direct.status == 401 and direct.headers["www-authenticate"] == INVALID_TOKEN
    # Again: the same answer and version, no event.
    again = act(plane, "deputy", "disable")
    usage = ("lastUseTime", "access", "lastAddresses")
    assert version_of(again) == version
    # The same token, but for the usage written meanwhile (its use above).
    assert ({k: v for k, v in again.json()["apiToken"].items() if k not in usage}
            == {k: v for k, v in r.json()["apiToken"].items() if k not in usage})
    enabled = act(plane, "deputy", "enable")
    assert version_of(enabled) > version
    assert version_of(act(plane, "deputy", "enable")) == version_of(enabled)
    assert envoy.get(tokens_path(), deputy).status == 200
    events = plane.api("GET", tokens_path() + ":events?pageSize=1000", owner).json()["events"]
    mine = [e["event"] for e in events if e.get("token") == "namespaces/default/apitokens/deputy"]
    assert mine == ["apitoken.enable", "apitoken.disable", "apitoken.create"], mine
    disabled = next(e for e in events if e["event"] == "apitoken.disable" and e["token"].endswith("/deputy"))
    assert disabled["actor"] == "namespaces/default/apitokens/admin" and disabled["credential"] == "current"
    assert disabled["clientAddress"] == "127.0.0.1"
    # One JSON line per event on stderr, none for the repeats.
    lines = [json.loads(line)["audit"] for line in plane.log_text().splitlines() if line.startswith('{"audit"')]
    logged = [e["event"] for e in lines if e.get("token") == "namespaces/default/apitokens/deputy"]
    assert logged == ["apitoken.create", "apitoken.disable", "apitoken.enable"], logged
