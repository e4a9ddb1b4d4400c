//! sled's side of the embedded store: its trees on disk, how a durable
//! write is applied to them (at checkpoints and start-up), how they are
//! read back into the index, and the checkpoint marker.
//!
//! Trees (keys are `blog 0x00 rest`, which sorts a blog's keys together and
//! cannot collide: neither blog ids nor paths hold NUL):
//! - `blogs`:   blog → floor u64 BE, last assigned cache id u64 BE
//! - `paths`:   blog\0path → version u64 BE [, hash 16 bytes, filename]
//! - `refs`:    blog\0hash16 → size u64 BE, content type
//! - `domains`: domain → blog
//! - `gc`:      hash16 → () — blobs whose last reference may be gone
//! - `deleted`: blog → its last cache id u64 BE, for blogs deleted (ignored
//!   while a blog of that id exists again)
//! - `meta`:    `wal_seq` → the last write-ahead log record sled holds
//! - `purges`:  record u64 BE → enqueued at (ms u64 BE), then keys (u32 LE
//!   length, bytes): the edge purge outbox, until every target sent it
//! - `purge_sent`: target name → the last record it was sent up to, u64 BE
//!
//! sled is written only at start-up (log replay) and at checkpoints, by the
//! writer thread; it is never read after start-up.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::index::{BlogState, FastMap, Index, PathEntry, Paths};
use super::snapshot::Loaded;
use super::wal::Rec;
use super::writer::Ids;
use super::{AssetRef, StoreError};
use crate::domain::{BlogId, CacheId, ContentHash};

/// sled's page cache, held only while a checkpoint has sled open. The
/// checkpoint's inserts touch pages all over the paths tree: with 8 MiB,
/// the soak's 320,000 paths made sled read pages back while writes waited
/// for its rounds (a small publish beside them: p99 34-76 ms, max 1.0-1.1 s
/// paced); with 64 MiB, 12-17 ms and 0.38-0.56 s, and 15-35% more writes
/// taken flat out, for up to 56 MiB more RSS during checkpoints (see
/// BENCHMARKS.md, "sled's cache during checkpoints").
const SLED_CACHE_BYTES: u64 = 64 << 20;

/// sled's trees (handles: a clone shares them).
#[derive(Clone)]
pub struct Trees {
    pub db: sled::Db,
    blogs: sled::Tree,
    paths: sled::Tree,
    refs: sled::Tree,
    domains: sled::Tree,
    gc: sled::Tree,
    deleted: sled::Tree,
    /// `wal_seq`: the last log record sled holds durably.
    meta: sled::Tree,
    purges: sled::Tree,
    purge_sent: sled::Tree,
}

/// The room on the database's disk below which it is not opened: what
/// sled writes as it opens (a 512 KiB segment), with some to spare.
const OPEN_ROOM: u64 = 1 << 20;

impl Trees {
    pub fn open(dir: &Path) -> Result<Trees, StoreError> {
        // sled writes a segment as it opens (512 KiB, more after a crash):
        // on a disk without that room it failed with a bare ENOSPC, after
        // taking what room there was, so each start tried again (as a
        // service manager does) left less. Refused before it writes.
        let full = |room: u64| {
            StoreError::Full(format!(
                "the disk of {} has {} KB free; opening the database needs about {} MB: free space and start \
                 again (nothing was changed, no acknowledged write is lost)",
                dir.display(),
                room >> 10,
                OPEN_ROOM >> 20
            ))
        };
        if let Some(room) = crate::durable::free_bytes(dir).filter(|r| *r < OPEN_ROOM) {
            return Err(full(room));
        }
        // Reads are served by the index, so sled's own cache only has to hold
        // what checkpoints touch. No background flushes: durability comes
        // from the log, and sled is flushed at checkpoints.
        let config = sled::Config::new().path(dir).cache_capacity(SLED_CACHE_BYTES).flush_every_ms(None);
        // A store closed a moment ago in this process may still hold its
        // file lock in one of sled's I/O threads: wait for it, briefly.
        let mut tries = 0;
        let db = loop {
            match config.open() {
                Err(e) if tries < 30 && e.to_string().contains("could not acquire lock") => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                Err(sled::Error::Io(e)) if crate::durable::is_disk_full(&e) => {
                    return Err(full(crate::durable::free_bytes(dir).unwrap_or(0)));
                }
                r => break r.map_err(|e| StoreError::Open { path: dir.display().to_string(), source: e })?,
            }
        };
        Ok(Trees {
            blogs: db.open_tree("blogs")?,
            paths: db.open_tree("paths")?,
            refs: db.open_tree("refs")?,
            domains: db.open_tree("domains")?,
            gc: db.open_tree("gc")?,
            deleted: db.open_tree("deleted")?,
            meta: db.open_tree("meta")?,
            purges: db.open_tree("purges")?,
            purge_sent: db.open_tree("purge_sent")?,
            db,
        })
    }
}

