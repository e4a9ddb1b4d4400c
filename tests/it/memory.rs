//! Memory stays bounded under a publish pipeline's normal work: the same
//! 10,000 paths invalidated again and again, through a size checkpoint.
//! Before the fix, sled's batch apply kept what each batch replaced and the
//! server grew by about 14 MB a batch, past a gigabyte in this test.

use crate::common;

use blotcdn::proto as pb;
use common::ChildServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_10k_path_invalidations_keep_memory_flat() {
    let dir = tempfile::tempdir().unwrap();
    let server = ChildServer::spawn(dir.path());
    let mut c = pb::publisher_client::PublisherClient::connect(format!("http://{}", server.grpc))
        .await
        .unwrap()
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let paths: Vec<String> =
        (0..10_000).map(|i| format!("/posts/{:05}/images/a-longer-file-name-like-real-ones.jpg", i)).collect();
    let round = |c: &mut pb::publisher_client::PublisherClient<_>| {
        let req = pb::InvalidateRequest { blog_id: "memblog".into(), paths: paths.clone() };
        let mut c = c.clone();
        async move { c.invalidate(req).await.unwrap().into_inner().cache_id }
    };
    let mut last = 0;
    for _ in 0..5 {
        last = round(&mut c).await;
    }
    let base = server.rss_bytes();
    // About 650 KB of log a round: 120 rounds pass the 64 MiB size checkpoint.
    let mut peak = base;
    for i in 0..120 {
        let id = round(&mut c).await;
        assert!(id > last, "cache ids increase");
        last = id;
        if i % 10 == 9 {
            peak = peak.max(server.rss_bytes());
        }
    }
    let end = server.rss_bytes();
    let mb = |b: u64| b as f64 / (1 << 20) as f64;
    eprintln!("RSS after warm-up {:.0} MB, peak {:.0} MB, end {:.0} MB", mb(base), mb(peak), mb(end));
    // The index holds 10,000 paths (a few MB); the log is read back one
    // record at a time at a checkpoint. 1.2 million path writes must not
    // cost more than a small multiple of one batch.
    assert!(
        peak < base + (120 << 20),
        "memory grew from {:.0} MB to {:.0} MB over 120 batches of 10,000 paths",
        mb(base),
        mb(peak)
    );

    // And every path kept its last version.
    let mut r = pb::resolver_client::ResolverClient::connect(format!("http://{}", server.grpc))
        .await
        .unwrap()
        .max_decoding_message_size(64 << 20);
    let got = r
        .resolve_batch(pb::ResolveBatchRequest { blog_id: "memblog".into(), paths: paths.clone() })
        .await
        .unwrap()
        .into_inner()
        .assets;
    assert_eq!(got.len(), 10_000);
    assert!(got.iter().all(|a| a.cache_id == last), "every path at the last acknowledged version");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_floor_raise_drops_the_path_versions_it_made_meaningless() {
    use blotcdn::proto::put_asset_chunk::Chunk;
    let s = common::Server::start().await;
    let paths: Vec<String> = (0..5000).map(|i| format!("/posts/{i}.html")).collect();
    let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
    common::invalidate(&s, "prune", &refs).await;
    let mut p = s.publisher().await;
    let header = pb::PutAssetHeader {
        blog_id: "prune".into(),
        filename: "logo.png".into(),
        path: "/logo.png".into(),
        ..Default::default()
    };
    let chunks = vec![
        pb::PutAssetChunk { chunk: Some(Chunk::Header(header)) },
        pb::PutAssetChunk { chunk: Some(Chunk::Data(bytes::Bytes::from_static(b"png"))) },
    ];
    let logo = p.put_asset(tokio_stream::iter(chunks)).await.unwrap().into_inner();
    let count = |s: &common::Server| {
        let s = s.grpc;
        async move {
            let mut r = pb::resolver_client::ResolverClient::connect(format!("http://{s}")).await.unwrap();
            r.get_blog(pb::GetBlogRequest { blog_id: "prune".into() }).await.unwrap().into_inner()
        }
    };
    assert_eq!(count(&s).await.path_count, 5001);
    let floor = common::invalidate(&s, "prune", &[]).await;
    let after = count(&s).await;
    assert_eq!((after.path_count, after.cache_id), (1, floor), "only the bound path is left");
    // What they resolve to is unchanged: the floor, and the permanent URL.
    let got = common::resolve(&s, "prune", &["/posts/7.html", "/logo.png"]).await;
    assert_eq!(got[0].cache_id, floor);
    assert_eq!(got[1].url, logo.url);
    // And on disk: a restart (log replay, then sled) gives the same.
    let dir = s.stop().await;
    let s = common::Server::start_in(dir, |_| {}).await;
    assert_eq!(count(&s).await.path_count, 1);
    let got = common::resolve(&s, "prune", &["/posts/7.html", "/logo.png"]).await;
    // (The restarted server listens on another port: compare the URL's path.)
    assert_eq!((got[0].cache_id, common::path_of(&got[1].url)), (floor, common::path_of(&logo.url)));
    s.stop().await;
}
