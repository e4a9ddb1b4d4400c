//! The benchmarks of BENCHMARKS.md: each runs against the real server (the
//! release binary, as a child process on 127.0.0.1) and a peer measured in
//! the same run, and prints figures and ratios. Every load loop is bounded
//! in time. Run with `./scripts/bench.sh` (or `cargo bench --bench bench`).
//!
//! Arguments: names of benchmarks to run (default: all of resolve, origin,
//! publish, ingest, scale, memory, edge, purge, migrate, cluster, soak); `--quick` shortens every phase.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blotcdn::proto::{self as pb, put_asset_chunk::Chunk};
use bytes::Bytes;
use common::{free_port, Daemon};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tonic::transport::Channel;

// ---------------------------------------------------------------- helpers

// The test suite's helpers: ports, daemons stopped gracefully, Varnish.
#[path = "bench/cluster.rs"]
mod cluster;
#[path = "../tests/common/mod.rs"]
mod common;
#[path = "bench/memory.rs"]
mod memory;
#[path = "bench/migrate.rs"]
mod migrate;
#[path = "bench/purge.rs"]
mod purge;
#[path = "bench/soak.rs"]
mod soak;

struct Opts {
    quick: bool,
}

impl Opts {
    fn secs(&self, full: u64) -> Duration {
        if self.quick {
            Duration::from_millis(full * 1000 / 4)
        } else {
            Duration::from_secs(full)
        }
    }
}

fn wait_port(port: u16) {
    common::wait_for_port(([127, 0, 0, 1], port).into());
}

struct BlotServer {
    proc: Daemon,
    grpc: SocketAddr,
    http: SocketAddr,
    /// From spawn until the gRPC health check answers SERVING.
    startup: Duration,
}

impl BlotServer {
    async fn start(data: &Path) -> BlotServer {
        BlotServer::start_with(data, free_port(), &[]).await
    }

    /// With the HTTP origin on `h` and extra `serve` flags.
    async fn start_with(data: &Path, h: u16, extra: &[&str]) -> BlotServer {
        let g = free_port();
        let start = Instant::now();
        let child = Command::new(env!("CARGO_BIN_EXE_blotcdn"))
            .args(["serve", "--data-dir"])
            .arg(data)
            .args(extra)
            .args(["--grpc-addr", &format!("127.0.0.1:{g}"), "--http-addr", &format!("127.0.0.1:{h}")])
            .args(["--metrics-addr", "127.0.0.1:0"])
            .env("RUST_LOG", "error")
            .env("BLOTCDN_MAX_ASSET_BYTES", (4u64 << 30).to_string())
            .stdout(Stdio::null())
            .spawn()
            .expect("server binary");
        let grpc: SocketAddr = ([127, 0, 0, 1], g).into();
        wait_port(g);
        let ch = Channel::from_shared(format!("http://{grpc}")).unwrap().connect().await.unwrap();
        let mut health = tonic_health::pb::health_client::HealthClient::new(ch);
        health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap();
        let startup = start.elapsed();
        BlotServer { proc: Daemon { child, name: "blotcdn" }, grpc, http: ([127, 0, 0, 1], h).into(), startup }
    }

    async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.grpc)).unwrap().connect().await.unwrap()
    }

    /// SIGTERM, then waits (up to a minute) for the clean stop to finish:
    /// the last checkpoint and the index snapshot.
    fn stop_cleanly(mut self) {
        unsafe {
            libc::kill(self.proc.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.proc.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("blotcdn did not stop within a minute of SIGTERM");
    }

    /// SIGKILL: what a crash leaves (no last snapshot, the log not emptied).
    fn kill(mut self) {
        let _ = self.proc.child.kill();
        let _ = self.proc.child.wait();
    }

    fn rss_mib(&self) -> f64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.proc.child.id())).unwrap_or_default();
        let kb: f64 = s
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        kb / 1024.0
    }
}

/// CPU seconds a process has used (user + system), from /proc.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

#[derive(Default)]
struct Lat(Vec<Duration>);

