//! The gRPC front door: `blotcdn.v1.Resolver` and `blotcdn.v1.Publisher`.
//! Each handler decodes the request, calls the [`Catalog`], and encodes the
//! answer; the rules live in the catalog, never here. Also the bearer-token
//! layer, and the one mapping from [`CatalogError`] to `tonic::Status`.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use futures_util::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::catalog::{AssetInfo, Catalog, CatalogError, PutHeader, ResolveStatus};
use crate::proto as pb;
use crate::store::StoreError;

mod budget;
pub use budget::{BudgetLayer, CallBudget, SIDE_MESSAGE_BYTES};

/// Largest gRPC message accepted: a full batch of 10,000 long paths fits.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

impl From<CatalogError> for Status {
    fn from(e: CatalogError) -> Status {
        let msg = e.to_string();
        match e {
            CatalogError::Invalid(_) | CatalogError::BadRequest(_) => Status::invalid_argument(msg),
            CatalogError::NotFound(_) => Status::not_found(msg),
            CatalogError::TooLarge(_) => Status::resource_exhausted(msg),
            CatalogError::Timeout(_) => Status::deadline_exceeded(msg),
            CatalogError::Changed(_) => Status::aborted(msg),
            CatalogError::Cancelled(_) => Status::cancelled(msg),
            CatalogError::Store(StoreError::Full(_)) => Status::resource_exhausted(msg),
            CatalogError::Store(StoreError::Unavailable(_) | StoreError::Closed) => Status::unavailable(msg),
            CatalogError::Io(ref io) if crate::durable::is_disk_full(io) => Status::resource_exhausted(format!(
                "the server's disk is full: the upload could not be stored ({io}); nothing was changed"
            )),
            CatalogError::Io(ref io) if crate::listen::out_of_descriptors(io) => {
                out_of_descriptors(io, "nothing was changed; ")
            }
            // The same shortage met inside the store: whether the call took
            // effect is the store's to say, so no more is claimed here.
            CatalogError::Store(StoreError::Io(ref io) | StoreError::Sled(sled::Error::Io(ref io)))
                if crate::listen::out_of_descriptors(io) =>
            {
                out_of_descriptors(io, "")
            }
            CatalogError::Store(_) | CatalogError::Io(_) => {
                tracing::error!(code = e.code(), error = %msg, "internal error");
                Status::internal(msg)
            }
        }
    }
}

fn out_of_descriptors(io: &std::io::Error, outcome: &str) -> Status {
    static WARNED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    if crate::telemetry::once_a_second(&WARNED) {
        tracing::warn!(error = %io, "out of file descriptors: calls are refused; raise `ulimit -n`");
    }
    Status::resource_exhausted(format!("the server has no file descriptor free ({io}); {outcome}retry in a moment"))
}

/// One span per call, open from the call's start to its end (so an exporter
/// sees its real duration): method, blog, item count, then outcome and
/// latency, recorded, logged and counted when the call ends. A call whose
/// future is dropped before it answers (the client went away, or its
/// deadline passed) is counted and logged as CANCELLED when the log goes.
struct CallLog {
    span: tracing::Span,
    start: Instant,
    method: &'static str,
    answered: bool,
}

impl CallLog {
    fn new(method: &'static str, blog: &str, items: usize) -> Self {
        let span = tracing::info_span!(
            "rpc",
            method,
            blog_id = tracing::field::Empty,
            items,
            outcome = tracing::field::Empty,
            latency_us = tracing::field::Empty
        );
        if !blog.is_empty() {
            span.record("blog_id", blog);
        }
        CallLog { span, start: Instant::now(), method, answered: false }
    }

    /// The blog, once known (an upload names it in its first chunk).
    fn blog(&self, blog: &str) {
        self.span.record("blog_id", blog);
    }

    fn done<T>(mut self, r: Result<T, Status>) -> Result<T, Status> {
        self.answered = true;
        let code = match &r {
            Ok(_) => tonic::Code::Ok,
            Err(s) => s.code(),
        };
        self.record(code, r.as_ref().err().map(|s| s.message()));
        r
    }

