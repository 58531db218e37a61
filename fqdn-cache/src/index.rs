//! Which FQDN selectors match a name, without trying every selector.
//!
//! A policy set may carry ten thousand `toFQDNs` selectors, and every learned name must be
//! matched against all of them (on each DNS answer, and again for every learned name when the
//! selectors change). Trying each selector's regular expression in turn would cost ten thousand
//! regex runs per answer. The index sorts selectors by shape instead:
//!
//! - `matchName` and wildcard-free patterns: one hash lookup of the whole name;
//! - `*` and friends (every name): a list that always matches;
//! - `*.<suffix>` and `**.<suffix>` with a literal suffix (the common forms): a trie keyed by
//!   the suffix's labels from the right, so a name walks down its own labels and meets only
//!   the patterns whose suffix it ends with;
//! - everything else (`*` inside a label, `a.**.b`, ...): hung on the trie node of its longest
//!   literal label suffix and confirmed with [`FqdnPattern::matches`], after cheap checks of
//!   the label count and of the literal text before the first `*` and after the last. Only patterns with no literal last label at all are tried against every name.
//!
//! The answers are exactly those of [`FqdnSelector::matches`]; the property tests hold the
//! index to that.

// hashbrown's default hasher: seeded per process (names come from DNS answers) and several
// times faster than SipHash on short keys, which matters on the per-answer path.
use hashbrown::HashMap;

use policy::fqdn::{DnsName, FqdnPattern};
use policy::model::FqdnSelector;

/// Characters a `*` may stand for inside one label (the semantics of `matchPattern`).
fn is_label_char(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'
}

/// A label `*` can match: zero or more label characters.
fn star_matches(label: &str) -> bool {
    label.bytes().all(is_label_char)
}

/// A label one step of a leading `**.` can match: one or more label characters.
fn double_star_step_matches(label: &str) -> bool {
    !label.is_empty() && star_matches(label)
}

/// An index of FQDN selectors, each under a caller-chosen `u32` id.
#[derive(Debug, Default, Clone)]
pub struct PatternIndex {
    exact: HashMap<String, Vec<u32>>,
    match_all: Vec<u32>,
    root: Node,
    len: usize,
}

#[derive(Debug, Default, Clone)]
struct Node {
    /// Keyed by the next label to the left.
    children: HashMap<Box<str>, Node>,
    /// `*.S` where S is this node's suffix: exactly one more label, `[-a-z0-9_]*`.
    one_label: Vec<u32>,
    /// `**.S`: one or more more labels, each `[-a-z0-9_]+`.
    many_labels: Vec<u32>,
    /// Other wildcard patterns whose longest literal label suffix is S.
    other: Vec<OtherPattern>,
}

/// Children up to which a node is scanned rather than hashed into.
const SCAN_CHILDREN: usize = 4;

impl Node {
    /// The child for `label`. Near the root a trie node has a handful of children (the
    /// top-level domains): comparing those costs less than hashing the label.
    fn child(&self, label: &str) -> Option<&Node> {
        if self.children.len() <= SCAN_CHILDREN {
            self.children
                .iter()
                .find(|(k, _)| &***k == label)
                .map(|(_, n)| n)
        } else {
            self.children.get(label)
        }
    }
}

#[derive(Debug, Clone)]
struct OtherPattern {
    id: u32,
    pattern: FqdnPattern,
    /// Labels of the pattern. Without a leading `**.` a name must have exactly this many
    /// (a `*` never crosses a dot); with it, at least this many.
    labels: usize,
    leading_double_star: bool,
    /// The text before the first `*` and after the last: a matching name starts and ends
    /// with them (the regex is anchored at both ends), a check far cheaper than the regex.
    prefix: Box<str>,
    suffix: Box<str>,
}

/// Labels of a name or pattern in normal form, left to right. The root `.` is one empty label.
fn labels(normal_form: &str) -> Vec<&str> {
    normal_form
        .strip_suffix('.')
        .unwrap_or(normal_form)
        .split('.')
        .collect()
}

