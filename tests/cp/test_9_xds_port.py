"""No stranger on the xDS port amplifies memory or slows a write: a raw
HTTP/2 client opens as many ECDS streams as it can and never reads, while a
real Envoy is served and writes go on. Also: no FetchExtensionConfigs, no
plaintext xDS beyond loopback unless asked for.

The control plane's table is about 2 MB here (20k imported tokens), so a
copy of it per stream shows plainly in its resident memory."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import time

import httpx
import pytest
import h2.config
import h2.connection
import h2.settings

from testkit.controlplane import APP, ControlPlane, apitokens_bin, create, free_port, issued_secret, shipped_envoy
from testkit.harness import poll
from testkit.xds import FETCH_PATH, STREAM_PATH, discovery_request
from testkit.timing import limit

TOKENS = 20_000
CONNECTIONS = 20
STREAMS = 25
# HTTP/2 clients of the xDS port: read timeouts under the server's 30 s
# keepalive (its PINGs would keep a stalled call waiting for ever), and not
# scaled (testkit.timing): a stalled upload ends by this timeout.
XDS_CLIENT_TIMEOUT = 10
def rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class Flood:
    """Connections that open ECDS streams and never read a byte."""

    def __init__(self, port: int):
        self.port = port
        self.sockets: list[socket.socket] = []
        self.requested = 0

    def connect(self, streams: int, tag: str) -> None:
        sock = socket.create_connection(("127.0.0.1", self.port))
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        for i in range(streams):
            sid = conn.get_next_available_stream_id()
            conn.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":path", STREAM_PATH),
                                    (":authority", "xds"), ("content-type", "application/grpc"), ("te", "trailers")])
            conn.send_data(sid, discovery_request(f"flood-{tag}-{i}"))
            self.requested += 1
        try:
            sock.sendall(conn.data_to_send())
        except OSError:
            pass  # refused: closed at once
        self.sockets.append(sock)

    def close(self) -> None:
        for s in self.sockets:
            s.close()


@pytest.fixture(scope="module")
def big_plane(workdir, upstream):
    cp = ControlPlane(workdir / "cp-flood", name="cp-flood")
    owner = cp.bootstrap("default", "admin")
    spec = {"tokens": [{"name": f"namespaces/bulk/apitokens/t{i}", "role": "viewer",
                        "secretSha256": hashlib.sha256(f"bulk-{i}".encode()).hexdigest()} for i in range(TOKENS)]}
    bulk = workdir / "flood-tokens.json"
    bulk.write_text(json.dumps(spec))
    subprocess.run([apitokens_bin(), "import", "--db", str(cp.db), str(bulk)], check=True, capture_output=True,
                   timeout=limit(120))
    cp.start("--apply-timeout-ms", "1000", "--xds-max-connections-per-peer", "8")
    envoy = shipped_envoy(workdir / "envoy-flood", cp, upstream.server_address[1], node="gateway").start()
    poll(lambda: cp.envoy_status("gateway").get("ackedVersion"), 30, "first ACK")
    # Its VMs on the delta channel before the flood takes the other connections.
    poll(lambda: cp.envoy_status("gateway").get("delta"), 30, "every VM's delta stream")
    yield cp, envoy, owner
    envoy.stop()
    cp.stop()


def test_streams_that_never_read_cost_no_copy_and_hold_no_write(big_plane):
    cp, envoy, owner = big_plane
    before = rss_mib(cp.proc.pid)
    flood = Flood(cp.xds_port)
    try:
        for c in range(CONNECTIONS):
            flood.connect(STREAMS, str(c))
        # Everything the server will buffer for them is buffered by now.
        time.sleep(2.0)
        streams = sum(1 for e in cp.status()["envoys"] if e["node"].startswith("flood-") and e["connected"])
        grown = rss_mib(cp.proc.pid) - before
        # Bounded: 8 connections from one address (the Envoy holds one),
        # 16 streams each.
        assert 0 < streams <= 7 * 16, streams
        assert grown < 40, f"the control plane grew by {grown:.0f} MiB for {streams} streams that never read"

        # A write answers in normal time and the real Envoy enforces it;
        # the silent streams are named, not waited for (they have had their
        # --apply-timeout-ms of patience).
        started = time.monotonic()
        r = create(cp.api_port, owner, "during-flood", "viewer")
        took = time.monotonic() - started
        assert r.status == 200, r
        assert took < 0.5, f"a write took {took:.2f} s behind the flood"
        assert "unresponsive" in r.headers["x-apitokens-not-applied"], r.headers
        assert envoy.get(APP, issued_secret(r)).status == 200
        print(f"xDS flood: {flood.requested} streams asked for on {CONNECTIONS} connections, {streams} admitted; "
              f"control plane +{grown:.1f} MiB with a {TOKENS}-token table; a write answered in {took * 1000:.0f} ms")
    finally:
        flood.close()


def test_fetch_is_not_served(big_plane):
    cp, _, _ = big_plane
    with httpx.Client(http1=False, http2=True, timeout=XDS_CLIENT_TIMEOUT) as client:
        r = client.post(f"http://127.0.0.1:{cp.xds_port}{FETCH_PATH}", content=discovery_request("fetcher"),
                        headers={"content-type": "application/grpc", "te": "trailers"})
    assert r.headers.get("grpc-status") == "12", r.headers  # UNIMPLEMENTED
    assert len(r.content) < 1000, "no table in the answer"


def test_no_plaintext_xds_beyond_loopback_unless_asked(workdir):
    db = str(workdir / "plain.db")
    port = free_port()
    out = subprocess.run([apitokens_bin(), "serve", "--db", db, "--listen", f"127.0.0.1:{free_port()}",
                          "--xds-listen", f"0.0.0.0:{port}"], capture_output=True, text=True, timeout=limit(30))
    assert out.returncode == 1 and "--insecure-xds" in out.stderr and "beyond loopback" in out.stderr, out.stderr
    api = free_port()
    log = workdir / "insecure-xds.log"
    with log.open("w") as stdout:
        proc = subprocess.Popen([apitokens_bin(), "serve", "--db", db, "--listen", f"127.0.0.1:{api}",
                                 "--xds-listen", f"0.0.0.0:{port}", "--insecure-xds"],
                                stdout=stdout, stderr=subprocess.PIPE, text=True)

    def healthy() -> bool:
        # Refused until it listens: `poll` retries a falsy answer, not an
        # exception. (A bare httpx.get here failed at the first try whenever
        # serve took longer to start than httpx to build its client.)
        try:
            return httpx.get(f"http://127.0.0.1:{api}/healthz", timeout=limit(5)).status_code == 200
        except httpx.TransportError:
            return False

    try:
        poll(healthy, 15, "insecure xDS started")
    except Exception:
        proc.kill()
        _, err = proc.communicate(timeout=limit(10))
        raise AssertionError(f"exit {proc.returncode}; stderr: {err}; log: {log.read_text()}")
    proc.terminate()
    assert "without TLS (--insecure-xds)" in proc.communicate(timeout=limit(10))[1]


def test_a_huge_request_is_refused_and_nothing_of_it_kept(big_plane):
    cp, _, _ = big_plane
    node = "n" * (4 << 20)  # a 4 MiB node id
    try:
        with httpx.Client(http1=False, http2=True, timeout=XDS_CLIENT_TIMEOUT) as client:
            r = client.post(f"http://127.0.0.1:{cp.xds_port}{STREAM_PATH}", content=discovery_request(node),
                            headers={"content-type": "application/grpc", "te": "trailers"})
        assert r.headers.get("grpc-status") == "8", r.headers  # RESOURCE_EXHAUSTED
    except httpx.HTTPError:
        pass  # or the stream is reset while the client still sends
    assert not any(e["node"].startswith("nnnn") for e in cp.status()["envoys"])
    status = httpx.get(f"http://127.0.0.1:{cp.api_port}/status", timeout=limit(10))
    assert len(status.content) < 1 << 20 and "nnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnn" not in status.text
    # A node id that fits is kept to 256 bytes.
    with httpx.Client(http1=False, http2=True, timeout=XDS_CLIENT_TIMEOUT) as client:
        with client.stream("POST", f"http://127.0.0.1:{cp.xds_port}{STREAM_PATH}",
                           content=discovery_request("m" * 30_000),
                           headers={"content-type": "application/grpc", "te": "trailers"}) as r:
            assert r.status_code == 200
            next(r.iter_bytes())  # the table came: the stream is open
            nodes = [e["node"] for e in cp.status()["envoys"] if e["node"].startswith("mmm")]
            assert nodes and all(len(n) <= 256 for n in nodes), [len(n) for n in nodes]
