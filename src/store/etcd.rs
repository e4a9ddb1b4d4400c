//! Cluster mode: the metadata lives in etcd, and every node keeps the same
//! in-memory index, so reads stay memory-only (DESIGN.md, "Cluster mode").
//!
//! etcd holds a log of write groups under the prefix `P` (`etcd_prefix`):
//! - `P head`: the sequence number of the last record written (u64 BE);
//! - `P log/{seq:016x}`: one group of records, `seq` its first: the writer's
//!   nonce and a count of its tries (u64 BE each, so no two tries' values
//!   are equal, even of the same records), then the records encoded and
//!   checked as the write-ahead log encodes them ([`wal::encode_group`]);
//! - `P snap`: the last snapshot's record number (u64 BE), chunk count
//!   (u32 BE) and writer's nonce (u64 BE); `P snap/{seq:016x}-{nonce:016x}/
//!   {i:04x}`: its chunks, the index in the format of [`snapshot`] (what a
//!   clean stop of the sled store writes). Each node writes its chunks under
//!   its own nonce, so two nodes snapshotting at once never mix or delete
//!   each other's.
//!
//! The log does not grow with history: a writer that finds [`SNAPSHOT_EVERY`]
//! records (or [`SNAPSHOT_BYTES`] of its own groups) past the last snapshot
//! writes a snapshot of its index, then in one transaction (if `P snap` is
//! still the one it knows) points `P snap` at it and deletes the log up to
//! it and the snapshot before. A node starts from the snapshot and the log
//! after it, all read at one revision.
//!
//! A write is one etcd transaction: "if `head` has not changed since the
//! last group this node applied, put the group and the new head". So groups
//! form one sequence across every node, and each is built on the state all
//! groups before it left: the cache-id rule (`max(now, last + 1)` per blog)
//! holds across nodes with no lock. A node that loses the race learns the
//! winner's group from its watch and builds its own again.
//!
//! Every node loads the log at start (paginated ranges at one revision) and
//! follows it with a watch from that revision; each group's records reach
//! the index through [`Index::apply`], as in the sled store, and the ids
//! through [`Ids::follow`]. A write is acknowledged once committed and
//! applied on the node that took it. A watch cancelled by compaction, or
//! broken, is opened again; a revision compacted away means a full reload.
//!
//! etcd unreachable: reads go on from memory, writes fail with UNAVAILABLE
//! naming etcd, and `/healthz` says so until the watch is back.
//!
//! The client is generated from `proto/etcd/kv.proto` (etcd's own services
//! and field numbers) by the build's protox: the `etcd-client` crate's build
//! needs a system `protoc`, which `cargo build` here must not.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};

use super::index::{FastMap, Index};
use super::sled_store::{IndexedStore, Shared};
use super::snapshot;
use super::wal::{self, Rec};
use super::writer::{Ids, Op};
use super::StoreError;
use crate::domain::{CacheId, ContentHash};
use crate::etcdpb::{
    compare, kv_client::KvClient, request_op, watch_client::WatchClient, watch_request, Compare, DeleteRangeRequest,
    PutRequest, RangeRequest, RequestOp, TxnRequest, TxnResponse, WatchCreateRequest, WatchProgressRequest,
    WatchRequest,
};

/// One etcd request at most this long; past it the write is refused.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// A group's value at most (etcd refuses requests past 1.5 MiB by default).
const MAX_GROUP_BYTES: usize = 1 << 20;
/// Paths taken into one group at most, so groups stay under that size.
const MAX_GROUP_PATHS: usize = 8192;
/// Groups per page when loading the log (at most 1 MiB each).
const PAGE: i64 = 64;
/// A response at most (a page of the log, two snapshot chunks).
const MAX_RESPONSE: usize = 80 << 20;
/// How often a quiet watch asks etcd how far it has got.
const PROGRESS_EVERY: Duration = Duration::from_secs(30);
/// A snapshot once this many records follow the last one,
const SNAPSHOT_EVERY: u64 = 10_000;
/// or once this node wrote this many bytes of groups since it last saw one.
const SNAPSHOT_BYTES: usize = 64 << 20;

pub struct EtcdOptions {
    /// Client URLs, `http://host:port`.
    pub endpoints: Vec<String>,
    pub prefix: String,
}

/// What this node has applied of the log.
#[derive(Default)]
struct Applied {
    ids: FastMap<Box<str>, Ids>,
    deleted_last: FastMap<Box<str>, CacheId>,
    /// The etcd revision of the last group applied (that of `head` then).
    head_rev: i64,
    /// The last record's sequence number.
    seq: u64,
    /// The last snapshot: its record and the revision of `P snap` (0: none).
    snap_seq: u64,
    snap_rev: i64,
}

