"""The final secret search of the end-to-end suites: every secret a suite
issued must be absent from every log, access log, database file, Envoy admin
endpoint and control-plane page it could have reached."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Callable, Iterable

from testkit.clients import request

# What an Envoy's admin interface shows that could carry a secret.
ADMIN_ENDPOINTS = (
    "/config_dump?include_eds",
    "/config_dump?resource=ecds_filters",
    "/stats",
    "/stats/prometheus",
    "/clusters",
    "/listeners",
)


def exposed(
    dirs: Iterable[Path] = (),
    admins: dict[str, Callable[[str], str]] | None = None,
    texts: dict[str, str] | None = None,
) -> dict[str, str]:
    """Everything to search, by where it came from: every file under `dirs`
    (logs, access logs, databases and their WAL, ECDS files; read as bytes),
    each Envoy's admin endpoints (`admins`: name -> admin GET function), and
    `texts` (responses, status pages)."""
    out = dict(texts or {})
    for name, admin_get in (admins or {}).items():
        for endpoint in ADMIN_ENDPOINTS:
            out[f"{name} {endpoint}"] = text = admin_get(endpoint)
            if endpoint.startswith("/config_dump"):
                # The control plane pushes the compact (binary) encoding as a
                # BytesValue, which config_dump shows in base64: search it decoded.
                out[f"{name} {endpoint} (decoded BytesValue)"] = decoded_bytes_values(text)
    for d in dirs:
        for p in sorted(d.rglob("*")):
            if p.is_file():
                out[str(p)] = p.read_bytes().decode("latin-1")
    return out


def decoded_bytes_values(config_dump: str) -> str:
    """Every google.protobuf.BytesValue in a config_dump, decoded (latin-1)."""
    found: list[str] = []

    def walk(node) -> None:
        if isinstance(node, dict):
            if node.get("@type") == "type.googleapis.com/google.protobuf.BytesValue":
                found.append(base64.b64decode(node.get("value", "")).decode("latin-1"))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    try:
        walk(json.loads(config_dump))
    except ValueError:
        pass
    return "\n".join(found)


def leaks(places: dict[str, str], secrets: Iterable[str]) -> list[str]:
    """Where a secret (or, for `apt_` secrets, its 32-character random part
    alone) appears: an empty list is a clean run."""
    found = []
    for where, text in places.items():
        for secret in secrets:
            if secret in text:
                found.append(f"a secret in {where}")
            elif secret.startswith("apt_") and secret[4:36] in text:
                found.append(f"a secret's random part in {where}")
    return found


def search_run(workdir: Path, envoy, cp, secrets: list[str], must_exist: set[str],
               texts: dict[str, str] | None = None) -> dict[str, str]:
    """The final search of a suite: every file under `workdir`, the Envoy's
    admin endpoints, the control plane's /status and `texts`; `must_exist`
    names files that the search has to have read (so that it searched
    something). Fails on any hit; returns what it searched."""
    status = request(cp.api_port, "GET", "/status").body.decode()
    places = exposed([workdir], {"envoy": envoy.admin_get}, {"status": status, **(texts or {})})
    names = {Path(p).name for p in places}
    assert must_exist <= names, f"not searched: {must_exist - names}"
    assert leaks(places, secrets) == []
    return places
