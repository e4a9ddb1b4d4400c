//! Wiring and shutdown: opens the store, the CAS and the blog folders, binds
//! both listeners (port 0 allowed, the bound addresses are reported), serves
//! gRPC and HTTP, and on a stop signal turns health to NOT_SERVING, drains
//! in-flight calls, then flushes the store.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::blogfs::BlogsDir;
use crate::cas::Cas;
use crate::catalog::{Catalog, CatalogOptions};
use crate::config::Config;
use crate::grpc::{
    AuthLayer, PublisherService, ResolverService, StatusRewriteLayer, Tokens, TraceLayer, UploadGuardLayer,
    MAX_MESSAGE_BYTES,
};
use crate::origin::Origin;
use crate::proto;
use crate::store::{SledStore, Store};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot open the store in {path}: {error}")]
    Store { path: String, error: crate::store::StoreError },
    #[error("cannot prepare {what} at {path}: {error}")]
    Dir { what: &'static str, path: String, error: std::io::Error },
    #[error("cannot listen on {addr} ({key}): {error}")]
    Bind { key: &'static str, addr: SocketAddr, error: std::io::Error },
    #[error("gRPC server failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("reflection setup failed: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("{0}")]
    Catalog(#[from] crate::catalog::CatalogError),
    #[error("config: invalid {key}: {reason}")]
    Config { key: &'static str, reason: String },
    #[error("{0}")]
    InUse(String),
}

/// The origin serves whatever lies under `blogs_dir/{blog id}/` and
/// `static_dir/{blog id}/`: the data dir (the database, its log, the CAS)
/// must not be reachable from either, neither may lie inside the database's
/// or the CAS's folders, and the two must not overlap (backfill writes into
/// the static folder, never into a user's synced folder).
pub fn check_serving_dirs(config: &Config) -> Result<(), AppError> {
    let canon = |p: &std::path::Path| resolved(p);
    let data = canon(&config.data_dir);
    let blogs = canon(&config.blogs_dir);
    let statics = canon(&config.static_dir);
    for (key, dir) in [("blogs_dir", &blogs), ("static_dir", &statics)] {
        let reason = if data.starts_with(dir) {
            Some(format!(
                "{} holds the data dir {} (its database and CAS would be served as blog files); use a folder of its own",
                dir.display(),
                data.display()
            ))
        } else if let Some(name) =
            dir.strip_prefix(&data).ok().and_then(|r| r.iter().next()).filter(|n| owned_by_data_dir(n))
        {
            Some(format!(
                "{} is, or lies inside, {} of the data dir's own (its database, log, snapshots or CAS): use another name",
                dir.display(),
                name.to_string_lossy()
            ))
        } else if key == "static_dir" && (statics.starts_with(&blogs) || blogs.starts_with(&statics)) {
            Some(format!(
                "{} and blogs_dir {} overlap: the platform's files must stay apart from the users' synced folders",
                statics.display(),
                blogs.display()
            ))
        } else {
            None
        };
        if let Some(reason) = reason {
            return Err(AppError::Config { key, reason });
        }
    }
    Ok(())
}

/// `p` with links resolved as far as it exists, and the rest (which can
/// hold no link) taken as written, `..` included: it is checked before the
/// folders are made.
fn resolved(p: &std::path::Path) -> std::path::PathBuf {
    use std::path::Component;
    let parts: Vec<Component> = p.components().collect();
    for k in (0..=parts.len()).rev() {
        let head: std::path::PathBuf = parts[..k].iter().collect();
        let head = if head.as_os_str().is_empty() { std::path::PathBuf::from(".") } else { head };
        if let Ok(mut at) = head.canonicalize() {
            for part in &parts[k..] {
                match part {
                    Component::ParentDir => {
                        at.pop();
                    }
                    Component::CurDir => {}
                    other => at.push(other),
                }
            }
            return at;
        }
    }
    p.to_path_buf()
}

/// Whether a name right under the data dir is one of the data dir's own
/// (the database `db` and the files named after it, `db.wal`,
/// `db.snapshot`, …; the CAS; the store's kind; migrate's resume points;
/// temporary files): a serving folder there would be served, or would stand
/// where the store writes one of them (a `db.wal` folder stopped every start).
fn owned_by_data_dir(name: &std::ffi::OsStr) -> bool {
    let n = name.to_string_lossy();
    n == "db"
        || n == "cas"
        || n.starts_with("db.")
        || n.starts_with("cas.")
        || n.starts_with(STORE_KIND_FILE)
        || n.starts_with("migrate-")
        || n.starts_with('.')
}

/// The file in the data dir that says which store it belongs to.
const STORE_KIND_FILE: &str = "store-kind";

/// A data dir belongs to the store it was first served with: a cluster
/// node's (`store = "etcd"`) started once without that setting would come
/// up as an empty embedded store and acknowledge writes no other node ever
/// sees, and an embedded store's started against etcd would not show its
/// own data. Written (durably) at the first start, checked at every one.
fn check_store_kind(config: &Config) -> Result<(), AppError> {
    let kind = if config.etcd.is_some() { "etcd" } else { "sled" };
    let path = config.data_dir.join(STORE_KIND_FILE);
    let err = |error| AppError::Dir { what: "the data dir's store kind", path: path.display().to_string(), error };
    match std::fs::read_to_string(&path) {
        Ok(found) if found.trim() == kind => Ok(()),
        Ok(found) => Err(AppError::Config {
            key: "store",
            reason: format!(
                "the data dir {} belongs to store = \"{}\" (it says so in {STORE_KIND_FILE}); this server is set to \
                 \"{kind}\": set store (and etcd_endpoints) as it was, or use another data dir",
                config.data_dir.display(),
                found.trim()
            ),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            crate::durable::write_file(&path, format!("{kind}\n").as_bytes()).map_err(err)
        }
        Err(e) => Err(err(e)),
    }
}

/// Raises the soft limit on open descriptors to the hard limit (the usual
/// soft limit, 1,024, is far below what a busy origin needs) and returns
/// the limit in force. Two syscalls: `libc`, already a dependency, is enough.
pub fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `lim` is a valid rlimit for the kernel to fill and read.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    lim.rlim_cur
}

/// Opens the store; a panic inside sled (it panics on some corrupt files)
/// becomes an error naming the folder, without a backtrace on the console.
fn open_store_quietly(
    dir: &std::path::Path,
    purge: crate::store::PurgeOptions,
) -> Result<SledStore, crate::store::StoreError> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| SledStore::open_with(dir, purge)));
    std::panic::set_hook(hook);
    r.unwrap_or_else(|p| {
        let why = p
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| p.downcast_ref::<&str>().copied())
            .unwrap_or("no message");
        Err(crate::store::StoreError::Corrupt {
            tree: "database",
            what: format!("{} could not be read ({why}); restore it from a backup", dir.display()),
        })
    })
}

