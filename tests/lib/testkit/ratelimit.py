"""A stand-in global rate-limit service (envoy.service.ratelimit.v3.RateLimitService)
on 127.0.0.1, speaking gRPC over HTTP/2 with the `h2` library (no gRPC
dependency): it records each request's domain and descriptors, counts hits per
descriptor, and answers OVER_LIMIT past `limit`, with the descriptor status
Envoy turns into the `x-ratelimit-*` headers. For the tests of
envoy/envoy-global-ratelimit.yaml's filter chain; envoyproxy/ratelimit itself
is not run here."""

from __future__ import annotations

import socket
import threading
from collections import Counter

import h2.config
import h2.connection
import h2.events

from testkit.xds import field, read_varint, varint

OK, OVER_LIMIT = 1, 2
MINUTE = 2


def _field(number: int, payload: bytes | int) -> bytes:
    if isinstance(payload, int):
        return varint(number << 3) + varint(payload)
    return field(number, payload)


def _fields(data: bytes):
    """(number, value) for each field: ints for varints, bytes otherwise."""
    i = 0
    while i < len(data):
        key, i = read_varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = read_varint(data, i)
        elif wire == 2:
            length, i = read_varint(data, i)
            value, i = data[i:i + length], i + length
        else:
            raise ValueError(f"wire type {wire}")
        yield number, value


def parse_request(message: bytes) -> tuple[str, list[tuple[tuple[str, str], ...]]]:
    """RateLimitRequest: the domain and each descriptor's (key, value) entries."""
    domain, descriptors = "", []
    for number, value in _fields(message):
        if number == 1:
            domain = value.decode()
        elif number == 2:
            entries = []
            for n, entry in _fields(value):
                if n == 1:
                    kv = dict(_fields(entry))
                    entries.append((kv.get(1, b"").decode(), kv.get(2, b"").decode()))
            descriptors.append(tuple(entries))
    return domain, descriptors


def response(code: int, limit: int, remaining: int) -> bytes:
    """RateLimitResponse: the overall code and one descriptor status (its
    limit per minute, what remains, a reset in 60 s)."""
    rate = _field(1, limit) + _field(2, MINUTE)
    status = _field(1, code) + _field(2, rate) + _field(3, remaining) + _field(4, _field(1, 60))
    return _field(1, code) + _field(2, status)


class RateLimitService:
    def __init__(self, limit: int):
        self.limit = limit
        self.requests: list[tuple[str, list]] = []
        self.hits: Counter = Counter()
        self.lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def decide(self, message: bytes) -> bytes:
        domain, descriptors = parse_request(message)
        with self.lock:
            self.requests.append((domain, descriptors))
            code, remaining = OK, self.limit
            for d in descriptors:
                self.hits[d] += 1
                left = self.limit - self.hits[d]
                remaining = min(remaining, max(left, 0))
                if left < 0:
                    code = OVER_LIMIT
        return response(code, self.limit, remaining)

    def _serve(self, conn: socket.socket):
        h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        h2c.initiate_connection()
        conn.sendall(h2c.data_to_send())
        bodies: dict[int, bytes] = {}
        try:
            while data := conn.recv(65536):
                for event in h2c.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        bodies[event.stream_id] = b""
                    elif isinstance(event, h2.events.DataReceived):
                        bodies[event.stream_id] = bodies.get(event.stream_id, b"") + event.data
                        h2c.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    elif isinstance(event, h2.events.StreamEnded):
                        framed = bodies.pop(event.stream_id, b"")
                        reply = self.decide(framed[5:])  # gRPC: flag, length, message
                        h2c.send_headers(event.stream_id, [(":status", "200"), ("content-type", "application/grpc")])
                        h2c.send_data(event.stream_id, b"\x00" + len(reply).to_bytes(4, "big") + reply)
                        h2c.send_headers(event.stream_id, [("grpc-status", "0")], end_stream=True)
                conn.sendall(h2c.data_to_send())
        except OSError:
            pass
        finally:
            conn.close()

    def close(self):
        self.sock.close()
