//! Configuration: defaults, then a TOML file, then `BLOTCDN_` environment
//! variables, then command-line flags; each layer only sets what it names.
//! A bad value is refused with the key (or variable) that held it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config: cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config: {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config: invalid {key}: {reason}")]
    Invalid { key: String, reason: String },
}

/// The longest timeout a `*_secs` key takes: a year.
pub const MAX_TIMEOUT_SECS: u64 = 365 * 24 * 3600;
/// The most origin threads `http_threads` takes.
pub const MAX_HTTP_THREADS: usize = 1024;
/// The slowest a purge target may be sent requests: one a day.
pub const MIN_PURGE_RATE: f64 = 1.0 / 86_400.0;
/// `grpc_memory_bytes` by default: two full batches of long paths at once,
/// or a few thousand renderer pages.
pub const DEFAULT_GRPC_MEMORY_BYTES: u64 = 256 << 20;
/// The least `grpc_memory_bytes` takes: one request at the size limit.
pub const MIN_GRPC_MEMORY_BYTES: u64 = crate::grpc::MAX_MESSAGE_BYTES as u64;

/// One layer: every key optional. Used for the file, the environment and flags.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Partial {
    pub data_dir: Option<PathBuf>,
    pub blogs_dir: Option<PathBuf>,
    /// Files the platform generates per blog (thumbnails, cached images,
    /// avatars), apart from the users' synced folders: `{static_dir}/{blog}/…`.
    pub static_dir: Option<PathBuf>,
    pub grpc_addr: Option<String>,
    pub http_addr: Option<String>,
    /// Prometheus text exposition at `GET /metrics`, never on the origin's port.
    pub metrics_addr: Option<String>,
    /// OTLP/gRPC collector for traces, like `http://127.0.0.1:4317`; none: no traces.
    pub otlp_endpoint: Option<String>,
    pub cdn_base_url: Option<String>,
    /// `path` (the default): `{cdn_base_url}/{blog}/…`; `host`:
    /// `{scheme}://{blog}.{host}/…`, the origin taking the blog from `Host`.
    pub url_style: Option<String>,
    pub resolver_tokens: Option<Vec<String>>,
    pub publisher_tokens: Option<Vec<String>>,
    pub max_batch: Option<usize>,
    pub max_asset_bytes: Option<u64>,
    /// Origins tried in order for what the local disk does not hold: the
    /// legacy S3 bucket's HTTP endpoint first, then the main app server.
    pub fallback_origins: Option<Vec<String>>,
    /// Which of `fallback_origins` (by position) are the legacy bucket, whose
    /// hits are written to local disk. Default: the first one.
    pub backfill_origins: Option<usize>,
    /// Bytes of small hot files the origin keeps in memory.
    pub hot_cache_bytes: Option<u64>,
    /// gRPC calls in flight per connection; past it a call is refused with
    /// RESOURCE_EXHAUSTED instead of queueing.
    pub max_in_flight: Option<usize>,
    /// `PutAsset` streams open at once, server-wide; past it RESOURCE_EXHAUSTED.
    pub max_uploads: Option<usize>,
    /// Memory that unary gRPC calls may take at once, server-wide, while
    /// they are decoded, handled and answered; past it a call is refused
    /// (RESOURCE_EXHAUSTED) and retried by its caller.
    pub grpc_memory_bytes: Option<u64>,
    /// An upload that sends nothing for this long is dropped (DEADLINE_EXCEEDED).
    pub upload_idle_timeout_secs: Option<u64>,
    /// HTTP origin connections open at once; past it, new ones wait in the
    /// listen backlog. Also bounded by the descriptor limit, less a reserve.
    pub max_connections: Option<usize>,
    /// gRPC connections open at once; past it, new ones wait in the listen
    /// backlog. Also bounded by the descriptor limit, less a reserve.
    pub grpc_max_connections: Option<usize>,
    /// A gRPC connection older than this many seconds is told to go away
    /// (HTTP/2 GOAWAY: calls in flight finish, clients reconnect for the
    /// next), so live but idle connections cannot hold every slot. 0: never.
    pub grpc_max_connection_age_secs: Option<u64>,
    /// How long calls in flight on a connection sent away have to finish;
    /// then the connection is cut.
    pub grpc_max_connection_age_grace_secs: Option<u64>,
    /// An HTTP connection waiting this long for a request's headers (idle
    /// keep-alive included) is closed.
    pub http_idle_timeout_secs: Option<u64>,
    /// Threads serving the HTTP origin, each with its own listener
    /// (`SO_REUSEPORT`); default: one per core. 0: on the runtime shared
    /// with gRPC.
    pub http_threads: Option<usize>,
    /// The scheduler time slice the origin threads ask for, in microseconds
    /// (Linux 6.12 and later; 100 to 100000). Default 100: a process that
    /// shares the cores, a load generator or an edge on the same host, runs
    /// sooner after it wakes. 0: the kernel's default.
    pub http_slice_us: Option<u64>,
    /// A blog file changed less than this many milliseconds ago is answered
    /// short-lived and not kept hot: its bytes may not be whole yet though
    /// no timestamp moved (one slow write, writes through a mapping,
    /// coarse timestamps). 0: no such window.
    pub recent_change_ms: Option<u64>,
    /// Fallback fetches in flight at once; past it the origin answers 503.
    pub max_fallback_fetches: Option<usize>,
    /// The whole of one fallback fetch (headers and body), in seconds.
    pub fallback_timeout_secs: Option<u64>,
    /// Edge purge targets (`[[purge]]` tables; `BLOTCDN_PURGE_URLS`).
    pub purge: Option<Vec<PurgeTargetConfig>>,
    /// Purge the blog's key at every target when its floor is raised (a
    /// publish), for edges that cache pages.
    pub purge_on_publish: Option<bool>,
    /// Keys waiting per target at most; past it, writes that would add a
    /// purge are refused (RESOURCE_EXHAUSTED) rather than let memory grow.
    pub purge_queue_max: Option<usize>,
    /// How long a purge key an edge refuses alone, while it takes the
    /// others, holds back the keys behind it before it is dropped; 0: never.
    pub purge_drop_after_secs: Option<u64>,
    /// `sled` (the default, one machine) or `etcd` (cluster mode).
    pub store: Option<String>,
    /// etcd client URLs, `http://host:port`, for `store = "etcd"`.
    pub etcd_endpoints: Option<Vec<String>>,
    /// Where the metadata lives in etcd (default `/blotcdn/`).
    pub etcd_prefix: Option<String>,
    /// The other nodes' HTTP origin base URLs: a permanent asset's blob this
    /// node lacks is fetched from them by hash.
    pub peers: Option<Vec<String>>,
}

