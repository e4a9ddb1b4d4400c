//! The embedded store: sled 0.34 on disk, one tree per keyspace, mirrored in
//! the in-memory index ([`super::index`]) that serves every read; writes go
//! through one writer thread ([`super::writer`]) and the write-ahead log
//! ([`super::wal`]). sled's trees, and how writes reach them, are
//! [`super::trees`].

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::{Mutex, RwLock};
use tokio::sync::oneshot;

use super::index::{FastMap, Index};
use super::trees::{apply, checkpoint, load, load_purges, read_marker, sled_seq, sweep, Raised, Trees};
use super::wal::{Rec, Wal};
use super::writer::{Op, Tuning, Writer};
use super::{AssetRef, Binding, BlogInfo, Pending, Resolution, Store, StoreError};
use crate::domain::{BlogId, BlogPath, CacheId, ContentHash, Domain};

/// Paths (and writes) waiting in the writer's queue at most; past it a write
/// is refused with RESOURCE_EXHAUSTED instead of queueing without bound.
const MAX_QUEUED: usize = 1_000_000;

/// What the writer and the readers share.
pub struct Shared {
    /// Set after a failed sync: writes are refused until a restart.
    pub failed: Mutex<Option<String>>,
    /// Set while the last append failed (disk full): cleared by the next
    /// group that becomes durable.
    pub degraded: Mutex<Option<String>>,
    pub index: RwLock<Index>,
    /// References handed to the writer but not yet in the index.
    pub pending_refs: Mutex<FastMap<ContentHash, u32>>,
    /// The weight of the writes in the queue (see [`Op::weight`]).
    pub queued: AtomicUsize,
    /// Cluster mode: blobs whose references this node saw go (a deletion
    /// applied from etcd), so its own copy may be garbage, even once the
    /// node that collected first dropped the cluster-wide candidate. Empty
    /// with sled.
    pub local_gc: Mutex<super::index::FastSet<ContentHash>>,
}

impl Shared {
    pub fn new(index: Index) -> Shared {
        Shared {
            failed: Mutex::default(),
            degraded: Mutex::default(),
            index: RwLock::new(index),
            pending_refs: Mutex::default(),
            queued: AtomicUsize::new(0),
            local_gc: Mutex::default(),
        }
    }

    pub fn unpin(&self, hash: &ContentHash) {
        let mut p = self.pending_refs.lock();
        if let Some(n) = p.get_mut(hash) {
            *n -= 1;
            if *n == 0 {
                p.remove(hash);
            }
        }
    }
}

/// The store every node runs: the in-memory index every read is served
/// from, and one writer thread behind a bounded queue. The writer is what
/// differs: sled's (its log, then checkpoints, this module) or etcd's
/// (transactions, with a watch that applies every node's writes, `etcd`).
pub struct IndexedStore {
    pub(super) shared: Arc<Shared>,
    pub(super) queue: Mutex<Option<std::sync::mpsc::Sender<Op>>>,
    pub(super) writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// The embedded default: the index backed by sled and its write-ahead log.
pub type SledStore = IndexedStore;

/// What the store needs to know of edge purges.
pub struct PurgeOptions {
    pub outbox: Arc<crate::purge::Outbox>,
    /// A floor raise purges the blog's key.
    pub on_publish: bool,
}

impl Default for PurgeOptions {
    fn default() -> Self {
        PurgeOptions { outbox: Arc::new(crate::purge::Outbox::none()), on_publish: false }
    }
}

impl IndexedStore {
    /// Opens (or creates) the store in `dir` with no purge targets.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        IndexedStore::open_with(dir, PurgeOptions::default())
    }

    /// Opens (or creates) the store in `dir`, loads the index and the purge
    /// outbox, starts the writer.
    pub fn open_with(dir: &Path, purge: PurgeOptions) -> Result<Self, StoreError> {
        IndexedStore::open_tuned(dir, purge, Tuning::default())
    }

