"""Hostile input: bytes that are not UTF-8, huge headers, path tricks. The filter
must decide, never trap (a trapped VM answers 503 to everything after, see
the shared notes), and Envoy's hardened HCM must hold."""

import pytest

from testkit.checks import allowed, denied, describe, no_wasm_failures, wasm_health
from testkit.clients import RawH1, RawH2, StreamReset, raw_client
from testkit.harness import poll

PATH = "/api/v1/namespaces/default/deployments"


@pytest.fixture
def health(envoy):
    """Wasm failure stats and log of the shared Envoy do not change during the test."""
    before = wasm_health(envoy)
    yield
    assert wasm_health(envoy) == before, "Wasm failure stats moved"
    no_wasm_failures(envoy)


def test_non_utf8_authorization_then_valid_requests(envoy, tokens, proto, health):
    # Four connections held open at once: the listener's exact balancing puts
    # two on each worker, so every worker's VM sees the bad bytes.
    conns = [raw_client(envoy, proto) for _ in range(4)]
    try:
        for c in conns:
            denied(c.request("GET", PATH, [("authorization", b"Bearer \xff\xfe\x80")]), "malformed")
            denied(c.request("GET", PATH, [("authorization", b"\xff\xfe \xc0")]), "not_bearer")
        for c in conns:  # same connections
            allowed(c.request("GET", PATH, [("authorization", tokens.editor.authorization)]), tokens.editor)
    finally:
        for c in conns:
            c.close()
    for _ in range(4):  # new connections
        with raw_client(envoy, proto) as c:
            allowed(c.request("GET", PATH, [("authorization", tokens.editor.authorization)]), tokens.editor)


@pytest.mark.parametrize(
    "name,value",
    [
        ("x-custom", b"\xff\xfe"),
        ("user-agent", b"caf\xe9"),
        ("x-apitoken-role", b"own\xffer"),   # a spoofed identity header, not UTF-8
        ("x-apitoken-name", b"\xc3\x28"),
        ("cookie", b"session=\x80\x81"),
    ],
)
def test_non_utf8_in_other_headers(envoy, tokens, proto, health, name, value):
    with raw_client(envoy, proto) as c:
        resp = c.request("GET", PATH, [("authorization", tokens.viewer.authorization), (name, value)])
        allowed(resp, tokens.viewer)
        allowed(c.request("GET", PATH, [("authorization", tokens.viewer.authorization)]), tokens.viewer)


def test_non_utf8_without_token(envoy, proto, health):
    with raw_client(envoy, proto) as c:
        denied(c.request("GET", PATH, [("x-custom", b"\xff")]), "missing")


def test_non_utf8_path_bytes(envoy, tokens, health):
    """Raw 0x80+ bytes in the path: whoever rejects them (codec or filter), nothing
    reaches the upstream with a namespace the token does not own, and no VM traps."""
    path = b"/api/v1/namespaces/default/deployments/\xff\xfe"
    with RawH1(envoy) as c:
        try:
            resp = c.request("GET", path, [("authorization", tokens.viewer.authorization)])
        except Exception:
            resp = None
        if resp is not None:
            assert resp.status_code in (200, 400, 403), describe(resp)
    with RawH2(envoy) as c:
        try:
            resp = c.request("GET", path, [("authorization", tokens.viewer.authorization)])
        except StreamReset:
            resp = None
        if resp is not None:
            assert resp.status_code in (200, 400, 403), describe(resp)
    with raw_client(envoy, "h1") as c:
        allowed(c.request("GET", PATH, [("authorization", tokens.viewer.authorization)]), tokens.viewer)


def test_huge_authorization_header(client, tokens, health):
    huge = "Bearer " + "A" * (50 * 1024)
    denied(client.get(PATH, authorization=huge), "unknown")
    allowed(client.get(PATH, token=tokens.editor), tokens.editor)


def test_huge_other_header(client, tokens, health):
    allowed(client.get(PATH, token=tokens.editor, headers={"x-big": "b" * (50 * 1024)}), tokens.editor)


def test_many_headers(client, tokens, health):
    headers = [(f"x-h{i}", "v") for i in range(60)]  # the echo upstream accepts at most 100 headers
    allowed(client.get(PATH, token=tokens.editor, headers=headers), tokens.editor)


def test_request_with_body(client, tokens, health):
    body = b"x" * (256 * 1024)
    resp = client.request("POST", PATH, token=tokens.editor, content=body)
    assert allowed(resp, tokens.editor)["body_bytes"] == len(body)
    denied(client.request("POST", PATH, token=tokens.viewer, content=body), "role_denied")


