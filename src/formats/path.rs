//! Route path patterns: an exact path, or a prefix when it ends in `/*`.

/// Why a `[[routes]].path` is not a pattern; config errors print it after the
/// path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("must start with '/'")]
    NoLeadingSlash,
    #[error("must not contain a query or fragment")]
    QueryOrFragment,
    #[error("'*' is allowed only as a final \"/*\"")]
    InnerStar,
}

/// A parsed `[[routes]].path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathPattern {
    Exact(String),
    /// `/a/*` is stored as `/a`: it matches `/a` and everything under `/a/`.
    Prefix(String),
}

impl PathPattern {
    pub fn parse(raw: &str) -> Result<Self, PatternError> {
        if !raw.starts_with('/') {
            return Err(PatternError::NoLeadingSlash);
        }
        if raw.contains(['?', '#']) {
            return Err(PatternError::QueryOrFragment);
        }
        if let Some(base) = raw.strip_suffix("/*") {
            if base.contains('*') {
                return Err(PatternError::InnerStar);
            }
            return Ok(PathPattern::Prefix(base.to_string()));
        }
        if raw.contains('*') {
            return Err(PatternError::InnerStar);
        }
        Ok(PathPattern::Exact(raw.to_string()))
    }

    /// The concrete path this pattern names (the prefix's base).
    pub fn path(&self) -> &str {
        match self {
            PathPattern::Exact(p) | PathPattern::Prefix(p) => p,
        }
    }

    /// `Some(rest)` when `path` matches; `rest` is what follows a prefix (empty
    /// or starting with '/'), to be appended to the upstream URL's path.
    pub fn matches<'a>(&self, path: &'a str) -> Option<&'a str> {
        match self {
            PathPattern::Exact(p) => (path == p).then_some(""),
            PathPattern::Prefix(base) => {
                let rest = path.strip_prefix(base.as_str())?;
                (rest.is_empty() || rest.starts_with('/') || base.is_empty()).then_some(rest)
            }
        }
    }

    /// Two routes overlap when one's pattern matches the other's path.
    pub fn overlaps(&self, other: &PathPattern) -> bool {
        self.matches(other.path()).is_some() || other.matches(self.path()).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_matches_only_itself() {
        let p = PathPattern::parse("/ws/echo").unwrap();
        assert_eq!(p.matches("/ws/echo"), Some(""));
        assert_eq!(p.matches("/ws/echo/x"), None);
        assert_eq!(p.matches("/ws/ech"), None);
    }

    #[test]
    fn prefix_matches_base_and_below_but_not_siblings() {
        let p = PathPattern::parse("/a/*").unwrap();
        assert_eq!(p.matches("/a"), Some(""));
        assert_eq!(p.matches("/a/"), Some("/"));
        assert_eq!(p.matches("/a/b/c"), Some("/b/c"));
        assert_eq!(p.matches("/ab"), None);
    }

    #[test]
    fn root_prefix_matches_everything() {
        let p = PathPattern::parse("/*").unwrap();
        assert_eq!(p.matches("/anything"), Some("/anything"));
    }

    #[test]
    fn overlap_rules() {
        let a = PathPattern::parse("/a/*").unwrap();
        let ab = PathPattern::parse("/a/b").unwrap();
        let abc = PathPattern::parse("/ab").unwrap();
        assert!(a.overlaps(&ab));
        assert!(ab.overlaps(&a));
        assert!(!a.overlaps(&abc));
        assert!(
            PathPattern::parse("/x")
                .unwrap()
                .overlaps(&PathPattern::parse("/x").unwrap())
        );
    }

    #[test]
    fn rejects_malformed() {
        let err = |raw| PathPattern::parse(raw).unwrap_err();
        assert_eq!(err("ws"), PatternError::NoLeadingSlash);
        assert_eq!(err("/a/*/b"), PatternError::InnerStar);
        assert_eq!(err("/a*"), PatternError::InnerStar);
        assert_eq!(err("/a?x=1"), PatternError::QueryOrFragment);
    }

    #[test]
    fn errors_read_as_config_messages() {
        assert_eq!(
            PatternError::NoLeadingSlash.to_string(),
            "must start with '/'"
        );
        assert_eq!(
            PatternError::InnerStar.to_string(),
            "'*' is allowed only as a final \"/*\""
        );
    }
}
