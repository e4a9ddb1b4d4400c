//! The command line: `serve`, and client commands for people (they talk to a
//! running server over gRPC, with the generated client), plus the offline
//! `fsck`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use crate::config::{Config, Partial};
use crate::proto as pb;

#[derive(Parser, Debug)]
#[command(name = "blotcdn", version, about = "The source of truth behind Blot's CDN")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Start the service (gRPC and the HTTP origin).
    Serve {
        #[command(flatten)]
        args: ServeArgs,
        /// Once the listeners are bound, write `{"grpc":"ADDR","http":"ADDR","metrics":"ADDR"}` to this file
        /// (atomically): how a supervisor or a test learns the ports chosen for `127.0.0.1:0`.
        #[arg(long)]
        addr_file: Option<PathBuf>,
    },
    /// Resolve paths of a blog to CDN URLs.
    Resolve {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        blog: String,
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// Invalidate a whole blog (no paths) or some of its paths.
    Invalidate {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        blog: String,
        paths: Vec<String>,
    },
    /// Map custom domains to blogs.
    Domain {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        action: DomainAction,
    },
    /// Look at a blog.
    Blog {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        action: BlogAction,
    },
    /// Upload a file as a permanent asset.
    Put {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        blog: String,
        file: PathBuf,
        /// Bind this blog path to the asset.
        #[arg(long)]
        path: Option<String>,
        #[arg(long)]
        content_type: Option<String>,
    },
    /// Make files already in the blog's folder permanent assets.
    Import {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        blog: String,
        /// A blog path, like /templates/foo/style.css.
        #[arg(required_unless_present = "dir", conflicts_with = "dir")]
        path: Option<String>,
        /// Import every file under this folder of the blog (blog path, like /templates/foo).
        #[arg(long)]
        dir: Option<String>,
        /// The blogs directory, to list `--dir` (default: from the config).
        #[arg(long, env = "BLOTCDN_BLOGS_DIR")]
        blogs_dir: Option<PathBuf>,
    },
    /// Delete a blog: its versions, bindings, references and domains.
    DeleteBlog {
        #[command(flatten)]
        conn: Conn,
        blog: String,
    },
    /// Take down one permanent asset of a blog: its URL answers 404 and is purged at the edges.
    DeleteAsset {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        blog: String,
        /// The content hash (32 hex characters), as in the asset's URL.
        hash: String,
    },
    /// Purge keys at every edge target (none: the blog id).
    Purge {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        blog: String,
        /// The blog id, or `{blog_id}/{rest}` (a permanent asset's key is `{blog_id}/{hash}`).
        keys: Vec<String>,
    },
    /// Each edge target's purge queue: keys waiting, the oldest, the last error, keys sent.
    Purges {
        #[command(flatten)]
        conn: Conn,
    },
    /// Copy the legacy S3 bucket's `{blog_id}/{path}` objects into the static folder: verified,
    /// atomic, resumable (a checkpoint in the data dir), skipping what is there already.
    Migrate {
        #[command(flatten)]
        serve: ServeArgs,
        /// `http://host:port/bucket` (path style) or `https://bucket.s3.amazonaws.com`; credentials
        /// from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (none: unsigned), region from AWS_REGION.
        #[arg(long)]
        bucket_url: String,
        /// Only keys starting with this.
        #[arg(long)]
        prefix: Option<String>,
        /// List and count what would be copied; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Objects copied at once.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
    },
    /// Re-hash the CAS (server stopped): report corrupt blobs and missing ones.
    Fsck {
        #[command(flatten)]
        serve: ServeArgs,
        /// Move corrupt blobs to {data_dir}/cas/quarantine.
        #[arg(long)]
        quarantine: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum DomainAction {
    Set { domain: String, blog: String },
    Rm { domain: String },
    Get { domain: String },
}

#[derive(Subcommand, Debug)]
pub enum BlogAction {
    Get { blog: String },
}

#[derive(Args, Debug, Clone)]
pub struct Conn {
    /// The server's gRPC address.
    #[arg(long, env = "BLOTCDN_SERVER", default_value = "http://127.0.0.1:50051")]
    pub server: String,
    /// Bearer token for the service called.
    #[arg(long, env = "BLOTCDN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

#[derive(Args, Debug, Clone, Default)]
pub struct ServeArgs {
    /// A TOML config file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[arg(long)]
    pub blogs_dir: Option<PathBuf>,
    /// Where the platform's own files per blog live (thumbnails, avatars), and legacy-bucket copies land.
    #[arg(long)]
    pub static_dir: Option<PathBuf>,
    #[arg(long)]
    pub grpc_addr: Option<String>,
    #[arg(long)]
    pub http_addr: Option<String>,
    #[arg(long)]
    pub metrics_addr: Option<String>,
    #[arg(long)]
    pub cdn_base_url: Option<String>,
}

impl Cli {
    /// Where `serve` exports traces, from its configuration (the other
    /// commands export none). A configuration error surfaces when `serve`
    /// loads it again.
    pub fn otlp_endpoint(&self) -> Option<String> {
        match &self.command {
            Command::Serve { args, .. } => args.load().ok()?.otlp_endpoint,
            _ => None,
        }
    }
}

impl ServeArgs {
    pub fn load(&self) -> anyhow::Result<Config> {
        // A variable of ours that is not UTF-8 is an error naming it, not a value left unread.
        if let Some((k, _)) = std::env::vars_os().find(|(k, v)| {
            k.to_str().is_some_and(|k| k.starts_with("BLOTCDN_") || k == "OTEL_EXPORTER_OTLP_ENDPOINT")
                && v.to_str().is_none()
        }) {
            anyhow::bail!("config: invalid {}: its value is not UTF-8", k.to_string_lossy());
        }
        let env = Partial::from_env(|k| std::env::var(k).ok())?;
        let flags = Partial {
            data_dir: self.data_dir.clone(),
            blogs_dir: self.blogs_dir.clone(),
            static_dir: self.static_dir.clone(),
            grpc_addr: self.grpc_addr.clone(),
            http_addr: self.http_addr.clone(),
            metrics_addr: self.metrics_addr.clone(),
            cdn_base_url: self.cdn_base_url.clone(),
            ..Default::default()
        };
        Ok(Config::load(self.config.as_deref(), env, flags)?)
    }
}

type Authed = tonic::service::interceptor::InterceptedService<Channel, Bearer>;

#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

impl Conn {
    async fn channel(&self) -> anyhow::Result<(Channel, Bearer)> {
        self.channel_with(true).await
    }

    /// `pings`: off for an upload, whose pings wait behind its bytes, so that a
    /// slow link would have them answered late and the upload cut (a hostile
    /// test's 3 MB over 40 KB/s); `put` watches its progress instead.
    async fn channel_with(&self, pings: bool) -> anyhow::Result<(Channel, Bearer)> {
        // A server that takes the connection and never answers (stopped with
        // SIGSTOP, a black hole in the network) fails the command within about
        // half a minute, where it waited for ever: an unanswered ping ends the
        // connection. No deadline on the call itself, which may be a long upload.
        let mut endpoint = Channel::from_shared(self.server.clone())
            .with_context(|| format!("invalid --server {:?}", self.server))?
            .connect_timeout(Duration::from_secs(10));
        if pings {
            endpoint = endpoint
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(20))
                .keep_alive_while_idle(true);
        }
        let ch = endpoint.connect().await.with_context(|| format!("cannot connect to {}", self.server))?;
        let bearer = match &self.token {
            Some(t) => Some(format!("Bearer {t}").parse().context("--token must be printable ASCII")?),
            None => None,
        };
        Ok((ch, Bearer(bearer)))
    }
    async fn resolver(&self) -> anyhow::Result<pb::resolver_client::ResolverClient<Authed>> {
        let (ch, b) = self.channel().await?;
        Ok(pb::resolver_client::ResolverClient::with_interceptor(ch, b))
    }
    async fn uploader(&self) -> anyhow::Result<pb::publisher_client::PublisherClient<Authed>> {
        let (ch, b) = self.channel_with(false).await?;
        Ok(pb::publisher_client::PublisherClient::with_interceptor(ch, b))
    }

    async fn publisher(&self) -> anyhow::Result<pb::publisher_client::PublisherClient<Authed>> {
        let (ch, b) = self.channel().await?;
        Ok(pb::publisher_client::PublisherClient::with_interceptor(ch, b))
    }
}

fn status_err(s: tonic::Status) -> anyhow::Error {
    // A failure of the connection says why below tonic's words ("http2
    // error": a ping unanswered, the connection reset).
    let mut msg = format!("{:?}: {}", s.code(), s.message());
    let mut src = std::error::Error::source(&s);
    while let Some(e) = src {
        let e_text = e.to_string();
        if !msg.ends_with(&e_text) {
            msg = format!("{msg}: {e_text}");
        }
        src = e.source();
    }
    anyhow::anyhow!(msg)
}

/// A refusal every call to this server would get (no token or the wrong
/// one, the server gone): a folder's import stops at it instead of trying
/// each file in turn.
fn fails_every_call(s: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(s.code(), Code::Unauthenticated | Code::PermissionDenied | Code::Unavailable | Code::Unimplemented)
        || failed_in_transport(s)
}

/// A call that failed in the connection rather than in the server: among
/// them, one the channel never sent because the server was sending the
/// connection away (`grpc_max_connection_age_secs`; hyper issue 2500). An
/// idempotent call (`ImportFile`) is worth one more try.
fn failed_in_transport(s: &tonic::Status) -> bool {
    std::error::Error::source(s).is_some_and(|e| e.is::<tonic::transport::Error>())
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve { args, addr_file } => {
            let config = args.load()?;
            let app = crate::app::App::build(config).await?;
            if let Some(f) = addr_file {
                let body = format!(
                    "{{\"grpc\":\"{}\",\"http\":\"{}\",\"metrics\":\"{}\"}}\n",
                    app.grpc_addr(),
                    app.http_addr(),
                    app.metrics_addr()
                );
                let tmp = f.with_extension("tmp");
                std::fs::write(&tmp, body).with_context(|| format!("cannot write --addr-file {}", tmp.display()))?;
                std::fs::rename(&tmp, &f).with_context(|| format!("cannot write --addr-file {}", f.display()))?;
            }
            app.run_until_stopped(crate::app::shutdown_signal()).await?;
        }
        Command::Resolve { conn, blog, paths } => {
            let mut c = conn.resolver().await?;
            let r = c
                .resolve_batch(pb::ResolveBatchRequest { blog_id: blog, paths: paths.clone() })
                .await
                .map_err(status_err)?
                .into_inner();
            for (p, a) in paths.iter().zip(r.assets) {
                match pb::ResolveStatus::try_from(a.status) {
                    Ok(pb::ResolveStatus::Ok) => println!("{p}\t{}", a.url),
                    Ok(s) => println!("{p}\t{}", s.as_str_name()),
                    Err(_) => println!("{p}\tstatus {}", a.status),
                }
            }
        }
        Command::Invalidate { conn, blog, paths } => {
            let mut c = conn.publisher().await?;
            let r = c.invalidate(pb::InvalidateRequest { blog_id: blog, paths }).await.map_err(status_err)?;
            println!("cache_id {}", r.into_inner().cache_id);
        }
        Command::Domain { conn, action } => match action {
            DomainAction::Set { domain, blog } => {
                let mut c = conn.publisher().await?;
                c.set_domain(pb::SetDomainRequest { domain: domain.clone(), blog_id: blog.clone() })
                    .await
                    .map_err(status_err)?;
                println!("{domain} -> {blog}");
            }
            DomainAction::Rm { domain } => {
                let mut c = conn.publisher().await?;
                c.remove_domain(pb::RemoveDomainRequest { domain: domain.clone() }).await.map_err(status_err)?;
                println!("removed {domain}");
            }
            DomainAction::Get { domain } => {
                let mut c = conn.resolver().await?;
                let r = c.lookup_domain(pb::LookupDomainRequest { domain }).await.map_err(status_err)?;
                println!("{}", r.into_inner().blog_id);
            }
        },
        Command::Blog { conn, action: BlogAction::Get { blog } } => {
            let mut c = conn.resolver().await?;
            let b = c.get_blog(pb::GetBlogRequest { blog_id: blog }).await.map_err(status_err)?.into_inner();
            println!("blog_id     {}", b.blog_id);
            println!("cache_id    {}", b.cache_id);
            println!("domains     {}", b.domains.join(" "));
            println!("path_count  {}", b.path_count);
            println!("asset_count {}", b.asset_count);
        }
        Command::Put { conn, blog, file, path, content_type } => {
            let mut c = conn.uploader().await?;
            let filename = file.file_name().and_then(|n| n.to_str()).context("the file needs a UTF-8 name")?.to_owned();
            let f = tokio::fs::File::open(&file).await.with_context(|| format!("cannot open {}", file.display()))?;
            let header = pb::PutAssetChunk {
                chunk: Some(pb::put_asset_chunk::Chunk::Header(pb::PutAssetHeader {
                    blog_id: blog,
                    filename,
                    content_type: content_type.unwrap_or_default(),
                    path: path.unwrap_or_default(),
                })),
            };
            let data = tokio_util::io::ReaderStream::with_capacity(f, 1 << 20);
            use futures_util::StreamExt;
            // A read error must not end the stream (the server would take
            // that as the whole file): the stream stalls, and the call is
            // dropped below, which cancels the upload.
            let (err_tx, mut err_rx) = tokio::sync::oneshot::channel::<std::io::Error>();
            // When the call last took a piece (or the stream ended): a server that takes
            // none for STALLED (stopped, or gone without a word) cancels the upload.
            let progress = std::sync::Arc::new(std::sync::Mutex::new(tokio::time::Instant::now()));
            let took = progress.clone();
            let data = futures_util::stream::unfold((data, Some(err_tx)), move |(mut data, mut err_tx)| {
                let took = took.clone();
                async move {
                    let next = data.next().await;
                    *took.lock().unwrap_or_else(|p| p.into_inner()) = tokio::time::Instant::now();
                    match next {
                        Some(Ok(b)) => Some((
                            pb::PutAssetChunk { chunk: Some(pb::put_asset_chunk::Chunk::Data(b)) },
                            (data, err_tx),
                        )),
                        Some(Err(e)) => {
                            if let Some(tx) = err_tx.take() {
                                let _ = tx.send(e);
                            }
                            std::future::pending().await
                        }
                        None => None,
                    }
                }
            });
            const STALLED: Duration = Duration::from_secs(60);
            let stalled = async {
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    if progress.lock().unwrap_or_else(|p| p.into_inner()).elapsed() >= STALLED {
                        return;
                    }
                }
            };
            let chunks = futures_util::stream::iter([header]).chain(data);
            let a = tokio::select! {
                r = c.put_asset(chunks) => r.map_err(status_err)?.into_inner(),
                Ok(e) = &mut err_rx => bail!("cannot read {}: {e}; the upload was cancelled", file.display()),
                () = stalled => bail!(
                    "{} took nothing of the upload, nor answered it, for {} s: cancelled",
                    conn.server,
                    STALLED.as_secs()
                ),
            };
            println!("{}\t{}\t{} bytes\t{}", a.hash, a.url, a.size, a.content_type);
        }
        Command::Import { conn, blog, path, dir, blogs_dir } => {
            let mut c = conn.publisher().await?;
            let mut unlisted = 0;
            let paths = match (path, dir) {
                (Some(p), _) => vec![p],
                (None, Some(d)) => {
                    let root = match blogs_dir {
                        Some(b) => b,
                        None => ServeArgs::default().load()?.blogs_dir,
                    };
                    let (paths, skipped, n) = list_blog_dir(&root, &blog, &d)?;
                    for s in &skipped {
                        eprintln!("skipped: {s}");
                    }
                    unlisted = n;
                    paths
                }
                (None, None) => bail!("give a PATH or --dir"),
            };
            let total = paths.len();
            // One file: its answer on stdout. A folder: a bar on a terminal,
            // and every file tried, whatever happens to the one before it
            // (a hard link refused, a file being synced): those are listed
            // as they fail and counted at the end.
            let many = total > 1;
            let bar = (many && std::io::IsTerminal::is_terminal(&std::io::stderr())).then(|| {
                let bar = indicatif::ProgressBar::new(total as u64);
                bar.set_style(
                    indicatif::ProgressStyle::with_template("[{bar:30}] {pos}/{len} {wide_msg}")
                        .expect("a valid template"),
                );
                bar
            });
            let mut failed = 0;
            for (i, p) in paths.into_iter().enumerate() {
                if let Some(b) = &bar {
                    b.set_message(p.clone());
                }
                // A long import outlives a connection's age: a file whose call
                // the closing connection never carried is asked again, once.
                let req = || pb::ImportFileRequest { blog_id: blog.clone(), path: p.clone() };
                let r = match c.import_file(req()).await {
                    Err(s) if failed_in_transport(&s) => c.import_file(req()).await,
                    other => other,
                };
                match r {
                    Ok(a) if !many => {
                        let a = a.into_inner();
                        println!("{}\t{}\t{} bytes", a.hash, a.url, a.size);
                    }
                    Ok(_) => {}
                    Err(s) if !many => return Err(anyhow::anyhow!("{p}: {}", status_err(s))),
                    // Every file after it would fail the same way.
                    Err(s) if fails_every_call(&s) => {
                        if let Some(b) = &bar {
                            b.abandon();
                        }
                        bail!(
                            "stopped after {} of {total} files ({failed} refused): {p}: {}",
                            i - failed,
                            status_err(s)
                        );
                    }
                    Err(s) => {
                        failed += 1;
                        let line = format!("not imported: {p}: {}", status_err(s));
                        match &bar {
                            Some(b) => b.println(line),
                            None => eprintln!("{line}"),
                        }
                    }
                }
                if let Some(b) = &bar {
                    b.inc(1);
                }
            }
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            if many || unlisted > 0 {
                println!("imported {} files", total - failed);
                let folders = match unlisted {
                    0 => String::new(),
                    n => format!("{n} folders could not be listed (above): their files were not imported"),
                };
                if failed > 0 {
                    let and = if folders.is_empty() { String::new() } else { format!("; {folders}") };
                    bail!(
                        "{failed} of {total} files were not imported (listed above){and}; import them again once fixed"
                    );
                }
                if unlisted > 0 {
                    bail!("{folders}");
                }
            }
        }
        Command::DeleteBlog { conn, blog } => {
            let mut c = conn.publisher().await?;
            c.delete_blog(pb::DeleteBlogRequest { blog_id: blog.clone() }).await.map_err(status_err)?;
            println!("deleted {blog}");
        }
        Command::DeleteAsset { conn, blog, hash } => {
            let mut c = conn.publisher().await?;
            c.delete_asset(pb::DeleteAssetRequest { blog_id: blog.clone(), hash: hash.clone() })
                .await
                .map_err(status_err)?;
            println!("deleted asset {hash} of {blog}");
        }
        Command::Purge { conn, blog, keys } => {
            let mut c = conn.publisher().await?;
            let n = keys.len().max(1);
            c.purge(pb::PurgeRequest { blog_id: blog, keys }).await.map_err(status_err)?;
            println!("enqueued {n} purge key{}", if n == 1 { "" } else { "s" });
        }
        Command::Purges { conn } => {
            let mut c = conn.publisher().await?;
            let queues = c.get_purges(pb::GetPurgesRequest {}).await.map_err(status_err)?.into_inner().queues;
            if queues.is_empty() {
                println!("no purge targets configured");
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            for q in queues {
                let oldest = match q.oldest_ms {
                    0 => "-".to_owned(),
                    t => format!("{:.1}s", now.saturating_sub(t) as f64 / 1000.0),
                };
                let error =
                    if q.last_error.is_empty() { String::new() } else { format!("  last error: {}", q.last_error) };
                println!("{}  waiting {}  oldest {oldest}  sent {}{error}", q.target, q.length, q.sent);
            }
        }
        Command::Migrate { serve, bucket_url, prefix, dry_run, concurrency } => {
            let config = serve.load()?;
            crate::durable::create_dir_all(&config.data_dir)
                .with_context(|| format!("cannot create {}", config.data_dir.display()))?;
            // The same rule as the server's: the copies must land apart from the
            // data dir's database and CAS and from the users' folders.
            crate::app::check_serving_dirs(&config)?;
            let opts = crate::migrate::Options { bucket_url, prefix, dry_run, concurrency };
            let s = crate::migrate::run(&config.static_dir, &config.data_dir, opts).await?;
            let mb = s.bytes as f64 / 1e6;
            if dry_run {
                println!("dry run: nothing written; would copy {} objects ({mb:.1} MB)", s.copied);
            } else {
                println!("{mb:.1} MB copied into {}", config.static_dir.display());
            }
            if s.interrupted {
                println!("interrupted: run the same command again to go on");
            }
            if s.left > 0 {
                println!(
                    "left in the bucket: {} objects a copy would not answer as the bucket does (a Content-Encoding, \
                     or a Content-Type it cannot keep; printed above, counted with the refused); the fallback answers \
                     them from there, so keep the bucket while any is left",
                    s.left
                );
            }
            println!("{s}");
            if s.interrupted {
                std::process::exit(130);
            }
            if s.failed > 0 {
                std::process::exit(1);
            }
        }
        Command::Fsck { serve, quarantine } => {
            let config = serve.load()?;
            if config.etcd.is_some() {
                // Its references live in etcd, and a blob uploaded on another
                // node is not missing but fetched when asked for.
                anyhow::bail!("fsck checks the embedded store; it does not run with store = \"etcd\"");
            }
            let store = crate::store::SledStore::open(&config.data_dir.join("db"))
                .context("cannot open the store: fsck needs the server stopped")?;
            let catalog = crate::catalog::Catalog::new(
                std::sync::Arc::new(store),
                crate::cas::Cas::open(&config.data_dir.join("cas"))?,
                crate::blogfs::BlogsDir::new(&config.blogs_dir)?,
                crate::catalog::CatalogOptions {
                    base_url: String::new(),
                    url_style: config.url_style,
                    max_batch: config.max_batch,
                    max_asset_bytes: config.max_asset_bytes,
                    purges: std::sync::Arc::new(crate::purge::Outbox::none()),
                    static_dir: crate::blogfs::BlogsDir::new(&config.static_dir)?,
                },
            );
            let r = catalog.fsck(quarantine)?;
            println!("checked {} blobs", r.blobs_checked);
            for h in &r.corrupt {
                println!("corrupt {h}");
            }
            for p in &r.quarantined {
                println!("quarantined {}", p.display());
            }
            for h in &r.missing {
                println!("missing {h}");
            }
            if !r.corrupt.is_empty() || !r.missing.is_empty() {
                std::process::exit(1);
            }
        }
    }
    Ok(())
}

/// Every regular file under a folder of the blog, as blog paths, and what
/// was left out and why: hidden files (never served) silently; symbolic
/// links, special files and names that are not UTF-8 (no blog path names
/// them) said, so that nothing is left out without a word.
/// `/` is the whole blog. A folder under it that cannot be listed (too deep
/// for a path, no permission) is counted in the third value, and said, so
/// that the rest is imported and the command still fails at the end.
fn list_blog_dir(
    blogs_dir: &std::path::Path,
    blog: &str,
    dir: &str,
) -> anyhow::Result<(Vec<String>, Vec<String>, usize)> {
    let root = blogs_dir.join(blog);
    let start = match dir.trim_end_matches('/') {
        "" => root.clone(),
        d => crate::domain::BlogPath::parse(d)?.segments().fold(root.clone(), |p, s| p.join(s)),
    };
    let (mut out, mut skipped, mut unlisted) = (Vec::new(), Vec::new(), 0);
    let mut stack = vec![start.clone()];
    while let Some(d) = stack.pop() {
        let entries = match std::fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) if d == start => return Err(e).with_context(|| format!("cannot list {}", d.display())),
            Err(e) => {
                let shown = d.strip_prefix(&root).map_or_else(|_| d.clone(), |p| p.to_owned()).display().to_string();
                let shown = crate::domain::truncated(&shown);
                skipped.push(format!("/{shown}/ (a folder that cannot be listed: {e}; its files are not imported)"));
                unlisted += 1;
                continue;
            }
        };
        for e in entries {
            let e = e?;
            let name = e.file_name();
            let shown =
                || e.path().strip_prefix(&root).map_or_else(|_| e.path(), |p| p.to_owned()).display().to_string();
            let Some(name) = name.to_str() else {
                skipped.push(format!("/{} (a name that is not UTF-8)", shown()));
                continue;
            };
            if name.starts_with('.') {
                continue;
            }
            let t = e.file_type()?;
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                let rel = e.path().strip_prefix(&root)?.to_string_lossy().into_owned();
                out.push(format!("/{rel}"));
            } else if t.is_symlink() {
                skipped.push(format!("/{} (a symbolic link)", shown()));
            } else {
                skipped.push(format!("/{} (not a regular file)", shown()));
            }
        }
    }
    out.sort();
    skipped.sort();
    Ok((out, skipped, unlisted))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_failures_of_the_connection_are_tried_again() {
        // Nothing listens on a port just freed: the call fails in the channel.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let ch = Channel::from_shared(format!("http://127.0.0.1:{port}")).unwrap().connect_lazy();
        let e = pb::resolver_client::ResolverClient::new(ch)
            .get_blog(pb::GetBlogRequest { blog_id: "b".into() })
            .await
            .unwrap_err();
        assert!(failed_in_transport(&e), "{e:?}");
        // An answer of the server's is final.
        assert!(!failed_in_transport(&tonic::Status::not_found("blog b")));
        assert!(!failed_in_transport(&tonic::Status::aborted("the file changed during its copy")));
    }
}
