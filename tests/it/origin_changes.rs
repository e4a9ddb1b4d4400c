//! The origin while the files it reads change under it (rewritten, replaced,
//! cut, held open by a writer, changed just now) and clients that never
//! read: a reader gets a file whole as it was, or a short-lived answer, or
//! an error, never a torn copy kept for a year.

use crate::common;

use blotcdn::proto as pb;
use common::{curl, get, invalidate, path_of, url_of, Server};

/// A socket to the origin with a receive buffer of `rcvbuf` bytes (a slow
/// or far-away client), with `target` asked for.
fn slow_client(s: &Server, target: &str, rcvbuf: libc::c_int) -> std::net::TcpStream {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let c = std::net::TcpStream::connect(s.http).unwrap();
    // SAFETY: setsockopt with a valid int.
    let r = unsafe {
        libc::setsockopt(
            c.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            &rcvbuf as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
    assert_eq!(r, 0);
    c.set_read_timeout(Some(std::time::Duration::from_secs(20))).unwrap();
    (&c).write_all(format!("GET {target} HTTP/1.1\r\nHost: cdn.test\r\nConnection: close\r\n\r\n").as_bytes()).unwrap();
    c
}

/// A file too large to keep in memory, cut short or rewritten in place
/// while a slow client downloads it: the client never gets a whole answer,
/// and every byte it got is the file's as it was (never zeros it never had,
/// never the new bytes under the old validators). Before, such files went
/// out with `sendfile` from the file's own pages, which a cut zeroes and a
/// rewrite changes while the socket still holds them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_file_that_changes_mid_answer_is_never_sent_whole() {
    use std::io::Read;
    use std::os::unix::fs::FileExt;
    let s = Server::start().await;
    // No zero byte anywhere: any zero received is one the file never had.
    let bytes: Vec<u8> = (0..12u32 << 20).map(|i| (i % 251) as u8 + 1).collect();
    type Change = fn(&std::path::Path, usize);
    let changes: [(&str, Change); 2] = [
        ("cut", |p, _| std::fs::OpenOptions::new().write(true).open(p).unwrap().set_len(50_001).unwrap()),
        ("rewritten in place", |p, n| {
            let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
            f.write_all_at(&vec![b'x'; n], 0).unwrap();
        }),
    ];
    for (i, (what, change)) in changes.into_iter().enumerate() {
        let path = format!("/big{i}.bin");
        let file = s.write("b", &path, &bytes);
        invalidate(&s, "b", &[&path]).await;
        let target = path_of(&url_of(&s, "b", &path).await);
        let mut c = slow_client(&s, &target, 64 << 10);
        // The answer has begun (its head is here: the file is open, and
        // the server fills what the socket holds); then the file changes.
        let got = tokio::task::spawn_blocking(move || {
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = c.read(&mut buf).unwrap();
                assert!(n > 0, "the connection closed before the answer's head");
                got.extend_from_slice(&buf[..n]);
            }
            change(&file, 12 << 20);
            let _ = c.read_to_end(&mut got);
            got
        })
        .await
        .unwrap();
        let r = common::parse_response(&got);
        assert_eq!(r.status, 200, "{what}");
        assert_eq!(r.header("content-length"), Some(bytes.len().to_string().as_str()), "{what}");
        assert!(r.body.len() < bytes.len(), "{what}: the whole answer went out ({} bytes)", r.body.len());
        let bad = r.body.iter().zip(&bytes).position(|(a, b)| a != b);
        assert_eq!(bad, None, "{what}: byte {bad:?} of {} is not the file's as it was", r.body.len());
    }
    s.stop().await;
}

