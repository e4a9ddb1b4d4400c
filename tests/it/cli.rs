//! The command line as a person uses it (the commands not covered in
//! assets.rs), configuration errors that name their key, and fallback
//! origins that refuse, fail or are not allowed to backfill.

use crate::common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::ffi::OsStrExt;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{binary, curl, nginx, run, Server};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_invalidate_domain_and_blog_commands() {
    let s = Server::start().await;
    let server = format!("http://{}", s.grpc);
    let cli = |args: &[&str]| {
        let mut c = Command::new(binary());
        c.args(args).env("BLOTCDN_SERVER", &server);
        run(&mut c, 60)
    };
    let (code, out, err) = cli(&["invalidate", "--blog", "clib"]);
    assert_eq!(code, 0, "{err}");
    let floor: u64 = out.trim().strip_prefix("cache_id ").unwrap().parse().unwrap();
    let (code, out, _) = cli(&["invalidate", "--blog", "clib", "/a b/ü.css"]);
    assert_eq!(code, 0);
    let id: u64 = out.trim().strip_prefix("cache_id ").unwrap().parse().unwrap();
    assert!(id > floor);
    let (code, out, _) = cli(&["resolve", "--blog", "clib", "/a b/ü.css", "/other.js", "/../x"]);
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], format!("/a b/ü.css\t{}/clib/{id}/a%20b/%C3%BC.css", s.url("")));
    assert_eq!(lines[1], format!("/other.js\t{}/clib/{floor}/other.js", s.url("")));
    assert_eq!(lines[2], "/../x\tRESOLVE_STATUS_INVALID_PATH");

    let (code, out, err) = cli(&["domain", "set", "blog.example.com", "clib"]);
    assert_eq!((code, out.trim()), (0, "blog.example.com -> clib"), "{err}");
    let (code, out, _) = cli(&["domain", "get", "blog.example.com"]);
    assert_eq!((code, out.trim()), (0, "clib"));
    let (code, out, _) = cli(&["blog", "get", "clib"]);
    assert_eq!(code, 0);
    assert!(out.contains(&format!("cache_id    {floor}")) && out.contains("domains     blog.example.com"), "{out}");
    assert!(out.contains("path_count  1"), "{out}");
    let (code, out, _) = cli(&["domain", "rm", "blog.example.com"]);
    assert_eq!((code, out.trim()), (0, "removed blog.example.com"));
    let (code, _, err) = cli(&["domain", "get", "blog.example.com"]);
    assert_ne!(code, 0);
    assert!(err.contains("unmapped domain blog.example.com"), "{err}");
    let (code, _, err) = cli(&["invalidate", "--blog", "bad/id"]);
    assert_ne!(code, 0);
    assert!(err.contains("InvalidArgument"), "{err}");
    // No server there: a clear error, not a hang.
    let (code, _, err) = run(Command::new(binary()).args(["blog", "--server", "http://127.0.0.1:1", "get", "x"]), 30);
    assert_ne!(code, 0);
    assert!(err.contains("cannot connect"), "{err}");
    s.stop().await;
}

