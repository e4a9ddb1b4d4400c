//! Protobuf code generation with no system `protoc`: protox parses the .proto
//! files in pure Rust, tonic-prost-build turns the descriptors into code, and
//! the encoded descriptor set is written for the reflection service to serve.
use prost::Message;

fn main() -> anyhow::Result<()> {
    let protos = ["proto/blotcdn/v1/blotcdn.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("blotcdn_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Upload chunks arrive as `Bytes`: handed to the CAS writer without a copy.
        .bytes(".blotcdn.v1.PutAssetChunk.data")
        .compile_fds(fds)?;
    // etcd's KV, Watch and Maintenance (alarms) services, client side only
    // (cluster mode).
    let etcd = ["proto/etcd/kv.proto"];
    for p in &etcd {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_fds(protox::compile(etcd, ["proto"])?)?;
    Ok(())
}
