//! Generators of random policies, endpoints and flows for the property tests, over small
//! alphabets so that selectors, CIDRs, ports and names collide often, plus a compact printer
//! so a shrunk counterexample reads like a policy.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;

use policy::error::Span;
use policy::fqdn::{DnsName, FqdnPattern};
use policy::labels::{
    Label, LabelKey, LabelSelector, LabelSet, Operator, Requirement, CLUSTER_LABEL, NAMESPACE_LABEL,
};
use policy::model::{
    CidrSelector, DnsRule, Endpoint, Entity, FqdnSelector, HttpRule, IcmpField, IpFamily,
    KafkaRule, L7Rules, PeerRule, PeerSelector, Peers, PerDir, Policy, PolicyKind, Port,
    PortProtocol, PortRule, Protocol, Requires, Rule, Subject,
};
use proptest::prelude::*;
use proptest::sample::select;

pub const NAMESPACES: &[&str] = &["default", "prod"];
pub const APPS: &[&str] = &["a", "b", "c"];
pub const TIERS: &[&str] = &["front", "back"];

/// Addresses of the world side: inside and outside the CIDR pool, both families.
pub const WORLD_IPS: &[&str] = &[
    "192.0.2.1",
    "192.0.2.70",
    "192.0.2.200",
    "198.51.100.7",
    "10.9.9.9",
    "8.8.8.8",
    "2001:db8::1",
    "2001:db8:1::1",
];

pub const NAMES: &[&str] = &["a.example.com", "b.example.com", "example.com", "x.test"];

/// (proto, port) pairs every case is probed on: ports inside and outside ranges, ICMP types
/// that collide with port numbers.
pub const PROBES: &[(Protocol, u16)] = &[
    (Protocol::Tcp, 53),
    (Protocol::Udp, 53),
    (Protocol::Tcp, 80),
    (Protocol::Tcp, 85),
    (Protocol::Udp, 80),
    (Protocol::Sctp, 80),
    (Protocol::Tcp, 443),
    (Protocol::Tcp, 8080),
    (Protocol::Tcp, 8085),
    (Protocol::Tcp, 9092),
    // range edges: 64-127, 80-85, 80-90, 1-1023
    (Protocol::Tcp, 64),
    (Protocol::Tcp, 91),
    (Protocol::Udp, 127),
    (Protocol::Tcp, 128),
    (Protocol::Tcp, 1023),
    (Protocol::Icmp, 8),
    (Protocol::Icmp, 80),
    (Protocol::Icmpv6, 128),
];

fn s(v: &str) -> String {
    v.to_string()
}

pub fn label_key() -> impl Strategy<Value = LabelKey> {
    select(vec![
        "app",
        "tier",
        "k8s:app",
        "k8s:tier",
        "any:app",
        NAMESPACE_LABEL,
    ])
    .prop_map(LabelKey::parse)
}

fn values_for(key: &LabelKey) -> Vec<String> {
    match key.key.as_str() {
        "app" => APPS.iter().map(|v| s(v)).collect(),
        "tier" => TIERS.iter().map(|v| s(v)).collect(),
        _ => NAMESPACES.iter().map(|v| s(v)).collect(),
    }
}

pub fn requirement() -> impl Strategy<Value = Requirement> {
    (
        label_key(),
        0..4u8,
        proptest::collection::vec(0..3usize, 1..3),
    )
        .prop_map(|(key, op, idx)| {
            let vals = values_for(&key);
            let picked: Vec<String> = idx.iter().map(|i| vals[i % vals.len()].clone()).collect();
            let op = match op {
                0 => Operator::In(picked),
                1 => Operator::NotIn(picked),
                2 => Operator::Exists,
                _ => Operator::DoesNotExist,
            };
            Requirement { key, op }
        })
}

pub fn selector() -> impl Strategy<Value = LabelSelector> {
    proptest::collection::vec(requirement(), 0..3)
        .prop_map(|requirements| LabelSelector { requirements })
}

