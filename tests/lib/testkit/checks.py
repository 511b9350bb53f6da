"""Readable assertions about Envoy's answers, the access log and the upstream."""

from __future__ import annotations

import json
import time

import httpx

REALM = "apitokens"

# reason -> (status, error attribute of WWW-Authenticate or None)
DENIALS = {
    "missing": (401, None),
    "not_bearer": (401, None),
    "malformed": (401, "invalid_token"),
    "multiple_credentials": (400, "invalid_request"),
    "url_override": (400, "invalid_request"),
    "unknown": (401, "invalid_token"),
    "expired": (401, "invalid_token"),
    "disabled": (401, "invalid_token"),
    "not_yet_valid": (401, "invalid_token"),
    "address_denied": (403, None),
    "rate_limited": (429, None),
    "namespace_denied": (403, "insufficient_scope"),
    "role_denied": (403, "insufficient_scope"),
}

# reason -> the filter's counter (wasmcustom.apitokens.<counter>)
COUNTER_OF = {
    "missing": "missing",
    "not_bearer": "malformed",
    "malformed": "malformed",
    "multiple_credentials": "malformed",
    "url_override": "malformed",
    "unknown": "unknown",
    "expired": "expired",
    "disabled": "disabled",
    "not_yet_valid": "not_yet_valid",
    "address_denied": "address_denied",
    "rate_limited": "rate_limited",
    "namespace_denied": "namespace_denied",
    "role_denied": "role_denied",
}

IDENTITY_HEADERS = ("x-apitoken-name", "x-apitoken-namespace", "x-apitoken-role")


def describe(resp: httpx.Response) -> str:
    req = getattr(resp, "request", None) if resp._request is not None else None
    where = f"{req.method} {req.url.raw_path.decode()}" if req is not None else f"request {getattr(resp, 'e2e_id', '?')}"
    body = resp.content[:300].decode("utf-8", "replace")
    headers = "; ".join(f"{k}: {v}" for k, v in resp.headers.items())
    return f"[{where} over {resp.http_version}, x-e2e-id {getattr(resp, 'e2e_id', '?')}] -> {resp.status_code} {{{headers}}} {body!r}"


def details_of(resp: httpx.Response) -> str:
    """%RESPONSE_CODE_DETAILS% that Envoy logged for this request."""
    return resp.envoy.access_log_entry(resp.e2e_id)["details"]


def responds_with(resp: httpx.Response, status: int, details: str | None = None) -> None:
    assert resp.status_code == status, f"expected {status}, got {describe(resp)}"
    if details is not None:
        got = details_of(resp)
        assert got == details, f"response code details: expected {details!r}, got {got!r} for {describe(resp)}"


def responds_with_header(resp: httpx.Response, name: str, value: str) -> None:
    got = resp.headers.get_list(name)
    assert got == [value], f"expected exactly one {name}: {value!r}, got {got!r} in {describe(resp)}"


def lacks_header(resp: httpx.Response, name: str) -> None:
    assert name not in resp.headers, f"unexpected {name} in {describe(resp)}"


def www_authenticate(error: str | None, realm: str = REALM) -> str:
    return f'Bearer realm="{realm}"' + (f', error="{error}"' if error else "")


def reached_upstream(resp: httpx.Response) -> list[dict]:
    return resp.envoy.upstream.find("x-e2e-id", resp.e2e_id)


# `denied(..., required_role=ANY_ROLE)`: whichever role the reply names, if
# any (its header and body must still agree).
ANY_ROLE = "any"


