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
//! - `meta`:    `wal_seq` → the last write-ahead log record sled holds
//!
//! All writes go through one writer thread. It takes every write waiting in
//! its queue, resolves each (assigning cache ids), applies it to sled in
//! memory and appends it to the write-ahead log ([`super::wal`]); one
//! `fdatasync` of the log makes the whole group durable (group commit); then
//! it updates the index and answers each caller. sled itself is flushed only
//! at checkpoints. One thread means cache ids are assigned in order without
//! a lock, sled is never called from an async worker, and a reader never
//! sees a write before it is durable.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock};
use tokio::sync::oneshot;

use super::wal::{Rec, Wal};
use super::{AssetRef, Binding, BlogInfo, Pending, Resolution, Store, StoreError};
use crate::domain::{next_cache_id, BlogId, BlogPath, CacheId, ContentHash, Domain};

type FastMap<K, V> = HashMap<K, V, ahash::RandomState>;

/// sled's page cache.
const SLED_CACHE_BYTES: u64 = 64 << 20;

/// Most writes taken into one flush.
const MAX_GROUP: usize = 4096;

#[derive(Debug, Clone)]
struct PathEntry {
    version: CacheId,
    /// Boxed: most paths have none, and a million entries stay 16 bytes each.
    binding: Option<Box<(ContentHash, Arc<str>)>>,
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

impl Index {
    fn blog_mut(&mut self, blog: &BlogId, floor: CacheId) -> &mut BlogState {
        let state = self.blogs.entry(blog.as_str().into()).or_default();
        state.floor = state.floor.max(floor);
        state
    }
}

struct Shared {
    /// Set when the writer refuses writes from then on.
    failed: Mutex<Option<String>>,
    index: RwLock<Index>,
    /// References handed to the writer but not yet in the index.
    pending_refs: Mutex<FastMap<ContentHash, u32>>,
}

enum Op {
    Invalidate { blog: BlogId, paths: Vec<BlogPath>, tx: oneshot::Sender<Result<CacheId, StoreError>> },
    Bind { blog: BlogId, path: Option<BlogPath>, binding: Binding, tx: oneshot::Sender<Result<(), StoreError>> },
    SetDomain { domain: Domain, blog: BlogId, tx: oneshot::Sender<Result<(), StoreError>> },
    RemoveDomain { domain: Domain, tx: oneshot::Sender<Result<bool, StoreError>> },
    DeleteBlog { blog: BlogId, tx: oneshot::Sender<Result<Option<Vec<ContentHash>>, StoreError>> },
    GcDone { hash: ContentHash, tx: oneshot::Sender<Result<(), StoreError>> },
    Flush { tx: oneshot::Sender<Result<(), StoreError>> },
}

/// What a write does to the index once flushed, and whom to answer.
enum Effect {
    Invalidated {
        blog: BlogId,
        floor: CacheId,
        id: CacheId,
        paths: Vec<BlogPath>,
        tx: oneshot::Sender<Result<CacheId, StoreError>>,
    },
    Bound {
        blog: BlogId,
        floor: CacheId,
        id: CacheId,
        path: Option<BlogPath>,
        binding: Binding,
        tx: oneshot::Sender<Result<(), StoreError>>,
    },
    DomainSet {
        domain: Domain,
        blog: BlogId,
        floor: CacheId,
        tx: oneshot::Sender<Result<(), StoreError>>,
    },
    DomainRemoved {
        domain: Domain,
        existed: bool,
        tx: oneshot::Sender<Result<bool, StoreError>>,
    },
    Deleted {
        blog: BlogId,
        hashes: Option<Vec<ContentHash>>,
        tx: oneshot::Sender<Result<Option<Vec<ContentHash>>, StoreError>>,
    },
    Done {
        tx: oneshot::Sender<Result<(), StoreError>>,
    },
}

struct Trees {
    db: sled::Db,
    blogs: sled::Tree,
    paths: sled::Tree,
    refs: sled::Tree,
    domains: sled::Tree,
    gc: sled::Tree,
    /// `wal_seq`: the last log record sled holds durably.
    meta: sled::Tree,
}

/// Per blog, as written to sled: the floor and the last assigned cache id.
#[derive(Debug, Clone, Copy)]
struct Ids {
    floor: CacheId,
    last: CacheId,
}

pub struct SledStore {
    shared: Arc<Shared>,
    trees: Arc<Trees>,
    queue: Mutex<Option<std::sync::mpsc::Sender<Op>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn key(blog: &str, rest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(blog.len() + 1 + rest.len());
    k.extend_from_slice(blog.as_bytes());
    k.push(0);
    k.extend_from_slice(rest);
    k
}

fn split_key<'a>(tree: &'static str, k: &'a [u8]) -> Result<(&'a str, &'a [u8]), StoreError> {
    let pos = k.iter().position(|&b| b == 0).ok_or_else(|| corrupt(tree, "key without separator"))?;
    let blog = std::str::from_utf8(&k[..pos]).map_err(|_| corrupt(tree, "blog id not UTF-8"))?;
    Ok((blog, &k[pos + 1..]))
}

fn corrupt(tree: &'static str, what: &str) -> StoreError {
    StoreError::Corrupt { tree, what: what.to_owned() }
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
    /// Opens (or creates) the store in `dir`, loads the index, starts the writer.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        // Reads are served by the index, so sled's own cache only has to hold
        // what writes touch: a small one keeps memory and start-up down.
        let started = Instant::now();
        // No background flushes: durability comes from the log, and sled is
        // flushed at checkpoints; its own flusher would only compete for the disk.
        let db = sled::Config::new().path(dir).cache_capacity(SLED_CACHE_BYTES).flush_every_ms(None).open()?;
        let sled_ms = started.elapsed().as_millis() as u64;
        let trees = Arc::new(Trees {
            blogs: db.open_tree("blogs")?,
            paths: db.open_tree("paths")?,
            refs: db.open_tree("refs")?,
            domains: db.open_tree("domains")?,
            gc: db.open_tree("gc")?,
            meta: db.open_tree("meta")?,
            db,
        });
        // Replay what the log holds past sled's last checkpoint, then
        // checkpoint, so the log starts empty.
        let (mut wal, records) = Wal::open(&dir.with_extension("wal"))?;
        let done = trees.meta.get(CHECKPOINT_KEY)?.map(|v| u64_at("meta", &v, 0)).transpose()?.unwrap_or(0);
        let mut last = done;
        let mut replayed = 0;
        for (seq, rec) in &records {
            if *seq > done {
                apply(&trees, rec)?;
                replayed += 1;
            }
            last = last.max(*seq);
        }
        checkpoint(&trees, &mut wal, last)?;
        if replayed > 0 {
            tracing::info!(replayed, "replayed writes from the write-ahead log");
        }
        let replay_ms = started.elapsed().as_millis() as u64 - sled_ms;
        let (index, ids) = load(&trees)?;
        let paths: usize = index.blogs.values().map(|b| b.paths.len()).sum();
        tracing::info!(
            blogs = index.blogs.len(),
            paths,
            sled_ms,
            replay_ms,
            total_ms = started.elapsed().as_millis() as u64,
            "store open"
        );
        let shared =
            Arc::new(Shared { failed: Mutex::default(), index: RwLock::new(index), pending_refs: Mutex::default() });
        let (tx, rx) = std::sync::mpsc::channel();
        let mut writer = Writer {
            trees: trees.clone(),
            shared: shared.clone(),
            ids,
            wal,
            seq: last + 1,
            last_checkpoint: Instant::now(),
        };
        let handle = std::thread::Builder::new().name("blotcdn-writer".into()).spawn(move || writer.run(rx))?;
        Ok(SledStore { shared, trees, queue: Mutex::new(Some(tx)), writer: Mutex::new(Some(handle)) })
    }

