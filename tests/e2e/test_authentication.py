"""Who is asking: missing, foreign, malformed, repeated, unknown and expired credentials.

Every case runs over HTTP/1.1 and HTTP/2 (the `client` / `raw` fixtures).
"""

import pytest

from testkit.checks import allowed, denied, responds_with_header, www_authenticate

PATH = "/api/v1/namespaces/default/deployments"


def test_valid_token_is_allowed(client, tokens):
    allowed(client.get(PATH, token=tokens.editor), tokens.editor)


def test_missing_authorization(client):
    resp = client.get(PATH)
    denied(resp, "missing")
    responds_with_header(resp, "www-authenticate", 'Bearer realm="apitokens"')


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "bEaReR"])
def test_scheme_is_case_insensitive(client, tokens, scheme):
    resp = client.get(PATH, authorization=f"{scheme} {tokens.editor.secret}")
    allowed(resp, tokens.editor)


@pytest.mark.parametrize(
    "authorization",
    ["Basic dXNlcjpwYXNz", "Basic x", "Token abc", "Digest username=x", "Bearerabc"],
    ids=["basic", "basic-short", "token", "digest", "no-space"],
)
def test_other_schemes_are_not_bearer(client, authorization):
    resp = client.get(PATH, authorization=authorization)
    denied(resp, "not_bearer")
    responds_with_header(resp, "www-authenticate", www_authenticate(None))


@pytest.mark.parametrize(
    "authorization",
    [
        b"Bearer",              # no token (Envoy trims trailing whitespace of "Bearer ")
        b"Bearer  abc",         # two spaces
        b"Bearer \"abc\"",      # quoted
        b"Bearer ab c",         # space inside
        b"Bearer abc=def",      # '=' only as trailing padding
        b"Bearer =abc",
        b"Bearer ab\\c",        # backslash
        b"Bearer ab\tc",        # tab
        b"Bearer \xff\xfe",     # not UTF-8
        b"Bearer abc\xc3\xa9",  # UTF-8 but not b64token
    ],
    ids=["empty", "two-spaces", "quoted", "inner-space", "inner-equals", "leading-equals",
         "backslash", "tab", "non-utf8", "utf8-non-ascii"],
)
def test_malformed_bearer_token(raw, authorization):
    resp = raw.request("GET", PATH, [("authorization", authorization)])
    denied(resp, "malformed")
    responds_with_header(resp, "www-authenticate", www_authenticate("invalid_token"))


@pytest.mark.parametrize("token", ["abc==", "a-._~+/Z9=", "A"], ids=["padding", "all-charset", "one-char"])
def test_well_formed_but_unknown_token(client, token):
    denied(client.get(PATH, authorization=f"Bearer {token}"), "unknown")


def test_unknown_secret(client, tokens):
    resp = client.get(PATH, token=tokens.unknown)
    denied(resp, "unknown", secret=tokens.unknown.secret)
    responds_with_header(resp, "www-authenticate", www_authenticate("invalid_token"))


def test_expired_token(client, tokens):
    resp = client.get(PATH, token=tokens.expired)
    denied(resp, "expired", secret=tokens.expired.secret)
    responds_with_header(resp, "www-authenticate", www_authenticate("invalid_token"))


def test_far_future_expiry_is_valid(client, tokens):
    allowed(client.get(PATH, token=tokens.far_future), tokens.far_future)


def test_two_authorization_headers(raw, tokens):
    """Envoy joins repeated headers with a comma: two credentials -> 400."""
    resp = raw.request("GET", PATH, [("authorization", tokens.editor.authorization),
                                     ("authorization", tokens.editor.authorization)])
    denied(resp, "multiple_credentials", secret=tokens.editor.secret)
    responds_with_header(resp, "www-authenticate", www_authenticate("invalid_request"))


def test_two_different_authorization_headers(raw, tokens):
    resp = raw.request("GET", PATH, [("authorization", tokens.viewer.authorization),
                                     ("authorization", tokens.owner.authorization)])
    denied(resp, "multiple_credentials")


@pytest.mark.parametrize("joined", ["Bearer {s},Bearer {s}", "Bearer {s}, Bearer {s}", "Bearer {s},"])
def test_comma_joined_credentials(client, tokens, joined):
    resp = client.get(PATH, authorization=joined.format(s=tokens.editor.secret))
    denied(resp, "multiple_credentials", secret=tokens.editor.secret)
    responds_with_header(resp, "www-authenticate", www_authenticate("invalid_request"))


def test_valid_token_and_basic_credentials(raw, tokens):
    resp = raw.request("GET", PATH, [("authorization", tokens.editor.authorization),
                                     ("authorization", "Basic dXNlcjpwYXNz")])
    denied(resp, "multiple_credentials")


def test_token_in_query_string_is_not_a_credential(client, tokens):
    denied(client.get(f"{PATH}?access_token={tokens.editor.secret}"), "missing")
