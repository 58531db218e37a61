//! Policy text → typed model, strictly, with every error reported as FILE:LINE:COLUMN.
//!
//! A file holds one or more documents (YAML `---` separated, or JSON). Each document is a
//! `cilium.io/v2` CiliumNetworkPolicy or CiliumClusterwideNetworkPolicy (`spec` and/or
//! `specs`), a `networking.k8s.io/v1` NetworkPolicy, or a top-level list of Cilium rules (the
//! plain format `cilium policy import` reads). Unknown fields, wrong types and bad values are
//! errors naming the field path; every problem of the file is collected, and any problem makes
//! the whole file fail (the caller keeps the policy it had).
//!
//! Namespace scoping is applied here, so the engine sees selectors that mean what they say:
//! see [`common::scope_peer`] and the NetworkPolicy notes in [`netpol`].

mod cilium;
mod common;
mod netpol;

use std::sync::Arc;

use crate::error::{Diagnostic, Span};
use crate::model::{Policy, PolicyKind};
use crate::yaml::{load_documents, Decoder, MapReader, Node, Path, Value};

pub use cilium::{KAFKA_CONSUME_KEYS, KAFKA_PRODUCE_KEYS};
use common::{check_object_name, Scope};

/// The length in characters of each line of `text`, line breaks as YAML counts them
/// (`\r\n`, `\r` or `\n`).
fn line_lengths(text: &str) -> Vec<u32> {
    let mut lines: Vec<u32> = vec![0];
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' | '\n' => {
                if c == '\r' && chars.peek() == Some(&'\n') {
                    chars.next();
                }
                lines.push(0);
            }
            _ => *lines.last_mut().expect("never empty") += 1,
        }
    }
    lines
}

/// The YAML scanner places an error or an empty value at the very end of a text that does
/// not end with a line break one line past the last one; such a position becomes the end of
/// the last line, so every diagnostic names a place that exists in the file.
fn clamp_to_text(span: Span, lines: &[u32]) -> Span {
    let last = lines.len() as u32;
    if span.line > last {
        return Span::new(last, lines[lines.len() - 1] + 1);
    }
    if span.line >= 1 {
        let len = lines[span.line as usize - 1];
        if span.column > len + 1 {
            return Span::new(span.line, len + 1);
        }
    }
    span
}

/// Parses one policy file (YAML or JSON; several `---` documents; a top-level array = Cilium's
/// plain rule list). All problems are collected. `file` is used verbatim in diagnostics and
/// `Policy::file`.
pub fn parse_policies(file: &str, text: &str) -> Result<Vec<Policy>, Vec<Diagnostic>> {
    parse_text(file, text).map_err(|mut diags| {
        let lines = line_lengths(text);
        for d in &mut diags {
            d.span = clamp_to_text(d.span, &lines);
        }
        diags
    })
}

fn parse_text(file: &str, text: &str) -> Result<Vec<Policy>, Vec<Diagnostic>> {
    let mut d = Decoder::new(file).with_case_insensitive_fields();
    let docs = match load_documents(text) {
        Ok(docs) => docs,
        Err((span, message)) => {
            d.error(span, &Path::root(), message);
            return Err(d.into_diagnostics());
        }
    };
    let file_arc = d.file().clone();
    let mut policies: Vec<Policy> = Vec::new();
    let list_docs = docs.iter().filter(|n| n.as_seq().is_some()).count();
    let mut list_index = 0;
    for doc in &docs {
        match &doc.value {
            // An empty document (`---` with nothing after it) is skipped, as kubectl does.
            Value::Null => {}
            Value::Seq(_) => {
                list_index += 1;
                let name = rule_list_name(file, list_docs, list_index);
                if let Some(p) = rule_list(&mut d, doc, &file_arc, name) {
                    policies.push(p);
                }
            }
            Value::Map(_) if is_list_object(doc) => {
                for p in list_object(&mut d, doc, &file_arc) {
                    push_unique(&mut d, &mut policies, p, &Path::root());
                }
            }
            Value::Map(_) => {
                if let Some(p) = object(&mut d, doc, &file_arc, &Path::root()) {
                    push_unique(&mut d, &mut policies, p, &Path::root());
                }
            }
            other => d.error(
                doc.span,
                &Path::root(),
                format!(
                    "expected a policy object or a list of rules, found {}",
                    other.type_name()
                ),
            ),
        }
    }
    d.finish(policies)
}

