#!/usr/bin/env python3
"""Configuration and revocation at scale (issue 4, section 3).

For each token count N (default 1k, 100k, 1M):
  1. a SQLite store with N tokens (`apitokens import` of a generated plugin
     configuration) plus a bootstrap owner in namespace `bench`;
  2. Envoy (`--concurrency 2`, envoy/envoy-ecds.yaml with free ports, a
     direct-response route and exact connection balancing) started first, on
     its deny-all default, then `apitokens serve` (release build);
  3. measured: on_configure per VM (the filter's "configuration accepted" log
     line), Envoy RSS before/after the first push, the payload size, and the
     delay from the API's answer to a DELETE until the revoked secret gets 401
     on every worker (keep-alive connections pinned to both workers).

Writes bench/results/scale.md and scale.json. See bench/README.md.

Needs tests/lib on the import path (the package testkit):
  PYTHONPATH=tests/lib .venv/bin/python bench/scale.py      (make bench-scale sets it)
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import re
import secrets
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import run as benchrun  # bench/run.py (this script's directory): logging, processes, RSS, percentiles
from run import Proc, fmt, label_count, log, percentile, resolve_envoy, rss_mb, wait_ready

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent

WORK = ROOT / "target" / "bench" / "scale"
RESULTS = BENCH / "results"
ENVOY = os.environ.get("ENVOY_BIN") or str(ROOT / ".venv" / "bin" / "envoy")
os.environ.setdefault("APITOKENS_BIN", str(ROOT / "target" / "release" / "apitokens"))
os.environ.setdefault("APITOKENS_WASM", str(ROOT / "target" / "wasm32-wasip1" / "release" / "apitokens_filter.wasm"))

try:
    from testkit import controlplane as cpl  # noqa: E402  tests/lib/testkit: `apitokens serve`, ECDS Envoy config
    from testkit import harness  # noqa: E402  tests/lib/testkit: poll
except ModuleNotFoundError as exc:
    if exc.name != "testkit":
        raise
    sys.exit("bench/scale.py: no module testkit: run it with PYTHONPATH=tests/lib (make bench-scale does)")

PATH = "/api/v1/namespaces/bench/deployments"
WORKERS = 2
VMS = WORKERS + 1  # one VM per worker thread plus the main thread's
CONNS = 4          # keep-alive connections to Envoy, spread over the workers
TABLE_WRITTEN = re.compile(r"written for Envoy \((\d+) tokens, (\d+\.\d+) ms, (\d+\.\d+) ms of it without")
ACCEPTED = re.compile(r"configuration accepted: (\d+) tokens, (\d+) rules, (\d+) bytes, in (\d+\.\d+) ms, "
                      r"VM memory (\d+) KiB")
TARGETS = [
    "control plane time per write (no Envoy) p99 <= 10 ms at 100k and <= 20 ms at 1M",
    "bytes sent to the Envoy per single-token write <= 4 KB at any size",
    "DELETE sent -> every worker refuses p99 <= 25 ms at 100k and at 1M",
    "creates/s with 8 clients, each waiting for every Envoy worker, >= 1000 at 100k and >= 500 at 1M",
    "revocation p99 <= 100 ms at 100k and <= 600 ms at 1M",
    "1M tokens accepted",
    "<= 100 bytes of VM memory per token",
]
WRITES = 100          # sequential writes timed per size, no Envoy connected
CLIENTS = 8           # concurrent clients of the throughput runs
THROUGHPUT_S = 3.0    # seconds per throughput run
# The bench creates thousands of tokens in one namespace, as fast as it can:
# no quota and no write rate (it measures what the control plane and the
# Envoys take, not the per-namespace limits).
SERVE_ARGS = ("--max-tokens-per-namespace", "0", "--namespace-writes-per-second", "0")


# ---------------------------------------------------------------- store


def make_store(n: int, keep: int, workdir: Path, store: str | None = None) -> dict:
    """A fresh database with n tokens (SQLite in `workdir`, or the fresh
    PostgreSQL database `store`); the first `keep` are viewers in namespace
    `bench` whose secrets we keep (to be revoked)."""
    db = workdir / "apitokens.db"
    for p in workdir.glob("apitokens.db*"):
        p.unlink()
    t0 = time.monotonic()
    kept = []
    roles = ("editor", "viewer")
    sha = hashlib.sha256
    tokens = []
    for i in range(n):
        secret = secrets.token_urlsafe(32)
        if i < keep:
            name = f"namespaces/bench/apitokens/r{i}"
            kept.append((f"r{i}", secret))
        else:
            name = f"namespaces/ns{i % 97}/apitokens/t{i}"
        tokens.append({"name": name, "role": roles[i % 2] if i >= keep else "viewer",
                       "secretSha256": sha(secret.encode()).hexdigest()})
    conf = workdir / "tokens.json"
    conf.write_text(json.dumps({"tokens": tokens}, separators=(",", ":")))
    gen_s = time.monotonic() - t0
    del tokens
    t0 = time.monotonic()
    target = ["--store", store] if store else ["--db", str(db)]
    out = subprocess.run([cpl.apitokens_bin(), "import", str(conf), *target],
                         capture_output=True, text=True, timeout=900)
    import_s = time.monotonic() - t0
    if out.returncode != 0:
        raise RuntimeError(f"import of {n} tokens failed: {out.stderr[-2000:]}")
    size = conf.stat().st_size
    conf.unlink()
    return {"db": db, "kept": kept, "gen_s": gen_s, "import_s": import_s, "json_bytes": size}


# ---------------------------------------------------------------- Envoy


def envoy_config(cp: "cpl.ControlPlane", listen: int, admin: int) -> dict:
    """envoy/envoy-ecds.yaml via testkit.controlplane (ports of `cp`), on fixed free
    ports, exact connection balancing, no access log, and a direct response
    for everything but /apitokens/."""
    config = cpl.ecds_bootstrap(cp, upstream_port=1, node="bench-scale")
    config["admin"]["address"]["socket_address"]["port_value"] = admin
    listener = config["static_resources"]["listeners"][0]
    listener["address"]["socket_address"]["port_value"] = listen
    listener["connection_balance_config"] = {"exact_balance": {}}
    hcm = cpl.hcm_of(config)
    hcm.pop("access_log", None)
    for vh in hcm["route_config"]["virtual_hosts"]:
        for r in vh["routes"]:
            if r["match"].get("prefix") == "/":
                r.pop("route", None)
                r["direct_response"] = {"status": 200, "body": {"inline_string": "ok\n"}}
    return config


def spawn_envoy(cp: "cpl.ControlPlane", workdir: Path, envoy_bin: str) -> tuple[Proc, int, int, Path]:
    """Envoy on `envoy_config` for `cp`, on fresh ports, its log in
    workdir/envoy.log: the process, the listener and admin ports, the log."""
    listen, admin = cpl.free_port(), cpl.free_port()
    cfg_path = workdir / "envoy.json"
    cfg_path.write_text(json.dumps(envoy_config(cp, listen, admin), indent=1))
    envoy_log = workdir / "envoy.log"
    if envoy_log.exists():
        envoy_log.unlink()
    envoy = Proc("envoy", [envoy_bin, "-c", str(cfg_path), "--concurrency", str(WORKERS), "--log-path",
                           str(envoy_log), "--use-dynamic-base-id", "-l", "info",
                           "--file-flush-interval-msec", "50"], workdir / "envoy.out")
    return envoy, listen, admin, envoy_log


def admin_stats(admin: int, flt: str) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats?filter={flt}", timeout=5) as r:
        out = {}
        for line in r.read().decode().splitlines():
            k, _, v = line.partition(": ")
            if v.strip().isdigit():
                out[k] = int(v)
        return out


def worker_active(admin: int, listen: int) -> dict[str, int]:
    """Active downstream connections per worker of the listener."""
    stats = admin_stats(admin, rf"listener\.127\.0\.0\.1_{listen}\.worker_.*downstream_cx_active")
    return {re.search(r"worker_(\d+)", k).group(1): v for k, v in stats.items()}


def accepted_lines(log_path: Path) -> list[dict]:
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    return [{"tokens": int(m[1]), "rules": int(m[2]), "bytes": int(m[3]), "ms": float(m[4]), "vm_kib": int(m[5])}
            for m in ACCEPTED.finditer(text)]


class Pinned:
    """Keep-alive HTTP/1.1 connections to Envoy, each mapped to the worker it landed on."""

    def __init__(self, listen: int, admin: int, n: int):
        self.listen, self.admin = listen, admin
        self.conns: list[http.client.HTTPConnection] = []
        self.worker: list[str] = []
        for _ in range(n):
            before = worker_active(admin, listen)
            c = http.client.HTTPConnection("127.0.0.1", listen, timeout=10)
            c.connect()
            after = harness.poll(lambda: self._grew(before), 5, "connection counted by a worker")
            self.conns.append(c)
            self.worker.append(after)

    def _grew(self, before: dict[str, int]) -> str | None:
        now = worker_active(self.admin, self.listen)
        grew = [w for w, v in now.items() if v > before.get(w, 0)]
        return grew[0] if len(grew) == 1 else None

    def workers(self) -> set[str]:
        return set(self.worker)

    def get(self, i: int, secret: str) -> int:
        c = self.conns[i]
        sock = c.sock
        c.request("GET", PATH, headers={"Authorization": f"Bearer {secret}"})
        r = c.getresponse()
        r.read()
        if sock is not None and c.sock is not sock and c.sock is not None:
            raise RuntimeError("connection was reopened (worker mapping lost)")
        if c.sock is None:  # closed by Envoy after this answer: reopen, remap by stats below
            self.reopen(i)
        return r.status

    def reopen(self, i: int) -> None:
        before = worker_active(self.admin, self.listen)
        self.conns[i].close()
        harness.poll(lambda: sum(worker_active(self.admin, self.listen).values()) < sum(before.values()), 5,
                 "connection close counted")
        before = worker_active(self.admin, self.listen)
        c = http.client.HTTPConnection("127.0.0.1", self.listen, timeout=10)
        c.connect()
        self.worker[i] = harness.poll(lambda: self._grew(before), 5, "connection counted by a worker")
        self.conns[i] = c

    def close(self) -> None:
        for c in self.conns:
            c.close()


# ---------------------------------------------------------------- writes


def create_body(name: str) -> dict:
    return {"name": f"namespaces/bench/apitokens/{name}", "role": "viewer"}


def write_times(cp, owner: str, tag: str) -> dict:
    """WRITES creates, then as many deletes, one at a time: the API's answer
    time as the client sees it (the control plane's own time per write plus
    a loopback round trip)."""
    conn = http.client.HTTPConnection("127.0.0.1", cp.api_port, timeout=120)
    headers = {"Authorization": f"Bearer {owner}", "Content-Type": "application/json"}
    out: dict[str, list[float]] = {"create_ms": [], "delete_ms": []}
    for i in range(WRITES):
        body = json.dumps(create_body(f"{tag}{i}"))
        t0 = time.monotonic()
        conn.request("POST", cpl.tokens_path("bench"), body=body, headers=headers)
        r = conn.getresponse()
        r.read()
        out["create_ms"].append((time.monotonic() - t0) * 1000)
        if r.status != 200:
            raise RuntimeError(f"create {tag}{i}: {r.status}")
    for i in range(WRITES):
        t0 = time.monotonic()
        conn.request("DELETE", cpl.tokens_path("bench", f"{tag}{i}"), headers=headers)
        r = conn.getresponse()
        r.read()
        out["delete_ms"].append((time.monotonic() - t0) * 1000)
        if r.status != 200:
            raise RuntimeError(f"delete {tag}{i}: {r.status}")
    conn.close()
    return out


def throughput(cp, owner: str, tag: str, wait: bool = True) -> dict:
    """CLIENTS threads creating tokens for THROUGHPUT_S seconds, each on its
    own keep-alive connection: creates per second, and how many answers said
    every connected Envoy applied the change. `wait=False`: the creates opt
    out of waiting for the Envoys (`?waitForEnvoys=false`, for bulk jobs)."""
    import threading

    port = cp.api_port
    path = cpl.tokens_path("bench") + ("" if wait else "?waitForEnvoys=false")
    stop = time.monotonic() + THROUGHPUT_S
    counts = [0] * CLIENTS
    applied = [0] * CLIENTS
    errors: list[str] = []

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        headers = {"Authorization": f"Bearer {owner}", "Content-Type": "application/json"}
        i = 0
        while time.monotonic() < stop:
            conn.request("POST", path, body=json.dumps(create_body(f"{tag}{k}x{i}")),
                         headers=headers)
            r = conn.getresponse()
            r.read()
            if r.status != 200:
                errors.append(f"{r.status}")
                return
            counts[k] += 1
            applied[k] += r.getheader("x-apitokens-applied") == "true"
            i += 1
        conn.close()

    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    if errors:
        raise RuntimeError(f"throughput {tag}: answers {errors[:5]}")
    return {"creates": sum(counts), "seconds": elapsed, "per_s": sum(counts) / elapsed,
            "applied_answers": sum(applied)}


# ---------------------------------------------------------------- revocations


def revoke_each(pinned: "Pinned", kept: list, owner: str, planes: list, acked_by) -> tuple[list, list, list]:
    """Revokes each kept token in turn, through the API of `planes` in
    rotation, and times it: the API's answer, and from the answer until every
    pinned connection refuses the secret; then until `acked_by`'s /status
    shows the version applied."""
    delays, api_ms, ack_ms = [], [], []
    for k, (rid, secret) in enumerate(kept):
        cp = planes[k % len(planes)]
        codes = [pinned.get(i, secret) for i in range(CONNS)]
        if codes != [200] * CONNS:
            raise RuntimeError(f"before revoking {rid}: {codes} (want 200 on every connection)")
        if len(pinned.workers()) < WORKERS:
            raise RuntimeError(f"connections now on workers {pinned.worker} only")
        t0 = time.monotonic()
        r = cpl.request(cp.api_port, "DELETE", cpl.tokens_path("bench", rid), owner, timeout=120)
        t_ans = time.monotonic()
        if r.status != 200:
            raise RuntimeError(f"DELETE {rid}: {r}")
        version = cpl.version_of(r)
        pending = set(range(CONNS))
        first401: dict[int, float] = {}
        deadline = t_ans + 60
        while pending and time.monotonic() < deadline:
            for i in sorted(pending):
                code = pinned.get(i, secret)
                if code == 401:
                    first401[i] = time.monotonic()
                    pending.discard(i)
                elif code != 200:
                    raise RuntimeError(f"revoked {rid}: status {code} on connection {i}")
        if pending:
            raise RuntimeError(f"revoked {rid}: still allowed after 60 s on connections {sorted(pending)}")
        delays.append((max(first401.values()) - t_ans) * 1000)
        api_ms.append((t_ans - t0) * 1000)
        acked_by.wait_applied(version, 60)
        ack_ms.append((time.monotonic() - t0) * 1000)
    return delays, api_ms, ack_ms


# ---------------------------------------------------------------- one size


def run_size(n: int, revocations: int, envoy_bin: str) -> dict:
    """One size: first with the Envoy (its first push, memory, revocations,
    create throughput waiting for it and not), then with no Envoy connected
    (the control plane's own time per write and throughput). In that order,
    so the first push carries exactly the imported tokens."""
    workdir = WORK / label_count(n)
    workdir.mkdir(parents=True, exist_ok=True)
    res: dict = {"tokens": n, "label": label_count(n)}
    log(f"{label_count(n)}: generating and importing {n} tokens")
    store = make_store(n, max(revocations, 25), workdir)
    res.update(gen_s=store["gen_s"], import_s=store["import_s"], json_bytes=store["json_bytes"])
    log(f"{label_count(n)}: import {store['import_s']:.2f} s ({store['json_bytes'] / 1e6:.1f} MB JSON)")

    cp = cpl.ControlPlane(workdir, name="apitokens serve")
    owner = cp.bootstrap("bench", "owner")

    envoy, listen, admin, envoy_log = spawn_envoy(cp, workdir, envoy_bin)
    try:
        log(f"{label_count(n)}: Envoy ready after {wait_ready(envoy, admin, 30):.1f} s")
        harness.poll(lambda: len(accepted_lines(envoy_log)) >= VMS, 15, "deny-all default configured in every VM")
        time.sleep(1.0)
        res["rss_before_mb"] = rss_mb(envoy.pid)

        t_start = time.monotonic()
        cp.start(*SERVE_ARGS)
        t_healthy = time.monotonic()
        res["cp_start_s"] = t_healthy - t_start
        try:
            harness.poll(lambda: cp.envoy_status("bench-scale").get("ackedVersion"), 300, "first ACK", interval=0.05)
        except TimeoutError:
            res["first_push_error"] = json.dumps(cp.envoy_status("bench-scale"))[:2000]
            res["cp_log_tail"] = cp.log_text()[-2000:]
            res["envoy_log_tail"] = envoy_log.read_text(errors="replace")[-3000:]
            log(f"{label_count(n)}: NO ACK: {res['first_push_error']}")
            return res
        t_ack = time.monotonic()
        st = cp.envoy_status("bench-scale")
        res["first_ack_s"] = t_ack - t_start
        res["first_ack_after_healthy_s"] = t_ack - t_healthy
        res["envoy_status"] = {k: st.get(k) for k in ("ackedVersion", "lastNack", "connected")}
        harness.poll(lambda: sum(1 for x in accepted_lines(envoy_log) if x["tokens"] > 0) >= VMS, 60,
                     "first push configured in every VM")
        time.sleep(1.0)
        res["rss_after_mb"] = rss_mb(envoy.pid)
        first = [x for x in accepted_lines(envoy_log) if x["tokens"] > 0]
        pushed = first[0]["tokens"]
        res["payload_bytes"] = first[0]["bytes"]
        res["pushed_tokens"] = pushed
        # The VM's linear memory grows with the table (and never shrinks):
        # its growth over the deny-all default, per token.
        base = max(x["vm_kib"] for x in accepted_lines(envoy_log) if x["tokens"] == 0)
        res["vm_kib_default"] = base
        res["vm_kib_first"] = max(x["vm_kib"] for x in first)
        res["vm_bytes_per_token"] = (res["vm_kib_first"] - base) * 1024 / pushed
        res["rss_per_token_vm_bytes"] = (res["rss_after_mb"] - res["rss_before_mb"]) * 1048576 / pushed / VMS
        log(f"{label_count(n)}: first ACK after {res['first_ack_s']:.2f} s, payload {res['payload_bytes']} B, "
            f"{pushed} tokens, RSS {res['rss_before_mb']:.1f} -> {res['rss_after_mb']:.1f} MB")

        # Every VM on the delta channel: a write then travels as the change.
        harness.poll(lambda: cp.envoy_status("bench-scale").get("delta"), 30, "every VM's delta stream")
        pinned = Pinned(listen, admin, CONNS)
        log(f"{label_count(n)}: connections on workers {pinned.worker}")
        res["conn_workers"] = list(pinned.worker)
        if len(pinned.workers()) < WORKERS:
            raise RuntimeError(f"connections landed on workers {pinned.worker} only")
        before = cp.metrics()
        delays, api_ms, ack_ms = revoke_each(pinned, store["kept"][:revocations], owner, [cp], cp)
        after = cp.metrics()
        moved = {k: after.get(k, 0.0) - before.get(k, 0.0)
                 for k in ("apitokens_delta_bytes_total", "apitokens_push_bytes_total")}
        res["delta_bytes_per_write"] = moved["apitokens_delta_bytes_total"] / max(1, len(delays))
        res["ecds_bytes_per_write"] = moved["apitokens_push_bytes_total"] / max(1, len(delays))
        pinned.close()
        time.sleep(0.5)  # log flush
        later = [x for x in accepted_lines(envoy_log) if x["tokens"] > 0][len(first):]
        res.update(revocation_ms=delays, api_answer_ms=api_ms, delete_to_ack_ms=ack_ms,
                   on_configure_first_ms=[x["ms"] for x in first],
                   on_configure_later_ms=[x["ms"] for x in later],
                   on_configure_lines_per_push=len(later) / max(1, len(delays)))
        s = sorted(delays)
        log(f"{label_count(n)}: revocation p50 {percentile(s, 50):.1f} p99 {percentile(s, 99):.1f} "
            f"max {s[-1]:.1f} ms; API answer median {statistics.median(api_ms):.1f} ms")
        # Create throughput with the Envoy connected: each create answers once
        # the Envoy applied it; then the same opting out of the wait.
        for key, tag, wait in (("throughput_envoy", "te", True), ("throughput_envoy_nowait", "tw", False)):
            res[key] = throughput(cp, owner, tag, wait)
            log(f"{label_count(n)}: with Envoy{'' if wait else ', not waiting'}: {res[key]['per_s']:.0f} "
                f"creates/s with {CLIENTS} clients, {res[key]['applied_answers']} of {res[key]['creates']} "
                "answers applied everywhere")
        res["final_rss_mb"] = rss_mb(envoy.pid)
        envoy.stop()

        # The control plane alone: its own time per write, and create throughput.
        harness.poll(lambda: cp.status()["connectedEnvoys"] == 0, 30, "the Envoy's stream closed")
        res.update(write_times(cp, owner, "w"))
        res["throughput_no_envoy"] = throughput(cp, owner, "tn")
        c, d = sorted(res["create_ms"]), sorted(res["delete_ms"])
        log(f"{label_count(n)}: no Envoy: create p50 {percentile(c, 50):.1f} p99 {percentile(c, 99):.1f} ms, "
            f"delete p50 {percentile(d, 50):.1f} p99 {percentile(d, 99):.1f} ms, "
            f"{res['throughput_no_envoy']['per_s']:.0f} creates/s with {CLIENTS} clients")
    finally:
        envoy.stop()
        cp.stop()
        cp_log = cp.log_text()
        res["cp_log_errors"] = [line for line in cp_log.splitlines()
                                if " ERROR " in line or "error" in line.lower()][:20]
        # Writes stage their changes; the table is encoded for Envoy (a copy
        # of it) when needed and in the background, under the table's lock.
        writes = [m for m in TABLE_WRITTEN.finditer(cp_log) if int(m.group(1)) >= n]
        res["table_writes_ms"] = [float(m.group(2)) for m in writes]
        res["table_writes_locked_ms"] = [float(m.group(2)) - float(m.group(3)) for m in writes]
    return res


# ---------------------------------------------------------------- replicas


def run_replicas(n: int, count: int, revocations: int, envoy_bin: str) -> dict:
    """`count` replicas of `apitokens serve` on one PostgreSQL database with n
    tokens, one Envoy (2 workers) connected to the last replica, and each
    revocation sent to another replica than the Envoy's (to the only one when
    count is 1): the delay now includes the way between replicas (the
    NOTIFY, the other replica's refresh and push, the ACK shared back
    through the database)."""
    from testkit.postgres import Postgres

    pg = Postgres()
    label = f"{label_count(n)}-x{count}"
    workdir = WORK / f"replicas-{label}"
    workdir.mkdir(parents=True, exist_ok=True)
    database = f"scale_{label_count(n).lower()}_{count}"
    pg.psql(f"DROP DATABASE IF EXISTS {database}")
    url = pg.create_database(database)
    res: dict = {"tokens": n, "label": label_count(n), "replicas": count}
    log(f"{label}: importing {n} tokens into PostgreSQL")
    store = make_store(n, max(revocations, 25), workdir, url)
    res["import_s"] = store["import_s"]
    planes = [cpl.ControlPlane(workdir / f"r{i + 1}", name=f"r{i + 1}", store=url) for i in range(count)]
    owner = planes[0].bootstrap("bench", "owner")
    home = planes[-1]
    envoy, listen, admin, envoy_log = spawn_envoy(home, workdir, envoy_bin)
    try:
        wait_ready(envoy, admin, 30)
        for plane in planes:
            plane.start(*SERVE_ARGS, "--replica-name", plane.name)
        harness.poll(lambda: home.envoy_status("bench-scale").get("ackedVersion"), 300, "first ACK", interval=0.05)
        harness.poll(lambda: sum(1 for x in accepted_lines(envoy_log) if x["tokens"] > 0) >= VMS, 60,
                     "first push configured in every VM")
        # Every VM on the delta channel, as in the single-process runs: a VM
        # still opening its stream while another applied a change answers
        # 503 (catching up) rather than 401, which is not a revocation's end.
        harness.poll(lambda: home.envoy_status("bench-scale").get("delta"), 30, "every VM's delta stream")
        pinned = Pinned(listen, admin, CONNS)
        if len(pinned.workers()) < WORKERS:
            raise RuntimeError(f"connections landed on workers {pinned.worker} only")
        writers = planes[:-1] or planes
        delays, api_ms, _ = revoke_each(pinned, store["kept"][:revocations], owner, writers, home)
        pinned.close()
        res.update(revocation_ms=delays, api_answer_ms=api_ms, written_on=[p.name for p in writers])
        d = sorted(delays)
        log(f"{label}: revocation p50 {percentile(d, 50):.1f} p99 {percentile(d, 99):.1f} ms; "
            f"API answer median {statistics.median(api_ms):.1f} ms")
    finally:
        envoy.stop()
        for plane in planes:
            plane.stop()
    return res


def replicas_markdown(results: list[dict], singles: dict[int, dict]) -> str:
    lines = [
        "",
        "| tokens | replicas | store | DELETE answer ms (med) | revocation ms p50 / p99 / max "
        "| p99 − one replica on PostgreSQL | p99 − one replica on SQLite (first table) "
        "| DELETE sent → every worker refuses, ms p50 / p99 |",
        "|" + "---|" * 8,
    ]
    by = {(r["tokens"], r["replicas"]): r for r in results}
    for r in results:
        d = sorted(r["revocation_ms"])
        p99 = percentile(d, 99)
        one = by.get((r["tokens"], 1))
        sqlite = singles.get(r["tokens"])
        vs_pg = f"{p99 - percentile(sorted(one['revocation_ms']), 99):+.1f} ms" if one and r["replicas"] > 1 else "-"
        vs_sqlite = (f"{p99 - percentile(sorted(sqlite['revocation_ms']), 99):+.1f} ms"
                     if sqlite and sqlite.get("revocation_ms") else "-")
        whole = sorted(a + b for a, b in zip(r["api_answer_ms"], r["revocation_ms"]))
        lines.append(f"| {r['label']} | {r['replicas']} | PostgreSQL | {statistics.median(r['api_answer_ms']):.1f} "
                     f"| {percentile(d, 50):.1f} / {p99:.1f} / {d[-1]:.1f} | {vs_pg} | {vs_sqlite} "
                     f"| {percentile(whole, 50):.1f} / {percentile(whole, 99):.1f} |")
    lines += [
        "",
        "- replicas: `apitokens serve` processes on one PostgreSQL database (the private server of "
        "scripts/postgres.sh, on this machine), one Envoy connected to the last replica; every DELETE goes to "
        "another replica than the Envoy's (with one replica, to that one), and answers once the Envoy applied "
        "it (read-your-writes across replicas). Goal: p99 within 20 ms of the single-replica figure. The last "
        "column adds the answer's own time: the whole way from the DELETE to the last worker's first 401.",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- report


def med_max(xs: list[float]) -> str:
    return f"{statistics.median(xs):.1f} / {max(xs):.1f}" if xs else "-"


def markdown(results: list[dict], command: str) -> str:
    head = ("| tokens | payload bytes | import s | first push→ACK s | on_configure ms first (med/max) "
            "| on_configure ms later (med/max) | RSS before → after MB | RSS bytes/token/VM | VM memory bytes/token "
            "| DELETE answer ms (med) | revocation ms p50 / p99 / max | DELETE sent → every worker refuses, ms p50 / p99 "
            "| bytes to the Envoy per write: delta + ECDS |")
    lines = [head, "|" + "---|" * 13]
    for r in results:
        if "first_ack_s" not in r:
            lines.append(f"| {r['label']} | - | {r['import_s']:.1f} | NO ACK | | | | | | | | | |")
            continue
        d = sorted(r.get("revocation_ms", []))
        rev = f"{percentile(d, 50):.1f} / {percentile(d, 99):.1f} / {d[-1]:.1f}" if d else "-"
        api = f"{statistics.median(r['api_answer_ms']):.1f}" if r.get("api_answer_ms") else "-"
        whole = sorted(a + b for a, b in zip(r.get("api_answer_ms", []), r.get("revocation_ms", [])))
        sent = f"{percentile(whole, 50):.1f} / {percentile(whole, 99):.1f}" if whole else "-"
        lines.append(
            f"| {r['label']} | {r['payload_bytes']:,} | {r['import_s']:.1f} | {r['first_ack_s']:.2f} "
            f"| {med_max(r.get('on_configure_first_ms', []))} | {med_max(r.get('on_configure_later_ms', []))} "
            f"| {r['rss_before_mb']:.1f} → {r['rss_after_mb']:.1f} | {r['rss_per_token_vm_bytes']:.1f} "
            f"| {r.get('vm_bytes_per_token', float('nan')):.1f} "
            f"| {api} | {rev} | {sent} "
            f"| {r.get('delta_bytes_per_write', 0):,.0f} + {r.get('ecds_bytes_per_write', 0):,.0f} |")
    lines += [
        "",
        "| tokens | write ms, no Envoy: create p50 / p99 | delete p50 / p99 | creates/s, 8 clients, no Envoy "
        "| creates/s, 8 clients, waiting for every Envoy worker | creates/s, 8 clients, Envoy connected, `waitForEnvoys=false` "
        "| table encoded for Envoy during the run: times, ms med/max (of it under the table's lock) |",
        "|" + "---|" * 7,
    ]
    for r in results:
        if "create_ms" not in r:
            continue
        c, d = sorted(r["create_ms"]), sorted(r["delete_ms"])
        te = r.get("throughput_envoy", {}).get("per_s")
        tw = r.get("throughput_envoy_nowait", {}).get("per_s")
        lines.append(
            f"| {r['label']} | {percentile(c, 50):.1f} / {percentile(c, 99):.1f} | {percentile(d, 50):.1f} / "
            f"{percentile(d, 99):.1f} | {r['throughput_no_envoy']['per_s']:.0f} | "
            + (f"{te:.0f}" if te else "-") + " | " + (f"{tw:.0f}" if tw else "-") + " | "
            + (f"{len(r['table_writes_ms'])}, {med_max(r['table_writes_ms'])} "
               f"({med_max(r['table_writes_locked_ms'])})" if r.get("table_writes_ms") else "0")
            + " |")
    notes = [
        "",
        f"Command: `{command}`. Envoy 1.40 `--concurrency {WORKERS}` ({VMS} VMs: {WORKERS} workers + main), "
        f"release `apitokens serve`, loopback, {CONNS} keep-alive HTTP/1.1 connections spread over both workers "
        "(exact connection balancing, checked with per-worker listener stats).",
        "",
        "- RSS bytes/token/VM = (RSS_after − RSS_before) / N / (workers + 1); RSS = VmRSS of the Envoy process, "
        "before = deny-all default configured, after = first push configured in every VM (+1 s); it includes "
        "Envoy's own copies of the resource. VM memory bytes/token = the growth of the filter's VM linear memory "
        "(its log line) from the deny-all default to the first push, / N; N = the tokens of the first push (the imported ones and the owner).",
        "- first push→ACK: from starting `apitokens serve` until /status shows Envoy's ackedVersion.",
        "- bytes per write: what the control plane sent the Envoy per revocation, on the delta channel (to every "
        "VM's stream) and by ECDS (`apitokens_delta_bytes_total`, `apitokens_push_bytes_total`); ECDS snapshots "
        "go out `--snapshot-interval-ms` (30 s) after a change, in the background.",
        "- on_configure: the filter's `configuration accepted ... in X ms` line, one per VM per ECDS version "
        "(first push: the N-token version; later: background snapshots, if any came during the revocations).",
        "- revocation: from the control plane's answer to `DELETE .../apitokens/<id>` (direct to its API, "
        "owner bearer) until the revoked secret got 401 on every connection (the last worker's first 401). "
        "The poll starts after the answer, so a delay near 0 means the push landed while the API was answering.",
        f"- on_configure lines per version seen in Envoy's log: "
        f"{sorted({r.get('on_configure_lines_per_push') for r in results if r.get('on_configure_lines_per_push')})} "
        "(the main thread logs twice); with that many VMs the per-VM figure is (workers + 1) / lines of the above.",
        "- DELETE answer ms (first table): with the Envoy connected, the answer comes once the Envoy acknowledged "
        "the version (read-your-writes), so it includes the push and Envoy's own work.",
        f"- write ms (second table): {WRITES} creates then {WRITES} deletes, one at a time, straight to the API "
        "with no Envoy connected: the control plane's own time per write (store commit, table edit, publish) "
        "plus a loopback round trip, measured by the client.",
        f"- creates/s: {CLIENTS} threads, each on its own keep-alive connection, creating tokens for "
        f"{THROUGHPUT_S:.0f} s; with the Envoy connected every create waits until every VM of it acknowledged (on "
        "the delta channel; its ECDS ACK for an Envoy off it), unless it opts out "
        "(`?waitForEnvoys=false`: then it answers once committed and handed to the push). The first table's "
        "figures come before any of these creates.",
        "- table encoded for Envoy: a write stages its changes (the API and the delta channel see them at once); "
        "the table is encoded with them (a copy of it, without the table's lock: writes go on staging; then "
        "taken in under the lock, which a write arriving then waits for) for a new ECDS subscription, an Envoy "
        "off the delta channel, every `--snapshot-interval-ms` and every 2,048 staged tokens; the control "
        "plane's `written for Envoy` log lines of the whole run at this size.",
        "",
        "Targets: " + "; ".join(TARGETS) + ".",
    ]
    return "\n".join(lines + notes) + "\n"


def verdicts(results: list[dict]) -> list[str]:
    out = []
    by = {r["tokens"]: r for r in results}
    for n, limit in ((100000, 10), (1000000, 20)):
        r = by.get(n)
        if r and r.get("create_ms"):
            p99 = max(percentile(sorted(r["create_ms"]), 99), percentile(sorted(r["delete_ms"]), 99))
            out.append(f"write p99 (no Envoy) at {label_count(n)}: {p99:.1f} ms (target <= {limit}): "
                       + ("met" if p99 <= limit else "NOT met"))
    r = by.get(100000)
    if r and r.get("throughput_no_envoy"):
        for key, what in (("throughput_no_envoy", "no Envoy"), ("throughput_envoy", "waiting for the Envoy"),
                          ("throughput_envoy_nowait", "Envoy connected, not waiting")):
            if key in r:
                v = r[key]["per_s"]
                out.append(f"creates/s at 100k, {what}: {v:.0f} (target >= 500): " + ("met" if v >= 500 else "NOT met"))
    for n, limit in ((100000, 1000), (1000000, 500)):
        r = by.get(n)
        if r and r.get("throughput_envoy"):
            v = r["throughput_envoy"]["per_s"]
            out.append(f"creates/s at {label_count(n)}, each waiting for every worker: {v:.0f} (target >= {limit}): "
                       + ("met" if v >= limit else "NOT met"))
    for r in results:
        if "delta_bytes_per_write" in r:
            b = r["delta_bytes_per_write"] + r["ecds_bytes_per_write"]
            out.append(f"bytes to the Envoy per write at {r['label']}: {b:,.0f} (target <= 4096): "
                       + ("met" if b <= 4096 else "NOT met"))
    for n in (100000, 1000000):
        r = by.get(n)
        if r and r.get("revocation_ms"):
            whole = sorted(a + b for a, b in zip(r["api_answer_ms"], r["revocation_ms"]))
            p99 = percentile(whole, 99)
            out.append(f"DELETE sent -> every worker refuses, p99 at {label_count(n)}: {p99:.1f} ms (target <= 25): "
                       + ("met" if p99 <= 25 else "NOT met"))
    for n, limit in ((100000, 100), (1000000, 600)):
        r = by.get(n)
        if r and r.get("revocation_ms"):
            p99 = percentile(sorted(r["revocation_ms"]), 99)
            out.append(f"revocation p99 at {label_count(n)}: {p99:.1f} ms (target <= {limit}): "
                       + ("met" if p99 <= limit else "NOT met"))
    r = by.get(1000000)
    if r:
        out.append("1M tokens accepted: " + ("yes" if r.get("first_ack_s") else "NO"))
    for r in results:
        if "vm_bytes_per_token" in r and r["tokens"] >= 100000:
            b = r["vm_bytes_per_token"]
            out.append(f"VM memory per token at {r['label']}: {b:.1f} B (target <= 100): "
                       + ("met" if b <= 100 else "NOT met"))
    return out


def replica_verdicts(replicas: list[dict]) -> list[str]:
    out = []
    by = {(r["tokens"], r["replicas"]): r for r in replicas}
    for (n, count), r in sorted(by.items()):
        one = by.get((n, 1))
        if count == 1 or one is None:
            continue
        p99, base = percentile(sorted(r["revocation_ms"]), 99), percentile(sorted(one["revocation_ms"]), 99)
        out.append(f"revocation p99 across {count} replicas at {label_count(n)}: {p99:.1f} ms, one replica "
                   f"{base:.1f} ms ({p99 - base:+.1f} ms, goal within 20 ms): " + ("met" if p99 - base <= 20 else "NOT met"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,100000,1000000", help="token counts (1k, 100k, 1M accepted)")
    ap.add_argument("--revocations", type=int, default=20)
    ap.add_argument("--replicas-sizes", default="1000,100000",
                    help="token counts of the replicas rows, on PostgreSQL ('' for none; needs the server of "
                         "scripts/postgres.sh, as make bench-scale runs it)")
    ap.add_argument("--replicas", type=int, default=3, help="replicas of the replicas rows")
    ap.add_argument("--workers", type=int, default=2, help="Envoy's --concurrency")
    ap.add_argument("--out", default="scale", help="results file stem under bench/results")
    args = ap.parse_args()
    global WORKERS, VMS
    WORKERS, VMS = args.workers, args.workers + 1
    sizes = [benchrun.count(s) for s in args.sizes.split(",") if s]
    replica_sizes = [benchrun.count(s) for s in args.replicas_sizes.split(",") if s]
    if replica_sizes and not os.environ.get("APITOKENS_TEST_POSTGRES"):
        log("no PostgreSQL server (APITOKENS_TEST_POSTGRES): no replicas rows; run make bench-scale")
        replica_sizes = []
    missing = cpl.missing_binaries()
    if missing:
        sys.exit(f"bench/scale: missing {missing} (make build; cargo build --release -p apitokens-control-plane)")
    envoy_bin = resolve_envoy(ENVOY)
    command = (f".venv/bin/python bench/scale.py --sizes {args.sizes} --revocations {args.revocations} "
               f"--replicas-sizes '{args.replicas_sizes}' --replicas {args.replicas} --workers {args.workers}")
    results = []
    for n in sizes:
        try:
            results.append(run_size(n, args.revocations, envoy_bin))
        except Exception as e:  # report what failed and go on with the next size
            log(f"{label_count(n)}: FAILED: {e}")
            results.append({"tokens": n, "label": label_count(n), "error": str(e), "import_s": float("nan")})
    replicas = []
    for n in replica_sizes:
        for count in (1, args.replicas):
            try:
                replicas.append(run_replicas(n, count, args.revocations, envoy_bin))
            except Exception as e:
                log(f"{label_count(n)} x{count}: FAILED: {e}")
                results.append({"tokens": n, "label": f"{label_count(n)} x{count}", "error": str(e),
                                "import_s": float("nan")})
    ok = [r for r in results if "error" not in r]
    md = markdown(ok, command)
    if replicas:
        md += replicas_markdown(replicas, {r["tokens"]: r for r in ok})
    failed = [f"- {r['label']}: FAILED: {r['error']}" for r in results if "error" in r]
    md += "\n" + "\n".join(["Verdicts:"] + [f"- {v}" for v in verdicts(ok) + replica_verdicts(replicas)]
                           + failed) + "\n"
    print(md)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.md").write_text(md)
    raw = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "workers": WORKERS, "vms": VMS,
           "results": results, "replicas": replicas}
    (RESULTS / f"{args.out}.json").write_text(json.dumps(raw, indent=1, default=str))


if __name__ == "__main__":
    main()
