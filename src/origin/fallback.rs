//! The fallback chain: origins tried in order for what the local disk and the
//! CAS do not hold — the legacy S3 bucket's HTTP endpoint, then the main app.
//! A hit from a backfill origin (the legacy bucket) for a blog file is also
//! written into the blog's folder, so the bucket empties itself into the
//! server over time. Only 2xx answers are taken; anything else tries the next.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{retry_soon, Body, SHORT};
use crate::blogfs::NewFile;
use crate::config::Config;

/// How long a request waits for a free fetch slot before it is answered 503.
const SLOT_WAIT: Duration = Duration::from_secs(2);

/// The HTTP client of this thread. Each origin thread has its own runtime,
/// and a pooled connection's task lives on the runtime that opened it: one
/// pool per thread, so no thread uses connections another thread's runtime
/// drives (and ends at shutdown).
pub(super) fn client() -> Client<HttpConnector, Empty<Bytes>> {
    thread_local! {
        static CLIENT: Client<HttpConnector, Empty<Bytes>> = {
            let mut connector = HttpConnector::new();
            connector.set_connect_timeout(Some(Duration::from_secs(5)));
            connector.set_nodelay(true);
            Client::builder(TokioExecutor::new()).build(connector)
        };
    }
    CLIENT.with(Client::clone)
}

pub struct Fallback {
    origins: Vec<String>,
    backfill: usize,
    /// One permit per fetch in flight, held until its body is done.
    slots: Arc<Semaphore>,
    /// The whole of one fetch: headers and body.
    timeout: Duration,
}

impl Fallback {
    pub fn new(config: &Config) -> Fallback {
        Fallback {
            origins: config.fallback_origins.clone(),
            backfill: config.backfill_origins,
            slots: Arc::new(Semaphore::new(config.max_fallback_fetches)),
            timeout: config.fallback_timeout,
        }
    }

