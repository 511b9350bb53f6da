"""One owner cannot slow every namespace: a namespace's writes beyond its
rate answer 429 with Retry-After, before anything is stored, while other
namespaces write on; and the audit trail does not grow without bound: events
older than the retention are deleted (tokens stay). On the real control plane
and its SQLite store."""

from __future__ import annotations

import time

import pytest

from testkit.controlplane import ControlPlane, create, tokens_path
from testkit.harness import poll

RATE, BURST, RETENTION = 2, 5, 3


@pytest.fixture(scope="module")
def plane(workdir):
    cp = ControlPlane(workdir / "cp-rate", name="cp-rate")
    cp.owner = cp.bootstrap("default", "admin")  # type: ignore[attr-defined]
    cp.other = cp.bootstrap("other", "admin")  # type: ignore[attr-defined]
    cp.start("--namespace-writes-per-second", str(RATE), "--namespace-write-burst", str(BURST),
             "--audit-retention", f"{RETENTION}s")
    yield cp
    cp.stop()


def test_a_write_burst_is_throttled_per_namespace(plane):
    answers = [create(plane.api_port, plane.owner, f"burst-{i}", "viewer")
               for i in range(BURST + 3)]
    statuses = [r.status for r in answers]
    assert statuses[:BURST] == [200] * BURST, statuses
    refused = [(i, r) for i, r in enumerate(answers) if r.status == 429]
    assert refused, statuses
    for i, r in refused:
        assert int(r.headers["retry-after"]) >= 1, r
        assert "writes faster" in r.json()["message"], r
        # Refused before anything was stored.
        assert plane.api("GET", tokens_path(token=f"burst-{i}"), plane.owner).status == 404
    # Deletes count as writes too; reads do not.
    assert plane.api("DELETE", tokens_path(token="burst-0"), plane.owner).status == 429
    # /metrics tells these refusals from the quota's.
    metrics = plane.metrics()
    assert metrics['apitokens_writes_total{operation="create",outcome="rate_limited"}'] == len(refused), metrics
    assert metrics['apitokens_writes_total{operation="delete",outcome="rate_limited"}'] == 1
    assert metrics['apitokens_writes_total{operation="create",outcome="ok"}'] == BURST
    assert 'apitokens_writes_total{operation="create",outcome="quota_exceeded"}' not in metrics
    assert plane.api("GET", tokens_path(), plane.owner).status == 200
    # Another namespace writes on.
    assert create(plane.api_port, plane.other, "unaffected", "viewer", ns="other").status == 200
    # Waiting as told is enough.
    time.sleep(int(refused[-1][1].headers["retry-after"]))
    assert create(plane.api_port, plane.owner, "after-waiting", "viewer").status == 200


def test_audit_events_older_than_the_retention_are_deleted(plane):
    def events(ns="other", secret=None):
        r = plane.api("GET", tokens_path(ns) + ":events?pageSize=100", secret or plane.other)
        assert r.status == 200, r
        return r.json()["events"]

    assert create(plane.api_port, plane.other, "audited", "viewer", ns="other").status == 200
    assert any(e.get("token") == "namespaces/other/apitokens/audited" for e in events())
    poll(lambda: not events(), RETENTION + 10, "old audit events deleted")
    # The tokens stay; new events are recorded as before.
    assert plane.api("GET", tokens_path("other", "audited"), plane.other).status == 200
    assert create(plane.api_port, plane.other, "audited-2", "viewer", ns="other").status == 200
    assert [e["token"] for e in events()] == ["namespaces/other/apitokens/audited-2"]
