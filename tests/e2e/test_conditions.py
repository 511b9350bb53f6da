"""Conditions on a token: from when (`notBeforeTime`) and from where
(`clientAddresses`), checked by the filter against the clock and against the
client address Envoy determined: the connection's peer, or the
`X-Forwarded-For` hop Envoy's own settings select. The filter never reads
that header itself."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import httpx
import pytest

from testkit.checks import allowed, counters, denied
from testkit.clients import next_e2e_id
from testkit.harness import Token, plugin_config, poll
from testkit.timing import limit

PATH = "/api/v1/namespaces/default/deployments"


def dual_stack(config: dict, trusted_hops: int = 0, remote_address: bool = True) -> None:
    """The listener on [::] for IPv4 and IPv6 alike; `trusted_hops` proxies
    in front whose X-Forwarded-For Envoy trusts; `remote_address`: the
    connection manager's `use_remote_address` (the harness sets true)."""
    listener = config["static_resources"]["listeners"][0]
    listener["address"]["socket_address"].update({"address": "::", "ipv4_compat": True})
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    if trusted_hops:
        hcm["xff_num_trusted_hops"] = trusted_hops
    hcm["use_remote_address"] = remote_address


class From:
    """Requests from one local address (127.0.0.x or ::1) to an Envoy."""

    def __init__(self, envoy, address: str, proto: str):
        # To Envoy's listener in the peer's family, from the peer's address.
        host = "[::1]" if ":" in address else "127.0.0.1"
        transport = httpx.HTTPTransport(http1=proto == "h1", http2=proto == "h2", local_address=address)
        self.envoy = envoy
        self.proto = proto
        self.http = httpx.Client(base_url=f"http://{host}:{envoy.port}", transport=transport,
                                 timeout=limit(10.0), trust_env=False)

    def get(self, token: Token, path: str = PATH, headers: dict | None = None) -> httpx.Response:
        e2e_id = next_e2e_id()
        resp = self.http.get(path, headers={"x-e2e-id": e2e_id, "authorization": token.authorization,
                                            **(headers or {})})
        assert resp.http_version == ("HTTP/2" if self.proto == "h2" else "HTTP/1.1")
        resp.e2e_id = e2e_id
        resp.envoy = self.envoy
        return resp

    def close(self) -> None:
        self.http.close()


@pytest.fixture
def clients():
    opened: list[From] = []

    def open_(envoy, address: str, proto: str) -> From:
        c = From(envoy, address, proto)
        opened.append(c)
        return c

    yield open_
    for c in opened:
        c.close()


