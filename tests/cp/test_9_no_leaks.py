"""Runs last: no secret issued in this session appears in any log, the
database files, the ECDS file, Envoy's config_dump, stats or the status page."""

from __future__ import annotations

import hashlib
from pathlib import Path

from conftest import SECRETS, request
from leaks import exposed, leaks


def test_no_secret_anywhere(workdir, envoy, cp):
    assert len(SECRETS) >= 15, "the lifecycle tests issue tokens first"
    places = exposed([workdir], {"envoy": envoy.admin_get},
                     {"status": request(cp.api_port, "GET", "/status").body.decode()})
    names = {Path(p).name for p in places}
    # The places searched really exist: logs, database and its WAL, ECDS file.
    assert {"apitokens.db", "apitokens-ecds.pb", "envoy.log", "access.log"} <= names, names
    assert any(n.endswith("-wal") for n in names) or any(n.startswith("serve-") for n in names)
    # What Envoy has is digests (raw bytes in the compact encoding the control
    # plane pushes): the search reads the payload, and would find a leaked value.
    digest = hashlib.sha256(cp.owner.encode()).digest().decode("latin-1")
    assert digest in places["envoy /config_dump?resource=ecds_filters (decoded BytesValue)"]
    assert leaks(places, SECRETS) == []
