//! Selector cache: which identities each peer selector selects, kept up to date incrementally.
//!
//! Every distinct peer selector of the policies in force (endpoint label selector, entity,
//! CIDR with except, FQDN selector) is interned once, reference counted, and knows the set of
//! identities it selects. When an identity appears or goes, the cache reports which selectors
//! gained or lost it, and the engine touches only the entries of that identity in the endpoints
//! using those selectors (Cilium's `selectorcache.go` plays the same part).
//!
//! Both directions of the match are indexed, so that neither a new identity nor a new selector
//! is compared against everything: label selectors by one `key=value` they require, CIDR
//! selectors by prefix (a CIDR identity is found by walking its prefix lengths), FQDN selectors
//! by their label; identities by their labels and their prefixes.
//!
//! How an identity is matched:
//! - endpoint selectors: by its labels (any identity, reserved ones included);
//! - entities: `world` = labels `reserved:world|world-ipv4|world-ipv6`; `world-ipv4`/`-ipv6` =
//!   identity 9/10, or a world identity with a prefix of that family; `cluster` = endpoint
//!   identities plus host, remote-node, init, health, unmanaged, kube-apiserver, ingress;
//!   the others = their `reserved:` label;
//! - CIDR selectors: by the identity's `cidr:` labels (a prefix each), identity 9 standing for
//!   `0.0.0.0/0`, 10 for `::/0`, 2 for both: selected when some prefix lies inside the CIDR and
//!   none inside an `except`. Endpoint identities carry no `cidr:` label, so CIDR selectors
//!   never select in-cluster identities;
//! - FQDN selectors: by the identity's `fqdn:<selector>` label.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::identity::{reserved, IdentityScope, NumericIdentity};
use crate::labels::{
    Label, LabelSelector, LabelSet, Operator, CLUSTER_LABEL, NAMESPACE_LABEL, SOURCE_CIDR,
    SOURCE_FQDN, SOURCE_K8S, SOURCE_RESERVED,
};
use crate::mapstate::IdMap;
use crate::model::{CidrSelector, Entity, FqdnSelector};

pub type SelectorId = u32;

/// One distinct peer selector.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Selector {
    Endpoints(LabelSelector),
    Entity(Entity),
    Cidr(CidrSelector),
    Fqdn(FqdnSelector),
}

/// What selection looks at for one identity.
#[derive(Debug, Clone)]
pub struct IdentityFacts {
    pub id: NumericIdentity,
    pub labels: LabelSet,
    /// The prefixes the identity stands for (its `cidr:` labels; `/0` for the world identities).
    pub nets: Vec<IpNet>,
}

impl IdentityFacts {
    pub fn new(id: NumericIdentity, labels: LabelSet) -> IdentityFacts {
        let mut nets: Vec<IpNet> = labels
            .labels()
            .iter()
            .filter(|l| l.source == SOURCE_CIDR)
            .filter_map(|l| l.key.parse::<IpNet>().ok().map(|n| n.trunc()))
            .collect();
        let v4_all = IpNet::V4(Ipv4Net::new(Ipv4Addr::UNSPECIFIED, 0).expect("/0"));
        let v6_all = IpNet::V6(Ipv6Net::new(Ipv6Addr::UNSPECIFIED, 0).expect("/0"));
        match id {
            reserved::WORLD => nets.extend([v4_all, v6_all]),
            reserved::WORLD_IPV4 => nets.push(v4_all),
            reserved::WORLD_IPV6 => nets.push(v6_all),
            _ => {}
        }
        nets.sort();
        nets.dedup();
        IdentityFacts { id, labels, nets }
    }

    fn has_reserved(&self, key: &str) -> bool {
        self.labels
            .labels()
            .iter()
            .any(|l| l.source == SOURCE_RESERVED && l.key == key)
    }

    fn is_world(&self) -> bool {
        self.has_reserved("world")
            || self.has_reserved("world-ipv4")
            || self.has_reserved("world-ipv6")
    }
}

const IN_CLUSTER_RESERVED: [&str; 7] = [
    "host",
    "remote-node",
    "init",
    "health",
    "unmanaged",
    "kube-apiserver",
    "ingress",
];

