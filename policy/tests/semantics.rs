//! Table-driven semantics tests, one table per feature of the semantics document. Each case is
//! a policy file, the node's endpoints (a fixed cast), learned names, and flows with the
//! verdict they must get. Every flow is decided by the reference evaluator (straight from the
//! rules) and by the engine's map state (as the datapath looks it up); both must say what the
//! table says.
//!
//! Table lines: `DIR ENDPOINT PEER PROTO/PORT VERDICT`, where PEER is `ep:NAME`, `host`,
//! `reserved:NAME` or `ip:ADDR`, and VERDICT is `allow`, `deny` (a deny rule matched), `drop`
//! (default deny), or `http`/`dns`/`kafka` (allowed and redirected to that proxy), suffixed
//! `+all` when an L3/L4-only allow matches too, so the proxy lets every request through.

#[path = "semantics_harness/mod.rs"]
mod harness;

use harness::{endpoint, host_endpoint, parse_check, Setup};
use policy::model::{Endpoint, Protocol};

/// The cast: two namespaces, a host with node labels.
fn cast() -> Vec<Endpoint> {
    let mut web = endpoint(
        11,
        "web",
        "default",
        &[("app", "web"), ("tier", "front")],
        "10.0.0.1",
    );
    web.named_ports.insert("http".into(), (8080, Protocol::Tcp));
    let mut db = endpoint(
        12,
        "db",
        "default",
        &[("app", "db"), ("tier", "back")],
        "10.0.0.2",
    );
    db.named_ports.insert("sql".into(), (5432, Protocol::Tcp));
    vec![
        web,
        db,
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

struct Case {
    name: &'static str,
    yaml: &'static str,
    learned: &'static [(&'static str, &'static str)],
    checks: &'static [&'static str],
}

fn run(table: &[Case]) {
    let mut failures = Vec::new();
    let mut checked = 0;
    for case in table {
        let setup = Setup::from_yaml(case.yaml, cast(), case.learned);
        for line in case.checks {
            let (flow, expect) = parse_check(line);
            checked += 1;
            if let Err(e) = setup.check(&flow, &expect) {
                failures.push(format!("[{}] {e}", case.name));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} checks failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn namespace_scoping() {
    run(&[
        Case {
            name: "CNP subject and peers see only their namespace",
            yaml: r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: same-ns, namespace: default}
spec:
  endpointSelector: {}
  ingress:
  - fromEndpoints: [{}]
"#,
            learned: &[],
            checks: &[
                "ingress web ep:db TCP/80 allow",
                "ingress db ep:web TCP/80 allow",
                "ingress web ep:api TCP/80 drop",
                "ingress web ip:1.1.1.1 TCP/80 drop",
                "ingress web host TCP/80 drop",
                // prod is not selected by a policy of default.
                "ingress api ep:job TCP/80 allow",
                "ingress api ip:1.1.1.1 TCP/80 allow",
                "egress web ip:1.1.1.1 TCP/80 allow",
            ],
        },
        Case {
            name: "CNP peer naming a namespace reaches into it",
            yaml: r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: from-prod, namespace: default}
spec:
  endpointSelector:
    matchLabels: {app: web}
  ingress:
  - fromEndpoints:
    - matchLabels: {k8s:io.kubernetes.pod.namespace: prod, app: api}
"#,
            learned: &[],
            checks: &[
                "ingress web ep:api TCP/443 allow",
                "ingress web ep:job TCP/443 drop",
                "ingress web ep:db TCP/443 drop",
                "ingress db ep:api TCP/443 allow",
            ],
        },
        Case {
            name: "CNP in another namespace with the same labels selects nothing here",
            yaml: r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web-in-prod, namespace: prod}
spec:
  endpointSelector:
    matchLabels: {app: web}
  ingress:
  - {}
"#,
            learned: &[],
            checks: &[
                "ingress web ep:db TCP/80 allow",
                "ingress web ip:1.1.1.1 TCP/80 allow",
            ],
        },
        Case {
            name: "CCNP sees every namespace",
            yaml: r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: fronts}
spec:
  endpointSelector:
    matchLabels: {tier: front}
  ingress:
  - fromEndpoints:
    - matchLabels: {app: job}
"#,
            learned: &[],
            checks: &[
                "ingress web ep:job TCP/80 allow",
                "ingress api ep:job TCP/80 allow",
                "ingress web ep:db TCP/80 drop",
                "ingress api ep:web TCP/80 drop",
                "ingress db ep:web TCP/80 allow",
                // endpointSelector never selects the host.
                "ingress host ep:web TCP/22 allow",
            ],
        },
        Case {
            name: "CCNP nodeSelector selects the host only",
            yaml: r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: host-fw}
spec:
  nodeSelector:
    matchLabels: {node-role: worker}
  ingress:
  - fromEntities: [cluster]
    toPorts:
    - ports: [{port: "22", protocol: TCP}]
"#,
            learned: &[],
            checks: &[
                "ingress host ep:web TCP/22 allow",
                "ingress host ep:web TCP/23 drop",
                "ingress host ip:1.1.1.1 TCP/22 drop",
                "ingress web ip:1.1.1.1 TCP/22 allow",
                "egress host ip:1.1.1.1 TCP/443 allow",
            ],
        },
        Case {
            name: "nodeSelector that does not match the host",
            yaml: r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: other-nodes}
spec:
  nodeSelector:
    matchLabels: {node-role: control-plane}
  ingress:
  - fromEntities: [cluster]
"#,
            learned: &[],
            checks: &["ingress host ip:1.1.1.1 TCP/22 allow"],
        },
    ]);
}

