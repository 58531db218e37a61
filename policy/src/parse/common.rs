//! Pieces shared by the Cilium and Kubernetes readers: label selectors and namespace
//! scoping, CIDRs, port numbers and names.

use ipnet::IpNet;

use crate::error::Span;
use crate::labels::{
    LabelKey, LabelSelector, Operator, Requirement, NAMESPACE_LABEL, NAMESPACE_LABELS_PREFIX,
    SOURCE_K8S, SOURCE_RESERVED,
};
use crate::model::{CidrSelector, PolicyKind};
use crate::yaml::{Decoder, Node, Path};

/// What the document around a rule decides about its selectors.
#[derive(Debug, Clone)]
pub(crate) struct Scope {
    pub kind: PolicyKind,
    /// The policy's namespace for namespaced kinds.
    pub namespace: Option<String>,
}

/// How selector keys without a source are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyStyle {
    /// Cilium: `k8s:app`, `reserved:host`, or `app` (any source).
    Cilium,
    /// Kubernetes: plain label keys, which are `k8s:` labels on endpoints.
    Kubernetes,
}

/// Reads a `LabelSelector` (`matchLabels` + `matchExpressions`), checking keys, values and
/// operators as Kubernetes does. Requirements are sorted so equal selectors compare equal.
pub(crate) fn label_selector(
    d: &mut Decoder,
    node: &Node,
    path: &Path,
    style: KeyStyle,
) -> Option<LabelSelector> {
    let mut m = d.expect_map(node, path)?;
    let before = d.error_count();
    let mut requirements = Vec::new();
    if let Some(ml) = m.take_some("matchLabels") {
        let mpath = path.key("matchLabels");
        if let Some(entries) = d.expect_str_map(ml, &mpath) {
            for e in entries {
                let epath = mpath.key(e.key);
                let Some(key) = label_key(d, e.key, e.key_span, &epath, style) else {
                    continue;
                };
                check_label_value(d, e.value, e.value_span, &epath);
                requirements.push(Requirement {
                    key,
                    op: Operator::In(vec![e.value.to_string()]),
                });
            }
        }
    }
    if let Some(me) = m.take_some("matchExpressions") {
        let mpath = path.key("matchExpressions");
        if let Some(items) = d.expect_seq(me, &mpath) {
            for (i, item) in items.iter().enumerate() {
                if let Some(r) = match_expression(d, item, &mpath.index(i), style) {
                    requirements.push(r);
                }
            }
        }
    }
    m.finish(d);
    if d.error_count() > before {
        return None;
    }
    Some(normalize(requirements))
}

/// Sorts and de-duplicates requirements (and the values of each).
pub(crate) fn normalize(mut requirements: Vec<Requirement>) -> LabelSelector {
    for r in &mut requirements {
        if let Operator::In(vs) | Operator::NotIn(vs) = &mut r.op {
            vs.sort();
            vs.dedup();
        }
    }
    requirements.sort();
    requirements.dedup();
    LabelSelector { requirements }
}

fn match_expression(
    d: &mut Decoder,
    node: &Node,
    path: &Path,
    style: KeyStyle,
) -> Option<Requirement> {
    let mut m = d.expect_map(node, path)?;
    let key_node = m.require(d, "key");
    let op_node = m.require(d, "operator");
    let values_node = m.take_some("values");
    m.finish(d);
    let key_str = d.expect_str(key_node?, &path.key("key"))?;
    let key = label_key(d, key_str, key_node?.span, &path.key("key"), style)?;
    let op = d.expect_str(op_node?, &path.key("operator"))?;
    let vpath = path.key("values");
    let values: Vec<String> = match values_node {
        Some(v) => {
            let list = d.expect_str_list(v, &vpath)?;
            for (i, (s, span)) in list.iter().enumerate() {
                check_label_value(d, s, *span, &vpath.index(i));
            }
            list.into_iter().map(|(s, _)| s.to_string()).collect()
        }
        None => Vec::new(),
    };
    // Operators are compared ignoring case, as Cilium's selector conversion does
    // (`strings.ToLower(operator)`); some of its examples write `in`.
    let op = match op {
        o if o.eq_ignore_ascii_case("In") => "In",
        o if o.eq_ignore_ascii_case("NotIn") => "NotIn",
        o if o.eq_ignore_ascii_case("Exists") => "Exists",
        o if o.eq_ignore_ascii_case("DoesNotExist") => "DoesNotExist",
        o => o,
    };
    let op = match op {
        "In" | "NotIn" => {
            if values.is_empty() {
                d.error(
                    values_node.map_or(node.span, |v| v.span),
                    &vpath,
                    format!("operator {op} needs at least one value"),
                );
                return None;
            }
            if op == "In" {
                Operator::In(values)
            } else {
                Operator::NotIn(values)
            }
        }
        "Exists" | "DoesNotExist" => {
            if !values.is_empty() {
                d.error(
                    values_node.map_or(node.span, |v| v.span),
                    &vpath,
                    format!("operator {op} takes no values"),
                );
                return None;
            }
            if op == "Exists" {
                Operator::Exists
            } else {
                Operator::DoesNotExist
            }
        }
        other => {
            d.error(
                op_node?.span,
                &path.key("operator"),
                format!("unknown operator {other:?}; expected In, NotIn, Exists or DoesNotExist"),
            );
            return None;
        }
    };
    Some(Requirement { key, op })
}

