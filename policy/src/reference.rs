//! A deliberately simple reference evaluator: decides a flow straight from the rules.
//!
//! It exists to be obviously right, not fast: no maps, no caches, no identities. For one
//! endpoint, one direction and one peer it walks every rule of every policy, in the order the
//! semantics document states them: which rules select the endpoint, whether the direction is
//! enforced, whether a deny matches, else whether an allow matches (and whether the most
//! specific matching allow redirects to an L7 proxy), else the default. The engine's map-state
//! lookup is property-tested against it, so every shortcut the engine takes must agree with the
//! plain reading here. [`l7_allows_all`] and [`dns_allows`] answer the proxies' questions the
//! same way.

use std::net::IpAddr;

use crate::fqdn::DnsName;
use crate::labels::{Label, LabelSelector, LabelSet, CLUSTER_LABEL, SOURCE_K8S, SOURCE_RESERVED};
use crate::model::{
    Direction, Endpoint, Entity, IcmpField, IpFamily, L7Kind, L7Rules, PeerRule, PeerSelector,
    Peers, Policy, Port, PortProtocol, PortRule, Protocol, Rule, Subject,
};

/// Everything a verdict may depend on besides the flow itself.
#[derive(Debug, Clone, Copy)]
pub struct Universe<'a> {
    pub policies: &'a [Policy],
    /// Every endpoint of the node: named ports of egress rules resolve against all of them.
    pub endpoints: &'a [Endpoint],
    /// Names learned from allowed DNS answers and the IPs they resolved to.
    pub learned: &'a [(DnsName, IpAddr)],
}

/// The other side of a flow, as the datapath would know it.
#[derive(Debug, Clone, PartialEq)]
pub struct RefPeer {
    /// The labels of the peer's identity (an endpoint's labels, `reserved:host`,
    /// `reserved:world` ...).
    pub labels: LabelSet,
    /// The peer's address, when it has one (CIDR and toFQDNs selectors need it).
    pub ip: Option<IpAddr>,
    /// Whether the peer is inside the cluster (an endpoint, the host, a remote node ...).
    /// CIDR and FQDN selectors never match such peers; the `cluster` entity matches only them.
    pub in_cluster: bool,
}

/// One flow seen from one endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct RefFlow {
    pub direction: Direction,
    pub peer: RefPeer,
    /// TCP, UDP, SCTP, ICMP or ICMPv6 (a packet always has a concrete protocol).
    pub protocol: Protocol,
    /// Destination port; the ICMP type for ICMP and ICMPv6.
    pub port: u16,
}

/// What the rules say about a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefVerdict {
    /// Allowed by a rule (or by an unenforced direction). `l7` names the proxy the flow is
    /// redirected to, when the most specific matching allow carries L7 rules.
    Allow { l7: Option<L7Kind> },
    /// A deny rule matches.
    Deny,
    /// Nothing allows it and the direction is enforced.
    DefaultDeny,
}

impl RefVerdict {
    pub fn is_allowed(self) -> bool {
        matches!(self, RefVerdict::Allow { .. })
    }
}

/// Decides `flow` for endpoint `ep`.
pub fn evaluate(u: &Universe<'_>, ep: &Endpoint, flow: &RefFlow) -> RefVerdict {
    let dir = flow.direction;
    let selecting: Vec<&Rule> = u
        .policies
        .iter()
        .flat_map(|p| p.rules.iter())
        .filter(|r| rule_selects(r, ep))
        .collect();

    // 1. A matching deny wins, whether or not the direction is enforced.
    let deny_requires = requirements(u, ep, dir, true);
    for rule in &selecting {
        for pr in rule.deny.get(dir) {
            if !contributions(u, ep, pr, flow, &deny_requires).is_empty() {
                return RefVerdict::Deny;
            }
        }
    }

    // 2. A matching allow. The datapath redirects according to the most specific matching
    // entry: longer protocol+port match first, then a specific peer identity over "any".
    // Equally specific allows share one entry, where a redirect wins (an L4-only allow there
    // makes the proxy let everything through, see `l7_allows_all`).
    let mut best: Option<(Rank, Option<L7Kind>)> = None;
    let allow_requires = requirements(u, ep, dir, false);
    for rule in &selecting {
        for pr in rule.allow.get(dir) {
            for (rank, l7) in contributions(u, ep, pr, flow, &allow_requires) {
                offer(&mut best, rank, l7.map(L7Rules::kind));
            }
        }
    }
    if let Some((_, l7)) = best {
        return RefVerdict::Allow { l7 };
    }

    // 3. The default of the direction.
    if is_enforced(u, ep, dir) {
        RefVerdict::DefaultDeny
    } else {
        RefVerdict::Allow { l7: None }
    }
}

/// For a flow the rules redirect to a proxy: whether some allow without L7 rules also matches
/// it, so that the proxy must let every request through (rules are ORed).
pub fn l7_allows_all(u: &Universe<'_>, ep: &Endpoint, flow: &RefFlow) -> bool {
    let requires = requirements(u, ep, flow.direction, false);
    u.policies
        .iter()
        .flat_map(|p| p.rules.iter())
        .filter(|r| rule_selects(r, ep))
        .flat_map(|r| r.allow.get(flow.direction).iter())
        .any(|pr| {
            contributions(u, ep, pr, flow, &requires)
                .iter()
                .any(|(_, l7)| l7.is_none())
        })
}