#[test]
fn label_selectors() {
    run(&[
        Case {
            name: "matchExpressions In / NotIn",
            yaml: r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: in-notin}
spec:
  endpointSelector:
    matchExpressions:
    - {key: app, operator: In, values: [web, api]}
  egress:
  - toEndpoints:
    - matchExpressions:
      - {key: app, operator: NotIn, values: [web, api]}
      - {key: app, operator: Exists}
"#,
            learned: &[],
            checks: &[
                "egress web ep:db TCP/5432 allow",
                "egress web ep:job TCP/1 allow",
                "egress web ep:api TCP/1 drop",
                "egress api ep:web TCP/1 drop",
                // the host has no app label: Exists fails.
                "egress web host TCP/1 drop",
                "egress web ip:1.1.1.1 TCP/1 drop",
                "egress db ep:web TCP/1 allow",
            ],
        },
        Case {
            name: "Exists / DoesNotExist, ANDed with matchLabels",
            yaml: r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: exists}
spec:
  endpointSelector:
    matchLabels: {k8s:io.kubernetes.pod.namespace: prod}
    matchExpressions:
    - {key: tier, operator: DoesNotExist}
  ingress:
  - fromEndpoints:
    - matchLabels: {tier: front}
      matchExpressions:
      - {key: k8s:io.kubernetes.pod.namespace, operator: In, values: [default]}
"#,
            learned: &[],
            checks: &[
                "ingress job ep:web TCP/80 allow",
                "ingress job ep:api TCP/80 drop",
                "ingress job ep:db TCP/80 drop",
                // api has tier: not selected.
                "ingress api ep:db TCP/80 allow",
            ],
        },
        Case {
            name: "label sources: k8s:, any:, reserved:",
            yaml: r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: sources}
spec:
  endpointSelector:
    matchLabels: {any:app: db}
  ingress:
  - fromEndpoints:
    - matchLabels: {k8s:app: web}
  - fromEndpoints:
    - matchLabels: {reserved:app: api}
  - fromEndpoints:
    - matchLabels: {reserved:host: ""}
"#,
            learned: &[],
            checks: &[
                "ingress db ep:web TCP/80 allow",
                "ingress db ep:api TCP/80 drop",
                "ingress db host TCP/80 allow",
                "ingress db ep:job TCP/80 drop",
            ],
        },
        Case {
            name: "empty selector in a CCNP subject selects every workload",
            yaml: r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: all-workloads}
spec:
  endpointSelector: {}
  egress:
  - toEntities: [world]
"#,
            learned: &[],
            checks: &[
                "egress web ip:1.1.1.1 TCP/80 allow",
                "egress job ip:1.1.1.1 TCP/80 allow",
                "egress job ep:web TCP/80 drop",
                "egress host ep:web TCP/80 allow",
            ],
        },
    ]);
}

