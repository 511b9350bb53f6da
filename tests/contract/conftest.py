"""The token API's contract (control-plane/openapi.json) checked against a real
`apitokens serve`: the document is valid OpenAPI 3.1, keeps VVP's shapes and
names every route the server has (test_1); schemathesis calls every
operation with generated requests as ten callers and checks every answer
against the document (test_2); the answers schemathesis does not provoke are
checked one by one (test_3).

The control plane holds 3,001 tokens (`apitokens import`, well under a
second): 1,001 in `default` (where the generated calls are steered), 1,900
in `full` (exactly the token quota, --max-tokens-per-namespace: a create
there is a 429), 100 in ten more namespaces; plus the callers' own tokens
(callers.py). It runs without a write rate (--namespace-writes-per-second
0: the generated calls write as fast as they can; test_3 starts a plane of
its own with one) and without an Envoy: write answers say
`x-apitokens-applied: true` and `x-apitokens-envoys: 0/0`.

Environment: APITOKENS_BIN (default <repo>/target/debug/apitokens).
No secret is ever printed: failure messages go through `oas.redact`.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis.configuration import set_hypothesis_home_dir

import oas
from callers import QUOTA, SEEDED_DEFAULT, SEEDED_TOTAL, Credentials, apt_secret
from testkit.clients import request
from testkit.controlplane import ControlPlane, apitokens_bin, tokens_path
from testkit.harness import remember_secret
from testkit.timing import limit


# Hypothesis keeps no example database here (settings database=None), but
# caches Unicode tables in its home directory: outside the repository.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "apitokens-contract-hypothesis")


def pytest_report_header(config):
    return [f"apitokens: {apitokens_bin()}"]


def pytest_sessionstart(session):
    if not os.path.exists(apitokens_bin()):
        raise pytest.UsageError(f"missing {apitokens_bin()} (make cp-build, or set APITOKENS_BIN)")


def pytest_terminal_summary(terminalreporter):
    if oas.SEEN:
        terminalreporter.section("generated calls: answers by operation and status")
        by_op: dict[str, list[str]] = {}
        for (op, status), n in sorted(oas.SEEN.items()):
            by_op.setdefault(op, []).append(f"{status}x{n}")
        for op, counts in by_op.items():
            terminalreporter.write_line(f"{op}: {' '.join(counts)}")


@pytest.fixture(scope="session")
def document() -> oas.Document:
    return oas.Document(oas.load())


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("contract")


def seed(plane: ControlPlane, expired_secret: str) -> None:
    """3,000 tokens by digest (their secrets are thrown away): some expire
    later, some expired already, every role; and an owner of `default` that
    expired in 2021, whose secret the suite keeps."""
    tokens = [{"name": "namespaces/default/apitokens/contract-expired-x7", "role": "owner",
               "secretSha256": hashlib.sha256(expired_secret.encode()).hexdigest(),
               "expireTime": "2021-01-01T00:00:00Z"}]
    roles = ("viewer", "editor", "owner")
    for i in range(SEEDED_TOTAL):
        ns = "default" if i < SEEDED_DEFAULT else "full" if i < SEEDED_DEFAULT + QUOTA else f"ns-{i % 10}"
        t = {"name": f"namespaces/{ns}/apitokens/seed-{i:04d}", "role": roles[i % 3],
             "secretSha256": hashlib.sha256(secrets.token_bytes(32)).hexdigest()}
        if i % 4 == 1:
            t["expireTime"] = "2031-01-01T00:00:00Z"
        elif i % 4 == 2:
            t["expireTime"] = "2020-01-01T00:00:00.5Z"
        tokens.append(t)
    conf = plane.dir / "seed.json"
    conf.write_text(json.dumps({"tokens": tokens}))
    subprocess.run([apitokens_bin(), "import", str(conf), *plane.store_args()],
                   capture_output=True, check=True, timeout=limit(60))


def created(plane: ControlPlane, owner: str, token: str, role: str, **extra) -> str:
    """A new token of `default`: its secret (remembered)."""
    body = {"name": f"namespaces/default/apitokens/{token}", "role": role, **extra}
    r = request(plane.api_port, "POST", tokens_path("default"), owner, body)
    assert r.status == 200, f"create {token}: {r.status}"
    return remember_secret(r.json()["apiToken"]["secret"])


@pytest.fixture(scope="session")
def plane(workdir):
    """The control plane, its store seeded, with `creds` (caller -> secret:
    the callers of callers.ORDER, and the owner of `full`)."""
    cp = ControlPlane(workdir / "cp", always=(
        "--namespace-writes-per-second", "0",
        "--max-tokens-per-namespace", str(QUOTA),
        # Leak reports: the generated ones get real answers (each at least
        # 250 ms), then the 429s of their rate.
        "--leak-report-burst", "40", "--leak-reports-per-second", "0.01",
    ))
    owner = cp.bootstrap("default", "admin")
    other = cp.bootstrap("other", "admin")
    full = cp.bootstrap("full", "admin")
    expired = apt_secret()
    seed(cp, expired)
    cp.start()
    creds = Credentials({"owner": owner, "other-namespace owner": other, "expired owner": expired,
                         "unknown secret": apt_secret(), "mistyped secret": apt_secret(checksum_ok=False),
                         "owner of full": full})
    creds["viewer"] = created(cp, owner, "contract-viewer-x7", "viewer")
    creds["editor"] = created(cp, owner, "contract-editor-x7", "editor")
    creds["previous secret"] = created(cp, owner, "contract-rotated-x7", "owner")
    r = request(cp.api_port, "POST", tokens_path("default", "contract-rotated-x7") + ":regenerate", owner,
                {"previousSecretTtl": "3600s"})
    assert r.status == 200, r.status
    remember_secret(r.json()["apiToken"]["secret"])
    in_an_hour = (datetime.now(timezone.utc) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    creds["short-lived owner"] = created(cp, owner, "contract-short-x7", "owner", expireTime=in_an_hour)
    cp.creds = creds  # type: ignore[attr-defined]
    yield cp
    cp.stop()


@pytest.fixture(scope="session")
def creds(plane) -> Credentials:
    return plane.creds


@pytest.fixture(scope="session")
def base_url(plane) -> str:
    return f"http://127.0.0.1:{plane.api_port}"
