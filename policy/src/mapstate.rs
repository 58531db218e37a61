//! Per-endpoint policy map state: keys and entries as the datapath's policy map holds them, and diffs.
//!
//! A key is (peer identity, direction, protocol, destination port with a prefix length); identity
//! 0 means any peer, protocol 0 any protocol, prefix length 0 any port. Port ranges become several
//! prefix-aligned keys. The lookup here is exactly what the eBPF program does, so a verdict taken
//! from a `MapState` is the verdict of the datapath:
//!
//! 1. `a` = the longest-prefix entry of the peer's identity (exact protocol before protocol 0,
//!    then the longest port prefix); `b` = the same among the identity-0 entries.
//! 2. A deny in `a` or `b` → deny.
//! 3. Else the more specific of `a` and `b` (longer protocol+port match; on a tie the specific
//!    identity) → allow, with its proxy port.
//! 4. Neither → no match (a drop in an enforced direction; an unenforced direction always has
//!    the allow-all entry, identity 0 / protocol 0 / port 0).
//!
//! Within one identity an allow covered by a deny of the same identity is never stored: it could
//! not win, and the longer prefix would hide the deny from step 1.
//!
//! Entries are grouped per (direction, identity) so that an identity appearing or going is one
//! group replaced, and a lookup is two hash probes plus a few binary searches.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use crate::error::Span;
use crate::identity::NumericIdentity;
use crate::model::{Direction, L7Kind, PolicyKind};

/// The rule that produced an entry: enough to name it in `policy trace` and `bpf policy get`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RuleRef {
    /// `namespace/name` or `name` (the policy's display name).
    pub policy: Arc<str>,
    pub kind: PolicyKind,
    pub file: Arc<str>,
    /// The rule element (`ingress[i]`, `egressDeny[j]`, or the whole rule for default deny).
    pub span: Span,
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} ({}:{}:{})",
            self.kind.as_str(),
            self.policy,
            self.file,
            self.span.line,
            self.span.column
        )
    }
}

/// Which proxy listens where (0 = that proxy is not running; redirects to it carry port 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProxyPorts {
    pub dns: u16,
    pub http: u16,
    pub kafka: u16,
}

impl ProxyPorts {
    pub fn port_for(&self, kind: L7Kind) -> u16 {
        match kind {
            L7Kind::Dns => self.dns,
            L7Kind::Http => self.http,
            L7Kind::Kafka => self.kafka,
        }
    }
}

/// The protocol and port part of a key. `port` has its host bits (below the prefix) cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortKey {
    pub protocol: u8,
    pub port: u16,
    pub prefix_len: u8,
}

impl PortKey {
    /// Protocol and port wildcard (the key of L3-only rules).
    pub const ANY: PortKey = PortKey {
        protocol: 0,
        port: 0,
        prefix_len: 0,
    };

    pub fn new(protocol: u8, port: u16, prefix_len: u8) -> PortKey {
        let prefix_len = prefix_len.min(16);
        PortKey {
            protocol,
            port: port & port_mask(prefix_len),
            prefix_len,
        }
    }

    /// An exact port (ICMP: the type) of one protocol.
    pub fn exact(protocol: u8, port: u16) -> PortKey {
        PortKey::new(protocol, port, 16)
    }

    /// Last port covered.
    pub fn end_port(&self) -> u16 {
        self.port | !port_mask(self.prefix_len)
    }

    /// Whether every (protocol, port) this key matches is also matched by `self`.
    pub fn covers(&self, other: &PortKey) -> bool {
        (self.protocol == 0 || self.protocol == other.protocol)
            && self.prefix_len <= other.prefix_len
            && other.port & port_mask(self.prefix_len) == self.port
    }

    pub fn matches(&self, protocol: u8, port: u16) -> bool {
        (self.protocol == 0 || self.protocol == protocol)
            && port & port_mask(self.prefix_len) == self.port
    }

    /// Datapath preference: exact protocol first, then the longer port prefix.
    fn specificity(&self) -> u8 {
        if self.protocol == 0 {
            self.prefix_len
        } else {
            17 + self.prefix_len
        }
    }
}

