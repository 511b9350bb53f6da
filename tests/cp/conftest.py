"""End-to-end fixtures for the control plane: the real `apitokens` binary, a real
Envoy 1.40 configured by it over ECDS (envoy/envoy-ecds.yaml with its ports
replaced, testkit.controlplane.shipped_envoy), and an echo upstream. Everything
listens on 127.0.0.1.

Environment:
  APITOKENS_BIN   the control plane binary (default <repo>/target/debug/apitokens)
  ENVOY_BIN       Envoy (default <repo>/.venv/bin/envoy)
  APITOKENS_WASM  the filter module (default target/wasm32-wasip1/release/apitokens_filter.wasm,
                  as in the shipped configuration; Envoy runs from the repository root)
The control plane, the ECDS Envoy configuration and the echo upstream are shared
with tests/security and tests/drills (testkit.controlplane, testkit.fixtures).
When the session ends, `leak_search` looks for every issued secret.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from testkit import leaks
from testkit.controlplane import (
    MEASUREMENTS,
    ControlPlane,
    apitokens_bin,
    missing_binaries,
    shipped_envoy,
)
from testkit.harness import SECRETS, envoy_bin, poll
from testkit.fixtures import upstream  # noqa: F401  (the echo upstream)


def pytest_report_header(config):
    return [f"apitokens: {apitokens_bin()}", f"envoy: {envoy_bin()}"]


def pytest_sessionstart(session):
    missing = missing_binaries()
    if missing:
        raise pytest.UsageError("missing " + ", ".join(missing) + " (build them, or set APITOKENS_BIN / ENVOY_BIN)")


def pytest_terminal_summary(terminalreporter):
    if not MEASUREMENTS:
        return
    terminalreporter.section("revocation delay: API answer -> Envoy answers 401")
    for what, values in MEASUREMENTS.items():
        ms = sorted(v * 1000 for v in values)
        terminalreporter.write_line(
            f"{what}: n={len(ms)} min={ms[0]:.1f} ms median={ms[len(ms) // 2]:.1f} ms max={ms[-1]:.1f} ms"
        )


# ---------------------------------------------------------------------------
# Session fixtures: one control plane, one Envoy, one echo upstream.


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cp")


@pytest.fixture(scope="session")
def cp(workdir):
    # The read-your-writes loops write as fast as they can (1,500 writes in
    # one namespace): no write rate here, on every start (test_14 tests it on
    # a plane of its own).
    plane = ControlPlane(workdir / "cp", always=("--namespace-writes-per-second", "0"))
    plane.owner = plane.bootstrap("default", "admin")  # type: ignore[attr-defined]
    # Expired tokens leave the pushed configuration 2 s after their expiry
    # (test_expiry); the default keeps them 7 days.
    plane.start("--expired-retention-seconds", "2")
    yield plane
    plane.stop()


@pytest.fixture(scope="session")
def envoy(workdir, cp, upstream):
    proxy = shipped_envoy(workdir / "envoy", cp, upstream.server_address[1], node="e2e-envoy-1").start()
    # The first configuration arrives over ECDS and is acknowledged.
    poll(lambda: any(e["node"] == proxy.node and e.get("ackedVersion") for e in cp.status()["envoys"]),
         15, "first ACK")
    yield proxy
    proxy.stop()


@pytest.fixture(scope="session")
def owner(cp) -> str:
    return cp.owner  # type: ignore[attr-defined]


@pytest.fixture(scope="session", autouse=True)
def leak_search(request, workdir, envoy, cp):
    """After the last test (teardown): no secret issued in this session appears
    in any log, the database files, the ECDS file, Envoy's config_dump, stats
    or the status page. Fails the run."""
    yield
    whole = leaks.whole_suite(request.session, Path(__file__).parent)

    def no_secret_anywhere():
        if whole:
            assert len(SECRETS) >= 15, "the lifecycle tests issue tokens first"
        # The places searched really exist: logs, database and its WAL, ECDS file.
        must_exist = {"apitokens.db", "apitokens-ecds.pb", "envoy.log", "access.log"} if whole else set()
        places = leaks.search_run(workdir, envoy, cp, SECRETS, must_exist)
        if whole:
            assert any(n.endswith("-wal") for n in places) or any("serve-" in n for n in places)
        # What Envoy has is digests (raw bytes in the compact encoding the control
        # plane pushes): the search reads the payload, and would find a leaked value.
        digest = hashlib.sha256(cp.owner.encode()).digest().decode("latin-1")
        assert digest in places["envoy /config_dump?resource=ecds_filters (decoded BytesValue)"]

    leaks.at_session_end({"no secret anywhere": no_secret_anywhere})
