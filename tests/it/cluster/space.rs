//! etcd's space: each snapshot written once, a large write that gets in
//! (each lost try wrote its parts again) and the hold that lets it (one
//! never let go is ignored for a while), and a full etcd reported for as
//! long as it refuses writes.

use super::*;
use blotcdn::etcdpb::{watch_client::WatchClient, watch_request, WatchCreateRequest, WatchRequest};

/// Paths of about 300 bytes: 10,000 of them are a 3 MB write.
fn long_paths(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("/posts/{i:05}/{}.jpg", "p".repeat(290))).collect()
}

/// Before, every node wrote a snapshot of the whole index after the same
/// group (every 10,000 records), each its own copy in etcd, and two of the
/// three were dropped: with an index of 160 MB, three rounds took etcd
/// past its 2 GiB quota. Now the node whose group takes the log past the
/// mark writes it, alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_snapshot_is_written_by_one_node() {
    let etcd = EtcdCluster::start(1);
    let work = tempfile::tempdir().unwrap();
    let nodes: Vec<ChildServer> = ["a", "b", "c"].iter().map(|n| node(&etcd, &work.path().join(n), &[])).collect();
    // An index of some 30 MB: a snapshot takes a while to write.
    let mut p = publisher(&nodes[0]).await;
    let paths = long_paths(10_000);
    for i in 0..10 {
        invalidate(&mut p, &format!("big{i}"), &paths).await.unwrap();
    }
    // Every snapshot chunk written, from here on.
    let mut wc = WatchClient::connect(etcd.endpoint(0)).await.unwrap();
    let create = WatchCreateRequest {
        key: b"/blotcdn/snap/".to_vec(),
        range_end: b"/blotcdn/snap0".to_vec(),
        ..Default::default()
    };
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(WatchRequest { request_union: Some(watch_request::RequestUnion::CreateRequest(create)) }).await.unwrap();
    let mut events = wc.watch(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    let dirs = std::sync::Arc::new(parking_lot::Mutex::new(std::collections::BTreeSet::new()));
    let seen = dirs.clone();
    let watcher = tokio::spawn(async move {
        while let Ok(Some(m)) = events.message().await {
            for e in m.events.iter().filter(|e| e.r#type == 0) {
                let key = String::from_utf8_lossy(&e.kv.as_ref().unwrap().key).into_owned();
                // /blotcdn/snap/{seq}-{nonce}/{chunk}
                seen.lock().insert(key.rsplit_once('/').unwrap().0.to_owned());
            }
        }
    });
    // Small writes on all three nodes at once, past 10,000 records.
    let mut writers = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        for t in 0..8 {
            let addr = node.grpc;
            writers.push(tokio::spawn(async move {
                let mut p = pb::publisher_client::PublisherClient::connect(format!("http://{addr}")).await.unwrap();
                for i in 0..450 {
                    invalidate(&mut p, &format!("small{n}-{t}"), &[format!("/{i}.css")]).await.unwrap();
                }
            }));
        }
    }
    for w in writers {
        w.await.unwrap();
    }
    // The snapshot is in, and any other node's would be by now.
    let deadline = Instant::now() + Duration::from_secs(20);
    while dirs.lock().is_empty() {
        assert!(Instant::now() < deadline, "no snapshot written past 10,000 records");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    watcher.abort();
    let dirs = dirs.lock().clone();
    assert_eq!(dirs.len(), 1, "snapshots written at once, each a copy of the index: {dirs:?}");
    // It is the one a new node starts from.
    let d = node(&etcd, &work.path().join("d"), &[]);
    let got = cache_ids(&mut resolver(&d).await, "big9", &paths[..3]).await;
    let want = cache_ids(&mut resolver(&nodes[0]).await, "big9", &paths[..3]).await;
    assert_eq!(got, want);
}

