"""Generated calls (schemathesis 4, from control-plane/openapi.json) against
the real control plane. Each generated request is sent by ten callers in
turn (callers.ORDER): no token, a mistyped `apt_` secret (bad checksum), an
unknown secret, an expired owner, a viewer and an editor of `default`, the
owner of namespace `other`, the previous secret of an owner of `default`
during its rotation's overlap, an owner of `default` that expires in an
hour, and last the long-lived owner of `default` (so the callers before it
meet the state it has not changed yet).

Phases: schema examples, coverage (boundary values, every undeclared
method, missing and wrong-type parameters) and fuzzing (MAX_EXAMPLES per
operation), positive and negative data. Every answer goes through
schemathesis's default checks: not_a_server_error, status_code_conformance,
content_type_conformance, response_schema_conformance (formats too),
response_headers_conformance (required headers, header schemas),
positive_data_acceptance, negative_data_rejection, missing_required_header,
ignored_auth (the same request without and with a made-up credential must
be refused), unsupported_method (405 with `Allow`), allow_header_conformance
(and use_after_free, ensure_resource_availability,
object_level_authorization, which need a stateful run or several
identities schemathesis knows of, and pass here). And here: no 5xx, and no
secret in any answer but a create's or a regenerate's 200 (neither a secret
this run issued or used nor anything shaped like an `apt_` secret).

The generated values are steered so that the calls reach past the namespace
check: most go to namespace `default`, many name a seeded token, a create
names the path's namespace, and no call deletes, regenerates or disables a
caller's own token. `/status?waitSeconds=` is capped at 10 ms (no Envoy is there to
wait for). Reproducible: a fixed seed, Hypothesis derandomized, no example
database.
"""
from __future__ import annotations

import json
import math
import os
import re
import zlib

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

import oas
from callers import ORDER, OWN_TOKENS, SEEDED_DEFAULT
from testkit.harness import SECRETS, remember_secret
from testkit.timing import limit

# Per operation, fuzzing phase; CONTRACT_EXAMPLES=200 for a deeper run (minutes).
MAX_EXAMPLES = int(os.environ.get("CONTRACT_EXAMPLES", "50"))
# Status codes a valid request (by the document's schemas) may still get,
# beyond those schemathesis expects by default: the rules no JSON Schema
# states (a create's name must name the path's namespace and its expireTime
# be in the future and within the caller's bounds; a previousSecretTtl at
# most 604800s; a pageToken this list handed out; an address range that is
# one, a notBeforeTime before the token's expiry).
POSITIVE_400 = ["createApiTokenUsingPOST", "regenerateApiTokenUsingPOST", "listApiTokenEventsUsingGET",
                "updateApiTokenConditionsUsingPATCH"]
DNS = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
SEEDED = [f"seed-{i:04d}" for i in range(0, SEEDED_DEFAULT, 37)]


POSITIVE = ["2xx", "3xx", "401", "403", "404", "409", "429"]
CONFIG = schemathesis.Config.from_dict({
    "seed": 17,
    "suppress-health-check": ["all"],
    "generation": {
        "mode": "all",
        "max-examples": MAX_EXAMPLES,
        "deterministic": True,
        "database": "none",
        # The callers' credentials are set by the test, never generated.
        "with-security-parameters": False,
    },
    "phases": {
        "examples": {"enabled": True},
        "coverage": {"enabled": True, "generate-duplicate-query-parameters": True},
        "fuzzing": {"enabled": True},
        "stateful": {"enabled": False},
    },
    "checks": {
        "positive_data_acceptance": {"expected-statuses": POSITIVE},
    },
    "operations": [{
        "include-operation-id": POSITIVE_400,
        "checks": {"positive_data_acceptance": {"expected-statuses": [*POSITIVE, "400"]}},
    }],
    "request-timeout": limit(10),
})
# Loaded when the module is (schemathesis parametrizes at collection); the
# server's address is given to each call. (`schemathesis.pytest.from_fixture`
# would load it from a fixture, but fails on pytest 9.2: `Function._nodeid`.)
schema = schemathesis.openapi.from_path(oas.DOCUMENT, config=CONFIG)


