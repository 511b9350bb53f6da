"""kill -9 of one replica while the gateways serve a steady load and writes
go to the other two: no acknowledged write is lost, no gateway answers a
5xx, and the dead replica's Envoy moves to another replica within 2 s (its
xDS cluster lists every replica), where it gets every later write."""

from __future__ import annotations

import signal
import time

from testkit.controlplane import APP, create
from testkit.harness import poll
from testkit.load import summary
from testkit.writes import GatewayLoad, Writer

MOVE_WITHIN = 2.0


def test_kill_9_a_replica_under_load(replicas, envoys, owner, figures):
    r1, r2, r3 = replicas
    gw3 = envoys[2]
    assert gw3.home is r3
    load = GatewayLoad(envoys, [r1, r2], owner, "kill", seed=11)
    with Writer([r1, r2], owner, "kill") as writer:
        time.sleep(0.5)
        r3.stop(signal.SIGKILL)
        killed = time.monotonic()
        killed_at = time.time()

        def moved():
            for e in r1.status()["envoys"]:
                if e["node"] == gw3.node and e["connected"] and e["replica"] in ("r1", "r2") and e.get("ackedVersion"):
                    return e["replica"]
            return None

        new_home = poll(moved, 10, "gw-3 on another replica", interval=0.02)
        moved_after = time.monotonic() - killed
        time.sleep(2.5)  # writes go on through the replica timeout

        def back_on_delta():
            # Every one of gw-3's VMs on the delta channel again (`delta`
            # counts them all, settled), on its new replica.
            return any(e["node"] == gw3.node and e["connected"] and e.get("delta")
                       for e in r1.status()["envoys"] + r2.status()["envoys"])

        poll(back_on_delta, 10, "gw-3's VMs back on the delta channel", interval=0.02)
        failover_end = time.time()
    # gw-3's VMs reopen their delta streams on the new replica one after the
    # other: one that does so after a sibling applied a revocation made
    # since refuses, fail-closed, until it has too (503, `catching_up`):
    # during the failover, until every VM is back on the delta channel, never
    # after. (A fixed 2.5 s after the move was once 6 ms short.)
    samples = load.stop(catching_up=(killed_at, failover_end))

    assert moved_after < MOVE_WITHIN, f"gw-3 took {moved_after:.2f} s to move"
    statuses = {a.status for a in writer.answers}
    assert statuses == {200}, f"writes on the live replicas failed: {[a for a in writer.answers if a.status != 200][:5]}"
    assert writer.acknowledged() >= 10, "the writer hardly ran"
    writer.check(r1, envoys)
    # A write now: every Envoy has it at once, gw-3 on its new replica too.
    r = create(r2.api_port, owner, "kill-after", "editor")
    assert r.headers["x-apitokens-applied"] == "true" and r.headers["x-apitokens-envoys"] == "3/3", r.headers
    secret = r.json()["apiToken"]["secret"]
    assert all(e.get(APP, secret).status == 200 for e in envoys)
    slowest = max(a.answered - a.sent for a in writer.answers)
    figures["kill -9 of a replica"] = (
        f"gw-3 moved to {new_home} in {moved_after:.2f} s; {writer.acknowledged()} writes acknowledged "
        f"(slowest answer {slowest:.2f} s, waiting out the dead replica's Envoy), none lost; "
        f"{len(samples)} gateway requests {summary(samples)}, no 5xx "
        f"but {len(load.catching_up)} refused (503) while gw-3's workers caught up")

    r3.start()
    poll(lambda: sum(1 for x in r1.status()["replicas"] if x["live"]) == 3, 10, "r3 back")
    # The new r3 does not wait for the Envoy its predecessor had (gw-3, now
    # elsewhere): a write on it answers at once, applied by all three.
    started = time.monotonic()
    r = create(r3.api_port, owner, "kill-restarted", "viewer")
    took = time.monotonic() - started
    assert r.headers["x-apitokens-envoys"] == "3/3" and took < 1.0, (took, r.headers)
