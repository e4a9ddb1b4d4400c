//! Edge purge: what must disappear or change at the edge at once (a deleted
//! blog, an asset taken down, a blog's cached pages on publish) is written
//! to a durable outbox in the same log group as the write that caused it,
//! and one task per target delivers it: in order, at most `rate_per_sec`
//! requests a second, retried with backoff (or after the edge's
//! `Retry-After`), keys waiting together sent once. What a target was sent
//! is logged too, so a restart resends only what may not have arrived:
//! delivery is at least once.

mod outbox;
pub mod target;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tracing::Instrument;

pub use outbox::{Outbox, Queue, QueueInfo};
use target::{HttpClient, Outcome, Target};

use crate::store::Store;

/// Backoff after a failed request: doubling from the first to the last.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const LAST_BACKOFF: Duration = Duration::from_secs(10);
/// A `Retry-After` longer than this is cut to it: an edge that asks for an
/// hour (or a garbled huge number) does not hold purges that long.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// Starts one delivery task per target. They run until the runtime stops;
/// what they had not sent is resent after a restart.
/// `drop_after`: see [`STRIKES`]; `None`, never.
pub fn spawn(
    targets: Vec<Target>,
    outbox: Arc<Outbox>,
    store: Arc<dyn Store>,
    drop_after: Option<Duration>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let client = target::client();
    targets
        .into_iter()
        .enumerate()
        .map(|(i, t)| tokio::spawn(deliver(t, i, outbox.clone(), store.clone(), client.clone(), drop_after)))
        .collect()
}

/// A token bucket: bursts up to one second's worth, `rate` a second on average.
struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: f64) -> Bucket {
        Bucket { rate, tokens: rate.max(1.0), at: Instant::now() }
    }

    async fn take(&mut self) {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(self.rate.max(1.0));
        self.at = now;
        if self.tokens < 1.0 {
            tokio::time::sleep(Duration::from_secs_f64((1.0 - self.tokens) / self.rate)).await;
            self.tokens = 1.0;
            self.at = Instant::now();
        }
        self.tokens -= 1.0;
    }
}

/// A key the edge refuses alone is dropped only after it has been refused
/// for `purge_drop_after_secs` (5 minutes by default), each time it was
/// tried, and at least this many times just after the edge took another key
/// waiting: an edge that refuses every key (its VCL, or a proxy in front of
/// it, changed) keeps them all, and one that refuses only some requests (a
/// broken node behind a balancer) takes the key on one of its tries, the
/// checks coming at random so that no turn of a balancer can line up with
/// them; one that refuses just this key (a blog it no longer knows) holds
/// the keys behind it back that long.
const STRIKES: u32 = 3;

/// How long the size an edge took after refusing a larger request (413) is
/// kept: an edge that caps its requests is not sent a larger one after every
/// success, only this often.
const FITS_KEPT: Duration = Duration::from_secs(300);
/// And at least this many tries of it, every one failed, whatever the time:
/// with the backoff, about half a minute.
const MIN_TRIES: u32 = 10;

/// The key at the head that the edge refuses alone.
struct Refused {
    key: Arc<str>,
    since: Instant,
    /// Refusals of it alone.
    tries: u32,
    /// Refusals just after the edge took another key.
    strikes: u32,
}

/// Up to a fifth less, so targets that failed together do not retry together.
fn jitter(d: Duration) -> Duration {
    let n = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
    d.mul_f64(1.0 - f64::from(n % 200) / 1000.0)
}