impl Lat {
    fn pct(&mut self, p: f64) -> Duration {
        if self.0.is_empty() {
            return Duration::ZERO;
        }
        self.0.sort_unstable();
        let i = ((self.0.len() as f64 - 1.0) * p).round() as usize;
        self.0[i]
    }
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

/// A row of the final table.
struct Row {
    bench: &'static str,
    what: String,
    ours: String,
    peer: String,
    ratio: String,
    target: String,
}

fn ratio(ours: f64, peer: f64) -> String {
    if peer > 0.0 {
        format!("{:.2}×", ours / peer)
    } else {
        "-".into()
    }
}

fn print_table(rows: &[Row]) {
    println!();
    println!("| benchmark | figure | blotcdn | peer | ratio | target |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for r in rows {
        println!("| {} | {} | {} | {} | {} | {} |", r.bench, r.what, r.ours, r.peer, r.ratio, r.target);
    }
}

/// Small deterministic generator: the same trace every run.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Zipf over `n` ranks with exponent `s`, by inverse CDF.
struct Zipf(Vec<f64>);
impl Zipf {
    fn new(n: usize, s: f64) -> Zipf {
        let mut cdf = Vec::with_capacity(n);
        let mut acc = 0.0;
        for k in 1..=n {
            acc += 1.0 / (k as f64).powf(s);
            cdf.push(acc);
        }
        for c in &mut cdf {
            *c /= acc;
        }
        Zipf(cdf)
    }
    fn sample(&self, rng: &mut Rng) -> usize {
        let u = rng.unit();
        self.0.partition_point(|c| *c < u).min(self.0.len() - 1)
    }
}

async fn invalidate(ch: &Channel, blog: &str, paths: Vec<String>) -> u64 {
    let mut c = pb::publisher_client::PublisherClient::new(ch.clone());
    c.invalidate(pb::InvalidateRequest { blog_id: blog.into(), paths }).await.unwrap().into_inner().cache_id
}

async fn resolve(ch: &Channel, blog: &str, paths: Vec<String>) -> Vec<pb::ResolvedAsset> {
    let mut c = pb::resolver_client::ResolverClient::new(ch.clone()).max_decoding_message_size(64 << 20);
    c.resolve_batch(pb::ResolveBatchRequest { blog_id: blog.into(), paths }).await.unwrap().into_inner().assets
}

/// Fills a blog with `n` path versions, 10,000 per call.
async fn populate_paths(ch: &Channel, blog: &str, n: usize) {
    invalidate(ch, blog, vec![]).await;
    let mut i = 0;
    while i < n {
        let end = (i + 10_000).min(n);
        invalidate(ch, blog, (i..end).map(|k| format!("/posts/{k}/image.jpg")).collect()).await;
        i = end;
    }
}

/// Runs `conc` workers calling `f` until `dur` has passed; returns (calls, latencies, elapsed).
async fn load<F, Fut>(conc: usize, dur: Duration, f: F) -> (u64, Lat, Duration)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let f = Arc::new(f);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..conc {
        let f = f.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while start.elapsed() < dur {
                let t = Instant::now();
                f(w).await;
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut all = Lat::default();
    for t in tasks {
        all.0.extend(t.await.unwrap());
    }
    let elapsed = start.elapsed();
    (all.0.len() as u64, all, elapsed)
}

// ---------------------------------------------------------------- redis

struct Redis {
    proc: Daemon,
    port: u16,
    _dir: tempfile::TempDir,
}

fn redis() -> Redis {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir.path())
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server (run ./scripts/install-test-deps.sh)");
    let proc = Daemon { child, name: "redis-server" };
    wait_port(port);
    Redis { proc, port, _dir: dir }
}

fn resp_command(args: &[&str]) -> Vec<u8> {
    let mut v = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        v.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
    }
    v
}

/// Reads one RESP reply, returning how many bulk strings it held.
async fn read_reply(r: &mut BufReader<tokio::net::TcpStream>) -> usize {
    let mut line = Vec::new();
    read_line(r, &mut line).await;
    match line[0] {
        b'*' => {
            let n: usize = std::str::from_utf8(&line[1..]).unwrap().parse().unwrap();
            for _ in 0..n {
                read_bulk(r).await;
            }
            n
        }
        b'+' | b':' => 1,
        b'$' => {
            let n: i64 = std::str::from_utf8(&line[1..]).unwrap().parse().unwrap();
            if n >= 0 {
                let mut b = vec![0u8; n as usize + 2];
                r.read_exact(&mut b).await.unwrap();
            }
            1
        }
        _ => panic!("redis error: {}", String::from_utf8_lossy(&line)),
    }
}

async fn read_line(r: &mut BufReader<tokio::net::TcpStream>, line: &mut Vec<u8>) {
    line.clear();
    loop {
        let b = r.read_u8().await.unwrap();
        if b == b'\n' {
            line.pop();
            return;
        }
        line.push(b);
    }
}

