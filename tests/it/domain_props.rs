//! Properties of paths and URLs: every valid path survives URL building and
//! parsing back unchanged; no invalid path is accepted.

use blotcdn::domain::{versioned_url, BlogPath, UrlStyle};
use proptest::prelude::*;

fn segment() -> impl Strategy<Value = String> {
    // Any characters but the separators and NUL, including %, spaces, and
    // non-ASCII; `.` and `..` alone are excluded by the filter.
    proptest::string::string_regex("[^/\\\\\\x00]{1,24}").unwrap().prop_filter("not . or ..", |s| s != "." && s != "..")
}

fn valid_path() -> impl Strategy<Value = String> {
    proptest::collection::vec(segment(), 1..8)
        .prop_map(|segs| format!("/{}", segs.join("/")))
        .prop_filter("at most 1024 bytes", |p| p.len() <= 1024)
}

/// An independent statement of the rules, to check the parser against.
fn is_valid(p: &str) -> bool {
    let p = if p.starts_with('/') { p.to_owned() } else { format!("/{p}") };
    p.len() <= 1024
        && !p.contains('\0')
        && !p.contains('\\')
        && p[1..].split('/').all(|s| !s.is_empty() && s != "." && s != "..")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn valid_paths_round_trip_through_urls(p in valid_path(), id in any::<u64>()) {
        let path = BlogPath::parse(&p).unwrap();
        prop_assert_eq!(path.as_str(), p.as_str());
        let url = versioned_url("https://blotcdn.com", UrlStyle::Path, "blog_1", id, path.as_str());
        let prefix = format!("https://blotcdn.com/blog_1/{id}/");
        prop_assert!(url.starts_with(&prefix));
        let rest = &url[prefix.len()..];
        // Only unreserved characters, '%' escapes and '/' survive encoding.
        prop_assert!(rest.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~%/".contains(&b)), "{}", rest);
        let back = BlogPath::from_url_segments(rest.split('/')).unwrap();
        prop_assert_eq!(back, path);
    }

    #[test]
    fn parse_agrees_with_the_rules(s in "[a./\\\\\\x00é%]{0,12}") {
        prop_assert_eq!(BlogPath::parse(&s).is_ok(), is_valid(&s), "{:?}", s);
    }

    #[test]
    fn invalid_spellings_are_refused(p in valid_path(), bad in prop_oneof![
        Just("/.."), Just("/."), Just("//"), Just("\\"), Just("\0"), Just("/../x"), Just("/./x"),
    ]) {
        let s = format!("{p}{bad}");
        prop_assert!(BlogPath::parse(&s).is_err(), "{:?} accepted", s);
    }

    #[test]
    fn overlong_paths_are_refused(n in 1025usize..3000) {
        prop_assert!(BlogPath::parse(&"a".repeat(n - 1)).is_err());
    }

    #[test]
    fn encoded_slashes_and_dots_never_decode_into_structure(p in valid_path()) {
        // A URL path that smuggles structure by escapes is refused, not reinterpreted.
        for smuggled in ["%2F", "%2f", "%2E%2E", "%2e"] {
            let url_path = format!("{}/{smuggled}", &p[1..]);
            let r = BlogPath::from_url_segments(url_path.split('/'));
            prop_assert!(r.is_err(), "{:?} accepted", url_path);
        }
    }
}
