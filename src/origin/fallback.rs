//! The fallback chain: origins tried in order for what the local disk and the
//! CAS do not hold — the legacy S3 bucket's HTTP endpoint, then the main app.
//! A hit from a backfill origin (the legacy bucket) for a blog file is also
//! written into the blog's folder, so the bucket empties itself into the
//! server over time. Only 2xx answers are taken; anything else tries the next.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

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
    /// (blog folder, file relative to it) where a backfill origin's hit is
    /// written, when the URL names a blog file.
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

/// Writes a blog file that does not exist yet, at `rel` (relative, already
/// validated) under the blog's folder: temporary name, fsync, then a link
/// that fails if a synced file appeared meanwhile (that one wins).
///
/// Every step below the blog's folder goes through a directory descriptor
/// opened with `O_NOFOLLOW`: a symbolic link anywhere on the way (one a sync
/// put there, even one swapped in mid-way) stops the write instead of leading
/// it outside the folder.
fn write_new_file(blog_dir: &Path, rel: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::{AsRawFd, FromRawFd};
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let cstr = |b: &[u8]| std::ffi::CString::new(b).map_err(|_| io::Error::other("NUL in a path"));

    std::fs::create_dir_all(blog_dir)?;
    let mut dir =
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC).open(blog_dir)?;
    let name = rel.file_name().ok_or_else(|| io::Error::other("no file name"))?;
    for comp in rel.parent().into_iter().flat_map(|p| p.components()) {
        let c = cstr(comp.as_os_str().as_bytes())?;
        // SAFETY: `dir` is an open directory and `c` a NUL-terminated name.
        if unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), 0o755) } != 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::AlreadyExists {
                return Err(e);
            }
        }
        let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: as above; the new descriptor is owned by the File below.
        let fd = unsafe { libc::openat(dir.as_raw_fd(), c.as_ptr(), flags) };
        if fd < 0 {
            return Err(io::Error::other(format!(
                "backfill refused: {:?} is not a plain folder inside the blog ({})",
                comp.as_os_str(),
                io::Error::last_os_error()
            )));
        }
        dir = unsafe { std::fs::File::from_raw_fd(fd) };
    }
    let tmp =
        cstr(format!(".blotcdn-backfill-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed)).as_bytes())?;
    let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: `dir` is open; the descriptor is owned by the File below.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), tmp.as_ptr(), flags, 0o644 as libc::c_uint) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    let written = file.write_all(bytes).and_then(|_| file.sync_all());
    let name = cstr(name.as_bytes())?;
    let linked = written.and_then(|_| {
        // SAFETY: both names are relative to the same open directory.
        match unsafe { libc::linkat(dir.as_raw_fd(), tmp.as_ptr(), dir.as_raw_fd(), name.as_ptr(), 0) } {
            0 => dir.sync_all(),
            _ => match io::Error::last_os_error() {
                e if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
                e => Err(e),
            },
        }
    });
    // SAFETY: as above.
    unsafe { libc::unlinkat(dir.as_raw_fd(), tmp.as_ptr(), 0) };
    linked
}
