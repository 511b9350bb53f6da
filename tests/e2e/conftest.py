"""Fixtures: an echo upstream, a shared Envoy running the apitokens filter, clients,
and the checks at the end of the session (`leak_search`).

Environment:
  ENVOY_BIN       Envoy binary (default <repo>/.venv/bin/envoy)
  APITOKENS_WASM  the filter module (default <repo>/target/wasm32-wasip1/release/apitokens_filter.wasm)
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from testkit import checks, harness, leaks
from testkit.clients import Client, raw_client
from testkit.fixtures import upstream  # noqa: F401  (the echo upstream, shared with the other suites)
from testkit.harness import Envoy, Token

_counter = itertools.count()


def pytest_report_header(config):
    return [f"envoy: {harness.envoy_bin()}", f"wasm module: {harness.wasm_module()}"]


def pytest_sessionstart(session):
    missing = [p for p in (harness.envoy_bin(), harness.wasm_module()) if not os.path.exists(p)]
    if missing:
        raise pytest.UsageError(
            "missing " + ", ".join(missing) + " (set ENVOY_BIN / APITOKENS_WASM, or build the module)"
        )


# ---------------------------------------------------------------------------
# Failure diagnostics: dump the logs of the Envoys a failing test used.
# ---------------------------------------------------------------------------


def _envoys_used_by(item) -> list[Envoy]:
    used: list[Envoy] = list(Envoy.instances[getattr(item, "_envoy_index", len(Envoy.instances)) :])
    for value in getattr(item, "funcargs", {}).values():
        candidate = value if isinstance(value, Envoy) else getattr(value, "envoy", None)
        if isinstance(candidate, Envoy) and candidate not in used:
            used.append(candidate)
    return used


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        for envoy in _envoys_used_by(item):
            report.sections.append((f"envoy {envoy.name} ({envoy.dir})", envoy.diagnostics()))
    return report


@pytest.fixture(autouse=True)
def _remember_envoys(request):
    request.node._envoy_index = len(Envoy.instances)


# ---------------------------------------------------------------------------
# Upstream, tokens, Envoys
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("envoys")


@pytest.fixture(scope="session")
def start_envoy(upstream, run_dir):
    """Factory: start an Envoy with the given plugin configuration (dict or raw JSON
    string); every Envoy it started is stopped at the end of the session."""
    started: list[Envoy] = []

    def start(plugin_cfg, name: str = "envoy", wait: bool = True, configure=None, concurrency: int = 2) -> Envoy:
        """`configure(bootstrap)` edits the bootstrap in place before the start;
        `concurrency`: Envoy's worker threads."""
        workdir = run_dir / f"{next(_counter):02d}-{name}"
        workdir.mkdir(parents=True)
        config = harness.bootstrap(plugin_cfg, upstream.port, workdir / "access.log", harness.wasm_module())
        if configure is not None:
            configure(config)
        envoy = Envoy(workdir, config, name=name, concurrency=concurrency)
        envoy.upstream = upstream
        started.append(envoy)
        if wait:
            envoy.start()
        else:
            envoy.spawn()
        return envoy

    yield start
    for envoy in started:
        envoy.stop()


class Tokens:
    """The tokens the shared Envoy knows."""

    def __init__(self):
        self.viewer = Token("default", "viewer-token", "viewer")
        self.editor = Token("default", "ci-token", "editor")
        self.owner = Token("default", "owner-token", "owner")
        self.other_ns = Token("other", "other-editor", "editor")
        self.expired = Token("default", "expired-token", "editor", expire_time="2020-01-01T00:00:00Z")
        self.far_future = Token("default", "far-future", "viewer", expire_time="9999-12-31T23:59:59Z")
        self.disabled = Token("default", "suspended-token", "editor", disabled=True)
        self.unknown = Token("default", "never-configured", "owner")  # not in the config

    def configured(self) -> list[Token]:
        return [self.viewer, self.editor, self.owner, self.other_ns, self.expired, self.far_future, self.disabled]

    def by_role(self, role: str) -> Token:
        return {"viewer": self.viewer, "editor": self.editor, "owner": self.owner}[role]


@pytest.fixture(scope="session")
def tokens() -> Tokens:
    return Tokens()


@pytest.fixture(scope="session")
def envoy(start_envoy, tokens) -> Envoy:
    """The shared Envoy: default plugin options, the tokens above."""
    e = start_envoy(harness.plugin_config(tokens.configured()), name="shared")
    e.initial_wasm_health = checks.wasm_health(e)
    return e


@pytest.fixture(params=["h1", "h2"])
def proto(request) -> str:
    return request.param


@pytest.fixture
def client(envoy, proto):
    """httpx client to the shared Envoy, over HTTP/1.1 and over h2c (prior knowledge)."""
    c = Client(envoy, proto)
    yield c
    c.close()


@pytest.fixture
def raw(envoy, proto):
    """One raw connection to the shared Envoy (socket for HTTP/1.1, h2 library for HTTP/2)."""
    c = raw_client(envoy, proto)
    yield c
    c.close()


# ---------------------------------------------------------------------------
# At the end of the session
# ---------------------------------------------------------------------------

# The demo tokens of envoy/envoy.yaml (test_config.py runs it): public secrets,
# which no log may show either.
DEMO_SECRETS = ["demo-viewer-secret", "demo-editor-secret", "demo-owner-secret"]
# What the shared Envoy's admin interface shows that could carry a secret.
ADMIN_ENDPOINTS = ("/config_dump", "/config_dump?include_eds", "/stats", "/stats/prometheus", "/clusters",
                   "/listeners", "/server_info")


def config_dump_holds_digests_not_secrets(run) -> None:
    dump = run.envoy.admin_get("/config_dump")
    assert harness.sha256_hex(run.tokens.editor.secret) in dump
    assert run.tokens.editor.secret not in dump


def no_wasm_failure_in_any_envoy_that_served(run) -> None:
    for e in Envoy.instances:
        if not e.ready:
            continue  # never served (the invalid-configuration tests): nothing to check
        checks.no_wasm_failures(e)


def shared_envoy_wasm_stats_never_moved(run) -> None:
    assert checks.wasm_health(run.envoy) == run.envoy.initial_wasm_health
    assert checks.counters(run.envoy).get("internal_error", 0) == 0
    assert run.envoy.running, "the shared Envoy died"


# After the last test: every other test has sent its secrets through the
# Envoys; none of them (nor the demo secrets) appears in a log or an access
# log of any Envoy, or the shared Envoy's /config_dump and /stats; and no Wasm
# VM failed anywhere.
leak_search = leaks.session_search(
    __file__, "envoy", "tokens",
    places=lambda run: {**leaks.envoy_logs(Envoy.instances),
                        **leaks.exposed(admins={"shared Envoy": run.envoy.admin_get}, endpoints=ADMIN_ENDPOINTS)},
    extra_secrets=DEMO_SECRETS,
    checks={
        "/config_dump holds digests, not secrets": config_dump_holds_digests_not_secrets,
        "no Wasm failure in any Envoy that served": no_wasm_failure_in_any_envoy_that_served,
        "the shared Envoy's Wasm stats never moved": shared_envoy_wasm_stats_never_moved,
    },
)
