"""Ververica Platform's own contract, exactly: every answer of the four VVP
operations, through the gateway and from the control plane directly, is
checked against the shapes of VVP 2.6.2's swagger (its ApiToken model and
response definitions, read from the reference document, not retyped here),
and against what its known clients branch on (create 200, delete 200 with
`{}`, 409 on a duplicate, 404 on a missing token, error bodies that are
objects with a `message`, `Content-Type: application/json` on every answer).

The reference document is not part of this repository: it is read from
$VVP_SWAGGER, or `shared/reference/` beside the repository's folder."""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

import pytest

from testkit.clients import request
from testkit.controlplane import APP, tokens_path
from testkit.harness import remember_secret

REPO = Path(__file__).resolve().parents[2]
DOCUMENT = "vvp-2.6.2-apitokens-swagger.json"
# Codes the clients rely on beyond those the document declares (its
# `.SOURCE.md`): 409 on a duplicate, 404 on a delete of a missing token; and
# the project's own (a bad body, a body too large).
EXTRA = {"post": {"400", "409", "413"}, "delete": {"404"}}


def reference() -> dict:
    candidates = [os.environ.get("VVP_SWAGGER"), REPO.parent / "shared" / "reference" / DOCUMENT,
                  Path("/work/shared/reference") / DOCUMENT]
    for c in candidates:
        if c and Path(c).is_file():
            return json.loads(Path(c).read_text())
    pytest.skip(f"{DOCUMENT} not found (set VVP_SWAGGER)")


def check(instance, schema: dict, defs: dict, where: str = "body") -> None:
    """The Swagger 2.0 schema subset the document uses: $ref, object with
    properties, array with items, string (date-time)."""
    if "$ref" in schema:
        check(instance, defs[schema["$ref"].rsplit("/", 1)[-1]], defs, where)
        return
    kind = schema.get("type")
    if kind == "object":
        assert isinstance(instance, dict), f"{where}: not an object: {instance!r}"
        for name, prop in schema.get("properties", {}).items():
            if name in instance:
                check(instance[name], prop, defs, f"{where}.{name}")
    elif kind == "array":
        assert isinstance(instance, list), f"{where}: not an array"
        for i, item in enumerate(instance):
            check(item, schema.get("items", {}), defs, f"{where}[{i}]")
    elif kind == "string":
        assert isinstance(instance, str), f"{where}: not a string: {instance!r}"
        if schema.get("format") == "date-time":
            datetime.fromisoformat(instance.replace("Z", "+00:00"))
    elif kind is not None:
        raise AssertionError(f"{where}: the checker does not know type {kind}")


@pytest.fixture(scope="module")
def contract():
    doc = reference()
    return doc["paths"], doc["definitions"]


def answer(contract, where, port, owner, template: str, method: str, path: str, body=None, token="owner"):
    """One call, checked against the operation's declared answers; the body,
    parsed."""
    paths, defs = contract
    operation = paths[template][method]
    r = request(port, method.upper(), path, owner if token == "owner" else token, body)
    allowed = set(operation["responses"]) | EXTRA.get(method, set())
    assert str(r.status) in allowed, f"{where} {method.upper()} {path}: {r.status} not among {sorted(allowed)}"
    assert r.headers.get("content-type", "").split(";")[0] == "application/json", (where, r.headers)
    parsed = r.json()
    assert isinstance(parsed, dict), f"{where}: the body is not an object: {r.body[:200]!r}"
    declared = operation["responses"].get(str(r.status), {}).get("schema")
    if r.status < 300 and declared:
        check(parsed, declared, defs)
    if r.status >= 400:
        assert isinstance(parsed.get("message"), str) and parsed["message"], f"{where}: no message: {parsed}"
    return r.status, parsed


COLLECTION = "/apitokens/v1/namespaces/{ns}/apitokens"
ITEM = "/apitokens/v1/namespaces/{ns}/apitokens/{apiTokenName}"