/// How many connections each listener may hold open, within the
/// descriptor limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ConnectionCaps {
    http: u64,
    grpc: u64,
    metrics: u64,
}

/// A scrape is one connection: room for a few Prometheus servers and
/// people with curl.
const METRICS_CONNECTIONS: u64 = 64;

/// Splits what the descriptor limit leaves after the reserve: gRPC gets at
/// most an eighth (one descriptor each: its clients are a few renderers and
/// publishers), metrics a sixteenth up to 64, the HTTP origin the rest at
/// two each (its socket and the file it sends). The floors keep a tiny
/// limit usable; below about 800 descriptors they eat into the reserve.
/// They never raise a configured cap: that is taken as it is.
fn connection_caps(config: &Config, nofile: u64, sealed: usize) -> ConnectionCaps {
    let budget = nofile.saturating_sub(fd_reserve(config, sealed));
    let grpc = (config.grpc_max_connections as u64).min((budget / 8).max(8));
    let metrics = METRICS_CONNECTIONS.min(budget / 16).max(4);
    let http = (config.max_connections as u64).min((budget.saturating_sub(grpc + metrics) / 2).max(16));
    ConnectionCaps { http, grpc, metrics }
}

/// How long a gRPC connection may live, its age and grace together; `None`:
/// for good. Any number of seconds is taken (a huge one is "never").
fn grpc_connection_lifetime(config: &Config) -> Option<std::time::Duration> {
    config.grpc_max_connection_age.map(|age| age.saturating_add(config.grpc_max_connection_age_grace))
}

