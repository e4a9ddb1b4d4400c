//! A byte-bounded cache of small hot files, keyed by (blog, path) and
//! stamped with the version they were read at: a publish changes the version,
//! so a stale entry is never served, only replaced. Eviction is first in,
//! first out, which keeps reads lock-shared (no recency to update).

use std::collections::VecDeque;
use std::fs::Metadata;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method};
use parking_lot::RwLock;

use super::answer::{http_date, respond, FileAnswer, Source};
use super::IMMUTABLE;
use crate::domain::CacheId;

/// What an entry costs besides its bytes and path, counted against the cap:
/// its answer's headers made beforehand (ten header entries of about a
/// hundred bytes each, their table, the values they share) and the rest.
const ENTRY_OVERHEAD: u64 = 1536;

/// What an entry counts against the cap.
fn cost(bytes: usize, path: &str) -> u64 {
    bytes as u64 + path.len() as u64 + ENTRY_OVERHEAD
}

pub struct HotFile {
    content_type: HeaderValue,
    etag: HeaderValue,
    last_modified: HeaderValue,
    modified: SystemTime,
    cors: bool,
    /// The whole body's `Content-Length`, made once (a header value from a
    /// number is an allocation, on every answer otherwise).
    length: HeaderValue,
    /// A blog file's purge tag, its blog id, made once for the same reason.
    /// Empty for a blob: its answers name the blog asking.
    pub(super) tag: HeaderValue,
    bytes: Bytes,
    /// The headers of its usual answer (GET, whole, no validator asked
    /// about, `IMMUTABLE`), made by `respond` when kept: copying them costs
    /// a third of adding them one by one, the largest part of a hot answer
    /// outside hyper.
    head: Option<HeaderMap>,
}

impl HotFile {
    pub fn new(
        content_type: HeaderValue,
        etag: HeaderValue,
        modified: SystemTime,
        cors: bool,
        tag: HeaderValue,
    ) -> HotFile {
        let last_modified = http_date(modified);
        let length = HeaderValue::from_static("0");
        HotFile { content_type, etag, last_modified, modified, cors, length, tag, bytes: Bytes::new(), head: None }
    }

    pub fn with_bytes(self, bytes: Bytes) -> HotFile {
        HotFile { length: HeaderValue::from(bytes.len()), bytes, ..self }
    }

    /// With the headers of its usual answer made now (a blog file about to
    /// be kept: a blob's answers name the blog asking, so have no one head).
    pub(super) fn with_head(mut self) -> HotFile {
        let usual = respond(&Method::GET, &HeaderMap::new(), self.answer(IMMUTABLE, self.tag.clone()));
        self.head = Some(usual.into_parts().0.headers);
        self
    }

    /// The usual answer's headers, with `cache` for its Cache-Control
    /// (changed in place: no entry is added, so nothing grows).
    pub(super) fn head(&self, cache: &'static str) -> Option<HeaderMap> {
        let mut h = self.head.clone()?;
        if cache != IMMUTABLE {
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
        }
        Some(h)
    }

    pub(super) fn bytes(&self) -> Bytes {
        self.bytes.clone()
    }

    pub(super) fn answer(&self, cache: &'static str, blog: HeaderValue) -> FileAnswer {
        FileAnswer {
            content_type: self.content_type.clone(),
            etag: self.etag.clone(),
            last_modified: self.last_modified.clone(),
            modified: self.modified,
            len: self.bytes.len() as u64,
            length: Some(self.length.clone()),
            cache,
            blog,
            asset_key: None,
            cors: self.cors,
            recent: false,
            source: Source::Bytes(self.bytes.clone()),
        }
    }

    pub(super) fn streaming(
        self,
        file: std::fs::File,
        meta: Metadata,
        cache: &'static str,
        blog: HeaderValue,
    ) -> FileAnswer {
        FileAnswer {
            content_type: self.content_type,
            etag: self.etag,
            last_modified: self.last_modified,
            modified: self.modified,
            len: meta.len(),
            length: None,
            cache,
            blog,
            asset_key: None,
            cors: self.cors,
            recent: false,
            source: Source::File(file, meta),
        }
    }
}

struct Entry {
    blog: Box<str>,
    path: Box<str>,
    version: CacheId,
    seq: u64,
    file: Arc<HotFile>,
}

#[derive(Default)]
struct Inner {
    map: std::collections::HashMap<u64, Entry>,
    order: VecDeque<(u64, u64)>,
    bytes: u64,
    seq: u64,
}