/// Whether an entity selects an identity.
pub fn entity_selects(e: Entity, f: &IdentityFacts) -> bool {
    match e {
        Entity::All => true,
        Entity::World => f.is_world(),
        Entity::WorldIpv4 => {
            f.id == reserved::WORLD_IPV4
                || f.has_reserved("world-ipv4")
                || (f.is_world()
                    && f.id != reserved::WORLD
                    && f.nets.iter().any(|n| matches!(n, IpNet::V4(_))))
        }
        Entity::WorldIpv6 => {
            f.id == reserved::WORLD_IPV6
                || f.has_reserved("world-ipv6")
                || (f.is_world()
                    && f.id != reserved::WORLD
                    && f.nets.iter().any(|n| matches!(n, IpNet::V6(_))))
        }
        Entity::Cluster => {
            IdentityScope::of(f.id) == IdentityScope::Cluster
                || IN_CLUSTER_RESERVED.iter().any(|k| f.has_reserved(k))
                || f.labels
                    .labels()
                    .iter()
                    .any(|l| l.source == SOURCE_K8S && l.key == CLUSTER_LABEL)
        }
        Entity::Host => f.has_reserved("host"),
        Entity::RemoteNode => f.has_reserved("remote-node"),
        Entity::KubeApiserver => f.has_reserved("kube-apiserver"),
        Entity::Ingress => f.has_reserved("ingress"),
        Entity::Init => f.has_reserved("init"),
        Entity::Health => f.has_reserved("health"),
        Entity::Unmanaged => f.has_reserved("unmanaged"),
    }
}

/// Whether a CIDR selector selects an identity (see the module documentation).
pub fn cidr_selects(c: &CidrSelector, f: &IdentityFacts) -> bool {
    f.nets.iter().any(|n| c.cidr.contains(n))
        && !f
            .nets
            .iter()
            .any(|n| c.except.iter().any(|e| e.contains(n)))
}

/// The label an FQDN selector selects identities by (`fqdn:<name or pattern>`).
pub fn fqdn_label(f: &FqdnSelector) -> Label {
    Label::new(SOURCE_FQDN, &f.label_value(), "")
}

/// Whether `sel` selects the identity described by `f`.
pub fn selects(sel: &Selector, f: &IdentityFacts) -> bool {
    match sel {
        Selector::Endpoints(ls) => ls.matches(&f.labels),
        Selector::Entity(e) => entity_selects(*e, f),
        Selector::Cidr(c) => cidr_selects(c, f),
        Selector::Fqdn(q) => {
            let key = q.label_value();
            f.labels
                .labels()
                .iter()
                .any(|l| l.source == SOURCE_FQDN && l.key == key)
        }
    }
}

/// The `key=value` pair a selector needs that narrows candidates best: an `In` requirement,
/// preferring any key over the namespace (most selectors of a namespace share that one).
fn anchor_of(sel: &LabelSelector) -> Option<(&str, &[String])> {
    let mut best: Option<(&str, &[String])> = None;
    for r in &sel.requirements {
        if let Operator::In(values) = &r.op {
            if values.is_empty() {
                continue;
            }
            let better = match best {
                None => true,
                Some((k, vs)) => {
                    (k == NAMESPACE_LABEL && r.key.key != NAMESPACE_LABEL)
                        || ((k == NAMESPACE_LABEL) == (r.key.key == NAMESPACE_LABEL)
                            && values.len() < vs.len())
                }
            };
            if better {
                best = Some((r.key.key.as_str(), values.as_slice()));
            }
        }
    }
    best
}

/// Label selectors indexed by one `key=value` each requires, so that the selectors that may
/// match a label set are found without scanning them all. Selectors without an `In`
/// requirement are always candidates.
#[derive(Debug, Clone)]
pub(crate) struct LabelIndex<T> {
    anchored: HashMap<(String, String), Vec<T>>,
    unanchored: Vec<T>,
}

impl<T> Default for LabelIndex<T> {
    fn default() -> Self {
        LabelIndex {
            anchored: HashMap::new(),
            unanchored: Vec::new(),
        }
    }
}

impl<T: Copy + PartialEq> LabelIndex<T> {
    pub(crate) fn insert(&mut self, sel: &LabelSelector, t: T) {
        match anchor_of(sel) {
            Some((k, vs)) => {
                for v in vs {
                    self.anchored
                        .entry((k.to_string(), v.clone()))
                        .or_default()
                        .push(t);
                }
            }
            None => self.unanchored.push(t),
        }
    }

