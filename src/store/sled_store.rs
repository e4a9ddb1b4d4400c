//! The embedded store: sled 0.34 on disk, one tree per keyspace, mirrored in
//! an in-memory index that serves every read.
//!
//! Trees (keys are `blog 0x00 rest`, which sorts a blog's keys together and
//! cannot collide: neither blog ids nor paths hold NUL):
//! - `blogs`:   blog → floor u64 BE, last assigned cache id u64 BE
//! - `paths`:   blog\0path → version u64 BE [, hash 16 bytes, filename]
//! - `refs`:    blog\0hash16 → size u64 BE, content type
//! - `domains`: domain → blog
//! - `gc`:      hash16 → () — blobs whose last reference may be gone
//!
//! Writes are serialised by one mutex that also owns each blog's floor and
//! last assigned cache id, so ids are strictly increasing per blog. The flush
//! happens outside that mutex and is shared by every writer waiting at the
//! time (group commit); the index is updated once the flush is done, so a
//! reader never sees a version that a crash could take back. Index updates
//! carry the cache id they were made at, and only a newer one wins, which
//! makes their order within a group irrelevant.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::{Condvar, Mutex, RwLock};

use super::{AssetRef, Binding, BlogInfo, Resolution, Store, StoreError};
use crate::domain::{next_cache_id, BlogId, BlogPath, CacheId, ContentHash, Domain};

type FastMap<K, V> = HashMap<K, V, ahash::RandomState>;

#[derive(Debug, Clone)]
struct PathEntry {
    version: CacheId,
    binding: Option<(ContentHash, Arc<str>)>,
}

#[derive(Debug, Default)]
struct BlogState {
    floor: CacheId,
    paths: FastMap<Box<str>, PathEntry>,
    refs: FastMap<ContentHash, AssetRef>,
    domains: BTreeSet<Box<str>>,
}

#[derive(Debug, Default)]
struct Index {
    blogs: FastMap<Box<str>, BlogState>,
    domains: FastMap<Box<str>, BlogId>,
    /// How many blogs reference each blob.
    blob_refs: FastMap<ContentHash, u32>,
}

/// What the write mutex owns: per blog, the floor and last assigned cache id
/// as written to sled, and a generation that changes when a blog is deleted
/// so that a late index update of a deleted blog is dropped.
#[derive(Debug, Default)]
struct Writer {
    blogs: FastMap<Box<str>, WriterBlog>,
    next_generation: u64,
}

#[derive(Debug, Clone, Copy)]
struct WriterBlog {
    floor: CacheId,
    last: CacheId,
    generation: u64,
}

pub struct SledStore {
    db: sled::Db,
    blogs: sled::Tree,
    paths: sled::Tree,
    refs: sled::Tree,
    domains: sled::Tree,
    gc: sled::Tree,
    index: RwLock<Index>,
    writer: Mutex<Writer>,
    commit: Arc<GroupCommit>,
    flusher: Mutex<Option<JoinHandle<()>>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn key(blog: &str, rest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(blog.len() + 1 + rest.len());
    k.extend_from_slice(blog.as_bytes());
    k.push(0);
    k.extend_from_slice(rest);
    k
}

fn split_key<'a>(tree: &'static str, k: &'a [u8]) -> Result<(&'a str, &'a [u8]), StoreError> {
    let pos = k
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| corrupt(tree, "key without separator"))?;
    let blog = std::str::from_utf8(&k[..pos]).map_err(|_| corrupt(tree, "blog id not UTF-8"))?;
    Ok((blog, &k[pos + 1..]))
}

fn corrupt(tree: &'static str, what: &str) -> StoreError {
    StoreError::Corrupt {
        tree,
        what: what.to_owned(),
    }
}

fn u64_at(tree: &'static str, v: &[u8], at: usize) -> Result<u64, StoreError> {
    v.get(at..at + 8)
        .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
        .ok_or_else(|| corrupt(tree, "value too short"))
}

fn hash_at(tree: &'static str, v: &[u8], at: usize) -> Result<ContentHash, StoreError> {
    v.get(at..at + 16)
        .map(|b| ContentHash(b.try_into().expect("16 bytes")))
        .ok_or_else(|| corrupt(tree, "hash too short"))
}

