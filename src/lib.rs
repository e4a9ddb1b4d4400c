//! blotcdn: the source of truth behind Blot's CDN. See ARCHITECTURE.md for
//! the map, DESIGN.md (in the project's shared notes) for the contract.

pub mod app;
pub mod blogfs;
pub mod cas;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod dirlock;
pub mod domain;
pub mod durable;
pub mod grpc;
pub mod listen;
pub mod metrics;
pub mod migrate;
pub mod origin;
pub mod outbound;
pub mod purge;
pub mod store;
pub mod telemetry;

/// Code generated from `proto/blotcdn/v1/blotcdn.proto`.
pub mod proto {
    tonic::include_proto!("blotcdn.v1");

    /// The encoded descriptor set, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/blotcdn_descriptor.bin"));
}

/// Client code for the part of etcd's v3 API cluster mode uses
/// (`proto/etcd/kv.proto`).
pub mod etcdpb {
    #![allow(clippy::all)]
    tonic::include_proto!("etcdserverpb");
}