def steer(case, ns: str | None, token: str | None, name_in_path: bool) -> None:
    """Generated values that would only meet the namespace check are moved
    to `default` and to seeded tokens; a value that is already invalid (a
    negative case) is left as it is."""
    params = case.path_parameters or {}
    if ns and isinstance(params.get("ns"), str) and DNS.fullmatch(params["ns"]):
        params["ns"] = ns
    current = params.get("apiTokenName")
    if isinstance(current, str) and DNS.fullmatch(current):
        if token or current in OWN_TOKENS:
            params["apiTokenName"] = token or SEEDED[0]
    if name_in_path and isinstance(case.body, dict) and isinstance(case.body.get("name"), str):
        m = re.fullmatch(r"namespaces/([^/]+)/apitokens/([^/]+)", case.body["name"])
        if m and DNS.fullmatch(m.group(1)) and isinstance(params.get("ns"), str):
            token_id = m.group(2)
            if token_id in OWN_TOKENS:
                token_id = "made-" + token_id
            case.body["name"] = f"namespaces/{params['ns']}/apitokens/{token_id}"
    if case.query and "waitSeconds" in case.query:
        try:
            wait = float(case.query["waitSeconds"])
        except (TypeError, ValueError):
            wait = math.nan
        if math.isfinite(wait) and 0.01 < wait <= 60:
            case.query["waitSeconds"] = 0.01


def no_secret_in(response, who: str, label: str, template: str) -> None:
    body = response.content or b""
    issued = [s for s in SECRETS if s and s.encode() in body]
    shaped = oas.SECRET_SHAPE.search(body)
    if response.status_code == 200 and response.request.method == "POST" and re.search(
            r":regenerate$|/apitokens$", template):
        return  # a create's or a regenerate's answer: its new secret
    leaked = bool(issued) or shaped is not None
    assert not leaked, f"{label} as {who}: {response.status_code} carries a secret: {oas.redact(body[:400], SECRETS)}"


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_generated_calls_answer_as_documented(case, creds, base_url):
    # (`@schema.given` cannot be combined with the examples and coverage
    # phases: the steering is drawn from the generated values themselves,
    # as reproducible as they are.)
    h = zlib.crc32(json.dumps([case.path_parameters, case.query, case.body], sort_keys=True, default=repr).encode())
    steer(case, ns=None if h % 4 == 0 else "default",
          token=None if h % 3 == 0 else [*SEEDED[:8], "never-was"][h % 9], name_in_path=h % 5 != 0)
    label = f"{case.method} {case.formatted_path}"
    # An operation without authentication (leak reports, the operator's
    # endpoints) answers every caller alike: called once, without a token
    # (leak reports are rate-limited per client and answer after 250 ms).
    public = case.operation.definition.raw.get("security") == []
    for who in (["no token"] if public else ORDER):
        headers = {"Authorization": f"Bearer {creds[who]}"} if who != "no token" else None
        response = case.call(base_url=base_url, headers=headers)
        assert response.status_code < 500, (
            f"{label} as {who}: {response.status_code} {oas.redact(response.content[:400], SECRETS)}"
        )
        if response.status_code == 200 and response.request.method == "POST":
            token_json = (response.json() or {}).get("apiToken") if response.content else None
            if isinstance(token_json, dict) and isinstance(token_json.get("secret"), str):
                remember_secret(token_json["secret"])
        no_secret_in(response, who, label, case.operation.path)
        key = (f"{case.method} {case.operation.path}", response.status_code)
        oas.SEEN[key] = oas.SEEN.get(key, 0) + 1
        try:
            case.validate_response(response, headers=headers)
        except (Exception, BaseExceptionGroup) as failure:  # FailureGroup: its text shows the answer's body
            raise AssertionError(f"as {who}: " + oas.redact(str(failure), SECRETS)) from None
