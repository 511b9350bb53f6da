"""deploy/kubernetes, checked offline: no cluster, no kustomize binary, no
cert-manager, no Istio.

- every Kubernetes object against the API schemas, strict (an unknown field
  fails; kubernetes-validate), at the oldest and the newest version we claim;
- the Kustomize layout: each kustomization lists exactly the YAML files
  beside it, and every overlay builds (a small builder below, which refuses
  any Kustomize feature it does not implement, run on a copy of the tree
  with test PEM files for components/plain-secrets);
- the cross-references that break silently: selectors, ports, probes, the
  NetworkPolicy, the PodDisruptionBudget, mounted Secrets and ConfigMaps, the
  files the flags name, the certificates' names, the Istio objects against
  the Services, Pod Security "restricted";
- against the real binaries: every flag in `apitokens serve --help`,
  plugin-config.json through `apitokens render`, the Istio set applied to a
  gateway and passed through `envoy --mode validate`, and the Deployment's
  own command line started (its files from the plain-secrets build, SQLite
  for PostgreSQL, loopback ports) with that gateway taking its push over
  mutual TLS, the certificates made to the Certificates' specifications.

Environment: APITOKENS_BIN (default target/debug/apitokens), ENVOY_BIN,
APITOKENS_WASM (testkit.harness)."""

from __future__ import annotations

import base64
import copy
import json
import re
import shutil
import ssl
import subprocess
from pathlib import Path

import httpx
import kubernetes_validate
import pytest
import yaml

from testkit import harness
from testkit.certs import make_ca, make_cert
from testkit.controlplane import APP, apitokens_bin, free_port
from testkit.fixtures import upstream  # noqa: F401  (the echo upstream behind the gateway)
from testkit.harness import REPO_ROOT, poll, remember_secret
from testkit.istio import apply, gateway, localized, xds_endpoints
from testkit.timing import limit

ROOT = REPO_ROOT / "deploy" / "kubernetes"
# The oldest and the newest Kubernetes the manifests are checked against.
K8S_VERSIONS = ("1.30.0", "1.37.0")
OVERLAYS = ("cert-manager", "plain-secrets")
# Custom resources: not in the Kubernetes schemas; their fields are checked below.
CRDS = {
    ("cert-manager.io", "Certificate"),
    ("networking.istio.io", "EnvoyFilter"),
    ("networking.istio.io", "DestinationRule"),
    ("extensions.istio.io", "WasmPlugin"),
}
# Directories of YAML that no kustomization builds (documented as such).
NOT_BUILT = {"istio/alternatives"}
# Secrets only the operator has: must be documented in deploy/kubernetes/README.md.
OPERATOR_SECRETS = {"apitokens-store", "apitokens-db-ca"}
# The keys of a cert-manager Secret.
CERT_MANAGER_KEYS = {"tls.crt", "tls.key", "ca.crt"}
# The flags naming a file the control plane reads.
FILE_FLAGS = ("--store-file", "--tls-cert", "--tls-key", "--xds-tls-cert", "--xds-tls-key", "--xds-client-ca",
              "--plugin-config")
FAC = "forwardAuthorizationClusters"


def yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def group(obj: dict) -> str:
    return obj["apiVersion"].split("/")[0] if "/" in obj["apiVersion"] else ""


def key(obj: dict) -> tuple[str, str, str, str]:
    return group(obj), obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"]


# ---------------------------------------------------------------------------
# A minimal kustomize: resources (files and directories), components,
# configMapGenerator and secretGenerator with `files`. Anything else fails,
# so that a feature this builder would ignore cannot pass unnoticed.
# ---------------------------------------------------------------------------

KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "components", "configMapGenerator", "secretGenerator"}
GENERATOR_FIELDS = {"name", "namespace", "type", "files", "options"}
KINDS = {"Kustomization": "kustomize.config.k8s.io/v1beta1", "Component": "kustomize.config.k8s.io/v1alpha1"}


def generator_files(directory: Path, gen: dict) -> dict[str, bytes]:
    out = {}
    for entry in gen["files"]:
        name, _, rel = entry.rpartition("=")
        path = (directory / rel).resolve()
        assert path.is_relative_to(directory.resolve()), f"{directory}: {rel} is outside the kustomization's root"
        assert path.is_file(), f"{directory}: {gen['name']}: no file {rel}"
        out[name or path.name] = path.read_bytes()
    return out


def build(directory: Path, kind: str = "Kustomization") -> list[dict]:
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(k) - KUSTOMIZATION_FIELDS
    assert not unknown, f"{directory}: the test's builder does not know {unknown}"
    assert (k["apiVersion"], k["kind"]) == (KINDS[kind], kind), f"{directory}: expected a {kind}"
    objects: list[dict] = []
    for entry in k.get("resources", []):
        target = (directory / entry).resolve()
        if target.is_dir():
            objects += build(target)
        else:
            assert target.is_relative_to(directory.resolve()), f"{directory}: {entry} is outside the kustomization's root"
            assert target.is_file() and target.suffix == ".yaml", f"{directory}: no YAML file {entry}"
            objects += yaml_docs(target)
    for entry in k.get("components", []):
        target = (directory / entry).resolve()
        assert target.is_dir(), f"{directory}: no component {entry}"
        objects += build(target, "Component")
    for gen in k.get("configMapGenerator", []):
        assert not set(gen) - GENERATOR_FIELDS - {"type"}, gen
        data = {name: content.decode() for name, content in generator_files(directory, gen).items()}
        objects.append({"apiVersion": "v1", "kind": "ConfigMap",
                        "metadata": {"name": gen["name"], "namespace": gen["namespace"]}, "data": data})
    for gen in k.get("secretGenerator", []):
        assert not set(gen) - GENERATOR_FIELDS, gen
        data = {name: base64.b64encode(content).decode() for name, content in generator_files(directory, gen).items()}
        objects.append({"apiVersion": "v1", "kind": "Secret", "type": gen.get("type", "Opaque"),
                        "metadata": {"name": gen["name"], "namespace": gen["namespace"]}, "data": data})
    for obj in objects:
        assert obj["metadata"].get("namespace") or obj["kind"] == "Namespace", \
            f"{directory}: {key(obj)} has no namespace (and the kustomizations set none)"
    keys = [key(o) for o in objects]
    assert len(keys) == len(set(keys)), f"{directory}: an object twice: {sorted(k for k in keys if keys.count(k) > 1)}"
    return objects