pub fn entity() -> impl Strategy<Value = Entity> {
    select(vec![
        Entity::World,
        Entity::WorldIpv4,
        Entity::WorldIpv6,
        Entity::Cluster,
        Entity::Host,
        Entity::RemoteNode,
        Entity::Health,
        Entity::Init,
        Entity::KubeApiserver,
        Entity::All,
    ])
}

pub fn cidr() -> impl Strategy<Value = CidrSelector> {
    select(vec![
        ("192.0.2.0/24", vec!["192.0.2.0/26"]),
        ("192.0.2.0/24", vec![]),
        ("192.0.2.64/26", vec![]),
        ("192.0.2.128/25", vec!["192.0.2.192/26", "192.0.2.128/27"]),
        ("198.51.100.0/24", vec![]),
        ("10.0.0.0/8", vec!["10.9.0.0/16"]),
        ("10.0.0.0/8", vec![]),
        ("0.0.0.0/0", vec!["192.0.2.0/24"]),
        ("0.0.0.0/0", vec![]),
        ("2001:db8::/32", vec!["2001:db8:1::/48"]),
        ("::/0", vec![]),
    ])
    .prop_map(|(c, ex)| CidrSelector {
        cidr: c.parse().unwrap(),
        except: ex.iter().map(|e| e.parse().unwrap()).collect(),
    })
}

pub fn fqdn_selector() -> impl Strategy<Value = FqdnSelector> {
    select(vec![
        "=a.example.com",
        "=x.test",
        "*.example.com",
        "*example.com",
        "**.test",
        "*",
    ])
    .prop_map(|p| match p.strip_prefix('=') {
        Some(n) => FqdnSelector::MatchName(DnsName::parse_match_name(n).unwrap()),
        None => FqdnSelector::MatchPattern(FqdnPattern::parse(p).unwrap()),
    })
}

pub fn peer_selector() -> impl Strategy<Value = PeerSelector> {
    prop_oneof![
        3 => selector().prop_map(PeerSelector::Endpoints),
        2 => entity().prop_map(PeerSelector::Entity),
        2 => cidr().prop_map(PeerSelector::Cidr),
    ]
}

fn peers(fqdn_ok: bool) -> BoxedStrategy<Peers> {
    let base = prop_oneof![
        1 => Just(Peers::All),
        4 => proptest::collection::vec(peer_selector(), 1..3).prop_map(Peers::Selectors),
    ];
    if fqdn_ok {
        prop_oneof![
            4 => base,
            1 => proptest::collection::vec(fqdn_selector(), 1..3).prop_map(Peers::Fqdns),
        ]
        .boxed()
    } else {
        base.boxed()
    }
}

fn protocol() -> impl Strategy<Value = Protocol> {
    select(vec![
        Protocol::Any,
        Protocol::Tcp,
        Protocol::Tcp,
        Protocol::Udp,
        Protocol::Sctp,
    ])
}

pub fn port_protocol() -> impl Strategy<Value = PortProtocol> {
    let port = prop_oneof![
        1 => Just((Port::Any, None)),
        5 => select(vec![53u16, 80, 443, 8080, 9092]).prop_map(|p| (Port::Number(p), None)),
        2 => select(vec![(80u16, 85u16), (64, 127), (80, 90), (1, 1023), (8000, 8999)])
            .prop_map(|(a, b)| (Port::Number(a), Some(b))),
        1 => Just((Port::Named(s("http")), None)),
    ];
    (port, protocol()).prop_map(|((port, end_port), protocol)| PortProtocol {
        port,
        end_port,
        protocol,
    })
}