    /// As `open_with`, with checkpoints and snapshots brought by `tuning`.
    pub(crate) fn open_tuned(dir: &Path, purge: PurgeOptions, tuning: Tuning) -> Result<Self, StoreError> {
        let started = Instant::now();
        // Held by the writer thread, which owns the log, until it ends.
        let lock = lock_store(dir)?;
        let trees = Trees::open(dir)?;
        let sled_ms = started.elapsed().as_millis() as u64;
        let wal_path = dir.with_extension("wal");
        // A log deleted or emptied by hand (taken for a text log, say) from a
        // store that has checkpointed: opening it would create an empty one
        // and serve without the writes acknowledged since the last checkpoint.
        // A log is never empty once created (it is kept preallocated).
        let marker = super::trees::marker_path(dir);
        if marker.exists() {
            let what = match std::fs::metadata(&wal_path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some("missing"),
                Ok(m) if m.len() == 0 => Some("empty"),
                _ => None,
            };
            if let Some(what) = what {
                let (wal, marker) = (wal_path.display().to_string(), marker.display().to_string());
                return Err(StoreError::LogMissing { wal, what, marker });
            }
        }
        let (mut wal, records) = Wal::open(&wal_path)
            .map_err(|e| StoreError::Open { path: wal_path.display().to_string(), source: e.into() })?;
        // The names of the database folder and of the log, new on a first start.
        if let Some(parent) = dir.parent() {
            crate::durable::sync_dir(parent)?;
        }
        let done = sled_seq(&trees)?;
        // sled reads a corrupt segment as the end of its log and opens an
        // older state without a word: the marker written after each
        // checkpoint tells.
        let recorded = read_marker(dir)?;
        if done < recorded {
            return Err(StoreError::Behind { path: dir.display().to_string(), holds: done, recorded });
        }
        let last = records.iter().map(|(seq, _)| *seq).fold(done, u64::max);
        // The snapshot and the records since it, when they reach `last`,
        // instead of sled's trees (sled stays the truth; see `snapshot`).
        let mut snap = super::snapshot::load(dir, &records, last);
        // With the index from the snapshot, the log's records need not go
        // into sled now: they stay in the log, the writer's next checkpoint
        // applies every record the log holds with the writes that follow,
        // and a start after a crash costs no more than reading them. This
        // holds only when the log is exactly the records after sled's
        // checkpoint, one by one: not after a crash between a checkpoint and
        // the emptying of the log, nor when a torn write left records from
        // before the last reset readable after the live ones (applied at the
        // checkpoint, those would undo newer writes in sled). And not past
        // twice a checkpoint's worth: writes go on while a checkpoint's
        // rounds run, so a crash in the middle of one under load leaves up
        // to that much, and a checkpoint begun there keeps the log within
        // the length past which writes are refused (four checkpoints'
        // worth). Such a log applied to sled before serving kept a start
        // of 4.5M paths down for 10 s, against 3 s.
        let follows = records.iter().zip(done + 1..).all(|((seq, _), want)| *seq == want);
        // Moving the log into sled takes room (sled writes about twice what
        // it takes in). After a crash on a full disk there may be less than
        // that even once space is freed: a start that ran out midway left
        // sled larger, and the freed space gone again. Then the records stay
        // in the log if they can (writes are refused as the disk is full
        // until a checkpoint gets in), or the start refuses before it writes.
        let log_bytes = wal.bytes();
        let short = super::writer::short_of_room(dir, log_bytes);
        let deferred = !records.is_empty()
            && follows
            && ((snap.is_some() && log_bytes <= 2 * tuning.checkpoint_bytes) || short.is_some());
        if let Some((room, needed)) = short.filter(|_| !deferred && records.iter().any(|(seq, _)| *seq > done)) {
            return Err(StoreError::Full(format!(
                "the disk of {} has {} MB free; moving the write-ahead log's {} MB into the database needs about \
                 {} MB: free space and start again (nothing was changed, no acknowledged write is lost)",
                dir.display(),
                room >> 20,
                log_bytes >> 20,
                needed >> 20
            )));
        }
        // What sled does not hold yet, for the purge outbox: none once the
        // log is replayed into it.
        let mut deferred_records = Vec::new();
        let (pending, replay_ms): (Vec<(u64, Rec)>, u64) = if deferred {
            // Records a crashed process wrote but did not sync may sit in
            // the page cache only: the index must not show them before
            // they are on disk.
            if let Err(super::wal::WalError::Append(e) | super::wal::WalError::Sync(e)) = wal.sync() {
                return Err(StoreError::Open { path: wal_path.display().to_string(), source: e.into() });
            }
            let purges = records.iter().filter(|(_, r)| matches!(r, Rec::Purge { .. } | Rec::PurgeSent { .. }));
            let purges = purges.cloned().collect();
            // Without a snapshot, the index is sled's with these applied.
            if snap.is_none() {
                deferred_records = records;
            }
            (purges, 0)
        } else {
            let replaying = Instant::now();
            let (mut replayed, mut raised) = (0, Raised::new());
            for (seq, rec) in &records {
                if *seq > done {
                    apply(&trees, *seq, rec, &mut raised)?;
                    replayed += 1;
                }
            }
            sweep(&trees, raised)?;
            if replayed > 0 {
                tracing::info!(replayed, "replayed writes from the write-ahead log");
            }
            let replay_ms = replaying.elapsed().as_millis() as u64;
            drop(records);
            if let Some((_, base)) = &mut snap {
                // The log is emptied just below: its records go to the tail.
                match wal.append_to(&super::snapshot::tail_path(dir)) {
                    Ok(n) => base.tail_len += n,
                    Err(e) => {
                        tracing::warn!(error = %e, "the snapshot's tail could not be written; a new snapshot comes next");
                        snap = None;
                    }
                }
            }
            checkpoint(&trees, dir, last)?;
            wal.reset()?;
            (Vec::new(), replay_ms)
        };
        let from = match (&snap, deferred) {
            (Some(_), true) => "snapshot and log",
            (Some(_), false) => "snapshot",
            (None, true) => "sled and log",
            (None, false) => "sled",
        };
        let (base, (index, ids, deleted_last)) = match snap {
            Some((loaded, base)) => (Some(base), loaded),
            None if deferred => {
                // sled's trees, and the log's records (which follow them
                // one by one) applied in memory.
                let (mut index, mut ids, mut deleted_last) = load(&trees)?;
                for (_, rec) in &deferred_records {
                    index.apply(rec);
                    super::writer::Ids::follow(&mut ids, &mut deleted_last, rec);
                }
                (None, (index, ids, deleted_last))
            }
            None => (None, load(&trees)?),
        };
        drop(deferred_records);
        let purge_sent = load_purges(&trees, &purge.outbox, last, &pending)?;
        drop(pending);
        drop(trees);
        super::give_back_memory();
        let paths: usize = index.blogs.values().map(|b| b.paths.len()).sum();
        tracing::info!(
            blogs = index.blogs.len(),
            paths,
            sled_ms,
            replay_ms,
            from,
            total_ms = started.elapsed().as_millis() as u64,
            "store open"
        );
        let shared = Arc::new(Shared::new(index));
        let mut writer = Writer {
            // Opened again at the next checkpoint (see `Writer::checkpoint`).
            trees: None,
            applying: None,
            db_path: PathBuf::from(dir),
            shared: shared.clone(),
            ids,
            deleted_last,
            wal,
            seq: last + 1,
            last_checkpoint: Instant::now(),
            checkpoint_failed: None,
            undo: Vec::new(),
            outbox: purge.outbox,
            purge_on_publish: purge.on_publish,
            purge_sent,
            group_purge_keys: 0,
            snapshot_failed: None,
            durable_seq: last + 1,
            snap: base,
            tuning,
        };
        // A start that read sled writes a snapshot now, before it serves.
        // Else only a checkpoint's end (or an idle moment) writes one, and
        // crashes under load that keep killing checkpoints before their end
        // kept every start on sled: 1.4 s growing to 4.5 s over 12 crashes,
        // as paths grew to 2.25M. It costs 0.66 s at 8.8M paths. So does one
        // whose replay made the snapshot's tail long (the replayed log is
        // appended to it), by the rule a checkpoint follows: else the tail
        // grew at each such start (to 293 MB beside a 20 MB snapshot), and
        // every start read it all. A write that fails, or is removed for the
        // room a checkpoint needs, is handled as a checkpoint's would be.
        if !deferred && base.is_none_or(|b| super::writer::tail_is_long(&b, &tuning)) {
            writer.write_snapshot(last);
        }
        Ok(IndexedStore::start(shared, move |rx| {
            let _lock = lock;
            writer.run(rx)
        })?)
    }

