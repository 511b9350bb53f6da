"""A token reads itself (`apitokens:self`) through a real Envoy configured
over ECDS: the filter's built-in rules let every role through in its own
namespace only, the control plane answers with the token's own fields."""

from __future__ import annotations

from testkit.controlplane import create, tokens_path, version_of


def test_every_role_reads_itself_through_the_gateway(envoy, cp, owner):
    secrets = {}
    for role in ("viewer", "editor"):
        r = create(envoy.port, owner, f"self-{role}", role, expireTime="2031-01-01T00:00:00Z")
        assert r.status == 200, r
        cp.wait_applied(version_of(r))
        secrets[role] = r.json()["apiToken"]["secret"]
    secrets["owner"] = owner
    names = {"viewer": "self-viewer", "editor": "self-editor", "owner": "admin"}
    for role, secret in secrets.items():
        r = envoy.get(tokens_path() + ":self", secret)
        assert r.status == 200, (role, r)
        token = r.json()["apiToken"]
        assert token["name"] == f"namespaces/default/apitokens/{names[role]}"
        assert token["role"] == role
        assert set(token) <= {"name", "role", "createTime", "expireTime", "lastUseTime"}, token
        assert secret not in r.body.decode()
    assert envoy.get(tokens_path() + ":self", secrets["viewer"]).json()["apiToken"]["expireTime"] == \
        "2031-01-01T00:00:00Z"
    # Its own namespace only (refused by the filter: the control plane
    # never sees it), and nothing else of the token API for a viewer.
    r = envoy.get(tokens_path("other") + ":self", secrets["viewer"])
    assert r.status == 403 and 'error="insufficient_scope"' in r.headers["www-authenticate"], r
    for path in (tokens_path(), tokens_path(token="self-viewer"), tokens_path() + ":events",
                 tokens_path() + ":selfish"):
        assert envoy.get(path, secrets["viewer"]).status == 403, path
    assert envoy.get(tokens_path() + ":self").status == 401
