//! The engine: policies + endpoints + identities → per-endpoint map state, recomputed incrementally.
//!
//! The engine owns the identity allocator, the selector cache, the ipcache and every
//! endpoint's policy map, and answers each event with the exact [`Changes`] a datapath applies:
//!
//! - an identity appears or goes (a new endpoint label set, a policy prefix, an FQDN selector
//!   set): the selector cache says which selectors gained or lost it; only the endpoints using
//!   those selectors are touched, and in them only the entries of that identity are recomputed;
//! - one policy source (file) changes: only endpoints selected by its old or new rules are
//!   recomputed, and the result is diffed against their current maps;
//! - an endpoint appears, changes or goes: its own map, and the entries of its identity in the
//!   maps of endpoints whose selectors select it.
//!
//! Per endpoint and direction the engine keeps the compiled rules that apply, grouped by peer
//! selector. The entries of one peer identity depend only on the rules whose selectors select
//! it (plus nothing else: identity 0 entries come from wildcard peers), which is what makes the
//! per-identity recomputation exact: an incremental result equals a full recomputation.
//!
//! Semantics decided here (Cilium evidence in the notes of each item):
//! - default deny per direction: some selecting rule has `default_deny` for it; a direction no
//!   rule enforces gets the allow-all entry (identity 0, protocol 0, port 0) besides whatever
//!   its rules add (Cilium's `allowAllIdentities`);
//! - `ANY` with a port is TCP, UDP and SCTP (Cilium `rule.go` merges `ProtoAny` as those three);
//!   `ANY` without a port, an L3-only rule and a `toPorts` entry without ports are protocol 0;
//! - a peer list containing a wildcard (`{}` endpoint selector, entity `all`) is identity 0,
//!   like Cilium's wildcard selector;
//! - named ports: ingress resolves against the endpoint's own named ports; egress against the
//!   named ports of the endpoints having the peer identity (all endpoints for a wildcard peer);
//! - on one key a deny beats any allow and a redirect beats a plain allow; the plain allow then
//!   makes the proxy allow everything for that peer ([`Engine::l7_policy`]), as Cilium adds a
//!   wildcard L7 rule (`l4.go` `ensureWildcard`, `toMapState`'s priority to L7 redirection);
//! - `fromRequires`/`toRequires` (model::Requires): the requirements of every rule selecting an
//!   endpoint are ANDed into the endpoint peer selectors of those rules. A rule's peers are
//!   compiled once more per requirement set seen (`CompiledRule::variants`), so endpoints
//!   with the same requirements share them and the selector cache knows every refined
//!   selector (incremental updates work unchanged).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use ipnet::IpNet;

use crate::fqdn::DnsName;
use crate::identity::{reserved, IdentityAllocator, NumericIdentity};
use crate::labels::{Label, LabelSelector, LabelSet, Requirement, SOURCE_CIDR, SOURCE_RESERVED};
use crate::mapstate::{
    port_range_keys, EntryBuilder, IdMap, LookupVerdict, MapDiff, MapEntry, MapKey, MapState,
    PortKey, RuleRef, Summary,
};
use crate::model::{
    Direction, DnsRule, Endpoint, FqdnSelector, IpFamily, L7Kind, L7Rules, PeerRule, PeerSelector,
    Peers, PerDir, Policy, Port, Protocol, Subject,
};
use crate::selector::{fqdn_label, IdentityFacts, LabelIndex, Selector, SelectorCache, SelectorId};

pub use crate::mapstate::ProxyPorts;

const DIRS: [Direction; 2] = [Direction::Ingress, Direction::Egress];

/// What one engine call changed, for the datapath.
///
/// Apply map upserts before ipcache upserts (an IP must not carry an identity the maps do not
/// know yet), and ipcache deletes before map deletes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Changes {
    /// Per endpoint id, in id order; each diff holds only keys whose value really changed.
    pub maps: Vec<(u16, MapDiff)>,
    pub ipcache_upserts: Vec<(IpNet, NumericIdentity)>,
    pub ipcache_deletes: Vec<IpNet>,
    pub identities_added: Vec<NumericIdentity>,
    pub identities_removed: Vec<NumericIdentity>,
    /// The set of prefixes named by policies changed: FQDN identities carry the policy
    /// prefixes containing their IPs as `cidr:` labels ([`Engine::prefix_labels_for`]), so the
    /// name manager should relabel them.
    pub prefixes_changed: bool,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.maps.is_empty()
            && self.ipcache_upserts.is_empty()
            && self.ipcache_deletes.is_empty()
            && self.identities_added.is_empty()
            && self.identities_removed.is_empty()
            && !self.prefixes_changed
    }

    /// Folds a later batch into this one, as if both had been applied in order.
    pub fn merge(&mut self, later: Changes) {
        let mut maps: BTreeMap<u16, (BTreeMap<MapKey, MapEntry>, BTreeSet<MapKey>)> =
            BTreeMap::new();
        for (ep, d) in std::mem::take(&mut self.maps).into_iter().chain(later.maps) {
            let (adds, dels) = maps.entry(ep).or_default();
            for k in d.deletes {
                adds.remove(&k);
                dels.insert(k);
            }
            for (k, e) in d.adds {
                dels.remove(&k);
                adds.insert(k, e);
            }
        }
        self.maps = maps
            .into_iter()
            .map(|(ep, (adds, dels))| {
                (
                    ep,
                    MapDiff {
                        adds: adds.into_iter().collect(),
                        deletes: dels.into_iter().collect(),
                    },
                )
            })
            .filter(|(_, d)| !d.is_empty())
            .collect();
        let mut ipc: BTreeMap<IpNet, Option<NumericIdentity>> = BTreeMap::new();
        for (p, id) in std::mem::take(&mut self.ipcache_upserts) {
            ipc.insert(p, Some(id));
        }
        for p in std::mem::take(&mut self.ipcache_deletes) {
            ipc.insert(p, None);
        }
        for (p, id) in later.ipcache_upserts {
            ipc.insert(p, Some(id));
        }
        for p in later.ipcache_deletes {
            ipc.insert(p, None);
        }
        for (p, v) in ipc {
            match v {
                Some(id) => self.ipcache_upserts.push((p, id)),
                None => self.ipcache_deletes.push(p),
            }
        }
        self.identities_added.extend(later.identities_added);
        self.identities_removed.extend(later.identities_removed);
        self.prefixes_changed |= later.prefixes_changed;
    }
}

type RuleId = u32;
type NamedPorts = BTreeMap<String, BTreeSet<(u16, Protocol)>>;

/// Which peers a compiled peer rule applies to.
#[derive(Debug)]
pub(crate) enum PeerTarget {
    /// Identity 0: any peer.
    Wildcard,
    Selectors(Vec<SelectorId>),
}

#[derive(Debug)]
pub(crate) enum PortKeys {
    Keys(Vec<PortKey>),
    /// Resolved per endpoint (ingress) or per peer identity (egress).
    Named {
        name: String,
        protocol: Protocol,
    },
}

#[derive(Debug)]
pub(crate) struct PortSpec {
    pub(crate) keys: PortKeys,
    pub(crate) l7: Option<Arc<L7Rules>>,
}

/// One element of `ingress`/`egress`/`ingressDeny`/`egressDeny`, compiled once and shared by
/// every endpoint the rule selects.
#[derive(Debug)]
pub(crate) struct CompiledPeerRule {
    pub(crate) deny: bool,
    pub(crate) origin: Arc<RuleRef>,
    pub(crate) target: PeerTarget,
    /// Never empty: an L3-only rule has the single key "any protocol, any port".
    pub(crate) ports: Vec<PortSpec>,
}

/// Requirements per direction: `[allow, deny]`, each sorted and deduplicated.
type ReqKey = PerDir<[Vec<Requirement>; 2]>;

fn req_key_is_empty(k: &ReqKey) -> bool {
    DIRS.iter().all(|d| k.get(*d).iter().all(Vec::is_empty))
}

#[derive(Debug)]
struct CompiledRule {
    subject: Subject,
    default_deny: PerDir<bool>,
    enforcing: Arc<RuleRef>,
    peers: PerDir<Vec<Arc<CompiledPeerRule>>>,
    /// The policy holding the model rule and its index there (for requirement variants).
    source: (Arc<Policy>, usize),
    /// The rule's own `fromRequires`/`toRequires`, flattened into requirements.
    requires: ReqKey,
    /// Whether the rule has endpoint peer selectors per direction, `[allow, deny]`: only
    /// requirements of those parts change its peers.
    endpoint_peers: PerDir<[bool; 2]>,
    /// Peers with requirements applied, per requirement set (masked by `endpoint_peers`).
    /// Kept until the rule goes; their selectors are in `selectors`.
    variants: HashMap<ReqKey, PerDir<Vec<Arc<CompiledPeerRule>>>>,
    /// One element per use, released one by one.
    selectors: Vec<SelectorId>,
    prefixes: Vec<IpNet>,
}