    pub(crate) fn remove(&mut self, sel: &LabelSelector, t: T) {
        match anchor_of(sel) {
            Some((k, vs)) => {
                for v in vs {
                    let key = (k.to_string(), v.clone());
                    if let Some(list) = self.anchored.get_mut(&key) {
                        if let Some(i) = list.iter().position(|x| *x == t) {
                            list.swap_remove(i);
                        }
                        if list.is_empty() {
                            self.anchored.remove(&key);
                        }
                    }
                }
            }
            None => {
                if let Some(i) = self.unanchored.iter().position(|x| *x == t) {
                    self.unanchored.swap_remove(i);
                }
            }
        }
    }

    /// Calls `f` for every entry that may match `labels` (a superset; possibly twice).
    pub(crate) fn for_candidates(&self, labels: &LabelSet, mut f: impl FnMut(T)) {
        for t in &self.unanchored {
            f(*t);
        }
        if self.anchored.is_empty() {
            return;
        }
        let mut key = (String::new(), String::new());
        for l in labels.labels() {
            key.0.clear();
            key.0.push_str(&l.key);
            key.1.clear();
            key.1.push_str(&l.value);
            if let Some(list) = self.anchored.get(&key) {
                for t in list {
                    f(*t);
                }
            }
        }
    }
}

#[derive(Debug, Clone)]
struct Slot {
    selector: Selector,
    refs: u32,
    selected: BTreeSet<NumericIdentity>,
}

/// The selector cache.
#[derive(Debug, Clone, Default)]
pub struct SelectorCache {
    slots: Vec<Option<Slot>>,
    free: Vec<SelectorId>,
    by_key: HashMap<Selector, SelectorId>,
    label_sels: LabelIndex<SelectorId>,
    entity_sels: Vec<SelectorId>,
    cidr_sels: HashMap<IpNet, Vec<SelectorId>>,
    fqdn_sels: HashMap<String, Vec<SelectorId>>,
    identities: IdMap<IdentityFacts>,
    /// Identity → the selectors selecting it, sorted.
    selecting: IdMap<Vec<SelectorId>>,
    ident_by_kv: HashMap<(String, String), HashSet<NumericIdentity>>,
    ident_by_key: HashMap<String, HashSet<NumericIdentity>>,
    ident_nets: BTreeMap<IpNet, HashSet<NumericIdentity>>,
}

fn range_of(c: &IpNet) -> (IpNet, IpNet) {
    match c {
        IpNet::V4(n) => (
            IpNet::V4(Ipv4Net::new(n.network(), 0).expect("/0")),
            IpNet::V4(Ipv4Net::new(n.broadcast(), 32).expect("/32")),
        ),
        IpNet::V6(n) => (
            IpNet::V6(Ipv6Net::new(n.network(), 0).expect("/0")),
            IpNet::V6(Ipv6Net::new(n.broadcast(), 128).expect("/128")),
        ),
    }
}

/// Every prefix containing `n` (itself included), from `/0` up.
pub(crate) fn supernets_of(n: &IpNet) -> impl Iterator<Item = IpNet> + '_ {
    (0..=n.prefix_len()).map(move |len| match n {
        IpNet::V4(v) => IpNet::V4(Ipv4Net::new(v.network(), len).expect("len").trunc()),
        IpNet::V6(v) => IpNet::V6(Ipv6Net::new(v.network(), len).expect("len").trunc()),
    })
}

impl SelectorCache {
    pub fn new() -> Self {
        Self::default()
    }

    fn slot(&self, id: SelectorId) -> &Slot {
        self.slots[id as usize].as_ref().expect("live selector")
    }

