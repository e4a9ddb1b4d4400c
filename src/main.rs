//! The `blotcdn` binary: parse the command line, start tracing, hand over.

use clap::Parser;

// Every resolve allocates a string per URL and the gRPC layer a few buffers
// per call; mimalloc makes those markedly cheaper than glibc's malloc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    let cli = blotcdn::cli::Cli::parse();
    let telemetry = blotcdn::telemetry::init(cli.otlp_endpoint().as_deref());
    let result = blotcdn::cli::run(cli).await;
    // Spans still waiting are exported before the process ends.
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    if let Err(e) = result {
        eprintln!("blotcdn: {e:#}");
        std::process::exit(2);
    }
}