/// Descriptors kept back from connections (see `connection_caps`): the store, the log, blobs being written, fallback
/// fetches and their backfills, and the hot files sealed for `sendfile`
/// (`sealed`).
fn fd_reserve(config: &Config, sealed: usize) -> u64 {
    256 + 2 * (config.max_uploads + crate::catalog::IMPORTS_AT_ONCE) as u64
        + 3 * config.max_fallback_fetches as u64
        + sealed as u64
}

pub struct App {
    grpc_listener: TcpListener,
    http_listener: TcpListener,
    metrics_listener: TcpListener,
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    metrics_addr: SocketAddr,
    /// The descriptor limit in force (raised at the start of `build`).
    nofile: u64,
    catalog: Arc<Catalog>,
    config: Config,
    /// Edge purge targets, their queues, and the store that logs deliveries.
    purge: (Vec<crate::purge::target::Target>, Arc<crate::purge::Outbox>, Arc<dyn Store>),
    /// The data dir's lock (`dirlock`), held until the server has stopped.
    lock: std::fs::File,
}

impl App {
    pub async fn build(config: Config) -> Result<App, AppError> {
        // First, before anything opens a descriptor.
        let nofile = raise_nofile_limit();
        let dir_err = |what, path: &std::path::Path| {
            let path = path.display().to_string();
            move |error| AppError::Dir { what, path, error }
        };
        crate::durable::create_dir_all(&config.data_dir).map_err(dir_err("data_dir", &config.data_dir))?;
        // Before anything in the data dir is touched (the sweeps below
        // remove what a crash left half-written, which for a server still
        // running would be its uploads in flight): one server at a time.
        // The store takes a lock of its own on its folder, for `fsck` too.
        let lock = match crate::dirlock::lock(&config.data_dir).map_err(dir_err("data_dir", &config.data_dir))? {
            Ok(lock) => lock,
            Err(pid) => {
                return Err(AppError::InUse(format!(
                    "the data dir {} is in use: {} holds it; stop it first (two servers on one data dir would \
                     lose acknowledged writes)",
                    config.data_dir.display(),
                    crate::dirlock::holder_name(pid)
                )))
            }
        };
        // Before the folders are made: one where the store keeps a file of
        // its own (`db.wal`) stood in its way at every start after.
        check_serving_dirs(&config)?;
        let blogs = BlogsDir::new(&config.blogs_dir).map_err(dir_err("blogs_dir", &config.blogs_dir))?;
        let statics = BlogsDir::new(&config.static_dir).map_err(dir_err("static_dir", &config.static_dir))?;
        // A blog folder that is a link may lead anywhere but into these.
        let own = [config.data_dir.as_path(), blogs.root(), statics.root()];
        let (blogs, statics) = (blogs.clone().keep_out_of(own), statics.clone().keep_out_of(own));
        // Backfills a crash cut off.
        crate::blogfs::NewFile::sweep(statics.root()).map_err(dir_err("static_dir", &config.static_dir))?;
        let cas_dir = config.data_dir.join("cas");
        let cas = Cas::open(&cas_dir).map_err(dir_err("the CAS", &cas_dir))?;
        // Once per data dir: blobs that earlier versions hard-linked to blog
        // files get inodes of their own before anything is served.
        let cas = tokio::task::spawn_blocking(move || cas.unshare_linked().map(|n| (cas, n)))
            .await
            .expect("unshare does not panic")
            .map(|(cas, (copied, quarantined))| {
                if copied + quarantined > 0 {
                    tracing::warn!(copied, quarantined, "blobs that shared an inode with a blog file were separated");
                }
                cas
            })
            .map_err(dir_err("the CAS", &cas_dir))?;
        // Credentials are read now: a target that cannot send stops the start.
        let targets = config
            .purge
            .iter()
            .map(|t| crate::purge::target::Target::new(t.clone(), |v| std::env::var(v).ok()))
            .collect::<Result<Vec<_>, String>>()
            .map_err(|reason| AppError::Config { key: "purge", reason })?;
        let outbox =
            Arc::new(crate::purge::Outbox::new(config.purge.iter().map(|t| t.name.clone()), config.purge_queue_max));
        check_store_kind(&config)?;
        let db_dir = config.data_dir.join("db");
        let store = match &config.etcd {
            None => {
                let dir = db_dir.clone();
                let purge = crate::store::PurgeOptions { outbox: outbox.clone(), on_publish: config.purge_on_publish };
                tokio::task::spawn_blocking(move || open_store_quietly(&dir, purge))
                    .await
                    .expect("panics are caught inside")
                    .map_err(|error| AppError::Store { path: db_dir.display().to_string(), error })?
            }
            Some(etcd) => {
                let opts =
                    crate::store::etcd::EtcdOptions { endpoints: etcd.endpoints.clone(), prefix: etcd.prefix.clone() };
                let at = format!("etcd {}", etcd.endpoints.join(","));
                tokio::task::spawn_blocking(move || crate::store::IndexedStore::open_etcd(opts))
                    .await
                    .expect("opening etcd does not panic")
                    .map_err(|error| AppError::Store { path: at, error })?
            }
        };
        let grpc_listener = crate::listen::bind(config.grpc_addr, false).map_err(|error| AppError::Bind {
            key: "grpc_addr",
            addr: config.grpc_addr,
            error,
        })?;
        // SO_REUSEPORT: the origin's threads each bind this address again.
        let http_listener = crate::listen::bind(config.http_addr, true).map_err(|error| AppError::Bind {
            key: "http_addr",
            addr: config.http_addr,
            error,
        })?;
        let metrics_listener = crate::listen::bind(config.metrics_addr, false).map_err(|error| AppError::Bind {
            key: "metrics_addr",
            addr: config.metrics_addr,
            error,
        })?;
        crate::metrics::init();
        let metrics_addr = metrics_listener.local_addr().expect("bound");
        let grpc_addr = grpc_listener.local_addr().expect("bound");
        let http_addr = http_listener.local_addr().expect("bound");
        let base_url = config.cdn_base_url.clone().unwrap_or_else(|| format!("http://{http_addr}"));
        let store: Arc<dyn Store> = Arc::new(store);
        let catalog = Arc::new(Catalog::new(
            store.clone(),
            cas,
            blogs,
            CatalogOptions {
                base_url,
                url_style: config.url_style,
                max_batch: config.max_batch,
                max_asset_bytes: config.max_asset_bytes,
                purges: outbox.clone(),
                static_dir: statics,
            },
        ));
        // Finish any blob removal a crash interrupted.
        let c = catalog.clone();
        let removed = tokio::task::spawn_blocking(move || c.collect_garbage()).await.expect("gc does not panic")?;
        if removed > 0 {
            tracing::info!(removed, "removed unreferenced blobs left by an interrupted deletion");
        }
        if config.etcd.is_some() {
            // Deletions taken by other nodes arrive through the watch: this
            // node's copies of what they left unreferenced are collected
            // here, every few seconds, for as long as the catalog lives.
            let weak = Arc::downgrade(&catalog);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                    let Some(c) = weak.upgrade() else { break };
                    if c.store().gc_candidates().is_empty() {
                        continue;
                    }
                    match tokio::task::spawn_blocking(move || c.collect_garbage()).await {
                        Ok(Err(e)) => tracing::warn!(error = %e, "garbage collection failed; trying again"),
                        Ok(Ok(n)) if n > 0 => tracing::info!(removed = n, "removed blobs no blog references any more"),
                        _ => {}
                    }
                }
            });
        }
        Ok(App {
            grpc_listener,
            http_listener,
            metrics_listener,
            grpc_addr,
            http_addr,
            metrics_addr,
            nofile,
            catalog,
            config,
            purge: (targets, outbox, store),
            lock,
        })
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }
    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    /// Serves until `stop` completes, then drains and flushes.
    pub async fn run_until_stopped(self, stop: impl Future<Output = ()> + Send + 'static) -> Result<(), AppError> {
        let App {
            grpc_listener,
            http_listener,
            metrics_listener,
            catalog,
            config,
            grpc_addr,
            http_addr,
            metrics_addr,
            nofile,
            purge: (targets, outbox, store),
            lock,
        } = self;
        // Let go when this function returns, after the store is flushed.
        let _lock = lock;
        let deliveries = crate::purge::spawn(targets, outbox, store, config.purge_drop_after);
        for w in &config.warnings {
            tracing::warn!("{w}");
        }
        if config.resolver_tokens.is_empty() || config.publisher_tokens.is_empty() {
            tracing::warn!(
                resolver_open = config.resolver_tokens.is_empty(),
                publisher_open = config.publisher_tokens.is_empty(),
                "no tokens configured for some services: anyone who reaches the gRPC port can call them"
            );
        }
        let (health, health_service) = tonic_health::server::health_reporter();
        // Their requests are a service or file name: a message of 4 MiB (the
        // default) on each of their slots held 1.2 GB.
        let health_service = health_service.max_decoding_message_size(crate::grpc::SIDE_MESSAGE_BYTES);
        health.set_serving::<proto::resolver_server::ResolverServer<ResolverService>>().await;
        health.set_serving::<proto::publisher_server::PublisherServer<PublisherService>>().await;
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        // A full batch of the longest paths, each percent-encoded (3 bytes a
        // byte at worst) under the base URL, must fit in the answer.
        let max_answer = config.max_batch * (catalog.base_url().len() + 64 + 20 + 3 * 1024 + 64);
        let resolver = proto::resolver_server::ResolverServer::new(ResolverService { catalog: catalog.clone() })
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(max_answer.max(MAX_MESSAGE_BYTES));
        let publisher = proto::publisher_server::PublisherServer::new(PublisherService {
            catalog: catalog.clone(),
            uploads: Arc::new(tokio::sync::Semaphore::new(config.max_uploads)),
            upload_idle: config.upload_idle_timeout,
        })
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let tokens = Tokens {
            resolver: config.resolver_tokens.clone().into(),
            publisher: config.publisher_tokens.clone().into(),
        };

        // One stop signal fans out: health first, then both listeners drain.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let signal = {
            let health = health.clone();
            async move {
                stop.await;
                tracing::info!("stopping: health NOT_SERVING, draining in-flight calls");
                health.set_not_serving::<proto::resolver_server::ResolverServer<ResolverService>>().await;
                health.set_not_serving::<proto::publisher_server::PublisherServer<PublisherService>>().await;
                let _ = stop_tx.send(true);
            }
        };
        tokio::spawn(signal);

        let grpc_stop = {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        };
        let sealed = crate::origin::sealed_files(config.hot_cache_bytes, nofile);
        let caps = connection_caps(&config, nofile, sealed);
        let needed = fd_reserve(&config, sealed) + caps.grpc + caps.metrics + 2 * caps.http;
        if needed > nofile {
            tracing::warn!(
                nofile,
                needed,
                "the descriptor limit is below what the reserve and the smallest connection caps need: \
                 under load, calls may fail with RESOURCE_EXHAUSTED and connections wait; raise `ulimit -n`"
            );
        }
        if caps.http < config.max_connections as u64 || caps.grpc < config.grpc_max_connections as u64 {
            tracing::warn!(
                nofile,
                max_connections = caps.http,
                grpc_max_connections = caps.grpc,
                configured_http = config.max_connections,
                configured_grpc = config.grpc_max_connections,
                "the descriptor limit caps connections below what is configured; raise `ulimit -n`"
            );
        }
        let mut grpc_server = tonic::transport::Server::builder()
            // Past this many calls in flight on one connection, refuse at once
            // (RESOURCE_EXHAUSTED) rather than queue without bound.
            .concurrency_limit_per_connection(config.max_in_flight)
            .load_shed(true)
            // A peer that stops answering pings (gone without a FIN) is
            // dropped; a silent one before its first bytes is dropped by
            // `listen::incoming`.
            .http2_keepalive_interval(Some(config.http_idle_timeout))
            .http2_keepalive_timeout(Some(config.http_idle_timeout))
            // Calls a client cancels (RST_STREAM) before the server has taken
            // them up count against h2's guard against rapid resets: past
            // 20 by default the connection is closed (GOAWAY "too_many_resets"),
            // failing every other call on it. A server that stalls 400 ms under
            // a renderer's pages sees that many cancelled at their deadline (a
            // hostile test of the Node client). Bounded still, at the calls a
            // connection may have in flight.
            .http2_max_pending_accept_reset_streams(Some(config.max_in_flight.max(20)));
        // Live connections are not held forever: past this age the
        // connection is sent GOAWAY (calls in flight finish; a client
        // reconnects for its next call), so a client holding every slot
        // with connections that answer pings and send nothing lets the
        // ones waiting in the backlog in. A connection still open a grace
        // period later (a stream kept open, such as a health Watch, or a
        // peer that never answers the GOAWAY's ping) is cut by
        // `listen::incoming`. Not tonic's `max_connection_age_grace`: with
        // it set, tonic 0.14.9 sends no GOAWAY at all and only closes the
        // connection at age + grace.
        if let Some(age) = config.grpc_max_connection_age {
            grpc_server = grpc_server.max_connection_age(age);
        }
        // The gRPC connections, listed for the memory budget to cut those
        // that do not take their answers.
        let grpc_conns = Arc::new(crate::listen::Conns::default());
        let grpc = grpc_server
            // Outermost: every call is traced, refused ones included.
            .layer(TraceLayer)
            // A call without the right token is refused before any service
            // sees it, and so changes nothing.
            .layer(AuthLayer { tokens })
            // Inside auth: only calls allowed in take room in the server's
            // request memory, or get their upload bodies guarded.
            .layer(crate::grpc::BudgetLayer::new(
                config.grpc_memory_bytes,
                // The longest blog id (64 bytes) under the base URL.
                crate::grpc::answer_item_bytes(catalog.base_url().len() + 64),
                config.max_batch,
                grpc_conns.clone(),
            ))
            .layer(UploadGuardLayer)
            // Decoder and size-limit errors become the caller's INVALID_ARGUMENT
            // and RESOURCE_EXHAUSTED, with a sentence.
            .layer(StatusRewriteLayer)
            .add_service(health_service)
            .add_service(reflection().build_v1()?.max_decoding_message_size(crate::grpc::SIDE_MESSAGE_BYTES))
            .add_service(reflection().build_v1alpha()?.max_decoding_message_size(crate::grpc::SIDE_MESSAGE_BYTES))
            .add_service(resolver)
            .add_service(publisher)
            .serve_with_incoming_shutdown(
                crate::listen::incoming(
                    grpc_listener,
                    caps.grpc as usize,
                    config.http_idle_timeout,
                    crate::listen::H2_PREFACE,
                    grpc_connection_lifetime(&config),
                    Some(grpc_conns),
                    "grpc",
                ),
                grpc_stop,
            );
        let origin = Origin::new(catalog.clone(), &config, caps.http as usize, sealed);
        let metrics = crate::metrics::serve(
            crate::listen::incoming(
                metrics_listener,
                caps.metrics as usize,
                config.http_idle_timeout,
                1,
                None,
                None,
                "metrics",
            ),
            config.http_idle_timeout,
            catalog.clone(),
            stop_rx.clone(),
        );
        let http = origin.serve(http_listener, stop_rx);
        tracing::info!(%grpc_addr, %http_addr, %metrics_addr, base_url = catalog.base_url(), "blotcdn serving");
        let (g, (), ()) = tokio::join!(grpc, http, metrics);
        // What they were sending is logged as unsent, and resent at the next start.
        for d in deliveries {
            d.abort();
        }
        g?;
        let c = catalog.clone();
        c.store()
            .flush()
            .done()
            .await
            .map_err(|error| AppError::Store { path: config.data_dir.join("db").display().to_string(), error })?;
        // Let go of the database now, not when the last holder of the
        // catalog goes: a restart in the same process must find it unlocked.
        let c = catalog.clone();
        let _ = tokio::task::spawn_blocking(move || c.store().close()).await;
        tracing::info!("stopped; store flushed");
        Ok(())
    }
}

