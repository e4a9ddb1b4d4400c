//! One blog's path versions, laid out for memory: a hash table of 16-byte
//! slots (where the path's bytes are, and the version), the paths' bytes
//! one after another in one buffer, and the few bindings in a map beside.
//!
//! A `HashMap<Box<str>, PathEntry>` costs a 32-byte slot plus a heap string
//! (33 bytes take a 40-byte allocation) per path, and the strings end up
//! spread among whatever else the writer thread allocated. Here a path
//! costs its slot and its bytes, and the buffer grows by an eighth at a
//! time. A look-up hashes the path, finds the slot, and compares the bytes
//! in the buffer: the same two memory reads as before, in a smaller table.
//!
//! Paths are never removed one by one (a write sets a path's version or
//! binding); the one removal, a floor raise dropping the unbound versions,
//! builds the table and the buffer again from what is kept.

use std::fmt;
use std::sync::Arc;

use hashbrown::hash_table::{Entry, HashTable};

use super::index::FastMap;
use crate::domain::{CacheId, ContentHash};

/// A permanent asset a path is bound to: its hash and the file name its URL ends with.
pub type Binding = Box<(ContentHash, Arc<str>)>;

/// A path's version and binding, as written (by the log, sled or a snapshot).
#[derive(Debug, Clone, PartialEq)]
pub struct PathEntry {
    pub version: CacheId,
    pub binding: Option<Binding>,
}

/// A path's version and binding, as found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Found<'a> {
    pub version: CacheId,
    pub binding: Option<&'a (ContentHash, Arc<str>)>,
}

/// `at`: the path's offset in the buffer (bits 0..48), its length (48..63;
/// paths are at most `domain::MAX_PATH_BYTES`), and whether it is bound (63).
#[derive(Clone, Copy)]
struct Slot {
    at: u64,
    version: CacheId,
}

const OFFSET: u64 = (1 << 48) - 1;
const BOUND: u64 = 1 << 63;

impl Slot {
    fn range(self) -> std::ops::Range<usize> {
        let off = (self.at & OFFSET) as usize;
        off..off + ((self.at & !BOUND) >> 48) as usize
    }

    fn offset(self) -> u64 {
        self.at & OFFSET
    }
}

#[derive(Default, Clone)]
pub struct Paths {
    table: HashTable<Slot>,
    bytes: Vec<u8>,
    /// By the bound path's offset in `bytes`.
    bindings: FastMap<u64, Binding>,
    hasher: ahash::RandomState,
}

impl Paths {
    /// Room for `n` paths without growing the table.
    pub fn with_capacity(n: usize) -> Paths {
        Paths { table: HashTable::with_capacity(n), ..Default::default() }
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// How many of the paths have a binding.
    pub fn bound(&self) -> usize {
        self.bindings.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    fn found(&self, s: Slot) -> Found<'_> {
        let binding = if s.at & BOUND != 0 { self.bindings.get(&s.offset()).map(|b| &**b) } else { None };
        Found { version: s.version, binding }
    }

    fn path(&self, s: Slot) -> &str {
        std::str::from_utf8(&self.bytes[s.range()]).expect("the buffer holds whole UTF-8 paths")
    }

    pub fn get(&self, path: &str) -> Option<Found<'_>> {
        let hash = self.hasher.hash_one(path.as_bytes());
        let s = *self.table.find(hash, |s| &self.bytes[s.range()] == path.as_bytes())?;
        Some(self.found(s))
    }