/// A selector key. Kubernetes keys: `[prefix/]name`, prefix a DNS subdomain, name at most 63
/// characters of `[A-Za-z0-9_.-]` starting and ending alphanumeric. Cilium keys may carry a
/// `source:` prefix and, for `cidr:` keys, the colons of an IPv6 prefix.
fn label_key(
    d: &mut Decoder,
    s: &str,
    span: Span,
    path: &Path,
    style: KeyStyle,
) -> Option<LabelKey> {
    let key = match style {
        KeyStyle::Cilium => LabelKey::parse(s),
        KeyStyle::Kubernetes => LabelKey {
            source: Some(SOURCE_K8S.to_string()),
            key: s.to_string(),
        },
    };
    let problem = if key.key.is_empty() {
        Some("label key must not be empty".to_string())
    } else if key.key.len() > 317 {
        Some("label key is longer than 317 characters".to_string())
    } else if key.source.as_deref() == Some("cidr") {
        None
    } else if let Some(c) = key
        .key
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/')))
    {
        Some(format!("label key {s:?} contains {c:?}"))
    } else {
        let name = key.key.rsplit('/').next().unwrap_or("");
        if key.key.matches('/').count() > 1 {
            Some(format!("label key {s:?} has more than one '/'"))
        } else if name.is_empty() || name.len() > 63 {
            Some(format!(
                "label key {s:?}: the name part must be 1 to 63 characters"
            ))
        } else if !name.starts_with(|c: char| c.is_ascii_alphanumeric())
            || !name.ends_with(|c: char| c.is_ascii_alphanumeric())
        {
            Some(format!(
                "label key {s:?}: the name part must start and end with a letter or digit"
            ))
        } else {
            None
        }
    };
    if let Some(p) = problem {
        d.error(span, path, p);
        return None;
    }
    Some(key)
}

/// Kubernetes label values: empty, or at most 63 characters of `[A-Za-z0-9_.-]` starting and
/// ending alphanumeric (Cilium's CRD schema applies the same pattern).
pub(crate) fn check_label_value(d: &mut Decoder, v: &str, span: Span, path: &Path) {
    if v.is_empty() {
        return;
    }
    let ok = v.len() <= 63
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && v.starts_with(|c: char| c.is_ascii_alphanumeric())
        && v.ends_with(|c: char| c.is_ascii_alphanumeric());
    if !ok {
        d.error(
            span,
            path,
            format!(
                "invalid label value {v:?}: at most 63 letters, digits, '-', '_' or '.', \
                 starting and ending with a letter or digit"
            ),
        );
    }
}

fn ns_key() -> LabelKey {
    LabelKey {
        source: Some(SOURCE_K8S.to_string()),
        key: NAMESPACE_LABEL.to_string(),
    }
}

/// `k8s:io.kubernetes.pod.namespace In [ns]`.
pub(crate) fn namespace_requirement(ns: &str) -> Requirement {
    Requirement {
        key: ns_key(),
        op: Operator::In(vec![ns.to_string()]),
    }
}

