//! The server-wide memory budget of unary gRPC calls (`grpc_memory_bytes`).
//!
//! Each connection may have `max_in_flight` calls at once, and a call's
//! request may be 16 MiB, so per-connection limits alone let a few
//! connections of full batches take gigabytes. A call is weighed once, when
//! its gRPC length prefix (the body's first five bytes) is seen, before
//! tonic buffers the message: at the most a call to its method with a
//! request that long can take ([`BudgetLayer::bound`]: the request a few
//! times over, and the largest answer it can have). Taking all of it at once
//! is what keeps large calls moving: calls that each held part of their
//! room and waited for the rest would refuse each other for good. Once a
//! handler has built an answer that may be large (`ResolveBatch`, `GetBlog`,
//! `GetPurges`), it settles the call's room down to three times the answer's
//! encoded length (the message and its encoding), through the
//! [`CallBudget`] in the request's extensions, before the answer is held for
//! sending.
//!
//! A call that does not fit is refused at once with RESOURCE_EXHAUSTED, as
//! calls past `max_in_flight` are, and the caller retries. It does not wait:
//! a waiting call would leave its bytes unread in the HTTP/2 connection's
//! flow-control window, which the calls already admitted on that
//! connection need to receive the rest of theirs. A call weighing over
//! 8 MiB is admitted only while an eighth of the budget stays free, for
//! small ones (a renderer's page). A request body that has not come whole
//! and ended 10 s after its prefix is cut, so a caller that declares a large
//! message and sends little, or never ends its stream, holds its room that
//! long at most; bytes after a unary call's one message are refused.
//!
//! The room is given back when the answer's body is dropped: handed to h2
//! whole (a piece at a time, as the peer's window lets it: see [`Holding`]),
//! or the call gone. A client that does not take its answers (it grants no
//! HTTP/2 window, or has stopped reading) holds their room until its
//! connection is cut: once a call is refused for want of room, every
//! connection holding an answer ready [`ANSWER_WITHIN`] ago or more is cut
//! (at most every [`REAP_EVERY`]), and the refused caller's retry finds the
//! room they held. Otherwise a connection lives to its age
//! (`grpc_max_connection_age_secs` and its grace).
//!
//! Weighed: every Resolver and Publisher method but `PutAsset`, whose
//! streams are bounded by `max_uploads`. Not the health, reflection or
//! other streams, which are small and may stay open for long.
//!
//! Besides, every Resolver and Publisher call (`PutAsset` too) holds
//! [`STREAM_BYTES`] and twice its headers from its start to its end: what
//! the HTTP/2 stream, the call's task and its metadata cost the server
//! before any body arrives. Streams that send their headers and nothing
//! more, on many connections, took 14 KB each (46 KB with 15 KB of
//! metadata) without bound: 50 connections of 1,000 took the server to
//! 800 MB. Now they are refused past the budget, and a weighed call's clock
//! runs from its start, not from its body's first bytes. Health and
//! reflection calls, which need no token, are not in the budget (a client
//! without a token filled it with them, and every renderer's call was
//! refused): at most [`SIDE_CALLS`] of them are open at once, and each must
//! send its first message whole within [`BODY_WITHIN`] of its start.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::Frame;
use std::sync::atomic::{AtomicU64, Ordering};
use tonic::body::Body;
use tonic::Status;

/// Calls weighing up to this much are small: a renderer's page (a page of
/// 20 paths is weighed at about 700 KB before its answer is known).
const SMALL: u64 = 8 << 20;

/// What a call holds from its start, besides twice its headers: its HTTP/2
/// stream, its task and its request's parts (measured: about 14 KB).
const STREAM_BYTES: u64 = 16 << 10;

/// Health and reflection calls open at once, server-wide: at most about
/// 70 KB each (16 KiB of headers, a message of [`SIDE_MESSAGE_BYTES`]),
/// 18 MB in all. A load balancer's health checks and grpcurl's reflection
/// take a few.
pub const SIDE_CALLS: usize = 256;