/// One `[[purge]]` table.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PurgeTargetConfig {
    /// Unique; defaults to the kind (then `kind-2`, …).
    pub name: Option<String>,
    pub kind: String,
    pub url: String,
    pub rate_per_sec: Option<f64>,
}

/// What kind of edge a purge target is, and so how a purge is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PurgeKind {
    /// `BAN` to the URL with `Surrogate-Key: <keys>` (`edge/varnish.vcl`).
    Varnish,
    /// `POST` of `{"keys": [...]}`.
    Http,
    /// Bunny's purge by cache tag; `BUNNY_API_KEY`.
    Bunny,
    /// Cloudflare's purge by tags; `CLOUDFLARE_API_TOKEN`.
    Cloudflare,
    /// A CloudFront `CreateInvalidation` signed with SigV4; `AWS_*` credentials.
    Cloudfront,
}

impl PurgeKind {
    pub fn parse(s: &str) -> Option<PurgeKind> {
        Some(match s {
            "varnish" => PurgeKind::Varnish,
            "http" => PurgeKind::Http,
            "bunny" => PurgeKind::Bunny,
            "cloudflare" => PurgeKind::Cloudflare,
            "cloudfront" => PurgeKind::Cloudfront,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PurgeKind::Varnish => "varnish",
            PurgeKind::Http => "http",
            PurgeKind::Bunny => "bunny",
            PurgeKind::Cloudflare => "cloudflare",
            PurgeKind::Cloudfront => "cloudfront",
        }
    }
}

/// A checked purge target.
#[derive(Debug, Clone, PartialEq)]
pub struct PurgeTarget {
    pub name: String,
    pub kind: PurgeKind,
    pub url: String,
    pub rate_per_sec: f64,
}

impl Partial {
    fn overlay(&mut self, o: Partial) {
        macro_rules! take {
            ($($f:ident),*) => { $( if o.$f.is_some() { self.$f = o.$f; } )* };
        }
        take!(
            data_dir,
            blogs_dir,
            static_dir,
            grpc_addr,
            http_addr,
            metrics_addr,
            otlp_endpoint,
            cdn_base_url,
            url_style,
            resolver_tokens,
            publisher_tokens,
            max_batch,
            max_asset_bytes,
            fallback_origins,
            backfill_origins,
            hot_cache_bytes,
            max_in_flight,
            max_uploads,
            grpc_memory_bytes,
            upload_idle_timeout_secs,
            max_connections,
            grpc_max_connections,
            grpc_max_connection_age_secs,
            grpc_max_connection_age_grace_secs,
            http_idle_timeout_secs,
            http_threads,
            http_slice_us,
            recent_change_ms,
            max_fallback_fetches,
            fallback_timeout_secs,
            purge,
            purge_on_publish,
            purge_queue_max,
            purge_drop_after_secs,
            store,
            etcd_endpoints,
            etcd_prefix,
            peers
        );
    }

