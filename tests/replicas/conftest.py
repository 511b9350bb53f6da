"""Several `apitokens serve` replicas on one real PostgreSQL server (the
private one scripts/postgres.sh starts for `make replicas`), three real
Envoys 1.40 on envoy-ecds.yaml, each with its own home replica and the other
two as fail-over (the xDS cluster of docs/operations.md, "Several control planes on PostgreSQL"), and an
echo upstream. Everything listens on 127.0.0.1.

Environment: APITOKENS_BIN, ENVOY_BIN, APITOKENS_WASM (testkit.controlplane),
and the server's variables (testkit.postgres).

When the session ends, `leak_search` looks for every issued secret in the
logs, every Envoy's admin endpoints, every replica's /status, and everything
the databases hold (pg_dump).
"""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from testkit import harness, leaks, postgres
from testkit.controlplane import ControlPlane, ecds_bootstrap, hcm_of
from testkit.harness import poll, remember_secret

NAMES = ("r1", "r2", "r3")
# A replica silent this long is no longer waited for (the drill's kill -9).
TIMEOUT_MS = 2000
# The session fixtures upstream and workdir; the binaries checked at the
# start; every Envoy's logs in the report of a failed test; the fixture
# `figures` (what the drills measured), printed at the end.
pytest_plugins = ["testkit.fixtures", "testkit.figures"]


def pytest_sessionstart(session):
    if postgres.missing():
        raise pytest.UsageError("no PostgreSQL server: run `make replicas` (scripts/postgres.sh run -- ...); "
                                "missing " + ", ".join(postgres.missing()))


@pytest.fixture(scope="session")
def pg() -> postgres.Postgres:
    return postgres.Postgres()


@pytest.fixture(scope="session")
def store(pg) -> str:
    """The drill's database. Its URL carries a password (the server trusts
    loopback and never asks for it): the leak search looks for it too."""
    url = pg.create_database("drill")
    password = remember_secret("pw-" + secrets.token_hex(12))
    return url.replace(f"//{pg.user}@", f"//{pg.user}:{password}@")


def replica(workdir: Path, name: str, store: str) -> ControlPlane:
    return ControlPlane(workdir / name, name=name, store=store,
                        always=("--replica-name", name, "--replica-timeout-ms", str(TIMEOUT_MS)))


@pytest.fixture(scope="session")
def replicas(workdir, store):
    planes = [replica(workdir, name, store) for name in NAMES]
    planes[0].owner = planes[0].bootstrap("default", "admin")  # type: ignore[attr-defined]
    for plane in planes:
        plane.start()
    yield planes
    for plane in planes:
        plane.stop()


@pytest.fixture(scope="session")
def owner(replicas) -> str:
    return replicas[0].owner


def xds_cluster(home: ControlPlane, others: list[ControlPlane]) -> dict:
    """The xDS cluster over several replicas: the home replica first
    (priority 0), the others as fail-over (priority 1); a TCP health check
    every 0.25 s takes a dead replica out at once."""

    def endpoint(plane: ControlPlane) -> dict:
        return {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": plane.xds_port}}}}

    return {
        "health_checks": [{
            "timeout": "0.25s", "interval": "0.25s", "no_traffic_interval": "0.25s",
            "unhealthy_threshold": 1, "healthy_threshold": 1, "tcp_health_check": {},
        }],
        "load_assignment": {
            "cluster_name": "xds_cluster",
            "endpoints": [
                {"priority": 0, "lb_endpoints": [endpoint(home)]},
                {"priority": 1, "lb_endpoints": [endpoint(p) for p in others]},
            ],
        },
    }


def replica_envoy(workdir: Path, node: str, home: ControlPlane, others: list[ControlPlane], upstream_port: int):
    config = ecds_bootstrap(home, upstream_port, node)
    hcm_of(config)["access_log"] = harness.json_access_log(workdir / node / "access.log")
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] == "xds_cluster":
            cluster.update(xds_cluster(home, others))
    return harness.Envoy(workdir / node, config, name=node)


@pytest.fixture(scope="session")
def envoys(workdir, replicas, upstream):
    """gw-1, gw-2, gw-3: each at home on r1, r2, r3 respectively."""
    started = []
    for i, home in enumerate(replicas):
        others = [p for p in replicas if p is not home]
        e = replica_envoy(workdir, f"gw-{i + 1}", home, others, upstream.server_address[1])
        e.home = home
        started.append(e.start())
    for e in started:
        poll(lambda: e.home.envoy_status(e.node).get("ackedVersion"), 15, f"first ACK from {e.node}")
    yield started
    for e in started:
        e.stop()


def at_home(e) -> bool:
    """The Envoy's one connected ECDS stream and its VMs' delta streams are
    on its home replica, and it acknowledged a version there."""
    streams = [s for s in e.home.status()["envoys"] if s["node"] == e.node and s["connected"]]
    return (len(streams) == 1 and streams[0].get("replica") == e.home.name and bool(streams[0].get("ackedVersion"))
            and bool(streams[0].get("delta"))
            and all(vm.get("replica") == e.home.name for vm in streams[0]["vms"] if vm["connected"]))


@pytest.fixture(scope="module", autouse=True)
def topology(replicas, envoys):
    """Each module starts from the same place, whatever ran before it: the
    three replicas running, every Envoy on its home replica. A drill leaves
    it elsewhere (after a kill -9 of its home, gw-3 stays on the replica it
    moved to; a database outage makes every Envoy reconnect): that Envoy is
    restarted, and connects home."""
    for plane in replicas:
        if plane.proc is None or plane.proc.poll() is not None:
            plane.start()
    for e in envoys:
        try:
            poll(lambda: at_home(e), 5, f"{e.node} at home on {e.home.name}")
        except TimeoutError:
            e.stop()
            e.start()
            poll(lambda: at_home(e), 15, f"{e.node} at home on {e.home.name} after a restart")


def replica_places(run) -> dict[str, str]:
    """Every file under the run's directory (logs), every running Envoy's
    admin endpoints, every running replica's /status, and everything the
    databases hold (a pg_dump of each, every table)."""
    texts = {f"pg_dump {db}": run.pg.dump(db) for db in run.pg.databases}
    for plane in run.replicas:
        if plane.proc is not None and plane.proc.poll() is None:
            texts[f"{plane.name} /status"] = plane.api("GET", "/status").body.decode()
    return leaks.exposed([run.workdir], {e.name: e.admin_get for e in run.envoys if e.running}, texts)


def tables_searched(run, places: dict[str, str]) -> None:
    """The search read the real tables: the owner's digest is in the dump."""
    if run.whole:
        dump = places["pg_dump drill"]
        assert harness.sha256_hex(run.replicas[0].owner) in dump
        assert "COPY public.tokens" in dump and "COPY public.envoy_streams" in dump


# After the last test: no secret issued in this session in any log, any
# Envoy's admin endpoints, any replica's /status, or anywhere in the
# databases; no Wasm VM failed.
leak_search = leaks.session_search(
    __file__, "workdir", "envoys", "replicas", "pg",
    places=replica_places,
    searched=tables_searched,
    wasm=lambda run: run.envoys,
)