#[test]
fn entities() {
    run(&[
        Case {
            name: "cluster",
            yaml: r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: cluster}
spec:
  endpointSelector:
    matchLabels: {app: web}
  egress:
  - toEntities: [cluster]
"#,
            learned: &[],
            checks: &[
                "egress web ep:db TCP/80 allow",
                "egress web ep:api TCP/80 allow",
                "egress web host TCP/80 allow",
                "egress web reserved:remote-node TCP/80 allow",
                "egress web reserved:health TCP/80 allow",
                "egress web reserved:init TCP/80 allow",
                "egress web reserved:kube-apiserver TCP/443 allow",
                "egress web reserved:unmanaged TCP/80 allow",
                "egress web reserved:ingress TCP/80 allow",
                "egress web ip:1.1.1.1 TCP/80 drop",
                "egress web ip:2001:db8::1 TCP/80 drop",
            ],
        },
        Case {
            name: "world",
            yaml: r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: world}
spec:
  endpointSelector:
    matchLabels: {app: web}
  egress:
  - toEntities: [world]
"#,
            learned: &[],
            checks: &[
                "egress web ip:1.1.1.1 TCP/80 allow",
                "egress web ip:2001:db8::1 UDP/53 allow",
                "egress web ep:db TCP/80 drop",
                "egress web host TCP/80 drop",
                "egress web reserved:remote-node TCP/80 drop",
            ],
        },
        Case {
            name: "world-ipv4 and world-ipv6",
            yaml: r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: world-families}
spec:
  endpointSelector:
    matchLabels: {app: web}
  egress:
  - toEntities: [world-ipv4]
    toPorts:
    - ports: [{port: "443", protocol: TCP}]
  - toEntities: [world-ipv6]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
"#,
            learned: &[],
            checks: &[
                "egress web ip:1.1.1.1 TCP/443 allow",
                "egress web ip:1.1.1.1 TCP/80 drop",
                "egress web ip:2001:db8::1 TCP/80 allow",
                "egress web ip:2001:db8::1 TCP/443 drop",
            ],
        },
        Case {
            name: "host, remote-node, kube-apiserver, health",
            yaml: r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: reserved}
spec:
  endpointSelector:
    matchLabels: {app: db}
  ingress:
  - fromEntities: [host, remote-node]
  - fromEntities: [health]
    toPorts:
    - ports: [{port: "4240", protocol: TCP}]
  egress:
  - toEntities: [kube-apiserver]
"#,
            learned: &[],
            checks: &[
                "ingress db host TCP/5432 allow",
                "ingress db reserved:remote-node TCP/5432 allow",
                "ingress db reserved:health TCP/4240 allow",
                "ingress db reserved:health TCP/5432 drop",
                "ingress db ep:web TCP/5432 drop",
                "ingress db ip:1.1.1.1 TCP/5432 drop",
                "egress db reserved:kube-apiserver TCP/443 allow",
                "egress db host TCP/443 drop",
                "egress db ip:1.1.1.1 TCP/443 drop",
            ],
        },
        Case {
            name: "all",
            yaml: r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: all}
spec:
  endpointSelector:
    matchLabels: {app: db}
  ingress:
  - fromEntities: [all]
    toPorts:
    - ports: [{port: "5432", protocol: TCP}]
"#,
            learned: &[],
            checks: &[
                "ingress db ep:web TCP/5432 allow",
                "ingress db ep:api TCP/5432 allow",
                "ingress db host TCP/5432 allow",
                "ingress db ip:1.1.1.1 TCP/5432 allow",
                "ingress db ip:2001:db8::1 TCP/5432 allow",
                "ingress db reserved:remote-node TCP/5432 allow",
                "ingress db ip:1.1.1.1 TCP/5433 drop",
            ],
        },
    ]);
}

#[test]
fn cidr_and_except() {
    run(&[
        Case {
            name: "toCIDRSet with except, toCIDR",
            yaml: r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: cidr, namespace: default}
spec:
  endpointSelector:
    matchLabels: {app: web}
  egress:
  - toCIDRSet:
    - cidr: 10.0.0.0/8
      except: [10.96.0.0/12, 10.0.0.0/24]
  - toCIDR: [192.0.2.7/32, "2001:db8::/64"]
"#,
            learned: &[],
            checks: &[
                "egress web ip:10.1.2.3 TCP/80 allow",
                "egress web ip:10.96.0.1 TCP/80 drop",
                "egress web ip:10.111.255.255 TCP/80 drop",
                "egress web ip:10.112.0.1 TCP/80 allow",
                "egress web ip:10.0.0.9 TCP/80 drop",
                "egress web ip:192.0.2.7 UDP/53 allow",
                "egress web ip:192.0.2.8 UDP/53 drop",
                "egress web ip:2001:db8::5 TCP/80 allow",
                "egress web ip:2001:db8:0:1::5 TCP/80 drop",
                // 10.0.0.2 and 10.0.1.1 are endpoints: CIDR rules never select them.
                "egress web ep:db TCP/80 drop",
                "egress web ep:api TCP/80 drop",
                "egress web host TCP/80 drop",
            ],
        },
        Case {
            name: "fromCIDR ingress, an except hole filled by another rule",
            yaml: r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: from-cidr, namespace: default}
spec:
  endpointSelector:
    matchLabels: {app: db}
  ingress:
  - fromCIDRSet:
    - cidr: 198.51.100.0/24
      except: [198.51.100.128/25]
  - fromCIDR: [198.51.100.200/32]
    toPorts:
    - ports: [{port: "5432", protocol: TCP}]
"#,
            learned: &[],
            checks: &[
                "ingress db ip:198.51.100.1 TCP/22 allow",
                "ingress db ip:198.51.100.129 TCP/22 drop",
                "ingress db ip:198.51.100.200 TCP/5432 allow",
                "ingress db ip:198.51.100.200 TCP/22 drop",
                "ingress db ip:198.51.101.1 TCP/5432 drop",
            ],
        },
        Case {
            name: "0.0.0.0/0 is world, not the cluster",
            yaml: r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: everything-v4, namespace: default}
spec:
  endpointSelector:
    matchLabels: {app: web}
  egress:
  - toCIDR: [0.0.0.0/0]
"#,
            learned: &[],
            checks: &[
                "egress web ip:8.8.8.8 TCP/443 allow",
                "egress web ip:2001:db8::1 TCP/443 drop",
                "egress web ep:db TCP/443 drop",
                "egress web host TCP/443 drop",
            ],
        },
    ]);
}

