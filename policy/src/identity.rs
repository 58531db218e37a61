//! Numeric identities: one per distinct label set; reserved numbers as Cilium; node-local for CIDR and FQDN.
//!
//! Every endpoint with the same labels shares one identity, so policy is computed per identity,
//! not per address. Three ranges, as in Cilium:
//! - reserved identities 1..=10 with fixed labels (`reserved:host`, `reserved:world`, ...);
//! - cluster identities from [`MIN_CLUSTER_IDENTITY`] for endpoint label sets;
//! - node-local identities `LOCAL_IDENTITY_FLAG | n` for label sets that carry `cidr:` or
//!   `fqdn:` labels (policy prefixes, FQDN selector sets).
//!
//! Identities are reference counted: every user (an endpoint, a policy prefix, a learned FQDN
//! selector set) allocates, and the identity goes when the last user releases it. The numbers
//! survive restarts through [`IdentityAllocator::to_persisted`] /
//! [`IdentityAllocator::from_persisted`]: a restored allocator hands each known label set its old
//! number again, so pinned datapath maps stay meaningful across an agent restart.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::error::PolicyError;
use crate::labels::{Label, LabelSet, SOURCE_CIDR, SOURCE_FQDN, SOURCE_RESERVED};

pub type NumericIdentity = u32;

/// Cilium's reserved identities.
pub mod reserved {
    use super::NumericIdentity;

    /// Unknown; in a policy map key it means "any identity".
    pub const UNKNOWN: NumericIdentity = 0;
    pub const HOST: NumericIdentity = 1;
    pub const WORLD: NumericIdentity = 2;
    pub const UNMANAGED: NumericIdentity = 3;
    pub const HEALTH: NumericIdentity = 4;
    pub const INIT: NumericIdentity = 5;
    pub const REMOTE_NODE: NumericIdentity = 6;
    pub const KUBE_APISERVER: NumericIdentity = 7;
    pub const INGRESS: NumericIdentity = 8;
    pub const WORLD_IPV4: NumericIdentity = 9;
    pub const WORLD_IPV6: NumericIdentity = 10;

    /// Every reserved identity with the key of its `reserved:` label.
    pub const ALL: [(NumericIdentity, &str); 10] = [
        (HOST, "host"),
        (WORLD, "world"),
        (UNMANAGED, "unmanaged"),
        (HEALTH, "health"),
        (INIT, "init"),
        (REMOTE_NODE, "remote-node"),
        (KUBE_APISERVER, "kube-apiserver"),
        (INGRESS, "ingress"),
        (WORLD_IPV4, "world-ipv4"),
        (WORLD_IPV6, "world-ipv6"),
    ];

    /// The `reserved:` label key of a reserved identity.
    pub fn name(id: NumericIdentity) -> Option<&'static str> {
        ALL.iter().find(|(i, _)| *i == id).map(|(_, n)| *n)
    }

    /// The reserved identity whose label key is `name`.
    pub fn by_name(name: &str) -> Option<NumericIdentity> {
        ALL.iter().find(|(_, n)| *n == name).map(|(i, _)| *i)
    }
}

/// First identity handed to endpoint label sets.
pub const MIN_CLUSTER_IDENTITY: NumericIdentity = 256;
/// Node-local identities (CIDR and FQDN) have this bit set.
pub const LOCAL_IDENTITY_FLAG: NumericIdentity = 1 << 24;
/// Largest cluster identity the allocator hands out. The one above it is kept free so that
/// `policy trace` can evaluate a hypothetical endpoint under a number no real one has.
pub const MAX_CLUSTER_IDENTITY: NumericIdentity = LOCAL_IDENTITY_FLAG - 2;
/// The number `policy trace` uses for a `labels:` peer whose label set has no identity yet.
pub const HYPOTHETICAL_IDENTITY: NumericIdentity = LOCAL_IDENTITY_FLAG - 1;
const MAX_LOCAL_INDEX: u32 = LOCAL_IDENTITY_FLAG - 1;

/// Which range an identity number belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityScope {
    /// 0: unknown / any.
    Unknown,
    /// 1..=255: reserved (only 1..=10 are defined).
    Reserved,
    /// Endpoint label sets (256 .. 1<<24).
    Cluster,
    /// CIDR and FQDN label sets (`LOCAL_IDENTITY_FLAG | n`).
    Local,
}

