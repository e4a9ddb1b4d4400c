//! The server-wide memory budget of unary gRPC calls (`grpc_memory_bytes`).
//!
//! Each connection may have `max_in_flight` calls at once, and a call's
//! request may be 16 MiB, so per-connection limits alone let a few
//! connections of full batches take gigabytes. A call is weighed twice:
//! - before tonic buffers its message: the gRPC length prefix (the first
//!   five bytes of the body) says how long it is, and the call takes three
//!   times that (the bytes, what they decode into, what the handler builds
//!   from them), at least 1 KiB;
//!   and for `ResolveBatch`, whose answer can be far larger than its
//!   request (a URL of the base URL, the blog id and the cache id for every
//!   path of a few bytes), the answer to paths of 8 bytes on average;
//! - by its handler, before it builds the answer, now that the paths are
//!   known: the estimate is settled to what the answer takes at most
//!   (through the [`CallBudget`] in the request's extensions), which gives
//!   room back for longer paths and takes more for shorter ones.
//!
//! Taking the answer's room at admission, not only later, is what keeps
//! large batches moving: calls that each held their request's weight and
//! waited for their answer's would refuse each other for good.
//!
//! A call that does not fit is refused at once with RESOURCE_EXHAUSTED, as
//! calls past `max_in_flight` are, and the caller retries. It does not wait:
//! a waiting call would leave its first bytes unread in the HTTP/2
//! connection's flow-control window, which the calls already admitted on
//! that connection need to receive the rest of theirs. A call whose weight
//! passes 1 MiB is admitted only while an eighth of the budget stays free,
//! for small ones (a renderer's page).
//!
//! The weight is given back when the answer's body is dropped: sent whole,
//! or the call gone. A client that never reads its answers holds their
//! weight until its connection is cut (`grpc_max_connection_age_secs` and
//! its grace), and meanwhile its further large calls are refused.
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

/// Calls weighing up to this much are small: a renderer's page.
const SMALL: u64 = 1 << 20;

/// The layer: one budget shared by every connection.
#[derive(Clone)]
pub struct BudgetLayer {
    /// Bytes taken by the calls admitted.
    used: Arc<AtomicU64>,
    /// The whole budget, in bytes: the most one call takes.
    total: u64,
    /// What one path's item of a `ResolveBatch` answer takes, past the
    /// path itself.
    answer_item: u64,
}

impl BudgetLayer {
    /// `answer_item`: see [`BudgetLayer::answer_item`].
    pub fn new(total: u64, answer_item: u64) -> Self {
        BudgetLayer { used: Arc::default(), total, answer_item }
    }

    /// The most a call may take: a large one leaves an eighth free.
    fn most(&self) -> u64 {
        self.total - self.total / 8
    }

    /// Takes `bytes` more for a call that already holds `held` (0: a new
    /// call), if they fit: small calls may use the whole budget, large ones
    /// leave an eighth of it free.
    fn take(&self, held: u64, bytes: u64) -> bool {
        let total = self.total;
        let limit = if held + bytes <= SMALL { total } else { total - total / 8 };
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| (u + bytes <= limit).then_some(u + bytes))
            .is_ok()
    }

    fn refusal(&self, method: &str, what: &str, bytes: u64) -> Status {
        let code = tonic::Code::ResourceExhausted;
        metrics::counter!(crate::metrics::RPC_REQUESTS, "method" => method.to_owned(), "code" => crate::metrics::code_label(code))
            .increment(1);
        tracing::info!(method, need = bytes, "call refused: the request memory budget is taken");
        Status::new(
            code,
            format!(
                "the server's request memory is taken by other large calls: {what} needs {} KiB of the {} KiB \
                 (grpc_memory_bytes); retry shortly, or send smaller batches",
                bytes.div_ceil(1024),
                self.total >> 10
            ),
        )
    }
}

/// A call's share of the budget, in its request's extensions: its handler
/// takes more before it builds a large answer.
#[derive(Clone)]
pub struct CallBudget {
    layer: BudgetLayer,
    held: Held,
}

impl CallBudget {
    /// Sets the room this call's answer holds (until it is dropped) to
    /// `answer` bytes: gives back what the estimate took past it, or takes
    /// what it lacks; RESOURCE_EXHAUSTED, naming `what`, if that does not fit.
    pub fn settle(&self, method: &str, what: &str, answer: u64) -> Result<(), Status> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let Some(t) = held.as_mut() else { return Ok(()) };
        let want = (t.request + answer).min(self.layer.most());
        if want <= t.bytes {
            self.layer.used.fetch_sub(t.bytes - want, Ordering::AcqRel);
        } else if !self.layer.take(t.bytes, want - t.bytes) {
            return Err(self.layer.refusal(method, what, want));
        }
        t.bytes = want;
        Ok(())
    }
}

/// A call's weight, given back when dropped.
struct Taken {
    used: Arc<AtomicU64>,
    bytes: u64,
    /// The part of `bytes` that is the request's.
    request: u64,
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
        let (mut parts, body) = req.into_parts();
        parts.extensions.insert(CallBudget { layer: self.layer.clone(), held: held.clone() });
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
        let layer = &self.layer;
        // An invalidation's paths are also copied into the write queue and
        // its log record (measured: about six times the request at peak).
        let request = u64::from(len) * if self.method == "Invalidate" { 6 } else { 3 };
        // Paths of 8 bytes, each with its field's two: the answer estimated
        // until the handler knows.
        let answer = match self.method {
            "ResolveBatch" => (u64::from(len) / 10 + 1) * layer.answer_item,
            _ => 0,
        };
        // Never more than a large call may take: a request over the budget
        // runs alone.
        let bytes = (request + answer).clamp(1024, layer.most());
        match layer.take(0, bytes) {
            true => Ok(Taken { used: layer.used.clone(), bytes, request }),
            false => Err(layer.refusal(self.method, &format!("this request of {len} bytes"), bytes)),
        }
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
