"""Session fixtures shared by the suites that run the real control plane and
an Envoy on envoy-ecds.yaml (tests/security, tests/drills). A conftest uses
them by importing them: `from fixtures import cp, envoy, upstream, workdir`."""

from __future__ import annotations

from pathlib import Path

import pytest

import echo_server
import harness
from controlplane import ControlPlane, ecds_envoy, missing_binaries

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
def cp(workdir):
    """`apitokens serve` with a bootstrap owner per namespace (`cp.owners`)."""
    plane = ControlPlane(workdir / "cp")
    plane.owners = {ns: plane.bootstrap(ns, "admin") for ns in ("default", "other")}
    plane.start()
    yield plane
    plane.stop()


@pytest.fixture(scope="session")
def envoy(workdir, cp, upstream):
    e = ecds_envoy(workdir, cp, upstream, NODE)
    yield e
    e.stop()
