"""The differential suite: real routers behind the shipped, hardened Envoy.

One Envoy runs envoy/envoy.yaml as shipped: its connection manager (path
normalisation, merged slashes, escaped slashes refused, ...), its filter
configuration (built-in rules, URL overrides refused) with the demo tokens
replaced by a viewer, an editor and an owner of namespace `default`. Only the
routes differ: a request header picks the upstream (routers.py). The closing
line counts every request: passed when no route ran or the route that ran is
one the token's role permits in its namespace (oracle.py).

When the session ends, `leak_search` looks for the tokens' secrets in every
log and Envoy admin page, and for Wasm failures.

Environment: ENVOY_BIN, APITOKENS_WASM (see testkit/harness.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from testkit import harness, leaks
from testkit.fixtures import add_envoy_diagnostics
from routers import HERE, OUTCOMES, REACHED, ROLES, UPSTREAMS, Upstream, shipped_with


def pytest_sessionstart(session):
    missing = [p for p in (harness.envoy_bin(), harness.wasm_module()) if not os.path.exists(p)]
    if not (HERE / "node_modules" / "express").is_dir():
        missing.append(str(HERE / "node_modules") + " (npm ci)")
    if missing:
        raise pytest.UsageError("missing " + ", ".join(missing) + " (make build venv differential-deps)")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    add_envoy_diagnostics(report)
    return report


def pytest_unconfigure(config):
    if not OUTCOMES:
        return
    passed = sum(1 for *_, ok in OUTCOMES if ok)
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    write = reporter.write_line if reporter else print
    for name, (reached, ran) in sorted(REACHED.items()):
        write(f"  {name}: {reached} requests reached it, {ran} ran a route")
    write(f"differential suite: {len(OUTCOMES)} requests, {len(UPSTREAMS)} upstreams x {len(ROLES)} roles")
    write(f"{passed} passed, {len(OUTCOMES) - passed} failed")


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("differential")


@pytest.fixture(scope="session")
def upstreams(workdir):
    started: dict[str, Upstream] = {}
    try:
        for name, command in UPSTREAMS.items():
            started[name] = Upstream(name, command, workdir)
        yield started
    finally:
        for upstream in started.values():
            upstream.stop()


@pytest.fixture(scope="session")
def tokens() -> dict[str, harness.Token]:
    return {role: harness.Token("default", f"differential-{role}", role) for role in ROLES}


@pytest.fixture(scope="session")
def envoy(workdir, upstreams, tokens):
    proxy = harness.Envoy(workdir / "envoy", shipped_with(upstreams, tokens, workdir / "envoy" / "access.log"),
                          name="differential")
    proxy.start()
    yield proxy
    proxy.stop()


@pytest.fixture(scope="session", autouse=True)
def leak_search(workdir, envoy):
    """After the last test (before Envoy stops): no secret in Envoy's logs,
    access log and admin pages or in the upstreams' logs, and no Wasm VM
    failed."""
    yield

    def no_secret_anywhere():
        assert harness.SECRETS, "no secrets were generated: did the suite run?"
        # A static Envoy has no ECDS resources to dump.
        endpoints = [e for e in leaks.ADMIN_ENDPOINTS if "ecds" not in e]
        places = leaks.exposed([workdir], {envoy.name: envoy.admin_get}, endpoints=endpoints)
        found = leaks.leaks(places, harness.SECRETS)
        assert not found, "\n".join(found)

    def no_wasm_failure():
        assert envoy.wasm_failure_lines() == [], envoy.wasm_failure_lines()[:5]

    leaks.at_session_end({"no secret anywhere": no_secret_anywhere, "no Wasm failure": no_wasm_failure})