/// Clients that ask for a large file and never read hold their connections
/// only until the idle timeout: then the slots are free for others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_read_give_their_slots_back() {
    let s = Server::start_with(|p| {
        p.max_connections = Some(16);
        p.http_idle_timeout_secs = Some(1);
        p.http_threads = Some(1);
    })
    .await;
    let bytes: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
    s.write("b", "/big.bin", &bytes);
    s.write("b", "/small.txt", b"small");
    invalidate(&s, "b", &[]).await;
    let big = path_of(&url_of(&s, "b", "/big.bin").await);
    let small = path_of(&url_of(&s, "b", "/small.txt").await);
    let stuck: Vec<_> = (0..16).map(|_| slow_client(&s, &big, 4096)).collect();
    // Every slot is held; past the idle timeout they are given back.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let addr = s.http;
    let r = tokio::task::spawn_blocking(move || get(addr, &small, &[])).await.unwrap();
    assert_eq!((r.status, r.body.as_slice()), (200, &b"small"[..]));
    drop(stuck);
    s.stop().await;
}

/// A file rewritten in place again and again (as a sync tool writing over
/// it) while it is asked for: every answer is one whole version, never a
/// read that caught half of each; one that cannot be read whole is 503
/// (no-store, Retry-After), never a torn 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_rewritten_while_read_is_answered_whole_or_503() {
    use std::os::unix::fs::FileExt;
    let s = Server::start().await;
    let n = 500_000;
    let file = s.write("unknown", "/page.css", &vec![b'A'; n]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
            let (a, b) = (vec![b'A'; n], vec![b'B'; n]);
            for i in 0..200_000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                f.write_all_at(if i % 2 == 0 { &b } else { &a }, 0).unwrap();
                // Now and then still for longer than blogfs::SETTLE.
                let pause = if i % 4 == 0 { 40_000 } else { 300 };
                std::thread::sleep(std::time::Duration::from_micros(pause));
            }
        })
    };
    let addr = s.http;
    let (whole, busy) = tokio::task::spawn_blocking(move || {
        let (mut whole, mut busy) = (0, 0);
        for _ in 0..300 {
            let r = get(addr, "/unknown/page.css", &[]);
            match r.status {
                200 => {
                    assert_eq!(r.body.len(), n);
                    let mixed = r.body.iter().any(|&c| c != r.body[0]);
                    assert!(!mixed, "a 200 mixing two versions of the file");
                    whole += 1;
                }
                503 => {
                    assert_eq!((r.header("cache-control"), r.header("retry-after")), (Some("no-store"), Some("1")));
                    busy += 1;
                }
                other => panic!("status {other}"),
            }
        }
        (whole, busy)
    })
    .await
    .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    eprintln!("{whole} whole answers, {busy} busy");
    assert!(whole > 0, "no answer got through");
    s.stop().await;
}

/// A file changed less than `recent_change_ms` ago may not be whole yet
/// with no timestamp to show it (a slow write, stores through a mapping,
/// coarse timestamps): it is answered short-lived and not kept in memory.
/// Once older, the same URL is immutable and kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_changed_just_now_is_short_lived_and_not_kept() {
    let s = Server::start_with(|p| p.recent_change_ms = Some(1500)).await;
    s.write("r", "/img.png", &vec![7u8; 30_000]);
    let gone = s.write("r", "/gone.png", &vec![8u8; 30_000]);
    invalidate(&s, "r", &[]).await;
    let url = url_of(&s, "r", "/img.png").await;
    let r = curl(&[&url]);
    assert_eq!((r.status, r.body.len()), (200, 30_000));
    assert_eq!(r.header("cache-control"), Some("public, max-age=60"), "a file changed just now");
    // Validators of its own: a cache that revalidates this answer after the
    // window must get the whole file again, never a 304 making it immutable.
    assert_eq!(r.header("last-modified"), None);
    let early_tag = r.header("etag").expect("an etag").to_owned();
    // Not kept: with the file gone, the next answer is not from memory.
    let gone_url = url_of(&s, "r", "/gone.png").await;
    assert_eq!(curl(&[&gone_url]).status, 200);
    std::fs::remove_file(&gone).unwrap();
    assert_eq!(curl(&[&gone_url]).status, 404, "a just-changed file was kept in memory");
    // The same file, untouched, once older than the window.
    tokio::time::sleep(std::time::Duration::from_millis(1700)).await;
    let r = curl(&["-H", &format!("If-None-Match: {early_tag}"), &url]);
    assert_eq!((r.status, r.header("cache-control")), (200, Some("public, max-age=31536000, immutable")));
    assert_eq!(r.body.len(), 30_000, "revalidating the early answer gets the file again");
    let settled_tag = r.header("etag").expect("an etag").to_owned();
    assert_ne!(settled_tag, early_tag);
    assert!(r.header("last-modified").is_some());
    assert_eq!(curl(&["-H", &format!("If-None-Match: {settled_tag}"), &url]).status, 304);
    // Kept now: answered from memory with the file gone.
    std::fs::remove_file(s.blogs_dir().join("r/img.png")).unwrap();
    let r = curl(&[&url]);
    assert_eq!((r.status, r.body.len()), (200, 30_000), "a settled file is answered from memory");
    s.stop().await;
}