def kustomizations() -> list[Path]:
    return sorted(p.parent for p in ROOT.rglob("kustomization.yaml"))


def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def every(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def base() -> list[dict]:
    return build(ROOT / "base")


@pytest.fixture(scope="session")
def istio() -> list[dict]:
    return build(ROOT / "istio")


@pytest.fixture(scope="session")
def certificates() -> list[dict]:
    return every(build(ROOT / "components" / "cert-manager", "Component"), "Certificate")


@pytest.fixture(scope="session")
def pki(tmp_path_factory, certificates) -> Path:
    """A CA and the three certificates the Certificates describe (their DNS
    names and usages), as components/plain-secrets names its files."""
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    for cert in certificates:
        name = cert["metadata"]["name"].removeprefix("apitokens-").removesuffix("-xds")
        sans = ",".join(f"DNS:{n}" for n in cert["spec"]["dnsNames"])
        usage = "clientAuth" if "client auth" in cert["spec"]["usages"] else "serverAuth"
        make_cert(d, name, "ca", f"subjectAltName={sans}\nextendedKeyUsage={usage}\n")
    return d


@pytest.fixture(scope="session")
def builds(tmp_path_factory, pki) -> dict[str, list[dict]]:
    """Every overlay, built on a copy of deploy/kubernetes whose
    components/plain-secrets/tls/ holds the files its kustomization names."""
    tree = tmp_path_factory.mktemp("tree") / "kubernetes"
    shutil.copytree(ROOT, tree)
    tls = tree / "components" / "plain-secrets" / "tls"
    tls.mkdir()
    for name in ("ca", "xds", "api", "gateway"):
        shutil.copy(pki / f"{name}.pem", tls / f"{name}.pem")
        if name != "ca":
            shutil.copy(pki / f"{name}.key", tls / f"{name}.key")
    return {overlay: build(tree / "overlays" / overlay) for overlay in OVERLAYS}


@pytest.fixture(scope="session")
def deployment(base) -> dict:
    return one(base, "Deployment", "apitokens")


@pytest.fixture(scope="session")
def pod(deployment) -> dict:
    return deployment["spec"]["template"]


@pytest.fixture(scope="session")
def container(pod) -> dict:
    (c,) = pod["spec"]["containers"]
    return c


@pytest.fixture(scope="session")
def args(container) -> dict[str, list[str]]:
    """The control plane's flags, each with its values (repeatable ones have several)."""
    out: dict[str, list[str]] = {}
    for arg in container["args"]:
        assert arg.startswith("--"), f"not a flag: {arg!r} (the entry point is `apitokens serve`)"
        name, _, value = arg.partition("=")
        out.setdefault(name, []).append(value)
    return out


def arg(args: dict[str, list[str]], name: str) -> str:
    (value,) = args[name]
    return value


def container_port(container: dict, port: int | str) -> int:
    """A port by number or name, as the container declares it."""
    for p in container["ports"]:
        if port in (p["containerPort"], p.get("name")):
            return p["containerPort"]
    raise AssertionError(f"the container declares no port {port!r}")


def listen_port(address: str) -> int:
    host, _, port = address.rpartition(":")
    assert host in ("0.0.0.0", "[::]"), f"{address}: reachable from the pod's address only if bound to every interface"
    return int(port)


def service_dns(svc: dict) -> str:
    return f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local"


def service(base: list[dict], container: dict, container_port_name: str) -> dict:
    """The Service whose (one) port targets this container port."""
    found = [s for s in every(base, "Service")
             if container_port(container, s["spec"]["ports"][0]["targetPort"])
             == container_port(container, container_port_name)]
    assert len(found) == 1, f"{len(found)} Services for the container port {container_port_name}"
    return found[0]


def gateway_pod_snippet() -> dict:
    """The gateway pod's annotations in istio/README.md ("The gateway pod"):
    the volumes and mounts, parsed."""
    text = (ROOT / "istio" / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "sidecar.istio.io/userVolume" in b]
    annotations = yaml.safe_load(block)
    return {"volumes": json.loads(annotations["sidecar.istio.io/userVolume"]),
            "mounts": json.loads(annotations["sidecar.istio.io/userVolumeMount"])}


def gateway_files(snippet: dict) -> dict[str, str]:
    """The files the gateway pod gets from the Secret: their path by key."""
    (volume,) = [v for v in snippet["volumes"] if "secret" in v]
    (mount,) = [m for m in snippet["mounts"] if m["name"] == volume["name"]]
    return {item["key"]: f"{mount['mountPath']}/{item['path']}" for item in volume["secret"]["items"]}


def parts(istio: list[dict]) -> dict[str, dict]:
    return {o["metadata"]["labels"]["apitokens.io/part"]: o for o in every(istio, "EnvoyFilter")}


# ---------------------------------------------------------------------------
# The Kubernetes schemas
# ---------------------------------------------------------------------------


def manifests() -> list[tuple[Path, dict]]:
    return [(path, d) for path in sorted(ROOT.rglob("*.yaml")) if path.name != "kustomization.yaml"
            for d in yaml_docs(path)]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_passes_the_kubernetes_schemas_strictly(version, builds):
    generated = [("(generated)", o) for objects in builds.values() for o in objects
                 if o["kind"] in ("ConfigMap", "Secret")]
    errors, checked, custom = [], 0, set()
    for path, obj in [*manifests(), *generated]:
        if (group(obj), obj["kind"]) in CRDS:
            custom.add(obj["kind"])
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
            checked += 1
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{path}: {obj['kind']}/{obj['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            errors.append(f"{path}: {e.message} (a custom resource? add it to CRDS with checks of its own)")
    assert not errors, "\n".join(errors)
    assert checked >= 12 and custom == {kind for _, kind in CRDS}, (checked, custom)


def test_strict_validation_rejects_an_unknown_field(deployment):
    """The validator itself: a misspelt field fails, as a wrong indentation would."""
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/healthz", "port": 9090}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


# ---------------------------------------------------------------------------
# The Kustomize layout
# ---------------------------------------------------------------------------


def test_each_kustomization_lists_exactly_the_files_beside_it():
    for directory in kustomizations():
        k = yaml.safe_load((directory / "kustomization.yaml").read_text())
        listed = {e for e in k.get("resources", []) if (directory / e).is_file()}
        generated = {e.rpartition("=")[2] for g in k.get("configMapGenerator", []) for e in g["files"]}
        present = {p.name for p in directory.iterdir() if p.is_file() and p.suffix in (".yaml", ".yml", ".json")}
        present.discard("kustomization.yaml")
        assert present == listed | generated, f"{directory.relative_to(ROOT)}: orphans {present - listed - generated}, " \
                                              f"missing {(listed | generated) - present}"
    # YAML outside every kustomization: only the documented alternatives.
    unbuilt = {str(p.parent.relative_to(ROOT)) for p in ROOT.rglob("*.yaml")
               if not (p.parent / "kustomization.yaml").exists()}
    assert unbuilt == NOT_BUILT, unbuilt


def test_every_kustomization_is_part_of_an_overlay():
    reached: set[Path] = set()

    def walk(directory: Path) -> None:
        reached.add(directory.resolve())
        k = yaml.safe_load((directory / "kustomization.yaml").read_text())
        for entry in [*k.get("resources", []), *k.get("components", [])]:
            if (directory / entry).is_dir():
                walk((directory / entry).resolve())

    for overlay in OVERLAYS:
        walk(ROOT / "overlays" / overlay)
    assert {p.resolve() for p in kustomizations()} == reached
    assert {p.name for p in (ROOT / "overlays").iterdir()} == set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_overlay_builds_everything(overlay, builds):
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in builds[overlay])
    expected = {("Namespace", "apitokens"), ("ServiceAccount", "apitokens"), ("Deployment", "apitokens"),
                ("Service", "apitokens-api"), ("Service", "apitokens-xds"), ("Service", "apitokens-status"),
                ("PodDisruptionBudget", "apitokens"), ("NetworkPolicy", "apitokens"),
                ("ConfigMap", "apitokens-plugin-config"), ("EnvoyFilter", "apitokens-xds-cluster-mtls"),
                ("EnvoyFilter", "apitokens-ecds"), ("EnvoyFilter", "apitokens-hardening"),
                ("DestinationRule", "apitokens-api")}
    tls = {"apitokens-xds-tls", "apitokens-api-tls", "apitokens-gateway-xds-tls"}
    if overlay == "cert-manager":
        expected |= {("Certificate", n) for n in ("apitokens-xds", "apitokens-api", "apitokens-gateway-xds")}
    else:
        expected |= {("Secret", n) for n in tls}
    assert set(kinds) == expected


def test_plain_secrets_are_the_secrets_cert_manager_makes(builds, certificates):
    made = {(c["metadata"]["namespace"], c["spec"]["secretName"]) for c in certificates}
    secrets = every(builds["plain-secrets"], "Secret")
    assert {(s["metadata"]["namespace"], s["metadata"]["name"]) for s in secrets} == made
    for s in secrets:
        assert s["type"] == "kubernetes.io/tls" and set(s["data"]) == CERT_MANAGER_KEYS, s["metadata"]["name"]
    k = yaml.safe_load((ROOT / "components" / "plain-secrets" / "kustomization.yaml").read_text())
    for gen in k["secretGenerator"]:
        # The gateway pods, outside the build, name their Secret: no hash suffix on any.
        assert gen["options"]["disableNameSuffixHash"] is True, gen["name"]
        for entry in gen["files"]:
            assert entry.rpartition("=")[2].startswith("tls/"), entry
    assert "tls/" in (ROOT / "components" / "plain-secrets" / ".gitignore").read_text().split(), "never commit a key"


def test_the_readmes_name_every_file():
    readmes = (ROOT / "README.md").read_text() + (ROOT / "istio" / "README.md").read_text()
    for path in ROOT.rglob("*"):
        if path.is_file() and path.suffix in (".yaml", ".json") and path.name != "kustomization.yaml":
            assert path.name in readmes, f"{path.relative_to(ROOT)} is described in no README"


# ---------------------------------------------------------------------------
# The control plane's pods
# ---------------------------------------------------------------------------


def test_every_flag_is_one_the_binary_accepts(args, container):
    out = subprocess.run([apitokens_bin(), "serve", "--help"], capture_output=True, text=True, timeout=limit(60))
    assert out.returncode == 0, out.stderr
    known = set(re.findall(r"^\s+(?:-\w, )?(--[a-z0-9-]+)", out.stdout, re.M))
    assert {"--listen", "--xds-listen", "--store-file"} <= known, "the help's format changed"
    unknown = sorted(set(args) - known)
    assert not unknown, f"flags `{apitokens_bin()} serve` does not accept: {unknown}"
    # No flag twice unless the binary says it is repeatable.
    for name, values in args.items():
        if len(values) > 1:
            entry = re.search(rf"^\s+(?:-\w, )?{re.escape(name)}\b.*?(?=^\s+(?:-\w, )?--|\Z)", out.stdout, re.M | re.S)
            assert "repeatable" in entry.group(0), f"{name} given {len(values)} times"


def test_the_container_runs_apitokens_serve_with_secrets_off_the_command_line(container, args):
    # The image's entry point is `apitokens serve`: only args here.
    assert "command" not in container
    assert container["image"].startswith("ghcr.io/apitokens/control-plane:"), container["image"]
    assert "--store" not in args and "--db" not in args, "the database URL only from a file (--store-file)"
    assert not [e for e in container.get("env", []) if e["name"] == "APITOKENS_STORE"], "nor from a variable"
    assert {"--xds-tls-cert", "--xds-tls-key", "--xds-client-ca", "--xds-client-san"} <= set(args), "mutual TLS on xDS"
    assert "--insecure-xds" not in args and "--no-xds" not in args
    assert {"--tls-cert", "--tls-key"} <= set(args), "HTTPS on the API (it carries owners' secrets)"
    assert arg(args, "--log-format") == "json"


def test_variables_in_args_are_declared(container, args):
    """Kubernetes leaves an undeclared $(VAR) as it is: the replica would be named `$(POD_NAME)`."""
    env = {e["name"]: e for e in container.get("env", [])}
    for a in container["args"]:
        for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", a):
            assert var in env, f"{a}: {var} is not in env"
    assert arg(args, "--replica-name") == "$(POD_NAME)"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_listen_addresses_are_the_container_ports(container, args):
    assert listen_port(arg(args, "--listen")) == container_port(container, "api")
    assert listen_port(arg(args, "--status-listen")) == container_port(container, "status")
    assert listen_port(arg(args, "--xds-listen")) == container_port(container, "xds")
    ports = [p["containerPort"] for p in container["ports"]]
    assert len(ports) == 3 == len(set(ports)), ports


def test_probes_point_at_the_right_ports(container, args):
    ready = container["readinessProbe"]["httpGet"]
    assert ready["path"] == "/healthz"
    assert container_port(container, ready["port"]) == listen_port(arg(args, "--status-listen"))
    # --tls-cert serves the status port too.
    assert ready.get("scheme", "HTTP") == ("HTTPS" if "--tls-cert" in args else "HTTP")
    live = container["livenessProbe"]
    assert set(live) - {"initialDelaySeconds", "periodSeconds", "timeoutSeconds", "failureThreshold"} == {"tcpSocket"}
    # The API port: xDS closes while the database is unreachable, and a restart would not help.
    assert container_port(container, live["tcpSocket"]["port"]) == listen_port(arg(args, "--listen"))


def test_prometheus_scrapes_the_status_port(pod, container, args):
    a = pod["metadata"]["annotations"]
    assert a["prometheus.io/scrape"] == "true"
    assert int(a["prometheus.io/port"]) == listen_port(arg(args, "--status-listen"))
    assert a["prometheus.io/path"] == "/metrics"
    assert a["prometheus.io/scheme"] == ("https" if "--tls-cert" in args else "http")


def test_resources_and_spread(deployment, pod, container):
    assert deployment["spec"]["replicas"] == 3
    r = container["resources"]
    assert r["requests"]["cpu"] and r["requests"]["memory"] and r["limits"]["memory"]
    labels = pod["metadata"]["labels"]
    spread = pod["spec"]["topologySpreadConstraints"]
    hosts = [c for c in spread if c["topologyKey"] == "kubernetes.io/hostname"]
    assert hosts and hosts[0]["whenUnsatisfiable"] == "DoNotSchedule"
    for c in spread:
        assert c["labelSelector"]["matchLabels"].items() <= labels.items(), c
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_pod_security_restricted(base, pod, container):
    """The fields the Pod Security "restricted" profile checks (v1.30 and later), and ours."""
    spec = pod["spec"]
    psc = spec.get("securityContext", {})
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        assert spec.get(field) in (None, False), field
    allowed_volumes = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                       "projected", "secret"}
    for v in spec["volumes"]:
        assert set(v) - {"name"} <= allowed_volumes, v
    assert psc.get("seccompProfile", {}).get("type") in ("RuntimeDefault", "Localhost")
    assert not psc.get("sysctls")
    assert "windowsOptions" not in psc
    for c in [*spec["containers"], *spec.get("initContainers", [])]:
        sc = c["securityContext"]
        assert not any(p.get("hostPort") for p in c.get("ports", [])), "hostPort"
        assert sc.get("privileged") in (None, False)
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"] and set(sc["capabilities"].get("add", [])) <= {"NET_BIND_SERVICE"}
        run_as_non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot"))
        assert run_as_non_root is True
        assert sc.get("runAsUser", psc.get("runAsUser")) not in (None, 0)
        assert sc.get("seccompProfile", psc.get("seccompProfile", {})).get("type") in ("RuntimeDefault", "Localhost")
        assert sc.get("procMount", "Default") == "Default"
        assert sc.get("seLinuxOptions", {}).get("type", "") in ("", "container_t", "container_init_t", "container_kvm_t")
        # Ours, beyond the profile: the image's user, nothing writable but /tmp.
        assert sc["runAsUser"] == psc["runAsUser"] == 65532 and sc["runAsGroup"] == psc["runAsGroup"] == 65532
        assert sc["readOnlyRootFilesystem"] is True
    assert spec["automountServiceAccountToken"] is False
    assert spec["enableServiceLinks"] is False, "no APITOKENS_*_SERVICE_* variables next to the binary's APITOKENS_*"
    assert spec["serviceAccountName"] == one(base, "ServiceAccount")["metadata"]["name"]
    ns = one(base, "Namespace")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert {o["metadata"].get("namespace") for o in base if o["kind"] != "Namespace"} == {ns["metadata"]["name"]}


def test_services_select_the_pods_and_target_declared_ports(base, pod, container):
    labels = pod["metadata"]["labels"]
    services = every(base, "Service")
    assert len(services) == 3
    for s in services:
        sel = s["spec"]["selector"]
        assert sel and sel.items() <= labels.items(), s["metadata"]["name"]
        for p in s["spec"]["ports"]:
            container_port(container, p["targetPort"])
    xds = service(base, container, "xds")
    assert xds["spec"]["clusterIP"] == "None", "headless: the gateways resolve every replica (STRICT_DNS)"
    # Headless: clients reach the pods' own port, so the Service's port must be it.
    assert xds["spec"]["ports"][0]["port"] == container_port(container, "xds")
    assert service(base, container, "api")["spec"].get("clusterIP") != "None"
    assert service(base, container, "status")["spec"].get("clusterIP") != "None"


def test_the_disruption_budget_keeps_two_of_three(base, deployment, pod):
    pdb = one(base, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert pdb["spec"]["minAvailable"] == 2 < deployment["spec"]["replicas"]


def test_the_network_policy(base, pod, container, istio):
    np = one(base, "NetworkPolicy")
    assert np["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert "Ingress" in np["spec"]["policyTypes"]
    gateway_labels = {tuple(sorted(ef["spec"]["workloadSelector"]["labels"].items())) for ef in every(istio, "EnvoyFilter")}
    (gw,) = gateway_labels
    allowed: dict[int, list[dict]] = {}
    for rule in np["spec"]["ingress"]:
        for p in rule["ports"]:
            assert p.get("protocol", "TCP") == "TCP"
            allowed.setdefault(container_port(container, p["port"]), []).extend(rule["from"])
    assert set(allowed) == {p["containerPort"] for p in container["ports"]}, "a port nobody may reach, or a stray one"
    for name in ("xds", "api"):
        (peer,) = allowed[container_port(container, name)]
        # The gateways (the EnvoyFilters' workload), in their namespace only:
        # anyone may label a pod `istio: ingressgateway` in a namespace of theirs.
        assert peer == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "istio-system"}},
                        "podSelector": {"matchLabels": dict(gw)}}, peer
    (peer,) = allowed[container_port(container, "status")]
    assert set(peer) == {"namespaceSelector"} and peer["namespaceSelector"]["matchLabels"], \
        "status and metrics from the monitoring namespace only"