/// L7 rules a port rule may carry: the proxy is fixed by the port so that two rules on one
/// port never ask for two different proxies (the parser rejects that).
fn l7_for(pp: &[PortProtocol], dns_pick: usize) -> Option<L7Rules> {
    match pp {
        [PortProtocol {
            port: Port::Number(80),
            end_port: None,
            protocol: Protocol::Tcp,
        }] => Some(L7Rules::Http(vec![HttpRule {
            method: Some(s("GET")),
            ..HttpRule::default()
        }])),
        [PortProtocol {
            port: Port::Number(9092),
            end_port: None,
            protocol: Protocol::Tcp,
        }] => Some(L7Rules::Kafka(vec![KafkaRule {
            topic: Some(s("t")),
            ..KafkaRule::default()
        }])),
        [PortProtocol {
            port: Port::Number(53),
            end_port: None,
            ..
        }] => Some(L7Rules::Dns(dns_rules(dns_pick))),
        _ => None,
    }
}

/// DNS rules of a port-53 rule: one or two of a few names and patterns.
fn dns_rules(pick: usize) -> Vec<DnsRule> {
    let all = [
        DnsRule::MatchPattern(FqdnPattern::parse("*.example.com").unwrap()),
        DnsRule::MatchName(DnsName::parse_match_name("x.test").unwrap()),
        DnsRule::MatchPattern(FqdnPattern::parse("*").unwrap()),
        DnsRule::MatchName(DnsName::parse_match_name("example.com").unwrap()),
    ];
    let first = all[pick % all.len()].clone();
    if pick >= all.len() {
        vec![first, all[(pick + 1) % all.len()].clone()]
    } else {
        vec![first]
    }
}

/// Names DNS decisions are probed with.
pub const QUERY_NAMES: &[&str] = &["a.example.com", "example.com", "x.test", "other.org"];

fn port_rule(l7_ok: bool) -> impl Strategy<Value = PortRule> {
    (
        proptest::collection::vec(port_protocol(), 1..3),
        any::<bool>(),
        0..8usize,
    )
        .prop_map(move |(ports, want_l7, dns_pick)| {
            let l7 = if l7_ok && want_l7 {
                l7_for(&ports, dns_pick)
            } else {
                None
            };
            PortRule {
                ports,
                l7,
                server_names: vec![],
            }
        })
}

fn icmp_field() -> impl Strategy<Value = IcmpField> {
    select(vec![
        (IpFamily::V4, 8u8),
        (IpFamily::V4, 80),
        (IpFamily::V4, 0),
        (IpFamily::V6, 128),
    ])
    .prop_map(|(family, icmp_type)| IcmpField { family, icmp_type })
}

/// One peer rule. Deny rules take no FQDN peers and no L7; FQDN peers are egress only.
pub fn peer_rule(deny: bool, egress: bool) -> impl Strategy<Value = PeerRule> {
    let l4 = prop_oneof![
        2 => Just((vec![], vec![])),
        4 => proptest::collection::vec(port_rule(!deny), 1..3).prop_map(|p| (p, vec![])),
        1 => proptest::collection::vec(icmp_field(), 1..3).prop_map(|i| (vec![], i)),
    ];
    (peers(egress && !deny), l4).prop_map(|(peers, (ports, icmps))| PeerRule {
        peers,
        ports,
        icmps,
        span: Span::default(),
    })
}

/// `fromRequires` / `toRequires`: mostly none.
fn requires() -> impl Strategy<Value = PerDir<Requires>> {
    let list = || proptest::collection::vec(selector(), 0..2);
    prop_oneof![
        4 => Just(PerDir::default()),
        1 => (list(), list(), list(), list()).prop_map(|(ia, id, ea, ed)| PerDir {
            ingress: Requires { allow: ia, deny: id },
            egress: Requires { allow: ea, deny: ed },
        }),
    ]
}