fn blog_value(floor: CacheId, last: CacheId) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&floor.to_be_bytes());
    v[8..].copy_from_slice(&last.to_be_bytes());
    v
}

impl SledStore {
    /// Opens (or creates) the store in `dir` and loads the index.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = sled::Config::new().path(dir).open()?;
        let store = SledStore {
            blogs: db.open_tree("blogs")?,
            paths: db.open_tree("paths")?,
            refs: db.open_tree("refs")?,
            domains: db.open_tree("domains")?,
            gc: db.open_tree("gc")?,
            commit: Arc::new(GroupCommit::default()),
            index: RwLock::new(Index::default()),
            writer: Mutex::new(Writer::default()),
            flusher: Mutex::new(None),
            db,
        };
        store.load()?;
        let (db, commit) = (store.db.clone(), store.commit.clone());
        let handle = std::thread::Builder::new()
            .name("blotcdn-flush".into())
            .spawn(move || commit.run(&db))?;
        *store.flusher.lock() = Some(handle);
        Ok(store)
    }

    fn load(&self) -> Result<(), StoreError> {
        let mut index = Index::default();
        let mut writer = Writer::default();
        for kv in self.blogs.iter() {
            let (k, v) = kv?;
            let blog =
                std::str::from_utf8(&k).map_err(|_| corrupt("blogs", "blog id not UTF-8"))?;
            let (floor, last) = (u64_at("blogs", &v, 0)?, u64_at("blogs", &v, 8)?);
            index.blogs.insert(
                blog.into(),
                BlogState {
                    floor,
                    ..Default::default()
                },
            );
            writer.blogs.insert(
                blog.into(),
                WriterBlog {
                    floor,
                    last,
                    generation: 0,
                },
            );
        }
        for kv in self.paths.iter() {
            let (k, v) = kv?;
            let (blog, path) = split_key("paths", &k)?;
            let path = std::str::from_utf8(path).map_err(|_| corrupt("paths", "path not UTF-8"))?;
            let entry = decode_path_entry(&v)?;
            let state = index
                .blogs
                .get_mut(blog)
                .ok_or_else(|| corrupt("paths", "path of an unknown blog"))?;
            state.paths.insert(path.into(), entry);
        }
        for kv in self.refs.iter() {
            let (k, v) = kv?;
            let (blog, hash) = split_key("refs", &k)?;
            let hash = hash_at("refs", hash, 0)?;
            let aref = decode_ref(&v)?;
            let state = index
                .blogs
                .get_mut(blog)
                .ok_or_else(|| corrupt("refs", "reference of an unknown blog"))?;
            if state.refs.insert(hash, aref).is_none() {
                *index.blob_refs.entry(hash).or_default() += 1;
            }
        }
        for kv in self.domains.iter() {
            let (k, v) = kv?;
            let domain =
                std::str::from_utf8(&k).map_err(|_| corrupt("domains", "domain not UTF-8"))?;
            let blog =
                std::str::from_utf8(&v).map_err(|_| corrupt("domains", "blog id not UTF-8"))?;
            let blog_id = BlogId::parse(blog).map_err(|e| corrupt("domains", &e.to_string()))?;
            if let Some(state) = index.blogs.get_mut(blog) {
                state.domains.insert(domain.into());
            }
            index.domains.insert(domain.into(), blog_id);
        }
        *self.index.write() = index;
        *self.writer.lock() = writer;
        Ok(())
    }

    /// Assigns the next cache id of a blog, creating the blog (floor = that
    /// id) when unknown. Returns (id, floor, generation).
    fn assign(
        &self,
        w: &mut Writer,
        blog: &BlogId,
        raise_floor: bool,
    ) -> Result<(CacheId, WriterBlog), StoreError> {
        let gen = w.next_generation;
        let entry = w.blogs.entry(blog.as_str().into());
        let created = matches!(entry, std::collections::hash_map::Entry::Vacant(_));
        let wb = entry.or_insert(WriterBlog {
            floor: 0,
            last: 0,
            generation: gen,
        });
        let id = next_cache_id(now_ms(), wb.last);
        wb.last = id;
        if raise_floor || created {
            wb.floor = id;
        }
        let wb = *wb;
        if created {
            w.next_generation += 1;
        }
        self.blogs
            .insert(blog.as_str().as_bytes(), &blog_value(wb.floor, wb.last))?;
        Ok((id, wb))
    }

    /// Runs `f` on the blog's index entry if the blog still has the
    /// generation the write was made under.
    fn apply(&self, blog: &BlogId, generation: u64, f: impl FnOnce(&mut Index)) {
        let w = self.writer.lock();
        if w.blogs.get(blog.as_str()).map(|b| b.generation) != Some(generation) {
            return;
        }
        f(&mut self.index.write());
    }

    fn ensure_blog<'a>(index: &'a mut Index, blog: &BlogId, floor: CacheId) -> &'a mut BlogState {
        let state = index.blogs.entry(blog.as_str().into()).or_default();
        state.floor = state.floor.max(floor);
        state
    }
}

