//! Varnish in front of the origin on a Zipf trace with publishes: the share
//! the edge answers and the stale answers, against the legacy unversioned URLs.

use super::*;

struct EdgeResult {
    requests: u64,
    hits: u64,
    stale: u64,
    cold_hits: u64,
    cold_requests: u64,
}

async fn edge_run(versioned: bool, requests: usize, o: &Opts) -> EdgeResult {
    const BLOGS: usize = 1000;
    const FILES: usize = 50;
    let dir = tempfile::tempdir_in(".").unwrap();
    for b in 0..BLOGS {
        let d = dir.path().join(format!("blogs/e{b}"));
        std::fs::create_dir_all(&d).unwrap();
        for f in 0..FILES {
            std::fs::write(d.join(format!("f{f}.css")), format!("e{b} f{f} v0")).unwrap();
        }
    }
    let s = BlotServer::start(dir.path()).await;
    let ch = s.channel().await;
    let mut urls = vec![String::new(); BLOGS * FILES];
    for b in 0..BLOGS {
        invalidate(&ch, &format!("e{b}"), vec![]).await;
        let r = resolve(&ch, &format!("e{b}"), (0..FILES).map(|f| format!("/f{f}.css")).collect()).await;
        for (f, a) in r.into_iter().enumerate() {
            urls[b * FILES + f] =
                if versioned { a.url[a.url.find("/e").unwrap()..].to_owned() } else { format!("/e{b}/f{f}.css") };
        }
    }
    let vwork = tempfile::tempdir().unwrap();
    let (_v, vport) = common::varnish(vwork.path(), s.http.port(), "malloc,256m");
    let mut http = Http::connect(vport);
    let zipf = Zipf::new(BLOGS * FILES, 1.0);
    let mut rng = Rng(42);
    let mut version = vec![0u64; BLOGS * FILES];
    let mut res = EdgeResult { requests: 0, hits: 0, stale: 0, cold_hits: 0, cold_requests: 0 };
    // A running edge has seen the catalogue: one pass over every URL first,
    // counted apart.
    for u in &urls {
        let (status, hit, _) = http.get(u);
        assert_eq!(status, 200, "{u}");
        res.cold_requests += 1;
        res.cold_hits += hit as u64;
    }
    let deadline = Instant::now() + o.secs(120);
    for i in 0..requests {
        if Instant::now() > deadline {
            break;
        }
        if i % 1000 == 999 {
            // A publish: one file changes, the pipeline invalidates it, and
            // the renderer's next resolve gives the new URL.
            let k = zipf.sample(&mut rng);
            let (b, f) = (k / FILES, k % FILES);
            version[k] += 1;
            std::fs::write(dir.path().join(format!("blogs/e{b}/f{f}.css")), format!("e{b} f{f} v{}", version[k]))
                .unwrap();
            invalidate(&ch, &format!("e{b}"), vec![format!("/f{f}.css")]).await;
            if versioned {
                let r = resolve(&ch, &format!("e{b}"), vec![format!("/f{f}.css")]).await;
                urls[k] = r[0].url[r[0].url.find("/e").unwrap()..].to_owned();
            }
        }
        let k = zipf.sample(&mut rng);
        let (status, hit, body) = http.get(&urls[k]);
        assert_eq!(status, 200, "{}", urls[k]);
        let body = String::from_utf8_lossy(&body);
        let got: u64 = body.rsplit('v').next().unwrap().parse().unwrap();
        res.requests += 1;
        res.hits += hit as u64;
        res.stale += (got < version[k]) as u64;
    }
    res
}

pub async fn bench_edge(o: &Opts, rows: &mut Vec<Row>) {
    let requests = if o.quick { 50_000 } else { 250_000 };
    println!(
        "== Edge effect: Varnish, Zipf(1.0) over 1,000 blogs × 50 files, {requests} requests, a publish per 1,000"
    );
    let ours = edge_run(true, requests, o).await;
    let legacy = edge_run(false, requests, o).await;
    let share = |r: &EdgeResult| 100.0 * r.hits as f64 / r.requests.max(1) as f64;
    for (name, r) in [("versioned (blotcdn)", &ours), ("legacy unversioned, max-age=60", &legacy)] {
        println!(
            "{name:>32}: edge answered {:.2}% of {} (first pass over the catalogue: {:.2}% of {}), stale {}",
            share(r),
            r.requests,
            100.0 * r.cold_hits as f64 / r.cold_requests.max(1) as f64,
            r.cold_requests,
            r.stale
        );
    }
    rows.push(Row {
        bench: "Edge effect",
        what: "share answered by the edge after one pass over the catalogue; stale answers".into(),
        ours: format!("{:.2}%, {} stale", share(&ours), ours.stale),
        peer: format!("legacy 60 s: {:.2}%, {} stale", share(&legacy), legacy.stale),
        ratio: ratio(share(&ours), share(&legacy)),
        target: "≥ 99%, 0 stale".into(),
    });
}
