//! Memory stays bounded under a publish pipeline's normal work: the same
//! 10,000 paths invalidated again and again, through a size checkpoint.
//! Before the fix, sled's batch apply kept what each batch replaced and the
//! server grew by about 14 MB a batch, past a gigabyte in this test.

use crate::common;

use blotcdn::proto as pb;
use common::ChildServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_10k_path_invalidations_keep_memory_flat() {
    let dir = tempfile::tempdir().unwrap();
    let server = ChildServer::spawn(dir.path());
    let mut c = pb::publisher_client::PublisherClient::connect(format!("http://{}", server.grpc))
        .await
        .unwrap()
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let paths: Vec<String> =
        (0..10_000).map(|i| format!("/posts/{:05}/images/a-longer-file-name-like-real-ones.jpg", i)).collect();
    let round = |c: &mut pb::publisher_client::PublisherClient<_>| {
        let req = pb::InvalidateRequest { blog_id: "memblog".into(), paths: paths.clone() };
        let mut c = c.clone();
        async move { c.invalidate(req).await.unwrap().into_inner().cache_id }
    };
    let mut last = 0;
    for _ in 0..5 {
        last = round(&mut c).await;
    }
    let base = server.rss_bytes();
    // About 650 KB of log a round: 120 rounds pass the 64 MiB size checkpoint.
    let mut peak = base;
    for i in 0..120 {
        let id = round(&mut c).await;
        assert!(id > last, "cache ids increase");
        last = id;
        if i % 10 == 9 {
            peak = peak.max(server.rss_bytes());
        }
    }
    let end = server.rss_bytes();
    let mb = |b: u64| b as f64 / (1 << 20) as f64;
    eprintln!("RSS after warm-up {:.0} MB, peak {:.0} MB, end {:.0} MB", mb(base), mb(peak), mb(end));
    // The index holds 10,000 paths (a few MB); the log is read back one
    // record at a time at a checkpoint. 1.2 million path writes must not
    // cost more than a small multiple of one batch.
    assert!(
        peak < base + (120 << 20),
        "memory grew from {:.0} MB to {:.0} MB over 120 batches of 10,000 paths",
        mb(base),
        mb(peak)
    );

    // And every path kept its last version.
    let mut r = pb::resolver_client::ResolverClient::connect(format!("http://{}", server.grpc))
        .await
        .unwrap()
        .max_decoding_message_size(64 << 20);
    let got = r
        .resolve_batch(pb::ResolveBatchRequest { blog_id: "memblog".into(), paths: paths.clone() })
        .await
        .unwrap()
        .into_inner()
        .assets;
    assert_eq!(got.len(), 10_000);
    assert!(got.iter().all(|a| a.cache_id == last), "every path at the last acknowledged version");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_floor_raise_drops_the_path_versions_it_made_meaningless() {
    use blotcdn::proto::put_asset_chunk::Chunk;
    let s = common::Server::start().await;
    let paths: Vec<String> = (0..5000).map(|i| format!("/posts/{i}.html")).collect();
    let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
    common::invalidate(&s, "prune", &refs).await;
    let mut p = s.publisher().await;
    let header = pb::PutAssetHeader {
        blog_id: "prune".into(),
        filename: "logo.png".into(),
        path: "/logo.png".into(),
        ..Default::default()
    };
    let chunks = vec![
        pb::PutAssetChunk { chunk: Some(Chunk::Header(header)) },
        pb::PutAssetChunk { chunk: Some(Chunk::Data(bytes::Bytes::from_static(b"png"))) },
    ];
    let logo = p.put_asset(tokio_stream::iter(chunks)).await.unwrap().into_inner();
    let count = |s: &common::Server| {
        let s = s.grpc;
        async move {
            let mut r = pb::resolver_client::ResolverClient::connect(format!("http://{s}")).await.unwrap();
            r.get_blog(pb::GetBlogRequest { blog_id: "prune".into() }).await.unwrap().into_inner()
        }
    };
    assert_eq!(count(&s).await.path_count, 5001);
    let floor = common::invalidate(&s, "prune", &[]).await;
    let after = count(&s).await;
    assert_eq!((after.path_count, after.cache_id), (1, floor), "only the bound path is left");
    // What they resolve to is unchanged: the floor, and the permanent URL.
    let got = common::resolve(&s, "prune", &["/posts/7.html", "/logo.png"]).await;
    assert_eq!(got[0].cache_id, floor);
    assert_eq!(got[1].url, logo.url);
    // And on disk: a restart (log replay, then sled) gives the same.
    let dir = s.stop().await;
    let s = common::Server::start_in(dir, |_| {}).await;
    assert_eq!(count(&s).await.path_count, 1);
    let got = common::resolve(&s, "prune", &["/posts/7.html", "/logo.png"]).await;
    // (The restarted server listens on another port: compare the URL's path.)
    assert_eq!((got[0].cache_id, common::path_of(&got[1].url)), (floor, common::path_of(&logo.url)));
    s.stop().await;
}

/// A server with `budget` bytes of request memory (`grpc_memory_bytes`).
fn with_budget(dir: &std::path::Path, budget: u64) -> ChildServer {
    ChildServer::spawn_with(dir, &[], &[("BLOTCDN_GRPC_MEMORY_BYTES", budget.to_string().as_str())])
}

/// A renderer's calls are small; a batch of 10,000 long paths is 10 MB, and
/// its answer more. Before the server-wide budget, each connection could
/// have `max_in_flight` of them decoding and answering at once: 96 calls of
/// 4 MB took the server from 72 MB to 423 MB. Now a large call past the
/// budget is refused at once, naming it, the caller retries, and every call
/// is answered in the end (one at a time here); a renderer's small calls
/// meanwhile are never refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_large_batches_at_once_stay_within_the_servers_request_memory_budget() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let budget = 64u64 << 20;
    let server = with_budget(dir.path(), budget);
    // 4,000 paths of 1,000 bytes: a 4 MB request, weighed at 16 MB.
    let paths: Arc<Vec<String>> = Arc::new((0..4000).map(|i| format!("/{i:05}/{}", "x".repeat(993))).collect());
    let mut clients = Vec::new();
    for _ in 0..7 {
        let mut c = pb::resolver_client::ResolverClient::connect(format!("http://{}", server.grpc))
            .await
            .unwrap()
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        c.resolve_batch(pb::ResolveBatchRequest { blog_id: "big".into(), paths: vec!["/a.css".into()] }).await.unwrap();
        clients.push(c);
    }
    let base = server.rss_bytes();
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (done, pid) = (done.clone(), server.child.id());
        std::thread::spawn(move || {
            let mut peak = 0;
            while !done.load(Ordering::Relaxed) {
                peak = peak.max(common::rss_of(pid));
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            peak
        })
    };
    // A renderer on a connection of its own, resolving a page at a time.
    let renderer = {
        let (done, mut c) = (done.clone(), clients[0].clone());
        tokio::spawn(async move {
            let mut pages = 0;
            while !done.load(Ordering::Relaxed) {
                let page = pb::ResolveBatchRequest { blog_id: "big".into(), paths: vec!["/style.css".into(); 20] };
                let got = c.resolve_batch(page).await.expect("a renderer's page is never refused");
                assert_eq!(got.into_inner().assets.len(), 20);
                pages += 1;
            }
            pages
        })
    };
    let refused = Arc::new(AtomicUsize::new(0));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let mut calls = tokio::task::JoinSet::new();
    for c in &clients[1..] {
        for _ in 0..8 {
            let (mut c, paths, refused) = (c.clone(), paths.clone(), refused.clone());
            calls.spawn(async move {
                loop {
                    let req = pb::ResolveBatchRequest { blog_id: "big".into(), paths: paths.to_vec() };
                    match c.resolve_batch(req).await {
                        Ok(r) => return r.into_inner().assets.len(),
                        Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                            assert!(s.message().contains("grpc_memory_bytes"), "{s:?}");
                            refused.fetch_add(1, Ordering::Relaxed);
                            assert!(std::time::Instant::now() < deadline, "a large call was refused for 2 minutes");
                            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        }
                        Err(s) => panic!("{s:?}"),
                    }
                }
            });
        }
    }
    let mut answered = 0;
    while let Some(n) = calls.join_next().await {
        assert_eq!(n.unwrap(), 4000);
        answered += 1;
    }
    done.store(true, Ordering::Relaxed);
    let pages = renderer.await.unwrap();
    let peak = sampler.join().unwrap();
    let mb = |b: u64| b as f64 / (1 << 20) as f64;
    let refused = refused.load(Ordering::Relaxed);
    eprintln!(
        "{answered} calls of 4 MB ({refused} refusals retried), {pages} pages: RSS {:.0} MB before, peak {:.0} MB",
        mb(base),
        mb(peak)
    );
    assert_eq!(answered, 48);
    assert!(refused > 0, "the budget never refused a call: the test did not fill it");
    assert!(pages > 0);
    // The budget, with room for the allocator and the connections' buffers.
    assert!(
        peak < base + budget + (96 << 20),
        "48 large batches took the server from {:.0} MB to {:.0} MB, past its {:.0} MB budget",
        mb(base),
        mb(peak),
        mb(budget)
    );
}