/// Whether endpoint `ep` may resolve `name` through the server `flow` goes to (egress, the DNS
/// port and protocol): a dropped flow resolves nothing; an allowed flow that is not redirected
/// to the DNS proxy resolves everything (the proxy does not see it, or sees it only to learn);
/// a redirected one resolves the names some DNS rule of a matching allow matches — or every
/// name when an allow without L7 rules matches too. Rules of all policies are ORed.
pub fn dns_allows(u: &Universe<'_>, ep: &Endpoint, flow: &RefFlow, name: &DnsName) -> bool {
    match evaluate(u, ep, flow) {
        RefVerdict::Allow {
            l7: Some(L7Kind::Dns),
        } => {}
        RefVerdict::Allow { .. } => return true,
        RefVerdict::Deny | RefVerdict::DefaultDeny => return false,
    }
    let requires = requirements(u, ep, flow.direction, false);
    let matching: Vec<Option<&L7Rules>> = u
        .policies
        .iter()
        .flat_map(|p| p.rules.iter())
        .filter(|r| rule_selects(r, ep))
        .flat_map(|r| r.allow.get(flow.direction).iter())
        .flat_map(|pr| contributions(u, ep, pr, flow, &requires))
        .map(|(_, l7)| l7)
        .collect();
    matching.iter().any(|l7| match l7 {
        None => true,
        Some(L7Rules::Dns(rules)) => rules.iter().any(|r| r.matches(name)),
        Some(_) => false,
    })
}

/// The `fromRequires`/`toRequires` selectors of every rule selecting `ep`, in `dir`: those of
/// the allow sections, or of the deny sections with `deny`. Every endpoint selector of the
/// (allow, resp. deny) peer rules of those rules must also match all of them (Cilium's
/// requirements; CIDR, entity and FQDN peers and rules without L3 peers are not affected).
/// A selector without requirements (`{}` in a plain rule list) requires nothing: Cilium
/// flattens the selectors into requirements, and an empty list refines nothing.
pub fn requirements<'u>(
    u: &Universe<'u>,
    ep: &Endpoint,
    dir: Direction,
    deny: bool,
) -> Vec<&'u LabelSelector> {
    u.policies
        .iter()
        .flat_map(|p| p.rules.iter())
        .filter(|r| rule_selects(r, ep))
        .flat_map(|r| {
            let req = r.requires.get(dir);
            if deny {
                req.deny.iter()
            } else {
                req.allow.iter()
            }
        })
        .filter(|s| !s.requirements.is_empty())
        .collect()
}

/// Whether `dir` of `ep` is in default deny: some rule selecting it asks for it.
pub fn is_enforced(u: &Universe<'_>, ep: &Endpoint, dir: Direction) -> bool {
    u.policies
        .iter()
        .flat_map(|p| p.rules.iter())
        .any(|r| rule_selects(r, ep) && *r.default_deny.get(dir))
}

/// Whether a rule's subject selects the endpoint: endpoint selectors select workloads,
/// node selectors select the host.
pub fn rule_selects(rule: &Rule, ep: &Endpoint) -> bool {
    match &rule.subject {
        Subject::Endpoints(sel) => !ep.is_host && sel.matches(&ep.labels),
        Subject::Nodes(sel) => ep.is_host && sel.matches(&ep.labels),
    }
}

/// How specific a matching allow is, ordered as the datapath prefers entries:
/// exact protocol, then port prefix length, then a specific identity over identity 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Rank {
    proto_exact: bool,
    port_prefix: u8,
    specific_peer: bool,
}

/// Keeps the most specific match; equally specific ones merge their proxy.
fn offer(best: &mut Option<(Rank, Option<L7Kind>)>, rank: Rank, l7: Option<L7Kind>) {
    *best = Some(match *best {
        Some((br, bl7)) if br == rank => (br, merge_l7(bl7, l7)),
        Some(b) if b.0 > rank => b,
        _ => (rank, l7),
    });
}

/// On one key a redirect wins over an L3/L4-only allow (the proxy then lets every request of
/// that peer through, see [`l7_allows_all`]); two L7 kinds on one key keep the first by order
/// (Cilium rejects such a mix).
fn merge_l7(a: Option<L7Kind>, b: Option<L7Kind>) -> Option<L7Kind> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, y) => x.or(y),
    }
}

