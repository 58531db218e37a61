//! `fromRequires` / `toRequires`: the requirements of every rule selecting an endpoint are
//! ANDed into the endpoint peer selectors of the rules selecting it, per direction; allow
//! sections' requirements constrain allow rules, deny sections' constrain deny rules; CIDR,
//! entity and L4-only peers are not constrained (Cilium `rules.go` `resolveL4IngressPolicy`,
//! `IngressCommonRule.GetSourceEndpointSelectorsWithRequirements`).
//!
//! Every flow is decided by the reference evaluator, the engine's map state and `policy
//! trace`; all three must give the verdict of the table (see tests/semantics.rs for the line
//! format).

#[path = "semantics_harness/mod.rs"]
mod harness;

use harness::{endpoint, host_endpoint, parse_check, Setup};
use policy::model::Endpoint;

/// web and db in `default`, api and job in `prod`, and the host.
fn cast() -> Vec<Endpoint> {
    vec![
        endpoint(
            11,
            "web",
            "default",
            &[("app", "web"), ("tier", "front")],
            "10.0.0.1",
        ),
        endpoint(
            12,
            "db",
            "default",
            &[("app", "db"), ("tier", "back")],
            "10.0.0.2",
        ),
        endpoint(
            21,
            "api",
            "prod",
            &[("app", "api"), ("tier", "front")],
            "10.0.1.1",
        ),
        endpoint(22, "job", "prod", &[("app", "job")], "10.0.1.2"),
        host_endpoint(1, &[("node-role", "worker")], "192.168.1.1"),
    ]
}

fn check_all(setup: &Setup, name: &str, checks: &[&str], failures: &mut Vec<String>) {
    for line in checks {
        let (flow, expect) = parse_check(line);
        if let Err(e) = setup.check(&flow, &expect) {
            failures.push(format!("[{name}] {e}"));
        }
    }
}

fn run(cases: &[(&str, &str, &[&str])]) {
    let mut failures = Vec::new();
    for (name, yaml, checks) in cases {
        let setup = Setup::from_yaml(yaml, cast(), &[]);
        check_all(&setup, name, checks, &mut failures);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn from_requires_constrains_endpoint_peers_of_every_selecting_rule() {
    run(&[(
        "requirement of one rule applies to the peers of another",
        r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: back-needs-front}
spec:
  endpointSelector:
    matchLabels: {tier: back}
  ingress:
  - fromRequires:
    - matchLabels: {tier: front}
---
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: pods}
spec:
  endpointSelector: {}
  ingress:
  - fromEndpoints: [{}]
  - fromEntities: [host]
  - toPorts:
    - ports: [{port: "9090", protocol: TCP}]
"#,
        &[
            // db requires tier=front of its endpoint peers, whichever rule allows them.
            "ingress db ep:web TCP/80 allow",
            "ingress db ep:api TCP/80 allow",
            "ingress db ep:job TCP/80 drop",
            // Entities and L4-only rules are not constrained.
            "ingress db host TCP/80 allow",
            "ingress db ep:job TCP/9090 allow",
            "ingress db ip:1.1.1.1 TCP/9090 allow",
            // Endpoints the requiring rule does not select are not constrained.
            "ingress web ep:job TCP/80 allow",
            "ingress api ep:job TCP/80 allow",
            // Requirements are per direction.
            "egress db ep:job TCP/80 allow",
        ],
    )]);
}

#[test]
fn to_requires_constrains_egress_endpoint_peers() {
    run(&[(
        "toRequires",
        r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: front-talks-to-back}
spec:
  endpointSelector:
    matchLabels: {tier: front}
  egress:
  - toRequires:
    - matchLabels: {tier: back}
  - toEndpoints: [{}]
  - toEntities: [world]
"#,
        &[
            "egress web ep:db TCP/5432 allow",
            "egress web ep:job TCP/80 drop",
            "egress api ep:web TCP/80 drop",
            "egress api ep:db TCP/80 allow",
            "egress web ip:1.1.1.1 TCP/443 allow",
            "egress web host TCP/80 drop",
            // job is not selected: its egress is not even enforced.
            "egress job ep:web TCP/80 allow",
        ],
    )]);
}

#[test]
fn deny_requirements_constrain_deny_rules_only() {
    run(&[(
        "requirements of deny sections",
        r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: deny-front-of-prod}
spec:
  endpointSelector:
    matchLabels: {app: db}
  ingressDeny:
  - fromRequires:
    - matchLabels: {tier: front}
  - fromEndpoints:
    - matchLabels: {k8s:io.kubernetes.pod.namespace: prod}
  ingress:
  - fromEndpoints: [{}]
"#,
        &[
            // The deny selects prod endpoints that are also tier=front.
            "ingress db ep:api TCP/80 deny",
            "ingress db ep:job TCP/80 allow",
            // The allow rule is not constrained by the deny section's requirement.
            "ingress db ep:web TCP/80 allow",
        ],
    )]);
}

