//! Which route a request path selects, and which upstream URL it maps to.

pub mod balance;
mod table;

/// Parsed by `formats`, which `config` checks route paths with too.
pub use crate::formats::path::{PathPattern, PatternError};
pub use table::{Route, RouteTable};

/// Rounds of percent-decoding a path is checked through; a path still
/// changing after that many is refused (nobody encodes a path five times).
const MAX_DECODES: usize = 4;

/// Why a request path is refused before any route sees it (`400
/// bad_request`), or `None` when it may be routed.
///
/// A prefix route appends what follows its base to the upstream URL, and
/// both the URL library that builds that URL and many runtimes normalise a
/// path: `\` is read as `/` (WHATWG URL, IIS, many frameworks), `.` and `..`
/// segments are resolved in any spelling (`.`, `%2e`, `%2E`, `.%2e`, ...),
/// `..;x` is `..` to servlet containers, and a NUL ends the path for C code.
/// Any of them would let `/prefix/..\admin` escape the route's upstream
/// base on the runtime. So a path is refused when, raw or after any of up
/// to [`MAX_DECODES`] rounds of percent-decoding, it has a backslash, a dot
/// segment (also before a `;` parameter) or a control character. Checking
/// beyond one decoding covers runtimes that decode twice (`%252e` → `%2e`
/// → `.`); the cost is refusing a literal `%2e` as a whole segment, which
/// no real path needs.
pub fn unsafe_path(path: &str) -> Option<&'static str> {
    let mut current = path.as_bytes().to_vec();
    for _ in 0..=MAX_DECODES {
        if let Some(why) = unsafe_bytes(&current) {
            return Some(why);
        }
        if !current.contains(&b'%') {
            return None;
        }
        let decoded = percent_decode(&current);
        if decoded == current {
            return None;
        }
        current = decoded;
    }
    Some("Path is percent-encoded too many times")
}

fn unsafe_bytes(path: &[u8]) -> Option<&'static str> {
    if path.contains(&b'\\') {
        return Some("Path must not contain a backslash");
    }
    if path.iter().any(|b| b.is_ascii_control()) {
        return Some("Path must not contain control characters");
    }
    let dot_segment = path.split(|&b| b == b'/').any(|seg| {
        let name = seg.split(|&b| b == b';').next().unwrap_or_default();
        name == b"." || name == b".."
    });
    dot_segment.then_some("Path must not contain '.' or '..' segments")
}

/// One round of percent-decoding; a `%` not followed by two hex digits is
/// kept as it is.
fn percent_decode(s: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' {
            if let (Some(h), Some(l)) = (
                s.get(i + 1).copied().and_then(hex),
                s.get(i + 2).copied().and_then(hex),
            ) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(s[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::unsafe_path;

    #[test]
    fn dot_segments_backslashes_and_controls_in_any_spelling() {
        for bad in [
            "/a/../admin",
            "/a/./b",
            "/a/%2e%2e/x",
            "/a/.%2E/x",
            "/a/%2E./x",
            "/a/%2E/x",
            "/..",
            "/a/..",
            "/a/..\\admin",
            "/a/x\\..\\..\\secret",
            "/a/%5c",
            "/a/..%5Cadmin",
            "/a/..%2fadmin",
            "/a/%252e%252e/x",
            "/a/%25252e%25252e/x",
            "/a/%255c",
            "/a/..;jsessionid=1/admin",
            "/a/%00",
            "/a/%2500",
            "/a/%2525252525252e",
        ] {
            assert!(unsafe_path(bad).is_some(), "{bad}");
        }
        for ok in [
            "/a/b",
            "/a/..b",
            "/a/b.c",
            "/a/...",
            "/",
            "/a/100%",
            "/a/%zz",
            "/a/%2541",
            "/a/caf%C3%A9",
            "/a/x;y",
            "/a/foo%2fbar",
        ] {
            assert_eq!(unsafe_path(ok), None, "{ok}");
        }
    }
}
