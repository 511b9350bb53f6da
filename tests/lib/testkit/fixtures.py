"""Session fixtures shared by the suites that run the real control plane and
an Envoy on envoy-ecds.yaml (tests/security, tests/drills).

As a plugin (`pytest_plugins = ["testkit.fixtures"]` in a suite's conftest) it
brings the fixtures cp, envoy, upstream and workdir, refuses to start without
the binaries, and adds the tail of every Envoy's logs to a failed test's
report. A suite with its own `envoy` and `cp` (tests/e2e, tests/cp) imports
the fixtures it uses instead: `from testkit.fixtures import upstream`."""

from __future__ import annotations

from pathlib import Path

import pytest

from testkit import echo_server, harness
from testkit.controlplane import ControlPlane, ecds_envoy, missing_binaries

NODE = "gateway-1"


def require_binaries() -> None:
    missing = missing_binaries()
    if missing:
        raise pytest.UsageError("missing " + ", ".join(missing) + " (make build cp-build venv)")


def add_envoy_diagnostics(report) -> None:
    """On a failed test, the tail of every Envoy's log and access log."""
    if report.failed:
        for envoy in harness.Envoy.instances:
            report.sections.append((f"envoy {envoy.name} ({envoy.dir})", envoy.diagnostics(lines=30)))


def pytest_sessionstart(session):
    require_binaries()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    add_envoy_diagnostics(report)
    return report


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("run")


@pytest.fixture(scope="session")
def upstream():
    server = echo_server.start_in_thread("127.0.0.1", 0)
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def cp_args() -> tuple[str, ...]:
    """`serve` arguments of every start of `cp` (a suite's conftest may
    override this fixture)."""
    return ()


@pytest.fixture(scope="session")
def cp(workdir, cp_args):
    """`apitokens serve` with a bootstrap owner per namespace (`cp.owners`)."""
    plane = ControlPlane(workdir / "cp", always=cp_args)
    plane.owners = {ns: plane.bootstrap(ns, "admin") for ns in ("default", "other")}
    plane.start()
    yield plane
    plane.stop()


@pytest.fixture(scope="session")
def envoy(workdir, cp, upstream):
    e = ecds_envoy(workdir, cp, upstream, NODE)
    yield e
    e.stop()
