//! The outbox in memory: per target, the purge keys waiting, in the order
//! of the log records that enqueued them. The log (then sled's `purges`
//! tree) is what makes it durable; this is the working copy the delivery
//! tasks read, rebuilt from sled at start.
//!
//! Coalescing: a key already waiting at a target (not yet taken into a
//! request) is not added again; the waiting one is sent after the write
//! that asked again, so it covers both. A key in flight is added again: the
//! request on its way may have reached the edge before that write.
//!
//! Each target's delivered mark is the record up to which everything was
//! sent: the record before the first item still waiting, or the last record
//! seen when nothing waits. It is what the log keeps (`PurgeSent`).

use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::store::index::FastMap;

/// One key waiting at one target.
struct Item {
    seq: u64,
    at_ms: u64,
    key: Arc<str>,
}

#[derive(Default)]
struct State {
    items: VecDeque<Item>,
    /// Keys waiting and not in flight, with their item's record.
    waiting: FastMap<Arc<str>, u64>,
    /// Items at the head taken into the request being sent.
    in_flight: usize,
    /// Keys a write being committed counts on (see [`Outbox::pin_waiting`]):
    /// not taken into a request until it is durable.
    pinned: FastMap<Arc<str>, u32>,
    /// The deliverer found the head pinned: it is not pinned again until taken.
    head_wanted: bool,
    /// The last purge record this outbox was told of.
    last_seq: u64,
    sent: u64,
    last_error: String,
    /// The last key an edge refused for good, and why: shown until another error.
    dropped: String,
}

impl State {
    fn mark(&self) -> u64 {
        self.items.front().map_or(self.last_seq, |i| i.seq - 1)
    }
}

/// One target's queue.
pub struct Queue {
    pub name: String,
    state: Mutex<State>,
    /// Woken when keys are added.
    pub notify: tokio::sync::Notify,
}

/// What `GetPurges` and `blotcdn purges` show of one target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueInfo {
    pub target: String,
    pub length: u64,
    /// When the oldest waiting key was enqueued (ms since the epoch), 0 when none waits.
    pub oldest_ms: u64,
    pub last_error: String,
    pub sent: u64,
}

pub struct Outbox {
    queues: Vec<Queue>,
    cap: usize,
}

impl Outbox {
    /// Queues for the named targets, each holding at most `cap` keys.
    pub fn new(names: impl IntoIterator<Item = String>, cap: usize) -> Outbox {
        let queues = names
            .into_iter()
            .map(|name| Queue { name, state: Mutex::default(), notify: tokio::sync::Notify::new() })
            .collect();
        Outbox { queues, cap }
    }

    /// No targets: nothing is ever enqueued.
    pub fn none() -> Outbox {
        Outbox::new(Vec::new(), 1)
    }

    pub fn has_targets(&self) -> bool {
        !self.queues.is_empty()
    }

    pub fn queues(&self) -> &[Queue] {
        &self.queues
    }

    /// Called once at start, before any write: each target's delivered mark
    /// (0 for a target never recorded), then every purge record kept, in order.
    pub fn restore<'a>(
        &self,
        sent: &FastMap<String, u64>,
        records: impl IntoIterator<Item = (u64, u64, &'a [String])>,
        last_seq: u64,
    ) {
        let marks: Vec<u64> = self.queues.iter().map(|q| sent.get(&q.name).copied().unwrap_or(0)).collect();
        for (seq, at_ms, keys) in records {
            for (q, mark) in self.queues.iter().zip(&marks) {
                if seq > *mark {
                    q.add(seq, at_ms, keys);
                }
            }
        }
        for q in &self.queues {
            let mut s = q.state.lock();
            s.last_seq = s.last_seq.max(last_seq);
            gauge(&q.name, s.items.len());
        }
    }

    /// Adds a durable purge record's keys to every target.
    pub fn enqueue(&self, seq: u64, at_ms: u64, keys: &[String]) {
        for q in &self.queues {
            q.add(seq, at_ms, keys);
            q.notify.notify_one();
        }
    }

