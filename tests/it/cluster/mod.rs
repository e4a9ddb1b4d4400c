//! Cluster mode (`store = "etcd"`): real blotcdn processes on a real
//! three-member etcd cluster (Debian's `etcd-server`), all on 127.0.0.1.

use crate::common;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use blotcdn::proto::{self as pb, put_asset_chunk::Chunk};
use common::etcd::EtcdCluster;
use common::{get, ChildServer};
use tonic::transport::Channel;

mod foreign;
mod space;

/// A blotcdn node on the cluster, a child process with its own data dir.
fn node(etcd: &EtcdCluster, dir: &Path, peers: &[SocketAddr]) -> ChildServer {
    node_on(&etcd.endpoints(), dir, peers)
}

/// A node that knows only `endpoints` of the cluster.
fn node_on(endpoints: &str, dir: &Path, peers: &[SocketAddr]) -> ChildServer {
    let env = node_env(endpoints, peers);
    ChildServer::spawn_with(dir, &[], &env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect::<Vec<_>>())
}

async fn publisher(n: &ChildServer) -> pb::publisher_client::PublisherClient<Channel> {
    pb::publisher_client::PublisherClient::connect(format!("http://{}", n.grpc)).await.unwrap()
}

async fn resolver(n: &ChildServer) -> pb::resolver_client::ResolverClient<Channel> {
    pb::resolver_client::ResolverClient::connect(format!("http://{}", n.grpc)).await.unwrap()
}

async fn invalidate(
    c: &mut pb::publisher_client::PublisherClient<Channel>,
    blog: &str,
    paths: &[String],
) -> Result<u64, tonic::Status> {
    let req = pb::InvalidateRequest { blog_id: blog.into(), paths: paths.to_vec() };
    c.invalidate(req).await.map(|r| r.into_inner().cache_id)
}

async fn cache_ids(c: &mut pb::resolver_client::ResolverClient<Channel>, blog: &str, paths: &[String]) -> Vec<u64> {
    let req = pb::ResolveBatchRequest { blog_id: blog.into(), paths: paths.to_vec() };
    match c.resolve_batch(req).await {
        Ok(r) => r.into_inner().assets.iter().map(|a| a.cache_id).collect(),
        Err(_) => vec![0; paths.len()],
    }
}

async fn floor(c: &mut pb::resolver_client::ResolverClient<Channel>, blog: &str) -> u64 {
    match c.get_blog(pb::GetBlogRequest { blog_id: blog.into() }).await {
        Ok(b) => b.into_inner().cache_id,
        Err(_) => 0,
    }
}

/// A `PutAsset` stream of `bytes` for `blog`, named f.bin.
fn upload(blog: &str, bytes: &[u8]) -> impl tokio_stream::Stream<Item = pb::PutAssetChunk> {
    let header = pb::PutAssetHeader {
        blog_id: blog.into(),
        filename: "f.bin".into(),
        content_type: "application/octet-stream".into(),
        path: String::new(),
    };
    tokio_stream::iter([
        pb::PutAssetChunk { chunk: Some(Chunk::Header(header)) },
        pb::PutAssetChunk { chunk: Some(Chunk::Data(bytes.to_vec().into())) },
    ])
}

/// Uploads `bytes` as a permanent asset of `blog`; its hash and URL path.
async fn put(n: &ChildServer, blog: &str, bytes: &[u8]) -> (String, String) {
    let asset = publisher(n).await.put_asset(upload(blog, bytes)).await.unwrap().into_inner();
    (asset.hash.clone(), common::path_of(&asset.url))
}

/// An invalidation tried again while it is refused as UNAVAILABLE (a
/// leader election), for up to 10 s.
async fn patiently(c: &mut pb::publisher_client::PublisherClient<Channel>, blog: &str, paths: &[String]) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match invalidate(c, blog, paths).await {
            Ok(id) => return id,
            Err(e) if e.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("{e:?}"),
        }
    }
}

/// A put of `key`, for [`put_all`].
fn kv_put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> blotcdn::etcdpb::RequestOp {
    use blotcdn::etcdpb::{request_op::Request, PutRequest, RequestOp};
    RequestOp {
        request: Some(Request::RequestPut(PutRequest { key: key.into(), value: value.into(), ..Default::default() })),
    }
}

