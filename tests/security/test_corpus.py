"""The adversarial corpus (corpus.yaml), every case over HTTP/1.1 and HTTP/2,
against the shipped Envoy configuration on ECDS and the real control plane."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

import corpus
from testkit import harness
from testkit.controlplane import ECDS_YAML, STATIC_YAML, hcm_of
from testkit.harness import SECRETS

CASES = corpus.load()


@pytest.mark.corpus
@pytest.mark.parametrize("proto", corpus.PROTOCOLS)
@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_case(case, proto, envoy, tokens, responses):
    token = corpus.token_for(case, tokens)
    stats_before = corpus.wasm_failure_stats(envoy)
    method, path, headers, body = corpus.build_request(case, tokens, token)
    out = corpus.send(envoy, proto, method, path, headers, body)
    responses.append(out.text())
    corpus.check(case, proto, envoy, token, out, SECRETS)
    # No Wasm failure signal moved: no trap in the log, no failure stat.
    assert envoy.wasm_failure_lines() == [], envoy.wasm_failure_lines()[:5]
    assert corpus.wasm_failure_stats(envoy) == stats_before


def test_corpus_covers_every_class_with_40_cases():
    assert len(CASES) >= 40
    assert {c["class"] for c in CASES} == set(corpus.CLASSES)


def test_envoy_under_test_has_the_shipped_hardened_connection_manager(envoy):
    """The corpus runs on envoy/envoy-ecds.yaml as shipped; its connection
    manager is envoy/envoy.yaml's (all but routes, filters and access log), and
    the static e2e harness uses the same hardening."""
    routing = ("access_log", "route_config", "http_filters")

    def settings(hcm: dict) -> dict:
        return {k: v for k, v in hcm.items() if k not in routing}

    static = hcm_of(yaml.safe_load(STATIC_YAML.read_text()))
    shipped = hcm_of(yaml.safe_load(ECDS_YAML.read_text()))
    running = hcm_of(json.loads(envoy.config_path.read_text()))
    assert settings(shipped) == settings(static)
    assert settings(running) == settings(shipped)
    assert running["http_filters"] == shipped["http_filters"] or os.environ.get("APITOKENS_WASM")
    assert shipped["http_filters"][0]["config_discovery"]["default_config"]["config"]["failure_policy"] == "FAIL_CLOSED"
    hardening = {"codec_type": "AUTO", "normalize_path": True, "merge_slashes": True,
                 "path_with_escaped_slashes_action": "REJECT_REQUEST", "use_remote_address": True}
    e2e = hcm_of(harness.bootstrap({"tokens": []}, 1, Path("access.log"), "module.wasm"))
    for hcm in (static, e2e):
        assert {k: hcm[k] for k in hardening} == hardening
        assert hcm["common_http_protocol_options"]["headers_with_underscores_action"] == "REJECT_REQUEST"