/// The rules that apply to one endpoint in one direction.
#[derive(Debug, Default, Clone)]
pub(crate) struct DirPolicy {
    pub(crate) enforced: bool,
    /// The rules that put the direction into default deny.
    pub(crate) enforcing: Vec<Arc<RuleRef>>,
    pub(crate) wildcard: Vec<Arc<CompiledPeerRule>>,
    pub(crate) by_selector: IdMap<Vec<Arc<CompiledPeerRule>>>,
    /// Some egress port is named (its keys depend on other endpoints' named ports).
    pub(crate) named_egress: bool,
    /// Per selector, what its rules say (see [`Summary`]).
    pub(crate) summaries: IdMap<Arc<Summary>>,
    /// What the wildcard-peer rules say, with the allow-all entry when not enforced: the
    /// identity-0 entries.
    pub(crate) wildcard_summary: Arc<Summary>,
}

#[derive(Debug)]
struct EpState {
    ep: Endpoint,
    identity: NumericIdentity,
    /// The rules selecting the endpoint, in id order.
    rules: Vec<RuleId>,
    policy: PerDir<DirPolicy>,
    map: MapState,
}

#[derive(Debug)]
struct PolicyPrefix {
    refs: u32,
    /// `None` for `/0`, which the world identities stand for.
    identity: Option<NumericIdentity>,
}

/// The L7 rules the proxy applies to one flow.
#[derive(Debug, Clone, PartialEq)]
pub struct L7Policy {
    pub kind: L7Kind,
    /// An allow without L7 rules (L3-only or L4-only) also matches the flow: every request is
    /// allowed (Cilium adds a wildcard L7 rule for such a peer). `allow_all_rules` names them.
    pub allow_all: bool,
    pub allow_all_rules: Vec<Arc<RuleRef>>,
    /// The L7 rules of `kind` of every allow rule that matches the flow, with their origin;
    /// a request is allowed when one of them matches (rules are ORed).
    pub rules: Vec<(Arc<L7Rules>, Arc<RuleRef>)>,
}

/// What the DNS proxy may answer for one endpoint asking one server.
///
/// Exact semantics (`Engine::dns_rules_for`): the flow endpoint → (server identity, port,
/// protocol) is looked up in the endpoint's egress map, as the datapath does.
/// - `Denied`: the lookup denies it (a deny rule, or no allow in an enforced direction). Every
///   name is refused; `rules` are the deny rules or the rules that enforce default deny.
/// - `Unrestricted`: allowed without a DNS redirect: no DNS rule applies to this server and
///   port (egress not enforced, or allowed by an L3/L4 rule only). Every name is allowed and
///   its answer still learned (visibility).
/// - `Rules`: the flow is redirected to the DNS proxy; a name is allowed when one of `rules`
///   (from every policy, ORed) matches it, or when `allow_all` (an allow without DNS rules
///   also matches the flow, which ORs in every name).
#[derive(Debug, Clone, PartialEq)]
pub enum DnsVerdict {
    Denied {
        rules: Vec<Arc<RuleRef>>,
    },
    Unrestricted,
    Rules {
        /// The `rules.dns` lists (always `L7Rules::Dns`) shared with the policy, with the
        /// rule each comes from: no per-query copies.
        rules: Vec<(Arc<L7Rules>, Arc<RuleRef>)>,
        allow_all: bool,
    },
}

impl DnsVerdict {
    /// Every DNS rule that applies, with the rule it comes from.
    pub fn dns_rules(&self) -> impl Iterator<Item = (&DnsRule, &Arc<RuleRef>)> {
        let rules: &[(Arc<L7Rules>, Arc<RuleRef>)] = match self {
            DnsVerdict::Rules { rules, .. } => rules,
            _ => &[],
        };
        rules.iter().flat_map(|(r, origin)| {
            let list: &[DnsRule] = match r.as_ref() {
                L7Rules::Dns(list) => list,
                _ => &[],
            };
            list.iter().map(move |d| (d, origin))
        })
    }

    /// Whether a query for `name` is allowed.
    pub fn allows(&self, name: &DnsName) -> bool {
        match self {
            DnsVerdict::Denied { .. } => false,
            DnsVerdict::Unrestricted => true,
            DnsVerdict::Rules { allow_all, .. } => {
                *allow_all || self.dns_rules().any(|(r, _)| r.matches(name))
            }
        }
    }

    /// The rule that allows `name`, when one does.
    pub fn matching_rule(&self, name: &DnsName) -> Option<&Arc<RuleRef>> {
        self.dns_rules()
            .find(|(r, _)| r.matches(name))
            .map(|(_, o)| o)
    }
}

/// Map changes not yet reported: the value each touched key had before the operation.
#[derive(Default)]
struct Pending {
    maps: BTreeMap<u16, BTreeMap<MapKey, Option<MapEntry>>>,
    /// Endpoints whose whole map was replaced: their map as it was before the operation
    /// (then `maps` holds nothing for them).
    snapshots: BTreeMap<u16, MapState>,
    ipcache: BTreeMap<IpNet, Option<NumericIdentity>>,
    identities_added: Vec<NumericIdentity>,
    identities_removed: Vec<NumericIdentity>,
    prefixes_changed: bool,
}

impl Pending {
    /// Keeps the map an endpoint had before the operation, when it is replaced wholesale.
    fn snapshot(&mut self, ep: u16, current: MapState) {
        if self.snapshots.contains_key(&ep) {
            return;
        }
        let mut m = current;
        if let Some(keys) = self.maps.remove(&ep) {
            for (k, orig) in keys {
                match orig {
                    Some(e) => {
                        m.insert(k, e);
                    }
                    None => {
                        m.remove(&k);
                    }
                }
            }
        }
        self.snapshots.insert(ep, m);
    }

    fn record(&mut self, ep: u16, key: MapKey, old: Option<&MapEntry>) {
        if self.snapshots.contains_key(&ep) {
            return;
        }
        self.maps
            .entry(ep)
            .or_default()
            .entry(key)
            .or_insert_with(|| old.cloned());
    }

    /// Records the keys that differ between `old` and `new` (both sorted) of one group.
    fn record_group(
        &mut self,
        ep: u16,
        dir: Direction,
        id: NumericIdentity,
        old: &[(PortKey, MapEntry)],
        new: &[(PortKey, MapEntry)],
    ) {
        let mut d = MapDiff::default();
        crate::mapstate::diff_group(id, dir, old, new, &mut d);
        if d.is_empty() {
            return;
        }
        let old_of = |k: &MapKey| {
            old.binary_search_by(|(x, _)| x.cmp(&k.port_key()))
                .ok()
                .map(|i| &old[i].1)
        };
        for (k, _) in &d.adds {
            self.record(ep, *k, old_of(k));
        }
        for k in &d.deletes {
            self.record(ep, *k, old_of(k));
        }
    }
}

/// Read-only parts the computation needs (split from the mutable endpoint states).
struct Ctx<'a> {
    sel: &'a SelectorCache,
    named_all: &'a NamedPorts,
    named_by_identity: &'a IdMap<NamedPorts>,
    proxy: &'a ProxyPorts,
}

/// The policy engine.
#[derive(Debug)]
pub struct Engine {
    ids: IdentityAllocator,
    proxy_ports: ProxyPorts,
    sel: SelectorCache,
    /// Source → its policies and the ids of their compiled rules.
    sources: BTreeMap<String, (Vec<Arc<Policy>>, Vec<RuleId>)>,
    rules: BTreeMap<RuleId, CompiledRule>,
    next_rule: RuleId,
    subject_index: LabelIndex<RuleId>,
    node_rules: Vec<RuleId>,
    endpoints: BTreeMap<u16, EpState>,
    /// Selector → endpoints whose policy uses it.
    selector_users: IdMap<BTreeSet<u16>>,
    ipcache: crate::ipcache::Ipcache,
    ep_prefixes: BTreeMap<IpNet, NumericIdentity>,
    fqdn_prefixes: BTreeMap<IpNet, NumericIdentity>,
    policy_prefixes: BTreeMap<IpNet, PolicyPrefix>,
    named_all: NamedPorts,
    named_by_identity: IdMap<NamedPorts>,
    /// Prepared DNS matchers by (endpoint, server identity, port, protocol), for the DNS
    /// proxy's per-query question. Emptied when policies or endpoints change; an identity
    /// coming or going drops only its own entries (prefix changes touch none).
    dns_cache: Mutex<HashMap<DnsKey, Arc<DnsMatcher>>>,
}