#[test]
fn deny_over_allow() {
    run(&[
        Case {
            name: "CNP deny beats a NetworkPolicy allow",
            yaml: r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-all-to-db, namespace: default}
spec:
  podSelector:
    matchLabels: {app: db}
  ingress:
  - {}
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: deny-web, namespace: default}
spec:
  endpointSelector:
    matchLabels: {app: db}
  ingressDeny:
  - fromEndpoints:
    - matchLabels: {app: web}
    toPorts:
    - ports: [{port: "5432", protocol: TCP}]
"#,
            learned: &[],
            checks: &[
                "ingress db ep:web TCP/5432 deny",
                "ingress db ep:web TCP/5433 allow",
                "ingress db ip:1.1.1.1 TCP/5432 allow",
            ],
        },
        Case {
            name: "CCNP deny beats a CNP allow; a wider allow does not help",
            yaml: r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: allow, namespace: default}
spec:
  endpointSelector:
    matchLabels: {app: web}
  egress:
  - toCIDR: [203.0.113.0/24]
  - toEntities: [all]
    toPorts:
    - ports: [{port: "443", protocol: TCP}]
---
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: deny-bad-net}
spec:
  endpointSelector: {}
  egressDeny:
  - toCIDRSet:
    - cidr: 203.0.113.0/25
"#,
            learned: &[],
            checks: &[
                "egress web ip:203.0.113.1 TCP/443 deny",
                "egress web ip:203.0.113.1 TCP/80 deny",
                "egress web ip:203.0.113.200 TCP/80 allow",
                "egress web ip:8.8.8.8 TCP/443 allow",
                "egress web ip:8.8.8.8 TCP/80 drop",
                // the deny-only CCNP puts job's egress into default deny, too.
                "egress job ip:8.8.8.8 TCP/443 drop",
                "egress job ip:203.0.113.1 TCP/443 deny",
            ],
        },
        Case {
            name: "deny on a port range, allow on one port inside it",
            yaml: r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: ranges}
spec:
  endpointSelector:
    matchLabels: {app: api}
  ingress:
  - fromEntities: [all]
    toPorts:
    - ports: [{port: "8080", protocol: TCP}]
  ingressDeny:
  - fromEndpoints:
    - matchLabels: {app: job}
    toPorts:
    - ports: [{port: "8000", endPort: 8999, protocol: TCP}]
"#,
            learned: &[],
            checks: &[
                "ingress api ep:job TCP/8080 deny",
                "ingress api ep:web TCP/8080 allow",
                "ingress api ep:job TCP/9000 drop",
                "ingress api ep:job UDP/8080 drop",
            ],
        },
        Case {
            name: "deny any protocol on a port beats a TCP-all allow",
            yaml: r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: any-proto-deny}
spec:
  endpointSelector:
    matchLabels: {app: api}
  ingress:
  - fromEndpoints:
    - matchLabels: {app: job}
    toPorts:
    - ports: [{port: "0", protocol: TCP}]
  ingressDeny:
  - fromEndpoints:
    - matchLabels: {app: job}
    toPorts:
    - ports: [{port: "25", protocol: ANY}]
"#,
            learned: &[],
            checks: &[
                "ingress api ep:job TCP/25 deny",
                "ingress api ep:job UDP/25 deny",
                "ingress api ep:job TCP/26 allow",
                "ingress api ep:job UDP/26 drop",
            ],
        },
        Case {
            name: "deny world entity beats toFQDNs allow of a learned IP",
            yaml: r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: fqdn, namespace: default}
spec:
  endpointSelector:
    matchLabels: {app: web}
  egress:
  - toFQDNs:
    - matchName: api.example.com
    toPorts:
    - ports: [{port: "443", protocol: TCP}]
  egressDeny:
  - toCIDR: [192.0.2.66/32]
