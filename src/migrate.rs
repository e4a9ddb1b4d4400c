//! `blotcdn migrate`: copies the legacy S3 bucket into the static folder, so
//! that the bucket can go. Every object whose key is `{blog_id}/{path}` (a
//! valid blog id and blog path) lands at `{static_dir}/{blog_id}/{path}`.
//!
//! - Listing: `ListObjectsV2`, page by page, with `rusty-s3` building the
//!   (SigV4-presigned, when `AWS_*` credentials are set) URLs and parsing
//!   the answers; objects come with `GetObject`, over one hyper client.
//! - Each object streams to a temporary file in its final folder (through
//!   [`crate::blogfs::NewFile`]: the same confinement as every write into a
//!   blog's folder), is checked against the listed size and, where the ETag
//!   is one, its MD5, fsynced, and only then named. A present file of the
//!   listed size is skipped, so nothing is copied twice.
//! - Bounded: at most `concurrency` objects in flight, a few listed ahead,
//!   one buffer each; the listing is read a page at a time.
//! - Resumable: a checkpoint file in the data dir records the last key up to
//!   which everything is done (durably, each second). A run interrupted by
//!   `kill -9` or `Ctrl-C` lists again from there, and what was copied after
//!   it is skipped by its size. A run that ends with nothing failed removes
//!   the checkpoint.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use md5::Digest;
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};

use crate::blogfs::{BlogsDir, NewFile};
use crate::domain::{BlogId, BlogPath};

pub struct Options {
    /// `http://host:port/bucket` (path style) or `https://bucket.s3.amazonaws.com` (virtual host).
    pub bucket_url: String,
    pub prefix: Option<String>,
    pub dry_run: bool,
    pub concurrency: usize,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub copied: u64,
    pub skipped: u64,
    pub refused: u64,
    /// Of the refused: objects left in the bucket on purpose.
    pub left: u64,
    pub failed: u64,
    /// Bytes copied.
    pub bytes: u64,
    pub interrupted: bool,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "copied {}, skipped {}, refused {}, failed {}", self.copied, self.skipped, self.refused, self.failed)
    }
}

/// One listed object.
struct Listed {
    idx: u64,
    key: String,
    size: u64,
    etag: Option<String>,
}

enum Outcome {
    Copied(u64),
    Skipped,
    Refused(&'static str),
    /// Not copied, on purpose (counted with the refused): why.
    Left(String),
    Failed(String),
}

/// What fetching one object did.
enum Fetched {
    Copied(u64),
    /// A file of that name appeared meanwhile (kept).
    Present,
    /// Stored in this `Content-Encoding`: not copied.
    Encoded(String),
    /// With a `Content-Type` the name does not give, that a copy cannot
    /// keep as it was answered (why): not copied.
    UnkeptType(String),
}

/// A download that receives nothing for this long is given up (and retried).
const IDLE: Duration = Duration::from_secs(60);

type HttpClient = Client<crate::outbound::Https, Empty<Bytes>>;

struct Ctx {
    bucket: Bucket,
    creds: Option<Credentials>,
    client: HttpClient,
    statics: BlogsDir,
    dry_run: bool,
}

/// The bucket a URL names: a first path segment is a path-style bucket,
/// else the first label of the host is a virtual-host bucket.
pub fn parse_bucket(url: &str) -> anyhow::Result<Bucket> {
    let u = url::Url::parse(url).with_context(|| format!("--bucket-url {url:?} is not a URL"))?;
    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
        bail!("--bucket-url {url:?}: expected http(s)://host[:port]/bucket or https://bucket.host");
    }
    let region = ["AWS_REGION", "AWS_DEFAULT_REGION"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|r| !r.is_empty()))
        .unwrap_or_else(|| "us-east-1".into());
    let path = u.path().trim_matches('/').to_owned();
    let bucket = if !path.is_empty() {
        if path.contains('/') {
            bail!("--bucket-url {url:?}: the path must be just the bucket's name (use --prefix for the rest)");
        }
        let mut endpoint = u.clone();
        endpoint.set_path("/");
        Bucket::new(endpoint, UrlStyle::Path, path, region)
    } else {
        let host = u.host_str().unwrap_or_default();
        let Some((name, rest)) = host.split_once('.') else {
            bail!("--bucket-url {url:?}: no bucket in the path or the host name");
        };
        let mut endpoint = u.clone();
        endpoint.set_host(Some(rest)).map_err(|e| anyhow!("--bucket-url {url:?}: {e}"))?;
        Bucket::new(endpoint, UrlStyle::VirtualHost, name.to_owned(), region)
    };
    bucket.map_err(|e| anyhow!("--bucket-url {url:?}: {e}"))
}

