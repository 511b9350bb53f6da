#!/usr/bin/env bash
# `make run`: the whole product on loopback. The control plane (`apitokens
# serve`), Envoy configured by it over ECDS (envoy/envoy-ecds.yaml), and an
# echo upstream; a bootstrap owner token for namespace "default"; then curl
# lines for create, use, regenerate and revoke, and the web console's URL.
# Ctrl-C stops everything.
#
# Needs: the wasm module (make build), target/debug/apitokens
# (cargo build -p apitokens-control-plane) and .venv with Envoy (make venv).
# Every run starts from a fresh demo database, .run/demo.db.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
ENVOY=${ENVOY_BIN:-.venv/bin/envoy}
PY=${PYTHON:-.venv/bin/python}
APITOKENS=${APITOKENS_BIN:-target/debug/apitokens}
DB=.run/demo.db
for f in "$ENVOY" "$PY" "$APITOKENS" target/wasm32-wasip1/release/apitokens_filter.wasm; do
  [ -x "$f" ] || [ -f "$f" ] || { echo "missing $f: run make build, make venv and cargo build -p apitokens-control-plane"; exit 1; }
done
for port in 8080 8081 18000 10000 9901; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port is in use (another make run?); stop it first"; exit 1
  fi
done
mkdir -p .run
rm -f "$DB" "$DB-wal" "$DB-shm"
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

# The first owner of namespace "default": secret on stdout, shown once.
OWNER=$("$APITOKENS" bootstrap --db "$DB" --namespace default --name admin 2>/dev/null)

"$PY" tests/lib/testkit/echo_server.py --port 8080 --quiet > .run/echo.log 2>&1 &
pids+=($!)
"$APITOKENS" serve --db "$DB" --plugin-config envoy/ecds-plugin-base.json --trusted-proxy 127.0.0.1/32 > .run/apitokens.log 2>&1 &
pids+=($!)
wait_until 100 "${pids[1]}" .run/apitokens.log "the control plane" curl -fs localhost:8081/healthz
# Every Envoy gets its own node id: the control plane names Envoys by it in
# /status, its logs and the write answers (which one lags, which one rejected).
"$ENVOY" -c envoy/envoy-ecds.yaml --service-node "$(hostname)-gateway-$$" --concurrency 2 --base-id 10 \
  --log-path .run/envoy.log > .run/access.log 2>&1 &
pids+=($!)
applied() { curl -fs localhost:8081/status | grep -q '"applied":true'; }
wait_until 150 "${pids[2]}" .run/envoy.log Envoy applied

cat <<TXT
Running on loopback:
  Envoy             localhost:10000 (admin localhost:9901), filter configured over ECDS
  control plane     API localhost:8081, xDS gRPC localhost:18000, database $DB
  demo upstream     localhost:8080 (echo server)
Logs: .run/apitokens.log, .run/envoy.log, .run/access.log. Ctrl-C stops everything.

Web console (Settings > API Tokens), through Envoy:

  http://localhost:10000/console/

  Sign in with namespace "default" and the owner token below.

The bootstrap owner token of namespace "default" (shown once; only its digest is stored):

  export OWNER=$OWNER
  secret() { python3 -c 'import json,sys; print(json.load(sys.stdin)["apiToken"]["secret"])'; }
  API=localhost:10000/apitokens/v1/namespaces/default/apitokens

  # List the namespace's tokens through Envoy (the filter checks the owner, then the control plane)
  curl -s -H "Authorization: Bearer \$OWNER" \$API; echo
  # Create an editor token: its secret is in this response only
  CI=\$(curl -s -H "Authorization: Bearer \$OWNER" -d '{"name": "namespaces/default/apitokens/ci", "role": "editor"}' \$API | secret); echo \$CI
  # Use it: 200, the upstream sees x-apitoken-name/-namespace/-role
  curl -i -H "Authorization: Bearer \$CI" localhost:10000/api/v1/namespaces/default/deployments
  # 403: another namespace; 403: an editor cannot manage tokens
  curl -i -H "Authorization: Bearer \$CI" localhost:10000/api/v1/namespaces/other/deployments
  curl -i -H "Authorization: Bearer \$CI" \$API
  # Regenerate: a new secret; the old one is refused at once (401), the new one works (200)
  NEW=\$(curl -s -X POST -H "Authorization: Bearer \$OWNER" \$API/ci:regenerate | secret)
  curl -i -H "Authorization: Bearer \$CI" localhost:10000/api/v1/namespaces/default/deployments
  curl -i -H "Authorization: Bearer \$NEW" localhost:10000/api/v1/namespaces/default/deployments
  # Revoke: refused at once (401)
  curl -i -X DELETE -H "Authorization: Bearer \$OWNER" \$API/ci
  curl -i -H "Authorization: Bearer \$NEW" localhost:10000/api/v1/namespaces/default/deployments
  # A token that expires in a minute
  curl -s -H "Authorization: Bearer \$OWNER" -d "{\"name\": \"namespaces/default/apitokens/brief\", \"role\": \"viewer\", \"expireTime\": \"\$(date -u -d '+1 min' +%Y-%m-%dT%H:%M:%SZ)\"}" \$API; echo
  # Which Envoy acknowledged (ACK) or rejected (NACK) which configuration version
  curl -s localhost:8081/status; echo
TXT
wait "${pids[2]}"
