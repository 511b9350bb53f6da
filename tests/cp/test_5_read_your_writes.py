"""Read-your-writes: when a create, regenerate or delete answers, every Envoy
connected to the control plane already enforces it. Two Envoys (2 workers
each) on one control plane; after every answer, the very first request to an
Envoy (rotating over keep-alive connections spread across both Envoys and all
their workers) must get the new answer: the created token allowed, the
regenerated token's old secret refused and its new one allowed, the deleted
token refused. Over HTTP/1.1 and HTTP/2. And an Envoy that rejects a version
is named in the write's answer and on /status, which never calls it applied."""

from __future__ import annotations

import itertools
import re
import shutil

import httpx
import pytest

from testkit.controlplane import APP, ControlPlane, hcm_of, module_path, shipped_envoy, tokens_path
from testkit.harness import poll, remember_secret
from testkit.timing import limit

CYCLES = 150  # per protocol; tests/cp/test_17 runs 500 of each write at 100k tokens and 4 workers
CONNECTIONS = 4  # per Envoy at least, and until both its workers have some


def workers_with_connections(envoy) -> set[str]:
    return {m[1] for name, value in envoy.stats().items()
            if value > 0 and (m := re.search(r"^listener\.127\.0\.0\.1_\d+\.worker_(\d+)\.downstream_cx_active$", name))}


class Connections:
    """Keep-alive connections to every Envoy, used in turn: each check is the
    first request after a write on whichever connection (Envoy, worker) is next."""

    def __init__(self, envoys, proto: str):
        self.clients: list[tuple[str, httpx.Client]] = []
        for envoy in envoys:
            # The kernel spreads connections over the workers by their ports:
            # open more until both have some.
            for opened in range(1, 33):
                client = httpx.Client(base_url=envoy.base_url, http1=proto == "h1", http2=proto == "h2",
                                      timeout=limit(10.0), trust_env=False)
                assert client.get(APP).status_code == 401  # opens the connection
                self.clients.append((envoy.name, client))
                if opened >= CONNECTIONS and len(workers_with_connections(envoy)) == 2:
                    break
            workers = workers_with_connections(envoy)
            assert len(workers) == 2, f"{envoy.name}: connections on workers {workers} only"
        self.turn = itertools.cycle(range(len(self.clients)))

    def status(self, secret: str) -> tuple[str, int]:
        name, client = self.clients[next(self.turn)]
        return name, client.get(APP, headers={"authorization": f"Bearer {secret}"}).status_code

    def close(self) -> None:
        for _, client in self.clients:
            client.close()


@pytest.fixture(scope="module")
def second_envoy(workdir, cp, upstream):
    proxy = shipped_envoy(workdir / "envoy-ryw", cp, upstream.server_address[1], node="e2e-envoy-ryw").start()
    poll(lambda: cp.envoy_status(proxy.node).get("ackedVersion"), 15, "first ACK of the second Envoy")
    yield proxy
    proxy.stop()


@pytest.mark.parametrize("proto", ["h1", "h2"])
def test_every_write_is_enforced_on_the_first_request_after_the_answer(envoy, second_envoy, cp, owner, proto):
    conns = Connections([envoy, second_envoy], proto)
    api = httpx.Client(base_url=envoy.base_url, http1=proto == "h1", http2=proto == "h2", timeout=limit(30.0),
                       trust_env=False, headers={"authorization": f"Bearer {owner}"})
    wrong: list[str] = []
    checks = 0

    def check(what: str, secret: str, expected: int) -> None:
        nonlocal checks
        checks += 1
        where, status = conns.status(secret)
        if status != expected:
            wrong.append(f"{what}: {where} answered {status}, not {expected}")

    def write(method: str, path: str, body=None) -> httpx.Response:
        r = api.request(method, path, json=body)
        assert r.status_code == 200, (method, path, r.status_code, r.text)
        # Both Envoys applied it before the answer.
        assert r.headers["x-apitokens-applied"] == "true", (method, path, dict(r.headers))
        assert r.headers["x-apitokens-envoys"] == "2/2", (method, path, dict(r.headers))
        return r

    try:
        for i in range(CYCLES):
            name = f"ryw-{proto}-{i}"
            r = write("POST", tokens_path(), {"name": f"namespaces/default/apitokens/{name}", "role": "editor"})
            first = remember_secret(r.json()["apiToken"]["secret"])
            check(f"{name} created", first, 200)
            r = write("POST", tokens_path(token=f"{name}:regenerate"))
            second = remember_secret(r.json()["apiToken"]["secret"])
            check(f"{name} regenerated, old secret", first, 401)
            check(f"{name} regenerated, new secret", second, 200)
            write("DELETE", tokens_path(token=name))
            check(f"{name} deleted", second, 401)
    finally:
        api.close()
        conns.close()
    print(f"read-your-writes over {proto}: {CYCLES * 3} writes, {checks} first requests, {len(wrong)} wrong")
    assert wrong == [], wrong[:10]


