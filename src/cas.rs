//! The content-addressed store: each blob lives once under
//! `{data_dir}/cas/ab/cd/{hash}`, named by the first 128 bits of its BLAKE3
//! hash. Blobs arrive through a temporary file that is hashed while written,
//! fsynced, then renamed into place, so a blob under its name is always whole.
//!
//! It knows nothing of blogs or references; deciding what may be deleted is
//! the catalog's job.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::domain::ContentHash;

pub struct Cas {
    root: PathBuf,
    tmp: PathBuf,
    quarantine: PathBuf,
}

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// A blob being written. Dropped without [`Cas::commit`], its temporary file
/// is removed: a broken upload leaves nothing behind.
pub struct BlobWriter {
    file: Option<File>,
    path: PathBuf,
    hasher: blake3::Hasher,
    size: u64,
}

/// A finished, fsynced temporary blob, waiting to be named.
pub struct PendingBlob {
    path: PathBuf,
    pub hash: ContentHash,
    pub size: u64,
}

impl Drop for PendingBlob {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl BlobWriter {
    pub fn write(&mut self, data: &[u8]) -> io::Result<()> {
        self.hasher.update(data);
        self.size += data.len() as u64;
        self.file.as_mut().expect("open until finished").write_all(data)
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Fsyncs and hashes; the blob still has its temporary name.
    pub fn finish(mut self) -> io::Result<PendingBlob> {
        let file = self.file.take().expect("open until finished");
        file.sync_all()?;
        drop(file);
        let path = std::mem::take(&mut self.path);
        Ok(PendingBlob { path, hash: ContentHash::of(&self.hasher.finalize()), size: self.size })
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Cas {
    pub fn open(dir: &Path) -> io::Result<Cas> {
        let tmp = dir.join("tmp");
        let quarantine = dir.join("quarantine");
        crate::durable::create_dir_all(&tmp)?;
        // Temporary files left by a crash are never referenced: clear them.
        for entry in std::fs::read_dir(&tmp)? {
            let _ = std::fs::remove_file(entry?.path());
        }
        Ok(Cas { root: dir.to_owned(), tmp, quarantine })
    }

    pub fn blob_path(&self, hash: &ContentHash) -> PathBuf {
        let hex = hash.to_hex();
        self.root.join(&hex[0..2]).join(&hex[2..4]).join(&hex)
    }

    fn temp_path(&self) -> PathBuf {
        let n = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
        self.tmp.join(format!("{}-{n}", std::process::id()))
    }

    pub fn writer(&self) -> io::Result<BlobWriter> {
        let path = self.temp_path();
        let file = File::create(&path)?;
        Ok(BlobWriter { file: Some(file), path, hasher: blake3::Hasher::new(), size: 0 })
    }

    /// Copies a readable file into a new blob (hashing on the way). More
    /// than `limit` bytes is refused with `FileTooLarge`: a file may grow
    /// after it was measured.
    ///
    /// Never a hard link or any other sharing of the source's inode: a blob's
    /// bytes must not change when a sync tool rewrites the user's file in place.
    pub fn copy_from(&self, mut src: impl Read, limit: u64) -> io::Result<PendingBlob> {
        let mut w = self.writer()?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = src.read(&mut buf)?;
            if n == 0 {
                break;
            }
            if w.size() + n as u64 > limit {
                return Err(io::Error::new(io::ErrorKind::FileTooLarge, format!("over {limit} bytes")));
            }
            w.write(&buf[..n])?;
        }
        w.finish()
    }

    /// Gives every blob that shares its inode with another name (imports of
    /// earlier versions hard-linked the blog's file) an inode of its own,
    /// after checking its bytes still match its name; a blob whose bytes
    /// changed is quarantined. Runs once per data dir (a marker file records
    /// it). Returns (blobs copied, blobs quarantined).
    pub fn unshare_linked(&self) -> io::Result<(usize, usize)> {
        use std::os::unix::fs::MetadataExt;
        let marker = self.root.join(".no-shared-inodes");
        if marker.exists() {
            return Ok((0, 0));
        }
        let (mut copied, mut quarantined) = (0, 0);
        for (hash, path) in self.list()? {
            if std::fs::symlink_metadata(&path)?.nlink() <= 1 {
                continue;
            }
            let pending = self.copy_from(File::open(&path)?, u64::MAX)?;
            if pending.hash != hash {
                tracing::error!(%hash, "blob shared its inode with a blog file that changed; quarantined");
                drop(pending);
                self.quarantine(&hash)?;
                quarantined += 1;
                continue;
            }
            let mut pending = pending;
            let from = std::mem::take(&mut pending.path);
            std::fs::rename(&from, &path)?;
            File::open(path.parent().expect("blob paths have parents"))?.sync_all()?;
            copied += 1;
        }
        File::create(&marker)?.sync_all()?;
        File::open(&self.root)?.sync_all()?;
        Ok((copied, quarantined))
    }

    /// Gives a pending blob its name. When the blob already exists, the new
    /// copy is dropped: same bytes, stored once.
    pub fn commit(&self, mut pending: PendingBlob) -> io::Result<PathBuf> {
        let dest = self.blob_path(&pending.hash);
        let parent = dest.parent().expect("blob paths have parents");
        if dest.exists() {
            return Ok(dest);
        }
        // New `ab/` and `ab/cd/` folders are named durably, not just the blob.
        crate::durable::create_dir_all(parent)?;
        let from = std::mem::take(&mut pending.path);
        std::fs::rename(&from, &dest)?;
        File::open(parent)?.sync_all()?;
        Ok(dest)
    }

    pub fn exists(&self, hash: &ContentHash) -> bool {
        self.blob_path(hash).is_file()
    }

    pub fn remove(&self, hash: &ContentHash) -> io::Result<()> {
        match std::fs::remove_file(self.blob_path(hash)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Every blob stored, by name (for fsck).
    pub fn list(&self) -> io::Result<Vec<(ContentHash, PathBuf)>> {
        let mut out = Vec::new();
        for a in std::fs::read_dir(&self.root)? {
            let a = a?;
            let name = a.file_name();
            if name.len() != 2 || !a.file_type()?.is_dir() {
                continue;
            }
            // A damaged store is what fsck is for: something else where a folder
            // should be is passed over, and an error names its path.
            for b in std::fs::read_dir(a.path()).map_err(|e| named(&a.path(), e))? {
                let b = b?;
                if !b.file_type()?.is_dir() {
                    continue;
                }
                for f in std::fs::read_dir(b.path()).map_err(|e| named(&b.path(), e))? {
                    let f = f?;
                    if let Ok(h) = ContentHash::parse(&f.file_name().to_string_lossy()) {
                        out.push((h, f.path()));
                    }
                }
            }
        }
        Ok(out)
    }

    /// How many blobs, and their bytes (for the metrics; walks the folders).
    pub fn totals(&self) -> io::Result<(u64, u64)> {
        let (mut n, mut bytes) = (0u64, 0u64);
        for (_, path) in self.list()? {
            if let Ok(m) = std::fs::metadata(&path) {
                n += 1;
                bytes += m.len();
            }
        }
        Ok((n, bytes))
    }

    /// Re-hashes a stored blob; `None` when what has its name is not a
    /// regular file (a folder, a link, a FIFO, which a plain open would wait
    /// on for ever). An error names the path.
    pub fn rehash(&self, path: &Path) -> io::Result<Option<ContentHash>> {
        use std::os::unix::fs::OpenOptionsExt;
        let named = |e| named(path, e);
        // Looked at before it is opened: opening a socket fails (ENXIO), a device
        // could do anything.
        if !std::fs::symlink_metadata(path).map_err(named)?.is_file() {
            return Ok(None);
        }
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_NOCTTY)
            .open(path)
        {
            Ok(f) => f,
            // Replaced between the look and the open.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENXIO)) => return Ok(None),
            Err(e) => return Err(named(e)),
        };
        if !file.metadata().map_err(named)?.is_file() {
            return Ok(None);
        }
        let mut hasher = blake3::Hasher::new();
        hasher.update_reader(file).map_err(named)?;
        Ok(Some(ContentHash::of(&hasher.finalize())))
    }

    /// Moves a corrupt blob aside, out of reach of the origin.
    pub fn quarantine(&self, hash: &ContentHash) -> io::Result<PathBuf> {
        std::fs::create_dir_all(&self.quarantine)?;
        let dest = self.quarantine.join(hash.to_hex());
        std::fs::rename(self.blob_path(hash), &dest)?;
        Ok(dest)
    }
}

/// `e`, its message naming `path` (for fsck, which walks a store that may be damaged).
fn named(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}
