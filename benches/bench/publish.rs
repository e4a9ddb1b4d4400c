//! Invalidate of one path, with 1 and with 64 callers, against a 4 KiB
//! write and fsync of the same disk, an RPC that does no I/O and a bare
//! loopback TCP round trip.

use super::*;

/// 4 KiB written and fsynced at the same place, again and again: back to
/// back (`gap` zero), or each after `gap` of busy waiting, as a publisher's
/// syncs come one round trip apart (this disk answers a sync that follows
/// another at once faster than one that comes after a pause).
fn fsync_peer(dir: &Path, dur: Duration, gap: Duration) -> (f64, Lat) {
    let path = dir.join("fsync-probe");
    let mut f = std::fs::File::create(&path).unwrap();
    let buf = vec![7u8; 4096];
    let mut lat = Lat::default();
    let start = Instant::now();
    while start.elapsed() < dur {
        let paused = Instant::now();
        while paused.elapsed() < gap {
            std::hint::spin_loop();
        }
        let t = Instant::now();
        use std::os::unix::fs::FileExt;
        f.write_at(&buf, 0).unwrap();
        f.sync_all().unwrap();
        lat.0.push(t.elapsed());
    }
    let rate = lat.0.len() as f64 / start.elapsed().as_secs_f64();
    let _ = f.flush();
    let _ = std::fs::remove_file(path);
    (rate, lat)
}

/// One 64-byte message to another thread and back over loopback TCP, again
/// and again: what any request and its answer pay here before a server
/// does anything (each side waits in the kernel until the other wakes it).
fn loopback_round_trip(dur: Duration) -> Lat {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let echo = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_nodelay(true).unwrap();
        let mut buf = [0u8; 64];
        while s.read_exact(&mut buf).is_ok() && s.write_all(&buf).is_ok() {}
    });
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.set_nodelay(true).unwrap();
    let mut buf = [7u8; 64];
    let mut lat = Lat::default();
    let start = Instant::now();
    while start.elapsed() < dur {
        let t = Instant::now();
        c.write_all(&buf).unwrap();
        c.read_exact(&mut buf).unwrap();
        lat.0.push(t.elapsed());
    }
    drop(c);
    echo.join().unwrap();
    lat
}

pub async fn bench_publish(o: &Opts, rows: &mut Vec<Row>) {
    println!("== Publish (Invalidate) vs a raw 4 KiB write + fsync");
    let dir = tempfile::tempdir_in(".").unwrap();
    let s = BlotServer::start(dir.path()).await;
    let (frate, mut flat) = fsync_peer(dir.path(), o.secs(2), Duration::ZERO);
    let f50 = flat.pct(0.5);
    // The floor any RPC pays here: a GetBlog (memory only) from one caller.
    let ch = s.channel().await;
    invalidate(&ch, "pub0", vec![]).await;
    let (_, mut rpc, _) = load(1, o.secs(2), move |_| {
        let ch = ch.clone();
        async move {
            let mut c = pb::resolver_client::ResolverClient::new(ch);
            c.get_blog(pb::GetBlogRequest { blog_id: "pub0".into() }).await.unwrap();
        }
    })
    .await;
    let rpc50 = rpc.pct(0.5);
    let tcp50 =
        tokio::task::spawn_blocking(move || loopback_round_trip(Duration::from_secs(1))).await.unwrap().pct(0.5);
    println!(
        "RPC floor (GetBlog, 1 caller): p50 {}; a loopback TCP round trip between two threads: p50 {}",
        ms(rpc50),
        ms(tcp50)
    );
    // The same disk at one publisher's pace: a sync every round trip.
    let (_, mut spaced) = fsync_peer(dir.path(), o.secs(2), rpc50);
    let spaced50 = spaced.pct(0.5);
    println!("4 KiB write + fsync, one every {}: p50 {}", ms(rpc50), ms(spaced50));
    for conc in [1usize, 64] {
        let mut chans = Vec::new();
        for _ in 0..CONNS.min(conc) {
            chans.push(s.channel().await);
        }
        let chans = Arc::new(chans);
        let (calls, mut lat, el) = load(conc, o.secs(3), move |w| {
            let ch = chans[w % chans.len()].clone();
            async move {
                let paths = vec![format!("/w{w}/style.css")];
                invalidate(&ch, &format!("pub{}", w % 8), paths).await;
            }
        })
        .await;
        let rate = calls as f64 / el.as_secs_f64();
        let (p50, p99) = (lat.pct(0.5), lat.pct(0.99));
        println!(
            "{conc:>2} publishers: {rate:>8.0}/s p50 {} p99 {} | fsync {frate:.0}/s p50 {} p99 {}",
            ms(p50),
            ms(p99),
            ms(f50),
            ms(flat.pct(0.99))
        );
        rows.push(Row {
            bench: "Publish",
            what: format!("{conc} publishers: invalidations/s (p50 / p99)"),
            ours: format!("{rate:.0} ({} / {})", ms(p50), ms(p99)),
            peer: format!("4 KiB write+fsync {frate:.0}/s ({} / {})", ms(f50), ms(flat.pct(0.99))),
            ratio: if conc == 1 {
                format!(
                    "p50 {:.1}× fsync ({:.1}× one every round trip, p50 {}); above the RPC floor ({}; a bare loopback round trip {}): {:.1}× fsync; floor + one fsync alone: {:.1}× fsync",
                    p50.as_secs_f64() / f50.as_secs_f64(),
                    p50.as_secs_f64() / spaced50.as_secs_f64(),
                    ms(spaced50),
                    ms(rpc50),
                    ms(tcp50),
                    p50.saturating_sub(rpc50).as_secs_f64() / f50.as_secs_f64(),
                    (rpc50 + f50).as_secs_f64() / f50.as_secs_f64()
                )
            } else {
                format!("p50 {:.1}× fsync", p50.as_secs_f64() / f50.as_secs_f64())
            },
            target: if conc == 1 { "p50 ≤ 2× fsync".into() } else { "≥ 20,000/s".into() },
        });
    }
}
