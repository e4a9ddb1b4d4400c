//! The gRPC API through the generated client against the real server.

use crate::common;

use blotcdn::proto::{self as pb, ResolveStatus};
use common::{invalidate, resolve, Server};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blog_wide_and_per_path_invalidation() {
    let s = Server::start().await;
    let base = format!("http://{}", s.http);

    let floor = invalidate(&s, "blog1", &[]).await;
    let a = resolve(&s, "blog1", &["/style.css", "script.js", "/a b/ü.png"]).await;
    assert_eq!(a.len(), 3);
    assert!(a.iter().all(|x| x.status == ResolveStatus::Ok as i32 && x.cache_id == floor));
    assert_eq!(a[0].url, format!("{base}/blog1/{floor}/style.css"));
    assert_eq!(a[1].url, format!("{base}/blog1/{floor}/script.js"), "leading / added");
    assert_eq!(a[2].url, format!("{base}/blog1/{floor}/a%20b/%C3%BC.png"));

    // Per path: only the named path changes URL.
    let v = invalidate(&s, "blog1", &["/style.css"]).await;
    assert!(v > floor);
    let b = resolve(&s, "blog1", &["/style.css", "/script.js"]).await;
    assert_eq!(b[0].url, format!("{base}/blog1/{v}/style.css"));
    assert_eq!(b[0].cache_id, v);
    assert_eq!(b[1].url, a[1].url, "an untouched path keeps its URL");

    // Blog-wide: everything moves, to at least the newest version.
    let floor2 = invalidate(&s, "blog1", &[]).await;
    assert!(floor2 > v);
    let c = resolve(&s, "blog1", &["/style.css", "/script.js"]).await;
    assert_eq!(c[0].cache_id, floor2);
    assert_eq!(c[1].cache_id, floor2);

    // Other blogs are untouched.
    let other = resolve(&s, "blog2", &["/style.css"]).await;
    assert_eq!(other[0].status, ResolveStatus::UnknownBlog as i32);

    let mut r = s.resolver().await;
    let blog = r.get_blog(pb::GetBlogRequest { blog_id: "blog1".into() }).await.unwrap().into_inner();
    assert_eq!(blog.cache_id, floor2);
    // The floor rose past /style.css's version: the index no longer holds it.
    assert_eq!(blog.path_count, 0);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_ids_strictly_increase() {
    let s = Server::start().await;
    let mut last = 0;
    for i in 0..50 {
        let id = invalidate(&s, "fast", if i % 2 == 0 { &[] } else { &["/x"] }).await;
        assert!(id > last, "{id} after {last}");
        last = id;
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_items_do_not_fail_the_batch() {
    let s = Server::start().await;
    invalidate(&s, "b", &[]).await;
    let long = format!("/{}", "x".repeat(1024));
    // Hidden files (a segment from a dot) are never served: no URL for them.
    let items = [
        "/ok.css",
        "/../etc/passwd",
        "/a//b",
        "/a\\b",
        "/nul\0",
        long.as_str(),
        "/",
        "/also/ok.js",
        "/..x.txt",
        "/a/.env",
    ];
    let a = resolve(&s, "b", &items).await;
    assert_eq!(a.len(), items.len());
    let statuses: Vec<i32> = a.iter().map(|x| x.status).collect();
    let ok = ResolveStatus::Ok as i32;
    let bad = ResolveStatus::InvalidPath as i32;
    assert_eq!(statuses, vec![ok, bad, bad, bad, bad, bad, bad, ok, bad, bad]);
    assert!(a[1].url.is_empty());
    assert!(a[7].url.ends_with("/also/ok.js"));

    // Unknown blog: valid paths say so, invalid ones stay invalid.
    let u = resolve(&s, "nobody", &["/x.css", "/../y"]).await;
    assert_eq!(u[0].status, ResolveStatus::UnknownBlog as i32);
    assert_eq!(u[1].status, bad);

    // A bad blog id fails the call, naming it.
    let mut c = s.resolver().await;
    let e = c
        .resolve_batch(pb::ResolveBatchRequest { blog_id: "no/slash".into(), paths: vec!["/a".into()] })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("blog id"), "{}", e.message());

    // A bad path in Invalidate fails the call and changes nothing.
    let before = resolve(&s, "b", &["/ok.css"]).await[0].cache_id;
    let mut p = s.publisher().await;
    let e = p
        .invalidate(pb::InvalidateRequest { blog_id: "b".into(), paths: vec!["/ok.css".into(), "/../x".into()] })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("paths[1]"), "{}", e.message());
    assert_eq!(resolve(&s, "b", &["/ok.css"]).await[0].cache_id, before);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_over_max_batch() {
    let s = Server::start_with(|p| p.max_batch = Some(100)).await;
    invalidate(&s, "b", &[]).await;
    let paths: Vec<String> = (0..101).map(|i| format!("/f{i}.css")).collect();
    let mut c = s.resolver().await;
    let e = c.resolve_batch(pb::ResolveBatchRequest { blog_id: "b".into(), paths: paths.clone() }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("max_batch"), "{}", e.message());
    let ok = c
        .resolve_batch(pb::ResolveBatchRequest { blog_id: "b".into(), paths: paths[..100].to_vec() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.assets.len(), 100);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domains_set_lookup_remove() {
    let s = Server::start().await;
    let mut p = s.publisher().await;
    let mut r = s.resolver().await;
    p.set_domain(pb::SetDomainRequest { domain: "Example.COM".into(), blog_id: "b1".into() }).await.unwrap();
    p.set_domain(pb::SetDomainRequest { domain: "bücher.de".into(), blog_id: "b1".into() }).await.unwrap();
    let got = r.lookup_domain(pb::LookupDomainRequest { domain: "example.com".into() }).await.unwrap();
    assert_eq!(got.into_inner().blog_id, "b1");
    let got = r.lookup_domain(pb::LookupDomainRequest { domain: "xn--bcher-kva.de".into() }).await.unwrap();
    assert_eq!(got.into_inner().blog_id, "b1");
    let blog = r.get_blog(pb::GetBlogRequest { blog_id: "b1".into() }).await.unwrap().into_inner();
    assert_eq!(blog.domains, vec!["example.com".to_string(), "xn--bcher-kva.de".to_string()]);

    // One domain, one blog: moving it takes it from the first.
    p.set_domain(pb::SetDomainRequest { domain: "example.com".into(), blog_id: "b2".into() }).await.unwrap();
    let got = r.lookup_domain(pb::LookupDomainRequest { domain: "example.com".into() }).await.unwrap();
    assert_eq!(got.into_inner().blog_id, "b2");
    let blog = r.get_blog(pb::GetBlogRequest { blog_id: "b1".into() }).await.unwrap().into_inner();
    assert_eq!(blog.domains, vec!["xn--bcher-kva.de".to_string()]);

    p.remove_domain(pb::RemoveDomainRequest { domain: "example.com".into() }).await.unwrap();
    let e = r.lookup_domain(pb::LookupDomainRequest { domain: "example.com".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = p.remove_domain(pb::RemoveDomainRequest { domain: "example.com".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    let e =
        p.set_domain(pb::SetDomainRequest { domain: "http://x.com/".into(), blog_id: "b1".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("domain"), "{}", e.message());
    let e = r.get_blog(pb::GetBlogRequest { blog_id: "nope".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_guard_each_service() {
    let s = Server::start_with(|p| {
        p.resolver_tokens = Some(vec!["render-secret".into()]);
        p.publisher_tokens = Some(vec!["publish-secret".into(), "second".into()]);
    })
    .await;
    let ch = tonic::transport::Channel::from_shared(format!("http://{}", s.grpc)).unwrap().connect().await.unwrap();
    let with = |t: &'static str| {
        move |mut req: tonic::Request<()>| {
            if !t.is_empty() {
                req.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
            }
            Ok(req)
        }
    };
    let inv = || pb::InvalidateRequest { blog_id: "guarded".into(), paths: vec![] };

    // Missing and wrong tokens: refused, and nothing changed.
    for t in ["", "wrong", "render-secret"] {
        let mut p = pb::publisher_client::PublisherClient::with_interceptor(ch.clone(), with(t));
        let e = p.invalidate(inv()).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "token {t:?}");
    }
    let mut r = pb::resolver_client::ResolverClient::with_interceptor(ch.clone(), with("render-secret"));
    let e = r.get_blog(pb::GetBlogRequest { blog_id: "guarded".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "the refused invalidations created nothing");

    let mut p = pb::publisher_client::PublisherClient::with_interceptor(ch.clone(), with("second"));
    let id = p.invalidate(inv()).await.unwrap().into_inner().cache_id;
    let b = r.get_blog(pb::GetBlogRequest { blog_id: "guarded".into() }).await.unwrap().into_inner();
    assert_eq!(b.cache_id, id);

    let mut r_bad = pb::resolver_client::ResolverClient::with_interceptor(ch.clone(), with("publish-secret"));
    let e = r_bad.get_blog(pb::GetBlogRequest { blog_id: "guarded".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("token"), "{}", e.message());

    // Health stays open.
    let mut h = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    let st = h.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap();
    assert_eq!(st.into_inner().status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_a_graceful_restart() {
    let s = Server::start().await;
    let f = invalidate(&s, "keep", &[]).await;
    let v = invalidate(&s, "keep", &["/a.css"]).await;
    let mut p = s.publisher().await;
    p.set_domain(pb::SetDomainRequest { domain: "keep.example".into(), blog_id: "keep".into() }).await.unwrap();
    drop(p);
    let dir = s.stop().await;
    let s = Server::start_in(dir, |_| {}).await;
    let a = resolve(&s, "keep", &["/a.css", "/b.css"]).await;
    assert_eq!((a[0].cache_id, a[1].cache_id), (v, f));
    let mut r = s.resolver().await;
    let got = r.lookup_domain(pb::LookupDomainRequest { domain: "keep.example".into() }).await.unwrap();
    assert_eq!(got.into_inner().blog_id, "keep");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_refused_not_queued() {
    use blotcdn::proto::put_asset_chunk::Chunk;
    let s = Server::start_with(|p| p.max_in_flight = Some(2)).await;
    let ch = tonic::transport::Channel::from_shared(format!("http://{}", s.grpc)).unwrap().connect().await.unwrap();
    // Two uploads that never finish hold both slots of this connection.
    let upload = |i: usize| {
        let mut c = pb::publisher_client::PublisherClient::new(ch.clone());
        let header = pb::PutAssetChunk {
            chunk: Some(Chunk::Header(pb::PutAssetHeader {
                blog_id: "busy".into(),
                filename: format!("f{i}.bin"),
                ..Default::default()
            })),
        };
        let stream = tokio_stream::StreamExt::chain(tokio_stream::iter(vec![header]), futures_util::stream::pending());
        tokio::spawn(async move { c.put_asset(stream).await })
    };
    let mut held: Vec<_> = (0..2).map(upload).collect();
    // Once both uploads hold their slots (no sleep long enough to assume it):
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        // A probe sent before an upload reached the server can take its
        // slot, and the upload is refused: send it again.
        for (i, h) in held.iter_mut().enumerate() {
            if h.is_finished() {
                let e = (&mut *h).await.unwrap().expect_err("an upload that never ends cannot succeed");
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                *h = upload(i);
            }
        }
        let mut r = pb::resolver_client::ResolverClient::new(ch.clone());
        let e = r.get_blog(pb::GetBlogRequest { blog_id: "busy".into() }).await.unwrap_err();
        if e.code() == Code::ResourceExhausted {
            break;
        }
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        assert!(std::time::Instant::now() < deadline, "a third call was never refused");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    for h in held {
        h.abort();
    }
    // Once the slots are free, calls go through again.
    let mut ok = false;
    for _ in 0..100 {
        let mut r = pb::resolver_client::ResolverClient::new(ch.clone());
        match r.get_blog(pb::GetBlogRequest { blog_id: "busy".into() }).await {
            Err(e) if e.code() == Code::ResourceExhausted => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(e) => {
                assert_eq!(e.code(), Code::NotFound);
                ok = true;
                break;
            }
            Ok(_) => panic!("the refused uploads created a blog"),
        }
    }
    assert!(ok, "slots never freed");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_v1_and_v1alpha_both_list_the_services() {
    use tonic_reflection::pb::{v1, v1alpha};
    let s = Server::start().await;
    let ch = tonic::transport::Channel::from_shared(format!("http://{}", s.grpc)).unwrap().connect().await.unwrap();

    let mut c = v1::server_reflection_client::ServerReflectionClient::new(ch.clone());
    let req = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(String::new())),
    };
    let mut answers = c.server_reflection_info(tokio_stream::iter(vec![req])).await.unwrap().into_inner();
    let first = answers.message().await.unwrap().unwrap();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) = first.message_response
    else {
        panic!("v1: unexpected answer {first:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for svc in ["blotcdn.v1.Resolver", "blotcdn.v1.Publisher", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == svc), "v1 lists {names:?}");
    }

    let mut c = v1alpha::server_reflection_client::ServerReflectionClient::new(ch);
    let req = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1alpha::server_reflection_request::MessageRequest::ListServices(String::new())),
    };
    let mut answers = c.server_reflection_info(tokio_stream::iter(vec![req])).await.unwrap().into_inner();
    let first = answers.message().await.unwrap().unwrap();
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) = first.message_response
    else {
        panic!("v1alpha: unexpected answer {first:?}");
    };
    assert!(list.service.iter().any(|s| s.name == "blotcdn.v1.Resolver"));
    s.stop().await;
}
