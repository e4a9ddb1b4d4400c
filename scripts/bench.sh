#!/usr/bin/env bash
# Builds in release mode and runs every benchmark against the real server on
# 127.0.0.1, each next to a peer measured in the same run (Redis, nginx, the
# disk, BLAKE3, Varnish with the legacy scheme). Prints a table.
#   ./scripts/bench.sh                 # everything, full length (about 12 minutes, after a release build with LTO of about 9)
#   ./scripts/bench.sh --quick         # every phase four times shorter
#   ./scripts/bench.sh resolve origin  # some of: resolve origin publish ingest scale memory edge purge migrate cluster soak
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-test-deps.sh
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
cargo build --release --locked
# Scratch data goes under target/bench (on the project's own disk).
mkdir -p target/bench
cd target/bench
exec cargo bench --locked --manifest-path ../../Cargo.toml --bench bench -- "$@"