fn key(blog: &str, rest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(blog.len() + 1 + rest.len());
    k.extend_from_slice(blog.as_bytes());
    k.push(0);
    k.extend_from_slice(rest);
    k
}

fn split_key<'a>(tree: &'static str, k: &'a [u8]) -> Result<(&'a str, &'a [u8]), StoreError> {
    let pos = k.iter().position(|&b| b == 0).ok_or_else(|| corrupt(tree, "key without separator"))?;
    let blog = std::str::from_utf8(&k[..pos]).map_err(|_| corrupt(tree, "blog id not UTF-8"))?;
    Ok((blog, &k[pos + 1..]))
}

fn corrupt(tree: &'static str, what: &str) -> StoreError {
    StoreError::Corrupt { tree, what: what.to_owned() }
}

fn u64_at(tree: &'static str, v: &[u8], at: usize) -> Result<u64, StoreError> {
    v.get(at..at + 8)
        .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
        .ok_or_else(|| corrupt(tree, "value too short"))
}

fn hash_at(tree: &'static str, v: &[u8], at: usize) -> Result<ContentHash, StoreError> {
    v.get(at..at + 16)
        .map(|b| ContentHash(b.try_into().expect("16 bytes")))
        .ok_or_else(|| corrupt(tree, "hash too short"))
}

/// Blogs whose floor rose in a run of records (see [`apply`]).
pub(super) type Raised = std::collections::HashSet<Box<str>>;

/// Drops, in each blog of `raised`, the path versions below its floor that
/// have no binding: what each raise would have dropped as it came (those
/// written before it have lower ids, those after it higher ones), and what
/// the index dropped. A blog deleted since is skipped.
pub(super) fn sweep(t: &Trees, raised: Raised) -> Result<(), sled::Error> {
    for blog in raised {
        let Some(v) = t.blogs.get(blog.as_bytes())? else {
            continue;
        };
        let Ok(floor) = u64_at("blogs", &v, 0) else {
            continue;
        };
        for kv in t.paths.scan_prefix(key(&blog, b"")) {
            let (pk, v) = kv?;
            if v.len() == 8 && u64_at("paths", &v, 0).is_ok_and(|id| id < floor) {
                t.paths.remove(pk)?;
            }
        }
    }
    Ok(())
}

fn blog_value(floor: CacheId, last: CacheId) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&floor.to_be_bytes());
    v[8..].copy_from_slice(&last.to_be_bytes());
    v
}

type PathsByBlog = Vec<(Box<str>, Paths)>;

/// Reads the paths in `[from, to)`, grouped by blog (keys sort by blog).
/// Each blog's entries are gathered first so its map is built at its final
/// size: no rehashing, no outgrown tables left behind.
fn read_paths(tree: &sled::Tree, from: Option<Vec<u8>>, to: Option<Vec<u8>>) -> Result<PathsByBlog, StoreError> {
    use std::ops::Bound;
    type Entries = (Box<str>, Vec<(Box<str>, PathEntry)>);
    let lo = from.map_or(Bound::Unbounded, Bound::Included);
    let hi = to.map_or(Bound::Unbounded, Bound::Excluded);
    let mut out: PathsByBlog = Vec::new();
    let finish = |out: &mut PathsByBlog, (blog, entries): Entries| {
        let mut map = Paths::with_capacity(entries.len());
        for (p, e) in entries {
            map.insert(&p, e);
        }
        out.push((blog, map));
    };
    let mut current: Option<Entries> = None;
    for kv in tree.range::<Vec<u8>, _>((lo, hi)) {
        let (k, v) = kv?;
        let (blog, path) = split_key("paths", &k)?;
        let path = std::str::from_utf8(path).map_err(|_| corrupt("paths", "path not UTF-8"))?;
        let entry = decode_path_entry(&v)?;
        if current.as_ref().is_none_or(|(b, _)| &**b != blog) {
            if let Some(done) = current.take() {
                finish(&mut out, done);
            }
            current = Some((blog.into(), Vec::new()));
        }
        current.as_mut().expect("set").1.push((path.into(), entry));
    }
    if let Some(done) = current.take() {
        finish(&mut out, done);
    }
    Ok(out)
}