/// Every way the peer rule matches the flow: how specifically, and which proxy it asks for.
///
/// A peer rule writes map entries either for "any peer" (no L3 peer, or a peer list holding
/// the empty selector or entity `all`) or for the peer's own identity; the datapath prefers
/// the second on equal port specificity.
fn contributions<'p>(
    u: &Universe<'_>,
    ep: &Endpoint,
    pr: &'p PeerRule,
    flow: &RefFlow,
    requires: &[&LabelSelector],
) -> Vec<(Rank, Option<&'p L7Rules>)> {
    let peer = &flow.peer;
    // An endpoint selector refined by requirements is no longer a wildcard.
    let is_endpoints = |s: &PeerSelector| matches!(s, PeerSelector::Endpoints(_));
    let wildcard_sel =
        |s: &PeerSelector| is_wildcard_selector(s) && (!is_endpoints(s) || requires.is_empty());
    let sel_matches = |s: &PeerSelector| {
        selector_matches(s, peer)
            && (!is_endpoints(s) || requires.iter().all(|r| r.matches(&peer.labels)))
    };
    let (wildcard, specific) = match &pr.peers {
        Peers::All => (true, false),
        // A peer list holding a wildcard stands for any peer as a whole: its other selectors
        // add nothing (the engine's documented choice; it only matters for which entry wins a
        // redirect).
        Peers::Selectors(sels) if sels.iter().any(wildcard_sel) => (true, false),
        Peers::Selectors(sels) => (false, sels.iter().any(sel_matches)),
        Peers::Fqdns(sels) => {
            let learned = match peer.ip {
                Some(ip) if !peer.in_cluster && flow.direction == Direction::Egress => u
                    .learned
                    .iter()
                    .any(|(name, lip)| *lip == ip && sels.iter().any(|s| s.matches(name))),
                _ => false,
            };
            (false, learned)
        }
    };
    let mut out = Vec::new();
    for (applies, specific_peer) in [(wildcard, false), (specific, true)] {
        if applies {
            l4_matches(u, ep, pr, flow, specific_peer, &mut out);
        }
    }
    out
}

/// The empty endpoint selector and entity `all` stand for any peer (identity 0), as Cilium's
/// wildcard selector.
fn is_wildcard_selector(sel: &PeerSelector) -> bool {
    match sel {
        PeerSelector::Endpoints(ls) => ls.is_wildcard(),
        PeerSelector::Entity(e) => *e == Entity::All,
        PeerSelector::Cidr(_) => false,
    }
}

/// The ports part of a peer rule (port rules and ICMP fields are ORed), for the peer matched
/// specifically or as "any peer".
fn l4_matches<'p>(
    u: &Universe<'_>,
    ep: &Endpoint,
    pr: &'p PeerRule,
    flow: &RefFlow,
    specific_peer: bool,
    out: &mut Vec<(Rank, Option<&'p L7Rules>)>,
) {
    let rank = |proto_exact: bool, port_prefix: u8| Rank {
        proto_exact,
        port_prefix,
        specific_peer,
    };
    if pr.ports.is_empty() && pr.icmps.is_empty() {
        out.push((rank(false, 0), None));
        return;
    }
    for port_rule in &pr.ports {
        if let Some((proto_exact, prefix)) = port_rule_match(u, ep, port_rule, flow, specific_peer)
        {
            out.push((rank(proto_exact, prefix), port_rule.l7.as_ref()));
        }
    }
    for icmp in &pr.icmps {
        if icmp_matches(icmp, flow) {
            out.push((rank(true, 16), None));
        }
    }
}

/// Whether one peer selector matches the peer.
fn selector_matches(sel: &PeerSelector, peer: &RefPeer) -> bool {
    match sel {
        PeerSelector::Endpoints(ls) => ls.matches(&peer.labels),
        PeerSelector::Entity(e) => entity_matches(*e, peer),
        PeerSelector::Cidr(c) => {
            if peer.in_cluster {
                return false;
            }
            match peer.ip {
                Some(ip) => c.cidr.contains(&ip) && !c.except.iter().any(|x| x.contains(&ip)),
                None => false,
            }
        }
    }
}

fn has_reserved(peer: &RefPeer, key: &str) -> bool {
    peer.labels
        .labels()
        .iter()
        .any(|l| l.source == SOURCE_RESERVED && l.key == key)
}

fn is_world(peer: &RefPeer) -> bool {
    !peer.in_cluster
        && (has_reserved(peer, "world")
            || has_reserved(peer, "world-ipv4")
            || has_reserved(peer, "world-ipv6"))
}

/// Entities, as the semantics document lists them.
pub fn entity_matches(e: Entity, peer: &RefPeer) -> bool {
    match e {
        Entity::All => true,
        Entity::World => is_world(peer),
        Entity::WorldIpv4 => {
            is_world(peer)
                && (has_reserved(peer, "world-ipv4") || matches!(peer.ip, Some(IpAddr::V4(_))))
        }
        Entity::WorldIpv6 => {
            is_world(peer)
                && (has_reserved(peer, "world-ipv6") || matches!(peer.ip, Some(IpAddr::V6(_))))
        }
        Entity::Cluster => {
            peer.in_cluster
                || peer
                    .labels
                    .labels()
                    .contains(&Label::new(SOURCE_K8S, CLUSTER_LABEL, "default"))
                || [
                    "host",
                    "remote-node",
                    "init",
                    "health",
                    "unmanaged",
                    "kube-apiserver",
                    "ingress",
                ]
                .iter()
                .any(|k| has_reserved(peer, k))
        }
        Entity::Host => has_reserved(peer, "host"),
        Entity::RemoteNode => has_reserved(peer, "remote-node"),
        Entity::KubeApiserver => has_reserved(peer, "kube-apiserver"),
        Entity::Ingress => has_reserved(peer, "ingress"),
        Entity::Init => has_reserved(peer, "init"),
        Entity::Health => has_reserved(peer, "health"),
        Entity::Unmanaged => has_reserved(peer, "unmanaged"),
    }
}

