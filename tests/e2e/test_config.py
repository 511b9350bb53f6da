"""Configurations: invalid plugin configurations stop Envoy with a message naming
the field; every configuration shipped in envoy/ (and the Istio objects of
deploy/kubernetes/istio) is accepted by the real Envoy and the real module."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

from testkit import harness
from testkit.checks import allowed, denied
from testkit.clients import Client
from testkit.harness import REPO_ROOT, Envoy, Token, plugin_config, sha256_hex

ENVOY_DIR = REPO_ROOT / "envoy"
DEFAULT_MODULE = "target/wasm32-wasip1/release/apitokens_filter.wasm"
PATH = "/api/v1/namespaces/default/deployments"


def good_token(i: int = 0) -> dict:
    return Token("default", f"token-{i}", "editor").entry()


def bad(**changes) -> dict:
    return {**good_token(), **changes}


DIGEST = sha256_hex("x")

INVALID = {
    # id: (plugin configuration, strings that must appear together in one log line)
    "unknown-top-level-field": ({"tokens": [good_token()], "tokenz": []}, ["tokenz"]),
    "unknown-token-field": ({"tokens": [bad(secret="plain")]}, ["tokens[0]", "secret"]),
    "unknown-identity-header-field": (
        {"tokens": [good_token()], "identityHeaders": {"user": "x-user"}}, ["identityHeaders", "user"]),
    "bad-name": ({"tokens": [bad(name="namespaces/default/tokens/ci")]}, ["tokens[0].name"]),
    "bad-name-namespace": ({"tokens": [bad(name="namespaces/Default/apitokens/ci")]}, ["tokens[0].name"]),
    "unknown-role": ({"tokens": [good_token(1), bad(role="admin")]}, ["tokens[1].role"]),
    "short-digest": ({"tokens": [bad(secretSha256=DIGEST[:63])]}, ["tokens[0].secretSha256"]),
    "uppercase-digest": ({"tokens": [bad(secretSha256=DIGEST.upper())]}, ["tokens[0].secretSha256"]),
    "non-hex-digest": ({"tokens": [bad(secretSha256="g" * 64)]}, ["tokens[0].secretSha256"]),
    "duplicate-digest": (
        {"tokens": [{**good_token(1), "secretSha256": DIGEST}, {**good_token(2), "secretSha256": DIGEST}]},
        ["tokens[1].secretSha256"]),
    "duplicate-name": (
        {"tokens": [good_token(1), {**good_token(2), "name": "namespaces/default/apitokens/token-1"}]},
        ["tokens[1].name"]),
    "bad-timestamp": ({"tokens": [bad(expireTime="2027-13-01T00:00:00Z")]}, ["tokens[0].expireTime"]),
    "not-rfc3339": ({"tokens": [bad(expireTime="2027-01-01 00:00:00")]}, ["tokens[0].expireTime"]),
    "role-not-a-string": ({"tokens": [bad(role=3)]}, ["tokens[0].role"]),
    "year-10000": ({"tokens": [bad(expireTime="9999-12-31T23:59:59-23:59")]}, ["tokens[0].expireTime", "9999"]),
    "url-override-mode": ({"tokens": [good_token()], "urlOverrideHeaders": "allow"}, ["urlOverrideHeaders"]),
    "identity-header-underscore": (
        {"tokens": [good_token()], "identityHeaders": {"role": "x_apitoken_role"}}, ["identityHeaders.role"]),
    "identity-header-reserved": (
        {"tokens": [good_token()], "identityHeaders": {"name": "cookie"}}, ["identityHeaders.name"]),
    "forward-path-without-namespace": (
        {"tokens": [good_token()], "forwardAuthorizationPaths": ["/apitokens/**"],
         "forwardAuthorizationClusters": ["upstream"]}, ["forwardAuthorizationPaths[0]"]),
    "forward-path-without-cluster": (
        {"tokens": [good_token()], "forwardAuthorizationPaths": ["/apitokens/v1/namespaces/{namespace}/apitokens/**"]},
        ["forwardAuthorizationClusters", "required with forwardAuthorizationPaths"]),
    "not-json": ('{"tokens": [', []),
}


@pytest.mark.parametrize("case", list(INVALID), ids=list(INVALID))
def test_invalid_plugin_configuration_stops_envoy(start_envoy, case):
    cfg, needles = INVALID[case]
    envoy = start_envoy(cfg, name=f"invalid-{case}", wait=False)
    rc = envoy.wait_exit(timeout=30)
    assert rc != 0, "Envoy started with an invalid plugin configuration"
    log = envoy.log_text()
    lines = [line for line in log.splitlines() if "apitokens" in line and all(n in line for n in needles)]
    assert lines, f"no log line names {needles} (with 'apitokens'):\n{log[-4000:]}"
    # The reason is the plugin's configuration, not a missing module.
    assert "Invalid path" not in log


def test_empty_token_list_refuses_everything(start_envoy, proto):
    envoy = start_envoy({"tokens": []}, name="no-tokens")
    c = Client(envoy, proto)
    try:
        denied(c.get(PATH), "missing")
        denied(c.get(PATH, authorization="Bearer abc"), "unknown")
    finally:
        c.close()
        envoy.stop()


def test_expire_time_with_offset_and_fraction(start_envoy, proto):
    """RFC 3339 allows offsets and fractions of seconds."""
    lasting = Token("default", "offset", "viewer", expire_time="2099-01-01T01:00:00.5+01:00")
    gone = Token("default", "gone", "viewer", expire_time="2020-01-01T00:00:00.123456789-05:00")
    envoy = start_envoy(plugin_config([lasting, gone]), name="rfc3339")
    c = Client(envoy, proto)
    try:
        allowed(c.get(PATH, token=lasting), lasting)
        denied(c.get(PATH, token=gone), "expired", secret=gone.secret)
    finally:
        c.close()
        envoy.stop()


def test_custom_rules(start_envoy, proto):
    """One example of custom rules replacing the built-in table."""
    viewer = Token("default", "rules-viewer", "viewer")
    rules = [{"path": "/reports/v1/namespaces/{namespace}/reports/**", "allow": {"viewer": ["list", "create"]}}]
    envoy = start_envoy(plugin_config([viewer], rules=rules), name="rules")
    c = Client(envoy, proto)
    try:
        allowed(c.get("/reports/v1/namespaces/default/reports", token=viewer), viewer)
        allowed(c.request("POST", "/reports/v1/namespaces/default/reports", token=viewer), viewer)
        # With a body it could be a PUT or DELETE to a framework that reads
        # `_method` from the body: those verbs must be permitted too.
        denied(c.request("POST", "/reports/v1/namespaces/default/reports", token=viewer,
                         content=b'{"_method": "DELETE"}'), "role_denied")
        denied(c.request("POST", "/reports/v1/namespaces/default/reports", token=viewer,
                         content=b"title=q3"), "role_denied")
        denied(c.get("/reports/v1/namespaces/default/reports/r1", token=viewer), "role_denied")
        denied(c.get("/reports/v1/namespaces/other/reports", token=viewer), "namespace_denied")
        # The built-in table no longer applies.
        denied(c.get(PATH, token=viewer), "role_denied")
    finally:
        c.close()
        envoy.stop()


def test_forward_authorization_paths(start_envoy, proto):
    """Only allowed requests on the listed paths, routed to a listed cluster,
    keep the bearer token: the same path routed to another upstream loses
    it (envoy/envoy.yaml routes every path to the cluster `upstream`)."""
    owner = Token("default", "fwd-owner", "owner")
    viewer = Token("default", "fwd-viewer", "viewer")
    api = "/apitokens/v1/namespaces/{namespace}/apitokens/**"
    envoy = start_envoy(
        plugin_config([owner, viewer], forwardAuthorizationPaths=[api], forwardAuthorizationClusters=["upstream"]),
        name="forward-paths")
    c = Client(envoy, proto)
    try:
        allowed(c.get("/apitokens/v1/namespaces/default/apitokens", token=owner), owner, forward_authorization=True)
        allowed(c.get("/apitokens/v1/namespaces/default/ApiTokens.json", token=owner), owner,
                forward_authorization=True)
        allowed(c.get(PATH, token=owner), owner)
        denied(c.get("/apitokens/v1/namespaces/default/apitokens", token=viewer), "role_denied")
    finally:
        c.close()
    # The token API's cluster is another one: this route's upstream is not it.
    envoy = start_envoy(
        plugin_config([owner], forwardAuthorizationPaths=[api], forwardAuthorizationClusters=["apitokens_api"]),
        name="forward-paths-elsewhere")
    c = Client(envoy, proto)
    try:
        allowed(c.get("/apitokens/v1/namespaces/default/apitokens", token=owner), owner)
        allowed(c.get("/APITOKENS/v1/namespaces/default/apitokens", token=owner), owner)
    finally:
        c.close()
        envoy.stop()


@pytest.mark.parametrize("mode", ["reject", "remove", "forward"])
def test_url_override_modes(start_envoy, proto, mode):
    editor = Token("default", "url-editor", "editor")
    envoy = start_envoy(plugin_config([editor], urlOverrideHeaders=mode), name=f"url-{mode}")
    c = Client(envoy, proto)
    override = {"x-original-url": "/api/v1/namespaces/default/secret-values", "x-rewrite-url": "/x"}
    try:
        resp = c.get(PATH, token=editor, headers=override)
        if mode == "reject":
            denied(resp, "url_override", secret=editor.secret)
            denied(c.get(PATH, headers={"x-rewrite-url": "/x"}), "url_override")
        else:
            seen = allowed(resp, editor)
            kept = {k for k, _ in seen["raw_headers"] if k in override}
            assert kept == (set(override) if mode == "forward" else set()), seen["raw_headers"]
    finally:
        c.close()
        envoy.stop()


# ---------------------------------------------------------------------------
# Shipped configurations
# ---------------------------------------------------------------------------


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def wasm_config(bootstrap: dict) -> dict:
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    wasm = hcm["http_filters"][0]
    assert wasm["name"] == "envoy.filters.http.wasm"
    return wasm["typed_config"]["config"]


def hcm_of(bootstrap: dict) -> dict:
    return bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def with_local_module(bootstrap: dict) -> dict:
    out = copy.deepcopy(bootstrap)
    wasm_config(out)["vm_config"]["code"]["local"]["filename"] = harness.wasm_module()
    return out


def validated(config: dict, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    result = harness.validate(path)
    assert result.returncode == 0 and "OK" in result.stdout + result.stderr, (
        f"envoy --mode validate rejected {name}:\n{(result.stdout + result.stderr)[-4000:]}"
    )


@pytest.mark.parametrize("name", ["envoy.yaml", "envoy-docker.yaml"])
def test_shipped_config_validates(tmp_path, name):
    validated(with_local_module(load_yaml(ENVOY_DIR / name)), tmp_path, name)


def test_shipped_envoy_yaml_validates_as_is():
    """From the repository root, envoy.yaml's relative module path is the build output."""
    config = load_yaml(ENVOY_DIR / "envoy.yaml")
    assert wasm_config(config)["vm_config"]["code"]["local"]["filename"] == DEFAULT_MODULE
    if not (REPO_ROOT / DEFAULT_MODULE).exists():
        pytest.skip(f"{DEFAULT_MODULE} not built (APITOKENS_WASM points elsewhere)")
    result = harness.validate(ENVOY_DIR / "envoy.yaml")
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]


