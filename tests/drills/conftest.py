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
from pathlib import Path

import pytest

from testkit import leaks
from testkit.checks import no_wasm_failures
from testkit.harness import SECRETS

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


@pytest.fixture(scope="session", autouse=True)
def leak_search(request, workdir, envoy, cp):
    """After the last test (teardown): no secret the drills issued appears in
    any log, access log, the database and its WAL, Envoy's admin endpoints or
    the control plane's /status; no Wasm VM failed during the drills. Fails
    the run."""
    yield
    whole = leaks.whole_suite(request.session, Path(__file__).parent)

    def no_secret_anywhere():
        if whole:
            assert len(SECRETS) >= 10, "the drills issue tokens first"
        must_exist = {"apitokens.db", "envoy.log", "access.log", "serve-02.log"} if whole else set()
        leaks.search_run(workdir, envoy, cp, SECRETS, must_exist)

    def no_wasm_failure():
        no_wasm_failures(envoy)
        assert envoy.running

    leaks.at_session_end({"no secret anywhere": no_secret_anywhere, "no Wasm failure": no_wasm_failure})
