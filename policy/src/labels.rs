//! Labels, label sets and label selectors (Cilium's `source:key=value` labels).

use std::fmt;

/// Label sources. A selector key without a source matches any source.
pub const SOURCE_K8S: &str = "k8s";
pub const SOURCE_RESERVED: &str = "reserved";
pub const SOURCE_CIDR: &str = "cidr";
pub const SOURCE_FQDN: &str = "fqdn";
pub const SOURCE_ANY: &str = "any";
/// Sources recognised as a `source:` prefix of a selector key.
pub const KNOWN_SOURCES: &[&str] = &[
    SOURCE_K8S,
    SOURCE_RESERVED,
    SOURCE_CIDR,
    SOURCE_FQDN,
    SOURCE_ANY,
    "unspec",
    "container",
];

/// Label key of the endpoint's namespace.
pub const NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
/// Prefix of namespace labels as Cilium exposes them on endpoints
/// (`io.cilium.k8s.namespace.labels.<key>`), used by NetworkPolicy `namespaceSelector`.
pub const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";
/// Label key of the endpoint's service account.
pub const SERVICE_ACCOUNT_LABEL: &str = "io.cilium.k8s.policy.serviceaccount";
/// Label key of the endpoint's cluster.
pub const CLUSTER_LABEL: &str = "io.cilium.k8s.policy.cluster";

/// One label: `source:key=value`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Label {
    pub source: String,
    pub key: String,
    pub value: String,
}

impl Label {
    pub fn new(source: &str, key: &str, value: &str) -> Label {
        Label {
            source: source.to_string(),
            key: key.to_string(),
            value: value.to_string(),
        }
    }
    pub fn k8s(key: &str, value: &str) -> Label {
        Label::new(SOURCE_K8S, key, value)
    }
    pub fn reserved(key: &str) -> Label {
        Label::new(SOURCE_RESERVED, key, "")
    }
}

impl fmt::Display for Label {
    /// `source:key=value`, or `source:key` when the value is empty (`reserved:world`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.value.is_empty() {
            write!(f, "{}:{}", self.source, self.key)
        } else {
            write!(f, "{}:{}={}", self.source, self.key, self.value)
        }
    }
}

/// A sorted, de-duplicated set of labels: what one identity stands for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct LabelSet(Vec<Label>);

impl LabelSet {
    pub fn new(mut labels: Vec<Label>) -> LabelSet {
        labels.sort();
        labels.dedup();
        LabelSet(labels)
    }
    pub fn labels(&self) -> &[Label] {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// The value of `key` from `source` (`None` = any source).
    pub fn get(&self, source: Option<&str>, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|l| l.key == key && source.is_none_or(|s| l.source == s))
            .map(|l| l.value.as_str())
    }
}

/// A selector key: `source:key` or plain `key` (any source).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LabelKey {
    /// `None` for a key written without a known source prefix (or with `any:`).
    pub source: Option<String>,
    pub key: String,
}

impl LabelKey {
    /// Splits `k8s:app` into source and key; `app` and `any:app` have no source.
    pub fn parse(s: &str) -> LabelKey {
        if let Some((src, key)) = s.split_once(':') {
            if KNOWN_SOURCES.contains(&src) {
                let source = (src != SOURCE_ANY).then(|| src.to_string());
                return LabelKey {
                    source,
                    key: key.to_string(),
                };
            }
        }
        LabelKey {
            source: None,
            key: s.to_string(),
        }
    }
}

impl fmt::Display for LabelKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Some(s) => write!(f, "{s}:{}", self.key),
            None => write!(f, "{}", self.key),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Operator {
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    DoesNotExist,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Requirement {
    pub key: LabelKey,
    pub op: Operator,
}

impl Requirement {
    pub fn matches(&self, labels: &LabelSet) -> bool {
        let source = self.key.source.as_deref();
        let mut values = labels
            .labels()
            .iter()
            .filter(|l| l.key == self.key.key && source.is_none_or(|s| l.source == s))
            .map(|l| l.value.as_str());
        match &self.op {
            Operator::In(vs) => values.any(|v| vs.iter().any(|x| x == v)),
            Operator::NotIn(vs) => values.all(|v| !vs.iter().any(|x| x == v)),
            Operator::Exists => values.next().is_some(),
            Operator::DoesNotExist => values.next().is_none(),
        }
    }
}

/// A label selector: requirements ANDed. `matchLabels` entries are `In` with one value.
/// The empty selector (`{}`) selects everything.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct LabelSelector {
    pub requirements: Vec<Requirement>,
}

impl LabelSelector {
    pub fn matches(&self, labels: &LabelSet) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }
    pub fn is_wildcard(&self) -> bool {
        self.requirements.is_empty()
    }
    /// Whether any requirement is about `key` (any source), e.g. the namespace label.
    pub fn mentions_key(&self, key: &str) -> bool {
        self.requirements.iter().any(|r| r.key.key == key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ls: &[(&str, &str, &str)]) -> LabelSet {
        LabelSet::new(ls.iter().map(|(s, k, v)| Label::new(s, k, v)).collect())
    }

    #[test]
    fn key_sources() {
        assert_eq!(LabelKey::parse("k8s:app").source.as_deref(), Some("k8s"));
        assert_eq!(LabelKey::parse("any:app").source, None);
        assert_eq!(LabelKey::parse("app").source, None);
        let odd = LabelKey::parse("example.com:thing");
        assert_eq!((odd.source, odd.key.as_str()), (None, "example.com:thing"));
    }

    #[test]
    fn operators() {
        let l = set(&[("k8s", "app", "web"), ("reserved", "world", "")]);
        let req = |k: &str, op| Requirement {
            key: LabelKey::parse(k),
            op,
        };
        assert!(req("app", Operator::In(vec!["web".into()])).matches(&l));
        assert!(!req("reserved:app", Operator::In(vec!["web".into()])).matches(&l));
        assert!(req("app", Operator::NotIn(vec!["db".into()])).matches(&l));
        assert!(req("tier", Operator::NotIn(vec!["db".into()])).matches(&l));
        assert!(req("reserved:world", Operator::Exists).matches(&l));
        assert!(req("tier", Operator::DoesNotExist).matches(&l));
        assert!(!req("app", Operator::DoesNotExist).matches(&l));
        assert!(LabelSelector::default().matches(&l));
    }
}