    fn record(&self, code: tonic::Code, message: Option<&str>) {
        let elapsed = self.start.elapsed();
        let method = self.method;
        metrics::counter!(crate::metrics::RPC_REQUESTS, "method" => method, "code" => crate::metrics::code_label(code))
            .increment(1);
        metrics::histogram!(crate::metrics::RPC_DURATION, "method" => method).record(elapsed.as_secs_f64());
        let latency_us = elapsed.as_micros() as u64;
        let outcome = code_name(code);
        self.span.record("outcome", outcome);
        self.span.record("latency_us", latency_us);
        let _e = self.span.enter();
        match message {
            Some(message) if matches!(code, tonic::Code::Internal | tonic::Code::Unknown) => {
                tracing::error!(outcome, latency_us, message, "call failed")
            }
            Some(message) => tracing::info!(outcome, latency_us, message, "call refused"),
            None => tracing::debug!(outcome, latency_us, "call done"),
        }
    }
}

impl Drop for CallLog {
    fn drop(&mut self) {
        if !self.answered {
            self.record(
                tonic::Code::Cancelled,
                Some("dropped before it answered: the client went away or its deadline passed"),
            );
        }
    }
}

/// The outcome a log line names: gRPC's code, in snake case.
fn code_name(c: tonic::Code) -> &'static str {
    use tonic::Code;
    match c {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

fn asset(a: AssetInfo) -> pb::Asset {
    pb::Asset { hash: a.hash.to_hex(), url: a.url, size: a.size, content_type: a.content_type, filename: a.filename }
}

/// The most one item of a `ResolveBatch` answer takes, past what its path
/// adds: its URL's `prefix` (the base URL and the blog id), then either two
/// slashes and a cache id, or `/_assets/`, a hash and a file name of 255
/// bytes each escaped to three; a content hash; the item's own fields; once
/// as values and once encoded.
pub fn answer_item_bytes(prefix: usize) -> u64 {
    2 * (prefix as u64 + 10 + 64 + 3 * 255 + 64 + 16) + 64
}

/// Takes the room an answer holds until it is sent (the message as built,
/// and encoded: three times its encoded length covers both) from the call's
/// share of the request memory; RESOURCE_EXHAUSTED if it does not fit, and
/// the answer is dropped unsent.
fn settle<T: prost::Message>(
    budget: Option<&CallBudget>,
    method: &'static str,
    answer: T,
) -> Result<Response<T>, Status> {
    if let Some(b) = budget {
        b.settle(method, answer.encoded_len() as u64)?;
    }
    Ok(Response::new(answer))
}

pub struct ResolverService {
    pub catalog: Arc<Catalog>,
}

#[tonic::async_trait]
impl pb::resolver_server::Resolver for ResolverService {
    async fn resolve_batch(
        &self,
        req: Request<pb::ResolveBatchRequest>,
    ) -> Result<Response<pb::ResolveBatchResponse>, Status> {
        let budget = req.extensions().get::<CallBudget>().cloned();
        let req = req.into_inner();
        let log = CallLog::new("ResolveBatch", &req.blog_id, req.paths.len());
        // The answer can be many times the request (a URL for every path of
        // a few bytes, a long file name for a permanent asset's): built (on
        // this thread, so at most a worker's count at once), then weighed
        // before it is held for sending.
        let r = self.catalog.resolve_batch(&req.blog_id, &req.paths).map_err(Status::from).and_then(|items| {
            // Counted per batch: three adds, whatever the batch's size.
            let mut by_status = [0u64; 3];
            for r in &items {
                by_status[r.status as usize] += 1;
            }
            for (status, n) in ["ok", "unknown_blog", "invalid_path"].into_iter().zip(by_status) {
                if n > 0 {
                    metrics::counter!(crate::metrics::RESOLVE_PATHS, "status" => status).increment(n);
                }
            }
            let assets = items
                .into_iter()
                .map(|r| pb::ResolvedAsset {
                    url: r.url,
                    status: match r.status {
                        ResolveStatus::Ok => pb::ResolveStatus::Ok,
                        ResolveStatus::UnknownBlog => pb::ResolveStatus::UnknownBlog,
                        ResolveStatus::InvalidPath => pb::ResolveStatus::InvalidPath,
                    } as i32,
                    cache_id: r.cache_id,
                    content_hash: r.content_hash.map(|h| h.to_hex()).unwrap_or_default(),
                })
                .collect();
            settle(budget.as_ref(), "ResolveBatch", pb::ResolveBatchResponse { assets })
        });
        log.done(r)
    }

    async fn get_blog(&self, req: Request<pb::GetBlogRequest>) -> Result<Response<pb::Blog>, Status> {
        let budget = req.extensions().get::<CallBudget>().cloned();
        let req = req.into_inner();
        let log = CallLog::new("GetBlog", &req.blog_id, 1);
        // Its domains have no count limit: weighed like any large answer.
        let r = self.catalog.get_blog(&req.blog_id).map_err(Status::from).and_then(|b| {
            let blog = pb::Blog {
                blog_id: b.blog_id.to_string(),
                cache_id: b.floor,
                domains: b.domains,
                path_count: b.path_count,
                asset_count: b.asset_count,
            };
            settle(budget.as_ref(), "GetBlog", blog)
        });
        log.done(r)
    }

    async fn lookup_domain(
        &self,
        req: Request<pb::LookupDomainRequest>,
    ) -> Result<Response<pb::LookupDomainResponse>, Status> {
        let req = req.into_inner();
        let log = CallLog::new("LookupDomain", "", 1);
        let r = self
            .catalog
            .lookup_domain(&req.domain)
            .map_err(Status::from)
            .map(|b| Response::new(pb::LookupDomainResponse { blog_id: b.to_string() }));
        log.done(r)
    }

    async fn get_info(&self, _req: Request<pb::GetInfoRequest>) -> Result<Response<pb::Info>, Status> {
        let c = &self.catalog;
        let log = CallLog::new("GetInfo", "", 0);
        log.done(Ok(Response::new(pb::Info {
            cdn_base_url: c.base_url().to_string(),
            max_batch: u32::try_from(c.max_batch()).unwrap_or(u32::MAX),
            url_style: self.catalog.url_style().as_str().to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        })))
    }
}

pub struct PublisherService {
    pub catalog: Arc<Catalog>,
    /// One permit per `PutAsset` stream open: each holds a descriptor and a
    /// temporary file, so their number is bounded server-wide.
    pub uploads: Arc<tokio::sync::Semaphore>,
    /// An upload silent for this long is dropped.
    pub upload_idle: std::time::Duration,
}

#[tonic::async_trait]
impl pb::publisher_server::Publisher for PublisherService {
    async fn invalidate(
        &self,
        req: Request<pb::InvalidateRequest>,
    ) -> Result<Response<pb::InvalidateResponse>, Status> {
        let req = req.into_inner();
        let log = CallLog::new("Invalidate", &req.blog_id, req.paths.len());
        let r = self
            .catalog
            .invalidate(&req.blog_id, &req.paths)
            .await
            .map_err(Status::from)
            .map(|cache_id| Response::new(pb::InvalidateResponse { cache_id }));
        log.done(r)
    }

    async fn put_asset(&self, req: Request<Streaming<pb::PutAssetChunk>>) -> Result<Response<pb::Asset>, Status> {
        use pb::put_asset_chunk::Chunk;
        // Counted from the start: a refusal before the header, or a stream
        // that breaks off before it, is a call too.
        let log = CallLog::new("PutAsset", "", 1);
        let Ok(permit) = self.uploads.clone().try_acquire_owned() else {
            return log.done(Err(Status::resource_exhausted(
                "too many uploads in flight (max_uploads); retry when one has finished",
            )));
        };
        let idle = self.upload_idle;
        // One sentence for the header and the chunks (DEADLINE_EXCEEDED).
        let idle_error = move || {
            CatalogError::Timeout(format!(
                "upload idle: nothing received for {} s (upload_idle_timeout_secs); the upload was dropped",
                idle.as_secs()
            ))
        };
        let mut stream = req.into_inner();
        let header = match tokio::time::timeout(idle, stream.next()).await {
            Err(_) => return log.done(Err(idle_error().into())),
            Ok(Some(Ok(pb::PutAssetChunk { chunk: Some(Chunk::Header(h)) }))) => h,
            Ok(Some(Ok(_))) => {
                return log.done(Err(Status::invalid_argument("the first PutAssetChunk must be a header")))
            }
            Ok(Some(Err(s))) if broke_off(&s) => {
                return log.done(Err(CatalogError::Cancelled(s.message().to_owned()).into()))
            }
            Ok(Some(Err(s))) => return log.done(Err(s)),
            Ok(None) => return log.done(Err(Status::invalid_argument("empty PutAsset stream: expected a header"))),
        };
        log.blog(&header.blog_id);
        // Each chunk must come within the idle timeout. The permit is held
        // by this call until the asset is stored or refused (the temporary
        // file and its descriptor live that long).
        let _permit = permit;
        let data = futures_util::stream::unfold((stream, true), move |(mut stream, open)| async move {
            if !open {
                return None;
            }
            let item = match tokio::time::timeout(idle, stream.next()).await {
                Err(_) => Some(Err(idle_error())),
                Ok(None) => None,
                Ok(Some(Ok(pb::PutAssetChunk { chunk: Some(Chunk::Data(d)) }))) => Some(Ok(d)),
                Ok(Some(Ok(pb::PutAssetChunk { chunk: Some(Chunk::Header(_)) }))) => {
                    Some(Err(CatalogError::BadRequest("only the first PutAssetChunk may be a header".into())))
                }
                Ok(Some(Ok(pb::PutAssetChunk { chunk: None }))) => Some(Err(CatalogError::BadRequest(
                    "a PutAssetChunk with neither header nor data: after the header, each chunk carries data".into(),
                ))),
                // The client went away or the connection was cut (the
                // message already says "upload broke off").
                Ok(Some(Err(s))) if broke_off(&s) => Some(Err(CatalogError::Cancelled(s.message().to_owned()))),
                // A chunk that does not decode, or one too large.
                Ok(Some(Err(s))) => {
                    Some(Err(CatalogError::BadRequest(format!("a bad PutAssetChunk: {}", s.message()))))
                }
            };
            // After an error the stream ends.
            let still_open = matches!(item, Some(Ok(_)));
            item.map(|i| (i, (stream, still_open)))
        });
        let data = Box::pin(data);
        let header = PutHeader {
            blog_id: header.blog_id,
            filename: header.filename,
            content_type: header.content_type,
            path: header.path,
        };
        let r = self.catalog.put_asset(header, data).await.map_err(Status::from).map(|a| Response::new(asset(a)));
        log.done(r)
    }

    async fn import_file(&self, req: Request<pb::ImportFileRequest>) -> Result<Response<pb::Asset>, Status> {
        let req = req.into_inner();
        let log = CallLog::new("ImportFile", &req.blog_id, 1);
        let r = self
            .catalog
            .import_file(&req.blog_id, &req.path)
            .await
            .map_err(Status::from)
            .map(|a| Response::new(asset(a)));
        log.done(r)
    }

    async fn set_domain(&self, req: Request<pb::SetDomainRequest>) -> Result<Response<pb::SetDomainResponse>, Status> {
        let req = req.into_inner();
        let log = CallLog::new("SetDomain", &req.blog_id, 1);
        let r = self
            .catalog
            .set_domain(&req.domain, &req.blog_id)
            .await
            .map_err(Status::from)
            .map(|_| Response::new(pb::SetDomainResponse {}));
        log.done(r)
    }

    async fn remove_domain(
        &self,
        req: Request<pb::RemoveDomainRequest>,
    ) -> Result<Response<pb::RemoveDomainResponse>, Status> {
        let req = req.into_inner();
        let log = CallLog::new("RemoveDomain", "", 1);
        let r = self
            .catalog
            .remove_domain(&req.domain)
            .await
            .map_err(Status::from)
            .map(|_| Response::new(pb::RemoveDomainResponse {}));
        log.done(r)
    }

    async fn delete_blog(
        &self,
        req: Request<pb::DeleteBlogRequest>,
    ) -> Result<Response<pb::DeleteBlogResponse>, Status> {
        let req = req.into_inner();
        let log = CallLog::new("DeleteBlog", &req.blog_id, 1);
        let r = self
            .catalog
            .delete_blog(&req.blog_id)
            .await
            .map_err(Status::from)
            .map(|_| Response::new(pb::DeleteBlogResponse {}));
        log.done(r)
    }

    async fn delete_asset(
        &self,
        req: Request<pb::DeleteAssetRequest>,
    ) -> Result<Response<pb::DeleteAssetResponse>, Status> {
        let req = req.into_inner();
        let log = CallLog::new("DeleteAsset", &req.blog_id, 1);
        let r = self
            .catalog
            .delete_asset(&req.blog_id, &req.hash)
            .await
            .map_err(Status::from)
            .map(|_| Response::new(pb::DeleteAssetResponse {}));
        log.done(r)
    }

    async fn purge(&self, req: Request<pb::PurgeRequest>) -> Result<Response<pb::PurgeResponse>, Status> {
        let req = req.into_inner();
        let log = CallLog::new("Purge", &req.blog_id, req.keys.len().max(1));
        let r = self
            .catalog
            .purge(&req.blog_id, req.keys)
            .await
            .map_err(Status::from)
            .map(|_| Response::new(pb::PurgeResponse {}));
        log.done(r)
    }

    async fn get_purges(&self, req: Request<pb::GetPurgesRequest>) -> Result<Response<pb::GetPurgesResponse>, Status> {
        let budget = req.extensions().get::<CallBudget>().cloned();
        let log = CallLog::new("GetPurges", "", 0);
        let queues = self
            .catalog
            .purge_queues()
            .into_iter()
            .map(|q| pb::PurgeQueue {
                target: q.target,
                length: q.length,
                oldest_ms: q.oldest_ms,
                last_error: q.last_error,
                sent: q.sent,
            })
            .collect();
        log.done(settle(budget.as_ref(), "GetPurges", pb::GetPurgesResponse { queues }))
    }
}

/// Bearer tokens per service. An empty list leaves that service open.
#[derive(Clone, Default)]
pub struct Tokens {
    pub resolver: Arc<[String]>,
    pub publisher: Arc<[String]>,
}

impl Tokens {
    /// The tokens that guard a gRPC path, or `None` when it is open (health,
    /// reflection, or a service without tokens).
    fn for_path(&self, path: &str) -> Option<&[String]> {
        let list = if path.starts_with("/blotcdn.v1.Resolver/") {
            &self.resolver
        } else if path.starts_with("/blotcdn.v1.Publisher/") {
            &self.publisher
        } else {
            return None;
        };
        (!list.is_empty()).then_some(&list[..])
    }
}

/// Compares in time independent of where the strings first differ.
fn token_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Clone)]
pub struct AuthLayer {
    pub tokens: Tokens,
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Auth<S> {
        Auth { inner, tokens: self.tokens.clone() }
    }
}

