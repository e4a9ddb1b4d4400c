//! Metadata: per-blog floors and path versions, permanent-asset bindings and
//! references, and the domain map. The [`Store`] trait is the seam where a
//! distributed engine (etcd, watched by every node) can later replace or feed
//! the embedded sled store.
//!
//! Contract every implementation keeps:
//! - reads (`resolve`, `path_version`, `asset_ref`, `blog`, `lookup_domain`)
//!   answer from memory: no I/O, no lock held for longer than the look-ups, so
//!   they run on async workers;
//! - writes are handed over and answered through a [`Pending`] once durable;
//!   concurrent writes share one flush; a reader never sees a write before it
//!   is durable.
//!
//! It must not know about URLs, HTTP, gRPC or the CAS's files.

use std::sync::Arc;

use crate::domain::{BlogId, BlogPath, CacheId, ContentHash, Domain};

pub mod etcd;
pub mod index;
pub mod paths;
pub mod sled_store;
pub mod snapshot;
mod trees;
pub mod wal;
pub mod writer;
pub use sled_store::{IndexedStore, PurgeOptions, SledStore};

/// Hands the memory a large passing job freed (a snapshot written or read,
/// the index loaded at start) back to the OS. The allocator (mimalloc, in
/// the binary) keeps freed pages for the thread that freed them, and the
/// threads that do these jobs then sit idle: without this, the RSS keeps
/// the job's peak for good.
pub(crate) fn give_back_memory() {
    // sled defers its frees to crossbeam's epochs, which move on only as
    // threads pin them: with sled closed, nothing would, and what it freed
    // would stay allocated until the next checkpoint.
    for _ in 0..16 {
        crossbeam_epoch::pin().flush();
    }
    // SAFETY: mi_collect only walks and releases the allocator's own free
    // pages; with another global allocator its heaps are empty.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage error: {0}")]
    Sled(#[from] sled::Error),
    #[error("storage I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot open the database at {path}: {source}")]
    Open { path: String, source: sled::Error },
    #[error("corrupt record in tree {tree}: {what}")]
    Corrupt { tree: &'static str, what: String },
    /// sled came back older than its last checkpoint: it lost writes
    /// (corruption it read as a torn tail, or a restored old copy).
    #[error(
        "the database in {path} is corrupt or older than its last checkpoint (it holds writes up to record \
         {holds}, the checkpoint recorded {recorded}); refusing to start on it: restore {path} from a backup"
    )]
    Behind { path: String, holds: u64, recorded: u64 },
    /// The write-ahead log is gone, or emptied, from a store that has
    /// checkpointed: the writes acknowledged since its last checkpoint may
    /// have been in it (after a clean stop it held none; nothing tells).
    #[error(
        "the write-ahead log {wal} is {what}, but this store has checkpointed before ({marker} exists): the writes \
         acknowledged since its last checkpoint would be lost; refusing to start without them. Put the log back \
         (it is not a text log and is never safe to delete). If it is lost for good, remove {marker} as well and \
         start again: the writes since the last checkpoint are then gone"
    )]
    LogMissing { wal: String, what: &'static str, marker: String },
    /// Another process holds the store (a running server; `fsck` or a
    /// second server would lose what it acknowledges).
    #[error(
        "the data dir is in use: {holder} holds {path}; stop it first (a server, fsck and any other blotcdn \
         process cannot share a data dir: acknowledged writes would be lost)"
    )]
    Locked { path: String, holder: String },
    #[error("unknown blog {0}")]
    UnknownBlog(String),
    #[error("the store is closed")]
    Closed,
    /// Out of room (disk full, the write queue full, the log past its bound):
    /// nothing was changed, and the same write can succeed later.
    #[error("{0}")]
    Full(String),
    /// A write could not be logged for another reason; nothing was changed.
    #[error("{0}")]
    Unavailable(String),
    /// Writes are refused from now on (a failed disk sync).
    #[error("{0}")]
    Failed(String),
}

impl StoreError {
    /// The refusal of a group whose log append failed.
    pub fn append(e: &std::io::Error) -> StoreError {
        if crate::durable::is_disk_full(e) {
            StoreError::Full(format!(
                "the server's disk is full: the write could not be logged ({e}); nothing was changed, retry once space is freed"
            ))
        } else {
            StoreError::Unavailable(format!("the write could not be logged ({e}); nothing was changed"))
        }
    }

    /// The same refusal, for another caller of the same group.
    pub fn clone_for_reply(&self) -> StoreError {
        match self {
            StoreError::Full(m) => StoreError::Full(m.clone()),
            StoreError::Unavailable(m) => StoreError::Unavailable(m.clone()),
            StoreError::Failed(m) => StoreError::Failed(m.clone()),
            other => StoreError::Unavailable(other.to_string()),
        }
    }
}

/// What a path of a known blog resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// A versioned URL at this cache id (`max(floor, path version)`).
    Versioned(CacheId),
    /// A permanent URL.
    Permanent { hash: ContentHash, filename: Arc<str> },
}

