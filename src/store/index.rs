//! The in-memory index every read is served from: per blog, its floor, path
//! versions and bindings, asset references and domains; the domain map; how
//! many blogs reference each blob; blogs deleted and not created again; and
//! the blobs left as garbage candidates by deletions.
//!
//! It is changed only by the writer, after a group of writes is durable, and
//! read under a short read lock. It must not do I/O.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use super::wal::Rec;
use super::{AssetRef, BlogInfo, Resolution};
use crate::domain::{BlogId, CacheId, ContentHash};

pub type FastMap<K, V> = HashMap<K, V, ahash::RandomState>;
pub type FastSet<K> = HashSet<K, ahash::RandomState>;

pub use super::paths::{Found, PathEntry, Paths};

#[derive(Debug, Default, PartialEq)]
pub struct BlogState {
    pub floor: CacheId,
    pub paths: Paths,
    pub refs: FastMap<ContentHash, AssetRef>,
    pub domains: BTreeSet<Box<str>>,
}

#[derive(Debug, Default, PartialEq)]
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
    pub fn blog_mut(&mut self, blog: &str, floor: CacheId) -> &mut BlogState {
        if !self.deleted.is_empty() {
            self.deleted.remove(blog);
        }
        if !self.blogs.contains_key(blog) {
            self.blogs.insert(blog.into(), BlogState::default());
        }
        let state = self.blogs.get_mut(blog).expect("just inserted");
        state.floor = state.floor.max(floor);
        state
    }

    /// What a durable record changes: the one way a write reaches the
    /// index, from the sled writer's log group or from the etcd watch.
    pub fn apply(&mut self, rec: &Rec) {
        match rec {
            Rec::Invalidate { blog, id, floor, paths } => {
                let state = self.blog_mut(blog, *floor);
                if paths.is_empty() {
                    // The floor rose past every path version: one without a
                    // binding now says nothing the floor does not. The index
                    // keeps what is live. (Nothing to drop when every path
                    // is bound: a blog republished again and again.)
                    if state.paths.bound() < state.paths.len() {
                        state.paths.retain(|_, e| e.binding.is_some());
                    }
                }
                for p in paths {
                    state.paths.insert(p, PathEntry { version: *id, binding: None });
                }
            }
            Rec::Bind { blog, id, floor, path, hash, size, content_type, filename } => {
                let hash = ContentHash(*hash);
                let state = self.blog_mut(blog, *floor);
                // A blog's permanent asset keeps the type of its first upload: its URL
                // answers the same bytes with the same headers for as long as it lives,
                // whatever type the same bytes are uploaded with later.
                let new_ref = match state.refs.entry(hash) {
                    std::collections::hash_map::Entry::Occupied(_) => false,
                    std::collections::hash_map::Entry::Vacant(v) => {
                        v.insert(AssetRef { size: *size, content_type: Arc::from(content_type.as_str()) });
                        true
                    }
                };
                if let Some(p) = path {
                    let entry =
                        PathEntry { version: *id, binding: Some(Box::new((hash, Arc::from(filename.as_str())))) };
                    state.paths.insert(p, entry);
                }
                if new_ref {
                    *self.blob_refs.entry(hash).or_default() += 1;
                }
            }
            Rec::SetDomain { domain, blog, create } => {
                let Ok(blog_id) = BlogId::parse(blog) else { return };
                self.unmap_domain(domain);
                self.blog_mut(blog, create.unwrap_or(0)).domains.insert(domain.as_str().into());
                self.domains.insert(domain.as_str().into(), blog_id);
            }
            Rec::RemoveDomain { domain } => {
                self.unmap_domain(domain);
            }
            Rec::Delete { blog, hashes, .. } => {
                self.remove_blog(blog);
                self.gc.extend(hashes.iter().map(|h| ContentHash(*h)));
            }
            Rec::Unref { blog, id, floor, hash, paths } => {
                let hash = ContentHash(*hash);
                let state = self.blog_mut(blog, *floor);
                state.refs.remove(&hash);
                for p in paths {
                    state.paths.insert(p, PathEntry { version: *id, binding: None });
                }
                if let Some(n) = self.blob_refs.get_mut(&hash) {
                    *n -= 1;
                    if *n == 0 {
                        self.blob_refs.remove(&hash);
                    }
                }
                self.gc.insert(hash);
            }
            Rec::GcDone { hash } => {
                self.gc.remove(&ContentHash(*hash));
            }
            Rec::Purge { .. } | Rec::PurgeSent { .. } => {}
        }
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
            .map(|p| match state.paths.get(p) {
                Some(Found { binding: Some(b), .. }) => Resolution::Permanent { hash: b.0, filename: b.1.clone() },
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
