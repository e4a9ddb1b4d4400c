//! Through real edges: Debian's varnish as the CDN cache in front of the
//! origin, and Debian's caddy as the on-demand TLS edge for custom domains.
//! Both run the configuration files in `edge/`, ports rewritten.

use crate::common;

use std::process::Command;

use blotcdn::proto as pb;
use common::{curl, free_port, invalidate, open_up, path_of, run, url_of, varnish, Daemon, Server};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn varnish_caches_versions_and_publishes_move_urls() {
    let work = tempfile::tempdir().unwrap();
    let s = Server::start().await;
    let (_varnish, vport) = varnish(work.path(), s.http.port(), "malloc,64m");
    let edge = |url: &str| format!("http://127.0.0.1:{vport}{}", path_of(url));

    s.write("blog", "/style.css", b"v1 bytes");
    invalidate(&s, "blog", &[]).await;
    let old = url_of(&s, "blog", "/style.css").await;
    let r = curl(&[&edge(&old)]);
    assert_eq!((r.status, r.header("x-cache"), r.body.as_slice()), (200, Some("MISS"), &b"v1 bytes"[..]));
    let r = curl(&[&edge(&old)]);
    assert_eq!((r.status, r.header("x-cache"), r.body.as_slice()), (200, Some("HIT"), &b"v1 bytes"[..]));

    // Publish: new bytes, a new URL from ResolveBatch, served fresh by the edge.
    s.write("blog", "/style.css", b"v2 bytes");
    invalidate(&s, "blog", &["/style.css"]).await;
    let new = url_of(&s, "blog", "/style.css").await;
    assert_ne!(new, old);
    let r = curl(&[&edge(&new)]);
    assert_eq!((r.status, r.header("x-cache"), r.body.as_slice()), (200, Some("MISS"), &b"v2 bytes"[..]));
    let r = curl(&[&edge(&new)]);
    assert_eq!((r.header("x-cache"), r.body.as_slice()), (Some("HIT"), &b"v2 bytes"[..]));
    // The old URL still serves what the edge cached: old pages keep working.
    let r = curl(&[&edge(&old)]);
    assert_eq!((r.status, r.header("x-cache"), r.body.as_slice()), (200, Some("HIT"), &b"v1 bytes"[..]));

    // An unknown cache id is never stored at the edge.
    let id: u64 = new.rsplit('/').nth(1).unwrap().parse().unwrap();
    let future = format!("http://127.0.0.1:{vport}/blog/{}/style.css", id + 5);
    for _ in 0..2 {
        let r = curl(&[&future]);
        assert_eq!((r.status, r.header("x-cache")), (404, Some("MISS")));
    }

    // A purge key drops the whole blog in one call.
    let r = curl(&["-X", "BAN", "-H", "Surrogate-Key: blog", &format!("http://127.0.0.1:{vport}/")]);
    assert_eq!(r.status, 200);
    let r = curl(&[&edge(&new)]);
    assert_eq!((r.header("x-cache"), r.body.as_slice()), (Some("MISS"), &b"v2 bytes"[..]));
    s.stop().await;
}

