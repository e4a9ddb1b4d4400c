//! Purge latency: from the acknowledgement of a `DeleteBlog` to the moment a
//! live Varnish stops answering the blog's cached object from its cache
//! (seen by a reader polling it), next to the floor: the same deletion on a
//! server without purge targets, with the caller sending the `BAN` itself
//! the moment its deletion is acknowledged.

use std::time::{Duration, Instant};

use super::{common, invalidate, ms, resolve, BlotServer, Http, Lat, Opts, Row};
use blotcdn::proto as pb;

/// Deletes each blog, then polls the edge until the object is no longer a
/// hit: the time from the acknowledgement to that answer.
async fn run(targets: bool, blogs: usize) -> Lat {
    let dir = tempfile::tempdir_in(".").unwrap();
    for b in 0..blogs {
        let d = dir.path().join(format!("blogs/p{b}"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("a.css"), format!("p{b}")).unwrap();
    }
    let h = common::free_port();
    let vwork = tempfile::tempdir().unwrap();
    let (_v, vport) = common::varnish(vwork.path(), h, "malloc,64m");
    let conf = dir.path().join("purge.toml");
    // No rate limit worth the name: the benchmark measures the path, not the throttle.
    std::fs::write(
        &conf,
        format!("[[purge]]\nkind = \"varnish\"\nurl = \"http://127.0.0.1:{vport}/\"\nrate_per_sec = 100000\n"),
    )
    .unwrap();
    let conf = conf.to_str().unwrap().to_owned();
    let extra: Vec<&str> = if targets { vec!["--config", &conf] } else { vec![] };
    let s = BlotServer::start_with(dir.path(), h, &extra).await;
    let ch = s.channel().await;
    let mut urls = Vec::with_capacity(blogs);
    let mut edge = Http::connect(vport);
    for b in 0..blogs {
        invalidate(&ch, &format!("p{b}"), vec![]).await;
        let r = resolve(&ch, &format!("p{b}"), vec!["/a.css".into()]).await;
        let url = r[0].url[r[0].url.find("/p").unwrap()..].to_owned();
        edge.get(&url);
        assert!(edge.get(&url).1, "{url} cached at the edge");
        urls.push(url);
    }
    let mut ban = Http::connect(vport);
    let mut p = pb::publisher_client::PublisherClient::new(ch.clone());
    let mut lat = Lat::default();
    for (b, url) in urls.iter().enumerate() {
        p.delete_blog(pb::DeleteBlogRequest { blog_id: format!("p{b}") }).await.unwrap();
        let acked = Instant::now();
        if !targets {
            let (status, _, _) = ban.request("BAN", "/", &format!("Surrogate-Key: p{b}\r\n"));
            assert_eq!(status, 200);
        }
        let deadline = acked + Duration::from_secs(5);
        loop {
            let (_, hit, _) = edge.get(url);
            if !hit {
                break;
            }
            assert!(Instant::now() < deadline, "{url} still cached 5 s after its blog was deleted");
        }
        lat.0.push(acked.elapsed());
    }
    lat
}

pub async fn bench_purge(o: &Opts, rows: &mut Vec<Row>) {
    let blogs = if o.quick { 100 } else { 500 };
    println!("== Purge: DeleteBlog acknowledged → gone from a live Varnish, {blogs} blogs one after another");
    let mut ours = run(true, blogs).await;
    let mut floor = run(false, blogs).await;
    for (name, l) in [("blotcdn's outbox", &mut ours), ("caller's own BAN (floor)", &mut floor)] {
        println!("{name:>28}: p50 {}  p99 {}  max {}", ms(l.pct(0.5)), ms(l.pct(0.99)), ms(l.pct(1.0)));
    }
    rows.push(Row {
        bench: "Purge",
        what: "DeleteBlog ack → object gone from a live Varnish, p50 / p99".into(),
        ours: format!("{} / {}", ms(ours.pct(0.5)), ms(ours.pct(0.99))),
        peer: format!("caller's own BAN: {} / {}", ms(floor.pct(0.5)), ms(floor.pct(0.99))),
        ratio: super::ratio(ours.pct(0.99).as_secs_f64(), floor.pct(0.99).as_secs_f64()),
        target: "p99 < 100 ms".into(),
    });
}
