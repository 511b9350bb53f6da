"""Loads corpus.yaml and runs one case over one protocol against the Envoy
under test. The case file is the specification; this module only sends what
it says and compares what happened with what it pins.

A case (see the header of corpus.yaml for the full format):

  id, class, why      name, one of CLASSES, the attack in a few words
  token               whose secret `{secret}` is: a state of conftest.Tokens, or none
  method, path        strings; non-ASCII escapes ("\\xff") are sent as those bytes
  authorization       one value or a list (repeated headers); default "Bearer {secret}"
                      with a token, no header without one
  headers             more [name, value] pairs
  body                a request body (sent with its content-length)
  expect              status (a number, or `reset`: HTTP/2 stream reset, `closed`:
                      connection closed without an answer), error (the
                      WWW-Authenticate error; null: a bare challenge; left out:
                      no WWW-Authenticate at all), details (Envoy's response code
                      details, or a list of acceptable ones), upstream (false, or
                      what the upstream saw: identity of the token, path, headers);
                      h1: / h2: override any of these for one protocol
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from testkit import checks
from testkit.clients import ConnectionClosed, StreamReset, next_e2e_id, raw_client
from testkit.controlplane import APP

CORPUS = Path(__file__).with_name("corpus.yaml")
CLASSES = ("authorization", "path", "alias", "override", "expiry", "lifecycle", "identity", "delegation")
PROTOCOLS = ("h1", "h2")

_SECRET = re.compile(r"\{secret(?:@([a-z-]+))?(?:\.(flip|trunc|ext))?\}")
_REPEAT = re.compile(r"\{(.)\*(\d+)\}")


def load(path: Path = CORPUS) -> list[dict]:
    cases = yaml.safe_load(path.read_text())["cases"]
    ids = [c["id"] for c in cases]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    for c in cases:
        assert c.get("class") in CLASSES, f"{c['id']}: class must be one of {CLASSES}"
        assert set(c) <= {"id", "class", "why", "token", "method", "path", "authorization", "headers", "body",
                          "expect"}, f"{c['id']}: unknown field"
        assert "status" in c["expect"], f"{c['id']}: expect.status is required"
    return cases


def _mutate(secret: str, how: str | None) -> str:
    if how == "flip":  # one character in the middle, flipped in case (or digit changed)
        i = len(secret) // 2
        c = secret[i]
        c = c.swapcase() if c.isalpha() else str((int(c) + 1) % 10) if c.isdigit() else "A"
        return secret[:i] + c + secret[i + 1:]
    if how == "trunc":
        return secret[:-1]
    if how == "ext":
        return secret + "A"
    return secret


def expand(value: str, tokens, token) -> bytes:
    """`{secret}` (of the case's token), `{secret@STATE}` (another token's),
    `.flip` / `.trunc` / `.ext` variants, `{C*N}` (C repeated N times)."""

    def secret_of(m: re.Match) -> str:
        t = tokens.by_state[m.group(1)] if m.group(1) else token
        assert t is not None, f"{value!r} names the case's secret, but the case has no token"
        return _mutate(t.secret, m.group(2))

    text = _SECRET.sub(secret_of, value)
    text = _REPEAT.sub(lambda m: m.group(1) * int(m.group(2)), text)
    return text.encode("latin-1")


def expectation(case: dict, proto: str) -> dict:
    base = {k: v for k, v in case["expect"].items() if k not in PROTOCOLS}
    return {**base, **case["expect"].get(proto, {})}


def token_for(case: dict, tokens):
    state = case.get("token", "none")
    if state == "none":
        return None
    if state == "expiring-now":
        return tokens.expiring_now()
    return tokens.by_state[state]


def build_request(case: dict, tokens, token) -> tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes]:
    auth = case.get("authorization", "Bearer {secret}" if token is not None else [])
    auths = auth if isinstance(auth, list) else [auth]
    headers = [(b"authorization", expand(v, tokens, token)) for v in auths]
    headers += [(expand(n, tokens, token), expand(v, tokens, token)) for n, v in case.get("headers", [])]
    method = expand(case.get("method", "GET"), tokens, token)
    path = expand(case.get("path", APP), tokens, token)
    return method, path, headers, expand(case.get("body", ""), tokens, token)


class Outcome:
    """What came back: a response, or `reset` / `closed`."""

    def __init__(self, e2e_id: str, response=None, failure: str | None = None):
        self.e2e_id, self.response, self.failure = e2e_id, response, failure

    @property
    def status(self):
        return self.response.status_code if self.response is not None else self.failure

    def text(self) -> str:
        if self.response is None:
            return ""
        head = "\n".join(f"{k}: {v}" for k, v in self.response.headers.items())
        return head + "\n" + self.response.content.decode("latin-1")


def send(envoy, proto: str, method: bytes, path: bytes, headers, body: bytes = b"") -> Outcome:
    e2e_id = next_e2e_id()
    client = raw_client(envoy, proto)
    try:
        return Outcome(e2e_id, client.request(method, path, headers, e2e_id=e2e_id, body=body))
    except StreamReset:
        return Outcome(e2e_id, failure="reset")
    except (ConnectionClosed, ConnectionResetError):
        return Outcome(e2e_id, failure="closed")
    finally:
        client.close()


def details_of(envoy, e2e_id: str) -> str | None:
    """The response code details Envoy logged for the request, or None when
    its access-log entry carries no x-e2e-id: a codec error, answered before
    the request's headers were complete (so before any filter ran)."""
    try:
        return envoy.access_log_entry(e2e_id, timeout=1.0)["details"]
    except TimeoutError:
        return None


