//! PutAsset and ImportFile of 1 GiB against BLAKE3 in memory and a 1 GiB
//! write with its fsync.

use super::*;

pub async fn bench_ingest(o: &Opts, rows: &mut Vec<Row>) {
    let total: usize = if o.quick { 256 << 20 } else { 1 << 30 };
    let label = if o.quick { "256 MiB" } else { "1 GiB" };
    println!("== Ingest of {label}: PutAsset and ImportFile vs BLAKE3 and write+fsync");
    let dir = tempfile::tempdir_in(".").unwrap();
    // Peers first: hashing in memory, and the disk's own sequential write + fsync.
    let mut chunk = vec![0u8; 1 << 20];
    let mut rng = Rng(0x9e3779b97f4a7c15 ^ std::process::id() as u64);
    for w in chunk.chunks_mut(8) {
        w.copy_from_slice(&rng.next().to_le_bytes()[..w.len()]);
    }
    let t = Instant::now();
    let mut h = blake3::Hasher::new();
    for _ in 0..(total >> 20) {
        h.update(&chunk);
    }
    std::hint::black_box(h.finalize());
    let hash_rate = total as f64 / t.elapsed().as_secs_f64() / 1e6;
    let t = Instant::now();
    {
        let mut f = std::fs::File::create(dir.path().join("seq")).unwrap();
        for _ in 0..(total >> 20) {
            f.write_all(&chunk).unwrap();
        }
        f.sync_all().unwrap();
    }
    let disk_rate = total as f64 / t.elapsed().as_secs_f64() / 1e6;
    let _ = std::fs::remove_file(dir.path().join("seq"));

    let s = BlotServer::start(dir.path()).await;
    let ch = s.channel().await;
    // PutAsset: 1 MiB chunks, distinct from any earlier run (the seed varies).
    let n = total >> 20;
    let base = Bytes::from(chunk.clone());
    let stream = async_stream_chunks(base, n);
    let t = Instant::now();
    let mut c = pb::publisher_client::PublisherClient::new(ch.clone());
    let a = c.put_asset(stream).await.unwrap().into_inner();
    let put_rate = total as f64 / t.elapsed().as_secs_f64() / 1e6;
    assert_eq!(a.size as usize, total);

    // ImportFile: the file is in the blog's folder already (written and fsynced first).
    let blog_dir = dir.path().join("blogs/ing");
    std::fs::create_dir_all(&blog_dir).unwrap();
    {
        let mut f = std::fs::File::create(blog_dir.join("big.bin")).unwrap();
        for i in 0..n {
            chunk[0] = i as u8;
            chunk[1] = 0xAB;
            f.write_all(&chunk).unwrap();
        }
        f.sync_all().unwrap();
    }
    let t = Instant::now();
    let a = c
        .import_file(pb::ImportFileRequest { blog_id: "ing".into(), path: "/big.bin".into() })
        .await
        .unwrap()
        .into_inner();
    let import_rate = total as f64 / t.elapsed().as_secs_f64() / 1e6;
    assert_eq!(a.size as usize, total);
    println!(
        "PutAsset {put_rate:.0} MB/s, ImportFile {import_rate:.0} MB/s | BLAKE3 {hash_rate:.0} MB/s, write+fsync {disk_rate:.0} MB/s"
    );
    let peer = format!("BLAKE3 {hash_rate:.0} MB/s; disk write+fsync {disk_rate:.0} MB/s");
    for (what, v) in [("PutAsset", put_rate), ("ImportFile", import_rate)] {
        rows.push(Row {
            bench: "Ingest",
            what: format!("{what} of {label}: MB/s"),
            ours: format!("{v:.0}"),
            peer: peer.clone(),
            ratio: format!("{} of disk", ratio(v, disk_rate)),
            target: "≥ 1,000 MB/s or ≥ 0.8× disk".into(),
        });
    }
}

fn async_stream_chunks(base: Bytes, n: usize) -> impl tokio_stream::Stream<Item = pb::PutAssetChunk> {
    let header = pb::PutAssetChunk {
        chunk: Some(Chunk::Header(pb::PutAssetHeader {
            blog_id: "ing".into(),
            filename: "big.bin".into(),
            content_type: String::new(),
            path: String::new(),
        })),
    };
    let data = (0..n).map(move |i| {
        let mut c = base.to_vec();
        c[0] = i as u8;
        c[1] = (i >> 8) as u8;
        pb::PutAssetChunk { chunk: Some(Chunk::Data(Bytes::from(c))) }
    });
    tokio_stream::iter(std::iter::once(header).chain(data))
}
