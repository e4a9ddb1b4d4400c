//! Following etcd: the load at start (the snapshot, then the log after it,
//! at one revision), the watch that applies every node's groups, and the
//! probe that clears the health report once etcd answers again.

use super::*;

/// Reads the keys in `[key, end)` as of revision `rev`, `limit` to a
/// request, handing each to `each` in key order.
async fn pages(
    kv: &mut KvClient<Channel>,
    mut key: Vec<u8>,
    end: Vec<u8>,
    limit: i64,
    rev: i64,
    what: &str,
    mut each: impl FnMut(&crate::etcdpb::KeyValue) -> Result<(), String>,
) -> Result<(), String> {
    loop {
        let req = RangeRequest { key, range_end: end.clone(), limit, revision: rev, ..Default::default() };
        let resp = kv.range(req).await.map_err(|s| format!("{what}: {}", s.message()))?.into_inner();
        for kv in &resp.kvs {
            each(kv)?;
        }
        match resp.kvs.last() {
            Some(last) if resp.more => {
                key = last.key.clone();
                key.push(0);
            }
            _ => return Ok(()),
        }
    }
}

/// The records of the group under `key`: in its value, or gathered (and
/// taken) from the `parts` it names, checked against its length and hash.
fn records<'v>(
    parts_prefix: &[u8],
    log_prefix: &[u8],
    key: &[u8],
    value: &'v [u8],
    parts: &mut Parts,
) -> Result<std::borrow::Cow<'v, [u8]>, String> {
    let body = value.get(16..).ok_or("a log group without its writer's nonce")?;
    if body.get(..4) != Some(&PART_MARK[..]) {
        return Ok(body.into());
    }
    let (Some(n), Some(len), Some(hash)) = (body.get(4..8), body.get(8..16), body.get(16..48)) else {
        return Err("a log group's list of parts is cut short".into());
    };
    let n = u32::from_be_bytes(n.try_into().expect("4"));
    let len = u64::from_be_bytes(len.try_into().expect("8")) as usize;
    let nonce = u64::from_be_bytes(value[..8].try_into().expect("8"));
    let tries = u64::from_be_bytes(value[8..16].try_into().expect("8"));
    let seq_hex = key.get(log_prefix.len()..).unwrap_or_default();
    let dir = parts_dir(parts_prefix, seq_hex, nonce, tries);
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
    Ok(out.into())
}

impl Follower {
    /// Applies one group (a `log/` key and value) to the index and the ids.
    fn apply_group(
        &self,
        index: &mut Index,
        a: &mut Applied,
        key: &[u8],
        value: &[u8],
        rev: i64,
        parts: &mut Parts,
    ) -> Result<(), String> {
        let recs = records(&self.parts, &self.log, key, value, parts)
            .map_err(|why| format!("{why}, at etcd revision {rev}"))
            .and_then(|b| wal::decode_group(&b).ok_or_else(|| format!("a damaged log group at etcd revision {rev}")))?;
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

    /// Takes out of `parts` those of records up to `seq`, which no group
    /// can name any more (the group of that record is applied), and notes
    /// their folders for this node's writer to delete.
    fn orphan_parts(&self, parts: &mut Parts, seq: u64) {
        let rest = parts.split_off(&seq_key(&self.parts, seq + 1));
        let passed = std::mem::replace(parts, rest);
        if passed.is_empty() {
            return;
        }
        let mut orphans = self.orphans.lock();
        for key in passed.into_keys() {
            // The folder: the key up to its last slash.
            if let Some(end) = key.iter().rposition(|b| *b == b'/') {
                orphans.insert(key[..=end].to_vec());
            }
        }
    }

    /// Reads the whole log at one revision, a page at a time, into a fresh
    /// index. Returns the revision it was read at.
    pub(super) async fn load(&self, kv: &mut KvClient<Channel>) -> Result<(Index, Applied, i64), String> {
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
            let (mut bytes, mut got) = (Vec::new(), 0);
            let dir = [self.snaps.as_slice(), format!("{seq:016x}-{nonce:016x}/").as_bytes()].concat();
            let end = prefix_end(&dir);
            // Chunks are up to 1 MiB: two to a page.
            pages(kv, dir, end, 2, rev, "loading the snapshot", |c| {
                bytes.extend_from_slice(&c.value);
                got += 1;
                Ok(())
            })
            .await?;
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
            key = seq_key(&self.log, seq + 1);
        }
        // The parts of large groups first (those of groups a snapshot
        // covers are gone with it), at the same revision.
        let mut parts = Parts::new();
        pages(kv, self.parts.clone(), prefix_end(&self.parts), 2, rev, "loading the log's parts", |p| {
            parts.insert(p.key.clone(), p.value.clone());
            Ok(())
        })
        .await?;
        pages(kv, key, prefix_end(&self.log), PAGE, rev, "loading the log", |g| {
            self.apply_group(&mut index, &mut a, &g.key, &g.value, g.mod_revision, &mut parts)
        })
        .await?;
        // Parts of a group committed after this revision: the watch brings
        // the group, not them again. Those the log has passed are orphans.
        self.orphan_parts(&mut parts, a.seq);
        *self.pending_parts.lock() = parts;
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
        let mut parts = self.pending_parts.lock();
        for ev in events {
            let Some(kv) = &ev.kv else { continue };
            // Parts are kept until their group comes, or they are deleted.
            if kv.key.starts_with(&self.parts) {
                match ev.r#type {
                    0 => parts.insert(kv.key.clone(), kv.value.clone()),
                    _ => parts.remove(&kv.key),
                };
                continue;
            }
            // Puts of log groups (the head moves with them) and of the
            // snapshot pointer; other deletions are only cleanup.
            if ev.r#type != 0 {
                continue;
            }
            if kv.key.starts_with(&self.log) {
                let applied = self.apply_group(&mut index, &mut a, &kv.key, &kv.value, kv.mod_revision, &mut parts);
                self.orphan_parts(&mut parts, a.seq);
                if let Err(e) = applied {
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
    pub(super) async fn follow(self: Arc<Self>, mut kv: KvClient<Channel>, mut wc: WatchClient<Channel>) {
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
    pub(super) async fn probe(self: Arc<Self>, mut kv: KvClient<Channel>) {
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

pub(super) enum WatchEnd {
    Compacted,
    Down(String),
}