impl IdentityScope {
    pub fn of(id: NumericIdentity) -> IdentityScope {
        if id == 0 {
            IdentityScope::Unknown
        } else if id < MIN_CLUSTER_IDENTITY {
            IdentityScope::Reserved
        } else if id & LOCAL_IDENTITY_FLAG != 0 {
            IdentityScope::Local
        } else {
            IdentityScope::Cluster
        }
    }
}

/// One identity: a number and the labels it stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub id: NumericIdentity,
    pub labels: LabelSet,
}

/// The label set of a reserved identity (`reserved:<name>`).
pub fn reserved_labels(id: NumericIdentity) -> Option<LabelSet> {
    reserved::name(id).map(|n| LabelSet::new(vec![Label::reserved(n)]))
}

/// Whether a label set is node-local: it describes addresses (CIDR or FQDN), not workloads.
pub fn is_local_label_set(labels: &LabelSet) -> bool {
    labels
        .labels()
        .iter()
        .any(|l| l.source == SOURCE_CIDR || l.source == SOURCE_FQDN)
}

/// The reserved identity a label set stands for, as Cilium decides it: any set with
/// `reserved:host` is the host; otherwise a set of exactly one reserved label is that identity.
pub fn reserved_identity_of(labels: &LabelSet) -> Option<NumericIdentity> {
    let ls = labels.labels();
    if ls
        .iter()
        .any(|l| l.source == SOURCE_RESERVED && l.key == "host")
    {
        return Some(reserved::HOST);
    }
    match ls {
        [only] if only.source == SOURCE_RESERVED => reserved::by_name(&only.key),
        _ => None,
    }
}

#[derive(Debug, Clone)]
struct Slot {
    identity: Identity,
    /// Users of a non-reserved identity; reserved identities are never released.
    refs: u32,
}

/// Allocates numeric identities for label sets and counts their users.
#[derive(Debug, Clone)]
pub struct IdentityAllocator {
    by_id: BTreeMap<NumericIdentity, Slot>,
    by_labels: HashMap<LabelSet, NumericIdentity>,
    /// Label set → number from persisted state, not (yet) in use again. Consulted first when
    /// a label set is allocated, and never given to another label set.
    remembered: HashMap<LabelSet, NumericIdentity>,
    remembered_ids: HashMap<NumericIdentity, LabelSet>,
    next_cluster: NumericIdentity,
    /// Index `n` of the next local identity `LOCAL_IDENTITY_FLAG | n`.
    next_local: u32,
    /// Moves whenever what [`to_persisted`](Self::to_persisted) writes changes (an identity
    /// created or gone), so the agent writes the file only then.
    generation: u64,
}

impl Default for IdentityAllocator {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Persisted {
    version: u32,
    next_cluster: u32,
    next_local: u32,
    identities: Vec<PersistedIdentity>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PersistedIdentity {
    id: u32,
    labels: Vec<String>,
}

const PERSIST_VERSION: u32 = 1;

/// Parses `source:key=value` (or `source:key`) as printed by `Label`'s `Display`.
pub fn parse_label(s: &str) -> Option<Label> {
    let (source, rest) = s.split_once(':')?;
    if source.is_empty() || rest.is_empty() {
        return None;
    }
    // CIDR keys contain ':' (IPv6) but never '='; other keys never contain '='.
    let (key, value) = match rest.split_once('=') {
        Some((k, v)) if source != SOURCE_CIDR && source != SOURCE_FQDN => (k, v),
        _ => (rest, ""),
    };
    if key.is_empty() {
        return None;
    }
    Some(Label::new(source, key, value))
}

impl IdentityAllocator {
    /// An allocator holding only the reserved identities.
    pub fn new() -> Self {
        let mut a = IdentityAllocator {
            by_id: BTreeMap::new(),
            by_labels: HashMap::new(),
            remembered: HashMap::new(),
            remembered_ids: HashMap::new(),
            next_cluster: MIN_CLUSTER_IDENTITY,
            next_local: 1,
            generation: 0,
        };
        for (id, _) in reserved::ALL {
            let labels = reserved_labels(id).expect("reserved identity has a name");
            a.by_labels.insert(labels.clone(), id);
            a.by_id.insert(
                id,
                Slot {
                    identity: Identity { id, labels },
                    refs: 0,
                },
            );
        }
        a
    }

