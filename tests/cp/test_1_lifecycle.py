"""The token lifecycle through a real Envoy configured over ECDS: create, use,
role and namespace limits, regenerate, revoke, expiry, non-owners, bad input."""

from __future__ import annotations

import time

import pytest

from testkit.clients import request
from testkit.controlplane import APP, MEASUREMENTS, create, tokens_path, until_status, version_of
from testkit.harness import poll, remember_secret


def test_unauthenticated_requests_are_refused(envoy):
    assert envoy.get(APP).status == 401
    assert envoy.get(tokens_path()).status == 401
    r = envoy.get(APP, "not-a-token")
    assert r.status == 401
    assert 'error="invalid_token"' in r.headers["www-authenticate"]


def test_owner_uses_the_api_through_envoy(envoy, owner):
    r = envoy.get(tokens_path(), owner)
    assert r.status == 200, r
    names = [t["name"] for t in r.json()["apiTokens"]]
    assert "namespaces/default/apitokens/admin" in names
    assert all("secret" not in t for t in r.json()["apiTokens"])


def test_create_use_and_limits(envoy, cp, owner):
    r = create(envoy.port, owner, "ci-viewer", "viewer")
    assert r.status == 200, r
    token = r.json()["apiToken"]
    assert token["name"] == "namespaces/default/apitokens/ci-viewer"
    assert token["role"] == "viewer"
    assert token["secret"].startswith("apt_") and len(token["secret"]) == 42
    assert "createTime" in token and "expireTime" not in token
    secret = token["secret"]
    # Pushed before the API answered; acknowledged within moments.
    cp.wait_applied(version_of(r))
    until_status(envoy, APP, secret, 200)
    echoed = envoy.get(APP, secret).json()
    assert echoed["headers"]["x-apitoken-name"] == "namespaces/default/apitokens/ci-viewer"
    assert echoed["headers"]["x-apitoken-role"] == "viewer"
    # Outside its role: a viewer cannot create; outside its namespace: nothing.
    r = envoy.get(APP, secret, method="POST", body={})
    assert r.status == 403 and 'error="insufficient_scope"' in r.headers["www-authenticate"]
    assert envoy.get("/api/v1/namespaces/other/deployments", secret).status == 403
    # The secret is never listed again.
    listed = envoy.get(tokens_path(), owner)
    assert secret not in listed.body.decode()
    got = envoy.get(tokens_path(token="ci-viewer"), owner)
    assert got.status == 200 and "secret" not in got.json()["apiToken"]


def test_non_owners_cannot_manage_tokens(envoy, cp, owner):
    r = create(envoy.port, owner, "ci-editor", "editor")
    editor = r.json()["apiToken"]["secret"]
    cp.wait_applied(version_of(r))
    until_status(envoy, APP, editor, 200)
    # `bootstrap` next to the running server: picked up by its store poll.
    other_owner = cp.bootstrap("other", "boss")
    until_status(envoy, "/api/v1/namespaces/other/deployments", other_owner, 200)
    body = {"name": "namespaces/default/apitokens/sneaky", "role": "owner"}
    before = without_usage(envoy.get(tokens_path(), owner).json())
    for secret in (editor, other_owner):
        # Refused by the filter in Envoy ...
        r = envoy.get(tokens_path(), secret, method="POST", body=body)
        assert r.status == 403, r
        # ... and by the control plane itself when called directly.
        r = cp.api("POST", tokens_path(), secret, body)
        assert r.status == 403, r
        assert 'error="insufficient_scope"' in r.headers["www-authenticate"]
        assert cp.api("GET", tokens_path(), secret).status == 403
    assert without_usage(envoy.get(tokens_path(), owner).json()) == before
    # The other namespace's owner manages its own namespace.
    r = envoy.get(tokens_path("other"), other_owner)
    assert r.status == 200 and [t["name"] for t in r.json()["apiTokens"]] == ["namespaces/other/apitokens/boss"]


