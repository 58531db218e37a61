//! Compiled HTTP rules of one (endpoint, remote identity, port): the per-request decision.
//!
//! `method`, `path` and `host` are regular expressions anchored at both ends (as Envoy's
//! `safe_regex` full match that Cilium configures). A rule matches when each field it names
//! matches and its header conditions hold; rules are ORed. `path` is matched against the
//! request target as sent (path and query), exactly as Cilium matches `:path`; `host` against
//! the authority (Host header in HTTP/1.1, `:authority` in HTTP/2), port included when the
//! client sent one.
//!
//! This runs for every request, so a request is matched field by field, keeping the rules
//! still in the running as one bit each: a field's patterns that only ever match a few exact
//! strings (`GET`, `PUT|PATCH`, `api\.example\.com`: most methods and hosts) are string
//! compares; the other patterns of the field are run only for rules still in the running (one
//! regex each when they are one or two, else one pass of all of them as a set). Identical
//! patterns of several rules are compiled and run once. Nothing is allocated per request (up to
//! 256 rules; the set's scratch is kept per thread).
//!
//! `headerMatches` follow Cilium: a match that holds is fine; a mismatch without an action
//! makes the rule not match; with an action (LOG, ADD, DELETE, REPLACE) the rule still
//! matches and the action is returned for the proxy to apply before forwarding.

use std::cell::RefCell;
use std::collections::HashMap;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use policy::model::{HttpRule, MismatchAction};
use regex_automata::meta;
use regex_automata::{Input, MatchKind, PatternSet};
use regex_syntax::hir::{Class, Hir, HirKind};

use crate::error::L7Error;
use crate::secret::{secret_display, SecretSource};

/// What a request looks like to the matcher.
#[derive(Debug, Clone, Copy)]
pub struct HttpRequestView<'a> {
    pub method: &'a str,
    /// Request target: path and query (`/a/b?c=d`).
    pub path: &'a str,
    /// Authority (Host header or `:authority`); empty when the request has none.
    pub host: &'a str,
    pub headers: &'a HeaderMap,
}

/// The header fields of a request as the matcher reads them: a [`HeaderMap`], or fields
/// borrowed from the bytes of a request head as they were parsed (names in any case), so a
/// request can be judged without building a map.
pub trait RequestHeaders {
    /// Calls `each` with the values of the fields named `name`, in order, until it returns
    /// `true`; whether one did.
    fn any_value(&self, name: &HeaderName, each: &mut dyn FnMut(&[u8]) -> bool) -> bool;

    /// Whether a field named `name` is present.
    fn contains(&self, name: &HeaderName) -> bool {
        self.any_value(name, &mut |_| true)
    }
}

impl RequestHeaders for HeaderMap {
    fn any_value(&self, name: &HeaderName, each: &mut dyn FnMut(&[u8]) -> bool) -> bool {
        self.get_all(name).iter().any(|v| each(v.as_bytes()))
    }

    fn contains(&self, name: &HeaderName) -> bool {
        self.contains_key(name)
    }
}

/// A header change to apply to an allowed request (from a `headerMatches` mismatch action).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderAction {
    /// LOG: nothing changes; the mismatch is reported in the event.
    Log { name: HeaderName },
    /// ADD: append the configured value.
    Add {
        name: HeaderName,
        value: HeaderValue,
    },
    /// DELETE: remove the header.
    Delete { name: HeaderName },
    /// REPLACE: set the header to the configured value.
    Replace {
        name: HeaderName,
        value: HeaderValue,
    },
}

impl HeaderAction {
    /// Applies the action to a request's headers.
    pub fn apply(&self, headers: &mut HeaderMap) {
        match self {
            HeaderAction::Log { .. } => {}
            HeaderAction::Add { name, value } => {
                headers.append(name.clone(), value.clone());
            }
            HeaderAction::Delete { name } => {
                headers.remove(name);
            }
            HeaderAction::Replace { name, value } => {
                headers.insert(name.clone(), value.clone());
            }
        }
    }

    pub fn header(&self) -> &HeaderName {
        match self {
            HeaderAction::Log { name }
            | HeaderAction::Add { name, .. }
            | HeaderAction::Delete { name }
            | HeaderAction::Replace { name, .. } => name,
        }
    }
}

/// The decision for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpDecision {
    /// Allowed. `rule` is the index of the rule that allowed it (`None`: the rule set allows
    /// everything), `actions` the header changes to apply before forwarding.
    Allowed {
        rule: Option<usize>,
        actions: Vec<HeaderAction>,
    },
    Denied,
}

