"""A configuration Envoy rejects (NACK), under load: the last good
configuration stays enforced, the rejection is visible in /status (and the
version never reported as applied), and a revocation made meanwhile still
reaches every worker by the delta channel (its VMs reconnect to the
restarted control plane and catch up), though the write is not reported
applied until Envoy accepts a configuration again. (The NACK of a new token
is in tests/cp/test_2_resilience.py; this is the revocation case.)"""

from __future__ import annotations

import time

from testkit.clients import request
from testkit.controlplane import APP, issue, revision_of, tokens_path, version_of
from testkit.harness import poll
from testkit.load import Load, bad_answers, summary

BAD_MODULE = "/nonexistent/apitokens_filter.wasm"


def test_nack_keeps_the_last_good_configuration(cp, envoy, rng, figures):
    owner = cp.owners["default"]
    kept = issue(cp, "nack-kept", "viewer")
    doomed = issue(cp, "nack-doomed", "editor")
    # The snapshot Envoy holds (acknowledged on this stream, or reported when it
    # reconnected); its VMs may be further on, by the delta channel.
    st = poll(lambda: (s := cp.envoy_status(envoy.name)).get("connected") and s, 10, "the Envoy's stream")
    good = int(st["ackedVersion"]) if st.get("ackedVersion") else revision_of(st["initialVersion"])
    choices = [kept, doomed, None]

    with Load(envoy, lambda: rng.choice(choices), threads=4, max_seconds=40) as load:
        time.sleep(1.0)  # load on the last good configuration first
        restarts = [time.time()]
        cp.stop()
        cp.start("--wasm-module", BAD_MODULE)  # every version it pushes is rejected
        before_revocation = time.time()
        r = cp.api("DELETE", tokens_path(token="nack-doomed"), owner)
        assert r.status == 200, r
        revoked_version = version_of(r)

        def nack():
            last = cp.envoy_status(envoy.name).get("lastNack") or {}
            return last if last.get("version") == str(revoked_version) else None

        last_nack = poll(nack, 10, "NACK of the revoking version")
        assert BAD_MODULE in last_nack["error"] and last_nack["outcome"] == "NACK"
        assert cp.status(revoked_version, 0.5)["applied"] is False, "a NACKed version reported as applied"
        # This stream acknowledged nothing; Envoy reported the good version it keeps.
        assert "ackedVersion" not in cp.envoy_status(envoy.name)
        # (That version, or a background snapshot that came after it.)
        assert revision_of(cp.envoy_status(envoy.name)["initialVersion"]) >= good
        # The revocation is in force all the same: the delta channel carries it
        # to the VMs, which still run the last good configuration.
        poll(lambda: request(envoy.port, "GET", APP, doomed).status == 401, 10, "the revocation by the delta channel")
        refused_at = time.time()
        time.sleep(1.0)

        restarts.append(time.time())
        cp.stop()
        cp.start()  # a configuration Envoy accepts
        t0 = time.monotonic()
        cp.wait_applied(int(cp.status()["version"]))
        applied_at = time.time()
        fixed_after = time.monotonic() - t0
        time.sleep(0.5)
    samples = load.samples

    # A worker whose delta stream reconnects after a sibling caught up with
    # the revocation refuses what it would admit, fail-closed, until it has
    # (503, `catching_up`): only within a moment of a restart.
    catching_up = [s for s in samples if s.status == 503]
    assert all(any(t <= s.sent < t + 3.0 for t in restarts) for s in catching_up), catching_up[:5]
    assert all(s.secret is not None for s in catching_up), "a request its table refuses is refused, not 503"
    samples = [s for s in samples if s.status != 503]
    assert bad_answers(samples) == []
    assert all(s.status == 200 for s in samples if s.secret == kept)
    assert all(s.status == 401 for s in samples if s.secret is None)
    during = [s for s in samples if s.secret == doomed and s.answered < before_revocation]
    assert during and all(s.status == 200 for s in during)
    refused = [s for s in samples if s.secret == doomed and s.sent > refused_at]
    assert refused and all(s.status == 401 for s in refused), "revoked, refused once, then allowed again"
    after = [s for s in samples if s.secret == doomed and s.sent > applied_at]
    assert after and all(s.status == 401 for s in after), "revoked, and acknowledged, yet allowed"
    stats = envoy.stats()
    assert stats.get("extension_config_discovery.http_filter.apitokens.config_fail", 0) > 0
    figures["NACK"] = (f"{len(samples)} requests {summary(samples)}, last good configuration enforced while "
                       f"NACKed, /status applied=false, {len(catching_up)} refused (503) while a worker caught "
                       f"up after a restart, the revocation enforced by the delta channel "
                       f"{refused_at - before_revocation:.2f} s after it was sent; accepted again "
                       f"{fixed_after:.2f} s after the fix")
