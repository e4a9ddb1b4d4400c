//! Cluster mode: the metadata lives in etcd, and every node keeps the same
//! in-memory index, so reads stay memory-only (DESIGN.md, "Cluster mode").
//!
//! etcd holds a log of write groups under the prefix `P` (`etcd_prefix`):
//! - `P head`: the sequence number of the last record written (u64 BE);
//! - `P log/{seq:016x}`: one group of records, `seq` its first: the writer's
//!   nonce and a count of its tries (u64 BE each, so no two tries' values
//!   are equal, even of the same records), then the records encoded and
//!   checked as the write-ahead log encodes them ([`wal::encode_group`]);
//!   or, for a group too large for one etcd request (a batch of long paths,
//!   the deletion of a blog with tens of thousands of assets), [`PART_MARK`],
//!   the part count (u32 BE), the length (u64 BE) and the BLAKE3 hash of
//!   those records, which are in
//! - `P part/{seq:016x}-{nonce:016x}-{tries:016x}/{i:08x}`: up to 1 MiB
//!   each, written (each its own request) before the group that names them
//!   is committed. Nothing reads them until it is; the parts of a try that
//!   lost the race are deleted by their writer, and a snapshot deletes every
//!   part up to its record (those a crash left too);
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

use crate::domain::{CacheId, ContentHash};
use crate::etcdpb::{
    compare, kv_client::KvClient, maintenance_client::MaintenanceClient, request_op, watch_client::WatchClient,
    watch_request, Compare, DeleteRangeRequest, PutRequest, RangeRequest, RangeResponse, RequestOp, TxnRequest,
    TxnResponse, WatchCreateRequest, WatchProgressRequest, WatchRequest,
};
use crate::store::index::{FastMap, Index};
use crate::store::sled_store::{IndexedStore, Shared};
use crate::store::snapshot;
use crate::store::wal::{self, Rec};
use crate::store::writer::{build, Ids, Op};
use crate::store::StoreError;

mod commit;
mod follow;

use commit::Writer;

/// One etcd request at most this long at one member; past it the request
/// goes to the next member (a member stopped, in a long pause or cut off
/// still takes connections: its requests never fail, they hang).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// A small transaction answered after this long has the next one go to the
/// next member (see `commit::send_tries`).
const SLOW_ANSWER: Duration = Duration::from_secs(1);
/// A group's value at most (etcd refuses requests past 1.5 MiB by default);
/// a larger one is written in parts of this size.
const MAX_GROUP_BYTES: usize = 1 << 20;

/// A snapshot pointer (`P snap`): its record (8 bytes), its number of
/// chunks (4) and its writer's nonce (8).
const POINTER_LEN: usize = 20;
/// Where a group's records would start, a group written in parts has this:
/// never the start of a record (whose first four bytes are its length).
const PART_MARK: [u8; 4] = [0xff; 4];
/// How long a large write's hold (`P hold`) holds other nodes' writes back
/// at most: long enough to write 16 MiB of parts.
const HOLD_MAX: Duration = Duration::from_secs(3);
/// How long holds are ignored after one was not let go within `HOLD_MAX`.
const HOLD_IGNORED: Duration = Duration::from_secs(30);
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
    /// About how large it is (its chunks of up to 1 MiB).
    snap_bytes: usize,
    /// The pointer's value (empty: none): put back should it be changed
    /// outside blotcdn, since no node could start on a pointer that names
    /// no snapshot.
    snap_ptr: Vec<u8>,
    /// The key of the last group applied, the revision it was written at
    /// and its writer's tag (nonce and try): still there, unchanged, unless
    /// etcd's history is another one (restored from a backup: revisions are
    /// numbered again from the backup's, so they can match) or a snapshot
    /// has cut it.
    last_group: Option<(Vec<u8>, i64, Vec<u8>)>,
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
    /// `P part/`, and the folders of parts seen (at load, then by the
    /// watch) of a try at the next record. Only their names are kept: a
    /// group written in parts reads them from etcd when it comes (parts put
    /// by hand for the next record used to be held in every node's memory
    /// until the log passed them, 155 MB seen).
    parts: Vec<u8>,
    pending_parts: Mutex<Folders>,
    /// `P hold`: a node writing a large group asks the others to hold back
    /// until it is committed. When this node's watch saw it put, and by whom
    /// (the writer's nonce).
    hold: Vec<u8>,
    hold_seen: Mutex<Option<(Instant, Vec<u8>)>>,
    /// `P alive`: what the probe writes (outside what the watch follows).
    alive: Vec<u8>,
    /// Folders of parts no group will name (their writer lost the race or
    /// died before its commit): deleted by this node's writer at its next
    /// write, not left for the next snapshot.
    orphans: Mutex<std::collections::BTreeSet<Vec<u8>>>,
    /// False while the watch is down (then writes would not be seen).
    watching: std::sync::atomic::AtomicBool,
    members: Members,
}

