//! Indexed DNS rule matching for the DNS proxy.
//!
//! A policy may give one endpoint hundreds of `matchName`/`matchPattern` rules; trying them one
//! by one (a regex each) for every query would cost more than the proxy's latency budget. The
//! matcher sorts them once: exact names in a hash set, `*.suffix` patterns by their suffix,
//! `**.suffix` patterns by their suffix, and only the rest (stars inside labels) are tried one
//! by one. Index hits are confirmed with the pattern itself, so the index only narrows.

use std::collections::HashMap;
use std::sync::Arc;

use crate::fqdn::DnsName;
use crate::mapstate::RuleRef;
use crate::model::{DnsRule, L7Rules};

use super::DnsVerdict;

/// A [`DnsVerdict`] prepared for many queries.
#[derive(Debug, Clone)]
pub struct DnsMatcher {
    verdict: DnsVerdict,
    /// Every name is allowed (unrestricted, `allow_all`, or a match-all pattern).
    all: bool,
    /// Every DNS rule: its list, its index in the list, its origin (shared, not copied).
    rules: Vec<(Arc<L7Rules>, usize, Arc<RuleRef>)>,
    exact: HashMap<String, usize>,
    /// `*.suffix.` → rules, keyed by `suffix.`.
    one_label: HashMap<String, Vec<usize>>,
    /// `**.suffix.` → rules, keyed by `suffix.`.
    multi_label: HashMap<String, Vec<usize>>,
    other: Vec<usize>,
}

impl DnsMatcher {
    pub fn new(verdict: DnsVerdict) -> DnsMatcher {
        let mut m = DnsMatcher {
            all: matches!(
                verdict,
                DnsVerdict::Unrestricted
                    | DnsVerdict::Rules {
                        allow_all: true,
                        ..
                    }
            ),
            rules: match &verdict {
                DnsVerdict::Rules { rules, .. } => rules
                    .iter()
                    .flat_map(|(l7, o)| {
                        let n = match l7.as_ref() {
                            L7Rules::Dns(list) => list.len(),
                            _ => 0,
                        };
                        (0..n).map(move |i| (l7.clone(), i, o.clone()))
                    })
                    .collect(),
                _ => Vec::new(),
            },
            verdict,
            exact: HashMap::new(),
            one_label: HashMap::new(),
            multi_label: HashMap::new(),
            other: Vec::new(),
        };
        for i in 0..m.rules.len() {
            match m.rule(i) {
                DnsRule::MatchName(n) => {
                    m.exact.entry(n.as_str().to_string()).or_insert(i);
                }
                DnsRule::MatchPattern(p) if p.is_match_all() => m.all = true,
                DnsRule::MatchPattern(p) if p.is_exact() => {
                    m.exact.entry(p.as_str().to_string()).or_insert(i);
                }
                DnsRule::MatchPattern(p) => {
                    let t = p.as_str();
                    if let Some(s) = t.strip_prefix("**.").filter(|s| !s.contains('*')) {
                        m.multi_label.entry(s.to_string()).or_default().push(i);
                    } else if let Some(s) = t.strip_prefix("*.").filter(|s| !s.contains('*')) {
                        m.one_label.entry(s.to_string()).or_default().push(i);
                    } else {
                        m.other.push(i);
                    }
                }
            }
        }
        if matches!(m.verdict, DnsVerdict::Denied { .. }) {
            m.all = false;
        }
        m
    }

    fn rule(&self, i: usize) -> &DnsRule {
        match self.rules[i].0.as_ref() {
            L7Rules::Dns(list) => &list[self.rules[i].1],
            _ => unreachable!("only DNS lists are indexed"),
        }
    }

    /// The verdict the matcher was built from.
    pub fn verdict(&self) -> &DnsVerdict {
        &self.verdict
    }

    /// Whether a query for `name` is allowed (same answer as [`DnsVerdict::allows`]).
    pub fn allows(&self, name: &DnsName) -> bool {
        if matches!(self.verdict, DnsVerdict::Denied { .. }) {
            return false;
        }
        self.all || self.find(name).is_some()
    }

    /// The rule that allows `name` by name or pattern, when one does.
    pub fn matching_rule(&self, name: &DnsName) -> Option<&Arc<RuleRef>> {
        if matches!(self.verdict, DnsVerdict::Denied { .. }) {
            return None;
        }
        self.find(name).map(|i| &self.rules[i].2)
    }

