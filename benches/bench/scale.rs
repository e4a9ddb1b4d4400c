//! 10k and 1M path versions (plus 100k permanent assets): start-up after a
//! crash and after a clean stop, the resolve rate, and RSS.

use super::*;

pub async fn bench_scale(o: &Opts, rows: &mut Vec<Row>) {
    let big = if o.quick { 200_000 } else { 1_000_000 };
    let assets = if o.quick { 20_000 } else { 100_000 };
    println!("== Scale: 10k vs {big} path versions (+{assets} permanent assets)");
    let mut servers = Vec::new();
    for (n, a) in [(10_000usize, 0usize), (big, assets)] {
        let dir = tempfile::tempdir_in(".").unwrap();
        {
            let s = BlotServer::start(dir.path()).await;
            let ch = s.channel().await;
            let t = Instant::now();
            // Spread over blogs of 100k paths each, as a platform would have.
            let per_blog = 100_000.min(n);
            let mut tasks = Vec::new();
            for b in 0..n.div_ceil(per_blog) {
                let ch = ch.clone();
                let count = per_blog.min(n - b * per_blog);
                tasks.push(tokio::spawn(async move { populate_paths(&ch, &format!("scale{b}"), count).await }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            let done = AtomicU64::new(0);
            let done = Arc::new(done);
            let mut tasks = Vec::new();
            for w in 0..32 {
                let (ch, done) = (ch.clone(), done.clone());
                tasks.push(tokio::spawn(async move {
                    let mut c = pb::publisher_client::PublisherClient::new(ch);
                    let mut i = w;
                    while i < a {
                        let chunks = vec![
                            pb::PutAssetChunk {
                                chunk: Some(Chunk::Header(pb::PutAssetHeader {
                                    blog_id: format!("assets{}", i % 100),
                                    filename: format!("t{i}.png"),
                                    content_type: String::new(),
                                    path: format!("/thumbs/{i}.png"),
                                })),
                            },
                            pb::PutAssetChunk { chunk: Some(Chunk::Data(Bytes::from(format!("thumbnail {i}")))) },
                        ];
                        c.put_asset(tokio_stream::iter(chunks)).await.unwrap();
                        done.fetch_add(1, Ordering::Relaxed);
                        i += 32;
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            println!("  populated {n} paths and {a} assets in {:.1} s", t.elapsed().as_secs_f64());
            // A crash right after the writes: the start reads the last
            // snapshot a checkpoint wrote, its tail and the log.
            s.kill();
        }
        let s = BlotServer::start(dir.path()).await;
        let crashed = s.startup;
        // Then a restart after a clean stop: the stop wrote a snapshot of
        // everything, and nothing is replayed.
        s.stop_cleanly();
        let s = BlotServer::start(dir.path()).await;
        println!("  {n:>8} paths: start-up {} (after a crash: {})", ms(s.startup), ms(crashed));
        servers.push((n, a, crashed, s, dir));
    }
    // Both servers stay up and are measured in turns, so that a change in
    // the machine's speed during the run (often ±15% here) weighs on both
    // sides alike: the rate is the mean over the rounds.
    const ROUNDS: u32 = 3;
    let mut rates = vec![0.0; servers.len()];
    for _ in 0..ROUNDS {
        for ((n, _, _, s, _), rate) in servers.iter().zip(rates.iter_mut()) {
            *rate += resolve_rate(s, "scale0", 100_000.min(*n), o.secs(6) / ROUNDS).await / f64::from(ROUNDS);
        }
    }
    let mut results = Vec::new();
    for ((n, a, crashed, s, dir), rate) in servers.into_iter().zip(rates) {
        let rss = s.rss_mib();
        println!("  {n:>8} paths: RSS {rss:.0} MiB, resolve {rate:.0} URLs/s (batch 64)");
        results.push((n, a, s.startup, crashed, rss, rate));
        drop(s);
        drop(dir);
    }
    let (small, large) = (&results[0], &results[1]);
    for (n, a, startup, crashed, rss, rate) in [small, large] {
        rows.push(Row {
            bench: "Scale",
            what: format!("{n} paths, {a} assets: URLs/s, RSS, start-up (after a crash)"),
            ours: format!("{rate:.0}, {rss:.0} MiB, {} ({})", ms(*startup), ms(*crashed)),
            peer: if *n == small.0 { "(the baseline)".into() } else { format!("{:.0} at 10k", small.5) },
            ratio: if *n == small.0 { "-".into() } else { ratio(*rate, small.5) },
            target: if *n == small.0 {
                "start-up ≤ 0.5 s".into()
            } else {
                "≥ 0.9× rate at 10k; start-up ≤ 0.5 s".into()
            },
        });
    }
}
