#!/usr/bin/env bash
# Runs every test. On a fresh machine it first installs what the tests use
# (varnish, caddy, nginx, redis, wrk, grpcurl, cargo-nextest, node, chromium,
# FUSE and the Python packages of the power-loss tests); idempotent.
# Then the power-loss tests, the Node client's tests and the examples/blog
# browser test, against the binary just built (BLOTCDN_BIN overrides it).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-test-deps.sh
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
cargo build --locked --all-targets
status=0
cargo nextest run --locked --no-fail-fast "$@" || status=$?
export BLOTCDN_BIN="${BLOTCDN_BIN:-$PWD/target/debug/blotcdn}"

# Power-loss tests: the binary just built, its data dir on a FUSE filesystem
# that forgets what was not fsynced (tests/powerloss/lossyfs.py).
python3 -m pytest -q -rxXf tests/powerloss || status=$?

# npm ci when node_modules is missing or older than the lockfile.
npm_ci_if_stale() {
  if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
    npm ci --no-audit --no-fund
  fi
}
(cd clients/node && npm_ci_if_stale && npm test) || status=$?
(cd examples/blog && npm_ci_if_stale && npm test) || status=$?
exit "$status"
