//! The HTTP origin the CDN's edge pulls from. Routes, by DESIGN.md:
//! - `/{blog}/{cache_id}/{path}`: versioned files from the blog's folder
//!   (then the static folder, where a legacy-bucket copy may have landed);
//! - `/{blog}/_assets/{hash}/{filename}`: permanent assets from the CAS;
//! - `/_ask?domain=`: the edge's on-demand TLS check;
//! - `/healthz`;
//! - anything else: when the URL names a blog path, its permanent asset if
//!   the path is bound to one, else the static folder, then the blog's
//!   folder; then the fallback origins in order (legacy bucket, then app),
//!   a bucket hit backfilled into the static folder; then 404.
//!
//! Whether a versioned URL can be valid is decided from metadata before any
//! disk access. Files are opened only through [`crate::blogfs`], so nothing
//! outside a blog's folder (or its static folder) is ever read. It must not
//! write metadata.

use std::convert::Infallible;
use std::fs::Metadata;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::blogfs::{changed_ago, settled, writer_holds, FileStamp, OpenError};
use crate::catalog::Catalog;
use crate::config::Config;
use crate::domain::{parse_cache_id, BlogId, BlogPath, CacheId, ContentHash, Domain};
use crate::store::Resolution;

mod answer;
mod fallback;
mod hot;
mod large;
pub mod peers;
pub mod slice;
mod splice;
mod verify;

pub(crate) use answer::type_to_keep;
pub use splice::sealed_files;

use answer::{
    content_type, cors_for, cors_for_type, file_etag, last_modified, none_match, respond, respond_kept, FileAnswer,
    Found,
};
use fallback::Fallback;
use hot::{HotCache, HotFile};
use verify::DAMAGED;

pub type Body = UnsyncBoxBody<Bytes, std::io::Error>;

const IMMUTABLE: &str = "public, max-age=31536000, immutable";
const SHORT: &str = "public, max-age=60";
const NO_STORE: &str = "no-store";
/// Files up to this size are read whole (and may be kept hot: a hot file
/// costs no syscall); larger ones stream from disk in chunks
/// (`origin/large.rs`).
const SMALL_FILE: u64 = 1024 * 1024;

fn empty() -> Body {
    Empty::new().map_err(|e: Infallible| match e {}).boxed_unsync()
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|e: Infallible| match e {}).boxed_unsync()
}

/// A passing state (503, not kept, `Retry-After: 1`).
fn retry_soon(text: &'static str) -> Response<Body> {
    let mut r = plain(StatusCode::SERVICE_UNAVAILABLE, NO_STORE, text);
    r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

fn plain(status: StatusCode, cache: &'static str, text: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(full(text));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    r
}

pub struct Origin {
    catalog: Arc<Catalog>,
    hot: HotCache,
    /// Hot files that may be sealed at once (`origin/splice.rs`).
    sealed_files: usize,
    fallback: Fallback,
    peers: peers::Peers,
    /// One permit per open connection.
    connections: Arc<tokio::sync::Semaphore>,
    idle_timeout: std::time::Duration,
    /// `recent_change_ms`.
    recent_change: std::time::Duration,
    /// With host-style URLs: `.{cdn host}` (lower case); a request to
    /// `{blog}.{cdn host}` names its blog by its `Host`.
    host_suffix: Option<String>,
    /// The host of `cdn_base_url` (lower case): path style, never a custom
    /// domain.
    cdn_host: Option<String>,
    counters: crate::metrics::HttpCounters,
    /// Threads serving connections (`http_threads`).
    threads: usize,
    /// The scheduler slice those threads ask for (`http_slice_us`).
    slice: Option<std::time::Duration>,
    /// Blobs too large for the hot cache, checked against their hash.
    verified: Arc<verify::Verified>,
}

/// The two folders a blog path's bytes may be in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Root {
    /// The user's synced folder, `{blogs_dir}/{blog}`.
    Blogs,
    /// The platform's files and legacy-bucket copies, `{static_dir}/{blog}`.
    Static,
}

impl Origin {
    /// `sealed_files`: how many hot files may hold a descriptor (see [`sealed_files`]).
    pub fn new(catalog: Arc<Catalog>, config: &Config, max_connections: usize, sealed_files: usize) -> Arc<Origin> {
        splice::copy_hot_files_in(&config.data_dir);
        Arc::new(Origin {
            sealed_files,
            hot: HotCache::new(config.hot_cache_bytes),
            fallback: Fallback::new(config),
            peers: peers::Peers::new(config),
            catalog,
            connections: Arc::new(tokio::sync::Semaphore::new(max_connections)),
            idle_timeout: config.http_idle_timeout,
            recent_change: config.recent_change,
            host_suffix: match config.url_style {
                crate::domain::UrlStyle::Host => cdn_host(config).map(|h| format!(".{h}")),
                _ => None,
            },
            cdn_host: cdn_host(config),
            counters: crate::metrics::HttpCounters::default(),
            verified: Default::default(),
            threads: config.http_threads,
            slice: config.http_slice,
        })
    }

