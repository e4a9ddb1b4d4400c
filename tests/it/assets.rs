//! Permanent assets: PutAsset, ImportFile, deduplication, deletion (also
//! under kill -9), fsck, and the CLI commands for them.

use crate::common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use blotcdn::proto::{self as pb, put_asset_chunk::Chunk};
use bytes::Bytes;
use common::{binary, get, keep_rewriting, path_of, resolve, run, ChildServer, Rewrite, Server};
use tonic::Code;

fn chunks(blog: &str, filename: &str, path: &str, data: &[u8]) -> Vec<pb::PutAssetChunk> {
    let mut v = vec![pb::PutAssetChunk {
        chunk: Some(Chunk::Header(pb::PutAssetHeader {
            blog_id: blog.into(),
            filename: filename.into(),
            content_type: String::new(),
            path: path.into(),
        })),
    }];
    for c in data.chunks(7000) {
        v.push(pb::PutAssetChunk { chunk: Some(Chunk::Data(Bytes::copy_from_slice(c))) });
    }
    v
}

async fn put(
    s_grpc: std::net::SocketAddr,
    blog: &str,
    filename: &str,
    path: &str,
    data: &[u8],
) -> Result<pb::Asset, tonic::Status> {
    let mut c = pb::publisher_client::PublisherClient::connect(format!("http://{s_grpc}")).await.unwrap();
    c.put_asset(tokio_stream::iter(chunks(blog, filename, path, data))).await.map(|r| r.into_inner())
}