/// `prefix` and a record number as the keys spell it (16 hex digits, so that
/// they sort in order).
fn seq_key(prefix: &[u8], seq: u64) -> Vec<u8> {
    [prefix, format!("{seq:016x}").as_bytes()].concat()
}

/// Parts of large groups, by key: those of one group, read for it.
type Parts = std::collections::BTreeMap<Vec<u8>, Vec<u8>>;

/// Folders of parts (`P part/{seq}-{nonce}-{try}/`), by name.
type Folders = std::collections::BTreeSet<Vec<u8>>;

/// At most this many folders of parts of a try at the next record are
/// noted (a writer has one try at a time); more are left to the snapshot
/// that passes them.
const MAX_PENDING_FOLDERS: usize = 4096;

/// The folder of a group's parts: `parts` (`P part/`), the group's first
/// record as its log key spells it, and the writer's nonce and try.
fn parts_dir(parts: &[u8], seq_hex: &[u8], nonce: u64, tries: u64) -> Vec<u8> {
    [parts, seq_hex, format!("-{nonce:016x}-{tries:016x}/").as_bytes()].concat()
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

/// etcd's members, a connection each. Requests go to one member (the
/// last that answered); one that fails them as unavailable, or does not
/// answer within [`REQUEST_TIMEOUT`], hands them to the next, as etcd's own
/// client does. (A balanced channel over all of them kept picking a frozen
/// member: it still takes connections, and its requests only time out.)
pub(super) struct Members {
    urls: Vec<String>,
    kv: Vec<KvClient<Channel>>,
    watch: Vec<WatchClient<Channel>>,
    maintenance: Vec<MaintenanceClient<Channel>>,
    current: std::sync::atomic::AtomicUsize,
    /// The member in use, for the watch to follow when it changes.
    moved: watch::Sender<usize>,
}

impl Members {
    /// Connections (made when first used) to each of `urls`: must run
    /// inside the runtime that will use them.
    fn connect(urls: &[String]) -> Result<Members, StoreError> {
        let mut m = Members {
            urls: urls.to_vec(),
            kv: Vec::new(),
            watch: Vec::new(),
            maintenance: Vec::new(),
            current: 0.into(),
            moved: watch::channel(0).0,
        };
        for u in urls {
            let channel = Endpoint::from_shared(u.clone())
                .map_err(|e| StoreError::Unavailable(format!("etcd endpoint {u}: {e}")))?
                .connect_timeout(Duration::from_secs(2))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(5))
                .keep_alive_timeout(Duration::from_secs(3))
                .keep_alive_while_idle(true)
                .connect_lazy();
            // Snapshot chunks are up to 1 MiB, two to a page.
            m.kv.push(KvClient::new(channel.clone()).max_decoding_message_size(MAX_RESPONSE));
            m.watch.push(WatchClient::new(channel.clone()).max_decoding_message_size(MAX_RESPONSE));
            m.maintenance.push(MaintenanceClient::new(channel));
        }
        Ok(m)
    }

    /// The member in use: its number and a client.
    fn kv(&self) -> (usize, KvClient<Channel>) {
        let i = self.current.load(Ordering::Relaxed) % self.kv.len();
        (i, self.kv[i].clone())
    }

    fn watch(&self) -> (usize, WatchClient<Channel>) {
        let i = self.current.load(Ordering::Relaxed) % self.watch.len();
        (i, self.watch[i].clone())
    }

    fn maintenance(&self) -> (usize, MaintenanceClient<Channel>) {
        let i = self.current.load(Ordering::Relaxed) % self.maintenance.len();
        (i, self.maintenance[i].clone())
    }

    /// Member `i` failed a request: the next is used from now on (unless
    /// another caller moved on already).
    fn failed(&self, i: usize, why: &str) {
        let next = (i + 1) % self.kv.len();
        if self.kv.len() > 1 && self.current.compare_exchange(i, next, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            tracing::warn!(member = %self.urls[i], next = %self.urls[next], why, "etcd member not answering; using the next");
            self.moved.send_replace(next);
        }
    }

    /// Tries for one request: each member once, and at least twice.
    fn tries(&self) -> usize {
        self.kv.len().max(2)
    }
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("etcd is unavailable ({what}: {e}); nothing was written, retry shortly"))
}

/// The folders of a prefix that hold its log, its parts and its snapshots.
const FOLDERS: [&[u8]; 3] = [b"log/", b"part/", b"snap/"];