/// Raw HTTP/2 calls to `method` on one connection that grants the server
/// no window: their answers' bodies can never be sent. Each call's body is
/// `body` (sent whole, or left open after it if `finish` is false).
struct Unread {
    answers: Vec<h2::client::ResponseFuture>,
    /// The answers whose heads came, kept: dropped, each would cancel its
    /// stream (and the server would drop the answer).
    heads: Vec<http::Response<h2::RecvStream>>,
    /// Kept open: a call whose body is not finished.
    bodies: Vec<h2::SendStream<bytes::Bytes>>,
    connection: tokio::task::JoinHandle<Result<(), h2::Error>>,
}

impl Unread {
    async fn start(addr: std::net::SocketAddr, method: &str, body: bytes::Bytes, calls: usize, finish: bool) -> Unread {
        Self::with_window(addr, method, body, calls, finish, 0).await
    }

    /// The same, granting each stream `window` bytes, never given back.
    async fn with_window(
        addr: std::net::SocketAddr,
        method: &str,
        body: bytes::Bytes,
        calls: usize,
        finish: bool,
        window: u32,
    ) -> Unread {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (client, conn) = h2::client::Builder::new().initial_window_size(window).handshake(tcp).await.unwrap();
        let connection = tokio::spawn(conn);
        let (mut answers, mut bodies) = (Vec::new(), Vec::new());
        for _ in 0..calls {
            let mut c = client.clone().ready().await.unwrap();
            let call = grpc_request(addr, &format!("blotcdn.v1.{method}"));
            let (answer, mut stream) = c.send_request(call, false).unwrap();
            // An empty body left open: the headers alone.
            if finish || !body.is_empty() {
                stream.send_data(body.clone(), finish).unwrap();
            }
            answers.push(answer);
            if !finish {
                bodies.push(stream);
            }
        }
        Unread { answers, heads: Vec::new(), bodies, connection }
    }

