//! Moving off S3, against a real S3 API server on 127.0.0.1 (moto's
//! standalone server, from PyPI): `blotcdn migrate` killed midway and
//! resumed copies every object exactly once, byte-identical; keys that are
//! not `{blog_id}/{path}` are refused and nothing lands outside the static
//! folder; a key that cannot be written fails the run; `--dry-run` writes
//! nothing; and the origin's fallback chain against the same bucket (then an
//! app) backfills into the static folder.

use crate::common;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{binary, curl, nginx, run, Daemon, Server};

const BUCKET: &str = "legacy";
/// Keys the migration must refuse.
const REFUSED: [&str; 4] = ["not a blog!/x.png", "toplevel.txt", "b1/.hidden/x.png", "b3/folder/"];

fn moto() -> (Daemon, u16) {
    Daemon::spawn_on_free_port("moto_server", |port| {
        // As a module: found wherever pip put it, on PATH or not.
        let mut c = Command::new("python3");
        c.args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()]);
        c
    })
}

fn aws_env(c: &mut Command) -> &mut Command {
    c.env("AWS_ACCESS_KEY_ID", "testing").env("AWS_SECRET_ACCESS_KEY", "testing").env("AWS_REGION", "us-east-1")
}

/// The small objects: key → bytes.
fn small_objects() -> BTreeMap<String, Vec<u8>> {
    let mut m = BTreeMap::new();
    for i in 0..3000 {
        m.insert(format!("b{}/avatars/{i}/a-{i}.png", i % 30), format!("object {i} ").repeat(i % 50 + 1).into_bytes());
    }
    m.insert("b1/ü dir/é x.png".into(), b"unicode".to_vec());
    m.insert("b2/with space/file name.txt".into(), b"spaces".to_vec());
    m
}

/// Fills the bucket with boto3 (16 threads): the small objects, the refused
/// keys, and a 100 MiB object whose bytes are written to `big` too.
fn populate(port: u16, objects: &BTreeMap<String, Vec<u8>>, big: &Path, work: &Path) {
    let list = work.join("objects.json");
    let as_json: BTreeMap<&String, String> =
        objects.iter().map(|(k, v)| (k, String::from_utf8_lossy(v).into())).collect();
    std::fs::write(&list, serde_json::to_string(&as_json).unwrap()).unwrap();
    let script = r#"
import json, os, sys, boto3
from concurrent.futures import ThreadPoolExecutor
port, listfile, big = sys.argv[1], sys.argv[2], sys.argv[3]
s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1")
s3.create_bucket(Bucket="legacy")
objs = json.load(open(listfile))
objs.update({"not a blog!/x.png": "no", "toplevel.txt": "no", "b1/.hidden/x.png": "no", "b3/folder/": ""})
with ThreadPoolExecutor(16) as ex:
    list(ex.map(lambda kv: s3.put_object(Bucket="legacy", Key=kv[0], Body=kv[1].encode()), objs.items()))
data = os.urandom(100 << 20)
open(big, "wb").write(data)
s3.put_object(Bucket="legacy", Key="b2/big.bin", Body=data)
"#;
    let (code, out, err) =
        run(aws_env(Command::new("python3").args(["-c", script, &port.to_string()]).arg(&list).arg(big)), 300);
    assert_eq!(code, 0, "populate: {out}{err}");
}

/// Every named file under the static folder (not the temporary ones), with
/// its inode and modification time.
fn files(root: &Path) -> BTreeMap<PathBuf, (u64, i64, i64)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            if m.is_dir() {
                if e.file_name() != ".tmp" {
                    stack.push(e.path());
                }
            } else {
                out.insert(e.path().strip_prefix(root).unwrap().to_owned(), (m.ino(), m.mtime(), m.mtime_nsec()));
            }
        }
    }
    out
}

