"""Runs last (file order): after every other test has sent its secrets through
the Envoys, none of them appears in a log, an access log, /config_dump or /stats,
and no Wasm VM failed anywhere."""

from testkit import harness
from testkit.checks import counters, no_wasm_failures, wasm_health
from testkit.harness import Envoy

DEMO_SECRETS = ["demo-viewer-secret", "demo-editor-secret", "demo-owner-secret"]


def leaks(text: str, secrets: list[str]) -> list[str]:
    return [s for s in secrets if s in text]


def test_no_secret_in_logs_of_any_envoy():
    assert harness.SECRETS, "no secrets were generated: did the suite run?"
    secrets = harness.SECRETS + DEMO_SECRETS
    found = {}
    for envoy in Envoy.instances:
        for what, path in (("log", envoy.log_path), ("stderr", envoy.dir / "stderr.txt"),
                           ("stdout", envoy.dir / "stdout.txt"), ("access log", envoy.access_log_path)):
            if path.exists():
                hit = leaks(path.read_text("utf-8", "replace"), secrets)
                if hit:
                    found[f"{envoy.name} {what} ({path})"] = len(hit)
    assert not found, f"secrets found in: {found}"


def test_no_secret_in_admin_endpoints(envoy):
    secrets = harness.SECRETS
    for endpoint in ("/config_dump", "/config_dump?include_eds", "/stats", "/stats/prometheus", "/clusters",
                     "/listeners", "/server_info"):
        text = envoy.admin_get(endpoint)
        assert not leaks(text, secrets), f"a secret appears in {endpoint}"


def test_config_dump_holds_digests_not_secrets(envoy, tokens):
    dump = envoy.admin_get("/config_dump")
    assert harness.sha256_hex(tokens.editor.secret) in dump
    assert tokens.editor.secret not in dump


def test_no_wasm_failure_in_any_healthy_envoy():
    for envoy in Envoy.instances:
        if not envoy.ready:
            continue  # never served (the invalid-configuration tests): nothing to check
        no_wasm_failures(envoy)


def test_shared_envoy_wasm_stats_never_moved(envoy):
    assert wasm_health(envoy) == envoy.initial_wasm_health
    assert counters(envoy).get("internal_error", 0) == 0
    assert envoy.running, "the shared Envoy died"