    /// Tries each origin for `target` (an absolute path). `backfill_to` is
    /// (static folder, blog, file relative to the blog's folder) where a
    /// backfill origin's hit is written, when the URL names a blog file.
    ///
    /// The body streams through as it arrives, never held whole: memory per
    /// fetch is a few buffers, and fetches are bounded in number. A backfill
    /// hit is written to a temporary file on the way and named only once
    /// the whole body arrived, within the deadline.
    pub async fn fetch(
        &self,
        method: &Method,
        target: &str,
        backfill_to: Option<(PathBuf, String, PathBuf)>,
        blog: Option<&str>,
    ) -> Option<Response<Body>> {
        if self.origins.is_empty() {
            return None;
        }
        let permit = match tokio::time::timeout(SLOT_WAIT, self.slots.clone().acquire_owned()).await {
            Ok(Ok(p)) => p,
            _ => {
                metrics::counter!(crate::metrics::FALLBACK_REQUESTS, "origin" => "any", "outcome" => "busy")
                    .increment(1);
                tracing::warn!(target, "every fallback fetch slot is busy (max_fallback_fetches)");
                return Some(retry_soon("busy, retry\n"));
            }
        };
        let deadline = tokio::time::Instant::now() + self.timeout;
        for (i, origin) in self.origins.iter().enumerate() {
            // The legacy bucket is asked for objects, nothing more: a query selects
            // another of its APIs (`?list-type=2` lists it, `?acl`, `?versionId`), and
            // a target naming no key (`/`) lists the bucket too.
            let target = match i < self.backfill {
                true => match target.split_once('?').map_or(target, |(path, _)| path) {
                    "" | "/" => continue,
                    path => path,
                },
                false => target,
            };
            let uri = format!("{origin}{target}");
            let Ok(mut req) = Request::builder().method(method.clone()).uri(&uri).body(Empty::new()) else {
                continue;
            };
            // Debug level: enabled only when traces are exported; the
            // origin then sees the trace in a `traceparent` header.
            let span = tracing::debug_span!("fallback", origin = origin.as_str(), target, otel.kind = "client");
            crate::telemetry::inject(&span, req.headers_mut());
            let count = |outcome: &'static str| {
                metrics::counter!(crate::metrics::FALLBACK_REQUESTS, "origin" => origin.clone(), "outcome" => outcome)
                    .increment(1)
            };
            let fetched = tokio::time::timeout_at(deadline, client().request(req));
            let resp = match tracing::Instrument::instrument(fetched, span).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    count("error");
                    tracing::warn!(origin, error = %e, "fallback origin failed");
                    continue;
                }
                Err(_) => {
                    count("timeout");
                    tracing::warn!(origin, "fallback origin timed out");
                    continue;
                }
            };
            // Only a whole file: nothing here asks for a part, so a 206 (or
            // any other success) is not the file this URL names.
            if resp.status() != StatusCode::OK {
                count(if resp.status().is_server_error() { "error" } else { "miss" });
                continue;
            }
            count("hit");
            let (parts, body) = resp.into_parts();
            let len = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
            // Bytes in an encoding (an S3 object stored gzipped) are not the
            // file: passed on with their Content-Encoding, never written to
            // the static folder, whose files are answered as they are.
            let encoded = parts
                .headers
                .get(header::CONTENT_ENCODING)
                .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
            let control = parts.headers.get(header::CACHE_CONTROL);
            // What its origin says of caching: `private`, `no-store` and
            // `no-cache` are passed on as they are (not made public for a
            // minute); `private` and `no-store` keep it out of the static
            // folder too, `no-cache` does not (the bytes are everyone's).
            let pass_on = control.filter(|v| has_directive(v, &["private", "no-store", "no-cache"]));
            let storable = !control.is_some_and(|v| has_directive(v, &["private", "no-store"]));
            let keep = i < self.backfill && method == Method::GET && !encoded && storable;
            let sink = match (keep, backfill_to.as_ref()) {
                (true, Some((root, blog, dest))) => {
                    let (root, blog, dest) = (root.clone(), blog.clone(), dest.clone());
                    // The type the bucket gave it, where its name says
                    // another: the copy is answered with it too.
                    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                    let keep_type = match parts.headers.get(header::CONTENT_TYPE) {
                        Some(t) => super::type_to_keep(t, &name),
                        None => Ok(None),
                    };
                    let start = move || {
                        let keep_type = keep_type.map_err(|why| {
                            std::io::Error::new(std::io::ErrorKind::InvalidData, format!("its Content-Type {why}"))
                        })?;
                        let file = NewFile::start(&root, &blog, &dest)?;
                        match keep_type.map(|t| file.keep_type(&t)) {
                            // Without it the copy would be answered as
                            // another type: not written.
                            Some(Err(e)) => {
                                Err(std::io::Error::new(e.kind(), format!("its Content-Type cannot be kept: {e}")))
                            }
                            _ => Ok(file),
                        }
                    };
                    match tokio::task::spawn_blocking(start).await {
                        Ok(Ok(b)) => Some(b),
                        Ok(Err(e)) => {
                            tracing::warn!(target, error = %e, "backfill refused");
                            None
                        }
                        Err(_) => None,
                    }
                }
                _ => None,
            };
            // Whole means: as long as its Content-Length, or a chunked body
            // that ended with its last chunk (a cut one is an error). A
            // close-delimited body cannot tell a cut from an end.
            let chunked = parts
                .headers
                .get(header::TRANSFER_ENCODING)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
            let body = through(body, permit, deadline, sink, len, chunked, target.to_owned());
            let mut out = Response::new(body.boxed_unsync());
            *out.status_mut() = StatusCode::OK;
            let h = out.headers_mut();
            for name in [header::CONTENT_TYPE, header::ETAG, header::LAST_MODIFIED, header::CONTENT_LENGTH] {
                if let Some(v) = parts.headers.get(&name) {
                    h.insert(name, v.clone());
                }
            }
            if encoded {
                for name in [header::CONTENT_ENCODING, header::VARY] {
                    if let Some(v) = parts.headers.get(&name) {
                        h.insert(name, v.clone());
                    }
                }
            }
            // An unversioned URL may change behind the edge: keep it short,
            // unless its origin said otherwise (above). A body that ends
            // when its connection closes cannot tell a cut from an end: it
            // is passed on, but no cache may keep it (a cut one was kept
            // by the edge, and answered, for a minute).
            let control = match (len, chunked) {
                (None, false) => HeaderValue::from_static("no-store"),
                _ => pass_on.cloned().unwrap_or(HeaderValue::from_static(SHORT)),
            };
            h.insert(header::CACHE_CONTROL, control);
            // The edge's own lifetime for what the app marks so (pages it
            // tags for purging on publish; see edge/varnish.vcl): not for a
            // body that cannot tell a cut from an end (the edge keeps what
            // Surrogate-Control says before it looks at no-store).
            if let Some(v) = parts.headers.get("surrogate-control").filter(|_| len.is_some() || chunked) {
                h.insert("surrogate-control", v.clone());
            }
            match blog.and_then(|b| HeaderValue::from_str(b).ok()) {
                Some(b) => {
                    h.insert("surrogate-key", b.clone());
                    h.insert("cache-tag", b.clone());
                    h.insert("cdn-tag", b);
                }
                // Not under a blog's URL (a page on a custom domain): the
                // app's own tags.
                None => {
                    for name in ["surrogate-key", "cache-tag", "cdn-tag"] {
                        if let Some(v) = parts.headers.get(name) {
                            h.insert(name, v.clone());
                        }
                    }
                }
            }
            return Some(out);
        }
        None
    }
}

