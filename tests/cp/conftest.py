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
from testkit.harness import envoy_bin, poll
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
    # On every start (tests restart it, with arguments of their own): the
    # read-your-writes loops write as fast as they can (1,500 writes in one
    # namespace), so no write rate (test_14 tests it on a plane of its own);
    # expired tokens leave the pushed configuration 2 s after their expiry
    # (test_expiry; the default keeps them 7 days).
    plane = ControlPlane(workdir / "cp", always=("--namespace-writes-per-second", "0",
                                                 "--expired-retention-seconds", "2"))
    plane.owner = plane.bootstrap("default", "admin")  # type: ignore[attr-defined]
    plane.start()
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


def ecds_digest_searched(run, places: dict[str, str]) -> None:
    """The search read the real things: the database's WAL or the control
    plane's logs (a whole run), and what Envoy holds, which is digests (raw
    bytes in the compact encoding the control plane pushes): the search reads
    the payload, and would find a leaked value."""
    if run.whole:
        assert any(n.endswith("-wal") for n in places) or any("serve-" in n for n in places)
    digest = hashlib.sha256(run.cp.owner.encode()).digest().decode("latin-1")
    assert digest in places["envoy /config_dump?resource=ecds_filters (decoded BytesValue)"]


# After the last test: no secret issued in this session in any log, the
# database files, the ECDS files, Envoy's config_dump, stats or the status page.
leak_search = leaks.session_search(
    __file__, "workdir", "envoy", "cp",
    places=lambda run: leaks.control_plane_places(run.workdir, run.envoy, run.cp),
    must_exist={"apitokens.db", "envoy.log", "access.log"},
    # Written by the file variant's control planes (test_3, test_8).
    whole_suite_must_exist={"apitokens-ecds.pb"},
    searched=ecds_digest_searched,
)
