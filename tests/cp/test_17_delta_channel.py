"""The delta channel: a write reaches every Envoy worker as the change alone,
and answers only once every worker enforces it.

One control plane holding 100,000 tokens; one Envoy with 4 workers, each
worker's filter VM (and the main thread's) on its own delta stream. The
background ECDS snapshot is pushed every 10 minutes only, so everything a
test sees after the first snapshot came by the delta channel. After every
answer (500 creates, 500 regenerations, 500 deletes), the check is the first
request on a *fresh* connection (the kernel spreads new connections over the
4 workers), over HTTP/1.1 and HTTP/2: zero wrong answers. Then the channel cut (the control plane killed with -9
mid-burst, and back), an Envoy started after a revocation, Envoy's own hot
restart with a revocation while the new process starts, and the
fallback: an Envoy whose filter opens no stream still gets every change by
ECDS, at once."""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import signal
import subprocess
import threading
import time

import httpx
import pytest

from testkit.controlplane import APP, ControlPlane, apitokens_bin, free_port, shipped_envoy, tokens_path
from testkit.harness import poll, remember_secret
from testkit.timing import limit

TABLE = 100_000
# Per protocol: 500 create -> first use, 500 regenerate and 500 delete cycles in all.
CYCLES = 250
WORKERS = 4
# Envoy's workers and its main thread: a filter VM each, a stream each.
VMS = WORKERS + 1


def import_tokens(plane: ControlPlane, n: int) -> None:
    roles = ("viewer", "editor", "owner")
    tokens = [{"name": f"namespaces/ns-{i % 50}/apitokens/bulk-{i:06d}", "role": roles[i % 3],
               "secretSha256": hashlib.sha256(secrets.token_bytes(16)).hexdigest()} for i in range(n)]
    conf = plane.dir / "bulk.json"
    conf.write_text(json.dumps({"tokens": tokens}))
    subprocess.run([apitokens_bin(), "import", str(conf), *plane.store_args()],
                   capture_output=True, check=True, timeout=limit(120))


def delta_streams(plane: ControlPlane) -> float:
    return plane.metrics().get("apitokens_delta_streams", 0.0)


@pytest.fixture(scope="module")
def plane(workdir):
    plane = ControlPlane(workdir / "delta", name="delta")
    plane.owner = plane.bootstrap("default", "admin")
    import_tokens(plane, TABLE)
    # Writes as fast as the control plane takes them: no per-namespace limits.
    plane.start("--snapshot-interval-ms", "600000", "--namespace-writes-per-second", "0")
    yield plane
    plane.stop()


@pytest.fixture(scope="module")
def proxy(workdir, plane, upstream):
    envoy = shipped_envoy(workdir / "envoy-delta", plane, upstream.server_address[1], node="delta-envoy",
                          concurrency=WORKERS).start()
    poll(lambda: delta_streams(plane) >= VMS and plane.envoy_status("delta-envoy").get("delta"), 30,
         f"{VMS} delta streams")
    yield envoy
    envoy.stop()


CLIENTS: dict[tuple[str, str], httpx.Client] = {}


def fresh(proxy, proto: str, secret: str) -> int:
    """The status of a request on a new connection (a worker the kernel picks):
    the client keeps no connection alive."""
    key = (proxy.base_url, proto)
    if key not in CLIENTS:
        CLIENTS[key] = httpx.Client(base_url=proxy.base_url, http1=proto == "h1", http2=proto == "h2", timeout=limit(10.0),
                                    trust_env=False, limits=httpx.Limits(max_keepalive_connections=0))
    return CLIENTS[key].get(APP, headers={"authorization": f"Bearer {secret}"}).status_code


