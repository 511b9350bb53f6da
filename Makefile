# apitokens: the front door. `make run` for a demo, `make test` for everything.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV        := .venv
PY          := $(VENV)/bin/python
ENVOY       := $(VENV)/bin/envoy
WASM        := target/wasm32-wasip1/release/apitokens_filter.wasm
CP_BIN      := target/debug/apitokens
CHROMIUM    := /usr/bin/chromium
CARGO       ?= cargo
# The private PostgreSQL of the store tests, the replica drills and bench-scale:
# `$(PG) run -- CMD` starts one for CMD and removes it afterwards.
PG          := scripts/postgres.sh
# wasm-bindgen-test-runner must match the wasm-bindgen crate exactly.
WASM_BINDGEN_VERSION = $(shell awk '/^name = "wasm-bindgen"$$/{getline; gsub(/"/,"",$$3); print $$3}' Cargo.lock)

.PHONY: check requirements-lock postgres replicas differential differential-deps ui chromium bench bench-scale bench-leaks security drills soak cp-build cp-e2e fuzz run-static wasm-bindgen-cli help toolchain build venv test unit wasm-test e2e lint fmt run clean size images contract deploy

# Every target says what it does after `##` on its own line: `make help`
# lists them, `make lint` checks that none is missing.
help: ## this list
	@awk -F':.*## ' '/^[a-z][a-z0-9-]*:.*## /{printf "make %-18s %s\n", $$1, $$2}' $(firstword $(MAKEFILE_LIST))

toolchain: ## the Rust targets (wasm32-wasip1, wasm32-unknown-unknown), clippy and rustfmt
	@rustup target list --installed | grep -qx wasm32-wasip1 && rustup target list --installed | grep -qx wasm32-unknown-unknown \
	  || rustup target add wasm32-wasip1 wasm32-unknown-unknown
	@rustup component list --installed | grep -q '^clippy' || rustup component add clippy
	@rustup component list --installed | grep -q '^rustfmt' || rustup component add rustfmt

build: toolchain ## the wasm module (target/wasm32-wasip1/release/apitokens_filter.wasm)
	$(CARGO) build --release --target wasm32-wasip1 -p apitokens-filter
	@ls -l $(WASM) | awk '{print "module: $(WASM) (" $$5 " bytes)"}'

# The control plane binary (apitokens serve|bootstrap|render|import).
cp-build: ## the control plane binary (target/debug/apitokens)
	$(CARGO) build -p apitokens-control-plane

# Envoy 1.40 (official binary, V8) and the Python test tools, pinned with
# their dependencies, each file by its SHA-256 (tests/requirements.lock, made
# from tests/requirements.txt by `make requirements-lock`): a package that is
# not exactly the one locked, the Envoy binary included, is refused.
venv: $(VENV)/.installed ## Envoy 1.40 and the Python test tools, pinned by hash (.venv)
$(VENV)/.installed: tests/requirements.lock
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --require-hashes -r tests/requirements.lock
	@touch $@

# After editing tests/requirements.txt: the lock again, with every hash.
requirements-lock: ## tests/requirements.lock again from tests/requirements.txt
	python3 -m venv /tmp/apitokens-pip-tools
	/tmp/apitokens-pip-tools/bin/pip install --quiet --disable-pip-version-check pip-tools
	/tmp/apitokens-pip-tools/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras --no-emit-find-links \
	  -o tests/requirements.lock tests/requirements.txt

# Most suites run two at a time: most of their time is waiting (processes
# starting, ACKs, a browser), not CPU, and every one takes its ports from the
# kernel. Their waiting limits are doubled for it (APITOKENS_TEST_TIME_SCALE,
# tests/lib/testkit/timing.py); what they assert is unchanged. Each suite's
# output is printed whole when it ends. The fault drills and the replicas
# (kill -9, database restarts, heartbeats and timeouts) run alone afterwards.
SUITES := cp-e2e e2e security contract differential ui deploy
ALONE := replicas drills

test: lint unit wasm-test build cp-build venv postgres chromium differential-deps ## every suite below, as CI runs it: the builds, then most suites two at a time (about 9 minutes on 2 cores)
	APITOKENS_TEST_TIME_SCALE=2 $(MAKE) --no-print-directory -j2 --output-sync=target $(SUITES)
	$(MAKE) --no-print-directory $(ALONE)
	@echo "make test: all suites passed"

# The edit loop (about a minute once built): what CI would refuse first.
check: toolchain ## the edit loop: cargo fmt --check, clippy (host and wasm32), the Rust unit tests (SQLite only)
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy --target wasm32-wasip1 -p apitokens-filter -p apitokens-core -- -D warnings
	$(CARGO) test --workspace

