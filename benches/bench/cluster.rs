//! Cluster mode against the embedded default, same run: publish latency and
//! rate on a three-member etcd (one machine, so every member shares the one
//! disk and the two cores) next to sled; the lag from an acknowledgement on
//! node A to the write's answer on node B; and the resolve rate on B, whose
//! index is kept by the watch, next to sled's.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{common, invalidate, load, ms, populate_paths, resolve, resolve_rate, BlotServer, Lat, Opts, Row};

async fn publish(s: &BlotServer, conc: usize, dur: Duration) -> (f64, Lat) {
    let mut chans = Vec::new();
    for _ in 0..conc.min(4) {
        chans.push(s.channel().await);
    }
    let chans = Arc::new(chans);
    let (calls, lat, el) = load(conc, dur, move |w| {
        let ch = chans[w % chans.len()].clone();
        async move {
            invalidate(&ch, &format!("pub{}", w % 8), vec![format!("/w{w}/style.css")]).await;
        }
    })
    .await;
    (calls as f64 / el.as_secs_f64(), lat)
}

pub async fn bench_cluster(o: &Opts, rows: &mut Vec<Row>) {
    println!("== Cluster mode: etcd (3 members, this machine) vs sled");
    let etcd = common::etcd::EtcdCluster::start(3);
    let work = tempfile::tempdir_in(".").unwrap();
    let conf = work.path().join("etcd.toml");
    std::fs::write(
        &conf,
        format!("store = \"etcd\"\netcd_endpoints = {:?}\n", etcd.endpoints().split(',').collect::<Vec<_>>()),
    )
    .unwrap();
    let conf = conf.to_str().unwrap().to_owned();
    let sled = BlotServer::start(&work.path().join("sled")).await;
    let a = BlotServer::start_with(&work.path().join("a"), common::free_port(), &["--config", &conf]).await;
    let b = BlotServer::start_with(&work.path().join("b"), common::free_port(), &["--config", &conf]).await;

    for conc in [1usize, 64] {
        let (srate, mut slat) = publish(&sled, conc, o.secs(3)).await;
        let (erate, mut elat) = publish(&a, conc, o.secs(3)).await;
        let (s50, s99, e50, e99) = (slat.pct(0.5), slat.pct(0.99), elat.pct(0.5), elat.pct(0.99));
        println!(
            "{conc:>2} publishers: etcd {erate:>7.0}/s p50 {} p99 {} | sled {srate:>7.0}/s p50 {} p99 {}",
            ms(e50),
            ms(e99),
            ms(s50),
            ms(s99)
        );
        rows.push(Row {
            bench: "Cluster",
            what: format!("publish, {conc} publisher(s): invalidations/s (p50 / p99)"),
            ours: format!("etcd: {erate:.0} ({} / {})", ms(e50), ms(e99)),
            peer: format!("sled: {srate:.0} ({} / {})", ms(s50), ms(s99)),
            ratio: format!("{:.2}×", erate / srate),
            target: "-".into(),
        });
    }

    // Visibility: acknowledged on A, then B polled until it answers with it.
    let (cha, chb) = (a.channel().await, b.channel().await);
    let n = if o.quick { 100 } else { 500 };
    let mut lag = Lat::default();
    for i in 0..n {
        let path = vec![format!("/seen/{}.css", i % 50)];
        let id = invalidate(&cha, "seen", path.clone()).await;
        let acked = Instant::now();
        while resolve(&chb, "seen", path.clone()).await[0].cache_id != id {
            assert!(acked.elapsed() < Duration::from_secs(5), "B did not show A's write in 5 s");
        }
        lag.0.push(acked.elapsed());
    }
    let (l50, l99) = (lag.pct(0.5), lag.pct(0.99));
    println!("visibility A → B over {n} writes: p50 {} p99 {} (includes one ResolveBatch on B)", ms(l50), ms(l99));
    rows.push(Row {
        bench: "Cluster",
        what: "lag from an acknowledgement on A to the answer on B, p50 / p99".into(),
        ours: format!("{} / {}", ms(l50), ms(l99)),
        peer: "-".into(),
        ratio: "-".into(),
        target: "-".into(),
    });

    // Resolve: 10k paths written through A, read on B and on sled.
    populate_paths(&sled.channel().await, "scale0", 10_000).await;
    populate_paths(&cha, "scale0", 10_000).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while resolve(&chb, "scale0", vec!["/posts/9999/image.jpg".into()]).await[0].cache_id
        != resolve(&cha, "scale0", vec!["/posts/9999/image.jpg".into()]).await[0].cache_id
    {
        assert!(Instant::now() < deadline, "B did not catch up");
    }
    let srate = resolve_rate(&sled, "scale0", 10_000, o.secs(3)).await;
    let brate = resolve_rate(&b, "scale0", 10_000, o.secs(3)).await;
    println!("resolve (batch 64, 10k paths): node B {brate:.0} URLs/s | sled {srate:.0} URLs/s");
    rows.push(Row {
        bench: "Cluster",
        what: "resolve on node B, batch 64 over 10k paths: URLs/s".into(),
        ours: format!("{brate:.0}"),
        peer: format!("sled: {srate:.0}"),
        ratio: format!("{:.2}×", brate / srate),
        target: "unchanged (≈ 1×)".into(),
    });
}