"#,
            learned: &[
                ("api.example.com", "192.0.2.65"),
                ("api.example.com", "192.0.2.66"),
            ],
            checks: &[
                "egress web ip:192.0.2.65 TCP/443 allow",
                "egress web ip:192.0.2.66 TCP/443 deny",
                "egress web ip:192.0.2.67 TCP/443 drop",
            ],
        },
    ]);
}

#[test]
fn default_deny_and_enable_default_deny() {
    run(&[
        Case {
            name: "a deny-only rule enforces its direction",
            yaml: r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: deny-only, namespace: default}
spec:
  endpointSelector:
    matchLabels: {app: db}
  ingressDeny:
  - fromEndpoints:
    - matchLabels: {app: web}
"#,
            learned: &[],
            checks: &[
                "ingress db ep:web TCP/5432 deny",
                "ingress db ip:1.1.1.1 TCP/5432 drop",
                "egress db ip:1.1.1.1 TCP/443 allow",
            ],
        },
        Case {
            name: "enableDefaultDeny ingress false: allows add nothing, others pass",
            yaml: r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: no-default-deny, namespace: default}
spec:
  endpointSelector:
    matchLabels: {app: db}
  enableDefaultDeny: {ingress: false}
  ingress:
  - fromEndpoints:
    - matchLabels: {app: web}
  ingressDeny:
  - fromCIDR: [192.0.2.0/24]
"#,
            learned: &[],
            checks: &[
                "ingress db ep:web TCP/5432 allow",
                "ingress db ip:1.1.1.1 TCP/5432 allow",
                "ingress db ip:192.0.2.1 TCP/5432 deny",
            ],
        },
        Case {
            name: "enableDefaultDeny false in one policy, a normal rule in another: enforced",
            yaml: r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: lax, namespace: default}
spec:
  endpointSelector:
    matchLabels: {app: web}
  enableDefaultDeny: {egress: false}
  egress:
  - toEntities: [world]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: strict, namespace: default}
spec:
  endpointSelector:
    matchLabels: {app: web}
  egress:
  - toEndpoints:
    - matchLabels: {app: db}
"#,
            learned: &[],
            checks: &[
                "egress web ip:1.1.1.1 TCP/443 allow",
                "egress web ep:db TCP/5432 allow",
                "egress web ep:api TCP/443 drop",
                "egress web host TCP/443 drop",
            ],
        },
        Case {
            name: "ingress rules leave egress open",
            yaml: r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: in-only, namespace: default}
spec:
  endpointSelector:
    matchLabels: {app: web}
  ingress:
  - fromEndpoints:
    - matchLabels: {app: db}
"#,
            learned: &[],
            checks: &[
                "ingress web ep:db TCP/80 allow",
                "ingress web ip:1.1.1.1 TCP/80 drop",
                "egress web ip:1.1.1.1 TCP/80 allow",
                "egress web ep:api UDP/53 allow",
            ],
        },
        Case {
            name: "an empty ingress section still enforces",
            yaml: r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: lockdown, namespace: default}
spec:
  endpointSelector:
    matchLabels: {app: web}
  ingress:
  - {}
  egress:
  - {}
"#,
            learned: &[],
            checks: &[
                "ingress web ep:db TCP/80 drop",
                "egress web ip:1.1.1.1 TCP/80 drop",
            ],
        },
    ]);
}

#[test]
fn ports_ranges_and_protocols() {
    run(&[
        Case {
            name: "endPort ranges and protocols",
            yaml: r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: ports, namespace: default}
spec:
  endpointSelector:
    matchLabels: {app: web}
  egress:
  - toEntities: [world]
    toPorts:
    - ports:
      - {port: "8000", endPort: 8100, protocol: TCP}
      - {port: "53", protocol: ANY}
      - {port: "5000", protocol: SCTP}
      - {port: "0", protocol: UDP}
"#,
            learned: &[],
            checks: &[
                "egress web ip:1.1.1.1 TCP/7999 drop",
                "egress web ip:1.1.1.1 TCP/8000 allow",
                "egress web ip:1.1.1.1 TCP/8050 allow",
                "egress web ip:1.1.1.1 TCP/8100 allow",
                "egress web ip:1.1.1.1 TCP/8101 drop",
                "egress web ip:1.1.1.1 TCP/53 allow",
                "egress web ip:1.1.1.1 SCTP/53 allow",
                "egress web ip:1.1.1.1 SCTP/5000 allow",
                "egress web ip:1.1.1.1 TCP/5000 drop",
                "egress web ip:1.1.1.1 UDP/12345 allow",
                "egress web ip:1.1.1.1 UDP/8050 allow",
                // ANY with a port means TCP, UDP and SCTP; not ICMP type 53.
                "egress web ip:1.1.1.1 ICMP/53 drop",
            ],
        },
        Case {
            name: "named ports resolve from the endpoints' configuration",
            yaml: r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: named}
spec:
  endpointSelector:
    matchLabels: {tier: front}
  ingress:
  - fromEntities: [cluster]
    toPorts:
    - ports: [{port: http, protocol: TCP}]
  egress:
  - toEndpoints:
    - matchLabels: {app: db}
    toPorts:
    - ports: [{port: sql}]
"#,
            learned: &[],
            checks: &[
                "ingress web ep:job TCP/8080 allow",
                "ingress web ep:job TCP/80 drop",
                "ingress web ep:job UDP/8080 drop",
                // api has no port named http.
                "ingress api ep:job TCP/8080 drop",
                "egress web ep:db TCP/5432 allow",
                "egress web ep:db TCP/5433 drop",
                "egress api ep:db TCP/5432 allow",
            ],
        },
        Case {
            name: "an L3-only rule allows every protocol, ICMP included",
            yaml: r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: l3}
spec:
  endpointSelector:
    matchLabels: {app: job}
  ingress:
  - fromEndpoints:
    - matchLabels: {app: api}
"#,
            learned: &[],
            checks: &[
                "ingress job ep:api TCP/1 allow",
                "ingress job ep:api UDP/65535 allow",
                "ingress job ep:api SCTP/9 allow",
                "ingress job ep:api ICMP/8 allow",
                "ingress job ep:api ICMPv6/128 allow",
                "ingress job ep:web ICMP/8 drop",
            ],
        },
    ]);
}

