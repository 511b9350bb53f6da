"""What a token may do: the permission table, namespaces, methods.

Verbs: GET on a collection = list, GET on an item = get, POST = create,
PUT/PATCH = update, DELETE = delete; after the namespace segment an odd number
of segments is a collection, an even number an item.
"""

import pytest

from testkit.checks import allowed, denied, describe
from testkit.clients import Client, RawH1, RawH2
from testkit.harness import Token, plugin_config

NS = "/api/v1/namespaces/default"
ART = "/artifacts/v1/namespaces/default"

# (method, path, roles allowed); every role not listed must get 403 role_denied.
TABLE = [
    # /apitokens/v1/namespaces/{ns}/apitokens[/...]: owner only, everything
    ("GET", "/apitokens/v1/namespaces/default/apitokens", {"owner"}),
    ("GET", "/apitokens/v1/namespaces/default/apitokens/ci-token", {"owner"}),
    ("POST", "/apitokens/v1/namespaces/default/apitokens", {"owner"}),
    ("PATCH", "/apitokens/v1/namespaces/default/apitokens/ci-token", {"owner"}),
    ("DELETE", "/apitokens/v1/namespaces/default/apitokens/ci-token", {"owner"}),
    # /namespaces/v1/namespaces/{ns}[/...]: owner get and update only, the whole subtree
    ("GET", "/namespaces/v1/namespaces/default", {"owner"}),
    ("GET", "/namespaces/v1/namespaces/default/members", {"owner"}),
    ("PUT", "/namespaces/v1/namespaces/default/members/m", {"owner"}),
    ("DELETE", "/namespaces/v1/namespaces/default/members/m", set()),
    ("PUT", "/namespaces/v1/namespaces/default", {"owner"}),
    ("PATCH", "/namespaces/v1/namespaces/default", {"owner"}),
    ("DELETE", "/namespaces/v1/namespaces/default", set()),
    ("POST", "/namespaces/v1/namespaces/default", set()),
    # secret-values: editor and owner, everything; viewer nothing (not even reads)
    ("GET", f"{NS}/secret-values", {"editor", "owner"}),
    ("GET", f"{NS}/secret-values/db-password", {"editor", "owner"}),
    ("POST", f"{NS}/secret-values", {"editor", "owner"}),
    ("DELETE", f"{NS}/secret-values/db-password", {"editor", "owner"}),
    # deployment-defaults / deployment-targets: everyone reads, only owner writes
    ("GET", f"{NS}/deployment-defaults", {"viewer", "editor", "owner"}),
    ("GET", f"{NS}/deployment-defaults/d1", {"viewer", "editor", "owner"}),
    ("POST", f"{NS}/deployment-defaults", {"owner"}),
    ("PUT", f"{NS}/deployment-defaults/d1", {"owner"}),
    ("GET", f"{NS}/deployment-targets", {"viewer", "editor", "owner"}),
    ("GET", f"{NS}/deployment-targets/t1", {"viewer", "editor", "owner"}),
    ("PATCH", f"{NS}/deployment-targets/t1", {"owner"}),
    ("DELETE", f"{NS}/deployment-targets/t1", {"owner"}),
    # artifacts:list and artifacts:getMetadata: everyone
    ("GET", f"{ART}/artifacts:list", {"viewer", "editor", "owner"}),
    ("POST", f"{ART}/artifacts:getMetadata", {"viewer", "editor", "owner"}),
    # other artifacts:<verb>: editor and owner
    ("POST", f"{ART}/artifacts:upload", {"editor", "owner"}),
    ("GET", f"{ART}/artifacts:download", {"editor", "owner"}),
    # anything else with a namespace: viewer reads, editor and owner everything
    ("GET", f"{NS}/deployments", {"viewer", "editor", "owner"}),
    ("GET", f"{NS}/deployments/d1", {"viewer", "editor", "owner"}),
    ("GET", f"{NS}/deployments/d1/events", {"viewer", "editor", "owner"}),
    ("POST", f"{NS}/deployments", {"editor", "owner"}),
    ("PUT", f"{NS}/deployments/d1", {"editor", "owner"}),
    ("PATCH", f"{NS}/deployments/d1", {"editor", "owner"}),
    ("DELETE", f"{NS}/deployments/d1", {"editor", "owner"}),
    ("POST", f"{NS}/deployments/d1/events", {"editor", "owner"}),
    ("GET", "/sql/v1beta1/namespaces/default/sqlscripts", {"viewer", "editor", "owner"}),
    ("DELETE", "/sql/v1beta1/namespaces/default/sqlscripts/s1", {"editor", "owner"}),
    ("GET", f"{NS}/deployments?labelSelector=a%3Db&namespace=other", {"viewer", "editor", "owner"}),
    # other spellings of a restricted segment (case, a '.' suffix) are decided by its rule
    ("GET", f"{NS}/Secret-Values", {"editor", "owner"}),
    ("GET", f"{NS}/secret-values.json", {"editor", "owner"}),
    ("GET", "/API/v1/namespaces/default/secret-values.", {"editor", "owner"}),
    ("GET", "/Namespaces/V1/namespaces/default", {"owner"}),
    ("GET", "/apitokens/v1/namespaces/default/APITOKENS", {"owner"}),
    # no namespace in the path: nobody
    ("GET", "/healthz", set()),
    ("GET", "/", set()),
    ("GET", "/api/v1/deployments", set()),
    ("GET", "/api/v1/namespaces", set()),
    ("POST", "/api/v1/namespaces", set()),
    ("GET", "/api/v1/namespace/default/deployments", set()),
    ("GET", "/namespaces/default/deployments", set()),
    # methods outside the verb table: nobody
    ("HEAD", f"{NS}/deployments", set()),
    ("OPTIONS", f"{NS}/deployments", set()),
    ("TRACE", f"{NS}/deployments", set()),
]