async fn read_bulk(r: &mut BufReader<tokio::net::TcpStream>) {
    let mut line = Vec::new();
    read_line(r, &mut line).await;
    let n: i64 = std::str::from_utf8(&line[1..]).unwrap().parse().unwrap();
    if n >= 0 {
        let mut b = vec![0u8; n as usize + 2];
        r.read_exact(&mut b).await.unwrap();
    }
}

// ---------------------------------------------------------------- benchmarks

const BATCHES: [usize; 4] = [1, 16, 64, 256];
const CONC: usize = 32;
const CONNS: usize = 2;

async fn bench_resolve(o: &Opts, rows: &mut Vec<Row>) {
    println!("== ResolveBatch vs Redis HMGET ({CONC} concurrent callers over {CONNS} connections)");
    let dir = tempfile::tempdir().unwrap();
    let s = BlotServer::start(dir.path()).await;
    let ch = s.channel().await;
    const N: usize = 10_000;
    populate_paths(&ch, "bench", N).await;
    let chans: Vec<Channel> = {
        let mut v = Vec::new();
        for _ in 0..CONNS {
            v.push(s.channel().await);
        }
        v
    };
    let r = redis();
    {
        let mut c = BufReader::new(tokio::net::TcpStream::connect(("127.0.0.1", r.port)).await.unwrap());
        for chunk in (0..N).collect::<Vec<_>>().chunks(1000) {
            let mut args = vec!["HSET".to_string(), "manifest:bench".to_string()];
            for k in chunk {
                args.push(format!("/posts/{k}/image.jpg"));
                args.push(format!("http://127.0.0.1:8080/bench/1700000000000/posts/{k}/image.jpg"));
            }
            let refs: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
            c.get_mut().write_all(&resp_command(&refs)).await.unwrap();
            read_reply(&mut c).await;
        }
    }
    for batch in BATCHES {
        let dur = o.secs(3);
        let paths: Arc<Vec<Vec<String>>> = Arc::new(
            (0..CONC)
                .map(|w| (0..batch).map(|i| format!("/posts/{}/image.jpg", (w * 997 + i * 31) % N)).collect())
                .collect(),
        );
        let (chans2, p2) = (Arc::new(chans.clone()), paths.clone());
        let cpu0 = cpu_secs(s.proc.child.id());
        let (calls, mut lat, el) = load(CONC, dur, move |w| {
            let ch = chans2[w % CONNS].clone();
            let paths = p2[w].clone();
            async move {
                let mut c = pb::resolver_client::ResolverClient::new(ch);
                let r = c.resolve_batch(pb::ResolveBatchRequest { blog_id: "bench".into(), paths }).await.unwrap();
                assert_eq!(r.into_inner().assets.len(), batch);
            }
        })
        .await;
        let ours = calls as f64 * batch as f64 / el.as_secs_f64();
        // Server CPU per 1,000 URLs: what the server itself spends, whatever
        // the load generator (same process as the clients) costs.
        let our_cpu = (cpu_secs(s.proc.child.id()) - cpu0) * 1e6 / (calls as f64 * batch as f64 / 1000.0);
        let (p50, p99) = (lat.pct(0.5), lat.pct(0.99));

        // Redis: one connection per caller, one HMGET in flight on each. Like
        // the gRPC callers, each call builds its request from the paths.
        let conns = Arc::new(tokio::sync::Mutex::new(Vec::new()));
        for _ in 0..CONC {
            let c = tokio::net::TcpStream::connect(("127.0.0.1", r.port)).await.unwrap();
            c.set_nodelay(true).unwrap();
            conns.lock().await.push(Some(BufReader::new(c)));
        }
        let (conns2, p3) = (conns.clone(), paths.clone());
        let rcpu0 = cpu_secs(r.proc.child.id());
        let (rcalls, mut rlat, rel) = load(CONC, dur, move |w| {
            let conns = conns2.clone();
            let paths = p3[w].clone();
            async move {
                let mut args = vec!["HMGET", "manifest:bench"];
                args.extend(paths.iter().map(|s| s.as_str()));
                let cmd = resp_command(&args);
                let mut c = conns.lock().await[w].take().unwrap();
                c.get_mut().write_all(&cmd).await.unwrap();
                let n = read_reply(&mut c).await;
                assert_eq!(n, batch);
                conns.lock().await[w] = Some(c);
            }
        })
        .await;
        let peer = rcalls as f64 * batch as f64 / rel.as_secs_f64();
        let peer_cpu = (cpu_secs(r.proc.child.id()) - rcpu0) * 1e6 / (rcalls as f64 * batch as f64 / 1000.0);
        println!(
            "batch {batch:>3}: blotcdn {ours:>10.0} URLs/s p50 {} p99 {} cpu {our_cpu:.0} µs/1k | redis {peer:>10.0} fields/s p50 {} p99 {} cpu {peer_cpu:.0} µs/1k",
            ms(p50),
            ms(p99),
            ms(rlat.pct(0.5)),
            ms(rlat.pct(0.99))
        );
        rows.push(Row {
            bench: "ResolveBatch",
            what: format!("batch {batch}: URLs/s (p50 / p99); server CPU per 1k"),
            ours: format!("{ours:.0} ({} / {}); {our_cpu:.0} µs", ms(p50), ms(p99)),
            peer: format!("Redis HMGET {peer:.0} ({} / {}); {peer_cpu:.0} µs", ms(rlat.pct(0.5)), ms(rlat.pct(0.99))),
            ratio: ratio(ours, peer),
            target: if batch == 64 { "≥ 1× Redis".into() } else { "-".into() },
        });
    }
}

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
    let out = Command::new("wrk")
        .args(["-t2", "-c64", &format!("-d{}s", dur.as_secs().max(1)), "--latency", url])
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
             location / {{\n   rewrite ^/([^/]+)/[0-9]+/(.*)$ /$1/$2 break;\n\
             add_header Cache-Control \"public, max-age=31536000, immutable\";\n\
             add_header Surrogate-Key $1;\n  }}\n }}\n}}\n",
            d = work.display(),
            r = root.display()
        ),
    )
    .unwrap();
    let child = Command::new("nginx")
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

