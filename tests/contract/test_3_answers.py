"""The documented answers the generated calls do not provoke (or provoke
without saying which case they are), one request each, checked against the
document with `oas.check`: the read-your-writes headers, the filter's
refusals and their challenges, the rules beyond the role, 405 with `Allow`,
409, 413, both kinds of 429, secrets never echoed, a repeated query
parameter (the two server bugs this suite found first, fixed)."""

from __future__ import annotations

import http.client
import json

import pytest

import oas
from callers import QUOTA, Credentials
from testkit.clients import request
from testkit.controlplane import ControlPlane, tokens_path
from testkit.harness import SECRETS, remember_secret
from testkit.timing import limit

COLLECTION = "/apitokens/v1/namespaces/{ns}/apitokens"
ITEM = COLLECTION + "/{apiTokenName}"
REGENERATE = ITEM + ":regenerate"
DISABLE = ITEM + ":disable"
ENABLE = ITEM + ":enable"
EVENTS = COLLECTION + ":events"


def call(plane, document, template, method, path, who="owner", body=None, headers=None, status=None):
    """One request as `who` (a name in plane.creds, a secret, or None),
    checked against the document; the parsed body."""
    token = plane.creds.get(who, who) if who else None
    r = request(plane.api_port, method, path, token, body, headers)
    if status is not None:
        assert r.status == status, f"{method} {path}: {r.status} {oas.redact(r.body[:300], SECRETS)}"
    parsed = oas.check(document, template, method.lower(), r.status, r.headers, r.body, SECRETS)
    if r.status == 200 and isinstance(parsed, dict) and "secret" in parsed.get("apiToken", {}):
        remember_secret(parsed["apiToken"]["secret"])
    if r.status >= 400:
        assert not any(s.encode() in r.body for s in SECRETS if s), f"{method} {path}: a secret in the error"
        assert not oas.SECRET_SHAPE.search(r.body), f"{method} {path}: an apt_ secret in the error"
    return r, parsed


def new_token(plane, document, token_id, role="viewer", **extra):
    body = {"name": f"namespaces/default/apitokens/{token_id}", "role": role, **extra}
    return call(plane, document, COLLECTION, "POST", tokens_path(), body=body, status=200)


def test_a_write_answer_says_where_the_change_stands(plane, document):
    r, made = new_token(plane, document, "rw-waited")
    assert r.headers["x-apitokens-applied"] == "true"
    assert r.headers["x-apitokens-envoys"] == "0/0", "no Envoy is connected"
    assert int(r.headers["x-apitokens-config-version"]) > 0
    assert "x-apitokens-not-applied" not in r.headers
    assert oas.SECRET_SHAPE.fullmatch(made["apiToken"]["secret"].encode()), "a secret of the apt_ format"
    assert made["apiToken"]["createdBy"] == "namespaces/default/apitokens/admin"
    r, _ = call(plane, document, COLLECTION, "POST", tokens_path() + "?waitForEnvoys=false",
                body={"name": "namespaces/default/apitokens/rw-not-waited", "role": "editor"}, status=200)
    assert r.headers["x-apitokens-applied"] == "not-waited"
    assert "x-apitokens-envoys" not in r.headers and "x-apitokens-config-version" in r.headers
    r, _ = call(plane, document, REGENERATE, "POST", tokens_path(token="rw-waited") + ":regenerate?waitForEnvoys=true",
                status=200)
    assert r.headers["x-apitokens-applied"] == "true"
    r, body = call(plane, document, ITEM, "DELETE", tokens_path(token="rw-not-waited") + "?waitForEnvoys=false",
                   status=200)
    assert body == {} and r.headers["x-apitokens-applied"] == "not-waited"
    for bad in ("maybe", "1", "", "true&waitForEnvoys=false"):
        _, err = call(plane, document, ITEM, "DELETE", tokens_path(token="rw-waited") + f"?waitForEnvoys={bad}",
                      status=400)
        assert err["field"] == "waitForEnvoys"