impl PatternIndex {
    /// Builds the index. Ids need not be distinct from the caller's point of view, but each
    /// `(id, selector)` pair is reported once per match.
    pub fn new<'a>(selectors: impl IntoIterator<Item = (u32, &'a FqdnSelector)>) -> Self {
        let mut index = PatternIndex::default();
        for (id, sel) in selectors {
            index.insert(id, sel);
        }
        index
    }

    /// Adds one selector.
    pub fn insert(&mut self, id: u32, selector: &FqdnSelector) {
        self.len += 1;
        let pattern = match selector {
            FqdnSelector::MatchName(name) => {
                self.exact
                    .entry(name.as_str().to_string())
                    .or_default()
                    .push(id);
                return;
            }
            FqdnSelector::MatchPattern(p) => p,
        };
        if pattern.is_match_all() {
            self.match_all.push(id);
            return;
        }
        if pattern.is_exact() {
            self.exact
                .entry(pattern.as_str().to_string())
                .or_default()
                .push(id);
            return;
        }
        let labels = labels(pattern.as_str());
        // The literal suffix: whole labels from the right without a star.
        let literal = labels.iter().rev().take_while(|l| !l.contains('*')).count();
        let first_literal = labels.len() - literal;
        let node = self.node_mut(&labels[first_literal..]);
        let first = labels[0];
        if first_literal == 1 && first == "**" {
            node.many_labels.push(id);
        } else if first_literal == 1 && first.bytes().all(|b| b == b'*') {
            node.one_label.push(id);
        } else {
            let text = pattern.as_str();
            let first_star = text.find('*').unwrap_or(text.len());
            let last_star = text.rfind('*').map_or(text.len(), |i| i + 1);
            node.other.push(OtherPattern {
                id,
                pattern: pattern.clone(),
                labels: labels.len(),
                leading_double_star: first == "**",
                prefix: text[..first_star].into(),
                suffix: text[last_star..].into(),
            });
        }
    }

    /// Removes the selector inserted under `id` (the same selector must be given). Returns
    /// whether it was there. Emptied trie nodes stay (a later insert may reuse them).
    pub fn remove(&mut self, id: u32, selector: &FqdnSelector) -> bool {
        fn take(list: &mut Vec<u32>, id: u32) -> bool {
            match list.iter().position(|&x| x == id) {
                Some(i) => {
                    list.swap_remove(i);
                    true
                }
                None => false,
            }
        }
        let removed = match selector {
            FqdnSelector::MatchName(name) => self.remove_exact(name.as_str(), id),
            FqdnSelector::MatchPattern(p) if p.is_match_all() => take(&mut self.match_all, id),
            FqdnSelector::MatchPattern(p) if p.is_exact() => self.remove_exact(p.as_str(), id),
            FqdnSelector::MatchPattern(p) => {
                let labels = labels(p.as_str());
                let literal = labels.iter().rev().take_while(|l| !l.contains('*')).count();
                let mut node = Some(&mut self.root);
                for label in labels[labels.len() - literal..].iter().rev() {
                    node = node.and_then(|n| n.children.get_mut(*label));
                }
                node.is_some_and(|n| {
                    take(&mut n.one_label, id)
                        || take(&mut n.many_labels, id)
                        || match n.other.iter().position(|o| o.id == id) {
                            Some(i) => {
                                n.other.swap_remove(i);
                                true
                            }
                            None => false,
                        }
                })
            }
        };
        if removed {
            self.len -= 1;
        }
        removed
    }

    fn remove_exact(&mut self, key: &str, id: u32) -> bool {
        let Some(ids) = self.exact.get_mut(key) else {
            return false;
        };
        let Some(i) = ids.iter().position(|&x| x == id) else {
            return false;
        };
        ids.swap_remove(i);
        if ids.is_empty() {
            self.exact.remove(key);
        }
        true
    }

    fn node_mut(&mut self, suffix: &[&str]) -> &mut Node {
        let mut node = &mut self.root;
        for label in suffix.iter().rev() {
            node = node.children.entry(Box::from(*label)).or_default();
        }
        node
    }

    /// Number of selectors indexed.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends the ids of every selector that matches `name` to `out` (in no particular order;
    /// an id inserted twice is reported twice).
    pub fn matches_into(&self, name: &DnsName, out: &mut Vec<u32>) {
        self.visit(name, |ids| {
            out.extend_from_slice(ids);
            false
        });
    }

    /// Whether any selector matches `name`: the walk of [`PatternIndex::matches_into`],
    /// stopped at the first match, without collecting ids.
    pub fn is_match(&self, name: &DnsName) -> bool {
        self.visit(name, |ids| !ids.is_empty())
    }

    /// Hands `found` the ids of each group of selectors that match `name`; stops (and returns
    /// true) when `found` says so.
    fn visit(&self, name: &DnsName, mut found: impl FnMut(&[u32]) -> bool) -> bool {
        let text = name.as_str();
        if found(&self.match_all) {
            return true;
        }
        // Not even hashed when there are no exact names (common: policies of patterns).
        if let Some(ids) = (!self.exact.is_empty())
            .then(|| self.exact.get(text))
            .flatten()
        {
            if found(ids) {
                return true;
            }
        }
        // The labels are taken from the right as the walk goes down the trie: `rest` holds
        // the labels not walked yet (`None` once all are). A walk stops after a label or
        // two, so the name is never split whole; counts are made only when a pattern asks.
        let mut rest = Some(text.strip_suffix('.').unwrap_or(text));
        let mut label_count: Option<usize> = None;
        let mut node = &self.root;
        loop {
            // `*.S`: exactly one label left (a `*` never matches a dot).
            if !node.one_label.is_empty()
                && rest.is_some_and(star_matches)
                && found(&node.one_label)
            {
                return true;
            }
            // `**.S`: one or more labels left, each a step of `**.`.
            if !node.many_labels.is_empty()
                && rest.is_some_and(|r| r.split('.').all(double_star_step_matches))
                && found(&node.many_labels)
            {
                return true;
            }
            for other in &node.other {
                let labels = *label_count.get_or_insert_with(|| {
                    1 + text.bytes().filter(|&b| b == b'.').count()
                        - usize::from(text.ends_with('.'))
                });
                let count_fits = if other.leading_double_star {
                    labels >= other.labels
                } else {
                    labels == other.labels
                };
                if count_fits
                    && text.starts_with(&*other.prefix)
                    && text.ends_with(&*other.suffix)
                    && other.pattern.matches(name)
                    && found(std::slice::from_ref(&other.id))
                {
                    return true;
                }
            }
            let Some(left) = rest else {
                return false;
            };
            // A byte scan: a `.` is never part of a longer UTF-8 sequence.
            let label = match left.bytes().rposition(|b| b == b'.') {
                Some(dot) => {
                    rest = Some(&left[..dot]);
                    &left[dot + 1..]
                }
                None => {
                    rest = None;
                    left
                }
            };
            match node.child(label) {
                Some(child) => node = child,
                None => return false,
            }
        }
    }

    /// The ids of every selector that matches `name`, sorted and de-duplicated.
    pub fn matches(&self, name: &DnsName) -> Vec<u32> {
        let mut out = Vec::new();
        self.matches_into(name, &mut out);
        out.sort_unstable();
        out.dedup();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(s: &str) -> FqdnSelector {
        if let Some(name) = s.strip_prefix('=') {
            FqdnSelector::MatchName(DnsName::parse_match_name(name).unwrap())
        } else {
            FqdnSelector::MatchPattern(FqdnPattern::parse(s).unwrap())
        }
    }

    fn index(specs: &[&str]) -> (PatternIndex, Vec<FqdnSelector>) {
        let sels: Vec<FqdnSelector> = specs.iter().map(|s| sel(s)).collect();
        let idx = PatternIndex::new(sels.iter().enumerate().map(|(i, s)| (i as u32, s)));
        (idx, sels)
    }

    fn linear(sels: &[FqdnSelector], name: &DnsName) -> Vec<u32> {
        (0..sels.len() as u32)
            .filter(|&i| sels[i as usize].matches(name))
            .collect()
    }

    #[test]
    fn every_shape_agrees_with_the_selectors() {
        let (idx, sels) = index(&[
            "=www.example.com",
            "www.example.com",
            "*.example.com",
            "**.example.com",
            "*example.com",
            "*.ci*.io",
            "a.**.com",
            "api-*.example.com",
            "*",
            "**.*",
            "foo.*",
            "***.example.com",
            "**.**.example.com",
        ]);
        assert_eq!(idx.len(), sels.len());
        for name in [
            "www.example.com",
            "example.com",
            "myexample.com",
            "a.b.example.com",
            "api-1.example.com",
            "a.cilium.io",
            "a.b.com",
            "a.b.c.com",
            "foo.bar",
            ".",
            ".example.com",
            "a..example.com",
            "A_B.example.com",
            "x y.example.com",
            "com",
            // More labels than are split on the stack, and exactly as many.
            "a.b.c.d.e.f.g.h.i.j.k.l.m.n.o.p.q.example.com",
            "a.b.c.d.e.f.g.h.i.j.k.l.m.n.example.com",
            "a.b.c.d.e.f.g.h.i.j.k.l.m.n.o.example.com",
        ] {
            let n = DnsName::new(name);
            assert_eq!(idx.matches(&n), linear(&sels, &n), "{name}");
            assert_eq!(idx.is_match(&n), !linear(&sels, &n).is_empty(), "{name}");
            // Each shape alone too (with `*` in the set every name matches).
            for (i, s) in sels.iter().enumerate() {
                let alone = PatternIndex::new(std::iter::once((i as u32, s)));
                assert_eq!(alone.is_match(&n), s.matches(&n), "{name} by {s:?}");
            }
        }
    }

    #[test]
    fn suffix_patterns_do_not_reach_unrelated_names() {
        let (idx, _) = index(&["*.example.com", "**.example.org"]);
        assert_eq!(idx.matches(&DnsName::new("a.example.com")), vec![0]);
        assert_eq!(idx.matches(&DnsName::new("a.b.example.org")), vec![1]);
        assert!(idx.matches(&DnsName::new("example.org")).is_empty());
        assert!(idx.matches(&DnsName::new("a.example.net")).is_empty());
    }
}