/// Reads every tree into the index. The `paths` tree (by far the largest)
/// is read in two halves on two threads while this one reads the rest:
/// start-up time is what a restart costs the renderers.
pub(super) fn load(t: &Trees) -> Result<Loaded, StoreError> {
    let mut index = Index::default();
    let mut ids = FastMap::default();
    let mut names = Vec::new();
    for kv in t.blogs.iter() {
        let (k, v) = kv?;
        let blog = std::str::from_utf8(&k).map_err(|_| corrupt("blogs", "blog id not UTF-8"))?;
        let (floor, last) = (u64_at("blogs", &v, 0)?, u64_at("blogs", &v, 8)?);
        index.blogs.insert(blog.into(), BlogState { floor, ..Default::default() });
        ids.insert(blog.into(), Ids { floor, last });
        names.push(blog.to_owned());
    }
    // Split the paths at the middle blog (blogs come sorted from sled).
    let mid = names.get(names.len() / 2).map(|b| key(b, b"")).unwrap_or_default();
    let readers = [(None, Some(mid.clone())), (Some(mid), None)].map(|(from, to)| {
        let tree = t.paths.clone();
        std::thread::spawn(move || read_paths(&tree, from, to))
    });
    for kv in t.refs.iter() {
        let (k, v) = kv?;
        let (blog, hash) = split_key("refs", &k)?;
        let hash = hash_at("refs", hash, 0)?;
        let aref = decode_ref(&v)?;
        let state = index.blogs.get_mut(blog).ok_or_else(|| corrupt("refs", "reference of an unknown blog"))?;
        if state.refs.insert(hash, aref).is_none() {
            *index.blob_refs.entry(hash).or_default() += 1;
        }
    }
    for kv in t.domains.iter() {
        let (k, v) = kv?;
        let domain = std::str::from_utf8(&k).map_err(|_| corrupt("domains", "domain not UTF-8"))?;
        let blog = std::str::from_utf8(&v).map_err(|_| corrupt("domains", "blog id not UTF-8"))?;
        let blog_id = BlogId::parse(blog).map_err(|e| corrupt("domains", &e.to_string()))?;
        if let Some(state) = index.blogs.get_mut(blog) {
            state.domains.insert(domain.into());
        }
        index.domains.insert(domain.into(), blog_id);
    }
    let mut deleted_last = FastMap::default();
    for kv in t.deleted.iter() {
        let (k, v) = kv?;
        let blog = std::str::from_utf8(&k).map_err(|_| corrupt("deleted", "blog id not UTF-8"))?;
        if !index.blogs.contains_key(blog) {
            index.deleted.insert(blog.into());
            deleted_last.insert(blog.into(), u64_at("deleted", &v, 0)?);
        }
    }
    for kv in t.gc.iter() {
        index.gc.insert(hash_at("gc", &kv?.0, 0)?);
    }
    for r in readers {
        let by_blog = r.join().map_err(|_| corrupt("paths", "reader thread panicked"))??;
        for (blog, mut paths) in by_blog {
            let state = index.blogs.get_mut(&blog).ok_or_else(|| corrupt("paths", "path of an unknown blog"))?;
            // Versions below the floor without a binding (left by data dirs
            // from before floor raises pruned them) say nothing.
            let floor = state.floor;
            paths.retain(|_, e| e.binding.is_some() || e.version >= floor);
            if state.paths.is_empty() {
                state.paths = paths;
            } else {
                for (p, e) in paths.iter() {
                    state.paths.insert(p, PathEntry { version: e.version, binding: e.binding.cloned().map(Box::new) });
                }
            }
        }
    }
    Ok((index, ids, deleted_last))
}

