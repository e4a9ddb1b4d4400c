//! A permanent asset's blob is checked against its hash before the origin
//! answers with its bytes, so a blob that went bad on disk is refused rather
//! than kept by the edges for a year under its immutable URL. One the hot
//! cache keeps is hashed as it is read whole ([`Verified::read_whole`]);
//! a larger one, sent from disk, before its first answer with bytes and again
//! once its file changed ([`Verified::check`]).
//!
//! Requests for the same blob arriving together wait for one hash instead of
//! each reading the whole file (after a restart, a hundred range requests for
//! a large video would otherwise hash it a hundred times at once), and they
//! wait as tasks: only the request that hashes holds a blocking thread. A
//! damaged blob is remembered as damaged for its stamp, so retries are refused
//! without reading it again.

use std::collections::HashMap;
use std::fs::{File, Metadata};
use std::io::{self, Read};
use std::sync::Arc;

use crate::blogfs::{changed_ago, FileStamp, SETTLE};
use crate::domain::ContentHash;

/// Blobs remembered (about 64 bytes each) at most: two generations of half
/// as many (see [`Known`]).
const REMEMBERED: usize = 65_536;
/// Hashes of different blobs that may run at once.
const TURNS: usize = 64;

/// The stored copy's bytes do not hash to its name.
pub const DAMAGED: &str = "the stored copy of this asset is damaged (its bytes do not match its hash)";

/// Counts one blob hashed by the origin (`blotcdn_cas_blob_checks_total`).
fn counted(whole: bool) -> bool {
    metrics::counter!(crate::metrics::CAS_CHECKS, "outcome" => if whole { "whole" } else { "damaged" }).increment(1);
    whole
}

fn damaged() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, DAMAGED)
}

/// Each blob hashed, with its file's stamp then and whether it was whole, in
/// two generations: new outcomes go into `recent`; once it holds half of
/// [`REMEMBERED`], it becomes `older` and the old `older` is dropped. An
/// outcome found in `older` moves back into `recent`, so a blob asked for at
/// least once a generation is never hashed again, and a full set drops only
/// what was not asked for lately (emptying it whole made every large blob in
/// use be read and hashed again at once).
#[derive(Default)]
struct Known {
    recent: HashMap<ContentHash, (FileStamp, bool)>,
    older: HashMap<ContentHash, (FileStamp, bool)>,
}

impl Known {
    fn get(&mut self, hash: &ContentHash) -> Option<(FileStamp, bool)> {
        if let Some(&k) = self.recent.get(hash) {
            return Some(k);
        }
        let k = self.older.remove(hash)?;
        self.insert(*hash, k);
        Some(k)
    }

    fn insert(&mut self, hash: ContentHash, k: (FileStamp, bool)) {
        if self.recent.len() >= REMEMBERED / 2 && !self.recent.contains_key(&hash) {
            self.older = std::mem::take(&mut self.recent);
        }
        self.recent.insert(hash, k);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.recent.len() + self.older.len()
    }
}

pub struct Verified {
    known: parking_lot::Mutex<Known>,
    /// One turn per group of blobs: a blob is hashed by one request at a time.
    turns: [tokio::sync::Mutex<()>; TURNS],
    /// Tests: whole-file hashes made.
    #[cfg(test)]
    hashed: std::sync::atomic::AtomicUsize,
}

impl Default for Verified {
    fn default() -> Verified {
        Verified {
            known: Default::default(),
            turns: std::array::from_fn(|_| tokio::sync::Mutex::new(())),
            #[cfg(test)]
            hashed: Default::default(),
        }
    }
}

impl Verified {
    fn known(&self, hash: &ContentHash, stamp: FileStamp) -> Option<io::Result<()>> {
        match self.known.lock().get(hash) {
            Some((s, whole)) if s == stamp => Some(if whole { Ok(()) } else { Err(damaged()) }),
            _ => None,
        }
    }

