"""Runs last: no secret issued in this session appears in any log, the
database files, the ECDS file, Envoy's config_dump, stats or the status page."""

from __future__ import annotations

import hashlib

from conftest import SECRETS, request


def test_no_secret_anywhere(workdir, envoy, cp):
    assert len(SECRETS) >= 15, "the lifecycle tests issue tokens first"
    exposed = {
        "config_dump": envoy.admin_get("/config_dump?include_eds"),
        "ecds_filters": envoy.admin_get("/config_dump?resource=ecds_filters"),
        "stats": envoy.admin_get("/stats"),
        "prometheus": envoy.admin_get("/stats/prometheus"),
        "status": request(cp.api_port, "GET", "/status").body.decode(),
    }
    files = [p for p in workdir.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    # The places searched really exist: logs, database and its WAL, ECDS file.
    assert {"apitokens.db", "apitokens-ecds.pb", "envoy.log", "access.log"} <= names, names
    assert any(n.endswith("-wal") for n in names) or any(n.startswith("serve-") for n in names)
    for p in files:
        exposed[str(p)] = p.read_bytes().decode("latin-1")
    # What Envoy has is digests: the search would find a leaked value.
    digest = hashlib.sha256(cp.owner.encode()).hexdigest()
    assert digest in exposed["ecds_filters"]
    for where, text in exposed.items():
        for secret in SECRETS:
            assert secret not in text, f"a secret leaked into {where}"
            # Also the random part alone (e.g. a log that cut the prefix).
            if secret.startswith("apt_"):
                assert secret[4:36] not in text, f"a secret's random part leaked into {where}"
