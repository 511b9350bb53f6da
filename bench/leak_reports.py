#!/usr/bin/env python3
"""Leak reports: does the answer's time tell whether a reported secret matched?

A store of N tokens (bench/scale.py's make_store, default 100k), Envoy on
envoy/envoy-ecds.yaml as bench/scale.py runs it (2 workers), the release
control plane. Then, alternating, R reports through the gateway of one secret
that matches a token (which is revoked: the answer waits for every Envoy) and
R reports of one unknown secret, each on a fresh connection; the time from
sending the report to its whole answer. Also, for each revoked secret, the
status of the first request made with it after the answer (must be 401).

Writes bench/results/leak-reports.md. See bench/README.md.

  PYTHONPATH=tests/lib .venv/bin/python bench/leak_reports.py   (make bench-leaks sets it)
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import string
import sys
import time

# bench/scale.py: the store, the Envoy configuration, the paths; it also
# imports tests/lib's testkit, or says how to run with it.
import scale
from run import label_count, log, percentile, resolve_envoy, wait_ready
from scale import cpl, harness
from testkit.clients import request

REVOKE = "/apitokens/v1/credentials:revoke"


def timed_report(port: int, secret: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    r = request(port, "POST", REVOKE, body={"credentials": [secret]})
    return (time.perf_counter() - t0) * 1000, r.status


def unknown_secret() -> str:
    """An `apt_` secret no token has (its checksum is not computed here: the
    control plane looks every credential up first, whatever its shape)."""
    return "apt_" + "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(38))


def row(name: str, ms: list[float]) -> str:
    s = sorted(ms)
    return (f"| {name} | {len(s)} | {s[0]:.1f} | {statistics.median(s):.1f} | {percentile(s, 90):.1f} | "
            f"{percentile(s, 99):.1f} | {s[-1]:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--reports", type=int, default=40, help="reports of each kind")
    args = ap.parse_args()
    missing = cpl.missing_binaries()
    if missing:
        sys.exit(f"bench/leak_reports: missing {missing} (make build; cargo build --release -p apitokens-control-plane)")
    workdir = scale.WORK.parent / "leak-reports"
    workdir.mkdir(parents=True, exist_ok=True)
    log(f"{label_count(args.tokens)}: generating and importing {args.tokens} tokens")
    store = scale.make_store(args.tokens, args.reports, workdir)
    cp = cpl.ControlPlane(workdir, name="apitokens serve")
    cp.bootstrap("bench", "owner")
    envoy, listen, admin, _ = scale.spawn_envoy(cp, workdir, resolve_envoy(scale.ENVOY))
    matched, unmatched, after = [], [], []
    try:
        wait_ready(envoy, admin, 30)
        # The bench reports from one address, as fast as it can.
        cp.start(*scale.SERVE_ARGS, "--leak-reports-per-second", "0")
        harness.poll(lambda: cp.envoy_status("bench-scale").get("ackedVersion"), 300, "first ACK", interval=0.05)
        for _, secret in store["kept"][:3]:  # warm-up: connections, caches
            timed_report(listen, unknown_secret())
        for _, secret in store["kept"][3:args.reports]:
            ms, status = timed_report(listen, secret)
            assert status == 202, status
            matched.append(ms)
            after.append(request(listen, "GET", scale.PATH, secret).status)
            ms, status = timed_report(listen, unknown_secret())
            assert status == 202, status
            unmatched.append(ms)
    finally:
        envoy.stop()
        cp.stop()
    diff = statistics.median(matched) - statistics.median(unmatched)
    md = "\n".join([
        f"# Leak reports: answer time, {label_count(args.tokens)} tokens, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        f"`make bench-leaks` (`bench/leak_reports.py --tokens {args.tokens} --reports {args.reports}`): one "
        "secret per report, through Envoy (2 workers), a fresh connection each, alternating.",
        "",
        "| report | n | min ms | median ms | p90 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|---|",
        row("matched (token revoked, every Envoy applied it)", matched),
        row("unknown secret", unmatched),
        "",
        f"Median difference: {diff:+.1f} ms. First request with a revoked secret after the answer: "
        f"{after.count(401)} of {len(after)} refused (401).",
        "",
    ])
    print(md)
    (scale.RESULTS / "leak-reports.md").write_text(md)
    (scale.RESULTS / "leak-reports.json").write_text(json.dumps(
        {"tokens": args.tokens, "matched_ms": matched, "unmatched_ms": unmatched, "after": after}, indent=1))


if __name__ == "__main__":
    main()