struct Follower {
    shared: Arc<Shared>,
    applied: Mutex<Applied>,
    /// The etcd revision this node has seen everything up to.
    seen: watch::Sender<i64>,
    head: Vec<u8>,
    log: Vec<u8>,
    /// `P snap` (the pointer) and `P snap/` (the chunks).
    snap: Vec<u8>,
    snaps: Vec<u8>,
    /// False while the watch is down (then writes would not be seen).
    watching: std::sync::atomic::AtomicBool,
}

/// The key just past every key that starts with `p`.
fn prefix_end(p: &[u8]) -> Vec<u8> {
    let mut end = p.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("etcd is unavailable ({what}: {e}); nothing was written, retry shortly"))
}

impl Follower {
    /// Applies one group (a `log/` value) to the index and the ids.
    fn apply_group(&self, index: &mut Index, a: &mut Applied, value: &[u8], rev: i64) -> Result<(), String> {
        let recs = value
            .get(16..)
            .and_then(wal::decode_group)
            .ok_or_else(|| format!("a damaged log group at etcd revision {rev}"))?;
        for (seq, rec) in &recs {
            // Never twice: a record is applied once, in log order.
            if *seq <= a.seq {
                continue;
            }
            index.apply(rec);
            Ids::follow(&mut a.ids, &mut a.deleted_last, rec);
            // This node's copy of a blob a deletion left unreferenced is
            // its own to collect (`Shared::local_gc`).
            match rec {
                Rec::Delete { hashes, .. } => {
                    self.shared.local_gc.lock().extend(hashes.iter().map(|h| ContentHash(*h)))
                }
                Rec::Unref { hash, .. } => {
                    self.shared.local_gc.lock().insert(ContentHash(*hash));
                }
                _ => {}
            }
            a.seq = a.seq.max(*seq);
        }
        a.head_rev = a.head_rev.max(rev);
        Ok(())
    }

    /// Reads the whole log at one revision, a page at a time, into a fresh
    /// index. Returns the revision it was read at.
    async fn load(&self, kv: &mut KvClient<Channel>) -> Result<(Index, Applied, i64), String> {
        let (mut index, mut a) = (Index::default(), Applied::default());
        // The snapshot pointer fixes the revision every later read is at.
        let req = RangeRequest { key: self.snap.clone(), ..Default::default() };
        let resp = kv.range(req).await.map_err(|s| format!("loading: {}", s.message()))?.into_inner();
        let rev = resp.header.as_ref().map_or(0, |h| h.revision);
        let mut key = self.log.clone();
        if let Some(p) = resp.kvs.first() {
            let v = &p.value;
            let (Some(seq), Some(n), Some(nonce)) = (v.get(..8), v.get(8..12), v.get(12..20)) else {
                return Err("a damaged snapshot pointer".into());
            };
            let seq = u64::from_be_bytes(seq.try_into().expect("8"));
            let n = u32::from_be_bytes(n.try_into().expect("4")) as usize;
            let nonce = u64::from_be_bytes(nonce.try_into().expect("8"));
            let mut bytes = Vec::new();
            let mut ckey = [self.snaps.as_slice(), format!("{seq:016x}-{nonce:016x}/").as_bytes()].concat();
            let cend = prefix_end(&ckey);
            let mut got = 0;
            loop {
                let req = RangeRequest {
                    key: ckey.clone(),
                    range_end: cend.clone(),
                    limit: 2,
                    revision: rev,
                    ..Default::default()
                };
                let resp =
                    kv.range(req).await.map_err(|s| format!("loading the snapshot: {}", s.message()))?.into_inner();
                for c in &resp.kvs {
                    bytes.extend_from_slice(&c.value);
                    got += 1;
                }
                match resp.kvs.last() {
                    Some(last) if resp.more => {
                        ckey = last.key.clone();
                        ckey.push(0);
                    }
                    _ => break,
                }
            }
            if got != n {
                return Err(format!("snapshot {seq} has {got} of its {n} chunks"));
            }
            let (at, (i, ids, deleted_last)) =
                snapshot::decode(&bytes).map_err(|why| format!("snapshot {seq} is {why}"))?;
            if at != seq {
                return Err(format!("snapshot {seq} holds record {at}"));
            }
            index = i;
            a = Applied { ids, deleted_last, head_rev: 0, seq, snap_seq: seq, snap_rev: p.mod_revision };
            key.extend_from_slice(format!("{:016x}", seq + 1).as_bytes());
        }
        let end = prefix_end(&self.log);
        loop {
            let req = RangeRequest {
                key: key.clone(),
                range_end: end.clone(),
                limit: PAGE,
                revision: rev,
                ..Default::default()
            };
            let resp = kv.range(req).await.map_err(|s| format!("loading the log: {}", s.message()))?.into_inner();
            for kv in &resp.kvs {
                self.apply_group(&mut index, &mut a, &kv.value, kv.mod_revision)?;
            }
            match resp.kvs.last() {
                Some(last) if resp.more => {
                    key = last.key.clone();
                    key.push(0);
                }
                _ => break,
            }
        }
        // The head's own revision, at the same revision as the log read.
        let req = RangeRequest { key: self.head.clone(), revision: rev, ..Default::default() };
        let resp = kv.range(req).await.map_err(|s| format!("loading the head: {}", s.message()))?.into_inner();
        if let Some(h) = resp.kvs.first() {
            a.head_rev = h.mod_revision;
        }
        Ok((index, a, rev))
    }

