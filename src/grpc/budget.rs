//! The server-wide memory budget of unary gRPC calls (`grpc_memory_bytes`).
//!
//! Each connection may have `max_in_flight` calls at once, and a call's
//! request may be 16 MiB, so per-connection limits alone let a few
//! connections of full batches take gigabytes. Here a call is weighed before
//! tonic buffers its message: the gRPC length prefix (the first five bytes of
//! the body) says how long the message is, and the call takes four times
//! that from the budget (the bytes, what they decode into, the answer, and
//! the answer encoded), at least 1 KiB, at most what it may take. A call
//! that does not fit is refused at once with RESOURCE_EXHAUSTED, as calls
//! past `max_in_flight` are, and the caller retries. It does not wait: a
//! waiting call would leave its first bytes unread in the HTTP/2
//! connection's flow-control window, which the calls already admitted on
//! that connection need to receive the rest of theirs. A large call (over
//! 64 KiB) is admitted only while an eighth of the budget stays free, for
//! small ones.
//!
//! The weight is given back when the answer's body is dropped: sent whole,
//! or the call gone. A client that never reads a large answer holds its
//! weight until its connection is cut (`grpc_max_connection_age_secs` and
//! its grace).
//!
//! Weighed: every Resolver and Publisher method but `PutAsset`, whose
//! streams are bounded by `max_uploads`. Not the health, reflection or
//! other streams, which are small and may stay open for long.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::Frame;
use std::sync::atomic::{AtomicU64, Ordering};
use tonic::body::Body;
use tonic::Status;

/// Requests up to this long are small: a renderer's page.
const SMALL: u32 = 64 << 10;

/// The layer: one budget shared by every connection.
#[derive(Clone)]
pub struct BudgetLayer {
    /// Bytes taken by the calls admitted.
    used: Arc<AtomicU64>,
    /// The whole budget, in bytes: the most one call takes.
    total: u64,
}

impl BudgetLayer {
    pub fn new(total: u64) -> Self {
        BudgetLayer { used: Arc::default(), total }
    }
}

/// A call's weight, given back when dropped.
struct Taken {
    used: Arc<AtomicU64>,
    bytes: u64,
}

impl Drop for Taken {
    fn drop(&mut self) {
        self.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

impl<S> tower::Layer<S> for BudgetLayer {
    type Service = Budgeted<S>;
    fn layer(&self, inner: S) -> Budgeted<S> {
        Budgeted { inner, layer: self.clone() }
    }
}

#[derive(Clone)]
pub struct Budgeted<S> {
    inner: S,
    layer: BudgetLayer,
}

/// The method a weighed call is to, by its path: named, so that a refusal
/// is counted under the name every other outcome of the method is.
fn weighed(path: &str) -> Option<&'static str> {
    const METHODS: [&str; 12] = [
        "ResolveBatch",
        "GetBlog",
        "LookupDomain",
        "GetInfo",
        "Invalidate",
        "ImportFile",
        "SetDomain",
        "RemoveDomain",
        "DeleteBlog",
        "DeleteAsset",
        "Purge",
        "GetPurges",
    ];
    let name = path.strip_prefix("/blotcdn.v1.Resolver/").or_else(|| path.strip_prefix("/blotcdn.v1.Publisher/"))?;
    METHODS.into_iter().find(|m| *m == name)
}

type Held = Arc<Mutex<Option<Taken>>>;

impl<S> tower::Service<http::Request<Body>> for Budgeted<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<Body>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let Some(method) = weighed(req.uri().path()) else {
            return Box::pin(self.inner.call(req));
        };
        let held: Held = Arc::default();
        let (parts, body) = req.into_parts();
        let body =
            Weighing { inner: body, prefix: [0; 5], seen: 0, method, layer: self.layer.clone(), held: held.clone() };
        let answer = self.inner.call(http::Request::from_parts(parts, Body::new(body)));
        Box::pin(async move { Ok(answer.await?.map(|b| Body::new(Holding { inner: b, _held: held }))) })
    }
}

/// The request's body: its first frame is let through once the call's
/// weight is granted.
struct Weighing {
    inner: Body,
    prefix: [u8; 5],
    /// Bytes of the prefix seen; all five: weighed, passing through.
    seen: usize,
    method: &'static str,
    layer: BudgetLayer,
    held: Held,
}

impl Weighing {
    /// The call's weight out of the budget, or the refusal.
    fn weigh(&self) -> Result<Taken, Status> {
        let len = u32::from_be_bytes([self.prefix[1], self.prefix[2], self.prefix[3], self.prefix[4]]);
        let total = self.layer.total;
        // A large call leaves an eighth of the budget to small ones, so that
        // renderers' pages go on while bulk calls fill the rest.
        let limit = if len <= SMALL { total } else { total - total / 8 };
        let bytes = (u64::from(len) * 4).clamp(1024, limit);
        let used = &self.layer.used;
        if used.fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| (u + bytes <= limit).then_some(u + bytes)).is_ok()
        {
            return Ok(Taken { used: used.clone(), bytes });
        }
        let code = tonic::Code::ResourceExhausted;
        let (method, code_label) = (self.method, crate::metrics::code_label(code));
        metrics::counter!(crate::metrics::RPC_REQUESTS, "method" => method, "code" => code_label).increment(1);
        tracing::info!(method, request_bytes = len, "call refused: the request memory budget is taken");
        Err(Status::new(
            code,
            format!(
                "the server's request memory is taken by other large calls: this request of {len} bytes needs \
                 {} KiB of the {} KiB (grpc_memory_bytes); retry shortly, or send smaller batches",
                bytes >> 10,
                total >> 10
            ),
        ))
    }
}

impl http_body::Body for Weighing {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        if this.seen == this.prefix.len() {
            return Poll::Ready(frame);
        }
        let Some(Ok(frame)) = frame else { return Poll::Ready(frame) };
        let Some(data) = frame.data_ref() else { return Poll::Ready(Some(Ok(frame))) };
        let take = (this.prefix.len() - this.seen).min(data.len());
        this.prefix[this.seen..this.seen + take].copy_from_slice(&data[..take]);
        this.seen += take;
        if this.seen < this.prefix.len() {
            return Poll::Ready(Some(Ok(frame)));
        }
        Poll::Ready(Some(this.weigh().map(|taken| {
            *this.held.lock().unwrap_or_else(|p| p.into_inner()) = Some(taken);
            frame
        })))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The answer's body, holding the call's weight until it is dropped.
struct Holding {
    inner: Body,
    _held: Held,
}

impl http_body::Body for Holding {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