    fn submit<T>(&self, make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Op) -> Pending<T> {
        let (tx, rx) = oneshot::channel();
        if let Some(q) = self.queue.lock().as_ref() {
            // A closed queue drops the op, and with it the sender: the caller
            // gets `Closed`.
            let _ = q.send(make(tx));
        }
        Pending(rx)
    }
}

type PathsByBlog = Vec<(Box<str>, FastMap<Box<str>, PathEntry>)>;

/// Reads the paths in `[from, to)`, grouped by blog (keys sort by blog).
/// Each blog's entries are gathered first so its map is built at its final
/// size: no rehashing, no outgrown tables left behind.
fn read_paths(tree: &sled::Tree, from: Option<Vec<u8>>, to: Option<Vec<u8>>) -> Result<PathsByBlog, StoreError> {
    use std::ops::Bound;
    type Entries = (Box<str>, Vec<(Box<str>, PathEntry)>);
    let lo = from.map_or(Bound::Unbounded, Bound::Included);
    let hi = to.map_or(Bound::Unbounded, Bound::Excluded);
    let mut out: PathsByBlog = Vec::new();
    let finish = |out: &mut PathsByBlog, (blog, entries): Entries| {
        let mut map = FastMap::with_capacity_and_hasher(entries.len(), Default::default());
        map.extend(entries);
        out.push((blog, map));
    };
    let mut current: Option<Entries> = None;
    for kv in tree.range::<Vec<u8>, _>((lo, hi)) {
        let (k, v) = kv?;
        let (blog, path) = split_key("paths", &k)?;
        let path = std::str::from_utf8(path).map_err(|_| corrupt("paths", "path not UTF-8"))?;
        let entry = decode_path_entry(&v)?;
        if current.as_ref().is_none_or(|(b, _)| &**b != blog) {
            if let Some(done) = current.take() {
                finish(&mut out, done);
            }
            current = Some((blog.into(), Vec::new()));
        }
        current.as_mut().expect("set").1.push((path.into(), entry));
    }
    if let Some(done) = current.take() {
        finish(&mut out, done);
    }
    Ok(out)
}

