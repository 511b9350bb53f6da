"""The adversarial corpus against the shipped, hardened Envoy on ECDS.

One control plane (`apitokens serve`, the real binary) issues every token the
corpus names, revokes and regenerates some of them, and pushes the filter
configuration to one Envoy running envoy/envoy-ecds.yaml as shipped (ports
replaced; the access log as JSON lines to a file so each request can be found
by its x-e2e-id). Requests go over HTTP/1.1 and HTTP/2 (h2c) on raw
connections (testkit.clients), to the echo upstream (testkit.echo_server).

When the session ends, `leak_search` looks for every issued secret and for
Wasm failures.

Environment: APITOKENS_BIN, ENVOY_BIN, APITOKENS_WASM (see testkit/controlplane.py).
"""

from __future__ import annotations

import math
import time

import pytest

from testkit import harness, leaks
from testkit.controlplane import create, issued_secret, tokens_path, version_of

# The session fixtures cp, envoy, upstream and workdir; the binaries checked at
# the start; every Envoy's logs in the report of a failed test.
pytest_plugins = ["testkit.fixtures"]

# Outcomes of the corpus items, for the closing "N passed, N failed" line.
CORPUS_OUTCOMES: dict[str, bool] = {}
# Every response the corpus received (headers and body), for the leak search.
RESPONSES: list[str] = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if item.get_closest_marker("corpus") and (report.when == "call" or report.failed):
        CORPUS_OUTCOMES[item.nodeid] = CORPUS_OUTCOMES.get(item.nodeid, True) and report.passed
    return report


def pytest_unconfigure(config):
    """The corpus totals, as the very last line of the run."""
    if not CORPUS_OUTCOMES:
        return
    passed = sum(CORPUS_OUTCOMES.values())
    failed = len(CORPUS_OUTCOMES) - passed
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    write = reporter.write_line if reporter else print
    write(f"security corpus, each case over HTTP/1.1 and HTTP/2 ({len(CORPUS_OUTCOMES)} runs):")
    write(f"{passed} passed, {failed} failed")


class Tokens:
    """The corpus's tokens by state, issued through the control plane's API."""

    def __init__(self, cp, envoy):
        self.cp, self.envoy = cp, envoy
        self.by_state: dict[str, harness.Token] = {}
        self.expiring = 0

    def issue(self, state: str, token_id: str, role: str, ns: str = "default", **extra) -> harness.Token:
        r = create(self.envoy.port, self.cp.owners[ns], token_id, role, ns, **extra)
        assert r.status == 200, r
        self.cp.wait_applied(version_of(r))
        token = harness.Token(ns, token_id, role, secret=r.json()["apiToken"]["secret"])
        token.expire_time = extra.get("expireTime", "")
        self.by_state[state] = token
        return token

    def expiring_now(self) -> harness.Token:
        """A new token whose expireTime is the current instant: issued for the
        next whole second (the API takes only future times), returned at it."""
        self.expiring += 1
        expire_at = math.ceil(time.time()) + 1
        token = self.issue(f"expiring-now-{self.expiring}", f"expiring-{self.expiring}", "editor",
                           expireTime=harness.rfc3339(expire_at))
        while time.time() < expire_at:
            time.sleep(max(0.0, min(0.05, expire_at - time.time())))
        return token


@pytest.fixture(scope="session")
def responses() -> list[str]:
    """Where the corpus records every response it received, for the leak search."""
    return RESPONSES


@pytest.fixture(scope="session")
def tokens(cp, envoy) -> Tokens:
    t = Tokens(cp, envoy)
    # First, so that it is over a second past its expiry once the others exist.
    expired_at = math.ceil(time.time()) + 2
    t.issue("expired", "expired", "editor", expireTime=harness.rfc3339(expired_at))
    t.issue("viewer", "viewer", "viewer")
    t.issue("editor", "editor", "editor")
    t.issue("owner", "owner", "owner")
    t.issue("other-namespace", "other-editor", "editor", ns="other")
    revoked = t.issue("revoked", "revoked", "owner")
    r = cp.api("DELETE", tokens_path(token="revoked"), cp.owners["default"])
    assert r.status == 200, r
    cp.wait_applied(version_of(r))
    old = t.issue("regenerated-old", "regenerated", "owner")
    r = cp.api("POST", tokens_path(token="regenerated:regenerate"), cp.owners["default"])
    assert r.status == 200, r
    cp.wait_applied(version_of(r))
    t.by_state["regenerated-new"] = harness.Token("default", "regenerated", "owner", secret=issued_secret(r))
    # An owner rotated with an overlap: its previous secret, still valid.
    t.issue("overlap-previous", "overlapped", "owner")
    r = cp.api("POST", tokens_path(token="overlapped:regenerate"), cp.owners["default"],
               {"previousSecretTtl": "3600s"})
    assert r.status == 200, r
    issued_secret(r)
    cp.wait_applied(version_of(r))
    # An owner suspended with :disable (acknowledged by Envoy), kept.
    t.issue("disabled", "suspended", "owner")
    r = cp.api("POST", tokens_path(token="suspended:disable"), cp.owners["default"])
    assert r.status == 200 and r.json()["apiToken"]["state"] == "disabled", r
    cp.wait_applied(version_of(r))
    # An owner that expires in an hour (a contractor's, a CI job's).
    t.issue("short-owner", "short-owner", "owner", expireTime=harness.rfc3339(time.time() + 3600))
    assert revoked.secret and old.secret
    while time.time() < expired_at + 1:
        time.sleep(0.05)
    return t


def responses_searched(run, places: dict[str, str]) -> None:
    if run.whole:
        assert RESPONSES, "the corpus sends requests first"


# After the last test: no secret the corpus issued in any log, access log,
# the database and its WAL, Envoy's admin endpoints, the control plane's
# /status, or any response the corpus received; no Wasm VM failed.
leak_search = leaks.session_search(
    __file__, "workdir", "envoy", "cp",
    places=lambda run: leaks.control_plane_places(run.workdir, run.envoy, run.cp,
                                                  {"responses": "\n".join(RESPONSES)}),
    whole_suite_must_exist={"apitokens.db", "envoy.log", "access.log", "serve-01.log"},
    searched=responses_searched,
    wasm=lambda run: [run.envoy],
)
