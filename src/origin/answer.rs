//! Conditional requests, ranges and headers: the one place a file answer is
//! made (`respond`), and where a kept blog file's usual answer reuses the
//! headers it made (`respond_kept`).

use std::fs::Metadata;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode};

use super::hot::HotFile;
use super::{empty, full, large, Body};

/// What a file answer is made of, from a blog's folder, the CAS or the hot cache.
pub(super) struct FileAnswer {
    pub(super) content_type: HeaderValue,
    pub(super) etag: HeaderValue,
    pub(super) last_modified: HeaderValue,
    pub(super) modified: SystemTime,
    pub(super) len: u64,
    /// `len` as a header value, when made beforehand.
    pub(super) length: Option<HeaderValue>,
    pub(super) cache: &'static str,
    pub(super) blog: HeaderValue,
    /// A permanent asset's own purge key, `{blog}/{hash}`, carried next to the blog's.
    pub(super) asset_key: Option<String>,
    pub(super) cors: bool,
    /// A file changed just now (`recent_change_ms`): its validators must
    /// never match the file's later answers (a cache revalidating a torn
    /// read after the window would otherwise get a 304 that makes it
    /// immutable), so its ETag is its own and it has no Last-Modified.
    pub(super) recent: bool,
    pub(super) source: Source,
}

/// A blog file found: kept in memory (answered with `respond_kept`, which
/// may copy its usual headers), or its answer's parts. (Not boxed: it is
/// moved twice, and a box would be an allocation per answer from disk.)
#[allow(clippy::large_enum_variant)]
pub(super) enum Found {
    Kept(Arc<HotFile>, &'static str),
    Parts(FileAnswer),
}

pub(super) enum Source {
    Bytes(Bytes),
    /// A file too large to keep, and its metadata when it was opened.
    File(std::fs::File, Metadata),
}

pub(super) fn content_type(name: &str) -> HeaderValue {
    let mime = mime_guess::from_path(name).first_or_octet_stream();
    let s = mime.essence_str();
    let needs_charset = s.starts_with("text/") || s == "application/javascript" || s == "application/json";
    if needs_charset {
        HeaderValue::from_str(&format!("{s}; charset=utf-8")).expect("mime is header-safe")
    } else {
        HeaderValue::from_str(s).expect("mime is header-safe")
    }
}

/// The `Content-Type` an origin gave a file named `name` that is worth
/// keeping with its copy in the static folder: `Ok(None)` when it says
/// nothing the name's extension does not (the same media type, or none to
/// speak of), and `Err` (why) when it says another type but cannot be kept
/// as it was answered (bytes other than visible ASCII, or longer than
/// [`crate::blogfs::MAX_KEPT_TYPE`]): such a copy is not made, since it
/// would be answered as another type than the origin's.
pub(crate) fn type_to_keep(given: &HeaderValue, name: &str) -> Result<Option<String>, String> {
    let text = String::from_utf8_lossy(given.as_bytes());
    let s = text.trim();
    let essence = s.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    if !essence.contains('/') || matches!(essence.as_str(), "application/octet-stream" | "binary/octet-stream") {
        return Ok(None);
    }
    // Any of the types the extension goes by says the same, and so does
    // another name of one of them (`application/javascript` for `.js`,
    // which mime_guess names `text/javascript` alone).
    let essence = same_type_as(&essence).unwrap_or(&essence);
    let named = mime_guess::from_path(name);
    if named.iter().any(|m| m.essence_str() == essence) || named.first_or_octet_stream().essence_str() == essence {
        return Ok(None);
    }
    if given.to_str().is_err() {
        return Err(format!("{s:?} is not visible ASCII alone"));
    }
    if s.len() > crate::blogfs::MAX_KEPT_TYPE {
        return Err(format!("is {} bytes, more than the {} a copy keeps", s.len(), crate::blogfs::MAX_KEPT_TYPE));
    }
    Ok(Some(s.to_owned()))
}

/// The type a media type is another name of, where buckets commonly use the
/// other name: RFC 9239 makes `text/javascript` the one name of JavaScript
/// and the rest obsolete; `image/jpg` and `image/pjpeg` are JPEG.
fn same_type_as(essence: &str) -> Option<&'static str> {
    Some(match essence {
        "application/javascript"
        | "application/x-javascript"
        | "application/ecmascript"
        | "text/ecmascript"
        | "text/x-javascript" => "text/javascript",
        "image/jpg" | "image/pjpeg" => "image/jpeg",
        _ => return None,
    })
}