/// A permanent asset a blog references.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssetRef {
    pub size: u64,
    pub content_type: Arc<str>,
}

/// A binding of a blog path to a permanent asset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub hash: ContentHash,
    pub filename: Arc<str>,
    pub size: u64,
    pub content_type: Arc<str>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlogInfo {
    pub blog_id: BlogId,
    pub floor: CacheId,
    pub domains: Vec<String>,
    pub path_count: u64,
    pub asset_count: u64,
}

/// A write handed to the store, answered once it is durable.
#[must_use = "a write is only durable once its Pending is waited on"]
pub struct Pending<T>(pub(crate) tokio::sync::oneshot::Receiver<Result<T, StoreError>>);

impl<T> Pending<T> {
    /// Waits on an async task (never blocks a worker thread).
    pub async fn done(self) -> Result<T, StoreError> {
        self.0.await.map_err(|_| StoreError::Closed)?
    }

    /// Waits on a blocking thread (CLI, fsck, the blocking pool).
    pub fn blocking(self) -> Result<T, StoreError> {
        self.0.blocking_recv().map_err(|_| StoreError::Closed)?
    }
}

pub trait Store: Send + Sync + 'static {
    /// Resolutions for already-validated paths, in order; `None` for an
    /// unknown blog. Memory only.
    fn resolve(&self, blog: &BlogId, paths: &[&str]) -> Option<Vec<Resolution>>;
    /// The current version of one path (`max(floor, path version)`), `None`
    /// for an unknown blog. Memory only.
    fn path_version(&self, blog: &str, path: &str) -> Option<CacheId>;
    /// The blog's reference to a permanent asset, if it holds one.
    fn asset_ref(&self, blog: &str, hash: &ContentHash) -> Option<AssetRef>;
    fn blog(&self, blog: &BlogId) -> Option<BlogInfo>;
    /// True for a blog that was deleted and not created again.
    fn is_deleted(&self, blog: &str) -> bool;
    /// Path versions held in memory, all blogs together (for the metrics).
    fn index_paths(&self) -> u64;
    fn lookup_domain(&self, domain: &str) -> Option<BlogId>;
    /// Every hash some blog references (for fsck).
    fn referenced_hashes(&self) -> Vec<ContentHash>;
    /// True if a blog references the blob, or a reference to it is on its
    /// way to disk (so the blob must not be collected).
    fn is_referenced(&self, hash: &ContentHash) -> bool;

    /// Raises the floor (no paths) or the named paths' versions; a named path
    /// loses its binding to a permanent asset (its bytes changed). Creates an
    /// unknown blog.
    fn invalidate(&self, blog: BlogId, paths: Vec<BlogPath>) -> Pending<CacheId>;
    /// Records that `blog` references the blob, and binds `path` to it when
    /// given. Creates an unknown blog. The reference counts for
    /// [`Store::is_referenced`] from the moment this returns.
    fn bind_asset(&self, blog: BlogId, path: Option<BlogPath>, binding: Binding) -> Pending<()>;
    /// Maps a domain to a blog (creating the blog if unknown).
    fn set_domain(&self, domain: Domain, blog: BlogId) -> Pending<()>;
    /// False when the domain was not mapped.
    fn remove_domain(&self, domain: Domain) -> Pending<bool>;
    /// Removes everything of the blog; the hashes it referenced are recorded
    /// as garbage candidates in the same flush, and returned. `None` for an
    /// unknown blog. Enqueues the blog's purge key in the same flush.
    fn delete_blog(&self, blog: BlogId) -> Pending<Option<Vec<ContentHash>>>;
    /// Takes down one permanent asset: the blog's reference and every path
    /// bound to it go (those paths take a new version), the hash becomes a
    /// garbage candidate, and its purge key is enqueued in the same flush.
    /// False when the blog does not reference the hash.
    fn delete_asset(&self, blog: BlogId, hash: ContentHash) -> Pending<bool>;
    /// Enqueues purge keys for every edge target, durably.
    fn purge(&self, keys: Vec<String>) -> Pending<()>;
    /// Records that `target` delivered every purge up to record `upto`.
    fn purge_sent(&self, target: String, upto: u64) -> Pending<()>;
    /// Garbage candidates left by deletions, including ones a crash
    /// interrupted. Memory only.
    fn gc_candidates(&self) -> Vec<ContentHash>;
    /// Drops a garbage candidate once its blob is gone (`removed`) or found
    /// referenced (and still is: a candidate no blog references any more
    /// stays, for the next collection).
    fn gc_done(&self, hash: ContentHash, removed: bool) -> Pending<()>;
    /// Durable once everything handed over before it is.
    fn flush(&self) -> Pending<()>;
    /// Stops taking writes, finishes (and checkpoints) what was handed over,
    /// and lets go of the database and its lock: a clean stop, even while
    /// other parts still hold the store. Blocks until done.
    fn close(&self);
    /// `Err` with the reason when writes are refused (a failed sync, a
    /// stopped writer, or the last append failed: disk full). Memory only:
    /// cheap enough for every health check.
    fn health(&self) -> Result<(), String>;
}
