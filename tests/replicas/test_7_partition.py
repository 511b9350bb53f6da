"""Once revoked, always revoked, with replicas: a replica cut off from the
database by a frozen network path (its sockets stay open, nothing passes)
never hands an Envoy the older table it still holds, and stops serving xDS
once its replica timeout has passed, so that Envoys go elsewhere.

A revocation and a regeneration go through r1 while the new replica r4 is
cut off; then the gateway's xDS connection moves to r4 through the same
address (a TCP proxy standing in for a load balancer)."""

from __future__ import annotations

import socket
import time

import pytest

from testkit import harness
from testkit.controlplane import APP, create, ecds_bootstrap, hcm_of, issued_secret, revision_of, tokens_path, version_of
from testkit.harness import poll
from testkit.tcpproxy import TcpProxy

from conftest import TIMEOUT_MS, replica

WATCH = 10.0


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


@pytest.fixture
def partitioned(workdir, pg, store, replicas, upstream):
    """r4 reaching the database through a proxy that can freeze; gw-p
    reaching its xDS server through a proxy that points at r1."""
    pg_path = TcpProxy(pg.port)
    r4 = replica(workdir, "r4", store.replace(f":{pg.port}/", f":{pg_path.port}/"))
    r4.start()
    xds_path = TcpProxy(replicas[0].xds_port)
    config = ecds_bootstrap(replicas[0], upstream.server_address[1], "gw-p")
    hcm_of(config)["access_log"] = harness.json_access_log(workdir / "gw-p" / "access.log")
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] == "xds_cluster":
            ep = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
            ep["address"]["socket_address"]["port_value"] = xds_path.port
    gw = harness.Envoy(workdir / "gw-p", config, name="gw-p").start()
    poll(lambda: replicas[0].envoy_status("gw-p").get("ackedVersion"), 15, "gw-p on r1")
    yield r4, gw, pg_path, xds_path
    pg_path.thaw()
    gw.stop()
    r4.stop()
    xds_path.close()
    pg_path.close()


def test_a_replica_cut_off_from_the_database_hands_out_no_older_table(partitioned, replicas, envoys, owner, figures):
    r4, gw, pg_path, xds_path = partitioned
    r1 = replicas[0]
    victim = issued_secret(create(r1.api_port, owner, "part-victim", "editor"))
    r = create(r1.api_port, owner, "part-rotated", "editor")
    old_secret = issued_secret(r)
    poll(lambda: int(r4.status()["version"]) >= version_of(r), 10, "r4 caught up")

    pg_path.freeze()
    cut_at = time.monotonic()
    r = r1.api("DELETE", tokens_path(token="part-victim"), owner)
    assert r.status == 200 and r.headers["x-apitokens-applied"] == "true", r.headers
    r = r1.api("POST", tokens_path(token="part-rotated") + ":regenerate", owner)
    assert r.status == 200 and r.headers["x-apitokens-applied"] == "true", r.headers
    new_secret = issued_secret(r)
    enforced = version_of(r)
    assert gw.get(APP, victim).status == 401 and gw.get(APP, new_secret).status == 200
    assert int(r4.status()["version"]) < enforced, "r4 cannot know"

    # The load balancer sends gw-p's xDS connection to r4 from now on.
    xds_path.retarget(r4.xds_port)
    xds_path.cut()
    statuses: dict[str, list[int]] = {"revoked": [], "replaced": [], "new": []}
    end = time.monotonic() + WATCH
    held_seen = closed_after = None
    while time.monotonic() < end:
        statuses["revoked"].append(gw.get(APP, victim).status)
        statuses["replaced"].append(gw.get(APP, old_secret).status)
        statuses["new"].append(gw.get(APP, new_secret).status)
        if held_seen is None and r4.envoy_status("gw-p").get("held"):
            held_seen = time.monotonic() - cut_at
        if closed_after is None and not accepts(r4.xds_port):
            closed_after = time.monotonic() - cut_at
    assert set(statuses["revoked"]) == {401}, f"revoked token admitted: {statuses['revoked']}"
    assert set(statuses["replaced"]) == {401}, f"replaced secret admitted: {statuses['replaced']}"
    assert set(statuses["new"]) == {200}, f"current secret refused: {statuses['new']}"
    assert held_seen is not None, "r4 never held gw-p (it must not send it its older table)"
    assert closed_after is not None and closed_after < 3 * TIMEOUT_MS / 1000, \
        f"r4 kept serving xDS without its database ({closed_after})"
    assert "xDS stops" in r4.log_text()

    # The path heals: r4 catches up, serves again, and gw-p takes what it has.
    pg_path.thaw()
    poll(lambda: accepts(r4.xds_port), 15, "r4 serving xDS again")
    poll(lambda: revision_of(r4.envoy_status("gw-p").get("initialVersion") or "0") >= enforced
         and int(r4.envoy_status("gw-p").get("ackedVersion") or 0) >= enforced, 20, "gw-p applied r4's version")
    assert gw.get(APP, victim).status == 401 and gw.get(APP, new_secret).status == 200
    assert r1.status()["behind"] is None, "a partition is not a store that went back"
    figures["replica cut off from the database"] = (
        f"{len(statuses['revoked']) * 3} gateway requests over {WATCH:.0f} s on the cut-off replica's address: "
        f"revoked token and replaced secret admitted 0 times; stream held after {held_seen:.2f} s, "
        f"xDS closed after {closed_after:.2f} s (replica timeout {TIMEOUT_MS} ms)")
