"""Every request of variants.py, with a viewer's, an editor's and an owner's
token, through the shipped Envoy to each real router: whatever route the
router ran must be one the token's role permits in the token's namespace."""

from __future__ import annotations

import json

import pytest
import yaml

import oracle
import variants
from testkit.clients import ConnectionClosed, RawH1, RawH2, StreamReset
from routers import OUTCOMES, REACHED, ROLES, SHIPPED, UPSTREAM_HEADER, UPSTREAMS

VARIANTS = variants.all_variants()


class Connections:
    """One HTTP/1.1 and one HTTP/2 connection, reopened when Envoy closes one
    (it does after a request it refuses as malformed)."""

    def __init__(self, envoy):
        self.envoy = envoy
        self.open: dict[str, RawH1 | RawH2] = {}

    def send(self, proto: str, variant: variants.Variant, headers: list[tuple[str, str]]):
        for attempt in (1, 2):
            conn = self.open.get(proto)
            if conn is None or conn.closed:
                conn = self.open[proto] = RawH1(self.envoy) if proto == "h1" else RawH2(self.envoy)
            try:
                return conn.request(variant.method, variant.path, headers, body=variant.body)
            except (ConnectionClosed, StreamReset, ConnectionResetError, BrokenPipeError):
                conn.close()
                self.open.pop(proto, None)
                if attempt == 2:
                    return None
        return None

    def close(self):
        for conn in self.open.values():
            conn.close()


def route_that_ran(resp) -> tuple[str, str, str] | None:
    """(route, method, namespace) when the request reached a router and a
    route ran; None when it did not reach one, or no route ran there."""
    if resp is None or "x-envoy-upstream-service-time" not in resp.headers:
        return None
    route = resp.headers.get("x-route")
    assert route is not None, f"an upstream answer without x-route: {resp.status_code} {resp.content[:200]!r}"
    if route == "-":
        return None
    return route, resp.headers["x-route-method"], resp.headers["x-route-ns"]


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("upstream", list(UPSTREAMS))
def test_every_route_that_ran_is_permitted(envoy, tokens, upstream, role):
    token = tokens[role]
    conns = Connections(envoy)
    violations: list[str] = []
    reached = REACHED.setdefault(upstream, [0, 0])
    ran_permitted = 0
    try:
        for i, variant in enumerate(VARIANTS):
            proto = ("h1", "h2")[i % 2]
            headers = [(UPSTREAM_HEADER, upstream), ("authorization", token.authorization), *variant.headers]
            resp = conns.send(proto, variant, headers)
            if resp is not None and resp.status_code >= 500 and "x-envoy-upstream-service-time" not in resp.headers:
                # The gateway itself failed (a trapped VM answers 503): fail closed, but never silently.
                violations.append(f"{variant} over {proto}: Envoy answered {resp.status_code}")
                OUTCOMES.append((upstream, role, variant.label, False))
                continue
            if resp is not None and "x-envoy-upstream-service-time" in resp.headers:
                reached[0] += 1
            ran = route_that_ran(resp)
            why = None
            if ran is not None:
                reached[1] += 1
                why = oracle.judge(role, token.namespace, *ran)
                ran_permitted += why is None
            if why is not None:
                route, method, ns = ran
                violations.append(f"{variant} over {proto} as {role}: ran {route} as {method} in {ns!r}: {why}")
            OUTCOMES.append((upstream, role, variant.label, why is None))
    finally:
        conns.close()
    assert not violations, f"{len(violations)} requests ran a route the token may not run:\n" + "\n".join(
        violations[:40])
    # The suite has teeth only if permitted requests do reach the routes.
    assert ran_permitted >= 50, f"only {ran_permitted} requests ran a route at {upstream} as {role}"


def test_envoy_under_test_is_the_shipped_one(envoy):
    """The connection manager and the filter's settings are envoy/envoy.yaml's:
    only routes, clusters, access log and tokens differ."""
    shipped = yaml.safe_load(SHIPPED.read_text())
    running = json.loads(envoy.config_path.read_text())

    def hcm(config):
        return config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]

    def settings(h):
        return {k: v for k, v in h.items() if k not in ("route_config", "access_log", "http_filters")}

    assert settings(hcm(running)) == settings(hcm(shipped))

    def plugin(h):
        config = h["http_filters"][0]["typed_config"]["config"]
        return {k: v for k, v in json.loads(config["configuration"]["value"]).items() if k != "tokens"}, {
            k: v for k, v in config.items() if k not in ("configuration", "vm_config")}

    assert plugin(hcm(running)) == plugin(hcm(shipped))
    assert [f["name"] for f in hcm(running)["http_filters"]] == [f["name"] for f in hcm(shipped)["http_filters"]]
