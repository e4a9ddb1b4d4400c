//! How a purge reaches each kind of edge: the request each provider
//! documents, built from a batch of keys, and what its answer means.
//!
//! - `varnish`: `BAN {url}` with `Surrogate-Key: k1 k2 …` (`edge/varnish.vcl`
//!   bans objects carrying any of them);
//! - `http`: `POST {url}` with `{"keys": [...]}`;
//! - `bunny`: `POST {url}` (`https://api.bunny.net/pullzone/{id}/purgeCache`)
//!   with `{"CacheTag": key}` and the `AccessKey` header, one key a request;
//! - `cloudflare`: `POST {url}` (`https://api.cloudflare.com/client/v4/zones/{zone}/purge_cache`)
//!   with `{"tags": [...]}` and a bearer token, at most 30 tags a request;
//! - `cloudfront`: `POST {url}` (`https://cloudfront.amazonaws.com/2020-05-31/distribution/{id}/invalidation`)
//!   with an `InvalidationBatch` of paths, signed with SigV4 (`aws-sigv4`).
//!   CloudFront invalidates paths, not tags: a blog key becomes
//!   `/{blog}/*`, an asset key `/{blog}/_assets/{hash}/*`.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, StatusCode};
use http_body_util::Full;
use hyper_util::client::legacy::Client;

use crate::config::{PurgeKind, PurgeTarget};

/// Where each kind reads its credentials.
pub const BUNNY_KEY: &str = "BUNNY_API_KEY";
pub const CLOUDFLARE_TOKEN: &str = "CLOUDFLARE_API_TOKEN";

/// One request's deadline, answer included, at first: doubled after each
/// request the target did not answer in time, up to [`LAST_DEADLINE`]. An
/// edge that bans but answers late would otherwise be sent the same purge
/// for ever.
pub const FIRST_DEADLINE: Duration = Duration::from_secs(10);
pub const LAST_DEADLINE: Duration = Duration::from_secs(80);

enum Credentials {
    None,
    Header(&'static str, HeaderValue),
    Aws { key_id: String, secret: String, token: Option<String> },
}

/// A configured target with its credentials, ready to build requests.
pub struct Target {
    pub cfg: PurgeTarget,
    creds: Credentials,
}

/// What one request came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Sent,
    /// Try again: after `after` when the edge said so (`Retry-After`).
    Retry {
        error: String,
        after: Option<Duration>,
        throttled: bool,
        /// No answer within the request's deadline.
        late: bool,
        /// The edge failed on what the request holds (a 500), not for being
        /// down or busy: one of its keys may be the cause.
        keyed: bool,
    },
    /// The edge refuses this request as it is (a 4xx other than 408 and
    /// 429): sending it again would fail again.
    Rejected {
        error: String,
        /// For its size (413, 414, 431): fewer keys at once may pass.
        too_large: bool,
    },
}