/// Blobs in the CAS (temporary files excluded).
fn blobs(data_dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let cas = data_dir.join("cas");
    for a in std::fs::read_dir(&cas).unwrap().flatten() {
        if a.file_name().len() != 2 {
            continue;
        }
        for b in std::fs::read_dir(a.path()).unwrap().flatten() {
            for f in std::fs::read_dir(b.path()).unwrap().flatten() {
                out.push(f.file_name().to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    out
}

fn tmp_files(data_dir: &Path) -> usize {
    std::fs::read_dir(data_dir.join("cas/tmp")).map(|d| d.count()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_dedups_within_and_across_blogs_and_serves_immutably() {
    let s = Server::start().await;
    let bytes: Vec<u8> = (0..50_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let a1 = put(s.grpc, "blogA", "thumb.png", "/thumbs/1.png", &bytes).await.unwrap();
    let a2 = put(s.grpc, "blogA", "thumb.png", "", &bytes).await.unwrap();
    let b1 = put(s.grpc, "blogB", "other.txt", "", &bytes).await.unwrap();
    let expected = blake3::hash(&bytes).to_hex()[..32].to_string();
    assert_eq!(
        (a1.hash.as_str(), a2.hash.as_str(), b1.hash.as_str()),
        (expected.as_str(), expected.as_str(), expected.as_str())
    );
    assert_eq!(a1.url, a2.url);
    assert_eq!(a1.url, format!("http://{}/blogA/_assets/{expected}/thumb.png", s.http));
    assert_eq!((a1.size, a1.content_type.as_str()), (50_000, "image/png"));
    assert_eq!(blobs(s.dir.path()), vec![expected.clone()], "stored once");

    // The bound path resolves to the permanent URL.
    let mut r = s.resolver().await;
    let res = r
        .resolve_batch(pb::ResolveBatchRequest {
            blog_id: "blogA".into(),
            paths: vec!["/thumbs/1.png".into(), "/x.css".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(res.assets[0].url, a1.url);
    assert_eq!(res.assets[0].content_hash, expected);
    assert_eq!(res.assets[0].cache_id, 0);
    assert!(res.assets[1].content_hash.is_empty() && res.assets[1].cache_id > 0);
    let blog = r.get_blog(pb::GetBlogRequest { blog_id: "blogA".into() }).await.unwrap().into_inner();
    assert_eq!(blog.asset_count, 1);

    // Served from the CAS, immutable, to the blogs that reference it only.
    let resp = get(s.http, &path_of(&a1.url), &[]);
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body, bytes);
    assert_eq!(resp.header("cache-control"), Some("public, max-age=31536000, immutable"));
    assert_eq!(resp.header("content-type"), Some("image/png"));
    assert_eq!(resp.header("etag"), Some(format!("\"{expected}\"").as_str()));
    let resp = get(s.http, &path_of(&a1.url), &[("Range", "bytes=10-19")]);
    assert_eq!((resp.status, resp.body.as_slice()), (206, &bytes[10..20]));
    // The same bytes, now answered from memory, with blogB's own reference:
    // its content type (from its file name) and its purge keys.
    let resp = get(s.http, &format!("/blogB/_assets/{expected}/thumb.png"), &[]);
    assert_eq!((resp.status, resp.body.as_slice()), (200, bytes.as_slice()));
    assert_eq!(resp.header("content-type"), Some("text/plain"));
    assert_eq!(resp.header("surrogate-key"), Some(format!("blogB blogB/{expected}").as_str()));
    let resp = get(s.http, &path_of(&a1.url), &[("Range", "bytes=7-")]);
    assert_eq!((resp.status, resp.body.as_slice()), (206, &bytes[7..]));
    assert_eq!(resp.header("content-type"), Some("image/png"));
    assert_eq!(get(s.http, &format!("/blogC/_assets/{expected}/thumb.png"), &[]).status, 404);
    // A reference taken down is 404 at once, though its bytes stay in memory
    // for the other blog.
    let mut p = s.publisher().await;
    p.delete_asset(pb::DeleteAssetRequest { blog_id: "blogB".into(), hash: expected.clone() }).await.unwrap();
    assert_eq!(get(s.http, &format!("/blogB/_assets/{expected}/other.txt"), &[]).status, 404);
    assert_eq!(get(s.http, &path_of(&a1.url), &[]).body, bytes);

    // Bad headers are refused by name.
    let e = put(s.grpc, "blogA", "../x.png", "", b"x").await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("filename"), "{}", e.message());
    let mut c = s.publisher().await;
    let e = c
        .put_asset(tokio_stream::iter(vec![pb::PutAssetChunk { chunk: Some(Chunk::Data(Bytes::from_static(b"x"))) }]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("header"), "{}", e.message());
    // A chunk with neither a header nor data, after the header.
    let mut v = chunks("blogA", "x.png", "", b"x");
    v.push(pb::PutAssetChunk { chunk: None });
    let e = c.put_asset(tokio_stream::iter(v)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("neither header nor data"), "{}", e.message());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_and_oversize_uploads_leave_nothing() {
    let s = Server::start_with(|p| p.max_asset_bytes = Some(10_000)).await;
    let e = put(s.grpc, "big", "big.bin", "/big.bin", &vec![1u8; 20_000]).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(e.message().contains("max_asset_bytes"), "{}", e.message());

    // A client that sends part of a file and then goes away.
    let grpc = s.grpc;
    let task = tokio::spawn(async move {
        let mut c = pb::publisher_client::PublisherClient::connect(format!("http://{grpc}")).await.unwrap();
        let first = chunks("cut", "cut.bin", "/cut.bin", &[7u8; 5000]);
        let stream = tokio_stream::StreamExt::chain(tokio_stream::iter(first), futures_util::stream::pending());
        let _ = c.put_asset(stream).await;
    });
    // Wait until the server has started writing it, then cut the connection.
    let mut started = false;
    for _ in 0..500 {
        if tmp_files(s.dir.path()) > 0 {
            started = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(started, "the upload never reached the server: the cut would prove nothing");
    task.abort();
    let mut left = usize::MAX;
    for _ in 0..300 {
        left = tmp_files(s.dir.path());
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(left, 0, "temporary files left behind");
    assert!(blobs(s.dir.path()).is_empty(), "no blob stored: {:?}", blobs(s.dir.path()));
    let mut r = s.resolver().await;
    for blog in ["big", "cut"] {
        let e = r.get_blog(pb::GetBlogRequest { blog_id: blog.into() }).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "no metadata for {blog}");
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_binds_paths_and_changes_url_with_content() {
    let s = Server::start().await;
    s.write("imp", "/templates/foo/logo.svg", b"<svg>one</svg>");
    let mut p = s.publisher().await;
    let import = |p: &mut pb::publisher_client::PublisherClient<_>| {
        let req = pb::ImportFileRequest { blog_id: "imp".into(), path: "/templates/foo/logo.svg".into() };
        let mut p: pb::publisher_client::PublisherClient<tonic::transport::Channel> = p.clone();
        async move { p.import_file(req).await.map(|r| r.into_inner()) }
    };
    let first = import(&mut p).await.unwrap();
    let again = import(&mut p).await.unwrap();
    assert_eq!(first.url, again.url, "same bytes, same URL");
    assert_eq!(first.content_type, "image/svg+xml");
    assert_eq!(get(s.http, &path_of(&first.url), &[]).body, b"<svg>one</svg>");

    // The file changes on disk (a sync writes a new file and renames it in).
    let dir = s.blogs_dir().join("imp/templates/foo");
    std::fs::write(dir.join(".tmp"), b"<svg>two</svg>").unwrap();
    std::fs::rename(dir.join(".tmp"), dir.join("logo.svg")).unwrap();
    let second = import(&mut p).await.unwrap();
    assert_ne!(second.url, first.url);
    assert_eq!(get(s.http, &path_of(&second.url), &[]).body, b"<svg>two</svg>");
    // The first URL is permanent: it still serves the first bytes.
    assert_eq!(get(s.http, &path_of(&first.url), &[]).body, b"<svg>one</svg>");
    let mut r = s.resolver().await;
    let res = r
        .resolve_batch(pb::ResolveBatchRequest { blog_id: "imp".into(), paths: vec!["/templates/foo/logo.svg".into()] })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(res.assets[0].url, second.url);

    // Invalidating the path (its bytes changed again) unbinds it: versioned again.
    let id = p
        .invalidate(pb::InvalidateRequest { blog_id: "imp".into(), paths: vec!["/templates/foo/logo.svg".into()] })
        .await
        .unwrap()
        .into_inner()
        .cache_id;
    let res = r
        .resolve_batch(pb::ResolveBatchRequest { blog_id: "imp".into(), paths: vec!["/templates/foo/logo.svg".into()] })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(res.assets[0].cache_id, id);
    assert!(res.assets[0].content_hash.is_empty());

    // Errors name what was wrong.
    let e = p.import_file(pb::ImportFileRequest { blog_id: "imp".into(), path: "/nope.css".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains("/nope.css"), "{}", e.message());
    std::os::unix::fs::symlink("/etc/passwd", s.blogs_dir().join("imp/passwd")).unwrap();
    let e = p.import_file(pb::ImportFileRequest { blog_id: "imp".into(), path: "/passwd".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("outside"), "{}", e.message());
    s.stop().await;
}

/// A file cut while `ImportFile` copies it: the copy (neither the old file
/// nor the new one) never becomes a permanent asset. The call is ABORTED,
/// the path stays unbound and no blob is left; once the file is still, the
/// same call succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_cut_while_it_is_imported_is_refused_and_keeps_nothing() {
    let s = Server::start_with(|p| p.max_asset_bytes = Some(1 << 30)).await;
    let mut p = s.publisher().await;
    let req = || pb::ImportFileRequest { blog_id: "torn".into(), path: "/big.bin".into() };
    let big: Vec<u8> = (0..96u32 << 20).map(|i| (i % 253) as u8).collect();
    let mut aborted = 0;
    for attempt in 0..5 {
        let file = s.write("torn", "/big.bin", &big);
        let mut p2 = p.clone();
        let call = tokio::spawn(async move { p2.import_file(req()).await });
        tokio::time::sleep(Duration::from_millis(30 + 20 * attempt)).await;
        std::fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(1_000_000).unwrap();
        match call.await.unwrap() {
            Err(e) => {
                assert_eq!(e.code(), Code::Aborted, "{}", e.message());
                assert!(e.message().contains("/big.bin") && e.message().contains("changed"), "{}", e.message());
                aborted += 1;
            }
            // Done before the cut, or started after it: one whole version.
            Ok(a) => assert!([big.len() as u64, 1_000_000].contains(&a.into_inner().size), "a torn copy was kept"),
        }
    }
    assert!(aborted > 0, "no import was caught by the cut in five tries");
    let res = resolve(&s, "torn", &["/big.bin"]).await;
    assert_eq!(tmp_files(s.dir.path()), 0, "refused copies were left");
    if aborted == 5 {
        assert!(res[0].content_hash.is_empty(), "the path was bound to a refused copy");
        let left = blobs(s.dir.path());
        assert!(left.is_empty(), "a blob was left: {left:?}");
    }
    // Still now: the same call succeeds, with the file as it is.
    let a = p.import_file(req()).await.unwrap().into_inner();
    assert_eq!(a.size, 1_000_000);
    assert_eq!(get(s.http, &path_of(&a.url), &[]).body, &big[..1_000_000]);
    s.stop().await;
}

/// A file some process still holds for writing (an open descriptor, or a
/// shared writable mapping whose stores move no timestamp) is not imported:
/// ABORTED, naming why, nothing kept. Once let go, the same call succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_still_held_for_writing_is_not_imported() {
    let s = Server::start().await;
    let mut p = s.publisher().await;
    let file = s.write("held", "/logo.svg", b"<svg>whole</svg>");
    let req = || pb::ImportFileRequest { blog_id: "held".into(), path: "/logo.svg".into() };
    let refused = |r: Result<tonic::Response<pb::Asset>, tonic::Status>, how: &str| {
        let e = r.expect_err(how);
        assert_eq!(e.code(), Code::Aborted, "{how}: {}", e.message());
        assert!(e.message().contains("/logo.svg") && e.message().contains("open for writing"), "{}", e.message());
    };
    // A descriptor open for writing.
    let w = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    refused(p.import_file(req()).await, "held by a descriptor");
    drop(w);
    // A shared writable mapping, its descriptor closed.
    let mapped = {
        use std::os::unix::io::AsRawFd;
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&file).unwrap();
        // SAFETY: a fresh mapping of a file of this length, unmapped below.
        let m = unsafe {
            libc::mmap(std::ptr::null_mut(), 16, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, f.as_raw_fd(), 0)
        };
        assert_ne!(m, libc::MAP_FAILED);
        m
    };
    refused(p.import_file(req()).await, "held by a mapping");
    // SAFETY: the mapping made above, of that length.
    unsafe { libc::munmap(mapped, 16) };
    // Another program's write lease (as Samba's oplocks): the file cannot
    // be opened without waiting for it, so the import is ABORTED and the
    // origin answers 503, neither INTERNAL nor 500.
    {
        use std::os::unix::io::AsRawFd;
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&file).unwrap();
        // SAFETY: fcntl on our descriptor; the break signal is one ignored
        // by default (SIGIO would end the test).
        unsafe {
            assert_eq!(libc::fcntl(f.as_raw_fd(), 10 /* F_SETSIG */, libc::SIGWINCH), 0);
            assert_eq!(libc::fcntl(f.as_raw_fd(), libc::F_SETLEASE, libc::F_WRLCK), 0, "a write lease");
        }
        let e = p.import_file(req()).await.expect_err("imported past a lease");
        assert_eq!(e.code(), Code::Aborted, "{}", e.message());
        assert!(e.message().contains("lease"), "{}", e.message());
        let r = get(s.http, "/held/logo.svg", &[]);
        assert_eq!((r.status, r.header("retry-after")), (503, Some("1")));
        // SAFETY: as above.
        unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK) };
    }
    // A link out of the blog to a leased file (in this test's own folder)
    // is refused as any link out, never 503: no telling a lease exists.
    {
        use std::os::unix::io::AsRawFd;
        let outside = s.dir.path().join("outside.txt");
        std::fs::write(&outside, b"not the blog's").unwrap();
        std::os::unix::fs::symlink(&outside, file.with_file_name("out.txt")).unwrap();
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&outside).unwrap();
        // SAFETY: as above.
        unsafe {
            assert_eq!(libc::fcntl(f.as_raw_fd(), 10 /* F_SETSIG */, libc::SIGWINCH), 0);
            assert_eq!(libc::fcntl(f.as_raw_fd(), libc::F_SETLEASE, libc::F_WRLCK), 0, "a write lease");
        }
        assert_eq!(get(s.http, "/held/out.txt", &[]).status, 404);
        let r = p.import_file(pb::ImportFileRequest { blog_id: "held".into(), path: "/out.txt".into() }).await;
        let e = r.expect_err("imported through a link out");
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
        assert!(e.message().contains("outside"), "{}", e.message());
        // SAFETY: as above.
        unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK) };
    }
    assert!(blobs(s.dir.path()).is_empty(), "a refused import left a blob");
    assert!(resolve(&s, "held", &["/logo.svg"]).await[0].content_hash.is_empty(), "the path was bound");
    let a = p.import_file(req()).await.expect("let go: imported").into_inner();
    assert_eq!(get(s.http, &path_of(&a.url), &[]).body, b"<svg>whole</svg>");
    s.stop().await;
}

/// Imports `path` again and again for 5 s: each import either ABORTED or
/// kept as one of `versions` whole. Returns (kept, aborted).
async fn import_for_5_s(s: &Server, blog: &str, path: &str, versions: [&Vec<u8>; 2], what: &str) -> (usize, usize) {
    let mut p = s.publisher().await;
    let (mut kept, mut aborted) = (0, 0);
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        match p.import_file(pb::ImportFileRequest { blog_id: blog.into(), path: path.into() }).await {
            Ok(asset) => {
                let body = get(s.http, &path_of(&asset.into_inner().url), &[]).body;
                let ones = body.iter().filter(|&&c| c == versions[0][0]).count();
                assert!(
                    versions.contains(&&body),
                    "{what}: a torn copy was kept: {} bytes, {ones} of the first",
                    body.len()
                );
                kept += 1;
            }
            Err(e) => {
                assert_eq!(e.code(), Code::Aborted, "{what}: {}", e.message());
                aborted += 1;
            }
        }
    }
    (kept, aborted)
}

/// A program rewriting a blog file while `ImportFile` reads it, in ways no
/// time check sees (stores through a shared mapping made after the import
/// began and gone before it ends; a file cut, then written a moment later):
/// every import acknowledged is one whole version of the file, never a mix
/// of the two nor the empty moment between them; the others are ABORTED.
/// (Before the read lease was held through the copy, a mix of the two
/// became a permanent asset within a few dozen tries, and the empty file
/// now and then.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_rewritten_while_it_is_imported_is_never_kept_torn() {
    let s = Server::start().await;
    let mut p = s.publisher().await;
    let n = 4 << 20;
    let (a, b) = (vec![b'A'; n], vec![b'B'; n]);
    for how in [Rewrite::Mapped, Rewrite::CutThenWritten] {
        let file = s.write("rw", "/x.bin", &a);
        std::thread::sleep(Duration::from_millis(30));
        let writer = keep_rewriting(file, a.clone(), b.clone(), how);
        let (kept, aborted) = import_for_5_s(&s, "rw", "/x.bin", [&a, &b], &format!("{how:?}")).await;
        let rewrites = writer.finish();
        eprintln!("{how:?}: {rewrites} rewrites, {kept} imports kept, {aborted} aborted");
        assert!(rewrites > 10 && kept + aborted > 10, "{how:?}: too few tries to say anything");
        // Left alone, the file is imported as it is.
        std::thread::sleep(Duration::from_millis(30));
        let asset = p.import_file(pb::ImportFileRequest { blog_id: "rw".into(), path: "/x.bin".into() }).await;
        let body = get(s.http, &path_of(&asset.expect("a file left alone").into_inner().url), &[]).body;
        assert!(body == a || body == b, "{how:?}: the file left alone was not imported whole");
    }
    s.stop().await;
}

/// An import whose caller went away (its deadline passed) while the file
/// was copied keeps nothing: the caller was told it failed, so the path
/// stays unbound and no blob is left. (Before, the copy went on and was
/// bound after the caller had its error.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_whose_caller_went_away_keeps_nothing() {
    let s = Server::start_with(|p| p.max_asset_bytes = Some(1 << 30)).await;
    let mut p = s.publisher().await;
    s.write("gone", "/big.bin", &vec![7u8; 64 << 20]);
    std::thread::sleep(Duration::from_millis(30));
    let mut req = tonic::Request::new(pb::ImportFileRequest { blog_id: "gone".into(), path: "/big.bin".into() });
    req.set_timeout(Duration::from_millis(20));
    let e = p.import_file(req).await.expect_err("a 64 MiB import done within 20 ms");
    assert!([Code::DeadlineExceeded, Code::Cancelled].contains(&e.code()), "{e:?}");
    // The copy goes on a while after the call's end (it reads to the end
    // of the file): wait for it to start, then to end.
    let started = std::time::Instant::now();
    while tmp_files(s.dir.path()) == 0 && started.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(1));
    }
    while tmp_files(s.dir.path()) > 0 && started.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(tmp_files(s.dir.path()), 0, "the copy did not end in 60 s");
    // A binding would be durable within this.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(resolve(&s, "gone", &["/big.bin"]).await[0].content_hash.is_empty(), "bound after its caller went away");
    assert!(blobs(s.dir.path()).is_empty(), "a blob was kept");
    // Asked again, and waited for, it is imported.
    let a = p.import_file(pb::ImportFileRequest { blog_id: "gone".into(), path: "/big.bin".into() }).await.unwrap();
    assert_eq!(a.into_inner().size, 64 << 20);
    s.stop().await;
}

/// Where the server can take no read lease (here: blog folders on an
/// overlay filesystem, as in a container's own layer, whose leases would not
/// see a mapping of the file beneath), a program storing into the file
/// through a mapping it keeps moves no time; an import is kept only if the
/// file read twice reads the same, so none acknowledged is a mix of two
/// versions. Needs to mount the overlay (root); said and skipped otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_lease_a_file_written_through_a_kept_mapping_is_never_imported_torn() {
    let dir = tempfile::tempdir().unwrap();
    let [lower, upper, work, merged] = ["l", "u", "w", "m"].map(|d| dir.path().join(d));
    for d in [&lower, &upper, &work, &merged] {
        std::fs::create_dir(d).unwrap();
    }
    let opts = format!("lowerdir={},upperdir={},workdir={}", lower.display(), upper.display(), work.display());
    let mounted = Command::new("mount").args(["-t", "overlay", "overlay", "-o", &opts]).arg(&merged).status();
    if !mounted.is_ok_and(|m| m.success()) {
        eprintln!("skipped: no overlay could be mounted here (no CAP_SYS_ADMIN, or no overlayfs)");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(merged.clone());
    let blogs = merged.clone();
    let s = Server::start_with(|p| p.blogs_dir = Some(blogs)).await;
    let n = 4 << 20;
    let (a, b) = (vec![b'A'; n], vec![b'B'; n]);
    let file = s.write("ov", "/x.bin", &a);
    std::thread::sleep(Duration::from_millis(30));
    let writer = keep_rewriting(file, a.clone(), b.clone(), Rewrite::OneMapping);
    let (kept, aborted) = import_for_5_s(&s, "ov", "/x.bin", [&a, &b], "overlay").await;
    let rewrites = writer.finish();
    eprintln!("{rewrites} rewrites, {kept} imports kept, {aborted} aborted");
    assert!(rewrites > 10 && kept > 0 && aborted > 0, "too few of either to say anything");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_one_blog_keeps_shared_bytes_for_the_other() {
    let s = Server::start().await;
    let shared = put(s.grpc, "one", "s.png", "/s.png", b"shared bytes").await.unwrap();
    let only = put(s.grpc, "one", "o.png", "/o.png", b"only in one").await.unwrap();
    let two = put(s.grpc, "two", "s.png", "", b"shared bytes").await.unwrap();
    let mut p = s.publisher().await;
    p.set_domain(pb::SetDomainRequest { domain: "one.example".into(), blog_id: "one".into() }).await.unwrap();
    s.write("one", "/style.css", b"x");
    let id = p
        .invalidate(pb::InvalidateRequest { blog_id: "one".into(), paths: vec![] })
        .await
        .unwrap()
        .into_inner()
        .cache_id;
    assert_eq!(blobs(s.dir.path()).len(), 2);

    p.delete_blog(pb::DeleteBlogRequest { blog_id: "one".into() }).await.unwrap();
    assert_eq!(get(s.http, &path_of(&shared.url), &[]).status, 404);
    assert_eq!(get(s.http, &path_of(&only.url), &[]).status, 404);
    assert_eq!(get(s.http, &format!("/one/{id}/style.css"), &[]).status, 404);
    assert_eq!(get(s.http, &path_of(&two.url), &[]).body, b"shared bytes");
    assert_eq!(blobs(s.dir.path()), vec![two.hash.clone()], "the unshared blob is gone");
    let mut r = s.resolver().await;
    assert_eq!(r.get_blog(pb::GetBlogRequest { blog_id: "one".into() }).await.unwrap_err().code(), Code::NotFound);
    let e = r.lookup_domain(pb::LookupDomainRequest { domain: "one.example".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = p.delete_blog(pb::DeleteBlogRequest { blog_id: "one".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    s.stop().await;
}

/// A permanent URL is the same answer for as long as it lives: the same bytes
/// uploaded or imported again with another type keep the first one, and the
/// answer says so. (A hostile test flipped a font's URL to text/html, and its
/// CORS header off, with a second upload.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_url_keeps_its_first_type_when_the_same_bytes_come_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ChildServer::spawn(dir.path());
    let bytes = b"wOFF and then some bytes of a font";
    let font = put(server.grpc, "typed", "font.woff", "", bytes).await.unwrap();
    assert_eq!(font.content_type, "application/font-woff");
    let served = |server: &ChildServer, what: &str| {
        let r = get(server.http, &path_of(&font.url), &[]);
        assert_eq!((r.status, r.body.as_slice()), (200, &bytes[..]), "{what}");
        (r.header("content-type").map(str::to_owned), r.header("access-control-allow-origin").map(str::to_owned))
    };
    let first = served(&server, "first");
    assert_eq!(first, (Some(font.content_type.clone()), Some("*".into())), "a font is served to other origins");
    // The same bytes as a page, by upload and by import: the answer names the type kept.
    let again = put(server.grpc, "typed", "page.html", "", bytes).await.unwrap();
    assert_eq!((again.hash.as_str(), again.content_type.as_str()), (font.hash.as_str(), font.content_type.as_str()));
    std::fs::create_dir_all(dir.path().join("blogs/typed")).unwrap();
    std::fs::write(dir.path().join("blogs/typed/same.html"), bytes).unwrap();
    let mut p = pb::publisher_client::PublisherClient::connect(format!("http://{}", server.grpc)).await.unwrap();
    let imported =
        p.import_file(pb::ImportFileRequest { blog_id: "typed".into(), path: "/same.html".into() }).await.unwrap();
    assert_eq!(imported.into_inner().content_type, font.content_type);
    assert_eq!(served(&server, "after the second upload"), first);
    // Another blog's reference has a type of its own.
    let other = put(server.grpc, "other", "page.html", "", bytes).await.unwrap();
    assert_eq!(other.content_type, "text/html");
    // And so it stays after a crash (the log read again) and after a clean restart.
    server.kill9();
    let mut server = ChildServer::spawn(dir.path());
    assert_eq!(served(&server, "after kill -9"), first);
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    assert!(server.child.wait().unwrap().success());
    let server = ChildServer::spawn(dir.path());
    assert_eq!(served(&server, "after a clean restart"), first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_deletion_never_loses_a_referenced_blob() {
    for (round, delay_ms) in [0u64, 1, 3, 8, 20].into_iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let mut server = ChildServer::spawn(dir.path());
        // "doomed" holds 150 blobs, 50 of them shared with "keeper".
        let mut keeper_urls = Vec::new();
        let mut doomed_urls = Vec::new();
        for i in 0..150u32 {
            let data = format!("blob {i} of round {round}");
            let d = put(server.grpc, "doomed", &format!("f{i}.txt"), "", data.as_bytes()).await.unwrap();
            doomed_urls.push((d, data.clone()));
            if i % 3 == 0 {
                let k = put(server.grpc, "keeper", &format!("k{i}.txt"), "", data.as_bytes()).await.unwrap();
                keeper_urls.push((k, data));
            }
        }
        let grpc = server.grpc;
        let del = tokio::spawn(async move {
            // The kill may come before the connection is made (delay 0): a
            // deletion never sent is not acknowledged either.
            let mut c = pb::publisher_client::PublisherClient::connect(format!("http://{grpc}"))
                .await
                .map_err(|e| tonic::Status::unavailable(format!("not connected before the kill: {e}")))?;
            c.delete_blog(pb::DeleteBlogRequest { blog_id: "doomed".into() }).await
        });
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        server.kill9();
        let acked = del.await.unwrap().is_ok();

        let server = ChildServer::spawn(dir.path());
        for (a, data) in &keeper_urls {
            let r = get(server.http, &path_of(&a.url), &[]);
            assert_eq!((r.status, r.body.as_slice()), (200, data.as_bytes()), "round {round}: keeper lost {}", a.hash);
        }
        let mut r = pb::resolver_client::ResolverClient::connect(format!("http://{}", server.grpc)).await.unwrap();
        let doomed = r.get_blog(pb::GetBlogRequest { blog_id: "doomed".into() }).await;
        match doomed {
            Ok(b) => {
                assert!(!acked, "round {round}: an acknowledged deletion came back");
                // Not deleted: every blob it references is there, bytes and all.
                assert_eq!(b.into_inner().asset_count, 150);
                assert_eq!(blobs(dir.path()).len(), 150);
                for (a, data) in &doomed_urls {
                    let r = get(server.http, &path_of(&a.url), &[]);
                    assert_eq!((r.status, r.body.as_slice()), (200, data.as_bytes()), "round {round}");
                }
            }
            // Deleted: a restart finished the removal; only keeper's blobs remain,
            // and none of the deleted blog's URLs answers.
            Err(e) => {
                assert_eq!(e.code(), Code::NotFound);
                assert_eq!(blobs(dir.path()).len(), keeper_urls.len(), "round {round}");
                for (a, _) in &doomed_urls {
                    assert_eq!(get(server.http, &path_of(&a.url), &[]).status, 404, "round {round}");
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsck_finds_and_quarantines_corrupt_blobs() {
    let s = Server::start().await;
    let good = put(s.grpc, "f", "good.txt", "", b"good bytes").await.unwrap();
    let bad = put(s.grpc, "f", "bad.txt", "", b"bad bytes").await.unwrap();
    let gone = put(s.grpc, "f", "gone.txt", "", b"gone bytes").await.unwrap();
    let folder = put(s.grpc, "f", "folder.txt", "", b"now a folder").await.unwrap();
    let fifo = put(s.grpc, "f", "fifo.txt", "", b"now a fifo").await.unwrap();
    let socket = put(s.grpc, "f", "socket.txt", "", b"now a socket").await.unwrap();
    let dir = s.stop().await;
    let blob = |h: &str| common::blob_file(dir.path(), h);
    std::fs::write(blob(&bad.hash), b"flipped bits").unwrap();
    std::fs::remove_file(blob(&gone.hash)).unwrap();
    // What a damaged disk or a hand can leave where a blob should be: a folder, and a
    // FIFO, which a plain open waits on for ever (a hostile test's fsck hung on one).
    std::fs::remove_file(blob(&folder.hash)).unwrap();
    std::fs::create_dir(blob(&folder.hash)).unwrap();
    std::fs::remove_file(blob(&fifo.hash)).unwrap();
    let c = std::ffi::CString::new(blob(&fifo.hash).to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    // A socket, which an open refuses (a hostile test's fsck ended on one, hiding the rest).
    std::fs::remove_file(blob(&socket.hash)).unwrap();
    let _bound = std::os::unix::net::UnixListener::bind(blob(&socket.hash)).unwrap();
    // And a file where a folder of the store's fan-out should be.
    std::fs::write(blob(&good.hash).parent().unwrap().parent().unwrap().join("zz"), b"stray").unwrap();

    let fsck =
        |extra: &[&str]| run(Command::new(binary()).args(["fsck", "--data-dir"]).arg(dir.path()).args(extra), 60);
    let (code, out, err) = fsck(&[]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains(&format!("corrupt {}", bad.hash)), "{out}");
    assert!(out.contains(&format!("missing {}", gone.hash)), "{out}");
    assert!(out.contains(&format!("corrupt {}", folder.hash)), "{out}");
    assert!(out.contains(&format!("corrupt {}", fifo.hash)), "{out}");
    assert!(out.contains(&format!("corrupt {}", socket.hash)), "{out}");
    assert!(!out.contains(&good.hash), "{out}");
    assert!(blob(&bad.hash).exists(), "report only without --quarantine");

    let (code, out, _) = fsck(&["--quarantine"]);
    assert_eq!(code, 1);
    assert!(out.contains("quarantined"), "{out}");
    assert!(!blob(&bad.hash).exists());
    assert!(dir.path().join("cas/quarantine").join(&bad.hash).exists());
    assert!(!blob(&fifo.hash).exists() && !blob(&folder.hash).exists());
    assert!(blob(&good.hash).exists());
}

/// A blob that went bad on disk (one bit flipped, same size) is refused
/// with a 500 the edges do not keep, never answered with its wrong bytes
/// under a URL they would keep for a year; the blog's other assets are
/// still served. Small blobs and large ones (sent from disk) alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_damaged_on_disk_is_refused_not_served() {
    let s = Server::start().await;
    let bytes: Vec<u8> = (0..40_000u32).map(|i| (i % 253) as u8).collect();
    let bad = put(s.grpc, "f", "photo.jpg", "", &bytes).await.unwrap();
    let good = put(s.grpc, "f", "logo.png", "", b"fine bytes").await.unwrap();
    let blob = common::blob_file(s.dir.path(), &bad.hash);
    let mut damaged = std::fs::read(&blob).unwrap();
    damaged[20_000] ^= 1;
    common::overwrite_blob(&blob, &damaged);

    for _ in 0..2 {
        let r = get(s.http, &path_of(&bad.url), &[]);
        assert_eq!(r.status, 500, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.header("cache-control"), Some("no-store"));
        assert!(String::from_utf8_lossy(&r.body).contains("damaged"), "{}", String::from_utf8_lossy(&r.body));
    }
    let r = get(s.http, &path_of(&good.url), &[]);
    assert_eq!((r.status, r.body.as_slice()), (200, &b"fine bytes"[..]));
    // Put back as it was, it is served again.
    std::fs::write(&blob, &bytes).unwrap();
    let r = get(s.http, &path_of(&bad.url), &[]);
    assert_eq!((r.status, r.body == bytes), (200, true));

    // Too large to be kept hot (2 MiB): served whole once, then damaged;
    // the change to its file has it hashed again before the next answer.
    let big: Vec<u8> = (0..2u32 << 20).map(|i| (i % 251) as u8).collect();
    let large = put(s.grpc, "f", "video.mp4", "", &big).await.unwrap();
    let r = get(s.http, &path_of(&large.url), &[]);
    assert_eq!((r.status, r.body.len(), r.body == big), (200, big.len(), true));
    let blob = common::blob_file(s.dir.path(), &large.hash);
    let mut damaged = big.clone();
    damaged[big.len() - 1] ^= 0x80;
    common::overwrite_blob(&blob, &damaged);
    let r = get(s.http, &path_of(&large.url), &[]);
    assert_eq!((r.status, r.header("cache-control")), (500, Some("no-store")));

    // A blob that cannot be read (here a folder where the file was, EISDIR)
    // is the server's failure, not a missing file: 500 no-store, never a 404
    // the edges would keep.
    let unreadable = put(s.grpc, "f", "icon.png", "", b"icon bytes").await.unwrap();
    let blob = common::blob_file(s.dir.path(), &unreadable.hash);
    std::fs::remove_file(&blob).unwrap();
    std::fs::create_dir(&blob).unwrap();
    let r = get(s.http, &path_of(&unreadable.url), &[]);
    assert_eq!((r.status, r.header("cache-control")), (500, Some("no-store")), "{}", String::from_utf8_lossy(&r.body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_put_import_dir_and_delete() {
    let s = Server::start().await;
    let server = format!("http://{}", s.grpc);
    let cli = |args: &[&str]| {
        let mut c = Command::new(binary());
        c.args(args).env("BLOTCDN_SERVER", &server).env("BLOTCDN_BLOGS_DIR", s.blogs_dir());
        run(&mut c, 60)
    };
    let f = s.dir.path().join("avatar.png");
    std::fs::write(&f, b"avatar bytes").unwrap();
    let (code, out, err) = cli(&["put", "--blog", "cli", f.to_str().unwrap(), "--path", "/avatars/me.png"]);
    assert_eq!(code, 0, "{err}");
    let url = out.split('\t').nth(1).unwrap().to_owned();
    assert!(url.contains("/cli/_assets/") && url.ends_with("/avatar.png"), "{out}");
    assert_eq!(get(s.http, &path_of(&url), &[]).body, b"avatar bytes");

    for (p, b) in [("/templates/t/style.css", "a"), ("/templates/t/js/app.js", "b"), ("/templates/t/.hidden", "c")] {
        s.write("cli", p, b.as_bytes());
    }
    // A file refused in the middle of the folder (a second name for it
    // elsewhere): the files after it are imported all the same, and the
    // import says which one was not, and fails.
    let linked = s.write("cli", "/templates/t/linked.css", b"d");
    std::fs::hard_link(&linked, s.dir.path().join("elsewhere.css")).unwrap();
    // Left out, and said: a symbolic link and a FIFO.
    let folder = s.blogs_dir().join("cli/templates/t");
    std::os::unix::fs::symlink("style.css", folder.join("alias.css")).unwrap();
    let fifo = std::ffi::CString::new(folder.join("pipe").to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    let (code, out, err) = cli(&["import", "--blog", "cli", "--dir", "/templates/t"]);
    assert!(err.contains("skipped: /templates/t/alias.css (a symbolic link)"), "{err}");
    assert!(err.contains("skipped: /templates/t/pipe (not a regular file)"), "{err}");
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("imported 2 files"), "{out}");
    assert!(err.contains("not imported: /templates/t/linked.css") && err.contains("hard link"), "{err}");
    assert!(err.contains("1 of 3 files were not imported"), "{err}");
    std::fs::remove_file(s.dir.path().join("elsewhere.css")).unwrap();
    let (code, out, err) = cli(&["import", "--blog", "cli", "--dir", "/templates/t"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("imported 3 files"), "{out}");
    let (code, out, _) = cli(&["resolve", "--blog", "cli", "/templates/t/style.css", "/templates/t/js/app.js"]);
    assert_eq!(code, 0);
    assert_eq!(out.matches("/_assets/").count(), 2, "{out}");
    // `/` is the whole blog. A folder too deep to be listed (past PATH_MAX, made by a
    // child a folder at a time) is said and counted; the rest is imported all the same.
    let deep = s.blogs_dir().join("cli/deep");
    std::fs::create_dir_all(&deep).unwrap();
    let name = "d".repeat(200);
    let script =
        "import os,sys\nos.chdir(sys.argv[1])\nfor _ in range(30):\n    os.mkdir(sys.argv[2]); os.chdir(sys.argv[2])\n";
    let made = run(Command::new("python3").args(["-c", script]).arg(&deep).arg(&name), 30);
    assert_eq!(made.0, 0, "{made:?}");
    std::fs::write(s.blogs_dir().join("cli/top.txt"), b"top").unwrap();
    let (code, out, err) = cli(&["import", "--blog", "cli", "--dir", "/"]);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("imported 4 files"), "{out}{err}");
    assert!(err.contains("a folder that cannot be listed") && err.contains("1 folders could not be listed"), "{err}");
    let (code, out, _) = cli(&["resolve", "--blog", "cli", "/top.txt"]);
    assert_eq!(code, 0);
    assert!(out.contains("/_assets/"), "{out}");
    run(Command::new("rm").args(["-rf"]).arg(&deep), 30);

    let (code, out, _) = cli(&["blog", "get", "cli"]);
    assert_eq!(code, 0);
    assert!(out.contains("asset_count 5"), "{out}");
    let (code, out, err) = cli(&["delete-blog", "cli"]);
    assert_eq!((code, out.trim()), (0, "deleted cli"), "{err}");
    let (code, _, err) = cli(&["blog", "get", "cli"]);
    assert_ne!(code, 0);
    assert!(err.contains("NotFound") && err.contains("unknown blog cli"), "{err}");
    s.stop().await;
}

/// Descriptors this process holds (nextest runs each test in a process of
/// its own, the server included).
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_asset_is_sent_from_its_blob_whole_in_parts_and_leaves_no_descriptor() {
    let s = Server::start().await;
    // Past what is kept in memory (1 MiB): sent from the blob file.
    let bytes: Vec<u8> = (0..1_500_000u32).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
    let a = put(s.grpc, "big", "photo.jpg", "", &bytes).await.unwrap();
    let path = path_of(&a.url);
    let resp = get(s.http, &path, &[]);
    assert_eq!(resp.status, 200);
    assert!(resp.body == bytes, "the bytes differ from the upload's");
    assert_eq!(resp.header("content-type"), Some("image/jpeg"));
    let resp = get(s.http, &path, &[("Range", "bytes=1000000-1000009")]);
    assert_eq!((resp.status, resp.body.as_slice()), (206, &bytes[1_000_000..1_000_010]));
    let resp = common::request(s.http, "HEAD", &path, &[]);
    assert_eq!((resp.status, resp.body.len()), (200, 0));
    assert_eq!(resp.header("content-length"), Some("1500000"));
    let before = open_fds();
    for _ in 0..20 {
        assert_eq!(get(s.http, &path, &[]).body.len(), bytes.len());
    }
    let after = open_fds();
    assert!(after <= before + 2, "descriptors held after the answers: {before} → {after}");
    s.stop().await;
}