    /// The blog a request names by its host, if it does: `{blog}.{cdn
    /// host}` with host-style URLs (host-style blog ids are lower case), or
    /// a custom domain mapped to a blog. A custom domain is its blog's own
    /// site, so it never serves another blog's files. The host is the
    /// authority of an absolute-form target (`GET http://b.cdn/…`, where RFC
    /// 9112 has the Host header ignored), else the `Host` header; any port,
    /// and the dot of a fully qualified name, left out; case-insensitive.
    fn blog_from_host<'a>(&self, req: &'a Request<Incoming>) -> Option<std::borrow::Cow<'a, str>> {
        let host = bare_host(match req.uri().authority() {
            Some(a) => a.host(),
            None => req.headers().get(header::HOST)?.to_str().ok()?,
        });
        if let Some(blog) = self.blog_under_cdn_host(host) {
            return Some(blog);
        }
        self.blog_of_domain(host).map(std::borrow::Cow::Owned)
    }

    /// Whether `host` (bare) is the CDN's own name, or with host-style URLs
    /// a name under it.
    fn is_cdn_name(&self, host: &str) -> bool {
        self.cdn_host.as_deref().is_some_and(|c| c.eq_ignore_ascii_case(host))
            || self.blog_under_cdn_host(host).is_some()
    }

    /// The blog a custom domain (a bare host, see [`bare_host`]) maps to:
    /// not the CDN's own names, nor what cannot be a domain (an address, a
    /// single label), which are looked up no further; case-insensitive.
    fn blog_of_domain(&self, host: &str) -> Option<String> {
        // Path style (or host style), with no look-up.
        if self.is_cdn_name(host) || !host.contains('.') || host.ends_with(|c: char| c.is_ascii_digit()) {
            return None;
        }
        let store = self.catalog.store();
        let blog = match host.bytes().any(|b| b.is_ascii_uppercase()) {
            true => store.lookup_domain(&host.to_ascii_lowercase()),
            false => store.lookup_domain(host),
        }?;
        Some(blog.to_string())
    }

    /// `{blog}` of `{blog}.{cdn host}`, with host-style URLs.
    fn blog_under_cdn_host<'a>(&self, host: &'a str) -> Option<std::borrow::Cow<'a, str>> {
        let suffix = self.host_suffix.as_deref()?;
        let cut = host.len().checked_sub(suffix.len())?;
        let (label, rest) = (host.get(..cut)?, host.get(cut..)?);
        if !rest.eq_ignore_ascii_case(suffix) {
            return None;
        }
        let label = match label.bytes().any(|b| b.is_ascii_uppercase()) {
            true => std::borrow::Cow::Owned(label.to_ascii_lowercase()),
            false => std::borrow::Cow::Borrowed(label),
        };
        crate::domain::is_dns_label(&label).then_some(label)
    }

    /// Serves HTTP/1.1 until `stop` turns true, then lets open requests
    /// finish. Like nginx's workers: one thread per core, each with its own
    /// single-threaded runtime and its own listener on the same address
    /// (`SO_REUSEPORT`, the kernel spreading connections), so a request is
    /// read, answered and written on one thread, with no hand-off between
    /// threads (on this machine those wake-ups cost more than the request).
    pub async fn serve(self: Arc<Self>, listener: TcpListener, stop: tokio::sync::watch::Receiver<bool>) {
        let threads = self.threads;
        if threads == 0 {
            // On the shared multi-threaded runtime, with gRPC.
            return self.serve_on(listener, stop).await;
        }
        let addr = listener.local_addr().expect("bound");
        let mut listeners = vec![listener.into_std().expect("a tokio listener")];
        for _ in 1..threads {
            match crate::listen::bind(addr, true).and_then(|l| l.into_std()) {
                Ok(l) => listeners.push(l),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot add an origin thread's listener; fewer threads");
                    break;
                }
            }
        }
        let mut done = Vec::new();
        for (i, l) in listeners.into_iter().enumerate() {
            let (this, stop) = (self.clone(), stop.clone());
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            let blocking = (512 / threads).max(16);
            let slice = self.slice;
            let spawned = std::thread::Builder::new().name(format!("blotcdn-http-{i}")).spawn(move || {
                if let Some(slice) = slice {
                    match self::slice::ask(slice) {
                        Ok(self::slice::Slice::Taken) => tracing::debug!(?slice, "origin thread's scheduler slice"),
                        Ok(self::slice::Slice::NotTaken) => tracing::debug!(
                            "the kernel keeps its own slice for the origin threads (before Linux 6.12, or not on the fair scheduler)"
                        ),
                        Err(e) => tracing::info!(error = %e, "cannot set the origin threads' scheduler slice"),
                    }
                }
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    // The blocking pool (file reads, hashing) runs longer at
                    // a time: the kernel's slice, not this thread's.
                    .on_thread_start(move || {
                        if slice.is_some() {
                            let _ = self::slice::reset();
                        }
                    })
                    .max_blocking_threads(blocking)
                    .build();
                let rt = match rt {
                    Ok(rt) => rt,
                    // Out of descriptors or threads: this thread serves
                    // nothing, the others go on (said, not a panic).
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start an origin thread's runtime; fewer threads");
                        return;
                    }
                };
                rt.block_on(async move {
                    match TcpListener::from_std(l) {
                        Ok(l) => this.serve_on(l, stop).await,
                        Err(e) => tracing::error!(error = %e, "origin listener lost"),
                    }
                });
                let _ = tx.send(());
            });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start an origin thread");
                continue;
            }
            done.push(rx);
        }
        for rx in done {
            let _ = rx.await;
        }
    }

    /// Accepts connections on one listener until `stop` turns true.
    async fn serve_on(self: Arc<Self>, listener: TcpListener, mut stop: tokio::sync::watch::Receiver<bool>) {
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder.timer(hyper_util::rt::TokioTimer::new());
        // A slow or idle client (keep-alive included: the timer runs while
        // hyper waits for the next request's head) may not hold a connection
        // slot forever.
        builder.header_read_timeout(self.idle_timeout);
        // Hyper takes a body's next chunk while less than this is queued:
        // one large file's chunk at a time per connection (its default,
        // 400 KiB, is three), which also bounds a request's head.
        builder.max_buf_size(large::CHUNK);
        loop {
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((s, _)) => s,
                    Err(e) => {
                        crate::listen::accept_failed(e, "http").await;
                        continue;
                    }
                },
                _ = async { let _ = stop.wait_for(|s| *s).await; } => break,
            };
            // A response's last segment leaves at once, not when the
            // previous one is acknowledged (Nagle): like nginx's
            // `tcp_nodelay`. Measured here: 1 MiB answers cost a quarter
            // less CPU, 50 KiB ones a tenth.
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(error = %e, "TCP_NODELAY not set");
            }
            // At the cap, this thread stops accepting (one connection, the
            // one just taken, waits for a slot; the rest wait in the listen
            // backlog), and the descriptors kept in reserve stay free for
            // files, uploads and the store. Accepting first means an idle
            // thread holds no slot.
            let permit = tokio::select! {
                p = self.connections.clone().acquire_owned() => p.expect("never closed"),
                _ = async { let _ = stop.wait_for(|s| *s).await; } => break,
            };
            {
                {
                    let this = self.clone();
                    let svc = hyper::service::service_fn(move |req| {
                        let this = this.clone();
                        async move { Ok::<_, Infallible>(this.handle(req).await) }
                    });
                    let conn = graceful.watch(
                        builder
                            .serve_connection(TokioIo::new(splice::SpliceStream::new(stream, self.idle_timeout)), svc),
                    );
                    tokio::spawn(async move {
                        let _ = conn.await;
                        drop(permit);
                    });
                }
            }
        }
        drop(listener);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(30), graceful.shutdown()).await;
    }

    pub async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        use tracing::Instrument;
        // `{blog}.{cdn host}/…` and `{custom domain}/…` are `/{blog}/…`:
        // found once, used for the label and the routing. A request the TLS
        // edge marks with the domain it holds a certificate for is that
        // domain's, or nobody's (a domain removed since).
        // The CDN's own names (one edge may hold both), or no SNI at all:
        // routed by the request as usual.
        let edge_domain = req
            .headers()
            .get(EDGE_DOMAIN)
            .map(|d| bare_host(d.to_str().unwrap_or("-")))
            .filter(|d| !d.is_empty() && !self.is_cdn_name(d));
        let (in_host, unmapped) = match edge_domain {
            Some(d) => match self.blog_of_domain(d) {
                Some(blog) => (Some(format!("/{blog}{}", req.uri().path())), false),
                None => (None, true),
            },
            None => (self.blog_from_host(&req).map(|blog| format!("/{blog}{}", req.uri().path())), false),
        };
        let route = route_label(in_host.as_deref().unwrap_or(req.uri().path()));
        let head = req.method() == Method::HEAD;
        // Debug level: enabled only when traces are exported.
        let span = tracing::debug_span!(
            "http",
            http.route = crate::metrics::ROUTES[route],
            http.method = req.method().as_str(),
            http.status_code = tracing::field::Empty,
            bytes = tracing::field::Empty,
            source = tracing::field::Empty,
            otel.kind = "server"
        );
        crate::telemetry::remote_parent(&span, req.headers());
        let resp = if req.method() != Method::GET && !head {
            let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, NO_STORE, "only GET and HEAD\n");
            r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            r
        } else if unmapped && !matches!(req.uri().path(), "/healthz" | "/_ask") {
            plain(StatusCode::NOT_FOUND, NO_STORE, "unknown domain\n")
        } else {
            let mut resp = self.route(&req, in_host.as_deref()).instrument(span.clone()).await;
            if head {
                // Same headers, Content-Length included; no body.
                *resp.body_mut() = empty();
            }
            resp
        };
        let len = resp.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        self.counters.request(route, resp.status(), len.filter(|n| *n > 0 && !head));
        span.record("http.status_code", resp.status().as_u16());
        span.record("bytes", if head { 0 } else { len.unwrap_or(0) });
        resp
    }

    /// `in_host`: the path with the blog the `Host` names, for host-style
    /// URLs and custom domains.
    async fn route(&self, req: &Request<Incoming>, in_host: Option<&str>) -> Response<Body> {
        // Two could name two blogs (RFC 9112: answer 400); an edge keying
        // its cache on the other one would keep one blog's bytes under the
        // other's name.
        if req.headers().get_all(header::HOST).iter().nth(1).is_some() {
            return plain(StatusCode::BAD_REQUEST, NO_STORE, "more than one Host header\n");
        }
        let path = req.uri().path();
        match path {
            "/healthz" => {
                return match self.catalog.store().health() {
                    Ok(()) => plain(StatusCode::OK, NO_STORE, "ok\n"),
                    Err(e) => {
                        tracing::error!(error = %e, "health check failed");
                        plain(StatusCode::SERVICE_UNAVAILABLE, NO_STORE, format!("store unavailable: {e}\n"))
                    }
                }
            }
            "/_ask" => return self.ask(req.uri().query().unwrap_or("")),
            _ => {}
        }
        let path = in_host.unwrap_or(path);
        let path = path.strip_prefix('/').unwrap_or(path);
        let (first, second, rest) = cut_twice(path);
        let Ok(blog) = BlogId::parse(first) else {
            return self.fallback(req, None).await;
        };
        // What follows the blog, and what follows the segment after it, each
        // from its slash on.
        let after_blog = &path[first.len()..];
        let after_second = &after_blog[second.map_or(0, |s| 1 + s.len())..];
        let version = second.filter(|_| rest.is_some()).and_then(version_segment);
        match (second, rest, version) {
            (Some("_assets"), Some(rest), _) => {
                let mut segs = rest.split('/');
                let hash = segs.next().unwrap_or("");
                let names: Vec<&str> = segs.collect();
                self.asset(req, &blog, hash, &names).await
            }
            (_, _, Some(cache_id)) => match BlogPath::from_url_path(after_second) {
                Ok(p) => self.versioned(req, &blog, cache_id, &p, after_blog).await,
                Err(_) => plain(StatusCode::BAD_REQUEST, NO_STORE, "invalid path\n"),
            },
            // `/{blog}/{path}`: an unversioned (legacy) URL. Local disk, then
            // the fallback origins.
            (Some(_), _, None) => match BlogPath::from_url_path(after_blog) {
                Ok(p) => self.unversioned(req, &blog, &p).await,
                Err(_) => plain(StatusCode::BAD_REQUEST, NO_STORE, "invalid path\n"),
            },
            (None, _, _) => self.fallback(req, None).await,
        }
    }

    fn ask(&self, query: &str) -> Response<Body> {
        let domain = query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == "domain")
            .map(|(_, v)| percent_encoding::percent_decode_str(v).decode_utf8_lossy().into_owned());
        let Some(domain) = domain else {
            return plain(StatusCode::BAD_REQUEST, NO_STORE, "missing ?domain=\n");
        };
        match Domain::parse(&domain) {
            Ok(d) if self.catalog.store().lookup_domain(d.as_str()).is_some() => {
                plain(StatusCode::OK, NO_STORE, "ok\n")
            }
            Ok(_) => plain(StatusCode::NOT_FOUND, NO_STORE, "unknown domain\n"),
            Err(_) => plain(StatusCode::BAD_REQUEST, NO_STORE, "invalid domain\n"),
        }
    }

    /// `whole`: the URL's path after the blog, the id's segment included
    /// (what a folder named by a number past any cache id names).
    async fn versioned(
        &self,
        req: &Request<Incoming>,
        blog: &BlogId,
        id: CacheId,
        path: &BlogPath,
        whole: &str,
    ) -> Response<Body> {
        // Metadata first: an unknown blog or a version from the future costs no disk read.
        let version = self.catalog.store().path_version(blog.as_str(), path.as_str());
        if version.is_none_or(|v| id > v) && ahead_of_clock(id) {
            return match BlogPath::from_url_path(whole) {
                Ok(p) => self.unversioned(req, blog, &p).await,
                Err(_) => plain(StatusCode::BAD_REQUEST, NO_STORE, "invalid path\n"),
            };
        }
        let Some(version) = version else {
            return plain(StatusCode::NOT_FOUND, NO_STORE, "unknown blog\n");
        };
        if id > version {
            return plain(StatusCode::NOT_FOUND, NO_STORE, "no such version\n");
        }
        if path.is_hidden() {
            return plain(StatusCode::NOT_FOUND, SHORT, "not found\n");
        }
        let cache = if id == version { IMMUTABLE } else { SHORT };
        // The user's file; one the legacy bucket backfilled, else (short-lived
        // then: the static folder's files have no versions).
        self.serve_blog_file(req, blog, path, Some(version), cache, [Root::Blogs, Root::Static]).await
    }

    async fn unversioned(&self, req: &Request<Incoming>, blog: &BlogId, path: &BlogPath) -> Response<Body> {
        if path.is_hidden() {
            return plain(StatusCode::NOT_FOUND, SHORT, "not found\n");
        }
        // A deleted blog's files stay gone, on disk or in the legacy bucket,
        // until a blog of that id is created again.
        if self.catalog.store().is_deleted(blog.as_str()) {
            return plain(StatusCode::NOT_FOUND, SHORT, "not found\n");
        }
        // A legacy URL of a path bound to a permanent asset serves the asset.
        let store = self.catalog.store();
        if let Some(resolved) = store.resolve(blog, &[path.as_str()]) {
            if let Some(Resolution::Permanent { hash, .. }) = resolved.into_iter().next() {
                // Short-lived: the path may be bound to other bytes later.
                return self.serve_asset(req, blog, &hash, SHORT).await;
            }
        }
        // None: a blog the store does not know, whose files no publish ever
        // announces; they are read from disk each time, never kept hot.
        let version = store.path_version(blog.as_str(), path.as_str());
        // The platform's files first, then the user's, then the fallbacks.
        self.serve_blog_file(req, blog, path, version, SHORT, [Root::Static, Root::Blogs]).await
    }

    /// The file from the first folder in `order` that has it, else the
    /// fallback chain.
    async fn serve_blog_file(
        &self,
        req: &Request<Incoming>,
        blog: &BlogId,
        path: &BlogPath,
        version: Option<CacheId>,
        cache: &'static str,
        order: [Root; 2],
    ) -> Response<Body> {
        for root in order {
            let cache = if root == Root::Static { SHORT } else { cache };
            match self.blog_file(blog, path, version, cache, root).await {
                Ok(Some(Found::Parts(answer))) => return respond(req.method(), req.headers(), answer),
                Ok(Some(Found::Kept(file, cache))) => return respond_kept(req.method(), req.headers(), file, cache),
                Ok(None) => {}
                Err(resp) => return resp,
            }
        }
        self.fallback(req, Some((blog, path))).await
    }

    /// A blog path's file in one folder, from the hot cache (blog folders
    /// only, at a version the store knows) or the disk. `Ok(None)` when missing.
    async fn blog_file(
        &self,
        blog: &BlogId,
        path: &BlogPath,
        version: Option<CacheId>,
        cache: &'static str,
        root: Root,
    ) -> Result<Option<Found>, Response<Body>> {
        // Only files a version names are kept hot: the version moves when
        // the file changes, and with it the hot cache's key.
        let keep = if root == Root::Blogs { version } else { None };
        if let Some(version) = keep {
            if let Some(hot) = self.hot.get(blog.as_str(), path.as_str(), version) {
                tracing::Span::current().record("source", "hot");
                return Ok(Some(Found::Kept(hot, cache)));
            }
        }
        let blog_hv = HeaderValue::from_str(blog.as_str()).expect("blog ids are header-safe");
        tracing::Span::current().record("source", if root == Root::Blogs { "disk" } else { "static" });
        // Only a file the hot cache keeps is worth sealing.
        let seal_up_to = if keep.is_some() { self.hot.largest(path.as_str()) } else { 0 };
        // (A file changed within `recent_change` is not kept: a seal of it
        // is wasted, and rare.)
        let seal_max = self.sealed_files;
        let (b, p, cat) = (blog.clone(), path.clone(), self.catalog.clone());
        // The file, its metadata, its bytes when small, whether it grew past
        // small while read, and whether another process held it open for
        // writing while it was read.
        // And, for the static folder, the Content-Type kept with it.
        type Opened = (std::fs::File, Metadata, Option<Bytes>, bool, bool, Option<String>);
        let opened = tokio::task::spawn_blocking(move || -> Result<Opened, OpenError> {
            let dir = match root {
                Root::Blogs => cat.blogs_dir(),
                Root::Static => cat.static_dir(),
            };
            let (f, meta) = dir.open(&b, &p)?;
            // A writer holding the file (a sync in progress, a program
            // writing through a shared mapping) may store into pages already
            // dirty without moving any timestamp: what is read may be torn
            // while every stamp check passes. Asked at the open and, for a
            // file read whole, again after the read (a writer that opened it
            // meanwhile and is gone by then moved its times).
            let mut writing = writer_holds(&f);
            let busy =
                || OpenError::Io(std::io::Error::new(std::io::ErrorKind::ResourceBusy, "the file keeps changing"));
            // Not in the middle of a write (see `blogfs::settled`).
            let mut meta = settled(&f, meta)?;
            let (mut small, mut grew) = (None, false);
            let mut tries = 0;
            while small.is_none() && !grew && meta.len() <= SMALL_FILE {
                let buf = read_up_to(&f, meta.len(), SMALL_FILE + 1)?;
                let now = f.metadata()?;
                if buf.len() as u64 > SMALL_FILE {
                    // Grew past the limit since `stat`: streamed (with its
                    // length and validators as they are now, each chunk
                    // checked against them), and never kept hot.
                    grew = true;
                } else if buf.len() as u64 == now.len() && FileStamp::of(&now) == FileStamp::of(&meta) {
                    writing = writing || writer_holds(&f);
                    // Blog files may be kept hot: sealed, they are sent
                    // from the kernel's pages (see `origin/splice.rs`).
                    let seal = buf.len() as u64 <= seal_up_to && !writing;
                    let sealed = seal.then(|| splice::seal(&buf, seal_max)).flatten();
                    small = Some(sealed.unwrap_or_else(|| Bytes::from(buf)));
                } else {
                    // Written while it was read: what was read may be
                    // neither version, and must not be answered (nor kept
                    // hot under a version). Read again, a few times.
                    tries += 1;
                    if tries == 3 {
                        return Err(busy());
                    }
                    meta = settled(&f, now)?;
                    continue;
                }
                meta = now;
            }
            let kept = if root == Root::Static { crate::blogfs::kept_type(&f) } else { None };
            Ok((f, meta, small, grew, writing, kept))
        })
        .await
        .map_err(|_| plain(StatusCode::INTERNAL_SERVER_ERROR, NO_STORE, "internal error\n"))?;
        let (file, meta, small, grew, writing, kept) = match opened {
            Ok(x) => x,
            Err(OpenError::NotFound) => return Ok(None),
            Err(OpenError::Refused(why)) => {
                tracing::warn!(blog = %blog, path = %path, why, "refused to serve");
                return Err(plain(StatusCode::NOT_FOUND, SHORT, "not found\n"));
            }
            Err(OpenError::Io(e)) if e.kind() == std::io::ErrorKind::ResourceBusy => {
                tracing::info!(blog = %blog, path = %path, "a file being written was asked for");
                return Err(retry_soon("the file is being written; try again\n"));
            }
            Err(OpenError::Io(e)) if crate::listen::out_of_descriptors(&e) => return Err(Self::out_of_descriptors(&e)),
            Err(OpenError::Io(e)) => {
                tracing::error!(blog = %blog, path = %path, error = %e, "read failed");
                return Err(plain(StatusCode::INTERNAL_SERVER_ERROR, NO_STORE, "internal error\n"));
            }
        };
        // Changed just now: its bytes may not be whole yet though no stamp
        // moved (one slow write, stores through a shared mapping, which move
        // the times only at a page's first store, coarse timestamps).
        // Answered short-lived, so no cache holds a torn read for long, and
        // never kept hot. So is a file another process holds open for
        // writing, whatever its times say.
        let recent = writing || changed_ago(&meta) < self.recent_change;
        let (cache, keep) = if recent { (SHORT, None) } else { (cache, keep) };
        let modified = last_modified(&meta);
        let (content_type, cors) = match kept.as_deref().and_then(|t| Some((HeaderValue::from_str(t).ok()?, t))) {
            // A font the bucket typed its own way is still a font.
            Some((v, t)) => (v, cors_for_type(t) || cors_for(path.file_name())),
            None => (content_type(path.file_name()), cors_for(path.file_name())),
        };
        let etag = file_etag(&meta, recent);
        let hot = HotFile::new(content_type, etag, modified, cors, blog_hv.clone());
        let mut answer = match small {
            Some(bytes) => {
                let hot = hot.with_bytes(bytes);
                // Keyed by the path's version, which says nothing of the
                // static folder's files: only blog files are kept.
                if let Some(version) = keep {
                    let hot = Arc::new(hot.with_head());
                    self.hot.insert(blog.as_str(), path.as_str(), version, hot.clone());
                    return Ok(Some(Found::Kept(hot, cache)));
                }
                hot.answer(cache, blog_hv)
            }
            None => hot.streaming(file, meta, if grew { SHORT } else { cache }, blog_hv),
        };
        answer.recent = recent;
        Ok(Some(Found::Parts(answer)))
    }

    /// 503 with `Retry-After`: no descriptor is free for the file now; the
    /// next try may find one. Logged at most once a second.
    fn out_of_descriptors(e: &std::io::Error) -> Response<Body> {
        static WARNED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        if crate::telemetry::once_a_second(&WARNED) {
            tracing::warn!(error = %e, "out of file descriptors: answering 503; raise `ulimit -n`");
        }
        retry_soon("busy; try again\n")
    }

    async fn asset(&self, req: &Request<Incoming>, blog: &BlogId, hash: &str, rest: &[&str]) -> Response<Body> {
        let not_found = || plain(StatusCode::NOT_FOUND, SHORT, "not found\n");
        let (Ok(hash), [name]) = (ContentHash::parse(hash), rest) else {
            return not_found();
        };
        if name.is_empty() {
            return not_found();
        }
        self.serve_asset(req, blog, &hash, IMMUTABLE).await
    }

    /// A permanent asset the blog references, from the CAS; else 404.
    async fn serve_asset(
        &self,
        req: &Request<Incoming>,
        blog: &BlogId,
        hash: &ContentHash,
        cache: &'static str,
    ) -> Response<Body> {
        let hash = *hash;
        let not_found = || plain(StatusCode::NOT_FOUND, SHORT, "not found\n");
        let Some(aref) = self.catalog.store().asset_ref(blog.as_str(), &hash) else {
            return not_found();
        };
        let blog_hv = HeaderValue::from_str(blog.as_str()).expect("blog ids are header-safe");
        // The blob's own bytes, whichever blog's reference let the request
        // through (the check above comes first on every request, so a blob no
        // longer referenced is never answered from memory): kept hot by hash,
        // under a blog id no blog can have.
        let key = hash.to_hex();
        let asset_answer = |mut a: FileAnswer| {
            a.content_type = HeaderValue::from_str(&aref.content_type)
                .unwrap_or(HeaderValue::from_static("application/octet-stream"));
            a.asset_key = Some(format!("{blog}/{key}"));
            // From the stored content type only: the URL's file name is the
            // caller's to spell, and must not change what the answer allows.
            a.cors = cors_for_type(&aref.content_type);
            a
        };
        if let Some(hot) = self.hot.get("", &key, 0) {
            tracing::Span::current().record("source", "hot");
            return respond(req.method(), req.headers(), asset_answer(hot.answer(cache, blog_hv)));
        }
        tracing::Span::current().record("source", "cas");
        let path = self.catalog.cas().blob_path(&hash);
        // As blog files: larger ones stream, and are never read whole.
        let keep_up_to = self.hot.largest(&key).min(SMALL_FILE);
        let seal_max = self.sealed_files;
        let verified = self.verified.clone();
        let open = move || {
            let path = path.clone();
            let verified = verified.clone();
            tokio::task::spawn_blocking(move || {
                let f = std::fs::File::open(&path)?;
                let m = f.metadata()?;
                // Blobs never change: one the hot cache keeps is read whole,
                // and checked against its name before it is answered even
                // once: the edges keep these bytes for a year, so a blob that
                // went bad on disk is refused rather than published.
                let bytes = if m.len() <= keep_up_to {
                    let buf = verified.read_whole(hash, &f, &m)?;
                    Some(splice::seal(&buf, seal_max).unwrap_or_else(|| Bytes::from(buf)))
                } else {
                    None
                };
                Ok::<_, std::io::Error>((f, m, bytes))
            })
        };
        let mut opened = open().await;
        // Uploaded on another node (cluster mode): fetched from a peer by
        // hash, unless this request is itself a peer's.
        let missing = matches!(&opened, Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound);
        if missing && !self.peers.is_empty() && !req.headers().contains_key(peers::PEER_HEADER) {
            tracing::Span::current().record("source", "peer");
            match self.peers.fetch(&self.catalog, blog, &hash, aref.size).await {
                peers::Fetched::Yes => opened = open().await,
                peers::Fetched::Busy => return retry_soon("busy, retry\n"),
                // The node holding it may be the one down: not a "no such
                // asset" an edge would cache.
                peers::Fetched::Unreachable => {
                    return retry_soon("the node holding this asset cannot be reached now; retry\n")
                }
                peers::Fetched::No => {}
            }
        }
        let mut opened = opened.unwrap_or_else(|e| Err(std::io::Error::other(e)));
        let etag = format!("\"{key}\"");
        // Too large to hash on every answer: hashed before the first answer
        // that sends bytes, then again only once the file changed.
        if let Ok((file, meta, None)) = opened {
            let sends_nothing = req.method() == Method::HEAD
                || req.headers().get(header::IF_NONE_MATCH).is_some_and(|v| none_match(v, &etag));
            opened = match sends_nothing {
                true => Ok((file, meta, None)),
                false => match self.verified.check(hash, file, &meta).await {
                    (file, Ok(())) => Ok((file, meta, None)),
                    (_, Err(e)) => Err(e),
                },
            };
        }
        let (file, meta, bytes) = match opened {
            Ok(opened) => opened,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if req.headers().contains_key(peers::PEER_HEADER) {
                    // A peer asking: this node may not have fetched it yet.
                    tracing::debug!(blog = %blog, hash = %hash, "a peer asked for a blob this node does not hold");
                } else {
                    tracing::error!(blog = %blog, hash = %hash, "referenced blob is missing");
                }
                return not_found();
            }
            // As for blog files: a shortage that passes, not a bad blob.
            Err(e) if crate::listen::out_of_descriptors(&e) => return Self::out_of_descriptors(&e),
            Err(e) => {
                static LOGGED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                let damaged = e.kind() == std::io::ErrorKind::InvalidData;
                let text =
                    if damaged { format!("{DAMAGED}\n") } else { "cannot read the stored copy of this asset\n".into() };
                if crate::telemetry::once_a_second(&LOGGED) {
                    if damaged {
                        tracing::error!(blog = %blog, hash = %hash, "{DAMAGED}: not served; `blotcdn fsck` quarantines it");
                    } else {
                        tracing::error!(blog = %blog, hash = %hash, error = %e, "cannot read a stored blob");
                    }
                }
                // Never kept by an edge: the next request may succeed.
                return plain(StatusCode::INTERNAL_SERVER_ERROR, NO_STORE, text);
            }
        };
        let hot = HotFile::new(
            HeaderValue::from_static("application/octet-stream"),
            HeaderValue::from_str(&etag).expect("hex is header-safe"),
            meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            false,
            HeaderValue::from_static(""),
        );
        let answer = match bytes {
            Some(bytes) => {
                let hot = Arc::new(hot.with_bytes(bytes));
                self.hot.insert("", &key, 0, hot.clone());
                hot.answer(cache, blog_hv)
            }
            None => hot.streaming(file, meta, cache, blog_hv),
        };
        respond(req.method(), req.headers(), asset_answer(answer))
    }

    async fn fallback(&self, req: &Request<Incoming>, blog_file: Option<(&BlogId, &BlogPath)>) -> Response<Body> {
        let target = match blog_file {
            // A versioned URL's file is looked for under its unversioned name.
            Some((b, p)) => {
                let mut s = format!("/{b}");
                crate::domain::push_encoded_path(&mut s, p.as_str());
                s
            }
            // Anything else goes as asked, query included (the app may need it).
            None => req.uri().path_and_query().map_or("/", |p| p.as_str()).to_owned(),
        };
        tracing::Span::current().record("source", "fallback");
        // Backfill lands in the static folder, never in a user's synced folder.
        let dirs = self.catalog.static_dir();
        let backfill = blog_file.map(|(b, p)| (dirs.root().to_owned(), b.to_string(), PathBuf::from(&p.as_str()[1..])));
        match self.fallback.fetch(req.method(), &target, backfill, blog_file.map(|(b, _)| b.as_str())).await {
            Some(resp) => resp,
            None => plain(StatusCode::NOT_FOUND, SHORT, "not found\n"),
        }
    }
}