/// etcd out of space (its NOSPACE alarm) refuses every write until an
/// operator frees space. Before, each write was refused as UNAVAILABLE
/// "retry shortly", and `/healthz` said 200 throughout: a read, which etcd
/// still answers, cleared the report. Now the refusal says etcd is out of
/// space (RESOURCE_EXHAUSTED), and the report stays until a write gets in.
/// A node that had not tried a write went on reporting itself healthy; it
/// now learns of it from etcd's alarms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_out_of_space_is_reported_until_a_write_gets_in() {
    let mut etcd = EtcdCluster::start_with(1, &["--quota-backend-bytes", "16777216"]);
    let work = tempfile::tempdir().unwrap();
    let a = node(&etcd, &work.path().join("a"), &[]);
    // Takes no write.
    let b = node(&etcd, &work.path().join("b"), &[]);
    let mut p = publisher(&a).await;
    let paths = long_paths(10_000);
    let mut refused = None;
    for i in 0..20 {
        match invalidate(&mut p, &format!("full{i}"), &paths).await {
            Ok(_) => {}
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let e = refused.expect("20 writes of 3 MB into an etcd of 16 MiB");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{}", e.message());
    assert!(e.message().contains("out of space"), "{}", e.message());
    // Reported, and still a few seconds later (the probe's writes fail too).
    for _ in 0..2 {
        let h = get(a.http, "/healthz", &[]);
        assert_eq!(h.status, 503, "{}", String::from_utf8_lossy(&h.body));
        assert!(String::from_utf8_lossy(&h.body).contains("out of space"));
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    // By the node that tried no write as well, within a few seconds.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let h = get(b.http, "/healthz", &[]);
        if h.status == 503 {
            let body = String::from_utf8_lossy(&h.body);
            assert!(body.contains("out of space"), "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "a node that tried no write still says it is healthy ({})", h.status);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Space given (a larger quota) and the alarm disarmed: writes get in,
    // and the report is gone.
    etcd.kill(0);
    etcd.set_extra(&["--quota-backend-bytes", "1073741824"]);
    etcd.restart(0);
    // Not healthy (`/health` says false) while the alarm is on.
    common::wait_for_port(etcd.endpoint(0).trim_start_matches("http://").parse().unwrap());
    let alarms = etcd.post(0, "/v3/maintenance/alarm", r#"{"action":"GET"}"#);
    let member = alarms.split("\"memberID\":\"").nth(1).and_then(|s| s.split('"').next()).expect(&alarms).to_owned();
    etcd.post(
        0,
        "/v3/maintenance/alarm",
        &format!(r#"{{"action":"DEACTIVATE","memberID":"{member}","alarm":"NOSPACE"}}"#),
    );
    assert!(etcd.wait_healthy(Duration::from_secs(20)));
    let deadline = Instant::now() + Duration::from_secs(15);
    while get(a.http, "/healthz", &[]).status != 200 || get(b.http, "/healthz", &[]).status != 200 {
        assert!(Instant::now() < deadline, "still reported 15 s after etcd took writes again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    patiently(&mut p, "full-again", &["/a.css".into()]).await;
}

/// A large write (here 3 MB, written in parts before its group) on one node
/// while another node takes small writes all the time. Before, a small
/// group came in while the parts were written, every time: the large write
/// lost the race 100 times in 35 s and was refused ("too many concurrent
/// writers"), each try leaving its parts in etcd's history (1 GB for a 10 MB
/// write). Now the others hold back while it is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_write_gets_in_while_another_node_takes_small_ones() {
    let etcd = EtcdCluster::start(1);
    let work = tempfile::tempdir().unwrap();
    let (a, b) = (node(&etcd, &work.path().join("a"), &[]), node(&etcd, &work.path().join("b"), &[]));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut storm = Vec::new();
    for t in 0..8 {
        let (addr, stop) = (b.grpc, stop.clone());
        storm.push(tokio::spawn(async move {
            let mut p = pb::publisher_client::PublisherClient::connect(format!("http://{addr}")).await.unwrap();
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if invalidate(&mut p, &format!("storm{t}"), &[format!("/{n}.css")]).await.is_ok() {
                    n += 1;
                }
            }
            n
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let paths = long_paths(10_000);
    let mut p = publisher(&a).await;
    let large = tokio::time::timeout(Duration::from_secs(60), invalidate(&mut p, "large", &paths)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut small = 0;
    for s in storm {
        small += s.await.unwrap();
    }
    let id = large.expect("answered within 60 s").unwrap_or_else(|e| panic!("refused: {}", e.message()));
    assert!(small > 100, "only {small} small writes: no contention to speak of");
    let got = cache_ids(&mut resolver(&b).await, "large", &paths[..3]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = got;
    while got != vec![id; 3] {
        assert!(Instant::now() < deadline, "B shows {got:?}, A answered {id}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        got = cache_ids(&mut resolver(&b).await, "large", &paths[..3]).await;
    }
}

/// A hold that is never let go (its node died holding it, or something
/// puts it again and again) costs a node's writes one wait of 3 s, then
/// the node ignores holds for 30 s. Without that cap every write waited it
/// out, and a cluster slowed to a write every 3 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_never_let_go_costs_one_wait_then_is_ignored() {
    let etcd = EtcdCluster::start(1);
    let work = tempfile::tempdir().unwrap();
    let a = node(&etcd, &work.path().join("a"), &[]);
    let mut p = publisher(&a).await;
    invalidate(&mut p, "held", &["/first.css".into()]).await.unwrap();
    // Another writer's hold (its nonce is not this node's), put again every
    // 500 ms for as long as the writes below go on.
    let mut kv = blotcdn::etcdpb::kv_client::KvClient::connect(etcd.endpoint(0)).await.unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let holder = {
        let stop = stop.clone();
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                put_all(&mut kv, vec![kv_put("/blotcdn/hold", 77u64.to_be_bytes())]).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    invalidate(&mut p, "held", &["/0.css".into()]).await.unwrap();
    let first = started.elapsed();
    for i in 1..10 {
        invalidate(&mut p, "held", &[format!("/{i}.css")]).await.unwrap();
    }
    let all = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    holder.await.unwrap();
    // The hold is honoured (the first write waits it out)...
    assert!(first >= Duration::from_secs(2), "the first write did not wait for the hold: {first:?}");
    // ...once: ten writes at 3 s each would take 30 s.
    assert!(all < Duration::from_secs(12), "ten writes under a hold never let go took {all:?}");
}
