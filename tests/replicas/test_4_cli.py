"""The command line on PostgreSQL: `--store` or APITOKENS_STORE for
bootstrap, import and render; a password in the URL is never shown (errors,
--help); `--store` and `--db` exclude each other; `sqlite:PATH` is a file."""

from __future__ import annotations

import json
import os
import secrets
import subprocess

from testkit.controlplane import apitokens_bin
from testkit.harness import Token, plugin_config, remember_secret, sha256_hex
from testkit.timing import limit


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([apitokens_bin(), *args], capture_output=True, text=True, timeout=limit(60),
                          env={**os.environ, **(env or {})})


def test_bootstrap_import_and_render_through_apitokens_store(pg, workdir):
    url = pg.create_database("cli")
    env = {"APITOKENS_STORE": url}
    out = run("bootstrap", "--namespace", "cli", "--name", "admin", env=env)
    assert out.returncode == 0, out.stderr
    owner = remember_secret(out.stdout.strip())
    assert f"@{pg.host}:{pg.port}/cli" in out.stderr
    tokens = [Token("cli", f"imported-{i}", "viewer") for i in range(3)]
    conf = workdir / "cli-import.json"
    conf.write_text(json.dumps(plugin_config(tokens)))
    out = run("import", str(conf), env=env)
    assert out.returncode == 0 and "Imported 3 tokens into postgres://" in out.stderr, out.stderr
    out = run("render", "--store", url)
    assert out.returncode == 0, out.stderr
    rendered = {t["name"]: t["secretSha256"] for t in json.loads(out.stdout)["tokens"]}
    assert rendered == {"namespaces/cli/apitokens/admin": sha256_hex(owner),
                        **{t.name: sha256_hex(t.secret) for t in tokens}}
    # The same import again: all or nothing, and said so.
    out = run("import", str(conf), env=env)
    assert out.returncode == 1 and "nothing was imported" in out.stderr


def test_sqlite_urls_and_the_choice_between_store_and_db(workdir):
    db = workdir / "cli.db"
    out = run("bootstrap", "--store", f"sqlite:{db}", "--namespace", "lite", "--name", "admin")
    assert out.returncode == 0, out.stderr
    remember_secret(out.stdout.strip())
    assert db.exists() and str(db) in out.stderr
    out = run("render", "--store", f"sqlite:{workdir / 'missing.db'}")
    assert out.returncode == 1 and "no database" in out.stderr
    out = run("render", "--store", f"sqlite:{db}", "--db", str(db))
    assert out.returncode == 2 and "cannot be used with" in out.stderr


def test_a_password_in_the_url_is_never_shown():
    password = remember_secret("pw-" + secrets.token_hex(12))
    url = f"postgres://apitokens:{password}@127.0.0.1:1/nowhere?sslmode=disable"
    out = run("bootstrap", "--store", url, "--namespace", "x", "--name", "admin")
    assert out.returncode == 1 and "--store" in out.stderr, out.stderr
    assert password not in out.stdout + out.stderr
    out = run("serve", "--help", env={"APITOKENS_STORE": url})
    assert out.returncode == 0 and "APITOKENS_STORE" in out.stdout
    assert password not in out.stdout
    out = run("serve", "--listen", "127.0.0.1:0", "--xds-listen", "127.0.0.1:0", env={"APITOKENS_STORE": url})
    assert out.returncode == 1 and password not in out.stdout + out.stderr, out.stderr
    bad = url.replace("sslmode=disable", "sslmode=sometimes")
    out = run("render", "--store", bad)
    assert out.returncode == 1 and "sslmode" in out.stderr and password not in out.stderr, out.stderr