fn port_mask(prefix_len: u8) -> u16 {
    if prefix_len == 0 {
        0
    } else {
        u16::MAX << (16 - u32::from(prefix_len.min(16)))
    }
}

/// Splits an inclusive port range into prefix-aligned `(port, prefix_len)` blocks, as the
/// datapath's LPM key needs them. `0..=65535` is `(0, 0)`.
pub fn port_range_keys(start: u16, end: u16) -> Vec<(u16, u8)> {
    let (mut s, e) = (u32::from(start), u32::from(end));
    let mut out = Vec::new();
    while s <= e {
        let mut size: u32 = if s == 0 {
            1 << 16
        } else {
            1 << s.trailing_zeros()
        };
        while s + size - 1 > e {
            size >>= 1;
        }
        out.push((s as u16, (16 - size.trailing_zeros()) as u8));
        s += size;
    }
    out
}

/// A full policy map key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MapKey {
    pub identity: NumericIdentity,
    pub direction: Direction,
    /// IP protocol number; 0 = any.
    pub protocol: u8,
    /// Destination port (ICMP: the type); 0 with prefix 0 = any.
    pub port: u16,
    /// Number of leading port bits matched: 16 exact, 0 any.
    pub prefix_len: u8,
}

impl MapKey {
    pub fn new(identity: NumericIdentity, direction: Direction, pk: PortKey) -> MapKey {
        MapKey {
            identity,
            direction,
            protocol: pk.protocol,
            port: pk.port,
            prefix_len: pk.prefix_len,
        }
    }

    pub fn port_key(&self) -> PortKey {
        PortKey::new(self.protocol, self.port, self.prefix_len)
    }

    /// Last port covered (the `endPort` of `bpf policy get`).
    pub fn end_port(&self) -> u16 {
        self.port_key().end_port()
    }
}

/// The rules behind an entry.
pub type RuleSet = Arc<[Arc<RuleRef>]>;

/// A policy map value.
#[derive(Debug, Clone)]
pub struct MapEntry {
    pub deny: bool,
    /// Where the flow is redirected (0 = no redirect, or the proxy is not running).
    pub proxy_port: u16,
    /// The proxy the flow goes to, when allow rules with L7 rules produced the entry.
    pub l7: Option<L7Kind>,
    /// The rules that produced the entry, ordered by file and position, without duplicates.
    /// Empty only for the allow-all entry of an unenforced direction. Shared between entries
    /// produced by the same rules (thousands of identities often share one rule set).
    pub rules: RuleSet,
}

impl PartialEq for MapEntry {
    fn eq(&self, other: &Self) -> bool {
        self.deny == other.deny
            && self.proxy_port == other.proxy_port
            && self.l7 == other.l7
            && (Arc::ptr_eq(&self.rules, &other.rules)
                || self.rules.len() == other.rules.len()
                    && self
                        .rules
                        .iter()
                        .zip(other.rules.iter())
                        .all(|(a, b)| Arc::ptr_eq(a, b) || a == b))
    }
}
impl Eq for MapEntry {}

impl MapEntry {
    /// Whether the datapath value differs (the rules are bookkeeping only).
    pub fn datapath_eq(&self, other: &MapEntry) -> bool {
        self.deny == other.deny && self.proxy_port == other.proxy_port
    }
}

/// Changes to one endpoint's policy map.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapDiff {
    /// Keys to insert or overwrite.
    pub adds: Vec<(MapKey, MapEntry)>,
    pub deletes: Vec<MapKey>,
}

