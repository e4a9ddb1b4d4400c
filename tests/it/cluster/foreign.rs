//! What a node does with keys under its prefix that no writer of its
//! cluster wrote (an operator's put, a restored key, a second cluster given
//! a prefix inside this one's), and with a group of its own that etcd
//! holds damaged.

use super::kv_put as put;
use super::*;
use blotcdn::etcdpb::{kv_client::KvClient, request_op::Request, RangeRequest, RequestOp};

/// The last record written (`/blotcdn/head`).
async fn head(kv: &mut KvClient<Channel>) -> u64 {
    let r = kv.range(RangeRequest { key: b"/blotcdn/head".to_vec(), ..Default::default() }).await.unwrap();
    u64::from_be_bytes(r.into_inner().kvs[0].value[..8].try_into().unwrap())
}

/// A node's environment on `etcd` with `etcd_prefix` set to `prefix`.
fn prefixed(etcd: &EtcdCluster, prefix: &str) -> Vec<(String, String)> {
    let mut env = node_env(&etcd.endpoints(), &[]);
    env.push(("BLOTCDN_ETCD_PREFIX".into(), prefix.into()));
    env
}

/// Each node's cache ids for `paths` of `blog`, once they agree (a watch
/// may be a moment behind).
async fn agreed(nodes: &[&ChildServer], blog: &str, paths: &[String]) -> Vec<u64> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut seen = Vec::new();
        for n in nodes {
            seen.push(cache_ids(&mut resolver(n).await, blog, paths).await);
        }
        if seen.windows(2).all(|w| w[0] == w[1]) {
            return seen.pop().unwrap();
        }
        assert!(Instant::now() < deadline, "the nodes never agreed: {seen:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Before, a copy of a group put under a later key (the head left alone)
/// stopped every write on every node, for good, as "too many concurrent
/// writers", and a second cluster whose prefix lay under this one's `log/`
/// took its first write for a damaged group of this one's: every node
/// refused writes, and a restart could not start. Parts no try of this
/// cluster could be writing were held in every node's memory (100 MiB put,
/// 100 MB more on each node) and loaded again at every start; and parts put
/// for the next record were held until the log passed it (155 MB seen).
/// Now such keys are left alone: writes go on, a restarted node starts and
/// agrees, and the parts of the next record are deleted once it is passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_under_the_prefix_that_no_writer_wrote_are_left_alone() {
    let etcd = EtcdCluster::start(1);
    let work = tempfile::tempdir().unwrap();
    let a = node(&etcd, &work.path().join("a"), &[]);
    let mut b = node(&etcd, &work.path().join("b"), &[]);
    let paths: Vec<String> = vec!["/a.css".into(), "/b.css".into()];
    invalidate(&mut publisher(&a).await, "foreign", &paths).await.unwrap();
    let mut kv = KvClient::connect(etcd.endpoint(0)).await.unwrap();
    let last = head(&mut kv).await;
    let newest = kv
        .range(RangeRequest { key: format!("/blotcdn/log/{last:016x}").into_bytes(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let newest = newest.kvs.first().map(|kv| kv.value.clone()).expect("a one-record group ends at the head");
    let rss_before = a.rss_bytes();
    // A copy of the newest group under a later key; bytes where the next
    // group will go; a second cluster's first write under `log/`.
    put_all(&mut kv, vec![put(format!("/blotcdn/log/{:016x}", last + 0x1000), newest.clone())]).await;
    put_all(&mut kv, vec![put(format!("/blotcdn/log/{:016x}", last + 1), vec![7u8; 40])]).await;
    put_all(
        &mut kv,
        vec![put("/blotcdn/log/head", 1u64.to_be_bytes()), put("/blotcdn/log/log/0000000000000001", newest)],
    )
    .await;
    // 32 MiB of parts of a record far past the head, 32 MiB of parts of the
    // next record (as a try that never commits would leave), and a part key
    // of no writer's shape right under `part/`.
    let next_part = |i: u32| format!("/blotcdn/part/{:016x}-{:016x}-{:016x}/{i:08x}", last + 1, 9u64, 1u64);
    for i in 0..32u32 {
        let key = format!("/blotcdn/part/{:016x}-{:016x}-{:016x}/{i:08x}", last + 500, 7u64, 1u64);
        put_all(&mut kv, vec![put(key, vec![i as u8; 1 << 20])]).await;
        put_all(&mut kv, vec![put(next_part(i), vec![i as u8; 1 << 20])]).await;
    }
    put_all(&mut kv, vec![put("/blotcdn/part/0000000000000001", vec![1u8; 10])]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let grown = a.rss_bytes().saturating_sub(rss_before);
    assert!(grown < 12 << 20, "64 MiB of parts no group names took {} MiB of a node's memory", grown >> 20);

    // A node started now reads past them.
    drop(std::mem::replace(&mut b, node(&etcd, &work.path().join("b2"), &[])));
    let before = agreed(&[&a, &b], "foreign", &paths).await;
    // Writes go on, on either node, and both agree.
    for (n, path) in [(&a, "/a.css"), (&b, "/b.css")] {
        let mut p = publisher(n).await;
        let done = tokio::time::timeout(Duration::from_secs(10), invalidate(&mut p, "foreign", &[path.into()])).await;
        done.expect("a write answered").unwrap_or_else(|e| panic!("a write refused: {}", e.message()));
    }
    let after = agreed(&[&a, &b], "foreign", &paths).await;
    assert!(after[0] > before[0] && after[1] > before[1], "{before:?} then {after:?}");
    // The next record is taken: the parts put for it are no group's, and
    // a later write deletes them.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        invalidate(&mut publisher(&a).await, "foreign", &paths[..1]).await.unwrap();
        let r = kv.range(RangeRequest { key: next_part(0).into_bytes(), ..Default::default() }).await.unwrap();
        if r.into_inner().kvs.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "the parts put for the next record are still in etcd");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The copy and the second cluster's keys are still there: not this
    // cluster's to delete.
    let copy = format!("/blotcdn/log/{:016x}", last + 0x1000).into_bytes();
    let r = kv.range(RangeRequest { key: copy, ..Default::default() }).await.unwrap().into_inner();
    assert_eq!(r.kvs.len(), 1);
}

/// A group of the cluster's own log (written with the head) that cannot be
/// read: before, every node refused writes saying "restart the server to
/// reload from etcd", and a restart retried the load for 10 s, then could
/// not start, naming a revision. Now writes are refused naming the key,
/// and a node starting refuses at once, naming it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_group_of_the_log_is_named_and_a_start_refuses_it_at_once() {
    let etcd = EtcdCluster::start(1);
    let work = tempfile::tempdir().unwrap();
    let a = node(&etcd, &work.path().join("a"), &[]);
    let mut p = publisher(&a).await;
    invalidate(&mut p, "damaged", &["/a.css".into()]).await.unwrap();
    let mut kv = KvClient::connect(etcd.endpoint(0)).await.unwrap();
    let next = head(&mut kv).await + 1;
    let key = format!("/blotcdn/log/{next:016x}");
    put_all(&mut kv, vec![put("/blotcdn/head", next.to_be_bytes()), put(key.clone(), vec![9u8; 40])]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let e = loop {
        match invalidate(&mut p, "damaged", &["/b.css".into()]).await {
            Err(e) if e.message().contains(&key) => break e,
            other => {
                assert!(Instant::now() < deadline, "writes go on over a damaged group: {other:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert!(!e.message().contains("restart the server to reload"), "{}", e.message());
    // Reads go on.
    assert_eq!(cache_ids(&mut resolver(&a).await, "damaged", &["/a.css".into()]).await.len(), 1);
    // A node starting now reads the same group: it says so, and does not
    // try again for 10 s first.
    let (code, log, err) = serve_to_exit(&work.path().join("c"), &node_env(&etcd.endpoints(), &[]));
    assert!(code != 0 && err.contains(&key), "{code} {err}");
    assert!(!log.contains("trying again"), "{log}");
    // Said once (the exit line repeated its cause).
    let exit = err.lines().find(|l| l.starts_with("blotcdn: ")).expect(&err);
    assert_eq!(exit.matches(key.as_str()).count(), 1, "{exit}");
}

/// A prefix must end with a slash, and may not lie among another
/// cluster's keys: either would take that cluster's keys for its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_inside_another_clusters_keys_is_refused() {
    let etcd = EtcdCluster::start(1);
    let work = tempfile::tempdir().unwrap();
    let a = node(&etcd, &work.path().join("a"), &[]);
    invalidate(&mut publisher(&a).await, "outer", &["/a.css".into()]).await.unwrap();
    for (prefix, says) in [("/blotcdn/log/", "lies among the keys"), ("/blotcdn", "must end with")] {
        let (code, _, err) = serve_to_exit(&work.path().join("b"), &prefixed(&etcd, prefix));
        assert!(code != 0 && err.contains("etcd_prefix") && err.contains(says), "{prefix}: {code} {err}");
    }
    // The other way round: a cluster started inside another's prefix before
    // that one wrote. The outer one, started now, refuses (its snapshots'
    // deletions of its log would reach the inner one's keys).
    let env = prefixed(&etcd, "/c2/log/0/");
    let inner = ChildServer::spawn_with(
        &work.path().join("inner"),
        &[],
        &env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect::<Vec<_>>(),
    );
    invalidate(&mut publisher(&inner).await, "inner", &["/a.css".into()]).await.unwrap();
    let (code, _, err) = serve_to_exit(&work.path().join("outer"), &prefixed(&etcd, "/c2/"));
    assert!(code != 0 && err.contains("/c2/log/0/head"), "{code} {err}");
}

/// A backup of the one member's data dir, copied while it is stopped.
fn back_up(etcd: &mut EtcdCluster, work: &Path) -> std::path::PathBuf {
    etcd.kill(0);
    let backup = work.join("backup");
    std::fs::create_dir_all(&backup).unwrap();
    copy_dir(&etcd.member_dir(0), &backup);
    etcd.restart(0);
    assert!(etcd.wait_healthy(Duration::from_secs(20)));
    backup
}

/// The member's data dir put back as `backup` has it.
fn restore(etcd: &mut EtcdCluster, backup: &Path) {
    etcd.kill(0);
    std::fs::remove_dir_all(etcd.member_dir(0)).unwrap();
    std::fs::create_dir_all(etcd.member_dir(0)).unwrap();
    copy_dir(backup, &etcd.member_dir(0));
    etcd.restart(0);
    assert!(etcd.wait_healthy(Duration::from_secs(20)));
}

/// etcd restored from a backup (here: its data dir copied while stopped,
/// and copied back) goes back to an earlier revision. Before, running nodes
/// kept serving the writes the restore took away, refused every write as
/// "too many concurrent writers", and, once etcd's revisions passed theirs
/// again, built writes on groups they had never applied: nodes answered
/// the same path with different cache ids. Now a node whose watch finds
/// etcd behind what it had seen reloads the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_reloads_when_etcd_is_restored_from_a_backup() {
    let mut etcd = EtcdCluster::start(1);
    let work = tempfile::tempdir().unwrap();
    let a = node(&etcd, &work.path().join("a"), &[]);
    let mut p = publisher(&a).await;
    let paths: Vec<String> = vec!["/a.css".into(), "/b.css".into()];
    invalidate(&mut p, "restored", &paths[..1]).await.unwrap();
    // The backup.
    let backup = back_up(&mut etcd, work.path());
    // Writes after it, which the restore takes away.
    for i in 0..5 {
        patiently(&mut p, "restored", &paths[1..]).await;
        patiently(&mut p, &format!("gone{i}"), &paths).await;
    }
    let lost = cache_ids(&mut resolver(&a).await, "restored", &paths).await;
    // C is away (paused) through the restore, until etcd's revision has
    // passed the one it had seen: its watch then reopens on a revision that
    // exists again, and its revision alone says nothing.
    let c = node(&etcd, &work.path().join("c"), &[]);
    agreed(&[&a, &c], "restored", &paths).await;
    let signal = |sig| assert_eq!(unsafe { libc::kill(c.child.id() as i32, sig) }, 0);
    signal(libc::SIGSTOP);
    restore(&mut etcd, &backup);
    // A write gets in, and A answers as a node started now does.
    let deadline = Instant::now() + Duration::from_secs(15);
    let id = loop {
        match invalidate(&mut p, "after", &paths).await {
            Ok(id) => break id,
            Err(e) => assert!(Instant::now() < deadline, "writes refused after the restore: {}", e.message()),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(id > 0);
    for i in 0..20 {
        patiently(&mut p, "after", &[format!("/{i}.css")]).await;
    }
    signal(libc::SIGCONT);
    let b = node(&etcd, &work.path().join("b"), &[]);
    let now = agreed(&[&a, &b, &c], "restored", &paths).await;
    assert_ne!(now, lost, "the nodes still answer the writes the restore took away");
    assert_eq!(agreed(&[&a, &b, &c], "after", &paths).await, vec![id, id]);
}

/// The head deleted by hand (`etcdctl del /blotcdn/head`) on a cluster with
/// no snapshot yet. Before, running nodes refused every write as "too many
/// concurrent writers" with `/healthz` 200, and a node started then loaded
/// an empty index and answered every blog as unknown; its first write took
/// record 1 again, over the group there. Now the running nodes say the head
/// is gone, and a start refuses, naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_head_stops_writes_and_a_start_names_it() {
    let etcd = EtcdCluster::start(1);
    let work = tempfile::tempdir().unwrap();
    let a = node(&etcd, &work.path().join("a"), &[]);
    let mut p = publisher(&a).await;
    invalidate(&mut p, "headless", &["/a.css".into()]).await.unwrap();
    let mut kv = KvClient::connect(etcd.endpoint(0)).await.unwrap();
    let del = blotcdn::etcdpb::DeleteRangeRequest { key: b"/blotcdn/head".to_vec(), ..Default::default() };
    put_all(&mut kv, vec![RequestOp { request: Some(Request::RequestDeleteRange(del)) }]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match invalidate(&mut p, "headless", &["/b.css".into()]).await {
            Err(e) if e.message().contains("/blotcdn/head") => break,
            other => assert!(Instant::now() < deadline, "writes go on without a head: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(get(a.http, "/healthz", &[]).status, 503);
    let (code, _, err) = serve_to_exit(&work.path().join("b"), &node_env(&etcd.endpoints(), &[]));
    assert!(code != 0 && err.contains("/blotcdn/head"), "{code} {err}");
}

/// The head put back by hand lower than it was (a stale value, as after it
/// was deleted and put back from memory). Before, a node started then loaded
/// the log only up to that head, answered without the groups after it, and
/// its next writes went over them in etcd: acknowledged writes lost on every
/// node once the others restarted. Now a start reads every whole group past
/// the head, and its writes go after them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_put_back_lower_by_hand_loses_no_group() {
    let etcd = EtcdCluster::start(1);
    let work = tempfile::tempdir().unwrap();
    let a = node(&etcd, &work.path().join("a"), &[]);
    let mut pa = publisher(&a).await;
    let paths: Vec<String> = (0..4).map(|i| format!("/p{i}.css")).collect();
    for p in &paths {
        invalidate(&mut pa, "lowhead", std::slice::from_ref(p)).await.unwrap();
    }
    let mut kv = KvClient::connect(etcd.endpoint(0)).await.unwrap();
    let last = head(&mut kv).await;
    put_all(&mut kv, vec![put("/blotcdn/head", (last - 3).to_be_bytes())]).await;
    let before = cache_ids(&mut resolver(&a).await, "lowhead", &paths).await;
    assert!(before.windows(2).all(|w| w[0] < w[1]), "{before:?}");

    let b = node(&etcd, &work.path().join("b"), &[]);
    assert_eq!(agreed(&[&a, &b], "lowhead", &paths).await, before, "a node started now knows every acknowledged write");
    // Its writes go after the log's last group, not over the groups past the head.
    let mut pb_ = publisher(&b).await;
    invalidate(&mut pb_, "lowhead", &["/new.css".into()]).await.unwrap();
    invalidate(&mut pa, "lowhead", &["/new2.css".into()]).await.expect("the first node's writes go on");
    let all: Vec<String> = paths.iter().cloned().chain(["/new.css".into(), "/new2.css".into()]).collect();
    let now = agreed(&[&a, &b], "lowhead", &all).await;
    assert_eq!(now[..4], before[..], "the earlier writes kept their cache ids");
    // And a third node started after those writes agrees too.
    let c = node(&etcd, &work.path().join("c"), &[]);
    assert_eq!(agreed(&[&a, &b, &c], "lowhead", &all).await, now);
    assert!(head(&mut kv).await >= last + 2);
}

/// The snapshot pointer's value (`/blotcdn/snap`), once it is `want`
/// (None: absent).
async fn pointer_becomes(kv: &mut KvClient<Channel>, want: Option<&[u8]>, why: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = kv.range(RangeRequest { key: b"/blotcdn/snap".to_vec(), ..Default::default() }).await.unwrap();
        let now = r.into_inner().kvs.first().map(|kv| kv.value.clone());
        if now.as_deref() == want {
            return;
        }
        assert!(Instant::now() < deadline, "{why}: the pointer is {now:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The snapshot pointer changed or deleted by hand. Before, running nodes
/// went on with `/healthz` 200, and every node's next start was refused:
/// the cluster looked healthy until its next deploy. Now the running nodes
/// put it back as it was (or delete a pointer put where there was none),
/// and a node started after starts and agrees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_pointer_changed_by_hand_is_put_back() {
    let etcd = EtcdCluster::start(1);
    let work = tempfile::tempdir().unwrap();
    let a = node(&etcd, &work.path().join("a"), &[]);
    let mut kv = KvClient::connect(etcd.endpoint(0)).await.unwrap();
    invalidate(&mut publisher(&a).await, "snapped", &["/a.css".into()]).await.unwrap();
    // No snapshot yet: a pointer put by hand names nothing, and is deleted.
    let forged = [1u64.to_be_bytes().as_slice(), &0u32.to_be_bytes(), &1u64.to_be_bytes()].concat();
    put_all(&mut kv, vec![put("/blotcdn/snap", forged.clone())]).await;
    pointer_becomes(&mut kv, None, "a pointer where there was none").await;

    // Past 10,000 records: a snapshot.
    let mut writers = Vec::new();
    for t in 0..16 {
        let addr = a.grpc;
        writers.push(tokio::spawn(async move {
            let mut p = pb::publisher_client::PublisherClient::connect(format!("http://{addr}")).await.unwrap();
            for i in 0..640 {
                invalidate(&mut p, &format!("snapped{t}"), &[format!("/{i}.css")]).await.unwrap();
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let good = loop {
        let r = kv.range(RangeRequest { key: b"/blotcdn/snap".to_vec(), ..Default::default() }).await.unwrap();
        if let Some(kv) = r.into_inner().kvs.first() {
            break kv.value.clone();
        }
        assert!(Instant::now() < deadline, "no snapshot written");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The record kept, the chunks and the nonce changed; then deleted.
    let mut changed = good.clone();
    changed[8..].copy_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    put_all(&mut kv, vec![put("/blotcdn/snap", changed)]).await;
    pointer_becomes(&mut kv, Some(&good), "changed").await;
    let del = blotcdn::etcdpb::DeleteRangeRequest { key: b"/blotcdn/snap".to_vec(), ..Default::default() };
    put_all(&mut kv, vec![RequestOp { request: Some(Request::RequestDeleteRange(del)) }]).await;
    pointer_becomes(&mut kv, Some(&good), "deleted").await;
    assert_eq!(get(a.http, "/healthz", &[]).status, 200);
    // A node starts on it, and knows what the first one does.
    let b = node(&etcd, &work.path().join("b"), &[]);
    let paths: Vec<String> = (0..640).step_by(97).map(|i| format!("/{i}.css")).collect();
    agreed(&[&a, &b], "snapped15", &paths).await;
    invalidate(&mut publisher(&b).await, "snapped", &["/b.css".into()]).await.unwrap();
}

/// A backup that holds every group a node applied, restored after etcd
/// moved on with other keys (here a large write's hold, put and let go):
/// the node's history still holds, but etcd is below the revision it had
/// seen, and a watch from there would miss the groups written in between.
/// The node reloads (as it would not for one member behind the others).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_does_not_miss_writes_after_a_restore_below_what_it_saw() {
    let mut etcd = EtcdCluster::start(1);
    let work = tempfile::tempdir().unwrap();
    let a = node(&etcd, &work.path().join("a"), &[]);
    invalidate(&mut publisher(&a).await, "below", &["/a.css".into()]).await.unwrap();
    let backup = back_up(&mut etcd, work.path());
    // Revisions A's watch sees pass, with no group.
    let mut kv = KvClient::connect(etcd.endpoint(0)).await.unwrap();
    for _ in 0..5 {
        put_all(&mut kv, vec![put("/blotcdn/hold", 7u64.to_be_bytes())]).await;
        let del = blotcdn::etcdpb::DeleteRangeRequest { key: b"/blotcdn/hold".to_vec(), ..Default::default() };
        put_all(&mut kv, vec![RequestOp { request: Some(Request::RequestDeleteRange(del)) }]).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    restore(&mut etcd, &backup);
    // B writes in the revisions A had seen before the restore.
    let b = node(&etcd, &work.path().join("b"), &[]);
    let mut p = publisher(&b).await;
    let paths: Vec<String> = (0..8).map(|i| format!("/{i}.css")).collect();
    for path in &paths {
        patiently(&mut p, "below", std::slice::from_ref(path)).await;
    }
    agreed(&[&a, &b], "below", &paths).await;
}