async fn bench_origin(o: &Opts, rows: &mut Vec<Row>) {
    println!("== Origin vs nginx (wrk -t2 -c64)");
    let dir = tempfile::tempdir().unwrap();
    let blogs = dir.path().join("blogs/ob");
    std::fs::create_dir_all(&blogs).unwrap();
    let sizes = [("1KiB", 1024usize), ("50KiB", 50 * 1024), ("1MiB", 1 << 20)];
    for (name, n) in sizes {
        let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
        std::fs::write(blogs.join(format!("f{name}.bin")), data).unwrap();
    }
    let s = BlotServer::start(dir.path()).await;
    let ch = s.channel().await;
    invalidate(&ch, "ob", vec![]).await;
    let urls = resolve(&ch, "ob", sizes.iter().map(|(n, _)| format!("/f{n}.bin")).collect()).await;
    // nginx at its best here: one worker (wrk takes the other core) or two;
    // each size is compared with the better of the two.
    let (n1, n2) = (free_port(), free_port());
    let (w1, w2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let _ng1 = nginx(w1.path(), &dir.path().join("blogs"), n1, 1);
    let _ng2 = nginx(w2.path(), &dir.path().join("blogs"), n2, 2);
    for ((name, _), u) in sizes.iter().zip(&urls) {
        let path = &u.url[u.url.find("/ob/").unwrap()..];
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
            target: if *name == "1MiB" { "≥ 0.9× nginx".into() } else { "≥ 1× nginx".into() },
        });
    }
}

fn fsync_peer(dir: &Path, dur: Duration) -> (f64, Lat) {
    let path = dir.join("fsync-probe");
    let mut f = std::fs::File::create(&path).unwrap();
    let buf = vec![7u8; 4096];
    let mut lat = Lat::default();
    let start = Instant::now();
    while start.elapsed() < dur {
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

async fn bench_publish(o: &Opts, rows: &mut Vec<Row>) {
    println!("== Publish (Invalidate) vs a raw 4 KiB write + fsync");
    let dir = tempfile::tempdir_in(".").unwrap();
    let s = BlotServer::start(dir.path()).await;
    let (frate, mut flat) = fsync_peer(dir.path(), o.secs(2));
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
    println!("RPC floor (GetBlog, 1 caller): p50 {}", ms(rpc50));
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
                    "p50 {:.1}× fsync; above the RPC floor ({}): {:.1}× fsync",
                    p50.as_secs_f64() / f50.as_secs_f64(),
                    ms(rpc50),
                    p50.saturating_sub(rpc50).as_secs_f64() / f50.as_secs_f64()
                )
            } else {
                format!("p50 {:.1}× fsync", p50.as_secs_f64() / f50.as_secs_f64())
            },
            target: if conc == 1 { "p50 ≤ 2× fsync".into() } else { "≥ 20,000/s".into() },
        });
    }
}

