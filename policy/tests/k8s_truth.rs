//! Kubernetes NetworkPolicy truth tables, in the manner of the upstream e2e suite
//! (test/e2e/network/netpol): pods a, b, c in namespaces x, y, z, every policy checked against
//! the full 9×9 matrix of who can reach whom on a port. A pair is reachable when the client's
//! egress and the server's ingress both allow it; both are decided by the reference evaluator
//! and by the engine's map state, and both must equal the hand-written expectation.
//!
//! One deliberate difference from upstream: `ipBlock` never selects pods (Cilium's CIDR
//! semantics, see the semantics document), so the ipBlock tables expect pod traffic to be cut.

#[path = "semantics_harness/mod.rs"]
mod harness;

use harness::{endpoint, verdict_name, Flow, PeerSpec, Setup};
use policy::model::{Direction, Endpoint, Protocol};

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];

/// `x/a` ... `z/c`, in matrix order.
fn pod_names() -> Vec<String> {
    NAMESPACES
        .iter()
        .flat_map(|ns| PODS.iter().map(move |p| format!("{ns}/{p}")))
        .collect()
}

fn pods() -> Vec<Endpoint> {
    let mut eps = Vec::new();
    for (ni, ns) in NAMESPACES.iter().enumerate() {
        for (pi, p) in PODS.iter().enumerate() {
            let id = (100 + ni * 10 + pi) as u16;
            let ip = format!("10.1.{}.{}", ni + 1, pi + 1);
            eps.push(endpoint(id, &format!("{ns}/{p}"), ns, &[("pod", p)], &ip));
        }
    }
    eps
}

/// Expected reachability, rows = client (from), columns = server (to).
#[derive(Clone)]
struct Reachability {
    names: Vec<String>,
    allowed: Vec<Vec<bool>>,
}

/// Which pods a `Peer` of upstream's reachability helpers names: a namespace, a pod name, or both.
#[derive(Default, Clone, Copy)]
struct Peer<'a> {
    namespace: Option<&'a str>,
    pod: Option<&'a str>,
}

impl Peer<'_> {
    fn matches(&self, name: &str) -> bool {
        let (ns, pod) = name.split_once('/').expect("ns/pod");
        self.namespace.is_none_or(|n| n == ns) && self.pod.is_none_or(|p| p == pod)
    }
}

fn ns(n: &str) -> Peer<'_> {
    Peer {
        namespace: Some(n),
        pod: None,
    }
}

fn any() -> Peer<'static> {
    Peer::default()
}

impl Reachability {
    fn new(default: bool) -> Reachability {
        let names = pod_names();
        let n = names.len();
        Reachability {
            names,
            allowed: vec![vec![default; n]; n],
        }
    }

    fn idx(&self, pod: &str) -> usize {
        self.names
            .iter()
            .position(|n| n == pod)
            .unwrap_or_else(|| panic!("no pod {pod}"))
    }

    fn expect(mut self, from: &str, to: &str, ok: bool) -> Self {
        let (f, t) = (self.idx(from), self.idx(to));
        self.allowed[f][t] = ok;
        self
    }

    fn expect_peer(mut self, from: Peer<'_>, to: Peer<'_>, ok: bool) -> Self {
        for f in 0..self.names.len() {
            for t in 0..self.names.len() {
                if from.matches(&self.names[f]) && to.matches(&self.names[t]) {
                    self.allowed[f][t] = ok;
                }
            }
        }
        self
    }

    fn all_ingress(self, to: &str, ok: bool) -> Self {
        let (n, p) = to.split_once('/').unwrap();
        self.expect_peer(
            any(),
            Peer {
                namespace: Some(n),
                pod: Some(p),
            },
            ok,
        )
    }

    fn all_egress(self, from: &str, ok: bool) -> Self {
        let (n, p) = from.split_once('/').unwrap();
        self.expect_peer(
            Peer {
                namespace: Some(n),
                pod: Some(p),
            },
            any(),
            ok,
        )
    }

    fn table(&self) -> String {
        let mut s = String::from("       ");
        for n in &self.names {
            s.push_str(&format!("{n:>4}"));
        }
        s.push('\n');
        for (f, row) in self.allowed.iter().enumerate() {
            s.push_str(&format!("{:>6} ", self.names[f]));
            for ok in row {
                s.push_str(if *ok { "   ." } else { "   X" });
            }
            s.push('\n');
        }
        s
    }
}

