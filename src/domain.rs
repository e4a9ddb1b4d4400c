//! The words of DESIGN.md as types: blog ids, blog paths, cache ids, content
//! hashes and domains, each validated once when parsed, plus URL building and
//! parsing. Pure: no I/O, no clock, no store. Everything past this module can
//! trust a `BlogPath` never escapes its blog's folder by its spelling.

use std::borrow::Cow;
use std::fmt;

use percent_encoding::{percent_decode_str, AsciiSet, NON_ALPHANUMERIC};

/// Longest blog path accepted, in bytes, leading `/` included.
pub const MAX_PATH_BYTES: usize = 1024;
/// Longest blog id accepted.
pub const MAX_BLOG_ID_BYTES: usize = 64;
/// Longest file name kept for a permanent asset.
pub const MAX_FILENAME_BYTES: usize = 255;

/// Why a value from outside was refused. The message names the value's kind
/// and what was wrong with it, so a caller can fix the request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidInput {
    #[error("invalid blog id {0:?}: expected 1 to 64 characters from [A-Za-z0-9_-]")]
    BlogId(String),
    #[error("invalid path {path:?}: {reason}")]
    Path { path: String, reason: &'static str },
    #[error("invalid cache id {0:?}: expected a decimal u64 without leading zeros")]
    CacheId(String),
    #[error("invalid content hash {0:?}: expected 32 lowercase hex characters")]
    Hash(String),
    #[error("invalid domain {domain:?}: {reason}")]
    Domain { domain: String, reason: &'static str },
    #[error("invalid filename {name:?}: {reason}")]
    Filename { name: String, reason: &'static str },
}

/// At most 120 bytes of `s` (whole characters), for a message.
pub fn truncated(s: &str) -> String {
    // Error messages echo input; keep them short when the input is huge.
    if s.len() <= 120 {
        return s.to_owned();
    }
    let mut end = 120;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// `[A-Za-z0-9_-]{1,64}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlogId(Box<str>);

impl BlogId {
    pub fn parse(s: &str) -> Result<Self, InvalidInput> {
        let ok = !s.is_empty()
            && s.len() <= MAX_BLOG_ID_BYTES
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if ok {
            Ok(BlogId(s.into()))
        } else {
            Err(InvalidInput::BlogId(truncated(s)))
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for BlogId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A blog-relative file path: starts with `/`, segments separated by `/`,
/// none empty, `.` or `..`; no backslash, no NUL; at most 1024 bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlogPath(Box<str>);

impl BlogPath {
    /// Parses a path as a renderer or the publish pipeline spells it. A
    /// missing leading `/` is added.
    pub fn parse(s: &str) -> Result<Self, InvalidInput> {
        Ok(BlogPath(Self::validate(s)?.into()))
    }

    /// Checks a path without allocating unless a leading `/` must be added;
    /// the resolve path uses this for every item of a batch.
    pub fn validate(s: &str) -> Result<Cow<'_, str>, InvalidInput> {
        let bad = |reason| InvalidInput::Path { path: truncated(s), reason };
        let p: Cow<'_, str> = if s.starts_with('/') { Cow::Borrowed(s) } else { Cow::Owned(format!("/{s}")) };
        if p.len() > MAX_PATH_BYTES {
            return Err(bad("longer than 1024 bytes"));
        }
        // One pass over the bytes: every rule is about ASCII bytes, which
        // never occur inside a multi-byte UTF-8 character.
        let b = p.as_bytes();
        let mut seg_start = 1;
        for i in 1..=b.len() {
            let c = if i < b.len() { b[i] } else { b'/' };
            match c {
                0 => return Err(bad("contains a NUL byte")),
                b'\\' => return Err(bad("contains a backslash")),
                b'/' => {
                    match &b[seg_start..i] {
                        [] => return Err(bad("has an empty segment")),
                        [b'.'] | [b'.', b'.'] => return Err(bad("has a '.' or '..' segment")),
                        _ => {}
                    }
                    seg_start = i + 1;
                }
                _ => {}
            }
        }
        Ok(p)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Segments, without the leading `/`.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.0[1..].split('/')
    }

    /// The last segment.
    pub fn file_name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or("")
    }

    /// True when some segment starts with `.`: such files are never served.
    pub fn is_hidden(&self) -> bool {
        self.segments().any(|s| s.starts_with('.'))
    }

    /// Parses the path part of a URL, from a slash on, as
    /// [`BlogPath::from_url_segments`] parses its segments.
    pub fn from_url_path(s: &str) -> Result<Self, InvalidInput> {
        // Nothing to decode: the path is its own decoding (one allocation,
        // of the final size, where decoding segment by segment takes two).
        if s.starts_with('/') && !s.contains('%') {
            return Self::parse(s);
        }
        Self::from_url_segments(s.strip_prefix('/').unwrap_or(s).split('/'))
    }

    /// Parses the segments of a URL's path: each is percent-decoded exactly
    /// once. A segment that decodes to something holding `/` (`%2F`), invalid
    /// UTF-8, or a path that would be refused by [`BlogPath::parse`] is refused.
    pub fn from_url_segments<'a>(segs: impl Iterator<Item = &'a str>) -> Result<Self, InvalidInput> {
        let mut out = String::with_capacity(64);
        for seg in segs {
            let decoded = percent_decode_str(seg)
                .decode_utf8()
                .map_err(|_| InvalidInput::Path { path: truncated(seg), reason: "percent-decodes to invalid UTF-8" })?;
            if decoded.contains('/') {
                return Err(InvalidInput::Path { path: truncated(seg), reason: "has an encoded slash" });
            }
            out.push('/');
            out.push_str(&decoded);
        }
        if out.is_empty() {
            return Err(InvalidInput::Path { path: String::new(), reason: "is empty" });
        }
        BlogPath::parse(&out)
    }
}

impl fmt::Display for BlogPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Cache ids are decimal u64s; per blog strictly increasing.
pub type CacheId = u64;

/// The next cache id of a blog: `max(now in ms, last + 1)`.
pub fn next_cache_id(now_ms: u64, last: CacheId) -> CacheId {
    now_ms.max(last.saturating_add(1))
}

/// Parses a cache id from a URL segment: decimal digits, no sign, no leading
/// zero (so one id has one spelling, and one cache entry at the edge).
pub fn parse_cache_id(s: &str) -> Result<CacheId, InvalidInput> {
    let ok =
        !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit()) && !(s.len() > 1 && s.starts_with('0'));
    // Digits folded by hand: the origin parses one per request, and `parse`
    // checks again what was checked above.
    let n = ok.then(|| s.bytes().try_fold(0u64, |n, b| n.checked_mul(10)?.checked_add(u64::from(b - b'0')))).flatten();
    n.ok_or_else(|| InvalidInput::CacheId(truncated(s)))
}

/// The first 128 bits of an asset's BLAKE3 hash.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContentHash(pub [u8; 16]);

impl ContentHash {
    pub fn of(hash: &blake3::Hash) -> Self {
        let mut b = [0u8; 16];
        b.copy_from_slice(&hash.as_bytes()[..16]);
        ContentHash(b)
    }

    pub fn parse(s: &str) -> Result<Self, InvalidInput> {
        let err = || InvalidInput::Hash(truncated(s));
        if s.len() != 32 {
            return Err(err());
        }
        let mut out = [0u8; 16];
        let bytes = s.as_bytes();
        for (i, o) in out.iter_mut().enumerate() {
            let hi = hex_val(bytes[2 * i]).ok_or_else(err)?;
            let lo = hex_val(bytes[2 * i + 1]).ok_or_else(err)?;
            *o = (hi << 4) | lo;
        }
        Ok(ContentHash(out))
    }

    /// 32 lowercase hex characters.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(32);
        for b in self.0 {
            s.push(HEX[(b >> 4) as usize] as char);
            s.push(HEX[(b & 15) as usize] as char);
        }
        s
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

impl fmt::Debug for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentHash({})", self.to_hex())
    }
}

impl fmt::Display for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// The host of a base URL (`cdn_base_url`): lower case, without a final dot.
pub fn base_host(base_url: &str) -> Option<String> {
    let u = base_url.parse::<http::Uri>().ok()?;
    let host = u.host()?.to_ascii_lowercase();
    Some(host.strip_suffix('.').unwrap_or(&host).to_owned())
}

/// A custom domain: lower-cased, IDNA-normalised (punycode) host name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Domain(Box<str>);

impl Domain {
    pub fn parse(s: &str) -> Result<Self, InvalidInput> {
        let bad = |reason| InvalidInput::Domain { domain: truncated(s), reason };
        let trimmed = s.trim().strip_suffix('.').unwrap_or(s.trim());
        if trimmed.is_empty() {
            return Err(bad("is empty"));
        }
        if trimmed.contains(':') || trimmed.contains('/') {
            return Err(bad("must be a bare host name, without scheme, port or path"));
        }
        let ascii = idna::domain_to_ascii(trimmed).map_err(|_| bad("is not a valid IDNA host name"))?;
        if ascii.len() > 253 {
            return Err(bad("is longer than 253 characters"));
        }
        let labels: Vec<&str> = ascii.split('.').collect();
        if labels.len() < 2 {
            return Err(bad("needs at least two labels, like example.com"));
        }
        for l in &labels {
            if l.is_empty() || l.len() > 63 {
                return Err(bad("has an empty label or one over 63 characters"));
            }
            if !l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
                return Err(bad("has characters outside letters, digits and '-'"));
            }
            if l.starts_with('-') || l.ends_with('-') {
                return Err(bad("has a label that starts or ends with '-'"));
            }
        }
        if labels.last().is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit())) {
            return Err(bad("looks like an IP address, not a host name"));
        }
        Ok(Domain(ascii.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A permanent asset's file name, as it appears as the last URL segment.
/// Must be a valid single path segment that is not hidden.
pub fn parse_filename(name: &str) -> Result<String, InvalidInput> {
    let bad = |reason| InvalidInput::Filename { name: truncated(name), reason };
    if name.is_empty() {
        return Err(bad("is empty"));
    }
    if name.len() > MAX_FILENAME_BYTES {
        return Err(bad("is longer than 255 bytes"));
    }
    if name.contains(['/', '\\', '\0']) {
        return Err(bad("contains '/', '\\' or NUL"));
    }
    if name.starts_with('.') {
        return Err(bad("starts with '.'"));
    }
    Ok(name.to_owned())
}

/// RFC 3986 unreserved characters stay; everything else is percent-encoded.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Appends `seg` percent-encoded as one URL path segment (uppercase hex).
pub fn push_encoded_segment(out: &mut String, seg: &str) {
    for part in percent_encoding::utf8_percent_encode(seg, SEGMENT) {
        out.push_str(part);
    }
}

/// Appends a validated blog path, each segment encoded, `/` between segments kept.
pub fn push_encoded_path(out: &mut String, path: &str) {
    // Most paths need no escape at all: copy them in one go.
    if path.bytes().all(|b| b == b'/' || is_unreserved(b)) {
        out.push_str(path);
        return;
    }
    for seg in path[1..].split('/') {
        out.push('/');
        push_encoded_segment(out, seg);
    }
}

/// Where the blog id goes in a URL (DESIGN.md, `url_style`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UrlStyle {
    /// `{base}/{blog}/…`, the default.
    Path,
    /// `{scheme}://{blog}.{host}/…`, for blogs whose id is a DNS label; the
    /// others keep path-style URLs.
    Host,
}

impl UrlStyle {
    pub fn as_str(self) -> &'static str {
        match self {
            UrlStyle::Path => "path",
            UrlStyle::Host => "host",
        }
    }
}