/// Whether a `Cache-Control` holds any of `directives` (lower case).
fn has_directive(v: &HeaderValue, directives: &[&str]) -> bool {
    let v = String::from_utf8_lossy(v.as_bytes()).to_ascii_lowercase();
    v.split(',').any(|d| d.split('=').next().map(str::trim).is_some_and(|d| directives.contains(&d)))
}

/// A fallback body on its way to the edge. A task of its own copies the
/// upstream body into a small channel (and into the backfill file, when
/// there is one), holding the fetch slot, all of it within the fetch's
/// deadline — whether or not the client reads: a client that stops reading
/// cannot hold a slot past the deadline. The body read from the channel
/// ends cleanly only if the task saw the upstream body end whole; anything
/// else (cut, late, broken) ends it with an error, so the client sees a
/// broken transfer, never a complete-looking one.
fn through(
    mut upstream: Incoming,
    permit: OwnedSemaphorePermit,
    deadline: tokio::time::Instant,
    mut sink: Option<NewFile>,
    expected: Option<u64>,
    chunked: bool,
    target: String,
) -> Body {
    use std::sync::atomic::{AtomicBool, Ordering};
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let whole = Arc::new(AtomicBool::new(false));
    let done = whole.clone();
    tokio::spawn(async move {
        let _permit = permit;
        let mut seen = 0u64;
        let copied = tokio::time::timeout_at(deadline, async {
            while let Some(frame) = upstream.frame().await {
                let frame = frame.map_err(|e| format!("broke off: {e}"))?;
                let Ok(data) = frame.into_data() else { continue };
                seen += data.len() as u64;
                if let Some(s) = sink.as_mut() {
                    // A write to the page cache: short, unlike the network.
                    if let Err(e) = s.write_all(&data) {
                        tracing::warn!(target, error = %e, "backfill write failed");
                        sink = None;
                    }
                }
                if tx.send(data).await.is_err() {
                    return Err("the client went away".to_string());
                }
            }
            Ok(())
        })
        .await
        .unwrap_or_else(|_| Err("past the deadline (fallback_timeout_secs)".into()));
        let complete = match expected {
            Some(n) => n == seen,
            None => chunked,
        };
        match copied {
            Ok(()) if complete || expected.is_none() => {
                // What the client got is all the origin sent.
                done.store(true, Ordering::Release);
                if let (true, Some(s)) = (complete, sink.take()) {
                    tokio::task::spawn_blocking(move || match s.finish() {
                        Ok(_) => tracing::info!(target, "backfilled from the legacy origin"),
                        Err(e) => tracing::warn!(target, error = %e, "backfill write failed"),
                    });
                }
            }
            Ok(()) => tracing::warn!(target, seen, ?expected, "fallback body shorter than its Content-Length"),
            Err(why) => tracing::warn!(target, why, "fallback body not passed on whole"),
        }
    });
    let stream = futures_util::stream::unfold((rx, whole), |(mut rx, whole)| async move {
        match rx.recv().await {
            Some(data) => Some((Ok(Frame::data(data)), (rx, whole))),
            None if whole.load(std::sync::atomic::Ordering::Acquire) => None,
            None => {
                let e = io::Error::new(io::ErrorKind::UnexpectedEof, "fallback body cut");
                // Once: the stream ends after the error.
                whole.store(true, std::sync::atomic::Ordering::Release);
                Some((Err(e), (rx, whole)))
            }
        }
    });
    http_body_util::StreamBody::new(stream).boxed_unsync()
}