/// A host as the routes compare it: any port, and the dot of a fully
/// qualified name, left out.
fn bare_host(host: &str) -> &str {
    let host = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    host.strip_suffix('.').unwrap_or(host)
}

fn cdn_host(config: &Config) -> Option<String> {
    crate::domain::base_host(config.cdn_base_url.as_deref()?)
}

/// Set by the TLS edge for custom domains (`edge/Caddyfile`) to the name
/// of the certificate the connection was made for (its SNI): the request is
/// that domain's blog's, whatever its Host or target says.
const EDGE_DOMAIN: &str = "x-blotcdn-domain";

/// An index into [`crate::metrics::ROUTES`].
fn route_label(path: &str) -> usize {
    match path {
        "/healthz" => return 0,
        "/_ask" => return 1,
        _ => {}
    }
    match cut_twice(path.trim_start_matches('/')) {
        (_, Some("_assets"), Some(_)) => 2,
        (_, Some(id), Some(_)) if version_segment(id).is_some() => 3,
        (_, Some(p), _) if !p.is_empty() => 4,
        _ => 5,
    }
}

/// The cache id a URL's segment after the blog names, if it names one: a
/// cache id is a time in milliseconds (`max(now, last + 1)`), so none is
/// below [`MIN_CACHE_ID`] (September 2001). A shorter number is a folder
/// of the blog's (`/2016/05/post`, `/2016/photo.jpg`): before, any digits
/// were taken for a cache id, and `/{blog}/2016/photo.jpg` served the
/// blog's `/photo.jpg`.
fn version_segment(s: &str) -> Option<CacheId> {
    if s.len() < 13 {
        return None;
    }
    parse_cache_id(s).ok().filter(|id| *id >= MIN_CACHE_ID)
}