/// A blog id that can be a host name's first label: 1 to 63 of lowercase
/// letters, digits and `-`, not at either end.
pub fn is_dns_label(blog: &str) -> bool {
    (1..=63).contains(&blog.len())
        && !blog.starts_with('-')
        && !blog.ends_with('-')
        && blog.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Appends `{base}/{blog}` in path style, or `{scheme}://{blog}.{host}` in
/// host style (`base` then has no path).
fn push_blog_base(url: &mut String, base: &str, blog: &str, style: UrlStyle) {
    if style == UrlStyle::Host && is_dns_label(blog) {
        if let Some((scheme, host)) = base.split_once("://") {
            url.push_str(scheme);
            url.push_str("://");
            url.push_str(blog);
            url.push('.');
            url.push_str(host);
            return;
        }
    }
    url.push_str(base);
    url.push('/');
    url.push_str(blog);
}

/// `{base}/{blog}/{cache_id}{encoded path}` (or its host-style form).
pub fn versioned_url(base: &str, style: UrlStyle, blog: &str, cache_id: CacheId, path: &str) -> String {
    let mut url = String::with_capacity(base.len() + blog.len() + path.len() + 32);
    push_blog_base(&mut url, base, blog, style);
    url.push('/');
    url.push_str(itoa::Buffer::new().format(cache_id));
    push_encoded_path(&mut url, path);
    url
}

/// `{base}/{blog}/_assets/{hash}/{filename}` (or its host-style form).
pub fn permanent_url(base: &str, style: UrlStyle, blog: &str, hash: &ContentHash, filename: &str) -> String {
    let mut url = String::with_capacity(base.len() + blog.len() + filename.len() + 48);
    push_blog_base(&mut url, base, blog, style);
    url.push_str("/_assets/");
    url.push_str(&hash.to_hex());
    url.push('/');
    push_encoded_segment(&mut url, filename);
    url
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn design_example() {
        let p = BlogPath::parse("style.css").unwrap();
        assert_eq!(
            versioned_url("https://blotcdn.com", UrlStyle::Path, "443d398b03", 1700000000000, p.as_str()),
            "https://blotcdn.com/443d398b03/1700000000000/style.css"
        );
        assert_eq!(
            versioned_url("https://blotcdn.com", UrlStyle::Host, "443d398b03", 1700000000000, p.as_str()),
            "https://443d398b03.blotcdn.com/1700000000000/style.css"
        );
        // An id that cannot be a host label keeps the path style.
        assert_eq!(
            versioned_url("https://blotcdn.com", UrlStyle::Host, "Blog_1", 17, p.as_str()),
            "https://blotcdn.com/Blog_1/17/style.css"
        );
        let h = ContentHash([0xab; 16]);
        assert_eq!(
            permanent_url("http://cdn.test:8080", UrlStyle::Host, "b1", &h, "a b.png"),
            format!("http://b1.cdn.test:8080/_assets/{h}/a%20b.png")
        );
        let p = BlogPath::parse("/a b/ü.png").unwrap();
        let mut s = String::new();
        push_encoded_path(&mut s, p.as_str());
        assert_eq!(s, "/a%20b/%C3%BC.png");
    }

    #[test]
    fn paths_refused_with_reason() {
        for (p, why) in [
            ("/a/../b", "'..'"),
            ("/a/./b", "'.'"),
            ("/a//b", "empty"),
            ("/a/", "empty"),
            ("/", "empty"),
            ("", "empty"),
            ("/a\\b", "backslash"),
            ("/a\0b", "NUL"),
        ] {
            let e = BlogPath::parse(p).unwrap_err().to_string();
            assert!(e.contains(why), "{p:?}: {e}");
        }
        assert!(BlogPath::parse(&"a".repeat(1024)).is_err());
        assert!(BlogPath::parse(&"a".repeat(1023)).is_ok());
    }

    /// A URL's path parses the same taken whole or segment by segment, with
    /// or without anything to percent-decode.
    #[test]
    fn url_paths() {
        for url in [
            "/a.css",
            "/dir/a b.css",
            "/caf%C3%A9/menu.css",
            "/a%20b.css",
            "/",
            "/a//b",
            "/a/../b",
            "/a/%2E%2E/b",
            "/a%2Fb",
            "/%FF.css",
            "/a\\b",
        ] {
            let whole = BlogPath::from_url_path(url).map(|p| p.as_str().to_owned()).map_err(|e| e.to_string());
            let segs = BlogPath::from_url_segments(url[1..].split('/'))
                .map(|p| p.as_str().to_owned())
                .map_err(|e| e.to_string());
            assert_eq!(whole, segs, "{url}");
        }
        assert_eq!(BlogPath::from_url_path("/caf%C3%A9/menu.css").unwrap().as_str(), "/café/menu.css");
        assert!(BlogPath::from_url_path("/a/%2E%2E/b").is_err());
    }

    #[test]
    fn cache_ids() {
        assert_eq!(parse_cache_id("0"), Ok(0));
        assert_eq!(parse_cache_id("18446744073709551615"), Ok(u64::MAX));
        for bad in ["", "01", "+1", "-1", "18446744073709551616", "1e3", " 1"] {
            assert!(parse_cache_id(bad).is_err(), "{bad}");
        }
        assert_eq!(next_cache_id(5, 10), 11);
        assert_eq!(next_cache_id(50, 10), 50);
        assert_eq!(next_cache_id(0, u64::MAX), u64::MAX);
    }

    #[test]
    fn domains() {
        assert_eq!(Domain::parse("Example.COM.").unwrap().as_str(), "example.com");
        assert_eq!(Domain::parse("bücher.de").unwrap().as_str(), "xn--bcher-kva.de");
        for bad in ["", "localhost", "a..b", "-a.com", "http://a.com", "a.com:443", "1.2.3.4", "a_b.com"] {
            assert!(Domain::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hashes() {
        let h = ContentHash::of(&blake3::hash(b"hello"));
        assert_eq!(ContentHash::parse(&h.to_hex()), Ok(h));
        assert!(ContentHash::parse(&h.to_hex().to_uppercase()).is_err());
        assert!(ContentHash::parse("abc").is_err());
    }
}