    /// Ok once `file` (the blob named `hash`, with metadata `meta`) is known
    /// to hold its bytes; `InvalidData` if it does not, another error if it
    /// could not be read. The file comes back either way.
    pub async fn check(self: &Arc<Self>, hash: ContentHash, file: File, meta: &Metadata) -> (File, io::Result<()>) {
        let stamp = FileStamp::of(meta);
        if let Some(known) = self.known(&hash, stamp) {
            return (file, known);
        }
        let _turn = self.turns[hash.0[0] as usize % TURNS].lock().await;
        // Another request for it may have finished while this one waited.
        if let Some(known) = self.known(&hash, stamp) {
            return (file, known);
        }
        #[cfg(test)]
        let this = self.clone();
        let hashed = tokio::task::spawn_blocking(move || {
            #[cfg(test)]
            this.hashed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut hasher = blake3::Hasher::new();
            let read = hasher.update_reader(&file).map(|h| counted(ContentHash::of(&h.finalize()) == hash));
            (file, read)
        })
        .await;
        let (file, whole) = match hashed {
            Ok((file, Ok(whole))) => (file, whole),
            Ok((file, Err(e))) => return (file, Err(e)),
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
        self.remember(hash, meta, whole);
        (file, if whole { Ok(()) } else { Err(damaged()) })
    }

    /// The whole of `file` (the blob named `hash`, with metadata `meta`),
    /// read and hashed; `InvalidData` if it does not hold its bytes, or was
    /// found not to at this stamp already (then it is not read again). Only a
    /// damaged blob is remembered: a whole one is kept hot by the caller.
    /// Blocking.
    pub fn read_whole(&self, hash: ContentHash, file: &File, meta: &Metadata) -> io::Result<Vec<u8>> {
        if let Some(Err(e)) = self.known(&hash, FileStamp::of(meta)) {
            return Err(e);
        }
        let mut buf = Vec::with_capacity(meta.len() as usize);
        file.take(meta.len()).read_to_end(&mut buf)?;
        if buf.len() as u64 != meta.len() {
            return Err(io::Error::other("blob shorter than its size"));
        }
        if !counted(ContentHash::of(&blake3::hash(&buf)) == hash) {
            self.remember(hash, meta, false);
            return Err(damaged());
        }
        Ok(buf)
    }

    /// Remembers what a hash of the blob found, unless its file changed a
    /// moment ago: it may be in the middle of a write whose bytes its stamp
    /// does not show yet.
    fn remember(&self, hash: ContentHash, meta: &Metadata, whole: bool) {
        if changed_ago(meta) < SETTLE {
            return;
        }
        self.known.lock().insert(hash, (FileStamp::of(meta), whole));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    async fn check(v: &Arc<Verified>, hash: ContentHash, path: &std::path::Path) -> io::Result<()> {
        let f = File::open(path).unwrap();
        let m = f.metadata().unwrap();
        v.check(hash, f, &m).await.1
    }

    /// Sixteen requests for one blob at once hash it once; a later one not
    /// at all; a change to the file has it hashed again and found damaged,
    /// and retries are refused without hashing it again. (Each write is
    /// followed by a pause past `SETTLE`: a file changed a moment ago is
    /// hashed on every check, by design.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_together_hash_a_blob_once_and_again_after_a_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        let data: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
        let hash = ContentHash::of(&blake3::hash(&data));
        std::fs::write(&path, &data).unwrap();
        let hashed = |v: &Verified| v.hashed.load(Ordering::Relaxed);
        let v = Arc::new(Verified::default());
        std::thread::sleep(SETTLE * 2);

        let together: Vec<_> = (0..16)
            .map(|_| {
                let (v, path) = (v.clone(), path.clone());
                tokio::spawn(async move { check(&v, hash, &path).await })
            })
            .collect();
        for t in together {
            t.await.unwrap().unwrap();
        }
        assert_eq!(hashed(&v), 1);
        check(&v, hash, &path).await.unwrap();
        assert_eq!(hashed(&v), 1);

        let mut bad = data.clone();
        bad[5] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        std::thread::sleep(SETTLE * 2);
        for _ in 0..3 {
            assert_eq!(check(&v, hash, &path).await.unwrap_err().kind(), io::ErrorKind::InvalidData);
        }
        assert_eq!(hashed(&v), 2, "a damaged blob is remembered as damaged");
    }

    /// Past the limit, what was asked for lately is still known and what was
    /// not is forgotten; the set never holds more than the limit.
    #[test]
    fn a_full_set_forgets_only_what_was_not_asked_for_lately() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        std::fs::write(&path, b"x").unwrap();
        std::thread::sleep(SETTLE * 2);
        let meta = std::fs::metadata(&path).unwrap();
        let stamp = FileStamp::of(&meta);
        let hash = |i: u32| {
            let mut h = [0u8; 16];
            h[..4].copy_from_slice(&i.to_le_bytes());
            ContentHash(h)
        };
        let v = Verified::default();
        let (hot, cold) = (hash(u32::MAX), hash(u32::MAX - 1));
        v.remember(hot, &meta, true);
        v.remember(cold, &meta, false);
        for i in 0..(3 * REMEMBERED as u32) {
            v.remember(hash(i), &meta, true);
            if i % 1000 == 0 {
                assert!(v.known(&hot, stamp).is_some_and(|k| k.is_ok()), "forgot a blob asked for lately ({i})");
            }
            assert!(v.known.lock().len() <= REMEMBERED);
        }
        assert!(v.known(&cold, stamp).is_none(), "kept a blob no one asked for");
        assert!(v.known(&hash(3 * REMEMBERED as u32 - 1), stamp).is_some(), "forgot the newest");
        assert!(v.known(&hash(0), stamp).is_none(), "kept the oldest");
    }
}
