"""A token's conditions from the control plane's API to a real Envoy: an
owner creates a token bound to client addresses, or valid only from a time,
and the very first request after the create's answer is decided by them
(the change travels the delta channel, then the next snapshot); the API
shows them as written, and bad ones are a 400 naming the field."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest

from testkit.controlplane import APP, ControlPlane, create, ecds_envoy, tokens_path
from testkit.harness import poll, remember_secret
from testkit.timing import limit

NODE = "conditions-envoy"


@pytest.fixture(scope="module")
def plane(workdir, upstream):
    cp = ControlPlane(workdir / "cp-conditions", name="cp-conditions")
    cp.owner = cp.bootstrap("default", "admin")  # type: ignore[attr-defined]
    cp.start()
    envoy = ecds_envoy(workdir, cp, upstream, NODE)
    cp.envoy = envoy  # type: ignore[attr-defined]
    yield cp
    envoy.stop()
    cp.stop()


def issue(plane, token_id: str, **conditions) -> tuple[str, dict]:
    """A token created by the owner through Envoy, applied by every Envoy
    when the answer comes: its secret and the API's view of it."""
    r = plane.envoy.get(tokens_path(), plane.owner, method="POST",
                        body={"name": f"namespaces/default/apitokens/{token_id}", "role": "editor", **conditions})
    assert r.status == 200, r
    assert r.headers["x-apitokens-applied"] == "true", r.headers
    token = r.json()["apiToken"]
    remember_secret(token["secret"])
    return token["secret"], token


def details(plane, secret: str, tag: str) -> tuple[int, str]:
    r = plane.envoy.get(APP, secret, headers={"x-e2e-id": tag})
    return r.status, plane.envoy.access_log_entry(tag)["details"]


def test_client_addresses_from_create_to_the_first_request(plane):
    # The tests reach Envoy from 127.0.0.1.
    here, here_view = issue(plane, "here", clientAddresses={"allow": ["127.0.0.0/8", "::1"],
                                                            "except": ["127.0.0.9"]})
    elsewhere, _ = issue(plane, "elsewhere", clientAddresses={"allow": ["10.0.0.0/8"]})
    excepted, _ = issue(plane, "excepted", clientAddresses={"except": ["127.0.0.1"]})
    assert here_view["clientAddresses"] == {"allow": ["127.0.0.0/8", "::1/128"], "except": ["127.0.0.9/32"]}
    assert details(plane, here, "cond-here") == (200, "via_upstream")
    assert details(plane, elsewhere, "cond-elsewhere") == (403, "apitokens_address_denied")
    assert details(plane, excepted, "cond-excepted") == (403, "apitokens_address_denied")
    # The owner reads what the gateway enforces.
    r = plane.api("GET", tokens_path(token="elsewhere"), plane.owner)
    assert r.json()["apiToken"]["clientAddresses"] == {"allow": ["10.0.0.0/8"]}


def test_not_before_time_from_create_to_the_gateways_clock(plane):
    start = datetime.now(timezone.utc) + timedelta(seconds=limit(3))
    text = start.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    secret, view = issue(plane, "later", notBeforeTime=text)
    assert view["notBeforeTime"] == start.strftime("%Y-%m-%dT%H:%M:%S.%f").rstrip("0").rstrip(".") + "Z"
    if time.time() < start.timestamp():
        status, why = details(plane, secret, "cond-later-1")
        assert (status, why) == (401, "apitokens_not_yet_valid"), why
    poll(lambda: plane.envoy.get(APP, secret).status == 200, 10, "the not-before time to pass")
    assert time.time() >= start.timestamp(), "admitted before its notBeforeTime"


def test_bad_conditions_are_a_400_naming_the_field_and_change_nothing(plane):
    before = plane.api("GET", tokens_path(), plane.owner).json()["apiTokens"]
    for conditions, field in [
        ({"clientAddresses": {"allow": ["10.0.0.1/8"]}}, "clientAddresses.allow[0]"),
        ({"clientAddresses": {"allow": []}}, "clientAddresses.allow"),
        ({"notBeforeTime": "2031-01-01T00:00:00Z", "expireTime": "2030-01-01T00:00:00Z"}, "notBeforeTime"),
    ]:
        r = create(plane.api_port, plane.owner, "bad", "viewer", **conditions)
        assert r.status == 400, r
        assert r.json()["field"] == field, r.json()
    assert plane.api("GET", tokens_path(), plane.owner).json()["apiTokens"] == before


def test_conditions_changed_by_a_patch_decide_the_very_next_request(plane):
    """PATCH .../apitokens/{token}: a merge patch of the conditions, through
    Envoy; its answer comes once every Envoy applied it."""
    secret, _ = issue(plane, "roamer", clientAddresses={"allow": ["10.0.0.0/8"]})
    assert details(plane, secret, "upd-elsewhere") == (403, "apitokens_address_denied")

    def patch(body: dict) -> dict:
        r = plane.envoy.get(tokens_path(token="roamer"), plane.owner, method="PATCH", body=body)
        assert r.status == 200, r
        assert r.headers["x-apitokens-applied"] == "true", r.headers
        return r.json()["apiToken"]

    # The ranges lifted, a rate limit of one at once: the next request
    # passes, the one after is over the limit.
    view = patch({"clientAddresses": None, "rateLimit": {"requests": 2, "per": "minute", "burst": 1}})
    assert "clientAddresses" not in view and view["rateLimit"]["burst"] == 1, view
    assert details(plane, secret, "upd-first") == (200, "via_upstream")
    assert details(plane, secret, "upd-over") == (429, "apitokens_rate_limited")
    # The limit removed: passes again at once.
    assert "rateLimit" not in patch({"rateLimit": None})
    assert details(plane, secret, "upd-free") == (200, "via_upstream")
    # Audited with the conditions each change set.
    events = plane.api("GET", tokens_path() + ":events", plane.owner).json()["events"]
    updates = [e for e in events if e["event"] == "apitoken.update" and e["token"].endswith("/roamer")]
    assert [e["conditions"] for e in updates] == [
        {}, {"rateLimit": {"requests": 2, "per": "minute", "burst": 1}}], updates