/// Which side of the pair made the decision.
struct Observed {
    reference: Reachability,
    engine: Reachability,
    disagreements: Vec<String>,
}

fn observe(setup: &Setup, protocol: Protocol, port: u16) -> Observed {
    let mut reference = Reachability::new(false);
    let mut engine = Reachability::new(false);
    let mut disagreements = Vec::new();
    let names = pod_names();
    for (f, from) in names.iter().enumerate() {
        for (t, to) in names.iter().enumerate() {
            let egress = Flow {
                endpoint: from.clone(),
                direction: Direction::Egress,
                peer: PeerSpec::Endpoint(to.clone()),
                protocol,
                port,
            };
            let ingress = Flow {
                endpoint: to.clone(),
                direction: Direction::Ingress,
                peer: PeerSpec::Endpoint(from.clone()),
                protocol,
                port,
            };
            let (re, ee) = (setup.reference(&egress), setup.engine_verdict(&egress));
            let (ri, ei) = (setup.reference(&ingress), setup.engine_verdict(&ingress));
            for (flow, r, e) in [(&egress, re, ee), (&ingress, ri, ei)] {
                if r != e {
                    disagreements.push(format!(
                        "{flow}: reference {} engine {}",
                        verdict_name(r),
                        verdict_name(e)
                    ));
                }
            }
            reference.allowed[f][t] = re.is_allowed() && ri.is_allowed();
            engine.allowed[f][t] = ee.is_allowed() && ei.is_allowed();
        }
    }
    Observed {
        reference,
        engine,
        disagreements,
    }
}

/// Loads `yaml` into the x/y/z world and checks the matrix on `proto/port`.
fn validate(yaml: &str, port: u16, expected: &Reachability) {
    validate_proto(yaml, Protocol::Tcp, port, expected)
}

fn validate_proto(yaml: &str, protocol: Protocol, port: u16, expected: &Reachability) {
    let setup = Setup::from_yaml(yaml, pods(), &[]);
    let o = observe(&setup, protocol, port);
    let mut problems = Vec::new();
    if o.reference.allowed != expected.allowed {
        problems.push(format!(
            "reference evaluator differs from expectation\nexpected:\n{}reference:\n{}",
            expected.table(),
            o.reference.table()
        ));
    }
    if o.engine.allowed != expected.allowed {
        problems.push(format!(
            "engine map state differs from expectation\nexpected:\n{}engine:\n{}",
            expected.table(),
            o.engine.table()
        ));
    }
    if !o.disagreements.is_empty() {
        problems.push(format!(
            "per-direction disagreements:\n{}",
            o.disagreements.join("\n")
        ));
    }
    assert!(
        problems.is_empty(),
        "{}/{port}:\n{}\npolicy:\n{yaml}",
        protocol.as_str(),
        problems.join("\n")
    );
}

fn netpol(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n{}",
        indent(spec, 2)
    )
}

fn indent(s: &str, n: usize) -> String {
    let pad = " ".repeat(n);
    s.lines().map(|l| format!("{pad}{l}\n")).collect::<String>()
}

fn docs(parts: &[String]) -> String {
    parts.join("---\n")
}

#[test]
fn no_policy_everything_reachable() {
    // A policy in x that selects nothing (no pod has pod=none) changes nothing.
    let p = netpol(
        "x",
        "selects-nothing",
        "podSelector:\n  matchLabels: {pod: none}\npolicyTypes: [Ingress, Egress]",
    );
    validate(&p, 80, &Reachability::new(true));
}

#[test]
fn default_deny_ingress() {
    let p = netpol(
        "x",
        "deny-ingress",
        "podSelector: {}\npolicyTypes: [Ingress]",
    );
    validate(
        &p,
        80,
        &Reachability::new(true).expect_peer(any(), ns("x"), false),
    );
}

#[test]
fn default_deny_ingress_without_policy_types() {
    // policyTypes omitted: Ingress is implied.
    let p = netpol("x", "deny-ingress", "podSelector: {}");
    validate(
        &p,
        80,
        &Reachability::new(true).expect_peer(any(), ns("x"), false),
    );
}

#[test]
fn default_deny_all() {
    let p = netpol(
        "x",
        "deny-all",
        "podSelector: {}\npolicyTypes: [Ingress, Egress]",
    );
    let r = Reachability::new(true)
        .expect_peer(any(), ns("x"), false)
        .expect_peer(ns("x"), any(), false);
    validate(&p, 80, &r);
}

