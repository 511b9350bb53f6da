#!/usr/bin/env bash
# `make run-static`: Envoy with envoy/envoy.yaml (the filter with three demo
# tokens inline) in front of an echo upstream. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
ENVOY=${ENVOY_BIN:-.venv/bin/envoy}
PY=${PYTHON:-.venv/bin/python}
mkdir -p .run
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

"$PY" tests/lib/testkit/echo_server.py --port 8080 > .run/echo.log 2>&1 &
pids+=($!)
"$ENVOY" -c envoy/envoy.yaml --concurrency 2 --base-id 9 --log-path .run/envoy.log > .run/access.log 2>&1 &
pids+=($!)

wait_until 100 "${pids[1]}" .run/envoy.log Envoy curl -fs localhost:9901/ready

cat <<'TXT'
Envoy is on localhost:10000 (admin localhost:9901) in front of an echo server,
with three demo tokens in namespace "default" (envoy/envoy.yaml).

  # 401: no token
  curl -i localhost:10000/api/v1/namespaces/default/deployments
  # 200: a viewer may list deployments; the upstream sees x-apitoken-* headers, no Authorization
  curl -i -H 'Authorization: Bearer demo-viewer-secret' localhost:10000/api/v1/namespaces/default/deployments
  # 403: a viewer may not create
  curl -i -H 'Authorization: Bearer demo-viewer-secret' -X POST localhost:10000/api/v1/namespaces/default/deployments
  # 403: another namespace
  curl -i -H 'Authorization: Bearer demo-owner-secret' localhost:10000/api/v1/namespaces/other/deployments
  # 401: unknown secret
  curl -i -H 'Authorization: Bearer not-a-real-secret' localhost:10000/api/v1/namespaces/default/deployments
  # counters
  curl -s localhost:9901/stats/prometheus | grep apitokens

Logs: .run/envoy.log (denials), .run/access.log (response code details). Ctrl-C to stop.
TXT
wait "${pids[1]}"
