//! Checkpoints: the log's records moved into sled in rounds on a thread
//! of their own while the writer goes on, sled flushed, the records kept
//! for the next start (the snapshot's tail, or a new snapshot), the log
//! emptied; and the writer's last checkpoint at a clean stop.

use std::io;
use std::time::{Duration, Instant};

use super::super::snapshot::{self, Base};
use super::super::trees::{apply, checkpoint, read_marker, sled_seq, sweep, Raised, Trees};
use super::super::wal::Rec;
use super::super::StoreError;
use super::Writer;

/// Checkpoint past this much log, or this long after the last checkpoint.
const CHECKPOINT_BYTES: u64 = 64 << 20;
pub(super) const CHECKPOINT_EVERY: Duration = Duration::from_secs(10);
/// A checkpoint writes a new index snapshot (instead of appending the log to
/// the last one's tail) once the tail and the log hold half the snapshot's
/// size, within these bounds: the writes of snapshots stay within about
/// twice those of the log, and a start after a crash replays at most this
/// much besides the log.
const SNAPSHOT_MIN: u64 = 4 << 20;
const SNAPSHOT_MAX: u64 = 32 << 20;

/// A checkpoint applies the log to sled in rounds on a thread of its own
/// while the writer goes on, each round up to [`ROUND_BYTES`] (or four of
/// the longest groups seen, if more) of the records synced before it began.
/// Writes that outpace sled are held back: once the log has grown by half a
/// round's length since the round began, the writer waits for it to end
/// before it takes more (a wait of at most one round). A round's writes are
/// then at most half its length and one group, three quarters of it, so
/// what is left shrinks each round and a checkpoint ends however fast writes
/// come. Once what is left is under this, the writer applies it itself and
/// ends the checkpoint; it does so as well once what is left is one round's
/// worth and not shorter than half the round before (the records of one
/// group can be longer than this).
const INLINE_BYTES: u64 = 64 << 10;
/// A round's length, at least: about a third of a second of sled's inserts.
const ROUND_BYTES: u64 = 4 << 20;
/// While a round runs, the writer looks at it this often when idle.
pub(super) const ROUND_POLL: Duration = Duration::from_millis(1);

/// Tests: the checkpoint rounds of the store at this path wait until it is
/// taken away; `ROUNDS_HELD` counts those that waited.
#[cfg(test)]
pub static HOLD_ROUNDS: std::sync::Mutex<Option<std::path::PathBuf>> = std::sync::Mutex::new(None);
#[cfg(test)]
pub static ROUNDS_HELD: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A round's thread: it answers where it stopped.
type Round = std::thread::JoinHandle<Result<u64, StoreError>>;

/// A checkpoint under way: sled is open and holds the log's records before
/// byte `done`.
pub struct Applying {
    done: u64,
    /// The round running (it answers where it stopped), where the log ended
    /// when it began, and the length it was given.
    round: Option<(u64, u64, Round)>,
    /// The length of the last round.
    last: u64,
    /// The log's length at the last step, and the most it grew between two
    /// (one group's records, as a step follows each group).
    seen: u64,
    group: u64,
    /// The end was put off once for a record sled takes long over (see
    /// `costly`): not again.
    put_off: bool,
}

/// The sizes that bring checkpoints and snapshots, smaller in tests.
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    pub checkpoint_bytes: u64,
    pub snapshot_min: u64,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning { checkpoint_bytes: CHECKPOINT_BYTES, snapshot_min: SNAPSHOT_MIN }
    }
}
/// A snapshot write that failed (a full disk) is tried again after this long.
const SNAPSHOT_RETRY: Duration = Duration::from_secs(60);
/// A checkpoint that failed is tried again after this long.
const CHECKPOINT_RETRY: Duration = Duration::from_secs(2);

