//! The write-ahead log in front of sled. A group of writes becomes durable
//! with one append and one `fdatasync` of this file; sled takes the same
//! writes in memory and is flushed only at checkpoints. At start, records
//! newer than sled's checkpoint are replayed, then the log is emptied.
//!
//! Records are *resolved* writes (cache ids already assigned), so replaying
//! one gives the same result as the first time. Each record:
//! `len u32 LE | check u32 LE (first 4 bytes of BLAKE3 of the body) | body`,
//! and the body starts with its sequence number. A torn or corrupt tail ends
//! the replay: it can only be a write that was never acknowledged.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::domain::CacheId;

/// One resolved write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rec {
    Invalidate {
        blog: String,
        id: CacheId,
        floor: CacheId,
        paths: Vec<String>,
    },
    Bind {
        blog: String,
        id: CacheId,
        floor: CacheId,
        path: Option<String>,
        hash: [u8; 16],
        size: u64,
        content_type: String,
        filename: String,
    },
    /// `create`: the blog did not exist; it starts with floor = last = this id.
    SetDomain {
        domain: String,
        blog: String,
        create: Option<CacheId>,
    },
    RemoveDomain {
        domain: String,
    },
    /// Everything the deletion touches is named, so a replay needs no index.
    /// `last`: the blog's last cache id, kept after it is gone so that a blog
    /// created again under the same id starts above it.
    Delete {
        blog: String,
        last: CacheId,
        hashes: Vec<[u8; 16]>,
        domains: Vec<String>,
    },
    GcDone {
        hash: [u8; 16],
    },
    /// A blog's reference to a permanent asset taken down (`DeleteAsset`);
    /// `paths` were bound to it and now take version `id`, unbound.
    Unref {
        blog: String,
        id: CacheId,
        floor: CacheId,
        hash: [u8; 16],
        paths: Vec<String>,
    },
    /// Purge keys for every edge target, enqueued at `at_ms`; the record's
    /// sequence number orders it in each target's outbox.
    Purge {
        at_ms: u64,
        keys: Vec<String>,
    },
    /// `target` delivered every purge up to record `upto`; purges up to
    /// `prune` were delivered to every target and can be forgotten.
    PurgeSent {
        target: String,
        upto: u64,
        prune: u64,
    },
}

struct Enc(Vec<u8>);

impl Enc {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(&(b.len() as u32).to_le_bytes());
        self.0.extend_from_slice(b);
    }
    fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
    fn hash(&mut self, h: &[u8; 16]) {
        self.0.extend_from_slice(h);
    }
}

struct Dec<'a>(&'a [u8]);

impl<'a> Dec<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_le_bytes(b.try_into().expect("4")))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|b| u64::from_le_bytes(b.try_into().expect("8")))
    }
    fn str(&mut self) -> Option<String> {
        let n = self.u32()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
    fn hash(&mut self) -> Option<[u8; 16]> {
        self.take(16).map(|b| b.try_into().expect("16"))
    }
}

