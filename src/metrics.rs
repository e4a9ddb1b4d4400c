//! Prometheus metrics: the names of DESIGN.md ("Observability"), recorded
//! through the `metrics` facade and rendered by `metrics-exporter-prometheus`
//! (the classic text exposition), served at `GET /metrics` on `metrics_addr`,
//! never on the origin's port. Process metrics come from `metrics-process`.
//!
//! Costs on the hot paths: a counter is one hash look-up of a static key and
//! an atomic add; the resolve path counts per batch, not per path. Gauges of
//! things that are expensive to count (CAS blobs and bytes) are refreshed in
//! the background, not at scrape time.

use std::convert::Infallible;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::catalog::Catalog;

pub const RPC_REQUESTS: &str = "blotcdn_rpc_requests_total";
pub const RPC_DURATION: &str = "blotcdn_rpc_duration_seconds";
pub const RESOLVE_PATHS: &str = "blotcdn_resolve_paths_total";
pub const HTTP_REQUESTS: &str = "blotcdn_http_requests_total";
pub const HTTP_BYTES: &str = "blotcdn_http_response_bytes_total";
pub const HOT_HITS: &str = "blotcdn_hot_cache_hits_total";
pub const HOT_MISSES: &str = "blotcdn_hot_cache_misses_total";
pub const WAL_FSYNC: &str = "blotcdn_wal_fsync_seconds";
pub const FALLBACK_REQUESTS: &str = "blotcdn_fallback_requests_total";
pub const PURGE_QUEUE: &str = "blotcdn_purge_queue_length";
pub const PURGE_SENT: &str = "blotcdn_purge_sent_total";
pub const PURGE_SECONDS: &str = "blotcdn_purge_delivery_seconds";
pub const INDEX_PATHS: &str = "blotcdn_index_paths";
pub const CAS_BLOBS: &str = "blotcdn_cas_blobs";
pub const CAS_BYTES: &str = "blotcdn_cas_bytes";
pub const CAS_CHECKS: &str = "blotcdn_cas_blob_checks_total";
pub const STORE_UP: &str = "blotcdn_store_up";
pub const ETCD_TXN: &str = "blotcdn_etcd_txn_seconds";

/// The recorder is process-wide (the `metrics` facade has one); several
/// servers in one process (tests) share it.
fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let latency = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(RPC_DURATION.into()), &latency)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full(WAL_FSYNC.into()), &latency))
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full(PURGE_SECONDS.into()), &latency))
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full(ETCD_TXN.into()), &latency))
            .expect("bucket lists are not empty")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder may be installed already (only in tests that embed
        // the library); this handle then renders nothing of ours.
        let _ = metrics::set_global_recorder(recorder);
        describe();
        handle
    })
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(RPC_REQUESTS, "gRPC calls answered, by method and status code");
    describe_histogram!(RPC_DURATION, Unit::Seconds, "gRPC call latency, by method");
    describe_counter!(RESOLVE_PATHS, "paths answered by ResolveBatch, by resolve status");
    describe_counter!(HTTP_REQUESTS, "origin requests answered, by route and HTTP status");
    describe_counter!(HTTP_BYTES, Unit::Bytes, "origin response body bytes (Content-Length), by route");
    describe_counter!(HOT_HITS, "origin file reads answered from the hot-file cache");
    describe_counter!(HOT_MISSES, "origin file reads that went to the disk");
    describe_histogram!(WAL_FSYNC, Unit::Seconds, "fdatasync of the write-ahead log, one per group commit");
    describe_counter!(FALLBACK_REQUESTS, "fallback origin fetches, by origin and outcome");
    describe_gauge!(PURGE_QUEUE, "purge keys waiting, by edge target");
    describe_counter!(PURGE_SENT, "purge keys sent to an edge target, by target and outcome (ok, error, throttled)");
    describe_histogram!(PURGE_SECONDS, Unit::Seconds, "one purge request to an edge target, by target");
    describe_gauge!(INDEX_PATHS, "path versions held in the in-memory index");
    describe_gauge!(CAS_BLOBS, "blobs in the content-addressed store");
    describe_gauge!(CAS_BYTES, Unit::Bytes, "bytes in the content-addressed store");
    describe_counter!(
        CAS_CHECKS,
        "blobs hashed by the origin before answering with them, by outcome (whole, damaged: refused with a 500)"
    );
    describe_gauge!(STORE_UP, "1 while the store takes writes, 0 while it refuses them (see /healthz)");
    describe_histogram!(ETCD_TXN, Unit::Seconds, "one etcd transaction of a write group (cluster mode)");
}

/// Installs the recorder (once per process).
pub fn init() {
    handle();
}

