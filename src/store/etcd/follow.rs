//! Following etcd: the load at start (the snapshot, then the log after it,
//! at one revision), the watch that applies every node's groups, and the
//! probe that clears the health report once etcd answers again.

use super::*;
use crate::etcdpb::{alarm_request, AlarmRequest, AlarmType, KeyValue};

/// Every this many seconds the probe asks etcd for its alarms.
const ALARMS_EVERY: u64 = 5;

/// Why the log could not be loaded: etcd did not answer (worth trying
/// again), or what it holds cannot be read (it will not read better later).
#[derive(Debug)]
pub(super) enum LoadError {
    Unreachable(String),
    Damaged(String),
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoadError::Unreachable(e) => f.write_str(e),
            LoadError::Damaged(e) => write!(
                f,
                "{e}; etcd's data was changed outside blotcdn: restore it from a backup, or remove what does not belong"
            ),
        }
    }
}

/// A key's text, for messages.
pub(super) fn shown(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

/// Whether `b` is hex digits as this cluster's writers spell them (lower
/// case), at least one.
fn is_hex(b: &[u8]) -> bool {
    !b.is_empty() && b.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
}

/// The record number a key under `dir` (`P log/` or `P part/`) starts with,
/// if it is spelled as this cluster's writers spell it (16 hex digits).
fn key_seq(dir: &[u8], key: &[u8]) -> Option<u64> {
    let hex = key.strip_prefix(dir)?.get(..16).filter(|h| is_hex(h))?;
    u64::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()
}

/// The record number a log key names (`P log/{seq}`), if it is spelled as
/// the writers of this cluster spell one.
fn log_seq(log: &[u8], key: &[u8]) -> Option<u64> {
    (key.len() == log.len() + 16).then(|| key_seq(log, key)).flatten()
}

/// The record number of a part's group, if `key` is spelled as a writer
/// of this cluster spells a part: `P part/{seq}-{nonce}-{try}/{i}`, in 16,
/// 16, 16 and 8 hex digits (see [`parts_dir`]).
fn part_seq(parts: &[u8], key: &[u8]) -> Option<u64> {
    let rest = key.strip_prefix(parts)?;
    let shaped = rest.len() == 16 + 1 + 16 + 1 + 16 + 1 + 8
        && [&rest[..16], &rest[17..33], &rest[34..50], &rest[51..]].into_iter().all(is_hex)
        && (rest[16], rest[33], rest[50]) == (b'-', b'-', b'/');
    shaped.then(|| key_seq(parts, key)).flatten()
}

/// The record a snapshot pointer (`P snap`) names: its first 8 bytes.
fn pointer_seq(value: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(value.get(..8)?.try_into().expect("8")))
}

/// Warns of a key under the prefix that no writer of this cluster wrote
/// (at most once a second): it is left alone.
fn foreign(key: &[u8], why: &str) {
    static WARNED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    if crate::telemetry::once_a_second(&WARNED) {
        tracing::warn!(key = %shown(key), why, "an etcd key under the prefix that this cluster did not write; ignored");
    }
}

/// One range request, bounded by `REQUEST_TIMEOUT`.
pub(super) async fn range(
    kv: &mut KvClient<Channel>,
    req: RangeRequest,
    what: &str,
) -> Result<RangeResponse, LoadError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, kv.range(req)).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(LoadError::Unreachable(format!("{what}: {}", s.message()))),
        Err(_) => Err(LoadError::Unreachable(format!("{what}: no answer within {} s", REQUEST_TIMEOUT.as_secs()))),
    }
}

/// The keys in `[key, end)` as of revision `rev`, in key order, read
/// `limit` to a request (a page at a time: see [`Pages::next`]).
struct Pages {
    req: Option<RangeRequest>,
}

impl Pages {
    fn new(key: Vec<u8>, end: Vec<u8>, limit: i64, rev: i64, keys_only: bool) -> Pages {
        Pages { req: Some(RangeRequest { key, range_end: end, limit, revision: rev, keys_only, ..Default::default() }) }
    }

    /// The next page; `None` once every key is read.
    async fn next(&mut self, kv: &mut KvClient<Channel>, what: &str) -> Result<Option<Vec<KeyValue>>, LoadError> {
        let Some(req) = self.req.take() else { return Ok(None) };
        let resp = range(kv, req.clone(), what).await?;
        if let Some(last) = resp.kvs.last().filter(|_| resp.more) {
            let mut key = last.key.clone();
            key.push(0);
            self.req = Some(RangeRequest { key, ..req });
        }
        Ok(Some(resp.kvs))
    }
}

