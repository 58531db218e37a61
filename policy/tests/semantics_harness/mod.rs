//! Shared harness of the semantics, truth-table and property tests: one set of policies and
//! endpoints, decided twice — by the reference evaluator straight from the rules, and by the
//! engine's per-endpoint map state (the lookup the datapath performs) — plus expectations
//! written by hand.

#![allow(dead_code)] // each test binary uses a different part of the harness

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use policy::engine::{Changes, Engine};
use policy::fqdn::DnsName;
use policy::identity::{reserved, IdentityAllocator};
use policy::labels::{
    Label, LabelSet, CLUSTER_LABEL, NAMESPACE_LABEL, NAMESPACE_LABELS_PREFIX, SOURCE_RESERVED,
};
use policy::mapstate::{LookupVerdict as MapVerdict, ProxyPorts};
use policy::model::{Direction, Endpoint, Entity, FqdnSelector, L7Kind, Policy, Protocol};
use policy::reference::{self, RefFlow, RefPeer, RefVerdict, Universe};
use policy::trace::{trace, AuditModes, TracePeer, Verdict as TraceVerdict};

pub const PROXY_PORTS: ProxyPorts = ProxyPorts {
    dns: 10053,
    http: 10080,
    kafka: 10092,
};

/// Builds an endpoint in namespace `ns` with `labels` (`k=v`), the namespace's own labels
/// (`kubernetes.io/metadata.name` and `ns`, as NetworkPolicy namespace selectors see them) and
/// the cluster label.
pub fn endpoint(id: u16, name: &str, ns: &str, labels: &[(&str, &str)], ip: &str) -> Endpoint {
    let mut ls = vec![
        Label::k8s(NAMESPACE_LABEL, ns),
        Label::k8s(CLUSTER_LABEL, "default"),
        Label::k8s(
            &format!("{NAMESPACE_LABELS_PREFIX}kubernetes.io/metadata.name"),
            ns,
        ),
        Label::k8s(&format!("{NAMESPACE_LABELS_PREFIX}ns"), ns),
    ];
    ls.extend(labels.iter().map(|(k, v)| Label::k8s(k, v)));
    Endpoint {
        id,
        name: name.to_string(),
        labels: LabelSet::new(ls),
        ips: vec![ip.parse().expect("test endpoint ip")],
        named_ports: BTreeMap::new(),
        is_host: false,
    }
}

/// The node itself, with node labels for `nodeSelector`.
pub fn host_endpoint(id: u16, node_labels: &[(&str, &str)], ip: &str) -> Endpoint {
    let mut ls = vec![Label::reserved("host")];
    ls.extend(node_labels.iter().map(|(k, v)| Label::k8s(k, v)));
    Endpoint {
        id,
        name: "host".into(),
        labels: LabelSet::new(ls),
        ips: vec![ip.parse().expect("test host ip")],
        named_ports: BTreeMap::new(),
        is_host: true,
    }
}

/// The other side of a flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerSpec {
    /// A local endpoint by name (the host endpoint is `host`).
    Endpoint(String),
    /// A reserved identity that is not a local endpoint (`remote-node`, `health`, ...).
    Reserved(String),
    /// An address outside the cluster.
    World(IpAddr),
}

impl PeerSpec {
    /// `ep:NAME`, `host`, `reserved:NAME`, `ip:ADDR`.
    pub fn parse(s: &str) -> PeerSpec {
        if s == "host" {
            return PeerSpec::Endpoint("host".into());
        }
        if let Some(n) = s.strip_prefix("ep:") {
            return PeerSpec::Endpoint(n.into());
        }
        if let Some(n) = s.strip_prefix("reserved:") {
            return PeerSpec::Reserved(n.into());
        }
        if let Some(ip) = s.strip_prefix("ip:") {
            return PeerSpec::World(ip.parse().unwrap_or_else(|_| panic!("bad ip in {s:?}")));
        }
        panic!("unknown peer {s:?} (ep:NAME, host, reserved:NAME, ip:ADDR)");
    }
}

impl fmt::Display for PeerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerSpec::Endpoint(n) => write!(f, "ep:{n}"),
            PeerSpec::Reserved(n) => write!(f, "reserved:{n}"),
            PeerSpec::World(ip) => write!(f, "ip:{ip}"),
        }
    }
}

/// One flow as seen by one endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    pub endpoint: String,
    pub direction: Direction,
    pub peer: PeerSpec,
    pub protocol: Protocol,
    pub port: u16,
}