    /// How many were refused for the budget (a refusal is a head alone; the
    /// others' heads come, their bodies never can).
    async fn refused(&mut self) -> usize {
        let mut refused = 0;
        for answer in self.answers.iter_mut() {
            let head = tokio::time::timeout(std::time::Duration::from_secs(30), answer).await.unwrap().unwrap();
            if head.headers().get("grpc-status").and_then(|v| v.to_str().ok()) == Some("8") {
                let message = head.headers().get("grpc-message").unwrap().to_str().unwrap().to_owned();
                assert!(message.contains("grpc_memory_bytes"), "{message}");
                refused += 1;
            }
            self.heads.push(head);
        }
        refused
    }

    fn close(self) {
        drop((self.answers, self.heads, self.bodies));
        self.connection.abort();
    }
}

/// The head of a raw gRPC call to `path` (`package.Service/Method`).
fn grpc_request(addr: std::net::SocketAddr, path: &str) -> http::Request<()> {
    http::Request::post(format!("http://{addr}/{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
}

/// One gRPC message, framed.
fn framed(m: &impl prost::Message) -> bytes::Bytes {
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(m.encoded_len() as u32).to_be_bytes());
    m.encode(&mut framed).unwrap();
    framed.into()
}

/// A caller that sends calls and never reads their answers (it grants the
/// server no HTTP/2 window) holds them in the server until its connection
/// is cut. Before, the answers were built and held whatever their size: a
/// hostile client held 2.16 GB with one connection of 1,000 small batches
/// whose answers (a URL for each of 10,000 short paths) are a hundred times
/// the request, then 2.1 GB with GetBlog of a blog with 40,000 domains (a
/// blog has 1,000 at most now), and
/// 700 MB with paths bound to an asset with a 255-byte file name. Now each
/// answer is weighed before it is held: past the budget, calls are refused,
/// and a renderer's pages still resolve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_that_never_read_their_answers_hold_no_more_than_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let budget = 64u64 << 20;
    let server = with_budget(dir.path(), budget);
    let grpc = format!("http://{}", server.grpc);
    let mut renderer = pb::resolver_client::ResolverClient::connect(grpc.clone()).await.unwrap();
    let page = || pb::ResolveBatchRequest { blog_id: "stall".into(), paths: vec!["/style.css".into(); 20] };
    renderer.resolve_batch(page()).await.unwrap();
    // A blog with its most domains, 1,000 of about 250 bytes: a GetBlog
    // answer of 250 KB.
    let publisher = pb::publisher_client::PublisherClient::connect(grpc.clone()).await.unwrap();
    publisher.clone().invalidate(pb::InvalidateRequest { blog_id: "stall".into(), paths: vec![] }).await.unwrap();
    let mut sets = tokio::task::JoinSet::new();
    let at_once = std::sync::Arc::new(tokio::sync::Semaphore::new(256));
    for i in 0..1000 {
        let (mut p, at_once) = (publisher.clone(), at_once.clone());
        let domain = format!("{}.{i:05}{}.{}.example", "d".repeat(60), "x".repeat(55), "y".repeat(60));
        sets.spawn(async move {
            let _slot = at_once.acquire().await.unwrap();
            p.set_domain(pb::SetDomainRequest { domain, blog_id: "many".into() }).await
        });
    }
    while let Some(r) = sets.join_next().await {
        r.unwrap().unwrap();
    }
    let more = pb::SetDomainRequest { domain: "one-more.example".into(), blog_id: "many".into() };
    let e = publisher.clone().set_domain(more).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{}", e.message());
    assert!(e.message().contains("1000"), "{}", e.message());
    // Nor do many at once get past it together.
    let mut p = publisher.clone();
    p.remove_domain(pb::RemoveDomainRequest {
        domain: format!("{}.00000{}.{}.example", "d".repeat(60), "x".repeat(55), "y".repeat(60)),
    })
    .await
    .unwrap();
    let mut sets = tokio::task::JoinSet::new();
    for i in 0..50 {
        let mut p = publisher.clone();
        sets.spawn(async move {
            p.set_domain(pb::SetDomainRequest { domain: format!("at-once-{i}.example"), blog_id: "many".into() }).await
        });
    }
    let mut taken = 0;
    while let Some(r) = sets.join_next().await {
        taken += r.unwrap().is_ok() as usize;
    }
    let blog = pb::resolver_client::ResolverClient::connect(grpc.clone()).await.unwrap();
    let domains =
        blog.clone().get_blog(pb::GetBlogRequest { blog_id: "many".into() }).await.unwrap().into_inner().domains;
    assert_eq!((taken, domains.len()), (1, 1000), "50 SetDomains at once on a blog one short of its cap");
    // A path bound to an asset named with 254 bytes that each encode to three.
    let mut p = publisher.clone();
    let header = pb::PutAssetHeader {
        blog_id: "perm".into(),
        filename: format!("{}x", "!".repeat(254)),
        path: "/a".into(),
        ..Default::default()
    };
    let chunks = vec![
        pb::PutAssetChunk { chunk: Some(pb::put_asset_chunk::Chunk::Header(header)) },
        pb::PutAssetChunk { chunk: Some(pb::put_asset_chunk::Chunk::Data(bytes::Bytes::from_static(b"x"))) },
    ];
    p.put_asset(tokio_stream::iter(chunks)).await.unwrap();
    let base = server.rss_bytes();
    let mb = |b: u64| b as f64 / (1 << 20) as f64;

    // 10,000 paths of a few bytes: a 40 KB request, a 1 MB answer or more.
    let short =
        pb::ResolveBatchRequest { blog_id: "stall".into(), paths: (0..10_000).map(|i| format!("/{i}")).collect() };
    let bound = pb::ResolveBatchRequest { blog_id: "perm".into(), paths: vec!["/a".into(); 10_000] };
    let get_blog = pb::GetBlogRequest { blog_id: "many".into() };
    for (what, method, body) in [
        ("short paths", "Resolver/ResolveBatch", framed(&short)),
        ("a bound path", "Resolver/ResolveBatch", framed(&bound)),
        ("GetBlog", "Resolver/GetBlog", framed(&get_blog)),
    ] {
        let mut held = Vec::new();
        let mut refused = 0;
        for _ in 0..2 {
            let mut u = Unread::start(server.grpc, method, body.clone(), 150, true).await;
            refused += u.refused().await;
            held.push(u);
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let holding = server.rss_bytes();
        eprintln!(
            "{what}: 300 unread answers ({refused} refused): RSS {:.0} MB before, {:.0} MB held",
            mb(base),
            mb(holding)
        );
        assert!(refused > 100, "{what}: only {refused} of 300 calls were refused: their answers are held");
        assert!(
            holding < base + budget + (64 << 20),
            "{what}: callers that never read took the server from {:.0} MB to {:.0} MB, past its {:.0} MB budget",
            mb(base),
            mb(holding),
            mb(budget)
        );
        // A renderer's page still resolves.
        let got = renderer.resolve_batch(page()).await.expect("a page while the budget is held");
        assert_eq!(got.into_inner().assets.len(), 20);
        // Gone with their connections, the held answers give their room
        // back: a call of the same kind is answered again.
        held.into_iter().for_each(Unread::close);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let mut u = Unread::start(server.grpc, method, body.clone(), 1, true).await;
            let refused = u.refused().await;
            u.close();
            if refused == 0 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: the room of closed connections' calls never came back"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

/// A caller that declares a large request and sends only its first bytes
/// holds the room such a request takes for 10 s at most, then its call is
/// cut: before, five bytes locked every large call out of the server for as
/// long as the connection lived (a connection that answers pings lives
/// ten minutes). A renderer's page goes on meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_not_sent_whole_and_ended_is_cut_and_gives_its_room_back() {
    let dir = tempfile::tempdir().unwrap();
    // Room for one large call at a time.
    let server = with_budget(dir.path(), 128 << 20);
    let grpc = format!("http://{}", server.grpc);
    let mut c = pb::resolver_client::ResolverClient::connect(grpc).await.unwrap().max_decoding_message_size(64 << 20);
    // 16 MiB declared, 5 bytes sent.
    let mut holder =
        Unread::start(server.grpc, "Resolver/ResolveBatch", bytes::Bytes::from_static(&[0, 1, 0, 0, 0]), 1, false)
            .await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    let large = pb::ResolveBatchRequest {
        blog_id: "b".into(),
        paths: (0..4000).map(|i| format!("/{i:04}/{}", "y".repeat(995))).collect(),
    };
    let e = c.resolve_batch(large.clone()).await.map(|_| ()).expect_err("the room is held");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{}", e.message());
    let page = pb::ResolveBatchRequest { blog_id: "b".into(), paths: vec!["/style.css".into(); 50] };
    assert_eq!(c.resolve_batch(page).await.unwrap().into_inner().assets.len(), 50);
    // Cut within its 10 s, and the room comes back.
    let head = tokio::time::timeout(std::time::Duration::from_secs(15), &mut holder.answers[0]).await;
    let head = head.expect("the holder's call is cut").unwrap();
    let status = head.headers().get("grpc-status").and_then(|v| v.to_str().ok());
    assert_eq!(status, Some("8"), "{:?}", head.headers());
    let wait_for_room = |c: &mut pb::resolver_client::ResolverClient<tonic::transport::Channel>| {
        let (mut c, large) = (c.clone(), large.clone());
        async move {
            let started = std::time::Instant::now();
            loop {
                match c.resolve_batch(large.clone()).await {
                    Ok(r) => break assert_eq!(r.into_inner().assets.len(), 4000),
                    Err(e) => assert!(started.elapsed() < std::time::Duration::from_secs(15), "{}", e.message()),
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    };
    wait_for_room(&mut c).await;
    assert!(started.elapsed() < std::time::Duration::from_secs(15));
    holder.close();

    // Whole messages on streams that never end: tonic waits for the end
    // before the handler runs, so they held their room as long as the
    // connection lived. They too are cut.
    let short = pb::ResolveBatchRequest { blog_id: "b".into(), paths: vec!["a".into(); 10_000] };
    let mut holders = Unread::start(server.grpc, "Resolver/ResolveBatch", framed(&short), 12, false).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let e = c.resolve_batch(large.clone()).await.map(|_| ()).expect_err("the room is held");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{}", e.message());
    let started = std::time::Instant::now();
    wait_for_room(&mut c).await;
    assert!(started.elapsed() < std::time::Duration::from_secs(15));
    assert!(holders.refused().await > 0);
    holders.close();

    // A second message after the one a unary call takes is refused at once,
    // not buffered (up to 16 MiB) first.
    let twice = [framed(&short), framed(&short)].concat();
    let mut u = Unread::start(server.grpc, "Resolver/ResolveBatch", twice.into(), 1, true).await;
    let head = tokio::time::timeout(std::time::Duration::from_secs(5), &mut u.answers[0]).await.unwrap().unwrap();
    assert_eq!(head.headers().get("grpc-status").and_then(|v| v.to_str().ok()), Some("3"), "{:?}", head.headers());
    u.close();
}

/// Calls that send their headers and nothing more. Nothing bounded them:
/// not `max_in_flight` per connection (1,024), not the request memory
/// (weighed at a body's first bytes), and the 10 s a body has counted from
/// those bytes; each took about 14 KB of the server, so 50 connections of
/// 1,000 took it to 800 MB, with health calls as well. Now each call holds
/// room from its start (past the budget: refused at once), and a weighed
/// call's body has 10 s from its start to arrive whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_that_send_only_their_headers_are_bounded_and_cut() {
    let dir = tempfile::tempdir().unwrap();
    let budget: u64 = 16 << 20;
    let server = with_budget(dir.path(), budget);
    let grpc = format!("http://{}", server.grpc);
    let mut c = pb::resolver_client::ResolverClient::connect(grpc).await.unwrap();
    let page = pb::ResolveBatchRequest { blog_id: "b".into(), paths: vec!["/style.css".into(); 20] };
    c.resolve_batch(page.clone()).await.unwrap();
    let base = server.rss_bytes();
    let mut held = Vec::new();
    for method in ["Resolver/ResolveBatch", "Resolver/GetInfo", "Publisher/Invalidate"] {
        for _ in 0..2 {
            held.push(Unread::with_window(server.grpc, method, bytes::Bytes::new(), 1000, false, 65_535).await);
        }
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let grown = server.rss_bytes().saturating_sub(base);
    // 6,000 calls at 14 KB or more each: about 85 MB unbounded.
    assert!(grown < budget + (24 << 20), "6,000 calls of headers alone took {} MB", grown >> 20);
    // Past the budget refused at once, naming it; the others cut within
    // 10 s of their start. Their room comes back, and a page is answered.
    let started = std::time::Instant::now();
    for h in &mut held {
        let n = h.refused().await;
        assert_eq!(n, h.answers.len(), "every weighed call is refused or cut (RESOURCE_EXHAUSTED)");
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(15), "cut after {:?}", started.elapsed());
    for h in held {
        h.close();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match c.resolve_batch(page.clone()).await {
            Ok(r) => break assert_eq!(r.into_inner().assets.len(), 20),
            Err(e) => assert!(std::time::Instant::now() < deadline, "{}", e.message()),
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Health calls need no token. Held open (a first byte and no more, or a
/// Watch, which is meant to stay open), they took room in the request
/// memory as the renderers' calls do, and a client without a token could
/// fill it: every renderer's call was refused until its connections aged
/// out (ten minutes). Now health and reflection calls have slots of their
/// own (256 at once, 32 from one client address; past them refused, naming
/// them), the renderer's calls go on, a load balancer on another address is
/// answered, and a call whose first message is not whole in 10 s is cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_calls_held_open_take_nothing_from_the_renderers() {
    let dir = tempfile::tempdir().unwrap();
    let server = with_budget(dir.path(), 16 << 20);
    let mut c = pb::resolver_client::ResolverClient::connect(format!("http://{}", server.grpc)).await.unwrap();
    let page = pb::ResolveBatchRequest { blog_id: "b".into(), paths: vec!["/style.css".into(); 20] };
    let tcp = tokio::net::TcpStream::connect(server.grpc).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    let health_conn = tokio::spawn(conn);
    let mut calls = Vec::new();
    for i in 0..1100 {
        let mut h = client.clone().ready().await.unwrap();
        let watch = i < 100;
        let method = if watch { "Watch" } else { "Check" };
        let call = grpc_request(server.grpc, &format!("grpc.health.v1.Health/{method}"));
        let (answer, mut body) = h.send_request(call, false).unwrap();
        // A Watch's whole request (an empty message); a Check's first byte.
        // (A call refused at its headers may be closed before its body goes.)
        let _ = match watch {
            true => body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true),
            false => body.send_data(bytes::Bytes::from_static(&[0]), false),
        };
        calls.push((answer, body));
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    // The renderer is answered, call after call.
    for _ in 0..20 {
        let r = c.resolve_batch(page.clone()).await;
        assert_eq!(r.unwrap_or_else(|e| panic!("{}", e.message())).into_inner().assets.len(), 20);
    }
    // Past 256, refused at once, naming why; the Checks held are cut within
    // 10 s of their start.
    let (mut refused, mut cut, mut share) = (0, 0, 0);
    let started = std::time::Instant::now();
    for (answer, _) in calls.iter_mut().skip(100) {
        let head = tokio::time::timeout(std::time::Duration::from_secs(15), answer).await;
        let head = head.expect("a Check held open is answered").unwrap();
        assert_eq!(head.headers().get("grpc-status").and_then(|v| v.to_str().ok()), Some("8"));
        // (Percent-encoded, as gRPC sends it.)
        let message = head.headers().get("grpc-message").unwrap().to_str().unwrap().replace("%20", " ");
        share += usize::from(message.contains("from 127.0.0.1 are open at once"));
        match message.contains("health and reflection calls") {
            true => refused += 1,
            false => cut += 1,
        }
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(15), "cut after {:?}", started.elapsed());
    assert_eq!(refused + cut, 1000);
    assert!(refused >= 1000 - 256, "{refused} refused, {cut} cut");
    assert!(share > 0, "none refused for the client's share: {refused} refused, {cut} cut");

    // One client address holds at most 32 of the slots: while these Watches
    // stay open, a load balancer from another address is answered.
    let lb = |ip: &'static str| {
        let grpc = server.grpc;
        async move {
            let sock = tokio::net::TcpSocket::new_v4().unwrap();
            sock.bind(format!("{ip}:0").parse().unwrap()).unwrap();
            let tcp = sock.connect(grpc).await.unwrap();
            let (client, conn) = h2::client::handshake(tcp).await.unwrap();
            let task = tokio::spawn(conn);
            let mut h = client.ready().await.unwrap();
            let call = grpc_request(grpc, "grpc.health.v1.Health/Check");
            let (answer, mut body) = h.send_request(call, false).unwrap();
            body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true).unwrap();
            let head = tokio::time::timeout(std::time::Duration::from_secs(5), answer).await.unwrap().unwrap();
            let status = head.headers().get("grpc-status").map(|v| v.to_str().unwrap().to_owned());
            let mut body = head.into_body();
            while body.data().await.is_some() {}
            let trailers = body.trailers().await.unwrap().unwrap_or_default();
            task.abort();
            status.or_else(|| trailers.get("grpc-status").map(|v| v.to_str().unwrap().to_owned()))
        }
    };
    assert_eq!(lb("127.0.0.2").await.as_deref(), Some("0"), "another address's health check");
    drop(calls);
    health_conn.abort();
}

/// Watches held open from nine client addresses, 32 each (each address's
/// share): they took all 256 slots, and a load balancer's health Check from
/// a tenth address was refused. Streams now hold at most 192, the rest kept
/// for Checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_held_open_from_many_addresses_leave_room_for_health_checks() {
    let dir = tempfile::tempdir().unwrap();
    let server = ChildServer::spawn(dir.path());
    let connect = |ip: String| {
        let grpc = server.grpc;
        async move {
            let sock = tokio::net::TcpSocket::new_v4().unwrap();
            sock.bind(format!("{ip}:0").parse().unwrap()).unwrap();
            let (client, conn) = h2::client::handshake(sock.connect(grpc).await.unwrap()).await.unwrap();
            (client, tokio::spawn(conn))
        }
    };
    // Each call's answer: its status when it ended at once (refused), None
    // when it stays open (a Watch taken), or its status at the end (a Check).
    async fn call(
        client: &h2::client::SendRequest<bytes::Bytes>,
        grpc: std::net::SocketAddr,
        method: &str,
    ) -> (Option<String>, h2::RecvStream) {
        let mut h = client.clone().ready().await.unwrap();
        let (answer, mut body) =
            h.send_request(grpc_request(grpc, &format!("grpc.health.v1.Health/{method}")), false).unwrap();
        // A call refused at its headers may be closed before its body goes.
        let _ = body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true);
        let head = tokio::time::timeout(std::time::Duration::from_secs(10), answer).await.expect("answered").unwrap();
        let status = head.headers().get("grpc-status").map(|v| v.to_str().unwrap().to_owned());
        (status, head.into_body())
    }
    let (mut held, mut refused, mut conns) = (Vec::new(), 0, Vec::new());
    for host in 2..=10 {
        let (client, task) = connect(format!("127.0.0.{host}")).await;
        for _ in 0..32 {
            match call(&client, server.grpc, "Watch").await {
                (None, body) => held.push(body),
                (Some(status), _) => {
                    assert_eq!(status, "8");
                    refused += 1;
                }
            }
        }
        conns.push((client, task));
    }
    assert_eq!((held.len(), refused), (192, 96), "Watches held and refused");
    // A Check from another address is answered, serving.
    let (client, task) = connect("127.0.0.11".into()).await;
    let (status, mut body) = call(&client, server.grpc, "Check").await;
    let status = match status {
        Some(s) => s,
        None => {
            while body.data().await.is_some() {}
            let trailers = body.trailers().await.unwrap().unwrap_or_default();
            trailers.get("grpc-status").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default()
        }
    };
    assert_eq!(status, "0", "a Check beside 192 held Watches");
    task.abort();
    drop(held);
    for (_, task) in conns {
        task.abort();
    }
}

/// Health and reflection requests are a name: a message of up to 4 MiB
/// (tonic's default) on each of their 256 slots held 1.2 GB. Now one over
/// 16 KiB is refused as its length arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_health_or_reflection_message_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = ChildServer::spawn(dir.path());
    for (path, len) in [
        ("grpc.health.v1.Health/Check", 20_000u32),
        ("grpc.reflection.v1.ServerReflection/ServerReflectionInfo", 4 << 20),
    ] {
        let tcp = tokio::net::TcpStream::connect(server.grpc).await.unwrap();
        let (client, conn) = h2::client::handshake(tcp).await.unwrap();
        let task = tokio::spawn(conn);
        let mut h = client.ready().await.unwrap();
        let call = grpc_request(server.grpc, path);
        let (answer, mut body) = h.send_request(call, false).unwrap();
        // The prefix declares the length; a few bytes of it follow, no more.
        let mut prefix = vec![0u8];
        prefix.extend_from_slice(&len.to_be_bytes());
        prefix.extend_from_slice(&[0; 100]);
        body.send_data(prefix.into(), false).unwrap();
        let head = tokio::time::timeout(std::time::Duration::from_secs(5), answer).await.expect("answered").unwrap();
        let in_head = head.headers().get("grpc-status").map(|v| v.to_str().unwrap().to_owned());
        let mut rest = head.into_body();
        let status = match in_head {
            Some(s) => s,
            None => {
                while tokio::time::timeout(std::time::Duration::from_secs(5), rest.data()).await.unwrap().is_some() {}
                let t = rest.trailers().await.unwrap().unwrap_or_default();
                t.get("grpc-status").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default()
            }
        };
        // Refused as its length arrived: it ends now, not once 4 MiB came.
        // (Reflection ends its stream as done; a health check says why.)
        if path.contains("Health") {
            assert!(status != "0" && !status.is_empty(), "{path}: status {status:?}");
        }
        task.abort();
    }
}

/// A client that stops taking its answers (here: it grants no HTTP/2
/// window) held their room for as long as its connection lived, ten minutes
/// with the default age and grace, and every large call meanwhile was
/// refused. Now, once a call is refused for want of room, a connection
/// holding an answer not taken for 10 s is cut: the refused caller's retry
/// is answered. Within those 10 s it is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_does_not_take_its_answers_is_cut_when_its_room_is_wanted() {
    let dir = tempfile::tempdir().unwrap();
    let server = with_budget(dir.path(), 64 << 20);
    let grpc = format!("http://{}", server.grpc);
    let mut c =
        pb::resolver_client::ResolverClient::connect(grpc.clone()).await.unwrap().max_decoding_message_size(64 << 20);
    let mut publisher = pb::publisher_client::PublisherClient::connect(grpc).await.unwrap();
    publisher.invalidate(pb::InvalidateRequest { blog_id: "stall".into(), paths: vec![] }).await.unwrap();
    // An answer of about 400 KB.
    let short =
        pb::ResolveBatchRequest { blog_id: "stall".into(), paths: (0..10_000).map(|i| format!("/{i}")).collect() };
    assert_eq!(c.resolve_batch(short.clone()).await.unwrap().into_inner().assets.len(), 10_000);
    // Connections of ten calls each (most refused: each is weighed at the
    // most its answer can take, then settled to what it took), until their
    // held answers leave no room for one more such call. Each stream has
    // HTTP/2's default window (64 KiB), never given back: before, h2 took
    // the rest of each answer into its queue, whole, and the room was given
    // back at once (150 such answers of 2 MB: 600 MB, none of it weighed).
    let mut stuck = Vec::new();
    let e = loop {
        let mut u = Unread::with_window(server.grpc, "Resolver/ResolveBatch", framed(&short), 10, true, 65_535).await;
        let held = 10 - u.refused().await;
        stuck.push((u, held));
        match c.resolve_batch(short.clone()).await {
            Ok(_) => assert!(stuck.len() < 100, "100 connections of unread answers and still room"),
            Err(e) => break e,
        }
    };
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{}", e.message());
    let started = std::time::Instant::now();
    // Refusals within the 10 s leave the connection be.
    tokio::time::sleep(std::time::Duration::from_secs(8)).await;
    let e = c.resolve_batch(short.clone()).await.map(|_| ()).expect_err("the room is still held");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{}", e.message());
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(stuck.iter().all(|(u, _)| !u.connection.is_finished()), "cut before its answers had waited 10 s");
    // Past them, a refusal cuts it, and a retry is answered.
    tokio::time::sleep(std::time::Duration::from_secs(10).saturating_sub(started.elapsed())).await;
    let answered = loop {
        match c.resolve_batch(short.clone()).await {
            Ok(r) => break r.into_inner(),
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{}", e.message());
                assert!(started.elapsed() < std::time::Duration::from_secs(20), "the room never came back");
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(answered.assets.len(), 10_000);
    // Those holding answers are closed; those whose calls were all refused
    // hold nothing, and are left open.
    let holding = stuck.iter().filter(|(_, held)| *held > 0).count();
    assert!(holding > 0);
    for (u, held) in stuck {
        let ended = tokio::time::timeout(std::time::Duration::from_secs(5), u.connection).await;
        assert_eq!(ended.is_ok(), held > 0, "a connection holding {held} answers: closed {}", ended.is_ok());
    }
}