    /// Follows the log from `from` until the stream ends or fails; `seen`
    /// (everything up to it applied) moves as groups arrive.
    async fn watch_once(&self, wc: &mut WatchClient<Channel>, from: i64) -> WatchEnd {
        // `head`, the log and the snapshot pointer (the keys sort in that
        // order), not the snapshot's chunks: nothing needs them as they come.
        let create = WatchCreateRequest {
            key: self.head.clone(),
            range_end: self.snaps.clone(),
            start_revision: from,
            progress_notify: true,
            prev_kv: false,
            // Large catch-ups come in pieces of about etcd's request limit.
            fragment: true,
        };
        let req = WatchRequest { request_union: Some(watch_request::RequestUnion::CreateRequest(create)) };
        // The request stream stays open as long as the watch does.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(req).await.expect("receiver held below");
        let mut stream = match wc.watch(tokio_stream::wrappers::ReceiverStream::new(rx)).await {
            Ok(s) => s.into_inner(),
            Err(s) => return WatchEnd::Down(s.message().to_owned()),
        };
        // The highest revision among the events of the answer being read
        // (an answer may come in fragments; each event is whole).
        let mut last = 0;
        // While the log is quiet, a progress notice now and then keeps
        // `seen` near etcd's revision: a watch opened again later then
        // starts above what compaction removed, instead of reloading.
        let mut progress = tokio::time::interval(PROGRESS_EVERY);
        progress.reset();
        loop {
            let next = tokio::select! {
                m = stream.message() => m,
                _ = progress.tick() => {
                    let ask = WatchRequest {
                        request_union: Some(watch_request::RequestUnion::ProgressRequest(WatchProgressRequest {})),
                    };
                    let _ = tx.try_send(ask);
                    continue;
                }
            };
            let msg = match next {
                Ok(Some(m)) => m,
                Ok(None) => return WatchEnd::Down("the watch stream ended".into()),
                Err(s) => return WatchEnd::Down(s.message().to_owned()),
            };
            if msg.compact_revision > 0 {
                return WatchEnd::Compacted;
            }
            if msg.canceled {
                return WatchEnd::Down(format!("watch cancelled: {}", msg.cancel_reason));
            }
            self.watching.store(true, Ordering::Relaxed);
            self.shared.degraded.lock().take();
            // The creation's header revision is etcd's current one, not a
            // promise that the events up to it were sent: it says nothing.
            if msg.created {
                continue;
            }
            if let Some(top) = msg.events.iter().filter_map(|e| e.kv.as_ref()).map(|kv| kv.mod_revision).max() {
                // Applied as they come, so memory holds one fragment.
                self.apply_events(&msg.events);
                last = last.max(top);
            }
            if msg.fragment {
                continue;
            }
            let rev = match std::mem::take(&mut last) {
                0 => msg.header.as_ref().map_or(0, |h| h.revision),
                top => top,
            };
            // Whole now: everything up to `rev` is applied (a progress
            // notice, without events, says so of its header's revision).
            self.seen.send_if_modified(|seen| {
                let newer = rev > *seen;
                if newer {
                    *seen = rev;
                }
                newer
            });
        }
    }