    /// Interns a selector (one more user). Returns its id and whether it is new; a new
    /// selector's selection is computed from the identities known now.
    pub fn add_selector(&mut self, sel: Selector) -> (SelectorId, bool) {
        if let Some(&id) = self.by_key.get(&sel) {
            let slot = self.slots[id as usize].as_mut().expect("live selector");
            slot.refs += 1;
            return (id, false);
        }
        let selected = self.initial_selection(&sel);
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                self.slots.push(None);
                (self.slots.len() - 1) as SelectorId
            }
        };
        for &ident in &selected {
            let list = self.selecting.entry(ident).or_default();
            if let Err(i) = list.binary_search(&id) {
                list.insert(i, id);
            }
        }
        match &sel {
            Selector::Endpoints(ls) => self.label_sels.insert(ls, id),
            Selector::Entity(_) => self.entity_sels.push(id),
            Selector::Cidr(c) => self.cidr_sels.entry(c.cidr.trunc()).or_default().push(id),
            Selector::Fqdn(f) => self.fqdn_sels.entry(f.label_value()).or_default().push(id),
        }
        self.by_key.insert(sel.clone(), id);
        self.slots[id as usize] = Some(Slot {
            selector: sel,
            refs: 1,
            selected,
        });
        (id, true)
    }

    fn initial_selection(&self, sel: &Selector) -> BTreeSet<NumericIdentity> {
        let mut out = BTreeSet::new();
        let mut check = |id: NumericIdentity| {
            if let Some(f) = self.identities.get(&id) {
                if selects(sel, f) {
                    out.insert(id);
                }
            }
        };
        match sel {
            Selector::Endpoints(ls) => {
                if let Some((k, vs)) = anchor_of(ls) {
                    for v in vs {
                        if let Some(ids) = self.ident_by_kv.get(&(k.to_string(), v.clone())) {
                            ids.iter().for_each(|&i| check(i));
                        }
                    }
                } else if let Some(r) = ls
                    .requirements
                    .iter()
                    .find(|r| matches!(r.op, Operator::Exists))
                {
                    if let Some(ids) = self.ident_by_key.get(&r.key.key) {
                        ids.iter().for_each(|&i| check(i));
                    }
                } else {
                    self.identities.keys().for_each(|&i| check(i));
                }
            }
            Selector::Entity(_) => self.identities.keys().for_each(|&i| check(i)),
            Selector::Cidr(c) => {
                let (lo, hi) = range_of(&c.cidr);
                for (_, ids) in self.ident_nets.range(lo..=hi) {
                    ids.iter().for_each(|&i| check(i));
                }
            }
            Selector::Fqdn(f) => {
                if let Some(ids) = self.ident_by_kv.get(&(f.label_value(), String::new())) {
                    ids.iter().for_each(|&i| check(i));
                }
            }
        }
        out
    }

    /// Drops one user of a selector. Returns true when it is gone.
    pub fn release_selector(&mut self, id: SelectorId) -> bool {
        let Some(slot) = self.slots.get_mut(id as usize).and_then(|s| s.as_mut()) else {
            return false;
        };
        slot.refs -= 1;
        if slot.refs > 0 {
            return false;
        }
        let slot = self.slots[id as usize].take().expect("live selector");
        for ident in &slot.selected {
            if let Some(list) = self.selecting.get_mut(ident) {
                if let Ok(i) = list.binary_search(&id) {
                    list.remove(i);
                }
            }
        }
        match &slot.selector {
            Selector::Endpoints(ls) => self.label_sels.remove(ls, id),
            Selector::Entity(_) => self.entity_sels.retain(|x| *x != id),
            Selector::Cidr(c) => {
                let k = c.cidr.trunc();
                if let Some(v) = self.cidr_sels.get_mut(&k) {
                    v.retain(|x| *x != id);
                    if v.is_empty() {
                        self.cidr_sels.remove(&k);
                    }
                }
            }
            Selector::Fqdn(f) => {
                let k = f.label_value();
                if let Some(v) = self.fqdn_sels.get_mut(&k) {
                    v.retain(|x| *x != id);
                    if v.is_empty() {
                        self.fqdn_sels.remove(&k);
                    }
                }
            }
        }
        self.by_key.remove(&slot.selector);
        self.free.push(id);
        true
    }

    /// The selectors (sorted) that select an identity with these facts, whether or not the
    /// identity is known to the cache.
    pub fn matching(&self, f: &IdentityFacts) -> Vec<SelectorId> {
        let mut found = Vec::new();
        let mut check = |s: SelectorId| {
            if selects(&self.slot(s).selector, f) {
                found.push(s);
            }
        };
        self.label_sels.for_candidates(&f.labels, &mut check);
        self.entity_sels.iter().for_each(|&s| check(s));
        for n in &f.nets {
            for sup in supernets_of(n) {
                if let Some(list) = self.cidr_sels.get(&sup) {
                    list.iter().for_each(|&s| check(s));
                }
            }
        }
        for l in f.labels.labels() {
            if l.source == SOURCE_FQDN {
                if let Some(list) = self.fqdn_sels.get(&l.key) {
                    list.iter().for_each(|&s| check(s));
                }
            }
        }
        found.sort_unstable();
        found.dedup();
        found
    }

    /// Adds an identity. Returns the selectors that now select it (sorted).
    /// An identity already known is replaced (its labels may have changed).
    pub fn add_identity(&mut self, id: NumericIdentity, labels: LabelSet) -> Vec<SelectorId> {
        if self.identities.contains_key(&id) {
            self.remove_identity(id);
        }
        let facts = IdentityFacts::new(id, labels);
        let found = self.matching(&facts);
        for &s in &found {
            self.slots[s as usize]
                .as_mut()
                .expect("live selector")
                .selected
                .insert(id);
        }
        for l in facts.labels.labels() {
            self.ident_by_kv
                .entry((l.key.clone(), l.value.clone()))
                .or_default()
                .insert(id);
            self.ident_by_key
                .entry(l.key.clone())
                .or_default()
                .insert(id);
        }
        for n in &facts.nets {
            self.ident_nets.entry(*n).or_default().insert(id);
        }
        self.selecting.insert(id, found.clone());
        self.identities.insert(id, facts);
        found
    }

    /// Removes an identity. Returns the selectors that selected it (sorted).
    pub fn remove_identity(&mut self, id: NumericIdentity) -> Vec<SelectorId> {
        let Some(facts) = self.identities.remove(&id) else {
            return Vec::new();
        };
        let found = self.selecting.remove(&id).unwrap_or_default();
        for &s in &found {
            if let Some(slot) = self.slots[s as usize].as_mut() {
                slot.selected.remove(&id);
            }
        }
        for l in facts.labels.labels() {
            let k = (l.key.clone(), l.value.clone());
            if let Some(set) = self.ident_by_kv.get_mut(&k) {
                set.remove(&id);
                if set.is_empty() {
                    self.ident_by_kv.remove(&k);
                }
            }
            if let Some(set) = self.ident_by_key.get_mut(&l.key) {
                set.remove(&id);
                if set.is_empty() {
                    self.ident_by_key.remove(&l.key);
                }
            }
        }
        for n in &facts.nets {
            if let Some(set) = self.ident_nets.get_mut(n) {
                set.remove(&id);
                if set.is_empty() {
                    self.ident_nets.remove(n);
                }
            }
        }
        found
    }

    pub fn has_identity(&self, id: NumericIdentity) -> bool {
        self.identities.contains_key(&id)
    }

    pub fn identity_facts(&self, id: NumericIdentity) -> Option<&IdentityFacts> {
        self.identities.get(&id)
    }

    /// The identities a selector selects.
    pub fn selected(&self, id: SelectorId) -> &BTreeSet<NumericIdentity> {
        &self.slot(id).selected
    }

    pub fn selector(&self, id: SelectorId) -> &Selector {
        &self.slot(id).selector
    }

    pub fn lookup(&self, sel: &Selector) -> Option<SelectorId> {
        self.by_key.get(sel).copied()
    }

    /// The selectors selecting a known identity (sorted).
    pub fn selectors_of(&self, id: NumericIdentity) -> &[SelectorId] {
        self.selecting.get(&id).map_or(&[], |v| v.as_slice())
    }

    /// Every live selector.
    pub fn iter(&self) -> impl Iterator<Item = (SelectorId, &Selector)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| (i as SelectorId, &s.selector)))
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// Every FQDN selector in use.
    pub fn fqdn_selectors(&self) -> impl Iterator<Item = &FqdnSelector> {
        self.by_key.keys().filter_map(|s| match s {
            Selector::Fqdn(f) => Some(f),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fqdn::{DnsName, FqdnPattern};
    use crate::identity::{parse_label, LOCAL_IDENTITY_FLAG};
    use crate::labels::{LabelKey, Requirement};

    fn ls(labels: &[&str]) -> LabelSet {
        LabelSet::new(labels.iter().map(|s| parse_label(s).unwrap()).collect())
    }

    fn sel_in(pairs: &[(&str, &str)]) -> LabelSelector {
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

    fn cidr(c: &str, except: &[&str]) -> Selector {
        Selector::Cidr(CidrSelector {
            cidr: c.parse().unwrap(),
            except: except.iter().map(|e| e.parse().unwrap()).collect(),
        })
    }

    fn with_reserved(c: &mut SelectorCache) {
        for (id, _) in reserved::ALL {
            c.add_identity(id, crate::identity::reserved_labels(id).unwrap());
        }
    }

    /// Brute force: the selection of every selector must equal a scan of every identity.
    fn check_consistent(c: &SelectorCache) {
        for (sid, sel) in c.iter() {
            let expected: BTreeSet<u32> = c
                .identities
                .values()
                .filter(|f| selects(sel, f))
                .map(|f| f.id)
                .collect();
            assert_eq!(c.selected(sid), &expected, "{sel:?}");
            for id in &expected {
                assert!(c.selectors_of(*id).contains(&sid));
            }
        }
    }

    #[test]
    fn label_selectors_incremental_both_ways() {
        let mut c = SelectorCache::new();
        with_reserved(&mut c);
        let web = sel_in(&[
            ("k8s:app", "web"),
            ("k8s:io.kubernetes.pod.namespace", "default"),
        ]);
        let (s_web, new) = c.add_selector(Selector::Endpoints(web.clone()));
        assert!(new);
        assert_eq!(
            c.add_selector(Selector::Endpoints(web.clone())),
            (s_web, false)
        );
        let gained = c.add_identity(
            300,
            ls(&["k8s:app=web", "k8s:io.kubernetes.pod.namespace=default"]),
        );
        assert_eq!(gained, vec![s_web]);
        assert!(c
            .add_identity(
                301,
                ls(&["k8s:app=web", "k8s:io.kubernetes.pod.namespace=other"])
            )
            .is_empty());
        // A selector added later sees existing identities.
        let no_app = LabelSelector {
            requirements: vec![Requirement {
                key: LabelKey::parse("app"),
                op: Operator::DoesNotExist,
            }],
        };
        let (s_noapp, _) = c.add_selector(Selector::Endpoints(no_app));
        assert!(c.selected(s_noapp).contains(&reserved::WORLD));
        assert!(!c.selected(s_noapp).contains(&300));
        check_consistent(&c);
        assert_eq!(c.remove_identity(300), vec![s_web]);
        assert!(c.selected(s_web).is_empty());
        assert!(!c.release_selector(s_web));
        assert!(c.release_selector(s_web));
        assert!(c.lookup(&Selector::Endpoints(web)).is_none());
        check_consistent(&c);
    }

    #[test]
    fn entities() {
        let mut c = SelectorCache::new();
        with_reserved(&mut c);
        c.add_identity(300, ls(&["k8s:app=web"]));
        let cidr_id = LOCAL_IDENTITY_FLAG | 1;
        c.add_identity(cidr_id, ls(&["cidr:10.0.0.0/8", "reserved:world"]));
        let v6_id = LOCAL_IDENTITY_FLAG | 2;
        c.add_identity(v6_id, ls(&["cidr:fd00::/8", "reserved:world"]));
        let sel = |c: &mut SelectorCache, e| {
            let (s, _) = c.add_selector(Selector::Entity(e));
            c.selected(s).iter().copied().collect::<Vec<_>>()
        };
        assert_eq!(sel(&mut c, Entity::World), vec![2, 9, 10, cidr_id, v6_id]);
        assert_eq!(sel(&mut c, Entity::WorldIpv4), vec![9, cidr_id]);
        assert_eq!(sel(&mut c, Entity::WorldIpv6), vec![10, v6_id]);
        assert_eq!(sel(&mut c, Entity::Cluster), vec![1, 3, 4, 5, 6, 7, 8, 300]);
        assert_eq!(sel(&mut c, Entity::Host), vec![1]);
        assert_eq!(sel(&mut c, Entity::KubeApiserver), vec![7]);
        assert_eq!(sel(&mut c, Entity::RemoteNode), vec![6]);
        assert_eq!(sel(&mut c, Entity::Health), vec![4]);
        // A later endpoint identity joins `cluster`, not `world`.
        let gained = c.add_identity(301, ls(&["k8s:app=db"]));
        assert_eq!(gained.len(), 1);
        check_consistent(&c);
    }

    #[test]
    fn cidr_with_except() {
        let mut c = SelectorCache::new();
        with_reserved(&mut c);
        let l = LOCAL_IDENTITY_FLAG;
        c.add_identity(l | 1, ls(&["cidr:10.0.0.0/8", "reserved:world"]));
        c.add_identity(l | 2, ls(&["cidr:10.1.0.0/16", "reserved:world"]));
        c.add_identity(300, ls(&["k8s:app=web"]));
        let (all, _) = c.add_selector(cidr("0.0.0.0/0", &["10.1.0.0/16"]));
        let (ten, _) = c.add_selector(cidr("10.0.0.0/8", &[]));
        let (hole, _) = c.add_selector(cidr("10.1.0.0/16", &[]));
        let v = |c: &SelectorCache, s| c.selected(s).iter().copied().collect::<Vec<_>>();
        assert_eq!(v(&c, all), vec![2, 9, l | 1]);
        assert_eq!(v(&c, ten), vec![l | 1, l | 2]);
        assert_eq!(v(&c, hole), vec![l | 2]);
        // An FQDN identity carrying the policy prefixes that contain its IP.
        let f = l | 3;
        let gained = c.add_identity(
            f,
            ls(&[
                "fqdn:api.example.com.",
                "reserved:world",
                "cidr:10.0.0.0/8",
                "cidr:10.1.0.0/16",
            ]),
        );
        assert_eq!(gained, vec![ten, hole]);
        let g = l | 4;
        let gained = c.add_identity(
            g,
            ls(&["fqdn:api.example.com.", "reserved:world", "cidr:10.0.0.0/8"]),
        );
        assert_eq!(gained, vec![all, ten]);
        check_consistent(&c);
        // IPv6 /0 does not select IPv4 identities.
        let (v6all, _) = c.add_selector(cidr("::/0", &[]));
        assert_eq!(v(&c, v6all), vec![2, 10]);
        check_consistent(&c);
    }

    #[test]
    fn fqdn_selectors() {
        let mut c = SelectorCache::new();
        let name = FqdnSelector::MatchName(DnsName::parse_match_name("api.example.com").unwrap());
        let pat = FqdnSelector::MatchPattern(FqdnPattern::parse("*.example.com").unwrap());
        let (sn, _) = c.add_selector(Selector::Fqdn(name.clone()));
        let (sp, _) = c.add_selector(Selector::Fqdn(pat.clone()));
        let id = LOCAL_IDENTITY_FLAG | 7;
        let gained = c.add_identity(
            id,
            LabelSet::new(vec![
                fqdn_label(&name),
                fqdn_label(&pat),
                Label::reserved("world"),
            ]),
        );
        assert_eq!(gained, vec![sn, sp]);
        let id2 = LOCAL_IDENTITY_FLAG | 8;
        assert_eq!(
            c.add_identity(
                id2,
                LabelSet::new(vec![fqdn_label(&pat), Label::reserved("world")])
            ),
            vec![sp]
        );
        assert_eq!(c.fqdn_selectors().count(), 2);
        assert_eq!(c.remove_identity(id), vec![sn, sp]);
        check_consistent(&c);
        // Interned ids are reused after release.
        assert!(c.release_selector(sn));
        let other = FqdnSelector::MatchName(DnsName::parse_match_name("b.example.com").unwrap());
        let (so, new) = c.add_selector(Selector::Fqdn(other));
        assert!(new);
        assert_eq!(so, sn);
        check_consistent(&c);
    }

    #[test]
    fn label_index_candidates() {
        let mut idx: LabelIndex<u32> = LabelIndex::default();
        let a = sel_in(&[("k8s:io.kubernetes.pod.namespace", "x"), ("app", "a")]);
        idx.insert(&a, 1);
        idx.insert(&LabelSelector::default(), 2);
        let mut got = vec![];
        idx.for_candidates(
            &ls(&["k8s:app=a", "k8s:io.kubernetes.pod.namespace=y"]),
            |t| got.push(t),
        );
        got.sort();
        assert_eq!(got, vec![1, 2]);
        idx.remove(&a, 1);
        let mut got = vec![];
        idx.for_candidates(&ls(&["k8s:app=a"]), |t| got.push(t));
        assert_eq!(got, vec![2]);
    }
}
