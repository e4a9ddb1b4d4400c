//! Logs and traces. Logs: `RUST_LOG` (default `info`) to stdout. Traces:
//! when an OTLP endpoint is set (`otlp_endpoint`, `BLOTCDN_OTLP_ENDPOINT`,
//! or the standard `OTEL_EXPORTER_OTLP_ENDPOINT`), spans go through
//! `tracing-opentelemetry` to an OTLP/gRPC exporter, in batches off the
//! request path, sampled by the standard `OTEL_TRACES_SAMPLER` and
//! `OTEL_TRACES_SAMPLER_ARG`, as `service.name = blotcdn`, and flushed at
//! shutdown. Without an endpoint no exporter exists and the request spans
//! (debug level) are disabled: they cost a disabled callsite's check.
//!
//! W3C trace context: [`remote_parent`] reads a `traceparent` from incoming
//! headers (gRPC metadata are HTTP/2 headers), [`inject`] writes the current
//! span's into outgoing ones (fallback fetches).

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{DynFilterFn, EnvFilter, FilterExt, LevelFilter, Targets};
use tracing_subscriber::{fmt, prelude::*};

/// Keeps the exporter alive; flushes what is left on [`Telemetry::shutdown`].
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the spans still waiting (blocking: call it off the async workers).
    pub fn shutdown(self) {
        if let Some(p) = self.provider {
            if let Err(e) = p.shutdown() {
                eprintln!("blotcdn: flushing traces at shutdown failed: {e}");
            }
        }
    }
}

/// Logs, and traces to `otlp_endpoint` when given.
pub fn init(otlp_endpoint: Option<&str>) -> Telemetry {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal, not in files and pipes.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let logs = fmt::layer().with_target(false).with_ansi(ansi).with_filter(log_filter(filter));
    let provider = otlp_endpoint.and_then(|ep| match provider(ep) {
        Ok(p) => Some(p),
        Err(e) => {
            eprintln!("blotcdn: traces stay off: cannot set up the OTLP exporter for {ep}: {e}");
            None
        }
    });
    let traces = provider.as_ref().map(|p| {
        opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("blotcdn"))
            .with_filter(Targets::new().with_target("blotcdn", LevelFilter::DEBUG))
    });
    let _ = tracing_subscriber::registry().with(logs).with(traces).try_init();
    if let Some(ep) = otlp_endpoint.filter(|_| provider.is_some()) {
        tracing::info!(endpoint = ep, "exporting traces over OTLP");
    }
    Telemetry { provider }
}

/// What the log shows: what `filter` (`RUST_LOG`) lets through, the
/// exporter's own errors at most every ten seconds.
fn log_filter<S>(filter: EnvFilter) -> impl tracing_subscriber::layer::Filter<S> {
    filter.and(quiet_exporter())
}

/// The exporter's own errors (a collector down or answering garbage) at most
/// once every ten seconds: it says one for each batch it fails to send, up to
/// dozens a second under load, and would fill the log's disk.
fn quiet_exporter<S>() -> impl tracing_subscriber::layer::Filter<S> {
    use std::sync::atomic::{AtomicU64, Ordering};
    use tracing::subscriber::Interest;
    static LAST: AtomicU64 = AtomicU64::new(0);
    let exporter = |m: &tracing::Metadata<'_>| m.target().starts_with("opentelemetry");
    DynFilterFn::new(move |m, _| {
        if !exporter(m) || !m.is_event() {
            return true;
        }
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let last = LAST.load(Ordering::Relaxed);
        now >= last + 10 && LAST.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
    })
    .with_callsite_filter(move |m| if exporter(m) { Interest::sometimes() } else { Interest::always() })
    // It passes every level, the level being `EnvFilter`'s to say. Without a
    // hint, the pair (`And`) had none, so tracing's most verbose level was
    // TRACE and every callsite of every level in the program (h2's, hyper's and
    // tonic's trace events, on every call) was looked at: ResolveBatch at batch
    // 1 took 1.7–1.9× the server CPU per call.
    .with_max_level_hint(LevelFilter::TRACE)
}

