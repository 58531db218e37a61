//! DNS names and FQDN patterns, in the normal form every comparison uses:
//! lower case, with a trailing dot.

use std::fmt;

use regex::Regex;

/// Longest name or pattern accepted, as in Cilium.
pub const MAX_NAME_LEN: usize = 255;

/// A DNS name in normal form (lower case, trailing dot). The root is `.`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DnsName(String);

impl DnsName {
    /// Normalises any name seen on the wire or typed by a user (no character check: a query
    /// may carry anything, and it must still be compared and refused).
    pub fn new(name: &str) -> DnsName {
        let mut s = name.to_ascii_lowercase();
        if !s.ends_with('.') {
            s.push('.');
        }
        DnsName(s)
    }

    /// A name already in normal form (lower case, trailing dot), e.g. read label by label
    /// from the wire by the DNS proxy: kept as it is, without a copy.
    pub fn from_normal(name: String) -> DnsName {
        debug_assert!(
            name.ends_with('.') && !name.bytes().any(|b| b.is_ascii_uppercase()),
            "{name:?} is not in normal form"
        );
        DnsName(name)
    }

    /// A policy `matchName`: characters `[-a-zA-Z0-9_.]`, at most 255 characters, no empty
    /// label. Returns the reason on failure.
    pub fn parse_match_name(s: &str) -> Result<DnsName, String> {
        if s.is_empty() {
            return Err("matchName must not be empty".into());
        }
        if s.len() > MAX_NAME_LEN {
            return Err(format!(
                "matchName is {} characters long, at most {MAX_NAME_LEN} are allowed",
                s.len()
            ));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        {
            return Err(format!(
                "matchName {s:?} contains {c:?}; only letters, digits, '-', '_' and '.' are allowed"
            ));
        }
        let trimmed = s.strip_suffix('.').unwrap_or(s);
        if trimmed.is_empty() || trimmed.split('.').any(|l| l.is_empty()) {
            return Err(format!("matchName {s:?} has an empty label"));
        }
        Ok(DnsName::new(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DnsName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A `matchPattern` in normal form, with its compiled matcher.
///
/// `*` matches zero or more of `[-a-z0-9_]` inside one label; a leading `**.` matches one or
/// more whole labels; `**` anywhere else is `*`; a pattern of only stars (and dots) matches
/// every name.
#[derive(Debug, Clone)]
pub struct FqdnPattern {
    text: String,
    matcher: PatternMatcher,
}

#[derive(Debug, Clone)]
enum PatternMatcher {
    All,
    Exact,
    Regex(Regex),
}

impl PartialEq for FqdnPattern {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}
impl Eq for FqdnPattern {}
impl std::hash::Hash for FqdnPattern {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.text.hash(state)
    }
}
impl PartialOrd for FqdnPattern {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for FqdnPattern {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.text.cmp(&other.text)
    }
}

const LABEL_CHARS: &str = "[-a-z0-9_]";

impl FqdnPattern {
    /// Parses a policy `matchPattern`: characters `[-a-zA-Z0-9_.*]`, at most 255 characters.
    pub fn parse(s: &str) -> Result<FqdnPattern, String> {
        if s.is_empty() {
            return Err("matchPattern must not be empty".into());
        }
        if s.len() > MAX_NAME_LEN {
            return Err(format!(
                "matchPattern is {} characters long, at most {MAX_NAME_LEN} are allowed",
                s.len()
            ));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '*')))
        {
            return Err(format!(
                "matchPattern {s:?} contains {c:?}; only letters, digits, '-', '_', '.' and '*' are allowed"
            ));
        }
        let mut text = s.to_ascii_lowercase();
        if !text.ends_with('.') {
            text.push('.');
        }
        if text.chars().all(|c| c == '*' || c == '.') {
            // `*`, `**`, `*.`: every name. Keep one canonical spelling.
            return Ok(FqdnPattern {
                text: "*.".into(),
                matcher: PatternMatcher::All,
            });
        }
        let body = text.strip_suffix('.').unwrap_or(&text);
        if body.split('.').any(|l| l.is_empty()) {
            return Err(format!("matchPattern {s:?} has an empty label"));
        }
        if !text.contains('*') {
            return Ok(FqdnPattern {
                text,
                matcher: PatternMatcher::Exact,
            });
        }
        let mut re = String::from("^");
        let mut rest = text.as_str();
        if let Some(r) = rest.strip_prefix("**.") {
            re.push_str(&format!("(?:{LABEL_CHARS}+\\.)+"));
            rest = r;
        }
        let mut chars = rest.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '*' => {
                    while chars.peek() == Some(&'*') {
                        chars.next();
                    }
                    re.push_str(LABEL_CHARS);
                    re.push('*');
                }
                '.' => re.push_str("\\."),
                c => re.push(c),
            }
        }
        re.push('$');
        let regex = Regex::new(&re).map_err(|e| format!("matchPattern {s:?}: {e}"))?;
        Ok(FqdnPattern {
            text,
            matcher: PatternMatcher::Regex(regex),
        })
    }

    /// The pattern in normal form (lower case, trailing dot).
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the pattern matches every name.
    pub fn is_match_all(&self) -> bool {
        matches!(self.matcher, PatternMatcher::All)
    }

    /// Whether the pattern has no wildcard (then it is a plain name).
    pub fn is_exact(&self) -> bool {
        matches!(self.matcher, PatternMatcher::Exact)
    }

    pub fn matches(&self, name: &DnsName) -> bool {
        match &self.matcher {
            PatternMatcher::All => true,
            PatternMatcher::Exact => self.text == name.as_str(),
            PatternMatcher::Regex(r) => r.is_match(name.as_str()),
        }
    }
}

impl fmt::Display for FqdnPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, n: &str) -> bool {
        FqdnPattern::parse(p).unwrap().matches(&DnsName::new(n))
    }

    #[test]
    fn semantics_doc_examples() {
        assert!(m("*.example.com", "a.example.com"));
        assert!(!m("*.example.com", "example.com"));
        assert!(!m("*.example.com", "a.b.example.com"));
        assert!(m("*example.com", "example.com"));
        assert!(m("*example.com", "myexample.com"));
        assert!(m("*.ci*.io", "a.cilium.io"));
        assert!(m("**.example.com", "a.example.com"));
        assert!(m("**.example.com", "a.b.example.com"));
        assert!(!m("**.example.com", "example.com"));
        assert!(m("a.**.com", "a.b.com"));
        assert!(!m("a.**.com", "a.b.c.com"));
        for all in ["*", "**", "*.", "**."] {
            assert!(m(all, "anything.at.all"));
            assert!(m(all, "."));
        }
    }

    #[test]
    fn case_and_trailing_dot() {
        assert!(m("WWW.Example.COM", "www.example.com."));
        assert!(m("*.EXAMPLE.com.", "API.example.com"));
        assert_eq!(DnsName::new("Foo.Bar"), DnsName::new("foo.bar."));
    }

    #[test]
    fn rejects_bad_characters() {
        assert!(FqdnPattern::parse("a b.com").is_err());
        assert!(FqdnPattern::parse("a..com").is_err());
        assert!(FqdnPattern::parse(&"a".repeat(256)).is_err());
        assert!(DnsName::parse_match_name("*.com").is_err());
        assert!(DnsName::parse_match_name("ok-name_1.example.com.").is_ok());
    }
}