def volume_files(pod: dict, container: dict, objects: list[dict]) -> dict[str, tuple[str, str]]:
    """Every file the container sees from a Secret or ConfigMap: path -> (object, key)."""
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    files = {}
    for m in container["volumeMounts"]:
        v = volumes[m["name"]]
        source = v.get("secret") or v.get("configMap")
        if source is None:
            continue
        name = source.get("secretName") or source.get("name")
        if "items" in source:
            keys = {i["key"]: i["path"] for i in source["items"]}
        else:
            (obj,) = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == name]
            keys = {k: k for k in obj["data"]}
        for k, path in keys.items():
            files[f"{m['mountPath']}/{path}"] = (name, k)
    return files


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_mount_is_defined_and_every_file_flag_is_mounted(overlay, builds, pod, container, args):
    objects = builds[overlay]
    ns = one(objects, "Deployment")["metadata"]["namespace"]
    readme = (ROOT / "README.md").read_text()
    mounts = {m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"] for v in pod["spec"]["volumes"]}
    assert mounts == volumes, f"mounted but not defined {mounts - volumes}, defined but not mounted {volumes - mounts}"
    secrets = {s["metadata"]["name"]: set(s["data"]) for s in every(objects, "Secret") if s["metadata"]["namespace"] == ns}
    secrets |= {c["spec"]["secretName"]: CERT_MANAGER_KEYS for c in every(objects, "Certificate")
                if c["metadata"]["namespace"] == ns}
    config_maps = {c["metadata"]["name"]: set(c["data"]) for c in every(objects, "ConfigMap")
                   if c["metadata"]["namespace"] == ns}
    for v in pod["spec"]["volumes"]:
        if "secret" in v:
            name, have = v["secret"]["secretName"], secrets.get(v["secret"]["secretName"])
            if have is None:
                assert name in OPERATOR_SECRETS, f"Secret {name}: nobody makes it"
                assert f"`{name}`" in readme, f"Secret {name}: not documented in deploy/kubernetes/README.md"
                have = {i["key"] for i in v["secret"]["items"]}
                for k in have:
                    assert re.search(rf"`{re.escape(name)}` \| `{re.escape(k)}`", readme), f"{name}: key {k} undocumented"
        elif "configMap" in v:
            name, have = v["configMap"]["name"], config_maps.get(v["configMap"]["name"])
            assert have is not None, f"ConfigMap {name}: nobody makes it"
        else:
            assert set(v) == {"name", "emptyDir"}, v
            continue
        source = v.get("secret") or v.get("configMap")
        for item in source.get("items", []):
            assert item["key"] in have, f"{name} has no key {item['key']}"
    files = volume_files(pod, container, objects)
    for flag in FILE_FLAGS:
        assert arg(args, flag) in files, f"{flag}={arg(args, flag)}: no mounted file there"
    # The database URL's CA (documented, it is in the operator's Secret) is a mounted file too.
    (url,) = re.findall(r"postgres://\S*sslrootcert=([^`&\s]+)", readme)
    assert url in files and "sslmode=verify-full" in readme


def test_the_plugin_config_is_the_shipped_one_for_the_istio_api_route(base, container):
    deployed = json.loads((ROOT / "base" / "plugin-config.json").read_text())
    shipped = json.loads((REPO_ROOT / "envoy" / "ecds-plugin-base.json").read_text())
    api = service(base, container, "api")
    # Istio's name for the gateway's cluster of the API Service's port.
    outbound = f"outbound|{api['spec']['ports'][0]['port']}||{service_dns(api)}"
    assert {k: v for k, v in deployed.items() if k != FAC} == {k: v for k, v in shipped.items() if k != FAC}
    assert deployed[FAC] == [outbound, *shipped[FAC]]


def test_the_binary_accepts_the_plugin_config(tmp_path):
    db = tmp_path / "a.db"
    subprocess.run([apitokens_bin(), "bootstrap", "--db", str(db), "--namespace", "x", "--name", "o"],
                   check=True, capture_output=True, timeout=limit(60))
    out = subprocess.run([apitokens_bin(), "render", "--db", str(db), "--plugin-config",
                          str(ROOT / "base" / "plugin-config.json")], capture_output=True, text=True,
                         timeout=limit(60))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)[FAC] == json.loads((ROOT / "base" / "plugin-config.json").read_text())[FAC]


