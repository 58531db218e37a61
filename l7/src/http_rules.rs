//! Compiled HTTP rules of one (endpoint, remote identity, port): the per-request decision.
//!
//! `method`, `path` and `host` are regular expressions anchored at both ends (as Envoy's
//! `safe_regex` full match that Cilium configures). Each field of all rules goes into one
//! [`RegexSet`], so a request is matched against every rule in one pass per field; a rule
//! matches when each field it names is in its set's matches and its header conditions hold.
//! Rules are ORed. `path` is matched against the request target as sent (path and query),
//! exactly as Cilium matches `:path`; `host` against the authority (Host header in HTTP/1.1,
//! `:authority` in HTTP/2), port included when the client sent one.
//!
//! `headerMatches` follow Cilium: a match that holds is fine; a mismatch without an action
//! makes the rule not match; with an action (LOG, ADD, DELETE, REPLACE) the rule still
//! matches and the action is returned for the proxy to apply before forwarding.

use http::header::{HeaderMap, HeaderName, HeaderValue};
use policy::model::{HttpRule, MismatchAction};
use regex::RegexSet;

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
    method: bool,
    path: bool,
    host: bool,
    /// `headers`: name and optional exact value.
    headers: Vec<(HeaderName, Option<HeaderValue>)>,
    header_matches: Vec<CompiledHeaderMatch>,
}

#[derive(Debug, Clone)]
struct FieldSet {
    set: RegexSet,
    /// Set pattern index → rule index.
    rule_of: Vec<usize>,
}

impl FieldSet {
    fn build(patterns: Vec<(usize, String)>, field: &'static str) -> Result<FieldSet, L7Error> {
        // Compile each pattern on its own first so an error names its rule.
        for (rule, p) in &patterns {
            regex::Regex::new(p).map_err(|source| L7Error::Regex {
                rule: *rule,
                field,
                source,
            })?;
        }
        let set =
            RegexSet::new(patterns.iter().map(|(_, p)| p)).map_err(|source| L7Error::Regex {
                rule: patterns.first().map(|(r, _)| *r).unwrap_or(0),
                field,
                source,
            })?;
        Ok(FieldSet {
            set,
            rule_of: patterns.into_iter().map(|(r, _)| r).collect(),
        })
    }

    /// Marks in `hits` (one flag per rule) the rules whose field matches `text`.
    fn mark(&self, text: &str, hits: &mut [bool]) {
        if self.rule_of.is_empty() {
            return;
        }
        for i in self.set.matches(text).iter() {
            hits[self.rule_of[i]] = true;
        }
    }
}

/// The compiled HTTP rules of one (endpoint, remote identity, port).
#[derive(Debug, Clone)]
pub struct HttpPolicy {
    /// `None`: every request is allowed (an empty rule list, or an L4-only allow on the same
    /// port and peer that lifts the L7 restriction).
    rules: Option<Vec<CompiledRule>>,
    method: FieldSet,
    path: FieldSet,
    host: FieldSet,
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
            method: FieldSet::build(Vec::new(), "method").expect("empty set"),
            path: FieldSet::build(Vec::new(), "path").expect("empty set"),
            host: FieldSet::build(Vec::new(), "host").expect("empty set"),
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
                methods.push((i, anchored(m)));
            }
            if let Some(p) = field(&r.path) {
                paths.push((i, anchored(p)));
            }
            if let Some(h) = field(&r.host) {
                hosts.push((i, anchored(h)));
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
                method: field(&r.method).is_some(),
                path: field(&r.path).is_some(),
                host: field(&r.host).is_some(),
                headers,
                header_matches,
            });
        }
        Ok(HttpPolicy {
            rules: Some(compiled),
            method: FieldSet::build(methods, "method")?,
            path: FieldSet::build(paths, "path")?,
            host: FieldSet::build(hosts, "host")?,
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
        let Some(rules) = &self.rules else {
            return HttpDecision::Allowed {
                rule: None,
                actions: Vec::new(),
            };
        };
        let n = rules.len();
        // One flag per rule and field; on the stack for up to 64 rules (this runs for every
        // request, and a zeroed heap allocation costs more than the flags' use).
        let mut on_stack = [false; 3 * 64];
        let mut on_heap = Vec::new();
        let flags: &mut [bool] = if n <= 64 {
            &mut on_stack[..3 * n]
        } else {
            on_heap.resize(3 * n, false);
            &mut on_heap
        };
        let (m, rest) = flags.split_at_mut(n);
        let (p, h) = rest.split_at_mut(n);
        self.method.mark(req.method, m);
        self.path.mark(req.path, p);
        self.host.mark(req.host, h);
        'rules: for (i, r) in rules.iter().enumerate() {
            if (r.method && !m[i]) || (r.path && !p[i]) || (r.host && !h[i]) {
                continue;
            }
            for (name, value) in &r.headers {
                if !header_holds(req.headers, name, value.as_ref()) {
                    continue 'rules;
                }
            }
            let mut actions = Vec::new();
            for hm in &r.header_matches {
                let holds = match &hm.expected {
                    Expected::Present => req.headers.contains_key(&hm.name),
                    Expected::Value(v) => header_holds(req.headers, &hm.name, Some(v)),
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
fn header_holds(headers: &HeaderMap, name: &HeaderName, value: Option<&HeaderValue>) -> bool {
    let Some(want) = value else {
        return headers.contains_key(name);
    };
    let mut all = headers.get_all(name).iter().peekable();
    if all.peek().is_none() {
        return false;
    }
    let mut joined: Vec<u8> = Vec::new();
    let mut count = 0;
    for v in all {
        if v == want {
            return true;
        }
        if count > 0 {
            joined.push(b',');
        }
        joined.extend_from_slice(v.as_bytes());
        count += 1;
    }
    count > 1 && joined == want.as_bytes()
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
        for n in [64, 65, 200] {
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