/// Fonts are the one kind browsers refuse cross-origin without CORS.
pub(super) fn cors_for(name: &str) -> bool {
    let ext = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()).unwrap_or_default();
    matches!(ext.as_str(), "woff" | "woff2" | "ttf" | "otf" | "eot")
}

pub(super) fn cors_for_type(content_type: &str) -> bool {
    content_type.starts_with("font/")
        || matches!(content_type, "application/font-woff" | "application/vnd.ms-fontobject" | "application/x-font-ttf")
}

/// The file's ETag: its length and change time. Not its modification time,
/// which a sync tool sets back (`rsync -t`, `cp -p`, an older version
/// restored): a file of the same length written that way would revalidate
/// with a 304 and keep the old bytes in every cache. The change time moves
/// with every write and rename, and nothing sets it. `recent`: inside the
/// `recent_change_ms` window, where it must never equal the ETag of any
/// later answer.
pub(super) fn file_etag(meta: &Metadata, recent: bool) -> HeaderValue {
    use std::os::unix::fs::MetadataExt;
    let suffix = if recent { "-recent" } else { "" };
    let s = format!("\"{:x}-{:x}-{:x}{suffix}\"", meta.len(), meta.ctime(), meta.ctime_nsec());
    HeaderValue::from_str(&s).expect("hex is header-safe")
}

/// The file's Last-Modified: the later of its modification and change
/// times, so that a file written with an older modification time kept
/// (see [`file_etag`]) still reads as newer to `If-Modified-Since`; and
/// never later than now (RFC 9110 8.8.2.1): a modification time set in the
/// future would otherwise stay the answer's date after the bytes change,
/// and every `If-Modified-Since` of it would get a 304.
pub(super) fn last_modified(meta: &Metadata) -> SystemTime {
    let changed = crate::blogfs::changed_at(meta);
    meta.modified().map_or(changed, |m| m.max(changed)).min(SystemTime::now())
}

pub(super) fn http_date(t: SystemTime) -> HeaderValue {
    HeaderValue::from_str(&httpdate::fmt_http_date(t)).expect("dates are header-safe")
}

/// Purge-key headers, named once (a name from a string is looked up among
/// the standard ones on every use otherwise).
const SURROGATE_KEY: HeaderName = HeaderName::from_static("surrogate-key");
const CACHE_TAG: HeaderName = HeaderName::from_static("cache-tag");
const CDN_TAG: HeaderName = HeaderName::from_static("cdn-tag");

/// The answer to a GET or HEAD of a kept blog file. Its usual answer (whole,
/// no validator asked about) copies the headers `respond` made when it was
/// kept; any other is made by `respond`.
pub(super) fn respond_kept(method: &Method, h: &HeaderMap, file: Arc<HotFile>, cache: &'static str) -> Response<Body> {
    let usual = !h.contains_key(header::RANGE)
        && !h.contains_key(header::IF_NONE_MATCH)
        && !h.contains_key(header::IF_MODIFIED_SINCE);
    if let (true, Some(head)) = (usual, file.head(cache)) {
        let mut r = Response::new(full(file.bytes()));
        *r.headers_mut() = head;
        return r;
    }
    respond(method, h, file.answer(cache, file.tag.clone()))
}

