//! The HTTP origin with real HTTP clients: every row of DESIGN.md's origin
//! table, conditional and range requests, the fallback chain (nginx standing
//! in for the legacy bucket and the app), and a catalogue of hostile requests.

use crate::common;

use blotcdn::proto as pb;
use common::{curl, get, invalidate, nginx, path_of, request, resolve, url_of, Server};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versioned_urls_follow_the_cache_rules() {
    let s = Server::start().await;
    s.write("b1", "/style.css", b"body { color: red }");
    s.write("b1", "/fonts/x.woff2", b"wOF2....");
    invalidate(&s, "b1", &[]).await;
    let url = url_of(&s, "b1", "/style.css").await;

    // The current version: immutable, with every header.
    let r = curl(&[&url]);
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"body { color: red }");
    assert_eq!(r.header("cache-control"), Some("public, max-age=31536000, immutable"));
    assert_eq!(r.header("content-type"), Some("text/css; charset=utf-8"));
    assert_eq!(r.header("content-length"), Some("19"));
    assert_eq!(r.header("accept-ranges"), Some("bytes"));
    assert_eq!(r.header("surrogate-key"), Some("b1"));
    assert_eq!(r.header("cache-tag"), Some("b1"));
    assert!(r.header("etag").is_some_and(|e| e.starts_with('"')));
    assert!(r.header("last-modified").is_some_and(|d| d.ends_with("GMT")));
    assert_eq!(r.header("access-control-allow-origin"), None, "CORS only where needed");
    let font = curl(&[&url_of(&s, "b1", "/fonts/x.woff2").await]);
    assert_eq!((font.status, font.body.as_slice()), (200, &b"wOF2...."[..]));
    assert_eq!(font.header("access-control-allow-origin"), Some("*"));
    assert_eq!(font.header("content-type"), Some("font/woff2"));

    // A publish: the file changes, the path's version moves.
    std::thread::sleep(std::time::Duration::from_millis(5));
    s.write("b1", "/style.css", b"body { color: blue }");
    invalidate(&s, "b1", &["/style.css"]).await;
    let new_url = url_of(&s, "b1", "/style.css").await;
    assert_ne!(new_url, url);
    let r = curl(&[&new_url]);
    assert_eq!((r.status, r.body.as_slice()), (200, &b"body { color: blue }"[..]));
    assert_eq!(r.header("cache-control"), Some("public, max-age=31536000, immutable"));
    // The old URL still works, briefly cached, with the current bytes.
    let r = curl(&[&url]);
    assert_eq!((r.status, r.body.as_slice()), (200, &b"body { color: blue }"[..]));
    assert_eq!(r.header("cache-control"), Some("public, max-age=60"));

    // A cache id from the future, an unknown blog: 404 no-store.
    let id: u64 = new_url.rsplit('/').nth(1).unwrap().parse().unwrap();
    let r = curl(&[&s.url(&format!("/b1/{}/style.css", id + 1))]);
    assert_eq!((r.status, r.header("cache-control")), (404, Some("no-store")));
    let r = curl(&[&s.url(&format!("/nosuchblog/{id}/style.css"))]);
    assert_eq!((r.status, r.header("cache-control")), (404, Some("no-store")));
    // A missing file (at the blog's floor, its version): 404 with a short max-age.
    let floor: u64 = url.rsplit('/').nth(1).unwrap().parse().unwrap();
    let r = curl(&[&s.url(&format!("/b1/{floor}/missing.css"))]);
    assert_eq!((r.status, r.header("cache-control")), (404, Some("public, max-age=60")));
    s.stop().await;
}