    /// The store over `shared`, its writes going to `run` on the writer thread.
    pub(super) fn start(
        shared: Arc<Shared>,
        run: impl FnOnce(std::sync::mpsc::Receiver<Op>) + Send + 'static,
    ) -> std::io::Result<IndexedStore> {
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = std::thread::Builder::new().name("blotcdn-writer".into()).spawn(move || run(rx))?;
        Ok(IndexedStore { shared, queue: Mutex::new(Some(tx)), writer: Mutex::new(Some(handle)) })
    }

    fn submit<T>(&self, make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Op) -> Pending<T> {
        let (tx, rx) = oneshot::channel();
        let op = make(tx);
        let w = op.weight();
        let queued = self.shared.queued.fetch_add(w, Ordering::Relaxed);
        if queued + w > MAX_QUEUED && queued > 0 {
            self.shared.queued.fetch_sub(w, Ordering::Relaxed);
            let msg = format!("the store's write queue is full ({queued} paths waiting); retry shortly");
            // The op's sender answers: it is refused, not lost.
            op.refuse(StoreError::Full(msg), &self.shared);
            return Pending(rx);
        }
        match self.queue.lock().as_ref() {
            Some(q) => {
                if let Err(std::sync::mpsc::SendError(op)) = q.send(op) {
                    self.shared.queued.fetch_sub(w, Ordering::Relaxed);
                    op.refuse(StoreError::Closed, &self.shared);
                }
            }
            None => {
                self.shared.queued.fetch_sub(w, Ordering::Relaxed);
                op.refuse(StoreError::Closed, &self.shared);
            }
        }
        Pending(rx)
    }
}