def rfc3339(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def test_not_before_time(start_envoy, clients, proto):
    now = datetime.now(timezone.utc)
    later = Token("default", "later", "editor", not_before_time="2098-01-01T00:00:00Z")
    began = Token("default", "began", "editor", not_before_time=rfc3339(now - timedelta(seconds=1)))
    # Valid a few seconds from now: refused, then admitted from that
    # instant on, by the gateway's clock (this machine's).
    start = now + timedelta(seconds=limit(3))
    soon = Token("default", "soon", "editor", not_before_time=rfc3339(start))
    envoy = start_envoy(plugin_config([later, began, soon]), name="not-before")
    c = clients(envoy, "127.0.0.1", proto)
    denied(c.get(later), "not_yet_valid", secret=later.secret)
    allowed(c.get(began), began)
    sent = time.time()
    first = c.get(soon)
    if time.time() < start.timestamp():
        denied(first, "not_yet_valid", secret=soon.secret)
    admitted = poll(lambda: (r := c.get(soon)).status_code == 200 and r, 10, "the not-before time to pass")
    # The gateway decided before its answer came back: an admission answered
    # before the instant came early (the exact boundary, to the nanosecond,
    # is the core's gate test).
    assert time.time() >= start.timestamp(), "admitted before its notBeforeTime"
    assert sent < start.timestamp(), "the test started too late to see a refusal"
    allowed(admitted, soon)
    assert counters(envoy)["not_yet_valid"] >= 1


def test_client_addresses_from_the_connection(start_envoy, clients, proto):
    """IPv4 and IPv6 peers, inside, outside and excepted; an X-Forwarded-For the
    client sets changes nothing (no trusted hop)."""
    v4 = Token("default", "lan", "editor",
               client_addresses={"allow": ["127.0.0.0/24"], "except": ["127.0.0.9"]})
    v6 = Token("default", "v6", "editor", client_addresses={"allow": ["::1/128"]})
    anywhere_but = Token("default", "not-nine", "viewer", client_addresses={"except": ["127.0.0.9/32", "::1"]})
    envoy = start_envoy(plugin_config([v4, v6, anywhere_but]), name="addresses", configure=dual_stack)
    inside = clients(envoy, "127.0.0.1", proto)
    excepted = clients(envoy, "127.0.0.9", proto)
    outside = clients(envoy, "127.0.1.1", proto)
    ipv6 = clients(envoy, "::1", proto)

    allowed(inside.get(v4), v4)
    denied(excepted.get(v4), "address_denied", secret=v4.secret)
    denied(outside.get(v4), "address_denied", secret=v4.secret)
    denied(ipv6.get(v4), "address_denied", secret=v4.secret)

    allowed(ipv6.get(v6), v6)
    denied(inside.get(v6), "address_denied", secret=v6.secret)

    allowed(outside.get(anywhere_but), anywhere_but)
    denied(excepted.get(anywhere_but), "address_denied")
    denied(ipv6.get(anywhere_but), "address_denied")

    # A client's own X-Forwarded-For names an allowed address: Envoy, with no
    # trusted hop, uses the connection's, and so does the filter.
    spoofed = {"x-forwarded-for": "127.0.0.1"}
    denied(excepted.get(v4, headers=spoofed), "address_denied", secret=v4.secret)
    denied(inside.get(v6, headers={"x-forwarded-for": "::1"}), "address_denied")
    assert counters(envoy)["address_denied"] == 8


def test_client_addresses_behind_a_trusted_proxy(start_envoy, clients, proto):
    """Behind one trusted proxy (xff_num_trusted_hops: 1) the client is the
    address that proxy appended to X-Forwarded-For: what a client writes
    before it is not believed."""
    office = Token("default", "office", "editor",
                   client_addresses={"allow": ["203.0.113.0/24", "2001:db8::/32"], "except": ["203.0.113.66"]})
    envoy = start_envoy(plugin_config([office]), name="trusted-hop",
                        configure=lambda config: dual_stack(config, trusted_hops=1))
    proxy = clients(envoy, "127.0.0.1", proto)

    def via_proxy(*hops: str) -> httpx.Response:
        return proxy.get(office, headers={"x-forwarded-for": ", ".join(hops)})

    allowed(via_proxy("203.0.113.7"), office)
    allowed(via_proxy("2001:db8::7"), office)
    denied(via_proxy("198.51.100.7"), "address_denied", secret=office.secret)
    denied(via_proxy("203.0.113.66"), "address_denied", secret=office.secret)
    # The client wrote an office address itself; the proxy appended where it
    # really came from.
    denied(via_proxy("203.0.113.7", "198.51.100.7"), "address_denied", secret=office.secret)
    allowed(via_proxy("198.51.100.7", "203.0.113.7"), office)
    # Without the proxy's hop, the connection's own address decides.
    denied(proxy.get(office), "address_denied", secret=office.secret)


def test_envoys_default_trusts_the_last_forwarded_hop(start_envoy, clients, proto):
    """With `use_remote_address: false` (Envoy's default, never in the shipped
    configurations) Envoy assumes a proxy in front of it and takes the last
    X-Forwarded-For address as the client's. The filter follows Envoy: this is
    on record because it makes address conditions only as good as the hop in
    front (docs/security.md)."""
    office = Token("default", "office", "editor", client_addresses={"allow": ["203.0.113.0/24"]})
    envoy = start_envoy(plugin_config([office]), name="default-xff",
                        configure=lambda config: dual_stack(config, remote_address=False))
    c = clients(envoy, "127.0.0.1", proto)
    allowed(c.get(office, headers={"x-forwarded-for": "198.51.100.7, 203.0.113.7"}), office)
    denied(c.get(office, headers={"x-forwarded-for": "203.0.113.7, 198.51.100.7"}), "address_denied")
    denied(c.get(office), "address_denied", secret=office.secret)