/// `{blog_id}/{path}` as a blog id and a blog path the origin would serve.
fn parse_key(key: &str) -> Result<(BlogId, BlogPath), &'static str> {
    let (blog, path) = key.split_once('/').ok_or("no {blog_id}/ prefix")?;
    let blog = BlogId::parse(blog).map_err(|_| "not a blog id")?;
    let path = BlogPath::parse(&format!("/{path}")).map_err(|_| "not a valid blog path")?;
    if path.is_hidden() {
        return Err("a hidden file");
    }
    Ok((blog, path))
}

fn client() -> HttpClient {
    crate::outbound::client(Duration::from_secs(10), 256)
}

async fn get(client: &HttpClient, url: &url::Url) -> anyhow::Result<hyper::Response<hyper::body::Incoming>> {
    let uri: http::Uri = url.as_str().parse().context("a signed URL")?;
    let req = http::Request::get(uri).body(Empty::new()).expect("a GET builds");
    let resp = tokio::time::timeout(Duration::from_secs(60), client.request(req))
        .await
        .map_err(|_| anyhow!("no answer within 60 s"))?
        .map_err(|e| anyhow!("{e}: {}", std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_default()))?;
    if !resp.status().is_success() {
        let status = resp.status();
        // Its first bytes say what went wrong; an error page that never
        // ends is not waited for, nor kept.
        let read = crate::outbound::body_prefix(resp.into_body(), 300);
        let body =
            tokio::time::timeout(Duration::from_secs(10), read).await.ok().and_then(Result::ok).unwrap_or_default();
        let text = String::from_utf8_lossy(&body).trim().to_owned();
        bail!("{status} {text}");
    }
    Ok(resp)
}

/// The most a listing page may hold: 1,000 keys of up to 1,024 bytes with
/// their metadata come to about 2 MB.
const LISTING_MAX: usize = 16 << 20;
/// Pages in a row with no key that name a next page: past this, the
/// listing is taken for broken (one that did so for ever kept a run going,
/// silent, for as long as it was left).
const EMPTY_PAGES_MAX: u32 = 100;

/// One page of the listing, tried three times.
async fn list_page(
    ctx: &Ctx,
    prefix: Option<&str>,
    start_after: Option<&str>,
    token: Option<&str>,
) -> anyhow::Result<rusty_s3::actions::ListObjectsV2Response> {
    let mut last = None;
    for attempt in 0..3u32 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
        }
        let mut a = ctx.bucket.list_objects_v2(ctx.creds.as_ref());
        a.with_max_keys(1000);
        if let Some(p) = prefix {
            a.with_prefix(p);
        }
        match (token, start_after) {
            (Some(t), _) => a.with_continuation_token(t),
            (None, Some(s)) => a.with_start_after(s),
            _ => {}
        }
        let url = a.sign(Duration::from_secs(3600));
        let body = match get(&ctx.client, &url).await {
            // A page of 1,000 keys is a few MB at most: a longer one is not
            // a listing, and is not read into memory.
            Ok(r) => {
                match tokio::time::timeout(Duration::from_secs(120), Limited::new(r.into_body(), LISTING_MAX).collect())
                    .await
                {
                    Ok(b) => b.map(|b| b.to_bytes()).map_err(|e| {
                        anyhow!("the listing page could not be read whole (at most {LISTING_MAX} bytes): {e}")
                    }),
                    Err(_) => Err(anyhow!("the listing did not arrive within 120 s")),
                }
            }
            Err(e) => Err(e),
        };
        match body.and_then(|b| {
            let text = std::str::from_utf8(&b).context("the listing is not UTF-8")?;
            rusty_s3::actions::ListObjectsV2::parse_response(text).map_err(|e| anyhow!("unreadable listing: {e}"))
        }) {
            Ok(page) => return Ok(page),
            Err(e) => last = Some(e),
        }
    }
    Err(last.expect("three attempts").context("ListObjectsV2 failed three times"))
}