impl Target {
    /// Reads the target's credentials through `env`; a missing one is an
    /// error naming the variable.
    pub fn new(cfg: PurgeTarget, env: impl Fn(&str) -> Option<String>) -> Result<Target, String> {
        let need = |var: &str| {
            env(var).filter(|v| !v.is_empty()).ok_or_else(|| {
                format!("purge target {} ({}) needs the environment variable {var}", cfg.name, cfg.kind.as_str())
            })
        };
        let header = |name: &'static str, value: String| {
            HeaderValue::from_str(&value)
                .map(|v| Credentials::Header(name, v))
                .map_err(|_| format!("purge target {}: the credential is not a valid header value", cfg.name))
        };
        let creds = match cfg.kind {
            PurgeKind::Varnish | PurgeKind::Http => Credentials::None,
            PurgeKind::Bunny => header("accesskey", need(BUNNY_KEY)?)?,
            PurgeKind::Cloudflare => header("authorization", format!("Bearer {}", need(CLOUDFLARE_TOKEN)?))?,
            PurgeKind::Cloudfront => Credentials::Aws {
                key_id: need("AWS_ACCESS_KEY_ID")?,
                secret: need("AWS_SECRET_ACCESS_KEY")?,
                token: env("AWS_SESSION_TOKEN").filter(|t| !t.is_empty()),
            },
        };
        Ok(Target { cfg, creds })
    }

    /// Keys one request carries at most.
    pub fn max_keys(&self) -> usize {
        match self.cfg.kind {
            PurgeKind::Varnish => 64,
            PurgeKind::Http => 100,
            PurgeKind::Bunny => 1,
            PurgeKind::Cloudflare => 30,
            // Each key is a wildcard path; CloudFront allows 15 of those in progress.
            PurgeKind::Cloudfront => 15,
        }
    }

    /// Bytes of keys one request carries at most: Varnish reads them from
    /// one header (its default limit on a header is 8 KiB).
    pub fn max_bytes(&self) -> usize {
        match self.cfg.kind {
            PurgeKind::Varnish => 4000,
            _ => 64 << 10,
        }
    }

    /// The request that purges `keys` (at most [`Target::max_keys`]).
    pub fn request(&self, keys: &[Arc<str>], now: SystemTime) -> Result<Request<Full<Bytes>>, String> {
        let json = |v: serde_json::Value| ("application/json", v.to_string());
        let strs: Vec<&str> = keys.iter().map(|k| &**k).collect();
        let (method, body) = match self.cfg.kind {
            PurgeKind::Varnish => (Method::from_bytes(b"BAN").expect("a token"), None),
            PurgeKind::Http => (Method::POST, Some(json(serde_json::json!({ "keys": strs })))),
            PurgeKind::Bunny => (Method::POST, Some(json(serde_json::json!({ "CacheTag": strs[0] })))),
            PurgeKind::Cloudflare => (Method::POST, Some(json(serde_json::json!({ "tags": strs })))),
            PurgeKind::Cloudfront => (Method::POST, Some(("text/xml", self.invalidation_batch(keys, now)))),
        };
        let mut b = Request::builder().method(method).uri(&self.cfg.url);
        if self.cfg.kind == PurgeKind::Varnish {
            b = b.header("surrogate-key", keys.join(" "));
        }
        if let Some((ct, _)) = &body {
            b = b.header(header::CONTENT_TYPE, *ct);
        }
        if let Credentials::Header(name, value) = &self.creds {
            b = b.header(*name, value.clone());
        }
        let body = body.map(|(_, b)| Bytes::from(b)).unwrap_or_default();
        let mut req = b.body(Full::new(body.clone())).map_err(|e| format!("cannot build the request: {e}"))?;
        if let Credentials::Aws { key_id, secret, token } = &self.creds {
            sign_v4(&mut req, &body, key_id, secret, token.as_deref(), now)?;
        }
        Ok(req)
    }

    /// CloudFront's `CreateInvalidation` body: one path per key, deduplicated.
    fn invalidation_batch(&self, keys: &[Arc<str>], now: SystemTime) -> String {
        let mut paths: Vec<String> = Vec::new();
        for k in keys {
            let p = match k.split_once('/') {
                Some((blog, hash)) if hash.len() == 32 && hash.bytes().all(|b| b.is_ascii_hexdigit()) => {
                    format!("/{blog}/_assets/{hash}/*")
                }
                Some((blog, _)) => format!("/{blog}/*"),
                None => format!("/{k}/*"),
            };
            if !paths.contains(&p) {
                paths.push(p);
            }
        }
        let nanos = now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let mut x = String::from(r#"<?xml version="1.0" encoding="UTF-8"?>"#);
        x.push_str(r#"<InvalidationBatch xmlns="http://cloudfront.amazonaws.com/doc/2020-05-31/">"#);
        x.push_str(&format!("<Paths><Quantity>{}</Quantity><Items>", paths.len()));
        // Keys are checked ([A-Za-z0-9_-/]): nothing to escape.
        for p in &paths {
            x.push_str(&format!("<Path>{p}</Path>"));
        }
        x.push_str(&format!("</Items></Paths><CallerReference>blotcdn-{}-{nanos}</CallerReference>", self.cfg.name));
        x.push_str("</InvalidationBatch>");
        x
    }
}

/// Signs a CloudFront request (a global service: region `us-east-1`).
fn sign_v4(
    req: &mut Request<Full<Bytes>>,
    body: &[u8],
    key_id: &str,
    secret: &str,
    token: Option<&str>,
    now: SystemTime,
) -> Result<(), String> {
    use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
    let creds = aws_credential_types::Credentials::new(key_id, secret, token.map(str::to_owned), None, "environment");
    let identity = creds.into();
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region("us-east-1")
        .name("cloudfront")
        .time(now)
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| format!("cannot sign the request: {e}"))?
        .into();
    let headers: Vec<(&str, &str)> =
        req.headers().iter().filter_map(|(k, v)| Some((k.as_str(), v.to_str().ok()?))).collect();
    let uri = req.uri().to_string();
    let signable = SignableRequest::new(req.method().as_str(), uri, headers.into_iter(), SignableBody::Bytes(body))
        .map_err(|e| format!("cannot sign the request: {e}"))?;
    let (instructions, _) = sign(signable, &params).map_err(|e| format!("cannot sign the request: {e}"))?.into_parts();
    instructions.apply_to_request_http1x(req);
    Ok(())
}