/// ICMP fields match only their own family's ICMP, by type.
fn icmp_matches(f: &IcmpField, flow: &RefFlow) -> bool {
    let proto = match f.family {
        IpFamily::V4 => Protocol::Icmp,
        IpFamily::V6 => Protocol::Icmpv6,
    };
    flow.protocol == proto && flow.port == u16::from(f.icmp_type)
}

/// If one `toPorts` element matches: (protocol matched exactly, port prefix length).
fn port_rule_match(
    u: &Universe<'_>,
    ep: &Endpoint,
    pr: &PortRule,
    flow: &RefFlow,
    specific_peer: bool,
) -> Option<(bool, u8)> {
    if pr.ports.is_empty() {
        // Only L7 rules: every port of every protocol.
        return Some((false, 0));
    }
    pr.ports
        .iter()
        .filter_map(|pp| port_protocol_match(u, ep, pp, flow, specific_peer))
        .max()
}

/// TCP, UDP and SCTP are what `ANY` with a port means; `ANY` without a port is everything.
fn is_l4(p: Protocol) -> bool {
    matches!(p, Protocol::Tcp | Protocol::Udp | Protocol::Sctp)
}

fn port_protocol_match(
    u: &Universe<'_>,
    ep: &Endpoint,
    pp: &PortProtocol,
    flow: &RefFlow,
    specific_peer: bool,
) -> Option<(bool, u8)> {
    let proto_ok = |rule_proto: Protocol, port_given: bool| {
        rule_proto == flow.protocol
            || (rule_proto == Protocol::Any && (!port_given || is_l4(flow.protocol)))
    };
    match &pp.port {
        Port::Any => {
            if !proto_ok(pp.protocol, false) {
                return None;
            }
            Some((pp.protocol != Protocol::Any, 0))
        }
        Port::Number(p) => {
            if !proto_ok(pp.protocol, true) {
                return None;
            }
            let end = pp.end_port.unwrap_or(*p).max(*p);
            if flow.port < *p || flow.port > end {
                return None;
            }
            // `ANY` with a port stands for TCP, UDP and SCTP each: an exact protocol.
            Some((true, range_prefix(*p, end, flow.port)))
        }
        Port::Named(name) => {
            // Ingress: the port the endpoint itself serves under that name. Egress: the port of
            // that name on the endpoints that are the peer (any endpoint for an "any peer"
            // entry); a peer that is no endpoint serves no named port.
            let candidates: Vec<(u16, Protocol)> = match flow.direction {
                Direction::Ingress => ep.named_ports.get(name).copied().into_iter().collect(),
                Direction::Egress => u
                    .endpoints
                    .iter()
                    .filter(|e| !specific_peer || e.labels == flow.peer.labels)
                    .filter_map(|e| e.named_ports.get(name).copied())
                    .collect(),
            };
            let hit = candidates.iter().any(|&(num, nproto)| {
                num == flow.port
                    && nproto == flow.protocol
                    && (pp.protocol == Protocol::Any || pp.protocol == nproto)
            });
            hit.then_some((true, 16))
        }
    }
}