    fn find(&self, name: &DnsName) -> Option<usize> {
        let n = name.as_str();
        if let Some(&i) = self.exact.get(n) {
            return Some(i);
        }
        let hit = |list: Option<&Vec<usize>>| {
            list.into_iter()
                .flatten()
                .copied()
                .find(|&i| self.rule(i).matches(name))
        };
        if !self.one_label.is_empty() {
            if let Some((_, rest)) = n.split_once('.') {
                if let Some(i) = hit(self.one_label.get(rest)) {
                    return Some(i);
                }
            }
        }
        if !self.multi_label.is_empty() {
            let mut rest = n;
            while let Some((_, r)) = rest.split_once('.') {
                if let Some(i) = hit(self.multi_label.get(r)) {
                    return Some(i);
                }
                rest = r;
            }
        }
        if self.rules.is_empty() {
            return None;
        }
        self.other
            .iter()
            .copied()
            .find(|&i| self.rule(i).matches(name))
            .or_else(|| {
                // A match-all pattern allows every name without an index entry.
                (0..self.rules.len())
                    .find(|&i| matches!(self.rule(i), DnsRule::MatchPattern(p) if p.is_match_all()))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Span;
    use crate::fqdn::FqdnPattern;
    use crate::model::PolicyKind;

    fn verdict(rules: &[&str], allow_all: bool) -> DnsVerdict {
        let origin = Arc::new(RuleRef {
            policy: "x/p".into(),
            kind: PolicyKind::CiliumNetworkPolicy,
            file: "p.yaml".into(),
            span: Span::new(1, 1),
        });
        let list: Vec<DnsRule> = rules
            .iter()
            .map(|r| match r.strip_prefix("name:") {
                Some(n) => DnsRule::MatchName(DnsName::parse_match_name(n).unwrap()),
                None => DnsRule::MatchPattern(FqdnPattern::parse(r).unwrap()),
            })
            .collect();
        DnsVerdict::Rules {
            rules: vec![(Arc::new(L7Rules::Dns(list)), origin)],
            allow_all,
        }
    }

    const NAMES: &[&str] = &[
        "example.com",
        "a.example.com",
        "a.b.example.com",
        "myexample.com",
        "api.example.com",
        "API.Example.COM.",
        "x.cilium.io",
        "a.cilium.io",
        "cilium.io",
        "a.b.c.d.test",
        "b.c.d.test",
        "c.d.test",
        "foo.org",
        "foo-bar_1.org",
        ".",
        "weird..example.com",
    ];

    #[test]
    fn index_agrees_with_the_rules() {
        let sets: &[&[&str]] = &[
            &["*.example.com"],
            &["**.example.com", "name:cilium.io"],
            &["*example.com", "*.ci*.io", "**.c.d.test"],
            &["api.example.com", "*.org", "**.d.test", "x.*.io"],
            &["*"],
            &[],
        ];
        for rules in sets {
            for allow_all in [false, true] {
                let v = verdict(rules, allow_all);
                let m = DnsMatcher::new(v.clone());
                for n in NAMES {
                    let name = DnsName::new(n);
                    assert_eq!(m.allows(&name), v.allows(&name), "{rules:?} {n}");
                    assert_eq!(
                        m.matching_rule(&name).is_some(),
                        v.matching_rule(&name).is_some(),
                        "{rules:?} {n}"
                    );
                }
            }
        }
        let denied = DnsMatcher::new(DnsVerdict::Denied { rules: vec![] });
        assert!(!denied.allows(&DnsName::new("a.example.com")));
        let open = DnsMatcher::new(DnsVerdict::Unrestricted);
        assert!(open.allows(&DnsName::new("anything.at.all")));
    }

    #[test]
    fn many_patterns_are_indexed() {
        let rules: Vec<String> = (0..1000).map(|i| format!("*.svc{i}.example.com")).collect();
        let refs: Vec<&str> = rules.iter().map(|s| s.as_str()).collect();
        let m = DnsMatcher::new(verdict(&refs, false));
        assert_eq!(m.one_label.len(), 1000);
        assert!(m.other.is_empty());
        assert!(m.allows(&DnsName::new("a.svc999.example.com")));
        assert!(!m.allows(&DnsName::new("a.b.svc999.example.com")));
        assert!(!m.allows(&DnsName::new("svc999.example.com")));
    }
}