impl fmt::Display for Flow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {} {}/{}",
            self.direction.as_str().to_lowercase(),
            self.endpoint,
            self.peer,
            self.protocol.as_str(),
            self.port
        )
    }
}

/// Parses `PROTO/PORT` (`TCP/80`, `ICMP/8`).
pub fn parse_proto_port(s: &str) -> (Protocol, u16) {
    let (p, n) = s
        .split_once('/')
        .unwrap_or_else(|| panic!("expected PROTO/PORT, got {s:?}"));
    let proto = Protocol::parse(p).unwrap_or_else(|| panic!("bad protocol in {s:?}"));
    let port = n.parse().unwrap_or_else(|_| panic!("bad port in {s:?}"));
    (proto, port)
}

/// The verdict names used in tables: `allow`, `deny` (a deny rule), `drop` (default deny),
/// `http`/`dns`/`kafka` (allowed through that proxy; `+all` when the proxy must allow every
/// request because an L3/L4-only allow matches too).
pub fn verdict_name(v: RefVerdict) -> &'static str {
    match v {
        RefVerdict::Allow { l7: None } => "allow",
        RefVerdict::Allow {
            l7: Some(L7Kind::Http),
        } => "http",
        RefVerdict::Allow {
            l7: Some(L7Kind::Dns),
        } => "dns",
        RefVerdict::Allow {
            l7: Some(L7Kind::Kafka),
        } => "kafka",
        RefVerdict::Deny => "deny",
        RefVerdict::DefaultDeny => "drop",
    }
}

/// Parses one table line: `DIR ENDPOINT PEER PROTO/PORT VERDICT`.
pub fn parse_check(line: &str) -> (Flow, String) {
    let t: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        t.len(),
        5,
        "table line {line:?}: DIR ENDPOINT PEER PROTO/PORT VERDICT"
    );
    let direction = match t[0] {
        "ingress" => Direction::Ingress,
        "egress" => Direction::Egress,
        d => panic!("bad direction {d:?} in {line:?}"),
    };
    let (protocol, port) = parse_proto_port(t[3]);
    let flow = Flow {
        endpoint: t[1].to_string(),
        direction,
        peer: PeerSpec::parse(t[2]),
        protocol,
        port,
    };
    (flow, t[4].to_string())
}

/// Policies + endpoints + learned names, loaded into the engine and kept for the reference.
pub struct Setup {
    pub policies: Vec<Policy>,
    pub endpoints: Vec<Endpoint>,
    pub learned: Vec<(DnsName, IpAddr)>,
    pub engine: Engine,
}

impl Setup {
    /// Parses `yaml` (panics with the diagnostics if it does not parse) and loads everything.
    pub fn from_yaml(yaml: &str, endpoints: Vec<Endpoint>, learned: &[(&str, &str)]) -> Setup {
        let policies = match policy::parse::parse_policies("test.yaml", yaml) {
            Ok(p) => p,
            Err(diags) => panic!(
                "test policy does not parse:\n{}\n---\n{yaml}",
                diags
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
            ),
        };
        let learned = learned
            .iter()
            .map(|(n, ip)| (DnsName::new(n), ip.parse().expect("learned ip")))
            .collect();
        Setup::new(policies, endpoints, learned)
    }

    pub fn new(
        policies: Vec<Policy>,
        endpoints: Vec<Endpoint>,
        learned: Vec<(DnsName, IpAddr)>,
    ) -> Setup {
        let mut engine = Engine::new(IdentityAllocator::new(), PROXY_PORTS);
        for ep in &endpoints {
            engine.upsert_endpoint(ep.clone());
        }
        engine.set_policies("test.yaml", policies.clone());
        let mut setup = Setup {
            policies,
            endpoints,
            learned: Vec::new(),
            engine,
        };
        for (name, ip) in learned {
            setup.learn(name, ip);
        }
        setup
    }

    /// What the name manager does when an allowed answer teaches `name → ip`: the IP gets the
    /// identity of the set of FQDN selectors that match any name it was learned under.
    pub fn learn(&mut self, name: DnsName, ip: IpAddr) {
        self.learned.push((name, ip));
        learn_into(&mut self.engine, &self.learned, ip);
    }

    pub fn endpoint(&self, name: &str) -> &Endpoint {
        self.endpoints
            .iter()
            .find(|e| e.name == name)
            .unwrap_or_else(|| panic!("no endpoint {name:?} in this setup"))
    }

