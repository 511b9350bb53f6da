"""The control plane is killed while Envoy serves a steady load over HTTP/1.1
and HTTP/2: Envoy keeps enforcing the last configuration it acknowledged,
revocations and regenerations included; a change made to the store while the
control plane is away (a bootstrap) reaches Envoy when it returns.
(tests/cp/test_2_resilience.py checks the single-request version of this.)"""

from __future__ import annotations

import signal
import time

from testkit.clients import request
from testkit.controlplane import APP, issue, issued_secret, tokens_path, version_of
from testkit.harness import poll
from testkit.load import Load, bad_answers, summary

DOWN_SECONDS = 2.0


def test_envoy_enforces_while_the_control_plane_is_away_and_converges(cp, envoy, rng, figures):
    owner = cp.owners["default"]
    kept = issue(cp, "down-kept", "editor")
    revoked = issue(cp, "down-revoked", "viewer")
    r = cp.api("DELETE", tokens_path(token="down-revoked"), owner)
    cp.wait_applied(version_of(r))
    old = issue(cp, "down-rotated", "owner")
    r = cp.api("POST", tokens_path(token="down-rotated:regenerate"), owner)
    new = issued_secret(r)
    cp.wait_applied(version_of(r))
    expected = {kept: 200, revoked: 401, old: 401, new: 200, None: 401}
    choices = list(expected)

    with Load(envoy, lambda: rng.choice(choices), threads=4, max_seconds=30) as load:
        time.sleep(0.3)
        cp.stop(signal.SIGKILL)
        down_at = time.time()
        late = cp.bootstrap("default", "down-late")  # the store changes while serve is away
        time.sleep(DOWN_SECONDS)
        assert request(envoy.port, "GET", APP, late).status == 401, "Envoy cannot know it yet"
        up_at = time.time()
        cp.start()
        poll(lambda: request(envoy.port, "GET", APP, late).status == 200, 15, "the late token in Envoy")
        converged = time.time() - up_at
        time.sleep(0.3)
    samples = load.samples

    # A VM whose delta stream reconnects after a sibling's caught up with the
    # store changes made while away refuses, fail-closed, until it has too
    # (503, `catching_up`): briefly, right after the restart, never later.
    catching_up = [s for s in samples if s.status == 503]
    assert all(up_at <= s.sent and s.answered < up_at + converged + 1.0 for s in catching_up), catching_up[:5]
    samples = [s for s in samples if s.status != 503]
    assert bad_answers(samples) == []
    wrong = [s for s in samples if s.status != expected[s.secret]]
    assert wrong == [], f"{len(wrong)} answers differ from the last acknowledged configuration: {wrong[:5]}"
    during = [s for s in samples if down_at < s.sent and s.answered < up_at]
    assert len(during) > 50, "too few requests while the control plane was away"
    for secret, status in expected.items():
        assert request(envoy.port, "GET", APP, secret).status == status
    # Its VMs (delta channel) or its ECDS stream: it enforces the latest.
    version = cp.status()["version"]
    poll(lambda: cp.envoy_status(envoy.name).get("enforcedVersion") == version, 10, "the Envoy at the latest version")
    figures["control plane down"] = (
        f"{len(during)} requests in {DOWN_SECONDS:.0f} s down, {len(samples)} in all {summary(samples)}, "
        f"{len(catching_up)} refused (503) while a worker caught up after the restart, "
        f"all as last acknowledged; a store change made while down enforced {converged:.2f} s after restart")
