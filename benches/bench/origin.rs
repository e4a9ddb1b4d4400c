//! The origin against nginx (with 1 and with 2 workers) under wrk, on files
//! of 1 KiB, 50 KiB, 1 MiB and 4 MiB and a 50 KiB permanent asset, in alternating rounds;
//! then 1 KiB and 50 KiB again with each server pinned to one core and wrk to the other.

use super::*;

/// wrk's requests/s, latency p50/p99 and transfer rate.
/// One wrk run, or the combination of several: latencies in milliseconds.
#[derive(Clone, Copy)]
struct Wrk {
    rps: f64,
    p50: f64,
    p99: f64,
    mbps: f64,
}

impl Wrk {
    /// Mean rates; the latencies of the median run (by its p99).
    fn combine(runs: &[Wrk]) -> Wrk {
        let n = runs.len() as f64;
        let mut by_p99 = runs.to_vec();
        by_p99.sort_by(|a, b| a.p99.total_cmp(&b.p99));
        let mid = by_p99[by_p99.len() / 2];
        Wrk {
            rps: runs.iter().map(|r| r.rps).sum::<f64>() / n,
            mbps: runs.iter().map(|r| r.mbps).sum::<f64>() / n,
            ..mid
        }
    }
}

impl std::fmt::Display for Wrk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:>9.0} req/s p50 {} p99 {} {:>7.0} MB/s", self.rps, ms_f(self.p50), ms_f(self.p99), self.mbps)
    }
}

fn ms_f(v: f64) -> String {
    format!("{v:.3} ms")
}

/// wrk's latency, as it prints it ("448.00us", "3.79ms", "1.02s"), in ms.
fn parse_latency(s: &str) -> f64 {
    let at = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
    let n: f64 = s[..at].parse().unwrap_or(f64::NAN);
    n * match &s[at..] {
        "us" => 1e-3,
        "ms" => 1.0,
        "s" => 1e3,
        "m" => 60e3,
        _ => f64::NAN,
    }
}

fn wrk(url: &str, dur: Duration) -> Wrk {
    wrk_cmd(Command::new("wrk").arg("-t2"), url, dur)
}

/// `cmd`: wrk with its threads (`-t…`), perhaps pinned to a core.
fn wrk_cmd(cmd: &mut Command, url: &str, dur: Duration) -> Wrk {
    let out = cmd
        .args(["-c64", &format!("-d{}s", dur.as_secs().max(1)), "--latency", url])
        .output()
        .expect("wrk (run ./scripts/install-test-deps.sh)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let find = |prefix: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(prefix))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or("?")
            .to_owned()
    };
    let rps: f64 = find("Requests/sec:").parse().unwrap_or(0.0);
    let transfer = find("Transfer/sec:");
    let mbps = parse_size(&transfer) / 1e6;
    if text.contains("Non-2xx") {
        eprintln!("wrk saw errors for {url}:\n{text}");
    }
    Wrk { rps, p50: parse_latency(&find("50%")), p99: parse_latency(&find("99%")), mbps }
}

fn parse_size(s: &str) -> f64 {
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len()));
    let n: f64 = num.parse().unwrap_or(0.0);
    n * match unit {
        "KB" => 1024.0,
        "MB" => 1024.0 * 1024.0,
        "GB" => 1024.0 * 1024.0 * 1024.0,
        _ => 1.0,
    }
}

fn nginx(work: &Path, root: &Path, port: u16, workers: usize) -> Daemon {
    nginx_cmd(Command::new("nginx"), work, root, port, workers)
}