/// Fills the outbox from sled: each configured target gets the purge
/// records past its delivered mark. Records every configured target has
/// sent are dropped first; with no target (fsck, a server started without
/// its targets) nothing is dropped.
///
/// `pending`: log records sled does not hold yet (a start that left them
/// in the log), taken as if applied after sled's.
pub(super) fn load_purges(
    t: &Trees,
    outbox: &crate::purge::Outbox,
    last_seq: u64,
    pending: &[(u64, Rec)],
) -> Result<FastMap<String, u64>, StoreError> {
    let mut sent = FastMap::default();
    for kv in t.purge_sent.iter() {
        let (k, v) = kv?;
        let name = std::str::from_utf8(&k).map_err(|_| corrupt("purge_sent", "target not UTF-8"))?;
        sent.insert(name.to_owned(), u64_at("purge_sent", &v, 0)?);
    }
    let low = outbox.queues().iter().map(|q| sent.get(&q.name).copied().unwrap_or(0)).min().unwrap_or(0);
    let mut records = Vec::new();
    for kv in t.purges.iter() {
        let (k, v) = kv?;
        let seq = u64_at("purges", &k, 0)?;
        if seq <= low {
            t.purges.remove(k)?;
            continue;
        }
        records.push((seq, u64_at("purges", &v, 0)?, decode_keys(&v[8..])?));
    }
    // As `apply` would leave sled.
    for (seq, rec) in pending {
        match rec {
            Rec::Purge { at_ms, keys } => records.push((*seq, *at_ms, keys.clone())),
            Rec::PurgeSent { target, upto, prune } => {
                sent.insert(target.clone(), *upto);
                records.retain(|(s, ..)| s > prune);
            }
            _ => {}
        }
    }
    outbox.restore(&sent, records.iter().map(|(s, a, k)| (*s, *a, &k[..])), last_seq);
    if !records.is_empty() {
        tracing::info!(records = records.len(), "purges waiting from before the restart");
    }
    Ok(sent)
}

fn decode_keys(mut v: &[u8]) -> Result<Vec<String>, StoreError> {
    let mut keys = Vec::new();
    while !v.is_empty() {
        let n = v.get(..4).map(|b| u32::from_le_bytes(b.try_into().expect("4")) as usize);
        let key = n.and_then(|n| v.get(4..4 + n)).ok_or_else(|| corrupt("purges", "key cut short"))?;
        keys.push(std::str::from_utf8(key).map_err(|_| corrupt("purges", "key not UTF-8"))?.to_owned());
        v = &v[4 + key.len()..];
    }
    Ok(keys)
}