fn decode_path_entry(v: &[u8]) -> Result<PathEntry, StoreError> {
    let version = u64_at("paths", v, 0)?;
    let binding = if v.len() > 8 {
        let hash = hash_at("paths", v, 8)?;
        let name =
            std::str::from_utf8(&v[24..]).map_err(|_| corrupt("paths", "filename not UTF-8"))?;
        Some((hash, Arc::from(name)))
    } else {
        None
    };
    Ok(PathEntry { version, binding })
}

fn decode_ref(v: &[u8]) -> Result<AssetRef, StoreError> {
    let size = u64_at("refs", v, 0)?;
    let ct = std::str::from_utf8(&v[8..]).map_err(|_| corrupt("refs", "content type not UTF-8"))?;
    Ok(AssetRef {
        size,
        content_type: Arc::from(ct),
    })
}

impl Store for SledStore {
    fn resolve(&self, blog: &BlogId, paths: &[&str]) -> Option<Vec<Resolution>> {
        let index = self.index.read();
        let state = index.blogs.get(blog.as_str())?;
        let out = paths
            .iter()
            .map(|p| match state.paths.get(*p) {
                Some(PathEntry {
                    binding: Some((hash, name)),
                    ..
                }) => Resolution::Permanent {
                    hash: *hash,
                    filename: name.clone(),
                },
                Some(e) => Resolution::Versioned(e.version.max(state.floor)),
                None => Resolution::Versioned(state.floor),
            })
            .collect();
        Some(out)
    }

    fn path_version(&self, blog: &str, path: &str) -> Option<CacheId> {
        let index = self.index.read();
        let state = index.blogs.get(blog)?;
        Some(
            state
                .paths
                .get(path)
                .map_or(state.floor, |e| e.version.max(state.floor)),
        )
    }

    fn asset_ref(&self, blog: &str, hash: &ContentHash) -> Option<AssetRef> {
        self.index.read().blogs.get(blog)?.refs.get(hash).cloned()
    }

    fn blog(&self, blog: &BlogId) -> Option<BlogInfo> {
        let index = self.index.read();
        let s = index.blogs.get(blog.as_str())?;
        Some(BlogInfo {
            blog_id: blog.clone(),
            floor: s.floor,
            domains: s.domains.iter().map(|d| d.to_string()).collect(),
            path_count: s.paths.len() as u64,
            asset_count: s.refs.len() as u64,
        })
    }

    fn lookup_domain(&self, domain: &str) -> Option<BlogId> {
        self.index.read().domains.get(domain).cloned()
    }

    fn referenced_hashes(&self) -> Vec<ContentHash> {
        self.index.read().blob_refs.keys().copied().collect()
    }

    fn is_referenced(&self, hash: &ContentHash) -> bool {
        self.index
            .read()
            .blob_refs
            .get(hash)
            .is_some_and(|n| *n > 0)
    }

    fn invalidate(&self, blog: &BlogId, paths: &[BlogPath]) -> Result<CacheId, StoreError> {
        let (id, wb) = {
            let mut w = self.writer.lock();
            let (id, wb) = self.assign(&mut w, blog, paths.is_empty())?;
            if !paths.is_empty() {
                let mut batch = sled::Batch::default();
                for p in paths {
                    batch.insert(key(blog.as_str(), p.as_str().as_bytes()), &id.to_be_bytes());
                }
                self.paths.apply_batch(batch)?;
            }
            (id, wb)
        };
        self.commit.wait()?;
        self.apply(blog, wb.generation, |index| {
            let state = Self::ensure_blog(index, blog, wb.floor);
            for p in paths {
                let e = state.paths.entry(p.as_str().into()).or_insert(PathEntry {
                    version: 0,
                    binding: None,
                });
                if id > e.version {
                    *e = PathEntry {
                        version: id,
                        binding: None,
                    };
                }
            }
        });
        Ok(id)
    }