/// Sends these operations to etcd in one transaction.
async fn put_all(kv: &mut blotcdn::etcdpb::kv_client::KvClient<Channel>, ops: Vec<blotcdn::etcdpb::RequestOp>) {
    kv.txn(blotcdn::etcdpb::TxnRequest { success: ops, ..Default::default() }).await.unwrap();
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_on_one_node_show_on_the_other_and_cache_ids_never_repeat_across_nodes() {
    let etcd = EtcdCluster::start(3);
    let work = tempfile::tempdir().unwrap();
    let a = node(&etcd, &work.path().join("a"), &[]);
    let b = node(&etcd, &work.path().join("b"), &[]);
    let (mut pa, mut rb) = (publisher(&a).await, resolver(&b).await);

    // Visibility: a publish acknowledged on A, polled for on B.
    let mut lags = Vec::new();
    for i in 0..100 {
        let path = vec![format!("/p/{i}.css")];
        let id = invalidate(&mut pa, "seen", &path).await.unwrap();
        let acked = Instant::now();
        loop {
            if cache_ids(&mut rb, "seen", &path).await[0] == id {
                break;
            }
            assert!(acked.elapsed() < Duration::from_secs(5), "B did not show A's write {id} within 5 s");
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        lags.push(acked.elapsed());
    }
    println!("visibility lag A → B over 100 writes: p50 {:?}, p99 {:?}", pct(&mut lags, 0.5), pct(&mut lags, 0.99));

    // Concurrent publishers on both nodes, one blog: every id is new, and
    // each publisher's ids rise.
    let mut tasks = Vec::new();
    for w in 0..8 {
        let n = if w % 2 == 0 { a.grpc } else { b.grpc };
        tasks.push(tokio::spawn(async move {
            let mut c = pb::publisher_client::PublisherClient::connect(format!("http://{n}")).await.unwrap();
            let mut ids = Vec::new();
            for k in 0..40 {
                // Floor raises and path writes, mixed.
                let paths = if k % 2 == 0 { vec![] } else { vec![format!("/w{w}/{k}.js")] };
                ids.push(invalidate(&mut c, "shared", &paths).await.unwrap());
            }
            ids
        }));
    }
    let mut all = HashSet::new();
    let mut max = 0;
    for t in tasks {
        let ids = t.await.unwrap();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "one publisher's ids went back: {ids:?}");
        for id in ids {
            assert!(all.insert(id), "cache id {id} was handed out twice");
            max = max.max(id);
        }
    }
    assert_eq!(all.len(), 320);
    // Both nodes agree on the blog's last id (the last floor raise or path).
    let (mut ra, mut rb) = (resolver(&a).await, resolver(&b).await);
    let deadline = Instant::now() + Duration::from_secs(5);
    while floor(&mut ra, "shared").await != floor(&mut rb, "shared").await {
        assert!(Instant::now() < deadline, "the nodes disagree on the blog's floor");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let last_path: Vec<String> = (0..8).map(|w| format!("/w{w}/39.js")).collect();
    let on_a = cache_ids(&mut ra, "shared", &last_path).await;
    let on_b = cache_ids(&mut rb, "shared", &last_path).await;
    assert_eq!(on_a, on_b);
    assert!(on_a.iter().chain([floor(&mut ra, "shared").await].iter()).any(|id| *id == max));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_etcd_down_reads_answer_writes_fail_cleanly_and_the_node_recovers() {
    let mut etcd = EtcdCluster::start(3);
    let work = tempfile::tempdir().unwrap();
    let a = node(&etcd, &work.path().join("a"), &[]);
    let b = node(&etcd, &work.path().join("b"), &[]);
    let (mut pa, mut ra) = (publisher(&a).await, resolver(&a).await);
    let paths = vec!["/style.css".to_string()];
    let id = invalidate(&mut pa, "down", &paths).await.unwrap();
    assert_eq!(get(a.http, "/healthz", &[]).status, 200);

    etcd.kill_all();
    // Reads keep answering from memory.
    for _ in 0..20 {
        assert_eq!(cache_ids(&mut ra, "down", &paths).await, vec![id]);
    }
    // Writes fail with UNAVAILABLE, naming etcd, and nothing changes.
    let e = invalidate(&mut pa, "down", &paths).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(e.message().contains("etcd"), "{}", e.message());
    assert_eq!(cache_ids(&mut ra, "down", &paths).await, vec![id]);
    // /healthz and the metrics say so (once the watch has noticed).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let h = get(a.http, "/healthz", &[]);
        if h.status == 503 {
            assert!(String::from_utf8_lossy(&h.body).contains("etcd"), "{}", String::from_utf8_lossy(&h.body));
            break;
        }
        assert!(Instant::now() < deadline, "/healthz still {} with etcd down", h.status);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m = get(a.metrics.unwrap(), "/metrics", &[]);
    assert!(String::from_utf8_lossy(&m.body).contains("blotcdn_store_up 0"));

    etcd.restart_all();
    // The node catches up by itself: writes go through again, and B sees them.
    let deadline = Instant::now() + Duration::from_secs(30);
    let id2 = loop {
        match invalidate(&mut pa, "down", &paths).await {
            Ok(id2) => break id2,
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
                assert!(Instant::now() < deadline, "writes still refused 30 s after etcd came back: {e:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert!(id2 > id);
    let mut rb = resolver(&b).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while cache_ids(&mut rb, "down", &paths).await != vec![id2] {
        assert!(Instant::now() < deadline, "B did not catch up after etcd came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while get(a.http, "/healthz", &[]).status != 200 || get(b.http, "/healthz", &[]).status != 200 {
        assert!(Instant::now() < deadline, "/healthz did not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_killed_during_a_publish_storm_loses_no_acknowledged_write() {
    let mut etcd = EtcdCluster::start(3);
    let work = tempfile::tempdir().unwrap();
    let a = node(&etcd, &work.path().join("a"), &[]);
    let b = node(&etcd, &work.path().join("b"), &[]);
    let stop = Instant::now() + Duration::from_secs(4);
    let mut tasks = Vec::new();
    for w in 0..8 {
        let n = if w % 2 == 0 { a.grpc } else { b.grpc };
        tasks.push(tokio::spawn(async move {
            let mut c = pb::publisher_client::PublisherClient::connect(format!("http://{n}")).await.unwrap();
            let (mut acked, mut refused) = (BTreeMap::new(), 0);
            let mut k = 0;
            while Instant::now() < stop {
                let path = format!("/storm/{w}/{k}.css");
                match invalidate(&mut c, "storm", std::slice::from_ref(&path)).await {
                    Ok(id) => {
                        acked.insert(path, id);
                    }
                    Err(e) => {
                        assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
                        refused += 1;
                    }
                }
                k += 1;
            }
            (acked, refused)
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // The leader: the others must elect a new one mid-storm.
    let leader = etcd.leader().expect("a leader");
    etcd.kill(leader);
    let mut acked = BTreeMap::new();
    let mut refused = 0;
    for t in tasks {
        let (a, r) = t.await.unwrap();
        acked.extend(a);
        refused += r;
    }
    println!("storm: {} acknowledged, {refused} refused while the leader (member {leader}) was killed", acked.len());
    assert!(acked.len() > 100, "too few writes went through: {}", acked.len());
    etcd.restart(leader);
    // A node that starts now reads everything from etcd.
    let c = node(&etcd, &work.path().join("c"), &[]);
    let paths: Vec<String> = acked.keys().cloned().collect();
    for n in [&a, &b, &c] {
        let mut r = resolver(n).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut lost = Vec::new();
            for chunk in paths.chunks(1000) {
                let ids = cache_ids(&mut r, "storm", chunk).await;
                for (p, id) in chunk.iter().zip(ids) {
                    if id < acked[p] {
                        lost.push((p.clone(), acked[p], id));
                    }
                }
            }
            if lost.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "acknowledged writes missing on {}: {:?}",
                n.grpc,
                &lost[..lost.len().min(5)]
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_and_restarted_catches_up_and_a_new_node_starts_from_the_snapshot() {
    let etcd = EtcdCluster::start(3);
    let work = tempfile::tempdir().unwrap();
    let a = node(&etcd, &work.path().join("a"), &[]);
    let mut b = node(&etcd, &work.path().join("b"), &[]);
    let mut pa = publisher(&a).await;
    invalidate(&mut pa, "kb", &["/before.css".into()]).await.unwrap();
    // More than one snapshot's worth of records, from both nodes at once (so
    // both may snapshot at the same record): 64 publishers, one path each
    // per call. B is killed midway.
    let mut tasks = Vec::new();
    let b_grpc = b.grpc;
    for w in 0..64 {
        let n = if w % 2 == 0 { a.grpc } else { b_grpc };
        tasks.push(tokio::spawn(async move {
            let mut c = pb::publisher_client::PublisherClient::connect(format!("http://{n}")).await.unwrap();
            let (mut last, mut n) = (BTreeMap::new(), 0);
            for k in 0..400 {
                let path = format!("/many/{w}/{}.png", k % 50);
                match invalidate(&mut c, "kb", std::slice::from_ref(&path)).await {
                    Ok(id) => {
                        last.insert(path, id);
                        n += 1;
                    }
                    // B's publishers stop when B is killed.
                    Err(_) if w % 2 == 1 => break,
                    Err(e) => panic!("{e:?}"),
                }
            }
            (last, n)
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    b.kill9();
    let (mut want, mut written) = (BTreeMap::new(), 0);
    for t in tasks {
        let (last, n) = t.await.unwrap();
        want.extend(last);
        written += n;
    }
    let floor_id = invalidate(&mut pa, "kb", &[]).await.unwrap();
    let after = invalidate(&mut pa, "kb", &["/after.css".into()]).await.unwrap();
    // The log was cut at a snapshot: fewer groups are left than were written.
    let b = node(&etcd, &work.path().join("b"), &[]);
    let c = node(&etcd, &work.path().join("c"), &[]);
    for n in [&b, &c] {
        let mut r = resolver(n).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let paths: Vec<String> = want.keys().cloned().collect();
            let ids = cache_ids(&mut r, "kb", &paths).await;
            // Below the floor raise, every path resolves to the floor.
            let ok = ids.iter().all(|id| *id == floor_id)
                && cache_ids(&mut r, "kb", &["/after.css".into(), "/before.css".into()]).await == vec![after, floor_id];
            if ok {
                break;
            }
            assert!(Instant::now() < deadline, "{} did not catch up", n.grpc);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let mut kv = blotcdn::etcdpb::kv_client::KvClient::connect(etcd.endpoints().split(',').next().unwrap().to_owned())
        .await
        .unwrap();
    let count = |key: &str| {
        let key = key.as_bytes().to_vec();
        let mut end = key.clone();
        *end.last_mut().unwrap() += 1;
        blotcdn::etcdpb::RangeRequest { key, range_end: end, count_only: true, ..Default::default() }
    };
    let logs = kv.range(count("/blotcdn/log/")).await.unwrap().into_inner().count;
    let snaps = kv.range(count("/blotcdn/snap/")).await.unwrap().into_inner().count;
    println!("after {written} writes: {logs} log groups and {snaps} snapshot chunks left in etcd");
    assert!(written > 12_800, "{written}");
    assert!(snaps >= 1, "no snapshot was written");
    assert!(logs < written as i64 / 2, "the log was not cut at the snapshot: {logs} groups");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_url_uploaded_on_one_node_is_served_by_another_and_a_lying_peer_is_refused() {
    let etcd = EtcdCluster::start(3);
    let work = tempfile::tempdir().unwrap();
    let a = node(&etcd, &work.path().join("a"), &[]);
    // A peer that answers every request with other bytes.
    let liar = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let liar_addr = liar.local_addr().unwrap();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for s in liar.incoming().take(20) {
            let Ok(mut s) = s else { continue };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let body = b"not the avatar you asked for";
            let _ = write!(s, "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", body.len());
            let _ = s.write_all(body);
        }
    });
    let b = node(&etcd, &work.path().join("b"), &[liar_addr, a.http]);
    let lied_to = node(&etcd, &work.path().join("c"), &[liar_addr]);

    let bytes = b"\x89PNG an avatar uploaded on node A".to_vec();
    let mut pa = publisher(&a).await;
    let chunks = vec![
        pb::PutAssetChunk {
            chunk: Some(Chunk::Header(pb::PutAssetHeader {
                blog_id: "peers".into(),
                filename: "me.png".into(),
                content_type: "image/png".into(),
                path: String::new(),
            })),
        },
        pb::PutAssetChunk { chunk: Some(Chunk::Data(bytes.clone().into())) },
    ];
    let asset = pa.put_asset(tokio_stream::iter(chunks)).await.unwrap().into_inner();
    let path = common::path_of(&asset.url);

    // Both other nodes know of the asset (through etcd) before they are asked.
    for n in [&b, &lied_to] {
        knows_one_asset(n, "peers").await;
    }
    // Only the liar as a peer: its bytes are refused, nothing is kept, and
    // the answer is to retry (503), not a 404 an edge would keep.
    let r = get(lied_to.http, &path, &[]);
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    let blob = |dir: &Path| common::blob_file(dir, &asset.hash);
    assert!(!blob(&work.path().join("c")).exists(), "a wrong blob was stored");

    // B asks the liar first, refuses its bytes, then gets them from A.
    let r = get(b.http, &path, &[]);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.body, bytes);
    assert_eq!(r.header("content-type"), Some("image/png"));
    assert_eq!(std::fs::read(blob(&work.path().join("b"))).unwrap(), bytes, "B keeps its own copy");
    // From its own disk now, even with A gone.
    let a_http = a.http;
    drop(a);
    let r = get(b.http, &path, &[]);
    assert_eq!((r.status, r.body), (200, bytes));
    // A node whose only peer, the one holding it, is down: 503 to retry,
    // not a 404 an edge would keep (it said 404, public, max-age=60).
    let d = node(&etcd, &work.path().join("d"), &[a_http]);
    knows_one_asset(&d, "peers").await;
    let r = get(d.http, &path, &[]);
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!((r.header("retry-after"), r.header("cache-control")), (Some("1"), Some("no-store")));
}

/// Waits (up to 5 s) until `n` knows of one asset of `blog`.
async fn knows_one_asset(n: &ChildServer, blog: &str) {
    let mut r = resolver(n).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while r.get_blog(pb::GetBlogRequest { blog_id: blog.into() }).await.map_or(0, |b| b.into_inner().asset_count) != 1 {
        assert!(Instant::now() < deadline, "{} does not know of the asset", n.grpc);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_opened_again_after_etcd_restarts_applies_nothing_twice() {
    let mut etcd = EtcdCluster::start(3);
    let work = tempfile::tempdir().unwrap();
    let a = node(&etcd, &work.path().join("a"), &[]);
    let bytes = b"one blob, referenced by three blogs".to_vec();
    let (hash, _) = put(&a, "ra", &bytes).await;
    let (_, keep) = put(&a, "rb", &bytes).await;
    let mut pa = publisher(&a).await;
    pa.delete_asset(pb::DeleteAssetRequest { blog_id: "ra".into(), hash: hash.clone() }).await.unwrap();
    // The node's watch breaks and is opened again.
    etcd.kill_all();
    etcd.restart_all();
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(a.http, "/healthz", &[]).status != 200 {
        assert!(Instant::now() < deadline, "the node did not come back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Had the watch applied ra's deletion again, this one would take the
    // blob's last count and the collector would remove rb's blob.
    let mut pa = publisher(&a).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match put_retry(&a, "rc", &bytes).await {
            Some(_) => break,
            None => assert!(Instant::now() < deadline, "uploads still refused"),
        }
    }
    pa.delete_asset(pb::DeleteAssetRequest { blog_id: "rc".into(), hash: hash.clone() }).await.unwrap();
    let r = get(a.http, &keep, &[]);
    assert_eq!((r.status, &r.body), (200, &bytes), "rb's permanent URL lost its bytes");
    assert!(common::blob_file(&work.path().join("a"), &hash).exists());
}

/// An upload that may be refused while etcd settles: `None` then.
async fn put_retry(n: &ChildServer, blog: &str, bytes: &[u8]) -> Option<String> {
    match publisher(n).await.put_asset(upload(blog, bytes)).await {
        Ok(r) => Some(r.into_inner().hash),
        Err(e) => {
            assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
            None
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_collected_on_one_node_is_collected_on_the_others_and_an_empty_view_removes_nothing() {
    let etcd = EtcdCluster::start(3);
    let work = tempfile::tempdir().unwrap();
    let a = node(&etcd, &work.path().join("a"), &[]);
    let b = node(&etcd, &work.path().join("b"), &[a.http]);
    let bytes = b"a blob both nodes end up holding".to_vec();
    let (hash, path) = put(&a, "gone", &bytes).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = get(b.http, &path, &[]);
        if r.status == 200 {
            assert_eq!(r.body, bytes);
            break;
        }
        assert!(Instant::now() < deadline, "B never served the blob");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(common::blob_file(&work.path().join("b"), &hash).exists());
    // Deleted through A: A collects its copy at once, B its own copy once
    // the deletion reached it.
    publisher(&a).await.delete_blog(pb::DeleteBlogRequest { blog_id: "gone".into() }).await.unwrap();
    assert!(!common::blob_file(&work.path().join("a"), &hash).exists());
    let deadline = Instant::now() + Duration::from_secs(5);
    while get(b.http, &path, &[]).status != 404 {
        assert!(Instant::now() < deadline, "B still serves a deleted blog's asset");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while common::blob_file(&work.path().join("b"), &hash).exists() {
        assert!(Instant::now() < deadline, "B kept the copy of a blob no blog references");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A node started on etcd holding nothing of this cluster (a wrong prefix)
    // removes nothing: only deletions it saw make its blobs garbage.
    let (keep_hash, _) = put(&a, "kept", b"a blob that stays").await;
    drop(b);
    let c_dir = work.path().join("c");
    let mut env_prefix = node_env(&etcd.endpoints(), &[]);
    env_prefix.push(("BLOTCDN_ETCD_PREFIX".into(), "/elsewhere/".into()));
    std::fs::create_dir_all(c_dir.join("cas")).unwrap();
    copy_dir(&work.path().join("a").join("cas"), &c_dir.join("cas"));
    let _c = ChildServer::spawn_with(
        &c_dir,
        &[],
        &env_prefix.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect::<Vec<_>>(),
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(common::blob_file(&c_dir, &keep_hash).exists(), "a node with an empty view of etcd removed a blob");
}

fn node_env(endpoints: &str, peers: &[SocketAddr]) -> Vec<(String, String)> {
    let mut env =
        vec![("BLOTCDN_STORE".to_string(), "etcd".to_string()), ("BLOTCDN_ETCD_ENDPOINTS".into(), endpoints.into())];
    if !peers.is_empty() {
        let p: Vec<String> = peers.iter().map(|p| format!("http://{p}")).collect();
        env.push(("BLOTCDN_PEERS".into(), p.join(",")));
    }
    env
}

/// `blotcdn serve` on `dir` with `env`, run until it exits (within 60 s):
/// its exit code, its log (stdout) and its stderr (the exit line).
fn serve_to_exit(dir: &Path, env: &[(String, String)]) -> (i32, String, String) {
    let mut cmd = common::serve_on_free_ports(dir);
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    common::run(&mut cmd, 60)
}

fn copy_dir(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&dest).unwrap();
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_revisions_were_compacted_while_it_was_cut_off_reloads() {
    let mut etcd = EtcdCluster::start(3);
    let work = tempfile::tempdir().unwrap();
    let a = node(&etcd, &work.path().join("a"), &[]);
    // B knows only member 2: with it down, B is cut off while A writes on.
    let b = node_on(&etcd.endpoint(2), &work.path().join("b"), &[]);
    let (mut pa, mut rb) = (publisher(&a).await, resolver(&b).await);
    let paths: Vec<String> = (0..50).map(|i| format!("/c/{i}.css")).collect();
    let before = invalidate(&mut pa, "compacted", &paths).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while cache_ids(&mut rb, "compacted", &paths[..1]).await != vec![before] {
        assert!(Instant::now() < deadline, "B never saw the first write");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    etcd.kill(2);
    // Writes go on (tried again while the members elect a new leader, if
    // member 2 led).
    patiently(&mut pa, "compacted", &[]).await;
    let mut last = BTreeMap::new();
    for p in &paths {
        last.insert(p.clone(), patiently(&mut pa, "compacted", std::slice::from_ref(p)).await);
    }
    // Every revision B has not seen is compacted away.
    let mut kv = blotcdn::etcdpb::kv_client::KvClient::connect(etcd.endpoint(0)).await.unwrap();
    let rev = kv
        .range(blotcdn::etcdpb::RangeRequest { key: b"/blotcdn/head".to_vec(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .header
        .unwrap()
        .revision;
    kv.compact(blotcdn::etcdpb::CompactionRequest { revision: rev, physical: true }).await.unwrap();
    etcd.restart(2);
    // B's watch is refused as compacted; B reloads and shows every write.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ids = cache_ids(&mut rb, "compacted", &paths).await;
        let want: Vec<u64> = paths.iter().map(|p| last[p]).collect();
        if ids == want {
            break;
        }
        assert!(Instant::now() < deadline, "B did not reload after compaction: {ids:?} != {want:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(get(b.http, "/healthz", &[]).status, 200);
}

/// Many requests at once for a blob this node lacks make one fetch from the
/// peers, not one each: with a first peer that never answers, they all wait
/// out its timeout once, together, and get the bytes from the next peer;
/// the silent peer is asked once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_for_a_blob_being_fetched_wait_for_that_one_fetch() {
    let etcd = EtcdCluster::start(1);
    let work = tempfile::tempdir().unwrap();
    let a = node(&etcd, &work.path().join("a"), &[]);
    // A peer that takes requests and never answers them.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let asked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = asked.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in silent.incoming().take(100) {
            let Ok(mut s) = s else { continue };
            let mut buf = [0u8; 4096];
            if std::io::Read::read(&mut s, &mut buf).unwrap_or(0) > 0 {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            held.push(s);
        }
    });
    let mut env = node_env(&etcd.endpoints(), &[silent_addr, a.http]);
    env.push(("BLOTCDN_FALLBACK_TIMEOUT_SECS".into(), "2".into()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let b = ChildServer::spawn_with(&work.path().join("b"), &[], &env);

    let bytes = vec![7u8; 20_000];
    let (_, path) = put(&a, "flight", &bytes).await;
    let mut r = resolver(&b).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while r.get_blog(pb::GetBlogRequest { blog_id: "flight".into() }).await.map_or(0, |b| b.into_inner().asset_count)
        != 1
    {
        assert!(Instant::now() < deadline, "B does not know of the asset");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let http = b.http;
    let gets: Vec<_> = (0..16)
        .map(|_| {
            let path = path.clone();
            tokio::task::spawn_blocking(move || get(http, &path, &[]))
        })
        .collect();
    for g in gets {
        let r = g.await.unwrap();
        assert_eq!((r.status, r.body.len()), (200, bytes.len()), "{}", String::from_utf8_lossy(&r.body));
    }
    let asked = asked.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(asked, 1, "the silent peer was asked {asked} times for one blob");
}

/// A data dir belongs to the store it was first served with: a cluster
/// node's started once without `store = "etcd"` (a hostile test's slip)
/// came up as an empty embedded store that acknowledged writes no other
/// node would see. Refused now, naming the key, both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_is_served_only_with_the_store_it_belongs_to() {
    let etcd = EtcdCluster::start(1);
    let work = tempfile::tempdir().unwrap();
    let (clustered, embedded) = (work.path().join("clustered"), work.path().join("embedded"));
    drop(node(&etcd, &clustered, &[]));
    drop(ChildServer::spawn(&embedded));
    let (code, _, err) = serve_to_exit(&clustered, &[]);
    assert!(code != 0 && err.contains("store") && err.contains("\"etcd\""), "{code} {err}");
    let (code, _, err) = serve_to_exit(&embedded, &node_env(&etcd.endpoints(), &[]));
    assert!(code != 0 && err.contains("store") && err.contains("\"sled\""), "{code} {err}");
}

/// etcd takes a request of 1.5 MiB at most; a full batch of long paths is
/// several MB, and so is the deletion of a blog with tens of thousands of
/// permanent assets. Such a write is committed in parts: written first,
/// then named by the group that commits them. Before, it was refused
/// ("too large for one etcd request") while GetInfo said `max_batch` 10,000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_larger_than_one_etcd_request_is_committed_in_parts_and_read_back_everywhere() {
    let etcd = EtcdCluster::start(1);
    let work = tempfile::tempdir().unwrap();
    let a = node(&etcd, &work.path().join("a"), &[]);
    let mut b = node(&etcd, &work.path().join("b"), &[]);
    let (mut pa, mut rb) = (publisher(&a).await, resolver(&b).await);
    let before = invalidate(&mut pa, "big", &["/first.css".into()]).await.unwrap();
    // 10,000 paths of about 300 bytes: 3 MB, three parts.
    let paths: Vec<String> = (0..10_000).map(|i| format!("/posts/{i:05}/{}.jpg", "p".repeat(290))).collect();
    let id = invalidate(&mut pa, "big", &paths).await.expect("a large write is committed");
    assert!(id > before);
    let after = invalidate(&mut pa, "big", &["/last.css".into()]).await.unwrap();
    assert!(after > id);
    let deadline = Instant::now() + Duration::from_secs(10);
    while cache_ids(&mut rb, "big", &paths).await.iter().any(|&c| c != id) {
        assert!(Instant::now() < deadline, "B did not show the large write within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(cache_ids(&mut rb, "big", &["/first.css".into(), "/last.css".into()]).await, [before, after]);
    // Read back from etcd at start: a node restarted, and a new one.
    b.kill9();
    let b = node(&etcd, &work.path().join("b"), &[]);
    let c = node(&etcd, &work.path().join("c"), &[]);
    for n in [&b, &c] {
        let mut r = resolver(n).await;
        assert!(cache_ids(&mut r, "big", &paths).await.iter().all(|&c| c == id), "a node reading the log at start");
        assert_eq!(cache_ids(&mut r, "big", &["/last.css".into()]).await, [after]);
    }
    // The same blog's later writes build on it: ids still rise on every node.
    let mut pc = publisher(&c).await;
    let later = invalidate(&mut pc, "big", &paths[..10]).await.unwrap();
    assert!(later > after);

    // Two nodes writing large groups at once (one loses the race now and
    // then, and writes its parts again), past the 64 MiB of groups after
    // which a node writes a snapshot: every write is read back, and the
    // snapshots delete the parts they cover.
    let paths = std::sync::Arc::new(paths);
    let mut writers = Vec::new();
    for (n, name) in [(a.grpc, "bulk-a"), (c.grpc, "bulk-c")] {
        let paths = paths.clone();
        writers.push(tokio::spawn(async move {
            let mut p = pb::publisher_client::PublisherClient::connect(format!("http://{n}")).await.unwrap();
            let mut last = 0;
            for i in 0..24 {
                last = invalidate(&mut p, &format!("{name}-{}", i % 3), &paths).await.expect("a large write");
            }
            last
        }));
    }
    let mut lasts = Vec::new();
    for w in writers {
        lasts.push(w.await.unwrap());
    }
    let mut kv = blotcdn::etcdpb::kv_client::KvClient::connect(etcd.endpoint(0)).await.unwrap();
    let range = blotcdn::etcdpb::RangeRequest {
        key: b"/blotcdn/part/".to_vec(),
        range_end: b"/blotcdn/part0".to_vec(),
        count_only: true,
        ..Default::default()
    };
    let left = kv.range(range).await.unwrap().into_inner().count;
    eprintln!("{left} parts left in etcd after 48 large writes");
    // 48 writes of three parts each were committed.
    assert!(left < 100, "{left} parts left in etcd: the snapshots did not delete those they cover");
    let d = node(&etcd, &work.path().join("d"), &[]);
    let mut r = resolver(&d).await;
    for (name, last) in ["bulk-a", "bulk-c"].into_iter().zip(lasts) {
        let got = cache_ids(&mut r, &format!("{name}-2"), &paths[..100]).await;
        assert!(got.iter().all(|&c| c == last), "{name}: a node started from the snapshot and the parts after it");
    }
}

/// A node killed between writing a large write's parts and committing it
/// leaves parts no group names. Before, they stayed in etcd, and in every
/// node's memory, until the next snapshot (after 10,000 records). Now the
/// nodes that see the log pass them delete them at their next write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parts_no_group_names_are_deleted_once_the_log_passes_them() {
    let etcd = EtcdCluster::start(1);
    let work = tempfile::tempdir().unwrap();
    let a = node(&etcd, &work.path().join("a"), &[]);
    let mut pa = publisher(&a).await;
    invalidate(&mut pa, "orphans", &["/a.css".into()]).await.unwrap();
    let mut kv = blotcdn::etcdpb::kv_client::KvClient::connect(etcd.endpoint(0)).await.unwrap();
    let get = |key: &[u8]| blotcdn::etcdpb::RangeRequest { key: key.to_vec(), ..Default::default() };
    let head = kv.range(get(b"/blotcdn/head")).await.unwrap().into_inner();
    let head = u64::from_be_bytes(head.kvs[0].value[..8].try_into().unwrap());
    // What a writer killed before its commit leaves: a part of the next record.
    let orphan = format!("/blotcdn/part/{:016x}-{:016x}-{:016x}/00000000", head + 1, 7u64, 1u64);
    put_all(&mut kv, vec![kv_put(orphan.clone(), vec![1; 1000])]).await;
    // Another write takes that record; the next one deletes the orphan.
    invalidate(&mut pa, "orphans", &["/b.css".into()]).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        invalidate(&mut pa, "orphans", &["/c.css".into()]).await.unwrap();
        if kv.range(get(orphan.as_bytes())).await.unwrap().into_inner().kvs.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "the orphan part {orphan} is still in etcd");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One member frozen (SIGSTOP: it takes connections and answers nothing),
/// a quorum still up. Before, three writes in four failed after 3 s on
/// every node for as long as it stayed frozen ("etcd did not answer within
/// 3 s"), and `/healthz` said 200 throughout: the balanced channel kept
/// picking the frozen member. Now a request it does not answer goes to the
/// next member, which is used from then on (the watch too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_member_hands_its_requests_to_the_others() {
    let etcd = EtcdCluster::start(3);
    let work = tempfile::tempdir().unwrap();
    // The node's first member, the one it uses, is a follower: freezing it
    // leaves the leader and a quorum.
    let leader = etcd.leader().expect("a leader");
    let frozen = (leader + 1) % 3;
    let order = [frozen, leader, (leader + 2) % 3];
    let endpoints = order.iter().map(|&i| etcd.endpoint(i)).collect::<Vec<_>>().join(",");
    let a = node_on(&endpoints, &work.path().join("a"), &[]);
    let (mut p, mut r) = (publisher(&a).await, resolver(&a).await);
    invalidate(&mut p, "frozen", &["/a.css".into()]).await.unwrap();
    etcd.pause(frozen);
    let mut last = 0;
    for i in 0..10 {
        let path = format!("/{i}.css");
        let answered =
            tokio::time::timeout(Duration::from_secs(20), invalidate(&mut p, "frozen", std::slice::from_ref(&path)))
                .await;
        let id = answered
            .expect("a write answered within 20 s")
            .unwrap_or_else(|e| panic!("write {i} refused with a member frozen: {}", e.message()));
        assert!(id > last);
        last = id;
        assert_eq!(cache_ids(&mut r, "frozen", &[path]).await, vec![id]);
    }
    let health = common::get(a.http, "/healthz", &[]);
    etcd.resume(frozen);
    assert_eq!(health.status, 200, "{}", String::from_utf8_lossy(&health.body));
}

/// A member that stalls again and again (here 1.5 s in every 1.8 s, as a
/// starved or throttled host would) but never stays silent for the 2 s
/// after which a request goes to the next member. Before, the node kept
/// using it, and every write that landed in a stall took as long as the
/// stall. Now a small request answered after 1 s has the node move on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_stalls_again_and_again_is_left() {
    let etcd = std::sync::Arc::new(EtcdCluster::start(3));
    let work = tempfile::tempdir().unwrap();
    let leader = etcd.leader().expect("a leader");
    let stalling = (leader + 1) % 3;
    let order = [stalling, leader, (leader + 2) % 3];
    let endpoints = order.iter().map(|&i| etcd.endpoint(i)).collect::<Vec<_>>().join(",");
    let a = node_on(&endpoints, &work.path().join("a"), &[]);
    let mut p = publisher(&a).await;
    invalidate(&mut p, "stalls", &["/a.css".into()]).await.unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let staller = {
        let (etcd, stop) = (etcd.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                etcd.pause(stalling);
                std::thread::sleep(Duration::from_millis(1500));
                etcd.resume(stalling);
                std::thread::sleep(Duration::from_millis(300));
            }
        })
    };
    let (started, mut slow, mut n) = (Instant::now(), Vec::new(), 0);
    while started.elapsed() < Duration::from_secs(9) {
        let t0 = Instant::now();
        invalidate(&mut p, "stalls", &[format!("/{n}.css")]).await.unwrap();
        if t0.elapsed() >= Duration::from_millis(900) {
            slow.push(t0.elapsed());
        }
        n += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    staller.join().unwrap();
    // The first stall costs one write; five stalls came and went.
    assert!(slow.len() <= 1, "{} of {n} writes waited out a stall: {slow:?}", slow.len());
}
