//! Metadata: per-blog floors and path versions, permanent-asset bindings and
//! references, and the domain map. The [`Store`] trait is the seam where a
//! distributed engine (etcd, watched by every node) can later replace or feed
//! the embedded sled store.
//!
//! Contract every implementation keeps:
//! - reads (`resolve`, `path_entry`, `asset_ref`, `blog`, `lookup_domain`)
//!   answer from memory: no I/O, no lock held for longer than the look-ups, so
//!   they may run on async workers;
//! - writes block until durable and must run off the async workers
//!   (`spawn_blocking`); concurrent writes share one flush.
//!
//! It must not know about URLs, HTTP, gRPC or the CAS's files.

use std::sync::Arc;

use crate::domain::{BlogId, BlogPath, CacheId, ContentHash, Domain};

pub mod sled_store;
pub use sled_store::SledStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage error: {0}")]
    Sled(#[from] sled::Error),
    #[error("storage I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("corrupt record in tree {tree}: {what}")]
    Corrupt { tree: &'static str, what: String },
    #[error("unknown blog {0}")]
    UnknownBlog(String),
    #[error("the store is closed")]
    Closed,
}

/// What a path of a known blog resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// A versioned URL at this cache id (`max(floor, path version)`).
    Versioned(CacheId),
    /// A permanent URL.
    Permanent {
        hash: ContentHash,
        filename: Arc<str>,
    },
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
    fn lookup_domain(&self, domain: &str) -> Option<BlogId>;
    /// Every hash some blog references (for fsck).
    fn referenced_hashes(&self) -> Vec<ContentHash>;
    fn is_referenced(&self, hash: &ContentHash) -> bool;

    /// Raises the floor (no paths) or the named paths' versions; a named path
    /// loses its binding to a permanent asset (its bytes changed). Creates an
    /// unknown blog. Durable on return.
    fn invalidate(&self, blog: &BlogId, paths: &[BlogPath]) -> Result<CacheId, StoreError>;
    /// Records that `blog` references the blob, and binds `path` to it when
    /// given. Creates an unknown blog. Durable on return.
    fn bind_asset(
        &self,
        blog: &BlogId,
        path: Option<&BlogPath>,
        binding: &Binding,
    ) -> Result<(), StoreError>;
    fn set_domain(&self, domain: &Domain, blog: &BlogId) -> Result<(), StoreError>;
    /// False when the domain was not mapped.
    fn remove_domain(&self, domain: &Domain) -> Result<bool, StoreError>;
    /// Removes everything of the blog; the hashes it referenced are recorded
    /// as garbage candidates (durably, in the same flush) and returned.
    /// `None` for an unknown blog.
    fn delete_blog(&self, blog: &BlogId) -> Result<Option<Vec<ContentHash>>, StoreError>;
    /// Garbage candidates left by deletions, including ones a crash interrupted.
    fn gc_candidates(&self) -> Result<Vec<ContentHash>, StoreError>;
    /// Drops a garbage candidate once its blob is gone or found referenced.
    fn gc_done(&self, hash: &ContentHash) -> Result<(), StoreError>;
    fn flush(&self) -> Result<(), StoreError>;
}