/// A blog's folder may be a symbolic link to a folder elsewhere (another
/// disk), and is served from there. Not to the server's own folders, another
/// blog's folder, or a folder holding them: such a link would serve the
/// database, the write-ahead log and the CAS (and make any of them a
/// permanent asset) as the blog's files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blog_folder_linked_into_the_servers_own_folders_is_refused() {
    use std::os::unix::fs::symlink;
    let s = Server::start().await;
    let elsewhere = tempfile::tempdir().unwrap();
    std::fs::write(elsewhere.path().join("page.css"), b"from another disk").unwrap();
    let blogs = s.blogs_dir();
    symlink(elsewhere.path(), blogs.join("moved")).unwrap();
    s.write("other", "/secret.txt", b"another blog's file");
    symlink(s.dir.path(), blogs.join("data")).unwrap();
    symlink(s.dir.path().join("cas"), blogs.join("cas")).unwrap();
    symlink(blogs.join("other"), blogs.join("alias")).unwrap();
    symlink("/", blogs.join("root")).unwrap();
    for blog in ["moved", "data", "cas", "alias", "root"] {
        invalidate(&s, blog, &[]).await;
    }
    let r = get(s.http, "/moved/page.css", &[]);
    assert_eq!((r.status, r.body.as_slice()), (200, &b"from another disk"[..]), "a linked folder elsewhere is served");
    let wal = s.dir.path().join("db.wal");
    assert!(wal.exists(), "the premise: the data dir holds the log");
    let secret = format!("{}", blogs.strip_prefix(s.dir.path()).unwrap().join("other/secret.txt").display());
    for target in
        ["/data/db.wal".to_owned(), format!("/data/{secret}"), "/alias/secret.txt".into(), "/root/etc/passwd".into()]
    {
        let r = get(s.http, &target, &[]);
        assert_eq!(r.status, 404, "{target}");
    }
    let mut p = s.publisher().await;
    for (blog, path) in [("data", "/db.wal"), ("alias", "/secret.txt")] {
        let e = p
            .import_file(pb::ImportFileRequest { blog_id: blog.into(), path: path.into() })
            .await
            .expect_err("imported a file of the server's own folders");
        assert!(e.message().contains("server's own folders"), "{blog}{path}: {e:?}");
    }
    s.stop().await;
}