/// Reads every tree into the index. The `paths` tree (by far the largest)
/// is read in two halves on two threads while this one reads the rest:
/// start-up time is what a restart costs the renderers.
fn load(t: &Trees) -> Result<(Index, FastMap<Box<str>, Ids>), StoreError> {
    let mut index = Index::default();
    let mut ids = FastMap::default();
    let mut names = Vec::new();
    for kv in t.blogs.iter() {
        let (k, v) = kv?;
        let blog = std::str::from_utf8(&k).map_err(|_| corrupt("blogs", "blog id not UTF-8"))?;
        let (floor, last) = (u64_at("blogs", &v, 0)?, u64_at("blogs", &v, 8)?);
        index.blogs.insert(blog.into(), BlogState { floor, ..Default::default() });
        ids.insert(blog.into(), Ids { floor, last });
        names.push(blog.to_owned());
    }
    // Split the paths at the middle blog (blogs come sorted from sled).
    let mid = names.get(names.len() / 2).map(|b| key(b, b"")).unwrap_or_default();
    let readers = [(None, Some(mid.clone())), (Some(mid), None)].map(|(from, to)| {
        let tree = t.paths.clone();
        std::thread::spawn(move || read_paths(&tree, from, to))
    });
    for kv in t.refs.iter() {
        let (k, v) = kv?;
        let (blog, hash) = split_key("refs", &k)?;
        let hash = hash_at("refs", hash, 0)?;
        let aref = decode_ref(&v)?;
        let state = index.blogs.get_mut(blog).ok_or_else(|| corrupt("refs", "reference of an unknown blog"))?;
        if state.refs.insert(hash, aref).is_none() {
            *index.blob_refs.entry(hash).or_default() += 1;
        }
    }
    for kv in t.domains.iter() {
        let (k, v) = kv?;
        let domain = std::str::from_utf8(&k).map_err(|_| corrupt("domains", "domain not UTF-8"))?;
        let blog = std::str::from_utf8(&v).map_err(|_| corrupt("domains", "blog id not UTF-8"))?;
        let blog_id = BlogId::parse(blog).map_err(|e| corrupt("domains", &e.to_string()))?;
        if let Some(state) = index.blogs.get_mut(blog) {
            state.domains.insert(domain.into());
        }
        index.domains.insert(domain.into(), blog_id);
    }
    for r in readers {
        let by_blog = r.join().map_err(|_| corrupt("paths", "reader thread panicked"))??;
        for (blog, paths) in by_blog {
            let state = index.blogs.get_mut(&blog).ok_or_else(|| corrupt("paths", "path of an unknown blog"))?;
            if state.paths.is_empty() {
                state.paths = paths;
            } else {
                state.paths.extend(paths);
            }
        }
    }
    Ok((index, ids))
}