# The store's tests run on SQLite and on a private PostgreSQL server.
unit: postgres ## the Rust unit tests, the stores on SQLite and on a private PostgreSQL
	$(PG) run -- env APITOKENS_REQUIRE_POSTGRES=1 $(CARGO) test --workspace

# Debian's PostgreSQL packages (apt-get, when no server is installed).
postgres: ## Debian's PostgreSQL server, if none is installed
	@$(PG) install

wasm-bindgen-cli: ## the wasm-bindgen test runner matching Cargo.lock
	@if [ "$$(wasm-bindgen-test-runner --version 2>/dev/null | awk '{print $$2}')" != "$(WASM_BINDGEN_VERSION)" ]; then \
	  echo "installing wasm-bindgen-cli $(WASM_BINDGEN_VERSION) (a few minutes, once)"; \
	  $(CARGO) install --locked wasm-bindgen-cli --version $(WASM_BINDGEN_VERSION) --force; \
	fi

# The decision tests again, compiled to wasm32 and run under Node.js.
wasm-test: toolchain wasm-bindgen-cli ## the core tests compiled to wasm32 and run under Node.js
	CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner \
	  $(CARGO) test -p apitokens-core --target wasm32-unknown-unknown

# The filter in a real Envoy 1.40, static configuration.
e2e: build venv ## the filter in a real Envoy 1.40, static configuration (tests/e2e)
	ENVOY_BIN=$(ENVOY) APITOKENS_WASM=$(WASM) $(PY) -m pytest -q tests/e2e

# The control plane and Envoy on ECDS: the whole token lifecycle.
cp-e2e: build cp-build venv ## the control plane and Envoy on ECDS: the whole token lifecycle (tests/cp)
	ENVOY_BIN=$(ENVOY) APITOKENS_BIN=$(CP_BIN) $(PY) -m pytest -q tests/cp

# The API contract: control-plane/openapi.json validated, and schemathesis
# calls generated from it against a real control plane (owner, editor, viewer).
contract: cp-build venv ## the OpenAPI document validated, then schemathesis against a real control plane
	APITOKENS_BIN=$(CP_BIN) $(PY) -m pytest -q tests/contract

# deploy/: every Kubernetes manifest against the Kubernetes schemas (offline)
# and the Deployment's own arguments run; the Containerfiles linted (hadolint),
# both images built with podman (Debian's, installed if missing) from the
# binaries already built (the debug control plane: a release build does not
# fit in `make test`; `make images` makes the release ones), inspected, and
# their files run under chroot (containers cannot run on these machines).
deploy: build cp-build venv postgres ## Kubernetes manifests against the schemas, Containerfiles linted, images built and their files run
	@scripts/images.sh install
	$(PG) run -- env APITOKENS_REQUIRE_POSTGRES=1 ENVOY_BIN=$(ENVOY) APITOKENS_BIN=$(CP_BIN) APITOKENS_WASM=$(WASM) $(PY) -m pytest -q tests/deploy

lint: toolchain ## cargo fmt --check and clippy -D warnings (host and wasm32); every make target described here
	@missing=$$(grep -oE '^[a-z][a-z0-9-]*:' $(firstword $(MAKEFILE_LIST)) | tr -d : | sort -u | while read t; do \
	  grep -qE "^$$t:.*## " $(firstword $(MAKEFILE_LIST)) || echo $$t; done); \
	  [ -z "$$missing" ] || { echo "Makefile targets without a ## description: $$missing"; exit 1; }
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy --target wasm32-wasip1 -p apitokens-filter -p apitokens-core -- -D warnings

fmt: ## cargo fmt
	$(CARGO) fmt --all

# Fuzzing (libFuzzer via cargo-fuzz; the stable toolchain with RUSTC_BOOTSTRAP
# for the sanitizer flags). New inputs go to a scratch corpus; crashes land in
# fuzz/regressions/<target>/, which `make test` replays: commit them.
fuzz: toolchain ## the fuzz targets, FUZZ_SECONDS each (default 120)
	@scripts/fuzz.sh

# The adversarial corpus (tests/security/corpus.yaml) over HTTP/1.1 and HTTP/2,
# shipped ECDS Envoy + real control plane; last line "N passed, N failed".
security: build cp-build venv ## the adversarial corpus over HTTP/1.1 and HTTP/2 against the shipped ECDS Envoy
	ENVOY_BIN=$(ENVOY) APITOKENS_BIN=$(CP_BIN) $(PY) -m pytest -q tests/security

# Real routers (Express and method-override from npm, Flask and method-override
# from PyPI) behind the shipped envoy/envoy.yaml: every route a request ran must
# be one the token's role permits; last line "N passed, N failed".
differential: build venv differential-deps ## real routers (Express, Flask) behind the shipped Envoy: every route that ran must be permitted
	ENVOY_BIN=$(ENVOY) APITOKENS_WASM=$(WASM) $(PY) -m pytest -q tests/differential

