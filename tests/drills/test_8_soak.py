"""The long drills (`make soak`, APITOKENS_SOAK=1):

- reconfiguration soak: 1,000 configuration pushes (creates and revokes, each
  acknowledged by Envoy) while a load generator sends requests over HTTP/1.1
  and HTTP/2 with stable, live and revoked secrets: no 5xx, no request sent
  after the revoking version was acknowledged is allowed, Envoy's memory
  grows by less than 10% (resident set, after 100 pushes of warm-up to the end);
- the kill -9 loop of test_1_kill9.py (testkit/kill9.py), 50 rounds.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from testkit.controlplane import create, tokens_path, version_of
from testkit.fixtures import NODE
from testkit.kill9 import Drill
from testkit.load import Load, bad_answers, summary

PUSHES = int(os.environ.get("APITOKENS_SOAK_PUSHES") or 1000)
WARM_UP = 100
LIVE = 10
KILL_ROUNDS = int(os.environ.get("APITOKENS_SOAK_KILLS") or 50)
RELOADS = "extension_config_discovery.http_filter.apitokens.config_reload"


def rss_kib(envoy) -> int:
    for line in open(f"/proc/{envoy.proc.pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


class Secrets:
    """Stable secrets (always allowed), live ones (created, not yet revoked),
    and revoked ones with the wall time their revocation was acknowledged."""

    def __init__(self, stable: list[str], rng):
        self.stable, self.rng = stable, rng
        self.live: list[str] = []
        self.revoked_at: dict[str, float] = {}
        self.recent: list[str] = []
        self.lock = threading.Lock()

    def pick(self) -> str:
        with self.lock:
            pools = [p for p in (self.stable, self.live, self.recent) if p]
            return self.rng.choice(self.rng.choice(pools))

    def revoked(self, secret: str, acknowledged: float) -> None:
        with self.lock:
            self.revoked_at[secret] = acknowledged
            self.recent = (self.recent + [secret])[-20:]


@pytest.mark.soak
def test_reconfiguration_soak(cp, envoy, rng, figures):
    owner = cp.owners["default"]
    stable = []
    for i in range(2):
        r = create(cp.api_port, owner, f"soak-stable-{i}", "viewer")
        cp.wait_applied(version_of(r))
        stable.append(r.json()["apiToken"]["secret"])
    secrets = Secrets(stable, rng)
    reloads = envoy.stats().get(RELOADS, 0)
    rss = {"start": rss_kib(envoy)}
    live_ids: list[tuple[str, str]] = []
    started = time.monotonic()
    with Load(envoy, secrets.pick, threads=4, max_seconds=1800) as load:
        for i in range(PUSHES):
            if len(live_ids) < LIVE or i % 2 == 0:
                r = create(cp.api_port, owner, f"soak-{i}", rng.choice(["viewer", "editor", "owner"]))
                assert r.status == 200, r
                cp.wait_applied(version_of(r))
                secret = r.json()["apiToken"]["secret"]
                live_ids.append((f"soak-{i}", secret))
                with secrets.lock:
                    secrets.live.append(secret)
            else:
                token_id, secret = live_ids.pop(0)
                with secrets.lock:
                    secrets.live.remove(secret)
                r = cp.api("DELETE", tokens_path(token=token_id), owner)
                assert r.status == 200, r
                cp.wait_applied(version_of(r))
                secrets.revoked(secret, time.time())
            if i + 1 == WARM_UP:
                rss["warm"] = rss_kib(envoy)
        rss["end"] = rss_kib(envoy)
    elapsed = time.monotonic() - started
    samples = load.samples
    pushed = envoy.stats().get(RELOADS, 0) - reloads

    assert pushed >= PUSHES, f"Envoy applied {pushed} configurations, not {PUSHES}"
    assert bad_answers(samples) == [], bad_answers(samples)[:5]
    allowed_revoked = [s for s in samples if s.secret in secrets.revoked_at
                       and s.sent > secrets.revoked_at[s.secret] and s.status != 401]
    assert allowed_revoked == [], f"revoked (acknowledged) secrets answered: {allowed_revoked[:5]}"
    assert all(s.status == 200 for s in samples if s.secret in stable)
    checked = sum(1 for s in samples if s.secret in secrets.revoked_at and s.sent > secrets.revoked_at[s.secret])
    growth = (rss["end"] - rss["warm"]) / rss["warm"]
    figures["reconfiguration soak"] = (
        f"{PUSHES} pushes ({pushed} ECDS reloads in Envoy) in {elapsed:.0f} s; {len(samples)} requests "
        f"{summary(samples)}, no 5xx; {checked} requests with secrets revoked and acknowledged, all 401; "
        f"Envoy RSS {rss['start'] // 1024} MiB at start, {rss['warm'] // 1024} MiB after {WARM_UP} pushes, "
        f"{rss['end'] // 1024} MiB at the end ({growth:+.1%})")
    assert growth < 0.10, figures["reconfiguration soak"]


@pytest.mark.soak
def test_kill_9_loop_long(cp, envoy, rng, figures):
    drill = Drill(cp, envoy, NODE, rng)
    for _ in range(KILL_ROUNDS):
        drill.round()
    figures[f"kill -9 loop, {KILL_ROUNDS} rounds"] = drill.figures.line()