def test_a_regeneration_with_an_overlap_says_until_when(plane, document):
    new_token(plane, document, "rotate-me")
    _, body = call(plane, document, REGENERATE, "POST", tokens_path(token="rotate-me") + ":regenerate",
                   body={"previousSecretTtl": "1.5s"}, status=200)
    assert "previousSecretExpireTime" in body["apiToken"]
    _, got = call(plane, document, ITEM, "GET", tokens_path(token="rotate-me"), status=200)
    assert got["apiToken"]["previousSecretExpireTime"] == body["apiToken"]["previousSecretExpireTime"]
    for ttl, status in (("604800s", 200), ("604801s", 400), ("1h", 400), ("s", 400), (None, 200), ("0s", 200)):
        _, b = call(plane, document, REGENERATE, "POST", tokens_path(token="rotate-me") + ":regenerate",
                    body={"previousSecretTtl": ttl}, status=status)
        if status == 400:
            assert b["field"] == "previousSecretTtl"
    for raw in (b"", b"  ", b"{}"):
        call(plane, document, REGENERATE, "POST", tokens_path(token="rotate-me") + ":regenerate", body=raw,
             status=200)


def test_the_filters_refusals_carry_their_challenge(plane, document):
    path = tokens_path()
    cases = [
        (None, {}, 401, 'Bearer realm="apitokens"'),
        (None, {"Authorization": "Basic dXNlcjpwYXNz"}, 401, 'Bearer realm="apitokens"'),
        ("mistyped secret", {}, 401, 'Bearer realm="apitokens", error="invalid_token"'),
        ("unknown secret", {}, 401, 'Bearer realm="apitokens", error="invalid_token"'),
        ("expired owner", {}, 401, 'Bearer realm="apitokens", error="invalid_token"'),
        ("viewer", {}, 403, 'Bearer realm="apitokens", error="insufficient_scope"'),
        ("editor", {}, 403, 'Bearer realm="apitokens", error="insufficient_scope"'),
        ("other-namespace owner", {}, 403, 'Bearer realm="apitokens", error="insufficient_scope"'),
    ]
    for who, headers, status, challenge in cases:
        r, body = call(plane, document, COLLECTION, "GET", path, who=who, headers=headers, status=status)
        assert r.headers["www-authenticate"] == challenge, (who, r.headers.get("www-authenticate"))
        assert body["code"] == status and "field" not in body


def test_several_credentials_are_a_400_with_a_challenge(plane, document):
    conn = http.client.HTTPConnection("127.0.0.1", plane.api_port, timeout=limit(10))
    try:
        conn.putrequest("GET", tokens_path())
        conn.putheader("Authorization", f"Bearer {plane.creds['owner']}")
        conn.putheader("Authorization", f"Bearer {plane.creds['viewer']}")
        conn.endheaders()
        resp = conn.getresponse()
        headers = {k.lower(): v for k, v in resp.getheaders()}
        body = resp.read()
    finally:
        conn.close()
    assert resp.status == 400
    assert headers["www-authenticate"] == 'Bearer realm="apitokens", error="invalid_request"'
    oas.check(document, COLLECTION, "get", resp.status, headers, body, SECRETS)
    assert not any(s.encode() in body for s in SECRETS)


def test_the_rules_beyond_the_role_are_403s_without_a_challenge(plane, document):
    # A previous secret reads, never writes.
    call(plane, document, COLLECTION, "GET", tokens_path(), who="previous secret", status=200)
    r, body = call(plane, document, COLLECTION, "POST", tokens_path(), who="previous secret",
                   body={"name": "namespaces/default/apitokens/by-previous", "role": "viewer"}, status=403)
    assert "www-authenticate" not in r.headers and "previous secret" in body["message"]
    # A short-lived owner creates tokens that expire no later than itself,
    # and may not regenerate one that outlives it.
    _, made = call(plane, document, COLLECTION, "POST", tokens_path(), who="short-lived owner",
                   body={"name": "namespaces/default/apitokens/by-short", "role": "viewer"}, status=200)
    assert made["apiToken"]["expireTime"]
    _, err = call(plane, document, COLLECTION, "POST", tokens_path(), who="short-lived owner",
                  body={"name": "namespaces/default/apitokens/by-short-2", "role": "viewer",
                        "expireTime": "2099-01-01T00:00:00Z"}, status=400)
    assert err["field"] == "expireTime"
    r, body = call(plane, document, REGENERATE, "POST", tokens_path(token="seed-0000") + ":regenerate",
                   who="short-lived owner", status=403)
    assert "www-authenticate" not in r.headers and "never expires" in body["message"]