# ---------------------------------------------------------------------------
# Path handling (the HCM is configured to normalise before the filter runs)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/namespaces/default%2Fother/deployments",
        "/api/v1/namespaces/default%2fother/deployments",
        "/api/v1/namespaces/default%5Cother/deployments",
        "/api/v1/namespaces/default/deployments%2F..%2F..%2Fother",
    ],
    ids=["%2F", "%2f", "%5C", "%2F-dotdot"],
)
def test_escaped_slashes_are_rejected(client, tokens, path):
    resp = client.get(path, token=tokens.editor)
    assert resp.status_code == 400, describe(resp)
    assert resp.envoy.access_log_entry(resp.e2e_id)["details"] == "path_normalization_failed"
    assert resp.envoy.upstream.find("x-e2e-id", resp.e2e_id) == []


@pytest.mark.parametrize(
    "sent,normalized",
    [
        ("/api/v1/namespaces/other/../default/deployments", "/api/v1/namespaces/default/deployments"),
        ("/api/v1/namespaces/default/./deployments", "/api/v1/namespaces/default/deployments"),
        ("/api/v1/namespaces/default/deployments/x/..", "/api/v1/namespaces/default/deployments/"),
        ("//api/v1//namespaces///default/deployments", "/api/v1/namespaces/default/deployments"),
        ("/api/v1/namespaces/default/%2e%2e/default/deployments", "/api/v1/namespaces/default/deployments"),
        ("/api/v1/namespaces/default/deploy%6Dents", "/api/v1/namespaces/default/deployments"),
        # "//.." removes the empty segment only: still namespace "default"
        ("/api/v1/namespaces/default//../other/deployments", "/api/v1/namespaces/default/other/deployments"),
    ],
    ids=["dotdot", "dot", "trailing-dotdot", "slashes", "encoded-dotdot", "encoded-unreserved", "double-slash-dotdot"],
)
def test_paths_are_normalized_before_the_filter(raw, tokens, sent, normalized):
    resp = raw.request("GET", sent, [("authorization", tokens.editor.authorization)])
    seen = allowed(resp, tokens.editor)
    assert seen["path"] == normalized


@pytest.mark.parametrize(
    "sent",
    [
        "/api/v1/namespaces/default/../other/deployments",
        "/api/v1/namespaces/default/%2e%2e/other/deployments",
        "/api/v1/namespaces/default/%2E%2E/other/deployments",
        "/api/v1/namespaces/default/.%2e/other/deployments",
        "/api/v1/namespaces/default/deployments/../../other/deployments",
    ],
    ids=["dotdot", "encoded-dotdot", "encoded-DOTDOT", "half-encoded", "two-levels"],
)
def test_dot_segments_cannot_escape_the_namespace(raw, tokens, sent):
    """Envoy resolves (also percent-encoded) dot segments before the filter: the
    filter sees namespace "other" and denies, the upstream never sees the request."""
    resp = raw.request("GET", sent, [("authorization", tokens.editor.authorization)])
    denied(resp, "namespace_denied", secret=tokens.editor.secret)


def test_fragment_is_rejected(raw, tokens):
    resp = raw.request("GET", PATH + "#/../../other", [("authorization", tokens.editor.authorization)])
    assert resp.status_code == 400, describe(resp)
    assert resp.envoy.upstream.find("x-e2e-id", resp.e2e_id) == []


def test_header_with_underscore_is_rejected(envoy, tokens):
    with RawH1(envoy) as c:
        resp = c.request("GET", PATH, [("authorization", tokens.editor.authorization), ("x_apitoken_role", "owner")])
        assert resp.status_code == 400, describe(resp)
    with RawH2(envoy) as c:  # HTTP/2: the stream is reset
        with pytest.raises(StreamReset):
            c.request("GET", PATH, [("authorization", tokens.editor.authorization), ("x_apitoken_role", "owner")])
    wanted = {"http1.unexpected_underscore", "http2.unexpected_underscore"}
    poll(lambda: wanted <= {e.get("details") for e in envoy.access_log()}, 5, f"{wanted} in the access log",
         interval=0.02)


def test_original_path_header_is_not_trusted(client, tokens):
    """The decision is on :path, never on the client-forgeable x-envoy-original-path."""
    resp = client.get(
        "/api/v1/namespaces/default/secret-values",
        token=tokens.viewer,
        headers={"x-envoy-original-path": "/api/v1/namespaces/default/deployments"},
    )
    denied(resp, "role_denied", secret=tokens.viewer.secret)