/// (endpoint, server identity, port, protocol number).
type DnsKey = (u16, NumericIdentity, u16, u8);

/// Bound on prepared DNS matchers (the cache starts over when it is reached).
const DNS_CACHE_MAX: usize = 4096;

fn host_net(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

fn world_default(p: &IpNet) -> Option<NumericIdentity> {
    if p.prefix_len() != 0 {
        return None;
    }
    Some(match p {
        IpNet::V4(_) => reserved::WORLD_IPV4,
        IpNet::V6(_) => reserved::WORLD_IPV6,
    })
}

/// The label set of the host identity: `reserved:host` and the host's own labels.
fn host_labels(labels: &LabelSet) -> LabelSet {
    let mut v = labels.labels().to_vec();
    v.push(Label::reserved("host"));
    LabelSet::new(v)
}

/// The label set of the identity of a policy prefix.
pub fn cidr_identity_labels(prefix: &IpNet) -> LabelSet {
    LabelSet::new(vec![
        Label::new(SOURCE_CIDR, &prefix.trunc().to_string(), ""),
        Label::reserved("world"),
    ])
}

fn is_wildcard_selector(s: &PeerSelector) -> bool {
    match s {
        PeerSelector::Endpoints(ls) => ls.is_wildcard(),
        PeerSelector::Entity(e) => *e == crate::model::Entity::All,
        PeerSelector::Cidr(_) => false,
    }
}

/// Compiles one peer rule, registering its selectors (each use pushed to `selectors`, each
/// CIDR prefix to `prefixes`). `reqs` (requirements, may be empty) are ANDed into its
/// endpoint selectors; a selector refined that way is no longer a wildcard.
fn compile_peer(
    sel: &mut SelectorCache,
    pr: &PeerRule,
    deny: bool,
    origin: Arc<RuleRef>,
    reqs: &[Requirement],
    selectors: &mut Vec<SelectorId>,
    prefixes: &mut Vec<IpNet>,
) -> Arc<CompiledPeerRule> {
    let refine = |s: &PeerSelector| -> PeerSelector {
        match s {
            PeerSelector::Endpoints(ls) if !reqs.is_empty() => {
                let mut r = ls.requirements.clone();
                r.extend(reqs.iter().cloned());
                r.sort();
                r.dedup();
                PeerSelector::Endpoints(LabelSelector { requirements: r })
            }
            other => other.clone(),
        }
    };
    let target = match &pr.peers {
        Peers::All => PeerTarget::Wildcard,
        Peers::Selectors(v) => {
            // The prefixes are named even when a wildcard makes the CIDR selectors moot here:
            // a requirement variant of the same rule may refine the wildcard away and then
            // needs the prefix identities in the ipcache.
            for s in v {
                if let PeerSelector::Cidr(c) = s {
                    prefixes.push(c.cidr);
                    prefixes.extend(c.except.iter().copied());
                }
            }
            let v: Vec<PeerSelector> = v.iter().map(refine).collect();
            if v.iter().any(is_wildcard_selector) {
                PeerTarget::Wildcard
            } else {
                let mut ids = Vec::with_capacity(v.len());
                for s in v {
                    let key = match s {
                        PeerSelector::Endpoints(ls) => Selector::Endpoints(ls),
                        PeerSelector::Entity(e) => Selector::Entity(e),
                        PeerSelector::Cidr(c) => Selector::Cidr(c),
                    };
                    let (id, _) = sel.add_selector(key);
                    selectors.push(id);
                    ids.push(id);
                }
                PeerTarget::Selectors(ids)
            }
        }
        Peers::Fqdns(v) => {
            let mut ids = Vec::with_capacity(v.len());
            for f in v {
                let (id, _) = sel.add_selector(Selector::Fqdn(f.clone()));
                selectors.push(id);
                ids.push(id);
            }
            PeerTarget::Selectors(ids)
        }
    };
    Arc::new(CompiledPeerRule {
        deny,
        origin,
        target,
        ports: compile_ports(pr),
    })
}

const L4_PROTOS: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

fn compile_ports(pr: &PeerRule) -> Vec<PortSpec> {
    let mut out = Vec::new();
    if pr.ports.is_empty() && pr.icmps.is_empty() {
        out.push(PortSpec {
            keys: PortKeys::Keys(vec![PortKey::ANY]),
            l7: None,
        });
        return out;
    }
    for port_rule in &pr.ports {
        let l7 = port_rule.l7.clone().map(Arc::new);
        if port_rule.ports.is_empty() {
            out.push(PortSpec {
                keys: PortKeys::Keys(vec![PortKey::ANY]),
                l7: l7.clone(),
            });
        }
        for pp in &port_rule.ports {
            let keys = match &pp.port {
                Port::Any => {
                    if pp.protocol == Protocol::Any {
                        PortKeys::Keys(vec![PortKey::ANY])
                    } else {
                        PortKeys::Keys(vec![PortKey::new(pp.protocol.number(), 0, 0)])
                    }
                }
                Port::Number(p) => {
                    let end = pp.end_port.unwrap_or(*p).max(*p);
                    let protos: Vec<Protocol> = if pp.protocol == Protocol::Any {
                        L4_PROTOS.to_vec()
                    } else {
                        vec![pp.protocol]
                    };
                    let ranges = port_range_keys(*p, end);
                    PortKeys::Keys(
                        protos
                            .iter()
                            .flat_map(|proto| {
                                ranges.iter().map(move |&(port, plen)| {
                                    PortKey::new(proto.number(), port, plen)
                                })
                            })
                            .collect(),
                    )
                }
                Port::Named(name) => PortKeys::Named {
                    name: name.clone(),
                    protocol: pp.protocol,
                },
            };
            out.push(PortSpec {
                keys,
                l7: l7.clone(),
            });
        }
    }
    if !pr.icmps.is_empty() {
        out.push(PortSpec {
            keys: PortKeys::Keys(
                pr.icmps
                    .iter()
                    .map(|f| {
                        let proto = match f.family {
                            IpFamily::V4 => Protocol::Icmp,
                            IpFamily::V6 => Protocol::Icmpv6,
                        };
                        PortKey::exact(proto.number(), u16::from(f.icmp_type))
                    })
                    .collect(),
            ),
            l7: None,
        });
    }
    out
}

fn proto_compatible(rule: Protocol, named: Protocol) -> bool {
    rule == named || (rule == Protocol::Any && L4_PROTOS.contains(&named))
}

impl Ctx<'_> {
    /// The keys a port spec stands for, for peer `identity` (0 = any) of endpoint `ep`.
    fn resolve(
        &self,
        spec: &PortSpec,
        dir: Direction,
        ep: &Endpoint,
        identity: NumericIdentity,
        out: &mut Vec<PortKey>,
    ) {
        match &spec.keys {
            PortKeys::Keys(k) => out.extend_from_slice(k),
            PortKeys::Named { name, protocol } => match dir {
                Direction::Ingress => {
                    if let Some(&(port, proto)) = ep.named_ports.get(name) {
                        if proto_compatible(*protocol, proto) {
                            out.push(PortKey::exact(proto.number(), port));
                        }
                    }
                }
                Direction::Egress => {
                    let table = if identity == 0 {
                        Some(self.named_all)
                    } else {
                        self.named_by_identity.get(&identity)
                    };
                    if let Some(set) = table.and_then(|t| t.get(name)) {
                        for &(port, proto) in set {
                            if proto_compatible(*protocol, proto) {
                                out.push(PortKey::exact(proto.number(), port));
                            }
                        }
                    }
                }
            },
        }
    }

    /// The compiled rules of `dp` that apply to peer `identity` selected by `sels`.
    fn contributions<'p>(
        dp: &'p DirPolicy,
        identity: NumericIdentity,
        sels: &'p [SelectorId],
    ) -> impl Iterator<Item = &'p Arc<CompiledPeerRule>> + 'p {
        let wild = if identity == 0 { &dp.wildcard[..] } else { &[] };
        wild.iter().chain(
            sels.iter()
                .filter(move |_| identity != 0)
                .filter_map(|s| dp.by_selector.get(s))
                .flatten(),
        )
    }

    /// The entries of peer `identity` (selected by `sels`) in one direction of one endpoint.
    fn identity_entries(
        &self,
        ep: &Endpoint,
        dp: &DirPolicy,
        dir: Direction,
        identity: NumericIdentity,
        sels: &[SelectorId],
    ) -> Vec<(PortKey, MapEntry)> {
        if identity == 0 {
            return dp.wildcard_summary.finished.clone();
        }
        let mut parts: Vec<&Summary> = Vec::with_capacity(sels.len());
        let mut named = false;
        for s in sels {
            if let Some(sum) = dp.summaries.get(s) {
                named |= sum.has_named_egress;
                parts.push(sum);
            }
        }
        match parts.len() {
            0 => return Vec::new(),
            1 if !named => return parts[0].finished.clone(),
            _ => {}
        }
        let mut b = EntryBuilder::new();
        for p in &parts {
            b.merge(p);
        }
        if named {
            let mut keys = Vec::new();
            for c in Ctx::contributions(dp, identity, sels) {
                for spec in &c.ports {
                    if !matches!(spec.keys, PortKeys::Named { .. }) {
                        continue;
                    }
                    keys.clear();
                    self.resolve(spec, dir, ep, identity, &mut keys);
                    let l7 = spec.l7.as_ref().map(|r| r.kind());
                    for k in &keys {
                        b.add(*k, c.deny, l7, &c.origin);
                    }
                }
            }
        }
        b.finish(self.proxy)
    }

    /// What a group of compiled rules says for one direction of `ep`. Egress named ports are
    /// left out (flagged) unless the group is the wildcard one, whose peers are all endpoints.
    fn summarize(
        &self,
        ep: &Endpoint,
        dir: Direction,
        contribs: &[Arc<CompiledPeerRule>],
        wildcard: bool,
        allow_all: bool,
    ) -> Summary {
        let mut b = EntryBuilder::new();
        let mut named = false;
        let mut keys = Vec::new();
        for c in contribs {
            for spec in &c.ports {
                if dir == Direction::Egress
                    && !wildcard
                    && matches!(spec.keys, PortKeys::Named { .. })
                {
                    named = true;
                    continue;
                }
                keys.clear();
                self.resolve(spec, dir, ep, 0, &mut keys);
                let l7 = spec.l7.as_ref().map(|r| r.kind());
                for k in &keys {
                    b.add(*k, c.deny, l7, &c.origin);
                }
            }
        }
        if allow_all {
            b.add_allow_all();
        }
        b.summarize(self.proxy, named)
    }

    /// A whole map.
    fn full_map(&self, ep: &Endpoint, pol: &PerDir<DirPolicy>) -> MapState {
        let mut ms = MapState::new();
        for dir in DIRS {
            let dp = pol.get(dir);
            let mut per_id: IdMap<Vec<SelectorId>> = IdMap::default();
            for &s in dp.by_selector.keys() {
                for &id in self.sel.selected(s) {
                    per_id.entry(id).or_default().push(s);
                }
            }
            // Identities selected by the same selectors get the same entries (unless egress
            // names ports, which resolve per identity): compute each such signature once.
            let shareable = !(dir == Direction::Egress && dp.named_egress);
            let mut by_signature: HashMap<Vec<SelectorId>, Vec<(PortKey, MapEntry)>> =
                HashMap::new();
            for (id, mut sels) in per_id {
                sels.sort_unstable();
                let e = if shareable {
                    match by_signature.get(&sels) {
                        Some(e) => e.clone(),
                        None => {
                            let e = self.identity_entries(ep, dp, dir, id, &sels);
                            by_signature.insert(sels, e.clone());
                            e
                        }
                    }
                } else {
                    self.identity_entries(ep, dp, dir, id, &sels)
                };
                if !e.is_empty() {
                    ms.set_identity(dir, id, e);
                }
            }
            let e = self.identity_entries(ep, dp, dir, 0, &[]);
            if !e.is_empty() {
                ms.set_identity(dir, 0, e);
            }
        }
        ms
    }
}

