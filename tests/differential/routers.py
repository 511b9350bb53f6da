"""The routers of the differential suite and the Envoy in front of them,
shared by conftest.py (fixtures, the closing totals) and the test.

Upstreams (each a real framework from its registry, serving routes.json and
answering which route ran, as which method, in which namespace):

  express-default   Express 5 + method-override (npm), case-insensitive routing
  express-format    the same, every route also with a format suffix
  flask-default     Flask 3 + the method-override WSGI middleware (PyPI)
  flask-tolerant    the same with strict_slashes off
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import yaml

from testkit import harness

HERE = Path(__file__).resolve().parent
SHIPPED = harness.REPO_ROOT / "envoy" / "envoy.yaml"
UPSTREAM_HEADER = "x-differential-upstream"
UPSTREAMS = {
    "express-default": ["node", str(HERE / "express_app.js"), "--mode", "default"],
    "express-format": ["node", str(HERE / "express_app.js"), "--mode", "format"],
    "flask-default": [sys.executable, str(HERE / "flask_app.py"), "--mode", "default"],
    "flask-tolerant": [sys.executable, str(HERE / "flask_app.py"), "--mode", "tolerant"],
}
ROLES = ("viewer", "editor", "owner")

# Per request: (upstream, role, variant label, passed). Totals at the end.
OUTCOMES: list[tuple[str, str, str, bool]] = []
# Per upstream: how many requests reached it, and how many ran a route.
REACHED: dict[str, list[int]] = {}


class Upstream:
    def __init__(self, name: str, command: list[str], workdir: Path):
        self.name = name
        self.log = workdir / f"{name}.log"
        self.proc = subprocess.Popen(command, cwd=HERE, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=open(self.log, "wb"), text=True, start_new_session=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.startswith("listening "):
            self.stop()
            raise RuntimeError(f"{name} did not start: {line!r}\n{self.log.read_text()[-2000:]}")
        self.port = int(line.split()[1])

    def stop(self) -> None:
        harness.stop_process(self.proc)


def shipped_with(upstreams: dict[str, Upstream], tokens: dict[str, harness.Token], access_log: Path) -> dict:
    """envoy/envoy.yaml with loopback port 0, the built module, these tokens
    instead of the demo ones, a JSON access log, and one route and cluster per
    upstream, chosen by UPSTREAM_HEADER. Everything else as shipped."""
    config = yaml.safe_load(SHIPPED.read_text())
    config["admin"]["address"]["socket_address"]["port_value"] = 0
    listener = config["static_resources"]["listeners"][0]
    listener["address"]["socket_address"]["port_value"] = 0
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    wasm = hcm["http_filters"][0]["typed_config"]["config"]
    wasm["vm_config"]["code"]["local"]["filename"] = harness.wasm_module()
    plugin = json.loads(wasm["configuration"]["value"])
    plugin["tokens"] = [t.entry() for t in tokens.values()]
    wasm["configuration"]["value"] = json.dumps(plugin)
    hcm["access_log"] = harness.json_access_log(access_log)
    (vhost,) = hcm["route_config"]["virtual_hosts"]
    vhost["routes"] = [
        {"match": {"prefix": "/", "headers": [{"name": UPSTREAM_HEADER, "string_match": {"exact": name}}]},
         "route": {"cluster": name, "timeout": "15s"}}
        for name in upstreams
    ]
    (template,) = config["static_resources"]["clusters"]
    clusters = []
    for name, upstream in upstreams.items():
        cluster = copy.deepcopy(template)
        cluster["name"] = cluster["load_assignment"]["cluster_name"] = name
        endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        endpoint["address"]["socket_address"]["port_value"] = upstream.port
        clusters.append(cluster)
    config["static_resources"]["clusters"] = clusters
    return config
