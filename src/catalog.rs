//! The core both front doors call: gRPC for renderers and the publish
//! pipeline, HTTP for the CDN. It applies the rules of DESIGN.md (what a
//! path resolves to, what a publish changes, what a deletion may remove) on
//! top of the store, the CAS and the blog folders.
//!
//! It must not know about protobuf or HTTP: it speaks domain types and
//! [`CatalogError`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};

use crate::blogfs::{is_settled, settled, BlogsDir, FileStamp, Lease, LeasedRead, OpenError, WrittenMeanwhile};
use crate::cas::{Cas, PendingBlob};
use crate::domain::{self, BlogId, BlogPath, CacheId, ContentHash, Domain, InvalidInput};
use crate::store::{Binding, BlogInfo, Pending, Resolution, Store, StoreError};

/// Custom domains a blog may have.
pub const MAX_DOMAINS: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error(transparent)]
    Invalid(#[from] InvalidInput),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    Timeout(String),
    /// Something changed under the call (a file rewritten while it was
    /// imported): nothing was kept; the same call later may succeed.
    #[error("{0}")]
    Changed(String),
    /// The caller went away mid-call (an upload's stream broke off): not a
    /// bad request, and nothing was kept.
    #[error("{0}")]
    Cancelled(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

impl CatalogError {
    /// A stable code for logs and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            CatalogError::Invalid(_) | CatalogError::BadRequest(_) => "invalid_argument",
            CatalogError::NotFound(_) => "not_found",
            CatalogError::TooLarge(_) => "too_large",
            CatalogError::Timeout(_) => "timeout",
            CatalogError::Changed(_) => "changed",
            CatalogError::Cancelled(_) => "cancelled",
            CatalogError::Store(_) => "store",
            CatalogError::Io(_) => "io",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolveStatus {
    Ok = 0,
    UnknownBlog = 1,
    InvalidPath = 2,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub url: String,
    pub status: ResolveStatus,
    pub cache_id: CacheId,
    pub content_hash: Option<ContentHash>,
}

impl Resolved {
    fn failed(status: ResolveStatus) -> Self {
        Resolved { url: String::new(), status, cache_id: 0, content_hash: None }
    }
}

/// What `PutAsset` and `ImportFile` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssetInfo {
    pub hash: ContentHash,
    pub url: String,
    pub size: u64,
    pub content_type: String,
    pub filename: String,
}

/// The first message of an upload.
#[derive(Debug, Clone, Default)]
pub struct PutHeader {
    pub blog_id: String,
    pub filename: String,
    pub content_type: String,
    pub path: String,
}

/// What `fsck` found.
#[derive(Debug, Default)]
pub struct FsckReport {
    pub blobs_checked: u64,
    pub corrupt: Vec<ContentHash>,
    pub missing: Vec<ContentHash>,
    pub quarantined: Vec<std::path::PathBuf>,
}

pub struct Catalog {
    store: Arc<dyn Store>,
    cas: Cas,
    blogs: BlogsDir,
    base_url: String,
    url_style: domain::UrlStyle,
    max_batch: usize,
    max_asset_bytes: u64,
    /// Serialises naming a blob + recording its reference against deciding a
    /// blob is garbage + deleting it, so a blob never disappears under a
    /// reference being added.
    blob_lock: parking_lot::Mutex<()>,
    purges: Arc<crate::purge::Outbox>,
    statics: BlogsDir,
    /// [`IMPORTS_AT_ONCE`] turns: an import copies only with one, held by
    /// the copy itself (so a caller that goes away does not free it while
    /// the copy runs on).
    imports: Arc<tokio::sync::Semaphore>,
    /// Serialises SetDomain's count of a blog's domains with its write, so
    /// that calls at once cannot pass [`MAX_DOMAINS`] together (on one node).
    domain_writes: tokio::sync::Mutex<()>,
}

/// `ImportFile` copies at once, server-wide; more wait their turn, holding
/// no descriptor (each copy holds two, the blog's file and the blob being
/// written, and a thread of the blocking pool). A hostile test's 1,000
/// imports at once took 540 descriptors and every blocking thread.
pub const IMPORTS_AT_ONCE: usize = 16;

pub struct CatalogOptions {
    pub base_url: String,
    pub url_style: domain::UrlStyle,
    pub max_batch: usize,
    pub max_asset_bytes: u64,
    /// The outbox the store fills (for `GetPurges`).
    pub purges: Arc<crate::purge::Outbox>,
    /// The platform's own files per blog (legacy URLs), and where backfill lands.
    pub static_dir: BlogsDir,
}

/// Longest purge key accepted, in bytes.
const MAX_PURGE_KEY_BYTES: usize = 256;

/// Runs blocking store or file work off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, CatalogError> + Send + 'static,
) -> Result<T, CatalogError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CatalogError::Io(std::io::Error::other(format!("blocking task failed: {e}"))))?
}

