//! The integration tests, one module per area, linked into one test binary:
//! seventeen binaries each linking the whole dependency tree took seventeen
//! links and most of a small CI disk. nextest (the README's test command)
//! runs every test in its own process, so no test shares state with another
//! through this crate. Under plain `cargo test` they share one process:
//! environment variables set by one (`purge`) and resource limits (`limits`)
//! reach the others.

mod common;

mod assets;
mod cli;
mod cluster;
mod domain_props;
mod durability;
mod edge;
mod grpc;
mod grpcurl;
mod limits;
mod memory;
mod metrics;
mod migrate;
mod origin;
mod origin_changes;
mod otlp;
mod purge;
mod reliability;