impl HttpDecision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, HttpDecision::Allowed { .. })
    }
}

#[derive(Debug, Clone)]
enum Expected {
    /// No value given: presence is enough.
    Present,
    Value(HeaderValue),
    /// The value comes from a secret that could not be read: the condition can never hold,
    /// and no action that needs the value can be taken (fail closed).
    Unavailable,
}

#[derive(Debug, Clone)]
struct CompiledHeaderMatch {
    name: HeaderName,
    expected: Expected,
    mismatch: Option<MismatchAction>,
}

#[derive(Debug, Clone)]
struct CompiledRule {
    /// `headers`: name and optional exact value.
    headers: Vec<(HeaderName, Option<HeaderValue>)>,
    header_matches: Vec<CompiledHeaderMatch>,
}

/// Rules as one bit each (bit `i % 64` of word `i / 64` is rule `i`).
type RuleBits = Box<[u64]>;

fn words_for(rules: usize) -> usize {
    rules.div_ceil(64)
}

fn set_bit(bits: &mut [u64], rule: usize) {
    bits[rule / 64] |= 1 << (rule % 64);
}

fn intersects(a: &[u64], b: &[u64]) -> bool {
    a.iter().zip(b).any(|(x, y)| x & y != 0)
}

/// The rules of `bits`, in order.
fn rules_in(bits: &[u64]) -> impl Iterator<Item = usize> + '_ {
    bits.iter().enumerate().flat_map(|(w, &word)| {
        let mut word = word;
        std::iter::from_fn(move || {
            (word != 0).then(|| {
                let bit = word.trailing_zeros() as usize;
                word &= word - 1;
                w * 64 + bit
            })
        })
    })
}

fn or_into(dst: &mut [u64], src: &[u64]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d |= s;
    }
}

/// The exact strings a pattern matches in full, when it only ever matches a few (literals,
/// alternations and small classes of them: `GET`, `PUT|PATCH`, `(?i)get`, `a\.example`).
/// `None` for anything else, look-around assertions included (`\bx` is not the string `x`).
fn exact_strings(pattern: &str) -> Option<Vec<Vec<u8>>> {
    const LIMIT: usize = 64;
    fn walk(h: &Hir) -> Option<Vec<Vec<u8>>> {
        match h.kind() {
            HirKind::Empty => Some(vec![Vec::new()]),
            HirKind::Literal(l) => Some(vec![l.0.to_vec()]),
            HirKind::Capture(c) => walk(&c.sub),
            HirKind::Class(Class::Unicode(c)) => {
                let mut out = Vec::new();
                for r in c.iter() {
                    for ch in r.start()..=r.end() {
                        if out.len() == LIMIT {
                            return None;
                        }
                        out.push(ch.to_string().into_bytes());
                    }
                }
                Some(out)
            }
            HirKind::Alternation(subs) => {
                let mut out = Vec::new();
                for s in subs {
                    out.extend(walk(s)?);
                    if out.len() > LIMIT {
                        return None;
                    }
                }
                Some(out)
            }
            HirKind::Concat(subs) => {
                let mut out = vec![Vec::new()];
                for s in subs {
                    let next = walk(s)?;
                    if out.len() * next.len() > LIMIT {
                        return None;
                    }
                    out = out
                        .iter()
                        .flat_map(|a| {
                            next.iter().map(move |b| {
                                let mut v = a.clone();
                                v.extend_from_slice(b);
                                v
                            })
                        })
                        .collect();
                }
                Some(out)
            }
            HirKind::Class(Class::Bytes(_)) | HirKind::Look(_) | HirKind::Repetition(_) => None,
        }
    }
    let hir = regex_syntax::Parser::new().parse(pattern).ok()?;
    walk(&hir)
}

/// Exact strings of a field's patterns and the rules each one satisfies.
#[derive(Debug, Clone)]
enum Literals {
    /// Compared one by one (a few: cheaper than hashing).
    Few(Vec<(Box<[u8]>, RuleBits)>),
    Many(HashMap<Box<[u8]>, RuleBits>),
}

impl Literals {
    const FEW: usize = 8;

    fn get(&self, text: &[u8]) -> Option<&RuleBits> {
        match self {
            Literals::Few(v) => v.iter().find(|(l, _)| **l == *text).map(|(_, r)| r),
            Literals::Many(m) => m.get(text),
        }
    }
}

