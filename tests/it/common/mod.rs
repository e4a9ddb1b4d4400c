//! Shared by the integration tests: the real server, in process on
//! ephemeral ports with a temporary data dir, or as a child process; the
//! generated gRPC clients; a plain HTTP client over TCP.
#![allow(dead_code)]

pub mod etcd;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blotcdn::config::{Config, Partial};
use blotcdn::proto::publisher_client::PublisherClient;
use blotcdn::proto::resolver_client::ResolverClient;
use tonic::transport::Channel;

pub struct Server {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub dir: tempfile::TempDir,
    pub config: Config,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Server {
    pub async fn start() -> Server {
        Self::start_with(|_| {}).await
    }

    /// Starts with the defaults of a temporary data dir, changed by `tweak`.
    pub async fn start_with(tweak: impl FnOnce(&mut Partial)) -> Server {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, tweak).await
    }

    pub async fn start_in(dir: tempfile::TempDir, tweak: impl FnOnce(&mut Partial)) -> Server {
        blotcdn::telemetry::init_for_tests();
        let mut p = Partial {
            data_dir: Some(dir.path().to_owned()),
            grpc_addr: Some("127.0.0.1:0".into()),
            http_addr: Some("127.0.0.1:0".into()),
            metrics_addr: Some("127.0.0.1:0".into()),
            // Tests write a file and ask for it at once: no window in which
            // a just-changed file is answered short-lived and not kept (the
            // window has its own test, which sets it).
            recent_change_ms: Some(0),
            ..Default::default()
        };
        tweak(&mut p);
        let config = Config::from_partial(p).unwrap();
        let app = blotcdn::app::App::build(config.clone()).await.unwrap();
        let (grpc, http) = (app.grpc_addr(), app.http_addr());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            app.run_until_stopped(async move {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        Server { grpc, http, dir, config, stop: Some(tx), task: Some(task) }
    }

    pub async fn resolver(&self) -> ResolverClient<Channel> {
        ResolverClient::connect(format!("http://{}", self.grpc)).await.unwrap()
    }

    pub async fn publisher(&self) -> PublisherClient<Channel> {
        PublisherClient::connect(format!("http://{}", self.grpc)).await.unwrap()
    }

    pub fn blogs_dir(&self) -> PathBuf {
        self.config.blogs_dir.clone()
    }

    /// Writes a file into a blog's folder.
    pub fn write(&self, blog: &str, path: &str, bytes: &[u8]) -> PathBuf {
        let p = self.config.blogs_dir.join(blog).join(path.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, bytes).unwrap();
        p
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.http, path)
    }

    /// Stops gracefully and waits; the data dir stays.
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self.dir, dir)
    }
}

/// A raw HTTP/1.1 exchange: exactly these request bytes, the whole answer.
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

pub fn raw_request(addr: SocketAddr, request: &[u8]) -> RawResponse {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    parse_response(&buf)
}

pub fn parse_response(buf: &[u8]) -> RawResponse {
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no complete response head in {:?}", String::from_utf8_lossy(buf)));
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    RawResponse { status, headers, body: buf[end + 4..].to_vec() }
}

/// GET `target` (sent as is, not normalised) with extra header lines.
pub fn get(addr: SocketAddr, target: &str, extra: &[(&str, &str)]) -> RawResponse {
    request(addr, "GET", target, extra)
}

pub fn request(addr: SocketAddr, method: &str, target: &str, extra: &[(&str, &str)]) -> RawResponse {
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: cdn.test\r\nConnection: close\r\n");
    for (k, v) in extra {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    raw_request(addr, req.as_bytes())
}

/// The path part of a URL the server handed out.
pub fn path_of(url: &str) -> String {
    let rest = url.split_once("://").unwrap().1;
    format!("/{}", rest.split_once('/').unwrap().1)
}

/// The built binary (cargo builds it for integration tests).
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_blotcdn"))
}

/// A free port on 127.0.0.1 (bound, read, released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The server as a child process on the given data dir, on ports it chose
/// itself (port 0) and reported through `--addr-file`: no port is picked
/// here and released for the child to race for.
pub struct ChildServer {
    pub child: Child,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub metrics: Option<SocketAddr>,
}

impl ChildServer {
    pub fn spawn(data_dir: &Path) -> ChildServer {
        Self::spawn_with(data_dir, &[], &[])
    }

