"""testkit: the code the end-to-end suites share (tests/e2e, tests/cp,
tests/contract, tests/deploy, tests/security, tests/differential,
tests/drills, tests/replicas, tests/ui) and the benchmark scripts use.

Modules:
  harness       an Envoy process (start, admin, stats, logs, `get`), `poll`,
                the one list of secrets a run made or was given (`SECRETS`,
                `remember_secret`), tokens and the static Envoy bootstrap
  clients       HTTP clients: httpx over HTTP/1.1 and h2c, raw HTTP/1.1 and
                HTTP/2 connections, one request on a fresh connection (`request`)
  checks        readable assertions about answers, access logs, stats
  echo_server   the echo upstream (also a script: python tests/lib/testkit/echo_server.py --port 8080)
  controlplane  the real `apitokens serve`, its API, and Envoy on envoy-ecds.yaml
  fixtures      session fixtures of the suites on the control plane
  leaks         the secret search every suite runs when its session ends
                (`session_search` makes each suite's `leak_search` fixture)
  timing        APITOKENS_TEST_TIME_SCALE: every waiting limit, scaled (`limit`)
  load, kill9   the fault drills' load generator and kill -9 loop
  certs         test certificates (openssl): a CA and what it signs
  figures       a plugin: the fixture `figures`, printed at the end of the run
  writes        the replica drills' writer and gateway load
  postgres      the private PostgreSQL of `make replicas` (scripts/postgres.sh)
  xds           a raw client's ECDS requests and responses (a stranger on the xDS port)
  istio         the Istio objects of deploy/kubernetes/istio applied to a gateway's
                configuration the way Istio applies them

Every suite's pytest.ini puts tests/lib on the import path (`pythonpath =
../lib`); a script gets it from the environment (PYTHONPATH=tests/lib, as
`make bench-scale` sets it for bench/scale.py). Import as `from testkit import
harness` or `from testkit.controlplane import ControlPlane`.
"""