/// `cmd`: nginx, perhaps through `taskset`.
fn nginx_cmd(mut cmd: Command, work: &Path, root: &Path, port: u16, workers: usize) -> Daemon {
    std::fs::create_dir_all(work.join("tmp")).unwrap();
    let conf = work.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "user root;\nworker_processes {workers};\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log error;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n access_log off;\n client_body_temp_path {d}/tmp;\n proxy_temp_path {d}/tmp;\n\
             fastcgi_temp_path {d}/tmp;\n uwsgi_temp_path {d}/tmp;\n scgi_temp_path {d}/tmp;\n\
             include /etc/nginx/mime.types;\n sendfile on;\n tcp_nopush on;\n tcp_nodelay on;\n\
             open_file_cache max=10000 inactive=60s;\n open_file_cache_valid 60s;\n etag on;\n\
             server {{\n  listen 127.0.0.1:{port} reuseport;\n  root {r};\n\
             location / {{\n   rewrite ^/[^/]+/_assets/((..)(..)[0-9a-f]+)/.*$ /cas/$2/$3/$1 break;\n\
             rewrite ^/([^/]+)/[0-9]+/(.*)$ /blogs/$1/$2 break;\n\
             add_header Cache-Control \"public, max-age=31536000, immutable\";\n\
             add_header Surrogate-Key $1;\n  }}\n }}\n}}\n",
            d = work.display(),
            r = root.display()
        ),
    )
    .unwrap();
    let child = cmd
        .arg("-p")
        .arg(work)
        .arg("-c")
        .arg(&conf)
        .stderr(Stdio::null())
        .spawn()
        .expect("nginx (run ./scripts/install-test-deps.sh)");
    let d = Daemon { child, name: "nginx" };
    wait_port(port);
    d
}