/// The free room on `db`'s disk, and what moving a log of `log_bytes` into
/// sled needs (sled writes about twice what it takes in), when the first
/// is short of the second. A checkpoint (or a start's replay) that ran out
/// of room midway left sled larger, and the room freed was gone again.
pub(in crate::store) fn short_of_room(db: &std::path::Path, log_bytes: u64) -> Option<(u64, u64)> {
    let needed = 2 * log_bytes + (16 << 20);
    let room = crate::durable::free_bytes(db)?;
    (room < needed).then_some((room, needed))
}
/// A snapshot's tail long enough that a new snapshot should be written
/// instead of appending to it: half the snapshot's size, within bounds.
pub(in crate::store) fn tail_is_long(base: &Base, tuning: &Tuning) -> bool {
    base.tail_len >= (base.snap_len / 2).clamp(tuning.snapshot_min, SNAPSHOT_MAX)
}

/// While checkpoints fail, the log grows; past this, writes are refused
/// rather than let the log (and start-up's replay) grow without bound.
pub const MAX_LOG_BYTES: u64 = 4 * CHECKPOINT_BYTES;

impl Writer {
    /// A clean stop: a last checkpoint, with a snapshot of everything, so
    /// that the next start reads one file and replays nothing.
    pub(super) fn stop(&mut self) {
        if self.shared.failed.lock().is_some() {
            return;
        }
        let current = self.snap.is_some_and(|b| b.tail_len == 0 && b.seq == self.seq - 1);
        if self.wal.bytes() == 0 && current {
            return;
        }
        if let Err(e) = self.checkpoint(true) {
            tracing::error!(error = %e, "the last checkpoint failed; the next start replays the log");
        }
    }

    /// Before a checkpoint empties the log, keeps its records for the next
    /// start: appended to the snapshot's tail, or in a new snapshot once the
    /// tail is half the snapshot's size (or none can be used, or `force`).
    /// Best effort: without them a start reads sled.
    fn keep_log(&mut self, force: bool) {
        let long = self
            .snap
            .is_none_or(|b| tail_is_long(&Base { tail_len: b.tail_len + self.wal.bytes(), ..b }, &self.tuning));
        if force || long {
            if !force && self.snapshot_backing_off() {
                return;
            }
            return self.write_snapshot(self.seq - 1);
        }
        match self.wal.append_to(&snapshot::tail_path(&self.db_path)) {
            Ok(n) => {
                if let Some(b) = &mut self.snap {
                    b.tail_len += n;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "the snapshot's tail could not be written; a new snapshot comes next");
                self.snap = None;
            }
        }
    }

    /// A snapshot write failed less than `SNAPSHOT_RETRY` ago.
    fn snapshot_backing_off(&self) -> bool {
        self.snapshot_failed.is_some_and(|t| t.elapsed() < SNAPSHOT_RETRY)
    }

    /// The index after record `seq` (every write so far) as a snapshot: in a
    /// checkpoint, which never runs once the store has failed, or at a start
    /// before the writer runs.
    pub(in crate::store) fn write_snapshot(&mut self, seq: u64) {
        let started = Instant::now();
        let shared = self.shared.clone();
        let written = snapshot::write(&self.db_path, seq, &shared.index.read(), &self.ids, &self.deleted_last);
        match written {
            Ok(len) => {
                tracing::info!(ms = started.elapsed().as_millis() as u64, bytes = len, "index snapshot written");
                self.snap = Some(Base { seq, snap_len: len, tail_len: 0 });
                self.snapshot_failed = None;
            }
            Err(e) => {
                tracing::warn!(error = %e, "index snapshot not written; until one is, a start reads sled");
                self.snap = None;
                self.snapshot_failed = Some(Instant::now());
            }
        }
    }

