"""A real webhook receiver for the tests: an HTTP server on loopback that
records every delivery (headers, body), checks its Standard Webhooks
signature with the key it shares with the control plane, and can be taken
down (its port closed: connections refused) and brought back on the same
port."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def key_file(path, key: bytes = b"apitokens-webhook-test-key-0123456789") -> bytes:
    """Writes the key in the specification's form (whsec_ + base64); the key."""
    path.write_text("whsec_" + base64.b64encode(key).decode() + "\n")
    return key


def signature(key: bytes, msg_id: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


class Receiver:
    def __init__(self, port: int, key: bytes, tls: tuple[str, str] | None = None):
        """`tls`: (certificate chain, key) PEM files: HTTPS."""
        self.port = port
        self.key = key
        self.tls = tls
        self.got: list[dict] = []      # every delivery, in arrival order
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/hook"

    def start(self) -> "Receiver":
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with receiver.lock:
                    receiver.got.append({"headers": {k.lower(): v for k, v in self.headers.items()},
                                         "body": body})
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        if self.tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*self.tls)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def events(self) -> list[dict]:
        """The CloudEvents received, each signature checked (a bad one fails the test)."""
        out = []
        with self.lock:
            got = list(self.got)
        for d in got:
            h = d["headers"]
            assert h["content-type"].startswith("application/cloudevents+json"), h
            want = signature(self.key, h["webhook-id"], h["webhook-timestamp"], d["body"])
            assert h["webhook-signature"] == want, "a delivery whose signature does not verify"
            event = json.loads(d["body"])
            assert event["id"] == h["webhook-id"], (event["id"], h["webhook-id"])
            out.append(event)
        return out

    def unique(self) -> list[dict]:
        """The events, each id once (at least once means a repeat is allowed), in arrival order."""
        seen, out = set(), []
        for e in self.events():
            if e["id"] not in seen:
                seen.add(e["id"])
                out.append(e)
        return out
