//! The in-memory index every read is served from: per blog, its floor, path
//! versions and bindings, asset references and domains; the domain map; how
//! many blogs reference each blob; blogs deleted and not created again; and
//! the blobs left as garbage candidates by deletions.
//!
//! It is changed only by the writer, after a group of writes is durable, and
//! read under a short read lock. It must not do I/O.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use super::{AssetRef, BlogInfo, Resolution};
use crate::domain::{BlogId, CacheId, ContentHash};

pub type FastMap<K, V> = HashMap<K, V, ahash::RandomState>;
pub type FastSet<K> = HashSet<K, ahash::RandomState>;

#[derive(Debug, Clone)]
pub struct PathEntry {
    pub version: CacheId,
    /// Boxed: most paths have none, and a million entries stay 16 bytes each.
    pub binding: Option<Box<(ContentHash, Arc<str>)>>,
}

#[derive(Debug, Default)]
pub struct BlogState {
    pub floor: CacheId,
    pub paths: FastMap<Box<str>, PathEntry>,
    pub refs: FastMap<ContentHash, AssetRef>,
    pub domains: BTreeSet<Box<str>>,
}

#[derive(Debug, Default)]
pub struct Index {
    pub blogs: FastMap<Box<str>, BlogState>,
    pub domains: FastMap<Box<str>, BlogId>,
    /// How many blogs reference each blob.
    pub blob_refs: FastMap<ContentHash, u32>,
    /// Blogs deleted and not created again: their URLs answer 404, even the
    /// unversioned ones that would otherwise reach the disk or the fallbacks.
    pub deleted: FastSet<Box<str>>,
    /// Blobs whose last reference may be gone (garbage candidates).
    pub gc: FastSet<ContentHash>,
}

impl Index {
    /// The blog's state, created if new (and no longer deleted).
    pub fn blog_mut(&mut self, blog: &BlogId, floor: CacheId) -> &mut BlogState {
        if !self.deleted.is_empty() {
            self.deleted.remove(blog.as_str());
        }
        let state = self.blogs.entry(blog.as_str().into()).or_default();
        state.floor = state.floor.max(floor);
        state
    }

    /// Forgets a blog: its references stop counting, its domains go.
    pub fn remove_blog(&mut self, blog: &str) {
        if let Some(state) = self.blogs.remove(blog) {
            for h in state.refs.keys() {
                if let Some(n) = self.blob_refs.get_mut(h) {
                    *n -= 1;
                    if *n == 0 {
                        self.blob_refs.remove(h);
                    }
                }
            }
            for d in &state.domains {
                self.domains.remove(d);
            }
        }
        self.deleted.insert(blog.into());
    }

    /// Unmaps a domain from whichever blog held it.
    pub fn unmap_domain(&mut self, domain: &str) -> bool {
        match self.domains.remove(domain) {
            Some(old) => {
                if let Some(s) = self.blogs.get_mut(old.as_str()) {
                    s.domains.remove(domain);
                }
                true
            }
            None => false,
        }
    }

    pub fn resolve(&self, blog: &BlogId, paths: &[&str]) -> Option<Vec<Resolution>> {
        let state = self.blogs.get(blog.as_str())?;
        let out = paths
            .iter()
            .map(|p| match state.paths.get(*p) {
                Some(PathEntry { binding: Some(b), .. }) => Resolution::Permanent { hash: b.0, filename: b.1.clone() },
                Some(e) => Resolution::Versioned(e.version.max(state.floor)),
                None => Resolution::Versioned(state.floor),
            })
            .collect();
        Some(out)
    }

    pub fn path_version(&self, blog: &str, path: &str) -> Option<CacheId> {
        let state = self.blogs.get(blog)?;
        Some(state.paths.get(path).map_or(state.floor, |e| e.version.max(state.floor)))
    }

    pub fn blog_info(&self, blog: &BlogId) -> Option<BlogInfo> {
        let s = self.blogs.get(blog.as_str())?;
        Some(BlogInfo {
            blog_id: blog.clone(),
            floor: s.floor,
            domains: s.domains.iter().map(|d| d.to_string()).collect(),
            path_count: s.paths.len() as u64,
            asset_count: s.refs.len() as u64,
        })
    }
}