    /// True, with the keys pinned at every target, when every key already
    /// waits (not in flight) at every target: a write that asks for them
    /// again needs no record of its own, since they go out after it once
    /// [`Outbox::unpin`] is called when it is durable (or refused). This
    /// keeps the log and sled from holding a record per publish while an
    /// edge is down. False (nothing pinned) otherwise.
    pub fn pin_waiting(&self, keys: &[String]) -> bool {
        if self.queues.is_empty() || keys.is_empty() {
            return false;
        }
        for (i, q) in self.queues.iter().enumerate() {
            let mut s = q.state.lock();
            // The head key is not pinned again once the deliverer has found it
            // pinned: a storm of publishes re-pinning it could keep it, and all
            // behind it, from ever going. Such a write gets a record instead.
            let head_wanted = s.head_wanted.then(|| s.items.front().map(|i| i.key.clone())).flatten();
            let pinnable = keys.iter().all(|k| s.waiting.contains_key(k.as_str()) && head_wanted.as_deref() != Some(k));
            if !pinnable {
                drop(s);
                for q in &self.queues[..i] {
                    q.unpin(keys);
                    q.notify.notify_one();
                }
                return false;
            }
            for k in keys {
                let key = s.waiting.get_key_value(k.as_str()).map(|(k, _)| k.clone()).expect("checked above");
                *s.pinned.entry(key).or_default() += 1;
            }
        }
        true
    }

    /// Releases keys pinned by [`Outbox::pin_waiting`].
    pub fn unpin(&self, keys: &[String]) {
        for q in &self.queues {
            q.unpin(keys);
            q.notify.notify_one();
        }
    }

    /// Why a write that enqueues `keys` must be refused now, if it must: a
    /// target would hold more than `purge_queue_max` keys with those of
    /// `keys` that do not wait there already (a key that waits adds nothing)
    /// and the `pending` keys of writes before it that are not enqueued yet
    /// (their group is being made durable; counted whole).
    pub fn refuses(&self, keys: &[String], pending: usize) -> Option<String> {
        let distinct: std::collections::HashSet<&str> = keys.iter().map(String::as_str).collect();
        if distinct.len() > self.cap {
            return Some(format!(
                "this write adds {} purge keys, more than a target's queue holds (purge_queue_max {}); send fewer",
                distinct.len(),
                self.cap
            ));
        }
        self.queues.iter().find_map(|q| {
            let s = q.state.lock();
            let adds = distinct.iter().filter(|k| !s.waiting.contains_key(**k)).count();
            (adds > 0 && s.items.len() + pending + adds > self.cap).then(|| {
                let why =
                    if s.last_error.is_empty() { String::new() } else { format!("; last error: {}", s.last_error) };
                format!(
                    "the purge queue of target {} is full ({} keys waiting, {adds} more would pass purge_queue_max \
                     {}){why}; retry once it drains",
                    q.name,
                    s.items.len(),
                    self.cap
                )
            })
        })
    }

    pub fn snapshot(&self) -> Vec<QueueInfo> {
        self.queues
            .iter()
            .map(|q| {
                let s = q.state.lock();
                QueueInfo {
                    target: q.name.clone(),
                    length: s.items.len() as u64,
                    oldest_ms: s.items.front().map_or(0, |i| i.at_ms),
                    last_error: if s.last_error.is_empty() { s.dropped.clone() } else { s.last_error.clone() },
                    sent: s.sent,
                }
            })
            .collect()
    }
}

impl Queue {
    fn unpin(&self, keys: &[String]) {
        let mut s = self.state.lock();
        for k in keys {
            if let Some(n) = s.pinned.get_mut(k.as_str()) {
                *n -= 1;
                if *n == 0 {
                    s.pinned.remove(k.as_str());
                }
            }
        }
    }

    fn add(&self, seq: u64, at_ms: u64, keys: &[String]) {
        let mut s = self.state.lock();
        for k in keys {
            if s.waiting.contains_key(k.as_str()) {
                continue;
            }
            let key: Arc<str> = Arc::from(k.as_str());
            s.waiting.insert(key.clone(), seq);
            s.items.push_back(Item { seq, at_ms, key });
        }
        s.last_seq = s.last_seq.max(seq);
        gauge(&self.name, s.items.len());
    }

