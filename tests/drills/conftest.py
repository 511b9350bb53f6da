"""Fault drills: the real control plane and an Envoy on the shipped
envoy-ecds.yaml, under load, while things go wrong (kill -9, the control plane
away, a rejected configuration, a token expiring mid-load, 1,000
reconfigurations). Fast drills run in `make test`; the long ones (marker
`soak`) only with APITOKENS_SOAK=1 (`make soak`).

The load generator and the kill -9 loop are testkit.load and testkit.kill9.

Environment: APITOKENS_BIN, ENVOY_BIN, APITOKENS_WASM (testkit/controlplane.py),
APITOKENS_SOAK=1, APITOKENS_DRILL_SEED (the kill -9 loops' random seed).
"""

from __future__ import annotations

import os
import random

import pytest

# The session fixtures cp, envoy, upstream and workdir; the binaries checked at
# the start; every Envoy's logs in the report of a failed test.
pytest_plugins = ["testkit.fixtures"]

# Figures the drills measured, printed at the end of the run.
FIGURES: dict[str, str] = {}


def pytest_collection_modifyitems(config, items):
    if os.environ.get("APITOKENS_SOAK") == "1":
        return
    skip = pytest.mark.skip(reason="a soak drill: set APITOKENS_SOAK=1 (make soak)")
    for item in items:
        if item.get_closest_marker("soak"):
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.section("drill figures")
        for what, line in FIGURES.items():
            terminalreporter.write_line(f"{what}: {line}")


@pytest.fixture(scope="session")
def figures() -> dict[str, str]:
    """Where a drill records what it measured (one line each), printed at the end."""
    return FIGURES


@pytest.fixture(scope="session")
def rng() -> random.Random:
    seed = int(os.environ.get("APITOKENS_DRILL_SEED") or random.SystemRandom().randrange(1 << 32))
    FIGURES["random seed (APITOKENS_DRILL_SEED)"] = str(seed)
    return random.Random(seed)