/// `s` with its control characters escaped (`\u{1b}`), for a terminal; and
/// those that reorder or break lines (bidirectional overrides, U+2028).
fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    let hidden = |c: char| {
        c.is_control()
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{2028}' | '\u{2029}')
    };
    if !s.chars().any(hidden) {
        return s.into();
    }
    s.chars().map(|c| if hidden(c) { c.escape_default().to_string() } else { c.to_string() }).collect()
}

/// An ETag that is the object's MD5 (not a multipart one, `…-N`).
fn md5_etag(etag: Option<&str>) -> Option<[u8; 16]> {
    let e = etag?.trim_matches('"');
    if e.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(e.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// What is at `dest` already: nothing (`None`), the object (a file of its
/// size: skipped), or something else, which is not overwritten nor passed
/// over in silence: the run fails on it (and resumes from before it) until
/// someone decides.
fn already_there(dest: &Path, size: u64) -> Option<Outcome> {
    let m = std::fs::symlink_metadata(dest).ok()?;
    if m.is_file() && m.len() == size {
        return Some(Outcome::Skipped);
    }
    let what = if m.is_file() { format!("a file of {} bytes", m.len()) } else { "something that is not a file".into() };
    Some(Outcome::Failed(format!("{} is already {what}; the bucket's object is {size} bytes", dest.display())))
}

async fn copy_one(ctx: &Ctx, item: &Listed) -> Outcome {
    let (blog, path) = match parse_key(&item.key) {
        Ok(x) => x,
        Err(why) => return Outcome::Refused(why),
    };
    let dest = ctx.statics.file_path(blog.as_str(), &path);
    if let Some(there) = already_there(&dest, item.size) {
        return there;
    }
    if ctx.dry_run {
        return Outcome::Copied(item.size);
    }
    let mut last = String::new();
    for attempt in 0..3u32 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(250 << attempt)).await;
        }
        match fetch(ctx, item, &blog, &path).await {
            Ok(Fetched::Copied(n)) => return Outcome::Copied(n),
            // The name was taken while the object came: by the same object (a
            // backfill), or by something else (the folder of a key below it,
            // `b/dir/x.css` beside `b/dir`), which must fail, as above.
            Ok(Fetched::Present) => {
                return already_there(&dest, item.size).unwrap_or_else(|| {
                    Outcome::Failed(format!("{} was taken while the object was copied, then went", dest.display()))
                })
            }
            Ok(Fetched::Encoded(enc)) => {
                return Outcome::Left(format!(
                "stored with Content-Encoding {enc}: left in the bucket, which the fallback answers with it as it is \
                     (its bytes are not the file, and the static folder's files are answered as they are)"
            ))
            }
            Ok(Fetched::UnkeptType(why)) => {
                return Outcome::Left(format!(
                    "its Content-Type {}: left in the bucket, which the fallback answers with it",
                    printable(&why)
                ))
            }
            Err(e) => last = format!("{e:#}"),
        }
    }
    Outcome::Failed(last)
}

