//! Permanent assets too large for the hot cache are sent from disk; each is
//! hashed before its first answer, and again once its file changed, so a
//! blob that went bad on disk is refused rather than kept by the edges for a
//! year under its immutable URL. (Blobs the hot cache keeps are hashed as
//! they are read whole, in `origin.rs`.)
//!
//! Requests for the same blob arriving together wait for one hash instead of
//! each reading the whole file: after a restart, a hundred range requests for
//! a large video would otherwise hash it a hundred times at once.

use std::collections::HashMap;
use std::fs::File;
use std::io;

use parking_lot::Mutex;

use crate::blogfs::FileStamp;
use crate::domain::ContentHash;

/// Blobs remembered as checked (about 64 bytes each) before the set is emptied.
const REMEMBERED: usize = 65_536;
/// Hashes of different blobs that may run at once.
const TURNS: usize = 64;

/// The stored copy's bytes do not hash to its name.
pub const DAMAGED: &str = "the stored copy of this asset is damaged (its bytes do not match its hash)";

pub struct Verified {
    /// Each checked blob with its file's stamp when it was checked.
    checked: Mutex<HashMap<ContentHash, FileStamp>>,
    /// One turn per group of hashes: a blob is hashed by one request at a time.
    turns: [Mutex<()>; TURNS],
    /// Tests: whole-file hashes made.
    #[cfg(test)]
    hashed: std::sync::atomic::AtomicUsize,
}

impl Default for Verified {
    fn default() -> Verified {
        Verified {
            checked: Mutex::default(),
            turns: std::array::from_fn(|_| Mutex::new(())),
            #[cfg(test)]
            hashed: Default::default(),
        }
    }
}

impl Verified {
    /// Ok once `file` (the blob named `hash`, whose stamp is `stamp`) is known
    /// to hold its bytes; `InvalidData` if it does not. Blocking: reads the
    /// whole file the first time.
    pub fn check(&self, hash: ContentHash, file: &File, stamp: FileStamp) -> io::Result<()> {
        if self.checked.lock().get(&hash) == Some(&stamp) {
            return Ok(());
        }
        let _turn = self.turns[hash.0[0] as usize % TURNS].lock();
        // Another request for it may have finished while this one waited.
        if self.checked.lock().get(&hash) == Some(&stamp) {
            return Ok(());
        }
        #[cfg(test)]
        self.hashed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut hasher = blake3::Hasher::new();
        hasher.update_reader(file)?;
        if ContentHash::of(&hasher.finalize()) != hash {
            return Err(io::Error::new(io::ErrorKind::InvalidData, DAMAGED));
        }
        let mut checked = self.checked.lock();
        if checked.len() >= REMEMBERED {
            checked.clear();
        }
        checked.insert(hash, stamp);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    fn blob(dir: &std::path::Path, data: &[u8]) -> (ContentHash, std::path::PathBuf) {
        let path = dir.join("blob");
        std::fs::write(&path, data).unwrap();
        (ContentHash::of(&blake3::hash(data)), path)
    }

    fn stamp(f: &File) -> FileStamp {
        FileStamp::of(&f.metadata().unwrap())
    }

    /// Sixteen requests for one blob at once hash it once; a later one not
    /// at all; a change to the file has it hashed again, and found damaged.
    #[test]
    fn requests_together_hash_a_blob_once_and_again_after_a_change() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
        let (hash, path) = blob(dir.path(), &data);
        let v = Arc::new(Verified::default());
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let (v, path) = (v.clone(), path.clone());
                std::thread::spawn(move || {
                    let f = File::open(&path).unwrap();
                    v.check(hash, &f, stamp(&f))
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap().unwrap();
        }
        assert_eq!(v.hashed.load(Ordering::Relaxed), 1);
        let f = File::open(&path).unwrap();
        v.check(hash, &f, stamp(&f)).unwrap();
        assert_eq!(v.hashed.load(Ordering::Relaxed), 1);

        let mut bad = data.clone();
        bad[5] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        let f = File::open(&path).unwrap();
        let e = v.check(hash, &f, stamp(&f)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert_eq!(v.hashed.load(Ordering::Relaxed), 2);
        // Still damaged: not remembered as checked, so hashed (and refused) again.
        assert!(v.check(hash, &f, stamp(&f)).is_err());
        assert_eq!(v.hashed.load(Ordering::Relaxed), 3);
    }
}