impl Store for IndexedStore {
    fn resolve(&self, blog: &BlogId, paths: &[&str]) -> Option<Vec<Resolution>> {
        self.shared.index.read().resolve(blog, paths)
    }

    fn path_version(&self, blog: &str, path: &str) -> Option<CacheId> {
        self.shared.index.read().path_version(blog, path)
    }

    fn asset_ref(&self, blog: &str, hash: &ContentHash) -> Option<AssetRef> {
        self.shared.index.read().blogs.get(blog)?.refs.get(hash).cloned()
    }

    fn blog(&self, blog: &BlogId) -> Option<BlogInfo> {
        self.shared.index.read().blog_info(blog)
    }

    fn index_paths(&self) -> u64 {
        self.shared.index.read().blogs.values().map(|b| b.paths.len() as u64).sum()
    }

    fn is_deleted(&self, blog: &str) -> bool {
        self.shared.index.read().deleted.contains(blog)
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

    fn delete_asset(&self, blog: BlogId, hash: ContentHash) -> Pending<bool> {
        self.submit(|tx| Op::DeleteAsset { blog, hash, tx })
    }

    fn purge(&self, keys: Vec<String>) -> Pending<()> {
        self.submit(|tx| Op::Purge { keys, tx })
    }

    fn purge_sent(&self, target: String, upto: u64) -> Pending<()> {
        self.submit(|tx| Op::PurgeSent { target, upto, tx })
    }

    fn gc_candidates(&self) -> Vec<ContentHash> {
        let mut all: super::index::FastSet<ContentHash> = self.shared.index.read().gc.iter().copied().collect();
        all.extend(self.shared.local_gc.lock().iter().copied());
        all.into_iter().collect()
    }

    fn gc_done(&self, hash: ContentHash, removed: bool) -> Pending<()> {
        self.submit(|tx| Op::GcDone { hash, removed, tx })
    }

    fn flush(&self) -> Pending<()> {
        self.submit(|tx| Op::Flush { tx })
    }

    fn close(&self) {
        // Closing the queue ends the writer after it has answered (and
        // flushed) everything handed over; its end drops sled.
        self.queue.lock().take();
        if let Some(h) = self.writer.lock().take() {
            let _ = h.join();
        }
    }

    fn health(&self) -> Result<(), String> {
        if let Some(e) = self.shared.failed.lock().clone() {
            return Err(e);
        }
        if let Some(e) = self.shared.degraded.lock().clone() {
            return Err(e);
        }
        match self.writer.lock().as_ref() {
            Some(h) if !h.is_finished() => Ok(()),
            _ => Err("the store's writer has stopped".into()),
        }
    }
}

/// Takes the store's lock: a `flock` on sled's folder itself (see
/// `dirlock`). One process at a time may hold the log and sled. The server
/// keeps sled closed between checkpoints, so sled's own lock does not say
/// it is running; a second server or `fsck` on a live data dir would replay
/// and reset the log under it, and the writes it acknowledged after would
/// be lost. On the folder, not a file beside it: a lock file can be deleted
/// (taken for a stale pid file) and a second data dir whose `db` links here
/// would have a lock file of its own.
fn lock_store(dir: &Path) -> Result<std::fs::File, StoreError> {
    std::fs::create_dir_all(dir)?;
    match crate::dirlock::lock(dir)? {
        Ok(f) => Ok(f),
        Err(pid) => {
            Err(StoreError::Locked { path: dir.display().to_string(), holder: crate::dirlock::holder_name(pid) })
        }
    }
}

impl Drop for IndexedStore {
    fn drop(&mut self) {
        self.close();
    }
}