/// A blog's folder named by a number (a year, a month) is a folder, on the
/// CDN's host and on the blog's own domain. Before, any number after the
/// blog was read as a cache id: `/{blog}/2016/photo.jpg` served the blog's
/// `/photo.jpg`, and the app was asked for `/05/my-post` (the year gone).
/// A cache id is a time in milliseconds, 13 digits or more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_folder_named_by_a_number_is_a_folder_not_a_version() {
    let s = Server::start().await;
    s.write("years", "/photo.jpg", b"the top one");
    s.write("years", "/2016/photo.jpg", b"from 2016");
    s.write("years", "/2016/05/post.html", b"a post of May 2016");
    s.write("years", "/9780306406157/cover.jpg", b"a book's cover");
    invalidate(&s, "years", &[]).await;
    let mut p = s.publisher().await;
    p.set_domain(pb::SetDomainRequest { domain: "years.example".into(), blog_id: "years".into() }).await.unwrap();
    for (path, body) in [
        ("/2016/photo.jpg", &b"from 2016"[..]),
        ("/2016/05/post.html", b"a post of May 2016"),
        // 13 digits, but a time in the year 2280: an ISBN.
        ("/9780306406157/cover.jpg", b"a book's cover"),
    ] {
        let r = curl(&[&s.url(&format!("/years{path}"))]);
        assert_eq!((r.status, r.body.as_slice()), (200, body), "{path} on the CDN's host");
        let r = curl(&["-H", "Host: years.example", &s.url(path)]);
        assert_eq!((r.status, r.body.as_slice()), (200, body), "{path} on the blog's domain");
        // Its versioned URL names the same file.
        let r = curl(&[&url_of(&s, "years", path).await]);
        assert_eq!((r.status, r.body.as_slice()), (200, body), "{path}'s versioned URL");
        assert_eq!(r.header("cache-control"), Some("public, max-age=31536000, immutable"));
    }
    let r = curl(&[&url_of(&s, "years", "/photo.jpg").await]);
    assert_eq!((r.status, r.body.as_slice()), (200, &b"the top one"[..]));
    // A number of 13 digits or more is a cache id: one below every id this
    // blog was given is an old version of the file after it.
    let r = curl(&[&s.url("/years/1000000000000/photo.jpg")]);
    assert_eq!((r.status, r.body.as_slice()), (200, &b"the top one"[..]));
    assert_eq!(r.header("cache-control"), Some("public, max-age=60"));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_range_and_head() {
    let s = Server::start().await;
    let body: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    s.write("b", "/big.bin", &body);
    s.write("b", "/small.txt", b"0123456789");
    // Past what is read into memory: sent from the file itself.
    let huge: Vec<u8> = (0..2_600_000u32).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
    s.write("b", "/huge.bin", &huge);
    invalidate(&s, "b", &[]).await;
    for (path, bytes) in [("/big.bin", body.as_slice()), ("/small.txt", &b"0123456789"[..]), ("/huge.bin", &huge[..])] {
        let url = url_of(&s, "b", path).await;
        let full = curl(&[&url]);
        assert_eq!(full.status, 200);
        assert_eq!(full.body, bytes, "{path}");
        let etag = full.header("etag").unwrap().to_owned();
        let lm = full.header("last-modified").unwrap().to_owned();

        let r = curl(&["-H", &format!("If-None-Match: {etag}"), &url]);
        assert_eq!(r.status, 304, "{path}");
        assert!(r.body.is_empty());
        assert_eq!(r.header("etag"), Some(etag.as_str()));
        let r = curl(&["-H", &format!("If-Modified-Since: {lm}"), &url]);
        assert_eq!(r.status, 304, "{path}");
        let r = curl(&["-H", "If-None-Match: \"other\"", &url]);
        assert_eq!(r.status, 200, "{path}");

        let r = curl(&["-H", "Range: bytes=2-5", &url]);
        assert_eq!(r.status, 206, "{path}");
        assert_eq!(r.body, &bytes[2..6]);
        assert_eq!(r.header("content-range"), Some(format!("bytes 2-5/{}", bytes.len()).as_str()));
        assert_eq!(r.header("content-length"), Some("4"));
        let r = curl(&["-H", "Range: bytes=-3", &url]);
        assert_eq!((r.status, r.body.as_slice()), (206, &bytes[bytes.len() - 3..]));
        // Most of a hot file, from inside it (a large file's part goes out
        // with sendfile at that offset of its sealed copy).
        let r = curl(&["-H", "Range: bytes=7-", &url]);
        assert_eq!((r.status, r.body.as_slice()), (206, &bytes[7..]), "{path}");
        let r = curl(&["-H", &format!("Range: bytes={}-", bytes.len()), &url]);
        assert_eq!(r.status, 416, "{path}");
        assert_eq!(r.header("content-range"), Some(format!("bytes */{}", bytes.len()).as_str()));
        // A stale If-Range: the whole file.
        let r = curl(&["-H", "Range: bytes=0-0", "-H", "If-Range: \"stale\"", &url]);
        assert_eq!((r.status, r.body.len()), (200, bytes.len()));

        let r = curl(&["-I", &url]);
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-length"), Some(bytes.len().to_string().as_str()));
        assert!(r.body.is_empty());
    }
    let r = request(s.http, "POST", "/b/1/small.txt", &[("Content-Length", "0")]);
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ask_and_healthz() {
    let s = Server::start().await;
    let mut p = s.publisher().await;
    p.set_domain(pb::SetDomainRequest { domain: "mapped.example".into(), blog_id: "b".into() }).await.unwrap();
    assert_eq!(curl(&[&s.url("/_ask?domain=mapped.example")]).status, 200);
    assert_eq!(curl(&[&s.url("/_ask?domain=MAPPED.example.")]).status, 200);
    assert_eq!(curl(&[&s.url("/_ask?domain=unmapped.example")]).status, 404);
    assert_eq!(curl(&[&s.url("/_ask?domain=not%20a%20domain")]).status, 400);
    assert_eq!(curl(&[&s.url("/_ask")]).status, 400);
    // A domain whose last label ends in a digit (not all digits, as an
    // address's): the edge is told yes, and the origin serves it. Before,
    // the origin took it for an address and answered 404.
    s.write("b", "/style.css", b"digit");
    p.set_domain(pb::SetDomainRequest { domain: "test.a1".into(), blog_id: "b".into() }).await.unwrap();
    assert_eq!(curl(&[&s.url("/_ask?domain=test.a1")]).status, 200);
    for header in ["Host: test.a1", "X-Blotcdn-Domain: test.a1"] {
        let r = curl(&["-H", header, &s.url("/style.css")]);
        assert_eq!((r.status, r.body.as_slice()), (200, &b"digit"[..]), "{header}");
    }
    let h = curl(&[&s.url("/healthz")]);
    assert_eq!((h.status, h.body.as_slice()), (200, &b"ok\n"[..]));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_origins_in_order_and_backfill() {
    let work = tempfile::tempdir().unwrap();
    let legacy_root = work.path().join("legacy");
    let app_root = work.path().join("app");
    for (root, files) in [
        (&legacy_root, vec![("oldblog/avatars/1468462389403/me.png", "legacy avatar"), ("both.txt", "from legacy")]),
        (&app_root, vec![("both.txt", "from app"), ("app-only.txt", "from app")]),
    ] {
        for (p, b) in files {
            let f = root.join(p);
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(f, b).unwrap();
        }
    }
    let (_legacy, lp) = nginx(&work.path().join("n1"), &legacy_root, "");
    let (_app, ap) = nginx(&work.path().join("n2"), &app_root, "location = /echo { return 200 \"args=$args\"; }");
    let s = Server::start_with(|p| {
        p.fallback_origins = Some(vec![format!("http://127.0.0.1:{lp}"), format!("http://127.0.0.1:{ap}")]);
    })
    .await;

    // Not on local disk: the legacy bucket answers, and the file lands in
    // the static folder (never the user's synced folder).
    let avatar = "/oldblog/avatars/1468462389403/me.png";
    let r = curl(&[&s.url(avatar)]);
    assert_eq!((r.status, r.body.as_slice()), (200, &b"legacy avatar"[..]));
    assert_eq!(r.header("surrogate-key"), Some("oldblog"));
    let on_disk = s.config.static_dir.join("oldblog/avatars/1468462389403/me.png");
    assert_eq!(eventually_read(&on_disk), b"legacy avatar");
    // The bucket can forget it now: local disk answers first.
    std::fs::remove_file(legacy_root.join("oldblog/avatars/1468462389403/me.png")).unwrap();
    let r = curl(&[&s.url(avatar)]);
    assert_eq!((r.status, r.body.as_slice()), (200, &b"legacy avatar"[..]));

    // Order: the legacy bucket before the app; the app only when the bucket misses.
    assert_eq!(curl(&[&s.url("/both.txt")]).body, b"from legacy");
    assert_eq!(curl(&[&s.url("/app-only.txt")]).body, b"from app");
    assert_eq!(curl(&[&s.url("/nowhere.txt")]).status, 404);
    // The app sees the query of what it is asked.
    assert_eq!(curl(&[&s.url("/echo?x=1&y=2")]).body, b"args=x=1&y=2");

    // A backfill never follows a link out of the blog's static folder: the
    // answer still comes from the bucket, but nothing is written outside.
    let outside = work.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, s.config.static_dir.join("oldblog/evil")).unwrap();
    std::fs::create_dir_all(legacy_root.join("oldblog/evil")).unwrap();
    std::fs::write(legacy_root.join("oldblog/evil/x.png"), b"bucket bytes").unwrap();
    let r = curl(&[&s.url("/oldblog/evil/x.png")]);
    assert_eq!((r.status, r.body.as_slice()), (200, &b"bucket bytes"[..]));
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0, "wrote outside the blog's folder");

    // A versioned URL whose file is only in the bucket: fetched by its
    // unversioned name, written into the static folder, served from there.
    let id = invalidate(&s, "oldblog", &[]).await;
    std::fs::create_dir_all(legacy_root.join("oldblog/img")).unwrap();
    std::fs::write(legacy_root.join("oldblog/img/p.jpg"), b"legacy photo").unwrap();
    let r = curl(&[&s.url(&format!("/oldblog/{id}/img/p.jpg"))]);
    assert_eq!((r.status, r.body.as_slice()), (200, &b"legacy photo"[..]));
    // Into the static folder, never the user's synced folder.
    assert_eq!(eventually_read(&s.config.static_dir.join("oldblog/img/p.jpg")), b"legacy photo");
    assert!(!s.blogs_dir().join("oldblog/img/p.jpg").exists());
    s.stop().await;
}