#[test]
fn icmp() {
    run(&[Case {
        name: "icmps by number and by name, per family",
        yaml: r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: icmp}
spec:
  endpointSelector:
    matchLabels: {app: db}
  ingress:
  - fromEntities: [cluster]
    icmps:
    - fields:
      - {type: 8, family: IPv4}
      - {type: EchoRequest, family: IPv6}
  - fromEntities: [world]
    toPorts:
    - ports: [{port: "8", protocol: TCP}]
"#,
        learned: &[],
        checks: &[
            "ingress db ep:web ICMP/8 allow",
            "ingress db ep:web ICMP/0 drop",
            "ingress db ep:web ICMPv6/128 allow",
            "ingress db ep:web ICMPv6/8 drop",
            "ingress db ep:web TCP/8 drop",
            "ingress db host ICMP/8 allow",
            "ingress db ip:1.1.1.1 ICMP/8 drop",
            "ingress db ip:1.1.1.1 TCP/8 allow",
        ],
    }]);
}

#[test]
fn kubernetes_network_policy() {
    run(&[
        Case {
            name: "policyTypes Egress only, ports without peers",
            yaml: r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: egress-dns, namespace: default}
spec:
  podSelector:
    matchLabels: {app: web}
  policyTypes: [Egress]
  egress:
  - ports:
    - {port: 53, protocol: UDP}
    - {port: 53, protocol: TCP}
"#,
            learned: &[],
            checks: &[
                "egress web ip:1.1.1.1 UDP/53 allow",
                "egress web ep:api TCP/53 allow",
                "egress web ip:1.1.1.1 TCP/443 drop",
                "ingress web ip:1.1.1.1 TCP/443 allow",
            ],
        },
        Case {
            name: "namespaceSelector {} means every pod, not the world",
            yaml: r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: from-all-ns, namespace: prod}
spec:
  podSelector: {}
  ingress:
  - from:
    - namespaceSelector: {}
"#,
            learned: &[],
            checks: &[
                "ingress api ep:web TCP/80 allow",
                "ingress api ep:job TCP/80 allow",
                "ingress api ip:1.1.1.1 TCP/80 drop",
                "ingress job ep:db TCP/80 allow",
            ],
        },
        Case {
            name: "an empty from is everything, the world included",
            yaml: r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: open, namespace: prod}
spec:
  podSelector:
    matchLabels: {app: api}
  ingress:
  - ports:
    - {port: 443}
"#,
            learned: &[],
            checks: &[
                "ingress api ip:1.1.1.1 TCP/443 allow",
                "ingress api ep:web TCP/443 allow",
                "ingress api ep:web TCP/80 drop",
            ],
        },
        Case {
            name: "ipBlock with except, and namespaceSelector by label",
            yaml: r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: mixed, namespace: default}
spec:
  podSelector:
    matchLabels: {app: db}
  policyTypes: [Ingress, Egress]
  ingress:
  - from:
    - ipBlock:
        cidr: 172.16.0.0/12
        except: [172.16.5.0/24]
    - namespaceSelector:
        matchLabels: {kubernetes.io/metadata.name: prod}
    ports:
    - {port: 5432, protocol: TCP}