struct Writer {
    trees: Arc<Trees>,
    shared: Arc<Shared>,
    ids: FastMap<Box<str>, Ids>,
    wal: Wal,
    /// Sequence number of the next log record.
    seq: u64,
    last_checkpoint: Instant,
}

/// Write the log into sled and empty it past this size, or this long after
/// the last checkpoint.
const CHECKPOINT_BYTES: u64 = 64 << 20;
const CHECKPOINT_EVERY: Duration = Duration::from_secs(10);

impl Writer {
    fn run(&mut self, rx: std::sync::mpsc::Receiver<Op>) {
        loop {
            let first = match rx.recv_timeout(CHECKPOINT_EVERY) {
                Ok(op) => op,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    self.maybe_checkpoint(true);
                    continue;
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            };
            let mut effects = Vec::new();
            let mut op = Some(first);
            while let Some(o) = op.take() {
                if let Some(e) = self.take(o) {
                    effects.push(e);
                }
                if effects.len() < MAX_GROUP {
                    op = rx.try_recv().ok();
                }
            }
            let synced = match self.failed() {
                Some(e) => Err(e),
                None => self.wal.sync().map_err(|e| self.fail(&e)),
            };
            self.publish(effects, synced);
            self.maybe_checkpoint(false);
        }
        self.maybe_checkpoint(true);
    }

    fn fail(&mut self, e: &dyn std::fmt::Display) -> String {
        tracing::error!(error = %e, "write-ahead log sync failed; refusing further writes");
        let msg = format!("the store refuses writes after a failed sync: {e}");
        *self.shared.failed.lock() = Some(msg.clone());
        msg
    }

    /// Writes sled to disk, records the last log record it holds, and
    /// empties the log.
    fn maybe_checkpoint(&mut self, idle: bool) {
        let due = self.wal.bytes() > CHECKPOINT_BYTES
            || (self.wal.bytes() > 0 && (idle || self.last_checkpoint.elapsed() > CHECKPOINT_EVERY));
        if !due || self.failed().is_some() {
            return;
        }
        let r = checkpoint(&self.trees, &mut self.wal, self.seq - 1);
        self.last_checkpoint = Instant::now();
        if let Err(e) = r {
            self.fail(&e);
        }
    }

    /// Assigns the next cache id of a blog: (id, floor). A new blog's floor
    /// is its first id.
    fn assign(&mut self, blog: &BlogId, raise_floor: bool) -> (CacheId, CacheId) {
        let prev = self.ids.get(blog.as_str()).copied();
        let id = next_cache_id(now_ms(), prev.map_or(0, |p| p.last));
        let floor = match prev {
            Some(p) if !raise_floor => p.floor,
            _ => id,
        };
        self.ids.insert(blog.as_str().into(), Ids { floor, last: id });
        (id, floor)
    }