def test_a_disabled_token_is_refused_kept_and_enabled_again(plane, document):
    _, made = new_token(plane, document, "suspend-me", role="owner")
    assert made["apiToken"]["state"] == "enabled"
    secret = made["apiToken"]["secret"]
    path = tokens_path(token="suspend-me")
    call(plane, document, COLLECTION, "GET", tokens_path(), who=secret, status=200)
    r, off = call(plane, document, DISABLE, "POST", path + ":disable", status=200)
    assert off["apiToken"]["state"] == "disabled" and "secret" not in off["apiToken"]
    assert r.headers["x-apitokens-applied"] == "true"
    version = r.headers["x-apitokens-config-version"]
    # Refused as an unknown secret is (by the API's own check here).
    r, _ = call(plane, document, COLLECTION, "GET", tokens_path(), who=secret, status=401)
    assert r.headers["www-authenticate"] == 'Bearer realm="apitokens", error="invalid_token"'
    _, got = call(plane, document, ITEM, "GET", path, status=200)
    assert got["apiToken"]["state"] == "disabled"
    _, listed = call(plane, document, COLLECTION, "GET", tokens_path(), status=200)
    states = {t["name"]: t["state"] for t in listed["apiTokens"]}
    assert states["namespaces/default/apitokens/suspend-me"] == "disabled"
    assert states["namespaces/default/apitokens/admin"] == "enabled"
    # Again, with `{}`: the same answer, no new version. (But for what the
    # usage written meanwhile says: the GET above was a use of the token.)
    r, again = call(plane, document, DISABLE, "POST", path + ":disable", body={}, status=200)
    usage = ("lastUseTime", "access", "lastAddresses")
    assert ({k: v for k, v in again["apiToken"].items() if k not in usage}
            == {k: v for k, v in off["apiToken"].items() if k not in usage})
    assert r.headers["x-apitokens-config-version"] == version
    r, on = call(plane, document, ENABLE, "POST", path + ":enable?waitForEnvoys=false", status=200)
    assert on["apiToken"]["state"] == "enabled" and r.headers["x-apitokens-applied"] == "not-waited"
    assert int(r.headers["x-apitokens-config-version"]) > int(version)
    call(plane, document, COLLECTION, "GET", tokens_path(), who=secret, status=200)
    _, events = call(plane, document, EVENTS, "GET", tokens_path() + ":events?pageSize=5", status=200)
    mine = [e["event"] for e in events["events"] if e.get("token") == "namespaces/default/apitokens/suspend-me"]
    assert mine[:3] == ["apitoken.enable", "apitoken.disable", "apitoken.create"], mine
    # The rules of the other writes: a previous secret never writes, a
    # short-lived owner changes nothing that outlives it, a missing token.
    for template, action in ((DISABLE, "disable"), (ENABLE, "enable")):
        r, body = call(plane, document, template, "POST", tokens_path(token="seed-0000") + f":{action}",
                       who="previous secret", status=403)
        assert "www-authenticate" not in r.headers and "previous secret" in body["message"]
        r, body = call(plane, document, template, "POST", tokens_path(token="seed-0000") + f":{action}",
                       who="short-lived owner", status=403)
        assert "www-authenticate" not in r.headers and "never expires" in body["message"]
        call(plane, document, template, "POST", tokens_path(token="never-was") + f":{action}", status=404)
        for raw in (b"[]", b'{"previousSecretTtl": "60s"}', b"{"):
            call(plane, document, template, "POST", path + f":{action}", body=raw, status=400)


