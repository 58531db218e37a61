//! The typed policy model: what the parser produces and the engine consumes.
//!
//! Every string of the input has been turned into a checked type by the time it is here
//! (parse, don't validate). Positions (`Span`) are kept so that `policy trace` and
//! `policy get` can point back at the rule that decided a verdict.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use crate::error::Span;
use crate::fqdn::{DnsName, FqdnPattern};
use crate::labels::{LabelSelector, LabelSet};

/// The kind of document a policy came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PolicyKind {
    /// `cilium.io/v2` `CiliumNetworkPolicy`: namespaced.
    CiliumNetworkPolicy,
    /// `cilium.io/v2` `CiliumClusterwideNetworkPolicy`: sees every namespace; may use `nodeSelector`.
    CiliumClusterwideNetworkPolicy,
    /// `networking.k8s.io/v1` `NetworkPolicy`: namespaced, translated into rules.
    NetworkPolicy,
    /// Cilium's plain rule array (a JSON/YAML list of rules, as `cilium policy import` reads):
    /// no namespace scoping, named after the file.
    RuleList,
}

impl PolicyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::CiliumNetworkPolicy => "CiliumNetworkPolicy",
            PolicyKind::CiliumClusterwideNetworkPolicy => "CiliumClusterwideNetworkPolicy",
            PolicyKind::NetworkPolicy => "NetworkPolicy",
            PolicyKind::RuleList => "RuleList",
        }
    }

    /// Namespaced kinds scope their selectors to their own namespace.
    pub fn is_namespaced(self) -> bool {
        matches!(
            self,
            PolicyKind::CiliumNetworkPolicy | PolicyKind::NetworkPolicy
        )
    }
}

/// One policy document (one CNP / CCNP / NetworkPolicy, or one rule-array file).
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub kind: PolicyKind,
    pub name: String,
    /// `Some` for namespaced kinds (defaults to `default` when metadata omits it).
    pub namespace: Option<String>,
    /// File the document came from, as given by the caller (used in errors and traces).
    pub file: Arc<str>,
    /// Where the document starts in `file`.
    pub span: Span,
    pub rules: Vec<Rule>,
}

impl Policy {
    /// `namespace/name` for namespaced policies, `name` for clusterwide ones
    /// (the form `policy trace` and `policy get` print).
    pub fn display_name(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{ns}/{}", self.name),
            None => self.name.clone(),
        }
    }
}

/// Which endpoints a rule applies to.
#[derive(Debug, Clone, PartialEq)]
pub enum Subject {
    /// `endpointSelector` (CNP/CCNP) or `podSelector` (NetworkPolicy). For namespaced kinds the
    /// parser has already added the namespace requirement.
    Endpoints(LabelSelector),
    /// `nodeSelector` (CCNP only): selects the host endpoint by the host's labels.
    Nodes(LabelSelector),
}

/// Per-direction value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct PerDir<T> {
    pub ingress: T,
    pub egress: T,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "Ingress",
            Direction::Egress => "Egress",
        }
    }
}

impl<T> PerDir<T> {
    pub fn get(&self, d: Direction) -> &T {
        match d {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }
    pub fn get_mut(&mut self, d: Direction) -> &mut T {
        match d {
            Direction::Ingress => &mut self.ingress,
            Direction::Egress => &mut self.egress,
        }
    }
}

/// One rule (`spec`, one element of `specs`, or the translation of a NetworkPolicy).
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub subject: Subject,
    /// Allow rules (`ingress` / `egress`).
    pub allow: PerDir<Vec<PeerRule>>,
    /// Deny rules (`ingressDeny` / `egressDeny`). Never carry FQDN peers or L7 rules.
    pub deny: PerDir<Vec<PeerRule>>,
    /// Whether selecting an endpoint with this rule puts that direction into default deny.
    /// Derived by the parser: the rule has rules for that direction (Cilium's rule) or lists it
    /// in `policyTypes` (NetworkPolicy), and `enableDefaultDeny` did not switch it off.
    pub default_deny: PerDir<bool>,
    /// Whether the rule has anything to say about the direction at all (allow or deny
    /// sections present, or `policyTypes` lists it). `default_deny` implies this.
    pub has_direction: PerDir<bool>,
    /// `fromRequires` (ingress) / `toRequires` (egress) of the rule's sections, per direction.
    pub requires: PerDir<Requires>,
    pub description: Option<String>,
    /// Where the rule starts in its file.
    pub span: Span,
}

/// `fromRequires` / `toRequires` of one rule and direction (Cilium's "requirements").
///
/// They grant nothing by themselves. For an endpoint, the requirements of every rule
/// selecting it are collected per direction, and each `fromEndpoints`/`toEndpoints` selector
/// of every rule selecting it, in that direction, must also match all of them (ANDed).
/// Requirements written in allow sections constrain the allow rules, those written in deny
/// sections the deny rules (Cilium's `requirements` / `requirementsDeny` in
/// `resolveL4IngressPolicy`). CIDR, entity, FQDN peers and rules without an L3 peer are not
/// constrained (`GetSourceEndpointSelectorsWithRequirements` adds them to `FromEndpoints`
/// only). The parser has scoped each selector to the policy's namespace like a peer selector.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Requires {
    pub allow: Vec<LabelSelector>,
    pub deny: Vec<LabelSelector>,
}

