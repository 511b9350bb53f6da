"""The console through the shipped Envoy: its files load without a token (the
filter is off for its route only), every response carries the security
headers, and the API behind it still needs a token at the gateway."""

from __future__ import annotations

import re

import pytest

from testkit.clients import request
from testkit.controlplane import tokens_path

ASSETS = {
    "/console/": "text/html; charset=utf-8",
    "/console/console.js": "text/javascript; charset=utf-8",
    "/console/console.css": "text/css; charset=utf-8",
    "/console/icon.svg": "image/svg+xml",
}
SECURITY = {
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}


def csp_directives(value: str) -> dict[str, str]:
    return {d.split(" ", 1)[0]: d.split(" ", 1)[1] for d in (x.strip() for x in value.split(";")) if " " in d}


def assert_secure(r, what: str):
    for name, value in SECURITY.items():
        assert r.headers.get(name) == value, f"{what}: {name}"
    csp = csp_directives(r.headers["content-security-policy"])
    assert csp["default-src"] == "'none'"
    assert csp["script-src"] == "'self'" and csp["style-src"] == "'self'"
    assert csp["connect-src"] == "'self'" and csp["frame-ancestors"] == "'none'"
    assert "unsafe" not in r.headers["content-security-policy"]
    assert "set-cookie" not in r.headers, what
    assert not any(h.startswith("access-control-") for h in r.headers), what


@pytest.mark.parametrize("path", sorted(ASSETS))
def test_console_files_load_through_envoy_without_a_token(envoy, path):
    r = request(envoy.port, "GET", path)
    assert r.status == 200, r
    assert r.headers["content-type"] == ASSETS[path]
    assert_secure(r, path)


def test_every_console_answer_has_the_security_headers(envoy):
    r = request(envoy.port, "GET", "/console")
    assert r.status == 308 and r.headers["location"] == "/console/"
    assert_secure(r, "redirect")
    for path in ("/console/missing.js", "/console/index.html"):
        r = request(envoy.port, "GET", path)
        assert r.status == 404
        assert_secure(r, path)
    r = request(envoy.port, "POST", "/console/", body={})
    assert r.status == 405 and r.headers["allow"] == "GET, HEAD"
    assert_secure(r, "POST")


def test_the_page_loads_only_its_own_files(envoy):
    html = request(envoy.port, "GET", "/console/").body.decode()
    assert re.findall(r"<script[^>]*>", html) == ['<script src="console.js" defer>']
    assert not re.search(r"<style|\sstyle=|\son[a-z]+=", html)
    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert refs and all(not re.match(r"[a-z]+:|//", ref) for ref in refs), refs


def test_the_api_still_needs_a_token_at_the_gateway(envoy, cp, namespace):
    ns, owner = namespace()
    # Without a token, the filter answers (never the control plane).
    r = request(envoy.port, "GET", tokens_path(ns))
    assert r.status == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert request(envoy.port, "GET", tokens_path(ns), owner).status == 200
    # Paths that start with /console/ but resolve elsewhere are normalized by
    # Envoy first, then routed (and filtered) as what they are.
    for path in (f"/console/../apitokens/v1/namespaces/{ns}/apitokens",
                 f"/console/./../apitokens/v1/namespaces/{ns}/apitokens",
                 "/console/../api/v1/namespaces/default/deployments",
                 "/console/%2e%2e/api/v1/namespaces/default/deployments"):
        r = request(envoy.port, "GET", path)
        assert r.status in (400, 401), (path, r)
        assert "content-security-policy" not in r.headers, path
    # Escaped slashes never reach the route.
    assert request(envoy.port, "GET", "/console/..%2Fapitokens").status == 400
    # Other spellings of the prefix are not the console's route: the filter runs.
    for path in ("/CONSOLE/", "/consolex", "/console.js"):
        assert request(envoy.port, "GET", path).status == 401, path


def test_no_cors_and_no_cookies_on_the_api(envoy, namespace):
    ns, owner = namespace()
    evil = {"Origin": "https://evil.example"}
    r = request(envoy.port, "GET", tokens_path(ns), owner, headers=evil)
    assert r.status == 200
    assert not any(h.startswith("access-control-") for h in r.headers)
    assert "set-cookie" not in r.headers
    # A CORS preflight is refused by the filter (no token, and OPTIONS is no verb).
    r = request(envoy.port, "OPTIONS", tokens_path(ns), headers={
        **evil, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"})
    assert r.status == 401
    assert not any(h.startswith("access-control-") for h in r.headers)