    /// Reads `BLOTCDN_*` variables through `get` (so tests need not touch the
    /// process environment).
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Partial, ConfigError> {
        fn num<T: std::str::FromStr>(var: &str, v: Option<String>) -> Result<Option<T>, ConfigError> {
            v.map(|s| {
                s.trim()
                    .parse()
                    .map_err(|_| ConfigError::Invalid { key: var.into(), reason: format!("{s:?} is not a number") })
            })
            .transpose()
        }
        let list = |v: Option<String>| {
            v.map(|s| s.split(',').map(|t| t.trim().to_owned()).filter(|t| !t.is_empty()).collect::<Vec<_>>())
        };
        // Set, but to commas alone: not taken as "no tokens", which leaves the service open.
        let tokens = |var: &str| match list(get(var).filter(|v| !v.is_empty())) {
            Some(t) if t.is_empty() => Err(ConfigError::Invalid {
                key: var.into(),
                reason: "names no token; leave it unset for a service without tokens".into(),
            }),
            t => Ok(t),
        };
        Ok(Partial {
            data_dir: get("BLOTCDN_DATA_DIR").map(PathBuf::from),
            blogs_dir: get("BLOTCDN_BLOGS_DIR").map(PathBuf::from),
            static_dir: get("BLOTCDN_STATIC_DIR").map(PathBuf::from),
            grpc_addr: get("BLOTCDN_GRPC_ADDR"),
            http_addr: get("BLOTCDN_HTTP_ADDR"),
            metrics_addr: get("BLOTCDN_METRICS_ADDR"),
            // The standard variable is honoured too; ours wins.
            otlp_endpoint: get("BLOTCDN_OTLP_ENDPOINT").or_else(|| get("OTEL_EXPORTER_OTLP_ENDPOINT")),
            cdn_base_url: get("BLOTCDN_CDN_BASE_URL"),
            url_style: get("BLOTCDN_URL_STYLE"),
            resolver_tokens: tokens("BLOTCDN_RESOLVER_TOKENS")?,
            publisher_tokens: tokens("BLOTCDN_PUBLISHER_TOKENS")?,
            max_batch: num("BLOTCDN_MAX_BATCH", get("BLOTCDN_MAX_BATCH"))?,
            max_asset_bytes: num("BLOTCDN_MAX_ASSET_BYTES", get("BLOTCDN_MAX_ASSET_BYTES"))?,
            fallback_origins: list(get("BLOTCDN_FALLBACK_ORIGINS")),
            backfill_origins: num("BLOTCDN_BACKFILL_ORIGINS", get("BLOTCDN_BACKFILL_ORIGINS"))?,
            hot_cache_bytes: num("BLOTCDN_HOT_CACHE_BYTES", get("BLOTCDN_HOT_CACHE_BYTES"))?,
            max_in_flight: num("BLOTCDN_MAX_IN_FLIGHT", get("BLOTCDN_MAX_IN_FLIGHT"))?,
            max_uploads: num("BLOTCDN_MAX_UPLOADS", get("BLOTCDN_MAX_UPLOADS"))?,
            grpc_memory_bytes: num("BLOTCDN_GRPC_MEMORY_BYTES", get("BLOTCDN_GRPC_MEMORY_BYTES"))?,
            upload_idle_timeout_secs: num("BLOTCDN_UPLOAD_IDLE_TIMEOUT_SECS", get("BLOTCDN_UPLOAD_IDLE_TIMEOUT_SECS"))?,
            max_connections: num("BLOTCDN_MAX_CONNECTIONS", get("BLOTCDN_MAX_CONNECTIONS"))?,
            grpc_max_connections: num("BLOTCDN_GRPC_MAX_CONNECTIONS", get("BLOTCDN_GRPC_MAX_CONNECTIONS"))?,
            grpc_max_connection_age_secs: num(
                "BLOTCDN_GRPC_MAX_CONNECTION_AGE_SECS",
                get("BLOTCDN_GRPC_MAX_CONNECTION_AGE_SECS"),
            )?,
            grpc_max_connection_age_grace_secs: num(
                "BLOTCDN_GRPC_MAX_CONNECTION_AGE_GRACE_SECS",
                get("BLOTCDN_GRPC_MAX_CONNECTION_AGE_GRACE_SECS"),
            )?,
            http_idle_timeout_secs: num("BLOTCDN_HTTP_IDLE_TIMEOUT_SECS", get("BLOTCDN_HTTP_IDLE_TIMEOUT_SECS"))?,
            http_threads: num("BLOTCDN_HTTP_THREADS", get("BLOTCDN_HTTP_THREADS"))?,
            http_slice_us: num("BLOTCDN_HTTP_SLICE_US", get("BLOTCDN_HTTP_SLICE_US"))?,
            recent_change_ms: num("BLOTCDN_RECENT_CHANGE_MS", get("BLOTCDN_RECENT_CHANGE_MS"))?,
            max_fallback_fetches: num("BLOTCDN_MAX_FALLBACK_FETCHES", get("BLOTCDN_MAX_FALLBACK_FETCHES"))?,
            fallback_timeout_secs: num("BLOTCDN_FALLBACK_TIMEOUT_SECS", get("BLOTCDN_FALLBACK_TIMEOUT_SECS"))?,
            purge: list(get("BLOTCDN_PURGE_URLS"))
                .map(|l: Vec<String>| {
                    l.into_iter()
                        .map(|t| match t.split_once('=') {
                            Some((kind, url)) => Ok(PurgeTargetConfig {
                                name: None,
                                kind: kind.trim().to_owned(),
                                url: url.trim().to_owned(),
                                rate_per_sec: None,
                            }),
                            None => Err(ConfigError::Invalid {
                                key: "BLOTCDN_PURGE_URLS".into(),
                                reason: format!("{t:?} is not kind=url, like varnish=http://127.0.0.1:6081/"),
                            }),
                        })
                        .collect::<Result<Vec<_>, _>>()
                })
                .transpose()?,
            purge_on_publish: get("BLOTCDN_PURGE_ON_PUBLISH")
                .map(|v| match v.trim() {
                    "1" | "true" | "yes" | "on" => Ok(true),
                    "0" | "false" | "no" | "off" | "" => Ok(false),
                    other => Err(ConfigError::Invalid {
                        key: "BLOTCDN_PURGE_ON_PUBLISH".into(),
                        reason: format!("{other:?} is not true or false"),
                    }),
                })
                .transpose()?,
            purge_queue_max: num("BLOTCDN_PURGE_QUEUE_MAX", get("BLOTCDN_PURGE_QUEUE_MAX"))?,
            purge_drop_after_secs: num("BLOTCDN_PURGE_DROP_AFTER_SECS", get("BLOTCDN_PURGE_DROP_AFTER_SECS"))?,
            store: get("BLOTCDN_STORE"),
            etcd_endpoints: list(get("BLOTCDN_ETCD_ENDPOINTS")),
            etcd_prefix: get("BLOTCDN_ETCD_PREFIX"),
            peers: list(get("BLOTCDN_PEERS")),
        })
    }

    pub fn from_file(path: &Path) -> Result<Partial, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.into(), message: e.to_string() })
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub blogs_dir: PathBuf,
    pub static_dir: PathBuf,
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub otlp_endpoint: Option<String>,
    /// Without a trailing slash. `None` until the HTTP listener is bound when
    /// not configured: it then defaults to `http://{bound http addr}`.
    pub cdn_base_url: Option<String>,
    pub url_style: crate::domain::UrlStyle,
    pub resolver_tokens: Vec<String>,
    pub publisher_tokens: Vec<String>,
    pub max_batch: usize,
    pub max_asset_bytes: u64,
    pub fallback_origins: Vec<String>,
    pub backfill_origins: usize,
    pub hot_cache_bytes: u64,
    pub max_in_flight: usize,
    pub max_uploads: usize,
    /// `grpc_memory_bytes`.
    pub grpc_memory_bytes: u64,
    pub upload_idle_timeout: std::time::Duration,
    pub max_connections: usize,
    pub grpc_max_connections: usize,
    /// `grpc_max_connection_age_secs`; `None`: never.
    pub grpc_max_connection_age: Option<std::time::Duration>,
    /// `grpc_max_connection_age_grace_secs`.
    pub grpc_max_connection_age_grace: std::time::Duration,
    pub http_idle_timeout: std::time::Duration,
    pub http_threads: usize,
    /// `http_slice_us`; `None`: the kernel's default.
    pub http_slice: Option<std::time::Duration>,
    pub recent_change: std::time::Duration,
    pub max_fallback_fetches: usize,
    pub fallback_timeout: std::time::Duration,
    pub purge: Vec<PurgeTarget>,
    pub purge_on_publish: bool,
    pub purge_queue_max: usize,
    /// `None`: a key an edge refuses is never dropped.
    pub purge_drop_after: Option<std::time::Duration>,
    /// `None`: sled under `{data_dir}/db`; `Some`: cluster mode on etcd.
    pub etcd: Option<EtcdConfig>,
    /// Without trailing slashes.
    pub peers: Vec<String>,
    /// What the start logs as warnings: values taken, but not as written
    /// (each names its key).
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    pub prefix: String,
}