def wasm_failure_stats(envoy) -> dict[str, int]:
    return {k: v for k, v in checks.wasm_health(envoy).items() if "fail" in k}


def check(case: dict, proto: str, envoy, token, out: Outcome, secrets: list[str]) -> None:
    """Every pinned expectation of the case, and the invariants of every case."""
    exp = expectation(case, proto)
    where = f"{case['id']} over {proto} (x-e2e-id {out.e2e_id})"
    resp = out.response
    seen = envoy.upstream.find("x-e2e-id", out.e2e_id)
    shown = checks.describe(resp) if resp is not None else out.failure
    # The status first: a 2xx that should have been refused fails here.
    assert out.status == exp["status"], f"{where}: expected {exp['status']}, got {shown}"
    upstream = exp.get("upstream", False)
    if upstream is False:
        assert seen == [], f"{where}: reached the upstream although refused: {shown}"
    if resp is None:
        return
    for secret in secrets:
        assert secret.encode() not in resp.content, f"{where}: a secret echoed in the body"
        assert all(secret not in v for v in resp.headers.values()), f"{where}: a secret echoed in a header"
    details = details_of(envoy, out.e2e_id)
    assert details not in ("wasm_fail_stream", "apitokens_internal_error"), f"{where}: {details}: {shown}"
    wanted = exp.get("details")
    if wanted is not None:
        options = wanted if isinstance(wanted, list) else [wanted]
        assert details in options, f"{where}: response code details {details!r}, expected {options}: {shown}"
    if "error" in exp:
        checks.responds_with_header(resp, "www-authenticate", checks.www_authenticate(exp["error"]))
    else:
        checks.lacks_header(resp, "www-authenticate")
    if details is not None and details.startswith("apitokens_"):
        # A refusal by the filter: its status and challenge are docs/filter.md's for
        # that reason, its body is the JSON error, nothing went upstream.
        reason = details[len("apitokens_"):]
        assert checks.DENIALS[reason] == (exp["status"], exp.get("error")), f"{where}: corpus contradicts docs/filter.md"
        checks.denied(resp, reason, secret=token.secret if token else None, head=case.get("method") == "HEAD")
    if upstream is not False:
        _upstream_view(where, resp, token, upstream, seen)


def _upstream_view(where: str, resp, token, upstream: dict, seen: list[dict]) -> None:
    if upstream.get("identity", True):
        seen_one = checks.allowed(resp, token)
    else:
        assert len(seen) == 1, f"{where}: upstream saw {len(seen)} copies"
        seen_one = seen[0]
    if "path" in upstream:
        assert seen_one["path"] == upstream["path"], f"{where}: upstream path {seen_one['path']!r}"
    for name, value in (upstream.get("headers") or {}).items():
        got = [v for k, v in seen_one["raw_headers"] if k == name]
        assert got == ([] if value is None else [value]), f"{where}: upstream {name}: {got}, expected {value!r}"