/// Refuses a call to a guarded service before its body is read, so a call
/// without the right token changes nothing.
#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    tokens: Tokens,
}

impl<S, B, R> tower::Service<http::Request<B>> for Auth<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures_util::future::Either<std::future::Ready<Result<http::Response<R>, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        use futures_util::future::Either;
        if let Some(allowed) = self.tokens.for_path(req.uri().path()) {
            let given = req
                .headers()
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| {
                    // The scheme is case-insensitive (RFC 9110, 11.1).
                    let (scheme, token) = v.trim_start().split_once(' ')?;
                    scheme.eq_ignore_ascii_case("bearer").then_some(token)
                })
                .map(str::trim);
            let ok = given.is_some_and(|g| allowed.iter().any(|t| token_eq(t.as_bytes(), g.as_bytes())));
            if !ok {
                let msg = if given.is_none() {
                    "missing bearer token: send `authorization: Bearer <token>` metadata"
                } else {
                    "wrong bearer token for this service"
                };
                tracing::info!(path = req.uri().path(), outcome = "unauthenticated", "call refused");
                return Either::Left(std::future::ready(Ok(Status::unauthenticated(msg).into_http())));
            }
        }
        Either::Right(self.inner.call(req))
    }
}

/// tonic reads a client's RST_STREAM(CANCEL) on a streaming request as a
/// clean end of the stream, which would store a truncated upload as a
/// complete asset. This layer rewraps request body errors of `PutAsset` so
/// that a broken upload reaches the handler as an error, and is dropped.
#[derive(Clone, Default)]
pub struct UploadGuardLayer;

