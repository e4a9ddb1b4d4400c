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
#[path = "../tests/it/common/mod.rs"]
mod common;
#[path = "bench/edge.rs"]
mod edge;
#[path = "bench/ingest.rs"]
mod ingest;
#[path = "bench/memory.rs"]
mod memory;
#[path = "bench/migrate.rs"]
mod migrate;
#[path = "bench/origin.rs"]
mod origin;
#[path = "bench/publish.rs"]
mod publish;
#[path = "bench/purge.rs"]
mod purge;
#[path = "bench/resolve.rs"]
mod resolve;
#[path = "bench/scale.rs"]
mod scale;
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
        BlotServer::start_cmd(Command::new(env!("CARGO_BIN_EXE_blotcdn")), data, h, extra).await
    }

    /// `cmd` runs the server binary, perhaps through a wrapper (`taskset`)
    /// or with settings of its own in its environment.
    async fn start_cmd(mut cmd: Command, data: &Path, h: u16, extra: &[&str]) -> BlotServer {
        let g = free_port();
        let start = Instant::now();
        let child = cmd
            .args(["serve", "--data-dir"])
            .arg(data)
            .args(extra)
            .args(["--grpc-addr", &format!("127.0.0.1:{g}"), "--http-addr", &format!("127.0.0.1:{h}")])
            .args(["--metrics-addr", "127.0.0.1:0"])
            .env("RUST_LOG", "error")
            .env("BLOTCDN_MAX_ASSET_BYTES", (4u64 << 30).to_string())
            // The benches' tonic channels live for whole phases, some with
            // many calls at once: a call racing a connection's GOAWAY at
            // its age (hyper issue 2500) would fail the phase.
            .env("BLOTCDN_GRPC_MAX_CONNECTION_AGE_SECS", "0")
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

// ---------------------------------------------------------------- HTTP/1.1

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
                "resolve" => resolve::bench_resolve(&o, &mut rows).await,
                "origin" => origin::bench_origin(&o, &mut rows).await,
                "publish" => publish::bench_publish(&o, &mut rows).await,
                "ingest" => ingest::bench_ingest(&o, &mut rows).await,
                "scale" => scale::bench_scale(&o, &mut rows).await,
                "memory" => memory::bench_memory(&o, &mut rows).await,
                "edge" => edge::bench_edge(&o, &mut rows).await,
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