impl MapDiff {
    pub fn is_empty(&self) -> bool {
        self.adds.is_empty() && self.deletes.is_empty()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupVerdict {
    Allow,
    Deny,
    /// No entry matches: dropped in an enforced direction.
    NoMatch,
}

/// The result of a datapath lookup.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Lookup<'a> {
    pub verdict: LookupVerdict,
    /// The entry that decided (for `NoMatch`: none).
    pub key: Option<MapKey>,
    pub entry: Option<&'a MapEntry>,
    pub proxy_port: u16,
}

/// Hasher for identity numbers: one multiply, no DoS concern (the keys are our own numbers).
#[derive(Default, Clone, Copy)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(5) ^ u64::from(b)).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }
    fn write_u32(&mut self, i: u32) {
        self.0 = (self.0 ^ u64::from(i)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    fn write_u16(&mut self, i: u16) {
        self.write_u32(u32::from(i));
    }
}

pub(crate) type IdMap<V> = HashMap<u32, V, BuildHasherDefault<IdHasher>>;

/// The entries of one identity in one direction, sorted by port key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Group {
    entries: Vec<(PortKey, MapEntry)>,
    /// Per protocol: bit `n` set when some key has prefix length `n`.
    masks: Vec<(u8, u32)>,
}

impl Group {
    fn from_sorted(entries: Vec<(PortKey, MapEntry)>) -> Group {
        let mut g = Group {
            entries,
            masks: Vec::new(),
        };
        g.rebuild_masks();
        g
    }

    fn rebuild_masks(&mut self) {
        self.masks.clear();
        for (k, _) in &self.entries {
            match self.masks.iter_mut().find(|(p, _)| *p == k.protocol) {
                Some((_, m)) => *m |= 1 << k.prefix_len,
                None => self.masks.push((k.protocol, 1 << k.prefix_len)),
            }
        }
    }

    fn get(&self, k: &PortKey) -> Option<&MapEntry> {
        self.entries
            .binary_search_by(|(x, _)| x.cmp(k))
            .ok()
            .map(|i| &self.entries[i].1)
    }

    /// Longest-prefix match: exact protocol first, then protocol 0.
    fn lpm(&self, protocol: u8, port: u16) -> Option<(PortKey, &MapEntry)> {
        for p in [protocol, 0] {
            if let Some(&(_, mut mask)) = self.masks.iter().find(|(x, _)| *x == p) {
                while mask != 0 {
                    let plen = (31 - mask.leading_zeros()) as u8;
                    mask &= !(1 << plen);
                    let k = PortKey::new(p, port, plen);
                    if let Some(e) = self.get(&k) {
                        return Some((k, e));
                    }
                }
            }
            if protocol == 0 {
                break;
            }
        }
        None
    }
}

/// One endpoint's policy map.
#[derive(Debug, Clone, Default)]
pub struct MapState {
    /// Index 0 ingress, 1 egress.
    dirs: [IdMap<Group>; 2],
}

fn di(d: Direction) -> usize {
    match d {
        Direction::Ingress => 0,
        Direction::Egress => 1,
    }
}

const DIRS: [Direction; 2] = [Direction::Ingress, Direction::Egress];

impl PartialEq for MapState {
    fn eq(&self, other: &Self) -> bool {
        (0..2).all(|d| {
            let (a, b) = (&self.dirs[d], &other.dirs[d]);
            a.len() == b.len() && a.iter().all(|(id, g)| b.get(id) == Some(g))
        })
    }
}

impl MapState {
    pub fn new() -> Self {
        Self::default()
    }

    /// The datapath lookup (see the module documentation).
    pub fn lookup(
        &self,
        identity: NumericIdentity,
        direction: Direction,
        protocol: u8,
        port: u16,
    ) -> Lookup<'_> {
        let groups = &self.dirs[di(direction)];
        let a = if identity != 0 {
            groups
                .get(&identity)
                .and_then(|g| g.lpm(protocol, port))
                .map(|(k, e)| (identity, k, e))
        } else {
            None
        };
        let b = groups
            .get(&0)
            .and_then(|g| g.lpm(protocol, port))
            .map(|(k, e)| (0, k, e));
        let pick = match (a, b) {
            (Some(x), _) if x.2.deny => Some(x),
            (_, Some(y)) if y.2.deny => Some(y),
            (Some(x), Some(y)) => {
                if x.1.specificity() >= y.1.specificity() {
                    Some(x)
                } else {
                    Some(y)
                }
            }
            (x, y) => x.or(y),
        };
        match pick {
            Some((id, k, e)) => Lookup {
                verdict: if e.deny {
                    LookupVerdict::Deny
                } else {
                    LookupVerdict::Allow
                },
                key: Some(MapKey::new(id, direction, k)),
                entry: Some(e),
                proxy_port: if e.deny { 0 } else { e.proxy_port },
            },
            None => Lookup {
                verdict: LookupVerdict::NoMatch,
                key: None,
                entry: None,
                proxy_port: 0,
            },
        }
    }