pub struct HotCache {
    cap: u64,
    hasher: ahash::RandomState,
    inner: RwLock<Inner>,
    /// The hit and miss counters, found in the registry once (a lookup
    /// per request showed in the 50 KiB profile).
    counters: std::sync::OnceLock<(metrics::Counter, metrics::Counter)>,
}

impl HotCache {
    pub fn new(cap: u64) -> HotCache {
        HotCache {
            cap,
            hasher: ahash::RandomState::new(),
            inner: RwLock::new(Inner::default()),
            counters: std::sync::OnceLock::new(),
        }
    }

    fn key(&self, blog: &str, path: &str) -> u64 {
        let mut h = self.hasher.build_hasher();
        blog.hash(&mut h);
        path.hash(&mut h);
        h.finish()
    }

    /// The largest file kept under this path (an entry takes one eighth of
    /// the cache at most).
    pub fn largest(&self, path: &str) -> u64 {
        (self.cap / 8).saturating_sub(cost(0, path))
    }

    pub fn get(&self, blog: &str, path: &str, version: CacheId) -> Option<Arc<HotFile>> {
        if self.cap == 0 {
            return None;
        }
        let k = self.key(blog, path);
        let inner = self.inner.read();
        let hit = inner
            .map
            .get(&k)
            .filter(|e| e.version == version && &*e.blog == blog && &*e.path == path)
            .map(|e| e.file.clone());
        drop(inner);
        let (hits, misses) = self.counters.get_or_init(|| {
            (metrics::counter!(crate::metrics::HOT_HITS), metrics::counter!(crate::metrics::HOT_MISSES))
        });
        match hit {
            Some(_) => hits.increment(1),
            None => misses.increment(1),
        }
        hit
    }

    pub fn insert(&self, blog: &str, path: &str, version: CacheId, file: Arc<HotFile>) {
        let size = cost(file.bytes.len(), path);
        if size > self.cap / 8 {
            return;
        }
        let k = self.key(blog, path);
        let mut inner = self.inner.write();
        inner.seq += 1;
        let seq = inner.seq;
        let old = inner.map.insert(k, Entry { blog: blog.into(), path: path.into(), version, seq, file });
        if let Some(old) = old {
            inner.bytes -= cost(old.file.bytes.len(), &old.path);
        }
        inner.bytes += size;
        inner.order.push_back((k, seq));
        // Re-inserts (a new version of the same file) leave stale places in
        // the order; drop them once they outnumber the live ones, so the
        // queue stays within twice the entries however long under the cap.
        if inner.order.len() > 2 * inner.map.len() + 64 {
            let Inner { map, order, .. } = &mut *inner;
            order.retain(|(k, seq)| map.get(k).is_some_and(|e| e.seq == *seq));
        }
        while inner.bytes > self.cap {
            let Some((k, seq)) = inner.order.pop_front() else {
                break;
            };
            if inner.map.get(&k).is_some_and(|e| e.seq == seq) {
                let e = inner.map.remove(&k).expect("present");
                inner.bytes -= cost(e.file.bytes.len(), &e.path);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl HotCache {
        /// Entries, and places in the eviction order.
        fn lens(&self) -> (usize, usize) {
            let inner = self.inner.read();
            (inner.map.len(), inner.order.len())
        }
    }

    fn file(n: usize) -> Arc<HotFile> {
        let hv = HeaderValue::from_static("x");
        Arc::new(
            HotFile::new(hv.clone(), hv.clone(), SystemTime::UNIX_EPOCH, false, hv)
                .with_bytes(Bytes::from(vec![0u8; n])),
        )
    }

    #[test]
    fn re_inserts_under_the_cap_keep_the_order_bounded() {
        let c = HotCache::new(1 << 30);
        for v in 0..100_000u64 {
            c.insert("b", &format!("/f{}", v % 10), v, file(10));
        }
        let (entries, order) = c.lens();
        assert_eq!(entries, 10);
        assert!(order <= 2 * entries + 64 + 1, "{order} places for {entries} entries");
    }

    #[test]
    fn eviction_keeps_the_newest_within_the_byte_cap() {
        let c = HotCache::new(100 * (1000 + ENTRY_OVERHEAD + 3));
        for i in 0..1000u64 {
            c.insert("b", &format!("/{i}"), 1, file(1000));
        }
        let (entries, _) = c.lens();
        assert!((90..=100).contains(&entries), "{entries}");
        assert!(c.get("b", "/999", 1).is_some(), "the newest stays");
        assert!(c.get("b", "/0", 1).is_none(), "the oldest went first");
    }
}
