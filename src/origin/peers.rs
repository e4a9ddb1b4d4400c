//! Blobs from peers (cluster mode): a node asked for a permanent asset whose
//! blob another node took the upload of fetches it by hash from `peers`, in
//! order, checks that its bytes hash to its name (BLAKE3), stores it through
//! the CAS (temporary file, fsync, rename), and serves it. A peer that sends
//! other bytes is refused and logged; nothing of its answer is kept.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use http::Request;
use http_body_util::{BodyExt, Empty};
use tokio::sync::Semaphore;

use crate::catalog::Catalog;
use crate::config::Config;
use crate::domain::{BlogId, ContentHash};

/// Marks a request from a peer: answered from this node's CAS only, never
/// passed on to its own peers (no loops, no fan-out).
pub const PEER_HEADER: &str = "x-blotcdn-peer";

/// How long a request waits for a fetch slot before it is answered 503.
const SLOT_WAIT: Duration = Duration::from_secs(2);

/// What a fetch from the peers came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fetched {
    /// In the CAS now.
    Yes,
    /// Every peer answered that it does not have it.
    No,
    /// No peer gave it, and one or more could not be asked (down, timed
    /// out, failing) or sent other bytes: the one holding it may be among
    /// them.
    Unreachable,
    /// Every fetch slot was busy: try again soon.
    Busy,
}

type Flight = Shared<BoxFuture<'static, Fetched>>;

pub struct Peers {
    urls: Arc<Vec<String>>,
    timeout: Duration,
    /// Fetches in flight at once.
    slots: Arc<Semaphore>,
    /// One fetch per blob: the requests for a blob being fetched wait for
    /// that fetch instead of each fetching it again.
    flights: Arc<parking_lot::Mutex<HashMap<ContentHash, Flight>>>,
}

impl Peers {
    pub fn new(config: &Config) -> Peers {
        Peers {
            urls: Arc::new(config.peers.clone()),
            timeout: config.fallback_timeout,
            slots: Arc::new(Semaphore::new(config.max_fallback_fetches)),
            flights: Default::default(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.urls.is_empty()
    }

    /// Fetches the blob of `hash` (of `size` bytes, which `blog` references)
    /// from the first peer that has it, or waits for the fetch of it already
    /// under way.
    pub async fn fetch(&self, catalog: &Arc<Catalog>, blog: &BlogId, hash: &ContentHash, size: u64) -> Fetched {
        let flight = {
            let mut flights = self.flights.lock();
            match flights.get(hash) {
                Some(f) => f.clone(),
                None => {
                    let (urls, slots, flights_) = (self.urls.clone(), self.slots.clone(), self.flights.clone());
                    let (catalog, blog, hash, timeout) = (catalog.clone(), blog.clone(), *hash, self.timeout);
                    let f = async move {
                        let r = fetch_from(&urls, &slots, timeout, &catalog, &blog, &hash, size).await;
                        flights_.lock().remove(&hash);
                        r
                    }
                    .boxed()
                    .shared();
                    flights.insert(hash, f.clone());
                    f
                }
            }
        };
        flight.await
    }
}

/// One fetch: a slot (waited for at most `SLOT_WAIT`), then each peer in
/// turn, each within `timeout`.
async fn fetch_from(
    urls: &[String],
    slots: &Semaphore,
    timeout: Duration,
    catalog: &Arc<Catalog>,
    blog: &BlogId,
    hash: &ContentHash,
    size: u64,
) -> Fetched {
    let _slot = match tokio::time::timeout(SLOT_WAIT, slots.acquire()).await {
        Ok(Ok(slot)) => slot,
        Ok(Err(_)) => return Fetched::No,
        Err(_) => {
            tracing::warn!(hash = %hash, "every peer fetch slot is busy (max_fallback_fetches)");
            return Fetched::Busy;
        }
    };
    let mut unreachable = false;
    for peer in urls {
        let url = format!("{peer}/{blog}/_assets/{hash}/blob");
        match tokio::time::timeout(timeout, fetch_one(catalog, &url, hash, size)).await {
            Ok(Ok(())) => {
                tracing::info!(peer, hash = %hash, "blob fetched from a peer");
                return Fetched::Yes;
            }
            Ok(Err(Refused::Miss(why))) => tracing::debug!(peer, hash = %hash, why, "peer does not have the blob"),
            Ok(Err(Refused::Wrong(why))) => {
                // Its holder is somewhere: not a "no such asset".
                unreachable = true;
                tracing::error!(peer, hash = %hash, why, "peer sent a wrong blob; refused")
            }
            Ok(Err(Refused::Failed(why))) => {
                unreachable = true;
                tracing::warn!(peer, hash = %hash, why, "peer fetch failed");
            }
            Err(_) => {
                unreachable = true;
                tracing::warn!(peer, hash = %hash, "peer fetch timed out");
            }
        }
    }
    if unreachable {
        Fetched::Unreachable
    } else {
        Fetched::No
    }
}

enum Refused {
    /// The peer answered that it does not have it.
    Miss(String),
    /// The peer could not be reached, or failed (anything but a 404), or
    /// the copy could not be stored here.
    Failed(String),
    /// The peer sent bytes that are not the blob.
    Wrong(String),
}

async fn fetch_one(catalog: &Arc<Catalog>, url: &str, hash: &ContentHash, size: u64) -> Result<(), Refused> {
    let miss = |e: &dyn std::fmt::Display| Refused::Failed(e.to_string());
    let req = Request::get(url).header(PEER_HEADER, "1").body(Empty::<Bytes>::new()).map_err(|e| miss(&e))?;
    let resp = super::fallback::client().request(req).await.map_err(|e| miss(&e))?;
    if resp.status() == hyper::StatusCode::NOT_FOUND {
        return Err(Refused::Miss("answered 404".into()));
    }
    if !resp.status().is_success() {
        return Err(Refused::Failed(format!("answered {}", resp.status())));
    }
    let writer = catalog.cas().writer().map_err(|e| miss(&e))?;
    // The file is written on the blocking pool as the body arrives.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(8);
    let write = tokio::task::spawn_blocking(move || {
        let mut w = writer;
        while let Some(b) = rx.blocking_recv() {
            w.write(&b)?;
        }
        w.finish()
    });
    let mut body = resp.into_body();
    let mut got = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| miss(&e))?;
        if let Ok(data) = frame.into_data() {
            got += data.len() as u64;
            if got > size {
                return Err(Refused::Wrong(format!("more than the asset's {size} bytes")));
            }
            if tx.send(data).await.is_err() {
                break;
            }
        }
    }
    drop(tx);
    let pending = write.await.map_err(|e| miss(&e))?.map_err(|e| miss(&e))?;
    if pending.hash != *hash || pending.size != size {
        return Err(Refused::Wrong(format!("{} bytes hashing to {}", pending.size, pending.hash)));
    }
    let (c, h) = (catalog.clone(), *hash);
    match tokio::task::spawn_blocking(move || c.adopt_blob(&h, pending)).await {
        Ok(Ok(true)) => Ok(()),
        Ok(Ok(false)) => Err(Refused::Miss("no blog references it any more".into())),
        Ok(Err(e)) => Err(miss(&e)),
        Err(e) => Err(miss(&e)),
    }
}