/// Whether a requirement's key is `key` from the `k8s` source or any source (how Cilium's
/// `HasKey("k8s:…")`/`HasKey("any:…")` checks read).
fn is_k8s_or_any(k: &LabelKey) -> bool {
    k.source.is_none() || k.source.as_deref() == Some(SOURCE_K8S)
}

pub(crate) fn names_namespace(sel: &LabelSelector) -> bool {
    sel.requirements
        .iter()
        .any(|r| r.key.key == NAMESPACE_LABEL && is_k8s_or_any(&r.key))
}

fn names_namespace_labels(sel: &LabelSelector) -> bool {
    sel.requirements
        .iter()
        .any(|r| r.key.key.starts_with(NAMESPACE_LABELS_PREFIX) && is_k8s_or_any(&r.key))
}

fn names_reserved(sel: &LabelSelector) -> bool {
    sel.requirements
        .iter()
        .any(|r| r.key.source.as_deref() == Some(SOURCE_RESERVED))
}

/// Whether a subject selector selects initializing endpoints (`reserved:init`).
pub(crate) fn selects_init(sel: &LabelSelector) -> bool {
    sel.requirements
        .iter()
        .any(|r| r.key.source.as_deref() == Some(SOURCE_RESERVED) && r.key.key == "init")
}

/// Scopes a peer endpoint selector the way Cilium's `getEndpointSelector` does
/// (pkg/k8s/apis/cilium.io/utils/utils.go):
/// - selectors naming a `reserved:` label are left alone (e.g. `reserved:host`);
/// - selectors naming the namespace label (k8s or any source) are left alone;
/// - CiliumNetworkPolicy: otherwise `k8s:io.kubernetes.pod.namespace In [ns]` is added, unless
///   the selector uses namespace labels (`io.cilium.k8s.namespace.labels.*`);
/// - CiliumClusterwideNetworkPolicy: otherwise `k8s:io.kubernetes.pod.namespace Exists` is
///   added (only Kubernetes-managed endpoints), unless the rule's subject selects
///   `reserved:init` endpoints;
/// - plain rule lists (`cilium policy import`) are not scoped at all.
///
/// `requires` selects the `fromRequires` flavour, for which the reserved exception does not apply.
pub(crate) fn scope_peer(
    mut sel: LabelSelector,
    scope: &Scope,
    subject_selects_init: bool,
    requires: bool,
) -> LabelSelector {
    if scope.kind == PolicyKind::RuleList {
        return sel;
    }
    if !requires && names_reserved(&sel) {
        return sel;
    }
    if names_namespace(&sel) {
        return sel;
    }
    match &scope.namespace {
        None => {
            if !subject_selects_init {
                sel.requirements.push(Requirement {
                    key: ns_key(),
                    op: Operator::Exists,
                });
            }
        }
        Some(ns) => {
            if !names_namespace_labels(&sel) {
                sel.requirements.push(namespace_requirement(ns));
            }
        }
    }
    normalize(sel.requirements)
}

/// A CIDR of `fromCIDR`/`toCIDR`: a prefix, or a bare address (a /32 or /128).
/// Host bits are cleared (`10.1.2.3/8` is `10.0.0.0/8`), as Cilium does when it turns the
/// prefix into an identity (`netip.ParsePrefix` accepts them; the selector uses `Masked()`).
pub(crate) fn cidr_or_addr(s: &str) -> Result<IpNet, String> {
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    if let Ok(addr) = s.parse::<std::net::IpAddr>() {
        return Ok(IpNet::from(addr));
    }
    Err(format!(
        "{s:?} is not a valid CIDR (e.g. 10.0.0.0/8, 2001:db8::/32) or IP address"
    ))
}

/// A CIDR in prefix notation (CIDRSet, ipBlock).
pub(crate) fn cidr_prefix(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .map(|n| n.trunc())
        .map_err(|_| format!("{s:?} is not a valid CIDR in prefix notation (e.g. 10.0.0.0/8)"))
}

