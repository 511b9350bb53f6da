"""Where a token was used from: each filter VM reads the client address of a
token's first request in a report interval (Envoy's `source.address`), its
usage report carries it, and the control plane keeps the last five distinct
addresses of each token with when each was last seen, shown by the API."""

from __future__ import annotations

import time

import pytest

from testkit.clients import request
from testkit.controlplane import APP, create, reporting_plane, stop_reporting_plane, tokens_path
from testkit.harness import poll, remember_secret

NODE = "addresses-envoy"


@pytest.fixture(scope="module")
def plane(workdir, upstream):
    """A control plane whose filters report usage every second, and its
    Envoy on the shipped configuration with a JSON access log."""
    cp = reporting_plane(workdir, upstream, "cp-addresses", NODE)
    yield cp
    stop_reporting_plane(cp)


def last_addresses(plane, token_id: str) -> list[str]:
    """The token's last addresses as the owner reads them, straight from the
    control plane."""
    r = plane.api("GET", tokens_path(token=token_id), plane.owner)
    assert r.status == 200, r
    return [a["address"] for a in r.json()["apiToken"].get("lastAddresses", [])]


def issue(plane, token_id: str) -> str:
    r = create(plane.api_port, plane.owner, token_id, "viewer")
    assert r.status == 200, r
    return remember_secret(r.json()["apiToken"]["secret"])


def used_from(plane, secret: str, source: str) -> None:
    r = request(plane.envoy.port, "GET", APP, secret, source=source)
    assert r.status == 200, r


def test_the_last_addresses_after_traffic_from_several_sources(plane):
    secret = issue(plane, "roaming")
    assert last_addresses(plane, "roaming") == []
    # One source at a time (a VM reads a token's address on its first
    # request of each one-second interval), each waited for.
    for n, source in enumerate(["127.0.0.2", "127.0.0.3", "127.0.0.4"]):
        used_from(plane, secret, source)
        got = poll(lambda: (a := last_addresses(plane, "roaming")) and source in a and a, 15,
                   f"{source} in the token's last addresses")
        # Each address once (the latest minute first; within a minute, in
        # address order).
        assert len(got) == len(set(got)) == n + 1, got
    assert sorted(got) == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    # Seen again: still once. (Waited for: the report that carries it, then
    # two of the control plane's one-second writes.)
    reported = plane.metrics()["apitokens_usage_report_digests_total"]
    used_from(plane, secret, "127.0.0.2")
    poll(lambda: plane.metrics()["apitokens_usage_report_digests_total"] > reported, 15, "the use reported")
    time.sleep(2.5)
    assert sorted(last_addresses(plane, "roaming")) == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    view = plane.api("GET", tokens_path(token="roaming"), plane.owner).json()["apiToken"]
    assert all(set(a) == {"address", "lastSeenTime"} and a["lastSeenTime"].endswith(":00Z")
               for a in view["lastAddresses"]), view
    # Another token has its own.
    other = issue(plane, "homebody")
    used_from(plane, other, "127.0.0.7")
    poll(lambda: last_addresses(plane, "homebody") == ["127.0.0.7"], 15, "the other token's address")
    assert "127.0.0.7" not in last_addresses(plane, "roaming")
