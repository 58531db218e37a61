//! The real-world corpus (`shared/corpus`: Cilium's example policies and the Kubernetes
//! network policy recipes) must load, except for the files listed below with the reason.
//!
//! The corpus lives beside the repository (`CARGO_MANIFEST_DIR/../../shared/corpus`); if it is
//! missing the test fails rather than passing without checking anything.

use std::path::{Path, PathBuf};

use policy::parse::parse_policy_file;

/// Files that hold no policy at all (Kubernetes workloads, Envoy configurations): each must be
/// rejected as "not a policy kind".
const NOT_POLICIES: &[&str] = &[
    "cilium-examples/kubernetes/namespace/demo-pods.yaml",
    "cilium-examples/kubernetes/serviceaccount/demo-pods.yaml",
    "cilium-examples/l4/envoy_forward_proxy_cec.yaml",
    "cilium-examples/l4/envoy_listener_redirect_cec.yaml",
];

/// Files using a feature fqdnwall does not support yet: file → the feature the error names.
/// The README lists these features as not yet supported.
const UNSUPPORTED: &[(&str, &str)] = &[
    ("cilium-examples/auth/auth.yaml", "mutual authentication"),
    (
        "cilium-examples/host/allow-extended-protocols.yaml",
        "extended IP protocols",
    ),
    (
        "cilium-examples/l3/service/service-labels.json",
        "toServices",
    ),
    (
        "cilium-examples/l3/service/service-labels.yaml",
        "toServices",
    ),
    ("cilium-examples/l3/service/service.json", "toServices"),
    ("cilium-examples/l3/service/service.yaml", "toServices"),
    ("cilium-examples/l4/envoy_forward_proxy.yaml", "listener"),
    (
        "cilium-examples/l4/envoy_listener_redirect.yaml",
        "listener",
    ),
    ("cilium-examples/l4/wildcard_port_listener.yaml", "listener"),
    ("cilium-examples/service.yaml", "toServices"),
];

/// Files that Kubernetes itself would reject (a mistake in the upstream example): file → the
/// error fqdnwall reports.
const INVALID_UPSTREAM: &[(&str, &str)] = &[
    // `role: frontend` is indented as a sibling of an empty `matchLabels:`; Cilium's lenient
    // decoding drops it and the rule then allows every endpoint of the namespace.
    (
        "cilium-examples/l4/l3_l4_combined.yaml",
        "unknown field `role`",
    ),
    ("cilium-examples/multi_rule.yaml", "unknown field `role`"),
    // `description` under `metadata`, which Kubernetes object metadata does not have.
    (
        "cilium-examples/kubernetes/clustermesh/cross-cluster-policy.yaml",
        "metadata.description: unknown field `description`",
    ),
];

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/corpus")
}

fn policy_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            policy_files(&p, out);
        } else if matches!(
            p.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        ) {
            out.push(p);
        }
    }
}

#[test]
fn corpus() {
    let dir = corpus_dir();
    assert!(
        dir.is_dir(),
        "the policy corpus is missing: expected it at {} (shared/ beside the repository)",
        dir.display()
    );
    let mut files = Vec::new();
    policy_files(&dir, &mut files);
    assert!(
        files.len() >= 150,
        "only {} corpus files found in {}",
        files.len(),
        dir.display()
    );
    let mut failures = Vec::new();
    let mut loaded = 0;
    for f in &files {
        let rel = f.strip_prefix(&dir).unwrap().to_string_lossy().into_owned();
        let result = parse_policy_file(f);
        let errors: Vec<String> = match &result {
            Ok(_) => Vec::new(),
            Err(d) => d.iter().map(|d| d.to_string()).collect(),
        };
        let expect = |needle: &str, what: &str, failures: &mut Vec<String>| {
            if errors.is_empty() {
                failures.push(format!("{rel}: loaded, but is listed as {what}"));
            } else if !errors.iter().all(|e| e.contains(needle)) {
                failures.push(format!(
                    "{rel}: expected every error to mention {needle:?} ({what}), got:\n  {}",
                    errors.join("\n  ")
                ));
            }
        };
        if NOT_POLICIES.contains(&rel.as_str()) {
            expect("is not a policy kind", "not a policy", &mut failures);
        } else if let Some((_, feature)) = UNSUPPORTED.iter().find(|(f, _)| *f == rel) {
            expect(feature, "using an unsupported feature", &mut failures);
            if !errors.iter().all(|e| e.contains("not supported")) {
                failures.push(format!(
                    "{rel}: errors do not say \"not supported\": {errors:?}"
                ));
            }
        } else if let Some((_, msg)) = INVALID_UPSTREAM.iter().find(|(f, _)| *f == rel) {
            expect(msg, "invalid upstream", &mut failures);
        } else {
            match result {
                Ok(policies) => {
                    assert!(!policies.is_empty(), "{rel}: no policies");
                    loaded += 1;
                }
                Err(_) => failures.push(format!("{rel}:\n  {}", errors.join("\n  "))),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} corpus failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(
        loaded + NOT_POLICIES.len() + UNSUPPORTED.len() + INVALID_UPSTREAM.len(),
        files.len()
    );
}