    /// With extra `serve` flags and environment variables.
    pub fn spawn_with(data_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> ChildServer {
        let mut cmd = Command::new(binary());
        cmd.args(["serve", "--data-dir"]).arg(data_dir).args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Self::spawn_cmd(cmd, data_dir)
    }

    /// `cmd` runs `blotcdn serve` (perhaps through a wrapper such as `sh -c
    /// 'ulimit -n 256; exec …'`); the addresses are added here.
    pub fn spawn_cmd(mut cmd: Command, data_dir: &Path) -> ChildServer {
        let addr_file = data_dir.with_extension(format!("addrs-{}.json", next_seq()));
        let _ = std::fs::remove_file(&addr_file);
        cmd.args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0"])
            .arg("--addr-file")
            .arg(&addr_file)
            .env("RUST_LOG", std::env::var("TEST_LOG").map(|_| "info".to_string()).unwrap_or("warn".into()))
            // The server logs to stdout: shown with TEST_LOG set.
            .stdout(if std::env::var_os("TEST_LOG").is_some() { Stdio::inherit() } else { Stdio::null() })
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let text = loop {
            if let Ok(t) = std::fs::read_to_string(&addr_file) {
                break t;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("the server exited before listening: {status}");
            }
            assert!(Instant::now() < deadline, "the server did not report its addresses in 30 s");
            std::thread::sleep(Duration::from_millis(10));
        };
        let _ = std::fs::remove_file(&addr_file);
        let field = |name: &str| -> Option<SocketAddr> {
            let start = text.find(&format!("\"{name}\":\""))? + name.len() + 4;
            text[start..].split('"').next()?.parse().ok()
        };
        ChildServer { grpc: field("grpc").unwrap(), http: field("http").unwrap(), metrics: field("metrics"), child }
    }

    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// The child's resident memory, from /proc.
    pub fn rss_bytes(&self) -> u64 {
        rss_of(self.child.id())
    }

    /// Open file descriptors of the child.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id())).map(|d| d.count()).unwrap_or(0)
    }
}