# ---------------------------------------------------------------------------
# Certificates
# ---------------------------------------------------------------------------


def test_the_certificates_are_the_ones_the_pods_mount(certificates, base, pod, container, args, istio):
    for c in certificates:
        s = c["spec"]
        assert c["apiVersion"] == "cert-manager.io/v1" and c["metadata"]["namespace"]
        assert s["secretName"] and s["dnsNames"] and s["usages"] and s["issuerRef"]["name"], c["metadata"]["name"]
        assert s["issuerRef"]["kind"] in ("Issuer", "ClusterIssuer")
        assert s["issuerRef"].get("group", "cert-manager.io") == "cert-manager.io"
        assert s["privateKey"]["encoding"] == "PKCS8", "what every TLS stack here reads"
        assert s["privateKey"]["rotationPolicy"] == "Always"
    # One CA: each side trusts the ca.crt of its own Secret.
    assert len({json.dumps(c["spec"]["issuerRef"], sort_keys=True) for c in certificates}) == 1
    issuer = certificates[0]["spec"]["issuerRef"]
    assert issuer["kind"] == "ClusterIssuer", "the gateway's certificate is in another namespace than the others"
    assert f"`{issuer['name']}`" in (ROOT / "README.md").read_text(), "the issuer the operator provides: documented"
    by_secret = {(c["metadata"]["namespace"], c["spec"]["secretName"]): c for c in certificates}
    files = volume_files(pod, container, base)
    ns = one(base, "Namespace")["metadata"]["name"]

    def mounted(flag: str) -> dict:
        name, k = files[arg(args, flag)]
        assert (ns, name) in by_secret, f"{flag}: Secret {name} is no Certificate's"
        return by_secret[(ns, name)]

    xds, api = mounted("--xds-tls-cert"), mounted("--tls-cert")
    assert mounted("--xds-tls-key") is xds and mounted("--xds-client-ca") is xds and mounted("--tls-key") is api
    assert files[arg(args, "--xds-client-ca")][1] == "ca.crt"
    assert "server auth" in xds["spec"]["usages"] and "server auth" in api["spec"]["usages"]
    assert service_dns(service(base, container, "xds")) in xds["spec"]["dnsNames"]
    assert service_dns(service(base, container, "api")) in api["spec"]["dnsNames"]
    # The gateways check the xDS server's name.
    tls = parts(istio)["xds-cluster-mtls"]["spec"]["configPatches"][0]["patch"]["value"]["transport_socket"]["typed_config"]
    assert tls["sni"] in xds["spec"]["dnsNames"]
    for m in tls["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"]:
        assert m["san_type"] == "DNS" and m["matcher"]["exact"] in xds["spec"]["dnsNames"]
    # The gateways' client certificate: where the gateways run, with the identity the control plane admits.
    (gw,) = [c for c in certificates if c not in (xds, api)]
    assert gw["metadata"]["namespace"] == parts(istio)["xds-cluster-mtls"]["metadata"]["namespace"]
    assert "client auth" in gw["spec"]["usages"]
    assert set(args["--xds-client-san"]) <= set(gw["spec"]["dnsNames"]), "the control plane would refuse the gateways"
    (volume,) = [v for v in gateway_pod_snippet()["volumes"] if "secret" in v]
    assert volume["secret"]["secretName"] == gw["spec"]["secretName"]