/// The answer to a GET or HEAD of a file, whose request headers are `h`.
pub(super) fn respond(method: &Method, h: &HeaderMap, mut a: FileAnswer) -> Response<Body> {
    let mut r = Response::new(empty());
    // Room for every header below at once, instead of growing twice.
    *r.headers_mut() = HeaderMap::with_capacity(12);
    {
        let out = r.headers_mut();
        out.insert(header::CACHE_CONTROL, HeaderValue::from_static(a.cache));
        out.insert(header::ETAG, a.etag.clone());
        if !a.recent {
            out.insert(header::LAST_MODIFIED, a.last_modified.clone());
        }
        // The purge keys, in each edge's header: Varnish and Fastly read
        // `Surrogate-Key` (space-separated), Cloudflare `Cache-Tag` and Bunny
        // `CDN-Tag` (comma-separated).
        match &a.asset_key {
            None => {
                out.insert(SURROGATE_KEY, a.blog.clone());
                out.insert(CACHE_TAG, a.blog.clone());
                out.insert(CDN_TAG, a.blog.clone());
            }
            Some(key) => {
                let blog = a.blog.to_str().unwrap_or_default();
                let both =
                    |sep| HeaderValue::from_str(&format!("{blog}{sep}{key}")).expect("ids and hex are header-safe");
                out.insert(SURROGATE_KEY, both(" "));
                let tags = both(",");
                out.insert(CACHE_TAG, tags.clone());
                out.insert(CDN_TAG, tags);
            }
        }
        if a.cors {
            out.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
        }
    }
    if not_modified(h, &a) {
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        return r;
    }
    let out = r.headers_mut();
    out.insert(header::CONTENT_TYPE, a.content_type.clone());
    out.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    let range = match h.get(header::RANGE) {
        Some(v) if if_range_ok(h, &a) => parse_range(v.as_bytes(), a.len),
        _ => RangeAnswer::Whole,
    };
    let (start, len) = match range {
        RangeAnswer::Whole => (0, a.len),
        RangeAnswer::Part(s, e) => {
            *r.status_mut() = StatusCode::PARTIAL_CONTENT;
            let cr = format!("bytes {s}-{e}/{}", a.len);
            r.headers_mut().insert(header::CONTENT_RANGE, HeaderValue::from_str(&cr).expect("digits"));
            (s, e - s + 1)
        }
        RangeAnswer::Unsatisfiable => {
            *r.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
            let cr = format!("bytes */{}", a.len);
            let out = r.headers_mut();
            out.insert(header::CONTENT_RANGE, HeaderValue::from_str(&cr).expect("digits"));
            out.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
            return r;
        }
    };
    let length = match (range, a.length.take()) {
        (RangeAnswer::Whole, Some(whole)) => whole,
        _ => HeaderValue::from(len),
    };
    r.headers_mut().insert(header::CONTENT_LENGTH, length);
    *r.body_mut() = match a.source {
        Source::Bytes(b) => full(b.slice(start as usize..(start + len) as usize)),
        // HEAD: no body (the caller drops it anyway), so nothing is read.
        Source::File(..) if method == Method::HEAD => empty(),
        Source::File(f, opened) => large::body(f, &opened, start, len),
    };
    r
}

/// Whether an `If-None-Match` value names `etag` (weak or strong) or is `*`:
/// the answer is a 304, with no body.
pub(super) fn none_match(inm: &HeaderValue, etag: &str) -> bool {
    let Ok(s) = inm.to_str() else { return false };
    s.split(',').map(str::trim).any(|t| t == "*" || t.trim_start_matches("W/") == etag)
}

fn not_modified(h: &HeaderMap, a: &FileAnswer) -> bool {
    if let Some(inm) = h.get(header::IF_NONE_MATCH) {
        return none_match(inm, a.etag.to_str().unwrap_or(""));
    }
    // No Last-Modified was sent inside the window: a date is no validator.
    if a.recent {
        return false;
    }
    if let Some(ims) = h.get(header::IF_MODIFIED_SINCE).and_then(|v| v.to_str().ok()) {
        if let Ok(since) = httpdate::parse_http_date(ims) {
            let secs = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            return secs(a.modified) <= secs(since);
        }
    }
    false
}

/// `If-Range`: honour the range only if the validator still matches.
fn if_range_ok(h: &HeaderMap, a: &FileAnswer) -> bool {
    match h.get(header::IF_RANGE) {
        None => true,
        Some(v) => v == a.etag || (!a.recent && v == a.last_modified),
    }
}