    /// The identity for `labels`, allocating it if needed; counts one more user.
    /// Returns the number and whether it was newly created (reserved ones never are).
    pub fn allocate(&mut self, labels: LabelSet) -> (NumericIdentity, bool) {
        if let Some(id) = reserved_identity_of(&labels) {
            return (id, false);
        }
        if let Some(&id) = self.by_labels.get(&labels) {
            if let Some(slot) = self.by_id.get_mut(&id) {
                slot.refs = slot.refs.saturating_add(1);
            }
            return (id, false);
        }
        let id = match self.remembered.remove(&labels) {
            Some(id) => {
                self.remembered_ids.remove(&id);
                id
            }
            None => self.fresh_id(is_local_label_set(&labels)),
        };
        self.by_labels.insert(labels.clone(), id);
        self.by_id.insert(
            id,
            Slot {
                identity: Identity { id, labels },
                refs: 1,
            },
        );
        self.generation += 1;
        (id, true)
    }

    fn fresh_id(&mut self, local: bool) -> NumericIdentity {
        // Numbers are not reused right away: a released number may still sit in a datapath
        // map or in a connection's cached verdict. The ranges are large enough to wrap only
        // after millions of allocations; then the first free number is taken.
        if local {
            loop {
                let n = self.next_local;
                self.next_local = if n >= MAX_LOCAL_INDEX { 1 } else { n + 1 };
                let id = LOCAL_IDENTITY_FLAG | n;
                if self.is_free(id) {
                    return id;
                }
            }
        } else {
            loop {
                let id = self.next_cluster;
                self.next_cluster = if id >= MAX_CLUSTER_IDENTITY {
                    MIN_CLUSTER_IDENTITY
                } else {
                    id + 1
                };
                if self.is_free(id) {
                    return id;
                }
            }
        }
    }

    fn is_free(&self, id: NumericIdentity) -> bool {
        !self.by_id.contains_key(&id) && !self.remembered_ids.contains_key(&id)
    }

    /// Drops one user of `id`. Returns true when that was the last user and the identity is
    /// gone. Reserved and unknown identities are never released.
    pub fn release(&mut self, id: NumericIdentity) -> bool {
        if IdentityScope::of(id) != IdentityScope::Cluster
            && IdentityScope::of(id) != IdentityScope::Local
        {
            return false;
        }
        let Some(slot) = self.by_id.get_mut(&id) else {
            return false;
        };
        slot.refs = slot.refs.saturating_sub(1);
        if slot.refs > 0 {
            return false;
        }
        let slot = self.by_id.remove(&id).expect("slot present");
        self.by_labels.remove(&slot.identity.labels);
        self.generation += 1;
        true
    }

    pub fn get(&self, id: NumericIdentity) -> Option<&Identity> {
        self.by_id.get(&id).map(|s| &s.identity)
    }

    pub fn lookup(&self, labels: &LabelSet) -> Option<NumericIdentity> {
        if let Some(id) = reserved_identity_of(labels) {
            return Some(id);
        }
        self.by_labels.get(labels).copied()
    }

    /// Number of users of an identity (0 for reserved ones).
    pub fn refs(&self, id: NumericIdentity) -> u32 {
        self.by_id.get(&id).map_or(0, |s| s.refs)
    }