# ---------------------------------------------------------------------------
# Istio
# ---------------------------------------------------------------------------


def test_the_istio_set_is_wired_to_the_services(istio, base, container, args, certificates):
    p = parts(istio)
    assert set(p) == {"xds-cluster-mtls", "ecds-filter", "hardening"}, "one cluster, the filter, the hardening"
    assert {o["kind"] for o in istio} == {"EnvoyFilter", "DestinationRule"}
    xds = service(base, container, "xds")
    (cluster,) = [cp["patch"]["value"] for cp in p["xds-cluster-mtls"]["spec"]["configPatches"]]
    assert cluster["type"] == "STRICT_DNS"
    (address,) = xds_endpoints({"static_resources": {"clusters": [cluster]}})
    assert address == {"address": service_dns(xds), "port_value": xds["spec"]["ports"][0]["port"]}
    assert address["port_value"] == listen_port(arg(args, "--xds-listen"))
    tls = cluster["transport_socket"]["typed_config"]
    assert tls["sni"] == service_dns(xds)
    # The filter: the control plane's resource name, its module path, from that cluster.
    (insert,) = p["ecds-filter"]["spec"]["configPatches"]
    value = insert["patch"]["value"]
    assert value["name"] == (arg(args, "--resource-name") if "--resource-name" in args else "apitokens")
    (grpc,) = value["config_discovery"]["config_source"]["api_config_source"]["grpc_services"]
    assert grpc["envoy_grpc"]["cluster_name"] == cluster["name"]
    default = value["config_discovery"]["default_config"]["config"]
    assert default["vm_config"]["code"]["local"]["filename"] == arg(args, "--wasm-module")
    assert default["failure_policy"] == "FAIL_CLOSED"
    plugin = json.loads((ROOT / "base" / "plugin-config.json").read_text())
    assert plugin["usageReport"]["cluster"] == cluster["name"], "usage reports go to the xDS cluster"
    # HTTPS from the gateways to the API, checked against the API's certificate.
    api = service(base, container, "api")
    dr = one(istio, "DestinationRule")
    assert dr["spec"]["host"] == service_dns(api)
    (port,) = dr["spec"]["trafficPolicy"]["portLevelSettings"]
    assert port["port"]["number"] == api["spec"]["ports"][0]["port"]
    assert port["tls"]["mode"] == "SIMPLE"
    (api_cert,) = [c for c in certificates if service_dns(api) in c["spec"]["dnsNames"]]
    assert port["tls"]["sni"] in api_cert["spec"]["dnsNames"]
    assert set(port["tls"]["subjectAltNames"]) <= set(api_cert["spec"]["dnsNames"])
    assert port["tls"]["caCertificates"] == gateway_files(gateway_pod_snippet())["ca.crt"]
    assert f"outbound|{api['spec']['ports'][0]['port']}||{dr['spec']['host']}" in plugin[FAC]