impl Requires {
    pub fn is_empty(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }
}

/// One element of `ingress`, `egress`, `ingressDeny`, `egressDeny` (or a NetworkPolicy
/// `from`/`to` element with its ports).
#[derive(Debug, Clone, PartialEq)]
pub struct PeerRule {
    /// The L3 peers. `Peers::All` when the rule names no L3 peer but names ports
    /// (L3 wildcard); `Peers::Selectors(vec![])` when it names nothing at all (selects nothing).
    pub peers: Peers,
    /// `toPorts` / `ports`: empty means every port and protocol. Mutually exclusive with `icmps`.
    pub ports: Vec<PortRule>,
    /// `icmps`.
    pub icmps: Vec<IcmpField>,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Peers {
    /// Any identity (the map's identity 0).
    All,
    /// The union of these selectors (fromEndpoints, fromCIDR(Set), fromEntities, ipBlock ...).
    Selectors(Vec<PeerSelector>),
    /// `toFQDNs`: IPs learned from allowed DNS answers whose name matches one of these.
    Fqdns(Vec<FqdnSelector>),
}

/// One L3 peer selector.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PeerSelector {
    /// Endpoints by labels. For namespaced kinds the parser has added the namespace
    /// requirement unless the selector names the namespace itself.
    Endpoints(LabelSelector),
    /// An entity (`world`, `cluster`, `host`, ...). `all` is `Peers::All`.
    Entity(Entity),
    /// A CIDR, with holes carved out by `except`.
    Cidr(CidrSelector),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CidrSelector {
    pub cidr: IpNet,
    /// Each a subnet of `cidr` (checked by the parser).
    pub except: Vec<IpNet>,
}

/// Cilium's entities (minus `all`, which is `Peers::All`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Entity {
    World,
    WorldIpv4,
    WorldIpv6,
    Cluster,
    Host,
    RemoteNode,
    KubeApiserver,
    Ingress,
    Init,
    Health,
    Unmanaged,
    All,
}

impl Entity {
    pub fn parse(s: &str) -> Option<Entity> {
        Some(match s {
            "world" => Entity::World,
            "world-ipv4" => Entity::WorldIpv4,
            "world-ipv6" => Entity::WorldIpv6,
            "cluster" => Entity::Cluster,
            "host" => Entity::Host,
            "remote-node" => Entity::RemoteNode,
            "kube-apiserver" => Entity::KubeApiserver,
            "ingress" => Entity::Ingress,
            "init" => Entity::Init,
            "health" => Entity::Health,
            "unmanaged" => Entity::Unmanaged,
            "all" => Entity::All,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Entity::World => "world",
            Entity::WorldIpv4 => "world-ipv4",
            Entity::WorldIpv6 => "world-ipv6",
            Entity::Cluster => "cluster",
            Entity::Host => "host",
            Entity::RemoteNode => "remote-node",
            Entity::KubeApiserver => "kube-apiserver",
            Entity::Ingress => "ingress",
            Entity::Init => "init",
            Entity::Health => "health",
            Entity::Unmanaged => "unmanaged",
            Entity::All => "all",
        }
    }
}

/// One `toFQDNs` entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FqdnSelector {
    MatchName(DnsName),
    MatchPattern(FqdnPattern),
}

impl FqdnSelector {
    /// The selector as an identity label value: the name or the pattern, lower case, with the
    /// trailing dot (`fqdn:*.example.com.`).
    pub fn label_value(&self) -> String {
        match self {
            FqdnSelector::MatchName(n) => n.as_str().to_string(),
            FqdnSelector::MatchPattern(p) => p.as_str().to_string(),
        }
    }

    pub fn matches(&self, name: &DnsName) -> bool {
        match self {
            FqdnSelector::MatchName(n) => n == name,
            FqdnSelector::MatchPattern(p) => p.matches(name),
        }
    }
}

/// L4 protocol of a port rule and of a map key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Any,
    Tcp,
    Udp,
    Sctp,
    Icmp,
    Icmpv6,
}

impl Protocol {
    /// IP protocol number as the datapath keys it (0 = any).
    pub fn number(self) -> u8 {
        match self {
            Protocol::Any => 0,
            Protocol::Icmp => 1,
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Icmpv6 => 58,
            Protocol::Sctp => 132,
        }
    }

    pub fn from_number(n: u8) -> Option<Protocol> {
        Some(match n {
            0 => Protocol::Any,
            1 => Protocol::Icmp,
            6 => Protocol::Tcp,
            17 => Protocol::Udp,
            58 => Protocol::Icmpv6,
            132 => Protocol::Sctp,
            _ => return None,
        })
    }