    fn apply_events(&self, events: &[crate::etcdpb::Event]) {
        let mut index = self.shared.index.write();
        let mut a = self.applied.lock();
        for ev in events {
            let Some(kv) = &ev.kv else { continue };
            // Puts of log groups (the head moves with them) and of the
            // snapshot pointer; deletions are only cleanup.
            if ev.r#type != 0 {
                continue;
            }
            if kv.key.starts_with(&self.log) {
                if let Err(e) = self.apply_group(&mut index, &mut a, &kv.value, kv.mod_revision) {
                    // The index would part from etcd's: no write may be
                    // built on it until a restart reloads.
                    tracing::error!(error = %e, "etcd log group unreadable; refusing writes");
                    *self.shared.failed.lock() = Some(format!("{e}; restart the server to reload from etcd"));
                }
            } else if kv.key == self.snap {
                if let Some(seq) = kv.value.get(..8) {
                    a.snap_seq = u64::from_be_bytes(seq.try_into().expect("8"));
                    a.snap_rev = kv.mod_revision;
                }
            }
        }
    }

    /// Keeps the index current for as long as the store lives: a watch from
    /// the revision after the last one applied, opened again when it ends.
    async fn follow(self: Arc<Self>, mut kv: KvClient<Channel>, mut wc: WatchClient<Channel>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let from = *self.seen.borrow() + 1;
            match self.watch_once(&mut wc, from).await {
                WatchEnd::Compacted => {
                    tracing::warn!(from, "the etcd revisions to follow were compacted; reloading the log");
                    match self.load(&mut kv).await {
                        Ok((index, a, rev)) => {
                            let mut i = self.shared.index.write();
                            *i = index;
                            *self.applied.lock() = a;
                            self.seen.send_replace(rev);
                        }
                        Err(e) => self.down(&e),
                    }
                }
                WatchEnd::Down(e) => self.down(&e),
            }
            if *self.seen.borrow() >= from {
                backoff = Duration::from_millis(100);
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// While a failure is reported but the watch is up: asks etcd every
    /// second, and clears the report once it answers.
    async fn probe(self: Arc<Self>, mut kv: KvClient<Channel>) {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if self.shared.degraded.lock().is_none() || !self.watching.load(Ordering::Relaxed) {
                continue;
            }
            let req = RangeRequest { key: self.head.clone(), ..Default::default() };
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(1), kv.range(req)).await {
                if self.watching.load(Ordering::Relaxed) {
                    self.shared.degraded.lock().take();
                }
            }
        }
    }

    fn down(&self, e: &str) {
        self.watching.store(false, Ordering::Relaxed);
        let msg = format!("etcd is unreachable ({e}); reads answer from memory, writes are refused");
        let mut d = self.shared.degraded.lock();
        if d.as_deref() != Some(msg.as_str()) {
            tracing::warn!(error = %e, "etcd unreachable");
        }
        *d = Some(msg);
    }
}

enum WatchEnd {
    Compacted,
    Down(String),
}

/// What a write answers once its group is committed.
enum Out {
    Id(CacheId),
    Unit,
    Bool(bool),
    Hashes(Option<Vec<ContentHash>>),
}

fn answer(op: Op, out: Out, shared: &Shared) {
    match (op, out) {
        (Op::Invalidate { tx, .. }, Out::Id(id)) => drop(tx.send(Ok(id))),
        (Op::Bind { tx, binding, .. }, _) => {
            shared.unpin(&binding.hash);
            drop(tx.send(Ok(())))
        }
        (Op::RemoveDomain { tx, .. } | Op::DeleteAsset { tx, .. }, Out::Bool(b)) => drop(tx.send(Ok(b))),
        (Op::DeleteBlog { tx, .. }, Out::Hashes(h)) => drop(tx.send(Ok(h))),
        (
            Op::SetDomain { tx, .. }
            | Op::GcDone { tx, .. }
            | Op::Flush { tx }
            | Op::Purge { tx, .. }
            | Op::PurgeSent { tx, .. },
            _,
        ) => drop(tx.send(Ok(()))),
        (op, _) => op.refuse(StoreError::Unavailable("internal: mismatched answer".into()), shared),
    }
}

/// The next ids of `blog`, after those earlier ops of the group took.
fn assign<'o>(over: &mut FastMap<&'o str, Ids>, a: &Applied, blog: &'o str, raise: bool) -> Ids {
    let prev = over.get(blog).copied().or_else(|| a.ids.get(blog).copied());
    let ids = Ids::next(prev, a.deleted_last.get(blog).copied(), raise);
    over.insert(blog, ids);
    ids
}

