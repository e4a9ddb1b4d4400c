//! The `blotcdn` binary: parse the command line, start tracing, hand over.

use clap::Parser;

#[tokio::main]
async fn main() {
    blotcdn::telemetry::init();
    let cli = blotcdn::cli::Cli::parse();
    if let Err(e) = blotcdn::cli::run(cli).await {
        eprintln!("blotcdn: {e:#}");
        std::process::exit(2);
    }
}
