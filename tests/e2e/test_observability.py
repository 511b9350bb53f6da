"""What operators see: counters in /stats and /stats/prometheus, response code
details in the access log, one log line per denial (never the secret).

Empirical facts on Envoy 1.40 (checked by these tests):
- a counter the filter defines as `apitokens.allowed` is `wasmcustom.apitokens.allowed`
  in /stats and `apitokens_allowed` (TYPE counter, no `envoy_` prefix) in /stats/prometheus;
- Envoy's own Wasm stats: `wasm.envoy.wasm.runtime.v8.{created,active}`, `wasm.wasm_vm_count`,
  `wasm.remote_load_*`, and per plugin `wasm.<plugin name>.vm_reload{,_success,_failure,_backoff}`;
  a trap (panic) in the module moves none of them: it shows in the log
  (`panicked at`, `Uncaught RuntimeError`) and in the access log as 503 `wasm_fail_stream`.
"""

import re
import time

import pytest

from testkit.checks import COUNTER_OF, counters, denied, wasm_health
from testkit.clients import Client, raw_client

PATH = "/api/v1/namespaces/default/deployments"
COUNTERS = ["allowed", "missing", "malformed", "unknown", "expired", "disabled", "namespace_denied", "role_denied"]


def one_of_each(client, tokens):
    """One request per outcome; returns {reason: response}."""
    raw = raw_client(client.envoy, client.proto)
    try:
        return {
            "allowed": client.get(PATH, token=tokens.editor),
            "missing": client.get(PATH),
            "not_bearer": client.get(PATH, authorization="Basic dXNlcjpwYXNz"),
            "malformed": client.get(PATH, authorization='Bearer "quoted"'),
            "multiple_credentials": raw.request("GET", PATH, [("authorization", tokens.editor.authorization)] * 2),
            "url_override": client.get(PATH, token=tokens.editor, headers={"x-original-url": "/admin"}),
            "unknown": client.get(PATH, token=tokens.unknown),
            "expired": client.get(PATH, token=tokens.expired),
            "disabled": client.get(PATH, token=tokens.disabled),
            "namespace_denied": client.get("/api/v1/namespaces/other/deployments", token=tokens.editor),
            "role_denied": client.get(f"{PATH.rsplit('/', 1)[0]}/secret-values", token=tokens.viewer),
        }
    finally:
        raw.close()


def test_counters_move_per_outcome(client, tokens):
    before = counters(client.envoy)
    assert set(COUNTERS) <= set(before), f"filter counters in /stats: {sorted(before)}"
    responses = one_of_each(client, tokens)
    after = counters(client.envoy)
    # Every counter the filter defines moves exactly as the outcomes say; one it
    # defines beyond the contract (e.g. internal_error) must not move at all.
    expected = dict.fromkeys(before, 0)
    expected["allowed"] = 1
    for reason in responses:
        if reason != "allowed":
            expected[COUNTER_OF[reason]] += 1
    delta = {k: after[k] - before[k] for k in before}
    assert delta == expected


def test_counters_in_prometheus(client, tokens):
    one_of_each(client, tokens)
    stats = counters(client.envoy)
    text = client.envoy.prometheus()
    for name in COUNTERS:
        assert f"# TYPE apitokens_{name} counter" in text, f"apitokens_{name} missing from /stats/prometheus"
        m = re.search(rf"^apitokens_{name}{{}} (\d+)$", text, re.M)
        assert m, f"no sample for apitokens_{name}"
        assert int(m.group(1)) == stats[name], f"prometheus and /stats disagree on {name}"
        assert stats[name] > 0


def test_wasm_failure_stats_exist_and_stay_still(envoy, tokens, proto):
    health = wasm_health(envoy)
    for name in ("wasm.envoy.wasm.runtime.v8.created", "wasm.apitokens.vm_reload_failure"):
        assert name in health, f"{name} not in /stats: {sorted(health)}"
    c = Client(envoy, proto)
    try:
        one_of_each(c, tokens)
    finally:
        c.close()
    assert wasm_health(envoy) == health
    assert health == envoy.initial_wasm_health, "Wasm failure stats moved since the session started"


@pytest.mark.parametrize(
    "reason",
    ["missing", "not_bearer", "malformed", "multiple_credentials", "url_override", "unknown", "expired",
     "disabled", "namespace_denied", "role_denied"],
)
def test_response_code_details_in_access_log(client, tokens, reason):
    resp = one_of_each(client, tokens)[reason]
    entry = client.envoy.access_log_entry(resp.e2e_id)
    assert entry["details"] == f"apitokens_{reason}"
    assert entry["code"] == resp.status_code
    denied(resp, reason)


def test_allowed_request_details_in_access_log(client, tokens):
    resp = client.get(PATH, token=tokens.editor)
    entry = client.envoy.access_log_entry(resp.e2e_id)
    assert (entry["code"], entry["details"]) == (200, "via_upstream")


def denial_lines_after(envoy, offset: int) -> list[str]:
    return [line for line in envoy.log_text().splitlines()[offset:] if "denied" in line]


@pytest.mark.parametrize(
    "reason,role,path,named",
    [
        ("role_denied", "viewer", "/api/v1/namespaces/default/secret-values", True),
        ("namespace_denied", "editor", "/api/v1/namespaces/other/deployments", True),
        ("expired", "expired", PATH, True),
        ("unknown", "unknown", PATH, False),
        ("missing", None, PATH, False),
    ],
)
def test_one_log_line_per_denial(client, tokens, reason, role, path, named):
    envoy = client.envoy
    token = {"viewer": tokens.viewer, "editor": tokens.editor, "expired": tokens.expired,
             "unknown": tokens.unknown, None: None}[role]
    offset = envoy.log_offset()
    resp = client.get(path, token=token)
    denied(resp, reason)
    reason_re = re.compile(reason.replace("_", "[_ ]"), re.I)
    line = envoy.wait_for_log(
        lambda line: "denied" in line and reason_re.search(line) is not None,
        since=offset,
        what=f"a denial log line for {reason}",
    )
    assert "[wasm]" in line, line
    if named:
        assert token.name in line, f"token name missing: {line}"
    if token is not None:
        assert token.secret not in line
    # Exactly one line for this one denial (wait past a few log flushes first).
    envoy.access_log_entry(resp.e2e_id)
    client.get(PATH, token=tokens.editor)  # an allowed request logs no denial
    time.sleep(0.2)
    assert len(denial_lines_after(envoy, offset)) == 1, denial_lines_after(envoy, offset)


def test_allowed_requests_log_no_denial(client, tokens):
    envoy = client.envoy
    offset = envoy.log_offset()
    for _ in range(5):
        client.get(PATH, token=tokens.viewer)
    time.sleep(0.2)
    assert denial_lines_after(envoy, offset) == []