/// Completes on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The configured caps where descriptors are plenty; where they are
    /// not, the three listeners and the reserve fit inside the limit.
    #[test]
    fn connection_caps_fit_the_descriptor_limit() {
        let config = Config::from_partial(crate::config::Partial::default()).unwrap();
        let caps =
            |nofile| connection_caps(&config, nofile, crate::origin::sealed_files(config.hot_cache_bytes, nofile));
        assert_eq!(caps(1 << 20), ConnectionCaps { http: 10_000, grpc: 1024, metrics: 64 });
        for nofile in [2048, 4096, 8192, 20_000] {
            let c = caps(nofile);
            let reserve = fd_reserve(&config, crate::origin::sealed_files(config.hot_cache_bytes, nofile));
            assert!(reserve + c.grpc + c.metrics + 2 * c.http <= nofile, "{nofile}: {c:?}");
            assert!(c.grpc <= 1024 && c.http <= 10_000, "{nofile}: {c:?}");
        }
        // Small caps as configured, at any limit.
        let small = Config::from_partial(crate::config::Partial {
            grpc_max_connections: Some(2),
            max_connections: Some(3),
            ..Default::default()
        })
        .unwrap();
        for nofile in [256, 1 << 20] {
            let c = connection_caps(&small, nofile, 0);
            assert_eq!((c.grpc, c.http), (2, 3), "{nofile}");
        }
    }

    /// Age and grace of any size, however large, give a lifetime ("never",
    /// in effect), not a panic at start.
    #[test]
    fn any_connection_age_and_grace_give_a_lifetime() {
        let config = |age: u64, grace: u64| {
            Config::from_partial(crate::config::Partial {
                grpc_max_connection_age_secs: Some(age),
                grpc_max_connection_age_grace_secs: Some(grace),
                ..Default::default()
            })
            .unwrap()
        };
        assert_eq!(grpc_connection_lifetime(&config(300, 300)), Some(std::time::Duration::from_secs(600)));
        assert_eq!(grpc_connection_lifetime(&config(0, 300)), None);
        for (age, grace) in [(u64::MAX, u64::MAX), (1, u64::MAX), (u64::MAX, 1)] {
            assert!(grpc_connection_lifetime(&config(age, grace)).unwrap() >= std::time::Duration::from_secs(1 << 62));
        }
    }
}
