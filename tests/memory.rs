//! Memory stays bounded under a publish pipeline's normal work: the same
//! 10,000 paths invalidated again and again, through a size checkpoint.
//! Before the fix, sled's batch apply kept what each batch replaced and the
//! server grew by about 14 MB a batch, past a gigabyte in this test.

mod common;

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
