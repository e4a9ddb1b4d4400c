//! The real grpcurl binary against the real server, as a person debugging
//! would use it: no proto files at hand, reflection only.

use crate::common;

use std::process::Command;

use common::{run, Server};

/// `grpcurl -plaintext {flags} {addr} {target}`.
fn grpcurl(s: &Server, flags: &[&str], target: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new("grpcurl");
    cmd.arg("-plaintext").args(flags).arg(s.grpc.to_string()).args(target);
    run(&mut cmd, 60)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_and_describe_by_reflection() {
    let s = Server::start().await;
    let (code, out, err) = grpcurl(&s, &[], &["list"]);
    assert_eq!(code, 0, "{err}");
    for svc in ["blotcdn.v1.Publisher", "blotcdn.v1.Resolver", "grpc.health.v1.Health"] {
        assert!(out.lines().any(|l| l == svc), "{svc} missing from:\n{out}");
    }
    let (code, out, err) = grpcurl(&s, &[], &["describe", "blotcdn.v1.Resolver"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(
            "rpc ResolveBatch ( .blotcdn.v1.ResolveBatchRequest ) returns ( .blotcdn.v1.ResolveBatchResponse )"
        ),
        "{out}"
    );
    let (code, out, err) = grpcurl(&s, &[], &["describe", "blotcdn.v1.ResolvedAsset"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("uint64 cache_id = 3;") && out.contains("string content_hash = 4;"), "{out}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_and_resolve_with_json() {
    let s = Server::start().await;
    let (code, out, err) = grpcurl(&s, &["-d", r#"{"blog_id":"443d398b03"}"#], &["blotcdn.v1.Publisher/Invalidate"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    // proto3 JSON spells uint64 as a string.
    let floor: u64 = v["cacheId"].as_str().unwrap().parse().unwrap();

    let body = r#"{"blog_id":"443d398b03","paths":["/style.css","/../x","/img/a b.png"]}"#;
    let (code, out, err) = grpcurl(&s, &["-d", body], &["blotcdn.v1.Resolver/ResolveBatch"]);
    assert_eq!(code, 0, "{err}");
    let base = format!("http://{}", s.http);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let a = v["assets"].as_array().unwrap();
    assert_eq!(a.len(), 3);
    assert_eq!(a[0]["url"], format!("{base}/443d398b03/{floor}/style.css"));
    assert_eq!(a[0]["status"], "RESOLVE_STATUS_OK");
    assert_eq!(a[1]["status"], "RESOLVE_STATUS_INVALID_PATH");
    assert_eq!(a[2]["url"], format!("{base}/443d398b03/{floor}/img/a%20b.png"));

    // A bad request: a clear error naming the problem, non-zero exit.
    let (code, _, err) = grpcurl(&s, &["-d", r#"{"blog_id":"bad id"}"#], &["blotcdn.v1.Publisher/Invalidate"]);
    assert_ne!(code, 0);
    assert!(err.contains("InvalidArgument") && err.contains("blog id"), "{err}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_check_and_tokens() {
    let s = Server::start_with(|p| p.publisher_tokens = Some(vec!["pub-token".into()])).await;
    let (code, out, err) = grpcurl(&s, &[], &["grpc.health.v1.Health/Check"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("SERVING"), "{out}");
    let (code, out, err) =
        grpcurl(&s, &["-d", r#"{"service":"blotcdn.v1.Resolver"}"#], &["grpc.health.v1.Health/Check"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(r#""status": "SERVING""#), "{out}");

    let (code, _, err) = grpcurl(&s, &["-d", r#"{"blog_id":"b"}"#], &["blotcdn.v1.Publisher/Invalidate"]);
    assert_ne!(code, 0);
    assert!(err.contains("Unauthenticated"), "{err}");
    let (code, out, err) = grpcurl(
        &s,
        &["-H", "authorization: Bearer pub-token", "-d", r#"{"blog_id":"b"}"#],
        &["blotcdn.v1.Publisher/Invalidate"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("cacheId"), "{out}");
    s.stop().await;
}
