//! What a hostile tester broke, each checked the way a user would see it:
//! permanent bytes that changed under another blog's sync tool, deleted
//! blogs coming back with old ids, special files and links in blog folders,
//! a full disk, and the smaller edges of the HTTP and gRPC contracts.

use crate::common;

use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

use blotcdn::proto::{self as pb, put_asset_chunk::Chunk};
use bytes::Bytes;
use common::{binary, curl, get, invalidate, path_of, run, ChildServer, Server};
use tonic::Code;

fn upload(blog: &str, filename: &str, path: &str, data: &[u8]) -> Vec<pb::PutAssetChunk> {
    let header = pb::PutAssetHeader {
        blog_id: blog.into(),
        filename: filename.into(),
        content_type: String::new(),
        path: path.into(),
    };
    let mut v = vec![pb::PutAssetChunk { chunk: Some(Chunk::Header(header)) }];
    for c in data.chunks(64 * 1024) {
        v.push(pb::PutAssetChunk { chunk: Some(Chunk::Data(Bytes::copy_from_slice(c))) });
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_tool_rewriting_an_imported_file_never_changes_a_permanent_url() {
    use std::os::unix::fs::MetadataExt;
    let s = Server::start().await;
    let original = b"body { color: teal }".repeat(100);
    let file = s.write("alice", "/theme.css", &original);
    let mut p = s.publisher().await;
    let a = p.import_file(pb::ImportFileRequest { blog_id: "alice".into(), path: "/theme.css".into() }).await;
    let a = a.unwrap().into_inner();
    // Another blog uploads the same bytes: stored once, one URL each.
    let b = p.put_asset(tokio_stream::iter(upload("bob", "theme.css", "", &original))).await.unwrap().into_inner();
    assert_eq!(a.hash, b.hash);
    // No blob shares its inode with the user's file.
    assert_eq!(std::fs::metadata(&file).unwrap().nlink(), 1, "the blog's file is linked into the CAS");

    // Alice's sync tool rewrites the file in place (same inode, new bytes).
    let mut f = std::fs::OpenOptions::new().write(true).truncate(true).open(&file).unwrap();
    f.write_all(b"body { color: red }").unwrap();
    drop(f);
    for url in [&a.url, &b.url] {
        let r = get(s.http, &path_of(url), &[]);
        assert_eq!(r.status, 200);
        assert_eq!(r.body, original, "{url} changed its bytes");
        assert_eq!(r.header("etag"), Some(format!("\"{}\"", a.hash).as_str()));
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_blog_created_again_never_reuses_a_cache_id_and_its_files_stay_gone() {
    let s = Server::start().await;
    s.write("phoenix", "/avatar.png", b"old avatar");
    // A burst pushes cache ids ahead of the clock (each is max(now, last + 1)).
    let mut p = s.publisher().await;
    let mut last = 0;
    for _ in 0..3000 {
        let r = p.invalidate(pb::InvalidateRequest { blog_id: "phoenix".into(), paths: vec![] }).await;
        last = r.unwrap().into_inner().cache_id;
    }
    assert_eq!(get(s.http, "/phoenix/avatar.png", &[]).status, 200);
    p.delete_blog(pb::DeleteBlogRequest { blog_id: "phoenix".into() }).await.unwrap();
    // Gone, even its unversioned URL whose file is still in the folder.
    let r = get(s.http, "/phoenix/avatar.png", &[]);
    assert_eq!(r.status, 404, "a deleted blog's folder is still served");

    // Created again at once: every new id is above every old one.
    let first = invalidate(&s, "phoenix", &[]).await;
    assert!(first > last, "new id {first} is not above the deleted blog's last id {last}");
    assert_eq!(get(s.http, "/phoenix/avatar.png", &[]).status, 200, "a blog created again serves its folder");
    // Also across a restart.
    let id_before = invalidate(&s, "phoenix", &[]).await;
    let dir = s.stop().await;
    let s = Server::start_in(dir, |_| {}).await;
    let mut p = s.publisher().await;
    p.delete_blog(pb::DeleteBlogRequest { blog_id: "phoenix".into() }).await.unwrap();
    let dir = s.stop().await;
    let s = Server::start_in(dir, |_| {}).await;
    assert_eq!(get(s.http, "/phoenix/avatar.png", &[]).status, 404, "deleted across a restart");
    let again = invalidate(&s, "phoenix", &[]).await;
    assert!(again > id_before, "after restarts: {again} not above {id_before}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn special_files_long_names_and_hard_links_in_a_blog_folder_are_404() {
    let s = Server::start().await;
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret.txt");
    std::fs::write(&secret, "OUTSIDE-SECRET").unwrap();
    s.write("odd", "/ok.txt", b"fine");
    let dir = s.blogs_dir().join("odd");
    // A socket (open gives ENXIO), a hard link to a file outside the folder.
    let _sock = std::os::unix::net::UnixListener::bind(dir.join("sock")).unwrap();
    // Same filesystem needed for a hard link: put the outside file beside the blogs dir.
    let beside = s.blogs_dir().parent().unwrap().join("outside-secret.txt");
    std::fs::write(&beside, "OUTSIDE-SECRET").unwrap();
    std::fs::hard_link(&beside, dir.join("linked.txt")).unwrap();
    let id = invalidate(&s, "odd", &[]).await;
    let long = "a".repeat(300);
    for target in [
        format!("/odd/{id}/sock"),
        "/odd/sock".to_string(),
        format!("/odd/{id}/{long}.txt"),
        format!("/odd/{long}.txt"),
        format!("/odd/{id}/linked.txt"),
        "/odd/linked.txt".to_string(),
    ] {
        let r = get(s.http, &target, &[]);
        assert_eq!(r.status, 404, "{target}: {}", String::from_utf8_lossy(&r.body));
        assert!(!String::from_utf8_lossy(&r.body).contains("OUTSIDE-SECRET"));
    }
    assert_eq!(get(s.http, &format!("/odd/{id}/ok.txt"), &[]).body, b"fine");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_racing_a_rename_is_found_missing_or_aborted_never_internal() {
    let s = Server::start().await;
    let a = s.write("race", "/a.css", b"racing bytes");
    let b = a.with_file_name("b.css");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flipper = {
        let (a, b, stop) = (a.clone(), b.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && n < 1_000_000 {
                let _ = std::fs::rename(&a, &b);
                let _ = std::fs::rename(&b, &a);
                n += 1;
            }
        })
    };
    let mut p = s.publisher().await;
    let (mut ok, mut missing, mut aborted) = (0, 0, 0);
    for _ in 0..300 {
        match p.import_file(pb::ImportFileRequest { blog_id: "race".into(), path: "/a.css".into() }).await {
            Ok(asset) => {
                assert_eq!(asset.into_inner().size, 12);
                ok += 1;
            }
            Err(e) if e.code() == Code::NotFound => missing += 1,
            // Renamed while it was copied (its change time moved): refused,
            // to be retried, as any file that changes during an import.
            Err(e) if e.code() == Code::Aborted && e.message().contains("changed while it was imported") => {
                aborted += 1
            }
            Err(e) => panic!("import during a rename: {:?} {}", e.code(), e.message()),
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flipper.join().unwrap();
    eprintln!("{ok} imported, {missing} not found mid-rename, {aborted} renamed while copied");
    assert_eq!(ok + missing + aborted, 300);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_come_from_the_binding_not_the_url_and_edge_cases_of_the_http_contract() {
    let s = Server::start_with(|p| p.resolver_tokens = Some(vec!["r-token".into()])).await;
    let mut p = s.publisher().await;
    let a = p.put_asset(tokio_stream::iter(upload("fonts", "logo.png", "", b"\x89PNG not a font")));
    let a = a.await.unwrap().into_inner();
    let url = path_of(&a.url);
    let as_font = url.replace("logo.png", "logo.woff2");
    let r = get(s.http, &as_font, &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("image/png"), "the content type is the asset's");
    assert_eq!(r.header("access-control-allow-origin"), None, "renaming a URL to .woff2 must not add CORS");
    let f = p.put_asset(tokio_stream::iter(upload("fonts", "face.woff2", "", b"wOF2 font bytes"))).await;
    let r = get(s.http, &path_of(&f.unwrap().into_inner().url), &[]);
    assert_eq!(r.header("access-control-allow-origin"), Some("*"), "a font keeps its CORS");

    // A range starting past any file: 416, not the whole file.
    let r = get(s.http, &url, &[("Range", "bytes=18446744073709551615-")]);
    assert_eq!(r.status, 416);
    assert_eq!(r.header("content-range"), Some("bytes */15"));
    let r = get(s.http, &url, &[("Range", "bytes=99999999999999999999999-")]);
    assert_eq!(r.status, 416);

    // The bearer scheme is case-insensitive.
    let ch = tonic::transport::Channel::from_shared(format!("http://{}", s.grpc)).unwrap().connect().await.unwrap();
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let auth: tonic::metadata::MetadataValue<_> = format!("{scheme} r-token").parse().unwrap();
        let mut r =
            pb::resolver_client::ResolverClient::with_interceptor(ch.clone(), move |mut req: tonic::Request<()>| {
                req.metadata_mut().insert("authorization", auth.clone());
                Ok(req)
            });
        let got = r.get_blog(pb::GetBlogRequest { blog_id: "fonts".into() }).await;
        assert!(got.is_ok(), "{scheme}: {:?}", got.err());
    }
    s.stop().await;
}

#[test]
fn a_blogs_dir_that_holds_the_data_dir_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    for blogs in [dir.path().to_owned(), dir.path().parent().unwrap().to_owned()] {
        let (code, out, err) = run(
            Command::new(binary()).args(["serve", "--data-dir"]).arg(dir.path()).arg("--blogs-dir").arg(&blogs).args([
                "--grpc-addr",
                "127.0.0.1:0",
                "--http-addr",
                "127.0.0.1:0",
            ]),
            30,
        );
        assert_ne!(code, 0, "started with blogs_dir {}: {out}", blogs.display());
        assert!(err.contains("blogs_dir"), "the error names the key: {err}");
    }
}

/// A serving folder named as one of the data dir's own files (`db.wal`,
/// `db.snapshot`, …) or inside one: before, `db.snapshot` turned index
/// snapshots off in silence, and `db.wal` stopped the start and left a
/// folder there that stopped every start after. Now the start refuses,
/// naming the key, and leaves nothing behind.
#[test]
fn a_serving_folder_on_the_data_dirs_own_names_is_refused_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let serve = |flag: &str, folder: &std::path::Path| {
        run(
            Command::new(binary()).args(["serve", "--data-dir"]).arg(&data).arg(flag).arg(folder).args([
                "--grpc-addr",
                "127.0.0.1:0",
                "--http-addr",
                "127.0.0.1:0",
            ]),
            30,
        )
    };
    for (flag, name) in [
        ("--static-dir", "db.wal"),
        ("--static-dir", "db.snapshot"),
        ("--blogs-dir", "db.snapshot-tail"),
        ("--static-dir", "cas/blobs"),
        ("--blogs-dir", "store-kind"),
        // Through a folder that does not exist yet, and back.
        ("--static-dir", "new/../db.wal"),
    ] {
        let folder = data.join(name);
        let (code, out, err) = serve(flag, &folder);
        assert_ne!(code, 0, "started with {flag} {}: {out}", folder.display());
        let key = flag.trim_start_matches("--").replace('-', "_");
        assert!(err.contains(&key) && err.contains("data dir's own"), "{err}");
        assert!(!folder.exists(), "{} was left behind", folder.display());
    }
}

/// A tmpfs of a few MiB, unmounted on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    /// `None` (the test is skipped) only where mounting needs root this
    /// process does not have.
    fn mount_or_skip(mib: u32) -> Option<SmallDisk> {
        let disk = SmallDisk::mount(mib);
        if disk.is_none() {
            assert!(!common::unsafe_is_root(), "root could not mount a tmpfs");
            eprintln!("skipped: mounting a tmpfs needs root");
        }
        disk
    }

    fn mount(mib: u32) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .status()
            .ok()?;
        st.success().then_some(SmallDisk { dir })
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

/// Fills the filesystem at `dir` with one file until it is full.
fn fill(path: &std::path::Path) {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![7u8; 1 << 16];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
}

/// Starts `blotcdn serve` on `data`: the server, once it listens, or its
/// exit code and what it printed, if it exits first.
fn try_serve(data: &std::path::Path) -> Result<ChildServer, (Option<i32>, String)> {
    let logs = tempfile::tempdir().unwrap();
    let (addr_file, err_file) = (logs.path().join("addrs.json"), logs.path().join("stderr"));
    let mut child = Command::new(binary())
        .args(["serve", "--data-dir"])
        .arg(data)
        .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0"])
        .arg("--addr-file")
        .arg(&addr_file)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&err_file).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(text) = std::fs::read_to_string(&addr_file) {
            let addrs: serde_json::Value = serde_json::from_str(&text).unwrap();
            let addr = |name: &str| addrs[name].as_str().and_then(|a| a.parse().ok());
            return Ok(ChildServer {
                grpc: addr("grpc").unwrap(),
                http: addr("http").unwrap(),
                metrics: addr("metrics"),
                child,
            });
        }
        if let Some(status) = child.try_wait().unwrap() {
            return Err((status.code(), std::fs::read_to_string(&err_file).unwrap_or_default()));
        }
        assert!(Instant::now() < deadline, "blotcdn serve neither listened nor exited in 30 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The bytes of the files under `dir`.
fn bytes_under(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => bytes_under(&e.path()),
            _ => e.metadata().map_or(0, |m| m.len()),
        })
        .sum()
}

/// A crash (kill -9) on a disk the server's own data filled, with nothing
/// else on it to delete. Before, each start failed with sled's bare "No
/// space left on device" after taking what room there was (the database
/// grew by about 110 KB a try), so a service manager's restarts left less
/// and less. Now a start on a disk without the room sled writes as it opens
/// is refused before it writes, saying how much it needs; with that room,
/// it starts, every acknowledged write there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_on_a_full_disk_says_what_it_needs_and_takes_nothing() {
    let Some(disk) = SmallDisk::mount_or_skip(24) else { return };
    let data = disk.dir.path().join("data");
    let mut server = ChildServer::spawn(&data);
    let mut p = pb::publisher_client::PublisherClient::connect(format!("http://{}", server.grpc)).await.unwrap();
    let mut acked = Vec::new();
    for i in 0..50 {
        let r = p.invalidate(pb::InvalidateRequest { blog_id: "fullstart".into(), paths: vec![format!("/{i}.css")] });
        acked.push((i, r.await.unwrap().into_inner().cache_id));
    }
    server.kill9();
    let filler = disk.dir.path().join("filler");
    fill(&filler);
    let db_bytes = || bytes_under(&data.join("db"));
    let before = db_bytes();
    for _ in 0..3 {
        let (code, err) = try_serve(&data).map(|_| ()).expect_err("a start with no room");
        assert!(code.is_some_and(|c| c != 0), "{code:?}");
        assert!(err.contains("KB free") && err.contains("needs about 1 MB") && err.contains("free space"), "{err}");
    }
    assert_eq!(db_bytes(), before, "failed starts wrote to the database");
    // Room for sled's segment, no more: it starts.
    let f = std::fs::OpenOptions::new().write(true).open(&filler).unwrap();
    f.set_len(f.metadata().unwrap().len().saturating_sub(2 << 20)).unwrap();
    let server = try_serve(&data).map_err(|(code, err)| format!("exit {code:?}: {err}")).expect("a start with room");
    let mut r = pb::resolver_client::ResolverClient::connect(format!("http://{}", server.grpc)).await.unwrap();
    let paths: Vec<String> = acked.iter().map(|(i, _)| format!("/{i}.css")).collect();
    let got = r.resolve_batch(pb::ResolveBatchRequest { blog_id: "fullstart".into(), paths }).await.unwrap();
    let ids: Vec<u64> = got.into_inner().assets.iter().map(|a| a.cache_id).collect();
    assert_eq!(ids, acked.iter().map(|(_, id)| *id).collect::<Vec<_>>());
}

/// A crash (kill -9) while the disk is full, the log holding many
/// acknowledged writes. Before, once the space that filled the disk was
/// freed, the start still failed: moving the log into the database needs
/// about twice its size, and each failed start left the database larger,
/// eating the space freed. Now the start keeps the records in the log and
/// comes up, and checkpoints are put off while the disk is short of room
/// (writes refused as the disk is full once the log's room is used); every
/// acknowledged write is there, then and after more space.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_on_a_full_disk_starts_again_once_its_space_is_freed() {
    let Some(disk) = SmallDisk::mount_or_skip(48) else { return };
    let data = disk.dir.path().join("data");
    let mut server = ChildServer::spawn(&data);
    let mut p = pb::publisher_client::PublisherClient::connect(format!("http://{}", server.grpc)).await.unwrap();
    p.invalidate(pb::InvalidateRequest { blog_id: "crash".into(), paths: vec!["/a.css".into()] }).await.unwrap();
    let filler = disk.dir.path().join("filler");
    fill(&filler);
    // Writes into the log's room until the disk refuses one.
    let mut acked = Vec::new();
    for i in 0..400 {
        let paths: Vec<String> = (0..500).map(|j| format!("/w{i}/{j}-{}.css", "x".repeat(150))).collect();
        match p.invalidate(pb::InvalidateRequest { blog_id: "crash".into(), paths }).await {
            Ok(r) => acked.push((i, r.into_inner().cache_id)),
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
                break;
            }
        }
    }
    assert!(acked.len() > 20, "only {} writes fit in the log", acked.len());
    server.kill9();
    std::fs::remove_file(&filler).unwrap();
    let started = try_serve(&data).map_err(|(code, err)| format!("exit {code:?}: {err}"));
    let mut server = started.expect("a start once the space that filled the disk is freed");
    let check = |server: &ChildServer| {
        let (grpc, acked) = (server.grpc, acked.clone());
        async move {
            let mut r = pb::resolver_client::ResolverClient::connect(format!("http://{grpc}")).await.unwrap();
            for (i, id) in acked {
                let path = format!("/w{i}/7-{}.css", "x".repeat(150));
                let got = r.resolve_batch(pb::ResolveBatchRequest { blog_id: "crash".into(), paths: vec![path] });
                assert_eq!(got.await.unwrap().into_inner().assets[0].cache_id, id, "acknowledged write {i}");
            }
        }
    };
    check(&server).await;
    // A write (taken into the log's room, or refused as the disk is full),
    // then a checkpoint's turn: with the disk short of room it is put off,
    // not begun (a checkpoint that ran out of room left sled
    // larger, filling the disk again).
    let db_bytes = || bytes_under(&data.join("db"));
    let log_bytes = || std::fs::metadata(data.join("db.wal")).unwrap().len();
    // 4 MiB left: less than the log's usual step of growth (16 MiB).
    let filler = disk.dir.path().join("filler-again");
    {
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![7u8; 1 << 20];
        while blotcdn::durable::free_bytes(disk.dir.path()).expect("statvfs") > 5 << 20 {
            f.write_all(&chunk).unwrap();
        }
        f.sync_all().unwrap();
    }
    let (before, log_before) = (db_bytes(), log_bytes());
    let mut p = pb::publisher_client::PublisherClient::connect(format!("http://{}", server.grpc)).await.unwrap();
    // About 2 MB of writes: past the log's room, into the disk's. The log
    // grows by what they need: before, it could not grow by its usual step,
    // refused them, and kept what the failed step took (all the room).
    for i in 0..20 {
        let paths: Vec<String> = (0..500).map(|j| format!("/later{i}/{j}-{}.css", "y".repeat(150))).collect();
        let r = p.invalidate(pb::InvalidateRequest { blog_id: "crash".into(), paths }).await;
        r.unwrap_or_else(|e| panic!("write {i} of 2 MB refused with 4 MiB free: {}", e.message()));
    }
    let log_after = log_bytes();
    assert!(log_after <= log_before + (3 << 20), "the log grew from {log_before} to {log_after} bytes for 2 MB");
    std::fs::remove_file(&filler).unwrap();
    // (An idle writer checkpoints after 10 s.)
    tokio::time::sleep(Duration::from_secs(12)).await;
    let after = db_bytes();
    assert!(after < before + (4 << 20), "sled grew from {before} to {after} bytes with the disk short of room");
    // More room: writes go through, and a clean restart keeps them all.
    let grown = Command::new("mount").args(["-o", "remount,size=400m"]).arg(disk.dir.path()).status().unwrap();
    assert!(grown.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    while let Err(e) =
        p.invalidate(pb::InvalidateRequest { blog_id: "crash".into(), paths: vec!["/b.css".into()] }).await
    {
        assert!(Instant::now() < deadline, "writes still refused with room to spare: {}", e.message());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    assert_eq!(server.child.wait().unwrap().code(), Some(0));
    let server = ChildServer::spawn(&data);
    check(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_clearly_and_recovers_when_space_is_freed() {
    let Some(disk) = SmallDisk::mount_or_skip(48) else { return };
    let data = disk.dir.path().join("data");
    let mut server = ChildServer::spawn(&data);
    let url = format!("http://{}", server.grpc);
    let mut p = pb::publisher_client::PublisherClient::connect(url.clone()).await.unwrap();
    let before = p.invalidate(pb::InvalidateRequest { blog_id: "full".into(), paths: vec!["/a.css".into()] });
    let before = before.await.unwrap().into_inner().cache_id;
    let filler = disk.dir.path().join("filler");
    fill(&filler);

    // An upload needs new blocks: refused, saying why.
    let e = p.put_asset(tokio_stream::iter(upload("full", "big.bin", "", &vec![1u8; 2 << 20]))).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
    assert!(e.message().contains("disk is full"), "{}", e.message());
    // Invalidations past the log's preallocated space: refused the same way.
    let long: Vec<String> = (0..10_000).map(|i| format!("/{:04}/{}", i, "x".repeat(900))).collect();
    let mut refused = None;
    for _ in 0..4 {
        match p.invalidate(pb::InvalidateRequest { blog_id: "full".into(), paths: long.clone() }).await {
            Ok(_) => continue,
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let e = refused.expect("40 MB of invalidations fit on a full 48 MiB disk");
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
    assert!(e.message().contains("disk is full") && !e.message().contains("Os {"), "{}", e.message());
    let r = curl(&[&format!("http://{}/healthz", server.http)]);
    assert_eq!(r.status, 503, "healthz while every write fails");

    // Space freed: writes go through again without a restart.
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let after = loop {
        match p.invalidate(pb::InvalidateRequest { blog_id: "full".into(), paths: vec!["/a.css".into()] }).await {
            Ok(r) => break r.into_inner().cache_id,
            Err(e) => {
                assert!(Instant::now() < deadline, "still refused after space was freed: {}", e.message());
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert!(after > before);
    assert_eq!(curl(&[&format!("http://{}/healthz", server.http)]).status, 200);
    let asset = p.put_asset(tokio_stream::iter(upload("full", "small.bin", "", b"fits now"))).await.unwrap();
    let asset = asset.into_inner();

    // A clean stop, and everything acknowledged is there after a restart.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    let status = server.child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "SIGTERM after recovering");
    let server = ChildServer::spawn(&data);
    let mut r = pb::resolver_client::ResolverClient::connect(format!("http://{}", server.grpc)).await.unwrap();
    let got = r.resolve_batch(pb::ResolveBatchRequest { blog_id: "full".into(), paths: vec!["/a.css".into()] });
    assert_eq!(got.await.unwrap().into_inner().assets[0].cache_id, after);
    assert_eq!(get(server.http, &path_of(&asset.url), &[]).body, b"fits now");
    drop(server);
    drop(disk);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_lost_writes_is_refused_at_start_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ChildServer::spawn(dir.path());
    let mut p = pb::publisher_client::PublisherClient::connect(format!("http://{}", server.grpc)).await.unwrap();
    for b in 0..5 {
        let paths = (0..2000).map(|i| format!("/p/{i}.css")).collect();
        p.invalidate(pb::InvalidateRequest { blog_id: format!("b{b}"), paths }).await.unwrap();
    }
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    assert_eq!(server.child.wait().unwrap().code(), Some(0));
    drop(server);
    // Damage the middle of sled's file: sled reads it as a torn tail and,
    // left alone, opens an older state without a word.
    let db = dir.path().join("db/db");
    let mut bytes = std::fs::read(&db).unwrap();
    let at = bytes.len() / 3;
    for b in &mut bytes[at..at + 200] {
        *b ^= 0x5a;
    }
    std::fs::write(&db, &bytes).unwrap();
    let (code, _, err) = run(
        std::process::Command::new(binary()).args(["serve", "--data-dir"]).arg(dir.path()).args([
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
        ]),
        30,
    );
    assert_ne!(code, 0, "started on a damaged database");
    assert!(err.contains(&dir.path().join("db").display().to_string()), "names the database: {err}");
    assert!(err.contains("corrupt") && !err.contains("panicked"), "a sentence, not a panic: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blotcdn_put_never_stores_a_file_it_could_not_read_whole() {
    let s = Server::start().await;
    let work = tempfile::tempdir().unwrap();
    // Opening a directory works; reading it fails (EISDIR) before any byte.
    // (A name the server takes, so that only the read error can stop it.)
    let unreadable = work.path().join("photo.jpg");
    std::fs::create_dir(&unreadable).unwrap();
    let server = format!("http://{}", s.grpc);
    let put = |file: &std::path::Path| {
        run(std::process::Command::new(binary()).args(["put", "--server", &server, "--blog", "putblog"]).arg(file), 30)
    };
    let (code, out, err) = put(&unreadable);
    assert_ne!(code, 0, "put of an unreadable file succeeded: {out}");
    assert!(err.contains("cancelled"), "{err}");
    let mut r = s.resolver().await;
    let e = r.get_blog(pb::GetBlogRequest { blog_id: "putblog".into() }).await;
    assert!(e.is_err() || e.unwrap().into_inner().asset_count == 0, "an empty asset was stored");
    // A readable file goes through.
    let f = work.path().join("ok.txt");
    std::fs::write(&f, b"whole").unwrap();
    let (code, out, err) = put(&f);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("5 bytes"), "{out}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blog_file_that_grew_past_1_mib_streams_whole_from_its_start() {
    let s = Server::start().await;
    let path = s.write("grow", "/data.bin", &[1u8; 1000]);
    let id = invalidate(&s, "grow", &[]).await;
    assert_eq!(get(s.http, &format!("/grow/{id}/data.bin"), &[]).body.len(), 1000);
    // The same version, bigger than what is kept hot (1 MiB).
    let big: Vec<u8> = (0..3_000_000u32).map(|i| i as u8).collect();
    let tmp = path.with_file_name("data.tmp");
    std::fs::write(&tmp, &big).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    let id2 = invalidate(&s, "grow", &["/data.bin"]).await;
    let r = get(s.http, &format!("/grow/{id2}/data.bin"), &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some("3000000"));
    assert!(r.body == big, "streamed bytes differ (offset or length)");
    s.stop().await;
}

/// One process at a time holds a data dir. The server keeps sled closed
/// between checkpoints, so a hostile test ran `fsck` on a live server and a
/// second server beside the first: each replayed and reset the log under
/// the other, and half the writes acknowledged after were gone on restart.
/// Both are now refused, naming the holder, before they touch anything (a
/// refused server used to sweep the live one's uploads in flight out of
/// `cas/tmp`), and a write acknowledged while they were refused survives a
/// restart. So is a server on a second data dir whose `db` links to this
/// one's: the lock is on sled's folder itself, not a file beside it that
/// could be deleted or that each data dir has its own of.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsck_and_a_second_server_are_refused_while_a_server_holds_the_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("blogs/lk")).unwrap();
    let mut server = ChildServer::spawn(dir.path());
    let mut p = pb::publisher_client::PublisherClient::connect(format!("http://{}", server.grpc)).await.unwrap();
    let invalidate = |path: &str| pb::InvalidateRequest { blog_id: "lk".into(), paths: vec![path.into()] };
    p.invalidate(invalidate("/before.txt")).await.unwrap();
    let in_use = |err: &str| err.contains("is in use") && err.contains(&format!("(pid {})", server.child.id()));
    // An upload in flight, as the live server leaves it in the CAS's
    // temporary folder.
    let in_flight = dir.path().join("cas/tmp/in-flight-upload");
    std::fs::write(&in_flight, b"half an upload").unwrap();
    let (code, _, err) = run(Command::new(binary()).args(["fsck", "--data-dir"]).arg(dir.path()), 60);
    assert!(code != 0 && in_use(&err), "fsck on a live data dir: {code} {err}");
    let (code, _, err) = run(&mut common::serve_on_free_ports(dir.path()), 60);
    assert!(code != 0 && in_use(&err), "a second server on the same data dir: {code} {err}");
    assert!(in_flight.exists(), "the refused server swept the live one's upload in flight");
    let other = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(dir.path().join("db"), other.path().join("db")).unwrap();
    let (code, _, err) = run(&mut common::serve_on_free_ports(other.path()), 60);
    assert!(code != 0 && in_use(&err), "a second data dir sharing the database: {code} {err}");
    let after = p.invalidate(invalidate("/after.txt")).await.unwrap().into_inner().cache_id;
    drop(p);
    server.kill9();
    // Free once the holder is gone, however it ended.
    let (code, out, err) = run(Command::new(binary()).args(["fsck", "--data-dir"]).arg(dir.path()), 60);
    assert_eq!(code, 0, "fsck once the server is gone: {out} {err}");
    let server = ChildServer::spawn(dir.path());
    let mut r = pb::resolver_client::ResolverClient::connect(format!("http://{}", server.grpc)).await.unwrap();
    let blog = r.get_blog(pb::GetBlogRequest { blog_id: "lk".into() }).await.unwrap().into_inner();
    assert_eq!(blog.path_count, 2, "{blog:?}");
    let got = r
        .resolve_batch(pb::ResolveBatchRequest { blog_id: "lk".into(), paths: vec!["/after.txt".into()] })
        .await
        .unwrap()
        .into_inner();
    assert!(got.assets[0].url.contains(&format!("/{after}/")), "{:?}", got.assets[0]);
}

/// A custom domain is its blog's own site: the edge (Caddy with on-demand
/// TLS) sends every request for it to the origin. Before, the origin routed
/// `/{any blog}/…` on it as on the CDN's host, so any user's HTML ran on any
/// other user's domain. Now a mapped domain names its blog as a host-style
/// name does, and the CDN's own names cannot be claimed as custom domains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_domain_serves_its_own_blog_only_and_the_cdns_names_cannot_be_claimed() {
    let s = Server::start_with(|p| p.cdn_base_url = Some("http://cdn.test".into())).await;
    s.write("victim", "/style.css", b"the victim's style");
    s.write("attacker", "/evil.html", b"<script>alert(document.domain)</script>");
    let id = invalidate(&s, "victim", &[]).await;
    let evil_id = invalidate(&s, "attacker", &[]).await;
    let mut p = s.publisher().await;
    p.set_domain(pb::SetDomainRequest { domain: "Victim.Example".into(), blog_id: "victim".into() }).await.unwrap();
    let evil = upload("attacker", "evil.svg", "", b"<svg onload=alert(1)/>");
    let evil_asset = p.put_asset(tokio_stream::iter(evil)).await.unwrap().into_inner();
    let asset = p.put_asset(tokio_stream::iter(upload("victim", "logo.svg", "", b"<svg/>"))).await;
    let asset = asset.unwrap().into_inner();

    let on = |host: &str, path: &str| curl(&["-H", &format!("Host: {host}"), &s.url(path)]);
    // Another blog's files, versioned, unversioned or permanent: not on this domain.
    for target in
        ["/attacker/evil.html".to_string(), format!("/attacker/{evil_id}/evil.html"), path_of(&evil_asset.url)]
    {
        for host in ["victim.example", "VICTIM.example.", "victim.example:443"] {
            let r = on(host, &target);
            assert_ne!(r.status, 200, "{host}{target} served another blog's file");
            assert!(!String::from_utf8_lossy(&r.body).contains("alert"), "{host}{target}");
        }
    }
    // Its own blog's files, by their paths on the domain.
    let r = on("victim.example", "/style.css");
    assert_eq!((r.status, r.body.as_slice()), (200, &b"the victim's style"[..]));
    let r = on("victim.example", &format!("/{id}/style.css"));
    assert_eq!((r.status, r.header("cache-control")), (200, Some("public, max-age=31536000, immutable")));
    let hash_path = path_of(&asset.url);
    let in_blog = hash_path.strip_prefix("/victim").expect("path style");
    assert_eq!(on("victim.example", in_blog).body, b"<svg/>");
    // The CDN's own host, and other hosts, keep the path style.
    for host in ["cdn.test", "127.0.0.1", "unmapped.example"] {
        let r = on(host, "/attacker/evil.html");
        assert_eq!(r.status, 200, "{host}");
    }

    // The CDN's names are not anyone's custom domain.
    for domain in ["cdn.test", "CDN.test.", "victim.cdn.test"] {
        let e = p.set_domain(pb::SetDomainRequest { domain: domain.into(), blog_id: "attacker".into() }).await;
        let e = e.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{domain}: {e:?}");
        assert!(e.message().contains("cdn_base_url"), "{e:?}");
    }
    s.stop().await;
}

/// A start that reads sled writes an index snapshot, but not one that would
/// leave the disk with less room than a checkpoint needs (16 MiB): it is
/// removed again. Hostile round 32: a 17.8 MB snapshot written with 20 MB
/// free left 3 MB, checkpoints were put off for room, and the next start was
/// refused for room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_keeps_no_snapshot_that_would_leave_the_disk_short_of_room() {
    let Some(disk) = SmallDisk::mount_or_skip(64) else { return };
    let data = disk.dir.path().join("data");
    let mut server = ChildServer::spawn(&data);
    let mut p = pb::publisher_client::PublisherClient::connect(format!("http://{}", server.grpc)).await.unwrap();
    let mut acked = Vec::new();
    for i in 0..20 {
        let paths: Vec<String> = (0..2000).map(|j| format!("/p{i}/{j}-a-longer-name.css")).collect();
        let r = p.invalidate(pb::InvalidateRequest { blog_id: "snap".into(), paths }).await.unwrap();
        acked.push((format!("/p{i}/0-a-longer-name.css"), r.into_inner().cache_id));
    }
    // A clean stop writes a snapshot: its size.
    unsafe {
        libc::kill(server.child.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "no clean stop in 30 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (snapshot, tail) = (data.join("db.snapshot"), data.join("db.snapshot-tail"));
    let len = std::fs::metadata(&snapshot).unwrap().len();
    std::fs::remove_file(&snapshot).unwrap();
    let _ = std::fs::remove_file(&tail);
    // Room for the snapshot, not for it and a checkpoint's 16 MiB.
    let free = || blotcdn::durable::free_bytes(disk.dir.path()).unwrap();
    let mut filler = std::fs::File::create(disk.dir.path().join("filler")).unwrap();
    let mut left = free() - ((16 << 20) + len / 2);
    let chunk = vec![7u8; 1 << 20];
    while left > 0 {
        let n = left.min(chunk.len() as u64);
        filler.write_all(&chunk[..n as usize]).unwrap();
        left -= n;
    }
    filler.sync_all().unwrap();
    let server = ChildServer::spawn(&data);
    assert!(!snapshot.exists(), "a snapshot of {len} bytes was kept, leaving {} bytes free", free());
    assert!(free() >= 16 << 20, "{} bytes free after the start", free());
    let mut r = pb::resolver_client::ResolverClient::connect(format!("http://{}", server.grpc)).await.unwrap();
    for (path, id) in acked {
        let got = r.resolve_batch(pb::ResolveBatchRequest { blog_id: "snap".into(), paths: vec![path] }).await.unwrap();
        assert_eq!(got.into_inner().assets[0].cache_id, id);
    }
}