/// A fallback origin with a path (the legacy bucket under `/legacy`) is never
/// asked for what lies outside it: a path not under a blog that an origin
/// would decode and normalise out of its prefix (`/%2e%2e/secret.txt`,
/// which nginx read as `/secret.txt`, as a hostile test showed) is 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_that_would_leave_a_fallback_origins_prefix_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("root");
    std::fs::create_dir_all(root.join("legacy")).unwrap();
    std::fs::create_dir_all(root.join("admin")).unwrap();
    std::fs::write(root.join("legacy/ok.txt"), b"in the bucket").unwrap();
    std::fs::write(root.join("secret.txt"), b"SECRET").unwrap();
    std::fs::write(root.join("admin/index.css"), b"ADMIN").unwrap();
    let (_n, port) = nginx(&work.path().join("n"), &root, "");
    let s = Server::start_with(|p| p.fallback_origins = Some(vec![format!("http://127.0.0.1:{port}/legacy")])).await;
    let r = curl(&[&s.url("/ok.txt")]);
    assert_eq!((r.status, r.body.as_slice()), (200, &b"in the bucket"[..]));
    for path in [
        "/%2e%2e/secret.txt",
        "/..%2fsecret.txt",
        "/b1%2f..%2f..%2fsecret.txt",
        "/%2E%2E/admin/index.css",
        "/../secret.txt",
        "/x/../../secret.txt",
        "/.%2e/secret.txt",
        "/..;/secret.txt",
        "/%2e%2e%5csecret.txt",
    ] {
        let r = curl(&[&s.url(path)]);
        assert_eq!(r.status, 400, "{path}: {}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.body, b"invalid path\n", "{path}");
    }
    s.stop().await;
}

