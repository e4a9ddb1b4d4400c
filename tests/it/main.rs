//! The integration tests, one module per area, linked into one test binary:
//! seventeen binaries each linking the whole dependency tree took seventeen
//! links and most of a small CI disk. nextest still runs every test in its
//! own process, so no test shares state with another through this crate.

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
mod otlp;
mod purge;
mod reliability;