    pub fn get(&self, key: &MapKey) -> Option<&MapEntry> {
        self.dirs[di(key.direction)]
            .get(&key.identity)
            .and_then(|g| g.get(&key.port_key()))
    }

    /// Every entry, ordered by key.
    pub fn entries(&self) -> Vec<(MapKey, &MapEntry)> {
        let mut v: Vec<(MapKey, &MapEntry)> = Vec::with_capacity(self.len());
        for d in DIRS {
            for (&id, g) in &self.dirs[di(d)] {
                v.extend(g.entries.iter().map(|(k, e)| (MapKey::new(id, d, *k), e)));
            }
        }
        v.sort_by_key(|a| a.0);
        v
    }

    pub fn len(&self) -> usize {
        self.dirs
            .iter()
            .flat_map(|m| m.values())
            .map(|g| g.entries.len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The entries of one identity in one direction, ordered by port key.
    pub fn identity_entries(
        &self,
        direction: Direction,
        identity: NumericIdentity,
    ) -> &[(PortKey, MapEntry)] {
        self.dirs[di(direction)]
            .get(&identity)
            .map_or(&[], |g| g.entries.as_slice())
    }

    /// Identities that have entries in a direction.
    pub fn identities(&self, direction: Direction) -> impl Iterator<Item = NumericIdentity> + '_ {
        self.dirs[di(direction)].keys().copied()
    }

    /// Replaces all entries of one identity in one direction (`entries` sorted by port key,
    /// no duplicates). Returns the old ones.
    pub(crate) fn set_identity(
        &mut self,
        direction: Direction,
        identity: NumericIdentity,
        entries: Vec<(PortKey, MapEntry)>,
    ) -> Vec<(PortKey, MapEntry)> {
        let groups = &mut self.dirs[di(direction)];
        let old = if entries.is_empty() {
            groups.remove(&identity)
        } else {
            groups.insert(identity, Group::from_sorted(entries))
        };
        old.map(|g| g.entries).unwrap_or_default()
    }

    /// Inserts or replaces one entry.
    pub fn insert(&mut self, key: MapKey, entry: MapEntry) -> Option<MapEntry> {
        let pk = key.port_key();
        let g = self.dirs[di(key.direction)]
            .entry(key.identity)
            .or_default();
        let old = match g.entries.binary_search_by(|(x, _)| x.cmp(&pk)) {
            Ok(i) => Some(std::mem::replace(&mut g.entries[i].1, entry)),
            Err(i) => {
                g.entries.insert(i, (pk, entry));
                None
            }
        };
        g.rebuild_masks();
        old
    }

    pub fn remove(&mut self, key: &MapKey) -> Option<MapEntry> {
        let groups = &mut self.dirs[di(key.direction)];
        let g = groups.get_mut(&key.identity)?;
        let i = g
            .entries
            .binary_search_by(|(x, _)| x.cmp(&key.port_key()))
            .ok()?;
        let (_, e) = g.entries.remove(i);
        if g.entries.is_empty() {
            groups.remove(&key.identity);
        } else {
            g.rebuild_masks();
        }
        Some(e)
    }

    /// Applies a diff (deletes first, then adds), as a datapath does.
    pub fn apply(&mut self, diff: &MapDiff) {
        for k in &diff.deletes {
            self.remove(k);
        }
        for (k, e) in &diff.adds {
            self.insert(*k, e.clone());
        }
    }

    /// The diff that turns `self` into `newer`.
    pub fn diff(&self, newer: &MapState) -> MapDiff {
        let mut d = MapDiff::default();
        for dir in DIRS {
            let (old, new) = (&self.dirs[di(dir)], &newer.dirs[di(dir)]);
            for (&id, g) in new {
                let og = old.get(&id).map_or(&[][..], |g| g.entries.as_slice());
                diff_group(id, dir, og, &g.entries, &mut d);
            }
            for (&id, g) in old {
                if !new.contains_key(&id) {
                    diff_group(id, dir, &g.entries, &[], &mut d);
                }
            }
        }
        d.adds.sort_by_key(|a| a.0);
        d.deletes.sort();
        d
    }
}

/// Appends to `d` what turns `old` into `new` (both sorted by port key).
pub(crate) fn diff_group(
    id: NumericIdentity,
    dir: Direction,
    old: &[(PortKey, MapEntry)],
    new: &[(PortKey, MapEntry)],
    d: &mut MapDiff,
) {
    let (mut i, mut j) = (0, 0);
    while i < old.len() || j < new.len() {
        match (old.get(i), new.get(j)) {
            (Some((ko, eo)), Some((kn, en))) if ko == kn => {
                if eo != en {
                    d.adds.push((MapKey::new(id, dir, *kn), en.clone()));
                }
                i += 1;
                j += 1;
            }
            (Some((ko, _)), Some((kn, _))) if ko < kn => {
                d.deletes.push(MapKey::new(id, dir, *ko));
                i += 1;
            }
            (Some(_), Some((kn, en))) => {
                d.adds.push((MapKey::new(id, dir, *kn), en.clone()));
                j += 1;
            }
            (Some((ko, _)), None) => {
                d.deletes.push(MapKey::new(id, dir, *ko));
                i += 1;
            }
            (None, Some((kn, en))) => {
                d.adds.push((MapKey::new(id, dir, *kn), en.clone()));
                j += 1;
            }
            (None, None) => break,
        }
    }
}

/// Rules gathered for one key: nothing, one shared set (merged from a summary), or a list.
#[derive(Default, Clone)]
enum Rules {
    #[default]
    Empty,
    Shared(RuleSet),
    Owned(Vec<Arc<RuleRef>>),
}

impl Rules {
    fn is_empty(&self) -> bool {
        match self {
            Rules::Empty => true,
            Rules::Shared(s) => s.is_empty(),
            Rules::Owned(v) => v.is_empty(),
        }
    }

