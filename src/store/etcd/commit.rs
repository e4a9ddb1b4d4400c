//! Writing to etcd: each group of writes planned on the state this node has
//! applied (the cache-id rule), committed as one transaction on `head`, and
//! answered once the watch shows it; snapshots that cut the log.

use super::*;

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
                (Some(build::invalidate(blog, ids, paths)), Out::Id(ids.last))
            }
            Op::Bind { blog, path, binding, .. } => {
                let ids = assign(&mut over, a, blog.as_str(), false);
                (Some(build::bind(blog, ids, path.as_ref(), binding)), Out::Unit)
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
                    let (rec, found) = build::delete(index, blog, ids.last);
                    (Some(rec), Out::Hashes(Some(found)))
                }
            },
            Op::DeleteAsset { blog, hash, .. } => match build::bound_paths(index, blog, hash) {
                None => (None, Out::Bool(false)),
                Some(paths) => {
                    let ids = assign(&mut over, a, blog.as_str(), false);
                    (Some(build::unref(blog, ids, hash, paths)), Out::Bool(true))
                }
            },
            Op::GcDone { hash, removed, .. } => {
                let referenced = build::referenced(shared, index, hash);
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

pub(super) fn put(key: Vec<u8>, value: Vec<u8>) -> RequestOp {
    RequestOp { request: Some(request_op::Request::RequestPut(PutRequest { key, value, ..Default::default() })) }
}

fn get(key: Vec<u8>) -> RequestOp {
    RequestOp { request: Some(request_op::Request::RequestRange(RangeRequest { key, ..Default::default() })) }
}

/// Deletes the keys in `[key, range_end)`.
pub(super) fn del(key: Vec<u8>, range_end: Vec<u8>) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestDeleteRange(DeleteRangeRequest { key, range_end, prev_kv: false })),
    }
}

/// Holds while `key` was last changed at revision `rev` (0: it is absent).
pub(super) fn unchanged_since(key: Vec<u8>, rev: i64) -> Compare {
    Compare {
        result: compare::CompareResult::Equal as i32,
        target: compare::CompareTarget::Mod as i32,
        key,
        target_union: Some(compare::TargetUnion::ModRevision(rev)),
    }
}

/// Holds unless `key` was last changed at revision `rev`.
fn not_changed_at(key: Vec<u8>, rev: i64) -> Compare {
    Compare { result: compare::CompareResult::NotEqual as i32, ..unchanged_since(key, rev) }
}

/// The writer thread: takes the writes waiting, commits them as one group.
pub(super) struct Writer {
    /// Bytes of groups this node wrote since its last snapshot.
    pub(super) written: usize,
    /// Names this node's snapshot chunks and log groups apart from another
    /// node's.
    pub(super) nonce: u64,
    /// Groups this node tried to commit.
    pub(super) tries: u64,
    /// Holds are ignored until then (see [`Writer::wait_for_hold`]).
    pub(super) holds_ignored_until: Option<Instant>,
    /// The thread writing this node's last snapshot.
    pub(super) snapshotting: Option<std::thread::JoinHandle<()>>,
    pub(super) f: Arc<Follower>,
    pub(super) rt: tokio::runtime::Handle,
}

impl Writer {
    pub(super) fn run(mut self, rx: std::sync::mpsc::Receiver<Op>) {
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
        // A stop waits for a snapshot under way (it needs the runtime).
        if let Some(t) = self.snapshotting.take() {
            let _ = t.join();
        }
    }