impl Rec {
    fn encode(&self, seq: u64, out: &mut Vec<u8>) {
        let mut e = Enc(Vec::with_capacity(64));
        e.u64(seq);
        match self {
            Rec::Invalidate { blog, id, floor, paths } => {
                e.u8(1);
                e.str(blog);
                e.u64(*id);
                e.u64(*floor);
                e.u64(paths.len() as u64);
                for p in paths {
                    e.str(p);
                }
            }
            Rec::Bind { blog, id, floor, path, hash, size, content_type, filename } => {
                e.u8(2);
                e.str(blog);
                e.u64(*id);
                e.u64(*floor);
                match path {
                    Some(p) => {
                        e.u8(1);
                        e.str(p);
                    }
                    None => e.u8(0),
                }
                e.hash(hash);
                e.u64(*size);
                e.str(content_type);
                e.str(filename);
            }
            Rec::SetDomain { domain, blog, create } => {
                e.u8(3);
                e.str(domain);
                e.str(blog);
                e.u64(create.unwrap_or(0));
            }
            Rec::RemoveDomain { domain } => {
                e.u8(4);
                e.str(domain);
            }
            Rec::Delete { blog, last, hashes, domains } => {
                e.u8(7);
                e.str(blog);
                e.u64(*last);
                e.u64(hashes.len() as u64);
                for h in hashes {
                    e.hash(h);
                }
                e.u64(domains.len() as u64);
                for d in domains {
                    e.str(d);
                }
            }
            Rec::GcDone { hash } => {
                e.u8(6);
                e.hash(hash);
            }
            Rec::Unref { blog, id, floor, hash, paths } => {
                e.u8(8);
                e.str(blog);
                e.u64(*id);
                e.u64(*floor);
                e.hash(hash);
                e.u64(paths.len() as u64);
                for p in paths {
                    e.str(p);
                }
            }
            Rec::Purge { at_ms, keys } => {
                e.u8(9);
                e.u64(*at_ms);
                e.u64(keys.len() as u64);
                for k in keys {
                    e.str(k);
                }
            }
            Rec::PurgeSent { target, upto, prune } => {
                e.u8(10);
                e.str(target);
                e.u64(*upto);
                e.u64(*prune);
            }
        }
        let body = e.0;
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&blake3::hash(&body).as_bytes()[..4]);
        out.extend_from_slice(&body);
    }

    fn decode(body: &[u8]) -> Option<(u64, Rec)> {
        let mut d = Dec(body);
        let seq = d.u64()?;
        let rec = match d.u8()? {
            1 => {
                let (blog, id, floor) = (d.str()?, d.u64()?, d.u64()?);
                let n = d.u64()? as usize;
                let mut paths = Vec::with_capacity(n.min(1 << 16));
                for _ in 0..n {
                    paths.push(d.str()?);
                }
                Rec::Invalidate { blog, id, floor, paths }
            }
            2 => {
                let (blog, id, floor) = (d.str()?, d.u64()?, d.u64()?);
                let path = if d.u8()? == 1 { Some(d.str()?) } else { None };
                Rec::Bind {
                    blog,
                    id,
                    floor,
                    path,
                    hash: d.hash()?,
                    size: d.u64()?,
                    content_type: d.str()?,
                    filename: d.str()?,
                }
            }
            3 => {
                let (domain, blog, c) = (d.str()?, d.str()?, d.u64()?);
                Rec::SetDomain { domain, blog, create: (c != 0).then_some(c) }
            }
            4 => Rec::RemoveDomain { domain: d.str()? },
            // 5: a deletion written before `last` was recorded.
            tag @ (5 | 7) => {
                let blog = d.str()?;
                let last = if tag == 7 { d.u64()? } else { 0 };
                let n = d.u64()? as usize;
                let mut hashes = Vec::with_capacity(n.min(1 << 16));
                for _ in 0..n {
                    hashes.push(d.hash()?);
                }
                let n = d.u64()? as usize;
                let mut domains = Vec::with_capacity(n.min(1 << 16));
                for _ in 0..n {
                    domains.push(d.str()?);
                }
                Rec::Delete { blog, last, hashes, domains }
            }
            6 => Rec::GcDone { hash: d.hash()? },
            8 => {
                let (blog, id, floor, hash) = (d.str()?, d.u64()?, d.u64()?, d.hash()?);
                let n = d.u64()? as usize;
                let mut paths = Vec::with_capacity(n.min(1 << 16));
                for _ in 0..n {
                    paths.push(d.str()?);
                }
                Rec::Unref { blog, id, floor, hash, paths }
            }
            9 => {
                let at_ms = d.u64()?;
                let n = d.u64()? as usize;
                let mut keys = Vec::with_capacity(n.min(1 << 16));
                for _ in 0..n {
                    keys.push(d.str()?);
                }
                Rec::Purge { at_ms, keys }
            }
            10 => Rec::PurgeSent { target: d.str()?, upto: d.u64()?, prune: d.u64()? },
            _ => return None,
        };
        d.0.is_empty().then_some((seq, rec))
    }
}

/// A group of records as one buffer, framed and checked as in the log: what
/// cluster mode stores in etcd.
pub fn encode_group<'a>(recs: impl IntoIterator<Item = (u64, &'a Rec)>) -> Vec<u8> {
    let mut out = Vec::new();
    for (seq, rec) in recs {
        rec.encode(seq, &mut out);
    }
    out
}

/// The records of [`encode_group`]'s buffer; `None` if it is damaged.
pub fn decode_group(mut b: &[u8]) -> Option<Vec<(u64, Rec)>> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let len = u32::from_le_bytes(b.get(..4)?.try_into().ok()?) as usize;
        let body = b.get(8..8 + len)?;
        if blake3::hash(body).as_bytes()[..4] != b[4..8] {
            return None;
        }
        out.push(Rec::decode(body)?);
        b = &b[8 + len..];
    }
    Some(out)
}

