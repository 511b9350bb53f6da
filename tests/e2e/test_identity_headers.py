"""What the upstream sees: identity headers set by the filter, never by the client;
Authorization removed unless the operator asks for it to be forwarded."""

import pytest

from testkit.checks import allowed, denied
from testkit.clients import Client, RawH1
from testkit.harness import Token, plugin_config

PATH = "/api/v1/namespaces/default/deployments"

SPOOFED = [
    ("x-apitoken-name", "namespaces/default/apitokens/root"),
    ("x-apitoken-namespace", "kube-system"),
    ("x-apitoken-role", "owner"),
]


def test_identity_headers_reach_upstream(client, tokens):
    seen = allowed(client.get(PATH, token=tokens.viewer), tokens.viewer)
    assert seen["headers"]["x-apitoken-name"] == "namespaces/default/apitokens/viewer-token"
    assert seen["headers"]["x-apitoken-namespace"] == "default"
    assert seen["headers"]["x-apitoken-role"] == "viewer"


def test_spoofed_identity_headers_are_replaced(client, tokens):
    resp = client.get(PATH, token=tokens.viewer, headers=SPOOFED)
    seen = allowed(resp, tokens.viewer)  # exactly one copy of each, the filter's values
    assert "owner" not in [v for k, v in seen["raw_headers"] if k.startswith("x-apitoken-")]


def test_spoofed_identity_headers_repeated(raw, tokens):
    """Several client copies of each identity header (in upper case too, over
    HTTP/1.1; HTTP/2 requires lower-case names): all removed."""
    headers = [("authorization", tokens.viewer.authorization)]
    for name, value in SPOOFED:
        second = name.upper() if isinstance(raw, RawH1) else name
        headers += [(name, value), (second, value + "-2")]
    allowed(raw.request("GET", PATH, headers), tokens.viewer)


def test_spoofed_role_does_not_grant_access(client, tokens):
    resp = client.request("POST", PATH, token=tokens.viewer, headers=SPOOFED, content=b"{}")
    denied(resp, "role_denied", secret=tokens.viewer.secret)


def test_spoofed_identity_without_token_reaches_nothing(client):
    denied(client.get(PATH, headers=SPOOFED), "missing")


def test_authorization_removed_before_upstream(client, tokens):
    seen = allowed(client.get(PATH, token=tokens.editor), tokens.editor)
    assert "authorization" not in seen["headers"]


def test_other_headers_pass_through(client, tokens):
    resp = client.request("PUT", f"{PATH}/d1", token=tokens.editor,
                          headers={"x-custom": "kept", "content-type": "application/json"},
                          content=b'{"spec": {}}')
    seen = allowed(resp, tokens.editor)
    assert seen["headers"]["x-custom"] == "kept"
    assert seen["body_bytes"] == len(b'{"spec": {}}')
    assert seen["path"] == f"{PATH}/d1"


# ---------------------------------------------------------------------------
# A second Envoy: forwardAuthorization, a custom realm and custom header names
# ---------------------------------------------------------------------------

CUSTOM_HEADERS = {"name": "x-auth-token-name", "namespace": "x-auth-namespace", "role": "x-auth-role"}


@pytest.fixture(scope="module")
def forwarding(start_envoy):
    token = Token("default", "forwarded", "editor")
    envoy = start_envoy(
        plugin_config(
            [token],
            forwardAuthorization=True,
            realm="example.test",
            identityHeaders=CUSTOM_HEADERS,
        ),
        name="forwarding",
    )
    envoy.token = token
    yield envoy
    envoy.stop()


@pytest.fixture
def fwd_client(forwarding, proto):
    c = Client(forwarding, proto)
    yield c
    c.close()


def test_authorization_forwarded_when_configured(fwd_client, forwarding):
    token = forwarding.token
    seen = allowed(
        fwd_client.get(PATH, token=token),
        token,
        forward_authorization=True,
        identity_headers=(CUSTOM_HEADERS["name"], CUSTOM_HEADERS["namespace"], CUSTOM_HEADERS["role"]),
    )
    # The default names are not used when custom ones are configured.
    assert not [k for k, _ in seen["raw_headers"] if k.startswith("x-apitoken-")]


def test_custom_identity_headers_cannot_be_spoofed(fwd_client, forwarding):
    token = forwarding.token
    allowed(
        fwd_client.get(PATH, token=token, headers={"x-auth-role": "owner", "x-auth-namespace": "other"}),
        token,
        forward_authorization=True,
        identity_headers=(CUSTOM_HEADERS["name"], CUSTOM_HEADERS["namespace"], CUSTOM_HEADERS["role"]),
    )


def test_custom_realm(fwd_client):
    denied(fwd_client.get(PATH), "missing", realm="example.test")
    denied(fwd_client.get(PATH, authorization="Bearer nope"), "unknown", realm="example.test")
