//! The `blotcdn` binary: parse the command line, start tracing, hand over.

use clap::Parser;

// Every resolve allocates a string per URL and the gRPC layer a few buffers
// per call; mimalloc makes those markedly cheaper than glibc's malloc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    blotcdn::telemetry::init();
    let cli = blotcdn::cli::Cli::parse();
    if let Err(e) = blotcdn::cli::run(cli).await {
        eprintln!("blotcdn: {e:#}");
        std::process::exit(2);
    }
}