def test_a_create_body_is_vvps_model_and_nothing_else(plane, document):
    name = "namespaces/default/apitokens/vvp-model"
    for extra, field in (({"createTime": "2020-01-01T00:00:00Z"}, "createTime"),
                         ({"secret": plane.creds["owner"]}, "secret"),
                         ({"role": "admin"}, "role"),
                         # A value of the wrong kind is named too.
                         ({"role": 1}, "role"),
                         ({"rateLimit": {"requests": 0, "per": "second"}}, "rateLimit.requests"),
                         ({"rateLimit": {"requests": "10", "per": "second"}}, "rateLimit"),
                         ({"expireTime": "2001-01-01T00:00:00Z"}, "expireTime"),
                         ({"expireTime": "tomorrow"}, "expireTime"),
                         ({"name": "namespaces/other/apitokens/vvp-model"}, "name"),
                         ({"name": "vvp-model"}, "name")):
        _, err = call(plane, document, COLLECTION, "POST", tokens_path(),
                      body={"name": name, "role": "viewer", **extra}, status=400)
        assert err["field"] == field, f"a create with a bad {field}: {err}"
    for raw in (b"", b"{", b"[]", b"null", b'{"role": "viewer"}', b'{"name": "x", "role": "viewer"} x'):
        _, err = call(plane, document, COLLECTION, "POST", tokens_path(), body=raw, status=400)
        assert "field" not in err
    _, made = call(plane, document, COLLECTION, "POST", tokens_path(),
                   body={"name": name, "role": "viewer", "createTime": None, "secret": None, "expireTime": None},
                   status=200)
    assert "expireTime" not in made["apiToken"], "an owner that never expires, no maximum lifetime: never"
    _, dup = call(plane, document, COLLECTION, "POST", tokens_path(), body={"name": name, "role": "owner"},
                  status=409)
    assert dup["field"] == "name"


def test_unknown_tokens_paths_and_actions_are_404s(plane, document):
    call(plane, document, ITEM, "GET", tokens_path(token="never-was"), status=404)
    call(plane, document, ITEM, "DELETE", tokens_path(token="never-was"), status=404)
    call(plane, document, REGENERATE, "POST", tokens_path(token="never-was") + ":regenerate", status=404)
    _, err = call(plane, document, REGENERATE, "POST", tokens_path(token="seed-0003:frob") + ":regenerate",
                  status=404)
    assert "unknown action" in err["message"]
    # The router's own 404, before any authentication.
    for path in (tokens_path(token="seed-0003") + "/more", "/apitokens/v1/namespaces/default/apitokens:frob",
                 "/apitokens/v2/namespaces/default/apitokens"):
        r = request(plane.api_port, "GET", path)
        assert r.status == 404 and r.headers["content-type"] == "application/json", (path, r.status)
        oas.check(document, ITEM, "get", r.status, r.headers, r.body)


@pytest.mark.parametrize("template,path,allow,methods", [
    (COLLECTION, tokens_path(), "GET, POST", ["PUT", "PATCH", "DELETE", "OPTIONS"]),
    (ITEM, tokens_path(token="seed-0004"), "GET, PATCH, DELETE", ["PUT", "POST", "HEAD"]),
    (REGENERATE, tokens_path(token="seed-0004") + ":regenerate", "POST", ["GET", "PUT", "DELETE"]),
    (DISABLE, tokens_path(token="seed-0004") + ":disable", "POST", ["GET", "PUT", "DELETE"]),
    (ENABLE, tokens_path(token="seed-0004") + ":enable", "POST", ["GET", "PUT", "DELETE"]),
    (EVENTS, tokens_path() + ":events", "GET", ["POST", "PUT", "DELETE"]),
    (COLLECTION + ":self", tokens_path() + ":self", "GET", ["POST", "PUT", "DELETE"]),
])
def test_other_methods_are_405s_with_allow(plane, document, template, path, allow, methods):
    entry = document.resolve({"$ref": "#/components/responses/MethodNotAllowed"})
    for method in methods:
        r = request(plane.api_port, method, path, plane.creds["owner"])
        assert r.status == 405, (method, path, r.status)
        assert r.headers["allow"] == allow, (method, path, r.headers.get("allow"))
        if method != "HEAD":
            body = json.loads(r.body)
            assert body["code"] == 405 and r.headers["content-type"] == "application/json"
        assert entry["headers"]["Allow"]
        assert r.headers["cache-control"] == "no-store"