/// The prefix length of the largest power-of-two aligned block of ports that contains `port`
/// and lies inside `[start, end]` — the key a range is split into that covers `port`.
fn range_prefix(start: u16, end: u16, port: u16) -> u8 {
    let mut best = 16u8;
    for bits in 1..=16u32 {
        let size = 1u32 << bits;
        let lo = (u32::from(port) / size) * size;
        let hi = lo + size - 1;
        if lo >= u32::from(start) && hi <= u32::from(end) {
            best = (16 - bits) as u8;
        } else {
            break;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Span;
    use crate::fqdn::FqdnPattern;
    use crate::labels::{LabelKey, LabelSelector, Operator, Requirement, NAMESPACE_LABEL};
    use crate::model::{CidrSelector, FqdnSelector, HttpRule, L7Rules, PerDir, PolicyKind};
    use std::collections::BTreeMap;
    use std::sync::Arc;

    fn sel(pairs: &[(&str, &str)]) -> LabelSelector {
        LabelSelector {
            requirements: pairs
                .iter()
                .map(|(k, v)| Requirement {
                    key: LabelKey::parse(k),
                    op: Operator::In(vec![v.to_string()]),
                })
                .collect(),
        }
    }

    fn ep(id: u16, ns: &str, app: &str, ip: &str) -> Endpoint {
        Endpoint {
            id,
            name: app.into(),
            labels: LabelSet::new(vec![
                Label::k8s(NAMESPACE_LABEL, ns),
                Label::k8s("app", app),
                Label::k8s(CLUSTER_LABEL, "default"),
            ]),
            ips: vec![ip.parse().unwrap()],
            named_ports: BTreeMap::new(),
            is_host: false,
        }
    }

    fn host() -> Endpoint {
        Endpoint {
            id: 1,
            name: "host".into(),
            labels: LabelSet::new(vec![Label::reserved("host"), Label::k8s("node", "n1")]),
            ips: vec!["192.168.0.1".parse().unwrap()],
            named_ports: BTreeMap::new(),
            is_host: true,
        }
    }

    fn peer_of(e: &Endpoint) -> RefPeer {
        RefPeer {
            labels: e.labels.clone(),
            ip: e.ips.first().copied(),
            in_cluster: true,
        }
    }

    fn world(ip: &str) -> RefPeer {
        RefPeer {
            labels: LabelSet::new(vec![Label::reserved("world")]),
            ip: Some(ip.parse().unwrap()),
            in_cluster: false,
        }
    }

    fn pr(peers: Peers, ports: Vec<PortRule>) -> PeerRule {
        PeerRule {
            peers,
            ports,
            icmps: vec![],
            span: Span::default(),
        }
    }

    fn tcp(port: u16, end: Option<u16>, l7: Option<L7Rules>) -> PortRule {
        PortRule {
            ports: vec![PortProtocol {
                port: Port::Number(port),
                end_port: end,
                protocol: Protocol::Tcp,
            }],
            l7,
            server_names: vec![],
        }
    }

    fn rule(subject: LabelSelector) -> Rule {
        Rule {
            subject: Subject::Endpoints(subject),
            allow: PerDir::default(),
            deny: PerDir::default(),
            default_deny: PerDir::default(),
            has_direction: PerDir::default(),
            requires: PerDir::default(),
            description: None,
            span: Span::default(),
        }
    }

    fn with_ingress(mut r: Rule, allow: Vec<PeerRule>, deny: Vec<PeerRule>) -> Rule {
        r.allow.ingress = allow;
        r.deny.ingress = deny;
        r.default_deny.ingress = true;
        r.has_direction.ingress = true;
        r
    }

    fn with_egress(mut r: Rule, allow: Vec<PeerRule>, deny: Vec<PeerRule>) -> Rule {
        r.allow.egress = allow;
        r.deny.egress = deny;
        r.default_deny.egress = true;
        r.has_direction.egress = true;
        r
    }

    fn policy(rules: Vec<Rule>) -> Policy {
        Policy {
            kind: PolicyKind::CiliumClusterwideNetworkPolicy,
            name: "p".into(),
            namespace: None,
            file: Arc::from("test.yaml"),
            span: Span::default(),
            rules,
        }
    }

    fn flow(direction: Direction, peer: RefPeer, protocol: Protocol, port: u16) -> RefFlow {
        RefFlow {
            direction,
            peer,
            protocol,
            port,
        }
    }

    const ALLOW: RefVerdict = RefVerdict::Allow { l7: None };

    #[test]
    fn no_policy_allows_everything() {
        let a = ep(10, "x", "a", "10.0.0.1");
        let u = Universe {
            policies: &[],
            endpoints: std::slice::from_ref(&a),
            learned: &[],
        };
        for dir in [Direction::Ingress, Direction::Egress] {
            let f = flow(dir, world("8.8.8.8"), Protocol::Tcp, 443);
            assert_eq!(evaluate(&u, &a, &f), ALLOW);
        }
    }

    #[test]
    fn label_allow_and_default_deny() {
        let a = ep(10, "x", "a", "10.0.0.1");
        let b = ep(11, "x", "b", "10.0.0.2");
        let c = ep(12, "x", "c", "10.0.0.3");
        let r = with_ingress(
            rule(sel(&[("app", "a")])),
            vec![pr(
                Peers::Selectors(vec![PeerSelector::Endpoints(sel(&[("app", "b")]))]),
                vec![tcp(80, None, None)],
            )],
            vec![],
        );
        let pols = [policy(vec![r])];
        let eps = [a.clone(), b.clone(), c.clone()];
        let u = Universe {
            policies: &pols,
            endpoints: &eps,
            learned: &[],
        };
        let ing = |p: &Endpoint, proto, port| flow(Direction::Ingress, peer_of(p), proto, port);
        assert_eq!(evaluate(&u, &a, &ing(&b, Protocol::Tcp, 80)), ALLOW);
        assert_eq!(
            evaluate(&u, &a, &ing(&b, Protocol::Tcp, 81)),
            RefVerdict::DefaultDeny
        );
        assert_eq!(
            evaluate(&u, &a, &ing(&b, Protocol::Udp, 80)),
            RefVerdict::DefaultDeny
        );
        assert_eq!(
            evaluate(&u, &a, &ing(&c, Protocol::Tcp, 80)),
            RefVerdict::DefaultDeny
        );
        // b itself is not selected: unenforced.
        assert_eq!(evaluate(&u, &b, &ing(&c, Protocol::Tcp, 80)), ALLOW);
        // Egress of a is not enforced.
        let eg = flow(Direction::Egress, peer_of(&c), Protocol::Tcp, 1);
        assert_eq!(evaluate(&u, &a, &eg), ALLOW);
        assert!(is_enforced(&u, &a, Direction::Ingress));
        assert!(!is_enforced(&u, &a, Direction::Egress));
    }

    #[test]
    fn deny_wins_even_without_enforcement() {
        let a = ep(10, "x", "a", "10.0.0.1");
        let b = ep(11, "x", "b", "10.0.0.2");
        let mut r = with_ingress(
            rule(sel(&[("app", "a")])),
            vec![pr(Peers::All, vec![])],
            vec![pr(
                Peers::Selectors(vec![PeerSelector::Endpoints(sel(&[("app", "b")]))]),
                vec![tcp(80, Some(90), None)],
            )],
        );
        r.default_deny.ingress = false;
        let pols = [policy(vec![r])];
        let eps = [a.clone(), b.clone()];
        let u = Universe {
            policies: &pols,
            endpoints: &eps,
            learned: &[],
        };
        let f = |port| flow(Direction::Ingress, peer_of(&b), Protocol::Tcp, port);
        assert_eq!(evaluate(&u, &a, &f(85)), RefVerdict::Deny);
        assert_eq!(evaluate(&u, &a, &f(91)), ALLOW);
        assert!(!is_enforced(&u, &a, Direction::Ingress));
    }

    #[test]
    fn cidr_except_and_in_cluster_peers() {
        let a = ep(10, "x", "a", "10.0.0.1");
        let b = ep(11, "x", "b", "10.0.0.2");
        let r = with_egress(
            rule(sel(&[("app", "a")])),
            vec![pr(
                Peers::Selectors(vec![PeerSelector::Cidr(CidrSelector {
                    cidr: "10.0.0.0/8".parse().unwrap(),
                    except: vec!["10.1.0.0/16".parse().unwrap()],
                })]),
                vec![],
            )],
            vec![],
        );
        let pols = [policy(vec![r])];
        let eps = [a.clone(), b.clone()];
        let u = Universe {
            policies: &pols,
            endpoints: &eps,
            learned: &[],
        };
        let f = |peer| flow(Direction::Egress, peer, Protocol::Udp, 53);
        assert_eq!(evaluate(&u, &a, &f(world("10.2.3.4"))), ALLOW);
        assert_eq!(
            evaluate(&u, &a, &f(world("10.1.3.4"))),
            RefVerdict::DefaultDeny
        );
        assert_eq!(
            evaluate(&u, &a, &f(world("11.0.0.1"))),
            RefVerdict::DefaultDeny
        );
        // b's address is inside 10.0.0.0/8, but CIDR rules never select endpoints.
        assert_eq!(evaluate(&u, &a, &f(peer_of(&b))), RefVerdict::DefaultDeny);
    }

    #[test]
    fn entities() {
        let a = ep(10, "x", "a", "10.0.0.1");
        let h = host();
        let hp = RefPeer {
            labels: LabelSet::new(vec![Label::reserved("host")]),
            ip: Some("192.168.0.1".parse().unwrap()),
            in_cluster: true,
        };
        assert!(entity_matches(Entity::Cluster, &peer_of(&a)));
        assert!(entity_matches(Entity::Cluster, &hp));
        assert!(entity_matches(Entity::Host, &hp));
        assert!(!entity_matches(Entity::World, &hp));
        assert!(!entity_matches(Entity::Cluster, &world("1.1.1.1")));
        assert!(entity_matches(Entity::World, &world("1.1.1.1")));
        assert!(entity_matches(Entity::WorldIpv4, &world("1.1.1.1")));
        assert!(!entity_matches(Entity::WorldIpv6, &world("1.1.1.1")));
        assert!(entity_matches(Entity::WorldIpv6, &world("2001:db8::1")));
        assert!(entity_matches(Entity::All, &world("1.1.1.1")));
        // nodeSelector selects only the host; endpointSelector never does.
        let mut node_rule = rule(sel(&[]));
        node_rule.subject = Subject::Nodes(sel(&[("node", "n1")]));
        assert!(rule_selects(&node_rule, &h));
        assert!(!rule_selects(&node_rule, &a));
        assert!(!rule_selects(&rule(sel(&[])), &h));
        assert!(rule_selects(&rule(sel(&[])), &a));
    }

    #[test]
    fn fqdn_learned_ips() {
        let a = ep(10, "x", "a", "10.0.0.1");
        let r = with_egress(
            rule(sel(&[("app", "a")])),
            vec![pr(
                Peers::Fqdns(vec![FqdnSelector::MatchPattern(
                    FqdnPattern::parse("*.example.com").unwrap(),
                )]),
                vec![tcp(443, None, None)],
            )],
            vec![],
        );
        let pols = [policy(vec![r])];
        let eps = [a.clone()];
        let learned = [
            (DnsName::new("api.example.com"), "1.2.3.4".parse().unwrap()),
            (DnsName::new("example.com"), "1.2.3.5".parse().unwrap()),
        ];
        let u = Universe {
            policies: &pols,
            endpoints: &eps,
            learned: &learned,
        };
        let f = |ip| flow(Direction::Egress, world(ip), Protocol::Tcp, 443);
        assert_eq!(evaluate(&u, &a, &f("1.2.3.4")), ALLOW);
        assert_eq!(evaluate(&u, &a, &f("1.2.3.5")), RefVerdict::DefaultDeny);
        assert_eq!(evaluate(&u, &a, &f("1.2.3.6")), RefVerdict::DefaultDeny);
    }

    #[test]
    fn l7_redirect_and_lift() {
        let a = ep(10, "x", "a", "10.0.0.1");
        let b = ep(11, "x", "b", "10.0.0.2");
        let http = || Some(L7Rules::Http(vec![HttpRule::default()]));
        let from_b = || Peers::Selectors(vec![PeerSelector::Endpoints(sel(&[("app", "b")]))]);
        let eps = [a.clone(), b.clone()];
        let check = |rules: Vec<PeerRule>, expect: RefVerdict| {
            let pols = [policy(vec![with_ingress(
                rule(sel(&[("app", "a")])),
                rules,
                vec![],
            )])];
            let u = Universe {
                policies: &pols,
                endpoints: &eps,
                learned: &[],
            };
            let f = flow(Direction::Ingress, peer_of(&b), Protocol::Tcp, 80);
            assert_eq!(evaluate(&u, &a, &f), expect);
        };
        let redirect = RefVerdict::Allow {
            l7: Some(L7Kind::Http),
        };
        check(vec![pr(from_b(), vec![tcp(80, None, http())])], redirect);
        // An L4-only allow on the same port and peer keeps the redirect (the proxy then
        // allows every request, see l7_allows_all).
        check(
            vec![
                pr(from_b(), vec![tcp(80, None, http())]),
                pr(from_b(), vec![tcp(80, None, None)]),
            ],
            redirect,
        );
        // A more specific L4-only allow wins over a wildcard-peer L7 rule.
        check(
            vec![
                pr(Peers::All, vec![tcp(80, None, http())]),
                pr(from_b(), vec![tcp(80, None, None)]),
            ],
            ALLOW,
        );
        // A less specific L4 allow (any peer, or a port range) does not.
        check(
            vec![
                pr(from_b(), vec![tcp(80, None, http())]),
                pr(Peers::All, vec![tcp(80, None, None)]),
            ],
            redirect,
        );
        check(
            vec![
                pr(Peers::All, vec![tcp(80, None, http())]),
                pr(from_b(), vec![tcp(64, Some(127), None)]),
            ],
            redirect,
        );
    }

    #[test]
    fn l7_allows_all_when_an_l4_allow_also_matches() {
        let a = ep(10, "x", "a", "10.0.0.1");
        let b = ep(11, "x", "b", "10.0.0.2");
        let http = Some(L7Rules::Http(vec![HttpRule::default()]));
        let from_b = Peers::Selectors(vec![PeerSelector::Endpoints(sel(&[("app", "b")]))]);
        let eps = [a.clone(), b.clone()];
        let f = flow(Direction::Ingress, peer_of(&b), Protocol::Tcp, 80);
        let only_l7 = [policy(vec![with_ingress(
            rule(sel(&[("app", "a")])),
            vec![pr(from_b.clone(), vec![tcp(80, None, http.clone())])],
            vec![],
        )])];
        let u = Universe {
            policies: &only_l7,
            endpoints: &eps,
            learned: &[],
        };
        assert!(!l7_allows_all(&u, &a, &f));
        let with_l4 = [policy(vec![with_ingress(
            rule(sel(&[("app", "a")])),
            vec![
                pr(from_b.clone(), vec![tcp(80, None, http)]),
                pr(Peers::All, vec![tcp(64, Some(127), None)]),
            ],
            vec![],
        )])];
        let u = Universe {
            policies: &with_l4,
            endpoints: &eps,
            learned: &[],
        };
        assert_eq!(
            evaluate(&u, &a, &f),
            RefVerdict::Allow {
                l7: Some(L7Kind::Http)
            }
        );
        assert!(l7_allows_all(&u, &a, &f));
    }

    #[test]
    fn dns_names() {
        use crate::model::DnsRule;
        let a = ep(10, "x", "a", "10.0.0.1");
        let dns = |names: &[&str]| PortRule {
            ports: vec![PortProtocol {
                port: Port::Number(53),
                end_port: None,
                protocol: Protocol::Any,
            }],
            l7: Some(L7Rules::Dns(
                names
                    .iter()
                    .map(|n| DnsRule::MatchPattern(FqdnPattern::parse(n).unwrap()))
                    .collect(),
            )),
            server_names: vec![],
        };
        let to_world = || Peers::Selectors(vec![PeerSelector::Entity(Entity::World)]);
        let eps = [a.clone()];
        let name = |n: &str| DnsName::new(n);
        let f = |ip| flow(Direction::Egress, world(ip), Protocol::Udp, 53);
        let rules = |extra: Vec<PeerRule>| {
            let mut v = vec![
                pr(to_world(), vec![dns(&["*.example.com"])]),
                pr(to_world(), vec![dns(&["example.org"])]),
            ];
            v.extend(extra);
            [policy(vec![with_egress(
                rule(sel(&[("app", "a")])),
                v,
                vec![],
            )])]
        };
        let pols = rules(vec![]);
        let u = Universe {
            policies: &pols,
            endpoints: &eps,
            learned: &[],
        };
        assert!(dns_allows(&u, &a, &f("8.8.8.8"), &name("www.example.com")));
        assert!(dns_allows(&u, &a, &f("8.8.8.8"), &name("example.org")));
        assert!(!dns_allows(&u, &a, &f("8.8.8.8"), &name("example.net")));
        // Another port: dropped, nothing resolves.
        let tcp_other = flow(Direction::Egress, world("8.8.8.8"), Protocol::Udp, 5353);
        assert!(!dns_allows(&u, &a, &tcp_other, &name("www.example.com")));
        // An L4-only allow of the same server and port: every name.
        let pols = rules(vec![pr(
            to_world(),
            vec![PortRule {
                ports: vec![PortProtocol {
                    port: Port::Number(53),
                    end_port: None,
                    protocol: Protocol::Udp,
                }],
                l7: None,
                server_names: vec![],
            }],
        )]);
        let u = Universe {
            policies: &pols,
            endpoints: &eps,
            learned: &[],
        };
        assert!(dns_allows(&u, &a, &f("8.8.8.8"), &name("example.net")));
        // No policy: everything resolves.
        let u = Universe {
            policies: &[],
            endpoints: &eps,
            learned: &[],
        };
        assert!(dns_allows(&u, &a, &f("8.8.8.8"), &name("example.net")));
    }

    #[test]
    fn egress_named_ports_resolve_on_the_peer() {
        let a = ep(10, "x", "a", "10.0.0.1");
        let mut b = ep(11, "x", "b", "10.0.0.2");
        b.named_ports.insert("web".into(), (8080, Protocol::Tcp));
        let mut c = ep(12, "x", "c", "10.0.0.3");
        c.named_ports.insert("web".into(), (9090, Protocol::Tcp));
        let named = || PortRule {
            ports: vec![PortProtocol {
                port: Port::Named("web".into()),
                end_port: None,
                protocol: Protocol::Any,
            }],
            l7: None,
            server_names: vec![],
        };
        let to_bc = Peers::Selectors(vec![PeerSelector::Endpoints(LabelSelector {
            requirements: vec![Requirement {
                key: LabelKey::parse("app"),
                op: Operator::In(vec!["b".into(), "c".into()]),
            }],
        })]);
        let pols = [policy(vec![with_egress(
            rule(sel(&[("app", "a")])),
            vec![pr(to_bc, vec![named()])],
            vec![],
        )])];
        let eps = [a.clone(), b.clone(), c.clone()];
        let u = Universe {
            policies: &pols,
            endpoints: &eps,
            learned: &[],
        };
        let v = |peer: &Endpoint, port| {
            evaluate(
                &u,
                &a,
                &flow(Direction::Egress, peer_of(peer), Protocol::Tcp, port),
            )
        };
        assert_eq!(v(&b, 8080), ALLOW);
        assert_eq!(v(&b, 9090), RefVerdict::DefaultDeny);
        assert_eq!(v(&c, 9090), ALLOW);
        assert_eq!(v(&c, 8080), RefVerdict::DefaultDeny);
        // With any peer, every endpoint's port of that name counts, for every peer.
        let pols = [policy(vec![with_egress(
            rule(sel(&[("app", "a")])),
            vec![pr(Peers::All, vec![named()])],
            vec![],
        )])];
        let u = Universe {
            policies: &pols,
            endpoints: &eps,
            learned: &[],
        };
        let w = |port| {
            evaluate(
                &u,
                &a,
                &flow(Direction::Egress, world("1.1.1.1"), Protocol::Tcp, port),
            )
        };
        assert_eq!(w(8080), ALLOW);
        assert_eq!(w(9090), ALLOW);
        assert_eq!(w(7070), RefVerdict::DefaultDeny);
    }

    #[test]
    fn ports_icmp_and_named() {
        let mut a = ep(10, "x", "a", "10.0.0.1");
        a.named_ports.insert("web".into(), (8080, Protocol::Tcp));
        let b = ep(11, "x", "b", "10.0.0.2");
        let any_port = |protocol, port| PortProtocol {
            port,
            end_port: None,
            protocol,
        };
        let rules = vec![PeerRule {
            peers: Peers::All,
            ports: vec![PortRule {
                ports: vec![
                    any_port(Protocol::Any, Port::Number(53)),
                    any_port(Protocol::Any, Port::Named("web".into())),
                ],
                l7: None,
                server_names: vec![],
            }],
            icmps: vec![IcmpField {
                family: IpFamily::V4,
                icmp_type: 8,
            }],
            span: Span::default(),
        }];
        let pols = [policy(vec![with_ingress(
            rule(sel(&[("app", "a")])),
            rules,
            vec![],
        )])];
        let eps = [a.clone(), b.clone()];
        let u = Universe {
            policies: &pols,
            endpoints: &eps,
            learned: &[],
        };
        let v = |proto, port| evaluate(&u, &a, &flow(Direction::Ingress, peer_of(&b), proto, port));
        assert_eq!(v(Protocol::Udp, 53), ALLOW);
        assert_eq!(v(Protocol::Sctp, 53), ALLOW);
        // ANY with a port does not cover ICMP type 53.
        assert_eq!(v(Protocol::Icmp, 53), RefVerdict::DefaultDeny);
        assert_eq!(v(Protocol::Icmp, 8), ALLOW);
        assert_eq!(v(Protocol::Icmpv6, 8), RefVerdict::DefaultDeny);
        assert_eq!(v(Protocol::Tcp, 8080), ALLOW);
        assert_eq!(v(Protocol::Udp, 8080), RefVerdict::DefaultDeny);
    }

    #[test]
    fn range_prefixes() {
        assert_eq!(range_prefix(80, 80, 80), 16);
        assert_eq!(range_prefix(0, 65535, 1234), 0);
        assert_eq!(range_prefix(64, 127, 100), 10);
        assert_eq!(range_prefix(80, 90, 80), 13); // 80..=87
        assert_eq!(range_prefix(80, 90, 88), 15); // 88..=89
        assert_eq!(range_prefix(80, 90, 90), 16);
    }
}