/// A pattern that is run as a regex, and the rules that have it.
#[derive(Debug, Clone)]
struct PatternRules {
    regex: regex::Regex,
    rules: RuleBits,
}

/// The compiled patterns of one field (method, path or host) of all rules.
#[derive(Debug, Clone)]
struct FieldMatcher {
    /// The rules that name this field.
    rules: RuleBits,
    literals: Literals,
    /// The rules whose pattern for this field is one of `regexes`.
    regex_rules: RuleBits,
    /// Rule index → its pattern's index in `regexes` (for the rules of `regex_rules`).
    pattern_of: Box<[usize]>,
    regexes: Vec<PatternRules>,
    /// All of `regexes` as one set (pattern `i` is `regexes[i]`), when there are several.
    set: Option<meta::Regex>,
}

thread_local! {
    /// Scratch for [`FieldMatcher::set`] runs, grown to the largest set seen on the thread.
    static SET_MATCHES: RefCell<PatternSet> = RefCell::new(PatternSet::new(0));
}

/// Regexes of a field run one by one, rather than as the set, when at most this many are
/// needed for the rules still in the running.
const ONE_BY_ONE: usize = 2;

impl FieldMatcher {
    /// `patterns`: (rule index, pattern as written in the rule).
    fn build(
        patterns: &[(usize, &str)],
        rule_count: usize,
        field: &'static str,
    ) -> Result<FieldMatcher, L7Error> {
        let words = words_for(rule_count);
        let mut rules = vec![0u64; words].into_boxed_slice();
        let mut literals: Vec<(Box<[u8]>, RuleBits)> = Vec::new();
        let mut literal_index: HashMap<Box<[u8]>, usize> = HashMap::new();
        let mut regexes: Vec<PatternRules> = Vec::new();
        let mut regex_index: HashMap<&str, usize> = HashMap::new();
        let mut regex_rules = vec![0u64; words].into_boxed_slice();
        let mut pattern_of = vec![usize::MAX; rule_count].into_boxed_slice();
        for &(rule, pattern) in patterns {
            // Compiled on its own first, so an error names its rule.
            let regex = regex::Regex::new(&anchored(pattern)).map_err(|source| L7Error::Regex {
                rule,
                field,
                source,
            })?;
            set_bit(&mut rules, rule);
            if let Some(strings) = exact_strings(pattern) {
                for s in strings {
                    let s = s.into_boxed_slice();
                    let at = *literal_index.entry(s.clone()).or_insert_with(|| {
                        literals.push((s, vec![0u64; words].into_boxed_slice()));
                        literals.len() - 1
                    });
                    set_bit(&mut literals[at].1, rule);
                }
                continue;
            }
            let at = *regex_index.entry(pattern).or_insert_with(|| {
                regexes.push(PatternRules {
                    regex,
                    rules: vec![0u64; words].into_boxed_slice(),
                });
                regexes.len() - 1
            });
            set_bit(&mut regexes[at].rules, rule);
            set_bit(&mut regex_rules, rule);
            pattern_of[rule] = at;
        }
        let set = if regexes.len() > 1 {
            let all: Vec<&str> = regexes.iter().map(|p| p.regex.as_str()).collect();
            // As `regex::RegexSet` configures it.
            let set = meta::Builder::new()
                .configure(
                    meta::Config::new()
                        .match_kind(MatchKind::All)
                        .utf8_empty(true)
                        .which_captures(regex_automata::nfa::thompson::WhichCaptures::None)
                        .nfa_size_limit(Some(10 * (1 << 20)))
                        .hybrid_cache_capacity(2 * (1 << 20)),
                )
                .build_many(&all)
                .map_err(|e| L7Error::RegexSet {
                    field,
                    reason: e.to_string(),
                })?;
            Some(set)
        } else {
            None
        };
        let literals = if literals.len() <= Literals::FEW {
            Literals::Few(literals)
        } else {
            Literals::Many(literals.into_iter().collect())
        };
        Ok(FieldMatcher {
            rules,
            literals,
            regex_rules,
            pattern_of,
            regexes,
            set,
        })
    }