pub type HttpClient = Client<crate::outbound::Https, Full<Bytes>>;

/// One client for every target: HTTP or HTTPS, kept-alive connections.
pub fn client() -> HttpClient {
    crate::outbound::client(Duration::from_secs(5), 8)
}

/// How much of a target's answer is read.
const ANSWER_READ: usize = 64 * 1024;

/// Sends one request and reads what its answer means. Cloudflare and Bunny
/// answer errors with a 4xx or 5xx; Cloudflare's `"success": false` in a
/// 200 is an error too.
pub async fn send(client: &HttpClient, req: Request<Full<Bytes>>, kind: PurgeKind, deadline: Duration) -> Outcome {
    let fut = async {
        let resp = client.request(req).await.map_err(|e| {
            use std::error::Error;
            let mut msg = e.to_string();
            let mut src = e.source();
            while let Some(s) = src {
                msg = format!("{msg}: {s}");
                src = s.source();
            }
            msg
        })?;
        let status = resp.status();
        let retry_after = resp.headers().get(header::RETRY_AFTER).and_then(|v| v.to_str().ok()).and_then(retry_after);
        // What an answer says fits in its first 64 KiB (Cloudflare's JSON,
        // an error page); a target that sends more, or never stops, must
        // not fill the server's memory.
        let body = crate::outbound::body_prefix(resp.into_body(), ANSWER_READ).await?;
        Ok::<_, String>((status, retry_after, body))
    };
    let (status, after, body) = match tokio::time::timeout(deadline, fut).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Outcome::error(e),
        Err(_) => {
            let error = format!("no answer within {} s", deadline.as_secs());
            return Outcome::Retry { error, after: None, throttled: false, late: true, keyed: false };
        }
    };
    let cloudflare_failed = kind == PurgeKind::Cloudflare
        && serde_json::from_slice::<serde_json::Value>(&body).is_ok_and(|v| v.get("success") == Some(&false.into()));
    if status.is_success() && !cloudflare_failed {
        return Outcome::Sent;
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(200)]).trim().to_owned();
    let error = format!("{status} {text}").trim().to_owned();
    // Only what says the request itself is wrong: credentials, permissions,
    // a missing route or an ACL (401, 403, 404, 405) can be fixed on the
    // edge's side and are retried. CloudFront answers 400 when too many
    // invalidations are in progress: that is a wait, not a refusal.
    let malformed = matches!(status.as_u16(), 400 | 413 | 414 | 422 | 431);
    let busy = String::from_utf8_lossy(&body).contains("TooManyInvalidationsInProgress")
        || String::from_utf8_lossy(&body).contains("<Code>Throttling</Code>");
    if malformed && !busy {
        return Outcome::Rejected { error, too_large: matches!(status.as_u16(), 413 | 414 | 431) };
    }
    let throttled = status == StatusCode::TOO_MANY_REQUESTS;
    Outcome::Retry { error, after, throttled, late: false, keyed: status == StatusCode::INTERNAL_SERVER_ERROR }
}

impl Outcome {
    /// Not sent, for a reason of our side or the network's: tried again.
    pub fn error(error: String) -> Outcome {
        Outcome::Retry { error, after: None, throttled: false, late: false, keyed: false }
    }
}

/// `Retry-After`: seconds, or an HTTP date.
fn retry_after(v: &str) -> Option<Duration> {
    if let Ok(secs) = v.trim().parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(v.trim()).ok()?;
    Some(when.duration_since(SystemTime::now()).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(kind: PurgeKind, url: &str) -> PurgeTarget {
        PurgeTarget { name: "t".into(), kind, url: url.into(), rate_per_sec: 10.0 }
    }

    #[test]
    fn credentials_come_from_the_environment() {
        let e = Target::new(target(PurgeKind::Bunny, "http://x/"), |_| None).err().unwrap();
        assert!(e.contains("BUNNY_API_KEY"), "{e}");
        let e = Target::new(target(PurgeKind::Cloudfront, "http://x/"), |_| None).err().unwrap();
        assert!(e.contains("AWS_ACCESS_KEY_ID"), "{e}");
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        assert_eq!(retry_after("3"), Some(Duration::from_secs(3)));
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(30));
        assert!(retry_after(&later).unwrap() > Duration::from_secs(25));
        assert_eq!(retry_after("soon"), None);
    }
}