async fn deliver(
    t: Target,
    i: usize,
    outbox: Arc<Outbox>,
    store: Arc<dyn Store>,
    client: HttpClient,
    drop_after: Option<Duration>,
) {
    let q = &outbox.queues()[i];
    let name = t.cfg.name.clone();
    let kind = t.cfg.kind;
    let mut bucket = Bucket::new(t.cfg.rate_per_sec);
    let mut backoff = FIRST_BACKOFF;
    let mut deadline = target::FIRST_DEADLINE;
    let mut refused: Option<Refused> = None;
    // Halved after a request the edge refused, so one bad key cannot hold
    // back the ones behind it; back to the most after a success, or, when the
    // edge refused the request for its size, to the size it then took.
    let mut limit = t.max_keys();
    // Splitting a request the edge refused for its size (413, 414, 431).
    let mut sizing = false;
    // The keys a request held when the edge took it after such a split:
    // requests stay that size for `FITS_KEPT`, then try the most again.
    let mut fits: Option<(usize, Instant)> = None;
    loop {
        if q.is_idle() {
            // A key added (or unpinned) since the check left a permit: no
            // wake-up is lost.
            q.notify.notified().await;
            continue;
        }
        // Waiting for the rate first lets keys that arrive meanwhile join
        // this request.
        bucket.take().await;
        let Some(keys) = q.take(limit, t.max_bytes()) else { continue };
        let span = tracing::debug_span!(
            "purge.deliver",
            purge.target = %name,
            kind = kind.as_str(),
            keys = keys.len(),
            outcome = tracing::field::Empty
        );
        let started = Instant::now();
        let send = |keys: &[Arc<str>], deadline| {
            let req = t.request(keys, SystemTime::now());
            let span = span.clone();
            let client = &client;
            async move {
                match req {
                    Ok(mut req) => {
                        crate::telemetry::inject(&span, req.headers_mut());
                        target::send(client, req, kind, deadline).instrument(span).await
                    }
                    Err(error) => Outcome::error(error),
                }
            }
        };
        let mut outcome = send(&keys, deadline).await;
        // A key that the edge refuses alone, or fails on (a 500 for that key only): kept,
        // and dropped only as `STRIKES` says. (Not an edge that is down, busy or late.)
        let failed_alone = match &outcome {
            Outcome::Rejected { error, .. } => Some((error.clone(), None)),
            Outcome::Retry { error, after, keyed: true, .. } => Some((error.clone(), *after)),
            _ => None,
        };
        if failed_alone.is_none() {
            // Taken, or the edge down, busy or late: not a try that failed on the key,
            // so a key refused before must be refused on every try again, from the start.
            refused = None;
        }
        if let Some((error, after)) = failed_alone {
            if keys.len() == 1 {
                let r = match refused.take() {
                    Some(r) if r.key == keys[0] => refused.insert(r),
                    _ => refused.insert(Refused { key: keys[0].clone(), since: Instant::now(), tries: 0, strikes: 0 }),
                };
                r.tries += 1;
                // At random, about every other refusal, the edge is asked for another key
                // waiting, alone (a purge the edge takes twice does no harm): an edge that
                // takes it refuses this key, not every key. At random, so that no balancer
                // in front of broken nodes, whatever its turn, always hands this key to
                // them and the other to a good one.
                let coin = ahash::RandomState::new().hash_one(r.tries) & 1 == 0;
                let other = if coin { q.other_than(&keys[0]) } else { None };
                let mut took = None;
                if let Some(other) = other {
                    bucket.take().await;
                    match send(std::slice::from_ref(&other), deadline).await {
                        Outcome::Sent => {
                            r.strikes += 1;
                            took = Some(other);
                        }
                        Outcome::Retry { late: true, .. } => deadline = (deadline * 2).min(target::LAST_DEADLINE),
                        _ => {}
                    }
                }
                let due = r.tries >= MIN_TRIES && drop_after.is_some_and(|d| r.since.elapsed() >= d);
                outcome = if r.strikes >= STRIKES && due {
                    Outcome::Rejected { error, too_large: false }
                } else {
                    let key = &keys[0];
                    let why = match (took, drop_after) {
                        (Some(o), Some(d)) => format!(
                            "the edge refuses key {key} and takes others ({o}): dropped if it still refuses it after {} s",
                            d.as_secs()
                        ),
                        _ => format!("the edge refuses key {key}: kept, sent again"),
                    };
                    Outcome::Retry {
                        error: format!("{error}; {why}"),
                        after,
                        throttled: false,
                        late: false,
                        keyed: true,
                    }
                };
            }
        }
        if let Outcome::Retry { late: true, .. } = outcome {
            deadline = (deadline * 2).min(target::LAST_DEADLINE);
        }
        metrics::histogram!(crate::metrics::PURGE_SECONDS, "target" => name.clone())
            .record(started.elapsed().as_secs_f64());
        let label = match &outcome {
            Outcome::Sent => "ok",
            Outcome::Retry { throttled: true, .. } => "throttled",
            Outcome::Retry { .. } => "error",
            Outcome::Rejected { .. } if keys.len() == 1 => "rejected",
            Outcome::Rejected { .. } => "error",
        };
        span.record("outcome", label);
        metrics::counter!(crate::metrics::PURGE_SENT, "target" => name.clone(), "outcome" => label)
            .increment(keys.len() as u64);
        match outcome {
            Outcome::Rejected { error, too_large } if keys.len() > 1 => {
                // Try the same keys in smaller requests: one of them (or the
                // request's size) is what the edge refuses.
                sizing |= too_large;
                tracing::warn!(purge_target = %name, error = %error, keys = keys.len(), "purge refused; splitting the request");
                limit = (keys.len() / 2).max(1);
                q.failed(error);
                tokio::time::sleep(FIRST_BACKOFF).await;
            }
            Outcome::Sent | Outcome::Rejected { .. } => {
                if let Outcome::Rejected { error, .. } = &outcome {
                    // One key the edge refuses for good: waiting on it would
                    // hold back every purge behind it. Said loudly, counted
                    // (`outcome="rejected"`), and left behind.
                    tracing::error!(purge_target = %name, key = %keys[0], error = %error, "the edge refuses this purge key, and takes others; dropped");
                }
                if sizing && matches!(outcome, Outcome::Sent) {
                    fits = Some((keys.len(), Instant::now()));
                    sizing = false;
                }
                limit = match fits {
                    Some((n, at)) if at.elapsed() < FITS_KEPT => n,
                    _ => t.max_keys(),
                };
                backoff = FIRST_BACKOFF;
                refused = None;
                // Back towards the first deadline once the edge answers in time again
                // (twice what this answer took, so an edge that is always slow keeps
                // what it needs).
                deadline = (started.elapsed() * 2).clamp(target::FIRST_DEADLINE, deadline);
                let upto = q.delivered(matches!(outcome, Outcome::Rejected { .. }));
                if let Outcome::Rejected { error, .. } = outcome {
                    q.note_dropped(format!("dropped key {}: {error}", keys[0]));
                }
                tracing::debug!(purge_target = %name, keys = keys.len(), upto, "purge delivered");
                if let Err(e) = store.purge_sent(name.clone(), upto).done().await {
                    // Not recorded: resent after a restart, which is harmless.
                    tracing::warn!(purge_target = %name, error = %e, "could not record a delivered purge");
                }
            }
            Outcome::Retry { error, after, keyed, .. } => {
                // The edge failed on what the request holds (a 500): one key may be the
                // cause, so the next requests are smaller, down to one.
                if keys.len() > 1 && keyed {
                    limit = (keys.len() / 2).max(1);
                }
                // A key that fails alone is named, for the operator looking at the queue.
                let error = match &keys[..] {
                    [key] if !error.contains(&**key) => format!("{error} (key {key})"),
                    _ => error,
                };
                // Never sooner than the backoff: `Retry-After: 0` (or a date past) is
                // not an invitation to send at full rate for as long as it lasts.
                let wait = match after {
                    Some(a) => a.min(MAX_RETRY_AFTER).max(jitter(backoff)),
                    None => jitter(backoff),
                };
                tracing::warn!(purge_target = %name, error = %error, retry_in_ms = wait.as_millis() as u64, "purge not delivered");
                q.failed(error);
                backoff = (backoff * 2).min(LAST_BACKOFF);
                tokio::time::sleep(wait).await;
            }
        }
    }
}