/// Whether `id` is more than a day ahead of this clock: no cache id (ids
/// are given at most a little ahead of the clock of the node that gave
/// them), but a folder (an ISBN-13, `/9780306406157/`, names the year
/// 2280). Asked only of an id the blog's path has not reached.
fn ahead_of_clock(id: CacheId) -> bool {
    let now_ms = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    id > now_ms + 86_400_000
}

/// The least cache id the origin reads as one (10^12 ms after 1970).
const MIN_CACHE_ID: CacheId = 1_000_000_000_000;

/// `s` cut at its first two slashes: the part before the first, the part
/// between them, and the rest. A byte loop: these are short, and
/// `str::split` costs more than the scan (measured per request).
fn cut_twice(s: &str) -> (&str, Option<&str>, Option<&str>) {
    let slash = |from: usize| s.as_bytes()[from..].iter().position(|&b| b == b'/').map(|i| from + i);
    let Some(a) = slash(0) else { return (s, None, None) };
    match slash(a + 1) {
        Some(b) => (&s[..a], Some(&s[a + 1..b]), Some(&s[b + 1..])),
        None => (&s[..a], Some(&s[a + 1..]), None),
    }
}

/// The file's first bytes, up to `limit` (all of it, if it is shorter), read
/// from its start whatever its offset; `hint`: its size when last seen.
fn read_up_to(f: &std::fs::File, hint: u64, limit: u64) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    // One more byte than the size seen, to find out it grew.
    let mut buf = vec![0u8; hint.saturating_add(1).clamp(1, limit) as usize];
    let mut n = 0;
    loop {
        if n == buf.len() {
            if n as u64 >= limit {
                return Ok(buf);
            }
            buf.resize((n * 2).min(limit as usize), 0);
        }
        match f.read_at(&mut buf[n..], n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(n);
    Ok(buf)
}