    /// Resolves one write into a log record, applies it to sled (in memory)
    /// and queues it for the group's sync. Errors are answered at once.
    fn take(&mut self, op: Op) -> Option<Effect> {
        if let Some(e) = self.failed() {
            let e = StoreError::Io(std::io::Error::other(e));
            match op {
                Op::Invalidate { tx, .. } => drop(tx.send(Err(e))),
                Op::Bind { tx, binding, .. } => {
                    self.unpin(&binding.hash);
                    drop(tx.send(Err(e)))
                }
                Op::SetDomain { tx, .. } | Op::GcDone { tx, .. } | Op::Flush { tx } => drop(tx.send(Err(e))),
                Op::RemoveDomain { tx, .. } => drop(tx.send(Err(e))),
                Op::DeleteBlog { tx, .. } => drop(tx.send(Err(e))),
            }
            return None;
        }
        let (rec, effect) = match op {
            Op::Invalidate { blog, paths, tx } => {
                let (id, floor) = self.assign(&blog, paths.is_empty());
                let rec = Rec::Invalidate {
                    blog: blog.to_string(),
                    id,
                    floor,
                    paths: paths.iter().map(|p| p.as_str().to_owned()).collect(),
                };
                (rec, Effect::Invalidated { blog, floor, id, paths, tx })
            }
            Op::Bind { blog, path, binding, tx } => {
                let (id, floor) = self.assign(&blog, false);
                let rec = Rec::Bind {
                    blog: blog.to_string(),
                    id,
                    floor,
                    path: path.as_ref().map(|p| p.as_str().to_owned()),
                    hash: binding.hash.0,
                    size: binding.size,
                    content_type: binding.content_type.to_string(),
                    filename: binding.filename.to_string(),
                };
                (rec, Effect::Bound { blog, floor, id, path, binding, tx })
            }
            Op::SetDomain { domain, blog, tx } => {
                let (create, floor) = match self.ids.get(blog.as_str()) {
                    Some(ids) => (None, ids.floor),
                    None => {
                        let (id, floor) = self.assign(&blog, true);
                        (Some(id), floor)
                    }
                };
                let rec = Rec::SetDomain { domain: domain.to_string(), blog: blog.to_string(), create };
                (rec, Effect::DomainSet { domain, blog, floor, tx })
            }
            Op::RemoveDomain { domain, tx } => match self.trees.domains.contains_key(domain.as_str().as_bytes()) {
                Ok(existed) => {
                    (Rec::RemoveDomain { domain: domain.to_string() }, Effect::DomainRemoved { domain, existed, tx })
                }
                Err(e) => {
                    let _ = tx.send(Err(e.into()));
                    return None;
                }
            },
            Op::DeleteBlog { blog, tx } => {
                if !self.ids.contains_key(blog.as_str()) {
                    let _ = tx.send(Ok(None));
                    return None;
                }
                match self.deletion(&blog) {
                    Ok(rec) => {
                        self.ids.remove(blog.as_str());
                        let hashes = match &rec {
                            Rec::Delete { hashes, .. } => hashes.iter().map(|h| ContentHash(*h)).collect(),
                            _ => Vec::new(),
                        };
                        (rec, Effect::Deleted { blog, hashes: Some(hashes), tx })
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return None;
                    }
                }
            }
            Op::GcDone { hash, tx } => (Rec::GcDone { hash: hash.0 }, Effect::Done { tx }),
            Op::Flush { tx } => return Some(Effect::Done { tx }),
        };
        if let Err(e) = apply(&self.trees, &rec) {
            // Not logged, not answered as done: the caller hears why.
            self.refuse(effect, e.into());
            return None;
        }
        self.wal.push(self.seq, &rec);
        self.seq += 1;
        Some(effect)
    }

    /// Everything a deletion removes, read from sled as it stands (earlier
    /// writes of the same group included).
    fn deletion(&self, blog: &BlogId) -> Result<Rec, StoreError> {
        let prefix = key(blog.as_str(), b"");
        let mut hashes = Vec::new();
        for kv in self.trees.refs.scan_prefix(&prefix) {
            hashes.push(hash_at("refs", &kv?.0, prefix.len())?.0);
        }
        let mut domains = Vec::new();
        for kv in self.trees.domains.iter() {
            let (k, v) = kv?;
            if v.as_ref() == blog.as_str().as_bytes() {
                domains.push(String::from_utf8_lossy(&k).into_owned());
            }
        }
        Ok(Rec::Delete { blog: blog.to_string(), hashes, domains })
    }

