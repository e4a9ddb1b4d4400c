//! The store's one writer thread. It takes every write waiting in its queue,
//! resolves each (assigning cache ids) into a log record, appends the group
//! to the write-ahead log and makes it durable with one `fdatasync` (group
//! commit); then the index learns the writes and each caller hears back.
//!
//! sled is touched only at checkpoints: the records written since the last
//! one are read back from the log, applied to sled, sled is flushed, and the
//! log starts over. So nothing a failed append refused ever reaches sled or
//! the index (the ordering rule in ARCHITECTURE.md), and a publish costs an
//! append and one `fdatasync`, nothing more. A checkpoint applies the log on
//! a thread of its own while the writer goes on (see `writer/checkpoint.rs`); only
//! its end (the last records, sled's flush, the snapshot, emptying the log)
//! makes writes wait.
//!
//! Failures, and what each leaves possible:
//! - an append that fails (disk full): the group is refused, the ids it
//!   took are given back, `/healthz` reports it, and the next group tries
//!   again: nothing was made durable, nothing was half-applied;
//! - a failed `fdatasync`: refused from then on, until a restart replays the log;
//! - a failed checkpoint: the log keeps everything, sled is reopened from
//!   disk at the next try; past [`MAX_LOG_BYTES`] of log, writes are refused.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::oneshot;

use super::index::FastMap;
use super::sled_store::Shared;
use super::snapshot::Base;
use super::trees::Trees;
use super::wal::{Rec, Wal, WalError};
use super::{Binding, StoreError};
use crate::domain::{next_cache_id, BlogId, BlogPath, CacheId, ContentHash, Domain};

mod checkpoint;

pub(super) use checkpoint::{short_of_room, tail_is_long};
pub use checkpoint::{Applying, Tuning, MAX_LOG_BYTES};
use checkpoint::{CHECKPOINT_EVERY, ROUND_POLL};
#[cfg(test)]
pub use checkpoint::{HOLD_ROUNDS, ROUNDS_HELD};

/// Most writes taken into one group.
const MAX_GROUP: usize = 4096;

pub type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

pub enum Op {
    Invalidate {
        blog: BlogId,
        paths: Vec<BlogPath>,
        tx: Reply<CacheId>,
    },
    Bind {
        blog: BlogId,
        path: Option<BlogPath>,
        binding: Binding,
        tx: Reply<()>,
    },
    SetDomain {
        domain: Domain,
        blog: BlogId,
        tx: Reply<()>,
    },
    RemoveDomain {
        domain: Domain,
        tx: Reply<bool>,
    },
    DeleteBlog {
        blog: BlogId,
        tx: Reply<Option<Vec<ContentHash>>>,
    },
    /// Takes down one permanent asset of a blog; false when the blog does
    /// not reference it.
    DeleteAsset {
        blog: BlogId,
        hash: ContentHash,
        tx: Reply<bool>,
    },
    /// Purges `keys` at every edge target.
    Purge {
        keys: Vec<String>,
        tx: Reply<()>,
    },
    /// A target delivered every purge up to record `upto`.
    PurgeSent {
        target: String,
        upto: u64,
        tx: Reply<()>,
    },
    /// `removed`: the collector deleted the blob (else it found it referenced).
    GcDone {
        hash: ContentHash,
        removed: bool,
        tx: Reply<()>,
    },
    Flush {
        tx: Reply<()>,
    },
}

impl Op {
    /// Its share of the queue's bound: a batch of paths weighs its paths.
    pub fn weight(&self) -> usize {
        match self {
            Op::Invalidate { paths, .. } => 1 + paths.len(),
            _ => 1,
        }
    }

    /// Reads the index to decide what it does, so it must see every earlier
    /// write there: the group before it is committed first.
    pub(super) fn reads_index(&self) -> bool {
        matches!(self, Op::RemoveDomain { .. } | Op::DeleteBlog { .. } | Op::DeleteAsset { .. })
    }

