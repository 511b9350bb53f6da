"""What a suite measured, one line per drill, printed at the end of the run.
A plugin (`pytest_plugins = ["testkit.figures"]` in a suite's conftest):
the session fixture `figures` is the dictionary (what -> line) the tests
fill, and the terminal summary prints it (tests/drills, tests/replicas)."""

from __future__ import annotations

import pytest

FIGURES: dict[str, str] = {}


@pytest.fixture(scope="session")
def figures() -> dict[str, str]:
    """Where a drill records what it measured (one line each), printed at the end."""
    return FIGURES


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.section("measured figures")
        for what, line in FIGURES.items():
            terminalreporter.write_line(f"{what}: {line}")