    /// Takes out of `running` the rules that name this field and whose pattern does not match
    /// `text`. `matched` is scratch of the same length.
    fn filter(&self, text: &str, running: &mut [u64], matched: &mut [u64]) {
        if !intersects(&self.rules, running) {
            return;
        }
        matched.fill(0);
        if let Some(r) = self.literals.get(text.as_bytes()) {
            or_into(matched, r);
        }
        // The rules still in the running whose pattern is a regex.
        let needed: u32 = running
            .iter()
            .zip(self.regex_rules.iter())
            .map(|(r, x)| (r & x).count_ones())
            .sum();
        match &self.set {
            Some(set) if needed as usize > ONE_BY_ONE => SET_MATCHES.with_borrow_mut(|found| {
                if found.capacity() < set.pattern_len() {
                    *found = PatternSet::new(set.pattern_len());
                } else {
                    found.clear();
                }
                set.which_overlapping_matches(&Input::new(text), found);
                for i in found.iter() {
                    or_into(matched, &self.regexes[i].rules);
                }
            }),
            _ if needed > 0 => {
                for rule in rules_in(running) {
                    let at = self.pattern_of[rule];
                    // A rule sharing its pattern with an earlier one has its bit already.
                    if at == usize::MAX || matched[rule / 64] & (1 << (rule % 64)) != 0 {
                        continue;
                    }
                    let p = &self.regexes[at];
                    if p.regex.is_match(text) {
                        or_into(matched, &p.rules);
                    }
                }
            }
            _ => {}
        }
        for ((r, f), m) in running
            .iter_mut()
            .zip(self.rules.iter())
            .zip(matched.iter())
        {
            *r &= !f | m;
        }
    }
}

/// The compiled HTTP rules of one (endpoint, remote identity, port).
#[derive(Debug, Clone)]
pub struct HttpPolicy {
    /// `None`: every request is allowed (an empty rule list, or an L4-only allow on the same
    /// port and peer that lifts the L7 restriction).
    rules: Option<Vec<CompiledRule>>,
    /// Every rule's bit.
    all: RuleBits,
    method: FieldMatcher,
    path: FieldMatcher,
    host: FieldMatcher,
    warnings: Vec<String>,
}

/// An empty field is the same as an absent one (Cilium: "If omitted or empty, all ... are
/// allowed").
fn field(f: &Option<String>) -> Option<&str> {
    f.as_deref().filter(|s| !s.is_empty())
}

fn anchored(re: &str) -> String {
    format!("^(?:{re})$")
}

impl HttpPolicy {
    /// A rule set that allows every request.
    pub fn allow_all() -> HttpPolicy {
        HttpPolicy {
            rules: None,
            all: Box::new([]),
            method: FieldMatcher::build(&[], 0, "method").expect("empty set"),
            path: FieldMatcher::build(&[], 0, "path").expect("empty set"),
            host: FieldMatcher::build(&[], 0, "host").expect("empty set"),
            warnings: Vec::new(),
        }
    }

    /// Compiles the rules of one port. An empty list allows everything (Cilium: a redirect
    /// with no HTTP rules only gives visibility). Secrets are read now; one that cannot be read
    /// is recorded in [`HttpPolicy::warnings`] and its condition never holds.
    pub fn compile(rules: &[HttpRule], secrets: &dyn SecretSource) -> Result<HttpPolicy, L7Error> {
        if rules.is_empty() {
            return Ok(HttpPolicy::allow_all());
        }
        let mut methods = Vec::new();
        let mut paths = Vec::new();
        let mut hosts = Vec::new();
        let mut compiled = Vec::with_capacity(rules.len());
        let mut warnings = Vec::new();
        for (i, r) in rules.iter().enumerate() {
            if let Some(m) = field(&r.method) {
                methods.push((i, m));
            }
            if let Some(p) = field(&r.path) {
                paths.push((i, p));
            }
            if let Some(h) = field(&r.host) {
                hosts.push((i, h));
            }
            let mut headers = Vec::new();
            for h in &r.headers {
                let name = header_name(i, "headers", &h.name)?;
                let value = match &h.value {
                    Some(v) => Some(header_value(i, "headers", &h.name, v)?),
                    None => None,
                };
                headers.push((name, value));
            }
            let mut header_matches = Vec::new();
            for hm in &r.header_matches {
                let name = header_name(i, "headerMatches", &hm.name)?;
                let expected = match (&hm.value, &hm.secret) {
                    (Some(v), _) => Expected::Value(header_value(i, "headerMatches", &hm.name, v)?),
                    (None, Some(sref)) => match secrets.secret(sref) {
                        Ok(v) => match HeaderValue::from_str(&v) {
                            Ok(v) => Expected::Value(v),
                            Err(_) => {
                                warnings.push(format!(
                                    "http rule {i}: headerMatches {}: secret {} is not a valid header value",
                                    hm.name,
                                    secret_display(sref)
                                ));
                                Expected::Unavailable
                            }
                        },
                        Err(e) => {
                            warnings.push(format!("http rule {i}: headerMatches {}: {e}", hm.name));
                            Expected::Unavailable
                        }
                    },
                    (None, None) => Expected::Present,
                };
                header_matches.push(CompiledHeaderMatch {
                    name,
                    expected,
                    mismatch: hm.mismatch,
                });
            }
            compiled.push(CompiledRule {
                headers,
                header_matches,
            });
        }
        let n = rules.len();
        let mut all = vec![0u64; words_for(n)].into_boxed_slice();
        (0..n).for_each(|i| set_bit(&mut all, i));
        Ok(HttpPolicy {
            rules: Some(compiled),
            all,
            method: FieldMatcher::build(&methods, n, "method")?,
            path: FieldMatcher::build(&paths, n, "path")?,
            host: FieldMatcher::build(&hosts, n, "host")?,
            warnings,
        })
    }