    /// True if it enqueues a purge (so is refused while an outbox is full).
    /// The purge keys it enqueues, if it enqueues any: the one place that
    /// says which writes purge what.
    /// A domain that leaves its blog (moved to another, or removed) purges
    /// that blog: an edge may hold its files under the domain's name. Only
    /// these read the index (`shared`'s, as of the last durable group).
    fn purge_keys(&self, purge_on_publish: bool, shared: &Shared) -> Option<Vec<String>> {
        let owner = |domain: &Domain| shared.index.read().domains.get(domain.as_str()).cloned();
        match self {
            Op::Invalidate { blog, paths, .. } if purge_on_publish && paths.is_empty() => Some(vec![blog.to_string()]),
            Op::SetDomain { domain, blog, .. } => {
                owner(domain).filter(|had| had != blog).map(|had| vec![had.to_string()])
            }
            Op::RemoveDomain { domain, .. } => owner(domain).map(|had| vec![had.to_string()]),
            Op::DeleteBlog { blog, .. } => Some(vec![blog.to_string()]),
            Op::DeleteAsset { blog, hash, .. } => Some(vec![format!("{blog}/{hash}")]),
            Op::Purge { keys, .. } => Some(keys.clone()),
            _ => None,
        }
    }

    pub(super) fn refuse(self, e: StoreError, shared: &Shared) {
        match self {
            Op::Invalidate { tx, .. } => drop(tx.send(Err(e))),
            Op::Bind { tx, binding, .. } => {
                shared.unpin(&binding.hash);
                drop(tx.send(Err(e)))
            }
            Op::SetDomain { tx, .. }
            | Op::GcDone { tx, .. }
            | Op::Flush { tx }
            | Op::Purge { tx, .. }
            | Op::PurgeSent { tx, .. } => drop(tx.send(Err(e))),
            Op::RemoveDomain { tx, .. } | Op::DeleteAsset { tx, .. } => drop(tx.send(Err(e))),
            Op::DeleteBlog { tx, .. } => drop(tx.send(Err(e))),
        }
    }
}

/// Whom to answer once a write is durable (what it changes in the index is
/// its log record, applied by [`Index::apply`]).
enum Effect {
    Invalidated {
        id: CacheId,
        tx: Reply<CacheId>,
    },
    Bound {
        hash: ContentHash,
        tx: Reply<()>,
    },
    DomainRemoved {
        existed: bool,
        tx: Reply<bool>,
    },
    Deleted {
        hashes: Option<Vec<ContentHash>>,
        tx: Reply<Option<Vec<ContentHash>>>,
    },
    Unref {
        tx: Reply<bool>,
    },
    /// A purge record: its keys go to the outbox once durable.
    Enqueue {
        seq: u64,
        at_ms: u64,
        keys: Vec<String>,
    },
    /// Keys already waiting, pinned for this group: released once it is
    /// durable (they go out after it) or refused.
    Unpin {
        keys: Vec<String>,
        outbox: Arc<crate::purge::Outbox>,
    },
    Done {
        tx: Reply<()>,
    },
}

/// A group being written: each write's record (none for a flush or a pin)
/// and whom to answer.
type Group = Vec<(Option<Rec>, Effect)>;

impl Effect {
    fn refuse(self, e: StoreError, shared: &Shared) {
        match self {
            Effect::Invalidated { tx, .. } => drop(tx.send(Err(e))),
            Effect::Bound { tx, hash } => {
                shared.unpin(&hash);
                drop(tx.send(Err(e)))
            }
            Effect::Done { tx } => drop(tx.send(Err(e))),
            Effect::DomainRemoved { tx, .. } | Effect::Unref { tx, .. } => drop(tx.send(Err(e))),
            Effect::Deleted { tx, .. } => drop(tx.send(Err(e))),
            Effect::Enqueue { .. } => {}
            Effect::Unpin { keys, outbox } => outbox.unpin(&keys),
        }
    }
}

/// Per blog, as written to sled: the floor and the last assigned cache id.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ids {
    pub floor: CacheId,
    pub last: CacheId,
}