impl<S> tower::Layer<S> for UploadGuardLayer {
    type Service = UploadGuard<S>;
    fn layer(&self, inner: S) -> UploadGuard<S> {
        UploadGuard { inner }
    }
}

#[derive(Clone)]
pub struct UploadGuard<S> {
    inner: S,
}

impl<S> tower::Service<http::Request<tonic::body::Body>> for UploadGuard<S>
where
    S: tower::Service<http::Request<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        if req.uri().path() == "/blotcdn.v1.Publisher/PutAsset" {
            let (parts, body) = req.into_parts();
            return self.inner.call(http::Request::from_parts(parts, tonic::body::Body::new(NoSilentCancel(body))));
        }
        self.inner.call(req)
    }
}

/// Whether an upload's stream failed because it broke off (the client went
/// away, the connection was cut), not because of what it sent.
fn broke_off(s: &Status) -> bool {
    // tonic wraps the body's error in a status or two on its way here.
    let mut cause = std::error::Error::source(s);
    while let Some(e) = cause {
        if e.is::<UploadBroken>() {
            return true;
        }
        cause = e.source();
    }
    s.code() == tonic::Code::Cancelled
}

/// The upload's body broke off. Deliberately without a `source()`, so that
/// tonic does not recognise the h2 CANCEL inside and call it a clean end.
#[derive(Debug, thiserror::Error)]
#[error("upload broke off: {0}")]
pub struct UploadBroken(String);

