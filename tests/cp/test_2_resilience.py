"""The control plane goes away and comes back; Envoy keeps enforcing; a
configuration Envoy rejects is reported as NACK and the old one stays."""

from __future__ import annotations

import signal
import time

from testkit.controlplane import APP, create, revision_of, shipped_envoy, tokens_path, until_status, version_of
from testkit.harness import poll, remember_secret


def envoy_status(cp, node):
    return next((e for e in cp.status()["envoys"] if e["node"] == node), {})


def test_kill_9_after_a_2xx_loses_nothing_and_envoy_keeps_enforcing(envoy, cp, owner):
    r = create(envoy.port, owner, "kept", "viewer")
    kept = r.json()["apiToken"]["secret"]
    cp.wait_applied(version_of(r))
    until_status(envoy, APP, kept, 200)
    revoked = create(envoy.port, owner, "gone", "viewer")
    gone = revoked.json()["apiToken"]["secret"]
    assert envoy.get(tokens_path(token="gone"), owner, method="DELETE").status == 200
    until_status(envoy, APP, gone, 401)
    acked_before = envoy_status(cp, envoy.node)["ackedVersion"]

    # Created, answered 200, and the process killed at once.
    r = cp.api("POST", tokens_path(), owner, {"name": "namespaces/default/apitokens/durable", "role": "editor"})
    assert r.status == 200
    durable = r.json()["apiToken"]["secret"]
    remember_secret(durable)
    cp.stop(signal.SIGKILL)

    # Envoy enforces its last configuration while the control plane is down.
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        assert envoy.get(APP, kept).status == 200
        assert envoy.get(APP, gone).status == 401
        assert envoy.get(APP, "never-issued").status == 401
        assert envoy.get(APP).status == 401
        time.sleep(0.05)

    cp.start()
    # The store kept the token; Envoy reconnects and gets it.
    names = [t["name"] for t in cp.api("GET", tokens_path(), owner).json()["apiTokens"]]
    assert "namespaces/default/apitokens/durable" in names
    until_status(envoy, APP, durable, 200, timeout=10)
    assert envoy.get(APP, kept).status == 200
    assert envoy.get(APP, gone).status == 401
    # (The token may have reached Envoy before the kill: wait for the reconnect.)
    st = poll(lambda: envoy_status(cp, envoy.node).get("connected") and envoy_status(cp, envoy.node), 10,
              "reconnect")
    # It told the new process which version it had.
    assert revision_of(st["initialVersion"]) >= int(acked_before)
    assert "connected as stream" in cp.log_text()


def test_graceful_stop_and_restart(envoy, cp, owner):
    start = time.monotonic()
    assert cp.stop(signal.SIGTERM) == 0
    assert time.monotonic() - start < 6, "SIGTERM must not hang on open xDS streams"
    assert envoy.get(APP, owner).status == 200
    cp.start()
    poll(lambda: envoy_status(cp, envoy.node).get("connected"), 10, "reconnect")


def test_rejected_configuration_is_a_nack_and_the_old_one_stays(envoy, cp, owner):
    cp.stop()
    # A module path Envoy cannot load: every version is rejected.
    cp.start("--wasm-module", "/nonexistent/apitokens_filter.wasm")
    version = int(cp.status()["version"])
    nack = poll(lambda: (envoy_status(cp, envoy.node).get("lastNack") or {}).get("version") == str(version)
                and envoy_status(cp, envoy.node)["lastNack"], 10, "NACK")
    assert "/nonexistent/apitokens_filter.wasm" in nack["error"]
    assert nack["outcome"] == "NACK"
    # A token created now is stored and acknowledged by nobody.
    r = cp.api("POST", tokens_path(), owner, {"name": "namespaces/default/apitokens/late", "role": "viewer"})
    assert r.status == 200
    late = r.json()["apiToken"]["secret"]
    remember_secret(late)
    v = version_of(r)
    poll(lambda: envoy_status(cp, envoy.node)["lastNack"]["version"] == str(v), 10, "NACK of the new version")
    st = cp.status(v, 0.2)
    assert st["applied"] is False, "a rejected version is never reported as applied"
    # This stream acknowledged nothing; Envoy keeps what it had before.
    assert "ackedVersion" not in envoy_status(cp, envoy.node)
    assert revision_of(envoy_status(cp, envoy.node)["initialVersion"]) < v
    # Envoy still enforces the previous configuration; the token change
    # itself reaches its VMs on the delta channel all the same (a revocation
    # must, whatever happens to the snapshot), though the write is not
    # reported applied while Envoy rejects what it is sent.
    assert envoy.get(APP, owner).status == 200
    until_status(envoy, APP, late, 200)
    assert "NACKed version" in cp.log_text()
    stats = envoy.stats()
    rejected = {k: v for k, v in stats.items() if "extension_config_discovery" in k and k.endswith("config_fail")}
    assert rejected and max(rejected.values()) > 0, rejected
    # Fixed: the next process's version is accepted.
    cp.stop()
    cp.start()
    cp.wait_applied(int(cp.status()["version"]))
    until_status(envoy, APP, late, 200)


def test_every_envoy_receives_changes_and_must_acknowledge(workdir, envoy, cp, owner, upstream):
    second = shipped_envoy(workdir / "envoy-2", cp, upstream.server_address[1], node="e2e-envoy-2").start()
    try:
        poll(lambda: any(e["node"] == "e2e-envoy-2" and e.get("ackedVersion") for e in cp.status()["envoys"]),
             15, "second Envoy ACK")
        r = create(envoy.port, owner, "everywhere", "viewer")
        secret = r.json()["apiToken"]["secret"]
        st = cp.wait_applied(version_of(r))
        connected = [e for e in st["envoys"] if e["connected"]]
        assert {e["node"] for e in connected} >= {envoy.node, "e2e-envoy-2"}
        assert all(int(e["enforcedVersion"]) >= version_of(r) for e in connected)
        until_status(second, APP, secret, 200)
        r = envoy.get(tokens_path(token="everywhere"), owner, method="DELETE")
        until_status(second, APP, secret, 401)
        until_status(envoy, APP, secret, 401)
    finally:
        second.stop()
    poll(lambda: not envoy_status(cp, "e2e-envoy-2")["connected"], 10, "disconnect recorded")
