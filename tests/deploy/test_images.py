"""The container images: deploy/images/Containerfile (the control plane) and
Containerfile.filter (the wasm module for an Istio WasmPlugin), built by
scripts/images.sh.

Containers cannot run on this machine (`podman run` fails: setrlimit
RLIMIT_NPROC is refused without CAP_SYS_RESOURCE). So the images are checked
by inspection of their archives (configuration, layers, every file), and the
control plane is run from the image's own file system: its layers unpacked in
order into a directory, the entry point started there under chroot with the
image's user, working directory and environment, as a container runtime would
(without its namespaces, cgroups and /proc, /dev and /sys mounts, which the
binary does not need; /etc/hosts and /etc/resolv.conf, which a runtime mounts,
are written into the directory).

The images are built here from what `make test` has built already:
APITOKENS_BIN (default target/debug/apitokens, the debug profile, which
deploy/images/rootfs.sh strips) and APITOKENS_WASM (the release module).
`make images` runs the same script, Containerfiles and rootfs.sh on the
release binary: only the binary differs (debug against release profile; both
link the same glibc and libgcc_s, so the layout is the same).

Environment: APITOKENS_BIN, APITOKENS_WASM, HADOLINT_BIN (default
.venv/bin/hadolint); with a private PostgreSQL (scripts/postgres.sh run --
...: APITOKENS_TEST_POSTGRES and the rest) the control plane also runs on a
PostgreSQL store whose host is a name. The chroot tests need root.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import tarfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from testkit import postgres
from testkit.controlplane import apitokens_bin, free_port, module_path
from testkit.harness import poll, stop_process
from testkit.timing import limit

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "deploy" / "images"
SCRIPT = REPO / "scripts" / "images.sh"
# A tag of this run's own (removed at the end), so that runs side by side do not meet.
TAG = f"test-{os.getpid()}"
NAMES = [f"{registry}/{name}:{TAG}" for registry in ("localhost/apitokens", "ghcr.io/apitokens")
         for name in ("control-plane", "filter")]

ENTRYPOINT = ["/usr/local/bin/apitokens", "serve"]
USER = "65532:65532"
PORTS = {"8081/tcp", "9090/tcp", "18000/tcp"}
DB_NAME = "db.apitokens.test"
SOURCE_LABEL = "org.opencontainers.image.source=https://github.com/apitokens/apitokens"

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="chroot needs root")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hadolint() -> str:
    return os.environ.get("HADOLINT_BIN") or str(REPO / ".venv" / "bin" / "hadolint")


# ---------------------------------------------------------------------------
# The Containerfiles


@pytest.mark.parametrize("name", ["Containerfile", "Containerfile.filter"])
def test_hadolint(name):
    out = subprocess.run([hadolint(), "--failure-threshold", "warning", str(IMAGES / name)],
                         capture_output=True, text=True, timeout=limit(60))
    assert out.returncode == 0, out.stdout + out.stderr


def test_build_stage_makes_what_the_runtime_stage_copies():
    """With a registry the build stage runs rootfs.sh into /out; without one,
    images.sh runs the same script and passes its output as that stage: both
    must name the same script and /out."""
    text = (IMAGES / "Containerfile").read_text()
    assert "deploy/images/rootfs.sh target/release/apitokens /out" in text
    assert "COPY --from=build --chown=0:0 /out/rootfs/ /" in text
    assert "COPY --from=build --chown=65532:65532 /out/data/ /var/lib/apitokens/" in text
    script = SCRIPT.read_text()
    assert '"$images/rootfs.sh" "$cp_binary" "$stage/control-plane/out"' in script
    assert '--build-context build="$stage/control-plane"' in script
    filter_text = (IMAGES / "Containerfile.filter").read_text()
    assert "/out/plugin.wasm" in filter_text and '"$stage/filter/out/plugin.wasm"' in script


# ---------------------------------------------------------------------------
# Building (a few seconds: no compilation, the binaries are given)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if not shutil.which("podman"):
        pytest.fail("no podman: scripts/images.sh install")
    binary, wasm = Path(apitokens_bin()), module_path()
    for path in (binary, wasm):
        assert path.exists(), f"{path} missing (make cp-build build)"
    out = tmp_path_factory.mktemp("images")
    run = subprocess.run([str(SCRIPT), "build", "--cp-binary", str(binary), "--wasm", str(wasm),
                          "--tag", TAG, "--out", str(out)], capture_output=True, text=True,
                         timeout=limit(300))
    assert run.returncode == 0, run.stdout + run.stderr
    yield {"out": out, "binary": binary, "wasm": wasm}
    subprocess.run(["podman", "rmi", "--force", *NAMES], capture_output=True, timeout=limit(120))
    subprocess.run(["podman", "image", "prune", "--force", "--filter", f"label={SOURCE_LABEL}"],
                   capture_output=True, timeout=limit(120))


def unpack(archive: Path, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into)
    return into


def members(layer: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        return {m.name.removeprefix("./").rstrip("/"): m for m in tar.getmembers()}


def file_bytes(layer: bytes, name: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        for m in tar.getmembers():
            if m.name.removeprefix("./") == name:
                return tar.extractfile(m).read()
    raise KeyError(name)


@pytest.fixture(scope="module")
def control_plane(built, tmp_path_factory):
    """The docker-archive: its configuration and its layers (uncompressed tars), in order."""
    root = unpack(built["out"] / "control-plane.tar", tmp_path_factory.mktemp("control-plane-archive"))
    [manifest] = json.loads((root / "manifest.json").read_text())
    config_bytes = (root / manifest["Config"]).read_bytes()
    return {
        "manifest": manifest,
        "config_bytes": config_bytes,
        "image": json.loads(config_bytes),
        "layers": [(root / name).read_bytes() for name in manifest["Layers"]],
    }


@pytest.fixture(scope="module")
def filter_image(built, tmp_path_factory):
    """The oci-archive: its manifest, configuration and layer blobs."""
    root = unpack(built["out"] / "filter.tar", tmp_path_factory.mktemp("filter-archive"))

    def blob(digest: str) -> bytes:
        data = (root / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()
        assert "sha256:" + sha256(data) == digest, f"blob {digest} does not match its digest"
        return data

    index = json.loads((root / "index.json").read_text())
    [descriptor] = index["manifests"]
    manifest = json.loads(blob(descriptor["digest"]))
    return {
        "manifest": manifest,
        "image": json.loads(blob(manifest["config"]["digest"])),
        "layers": [(d, blob(d["digest"])) for d in manifest["layers"]],
    }


# ---------------------------------------------------------------------------
# The control plane image, by inspection


def test_control_plane_configuration(control_plane):
    image, config = control_plane["image"], control_plane["image"]["config"]
    assert control_plane["manifest"]["RepoTags"] == [f"ghcr.io/apitokens/control-plane:{TAG}"]
    assert control_plane["manifest"]["Config"] == sha256(control_plane["config_bytes"]) + ".json"
    assert image["os"] == "linux" and image["architecture"] == "amd64"
    assert config["Entrypoint"] == ENTRYPOINT
    assert config["Cmd"] == ["--listen", "0.0.0.0:8081", "--status-listen", "0.0.0.0:9090"]
    assert config["User"] == USER
    assert config["WorkingDir"] == "/var/lib/apitokens"
    assert set(config["ExposedPorts"]) == PORTS
    assert not config.get("Volumes")
    health = config["Healthcheck"]
    assert health["Test"] == ["CMD", "/usr/local/bin/apitokens", "health", "--url", "http://127.0.0.1:9090/healthz"]
    assert health["Interval"] == 30_000_000_000 and health["Timeout"] == 5_000_000_000
    assert health["StartPeriod"] == 10_000_000_000 and health["Retries"] == 3
    assert config["Labels"]["org.opencontainers.image.version"] == "0.1.0"


def test_control_plane_layers(control_plane):
    """Two layers (the system, the data directory), each what its diff id says."""
    layers, diff_ids = control_plane["layers"], control_plane["image"]["rootfs"]["diff_ids"]
    assert len(layers) == 2
    assert diff_ids == ["sha256:" + sha256(layer) for layer in layers], "a layer does not match the image's diff ids"


def test_control_plane_files(control_plane, built, tmp_path):
    system, data = (members(layer) for layer in control_plane["layers"])

    # The second layer: the data directory only, owned by the image's user.
    assert sorted(data) == ["var", "var/lib", "var/lib/apitokens"]
    assert all(m.isdir() for m in data.values())
    assert (data["var/lib/apitokens"].uid, data["var/lib/apitokens"].gid) == (65532, 65532)
    assert (data["var"].uid, data["var/lib"].uid) == (0, 0)

    # The first: the binary, the libraries its loader needs (no more), users,
    # nsswitch.conf, the CA roots, /tmp; everything owned by root.
    binary = file_bytes(control_plane["layers"][0], "usr/local/bin/apitokens")
    extracted = tmp_path / "apitokens"
    extracted.write_bytes(binary)
    extracted.chmod(0o755)
    ldd = subprocess.run(["ldd", str(extracted)], capture_output=True, text=True, check=True).stdout
    libraries = {line.split()[2] for line in ldd.splitlines() if "=>" in line and "/" in line.split("=>")[1]}
    libraries |= {line.split()[0] for line in ldd.splitlines() if line.split() and line.split()[0].startswith("/")}
    assert "/lib64/ld-linux-x86-64.so.2" in libraries and "/lib/x86_64-linux-gnu/libc.so.6" in libraries
    files = {"etc/group", "etc/nsswitch.conf", "etc/passwd", "etc/ssl/certs/ca-certificates.crt",
             "usr/local/bin/apitokens"} | {lib.lstrip("/") for lib in libraries}
    dirs = {str(parent) for name in files for parent in Path(name).parents if str(parent) != "."}
    dirs |= {"tmp", "var", "var/lib"}
    assert {n for n, m in system.items() if m.isfile()} == files
    assert {n for n, m in system.items() if m.isdir()} == dirs
    assert set(system) == files | dirs, "links or other entries in the image"
    assert all((m.uid, m.gid) == (0, 0) for m in system.values())
    assert system["tmp"].mode & 0o7777 == 0o1777
    assert system["usr/local/bin/apitokens"].mode & 0o7777 == 0o755

    # Each library is the one the binary was linked against (the build's glibc).
    for lib in libraries:
        host = Path(os.path.realpath(lib)).read_bytes()
        assert file_bytes(control_plane["layers"][0], lib.lstrip("/")) == host, lib
    # The binary is APITOKENS_BIN, stripped.
    stripped = tmp_path / "stripped"
    subprocess.run(["strip", "-o", str(stripped), str(built["binary"])], check=True)
    assert sha256(binary) == sha256(stripped.read_bytes())

    etc = {name: file_bytes(control_plane["layers"][0], f"etc/{name}").decode() for name in ("passwd", "group", "nsswitch.conf")}
    assert "apitokens:x:65532:65532:" in etc["passwd"] and "apitokens:x:65532:" in etc["group"]
    assert "hosts: files dns" in etc["nsswitch.conf"].splitlines()


# ---------------------------------------------------------------------------
# The filter image: the compat variant Istio's WasmPlugin reads (oci://)


def test_filter_image(filter_image, built):
    manifest, image = filter_image["manifest"], filter_image["image"]
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert manifest["annotations"]["module.wasm.image/variant"] == "compat"
    [(descriptor, blob)] = filter_image["layers"]
    # Istio takes the last layer, a gzip tar (application/vnd.oci.image.layer.v1.tar+gzip).
    assert descriptor["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
    layer = gzip.decompress(blob)
    assert image["rootfs"]["diff_ids"] == ["sha256:" + sha256(layer)]
    files = members(layer)
    assert list(files) == ["plugin.wasm"], "the layer holds exactly plugin.wasm, at the root"
    wasm = files["plugin.wasm"]
    assert wasm.isfile() and (wasm.uid, wasm.gid, wasm.mode & 0o7777) == (0, 0, 0o644)
    assert sha256(file_bytes(layer, "plugin.wasm")) == sha256(built["wasm"].read_bytes())
    assert image["config"]["Labels"]["org.opencontainers.image.version"] == "0.1.0"
    assert not image["config"].get("Entrypoint") and not image["config"].get("Cmd")


# ---------------------------------------------------------------------------
# The control plane run from the image's file system


@pytest.fixture
def rootfs(control_plane, tmp_path):
    """The image's layers unpacked in order, owners and modes kept (as a
    container runtime's storage does)."""
    root = tmp_path / "rootfs"
    root.mkdir()
    for i, layer in enumerate(control_plane["layers"]):
        assert not any("/.wh." in "/" + n for n in members(layer)), "whiteouts in a FROM scratch image"
        path = tmp_path / f"layer{i}.tar"
        path.write_bytes(layer)
        subprocess.run(["tar", "-xpf", str(path), "--numeric-owner", "-C", str(root)], check=True)
        path.unlink()
    # What the runtime mounts: /etc/hosts (Kubernetes writes one per pod).
    (root / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
    return root


class Container:
    """The image's entry point, user, working directory and environment, run
    under chroot in `root` (unshare --root --wd --setuid --setgid, which also
    drops supplementary groups). Ports: the image's 8081 and 9090 become free
    ones (the host's network is shared), and xDS, on 127.0.0.1:18000 by
    default, gets one too."""

    def __init__(self, root: Path, config: dict, env: dict[str, str] | None = None):
        self.root, self.config = root, config
        self.api, self.status, self.xds = free_port(), free_port(), free_port()
        uid, gid = config["User"].split(":")
        self.prefix = ["unshare", f"--root={root}", f"--wd={config['WorkingDir']}", "--setuid", uid, "--setgid", gid, "--"]
        self.env = dict(e.split("=", 1) for e in config.get("Env", []))
        self.env.update(env or {})
        self.proc: subprocess.Popen | None = None
        self.log = root.parent / "serve.log"

    def port(self, image_port: int) -> int:
        return {8081: self.api, 9090: self.status}[image_port]

    def argv(self) -> list[str]:
        args = []
        for arg in self.config["Cmd"]:
            m = re.fullmatch(r"(.+):(8081|9090)", arg)
            args.append(f"{m[1]}:{self.port(int(m[2]))}" if m else arg)
        return self.config["Entrypoint"] + args + ["--xds-listen", f"127.0.0.1:{self.xds}"]

    def run(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        """Another command of the image's binary, as `podman exec` would run it."""
        return subprocess.run(self.prefix + list(args), env=self.env, capture_output=True, text=True,
                              timeout=limit(timeout))

    def start(self) -> "Container":
        self.proc = subprocess.Popen(self.prefix + self.argv(), env=self.env, stdout=subprocess.DEVNULL,
                                     stderr=self.log.open("w"))
        return self

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def get(self, port: int, path: str, token: str | None = None) -> tuple[int, str]:
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=limit(5)) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def wait_healthy(self, timeout: float = 30) -> None:
        def up():
            assert self.proc.poll() is None, f"exited with {self.proc.returncode}:\n{self.output()}"
            try:
                return self.get(self.api, "/healthz")[0] == 200 and self.get(self.status, "/healthz")[0] == 200
            except OSError:
                return False
        poll(up, timeout, "/healthz on the API and status ports", interval=0.05)

    def stop(self) -> None:
        stop_process(self.proc)


@pytest.fixture
def container(rootfs, control_plane):
    made: list[Container] = []

    def make(env: dict[str, str] | None = None) -> Container:
        made.append(Container(rootfs, control_plane["image"]["config"], env))
        return made[-1]
    yield make
    for c in made:
        c.stop()


def bootstrap_and_list(c: Container) -> None:
    """An owner token made by the image's binary (`apitokens bootstrap`, as
    `podman exec` would), then the API listing it once serve runs."""
    made = c.run("/usr/local/bin/apitokens", "bootstrap", "--namespace", "default", "--name", "owner")
    assert made.returncode == 0, made.stderr
    secret = made.stdout.splitlines()[0]
    c.start().wait_healthy()
    status, body = c.get(c.api, "/apitokens/v1/namespaces/default/apitokens", secret)
    assert status == 200, body
    assert "namespaces/default/apitokens/owner" in body


@as_root
def test_entry_point_serves_with_sqlite(container, rootfs):
    """The default store: SQLite, apitokens.db in the working directory, which
    only the image's user may write."""
    c = container()
    bootstrap_and_list(c)
    db = rootfs / "var" / "lib" / "apitokens" / "apitokens.db"
    assert db.exists() and (db.stat().st_uid, db.stat().st_gid) == (65532, 65532)
    status, body = c.get(c.status, "/status")
    assert status == 200, body


@as_root
def test_healthcheck(container, control_plane):
    """The image's HEALTHCHECK command, run in the image: 0 while serve answers, 1 once it is gone."""
    test = control_plane["image"]["config"]["Healthcheck"]["Test"]
    assert test[0] == "CMD"
    c = container()
    argv = [re.sub(r":9090/", f":{c.status}/", arg) for arg in test[1:]]
    c.start().wait_healthy()
    up = c.run(*argv)
    assert up.returncode == 0, up.stdout + up.stderr
    c.stop()
    down = c.run(*argv)
    assert down.returncode == 1, down.stdout + down.stderr


class Dns:
    """A DNS server for one name (A record), on a loopback address of its own, port 53."""

    def __init__(self, name: str, address: str):
        self.name, self.address, self.queries = name, address, []
        for _ in range(20):
            self.ip = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(1, 254)}"
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                self.sock.bind((self.ip, 53))
                break
            except OSError:
                self.sock.close()
        else:
            pytest.fail("no loopback address with port 53 free")
        self.sock.settimeout(0.2)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while not self.done.is_set():
            try:
                data, peer = self.sock.recvfrom(512)
            except socket.timeout:
                continue
            tid = struct.unpack(">H", data[:2])[0]
            i, labels = 12, []
            while data[i]:
                labels.append(data[i + 1:i + 1 + data[i]].decode())
                i += data[i] + 1
            qtype = struct.unpack(">H", data[i + 1:i + 3])[0]
            question, name = data[12:i + 5], ".".join(labels).lower()
            self.queries.append((name, qtype))
            found = name == self.name
            answer = b""
            if found and qtype == 1:
                answer = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + socket.inet_aton(self.address)
            flags = 0x8180 | (0 if found else 3)
            self.sock.sendto(struct.pack(">HHHHHH", tid, flags, 1, 1 if answer else 0, 0, 0) + question + answer, peer)

    def close(self) -> None:
        self.done.set()
        self.thread.join(limit(2))
        self.sock.close()