#[test]
fn default_deny_egress() {
    let p = netpol("x", "deny-egress", "podSelector: {}\npolicyTypes: [Egress]");
    validate(
        &p,
        80,
        &Reachability::new(true).expect_peer(ns("x"), any(), false),
    );
}

#[test]
fn allow_from_pods_within_namespace_by_pod_selector() {
    let p = netpol(
        "x",
        "x-a-allows-x-b",
        "podSelector:\n  matchLabels: {pod: a}\ningress:\n- from:\n  - podSelector:\n      matchLabels: {pod: b}",
    );
    let r = Reachability::new(true)
        .all_ingress("x/a", false)
        .expect("x/b", "x/a", true);
    validate(&p, 80, &r);
}

#[test]
fn allow_ingress_for_a_target_over_default_deny() {
    let p = docs(&[
        netpol("x", "deny-all", "podSelector: {}\npolicyTypes: [Ingress]"),
        netpol(
            "x",
            "allow-all-to-a",
            "podSelector:\n  matchLabels: {pod: a}\ningress:\n- from:\n  - podSelector: {}\n    namespaceSelector: {}",
        ),
    ]);
    let r = Reachability::new(true)
        .all_ingress("x/a", true)
        .all_ingress("x/b", false)
        .all_ingress("x/c", false);
    validate(&p, 80, &r);
}

#[test]
fn allow_ingress_from_all_namespaces() {
    let p = netpol(
        "x",
        "allow-from-another-ns",
        "podSelector:\n  matchLabels: {pod: a}\ningress:\n- from:\n  - namespaceSelector: {}",
    );
    validate(&p, 80, &Reachability::new(true));
}

#[test]
fn allow_only_from_a_different_namespace_by_namespace_selector() {
    let p = netpol(
        "x",
        "allow-client-a-via-ns-selector",
        "podSelector:\n  matchLabels: {pod: a}\ningress:\n- from:\n  - namespaceSelector:\n      matchLabels: {kubernetes.io/metadata.name: y}",
    );
    let x_a = Peer {
        namespace: Some("x"),
        pod: Some("a"),
    };
    let r = Reachability::new(true)
        .expect_peer(ns("x"), x_a, false)
        .expect_peer(ns("z"), x_a, false);
    validate(&p, 80, &r);
}

#[test]
fn pod_selector_with_match_expressions() {
    let p = netpol(
        "x",
        "x-a-allows-x-b",
        "podSelector:\n  matchLabels: {pod: a}\ningress:\n- from:\n  - podSelector:\n      matchExpressions:\n      - {key: pod, operator: In, values: [b]}",
    );
    let r = Reachability::new(true)
        .all_ingress("x/a", false)
        .expect("x/b", "x/a", true);
    validate(&p, 80, &r);
}

#[test]
fn namespace_selector_with_match_expressions() {
    let p = netpol(
        "x",
        "allow-ns-y-match-selector",
        "podSelector:\n  matchLabels: {pod: a}\ningress:\n- from:\n  - namespaceSelector:\n      matchExpressions:\n      - {key: ns, operator: In, values: [y]}",
    );
    let x_a = Peer {
        namespace: Some("x"),
        pod: Some("a"),
    };
    let r = Reachability::new(true)
        .expect_peer(ns("x"), x_a, false)
        .expect_peer(ns("z"), x_a, false);
    validate(&p, 80, &r);
}

#[test]
fn pod_selector_or_namespace_selector() {
    let p = netpol(
        "x",
        "allow-ns-not-x-or-pod-b",
        "podSelector:\n  matchLabels: {pod: a}\ningress:\n- from:\n  - namespaceSelector:\n      matchExpressions:\n      - {key: ns, operator: NotIn, values: [x]}\n  - podSelector:\n      matchLabels: {pod: b}",
    );
    let r = Reachability::new(true)
        .expect("x/a", "x/a", false)
        .expect("x/c", "x/a", false);
    validate(&p, 80, &r);
}

#[test]
fn pod_selector_and_namespace_selector() {
    let p = netpol(
        "x",
        "allow-ns-not-x-and-pod-b",
        "podSelector:\n  matchLabels: {pod: a}\ningress:\n- from:\n  - namespaceSelector:\n      matchExpressions:\n      - {key: ns, operator: NotIn, values: [x]}\n    podSelector:\n      matchLabels: {pod: b}",
    );
    let r = Reachability::new(true)
        .all_ingress("x/a", false)
        .expect("y/b", "x/a", true)
        .expect("z/b", "x/a", true);
    validate(&p, 80, &r);
}