/// A read that stops once the call it serves is gone.
struct UntilGone<'a, R> {
    read: R,
    gone: &'a AtomicBool,
}

impl<R: std::io::Read> std::io::Read for UntilGone<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.gone.load(Ordering::Relaxed) {
            return Err(std::io::Error::other(CallerGone));
        }
        self.read.read(buf)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the caller went away")]
struct CallerGone;

/// Sets its flag when dropped before `done`: a call's future dropped
/// before it finished (the caller went away, or its deadline passed).
#[derive(Default)]
struct CallGone {
    flag: Arc<AtomicBool>,
    done: bool,
}

impl CallGone {
    fn done(mut self) {
        self.done = true;
    }
}

impl Drop for CallGone {
    fn drop(&mut self) {
        if !self.done {
            self.flag.store(true, Ordering::SeqCst);
        }
    }
}

impl Catalog {
    pub fn new(store: Arc<dyn Store>, cas: Cas, blogs: BlogsDir, opts: CatalogOptions) -> Self {
        Catalog {
            store,
            cas,
            blogs,
            base_url: opts.base_url,
            url_style: opts.url_style,
            max_batch: opts.max_batch,
            max_asset_bytes: opts.max_asset_bytes,
            blob_lock: parking_lot::Mutex::new(()),
            purges: opts.purges,
            statics: opts.static_dir,
            imports: Arc::new(tokio::sync::Semaphore::new(IMPORTS_AT_ONCE)),
            domain_writes: tokio::sync::Mutex::new(()),
        }
    }

    pub fn store(&self) -> &dyn Store {
        &*self.store
    }
    pub fn cas(&self) -> &Cas {
        &self.cas
    }
    pub fn blogs_dir(&self) -> &BlogsDir {
        &self.blogs
    }
    /// The static folder: `{static_dir}/{blog}/…`, confined like the blogs.
    pub fn static_dir(&self) -> &BlogsDir {
        &self.statics
    }
    pub fn base_url(&self) -> &str {
        &self.base_url
    }
    pub fn url_style(&self) -> domain::UrlStyle {
        self.url_style
    }

    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// ResolveBatch and Invalidate take at most `max_batch` paths, Purge
    /// as many keys. (The Node client reads "is over max_batch".)
    fn check_batch(&self, n: usize, of: &str) -> Result<(), CatalogError> {
        if n > self.max_batch {
            return Err(CatalogError::BadRequest(format!("batch of {n} {of} is over max_batch ({})", self.max_batch)));
        }
        Ok(())
    }

    /// One answer per path, in order. Memory only: a look-up and a string
    /// per item.
    pub fn resolve_batch(&self, blog: &str, paths: &[String]) -> Result<Vec<Resolved>, CatalogError> {
        let blog = BlogId::parse(blog)?;
        self.check_batch(paths.len(), "paths")?;
        let checked: Vec<Option<std::borrow::Cow<'_, str>>> =
            paths.iter().map(|p| BlogPath::validate(p).ok()).collect();
        let valid: Vec<&str> = checked.iter().flatten().map(|c| c.as_ref()).collect();
        let Some(resolutions) = self.store.resolve(&blog, &valid) else {
            return Ok(checked
                .iter()
                .map(|c| {
                    Resolved::failed(if c.is_some() { ResolveStatus::UnknownBlog } else { ResolveStatus::InvalidPath })
                })
                .collect());
        };
        let mut resolutions = resolutions.into_iter();
        let mut out = Vec::with_capacity(paths.len());
        for c in &checked {
            let Some(path) = c else {
                out.push(Resolved::failed(ResolveStatus::InvalidPath));
                continue;
            };
            out.push(match resolutions.next().expect("one resolution per valid path") {
                // The origin never serves a hidden file (a segment that
                // starts with a dot): a URL for one would be dead, where the
                // renderer keeps the path as written when told it is bad.
                Resolution::Versioned(_) if path.contains("/.") => Resolved::failed(ResolveStatus::InvalidPath),
                Resolution::Versioned(id) => Resolved {
                    url: domain::versioned_url(&self.base_url, self.url_style, blog.as_str(), id, path),
                    status: ResolveStatus::Ok,
                    cache_id: id,
                    content_hash: None,
                },
                Resolution::Permanent { hash, filename } => Resolved {
                    url: domain::permanent_url(&self.base_url, self.url_style, blog.as_str(), &hash, &filename),
                    status: ResolveStatus::Ok,
                    cache_id: 0,
                    content_hash: Some(hash),
                },
            });
        }
        Ok(out)
    }

