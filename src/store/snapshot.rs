//! A compact copy of the index, and the log records written since it: what
//! a start reads instead of sled's trees.
//!
//! Loading 1M path versions from sled costs most of a second (sled's pages
//! are read, cached and decoded one key at a time); the same index read from
//! one flat file is a sequential read and a parse on two threads. The
//! snapshot names the record it was taken after. The write-ahead log is
//! emptied at every checkpoint; the checkpoints that write no new snapshot
//! first append the log's records to the *tail* file, so the snapshot, the
//! tail and the log together hold every record since the snapshot. A new
//! snapshot is written (and the tail emptied) once the tail and the log hold
//! half the snapshot's size, and at a clean stop.
//!
//! Both files are only a cache of sled: a start uses them when the records
//! after the snapshot follow it one by one up to the last record sled and
//! the log hold, and reads sled otherwise (no file, a checksum that does not
//! match, a short file, a gap). So neither needs an fsync: a power cut that
//! loses them costs one slow start, never a write.
//!
//! Layout (integers little-endian, strings as u32 length then bytes):
//! `MAGIC, seq u64, len u64 ×3` then three sections, then a BLAKE3 hash of
//! each section. Sections one and two hold blogs (two halves, parsed on two
//! threads): `blog, floor u64, last u64, paths u32 × (path, version u64,
//! 0 | 1 hash16 filename), refs u32 × (hash16, size u64, content type)`.
//! Section three: `domains u32 × (domain, blog), deleted u32 × (blog, last
//! u64), gc u32 × hash16`.