/// Of those, what one client address may hold: a client holding every slot
/// (Watch streams, which stay open) had every other health check refused.
pub const SIDE_CALLS_PER_PEER: usize = 32;

/// Of those, what health Watches and reflection streams may hold, as they
/// stay open as long as their client likes; the rest are kept for health
/// Checks, which end at once. Watches held open from eight addresses took
/// every slot, and a load balancer's Checks from a ninth were refused.
pub const SIDE_STREAMS: usize = 192;

/// The one side call that is not a stream.
const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";

/// The largest health or reflection request message (a service or file
/// name).
pub const SIDE_MESSAGE_BYTES: usize = 16 << 10;

/// A call's weight from its start: [`STREAM_BYTES`] and its headers twice
/// (as received, and as tonic's metadata), each with h2's 32 bytes of
/// overhead per field.
fn stream_weight(headers: &http::HeaderMap) -> u64 {
    let fields: u64 = headers.iter().map(|(k, v)| (k.as_str().len() + v.len() + 32) as u64).sum();
    STREAM_BYTES + 2 * fields
}

/// An answer not taken this long after it was ready, while calls are
/// refused for want of room, has its connection cut: the same time a
/// request has to arrive ([`BODY_WITHIN`]). A renderer takes its answer in
/// milliseconds; a client that has stopped reading never does.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(10);
/// Refusals look for such connections at most this often.
const REAP_EVERY: Duration = Duration::from_millis(100);

/// The layer: one budget shared by every connection.
#[derive(Clone)]
pub struct BudgetLayer {
    /// Bytes taken by the calls admitted.
    used: Arc<AtomicU64>,
    /// The whole budget, in bytes: the most one call takes.
    total: u64,
    /// The most one item of a `ResolveBatch` answer takes, past what its
    /// path's length adds.
    answer_item: u64,
    /// Paths a `ResolveBatch` takes at most (`max_batch`).
    max_batch: u64,
    /// The gRPC listener's connections: those whose answers wait too long
    /// are cut when room is wanted.
    conns: Arc<crate::listen::Conns>,
    /// When refusals last looked for them.
    reaped: Arc<Mutex<Option<Instant>>>,
    /// Health and reflection calls open ([`SIDE_CALLS`] at most), and by
    /// client address ([`SIDE_CALLS_PER_PEER`] each).
    side: Arc<Mutex<Side>>,
}

#[derive(Default)]
struct Side {
    open: usize,
    /// Of `open`, the streams (all but health Checks).
    streams: usize,
    by_peer: std::collections::HashMap<std::net::IpAddr, usize>,
}

impl BudgetLayer {
    /// `answer_item`: see [`BudgetLayer::answer_item`].
    pub fn new(total: u64, answer_item: u64, max_batch: usize, conns: Arc<crate::listen::Conns>) -> Self {
        BudgetLayer {
            used: Arc::default(),
            total,
            answer_item,
            max_batch: max_batch as u64,
            conns,
            reaped: Arc::default(),
            side: Arc::default(),
        }
    }

    /// Room is wanted: cuts the connections holding an answer not taken
    /// within [`ANSWER_WITHIN`], so their room comes back as their calls
    /// end (the refused caller's retry finds it).
    fn reap(&self) {
        {
            let mut reaped = self.reaped.lock().unwrap_or_else(|p| p.into_inner());
            if reaped.is_some_and(|t| t.elapsed() < REAP_EVERY) {
                return;
            }
            *reaped = Some(Instant::now());
        }
        self.conns.each(|c| {
            let Some(waited) = c.oldest_answer().filter(|w| *w >= ANSWER_WITHIN) else { return };
            tracing::warn!(
                peer = %c.peer,
                waited_s = waited.as_secs(),
                "gRPC connection cut: it has not taken an answer, and calls are refused for its room"
            );
            c.cut();
        });
    }