fn push_unique(d: &mut Decoder, policies: &mut Vec<Policy>, p: Policy, root: &Path) {
    if let Some(prev) = policies
        .iter()
        .find(|q| q.kind == p.kind && q.namespace == p.namespace && q.name == p.name)
    {
        d.error(
            p.span,
            &root.key("metadata").key("name"),
            format!(
                "{} {} is defined twice in this file (first at line {})",
                p.kind.as_str(),
                p.display_name(),
                prev.span.line
            ),
        );
    }
    policies.push(p);
}

/// `kind: List` (`apiVersion: v1`), what `kubectl get ... -o yaml` prints for several objects.
fn is_list_object(doc: &Node) -> bool {
    doc.get("kind").and_then(Node::as_str) == Some("List")
}

fn list_object(d: &mut Decoder, doc: &Node, file: &Arc<str>) -> Vec<Policy> {
    let root = Path::root();
    let mut out = Vec::new();
    let Some(mut m) = d.expect_map(doc, &root) else {
        return out;
    };
    m.ignore("kind");
    if let Some(api) = m.take_some("apiVersion") {
        if let Some(s) = d.expect_str(api, &root.key("apiVersion")) {
            if s != "v1" {
                d.error(
                    api.span,
                    &root.key("apiVersion"),
                    format!("apiVersion {s} is not valid for kind List; expected v1"),
                );
            }
        }
    }
    m.ignore("metadata");
    if let Some(items) = m.take_some("items") {
        let p = root.key("items");
        if let Some(items) = d.expect_seq(items, &p) {
            for (i, item) in items.iter().enumerate() {
                if let Some(pol) = object(d, item, file, &p.index(i)) {
                    out.push(pol);
                }
            }
        }
    }
    m.finish(d);
    out
}

/// Reads and parses a file from disk (an I/O error is one diagnostic at 0:0 naming the OS
/// error). The only file access of the crate, as a convenience for callers.
pub fn parse_policy_file(path: &std::path::Path) -> Result<Vec<Policy>, Vec<Diagnostic>> {
    let file = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => parse_policies(&file, &text),
        Err(e) => Err(vec![Diagnostic {
            file: Arc::from(file.as_str()),
            span: Span::default(),
            path: String::new(),
            message: format!("cannot read policy file: {e}"),
        }]),
    }
}

/// A rule list is named after its file (the last path component); a file with several rule
/// list documents numbers them.
fn rule_list_name(file: &str, count: usize, index: usize) -> String {
    let base = std::path::Path::new(file)
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_else(|| file.to_string());
    if count > 1 {
        format!("{base}#{index}")
    } else {
        base
    }
}

fn rule_list(d: &mut Decoder, doc: &Node, file: &Arc<str>, name: String) -> Option<Policy> {
    let before = d.error_count();
    let scope = Scope {
        kind: PolicyKind::RuleList,
        namespace: None,
    };
    let items = doc.as_seq()?;
    let mut rules = Vec::new();
    for (i, item) in items.iter().enumerate() {
        if let Some(r) = cilium::rule(d, item, &Path::root().index(i), &scope, true) {
            rules.push(r);
        }
    }
    (d.error_count() == before).then(|| Policy {
        kind: PolicyKind::RuleList,
        name,
        namespace: None,
        file: file.clone(),
        span: doc.span,
        rules,
    })
}