impl Ids {
    /// The cache-id rule: a blog's next id is `max(now in ms, last + 1)`,
    /// `last` being its previous id (or, for a blog deleted before, the last
    /// id it had then). A new blog's floor is its first id; `raise_floor`
    /// makes the new id the floor.
    pub fn next(prev: Option<Ids>, deleted_last: Option<CacheId>, raise_floor: bool) -> Ids {
        let last = match prev {
            Some(p) => p.last,
            None => deleted_last.unwrap_or(0),
        };
        let id = next_cache_id(now_ms(), last);
        let floor = match prev {
            Some(p) if !raise_floor => p.floor,
            _ => id,
        };
        Ids { floor, last: id }
    }

    /// The ids a durable record leaves its blog with (for a store that
    /// learns writes from a log it follows, as etcd's does).
    pub fn follow(ids: &mut FastMap<Box<str>, Ids>, deleted_last: &mut FastMap<Box<str>, CacheId>, rec: &Rec) {
        match rec {
            Rec::Invalidate { blog, id, floor, .. }
            | Rec::Bind { blog, id, floor, .. }
            | Rec::Unref { blog, id, floor, .. } => {
                ids.insert(blog.as_str().into(), Ids { floor: *floor, last: *id });
            }
            Rec::SetDomain { blog, create: Some(id), .. } => {
                ids.insert(blog.as_str().into(), Ids { floor: *id, last: *id });
            }
            Rec::Delete { blog, last, .. } => {
                ids.remove(blog.as_str());
                deleted_last.insert(blog.as_str().into(), *last);
            }
            _ => {}
        }
    }
}

/// The records a write becomes, the same for the sled writer and the etcd
/// one (each assigns ids and reads its index its own way).
pub mod build {
    use super::*;
    use crate::store::index::Index;

    /// A publish: `paths` take the blog's new id (none: its floor rose).
    pub fn invalidate(blog: &BlogId, ids: Ids, paths: &[BlogPath]) -> Rec {
        let paths = paths.iter().map(|p| p.as_str().to_owned()).collect();
        Rec::Invalidate { blog: blog.to_string(), id: ids.last, floor: ids.floor, paths }
    }

    pub fn bind(blog: &BlogId, ids: Ids, path: Option<&BlogPath>, binding: &Binding) -> Rec {
        Rec::Bind {
            blog: blog.to_string(),
            id: ids.last,
            floor: ids.floor,
            path: path.map(|p| p.as_str().to_owned()),
            hash: binding.hash.0,
            size: binding.size,
            content_type: binding.content_type.to_string(),
            filename: binding.filename.to_string(),
        }
    }

    /// A blog's deletion, naming the blobs and domains it drops (from the
    /// index, current for this write), and those blobs' hashes.
    pub fn delete(index: &Index, blog: &BlogId, last: CacheId) -> (Rec, Vec<ContentHash>) {
        let (hashes, domains) = match index.blogs.get(blog.as_str()) {
            Some(s) => {
                (s.refs.keys().map(|h| h.0).collect::<Vec<_>>(), s.domains.iter().map(|d| d.to_string()).collect())
            }
            None => (Vec::new(), Vec::new()),
        };
        let found = hashes.iter().map(|h| ContentHash(*h)).collect();
        (Rec::Delete { blog: blog.to_string(), last, hashes, domains }, found)
    }

    /// The paths of `blog` bound to `hash`; `None` when the blog does not
    /// reference it (nothing to take down).
    pub fn bound_paths(index: &Index, blog: &BlogId, hash: &ContentHash) -> Option<Vec<String>> {
        let s = index.blogs.get(blog.as_str()).filter(|s| s.refs.contains_key(hash))?;
        let bound = s.paths.iter().filter(|(_, e)| e.binding.as_ref().is_some_and(|b| b.0 == *hash));
        Some(bound.map(|(p, _)| p.to_owned()).collect())
    }

    pub fn unref(blog: &BlogId, ids: Ids, hash: &ContentHash, paths: Vec<String>) -> Rec {
        Rec::Unref { blog: blog.to_string(), id: ids.last, floor: ids.floor, hash: hash.0, paths }
    }

    /// Whether a blob is referenced, or about to be by a write in flight:
    /// the garbage collector's candidate is then kept.
    pub fn referenced(shared: &Shared, index: &Index, hash: &ContentHash) -> bool {
        shared.pending_refs.lock().contains_key(hash) || index.blob_refs.contains_key(hash)
    }
}