#[derive(Debug, PartialEq, Eq)]
enum RangeAnswer {
    Whole,
    /// Inclusive bounds.
    Part(u64, u64),
    Unsatisfiable,
}

/// One `bytes=` range. Several ranges, or a malformed header, get the whole
/// file (a server may ignore Range); a range past the end gets 416.
fn parse_range(v: &[u8], len: u64) -> RangeAnswer {
    let Some(spec) = std::str::from_utf8(v).ok().and_then(|s| s.trim().strip_prefix("bytes=")) else {
        return RangeAnswer::Whole;
    };
    if spec.contains(',') {
        return RangeAnswer::Whole;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeAnswer::Whole;
    };
    // A number too large for u64 is still a number, past any file's end.
    let num = |s: &str| -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
            None
        } else {
            Some(s.parse().unwrap_or(u64::MAX))
        }
    };
    match (a.is_empty(), b.is_empty()) {
        (true, false) => match num(b) {
            Some(0) => RangeAnswer::Unsatisfiable,
            Some(_) if len == 0 => RangeAnswer::Unsatisfiable,
            Some(n) => RangeAnswer::Part(len.saturating_sub(n), len - 1),
            None => RangeAnswer::Whole,
        },
        (false, _) => {
            let Some(start) = num(a) else {
                return RangeAnswer::Whole;
            };
            let end = if b.is_empty() { Some(u64::MAX) } else { num(b) };
            let Some(end) = end else {
                return RangeAnswer::Whole;
            };
            if end < start {
                return RangeAnswer::Whole;
            }
            if start >= len {
                return RangeAnswer::Unsatisfiable;
            }
            RangeAnswer::Part(start, end.min(len - 1))
        }
        (true, true) => RangeAnswer::Whole,
    }
}

#[cfg(test)]
mod tests {
    use super::super::{IMMUTABLE, SHORT};
    use super::*;

