"""Runs last (file order): no secret the corpus issued appears in any log,
access log, the database and its WAL, Envoy's admin endpoints, the control
plane's /status, or any response the corpus received; no Wasm VM failed."""

from __future__ import annotations

from testkit.checks import no_wasm_failures
from testkit.harness import SECRETS
from testkit.leaks import search_run


def test_no_secret_anywhere(workdir, envoy, cp, responses):
    RESPONSES = responses
    assert len(SECRETS) >= 10 and RESPONSES, "the corpus issues tokens and sends requests first"
    search_run(workdir, envoy, cp, SECRETS, {"apitokens.db", "envoy.log", "access.log", "serve-01.log"},
               {"responses": "\n".join(RESPONSES)})


def test_no_wasm_failure(envoy):
    no_wasm_failures(envoy)
    assert envoy.running
