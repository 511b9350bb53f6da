"""The document itself: valid OpenAPI 3.1, VVP's shapes kept exactly, every
route of the server documented and every documented operation routed and
answering as documented, and the copy the server serves is this file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from openapi_spec_validator import validate

import oas
import routes
from testkit.clients import request
from testkit.controlplane import tokens_path
from testkit.harness import remember_secret

VVP_DOCUMENT = "vvp-2.6.2-apitokens-swagger.json"
METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def operations(raw: dict) -> set[tuple[str, str]]:
    return {(path, method) for path, item in raw["paths"].items() for method in item if method in METHODS}


def test_the_document_is_valid_openapi_3_1(document):
    validate(document.raw)
    assert document.raw["openapi"].startswith("3.1.")
    text = oas.DOCUMENT.read_text()
    assert text == json.dumps(document.raw, indent=2, ensure_ascii=False) + "\n", (
        "control-plane/openapi.json: JSON with a 2-space indent, as json.dumps(indent=2) writes it"
    )


def vvp_reference() -> dict:
    repo = oas.REPO
    for c in (os.environ.get("VVP_SWAGGER"), repo.parent / "shared" / "reference" / VVP_DOCUMENT,
              Path("/work/shared/reference") / VVP_DOCUMENT):
        if c and Path(c).is_file():
            return json.loads(Path(c).read_text())
    pytest.skip(f"{VVP_DOCUMENT} not found (set VVP_SWAGGER)")


def test_vvp_operations_and_models_are_kept_exactly(document):
    """Every VVP operation is here under its path, operationId and parameter
    names; every property of VVP's response and ApiToken models is here with
    the same type and format; every 2xx/4xx status VVP's clients can meet
    (200, 401, 403, 404) is documented."""
    vvp = vvp_reference()
    raw = document.raw
    for path, item in vvp["paths"].items():
        for method, op in item.items():
            ours = raw["paths"][path][method]
            assert ours["operationId"] == op["operationId"], (path, method)
            vvp_params = {p["name"] for p in op["parameters"] if p["in"] in ("path", "query")}
            our_params = {document.resolve(p)["name"] for p in raw["paths"][path].get("parameters", [])}
            our_params |= {document.resolve(p)["name"] for p in ours.get("parameters", [])}
            assert vvp_params <= our_params, (path, method, vvp_params, our_params)
            for status in op["responses"]:
                if status in ("201", "204"):  # springfox defaults, never sent (info.description)
                    continue
                assert status in ours["responses"], (path, method, status)
            body = next((p for p in op["parameters"] if p["in"] == "body"), None)
            if body:
                ours_body = ours["requestBody"]["content"]["application/json"]["schema"]
                assert ours["requestBody"]["required"] == body["required"]
                props = document.resolve(ours_body)["properties"]
                for name in vvp["definitions"][body["schema"]["$ref"].rsplit("/", 1)[-1]]["properties"]:
                    assert name in props, f"VVP's create body field {name} is not taken"
            vvp_ok = op["responses"]["200"].get("schema")
            if vvp_ok:
                defname = vvp_ok["$ref"].rsplit("/", 1)[-1]
                ours_ok = document.resolve(ours["responses"]["200"]["content"]["application/json"]["schema"])
                assert ours_ok.get("title") == defname, (path, method, defname)
                for prop, schema in vvp["definitions"][defname].get("properties", {}).items():
                    assert prop in ours_ok["properties"], (defname, prop)
                    if schema.get("type") == "array":
                        assert ours_ok["properties"][prop]["type"] == "array"
    model = raw["components"]["schemas"]["ApiToken"]
    assert model["title"] == "ApiToken"
    for prop, schema in vvp["definitions"]["ApiToken"]["properties"].items():
        ours = document.resolve(model["properties"][prop])
        assert ours["type"] == schema["type"], prop
        assert ours.get("format") == schema.get("format"), prop


def test_every_route_of_the_server_is_documented(document):
    found, unresolved = routes.server_routes()
    assert not unresolved, (
        "routes whose path or methods this test cannot read (document them, and teach routes.py the new form): "
        + "; ".join(unresolved)
    )
    assert len(found) >= 10, f"the source scan found too few routes: {sorted(found)}"
    missing = sorted(set().union(*(routes.documented(r) for r in found)) - operations(document.raw))
    assert not missing, f"routes the server has that control-plane/openapi.json does not document: {missing}"


def test_every_documented_operation_is_routed(document):
    found, _ = routes.server_routes()
    served = set().union(*(routes.documented(r) for r in found))
    missing = sorted(operations(document.raw) - served)
    assert not missing, f"documented operations no route of the server serves: {missing}"


def test_every_documented_operation_answers_as_documented(plane, document):
    """One ordinary call per operation, as the owner of `default`, checked
    against the document: proves each is routed (not the router's fallback)
    and its happy answer matches."""
    owner = plane.creds["owner"]
    port = plane.api_port
    r = request(port, "POST", tokens_path("default"), owner,
                {"name": "namespaces/default/apitokens/contract-doomed", "role": "viewer"})
    assert r.status == 200, r.status
    remember_secret(r.json()["apiToken"]["secret"])
    item = tokens_path("default", "seed-0001")
    calls = {
        ("/apitokens/v1/namespaces/{ns}/apitokens", "get"): (tokens_path("default"), None, 200),
        ("/apitokens/v1/namespaces/{ns}/apitokens", "post"): (
            tokens_path("default"),
            {"name": "namespaces/default/apitokens/contract-made", "role": "editor", "createTime": None,
             "secret": None, "expireTime": "2030-01-01T00:00:00+02:00"}, 200),
        ("/apitokens/v1/namespaces/{ns}/apitokens/{apiTokenName}", "get"): (item, None, 200),
        ("/apitokens/v1/namespaces/{ns}/apitokens/{apiTokenName}", "patch"): (
            item, {"rateLimit": {"requests": 600, "per": "minute"}, "notBeforeTime": None}, 200),
        ("/apitokens/v1/namespaces/{ns}/apitokens/{apiTokenName}", "delete"): (
            tokens_path("default", "contract-doomed"), None, 200),
        ("/apitokens/v1/namespaces/{ns}/apitokens/{apiTokenName}:regenerate", "post"): (
            item + ":regenerate", {"previousSecretTtl": "60s"}, 200),
        ("/apitokens/v1/namespaces/{ns}/apitokens/{apiTokenName}:disable", "post"): (
            tokens_path("default", "seed-0002") + ":disable", {}, 200),
        ("/apitokens/v1/namespaces/{ns}/apitokens/{apiTokenName}:enable", "post"): (
            tokens_path("default", "seed-0002") + ":enable", None, 200),
        ("/apitokens/v1/namespaces/{ns}/apitokens:events", "get"): (
            tokens_path("default") + ":events?pageSize=1000", None, 200),
        ("/apitokens/v1/namespaces/{ns}/apitokens:self", "get"): (tokens_path("default") + ":self", None, 200),
        ("/apitokens/v1/namespaces/{ns}/apitokens:inactivity", "get"): (
            tokens_path("default") + ":inactivity", None, 200),
        ("/apitokens/v1/namespaces/{ns}/apitokens:inactivity", "put"): (
            tokens_path("default") + ":inactivity", {"after": "3650d", "action": "disable"}, 200),
        ("/apitokens/v1/namespaces/{ns}/apitokens:inactivity", "delete"): (
            tokens_path("default") + ":inactivity", None, 200),
        ("/apitokens/v1/credentials:revoke", "post"): (
            "/apitokens/v1/credentials:revoke", {"credentials": ["apt_nothing"]}, 202),
        ("/apitokens/v1/openapi.json", "get"): ("/apitokens/v1/openapi.json", None, 200),
        ("/healthz", "get"): ("/healthz", None, 200),
        ("/status", "get"): ("/status", None, 200),
        ("/metrics", "get"): ("/metrics", None, 200),
        ("/console", "get"): ("/console", None, 308),
        ("/console/", "get"): ("/console/", None, 200),
        ("/console/{asset}", "get"): ("/console/console.js", None, 200),
    }
    assert set(calls) == operations(document.raw), "a documented operation this test does not call"
    for (template, method), (path, body, status) in sorted(calls.items()):
        secured = document.operation(template, method).get("security", document.raw["security"])
        r = request(port, method.upper(), path, owner if secured else None, body)
        assert r.status == status, f"{method.upper()} {path}: {r.status} {oas.redact(r.body[:300])}"
        parsed = oas.check(document, template, method, r.status, r.headers, r.body)
        if isinstance(parsed, dict) and "apiToken" in parsed and "secret" in parsed["apiToken"]:
            remember_secret(parsed["apiToken"]["secret"])


def test_the_served_document_is_this_file(plane, document):
    r = request(plane.api_port, "GET", "/apitokens/v1/openapi.json")
    assert r.status == 200, r.status
    assert r.headers.get("content-type", "").split(";")[0] == "application/json"
    served = json.loads(r.body)
    if served != document.raw:
        differ = sorted(k for k in set(served) | set(document.raw) if served.get(k) != document.raw.get(k))
        pytest.fail(f"the served document differs from control-plane/openapi.json in {differ}: the binary "
                    "embeds it with include_str! at build time; rebuild it (make cp-build)", pytrace=False)
