"""Runs last: no secret issued in this session appears in any log, the
database files, the ECDS file, Envoy's config_dump, stats or the status page."""

from __future__ import annotations

import hashlib

from testkit.harness import SECRETS
from testkit.leaks import search_run


def test_no_secret_anywhere(workdir, envoy, cp):
    assert len(SECRETS) >= 15, "the lifecycle tests issue tokens first"
    # The places searched really exist: logs, database and its WAL, ECDS file.
    places = search_run(workdir, envoy, cp, SECRETS, {"apitokens.db", "apitokens-ecds.pb", "envoy.log", "access.log"})
    assert any(n.endswith("-wal") for n in places) or any("serve-" in n for n in places)
    # What Envoy has is digests (raw bytes in the compact encoding the control
    # plane pushes): the search reads the payload, and would find a leaked value.
    digest = hashlib.sha256(cp.owner.encode()).digest().decode("latin-1")
    assert digest in places["envoy /config_dump?resource=ecds_filters (decoded BytesValue)"]
