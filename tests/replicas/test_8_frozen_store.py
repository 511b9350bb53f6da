"""A PostgreSQL server that freezes with its connections open (every server
process stopped with SIGSTOP: the kernel still answers TCP, so neither
keepalives nor the server's statement_timeout end a wait): each request
answers 503 with Retry-After within the store deadline, nothing half-written
appears when the server resumes, and the control plane serves again without
a restart. And a store URL that asks for TLS from a server without it is
refused at start, with a message that names the problem and not the URL's
password. It freezes the server every replica uses: the session's replicas
lose the database meanwhile, and the next module's `topology` fixture
brings their Envoys home again."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from testkit.controlplane import ControlPlane, create, tokens_path
from testkit.harness import poll, remember_secret

DEADLINE_MS = 1500


def server_processes(pg) -> list[int]:
    """The postmaster and every process it started (read from /proc: no
    procps needed)."""
    postmaster = int((pg.dir / "data" / "postmaster.pid").read_text().split()[0])
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # pid (comm) state ppid ...: the command may hold spaces, the ppid follows its ")".
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        if int(fields[1]) == postmaster:
            children.append(int(stat.parent.name))
    return [postmaster, *children]


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def test_a_frozen_database_answers_503_within_the_deadline(workdir, pg):
    url = pg.create_database("frozen")
    plane = ControlPlane(workdir / "frozen", name="frozen", store=url)
    owner = plane.bootstrap("default", "admin")
    plane.start("--store-timeout-ms", str(DEADLINE_MS))
    try:
        assert plane.api("GET", tokens_path(), owner).status == 200
        pids = server_processes(pg)
        signal_all(pids, signal.SIGSTOP)
        try:
            answers = []
            for call in (
                lambda: plane.api("GET", tokens_path(), owner),
                lambda: create(plane.api_port, owner, "during-freeze", "viewer"),
                lambda: plane.api("DELETE", tokens_path(token="admin"), owner),
            ):
                started = time.monotonic()
                r = call()
                answers.append((r, time.monotonic() - started))
            for r, took in answers:
                assert r.status == 503, r
                assert r.headers.get("retry-after") == "1", r
                assert "unavailable" in r.json()["message"], r
                # Bounded by the deadline (and the write's own publish wait), not by the server.
                assert took < DEADLINE_MS / 1000 + 6, (r, took)
        finally:
            signal_all(pids, signal.SIGCONT)
        # Serving again without a restart; what answered 503 was not made.
        poll(lambda: plane.api("GET", tokens_path(), owner).status == 200, 20, "the store answers again")
        assert plane.api("GET", tokens_path(token="during-freeze"), owner).status == 404
        assert plane.api("GET", tokens_path(token="admin"), owner).status == 200
        r = create(plane.api_port, owner, "after-freeze", "viewer")
        assert r.status == 200, r
        assert "no answer from the database" in plane.log_text()
        # Counted where an alert can see them, by operation.
        metrics = plane.metrics()
        timeouts = {k: v for k, v in metrics.items()
                    if k.startswith("apitokens_store_errors_total{") and 'kind="timeout"' in k and v > 0}
        assert timeouts.get('apitokens_store_errors_total{operation="list",kind="timeout"}', 0) >= 1, timeouts
    finally:
        plane.stop()


def test_tls_asked_of_a_server_without_it_is_refused_at_start(workdir, pg):
    url = pg.create_database("notls")
    password = remember_secret("pw-notls-1f3a")
    plane = ControlPlane(workdir / "notls", name="notls",
                         store=url.replace("sslmode=disable", "sslmode=require")
                         .replace(f"//{pg.user}@", f"//{pg.user}:{password}@"))
    try:
        plane.start()
        raise AssertionError("a replica started over a connection that is not encrypted")
    except RuntimeError as e:
        text = str(e)
        assert "TLS" in text or "ssl" in text.lower(), text
        assert password not in text and password not in plane.log_text()
    finally:
        plane.stop()