pub struct Writer {
    /// sled, open only during a checkpoint (reopened by the next one).
    pub trees: Option<Trees>,
    /// A checkpoint under way.
    pub applying: Option<Applying>,
    pub db_path: PathBuf,
    pub shared: Arc<Shared>,
    pub ids: FastMap<Box<str>, Ids>,
    /// The last cache id of each deleted blog, so one created again under
    /// the same id never hands out an id it had before.
    pub deleted_last: FastMap<Box<str>, CacheId>,
    pub wal: Wal,
    /// Sequence number of the next log record.
    pub seq: u64,
    pub last_checkpoint: Instant,
    pub checkpoint_failed: Option<Instant>,
    /// How to give back what the group being written took, if it is refused.
    pub undo: Vec<(Box<str>, Option<Ids>, Option<CacheId>)>,
    pub outbox: Arc<crate::purge::Outbox>,
    pub purge_on_publish: bool,
    /// Each target's delivered mark, as logged: purge records below the
    /// lowest are forgotten at checkpoints.
    pub purge_sent: FastMap<String, u64>,
    /// Purge keys the group being written enqueues once durable: counted
    /// against a target's `purge_queue_max` with those already waiting.
    pub group_purge_keys: usize,
    /// The snapshot a start can read, while its tail holds every record
    /// since it that the log no longer does (see `store::snapshot`). `None`:
    /// none can be used now, so the next checkpoint (or an idle moment)
    /// writes one.
    pub snap: Option<Base>,
    /// When the last snapshot write failed: tried again after `SNAPSHOT_RETRY`.
    pub snapshot_failed: Option<Instant>,
    /// The record number after the last durable group.
    pub durable_seq: u64,
    pub tuning: Tuning,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Writer {
    pub fn run(&mut self, rx: std::sync::mpsc::Receiver<Op>) {
        use std::sync::mpsc::RecvTimeoutError;
        loop {
            let idle = if self.applying.is_some() { ROUND_POLL } else { CHECKPOINT_EVERY };
            let first = match rx.recv_timeout(idle) {
                Ok(op) => op,
                Err(RecvTimeoutError::Timeout) => {
                    self.maybe_checkpoint(true);
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let mut group = Vec::new();
            let mut next = Some(first);
            while let Some(op) = next.take() {
                self.shared.queued.fetch_sub(op.weight(), Ordering::Relaxed);
                if op.reads_index() && !group.is_empty() {
                    self.commit(std::mem::take(&mut group));
                }
                self.take(op, &mut group);
                if group.len() < MAX_GROUP {
                    next = rx.try_recv().ok();
                }
            }
            self.commit(group);
            self.maybe_checkpoint(false);
        }
        self.stop();
    }

    /// Makes a group durable, then lets the index and the callers know.
    fn commit(&mut self, group: Group) {
        // Enqueued once durable, or never: no longer pending either way.
        self.group_purge_keys = 0;
        if group.is_empty() {
            return;
        }
        // Debug level: enabled only when traces are exported.
        let span = tracing::debug_span!("wal.commit", records = group.len(), fsync_us = tracing::field::Empty);
        let _entered = span.enter();
        let started = Instant::now();
        let synced = self.wal.sync();
        span.record("fsync_us", started.elapsed().as_micros() as u64);
        match synced {
            Ok(()) => {
                self.durable_seq = self.seq;
                self.undo.clear();
                self.shared.degraded.lock().take();
                self.publish(group);
            }
            Err(WalError::Append(e)) => {
                // Nothing of the group is durable: give back the ids and the
                // record numbers it took (a number names one record, for
                // good: the snapshot's chain relies on it).
                self.seq = self.durable_seq;
                for (blog, ids, deleted) in self.undo.drain(..).rev() {
                    match ids {
                        Some(ids) => self.ids.insert(blog.clone(), ids),
                        None => self.ids.remove(&blog),
                    };
                    match deleted {
                        Some(last) => self.deleted_last.insert(blog, last),
                        None => self.deleted_last.remove(&blog),
                    };
                }
                let err = StoreError::append(&e);
                tracing::error!(error = %e, writes = group.len(), "write-ahead log append failed; writes refused");
                *self.shared.degraded.lock() = Some(err.to_string());
                for (_, eff) in group {
                    eff.refuse(err.clone_for_reply(), &self.shared);
                }
            }
            Err(WalError::Sync(e)) => {
                let msg = self.fail(&e);
                for (_, eff) in group {
                    eff.refuse(StoreError::Failed(msg.clone()), &self.shared);
                }
            }
        }
    }

    fn fail(&mut self, e: &dyn std::fmt::Display) -> String {
        tracing::error!(error = %e, "write-ahead log sync failed; refusing further writes until a restart");
        let msg = format!("the store refuses writes after a failed disk sync ({e}); restart the server");
        *self.shared.failed.lock() = Some(msg.clone());
        msg
    }

    /// Assigns the next cache id of a blog: (id, floor). A new blog's floor
    /// is its first id; a blog deleted before starts above its old ids.
    fn assign(&mut self, blog: &BlogId, raise_floor: bool) -> Ids {
        let prev = self.ids.get(blog.as_str()).copied();
        let deleted = self.deleted_last.get(blog.as_str()).copied();
        self.undo.push((blog.as_str().into(), prev, deleted));
        let next = Ids::next(prev, deleted, raise_floor);
        self.ids.insert(blog.as_str().into(), next);
        next
    }

    /// Resolves one write into log records (the write, and the purge it
    /// causes) and adds them to the group's append. Refusals are answered
    /// at once.
    fn take(&mut self, op: Op, group: &mut Group) {
        if let Some(e) = self.shared.failed.lock().clone() {
            op.refuse(StoreError::Failed(e), &self.shared);
            return;
        }
        // The purge keys this write enqueues (none without targets). A full
        // outbox refuses writes that would add keys to it; one whose keys all
        // wait already adds none (see `push_purge`) and goes on.
        let purge = match self.outbox.has_targets() {
            true => op.purge_keys(self.purge_on_publish, &self.shared),
            false => None,
        };
        if let Some(why) = purge.as_deref().and_then(|keys| self.outbox.refuses(keys, self.group_purge_keys)) {
            op.refuse(StoreError::Full(why), &self.shared);
            return;
        }
        if self.wal.bytes() > MAX_LOG_BYTES && !matches!(op, Op::Flush { .. }) {
            op.refuse(
                StoreError::Full(format!(
                    "the store cannot checkpoint its write-ahead log ({} MiB waiting); writes are refused until it can",
                    self.wal.bytes() >> 20
                )),
                &self.shared,
            );
            return;
        }
        let (rec, effect) = match op {
            Op::Invalidate { blog, paths, tx } => {
                let ids = self.assign(&blog, paths.is_empty());
                (build::invalidate(&blog, ids, &paths), Effect::Invalidated { id: ids.last, tx })
            }
            Op::Bind { blog, path, binding, tx } => {
                let ids = self.assign(&blog, false);
                (build::bind(&blog, ids, path.as_ref(), &binding), Effect::Bound { hash: binding.hash, tx })
            }
            Op::SetDomain { domain, blog, tx } => {
                let create = match self.ids.contains_key(blog.as_str()) {
                    true => None,
                    false => Some(self.assign(&blog, true).last),
                };
                let rec = Rec::SetDomain { domain: domain.to_string(), blog: blog.to_string(), create };
                (rec, Effect::Done { tx })
            }
            Op::RemoveDomain { domain, tx } => {
                // The group before this one is committed: the index is current.
                let existed = self.shared.index.read().domains.contains_key(domain.as_str());
                (Rec::RemoveDomain { domain: domain.to_string() }, Effect::DomainRemoved { existed, tx })
            }
            Op::DeleteBlog { blog, tx } => {
                let Some(ids) = self.ids.get(blog.as_str()).copied() else {
                    let _ = tx.send(Ok(None));
                    return;
                };
                // From the index (current, see above): no scan of sled.
                let (rec, found) = build::delete(&self.shared.index.read(), &blog, ids.last);
                self.undo.push((blog.as_str().into(), Some(ids), self.deleted_last.get(blog.as_str()).copied()));
                self.ids.remove(blog.as_str());
                self.deleted_last.insert(blog.as_str().into(), ids.last);
                (rec, Effect::Deleted { hashes: Some(found), tx })
            }
            Op::DeleteAsset { blog, hash, tx } => {
                // The group before this one is committed: the index is current.
                let paths = build::bound_paths(&self.shared.index.read(), &blog, &hash);
                let Some(paths) = paths else {
                    let _ = tx.send(Ok(false));
                    return;
                };
                let ids = self.assign(&blog, false);
                (build::unref(&blog, ids, &hash, paths), Effect::Unref { tx })
            }
            Op::Purge { tx, .. } => {
                if let Some(keys) = purge {
                    self.push_purge(keys, group);
                }
                group.push((None, Effect::Done { tx }));
                return;
            }
            Op::PurgeSent { target, upto, tx } => {
                self.purge_sent.insert(target.clone(), upto);
                let prune = self
                    .outbox
                    .queues()
                    .iter()
                    .map(|q| self.purge_sent.get(&q.name).copied().unwrap_or(0))
                    .min()
                    .unwrap_or(0);
                (Rec::PurgeSent { target, upto, prune }, Effect::Done { tx })
            }
            Op::GcDone { hash, removed, tx } => {
                // Kept as a candidate when the collector left the blob because
                // a blog referenced it, but none does any more (that blog was
                // deleted meanwhile): dropping it now would leak the blob.
                let referenced = build::referenced(&self.shared, &self.shared.index.read(), &hash);
                if !removed && !referenced {
                    let _ = tx.send(Ok(()));
                    return;
                }
                (Rec::GcDone { hash: hash.0 }, Effect::Done { tx })
            }
            Op::Flush { tx } => {
                group.push((None, Effect::Done { tx }));
                return;
            }
        };
        self.wal.push(self.seq, &rec);
        self.seq += 1;
        group.push((Some(rec), effect));
        if let Some(keys) = purge {
            self.push_purge(keys, group);
        }
    }

    /// Adds a purge record to the group: its keys reach the outbox once the
    /// group is durable, with the write that caused them. Keys that all wait
    /// already (a publish storm while an edge is down) need no record: they
    /// are pinned until the group is durable, and go out after it.
    fn push_purge(&mut self, keys: Vec<String>, group: &mut Group) {
        if self.outbox.pin_waiting(&keys) {
            group.push((None, Effect::Unpin { keys, outbox: self.outbox.clone() }));
            return;
        }
        let at_ms = now_ms();
        let rec = Rec::Purge { at_ms, keys };
        self.wal.push(self.seq, &rec);
        let Rec::Purge { keys, .. } = rec else { unreachable!("built just above") };
        self.group_purge_keys += keys.len();
        group.push((None, Effect::Enqueue { seq: self.seq, at_ms, keys }));
        self.seq += 1;
    }

    /// After the sync: the index learns the writes, then callers hear back.
    fn publish(&self, group: Group) {
        let mut replies: Vec<Box<dyn FnOnce() + Send>> = Vec::with_capacity(group.len());
        {
            let mut index = self.shared.index.write();
            for (rec, eff) in group {
                if let Some(rec) = &rec {
                    index.apply(rec);
                }
                match eff {
                    Effect::Invalidated { id, tx } => replies.push(Box::new(move || drop(tx.send(Ok(id))))),
                    Effect::Bound { hash, tx } => {
                        self.shared.unpin(&hash);
                        replies.push(Box::new(move || drop(tx.send(Ok(())))));
                    }
                    Effect::DomainRemoved { existed, tx } => replies.push(Box::new(move || drop(tx.send(Ok(existed))))),
                    Effect::Deleted { hashes, tx } => replies.push(Box::new(move || drop(tx.send(Ok(hashes))))),
                    Effect::Unref { tx } => replies.push(Box::new(move || drop(tx.send(Ok(true))))),
                    Effect::Enqueue { seq, at_ms, keys } => self.outbox.enqueue(seq, at_ms, &keys),
                    Effect::Unpin { keys, outbox } => outbox.unpin(&keys),
                    Effect::Done { tx } => replies.push(Box::new(move || drop(tx.send(Ok(()))))),
                }
            }
        }
        for r in replies {
            r();
        }
    }
}
