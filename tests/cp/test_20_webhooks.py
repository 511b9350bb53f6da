"""Webhooks through real processes: the control plane delivers its audit
trail (and expiry warnings) to a real HTTP receiver on loopback as signed
CloudEvents, at least once and in order, from the store, across a kill -9
between commit and delivery and a receiver that is down for a while; never a
secret or a digest."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import time

import pytest

from testkit.certs import make_ca, make_cert
from testkit.controlplane import ControlPlane, apitokens_bin, create, free_port, tokens_path
from testkit.harness import poll, SECRETS
from testkit.timing import limit
from testkit.webhooks import Receiver, key_file

# How long the receiver is down in the outage test (make soak: a minute,
# tests/drills).
OUTAGE_S = float(os.environ.get("APITOKENS_WEBHOOK_OUTAGE_S", "3"))


@pytest.fixture(scope="module")
def certs(workdir):
    """A CA and a server certificate it signs for 127.0.0.1; another CA's."""
    d = workdir / "webhook-certs"
    d.mkdir(exist_ok=True)
    make_ca(d, "ca")
    make_cert(d, "server", "ca", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    make_ca(d, "other-ca")
    make_cert(d, "stranger", "other-ca", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    return d


@pytest.fixture(scope="module")
def receivers(workdir, certs):
    """Over HTTPS, one whose certificate --webhook-ca signed and one whose
    certificate it did not."""
    key = key_file(workdir / "webhook.key")
    trusted = Receiver(free_port(), key, tls=(str(certs / "server.pem"), str(certs / "server.key"))).start()
    stranger = Receiver(free_port(), key, tls=(str(certs / "stranger.pem"), str(certs / "stranger.key"))).start()
    yield trusted, stranger
    trusted.stop()
    stranger.stop()


@pytest.fixture(scope="module")
def hooked(workdir, certs, receivers):
    """A control plane of its own with a webhook to a receiver, and both
    (and two HTTPS endpoints, `receivers`)."""
    key = key_file(workdir / "webhook.key")
    receiver = Receiver(free_port(), key).start()
    trusted, stranger = receivers
    plane = ControlPlane(workdir / "cp-hooks", name="cp-hooks")
    plane.owner = plane.bootstrap("default", "admin")  # type: ignore[attr-defined]
    args = ("--webhook", f"audit={receiver.url}", "--webhook", f"tls={trusted.url}",
            "--webhook", f"stranger={stranger.url}", "--webhook-ca", str(certs / "ca.pem"),
            "--webhook-key-file", str(workdir / "webhook.key"),
            "--webhook-max-backoff-ms", "300", "--webhook-source", "apitokens://test",
            "--expiry-warning", "7d,1h", "--expiry-warning-scan-seconds", "1",
            "--namespace-writes-per-second", "0")
    plane.start(*args)
    plane.args = args  # type: ignore[attr-defined]
    yield plane, receiver
    plane.stop()
    receiver.stop()


def of(receiver: Receiver, token: str) -> list[str]:
    """The types of the events about `token`, in the order received (each id once)."""
    return [e["type"] for e in receiver.unique() if e["subject"] == f"namespaces/default/apitokens/{token}"]


def test_every_write_reaches_the_receiver_signed_in_order(hooked):
    plane, receiver = hooked
    r = create(plane.api_port, plane.owner, "hooked", "editor")
    assert r.status == 200, r
    secret = r.json()["apiToken"]["secret"]
    path = tokens_path(token="hooked")
    for action in (":regenerate", ":disable", ":enable"):
        assert plane.api("POST", path + action, plane.owner).status == 200
    assert plane.api("DELETE", path, plane.owner).status == 200
    want = [f"io.apitokens.apitoken.{a}" for a in ("create", "regenerate", "disable", "enable", "delete")]
    poll(lambda: of(receiver, "hooked") == want, 10, f"{want} at the receiver")
    e = next(e for e in receiver.unique() if e["subject"] == "namespaces/default/apitokens/hooked")
    assert e["specversion"] == "1.0" and e["source"] == "apitokens://test"
    assert e["data"]["event"] == "apitoken.create" and e["data"]["role"] == "editor"
    assert e["data"]["actor"] == "namespaces/default/apitokens/admin"
    # Never a secret, nor a secret's digest.
    bodies = b"".join(d["body"] for d in receiver.got)
    for s in [secret, plane.owner, *SECRETS]:
        assert s.encode() not in bodies
        assert hashlib.sha256(s.encode()).hexdigest().encode() not in bodies


def test_https_endpoints_are_verified_against_the_webhook_ca(hooked, receivers):
    plane, receiver = hooked
    trusted, stranger = receivers
    r = create(plane.api_port, plane.owner, "over-tls", "viewer")
    assert r.status == 200, r
    poll(lambda: [e["type"] for e in trusted.unique() if e["subject"].endswith("/over-tls")] ==
         ["io.apitokens.apitoken.create"], 10, "the create over HTTPS")
    # A certificate no --webhook-ca signed: the handshake fails, nothing is
    # sent, and the delivery is retried (logged, counted).
    poll(lambda: 'apitokens_webhook_deliveries_total{endpoint="stranger",outcome="failed"}' in plane.metrics_text(),
         10, "failed deliveries to the stranger counted")
    assert stranger.got == []
    assert "webhook stranger" in plane.log_text() and "TLS" in plane.log_text()


def test_a_kill_9_between_commit_and_delivery_loses_nothing(hooked):
    plane, receiver = hooked
    receiver.stop()  # deliveries fail: the events stay in the outbox
    for i in range(5):
        r = create(plane.api_port, plane.owner, f"crash-{i}", "viewer")
        assert r.status == 200, r
    plane.stop(sig=signal.SIGKILL)
    receiver.start()
    plane.start(*plane.args)
    want = [f"namespaces/default/apitokens/crash-{i}" for i in range(5)]
    poll(lambda: [e["subject"] for e in receiver.unique() if e["subject"] in want] == want, 15,
         "the five creates, in order, after the restart")
    # At least once, not a storm: none of them more than twice.
    ids = [e["id"] for e in receiver.events() if e["subject"] in want]
    assert max(ids.count(i) for i in set(ids)) <= 2, ids


def test_a_receiver_down_for_a_while_gets_everything_afterwards_in_order(hooked):
    plane, receiver = hooked
    receiver.stop()
    started = time.monotonic()
    tokens = [f"outage-{i}" for i in range(4)]
    for t in tokens:
        assert create(plane.api_port, plane.owner, t, "viewer").status == 200
    for t in tokens[:2]:
        assert plane.api("POST", tokens_path(token=t) + ":disable", plane.owner).status == 200
    for t in tokens:
        assert plane.api("DELETE", tokens_path(token=t), plane.owner).status == 200
    time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - started)))
    before = len(receiver.got)
    receiver.start()
    for i, t in enumerate(tokens):
        want = ["io.apitokens.apitoken.create"] + (["io.apitokens.apitoken.disable"] if i < 2 else []) + \
            ["io.apitokens.apitoken.delete"]
        poll(lambda: of(receiver, t) == want, 15, f"{t}: {want}")
    # Each event once after the outage (the retries hit a closed port).
    ids = [e["id"] for e in receiver.events()[before:]]
    assert len(ids) == len(set(ids)), "an event delivered twice after the outage"
    # The log's order holds across tokens too.
    seqs = [int(e["id"].rsplit("-", 1)[1]) for e in receiver.unique()]
    assert seqs == sorted(seqs)


