//! Migration throughput: `blotcdn migrate` copying a bucket from an S3 API
//! server on 127.0.0.1 (moto's standalone server) into an empty static
//! folder, in objects/s and MB/s, for small (20 KiB) and large (10 MiB)
//! objects, next to a plain parallel download loop in Python (boto3, 16
//! workers, listing then writing the same files) from the same server.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use super::{common, Opts, Row};

const POPULATE: &str = r#"
import os, sys, boto3
from concurrent.futures import ThreadPoolExecutor
port, bucket, n, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1")
s3.create_bucket(Bucket=bucket)
body = os.urandom(size)
with ThreadPoolExecutor(16) as ex:
    list(ex.map(lambda i: s3.put_object(Bucket=bucket, Key=f"b{i % 50}/img/{i}.jpg", Body=body), range(n)))
"#;

/// The peer: list, then 16 threads each getting objects and writing them
/// under the same names.
const PEER: &str = r#"
import os, sys, boto3
from concurrent.futures import ThreadPoolExecutor
port, bucket, out = sys.argv[1], sys.argv[2], sys.argv[3]
s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1")
keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket) for o in page.get("Contents", [])]
def get(k):
    path = os.path.join(out, k)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    body = s3.get_object(Bucket=bucket, Key=k)["Body"].read()
    with open(path, "wb") as f:
        f.write(body)
with ThreadPoolExecutor(16) as ex:
    list(ex.map(get, keys))
print(len(keys))
"#;

fn aws(c: &mut Command) -> &mut Command {
    c.env("AWS_ACCESS_KEY_ID", "bench").env("AWS_SECRET_ACCESS_KEY", "bench").env("AWS_REGION", "us-east-1")
}

fn python(script: &str, args: &[&str]) -> String {
    let out = aws(Command::new("python3").args(["-c", script]).args(args)).output().expect("python3");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// (seconds, objects) of one `blotcdn migrate` into `data`.
fn ours(port: u16, bucket: &str, data: &Path) -> f64 {
    let started = Instant::now();
    let out = aws(Command::new(env!("CARGO_BIN_EXE_blotcdn")).args(["migrate", "--data-dir"]).arg(data).args([
        "--bucket-url",
        &format!("http://127.0.0.1:{port}/{bucket}"),
        "--concurrency",
        "16",
    ]))
    .env("RUST_LOG", "error")
    .output()
    .expect("blotcdn");
    let secs = started.elapsed().as_secs_f64();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains(", failed 0"), "{text}{}", String::from_utf8_lossy(&out.stderr));
    secs
}

pub async fn bench_migrate(o: &Opts, rows: &mut Vec<Row>) {
    let (_moto, port) = common::Daemon::spawn_on_free_port("moto", |p| {
        let mut c = Command::new("python3");
        c.args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &p.to_string()]);
        c
    });
    let sets: [(&str, usize, usize); 2] = if o.quick {
        [("small", 500, 20 << 10), ("large", 8, 10 << 20)]
    } else {
        [("small", 2000, 20 << 10), ("large", 40, 10 << 20)]
    };
    println!("== Migrate: moto's S3 server on 127.0.0.1 → an empty static folder, 16 at once");
    for (name, n, size) in sets {
        python(POPULATE, &[&port.to_string(), name, &n.to_string(), &size.to_string()]);
        let dir = tempfile::tempdir_in(".").unwrap();
        let secs = ours(port, name, &dir.path().join("data"));
        let peer_dir = dir.path().join("peer");
        let started = Instant::now();
        let listed = python(PEER, &[&port.to_string(), name, peer_dir.to_str().unwrap()]);
        let peer_secs = started.elapsed().as_secs_f64();
        assert_eq!(listed.trim(), n.to_string());
        let mb = (n * size) as f64 / 1e6;
        let fig = |s: f64| format!("{:.0} objects/s, {:.1} MB/s", n as f64 / s, mb / s);
        println!("{:>28}: {} ({:.2} s)", format!("blotcdn migrate, {name}"), fig(secs), secs);
        println!("{:>28}: {} ({:.2} s)", format!("python boto3 ×16, {name}"), fig(peer_secs), peer_secs);
        rows.push(Row {
            bench: "Migrate",
            what: format!("{n} objects of {} KiB: objects/s, MB/s", size >> 10),
            ours: fig(secs),
            peer: format!("Python boto3 ×16: {}", fig(peer_secs)),
            ratio: super::ratio(peer_secs, secs),
            target: "≥ 1×".into(),
        });
    }
}