    /// Why the store refuses writes, if it does.
    fn failed(&self) -> Option<String> {
        self.shared.failed.lock().clone()
    }

    /// Answers a write that will not happen with its error (and lets go of
    /// the blob a refused binding had pinned).
    fn refuse(&self, effect: Effect, e: StoreError) {
        match effect {
            Effect::Invalidated { tx, .. } => drop(tx.send(Err(e))),
            Effect::Bound { tx, binding, .. } => {
                self.unpin(&binding.hash);
                drop(tx.send(Err(e)))
            }
            Effect::DomainSet { tx, .. } | Effect::Done { tx } => drop(tx.send(Err(e))),
            Effect::DomainRemoved { tx, .. } => drop(tx.send(Err(e))),
            Effect::Deleted { tx, .. } => drop(tx.send(Err(e))),
        }
    }

    fn unpin(&self, hash: &ContentHash) {
        let mut p = self.shared.pending_refs.lock();
        if let Some(n) = p.get_mut(hash) {
            *n -= 1;
            if *n == 0 {
                p.remove(hash);
            }
        }
    }

    /// After the flush: the index learns the writes, then callers hear back.
    fn publish(&self, effects: Vec<Effect>, flushed: Result<(), String>) {
        if let Err(e) = &flushed {
            for eff in effects {
                self.refuse(eff, StoreError::Io(std::io::Error::other(e.clone())));
            }
            return;
        }
        let mut replies: Vec<Box<dyn FnOnce() + Send>> = Vec::with_capacity(effects.len());
        {
            let mut index = self.shared.index.write();
            for eff in effects {
                match eff {
                    Effect::Invalidated { blog, floor, id, paths, tx } => {
                        let state = index.blog_mut(&blog, floor);
                        for p in &paths {
                            state.paths.insert(p.as_str().into(), PathEntry { version: id, binding: None });
                        }
                        replies.push(Box::new(move || drop(tx.send(Ok(id)))));
                    }
                    Effect::Bound { blog, floor, id, path, binding, tx } => {
                        let state = index.blog_mut(&blog, floor);
                        let aref = AssetRef { size: binding.size, content_type: binding.content_type.clone() };
                        let new_ref = state.refs.insert(binding.hash, aref).is_none();
                        if let Some(p) = &path {
                            let entry = PathEntry {
                                version: id,
                                binding: Some(Box::new((binding.hash, binding.filename.clone()))),
                            };
                            state.paths.insert(p.as_str().into(), entry);
                        }
                        if new_ref {
                            *index.blob_refs.entry(binding.hash).or_default() += 1;
                        }
                        self.unpin(&binding.hash);
                        replies.push(Box::new(move || drop(tx.send(Ok(())))));
                    }
                    Effect::DomainSet { domain, blog, floor, tx } => {
                        if let Some(old) = index.domains.remove(domain.as_str()) {
                            if let Some(s) = index.blogs.get_mut(old.as_str()) {
                                s.domains.remove(domain.as_str());
                            }
                        }
                        index.blog_mut(&blog, floor).domains.insert(domain.as_str().into());
                        index.domains.insert(domain.as_str().into(), blog);
                        replies.push(Box::new(move || drop(tx.send(Ok(())))));
                    }
                    Effect::DomainRemoved { domain, existed, tx } => {
                        if let Some(old) = index.domains.remove(domain.as_str()) {
                            if let Some(s) = index.blogs.get_mut(old.as_str()) {
                                s.domains.remove(domain.as_str());
                            }
                        }
                        replies.push(Box::new(move || drop(tx.send(Ok(existed)))));
                    }
                    Effect::Deleted { blog, hashes, tx } => {
                        if let Some(state) = index.blogs.remove(blog.as_str()) {
                            for h in state.refs.keys() {
                                if let Some(n) = index.blob_refs.get_mut(h) {
                                    *n -= 1;
                                    if *n == 0 {
                                        index.blob_refs.remove(h);
                                    }
                                }
                            }
                            for d in &state.domains {
                                index.domains.remove(d);
                            }
                        }
                        replies.push(Box::new(move || drop(tx.send(Ok(hashes)))));
                    }
                    Effect::Done { tx } => replies.push(Box::new(move || drop(tx.send(Ok(()))))),
                }
            }
        }
        for r in replies {
            r();
        }
    }
}