    /// Takes keys from the head into a request: distinct keys, in order, at
    /// most `max` of them and `max_bytes` of them together (one byte between
    /// each). Stops before a pinned key (a write that counts on it is not
    /// durable yet). `None` when nothing can be taken.
    pub fn take(&self, max: usize, max_bytes: usize) -> Option<Vec<Arc<str>>> {
        let mut s = self.state.lock();
        let s = &mut *s;
        if s.items.front().is_some_and(|i| s.pinned.contains_key(&i.key)) {
            s.head_wanted = true;
            return None;
        }
        s.head_wanted = false;
        let mut keys: Vec<Arc<str>> = Vec::new();
        let (mut n, mut bytes) = (0, 0);
        for item in &s.items {
            if s.pinned.contains_key(&item.key) {
                break;
            }
            if !keys.contains(&item.key) {
                let more = item.key.len() + usize::from(!keys.is_empty());
                if keys.len() == max || (!keys.is_empty() && bytes + more > max_bytes) {
                    break;
                }
                bytes += more;
                keys.push(item.key.clone());
            }
            n += 1;
        }
        if n == 0 {
            return None;
        }
        for item in s.items.iter().take(n) {
            if s.waiting.get(&item.key) == Some(&item.seq) {
                s.waiting.remove(&item.key);
            }
        }
        s.in_flight = n;
        Some(keys)
    }

    /// The request taken was answered: its keys are sent, or, when `dropped`,
    /// its one key is left behind (not counted as sent). Returns the new
    /// delivered mark.
    pub fn delivered(&self, dropped: bool) -> u64 {
        let mut s = self.state.lock();
        let n = s.in_flight;
        s.items.drain(..n);
        s.in_flight = 0;
        s.sent += (n - usize::from(dropped && n > 0)) as u64;
        s.last_error.clear();
        gauge(&self.name, s.items.len());
        s.mark()
    }

    /// Records a key left behind (refused by the edge for good): shown as
    /// the last error until another one.
    pub fn note_dropped(&self, error: String) {
        self.state.lock().dropped = error;
    }

    /// The request failed: its keys wait again, at the head.
    pub fn failed(&self, error: String) {
        let mut s = self.state.lock();
        let s = &mut *s;
        for item in s.items.iter().take(s.in_flight) {
            s.waiting.entry(item.key.clone()).or_insert(item.seq);
        }
        s.in_flight = 0;
        s.last_error = error;
    }

    /// The first key waiting that is not `key` (nor pinned): asked alone when
    /// the edge refuses `key`, to tell an edge that refuses one key from one
    /// that refuses every key.
    pub fn other_than(&self, key: &str) -> Option<Arc<str>> {
        let s = self.state.lock();
        s.items.iter().map(|i| &i.key).find(|k| &***k != key && !s.pinned.contains_key(*k)).cloned()
    }

    /// True when nothing can be sent now: nothing waits, or the head is
    /// pinned by a write not yet durable (a wake-up follows its unpin).
    pub fn is_idle(&self) -> bool {
        let mut s = self.state.lock();
        let pinned = s.items.front().is_some_and(|i| s.pinned.contains_key(&i.key));
        s.head_wanted |= pinned;
        s.items.is_empty() || pinned
    }
}