    /// The peer as the reference sees it.
    pub fn ref_peer(&self, peer: &PeerSpec) -> RefPeer {
        match peer {
            PeerSpec::Endpoint(n) => {
                let ep = self.endpoint(n);
                // The host identity carries the host endpoint's labels (reserved:host + node labels).
                RefPeer {
                    labels: ep.labels.clone(),
                    ip: ep.ips.first().copied(),
                    in_cluster: true,
                }
            }
            PeerSpec::Reserved(n) => RefPeer {
                labels: LabelSet::new(vec![Label::new(SOURCE_RESERVED, n, "")]),
                ip: None,
                in_cluster: !n.starts_with("world"),
            },
            PeerSpec::World(ip) => RefPeer {
                labels: LabelSet::new(vec![Label::reserved("world")]),
                ip: Some(*ip),
                in_cluster: false,
            },
        }
    }

    /// The peer's numeric identity as the datapath would find it.
    pub fn peer_identity(&self, peer: &PeerSpec) -> u32 {
        match peer {
            PeerSpec::Endpoint(n) => {
                let ep = self.endpoint(n);
                let id = self
                    .engine
                    .endpoint_identity(ep.id)
                    .unwrap_or_else(|| panic!("endpoint {n} has no identity"));
                if ep.is_host {
                    assert_eq!(id, reserved::HOST, "the host endpoint's identity");
                }
                id
            }
            PeerSpec::Reserved(n) => match n.as_str() {
                "host" => reserved::HOST,
                "world" => reserved::WORLD,
                "unmanaged" => reserved::UNMANAGED,
                "health" => reserved::HEALTH,
                "init" => reserved::INIT,
                "remote-node" => reserved::REMOTE_NODE,
                "kube-apiserver" => reserved::KUBE_APISERVER,
                "ingress" => reserved::INGRESS,
                other => panic!("unknown reserved identity {other:?}"),
            },
            PeerSpec::World(ip) => self.engine.ipcache().identity_of(*ip),
        }
    }

    fn ref_flow(&self, flow: &Flow) -> RefFlow {
        RefFlow {
            direction: flow.direction,
            peer: self.ref_peer(&flow.peer),
            protocol: flow.protocol,
            port: flow.port,
        }
    }

    /// The reference evaluator's verdict.
    pub fn reference(&self, flow: &Flow) -> RefVerdict {
        let u = Universe {
            policies: &self.policies,
            endpoints: &self.endpoints,
            learned: &self.learned,
        };
        reference::evaluate(&u, self.endpoint(&flow.endpoint), &self.ref_flow(flow))
    }

    /// The reference's answer to the DNS proxy's question for an egress flow to a server.
    pub fn reference_dns(&self, flow: &Flow, name: &DnsName) -> bool {
        let u = Universe {
            policies: &self.policies,
            endpoints: &self.endpoints,
            learned: &self.learned,
        };
        reference::dns_allows(
            &u,
            self.endpoint(&flow.endpoint),
            &self.ref_flow(flow),
            name,
        )
    }

    /// The verdict of the endpoint's map state, as the datapath would look it up.
    pub fn engine_verdict(&self, flow: &Flow) -> RefVerdict {
        let ep = self.endpoint(&flow.endpoint);
        let ms = self
            .engine
            .map_state(ep.id)
            .unwrap_or_else(|| panic!("no map state for endpoint {}", ep.name));
        let id = self.peer_identity(&flow.peer);
        let l = ms.lookup(id, flow.direction, flow.protocol.number(), flow.port);
        match l.verdict {
            MapVerdict::Deny => RefVerdict::Deny,
            MapVerdict::NoMatch => RefVerdict::DefaultDeny,
            MapVerdict::Allow => RefVerdict::Allow {
                l7: proxy_kind(l.proxy_port),
            },
        }
    }

    /// The reference's verdict by name; a redirect is suffixed `+all` when an allow without
    /// L7 rules also matches (the proxy must then let every request through).
    pub fn reference_name(&self, flow: &Flow) -> String {
        let v = self.reference(flow);
        let mut name = verdict_name(v).to_string();
        if matches!(v, RefVerdict::Allow { l7: Some(_) }) {
            let u = Universe {
                policies: &self.policies,
                endpoints: &self.endpoints,
                learned: &self.learned,
            };
            if reference::l7_allows_all(&u, self.endpoint(&flow.endpoint), &self.ref_flow(flow)) {
                name.push_str("+all");
            }
        }
        name
    }

