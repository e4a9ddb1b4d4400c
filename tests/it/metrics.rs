//! Prometheus metrics as an operator sees them: Debian's `prometheus`
//! scrapes a running server and its HTTP API answers queries showing the
//! counters moved after real calls; `promtool check metrics` finds nothing
//! to complain about.

use crate::common;

use std::process::Command;
use std::time::{Duration, Instant};

use blotcdn::proto as pb;
use common::{curl, run, ChildServer, Daemon};

fn metrics_addr(server: &ChildServer) -> std::net::SocketAddr {
    server.metrics.expect("the server reported its metrics address")
}

/// One sample's value from the text exposition, by its full name and labels.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))?.rsplit(' ').next()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_counters_that_real_calls_moved() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("blogs/mblog")).unwrap();
    std::fs::write(dir.path().join("blogs/mblog/style.css"), b"body{}").unwrap();
    // A folder named by a year is a folder, not a cache id, in the route label as in the answer.
    std::fs::create_dir_all(dir.path().join("blogs/mblog/2016")).unwrap();
    std::fs::write(dir.path().join("blogs/mblog/2016/a.txt"), b"2016").unwrap();
    // A purge target that is down: the outbox's metrics move too.
    let server = ChildServer::spawn_with(
        dir.path(),
        &[],
        // The file was written just now: no window in which it is not kept.
        &[
            ("BLOTCDN_PURGE_URLS", "http=http://127.0.0.1:9/"),
            ("BLOTCDN_PURGE_ON_PUBLISH", "true"),
            ("BLOTCDN_RECENT_CHANGE_MS", "0"),
        ],
    );
    let grpc = format!("http://{}", server.grpc);
    let mut p = pb::publisher_client::PublisherClient::connect(grpc.clone()).await.unwrap();
    let mut r = pb::resolver_client::ResolverClient::connect(grpc).await.unwrap();
    p.invalidate(pb::InvalidateRequest { blog_id: "mblog".into(), paths: vec![] }).await.unwrap();
    let paths = vec!["/style.css".to_string(), "/a.js".into(), "/../bad".into()];
    let got = r.resolve_batch(pb::ResolveBatchRequest { blog_id: "mblog".into(), paths }).await.unwrap().into_inner();
    let _ = r.get_blog(pb::GetBlogRequest { blog_id: "nosuchblog".into() }).await.unwrap_err();
    let style = common::path_of(&got.assets[0].url);
    for _ in 0..3 {
        assert_eq!(curl(&[&format!("http://{}{}", server.http, style)]).body, b"body{}");
    }
    assert_eq!(curl(&[&format!("http://{}/mblog/none.css", server.http)]).status, 404);
    assert_eq!(curl(&[&format!("http://{}/mblog/2016/a.txt", server.http)]).body, b"2016");

    // The exposition itself.
    let m = curl(&[&format!("http://{}/metrics", metrics_addr(&server))]);
    assert_eq!(m.status, 200);
    let text = String::from_utf8(m.body).unwrap();
    assert_eq!(sample(&text, "blotcdn_resolve_paths_total{status=\"ok\"}"), Some(2.0), "{text}");
    assert_eq!(sample(&text, "blotcdn_resolve_paths_total{status=\"invalid_path\"}"), Some(1.0));
    assert_eq!(sample(&text, "blotcdn_rpc_requests_total{method=\"GetBlog\",code=\"NOT_FOUND\"}"), Some(1.0));
    assert_eq!(sample(&text, "blotcdn_rpc_requests_total{method=\"Invalidate\",code=\"OK\"}"), Some(1.0));
    assert_eq!(sample(&text, "blotcdn_http_requests_total{route=\"versioned\",status=\"200\"}"), Some(3.0));
    assert_eq!(sample(&text, "blotcdn_http_requests_total{route=\"unversioned\",status=\"404\"}"), Some(1.0));
    assert_eq!(sample(&text, "blotcdn_http_requests_total{route=\"unversioned\",status=\"200\"}"), Some(1.0));
    assert_eq!(sample(&text, "blotcdn_http_response_bytes_total{route=\"versioned\"}"), Some(18.0));
    assert_eq!(sample(&text, "blotcdn_hot_cache_hits_total"), Some(2.0), "first read from disk, then memory");
    assert!(sample(&text, "blotcdn_wal_fsync_seconds_count").is_some_and(|n| n >= 1.0), "{text}");
    assert!(text.contains("blotcdn_rpc_duration_seconds_bucket{method=\"ResolveBatch\",le=\"0.001\"}"), "{text}");
    assert_eq!(sample(&text, "blotcdn_index_paths"), Some(0.0));
    assert_eq!(sample(&text, "blotcdn_purge_queue_length{target=\"http-127.0.0.1-9\"}"), Some(1.0), "{text}");
    // The first delivery fails at once (nothing listens there); scrape until it shows.
    let mut text = text;
    for _ in 0..100 {
        if sample(&text, "blotcdn_purge_sent_total{target=\"http-127.0.0.1-9\",outcome=\"error\"}").is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        text = String::from_utf8(curl(&[&format!("http://{}/metrics", metrics_addr(&server))]).body).unwrap();
    }
    assert!(sample(&text, "blotcdn_purge_sent_total{target=\"http-127.0.0.1-9\",outcome=\"error\"}")
        .is_some_and(|n| n >= 1.0));
    assert!(text.contains("blotcdn_purge_delivery_seconds_bucket{target=\"http-127.0.0.1-9\",le=\"0.001\"}"), "{text}");
    assert!(sample(&text, "process_resident_memory_bytes").is_some_and(|b| b > 1e6), "process metrics");

    // promtool's own lint.
    let f = dir.path().join("metrics.txt");
    std::fs::write(&f, &text).unwrap();
    let (code, out, err) =
        run(Command::new("sh").arg("-c").arg(format!("promtool check metrics < {}", f.display())), 30);
    assert_eq!(code, 0, "promtool: {out}{err}");
    assert!(out.trim().is_empty() && err.trim().is_empty(), "promtool found problems: {out}{err}");

    // Prometheus scraping it, and its query API.
    let work = tempfile::tempdir().unwrap();
    common::open_up(work.path());
    let conf = work.path().join("prometheus.yml");
    std::fs::write(
        &conf,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: blotcdn\n    static_configs:\n      - targets: ['{}']\n",
            metrics_addr(&server)
        ),
    )
    .unwrap();
    let (_prom, port) = Daemon::spawn_on_free_port("prometheus", |port| {
        let mut c = Command::new("prometheus");
        c.arg(format!("--config.file={}", conf.display()))
            .arg(format!("--storage.tsdb.path={}", work.path().join("tsdb").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=error");
        c
    });
    let query = |q: &str| -> serde_json::Value {
        let url = format!("http://127.0.0.1:{port}/api/v1/query?query={}", percent(q));
        let r = curl(&[&url]);
        serde_json::from_slice(&r.body).unwrap_or(serde_json::Value::Null)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let value = loop {
        let v = query("sum(blotcdn_resolve_paths_total{status=\"ok\"})");
        if let Some(x) = v["data"]["result"][0]["value"][1].as_str() {
            break x.parse::<f64>().unwrap();
        }
        assert!(Instant::now() < deadline, "prometheus never scraped the server: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(value, 2.0);
    let up = query("up{job=\"blotcdn\"}");
    assert_eq!(up["data"]["result"][0]["value"][1].as_str(), Some("1"), "{up}");
    let rate = query("sum by (method) (blotcdn_rpc_requests_total)");
    let methods: Vec<&str> =
        rate["data"]["result"].as_array().unwrap().iter().filter_map(|r| r["metric"]["method"].as_str()).collect();
    for m in ["Invalidate", "ResolveBatch", "GetBlog"] {
        assert!(methods.contains(&m), "{m} missing from {methods:?}");
    }
}

/// A blob hashed before it is first answered counts as `whole`; one that
/// went bad on disk as `damaged` (and is refused), which an operator can
/// alert on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_checks_are_counted_by_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let server = ChildServer::spawn_with(dir.path(), &[], &[]);
    let mut p = pb::publisher_client::PublisherClient::connect(format!("http://{}", server.grpc)).await.unwrap();
    async fn put(
        p: &mut pb::publisher_client::PublisherClient<tonic::transport::Channel>,
        name: &str,
        data: &[u8],
    ) -> pb::Asset {
        let header = pb::PutAssetHeader { blog_id: "mblog".into(), filename: name.into(), ..Default::default() };
        let chunks = vec![
            pb::PutAssetChunk { chunk: Some(pb::put_asset_chunk::Chunk::Header(header)) },
            pb::PutAssetChunk { chunk: Some(pb::put_asset_chunk::Chunk::Data(data.to_vec().into())) },
        ];
        p.put_asset(tokio_stream::iter(chunks)).await.unwrap().into_inner()
    }
    let good = put(&mut p, "a.png", b"whole bytes").await;
    let bad = put(&mut p, "b.png", b"other bytes").await;
    common::overwrite_blob(&common::blob_file(dir.path(), &bad.hash), b"otheR bytes");
    // Past the moment in which a change may still be in progress (20 ms),
    // so that the outcome is remembered.
    std::thread::sleep(Duration::from_millis(100));
    for _ in 0..2 {
        assert_eq!(curl(&[&format!("http://{}{}", server.http, common::path_of(&good.url))]).status, 200);
        assert_eq!(curl(&[&format!("http://{}{}", server.http, common::path_of(&bad.url))]).status, 500);
    }
    let text = String::from_utf8(curl(&[&format!("http://{}/metrics", metrics_addr(&server))]).body).unwrap();
    // Each once: the good one is then answered from memory, the damaged
    // one refused as remembered, without reading it again.
    assert_eq!(sample(&text, "blotcdn_cas_blob_checks_total{outcome=\"whole\"}"), Some(1.0), "{text}");
    assert_eq!(sample(&text, "blotcdn_cas_blob_checks_total{outcome=\"damaged\"}"), Some(1.0), "{text}");
}

fn percent(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A client that pipelines scrapes and reads none of the answers holds its
/// metrics slot for one scrape at most: it gets one answer, then the server
/// closes the connection (the hostile test's slowloris held every slot).
#[test]
fn a_client_pipelining_scrapes_gets_one_answer_and_is_closed() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let server = ChildServer::spawn_with(dir.path(), &[], &[("BLOTCDN_HTTP_IDLE_TIMEOUT_SECS", "2")]);
    let mut c = std::net::TcpStream::connect(metrics_addr(&server)).unwrap();
    let one = b"GET /metrics HTTP/1.1\r\nHost: m\r\n\r\n";
    c.write_all(&one.repeat(2000)).unwrap();
    // Nothing read for longer than the limit.
    std::thread::sleep(Duration::from_secs(3));
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = Vec::new();
    let started = Instant::now();
    let ended = loop {
        let mut b = [0u8; 65536];
        match c.read(&mut b) {
            Ok(0) => break true,
            Ok(n) => got.extend_from_slice(&b[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(_) => break false,
        }
        assert!(started.elapsed() < Duration::from_secs(30), "still answering after 30 s");
    };
    let answers = got.windows(9).filter(|w| w == b"HTTP/1.1 ").count();
    assert!(ended, "the connection is still open after {answers} answers");
    assert!(answers <= 1, "{answers} answers to one connection");
}

/// An upload the client gives up half way, or before its header, is
/// counted as CANCELLED, not as a bad request (alerts on INVALID_ARGUMENT
/// are about what callers send), and one refused for `max_uploads` is
/// counted too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_cut_by_their_client_or_refused_are_counted() {
    use blotcdn::proto::put_asset_chunk::Chunk;
    let dir = tempfile::tempdir().unwrap();
    let server = ChildServer::spawn_with(dir.path(), &[], &[("BLOTCDN_MAX_UPLOADS", "1")]);
    let grpc = format!("http://{}", server.grpc);
    let mut other = pb::publisher_client::PublisherClient::connect(grpc.clone()).await.unwrap();
    let task = tokio::spawn(async move {
        let mut c = pb::publisher_client::PublisherClient::connect(grpc).await.unwrap();
        let header = pb::PutAssetChunk {
            chunk: Some(Chunk::Header(pb::PutAssetHeader {
                blog_id: "cut".into(),
                filename: "cut.bin".into(),
                content_type: String::new(),
                path: String::new(),
            })),
        };
        let data = pb::PutAssetChunk { chunk: Some(Chunk::Data(vec![7u8; 5000].into())) };
        let first = tokio_stream::iter(vec![header, data]);
        let _ = c.put_asset(tokio_stream::StreamExt::chain(first, futures_util::stream::pending())).await;
    });
    let series = |code: &str| format!("blotcdn_rpc_requests_total{{method=\"PutAsset\",code=\"{code}\"}}");
    let scrape = || String::from_utf8(curl(&[&format!("http://{}/metrics", metrics_addr(&server))]).body).unwrap();
    // Cut once the server has started writing it.
    let started = Instant::now();
    while std::fs::read_dir(dir.path().join("cas/tmp")).map(|d| d.count()).unwrap_or(0) == 0 {
        assert!(started.elapsed() < Duration::from_secs(10), "the upload never reached the server");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The one upload slot is taken.
    let e = other.put_asset(tokio_stream::iter(Vec::<pb::PutAssetChunk>::new())).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    task.abort();
    let counted = |code: &str, n: f64| {
        let text = loop {
            let text = scrape();
            if sample(&text, &series(code)) == Some(n) || started.elapsed() > Duration::from_secs(20) {
                break text;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(sample(&text, &series(code)), Some(n), "{text}");
        text
    };
    counted("CANCELLED", 1.0);
    // One that goes away before it sends its header.
    let grpc = format!("http://{}", server.grpc);
    let task = tokio::spawn(async move {
        let mut c = pb::publisher_client::PublisherClient::connect(grpc).await.unwrap();
        let _ = c.put_asset(futures_util::stream::pending::<pb::PutAssetChunk>()).await;
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    task.abort();
    let text = counted("CANCELLED", 2.0);
    assert_eq!(sample(&text, &series("RESOURCE_EXHAUSTED")), Some(1.0), "{text}");
    assert_eq!(sample(&text, &series("INVALID_ARGUMENT")), None, "{text}");
}
