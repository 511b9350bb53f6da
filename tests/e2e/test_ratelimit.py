"""A token's request rate limit (`rateLimit`), enforced by each gateway exactly
across all of its Envoy's workers: the filter keeps each limited token's state
in proxy-wasm shared data and updates it with compare-and-swap.

Envoy runs 4 workers here, and the listener hands connections to them in turn
(`exact_balance`), so the clients' connections land on every worker; the test
checks from Envoy's own per-worker stats that they did."""

from __future__ import annotations

import json
import re
import threading
import time

import pytest

from testkit.checks import allowed, counters, denied
from testkit.clients import Client
from testkit.harness import Token, plugin_config

PATH = "/api/v1/namespaces/default/deployments"
WORKERS = 4
# Two connections per worker.
CONNECTIONS = 2 * WORKERS


def balanced(config: dict) -> None:
    """Connections spread evenly over the workers (Envoy would otherwise let
    whichever worker accepts first take them all)."""
    config["static_resources"]["listeners"][0]["connection_balance_config"] = {"exact_balance": {}}


def workers_used(envoy) -> int:
    """How many of Envoy's workers accepted a connection on the listener."""
    per_worker = re.compile(r"listener\.[^ ]*\.worker_(\d+)\.downstream_cx_total")
    return sum(1 for name, n in envoy.stats().items() if per_worker.fullmatch(name) and n > 0)


def send_for(envoy, proto: str, token: Token, seconds: float) -> tuple[list, float]:
    """Every connection sends the token's requests back to back for `seconds`;
    returns each response (in no order) and the time from the first request
    sent to the last answer."""
    clients = [Client(envoy, proto) for _ in range(CONNECTIONS)]
    responses: list = []
    lock = threading.Lock()
    start = threading.Barrier(CONNECTIONS + 1)

    def run(client: Client) -> None:
        start.wait()
        mine = []
        while time.monotonic() < deadline:
            mine.append(client.get(PATH, token=token))
        with lock:
            responses.extend(mine)

    threads = [threading.Thread(target=run, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    deadline = time.monotonic() + seconds
    began = time.monotonic()
    start.wait()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - began
    for c in clients:
        c.close()
    return responses, elapsed


@pytest.fixture
def limited_envoy(start_envoy):
    # A burst of a second's worth: a stall of the clients (or of this
    # machine) shorter than that loses them no admission.
    fast = Token("default", "fast", "editor", rate_limit={"requests": 40, "per": "second", "burst": 40})
    slow = Token("default", "slow", "viewer", rate_limit={"requests": 2, "per": "minute", "burst": 3})
    free = Token("default", "free", "editor")
    envoy = start_envoy(plugin_config([fast, slow, free]), name="rate-limit", configure=balanced,
                        concurrency=WORKERS)
    return envoy, fast, slow, free


def test_a_burst_over_the_limit_is_answered_429_with_when_to_retry(limited_envoy, proto):
    envoy, _, slow, free = limited_envoy
    c = Client(envoy, proto)
    try:
        # Requests the role refuses are not counted (and say so, not 429).
        for _ in range(4):
            denied(c.get("/namespaces/v1/namespaces/default", token=slow), "role_denied")
        # The burst of 3 passes at once; then nothing for 30 s (2 a minute).
        for _ in range(3):
            allowed(c.get(PATH, token=slow), slow)
        refused = c.get(PATH, token=slow)
        body = denied(refused, "rate_limited", secret=slow.secret, required_role=None)
        assert body["code"] == 429
        retry = int(refused.headers["retry-after"])
        assert 28 <= retry <= 30, refused.headers
        # The IETF RateLimit fields (draft-ietf-httpapi-ratelimit-headers-10):
        # the policy, and nothing remaining until the reset.
        assert refused.headers.get_list("ratelimit-policy") == ['"token";q=2;w=60']
        assert refused.headers.get_list("ratelimit") == [f'"token";r=0;t={retry}']
        # Another token has its own budget, none here.
        for _ in range(5):
            allowed(c.get(PATH, token=free), free)
    finally:
        c.close()
    assert counters(envoy)["rate_limited"] == 1


def test_the_rate_holds_across_workers_for_ten_seconds(limited_envoy, proto):
    envoy, fast, _, _ = limited_envoy
    responses, elapsed = send_for(envoy, proto, fast, 10.0)
    codes = [r.status_code for r in responses]
    admitted = codes.count(200)
    assert set(codes) <= {200, 429}, sorted(set(codes))
    assert workers_used(envoy) == WORKERS, "the connections did not reach every worker"
    # GCRA admits the burst, then one request per interval: over the window
    # the clients saw, at most burst + rate × elapsed (+1 for the request
    # that lands on the window's last instant).
    expected = 40 + 40 * elapsed
    assert codes.count(429) > admitted, f"the clients did not press the limit: {admitted} of {len(codes)}"
    assert admitted <= expected + 1, f"{admitted} admitted in {elapsed:.2f} s, at most {expected:.0f}"
    assert admitted >= 0.95 * expected, f"{admitted} admitted in {elapsed:.2f} s, expected {expected:.0f}"
    # Every refusal says when to retry, within the second (40 a second).
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.headers["retry-after"] == "1"
    assert json.loads(refused.content)["code"] == 429
    stats = counters(envoy)
    assert stats["rate_limited"] == codes.count(429)
    assert stats["allowed"] == admitted
