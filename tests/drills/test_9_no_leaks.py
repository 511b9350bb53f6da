"""Runs last (file order): no secret the drills issued appears in any log,
access log, the database and its WAL, Envoy's admin endpoints or the control
plane's /status; no Wasm VM failed during the drills."""

from __future__ import annotations

from testkit.checks import no_wasm_failures
from testkit.harness import SECRETS
from testkit.leaks import search_run


def test_no_secret_anywhere(workdir, envoy, cp):
    assert len(SECRETS) >= 10, "the drills issue tokens first"
    search_run(workdir, envoy, cp, SECRETS, {"apitokens.db", "envoy.log", "access.log", "serve-02.log"})


def test_no_wasm_failure(envoy):
    no_wasm_failures(envoy)
    assert envoy.running