def test_the_gateway_pod_mounts_what_the_envoyfilters_read(istio, args):
    snippet = gateway_pod_snippet()
    files = gateway_files(snippet)
    tls = parts(istio)["xds-cluster-mtls"]["spec"]["configPatches"][0]["patch"]["value"]["transport_socket"]["typed_config"]
    ctx = tls["common_tls_context"]
    (cert,) = ctx["tls_certificates"]
    assert files["tls.crt"] == cert["certificate_chain"]["filename"]
    assert files["tls.key"] == cert["private_key"]["filename"]
    assert files["ca.crt"] == ctx["validation_context"]["trusted_ca"]["filename"]
    # The module: from the filter image (plugin.wasm at its root) at the path the control plane pushes.
    (wasm,) = [v for v in snippet["volumes"] if "image" in v]
    (mount,) = [m for m in snippet["mounts"] if m["name"] == wasm["name"]]
    assert mount["mountPath"] == arg(args, "--wasm-module") and mount["subPath"] == "plugin.wasm"
    (plugin,) = yaml_docs(ROOT / "istio" / "alternatives" / "wasmplugin.yaml")
    assert plugin["spec"]["url"] == "oci://" + wasm["image"]["reference"], "one filter image"


def test_the_istio_set_passes_envoy_validate(tmp_path, istio, pki, args):
    """The kustomization's EnvoyFilters applied to an ingress gateway the way
    Istio applies them (testkit.istio), the module and the certificates at
    the pod's paths replaced with the built module and test files named as
    the gateway pod mounts them."""
    p = parts(istio)
    files = gateway_files(gateway_pod_snippet())
    local = tmp_path / "etc-apitokens"
    local.mkdir()
    for k, source in (("tls.crt", "gateway.pem"), ("tls.key", "gateway.key"), ("ca.crt", "ca.pem")):
        assert files[k].startswith("/etc/apitokens/")
        shutil.copy(pki / source, local / files[k].removeprefix("/etc/apitokens/"))
    config = apply(gateway("istio-gw", 8080, tmp_path / "access.log"),
                   p["xds-cluster-mtls"], p["ecds-filter"], p["hardening"])
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert [f["name"] for f in hcm["http_filters"]][-2:] == ["apitokens", "envoy.filters.http.router"]
    assert arg(args, "--wasm-module") in yaml.safe_dump(config)
    config = localized(config, Path(harness.wasm_module()), local)
    path = tmp_path / "istio-gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    out = harness.validate(path)
    assert out.returncode == 0, f"envoy --mode validate:\n{out.stdout[-3000:]}{out.stderr[-3000:]}"


