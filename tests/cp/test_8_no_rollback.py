"""Once revoked, always revoked: no Envoy is ever moved back to a table it
replaced. A control plane serving an older copy of the store (a restored
backup) holds the Envoys that enforce a newer version and refuses writes
until an operator accepts the store (`apitokens new-epoch`); the filter
itself refuses an older table, whether Envoy asks it (NACK) or not.

Real components: the control plane on a SQLite file copied with SQLite's
backup API while it runs, Envoy 1.40 on ECDS over gRPC and from a file."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from testkit.controlplane import (
    APP,
    ControlPlane,
    apitokens_bin,
    create,
    file_plane,
    from_file,
    issued_secret,
    shipped_envoy,
    tokens_path,
    until_status,
    version_of,
)
from testkit.harness import poll
from testkit.timing import limit

# How long the restored control plane is watched admitting nothing it must not.
WATCH = 3.0


def backup(db: Path, to: Path) -> None:
    """A consistent copy of a live SQLite store (WAL included), as an operator's backup."""
    src = sqlite3.connect(db)
    dst = sqlite3.connect(to)
    with dst:
        src.backup(dst)
    src.close()
    dst.close()


def restore(copy: Path, db: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    shutil.copy(copy, db)


def watch(envoy, checks: dict[str, tuple[str, int]], seconds: float) -> dict[str, list[int]]:
    """Every `seconds`, each check (secret, expected status) as fast as it goes:
    the statuses seen per check."""
    seen: dict[str, list[int]] = {name: [] for name in checks}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for name, (secret, _) in checks.items():
            seen[name].append(envoy.get(APP, secret).status)
    return seen


@pytest.fixture(scope="module")
def stale_setup(workdir, upstream):
    cp = ControlPlane(workdir / "cp-rollback", name="cp-rollback")
    owner = cp.bootstrap("default", "admin")
    cp.start()
    envoy = shipped_envoy(workdir / "envoy-rollback", cp, upstream.server_address[1], node="rollback-envoy").start()
    poll(lambda: cp.envoy_status(envoy.node).get("ackedVersion"), 15, "first ACK")
    yield cp, envoy, owner
    envoy.stop()
    cp.stop()


def test_a_restored_backup_brings_no_revoked_token_back(stale_setup, workdir):
    cp, envoy, owner = stale_setup
    victim = issued_secret(create(cp.api_port, owner, "victim", "editor"))
    r = create(cp.api_port, owner, "rotated", "editor")
    old_secret = issued_secret(r)
    cp.wait_applied(version_of(r))
    copy = workdir / "rollback-backup.db"
    backup(cp.db, copy)

    # After the backup: a revocation and a regeneration, both enforced.
    r = cp.api("DELETE", tokens_path(token="victim"), owner)
    assert r.status == 200 and r.headers["x-apitokens-applied"] == "true", r
    r = cp.api("POST", tokens_path(token="rotated") + ":regenerate", owner)
    assert r.status == 200 and r.headers["x-apitokens-applied"] == "true", r
    new_secret = issued_secret(r)
    enforced = version_of(r)
    assert envoy.get(APP, victim).status == 401 and envoy.get(APP, old_secret).status == 401

    # The control plane comes back on the backup: two revisions behind.
    cp.stop()
    restore(copy, cp.db)
    cp.start()
    poll(lambda: cp.envoy_status(envoy.node).get("connected"), 15, "the Envoy reconnected")
    seen = watch(envoy, {"revoked": (victim, 401), "replaced": (old_secret, 401), "new": (new_secret, 200)}, WATCH)
    assert all(s == 401 for s in seen["revoked"]), f"the revoked token was admitted: {seen['revoked']}"
    assert all(s == 401 for s in seen["replaced"]), f"the replaced secret was admitted: {seen['replaced']}"
    assert all(s == 200 for s in seen["new"]), f"the current secret was refused: {seen['new']}"
    assert len(seen["revoked"]) >= 20

    status = cp.status()
    held = cp.envoy_status(envoy.node)
    assert held["connected"] and held["held"] and "ackedVersion" not in held, held
    assert held["initialVersion"].endswith(f".{enforced}"), held
    assert int(status["version"]) < enforced
    assert status["behind"] == {"version": str(enforced), "epoch": held["initialVersion"].split(".")[0]}, status
    # The Envoy's ECDS stream, or each of its VMs on the delta channel.
    assert {l["reason"] for l in status["lagging"]} == {"held"}, status
    assert "nothing is sent to it" in cp.log_text()

    # Every write is refused: a new write would reuse the lost history's
    # revisions. The answer says what happened and what to do.
    r = create(cp.api_port, owner, "during", "viewer")
    assert r.status == 503, r
    assert "behind" in r.json()["message"] and "apitokens new-epoch" in r.json()["message"], r.json()
    r = cp.api("DELETE", tokens_path(token="victim"), owner)
    assert r.status == 503, r

    # The operator accepts the store as it is: a new epoch, which every
    # Envoy takes (the backup's tokens: the victim is back until revoked again).
    out = subprocess.run([apitokens_bin(), "new-epoch", "--db", str(cp.db)], capture_output=True, text=True,
                         timeout=limit(30))
    assert out.returncode == 0, out.stderr
    assert "Started epoch" in out.stderr and "revoke them again" in out.stderr, out.stderr
    poll(lambda: cp.status()["behind"] is None, 10, "the store accepted")
    until_status(envoy, APP, victim, 200, timeout=10)
    # The workers enforce the new epoch a moment before its ACK reaches the
    # control plane.
    held = poll(lambda: (st := cp.envoy_status(envoy.node)).get("ackedEpoch") and st, 5, "the new epoch's ACK")
    assert not held.get("held") and held["ackedEpoch"] != held["initialVersion"].split(".")[0], held
    r = cp.api("DELETE", tokens_path(token="victim"), owner)
    assert r.status == 200 and r.headers["x-apitokens-applied"] == "true", r
    assert envoy.get(APP, victim).status == 401
    # A second new epoch is not needed, and refused without --force.
    out = subprocess.run([apitokens_bin(), "new-epoch", "--db", str(cp.db)], capture_output=True, text=True,
                         timeout=limit(30))
    assert out.returncode != 0 and "no need" in out.stderr, out.stderr


@pytest.fixture(scope="module")
def file_setup(workdir, upstream):
    cp, ecds_file, owner = file_plane(workdir, "cp-older")

    def envoy(node: str):
        return shipped_envoy(workdir / node, cp, upstream.server_address[1], node=node, mutate=from_file(ecds_file))

    yield cp, ecds_file, owner, envoy
    cp.stop()


def replace_file(path: Path, content: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(content)
    os.replace(tmp, path)


def config_fails(envoy) -> int:
    return sum(v for k, v in envoy.stats().items() if "apitokens" in k and k.endswith(".config_fail"))


def config_updates(envoy) -> int:
    """ECDS updates of the filter Envoy took in, applied or rejected."""
    return sum(v for k, v in envoy.stats().items()
               if "apitokens" in k and (k.endswith(".config_reload") or k.endswith(".config_fail")))


def test_the_filter_never_takes_an_older_table(file_setup):
    """Whatever a control plane sends: an Envoy that validated the older
    table before keeps enforcing the newer one (its VMs keep it), one that
    never saw it refuses it (NACK)."""
    cp, ecds_file, owner, make_envoy = file_setup
    seen_before = make_envoy("older-seen").start()
    r = create(cp.api_port, owner, "gone", "editor")
    secret = issued_secret(r)
    poll(lambda: cp.status()["file"].get("writtenVersion") == str(version_of(r)), 10, "file written")
    until_status(seen_before, APP, secret, 200, timeout=10)
    older = ecds_file.read_bytes()
    assert cp.api("DELETE", tokens_path(token="gone"), owner).status == 200
    until_status(seen_before, APP, secret, 401, timeout=10)
    newer = ecds_file.read_bytes()
    never_seen = make_envoy("older-never-seen").start()
    until_status(never_seen, tokens_path(), owner, 200, timeout=10)
    assert never_seen.get(APP, secret).status == 401
    cp.stop()  # nothing rewrites the file from now on

    offsets = {e.name: e.log_offset() for e in (seen_before, never_seen)}
    fails = config_fails(never_seen)
    updates = {e.name: config_updates(e) for e in (seen_before, never_seen)}
    replace_file(ecds_file, older)
    poll(lambda: all(config_updates(e) > updates[e.name] for e in (seen_before, never_seen)), 10,
         "the older table taken in")
    time.sleep(0.2)  # the workers' share of it
    for envoy in (seen_before, never_seen):
        statuses = [envoy.get(APP, secret).status for _ in range(20)]
        assert statuses == [401] * 20, f"{envoy.name} admitted a revoked token: {statuses}"
        assert envoy.get(APP, owner).status == 200, "the owner is still admitted"
    # Envoy validated the older table before: it accepts it without asking
    # the filter; every VM keeps the newer table and says so.
    seen_before.wait_for_log(lambda line: "is older than" in line, since=offsets[seen_before.name], timeout=10,
                             what="the older table kept out")
    # The other one asks the filter, which refuses: a NACK.
    poll(lambda: config_fails(never_seen) > fails, 10, "the older table rejected")
    assert "is older than the configuration this Envoy enforces" in never_seen.log_text()
    # The newer table again: nothing to do.
    replace_file(ecds_file, newer)
    time.sleep(0.5)
    for envoy in (seen_before, never_seen):
        assert envoy.get(APP, secret).status == 401
        envoy.stop()
