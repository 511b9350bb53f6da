"""A stream that rejects (NACKs) every configuration does not hold writes:
each write answers as soon as the real Envoy acknowledged and the stranger
rejected, long before the apply timeout, and the answer says plainly that one
Envoy rejected it (a NACK is never hidden: an Envoy that refuses a table
enforces an older one). The real Envoy enforces every change meanwhile. The
stranger is a raw HTTP/2 gRPC client on the (loopback, plaintext) xDS port,
which is what mutual TLS with --xds-client-san keeps out in production."""

from __future__ import annotations

import socket
import struct
import threading
import time

import h2.config
import h2.connection
import h2.events
import pytest

from testkit.controlplane import APP, ControlPlane, create, shipped_envoy
from testkit.harness import poll, remember_secret
from testkit.timing import limit
from testkit.xds import STREAM_PATH, discovery_request, fields

APPLY_TIMEOUT_MS = 4000


class Nacker(threading.Thread):
    """An ECDS stream that reads every response and rejects it."""

    def __init__(self, port: int, node: str):
        super().__init__(daemon=True)
        self.node = node
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.settimeout(0.1)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(self.sid, [(":method", "POST"), (":scheme", "http"), (":path", STREAM_PATH),
                                          (":authority", "xds"), ("content-type", "application/grpc"),
                                          ("te", "trailers")])
        self.conn.send_data(self.sid, discovery_request(node))
        self.sock.sendall(self.conn.data_to_send())
        self.buffer = b""
        self.rejected: list[bytes] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                data = self.sock.recv(1 << 16)
            except socket.timeout:
                continue
            except OSError:
                return
            if not data:
                return
            for event in self.conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    self.buffer += event.data
            while len(self.buffer) >= 5:
                n = struct.unpack(">I", self.buffer[1:5])[0]
                if len(self.buffer) < 5 + n:
                    break
                response, self.buffer = fields(self.buffer[5:5 + n]), self.buffer[5 + n:]
                self.rejected.append(response.get(1, b""))
                self.conn.send_data(self.sid, discovery_request(self.node, response[5], "refused by a stranger"))
            self.sock.sendall(self.conn.data_to_send())

    def stop(self) -> None:
        self.stopped.set()
        self.join(limit(5))
        self.sock.close()


@pytest.fixture(scope="module")
def plane(workdir, upstream):
    cp = ControlPlane(workdir / "cp-stranger", name="cp-stranger")
    cp.owner = cp.bootstrap("default", "admin")  # type: ignore[attr-defined]
    cp.start("--apply-timeout-ms", str(APPLY_TIMEOUT_MS))
    envoy = shipped_envoy(workdir / "envoy-stranger", cp, upstream.server_address[1], node="gateway").start()
    poll(lambda: cp.envoy_status("gateway").get("ackedVersion"), 15, "first ACK")
    cp.envoy = envoy  # type: ignore[attr-defined]
    yield cp
    envoy.stop()
    cp.stop()


def test_a_stream_that_rejects_everything_does_not_hold_writes(plane):
    nacker = Nacker(plane.xds_port, "stranger")
    nacker.start()
    try:
        poll(lambda: nacker.rejected, 10, "the stranger's first rejection")
        for i in range(3):
            started = time.monotonic()
            r = create(plane.api_port, plane.owner, f"while-rejected-{i}", "viewer")
            took = time.monotonic() - started
            assert r.status == 200, r
            secret = remember_secret(r.json()["apiToken"]["secret"])
            # Answered when both streams answered, not at the apply timeout.
            assert took < APPLY_TIMEOUT_MS / 1000 / 2, took
            assert r.headers["x-apitokens-applied"] == "false", r
            assert r.headers["x-apitokens-envoys"] == "1/2", r
            assert r.headers["x-apitokens-not-applied"] == "1 rejected (NACK) (which: /status)", r
            # The real Envoy enforces it at once.
            assert plane.envoy.get(APP, secret).status == 200
        lagging = plane.status()["lagging"]
        assert [(l["reason"], l["error"]) for l in lagging] == [("rejected", "refused by a stranger")], lagging
        assert len(nacker.rejected) >= 4
    finally:
        nacker.stop()