    /// Every identity in use (reserved ones included), by number.
    pub fn iter(&self) -> impl Iterator<Item = &Identity> {
        self.by_id.values().map(|s| &s.identity)
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Changes whenever the persisted numbering does (see [`to_persisted`](Self::to_persisted)).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Replaces the labels of a reserved identity (the host's identity carries the node's
    /// labels next to `reserved:host`). Returns the old labels when they changed.
    pub(crate) fn set_reserved_labels(
        &mut self,
        id: NumericIdentity,
        labels: LabelSet,
    ) -> Option<LabelSet> {
        if IdentityScope::of(id) != IdentityScope::Reserved {
            return None;
        }
        let slot = self.by_id.get_mut(&id)?;
        if slot.identity.labels == labels {
            return None;
        }
        Some(std::mem::replace(&mut slot.identity.labels, labels))
    }

    /// The allocator's numbering as JSON text, for the agent to write to its state directory.
    /// Holds every non-reserved identity in use and every remembered one not yet reclaimed.
    pub fn to_persisted(&self) -> String {
        let mut identities: Vec<PersistedIdentity> = self
            .by_id
            .values()
            .filter(|s| IdentityScope::of(s.identity.id) != IdentityScope::Reserved)
            .map(|s| PersistedIdentity {
                id: s.identity.id,
                labels: s
                    .identity
                    .labels
                    .labels()
                    .iter()
                    .map(|l| l.to_string())
                    .collect(),
            })
            .collect();
        identities.extend(
            self.remembered
                .iter()
                .map(|(labels, &id)| PersistedIdentity {
                    id,
                    labels: labels.labels().iter().map(|l| l.to_string()).collect(),
                }),
        );
        identities.sort_by_key(|p| p.id);
        let p = Persisted {
            version: PERSIST_VERSION,
            next_cluster: self.next_cluster,
            next_local: self.next_local,
            identities,
        };
        serde_json::to_string_pretty(&p).expect("identity state serializes")
    }

    /// Restores the numbering written by [`to_persisted`](Self::to_persisted). The restored
    /// identities are remembered, not in use: each label set gets its old number back when it
    /// is allocated again.
    pub fn from_persisted(text: &str) -> Result<Self, PolicyError> {
        let p: Persisted = serde_json::from_str(text)
            .map_err(|e| PolicyError::CorruptState(format!("identity state: {e}")))?;
        if p.version != PERSIST_VERSION {
            return Err(PolicyError::CorruptState(format!(
                "identity state: version {} is not supported (expected {PERSIST_VERSION})",
                p.version
            )));
        }
        let mut a = IdentityAllocator::new();
        if (MIN_CLUSTER_IDENTITY..=MAX_CLUSTER_IDENTITY).contains(&p.next_cluster) {
            a.next_cluster = p.next_cluster;
        }
        if (1..=MAX_LOCAL_INDEX).contains(&p.next_local) {
            a.next_local = p.next_local;
        }
        for (i, pi) in p.identities.iter().enumerate() {
            let mut labels = Vec::with_capacity(pi.labels.len());
            for s in &pi.labels {
                let l = parse_label(s).ok_or_else(|| {
                    PolicyError::CorruptState(format!(
                        "identity state: identities[{i}]: label {s:?} is not source:key[=value]"
                    ))
                })?;
                labels.push(l);
            }
            let labels = LabelSet::new(labels);
            let scope = IdentityScope::of(pi.id);
            let expected = if is_local_label_set(&labels) {
                IdentityScope::Local
            } else {
                IdentityScope::Cluster
            };
            if scope != expected || pi.id == HYPOTHETICAL_IDENTITY {
                return Err(PolicyError::CorruptState(format!(
                    "identity state: identities[{i}]: id {} is not a valid {} identity",
                    pi.id,
                    if expected == IdentityScope::Local {
                        "node-local"
                    } else {
                        "cluster"
                    }
                )));
            }
            if reserved_identity_of(&labels).is_some() {
                return Err(PolicyError::CorruptState(format!(
                    "identity state: identities[{i}]: labels of a reserved identity"
                )));
            }
            if a.remembered_ids.contains_key(&pi.id) || a.remembered.contains_key(&labels) {
                return Err(PolicyError::CorruptState(format!(
                    "identity state: identities[{i}]: id {} or its labels appear twice",
                    pi.id
                )));
            }
            a.remembered_ids.insert(pi.id, labels.clone());
            a.remembered.insert(labels, pi.id);
        }
        Ok(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ls(labels: &[&str]) -> LabelSet {
        LabelSet::new(labels.iter().map(|s| parse_label(s).unwrap()).collect())
    }

    #[test]
    fn reserved_identities_have_cilium_numbers() {
        let a = IdentityAllocator::new();
        assert_eq!(a.lookup(&ls(&["reserved:host"])), Some(1));
        assert_eq!(a.lookup(&ls(&["reserved:world"])), Some(2));
        assert_eq!(a.lookup(&ls(&["reserved:unmanaged"])), Some(3));
        assert_eq!(a.lookup(&ls(&["reserved:health"])), Some(4));
        assert_eq!(a.lookup(&ls(&["reserved:init"])), Some(5));
        assert_eq!(a.lookup(&ls(&["reserved:remote-node"])), Some(6));
        assert_eq!(a.lookup(&ls(&["reserved:kube-apiserver"])), Some(7));
        assert_eq!(a.lookup(&ls(&["reserved:ingress"])), Some(8));
        assert_eq!(a.lookup(&ls(&["reserved:world-ipv4"])), Some(9));
        assert_eq!(a.lookup(&ls(&["reserved:world-ipv6"])), Some(10));
        assert_eq!(a.get(9).unwrap().labels, ls(&["reserved:world-ipv4"]));
        assert_eq!(a.iter().count(), 10);
    }

    #[test]
    fn generation_moves_exactly_when_the_persisted_numbering_does() {
        let mut a = IdentityAllocator::new();
        let g0 = a.generation();
        let (id, _) = a.allocate(ls(&["k8s:app=web"]));
        let g1 = a.generation();
        assert_ne!(g1, g0, "a new identity");
        a.allocate(ls(&["k8s:app=web"]));
        a.allocate(ls(&["reserved:world"]));
        assert_eq!(
            a.generation(),
            g1,
            "more users, or a reserved identity: nothing to write"
        );
        assert!(!a.release(id));
        assert_eq!(a.generation(), g1, "a user fewer");
        assert!(a.release(id));
        assert_ne!(a.generation(), g1, "gone");
    }

    #[test]
    fn host_with_node_labels_is_the_host() {
        let mut a = IdentityAllocator::new();
        let (id, new) = a.allocate(ls(&["reserved:host", "k8s:node-role=worker"]));
        assert_eq!((id, new), (reserved::HOST, false));
        assert!(!a.release(reserved::HOST));
        assert!(a.get(reserved::HOST).is_some());
    }

    #[test]
    fn cluster_and_local_ranges_and_refcounts() {
        let mut a = IdentityAllocator::new();
        let web = ls(&["k8s:app=web", "k8s:io.kubernetes.pod.namespace=default"]);
        let (w, new) = a.allocate(web.clone());
        assert!(new);
        assert_eq!(w, MIN_CLUSTER_IDENTITY);
        assert_eq!(a.allocate(web.clone()), (w, false));
        let cidr = ls(&["cidr:10.0.0.0/8", "reserved:world"]);
        let (c, new) = a.allocate(cidr.clone());
        assert!(new);
        assert_eq!(c, LOCAL_IDENTITY_FLAG | 1);
        assert_eq!(IdentityScope::of(c), IdentityScope::Local);
        let (f, _) = a.allocate(ls(&["fqdn:*.example.com.", "reserved:world"]));
        assert_eq!(f, LOCAL_IDENTITY_FLAG | 2);
        // Two users: the first release keeps it.
        assert!(!a.release(w));
        assert_eq!(a.lookup(&web), Some(w));
        assert!(a.release(w));
        assert_eq!(a.lookup(&web), None);
        assert!(a.get(w).is_none());
        // Not reused right away.
        let (w2, _) = a.allocate(web);
        assert_ne!(w2, w);
        assert!(!a.release(12345));
    }

    #[test]
    fn persisted_numbers_come_back() {
        let mut a = IdentityAllocator::new();
        let web = ls(&["k8s:app=web"]);
        let db = ls(&["k8s:app=db"]);
        let v6 = ls(&["cidr:fd00::/8", "reserved:world"]);
        let (w, _) = a.allocate(web.clone());
        let (d, _) = a.allocate(db.clone());
        let (c, _) = a.allocate(v6.clone());
        let text = a.to_persisted();
        let mut b = IdentityAllocator::from_persisted(&text).unwrap();
        // Not in use until allocated again.
        assert!(b.get(d).is_none());
        // A new label set never takes a remembered number.
        let (other, _) = b.allocate(ls(&["k8s:app=other"]));
        assert!(other != w && other != d);
        assert_eq!(b.allocate(db), (d, true));
        assert_eq!(b.allocate(v6), (c, true));
        assert_eq!(b.allocate(web.clone()), (w, true));
        // Persisting again keeps everything, including remembered ones.
        let c2 = IdentityAllocator::from_persisted(&b.to_persisted()).unwrap();
        assert_eq!(c2.remembered.len(), 4);
    }

    #[test]
    fn corrupt_state_is_an_error() {
        for bad in [
            "not json",
            r#"{"version":2,"nextCluster":256,"nextLocal":1,"identities":[]}"#,
            r#"{"version":1,"nextCluster":256,"nextLocal":1,"identities":[{"id":5,"labels":["k8s:a=b"]}]}"#,
            r#"{"version":1,"nextCluster":256,"nextLocal":1,"identities":[{"id":300,"labels":["cidr:1.0.0.0/8"]}]}"#,
            r#"{"version":1,"nextCluster":256,"nextLocal":1,"identities":[{"id":300,"labels":["nosource"]}]}"#,
            r#"{"version":1,"nextCluster":256,"nextLocal":1,"identities":[{"id":300,"labels":["k8s:a=b"]},{"id":300,"labels":["k8s:a=c"]}]}"#,
        ] {
            assert!(
                matches!(
                    IdentityAllocator::from_persisted(bad),
                    Err(PolicyError::CorruptState(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn label_round_trip() {
        for s in [
            "k8s:app=web",
            "reserved:world",
            "cidr:10.0.0.0/8",
            "cidr:fd00::/64",
            "fqdn:*.example.com.",
            "k8s:io.cilium.k8s.namespace.labels.team=a",
        ] {
            assert_eq!(parse_label(s).unwrap().to_string(), s);
        }
    }
}
