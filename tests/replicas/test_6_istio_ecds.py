"""Istio gets the same live push (deploy/kubernetes/istio): its EnvoyFilters
applied to an ingress gateway's configuration the way Istio applies them
(CLUSTER ADD, HTTP_FILTER INSERT_BEFORE the router, the hardening
NETWORK_FILTER MERGE; testkit.istio) pass `envoy --mode validate`, and a real
Envoy started from the result gets its tokens from the control plane
replicas over ECDS, in plaintext (the cluster of alternatives/) and over
mutual TLS (the kustomization's), with read-your-writes. There is no
Kubernetes here: the Service's DNS name is replaced with 127.0.0.1 and the
module's pod path with the built module."""

from __future__ import annotations

from pathlib import Path

import yaml

from testkit import harness
from testkit.certs import make_ca, make_cert
from testkit.controlplane import APP, ControlPlane, create, module_path, tokens_path
from testkit.harness import poll
from testkit.istio import XDS_SERVICE as SERVICE
from testkit.istio import apply, envoyfilters, localized, xds_endpoints
from testkit.istio import gateway as istio_gateway


def local(config: dict, plane: ControlPlane, pki: Path | None = None) -> dict:
    """The assembled configuration pointed at this machine: the Service's
    name -> 127.0.0.1 and the replica's port, the pod's module and
    certificate paths -> the test's files."""
    config = localized(config, module_path(), pki)
    for address in xds_endpoints(config):
        assert address["address"] == SERVICE
        address.update(address="127.0.0.1", port_value=plane.xds_port)
    return config


def test_the_istio_gateway_gets_its_tokens_over_ecds(workdir, replicas, envoys, owner, upstream, store, figures):
    parts = envoyfilters("envoyfilter-xds-cluster.yaml", "envoyfilter-ecds.yaml", "envoyfilter-hardening.yaml",
                         "alternatives/envoyfilter-xds-cluster-plaintext.yaml")
    assert set(parts) == {"xds-cluster", "xds-cluster-mtls", "ecds-filter", "hardening"}
    hardening = parts["hardening"]
    (insert,) = parts["ecds-filter"]["spec"]["configPatches"]
    assert insert["patch"]["value"]["name"] == "apitokens", "the control plane's resource name"

    pki = workdir / "istio-pki"
    pki.mkdir()
    make_ca(pki, "xds-ca")
    make_cert(pki, "server", "xds-ca", f"subjectAltName=DNS:{SERVICE}\nextendedKeyUsage=serverAuth\n")
    make_cert(pki, "xds-client", "xds-ca", "subjectAltName=DNS:istio-ingressgateway\nextendedKeyUsage=clientAuth\n")
    tls_replica = ControlPlane(workdir / "r4-istio", name="r4", store=store)
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
