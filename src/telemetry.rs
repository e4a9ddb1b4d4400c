//! Logs and traces. Level from `RUST_LOG` (default `info`). The subscriber is
//! built here and only here, so an OTLP exporter (tracing-opentelemetry) can
//! be added as one more layer without touching the rest.

use tracing_subscriber::{fmt, prelude::*, EnvFilter};

pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal, not in files and pipes.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let _ = tracing_subscriber::registry().with(filter).with(fmt::layer().with_target(false).with_ansi(ansi)).try_init();
}

/// For tests: logs only when `TEST_LOG` is set.
pub fn init_for_tests() {
    if std::env::var_os("TEST_LOG").is_some() {
        init();
    }
}