    /// Problems found while compiling that did not stop it (unreadable secrets).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Whether every request is allowed.
    pub fn allows_all(&self) -> bool {
        self.rules.is_none()
    }

    /// Decides one request. The first rule (in policy order) that matches decides which header
    /// actions apply.
    pub fn check(&self, req: &HttpRequestView<'_>) -> HttpDecision {
        self.check_parts(req.method, req.path, req.host, req.headers)
    }

    /// [`HttpPolicy::check`] on the parts of a request: its method, target (path and query),
    /// authority and header fields however they are held.
    pub fn check_parts<H: RequestHeaders + ?Sized>(
        &self,
        method: &str,
        path: &str,
        host: &str,
        headers: &H,
    ) -> HttpDecision {
        let Some(rules) = &self.rules else {
            return HttpDecision::Allowed {
                rule: None,
                actions: Vec::new(),
            };
        };
        // The rules still in the running, one bit each, and scratch; on the stack for up to
        // 256 rules.
        let words = self.all.len();
        let mut on_stack = [0u64; 8];
        let mut on_heap = Vec::new();
        let bits: &mut [u64] = if words <= 4 {
            &mut on_stack[..2 * words]
        } else {
            on_heap.resize(2 * words, 0);
            &mut on_heap
        };
        let (running, scratch) = bits.split_at_mut(words);
        running.copy_from_slice(&self.all);
        // Methods and hosts first: most often string compares that leave few rules to run
        // path regexes for.
        self.method.filter(method, running, scratch);
        self.host.filter(host, running, scratch);
        self.path.filter(path, running, scratch);
        'rules: for i in rules_in(running) {
            let r = &rules[i];
            for (name, value) in &r.headers {
                if !header_holds(headers, name, value.as_ref()) {
                    continue 'rules;
                }
            }
            let mut actions = Vec::new();
            for hm in &r.header_matches {
                let holds = match &hm.expected {
                    Expected::Present => headers.contains(&hm.name),
                    Expected::Value(v) => header_holds(headers, &hm.name, Some(v)),
                    Expected::Unavailable => false,
                };
                if holds {
                    continue;
                }
                let action = match (hm.mismatch, &hm.expected) {
                    (None, _) => continue 'rules,
                    (Some(MismatchAction::Log), _) => HeaderAction::Log {
                        name: hm.name.clone(),
                    },
                    (Some(MismatchAction::Delete), _) => HeaderAction::Delete {
                        name: hm.name.clone(),
                    },
                    (Some(MismatchAction::Add), Expected::Value(v)) => HeaderAction::Add {
                        name: hm.name.clone(),
                        value: v.clone(),
                    },
                    (Some(MismatchAction::Replace), Expected::Value(v)) => HeaderAction::Replace {
                        name: hm.name.clone(),
                        value: v.clone(),
                    },
                    // ADD/REPLACE with no value to write: the secret is unavailable (fail
                    // closed) or only presence was asked for (add an empty value, as Envoy).
                    (Some(MismatchAction::Add), Expected::Present) => HeaderAction::Add {
                        name: hm.name.clone(),
                        value: HeaderValue::from_static(""),
                    },
                    (Some(MismatchAction::Replace), Expected::Present) => HeaderAction::Replace {
                        name: hm.name.clone(),
                        value: HeaderValue::from_static(""),
                    },
                    (
                        Some(MismatchAction::Add | MismatchAction::Replace),
                        Expected::Unavailable,
                    ) => continue 'rules,
                };
                actions.push(action);
            }
            return HttpDecision::Allowed {
                rule: Some(i),
                actions,
            };
        }
        HttpDecision::Denied
    }
}