/// The legacy bucket is asked for objects only: a query (S3's `?list-type=2`
/// lists the bucket, `?acl` gives its ACL) is not passed on to it, and a
/// target naming no key (`/`, which lists it) skips it; the app still gets
/// both. A request target that is no path (`GET x.y`, `GET *`) is 400 on any
/// host: on a custom domain it reached the bucket as `/legacy/`, its listing
/// (hostile round 27).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_legacy_bucket_is_asked_for_objects_only() {
    let work = tempfile::tempdir().unwrap();
    let empty = work.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let (_bucket, bp) =
        nginx(&work.path().join("b"), &empty, r#"location / { return 200 "bucket saw $request_uri"; }"#);
    let (_app, ap) = nginx(&work.path().join("a"), &empty, r#"location / { return 200 "app saw $request_uri"; }"#);
    let s = Server::start_with(|p| {
        p.fallback_origins = Some(vec![format!("http://127.0.0.1:{bp}/legacy"), format!("http://127.0.0.1:{ap}")]);
    })
    .await;
    let body = |args: &[&str]| {
        let r = curl(args);
        (r.status, String::from_utf8_lossy(&r.body).into_owned())
    };
    assert_eq!(body(&[&s.url("/x.css?acl")]), (200, "bucket saw /legacy/x.css".into()));
    assert_eq!(body(&[&s.url("/b1/x.css?versionId=1")]), (200, "bucket saw /legacy/b1/x.css".into()));
    assert_eq!(body(&[&s.url("/?list-type=2&prefix=b2/")]), (200, "app saw /?list-type=2&prefix=b2/".into()));
    assert_eq!(body(&[&s.url("/")]), (200, "app saw /".into()));
    let mut p = s.publisher().await;
    p.set_domain(pb::SetDomainRequest { domain: "example.com".into(), blog_id: "b1".into() }).await.unwrap();
    for target in ["x.y", "*", "example.com:80"] {
        for host in [vec![], vec!["-H", "Host: example.com"], vec!["-H", "X-Blotcdn-Domain: example.com"]] {
            let mut args = vec!["--request-target", target];
            args.extend(host.iter().copied());
            let url = s.url("/");
            args.push(&url);
            let (status, text) = body(&args);
            assert_eq!((status, text.as_str()), (400, "the request target is not a path\n"), "{target} {host:?}");
        }
    }
    s.stop().await;
}

/// Only a plain, whole file from the legacy bucket is kept: bytes in an
/// encoding (an object stored gzipped) are passed on with their
/// Content-Encoding and not written to the static folder, whose files are
/// answered as they are; a 206 is not the file; an answer its origin keeps
/// out of shared caches is passed on as it says, and not kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_plain_whole_answers_are_backfilled() {
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("legacy");
    std::fs::create_dir_all(root.join("fb")).unwrap();
    std::fs::write(root.join("fb/plain.css"), b"plain").unwrap();
    let locations = r#"
        location = /fb/gz.css { add_header Content-Encoding gzip; add_header Vary Accept-Encoding; return 200 "GZBYTES"; }
        location = /fb/part.css { return 206 "part"; }
        location = /fb/private.css { add_header Cache-Control "private, no-store"; return 200 "mine"; }
        location = /fb/revalidate.css { add_header Cache-Control "no-cache"; return 200 "same for all"; }
    "#;
    let (_legacy, port) = nginx(&work.path().join("n"), &root, locations);
    let s = Server::start_with(|p| p.fallback_origins = Some(vec![format!("http://127.0.0.1:{port}")])).await;
    let kept = |name: &str| s.config.static_dir.join("fb").join(name);
    let r = curl(&[&s.url("/fb/plain.css")]);
    assert_eq!((r.status, r.body.as_slice()), (200, &b"plain"[..]));
    assert_eq!(eventually_read(&kept("plain.css")), b"plain", "the premise: a plain answer is kept");

    let r = curl(&[&s.url("/fb/gz.css")]);
    assert_eq!((r.status, r.body.as_slice()), (200, &b"GZBYTES"[..]));
    assert_eq!((r.header("content-encoding"), r.header("vary")), (Some("gzip"), Some("Accept-Encoding")));
    let r = curl(&[&s.url("/fb/part.css")]);
    assert_eq!(r.status, 404, "a 206 is not the file");
    let r = curl(&[&s.url("/fb/private.css")]);
    assert_eq!((r.status, r.body.as_slice()), (200, &b"mine"[..]));
    assert_eq!(r.header("cache-control"), Some("private, no-store"));
    // Shared caches must ask again each time, but the bytes are everyone's:
    // passed on as it says, and kept.
    let r = curl(&[&s.url("/fb/revalidate.css")]);
    assert_eq!((r.status, r.header("cache-control")), (200, Some("no-cache")));
    assert_eq!(eventually_read(&kept("revalidate.css")), b"same for all");
    // Given the time a backfill takes (the plain one above was there by now).
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    for name in ["gz.css", "part.css", "private.css"] {
        assert!(!kept(name).exists(), "{name} was written to the static folder");
    }
    s.stop().await;
}

/// An upstream answer whose body ends when its connection closes (no
/// length, not chunked) cannot tell a cut from an end. Before, one cut
/// short was passed on looking whole, with `max-age=60`, and the edge kept
/// it. Now it is passed on with `no-store`, and not backfilled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_ends_with_its_connection_is_passed_on_but_never_kept() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming().take(4) {
            let Ok(mut c) = conn else { return };
            let mut buf = [0u8; 4096];
            let _ = c.read(&mut buf);
            // Cut in the middle of a rule, and closed.
            let head =
                "HTTP/1.1 200 OK\r\nContent-Type: text/css\r\nSurrogate-Control: max-age=600\r\nConnection: close";
            let _ = c.write_all(format!("{head}\r\n\r\nbody {{ color: r").as_bytes());
        }
    });
    let s = Server::start_with(|p| p.fallback_origins = Some(vec![format!("http://127.0.0.1:{port}")])).await;
    let r = curl(&[&s.url("/closed/style.css")]);
    assert_eq!((r.status, r.body.as_slice()), (200, &b"body { color: r"[..]));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    // Nor a lifetime for the edge (Varnish keeps what it says before it
    // looks at no-store).
    assert_eq!(r.header("surrogate-control"), None);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!s.config.static_dir.join("closed/style.css").exists(), "backfilled");
    s.stop().await;
}