/// Applies a durable write to sled's trees (in memory until the flush that
/// ends a checkpoint). The same function serves checkpoints and start-up's
/// replay, so both agree; applying a record twice gives what once gives.
///
/// One insert at a time, never a `sled::Batch`: sled holds everything a
/// batch replaces until the whole batch is done, and a publish pipeline's
/// 10,000-path invalidations made that memory grow without bound. The log,
/// not sled, is what makes a write atomic and durable.
///
/// A floor raise only names its blog in `raised`: [`sweep`], once the run
/// of records is applied, drops the path versions the floor made
/// meaningless, once per blog however often it rose (a pipeline that
/// republishes a blog with thousands of bound paths again and again made
/// each raise scan them all, and writes waited a minute for a checkpoint).
pub(super) fn apply(t: &Trees, seq: u64, rec: &Rec, raised: &mut Raised) -> Result<(), sled::Error> {
    match rec {
        Rec::Invalidate { blog, id, floor, paths } => {
            t.blogs.insert(blog.as_bytes(), &blog_value(*floor, *id))?;
            let mut k = key(blog, b"");
            if paths.is_empty() && !raised.contains(blog.as_str()) {
                raised.insert(blog.as_str().into());
            }
            let prefix = k.len();
            for p in paths {
                k.truncate(prefix);
                k.extend_from_slice(p.as_bytes());
                t.paths.insert(&k[..], &id.to_be_bytes())?;
            }
        }
        Rec::Bind { blog, id, floor, path, hash, size, content_type, filename } => {
            t.blogs.insert(blog.as_bytes(), &blog_value(*floor, *id))?;
            // The first upload's type stays (see `Index::apply`).
            let rk = key(blog, hash);
            if !t.refs.contains_key(&rk)? {
                let mut rv = Vec::with_capacity(8 + content_type.len());
                rv.extend_from_slice(&size.to_be_bytes());
                rv.extend_from_slice(content_type.as_bytes());
                t.refs.insert(rk, rv)?;
            }
            if let Some(p) = path {
                let mut pv = Vec::with_capacity(24 + filename.len());
                pv.extend_from_slice(&id.to_be_bytes());
                pv.extend_from_slice(hash);
                pv.extend_from_slice(filename.as_bytes());
                t.paths.insert(key(blog, p.as_bytes()), pv)?;
            }
        }
        Rec::SetDomain { domain, blog, create } => {
            if let Some(id) = create {
                t.blogs.insert(blog.as_bytes(), &blog_value(*id, *id))?;
            }
            t.domains.insert(domain.as_bytes(), blog.as_bytes())?;
        }
        Rec::RemoveDomain { domain } => {
            t.domains.remove(domain.as_bytes())?;
        }
        Rec::Delete { blog, last, hashes, domains } => {
            // Garbage candidates first: whatever a crash leaves, start-up
            // finds the candidates and finishes.
            for h in hashes {
                t.gc.insert(h, &[])?;
            }
            t.deleted.insert(blog.as_bytes(), &last.to_be_bytes())?;
            let prefix = key(blog, b"");
            for tree in [&t.paths, &t.refs] {
                for kv in tree.scan_prefix(&prefix) {
                    tree.remove(kv?.0)?;
                }
            }
            for d in domains {
                // Only if it still points at this blog.
                if t.domains.get(d.as_bytes())?.is_some_and(|v| v.as_ref() == blog.as_bytes()) {
                    t.domains.remove(d.as_bytes())?;
                }
            }
            t.blogs.remove(blog.as_bytes())?;
        }
        Rec::GcDone { hash } => {
            t.gc.remove(hash)?;
        }
        Rec::Unref { blog, id, floor, hash, paths } => {
            t.blogs.insert(blog.as_bytes(), &blog_value(*floor, *id))?;
            t.gc.insert(hash, &[])?;
            t.refs.remove(key(blog, hash))?;
            for p in paths {
                t.paths.insert(key(blog, p.as_bytes()), &id.to_be_bytes())?;
            }
        }
        Rec::Purge { at_ms, keys } => {
            let mut v = Vec::with_capacity(8 + keys.iter().map(|k| 4 + k.len()).sum::<usize>());
            v.extend_from_slice(&at_ms.to_be_bytes());
            for k in keys {
                v.extend_from_slice(&(k.len() as u32).to_le_bytes());
                v.extend_from_slice(k.as_bytes());
            }
            t.purges.insert(seq.to_be_bytes(), v)?;
        }
        Rec::PurgeSent { target, upto, prune } => {
            t.purge_sent.insert(target.as_bytes(), &upto.to_be_bytes())?;
            for kv in t.purges.range(..=prune.to_be_bytes()) {
                t.purges.remove(kv?.0)?;
            }
        }
    }
    Ok(())
}

const CHECKPOINT_KEY: &[u8] = b"wal_seq";

/// The last log record sled holds (its checkpoint), 0 for a new database.
pub(super) fn sled_seq(t: &Trees) -> Result<u64, StoreError> {
    Ok(t.meta.get(CHECKPOINT_KEY)?.map(|v| u64_at("meta", &v, 0)).transpose()?.unwrap_or(0))
}

/// sled holds every record up to `seq` once this returns, and the caller
/// may empty the log. The marker beside the database records `seq`
/// (durably) first, so a sled that later opens older than that is caught.
pub(super) fn checkpoint(t: &Trees, dir: &Path, seq: u64) -> Result<(), StoreError> {
    t.meta.insert(CHECKPOINT_KEY, &seq.to_be_bytes())?;
    t.db.flush()?;
    // sled's flush ends in `sync_file_range`, which neither reaches the
    // disk's cache nor saves the file's size or new names: fsync its files
    // and folder before the log that still holds these writes is emptied.
    crate::durable::sync_tree(dir)?;
    write_marker(dir, seq)?;
    Ok(())
}

