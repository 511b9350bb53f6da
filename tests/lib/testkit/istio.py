"""The Istio objects of deploy/kubernetes/istio, and their EnvoyFilter patches
applied to an ingress gateway's configuration the way Istio applies them
(CLUSTER ADD, HTTP_FILTER INSERT_BEFORE, NETWORK_FILTER MERGE), so that the
result can go through `envoy --mode validate` or start a real Envoy. No
Istio runs here: tests/replicas (test_6, live) and tests/deploy (the
kustomization, validated) use it."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from testkit import harness

ISTIO = harness.REPO_ROOT / "deploy" / "kubernetes" / "istio"
# The control plane's headless xDS Service (deploy/kubernetes/base/service-xds.yaml).
XDS_SERVICE = "apitokens-xds.apitokens.svc.cluster.local"
# The module's path in the gateway pod (the control plane's --wasm-module).
POD_MODULE = "/var/local/lib/wasm/apitokens_filter.wasm"
HCM = "envoy.filters.network.http_connection_manager"


def envoyfilters(*names: str) -> dict[str, dict]:
    """The EnvoyFilters of these files (relative to deploy/kubernetes/istio),
    by their label apitokens.io/part."""
    parts: dict[str, dict] = {}
    for name in names:
        for d in yaml.safe_load_all((ISTIO / name).read_text()):
            if not d:
                continue
            assert d["apiVersion"] == "networking.istio.io/v1alpha3" and d["kind"] == "EnvoyFilter", name
            assert d["spec"]["workloadSelector"]["labels"] == {"istio": "ingressgateway"}, name
            part = d["metadata"]["labels"]["apitokens.io/part"]
            assert part not in parts, f"{name}: a second {part}"
            parts[part] = d
    return parts


def gateway(node: str, upstream_port: int, access_log: Path) -> dict:
    """An ingress gateway as Istio renders one, reduced to what the patches
    touch: a GATEWAY listener whose connection manager runs Istio's HTTP
    filters and ends with the router, and a cluster per upstream service."""
    config = harness.bootstrap({"tokens": []}, upstream_port, access_log, harness.wasm_module())
    config["node"] = {"id": node, "cluster": "istio-ingressgateway"}
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    for key in ("normalize_path", "merge_slashes", "path_with_escaped_slashes_action",
                "common_http_protocol_options", "use_remote_address"):
        hcm.pop(key)  # what the hardening EnvoyFilter adds
    hcm["stat_prefix"] = "outbound_0.0.0.0_8080"
    hcm["http_filters"] = [
        {"name": "envoy.filters.http.cors",
         "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"}},
        {"name": "envoy.filters.http.fault",
         "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"}},
        {"name": "envoy.filters.http.router",
         "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
    ]
    return config


def merge(target: dict, patch: dict) -> None:
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(target.get(k), dict) and k != "typed_config":
            merge(target[k], v)
        elif k == "typed_config" and isinstance(target.get(k), dict):
            merge(target[k], {kk: vv for kk, vv in v.items() if kk != "@type"})
        else:
            target[k] = copy.deepcopy(v)


def apply(config: dict, *filters: dict) -> dict:
    """The EnvoyFilters' patches, as Istio applies them to a gateway."""
    config = copy.deepcopy(config)
    hcms = [f for listener in config["static_resources"]["listeners"] for chain in listener["filter_chains"]
            for f in chain["filters"] if f["name"] == HCM]
    for ef in filters:
        for p in ef["spec"]["configPatches"]:
            assert p["match"]["context"] == "GATEWAY"
            kind, op, value = p["applyTo"], p["patch"]["operation"], p["patch"]["value"]
            if (kind, op) == ("CLUSTER", "ADD"):
                config["static_resources"]["clusters"].append(copy.deepcopy(value))
            elif (kind, op) == ("HTTP_FILTER", "INSERT_BEFORE"):
                sub = p["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"]
                for hcm in hcms:
                    names = [f["name"] for f in hcm["typed_config"]["http_filters"]]
                    hcm["typed_config"]["http_filters"].insert(names.index(sub), copy.deepcopy(value))
            elif (kind, op) == ("NETWORK_FILTER", "MERGE"):
                for hcm in hcms:
                    merge(hcm, value)
            else:
                raise AssertionError(f"a patch Istio would apply differently: {kind} {op}")
    return config


def localized(config: dict, module: Path, pki: Path | None = None) -> dict:
    """The pod's module path -> `module`, and (with `pki`) the pod's
    certificate directory /etc/apitokens/ -> `pki`."""
    text = yaml.safe_dump(config).replace(POD_MODULE, str(module))
    if pki is not None:
        text = text.replace("/etc/apitokens/", f"{pki}/")
    return yaml.safe_load(text)


def xds_endpoints(config: dict) -> list[dict]:
    """The socket addresses of the gateway's xds_cluster."""
    (cluster,) = [c for c in config["static_resources"]["clusters"] if c["name"] == "xds_cluster"]
    return [ep["endpoint"]["address"]["socket_address"]
            for group in cluster["load_assignment"]["endpoints"] for ep in group["lb_endpoints"]]