    fn owned(&mut self) -> &mut Vec<Arc<RuleRef>> {
        if !matches!(self, Rules::Owned(_)) {
            let v = match std::mem::take(self) {
                Rules::Shared(s) => s.to_vec(),
                _ => Vec::new(),
            };
            *self = Rules::Owned(v);
        }
        match self {
            Rules::Owned(v) => v,
            _ => unreachable!("just made owned"),
        }
    }

    fn add(&mut self, r: &Arc<RuleRef>) {
        self.owned().push(r.clone());
    }

    fn add_set(&mut self, s: &RuleSet) {
        if s.is_empty() {
            return;
        }
        match self {
            Rules::Empty => *self = Rules::Shared(s.clone()),
            Rules::Shared(x) if Arc::ptr_eq(x, s) => {}
            _ => self.owned().extend(s.iter().cloned()),
        }
    }

    fn finish(self) -> RuleSet {
        match self {
            Rules::Empty => Arc::new([]),
            Rules::Shared(s) => s,
            Rules::Owned(v) => sorted_rules(v),
        }
    }
}

#[derive(Default, Clone)]
struct Acc {
    deny: Rules,
    allow: Rules,
    /// The proxy asked for by allow rules with L7 rules on exactly this key.
    l7: Option<L7Kind>,
    /// The allow-all entry of an unenforced direction.
    allow_all: bool,
}

fn cmp_rules(a: &Arc<RuleRef>, b: &Arc<RuleRef>) -> std::cmp::Ordering {
    use std::cmp::Ordering::Equal;
    if Arc::ptr_eq(a, b) {
        return Equal;
    }
    let by_file = if Arc::ptr_eq(&a.file, &b.file) {
        Equal
    } else {
        a.file.cmp(&b.file)
    };
    by_file
        .then(a.span.cmp(&b.span))
        .then_with(|| {
            if Arc::ptr_eq(&a.policy, &b.policy) {
                Equal
            } else {
                a.policy.cmp(&b.policy)
            }
        })
        .then(a.kind.cmp(&b.kind))
}

fn sorted_rules(mut v: Vec<Arc<RuleRef>>) -> RuleSet {
    v.sort_by(cmp_rules);
    v.dedup_by(|a, b| Arc::ptr_eq(a, b) || a == b);
    v.into()
}

/// What a group of rules says, key by key, before it is turned into entries: the rules of
/// one peer selector of one endpoint direction, computed once and merged for each identity the
/// selector selects (most identities are selected by a single selector and take `finished`
/// as it is).
#[derive(Debug, Clone, Default)]
pub(crate) struct Summary {
    keys: Vec<(PortKey, SumAcc)>,
    /// The entries when this summary alone applies to an identity.
    pub(crate) finished: Vec<(PortKey, MapEntry)>,
    /// Some rule of the group names an egress port, resolved per peer identity (not part of
    /// the summary).
    pub(crate) has_named_egress: bool,
}

#[derive(Debug, Clone)]
struct SumAcc {
    deny: RuleSet,
    allow: RuleSet,
    l7: Option<L7Kind>,
    allow_all: bool,
}

/// Collects what the rules say about one identity in one direction, key by key, and turns it
/// into map entries.
///
/// Merging on one key, as Cilium's `insertWithChanges` does: a deny wins over any allow; among
/// allows, a redirect wins over a plain allow (Cilium gives L7 redirection priority on a key, and
/// the L4-only rule makes the proxy allow everything for that peer: see
/// [`crate::engine::Engine::l7_policy`]); between two proxies the first by `L7Kind` order wins
/// (Cilium refuses such a mix outright).
#[derive(Default)]
pub(crate) struct EntryBuilder {
    keys: BTreeMap<PortKey, Acc>,
}

impl EntryBuilder {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    pub(crate) fn add(
        &mut self,
        key: PortKey,
        deny: bool,
        l7: Option<L7Kind>,
        rule: &Arc<RuleRef>,
    ) {
        let acc = self.keys.entry(key).or_default();
        if deny {
            acc.deny.add(rule);
        } else {
            acc.allow.add(rule);
            if let Some(k) = l7 {
                acc.l7 = Some(acc.l7.map_or(k, |x| x.min(k)));
            }
        }
    }