/// Each op's record (if it writes one) and its answer, built on the state
/// this node has applied. Ops that read the index come alone (see
/// [`Op::reads_index`]), so the index is current for them.
fn plan<'o>(ops: &'o [Op], index: &Index, a: &Applied, shared: &Shared) -> Vec<(Option<Rec>, Out)> {
    // Ids taken by earlier ops of the same group.
    let mut over: FastMap<&'o str, Ids> = FastMap::default();

    let mut out = Vec::with_capacity(ops.len());
    for op in ops {
        out.push(match op {
            Op::Invalidate { blog, paths, .. } => {
                let ids = assign(&mut over, a, blog.as_str(), paths.is_empty());
                let paths = paths.iter().map(|p| p.as_str().to_owned()).collect();
                (
                    Some(Rec::Invalidate { blog: blog.to_string(), id: ids.last, floor: ids.floor, paths }),
                    Out::Id(ids.last),
                )
            }
            Op::Bind { blog, path, binding, .. } => {
                let ids = assign(&mut over, a, blog.as_str(), false);
                let rec = Rec::Bind {
                    blog: blog.to_string(),
                    id: ids.last,
                    floor: ids.floor,
                    path: path.as_ref().map(|p| p.as_str().to_owned()),
                    hash: binding.hash.0,
                    size: binding.size,
                    content_type: binding.content_type.to_string(),
                    filename: binding.filename.to_string(),
                };
                (Some(rec), Out::Unit)
            }
            Op::SetDomain { domain, blog, .. } => {
                // Known if it exists, or an earlier write of this group creates it.
                let known = over.contains_key(blog.as_str()) || a.ids.contains_key(blog.as_str());
                let create = match known {
                    true => None,
                    false => Some(assign(&mut over, a, blog.as_str(), true).last),
                };
                (Some(Rec::SetDomain { domain: domain.to_string(), blog: blog.to_string(), create }), Out::Unit)
            }
            Op::RemoveDomain { domain, .. } => {
                let existed = index.domains.contains_key(domain.as_str());
                (Some(Rec::RemoveDomain { domain: domain.to_string() }), Out::Bool(existed))
            }
            Op::DeleteBlog { blog, .. } => match a.ids.get(blog.as_str()) {
                None => (None, Out::Hashes(None)),
                Some(ids) => {
                    let (hashes, domains) = match index.blogs.get(blog.as_str()) {
                        Some(s) => (
                            s.refs.keys().map(|h| h.0).collect::<Vec<_>>(),
                            s.domains.iter().map(|d| d.to_string()).collect(),
                        ),
                        None => (Vec::new(), Vec::new()),
                    };
                    let found = hashes.iter().map(|h| ContentHash(*h)).collect();
                    (
                        Some(Rec::Delete { blog: blog.to_string(), last: ids.last, hashes, domains }),
                        Out::Hashes(Some(found)),
                    )
                }
            },
            Op::DeleteAsset { blog, hash, .. } => {
                let paths: Option<Vec<String>> =
                    index.blogs.get(blog.as_str()).filter(|s| s.refs.contains_key(hash)).map(|s| {
                        s.paths
                            .iter()
                            .filter(|(_, e)| e.binding.as_ref().is_some_and(|b| b.0 == *hash))
                            .map(|(p, _)| p.to_string())
                            .collect()
                    });
                match paths {
                    None => (None, Out::Bool(false)),
                    Some(paths) => {
                        let ids = assign(&mut over, a, blog.as_str(), false);
                        (
                            Some(Rec::Unref {
                                blog: blog.to_string(),
                                id: ids.last,
                                floor: ids.floor,
                                hash: hash.0,
                                paths,
                            }),
                            Out::Bool(true),
                        )
                    }
                }
            }
            Op::GcDone { hash, removed, .. } => {
                let referenced = shared.pending_refs.lock().contains_key(hash) || index.blob_refs.contains_key(hash);
                // As in the sled writer: a candidate no blog references any
                // more, that the collector left, stays for the next round.
                let settled = *removed || referenced;
                if settled {
                    // This node's copy is dealt with.
                    shared.local_gc.lock().remove(hash);
                }
                match settled && index.gc.contains(hash) {
                    true => (Some(Rec::GcDone { hash: hash.0 }), Out::Unit),
                    // Kept, or a candidate of this node only.
                    false => (None, Out::Unit),
                }
            }
            // No purge targets in cluster mode (refused at start); a flush
            // has nothing to wait for: every answered write is committed.
            Op::Purge { .. } | Op::PurgeSent { .. } | Op::Flush { .. } => (None, Out::Unit),
        });
    }
    out
}

/// The writer thread: takes the writes waiting, commits them as one group.
struct Writer {
    /// Bytes of groups this node wrote since its last snapshot.
    written: usize,
    /// Names this node's snapshot chunks and log groups apart from another
    /// node's.
    nonce: u64,
    /// Groups this node tried to commit.
    tries: u64,
    f: Arc<Follower>,
    kv: KvClient<Channel>,
    rt: tokio::runtime::Handle,
}

impl Writer {
    fn run(mut self, rx: std::sync::mpsc::Receiver<Op>) {
        let shared = self.f.shared.clone();
        let mut carry: Option<Op> = None;
        loop {
            let first = match carry.take() {
                Some(op) => op,
                None => match rx.recv() {
                    Ok(op) => {
                        shared.queued.fetch_sub(op.weight(), Ordering::Relaxed);
                        op
                    }
                    Err(_) => break,
                },
            };
            let mut weight = first.weight();
            let alone = first.reads_index();
            let mut ops = vec![first];
            while !alone && weight < MAX_GROUP_PATHS {
                let Ok(op) = rx.try_recv() else { break };
                shared.queued.fetch_sub(op.weight(), Ordering::Relaxed);
                if op.reads_index() {
                    carry = Some(op);
                    break;
                }
                weight += op.weight();
                ops.push(op);
            }
            self.commit(ops);
        }
    }