use std::io::{self, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::index::{BlogState, FastMap, Index, PathEntry, Paths};
use super::wal::Rec;
use super::writer::Ids;
use super::AssetRef;
use crate::domain::{BlogId, CacheId, ContentHash};

const MAGIC: &[u8; 8] = b"BLOTSNP1";
const HEADER: usize = 8 + 8 + 3 * 8;

/// The index, each blog's ids, and the last ids of deleted blogs.
pub type Loaded = (Index, FastMap<Box<str>, Ids>, FastMap<Box<str>, CacheId>);

pub fn path(db: &Path) -> PathBuf {
    db.with_extension("snapshot")
}

fn put_u32(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&(n as u32).to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_u32(out, s.len());
    out.extend_from_slice(s.as_bytes());
}

fn put_blog(out: &mut Vec<u8>, name: &str, ids: &Ids, state: Option<&BlogState>) {
    put_str(out, name);
    out.extend_from_slice(&ids.floor.to_le_bytes());
    out.extend_from_slice(&ids.last.to_le_bytes());
    let Some(state) = state else {
        put_u32(out, 0);
        put_u32(out, 0);
        return;
    };
    put_u32(out, state.paths.len());
    for (p, e) in state.paths.iter() {
        put_str(out, p);
        out.extend_from_slice(&e.version.to_le_bytes());
        match &e.binding {
            Some(b) => {
                out.push(1);
                out.extend_from_slice(&b.0 .0);
                put_str(out, &b.1);
            }
            None => out.push(0),
        }
    }
    put_u32(out, state.refs.len());
    for (h, r) in &state.refs {
        out.extend_from_slice(&h.0);
        out.extend_from_slice(&r.size.to_le_bytes());
        put_str(out, &r.content_type);
    }
}

/// Writes the snapshot of the store after record `seq`, then empties the
/// tail: the temporary file is renamed over the old one, so a reader sees a
/// whole file or none. Returns the snapshot's size.
pub fn write(
    db: &Path,
    seq: u64,
    index: &Index,
    ids: &FastMap<Box<str>, Ids>,
    deleted_last: &FastMap<Box<str>, CacheId>,
) -> io::Result<u64> {
    let tmp = db.with_extension("snapshot.tmp");
    let written = (|| {
        let mut out = io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp)?);
        let len = encode_to(seq, index, ids, deleted_last, &mut out)?;
        out.into_inner().map_err(|e| e.into_error())?;
        std::fs::rename(&tmp, path(db))?;
        Ok(len)
    })();
    let len = match written {
        Ok(len) => len,
        Err(e) => {
            // A full disk: the half-written file must not keep the space.
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    match std::fs::OpenOptions::new().write(true).open(tail_path(db)) {
        Ok(f) => f.set_len(0)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // A cache, never worth the room a checkpoint (or a start) needs. (The
    // old tail, emptied above, followed the snapshot this one replaced.)
    if crate::store::writer::short_of_room(db, 0).is_some() {
        let _ = std::fs::remove_file(path(db));
        return Err(io::Error::other(format!(
            "a snapshot of {len} bytes would leave the disk with less free room than a checkpoint needs; removed"
        )));
    }
    Ok(len)
}

/// The snapshot's bytes: the index after record `seq`.
pub fn encode(
    seq: u64,
    index: &Index,
    ids: &FastMap<Box<str>, Ids>,
    deleted_last: &FastMap<Box<str>, CacheId>,
) -> Vec<u8> {
    let mut out = io::Cursor::new(Vec::new());
    encode_to(seq, index, ids, deleted_last, &mut out).expect("writing to memory");
    out.into_inner()
}

/// Writes the snapshot to `out` as it is made, a blog at a time (a 45 MB
/// snapshot of a million paths is never whole in memory), then fills in the
/// header. Returns the bytes written.
fn encode_to<W: Write + Seek>(
    seq: u64,
    index: &Index,
    ids: &FastMap<Box<str>, Ids>,
    deleted_last: &FastMap<Box<str>, CacheId>,
    out: &mut W,
) -> io::Result<u64> {
    let paths = |name: &str| index.blogs.get(name).map_or(0, |s| s.paths.len()) + 1;
    // Halves by path count, so both parsing threads get about as much: the
    // first blogs (in `ids`' order) up to half the paths, then the rest.
    let total: usize = ids.keys().map(|b| paths(b)).sum();
    let (mut n1, mut done) = (0usize, 0usize);
    for name in ids.keys() {
        if done * 2 >= total {
            break;
        }
        n1 += 1;
        done += paths(name);
    }
    out.write_all(&[0u8; HEADER])?;
    let mut lens = [0u64; 3];
    let mut hashes = [[0u8; 32]; 3];
    let mut buf = Vec::with_capacity(128 << 10);
    let mut emit = |s: usize, buf: &mut Vec<u8>, h: &mut blake3::Hasher, out: &mut W| -> io::Result<()> {
        h.update(buf);
        out.write_all(buf)?;
        lens[s] += buf.len() as u64;
        buf.clear();
        Ok(())
    };
    let mut blogs = ids.iter();
    for (s, count) in [(0, n1), (1, ids.len() - n1)] {
        let mut h = blake3::Hasher::new();
        put_u32(&mut buf, count);
        for (name, i) in blogs.by_ref().take(count) {
            put_blog(&mut buf, name, i, index.blogs.get(name));
            if buf.len() >= 64 << 10 {
                emit(s, &mut buf, &mut h, out)?;
            }
        }
        emit(s, &mut buf, &mut h, out)?;
        hashes[s] = *h.finalize().as_bytes();
    }
    let mut h = blake3::Hasher::new();
    put_u32(&mut buf, index.domains.len());
    for (d, b) in &index.domains {
        put_str(&mut buf, d);
        put_str(&mut buf, b.as_str());
    }
    let deleted: Vec<_> = deleted_last.iter().filter(|(b, _)| !ids.contains_key(*b)).collect();
    put_u32(&mut buf, deleted.len());
    for (b, last) in deleted {
        put_str(&mut buf, b);
        buf.extend_from_slice(&last.to_le_bytes());
    }
    put_u32(&mut buf, index.gc.len());
    for g in &index.gc {
        buf.extend_from_slice(&g.0);
    }
    emit(2, &mut buf, &mut h, out)?;
    hashes[2] = *h.finalize().as_bytes();
    for x in &hashes {
        out.write_all(x)?;
    }
    let mut head = Vec::with_capacity(HEADER);
    head.extend_from_slice(MAGIC);
    head.extend_from_slice(&seq.to_le_bytes());
    for l in lens {
        head.extend_from_slice(&l.to_le_bytes());
    }
    out.seek(io::SeekFrom::Start(0))?;
    out.write_all(&head)?;
    out.seek(io::SeekFrom::End(0))
}

/// The file that holds the log's records since the snapshot.
pub fn tail_path(db: &Path) -> PathBuf {
    db.with_extension("snapshot-tail")
}

/// Where a start from the snapshot left things, for the writer's next ones.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Base {
    /// The record the snapshot was taken after.
    pub seq: u64,
    /// The snapshot's size and the tail's (whole records only).
    pub snap_len: u64,
    pub tail_len: u64,
}

/// The index as of record `last`: the snapshot, then the records after it
/// from the tail file, then from `log` (the write-ahead log's, in order),
/// applied as the writer applies them. `None` (read sled instead) unless
/// those records follow the snapshot one by one up to `last`. A tail that
/// ends in a torn record is cut back to its whole ones, so that the records
/// appended next follow them.
pub fn load(db: &Path, log: &[(u64, Rec)], last: u64) -> Option<(Loaded, Base)> {
    let p = path(db);
    let not_used = |why: &str| tracing::info!(file = %p.display(), why, "index snapshot not used; loading from sled");
    let read = |p: &Path| match std::fs::read(p) {
        Ok(b) => Some(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(Vec::new()),
        Err(e) => {
            tracing::warn!(file = %p.display(), error = %e, "unreadable");
            None
        }
    };
    let bytes = read(&p)?;
    if bytes.is_empty() {
        return None;
    }
    let (seq, mut loaded) = match decode(&bytes) {
        Ok(x) => x,
        Err(why) => {
            not_used(why);
            return None;
        }
    };
    let snap_len = bytes.len() as u64;
    drop(bytes);
    if seq > last {
        // Not of this store's history: removed, so that no later start
        // can take records written after this one as following it.
        not_used("it is newer than the store");
        let _ = std::fs::remove_file(&p);
        let _ = std::fs::remove_file(tail_path(db));
        return None;
    }
    let tail = read(&tail_path(db))?;
    let (index, ids, deleted_last) = &mut loaded;
    let mut at = seq;
    let mut step = |s: u64, rec: &Rec| {
        if s <= at {
            return true;
        }
        if s != at + 1 {
            return false;
        }
        index.apply(rec);
        Ids::follow(ids, deleted_last, rec);
        at = s;
        true
    };
    let tail_len = super::wal::each_record(&tail, |s, rec| step(s, &rec)) as u64;
    for (s, rec) in log {
        if !step(*s, rec) {
            break;
        }
    }
    if at != last {
        not_used("the records after it are not all at hand");
        return None;
    }
    if tail_len < tail.len() as u64 {
        let cut = std::fs::OpenOptions::new().write(true).open(tail_path(db)).and_then(|f| f.set_len(tail_len));
        if let Err(e) = cut {
            tracing::warn!(error = %e, "the snapshot's tail could not be cut to its whole records");
            return None;
        }
    }
    Some((loaded, Base { seq, snap_len, tail_len }))
}

struct Rd<'a> {
    b: &'a [u8],
}

impl<'a> Rd<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.b.len() < n {
            return None;
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Some(h)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u32(&mut self) -> Option<usize> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?) as usize)
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn hash(&mut self) -> Option<ContentHash> {
        Some(ContentHash(self.take(16)?.try_into().ok()?))
    }
    fn str(&mut self) -> Option<&'a str> {
        let n = self.u32()?;
        std::str::from_utf8(self.take(n)?).ok()
    }
}

