"""Fault drills: the real control plane and an Envoy on the shipped
envoy-ecds.yaml, under load, while things go wrong (kill -9, the control plane
away, a rejected configuration, a token expiring mid-load, 1,000
reconfigurations). Fast drills run in `make test`; the long ones (marker
`soak`) only with APITOKENS_SOAK=1 (`make soak`).

Environment: APITOKENS_BIN, ENVOY_BIN, APITOKENS_WASM (tests/lib/controlplane.py),
APITOKENS_SOAK=1, APITOKENS_DRILL_SEED (the kill -9 loops' random seed).
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "tests" / "e2e"), str(REPO / "tests" / "lib")]
from fixtures import add_envoy_diagnostics, cp, envoy, require_binaries, upstream, workdir  # noqa: E402,F401

# Figures the drills measured, printed at the end of the run.
FIGURES: dict[str, str] = {}


def pytest_sessionstart(session):
    require_binaries()


def pytest_collection_modifyitems(config, items):
    if os.environ.get("APITOKENS_SOAK") == "1":
        return
    skip = pytest.mark.skip(reason="a soak drill: set APITOKENS_SOAK=1 (make soak)")
    for item in items:
        if item.get_closest_marker("soak"):
            item.add_marker(skip)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    add_envoy_diagnostics(report)
    return report


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.section("drill figures")
        for what, line in FIGURES.items():
            terminalreporter.write_line(f"{what}: {line}")


@pytest.fixture(scope="session")
def rng() -> random.Random:
    seed = int(os.environ.get("APITOKENS_DRILL_SEED") or random.SystemRandom().randrange(1 << 32))
    FIGURES["random seed (APITOKENS_DRILL_SEED)"] = str(seed)
    return random.Random(seed)
