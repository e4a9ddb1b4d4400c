//! The soak: a publish pipeline's normal work for minutes — 10,000-path
//! invalidations, again and again, over a fixed set of blogs — with the
//! server's RSS printed over time next to the size of its index. Memory must
//! follow the index (which stops growing once every path is known), not the
//! number of writes. Beside them, a publisher of single paths (one call
//! every 10 ms) measures what a small publish waits for while the big ones
//! and the checkpoints they bring run: in the first half each big publisher
//! pauses 250 ms after each call (a load sled's checkpoints keep up with),
//! in the second they go flat out (more than sled can take in: writes wait).

use std::time::{Duration, Instant};

use super::{invalidate, ms, Lat, Opts, Row};

pub async fn bench_soak(o: &Opts, rows: &mut Vec<super::Row>) {
    let dir = tempfile::tempdir_in(".").unwrap();
    let s = super::BlotServer::start(dir.path()).await;
    let dur = o.secs(180);
    let publishers = 4;
    let blogs = 8;
    let paths_per_blog = 40_000;
    // The small publisher: alone first (its figure without the soak), then
    // beside the soak until it ends.
    let small = s.channel().await;
    let mut alone = Lat::default();
    for i in 0..200 {
        let t = Instant::now();
        invalidate(&small, "soak-small", vec![format!("/alone/{i}.css")]).await;
        alone.0.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let start = Instant::now();
    let half = dur / 2;
    let written = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..publishers {
        let ch = s.channel().await;
        let written = written.clone();
        tasks.push(tokio::spawn(async move {
            let mut round = 0usize;
            while start.elapsed() < dur {
                let blog = format!("soak{}", (w + round) % blogs);
                // Each call rewrites one quarter of the blog's paths.
                let from = (round % 4) * (paths_per_blog / 4);
                let paths = (from..from + 10_000).map(|k| format!("/posts/{k:06}/images/photo-{k}.jpg")).collect();
                invalidate(&ch, &blog, paths).await;
                written.fetch_add(10_000, std::sync::atomic::Ordering::Relaxed);
                round += 1;
                if start.elapsed() < half {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }));
    }
    let beside = tokio::spawn(async move {
        let (mut paced, mut flat) = (Lat::default(), Lat::default());
        let mut i = 0u64;
        while start.elapsed() < dur {
            let t = Instant::now();
            invalidate(&small, "soak-small", vec![format!("/beside/{}.css", i % 1000)]).await;
            let lat = if t.duration_since(start) < half { &mut paced } else { &mut flat };
            lat.0.push(t.elapsed());
            i += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        [paced, flat]
    });
    let ch = s.channel().await;
    let mut r = blotcdn::proto::resolver_client::ResolverClient::new(ch);
    println!("soak: {publishers} publishers, 10,000-path invalidations over {blogs} blogs, {} s", dur.as_secs());
    println!("{:>7} {:>14} {:>12} {:>9}", "seconds", "paths written", "index paths", "RSS MiB");
    let (mut first, mut max) = (0.0f64, 0.0f64);
    let tick = Duration::from_secs(if o.quick { 3 } else { 10 });
    let (last, index) = loop {
        tokio::time::sleep(tick).await;
        let mut index = 0;
        for b in 0..blogs {
            if let Ok(info) = r.get_blog(blotcdn::proto::GetBlogRequest { blog_id: format!("soak{b}") }).await {
                index += info.into_inner().path_count;
            }
        }
        let rss = s.rss_mib();
        if first == 0.0 {
            first = rss;
        }
        max = max.max(rss);
        println!(
            "{:>7.0} {:>14} {:>12} {:>9.0}",
            start.elapsed().as_secs_f64(),
            written.load(std::sync::atomic::Ordering::Relaxed),
            index,
            rss
        );
        if start.elapsed() >= dur {
            break (rss, index);
        }
    };
    for t in tasks {
        t.await.unwrap();
    }
    let beside = beside.await.unwrap();
    let a50 = alone.pct(0.5);
    let total = written.load(std::sync::atomic::Ordering::Relaxed);
    rows.push(Row {
        bench: "soak",
        what: format!("RSS over {} s, {total} path writes", dur.as_secs()),
        ours: format!("{first:.0} → {last:.0} MiB (max {max:.0})"),
        peer: format!("index: {index} paths"),
        ratio: "-".into(),
        target: "flat once the index is full".into(),
    });
    for (mut lat, load) in beside.into_iter().zip(["paced (250 ms pauses)", "flat out"]) {
        let (p50, p99, max) = (lat.pct(0.5), lat.pct(0.99), lat.pct(1.0));
        println!(
            "a 1-path publish every 10 ms beside the soak, {load}: p50 {} p99 {} max {} ({} calls); alone: p50 {}",
            ms(p50),
            ms(p99),
            ms(max),
            lat.0.len(),
            ms(a50)
        );
        rows.push(Row {
            bench: "soak",
            what: format!("a 1-path publish every 10 ms beside it, {load}: p50 / p99 / max"),
            ours: format!("{} / {} / {}", ms(p50), ms(p99), ms(max)),
            peer: format!("the same publish alone: p50 {}", ms(a50)),
            ratio: format!("p99 {:.0}× alone", p99.as_secs_f64() / a50.as_secs_f64()),
            target: "-".into(),
        });
    }
}