@as_root
@pytest.mark.parametrize("how", ["etc-hosts", "dns"])
def test_database_host_name_resolves(container, rootfs, how):
    """A PostgreSQL store by host name: getaddrinfo with only what the image
    holds (nsswitch.conf, glibc's built-in files and dns), through /etc/hosts
    (Kubernetes hostAliases) and through a DNS server in /etc/resolv.conf (a
    Service's name). The name points at a listener here, which must receive
    PostgreSQL's first message."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    port = listener.getsockname()[1]
    dns = None
    if how == "etc-hosts":
        (rootfs / "etc" / "hosts").write_text(f"127.0.0.1 localhost\n127.0.0.1 {DB_NAME}\n")
    else:
        dns = Dns(DB_NAME, "127.0.0.1")
        (rootfs / "etc" / "resolv.conf").write_text(f"nameserver {dns.ip}\noptions timeout:1 attempts:2\n")
    try:
        c = container({"APITOKENS_STORE": f"postgres://apitokens@{DB_NAME}:{port}/apitokens?sslmode=disable"}).start()

        def accepted():
            assert c.proc.poll() is None, f"exited with {c.proc.returncode}:\n{c.output()}"
            try:
                return listener.accept()[0]
            except socket.timeout:
                return None
        conn = poll(accepted, 20, f"a connection to {DB_NAME}:{port}", interval=0)
        with conn:
            conn.settimeout(limit(5))
            first = conn.recv(8)
        length, version = struct.unpack(">II", first)
        assert version == 196608, f"not a PostgreSQL startup message: {first!r}"  # protocol 3.0
        if dns:
            assert (DB_NAME, 1) in dns.queries
    finally:
        listener.close()
        if dns:
            dns.close()


@as_root
def test_postgres_store_by_host_name(container, rootfs):
    """The whole way: serve on the private PostgreSQL server, named in /etc/hosts."""
    if postgres.missing():
        if os.environ.get("APITOKENS_REQUIRE_POSTGRES") == "1":
            pytest.fail("no PostgreSQL: " + ", ".join(postgres.missing()))
        pytest.skip("no PostgreSQL (run under scripts/postgres.sh run --)")
    pg = postgres.Postgres()
    database = f"images_{int(time.time() * 1000)}"
    pg.create_database(database)
    (rootfs / "etc" / "hosts").write_text(f"127.0.0.1 localhost\n{pg.host} {DB_NAME}\n")
    url = f"postgres://{pg.user}@{DB_NAME}:{pg.port}/{database}?sslmode=disable"
    c = container({"APITOKENS_STORE": url})
    bootstrap_and_list(c)
    assert not (rootfs / "var" / "lib" / "apitokens" / "apitokens.db").exists()
