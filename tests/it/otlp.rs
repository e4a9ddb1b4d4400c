//! Traces as an operator's collector sees them: an OTLP/gRPC receiver built
//! here on the official protocol definitions (`opentelemetry-proto`) gets
//! the spans of a ResolveBatch, an origin request, a log group commit and a
//! fallback fetch; a caller's `traceparent` is continued, and passed on to
//! the fallback origin; spans still waiting at SIGTERM are flushed.

use crate::common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blotcdn::proto as pb;
use common::{curl, ChildServer};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;

#[derive(Clone, Debug)]
struct Got {
    service: String,
    name: String,
    trace_id: String,
    parent: String,
    attrs: Vec<(String, String)>,
}

#[derive(Default, Clone)]
struct Receiver(Arc<Mutex<Vec<Got>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let text = |v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>| match v
            .as_ref()
            .and_then(|v| v.value.as_ref())
        {
            Some(Value::StringValue(s)) => s.clone(),
            Some(Value::IntValue(i)) => i.to_string(),
            Some(Value::BoolValue(b)) => b.to_string(),
            Some(other) => format!("{other:?}"),
            None => String::new(),
        };
        let mut out = self.0.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
                .map(|a| text(&a.value))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    out.push(Got {
                        service: service.clone(),
                        name: s.name.clone(),
                        trace_id: hex(&s.trace_id),
                        parent: hex(&s.parent_span_id),
                        attrs: s.attributes.iter().map(|a| (a.key.clone(), text(&a.value))).collect(),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

impl Got {
    fn attr(&self, k: &str) -> Option<&str> {
        self.attrs.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str())
    }
}

/// Waits (boundedly) until a span matching `f` has arrived.
async fn wait_for(rx: &Receiver, what: &str, f: impl Fn(&Got) -> bool) -> Got {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(g) = rx.0.lock().unwrap().iter().find(|g| f(g)) {
            return g.clone();
        }
        assert!(Instant::now() < deadline, "no {what} span arrived; got {:#?}", rx.0.lock().unwrap());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A fallback origin that answers 200 and remembers the `traceparent` it was sent.
fn recording_origin() -> (std::net::SocketAddr, Arc<Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    l.set_nonblocking(true).unwrap();
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let keep = seen.clone();
    std::thread::spawn(move || {
        let end = Instant::now() + Duration::from_secs(60);
        while Instant::now() < end {
            let Ok((mut c, _)) = l.accept() else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            c.set_nonblocking(false).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut buf = [0u8; 4096];
            let n = c.read(&mut buf).unwrap_or(0);
            let head = String::from_utf8_lossy(&buf[..n]).to_string();
            if let Some(tp) = head.lines().find_map(|l| l.strip_prefix("traceparent: ")) {
                keep.lock().unwrap().push(tp.trim().to_string());
            }
            let _ = c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
        }
    });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_collector_and_continue_the_callers_trace() {
    let rx = Receiver::default();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = l.local_addr().unwrap();
    let svc = TraceServiceServer::new(rx.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l))
            .await
    });
    let (origin, seen) = recording_origin();

    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("blogs/tblog")).unwrap();
    std::fs::write(dir.path().join("blogs/tblog/a.css"), b"a{}").unwrap();
    let endpoint = format!("http://{otlp}");
    let fallback = format!("http://{origin}");
    let purge_to = format!("http=http://{origin}/purge");
    let mut server = ChildServer::spawn_with(
        dir.path(),
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("BLOTCDN_FALLBACK_ORIGINS", fallback.as_str()),
            ("BLOTCDN_PURGE_URLS", purge_to.as_str()),
            // Export every 200 ms, so the test need not wait 5 s.
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ],
    );
    let grpc = format!("http://{}", server.grpc);
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let ch = tonic::transport::Channel::from_shared(grpc).unwrap().connect().await.unwrap();
    let mut p = pb::publisher_client::PublisherClient::new(ch.clone());
    p.invalidate(pb::InvalidateRequest { blog_id: "tblog".into(), paths: vec![] }).await.unwrap();
    let mut req =
        tonic::Request::new(pb::ResolveBatchRequest { blog_id: "tblog".into(), paths: vec!["/a.css".into()] });
    req.metadata_mut().insert("traceparent", format!("00-{trace}-{parent}-01").parse().unwrap());
    let url = pb::resolver_client::ResolverClient::new(ch).resolve_batch(req).await.unwrap().into_inner().assets[0]
        .url
        .clone();

    // The RPC, continuing the caller's trace.
    let rpc = wait_for(&rx, "ResolveBatch", |g| {
        g.name == "grpc" && g.attr("rpc.path").is_some_and(|p| p.ends_with("/ResolveBatch"))
    })
    .await;
    assert_eq!((rpc.trace_id.as_str(), rpc.parent.as_str()), (trace, parent), "{rpc:?}");
    assert_eq!(rpc.service, "blotcdn");
    let inner = wait_for(&rx, "rpc", |g| g.name == "rpc" && g.attr("method") == Some("ResolveBatch")).await;
    assert_eq!(inner.trace_id, trace);
    assert_eq!(inner.attr("items"), Some("1"));
    assert_eq!(inner.attr("outcome"), Some("ok"));
    // The group commit of the Invalidate, with its fsync time.
    let commit = wait_for(&rx, "wal.commit", |g| g.name == "wal.commit").await;
    assert!(commit.attr("fsync_us").is_some() && commit.attr("records") == Some("1"), "{commit:?}");

    // An origin request, with the edge's traceparent.
    let t2 = "0af7651916cd43dd8448eb211c80319c";
    let path = common::path_of(&url);
    let tp = format!("traceparent: 00-{t2}-b7ad6b7169203331-01");
    let r = curl(&["-H", &tp, &format!("http://{}{}", server.http, path)]);
    assert_eq!(r.body, b"a{}");
    let http = wait_for(&rx, "origin", |g| g.name == "http" && g.trace_id == t2).await;
    assert_eq!(http.attr("http.route"), Some("versioned"));
    assert_eq!(http.attr("http.status_code"), Some("200"));
    assert_eq!(http.attr("source"), Some("disk"));
    assert_eq!(http.attr("bytes"), Some("3"));

    // A fallback fetch: its span is a child of the request's, and the origin
    // was sent the same trace.
    let t3 = "11111111111111111111111111111111";
    let tp = format!("traceparent: 00-{t3}-2222222222222222-01");
    let r = curl(&["-H", &tp, &format!("http://{}/tblog/legacy/old.png", server.http)]);
    assert_eq!((r.status, r.body.as_slice()), (200, &b"ok"[..]));
    let fetch = wait_for(&rx, "fallback", |g| g.name == "fallback" && g.trace_id == t3).await;
    assert_eq!(fetch.attr("origin"), Some(fallback.as_str()));
    let sent = seen.lock().unwrap().clone();
    assert!(sent.iter().any(|s| s.starts_with(&format!("00-{t3}-"))), "the fallback origin got {sent:?}");

    // A purge delivery: a span of its own, whose trace the target is sent.
    p.purge(pb::PurgeRequest { blog_id: "tblog".into(), keys: vec![] }).await.unwrap();
    let d = wait_for(&rx, "purge.deliver", |g| g.name == "purge.deliver").await;
    assert_eq!((d.attr("kind"), d.attr("keys")), (Some("http"), Some("1")), "{d:?}");
    // Named from its kind, host and port.
    assert_eq!(d.attr("purge.target"), Some(format!("http-127.0.0.1-{}", origin.port()).as_str()), "{d:?}");
    assert_eq!(d.attr("outcome"), Some("ok"), "{d:?}");
    let sent = seen.lock().unwrap().clone();
    assert!(sent.iter().any(|s| s.starts_with(&format!("00-{}-", d.trace_id))), "the purge target got {sent:?}");

    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    assert_eq!(server.child.wait().unwrap().code(), Some(0));

    // Spans still waiting at a SIGTERM are flushed before the process ends:
    // a server that would export only once a minute.
    let dir2 = tempfile::tempdir().unwrap();
    let mut server = ChildServer::spawn_with(
        dir2.path(),
        &[],
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "60000")],
    );
    let t4 = "33333333333333333333333333333333";
    let tp = format!("traceparent: 00-{t4}-4444444444444444-01");
    assert_eq!(curl(&["-H", &tp, &format!("http://{}/_ask?domain=x.example", server.http)]).status, 404);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!rx.0.lock().unwrap().iter().any(|g| g.trace_id == t4), "exported before the flush");
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    assert_eq!(server.child.wait().unwrap().code(), Some(0));
    wait_for(&rx, "last request before SIGTERM", |g| g.trace_id == t4).await;
}

/// A collector that is down: the exporter's error is logged at most once
/// every ten seconds, not once a batch (a hostile test counted about 40
/// lines a second under load from a collector answering garbage).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_down_costs_a_log_line_every_ten_seconds_not_one_a_batch() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("stdout.log");
    let closed = common::free_port();
    // The server's log, as a service manager keeps it.
    let mut cmd = std::process::Command::new("sh");
    cmd.args(["-c", &format!("exec \"$@\" > {}", log.display()), "sh"]).arg(common::binary()).arg("serve");
    cmd.arg("--data-dir").arg(&data);
    cmd.env("BLOTCDN_OTLP_ENDPOINT", format!("http://127.0.0.1:{closed}")).env("OTEL_BSP_SCHEDULE_DELAY", "50");
    let mut server = ChildServer::spawn_cmd(cmd, &data);
    // Spans for 4 s: a batch to export every 50 ms.
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        curl(&[&format!("http://{}/_ask?domain=x.example", server.http)]);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    server.child.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    let errors = text.lines().filter(|l| l.contains("ERROR") && l.contains("Export")).count();
    assert!((1..=2).contains(&errors), "{errors} export errors logged in 4 s:\n{text}");
}
