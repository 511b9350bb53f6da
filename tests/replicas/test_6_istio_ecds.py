"""Istio gets the same live push (envoy/istio/envoyfilter-ecds.yaml): its
EnvoyFilters applied to an ingress gateway's configuration the way Istio
applies them (CLUSTER ADD, HTTP_FILTER INSERT_BEFORE the router, the
hardening NETWORK_FILTER MERGE of envoyfilter.yaml) pass `envoy --mode
validate`, and a real Envoy started from the result gets its tokens from the
control plane replicas over ECDS, in plaintext and over mutual TLS, with
read-your-writes. There is no Kubernetes here: the Service's DNS name is
replaced with 127.0.0.1 and the module's pod path with the built module."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from testkit import harness
from testkit.certs import make_ca, make_cert
from testkit.controlplane import APP, REPO, ControlPlane, create, module_path, tokens_path
from testkit.harness import poll

ISTIO = REPO / "envoy" / "istio"
SERVICE = "apitokens-xds.apitokens.svc.cluster.local"
POD_MODULE = "/var/local/lib/wasm/apitokens_filter.wasm"
HCM = "envoy.filters.network.http_connection_manager"


def envoyfilters(name: str) -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all((ISTIO / name).read_text()) if d]
    for d in docs:
        assert d["apiVersion"] == "networking.istio.io/v1alpha3" and d["kind"] == "EnvoyFilter"
        assert d["spec"]["workloadSelector"]["labels"] == {"istio": "ingressgateway"}
    return {d["metadata"]["labels"]["apitokens.io/part"]: d for d in docs}


def istio_gateway(node: str, upstream_port: int, access_log: Path) -> dict:
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


def local(config: dict, plane: ControlPlane, pki: Path | None = None) -> dict:
    """The assembled configuration pointed at this machine: the Service's
    name -> 127.0.0.1 and the replica's port, the pod's module and
    certificate paths -> the test's files."""
    text = yaml.safe_dump(config).replace(POD_MODULE, str(module_path()))
    if pki is not None:
        text = text.replace("/etc/apitokens/", f"{pki}/")
    config = yaml.safe_load(text)
    (cluster,) = [c for c in config["static_resources"]["clusters"] if c["name"] == "xds_cluster"]
    for group in cluster["load_assignment"]["endpoints"]:
        for ep in group["lb_endpoints"]:
            address = ep["endpoint"]["address"]["socket_address"]
            assert address["address"] == SERVICE
            address.update(address="127.0.0.1", port_value=plane.xds_port)
    return config


def test_the_istio_gateway_gets_its_tokens_over_ecds(workdir, replicas, envoys, owner, upstream, store, figures):
    parts = envoyfilters("envoyfilter-ecds.yaml")
    assert set(parts) == {"xds-cluster", "xds-cluster-mtls", "ecds-filter"}
    hardening = envoyfilters("envoyfilter.yaml")["hardening"]
    (insert,) = parts["ecds-filter"]["spec"]["configPatches"]
    assert insert["patch"]["value"]["name"] == "apitokens", "the control plane's resource name"

    pki = workdir / "istio-pki"
    pki.mkdir()
    make_ca(pki, "xds-ca")
    make_cert(pki, "server", "xds-ca", f"subjectAltName=DNS:{SERVICE}\nextendedKeyUsage=serverAuth\n")
    make_cert(pki, "xds-client", "xds-ca", "subjectAltName=DNS:istio-ingressgateway\nextendedKeyUsage=clientAuth\n")
    tls_replica = ControlPlane(workdir / "r4", name="r4", store=store)
    tls_replica.start("--replica-name", "r4", "--xds-tls-cert", str(pki / "server.pem"),
                      "--xds-tls-key", str(pki / "server.key"), "--xds-client-ca", str(pki / "xds-ca.pem"))

    port = upstream.server_address[1]
    plain = apply(istio_gateway("istio-gw-1", port, workdir / "istio-gw-1.log"),
                  parts["xds-cluster"], parts["ecds-filter"], hardening)
    mtls = apply(istio_gateway("istio-gw-2", port, workdir / "istio-gw-2.log"),
                 parts["xds-cluster-mtls"], parts["ecds-filter"], hardening)
    gateways = []
    try:
        for node, config, plane, tls in (("istio-gw-1", plain, replicas[0], None), ("istio-gw-2", mtls, tls_replica, pki)):
            config = local(config, plane, tls)
            path = workdir / f"{node}.yaml"
            path.write_text(yaml.safe_dump(config))
            out = harness.validate(path)
            assert out.returncode == 0, f"{node}: envoy --mode validate:\n{out.stdout[-2000:]}{out.stderr[-2000:]}"
            gateway = harness.Envoy(workdir / node, config, name=node)
            gateways.append(gateway.start())
            poll(lambda: plane.envoy_status(node).get("ackedVersion"), 15, f"{node}'s first ACK")
        n = len(envoys) + len(gateways)
        r = create(replicas[1].api_port, owner, "istio", "editor")
        assert r.headers["x-apitokens-applied"] == "true" and r.headers["x-apitokens-envoys"] == f"{n}/{n}", r.headers
        secret = r.json()["apiToken"]["secret"]
        for gw in gateways:
            assert gw.get(APP, secret).status == 200, gw.name
            assert gw.get(APP, None).status == 401, gw.name
        r = replicas[2].api("DELETE", tokens_path(token="istio"), owner)
        assert r.headers["x-apitokens-applied"] == "true", r.headers
        for gw in gateways:
            assert gw.get(APP, secret).status == 401, f"{gw.name}: revoked, still accepted"
        assert "mutual TLS" in tls_replica.log_text()
        figures["Istio EnvoyFilters"] = "validated and live: plaintext (on r1) and mutual TLS (on r4), read-your-writes"
    finally:
        for gw in gateways:
            gw.stop()
        tls_replica.stop()