def test_shipped_configs_are_hardened():
    for name in ("envoy.yaml", "envoy-docker.yaml"):
        config = load_yaml(ENVOY_DIR / name)
        hcm = hcm_of(config)
        assert hcm["codec_type"] == "AUTO"
        assert hcm["normalize_path"] is True
        assert hcm["merge_slashes"] is True
        assert hcm["path_with_escaped_slashes_action"] == "REJECT_REQUEST"
        assert hcm["common_http_protocol_options"]["headers_with_underscores_action"] == "REJECT_REQUEST"
        assert hcm["use_remote_address"] is True
        assert "%RESPONSE_CODE_DETAILS%" in json.dumps(hcm["access_log"])
        wasm = wasm_config(config)
        assert wasm["failure_policy"] == "FAIL_CLOSED"
        assert wasm["vm_config"]["runtime"] == "envoy.wasm.runtime.v8"
        assert (wasm["root_id"], wasm["vm_config"]["vm_id"]) == ("apitokens", "apitokens")
        assert hcm["http_filters"][-1]["name"] == "envoy.filters.http.router"


def test_docker_config_differs_only_in_paths_and_addresses():
    local = load_yaml(ENVOY_DIR / "envoy.yaml")
    docker = load_yaml(ENVOY_DIR / "envoy-docker.yaml")
    assert docker["admin"]["address"]["socket_address"]["address"] == "0.0.0.0"
    docker["admin"] = local["admin"]
    listener = docker["static_resources"]["listeners"][0]
    assert listener["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 10000}
    listener["address"] = local["static_resources"]["listeners"][0]["address"]
    assert wasm_config(docker)["vm_config"]["code"]["local"]["filename"] == "/etc/envoy/apitokens_filter.wasm"
    wasm_config(docker)["vm_config"]["code"]["local"]["filename"] = DEFAULT_MODULE
    cluster = docker["static_resources"]["clusters"][0]
    assert cluster.pop("type") == "STRICT_DNS" and cluster.pop("dns_lookup_family") == "V4_ONLY"
    cluster["type"] = "STATIC"
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"]["address"] == "echo"
    endpoint["address"]["socket_address"]["address"] = "127.0.0.1"
    assert docker == local


def test_docker_compose_mounts_module_and_config():
    compose = load_yaml(ENVOY_DIR / "docker-compose.yaml")
    envoy = compose["services"]["envoy"]
    assert envoy["image"].startswith("envoyproxy/envoy:v1.40")
    mounts = {m.split(":")[1]: m.split(":")[0] for m in envoy["volumes"]}
    assert mounts["/etc/envoy/envoy.yaml"] == "./envoy-docker.yaml"
    assert (ENVOY_DIR / mounts["/etc/envoy/apitokens_filter.wasm"]).resolve() == (REPO_ROOT / DEFAULT_MODULE)
    assert "echo" in compose["services"]


DEMO_ROW = re.compile(r"^#\s+(demo-\w+-secret)\s+(viewer|editor|owner)\s+(\S+)\s+([0-9a-f]{64})\s*$", re.M)


def test_demo_secrets_match_documented_digests():
    text = (ENVOY_DIR / "envoy.yaml").read_text()
    documented = {m.group(3): (m.group(1), m.group(2), m.group(4)) for m in DEMO_ROW.finditer(text)}
    assert len(documented) == 3, documented
    configured = json.loads(wasm_config(load_yaml(ENVOY_DIR / "envoy.yaml"))["configuration"]["value"])
    for token in configured["tokens"]:
        secret, role, digest = documented[token["name"]]
        assert (token["role"], token["secretSha256"]) == (role, digest)
        assert sha256_hex(secret) == digest


def test_demo_envoy_yaml_serves_requests(upstream, run_dir, proto):
    """envoy.yaml itself, with loopback port 0 instead of the demo's fixed ports."""
    config = with_local_module(load_yaml(ENVOY_DIR / "envoy.yaml"))
    config["admin"]["address"]["socket_address"]["port_value"] = 0
    config["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] = 0
    cluster = config["static_resources"]["clusters"][0]
    cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"][
        "port_value"] = upstream.port
    # The demo logs to stdout; the tests read a file.
    hcm_of(config)["access_log"] = harness.json_access_log(run_dir / f"demo-{proto}-access.log")
    envoy = Envoy(run_dir / f"demo-{proto}", config, name=f"demo-{proto}")
    envoy.access_log_path = run_dir / f"demo-{proto}-access.log"
    envoy.upstream = upstream
    envoy.start()
    c = Client(envoy, proto)
    try:
        viewer = Token("default", "demo-viewer", "viewer", secret="demo-viewer-secret")
        editor = Token("default", "demo-editor", "editor", secret="demo-editor-secret")
        allowed(c.get(PATH, token=viewer), viewer)
        denied(c.request("POST", PATH, token=viewer), "role_denied")
        allowed(c.request("POST", PATH, token=editor), editor)
        denied(c.get("/api/v1/namespaces/other/deployments", token=editor), "namespace_denied")
        denied(c.get(PATH), "missing")
        # The token API's paths reach this demo's only upstream, the
        # application: an owner's secret must not go with them.
        owner = Token("default", "demo-owner", "owner", secret="demo-owner-secret")
        allowed(c.get("/apitokens/v1/namespaces/default/apitokens", token=owner), owner)
    finally:
        c.close()
        envoy.stop()


def test_only_the_control_plane_setup_forwards_authorization():
    """Static, Docker and Istio setups put the application behind every path;
    only the ECDS setup routes the token API to the control plane, which
    needs the bearer token."""
    static = [json.loads(wasm_config(load_yaml(ENVOY_DIR / n))["configuration"]["value"])
              for n in ("envoy.yaml", "envoy-docker.yaml")]
    (plugin,) = istio_docs("alternatives/wasmplugin.yaml")
    docs = {d["metadata"]["name"]: d for d in istio_docs("alternatives/envoyfilter-static.yaml")}
    (insert,) = docs["apitokens-filter"]["spec"]["configPatches"]
    inline = json.loads(insert["patch"]["value"]["typed_config"]["config"]["configuration"]["value"])
    for config in [*static, plugin["spec"]["pluginConfig"], inline]:
        assert not config.get("forwardAuthorization") and "forwardAuthorizationPaths" not in config, config
        assert all("forwardAuthorization" not in rule for rule in config.get("rules", []))
    base = json.loads((ENVOY_DIR / "ecds-plugin-base.json").read_text())
    assert base["forwardAuthorizationPaths"] == ["/apitokens/v1/namespaces/{namespace}/apitokens/**"]
    ecds = load_yaml(ENVOY_DIR / "envoy-ecds.yaml")
    routes = hcm_of(ecds)["route_config"]["virtual_hosts"][0]["routes"]
    (token_api,) = [r["match"] for r in routes if r["route"]["cluster"] == "apitokens_api" and "safe_regex" in r["match"]]
    # The kept header goes only to that route's cluster.
    assert base["forwardAuthorizationClusters"] == ["apitokens_api"]
    # Every spelling the forwarding pattern matches goes to the control plane.
    regex = re.compile(token_api["safe_regex"]["regex"].replace("(?i)", ""), re.I)
    for path in ["/apitokens/v1/namespaces/default/apitokens", "/APITOKENS/v1/x", "/apitokens./v1/x",
                 "/ApiTokens.json/v1/x", "/apitokens:x/v1/x"]:
        assert regex.fullmatch(path), path
    for path in ["/api/v1/namespaces/default/apitokens", "/apitokensx/v1", "/x/apitokens/"]:
        assert not regex.fullmatch(path), path


# ---------------------------------------------------------------------------
# Istio
# ---------------------------------------------------------------------------


ISTIO_DIR = REPO_ROOT / "deploy" / "kubernetes" / "istio"


def istio_docs(*names: str) -> list[dict]:
    return [d for name in names for d in yaml.safe_load_all((ISTIO_DIR / name).read_text()) if d]


def test_wasmplugin(tmp_path, upstream):
    (plugin,) = istio_docs("alternatives/wasmplugin.yaml")
    assert plugin["apiVersion"] == "extensions.istio.io/v1alpha1" and plugin["kind"] == "WasmPlugin"
    spec = plugin["spec"]
    assert spec["selector"]["matchLabels"] == {"istio": "ingressgateway"}
    assert spec["phase"] == "AUTHN"
    assert spec["failStrategy"] == "FAIL_CLOSE"
    assert spec["url"].startswith("oci://"), spec["url"]
    assert "@sha256:" in spec["url"] or spec.get("sha256"), "the image pinned by digest (in the url or in sha256)"
    # Istio hands pluginConfig to the filter as JSON: the real module must accept it.
    config = harness.bootstrap(spec["pluginConfig"], upstream.port, tmp_path / "a.log", harness.wasm_module())
    validated(config, tmp_path, "wasmplugin")


def test_envoyfilter(tmp_path, upstream):
    docs = {d["metadata"]["name"]: d for d in istio_docs("envoyfilter-hardening.yaml", "alternatives/envoyfilter-static.yaml")}
    assert set(docs) == {"apitokens-hardening", "apitokens-filter"}
    for d in docs.values():
        assert d["apiVersion"] == "networking.istio.io/v1alpha3" and d["kind"] == "EnvoyFilter"
        assert d["spec"]["workloadSelector"]["labels"] == {"istio": "ingressgateway"}

    (hardening,) = docs["apitokens-hardening"]["spec"]["configPatches"]
    assert hardening["applyTo"] == "NETWORK_FILTER" and hardening["patch"]["operation"] == "MERGE"
    assert hardening["match"]["context"] == "GATEWAY"
    merge = hardening["patch"]["value"]["typed_config"]
    assert merge["normalize_path"] is True and merge["merge_slashes"] is True
    assert merge["path_with_escaped_slashes_action"] == "REJECT_REQUEST"
    assert merge["common_http_protocol_options"]["headers_with_underscores_action"] == "REJECT_REQUEST"

    (insert,) = docs["apitokens-filter"]["spec"]["configPatches"]
    assert insert["applyTo"] == "HTTP_FILTER" and insert["patch"]["operation"] == "INSERT_BEFORE"
    assert insert["match"]["context"] == "GATEWAY"
    assert insert["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"] == "envoy.filters.http.router"
    wasm_filter = copy.deepcopy(insert["patch"]["value"])
    assert wasm_filter["name"] == "envoy.filters.http.wasm"
    assert wasm_filter["typed_config"]["config"]["failure_policy"] == "FAIL_CLOSED"
    wasm_filter["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"] = harness.wasm_module()

    # Apply both patches to a plain gateway-like bootstrap and let Envoy and the module judge.
    config = harness.bootstrap({"tokens": []}, upstream.port, tmp_path / "a.log", harness.wasm_module())
    hcm = hcm_of(config)
    for key in ("normalize_path", "merge_slashes", "path_with_escaped_slashes_action",
                "common_http_protocol_options", "use_remote_address"):
        hcm.pop(key, None)
    hcm.update({k: v for k, v in merge.items() if k != "@type"})
    hcm["http_filters"][0] = wasm_filter
    validated(config, tmp_path, "envoyfilter")