/// `value: None`: the header is present. `Some(v)`: one of its values is `v`, or all its values
/// joined with `,` are (how Envoy sees a repeated header).
fn header_holds<H: RequestHeaders + ?Sized>(
    headers: &H,
    name: &HeaderName,
    value: Option<&HeaderValue>,
) -> bool {
    let Some(want) = value else {
        return headers.contains(name);
    };
    let want = want.as_bytes();
    let mut joined: Vec<u8> = Vec::new();
    let mut count = 0;
    let one = headers.any_value(name, &mut |v| {
        if v == want {
            return true;
        }
        if count > 0 {
            joined.push(b',');
        }
        joined.extend_from_slice(v);
        count += 1;
        false
    });
    one || (count > 1 && joined == want)
}

fn header_name(rule: usize, field: &'static str, name: &str) -> Result<HeaderName, L7Error> {
    HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| L7Error::HeaderName {
        rule,
        field,
        name: name.to_string(),
    })
}

fn header_value(
    rule: usize,
    field: &'static str,
    name: &str,
    value: &str,
) -> Result<HeaderValue, L7Error> {
    HeaderValue::from_str(value).map_err(|_| L7Error::HeaderValue {
        rule,
        field,
        name: name.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::SecretError;
    use policy::model::{HeaderMatch, HeaderRule, SecretRef};

    struct NoSecrets;
    impl SecretSource for NoSecrets {
        fn secret(&self, s: &SecretRef) -> Result<String, SecretError> {
            if s.name == "token" {
                Ok("t0k".into())
            } else {
                Err(SecretError::NotFound(s.name.clone()))
            }
        }
    }

    fn rule(method: Option<&str>, path: Option<&str>, host: Option<&str>) -> HttpRule {
        HttpRule {
            method: method.map(Into::into),
            path: path.map(Into::into),
            host: host.map(Into::into),
            ..Default::default()
        }
    }

    fn check(
        p: &HttpPolicy,
        method: &str,
        path: &str,
        host: &str,
        hdrs: &[(&str, &str)],
    ) -> HttpDecision {
        let mut headers = HeaderMap::new();
        for (k, v) in hdrs {
            headers.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        p.check(&HttpRequestView {
            method,
            path,
            host,
            headers: &headers,
        })
    }

    #[test]
    fn fields_are_anchored_and_anded_rules_ored() {
        let p = HttpPolicy::compile(
            &[
                rule(Some("GET"), Some("/public/.*"), None),
                rule(
                    Some("POST|PUT"),
                    Some("/submit"),
                    Some("api\\.example\\.com"),
                ),
            ],
            &NoSecrets,
        )
        .unwrap();
        assert!(check(&p, "GET", "/public/a", "x", &[]).is_allowed());
        assert!(!check(&p, "GET", "/private/public/a", "x", &[]).is_allowed());
        assert!(!check(&p, "GETX", "/public/a", "x", &[]).is_allowed());
        assert!(!check(&p, "POST", "/public/a", "x", &[]).is_allowed());
        assert!(check(&p, "PUT", "/submit", "api.example.com", &[]).is_allowed());
        assert!(!check(&p, "PUT", "/submit", "api.example.com:8080", &[]).is_allowed());
        assert!(!check(&p, "PUT", "/submit?x=1", "api.example.com", &[]).is_allowed());
        assert!(!check(&p, "PUT", "/submit", "evil.com", &[]).is_allowed());
    }

    #[test]
    fn more_rules_than_the_flags_on_the_stack() {
        for n in [64, 65, 200, 256, 257, 300] {
            let rules: Vec<HttpRule> = (0..n)
                .map(|i| {
                    let path = format!("/r{i}");
                    let host = (i == n - 1).then_some("last\\.example");
                    rule(Some("GET"), Some(&path), host)
                })
                .collect();
            let p = HttpPolicy::compile(&rules, &NoSecrets).unwrap();
            assert!(check(&p, "GET", "/r0", "x", &[]).is_allowed(), "{n}");
            let last = format!("/r{}", n - 1);
            assert!(check(&p, "GET", &last, "last.example", &[]).is_allowed());
            assert!(!check(&p, "GET", &last, "other.example", &[]).is_allowed());
            assert!(!check(&p, "POST", "/r0", "x", &[]).is_allowed());
            assert!(!check(&p, "GET", &format!("/r{n}"), "x", &[]).is_allowed());
        }
    }

    #[test]
    fn empty_rules_and_empty_fields_allow_all() {
        let p = HttpPolicy::compile(&[], &NoSecrets).unwrap();
        assert!(p.allows_all());
        assert!(check(&p, "DELETE", "/x", "", &[]).is_allowed());
        let p = HttpPolicy::compile(&[rule(Some(""), None, None)], &NoSecrets).unwrap();
        assert!(check(&p, "DELETE", "/x", "", &[]).is_allowed());
    }

    #[test]
    fn headers_exact_or_present() {
        let mut r = rule(None, Some("/"), None);
        r.headers = vec![
            HeaderRule {
                name: "X-Token".into(),
                value: None,
            },
            HeaderRule {
                name: "x-env".into(),
                value: Some("prod".into()),
            },
        ];
        let p = HttpPolicy::compile(&[r], &NoSecrets).unwrap();
        assert!(check(&p, "GET", "/", "", &[("x-token", ""), ("X-Env", "prod")]).is_allowed());
        assert!(!check(&p, "GET", "/", "", &[("X-Env", "prod")]).is_allowed());
        assert!(!check(&p, "GET", "/", "", &[("x-token", "a"), ("X-Env", "dev")]).is_allowed());
        assert!(check(
            &p,
            "GET",
            "/",
            "",
            &[("x-token", "a"), ("X-Env", "dev"), ("x-env", "prod")]
        )
        .is_allowed());
    }

    #[test]
    fn header_matches_and_mismatch_actions() {
        let hm = |name: &str, value: Option<&str>, secret: Option<&str>, mismatch| HeaderMatch {
            name: name.into(),
            value: value.map(Into::into),
            secret: secret.map(|s| SecretRef {
                namespace: None,
                name: s.into(),
            }),
            mismatch,
        };
        let mut fail = rule(None, Some("/fail"), None);
        fail.header_matches = vec![hm("x-a", Some("1"), None, None)];
        let mut acts = rule(None, Some("/acts"), None);
        acts.header_matches = vec![
            hm("x-log", Some("1"), None, Some(MismatchAction::Log)),
            hm("x-add", Some("2"), None, Some(MismatchAction::Add)),
            hm("x-del", Some("3"), None, Some(MismatchAction::Delete)),
            hm(
                "authorization",
                None,
                Some("token"),
                Some(MismatchAction::Replace),
            ),
        ];
        let mut missing = rule(None, Some("/missing"), None);
        missing.header_matches = vec![hm(
            "x-s",
            None,
            Some("absent"),
            Some(MismatchAction::Replace),
        )];
        let p = HttpPolicy::compile(&[fail, acts, missing], &NoSecrets).unwrap();
        assert_eq!(p.warnings().len(), 1);
        assert!(check(&p, "GET", "/fail", "", &[("x-a", "1")]).is_allowed());
        assert!(!check(&p, "GET", "/fail", "", &[("x-a", "2")]).is_allowed());
        assert!(!check(&p, "GET", "/missing", "", &[]).is_allowed());
        let d = check(
            &p,
            "GET",
            "/acts",
            "",
            &[("x-add", "2"), ("x-del", "9"), ("x-log", "1")],
        );
        let HttpDecision::Allowed { rule, actions } = d else {
            panic!()
        };
        assert_eq!(rule, Some(1));
        assert_eq!(
            actions,
            vec![
                HeaderAction::Delete {
                    name: HeaderName::from_static("x-del")
                },
                HeaderAction::Replace {
                    name: HeaderName::from_static("authorization"),
                    value: HeaderValue::from_static("t0k")
                },
            ]
        );
        let mut h = HeaderMap::new();
        h.insert("x-del", HeaderValue::from_static("9"));
        h.insert("authorization", HeaderValue::from_static("bad"));
        for a in &actions {
            a.apply(&mut h);
        }
        assert!(h.get("x-del").is_none());
        assert_eq!(h.get("authorization").unwrap(), "t0k");
    }

    #[test]
    fn exact_strings_only_for_patterns_that_match_only_them() {
        let strings = |p: &str| {
            exact_strings(p).map(|v| {
                let mut v: Vec<String> = v
                    .into_iter()
                    .map(|s| String::from_utf8(s).unwrap())
                    .collect();
                v.sort();
                v
            })
        };
        assert_eq!(strings("GET"), Some(vec!["GET".into()]));
        assert_eq!(
            strings("PUT|PATCH"),
            Some(vec!["PATCH".into(), "PUT".into()])
        );
        assert_eq!(
            strings("(GET|HEAD)"),
            Some(vec!["GET".into(), "HEAD".into()])
        );
        assert_eq!(
            strings(r"api\.example\.com"),
            Some(vec!["api.example.com".into()])
        );
        assert_eq!(
            strings("(?i)ge"),
            Some(vec!["GE".into(), "Ge".into(), "gE".into(), "ge".into()])
        );
        assert_eq!(strings("a[bc]"), Some(vec!["ab".into(), "ac".into()]));
        assert_eq!(strings("GET|"), Some(vec!["".into(), "GET".into()]));
        for not in [
            ".*",
            "/api/.*",
            "a+",
            "a?",
            r"\bGET",
            "^GET",
            "GET$",
            r"\w",
            "(?-u:\\xff)",
            "x{2}",
            "a)|(b",
            "[a-z]{3}",
        ] {
            assert_eq!(strings(not), None, "{not}");
        }
    }

    /// Literal fields, regexes one by one and as a set, shared patterns and the order of
    /// fields give the decision a rule-by-rule match of the anchored regexes gives.
    #[test]
    fn matches_as_rule_by_rule_regexes() {
        use proptest::prelude::*;
        let methods = ["GET", "POST", "PUT|PATCH", "(?i)get", "G.T", "[A-Z]+", ""];
        let paths = [
            "/a",
            "/a/.*",
            "/a|/b",
            "/b/[0-9]+",
            "/(a|b)/c",
            "/a/b",
            ".*c",
            "",
        ];
        let hosts = ["h", r"h\.x", "h(:[0-9]+)?", "[hx]", ""];
        let rule_strategy = (0..methods.len(), 0..paths.len(), 0..hosts.len());
        let reqs = prop::collection::vec(
            (
                prop::sample::select(vec!["GET", "get", "POST", "PATCH", "GOT", "DELETE"]),
                prop::sample::select(vec!["/a", "/b", "/a/b", "/b/12", "/a/c", "/c", "/", "/a/"]),
                prop::sample::select(vec!["h", "h.x", "h:80", "x", "", "hx"]),
            ),
            1..8,
        );
        let mut runner = proptest::test_runner::TestRunner::default();
        runner
            .run(
                &(prop::collection::vec(rule_strategy, 1..12), reqs),
                |(picked, reqs)| {
                    let rules: Vec<HttpRule> = picked
                        .iter()
                        .map(|&(m, p, h)| {
                            let f = |s: &str| (!s.is_empty()).then(|| s.to_string());
                            HttpRule {
                                method: f(methods[m]),
                                path: f(paths[p]),
                                host: f(hosts[h]),
                                ..Default::default()
                            }
                        })
                        .collect();
                    let compiled = HttpPolicy::compile(&rules, &NoSecrets).unwrap();
                    let full = |re: &Option<String>, text: &str| {
                        re.as_ref().is_none_or(|re| {
                            regex::Regex::new(&format!("^(?:{re})$"))
                                .unwrap()
                                .is_match(text)
                        })
                    };
                    for (method, path, host) in reqs {
                        let want = rules.iter().position(|r| {
                            full(&r.method, method) && full(&r.path, path) && full(&r.host, host)
                        });
                        let got = match check(&compiled, method, path, host, &[]) {
                            HttpDecision::Allowed { rule, .. } => rule,
                            HttpDecision::Denied => None,
                        };
                        prop_assert_eq!(got, want, "{:?} {} {} {}", picked, method, path, host);
                    }
                    Ok(())
                },
            )
            .unwrap();
    }

    #[test]
    fn bad_regex_names_rule_and_field() {
        let e = HttpPolicy::compile(
            &[rule(None, None, None), rule(None, Some("(["), None)],
            &NoSecrets,
        )
        .unwrap_err();
        assert!(
            e.to_string().starts_with("http rule 1: field `path`"),
            "{e}"
        );
    }
}