fn next_seq() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    SEQ.fetch_add(1, Ordering::Relaxed)
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wait_for_port(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "{addr} did not open in 20 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a command to completion with a deadline; returns (exit code, stdout, stderr).
pub fn run(cmd: &mut Command, secs: u64) -> (i32, String, String) {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap_or_else(|e| {
        panic!("cannot run {:?}: {e}", cmd.get_program());
    });
    // Read both pipes on threads so a chatty child cannot block on a full pipe.
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = so.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = se.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(secs);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{:?} did not finish in {secs} s", cmd.get_program());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    (status.code().unwrap_or(-1), out.join().unwrap(), err.join().unwrap())
}

/// A helper server process (nginx, varnish, caddy, redis) killed on drop.
pub struct Daemon {
    pub child: Child,
    pub name: &'static str,
}

impl Daemon {
    /// Starts a daemon that cannot be told to bind port 0 and report it
    /// (nginx, varnish, caddy) on a port found free; if another process took
    /// that port before the daemon bound it, the daemon exits and it is
    /// started again on another port. `make` builds its command for a port.
    pub fn spawn_on_free_port(name: &'static str, mut make: impl FnMut(u16) -> Command) -> (Daemon, u16) {
        for _ in 0..5 {
            let port = free_port();
            let mut cmd = make(port);
            let child = cmd.stdout(Stdio::null()).stderr(Stdio::inherit()).spawn().unwrap_or_else(|e| {
                panic!("cannot start {name} ({e}); run ./scripts/install-test-deps.sh");
            });
            let mut d = Daemon { child, name };
            let deadline = Instant::now() + Duration::from_secs(20);
            let up = loop {
                if let Ok(Some(_)) = d.child.try_wait() {
                    break false;
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    // Ours, not a process that took the port: still alive a moment later.
                    std::thread::sleep(Duration::from_millis(50));
                    break d.child.try_wait().map(|s| s.is_none()).unwrap_or(false);
                }
                assert!(Instant::now() < deadline, "{name} did not open port {port} in 20 s");
                std::thread::sleep(Duration::from_millis(20));
            };
            if up {
                return (d, port);
            }
            eprintln!("{name} could not start on port {port}; trying another");
        }
        panic!("{name} did not start on any of five free ports");
    }

    pub fn spawn(name: &'static str, cmd: &mut Command, port: u16) -> Daemon {
        let child = cmd.stdout(Stdio::null()).stderr(Stdio::inherit()).spawn().unwrap_or_else(|e| {
            panic!("cannot start {name} ({e}); run ./scripts/install-test-deps.sh");
        });
        let d = Daemon { child, name };
        wait_for_port(([127, 0, 0, 1], port).into());
        d
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        stop_gracefully(&mut self.child);
    }
}

/// SIGTERM first, so that a master process (nginx, varnish) takes its
/// workers with it; SIGKILL if it lingers past two seconds.
pub fn stop_gracefully(child: &mut Child) {
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Makes a temporary folder readable by unprivileged workers (nginx,
/// varnish and caddy may drop to their own users).
pub fn open_up(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755));
}

/// Varnish in front of the origin on `origin_port`, running `edge/varnish.vcl`
/// with only the backend port rewritten; `storage` like `malloc,64m`.
pub fn varnish(work: &Path, origin_port: u16, storage: &str) -> (Daemon, u16) {
    let vcl = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/edge/varnish.vcl")).unwrap();
    let vcl = vcl.replace(".port = \"8080\";", &format!(".port = \"{origin_port}\";"));
    std::fs::create_dir_all(work).unwrap();
    open_up(work);
    std::fs::write(work.join("blotcdn.vcl"), vcl).unwrap();
    Daemon::spawn_on_free_port("varnishd", |port| varnish_cmd(work, port, storage))
}

/// Varnish of `work` on a given `port` (an edge coming back where it was,
/// cache empty): the same configuration as [`varnish`].
pub fn varnish_at(work: &Path, origin_port: u16, storage: &str, port: u16) -> Daemon {
    let vcl = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/edge/varnish.vcl")).unwrap();
    let vcl = vcl.replace(".port = \"8080\";", &format!(".port = \"{origin_port}\";"));
    std::fs::create_dir_all(work).unwrap();
    open_up(work);
    std::fs::write(work.join("blotcdn.vcl"), vcl).unwrap();
    Daemon::spawn("varnishd", &mut varnish_cmd(work, port, storage), port)
}

/// An edge that is down but keeps its port: every connection to it is
/// accepted and closed at once, until it is stopped (and the port freed for
/// the edge to come back on). A port merely left free could be taken by
/// another test's server meanwhile.
pub struct DownEdge {
    pub port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DownEdge {
    pub fn bind(port: u16) -> DownEdge {
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).expect("the edge's port is still free");
        let port = listener.local_addr().unwrap().port();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                drop(conn);
            }
        });
        DownEdge { port, stop, thread: Some(thread) }
    }

    /// Frees the port.
    pub fn stop(mut self) -> u16 {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        self.thread.take().unwrap().join().unwrap();
        self.port
    }
}

fn varnish_cmd(work: &Path, port: u16, storage: &str) -> Command {
    let mut c = Command::new("varnishd");
    c.arg("-F")
        .arg("-n")
        .arg(work.join("varnish"))
        .args(["-a", &format!("127.0.0.1:{port}"), "-T", "127.0.0.1:0", "-s", storage])
        .arg("-f")
        .arg(work.join("blotcdn.vcl"));
    c
}

/// The bans a Varnish of `work` holds (`varnishadm ban.list`).
pub fn varnish_bans(work: &Path) -> String {
    let (code, out, err) = run(Command::new("varnishadm").arg("-n").arg(work.join("varnish")).arg("ban.list"), 20);
    assert_eq!(code, 0, "varnishadm ban.list: {err}");
    out
}

/// nginx serving `root` on a free port of 127.0.0.1 (a stand-in for a
/// static origin): the daemon and its port.
pub fn nginx(dir: &Path, root: &Path, extra: &str) -> (Daemon, u16) {
    std::fs::create_dir_all(dir).unwrap();
    open_up(dir);
    open_up(root);
    std::fs::create_dir_all(dir.join("tmp")).unwrap();
    Daemon::spawn_on_free_port("nginx", |port| {
        let conf = nginx_conf(dir, root, port, extra);
        let mut c = Command::new("nginx");
        c.arg("-p").arg(dir).arg("-c").arg(&conf);
        c
    })
}

