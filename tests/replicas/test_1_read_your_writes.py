"""Read-your-writes across replicas: a write answered by one replica is
enforced by the Envoys of every replica on their first request after the
answer, and /status on any replica shows every Envoy of every replica.

Every Envoy's filter VMs hold their delta streams on their home replica, so
a write on another replica reaches them through the database and that
replica's delta channel, and the answer waits for their VMs."""

from __future__ import annotations

from testkit.controlplane import APP, create, issued_secret, tokens_path
from testkit.harness import poll

ROUNDS = 10


def applied_everywhere(r, envoys) -> None:
    assert r.status == 200, r
    assert r.headers["x-apitokens-applied"] == "true", r.headers
    assert r.headers["x-apitokens-envoys"] == f"{len(envoys)}/{len(envoys)}", r.headers


def test_status_shows_every_envoy_of_every_replica(replicas, envoys):
    homes = {(e.node, e.home.name) for e in envoys}
    versions = set()
    for plane in replicas:
        # Each Envoy has just acknowledged its home replica; the others hear
        # of it through the database within moments.
        poll(lambda: {(e["node"], e["replica"]) for e in plane.status()["envoys"] if e["connected"]} == homes,
             5, f"{plane.name} shows every Envoy")
        st = plane.status()
        connected = {(e["node"], e["replica"]) for e in st["envoys"] if e["connected"]}
        assert connected == homes, f"{plane.name}: {connected}"
        # (A replica killed by an earlier drill stays listed, not live, for a minute.)
        live = [r for r in st["replicas"] if r["live"]]
        assert [r["name"] for r in live] == [p.name for p in replicas], st["replicas"]
        assert [r["this"] for r in live] == [p is plane for p in replicas]
        versions.add(st["version"])
        # On the delta channel with their home replica (their VMs' streams
        # are there): the writes below are answered by their VMs' ACKs.
        for e in envoys:
            if e.home is plane:
                poll(lambda: plane.envoy_status(e.node).get("delta"), 10, f"{e.node} on the delta channel")
                assert plane.envoy_status(e.node)["vms"], plane.envoy_status(e.node)
        metrics = plane.metrics()
        assert metrics['apitokens_replicas{state="live"}'] == len(replicas), metrics
        assert metrics['apitokens_envoys{state="connected"}'] == len(envoys)
    assert len(versions) == 1, "the same content has the same version on every replica"


def test_a_create_on_one_replica_works_through_every_envoy_at_once(replicas, envoys, owner):
    for i in range(ROUNDS):
        r = create(replicas[0].api_port, owner, f"ryw-{i}", "viewer")
        applied_everywhere(r, envoys)
        secret = r.json()["apiToken"]["secret"]
        for e in envoys:
            assert e.get(APP, secret).status == 200, f"{e.node}, round {i}: the first request after the answer"


def test_a_revoke_on_another_replica_is_refused_by_every_envoy_at_once(replicas, envoys, owner):
    for i in range(ROUNDS):
        r = create(replicas[0].api_port, owner, f"gone-{i}", "editor")
        applied_everywhere(r, envoys)
        secret = r.json()["apiToken"]["secret"]
        r = replicas[1].api("DELETE", tokens_path(token=f"gone-{i}"), owner)
        applied_everywhere(r, envoys)
        for e in envoys:
            assert e.get(APP, secret).status == 401, f"{e.node}, round {i}: revoked on r2, still accepted"


def test_a_regenerate_on_the_third_replica_switches_every_envoy_at_once(replicas, envoys, owner):
    r = create(replicas[0].api_port, owner, "rotated", "owner")
    applied_everywhere(r, envoys)
    old = r.json()["apiToken"]["secret"]
    r = replicas[2].api("POST", tokens_path(token="rotated:regenerate"), owner)
    applied_everywhere(r, envoys)
    new = issued_secret(r)
    for e in envoys:
        assert e.get(APP, old).status == 401, e.node
        assert e.get(APP, new).status == 200, e.node
