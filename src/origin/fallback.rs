//! The fallback chain: origins tried in order for what the local disk and the
//! CAS do not hold — the legacy S3 bucket's HTTP endpoint, then the main app.
//! A hit from a backfill origin (the legacy bucket) for a blog file is also
//! written into the blog's folder, so the bucket empties itself into the
//! server over time. Only 2xx answers are taken; anything else tries the next.

use std::path::PathBuf;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

use super::{full, Body, SHORT};

/// Bodies larger than this pass through without being kept.
const MAX_BACKFILL_BYTES: usize = 64 * 1024 * 1024;

pub struct Fallback {
    origins: Vec<String>,
    backfill: usize,
    client: Client<HttpConnector, Empty<Bytes>>,
}

impl Fallback {
    pub fn new(origins: &[String], backfill: usize) -> Fallback {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(std::time::Duration::from_secs(5)));
        connector.set_nodelay(true);
        Fallback { origins: origins.to_vec(), backfill, client: Client::builder(TokioExecutor::new()).build(connector) }
    }

    /// Tries each origin for `target` (an absolute path). `backfill_to` is
    /// (blog folder, file) where a backfill origin's hit is written, when
    /// the URL names a blog file.
    pub async fn fetch(
        &self,
        method: &Method,
        target: &str,
        backfill_to: Option<(PathBuf, PathBuf)>,
        blog: Option<&str>,
    ) -> Option<Response<Body>> {
        for (i, origin) in self.origins.iter().enumerate() {
            let uri = format!("{origin}{target}");
            let Ok(req) = Request::builder().method(method.clone()).uri(&uri).body(Empty::new()) else {
                continue;
            };
            let resp = match tokio::time::timeout(std::time::Duration::from_secs(10), self.client.request(req)).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    tracing::warn!(origin, error = %e, "fallback origin failed");
                    continue;
                }
                Err(_) => {
                    tracing::warn!(origin, "fallback origin timed out");
                    continue;
                }
            };
            if !resp.status().is_success() {
                continue;
            }
            let (parts, body) = resp.into_parts();
            let body = match Limited::new(body, MAX_BACKFILL_BYTES).collect().await {
                Ok(c) => c.to_bytes(),
                Err(e) => {
                    tracing::warn!(origin, error = %e, "fallback body unreadable or too large");
                    continue;
                }
            };
            let keep = i < self.backfill && method == Method::GET;
            if let (true, Some((blog_dir, dest))) = (keep, backfill_to.as_ref()) {
                let (blog_dir, dest, bytes) = (blog_dir.clone(), dest.clone(), body.clone());
                match tokio::task::spawn_blocking(move || write_new_file(&blog_dir, &dest, &bytes)).await {
                    Ok(Ok(())) => {
                        tracing::info!(target, origin, "backfilled from the legacy origin")
                    }
                    Ok(Err(e)) => tracing::warn!(target, error = %e, "backfill write failed"),
                    Err(_) => {}
                }
            }
            let mut out = Response::new(full(body));
            *out.status_mut() = StatusCode::OK;
            let h = out.headers_mut();
            for name in [header::CONTENT_TYPE, header::ETAG, header::LAST_MODIFIED] {
                if let Some(v) = parts.headers.get(&name) {
                    h.insert(name, v.clone());
                }
            }
            // An unversioned URL may change behind the edge: keep it short.
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static(SHORT));
            if let Some(b) = blog.and_then(|b| HeaderValue::from_str(b).ok()) {
                h.insert("surrogate-key", b.clone());
                h.insert("cache-tag", b);
            }
            return Some(out);
        }
        None
    }
}

/// Writes a file that does not exist yet: temporary name, fsync, then a
/// link that fails if a synced file appeared meanwhile (that one wins).
/// The folder it lands in must really be inside the blog's folder (a synced
/// symbolic link could point elsewhere).
fn write_new_file(blog_dir: &std::path::Path, dest: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let dir = dest.parent().ok_or_else(|| std::io::Error::other("no parent"))?;
    std::fs::create_dir_all(dir)?;
    if !dir.canonicalize()?.starts_with(blog_dir.canonicalize()?) {
        return Err(std::io::Error::other("backfill target resolves outside the blog's folder"));
    }
    let tmp = dir.join(format!(".blotcdn-backfill-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed)));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    let r = std::fs::hard_link(&tmp, dest);
    let _ = std::fs::remove_file(&tmp);
    match r {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    }
}