fn nginx_conf(dir: &Path, root: &Path, port: u16, extra: &str) -> PathBuf {
    let conf = dir.join("nginx.conf");
    let user = if unsafe_is_root() { "user root;" } else { "" };
    std::fs::write(
        &conf,
        format!(
            "{user}\nworker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/tmp;\n  proxy_temp_path {d}/tmp;\n\
             fastcgi_temp_path {d}/tmp;\n  uwsgi_temp_path {d}/tmp;\n  scgi_temp_path {d}/tmp;\n\
             include /etc/nginx/mime.types;\n  sendfile on;\n  tcp_nopush on;\n\
             open_file_cache max=10000 inactive=60s;\n  open_file_cache_valid 60s;\n\
             server {{\n    listen 127.0.0.1:{port};\n    root {r};\n    {extra}\n  }}\n}}\n",
            d = dir.display(),
            r = root.display()
        ),
    )
    .unwrap();
    conf
}

pub fn unsafe_is_root() -> bool {
    std::env::var("USER").map(|u| u == "root").unwrap_or(false)
        || std::fs::read_to_string("/proc/self/status")
            .map(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")))
            .unwrap_or(false)
}

/// curl, the way a person would check an answer: status, headers, body.
pub fn curl(args: &[&str]) -> RawResponse {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-i", "--path-as-is", "--max-time", "20"]).args(args);
    let out = cmd.output().expect("curl runs");
    assert!(out.status.success(), "curl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    // curl -i may print interim answers (100 Continue); keep the last head.
    parse_response(&out.stdout)
}

/// `Invalidate` through the generated client; the new cache id.
pub async fn invalidate(s: &Server, blog: &str, paths: &[&str]) -> u64 {
    let mut c = s.publisher().await;
    let paths = paths.iter().map(|p| p.to_string()).collect();
    let req = blotcdn::proto::InvalidateRequest { blog_id: blog.into(), paths };
    c.invalidate(req).await.unwrap().into_inner().cache_id
}

/// `ResolveBatch` through the generated client.
pub async fn resolve(s: &Server, blog: &str, paths: &[&str]) -> Vec<blotcdn::proto::ResolvedAsset> {
    let mut c = s.resolver().await;
    let paths = paths.iter().map(|p| p.to_string()).collect();
    let req = blotcdn::proto::ResolveBatchRequest { blog_id: blog.into(), paths };
    c.resolve_batch(req).await.unwrap().into_inner().assets
}

/// The URL a renderer would get for one path.
pub async fn url_of(s: &Server, blog: &str, path: &str) -> String {
    resolve(s, blog, &[path]).await.remove(0).url
}

/// A blob's file in a data dir's CAS (`cas/ab/cd/abcd…`).
pub fn blob_file(data_dir: &Path, hash: &str) -> PathBuf {
    data_dir.join("cas").join(&hash[0..2]).join(&hash[2..4]).join(hash)
}

/// Writes `bytes` over a stored blob (which the server keeps read-only), as
/// damage on disk would.
pub fn overwrite_blob(blob: &Path, bytes: &[u8]) {
    let mut perms = std::fs::metadata(blob).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(blob, perms).unwrap();
    std::fs::write(blob, bytes).unwrap();
}

/// A process's resident memory, from /proc.
pub fn rss_of(pid: u32) -> u64 {
    try_rss_of(pid).expect("VmRSS in /proc/PID/status")
}

/// The resident memory of `pid`, or `None` once it has exited (a zombie
/// has no VmRSS).
pub fn try_rss_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())?;
    Some(kb * 1024)
}

/// `blotcdn serve` on `data_dir` with every port 0: for a start that is to
/// be refused (run it with [`run`], which returns its exit code and output).
pub fn serve_on_free_ports(data_dir: &Path) -> Command {
    let mut cmd = Command::new(binary());
    cmd.args(["serve", "--data-dir"]).arg(data_dir);
    cmd.args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0"]);
    cmd
}