#[test]
fn configuration_errors_name_their_key() {
    let dir = tempfile::tempdir().unwrap();
    let serve = |env: &[(&str, &str)], args: &[&str]| {
        let mut c = Command::new(binary());
        c.args(["serve", "--data-dir"]).arg(dir.path()).args(args);
        c.env("BLOTCDN_HTTP_ADDR", "127.0.0.1:0");
        for (k, v) in env {
            c.env(k, v);
        }
        run(&mut c, 30)
    };
    let (code, _, err) = serve(&[("BLOTCDN_MAX_BATCH", "lots")], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("BLOTCDN_MAX_BATCH") && err.contains("not a number"), "{err}");
    let (code, _, err) = serve(&[("BLOTCDN_MAX_UPLOADS", "0")], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("max_uploads"), "{err}");
    let toml = dir.path().join("bad.toml");
    std::fs::write(&toml, "fallback_origins = [\"ftp://bucket\"]\n").unwrap();
    let (code, _, err) = serve(&[], &["--config", toml.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("fallback_origins"), "{err}");
    // A query, a fragment or credentials: the blog's path would go into
    // the query, or be cut off, or the credentials silently not be sent.
    for origin in [
        "http://127.0.0.1:9/bkt?x=1",
        "http://127.0.0.1:9/bkt#f",
        "http://user:pw@127.0.0.1:9/bkt",
        "http://127.0.0.1:9/a b",
    ] {
        std::fs::write(&toml, format!("fallback_origins = [{origin:?}]\n")).unwrap();
        let (code, _, err) = serve(&[], &["--config", toml.to_str().unwrap()]);
        assert_ne!(code, 0, "started with {origin}");
        assert!(err.contains("fallback_origins") && err.contains(origin), "{err}");
    }
    std::fs::write(&toml, "max_bach = 5\n").unwrap();
    let (code, _, err) = serve(&[], &["--config", toml.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("max_bach"), "an unknown key is named: {err}");
    let (code, _, err) = serve(&[("BLOTCDN_GRPC_ADDR", "localhost")], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("grpc_addr"), "{err}");
    // Tokens set to commas alone: refused, not a Publisher open to anyone.
    let (code, _, err) = serve(&[("BLOTCDN_PUBLISHER_TOKENS", ",")], &[]);
    assert_ne!(code, 0, "started open with tokens \",\"");
    assert!(err.contains("BLOTCDN_PUBLISHER_TOKENS") && err.contains("names no token"), "{err}");
    let (code, _, err) = serve(&[("BLOTCDN_PUBLISHER_TOKENS", " ")], &[]);
    assert_ne!(code, 0, "started open with tokens \" \"");
    assert!(err.contains("names no token"), "{err}");
    // A base URL with a query, a fragment or credentials: refused, and never quoted whole.
    for url in [
        "http://cdn.example/?sig=secret",
        "http://cdn.example/#secret",
        "https://u:secret@cdn.example",
        "https:/u:secret@cdn",
    ] {
        let (code, _, err) = serve(&[("BLOTCDN_CDN_BASE_URL", url)], &[]);
        assert_ne!(code, 0, "{url}");
        assert!(err.contains("cdn_base_url") && !err.contains("secret"), "{url}: {err}");
    }
    // A value that is not UTF-8 is named, not left unread.
    let mut c = Command::new(binary());
    c.args(["serve", "--data-dir"]).arg(dir.path());
    c.env("BLOTCDN_MAX_BATCH", std::ffi::OsStr::from_bytes(b"\xff"));
    let (code, _, err) = run(&mut c, 30);
    assert_ne!(code, 0);
    assert!(err.contains("BLOTCDN_MAX_BATCH") && err.contains("UTF-8"), "{err}");
}

/// A fallback origin that answers every request with `status`, for 20 s at most.
fn answering(status: &'static str) -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    l.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let end = Instant::now() + Duration::from_secs(20);
        while Instant::now() < end {
            match l.accept() {
                Ok((mut c, _)) => {
                    c.set_nonblocking(false).unwrap();
                    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                    let mut buf = [0u8; 4096];
                    let _ = c.read(&mut buf);
                    if status.is_empty() {
                        // Refuses: closes without a word.
                        continue;
                    }
                    let body = "upstream says no";
                    let _ = write!(
                        c,
                        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallbacks_that_refuse_or_fail_are_skipped_and_backfill_can_be_off() {
    let work = tempfile::tempdir().unwrap();
    let bucket = work.path().join("bucket");
    std::fs::create_dir_all(bucket.join("fb")).unwrap();
    std::fs::write(bucket.join("fb/logo.png"), b"from the good origin").unwrap();
    let (_good, port) = nginx(&work.path().join("nginx"), &bucket, "");
    let (refuses, fails, missing) = (answering(""), answering("503 Service Unavailable"), answering("404 Not Found"));
    let s = Server::start_with(|p| {
        p.fallback_origins = Some(vec![
            format!("http://{refuses}"),
            format!("http://{fails}"),
            format!("http://{missing}"),
            // A scheme in capitals is the same scheme (RFC 3986, 3.1).
            format!("HTTP://127.0.0.1:{port}"),
        ]);
        p.backfill_origins = Some(0);
    })
    .await;
    let r = curl(&[&s.url("/fb/logo.png")]);
    assert_eq!((r.status, r.body.as_slice()), (200, &b"from the good origin"[..]), "the first origin that has it");
    assert_eq!(r.header("cache-control"), Some("public, max-age=60"));
    // backfill_origins = 0: nothing is written to local disk.
    std::thread::sleep(Duration::from_millis(300));
    assert!(!s.blogs_dir().join("fb/logo.png").exists(), "backfilled though backfill_origins = 0");
    // Nobody has it: 404, not the upstream's 503 or its body.
    let r = curl(&[&s.url("/fb/none.png")]);
    assert_eq!(r.status, 404);
    assert!(!String::from_utf8_lossy(&r.body).contains("upstream"), "an upstream error leaked");
    s.stop().await;
}

/// The README's shell blocks that follow `heading`, in order.
fn readme_blocks(heading: &str) -> Vec<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme.split_once(&format!("\n{heading}\n")).expect("the heading is in the README").1;
    let section = section.split("\n## ").next().unwrap();
    section.split("```sh\n").skip(1).map(|b| b.split_once("```").unwrap().0.to_owned()).collect()
}

/// The Quickstart as a newcomer pastes it, against a server started as the
/// README's first command starts it (here on free ports, put in the text
/// where it names the defaults), in a folder of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_quickstart_runs_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let server = common::ChildServer::spawn(&data);
    let blocks = readme_blocks("## Quickstart");
    assert_eq!(blocks.len(), 2, "the quickstart and its grpcurl twin");
    let metrics = server.metrics.expect("the server says its metrics address").to_string();
    let ports = |b: &str| {
        b.replace("127.0.0.1:50051", &server.grpc.to_string())
            .replace("127.0.0.1:8080", &server.http.to_string())
            .replace("127.0.0.1:9464", &metrics)
    };
    let bin_dir = binary().parent().unwrap().to_owned();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap());
    let sh = |script: &str| {
        let mut c = Command::new("bash");
        c.args(["-euo", "pipefail", "-c", script]).current_dir(dir.path());
        c.env("PATH", &path).env("BLOTCDN_SERVER", format!("http://{}", server.grpc));
        run(&mut c, 120)
    };
    // `export PATH=$PWD/target/release…` names the repository's build; here the test's.
    let (code, out, err) = sh(&ports(&blocks[0]));
    assert_eq!(code, 0, "the quickstart failed:\n{out}\n{err}");
    let base = format!("http://{}/443d398b03/", server.http);
    // What the newcomer sees, in order: a cache id, three URLs, the file through the origin,
    // one URL changed, a permanent URL, the domain's blog, the metrics.
    let ids: Vec<u64> = out.lines().filter_map(|l| l.strip_prefix("cache_id ")?.parse().ok()).collect();
    assert_eq!(ids.len(), 2, "{out}");
    let urls: Vec<&str> = out.lines().filter_map(|l| l.split('\t').nth(1)).filter(|u| u.starts_with(&base)).collect();
    let style1 = format!("{base}{}/templates/foo/style.css", ids[0]);
    let style2 = format!("{base}{}/templates/foo/style.css", ids[1]);
    assert!(urls.contains(&style1.as_str()) && urls.contains(&style2.as_str()), "{out}");
    assert!(urls.contains(&format!("{base}{}/photos/a%20b.jpg", ids[0]).as_str()), "{out}");
    assert!(urls.iter().filter(|u| u.ends_with("/app.js")).all(|u| u.contains(&format!("/{}/", ids[0]))), "{out}");
    assert!(out.contains("HTTP/1.1 200") && out.contains("body { color: #333 }"), "{out}");
    assert!(urls.iter().any(|u| u.contains("/_assets/") && u.ends_with("/me.png")), "{out}");
    assert!(out.contains("blotcdn_rpc_requests_total{"), "{out}");
    let (code, out, err) = sh(&ports(&blocks[1]));
    assert_eq!(code, 0, "the grpcurl twin failed:\n{out}\n{err}");
    assert!(out.contains("blotcdn.v1.Resolver") && out.contains("\"status\": \"SERVING\""), "{out}");
}

/// A server that takes the connection and never answers (stopped, or a
/// black hole in the network): a command fails, saying so, where it waited
/// for ever (a hostile test's `invalidate` and `purges` were still waiting
/// after 100 s).
#[test]
fn a_command_against_a_server_that_never_answers_fails() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = done.clone();
    let held = std::thread::spawn(move || {
        // Takes connections and holds them, reading nothing, until the test ends (at
        // most 4 minutes).
        let mut conns = Vec::new();
        listener.set_nonblocking(true).unwrap();
        let until = Instant::now() + Duration::from_secs(240);
        while Instant::now() < until && !stop.load(std::sync::atomic::Ordering::Relaxed) {
            match listener.accept() {
                Ok((c, _)) => conns.push(c),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    });
    // An upload has no pings (they would wait behind its bytes on a slow link): it is
    // cancelled once the server has taken nothing of it, nor answered, for 60 s.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a.png");
    std::fs::write(&file, vec![7u8; 200_000]).unwrap();
    let put = ["put", "--blog", "x", file.to_str().unwrap()];
    for (args, says, within) in [
        (&["invalidate", "--blog", "x"][..], "keep-alive timed out", 45),
        (&["purges"][..], "keep-alive timed out", 45),
        (&put[..], "took nothing of the upload", 75),
    ] {
        let started = Instant::now();
        let (code, _, err) = run(Command::new(binary()).args(args).env("BLOTCDN_SERVER", format!("http://{addr}")), 90);
        assert_ne!(code, 0, "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(started.elapsed() < Duration::from_secs(within), "{args:?} took {:?}", started.elapsed());
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    held.join().unwrap();
}