    /// Commits `ops` as one group (or as halves, if too large for one
    /// request), retrying when another node's group came first.
    fn commit(&mut self, mut ops: Vec<Op>) {
        let shared = self.f.shared.clone();
        let refuse_all = |ops: Vec<Op>, e: &StoreError| {
            for op in ops {
                op.refuse(e.clone_for_reply(), &shared);
            }
        };
        for _attempt in 0..100 {
            if let Some(e) = shared.failed.lock().clone() {
                return refuse_all(ops, &StoreError::Failed(e));
            }
            let (planned, head_rev, first_seq) = {
                let index = shared.index.read();
                let a = self.f.applied.lock();
                (plan(&ops, &index, &a, &shared), a.head_rev, a.seq + 1)
            };
            let mut seq = first_seq;
            let mut numbered = Vec::new();
            for (rec, _) in &planned {
                if let Some(rec) = rec {
                    numbered.push((seq, rec));
                    seq += 1;
                }
            }
            if numbered.is_empty() {
                for (op, (_, out)) in ops.into_iter().zip(planned) {
                    answer(op, out, &shared);
                }
                return;
            }
            // Whose try this is: after a lost reply, the value under our key
            // is ours only if it carries this exact tag.
            self.tries += 1;
            let mut value = [self.nonce.to_be_bytes(), self.tries.to_be_bytes()].concat();
            value.extend_from_slice(&wal::encode_group(numbered.iter().map(|(s, r)| (*s, *r))));
            let value_len = value.len();
            if value.len() > MAX_GROUP_BYTES {
                if ops.len() > 1 {
                    let rest = ops.split_off(ops.len() / 2);
                    self.commit(ops);
                    self.commit(rest);
                } else {
                    let e = StoreError::Full(format!(
                        "the write is too large for one etcd request ({} bytes, at most {MAX_GROUP_BYTES}); send fewer paths per call",
                        value.len()
                    ));
                    refuse_all(ops, &e);
                }
                return;
            }
            let last_seq = seq - 1;
            let mut log_key = self.f.log.clone();
            log_key.extend_from_slice(format!("{first_seq:016x}").as_bytes());
            let put = |key: Vec<u8>, value: Vec<u8>| RequestOp {
                request: Some(request_op::Request::RequestPut(PutRequest { key, value, ..Default::default() })),
            };
            let txn = TxnRequest {
                compare: vec![Compare {
                    result: compare::CompareResult::Equal as i32,
                    target: compare::CompareTarget::Mod as i32,
                    key: self.f.head.clone(),
                    target_union: Some(compare::TargetUnion::ModRevision(head_rev)),
                }],
                success: vec![
                    put(self.f.head.clone(), last_seq.to_be_bytes().to_vec()),
                    put(log_key.clone(), value.clone()),
                ],
                // The head that moved, and what sits under our group's key:
                // after a reply lost on the way, a retry finds its own group.
                failure: [self.f.head.clone(), log_key]
                    .map(|key| RequestOp {
                        request: Some(request_op::Request::RequestRange(RangeRequest { key, ..Default::default() })),
                    })
                    .into(),
            };
            let t0 = Instant::now();
            let sent = self.send(txn);
            metrics::histogram!(crate::metrics::ETCD_TXN).record(t0.elapsed().as_secs_f64());
            let resp = match sent {
                Ok(Ok(r)) => r,
                Ok(Err(s)) => {
                    let e = unavailable("a transaction failed", s.message());
                    *shared.degraded.lock() = Some(e.to_string());
                    return refuse_all(ops, &e);
                }
                Err(_) => {
                    let e = StoreError::Unavailable(format!(
                        "etcd did not answer within {} s; the write may or may not have been applied, retry it",
                        REQUEST_TIMEOUT.as_secs()
                    ));
                    return refuse_all(ops, &e);
                }
            };
            let mut rev = resp.header.as_ref().map_or(0, |h| h.revision);
            let found = |i: usize| {
                resp.responses.get(i).and_then(|r| match &r.response {
                    Some(crate::etcdpb::response_op::Response::ResponseRange(rr)) => rr.kvs.first(),
                    _ => None,
                })
            };
            let ours = found(1).filter(|kv| kv.value == value).map(|kv| kv.mod_revision);
            if let Some(at) = ours.filter(|_| !resp.succeeded) {
                // A try whose reply was lost committed our group already.
                rev = at;
            } else if !resp.succeeded {
                // Another node's group came first: wait until the watch has
                // applied it, then build ours again on top of it.
                let theirs = found(0).map(|k| k.mod_revision).unwrap_or(rev);
                if !self.wait_seen(theirs) {
                    let e = unavailable("following the log", "this node's watch is behind");
                    return refuse_all(ops, &e);
                }
                continue;
            }
            // Committed: answer once this node sees it.
            if !self.wait_seen(rev) {
                let e = StoreError::Unavailable(
                    "the write is committed in etcd but this node's watch has not shown it yet; it will appear shortly"
                        .into(),
                );
                return refuse_all(ops, &e);
            }
            for (op, (_, out)) in ops.into_iter().zip(planned) {
                answer(op, out, &shared);
            }
            self.written += value_len;
            let behind = {
                let a = self.f.applied.lock();
                a.seq - a.snap_seq
            };
            if behind >= SNAPSHOT_EVERY || self.written >= SNAPSHOT_BYTES {
                self.written = 0;
                if let Err(e) = self.snapshot() {
                    tracing::warn!(error = %e, "etcd snapshot not written; the log keeps growing until the next");
                }
            }
            return;
        }
        let e = unavailable("committing", "too many concurrent writers; retry");
        refuse_all(ops, &e);
    }