pub fn rule() -> impl Strategy<Value = Rule> {
    let subject = prop_oneof![
        8 => selector().prop_map(Subject::Endpoints),
        1 => selector().prop_map(Subject::Nodes),
    ];
    let rules = |deny: bool, egress: bool| proptest::collection::vec(peer_rule(deny, egress), 0..3);
    (
        subject,
        rules(false, false),
        rules(false, true),
        rules(true, false),
        rules(true, true),
        // enableDefaultDeny, per direction (mostly left at its default, true)
        prop_oneof![4 => Just(true), 1 => Just(false)],
        prop_oneof![4 => Just(true), 1 => Just(false)],
        // a direction section present but empty (`ingress: []`-like)
        any::<bool>(),
        requires(),
    )
        .prop_map(
            |(subject, ai, ae, di, de, ddi, dde, empty_section, requires)| {
                let has_in = !ai.is_empty() || !di.is_empty() || empty_section;
                let has_eg = !ae.is_empty() || !de.is_empty();
                Rule {
                    subject,
                    allow: PerDir {
                        ingress: ai,
                        egress: ae,
                    },
                    deny: PerDir {
                        ingress: di,
                        egress: de,
                    },
                    default_deny: PerDir {
                        ingress: has_in && ddi,
                        egress: has_eg && dde,
                    },
                    has_direction: PerDir {
                        ingress: has_in,
                        egress: has_eg,
                    },
                    requires,
                    description: None,
                    span: Span::default(),
                }
            },
        )
}

pub fn policy_named(name: String) -> impl Strategy<Value = Policy> {
    proptest::collection::vec(rule(), 1..4).prop_map(move |rules| Policy {
        kind: PolicyKind::CiliumClusterwideNetworkPolicy,
        name: name.clone(),
        namespace: None,
        file: Arc::from("generated.yaml"),
        span: Span::default(),
        rules,
    })
}

pub fn policies() -> impl Strategy<Value = Vec<Policy>> {
    (1..4usize).prop_flat_map(|n| {
        (0..n)
            .map(|i| policy_named(format!("p{i}")))
            .collect::<Vec<_>>()
    })
}

/// Workloads with labels over the small alphabet, and the host.
pub fn endpoints() -> impl Strategy<Value = Vec<Endpoint>> {
    let workload = (
        select(NAMESPACES.to_vec()),
        select(APPS.to_vec()),
        proptest::option::of(select(TIERS.to_vec())),
        any::<bool>(),
    );
    proptest::collection::vec(workload, 2..6).prop_map(|ws| {
        let mut eps: Vec<Endpoint> = ws
            .into_iter()
            .enumerate()
            .map(|(i, (ns, app, tier, named))| {
                let mut labels = vec![
                    Label::k8s(NAMESPACE_LABEL, ns),
                    Label::k8s(CLUSTER_LABEL, "default"),
                    Label::k8s("app", app),
                ];
                if let Some(t) = tier {
                    labels.push(Label::k8s("tier", t));
                }
                let mut named_ports = BTreeMap::new();
                if named {
                    named_ports.insert(s("http"), (8080 + (i as u16 % 2) * 5, Protocol::Tcp));
                }
                Endpoint {
                    id: 100 + i as u16,
                    name: format!("ep{i}"),
                    labels: LabelSet::new(labels),
                    ips: vec![format!("10.0.0.{}", i + 1).parse().unwrap()],
                    named_ports,
                    is_host: false,
                }
            })
            .collect();
        eps.push(Endpoint {
            id: 1,
            name: s("host"),
            labels: LabelSet::new(vec![Label::reserved("host"), Label::k8s("tier", "back")]),
            ips: vec!["192.168.1.1".parse().unwrap()],
            named_ports: BTreeMap::new(),
            is_host: true,
        });
        eps
    })
}

pub fn learned() -> impl Strategy<Value = Vec<(DnsName, IpAddr)>> {
    proptest::collection::vec((select(NAMES.to_vec()), select(WORLD_IPS.to_vec())), 0..5).prop_map(
        |v| {
            let mut out: Vec<(DnsName, IpAddr)> = v
                .into_iter()
                .map(|(n, ip)| (DnsName::new(n), ip.parse().unwrap()))
                .collect();
            out.sort();
            out.dedup();
            out
        },
    )
}

// ---- compact printing of counterexamples ----

pub fn show_selector(sel: &LabelSelector) -> String {
    if sel.requirements.is_empty() {
        return s("{}");
    }
    let parts: Vec<String> = sel
        .requirements
        .iter()
        .map(|r| match &r.op {
            Operator::In(v) => format!("{} in {v:?}", r.key),
            Operator::NotIn(v) => format!("{} notin {v:?}", r.key),
            Operator::Exists => format!("{} exists", r.key),
            Operator::DoesNotExist => format!("!{}", r.key),
        })
        .collect();
    format!("{{{}}}", parts.join(", "))
}