    /// The most a call to `method` with a request of `len` bytes takes: its
    /// request three times (the bytes, what they decode into, what the
    /// handler builds from them; six for `Invalidate`, whose paths are also
    /// copied into the write queue and its record), and for `ResolveBatch`
    /// the largest answer such a request can have (each path at least three
    /// bytes, at most `max_batch` of them, each path three times over in its
    /// URL and twice held). `GetBlog` and `GetPurges` answers are bounded
    /// (a blog's domains are), and 1 MiB covers them.
    fn bound(&self, method: &str, len: u64) -> u64 {
        let request = len * if method == "Invalidate" { 6 } else { 3 };
        let answer = match method {
            "ResolveBatch" => (len / 3 + 1).min(self.max_batch) * self.answer_item + 6 * len,
            "GetBlog" | "GetPurges" => 1 << 20,
            _ => 0,
        };
        (request + answer).max(1024)
    }

    /// The most a call may take: a large one leaves an eighth free.
    fn most(&self) -> u64 {
        self.total - self.total / 8
    }

    /// Takes `bytes` more for a call that already holds `held` (0: a new
    /// call), if they fit: small calls may use the whole budget, large ones
    /// leave an eighth of it free.
    fn take(&self, held: u64, bytes: u64) -> bool {
        let limit = if held + bytes <= SMALL { self.total } else { self.most() };
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| (u + bytes <= limit).then_some(u + bytes))
            .is_ok()
    }

    fn refusal(&self, method: &'static str, what: &str, bytes: u64) -> Status {
        let code = tonic::Code::ResourceExhausted;
        metrics::counter!(crate::metrics::RPC_REQUESTS, "method" => method, "code" => crate::metrics::code_label(code))
            .increment(1);
        tracing::info!(method, need = bytes, "call refused: the request memory budget is taken");
        self.refusal_unnamed(what, bytes)
    }

    /// The refusal of a call to a method not counted by name (health,
    /// reflection, an unknown path).
    fn refusal_unnamed(&self, what: &str, bytes: u64) -> Status {
        self.reap();
        Status::new(
            tonic::Code::ResourceExhausted,
            format!(
                "the server's request memory is taken by other calls: {what} needs {} KiB of the {} KiB \
                 (grpc_memory_bytes); retry shortly, or send smaller batches",
                bytes.div_ceil(1024),
                self.total >> 10
            ),
        )
    }
}

/// A call's share of the budget, in its request's extensions: its handler
/// settles it once a large answer is built.
#[derive(Clone)]
pub struct CallBudget {
    layer: BudgetLayer,
    held: Held,
}

impl CallBudget {
    /// Once the answer is built: sets the room this call holds (until its
    /// answer is dropped) to what an answer of `encoded` bytes takes (three
    /// times that: the message and its encoding). Gives back what the
    /// admission's bound took past it; takes what it lacks (the bound should
    /// leave nothing lacking), or refuses.
    pub fn settle(&self, method: &'static str, encoded: u64) -> Result<(), Status> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let Some(t) = held.as_mut() else { return Ok(()) };
        let want = (3 * encoded).clamp(1024, self.layer.most());
        if want <= t.bytes {
            self.layer.used.fetch_sub(t.bytes - want, Ordering::AcqRel);
        } else if !self.layer.take(t.bytes, want - t.bytes) {
            return Err(self.layer.refusal(method, &format!("its answer of {encoded} bytes"), want));
        }
        t.bytes = want;
        Ok(())
    }
}

