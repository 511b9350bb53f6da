"""The REST listener as a platform team runs it: HTTPS on the API
(`--tls-cert`, `--tls-key`), `/status` on an operators' listener of its own
(`--status-listen`), a deadline for each request's headers and a bound on
open connections, so that a client that opens connections and sends nothing
(or a byte now and then) cannot hold the API. Certificates are made by the
test with openssl."""

from __future__ import annotations

import socket
import ssl
import time

import httpx
import pytest

from testkit.certs import make_ca, make_cert
from testkit.controlplane import ControlPlane, free_port, tokens_path
from testkit.harness import poll, remember_secret
from testkit.timing import limit

HEADER_TIMEOUT = 1


class TlsPlane(ControlPlane):
    """A control plane whose API answers over HTTPS only."""

    ca: str = ""

    def _healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
        try:
            return httpx.get(f"https://127.0.0.1:{self.api_port}/healthz", verify=self.ca, timeout=limit(5)).status_code == 200
        except httpx.HTTPError:
            return False


@pytest.fixture(scope="module")
def plane(workdir):
    d = workdir / "pki-api"
    d.mkdir()
    make_ca(d, "ca")
    make_cert(d, "api", "ca", "subjectAltName=DNS:apitokens.example,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    cp = TlsPlane(workdir / "cp-https", name="cp-https")
    cp.ca = str(d / "ca.pem")
    cp.owner = cp.bootstrap("default", "admin")
    cp.status_port = free_port()
    cp.start("--tls-cert", str(d / "api.pem"), "--tls-key", str(d / "api.key"),
             "--status-listen", f"127.0.0.1:{cp.status_port}",
             "--header-read-timeout-seconds", str(HEADER_TIMEOUT), "--max-connections", "4")
    yield cp
    cp.stop()


def https(cp, method: str, path: str, token: str | None = None, **kw) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.request(method, f"https://127.0.0.1:{cp.api_port}{path}", headers=headers, verify=cp.ca,
                         timeout=limit(10), **kw)


def test_the_api_answers_over_https_only(plane):
    r = https(plane, "POST", tokens_path(), plane.owner,
              json={"name": "namespaces/default/apitokens/over-tls", "role": "viewer"})
    assert r.status_code == 200, r.text
    remember_secret(r.json()["apiToken"]["secret"])
    assert https(plane, "GET", tokens_path(token="over-tls"), plane.owner).status_code == 200
    # Plain HTTP on the same port gets no answer: nothing goes in clear.
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{plane.api_port}/healthz", timeout=limit(5))
    # A client that does not trust the certificate stops at the handshake.
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"https://127.0.0.1:{plane.api_port}/healthz", timeout=limit(5))


def test_status_is_served_on_the_operators_listener_only(plane):
    assert https(plane, "GET", "/status").status_code == 404
    st = httpx.get(f"https://127.0.0.1:{plane.status_port}/status", verify=plane.ca, timeout=limit(10))
    assert st.status_code == 200 and "envoys" in st.json()
    assert httpx.get(f"https://127.0.0.1:{plane.status_port}/healthz", verify=plane.ca, timeout=limit(5)).status_code == 200
    # The operators' listener serves nothing else.
    assert httpx.get(f"https://127.0.0.1:{plane.status_port}{tokens_path()}", verify=plane.ca,
                     headers={"authorization": f"Bearer {plane.owner}"}, timeout=limit(5)).status_code == 404


def slow_client(port: int) -> socket.socket:
    """A TLS connection that sends half a request line and nothing more."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=limit(10))
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    tls = ctx.wrap_socket(raw, server_hostname="apitokens.example")
    tls.sendall(b"GET /healthz HT")
    return tls


def closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass  # a 408 answer, then the close
        return True
    except (socket.timeout, TimeoutError):
        return False
    except (ssl.SSLError, OSError):
        return True


def test_clients_that_send_nothing_are_cut_and_cannot_hold_the_api(plane):
    # More silent clients than --max-connections (4).
    silent = [slow_client(plane.api_port) for _ in range(3)]
    silent += [socket.create_connection(("127.0.0.1", plane.api_port)) for _ in range(3)]  # not even a handshake
    started = time.monotonic()
    # A real client is served once the silent ones have had their deadline.
    r = https(plane, "GET", tokens_path(), plane.owner)
    took = time.monotonic() - started
    assert r.status_code == 200, r.text
    assert all(closed_within(s, HEADER_TIMEOUT * 3 + 2) for s in silent[:3]), "a silent TLS client was kept"
    print(f"REST listener: 6 silent connections against --max-connections 4 and a {HEADER_TIMEOUT} s header "
          f"deadline; a real request answered after {took:.2f} s")
    for s in silent:
        s.close()
    poll(lambda: https(plane, "GET", "/healthz").status_code == 200, 5, "healthy")
