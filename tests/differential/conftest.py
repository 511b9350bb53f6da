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


# After the last test (before Envoy stops): no secret in Envoy's logs, access
# log and admin pages (a static Envoy has no ECDS resources to dump) or in the
# upstreams' logs, and no Wasm VM failed. The secrets are the session's
# tokens (`tokens`), which every test sends.
leak_search = leaks.session_search(
    __file__, "workdir", "envoy",
    places=lambda run: leaks.exposed([run.workdir], {run.envoy.name: run.envoy.admin_get},
                                     endpoints=[e for e in leaks.ADMIN_ENDPOINTS if "ecds" not in e]),
    tests_issue_secrets=False,
    wasm=lambda run: [run.envoy],
)
