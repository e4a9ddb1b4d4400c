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

use crate::blogfs::{changed_ago, settled, writer_holds, FileStamp, Lease, OpenError};
use crate::catalog::Catalog;
use crate::config::Config;
use crate::domain::{BlogId, BlogPath, CacheId, ContentHash};
use crate::store::Resolution;

mod answer;
mod fallback;
mod hot;
mod large;
pub mod peers;
mod route;
mod serve;
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
use route::{ahead_of_clock, cdn_host};
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
            // writing through a shared mapping) may store into pages without
            // moving any timestamp: what is read may be torn while every
            // stamp check passes. A file read whole is read under a read
            // lease, which tells of a writer there or one that came (see
            // `blogfs::Lease`); of a larger one, whether a writer holds it is
            // asked once.
            let mut writing = false;
            let busy =
                || OpenError::Io(std::io::Error::new(std::io::ErrorKind::ResourceBusy, "the file keeps changing"));
            // Not in the middle of a write (see `blogfs::settled`).
            let mut meta = settled(&f, meta)?;
            if meta.len() > SMALL_FILE {
                writing = writer_holds(&f);
            }
            let (mut small, mut grew) = (None, false);
            let mut tries = 0;
            while small.is_none() && !grew && meta.len() <= SMALL_FILE {
                let lease = Lease::take(&f);
                let buf = read_up_to(&f, meta.len(), SMALL_FILE + 1)?;
                let (mut broken, writer) = (lease.broken(), lease.writer());
                if matches!(lease, Lease::Unknown) && buf.len() as u64 <= SMALL_FILE {
                    // No lease to tell of a writer, and stores through a
                    // mapping made before move no time: read twice, the
                    // same bytes (a writer in the middle of its stores moves
                    // on between the reads).
                    broken = read_up_to(&f, meta.len(), SMALL_FILE + 1)? != buf;
                }
                drop(lease);
                let now = f.metadata()?;
                if buf.len() as u64 > SMALL_FILE {
                    // Grew past the limit since `stat`: streamed (with its
                    // length and validators as they are now, each chunk
                    // checked against them), and never kept hot.
                    grew = true;
                    writing = writer;
                } else if !broken && buf.len() as u64 == now.len() && FileStamp::of(&now) == FileStamp::of(&meta) {
                    writing = writer;
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
            // Anything else goes as asked, query included (the app may need it),
            // when it means to the origins what it means here.
            None if forwardable(req.uri().path()) => req.uri().path_and_query().map_or("/", |p| p.as_str()).to_owned(),
            None => return plain(StatusCode::BAD_REQUEST, NO_STORE, "invalid path\n"),
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

/// Whether a path not under a blog may go to the fallback origins as it
/// came. An origin decodes and normalises what it is sent (nginx and most app
/// servers do), so a `.` or `..` segment, plain or escaped (also before a `;`,
/// as some servers read `..;`), a `/` or `\` hidden in an escape, a `\` or a
/// NUL would reach, under an origin with a path (`http://bucket/legacy`),
/// whatever lies outside that path. Readers' browsers never send such paths.
/// The same holds once decoded twice (`%252e%252e`), for an origin that
/// decodes again.
fn forwardable(path: &str) -> bool {
    let raw = path.as_bytes();
    let once: Vec<u8> = percent_encoding::percent_decode(raw).collect();
    let twice: Vec<u8> = percent_encoding::percent_decode(&once).collect();
    let slashes = |b: &[u8]| b.iter().filter(|&&c| c == b'/').count();
    [once, twice].iter().all(|decoded| {
        !decoded.iter().any(|&c| c == b'\\' || c == 0)
            && slashes(decoded) == slashes(raw)
            && decoded.split(|&c| c == b'/').all(|seg| {
                let seg = seg.split(|&c| c == b';').next().unwrap_or_default();
                seg != b"." && seg != b".."
            })
    })
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

#[cfg(test)]
mod forward_tests {
    #[test]
    fn only_paths_that_mean_the_same_to_an_origin_are_forwarded() {
        for ok in ["/", "/app.js", "/a/b.c/d", "/x..y/..z", "/%20name", "/a;b", "/100%25.txt", "/%25"] {
            assert!(super::forwardable(ok), "{ok}");
        }
        for bad in [
            "/..",
            "/../x",
            "/a/./b",
            "/%2e%2e/x",
            "/%2E%2e/x",
            "/..%2fx",
            "/a%2Fb",
            "/a%5cb",
            "/a\\b",
            "/a%00b",
            "/..;/x",
            "/.%2e/x",
            "/%252e%252e/x",
            "/%%32%65%%32%65/x",
            "/a%255cb",
            "/a%252fb",
        ] {
            assert!(!super::forwardable(bad), "{bad}");
        }
    }
}