def test_every_vm_holds_a_stream_and_a_write_sends_the_change_alone(plane, proxy):
    before = plane.metrics()
    r = plane.api("POST", tokens_path("default"), plane.owner,
                  {"name": "namespaces/default/apitokens/delta-size", "role": "viewer"})
    assert r.status == 200, r
    secret = remember_secret(r.json()["apiToken"]["secret"])
    assert fresh(proxy, "h1", secret) == 200
    after = plane.metrics()
    ecds = after["apitokens_push_bytes_total"] - before["apitokens_push_bytes_total"]
    sent = after["apitokens_delta_bytes_total"] - before["apitokens_delta_bytes_total"]
    # 100,000 tokens are 8.5 MB of snapshot: none of it moved.
    assert ecds == 0, f"{ecds} bytes of ECDS for one write"
    assert 0 < sent <= 4096, f"{sent} bytes to one Envoy for one write"
    envoy = plane.envoy_status("delta-envoy")
    assert len([vm for vm in envoy["vms"] if vm["connected"]]) == VMS, envoy


def connections_by_worker(proxy) -> dict[str, float]:
    return {m[1]: value for name, value in proxy.stats().items()
            if (m := re.search(r"^listener\.127\.0\.0\.1_\d+\.worker_(\d+)\.downstream_cx_total$", name))}


