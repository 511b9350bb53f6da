"""Fault drills: the real control plane and an Envoy on the shipped
envoy-ecds.yaml, under load, while things go wrong (kill -9, the control plane
away, a rejected configuration, a token expiring mid-load, 1,000
reconfigurations). Fast drills run in `make test`; the long ones (marker
`soak`) only with APITOKENS_SOAK=1 (`make soak`).

The load generator and the kill -9 loop are testkit.load and testkit.kill9.
When the session ends, `leak_search` looks for every issued secret and for
Wasm failures.

Environment: APITOKENS_BIN, ENVOY_BIN, APITOKENS_WASM (testkit/controlplane.py),
APITOKENS_SOAK=1, APITOKENS_DRILL_SEED (the kill -9 loops' random seed).
"""

from __future__ import annotations

import os
import random

import pytest

from testkit import leaks

# The session fixtures cp, envoy, upstream and workdir; the binaries checked at
# the start; every Envoy's logs in the report of a failed test; the fixture
# `figures`, printed at the end of the run.
pytest_plugins = ["testkit.fixtures", "testkit.figures"]


@pytest.fixture(scope="session")
def cp_args() -> tuple[str, ...]:
    """The drills write as fast as they can (the kill -9 loop, the soak's
    1,000 reconfigurations): no per-namespace write rate, which
    tests/cp/test_14_write_rate_and_retention.py tests on its own."""
    return ("--namespace-writes-per-second", "0")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("APITOKENS_SOAK") == "1":
        return
    skip = pytest.mark.skip(reason="a soak drill: set APITOKENS_SOAK=1 (make soak)")
    for item in items:
        if item.get_closest_marker("soak"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def rng(figures) -> random.Random:
    seed = int(os.environ.get("APITOKENS_DRILL_SEED") or random.SystemRandom().randrange(1 << 32))
    figures["random seed (APITOKENS_DRILL_SEED)"] = str(seed)
    return random.Random(seed)


# After the last test: no secret the drills issued in any log, access log,
# the database and its WAL, Envoy's admin endpoints or the control plane's
# /status; no Wasm VM failed during the drills.
leak_search = leaks.session_search(
    __file__, "workdir", "envoy", "cp",
    places=lambda run: leaks.control_plane_places(run.workdir, run.envoy, run.cp),
    # serve-02.log: every drill restarts the control plane.
    whole_suite_must_exist={"apitokens.db", "envoy.log", "access.log", "serve-02.log"},
    wasm=lambda run: [run.envoy],
)