    /// The engine's verdict by name, with the proxy's `allow_all` as `+all`.
    pub fn engine_name(&self, flow: &Flow) -> String {
        let v = self.engine_verdict(flow);
        let mut name = verdict_name(v).to_string();
        if let RefVerdict::Allow { l7: Some(kind) } = v {
            let ep = self.endpoint(&flow.endpoint);
            let id = self.peer_identity(&flow.peer);
            match self.engine.l7_policy(
                ep.id,
                flow.direction,
                id,
                flow.protocol.number(),
                flow.port,
            ) {
                Some(p) if p.kind == kind => {
                    if p.allow_all {
                        name.push_str("+all");
                    }
                }
                Some(p) => name.push_str(&format!("(l7_policy says {:?})", p.kind)),
                None => name.push_str("(no l7_policy)"),
            }
        }
        name
    }

    /// The verdict `policy trace` gives for the flow's side (egress of the source endpoint,
    /// or ingress of the destination endpoint), by the same names (`+all` is not shown by
    /// trace, so it is left off).
    pub fn trace_name(&self, flow: &Flow) -> String {
        let local = TracePeer::Endpoint(flow.endpoint.clone());
        let peer = match &flow.peer {
            PeerSpec::Endpoint(n) => TracePeer::Endpoint(n.clone()),
            PeerSpec::Reserved(n) => TracePeer::Entity(
                Entity::parse(n).unwrap_or_else(|| panic!("no entity for reserved:{n}")),
            ),
            PeerSpec::World(ip) => TracePeer::Ip(*ip),
        };
        let (src, dst) = match flow.direction {
            Direction::Egress => (&local, &peer),
            Direction::Ingress => (&peer, &local),
        };
        let t = match trace(
            &self.engine,
            src,
            dst,
            flow.port,
            flow.protocol,
            &AuditModes::default(),
        ) {
            Ok(t) => t,
            Err(e) => return format!("(trace error: {e})"),
        };
        let side = match flow.direction {
            Direction::Egress => &t.egress,
            Direction::Ingress => &t.ingress,
        };
        match (side.verdict, side.l7) {
            (TraceVerdict::Allowed, None) => "allow".into(),
            (TraceVerdict::Allowed, Some(k)) => {
                verdict_name(RefVerdict::Allow { l7: Some(k) }).into()
            }
            (TraceVerdict::Denied, _) if side.key.is_some() => "deny".into(),
            (TraceVerdict::Denied, _) => "drop".into(),
            (TraceVerdict::Audit, _) => "audit".into(),
        }
    }

    /// Checks one flow against an expected verdict name: the reference, the map state and
    /// `policy trace` must all say it.
    pub fn check(&self, flow: &Flow, expect: &str) -> Result<(), String> {
        let r = self.reference_name(flow);
        let e = self.engine_name(flow);
        let t = self.trace_name(flow);
        let expect_trace = expect.strip_suffix("+all").unwrap_or(expect);
        if r == expect && e == expect && t == expect_trace {
            Ok(())
        } else {
            Err(format!(
                "{flow}: expected {expect}, reference says {r}, engine map state says {e}, trace says {t}"
            ))
        }
    }
}

/// What the name manager does when an allowed answer teaches an IP: the IP gets the identity of
/// the set of FQDN selectors matching any name it was learned under (labels built by the
/// engine, which adds the policy prefixes containing the IP). Returns every change emitted.
pub fn learn_into(engine: &mut Engine, learned: &[(DnsName, IpAddr)], ip: IpAddr) -> Vec<Changes> {
    let selectors: Vec<FqdnSelector> = engine
        .fqdn_selectors()
        .into_iter()
        .filter(|sel| learned.iter().any(|(n, lip)| *lip == ip && sel.matches(n)))
        .collect();
    if selectors.is_empty() {
        // No selector wants this IP: the name manager gives it no identity.
        return Vec::new();
    }
    let labels = engine.fqdn_identity_labels(&selectors, ip);
    let (id, c1) = engine.upsert_identity(labels);
    let c2 = engine.upsert_prefix(IpNet::from(ip), id);
    vec![c1, c2]
}

pub fn proxy_kind(port: u16) -> Option<L7Kind> {
    match port {
        0 => None,
        p if p == PROXY_PORTS.dns => Some(L7Kind::Dns),
        p if p == PROXY_PORTS.http => Some(L7Kind::Http),
        p if p == PROXY_PORTS.kafka => Some(L7Kind::Kafka),
        p => panic!("map entry with unknown proxy port {p}"),
    }
}