/// An HTTP server on 127.0.0.1 that answers every request with `head` and
/// then `chunk` over and over, until the client lets go (or 8 GiB a
/// connection): a faulty edge, bucket or app. Stopped when dropped.
pub struct EndlessServer {
    pub port: u16,
    /// Bytes of body taken from the sockets, all connections together.
    pub sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl EndlessServer {
    pub fn start(head: &'static str, chunk: &'static [u8]) -> EndlessServer {
        use std::sync::atomic::Ordering::Relaxed;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (counter, stopped) = (sent.clone(), stop.clone());
        std::thread::spawn(move || {
            // Ten minutes at most, then nothing more is accepted.
            let deadline = Instant::now() + Duration::from_secs(600);
            while !stopped.load(Relaxed) && Instant::now() < deadline {
                let Ok((mut conn, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let (counter, stopped) = (counter.clone(), stopped.clone());
                std::thread::spawn(move || {
                    conn.set_nonblocking(false).unwrap();
                    let mut r = std::io::BufReader::new(conn.try_clone().unwrap());
                    let mut line = String::new();
                    while std::io::BufRead::read_line(&mut r, &mut line).is_ok_and(|n| n > 2) {
                        line.clear();
                    }
                    let _ = conn.write_all(head.as_bytes());
                    let body = chunk.repeat((1 << 16) / chunk.len().max(1) + 1);
                    for _ in 0..(8u64 << 30) / body.len() as u64 {
                        if stopped.load(Relaxed) || conn.write_all(&body).is_err() {
                            break;
                        }
                        counter.fetch_add(body.len() as u64, Relaxed);
                    }
                });
            }
        });
        EndlessServer { port, sent, stop }
    }

    pub fn sent(&self) -> u64 {
        self.sent.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for EndlessServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// How [`keep_rewriting`] changes the file.
#[derive(Clone, Copy, Debug)]
pub enum Rewrite {
    /// Through a shared writable mapping, its descriptor closed at once,
    /// a quarter at a time 2 ms apart: stores that move none of the file's
    /// times on this kernel.
    Mapped,
    /// Cut to nothing by its path, then written whole 1 ms later.
    CutThenWritten,
    /// Through one shared writable mapping, made before the first rewrite
    /// and kept: after its first stores, none moves a time.
    OneMapping,
}

/// A thread rewriting a file (see [`keep_rewriting`]); stopped when
/// dropped, as when a test fails.
pub struct Rewriter {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<usize>>,
}

impl Rewriter {
    /// Stops it; how many times it rewrote the file.
    pub fn finish(mut self) -> usize {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().expect("running").join().unwrap()
    }
}

impl Drop for Rewriter {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A shared writable mapping of a whole file, its descriptor closed at
/// once (the mapping keeps the file open for writing); unmapped when dropped.
struct Mapping {
    at: *mut libc::c_void,
    len: usize,
}

impl Mapping {
    fn of(file: &Path, len: usize) -> Mapping {
        use std::os::unix::io::AsRawFd;
        let f = std::fs::OpenOptions::new().read(true).write(true).open(file).unwrap();
        // SAFETY: a fresh mapping of `len` bytes of an open file, unmapped
        // in `drop`.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(at, libc::MAP_FAILED);
        Mapping { at, len }
    }

    fn pages(&mut self) -> &mut [u8] {
        // SAFETY: mapped, of this length, until `drop`.
        unsafe { std::slice::from_raw_parts_mut(self.at as *mut u8, self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: mapped in `of`, not used after this.
        let unmapped = unsafe { libc::munmap(self.at, self.len) };
        if !std::thread::panicking() {
            assert_eq!(unmapped, 0);
        }
    }
}

/// Rewrites `file` with `a` and `b` in turn (one length), 0-9 ms apart,
/// until stopped.
pub fn keep_rewriting(file: std::path::PathBuf, a: Vec<u8>, b: Vec<u8>, how: Rewrite) -> Rewriter {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let halt = stop.clone();
    use std::io::Write;
    let thread = std::thread::spawn(move || {
        let stop = halt;
        let mut n = 0;
        let mut kept = matches!(how, Rewrite::OneMapping).then(|| Mapping::of(&file, a.len()));
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let data = if n % 2 == 0 { &b } else { &a };
            match how {
                Rewrite::OneMapping => kept.as_mut().expect("mapped above").pages().copy_from_slice(data),
                Rewrite::Mapped => {
                    let mut m = Mapping::of(&file, data.len());
                    let quarter = data.len() / 4;
                    for (to, from) in m.pages().chunks_mut(quarter).zip(data.chunks(quarter)) {
                        to.copy_from_slice(from);
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
                Rewrite::CutThenWritten => {
                    std::fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(0).unwrap();
                    std::thread::sleep(Duration::from_millis(1));
                    std::fs::OpenOptions::new().write(true).open(&file).unwrap().write_all(data).unwrap();
                }
            }
            n += 1;
            std::thread::sleep(Duration::from_millis((n as u64 * 7) % 10));
        }
        drop(kept);
        n
    });
    Rewriter { stop, thread: Some(thread) }
}