fn migrate(data: &Path, bucket_url: &str, extra: &[&str]) -> Command {
    let mut c = Command::new(binary());
    c.args(["migrate", "--data-dir"]).arg(data).args(["--bucket-url", bucket_url]).args(extra);
    aws_env(&mut c);
    c
}

/// `copied N, skipped N, refused N, failed N`, the last line of a run.
fn summary(out: &str) -> [u64; 4] {
    let line = out.lines().last().unwrap_or_default();
    let n: Vec<u64> = line.split(", ").filter_map(|p| p.rsplit(' ').next()?.parse().ok()).collect();
    assert!(line.starts_with("copied ") && n.len() == 4, "no summary line in {out:?}");
    [n[0], n[1], n[2], n[3]]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_killed_midway_resumes_copies_each_object_once_and_backfill_lands_in_static() {
    let work = tempfile::tempdir().unwrap();
    let (_moto, port) = moto();
    let objects = small_objects();
    let big = work.path().join("big.bin");
    populate(port, &objects, &big, work.path());
    let bucket_url = format!("http://127.0.0.1:{port}/{BUCKET}");
    let valid = objects.len() as u64 + 1;

    // --dry-run: counts, writes nothing.
    let dry = work.path().join("dry");
    let (code, out, err) = run(&mut migrate(&dry, &bucket_url, &["--dry-run"]), 300);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(summary(&out), [valid, 0, REFUSED.len() as u64, 0], "{out}");
    assert!(out.contains(&format!("would copy {valid} objects")), "{out}");
    assert!(files(&dry.join("static")).is_empty());

    // A run killed midway (kill -9), once some objects are in.
    let data = work.path().join("data");
    let statics = data.join("static");
    let mut child = migrate(&data, &bucket_url, &["--concurrency", "4"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while files(&statics).len() < 600 {
        assert!(child.try_wait().unwrap().is_none(), "the first run ended before it could be killed");
        assert!(Instant::now() < deadline, "the first run copied too little in 120 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    let first_pid = child.id();
    child.kill().unwrap();
    child.wait().unwrap();
    let before = files(&statics);
    assert!((before.len() as u64) < valid, "the first run finished before the kill");

    // Resumed: everything else copied, nothing copied twice.
    let (code, out, err) = run(&mut migrate(&data, &bucket_url, &["--concurrency", "8"]), 600);
    assert_eq!(code, 0, "{out}{err}");
    // (It lists from its resume point: refused keys before it are not seen again.)
    let [copied, _, refused, failed] = summary(&out);
    assert!(failed == 0 && refused <= REFUSED.len() as u64, "{out}");
    assert!(out.contains("resuming after "), "{out}");
    assert_eq!(copied, valid - before.len() as u64, "copied in the second run: {out}");
    let after = files(&statics);
    for (p, id) in &before {
        assert_eq!(after.get(p), Some(id), "{} was written again", p.display());
    }
    assert_eq!(after.len() as u64, valid, "files in the static folder");
    for (k, v) in &objects {
        assert_eq!(&std::fs::read(statics.join(k)).unwrap(), v, "{k}");
    }
    assert!(std::fs::read(statics.join("b2/big.bin")).unwrap() == std::fs::read(&big).unwrap(), "the 100 MiB object");
    // Half-written files are only those the killed run had in flight (in
    // `.tmp`, no URL reaches them; swept once 15 minutes old); nothing is
    // outside the static folder, and no checkpoint is left once done.
    let tmp: Vec<String> = std::fs::read_dir(statics.join(".tmp"))
        .map(|d| d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    assert!(tmp.len() <= 4 && tmp.iter().all(|n| n.starts_with(&format!("{first_pid}-"))), "{tmp:?}");
    assert!(!statics.join("toplevel.txt").exists() && !statics.join("b1/.hidden").exists());
    let leftovers: Vec<_> = std::fs::read_dir(&data).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(!leftovers.iter().any(|n| n.to_string_lossy().ends_with(".checkpoint")), "{leftovers:?}");

    // Again: everything is there already, but one file was changed by hand:
    // it is not overwritten, and the run says so and fails.
    let changed = statics.join("b2/with space/file name.txt");
    std::fs::write(&changed, b"a local edit").unwrap();
    let (code, out, err) = run(&mut migrate(&data, &bucket_url, &[]), 300);
    assert_eq!((code, summary(&out)), (1, [0, valid - 1, REFUSED.len() as u64, 1]), "{out}{err}");
    assert!(err.contains("is already a file of 12 bytes; the bucket's object is 6 bytes"), "{err}");
    assert_eq!(std::fs::read(&changed).unwrap(), b"a local edit");

    // A key that cannot be written fails the run (non-zero), naming it; the others go on.
    let blocked = work.path().join("blocked");
    std::fs::create_dir_all(blocked.join("static")).unwrap();
    std::fs::write(blocked.join("static/b3"), b"a file where a folder should be").unwrap();
    let (code, out, err) = run(&mut migrate(&blocked, &bucket_url, &["--prefix", "b3/"]), 300);
    assert_eq!(code, 1, "{out}{err}");
    assert_eq!(summary(&out), [0, 0, 1, 100], "{out}");
    assert!(err.contains("failed: b3/avatars/"), "{err}");

    // The origin, on the migrated data: legacy URLs from the static folder,
    // the bucket for what came later (backfilled into the static folder),
    // then the app.
    let app_root = work.path().join("app");
    std::fs::create_dir_all(app_root.join("b5")).unwrap();
    std::fs::write(app_root.join("b5/page.html"), b"from the app").unwrap();
    let (_app, app_port) = nginx(&work.path().join("nginx"), &app_root, "");
    let put_later = r#"
import sys, boto3
s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{sys.argv[1]}", region_name="us-east-1")
# Public, as the legacy bucket's objects are to its HTTP endpoint.
s3.put_object(Bucket="legacy", Key="b5/avatars/later.png", Body=b"uploaded after the migration", ACL="public-read")
"#;
    let (code, _, err) = run(aws_env(Command::new("python3").args(["-c", put_later, &port.to_string()])), 60);
    assert_eq!(code, 0, "{err}");
    let data_dir = data.clone();
    let origins = vec![bucket_url.clone(), format!("http://127.0.0.1:{app_port}")];
    let s = Server::start_in(tempfile::tempdir().unwrap(), move |p| {
        p.data_dir = Some(data_dir);
        p.fallback_origins = Some(origins);
    })
    .await;
    let r = curl(&[&s.url("/b1/%C3%BC%20dir/%C3%A9%20x.png")]);
    assert_eq!((r.status, r.body.as_slice()), (200, &b"unicode"[..]));
    let r = curl(&[&s.url("/b5/avatars/later.png")]);
    assert_eq!((r.status, r.body.as_slice()), (200, &b"uploaded after the migration"[..]));
    let landed = statics.join("b5/avatars/later.png");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read(&landed).ok().as_deref() != Some(&b"uploaded after the migration"[..]) {
        assert!(Instant::now() < deadline, "not backfilled into the static folder");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!s.blogs_dir().join("b5/avatars/later.png").exists(), "backfilled into the user's folder");
    assert_eq!(curl(&[&s.url("/b5/page.html")]).body, b"from the app");
    s.stop().await;
}

/// A bucket that misbehaves (an endless listing, an endless error page)
/// makes `migrate` fail within a bound, saying what it got, and its memory
/// stays bounded: before, an endless 500 hung it, and a listing was read
/// into memory however long it was.
#[test]
fn an_endless_listing_or_error_page_fails_the_run_in_bounded_time_and_memory() {
    let listing = common::EndlessServer::start(
        "HTTP/1.1 200 OK\r\nContent-Type: application/xml\r\nConnection: close\r\n\r\n<ListBucketResult>",
        b"<Contents><Key>b1/a.png</Key><Size>1</Size></Contents>",
    );
    let error = common::EndlessServer::start(
        "HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n",
        b"the bucket is on fire ",
    );
    for (server, says) in
        [(&listing, "at most 16777216 bytes"), (&error, "500 Internal Server Error the bucket is on fire")]
    {
        let work = tempfile::tempdir().unwrap();
        let data = work.path().join("data");
        let url = format!("http://127.0.0.1:{}/{BUCKET}", server.port);
        let started = Instant::now();
        let mut child = migrate(&data, &url, &[]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let mut peak = 0;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            // (It may exit between the two looks.)
            peak = peak.max(common::try_rss_of(child.id()).unwrap_or(0));
            if started.elapsed() > Duration::from_secs(120) {
                let _ = child.kill();
                panic!("migrate against a misbehaving bucket still ran after 120 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!status.success(), "migrate succeeded against an endless answer: {err}");
        assert!(err.contains(says) && err.contains("ListObjectsV2 failed three times"), "{err}");
        // Three tries of at most 16 MiB each (or 300 bytes of an error page).
        assert!(peak < 120 << 20, "migrate took {} MiB against an endless answer", peak >> 20);
        assert!(server.sent() < 1 << 30, "{} MiB were read from the bucket", server.sent() >> 20);
        eprintln!("{says}: failed in {:?}, peak {} MiB", started.elapsed(), peak >> 20);
    }
}

/// A key that is also the folder of other keys (`b1/dir` beside
/// `b1/dir/child.css`) cannot be both: one of the two fails the run, never
/// counted as skipped. (Copied at once, the folder the child's copy made
/// took the file's name, and the file was counted as skipped: a run that
/// said nothing failed had not copied it, and a resume went past it.)
#[test]
fn a_key_that_is_also_a_folder_fails_the_run_and_is_never_skipped() {
    let work = tempfile::tempdir().unwrap();
    let (_moto, port) = moto();
    let script = r#"
import sys, boto3
from concurrent.futures import ThreadPoolExecutor
s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{sys.argv[1]}", region_name="us-east-1")
s3.create_bucket(Bucket="legacy")
objs = {}
for i in range(16):
    # The file is large, so its copy is named after the child's folder is made.
    objs[f"b{i}/dir"] = bytes([i]) * (1 << 20)
    objs[f"b{i}/dir/child.css"] = b"child"
with ThreadPoolExecutor(8) as ex:
    list(ex.map(lambda kv: s3.put_object(Bucket="legacy", Key=kv[0], Body=kv[1]), objs.items()))
"#;
    let (code, out, err) = run(aws_env(Command::new("python3").args(["-c", script, &port.to_string()])), 120);
    assert_eq!(code, 0, "populate: {out}{err}");
    let data = work.path().join("data");
    let url = format!("http://127.0.0.1:{port}/{BUCKET}");
    let (code, out, err) = run(&mut migrate(&data, &url, &["--concurrency", "8"]), 300);
    assert_ne!(code, 0, "a run with a key that cannot be written succeeded: {out}{err}");
    let [copied, skipped, _, failed] = summary(&out);
    assert_eq!((copied, skipped, failed), (16, 0, 16), "{out}{err}");
    for i in 0..16u8 {
        let dir = data.join(format!("static/b{i}/dir"));
        let m = std::fs::symlink_metadata(&dir).unwrap();
        if m.is_file() {
            assert_eq!(std::fs::read(&dir).unwrap(), vec![i; 1 << 20]);
        } else {
            assert_eq!(std::fs::read(dir.join("child.css")).unwrap(), b"child");
            assert!(err.contains(&format!("b{i}/dir is already something that is not a file")), "{err}");
        }
    }
    // The resume point stays before what failed: the same run again fails the same keys.
    let (code, out, _) = run(&mut migrate(&data, &url, &[]), 300);
    assert_ne!(code, 0, "{out}");
    assert_eq!(summary(&out)[3], 16, "{out}");
}

/// Two runs of the same bucket at once would copy every object twice and
/// write over each other's resume point: the second is refused, naming the
/// first, which goes on, however the bucket's URL is spelled.
#[test]
fn a_second_run_of_the_same_bucket_is_refused_while_the_first_runs() {
    // A bucket that takes the connection and never answers: the first run
    // waits on its listing (having taken its lock before it connected).
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    silent.set_nonblocking(true).unwrap();
    let url = format!("http://127.0.0.1:{}/{BUCKET}", silent.local_addr().unwrap().port());
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let mut first = migrate(&data, &url, &[]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let started = Instant::now();
    let _held = loop {
        match silent.accept() {
            Ok((conn, _)) => break conn,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
        assert!(first.try_wait().unwrap().is_none(), "the first run ended before it listed");
        assert!(started.elapsed() < Duration::from_secs(30), "the first run never asked for its listing");
        std::thread::sleep(Duration::from_millis(10));
    };
    // The same bucket, spelled otherwise.
    let spelled = format!("HTTP://127.0.0.1:{}/{BUCKET}/", silent.local_addr().unwrap().port());
    let mut second = migrate(&data, &spelled, &[]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let asked = Instant::now();
    while second.try_wait().unwrap().is_none() && asked.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = second.kill();
    let second = second.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "{err}");
    let pid = format!("pid {}", first.id());
    assert!(err.contains("another migrate of this bucket and prefix is running") && err.contains(&pid), "{err}");
    assert!(first.try_wait().unwrap().is_none(), "the first run was stopped by the second");
    // Another prefix of the same bucket is another run.
    let mut other = migrate(&data, &url, &["--prefix", "b1/"]).stderr(Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let other_ran = other.try_wait().unwrap().is_none();
    let _ = other.kill();
    let other_err = String::from_utf8_lossy(&other.wait_with_output().unwrap().stderr).into_owned();
    assert!(other_ran || !other_err.contains("another migrate"), "{other_err}");
    first.kill().unwrap();
    first.wait().unwrap();
}

/// A listing that hands back its own continuation token, or keys that are
/// not in order, would have `migrate` go round the same keys for ever (a
/// hostile bucket did): the run stops, saying the listing is broken. So
/// does one that sends empty pages, each naming a new next one, for ever
/// (the run went on, silent), and one that lists keys outside `--prefix`
/// (they were copied, into the folders of the blogs they name).
#[test]
fn a_listing_that_goes_round_in_circles_stops_the_run() {
    use std::io::{BufRead, BufReader, Write};
    let page = |token: &str, keys: &[&str]| {
        let contents: String = keys
            .iter()
            .map(|k| format!("<Contents><Key>{k}</Key><Size>1</Size><ETag>\"x\"</ETag></Contents>"))
            .collect();
        let body = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><ListBucketResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Name>{BUCKET}</Name><KeyCount>{}</KeyCount>\
             <MaxKeys>1000</MaxKeys><IsTruncated>true</IsTruncated>{contents}\
             <NextContinuationToken>{token}</NextContinuationToken></ListBucketResult>",
            keys.len()
        );
        format!("HTTP/1.1 200 OK\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n{body}", body.len())
    };
    for (answers, says, prefix) in [
        // Pages that hand back the token they were asked with.
        (vec![page("same", &["b1/a.png", "b1/b.png"]), page("same", &[])], "the same continuation token twice", None),
        // A second page that starts over.
        (vec![page("one", &["b1/a.png", "b1/b.png"]), page("two", &["b1/a.png"])], "not in key order", None),
        // Empty pages, each with a token of its own (numbered as served).
        (vec![page("one", &["b1/a.png"]), page("page-NNNN", &[])], "held no key", None),
        // A key of another blog than the prefix asked for.
        (vec![page("one", &["b1/a.png", "victim/style.css"])], "outside the prefix", Some("b1/")),
    ] {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        // Listings get the pages in turn (the last one again), objects a 404.
        let answers = std::sync::Arc::new(answers);
        let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        std::thread::spawn(move || {
            for conn in listener.incoming().take(64) {
                let Ok(mut conn) = conn else { return };
                let (answers, served) = (answers.clone(), served.clone());
                std::thread::spawn(move || {
                    let mut r = BufReader::new(conn.try_clone().unwrap());
                    // A few hundred requests a connection at most.
                    for _ in 0..500 {
                        let mut line = String::new();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let listing = line.contains("list-type=2");
                        while r.read_line(&mut line).is_ok_and(|n| n > 2) {
                            line.clear();
                        }
                        let answer = match listing {
                            true => {
                                let n = served.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                answers[n.min(answers.len() - 1)].replace("page-NNNN", &format!("page-{n:04}"))
                            }
                            false => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_string(),
                        };
                        if conn.write_all(answer.as_bytes()).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let work = tempfile::tempdir().unwrap();
        let url = format!("http://127.0.0.1:{port}/{BUCKET}");
        let extra = prefix.map(|p| vec!["--prefix", p]).unwrap_or_default();
        let (code, out, err) = run(&mut migrate(&work.path().join("data"), &url, &extra), 60);
        assert_ne!(code, 0, "{out}{err}");
        assert!(err.contains("listing is broken") && err.contains(says), "{err}");
        assert!(!work.path().join("data/static/victim").exists(), "a key outside the prefix was copied");
    }
}

/// What the bucket says of an object besides its bytes. Before, `migrate`
/// copied an object stored gzipped as its compressed bytes, answered then
/// as the file itself (a stylesheet that no longer worked), and an object
/// whose name has no extension, or the wrong one, lost the Content-Type
/// the bucket gave it, after `migrate` and after a backfill alike. Now a
/// gzipped object stays in the bucket (the fallback answers it with its
/// encoding), and a copy keeps the bucket's type where its name says
/// another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_keep_their_content_type_and_gzipped_ones_stay_in_the_bucket() {
    let work = tempfile::tempdir().unwrap();
    let (_moto, port) = moto();
    let put = r#"
import gzip, sys, boto3
s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{sys.argv[1]}", region_name="us-east-1")
if sys.argv[2] == "before":
    s3.create_bucket(Bucket="legacy")
    put = lambda key, body, **kw: s3.put_object(Bucket="legacy", Key=key, Body=body, ACL="public-read", **kw)
    put("t1/style.css", gzip.compress(b"body { color: red }"), ContentEncoding="gzip", ContentType="text/css")
    put("t1/_image_cache/9f1c2d7e", b"\x89PNG not really", ContentType="image/png")
    put("t1/feed", b"<rss/>", ContentType="application/rss+xml")
    put("t1/plain.css", b"p { }", ContentType="text/css")
    put("t1/font.woff", b"wOFF", ContentType="application/x-font-woff")
    put("t1/longtype", b"long", ContentType="image/x-" + "a" * 200)
    # Not ASCII: botocore sends it as Latin-1 bytes.
    put("t1/obstype", b"obs", ContentType="image/x-\u00e9t\u00e9")
else:
    s3.put_object(Bucket="legacy", Key="t1/later/notes", Body=b"later", ContentType="text/plain", ACL="public-read")
    s3.put_object(Bucket="legacy", Key="t1/later/long", Body=b"long", ContentType="image/x-" + "a" * 200, ACL="public-read")
    s3.put_object(Bucket="legacy", Key="t1/later/obs", Body=b"obs", ContentType="image/x-\u00e9t\u00e9", ACL="public-read")
"#;
    let long_type = format!("image/x-{}", "a".repeat(200));
    let python = |when: &str| run(aws_env(Command::new("python3").args(["-c", put, &port.to_string(), when])), 60);
    let (code, out, err) = python("before");
    assert_eq!(code, 0, "{out}{err}");
    let bucket_url = format!("http://127.0.0.1:{port}/{BUCKET}");
    let data = work.path().join("data");
    let (code, out, err) = run(&mut migrate(&data, &bucket_url, &[]), 120);
    assert_eq!((code, summary(&out)), (0, [4, 0, 3, 0]), "{out}{err}");
    assert!(err.contains("left: t1/style.css: stored with Content-Encoding gzip"), "{err}");
    // A type longer than a copy can keep: left too (it was copied without it, and answered as
    // the extension says, as a hostile test found).
    assert!(err.contains("left: t1/longtype: its Content-Type is 208 bytes, more than the 200"), "{err}");
    assert!(err.contains("left: t1/obstype: its Content-Type \"image/x-"), "{err}");
    assert!(out.contains("left in the bucket: 3 objects"), "{out}");
    assert!(!data.join("static/t1/longtype").exists() && !data.join("static/t1/obstype").exists());
    assert!(!data.join("static/t1/style.css").exists(), "a gzipped object was copied as its bytes");
    let (code, out, err) = python("after");
    assert_eq!(code, 0, "{out}{err}");

    let (data_dir, origin) = (data.clone(), bucket_url.clone());
    let s = Server::start_in(tempfile::tempdir().unwrap(), move |p| {
        p.data_dir = Some(data_dir);
        p.fallback_origins = Some(vec![origin]);
    })
    .await;
    // The gzipped one, from the bucket, with its encoding.
    let r = curl(&[&s.url("/t1/style.css")]);
    assert_eq!((r.status, r.header("content-encoding")), (200, Some("gzip")));
    // The copies, with the bucket's types where their names say another.
    for (path, ty) in [
        ("/t1/_image_cache/9f1c2d7e", "image/png"),
        ("/t1/feed", "application/rss+xml"),
        ("/t1/plain.css", "text/css; charset=utf-8"),
    ] {
        let r = curl(&[&s.url(path)]);
        assert_eq!((r.status, r.header("content-type")), (200, Some(ty)), "{path}");
    }
    // A font the bucket typed its own way: its type, and still CORS.
    let r = curl(&[&s.url("/t1/font.woff")]);
    assert_eq!(r.header("content-type"), Some("application/x-font-woff"));
    assert_eq!(r.header("access-control-allow-origin"), Some("*"), "a font without CORS");
    // Backfilled: the same type from the bucket, then from the copy.
    let r = curl(&[&s.url("/t1/later/notes")]);
    assert_eq!((r.status, r.body.as_slice(), r.header("content-type")), (200, &b"later"[..], Some("text/plain")));
    let landed = data.join("static/t1/later/notes");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !landed.exists() {
        assert!(Instant::now() < deadline, "not backfilled into the static folder");
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = curl(&[&s.url("/t1/later/notes")]);
    assert_eq!((r.status, r.header("content-type")), (200, Some("text/plain")), "the backfilled copy");
    // One too long to keep: answered with it, from the bucket, every time; never copied.
    for path in ["/t1/later/long", "/t1/later/long", "/t1/longtype"] {
        let r = curl(&[&s.url(path)]);
        assert_eq!((r.status, r.header("content-type")), (200, Some(long_type.as_str())), "{path}");
    }
    // Nor one whose type is not ASCII (answered with its bytes as the bucket sent them).
    for _ in 0..2 {
        let r = curl(&[&s.url("/t1/later/obs")]);
        assert_eq!(r.status, 200);
        assert!(r.header("content-type").is_some_and(|t| t.starts_with("image/x-")), "{:?}", r.header("content-type"));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(!data.join("static/t1/later/long").exists(), "copied without its type");
    assert!(!data.join("static/t1/later/obs").exists(), "copied without its type");
    s.stop().await;
}