    fn bind_asset(
        &self,
        blog: &BlogId,
        path: Option<&BlogPath>,
        b: &Binding,
    ) -> Result<(), StoreError> {
        let (id, wb) = {
            let mut w = self.writer.lock();
            let (id, wb) = self.assign(&mut w, blog, false)?;
            let mut rv = Vec::with_capacity(8 + b.content_type.len());
            rv.extend_from_slice(&b.size.to_be_bytes());
            rv.extend_from_slice(b.content_type.as_bytes());
            self.refs.insert(key(blog.as_str(), &b.hash.0), rv)?;
            if let Some(p) = path {
                let mut pv = Vec::with_capacity(24 + b.filename.len());
                pv.extend_from_slice(&id.to_be_bytes());
                pv.extend_from_slice(&b.hash.0);
                pv.extend_from_slice(b.filename.as_bytes());
                self.paths
                    .insert(key(blog.as_str(), p.as_str().as_bytes()), pv)?;
            }
            // Count the reference now, not after the flush: a blob about to be
            // referenced must never look like garbage.
            let mut index = self.index.write();
            let state = Self::ensure_blog(&mut index, blog, wb.floor);
            let new_ref = state
                .refs
                .insert(
                    b.hash,
                    AssetRef {
                        size: b.size,
                        content_type: b.content_type.clone(),
                    },
                )
                .is_none();
            if new_ref {
                *index.blob_refs.entry(b.hash).or_default() += 1;
            }
            (id, wb)
        };
        self.commit.wait()?;
        if let Some(p) = path {
            self.apply(blog, wb.generation, |index| {
                let state = Self::ensure_blog(index, blog, wb.floor);
                let e = state.paths.entry(p.as_str().into()).or_insert(PathEntry {
                    version: 0,
                    binding: None,
                });
                if id > e.version {
                    *e = PathEntry {
                        version: id,
                        binding: Some((b.hash, b.filename.clone())),
                    };
                }
            });
        }
        Ok(())
    }

    fn set_domain(&self, domain: &Domain, blog: &BlogId) -> Result<(), StoreError> {
        {
            let mut w = self.writer.lock();
            if !w.blogs.contains_key(blog.as_str()) {
                let (_, wb) = self.assign(&mut w, blog, true)?;
                Self::ensure_blog(&mut self.index.write(), blog, wb.floor);
            }
            self.domains
                .insert(domain.as_str().as_bytes(), blog.as_str().as_bytes())?;
        }
        self.commit.wait()?;
        self.sync_domain(domain)
    }

    fn remove_domain(&self, domain: &Domain) -> Result<bool, StoreError> {
        let existed = {
            let _w = self.writer.lock();
            self.domains.remove(domain.as_str().as_bytes())?.is_some()
        };
        self.commit.wait()?;
        self.sync_domain(domain)?;
        Ok(existed)
    }

    fn delete_blog(&self, blog: &BlogId) -> Result<Option<Vec<ContentHash>>, StoreError> {
        // Rare and heavy: hold the write mutex through the flush so that no
        // write to this blog can interleave.
        let mut w = self.writer.lock();
        if !w.blogs.contains_key(blog.as_str()) {
            return Ok(None);
        }
        let prefix = key(blog.as_str(), b"");
        let mut hashes = Vec::new();
        // Garbage candidates first: if a crash cuts the deletion short, the
        // candidates are already known and a later run finishes the job.
        for kv in self.refs.scan_prefix(&prefix) {
            let (k, _) = kv?;
            hashes.push(hash_at("refs", &k, prefix.len())?);
        }
        let mut gc = sled::Batch::default();
        for h in &hashes {
            gc.insert(&h.0, &[]);
        }
        self.gc.apply_batch(gc)?;
        for tree in [&self.paths, &self.refs] {
            let mut batch = sled::Batch::default();
            for kv in tree.scan_prefix(&prefix) {
                batch.remove(kv?.0);
            }
            tree.apply_batch(batch)?;
        }
        let domains: Vec<Box<str>> = self
            .index
            .read()
            .blogs
            .get(blog.as_str())
            .map(|s| s.domains.iter().cloned().collect())
            .unwrap_or_default();
        for d in &domains {
            self.domains.remove(d.as_bytes())?;
        }
        self.blogs.remove(blog.as_str().as_bytes())?;
        self.commit.wait()?;
        w.blogs.remove(blog.as_str());
        let mut index = self.index.write();
        if let Some(state) = index.blogs.remove(blog.as_str()) {
            for h in state.refs.keys() {
                if let Some(n) = index.blob_refs.get_mut(h) {
                    *n -= 1;
                    if *n == 0 {
                        index.blob_refs.remove(h);
                    }
                }
            }
        }
        for d in &domains {
            index.domains.remove(d);
        }
        Ok(Some(hashes))
    }