    /// Writes a snapshot of the index as this node has applied it, then
    /// points `P snap` at it and deletes the log it covers and the snapshot
    /// before, in one transaction.
    fn snapshot(&mut self) -> Result<(), String> {
        let started = Instant::now();
        let (bytes, seq, known) = {
            let index = self.f.shared.index.read();
            let a = self.f.applied.lock();
            (snapshot::encode(a.seq, &index, &a.ids, &a.deleted_last), a.seq, a.snap_rev)
        };
        let dir = [self.f.snaps.as_slice(), format!("{seq:016x}-{:016x}/", self.nonce).as_bytes()].concat();
        let put = |key: Vec<u8>, value: Vec<u8>| RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest { key, value, ..Default::default() })),
        };
        let chunks: Vec<&[u8]> = bytes.chunks(MAX_GROUP_BYTES).collect();
        for (i, c) in chunks.iter().enumerate() {
            let key = [dir.as_slice(), format!("{i:04x}").as_bytes()].concat();
            self.txn(TxnRequest { success: vec![put(key, c.to_vec())], ..Default::default() })?;
        }
        let del = |key: Vec<u8>, range_end: Vec<u8>| RequestOp {
            request: Some(request_op::Request::RequestDeleteRange(DeleteRangeRequest {
                key,
                range_end,
                prev_kv: false,
            })),
        };
        let mut pointer = seq.to_be_bytes().to_vec();
        pointer.extend_from_slice(&(chunks.len() as u32).to_be_bytes());
        pointer.extend_from_slice(&self.nonce.to_be_bytes());
        let log_end = [self.f.log.as_slice(), format!("{:016x}", seq + 1).as_bytes()].concat();
        // Only over the snapshot this node knows: two nodes snapshotting at
        // once must not point back to an older one after the log it needs
        // was cut. The loser removes its own chunks, and only those.
        let txn = TxnRequest {
            compare: vec![Compare {
                result: compare::CompareResult::Equal as i32,
                target: compare::CompareTarget::Mod as i32,
                key: self.f.snap.clone(),
                target_union: Some(compare::TargetUnion::ModRevision(known)),
            }],
            success: vec![
                put(self.f.snap.clone(), pointer),
                del(self.f.log.clone(), log_end),
                // Older snapshots (and any a crash left) sort before this one.
                del(self.f.snaps.clone(), dir.clone()),
            ],
            failure: vec![del(dir.clone(), prefix_end(&dir))],
        };
        if !self.txn(txn)? {
            tracing::info!(seq, "another node wrote a snapshot first; this one is dropped");
            return Ok(());
        }
        tracing::info!(seq, bytes = bytes.len(), ms = started.elapsed().as_millis() as u64, "etcd snapshot written");
        Ok(())
    }

    /// Sends one transaction, each try bounded by `REQUEST_TIMEOUT`; a
    /// member that is down answers at once, so up to three more tries go to
    /// the others.
    fn send(&self, req: TxnRequest) -> Result<Result<TxnResponse, tonic::Status>, tokio::time::error::Elapsed> {
        let mut kv = self.kv.clone();
        self.rt.block_on(async move {
            let mut tries = 0;
            loop {
                match tokio::time::timeout(REQUEST_TIMEOUT, kv.txn(req.clone())).await {
                    Ok(Err(s)) if s.code() == tonic::Code::Unavailable && tries < 3 => {
                        tries += 1;
                        tokio::time::sleep(Duration::from_millis(50 * tries)).await;
                    }
                    other => return other.map(|r| r.map(tonic::Response::into_inner)),
                }
            }
        })
    }

    /// One transaction; whether its comparisons held.
    fn txn(&self, req: TxnRequest) -> Result<bool, String> {
        match self.send(req) {
            Ok(Ok(r)) => Ok(r.succeeded),
            Ok(Err(s)) => Err(s.message().to_owned()),
            Err(_) => Err("etcd did not answer in time".into()),
        }
    }

    /// Waits (bounded) until this node's watch has applied revision `rev`.
    fn wait_seen(&self, rev: i64) -> bool {
        let mut seen = self.f.seen.subscribe();
        self.rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), seen.wait_for(|r| *r >= rev)).await.is_ok_and(|r| r.is_ok())
        })
    }
}