def https_get(port: int, path: str, ca: Path, name: str) -> httpx.Response:
    """GET over HTTPS from 127.0.0.1:port, the server's certificate checked
    against the CA for `name` (a Service's DNS name)."""
    with httpx.Client(verify=ssl.create_default_context(cafile=str(ca)), timeout=limit(5)) as client:
        return client.get(f"https://127.0.0.1:{port}{path}", extensions={"sni_hostname": name})


def test_the_deployment_runs_and_the_gateway_takes_its_push(tmp_path, builds, base, pod, container, istio, pki,
                                                             upstream):  # noqa: F811
    """The container's args as they are, but for the addresses (127.0.0.1,
    free ports), the store (SQLite, through the same --store-file), the
    module's path (the built module) and the mounted files' root (a directory here, filled from the plain-secrets
    build: the Secrets and the generated ConfigMap). Its status port answers
    the probe's and Prometheus' paths under the status Service's name; the
    Istio gateway (the kustomization's EnvoyFilters) takes its push over
    mutual TLS, under the control plane's --xds-client-san, and lets an owner
    token through."""
    objects = {(o["kind"], o["metadata"]["name"]): o for o in builds["plain-secrets"]}
    root = tmp_path / "pod"
    db = tmp_path / "apitokens.db"
    contents = {"apitokens-store": {"url": str(db).encode()}, "apitokens-db-ca": {"ca.crt": (pki / "ca.pem").read_bytes()}}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    for m in container["volumeMounts"]:
        v, d = volumes[m["name"]], root / m["mountPath"].lstrip("/")
        d.mkdir(parents=True)
        if "secret" in v:
            name = v["secret"]["secretName"]
            data = contents.get(name) or {k: base64.b64decode(s) for k, s in objects[("Secret", name)]["data"].items()}
            for item in v["secret"]["items"]:
                (d / item["path"]).write_bytes(data[item["key"]])
        elif "configMap" in v:
            for k, text in objects[("ConfigMap", v["configMap"]["name"])]["data"].items():
                (d / k).write_text(text)
    ports = {flag: free_port() for flag in ("--listen", "--status-listen", "--xds-listen")}
    cmd = [str(Path(apitokens_bin()).resolve()), "serve"]
    for a in container["args"]:
        flag, _, value = a.partition("=")
        if flag in ports:
            value = f"127.0.0.1:{ports[flag]}"
        elif flag in FILE_FLAGS:
            value = str(root) + value
        elif flag == "--wasm-module":  # the pod's path, checked against the gateway above
            value = str(Path(harness.wasm_module()).resolve())
        cmd.append(f"{flag}={value.replace('$(POD_NAME)', 'apitokens-5c9d8-x2x7q')}")
    log = tmp_path / "serve.log"
    owner = remember_secret(subprocess.run([apitokens_bin(), "bootstrap", "--db", str(db), "--namespace", "default",
                                            "--name", "owner"], capture_output=True, text=True, check=True,
                                           timeout=limit(30)).stdout.strip())
    status_name = service_dns(service(base, container, "status"))
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True)
    envoy = None
    try:
        def ready() -> bool:
            assert proc.poll() is None, f"serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            try:
                return https_get(ports["--status-listen"], container["readinessProbe"]["httpGet"]["path"],
                                 pki / "ca.pem", status_name).status_code == 200
            except httpx.TransportError:
                return False

        poll(ready, 15, "the readiness probe's /healthz")
        metrics = https_get(ports["--status-listen"], pod["metadata"]["annotations"]["prometheus.io/path"],
                            pki / "ca.pem", status_name)
        assert metrics.status_code == 200 and "apitokens_" in metrics.text, metrics.text[:500]
        lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
        assert lines and all(ln.startswith("{") for ln in lines), f"--log-format json: {lines[:3]}"

        p = parts(istio)
        files = gateway_files(gateway_pod_snippet())
        certs = tmp_path / "gateway-etc-apitokens"
        certs.mkdir()
        for k, source in (("tls.crt", "gateway.pem"), ("tls.key", "gateway.key"), ("ca.crt", "ca.pem")):
            shutil.copy(pki / source, certs / files[k].removeprefix("/etc/apitokens/"))
        config = apply(gateway("istio-ingressgateway-1", upstream.server_address[1], tmp_path / "access.log"),
                       p["xds-cluster-mtls"], p["ecds-filter"], p["hardening"])
        config = localized(config, Path(harness.wasm_module()), certs)
        for address in xds_endpoints(config):
            address.update(address="127.0.0.1", port_value=ports["--xds-listen"])
        envoy = harness.Envoy(tmp_path / "gateway", config, name="istio-ingressgateway-1").start()

        def acked() -> bool:
            status = https_get(ports["--status-listen"], "/status", pki / "ca.pem", status_name).json()
            return any(e["node"] == "istio-ingressgateway-1" and e.get("ackedVersion") for e in status["envoys"])

        poll(acked, 15, "the gateway's ACK")
        assert envoy.get(APP, owner).status == 200
        assert envoy.get(APP, None).status == 401
    finally:
        if envoy is not None:
            envoy.stop()
        proc.terminate()
        proc.wait(limit(10))