/// What a call holds from its start to its end: its weight in the budget,
/// or a health or reflection call's slot.
enum Hold {
    Budget(#[allow(dead_code)] Taken),
    Side(#[allow(dead_code)] SideSlot),
}

/// A health or reflection call's slot, given back when dropped.
struct SideSlot {
    side: Arc<Mutex<Side>>,
    peer: Option<std::net::IpAddr>,
    stream: bool,
}

impl SideSlot {
    /// A slot, if one is free, and one of the client's own.
    fn take(side: &Arc<Mutex<Side>>, peer: Option<std::net::IpAddr>, stream: bool) -> Result<SideSlot, String> {
        let mut s = side.lock().unwrap_or_else(|p| p.into_inner());
        if s.open >= SIDE_CALLS {
            return Err(format!(
                "{SIDE_CALLS} health and reflection calls are open at once, the most the server takes; retry shortly"
            ));
        }
        if stream && s.streams >= SIDE_STREAMS {
            return Err(format!(
                "{SIDE_STREAMS} health Watch and reflection streams are open at once, the most the server takes \
                 (the other slots are kept for health Checks); retry shortly"
            ));
        }
        if let Some(ip) = peer {
            let mine = s.by_peer.entry(ip).or_default();
            if *mine >= SIDE_CALLS_PER_PEER {
                return Err(format!(
                    "{SIDE_CALLS_PER_PEER} health and reflection calls from {ip} are open at once, the most one \
                     client address may hold; retry shortly"
                ));
            }
            *mine += 1;
        }
        s.open += 1;
        s.streams += usize::from(stream);
        Ok(SideSlot { side: side.clone(), peer, stream })
    }
}

impl Drop for SideSlot {
    fn drop(&mut self) {
        let mut s = self.side.lock().unwrap_or_else(|p| p.into_inner());
        s.open -= 1;
        s.streams -= usize::from(self.stream);
        if let Some(ip) = self.peer {
            if let std::collections::hash_map::Entry::Occupied(mut e) = s.by_peer.entry(ip) {
                *e.get_mut() -= 1;
                if *e.get() == 0 {
                    e.remove();
                }
            }
        }
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

/// A call refused before any service sees it: its answer, at once.
fn refused<E>(status: Status) -> Pin<Box<dyn Future<Output = Result<http::Response<Body>, E>> + Send>> {
    let answer = status.into_http();
    Box::pin(async move { Ok(answer) })
}

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
        let method = weighed(req.uri().path());
        let upload = req.uri().path() == "/blotcdn.v1.Publisher/PutAsset";
        // What the call holds from its start: health, reflection (or a path
        // no service has) a slot of their own, the others room in the budget
        // (`weight`).
        let (req, hold, weight) = if method.is_none() && !upload {
            let peer = req.extensions().get::<crate::listen::ConnInfo>().map(|c| c.conn.peer.ip());
            match SideSlot::take(&self.layer.side, peer, req.uri().path() != HEALTH_CHECK) {
                Ok(slot) => {
                    let started = tokio::time::Instant::now();
                    let req = req.map(|body| {
                        Body::new(Arriving {
                            inner: body,
                            started,
                            deadline: None,
                            first: Arrived::default(),
                            passing: false,
                        })
                    });
                    (req, Hold::Side(slot), 0)
                }
                Err(why) => return refused(Status::resource_exhausted(why)),
            }
        } else {
            let weight = stream_weight(req.headers());
            if !self.layer.take(0, weight) {
                return refused(match method {
                    Some(m) => self.layer.refusal(m, "a new call", weight),
                    None => self.layer.refusal_unnamed("a new call", weight),
                });
            }
            (req, Hold::Budget(Taken { used: self.layer.used.clone(), bytes: weight }), weight)
        };
        let Some(method) = method else {
            // Not weighed by its request: an upload is bounded by max_uploads
            // and its own idle timeout, the others by their slots.
            let answer = self.inner.call(req);
            return Box::pin(async move {
                let answer = answer.await?;
                Ok(answer.map(|b| Body::new(Holding::new(b, Held::default(), hold, None))))
            });
        };
        let held: Held = Arc::default();
        let (mut parts, body) = req.into_parts();
        let conn = parts.extensions.get::<crate::listen::ConnInfo>().map(|c| c.conn.clone());
        parts.extensions.insert(CallBudget { layer: self.layer.clone(), held: held.clone() });
        let body = Weighing {
            inner: body,
            first: Arrived::default(),
            method,
            layer: self.layer.clone(),
            held: held.clone(),
            started: tokio::time::Instant::now(),
            stream: weight,
            deadline: None,
            whole: false,
            done: false,
        };
        let answer = self.inner.call(http::Request::from_parts(parts, Body::new(body)));
        Box::pin(async move {
            let answer = answer.await?;
            // Held from now until sent whole or dropped.
            let waiting = conn.map(|c| {
                let slot = c.answer_ready();
                (c, slot)
            });
            Ok(answer.map(|b| Body::new(Holding::new(b, held, hold, waiting))))
        })
    }
}

/// The request's body: weighed once its length prefix is seen, before tonic
/// buffers the message, at the most the call can take
/// ([`BudgetLayer::bound`]); refused at once if that does not fit. A body
/// that has not come whole and ended within [`BODY_WITHIN`] of the call's
/// start is cut, so a caller that sends no body, declares a large message
/// and sends little of it, or sends it and never ends the stream, holds its
/// room that long at most.
/// Bytes after the one message are refused at once (tonic would buffer a
/// second message of up to 16 MiB before it found the call had two).
struct Weighing {
    inner: Body,
    first: Arrived,
    method: &'static str,
    layer: BudgetLayer,
    held: Held,
    /// When the call started: its body must end within [`BODY_WITHIN`].
    started: tokio::time::Instant,
    /// What the call holds from its start ([`stream_weight`]), part of
    /// its bound.
    stream: u64,
    /// Armed only once the body keeps the call waiting (most bodies come
    /// whole in one piece, with no timer).
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The message is whole: nothing more may come but the body's end.
    whole: bool,
    /// The body ended, or failed: passing through.
    done: bool,
}

/// How long a weighed request's body may take to arrive whole and end.
const BODY_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

impl Weighing {
    /// After `data` arrived: weighs the call once its prefix is seen.
    fn weigh(&mut self, data: &[u8]) -> Result<(), Status> {
        let weighed = self.first.seen >= 5;
        let Some(len) = self.first.see(data) else { return Ok(()) };
        // Past the message (in the frame that ended it, or any after).
        if self.first.seen > 5 + len {
            return Err(Status::invalid_argument("a unary call's body holds one message; more bytes came after it"));
        }
        self.whole = self.first.seen == 5 + len;
        if weighed {
            return Ok(());
        }
        let layer = &self.layer;
        let bytes = layer.bound(self.method, len).min(layer.most()).saturating_sub(self.stream);
        if !layer.take(self.stream, bytes) {
            return Err(layer.refusal(self.method, &format!("this request of {len} bytes"), bytes));
        }
        *self.held.lock().unwrap_or_else(|p| p.into_inner()) = Some(Taken { used: layer.used.clone(), bytes });
        Ok(())
    }
}

impl http_body::Body for Weighing {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if this.done {
            return Pin::new(&mut this.inner).poll_frame(cx);
        }
        let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                // Kept waiting: the body has until its deadline to end (tonic
                // waits for the end of a unary call's body, whole or not).
                let started = this.started;
                let d = this.deadline.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(started + BODY_WITHIN)));
                ready!(d.as_mut().poll(cx));
                this.done = true;
                tracing::info!(method = this.method, "call cut: its request did not arrive and end in time");
                return Poll::Ready(Some(Err(Status::resource_exhausted(format!(
                    "the request's body did not arrive whole and end within {} s of its start; its room in the \
                     request memory (grpc_memory_bytes) is given back",
                    BODY_WITHIN.as_secs()
                )))));
            }
        };
        let frame = match frame {
            Some(Ok(frame)) => frame,
            end_or_error => {
                this.done = true;
                this.deadline = None;
                return Poll::Ready(end_or_error);
            }
        };
        let Some(data) = frame.data_ref() else { return Poll::Ready(Some(Ok(frame))) };
        let weighed = this.weigh(data);
        this.done |= weighed.is_err();
        Poll::Ready(Some(weighed.map(|()| frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A request body's bytes as they arrive: how many, and the first
/// message's gRPC prefix (a flag byte, then its length).
#[derive(Default)]
struct Arrived {
    prefix: [u8; 5],
    /// Body bytes seen, the prefix's included.
    seen: u64,
}

impl Arrived {
    /// Notes `data`; the first message's length, once its prefix is in.
    fn see(&mut self, data: &[u8]) -> Option<u64> {
        let at = self.seen as usize;
        if at < 5 {
            let n = (5 - at).min(data.len());
            self.prefix[at..at + n].copy_from_slice(&data[..n]);
        }
        self.seen += data.len() as u64;
        (self.seen >= 5).then(|| u64::from(u32::from_be_bytes(self.prefix[1..5].try_into().expect("4"))))
    }
}

/// The request body of a health or reflection call: cut unless its first
/// message has come whole (or the body ended) within [`BODY_WITHIN`] of the
/// call's start; then passed through.
struct Arriving {
    inner: Body,
    started: tokio::time::Instant,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    first: Arrived,
    /// The first message is whole (or the cut was sent).
    passing: bool,
}

impl http_body::Body for Arriving {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if this.passing {
            return Pin::new(&mut this.inner).poll_frame(cx);
        }
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            let whole = match &frame {
                Some(Ok(f)) => {
                    f.data_ref().is_none_or(|d| this.first.see(d).is_some_and(|len| this.first.seen >= 5 + len))
                }
                _ => true,
            };
            if whole {
                this.passing = true;
                this.deadline = None;
            }
            return Poll::Ready(frame);
        }
        let started = this.started;
        let d = this.deadline.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(started + BODY_WITHIN)));
        ready!(d.as_mut().poll(cx));
        this.passing = true;
        this.deadline = None;
        tracing::info!("call cut: its request's first message did not arrive in time");
        Poll::Ready(Some(Err(Status::resource_exhausted(format!(
            "the request's first message did not arrive whole within {} s of the call's start",
            BODY_WITHIN.as_secs()
        )))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The answer's body, holding the call's weight until it is dropped, and
/// listed as waiting in its connection meanwhile. A large answer is given
/// out [`PIECE`] bytes at a time: hyper hands each piece to h2 only once the
/// stream has room in the peer's window, and h2 queues what it is handed
/// whole, whatever the window. Handed out whole, an answer left the body at
/// once, giving its room back while it sat in h2's queue for a window that
/// never came (150 unread answers of 2 MB: 600 MB, none of it weighed).
struct Holding {
    inner: Body,
    _held: Held,
    /// What the call holds from its start.
    _stream: Hold,
    waiting: Option<(Arc<crate::listen::Conn>, usize)>,
    /// What is left of a large data frame.
    rest: Bytes,
}

/// The most of an answer handed to h2 at once: past the peer's window, h2
/// holds at most this much of it unweighed.
const PIECE: usize = 32 << 10;

impl Holding {
    fn new(inner: Body, held: Held, stream: Hold, waiting: Option<(Arc<crate::listen::Conn>, usize)>) -> Self {
        Holding { inner, _held: held, _stream: stream, waiting, rest: Bytes::new() }
    }

    /// The next piece of `rest`. The last is copied out: a slice would keep
    /// the whole answer's memory alive in h2's queue after the body is gone.
    fn piece(&mut self) -> Frame<Bytes> {
        if self.rest.len() > PIECE {
            Frame::data(self.rest.split_to(PIECE))
        } else {
            Frame::data(Bytes::copy_from_slice(&std::mem::take(&mut self.rest)))
        }
    }
}

impl Drop for Holding {
    fn drop(&mut self) {
        if let Some((c, slot)) = self.waiting.take() {
            c.answer_gone(slot);
        }
    }
}

impl http_body::Body for Holding {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if !self.rest.is_empty() {
            return Poll::Ready(Some(Ok(self.piece())));
        }
        match ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
            Some(Ok(frame)) if frame.data_ref().is_some_and(|d| d.len() > PIECE) => {
                self.rest = frame.into_data().expect("a data frame");
                Poll::Ready(Some(Ok(self.piece())))
            }
            other => Poll::Ready(other),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self.rest.is_empty() {
            true => self.inner.size_hint(),
            false => http_body::SizeHint::default(),
        }
    }
}