def test_regenerate(envoy, cp, owner):
    r = create(envoy.port, owner, "rotating", "editor")
    old = r.json()["apiToken"]["secret"]
    cp.wait_applied(version_of(r))
    until_status(envoy, APP, old, 200)
    r = envoy.get(tokens_path(token="rotating:regenerate"), owner, method="POST")
    assert r.status == 200, r
    new = r.json()["apiToken"]["secret"]
    remember_secret(new)
    assert new != old and r.json()["apiToken"]["role"] == "editor"
    t_answer = time.monotonic()
    until_status(envoy, APP, old, 401)
    MEASUREMENTS.setdefault("regenerate (old secret refused), gRPC ECDS", []).append(time.monotonic() - t_answer)
    assert envoy.get(APP, new).status == 200
    cp.wait_applied(version_of(r))


def test_revoke_and_measure_the_delay(envoy, cp, owner):
    for i in range(5):
        r = create(envoy.port, owner, f"doomed-{i}", "viewer")
        secret = r.json()["apiToken"]["secret"]
        cp.wait_applied(version_of(r))
        until_status(envoy, APP, secret, 200)
        r = envoy.get(tokens_path(token=f"doomed-{i}"), owner, method="DELETE")
        assert r.status == 200, r
        t_answer = time.monotonic()
        delay = until_status(envoy, APP, secret, 401)
        MEASUREMENTS.setdefault("revoke, gRPC ECDS", []).append(time.monotonic() - t_answer)
        assert delay < 2.0
        st = cp.wait_applied(version_of(r))
        assert any(e["node"] == envoy.node and int(e["enforcedVersion"]) >= version_of(r) for e in st["envoys"])
        assert envoy.get(tokens_path(token=f"doomed-{i}"), owner).status == 404


def test_expiry(envoy, cp, owner):
    expire = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3))
    r = create(envoy.port, owner, "brief", "viewer", expireTime=expire)
    assert r.status == 200, r
    assert r.json()["apiToken"]["expireTime"] == expire
    secret = r.json()["apiToken"]["secret"]
    cp.wait_applied(version_of(r))
    tokens_before = cp.status()["tokens"]
    assert envoy.get(APP, secret).status == 200
    until_status(envoy, APP, secret, 401, timeout=6)
    # The filter refuses it at the second; the control plane keeps it in the
    # pushed configuration for the retention (so Envoy counts it as expired),
    # then drops it by itself.
    assert cp.status()["tokens"] == tokens_before
    poll(lambda: cp.status()["tokens"] == tokens_before - 1, 8, "expired token left out after the retention")
    # The API still lists it, with its expiry.
    got = envoy.get(tokens_path(token="brief"), owner).json()["apiToken"]
    assert got["expireTime"] == expire


BAD_INPUTS = [
    # (method, path, body, status via Envoy (None: the control plane's answer
    # passes through), status direct, words in the message)
    ("POST", tokens_path(), {"name": "bad", "role": "viewer"}, None, 400, "fully qualified"),
    ("POST", tokens_path(), {"name": "namespaces/other/apitokens/x", "role": "viewer"}, None, 400, "another namespace"),
    ("POST", tokens_path(), {"name": "namespaces/default/apitokens/Not_Valid", "role": "viewer"}, None, 400, "token id"),
    ("POST", tokens_path(), {"name": "namespaces/default/apitokens/x", "role": "admin"}, None, 400, "unknown role"),
    ("POST", tokens_path(), {"name": "namespaces/default/apitokens/x", "role": "viewer",
                             "expireTime": "2001-01-01T00:00:00Z"}, None, 400, "in the future"),
    ("POST", tokens_path(), {"name": "namespaces/default/apitokens/x", "role": "viewer",
                             "expireTime": "next week"}, None, 400, "RFC 3339"),
    ("POST", tokens_path(), '{"name": "namespaces/default/apitokens/x", "role": ', None, 400, "not valid JSON"),
    ("POST", tokens_path(), {"name": "namespaces/default/apitokens/x", "role": "viewer", "secret": "s"}, None, 400,
     "generates the secret"),
    ("POST", tokens_path(), {"name": "namespaces/default/apitokens/x", "role": "viewer",
                             "createTime": "2020-01-01T00:00:00Z"}, None, 400, "sets the creation time"),
    ("POST", tokens_path(), {"name": "namespaces/default/apitokens/x", "role": "viewer", "color": "red"}, None, 400,
     "unknown field"),
    ("POST", tokens_path(), '{"name": "namespaces/default/apitokens/x", "role": "viewer", "pad": "'
     + "a" * 70000 + '"}', None, 413, "larger than"),
    ("POST", tokens_path(), {"name": "namespaces/default/apitokens/admin", "role": "owner"}, None, 409,
     "already exists"),
    ("GET", tokens_path(token="nobody"), None, None, 404, "not found"),
    ("DELETE", tokens_path(token="nobody"), None, None, 404, "not found"),
    ("POST", tokens_path(token="nobody:regenerate"), None, None, 404, "not found"),
    # Paths the filter itself refuses (its rules match DNS labels only, never
    # percent-escapes); the control plane, called directly, says why.
    ("GET", "/apitokens/v1/namespaces/Default/apitokens", None, 403, 400, "must be a DNS label"),
    # Envoy's normalize_path decodes escaped unreserved characters (RFC 3986
    # 6.2.2.2): this is a plain list of "default" through Envoy.
    ("GET", "/apitokens/v1/namespaces/def%61ult/apitokens", None, 200, 400, "must be a DNS label"),
    ("GET", tokens_path(token="UPPER"), None, None, 400, "must be a DNS label"),
]