impl IndexedStore {
    /// Connects to etcd, loads the log into the index, starts the watch and
    /// the writer. Fails (naming the endpoints) if etcd cannot be read.
    pub fn open_etcd(opts: EtcdOptions) -> Result<Self, StoreError> {
        let started = Instant::now();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("blotcdn-etcd")
            .enable_all()
            .build()?;
        let endpoints = opts
            .endpoints
            .iter()
            .map(|u| {
                Endpoint::from_shared(u.clone())
                    .map(|e| {
                        e.connect_timeout(Duration::from_secs(2))
                            .tcp_nodelay(true)
                            .http2_keep_alive_interval(Duration::from_secs(5))
                            .keep_alive_timeout(Duration::from_secs(3))
                            .keep_alive_while_idle(true)
                    })
                    .map_err(|e| StoreError::Unavailable(format!("etcd endpoint {u}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let channel = {
            let _guard = rt.enter();
            Channel::balance_list(endpoints.into_iter())
        };
        let prefix = opts.prefix.into_bytes();
        let with = |s: &[u8]| [prefix.as_slice(), s].concat();
        let (seen, _) = watch::channel(0);
        let f = Arc::new(Follower {
            shared: Arc::new(Shared {
                failed: Mutex::default(),
                degraded: Mutex::default(),
                index: parking_lot::RwLock::new(Index::default()),
                pending_refs: Mutex::default(),
                queued: Default::default(),
                local_gc: Mutex::default(),
            }),
            applied: Mutex::default(),
            seen,
            head: with(b"head"),
            log: with(b"log/"),
            snap: with(b"snap"),
            snaps: with(b"snap/"),
            watching: true.into(),
        });
        // Snapshot chunks are up to 1 MiB, two to a page.
        let mut kv = KvClient::new(channel.clone()).max_decoding_message_size(MAX_RESPONSE);
        // A member just started, or a leader election, fails a request or
        // two: tried again for up to 10 s before the start gives up.
        let loaded = rt.block_on(async {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                let e = match tokio::time::timeout_at(deadline, f.load(&mut kv)).await {
                    Ok(Ok(l)) => return Ok(l),
                    Ok(Err(e)) => e,
                    Err(_) => "no answer within 10 s".to_owned(),
                };
                if tokio::time::Instant::now() + Duration::from_millis(200) >= deadline {
                    return Err(e);
                }
                tracing::warn!(error = %e, "loading from etcd failed; trying again");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        let (index, applied, rev) = loaded.map_err(|e| {
            StoreError::Unavailable(format!("cannot load from etcd at {}: {e}", opts.endpoints.join(",")))
        })?;
        let paths: usize = index.blogs.values().map(|b| b.paths.len()).sum();
        tracing::info!(
            blogs = index.blogs.len(),
            paths,
            records = applied.seq,
            revision = rev,
            total_ms = started.elapsed().as_millis() as u64,
            "store open (etcd)"
        );
        *f.shared.index.write() = index;
        *f.applied.lock() = applied;
        f.seen.send_replace(rev);
        let wc = WatchClient::new(channel).max_decoding_message_size(MAX_RESPONSE);
        rt.spawn(f.clone().follow(kv.clone(), wc));
        rt.spawn(f.clone().probe(kv.clone()));
        let (tx, rx) = std::sync::mpsc::channel();
        let shared = f.shared.clone();
        let nonce = {
            use std::hash::{BuildHasher, Hasher};
            std::collections::hash_map::RandomState::new().build_hasher().finish()
        };
        let writer = Writer { written: 0, nonce, tries: 0, f, kv, rt: rt.handle().clone() };
        let handle = std::thread::Builder::new().name("blotcdn-writer".into()).spawn(move || {
            writer.run(rx);
            // The watch and the connections end with the writer.
            rt.shutdown_background();
        })?;
        Ok(IndexedStore { shared, queue: Mutex::new(Some(tx)), writer: Mutex::new(Some(handle)) })
    }
}
