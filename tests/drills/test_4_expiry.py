"""A token expires while it is in use: the filter refuses it from its
expireTime on, by itself. The control plane is killed before the expiry, so no
configuration can be pushed (it would otherwise publish a version without the
token at that moment); Envoy's ECDS reload counter proves none arrived."""

from __future__ import annotations

import math
import signal
import time

from testkit.controlplane import create, version_of
from testkit.harness import rfc3339
from testkit.load import Load, bad_answers

LEAD = 3  # seconds from the token's creation to its expiry
RELOADS = "extension_config_discovery.http_filter.apitokens.config_reload"


def test_token_expiring_mid_load_is_refused_from_that_instant_without_a_push(cp, envoy, rng, figures):
    steady = create(cp.api_port, cp.owners["default"], "expiry-steady", "viewer")
    expire_at = math.ceil(time.time()) + LEAD
    r = create(cp.api_port, cp.owners["default"], "expiry-mid-load", "editor", expireTime=rfc3339(expire_at))
    assert r.status == 200 and steady.status == 200
    cp.wait_applied(version_of(r))
    expiring, lasting = r.json()["apiToken"]["secret"], steady.json()["apiToken"]["secret"]
    cp.stop(signal.SIGKILL)
    reloads = envoy.stats().get(RELOADS)
    try:
        with Load(envoy, lambda: rng.choice([expiring, expiring, lasting]), threads=4,
                  max_seconds=LEAD + 5) as load:
            while time.time() < expire_at + 1.5:
                time.sleep(0.05)
    finally:
        cp.start()
    samples = load.samples
    assert envoy.stats().get(RELOADS) == reloads, "a configuration was pushed: the test proves nothing"

    assert bad_answers(samples) == []
    assert all(s.status == 200 for s in samples if s.secret == lasting)
    mine = [s for s in samples if s.secret == expiring]
    before = [s for s in mine if s.answered < expire_at]
    after = [s for s in mine if s.sent >= expire_at]
    assert len(before) > 20 and len(after) > 20, "too few requests around the expiry"
    assert all(s.status == 200 for s in before), [s for s in before if s.status != 200][:3]
    late = [s for s in after if s.status != 401]
    assert late == [], f"accepted after its expireTime: {[(round(s.sent - expire_at, 4), s.status) for s in late]}"
    straddling = [s for s in mine if s.sent < expire_at <= s.answered]
    first_401 = min(s.sent for s in mine if s.status == 401) - expire_at
    figures["expiry mid-load"] = (
        f"{len(before)} requests allowed before expireTime, {len(after)} refused after it "
        f"(first refusal sent {first_401 * 1000:+.1f} ms from it; {len(straddling)} in flight across it), "
        f"no configuration pushed")