    fn gc_candidates(&self) -> Result<Vec<ContentHash>, StoreError> {
        self.gc.iter().map(|kv| hash_at("gc", &kv?.0, 0)).collect()
    }

    fn gc_done(&self, hash: &ContentHash) -> Result<(), StoreError> {
        self.gc.remove(hash.0)?;
        self.commit.wait()
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.commit.wait()
    }
}

impl SledStore {
    /// Mirrors a domain's current sled value into the index. Reading the
    /// truth back (rather than replaying the change) makes concurrent set and
    /// remove calls converge whatever order they finish in.
    fn sync_domain(&self, domain: &Domain) -> Result<(), StoreError> {
        let _w = self.writer.lock();
        let now = self.domains.get(domain.as_str().as_bytes())?;
        let mut index = self.index.write();
        if let Some(old) = index.domains.remove(domain.as_str()) {
            if let Some(s) = index.blogs.get_mut(old.as_str()) {
                s.domains.remove(domain.as_str());
            }
        }
        if let Some(v) = now {
            let blog =
                std::str::from_utf8(&v).map_err(|_| corrupt("domains", "blog id not UTF-8"))?;
            let blog = BlogId::parse(blog).map_err(|e| corrupt("domains", &e.to_string()))?;
            if let Some(s) = index.blogs.get_mut(blog.as_str()) {
                s.domains.insert(domain.as_str().into());
            }
            index.domains.insert(domain.as_str().into(), blog);
        }
        Ok(())
    }
}

impl Drop for SledStore {
    fn drop(&mut self) {
        self.commit.close();
        if let Some(h) = self.flusher.lock().take() {
            let _ = h.join();
        }
        let _ = self.db.flush();
    }
}

/// Group commit: writers bump `requested` and wait; one thread flushes
/// everything written so far and marks every request up to that point done.
#[derive(Default)]
struct GroupCommit {
    state: Mutex<CommitState>,
    wake_flusher: Condvar,
    done: Condvar,
}

#[derive(Default)]
struct CommitState {
    requested: u64,
    completed: u64,
    /// A failed flush leaves the store refusing writes: an fsync error means
    /// the disk can no longer be trusted with acknowledged data.
    failed: Option<String>,
    closed: bool,
}

impl GroupCommit {
    fn wait(&self) -> Result<(), StoreError> {
        let mut s = self.state.lock();
        if s.closed {
            return Err(StoreError::Closed);
        }
        s.requested += 1;
        let ticket = s.requested;
        self.wake_flusher.notify_one();
        while s.completed < ticket && s.failed.is_none() {
            self.done.wait(&mut s);
        }
        match &s.failed {
            Some(e) => Err(StoreError::Io(std::io::Error::other(e.clone()))),
            None => Ok(()),
        }
    }

    fn run(&self, db: &sled::Db) {
        let mut s = self.state.lock();
        loop {
            while s.completed == s.requested && !s.closed {
                self.wake_flusher.wait(&mut s);
            }
            if s.completed == s.requested && s.closed {
                return;
            }
            let target = s.requested;
            drop(s);
            let result = db.flush();
            s = self.state.lock();
            match result {
                Ok(_) => s.completed = target,
                Err(e) => {
                    tracing::error!(error = %e, "flush failed; refusing further writes");
                    s.failed = Some(e.to_string());
                }
            }
            self.done.notify_all();
        }
    }

    fn close(&self) {
        let mut s = self.state.lock();
        s.closed = true;
        self.wake_flusher.notify_one();
    }
}