pub(super) fn marker_path(dir: &Path) -> PathBuf {
    dir.with_extension("checkpoint")
}

/// The last checkpoint's record number, 0 when none was written yet.
pub(super) fn read_marker(dir: &Path) -> Result<u64, StoreError> {
    let p = marker_path(dir);
    match std::fs::read(&p) {
        Ok(b) if b.len() == 12 && blake3::hash(&b[..8]).as_bytes()[..4] == b[8..] => {
            Ok(u64::from_le_bytes(b[..8].try_into().expect("8")))
        }
        Ok(_) => Err(StoreError::Corrupt { tree: "checkpoint marker", what: format!("{} is damaged", p.display()) }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e.into()),
    }
}

fn write_marker(dir: &Path, seq: u64) -> Result<(), StoreError> {
    use std::io::Write;
    let p = marker_path(dir);
    let tmp = p.with_extension("checkpoint.tmp");
    let mut body = seq.to_le_bytes().to_vec();
    body.extend_from_slice(&blake3::hash(&seq.to_le_bytes()).as_bytes()[..4]);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&body)?;
    f.sync_data()?;
    std::fs::rename(&tmp, &p)?;
    if let Some(parent) = p.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

fn decode_path_entry(v: &[u8]) -> Result<PathEntry, StoreError> {
    let version = u64_at("paths", v, 0)?;
    let binding = if v.len() > 8 {
        let hash = hash_at("paths", v, 8)?;
        let name = std::str::from_utf8(&v[24..]).map_err(|_| corrupt("paths", "filename not UTF-8"))?;
        Some(Box::new((hash, Arc::from(name))))
    } else {
        None
    };
    Ok(PathEntry { version, binding })
}

fn decode_ref(v: &[u8]) -> Result<AssetRef, StoreError> {
    let size = u64_at("refs", v, 0)?;
    let ct = std::str::from_utf8(&v[8..]).map_err(|_| corrupt("refs", "content type not UTF-8"))?;
    Ok(AssetRef { size, content_type: Arc::from(ct) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inv(blog: &str, id: u64, floor: u64, paths: &[&str]) -> Rec {
        Rec::Invalidate { blog: blog.into(), id, floor, paths: paths.iter().map(|p| p.to_string()).collect() }
    }

    /// Paths of `blog` in sled, in order.
    fn paths_of(t: &Trees, blog: &str) -> Vec<String> {
        t.paths
            .scan_prefix(key(blog, b""))
            .map(|kv| String::from_utf8(kv.unwrap().0[blog.len() + 1..].to_vec()).unwrap())
            .collect()
    }

    /// Floor raises swept once at the end of a run leave what sweeping at
    /// each raise left: the bound paths and those written after the last
    /// raise; nothing of a blog deleted meanwhile. Split into two runs at
    /// any record, the same.
    #[test]
    fn raises_swept_at_the_end_of_a_run_drop_what_each_would_have() {
        let records = vec![
            inv("b", 10, 10, &["/a", "/b"]),
            Rec::Bind {
                blog: "b".into(),
                id: 11,
                floor: 10,
                path: Some("/c".into()),
                hash: [7; 16],
                size: 3,
                content_type: "text/plain".into(),
                filename: "c".into(),
            },
            inv("b", 12, 12, &[]),
            inv("b", 13, 12, &["/d"]),
            inv("b", 14, 14, &[]),
            inv("b", 15, 14, &["/e", "/a"]),
            inv("x", 5, 5, &["/z"]),
            inv("x", 6, 6, &[]),
            Rec::Delete { blog: "x".into(), last: 6, hashes: vec![], domains: vec![] },
        ];
        for split in 0..=records.len() {
            let dir = tempfile::tempdir().unwrap();
            let t = Trees::open(&dir.path().join("db")).unwrap();
            for run in [&records[..split], &records[split..]] {
                let mut raised = Raised::new();
                for (i, rec) in run.iter().enumerate() {
                    apply(&t, i as u64 + 1, rec, &mut raised).unwrap();
                }
                sweep(&t, raised).unwrap();
            }
            assert_eq!(paths_of(&t, "b"), ["/a", "/c", "/e"], "split at {split}");
            assert!(paths_of(&t, "x").is_empty(), "split at {split}");
        }
    }
}