/// Reads a CIDR with exceptions; every exception must lie within the CIDR (same family,
/// prefix at least as long), as Cilium's `CIDRRule.Validate` requires.
pub(crate) fn cidr_with_except(
    d: &mut Decoder,
    cidr_node: &Node,
    cidr_path: &Path,
    except_node: Option<&Node>,
    except_path: &Path,
) -> Option<CidrSelector> {
    let s = d.expect_str(cidr_node, cidr_path)?;
    let cidr = match cidr_prefix(s) {
        Ok(c) => c,
        Err(e) => {
            d.error(cidr_node.span, cidr_path, e);
            return None;
        }
    };
    let mut except = Vec::new();
    let mut ok = true;
    if let Some(en) = except_node {
        for (i, (s, span)) in d.expect_str_list(en, except_path)?.into_iter().enumerate() {
            let p = except_path.index(i);
            match cidr_prefix(s) {
                Ok(e) if cidr.contains(&e) => except.push(e),
                Ok(_) => {
                    d.error(span, &p, format!("except {s} is not within {cidr}"));
                    ok = false;
                }
                Err(e) => {
                    d.error(span, &p, e);
                    ok = false;
                }
            }
        }
    }
    except.sort();
    except.dedup();
    ok.then_some(CidrSelector { cidr, except })
}

/// IANA service name rules for named ports (RFC 6335 §5.1, as Kubernetes and Cilium check
/// them): 1–15 characters of `[a-z0-9-]` (Cilium also accepts upper case and lower-cases it),
/// at least one letter, no leading, trailing or doubled '-'.
pub(crate) fn is_svc_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        && s.chars().any(|c| c.is_ascii_alphabetic())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

/// A DNS subdomain name (object names): lower-case alphanumerics, '-' and '.', at most 253.
pub(crate) fn check_object_name(d: &mut Decoder, s: &str, span: Span, path: &Path, what: &str) {
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.'))
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric());
    if !ok {
        d.error(
            span,
            path,
            format!(
                "invalid {what} {s:?}: lower-case letters, digits, '-' and '.', starting and \
                 ending with a letter or digit, at most 253 characters"
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::yaml::load_documents;

    fn sel(text: &str) -> Result<LabelSelector, Vec<String>> {
        let doc = load_documents(text).unwrap().remove(0);
        let mut d = Decoder::new("t");
        let s = label_selector(&mut d, &doc, &Path::root().key("s"), KeyStyle::Cilium);
        let diags: Vec<String> = d.into_diagnostics().iter().map(|x| x.to_string()).collect();
        s.ok_or(diags)
    }

    #[test]
    fn selectors() {
        let s = sel("matchLabels: {app: web, 'k8s:tier': db}\nmatchExpressions:\n- {key: env, operator: NotIn, values: [prod]}\n").unwrap();
        assert_eq!(s.requirements.len(), 3);
        assert!(sel("matchExpressions:\n- {key: env, operator: In}\n").is_err());
        assert!(sel("matchExpressions:\n- {key: env, operator: Exists, values: [x]}\n").is_err());
        let e = sel("matchExpressions:\n- {key: env, operator: Like, values: [x]}\n").unwrap_err();
        assert_eq!(e, vec!["t:2:24: s.matchExpressions[0].operator: unknown operator \"Like\"; expected In, NotIn, Exists or DoesNotExist"]);
        let e = sel("matchLabels: {app: 'has space'}\n").unwrap_err();
        assert!(e[0].contains("invalid label value"), "{e:?}");
        assert!(sel("{}").unwrap().is_wildcard());
    }

    #[test]
    fn cidrs() {
        assert_eq!(
            cidr_or_addr("10.1.2.3/8").unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(cidr_or_addr("10.1.2.3").unwrap().to_string(), "10.1.2.3/32");
        assert_eq!(
            cidr_or_addr("2001:db8::1").unwrap().to_string(),
            "2001:db8::1/128"
        );
        assert!(cidr_or_addr("10.0.0.0/33").is_err());
        assert!(cidr_prefix("10.0.0.1").is_err());
    }

    #[test]
    fn svc_names() {
        for ok in ["http", "http-alt", "dns-tcp", "a1", "HTTP"] {
            assert!(is_svc_name(ok), "{ok}");
        }
        for bad in [
            "",
            "80",
            "-http",
            "http-",
            "ht--tp",
            "averyveryverylongname",
            "h_t",
        ] {
            assert!(!is_svc_name(bad), "{bad}");
        }
    }
}