    pub fn get_blog(&self, blog: &str) -> Result<BlogInfo, CatalogError> {
        let id = BlogId::parse(blog)?;
        self.store.blog(&id).ok_or_else(|| CatalogError::NotFound(format!("unknown blog {id}")))
    }

    pub fn lookup_domain(&self, domain: &str) -> Result<BlogId, CatalogError> {
        let d = Domain::parse(domain)?;
        self.store.lookup_domain(d.as_str()).ok_or_else(|| CatalogError::NotFound(format!("unmapped domain {d}")))
    }

    pub async fn invalidate(self: &Arc<Self>, blog: &str, paths: &[String]) -> Result<CacheId, CatalogError> {
        let blog = BlogId::parse(blog)?;
        self.check_batch(paths.len(), "paths")?;
        let mut parsed = Vec::with_capacity(paths.len());
        for (i, p) in paths.iter().enumerate() {
            parsed.push(BlogPath::parse(p).map_err(|e| CatalogError::BadRequest(format!("paths[{i}]: {e}")))?);
        }
        Ok(self.store.invalidate(blog, parsed).done().await?)
    }

    pub async fn set_domain(self: &Arc<Self>, domain: &str, blog: &str) -> Result<Domain, CatalogError> {
        let d = Domain::parse(domain)?;
        let b = BlogId::parse(blog)?;
        // The CDN's own names route by path or name their blog themselves;
        // as a custom domain they would take over the CDN for one blog.
        if let Some(cdn) = domain::base_host(&self.base_url) {
            let s = d.as_str();
            if s == cdn || s.strip_suffix(cdn.as_str()).is_some_and(|sub| sub.ends_with('.')) {
                return Err(CatalogError::BadRequest(format!(
                    "domain {d}: is the CDN's own host name (cdn_base_url) or a name under it, not a custom domain"
                )));
            }
        }
        // A blog's domains are all in its GetBlog answer: kept to a number
        // that answer can hold. One SetDomain at a time (they are rare), so
        // the count and the write go together; in cluster mode each node
        // counts on its own, and nodes at once may pass it by one each.
        let _one_at_a_time = self.domain_writes.lock().await;
        let domains = self.store.blog(&b).map_or(0, |i| i.domains.len());
        if domains >= MAX_DOMAINS && self.store.lookup_domain(d.as_str()).as_ref() != Some(&b) {
            return Err(CatalogError::TooLarge(format!(
                "blog {b} has {domains} domains, the most a blog may have ({MAX_DOMAINS}); remove one first"
            )));
        }
        self.store.set_domain(d.clone(), b).done().await?;
        Ok(d)
    }

    pub async fn remove_domain(self: &Arc<Self>, domain: &str) -> Result<(), CatalogError> {
        let d = Domain::parse(domain)?;
        if self.store.remove_domain(d.clone()).done().await? {
            Ok(())
        } else {
            Err(CatalogError::NotFound(format!("unmapped domain {d}")))
        }
    }

