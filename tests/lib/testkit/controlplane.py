"""The real `apitokens serve` for end-to-end suites (tests/cp, tests/security,
tests/drills): start, stop (also with SIGKILL), call its API, read /status
and /metrics,
and the shipped ECDS Envoy configuration (envoy/envoy-ecds.yaml) pointed at it.

Everything listens on 127.0.0.1.

Environment:
  APITOKENS_BIN   the control plane binary (default <repo>/target/debug/apitokens)
  ENVOY_BIN       Envoy (default <repo>/.venv/bin/envoy)
  APITOKENS_WASM  the filter module; when set, the pushed configuration and the
                  default (deny-all) configuration use it instead of the
                  shipped relative path target/wasm32-wasip1/release/...
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable

import yaml

from testkit import harness
from testkit.clients import Response, request
from testkit.harness import envoy_bin, poll, remember_secret
from testkit.timing import limit

REPO = Path(__file__).resolve().parents[3]
MODULE = REPO / "target" / "wasm32-wasip1" / "release" / "apitokens_filter.wasm"
ECDS_YAML = REPO / "envoy" / "envoy-ecds.yaml"
STATIC_YAML = REPO / "envoy" / "envoy.yaml"
PLUGIN_BASE = REPO / "envoy" / "ecds-plugin-base.json"


def reporting_every_second(path: Path) -> Path:
    """The shipped base plugin configuration with usage reports every second
    (30 shipped), written to `path`: for tests that wait for a last use."""
    settings = json.loads(PLUGIN_BASE.read_text())
    settings["usageReport"]["intervalSeconds"] = 1
    path.write_text(json.dumps(settings))
    return path
# A path of the demo application under namespace default (every role may GET it).
APP = "/api/v1/namespaces/default/deployments"

# Measured delays (seconds) by what was measured, printed at the end of a run.
MEASUREMENTS: dict[str, list[float]] = {}


def apitokens_bin() -> str:
    return os.environ.get("APITOKENS_BIN") or str(REPO / "target" / "debug" / "apitokens")


def module_path() -> Path:
    """The filter module Envoy loads ($APITOKENS_WASM or the release build)."""
    return Path(os.path.abspath(os.environ["APITOKENS_WASM"])) if os.environ.get("APITOKENS_WASM") else MODULE


def missing_binaries() -> list[str]:
    return [p for p in (apitokens_bin(), envoy_bin(), str(module_path())) if not os.path.exists(p)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A sample line: its name, its labels (quoted values may hold `}` and escaped
# quotes) and its value.
SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[^"}]|"(?:[^"\\]|\\.)*")*\})?\s+(\S+)')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def series(text: str) -> list[tuple[str, str, dict[str, str], float]]:
    """The samples of a Prometheus/OpenMetrics text: (name, labels as written,
    labels, value)."""
    out = []
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if m and not line.startswith("#"):
            written = m.group(2) or ""
            out.append((m.group(1), written, dict(LABEL.findall(written)), float(m.group(3))))
    return out


def samples(text: str) -> dict[str, float]:
    """The samples as {'name{labels}': value} (labels as the server wrote them)."""
    return {name + written: value for name, written, _, value in series(text)}


def tokens_path(ns: str = "default", token: str | None = None) -> str:
    base = f"/apitokens/v1/namespaces/{ns}/apitokens"
    return base if token is None else f"{base}/{token}"


def issued_secret(r: Response) -> str:
    """The secret of a 2xx create or regenerate answer, remembered for the leak search."""
    return remember_secret(r.json()["apiToken"]["secret"])


def create(port: int, owner: str, token_id: str, role: str, ns: str = "default", **extra) -> Response:
    body = {"name": f"namespaces/{ns}/apitokens/{token_id}", "role": role, **extra}
    r = request(port, "POST", tokens_path(ns), owner, body)
    if r.status == 200:
        issued_secret(r)
    return r


def version_of(r: Response) -> int:
    return int(r.headers["x-apitokens-config-version"])


def revision_of(version_info: str) -> int:
    """The revision of a version as Envoy reports it over xDS (`EPOCH.REVISION`)."""
    return int(version_info.rsplit(".", 1)[-1])


def issue(cp: "ControlPlane", token_id: str, role: str) -> str:
    """A new token of namespace default (the owner in `cp.owners`, as
    testkit.fixtures' `cp` has it), acknowledged by every Envoy: its secret."""
    r = create(cp.api_port, cp.owners["default"], token_id, role)
    assert r.status == 200, r
    cp.wait_applied(version_of(r))
    return r.json()["apiToken"]["secret"]


def until_status(envoy: "harness.Envoy", path: str, token: str | None, status: int, timeout: float = 5.0,
                 method: str = "GET") -> float:
    """Seconds until Envoy answers `status` (fresh connection per try)."""
    start = time.monotonic()
    poll(lambda: envoy.get(path, token, method=method).status == status, timeout,
         f"{method} {path} -> {status}", interval=0.001)
    return time.monotonic() - start


class ControlPlane:
    """One `apitokens serve` process (restartable on the same ports and database):
    on the SQLite file `db`, or on `store` (a PostgreSQL URL) when given."""

    def __init__(self, workdir: Path, name: str = "cp", plugin_config: Path = PLUGIN_BASE,
                 always: tuple[str, ...] = (), store: str | None = None):
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.db = self.dir / "apitokens.db"
        self.store = store
        self.api_port = free_port()
        self.xds_port = free_port()
        self.proc: subprocess.Popen | None = None
        self.runs = 0
        self.extra: list[str] = []
        self.plugin_config = plugin_config
        # `serve` arguments of every start (a suite's settings), before a start's own.
        self.always = always

    @property
    def logs(self) -> list[Path]:
        return sorted(self.dir.glob("serve-*.log"))

    def log_text(self) -> str:
        return "".join(p.read_text("utf-8", "replace") for p in self.logs)

    def store_args(self) -> list[str]:
        return ["--store", self.store] if self.store else ["--db", str(self.db)]

    def bootstrap(self, namespace: str, name: str) -> str:
        out = subprocess.run(
            [apitokens_bin(), "bootstrap", *self.store_args(), "--namespace", namespace, "--name", name],
            capture_output=True, text=True, check=True, timeout=limit(30),
        )
        secret = remember_secret(out.stdout.strip())
        (self.dir / f"bootstrap-{name}.stderr").write_text(out.stderr)
        return secret

    def render(self) -> dict:
        """The plugin configuration the store holds now (`apitokens render`: digests, expired left out)."""
        out = subprocess.run([apitokens_bin(), "render", *self.store_args()],
                             capture_output=True, text=True, check=True, timeout=limit(30))
        return json.loads(out.stdout)

    def start(self, *extra: str) -> "ControlPlane":
        self.runs += 1
        self.extra = list(extra)
        if os.environ.get("APITOKENS_WASM") and "--wasm-module" not in extra:
            extra = ("--wasm-module", str(module_path()), *extra)
        cmd = [
            apitokens_bin(), "serve",
            *self.store_args(),
            "--listen", f"127.0.0.1:{self.api_port}",
            "--xds-listen", f"127.0.0.1:{self.xds_port}",
            "--plugin-config", str(self.plugin_config),
            "--poll-interval-ms", "200",
            *self.always,
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
            return self.proc.wait(limit(timeout))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(limit(5))

    def api(self, method: str, path: str, token: str | None = None, body=None, headers=None) -> Response:
        return request(self.api_port, method, path, token, body, headers)

    def status(self, version: int | None = None, wait: float = 0) -> dict:
        """/status; with `version`, once it is applied or `wait` s have passed
        (a window, not scaled: `wait_applied` scales its limit)."""
        q = "" if version is None else f"?version={version}&waitSeconds={wait}"
        return request(self.api_port, "GET", "/status" + q, timeout=10 + wait).json()

    def metrics_text(self) -> str:
        """`GET /metrics`: the OpenMetrics text, checked for its type and end."""
        r = request(self.api_port, "GET", "/metrics")
        assert r.status == 200, r
        assert r.headers["content-type"].startswith("application/openmetrics-text"), r.headers
        text = r.body.decode()
        assert text.endswith("# EOF\n"), text[-200:]
        return text

    def metrics(self) -> dict[str, float]:
        """`GET /metrics` as {'name{labels}': value} (labels as the server wrote them)."""
        return samples(self.metrics_text())

    def wait_applied(self, version: int, timeout: float = 10) -> dict:
        st = self.status(version, limit(timeout))
        assert st["applied"], f"version {version} not acknowledged: {json.dumps(st, indent=1)}"
        return st

    def envoy_status(self, node: str) -> dict:
        return next((e for e in self.status()["envoys"] if e["node"] == node), {})


def hcm_of(bootstrap: dict) -> dict:
    """The HTTP connection manager of the first listener's first filter chain."""
    return bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def ecds_bootstrap(cp: ControlPlane, upstream_port: int, node: str) -> dict:
    """envoy/envoy-ecds.yaml as shipped, its ports replaced (listener and admin:
    port 0; clusters: the upstream, the control plane's API and xDS ports) and
    its node id set. With $APITOKENS_WASM the deny-all default uses that module."""
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
    if os.environ.get("APITOKENS_WASM"):
        default = hcm_of(config)["http_filters"][0]["config_discovery"]["default_config"]
        default["config"]["vm_config"]["code"]["local"]["filename"] = str(module_path())
    return copy.deepcopy(config)


def file_plane(workdir: Path, name: str) -> tuple["ControlPlane", Path, str]:
    """A started `serve` that writes the ECDS file instead of serving gRPC,
    its file, and the owner of namespace default."""
    cp = ControlPlane(workdir / name, name=name)
    ecds_file = cp.dir / "apitokens-ecds.pb"
    owner = cp.bootstrap("default", "admin")
    cp.start("--no-xds", "--ecds-file", str(ecds_file))
    return cp, ecds_file, owner


def from_file(ecds_file: Path) -> Callable[[dict], None]:
    """A `shipped_envoy` mutation: the filter's configuration from the ECDS
    file `serve --ecds-file` writes (watched by Envoy) instead of gRPC."""

    def mutate(config: dict) -> None:
        hcm_of(config)["http_filters"][0]["config_discovery"]["config_source"] = {
            "resource_api_version": "V3",
            "path_config_source": {"path": str(ecds_file)},
        }

    return mutate


def shipped_envoy(workdir: Path, cp: ControlPlane, upstream_port: int, node: str,
                  mutate: Callable[[dict], None] | None = None, cwd: Path = REPO,
                  concurrency: int = 2) -> harness.Envoy:
    """An Envoy (not started) on envoy-ecds.yaml as shipped (`ecds_bootstrap`,
    then `mutate` if given): its stdout access log to access.log, the log at
    info level without the filter's debug lines (tests/cp)."""
    config = ecds_bootstrap(cp, upstream_port, node)
    if mutate:
        mutate(config)
    return harness.Envoy(workdir, config, name=node, stdout="access.log", wasm_debug=False, cwd=cwd,
                         concurrency=concurrency)


def ecds_envoy(workdir: Path, cp: ControlPlane, upstream, node: str) -> "harness.Envoy":
    """A started Envoy on envoy-ecds.yaml as shipped, configured by `cp`, with
    the JSON access log of tests/e2e (so testkit.checks finds each request by
    its x-e2e-id); returns after its first ACK (tests/security, tests/drills)."""
    config = ecds_bootstrap(cp, upstream.port, node)
    hcm_of(config)["access_log"] = harness.json_access_log(workdir / node / "access.log")
    envoy = harness.Envoy(workdir / node, config, name=node)
    envoy.upstream = upstream
    envoy.start()
    poll(lambda: cp.envoy_status(node).get("ackedVersion"), 15, f"first ACK from {node}")
    return envoy


def reporting_plane(workdir: Path, upstream, name: str, node: str) -> ControlPlane:
    """A started control plane whose filters report usage every second,
    written to its store every second, with the owner of `default` (`owner`)
    and its Envoy (`envoy`, `ecds_envoy`); stop both with `stop_reporting_plane`."""
    base = reporting_every_second(workdir / f"plugin-{name}.json")
    cp = ControlPlane(workdir / name, name=name, plugin_config=base)
    cp.owner = cp.bootstrap("default", "admin")  # type: ignore[attr-defined]
    cp.start("--usage-flush-seconds", "1")
    cp.envoy = ecds_envoy(workdir, cp, upstream, node)  # type: ignore[attr-defined]
    return cp


def stop_reporting_plane(cp: ControlPlane) -> None:
    cp.envoy.stop()  # type: ignore[attr-defined]
    cp.stop()