#[test]
fn multiple_pod_selectors_and_namespace_selectors() {
    let p = netpol(
        "x",
        "allow-ns-y-z-pod-b-c",
        "podSelector:\n  matchLabels: {pod: a}\ningress:\n- from:\n  - namespaceSelector:\n      matchExpressions:\n      - {key: ns, operator: NotIn, values: [x]}\n    podSelector:\n      matchExpressions:\n      - {key: pod, operator: In, values: [b, c]}",
    );
    let x_a = Peer {
        namespace: Some("x"),
        pod: Some("a"),
    };
    let r = Reachability::new(true)
        .expect_peer(ns("x"), x_a, false)
        .expect("y/a", "x/a", false)
        .expect("z/a", "x/a", false);
    validate(&p, 80, &r);
}

#[test]
fn any_of_several_pod_selectors() {
    let p = netpol(
        "x",
        "allow-b-or-c",
        "podSelector:\n  matchLabels: {pod: a}\ningress:\n- from:\n  - podSelector:\n      matchLabels: {pod: b}\n  - podSelector:\n      matchLabels: {pod: c}",
    );
    let r = Reachability::new(true)
        .all_ingress("x/a", false)
        .expect("x/b", "x/a", true)
        .expect("x/c", "x/a", true);
    validate(&p, 80, &r);
}

#[test]
fn pod_selector_exists_and_does_not_exist() {
    // Every pod has `pod`; nobody has `tier`: Exists on pod ∧ DoesNotExist on tier = all of x.
    let p = netpol(
        "x",
        "exists",
        "podSelector:\n  matchExpressions:\n  - {key: pod, operator: Exists}\n  - {key: tier, operator: DoesNotExist}\ningress:\n- from:\n  - podSelector:\n      matchExpressions:\n      - {key: pod, operator: NotIn, values: [a, b]}",
    );
    let r = Reachability::new(true)
        .expect_peer(any(), ns("x"), false)
        .expect("x/c", "x/a", true)
        .expect("x/c", "x/b", true)
        .expect("x/c", "x/c", true);
    validate(&p, 80, &r);
}

#[test]
fn allow_only_on_a_port() {
    let p = netpol(
        "x",
        "allow-port-81",
        "podSelector:\n  matchLabels: {pod: a}\ningress:\n- ports:\n  - {port: 81, protocol: TCP}",
    );
    validate(&p, 80, &Reachability::new(true).all_ingress("x/a", false));
    validate(&p, 81, &Reachability::new(true));
    // Ports are per protocol: UDP/81 stays closed.
    validate_proto(
        &p,
        Protocol::Udp,
        81,
        &Reachability::new(true).all_ingress("x/a", false),
    );
}

#[test]
fn allow_port_range_with_end_port() {
    let p = netpol(
        "x",
        "allow-80-to-81-from-y",
        "podSelector: {}\ningress:\n- from:\n  - namespaceSelector:\n      matchLabels: {ns: y}\n  ports:\n  - {port: 80, endPort: 81, protocol: TCP}",
    );
    let closed_but_y = Reachability::new(true)
        .expect_peer(ns("x"), ns("x"), false)
        .expect_peer(ns("z"), ns("x"), false);
    validate(&p, 80, &closed_but_y);
    validate(&p, 81, &closed_but_y);
    validate(
        &p,
        82,
        &Reachability::new(true).expect_peer(any(), ns("x"), false),
    );
}

#[test]
fn union_of_two_policies_on_one_pod() {
    let p = docs(&[
        netpol(
            "x",
            "allow-b",
            "podSelector:\n  matchLabels: {pod: a}\ningress:\n- from:\n  - podSelector:\n      matchLabels: {pod: b}",
        ),
        netpol(
            "x",
            "allow-y-c",
            "podSelector:\n  matchLabels: {pod: a}\ningress:\n- from:\n  - namespaceSelector:\n      matchLabels: {ns: y}\n    podSelector:\n      matchLabels: {pod: c}",
        ),
    ]);
    let r = Reachability::new(true)
        .all_ingress("x/a", false)
        .expect("x/b", "x/a", true)
        .expect("y/c", "x/a", true);
    validate(&p, 80, &r);
}

#[test]
fn allow_ingress_from_everywhere_with_empty_rule() {
    let p = docs(&[
        netpol("x", "deny-all", "podSelector: {}\npolicyTypes: [Ingress]"),
        netpol("x", "allow-all", "podSelector: {}\ningress:\n- {}"),
    ]);
    validate(&p, 80, &Reachability::new(true));
}