type Blogs = Vec<(Box<str>, Ids, BlogState)>;

fn parse_blogs(section: &[u8]) -> Option<Blogs> {
    let mut r = Rd { b: section };
    let n = r.u32()?;
    let mut out = Vec::with_capacity(n.min(section.len()));
    for _ in 0..n {
        let name: Box<str> = r.str()?.into();
        let ids = Ids { floor: r.u64()?, last: r.u64()? };
        let np = r.u32()?;
        // A count cannot promise more entries than bytes left.
        let mut paths = Paths::with_capacity(np.min(r.b.len() / 13));
        for _ in 0..np {
            let path = r.str()?;
            let version = r.u64()?;
            let binding = match r.u8()? {
                0 => None,
                1 => Some(Box::new((r.hash()?, Arc::from(r.str()?)))),
                _ => return None,
            };
            paths.insert(path, PathEntry { version, binding });
        }
        let nr = r.u32()?;
        let mut refs = FastMap::with_capacity_and_hasher(nr.min(r.b.len() / 28), Default::default());
        for _ in 0..nr {
            let h = r.hash()?;
            let size = r.u64()?;
            refs.insert(h, AssetRef { size, content_type: Arc::from(r.str()?) });
        }
        out.push((name, ids, BlogState { floor: ids.floor, paths, refs, domains: Default::default() }));
    }
    r.b.is_empty().then_some(out)
}