    /// The allow-all entry of a direction no rule enforces.
    pub(crate) fn add_allow_all(&mut self) {
        self.keys.entry(PortKey::ANY).or_default().allow_all = true;
    }

    /// Adds everything a summary says.
    pub(crate) fn merge(&mut self, s: &Summary) {
        for (k, sa) in &s.keys {
            let acc = self.keys.entry(*k).or_default();
            acc.deny.add_set(&sa.deny);
            acc.allow.add_set(&sa.allow);
            if let Some(l7) = sa.l7 {
                acc.l7 = Some(acc.l7.map_or(l7, |x| x.min(l7)));
            }
            acc.allow_all |= sa.allow_all;
        }
    }

    /// Freezes the collected rules into a summary (and its entries when it applies alone).
    pub(crate) fn summarize(self, ports: &ProxyPorts, has_named_egress: bool) -> Summary {
        let keys: Vec<(PortKey, SumAcc)> = self
            .keys
            .into_iter()
            .map(|(k, a)| {
                (
                    k,
                    SumAcc {
                        deny: a.deny.finish(),
                        allow: a.allow.finish(),
                        l7: a.l7,
                        allow_all: a.allow_all,
                    },
                )
            })
            .collect();
        let mut b = EntryBuilder::new();
        let mut s = Summary {
            keys,
            finished: Vec::new(),
            has_named_egress,
        };
        b.merge(&s);
        s.finished = b.finish(ports);
        s
    }