/// `X-Blotcdn-Domain` is the TLS edge's word for which domain a request
/// came in on: a reader who sends it to the cache must not make the cache
/// keep another blog's file, or a 404, under a blog's URL for everyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_readers_domain_header_never_puts_another_blogs_answer_under_a_url() {
    let work = tempfile::tempdir().unwrap();
    let s = Server::start().await;
    let (_varnish, vport) = varnish(work.path(), s.http.port(), "malloc,64m");
    s.write("victim", "/app.js", b"the victim's script");
    s.write("victim", "/only.css", b"only the victim has it");
    invalidate(&s, "victim", &[]).await;
    // The other blog holds a file at the victim's path, under a folder of
    // the victim's name, and a custom domain anyone can name.
    s.write("evil", "/victim/app.js", b"alert('pwned')");
    invalidate(&s, "evil", &[]).await;
    let mut p = s.publisher().await;
    p.set_domain(pb::SetDomainRequest { domain: "evil.example".into(), blog_id: "evil".into() }).await.unwrap();
    let versioned = path_of(&url_of(&s, "victim", "/app.js").await);
    for path in ["/victim/app.js", "/victim/only.css", versioned.as_str()] {
        let url = format!("http://127.0.0.1:{vport}{path}");
        curl(&["-H", "X-Blotcdn-Domain: evil.example", &url]);
        let r = curl(&[&url]);
        assert_eq!(r.status, 200, "{path}: a reader after the header got {}", r.status);
        assert!(
            r.body.starts_with(b"the victim's") || r.body.starts_with(b"only the victim"),
            "{path}: {:?}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.header("surrogate-key"), Some("victim"), "{path}");
    }
    // Asked as the domain, the origin answers as that domain's blog, and
    // says the answer depends on the header (for any cache in front).
    let r = curl(&["-H", "X-Blotcdn-Domain: evil.example", &format!("http://{}/victim/app.js", s.http)]);
    assert_eq!((r.status, r.body.as_slice()), (200, &b"alert('pwned')"[..]));
    assert_eq!(r.header("vary"), Some("X-Blotcdn-Domain"));
    let r = curl(&[&format!("http://{}/victim/app.js", s.http)]);
    assert_eq!(r.header("vary"), None, "no Vary where the header played no part");
    // Two of them, as two Host headers, say nothing for sure: 400 (the first won).
    let r = curl(&[
        "-H",
        "X-Blotcdn-Domain: evil.example",
        "-H",
        "X-Blotcdn-Domain: other.example",
        &format!("http://{}/victim/app.js", s.http),
    ]);
    assert_eq!((r.status, r.body.as_slice()), (400, &b"more than one X-Blotcdn-Domain header\n"[..]));
    assert_eq!(r.header("vary"), Some("X-Blotcdn-Domain"));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn varnish_serves_permanent_assets() {
    let work = tempfile::tempdir().unwrap();
    let s = Server::start().await;
    let (_varnish, vport) = varnish(work.path(), s.http.port(), "malloc,64m");
    s.write("pblog", "/thumbs/cat.jpg", b"\xff\xd8\xffcat");
    let mut p = s.publisher().await;
    let a = p
        .import_file(pb::ImportFileRequest { blog_id: "pblog".into(), path: "/thumbs/cat.jpg".into() })
        .await
        .unwrap()
        .into_inner();
    let url = format!("http://127.0.0.1:{vport}{}", path_of(&a.url));
    let r = curl(&[&url]);
    assert_eq!((r.status, r.header("x-cache"), r.body.as_slice()), (200, Some("MISS"), &b"\xff\xd8\xffcat"[..]));
    assert_eq!(r.header("cache-control"), Some("public, max-age=31536000, immutable"));
    assert_eq!(r.header("content-type"), Some("image/jpeg"));
    let r = curl(&[&url]);
    assert_eq!((r.status, r.header("x-cache"), r.body.as_slice()), (200, Some("HIT"), &b"\xff\xd8\xffcat"[..]));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caddy_gets_certificates_only_for_mapped_domains() {
    let work = tempfile::tempdir().unwrap();
    open_up(work.path());
    let s = Server::start().await;
    s.write("tlsblog", "/style.css", b"over tls");
    invalidate(&s, "tlsblog", &[]).await;
    let mut p = s.publisher().await;
    p.set_domain(pb::SetDomainRequest { domain: "mapped.example".into(), blog_id: "tlsblog".into() }).await.unwrap();
    let url = url_of(&s, "tlsblog", "/style.css").await;

    let (_caddy, sp) = caddy(work.path(), "Caddyfile", s.http.port());

    let resolve = |d: &str| format!("{d}:{sp}:127.0.0.1");
    // On its custom domain a blog's paths are the domain's own: no blog id.
    let on_domain = path_of(&url).strip_prefix("/tlsblog").expect("a path-style URL").to_owned();
    let target = |d: &str| format!("https://{d}:{sp}{on_domain}");
    // A mapped domain: the handshake completes (a certificate issued on
    // demand), the file comes through the edge.
    let r = curl(&["-k", "--resolve", &resolve("mapped.example"), &target("mapped.example")]);
    assert_eq!((r.status, r.body.as_slice()), (200, &b"over tls"[..]));
    // Another blog's file is not served on this blog's domain.
    s.write("otherblog", "/evil.html", b"<script>");
    invalidate(&s, "otherblog", &[]).await;
    let r = curl(&[
        "-k",
        "--resolve",
        &resolve("mapped.example"),
        &format!("https://mapped.example:{sp}/otherblog/evil.html"),
    ]);
    assert_eq!(r.status, 404);
    // The certificate is for that name, signed by the edge's CA.
    let ca = work.path().join("data/caddy/pki/authorities/local/root.crt");
    assert!(ca.exists(), "caddy's internal CA at {}", ca.display());
    let r =
        curl(&["--cacert", ca.to_str().unwrap(), "--resolve", &resolve("mapped.example"), &target("mapped.example")]);
    assert_eq!(r.status, 200);

    // An unmapped domain gets no certificate: the handshake fails.
    let (code, _, err) = run(
        Command::new("curl")
            .args(["-sS", "-k", "--max-time", "20", "--resolve", &resolve("unmapped.example")])
            .arg(target("unmapped.example")),
        30,
    );
    assert_ne!(code, 0, "handshake for an unmapped domain must fail");
    assert!(err.contains("SSL") || err.contains("TLS") || err.contains("alert"), "{err}");

    // Unmapping a domain stops new certificates for it: mapped (the edge's
    // check says yes), then unmapped before its first visit (now no).
    let ask = |d: &str| curl(&[&format!("http://{}/_ask?domain={d}", s.http)]).status;
    p.set_domain(pb::SetDomainRequest { domain: "second.example".into(), blog_id: "tlsblog".into() }).await.unwrap();
    assert_eq!(ask("second.example"), 200);
    p.remove_domain(pb::RemoveDomainRequest { domain: "second.example".into() }).await.unwrap();
    assert_eq!(ask("second.example"), 404);
    let (code, _, err) = run(
        Command::new("curl")
            .args(["-sS", "-k", "--max-time", "20", "--resolve", &resolve("second.example")])
            .arg(target("second.example")),
        30,
    );
    assert_ne!(code, 0, "a removed domain still got a certificate");
    assert!(err.contains("SSL") || err.contains("TLS") || err.contains("alert"), "{err}");

    // The edge names the domain its certificate is for: a target in absolute
    // form naming another host stays inside the domain's blog…
    let r = curl(&[
        "-k",
        "--resolve",
        &resolve("mapped.example"),
        "--request-target",
        "http://127.0.0.1/otherblog/evil.html",
        &format!("https://mapped.example:{sp}/"),
    ]);
    assert_eq!(r.status, 404, "{}", String::from_utf8_lossy(&r.body));
    // …and once the domain is removed, the edge that still holds its
    // certificate gets nothing for it, not the CDN's path-style routes.
    p.remove_domain(pb::RemoveDomainRequest { domain: "mapped.example".into() }).await.unwrap();
    let evil = format!("https://mapped.example:{sp}/otherblog/evil.html");
    let r = curl(&["-k", "--resolve", &resolve("mapped.example"), &evil]);
    assert_eq!((r.status, r.body.as_slice()), (404, &b"unknown domain\n"[..]));
    assert_eq!(curl(&["-k", "--resolve", &resolve("mapped.example"), &target("mapped.example")]).status, 404);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caddy_serves_host_style_urls_under_a_wildcard_name() {
    let work = tempfile::tempdir().unwrap();
    open_up(work.path());
    // The edge needs the origin's port, the origin the edge's (in its base
    // URL): the origin starts, the edge starts, the origin starts again.
    let s = Server::start().await;
    let origin = s.http.port();
    let (_caddy, sp) = caddy(work.path(), "host-style.Caddyfile", origin);
    let dir = s.stop().await;
    let s = Server::start_in(dir, |p| {
        p.http_addr = Some(format!("127.0.0.1:{origin}"));
        p.cdn_base_url = Some(format!("https://blotcdn.com:{sp}"));
        p.url_style = Some("host".into());
    })
    .await;
    s.write("hblog", "/style.css", b"under its own name");
    invalidate(&s, "hblog", &[]).await;
    let url = url_of(&s, "hblog", "/style.css").await;
    assert!(url.starts_with(&format!("https://hblog.blotcdn.com:{sp}/")), "{url}");
    // The URL a renderer got, as a browser would fetch it.
    let r = curl(&["-k", "--resolve", &format!("hblog.blotcdn.com:{sp}:127.0.0.1"), &url]);
    assert_eq!((r.status, r.body.as_slice()), (200, &b"under its own name"[..]));
    assert_eq!(r.header("surrogate-key"), Some("hblog"));
    // A reader's own X-Blotcdn-Domain does not reach the origin through
    // this edge: the Host still names the blog.
    s.write("other", "/style.css", b"another blog's");
    invalidate(&s, "other", &[]).await;
    let mut p = s.publisher().await;
    p.set_domain(pb::SetDomainRequest { domain: "other.example".into(), blog_id: "other".into() }).await.unwrap();
    let r = curl(&[
        "-k",
        "-H",
        "X-Blotcdn-Domain: other.example",
        "--resolve",
        &format!("hblog.blotcdn.com:{sp}:127.0.0.1"),
        &url,
    ]);
    assert_eq!((r.status, r.body.as_slice()), (200, &b"under its own name"[..]));
    s.stop().await;
}

/// Caddy running `edge/{file}` as it is, with only its ports rewritten (the
/// origin's, and free ones for its own), its state under `work`.
fn caddy(work: &std::path::Path, file: &str, origin: u16) -> (Daemon, u16) {
    let template = std::fs::read_to_string(format!("{}/edge/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let caddyfile = work.join("Caddyfile");
    Daemon::spawn_on_free_port("caddy", |sp| {
        let conf = template
            .replace("127.0.0.1:8080", &format!("127.0.0.1:{origin}"))
            .replace("http_port 8081", &format!("http_port {}", free_port()))
            .replace("https_port 8443", &format!("https_port {sp}"));
        std::fs::write(&caddyfile, conf).unwrap();
        let mut c = Command::new("caddy");
        c.args(["run", "--adapter", "caddyfile", "--config"])
            .arg(&caddyfile)
            .env("XDG_DATA_HOME", work.join("data"))
            .env("XDG_CONFIG_HOME", work.join("config"))
            .env("HOME", work);
        c
    })
}