    /// A kept blog file's usual answer copies headers made when it was kept:
    /// they must be those `respond` makes from scratch, for either
    /// Cache-Control, and any request the copy does not fit (a validator, a
    /// range) must still be answered from scratch.
    #[test]
    fn a_kept_files_usual_answer_has_the_headers_made_from_scratch() {
        let hv = HeaderValue::from_static;
        let modified = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        let file = HotFile::new(hv("text/css"), hv("\"e1\""), modified, true, hv("blog1"));
        let kept = Arc::new(file.with_bytes(Bytes::from_static(b"body{color:red}")).with_head());
        let get = HeaderMap::new();
        for cache in [IMMUTABLE, SHORT] {
            let made = respond(&Method::GET, &get, kept.answer(cache, kept.tag.clone()));
            let copied = respond_kept(&Method::GET, &get, kept.clone(), cache);
            assert_eq!(copied.headers(), made.headers(), "{cache}");
            assert_eq!(copied.headers()[header::CACHE_CONTROL], cache);
            assert_eq!(copied.headers()[header::CONTENT_LENGTH], "15");
            assert_eq!(copied.headers()["surrogate-key"], "blog1");
        }
        let asking = |name: HeaderName, value: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(name, hv(value));
            respond_kept(&Method::GET, &h, kept.clone(), IMMUTABLE)
        };
        let r = asking(header::IF_NONE_MATCH, "\"e1\"");
        assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
        assert!(r.headers().get(header::CONTENT_LENGTH).is_none());
        let r = asking(header::IF_MODIFIED_SINCE, "Wed, 15 Nov 2023 00:00:00 GMT");
        assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
        let r = asking(header::RANGE, "bytes=0-3");
        assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
        assert_eq!(r.headers()[header::CONTENT_LENGTH], "4");
    }

    /// A type is kept only where the extension would not give it: any of
    /// the types an extension goes by (`.js`: `text/javascript` and
    /// `application/javascript`) says the same, as do the octet-stream
    /// types, which say nothing.
    #[test]
    fn a_type_is_kept_only_where_the_extension_says_otherwise() {
        let keep = |t: &'static str, name| type_to_keep(&HeaderValue::from_static(t), name).unwrap();
        assert_eq!(keep("application/javascript", "app.js"), None);
        assert_eq!(keep("text/javascript; charset=utf-8", "app.js"), None);
        assert_eq!(keep("IMAGE/JPEG", "a.jpg"), None);
        assert_eq!(keep("image/jpeg", "a.jpeg"), None);
        assert_eq!(keep("image/jpg", "a.jpg"), None);
        assert_eq!(keep("application/x-javascript", "a.js"), None);
        assert_eq!(keep("application/javascript", "a.css").as_deref(), Some("application/javascript"));
        assert_eq!(keep("application/octet-stream", "notes"), None);
        assert_eq!(keep("binary/octet-stream", "a.png"), None);
        assert_eq!(keep("", "a.png"), None);
        assert_eq!(keep("nonsense", "a.png"), None, "no slash: not a type");
        assert_eq!(keep("text/plain", "app.js").as_deref(), Some("text/plain"));
        assert_eq!(keep("image/png", "photo").as_deref(), Some("image/png"), "no extension");
        assert_eq!(keep("text/html; charset=utf-8", "page.txt").as_deref(), Some("text/html; charset=utf-8"));
        // Another type that cannot be kept as answered: said, so the copy is not made.
        let max = crate::blogfs::MAX_KEPT_TYPE;
        let long: &'static str = format!("text/x-{}", "a".repeat(max)).leak();
        let e = type_to_keep(&HeaderValue::from_static(long), "notes").unwrap_err();
        assert!(e.contains(&format!("more than the {max}")), "{e}");
        let just: &'static str = format!("text/x-{}", "a".repeat(max - 7)).leak();
        assert_eq!(keep(just, "notes").as_deref(), Some(just));
        let obs = HeaderValue::from_bytes(b"image/x-\xe9t\xe9").unwrap();
        assert!(type_to_keep(&obs, "tmb").unwrap_err().contains("not visible ASCII"));
        // The extension's own type, whatever its parameters: nothing to keep.
        let long_css: &'static str = format!("text/css; x={}", "a".repeat(max)).leak();
        assert_eq!(keep(long_css, "a.css"), None);
        let obs_css = HeaderValue::from_bytes(b"text/css; x=\xe9").unwrap();
        assert_eq!(type_to_keep(&obs_css, "a.css"), Ok(None));
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range(b"bytes=0-9", 100), RangeAnswer::Part(0, 9));
        assert_eq!(parse_range(b"bytes=90-", 100), RangeAnswer::Part(90, 99));
        assert_eq!(parse_range(b"bytes=-10", 100), RangeAnswer::Part(90, 99));
        assert_eq!(parse_range(b"bytes=-1000", 100), RangeAnswer::Part(0, 99));
        assert_eq!(parse_range(b"bytes=50-5000", 100), RangeAnswer::Part(50, 99));
        assert_eq!(parse_range(b"bytes=100-", 100), RangeAnswer::Unsatisfiable);
        assert_eq!(parse_range(b"bytes=-0", 100), RangeAnswer::Unsatisfiable);
        assert_eq!(parse_range(b"bytes=0-1,5-6", 100), RangeAnswer::Whole);
        assert_eq!(parse_range(b"bytes=9-1", 100), RangeAnswer::Whole);
        assert_eq!(parse_range(b"items=0-1", 100), RangeAnswer::Whole);
        assert_eq!(parse_range(b"bytes=99999999999999999999-", 100), RangeAnswer::Unsatisfiable);
        assert_eq!(parse_range(b"bytes=18446744073709551615-", 100), RangeAnswer::Unsatisfiable);
        assert_eq!(parse_range(b"bytes=0-99999999999999999999", 100), RangeAnswer::Part(0, 99));
        assert_eq!(parse_range(b"bytes=-99999999999999999999", 100), RangeAnswer::Part(0, 99));
    }
}