struct NoSilentCancel(tonic::body::Body);

impl http_body::Body for NoSilentCancel {
    type Data = bytes::Bytes;
    type Error = UploadBroken;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, UploadBroken>>> {
        std::pin::Pin::new(&mut self.0).poll_frame(cx).map(|f| f.map(|r| r.map_err(|e| UploadBroken(e.to_string()))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.0.size_hint()
    }
}

/// tonic answers a body it cannot decode with INTERNAL and prost's text, and
/// a message over the size limit with OUT_OF_RANGE. Neither is what a caller
/// should act on: a malformed request is the caller's INVALID_ARGUMENT (the
/// field prost names is kept in a sentence), and a request too large is
/// RESOURCE_EXHAUSTED, like every other size limit of the API. The status of
/// such an answer is in its headers (trailers-only), so rewriting the head
/// is enough.
#[derive(Clone, Default)]
pub struct StatusRewriteLayer;

impl<S> tower::Layer<S> for StatusRewriteLayer {
    type Service = StatusRewrite<S>;
    fn layer(&self, inner: S) -> StatusRewrite<S> {
        StatusRewrite { inner }
    }
}

#[derive(Clone)]
pub struct StatusRewrite<S> {
    inner: S,
}

impl<S, B, R> tower::Service<http::Request<B>> for StatusRewrite<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures_util::future::MapOk<S::Future, fn(http::Response<R>) -> http::Response<R>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        use futures_util::TryFutureExt;
        self.inner.call(req).map_ok(rewrite_status as fn(http::Response<R>) -> http::Response<R>)
    }
}

