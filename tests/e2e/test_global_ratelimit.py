"""One limit per token across gateways: the filter chain of
envoy/envoy-global-ratelimit.yaml (apitokens, then Envoy's global rate-limit
filter) against a stand-in rate-limit service (testkit.ratelimit): the
descriptor Envoy sends names the token the filter authenticated, never one a
client names, a refused request asks the service nothing, and past the limit
Envoy answers 429 with the `x-ratelimit-*` headers. The shipped file itself goes
through `envoy --mode validate`; envoyproxy/ratelimit is not run here."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from testkit import harness
from testkit.checks import allowed, denied
from testkit.clients import Client
from testkit.harness import Token, plugin_config
from testkit.ratelimit import RateLimitService

REPO = Path(__file__).resolve().parents[2]
PATH = "/api/v1/namespaces/default/deployments"
LIMIT = 3


def test_the_shipped_configuration_validates():
    out = harness.validate(REPO / "envoy" / "envoy-global-ratelimit.yaml")
    assert out.returncode == 0, f"envoy --mode validate:\n{out.stdout[-3000:]}{out.stderr[-3000:]}"
    # envoyproxy/ratelimit's side, for shape: the domain and the two keys
    # the route sends.
    # The order that makes the descriptor the filter's: apitokens first (it
    # sets or removes the identity headers), then the rate limit.
    shipped = yaml.safe_load((REPO / "envoy" / "envoy-global-ratelimit.yaml").read_text())
    hcm = shipped["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert [f["name"] for f in hcm["http_filters"]] == [
        "envoy.filters.http.wasm", "envoy.filters.http.ratelimit", "envoy.filters.http.router"]
    service = yaml.safe_load((REPO / "envoy" / "ratelimit-service.yaml").read_text())
    assert service["domain"] == "apitokens"
    assert {d["key"] for d in service["descriptors"]} == {"namespace"}
    assert all(inner["key"] == "token" for d in service["descriptors"] for inner in d["descriptors"])


def shipped_chain(config: dict, rls_port: int) -> None:
    """The shipped file's rate-limit filter, route actions and cluster, on
    the harness's bootstrap (its own listener, upstream and access log)."""
    shipped = yaml.safe_load((REPO / "envoy" / "envoy-global-ratelimit.yaml").read_text())
    shipped_hcm = shipped["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    ratelimit = next(f for f in shipped_hcm["http_filters"] if f["name"] == "envoy.filters.http.ratelimit")
    actions = shipped_hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"]["rate_limits"]
    cluster = next(c for c in shipped["static_resources"]["clusters"] if c["name"] == "ratelimit")
    cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"][
        "port_value"] = rls_port
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"].insert(-1, ratelimit)
    hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"]["rate_limits"] = actions
    config["static_resources"]["clusters"].append(cluster)


@pytest.fixture
def rls():
    service = RateLimitService(LIMIT)
    yield service
    service.close()


def test_a_token_past_its_limit_gets_429_from_its_own_bucket(start_envoy, rls, proto):
    ci = Token("default", "ci", "editor")
    other = Token("default", "other", "viewer")
    envoy = start_envoy(plugin_config([ci, other]), name="global-ratelimit",
                        configure=lambda config: shipped_chain(config, rls.port))
    c = Client(envoy, proto)
    try:
        for _ in range(LIMIT):
            allowed(c.get(PATH, token=ci), ci)
        over = c.get(PATH, token=ci)
        assert over.status_code == 429, over.text
        assert over.headers["x-ratelimit-limit"].startswith(str(LIMIT)), over.headers
        assert over.headers["x-ratelimit-remaining"] == "0", over.headers
        assert over.headers["x-ratelimit-reset"] == "60", over.headers
        assert envoy.upstream.find("x-e2e-id", over.e2e_id) == []
        # The descriptor names the authenticated token, in its namespace.
        domain, descriptors = rls.requests[0]
        assert domain == "apitokens"
        assert descriptors == [(("namespace", "default"), ("token", ci.name))]
        # Another token has its own bucket, even when its client writes the
        # first one's name in the identity headers (the filter replaces them).
        spoof = {"x-apitoken-name": ci.name, "x-apitoken-namespace": "default"}
        allowed(c.get(PATH, token=other, headers=spoof), other)
        assert rls.requests[-1][1] == [(("namespace", "default"), ("token", other.name))]
        # A refused request never reaches the rate-limit filter, whatever
        # identity headers its client wrote.
        asked = len(rls.requests)
        denied(c.get(PATH, authorization="Bearer not-a-token", headers=spoof), "unknown")
        assert len(rls.requests) == asked
    finally:
        c.close()
