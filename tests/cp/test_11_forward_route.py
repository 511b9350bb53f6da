"""The owner's bearer token follows the route to the control plane, not a
path: the shipped configuration (envoy/envoy-ecds.yaml and the control
plane's built-in plugin configuration) keeps `Authorization` for the token
API only when the route sends it to the `apitokens_api` cluster. A route
that sends `/apitokens/...` (any spelling) to another service, as a second
virtual host or an operator's own route would, never receives the secret."""

from __future__ import annotations

import uuid

import pytest

from testkit.controlplane import hcm_of, shipped_envoy, tokens_path
from testkit.harness import poll


def elsewhere(config: dict) -> None:
    """A route before the shipped ones: requests marked `x-route: elsewhere`
    go to the application's upstream, whatever their path."""
    routes = hcm_of(config)["route_config"]["virtual_hosts"][0]["routes"]
    routes.insert(0, {"match": {"prefix": "/", "headers": [{"name": "x-route", "string_match": {"exact": "elsewhere"}}]},
                      "route": {"cluster": "upstream", "timeout": "15s"}})


@pytest.fixture(scope="module")
def routed(workdir, cp, upstream):
    envoy = shipped_envoy(workdir / "envoy-routes", cp, upstream.server_address[1], node="routes-envoy",
                          mutate=elsewhere).start()
    poll(lambda: cp.envoy_status("routes-envoy").get("ackedVersion"), 15, "first ACK")
    yield envoy
    envoy.stop()


@pytest.mark.parametrize("path", [tokens_path(), "/APITOKENS/v1/namespaces/default/apitokens",
                                  tokens_path(token="admin")])
def test_a_token_api_path_routed_elsewhere_loses_the_bearer(routed, cp, upstream, path):
    mark = str(uuid.uuid4())
    r = routed.get(path, cp.owner, headers={"x-route": "elsewhere", "x-mark": mark})
    assert r.status == 200, r
    seen = upstream.find("x-mark", mark)
    assert len(seen) == 1, seen
    names = [k for k, _ in seen[0]["raw_headers"]]
    assert "authorization" not in names, "the owner's secret reached another upstream"
    assert ("x-apitoken-role", "owner") in seen[0]["raw_headers"]


def test_the_token_api_itself_still_gets_it(routed, cp):
    # Through the shipped route to the control plane, which checks the token
    # again: the owner lists the tokens.
    r = routed.get(tokens_path(), cp.owner)
    assert r.status == 200 and "apiTokens" in r.json(), r
