#!/usr/bin/env python3
"""Measurements of the shared-data prototype that bench/run.py does not make
(its callgrind run covers instructions per request, see README.md).

  rss   Envoy RSS with the prototype holding N synthetic tokens in shared
        data (`{"synthetic": N}`), against the same Envoy with 0, for each
        --concurrency given; also the load time the filter logs.
  load  requests/s and Envoy CPU per request with 2 workers, the prototype
        (shared data, and its per-VM-HashMap build) against the apitokens
        filter, 100k tokens, short interleaved wrk runs (a shared 2-core
        machine: ratios only).

Reuses bench/run.py's helpers (Envoy configs, processes, tokens, wrk). Never
writes a secret anywhere: the synthetic ones are derived from an index inside
the filter and here, the harness's ones live only in memory (the Envoy
configurations it writes hold digests only).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import run as benchrun  # noqa: E402
from run import Proc, bootstrap, cpu_seconds, resolve_envoy, rss_mb, wait_ready, wasm_filter  # noqa: E402

MB = 1048576


def envoy_bin() -> str:
    return resolve_envoy(os.environ.get("ENVOY_BIN") or str(ROOT / ".venv" / "bin" / "envoy"))


def status(port: int, secret: str) -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{benchrun.PATH}",
                                 headers={"Authorization": f"Bearer {secret}"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def start(envoy: str, cfg: dict, port: int, concurrency: int, work: Path, name: str) -> tuple[Proc, float]:
    path = work / f"{name}.json"
    path.write_text(json.dumps(cfg))
    proc = Proc(name, [envoy, "-c", str(path), "--concurrency", str(concurrency), "--disable-hot-restart"],
                work / f"{name}.log")
    return proc, wait_ready(proc, port + 9, 900)


def cmd_rss(args) -> None:
    envoy, wasm = envoy_bin(), Path(args.wasm).resolve()
    work = Path(tempfile.mkdtemp(prefix="sd-rss-"))
    rows = []
    cases = [(0, 0), (args.tokens, 0)] + ([(args.tokens, args.churn)] if args.churn else [])
    for conc in args.concurrency:
        rss, load_ms = {}, {}
        for n, churn in cases:
            name = f"c{conc}-n{n}-churn{churn}"
            plugin = {"synthetic": n, **({"churn": churn} if churn else {})}
            cfg = bootstrap(args.port, [wasm_filter(wasm, json.dumps(plugin), "apitokens")])
            proc, ready_s = start(envoy, cfg, args.port, conc, work, name)
            try:
                time.sleep(2)
                rss[(n, churn)] = rss_mb(proc.pid)
                # Token 1 is in `default`; after churn its old secret is refused
                # and its regenerated one (`sd-synthetic-r1`) let through.
                checks = [("sd-synthetic-unknown", 401), ("sd-synthetic-1", 200 if n > 1 and churn < 2 else 401)]
                if churn >= 2:
                    checks.append(("sd-synthetic-r1", 200))
                ok = all(status(args.port, s) == want for s, want in checks)
                log = (work / f"{name}.log").read_text(errors="replace")
                m = re.search(r"loaded (\d+) tokens into the (.+?) table in ([0-9.]+) ms", log)
                load_ms[(n, churn)] = float(m.group(3)) if m else None
                loaders = len(re.findall(r"proto-sd: loaded", log))
                print(f"concurrency {conc}, {n} tokens, churn {churn}: ready in {ready_s:.1f} s, "
                      f"RSS {rss[(n, churn)]:.1f} MB, load {load_ms[(n, churn)]} ms by {loaders} VM(s), "
                      f"requests {'ok' if ok else 'WRONG'}", flush=True)
            finally:
                proc.stop()
        row = {"concurrency": conc, "vms": conc + 1, "rss0_mb": rss[(0, 0)], "rss_mb": rss[(args.tokens, 0)],
               "bytes_per_token_process": (rss[(args.tokens, 0)] - rss[(0, 0)]) * MB / args.tokens,
               "load_ms": load_ms[(args.tokens, 0)]}
        if args.churn:
            row.update(rss_churn_mb=rss[(args.tokens, args.churn)], load_churn_ms=load_ms[(args.tokens, args.churn)],
                       bytes_left_per_regeneration=(rss[(args.tokens, args.churn)] - rss[(args.tokens, 0)]) * MB
                       / args.churn)
        rows.append(row)
    print(json.dumps(rows, indent=1))


def cmd_load(args) -> None:
    envoy = envoy_bin()
    work = Path(tempfile.mkdtemp(prefix="sd-load-"))
    tokens = benchrun.Tokens(args.tokens)
    wasms = {"apitokens": Path(args.ours).resolve(), "shared-data": Path(args.wasm).resolve()}
    if args.local:
        wasms["per-VM HashMap"] = Path(args.local).resolve()
    procs = {}
    try:
        for i, (label, wasm) in enumerate(wasms.items()):
            port = args.port + 10 * i
            usage = label == "apitokens"  # as bench/run.py runs it (usage reports on, as shipped)
            cfg = bootstrap(port, [wasm_filter(wasm, tokens.plugin_json(args.tokens, usage), "apitokens")])
            proc, ready_s = start(envoy, cfg, port, 2, work, f"load-{i}")
            assert status(port, tokens.allowed) == 200 and status(port, tokens.unknown) == 401, label
            procs[label] = (proc, port)
            print(f"{label}: ready in {ready_s:.1f} s", flush=True)
        samples = {label: [] for label in wasms}
        for r in range(args.rounds):
            for label, (proc, port) in procs.items():
                c0 = cpu_seconds(proc.pid)
                res = benchrun.run_load("h1", port, tokens.allowed, args.duration, args.connections, args.load_cpu,
                                        work, latencies=False)
                c1 = cpu_seconds(proc.pid)
                rps = res["requests"] / res["seconds"]
                cpu_us = (c1 - c0) * 1e6 / max(res["requests"], 1)
                ok = res["errors"] == 0 and res["non2xx"] == 0
                samples[label].append((rps, cpu_us))
                print(f"round {r + 1} {label}: {rps:,.0f} req/s, Envoy CPU {cpu_us:.1f} µs/req"
                      f"{'' if ok else ' (UNEXPECTED RESPONSES)'}", flush=True)
        summary = {label: {"rps_median": statistics.median(s[0] for s in v),
                           "cpu_us_median": statistics.median(s[1] for s in v),
                           "rps": [s[0] for s in v], "cpu_us": [s[1] for s in v]}
                   for label, v in samples.items()}
        print(json.dumps(summary, indent=1))
    finally:
        for proc, _ in procs.values():
            proc.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("rss")
    r.add_argument("--wasm", required=True, help="the shared-data build")
    r.add_argument("--tokens", type=int, default=1000000)
    r.add_argument("--concurrency", type=int, nargs="+", default=[2, 4])
    r.add_argument("--churn", type=int, default=0,
                   help="also: N tokens then this many regenerations (old key emptied, new key added)")
    r.add_argument("--port", type=int, default=29500)
    l = sub.add_parser("load")
    l.add_argument("--wasm", required=True, help="the shared-data build")
    l.add_argument("--local", help="the per-VM HashMap build (optional)")
    l.add_argument("--ours", default=str(ROOT / "target" / "wasm32-wasip1" / "release" / "apitokens_filter.wasm"))
    l.add_argument("--tokens", type=int, default=100000)
    l.add_argument("--rounds", type=int, default=3)
    l.add_argument("--duration", type=int, default=5)
    l.add_argument("--connections", type=int, default=16)
    l.add_argument("--load-cpu", type=int, default=1, help="wrk is pinned here (taskset)")
    l.add_argument("--port", type=int, default=29600)
    args = ap.parse_args()
    {"rss": cmd_rss, "load": cmd_load}[args.cmd](args)


if __name__ == "__main__":
    main()