/// Why a group did not become durable.
#[derive(Debug)]
pub enum WalError {
    /// Writing the group failed before any sync: nothing of it is durable,
    /// and the log is as it was. Safe to go on.
    Append(io::Error),
    /// `fdatasync` failed: what the kernel held may be lost. Not safe to go on.
    Sync(io::Error),
}

/// The whole record at `at` in `data`, and where it ends. `None` for a torn
/// or corrupt record, or the zeros after the last one: the end of the log.
fn record_at(data: &[u8], at: usize) -> Option<((u64, Rec), usize)> {
    let head = data.get(at..at + 8)?;
    let len = u32::from_le_bytes(head[..4].try_into().expect("4")) as usize;
    let body = data.get(at + 8..at + 8 + len)?;
    if len == 0 || blake3::hash(body).as_bytes()[..4] != head[4..] {
        return None;
    }
    Some((Rec::decode(body)?, at + 8 + len))
}

/// The whole records at the start of `data`, and where they end.
fn parse(data: &[u8]) -> (Vec<(u64, Rec)>, usize) {
    let mut recs = Vec::new();
    let mut at = 0usize;
    while let Some((r, end)) = record_at(data, at) {
        recs.push(r);
        at = end;
    }
    (recs, at)
}

/// Calls `f` with each whole record at the start of `data` (bytes in the
/// log's format: the snapshot's tail file), until one is not whole or `f`
/// says stop; returns where the last one taken ends.
pub fn each_record(data: &[u8], mut f: impl FnMut(u64, Rec) -> bool) -> usize {
    let mut at = 0usize;
    while let Some(((seq, rec), end)) = record_at(data, at) {
        if !f(seq, rec) {
            break;
        }
        at = end;
    }
    at
}

/// The log file is kept at least this long, filled with zeros ahead of the
/// records: overwriting allocated blocks lets `fdatasync` skip the metadata
/// update (and journal commit) that growing a file costs on every sync.
const PREALLOCATE: u64 = 16 << 20;

/// The log's records between two bytes, read back from the file (the page
/// cache, as a rule) one at a time: what a checkpoint applies, in memory
/// bounded by the largest record. A writer only appends after `end` (and
/// empties the log only once no checkpoint reads it), so another thread may
/// read these while the log goes on.
pub struct Records {
    file: File,
    /// Where the records written when this was taken end.
    pub end: u64,
}

impl Records {
    /// Calls `f` with each record from byte `from` (a record's start, 0 for
    /// the first since the last reset) on, in order, up to `end` or to the
    /// first record that starts at or past `until`; returns where it stopped.
    pub fn apply<E: From<io::Error>>(
        &self,
        from: u64,
        until: u64,
        mut f: impl FnMut(u64, Rec) -> Result<(), E>,
    ) -> Result<u64, E> {
        let mut at = from;
        let mut head = [0u8; 8];
        let mut body = Vec::new();
        while at < self.end.min(until) {
            self.file.read_exact_at(&mut head, at)?;
            let len = u32::from_le_bytes(head[..4].try_into().expect("4")) as usize;
            body.resize(len, 0);
            self.file.read_exact_at(&mut body, at + 8)?;
            let (seq, rec) = (len > 0 && blake3::hash(&body).as_bytes()[..4] == head[4..])
                .then(|| Rec::decode(&body))
                .flatten()
                .ok_or_else(|| io::Error::other(format!("the write-ahead log reads back corrupt at byte {at}")))?;
            f(seq, rec)?;
            at += 8 + len as u64;
        }
        Ok(at)
    }
}

pub struct Wal {
    file: File,
    /// Where the next record goes.
    pos: u64,
    /// Bytes allocated (zeros past `pos`, or old records).
    cap: u64,
    buf: Vec<u8>,
    #[cfg(test)]
    path: std::path::PathBuf,
}

/// Tests: `rec` as the log holds it.
#[cfg(test)]
pub fn encode_record(seq: u64, rec: &Rec) -> Vec<u8> {
    let mut out = Vec::new();
    rec.encode(seq, &mut out);
    out
}

/// Tests: the log at this path refuses its appends, as a full disk would.
#[cfg(test)]
pub static REFUSE_APPENDS: std::sync::Mutex<Option<std::path::PathBuf>> = std::sync::Mutex::new(None);