"#,
            learned: &[],
            checks: &[
                "ingress db ip:172.20.1.1 TCP/5432 allow",
                "ingress db ip:172.16.5.9 TCP/5432 drop",
                "ingress db ep:api TCP/5432 allow",
                "ingress db ep:job TCP/5432 allow",
                "ingress db ep:web TCP/5432 drop",
                "ingress db ep:api TCP/5433 drop",
                // Egress listed in policyTypes with no rules: all egress dropped.
                "egress db ip:1.1.1.1 UDP/53 drop",
                "egress db ep:web TCP/80 drop",
            ],
        },
    ]);
}

#[test]
fn fqdn_and_l7() {
    run(&[
        Case {
            name: "toFQDNs selects learned IPs; DNS rules redirect port 53",
            yaml: r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: fqdn, namespace: default}
spec:
  endpointSelector:
    matchLabels: {app: web}
  egress:
  - toEndpoints:
    - matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system}
    toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules:
        dns:
        - matchPattern: "*.example.com"
  - toEntities: [world]
    toPorts:
    - ports: [{port: "53", protocol: UDP}]
      rules:
        dns:
        - matchName: example.org
  - toFQDNs:
    - matchPattern: "*.example.com"
    - matchName: example.org
    toPorts:
    - ports: [{port: "443", protocol: TCP}]
"#,
            learned: &[
                ("www.example.com", "192.0.2.10"),
                ("example.org", "192.0.2.20"),
                ("www.example.net", "192.0.2.30"),
            ],
            checks: &[
                "egress web ip:192.0.2.10 TCP/443 allow",
                "egress web ip:192.0.2.20 TCP/443 allow",
                "egress web ip:192.0.2.10 TCP/80 drop",
                "egress web ip:192.0.2.30 TCP/443 drop",
                "egress web ip:192.0.2.99 TCP/443 drop",
                "egress web ip:8.8.8.8 UDP/53 dns",
                "egress web ip:8.8.8.8 TCP/53 drop",
                "ingress web ip:192.0.2.10 TCP/443 allow",
            ],
        },
        Case {
            name: "HTTP and Kafka redirects; an L4-only allow on the same port lifts the L7 restriction",
            yaml: r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: l7}
spec:
  endpointSelector:
    matchLabels: {app: api}
  ingress:
  - fromEndpoints:
    - matchLabels: {app: web}
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http:
        - {method: GET, path: "/public/.*"}
    - ports: [{port: "9092", protocol: TCP}]
      rules:
        kafka:
        - {role: consume, topic: events}
  - fromEndpoints:
    - matchLabels: {app: job}
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http:
        - {method: POST}
  - fromEndpoints:
    - matchLabels: {app: job}
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
"#,
            learned: &[],
            checks: &[
                "ingress api ep:web TCP/80 http",
                "ingress api ep:web TCP/9092 kafka",
                "ingress api ep:web TCP/81 drop",
                "ingress api ep:job TCP/80 http+all",
                "ingress api ep:db TCP/80 drop",
            ],
        },
    ]);
}

#[test]
fn world_family_entities_select_learned_fqdn_addresses() {
    // Learning an address through some toFQDNs selector must not take it out of the
    // world-ipv4 / world-ipv6 entity it belongs to.
    run(&[Case {
        name: "world-ipv4 / world-ipv6 select learned FQDN addresses of their family",
        yaml: r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: world-families-fqdn}
spec:
  endpointSelector:
    matchLabels: {app: web}
  egress:
  - toEntities: [world-ipv6]
  - toFQDNs:
    - matchName: v6.example.com
    - matchName: v4.example.com
    toPorts:
    - ports: [{port: "443", protocol: TCP}]
"#,
        learned: &[
            ("v6.example.com", "2001:db8::6"),
            ("v4.example.com", "192.0.2.4"),
        ],
        checks: &[
            "egress web ip:2001:db8::6 TCP/443 allow",
            "egress web ip:2001:db8::6 TCP/80 allow",
            "egress web ip:192.0.2.4 TCP/443 allow",
            "egress web ip:192.0.2.4 TCP/80 drop",
        ],
    }]);
}

#[test]
fn l7_rules_need_tcp_ports() {
    // HTTP and Kafka rules apply to TCP ports only (as Cilium validates them); a toPorts entry
    // with L7 rules and no ports would otherwise redirect every protocol — ICMP and UDP
    // included — to that proxy. Such a file must be rejected like the UDP/ANY variants are.
    let doc = |to_ports: &str| {
        format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: l7, namespace: default}}\nspec:\n  endpointSelector: {{}}\n  egress:\n  - toEntities: [world]\n    toPorts:\n{to_ports}"
        )
    };
    let rejected = [
        "    - rules:\n        http: [{method: GET}]\n",
        "    - rules:\n        kafka: [{topic: t}]\n",
        "    - ports: [{port: '80', protocol: UDP}]\n      rules:\n        http: [{method: GET}]\n",
        "    - rules:\n        dns: [{matchName: example.com}]\n",
    ];
    for to_ports in rejected {
        let text = doc(to_ports);
        assert!(
            policy::parse::parse_policies("l7.yaml", &text).is_err(),
            "must be rejected:\n{text}"
        );
    }
    let text = doc(
        "    - ports: [{port: '80', protocol: TCP}]\n      rules:\n        http: [{method: GET}]\n",
    );
    assert!(policy::parse::parse_policies("l7.yaml", &text).is_ok());
}