fn show_peers(p: &Peers) -> String {
    match p {
        Peers::All => s("all"),
        Peers::Fqdns(f) => format!(
            "fqdns[{}]",
            f.iter()
                .map(|x| x.label_value())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Peers::Selectors(v) => {
            let parts: Vec<String> = v
                .iter()
                .map(|x| match x {
                    PeerSelector::Endpoints(sel) => format!("ep{}", show_selector(sel)),
                    PeerSelector::Entity(e) => format!("entity:{}", e.as_str()),
                    PeerSelector::Cidr(c) => {
                        if c.except.is_empty() {
                            format!("cidr:{}", c.cidr)
                        } else {
                            let ex: Vec<String> = c.except.iter().map(|e| e.to_string()).collect();
                            format!("cidr:{} except {}", c.cidr, ex.join(","))
                        }
                    }
                })
                .collect();
            format!("[{}]", parts.join(" | "))
        }
    }
}

fn show_peer_rule(pr: &PeerRule) -> String {
    let mut out = show_peers(&pr.peers);
    for port_rule in &pr.ports {
        let ports: Vec<String> = port_rule
            .ports
            .iter()
            .map(|pp| {
                let port = match &pp.port {
                    Port::Any => s("*"),
                    Port::Number(n) => match pp.end_port {
                        Some(e) => format!("{n}-{e}"),
                        None => n.to_string(),
                    },
                    Port::Named(n) => n.clone(),
                };
                format!("{port}/{}", pp.protocol.as_str())
            })
            .collect();
        let _ = write!(out, " ports({})", ports.join(","));
        if let Some(l7) = &port_rule.l7 {
            let _ = write!(out, "+{:?}", l7.kind());
        }
    }
    for i in &pr.icmps {
        let _ = write!(out, " icmp({:?}:{})", i.family, i.icmp_type);
    }
    out
}

/// One line per peer rule, indented under its rule.
pub fn show_policies(pols: &[Policy]) -> String {
    let mut out = String::new();
    for p in pols {
        let _ = writeln!(out, "policy {}:", p.name);
        for r in &p.rules {
            let subj = match &r.subject {
                Subject::Endpoints(sel) => format!("endpoints {}", show_selector(sel)),
                Subject::Nodes(sel) => format!("nodes {}", show_selector(sel)),
            };
            let _ = writeln!(
                out,
                "  rule {subj} default_deny(in={}, eg={})",
                r.default_deny.ingress, r.default_deny.egress
            );
            for (name, req) in [
                ("fromRequires", &r.requires.ingress.allow),
                ("fromRequires (deny)", &r.requires.ingress.deny),
                ("toRequires", &r.requires.egress.allow),
                ("toRequires (deny)", &r.requires.egress.deny),
            ] {
                if !req.is_empty() {
                    let sels: Vec<String> = req.iter().map(show_selector).collect();
                    let _ = writeln!(out, "    {name}: {}", sels.join(" & "));
                }
            }
            for (name, list) in [
                ("allow ingress", &r.allow.ingress),
                ("allow egress", &r.allow.egress),
                ("deny ingress", &r.deny.ingress),
                ("deny egress", &r.deny.egress),
            ] {
                for pr in list {
                    let _ = writeln!(out, "    {name}: {}", show_peer_rule(pr));
                }
            }
        }
    }
    out
}

pub fn show_endpoints(eps: &[Endpoint]) -> String {
    eps.iter()
        .map(|e| {
            let labels: Vec<String> = e.labels.labels().iter().map(|l| l.to_string()).collect();
            format!(
                "  {} id={} ips={:?} named={:?} labels=[{}]\n",
                e.name,
                e.id,
                e.ips,
                e.named_ports,
                labels.join(" ")
            )
        })
        .collect()
}