/// Reads the keys of `pages`, handing each to `each` in key order.
async fn pages(
    kv: &mut KvClient<Channel>,
    mut pages: Pages,
    what: &str,
    mut each: impl FnMut(&KeyValue) -> Result<(), LoadError>,
) -> Result<(), LoadError> {
    while let Some(page) = pages.next(kv, what).await? {
        page.iter().try_for_each(&mut each)?;
    }
    Ok(())
}

/// What a group written in parts names: the folder of its parts, how many
/// there are, and their length and hash together.
struct Named<'v> {
    dir: Vec<u8>,
    n: u32,
    len: usize,
    hash: &'v [u8],
}

/// What the group under `key` names, if it is written in parts (`None`:
/// its records are in its value).
fn named<'v>(parts_prefix: &[u8], log_prefix: &[u8], key: &[u8], value: &'v [u8]) -> Result<Option<Named<'v>>, String> {
    let body = value.get(16..).ok_or("a log group without its writer's nonce")?;
    if body.get(..4) != Some(&PART_MARK[..]) {
        return Ok(None);
    }
    let (Some(n), Some(len), Some(hash)) = (body.get(4..8), body.get(8..16), body.get(16..48)) else {
        return Err("a log group's list of parts is cut short".into());
    };
    let nonce = u64::from_be_bytes(value[..8].try_into().expect("8"));
    let tries = u64::from_be_bytes(value[8..16].try_into().expect("8"));
    let seq_hex = key.get(log_prefix.len()..).unwrap_or_default();
    Ok(Some(Named {
        dir: parts_dir(parts_prefix, seq_hex, nonce, tries),
        n: u32::from_be_bytes(n.try_into().expect("4")),
        len: u64::from_be_bytes(len.try_into().expect("8")) as usize,
        hash,
    }))
}

/// Reads from etcd, as of revision `rev`, the parts `g` names: no key past
/// the last it names, none of another shape, and no more bytes than it
/// says they hold (what is past that is dropped, and the group then reads
/// as damaged).
async fn fetch(kv: &mut KvClient<Channel>, g: &Named<'_>, rev: i64) -> Result<Parts, LoadError> {
    let (mut parts, mut bytes) = (Parts::new(), 0);
    let end = [g.dir.as_slice(), format!("{:08x}", g.n).as_bytes()].concat();
    // Up to 1 MiB each: one to a request, each with its own time limit.
    pages(kv, Pages::new(g.dir.clone(), end, 1, rev, false), "reading a large group's parts", |p| {
        if p.key.len() != g.dir.len() + 8 {
            return Ok(());
        }
        bytes += p.value.len();
        if bytes <= g.len {
            parts.insert(p.key.clone(), p.value.clone());
        }
        Ok(())
    })
    .await?;
    Ok(parts)
}

/// Whether a read failed because the revision it was at was compacted
/// (etcd's `ErrCompacted`, whose text its clients match too).
fn compacted(e: &LoadError) -> bool {
    matches!(e, LoadError::Unreachable(m) if m.contains("required revision has been compacted"))
}

/// A group's records, and the folder of the parts they were gathered from.
type Gathered<'v> = (std::borrow::Cow<'v, [u8]>, Option<Vec<u8>>);

/// The records of the group under `key`: in its value, or gathered (and
/// taken) from the `parts` read for it, checked against its length and
/// hash; and the folder of those parts.
fn records<'v>(
    parts_prefix: &[u8],
    log_prefix: &[u8],
    key: &[u8],
    value: &'v [u8],
    parts: &mut Parts,
) -> Result<Gathered<'v>, String> {
    let Some(Named { dir, n, len, hash }) = named(parts_prefix, log_prefix, key, value)? else {
        return Ok((value[16..].into(), None));
    };
    let mut out = Vec::with_capacity(len.min(1 << 30));
    for i in 0..n {
        let part = parts
            .remove(&[dir.as_slice(), format!("{i:08x}").as_bytes()].concat())
            .ok_or_else(|| format!("part {i} of {n} of a log group is missing"))?;
        out.extend_from_slice(&part);
    }
    if out.len() != len || blake3::hash(&out).as_bytes()[..] != hash[..] {
        return Err(format!("the parts of a log group ({} bytes) are not the {len} bytes it names", out.len()));
    }
    Ok((out.into(), Some(dir)))
}