pub async fn bench_origin(o: &Opts, rows: &mut Vec<Row>) {
    println!("== Origin vs nginx (wrk -t2 -c64)");
    let dir = tempfile::tempdir().unwrap();
    let blogs = dir.path().join("blogs/ob");
    std::fs::create_dir_all(&blogs).unwrap();
    // Up to 1 MiB, files are kept in memory; 4 MiB is sent from the file.
    let sizes = [("1KiB", 1024usize), ("50KiB", 50 * 1024), ("1MiB", 1 << 20), ("4MiB", 4 << 20)];
    for (name, n) in sizes {
        let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
        std::fs::write(blogs.join(format!("f{name}.bin")), data).unwrap();
    }
    // Files changed in the last 2 s are answered short-lived and not kept
    // (`recent_change_ms`): the rounds measure files that have settled.
    let written = Instant::now();
    let s = BlotServer::start(dir.path()).await;
    let ch = s.channel().await;
    invalidate(&ch, "ob", vec![]).await;
    let urls = resolve(&ch, "ob", sizes.iter().map(|(n, _)| format!("/f{n}.bin")).collect()).await;
    // The 50 KiB file again as a permanent asset (a thumbnail, an image):
    // nginx serves its blob from the CAS's folder.
    let asset = pb::publisher_client::PublisherClient::new(ch.clone())
        .import_file(pb::ImportFileRequest { blog_id: "ob".into(), path: "/f50KiB.bin".into() })
        .await
        .unwrap()
        .into_inner();
    let mut targets: Vec<(&str, &str)> =
        sizes.iter().zip(&urls).map(|((name, _), u)| (*name, &u.url[u.url.find("/ob/").unwrap()..])).collect();
    targets.push(("50KiB asset", &asset.url[asset.url.find("/ob/").unwrap()..]));
    tokio::time::sleep(Duration::from_millis(2100).saturating_sub(written.elapsed())).await;
    // nginx at its best here: one worker (wrk takes the other core) or two;
    // each size is compared with the better of the two.
    let (n1, n2) = (free_port(), free_port());
    let (w1, w2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let _ng1 = nginx(w1.path(), dir.path(), n1, 1);
    let _ng2 = nginx(w2.path(), dir.path(), n2, 2);
    for (name, path) in targets {
        // The three servers take turns, three rounds each, so that a change
        // in the machine's speed during the run (often ±15% here) weighs on
        // all of them alike (each taking each place in the order once):
        // rates are means over the rounds, latencies the median round's.
        let targets = [s.http.port(), n1, n2].map(|port| format!("http://127.0.0.1:{port}{path}"));
        let mut runs: [Vec<Wrk>; 3] = Default::default();
        for round in 0..3 {
            // Each goes first once: whoever follows another run shares the
            // machine with that run's connections closing.
            for i in (0..3).map(|i| (i + round) % 3) {
                runs[i].push(wrk(&targets[i], o.secs(9) / 3));
            }
        }
        let [ours, one, two] = runs.map(|r| Wrk::combine(&r));
        let (workers, peer) = if one.rps >= two.rps { (1, one) } else { (2, two) };
        println!("{name:>6}: blotcdn {} | nginx ×1 {one} | nginx ×2 {two}", ours);
        rows.push(Row {
            bench: "Origin",
            what: format!("{name}: req/s (p50 / p99), MB/s"),
            ours: format!("{:.0} ({} / {}), {:.0}", ours.rps, ms_f(ours.p50), ms_f(ours.p99), ours.mbps),
            peer: format!(
                "nginx, best of 1 and 2 workers (×{workers}): {:.0} ({} / {}), {:.0}",
                peer.rps,
                ms_f(peer.p50),
                ms_f(peer.p99),
                peer.mbps
            ),
            ratio: ratio(ours.rps, peer.rps),
            target: match name {
                "1MiB" => "≥ 0.9× nginx".into(),
                "50KiB asset" | "4MiB" => "-".into(),
                _ => "≥ 1× nginx".into(),
            },
        });
    }
    drop((_ng1, _ng2));
    // The data dir is the next server's.
    s.stop_cleanly();
    pinned(o, rows, dir.path(), &urls[..2]).await;
}

/// The same files with each server on a core of its own and wrk on the
/// other: one origin thread against one nginx worker on core 0, `wrk -t1`
/// on core 1. Above, wrk and the server share both cores, and wrk's own
/// waits to run (it is the busier side when the server is the faster)
/// reach its latencies; here they cannot, so the p99 is the server's.
async fn pinned(o: &Opts, rows: &mut Vec<Row>, data: &Path, urls: &[pb::ResolvedAsset]) {
    println!("== Origin vs nginx, each pinned to core 0, wrk -t1 -c64 on core 1");
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "0", env!("CARGO_BIN_EXE_blotcdn")]).env("BLOTCDN_HTTP_THREADS", "1");
    let s = BlotServer::start_cmd(cmd, data, free_port(), &[]).await;
    let port = free_port();
    let work = tempfile::tempdir().unwrap();
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "0", "nginx"]);
    let _ng = nginx_cmd(cmd, work.path(), data, port, 1);
    for (name, u) in ["1KiB", "50KiB"].into_iter().zip(urls) {
        let path = &u.url[u.url.find("/ob/").unwrap()..];
        let targets = [s.http.port(), port].map(|port| format!("http://127.0.0.1:{port}{path}"));
        let mut runs: [Vec<Wrk>; 2] = Default::default();
        // The first round is a warm-up (the server's first answers read
        // the file, and its start-up checkpoint shares core 0); not counted.
        for round in 0..4 {
            for i in (0..2).map(|i| (i + round) % 2) {
                let w = wrk_cmd(Command::new("taskset").args(["-c", "1", "wrk", "-t1"]), &targets[i], o.secs(9) / 3);
                if round > 0 {
                    runs[i].push(w);
                }
            }
        }
        let [ours, peer] = runs.map(|r| Wrk::combine(&r));
        println!("{name:>6}: blotcdn {ours} | nginx ×1 {peer}");
        rows.push(Row {
            bench: "Origin",
            what: format!("{name}, each server on core 0 (one thread, one worker), wrk on core 1: req/s (p50 / p99)"),
            ours: format!("{:.0} ({} / {})", ours.rps, ms_f(ours.p50), ms_f(ours.p99)),
            peer: format!("nginx, 1 worker: {:.0} ({} / {})", peer.rps, ms_f(peer.p50), ms_f(peer.p99)),
            ratio: ratio(ours.rps, peer.rps),
            target: "p99 ≤ nginx".into(),
        });
    }
    s.kill();
}
