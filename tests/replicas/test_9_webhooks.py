"""Webhooks with replicas: two control planes on one PostgreSQL deliver to
one receiver; one of them at a time holds the endpoint's lease. The holder is
killed with -9 while events wait (the receiver down); the other takes the
endpoint over once the lease runs out and delivers everything, in order,
from the cursor in the store: nothing lost across the failover."""

from __future__ import annotations

import signal

import pytest

from testkit.controlplane import ControlPlane, create, free_port
from testkit.harness import poll
from testkit.webhooks import Receiver, key_file

LEASE_MS = 1500


@pytest.fixture(scope="module")
def pair(workdir, pg):
    key = key_file(workdir / "webhook.key")
    receiver = Receiver(free_port(), key).start()
    url = pg.create_database("hooks")
    args = ("--webhook", f"audit={receiver.url}", "--webhook-key-file", str(workdir / "webhook.key"),
            "--webhook-lease-ms", str(LEASE_MS), "--webhook-timeout-ms", "500", "--webhook-max-backoff-ms", "300",
            "--replica-timeout-ms", "2000", "--namespace-writes-per-second", "0")
    planes = [ControlPlane(workdir / f"hooks-{n}", name=f"hooks-{n}", store=url,
                           always=("--replica-name", f"hooks-{n}", *args)) for n in ("a", "b")]
    planes[0].owner = planes[0].bootstrap("default", "admin")  # type: ignore[attr-defined]
    # The first one started takes the lease, and keeps it while it lives.
    planes[0].start()
    poll(lambda: create(planes[0].api_port, planes[0].owner, "first", "viewer").status == 200, 10, "a write")
    poll(lambda: any(e["subject"].endswith("/first") for e in receiver.unique()), 10, "the first delivery")
    planes[1].start()
    yield planes, receiver
    for p in planes:
        p.stop()
    receiver.stop()


def test_the_lease_holders_kill_9_loses_no_event(pair):
    (a, b), receiver = pair
    owner = a.owner
    receiver.stop()
    names = [f"failover-{i}" for i in range(6)]
    # Half through the holder, half through the other replica.
    for i, name in enumerate(names):
        plane = a if i % 2 == 0 else b
        assert create(plane.api_port, owner, name, "viewer").status == 200, name
    a.stop(sig=signal.SIGKILL)
    receiver.start()
    want = [f"namespaces/default/apitokens/{n}" for n in names]
    poll(lambda: [e["subject"] for e in receiver.unique() if e["subject"] in want] == want, 20,
         "every event, in order, from the replica left")
    events = [e for e in receiver.events() if e["subject"] in want]
    ids = [e["id"] for e in events]
    assert max(ids.count(i) for i in set(ids)) <= 2, ids
    # b delivers from now on.
    assert create(b.api_port, owner, "after", "viewer").status == 200
    poll(lambda: any(e["subject"].endswith("/after") for e in receiver.unique()), 10, "a delivery by b")