fn rewrite_status<R>(mut resp: http::Response<R>) -> http::Response<R> {
    let h = resp.headers_mut();
    let code = match h.get("grpc-status").and_then(|v| v.to_str().ok()) {
        Some("13") => tonic::Code::Internal,
        Some("11") => tonic::Code::OutOfRange,
        _ => return resp,
    };
    let msg = h
        .get("grpc-message")
        .map(|v| percent_encoding::percent_decode(v.as_bytes()).decode_utf8_lossy().into_owned())
        .unwrap_or_default();
    let (code, text) = match code {
        tonic::Code::Internal => match msg.strip_prefix("failed to decode Protobuf message: ") {
            Some(detail) => (
                tonic::Code::InvalidArgument,
                format!("malformed request: the body is not a valid protobuf message for this method ({detail})"),
            ),
            None => return resp,
        },
        _ if msg.contains("message length too large") => (
            tonic::Code::ResourceExhausted,
            format!(
                "request too large: {}; a full batch (max_batch paths of up to 1024 bytes) fits",
                msg.trim_start_matches("Error, decoded ")
            ),
        ),
        _ => return resp,
    };
    let encoded = percent_encoding::utf8_percent_encode(&text, GRPC_MESSAGE).to_string();
    h.insert("grpc-status", http::HeaderValue::from(code as i32));
    if let Ok(v) = http::HeaderValue::from_str(&encoded) {
        h.insert("grpc-message", v);
    }
    resp
}