/// Applies a resolved write to sled's trees (in memory until a flush). The
/// same function serves live writes and log replay, so both agree.
fn apply(t: &Trees, rec: &Rec) -> Result<(), sled::Error> {
    match rec {
        Rec::Invalidate { blog, id, floor, paths } => {
            t.blogs.insert(blog.as_bytes(), &blog_value(*floor, *id))?;
            if !paths.is_empty() {
                let mut batch = sled::Batch::default();
                for p in paths {
                    batch.insert(key(blog, p.as_bytes()), &id.to_be_bytes());
                }
                t.paths.apply_batch(batch)?;
            }
        }
        Rec::Bind { blog, id, floor, path, hash, size, content_type, filename } => {
            t.blogs.insert(blog.as_bytes(), &blog_value(*floor, *id))?;
            let mut rv = Vec::with_capacity(8 + content_type.len());
            rv.extend_from_slice(&size.to_be_bytes());
            rv.extend_from_slice(content_type.as_bytes());
            t.refs.insert(key(blog, hash), rv)?;
            if let Some(p) = path {
                let mut pv = Vec::with_capacity(24 + filename.len());
                pv.extend_from_slice(&id.to_be_bytes());
                pv.extend_from_slice(hash);
                pv.extend_from_slice(filename.as_bytes());
                t.paths.insert(key(blog, p.as_bytes()), pv)?;
            }
        }
        Rec::SetDomain { domain, blog, create } => {
            if let Some(id) = create {
                t.blogs.insert(blog.as_bytes(), &blog_value(*id, *id))?;
            }
            t.domains.insert(domain.as_bytes(), blog.as_bytes())?;
        }
        Rec::RemoveDomain { domain } => {
            t.domains.remove(domain.as_bytes())?;
        }
        Rec::Delete { blog, hashes, domains } => {
            // Garbage candidates first: whatever a crash leaves, start-up
            // finds the candidates and finishes.
            let mut gc = sled::Batch::default();
            for h in hashes {
                gc.insert(h, &[]);
            }
            t.gc.apply_batch(gc)?;
            let prefix = key(blog, b"");
            for tree in [&t.paths, &t.refs] {
                let mut batch = sled::Batch::default();
                for kv in tree.scan_prefix(&prefix) {
                    batch.remove(kv?.0);
                }
                tree.apply_batch(batch)?;
            }
            for d in domains {
                // Only if it still points at this blog.
                if t.domains.get(d.as_bytes())?.is_some_and(|v| v.as_ref() == blog.as_bytes()) {
                    t.domains.remove(d.as_bytes())?;
                }
            }
            t.blogs.remove(blog.as_bytes())?;
        }
        Rec::GcDone { hash } => {
            t.gc.remove(hash)?;
        }
    }
    Ok(())
}

const CHECKPOINT_KEY: &[u8] = b"wal_seq";

/// sled holds every record up to `seq` once this returns; the log is empty.
fn checkpoint(t: &Trees, wal: &mut Wal, seq: u64) -> Result<(), StoreError> {
    t.meta.insert(CHECKPOINT_KEY, &seq.to_be_bytes())?;
    t.db.flush()?;
    wal.reset()?;
    Ok(())
}