def without_usage(listing: dict) -> dict:
    """A list answer without what usage reports write meanwhile (the owner's
    own requests are uses: its last use, its evidence, where from)."""
    usage = ("lastUseTime", "access", "lastAddresses")
    return {**listing, "apiTokens": [{k: v for k, v in t.items() if k not in usage} for t in listing["apiTokens"]]}


@pytest.mark.parametrize("method,path,body,via_envoy,direct,words", BAD_INPUTS,
                         ids=[f"{m} {p[:60]} {w}" for m, p, _, _, _, w in BAD_INPUTS])
def test_bad_input_changes_nothing(envoy, cp, owner, method, path, body, via_envoy, direct, words):
    listed = without_usage(envoy.get(tokens_path(), owner).json())
    status_before = cp.status()
    stats_before = envoy.stats()
    for where, port, expected in (("envoy", envoy.port, via_envoy), ("direct", cp.api_port, direct)):
        r = request(port, method, path, owner, body)
        if expected is None:
            expected = direct
        assert r.status == expected, (where, r)
        if r.status not in (200, 403):
            err = r.json()
            assert err["code"] == expected and words in err["message"], (where, err)
    assert without_usage(envoy.get(tokens_path(), owner).json()) == listed
    after = cp.status()
    assert after["version"] == status_before["version"]
    assert [e["ackedVersion"] for e in after["envoys"]] == [e["ackedVersion"] for e in status_before["envoys"]]
    # Envoy's ECDS state did not move either.
    key = "extension_config_discovery.http_filter.apitokens.config_reload"
    assert envoy.stats().get(key) == stats_before.get(key)


def test_missing_and_bad_tokens_on_the_api(envoy, cp):
    for port in (envoy.port, cp.api_port):
        r = request(port, "GET", tokens_path())
        assert r.status == 401 and r.headers["www-authenticate"] == 'Bearer realm="apitokens"'
        r = request(port, "GET", tokens_path(), "apt_" + "A" * 38)
        assert r.status == 401 and 'error="invalid_token"' in r.headers["www-authenticate"]


def test_an_expiry_a_fraction_of_a_second_past_is_refused(cp, owner):
    """The expiry is compared with the time to the nanosecond, not the
    second: an expiry 0.4 s ago, in the current second, is in the past."""
    from datetime import datetime, timezone
    while not 0.5 <= time.time() % 1 < 0.8:
        time.sleep(0.01)
    past = datetime.fromtimestamp(time.time() - 0.4, timezone.utc).isoformat(timespec="milliseconds")
    r = request(cp.api_port, "POST", tokens_path(), owner,
                {"name": "namespaces/default/apitokens/just-gone", "role": "viewer",
                 "expireTime": past.replace("+00:00", "Z")})
    if r.status == 200:
        remember_secret(r.json()["apiToken"]["secret"])
    assert r.status == 400 and r.json()["field"] == "expireTime" and "in the future" in r.json()["message"], r