/// What the gRPC spec says `grpc-message` must percent-encode.
const GRPC_MESSAGE: &percent_encoding::AsciiSet =
    &percent_encoding::CONTROLS.add(b'%').add(b' ').add(b'"').add(b'<').add(b'>').add(b'`').add(b'{').add(b'}');

/// One span per gRPC request, around the whole call (decoding included),
/// continuing the caller's trace when its metadata carry a `traceparent`.
/// The handler's own `rpc` span (method, blog, items, outcome) is its child.
/// Debug level: enabled only when traces are exported.
#[derive(Clone, Default)]
pub struct TraceLayer;

impl<S> tower::Layer<S> for TraceLayer {
    type Service = Trace<S>;
    fn layer(&self, inner: S) -> Trace<S> {
        Trace { inner }
    }
}

#[derive(Clone)]
pub struct Trace<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for Trace<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = tracing::instrument::Instrumented<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        use tracing::Instrument;
        let span = tracing::debug_span!("grpc", rpc.path = req.uri().path(), otel.kind = "server");
        crate::telemetry::remote_parent(&span, req.headers());
        self.inner.call(req).instrument(span)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Errors the caller can do something about are named as such, never
    /// INTERNAL: a full disk, and no descriptor left (seen at a low
    /// `ulimit -n` under a flood of connections).
    #[test]
    fn passing_shortages_are_resource_exhausted_not_internal() {
        for (errno, words) in
            [(libc::EMFILE, "file descriptor"), (libc::ENFILE, "file descriptor"), (libc::ENOSPC, "disk is full")]
        {
            let s = Status::from(CatalogError::Io(std::io::Error::from_raw_os_error(errno)));
            assert_eq!(s.code(), tonic::Code::ResourceExhausted, "errno {errno}: {}", s.message());
            assert!(s.message().contains(words) && s.message().contains("nothing was changed"), "{}", s.message());
        }
        let other = Status::from(CatalogError::Io(std::io::Error::from_raw_os_error(libc::EIO)));
        assert_eq!(other.code(), tonic::Code::Internal);
        // Met inside the store (sled's own I/O, or ours under it).
        let emfile = || std::io::Error::from_raw_os_error(libc::EMFILE);
        for e in [StoreError::Io(emfile()), StoreError::Sled(sled::Error::Io(emfile()))] {
            let s = Status::from(CatalogError::Store(e));
            assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{}", s.message());
            assert!(s.message().contains("file descriptor"), "{}", s.message());
        }
        let eio = Status::from(CatalogError::Store(StoreError::Io(std::io::Error::from_raw_os_error(libc::EIO))));
        assert_eq!(eio.code(), tonic::Code::Internal);
    }
}