/// gRPC status codes by their canonical names, for the `code` label.
pub fn code_label(c: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match c {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// HTTP statuses the origin answers, as static label values.
/// The origin's routes, as its `route` label takes them.
pub const ROUTES: [&str; 6] = ["healthz", "ask", "asset", "versioned", "unversioned", "other"];
const STATUSES: [&str; 10] = ["200", "206", "304", "400", "404", "405", "416", "500", "503", "other"];

/// The origin's per-request counters, each registered once and then kept:
/// a request costs two atomic adds, no look-up in the recorder's registry
/// (which hashes the name and labels every time).
pub struct HttpCounters {
    requests: [[OnceLock<metrics::Counter>; STATUSES.len()]; ROUTES.len()],
    bytes: [OnceLock<metrics::Counter>; ROUTES.len()],
}

impl Default for HttpCounters {
    fn default() -> Self {
        HttpCounters {
            requests: std::array::from_fn(|_| std::array::from_fn(|_| OnceLock::new())),
            bytes: std::array::from_fn(|_| OnceLock::new()),
        }
    }
}

impl HttpCounters {
    /// One answered request of `route` (an index into [`ROUTES`]).
    pub fn request(&self, route: usize, status: StatusCode, bytes: Option<u64>) {
        let si = status_index(status);
        self.requests[route][si]
            .get_or_init(|| metrics::counter!(HTTP_REQUESTS, "route" => ROUTES[route], "status" => STATUSES[si]))
            .increment(1);
        if let Some(n) = bytes {
            self.bytes[route].get_or_init(|| metrics::counter!(HTTP_BYTES, "route" => ROUTES[route])).increment(n);
        }
    }
}

/// The position of a status in [`STATUSES`] (the last: "other").
fn status_index(s: StatusCode) -> usize {
    match s.as_u16() {
        200 => 0,
        206 => 1,
        304 => 2,
        400 => 3,
        404 => 4,
        405 => 5,
        416 => 6,
        500 => 7,
        503 => 8,
        _ => 9,
    }
}

/// Serves `/metrics` until `stop` turns true. Each scrape first refreshes
/// the process metrics and the index size.
/// `conns`: the listener's connections (`listen::incoming`); `idle`: how
/// long one may wait for a request's head.
pub async fn serve(
    conns: impl futures_util::Stream<Item = std::io::Result<crate::listen::Guarded>>,
    idle: Duration,
    catalog: Arc<Catalog>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let process = Arc::new(metrics_process::Collector::default());
    process.describe();
    // CAS sizes: walked in the background, never at scrape time.
    let cas_task = {
        let catalog = catalog.clone();
        tokio::spawn(async move {
            loop {
                let c = catalog.clone();
                if let Ok(Ok((blobs, bytes))) = tokio::task::spawn_blocking(move || c.cas().totals()).await {
                    metrics::gauge!(CAS_BLOBS).set(blobs as f64);
                    metrics::gauge!(CAS_BYTES).set(bytes as f64);
                }
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(hyper_util::rt::TokioTimer::new());
    builder.header_read_timeout(idle);
    // One scrape per connection, and the whole of it within `idle`: a
    // client that pipelines requests and reads none of the answers must
    // not hold its slot (the header timeout does not cover writes).
    builder.keep_alive(false);
    let mut conns = std::pin::pin!(conns);
    loop {
        tokio::select! {
            accepted = conns.next() => {
                let Some(Ok(stream)) = accepted else { break };
                let (process, catalog) = (process.clone(), catalog.clone());
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (process, catalog) = (process.clone(), catalog.clone());
                    async move { Ok::<_, Infallible>(answer(&req, &process, &catalog)) }
                });
                let conn = builder.serve_connection(TokioIo::new(stream), svc);
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(idle, conn).await;
                });
            }
            _ = async { let _ = stop.wait_for(|s| *s).await; } => break,
        }
    }
    cas_task.abort();
    let _ = cas_task.await;
}

fn answer(req: &Request<Incoming>, process: &metrics_process::Collector, catalog: &Catalog) -> Response<Full<Bytes>> {
    if req.uri().path() != "/metrics" {
        let mut r = Response::new(Full::new(Bytes::from_static(b"only /metrics here\n")));
        *r.status_mut() = StatusCode::NOT_FOUND;
        return r;
    }
    process.collect();
    metrics::gauge!(INDEX_PATHS).set(catalog.store().index_paths() as f64);
    metrics::gauge!(STORE_UP).set(if catalog.store().health().is_ok() { 1.0 } else { 0.0 });
    let mut r = Response::new(Full::new(Bytes::from(handle().render())));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    r
}