fn decode_path_entry(v: &[u8]) -> Result<PathEntry, StoreError> {
    let version = u64_at("paths", v, 0)?;
    let binding = if v.len() > 8 {
        let hash = hash_at("paths", v, 8)?;
        let name = std::str::from_utf8(&v[24..]).map_err(|_| corrupt("paths", "filename not UTF-8"))?;
        Some(Box::new((hash, Arc::from(name))))
    } else {
        None
    };
    Ok(PathEntry { version, binding })
}

fn decode_ref(v: &[u8]) -> Result<AssetRef, StoreError> {
    let size = u64_at("refs", v, 0)?;
    let ct = std::str::from_utf8(&v[8..]).map_err(|_| corrupt("refs", "content type not UTF-8"))?;
    Ok(AssetRef { size, content_type: Arc::from(ct) })
}

impl Store for SledStore {
    fn resolve(&self, blog: &BlogId, paths: &[&str]) -> Option<Vec<Resolution>> {
        let index = self.shared.index.read();
        let state = index.blogs.get(blog.as_str())?;
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

    fn path_version(&self, blog: &str, path: &str) -> Option<CacheId> {
        let index = self.shared.index.read();
        let state = index.blogs.get(blog)?;
        Some(state.paths.get(path).map_or(state.floor, |e| e.version.max(state.floor)))
    }

    fn asset_ref(&self, blog: &str, hash: &ContentHash) -> Option<AssetRef> {
        self.shared.index.read().blogs.get(blog)?.refs.get(hash).cloned()
    }

    fn blog(&self, blog: &BlogId) -> Option<BlogInfo> {
        let index = self.shared.index.read();
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
        self.shared.index.read().domains.get(domain).cloned()
    }

    fn referenced_hashes(&self) -> Vec<ContentHash> {
        self.shared.index.read().blob_refs.keys().copied().collect()
    }

    fn is_referenced(&self, hash: &ContentHash) -> bool {
        self.shared.pending_refs.lock().contains_key(hash)
            || self.shared.index.read().blob_refs.get(hash).is_some_and(|n| *n > 0)
    }

    fn invalidate(&self, blog: BlogId, paths: Vec<BlogPath>) -> Pending<CacheId> {
        self.submit(|tx| Op::Invalidate { blog, paths, tx })
    }

    fn bind_asset(&self, blog: BlogId, path: Option<BlogPath>, binding: Binding) -> Pending<()> {
        // Pinned before it is queued: from here on the blob is not garbage.
        *self.shared.pending_refs.lock().entry(binding.hash).or_default() += 1;
        self.submit(|tx| Op::Bind { blog, path, binding, tx })
    }

    fn set_domain(&self, domain: Domain, blog: BlogId) -> Pending<()> {
        self.submit(|tx| Op::SetDomain { domain, blog, tx })
    }

    fn remove_domain(&self, domain: Domain) -> Pending<bool> {
        self.submit(|tx| Op::RemoveDomain { domain, tx })
    }

    fn delete_blog(&self, blog: BlogId) -> Pending<Option<Vec<ContentHash>>> {
        self.submit(|tx| Op::DeleteBlog { blog, tx })
    }

    fn gc_candidates(&self) -> Result<Vec<ContentHash>, StoreError> {
        self.trees.gc.iter().map(|kv| hash_at("gc", &kv?.0, 0)).collect()
    }

    fn gc_done(&self, hash: ContentHash) -> Pending<()> {
        self.submit(|tx| Op::GcDone { hash, tx })
    }

    fn flush(&self) -> Pending<()> {
        self.submit(|tx| Op::Flush { tx })
    }

    fn health(&self) -> Result<(), String> {
        if let Some(e) = self.shared.failed.lock().clone() {
            return Err(e);
        }
        match self.writer.lock().as_ref() {
            Some(h) if !h.is_finished() => Ok(()),
            _ => Err("the store's writer has stopped".into()),
        }
    }
}

impl Drop for SledStore {
    fn drop(&mut self) {
        // Closing the queue ends the writer after it has answered (and
        // flushed) everything handed over.
        self.queue.lock().take();
        if let Some(h) = self.writer.lock().take() {
            let _ = h.join();
        }
    }
}