/// A backfilled file is named once the answer has streamed through (its
/// fsync runs off the request path): wait for it, boundedly.
fn eventually_read(p: &std::path::Path) -> Vec<u8> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Ok(b) = std::fs::read(p) {
            return b;
        }
        assert!(std::time::Instant::now() < deadline, "{} was not backfilled within 10 s", p.display());
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Markers that must never come back from the origin.
const PASSWD_MARK: &str = "root:";
const SIBLING_MARK: &str = "SIBLING-SECRET";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_never_escape_a_blog() {
    use std::os::unix::fs::symlink;
    let s = Server::start().await;
    let blogs = s.blogs_dir();
    s.write("victim", "/style.css", b"ok-style");
    s.write("victim", "/.env", b"SECRET=1");
    s.write("victim", "/.git/config", b"[core]");
    s.write("victim", "/sub/inner.txt", b"inner");
    s.write("sibling", "/secret.txt", SIBLING_MARK.as_bytes());
    let v = blogs.join("victim");
    symlink("/etc/passwd", v.join("link-passwd")).unwrap();
    symlink("../sibling/secret.txt", v.join("link-sibling")).unwrap();
    symlink("/etc", v.join("linkdir")).unwrap();
    symlink("../sibling", v.join("sibdir")).unwrap();
    symlink("style.css", v.join("link-inside")).unwrap();
    symlink("link-loop", v.join("link-loop")).unwrap();
    let fifo = std::ffi::CString::new(v.join("fifo").to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    let f = invalidate(&s, "victim", &[]).await;
    invalidate(&s, "sibling", &[]).await;
    let long = "a".repeat(2000);

    // (request target, expected status, extra headers)
    type Case = (String, u16, Vec<(&'static str, &'static str)>);
    let cases: Vec<Case> = vec![
        (format!("/victim/{f}/../sibling/secret.txt"), 400, vec![]),
        (format!("/victim/{f}/%2e%2e/sibling/secret.txt"), 400, vec![]),
        (format!("/victim/{f}/%2E%2E/%2E%2E/etc/passwd"), 400, vec![]),
        (format!("/victim/{f}/.%2e/sibling/secret.txt"), 400, vec![]),
        (format!("/victim/{f}/%2e%2e%2fsibling%2fsecret.txt"), 400, vec![]),
        (format!("/victim/{f}/..%2fsibling%2fsecret.txt"), 400, vec![]),
        (format!("/victim/{f}/sub%2finner.txt"), 400, vec![]),
        (format!("/victim/{f}/sub%2Finner.txt"), 400, vec![]),
        (format!("/victim/{f}/%2e"), 400, vec![]),
        (format!("/victim/{f}/style.css%00.png"), 400, vec![]),
        (format!("/victim/{f}/..%5csibling%5csecret.txt"), 400, vec![]),
        (format!("/victim/{f}/%C3%28"), 400, vec![]),
        (format!("/victim/{f}/{long}"), 400, vec![]),
        (format!("/victim/{f}//etc/passwd"), 400, vec![]),
        (format!("/victim/{f}/sub/"), 400, vec![]),
        (format!("/victim/{f}/%zz"), 404, vec![]),
        (format!("/victim/{f}/link-passwd"), 404, vec![]),
        (format!("/victim/{f}/link-sibling"), 404, vec![]),
        (format!("/victim/{f}/linkdir/passwd"), 404, vec![]),
        (format!("/victim/{f}/sibdir/secret.txt"), 404, vec![]),
        (format!("/victim/{f}/link-loop"), 404, vec![]),
        (format!("/victim/{f}/fifo"), 404, vec![]),
        (format!("/victim/{f}/sub"), 404, vec![]),
        (format!("/victim/{f}/.env"), 404, vec![]),
        (format!("/victim/{f}/.git/config"), 404, vec![]),
        (format!("/victim/{f}/%2eenv"), 404, vec![]),
        ("/victim/link-passwd".to_string(), 404, vec![]),
        ("/victim/sibdir/secret.txt".to_string(), 404, vec![]),
        (format!("/victim/{}/style.css", f + 1000), 404, vec![]),
        ("/victim/99999999999999999999999/style.css".to_string(), 404, vec![]),
        (format!("/victim/0{f}/style.css"), 404, vec![]),
        (format!("/nosuchblog/{f}/style.css"), 404, vec![]),
        ("/..%2f..%2fetc/passwd".to_string(), 400, vec![]),
        ("/%2e%2e/%2e%2e/etc/passwd".to_string(), 400, vec![]),
        ("/../../etc/passwd".to_string(), 400, vec![]),
        ("/victim/_assets/../../etc/passwd".to_string(), 404, vec![]),
        ("/victim/_assets/00000000000000000000000000000000/x.png".to_string(), 404, vec![]),
        ("/etc/passwd".to_string(), 404, vec![]),
        (format!("/victim/{f}/link-inside"), 200, vec![]),
        (format!("/victim/{f}/style.css?x=../../etc/passwd"), 200, vec![]),
        (format!("/victim/{f}/style.css"), 206, vec![("Range", "bytes=0-99999999999999")]),
        (format!("/victim/{f}/style.css"), 200, vec![("Range", "bytes=0-1,2-3,4-5")]),
        (format!("/victim/{f}/style.css"), 416, vec![("Range", "bytes=999999-")]),
        (format!("/victim/{f}/style.css"), 200, vec![("Range", "bytes=junk")]),
    ];
    assert!(cases.len() >= 30);
    for (target, status, headers) in &cases {
        let r = get(s.http, target, headers);
        let body = String::from_utf8_lossy(&r.body);
        assert_eq!(r.status, *status, "{target} {headers:?}: {body}");
        assert!(!body.contains(PASSWD_MARK) && !body.contains(SIBLING_MARK), "{target} leaked: {body}");
        if *status == 200 || *status == 206 {
            assert!(body.starts_with("ok") || body == "ok-style", "{target}: {body}");
        }
    }
    // A NUL byte and a raw backslash sent literally, not encoded.
    for raw in [
        &b"GET /victim/1/a\0b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"[..],
        b"GET /victim/1/..\\..\\x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    ] {
        let mut sock = std::net::TcpStream::connect(s.http).unwrap();
        use std::io::{Read, Write};
        sock.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        sock.write_all(raw).unwrap();
        let mut buf = Vec::new();
        let _ = sock.read_to_end(&mut buf);
        let text = String::from_utf8_lossy(&buf);
        assert!(!text.contains(PASSWD_MARK) && !text.contains(SIBLING_MARK));
        assert!(text.is_empty() || text.starts_with("HTTP/1.1 4"), "{text}");
    }
    // The server still answers.
    assert_eq!(get(s.http, "/healthz", &[]).status, 200);
    assert_eq!(get(s.http, &format!("/victim/{f}/style.css"), &[]).body, b"ok-style");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_swapped_under_load_never_leaks() {
    use std::os::unix::fs::symlink;
    use std::sync::atomic::{AtomicBool, Ordering};
    // No hot cache: every request opens the file, racing the swaps.
    let s = Server::start_with(|p| p.hot_cache_bytes = Some(0)).await;
    s.write("victim", "/real.txt", b"ok-real");
    s.write("sibling", "/secret.txt", SIBLING_MARK.as_bytes());
    let link = s.blogs_dir().join("victim/swap.txt");
    symlink("real.txt", &link).unwrap();
    let f = invalidate(&s, "victim", &[]).await;
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let swapper = {
        let (stop, link) = (stop.clone(), link.clone());
        std::thread::spawn(move || {
            let tmp = link.with_extension("tmp");
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) && i < 1_000_000 {
                let target = if i % 2 == 0 {
                    "/etc/passwd"
                } else if i % 4 == 1 {
                    "../sibling/secret.txt"
                } else {
                    "real.txt"
                };
                let _ = std::fs::remove_file(&tmp);
                symlink(target, &tmp).unwrap();
                std::fs::rename(&tmp, &link).unwrap();
                i += 1;
            }
        })
    };
    let (mut ok, mut refused) = (0, 0);
    for _ in 0..400 {
        let r = get(s.http, &format!("/victim/{f}/swap.txt"), &[]);
        let body = String::from_utf8_lossy(&r.body);
        assert!(!body.contains(PASSWD_MARK) && !body.contains(SIBLING_MARK), "leaked: {body}");
        match r.status {
            200 => {
                assert_eq!(body, "ok-real");
                ok += 1
            }
            404 => refused += 1,
            other => panic!("status {other}"),
        }
    }
    stop.store(true, Ordering::Relaxed);
    swapper.join().unwrap();
    assert!(refused > 0, "the swaps were never seen ({ok} ok)");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_files_follow_publishes() {
    let s = Server::start().await;
    s.write("h", "/app.js", b"v1");
    invalidate(&s, "h", &[]).await;
    let u1 = url_of(&s, "h", "/app.js").await;
    assert_eq!(curl(&[&u1]).body, b"v1");
    // Kept in memory: with the file gone from disk, the same version is
    // still answered (a cache that were off would answer 404 here).
    let file = s.blogs_dir().join("h/app.js");
    std::fs::remove_file(&file).unwrap();
    let r = curl(&[&u1]);
    assert_eq!((r.status, r.body.as_slice()), (200, &b"v1"[..]), "second read comes from memory");
    s.write("h", "/app.js", b"v2");
    invalidate(&s, "h", &["/app.js"]).await;
    let u2 = url_of(&s, "h", "/app.js").await;
    assert_eq!(curl(&[&u2]).body, b"v2", "a new version is read from disk, never the stale entry");
    assert_eq!(curl(&[&u1]).body, b"v2", "an old URL gets the current file");
    assert_eq!(get(s.http, &path_of(&u2), &[]).body, b"v2");
    // A blog the store has never heard of: no publish will ever announce a
    // change to its files, so they are never kept hot; its unversioned URL
    // answers what the disk holds now (small, and large enough to seal).
    for (i, n) in [10usize, 20_000].into_iter().enumerate() {
        let p = format!("/f{i}.css");
        s.write("unknown", &p, &vec![b'A'; n]);
        assert_eq!(curl(&[&s.url(&format!("/unknown{p}"))]).body, vec![b'A'; n]);
        s.write("unknown", &p, &vec![b'B'; n + 1]);
        let r = curl(&[&s.url(&format!("/unknown{p}"))]);
        assert_eq!((r.status, r.body), (200, vec![b'B'; n + 1]), "{p}: stale bytes from memory");
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hot_cache_evicts_within_its_bytes_and_can_be_turned_off() {
    // 64 KiB of hot files: files of 4 KiB, one eighth of it at most each.
    let s = Server::start_with(|p| p.hot_cache_bytes = Some(64 * 1024)).await;
    for i in 0..40 {
        s.write("ev", &format!("/f{i}.txt"), &vec![b'a' + (i % 26) as u8; 4096]);
    }
    invalidate(&s, "ev", &[]).await;
    let mut urls = Vec::new();
    for i in 0..40 {
        let u = url_of(&s, "ev", &format!("/f{i}.txt")).await;
        assert_eq!(curl(&[&u]).status, 200);
        urls.push(u);
    }
    // Remove every file: what is still answered came from memory.
    for i in 0..40 {
        std::fs::remove_file(s.blogs_dir().join(format!("ev/f{i}.txt"))).unwrap();
    }
    let hot: Vec<usize> = (0..40).filter(|i| curl(&[&urls[*i]]).status == 200).collect();
    assert!(!hot.is_empty() && hot.len() <= 16, "hot files within 64 KiB: {hot:?}");
    assert!(hot.contains(&39), "the newest stays: {hot:?}");
    assert!(!hot.contains(&0), "the oldest went first: {hot:?}");
    s.stop().await;

    let s = Server::start_with(|p| p.hot_cache_bytes = Some(0)).await;
    s.write("off", "/a.txt", b"on disk");
    invalidate(&s, "off", &[]).await;
    let u = url_of(&s, "off", "/a.txt").await;
    assert_eq!(curl(&[&u]).body, b"on disk");
    std::fs::remove_file(s.blogs_dir().join("off/a.txt")).unwrap();
    assert_eq!(curl(&[&u]).status, 404, "hot_cache_bytes = 0 keeps nothing");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_style_urls_name_the_blog_in_the_host() {
    let s = Server::start_with(|p| {
        p.cdn_base_url = Some("http://cdn.test".into());
        p.url_style = Some("host".into());
    })
    .await;
    s.write("b1", "/style.css", b"host style");
    s.write("Up_Per", "/style.css", b"path style");
    let id = invalidate(&s, "b1", &[]).await;
    invalidate(&s, "Up_Per", &[]).await;
    let urls = resolve(&s, "b1", &["/style.css"]).await;
    assert_eq!(urls[0].url, format!("http://b1.cdn.test/{id}/style.css"));
    // An id that cannot be a host label keeps the path style.
    let other = resolve(&s, "Up_Per", &["/style.css"]).await;
    assert!(other[0].url.starts_with("http://cdn.test/Up_Per/"), "{}", other[0].url);
    let info = s.resolver().await.get_info(pb::GetInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.url_style, "host");

    // The origin takes the blog from the Host header…
    let by_host = |host: &str, path: &str| curl(&["-H", &format!("Host: {host}"), &s.url(path)]);
    let r = by_host("b1.cdn.test", &format!("/{id}/style.css"));
    assert_eq!((r.status, r.body.as_slice()), (200, &b"host style"[..]));
    assert_eq!(r.header("cache-control"), Some("public, max-age=31536000, immutable"));
    assert_eq!(by_host("B1.CDN.TEST", &format!("/{id}/style.css")).status, 200);
    // …a permanent asset too…
    let mut p = s.publisher().await;
    let a = p
        .import_file(pb::ImportFileRequest { blog_id: "b1".into(), path: "/style.css".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(a.url.starts_with("http://b1.cdn.test/_assets/"), "{}", a.url);
    assert_eq!(by_host("b1.cdn.test", &path_of(&a.url)).body, b"host style");
    // …while path-style URLs keep working, and an unknown blog is 404.
    assert_eq!(by_host("127.0.0.1", &format!("/b1/{id}/style.css")).status, 200);
    assert_eq!(by_host("nosuch.cdn.test", &format!("/{id}/style.css")).status, 404);
    assert_eq!(by_host("b1.cdn.test", "/healthz").status, 200);
    // A port (an edge that forwards it) and a fully qualified name.
    for host in ["b1.cdn.test:80", "b1.cdn.test.", "b1.cdn.test.:8080"] {
        let r = by_host(host, &format!("/{id}/style.css"));
        assert_eq!((r.status, r.body.as_slice()), (200, &b"host style"[..]), "{host}");
    }
    // An absolute-form target names the host; the Host header is ignored.
    let target = format!("http://nosuch.cdn.test/{id}/style.css");
    let r = common::raw_request(
        s.http,
        format!("GET {target} HTTP/1.1\r\nHost: b1.cdn.test\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    assert_eq!(r.status, 404, "the target's host, not the Host header's");
    let target = format!("http://b1.cdn.test/{id}/style.css");
    let r = common::raw_request(
        s.http,
        format!("GET {target} HTTP/1.1\r\nHost: nosuch.cdn.test\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    assert_eq!((r.status, r.body.as_slice()), (200, &b"host style"[..]));
    // Two Host headers could name two blogs: refused.
    let two = format!(
        "GET /{id}/style.css HTTP/1.1\r\nHost: b1.cdn.test\r\nHost: nosuch.cdn.test\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(common::raw_request(s.http, two.as_bytes()).status, 400);
    s.stop().await;

    // Host style needs a host name to put blogs under.
    let e = blotcdn::config::Config::from_partial(blotcdn::config::Partial {
        url_style: Some("host".into()),
        ..Default::default()
    })
    .unwrap_err();
    assert!(e.to_string().contains("url_style"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_urls_come_from_the_static_folder_first_confined_like_blog_folders() {
    let s = Server::start().await;
    let statics = s.config.static_dir.clone();
    let put = |root: &std::path::Path, p: &str, b: &[u8]| {
        let f = root.join(p);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(f, b).unwrap();
    };
    put(&statics, "sblog/avatars/me.png", b"platform avatar");
    put(&s.blogs_dir(), "sblog/avatars/me.png", b"user's file of that name");
    put(&s.blogs_dir(), "sblog/notes.txt", b"user's notes");
    invalidate(&s, "sblog", &[]).await;
    // The platform's file wins over the user's; the user's folder comes next.
    let r = curl(&[&s.url("/sblog/avatars/me.png")]);
    assert_eq!((r.status, r.body.as_slice()), (200, &b"platform avatar"[..]));
    assert_eq!(r.header("cache-control"), Some("public, max-age=60"));
    assert_eq!(curl(&[&s.url("/sblog/notes.txt")]).body, b"user's notes");

    // The same confinement as blog folders: links out, hidden files, traversal.
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), b"secret").unwrap();
    std::os::unix::fs::symlink(outside.path().join("secret"), statics.join("sblog/link.png")).unwrap();
    std::os::unix::fs::symlink(outside.path(), statics.join("sblog/dir")).unwrap();
    put(&statics, "sblog/.hidden/x.png", b"hidden");
    for p in ["/sblog/link.png", "/sblog/dir/secret", "/sblog/.hidden/x.png", "/sblog/%2e%2e/%2e%2e/etc/passwd"] {
        let r = curl(&[&s.url(p)]);
        assert!(r.status == 404 || r.status == 400, "{p}: {}", r.status);
        assert!(!r.body.windows(6).any(|w| w == b"secret"), "{p} leaked");
    }
    // The temporary folder is no URL.
    put(&statics, ".tmp/1-1", b"half written");
    assert_eq!(curl(&[&s.url("/.tmp/1-1")]).status, 404);

    // A legacy URL of a path bound to a permanent asset serves the asset.
    let mut p = s.publisher().await;
    let header = pb::PutAssetChunk {
        chunk: Some(pb::put_asset_chunk::Chunk::Header(pb::PutAssetHeader {
            blog_id: "sblog".into(),
            filename: "me.png".into(),
            path: "/avatars/me.png".into(),
            ..Default::default()
        })),
    };
    let data =
        pb::PutAssetChunk { chunk: Some(pb::put_asset_chunk::Chunk::Data(b"the asset's bytes".to_vec().into())) };
    p.put_asset(tokio_stream::iter(vec![header, data])).await.unwrap();
    let r = curl(&[&s.url("/sblog/avatars/me.png")]);
    assert_eq!((r.status, r.body.as_slice()), (200, &b"the asset's bytes"[..]));
    // Not immutable: the path may be bound to other bytes later.
    assert_eq!(r.header("cache-control"), Some("public, max-age=60"));
    s.stop().await;
}

/// The origin threads ask the kernel for the configured scheduler slice
/// (`http_slice_us`), and keep the kernel's own with 0. Kernels before 6.12
/// have no per-thread slice: there the configured one must not show either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_threads_run_with_the_configured_scheduler_slice() {
    use blotcdn::origin::slice;
    use std::time::Duration;
    fn origin_threads() -> Vec<(String, libc::pid_t)> {
        let mut found = Vec::new();
        for t in std::fs::read_dir("/proc/self/task").unwrap() {
            let t = t.unwrap();
            let name = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            if name.starts_with("blotcdn-http-") {
                found.push((name.trim().to_owned(), t.file_name().to_str().unwrap().parse().unwrap()));
            }
        }
        found
    }
    // A plain thread's slice: the kernel's default.
    let default = match slice::of(0) {
        Ok(d) => d,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EPERM)) => {
            eprintln!("skipped: sched_getattr: {e}");
            return;
        }
        Err(e) => panic!("sched_getattr: {e}"),
    };
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut v = release.split(|c: char| !c.is_ascii_digit()).map(|p| p.parse::<u32>().unwrap_or(0));
    let has_slices = (v.next().unwrap_or(0), v.next().unwrap_or(0)) >= (6, 12);
    for (us, want) in [(250u64, Some(Duration::from_micros(250))), (0, None)] {
        let s = Server::start_with(|p| {
            p.http_threads = Some(2);
            p.http_slice_us = Some(us);
        })
        .await;
        // The threads are running once they answer.
        let r = tokio::task::spawn_blocking({
            let addr = s.http;
            move || get(addr, "/healthz", &[])
        })
        .await
        .unwrap();
        assert_eq!(r.status, 200);
        // One thread answering says nothing of the other's start (nor of
        // the last server's threads being gone): both, within 5 s.
        let mut threads = origin_threads();
        for _ in 0..500 {
            if threads.len() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            threads = origin_threads();
        }
        assert_eq!(threads.len(), 2, "{threads:?}");
        // 0, or a kernel without slices of their own: the default.
        let expected = match want {
            Some(w) if has_slices => w,
            _ => default,
        };
        for (name, tid) in threads {
            // A thread asks for its slice as it starts: given 5 s to.
            let mut got = slice::of(tid).unwrap();
            for _ in 0..500 {
                if got == expected {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                got = slice::of(tid).unwrap();
            }
            assert_eq!(got, expected, "{name} with http_slice_us = {us}");
        }
        s.stop().await;
    }
}