/// Checks the purge targets: known kinds, URLs, unique names, sane rates.
fn purge_targets(list: Vec<PurgeTargetConfig>) -> Result<Vec<PurgeTarget>, ConfigError> {
    let invalid = |reason: String| ConfigError::Invalid { key: "purge".into(), reason };
    let mut out: Vec<PurgeTarget> = Vec::new();
    for t in list {
        let kind = PurgeKind::parse(&t.kind).ok_or_else(|| {
            invalid(format!("unknown kind {:?}: one of varnish, http, bunny, cloudflare, cloudfront", t.kind))
        })?;
        let url = t.url.trim().to_owned();
        let ok_scheme = url.starts_with("http://") || url.starts_with("https://");
        if !ok_scheme || url.parse::<http::Uri>().is_err() {
            return Err(invalid(format!("{url:?} (target {}) is not an http(s) URL", t.kind)));
        }
        let name = match t.name {
            Some(n) => n,
            None => {
                // From what the target is, not where it sits in the list:
                // each target's delivered mark is kept under its name, and
                // a reordered list must not hand one target another's mark.
                let uri: http::Uri = url.parse().expect("checked above");
                let host = uri.host().unwrap_or("").trim_matches(['[', ']']).replace(':', ".");
                let mut n = format!("{}-{host}", kind.as_str());
                if let Some(port) = uri.port_u16() {
                    n.push_str(&format!("-{port}"));
                }
                n.retain(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
                n.truncate(64);
                n
            }
        };
        let name_ok = !name.is_empty()
            && name.len() <= 64
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
        if !name_ok {
            return Err(invalid(format!("name {name:?}: 1 to 64 of A-Z a-z 0-9 - _ .")));
        }
        if out.iter().any(|o| o.name == name) {
            return Err(invalid(format!("two targets are named {name:?} (give each a name)")));
        }
        let rate_per_sec = t.rate_per_sec.unwrap_or(10.0);
        // Below one request a day the wait between two would not fit a
        // timer, and the target would never be sent anything.
        if !(rate_per_sec.is_finite() && rate_per_sec >= MIN_PURGE_RATE) {
            return Err(invalid(format!(
                "rate_per_sec of {name} must be at least {MIN_PURGE_RATE} (one request a day)"
            )));
        }
        out.push(PurgeTarget { name, kind, url, rate_per_sec });
    }
    Ok(out)
}

impl Config {
    /// Defaults → file → environment → flags.
    pub fn load(file: Option<&Path>, env: Partial, flags: Partial) -> Result<Config, ConfigError> {
        let mut p = Partial::default();
        if let Some(f) = file {
            p.overlay(Partial::from_file(f)?);
        }
        p.overlay(env);
        p.overlay(flags);
        Config::from_partial(p)
    }

    pub fn from_partial(p: Partial) -> Result<Config, ConfigError> {
        let invalid = |key: &str, reason: String| ConfigError::Invalid { key: key.into(), reason };
        let addr = |key: &str, v: Option<String>, default: &str| -> Result<SocketAddr, ConfigError> {
            let s = v.unwrap_or_else(|| default.to_owned());
            s.parse().map_err(|_| invalid(key, format!("{s:?} is not an address like 127.0.0.1:8080")))
        };
        let data_dir = p.data_dir.unwrap_or_else(|| PathBuf::from("./data"));
        let blogs_dir = p.blogs_dir.unwrap_or_else(|| data_dir.join("blogs"));
        let static_dir = p.static_dir.unwrap_or_else(|| data_dir.join("static"));
        let cdn_base_url = match p.cdn_base_url {
            Some(u) => {
                let u = u.trim_end_matches('/').to_owned();
                // Credentials would be in every page; none is quoted.
                if u.contains('@') {
                    return Err(invalid(
                        "cdn_base_url",
                        "carries credentials, which every page would show: a base URL is like https://cdn.example.com"
                            .into(),
                    ));
                }
                if !(u.starts_with("http://") || u.starts_with("https://")) || u.len() <= "https://".len() {
                    return Err(invalid("cdn_base_url", format!("{u:?} is not an http(s) URL")));
                }
                // Every URL is this and a path after it: a query or a fragment would
                // end up in the middle of each (and is not quoted: it may hold a token).
                if u.contains(['?', '#']) || u.parse::<http::Uri>().is_err() {
                    let shown = &u[..u.find(['?', '#']).unwrap_or(u.len())];
                    return Err(invalid(
                        "cdn_base_url",
                        format!("{shown:?}…: not a base URL like https://cdn.example.com (no query or fragment)"),
                    ));
                }
                Some(u)
            }
            None => None,
        };
        let url_style = match p.url_style.as_deref().map(str::trim) {
            None | Some("path") => crate::domain::UrlStyle::Path,
            Some("host") => {
                // Host names, not addresses: `{blog}.{host}` must be a name.
                let host = cdn_base_url.as_deref().and_then(|u| u.split_once("://")).map(|(_, h)| h);
                let named = host.is_some_and(|h| {
                    let name = h.rsplit_once(':').map_or(h, |(n, _)| n);
                    !h.contains('/') && name.contains('.') && name.parse::<std::net::IpAddr>().is_err()
                });
                if !named {
                    return Err(invalid(
                        "url_style",
                        "\"host\" needs cdn_base_url to be scheme://host.name[:port] with no path (a host name, not an address)"
                            .into(),
                    ));
                }
                crate::domain::UrlStyle::Host
            }
            Some(other) => return Err(invalid("url_style", format!("{other:?}: expected \"path\" or \"host\""))),
        };
        let max_batch = p.max_batch.unwrap_or(10_000);
        if max_batch == 0 {
            return Err(invalid("max_batch", "must be at least 1".into()));
        }
        let max_asset_bytes = p.max_asset_bytes.unwrap_or(100 * 1024 * 1024);
        if max_asset_bytes == 0 {
            return Err(invalid("max_asset_bytes", "must be at least 1".into()));
        }
        let max_in_flight = p.max_in_flight.unwrap_or(1024);
        if max_in_flight == 0 {
            return Err(invalid("max_in_flight", "must be at least 1".into()));
        }
        let at_least_1 = |key: &str, v: Option<u64>, default: u64| -> Result<u64, ConfigError> {
            match v.unwrap_or(default) {
                0 => Err(invalid(key, "must be at least 1".into())),
                n => Ok(n),
            }
        };
        // Timeouts: from a second to a year. Longer ones would overflow the
        // clock's arithmetic (a panic on the first connection), and mean
        // "never" anyway.
        let seconds = |key: &str, v: Option<u64>, default: u64| -> Result<u64, ConfigError> {
            match at_least_1(key, v, default)? {
                n if n > MAX_TIMEOUT_SECS => {
                    Err(invalid(key, format!("{n}: must be at most {MAX_TIMEOUT_SECS} seconds (a year)")))
                }
                n => Ok(n),
            }
        };
        let max_uploads = at_least_1("max_uploads", p.max_uploads.map(|n| n as u64), 64)? as usize;
        // A budget under one request at the size limit would refuse it.
        let grpc_memory_bytes = match p.grpc_memory_bytes.unwrap_or(DEFAULT_GRPC_MEMORY_BYTES) {
            n if n < MIN_GRPC_MEMORY_BYTES => {
                return Err(invalid(
                    "grpc_memory_bytes",
                    format!("{n}: must be at least {MIN_GRPC_MEMORY_BYTES} (16 MiB, one request at the size limit)"),
                ))
            }
            n => n,
        };
        let upload_idle = seconds("upload_idle_timeout_secs", p.upload_idle_timeout_secs, 30)?;
        let max_connections = at_least_1("max_connections", p.max_connections.map(|n| n as u64), 10_000)? as usize;
        let grpc_max_connections =
            at_least_1("grpc_max_connections", p.grpc_max_connections.map(|n| n as u64), 1024)? as usize;
        let http_idle = seconds("http_idle_timeout_secs", p.http_idle_timeout_secs, 30)?;
        let max_fallback_fetches =
            at_least_1("max_fallback_fetches", p.max_fallback_fetches.map(|n| n as u64), 64)? as usize;
        let fallback_timeout = seconds("fallback_timeout_secs", p.fallback_timeout_secs, 30)?;
        // A thread, a runtime and a listener each: more than a few per core
        // only costs descriptors (past the limit, the origin would not start).
        if let Some(n) = p.http_threads.filter(|&n| n > MAX_HTTP_THREADS) {
            return Err(invalid("http_threads", format!("{n}: must be at most {MAX_HTTP_THREADS}")));
        }
        let http_slice = match p.http_slice_us.unwrap_or(100) {
            0 => None,
            us @ 100..=100_000 => Some(std::time::Duration::from_micros(us)),
            us => {
                return Err(invalid(
                    "http_slice_us",
                    format!("{us}: must be 0 (the kernel's default) or from 100 to 100000 microseconds"),
                ))
            }
        };
        // Asked for, with no origin threads to take it: said, not ignored.
        if p.http_threads == Some(0) && p.http_slice_us.is_some_and(|us| us != 0) {
            return Err(invalid(
                "http_slice_us",
                "applies to the origin threads, and http_threads = 0 has none (the origin runs on the gRPC runtime): \
                 leave http_slice_us unset, or set http_threads"
                    .to_owned(),
            ));
        }
        let fallback_origins: Vec<String> =
            p.fallback_origins.unwrap_or_default().into_iter().map(|o| o.trim_end_matches('/').to_owned()).collect();
        for o in &fallback_origins {
            if !o.get(..7).is_some_and(|s| s.eq_ignore_ascii_case("http://")) {
                return Err(invalid("fallback_origins", format!("{o:?}: only http:// origins are supported")));
            }
            if o.contains(char::is_whitespace) {
                return Err(invalid("fallback_origins", format!("{o:?}: a space in an origin")));
            }
            // The blog's path is put after the origin: a query or fragment
            // would take it in (every path then asked for as one URL), and
            // credentials in it are not sent.
            let why = match url::Url::parse(o) {
                Err(e) => Some(e.to_string()),
                Ok(u) if u.host_str().is_none_or(str::is_empty) => Some("no host".into()),
                Ok(u) if u.query().is_some() || o.contains('?') => Some("a query string (`?…`) is not allowed".into()),
                Ok(u) if u.fragment().is_some() || o.contains('#') => Some("a fragment (`#…`) is not allowed".into()),
                Ok(u) if !u.username().is_empty() || u.password().is_some() => {
                    Some("credentials in the URL are not sent: none are allowed".into())
                }
                Ok(_) => None,
            };
            if let Some(why) = why {
                return Err(invalid("fallback_origins", format!("{o:?}: {why}")));
            }
        }
        let check_tokens = |key: &str, t: Vec<String>| -> Result<Vec<String>, ConfigError> {
            if t.iter().any(|t| t.is_empty() || t.bytes().any(|b| !b.is_ascii_graphic())) {
                return Err(invalid(key, "tokens must be non-empty printable ASCII without spaces".into()));
            }
            Ok(t)
        };
        let etcd = match p.store.as_deref().map(str::trim) {
            None | Some("sled") => None,
            Some("etcd") => {
                let endpoints: Vec<String> = p.etcd_endpoints.unwrap_or_default();
                if endpoints.is_empty() {
                    return Err(invalid(
                        "etcd_endpoints",
                        "store = \"etcd\" needs at least one client URL, like http://127.0.0.1:2379".into(),
                    ));
                }
                for e in &endpoints {
                    if !e.starts_with("http://") || e.parse::<http::Uri>().is_err() {
                        return Err(invalid(
                            "etcd_endpoints",
                            format!("{e:?} is not an http:// client URL like http://127.0.0.1:2379"),
                        ));
                    }
                }
                let prefix = p.etcd_prefix.unwrap_or_else(|| "/blotcdn/".into());
                if prefix.is_empty() {
                    return Err(invalid(
                        "etcd_prefix",
                        "must not be empty (the metadata would share etcd's whole keyspace)".into(),
                    ));
                }
                if !prefix.ends_with('/') {
                    return Err(invalid(
                        "etcd_prefix",
                        format!(
                            "{prefix:?} must end with \"/\" (its keys are the prefix and a name: without the slash \
                             they would run into another prefix's, such as {prefix:?}log/)"
                        ),
                    ));
                }
                if p.purge.as_ref().is_some_and(|t| !t.is_empty()) {
                    return Err(invalid(
                        "purge",
                        "edge purge targets are not available with store = \"etcd\" yet".into(),
                    ));
                }
                Some(EtcdConfig { endpoints, prefix })
            }
            Some(other) => return Err(invalid("store", format!("{other:?}: expected \"sled\" or \"etcd\""))),
        };
        let peers: Vec<String> =
            p.peers.unwrap_or_default().into_iter().map(|o| o.trim_end_matches('/').to_owned()).collect();
        for o in &peers {
            if !o.starts_with("http://") || o.parse::<http::Uri>().is_err() {
                return Err(invalid(
                    "peers",
                    format!("{o:?} is not an http:// origin base URL like http://10.0.0.2:8080"),
                ));
            }
        }
        let mut warnings = Vec::new();
        let backfill_origins = match p.backfill_origins {
            Some(n) if n > fallback_origins.len() => {
                warnings.push(format!(
                    "backfill_origins is {n} but fallback_origins lists {}: the hits of all {} are kept on disk",
                    fallback_origins.len(),
                    fallback_origins.len()
                ));
                fallback_origins.len()
            }
            n => n.unwrap_or(1).min(fallback_origins.len()),
        };
        Ok(Config {
            etcd,
            peers,
            warnings,
            grpc_addr: addr("grpc_addr", p.grpc_addr, "127.0.0.1:50051")?,
            http_addr: addr("http_addr", p.http_addr, "127.0.0.1:8080")?,
            metrics_addr: addr("metrics_addr", p.metrics_addr, "127.0.0.1:9464")?,
            otlp_endpoint: match p.otlp_endpoint.filter(|e| !e.is_empty()) {
                Some(e) => Some(check_otlp_endpoint(e).map_err(|reason| invalid("otlp_endpoint", reason))?),
                None => None,
            },
            data_dir,
            blogs_dir,
            static_dir,
            cdn_base_url,
            url_style,
            resolver_tokens: check_tokens("resolver_tokens", p.resolver_tokens.unwrap_or_default())?,
            publisher_tokens: check_tokens("publisher_tokens", p.publisher_tokens.unwrap_or_default())?,
            max_batch,
            max_asset_bytes,
            backfill_origins,
            fallback_origins,
            hot_cache_bytes: p.hot_cache_bytes.unwrap_or(64 * 1024 * 1024),
            max_in_flight,
            max_uploads,
            grpc_memory_bytes,
            upload_idle_timeout: std::time::Duration::from_secs(upload_idle),
            max_connections,
            grpc_max_connections,
            grpc_max_connection_age: match p.grpc_max_connection_age_secs.unwrap_or(300) {
                0 => None,
                secs => Some(std::time::Duration::from_secs(secs)),
            },
            grpc_max_connection_age_grace: std::time::Duration::from_secs(
                p.grpc_max_connection_age_grace_secs.unwrap_or(300),
            ),
            http_idle_timeout: std::time::Duration::from_secs(http_idle),
            http_slice,
            http_threads: p.http_threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
            recent_change: std::time::Duration::from_millis(p.recent_change_ms.unwrap_or(2000)),
            max_fallback_fetches,
            fallback_timeout: std::time::Duration::from_secs(fallback_timeout),
            purge: {
                let targets = purge_targets(p.purge.unwrap_or_default())?;
                // CloudFront invalidates paths, and host-style URLs carry no
                // blog in theirs: a blog's purge would miss, or take everything.
                if url_style == crate::domain::UrlStyle::Host && targets.iter().any(|t| t.kind == PurgeKind::Cloudfront)
                {
                    return Err(invalid(
                        "purge",
                        "a cloudfront target cannot purge host-style URLs (url_style = \"host\"): use a tag-based CDN"
                            .into(),
                    ));
                }
                targets
            },
            purge_on_publish: p.purge_on_publish.unwrap_or(false),
            purge_queue_max: at_least_1("purge_queue_max", p.purge_queue_max.map(|n| n as u64), 1_000_000)? as usize,
            // 0: never; otherwise a timeout like the others (at most a year).
            purge_drop_after: match p.purge_drop_after_secs.unwrap_or(300) {
                0 => None,
                n => Some(std::time::Duration::from_secs(seconds("purge_drop_after_secs", Some(n), n)?)),
            },
        })
    }

    /// A config for tests and tools: everything under `data_dir`, both
    /// listeners on ephemeral ports.
    pub fn ephemeral(data_dir: &Path) -> Config {
        Config::from_partial(Partial {
            data_dir: Some(data_dir.into()),
            grpc_addr: Some("127.0.0.1:0".into()),
            http_addr: Some("127.0.0.1:0".into()),
            metrics_addr: Some("127.0.0.1:0".into()),
            ..Default::default()
        })
        .expect("defaults are valid")
    }
}

/// An OTLP/gRPC endpoint: `http://host:port`, perhaps with a path. No
/// credentials (a header carries them, `OTEL_EXPORTER_OTLP_HEADERS`: in the
/// URL they would be logged with it), no query or fragment, and no `https`:
/// this build's exporter has no TLS. A refused value is quoted without what
/// may be secret in it.
fn check_otlp_endpoint(e: String) -> Result<String, String> {
    let like = "like http://127.0.0.1:4317";
    let (scheme, rest) = e.split_once("://").unwrap_or(("", &e));
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    // Anywhere: `http:/user:pw@host` (one slash) has its credentials in what looks like a path.
    if e.contains('@') {
        return Err("the URL carries credentials, which would be logged with it: give them as a header in \
                    OTEL_EXPORTER_OTLP_HEADERS"
            .into());
    }
    // Quoted as scheme and host only: a path, a query or a fragment may hold a token.
    let shown = format!("{scheme}{}{}", if scheme.is_empty() { "" } else { "://" }, authority);
    if rest.contains(['?', '#']) {
        return Err(format!("{shown:?}…: an OTLP/gRPC endpoint has no query or fragment"));
    }
    if scheme.eq_ignore_ascii_case("https") {
        return Err(format!(
            "{shown:?}: this build exports traces without TLS; give an http:// endpoint (a collector or agent on a \
             private address)"
        ));
    }
    if !scheme.eq_ignore_ascii_case("http") {
        return Err(format!("{shown:?} is not an http:// URL {like}"));
    }
    let uri: http::Uri = e.parse().map_err(|err| format!("{shown:?} is not a URL {like} ({err})"))?;
    if uri.host().is_none_or(|h| h.is_empty() || h == "[]") {
        return Err(format!("{shown:?} names no host, {like}"));
    }
    // (`Uri::port` is None for a port past 65535, as for none.)
    let port = authority.rsplit_once(':').map(|(_, p)| p).filter(|p| !p.contains(']'));
    if port.is_some_and(|p| !p.bytes().all(|b| b.is_ascii_digit()) || !p.parse::<u16>().is_ok_and(|p| p > 0)) {
        return Err(format!("{shown:?}: the port must be from 1 to 65535"));
    }
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "max_batch = 5\nhttp_addr = \"127.0.0.1:9000\"\ngrpc_addr = \"127.0.0.1:9001\"\n").unwrap();
        let env = Partial::from_env(|k| (k == "BLOTCDN_MAX_BATCH").then(|| "7".to_owned())).unwrap();
        let flags = Partial { grpc_addr: Some("127.0.0.1:9002".into()), ..Default::default() };
        let c = Config::load(Some(&f), env, flags).unwrap();
        assert_eq!(c.max_batch, 7);
        assert_eq!(c.http_addr.port(), 9000);
        assert_eq!(c.grpc_addr.port(), 9002);
        assert_eq!(c.blogs_dir, PathBuf::from("./data/blogs"));
        assert_eq!(c.static_dir, PathBuf::from("./data/static"));
    }

    #[test]
    fn the_example_file_is_valid_and_says_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("blotcdn.example.toml");
        let c = Config::load(Some(&path), Partial::default(), Partial::default()).unwrap();
        let d = Config::from_partial(Partial::default()).unwrap();
        assert_eq!(
            (c.grpc_addr, c.http_addr, c.max_batch, c.max_asset_bytes),
            (d.grpc_addr, d.http_addr, d.max_batch, d.max_asset_bytes)
        );
        assert_eq!((c.hot_cache_bytes, c.max_in_flight, c.data_dir), (d.hot_cache_bytes, d.max_in_flight, d.data_dir));
        assert_eq!(c.http_slice, d.http_slice);
        assert_eq!(c.grpc_max_connection_age, d.grpc_max_connection_age);
        assert_eq!(d.grpc_max_connection_age, Some(std::time::Duration::from_secs(300)));
        assert_eq!(c.grpc_max_connection_age_grace, d.grpc_max_connection_age_grace);
        assert_eq!(d.http_slice, Some(std::time::Duration::from_micros(100)));
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = Partial::from_env(|k| (k == "BLOTCDN_MAX_BATCH").then(|| "lots".to_owned())).unwrap_err();
        assert!(e.to_string().contains("BLOTCDN_MAX_BATCH"), "{e}");
        let e = Config::from_partial(Partial { http_addr: Some("nowhere".into()), ..Default::default() }).unwrap_err();
        assert!(e.to_string().contains("http_addr"), "{e}");
        for (us, ok) in [(0, true), (99, false), (100, true), (100_000, true), (100_001, false)] {
            let c = Config::from_partial(Partial { http_slice_us: Some(us), ..Default::default() });
            match c {
                Ok(c) => assert!(ok, "{us} µs taken as {:?}", c.http_slice),
                Err(e) => assert!(!ok && e.to_string().contains("http_slice_us"), "{us}: {e}"),
            }
        }
        // Past a year, or past what a machine has threads for: refused at
        // start, not a panic on the first connection.
        let too_long = [
            Partial { http_idle_timeout_secs: Some(u64::MAX), ..Default::default() },
            Partial { fallback_timeout_secs: Some(MAX_TIMEOUT_SECS + 1), ..Default::default() },
            Partial { upload_idle_timeout_secs: Some(u64::MAX), ..Default::default() },
        ];
        for (p, key) in
            too_long.into_iter().zip(["http_idle_timeout_secs", "fallback_timeout_secs", "upload_idle_timeout_secs"])
        {
            let e = Config::from_partial(p).unwrap_err();
            assert!(e.to_string().contains(key), "{e}");
        }
        // More origins to keep hits from than there are: taken as all of them, and said.
        let backfill = |n: usize, origins: usize| Partial {
            backfill_origins: Some(n),
            fallback_origins: Some((0..origins).map(|i| format!("http://127.0.0.1:{}", 9000 + i)).collect()),
            ..Default::default()
        };
        let c = Config::from_partial(backfill(3, 2)).unwrap();
        assert_eq!(c.backfill_origins, 2);
        assert!(c.warnings.len() == 1 && c.warnings[0].starts_with("backfill_origins is 3"), "{:?}", c.warnings);
        let c = Config::from_partial(backfill(2, 2)).unwrap();
        assert!(c.backfill_origins == 2 && c.warnings.is_empty(), "{:?}", c.warnings);
        assert!(Config::from_partial(Partial::default()).unwrap().warnings.is_empty());
        let year = Partial { http_idle_timeout_secs: Some(MAX_TIMEOUT_SECS), ..Default::default() };
        assert!(Config::from_partial(year).is_ok());
        let rate = |r: f64| Partial {
            purge: Some(vec![PurgeTargetConfig {
                name: None,
                kind: "http".into(),
                url: "http://127.0.0.1:9/".into(),
                rate_per_sec: Some(r),
            }]),
            ..Default::default()
        };
        let e = Config::from_partial(rate(1e-30)).unwrap_err();
        assert!(e.to_string().contains("rate_per_sec"), "{e}");
        assert!(Config::from_partial(rate(MIN_PURGE_RATE)).is_ok());
        let e = Config::from_partial(Partial { http_threads: Some(100_000), ..Default::default() }).unwrap_err();
        assert!(e.to_string().contains("http_threads"), "{e}");
        let memory = |n| Config::from_partial(Partial { grpc_memory_bytes: Some(n), ..Default::default() });
        let e = memory(MIN_GRPC_MEMORY_BYTES - 1).unwrap_err();
        assert!(e.to_string().contains("grpc_memory_bytes"), "{e}");
        assert_eq!(memory(MIN_GRPC_MEMORY_BYTES).unwrap().grpc_memory_bytes, MIN_GRPC_MEMORY_BYTES);
        let slice_without_threads = |us| Partial { http_threads: Some(0), http_slice_us: us, ..Default::default() };
        let e = Config::from_partial(slice_without_threads(Some(200))).unwrap_err();
        assert!(e.to_string().contains("http_slice_us") && e.to_string().contains("http_threads"), "{e}");
        assert!(Config::from_partial(slice_without_threads(None)).is_ok());
        assert!(Config::from_partial(slice_without_threads(Some(0))).is_ok());
        // An OTLP endpoint the exporter cannot use is refused at start, naming the key
        // (a malformed one panicked with a message about Tokio), and one with
        // credentials, which the start's log line would show.
        let otlp = |e: &str| Config::from_partial(Partial { otlp_endpoint: Some(e.into()), ..Default::default() });
        for (bad, says) in [
            ("http://[::1", "not a URL"),
            ("grpc://127.0.0.1:4317", "not an http:// URL"),
            ("http://127.0.0.1:99999", "port"),
            ("http://127.0.0.1:0", "port"),
            ("http://127.0.0.1:+4317", "port"),
            ("http://:4317", "names no host"),
            ("https://collector.example:4317", "without TLS"),
            ("http://127.0.0.1:4317/?secret", "no query"),
            ("http://127.0.0.1:4317/#secret", "no query or fragment"),
            ("http://user:secret@127.0.0.1:4317", "credentials"),
            // Refused for something else, a secret in it is not shown either.
            ("user:secret@127.0.0.1:4317", "credentials"),
            ("grpc://u:secret@127.0.0.1:4317", "credentials"),
            ("http://u:secret@[::1", "credentials"),
            ("http:/user:secret@127.0.0.1:4317", "credentials"),
            ("http//user:secret@h:4317", "credentials"),
            ("http://127.0.0.1:99999/secret", "port"),
        ] {
            let e = otlp(bad).unwrap_err().to_string();
            assert!(e.contains("otlp_endpoint") && e.contains(says), "{bad}: {e}");
            assert!(!e.contains("secret"), "{e}");
        }
        for good in
            ["http://127.0.0.1:4317", "HTTP://otel:4317", "http://[::1]:4317", "http://otel", "http://otel:4317/v1"]
        {
            assert_eq!(otlp(good).unwrap().otlp_endpoint.as_deref(), Some(good));
        }
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "max_bach = 5\n").unwrap();
        let e = Config::load(Some(&f), Partial::default(), Partial::default()).unwrap_err();
        assert!(e.to_string().contains("max_bach"), "{e}");
    }

    #[test]
    fn cluster_keys_are_checked_and_name_the_key() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            Partial::from_env(|k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())).unwrap()
        };
        let err = |vars| Config::from_partial(env(vars)).unwrap_err().to_string();
        assert!(err(&[("BLOTCDN_STORE", "etcd")]).contains("etcd_endpoints"));
        assert!(err(&[("BLOTCDN_STORE", "zookeeper")]).contains("store"));
        assert!(
            err(&[("BLOTCDN_STORE", "etcd"), ("BLOTCDN_ETCD_ENDPOINTS", "127.0.0.1:2379")]).contains("etcd_endpoints")
        );
        assert!(err(&[("BLOTCDN_PEERS", "10.0.0.2:8080")]).contains("peers"));
        let both = &[
            ("BLOTCDN_STORE", "etcd"),
            ("BLOTCDN_ETCD_ENDPOINTS", "http://127.0.0.1:2379"),
            ("BLOTCDN_PURGE_URLS", "varnish=http://127.0.0.1:6081/"),
        ];
        assert!(err(both).contains("purge"));
        let c = Config::from_partial(env(&[
            ("BLOTCDN_STORE", "etcd"),
            ("BLOTCDN_ETCD_ENDPOINTS", "http://127.0.0.1:2379, http://127.0.0.1:2380"),
            ("BLOTCDN_PEERS", "http://10.0.0.2:8080/"),
        ]))
        .unwrap();
        let etcd = c.etcd.unwrap();
        assert_eq!(etcd.endpoints, ["http://127.0.0.1:2379", "http://127.0.0.1:2380"]);
        assert_eq!(etcd.prefix, "/blotcdn/");
        assert_eq!(c.peers, ["http://10.0.0.2:8080"]);
        assert!(Config::from_partial(Partial::default()).unwrap().etcd.is_none(), "sled stays the default");
    }
}