/// A program writing a blog file through a shared mapping stores into
/// pages already dirty without moving any of the file's times, so no stamp
/// check can see the bytes change under a read. While another process holds
/// the file open for writing, its answer is short-lived and not kept: once
/// the writer lets go, the same URL answers what the file holds then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_held_open_by_a_writer_is_short_lived_and_not_kept() {
    use std::os::fd::AsRawFd;
    let s = Server::start().await;
    let n = 256 * 1024;
    let path = s.write("mm", "/f.bin", &vec![b'A'; n]);
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
    // SAFETY: a shared mapping of the whole file, unmapped below before the
    // file is closed; the slice is used only while it is mapped.
    let at = unsafe {
        libc::mmap(std::ptr::null_mut(), n, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, file.as_raw_fd(), 0)
    };
    assert_ne!(at, libc::MAP_FAILED);
    let pages = unsafe { std::slice::from_raw_parts_mut(at as *mut u8, n) };
    // Every page dirty: the times move here, at each page's first store.
    pages.fill(b'B');
    invalidate(&s, "mm", &[]).await;
    let url = url_of(&s, "mm", "/f.bin").await;
    let stamp = |m: std::fs::Metadata| (m.modified().unwrap(), std::os::unix::fs::MetadataExt::ctime_nsec(&m));
    let before = stamp(std::fs::metadata(&path).unwrap());
    // Stores into dirty pages: no time moves.
    pages[..4096].fill(b'C');
    assert_eq!(stamp(std::fs::metadata(&path).unwrap()), before, "the premise: these stores move no time");
    let r = curl(&[&url]);
    assert_eq!((r.status, r.body.len()), (200, n));
    assert_eq!(r.header("cache-control"), Some("public, max-age=60"), "a file held open for writing");
    // The writer finishes and lets go.
    pages.fill(b'D');
    // SAFETY: mapped above, not used after this.
    assert_eq!(unsafe { libc::munmap(at, n) }, 0);
    drop(file);
    let r = curl(&[&url]);
    assert!(
        r.body == vec![b'D'; n],
        "after the writer let go: the file as it is, not a copy kept while it was written"
    );
    assert_eq!(r.header("cache-control"), Some("public, max-age=31536000, immutable"));
    s.stop().await;
}

/// A sync tool that keeps modification times (`rsync -t`, `cp -p`, an older
/// version restored) can replace a file with other bytes of the same length
/// and the same modification time: its validators change all the same, so
/// a cache revalidating its copy gets the new bytes, not a 304.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_replaced_with_its_old_modification_time_does_not_revalidate() {
    let s = Server::start().await;
    let old_time = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_577_836_800);
    let set_time =
        |p: &std::path::Path| std::fs::File::options().write(true).open(p).unwrap().set_modified(old_time).unwrap();
    let path = s.write("et", "/et.txt", b"OLDOLDOLD1");
    set_time(&path);
    let first = get(s.http, "/et/et.txt", &[]);
    assert_eq!(first.body, b"OLDOLDOLD1");
    let (etag, lm) = (first.header("etag").unwrap().to_owned(), first.header("last-modified").unwrap().to_owned());
    assert_eq!(get(s.http, "/et/et.txt", &[("If-None-Match", &etag)]).status, 304);
    // A second later (HTTP dates count whole seconds), written elsewhere,
    // its time set back, renamed over the old one.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let tmp = s.blogs_dir().join("et/.et.txt.tmp");
    std::fs::write(&tmp, b"NEWNEWNEW2").unwrap();
    set_time(&tmp);
    std::fs::rename(&tmp, &path).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().modified().unwrap(), old_time);
    for (name, value) in [("If-None-Match", etag.as_str()), ("If-Modified-Since", lm.as_str())] {
        let r = get(s.http, "/et/et.txt", &[(name, value)]);
        assert_eq!((r.status, r.body.as_slice()), (200, &b"NEWNEWNEW2"[..]), "{name}: {value}");
        assert_ne!(r.header("etag"), Some(etag.as_str()));
    }
    // A modification time in the future is no date to answer with: it would
    // stay the answer's date after the next change, and 304 every check.
    let future = std::time::SystemTime::now() + std::time::Duration::from_secs(10 * 365 * 86_400);
    std::fs::File::options().write(true).open(&path).unwrap().set_modified(future).unwrap();
    let r = get(s.http, "/et/et.txt", &[]);
    let date = httpdate::parse_http_date(r.header("last-modified").unwrap()).unwrap();
    assert!(date <= std::time::SystemTime::now(), "Last-Modified {:?} is in the future", r.header("last-modified"));
    s.stop().await;
}
