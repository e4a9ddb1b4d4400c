//! The soak: a publish pipeline's normal work for minutes — 10,000-path
//! invalidations, again and again, over a fixed set of blogs — with the
//! server's RSS printed over time next to the size of its index. Memory must
//! follow the index (which stops growing once every path is known), not the
//! number of writes.

use std::time::{Duration, Instant};

use super::{invalidate, Opts, Row};

pub async fn bench_soak(o: &Opts, rows: &mut Vec<super::Row>) {
    let dir = tempfile::tempdir_in(".").unwrap();
    let s = super::BlotServer::start(dir.path()).await;
    let dur = o.secs(180);
    let publishers = 4;
    let blogs = 8;
    let paths_per_blog = 40_000;
    let start = Instant::now();
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
            }
        }));
    }
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
    let total = written.load(std::sync::atomic::Ordering::Relaxed);
    rows.push(Row {
        bench: "soak",
        what: format!("RSS over {} s, {total} path writes", dur.as_secs()),
        ours: format!("{first:.0} → {last:.0} MiB (max {max:.0})"),
        peer: format!("index: {index} paths"),
        ratio: "-".into(),
        target: "flat once the index is full".into(),
    });
}