/// The folder a part's key is in: up to its last slash.
fn folder(key: &[u8]) -> Option<&[u8]> {
    key.iter().rposition(|b| *b == b'/').map(|end| &key[..=end])
}

impl Follower {
    /// Applies one group (a `log/` key and value, written at revision `rev`),
    /// the next in the log, to the index and the ids, and notes it as the
    /// last group applied: its key must name the record after the last one
    /// applied, and its records must follow from there. Nothing of a group
    /// that fails is applied. A group written in parts finds them in
    /// `parts`, and takes their folder out of `folders` (they are not
    /// orphans).
    #[allow(clippy::too_many_arguments)]
    fn apply_group(
        &self,
        index: &mut Index,
        a: &mut Applied,
        key: &[u8],
        value: &[u8],
        rev: i64,
        parts: &mut Parts,
        folders: &mut Folders,
    ) -> Result<(), String> {
        let damaged = |why: &str| format!("the log group under etcd key {} {why}", shown(key));
        let next = a.seq + 1;
        if log_seq(&self.log, key) != Some(next) {
            return Err(damaged(&format!("is not record {next}, the next in the log")));
        }
        let (recs, dir) = records(&self.parts, &self.log, key, value, parts)
            .map_err(|why| damaged(&format!("cannot be read: {why}")))
            .and_then(|(b, dir)| {
                Ok((wal::decode_group(&b).ok_or_else(|| damaged("is damaged (its records do not decode)"))?, dir))
            })?;
        if recs.is_empty() || recs.iter().enumerate().any(|(i, (seq, _))| *seq != next + i as u64) {
            return Err(damaged(&format!("does not hold records from {next} on")));
        }
        for (seq, rec) in &recs {
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
            a.seq = *seq;
        }
        if let Some(dir) = dir {
            folders.remove(&dir);
        }
        // Its writer's tag: `records` found the value holds one.
        a.last_group = Some((key.to_vec(), rev, value[..16].to_vec()));
        Ok(())
    }

    /// Takes out of `folders` those of records up to `seq`, which no group
    /// can name any more (the group of that record is applied, and took its
    /// own folder out), and notes them for this node's writer to delete.
    fn orphan_parts(&self, folders: &mut Folders, seq: u64) {
        let rest = folders.split_off(&seq_key(&self.parts, seq + 1));
        let passed = std::mem::replace(folders, rest);
        self.orphans.lock().extend(passed);
    }

    /// [`Follower::load_from`] the member in use; one that does not answer
    /// hands the next load to the next member.
    pub(super) async fn load(&self) -> Result<(Index, Applied, i64), LoadError> {
        let (i, mut kv) = self.members.kv();
        let loaded = self.load_from(&mut kv).await;
        if let Err(LoadError::Unreachable(e)) = &loaded {
            self.members.failed(i, e);
        }
        loaded
    }

