#!/usr/bin/env python3
"""A tiny HTTP/1.1 echo upstream for the apitokens demo and end-to-end tests.

Every request is answered 200 with a JSON object describing what arrived:
``{"method": ..., "path": ..., "headers": {name: value, ...}, "body_bytes": n}``.
Header names are lower-cased; a header sent more than once is reported once,
its values joined with ", " (so a duplicated identity header is visible).

Standalone:  python3 tests/lib/testkit/echo_server.py --port 8080
In tests:    server = make_server("127.0.0.1", 0); start it in a thread;
             server.requests holds every request received (raw header pairs).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class EchoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as Envoy's upstream connections expect
    server_version = "apitokens-echo"
    sys_version = ""

    def _handle(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        raw_pairs = [(k.lower(), v) for k, v in self.headers.items()]
        merged: dict[str, str] = {}
        for k, v in raw_pairs:
            merged[k] = f"{merged[k]}, {v}" if k in merged else v
        record = {
            "method": self.command,
            "path": self.path,
            "headers": merged,
            "body_bytes": len(body),
        }
        self.server.record({**record, "raw_headers": raw_pairs})  # type: ignore[attr-defined]
        payload = json.dumps(record, sort_keys=True).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    # Every method gets the same treatment.
    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _handle

    def __getattr__(self, name: str):
        # Methods http.server does not know (e.g. lower-case "get") also echo.
        if name.startswith("do_"):
            return self._handle
        raise AttributeError(name)

    def log_message(self, fmt: str, *args) -> None:  # noqa: D401 - quiet unless verbose
        if getattr(self.server, "verbose", False):
            sys.stderr.write("echo: " + (fmt % args) + "\n")


class EchoServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, verbose: bool = False):
        super().__init__(address, EchoHandler)
        self.verbose = verbose
        self.requests: list[dict] = []
        self._lock = threading.Lock()

    def record(self, request: dict) -> None:
        with self._lock:
            self.requests.append(request)

    def find(self, header: str, value: str) -> list[dict]:
        """Requests whose header `header` (lower-case) had exactly `value`."""
        with self._lock:
            return [r for r in self.requests if (header, value) in r["raw_headers"]]

    @property
    def port(self) -> int:
        return self.server_address[1]


def make_server(host: str = "127.0.0.1", port: int = 0, verbose: bool = False) -> EchoServer:
    return EchoServer((host, port), verbose=verbose)


def start_in_thread(host: str = "127.0.0.1", port: int = 0) -> EchoServer:
    server = make_server(host, port)
    threading.Thread(target=server.serve_forever, name="echo-upstream", daemon=True).start()
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    server = make_server(args.host, args.port, verbose=not args.quiet)
    print(f"echo upstream listening on http://{args.host}:{server.port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