    /// Starts a checkpoint when one is due, or takes the one under way
    /// further (to its end once it has caught up with the log).
    pub(super) fn maybe_checkpoint(&mut self, idle: bool) {
        let bytes = self.wal.bytes();
        if self.shared.failed.lock().is_some() {
            // Nothing more reaches sled: a restart replays the log. A round
            // under way ends first (it holds sled's lock).
            if let Some((_, _, round)) = self.applying.take().and_then(|a| a.round) {
                let _ = round.join();
            }
            self.trees = None;
            return;
        }
        if self.applying.is_none() {
            let due = bytes > self.tuning.checkpoint_bytes
                || (bytes > 0 && (idle || self.last_checkpoint.elapsed() > CHECKPOINT_EVERY))
                || (idle && self.snap.is_none() && !self.snapshot_backing_off());
            let backing_off = self.checkpoint_failed.is_some_and(|t| t.elapsed() < CHECKPOINT_RETRY);
            if !due || backing_off {
                return;
            }
            // Not begun without room: the log keeps every write meanwhile.
            if let Some((room, needed)) = short_of_room(&self.db_path, bytes) {
                if self.checkpoint_failed.is_none() {
                    tracing::warn!(room, needed, log_bytes = bytes, "checkpoint put off: the disk is short of room");
                }
                self.checkpoint_failed = Some(Instant::now());
                return;
            }
        }
        match self.advance(None) {
            Ok(false) => {}
            Ok(true) => {
                self.last_checkpoint = Instant::now();
                if self.checkpoint_failed.take().is_some() {
                    tracing::info!("checkpoint succeeded again");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, log_bytes = bytes, "checkpoint failed; the log keeps every write, retrying");
                self.checkpoint_failed = Some(Instant::now());
            }
        }
    }

    /// A whole checkpoint (or the rest of the one under way), now.
    /// `snapshot`: write a new one, whatever the tail holds.
    fn checkpoint(&mut self, snapshot: bool) -> Result<(), StoreError> {
        self.advance(Some(snapshot)).map(|_| ())
    }

    /// Takes the checkpoint under way further (starting one if none is):
    /// once the round running has ended (writes outpacing it: waits for
    /// it), starts the next, or the writer applies the rest itself (`now`,
    /// `Some(snapshot)`: waits for the round, then the rest); once sled
    /// holds every record, flushes it, records the last log record it
    /// holds, and empties the log. True once the checkpoint is done. On
    /// failure sled is closed (it keeps an I/O error for good: the next try
    /// reopens it from disk and starts over).
    fn advance(&mut self, now: Option<bool>) -> Result<bool, StoreError> {
        let r = self.advance_inner(now);
        if !matches!(r, Ok(false)) {
            // Done or failed: sled is closed until the next checkpoint. Open,
            // it holds about 40 bytes per path however small its cache, for
            // nothing, since every read is served by the index.
            self.trees = None;
            self.applying = None;
        }
        r
    }

