"""The store over TLS: with `sslmode=verify-full&sslrootcert=CA.pem` the
replica talks to PostgreSQL over TLS (pg_stat_ssl says so) and verifies the
server; a server certificate from another CA is refused. The test turns TLS
on in the private server (certificates made with openssl) and off again."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from testkit.certs import make_ca, make_cert
from testkit.controlplane import ControlPlane, apitokens_bin
from testkit.harness import poll
from testkit.timing import limit


@pytest.fixture
def tls_server(pg, workdir):
    d = workdir / "pg-pki"
    d.mkdir()
    make_ca(d, "ca")
    make_ca(d, "other-ca")
    make_cert(d, "server", "ca", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    for name in ("server.pem", "server.key"):
        target = pg.dir / f"tls-{name}"
        shutil.copy(d / name, target)
        os.chown(target, pg.server_user(), -1)
        target.chmod(0o600)
    pg.psql(f"ALTER SYSTEM SET ssl_cert_file = '{pg.dir / 'tls-server.pem'}'")
    pg.psql(f"ALTER SYSTEM SET ssl_key_file = '{pg.dir / 'tls-server.key'}'")
    pg.psql("ALTER SYSTEM SET ssl = on")
    pg.psql("SELECT pg_reload_conf()")
    poll(lambda: pg.psql("SHOW ssl") == "on", 10, "TLS on")
    yield d
    pg.psql("ALTER SYSTEM RESET ssl")
    pg.psql("SELECT pg_reload_conf()")


def test_the_store_over_tls_verifies_the_server(pg, workdir, tls_server):
    pg.create_database("tls")
    url = pg.url("tls", sslmode="verify-full", sslrootcert=str(tls_server / "ca.pem"))
    plane = ControlPlane(workdir / "tls", name="tls", store=url)
    plane.bootstrap("default", "admin")
    plane.start("--replica-name", "tls")
    try:
        sessions = pg.psql("SELECT ssl FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) "
                           "WHERE datname = 'tls' AND application_name = 'apitokens'").split()
        assert sessions and set(sessions) == {"t"}, f"sessions of the replica (ssl?): {sessions}"
        # (The replica lists itself at its first heartbeat, moments after
        # /healthz answers: a busy machine showed the list still empty.)
        poll(lambda: any(r["live"] for r in plane.status()["replicas"]), 10, "the replica live")
    finally:
        plane.stop()
    stranger = pg.url("tls", sslmode="verify-full", sslrootcert=str(tls_server / "other-ca.pem"))
    out = subprocess.run([apitokens_bin(), "render", "--store", stranger], capture_output=True, text=True,
                         timeout=limit(60))
    assert out.returncode == 1 and "certificate" in out.stderr.lower(), out.stderr
