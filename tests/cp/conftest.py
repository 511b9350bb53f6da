"""End-to-end fixtures for the control plane: the real `apitokens` binary, a real
Envoy 1.40 configured by it over ECDS (envoy/envoy-ecds.yaml with its ports
replaced), and an echo upstream. Everything listens on 127.0.0.1.

Environment:
  APITOKENS_BIN   the control plane binary (default <repo>/target/debug/apitokens)
  ENVOY_BIN       Envoy (default <repo>/.venv/bin/envoy)
  APITOKENS_WASM  the filter module (default target/wasm32-wasip1/release/apitokens_filter.wasm,
                  as in the shipped configuration; Envoy runs from the repository root)
The control plane, the ECDS Envoy configuration and the echo upstream are shared
with tests/security and tests/drills (tests/lib/controlplane.py, fixtures.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "tests" / "e2e"), str(REPO / "tests" / "lib")]
import harness  # noqa: E402  (tests/e2e: process helpers)
from fixtures import upstream  # noqa: E402,F401  (the echo upstream of tests/e2e)
from controlplane import (  # noqa: E402,F401  (re-exported for the tests of this suite)
    MEASUREMENTS,
    SECRETS,
    ControlPlane,
    Response,
    apitokens_bin,
    create,
    ecds_bootstrap,
    envoy_bin,
    free_port,
    missing_binaries,
    poll,
    request,
    tokens_path,
    version_of,
)


def pytest_report_header(config):
    return [f"apitokens: {apitokens_bin()}", f"envoy: {envoy_bin()}"]


def pytest_sessionstart(session):
    missing = missing_binaries()
    if missing:
        raise pytest.UsageError("missing " + ", ".join(missing) + " (build them, or set APITOKENS_BIN / ENVOY_BIN)")


def pytest_terminal_summary(terminalreporter):
    if not MEASUREMENTS:
        return
    terminalreporter.section("revocation delay: API answer -> Envoy answers 401")
    for what, values in MEASUREMENTS.items():
        ms = sorted(v * 1000 for v in values)
        terminalreporter.write_line(
            f"{what}: n={len(ms)} min={ms[0]:.1f} ms median={ms[len(ms) // 2]:.1f} ms max={ms[-1]:.1f} ms"
        )


class Envoy:
    """A real Envoy on the shipped ECDS configuration, ports and node id replaced."""

    def __init__(self, workdir: Path, cp: ControlPlane, upstream_port: int, node: str,
                 mutate: Callable[[dict], None] | None = None):
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.node = node
        config = ecds_bootstrap(cp, upstream_port, node)
        if mutate:
            mutate(config)
        self.config_path = self.dir / "envoy.json"
        self.config_path.write_text(json.dumps(config, indent=1))
        self.log_path = self.dir / "envoy.log"
        self.access_path = self.dir / "access.log"
        self.admin_path = self.dir / "admin.address"
        self.proc: subprocess.Popen | None = None
        self.admin = ""
        self.port = 0

    def start(self) -> "Envoy":
        cmd = [
            envoy_bin(), "-c", str(self.config_path), "--concurrency", "2", "--disable-hot-restart",
            "-l", "info", "--log-path", str(self.log_path), "--admin-address-path", str(self.admin_path),
            "--file-flush-interval-msec", "20",
        ]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL,
                                     stdout=open(self.access_path, "wb"),
                                     stderr=open(self.dir / "stderr.txt", "wb"), start_new_session=True)

        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"envoy exited with {self.proc.returncode}: {self.log_text()[-3000:]}")
            if not self.admin_path.exists() or not self.admin_path.read_text().strip():
                return False
            self.admin = "http://" + self.admin_path.read_text().strip()
            try:
                return self.admin_get("/ready").strip() == "LIVE"
            except OSError:
                return False

        poll(ready, 30, "envoy ready")
        listeners = json.loads(self.admin_get("/listeners?format=json"))
        self.port = int(listeners["listener_statuses"][0]["local_address"]["socket_address"]["port_value"])
        return self

    def stop(self):
        harness.stop_process(self.proc)

    def admin_get(self, path: str) -> str:
        with urllib.request.urlopen(self.admin + path, timeout=5) as r:
            return r.read().decode("utf-8", "replace")

    def log_text(self) -> str:
        return "".join(p.read_text("utf-8", "replace") for p in (self.log_path, self.dir / "stderr.txt",
                                                                self.access_path) if p.exists())

    def get(self, path: str, token: str | None = None, method: str = "GET", body=None, headers=None) -> Response:
        return request(self.port, method, path, token, body, headers)

    def stats(self) -> dict[str, int]:
        out = {}
        for line in self.admin_get("/stats").splitlines():
            name, sep, value = line.rpartition(": ")
            if sep and value.strip().lstrip("-").isdigit():
                out[name] = int(value)
        return out


# ---------------------------------------------------------------------------
# Session fixtures: one control plane, one Envoy, one echo upstream.


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cp")


@pytest.fixture(scope="session")
def cp(workdir):
    plane = ControlPlane(workdir / "cp")
    plane.owner = plane.bootstrap("default", "admin")  # type: ignore[attr-defined]
    plane.start()
    yield plane
    plane.stop()


@pytest.fixture(scope="session")
def envoy(workdir, cp, upstream):
    proxy = Envoy(workdir / "envoy", cp, upstream.server_address[1], node="e2e-envoy-1").start()
    # The first configuration arrives over ECDS and is acknowledged.
    poll(lambda: any(e["node"] == proxy.node and e.get("ackedVersion") for e in cp.status()["envoys"]),
         15, "first ACK")
    yield proxy
    proxy.stop()



@pytest.fixture(scope="session")
def owner(cp) -> str:
    return cp.owner  # type: ignore[attr-defined]
