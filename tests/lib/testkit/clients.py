"""HTTP clients for the end-to-end tests.

`Client` (httpx) speaks HTTP/1.1 or HTTP/2 with prior knowledge (h2c) and covers
ordinary requests. `RawH1` (a socket) and `RawH2` (the `h2` library) send what
httpx refuses to: bytes that are not UTF-8, repeated headers, lower-case
methods, unnormalized paths. All three return `httpx.Response` objects with two
extra attributes: `e2e_id` (the `x-e2e-id` request header, to find the request
in Envoy's access log and at the echo upstream) and `envoy`.

`request` sends one request on a fresh connection (the standard library's
http.client) to any port, Envoy's or the control plane's, and returns a
`Response`.
"""

from __future__ import annotations

import http.client
import itertools
import json
import socket
import threading

import h2.config
import h2.connection
import h2.events
import httpx

from testkit.timing import limit

_ids = itertools.count(1)
_ids_lock = threading.Lock()


def next_e2e_id() -> str:
    with _ids_lock:
        return f"req-{next(_ids)}"


def _b(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("latin-1")


class Client:
    """httpx client bound to one Envoy, speaking HTTP/1.1 ("h1") or h2c ("h2")."""

    def __init__(self, envoy, proto: str):
        assert proto in ("h1", "h2")
        self.envoy = envoy
        self.proto = proto
        self.http = httpx.Client(
            base_url=envoy.base_url,
            http1=proto == "h1",
            http2=proto == "h2",
            timeout=limit(10.0),
            trust_env=False,  # loopback only: ignore proxy variables
        )

    def request(
        self,
        method: str,
        path: str,
        token=None,
        authorization: str | None = None,
        headers: dict | list | None = None,
        content: bytes | None = None,
    ) -> httpx.Response:
        e2e_id = next_e2e_id()
        hdrs: list[tuple[str, str]] = [("x-e2e-id", e2e_id)]
        if token is not None:
            hdrs.append(("authorization", token.authorization))
        if authorization is not None:
            hdrs.append(("authorization", authorization))
        if headers:
            hdrs.extend(headers.items() if isinstance(headers, dict) else headers)
        # `path` is sent as-is (httpx keeps percent-escapes; dot segments are
        # for RawH1/RawH2, httpx would normalise them away).
        resp = self.http.request(method, path, headers=hdrs, content=content)
        expected = "HTTP/2" if self.proto == "h2" else "HTTP/1.1"
        assert resp.http_version == expected, f"spoke {resp.http_version}, wanted {expected}"
        resp.e2e_id = e2e_id
        resp.envoy = self.envoy
        return resp

    def get(self, path: str, **kw) -> httpx.Response:
        return self.request("GET", path, **kw)

    def close(self) -> None:
        self.http.close()


class ConnectionClosed(Exception):
    pass


class StreamReset(Exception):
    pass


def _make_response(status: int, headers: list[tuple[bytes, bytes]], body: bytes, version: bytes) -> httpx.Response:
    resp = httpx.Response(status, headers=headers, content=body, extensions={"http_version": version})
    return resp


class RawH1:
    """One HTTP/1.1 connection over a plain socket; several requests may share it."""

    def __init__(self, envoy, timeout: float = 10.0):
        self.envoy = envoy
        self.sock = socket.create_connection(("127.0.0.1", envoy.port), timeout=limit(timeout))
        self.buf = b""
        self.closed = False

    def request(
        self,
        method: str | bytes,
        path: str | bytes,
        headers: list[tuple[str | bytes, str | bytes]] = (),
        body: bytes = b"",
        e2e_id: str | None = None,
    ) -> httpx.Response:
        e2e_id = e2e_id or next_e2e_id()
        lines = [_b(method) + b" " + _b(path) + b" HTTP/1.1", b"host: 127.0.0.1", b"x-e2e-id: " + _b(e2e_id)]
        for name, value in headers:
            lines.append(_b(name) + b": " + _b(value))
        if body:
            lines.append(b"content-length: " + str(len(body)).encode())
        self.sock.sendall(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        resp = self._read_response(head_only=_b(method).upper() == b"HEAD")
        resp.e2e_id = e2e_id
        resp.envoy = self.envoy
        return resp

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            self.closed = True
            raise ConnectionClosed("connection closed by Envoy")
        self.buf += chunk

    def _read_response(self, head_only: bool) -> httpx.Response:
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        status_line, *header_lines = head.split(b"\r\n")
        status = int(status_line.split(b" ")[1])
        headers = []
        for line in header_lines:
            name, _, value = line.partition(b":")
            headers.append((name.strip().lower(), value.strip()))
        hmap = dict(headers)
        body = b""
        if head_only or status in (204, 304) or 100 <= status < 200:
            pass
        elif b"content-length" in hmap:
            n = int(hmap[b"content-length"])
            while len(self.buf) < n:
                self._fill()
            body, self.buf = self.buf[:n], self.buf[n:]
        elif hmap.get(b"transfer-encoding", b"").lower() == b"chunked":
            while True:
                while b"\r\n" not in self.buf:
                    self._fill()
                size_line, self.buf = self.buf.split(b"\r\n", 1)
                n = int(size_line.split(b";")[0], 16)
                while len(self.buf) < n + 2:
                    self._fill()
                body += self.buf[:n]
                self.buf = self.buf[n + 2 :]
                if n == 0:
                    break
        else:  # read to EOF
            try:
                while True:
                    self._fill()
            except ConnectionClosed:
                body, self.buf = self.buf, b""
        if hmap.get(b"connection", b"").lower() == b"close":
            self.closed = True
        return _make_response(status, headers, body, b"HTTP/1.1")

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class RawH2:
    """One h2c (prior knowledge) connection driven by the `h2` library, without header validation."""

    def __init__(self, envoy, timeout: float = 10.0):
        self.envoy = envoy
        self.sock = socket.create_connection(("127.0.0.1", envoy.port), timeout=limit(timeout))
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            validate_inbound_headers=False,
        )
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.initiate_connection()
        self.sock.sendall(self.conn.data_to_send())
        self.closed = False

    def request(
        self,
        method: str | bytes,
        path: str | bytes,
        headers: list[tuple[str | bytes, str | bytes]] = (),
        body: bytes = b"",
        e2e_id: str | None = None,
    ) -> httpx.Response:
        e2e_id = e2e_id or next_e2e_id()
        sid = self.conn.get_next_available_stream_id()
        hdrs = [
            (b":method", _b(method)),
            (b":path", _b(path)),
            (b":scheme", b"http"),
            (b":authority", b"127.0.0.1"),
            (b"x-e2e-id", _b(e2e_id)),
        ] + [(_b(k), _b(v)) for k, v in headers]
        self.conn.send_headers(sid, hdrs, end_stream=not body)
        if body:
            self.conn.send_data(sid, body, end_stream=True)
        self.sock.sendall(self.conn.data_to_send())
        status, resp_headers, data = None, [], b""
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                self.closed = True
                raise ConnectionClosed("connection closed by Envoy")
            for event in self.conn.receive_data(chunk):
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == sid:
                    resp_headers = [(k, v) for k, v in event.headers if not k.startswith(b":")]
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived) and event.stream_id == sid:
                    data += event.data
                    self.conn.acknowledge_received_data(event.flow_controlled_length, sid)
                elif isinstance(event, h2.events.StreamReset) and event.stream_id == sid:
                    self.sock.sendall(self.conn.data_to_send())
                    raise StreamReset(f"stream {sid} reset by Envoy, error code {event.error_code!r}")
                elif isinstance(event, h2.events.ConnectionTerminated):
                    self.closed = True
                    raise ConnectionClosed(f"GOAWAY from Envoy: {event.error_code!r}")
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id == sid:
                    self.sock.sendall(self.conn.data_to_send())
                    resp = _make_response(status, resp_headers, data, b"HTTP/2")
                    resp.e2e_id = e2e_id
                    resp.envoy = self.envoy
                    return resp
            self.sock.sendall(self.conn.data_to_send())

    def close(self) -> None:
        try:
            self.conn.close_connection()
            self.sock.sendall(self.conn.data_to_send())
        except OSError:
            pass
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def raw_client(envoy, proto: str):
    return RawH1(envoy) if proto == "h1" else RawH2(envoy)


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"<{self.status} {self.body[:300]!r}>"


def request(port: int, method: str, path: str, token: str | None = None, body=None, headers=None,
            timeout: float = 10, source: str | None = None) -> Response:
    """One request on a fresh connection (`timeout`: a waiting limit, scaled), from
    loopback address `source` if given (127.0.0.2, ...: another client)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=limit(timeout),
                                      source_address=(source, 0) if source else None)
    h = dict(headers or {})
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    if body is not None and not isinstance(body, (bytes, str)):
        body = json.dumps(body)
        h.setdefault("Content-Type", "application/json")
    try:
        conn.request(method, path, body=body, headers=h)
        resp = conn.getresponse()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()
