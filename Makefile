# The two commands a newcomer needs: `make run` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

export SQLX_OFFLINE ?= true
export CARGO_TERM_COLOR ?= never
DEV_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/agentidp

.PHONY: help services browser run test lint openapi openapi-check sqlx-prepare sqlx-check build release bench \
	fuzz-api fuzz-api-quick fuzz chaos soak oidc-client

help:
	@echo "make run     start Postgres and Redis if needed, migrate, serve on 127.0.0.1:8080"
	@echo "make test    fmt, clippy, OpenAPI drift, offline-query check and all tests"
	@echo "make openapi regenerate openapi/openapi.json"
	@echo "make bench   benchmarks (not part of make test)"
	@echo "make fuzz-api  schemathesis over the whole OpenAPI document (make test runs a short one)"
	@echo "make fuzz      cargo-fuzz targets for the byte parsers, FUZZ_SECONDS each"
	@echo "make chaos     three instances, steady load, one fault at a time, the invariants' table"
	@echo "make soak DURATION=10m  half of the measured capacity held; RSS and fds over time"

services:
	@bash scripts/services.sh

# Headless Chromium and its WebDriver, for the browser tests.
browser:
	@bash scripts/browser.sh

# services.sh starts NATS with JetStream, so the service uses it: usage events are ingested from
# it and the event feed is published to it (either can be turned off with the same variables).
run: services
	AGENTIDP_USAGE__NATS__ENABLED=$${AGENTIDP_USAGE__NATS__ENABLED:-true} \
	AGENTIDP_EVENTS__NATS__ENABLED=$${AGENTIDP_EVENTS__NATS__ENABLED:-true} \
	cargo run --release --bin agentidp -- serve

build:
	cargo build --all-targets

release:
	cargo build --release --bin agentidp

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings

# The committed document must equal what the binary prints.
openapi:
	cargo run --quiet --bin agentidp -- openapi > openapi/openapi.json

openapi-check:
	@cargo run --quiet --bin agentidp -- openapi | diff -u openapi/openapi.json - \
	  || { echo "openapi/openapi.json is stale: run 'make openapi' and commit it"; exit 1; }
	@bash scripts/check-openapi.sh

# Compiling with SQLX_OFFLINE=true already fails when a query is missing from .sqlx/;
# with sqlx-cli present, also catch stale entries.
sqlx-check:
	@if cargo sqlx --version >/dev/null 2>&1; then \
	  cargo sqlx prepare --check --database-url "$(DEV_DATABASE_URL)" -- --all-targets; \
	else echo "sqlx-cli not installed: offline build is the .sqlx check"; fi

sqlx-prepare: services
	SQLX_OFFLINE=false DATABASE_URL="$(DEV_DATABASE_URL)" cargo sqlx migrate run --source migrations
	SQLX_OFFLINE=false cargo sqlx prepare --database-url "$(DEV_DATABASE_URL)" -- --all-targets

test: services browser lint openapi-check
	@cargo sqlx --version >/dev/null 2>&1 && DATABASE_URL="$(DEV_DATABASE_URL)" SQLX_OFFLINE=false cargo sqlx migrate run --source migrations >/dev/null || true
	$(MAKE) --no-print-directory sqlx-check
	@# Four at a time: each test runs one to three instances, each with its own Postgres pool and
	@# listeners, and Debian's Postgres allows 100 connections in all.
	@# Every instance the tests start logs to $$CARGO_TARGET_DIR/test-logs; the secrets the tests
	@# were shown are recorded there too, and none of them may appear in any log of the run.
	rm -rf "$${CARGO_TARGET_DIR:-target}/test-logs"
	cargo test --all-targets -- --test-threads=$${TEST_THREADS:-4}
	bash scripts/scan-logs.sh
	$(MAKE) --no-print-directory oidc-client
	$(MAKE) --no-print-directory fuzz-api-quick

# A real OpenID Connect client (authlib) against the served binary (scripts/oidc-client.sh):
# code + PKCE, the ID token checked against our JWKS, refresh, userinfo. Part of `make test`.
oidc-client: services
	bash scripts/oidc-client.sh

bench: services
	bash bench/run.sh

# Schema-driven fuzzing of the running binary (scripts/fuzz-api.sh): as a system admin, an org
# member and an agent. The quick run is part of `make test`.
fuzz-api: services
	FUZZ_API_SECONDS=$${FUZZ_API_SECONDS:-300} FUZZ_API_EXAMPLES=$${FUZZ_API_EXAMPLES:-200} bash scripts/fuzz-api.sh

fuzz-api-quick:
	FUZZ_API_SECONDS=$${FUZZ_API_SECONDS:-40} FUZZ_API_EXAMPLES=$${FUZZ_API_EXAMPLES:-15} bash scripts/fuzz-api.sh

# Parser fuzzing with cargo-fuzz (scripts/fuzz.sh); FUZZ_SECONDS per target.
fuzz:
	bash scripts/fuzz.sh

# Fault injection on services of its own (scripts/chaos.py); not part of `make test`.
chaos:
	cargo build --bin agentidp
	python3 scripts/chaos.py

DURATION ?= 10m
soak: services
	cargo build --bin agentidp
	python3 scripts/soak.py $(DURATION)