def test_a_body_over_64_kib_is_a_413(plane, document):
    big = json.dumps({"name": "namespaces/default/apitokens/big", "role": "viewer", "pad": "x" * 70_000})
    call(plane, document, COLLECTION, "POST", tokens_path(), body=big, status=413)
    call(plane, document, REGENERATE, "POST", tokens_path(token="seed-0005") + ":regenerate", body=big,
         status=413)


def test_a_namespace_at_its_quota_is_a_429_without_retry_after(plane, document):
    r, err = call(plane, document, COLLECTION, "POST", tokens_path("full"), who="owner of full",
                  body={"name": "namespaces/full/apitokens/one-more", "role": "viewer"}, status=429)
    assert "retry-after" not in r.headers and str(QUOTA) in err["message"]


def test_a_namespace_writing_too_fast_is_a_429_with_retry_after(workdir, document):
    slow = ControlPlane(workdir / "slow", name="slow",
                        always=("--namespace-writes-per-second", "1", "--namespace-write-burst", "1"))
    owner = slow.bootstrap("default", "admin")
    slow.creds = Credentials({"owner": owner})  # type: ignore[attr-defined]
    slow.start()
    try:
        new_token(slow, document, "first")
        r, err = call(slow, document, COLLECTION, "POST", tokens_path(),
                      body={"name": "namespaces/default/apitokens/second", "role": "viewer"}, status=429)
        assert int(r.headers["retry-after"]) >= 1 and "field" not in err
        call(slow, document, ITEM, "DELETE", tokens_path(token="first"), status=429)
        call(slow, document, REGENERATE, "POST", tokens_path(token="first") + ":regenerate", status=429)
        call(slow, document, DISABLE, "POST", tokens_path(token="first") + ":disable", status=429)
        call(slow, document, COLLECTION, "GET", tokens_path(), status=200)  # reads are not counted
    finally:
        slow.stop()


def test_the_audit_trail_pages(plane, document):
    _, first = call(plane, document, EVENTS, "GET", tokens_path() + ":events?pageSize=2", status=200)
    assert len(first["events"]) == 2 and first["nextPageToken"]
    _, second = call(plane, document, EVENTS, "GET",
                     tokens_path() + f":events?pageSize=1000&pageToken={first['nextPageToken']}", status=200)
    imports = [e for e in second["events"] if e["event"] == "apitoken.import"]
    assert imports and imports[0]["count"] >= 1000 and "token" not in imports[0]
    for query, field in (("pageSize=0", "pageSize"), ("pageSize=1001", "pageSize"), ("pageSize=x", "pageSize"),
                         ("pageToken=x", "pageToken")):
        _, err = call(plane, document, EVENTS, "GET", tokens_path() + f":events?{query}", status=400)
        assert err["field"] == field


def test_a_repeated_query_parameter_is_a_json_400(plane, document):
    """Once axum's own text/plain 400 without no-store."""
    call(plane, document, EVENTS, "GET", tokens_path() + ":events?pageSize=1&pageSize=2", status=400)
    r = request(plane.api_port, "GET", "/status?version=1&version=2")
    assert r.status == 400 and r.headers["content-type"] == "application/json", r


def test_an_unknown_body_field_is_not_echoed(plane, document):
    secret = plane.creds["viewer"]
    body = json.dumps({"name": "namespaces/default/apitokens/echo", "role": "viewer", secret: 1})
    r = request(plane.api_port, "POST", tokens_path(), plane.creds["owner"], body)
    assert r.status == 400
    echoed = secret.encode() in r.body
    assert not echoed, "the 400 repeats the unknown field's name, here a secret"
    # What was expected is still said.
    assert "unknown field" in r.json()["message"] and "`role`" in r.json()["message"], r