    /// Sets a path's version and binding, adding the path if it is new.
    pub fn insert(&mut self, path: &str, e: PathEntry) {
        let Paths { table, bytes, bindings, hasher } = self;
        let hash = hasher.hash_one(path.as_bytes());
        let slot =
            match table.entry(hash, |s| &bytes[s.range()] == path.as_bytes(), |s| hasher.hash_one(&bytes[s.range()])) {
                Entry::Occupied(o) => o.into_mut(),
                Entry::Vacant(v) => {
                    let len = path.len() as u64;
                    assert!(len < 1 << 15, "paths are at most domain::MAX_PATH_BYTES long");
                    let off = bytes.len() as u64;
                    assert!(off + len <= OFFSET, "a blog's paths hold under 256 TiB");
                    if bytes.capacity() - bytes.len() < path.len() {
                        // An eighth at a time: at most that much unused.
                        bytes.reserve_exact(path.len().max(bytes.len() / 8).max(256));
                    }
                    bytes.extend_from_slice(path.as_bytes());
                    v.insert(Slot { at: off | len << 48, version: 0 }).into_mut()
                }
            };
        slot.version = e.version;
        match e.binding {
            Some(b) => {
                slot.at |= BOUND;
                bindings.insert(slot.offset(), b);
            }
            None if slot.at & BOUND != 0 => {
                slot.at &= !BOUND;
                bindings.remove(&slot.offset());
            }
            None => {}
        }
    }

    /// Keeps the paths `keep` says yes to, in a table and a buffer of their size.
    pub fn retain(&mut self, mut keep: impl FnMut(&str, Found<'_>) -> bool) {
        let kept: Vec<Slot> = self.table.iter().copied().filter(|s| keep(self.path(*s), self.found(*s))).collect();
        if kept.len() == self.len() {
            return;
        }
        let mut out = Paths::with_capacity(kept.len());
        out.bytes.reserve_exact(kept.iter().map(|s| s.range().len()).sum());
        out.hasher = self.hasher.clone();
        for s in kept {
            let binding = if s.at & BOUND != 0 { self.bindings.remove(&s.offset()) } else { None };
            out.insert(self.path(s), PathEntry { version: s.version, binding });
        }
        *self = out;
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, Found<'_>)> + '_ {
        self.table.iter().map(|s| (self.path(*s), self.found(*s)))
    }
}

impl PartialEq for Paths {
    fn eq(&self, other: &Paths) -> bool {
        self.len() == other.len() && self.iter().all(|(p, f)| other.get(p) == Some(f))
    }
}

impl fmt::Debug for Paths {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bound(n: u8) -> Option<Binding> {
        Some(Box::new((ContentHash([n; 16]), Arc::from(format!("f{n}.png")))))
    }

    #[test]
    fn paths_set_read_rebind_and_prune_like_a_map() {
        let mut p = Paths::default();
        let mut want: std::collections::HashMap<String, PathEntry> = Default::default();
        let mut x = 7u64;
        for i in 0..20_000u64 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let path = format!("/p/{}/ü {}.css", (x >> 33) % 3000, i % 7);
            let e = PathEntry { version: i, binding: if (x >> 20) % 5 == 0 { bound((i % 200) as u8) } else { None } };
            p.insert(&path, e.clone());
            want.insert(path, e);
            if i % 4999 == 0 {
                // A floor raise: the unbound ones go.
                p.retain(|_, f| f.binding.is_some());
                want.retain(|_, e| e.binding.is_some());
            }
        }
        assert_eq!(p.len(), want.len());
        for (path, e) in &want {
            let f = p.get(path).unwrap();
            assert_eq!((f.version, f.binding.cloned()), (e.version, e.binding.as_deref().cloned()), "{path}");
        }
        assert!(p.get("/not/there").is_none());
        assert_eq!(p.iter().count(), want.len());
        assert_eq!(p.bindings.len(), want.values().filter(|e| e.binding.is_some()).count());
        // Equal to the same paths inserted in another order.
        let mut q = Paths::default();
        let mut all: Vec<_> = want.iter().collect();
        all.reverse();
        for (path, e) in all {
            q.insert(path, e.clone());
        }
        assert_eq!(p, q);
        q.insert("/p/extra", PathEntry { version: 1, binding: None });
        assert_ne!(p, q);
    }
}