ROLES = ["viewer", "editor", "owner"]


def roles_of(method: str, path: str) -> set[str]:
    return next(roles for (m, p, roles) in TABLE if (m, p) == (method, path))


CASES = [(m, p, role, role in roles) for (m, p, roles) in TABLE for role in ROLES]


@pytest.mark.parametrize(
    "method,path,role,expect_allowed",
    CASES,
    ids=[f"{m} {p} as {r} -> {'allow' if ok else 'deny'}" for m, p, r, ok in CASES],
)
def test_permission_table(client, tokens, method, path, role, expect_allowed):
    token = tokens.by_role(role)
    resp = client.request(method, path, token=token, content=b"{}" if method in ("POST", "PUT", "PATCH") else None)
    if expect_allowed:
        # No built-in rule forwards Authorization: behind this static setup the
        # token API's paths reach the application's upstream.
        seen = allowed(resp, token)
        assert seen["method"] == method
    else:
        # The role to ask for: the narrowest broader one the row admits
        # (none for a row no role passes).
        broader = ROLES[ROLES.index(role) + 1:]
        needed = next((r for r in broader if r in roles_of(method, path)), None)
        denied(resp, "role_denied", secret=token.secret, head=method == "HEAD", required_role=needed)


@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", f"{NS}/deployments"),
        ("GET", "/namespaces/v1/namespaces/default"),
        ("POST", f"{ART}/artifacts:list"),
        ("DELETE", "/apitokens/v1/namespaces/default/apitokens/x"),
    ],
)
@pytest.mark.parametrize("role", ROLES)
def test_other_namespace_is_denied(client, tokens, method, path, role):
    token = tokens.by_role(role)
    foreign = path.replace("/namespaces/default", "/namespaces/other")
    denied(client.request(method, foreign, token=token), "namespace_denied", secret=token.secret)


def test_token_of_other_namespace(client, tokens):
    t = tokens.other_ns  # editor in "other"
    allowed(client.request("POST", "/api/v1/namespaces/other/deployments", token=t, content=b"{}"), t)
    denied(client.get(f"{NS}/deployments", token=t), "namespace_denied", secret=t.secret)


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/namespaces/Default/deployments",   # upper case
        "/api/v1/namespaces/-default/deployments",  # leading hyphen
        "/api/v1/namespaces/default-/deployments",  # trailing hyphen
        "/api/v1/namespaces/def_ault/deployments",  # underscore
        "/api/v1/namespaces/def.ault/deployments",  # dot
        "/api/v1/namespaces/" + "a" * 64 + "/deployments",  # 64 > 63 characters
    ],
    ids=["upper", "leading-hyphen", "trailing-hyphen", "underscore", "dot", "64-chars"],
)
def test_namespace_must_be_a_dns_label(client, tokens, path):
    resp = client.get(path, token=tokens.owner)
    assert resp.status_code == 403, describe(resp)
    assert resp.envoy.access_log_entry(resp.e2e_id)["details"] in (
        "apitokens_role_denied",
        "apitokens_namespace_denied",
    )
    assert resp.envoy.upstream.find("x-e2e-id", resp.e2e_id) == []


def test_namespace_of_63_characters(start_envoy, proto):
    """A namespace at the DNS-label limit works end to end."""
    ns = "n" + "0" * 61 + "n"
    token = Token(ns, "long", "viewer")
    envoy = start_envoy(plugin_config([token]), name="ns63")
    c = Client(envoy, proto)
    try:
        allowed(c.get(f"/api/v1/namespaces/{ns}/deployments", token=token), token)
    finally:
        c.close()
        envoy.stop()


def test_lowercase_method_is_denied_over_http2(envoy, tokens):
    """Methods are case-sensitive: `get` is not GET. HTTP/2 carries it to the filter;
    Envoy's HTTP/1.1 codec already rejects it (400 http1.codec_error)."""
    with RawH2(envoy) as h2c:
        denied(h2c.request("get", f"{NS}/deployments", [("authorization", tokens.owner.authorization)]),
               "role_denied", required_role=None)
    with RawH1(envoy) as h1c:
        resp = h1c.request("get", f"{NS}/deployments", [("authorization", tokens.owner.authorization)])
        assert resp.status_code == 400
    assert not [e for e in envoy.access_log() if e.get("method") == "get" and e.get("code") == 200]