impl Wal {
    /// Opens the log and reads every whole record in it, in order. Records
    /// from before the last reset may follow the live ones; they are older
    /// than the checkpoint and the caller skips them by sequence number.
    pub fn open(path: &Path) -> io::Result<(Wal, Vec<(u64, Rec)>)> {
        let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        let mut data = Vec::new();
        file.read_to_end(&mut data)?;
        let (recs, at) = parse(&data);
        let mut wal = Wal {
            file,
            pos: at as u64,
            cap: data.len() as u64,
            buf: Vec::with_capacity(64 * 1024),
            #[cfg(test)]
            path: path.to_owned(),
        };
        wal.ensure(PREALLOCATE)?;
        Ok((wal, recs))
    }

    /// The records written so far, for another thread (see [`Records`]).
    pub fn records(&self) -> io::Result<Records> {
        Ok(Records { file: self.file.try_clone()?, end: self.pos })
    }

    /// Grows the zero-filled allocation to at least `cap` bytes: by
    /// `PREALLOCATE`, or, on a disk without room for that, by what `cap`
    /// needs. What a growth that failed took is given back (the log kept
    /// it: on a nearly full disk, a refused write took all the room freed).
    fn ensure(&mut self, cap: u64) -> io::Result<()> {
        if self.cap >= cap {
            return Ok(());
        }
        match self.grow_to(cap.max(self.cap + PREALLOCATE)) {
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => self.grow_to(cap.next_multiple_of(64 << 10)),
            r => r,
        }
    }

    fn grow_to(&mut self, target: u64) -> io::Result<()> {
        let zeros = vec![0u8; 1 << 20];
        let mut at = self.cap;
        let grown = (|| {
            while at < target {
                let n = zeros.len().min((target - at) as usize);
                self.file.write_all_at(&zeros[..n], at)?;
                at += n as u64;
            }
            self.file.sync_all()
        })();
        match grown {
            Ok(()) => {
                self.cap = at;
                Ok(())
            }
            Err(e) => {
                let _ = self.file.set_len(self.cap);
                Err(e)
            }
        }
    }

    /// Adds a record to the group being written.
    pub fn push(&mut self, seq: u64, rec: &Rec) {
        rec.encode(seq, &mut self.buf);
    }

    /// Writes the group and waits for the disk: one write, one fdatasync.
    ///
    /// The two ways this fails are not alike. An append that fails (no space
    /// to grow the file, a short write) has made nothing durable and the
    /// disk's state is known: the group is dropped, its start is zeroed so
    /// no replay reads it, and the log goes on. A failed `fdatasync` may have
    /// lost pages the kernel will never write again: nothing can be trusted.
    pub fn sync(&mut self) -> Result<(), WalError> {
        if !self.buf.is_empty() {
            // The record after the last one must read as the end of the log.
            let end = self.pos + self.buf.len() as u64 + 8;
            let appended = self.ensure(end).and_then(|_| {
                #[cfg(test)]
                if REFUSE_APPENDS.lock().expect("lock").as_deref() == Some(self.path.as_path()) {
                    return Err(io::Error::from_raw_os_error(libc::ENOSPC));
                }
                self.buf.extend_from_slice(&[0u8; 8]);
                self.file.write_all_at(&self.buf, self.pos)
            });
            self.buf.clear();
            if let Err(e) = appended {
                // Inside the allocated zeros (or nothing was written): this
                // overwrite needs no new block. If even it fails, records
                // the callers were told are refused may stay readable for a
                // replay: treat that like a failed sync.
                if self.pos + 8 <= self.cap {
                    if let Err(z) = self.file.write_all_at(&[0u8; 8], self.pos) {
                        return Err(WalError::Sync(io::Error::other(format!(
                            "{e}; and the refused group could not be cut off ({z})"
                        ))));
                    }
                }
                return Err(WalError::Append(e));
            }
            self.pos = end - 8;
        }
        let started = std::time::Instant::now();
        let r = self.file.sync_data().map_err(WalError::Sync);
        metrics::histogram!(crate::metrics::WAL_FSYNC).record(started.elapsed().as_secs_f64());
        r
    }