fn gauge(target: &str, len: usize) {
    metrics::gauge!(crate::metrics::PURGE_QUEUE, "target" => target.to_owned()).set(len as f64);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    impl Outbox {
        /// [`Outbox::refuses`] with no write pending.
        fn refuses_now(&self, keys: &[String]) -> Option<String> {
            self.refuses(keys, 0)
        }
    }

    #[test]
    fn coalesces_waiting_keys_but_not_ones_in_flight() {
        let o = Outbox::new(["a".to_owned()], 100);
        let q = &o.queues()[0];
        o.enqueue(1, 10, &keys(&["blog"]));
        o.enqueue(2, 11, &keys(&["blog", "other"]));
        o.enqueue(3, 12, &keys(&["blog"]));
        assert_eq!(o.snapshot()[0].length, 2);
        let batch = q.take(10, 4096).unwrap();
        assert_eq!(batch.iter().map(|k| &**k).collect::<Vec<_>>(), ["blog", "other"]);
        // Asked again while in flight: a new item.
        o.enqueue(4, 13, &keys(&["blog"]));
        assert_eq!(q.delivered(false), 3);
        assert_eq!(
            o.snapshot()[0],
            QueueInfo { target: "a".into(), length: 1, oldest_ms: 13, last_error: String::new(), sent: 2 }
        );
        assert_eq!(q.take(10, 4096).unwrap().len(), 1);
        q.failed("503".into());
        assert_eq!(o.snapshot()[0].last_error, "503");
        o.enqueue(5, 14, &keys(&["blog"]));
        assert_eq!(o.snapshot()[0].length, 1, "a failed key waits again and coalesces");
        q.take(10, 4096).unwrap();
        assert_eq!(q.delivered(false), 5);
        assert!(q.take(10, 4096).is_none());
    }

    #[test]
    fn a_write_is_refused_if_its_new_keys_would_pass_the_cap() {
        assert!(Outbox::new(["a".to_owned()], 3).refuses(&keys(&["k1", "k2"]), 2).is_some(), "two pending, two new");
        let o = Outbox::new(["a".to_owned()], 3);
        let too_many = o.refuses_now(&keys(&["k1", "k2", "k3", "k4"])).expect("four new keys, room for three");
        assert!(too_many.contains("adds 4 purge keys") && too_many.contains("purge_queue_max 3"), "{too_many}");
        assert!(o.refuses_now(&keys(&["k1", "k1", "k1", "k1"])).is_none(), "one key, asked four times");
        o.enqueue(1, 10, &keys(&["a", "b"]));
        let full = o.refuses_now(&keys(&["c", "d"])).expect("two waiting and two new: past three");
        assert!(full.contains("target a is full (2 keys waiting, 2 more"), "{full}");
        assert!(o.refuses_now(&keys(&["a", "c"])).is_none(), "one new key fills the queue, no more");
        assert!(o.refuses_now(&keys(&["a", "b"])).is_none(), "keys that wait add nothing");
    }

    #[test]
    fn a_batch_cut_inside_a_record_marks_the_record_before() {
        let o = Outbox::new(["a".to_owned(), "b".to_owned()], 3);
        o.enqueue(7, 1, &keys(&["x", "y", "z"]));
        assert!(o.refuses_now(&keys(&["w"])).unwrap().contains("target a is full (3 keys waiting"));
        assert!(o.refuses_now(&keys(&["x"])).is_none(), "a key that waits adds nothing");
        let q = &o.queues()[0];
        assert_eq!(q.take(2, 4096).unwrap().len(), 2);
        assert_eq!(q.delivered(false), 6);
        q.take(2, 4096).unwrap();
        assert_eq!(q.delivered(false), 7);
        assert!(o.refuses_now(&keys(&["w"])).unwrap().contains("target b"));
    }

    #[test]
    fn a_pinned_key_is_not_sent_until_unpinned_and_batches_keep_to_their_bytes() {
        let o = Outbox::new(["a".to_owned()], 100);
        let q = &o.queues()[0];
        o.enqueue(1, 1, &keys(&["blog", "other"]));
        assert!(!o.pin_waiting(&keys(&["blog", "third"])), "third does not wait");
        assert!(o.pin_waiting(&keys(&["blog"])));
        assert!(q.is_idle() && q.take(10, 4096).is_none(), "the head is pinned");
        // Found pinned by the deliverer: not pinned again until it goes.
        o.unpin(&keys(&["blog"]));
        assert!(!o.pin_waiting(&keys(&["blog"])), "the head is wanted");
        assert!(o.pin_waiting(&keys(&["other"])), "a key behind it may be pinned");
        assert_eq!(q.take(1, 4096).unwrap().len(), 1);
        q.delivered(false);
        o.unpin(&keys(&["other"]));
        o.enqueue(2, 1, &keys(&["aaaa", "bbbb", "cccc"]));
        // "other aaaa" is 10 bytes: a third key would pass 12.
        assert_eq!(q.take(10, 12).unwrap().iter().map(|k| &**k).collect::<Vec<_>>(), ["other", "aaaa"]);
    }

    #[test]
    fn restore_skips_what_each_target_sent() {
        let o = Outbox::new(["a".to_owned(), "b".to_owned()], 10);
        let mut sent = FastMap::default();
        sent.insert("a".to_owned(), 4);
        let r1 = keys(&["k1"]);
        let r2 = keys(&["k2"]);
        o.restore(&sent, [(3, 0, &r1[..]), (5, 0, &r2[..])], 9);
        let s = o.snapshot();
        assert_eq!((s[0].length, s[1].length), (1, 2));
        o.queues()[0].take(5, 4096).unwrap();
        assert_eq!(o.queues()[0].delivered(false), 9);
    }
}
