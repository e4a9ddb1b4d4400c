#!/usr/bin/env bash
# Runs every test. On a fresh machine it first installs what the tests use
# (varnish, caddy, nginx, redis, wrk, grpcurl, cargo-nextest); idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-test-deps.sh
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
cargo build --locked --all-targets
cargo nextest run --locked --no-fail-fast "$@"