differential-deps: tests/differential/node_modules/.installed ## the differential suite's npm packages
tests/differential/node_modules/.installed: tests/differential/package-lock.json
	cd tests/differential && npm ci --no-audit --no-fund
	@touch $@

# Debian's Chromium for tests/ui (the Playwright package drives it; its own
# browser download is never used).
chromium: ## Debian's Chromium for the console tests
	@[ -x $(CHROMIUM) ] || { echo "installing chromium from Debian (once)"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends chromium; }

# The web console in headless Chromium through the shipped ECDS Envoy and the real control plane.
ui: build cp-build venv chromium ## the web console in headless Chromium (tests/ui)
	ENVOY_BIN=$(ENVOY) APITOKENS_BIN=$(CP_BIN) CHROMIUM_BIN=$(CHROMIUM) $(PY) -m pytest -q tests/ui

# Several control planes on one private PostgreSQL (tests/replicas).
replicas: build cp-build venv postgres ## three control planes on a private PostgreSQL, three Envoys: read-your-writes, kill -9, database restart
	$(PG) run -- env ENVOY_BIN=$(ENVOY) APITOKENS_BIN=$(CP_BIN) $(PY) -m pytest -q tests/replicas

# Fast fault drills: kill -9 loop, control plane down, NACK, expiry mid-load.
drills: build cp-build venv ## fast fault drills: kill -9 loop, control plane down, NACK, expiry under load
	ENVOY_BIN=$(ENVOY) APITOKENS_BIN=$(CP_BIN) $(PY) -m pytest -q tests/drills

# Long drills (~4 min): 1,000 reconfigurations under load, 50 kill -9 rounds,
# a webhook receiver down for a minute.
soak: build cp-build venv ## long drills (about 4 minutes): 1,000 pushes under load, 50 kill -9 rounds, a webhook receiver down for a minute
	APITOKENS_SOAK=1 ENVOY_BIN=$(ENVOY) APITOKENS_BIN=$(CP_BIN) $(PY) -m pytest -q tests/drills
	APITOKENS_WEBHOOK_OUTAGE_S=60 ENVOY_BIN=$(ENVOY) APITOKENS_BIN=$(CP_BIN) $(PY) -m pytest -q tests/cp/test_20_webhooks.py

# Side by side: no filter, api_key_auth, Lua, ext_authz, a one-header wasm
# filter, and apitokens with 10/10k/100k tokens (bench/README.md). About 9 min.
bench: build venv ## the side-by-side benchmark (about 9 minutes), tables in bench/results/latest.md
	ENVOY_BIN=$(ENVOY) APITOKENS_WASM=$(WASM) $(PY) bench/run.py $(BENCH_ARGS)

# Configuration and revocation with 1k, 100k and 1M tokens (about 4 minutes);
# it uses the tests' package testkit (tests/lib/testkit).
bench-scale: build venv postgres ## configuration and revocation at 1k/100k/1M tokens, tables in bench/results/scale.md
	$(CARGO) build --release -p apitokens-control-plane
	$(PG) run -- env PYTHONPATH=tests/lib ENVOY_BIN=$(ENVOY) APITOKENS_WASM=$(WASM) $(PY) bench/scale.py $(SCALE_ARGS)

bench-leaks: build venv ## leak reports' answer time, matched or not, at 100k tokens (about a minute), bench/results/leak-reports.md
	$(CARGO) build --release -p apitokens-control-plane
	env PYTHONPATH=tests/lib ENVOY_BIN=$(ENVOY) APITOKENS_WASM=$(WASM) $(PY) bench/leak_reports.py $(LEAK_ARGS)

# Control plane + Envoy on ECDS + demo upstream, a bootstrap owner token, curl lines.
run: build cp-build venv ## control plane + Envoy (ECDS) + demo upstream, an owner token, curl lines for the lifecycle
	@scripts/run-demo.sh

# The filter alone: Envoy with envoy/envoy.yaml and three demo tokens.
run-static: build venv ## the filter alone: Envoy with envoy/envoy.yaml and three demo tokens
	@scripts/run-static.sh

# The container images from deploy/images (podman, installed from Debian if
# missing), built from the release binaries: ghcr.io/apitokens/control-plane
# and ghcr.io/apitokens/filter (also localhost/apitokens/...), archives in target/images.
images: toolchain ## container images (podman), archives in target/images
	@scripts/images.sh install
	scripts/images.sh build

size: build ## the wasm module's size
	@ls -l $(WASM)

clean: ## remove build outputs and the virtualenv
	$(CARGO) clean
	rm -rf $(VENV) .run tests/differential/node_modules