#[test]
fn egress_only_to_one_namespace() {
    let p = netpol(
        "x",
        "egress-to-y",
        "podSelector: {}\npolicyTypes: [Egress]\negress:\n- to:\n  - namespaceSelector:\n      matchLabels: {ns: y}",
    );
    let r = Reachability::new(true)
        .expect_peer(ns("x"), ns("x"), false)
        .expect_peer(ns("x"), ns("z"), false);
    validate(&p, 80, &r);
}

#[test]
fn policy_types_ingress_ignores_egress_rules() {
    // Egress rules under policyTypes [Ingress] do not make egress enforced.
    let p = netpol(
        "x",
        "ingress-only",
        "podSelector:\n  matchLabels: {pod: a}\npolicyTypes: [Ingress]\ningress:\n- from:\n  - podSelector:\n      matchLabels: {pod: b}\negress:\n- to:\n  - podSelector:\n      matchLabels: {pod: b}",
    );
    let r = Reachability::new(true)
        .all_ingress("x/a", false)
        .expect("x/b", "x/a", true);
    validate(&p, 80, &r);
}

#[test]
fn egress_and_ingress_across_namespaces() {
    // x/a may only talk to y/b, and y/b only accepts x/a.
    let p = docs(&[
        netpol(
            "x",
            "a-egress-to-y-b",
            "podSelector:\n  matchLabels: {pod: a}\npolicyTypes: [Egress]\negress:\n- to:\n  - namespaceSelector:\n      matchLabels: {ns: y}\n    podSelector:\n      matchLabels: {pod: b}",
        ),
        netpol(
            "y",
            "b-ingress-from-x-a",
            "podSelector:\n  matchLabels: {pod: b}\npolicyTypes: [Ingress]\ningress:\n- from:\n  - namespaceSelector:\n      matchLabels: {ns: x}\n    podSelector:\n      matchLabels: {pod: a}",
        ),
    ]);
    let r = Reachability::new(true)
        .all_egress("x/a", false)
        .all_ingress("y/b", false)
        .expect("x/a", "y/b", true);
    validate(&p, 80, &r);
}

#[test]
fn pod_selector_is_namespaced() {
    // A policy in y selecting pod=a must not touch x/a or z/a, and its podSelector peer only
    // sees y's pods.
    let p = netpol(
        "y",
        "y-a-from-b",
        "podSelector:\n  matchLabels: {pod: a}\ningress:\n- from:\n  - podSelector:\n      matchLabels: {pod: b}",
    );
    let r = Reachability::new(true)
        .all_ingress("y/a", false)
        .expect("y/b", "y/a", true);
    validate(&p, 80, &r);
}

#[test]
fn ip_block_never_selects_pods() {
    // Upstream expects pods inside the ipBlock to be allowed; Cilium's CIDR selectors (and so
    // fqdnwall's) never match in-cluster identities, so x/a only accepts nobody here.
    let p = netpol(
        "x",
        "allow-cidr",
        "podSelector:\n  matchLabels: {pod: a}\ningress:\n- from:\n  - ipBlock:\n      cidr: 10.1.0.0/16\n      except: [10.1.2.0/24]",
    );
    validate(&p, 80, &Reachability::new(true).all_ingress("x/a", false));
}

#[test]
fn egress_ip_block_with_except_to_world() {
    // Same world as upstream's "egress policy with except", seen from x/a towards outside
    // addresses: the allowed block is reachable, the hole is not, pods are not.
    let p = netpol(
        "x",
        "egress-cidr-except",
        "podSelector:\n  matchLabels: {pod: a}\npolicyTypes: [Egress]\negress:\n- to:\n  - ipBlock:\n      cidr: 203.0.113.0/24\n      except: [203.0.113.128/25]",
    );
    validate(&p, 80, &Reachability::new(true).all_egress("x/a", false));
    let setup = Setup::from_yaml(&p, pods(), &[]);
    for (ip, expect) in [
        ("203.0.113.1", "allow"),
        ("203.0.113.127", "allow"),
        ("203.0.113.128", "drop"),
        ("203.0.113.255", "drop"),
        ("198.51.100.1", "drop"),
    ] {
        let flow = Flow {
            endpoint: "x/a".into(),
            direction: Direction::Egress,
            peer: PeerSpec::World(ip.parse().unwrap()),
            protocol: Protocol::Tcp,
            port: 80,
        };
        setup.check(&flow, expect).unwrap();
    }
}