def denied(resp: httpx.Response, reason: str, secret: str | None = None, realm: str = REALM, head: bool = False,
           required_role: str | None = ANY_ROLE) -> dict:
    """The filter denied the request for `reason`: status, WWW-Authenticate, JSON body,
    response code details, the role it needed (`x-apitokens-required-role` and the
    body's `requiredRole`, role denials only), and nothing reached the upstream.
    Returns the JSON body."""
    status, error = DENIALS[reason]
    responds_with(resp, status, details=f"apitokens_{reason}")
    if status == 429:
        # A limit reached is no authentication failure: no challenge.
        lacks_header(resp, "www-authenticate")
    else:
        responds_with_header(resp, "www-authenticate", www_authenticate(error, realm))
    role = resp.headers.get("x-apitokens-required-role")
    if reason != "role_denied":
        assert role is None, f"a required role on a {reason} refusal: {describe(resp)}"
    elif required_role != ANY_ROLE:
        assert role == required_role, f"required role {role!r}, want {required_role!r}: {describe(resp)}"
    assert role in (None, "viewer", "editor", "owner"), f"required role {role!r}: {describe(resp)}"
    body = {}
    if not head:
        ctype = resp.headers.get("content-type", "")
        assert ctype.split(";")[0].strip() == "application/json", f"content-type {ctype!r}: {describe(resp)}"
        try:
            body = json.loads(resp.content)
        except ValueError as exc:
            raise AssertionError(f"denial body is not JSON: {describe(resp)}") from exc
        keys = {"code", "message"} | ({"requiredRole"} if role else set())
        assert isinstance(body, dict) and set(body) == keys, f"body shape: {describe(resp)}"
        assert body.get("requiredRole") == role, f"body's requiredRole against the header: {describe(resp)}"
        assert body["code"] == status and type(body["code"]) is int, f"body code: {describe(resp)}"
        assert isinstance(body["message"], str) and body["message"], f"body message: {describe(resp)}"
    if secret:
        assert secret.encode() not in resp.content, f"secret echoed in body: {describe(resp)}"
        assert all(secret not in v for v in resp.headers.values()), f"secret echoed in headers: {describe(resp)}"
    assert reached_upstream(resp) == [], f"a denied request reached the upstream: {describe(resp)}"
    return body


def upstream_request(resp: httpx.Response) -> dict:
    """What the echo upstream received for this request (exactly one copy)."""
    seen = reached_upstream(resp)
    assert len(seen) == 1, f"upstream saw {len(seen)} copies of {describe(resp)}"
    return seen[0]


def allowed(resp: httpx.Response, token, forward_authorization: bool = False, identity_headers=IDENTITY_HEADERS) -> dict:
    """The request reached the upstream as `token`'s, with the identity headers set
    exactly once and Authorization removed (or kept, if forwarded). Returns what
    the upstream saw."""
    responds_with(resp, 200, details="via_upstream")
    seen = upstream_request(resp)
    raw = seen["raw_headers"]

    def values(name: str) -> list[str]:
        return [v for k, v in raw if k == name]

    name_h, ns_h, role_h = identity_headers
    assert values(name_h) == [token.name], f"{name_h} upstream: {values(name_h)} for {describe(resp)}"
    assert values(ns_h) == [token.namespace], f"{ns_h} upstream: {values(ns_h)} for {describe(resp)}"
    assert values(role_h) == [token.role], f"{role_h} upstream: {values(role_h)} for {describe(resp)}"
    if forward_authorization:
        assert values("authorization") == [token.authorization], f"authorization upstream: {describe(resp)}"
    else:
        assert values("authorization") == [], f"authorization leaked upstream for {describe(resp)}"
    return seen


# The filter counts in the VM and hands the counts to Envoy once a second.
COUNTER_FLUSH_SECONDS = 1.0


def counters(envoy) -> dict[str, int]:
    """The filter's counters, by short name (allowed, missing, ...), once every
    count made so far has reached Envoy (one flush period later: the filter's
    own period, not a waiting limit, so not scaled; tests time situations
    around it)."""
    time.sleep(COUNTER_FLUSH_SECONDS * 1.3)
    prefix = "wasmcustom.apitokens."
    return {k[len(prefix):]: v for k, v in envoy.stats().items() if k.startswith(prefix)}


def wasm_health(envoy) -> dict[str, int]:
    """Envoy's Wasm stats that would move if a VM failed, reloaded or was recreated."""
    return {
        k: v
        for k, v in envoy.stats().items()
        if k.startswith("wasm.")
        and (
            "fail" in k
            or "reload" in k
            or k.endswith(".created")
            or k.endswith(".active")
            or k.endswith("wasm_vm_count")
        )
    }


def no_wasm_failures(envoy) -> None:
    """No trap or VM failure in the log and no request answered by a failed VM."""
    lines = envoy.wasm_failure_lines()
    assert not lines, "Wasm failures in the Envoy log:\n" + "\n".join(lines[:20])
    failed = [e for e in envoy.access_log() if e.get("details") in ("wasm_fail_stream", "apitokens_internal_error")]
    assert not failed, f"requests answered by a failed Wasm VM or a failed host call: {failed[:5]}"