/// Refuses a prefix that lies among another cluster's keys (under its
/// `log/`, `part/` or `snap/`, where that cluster has a `head`), and one
/// with another cluster's keys among its own (a `head` under its `log/`,
/// `part/` or `snap/`, before the first key it writes there: a cluster
/// started inside this one before this one wrote): each would take the
/// other's keys for its own, or for damage.
async fn inside_another(kv: &mut KvClient<Channel>, prefix: &[u8]) -> Result<(), StoreError> {
    let shown = follow::shown;
    let unchecked = |e: String| StoreError::Unavailable(format!("cannot check etcd_prefix {:?}: {e}", shown(prefix)));
    for (i, _) in prefix.iter().enumerate().filter(|(_, b)| **b == b'/') {
        let (outer, rest) = prefix.split_at(i + 1);
        if !FOLDERS.iter().any(|d| rest.starts_with(d)) {
            continue;
        }
        let head = [outer, b"head"].concat();
        let req = RangeRequest { key: head.clone(), count_only: true, ..Default::default() };
        let found = follow::range(kv, req, "reading").await.map_err(|e| unchecked(e.to_string()))?;
        if found.count > 0 {
            return Err(StoreError::Failed(format!(
                "etcd_prefix {:?} lies among the keys of the cluster whose prefix is {:?} (it has {}): \
                 choose a prefix outside it",
                shown(prefix),
                shown(outer),
                shown(&head)
            )));
        }
    }
    for dir in FOLDERS {
        let dir = [prefix, dir].concat();
        // Keys under the folder that sort before any this cluster writes.
        let req = RangeRequest { key: dir.clone(), range_end: seq_key(&dir, 0), keys_only: true, ..Default::default() };
        let found = follow::range(kv, req, "reading").await.map_err(|e| unchecked(e.to_string()))?;
        if let Some(k) = found.kvs.iter().find(|k| k.key.ends_with(b"/head")) {
            return Err(StoreError::Failed(format!(
                "etcd_prefix {:?} holds another cluster's keys (its {}): choose prefixes apart",
                shown(prefix),
                shown(&k.key)
            )));
        }
    }
    Ok(())
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
        let members = {
            let _guard = rt.enter();
            Members::connect(&opts.endpoints)?
        };
        let prefix = opts.prefix.into_bytes();
        let with = |s: &[u8]| [prefix.as_slice(), s].concat();
        let (seen, _) = watch::channel(0);
        let f = Arc::new(Follower {
            shared: Arc::new(Shared::new(Index::default())),
            applied: Mutex::default(),
            seen,
            head: with(b"head"),
            log: with(b"log/"),
            snap: with(b"snap"),
            snaps: with(b"snap/"),
            parts: with(b"part/"),
            pending_parts: Mutex::default(),
            hold: with(b"hold"),
            hold_seen: Mutex::default(),
            alive: with(b"alive"),
            orphans: Mutex::default(),
            watching: true.into(),
            members,
        });
        // A member just started, or a leader election, fails a request or
        // two: tried again for up to 10 s before the start gives up. A load
        // takes as long as the log is long (each request has its own time
        // limit): it is not cut off (a fixed 10 s for the whole load kept a
        // node with a long log from ever starting again).
        let loaded = rt.block_on(async {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                let e = match f.load().await {
                    Ok(l) => return Ok(l),
                    // Read again, it reads the same.
                    Err(e @ follow::LoadError::Damaged(_)) => return Err(e.to_string()),
                    Err(follow::LoadError::Unreachable(e)) => e,
                };
                if tokio::time::Instant::now() + Duration::from_millis(200) >= deadline {
                    return Err(e);
                }
                tracing::warn!(error = %e, "loading from etcd failed; trying again");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        let (index, applied, rev) = loaded.map_err(|e| {
            // The endpoints are named by the caller's message.
            StoreError::Unavailable(format!("cannot load from etcd: {e}"))
        })?;
        rt.block_on(inside_another(&mut f.members.kv().1, &prefix))?;
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
        rt.spawn(f.clone().follow());
        rt.spawn(f.clone().probe());
        let shared = f.shared.clone();
        let nonce = {
            use std::hash::{BuildHasher, Hasher};
            std::collections::hash_map::RandomState::new().build_hasher().finish()
        };
        let writer = Writer {
            written: 0,
            nonce,
            tries: 0,
            holds_ignored_until: None,
            snapshotting: None,
            f,
            rt: rt.handle().clone(),
        };
        Ok(IndexedStore::start(shared, move |rx| {
            writer.run(rx);
            // The watch and the connections end with the writer.
            rt.shutdown_background();
        })?)
    }
}