async fn bench_ingest(o: &Opts, rows: &mut Vec<Row>) {
    let total: usize = if o.quick { 256 << 20 } else { 1 << 30 };
    let label = if o.quick { "256 MiB" } else { "1 GiB" };
    println!("== Ingest of {label}: PutAsset and ImportFile vs BLAKE3 and write+fsync");
    let dir = tempfile::tempdir_in(".").unwrap();
    // Peers first: hashing in memory, and the disk's own sequential write + fsync.
    let mut chunk = vec![0u8; 1 << 20];
    let mut rng = Rng(0x9e3779b97f4a7c15 ^ std::process::id() as u64);
    for w in chunk.chunks_mut(8) {
        w.copy_from_slice(&rng.next().to_le_bytes()[..w.len()]);
    }
    let t = Instant::now();
    let mut h = blake3::Hasher::new();
    for _ in 0..(total >> 20) {
        h.update(&chunk);
    }
    std::hint::black_box(h.finalize());
    let hash_rate = total as f64 / t.elapsed().as_secs_f64() / 1e6;
    let t = Instant::now();
    {
        let mut f = std::fs::File::create(dir.path().join("seq")).unwrap();
        for _ in 0..(total >> 20) {
            f.write_all(&chunk).unwrap();
        }
        f.sync_all().unwrap();
    }
    let disk_rate = total as f64 / t.elapsed().as_secs_f64() / 1e6;
    let _ = std::fs::remove_file(dir.path().join("seq"));

    let s = BlotServer::start(dir.path()).await;
    let ch = s.channel().await;
    // PutAsset: 1 MiB chunks, distinct from any earlier run (the seed varies).
    let n = total >> 20;
    let base = Bytes::from(chunk.clone());
    let stream = async_stream_chunks(base, n);
    let t = Instant::now();
    let mut c = pb::publisher_client::PublisherClient::new(ch.clone());
    let a = c.put_asset(stream).await.unwrap().into_inner();
    let put_rate = total as f64 / t.elapsed().as_secs_f64() / 1e6;
    assert_eq!(a.size as usize, total);

    // ImportFile: the file is in the blog's folder already (written and fsynced first).
    let blog_dir = dir.path().join("blogs/ing");
    std::fs::create_dir_all(&blog_dir).unwrap();
    {
        let mut f = std::fs::File::create(blog_dir.join("big.bin")).unwrap();
        for i in 0..n {
            chunk[0] = i as u8;
            chunk[1] = 0xAB;
            f.write_all(&chunk).unwrap();
        }
        f.sync_all().unwrap();
    }
    let t = Instant::now();
    let a = c
        .import_file(pb::ImportFileRequest { blog_id: "ing".into(), path: "/big.bin".into() })
        .await
        .unwrap()
        .into_inner();
    let import_rate = total as f64 / t.elapsed().as_secs_f64() / 1e6;
    assert_eq!(a.size as usize, total);
    println!(
        "PutAsset {put_rate:.0} MB/s, ImportFile {import_rate:.0} MB/s | BLAKE3 {hash_rate:.0} MB/s, write+fsync {disk_rate:.0} MB/s"
    );
    let peer = format!("BLAKE3 {hash_rate:.0} MB/s; disk write+fsync {disk_rate:.0} MB/s");
    for (what, v) in [("PutAsset", put_rate), ("ImportFile", import_rate)] {
        rows.push(Row {
            bench: "Ingest",
            what: format!("{what} of {label}: MB/s"),
            ours: format!("{v:.0}"),
            peer: peer.clone(),
            ratio: format!("{} of disk", ratio(v, disk_rate)),
            target: "≥ 1,000 MB/s or ≥ 0.8× disk".into(),
        });
    }
}

fn async_stream_chunks(base: Bytes, n: usize) -> impl tokio_stream::Stream<Item = pb::PutAssetChunk> {
    let header = pb::PutAssetChunk {
        chunk: Some(Chunk::Header(pb::PutAssetHeader {
            blog_id: "ing".into(),
            filename: "big.bin".into(),
            content_type: String::new(),
            path: String::new(),
        })),
    };
    let data = (0..n).map(move |i| {
        let mut c = base.to_vec();
        c[0] = i as u8;
        c[1] = (i >> 8) as u8;
        pb::PutAssetChunk { chunk: Some(Chunk::Data(Bytes::from(c))) }
    });
    tokio_stream::iter(std::iter::once(header).chain(data))
}