impl Engine {
    /// An engine with the identities of `identities` (restored numbering included), no
    /// endpoints and no policies. The ipcache starts with `0.0.0.0/0` → world-ipv4 and
    /// `::/0` → world-ipv6.
    pub fn new(identities: IdentityAllocator, proxy_ports: ProxyPorts) -> Self {
        let mut sel = SelectorCache::new();
        for ident in identities.iter() {
            sel.add_identity(ident.id, ident.labels.clone());
        }
        let mut ipcache = crate::ipcache::Ipcache::new();
        ipcache.upsert("0.0.0.0/0".parse().expect("net"), reserved::WORLD_IPV4);
        ipcache.upsert("::/0".parse().expect("net"), reserved::WORLD_IPV6);
        Engine {
            ids: identities,
            proxy_ports,
            sel,
            sources: BTreeMap::new(),
            rules: BTreeMap::new(),
            next_rule: 0,
            subject_index: LabelIndex::default(),
            node_rules: Vec::new(),
            endpoints: BTreeMap::new(),
            selector_users: IdMap::default(),
            ipcache,
            ep_prefixes: BTreeMap::new(),
            fqdn_prefixes: BTreeMap::new(),
            policy_prefixes: BTreeMap::new(),
            named_all: NamedPorts::new(),
            named_by_identity: IdMap::default(),
            dns_cache: Mutex::new(HashMap::new()),
        }
    }