    /// The spelling of the JSON output (`TCP`, `UDP`, `SCTP`, `ICMP`, `ICMPv6`, `ANY`).
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Any => "ANY",
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
            Protocol::Icmp => "ICMP",
            Protocol::Icmpv6 => "ICMPv6",
        }
    }

    /// Parses a policy's `protocol` value (case-insensitive) or a CLI `/proto` suffix.
    pub fn parse(s: &str) -> Option<Protocol> {
        Some(match s.to_ascii_uppercase().as_str() {
            "ANY" => Protocol::Any,
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            "SCTP" => Protocol::Sctp,
            "ICMP" => Protocol::Icmp,
            "ICMPV6" => Protocol::Icmpv6,
            _ => return None,
        })
    }
}

/// A port as written in a policy.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Port {
    /// `0` or omitted: every port.
    Any,
    Number(u16),
    /// A named port (`http`), resolved against endpoint configuration when map state is computed.
    Named(String),
}

/// One element of `toPorts[].ports` (or a NetworkPolicy port).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PortProtocol {
    pub port: Port,
    /// `endPort`: inclusive end of a range that starts at `port` (a number). `None` = single port.
    pub end_port: Option<u16>,
    pub protocol: Protocol,
}

/// One element of `toPorts`: ports ORed, with optional L7 rules that apply to all of them.
#[derive(Debug, Clone, PartialEq)]
pub struct PortRule {
    /// Empty means every port (e.g. a `toPorts` entry with only `rules`).
    pub ports: Vec<PortProtocol>,
    pub l7: Option<L7Rules>,
    /// `serverNames` (TLS SNI) — carried through; enforced by the L7 layer.
    pub server_names: Vec<String>,
}

/// One ICMP type permitted by `icmps[].fields[]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IcmpField {
    pub family: IpFamily,
    /// ICMP / ICMPv6 type number (names such as `EchoRequest` are resolved by the parser).
    pub icmp_type: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IpFamily {
    V4,
    V6,
}

/// L7 rules of one `toPorts` entry. One protocol per entry, as in Cilium.
#[derive(Debug, Clone, PartialEq)]
pub enum L7Rules {
    Http(Vec<HttpRule>),
    Kafka(Vec<KafkaRule>),
    Dns(Vec<DnsRule>),
}

impl L7Rules {
    pub fn kind(&self) -> L7Kind {
        match self {
            L7Rules::Http(_) => L7Kind::Http,
            L7Rules::Kafka(_) => L7Kind::Kafka,
            L7Rules::Dns(_) => L7Kind::Dns,
        }
    }
}

/// Which proxy a redirect goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum L7Kind {
    Dns,
    Http,
    Kafka,
}

/// An HTTP rule: every field given must match; fields are anchored regular expressions
/// (already checked to compile by the parser).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HttpRule {
    pub method: Option<String>,
    pub path: Option<String>,
    pub host: Option<String>,
    /// `"Name: value"` (exact) or `"Name"` (present).
    pub headers: Vec<HeaderRule>,
    pub header_matches: Vec<HeaderMatch>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HeaderRule {
    pub name: String,
    pub value: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HeaderMatch {
    pub name: String,
    /// Literal value; `None` with `secret` set means the value is read from that secret.
    pub value: Option<String>,
    pub secret: Option<SecretRef>,
    pub mismatch: Option<MismatchAction>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SecretRef {
    pub namespace: Option<String>,
    pub name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MismatchAction {
    Log,
    Add,
    Delete,
    Replace,
}

/// A Kafka rule: every field given must match.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct KafkaRule {
    /// `role: produce|consume`, expanded by the parser into `api_keys`.
    pub role: Option<KafkaRole>,
    /// API keys this rule allows (from `apiKey` or `role`); empty = any.
    pub api_keys: Vec<i16>,
    pub api_version: Option<i16>,
    pub client_id: Option<String>,
    pub topic: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KafkaRole {
    Produce,
    Consume,
}

/// A DNS rule of a port rule: which names the endpoint may resolve through that port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DnsRule {
    MatchName(DnsName),
    MatchPattern(FqdnPattern),
}

impl DnsRule {
    pub fn matches(&self, name: &DnsName) -> bool {
        match self {
            DnsRule::MatchName(n) => n == name,
            DnsRule::MatchPattern(p) => p.matches(name),
        }
    }
}

/// An endpoint (a workload, or the host) as the engine sees it: built by the agent from its
/// configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    /// Numeric endpoint id (unique on the node).
    pub id: u16,
    pub name: String,
    /// Full label set, including `k8s:io.kubernetes.pod.namespace=...` and, for the host,
    /// `reserved:host`.
    pub labels: LabelSet,
    pub ips: Vec<IpAddr>,
    /// Named ports this endpoint serves (`http` → 80/TCP), for named-port resolution.
    pub named_ports: BTreeMap<String, (u16, Protocol)>,
    /// True for the node itself (selected by `nodeSelector`, identity `reserved:host`).
    pub is_host: bool,
}
