"""Beyond the seed, on a real Envoy: rotation with an overlap (the old secret
works until the overlap ends, to the second; a second regeneration or a
delete ends it at once; its requests are counted apart), the last use of a
token (reported by the filter on its timer, over the xDS side), the audit
trail (the API and one JSON log line per event), and expired tokens counted
as expired rather than unknown."""

from __future__ import annotations

import json
import math
import time
from datetime import datetime

import pytest

from testkit import checks
from testkit.clients import Client
from testkit.controlplane import APP, ControlPlane, create, reporting_every_second, shipped_envoy, tokens_path
from testkit.harness import poll, remember_secret, rfc3339


@pytest.fixture(scope="module")
def plane(workdir, upstream):
    """A control plane whose filters report usage every second, and its Envoy."""
    base = reporting_every_second(workdir / "plugin-usage.json")
    cp = ControlPlane(workdir / "cp-usage", name="cp-usage", plugin_config=base)
    cp.owner = cp.bootstrap("default", "admin")  # type: ignore[attr-defined]
    cp.start("--usage-flush-seconds", "1")
    envoy = shipped_envoy(workdir / "envoy-usage", cp, upstream.server_address[1], node="usage-envoy").start()
    poll(lambda: cp.envoy_status("usage-envoy").get("ackedVersion"), 15, "first ACK")
    cp.envoy = envoy  # type: ignore[attr-defined]
    yield cp
    envoy.stop()
    cp.stop()


def epoch(rfc3339_text: str) -> float:
    return datetime.fromisoformat(rfc3339_text.replace("Z", "+00:00")).timestamp()


def counter(envoy, name: str) -> int:
    return checks.counters(envoy).get(name, 0)


def regenerate(cp, token_id: str, owner: str, body=None):
    r = cp.api("POST", tokens_path(token=f"{token_id}:regenerate"), owner, body if body is not None else {})
    assert r.status == 200, r
    return r


def test_the_previous_secret_works_until_the_overlap_ends_to_the_second(plane):
    envoy, owner = plane.envoy, plane.owner
    old = remember_secret(create(plane.api_port, owner, "rotating", "editor").json()["apiToken"]["secret"])
    # An overlap that ends on a whole second a little ahead.
    ttl = 3
    r = regenerate(plane, "rotating", owner, {"previousSecretTtl": f"{ttl}s"})
    new = remember_secret(r.json()["apiToken"]["secret"])
    until = r.json()["apiToken"]["previousSecretExpireTime"]
    assert r.headers["x-apitokens-applied"] == "true"
    before = counter(envoy, "allowed_previous_secret")
    assert envoy.get(APP, old).status == 200
    assert envoy.get(APP, new).status == 200
    poll(lambda: counter(envoy, "allowed_previous_secret") > before, 5, "the previous secret's counter")
    # No push is needed for the end: the filter refuses it from `until` on.
    end = epoch(until)
    late, early = [], []
    while time.time() < end + 1.0:
        sent = time.time()
        status = envoy.get(APP, old).status
        (early if sent < end - 0.05 else late if sent > end + 0.05 else []).append(status)
    assert early and set(early) == {200}, early
    assert late and set(late) == {401}, late
    assert envoy.get(APP, new).status == 200


def test_a_second_regeneration_or_a_delete_ends_the_overlap_at_once(plane):
    envoy, owner = plane.envoy, plane.owner
    first = remember_secret(create(plane.api_port, owner, "twice", "viewer").json()["apiToken"]["secret"])
    second = remember_secret(regenerate(plane, "twice", owner, {"previousSecretTtl": "600s"}).json()["apiToken"]["secret"])
    assert envoy.get(APP, first).status == 200
    third = remember_secret(regenerate(plane, "twice", owner).json()["apiToken"]["secret"])
    # The answer came once Envoy applied it: the first request already sees it.
    assert envoy.get(APP, first).status == 401
    assert envoy.get(APP, second).status == 401
    assert envoy.get(APP, third).status == 200
    fourth = remember_secret(regenerate(plane, "twice", owner, {"previousSecretTtl": "600s"}).json()["apiToken"]["secret"])
    assert envoy.get(APP, third).status == 200 and envoy.get(APP, fourth).status == 200
    r = plane.api("DELETE", tokens_path(token="twice"), owner)
    assert r.status == 200
    assert envoy.get(APP, third).status == 401
    assert envoy.get(APP, fourth).status == 401