@pytest.mark.parametrize("where", ["gateway", "direct"])
def test_a_generated_clients_lifecycle_matches_the_document(cp, envoy, contract, where):
    port = envoy.port if where == "gateway" else cp.api_port
    owner = cp.owner
    name = f"vvp-{where}"
    # The POST body is the whole ApiToken model: a generated client sends
    # the read-only fields as null.
    model = {"name": f"namespaces/default/apitokens/{name}", "role": "editor", "createTime": None, "secret": None}
    status, created = answer(contract, where, port, owner, COLLECTION, "post", tokens_path(), model)
    assert status == 200, created  # exactly 200: streaming-cli checks it
    token = created["apiToken"]
    remember_secret(token["secret"])
    assert token["name"] == model["name"] and token["role"] == "editor" and token["secret"].startswith("apt_")
    assert token["createTime"]

    # The new secret works at the gateway (the write answered once applied).
    assert envoy.get(APP, token["secret"]).status == 200

    status, listed = answer(contract, where, port, owner, COLLECTION, "get", tokens_path())
    assert status == 200 and model["name"] in [t["name"] for t in listed["apiTokens"]]
    assert all("secret" not in t for t in listed["apiTokens"]), "a listing never carries a secret"

    status, got = answer(contract, where, port, owner, ITEM, "get", tokens_path(token=name))
    assert status == 200 and got["apiToken"]["name"] == model["name"] and "secret" not in got["apiToken"]

    # A duplicate: 409 ("already exists"), the existing token untouched.
    status, dup = answer(contract, where, port, owner, COLLECTION, "post", tokens_path(),
                         {"name": model["name"], "role": "viewer"})
    assert status == 409, dup

    status, deleted = answer(contract, where, port, owner, ITEM, "delete", tokens_path(token=name))
    assert (status, deleted) == (200, {}), deleted  # a 204 breaks streaming-cli
    status, again = answer(contract, where, port, owner, ITEM, "delete", tokens_path(token=name))
    assert status == 404, again  # the operator reads 404 as "already gone"
    status, missing = answer(contract, where, port, owner, ITEM, "get", tokens_path(token=name))
    assert status == 404, missing
    assert envoy.get(APP, token["secret"]).status == 401, "revoked"


@pytest.mark.parametrize("where", ["gateway", "direct"])
def test_refusals_match_the_document(cp, envoy, contract, where):
    port = envoy.port if where == "gateway" else cp.api_port
    status, body = answer(contract, where, port, None, COLLECTION, "get", tokens_path(), token=None)
    assert status == 401, body
    viewer_model = {"name": "namespaces/default/apitokens/vvp-viewer", "role": "viewer"}
    status, made = answer(contract, where, port, cp.owner, COLLECTION, "post", tokens_path(), viewer_model)
    assert status == 200
    viewer = remember_secret(made["apiToken"]["secret"])
    try:
        status, body = answer(contract, where, port, cp.owner, COLLECTION, "post", tokens_path(),
                              {"name": "namespaces/default/apitokens/vvp-x", "role": "viewer"}, token=viewer)
        assert status == 403, body
    finally:
        request(cp.api_port, "DELETE", tokens_path(token="vvp-viewer"), cp.owner)


@pytest.mark.parametrize("field,value", [("secret", "apt_mine"), ("createTime", "2020-01-01T00:00:00Z")])
def test_a_client_never_chooses_a_secret_or_a_creation_time(cp, contract, field, value):
    body = {"name": "namespaces/default/apitokens/vvp-chosen", "role": "viewer", field: value}
    status, refused = answer(contract, "direct", cp.api_port, cp.owner, COLLECTION, "post", tokens_path(), body)
    assert status == 400 and refused.get("field") == field, refused
    assert value not in json.dumps(refused), "the error never echoes the value"
    assert request(cp.api_port, "GET", tokens_path(token="vvp-chosen"), cp.owner).status == 404
