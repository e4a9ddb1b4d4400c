//! ResolveBatch against Redis HMGET: the same URLs, batch sizes 1 to 256,
//! callers over two connections, and the server's CPU per 1,000 URLs.

use super::*;

pub async fn bench_resolve(o: &Opts, rows: &mut Vec<Row>) {
    println!("== ResolveBatch vs Redis HMGET ({CONC} concurrent callers over {CONNS} connections)");
    let dir = tempfile::tempdir().unwrap();
    let s = BlotServer::start(dir.path()).await;
    let ch = s.channel().await;
    const N: usize = 10_000;
    populate_paths(&ch, "bench", N).await;
    let chans: Vec<Channel> = {
        let mut v = Vec::new();
        for _ in 0..CONNS {
            v.push(s.channel().await);
        }
        v
    };
    let r = redis();
    {
        let mut c = BufReader::new(tokio::net::TcpStream::connect(("127.0.0.1", r.port)).await.unwrap());
        for chunk in (0..N).collect::<Vec<_>>().chunks(1000) {
            let mut args = vec!["HSET".to_string(), "manifest:bench".to_string()];
            for k in chunk {
                args.push(format!("/posts/{k}/image.jpg"));
                args.push(format!("http://127.0.0.1:8080/bench/1700000000000/posts/{k}/image.jpg"));
            }
            let refs: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
            c.get_mut().write_all(&resp_command(&refs)).await.unwrap();
            read_reply(&mut c).await;
        }
    }
    for batch in BATCHES {
        let dur = o.secs(3);
        let paths: Arc<Vec<Vec<String>>> = Arc::new(
            (0..CONC)
                .map(|w| (0..batch).map(|i| format!("/posts/{}/image.jpg", (w * 997 + i * 31) % N)).collect())
                .collect(),
        );
        let (chans2, p2) = (Arc::new(chans.clone()), paths.clone());
        let cpu0 = cpu_secs(s.proc.child.id());
        let (calls, mut lat, el) = load(CONC, dur, move |w| {
            let ch = chans2[w % CONNS].clone();
            let paths = p2[w].clone();
            async move {
                let mut c = pb::resolver_client::ResolverClient::new(ch);
                let r = c.resolve_batch(pb::ResolveBatchRequest { blog_id: "bench".into(), paths }).await.unwrap();
                assert_eq!(r.into_inner().assets.len(), batch);
            }
        })
        .await;
        let ours = calls as f64 * batch as f64 / el.as_secs_f64();
        // Server CPU per 1,000 URLs: what the server itself spends, whatever
        // the load generator (same process as the clients) costs.
        let our_cpu = (cpu_secs(s.proc.child.id()) - cpu0) * 1e6 / (calls as f64 * batch as f64 / 1000.0);
        let (p50, p99) = (lat.pct(0.5), lat.pct(0.99));

        // Redis: one connection per caller, one HMGET in flight on each. Like
        // the gRPC callers, each call builds its request from the paths.
        let conns = Arc::new(tokio::sync::Mutex::new(Vec::new()));
        for _ in 0..CONC {
            let c = tokio::net::TcpStream::connect(("127.0.0.1", r.port)).await.unwrap();
            c.set_nodelay(true).unwrap();
            conns.lock().await.push(Some(BufReader::new(c)));
        }
        let (conns2, p3) = (conns.clone(), paths.clone());
        let rcpu0 = cpu_secs(r.proc.child.id());
        let (rcalls, mut rlat, rel) = load(CONC, dur, move |w| {
            let conns = conns2.clone();
            let paths = p3[w].clone();
            async move {
                let mut args = vec!["HMGET", "manifest:bench"];
                args.extend(paths.iter().map(|s| s.as_str()));
                let cmd = resp_command(&args);
                let mut c = conns.lock().await[w].take().unwrap();
                c.get_mut().write_all(&cmd).await.unwrap();
                let n = read_reply(&mut c).await;
                assert_eq!(n, batch);
                conns.lock().await[w] = Some(c);
            }
        })
        .await;
        let peer = rcalls as f64 * batch as f64 / rel.as_secs_f64();
        let peer_cpu = (cpu_secs(r.proc.child.id()) - rcpu0) * 1e6 / (rcalls as f64 * batch as f64 / 1000.0);
        println!(
            "batch {batch:>3}: blotcdn {ours:>10.0} URLs/s p50 {} p99 {} cpu {our_cpu:.0} µs/1k | redis {peer:>10.0} fields/s p50 {} p99 {} cpu {peer_cpu:.0} µs/1k",
            ms(p50),
            ms(p99),
            ms(rlat.pct(0.5)),
            ms(rlat.pct(0.99))
        );
        rows.push(Row {
            bench: "ResolveBatch",
            what: format!("batch {batch}: URLs/s (p50 / p99); server CPU per 1k"),
            ours: format!("{ours:.0} ({} / {}); {our_cpu:.0} µs", ms(p50), ms(p99)),
            peer: format!("Redis HMGET {peer:.0} ({} / {}); {peer_cpu:.0} µs", ms(rlat.pct(0.5)), ms(rlat.pct(0.99))),
            ratio: ratio(ours, peer),
            target: if batch == 64 { "≥ 1× Redis".into() } else { "-".into() },
        });
    }
}
