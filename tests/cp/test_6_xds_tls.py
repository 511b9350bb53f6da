"""The ECDS server with mutual TLS: an Envoy presenting a client certificate
signed by the configured CA, for an allowed identity, gets the configuration
(and tokens work through it); an Envoy with a certificate from another CA,
or from the same CA for another identity, gets nothing and keeps refusing
everything; and a usage report forged with that other identity's certificate
(to make an abandoned token look used) is refused and marks nothing.
Certificates are made by the test with openssl."""

from __future__ import annotations

import hashlib
import socket
import ssl
import struct
import time
from pathlib import Path

import h2.config
import h2.connection
import h2.events

from testkit.certs import make_ca, make_cert
from testkit.controlplane import APP, ControlPlane, create, shipped_envoy, tokens_path
from testkit.harness import poll

SERVER_NAME = "apitokens-control-plane"


def with_client_tls(d: Path, cert: str, ca: str):
    """Envoy's xds_cluster over TLS with a client certificate (as docs/operations.md shows)."""

    def mutate(config: dict) -> None:
        for cluster in config["static_resources"]["clusters"]:
            if cluster["name"] == "xds_cluster":
                cluster["transport_socket"] = {
                    "name": "envoy.transport_sockets.tls",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                        "sni": SERVER_NAME,
                        "common_tls_context": {
                            "alpn_protocols": ["h2"],
                            "tls_certificates": [{
                                "certificate_chain": {"filename": str(d / f"{cert}.pem")},
                                "private_key": {"filename": str(d / f"{cert}.key")},
                            }],
                            "validation_context": {
                                "trusted_ca": {"filename": str(d / f"{ca}.pem")},
                                "match_typed_subject_alt_names": [
                                    {"san_type": "DNS", "matcher": {"exact": SERVER_NAME}}],
                            },
                        },
                    },
                }

    return mutate


def usage_report(port: int, d: Path, cert: str, digests: list[bytes]) -> str:
    """A raw gRPC `apitokens.v1.Usage/Report` over mutual TLS with `cert`:
    the answer's grpc-status."""
    ctx = ssl.create_default_context(cafile=str(d / "ca.pem"))
    ctx.load_cert_chain(str(d / f"{cert}.pem"), str(d / f"{cert}.key"))
    ctx.set_alpn_protocols(["h2"])
    # Not scaled (testkit.timing): under the server's 30 s HTTP/2 keepalive,
    # whose PINGs would keep a call without an answer waiting for ever.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname=SERVER_NAME) as sock:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        body = b"".join(digests)
        # UsageReport {lineage = 1 (any), digests = 2}: the identity is checked first.
        message = b"\x0a\x10" + b"\0" * 16 + b"\x12" + bytes([0x80 | (len(body) & 0x7F), len(body) >> 7]) + body
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [(":method", "POST"), (":scheme", "https"), (":path", "/apitokens.v1.Usage/Report"),
                                (":authority", SERVER_NAME), ("content-type", "application/grpc"), ("te", "trailers")])
        conn.send_data(sid, b"\0" + struct.pack(">I", len(message)) + message, end_stream=True)
        sock.sendall(conn.data_to_send())
        while True:
            data = sock.recv(65536)
            assert data, "the control plane closed the connection without an answer"
            for event in conn.receive_data(data):
                headers = getattr(event, "headers", None)
                if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)) and headers:
                    status = dict((k.decode() if isinstance(k, bytes) else k, v.decode() if isinstance(v, bytes) else v)
                                  for k, v in headers).get("grpc-status")
                    if status is not None:
                        return status
            sock.sendall(conn.data_to_send())


def test_only_envoys_with_a_trusted_client_certificate_get_the_configuration(workdir, upstream):
    d = workdir / "pki"
    d.mkdir()
    make_ca(d, "ca")
    make_ca(d, "other-ca")
    make_cert(d, "server", "ca", f"subjectAltName=DNS:{SERVER_NAME},IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    client_ext = "subjectAltName=DNS:gateway\nextendedKeyUsage=clientAuth\n"
    make_cert(d, "client", "ca", client_ext)
    make_cert(d, "stranger", "other-ca", client_ext)
    # Signed by the right CA, for another workload.
    make_cert(d, "insider", "ca", "subjectAltName=DNS:batch-job,URI:spiffe://example.org/ns/batch/sa/job\n"
                                  "extendedKeyUsage=clientAuth\n")

    plane = ControlPlane(workdir / "cp-tls", name="cp-tls")
    owner = plane.bootstrap("default", "admin")
    plane.start("--xds-tls-cert", str(d / "server.pem"), "--xds-tls-key", str(d / "server.key"),
                "--xds-client-ca", str(d / "ca.pem"), "--xds-client-san", "gateway",
                "--xds-client-san", "spiffe://example.org/ns/gateways/sa/envoy", "--usage-flush-seconds", "1")
    port = upstream.server_address[1]
    trusted = shipped_envoy(workdir / "tls-trusted", plane, port, node="trusted",
                            mutate=with_client_tls(d, "client", "ca"))
    stranger = shipped_envoy(workdir / "tls-stranger", plane, port, node="stranger",
                             mutate=with_client_tls(d, "stranger", "ca"))
    insider = shipped_envoy(workdir / "tls-insider", plane, port, node="insider",
                            mutate=with_client_tls(d, "insider", "ca"))
    try:
        trusted.start()
        stranger.start()
        insider.start()
        poll(lambda: plane.envoy_status("trusted").get("ackedVersion"), 15, "the trusted Envoy's ACK")
        assert "mutual TLS" in plane.log_text()
        r = create(plane.api_port, owner, "over-tls", "viewer")
        assert r.status == 200 and r.headers["x-apitokens-applied"] == "true", r
        secret = r.json()["apiToken"]["secret"]
        assert trusted.get(APP, secret).status == 200
        # The stranger's handshakes fail: it never shows up, never gets a
        # token, and keeps its deny-all default.
        poll(lambda: stranger.stats().get("cluster.xds_cluster.ssl.connection_error", 0) >= 2, 15,
             "the stranger's refused handshakes")
        assert all(e["node"] != "stranger" for e in plane.status()["envoys"])
        assert stranger.get(APP, secret).status == 401
        # The insider's handshake succeeds, but its certificate names none of
        # the allowed identities: every stream is refused.
        poll(lambda: any(v > 0 for k, v in insider.stats().items()
                         if k.startswith("cluster.xds_cluster.") and k.endswith("upstream_rq_completed")), 15,
             "the insider's refused streams")
        assert all(e["node"] != "insider" for e in plane.status()["envoys"])
        assert insider.get(APP, secret).status == 401
        assert r.headers["x-apitokens-envoys"] == "1/1"
        # The insider forges a usage report for a token nobody used: refused
        # (PERMISSION_DENIED), counted, and the token still shows no use.
        unused = create(plane.api_port, owner, "never-used", "viewer").json()["apiToken"]["secret"]
        forged = [hashlib.sha256(unused.encode()).digest()]
        assert usage_report(plane.xds_port, d, "insider", forged) == "7"
        assert plane.status()["usageReports"]["refused"] >= 1
        assert plane.metrics()["apitokens_usage_reports_refused_total"] >= 1
        time.sleep(1.5)  # more than a usage flush (--usage-flush-seconds 1)
        token = plane.api("GET", tokens_path(token="never-used"), owner).json()["apiToken"]
        assert "lastUseTime" not in token, token
    finally:
        trusted.stop()
        stranger.stop()
        insider.stop()
        plane.stop()