def test_a_token_about_to_expire_is_announced_once(hooked):
    plane, receiver = hooked
    soon = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 1800))
    assert create(plane.api_port, plane.owner, "expiring", "viewer", expireTime=soon).status == 200
    poll(lambda: "io.apitokens.apitoken.expiring" in of(receiver, "expiring"), 10, "the expiry warning")
    warning = next(e for e in receiver.unique() if e["type"] == "io.apitokens.apitoken.expiring")
    assert warning["data"]["expireTime"] == soon and warning["data"]["actor"] == "apitokens serve"
    # In the namespace's audit trail too, and given once: within 1 h, not
    # also for the 7 d lead.
    time.sleep(1.5)  # one more scan at least (every second)
    assert of(receiver, "expiring").count("io.apitokens.apitoken.expiring") == 1
    events = plane.api("GET", tokens_path() + ":events?pageSize=20", plane.owner).json()["events"]
    assert [e["event"] for e in events if e.get("token") == "namespaces/default/apitokens/expiring"] == \
        ["apitoken.expiring", "apitoken.create"]


def test_the_dashboards_webhook_panel_reads_what_a_delivering_plane_has(hooked):
    """test_16 checks the dashboard against the session's control plane,
    which has no webhook; these families exist only with --webhook."""
    from test_16_metrics import DASHBOARD, WITH_WEBHOOKS, known, metric_names
    plane, receiver = hooked
    poll(lambda: "apitokens_webhook_deliveries_total{" in plane.metrics_text(), 10, "a delivery counted")
    text = plane.metrics_text()
    names, labels = known(text)
    exprs = [(p["title"], t["expr"]) for p in json.loads(DASHBOARD.read_text())["panels"]
             for t in p.get("targets", []) if WITH_WEBHOOKS in t["expr"]]
    assert exprs, "the dashboard shows the webhooks"
    for title, expr in exprs:
        wanted, wanted_labels = metric_names(expr)
        for name in wanted:
            assert name in names, f"{title}: {name} is not in a delivering plane's scrape"
            assert not wanted_labels[name] - labels.get(name, set()), (title, name, labels.get(name))
    families = {m.group(1) for m in re.finditer(r"^# TYPE (apitokens_webhook_\S+) ", text, re.M)}
    assert families == {"apitokens_webhook_deliveries", "apitokens_webhook_oldest_undelivered_seconds"}
    used = {n for _, e in exprs for n in metric_names(e)[0]}
    assert all(any(u == f or u.startswith(f + "_") for u in used) for f in families), (families, used)


@pytest.mark.parametrize("extra,flag", [
    ((), "--webhook-key-file"),
    (("--webhook-key-file", "KEY", "--webhook-lease-ms", "15000"), "--webhook-lease-ms"),
    (("--webhook-key-file", "SHORT"), "--webhook-key-file"),
])
def test_webhook_settings_that_cannot_work_stop_serve_at_once(workdir, extra, flag):
    key_file(workdir / "good.key")
    (workdir / "short.key").write_text("too-short\n")
    files = {"KEY": str(workdir / "good.key"), "SHORT": str(workdir / "short.key")}
    args = [files.get(a, a) for a in extra]
    out = subprocess.run([apitokens_bin(), "serve", "--db", str(workdir / "never.db"),
                          "--webhook", "audit=http://127.0.0.1:9/hook", *args],
                         capture_output=True, text=True, timeout=limit(30))
    assert out.returncode != 0 and flag in out.stderr, (out.returncode, out.stderr)
    assert "too-short" not in out.stderr
