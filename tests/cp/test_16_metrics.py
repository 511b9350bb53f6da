"""`/metrics`: the control plane in Prometheus' text format, read from a real
run (the session's control plane and its ECDS Envoy): its counters move when a
write commits, Envoys acknowledge and a caller is refused (usage reports:
test_7); and every expression of the shipped Grafana dashboard
(deploy/grafana/apitokens.json) names metrics, and labels, that a real scrape
of the control plane or of Envoy has."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import h2.config
import h2.connection

from testkit.clients import request
from testkit.controlplane import create, samples, series, tokens_path, version_of
from testkit.harness import poll
from testkit.xds import STREAM_PATH, discovery_request

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "apitokens.json"


def scrape(cp) -> tuple[str, dict[str, float]]:
    text = cp.metrics_text()
    return text, samples(text)


def value(metrics: dict[str, float], key: str) -> float:
    return metrics.get(key, 0.0)


def test_a_write_moves_the_write_push_store_and_ack_metrics(cp, envoy, owner):
    # Every VM of the Envoy on the delta channel: a write travels there.
    poll(lambda: cp.envoy_status(envoy.node).get("delta"), 15, "the Envoy on the delta channel")
    _, before = scrape(cp)
    r = create(cp.api_port, owner, "metered", "viewer")
    assert r.status == 200, r
    revision = version_of(r)
    _, after = scrape(cp)
    created = 'apitokens_writes_total{operation="create",outcome="ok"}'
    assert value(after, created) == value(before, created) + 1
    assert value(after, "apitokens_write_apply_seconds_count") == value(before, "apitokens_write_apply_seconds_count") + 1
    assert value(after, "apitokens_delta_responses_total") > value(before, "apitokens_delta_responses_total")
    assert value(after, "apitokens_delta_bytes_total") > value(before, "apitokens_delta_bytes_total")
    assert after["apitokens_delta_streams"] >= 3, "two workers' VMs and the main thread's"
    inserts = 'apitokens_store_call_seconds_count{operation="insert"}'
    assert value(after, inserts) == value(before, inserts) + 1
    assert after["apitokens_published_revision"] == revision
    assert after['apitokens_envoys{state="connected"}'] >= 1
    assert after['apitokens_envoys{state="applied"}'] == after['apitokens_envoys{state="connected"}']
    acked = {k: v for k, v in after.items()
             if k.startswith("apitokens_envoy_acknowledged_revision{") and f'node="{envoy.node}"' in k}
    assert list(acked.values()) == [revision], acked
    # A refused caller is counted by why; nothing is committed.
    anonymous = request(cp.api_port, "DELETE", tokens_path(token="metered"))
    assert anonymous.status == 401
    _, refused = scrape(cp)
    unauthenticated = 'apitokens_writes_total{operation="delete",outcome="unauthenticated"}'
    assert value(refused, unauthenticated) == value(after, unauthenticated) + 1
    assert refused["apitokens_published_revision"] == revision


# --- the dashboard ---------------------------------------------------------

KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}


def metric_names(expr: str) -> tuple[set[str], dict[str, set[str]]]:
    """The metrics an expression reads, and the labels it uses of each
    (in matchers) plus those it groups by (any metric of the expression)."""
    groups = set()
    for m in re.finditer(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        groups |= {g.strip() for g in m.group(1).split(",") if g.strip()}
    stripped = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", " ", expr)
    labels: dict[str, set[str]] = {}
    names = set()
    for m in re.finditer(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{[^}]*\})?(\s*\()?", re.sub(r"\[[^\]]*\]", " ", stripped)):
        name, matchers, call = m.group(1), m.group(2), m.group(3)
        if call or name in KEYWORDS or re.fullmatch(r"\d.*", name):
            continue
        names.add(name)
        labels[name] = set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", matchers or ""))
    for name in names:
        labels[name] |= groups - {"le"}
    return names, labels


def known(text: str) -> tuple[set[str], dict[str, set[str]]]:
    """The sample names a scrape can have (from its TYPE lines: counters with
    _total, histograms' _bucket, _count, _sum) and the labels seen on each."""
    names = set()
    for m in re.finditer(r"^# TYPE (\S+) (\S+)", text, re.M):
        base, kind = m.group(1), m.group(2)
        names.add(base)
        if kind == "counter":
            names.add(base + "_total")
        if kind == "histogram":
            names |= {base + "_bucket", base + "_count", base + "_sum"}
    labels: dict[str, set[str]] = {}
    for name, _, seen, _ in series(text):
        labels.setdefault(name, set()).update(seen)
    return names, labels


# Families a control plane has only with --webhook: checked against a plane
# that delivers webhooks (test_20_webhooks.py), with the same rules.
WITH_WEBHOOKS = "apitokens_webhook_"


def test_every_dashboard_expression_names_a_metric_that_exists(cp, envoy, owner):
    # A request of each kind first, so that the filter's counters have samples.
    assert envoy.get("/api/v1/namespaces/default/deployments", owner).status == 200
    assert envoy.get("/api/v1/namespaces/default/deployments", None).status == 401
    cp_text, _ = scrape(cp)
    names, labels = known(cp_text)
    envoy_names, envoy_labels = known(envoy.prometheus())
    names |= envoy_names
    for name, seen in envoy_labels.items():
        labels.setdefault(name, set()).update(seen)
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20, "the dashboard has its panels"
    used = set()
    for title, expr in exprs:
        wanted, wanted_labels = metric_names(expr)
        assert wanted, f"{title}: no metric in {expr!r}"
        if all(name.startswith(WITH_WEBHOOKS) for name in wanted):
            continue
        for name in wanted:
            assert name in names, f"panel {title!r}: {name} is in no scrape of the control plane or Envoy ({expr})"
            used.add(name)
            # Labels are checked where the scrape has samples (an error
            # counter of a healthy run has none yet).
            if labels.get(name):
                missing = wanted_labels[name] - labels[name]
                assert not missing, f"panel {title!r}: {name} has no label {sorted(missing)} ({expr})"
    # Every family of the control plane is on the dashboard.
    families = {m.group(1) for m in re.finditer(r"^# TYPE (apitokens_\S+) ", cp_text, re.M)}
    shown = {f for f in families if any(u == f or u.startswith(f + "_") for u in used)}
    assert shown == families, f"not on the dashboard: {sorted(families - shown)}"


# --- logs ------------------------------------------------------------------

def test_json_logs_carry_the_fields_as_fields(workdir):
    from testkit.controlplane import ControlPlane

    plane = ControlPlane(workdir / "cp-json-logs", name="cp-json-logs")
    owner = plane.bootstrap("default", "admin")
    plane.start("--log-format", "json", "--namespace-writes-per-second", "0")
    try:
        r = create(plane.api_port, owner, "logged", "editor")
        assert r.status == 200, r
        revision = version_of(r)
        assert plane.api("DELETE", tokens_path(token="logged"), owner).status == 200
        # An ECDS stream (a raw HTTP/2 client), then gone: its events carry its span.
        sock = socket.create_connection(("127.0.0.1", plane.xds_port))
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":path", STREAM_PATH),
                                (":authority", "xds"), ("content-type", "application/grpc"), ("te", "trailers")])
        conn.send_data(sid, discovery_request("json-logs-node"))
        sock.sendall(conn.data_to_send())
        poll(lambda: any(e["node"] == "json-logs-node" for e in plane.status()["envoys"]), 10, "the stream connected")
        sock.close()
        poll(lambda: not any(e["node"] == "json-logs-node" and e["connected"] for e in plane.status()["envoys"]),
             10, "the stream gone")
    finally:
        plane.stop()
    lines = [line for line in plane.log_text().splitlines() if line.strip()]
    assert len(lines) >= 5
    # Every line is one JSON object, audit events included.
    records = [json.loads(line) for line in lines]
    created = [r for r in records if r.get("token") == "namespaces/default/apitokens/logged"
               and r.get("message", "").startswith("created")]
    assert len(created) == 1, records
    c = created[0]
    assert (c["level"], c["namespace"], c["role"], c["revision"]) == ("INFO", "default", "editor", revision)
    assert c["span"]["caller"] == "namespaces/default/apitokens/admin"
    assert c["span"]["method"] == "POST"
    api = [r for r in records if r.get("status") == 200 and r.get("span", {}).get("method") == "DELETE"]
    assert len(api) == 1 and api[0]["duration_ms"] >= 0, records
    assert api[0]["span"]["path"] == tokens_path(token="logged")
    audits = [r["audit"] for r in records if "audit" in r]
    assert [a["event"] for a in audits] == ["apitoken.create", "apitoken.delete"], audits
    published = [r for r in records if "tokens" in r and "revision" in r]
    assert any(r["revision"] == revision for r in published), "the configuration's revision as a field"
    # Every event of an xDS stream is logged in the stream's span: its peer,
    # number and node once its first request named them, to its end.
    streamed = [r for r in records if r.get("span", {}).get("name") == "xds_stream"]
    assert all(r["span"]["peer"].startswith("127.0.0.1:") for r in streamed), streamed
    named = streamed[next(i for i, r in enumerate(streamed) if "connected as stream" in r["message"]):]
    spans = {(r["span"].get("stream"), r["span"].get("node")) for r in named}
    (stream, node), = spans
    assert isinstance(stream, int) and "json-logs-node" in str(node), spans
    assert "disconnected" in named[-1]["message"], named