    /// Streams an upload into the CAS. `chunks` yields the data after the header.
    pub async fn put_asset<S>(self: &Arc<Self>, header: PutHeader, mut chunks: S) -> Result<AssetInfo, CatalogError>
    where
        S: Stream<Item = Result<Bytes, CatalogError>> + Unpin,
    {
        let blog = BlogId::parse(&header.blog_id)?;
        let filename = domain::parse_filename(&header.filename)?;
        let path = match header.path.as_str() {
            "" => None,
            p => Some(BlogPath::parse(p)?),
        };
        let content_type = content_type_for(&header.content_type, &filename)?;
        let mut writer = Some(self.cas.writer()?);
        let limit = self.max_asset_bytes;
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk?;
            let mut w = writer.take().expect("writer is returned after every chunk");
            if w.size() + chunk.len() as u64 > limit {
                return Err(CatalogError::TooLarge(format!("asset is over max_asset_bytes ({limit} bytes)")));
            }
            // The writer travels into the blocking pool and back; dropped on
            // any error, it removes its temporary file.
            w = blocking(move || {
                w.write(&chunk)?;
                Ok(w)
            })
            .await?;
            writer = Some(w);
        }
        let w = writer.take().expect("writer present");
        let this = self.clone();
        let id = blog.clone();
        let (info, durable) = blocking(move || {
            let pending = w.finish()?;
            this.commit_blob(blog, path, pending, filename, content_type)
        })
        .await?;
        self.clone().bound_or_dropped(info.hash, durable).await?;
        Ok(self.as_served(&id, info))
    }

    /// The answer says the type the asset's URL is served with: the first
    /// upload's, when the blog held these bytes already (see `Index::apply`).
    fn as_served(&self, blog: &BlogId, mut info: AssetInfo) -> AssetInfo {
        if let Some(r) = self.store.asset_ref(blog.as_str(), &info.hash) {
            if *r.content_type != *info.content_type {
                info.content_type = r.content_type.to_string();
            }
        }
        info
    }

    /// Makes a file in the blog's folder a permanent asset bound to its path.
    pub async fn import_file(self: &Arc<Self>, blog: &str, path: &str) -> Result<AssetInfo, CatalogError> {
        let blog = BlogId::parse(blog)?;
        let path = BlogPath::parse(path)?;
        let this = self.clone();
        let id = blog.clone();
        let turn = self.imports.clone().acquire_owned().await.expect("never closed");
        // Set if this call is dropped (the caller went away, its deadline
        // passed) while the copy runs: nothing is bound then.
        let gone = CallGone::default();
        let flag = gone.flag.clone();
        let (info, durable) = blocking(move || {
            let _turn = turn;
            this.import_file_blocking(blog, path, &flag)
        })
        .await?;
        gone.done();
        self.clone().bound_or_dropped(info.hash, durable).await?;
        Ok(self.as_served(&id, info))
    }

    fn import_file_blocking(
        &self,
        blog: BlogId,
        path: BlogPath,
        gone: &AtomicBool,
    ) -> Result<(AssetInfo, Pending<()>), CatalogError> {
        let (file, meta) = self.blogs.open(&blog, &path).map_err(|e| match e {
            OpenError::NotFound => CatalogError::NotFound(format!("no file {path} in blog {blog}")),
            OpenError::Refused(why) => CatalogError::BadRequest(format!("{path} in blog {blog}: {why}")),
            OpenError::Io(e) if e.kind() == std::io::ErrorKind::ResourceBusy => CatalogError::Changed(format!(
                "{path} in blog {blog} cannot be read now ({e}); nothing was kept: import it again in a moment"
            )),
            OpenError::Io(e) => CatalogError::Io(e),
        })?;
        if meta.len() > self.max_asset_bytes {
            return Err(CatalogError::TooLarge(format!(
                "{path} is {} bytes, over max_asset_bytes ({})",
                meta.len(),
                self.max_asset_bytes
            )));
        }
        // A copy from the descriptor checked above, never a link: the blob
        // must not change when the sync tool rewrites the file in place, and
        // a rename racing the import cannot swap another file in.
        let changed = || {
            CatalogError::Changed(format!(
                "{path} in blog {blog} changed while it was imported; nothing was kept: import it again once it is written"
            ))
        };
        // A writer still holding the file (a sync in progress, a program
        // writing through a mapping): its bytes may land during the copy
        // without moving any timestamp, so the stamp check below cannot be
        // relied on; the read lease held through the copy tells of it,
        // and of one that opens the file meanwhile.
        let writing = || {
            CatalogError::Changed(format!(
                "{path} in blog {blog} is open for writing by another process; nothing was kept: import it once it is written and closed"
            ))
        };
        // Not in the middle of a write (see `blogfs::settled`).
        let meta = settled(&file, meta)?;
        if !is_settled(&meta) {
            // Still changing after the waits: what is there now may be a
            // moment of a sync (a file cut before its bytes come).
            return Err(changed());
        }
        // Held while the file is read, after the wait so that a writer never
        // waits for it (see `blogfs::Lease`).
        let lease = Lease::take(&file);
        if lease.writer() {
            return Err(writing());
        }
        let unleased = matches!(lease, Lease::Unknown);
        let read = UntilGone { read: LeasedRead::new(&file, lease), gone };
        let cancelled =
            || CatalogError::Cancelled(format!("the import of {path} in blog {blog} was cancelled by its caller"));
        let pending = self.cas.copy_from(read, self.max_asset_bytes).map_err(|e| match e.kind() {
            _ if e.get_ref().is_some_and(|e| e.is::<CallerGone>()) => cancelled(),
            std::io::ErrorKind::FileTooLarge => CatalogError::TooLarge(format!(
                "{path} grew past max_asset_bytes ({}) while it was imported",
                self.max_asset_bytes
            )),
            _ if WrittenMeanwhile::is(&e) => changed(),
            _ => CatalogError::Io(e),
        })?;
        // Written (or cut) while it was copied: the copy may be neither the
        // old file nor the new one, and must not become a permanent asset.
        // The lease tells of a writer that came; the times, where there is
        // no lease, of one that wrote.
        let after = file.metadata()?;
        if pending.size != meta.len() || FileStamp::of(&after) != FileStamp::of(&meta) {
            return Err(changed());
        }
        if unleased {
            // No lease to tell of a writer, and stores through a mapping
            // made before the import move no time: the file read again must
            // be what was copied (a writer in the middle of its stores moves
            // on between the two reads).
            let mut again = &file;
            std::io::Seek::seek(&mut again, std::io::SeekFrom::Start(0))?;
            let mut hasher = blake3::Hasher::new();
            hasher.update_reader(std::io::Read::take(again, pending.size + 1))?;
            if ContentHash::of(&hasher.finalize()) != pending.hash {
                return Err(changed());
            }
        }
        if gone.load(Ordering::SeqCst) {
            return Err(cancelled());
        }
        let filename = path.file_name().to_owned();
        let content_type = content_type_for("", &filename)?;
        self.commit_blob(blog, Some(path), pending, filename, content_type)
    }

    /// Waits for a binding to be durable. Refused (disk full, queue full),
    /// the blob just named is removed unless another reference holds it:
    /// nothing else would ever collect it.
    /// On a task of its own, so that a caller gone meanwhile (its future
    /// dropped) cannot leave a refused binding's blob named and unreferenced.
    async fn bound_or_dropped(self: Arc<Self>, hash: ContentHash, durable: Pending<()>) -> Result<(), CatalogError> {
        let task = tokio::spawn(async move {
            let Err(e) = durable.done().await else {
                return Ok(());
            };
            let this = self.clone();
            let _ = blocking(move || {
                let _g = this.blob_lock.lock();
                if !this.store.is_referenced(&hash) {
                    this.cas.remove(&hash)?;
                }
                Ok(())
            })
            .await;
            Err(e.into())
        });
        task.await.map_err(|e| CatalogError::Io(std::io::Error::other(format!("binding task failed: {e}"))))?
    }

    /// Names the blob and hands its reference to the store. Returns the
    /// answer and the store's promise of durability, to be waited on.
    fn commit_blob(
        &self,
        blog: BlogId,
        path: Option<BlogPath>,
        pending: PendingBlob,
        filename: String,
        content_type: String,
    ) -> Result<(AssetInfo, Pending<()>), CatalogError> {
        let (hash, size) = (pending.hash, pending.size);
        let info = AssetInfo {
            hash,
            url: domain::permanent_url(&self.base_url, self.url_style, blog.as_str(), &hash, &filename),
            size,
            content_type: content_type.clone(),
            filename: filename.clone(),
        };
        let binding = Binding { hash, filename: filename.into(), size, content_type: content_type.into() };
        // Under the blob lock the name and the reference appear together, as
        // far as garbage collection can tell: the reference pins at once.
        let _g = self.blob_lock.lock();
        self.cas.commit(pending)?;
        let durable = self.store.bind_asset(blog, path, binding);
        Ok((info, durable))
    }

    pub async fn delete_blog(self: &Arc<Self>, blog: &str) -> Result<(), CatalogError> {
        let blog = BlogId::parse(blog)?;
        if self.store.delete_blog(blog.clone()).done().await?.is_none() {
            return Err(CatalogError::NotFound(format!("unknown blog {blog}")));
        }
        let this = self.clone();
        blocking(move || this.collect_garbage()).await?;
        Ok(())
    }

    /// Takes down one permanent asset of a blog (and purges it at the edges).
    pub async fn delete_asset(self: &Arc<Self>, blog: &str, hash: &str) -> Result<(), CatalogError> {
        let blog = BlogId::parse(blog)?;
        let hash = ContentHash::parse(hash)?;
        if !self.store.delete_asset(blog.clone(), hash).done().await? {
            let why = if self.store.blog(&blog).is_some() { "does not reference" } else { "is unknown, so holds no" };
            return Err(CatalogError::NotFound(format!("blog {blog} {why} asset {hash}")));
        }
        let this = self.clone();
        blocking(move || this.collect_garbage()).await?;
        Ok(())
    }

    /// Enqueues purge keys of one blog at every edge target (none given: the
    /// blog id), durably. A key is the blog id or `{blog_id}/{rest}`, `rest`
    /// of `[A-Za-z0-9_-]` and `/`: a publisher can only purge its own blog.
    pub async fn purge(&self, blog: &str, keys: Vec<String>) -> Result<(), CatalogError> {
        let blog = BlogId::parse(blog)?;
        self.check_batch(keys.len(), "purge keys")?;
        for k in &keys {
            let rest = if k == blog.as_str() {
                Some("x")
            } else {
                k.strip_prefix(blog.as_str()).and_then(|r| r.strip_prefix('/'))
            };
            let ok = k.len() <= MAX_PURGE_KEY_BYTES
                && rest.is_some_and(|r| {
                    !r.is_empty() && r.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'/')
                });
            if !ok {
                return Err(CatalogError::BadRequest(format!(
                    "invalid purge key {:?}: expected the blog id {blog} or {blog}/… ([A-Za-z0-9_-/], at most {MAX_PURGE_KEY_BYTES} bytes)",
                    k.chars().take(120).collect::<String>()
                )));
            }
        }
        let keys = if keys.is_empty() { vec![blog.to_string()] } else { keys };
        self.store.purge(keys).done().await?;
        Ok(())
    }

    /// Each edge target's purge queue.
    pub fn purge_queues(&self) -> Vec<crate::purge::QueueInfo> {
        self.purges.snapshot()
    }

    /// Names a blob fetched from a peer (cluster mode) once it proved to be
    /// `hash`. Under the blob lock, and only while a blog references it, as
    /// garbage collection would see it: false (and nothing kept) otherwise.
    pub fn adopt_blob(&self, hash: &ContentHash, pending: crate::cas::PendingBlob) -> std::io::Result<bool> {
        if pending.hash != *hash {
            return Ok(false);
        }
        let _g = self.blob_lock.lock();
        if !self.store.is_referenced(hash) {
            return Ok(false);
        }
        self.cas.commit(pending)?;
        Ok(true)
    }

    /// Removes blobs no blog references any more. Safe to run at any time,
    /// and at start to finish what a crash interrupted.
    pub fn collect_garbage(&self) -> Result<usize, CatalogError> {
        let mut removed = 0;
        for hash in self.store.gc_candidates() {
            let gone = {
                let _g = self.blob_lock.lock();
                let gone = !self.store.is_referenced(&hash);
                if gone {
                    self.cas.remove(&hash)?;
                    removed += 1;
                }
                gone
            };
            self.store.gc_done(hash, gone).blocking()?;
        }
        Ok(removed)
    }

    /// Re-hashes every blob; reports (and with `quarantine`, moves aside)
    /// blobs whose bytes no longer match their name, and references to
    /// blobs that are not there.
    pub fn fsck(&self, quarantine: bool) -> Result<FsckReport, CatalogError> {
        let mut report = FsckReport::default();
        for (hash, path) in self.cas.list()? {
            report.blobs_checked += 1;
            // Not a regular file where the blob should be: as corrupt, moved aside too.
            if self.cas.rehash(&path)? != Some(hash) {
                report.corrupt.push(hash);
                if quarantine {
                    report.quarantined.push(self.cas.quarantine(&hash)?);
                }
            }
        }
        for hash in self.store.referenced_hashes() {
            if !self.cas.exists(&hash) {
                report.missing.push(hash);
            }
        }
        report.missing.sort();
        Ok(report)
    }
}

/// The content type given, or one guessed from the file name.
fn content_type_for(given: &str, filename: &str) -> Result<String, CatalogError> {
    if given.is_empty() {
        return Ok(mime_guess::from_path(filename).first_or_octet_stream().essence_str().to_owned());
    }
    let ok = given.len() <= 255
        && given.contains('/')
        && given.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
        && given.parse::<mime_guess::mime::Mime>().is_ok();
    if ok {
        Ok(given.to_owned())
    } else {
        Err(CatalogError::BadRequest(format!("invalid content_type {given:?}: expected a MIME type like image/png")))
    }
}