@pytest.mark.parametrize("proto", ["h1", "h2"])
def test_every_write_is_enforced_by_every_worker_when_it_answers(plane, proxy, proto):
    api = httpx.Client(base_url=f"http://127.0.0.1:{plane.api_port}", timeout=limit(30.0), trust_env=False,
                       headers={"authorization": f"Bearer {plane.owner}"})
    wrong: list[str] = []
    opened = connections_by_worker(proxy)

    def check(what: str, secret: str, expected: int) -> None:
        status = fresh(proxy, proto, secret)
        if status != expected:
            wrong.append(f"{what}: {status}, expected {expected}")

    for i in range(CYCLES):
        name = f"{proto}-cycle-{i}"
        r = api.post(tokens_path("default"), json={"name": f"namespaces/default/apitokens/{name}", "role": "viewer"})
        assert r.status_code == 200, r.text
        first = remember_secret(r.json()["apiToken"]["secret"])
        check(f"{name} created", first, 200)
        r = api.post(tokens_path("default", name) + ":regenerate", json={})
        assert r.status_code == 200, r.text
        second = remember_secret(r.json()["apiToken"]["secret"])
        check(f"{name} old secret", first, 401)
        check(f"{name} new secret", second, 200)
        r = api.delete(tokens_path("default", name))
        assert r.status_code == 200, r.text
        check(f"{name} deleted", second, 401)
    api.close()
    assert not wrong, f"{len(wrong)} wrong answers of {CYCLES * 4}: {wrong[:10]}"
    # Every check on a connection of its own, and every worker had its share.
    grown = {w: n - opened.get(w, 0) for w, n in connections_by_worker(proxy).items()}
    assert sum(grown.values()) >= CYCLES * 4 and len([n for n in grown.values() if n >= CYCLES // 4]) == WORKERS, grown


def test_the_channel_cut_mid_burst_loses_nothing(plane, proxy):
    """Writes flow from a client while the control plane is killed with -9
    and started again: every delete that answered stays refused, every create
    that answered is allowed, on fresh connections to every worker."""
    deleted: list[str] = []
    created: list[str] = []
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                r = plane.api("POST", tokens_path("default"), plane.owner,
                              {"name": f"namespaces/default/apitokens/burst-{i}", "role": "viewer"})
                if r.status != 200:
                    continue
                secret = remember_secret(r.json()["apiToken"]["secret"])
                if i % 2 and plane.api("DELETE", tokens_path("default", f"burst-{i}"), plane.owner).status == 200:
                    deleted.append(secret)
                else:
                    created.append(secret)
            except OSError:
                time.sleep(0.05)

    thread = threading.Thread(target=writer)
    thread.start()
    time.sleep(1.0)
    plane.stop(signal.SIGKILL)
    time.sleep(0.5)
    plane.start(*plane.extra)
    poll(lambda: delta_streams(plane) >= VMS and plane.envoy_status("delta-envoy").get("delta"), 30,
         "the delta streams back")
    time.sleep(1.0)
    stop.set()
    thread.join(limit(30))
    assert len(deleted) > 5 and len(created) > 5, (len(deleted), len(created))
    wrong = [f"deleted #{i}: {s}" for i, secret in enumerate(deleted) if (s := fresh(proxy, "h1", secret)) != 401]
    wrong += [f"created #{i}: {s}" for i, secret in enumerate(created) if (s := fresh(proxy, "h1", secret)) != 200]
    assert not wrong, wrong[:10]


def test_an_envoy_that_starts_after_a_revocation_never_admits_it(workdir, plane, proxy, upstream):
    """A revocation travels by the delta channel only (the running Envoy's
    ECDS snapshot, pushed every 10 minutes, still holds the token). An Envoy
    started after it (as a hot restart starts a new process, with new VMs)
    refuses it from its very first request, on every worker, and enforces
    the writes that follow."""
    r = plane.api("POST", tokens_path("default"), plane.owner,
                  {"name": "namespaces/default/apitokens/before-restart", "role": "viewer"})
    assert r.status == 200, r
    revoked = remember_secret(r.json()["apiToken"]["secret"])
    assert fresh(proxy, "h1", revoked) == 200
    assert plane.api("DELETE", tokens_path("default", "before-restart"), plane.owner).status == 200
    assert fresh(proxy, "h1", revoked) == 401
    late = shipped_envoy(workdir / "envoy-late", plane, upstream.server_address[1], node="late-envoy",
                         concurrency=2).start()
    try:
        seen = []
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            seen.append(fresh(late, "h1", revoked))
        # Its listener waits for the first snapshot (its deny-all default,
        # 401, if that took over initial_fetch_timeout), the snapshot's answer
        # after: never the revoked token admitted.
        assert seen and all(s == 401 for s in seen), sorted(set(seen))
        poll(lambda: plane.envoy_status("late-envoy").get("delta"), 30, "the late Envoy on the delta channel")
        r = plane.api("POST", tokens_path("default"), plane.owner,
                      {"name": "namespaces/default/apitokens/after-restart", "role": "viewer"})
        assert r.status == 200 and r.headers["x-apitokens-applied"] == "true", r
        secret = remember_secret(r.json()["apiToken"]["secret"])
        assert all(fresh(envoy, "h1", secret) == 200 for envoy in (late, proxy) for _ in range(8))
    finally:
        late.stop()


def test_a_hot_restart_never_admits_a_revoked_token(workdir, plane, upstream):
    """Envoy's own hot restart (`--restart-epoch`): a new process, whose VMs
    take the table by ECDS and the changes on streams of their own, takes
    the listener over from the old one, which drains and exits. A token
    revoked while the new process starts is refused by both from the
    revocation's answer on, on fresh connections all along; a token that
    stays is admitted throughout (or 503 while a VM catches up), and after."""
    port = free_port()
    base_id = workdir / "hot-base-id"

    def process(epoch: int):
        def on_port(config: dict) -> None:
            config["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] = port

        envoy = shipped_envoy(workdir / f"envoy-hot-{epoch}", plane, upstream.server_address[1], node="hot-envoy",
                              mutate=on_port, concurrency=2)
        envoy.hot_restart = (epoch, base_id)
        return envoy

    def create(name: str) -> str:
        r = plane.api("POST", tokens_path("default"), plane.owner,
                      {"name": f"namespaces/default/apitokens/{name}", "role": "viewer"})
        assert r.status == 200 and r.headers["x-apitokens-applied"] == "true", r
        return remember_secret(r.json()["apiToken"]["secret"])

    old = process(0).start()
    new = process(1)
    seen: dict[str, list[tuple[float, int]]] = {"victim": [], "keeper": []}
    stop = threading.Event()
    try:
        poll(lambda: plane.envoy_status("hot-envoy").get("delta"), 30, "the first process on the delta channel")
        victim, keeper = create("hot-victim"), create("hot-keeper")

        def hammer() -> None:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=limit(10.0), trust_env=False,
                              limits=httpx.Limits(max_keepalive_connections=0)) as client:
                while not stop.is_set():
                    for key, secret in (("victim", victim), ("keeper", keeper)):
                        sent = time.monotonic()
                        try:
                            status = client.get(APP, headers={"authorization": f"Bearer {secret}"}).status_code
                        except httpx.TransportError:
                            # Cut by the old process's exit (Envoy's own:
                            # its in-flight requests at its shutdown time).
                            status = 0
                        seen[key].append((sent, status))

        load = threading.Thread(target=hammer)
        load.start()
        # The revocation while the new process starts (before its VMs have
        # streams: they take the table from a snapshot that holds it). The
        # process is started from this thread: Envoy ends itself when the
        # thread that started it ends.
        revocation: list = []

        def revoke() -> None:
            time.sleep(0.1)
            revocation.append(plane.api("DELETE", tokens_path("default", "hot-victim"), plane.owner))
            revocation.append(time.monotonic())

        revoking = threading.Thread(target=revoke)
        revoking.start()
        new.start()
        revoking.join()
        r, answered = revocation
        assert r.status == 200, r
        poll(lambda: old.proc.poll() is not None, 20, "the old process drained and exited")
        poll(lambda: plane.envoy_status("hot-envoy").get("delta"), 30, "the new process on the delta channel")
        after = create("hot-after")
        assert fresh(new, "h1", after) == 200 and fresh(new, "h1", victim) == 401
    finally:
        stop.set()
        new.stop()
        old.stop()
    load.join()
    victim_after = [s for t, s in seen["victim"] if t > answered]
    assert len(victim_after) >= 20, f"only {len(victim_after)} requests after the revocation"
    assert 200 not in victim_after, f"revoked token admitted: {sorted(set(victim_after))}"
    assert set(victim_after) <= {401, 503}, sorted(set(victim_after))
    # The token that stays is never refused: the new process's listener
    # waits for its first snapshot before it takes over (the shipped
    # `apply_default_config_without_warming: false`).
    keeper_all = [s for _, s in seen["keeper"]]
    assert set(keeper_all) <= {200, 503, 0}, sorted(set(keeper_all))
    assert keeper_all.count(503) + keeper_all.count(0) <= len(keeper_all) // 10, \
        f"{keeper_all.count(503)} 503s and {keeper_all.count(0)} cut of {len(keeper_all)}"


@pytest.fixture(scope="module")
def ecds_only(workdir, upstream):
    """A control plane whose Envoys' filters are told to open no delta
    stream (`usageReport.deltaChannel: false`), as an older filter would."""
    base = json.loads((ControlPlane(workdir / "x").plugin_config).read_text())
    base["usageReport"]["deltaChannel"] = False
    path = workdir / "plugin-no-delta.json"
    path.write_text(json.dumps(base))
    plane = ControlPlane(workdir / "ecds-only", name="ecds-only", plugin_config=path)
    plane.owner = plane.bootstrap("default", "admin")
    plane.start("--snapshot-interval-ms", "600000")
    envoy = shipped_envoy(workdir / "envoy-ecds-only", plane, upstream.server_address[1], node="ecds-only",
                          concurrency=2).start()
    poll(lambda: plane.envoy_status("ecds-only").get("ackedVersion"), 15, "the first ACK")
    yield plane, envoy
    envoy.stop()
    plane.stop()


def test_a_filter_without_the_channel_gets_every_change_by_ecds_at_once(ecds_only):
    plane, envoy = ecds_only
    for i in range(20):
        r = plane.api("POST", tokens_path("default"), plane.owner,
                      {"name": f"namespaces/default/apitokens/old-{i}", "role": "viewer"})
        assert r.status == 200, r
        secret = remember_secret(r.json()["apiToken"]["secret"])
        assert fresh(envoy, "h1", secret) == 200
        assert plane.api("DELETE", tokens_path("default", f"old-{i}"), plane.owner).status == 200
        assert fresh(envoy, "h1", secret) == 401
    assert delta_streams(plane) == 0
    status = plane.envoy_status("ecds-only")
    assert status["delta"] is False, status
