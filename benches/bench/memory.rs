//! Memory per live path version: how much blotcdn's RSS grows while a
//! publish pipeline writes a million paths, next to Redis's `used_memory`
//! growth for the same data held the way the platform holds it today (a
//! hash per blog, path → version), in the same run.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};

use super::{invalidate, ratio, read_line, read_reply, redis, resp_command, BlotServer, Opts, Row};

fn path(k: usize) -> String {
    format!("/posts/{k:06}/images/photo-{k}.jpg")
}

/// Redis's `used_memory`, from `INFO memory`.
async fn used_memory(c: &mut BufReader<tokio::net::TcpStream>) -> f64 {
    c.get_mut().write_all(&resp_command(&["INFO", "memory"])).await.unwrap();
    let mut line = Vec::new();
    read_line(c, &mut line).await;
    let n: usize = std::str::from_utf8(&line[1..]).unwrap().parse().unwrap();
    let mut body = vec![0u8; n + 2];
    c.read_exact(&mut body).await.unwrap();
    let body = String::from_utf8(body).unwrap();
    let v = body.lines().find_map(|l| l.strip_prefix("used_memory:")).expect("used_memory in INFO memory");
    v.trim().parse().unwrap()
}

pub async fn bench_memory(o: &Opts, rows: &mut Vec<Row>) {
    let blogs = 10;
    let per_blog = if o.quick { 25_000 } else { 100_000 };
    let n = blogs * per_blog;
    println!("== Memory: {n} live path versions ({blogs} blogs), blotcdn RSS vs Redis used_memory");
    let dir = tempfile::tempdir_in(".").unwrap();
    let s = BlotServer::start(dir.path()).await;
    let ch = s.channel().await;
    // The runtime, the connection and the writer set up first.
    invalidate(&ch, "warm", (0..100).map(path).collect()).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = s.rss_mib();
    let mut ids = Vec::new();
    for b in 0..blogs {
        let blog = format!("mem{b}");
        let mut id = 0;
        for from in (0..per_blog).step_by(10_000) {
            id = invalidate(&ch, &blog, (from..(from + 10_000).min(per_blog)).map(path).collect()).await;
        }
        ids.push(id);
    }
    // The idle checkpoint comes 10 s after the last write, and takes a few
    // seconds (a million sled inserts): measured once it is done.
    let written = std::time::SystemTime::now();
    let marker = dir.path().join("db.checkpoint");
    let checkpointed = || std::fs::metadata(&marker).and_then(|m| m.modified()).is_ok_and(|t| t > written);
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while !checkpointed() {
        assert!(std::time::Instant::now() < deadline, "no checkpoint within 90 s of the last write");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let live = s.rss_mib();
    s.stop_cleanly();
    let s = BlotServer::start(dir.path()).await;
    let restarted = s.rss_mib();
    drop(s);

    let r = redis();
    let mut c = BufReader::new(tokio::net::TcpStream::connect(("127.0.0.1", r.port)).await.unwrap());
    let r0 = used_memory(&mut c).await;
    for (b, id) in ids.iter().enumerate() {
        let (key, version) = (format!("versions:mem{b}"), id.to_string());
        for from in (0..per_blog).step_by(1000) {
            let mut args = vec!["HSET".to_string(), key.clone()];
            for k in from..(from + 1000).min(per_blog) {
                args.push(path(k));
                args.push(version.clone());
            }
            let refs: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
            c.get_mut().write_all(&resp_command(&refs)).await.unwrap();
            read_reply(&mut c).await;
        }
    }
    let r1 = used_memory(&mut c).await;
    drop(r);

    let mib = 1024.0 * 1024.0;
    let (ours, after_restart, peer) =
        ((live - before) * mib / n as f64, (restarted - before) * mib / n as f64, (r1 - r0) / n as f64);
    println!(
        "  blotcdn RSS {before:.0} → {live:.0} MiB ({restarted:.0} MiB after a clean restart); Redis used_memory {:.0} → {:.0} MiB",
        r0 / mib,
        r1 / mib
    );
    rows.push(Row {
        bench: "Memory",
        what: format!("{n} live path versions: bytes per path (RSS growth; after a clean restart)"),
        ours: format!("{ours:.0} B ({after_restart:.0} B)"),
        peer: format!("Redis used_memory growth, a hash per blog: {peer:.0} B per field"),
        ratio: ratio(ours, peer),
        target: "≤ 1× Redis".into(),
    });
}
