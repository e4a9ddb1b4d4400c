//! Which blog and which route a request names: by its path, its `Host`
//! (host-style URLs, custom domains) or the TLS edge's mark; the metric
//! label it is counted under; the answers that need no file (`/healthz`,
//! `/_ask`).

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use std::time::SystemTime;

use super::{empty, plain, Body, Origin, NO_STORE};
use crate::config::Config;
use crate::domain::{parse_cache_id, BlogId, BlogPath, CacheId, Domain};

impl Origin {
    /// The blog a request names by its host, if it does: `{blog}.{cdn
    /// host}` with host-style URLs (host-style blog ids are lower case), or
    /// a custom domain mapped to a blog. A custom domain is its blog's own
    /// site, so it never serves another blog's files. The host is the
    /// authority of an absolute-form target (`GET http://b.cdn/…`, where RFC
    /// 9112 has the Host header ignored), else the `Host` header; any port,
    /// and the dot of a fully qualified name, left out; case-insensitive.
    fn blog_from_host<'a>(&self, req: &'a Request<Incoming>) -> Option<std::borrow::Cow<'a, str>> {
        let host = bare_host(match req.uri().authority() {
            Some(a) => a.host(),
            None => req.headers().get(header::HOST)?.to_str().ok()?,
        });
        if let Some(blog) = self.blog_under_cdn_host(host) {
            return Some(blog);
        }
        self.blog_of_domain(host).map(std::borrow::Cow::Owned)
    }

    /// Whether `host` (bare) is the CDN's own name, or with host-style URLs
    /// a name under it.
    fn is_cdn_name(&self, host: &str) -> bool {
        self.cdn_host.as_deref().is_some_and(|c| c.eq_ignore_ascii_case(host))
            || self.blog_under_cdn_host(host).is_some()
    }

    /// The blog a custom domain (a bare host, see [`bare_host`]) maps to:
    /// not the CDN's own names, nor what cannot be a domain (an address, a
    /// single label), which are looked up no further; case-insensitive.
    fn blog_of_domain(&self, host: &str) -> Option<String> {
        // Path style (or host style), with no look-up.
        // An address's last label is all digits; a domain's may end in one
        // (`Domain::parse` takes `test.a1`, and the edge's ask says yes).
        let address = host.rsplit('.').next().is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()));
        if self.is_cdn_name(host) || !host.contains('.') || address {
            return None;
        }
        let store = self.catalog.store();
        let blog = match host.bytes().any(|b| b.is_ascii_uppercase()) {
            true => store.lookup_domain(&host.to_ascii_lowercase()),
            false => store.lookup_domain(host),
        }?;
        Some(blog.to_string())
    }

    /// `{blog}` of `{blog}.{cdn host}`, with host-style URLs.
    fn blog_under_cdn_host<'a>(&self, host: &'a str) -> Option<std::borrow::Cow<'a, str>> {
        let suffix = self.host_suffix.as_deref()?;
        let cut = host.len().checked_sub(suffix.len())?;
        let (label, rest) = (host.get(..cut)?, host.get(cut..)?);
        if !rest.eq_ignore_ascii_case(suffix) {
            return None;
        }
        let label = match label.bytes().any(|b| b.is_ascii_uppercase()) {
            true => std::borrow::Cow::Owned(label.to_ascii_lowercase()),
            false => std::borrow::Cow::Borrowed(label),
        };
        crate::domain::is_dns_label(&label).then_some(label)
    }

    pub async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        use tracing::Instrument;
        // `{blog}.{cdn host}/…` and `{custom domain}/…` are `/{blog}/…`:
        // found once, used for the label and the routing. A request the TLS
        // edge marks with the domain it holds a certificate for is that
        // domain's, or nobody's (a domain removed since).
        // The CDN's own names (one edge may hold both), or no SNI at all:
        // routed by the request as usual.
        let edge_domain = req
            .headers()
            .get(EDGE_DOMAIN)
            .map(|d| bare_host(d.to_str().unwrap_or("-")))
            .filter(|d| !d.is_empty() && !self.is_cdn_name(d));
        let (in_host, unmapped) = match edge_domain {
            Some(d) => match self.blog_of_domain(d) {
                Some(blog) => (Some(format!("/{blog}{}", req.uri().path())), false),
                None => (None, true),
            },
            None => (self.blog_from_host(&req).map(|blog| format!("/{blog}{}", req.uri().path())), false),
        };
        let route = route_label(in_host.as_deref().unwrap_or(req.uri().path()));
        let head = req.method() == Method::HEAD;
        // Debug level: enabled only when traces are exported.
        let span = tracing::debug_span!(
            "http",
            http.route = crate::metrics::ROUTES[route],
            http.method = req.method().as_str(),
            http.status_code = tracing::field::Empty,
            bytes = tracing::field::Empty,
            source = tracing::field::Empty,
            otel.kind = "server"
        );
        crate::telemetry::remote_parent(&span, req.headers());
        let mut resp = if req.method() != Method::GET && !head {
            let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, NO_STORE, "only GET and HEAD\n");
            r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            r
        } else if !req.uri().path().starts_with('/') {
            // `GET *`, or a bare authority (`GET x.y`): no path to route, on any host
            // (a custom domain's blog would be asked for nothing, and its origins for
            // their root).
            plain(StatusCode::BAD_REQUEST, NO_STORE, "the request target is not a path\n")
        } else if req.headers().get_all(EDGE_DOMAIN).iter().nth(1).is_some() {
            // As two Host headers: which one a cache in front keys on is anyone's guess.
            plain(StatusCode::BAD_REQUEST, NO_STORE, "more than one X-Blotcdn-Domain header\n")
        } else if unmapped && !matches!(req.uri().path(), "/healthz" | "/_ask") {
            plain(StatusCode::NOT_FOUND, NO_STORE, "unknown domain\n")
        } else {
            let mut resp = self.route(&req, in_host.as_deref()).instrument(span.clone()).await;
            if head {
                // Same headers, Content-Length included; no body.
                *resp.body_mut() = empty();
            }
            resp
        };
        if edge_domain.is_some() {
            // Answered by the header, not the Host and target alone: a cache
            // in front that keys on those (as edge/varnish.vcl did) must
            // not hand this answer to a request without it, which a reader
            // can send as well as the TLS edge.
            resp.headers_mut().insert(header::VARY, HeaderValue::from_static("X-Blotcdn-Domain"));
        }
        let len = resp.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        self.counters.request(route, resp.status(), len.filter(|n| *n > 0 && !head));
        span.record("http.status_code", resp.status().as_u16());
        span.record("bytes", if head { 0 } else { len.unwrap_or(0) });
        resp
    }

    /// `in_host`: the path with the blog the `Host` names, for host-style
    /// URLs and custom domains.
    async fn route(&self, req: &Request<Incoming>, in_host: Option<&str>) -> Response<Body> {
        // Two could name two blogs (RFC 9112: answer 400); an edge keying
        // its cache on the other one would keep one blog's bytes under the
        // other's name.
        if req.headers().get_all(header::HOST).iter().nth(1).is_some() {
            return plain(StatusCode::BAD_REQUEST, NO_STORE, "more than one Host header\n");
        }
        let path = req.uri().path();
        match path {
            "/healthz" => {
                return match self.catalog.store().health() {
                    Ok(()) => plain(StatusCode::OK, NO_STORE, "ok\n"),
                    Err(e) => {
                        tracing::error!(error = %e, "health check failed");
                        plain(StatusCode::SERVICE_UNAVAILABLE, NO_STORE, format!("store unavailable: {e}\n"))
                    }
                }
            }
            "/_ask" => return self.ask(req.uri().query().unwrap_or("")),
            _ => {}
        }
        let path = in_host.unwrap_or(path);
        let path = path.strip_prefix('/').unwrap_or(path);
        let (first, second, rest) = cut_twice(path);
        let Ok(blog) = BlogId::parse(first) else {
            return self.fallback(req, None).await;
        };
        // What follows the blog, and what follows the segment after it, each
        // from its slash on.
        let after_blog = &path[first.len()..];
        let after_second = &after_blog[second.map_or(0, |s| 1 + s.len())..];
        let version = second.filter(|_| rest.is_some()).and_then(version_segment);
        match (second, rest, version) {
            (Some("_assets"), Some(rest), _) => {
                let mut segs = rest.split('/');
                let hash = segs.next().unwrap_or("");
                let names: Vec<&str> = segs.collect();
                self.asset(req, &blog, hash, &names).await
            }
            (_, _, Some(cache_id)) => match BlogPath::from_url_path(after_second) {
                Ok(p) => self.versioned(req, &blog, cache_id, &p, after_blog).await,
                Err(_) => plain(StatusCode::BAD_REQUEST, NO_STORE, "invalid path\n"),
            },
            // `/{blog}/{path}`: an unversioned (legacy) URL. Local disk, then
            // the fallback origins.
            (Some(_), _, None) => match BlogPath::from_url_path(after_blog) {
                Ok(p) => self.unversioned(req, &blog, &p).await,
                Err(_) => plain(StatusCode::BAD_REQUEST, NO_STORE, "invalid path\n"),
            },
            (None, _, _) => self.fallback(req, None).await,
        }
    }

    fn ask(&self, query: &str) -> Response<Body> {
        let domain = query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == "domain")
            .map(|(_, v)| percent_encoding::percent_decode_str(v).decode_utf8_lossy().into_owned());
        let Some(domain) = domain else {
            return plain(StatusCode::BAD_REQUEST, NO_STORE, "missing ?domain=\n");
        };
        match Domain::parse(&domain) {
            Ok(d) if self.catalog.store().lookup_domain(d.as_str()).is_some() => {
                plain(StatusCode::OK, NO_STORE, "ok\n")
            }
            Ok(_) => plain(StatusCode::NOT_FOUND, NO_STORE, "unknown domain\n"),
            Err(_) => plain(StatusCode::BAD_REQUEST, NO_STORE, "invalid domain\n"),
        }
    }
}