def test_the_last_use_is_reported_by_the_filter(plane):
    envoy, owner = plane.envoy, plane.owner
    secret = remember_secret(create(plane.api_port, owner, "used", "viewer").json()["apiToken"]["secret"])
    remember_secret(create(plane.api_port, owner, "idle", "viewer").json()["apiToken"]["secret"])
    assert "lastUseTime" not in plane.api("GET", tokens_path(token="used"), owner).json()["apiToken"]
    t0 = time.time()
    assert envoy.get(APP, secret).status == 200

    def last_use():
        return plane.api("GET", tokens_path(token="used"), owner).json()["apiToken"].get("lastUseTime")

    used = poll(last_use, 10, "lastUseTime of a used token")
    # Kept to the minute, by the control plane's clock.
    assert used.endswith(":00Z") and -60 < epoch(used) - t0 <= 1, used
    assert "lastUseTime" not in plane.api("GET", tokens_path(token="idle"), owner).json()["apiToken"]
    # A request refused for its role is still a use of the token.
    refused = remember_secret(create(plane.api_port, owner, "refused", "viewer").json()["apiToken"]["secret"])
    assert envoy.get(APP, refused, method="DELETE").status == 403
    poll(lambda: plane.api("GET", tokens_path(token="refused"), owner).json()["apiToken"].get("lastUseTime"), 10,
         "lastUseTime of a token whose request was refused")


def test_what_a_token_did_is_its_access_evidence_and_the_narrowest_role(plane):
    """Least privilege from evidence, end to end: the filter marks what each
    admitted request did, its usage reports carry it, and the API shows the
    kinds of access and the narrowest role that would have admitted them."""
    envoy, owner = plane.envoy, plane.owner
    secret = remember_secret(create(plane.api_port, owner, "broad", "owner").json()["apiToken"]["secret"])

    def access(token_id: str):
        return plane.api("GET", tokens_path(token=token_id), owner).json()["apiToken"].get("access")

    assert access("broad") is None, "no evidence before any use"
    assert envoy.get(APP, secret).status == 200
    assert envoy.get(APP + "/d1", secret).status == 200
    read = {"days": 30, "kinds": ["read"], "complete": True, "narrowestRole": "viewer"}
    poll(lambda: access("broad") == read, 10, "evidence of reads only")
    # A write over HTTP/2 with a body: an editor would be needed.
    h2 = Client(envoy, "h2")
    try:
        r = h2.request("POST", APP, authorization=f"Bearer {secret}", content=b'{"name": "d2"}',
                       headers={"content-type": "application/json"})
        assert r.status_code == 200, r
    finally:
        h2.close()
    poll(lambda: access("broad") == {"days": 30, "kinds": ["read", "write"], "complete": True, "narrowestRole": "editor"}, 10,
         "evidence of a write")
    # A call on the token API through the gateway: only an owner may.
    assert envoy.get(tokens_path(), secret).status == 200
    poll(lambda: access("broad") == {"days": 30, "kinds": ["read", "write", "tokens"], "complete": True,
                                         "narrowestRole": "owner"},
         10, "evidence of token management")
    # A refused request is a use of the token, and no evidence of a need.
    viewer = remember_secret(create(plane.api_port, owner, "overreach", "viewer").json()["apiToken"]["secret"])
    assert envoy.get(APP, viewer, method="DELETE").status == 403
    poll(lambda: plane.api("GET", tokens_path(token="overreach"), owner).json()["apiToken"].get("lastUseTime"), 10,
         "the refused request's use")
    assert access("overreach") is None
    assert envoy.get(APP, viewer).status == 200
    poll(lambda: access("overreach") == read, 10, "a viewer's read")


def test_requests_do_not_wait_for_a_control_plane_that_is_down(plane):
    envoy, owner = plane.envoy, plane.owner
    secret = remember_secret(create(plane.api_port, owner, "offline", "viewer").json()["apiToken"]["secret"])
    plane.stop()
    try:
        started = time.monotonic()
        statuses = [envoy.get(APP, secret).status for _ in range(50)]
        assert set(statuses) == {200}
        time.sleep(2.5)  # a few report rounds fail meanwhile
        statuses = [envoy.get(APP, secret).status for _ in range(50)]
        assert set(statuses) == {200}
        assert time.monotonic() - started < 10
    finally:
        plane.start("--usage-flush-seconds", "1")
    poll(lambda: plane.envoy_status("usage-envoy").get("ackedVersion"), 15, "reconnect")
    # The uses made while it was down arrive with the next reports.
    poll(lambda: plane.api("GET", tokens_path(token="offline"), owner).json()["apiToken"].get("lastUseTime"), 15,
         "the last use of a token used while the control plane was down")
    # Each VM kept the token once, however many report rounds failed: one
    # token used, one digest per report.
    reports = plane.status()["usageReports"]
    assert reports["taken"] >= 1 and reports["digests"] == reports["taken"], reports
    assert reports["refused"] == 0, reports
    # The same counts on /metrics (read after: reports may have come since).
    metrics = plane.metrics()
    assert metrics["apitokens_usage_reports_accepted_total"] >= reports["taken"]
    assert metrics["apitokens_usage_report_digests_total"] >= reports["digests"]
    assert metrics["apitokens_usage_reports_refused_total"] == 0



