"""The `apitokens` command line: help, errors a person understands, render,
bootstrap and import (migrating existing secrets by digest)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import uuid

import yaml

from testkit.controlplane import APP, REPO, apitokens_bin, create, free_port, issued_secret, tokens_path, until_status
from testkit.harness import envoy_bin, remember_secret
from testkit.timing import limit


def run(*args, check=False):
    return subprocess.run([apitokens_bin(), *args], capture_output=True, text=True, timeout=limit(30), check=check)


def test_help_for_every_command():
    out = run("--help", check=True).stdout
    for cmd in ("serve", "bootstrap", "render", "import", "new-epoch"):
        assert cmd in out
        sub = run(cmd, "--help", check=True).stdout
        assert "--db" in sub or "FILE" in sub
    assert "--ecds-file" in run("serve", "--help").stdout
    assert "--wasm-module" in run("serve", "--help").stdout


def test_understandable_errors(tmp_path):
    db = str(tmp_path / "x.db")
    r = run("bootstrap", "--db", db, "--namespace", "Not Valid", "--name", "a")
    assert r.returncode == 1 and "--namespace must be a DNS label" in r.stderr
    r = run("bootstrap", "--db", db, "--namespace", "ns")
    assert r.returncode == 2 and "--name" in r.stderr
    r = run("bootstrap", "--db", db, "--namespace", "ns", "--name", "a", "--expire-time", "2001-01-01T00:00:00Z")
    assert r.returncode == 1 and "in the future" in r.stderr
    assert run("bootstrap", "--db", db, "--namespace", "ns", "--name", "a").returncode == 0
    r = run("bootstrap", "--db", db, "--namespace", "ns", "--name", "a")
    assert r.returncode == 1 and "already exists" in r.stderr
    r = run("render", "--db", str(tmp_path / "missing.db"))
    assert r.returncode == 1 and "no database" in r.stderr
    r = run("serve", "--db", db, "--no-xds")
    assert r.returncode == 1 and "--ecds-file" in r.stderr
    r = run("serve", "--db", db, "--ecds-file", str(tmp_path / "x.json"))
    assert r.returncode == 1 and ".pb" in r.stderr
    bad = tmp_path / "base.json"
    bad.write_text('{"realm": "a\\"b"}')
    r = run("serve", "--db", db, "--plugin-config", str(bad))
    assert r.returncode == 1 and "realm" in r.stderr
    # A port in use.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run("serve", "--db", db, "--listen", f"127.0.0.1:{port}", "--xds-listen", f"127.0.0.1:{free_port()}")
    assert r.returncode == 1 and f"--listen 127.0.0.1:{port}" in r.stderr
    for r in (run("frobnicate"), run("serve", "--listen", "nowhere")):
        assert r.returncode == 2 and "error" in r.stderr



def test_the_store_url_from_a_file_keeps_the_password_out_of_the_process_list(tmp_path):
    # A URL in a file (a mounted Secret): a SQLite store here, the same path.
    db = tmp_path / "from-file.db"
    url_file = tmp_path / "store-url"
    url_file.write_text(f"sqlite:{db}\n")
    r = run("bootstrap", "--store-file", str(url_file), "--namespace", "ns", "--name", "first")
    assert r.returncode == 0, r.stderr
    remember_secret(r.stdout.strip())
    assert db.exists()
    r = run("render", "--store-file", str(url_file))
    assert r.returncode == 0 and "namespaces/ns/apitokens/first" in r.stdout
    # One place only.
    r = run("render", "--store-file", str(url_file), "--db", str(db))
    assert r.returncode == 2 and "cannot be used with" in r.stderr
    r = run("render", "--store-file", str(tmp_path / "nowhere"))
    assert r.returncode == 1 and "--store-file" in r.stderr
    # A password on the command line is named as the risk it is, never shown.
    secret = "pw-" + uuid.uuid4().hex
    r = run("render", "--store", f"postgres://apitokens:{secret}@127.0.0.1:{free_port()}/x?connect_timeout=1")
    assert r.returncode == 1 and "--store-file" in r.stderr and "command line" in r.stderr, r.stderr
    assert secret not in r.stderr + r.stdout

def test_render_json_and_wasmplugin(cp, tmp_path):
    # A token that expired (imported: the API takes only future expiries).
    expired = remember_secret(str(uuid.uuid4()))
    f = tmp_path / "expired.json"
    f.write_text(json.dumps({"tokens": [{"name": "namespaces/default/apitokens/render-expired", "role": "viewer",
                                         "secretSha256": hashlib.sha256(expired.encode()).hexdigest(),
                                         "expireTime": "2020-01-01T00:00:00Z"}]}))
    r = run("import", "--db", str(cp.db), str(f))
    assert r.returncode == 0, r.stderr
    out = run("render", "--db", str(cp.db), "--plugin-config", "envoy/ecds-plugin-base.json", check=True).stdout
    spec = json.loads(out)
    names = [t["name"] for t in spec["tokens"]]
    assert "namespaces/default/apitokens/admin" in names
    assert "namespaces/default/apitokens/render-expired" not in names, "expired tokens are left out"
    assert spec["realm"] == "apitokens" and "forwardAuthorization" not in spec
    assert all(len(t["secretSha256"]) == 64 for t in spec["tokens"])
    doc = yaml.safe_load(run("render", "--db", str(cp.db), "--format", "wasmplugin", check=True).stdout)
    assert doc["kind"] == "WasmPlugin" and doc["spec"]["failStrategy"] == "FAIL_CLOSE"
    assert [t["name"] for t in doc["spec"]["pluginConfig"]["tokens"]] == names
    assert "sha256" not in doc["spec"]
    # Pinned to the module Istio will fetch.
    module = REPO / "target/wasm32-wasip1/release/apitokens_filter.wasm"
    doc = yaml.safe_load(run("render", "--db", str(cp.db), "--format", "wasmplugin", "--wasm-module", str(module),
                             check=True).stdout)
    assert doc["spec"]["sha256"] == hashlib.sha256(module.read_bytes()).hexdigest()


def test_import_existing_uuid_secrets_by_digest(envoy, cp, owner, tmp_path):
    legacy = str(uuid.uuid4())
    remember_secret(legacy)
    spec = {"tokens": [{"name": "namespaces/default/apitokens/legacy", "role": "editor",
                        "secretSha256": hashlib.sha256(legacy.encode()).hexdigest()}]}
    f = tmp_path / "legacy.json"
    f.write_text(json.dumps(spec))
    r = run("import", "--db", str(cp.db), str(f))
    assert r.returncode == 0, r.stderr
    assert "Imported 1 tokens" in r.stderr
    # The running server notices the other process's write; Envoy enforces it.
    until_status(envoy, APP, legacy, 200, timeout=10)
    assert envoy.get(APP, legacy, method="POST", body={}).status == 200
    assert envoy.get(tokens_path(), legacy).status == 403
    # Importing again is refused as a whole.
    r = run("import", "--db", str(cp.db), str(f))
    assert r.returncode == 1 and "nothing was imported" in r.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('{"tokens": [{"name": "x", "role": "editor", "secretSha256": "00"}]}')
    r = run("import", "--db", str(cp.db), str(bad))
    assert r.returncode == 1 and "tokens[0].name" in r.stderr


def test_an_import_of_another_tokens_previous_secret_is_refused_and_writes_go_on(envoy, cp, owner, tmp_path):
    """One imported digest equal to a token's previous (overlap) secret would
    make every table the publisher builds invalid, and every write (every
    revocation) answer 503: refused, naming the entry, nothing imported."""
    old = issued_secret(create(cp.api_port, owner, "overlapping", "viewer"))
    r = cp.api("POST", tokens_path(token="overlapping") + ":regenerate", owner, {"previousSecretTtl": "600s"})
    assert r.status == 200, r
    issued_secret(r)
    fine = remember_secret(str(uuid.uuid4()))
    spec = {"tokens": [
        {"name": "namespaces/default/apitokens/import-fine", "role": "viewer",
         "secretSha256": hashlib.sha256(fine.encode()).hexdigest()},
        {"name": "namespaces/default/apitokens/import-clash", "role": "owner",
         "secretSha256": hashlib.sha256(old.encode()).hexdigest()},
    ]}
    f = tmp_path / "clash.json"
    f.write_text(json.dumps(spec))
    r = run("import", "--db", str(cp.db), str(f))
    assert r.returncode == 1, r.stderr
    assert "tokens[1].secretSha256" in r.stderr and "namespaces/default/apitokens/overlapping" in r.stderr, r.stderr
    names = [t["name"] for t in cp.api("GET", tokens_path(), owner).json()["apiTokens"]]
    assert not any(n.endswith("/import-fine") or n.endswith("/import-clash") for n in names)
    # Writes go on; the old secret still works for its overlap, as before.
    assert envoy.get(APP, old).status == 200
    r = cp.api("DELETE", tokens_path(token="overlapping"), owner)
    assert r.status == 200 and r.headers["x-apitokens-applied"] == "true", r
    assert envoy.get(APP, old).status == 401


def test_shipped_ecds_config_validates():
    r = subprocess.run([envoy_bin(), "--mode", "validate", "-c", "envoy/envoy-ecds.yaml"], cwd=REPO,
                       capture_output=True, text=True, timeout=limit(60))
    assert r.returncode == 0 and "OK" in r.stdout + r.stderr, (r.stdout + r.stderr)[-3000:]