/// A host as the routes compare it: any port, and the dot of a fully
/// qualified name, left out.
fn bare_host(host: &str) -> &str {
    let host = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    host.strip_suffix('.').unwrap_or(host)
}

pub(super) fn cdn_host(config: &Config) -> Option<String> {
    crate::domain::base_host(config.cdn_base_url.as_deref()?)
}

/// Set by the TLS edge for custom domains (`edge/Caddyfile`) to the name
/// of the certificate the connection was made for (its SNI): the request is
/// that domain's blog's, whatever its Host or target says.
const EDGE_DOMAIN: &str = "x-blotcdn-domain";

/// An index into [`crate::metrics::ROUTES`].
fn route_label(path: &str) -> usize {
    match path {
        "/healthz" => return 0,
        "/_ask" => return 1,
        _ => {}
    }
    match cut_twice(path.trim_start_matches('/')) {
        (_, Some("_assets"), Some(_)) => 2,
        (_, Some(id), Some(_)) if version_segment(id).is_some() => 3,
        (_, Some(p), _) if !p.is_empty() => 4,
        _ => 5,
    }
}

/// The cache id a URL's segment after the blog names, if it names one: a
/// cache id is a time in milliseconds (`max(now, last + 1)`), so none is
/// below [`MIN_CACHE_ID`] (September 2001). A shorter number is a folder
/// of the blog's (`/2016/05/post`, `/2016/photo.jpg`): before, any digits
/// were taken for a cache id, and `/{blog}/2016/photo.jpg` served the
/// blog's `/photo.jpg`.
fn version_segment(s: &str) -> Option<CacheId> {
    if s.len() < 13 {
        return None;
    }
    parse_cache_id(s).ok().filter(|id| *id >= MIN_CACHE_ID)
}

/// Whether `id` is more than a day ahead of this clock: no cache id (ids
/// are given at most a little ahead of the clock of the node that gave
/// them), but a folder (an ISBN-13, `/9780306406157/`, names the year
/// 2280). Asked only of an id the blog's path has not reached.
pub(super) fn ahead_of_clock(id: CacheId) -> bool {
    let now_ms = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    id > now_ms + 86_400_000
}

/// The least cache id the origin reads as one (10^12 ms after 1970).
const MIN_CACHE_ID: CacheId = 1_000_000_000_000;

/// `s` cut at its first two slashes: the part before the first, the part
/// between them, and the rest. A byte loop: these are short, and
/// `str::split` costs more than the scan (measured per request).
fn cut_twice(s: &str) -> (&str, Option<&str>, Option<&str>) {
    let slash = |from: usize| s.as_bytes()[from..].iter().position(|&b| b == b'/').map(|i| from + i);
    let Some(a) = slash(0) else { return (s, None, None) };
    match slash(a + 1) {
        Some(b) => (&s[..a], Some(&s[a + 1..b]), Some(&s[b + 1..])),
        None => (&s[..a], Some(&s[a + 1..]), None),
    }
}
