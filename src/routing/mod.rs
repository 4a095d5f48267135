//! Which route a request path selects, and which upstream URL it maps to.

pub mod balance;
mod table;

/// Parsed by `formats`, which `config` checks route paths with too.
pub use crate::formats::path::{PathPattern, PatternError};
pub use table::{Route, RouteTable};

/// Whether a request path has a `.` or `..` segment, raw or percent-encoded.
/// Such a path could match a prefix route and then, once appended to the
/// upstream URL and normalised, escape the route's base path on the runtime.
pub fn has_dot_segment(path: &str) -> bool {
    path.split('/').any(|seg| {
        let decoded = seg.to_ascii_lowercase().replace("%2e", ".");
        decoded == "." || decoded == ".."
    })
}

#[cfg(test)]
mod tests {
    use super::has_dot_segment;

    #[test]
    fn dot_segments_in_any_spelling() {
        for bad in [
            "/a/../admin",
            "/a/./b",
            "/a/%2e%2e/x",
            "/a/.%2E/x",
            "/a/%2E/x",
            "/..",
        ] {
            assert!(has_dot_segment(bad), "{bad}");
        }
        for ok in ["/a/b", "/a/..b", "/a/b.c", "/a/...", "/"] {
            assert!(!has_dot_segment(ok), "{ok}");
        }
    }
}