fn provider(endpoint: &str) -> Result<SdkTracerProvider, Box<dyn std::error::Error>> {
    use opentelemetry_otlp::WithExportConfig;
    // The SDK's batch processor exports from a thread of its own, where the
    // tonic channel finds no Tokio reactor: the exporter gets a small
    // runtime of its own, used only for that.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).thread_name("otlp").enable_all().build()?;
    let inner = {
        let _in_rt = rt.enter();
        opentelemetry_otlp::SpanExporter::builder().with_tonic().with_endpoint(endpoint).build()
    };
    let inner = match inner {
        Ok(i) => i,
        Err(e) => {
            // Dropped here, inside the server's runtime, it would panic.
            rt.shutdown_background();
            return Err(e.into());
        }
    };
    let resource = opentelemetry_sdk::Resource::builder().with_service_name("blotcdn").build();
    // The sampler comes from OTEL_TRACES_SAMPLER / _ARG (the SDK's default
    // configuration reads them), parent-based always-on otherwise.
    Ok(SdkTracerProvider::builder().with_batch_exporter(OwnRuntime { inner, rt }).with_resource(resource).build())
}

#[derive(Debug)]
struct OwnRuntime {
    inner: opentelemetry_otlp::SpanExporter,
    rt: tokio::runtime::Runtime,
}

impl SpanExporter for OwnRuntime {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = opentelemetry_sdk::error::OTelSdkResult> + Send {
        std::future::ready(self.rt.block_on(self.inner.export(batch)))
    }

    fn shutdown_with_timeout(&self, timeout: std::time::Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        let _in_rt = self.rt.enter();
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        let _in_rt = self.rt.enter();
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

/// For tests: logs only when `TEST_LOG` is set; no traces.
pub fn init_for_tests() {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = tracing_subscriber::registry()
            .with(fmt::layer().with_target(false).with_filter(EnvFilter::new("info")))
            .try_init();
    }
}

struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct HeadersMut<'a>(&'a mut http::HeaderMap);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (http::HeaderName::from_bytes(key.as_bytes()), http::HeaderValue::from_str(&value)) {
            self.0.insert(k, v);
        }
    }
}

/// Continues the caller's trace: `span` becomes a child of the `traceparent`
/// in `headers`, if there is one.
pub fn remote_parent(span: &tracing::Span, headers: &http::HeaderMap) {
    if span.is_disabled() || !headers.contains_key("traceparent") {
        return;
    }
    let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(&Headers(headers)));
    let _ = span.set_parent(cx);
}

/// Writes `span`'s trace context into outgoing `headers`.
pub fn inject(span: &tracing::Span, headers: &mut http::HeaderMap) {
    if span.is_disabled() {
        return;
    }
    let cx = span.context();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut HeadersMut(headers)));
}

/// True at most once a second per `slot` (a static): for warnings a flood
/// would otherwise repeat thousands of times (accept failures while
/// descriptors are gone, calls refused for want of one).
pub fn once_a_second(slot: &std::sync::atomic::AtomicU64) -> bool {
    use std::sync::atomic::Ordering;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    slot.load(Ordering::Relaxed) != now && slot.swap(now, Ordering::Relaxed) != now
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::Filter;

    /// The log's filter tells tracing the most verbose level it lets through,
    /// so that callsites past it (h2's trace events on every call) are never
    /// looked at. It said none, and ResolveBatch at batch 1 took 1.7–1.9× the
    /// server CPU per call.
    #[test]
    fn the_log_filter_says_its_most_verbose_level() {
        for (directives, level) in
            [("info", LevelFilter::INFO), ("warn", LevelFilter::WARN), ("debug", LevelFilter::DEBUG)]
        {
            let f = log_filter::<tracing_subscriber::Registry>(EnvFilter::new(directives));
            assert_eq!(f.max_level_hint(), Some(level), "{directives}");
        }
    }
}