/// Streams one object into its temporary file, checks it, names it, with
/// the `Content-Type` the bucket gave it where its name says another.
async fn fetch(ctx: &Ctx, item: &Listed, blog: &BlogId, path: &BlogPath) -> anyhow::Result<Fetched> {
    let url = ctx.bucket.get_object(ctx.creds.as_ref(), &item.key).sign(Duration::from_secs(3600));
    let resp = get(&ctx.client, &url).await?;
    let h = resp.headers();
    // Copied, an object stored gzipped would be answered as its compressed
    // bytes, as the file itself.
    if let Some(enc) = h.get(http::header::CONTENT_ENCODING).filter(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"))
    {
        return Ok(Fetched::Encoded(printable(&String::from_utf8_lossy(enc.as_bytes())).into_owned()));
    }
    let keep_type = match h.get(http::header::CONTENT_TYPE).map(|t| crate::origin::type_to_keep(t, path.file_name())) {
        Some(Err(why)) => return Ok(Fetched::UnkeptType(why)),
        Some(Ok(t)) => t,
        None => None,
    };
    // With SSE-KMS or SSE-C, the ETag is not the MD5 of the bytes.
    let encrypted = h.get("x-amz-server-side-encryption").is_some_and(|v| v.as_bytes().starts_with(b"aws:kms"))
        || h.contains_key("x-amz-server-side-encryption-customer-algorithm");
    let (root, b, rel) = (ctx.statics.root().to_owned(), blog.to_string(), PathBuf::from(&path.as_str()[1..]));
    let mut file = tokio::task::spawn_blocking(move || NewFile::start(&root, &b, &rel))
        .await?
        .context("cannot write into the static folder")?;
    if let Some(t) = &keep_type {
        file.keep_type(t).with_context(|| {
            format!("cannot keep its Content-Type {t:?} (the static folder's filesystem must keep user extended attributes)")
        })?;
    }
    let want_md5 = if encrypted { None } else { md5_etag(item.etag.as_deref()) };
    let mut md5 = want_md5.map(|_| md5::Md5::new());
    let mut body = resp.into_body();
    let mut n = 0u64;
    // A server that stops sending must not hold a worker (and the resume
    // point) forever.
    while let Some(frame) = tokio::time::timeout(IDLE, body.frame())
        .await
        .map_err(|_| anyhow!("nothing received for {} s", IDLE.as_secs()))?
    {
        let frame = frame.map_err(|e| anyhow!("the object broke off: {e}"))?;
        let Ok(data) = frame.into_data() else { continue };
        n += data.len() as u64;
        if n > item.size {
            bail!("more bytes than the listed size ({})", item.size);
        }
        if let Some(h) = md5.as_mut() {
            h.update(&data);
        }
        // A write to the page cache: short. The fsync is off this thread.
        file.write_all(&data).context("cannot write into the static folder")?;
    }
    if n != item.size {
        bail!("got {n} bytes, the listing said {}", item.size);
    }
    if let (Some(h), Some(want)) = (md5, want_md5) {
        if h.finalize()[..] != want[..] {
            bail!("the bytes do not match the ETag's MD5");
        }
    }
    let named = tokio::task::spawn_blocking(move || file.finish()).await?.context("cannot name the copy")?;
    Ok(if named { Fetched::Copied(n) } else { Fetched::Present })
}

/// The resume point of one bucket and prefix, in the data dir: named by
/// the bucket as parsed, so that every spelling of its URL (`HTTP://`, a
/// trailing `/`, `:80`) has the same one, and the same lock.
fn checkpoint_path(state_dir: &Path, bucket: &Bucket, prefix: Option<&str>) -> PathBuf {
    let id = blake3::hash(format!("{}\n{}\n{}", bucket.base_url(), bucket.name(), prefix.unwrap_or("")).as_bytes());
    state_dir.join(format!("migrate-{}.checkpoint", &id.to_hex()[..16]))
}

/// The lock of the run whose resume point is `checkpoint`: a file beside it,
/// under `flock` (see `dirlock`), or an error naming the run that holds it.
fn lock_run(checkpoint: &Path) -> anyhow::Result<std::fs::File> {
    let path = checkpoint.with_extension("lock");
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    match crate::dirlock::lock(&path).with_context(|| format!("cannot lock {}", path.display()))? {
        Ok(f) => Ok(f),
        Err(pid) => bail!(
            "another migrate of this bucket and prefix is running: {} holds {}; wait for it, or stop it \
             (a stopped run resumes where it was)",
            crate::dirlock::holder_name(pid),
            path.display()
        ),
    }
}

fn write_checkpoint(path: &Path, key: &str) -> std::io::Result<()> {
    crate::durable::write_file(path, key.as_bytes())
}

/// What the screen shows: a progress bar on a terminal, else a line every 5 s.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    last_line: Instant,
    started: Instant,
}