def test_an_envoy_that_rejects_a_version_is_named_and_never_counted(workdir, upstream):
    """Two Envoys with one node id (as two started from one configuration
    have): the one that cannot load the module rejects every version. The
    write still succeeds (it is committed) but says where it is not applied,
    and /status never reports it applied."""
    plane = ControlPlane(workdir / "cp-nack", name="cp-nack")
    owner = plane.bootstrap("default", "admin")
    # A relative module path: it resolves against each Envoy's working directory.
    plane.start("--wasm-module", "target/wasm32-wasip1/release/apitokens_filter.wasm",
                "--apply-timeout-ms", "3000")
    elsewhere = workdir / "elsewhere"
    elsewhere.mkdir()

    def absolute_default(config: dict) -> None:
        default = hcm_of(config)["http_filters"][0]["config_discovery"]["default_config"]
        default["config"]["vm_config"]["code"]["local"]["filename"] = str(module_path())

    good = shipped_envoy(workdir / "nack-good", plane, upstream.server_address[1], node="gateway")
    bad = shipped_envoy(workdir / "nack-bad", plane, upstream.server_address[1], node="gateway",
                        mutate=absolute_default, cwd=elsewhere)
    try:
        good.start()
        bad.start()
        poll(lambda: len([e for e in plane.status()["envoys"] if e["connected"]]) == 2, 15, "two streams")
        poll(lambda: any(e.get("lastNack") for e in plane.status()["envoys"]), 15, "the first NACK")
        r = plane.api("POST", tokens_path(), owner, {"name": "namespaces/default/apitokens/ci", "role": "viewer"})
        assert r.status == 200, r
        secret = remember_secret(r.json()["apiToken"]["secret"])
        assert r.headers["x-apitokens-applied"] == "false"
        assert r.headers["x-apitokens-envoys"] == "1/2"
        rejected = [e for e in plane.status()["envoys"] if e.get("lastNack")]
        assert len(rejected) == 1
        # Counted for the namespace's owner; named on /status, for operators.
        assert r.headers["x-apitokens-not-applied"] == "1 rejected (NACK) (which: /status)"
        version = int(r.headers["x-apitokens-config-version"])
        st = plane.status(version, 0.5)
        assert st["applied"] is False, "one stream's ACK hides the other's NACK"
        assert st["lagging"] == [{"who": f"gateway (stream {rejected[0]['stream']})", "reason": "rejected",
                                  "error": rejected[0]["lastNack"]["error"]}]
        assert "apitokens_filter.wasm" in rejected[0]["lastNack"]["error"]
        assert "not applied everywhere" in plane.log_text()
        # What each Envoy enforces: the new token on the one that applied it;
        # the other keeps refusing everything (its deny-all default).
        assert good.get(APP, secret).status == 200
        assert bad.get(APP, secret).status == 401
        # An operator who wants the names in the answers asks for them.
        plane.stop()
        plane.start("--wasm-module", "target/wasm32-wasip1/release/apitokens_filter.wasm",
                    "--apply-timeout-ms", "3000", "--name-envoys-in-answers")
        poll(lambda: len([e for e in plane.status()["envoys"] if e["connected"]]) == 2, 15, "two streams again")
        r = plane.api("POST", tokens_path(), owner, {"name": "namespaces/default/apitokens/ci-2", "role": "viewer"})
        remember_secret(r.json()["apiToken"]["secret"])
        assert r.headers["x-apitokens-envoys"] == "1/2", r.headers
        named = r.headers["x-apitokens-not-applied"]
        assert named.startswith("gateway (stream ") and "which: /status" not in named, named
    finally:
        good.stop()
        bad.stop()
        plane.stop()
        shutil.rmtree(elsewhere, ignore_errors=True)