    /// Reads the whole log at one revision, a page at a time, into a fresh
    /// index. Returns the revision it was read at. Keys under the prefix
    /// that are not this cluster's log (not the next group) are left alone;
    /// whole groups past `head` are read (the head was put back by hand); a
    /// log that is not whole up to `head`, or a group up to it that cannot
    /// be read, is [`LoadError::Damaged`].
    async fn load_from(&self, kv: &mut KvClient<Channel>) -> Result<(Index, Applied, i64), LoadError> {
        let (mut index, mut a) = (Index::default(), Applied::default());
        // The snapshot pointer fixes the revision every later read is at.
        let req = RangeRequest { key: self.snap.clone(), ..Default::default() };
        let resp = range(kv, req, "loading").await?;
        let rev = resp.header.as_ref().map_or(0, |h| h.revision);
        // The head: the last record written, and when.
        let req = RangeRequest { key: self.head.clone(), revision: rev, ..Default::default() };
        let resp_head = range(kv, req, "loading the head").await?;
        let head = match resp_head.kvs.first() {
            None => 0,
            Some(h) => {
                a.head_rev = h.mod_revision;
                match h.value.as_slice().try_into() {
                    Ok(b) => u64::from_be_bytes(b),
                    Err(_) => return Err(LoadError::Damaged(format!("etcd key {} is damaged", shown(&self.head)))),
                }
            }
        };
        // No head, and a snapshot or a group: the head was deleted (by hand).
        // Read on, the log would look empty, and the next write would take
        // record 1 again over the group there.
        let headless = || {
            LoadError::Damaged(format!(
                "etcd key {} is missing, but the log holds groups (it was deleted outside blotcdn)",
                shown(&self.head)
            ))
        };
        let mut key = self.log.clone();
        if let Some(p) = resp.kvs.first() {
            if resp_head.kvs.is_empty() {
                return Err(headless());
            }
            let v = &p.value;
            let damaged = |why: String| LoadError::Damaged(format!("etcd key {}: {why}", shown(&self.snap)));
            let (Some(seq), Some(n), Some(nonce)) = (v.get(..8), v.get(8..12), v.get(12..20)) else {
                return Err(damaged("a damaged snapshot pointer".into()));
            };
            let seq = u64::from_be_bytes(seq.try_into().expect("8"));
            let n = u32::from_be_bytes(n.try_into().expect("4")) as usize;
            let nonce = u64::from_be_bytes(nonce.try_into().expect("8"));
            let (mut bytes, mut got) = (Vec::new(), 0);
            let dir = [self.snaps.as_slice(), format!("{seq:016x}-{nonce:016x}/").as_bytes()].concat();
            let end = prefix_end(&dir);
            // Chunks are up to 1 MiB: two to a page.
            pages(kv, Pages::new(dir, end, 2, rev, false), "loading the snapshot", |c| {
                bytes.extend_from_slice(&c.value);
                got += 1;
                Ok(())
            })
            .await?;
            if got != n {
                return Err(damaged(format!("snapshot {seq} has {got} of its {n} chunks")));
            }
            let (at, (i, ids, deleted_last)) =
                snapshot::decode(&bytes).map_err(|why| damaged(format!("snapshot {seq} is {why}")))?;
            if at != seq || seq > head {
                return Err(damaged(format!("snapshot {seq} holds record {at}, and the head is record {head}")));
            }
            index = i;
            a = Applied {
                ids,
                deleted_last,
                head_rev: a.head_rev,
                seq,
                snap_seq: seq,
                snap_rev: p.mod_revision,
                snap_bytes: bytes.len(),
                snap_ptr: v.clone(),
                last_group: None,
            };
            key = seq_key(&self.log, seq + 1);
        }
        // The folders of large groups' parts first (those of groups a
        // snapshot covers are gone with it), at the same revision, by name
        // only: those of the log's groups, and of a try at the next record.
        // Parts further on are no try's of this cluster: not noted.
        let mut folders = Folders::new();
        let (parts_start, parts_end) = (self.parts.clone(), prefix_end(&self.parts));
        pages(kv, Pages::new(parts_start, parts_end, 1024, rev, true), "loading the log's parts", |p| {
            match part_seq(&self.parts, &p.key).zip(folder(&p.key)) {
                Some((s, dir)) if s <= head + 1 => {
                    if !folders.contains(dir) {
                        folders.insert(dir.to_vec());
                    }
                }
                _ => foreign(&p.key, "a part of no group this cluster's writers could be writing"),
            }
            Ok(())
        })
        .await?;
        // A group written in parts reads them as it comes (one group's
        // parts in memory at a time).
        // The last whole group found past `head`, if any.
        let mut past_head = 0;
        let mut log = Pages::new(key, prefix_end(&self.log), PAGE, rev, false);
        while let Some(page) = log.next(kv, "loading the log").await? {
            for g in &page {
                let seq = log_seq(&self.log, &g.key);
                if resp_head.kvs.is_empty() && seq.is_some() {
                    return Err(headless());
                }
                let Some(seq) = seq.filter(|s| *s == a.seq + 1) else {
                    foreign(&g.key, "not the next group of the log");
                    continue;
                };
                let mut parts = match named(&self.parts, &self.log, &g.key, &g.value) {
                    Ok(Some(named)) => fetch(kv, &named, rev).await?,
                    _ => Parts::new(),
                };
                let applied =
                    self.apply_group(&mut index, &mut a, &g.key, &g.value, g.mod_revision, &mut parts, &mut folders);
                match applied {
                    Ok(()) if seq > head => {
                        // A writer puts its group and the head in one
                        // transaction, so a whole group past the head is
                        // one the head was put back below by hand (as a
                        // stale value, after it was deleted): acknowledged,
                        // and read on. The next write puts the head right;
                        // stopping here, it would go over these groups.
                        past_head = seq;
                    }
                    Ok(()) => {}
                    // Not a group of this log's next record (a key put by
                    // hand): left alone, as any other foreign key.
                    Err(_) if seq > head => foreign(&g.key, "past the head, and not the next group of the log"),
                    Err(e) => return Err(LoadError::Damaged(e)),
                }
            }
        }
        if past_head > 0 {
            tracing::warn!(
                head,
                last = past_head,
                "etcd key {} names record {head}, but the log holds whole groups up to record {past_head}: \
                 it was put back lower by hand; read to {past_head} (the next write puts the head right)",
                shown(&self.head)
            );
        }
        if a.seq < head {
            let missing = seq_key(&self.log, a.seq + 1);
            return Err(LoadError::Damaged(format!(
                "the log ends at record {}, but the head is record {head}: etcd key {} is missing",
                a.seq,
                shown(&missing)
            )));
        }
        // Parts of a try at the next record: the watch may bring its group.
        // Those the log has passed are orphans.
        self.orphan_parts(&mut folders, a.seq);
        while folders.len() > MAX_PENDING_FOLDERS {
            folders.pop_last();
        }
        *self.pending_parts.lock() = folders;
        Ok((index, a, rev))
    }