impl Progress {
    fn new() -> Progress {
        // A bar (on stderr) for a person at a terminal; lines for logs.
        let bar = (std::io::stdout().is_terminal() && std::io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:30} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}",
                )
                .expect("a valid template"),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Progress { bar, last_line: Instant::now(), started: Instant::now() }
    }

    fn listed(&self, bytes: u64) {
        if let Some(b) = &self.bar {
            b.inc_length(bytes);
        }
    }

    fn update(&mut self, s: &Summary, done_bytes: u64, listed: u64, listed_bytes: u64) {
        let done = s.copied + s.skipped + s.refused + s.failed;
        let msg = format!("{done}/{listed} objects; {s}");
        match &self.bar {
            Some(b) => {
                b.set_position(done_bytes);
                b.set_message(msg);
            }
            None if self.last_line.elapsed() >= Duration::from_secs(5) => {
                self.last_line = Instant::now();
                let secs = self.started.elapsed().as_secs_f64().max(0.001);
                let rate = done_bytes as f64 / secs;
                let eta = if rate > 0.0 { (listed_bytes.saturating_sub(done_bytes)) as f64 / rate } else { 0.0 };
                println!(
                    "migrate: {msg}; {:.1} of {:.1} MB listed, {:.1} MB/s, ETA {:.0} s (listing goes on)",
                    done_bytes as f64 / 1e6,
                    listed_bytes as f64 / 1e6,
                    rate / 1e6,
                    eta
                );
            }
            None => {}
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// Runs the migration into `static_dir`, keeping its resume point in
/// `state_dir`. Ends early (`interrupted`) on Ctrl-C.
pub async fn run(static_dir: &Path, state_dir: &Path, o: Options) -> anyhow::Result<Summary> {
    let bucket = parse_bucket(&o.bucket_url)?;
    let checkpoint = checkpoint_path(state_dir, &bucket, o.prefix.as_deref());
    // One run at a time of a bucket and prefix: two would copy every object
    // twice and write over each other's resume point. Held until this
    // returns, or the process ends however it ends.
    let _lock = lock_run(&checkpoint)?;
    let statics = BlogsDir::new(static_dir).with_context(|| format!("cannot open {}", static_dir.display()))?;
    // Copies a killed run left half-written.
    NewFile::sweep(statics.root()).context("cannot clear the static folder's temporary files")?;
    let ctx = Arc::new(Ctx { bucket, creds: Credentials::from_env(), client: client(), statics, dry_run: o.dry_run });
    let resume = match std::fs::read_to_string(&checkpoint) {
        Ok(k) if !o.dry_run && !k.is_empty() => Some(k),
        _ => None,
    };
    if let Some(k) = &resume {
        println!("resuming after {k:?} ({})", checkpoint.display());
    }
    let concurrency = o.concurrency.max(1);
    let (work_tx, work_rx) = tokio::sync::mpsc::channel::<Listed>(concurrency * 4);
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<(u64, String, u64, Outcome)>(concurrency * 4);
    let (listed_tx, mut listed_rx) = tokio::sync::mpsc::unbounded_channel::<(u64, u64)>();

    // The lister: pages in order, each object numbered.
    let lister = {
        let ctx = ctx.clone();
        let prefix = o.prefix.clone();
        tokio::spawn(async move {
            let mut token: Option<String> = None;
            let mut idx = 0u64;
            // A listing is in key order: a key that is not after the last
            // one, or a page that hands back its own token, would have the
            // run go round for ever.
            let mut last = resume.clone();
            // Pages in a row that held no key but named a next one.
            let mut empty = 0u32;
            loop {
                let page = list_page(&ctx, prefix.as_deref(), resume.as_deref(), token.as_deref()).await?;
                let mut bytes = 0;
                empty = if page.contents.is_empty() { empty + 1 } else { 0 };
                if empty >= EMPTY_PAGES_MAX && page.next_continuation_token.is_some() {
                    bail!(
                        "the bucket's listing is broken: {EMPTY_PAGES_MAX} pages in a row held no key and named \
                         another page; stopping"
                    );
                }
                for c in page.contents {
                    if let Some(l) = last.as_deref().filter(|l| c.key.as_str() <= *l) {
                        bail!(
                            "the bucket's listing is broken: {:?} came after {l:?}, not in key order; stopping",
                            c.key
                        );
                    }
                    // Copied under the blog its key names: one outside the
                    // prefix asked for would land in another blog's folder.
                    if let Some(p) = prefix.as_deref().filter(|p| !c.key.starts_with(*p)) {
                        bail!(
                            "the bucket's listing is broken: it lists {:?}, outside the prefix {p:?}; stopping",
                            c.key
                        );
                    }
                    last = Some(c.key.clone());
                    let size = c.size.unwrap_or(0);
                    bytes += size;
                    let item = Listed { idx, key: c.key, size, etag: c.etag };
                    idx += 1;
                    if work_tx.send(item).await.is_err() {
                        return Ok(());
                    }
                }
                let _ = listed_tx.send((idx, bytes));
                match page.next_continuation_token {
                    Some(t) if token.as_deref() == Some(t.as_str()) => {
                        bail!("the bucket's listing is broken: it gave the same continuation token twice; stopping")
                    }
                    Some(t) => token = Some(t),
                    None => return Ok::<(), anyhow::Error>(()),
                }
            }
        })
    };
    // The workers.
    let work_rx = Arc::new(tokio::sync::Mutex::new(work_rx));
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (ctx, rx, tx) = (ctx.clone(), work_rx.clone(), done_tx.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let item = { rx.lock().await.recv().await };
                let Some(item) = item else { return };
                let outcome = copy_one(&ctx, &item).await;
                if tx.send((item.idx, item.key, item.size, outcome)).await.is_err() {
                    return;
                }
            }
        }));
    }
    drop(done_tx);

    let mut s = Summary::default();
    let mut progress = Progress::new();
    let (mut listed, mut listed_bytes, mut done_bytes) = (0u64, 0u64, 0u64);
    // The watermark: every object below `next` is done; the first failure stops it.
    let mut next = 0u64;
    let mut finished: BTreeMap<u64, (String, bool)> = BTreeMap::new();
    let mut mark: Option<String> = None;
    let mut blocked = false;
    let mut saved = Instant::now();
    let interrupt = tokio::signal::ctrl_c();
    tokio::pin!(interrupt);
    loop {
        tokio::select! {
            Some((idx, bytes)) = listed_rx.recv() => {
                listed = idx;
                listed_bytes += bytes;
                progress.listed(bytes);
            }
            got = done_rx.recv() => {
                let Some((idx, key, size, outcome)) = got else { break };
                let ok = !matches!(outcome, Outcome::Failed(_));
                match outcome {
                    Outcome::Copied(n) => { s.copied += 1; s.bytes += n; }
                    Outcome::Skipped => s.skipped += 1,
                    Outcome::Refused(why) => {
                        s.refused += 1;
                        tracing::warn!(key = ?key, why, "refused: not {{blog_id}}/{{path}}");
                    }
                    Outcome::Left(why) => {
                        s.refused += 1;
                        s.left += 1;
                        eprintln!("left: {}: {why}", printable(&key));
                    }
                    Outcome::Failed(e) => {
                        s.failed += 1;
                        // Keys are the bucket's: one holding control
                        // characters must not drive the terminal.
                        eprintln!("failed: {}: {}", printable(&key), printable(&e));
                    }
                }
                done_bytes += size;
                finished.insert(idx, (key, ok));
                while let Some((k, ok)) = finished.remove(&next) {
                    blocked |= !ok;
                    if !blocked {
                        mark = Some(k);
                    }
                    next += 1;
                }
                if !o.dry_run && saved.elapsed() >= Duration::from_secs(1) {
                    if let Some(k) = &mark {
                        write_checkpoint(&checkpoint, k).context("cannot save the resume point")?;
                    }
                    saved = Instant::now();
                }
                progress.update(&s, done_bytes, listed.max(next), listed_bytes);
            }
            _ = &mut interrupt => {
                s.interrupted = true;
                break;
            }
        }
    }
    progress.finish();
    lister.abort();
    for w in &workers {
        w.abort();
    }
    if s.interrupted {
        // Wait for the aborted workers: their temporary files are removed as they go.
        for w in workers {
            let _ = w.await;
        }
    } else {
        match lister.await {
            Ok(Err(e)) => return Err(e),
            Err(e) if !e.is_cancelled() => return Err(anyhow!("the lister failed: {e}")),
            _ => {}
        }
    }
    if !o.dry_run {
        if !s.interrupted && s.failed == 0 {
            let _ = std::fs::remove_file(&checkpoint);
        } else if let Some(k) = &mark {
            write_checkpoint(&checkpoint, k).context("cannot save the resume point")?;
        }
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_with_control_characters_are_printed_escaped() {
        assert_eq!(printable("b1/plain name.png"), "b1/plain name.png");
        assert_eq!(printable("b1/\u{1b}[2Jx\n.png"), "b1/\\u{1b}[2Jx\\n.png");
        assert_eq!(printable("b1/\u{202e}gnp.exe"), "b1/\\u{202e}gnp.exe");
    }

    #[test]
    fn keys_map_to_blog_paths_or_are_refused() {
        assert!(parse_key("blog1/avatars/a b/ü.png").is_ok());
        for bad in ["noslash", "bad id!/x.png", "blog/../x", "blog/a//b", "blog/.hidden", "blog/", "blog/a/./b"] {
            assert!(parse_key(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bucket_urls_in_both_styles() {
        let b = parse_bucket("http://127.0.0.1:5000/legacy").unwrap();
        assert_eq!(b.object_url("blog/a.png").as_str(), "http://127.0.0.1:5000/legacy/blog/a.png");
        let b = parse_bucket("https://blot-legacy.s3.amazonaws.com").unwrap();
        assert_eq!(b.object_url("blog/a.png").as_str(), "https://blot-legacy.s3.amazonaws.com/blog/a.png");
        assert!(parse_bucket("ftp://x/y").is_err());
        assert!(parse_bucket("http://127.0.0.1:5000/a/b").is_err());
    }

    #[test]
    fn only_plain_md5_etags_are_checked() {
        assert!(md5_etag(Some("\"9e107d9d372bb6826bd81d3542a419d6\"")).is_some());
        assert!(md5_etag(Some("\"9e107d9d372bb6826bd81d3542a419d6-3\"")).is_none());
        assert!(md5_etag(None).is_none());
    }
}
