"""Start, observe and stop a real Envoy running the apitokens Wasm filter.

Everything here talks to 127.0.0.1 only. Envoy binds port 0 for its listener and
its admin interface; the harness reads the ports back (admin address file and
``/listeners``), so there is no race for free ports.

`Envoy` runs any bootstrap: the static one `bootstrap` builds here (tests/e2e)
or envoy/envoy-ecds.yaml as testkit.controlplane adapts it (the other suites).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from testkit.clients import Response, request
from testkit.timing import limit

REPO_ROOT = Path(__file__).resolve().parents[3]


def envoy_bin() -> str:
    """$ENVOY_BIN (relative to the current directory) or <repo>/.venv/bin/envoy."""
    return os.path.abspath(os.environ.get("ENVOY_BIN") or REPO_ROOT / ".venv" / "bin" / "envoy")


def wasm_module() -> str:
    """$APITOKENS_WASM (relative to the current directory) or the release build in <repo>/target."""
    return os.path.abspath(
        os.environ.get("APITOKENS_WASM") or REPO_ROOT / "target" / "wasm32-wasip1" / "release" / "apitokens_filter.wasm"
    )


# Every secret this test run made or had issued (tokens generated here, secrets
# the control plane issued, imported ones), for the leak search at the end.
SECRETS: list[str] = []


def remember_secret(secret: str) -> str:
    """Add `secret` to SECRETS (the leak search looks for it); returns it."""
    SECRETS.append(secret)
    return secret


def new_secret() -> str:
    return remember_secret(secrets.token_urlsafe(24))  # b64token charset: A-Z a-z 0-9 - _


def sha256_hex(secret: str | bytes) -> str:
    data = secret.encode() if isinstance(secret, str) else secret
    return hashlib.sha256(data).hexdigest()


def rfc3339(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


@dataclass
class Token:
    namespace: str
    short_name: str
    role: str
    expire_time: str = "2099-01-01T00:00:00Z"
    secret: str = field(default_factory=new_secret)
    # Suspended: in the configuration as `"disabled": true`, refused.
    disabled: bool = False
    # Conditions: refused before this RFC 3339 time; usable only from these
    # client addresses ({"allow": [...], "except": [...]}).
    not_before_time: str | None = None
    client_addresses: dict | None = None
    # At most this request rate at each gateway ({"requests", "per", "burst"}).
    rate_limit: dict | None = None

    @property
    def name(self) -> str:
        return f"namespaces/{self.namespace}/apitokens/{self.short_name}"

    def entry(self) -> dict:
        entry = {
            "name": self.name,
            "role": self.role,
            "secretSha256": sha256_hex(self.secret),
            "expireTime": self.expire_time,
        }
        if self.disabled:
            entry["disabled"] = True
        if self.not_before_time is not None:
            entry["notBeforeTime"] = self.not_before_time
        if self.client_addresses is not None:
            entry["clientAddresses"] = self.client_addresses
        if self.rate_limit is not None:
            entry["rateLimit"] = self.rate_limit
        return entry

    @property
    def authorization(self) -> str:
        return f"Bearer {self.secret}"


def plugin_config(tokens: Iterable[Token], **extra) -> dict:
    return {"tokens": [t.entry() for t in tokens], **extra}


# --------------------------------------------------------------------------
# Envoy bootstrap, generated as JSON (Envoy accepts .json bootstrap files)
# --------------------------------------------------------------------------

ACCESS_LOG_FORMAT = {
    "e2e_id": "%REQ(X-E2E-ID)%",
    "method": "%REQ(:METHOD)%",
    "path": "%PATH(NQ:PATH)%",  # never log query strings: they may carry credentials
    "protocol": "%PROTOCOL%",
    "code": "%RESPONSE_CODE%",
    "details": "%RESPONSE_CODE_DETAILS%",
    "flags": "%RESPONSE_FLAGS%",
    "upstream_host": "%UPSTREAM_HOST%",
}


def json_access_log(path: Path) -> list[dict]:
    """An HCM `access_log` writing ACCESS_LOG_FORMAT as JSON lines to `path`
    (what `Envoy.access_log_entry` reads)."""
    return [
        {
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": str(path),
                "log_format": {"json_format": ACCESS_LOG_FORMAT},
            },
        }
    ]


def wasm_filter(plugin_cfg: dict | str, module: str) -> dict:
    configuration = plugin_cfg if isinstance(plugin_cfg, str) else json.dumps(plugin_cfg)
    return {
        "name": "envoy.filters.http.wasm",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": "apitokens",
                "root_id": "apitokens",
                "vm_config": {
                    "vm_id": "apitokens",
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": {"local": {"filename": module}},
                },
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": configuration,
                },
                "failure_policy": "FAIL_CLOSED",
            },
        },
    }


def bootstrap(plugin_cfg: dict | str, upstream_port: int, access_log: Path, module: str) -> dict:
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "ingress",
        "codec_type": "AUTO",
        "normalize_path": True,
        "merge_slashes": True,
        "path_with_escaped_slashes_action": "REJECT_REQUEST",
        "common_http_protocol_options": {"headers_with_underscores_action": "REJECT_REQUEST"},
        "use_remote_address": True,
        "access_log": json_access_log(access_log),
        "route_config": {
            "name": "local",
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "upstream", "timeout": "5s"}}],
                }
            ],
        },
        "http_filters": [
            wasm_filter(plugin_cfg, module),
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
            },
        ],
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "ingress",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    # One accept queue, connections handed to the least busy worker:
                    # two connections held open at once land on different workers
                    # (and so on different Wasm VMs).
                    "enable_reuse_port": False,
                    "connection_balance_config": {"exact_balance": {}},
                    "filter_chains": [
                        {
                            "filters": [
                                {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "upstream",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": "upstream",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {"address": "127.0.0.1", "port_value": upstream_port}
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ],
        },
    }


# --------------------------------------------------------------------------
# Process control
# --------------------------------------------------------------------------

# Log lines that mean a Wasm VM trapped or failed (see shared notes: a trap
# moves no stat, only the log shows it).
WASM_FAILURE_PATTERNS = (
    "panicked at",
    "RuntimeError",
    "Wasm VM failed",
    "failed to load",
    "proxy_on_request_headers failed",
    "Function: proxy_on",
)


_INVENTORY = re.compile(r"\[source/server/server\.cc:\d+\] ( {2}|HTTP header map info|statically linked extensions)")


def stop_process(proc: subprocess.Popen | None) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 10 s (scaled)."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(limit(10))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(limit(5))


class EnvoyStartError(RuntimeError):
    pass


def poll(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.01):
    """Call `predicate` every `interval` s until it returns something truthy;
    return it, or raise TimeoutError (naming `what`) after `timeout` s.

    `timeout` is a waiting limit: it is scaled (testkit.timing). A test that
    asserts how long something took measures it apart (`until_status`
    returns the seconds)."""
    timeout = limit(timeout)
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


class Envoy:
    """One Envoy process with its own directory for config, logs and admin address.

    `stdout`: the file (in that directory) that gets Envoy's standard output,
    `access.log` for a configuration that logs requests to stdout (the shipped
    envoy-ecds.yaml); `wasm_debug`: the filter's debug lines (one per refusal)
    in the log, as well as Envoy's info level; `cwd`: Envoy's working
    directory, against which relative module paths resolve (the repository)."""

    instances: list["Envoy"] = []

    def __init__(self, workdir: Path, config: dict, name: str = "envoy", *, stdout: str = "stdout.txt",
                 wasm_debug: bool = True, cwd: Path = REPO_ROOT, concurrency: int = 2):
        self.name = name
        self.concurrency = concurrency
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.dir / "envoy.json"
        self.log_path = self.dir / "envoy.log"
        self.access_log_path = self.dir / "access.log"
        self.admin_address_path = self.dir / "admin.address"
        self.stdout_path = self.dir / stdout
        self.wasm_debug = wasm_debug
        self.cwd = cwd
        self.config_path.write_text(json.dumps(config, indent=2))
        self.proc: subprocess.Popen | None = None
        self.admin_url = ""
        self.port = 0
        self.ready = False
        # Envoy's hot restart: (restart epoch, the file holding the base id
        # the first epoch picked). None: hot restart disabled.
        self.hot_restart: tuple[int, Path] | None = None
        Envoy.instances.append(self)

    # -- lifecycle ---------------------------------------------------------

    def command(self) -> list[str]:
        return [
            envoy_bin(),
            "-c", str(self.config_path),
            "--concurrency", str(self.concurrency),
            # No hot-restart shared memory: any number of Envoys coexist, and a
            # crashed one leaves nothing behind that blocks the next. (Unless
            # hot restart is the point: the first epoch picks a free base id,
            # the next ones join it; the old process drains for 1 s and exits
            # 3 s after the new one started.)
            *self._hot_restart_args(),
            "-l", "info",
            *(["--component-log-level", "wasm:debug"] if self.wasm_debug else []),
            "--log-path", str(self.log_path),
            "--admin-address-path", str(self.admin_address_path),
            # Flush logs (application and access) every 20 ms instead of 10 s.
            "--file-flush-interval-msec", "20",
        ]

    def _hot_restart_args(self) -> list[str]:
        if self.hot_restart is None:
            return ["--disable-hot-restart"]
        epoch, base_id_path = self.hot_restart
        base = (["--use-dynamic-base-id", "--base-id-path", str(base_id_path)] if epoch == 0
                else ["--base-id", base_id_path.read_text().strip()])
        return [*base, "--restart-epoch", str(epoch), "--drain-time-s", "1", "--parent-shutdown-time-s", "3"]

    def spawn(self) -> subprocess.Popen:
        # A restart: the previous process's admin address is not this one's.
        self.admin_address_path.unlink(missing_ok=True)
        self.ready = False
        self.proc = subprocess.Popen(
            self.command(),
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=open(self.stdout_path, "wb"),
            stderr=open(self.dir / "stderr.txt", "wb"),
            start_new_session=True,
        )
        return self.proc

    def start(self, timeout: float = 30.0) -> "Envoy":
        timeout = limit(timeout)
        self.spawn()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EnvoyStartError(
                    f"{self.name} exited with {self.proc.returncode} during startup\n" + self.diagnostics(lines=25)
                )
            if self.admin_address_path.exists() and self.admin_address_path.read_text().strip():
                self.admin_url = "http://" + self.admin_address_path.read_text().strip()
                try:
                    if self.admin_get("/ready").strip() == "LIVE":
                        self.port = self._listener_port()
                        self.ready = True
                        return self
                except (OSError, urllib.error.URLError):
                    pass
            time.sleep(0.02)
        self.stop()
        raise EnvoyStartError(f"{self.name} not ready after {timeout}s\n" + self.diagnostics())

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(limit(timeout))
        finally:
            if self.proc.poll() is None:
                self.stop()

    def stop(self) -> None:
        stop_process(self.proc)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def node(self) -> str:
        """The xDS node id of an Envoy the control plane configures (its name)."""
        return self.name

    # -- admin -------------------------------------------------------------

    def admin_get(self, path: str, timeout: float = 5.0) -> str:
        with urllib.request.urlopen(self.admin_url + path, timeout=limit(timeout)) as resp:
            return resp.read().decode("utf-8", "replace")

    def _listener_port(self) -> int:
        listeners = json.loads(self.admin_get("/listeners?format=json"))
        for listener in listeners["listener_statuses"]:
            if listener["name"] == "ingress":
                return int(listener["local_address"]["socket_address"]["port_value"])
        raise EnvoyStartError("listener 'ingress' not found in /listeners")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, token: str | None = None, method: str = "GET", body=None, headers=None) -> Response:
        """One request to the listener on a fresh connection (`Authorization:
        Bearer <token>` with a token; a body other than bytes or str is sent as JSON)."""
        return request(self.port, method, path, token, body, headers)

    def stats(self) -> dict[str, int]:
        """Counters and gauges from /stats (text format), histograms left out."""
        out: dict[str, int] = {}
        for line in self.admin_get("/stats").splitlines():
            name, sep, value = line.rpartition(": ")
            if sep and re.fullmatch(r"-?\d+", value.strip()):
                out[name] = int(value)
        return out

    def prometheus(self) -> str:
        return self.admin_get("/stats/prometheus")

    # -- logs --------------------------------------------------------------

    def log_text(self) -> str:
        parts = []
        for p in (self.log_path, self.dir / "stderr.txt"):
            if p.exists():
                parts.append(p.read_text("utf-8", "replace"))
        return "".join(parts)

    def access_log(self) -> list[dict]:
        if not self.access_log_path.exists():
            return []
        entries = []
        for line in self.access_log_path.read_text("utf-8", "replace").splitlines():
            try:
                entries.append(json.loads(line))
            except ValueError:
                pass
        return entries

    def access_log_entry(self, e2e_id: str, timeout: float = 5.0) -> dict:
        """The access-log entry of the request that carried `x-e2e-id: <e2e_id>`."""

        def find():
            matches = [e for e in self.access_log() if e.get("e2e_id") == e2e_id]
            return matches[-1] if matches else None

        return poll(find, timeout, f"access log entry for x-e2e-id {e2e_id}", interval=0.02)

    def log_offset(self) -> int:
        """The number of log lines so far (for `wait_for_log(since=...)`), once
        earlier lines have been flushed (the size stays put over a few flush intervals)."""
        size = -1
        for _ in range(50):
            text = self.log_text()
            if len(text) == size:
                break
            size = len(text)
            time.sleep(0.08)
        return len(text.splitlines())

    def wait_for_log(
        self, predicate: Callable[[str], bool], since: int = 0, timeout: float = 5.0, what: str = "log line"
    ) -> str:
        """Wait for a line of the Envoy log (after the first `since` lines) satisfying `predicate`."""

        def find():
            for line in self.log_text().splitlines()[since:]:
                if predicate(line):
                    return line
            return None

        return poll(find, timeout, what, interval=0.02)

    def wasm_failure_lines(self) -> list[str]:
        return [
            line
            for line in self.log_text().splitlines()
            if any(p in line for p in WASM_FAILURE_PATTERNS)
        ]

    def diagnostics(self, lines: int = 60) -> str:
        def tail(text: str) -> str:
            # Leave out the startup inventory (extension and header-map lists).
            kept = [ln for ln in text.splitlines() if not _INVENTORY.search(ln)]
            return "\n".join(kept[-lines:])

        access = (
            self.access_log_path.read_text("utf-8", "replace") if self.access_log_path.exists() else "(none)"
        )
        return (
            f"===== {self.name}: {' '.join(self.command())}\n"
            f"----- envoy log (last {lines} lines) -----\n{tail(self.log_text())}\n"
            f"----- access log (last {lines} lines) -----\n{tail(access)}\n"
        )


def validate(config_path: Path, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """`envoy --mode validate`: parses the bootstrap, loads the Wasm module and runs
    the plugin's on_configure (so a rejected plugin configuration fails it), binds nothing."""
    return subprocess.run(
        [envoy_bin(), "--mode", "validate", "-c", str(config_path), "--disable-hot-restart", "-l", "info"],
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=limit(timeout),
    )