    /// Follows the log from `from` until the stream ends or fails; `seen`
    /// (everything up to it applied) moves as groups arrive.
    /// Ends as well once the member in use is no longer `member` (a request
    /// to it went unanswered: the watch on it may be stuck too).
    async fn watch_once(&self, wc: &mut WatchClient<Channel>, from: i64, member: usize) -> WatchEnd {
        let mut moved = self.members.moved.subscribe();
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
                _ = moved.wait_for(|m| *m != member) => return WatchEnd::Moved,
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
            // Back: what the watch being down reported is over. (What a
            // refused write reported is the probe's to clear.)
            if !self.watching.swap(true, Ordering::Relaxed) {
                self.shared.degraded.lock().take();
            }
            // The creation's header revision is etcd's current one, not a
            // promise that the events up to it were sent; but one below what
            // this node has seen says etcd went back (restored from a
            // backup): what this node applied past it is gone from etcd.
            // A watch reopened after etcd passed that revision again says
            // nothing by its revision: what this node applied last must
            // still be in etcd as it was.
            if msg.created {
                let now = msg.header.as_ref().map_or(i64::MAX, |h| h.revision);
                match self.history().await {
                    Some(true) if now >= from - 1 => continue,
                    // Checked again (the member may be behind): see `follow`.
                    Some(_) => return WatchEnd::Rewound(now),
                    None => return WatchEnd::Down("etcd's history could not be checked".into()),
                }
            }
            if let Some(top) = msg.events.iter().filter_map(|e| e.kv.as_ref()).map(|kv| kv.mod_revision).max() {
                // Applied as they come, so memory holds one fragment (and
                // the parts of one group).
                match self.apply_fetching(&msg.events).await {
                    Ok(()) => {}
                    // The group's revision is gone: the log is read again.
                    Err(e) if compacted(&e) => return WatchEnd::Compacted,
                    Err(e) => return WatchEnd::Down(e.to_string()),
                }
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

    /// Applies `events`, in order; a group written in parts (and with the
    /// head, see [`Follower::apply_events`]) has its parts read from etcd
    /// first, at its revision. An error: they could not be read (nothing
    /// from that group on is applied).
    async fn apply_fetching(&self, events: &[crate::etcdpb::Event]) -> Result<(), LoadError> {
        let mut from = 0;
        for (j, ev) in events.iter().enumerate() {
            let Some(kv) = ev.kv.as_ref().filter(|kv| ev.r#type == 0 && log_seq(&self.log, &kv.key).is_some()) else {
                continue;
            };
            let Ok(Some(named)) = named(&self.parts, &self.log, &kv.key, &kv.value) else { continue };
            // The events before it first: its head among them.
            self.apply_events(&events[from..j], &mut Parts::new());
            from = j;
            // Not written with the head, or applied already: passed over.
            let passed = {
                let a = self.applied.lock();
                kv.mod_revision != a.head_rev || a.last_group.as_ref().is_some_and(|g| kv.mod_revision <= g.1)
            };
            if passed {
                continue;
            }
            let (_, mut kv_client) = self.members.kv();
            let mut parts = fetch(&mut kv_client, &named, kv.mod_revision).await?;
            self.apply_events(&events[j..=j], &mut parts);
            from = j + 1;
        }
        self.apply_events(&events[from..], &mut Parts::new());
        Ok(())
    }

    /// Applies `events`, in order; the parts of a group among them written
    /// in parts are in `parts`.
    fn apply_events(&self, events: &[crate::etcdpb::Event], parts: &mut Parts) {
        if events.is_empty() {
            return;
        }
        let mut index = self.shared.index.write();
        let mut a = self.applied.lock();
        let mut folders = self.pending_parts.lock();
        for ev in events {
            let Some(kv) = &ev.kv else { continue };
            if kv.key == self.hold {
                *self.hold_seen.lock() = (ev.r#type == 0).then(|| (Instant::now(), kv.value.clone()));
                continue;
            }
            // A watch opened again from what it had seen whole brings again
            // the events of an answer it had begun to apply: nothing at or
            // before the last group applied is applied again (a part of a
            // group applied would be taken for an orphan and deleted).
            if a.last_group.as_ref().is_some_and(|g| kv.mod_revision <= g.1) {
                continue;
            }
            // The folders of parts are noted until their group comes, or
            // they are deleted: those of a try at the next record. A try
            // writes its parts after it has applied the log up to the head,
            // and this watch brings events in the order they were written,
            // so a part of a later record is no try's; one of a record
            // passed is an orphan.
            if kv.key.starts_with(&self.parts) {
                let Some(dir) = folder(&kv.key) else { continue };
                if ev.r#type != 0 {
                    // A try's parts are deleted all together.
                    folders.remove(dir);
                    continue;
                }
                match part_seq(&self.parts, &kv.key) {
                    Some(s) if s == a.seq + 1 => {
                        if !folders.contains(dir) && folders.len() < MAX_PENDING_FOLDERS {
                            folders.insert(dir.to_vec());
                        }
                    }
                    Some(s) if s <= a.seq => drop(self.orphans.lock().insert(dir.to_vec())),
                    _ => foreign(&kv.key, "a part of no group this cluster's writers could be writing"),
                }
                continue;
            }
            // Puts of the head, of log groups and of the snapshot pointer;
            // deletions are only cleanup.
            if ev.r#type != 0 {
                if kv.key == self.head {
                    // No write can be built on a head that is gone.
                    let e = format!(
                        "etcd key {} was deleted outside blotcdn; writes are refused until it is put back as it was \
                         (or etcd restored from a backup) and this node restarted",
                        shown(&self.head)
                    );
                    tracing::error!(error = %e, "etcd's head is gone; refusing writes");
                    *self.shared.failed.lock() = Some(e);
                } else if kv.key == self.snap && !a.snap_ptr.is_empty() {
                    // No writer deletes the pointer (a snapshot replaces it).
                    self.put_pointer_back(a.snap_ptr.clone(), 0, "deleted");
                }
                continue;
            }
            if kv.key == self.head {
                a.head_rev = kv.mod_revision;
            } else if kv.key.starts_with(&self.log) {
                // A group is written with the head, in one transaction (the
                // head first): a log key put without it is no writer's.
                if kv.mod_revision != a.head_rev {
                    foreign(&kv.key, "a log key written without the head");
                    continue;
                }
                let applied =
                    self.apply_group(&mut index, &mut a, &kv.key, &kv.value, kv.mod_revision, parts, &mut folders);
                self.orphan_parts(&mut folders, a.seq);
                if let Err(e) = applied {
                    // The index would part from etcd's: no write may be
                    // built on it. A restart reads the log again, and
                    // refuses to start while the group is there.
                    tracing::error!(error = %e, "etcd log group unreadable; refusing writes");
                    *self.shared.failed.lock() = Some(format!(
                        "{e}; etcd's data was changed outside blotcdn: writes are refused until it is restored \
                         from a backup and this node restarted"
                    ));
                }
            } else if kv.key == self.snap {
                // A writer's pointer names a later snapshot than the last,
                // of records this node has applied (they came first), in
                // chunks; or it is the last put back (below).
                let chunks = kv.value.get(8..12).map_or(0, |n| u32::from_be_bytes(n.try_into().expect("4")));
                let writers = kv.value.len() == POINTER_LEN
                    && pointer_seq(&kv.value).is_some_and(|seq| seq > a.snap_seq && seq <= a.seq)
                    && chunks > 0;
                if writers || kv.value == a.snap_ptr {
                    a.snap_seq = pointer_seq(&kv.value).expect("checked");
                    a.snap_rev = kv.mod_revision;
                    a.snap_bytes = chunks as usize * MAX_GROUP_BYTES;
                    a.snap_ptr = kv.value.clone();
                } else {
                    // No node could start on it: the one it replaced is put back.
                    self.put_pointer_back(a.snap_ptr.clone(), kv.mod_revision, "changed");
                }
            }
        }
    }

    /// Puts the snapshot pointer back as it was (`good`; empty: there was
    /// none, so the key is deleted) after it was changed or deleted outside
    /// blotcdn, unless it changed again since (revision `bad`; 0: deleted).
    /// Every node tries; the first one's transaction holds, the others'
    /// find the key moved.
    fn put_pointer_back(&self, good: Vec<u8>, bad: i64, how: &str) {
        tracing::error!(
            key = %shown(&self.snap),
            "etcd's snapshot pointer was {how} outside blotcdn (a node could fail to start on it, or load an older \
             snapshot); putting back the one the nodes wrote last"
        );
        let restore = match good.is_empty() {
            true => super::commit::del(self.snap.clone(), Vec::new()),
            false => super::commit::put(self.snap.clone(), good),
        };
        let txn = crate::etcdpb::TxnRequest {
            compare: vec![super::commit::unchanged_since(self.snap.clone(), bad)],
            success: vec![restore],
            ..Default::default()
        };
        let (_, mut kv) = self.members.kv();
        let snap = shown(&self.snap);
        tokio::spawn(async move {
            if let Err(e) = tokio::time::timeout(REQUEST_TIMEOUT, kv.txn(txn))
                .await
                .map_err(|_| "no answer".to_string())
                .and_then(|r| r.map_err(|s| s.message().to_string()))
            {
                tracing::error!(key = %snap, error = %e, "the snapshot pointer could not be put back; put it back by hand, or restore etcd from a backup");
            }
        });
    }

    /// Keeps the index current for as long as the store lives: a watch from
    /// the revision after the last one applied, opened again when it ends.
    /// The watch is on the member in use; one whose watch fails hands the
    /// next to the next member.
    pub(super) async fn follow(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let from = *self.seen.borrow() + 1;
            let (i, mut wc) = self.members.watch();
            match self.watch_once(&mut wc, from, i).await {
                // Opened again at once, on the member now in use.
                WatchEnd::Moved => continue,
                // A member behind the others (just restarted, catching up)
                // also answers with an older revision; a linearizable read
                // (the leader's) tells the two apart. Only etcd as a whole
                // going back is a restore.
                WatchEnd::Rewound(_) if !self.restored(from - 1).await => {
                    self.members.failed(i, "its revision is behind what this node has seen");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                end @ (WatchEnd::Compacted | WatchEnd::Rewound(_)) => {
                    match end {
                        WatchEnd::Rewound(now) => tracing::warn!(
                            seen = from - 1,
                            now,
                            "etcd's revision went back (restored from a backup?); reloading the log"
                        ),
                        _ => tracing::warn!(from, "the etcd revisions to follow were compacted; reloading the log"),
                    }
                    match self.load().await {
                        Ok((index, a, rev)) => {
                            let mut i = self.shared.index.write();
                            *i = index;
                            *self.applied.lock() = a;
                            self.seen.send_replace(rev);
                        }
                        Err(LoadError::Unreachable(e)) => self.down(&e),
                        Err(e @ LoadError::Damaged(_)) => {
                            tracing::error!(error = %e, "etcd's log cannot be read; refusing writes");
                            *self.shared.failed.lock() = Some(format!("{e}; then restart this node"));
                        }
                    }
                }
                WatchEnd::Down(e) => {
                    self.members.failed(i, &e);
                    self.down(&e)
                }
            }
            if *self.seen.borrow() >= from {
                backoff = Duration::from_millis(100);
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Whether etcd was restored from a backup: its history is another one
    /// than this node applied, or (a backup that holds every group this
    /// node applied) etcd as a whole, by a linearizable read, is below
    /// revision `seen`: a watch from `seen` on would miss what is written
    /// between. Not so for one member behind the others. False when etcd
    /// does not answer: nothing is reloaded on a guess.
    async fn restored(&self, seen: i64) -> bool {
        match self.history().await {
            Some(false) => true,
            None => false,
            Some(true) => {
                let (_, mut kv) = self.members.kv();
                let req = RangeRequest { key: self.head.clone(), count_only: true, ..Default::default() };
                let now = range(&mut kv, req, "reading etcd's revision").await.ok().and_then(|r| r.header);
                now.is_some_and(|h| h.revision < seen)
            }
        }
    }

    /// Whether etcd (a linearizable read: the leader's, whichever member
    /// answers) still holds what this node applied last as it was: its
    /// last group's key at the revision it saw, or a later snapshot that cut
    /// it. Not so after a restore from a backup taken before it. `None`:
    /// etcd did not answer (nothing is reloaded on a guess).
    async fn history(&self) -> Option<bool> {
        let (last, snap_rev, seq) = {
            let a = self.applied.lock();
            (a.last_group.clone(), a.snap_rev, a.seq)
        };
        let (key, rev, tag) = match last {
            Some(last) => last,
            None if snap_rev > 0 => (self.snap.clone(), snap_rev, Vec::new()),
            None => return Some(true),
        };
        let (_, mut kv) = self.members.kv();
        let read = |key: Vec<u8>| RangeRequest { key, ..Default::default() };
        let r = range(&mut kv, read(key.clone()), "checking etcd's history").await.ok()?;
        Some(match r.kvs.first() {
            Some(kv) if kv.mod_revision == rev && kv.value.starts_with(&tag) => true,
            // A later snapshot, past what this node applied.
            Some(kv) if key == self.snap => pointer_seq(&kv.value).is_some_and(|s| s >= seq),
            // The key holds another group: another history.
            Some(_) => false,
            None => {
                let r = range(&mut kv, read(self.snap.clone()), "checking etcd's history").await.ok()?;
                r.kvs.first().and_then(|kv| pointer_seq(&kv.value)).is_some_and(|s| s >= seq)
            }
        })
    }

    /// While a failure is reported but the watch is up: writes a small key
    /// (`P alive`, outside what the watch follows) every second, and clears
    /// the report once one gets in. A read would not do: etcd out of space
    /// still answers reads, and refuses every write. While nothing is
    /// reported, asks etcd for its alarms every few seconds: a node that
    /// has not tried a write since etcd ran out of space would report
    /// itself healthy, and take writes it can only refuse.
    pub(super) async fn probe(self: Arc<Self>) {
        for tick in 1u64.. {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if !self.watching.load(Ordering::Relaxed) {
                continue;
            }
            if self.shared.degraded.lock().is_none() {
                if tick % ALARMS_EVERY == 0 {
                    if let Some(e) = self.alarm().await {
                        tracing::warn!(error = %e, "etcd refuses writes");
                        // Unless something else was reported meanwhile.
                        self.shared.degraded.lock().get_or_insert_with(|| e.to_string());
                    }
                }
                continue;
            }
            let (i, mut kv) = self.members.kv();
            let req =
                TxnRequest { success: vec![commit::put(self.alive.clone(), b"1".to_vec())], ..Default::default() };
            match tokio::time::timeout(Duration::from_secs(1), kv.txn(req)).await {
                Ok(Ok(_)) => {
                    if self.watching.load(Ordering::Relaxed) {
                        self.shared.degraded.lock().take();
                    }
                }
                Ok(Err(s)) if s.code() == tonic::Code::Unavailable => self.members.failed(i, s.message()),
                // Refused (out of space): the same at any member.
                Ok(Err(_)) => {}
                Err(_) => self.members.failed(i, "no answer in time"),
            }
        }
    }

    /// What etcd's alarm list says of writes: NOSPACE and CORRUPT each
    /// make it refuse them. `None` as well when it does not answer (the
    /// watch reports that). (etcd puts even this read through Raft: one
    /// small entry per node every `ALARMS_EVERY` seconds.)
    async fn alarm(&self) -> Option<StoreError> {
        let (i, mut m) = self.members.maintenance();
        let req = AlarmRequest { action: alarm_request::AlarmAction::Get as i32, ..Default::default() };
        let alarms = match tokio::time::timeout(REQUEST_TIMEOUT, m.alarm(req)).await {
            Ok(Ok(r)) => r.into_inner().alarms,
            Ok(Err(s)) if s.code() == tonic::Code::Unavailable => {
                self.members.failed(i, s.message());
                return None;
            }
            Ok(Err(_)) => return None,
            Err(_) => {
                self.members.failed(i, "no answer in time");
                return None;
            }
        };
        if alarms.iter().any(|a| a.alarm == AlarmType::Nospace as i32) {
            return Some(commit::out_of_space("its NOSPACE alarm is raised"));
        }
        alarms.iter().any(|a| a.alarm == AlarmType::Corrupt as i32).then(|| {
            StoreError::Unavailable(
                "etcd reports its data corrupt (its CORRUPT alarm is raised) and refuses writes; nothing was \
                 written. See etcd's logs, and restore the damaged member"
                    .into(),
            )
        })
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

pub(super) enum WatchEnd {
    Compacted,
    /// etcd's revision is now this, below what this node had seen.
    Rewound(i64),
    Moved,
    Down(String),
}