    fn advance_inner(&mut self, now: Option<bool>) -> Result<bool, StoreError> {
        if self.applying.is_none() {
            self.open_for_checkpoint()?;
            let seen = self.wal.bytes();
            self.applying = Some(Applying { done: 0, round: None, last: u64::MAX, seen, group: 0, put_off: false });
        }
        let a = self.applying.as_mut().expect("under way");
        let bytes = self.wal.bytes();
        a.group = a.group.max(bytes - a.seen);
        a.seen = bytes;
        if let Some((end, len, round)) = a.round.take() {
            let outpaced = bytes - end > len / 2;
            if now.is_none() && !outpaced && !round.is_finished() {
                a.round = Some((end, len, round));
                return Ok(false);
            }
            let (waited, running) = (Instant::now(), !round.is_finished());
            let to = round.join().map_err(|_| io::Error::other("the checkpoint's thread panicked"))??;
            if running {
                // Writes waited for sled (they outpace it, or a stop).
                let ms = waited.elapsed().as_millis() as u64;
                tracing::debug!(ms, round_bytes = len, "writes waited for a checkpoint round");
            }
            a.last = to - a.done;
            a.done = to;
        }
        let trees = self.trees.as_ref().expect("open while a checkpoint is under way");
        let records = self.wal.records()?;
        let left = records.end - a.done;
        let len = ROUND_BYTES.max(4 * a.group);
        let round = now.is_none() && left > INLINE_BYTES && (left > len || left <= a.last / 2);
        // A record of a few bytes can take sled seconds (a blog of a million
        // paths deleted, or its floor raised): at the end, on the writer
        // thread, every write would wait for it. Such a rest goes to a round
        // of its own first (once: a pipeline that keeps raising floors would
        // otherwise never let a checkpoint end), given a full round's length
        // so that writes wait for it only if they outpace it.
        let costly = now.is_none() && !round && !a.put_off && left > 0 && {
            let mut found = false;
            records.apply(a.done, u64::MAX, |_, rec| {
                found |= match &rec {
                    Rec::Delete { .. } => true,
                    Rec::Invalidate { paths, .. } => paths.is_empty(),
                    _ => false,
                };
                Ok::<_, StoreError>(())
            })?;
            found
        };
        if round || costly {
            a.put_off |= costly;
            let (trees, from) = (trees.clone(), a.done);
            #[cfg(test)]
            let held = {
                let held = HOLD_ROUNDS.lock().expect("lock").as_ref() == Some(&self.db_path);
                // Counted before any later write is answered.
                ROUNDS_HELD.fetch_add(held as usize, std::sync::atomic::Ordering::SeqCst);
                held.then(|| self.db_path.clone())
            };
            a.round = Some((
                records.end,
                if costly { len } else { len.min(left) },
                std::thread::Builder::new().name("blotcdn-checkpoint".into()).spawn(move || {
                    #[cfg(test)]
                    while held.is_some() && *HOLD_ROUNDS.lock().expect("lock") == held {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    let mut raised = Raised::new();
                    let to = records.apply(from, from + len, |seq, rec| {
                        Ok::<_, StoreError>(apply(&trees, seq, &rec, &mut raised)?)
                    })?;
                    sweep(&trees, raised)?;
                    Ok(to)
                })?,
            ));
            return Ok(false);
        }
        // The end, which writes wait for: the rest applied here, sled's
        // flush, the records kept for the next start.
        let (started, applied_bytes) = (Instant::now(), records.end - a.done);
        let mut raised = Raised::new();
        records.apply(a.done, u64::MAX, |seq, rec| Ok::<_, StoreError>(apply(trees, seq, &rec, &mut raised)?))?;
        sweep(trees, raised)?;
        let applied = started.elapsed();
        checkpoint(trees, &self.db_path, self.seq - 1)?;
        self.trees = None;
        // sled holds every record: keep them for the next start (after sled,
        // so that a snapshot filling the disk cannot stop sled's flush), then
        // empty the log.
        self.keep_log(now.unwrap_or(false));
        self.wal.reset()?;
        super::super::give_back_memory();
        tracing::debug!(
            ms = started.elapsed().as_millis() as u64,
            applied_bytes,
            applied_ms = applied.as_millis() as u64,
            "checkpoint done"
        );
        Ok(true)
    }

    /// Opens sled for a checkpoint, checked against its marker.
    fn open_for_checkpoint(&mut self) -> Result<(), StoreError> {
        if self.trees.is_none() {
            let started = Instant::now();
            let trees = Trees::open(&self.db_path)?;
            tracing::debug!(ms = started.elapsed().as_millis() as u64, "sled opened for a checkpoint");
            // sled reopened after a failure may read damage as a torn tail
            // and come back older than its last checkpoint, which the log no
            // longer covers: never checkpoint over that (it would make the
            // loss permanent); refuse writes, keep the log, say why.
            let (holds, recorded) = (sled_seq(&trees)?, read_marker(&self.db_path)?);
            if holds < recorded {
                let e = StoreError::Behind { path: self.db_path.display().to_string(), holds, recorded };
                self.fail(&e);
                return Err(e);
            }
            self.trees = Some(trees);
        }
        Ok(())
    }
}
