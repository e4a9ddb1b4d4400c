#!/usr/bin/env bash
# Runs every test. On a fresh machine it first installs what the tests use
# (varnish, caddy, nginx, redis, wrk, grpcurl, cargo-nextest, FUSE and the
# Python packages of the power-loss tests); idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-test-deps.sh
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
cargo build --locked --all-targets
status=0
cargo nextest run --locked --no-fail-fast "$@" || status=$?
# Power-loss tests: the binary just built, its data dir on a FUSE filesystem
# that forgets what was not fsynced (tests/powerloss/lossyfs.py).
BLOTCDN_BIN="$PWD/target/debug/blotcdn" python3 -m pytest -q -rxXf tests/powerloss || status=$?
exit "$status"