const CILIUM_API: &str = "cilium.io/v2";
const NETWORKING_API: &str = "networking.k8s.io/v1";

/// One Kubernetes object document.
fn object(d: &mut Decoder, doc: &Node, file: &Arc<str>, root: &Path) -> Option<Policy> {
    let before = d.error_count();
    let root = root.clone();
    let mut m = d.expect_map(doc, &root)?;
    let kind_node = m.take_some("kind");
    let api_node = m.take_some("apiVersion");
    let Some(kind_node) = kind_node else {
        d.error(
            doc.span,
            &root,
            "missing field `kind`: a policy document needs `apiVersion` and `kind` \
             (CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy or NetworkPolicy)",
        );
        // Still point at a mistyped apiVersion/kind key.
        m.finish(d);
        return None;
    };
    let kind_str = d.expect_str(kind_node, &root.key("kind"))?;
    let (kind, expected_api) = match kind_str {
        "CiliumNetworkPolicy" => (PolicyKind::CiliumNetworkPolicy, CILIUM_API),
        "CiliumClusterwideNetworkPolicy" => {
            (PolicyKind::CiliumClusterwideNetworkPolicy, CILIUM_API)
        }
        "NetworkPolicy" => (PolicyKind::NetworkPolicy, NETWORKING_API),
        other => {
            d.error(
                kind_node.span,
                &root.key("kind"),
                format!(
                    "kind {other} is not a policy kind (expected CiliumNetworkPolicy, \
                     CiliumClusterwideNetworkPolicy or NetworkPolicy)"
                ),
            );
            return None;
        }
    };
    match api_node {
        None => d.error(
            doc.span,
            &root,
            format!("missing field `apiVersion` (expected apiVersion: {expected_api})"),
        ),
        Some(n) => {
            if let Some(api) = d.expect_str(n, &root.key("apiVersion")) {
                if api != expected_api {
                    d.error(
                        n.span,
                        &root.key("apiVersion"),
                        format!("apiVersion {api} is not valid for kind {kind_str}; expected {expected_api}"),
                    );
                }
            }
        }
    }
    let (name, namespace) = metadata(d, &mut m, kind, &root);
    m.ignore("status");
    // Several of Cilium's own examples put a `description` beside `spec`; the API server
    // drops it and it carries no policy, so it is accepted (checked to be a string) there.
    if let Some(n) = m.take_some("description") {
        d.expect_str(n, &root.key("description"));
    }
    let scope = Scope {
        kind,
        namespace: namespace.clone(),
    };
    let mut rules = Vec::new();
    match kind {
        PolicyKind::NetworkPolicy => {
            if let Some(spec) = m.require(d, "spec") {
                let ns = namespace.as_deref().unwrap_or("default");
                if let Some(r) = netpol::spec(d, spec, &root.key("spec"), ns) {
                    rules.push(r);
                }
            }
        }
        _ => {
            let node_sel = cilium::allows_node_selector(kind);
            let spec = m.take_some("spec");
            let specs = m.take_some("specs");
            if spec.is_none() && specs.is_none() {
                d.error(
                    doc.span,
                    &root,
                    format!("a {kind_str} needs `spec` or `specs`"),
                );
            }
            if let Some(spec) = spec {
                if let Some(r) = cilium::rule(d, spec, &root.key("spec"), &scope, node_sel) {
                    rules.push(r);
                }
            }
            if let Some(specs) = specs {
                let p = root.key("specs");
                if let Some(items) = d.expect_seq(specs, &p) {
                    if items.is_empty() && spec.is_none() {
                        d.error(specs.span, &p, "`specs` is empty: the policy has no rules");
                    }
                    for (i, item) in items.iter().enumerate() {
                        if let Some(r) = cilium::rule(d, item, &p.index(i), &scope, node_sel) {
                            rules.push(r);
                        }
                    }
                }
            }
        }
    }
    m.finish(d);
    if d.error_count() > before {
        return None;
    }
    Some(Policy {
        kind,
        name: name?,
        namespace,
        file: file.clone(),
        span: doc.span,
        rules,
    })
}