    /// Appends the records written since the last reset, as they are in the
    /// file, to `out`; the bytes appended. (The snapshot's tail; no sync.)
    pub fn append_to(&self, out: &Path) -> io::Result<u64> {
        let mut f = OpenOptions::new().append(true).create(true).open(out)?;
        let mut buf = vec![0u8; (1 << 20).min(self.pos as usize)];
        let mut at = 0u64;
        while at < self.pos {
            let n = buf.len().min((self.pos - at) as usize);
            self.file.read_exact_at(&mut buf[..n], at)?;
            std::io::Write::write_all(&mut f, &buf[..n])?;
            at += n as u64;
        }
        Ok(self.pos)
    }

    /// Bytes of records since the last reset.
    pub fn bytes(&self) -> u64 {
        self.pos
    }

    /// Starts the log over once sled holds (durably) everything in it. The
    /// old records stay on disk but are older than sled's checkpoint; the
    /// first bytes are zeroed so that a crash right after reads an empty log.
    pub fn reset(&mut self) -> io::Result<()> {
        self.buf.clear();
        self.file.write_all_at(&[0u8; 8], 0)?;
        self.file.sync_data()?;
        self.pos = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Rec> {
        vec![
            Rec::Invalidate { blog: "b".into(), id: 5, floor: 3, paths: vec!["/a".into(), "/ü b".into()] },
            Rec::Invalidate { blog: "b".into(), id: 6, floor: 6, paths: vec![] },
            Rec::Bind {
                blog: "b".into(),
                id: 7,
                floor: 6,
                path: Some("/x.png".into()),
                hash: [9; 16],
                size: 12,
                content_type: "image/png".into(),
                filename: "x.png".into(),
            },
            Rec::Bind {
                blog: "c".into(),
                id: 1,
                floor: 1,
                path: None,
                hash: [1; 16],
                size: 0,
                content_type: String::new(),
                filename: "y".into(),
            },
            Rec::SetDomain { domain: "a.com".into(), blog: "b".into(), create: None },
            Rec::SetDomain { domain: "c.com".into(), blog: "c".into(), create: Some(44) },
            Rec::RemoveDomain { domain: "a.com".into() },
            Rec::Delete { blog: "b".into(), last: 77, hashes: vec![[9; 16]], domains: vec!["x.org".into()] },
            Rec::GcDone { hash: [9; 16] },
            Rec::Unref { blog: "c".into(), id: 9, floor: 1, hash: [1; 16], paths: vec!["/y".into()] },
            Rec::Purge { at_ms: 1_700_000_000_000, keys: vec!["b".into(), "b/0123".into()] },
            Rec::PurgeSent { target: "varnish-2".into(), upto: 12, prune: 10 },
        ]
    }

    #[test]
    fn records_survive_a_round_trip_and_a_torn_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        let (mut wal, recs) = Wal::open(&path).unwrap();
        assert!(recs.is_empty());
        for (i, r) in all().iter().enumerate() {
            wal.push(i as u64 + 1, r);
        }
        wal.sync().unwrap();
        drop(wal);
        // A torn write at the end: half a record.
        let mut extra = Vec::new();
        Rec::GcDone { hash: [2; 16] }.encode(99, &mut extra);
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        let end = all().iter().enumerate().fold(0u64, |n, (i, r)| {
            let mut v = Vec::new();
            r.encode(i as u64 + 1, &mut v);
            n + v.len() as u64
        });
        f.write_all_at(&extra[..extra.len() / 2], end).unwrap();
        let (_, recs) = Wal::open(&path).unwrap();
        let want: Vec<(u64, Rec)> = all().into_iter().enumerate().map(|(i, r)| (i as u64 + 1, r)).collect();
        assert_eq!(recs, want);

        // After a reset the log reads empty, though old bytes remain.
        let (mut wal, _) = Wal::open(&path).unwrap();
        wal.reset().unwrap();
        wal.push(100, &Rec::RemoveDomain { domain: "z.com".into() });
        wal.sync().unwrap();
        drop(wal);
        let (_, recs) = Wal::open(&path).unwrap();
        assert_eq!(recs, vec![(100, Rec::RemoveDomain { domain: "z.com".into() })]);

        // A flipped byte inside a record ends the replay there.
        let mut data = std::fs::read(&path).unwrap();
        data[20] ^= 0xff;
        std::fs::write(&path, &data).unwrap();
        let (_, recs) = Wal::open(&path).unwrap();
        assert!(recs.is_empty());
    }
}