#[test]
fn audit_mode_turns_drops_into_audit() {
    // Audit (global, or for one endpoint) lets would-be drops through with verdict `audit`,
    // default-deny drops and deny-rule drops alike; allowed flows stay `allowed`.
    use policy::trace::{trace, AuditModes, TracePeer, Verdict};
    let yaml = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: audit, namespace: default}
spec:
  endpointSelector:
    matchLabels: {app: db}
  ingress:
  - fromEndpoints:
    - matchLabels: {app: web}
  ingressDeny:
  - fromCIDR: [192.0.2.0/24]
"#;
    let setup = Setup::from_yaml(yaml, cast(), &[]);
    let db = TracePeer::Endpoint("db".into());
    let web = TracePeer::Endpoint("web".into());
    let denied_ip = TracePeer::Ip("192.0.2.9".parse().unwrap());
    let other_ip = TracePeer::Ip("198.51.100.9".parse().unwrap());
    let verdict = |src: &TracePeer, audit: &AuditModes| {
        let t = trace(&setup.engine, src, &db, 5432, Protocol::Tcp, audit).expect("trace");
        (t.ingress.verdict, t.verdict)
    };
    let off = AuditModes::default();
    let global = AuditModes {
        global: true,
        ..AuditModes::default()
    };
    let for_db = AuditModes {
        global: false,
        endpoints: [12u16].into_iter().collect(),
    };
    let for_web = AuditModes {
        global: false,
        endpoints: [11u16].into_iter().collect(),
    };
    assert_eq!(verdict(&web, &off), (Verdict::Allowed, Verdict::Allowed));
    assert_eq!(verdict(&other_ip, &off), (Verdict::Denied, Verdict::Denied));
    assert_eq!(
        verdict(&denied_ip, &off),
        (Verdict::Denied, Verdict::Denied)
    );
    for audit in [&global, &for_db] {
        assert_eq!(verdict(&web, audit), (Verdict::Allowed, Verdict::Allowed));
        assert_eq!(verdict(&other_ip, audit), (Verdict::Audit, Verdict::Audit));
        assert_eq!(verdict(&denied_ip, audit), (Verdict::Audit, Verdict::Audit));
    }
    // Audit of another endpoint changes nothing here.
    assert_eq!(
        verdict(&other_ip, &for_web),
        (Verdict::Denied, Verdict::Denied)
    );
}

#[test]
fn from_requires_keeps_cidr_peers_next_to_a_wildcard() {
    // fromRequires narrows the endpoint selectors of every rule selecting the endpoint; a CIDR
    // selector in the same peer list as `{}` is not an endpoint selector and must keep allowing
    // its addresses. The parser does not combine fromEndpoints and fromCIDRSet in one rule, so
    // the model is built by adding the CIDR to the parsed peer list (the model allows it, and
    // the engine must decide every model value right).
    use policy::model::{CidrSelector, PeerSelector, Peers};
    let yaml = r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: requires-cidr}
spec:
  endpointSelector:
    matchLabels: {app: db}
  ingress:
  - fromRequires:
    - matchLabels: {tier: front}
    fromEndpoints: [{}]
"#;
    let mut policies = policy::parse::parse_policies("test.yaml", yaml).expect("parses");
    match &mut policies[0].rules[0].allow.ingress[0].peers {
        Peers::Selectors(v) => v.insert(
            0,
            PeerSelector::Cidr(CidrSelector {
                cidr: "192.0.2.0/24".parse().unwrap(),
                except: vec!["192.0.2.0/26".parse().unwrap()],
            }),
        ),
        other => panic!("unexpected peers {other:?}"),
    }
    let setup = Setup::new(policies, cast(), vec![]);
    let mut failures = Vec::new();
    for line in [
        "ingress db ip:192.0.2.70 TCP/5432 allow",
        "ingress db ip:192.0.2.7 TCP/5432 drop",
        "ingress db ip:198.51.100.1 TCP/5432 drop",
        "ingress db ep:web TCP/5432 allow",
        "ingress db ep:api TCP/5432 allow",
        "ingress db ep:job TCP/5432 drop",
    ] {
        let (flow, expect) = parse_check(line);
        if let Err(e) = setup.check(&flow, &expect) {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