/// Standard object metadata. Returns the name and, for namespaced kinds, the namespace
/// (`default` when not given, as Kubernetes and Cilium assume).
fn metadata(
    d: &mut Decoder,
    m: &mut MapReader<'_>,
    kind: PolicyKind,
    root: &Path,
) -> (Option<String>, Option<String>) {
    let Some(md) = m.require(d, "metadata") else {
        return (None, kind.is_namespaced().then(|| "default".to_string()));
    };
    let mp = root.key("metadata");
    let Some(mut mm) = d.expect_map(md, &mp) else {
        return (None, None);
    };
    let mut name = None;
    match mm.take_some("name") {
        Some(n) => {
            if let Some(s) = d.expect_str(n, &mp.key("name")) {
                check_object_name(d, s, n.span, &mp.key("name"), "name");
                name = Some(s.to_string());
            }
        }
        None => {
            if mm.take_some("generateName").is_some() {
                mm.error_at(
                    d,
                    "generateName",
                    "generateName is not supported: give the policy a `name`",
                );
            } else {
                d.error(md.span, &mp, "missing field `name`");
            }
        }
    }
    let mut namespace = None;
    if let Some(n) = mm.take_some("namespace") {
        let p = mp.key("namespace");
        if let Some(s) = d.expect_str(n, &p) {
            if !kind.is_namespaced() {
                d.error(
                    n.span,
                    &p,
                    format!("a {} is cluster-scoped and has no namespace", kind.as_str()),
                );
            } else {
                let ok = !s.is_empty()
                    && s.len() <= 63
                    && s.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                    && !s.starts_with('-')
                    && !s.ends_with('-');
                if ok {
                    namespace = Some(s.to_string());
                } else {
                    d.error(
                        n.span,
                        &p,
                        format!("invalid namespace {s:?}: lower-case letters, digits and '-', at most 63"),
                    );
                }
            }
        }
    }
    if kind.is_namespaced() && namespace.is_none() {
        namespace = Some("default".to_string());
    }
    for f in ["labels", "annotations"] {
        if let Some(n) = mm.take_some(f) {
            d.expect_str_map(n, &mp.key(f));
        }
    }
    // Fields the API server sets or that carry no meaning for enforcement: accepted so that
    // `kubectl get -o yaml` output loads as is.
    for f in [
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "finalizers",
        "ownerReferences",
        "managedFields",
        "selfLink",
        "generateName",
    ] {
        mm.ignore(f);
    }
    mm.finish(d);
    (name, namespace)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errs(text: &str) -> Vec<String> {
        parse_policies("p.yaml", text)
            .unwrap_err()
            .iter()
            .map(|d| d.to_string())
            .collect()
    }

    #[test]
    fn minimal_cnp() {
        let p = parse_policies(
            "p.yaml",
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: a, namespace: ns1}\nspec:\n  endpointSelector: {}\n  egress: []\n",
        )
        .unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].display_name(), "ns1/a");
        assert!(p[0].rules[0].default_deny.egress);
        assert!(!p[0].rules[0].default_deny.ingress);
    }

    #[test]
    fn not_a_policy_kind() {
        assert_eq!(
            errs("apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n"),
            vec!["p.yaml:2:7: kind: kind Pod is not a policy kind (expected CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy or NetworkPolicy)"]
        );
    }

    #[test]
    fn syntax_error_is_one_diagnostic() {
        let e = errs("a: [\n");
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with("p.yaml:"), "{e:?}");
    }

    #[test]
    fn io_error() {
        let e = parse_policy_file(std::path::Path::new("/nonexistent/x.yaml")).unwrap_err();
        assert_eq!(e[0].span, Span::default());
        assert!(e[0].message.contains("cannot read policy file"), "{e:?}");
    }
}
