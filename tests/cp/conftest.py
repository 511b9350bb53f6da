"""End-to-end fixtures for the control plane: the real `apitokens` binary, a real
Envoy 1.40 configured by it over ECDS (envoy/envoy-ecds.yaml with its ports
replaced), and an echo upstream. Everything listens on 127.0.0.1.

Environment:
  APITOKENS_BIN   the control plane binary (default <repo>/target/debug/apitokens)
  ENVOY_BIN       Envoy (default <repo>/.venv/bin/envoy)
The filter module is target/wasm32-wasip1/release/apitokens_filter.wasm, as in
the shipped configuration (Envoy runs from the repository root).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "e2e"))
import echo_server  # noqa: E402  (the shared demo upstream)

MODULE = REPO / "target" / "wasm32-wasip1" / "release" / "apitokens_filter.wasm"
ECDS_YAML = REPO / "envoy" / "envoy-ecds.yaml"
PLUGIN_BASE = REPO / "envoy" / "ecds-plugin-base.json"

# Every secret any test saw, for the final leak search.
SECRETS: list[str] = []
# Measured revocation delays (seconds), printed at the end of the run.
MEASUREMENTS: dict[str, list[float]] = {}


def apitokens_bin() -> str:
    return os.environ.get("APITOKENS_BIN") or str(REPO / "target" / "debug" / "apitokens")


def envoy_bin() -> str:
    return os.environ.get("ENVOY_BIN") or str(REPO / ".venv" / "bin" / "envoy")


def pytest_report_header(config):
    return [f"apitokens: {apitokens_bin()}", f"envoy: {envoy_bin()}"]


def pytest_sessionstart(session):
    missing = [p for p in (apitokens_bin(), envoy_bin(), str(MODULE)) if not os.path.exists(p)]
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poll(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.01):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"<{self.status} {self.body[:300]!r}>"


def request(port: int, method: str, path: str, token: str | None = None, body=None, headers=None) -> Response:
    """One request on a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
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


def tokens_path(ns: str = "default", token: str | None = None) -> str:
    base = f"/apitokens/v1/namespaces/{ns}/apitokens"
    return base if token is None else f"{base}/{token}"


class ControlPlane:
    """One `apitokens serve` process (restartable on the same ports and database)."""

    def __init__(self, workdir: Path, name: str = "cp"):
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.db = self.dir / "apitokens.db"
        self.api_port = free_port()
        self.xds_port = free_port()
        self.proc: subprocess.Popen | None = None
        self.runs = 0
        self.extra: list[str] = []

    @property
    def logs(self) -> list[Path]:
        return sorted(self.dir.glob("serve-*.log"))

    def log_text(self) -> str:
        return "".join(p.read_text("utf-8", "replace") for p in self.logs)

    def bootstrap(self, namespace: str, name: str) -> str:
        out = subprocess.run(
            [apitokens_bin(), "bootstrap", "--db", str(self.db), "--namespace", namespace, "--name", name],
            capture_output=True, text=True, check=True, timeout=30,
        )
        secret = out.stdout.strip()
        SECRETS.append(secret)
        (self.dir / f"bootstrap-{name}.stderr").write_text(out.stderr)
        return secret

    def start(self, *extra: str) -> "ControlPlane":
        self.runs += 1
        self.extra = list(extra)
        cmd = [
            apitokens_bin(), "serve",
            "--db", str(self.db),
            "--listen", f"127.0.0.1:{self.api_port}",
            "--xds-listen", f"127.0.0.1:{self.xds_port}",
            "--plugin-config", str(PLUGIN_BASE),
            "--poll-interval-ms", "200",
            *extra,
        ]
        log = open(self.dir / f"serve-{self.runs:02d}.log", "wb")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                     start_new_session=True)
        poll(self._healthy, 15, f"{self.name} /healthz")
        return self

    def _healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
        try:
            return request(self.api_port, "GET", "/healthz").status == 200
        except OSError:
            return False

    def stop(self, sig=signal.SIGTERM, timeout: float = 10) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def api(self, method: str, path: str, token: str | None = None, body=None, headers=None) -> Response:
        return request(self.api_port, method, path, token, body, headers)

    def status(self, version: int | None = None, wait: float = 0) -> dict:
        q = "" if version is None else f"?version={version}&waitSeconds={wait}"
        return request(self.api_port, "GET", "/status" + q).json()

    def wait_applied(self, version: int, timeout: float = 10) -> dict:
        st = self.status(version, timeout)
        assert st["applied"], f"version {version} not acknowledged: {json.dumps(st, indent=1)}"
        return st


class Envoy:
    """A real Envoy on the shipped ECDS configuration, ports and node id replaced."""

    def __init__(self, workdir: Path, cp: ControlPlane, upstream_port: int, node: str,
                 mutate: Callable[[dict], None] | None = None):
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.node = node
        config = yaml.safe_load(ECDS_YAML.read_text())
        config["node"]["id"] = node
        config["admin"]["address"]["socket_address"]["port_value"] = 0
        listener = config["static_resources"]["listeners"][0]
        listener["address"]["socket_address"]["port_value"] = 0
        ports = {"upstream": upstream_port, "apitokens_api": cp.api_port, "xds_cluster": cp.xds_port}
        for cluster in config["static_resources"]["clusters"]:
            for group in cluster["load_assignment"]["endpoints"]:
                for ep in group["lb_endpoints"]:
                    ep["endpoint"]["address"]["socket_address"]["port_value"] = ports[cluster["name"]]
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
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

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
def upstream():
    server = echo_server.start_in_thread("127.0.0.1", 0)
    yield server
    server.shutdown()
    server.server_close()


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


def create(port: int, owner: str, token_id: str, role: str, ns: str = "default", **extra) -> Response:
    body = {"name": f"namespaces/{ns}/apitokens/{token_id}", "role": role, **extra}
    r = request(port, "POST", tokens_path(ns), owner, body)
    if r.status == 200:
        SECRETS.append(r.json()["apiToken"]["secret"])
    return r


def version_of(r: Response) -> int:
    return int(r.headers["x-apitokens-config-version"])