    /// Commits `ops` as one group (or as halves, if too large for one
    /// request), retrying when another node's group came first.
    fn commit(&mut self, mut ops: Vec<Op>) {
        self.delete_orphans();
        let shared = self.f.shared.clone();
        let refuse_all = |ops: Vec<Op>, e: &StoreError| {
            for op in ops {
                op.refuse(e.clone_for_reply(), &shared);
            }
        };
        // Held back by another node's large write once per write at most.
        let mut waited = false;
        for _attempt in 0..100 {
            if let Some(e) = shared.failed.lock().clone() {
                return refuse_all(ops, &StoreError::Failed(e));
            }
            let (planned, head_rev, first_seq, midway) = {
                let index = shared.index.read();
                let a = self.f.applied.lock();
                // The watch partway through an answer: a head applied whose
                // group may not be yet (it comes in a later fragment, or its
                // parts are being read). Planned now, on that head, this
                // group would pass the head's check and be put over that
                // group. Once the answer is whole, it is applied.
                let midway = a.head_rev > *self.f.seen.borrow();
                // (Planning has effects: not before it is known to be used.)
                let planned = if midway { Vec::new() } else { plan(&ops, &index, &a, &shared) };
                (planned, a.head_rev, a.seq + 1, midway)
            };
            if midway {
                if !self.wait_seen(head_rev) {
                    let e = unavailable("following the log", "this node's watch is behind");
                    return refuse_all(ops, &e);
                }
                continue;
            }
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
            let log_key = seq_key(&self.f.log, first_seq);
            // Too large for one request: several writes are committed apart;
            // one write alone is written in parts, then committed by name.
            let mut parts = None;
            if value.len() > MAX_GROUP_BYTES {
                if ops.len() > 1 {
                    let rest = ops.split_off(ops.len() / 2);
                    self.commit(ops);
                    self.commit(rest);
                    return;
                }
                // Other nodes' small groups, committed while the parts are
                // written, would win the race every time: they hold back
                // while this node's hold is fresh (see `wait_for_hold`).
                let hold = put(self.f.hold.clone(), self.nonce.to_be_bytes().to_vec());
                if let Err(e) = self.txn(TxnRequest { success: vec![hold], ..Default::default() }) {
                    let e = e.during("asking other nodes to hold back for a large write");
                    *shared.degraded.lock() = Some(e.to_string());
                    return refuse_all(ops, &e);
                }
                let dir = parts_dir(&self.f.parts, &log_key[self.f.log.len()..], self.nonce, self.tries);
                match self.write_parts(&dir, &mut value) {
                    Ok(()) => parts = Some(dir),
                    Err(e) => {
                        *shared.degraded.lock() = Some(e.to_string());
                        return refuse_all(ops, &e);
                    }
                }
            }
            let last_seq = seq - 1;
            let mut success =
                vec![put(self.f.head.clone(), last_seq.to_be_bytes().to_vec()), put(log_key.clone(), value.clone())];
            if parts.is_some() {
                // Committed: the others may go on.
                success.push(del(self.f.hold.clone(), Vec::new()));
            } else if !waited {
                self.wait_for_hold();
                waited = true;
            }
            let mut compare = vec![unchanged_since(self.f.head.clone(), head_rev)];
            if head_rev > 0 {
                // Nor is our key the group put with that head: a node that
                // has not applied it yet (see `midway`) must not put its
                // own over it, whatever its watch says it has seen.
                compare.push(not_changed_at(log_key.clone(), head_rev));
            }
            let txn = TxnRequest {
                compare,
                success,
                // The head that moved, and what sits under our group's key:
                // after a reply lost on the way, a retry finds its own group.
                failure: vec![get(self.f.head.clone()), get(log_key)],
            };
            let t0 = Instant::now();
            let sent = self.send(txn);
            metrics::histogram!(crate::metrics::ETCD_TXN).record(t0.elapsed().as_secs_f64());
            let resp = match sent {
                Ok(Ok(r)) => r,
                Ok(Err(s)) => {
                    let e = refused("a transaction failed", &s);
                    // Reported until a write gets in (the probe tries one).
                    *shared.degraded.lock() = Some(e.to_string());
                    return refuse_all(ops, &e);
                }
                Err(_) => {
                    let e = StoreError::Unavailable(format!(
                        "no etcd member answered within {} s; the write may or may not have been applied, retry it",
                        REQUEST_TIMEOUT.as_secs()
                    ));
                    // Reported until etcd answers again (the watch, or the probe).
                    *shared.degraded.lock() = Some(e.to_string());
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
                if theirs < head_rev {
                    // The head is older than the one this node applied.
                    let e = unavailable(
                        "committing",
                        "etcd went back to an earlier revision (restored from a backup?); this node reloads the log",
                    );
                    return refuse_all(ops, &e);
                }
                if let Some(dir) = parts {
                    // This try's parts are named by no group; the next try
                    // writes its own. (Left, a snapshot deletes them.)
                    let _ = self
                        .txn(TxnRequest { success: vec![del(dir.clone(), prefix_end(&dir))], ..Default::default() });
                }
                // The head this node built on, whose group it has not applied
                // yet: it waits for that group, not for a revision.
                let caught_up = if theirs == head_rev { self.wait_applied(first_seq) } else { self.wait_seen(theirs) };
                if !caught_up {
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
            shared.degraded.lock().take();
            for (op, (_, out)) in ops.into_iter().zip(planned) {
                answer(op, out, &shared);
            }
            self.written += value_len;
            let (behind, snap_bytes) = {
                let a = self.f.applied.lock();
                (a.seq.saturating_sub(a.snap_seq), a.snap_bytes)
            };
            // One node writes each snapshot: the one whose group takes the
            // log past a multiple of SNAPSHOT_EVERY. Every node used to,
            // after the same group: each wrote the whole index, and the
            // copies filled etcd's space. Should that one not (it stopped),
            // any node does once the log is three times as long; and a
            // node that wrote SNAPSHOT_BYTES of groups, and as much as the
            // last snapshot holds, does (each snapshot then costs etcd no
            // more than the groups it cuts: a snapshot of the whole index
            // every 64 MiB took etcd past its quota with a 280 MB index).
            let crossed = last_seq / SNAPSHOT_EVERY > (first_seq - 1) / SNAPSHOT_EVERY;
            let due = (crossed && behind >= SNAPSHOT_EVERY / 2)
                || behind >= 3 * SNAPSHOT_EVERY
                || self.written >= SNAPSHOT_BYTES.max(snap_bytes);
            if due && self.snapshotting.as_ref().is_none_or(|t| t.is_finished()) {
                self.written = 0;
                self.snapshot();
            }
            return;
        }
        let e = unavailable("committing", "too many concurrent writers; retry");
        refuse_all(ops, &e);
    }

    /// While another node's large write holds the others back (`P hold`,
    /// put no more than `HOLD_MAX` ago as this node's watch saw it), waits
    /// for it to be committed, for `HOLD_MAX` at most (a write waits once,
    /// not at each of its tries). A hold not let go within that (its node
    /// died, or something puts it again and again: that slowed a cluster to
    /// a write a second) has this node ignore holds for `HOLD_IGNORED`.
    fn wait_for_hold(&mut self) {
        if self.holds_ignored_until.is_some_and(|t| Instant::now() < t) {
            return;
        }
        let started = Instant::now();
        let ours = self.nonce.to_be_bytes();
        loop {
            let held = self
                .f
                .hold_seen
                .lock()
                .as_ref()
                .is_some_and(|(at, who)| at.elapsed() < HOLD_MAX && who.as_slice() != ours.as_slice());
            if !held {
                return;
            }
            if started.elapsed() >= HOLD_MAX {
                tracing::warn!(
                    ignored_s = HOLD_IGNORED.as_secs(),
                    "another node's hold for a large write was not let go in time; holds are ignored for a while"
                );
                self.holds_ignored_until = Some(Instant::now() + HOLD_IGNORED);
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Deletes the folders of parts no group will name (see
    /// [`Follower::orphans`]). One that cannot be deleted now is left to the
    /// next snapshot: a write is not held up retrying it.
    fn delete_orphans(&self) {
        let dirs = std::mem::take(&mut *self.f.orphans.lock());
        for dir in dirs {
            let end = prefix_end(&dir);
            if let Err(e) = self.txn(TxnRequest { success: vec![del(dir, end)], ..Default::default() }) {
                tracing::debug!(error = %e, "orphan parts not deleted; the next snapshot deletes them");
                return;
            }
        }
    }

    /// Writes the records of `value` (after its nonce and try) as parts
    /// under `dir`, and leaves in `value` what names them.
    fn write_parts(&self, dir: &[u8], value: &mut Vec<u8>) -> Result<(), StoreError> {
        let records = &value[16..];
        let mut n = 0u32;
        for (i, part) in records.chunks(MAX_GROUP_BYTES).enumerate() {
            let key = [dir, format!("{i:08x}").as_bytes()].concat();
            self.txn(TxnRequest { success: vec![put(key, part.to_vec())], ..Default::default() })
                .map_err(|e| e.during("writing a large write in parts"))?;
            n += 1;
        }
        let mut named = value[..16].to_vec();
        named.extend_from_slice(&PART_MARK);
        named.extend_from_slice(&n.to_be_bytes());
        named.extend_from_slice(&(records.len() as u64).to_be_bytes());
        named.extend_from_slice(blake3::hash(records).as_bytes());
        *value = named;
        Ok(())
    }

    /// Encodes the index as this node has applied it, then (on a thread of
    /// its own, while writes go on: a large index takes seconds to send)
    /// writes it as a snapshot and points `P snap` at it.
    fn snapshot(&mut self) {
        let started = Instant::now();
        let (bytes, seq, known) = {
            let index = self.f.shared.index.read();
            let a = self.f.applied.lock();
            (snapshot::encode(a.seq, &index, &a.ids, &a.deleted_last), a.seq, a.snap_rev)
        };
        let (f, rt, nonce) = (self.f.clone(), self.rt.clone(), self.nonce);
        let spawned =
            std::thread::Builder::new().name("blotcdn-etcd-snap".into()).spawn(move || {
                match write_snapshot(&f, &rt, nonce, &bytes, seq, known) {
                    Ok(true) => tracing::info!(
                        seq,
                        bytes = bytes.len(),
                        ms = started.elapsed().as_millis() as u64,
                        "etcd snapshot written"
                    ),
                    Ok(false) => tracing::info!(seq, "another node wrote a snapshot first; this one is dropped"),
                    Err(e) => {
                        tracing::warn!(error = %e, "etcd snapshot not written; the log keeps growing until the next")
                    }
                }
            });
        match spawned {
            Ok(t) => self.snapshotting = Some(t),
            Err(e) => tracing::warn!(error = %e, "etcd snapshot not written: no thread for it"),
        }
    }

    /// One transaction (see [`send_tries`]), each member tried once.
    fn send(&self, req: TxnRequest) -> Result<Result<TxnResponse, tonic::Status>, tokio::time::error::Elapsed> {
        send_tries(&self.f, &self.rt, req, self.f.members.tries())
    }

    /// One transaction; whether its comparisons held.
    fn txn(&self, req: TxnRequest) -> Result<bool, Refusal> {
        txn_tries(&self.f, &self.rt, req, self.f.members.tries())
    }

    /// Waits (bounded) until this node's watch has applied record `seq`.
    fn wait_applied(&self, seq: u64) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.f.applied.lock().seq < seq {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// Waits (bounded) until this node's watch has applied revision `rev`.
    fn wait_seen(&self, rev: i64) -> bool {
        let mut seen = self.f.seen.subscribe();
        self.rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), seen.wait_for(|r| *r >= rev)).await.is_ok_and(|r| r.is_ok())
        })
    }
}

/// Writes `bytes`, the index after record `seq`, as a snapshot under this
/// node's `nonce`, then points `P snap` at it and deletes the log it covers
/// and the snapshot before, in one transaction, if `P snap` is still the
/// one of revision `known`. Whether it did.
fn write_snapshot(
    f: &Follower,
    rt: &tokio::runtime::Handle,
    nonce: u64,
    bytes: &[u8],
    seq: u64,
    known: i64,
) -> Result<bool, Refusal> {
    let dir = [f.snaps.as_slice(), format!("{seq:016x}-{nonce:016x}/").as_bytes()].concat();
    let chunks: Vec<&[u8]> = bytes.chunks(MAX_GROUP_BYTES).collect();
    for (i, c) in chunks.iter().enumerate() {
        let key = [dir.as_slice(), format!("{i:04x}").as_bytes()].concat();
        let req = TxnRequest { success: vec![put(key, c.to_vec())], ..Default::default() };
        if let Err(e) = txn_tries(f, rt, req, f.members.tries()) {
            drop_chunks(f, rt, &dir);
            return Err(e);
        }
    }
    let mut pointer = Vec::with_capacity(POINTER_LEN);
    pointer.extend_from_slice(&seq.to_be_bytes());
    pointer.extend_from_slice(&(chunks.len() as u32).to_be_bytes());
    pointer.extend_from_slice(&nonce.to_be_bytes());
    let (log_end, parts_end) = (seq_key(&f.log, seq + 1), seq_key(&f.parts, seq + 1));
    // Each range starts at record 0 as this cluster spells it, not at the
    // folder: a key of another shape under it (another cluster's, whose
    // prefix lies inside this one's) sorts before, and is not deleted.
    // Only over the snapshot this node knows: two nodes snapshotting at
    // once must not point back to an older one after the log it needs
    // was cut. The loser removes its own chunks, and only those.
    let txn = TxnRequest {
        compare: vec![unchanged_since(f.snap.clone(), known)],
        success: vec![
            put(f.snap.clone(), pointer),
            del(seq_key(&f.log, 0), log_end),
            // The parts of groups up to it, and those no group named.
            del(seq_key(&f.parts, 0), parts_end),
            // Older snapshots (and any a crash left) sort before this one.
            del(seq_key(&f.snaps, 0), dir.clone()),
        ],
        failure: vec![del(dir.clone(), prefix_end(&dir))],
    };
    // Sent once: after a lost reply, a second try would find the pointer
    // moved (by the first) and delete the chunks it points to.
    let pointed = txn_tries(f, rt, txn, 1);
    if let Err(Refusal::Etcd(_)) = &pointed {
        // Refused (out of space): nothing points at them.
        drop_chunks(f, rt, &dir);
    }
    pointed
}

/// Deletes the chunks of a snapshot nothing points at (best effort): not
/// left live in etcd (a failed snapshot of 400 MB stayed until the next one
/// got in).
fn drop_chunks(f: &Follower, rt: &tokio::runtime::Handle, dir: &[u8]) {
    let gone = TxnRequest { success: vec![del(dir.to_vec(), prefix_end(dir))], ..Default::default() };
    if let Err(e) = txn_tries(f, rt, gone, f.members.tries()) {
        tracing::warn!(error = %e, dir = %follow::shown(dir), "a snapshot's chunks not deleted; the next snapshot deletes them");
    }
}

/// Sends one transaction to the member in use; one that fails it as
/// unavailable or does not answer within `REQUEST_TIMEOUT` hands it to the
/// next (up to `tries` tries). A transaction sent so may be sent twice:
/// the group's finds its own value after a lost reply, parts and deletions
/// are the same twice. Not the snapshot's pointer (one try).
fn send_tries(
    f: &Follower,
    rt: &tokio::runtime::Handle,
    req: TxnRequest,
    tries: usize,
) -> Result<Result<TxnResponse, tonic::Status>, tokio::time::error::Elapsed> {
    let members = &f.members;
    // A small request answered this late: the member stalls now and then
    // (paused, starved) without ever staying silent for REQUEST_TIMEOUT.
    // Its answer is taken, and the next request goes to the next member.
    let small = prost::Message::encoded_len(&req) <= 64 << 10;
    rt.block_on(async move {
        let mut tried = 0;
        loop {
            let (i, mut kv) = members.kv();
            tried += 1;
            let t0 = Instant::now();
            let r = tokio::time::timeout(REQUEST_TIMEOUT, kv.txn(req.clone())).await;
            match &r {
                Ok(Err(s)) if s.code() == tonic::Code::Unavailable => members.failed(i, s.message()),
                Err(_) => members.failed(i, "no answer in time"),
                _ => {
                    if small && t0.elapsed() >= SLOW_ANSWER {
                        members.failed(i, &format!("a small request took {} ms", t0.elapsed().as_millis()));
                    }
                    return r.map(|r| r.map(tonic::Response::into_inner));
                }
            }
            if tried >= tries {
                return r.map(|r| r.map(tonic::Response::into_inner));
            }
            tokio::time::sleep(Duration::from_millis(50 * tried as u64)).await;
        }
    })
}

/// One transaction; whether its comparisons held.
fn txn_tries(f: &Follower, rt: &tokio::runtime::Handle, req: TxnRequest, tries: usize) -> Result<bool, Refusal> {
    match send_tries(f, rt, req, tries) {
        Ok(Ok(r)) => Ok(r.succeeded),
        Ok(Err(s)) => Err(Refusal::Etcd(s)),
        Err(_) => Err(Refusal::NoAnswer),
    }
}

/// Why a transaction did not answer.
pub(super) enum Refusal {
    Etcd(tonic::Status),
    NoAnswer,
}

impl Refusal {
    /// The refusal of a write that was `what` when this happened.
    fn during(self, what: &str) -> StoreError {
        match self {
            Refusal::Etcd(s) => refused(what, &s),
            Refusal::NoAnswer => unavailable(what, "no member answered in time"),
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Etcd(s) => f.write_str(s.message()),
            Refusal::NoAnswer => f.write_str("no etcd member answered in time"),
        }
    }
}

/// A write refused by etcd while `what`: out of space (its NOSPACE alarm:
/// nothing gets in until an operator frees space, so not "retry"), or
/// unavailable.
fn refused(what: &str, s: &tonic::Status) -> StoreError {
    match s.code() {
        tonic::Code::ResourceExhausted => out_of_space(s.message()),
        _ => unavailable(what, s.message()),
    }
}

/// etcd out of space (`why`: its refusal, or its alarm seen).
pub(super) fn out_of_space(why: &str) -> StoreError {
    StoreError::Full(format!(
        "etcd is out of space ({why}); nothing was written. Writes are refused until it is freed (compact and \
         defragment etcd, then disarm its NOSPACE alarm)"
    ))
}
