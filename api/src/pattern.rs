//! Domain patterns and address helpers: the only place that decides what `*`, `example.com` and
//! `*.example.com` mean. Pure string logic; no DNS, no IDNA conversion (patterns must already be
//! ASCII, i.e. punycode for internationalised domains).

use std::fmt;

use serde::{Deserialize, Serialize};

/// A recipient or sender domain pattern.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DomainPattern {
    /// `*`: every domain.
    Any,
    /// `example.com`: exactly this domain.
    Exact(String),
    /// `*.example.com`: every subdomain of `example.com`, not `example.com` itself.
    Subdomains(String),
}

/// Why a pattern or address was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("empty domain pattern")]
    Empty,
    #[error("`{0}` is not a valid domain pattern (use `*`, `example.com` or `*.example.com`)")]
    Invalid(String),
    #[error("`{0}` is not a valid e-mail address")]
    InvalidAddress(String),
}

impl DomainPattern {
    /// Parses `*`, `example.com` or `*.example.com` (case-insensitive, stored lower-case).
    pub fn parse(s: &str) -> Result<Self, PatternError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(PatternError::Empty);
        }
        if s == "*" {
            return Ok(Self::Any);
        }
        let lower = s.to_ascii_lowercase();
        if let Some(rest) = lower.strip_prefix("*.") {
            if is_valid_domain(rest) {
                return Ok(Self::Subdomains(rest.to_string()));
            }
        } else if is_valid_domain(&lower) {
            return Ok(Self::Exact(lower));
        }
        Err(PatternError::Invalid(s.to_string()))
    }

    /// Whether `domain` (any case) is covered by this pattern.
    pub fn matches(&self, domain: &str) -> bool {
        let domain = domain.trim_end_matches('.');
        match self {
            Self::Any => true,
            Self::Exact(d) => domain.eq_ignore_ascii_case(d),
            Self::Subdomains(d) => {
                domain.len() > d.len() + 1
                    && domain[domain.len() - d.len()..].eq_ignore_ascii_case(d)
                    && domain.as_bytes()[domain.len() - d.len() - 1] == b'.'
            }
        }
    }

    /// Higher is more specific: exact > subdomain wildcard (longer suffix first) > any.
    pub fn specificity(&self) -> usize {
        match self {
            Self::Any => 0,
            Self::Subdomains(d) => 1 + d.len(),
            Self::Exact(d) => 1_000 + d.len(),
        }
    }

    /// Whether some domain exists that both patterns match.
    pub fn overlaps(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Any, _) | (_, Self::Any) => true,
            (Self::Exact(a), p) | (p, Self::Exact(a)) => p.matches(a),
            (Self::Subdomains(a), Self::Subdomains(b)) => {
                a == b || Self::Subdomains(a.clone()).matches(b) || Self::Subdomains(b.clone()).matches(a)
            }
        }
    }
}

impl fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("*"),
            Self::Exact(d) => f.write_str(d),
            Self::Subdomains(d) => write!(f, "*.{d}"),
        }
    }
}

impl TryFrom<String> for DomainPattern {
    type Error = PatternError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<DomainPattern> for String {
    fn from(p: DomainPattern) -> Self {
        p.to_string()
    }
}

/// A DNS name of letters, digits and hyphens, at least two labels, each 1..=63 octets, 253 in all.
pub fn is_valid_domain(d: &str) -> bool {
    let d = d.strip_suffix('.').unwrap_or(d);
    if d.is_empty() || d.len() > 253 || !d.contains('.') {
        return false;
    }
    d.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    })
}

/// Splits `local@domain` at the last `@`, checking both halves; the domain is lower-cased.
pub fn split_address(addr: &str) -> Result<(&str, String), PatternError> {
    let bad = || PatternError::InvalidAddress(addr.to_string());
    let (local, domain) = addr.rsplit_once('@').ok_or_else(bad)?;
    if local.is_empty()
        || local.len() > 64
        || local
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control() || b == b'<' || b == b'>')
    {
        return Err(bad());
    }
    if !is_valid_domain(domain) {
        return Err(bad());
    }
    Ok((local, domain.to_ascii_lowercase()))
}

/// The lower-cased domain of an address (after its last `@`), if it has a valid one. The local
/// part is not judged: a quoted local part (`"john smith"@example.com`, kept unquoted) has a
/// domain like any other, for routing and sender policies alike.
pub fn domain_of(addr: &str) -> Option<String> {
    let (local, domain) = addr.rsplit_once('@')?;
    (!local.is_empty() && is_valid_domain(domain)).then(|| domain.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_forms() {
        assert_eq!(DomainPattern::parse("*").unwrap(), DomainPattern::Any);
        assert_eq!(
            DomainPattern::parse("Docomo.NE.jp").unwrap(),
            DomainPattern::Exact("docomo.ne.jp".into())
        );
        assert_eq!(
            DomainPattern::parse("*.example.com").unwrap(),
            DomainPattern::Subdomains("example.com".into())
        );
    }

    #[test]
    fn refuses_malformed_patterns() {
        for bad in [
            "",
            "example",
            "*.",
            "*example.com",
            "ex ample.com",
            "a..b",
            "-a.com",
            "*.*.com",
            "a.com*",
        ] {
            assert!(DomainPattern::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn matching_rules() {
        let sub = DomainPattern::parse("*.example.com").unwrap();
        assert!(sub.matches("mail.example.com"));
        assert!(sub.matches("A.B.EXAMPLE.COM"));
        assert!(!sub.matches("example.com"));
        assert!(!sub.matches("badexample.com"));
        let exact = DomainPattern::parse("docomo.ne.jp").unwrap();
        assert!(exact.matches("DOCOMO.ne.jp"));
        assert!(exact.matches("docomo.ne.jp."));
        assert!(!exact.matches("x.docomo.ne.jp"));
        assert!(DomainPattern::Any.matches("anything.org"));
    }

    #[test]
    fn overlap_and_specificity() {
        let p = |s| DomainPattern::parse(s).unwrap();
        assert!(p("*").overlaps(&p("a.com")));
        assert!(p("*.a.com").overlaps(&p("x.a.com")));
        assert!(!p("*.a.com").overlaps(&p("a.com")));
        assert!(p("*.a.com").overlaps(&p("*.x.a.com")));
        assert!(!p("*.a.com").overlaps(&p("*.b.com")));
        assert!(p("a.com").specificity() > p("*.a.com").specificity());
        assert!(p("*.x.a.com").specificity() > p("*.a.com").specificity());
        assert!(p("*.a.com").specificity() > p("*").specificity());
    }

    #[test]
    fn addresses() {
        assert_eq!(
            split_address("User@Example.COM").unwrap(),
            ("User", "example.com".to_string())
        );
        assert!(split_address("no-at-sign").is_err());
        assert!(split_address("@example.com").is_err());
        assert!(split_address("a b@example.com").is_err());
        assert!(split_address("a@localhost").is_err());
        assert_eq!(domain_of("x@a.b"), Some("a.b".into()));
        assert_eq!(domain_of("john smith@Example.COM"), Some("example.com".into()));
        assert_eq!(domain_of("a> AUTH=<c@d.e>@good.example"), Some("good.example".into()));
        assert_eq!(domain_of("@a.b"), None);
        assert_eq!(domain_of("x@-bad-.b"), None);
    }
}