    fn ctx(&self) -> Ctx<'_> {
        Ctx {
            sel: &self.sel,
            named_all: &self.named_all,
            named_by_identity: &self.named_by_identity,
            proxy: &self.proxy_ports,
        }
    }

    // ----- events -----

    /// Adds or replaces an endpoint (the host endpoint has `is_host` and identity 1).
    pub fn upsert_endpoint(&mut self, mut ep: Endpoint) -> Changes {
        let mut p = Pending::default();
        self.forget_dns(None);
        let mut old = self.endpoints.remove(&ep.id);
        match &mut old {
            Some(o) => {
                p.snapshot(ep.id, std::mem::take(&mut o.map));
                self.drop_users(ep.id, &o.policy);
            }
            None => p.snapshot(ep.id, MapState::new()),
        }

        let identity = if ep.is_host {
            ep.labels = host_labels(&ep.labels);
            let labels = ep.labels.clone();
            if self
                .ids
                .set_reserved_labels(reserved::HOST, labels.clone())
                .is_some()
            {
                self.identity_relabelled(reserved::HOST, labels, &mut p);
            }
            reserved::HOST
        } else {
            let (id, new) = self.ids.allocate(ep.labels.clone());
            if new {
                p.identities_added.push(id);
                self.identity_appeared(id, &mut p);
            }
            id
        };

        // ipcache: the endpoint's addresses carry its identity.
        let old_ips: Vec<IpAddr> = old.as_ref().map(|o| o.ep.ips.clone()).unwrap_or_default();
        for ip in &old_ips {
            if !ep.ips.contains(ip) {
                self.ep_prefixes.remove(&host_net(*ip));
                self.refresh_prefix(host_net(*ip), &mut p);
            }
        }
        for ip in &ep.ips {
            self.ep_prefixes.insert(host_net(*ip), identity);
            self.refresh_prefix(host_net(*ip), &mut p);
        }

        let named_changed = match &old {
            Some(o) => o.ep.named_ports != ep.named_ports || o.identity != identity,
            None => !ep.named_ports.is_empty(),
        };

        let id = ep.id;
        let rules = self.select_rules(&ep);
        self.prepare_requires(&rules);
        let policy = self.build_policy(&ep, Some(rules.clone()));
        let map = self.ctx().full_map(&ep, &policy);
        self.add_users(id, &policy);
        self.endpoints.insert(
            id,
            EpState {
                ep,
                identity,
                rules,
                policy,
                map,
            },
        );

        if named_changed {
            self.rebuild_named_ports();
            self.recompute_named_users(&mut p);
        }
        if let Some(o) = old {
            // The allocation above counted this endpoint once more; drop its previous count
            // (a no-op for the reserved host identity).
            self.release_identity_inner(o.identity, &mut p);
            if o.ep.is_host && !self.endpoints[&id].ep.is_host {
                self.reset_host_labels(&mut p);
            }
        }
        self.finish(p)
    }

    /// Removes an endpoint: its map goes (every key reported deleted), its addresses leave the
    /// ipcache, and its identity is released.
    pub fn remove_endpoint(&mut self, id: u16) -> Changes {
        let mut p = Pending::default();
        self.forget_dns(None);
        let Some(mut st) = self.endpoints.remove(&id) else {
            return Changes::default();
        };
        p.snapshot(id, std::mem::take(&mut st.map));
        self.drop_users(id, &st.policy);
        for ip in &st.ep.ips {
            self.ep_prefixes.remove(&host_net(*ip));
            self.refresh_prefix(host_net(*ip), &mut p);
        }
        if !st.ep.named_ports.is_empty() {
            self.rebuild_named_ports();
            self.recompute_named_users(&mut p);
        }
        if st.ep.is_host {
            self.reset_host_labels(&mut p);
        } else {
            self.release_identity_inner(st.identity, &mut p);
        }
        self.finish(p)
    }

    /// Replaces the policies of one source (a file path); an empty list removes the source.
    pub fn set_policies(&mut self, source: &str, policies: Vec<Policy>) -> Changes {
        self.set_policy_sources(vec![(source.to_string(), policies)])
    }

    /// Replaces the policies of several sources in one step: every affected endpoint is
    /// recomputed once.
    pub fn set_policy_sources(&mut self, updates: Vec<(String, Vec<Policy>)>) -> Changes {
        let mut p = Pending::default();
        self.forget_dns(None);
        let mut old_rules: Vec<RuleId> = Vec::new();
        let mut new_rules: Vec<RuleId> = Vec::new();
        for (source, policies) in updates {
            if let Some((_, ids)) = self.sources.remove(&source) {
                old_rules.extend(ids);
            }
            if policies.is_empty() {
                continue;
            }
            let mut pols = Vec::with_capacity(policies.len());
            let mut ids = Vec::new();
            for pol in policies {
                let pol = Arc::new(pol);
                for idx in 0..pol.rules.len() {
                    let rid = self.compile_rule(&pol, idx, &mut p);
                    ids.push(rid);
                }
                pols.push(pol);
            }
            new_rules.extend(&ids);
            self.sources.insert(source, (pols, ids));
        }

        // Endpoints selected by an old rule or a new one.
        let old_set: HashSet<RuleId> = old_rules.iter().copied().collect();
        let mut new_index: LabelIndex<RuleId> = LabelIndex::default();
        let mut new_nodes: Vec<RuleId> = Vec::new();
        for rid in &new_rules {
            match &self.rules[rid].subject {
                Subject::Endpoints(s) => new_index.insert(s, *rid),
                Subject::Nodes(_) => new_nodes.push(*rid),
            }
        }
        let mut affected: Vec<u16> = Vec::new();
        for (id, st) in &self.endpoints {
            let uses_old = !old_set.is_empty() && self.endpoint_uses_rules(st, &old_set);
            let uses_new = uses_old || {
                let mut hit = false;
                if st.ep.is_host {
                    hit = new_nodes.iter().any(|r| self.rule_selects(*r, &st.ep));
                } else {
                    new_index.for_candidates(&st.ep.labels, |r| {
                        hit = hit || self.rule_selects(r, &st.ep);
                    });
                }
                hit
            };
            if uses_old || uses_new {
                affected.push(*id);
            }
        }

        for rid in &old_rules {
            let r = &self.rules[rid];
            match &r.subject {
                Subject::Endpoints(s) => self.subject_index.remove(s, *rid),
                Subject::Nodes(_) => self.node_rules.retain(|x| x != rid),
            }
        }
        for id in affected {
            self.recompute_endpoint(id, &mut p);
        }
        for rid in old_rules {
            self.drop_rule(rid, &mut p);
        }
        self.finish(p)
    }

    /// The identity for a label set (e.g. an FQDN selector set: `fqdn:` labels and
    /// `reserved:world`), allocated if needed; one more user.
    pub fn upsert_identity(&mut self, labels: LabelSet) -> (NumericIdentity, Changes) {
        let mut p = Pending::default();
        let (id, new) = self.ids.allocate(labels);
        if new {
            self.forget_dns(Some(id));
            p.identities_added.push(id);
            self.identity_appeared(id, &mut p);
        }
        (id, self.finish(p))
    }

    /// Drops one user of an identity; when it was the last, its entries leave every map.
    pub fn release_identity(&mut self, id: NumericIdentity) -> Changes {
        let mut p = Pending::default();
        self.forget_dns(Some(id));
        self.release_identity_inner(id, &mut p);
        self.finish(p)
    }

    /// Maps a prefix (an FQDN-learned `/32` or `/128`) to an identity. Endpoint addresses keep
    /// their endpoint's identity; a learned prefix overrides a policy prefix.
    pub fn upsert_prefix(&mut self, prefix: IpNet, identity: NumericIdentity) -> Changes {
        let mut p = Pending::default();
        let prefix = prefix.trunc();
        self.fqdn_prefixes.insert(prefix, identity);
        self.refresh_prefix(prefix, &mut p);
        self.finish(p)
    }

    pub fn delete_prefix(&mut self, prefix: IpNet) -> Changes {
        let mut p = Pending::default();
        let prefix = prefix.trunc();
        if self.fqdn_prefixes.remove(&prefix).is_some() {
            self.refresh_prefix(prefix, &mut p);
        }
        self.finish(p)
    }

    /// Changes where the proxies listen: every redirect entry is rewritten.
    pub fn set_proxy_ports(&mut self, ports: ProxyPorts) -> Changes {
        let mut p = Pending::default();
        self.forget_dns(None);
        if ports != self.proxy_ports {
            self.proxy_ports = ports;
            let ids: Vec<u16> = self.endpoints.keys().copied().collect();
            for id in ids {
                self.recompute_endpoint(id, &mut p);
            }
        }
        self.finish(p)
    }

    // ----- read accessors -----

    pub fn map_state(&self, ep: u16) -> Option<&MapState> {
        self.endpoints.get(&ep).map(|s| &s.map)
    }

    pub fn ipcache(&self) -> &crate::ipcache::Ipcache {
        &self.ipcache
    }

    pub fn identities(&self) -> &IdentityAllocator {
        &self.ids
    }

    pub fn selector_cache(&self) -> &SelectorCache {
        &self.sel
    }

    pub fn proxy_ports(&self) -> ProxyPorts {
        self.proxy_ports
    }

    pub fn endpoints(&self) -> impl Iterator<Item = &Endpoint> {
        self.endpoints.values().map(|s| &s.ep)
    }

    /// The endpoint as the engine holds it (the host's labels include `reserved:host`).
    pub fn endpoint(&self, id: u16) -> Option<&Endpoint> {
        self.endpoints.get(&id).map(|s| &s.ep)
    }

    /// An endpoint by name, or by numeric id written in decimal.
    pub fn find_endpoint(&self, name_or_id: &str) -> Option<&Endpoint> {
        self.endpoints
            .values()
            .map(|s| &s.ep)
            .find(|e| e.name == name_or_id)
            .or_else(|| {
                name_or_id
                    .parse::<u16>()
                    .ok()
                    .and_then(|id| self.endpoint(id))
            })
    }

    /// The endpoint that owns an address.
    pub fn endpoint_by_ip(&self, ip: IpAddr) -> Option<&Endpoint> {
        self.endpoints
            .values()
            .map(|s| &s.ep)
            .find(|e| e.ips.contains(&ip))
    }

    /// The host endpoint, when configured.
    pub fn host_endpoint(&self) -> Option<&Endpoint> {
        self.endpoints.values().map(|s| &s.ep).find(|e| e.is_host)
    }

    pub fn endpoint_identity(&self, ep: u16) -> Option<NumericIdentity> {
        self.endpoints.get(&ep).map(|s| s.identity)
    }

    /// Whether each direction of an endpoint is in default deny.
    pub fn enforcement(&self, ep: u16) -> Option<PerDir<bool>> {
        self.endpoints.get(&ep).map(|s| PerDir {
            ingress: s.policy.ingress.enforced,
            egress: s.policy.egress.enforced,
        })
    }

    /// The rules that put a direction of an endpoint into default deny.
    pub fn enforcing_rules(&self, ep: u16, dir: Direction) -> &[Arc<RuleRef>] {
        self.endpoints
            .get(&ep)
            .map_or(&[], |s| s.policy.get(dir).enforcing.as_slice())
    }

    /// Every policy in force with its source, by source then file order.
    pub fn policies(&self) -> impl Iterator<Item = (&str, &Policy)> {
        self.sources
            .iter()
            .flat_map(|(s, (pols, _))| pols.iter().map(move |p| (s.as_str(), p.as_ref())))
    }

    /// The policy sources in force.
    pub fn sources(&self) -> impl Iterator<Item = &str> {
        self.sources.keys().map(|s| s.as_str())
    }

    /// Every `toFQDNs` selector in force (for the name manager).
    // The compiled regex inside a pattern has interior caches, but ordering and equality use
    // only the pattern text, so the set is sound.
    #[allow(clippy::mutable_key_type)]
    pub fn fqdn_selectors(&self) -> BTreeSet<FqdnSelector> {
        self.sel.fqdn_selectors().cloned().collect()
    }

    /// The `cidr:` labels an FQDN identity for `ip` carries so that CIDR rules still apply to
    /// the learned address: one per prefix named by a policy that contains `ip`, and always
    /// the `/0` of its family (so `world-ipv4`/`world-ipv6` and `0.0.0.0/0` / `::/0` select
    /// it). One identity per selector set then stands for addresses of one family and one set
    /// of containing policy prefixes.
    pub fn prefix_labels_for(&self, ip: IpAddr) -> Vec<Label> {
        let host = host_net(ip);
        crate::selector::supernets_of(&host)
            .filter(|n| n.prefix_len() == 0 || self.policy_prefixes.contains_key(n))
            .map(|n| Label::new(SOURCE_CIDR, &n.to_string(), ""))
            .collect()
    }

    /// The full label set of an FQDN identity: `fqdn:` per selector, `reserved:world`, and
    /// the policy prefixes containing `ip` ([`prefix_labels_for`](Self::prefix_labels_for)).
    pub fn fqdn_identity_labels(&self, selectors: &[FqdnSelector], ip: IpAddr) -> LabelSet {
        let mut v: Vec<Label> = selectors.iter().map(fqdn_label).collect();
        v.push(Label::new(SOURCE_RESERVED, "world", ""));
        v.extend(self.prefix_labels_for(ip));
        LabelSet::new(v)
    }

    /// The L7 rules the proxy applies to a redirected flow: endpoint `ep`, direction `dir`,
    /// peer `identity`, protocol number and destination port. `None` when the endpoint's map
    /// does not redirect that flow.
    pub fn l7_policy(
        &self,
        ep: u16,
        dir: Direction,
        identity: NumericIdentity,
        protocol: u8,
        port: u16,
    ) -> Option<L7Policy> {
        let st = self.endpoints.get(&ep)?;
        let l = st.map.lookup(identity, dir, protocol, port);
        let kind = match (l.verdict, l.entry) {
            (LookupVerdict::Allow, Some(e)) => e.l7?,
            _ => return None,
        };
        let sels = self.sel.selectors_of(identity);
        Some(self.gather_l7(
            &st.ep,
            st.policy.get(dir),
            dir,
            identity,
            sels,
            kind,
            protocol,
            port,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gather_l7(
        &self,
        ep: &Endpoint,
        dp: &DirPolicy,
        dir: Direction,
        identity: NumericIdentity,
        sels: &[SelectorId],
        kind: L7Kind,
        protocol: u8,
        port: u16,
    ) -> L7Policy {
        let ctx = self.ctx();
        let mut out = L7Policy {
            kind,
            allow_all: false,
            allow_all_rules: Vec::new(),
            rules: Vec::new(),
        };
        let mut keys = Vec::new();
        let ids: &[NumericIdentity] = if identity == 0 { &[0] } else { &[identity, 0] };
        for &id in ids {
            let s: &[SelectorId] = if id == 0 { &[] } else { sels };
            for c in Ctx::contributions(dp, id, s) {
                if c.deny {
                    continue;
                }
                for spec in &c.ports {
                    keys.clear();
                    ctx.resolve(spec, dir, ep, id, &mut keys);
                    if !keys.iter().any(|k| k.matches(protocol, port)) {
                        continue;
                    }
                    match &spec.l7 {
                        None => {
                            out.allow_all = true;
                            if !out
                                .allow_all_rules
                                .iter()
                                .any(|r| Arc::ptr_eq(r, &c.origin))
                            {
                                out.allow_all_rules.push(c.origin.clone());
                            }
                        }
                        Some(r) if r.kind() == kind => {
                            if !out
                                .rules
                                .iter()
                                .any(|(x, o)| Arc::ptr_eq(x, r) && Arc::ptr_eq(o, &c.origin))
                            {
                                out.rules.push((r.clone(), c.origin.clone()));
                            }
                        }
                        Some(_) => {}
                    }
                }
            }
        }
        out
    }

    /// The DNS proxy's question: may endpoint `ep` resolve names through a server of identity
    /// `server_identity` on `port`/`protocol`? See [`DnsVerdict`] for the exact semantics.
    /// `None` when `ep` is not an endpoint.
    pub fn dns_rules_for(
        &self,
        ep: u16,
        server_identity: NumericIdentity,
        port: u16,
        protocol: Protocol,
    ) -> Option<DnsVerdict> {
        let st = self.endpoints.get(&ep)?;
        let l = st
            .map
            .lookup(server_identity, Direction::Egress, protocol.number(), port);
        Some(match (l.verdict, l.entry) {
            (LookupVerdict::Deny, Some(e)) => DnsVerdict::Denied {
                rules: e.rules.to_vec(),
            },
            (LookupVerdict::Allow, Some(e)) if e.l7 == Some(L7Kind::Dns) => {
                let sels = self.sel.selectors_of(server_identity);
                let l7 = self.gather_l7(
                    &st.ep,
                    &st.policy.egress,
                    Direction::Egress,
                    server_identity,
                    sels,
                    L7Kind::Dns,
                    protocol.number(),
                    port,
                );
                DnsVerdict::Rules {
                    rules: l7.rules,
                    allow_all: l7.allow_all,
                }
            }
            (LookupVerdict::Allow, _) => DnsVerdict::Unrestricted,
            _ => DnsVerdict::Denied {
                rules: st.policy.egress.enforcing.clone(),
            },
        })
    }

    /// [`dns_rules_for`](Self::dns_rules_for) prepared for many queries (indexed names and
    /// patterns) and cached until the policy of the endpoint may have changed. This is what
    /// the DNS proxy should ask per query.
    pub fn dns_matcher(
        &self,
        ep: u16,
        server_identity: NumericIdentity,
        port: u16,
        protocol: Protocol,
    ) -> Option<Arc<DnsMatcher>> {
        let key = (ep, server_identity, port, protocol.number());
        let mut cache = self.dns_cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = cache.get(&key) {
            return Some(m.clone());
        }
        let m = Arc::new(DnsMatcher::new(self.dns_rules_for(
            ep,
            server_identity,
            port,
            protocol,
        )?));
        if cache.len() >= DNS_CACHE_MAX {
            cache.clear();
        }
        cache.insert(key, m.clone());
        Some(m)
    }

    /// Drops prepared DNS matchers: all, or those asking about one server identity.
    fn forget_dns(&mut self, identity: Option<NumericIdentity>) {
        let cache = self.dns_cache.get_mut().unwrap_or_else(|e| e.into_inner());
        match identity {
            None => cache.clear(),
            Some(id) => cache.retain(|k, _| k.1 != id),
        }
    }

    // ----- internals used by trace -----

    /// The policy of an endpoint that may not exist (a `labels:` peer in `policy trace`).
    pub(crate) fn policy_for(&self, ep: &Endpoint) -> PerDir<DirPolicy> {
        self.build_policy(ep, None)
    }

    pub(crate) fn stored_policy(&self, ep: u16) -> Option<&PerDir<DirPolicy>> {
        self.endpoints.get(&ep).map(|s| &s.policy)
    }

    /// The selectors selecting an identity: the cache's answer for a known identity, else
    /// computed from the facts.
    pub(crate) fn selectors_for(&self, facts: &IdentityFacts) -> Vec<SelectorId> {
        if self.sel.has_identity(facts.id) {
            self.sel.selectors_of(facts.id).to_vec()
        } else {
            self.sel.matching(facts)
        }
    }

    /// Entries of one identity computed on the spot (the stored map is not consulted).
    pub(crate) fn compute_entries(
        &self,
        ep: &Endpoint,
        dp: &DirPolicy,
        dir: Direction,
        identity: NumericIdentity,
        sels: &[SelectorId],
    ) -> Vec<(PortKey, MapEntry)> {
        self.ctx().identity_entries(ep, dp, dir, identity, sels)
    }

    // ----- internals -----

    fn rule_selects(&self, rid: RuleId, ep: &Endpoint) -> bool {
        match &self.rules[&rid].subject {
            Subject::Endpoints(s) => !ep.is_host && s.matches(&ep.labels),
            Subject::Nodes(s) => ep.is_host && s.matches(&ep.labels),
        }
    }

    fn endpoint_uses_rules(&self, st: &EpState, rules: &HashSet<RuleId>) -> bool {
        st.rules.iter().any(|r| rules.contains(r))
    }

    /// The rule ids selecting an endpoint, in id order.
    fn select_rules(&self, ep: &Endpoint) -> Vec<RuleId> {
        let mut out = Vec::new();
        if ep.is_host {
            out.extend(
                self.node_rules
                    .iter()
                    .copied()
                    .filter(|r| self.rule_selects(*r, ep)),
            );
        } else {
            self.subject_index.for_candidates(&ep.labels, |r| {
                if self.rule_selects(r, ep) {
                    out.push(r);
                }
            });
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The requirements of a set of rules (those selecting one endpoint).
    fn requires_of(&self, rules: &[RuleId]) -> ReqKey {
        let mut k = ReqKey::default();
        for rid in rules {
            let r = &self.rules[rid];
            for dir in DIRS {
                for (i, reqs) in r.requires.get(dir).iter().enumerate() {
                    k.get_mut(dir)[i].extend(reqs.iter().cloned());
                }
            }
        }
        for dir in DIRS {
            for v in k.get_mut(dir).iter_mut() {
                v.sort();
                v.dedup();
            }
        }
        k
    }

    /// The part of an endpoint's requirements that changes rule `r`'s peers.
    fn masked(r: &CompiledRule, reqs: &ReqKey) -> ReqKey {
        let mut k = ReqKey::default();
        for dir in DIRS {
            for i in 0..2 {
                if r.endpoint_peers.get(dir)[i] {
                    k.get_mut(dir)[i] = reqs.get(dir)[i].clone();
                }
            }
        }
        k
    }

    /// The peers of rule `rid` under requirements `reqs` (its plain peers when none apply).
    fn peers_under<'r>(
        &'r self,
        rid: RuleId,
        reqs: &ReqKey,
    ) -> &'r PerDir<Vec<Arc<CompiledPeerRule>>> {
        let r = &self.rules[&rid];
        if req_key_is_empty(reqs) {
            return &r.peers;
        }
        let key = Self::masked(r, reqs);
        if req_key_is_empty(&key) {
            return &r.peers;
        }
        // Variants are prepared before every stored policy is built; only a policy computed
        // for a hypothetical endpoint (`policy trace` with `labels:`) with a requirement set
        // no endpoint has can miss one, and then the rule's peers are used unrefined.
        r.variants.get(&key).unwrap_or(&r.peers)
    }

    /// Compiles the requirement variants the rules selecting an endpoint need.
    fn prepare_requires(&mut self, rules: &[RuleId]) {
        let reqs = self.requires_of(rules);
        if req_key_is_empty(&reqs) {
            return;
        }
        for rid in rules {
            let r = &self.rules[rid];
            let key = Self::masked(r, &reqs);
            if req_key_is_empty(&key) || r.variants.contains_key(&key) {
                continue;
            }
            let (pol, idx) = r.source.clone();
            let origins: PerDir<Vec<Arc<RuleRef>>> = PerDir {
                ingress: r.peers.ingress.iter().map(|c| c.origin.clone()).collect(),
                egress: r.peers.egress.iter().map(|c| c.origin.clone()).collect(),
            };
            let rule = &pol.rules[idx];
            let mut selectors = Vec::new();
            let mut unused_prefixes = Vec::new();
            let mut peers: PerDir<Vec<Arc<CompiledPeerRule>>> = PerDir::default();
            for dir in DIRS {
                let lists = [(false, rule.allow.get(dir)), (true, rule.deny.get(dir))];
                let mut origin = origins.get(dir).iter();
                for (deny, list) in lists {
                    let reqs = &key.get(dir)[usize::from(deny)];
                    for pr in list {
                        let o = origin
                            .next()
                            .expect("a compiled peer rule per model peer rule");
                        peers.get_mut(dir).push(compile_peer(
                            &mut self.sel,
                            pr,
                            deny,
                            o.clone(),
                            reqs,
                            &mut selectors,
                            &mut unused_prefixes,
                        ));
                    }
                }
            }
            let r = self.rules.get_mut(rid).expect("selected rule exists");
            r.selectors.extend(selectors);
            r.variants.insert(key, peers);
        }
    }

    fn build_policy(&self, ep: &Endpoint, rules: Option<Vec<RuleId>>) -> PerDir<DirPolicy> {
        let rules = rules.unwrap_or_else(|| self.select_rules(ep));
        let reqs = self.requires_of(&rules);
        let mut pol: PerDir<DirPolicy> = PerDir::default();
        for rid in rules {
            let r = &self.rules[&rid];
            let peers = self.peers_under(rid, &reqs);
            for dir in DIRS {
                let dp = pol.get_mut(dir);
                if *r.default_deny.get(dir) {
                    dp.enforced = true;
                    dp.enforcing.push(r.enforcing.clone());
                }
                for c in peers.get(dir) {
                    if dir == Direction::Egress
                        && c.ports
                            .iter()
                            .any(|s| matches!(s.keys, PortKeys::Named { .. }))
                    {
                        dp.named_egress = true;
                    }
                    match &c.target {
                        PeerTarget::Wildcard => dp.wildcard.push(c.clone()),
                        PeerTarget::Selectors(ids) => {
                            for s in ids {
                                dp.by_selector.entry(*s).or_default().push(c.clone());
                            }
                        }
                    }
                }
            }
        }
        let ctx = self.ctx();
        for dir in DIRS {
            let dp = pol.get_mut(dir);
            let summaries: IdMap<Arc<Summary>> = dp
                .by_selector
                .iter()
                .map(|(s, cs)| (*s, Arc::new(ctx.summarize(ep, dir, cs, false, false))))
                .collect();
            dp.summaries = summaries;
            dp.wildcard_summary =
                Arc::new(ctx.summarize(ep, dir, &dp.wildcard, true, !dp.enforced));
        }
        pol
    }

    fn add_users(&mut self, ep: u16, pol: &PerDir<DirPolicy>) {
        for dir in DIRS {
            for s in pol.get(dir).by_selector.keys() {
                self.selector_users.entry(*s).or_default().insert(ep);
            }
        }
    }

    fn drop_users(&mut self, ep: u16, pol: &PerDir<DirPolicy>) {
        for dir in DIRS {
            for s in pol.get(dir).by_selector.keys() {
                if let Some(u) = self.selector_users.get_mut(s) {
                    u.remove(&ep);
                    if u.is_empty() {
                        self.selector_users.remove(s);
                    }
                }
            }
        }
    }

    /// Rebuilds an endpoint's policy and map from scratch and records the difference.
    fn recompute_endpoint(&mut self, id: u16, p: &mut Pending) {
        let Some(mut st) = self.endpoints.remove(&id) else {
            return;
        };
        self.drop_users(id, &st.policy);
        st.rules = self.select_rules(&st.ep);
        self.prepare_requires(&st.rules);
        let policy = self.build_policy(&st.ep, Some(st.rules.clone()));
        let map = self.ctx().full_map(&st.ep, &policy);
        p.snapshot(id, std::mem::replace(&mut st.map, map));
        self.add_users(id, &policy);
        st.policy = policy;
        self.endpoints.insert(id, st);
    }

    /// Recomputes the entries of one identity in one endpoint (both directions).
    fn recompute_identity(&mut self, ep: u16, identity: NumericIdentity, p: &mut Pending) {
        let Some(mut st) = self.endpoints.remove(&ep) else {
            return;
        };
        for dir in DIRS {
            let entries = {
                let sels = self.sel.selectors_of(identity);
                self.ctx()
                    .identity_entries(&st.ep, st.policy.get(dir), dir, identity, sels)
            };
            let old = st.map.set_identity(dir, identity, entries);
            p.record_group(
                ep,
                dir,
                identity,
                &old,
                st.map.identity_entries(dir, identity),
            );
        }
        self.endpoints.insert(ep, st);
    }

    fn users_of(&self, sels: &[SelectorId]) -> BTreeSet<u16> {
        let mut out = BTreeSet::new();
        for s in sels {
            if let Some(u) = self.selector_users.get(s) {
                out.extend(u.iter().copied());
            }
        }
        out
    }

    /// A new identity: the selectors that select it gain it; the endpoints using them get its
    /// entries.
    fn identity_appeared(&mut self, id: NumericIdentity, p: &mut Pending) {
        let labels = match self.ids.get(id) {
            Some(i) => i.labels.clone(),
            None => return,
        };
        let gained = self.sel.add_identity(id, labels);
        for ep in self.users_of(&gained) {
            self.recompute_identity(ep, id, p);
        }
    }

    /// An identity whose labels changed (the host's): re-selected, entries recomputed in the
    /// endpoints of the old and the new selectors.
    fn identity_relabelled(&mut self, id: NumericIdentity, labels: LabelSet, p: &mut Pending) {
        let mut sels = self.sel.selectors_of(id).to_vec();
        sels.extend(self.sel.add_identity(id, labels));
        for ep in self.users_of(&sels) {
            self.recompute_identity(ep, id, p);
        }
    }

    /// The host identity without a host endpoint: `reserved:host` only.
    fn reset_host_labels(&mut self, p: &mut Pending) {
        let labels = crate::identity::reserved_labels(reserved::HOST).expect("host");
        if self
            .ids
            .set_reserved_labels(reserved::HOST, labels.clone())
            .is_some()
        {
            self.identity_relabelled(reserved::HOST, labels, p);
        }
    }

    fn release_identity_inner(&mut self, id: NumericIdentity, p: &mut Pending) {
        if !self.ids.release(id) {
            return;
        }
        p.identities_removed.push(id);
        let lost = self.sel.remove_identity(id);
        for ep in self.users_of(&lost) {
            self.recompute_identity(ep, id, p);
        }
    }

    fn refresh_prefix(&mut self, prefix: IpNet, p: &mut Pending) {
        let want = self
            .ep_prefixes
            .get(&prefix)
            .or_else(|| self.fqdn_prefixes.get(&prefix))
            .copied()
            .or_else(|| self.policy_prefixes.get(&prefix).and_then(|x| x.identity))
            .or_else(|| world_default(&prefix));
        let have = self.ipcache.get(&prefix);
        if want == have {
            return;
        }
        p.ipcache.entry(prefix).or_insert(have);
        match want {
            Some(id) => {
                self.ipcache.upsert(prefix, id);
            }
            None => {
                self.ipcache.remove(&prefix);
            }
        }
    }

    fn add_policy_prefix(&mut self, prefix: IpNet, p: &mut Pending) {
        let prefix = prefix.trunc();
        if let Some(pp) = self.policy_prefixes.get_mut(&prefix) {
            pp.refs += 1;
            return;
        }
        p.prefixes_changed = true;
        let identity = if prefix.prefix_len() == 0 {
            None
        } else {
            let (id, new) = self.ids.allocate(cidr_identity_labels(&prefix));
            if new {
                p.identities_added.push(id);
                self.identity_appeared(id, p);
            }
            Some(id)
        };
        self.policy_prefixes
            .insert(prefix, PolicyPrefix { refs: 1, identity });
        self.refresh_prefix(prefix, p);
    }

    fn drop_policy_prefix(&mut self, prefix: IpNet, p: &mut Pending) {
        let prefix = prefix.trunc();
        let Some(pp) = self.policy_prefixes.get_mut(&prefix) else {
            return;
        };
        pp.refs -= 1;
        if pp.refs > 0 {
            return;
        }
        p.prefixes_changed = true;
        let pp = self.policy_prefixes.remove(&prefix).expect("present");
        // The address leaves the ipcache before the identity leaves the maps.
        self.refresh_prefix(prefix, p);
        if let Some(id) = pp.identity {
            self.release_identity_inner(id, p);
        }
    }

    fn compile_rule(&mut self, pol: &Arc<Policy>, idx: usize, p: &mut Pending) -> RuleId {
        let rule = &pol.rules[idx];
        let name: Arc<str> = pol.display_name().into();
        let mk_ref = |span| {
            Arc::new(RuleRef {
                policy: name.clone(),
                kind: pol.kind,
                file: pol.file.clone(),
                span,
            })
        };
        let mut selectors = Vec::new();
        let mut prefixes = Vec::new();
        let mut peers: PerDir<Vec<Arc<CompiledPeerRule>>> = PerDir::default();
        let mut requires = ReqKey::default();
        let mut endpoint_peers: PerDir<[bool; 2]> = PerDir::default();
        for dir in DIRS {
            let own = rule.requires.get(dir);
            for (i, sels) in [&own.allow, &own.deny].into_iter().enumerate() {
                requires.get_mut(dir)[i] = sels
                    .iter()
                    .flat_map(|s| s.requirements.iter().cloned())
                    .collect();
            }
            for (deny, list) in [(false, rule.allow.get(dir)), (true, rule.deny.get(dir))] {
                for pr in list {
                    if let Peers::Selectors(v) = &pr.peers {
                        if v.iter().any(|s| matches!(s, PeerSelector::Endpoints(_))) {
                            endpoint_peers.get_mut(dir)[usize::from(deny)] = true;
                        }
                    }
                    peers.get_mut(dir).push(compile_peer(
                        &mut self.sel,
                        pr,
                        deny,
                        mk_ref(pr.span),
                        &[],
                        &mut selectors,
                        &mut prefixes,
                    ));
                }
            }
        }
        for prefix in &prefixes {
            self.add_policy_prefix(*prefix, p);
        }
        let rid = self.next_rule;
        self.next_rule += 1;
        match &rule.subject {
            Subject::Endpoints(s) => self.subject_index.insert(s, rid),
            Subject::Nodes(_) => self.node_rules.push(rid),
        }
        self.rules.insert(
            rid,
            CompiledRule {
                subject: rule.subject.clone(),
                default_deny: rule.default_deny,
                enforcing: mk_ref(rule.span),
                peers,
                source: (pol.clone(), idx),
                requires,
                endpoint_peers,
                variants: HashMap::new(),
                selectors,
                prefixes,
            },
        );
        rid
    }

    /// Releases what a removed rule held (after the endpoints stopped using it).
    fn drop_rule(&mut self, rid: RuleId, p: &mut Pending) {
        let Some(r) = self.rules.remove(&rid) else {
            return;
        };
        for s in r.selectors {
            if self.sel.release_selector(s) {
                self.selector_users.remove(&s);
            }
        }
        for prefix in r.prefixes {
            self.drop_policy_prefix(prefix, p);
        }
    }

    fn rebuild_named_ports(&mut self) {
        self.named_all.clear();
        self.named_by_identity.clear();
        for st in self.endpoints.values() {
            for (name, &(port, proto)) in &st.ep.named_ports {
                self.named_all
                    .entry(name.clone())
                    .or_default()
                    .insert((port, proto));
                self.named_by_identity
                    .entry(st.identity)
                    .or_default()
                    .entry(name.clone())
                    .or_default()
                    .insert((port, proto));
            }
        }
    }

    /// Endpoints whose egress rules name ports depend on every endpoint's named ports.
    fn recompute_named_users(&mut self, p: &mut Pending) {
        let users: Vec<u16> = self
            .endpoints
            .iter()
            .filter(|(_, s)| s.policy.egress.named_egress)
            .map(|(id, _)| *id)
            .collect();
        for id in users {
            self.recompute_endpoint(id, p);
        }
    }

    fn finish(&mut self, p: Pending) -> Changes {
        let mut c = Changes {
            identities_added: p.identities_added,
            identities_removed: p.identities_removed,
            prefixes_changed: p.prefixes_changed,
            ..Default::default()
        };
        let empty = MapState::new();
        let mut diffs: BTreeMap<u16, MapDiff> = BTreeMap::new();
        for (ep, old) in p.snapshots {
            let cur = self.endpoints.get(&ep).map_or(&empty, |s| &s.map);
            let d = old.diff(cur);
            if !d.is_empty() {
                diffs.insert(ep, d);
            }
        }
        for (ep, keys) in p.maps {
            let cur = self.endpoints.get(&ep).map(|s| &s.map);
            let mut d = MapDiff::default();
            for (k, orig) in keys {
                let now = cur.and_then(|m| m.get(&k));
                if now == orig.as_ref() {
                    continue;
                }
                match now {
                    Some(e) => d.adds.push((k, e.clone())),
                    None => d.deletes.push(k),
                }
            }
            if !d.is_empty() {
                diffs.insert(ep, d);
            }
        }
        c.maps = diffs.into_iter().collect();
        for (prefix, orig) in p.ipcache {
            let now = self.ipcache.get(&prefix);
            if now == orig {
                continue;
            }
            match now {
                Some(id) => c.ipcache_upserts.push((prefix, id)),
                None => c.ipcache_deletes.push(prefix),
            }
        }
        c
    }
}

mod dns;
pub use dns::DnsMatcher;

#[cfg(test)]
pub(crate) mod tests;