def usage_reports(envoy) -> int:
    """Calls the filters made to the control plane that completed (usage
    reports: Envoy counts a filter's gRPC calls as the cluster's internal
    requests; the ECDS stream stays open)."""
    return envoy.stats().get("cluster.xds_cluster.internal.upstream_rq_200", 0)


def test_a_last_use_stays_with_its_token_not_its_name(plane):
    """A use reported for a token that is then deleted, and created again
    under the same name, is not the new token's last use (the control plane
    writes uses in batches: here the batch is written after the re-creation,
    when it stops)."""
    envoy, owner = plane.envoy, plane.owner
    plane.stop()
    plane.start("--usage-flush-seconds", "3600")
    try:
        poll(lambda: plane.envoy_status("usage-envoy").get("ackedVersion"), 15, "reconnect")
        old = remember_secret(create(plane.api_port, owner, "recycled", "viewer").json()["apiToken"]["secret"])
        time.sleep(1.2)  # a report already on its way arrives first
        reports = usage_reports(envoy)
        assert envoy.get(APP, old).status == 200
        poll(lambda: usage_reports(envoy) > reports, 10, "the use reported to the control plane")
        assert plane.api("DELETE", tokens_path(token="recycled"), owner).status == 200
        assert create(plane.api_port, owner, "recycled", "viewer").status == 200
    finally:
        plane.stop()  # writes the pending uses
        plane.start("--usage-flush-seconds", "1")
    poll(lambda: plane.envoy_status("usage-envoy").get("ackedVersion"), 15, "reconnect")
    assert "lastUseTime" not in plane.api("GET", tokens_path(token="recycled"), owner).json()["apiToken"]

def test_the_audit_trail_and_its_log_lines(plane):
    owner = plane.owner
    r = create(plane.api_port, owner, "audited", "owner", expireTime=rfc3339(time.time() + 3600))
    remember_secret(r.json()["apiToken"]["secret"])
    assert r.json()["apiToken"]["createdBy"] == "namespaces/default/apitokens/admin"
    remember_secret(regenerate(plane, "audited", owner, {"previousSecretTtl": "60s"}).json()["apiToken"]["secret"])
    assert plane.api("DELETE", tokens_path(token="audited"), owner).status == 200
    # Through Envoy: it checks the owner, and tells the control plane the client's address.
    r = plane.envoy.get("/apitokens/v1/namespaces/default/apitokens:events?pageSize=3", owner)
    assert r.status == 200, r
    events = r.json()["events"]
    assert [e["event"] for e in events] == ["apitoken.delete", "apitoken.regenerate", "apitoken.create"]
    assert all(e["token"] == "namespaces/default/apitokens/audited" for e in events)
    assert all(e["actor"] == "namespaces/default/apitokens/admin" for e in events)
    assert events[0]["clientAddress"] == "127.0.0.1"
    assert "previousSecretExpireTime" in events[1] and events[2]["role"] == "owner"
    assert "nextPageToken" in r.json()
    # One JSON line per event on stderr, with the same fields.
    lines = [json.loads(line)["audit"] for line in plane.log_text().splitlines() if line.startswith('{"audit"')]
    mine = [e for e in lines if e.get("token") == "namespaces/default/apitokens/audited"]
    assert [e["event"] for e in mine] == ["apitoken.create", "apitoken.regenerate", "apitoken.delete"]
    bootstrap = [e for e in lines if e["event"] == "apitoken.create" and e["actor"] == "apitokens bootstrap"]
    assert not bootstrap, "bootstrap ran in another process: its line is in its own output"
    # The events are in the database with the changes.
    assert "apitokens bootstrap" in json.dumps(
        plane.api("GET", "/apitokens/v1/namespaces/default/apitokens:events?pageSize=1000", owner).json())


def test_an_expired_token_is_counted_as_expired_not_unknown(plane):
    envoy, owner = plane.envoy, plane.owner
    expire_at = math.ceil(time.time()) + 2
    r = create(plane.api_port, owner, "short-lived", "viewer", expireTime=rfc3339(expire_at))
    secret = remember_secret(r.json()["apiToken"]["secret"])
    assert envoy.get(APP, secret).status == 200
    while time.time() < expire_at + 0.2:
        time.sleep(0.05)
    before = checks.counters(envoy)
    assert envoy.get(APP, secret).status == 401
    poll(lambda: counter(envoy, "expired") > before.get("expired", 0), 5, "the expired counter")
    assert counter(envoy, "unknown") == before.get("unknown", 0)