async fn resolve_rate(s: &BlotServer, blog: &str, population: usize, dur: Duration) -> f64 {
    let mut chans = Vec::new();
    for _ in 0..CONNS {
        chans.push(s.channel().await);
    }
    let chans = Arc::new(chans);
    let blog = blog.to_owned();
    let (calls, _, el) = load(CONC, dur, move |w| {
        let ch = chans[w % CONNS].clone();
        let mut rng = Rng(0x1234_5678 + w as u64 * 7919 + Instant::now().elapsed().as_nanos() as u64);
        let paths: Vec<String> =
            (0..64).map(|_| format!("/posts/{}/image.jpg", rng.below(population as u64))).collect();
        let blog = blog.clone();
        async move {
            let mut c = pb::resolver_client::ResolverClient::new(ch);
            c.resolve_batch(pb::ResolveBatchRequest { blog_id: blog, paths }).await.unwrap();
        }
    })
    .await;
    calls as f64 * 64.0 / el.as_secs_f64()
}

async fn bench_scale(o: &Opts, rows: &mut Vec<Row>) {
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

// ---------------------------------------------------------------- edge effect

/// A keep-alive HTTP/1.1 GET over one connection: (status, X-Cache hit, body).
struct Http {
    stream: std::net::TcpStream,
    buf: Vec<u8>,
}

impl Http {
    fn connect(port: u16) -> Http {
        let stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.set_nodelay(true).unwrap();
        Http { stream, buf: Vec::new() }
    }

    fn get(&mut self, path: &str) -> (u16, bool, Vec<u8>) {
        self.request("GET", path, "")
    }

    /// `extra`: header lines, each ending in CRLF.
    fn request(&mut self, method: &str, path: &str, extra: &str) -> (u16, bool, Vec<u8>) {
        write!(self.stream, "{method} {path} HTTP/1.1\r\nHost: edge\r\n{extra}\r\n").unwrap();
        self.buf.clear();
        let mut tmp = [0u8; 16384];
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).to_ascii_lowercase();
                let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map(|v| v.trim().parse().unwrap())
                    .unwrap_or(0);
                let hit = head.lines().any(|l| l.starts_with("x-cache:") && l.contains("hit"));
                while self.buf.len() < end + 4 + len {
                    let n = self.stream.read(&mut tmp).unwrap();
                    assert!(n > 0, "connection closed");
                    self.buf.extend_from_slice(&tmp[..n]);
                }
                return (status, hit, self.buf[end + 4..end + 4 + len].to_vec());
            }
            let n = self.stream.read(&mut tmp).unwrap();
            assert!(n > 0, "connection closed");
            self.buf.extend_from_slice(&tmp[..n]);
        }
    }
}

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

async fn bench_edge(o: &Opts, rows: &mut Vec<Row>) {
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

// ---------------------------------------------------------------- main

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--bench")).collect();
    let o = Opts { quick: args.iter().any(|a| a == "--quick") };
    let names: Vec<&str> = args.iter().filter(|a| !a.starts_with('-')).map(|s| s.as_str()).collect();
    let all =
        ["resolve", "origin", "publish", "ingest", "scale", "memory", "edge", "purge", "migrate", "cluster", "soak"];
    let chosen: Vec<&str> = if names.is_empty() { all.to_vec() } else { names };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut rows = Vec::new();
    rt.block_on(async {
        for name in &chosen {
            match *name {
                "resolve" => bench_resolve(&o, &mut rows).await,
                "origin" => bench_origin(&o, &mut rows).await,
                "publish" => bench_publish(&o, &mut rows).await,
                "ingest" => bench_ingest(&o, &mut rows).await,
                "scale" => bench_scale(&o, &mut rows).await,
                "memory" => memory::bench_memory(&o, &mut rows).await,
                "edge" => bench_edge(&o, &mut rows).await,
                "purge" => purge::bench_purge(&o, &mut rows).await,
                "migrate" => migrate::bench_migrate(&o, &mut rows).await,
                "cluster" => cluster::bench_cluster(&o, &mut rows).await,
                "soak" => soak::bench_soak(&o, &mut rows).await,
                other => eprintln!("unknown benchmark {other:?}; known: {all:?}"),
            }
        }
    });
    print_table(&rows);
    let _ = std::io::stdout().flush();
}