#[test]
fn requirements_of_a_namespaced_policy_are_scoped_to_its_namespace() {
    // As Cilium's getEndpointSelector does for fromRequires: a CNP's requirement also
    // requires the policy's namespace, so peers of other namespaces never meet it.
    run(&[(
        "CNP requirement",
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: db, namespace: default}
spec:
  endpointSelector:
    matchLabels: {app: db}
  ingress:
  - fromRequires:
    - matchLabels: {tier: front}
  - fromEndpoints:
    - matchLabels: {k8s:io.kubernetes.pod.namespace: prod}
  - fromEndpoints:
    - matchLabels: {app: web}
"#,
        &[
            "ingress db ep:web TCP/80 allow",
            "ingress db ep:api TCP/80 drop",
            "ingress db ep:job TCP/80 drop",
        ],
    )]);
}

#[test]
fn a_wildcard_peer_refined_by_requirements_is_no_longer_a_wildcard() {
    // A plain rule list does not scope selectors, so `{}` is the wildcard peer (every
    // identity, world included); with a requirement it selects only what meets it, and a
    // `NotIn` requirement is met by identities without the label (world, the host).
    run(&[
        (
            "In",
            r#"
- endpointSelector:
    matchLabels: {app: db}
  ingress:
  - fromEndpoints: [{}]
  - fromRequires:
    - matchLabels: {tier: front}
"#,
            &[
                "ingress db ep:web TCP/80 allow",
                "ingress db ep:api TCP/80 allow",
                "ingress db ep:job TCP/80 drop",
                "ingress db ip:1.1.1.1 TCP/80 drop",
                "ingress db host TCP/80 drop",
            ],
        ),
        (
            "NotIn",
            r#"
- endpointSelector:
    matchLabels: {app: web}
  ingress:
  - fromEndpoints: [{}]
  - fromRequires:
    - matchExpressions:
      - {key: tier, operator: NotIn, values: [back]}
"#,
            &[
                "ingress web ep:db TCP/80 drop",
                "ingress web ep:job TCP/80 allow",
                "ingress web ep:api TCP/80 allow",
                "ingress web ip:1.1.1.1 TCP/80 allow",
                "ingress web host TCP/80 allow",
            ],
        ),
    ]);
}

#[test]
fn a_requirement_in_another_file_changes_and_restores_verdicts_incrementally() {
    let allow = r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: pods}
spec:
  endpointSelector: {}
  ingress:
  - fromEndpoints: [{}]
"#;
    let requires = r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: back-needs-front}
spec:
  endpointSelector:
    matchLabels: {tier: back}
  ingress:
  - fromRequires:
    - matchLabels: {tier: front}
"#;
    let mut setup = Setup::from_yaml(allow, cast(), &[]);
    let selectors_before = setup.engine.selector_cache().len();
    let mut failures = Vec::new();
    let before = [
        "ingress db ep:job TCP/80 allow",
        "ingress db ep:web TCP/80 allow",
    ];
    check_all(&setup, "before", &before, &mut failures);

    let extra = policy::parse::parse_policies("requires.yaml", requires).unwrap();
    let n = setup.policies.len();
    let changes = setup.engine.set_policies("requires.yaml", extra.clone());
    setup.policies.extend(extra);
    // Only db's map changes.
    let touched: Vec<u16> = changes.maps.iter().map(|(ep, _)| *ep).collect();
    assert_eq!(touched, vec![12], "{changes:?}");
    check_all(
        &setup,
        "with requirement",
        &[
            "ingress db ep:job TCP/80 drop",
            "ingress db ep:web TCP/80 allow",
            "ingress db ep:api TCP/80 allow",
            "ingress web ep:job TCP/80 allow",
        ],
        &mut failures,
    );

    // A new endpoint appearing afterwards is selected by the refined selector (or not).
    let mut setup2 = setup;
    let cache = setup2.engine.upsert_endpoint(endpoint(
        23,
        "ui",
        "prod",
        &[("app", "ui"), ("tier", "front")],
        "10.0.1.3",
    ));
    assert!(cache.maps.iter().any(|(ep, _)| *ep == 12), "{cache:?}");
    setup2.endpoints.push(endpoint(
        23,
        "ui",
        "prod",
        &[("app", "ui"), ("tier", "front")],
        "10.0.1.3",
    ));
    check_all(
        &setup2,
        "new endpoint",
        &["ingress db ep:ui TCP/80 allow"],
        &mut failures,
    );

    setup2.engine.set_policies("requires.yaml", vec![]);
    setup2.policies.truncate(n);
    check_all(&setup2, "after removal", &before, &mut failures);
    // The refined selectors went with the rule whose peers they refined... once that rule is
    // gone too; until then they stay (one set of variants per requirement set seen).
    setup2.engine.set_policies("test.yaml", vec![]);
    assert_eq!(setup2.engine.selector_cache().len(), 0);
    setup2
        .engine
        .set_policies("test.yaml", setup2.policies.clone());
    assert_eq!(setup2.engine.selector_cache().len(), selectors_before);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