/// The record a snapshot was taken after, and what it holds.
pub fn decode(bytes: &[u8]) -> Result<(u64, Loaded), &'static str> {
    let mut r = Rd { b: bytes };
    if r.take(8) != Some(&MAGIC[..]) {
        return Err("not a snapshot of this version");
    }
    let at = r.u64().ok_or("short")?;
    let lens = [r.u64(), r.u64(), r.u64()];
    let [Some(l1), Some(l2), Some(l3)] = lens.map(|l| l.map(|l| l as usize)) else {
        return Err("short");
    };
    let sum = l1.checked_add(l2).and_then(|s| s.checked_add(l3)).ok_or("damaged")?;
    if bytes.len() != HEADER.saturating_add(sum).saturating_add(96) {
        return Err("cut short or too long");
    }
    let body = &bytes[HEADER..HEADER + sum];
    let hashes = &bytes[HEADER + sum..];
    let (s1, rest) = body.split_at(l1);
    let (s2, s3) = rest.split_at(l2);
    let ok = |s: &[u8], i: usize| blake3::hash(s).as_bytes()[..] == hashes[i * 32..(i + 1) * 32];
    let (first, second) = std::thread::scope(|sc| {
        let t = sc.spawn(|| ok(s2, 1).then(|| parse_blogs(s2)).flatten());
        let first = ok(s1, 0).then(|| parse_blogs(s1)).flatten();
        (first, t.join().ok().flatten())
    });
    let (Some(first), Some(second)) = (first, second) else {
        return Err("damaged");
    };
    if !ok(s3, 2) {
        return Err("damaged");
    }
    let mut index = Index::default();
    let mut ids = FastMap::with_capacity_and_hasher(first.len() + second.len(), Default::default());
    index.blogs.reserve(first.len() + second.len());
    for (name, i, state) in first.into_iter().chain(second) {
        for h in state.refs.keys() {
            *index.blob_refs.entry(*h).or_default() += 1;
        }
        ids.insert(name.clone(), i);
        index.blogs.insert(name, state);
    }
    let rest = (|| {
        let mut r = Rd { b: s3 };
        for _ in 0..r.u32()? {
            let domain: Box<str> = r.str()?.into();
            let blog = BlogId::parse(r.str()?).ok()?;
            if let Some(state) = index.blogs.get_mut(blog.as_str()) {
                state.domains.insert(domain.clone());
            }
            index.domains.insert(domain, blog);
        }
        let mut deleted_last = FastMap::default();
        for _ in 0..r.u32()? {
            let blog: Box<str> = r.str()?.into();
            let last = r.u64()?;
            index.deleted.insert(blog.clone());
            deleted_last.insert(blog, last);
        }
        for _ in 0..r.u32()? {
            index.gc.insert(r.hash()?);
        }
        r.b.is_empty().then_some(deleted_last)
    })();
    let deleted_last = rest.ok_or("damaged")?;
    Ok((at, (index, ids, deleted_last)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{BlogPath, Domain};
    use crate::store::trees::{load as load_sled, sled_seq, Trees};
    use crate::store::{Binding, SledStore, Store};

    /// A store after a mixed workload, stopped cleanly.
    fn workload(dir: &Path, seed: u64) {
        let s = SledStore::open(dir).unwrap();
        let mut x = seed;
        mixed(&s, &mut x, 400);
        s.close();
    }

    /// `n` writes of every kind (floor raises, bindings with and without
    /// paths, domains moved and removed, blogs deleted and created again,
    /// assets deleted, garbage collected), chosen by the generator `x`.
    fn mixed(s: &SledStore, x: &mut u64, n: usize) {
        let mut rnd = |n: u64| {
            *x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (*x >> 33) % n
        };
        let blog = |i: u64| BlogId::parse(&format!("b{i}")).unwrap();
        let hash = |i: u64| ContentHash::of(&blake3::hash(&i.to_le_bytes()));
        for _ in 0..n {
            let b = blog(rnd(6));
            match rnd(9) {
                0 => {
                    s.invalidate(b, vec![]).blocking().unwrap();
                }
                1..=3 => {
                    let paths = (0..rnd(5)).map(|_| BlogPath::parse(&format!("/p/{}.css", rnd(30))).unwrap()).collect();
                    s.invalidate(b, paths).blocking().unwrap();
                }
                4 => {
                    let h = rnd(12);
                    let path = (rnd(2) == 0).then(|| BlogPath::parse(&format!("/p/{}.css", rnd(30))).unwrap());
                    let binding = Binding {
                        hash: hash(h),
                        filename: Arc::from(format!("f{h}.png")),
                        size: h,
                        content_type: Arc::from("image/png"),
                    };
                    s.bind_asset(b, path, binding).blocking().unwrap();
                }
                5 => {
                    let d = Domain::parse(&format!("d{}.example.com", rnd(5))).unwrap();
                    if rnd(3) == 0 {
                        s.remove_domain(d).blocking().unwrap();
                    } else {
                        let _ = s.set_domain(d, b).blocking();
                    }
                }
                6 => {
                    let _ = s.delete_blog(b).blocking();
                }
                7 => {
                    let _ = s.delete_asset(b, hash(rnd(12))).blocking();
                }
                _ => {
                    if let Some(h) = s.gc_candidates().first() {
                        let _ = s.gc_done(*h, rnd(2) == 0).blocking();
                    }
                }
            }
        }
    }

    fn from_sled(dir: &Path) -> (Loaded, u64) {
        let t = Trees::open(dir).unwrap();
        let seq = sled_seq(&t).unwrap();
        (load_sled(&t).unwrap(), seq)
    }

    #[test]
    fn a_snapshot_loads_what_sled_would() {
        for seed in 1..=6 {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("db");
            workload(&dir, seed);
            let bytes = std::fs::read(path(&dir)).expect("a clean stop writes a snapshot");
            let (want, seq) = from_sled(&dir);
            assert!(!want.0.blogs.is_empty());
            let (got, base) = load(&dir, &[], seq).expect("the snapshot of this checkpoint is used");
            assert_eq!(got, want, "seed {seed}");
            assert_eq!(base, Base { seq, snap_len: bytes.len() as u64, tail_len: 0 });
            // Damage anywhere, a cut, or a later record: not used.
            for at in [3, 20, HEADER + 2, bytes.len() / 2, bytes.len() - 1] {
                let mut bad = bytes.clone();
                bad[at] ^= 0x40;
                std::fs::write(path(&dir), &bad).unwrap();
                assert!(load(&dir, &[], seq).is_none(), "seed {seed}: damage at {at} was not caught");
            }
            std::fs::write(path(&dir), &bytes[..bytes.len() - 7]).unwrap();
            assert!(load(&dir, &[], seq).is_none());
            std::fs::write(path(&dir), &bytes).unwrap();
            assert!(load(&dir, &[], seq + 1).is_none(), "a record after the snapshot is missing");
            assert!(load(&dir, &[], seq - 1).is_none(), "a snapshot newer than the store");
        }
    }

    #[test]
    fn a_start_after_more_writes_ignores_an_old_snapshot() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("db");
        workload(&dir, 7);
        let old = std::fs::read(path(&dir)).unwrap();
        // Opened from the snapshot, then written to and stopped.
        let s = SledStore::open(&dir).unwrap();
        let b = BlogId::parse("late").unwrap();
        let id = s.invalidate(b.clone(), vec![]).blocking().unwrap();
        s.close();
        drop(s);
        // The old snapshot put back (as a stop that crashed before writing
        // its own would leave it): the store reads sled, and has the write.
        std::fs::write(path(&dir), &old).unwrap();
        let s = SledStore::open(&dir).unwrap();
        assert_eq!(s.blog(&b).map(|i| i.floor), Some(id));
        s.close();
        let (want, _) = from_sled(&dir);
        assert_eq!(want.0.blogs.get("late").map(|b| b.floor), Some(id));
    }

    /// The data dir as a crash would leave it now: every file copied while
    /// the writer is idle (two flushes: the second waits for the checkpoint
    /// the first one's group may have brought).
    fn crash_copy(s: &SledStore, dir: &Path, to: &Path) {
        s.flush().blocking().unwrap();
        s.flush().blocking().unwrap();
        fn copy(from: &Path, to: &Path) {
            if from.is_dir() {
                std::fs::create_dir_all(to).unwrap();
                for e in std::fs::read_dir(from).unwrap() {
                    let e = e.unwrap();
                    copy(&e.path(), &to.join(e.file_name()));
                }
            } else {
                std::fs::copy(from, to).unwrap();
            }
        }
        let name = dir.file_name().unwrap().to_str().unwrap();
        for e in std::fs::read_dir(dir.parent().unwrap()).unwrap() {
            let e = e.unwrap();
            let n = e.file_name().into_string().unwrap();
            if n == name || n.starts_with(&format!("{name}.")) {
                copy(&e.path(), &to.join(&n));
            }
        }
    }

    /// What a start reads from the log and sled in `dir` (sled's load after
    /// the log's replay), and the log's records with the last one.
    fn after_crash(dir: &Path) -> (Loaded, Vec<(u64, Rec)>, u64) {
        let t = Trees::open(dir).unwrap();
        let (_, records) = crate::store::wal::Wal::open(&dir.with_extension("wal")).unwrap();
        let done = sled_seq(&t).unwrap();
        let mut last = done;
        let mut raised = crate::store::trees::Raised::new();
        for (seq, rec) in &records {
            if *seq > done {
                crate::store::trees::apply(&t, *seq, rec, &mut raised).unwrap();
            }
            last = last.max(*seq);
        }
        crate::store::trees::sweep(&t, raised).unwrap();
        (load_sled(&t).unwrap(), records, last)
    }

    /// A crash copy of the store now, replayed as a start that reads sled
    /// would (see `after_crash`): the copy, what it loads, the log's last record.
    fn replayed_copy(s: &SledStore, dir: &Path) -> (tempfile::TempDir, Loaded, u64) {
        let copy = tempfile::tempdir().unwrap();
        crash_copy(s, dir, copy.path());
        let (loaded, _, last) = after_crash(&copy.path().join("db"));
        (copy, loaded, last)
    }

    #[test]
    fn after_a_crash_the_snapshot_its_tail_and_the_log_load_what_sled_would() {
        use crate::store::writer::Tuning;
        let (mut from_snapshot, mut with_tail, mut with_log) = (0, 0, 0);
        for seed in 1..=4u64 {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("db");
            // Checkpoints every few writes, and a new snapshot after a few
            // of them: crashes land at every stage of the cycle.
            let tuning = Tuning { checkpoint_bytes: 2048, snapshot_min: 8192 };
            let s = SledStore::open_tuned(&dir, Default::default(), tuning).unwrap();
            let mut x = seed;
            for round in 0..12 {
                mixed(&s, &mut x, 25 + round * 7);
                let crashed = tempfile::tempdir().unwrap();
                crash_copy(&s, &dir, crashed.path());
                let cdir = crashed.path().join("db");
                let (want, records, last) = after_crash(&cdir);
                let tail = std::fs::metadata(tail_path(&cdir)).map(|m| m.len()).unwrap_or(0);
                let Some((got, base)) = load(&cdir, &records, last) else {
                    // Only a store that never wrote a snapshot reads sled.
                    assert!(!path(&cdir).exists(), "seed {seed}, round {round}: the snapshot was not used");
                    continue;
                };
                // The last ids of deleted blogs, for those that exist again
                // (the writer keeps them; sled and the snapshot do not).
                let mut got = got;
                got.2.retain(|b, _| !got.1.contains_key(b));
                assert_eq!(got, want, "seed {seed}, round {round}");
                assert_eq!(base.tail_len, tail, "seed {seed}, round {round}: the tail is whole");
                from_snapshot += 1;
                with_tail += (tail > 0) as usize;
                with_log += records.iter().any(|(q, _)| *q > base.seq) as usize;
                // A gap after the snapshot (the tail lost, as a power cut
                // could) sends the start to sled.
                if tail > 0 && records.first().is_none_or(|(q, _)| *q > base.seq + 1) && last > base.seq {
                    let kept = std::fs::read(tail_path(&cdir)).unwrap();
                    std::fs::write(tail_path(&cdir), b"").unwrap();
                    assert!(load(&cdir, &records, last).is_none(), "seed {seed}, round {round}: a gap was not seen");
                    std::fs::write(tail_path(&cdir), kept).unwrap();
                }
                // The store itself starts from there and has every write.
                let again = SledStore::open(&cdir).unwrap();
                assert_eq!(*again.shared.index.read(), want.0, "seed {seed}, round {round}");
                again.close();
            }
            s.close();
        }
        // Each stage was reached: the snapshot alone, with a tail, with the log.
        assert!(from_snapshot >= 20 && with_tail >= 5 && with_log >= 5, "{from_snapshot} {with_tail} {with_log}");
    }

    /// A start after a crash with a usable snapshot leaves the log's records
    /// in the log (sled gets them at the next checkpoint): the index has
    /// them at once, the purge outbox too, and sled has them after the
    /// next checkpoint, from which a start without the snapshot reads them.
    #[test]
    fn a_crash_start_leaves_the_log_to_the_next_checkpoint() {
        use crate::purge::Outbox;
        use crate::store::sled_store::PurgeOptions;
        use crate::store::trees::read_marker;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("db");
        workload(&dir, 3);
        let opts = || PurgeOptions { outbox: Arc::new(Outbox::new(["edge".to_owned()], 1000)), on_publish: false };
        let s = SledStore::open_with(&dir, opts()).unwrap();
        let mut x = 99;
        mixed(&s, &mut x, 60);
        s.purge(vec!["k1".into(), "k2".into()]).blocking().unwrap();
        s.purge(vec!["k3".into()]).blocking().unwrap();
        let one = tempfile::tempdir().unwrap();
        crash_copy(&s, &dir, one.path());
        let (two, want, last) = replayed_copy(&s, &dir);
        s.close();
        let (cdir, wdir) = (one.path().join("db"), two.path().join("db"));
        let marker = read_marker(&cdir).unwrap();
        assert!(marker < last, "the crash left records in the log only ({marker} < {last})");

        let opened = opts();
        let outbox = opened.outbox.clone();
        let s = SledStore::open_with(&cdir, opened).unwrap();
        assert_eq!(*s.shared.index.read(), want.0);
        assert_eq!(read_marker(&cdir).unwrap(), marker, "the start did not checkpoint");
        let waiting = outbox.queues()[0].take(100, 10_000).expect("the log's purges wait");
        assert!(waiting.ends_with(&["k1".into(), "k2".into(), "k3".into()]), "{waiting:?}");
        // The same as a start from sled with the log replayed into it.
        let replayed = opts();
        let (outbox, _s) = (replayed.outbox.clone(), SledStore::open_with(&wdir, replayed).unwrap());
        assert_eq!(outbox.queues()[0].take(100, 10_000), Some(waiting));
        // More writes, then a crash again: the log holds both starts' records.
        let b = BlogId::parse("late").unwrap();
        let id = s.invalidate(b.clone(), vec![]).blocking().unwrap();
        let three = tempfile::tempdir().unwrap();
        crash_copy(&s, &cdir, three.path());
        let again = SledStore::open(&three.path().join("db")).unwrap();
        assert_eq!(*again.shared.index.read(), *s.shared.index.read());
        again.close();
        // A clean stop checkpoints; without the snapshot, sled has it all.
        let (_four, want, _) = replayed_copy(&s, &cdir);
        s.close();
        drop(s);
        std::fs::remove_file(path(&cdir)).unwrap();
        let (got, seq) = from_sled(&cdir);
        assert!(seq > last);
        assert_eq!(got, want);
        assert_eq!(got.0.blogs["late"].floor, id);
    }

    /// A checkpoint applies the log to sled on a thread of its own: writes
    /// are answered meanwhile, those that outpace it wait for it, and sled
    /// ends up with the records written during it as well.
    #[test]
    fn writes_go_on_while_a_checkpoint_applies_the_log() {
        use crate::store::trees::read_marker;
        use crate::store::writer::{Tuning, HOLD_ROUNDS, ROUNDS_HELD};
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        use std::time::{Duration, Instant};
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("db");
        let tuning = Tuning { checkpoint_bytes: 256 << 10, snapshot_min: 4 << 20 };
        let s = Arc::new(SledStore::open_tuned(&dir, Default::default(), tuning).unwrap());
        let marker = read_marker(&dir).unwrap();
        /// Lets held rounds go when the test ends (else a failed assertion
        /// would hang in the store's last checkpoint).
        struct Release;
        impl Drop for Release {
            fn drop(&mut self) {
                *HOLD_ROUNDS.lock().unwrap_or_else(|e| e.into_inner()) = None;
            }
        }
        let release = Release;
        *HOLD_ROUNDS.lock().unwrap() = Some(dir.clone());
        let big = BlogId::parse("big").unwrap();
        let paths =
            |i: usize| (0..1000).map(move |k| BlogPath::parse(&format!("/round-{i}/posts/page-{k}.html")).unwrap());
        // Over a checkpoint's worth of log: a checkpoint begins, its round held.
        let mut n = 0;
        while ROUNDS_HELD.load(SeqCst) == 0 {
            assert!(n < 64, "no checkpoint round after {n} writes of 1,000 paths");
            s.invalidate(big.clone(), paths(n).collect()).blocking().unwrap();
            s.flush().blocking().unwrap();
            n += 1;
        }
        // Small writes are answered while it runs.
        let small = BlogId::parse("small").unwrap();
        for i in 0..3 {
            s.invalidate(small.clone(), vec![BlogPath::parse(&format!("/s{i}.css")).unwrap()]).blocking().unwrap();
        }
        assert_eq!(read_marker(&dir).unwrap(), marker, "the checkpoint is under way");
        // Writes of more than half the round's length wait for it (seven
        // more make more than half, under a checkpoint's worth).
        let answered = Arc::new(AtomicUsize::new(0));
        let more = {
            let (s, answered, big) = (s.clone(), answered.clone(), big.clone());
            std::thread::spawn(move || {
                for i in n..n + 7 {
                    s.invalidate(big.clone(), paths(i).collect()).blocking().unwrap();
                    answered.fetch_add(1, SeqCst);
                }
            })
        };
        std::thread::sleep(Duration::from_millis(500));
        let before = answered.load(SeqCst);
        assert!(before < 7, "7 writes of 1,000 paths answered while the checkpoint's round was held");
        drop(release);
        more.join().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while read_marker(&dir).unwrap() == marker {
            assert!(Instant::now() < deadline, "the checkpoint did not end");
            std::thread::sleep(Duration::from_millis(5));
        }
        // sled alone (a crash copy, its log left out) holds what was written
        // while the round was held.
        let copy = tempfile::tempdir().unwrap();
        crash_copy(&s, &dir, copy.path());
        let (got, _) = from_sled(&copy.path().join("db"));
        let index = s.shared.index.read();
        let got_small = &got.0.blogs["small"];
        assert_eq!(got_small.paths.len(), 3);
        assert_eq!(got_small.floor, index.blogs["small"].floor);
        assert!(got.0.blogs["big"].paths.len() >= (n + before) * 1000, "{}", got.0.blogs["big"].paths.len());
    }

    /// A crash while a checkpoint's round runs leaves more than a
    /// checkpoint's worth of log (writes go on meanwhile). The start serves
    /// from the snapshot and the log, and leaves the records to its first
    /// checkpoint, instead of applying them to sled before it serves.
    #[test]
    fn a_crash_mid_checkpoint_past_a_checkpoints_worth_of_log_is_not_replayed_into_sled_at_start() {
        use crate::store::trees::read_marker;
        use crate::store::writer::{Tuning, HOLD_ROUNDS, ROUNDS_HELD};
        use std::sync::atomic::Ordering::SeqCst;
        struct Release;
        impl Drop for Release {
            fn drop(&mut self) {
                *HOLD_ROUNDS.lock().unwrap_or_else(|e| e.into_inner()) = None;
            }
        }
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("db");
        let tuning = Tuning { checkpoint_bytes: 64 << 10, snapshot_min: 4 << 20 };
        // A snapshot to start from: the last one of a clean stop.
        workload(&dir, 3);
        let s = SledStore::open_tuned(&dir, Default::default(), tuning).unwrap();
        let release = Release;
        *HOLD_ROUNDS.lock().unwrap() = Some(dir.clone());
        let held = ROUNDS_HELD.load(SeqCst);
        // One write longer than the writer applies itself: a round begins
        // and is held, with the write's records in the log.
        let big = BlogId::parse("big").unwrap();
        let paths = |i: usize| (0..3000).map(move |k| BlogPath::parse(&format!("/r{i}/posts/page-{k}.html")).unwrap());
        let mut n = 0;
        while ROUNDS_HELD.load(SeqCst) == held {
            assert!(n < 8, "no checkpoint round after {n} writes of 3,000 paths");
            s.invalidate(big.clone(), paths(n).collect()).blocking().unwrap();
            s.flush().blocking().unwrap();
            n += 1;
        }
        let copy = tempfile::tempdir().unwrap();
        crash_copy(&s, &dir, copy.path());
        let (_replayed, want, _) = replayed_copy(&s, &dir);
        drop(release);
        s.close();
        let cdir = copy.path().join("db");
        let log = std::fs::read(cdir.with_extension("wal")).unwrap();
        let end = crate::store::wal::each_record(&log, |_, _| true) as u64;
        assert!(end > tuning.checkpoint_bytes && end <= 2 * tuning.checkpoint_bytes, "the log holds {end} bytes");
        let marker = read_marker(&cdir).unwrap();
        let again = SledStore::open_tuned(&cdir, Default::default(), tuning).unwrap();
        assert_eq!(*again.shared.index.read(), want.0);
        assert_eq!(read_marker(&cdir).unwrap(), marker, "the start applied the log to sled before serving");
        // Its stop's checkpoint applies them: sled alone has every write.
        again.close();
        drop(again);
        std::fs::remove_file(path(&cdir)).unwrap();
        let (got, _) = from_sled(&cdir);
        assert_eq!(got.0, want.0);
    }

    /// A start that replays the log into sled appends it to the snapshot's
    /// tail; once the tail is long by a checkpoint's rule, it writes a new
    /// snapshot instead. Before, the tail grew at each such start (293 MB
    /// beside a 20 MB snapshot after two), and every start read it all.
    #[test]
    fn a_start_that_replays_the_log_keeps_the_snapshots_tail_short() {
        use crate::store::writer::Tuning;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("db");
        workload(&dir, 6);
        // No checkpoint begins under 1 MiB of log (within 10 s).
        let quiet = Tuning { checkpoint_bytes: 1 << 20, ..Tuning::default() };
        let s = SledStore::open_tuned(&dir, Default::default(), quiet).unwrap();
        let big = BlogId::parse("big").unwrap();
        for i in 0..3 {
            let paths = (0..1000).map(|k| BlogPath::parse(&format!("/r{i}/page-{k}.html")).unwrap());
            s.invalidate(big.clone(), paths.collect()).blocking().unwrap();
        }
        let crashed = tempfile::tempdir().unwrap();
        crash_copy(&s, &dir, crashed.path());
        let (_replayed, want, last) = replayed_copy(&s, &dir);
        s.close();
        let cdir = crashed.path().join("db");
        let snap_len = std::fs::metadata(path(&cdir)).unwrap().len();
        // Past twice a checkpoint's worth: replayed into sled at the start.
        let small = Tuning { checkpoint_bytes: 16 << 10, snapshot_min: 4 << 10 };
        let again = SledStore::open_tuned(&cdir, Default::default(), small).unwrap();
        assert_eq!(*again.shared.index.read(), want.0);
        let tail = std::fs::metadata(tail_path(&cdir)).map(|m| m.len()).unwrap_or(0);
        assert!(tail < snap_len / 2, "a tail of {tail} bytes beside a snapshot of {snap_len}");
        again.close();
        drop(again);
        let (_, records) = crate::store::wal::Wal::open(&cdir.with_extension("wal")).unwrap();
        assert!(load(&cdir, &records, last).is_some(), "the next start reads the snapshot");
    }

    /// A start that reads sled writes a snapshot at once. Before, only a
    /// checkpoint's end did, and crashes that kept killing checkpoints kept
    /// every start on sled, slower as the store grew.
    #[test]
    fn a_start_from_sled_writes_a_snapshot_that_a_start_after_a_crash_uses() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("db");
        workload(&dir, 5);
        std::fs::remove_file(path(&dir)).unwrap();
        let s = SledStore::open(&dir).unwrap();
        assert!(path(&dir).exists(), "no snapshot after a start from sled");
        let mut x = 11;
        mixed(&s, &mut x, 30);
        let crashed = tempfile::tempdir().unwrap();
        crash_copy(&s, &dir, crashed.path());
        s.close();
        let cdir = crashed.path().join("db");
        let (want, records, last) = after_crash(&cdir);
        let (mut got, _) = load(&cdir, &records, last).expect("the snapshot is used after the crash");
        got.2.retain(|b, _| !got.1.contains_key(b));
        assert_eq!(got, want);
    }

    /// A torn write can leave records from before the log's last reset
    /// readable after the live ones. A start must not leave those for the
    /// next checkpoint, which applies every record the log holds: an old
    /// deletion would undo newer writes in sled.
    #[test]
    fn old_records_after_the_live_ones_are_not_left_for_a_checkpoint() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("db");
        workload(&dir, 5);
        let s = SledStore::open(&dir).unwrap();
        let mut x = 17;
        mixed(&s, &mut x, 40);
        let one = tempfile::tempdir().unwrap();
        crash_copy(&s, &dir, one.path());
        let (_two, want, _) = replayed_copy(&s, &dir);
        s.close();
        let cdir = one.path().join("db");
        // An old deletion of a blog that exists, where the live records end.
        let victim = want.0.blogs.keys().next().expect("a blog").to_string();
        let wal_path = cdir.with_extension("wal");
        let mut log = std::fs::read(&wal_path).unwrap();
        let end = crate::store::wal::each_record(&log, |_, _| true);
        assert!(end > 0, "the crash left records in the log");
        let stale = Rec::Delete { blog: victim.clone(), last: 1, hashes: vec![], domains: vec![] };
        let bytes = crate::store::wal::encode_record(1, &stale);
        log.splice(end..end + bytes.len() + 8, bytes.iter().copied().chain([0u8; 8]));
        std::fs::write(&wal_path, &log).unwrap();
        // Started, and stopped (its checkpoint): sled has what a replay
        // of the live records gives, the blog included.
        let s = SledStore::open(&cdir).unwrap();
        assert_eq!(*s.shared.index.read(), want.0);
        s.close();
        drop(s);
        std::fs::remove_file(path(&cdir)).unwrap();
        let (got, _) = from_sled(&cdir);
        assert!(got.0.blogs.contains_key(victim.as_str()), "an old record undid {victim} in sled");
        assert_eq!(got.0, want.0);
    }

    /// A group refused by a full disk gives its record numbers back: the
    /// next writes take them, so the log runs without a gap, and a snapshot
    /// taken after the refusal names a record that exists. (Numbers skipped
    /// there once let a later start take new records for ones the snapshot
    /// already held, and lose them.)
    #[test]
    fn a_refused_group_leaves_no_gap_and_the_next_crash_start_has_every_write() {
        use crate::store::wal::REFUSE_APPENDS;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("db");
        workload(&dir, 11);
        let s = SledStore::open(&dir).unwrap();
        let b = BlogId::parse("late").unwrap();
        let p = |n: u32| BlogPath::parse(&format!("/x/{n}.css")).unwrap();
        s.invalidate(b.clone(), vec![p(1)]).blocking().unwrap();
        *REFUSE_APPENDS.lock().unwrap() = Some(dir.with_extension("wal"));
        let refused = s.invalidate(b.clone(), vec![p(2), p(3)]).blocking();
        *REFUSE_APPENDS.lock().unwrap() = None;
        assert!(matches!(refused, Err(crate::store::StoreError::Full(_))), "{refused:?}");
        let id = s.invalidate(b.clone(), vec![p(4)]).blocking().unwrap();
        let crashed = tempfile::tempdir().unwrap();
        crash_copy(&s, &dir, crashed.path());
        s.close();
        let cdir = crashed.path().join("db");
        let (want, records, last) = after_crash(&cdir);
        let seqs: Vec<u64> = records.iter().map(|(q, _)| *q).collect();
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "the log skips record numbers: {seqs:?}");
        let (mut got, _) = load(&cdir, &records, last).expect("the snapshot and the log follow one another");
        got.2.retain(|b, _| !got.1.contains_key(b));
        assert_eq!(got, want);
        let late = &got.0.blogs["late"].paths;
        assert_eq!(late.get("/x/4.css").map(|f| f.version), Some(id));
        assert!(late.get("/x/2.css").is_none(), "a refused write is not in the index");
    }
}
