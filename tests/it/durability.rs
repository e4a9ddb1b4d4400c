//! Acknowledged invalidations survive `kill -9`: the server as a child
//! process, concurrent publishers, a kill in the middle of their traffic, a
//! restart on the same data dir.

use crate::common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blotcdn::proto as pb;
use common::ChildServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_invalidations_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ChildServer::spawn(dir.path());
    let url = format!("http://{}", server.grpc);

    // (blog, path or "" for the floor) → highest acknowledged cache id.
    let acked: Arc<Mutex<HashMap<(String, String), u64>>> = Arc::default();
    let acks: Arc<std::sync::atomic::AtomicU64> = Arc::default();
    let mut tasks = Vec::new();
    for worker in 0..16u32 {
        let (url, acked, acks) = (url.clone(), acked.clone(), acks.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = pb::publisher_client::PublisherClient::connect(url).await.unwrap();
            // Bounded: at most 10,000 calls; the kill ends it much sooner.
            for i in 0..10_000u32 {
                let blog = format!("blog{}", (worker + i) % 4);
                let path = if i % 3 == 0 { String::new() } else { format!("/w{worker}/f{}.css", i % 7) };
                let paths = if path.is_empty() { vec![] } else { vec![path.clone()] };
                match c.invalidate(pb::InvalidateRequest { blog_id: blog.clone(), paths }).await {
                    Ok(r) => {
                        let id = r.into_inner().cache_id;
                        acks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let mut a = acked.lock().unwrap();
                        let e = a.entry((blog, path)).or_default();
                        *e = (*e).max(id);
                    }
                    Err(_) => return i,
                }
            }
            10_000
        }));
    }
    // Kill once a few hundred writes were acknowledged (waiting on the
    // traffic itself, not on a sleep being long enough).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while acked.lock().unwrap().values().count() < 40 || acks.load(std::sync::atomic::Ordering::SeqCst) < 300 {
        assert!(std::time::Instant::now() < deadline, "too little traffic in 30 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.kill9();
    let mut calls = 0;
    for t in tasks {
        calls += t.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 20 && calls > 100, "too little traffic before the kill: {calls} calls");

    let server = ChildServer::spawn(dir.path());
    let url = format!("http://{}", server.grpc);
    let mut r = pb::resolver_client::ResolverClient::connect(url.clone()).await.unwrap();
    for ((blog, path), id) in &acked {
        let got = if path.is_empty() {
            r.get_blog(pb::GetBlogRequest { blog_id: blog.clone() }).await.unwrap().into_inner().cache_id
        } else {
            let a = r
                .resolve_batch(pb::ResolveBatchRequest { blog_id: blog.clone(), paths: vec![path.clone()] })
                .await
                .unwrap()
                .into_inner();
            a.assets[0].cache_id
        };
        assert!(got >= *id, "{blog} {path:?}: acknowledged {id}, after restart {got}");
    }
    // No cache id goes backwards: the next one is above everything acknowledged.
    let mut p = pb::publisher_client::PublisherClient::connect(url).await.unwrap();
    for b in 0..4 {
        let blog = format!("blog{b}");
        let max = acked.iter().filter(|((bl, _), _)| *bl == blog).map(|(_, id)| *id).max().unwrap_or(0);
        let next = p.invalidate(pb::InvalidateRequest { blog_id: blog.clone(), paths: vec![] }).await.unwrap();
        assert!(next.into_inner().cache_id > max, "{blog}");
    }
    eprintln!("{calls} calls before kill -9, {} keys checked", acked.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_flushes() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ChildServer::spawn(dir.path());
    let url = format!("http://{}", server.grpc);
    let mut p = pb::publisher_client::PublisherClient::connect(url.clone()).await.unwrap();
    let id = p
        .invalidate(pb::InvalidateRequest { blog_id: "term".into(), paths: vec!["/a.css".into()] })
        .await
        .unwrap()
        .into_inner()
        .cache_id;
    p.set_domain(pb::SetDomainRequest { domain: "term.example".into(), blog_id: "term".into() }).await.unwrap();
    unsafe {
        libc::kill(server.child.id() as i32, libc::SIGTERM);
    }
    // Bounded wait for a clean exit.
    let mut status = None;
    for _ in 0..500 {
        if let Some(s) = server.child.try_wait().unwrap() {
            status = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = status.expect("the server exits within 5 s of SIGTERM");
    assert!(status.success(), "exit status {status:?}");
    // Stopped cleanly: sled holds everything, the write-ahead log is empty.
    let wal = std::fs::read(dir.path().join("db.wal")).unwrap();
    assert!(wal.len() < 8 || wal[..8] == [0u8; 8], "log not emptied at shutdown");

    let server = ChildServer::spawn(dir.path());
    let mut r = pb::resolver_client::ResolverClient::connect(format!("http://{}", server.grpc)).await.unwrap();
    let a = r
        .resolve_batch(pb::ResolveBatchRequest { blog_id: "term".into(), paths: vec!["/a.css".into()] })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.assets[0].cache_id, id);
    let d = r.lookup_domain(pb::LookupDomainRequest { domain: "term.example".into() }).await.unwrap();
    assert_eq!(d.into_inner().blog_id, "term");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_bindings_and_domains_survive_kill_9() {
    use blotcdn::proto::put_asset_chunk::Chunk;
    let dir = tempfile::tempdir().unwrap();
    let mut server = ChildServer::spawn(dir.path());
    let url = format!("http://{}", server.grpc);
    let mut p = pb::publisher_client::PublisherClient::connect(url).await.unwrap();
    let chunks = vec![
        pb::PutAssetChunk {
            chunk: Some(Chunk::Header(pb::PutAssetHeader {
                blog_id: "k9".into(),
                filename: "avatar.png".into(),
                content_type: String::new(),
                path: "/avatars/me.png".into(),
            })),
        },
        pb::PutAssetChunk { chunk: Some(Chunk::Data(bytes::Bytes::from_static(b"avatar bytes"))) },
    ];
    let asset = p.put_asset(tokio_stream::iter(chunks)).await.unwrap().into_inner();
    p.set_domain(pb::SetDomainRequest { domain: "k9.example".into(), blog_id: "k9".into() }).await.unwrap();
    p.set_domain(pb::SetDomainRequest { domain: "gone.example".into(), blog_id: "k9".into() }).await.unwrap();
    p.remove_domain(pb::RemoveDomainRequest { domain: "gone.example".into() }).await.unwrap();
    // Straight after the acknowledgements: nothing has been checkpointed into sled.
    server.kill9();

    let server = ChildServer::spawn(dir.path());
    let mut r = pb::resolver_client::ResolverClient::connect(format!("http://{}", server.grpc)).await.unwrap();
    let a = r
        .resolve_batch(pb::ResolveBatchRequest { blog_id: "k9".into(), paths: vec!["/avatars/me.png".into()] })
        .await
        .unwrap()
        .into_inner();
    // The port (and so the base URL) changed with the restart; the path did not.
    assert_eq!(common::path_of(&a.assets[0].url), common::path_of(&asset.url));
    assert_eq!(a.assets[0].content_hash, asset.hash);
    let got = common::get(server.http, &common::path_of(&asset.url), &[]);
    assert_eq!((got.status, got.body.as_slice()), (200, &b"avatar bytes"[..]));
    let d = r.lookup_domain(pb::LookupDomainRequest { domain: "k9.example".into() }).await.unwrap();
    assert_eq!(d.into_inner().blog_id, "k9");
    let e = r.lookup_domain(pb::LookupDomainRequest { domain: "gone.example".into() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
}

/// The write-ahead log deleted or emptied by hand after a crash (taken for a
/// text log, say): the start refuses, naming the log and the way out. Before
/// (hostile round 31), it created an empty log and served without the writes
/// acknowledged since the last checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_whose_log_was_deleted_refuses_instead_of_serving_without_its_writes() {
    use common::{binary, run};
    use std::process::Command;
    let dir = tempfile::tempdir().unwrap();
    let mut server = ChildServer::spawn(dir.path());
    let url = format!("http://{}", server.grpc);
    let mut p = pb::publisher_client::PublisherClient::connect(url).await.unwrap();
    let req = pb::InvalidateRequest { blog_id: "b".into(), paths: vec!["/a.css".into()] };
    let id = p.invalidate(req).await.unwrap().into_inner().cache_id;
    server.kill9();
    let (wal, marker) = (dir.path().join("db.wal"), dir.path().join("db.checkpoint"));
    let kept = std::fs::read(&wal).unwrap();
    let serve = || {
        let addrs = ["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0"];
        run(Command::new(binary()).args(["serve", "--data-dir"]).arg(dir.path()).args(addrs), 60)
    };
    for what in ["missing", "empty"] {
        match what {
            "missing" => std::fs::remove_file(&wal).unwrap(),
            _ => std::fs::write(&wal, b"").unwrap(),
        }
        let (code, out, err) = serve();
        assert_ne!(code, 0, "started without its log: {out}");
        let said = format!("{} is {what}", wal.display());
        assert!(err.contains(&said) && err.contains(&*marker.to_string_lossy()), "{err}");
        assert_eq!(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0), 0, "the start made a log of its own");
    }
    // Put back, the log gives the acknowledged write.
    std::fs::write(&wal, &kept).unwrap();
    let mut server = ChildServer::spawn(dir.path());
    let mut r = pb::resolver_client::ResolverClient::connect(format!("http://{}", server.grpc)).await.unwrap();
    let req = pb::ResolveBatchRequest { blog_id: "b".into(), paths: vec!["/a.css".into()] };
    assert_eq!(r.resolve_batch(req).await.unwrap().into_inner().assets[0].cache_id, id);
    // The way out the refusal names: without the marker too, it starts.
    server.kill9();
    std::fs::remove_file(&wal).unwrap();
    std::fs::remove_file(&marker).unwrap();
    let server = ChildServer::spawn(dir.path());
    let mut r = pb::resolver_client::ResolverClient::connect(format!("http://{}", server.grpc)).await.unwrap();
    r.get_info(pb::GetInfoRequest {}).await.unwrap();
}
