"""The single-host variant without gRPC: the control plane writes the ECDS
resource to a file (atomic rename) that Envoy watches."""

from __future__ import annotations

import time

import pytest

from testkit.controlplane import (
    APP,
    MEASUREMENTS,
    create,
    file_plane,
    from_file,
    shipped_envoy,
    tokens_path,
    until_status,
)
from testkit.harness import poll


@pytest.fixture(scope="module")
def file_setup(workdir, upstream):
    cp, ecds_file, owner = file_plane(workdir, "cp-file")
    assert ecds_file.exists()
    envoy = shipped_envoy(workdir / "envoy-file", cp, upstream.server_address[1], node="e2e-envoy-file",
                          mutate=from_file(ecds_file))
    envoy.start()
    yield cp, envoy, owner, ecds_file
    envoy.stop()
    cp.stop()


def test_file_variant_lifecycle(file_setup):
    cp, envoy, owner, ecds_file = file_setup
    until_status(envoy, tokens_path(), owner, 200, timeout=10)
    st = cp.status()
    assert st["file"]["path"] == str(ecds_file) and st["file"]["writtenVersion"] == st["version"]
    assert st["applied"] is True
    for i in range(3):
        r = create(envoy.port, owner, f"file-{i}", "viewer")
        assert r.status == 200, r
        secret = r.json()["apiToken"]["secret"]
        until_status(envoy, APP, secret, 200, timeout=10)
        assert envoy.get(tokens_path(token=f"file-{i}"), owner, method="DELETE").status == 200
        t_answer = time.monotonic()
        until_status(envoy, APP, secret, 401, timeout=10)
        MEASUREMENTS.setdefault("revoke, file ECDS", []).append(time.monotonic() - t_answer)
    # No temporary files left next to the watched one.
    assert sorted(p.name for p in ecds_file.parent.glob("*apitokens-ecds*")) == ["apitokens-ecds.pb"]
    poll(lambda: cp.status()["file"]["writtenVersion"] == cp.status()["version"], 5, "file written")