    /// The entries, sorted by port key.
    pub(crate) fn finish(self, ports: &ProxyPorts) -> Vec<(PortKey, MapEntry)> {
        let denies: Vec<PortKey> = self
            .keys
            .iter()
            .filter(|(_, a)| !a.deny.is_empty())
            .map(|(k, _)| *k)
            .collect();
        let mut out = Vec::with_capacity(self.keys.len());
        for (k, acc) in self.keys {
            if !acc.deny.is_empty() {
                out.push((
                    k,
                    MapEntry {
                        deny: true,
                        proxy_port: 0,
                        l7: None,
                        rules: acc.deny.finish(),
                    },
                ));
                continue;
            }
            if denies.iter().any(|d| d.covers(&k)) {
                continue;
            }
            if acc.allow.is_empty() && !acc.allow_all {
                continue;
            }
            out.push((
                k,
                MapEntry {
                    deny: false,
                    proxy_port: acc.l7.map_or(0, |kind| ports.port_for(kind)),
                    l7: acc.l7,
                    rules: acc.allow.finish(),
                },
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rr(name: &str, line: u32) -> Arc<RuleRef> {
        Arc::new(RuleRef {
            policy: name.into(),
            kind: PolicyKind::CiliumNetworkPolicy,
            file: "p.yaml".into(),
            span: Span::new(line, 1),
        })
    }

    fn allow(port: u16) -> MapEntry {
        MapEntry {
            deny: false,
            proxy_port: port,
            l7: None,
            rules: Arc::new([]),
        }
    }

    fn deny() -> MapEntry {
        MapEntry {
            deny: true,
            proxy_port: 0,
            l7: None,
            rules: Arc::new([]),
        }
    }

    fn key(id: u32, proto: u8, port: u16, plen: u8) -> MapKey {
        MapKey::new(id, Direction::Egress, PortKey::new(proto, port, plen))
    }

    #[test]
    fn range_split() {
        assert_eq!(port_range_keys(80, 80), vec![(80, 16)]);
        assert_eq!(port_range_keys(0, 65535), vec![(0, 0)]);
        assert_eq!(port_range_keys(80, 81), vec![(80, 15)]);
        assert_eq!(port_range_keys(79, 82), vec![(79, 16), (80, 15), (82, 16)]);
        assert_eq!(
            port_range_keys(1024, 65535),
            vec![
                (1024, 6),
                (2048, 5),
                (4096, 4),
                (8192, 3),
                (16384, 2),
                (32768, 1)
            ]
        );
        assert_eq!(port_range_keys(65535, 65535), vec![(65535, 16)]);
        // Every port of a range is covered exactly once.
        for (s, e) in [(1u16, 1000u16), (7, 9), (30000, 65535), (0, 1)] {
            let keys = port_range_keys(s, e);
            for p in 0..=65535u16 {
                let n = keys
                    .iter()
                    .filter(|(kp, l)| PortKey::new(6, *kp, *l).matches(6, p))
                    .count();
                assert_eq!(n, usize::from(p >= s && p <= e), "{s}-{e} port {p}");
            }
        }
    }

    #[test]
    fn lookup_order() {
        let mut m = MapState::new();
        m.insert(key(0, 6, 80, 16), allow(0));
        m.insert(key(300, 0, 0, 0), allow(0));
        m.insert(key(300, 6, 8080, 16), allow(15001));
        m.insert(key(301, 6, 0, 0), allow(0));
        m.insert(key(0, 6, 443, 16), allow(15002));
        m.insert(key(302, 6, 443, 16), deny());
        fn l(m: &MapState, id: u32, port: u16) -> Lookup<'_> {
            m.lookup(id, Direction::Egress, 6, port)
        }
        // Specific identity + port.
        assert_eq!(l(&m, 300, 8080).proxy_port, 15001);
        // Identity-0 port entry more specific than an L3-only entry.
        assert_eq!(l(&m, 300, 80).key, Some(key(0, 6, 80, 16)));
        assert_eq!(l(&m, 300, 22).key, Some(key(300, 0, 0, 0)));
        assert_eq!(l(&m, 301, 22).key, Some(key(301, 6, 0, 0)));
        // Exact protocol beats protocol 0 for the same identity.
        assert_eq!(l(&m, 999, 22).verdict, LookupVerdict::NoMatch);
        assert_eq!(l(&m, 999, 443).proxy_port, 15002);
        // Deny of the specific identity wins over identity 0's allow.
        assert_eq!(l(&m, 302, 443).verdict, LookupVerdict::Deny);
        // Identity 0's deny wins over a specific allow.
        m.insert(key(0, 6, 8080, 16), deny());
        assert_eq!(l(&m, 300, 8080).verdict, LookupVerdict::Deny);
        // Other direction unaffected.
        assert_eq!(
            m.lookup(300, Direction::Ingress, 6, 80).verdict,
            LookupVerdict::NoMatch
        );
        // UDP is not TCP.
        assert_eq!(
            m.lookup(301, Direction::Egress, 17, 53).verdict,
            LookupVerdict::NoMatch
        );
        assert_eq!(
            m.lookup(300, Direction::Egress, 17, 53).key,
            Some(key(300, 0, 0, 0))
        );
        // Ties go to the specific identity.
        m.insert(key(303, 6, 80, 16), allow(9));
        assert_eq!(l(&m, 303, 80).proxy_port, 9);
    }

    #[test]
    fn builder_merges_on_a_key() {
        let ports = ProxyPorts {
            dns: 53,
            http: 80,
            kafka: 90,
        };
        let (a, b, c) = (rr("a", 1), rr("b", 2), rr("c", 3));
        let mut bld = EntryBuilder::new();
        // Redirect and plain allow on one key: the redirect stays, both rules recorded.
        bld.add(PortKey::exact(6, 80), false, None, &b);
        bld.add(PortKey::exact(6, 80), false, Some(L7Kind::Http), &a);
        // Allow covered by a deny of the same identity: removed.
        bld.add(PortKey::new(6, 1024, 6), true, None, &c);
        bld.add(PortKey::exact(6, 1500), false, None, &a);
        // Deny and allow on the same key: deny.
        bld.add(PortKey::exact(17, 53), false, Some(L7Kind::Dns), &a);
        bld.add(PortKey::exact(17, 53), true, None, &b);
        let out = bld.finish(&ports);
        let keys: Vec<PortKey> = out.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            keys,
            vec![
                PortKey::exact(6, 80),
                PortKey::new(6, 1024, 6),
                PortKey::exact(17, 53)
            ]
        );
        assert_eq!(out[0].1.proxy_port, 80);
        assert_eq!(out[0].1.l7, Some(L7Kind::Http));
        assert_eq!(&out[0].1.rules[..], &[a.clone(), b.clone()][..]);
        assert!(out[1].1.deny);
        assert!(out[2].1.deny);
        assert_eq!(&out[2].1.rules[..], &[b][..]);
    }

    #[test]
    fn allow_all_yields_to_deny_all() {
        let mut bld = EntryBuilder::new();
        bld.add_allow_all();
        let out = bld.finish(&ProxyPorts::default());
        assert_eq!(out.len(), 1);
        assert!(!out[0].1.deny && out[0].1.rules.is_empty());
        let mut bld = EntryBuilder::new();
        bld.add_allow_all();
        bld.add(PortKey::ANY, true, None, &rr("d", 1));
        let out = bld.finish(&ProxyPorts::default());
        assert!(out[0].1.deny);
    }

    #[test]
    fn diff_and_apply_round_trip() {
        let mut a = MapState::new();
        a.insert(key(0, 6, 80, 16), allow(0));
        a.insert(key(5, 0, 0, 0), allow(0));
        a.insert(key(6, 17, 53, 16), allow(0));
        let mut b = MapState::new();
        b.insert(key(0, 6, 80, 16), allow(7));
        b.insert(key(6, 17, 53, 16), allow(0));
        b.insert(key(6, 17, 54, 16), deny());
        let d = a.diff(&b);
        assert_eq!(d.deletes, vec![key(5, 0, 0, 0)]);
        assert_eq!(d.adds.len(), 2);
        let mut c = a.clone();
        c.apply(&d);
        assert_eq!(c, b);
        assert!(b.diff(&c).is_empty());
        assert_eq!(c.entries().len(), 3);
        assert_eq!(key(0, 6, 1024, 6).end_port(), 2047);
    }
}
