//! The learned state (per endpoint: name → IPs with expiry, zombies) and the name manager
//! (selectors → names → IPs → one identity per distinct set of matching selectors and
//! address family).
//!
//! Why no `lru` or `moka`: both bound a cache by recency or by their own clock and drop
//! entries on their own schedule. Here an entry may only go when its TTL ends (at the exact
//! instant, with a change the datapath must apply), when `maxIPsPerHostname` pushes out the
//! earliest-expiring IP of that one name, or when a user cleans it — and each departure must
//! produce an ipcache change. `moka` also reads its own clock (time must be an argument here)
//! and expires lazily; a global LRU bound would silently revoke allows. What fits is a deadline
//! index: a `BTreeSet` ordered by expiry holding a key per (endpoint, name) no later than that
//! name's earliest expiry, so the next deadline is its first element and expiring is popping due
//! keys — no sweep over the whole cache, one timer in the agent.
//!
//! The index is lazy: a key may be earlier than its group's earliest expiry (a refresh that
//! moved the group's deadline later leaves the key where it was) or outlive its group. Popping
//! such a key ends nothing and files the group's true deadline. A refresh of known IPs — most
//! answers — then costs no index update, and a key is never later than the lifetime it guards,
//! so no expiry is missed.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};
use std::hash::BuildHasher;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

// hashbrown: `HashTable` lets the name interner keep each name's text once; its default
// hasher is seeded per process (names and IPs come from DNS answers) and faster than SipHash.
use hashbrown::{DefaultHashBuilder, HashMap, HashSet, HashTable};

use ipnet::IpNet;
use policy::fqdn::DnsName;
use policy::labels::{Label, LabelSet, SOURCE_FQDN};
use policy::model::FqdnSelector;

use crate::index::PatternIndex;
use crate::journal::{BatchEncoder, EntryState};
use crate::persist::{
    EndpointSnapshot, IpSnapshot, NameSnapshot, Snapshot, SnapshotChunk, ZombieSnapshot,
};
use crate::time::Timestamp;

/// An endpoint, by the numeric id the policy engine gives it.
pub type EndpointId = u16;

/// Tunables, from the agent's `dns:` configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// `minTTL`: learned IPs live at least this many seconds. Applied here, so callers pass
    /// the answer's own TTL (the smallest along the CNAME chain).
    pub min_ttl: u32,
    /// `maxIPsPerHostname`: per endpoint and name; the earliest-expiring IPs are evicted
    /// first. 0 means no limit.
    pub max_ips_per_hostname: usize,
    /// How often a zombie's connection is asked about again (seconds, at least 1). The
    /// connection source may also report closes sooner through
    /// [`FqdnCache::recheck_zombies`].
    pub zombie_recheck_secs: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            min_ttl: 0,
            max_ips_per_hostname: 1000,
            zombie_recheck_secs: 5,
        }
    }
}

/// One allowed DNS answer, as the proxy extracted it.
#[derive(Debug, Clone, Copy)]
pub struct Answer<'a> {
    pub endpoint: EndpointId,
    /// The question's name.
    pub qname: &'a DnsName,
    /// The CNAME targets followed from the question, in order (may be empty).
    pub chain: &'a [DnsName],
    /// A and AAAA addresses at the end of the chain, plus SVCB/HTTPS address hints.
    pub ips: &'a [IpAddr],
    /// The smallest TTL along the chain, in seconds (`minTTL` is applied by the cache).
    pub ttl: u32,
}

/// Whether an endpoint has an open connection to an IP. The eBPF datapath answers from its
/// connection-tracking map; the user-space datapath has none ([`NoConnections`]).
/// A set of `(endpoint, ip)` pairs pushed by the datapath works too.
pub trait ConnectionSource {
    fn is_alive(&self, endpoint: EndpointId, ip: IpAddr) -> bool;
}

/// No connection is ever open: IPs go the moment their last lifetime ends.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoConnections;

impl ConnectionSource for NoConnections {
    fn is_alive(&self, _: EndpointId, _: IpAddr) -> bool {
        false
    }
}

impl ConnectionSource for std::collections::HashSet<(EndpointId, IpAddr)> {
    fn is_alive(&self, endpoint: EndpointId, ip: IpAddr) -> bool {
        self.contains(&(endpoint, ip))
    }
}

impl<F: Fn(EndpointId, IpAddr) -> bool> ConnectionSource for F {
    fn is_alive(&self, endpoint: EndpointId, ip: IpAddr) -> bool {
        self(endpoint, ip)
    }
}

/// A node-local FQDN identity as this crate names it: one per distinct set of matching
/// selectors and address family, labelled `fqdn:<selector>` for each selector plus
/// `reserved:world` and `reserved:world-ipv4` or `reserved:world-ipv6` (the family label lets
/// `toEntities: [world-ipv4]` keep selecting an IPv4 address once a `toFQDNs` rule learns
/// it, and never an IPv6 one that shares its name). The agent asks the policy engine for the numeric identity of its labels
/// (`Engine::upsert_identity`) when it is added, and keeps the mapping until it is released.
/// Handles are never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FqdnIdentity(u32);

impl FqdnIdentity {
    pub fn as_u32(self) -> u32 {
        self.0
    }
}

/// What one operation changed, for the agent to hand to the policy engine and the datapath.
///
/// Apply in field order: add identities (`Engine::upsert_identity`, whose map-state diffs go
/// to the datapath first), then ipcache upserts and deletes (`Engine::upsert_prefix` /
/// `delete_prefix`), then release identities (`Engine::release_identity`) — so the policy
/// maps know an identity before any IP carries it, and no IP carries one that is gone.
/// Upserts and deletes never name the same prefix. Batches must be applied one after another,
/// not merged.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Changes {
    pub identities_added: Vec<(FqdnIdentity, LabelSet)>,
    pub ipcache_upserts: Vec<(IpNet, FqdnIdentity)>,
    pub ipcache_deletes: Vec<IpNet>,
    pub identities_released: Vec<FqdnIdentity>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.identities_added.is_empty()
            && self.ipcache_upserts.is_empty()
            && self.ipcache_deletes.is_empty()
            && self.identities_released.is_empty()
    }
}

/// Why an IP is in the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    /// Learned from an answer whose TTL has not ended.
    Lookup,
    /// TTL ended (or evicted), kept while a connection to it is open.
    Zombie,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Lookup => "lookup",
            Source::Zombie => "zombie",
        }
    }
}

/// One row of `fqdn cache list`: the IPs of one name for one endpoint that share an expiry.
/// For zombies `expires` is when the lookup lifetime ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListEntry {
    pub endpoint: EndpointId,
    pub name: DnsName,
    pub ips: Vec<IpAddr>,
    pub expires: Timestamp,
    pub source: Source,
}

/// Counts for `status` and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub endpoints: usize,
    /// Distinct names with at least one IP (any endpoint).
    pub names: usize,
    /// Distinct IPs held under some name.
    pub ips: usize,
    /// (endpoint, name, IP) lookup entries.
    pub entries: usize,
    /// (endpoint, name, IP) zombie entries.
    pub zombies: usize,
    /// FQDN identities in use or preallocated.
    pub identities: usize,
    pub selectors: usize,
}

type NameId = u32;
type SelId = u32;
/// 0 is "no identity"; handles start at 1.
type SetId = u32;
const NO_SET: SetId = 0;
const NO_EXTRA: u32 = u32::MAX;

#[derive(Debug)]
struct NameState {
    name: DnsName,
    /// The selectors in force that match the name: an index into `Manager::sel_lists`
    /// (names share the few distinct lists; a million names must fit in little memory).
    sels: u32,
    /// (endpoint, IP) pairs holding the name, as lookups or zombies. 0 = unused.
    holds: u32,
}

/// What the manager knows about one IP: the names it is held under, each with the number
/// of endpoints holding it, and its identity. Sixteen bytes: most IPs have one name, kept
/// inline; more go to a shared slab (a million learned IPs must fit in little memory).
#[derive(Debug, Clone, Copy)]
struct IpState {
    identity: SetId,
    first_name: NameId,
    /// 0 when the IP has no name left.
    first_count: u32,
    /// Index into `Manager::extra_names`, or `NO_EXTRA`.
    extra: u32,
}

/// A map keyed by IP with the families apart, so an IPv4 key costs 4 bytes, not 17.
#[derive(Debug)]
struct IpMap<V> {
    v4: HashMap<Ipv4Addr, V>,
    v6: HashMap<Ipv6Addr, V>,
}

impl<V> Default for IpMap<V> {
    fn default() -> Self {
        IpMap {
            v4: HashMap::default(),
            v6: HashMap::default(),
        }
    }
}

impl<V> IpMap<V> {
    fn get(&self, ip: IpAddr) -> Option<&V> {
        match ip {
            IpAddr::V4(a) => self.v4.get(&a),
            IpAddr::V6(a) => self.v6.get(&a),
        }
    }
    fn get_mut(&mut self, ip: IpAddr) -> Option<&mut V> {
        match ip {
            IpAddr::V4(a) => self.v4.get_mut(&a),
            IpAddr::V6(a) => self.v6.get_mut(&a),
        }
    }
    fn get_or_insert_with(&mut self, ip: IpAddr, f: impl FnOnce() -> V) -> &mut V {
        match ip {
            IpAddr::V4(a) => self.v4.entry(a).or_insert_with(f),
            IpAddr::V6(a) => self.v6.entry(a).or_insert_with(f),
        }
    }
    fn remove(&mut self, ip: IpAddr) -> Option<V> {
        match ip {
            IpAddr::V4(a) => self.v4.remove(&a),
            IpAddr::V6(a) => self.v6.remove(&a),
        }
    }
    fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }
}

/// The address family of an identity: its IPs are all of one family, so that the entities
/// `world-ipv4` and `world-ipv6` select exactly the learned IPs of theirs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Family {
    V4 = 0,
    V6 = 1,
}

impl Family {
    const BOTH: [Family; 2] = [Family::V4, Family::V6];

    fn of(ip: IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    fn world_label(self) -> Label {
        Label::reserved(match self {
            Family::V4 => "world-ipv4",
            Family::V6 => "world-ipv6",
        })
    }
}

#[derive(Debug)]
struct SetState {
    family: Family,
    sels: Box<[SelId]>,
    labels: LabelSet,
    /// IPs whose identity this is.
    users: u32,
    /// A single-selector set kept while its selector is in force, so the policy maps already
    /// have its entries when the first matching answer arrives (the answer then waits only
    /// for an ipcache write).
    pinned: bool,
}

/// The IPs of one (endpoint, name) with their expiries. A boxed slice, not a `Vec`: eight
/// bytes less per group and never spare capacity (a group changes only when an answer adds
/// IPs or some expire, and is rebuilt then). Its earliest expiry is its key in the deadline
/// index (recomputed rather than stored: a million groups, eight bytes each).
type Group = Box<[(IpAddr, Timestamp)]>;

#[derive(Debug)]
struct Zombie {
    /// Names whose lifetime ended, with when it ended.
    names: Vec<(NameId, Timestamp)>,
    check_at: Timestamp,
}

#[derive(Debug, Default)]
struct EndpointState {
    groups: HashMap<NameId, Group>,
    zombies: HashMap<IpAddr, Zombie>,
}

/// Per-endpoint learned state with its deadline indexes.
#[derive(Debug, Default)]
struct Store {
    endpoints: BTreeMap<EndpointId, EndpointState>,
    expiry: BTreeSet<(Timestamp, EndpointId, NameId)>,
    zombie_checks: BTreeSet<(Timestamp, EndpointId, IpAddr)>,
}

/// The global view: names, IPs, selectors and identities.
#[derive(Debug, Default)]
struct Manager {
    names: Vec<Option<NameState>>,
    free_names: Vec<NameId>,
    /// Name text → id, storing only the id (the text lives once, in `names`).
    name_table: HashTable<NameId>,
    hasher: DefaultHashBuilder,
    /// Distinct sorted selector lists, with how many names use each; 0 is the empty list.
    sel_lists: Vec<(Box<[SelId]>, u32)>,
    sel_list_ids: HashMap<Box<[SelId]>, u32>,
    free_sel_lists: Vec<u32>,
    ips: IpMap<IpState>,
    /// Names beyond the first of IPs that have several: (name, holders).
    extra_names: Vec<Vec<(NameId, u32)>>,
    free_extra: Vec<u32>,
    selectors: BTreeMap<FqdnSelector, SelId>,
    selector_of: HashMap<SelId, FqdnSelector>,
    next_sel: SelId,
    index: PatternIndex,
    sets: HashMap<SetId, SetState>,
    /// Per family (indexed by `Family as usize`).
    set_ids: [HashMap<Box<[SelId]>, SetId>; 2],
    last_set: SetId,
    pinned: HashMap<SelId, [SetId; 2]>,
    /// With the change log on: names freed since the log was last taken, by their old id.
    /// Their ids are not handed out again until the changes naming them are encoded
    /// ([`FqdnCache::release_changes`]), so a logged id always means the same name.
    parked: Option<HashMap<NameId, DnsName>>,
    /// The parked names by their text: a name freed and learned again before the log is
    /// taken gets its old id back, so within one batch a key has one id (and the log one
    /// entry for it).
    parked_names: HashMap<DnsName, NameId>,
}

/// What one operation touched; turned into [`Changes`] at its end.
#[derive(Debug, Default)]
struct Tx {
    touched: HashSet<IpAddr>,
    created: Vec<SetId>,
    maybe_unused: Vec<SetId>,
    maybe_free_names: Vec<NameId>,
}

/// Changes to the learned state since the log was last taken, for the journal: what it
/// appends each second, so persisting costs what changed, not what is cached.
///
/// Two parts: the (endpoint, name) pairs whose lookups were learned or moved later — the
/// batch records their lookups as they are when encoded, so a hot name refreshed a thousand
/// times a second costs one set insert per answer into a small table and one record per IP
/// per batch — and the (endpoint, name, IP) keys that left the lookups since (evicted,
/// cleaned, ended as a zombie, a zombie gone), with their last such state. A batch holds the
/// latter first: a key that left and was learned again (perhaps with an earlier expiry) is
/// replayed as removed, then as the lookup it is now. Within one batch a name keeps one id
/// (see `Manager::parked_names`), so each key is one entry. A plain expiry is not logged:
/// restore drops an expired lookup by its time anyway.
#[derive(Debug, Default)]
struct ChangeLog {
    groups: HashSet<(EndpointId, NameId)>,
    ends: HashMap<(EndpointId, NameId, IpAddr), EntryState>,
}

impl ChangeLog {
    /// (endpoint, name)'s lookups changed.
    fn touch(log: &mut Option<ChangeLog>, ep: EndpointId, nid: NameId) {
        if let Some(log) = log {
            log.groups.insert((ep, nid));
        }
    }

    /// (endpoint, name, IP) left the lookups, to `st` (a zombie or removed).
    fn end(log: &mut Option<ChangeLog>, ep: EndpointId, nid: NameId, ip: IpAddr, st: EntryState) {
        if let Some(log) = log {
            log.ends.insert((ep, nid, ip), st);
        }
    }
}

/// The most room a new change log keeps from the last one (entries).
const MAX_LOG_ROOM: usize = 1 << 16;

/// Changes taken out of the cache by [`FqdnCache::take_changes`], to be encoded in bounded
/// steps ([`FqdnCache::encode_changes`]) and then released ([`FqdnCache::release_changes`]).
#[derive(Debug, Default)]
pub struct PendingChanges {
    groups: hashbrown::hash_set::IntoIter<(EndpointId, NameId)>,
    ends: hashbrown::hash_map::IntoIter<(EndpointId, NameId, IpAddr), EntryState>,
    len: usize,
    /// Names freed while these changes were logged.
    parked: HashMap<NameId, DnsName>,
    /// Kept only to be freed by whoever drops this (outside the caller's lock).
    _parked_names: HashMap<DnsName, NameId>,
}

impl PendingChanges {
    /// Changes taken: (endpoint, name) pairs whose lookups changed, plus (endpoint, name,
    /// IP) keys that left the lookups.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Where [`FqdnCache::snapshot_chunk`] goes on from.
#[derive(Debug, Clone, Default)]
pub struct SnapshotCursor {
    next_name: usize,
    done: bool,
}

/// The FQDN cache and name manager. See the crate documentation for the flow.
#[derive(Debug, Default)]
pub struct FqdnCache {
    config: Config,
    store: Store,
    mgr: Manager,
    /// `None` until [`FqdnCache::enable_change_log`]: a cache nobody persists logs nothing.
    log: Option<ChangeLog>,
}

impl Manager {
    fn name(&self, nid: NameId) -> &NameState {
        self.names[nid as usize]
            .as_ref()
            .expect("a held or listed name is interned")
    }

    fn find_name(&self, name: &str) -> Option<NameId> {
        let hash = self.hasher.hash_one(name);
        let names = &self.names;
        self.name_table
            .find(hash, |&id| {
                names[id as usize]
                    .as_ref()
                    .is_some_and(|s| s.name.as_str() == name)
            })
            .copied()
    }

    fn intern(&mut self, name: &DnsName, tx: &mut Tx) -> NameId {
        match self.find_name(name.as_str()) {
            // A known name is held by something; if this operation releases its last hold,
            // `release` queues it for freeing.
            Some(nid) => nid,
            None => {
                let state = NameState {
                    name: name.clone(),
                    sels: 0,
                    holds: 0,
                };
                let matching = self.index.matches(name);
                let sels = self.acquire_sel_list(&matching);
                let state = NameState { sels, ..state };
                let revived = if self.parked_names.is_empty() {
                    None
                } else {
                    self.parked_names.remove(name)
                };
                if let (Some(nid), Some(parked)) = (revived, &mut self.parked) {
                    // Live again: not to be handed out when the log's changes are released.
                    parked.remove(&nid);
                }
                let nid = match revived.or_else(|| self.free_names.pop()) {
                    Some(nid) => {
                        self.names[nid as usize] = Some(state);
                        nid
                    }
                    None => {
                        self.names.push(Some(state));
                        u32::try_from(self.names.len() - 1).expect("fewer than 2^32 names")
                    }
                };
                let Manager {
                    names,
                    name_table,
                    hasher,
                    ..
                } = self;
                name_table.insert_unique(hasher.hash_one(name.as_str()), nid, |&id| {
                    let state = names[id as usize].as_ref().expect("tabled names are live");
                    hasher.hash_one(state.name.as_str())
                });
                // Freed at the end of the operation if nothing ends up held under it.
                tx.maybe_free_names.push(nid);
                nid
            }
        }
    }

    fn sels_of(&self, nid: NameId) -> &[SelId] {
        &self.sel_lists[self.name(nid).sels as usize].0
    }

    /// The id of a sorted selector list, counting one more user.
    fn acquire_sel_list(&mut self, sels: &[SelId]) -> u32 {
        if self.sel_lists.is_empty() {
            self.sel_lists.push((Box::default(), 0));
            self.sel_list_ids.insert(Box::default(), 0);
        }
        let id = match self.sel_list_ids.get(sels) {
            Some(&id) => id,
            None => {
                let id = match self.free_sel_lists.pop() {
                    Some(id) => {
                        self.sel_lists[id as usize] = (sels.into(), 0);
                        id
                    }
                    None => {
                        self.sel_lists.push((sels.into(), 0));
                        u32::try_from(self.sel_lists.len() - 1).expect("list ids fit")
                    }
                };
                self.sel_list_ids.insert(sels.into(), id);
                id
            }
        };
        self.sel_lists[id as usize].1 += 1;
        id
    }

    fn release_sel_list(&mut self, id: u32) {
        let entry = &mut self.sel_lists[id as usize];
        entry.1 -= 1;
        if entry.1 == 0 && id != 0 {
            let list = std::mem::take(&mut entry.0);
            self.sel_list_ids.remove(&list);
            self.free_sel_lists.push(id);
        }
    }

    fn free_name(&mut self, nid: NameId) {
        let hash = self.hasher.hash_one(self.name(nid).name.as_str());
        if let Ok(entry) = self.name_table.find_entry(hash, |&id| id == nid) {
            entry.remove();
        }
        let state = self.names[nid as usize].take().expect("live name");
        self.release_sel_list(state.sels);
        match &mut self.parked {
            Some(parked) => {
                self.parked_names.insert(state.name.clone(), nid);
                parked.insert(nid, state.name);
            }
            None => self.free_names.push(nid),
        }
    }

    /// The names an IP is held under.
    fn ip_names<'a>(&'a self, state: &'a IpState) -> impl Iterator<Item = NameId> + 'a {
        let first = (state.first_count > 0).then_some(state.first_name);
        let extra: &[(NameId, u32)] = if state.extra == NO_EXTRA {
            &[]
        } else {
            &self.extra_names[state.extra as usize]
        };
        first.into_iter().chain(extra.iter().map(|(n, _)| *n))
    }

    /// One more endpoint holds (name, ip).
    fn hold(&mut self, nid: NameId, ip: IpAddr, tx: &mut Tx) {
        self.names[nid as usize].as_mut().expect("interned").holds += 1;
        let state = self.ips.get_or_insert_with(ip, || IpState {
            identity: NO_SET,
            first_name: nid,
            first_count: 0,
            extra: NO_EXTRA,
        });
        if state.first_count == 0 {
            state.first_name = nid;
            state.first_count = 1;
            tx.touched.insert(ip);
            return;
        }
        if state.first_name == nid {
            state.first_count += 1;
            return;
        }
        if state.extra == NO_EXTRA {
            state.extra = match self.free_extra.pop() {
                Some(i) => i,
                None => {
                    self.extra_names.push(Vec::new());
                    u32::try_from(self.extra_names.len() - 1).expect("slab index fits")
                }
            };
        }
        let extra = &mut self.extra_names[state.extra as usize];
        match extra.iter_mut().find(|(n, _)| *n == nid) {
            Some((_, count)) => *count += 1,
            None => {
                extra.push((nid, 1));
                tx.touched.insert(ip);
            }
        }
    }

    /// One endpoint no longer holds (name, ip).
    fn release(&mut self, nid: NameId, ip: IpAddr, tx: &mut Tx) {
        let name = self.names[nid as usize].as_mut().expect("interned");
        name.holds -= 1;
        if name.holds == 0 {
            tx.maybe_free_names.push(nid);
        }
        let state = self.ips.get_mut(ip).expect("released IP was held");
        let gone = if state.first_count > 0 && state.first_name == nid {
            state.first_count -= 1;
            if state.first_count == 0 && state.extra != NO_EXTRA {
                // Keep the first slot filled while the IP has names.
                let extra = &mut self.extra_names[state.extra as usize];
                let (n, c) = extra.pop().expect("slab entries are never empty");
                state.first_name = n;
                state.first_count = c;
                if extra.is_empty() {
                    self.free_extra.push(state.extra);
                    state.extra = NO_EXTRA;
                }
                true
            } else {
                state.first_count == 0
            }
        } else {
            let slot = state.extra;
            let extra = &mut self.extra_names[slot as usize];
            let i = extra
                .iter()
                .position(|(n, _)| *n == nid)
                .expect("released name was held");
            extra[i].1 -= 1;
            let gone = extra[i].1 == 0;
            if gone {
                extra.swap_remove(i);
                if extra.is_empty() {
                    extra.shrink_to_fit();
                    self.free_extra.push(slot);
                    state.extra = NO_EXTRA;
                }
            }
            gone
        };
        if gone {
            tx.touched.insert(ip);
        }
    }

    fn set_for(&mut self, family: Family, sels: &[SelId], tx: &mut Tx) -> SetId {
        if let Some(&id) = self.set_ids[family as usize].get(sels) {
            return id;
        }
        self.last_set = self.last_set.checked_add(1).expect("identity handles left");
        let id = self.last_set;
        let mut labels: Vec<Label> = sels
            .iter()
            .map(|s| Label::new(SOURCE_FQDN, &self.selector_of[s].label_value(), ""))
            .collect();
        labels.push(Label::reserved("world"));
        labels.push(family.world_label());
        self.sets.insert(
            id,
            SetState {
                family,
                sels: sels.into(),
                labels: LabelSet::new(labels),
                users: 0,
                pinned: false,
            },
        );
        self.set_ids[family as usize].insert(sels.into(), id);
        tx.created.push(id);
        id
    }

    fn finish(&mut self, mut tx: Tx) -> Changes {
        let mut changes = Changes::default();
        tx.maybe_free_names.sort_unstable();
        tx.maybe_free_names.dedup();
        for nid in tx.maybe_free_names.drain(..) {
            let unused = self.names[nid as usize]
                .as_ref()
                .is_some_and(|s| s.holds == 0);
            if unused {
                self.free_name(nid);
            }
        }
        let mut touched: Vec<IpAddr> = tx.touched.drain().collect();
        touched.sort_unstable();
        let mut sels: Vec<SelId> = Vec::new();
        for ip in touched {
            let Some(&state) = self.ips.get(ip) else {
                continue;
            };
            sels.clear();
            for nid in self.ip_names(&state) {
                sels.extend_from_slice(self.sels_of(nid));
            }
            sels.sort_unstable();
            sels.dedup();
            let old = state.identity;
            let new = if sels.is_empty() {
                NO_SET
            } else {
                self.set_for(Family::of(ip), &sels, &mut tx)
            };
            if old != new {
                self.ips.get_mut(ip).expect("present").identity = new;
                if old != NO_SET {
                    self.sets.get_mut(&old).expect("in use").users -= 1;
                    tx.maybe_unused.push(old);
                }
                if new != NO_SET {
                    self.sets.get_mut(&new).expect("created").users += 1;
                    changes
                        .ipcache_upserts
                        .push((IpNet::from(ip), FqdnIdentity(new)));
                } else {
                    changes.ipcache_deletes.push(IpNet::from(ip));
                }
            }
            if state.first_count == 0 {
                self.ips.remove(ip);
            }
        }
        for &id in &tx.created {
            let set = &self.sets[&id];
            if set.users > 0 || set.pinned {
                changes
                    .identities_added
                    .push((FqdnIdentity(id), set.labels.clone()));
            }
        }
        tx.maybe_unused.sort_unstable();
        tx.maybe_unused.dedup();
        for id in tx.maybe_unused {
            let unused = self
                .sets
                .get(&id)
                .is_some_and(|s| s.users == 0 && !s.pinned);
            if unused {
                let set = self.sets.remove(&id).expect("checked");
                self.set_ids[set.family as usize].remove(&set.sels);
                // Handles only grow, so `created` is sorted.
                if tx.created.binary_search(&id).is_err() {
                    changes.identities_released.push(FqdnIdentity(id));
                }
            }
        }
        // Sets created and dropped within this operation never reach the agent.
        changes
            .identities_added
            .retain(|(id, _)| self.sets.contains_key(&id.0));
        changes
    }
}

fn deadline_of(group: &Group) -> Option<Timestamp> {
    group.iter().map(|(_, e)| *e).min()
}

impl Store {
    /// The lifetime of (endpoint, name, ip) under a lookup ended at `ended`: the IP becomes a
    /// zombie if a connection to it is open, else the hold goes.
    #[allow(clippy::too_many_arguments)]
    fn end_lifetime(
        zombies: &mut HashMap<IpAddr, Zombie>,
        zombie_checks: &mut BTreeSet<(Timestamp, EndpointId, IpAddr)>,
        mgr: &mut Manager,
        tx: &mut Tx,
        (ep, nid, ip): (EndpointId, NameId, IpAddr),
        ended: Timestamp,
        now: Timestamp,
        recheck: u32,
        conns: &dyn ConnectionSource,
    ) -> bool {
        if conns.is_alive(ep, ip) {
            // The hold passes from the lookup to the zombie.
            let zombie = zombies.entry(ip).or_insert_with(|| {
                let check_at = now.add_secs(recheck);
                zombie_checks.insert((check_at, ep, ip));
                Zombie {
                    names: Vec::new(),
                    check_at,
                }
            });
            zombie.names.push((nid, ended));
            true
        } else {
            mgr.release(nid, ip, tx);
            false
        }
    }
}

impl FqdnCache {
    pub fn new(config: Config) -> FqdnCache {
        FqdnCache {
            config,
            ..FqdnCache::default()
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    fn recheck_secs(&self) -> u32 {
        self.config.zombie_recheck_secs.max(1)
    }

    /// Files an allowed answer: its IPs under the question's name and under every name of the
    /// CNAME chain, for `max(ttl, minTTL)` seconds from `now`. An IP already known for a name
    /// keeps the later of its two expiries. A name over `maxIPsPerHostname` loses its
    /// earliest-expiring IPs (on a tie: IPs not in this answer first, then this answer's last
    /// ones); an evicted IP with an open connection stays as a zombie.
    /// A lifetime of zero files nothing.
    pub fn learn(
        &mut self,
        answer: &Answer<'_>,
        now: Timestamp,
        conns: &dyn ConnectionSource,
    ) -> Changes {
        let expires = now.add_secs(answer.ttl.max(self.config.min_ttl));
        if expires <= now || answer.ips.is_empty() {
            return Changes::default();
        }
        let mut entries: Vec<(IpAddr, Timestamp)> = Vec::with_capacity(answer.ips.len());
        if answer.ips.len() <= 16 {
            for &ip in answer.ips {
                if !entries.iter().any(|(i, _)| *i == ip) {
                    entries.push((ip, expires));
                }
            }
        } else {
            let mut seen = HashSet::with_capacity(answer.ips.len());
            for &ip in answer.ips {
                if seen.insert(ip) {
                    entries.push((ip, expires));
                }
            }
        }
        let mut tx = Tx::default();
        let name_at = |i: usize| match i {
            0 => answer.qname,
            i => &answer.chain[i - 1],
        };
        for i in 0..=answer.chain.len() {
            let name = name_at(i);
            // A chain that loops back names a name twice; file it once.
            if (0..i).any(|j| name_at(j) == name) {
                continue;
            }
            let nid = self.mgr.intern(name, &mut tx);
            self.file(answer.endpoint, nid, &entries, now, conns, &mut tx);
        }
        self.mgr.finish(tx)
    }

    /// Adds `entries` to (endpoint, name), evicting over the limit.
    fn file(
        &mut self,
        ep: EndpointId,
        nid: NameId,
        entries: &[(IpAddr, Timestamp)],
        now: Timestamp,
        conns: &dyn ConnectionSource,
        tx: &mut Tx,
    ) {
        let recheck = self.recheck_secs();
        let max = self.config.max_ips_per_hostname;
        let Store {
            endpoints,
            expiry,
            zombie_checks,
        } = &mut self.store;
        let mgr = &mut self.mgr;
        let log = &mut self.log;
        let EndpointState { groups, zombies } = endpoints.entry(ep).or_default();
        let slot = groups.entry(nid).or_default();
        let old_deadline = deadline_of(slot);
        let mut group: Vec<(IpAddr, Timestamp)> = std::mem::take(slot).into_vec();
        let group = &mut group;

        // Where each IP already sits in the group: a scan for small groups, a map when a
        // large answer meets a large group (so that stays linear).
        let index: Option<HashMap<IpAddr, usize>> =
            (group.len() * entries.len() > 256).then(|| {
                group
                    .iter()
                    .enumerate()
                    .map(|(i, (ip, _))| (*ip, i))
                    .collect()
            });
        let find = |ips: &[(IpAddr, Timestamp)], ip: IpAddr| match &index {
            Some(map) => map.get(&ip).copied(),
            None => ips.iter().position(|(i, _)| *i == ip),
        };
        let mut fresh: Vec<(IpAddr, Timestamp)> = Vec::new();
        let mut moved = false;
        for &(ip, exp) in entries {
            if exp <= now {
                continue;
            }
            match find(group, ip) {
                Some(i) => {
                    // A refresh that moves nothing (an upstream cache counting its TTL
                    // down) is not a change to persist.
                    if exp > group[i].1 {
                        group[i].1 = exp;
                        moved = true;
                    }
                }
                None => fresh.push((ip, exp)),
            }
        }
        // Exactly the room needed: a million entries should not carry growth slack.
        group.reserve_exact(fresh.len());
        for (ip, exp) in fresh {
            group.push((ip, exp));
            moved = true;
            // Re-learned under a name it is a zombie for: the zombie's hold becomes the
            // lookup's. Otherwise a new hold.
            let mut transferred = false;
            if let Some(zombie) = zombies.get_mut(&ip) {
                if let Some(i) = zombie.names.iter().position(|(n, _)| *n == nid) {
                    zombie.names.swap_remove(i);
                    transferred = true;
                    if zombie.names.is_empty() {
                        zombie_checks.remove(&(zombie.check_at, ep, ip));
                        zombies.remove(&ip);
                    }
                }
            }
            if transferred {
                // No longer a zombie: recorded as a removal, which its group's record (the
                // lookup, unless that too ends unrecorded by expiring) follows in the batch.
                ChangeLog::end(log, ep, nid, ip, EntryState::Removed);
            } else {
                mgr.hold(nid, ip, tx);
            }
        }

        if max > 0 && group.len() > max {
            let in_call: HashMap<IpAddr, usize> = entries
                .iter()
                .enumerate()
                .rev()
                .map(|(pos, (ip, _))| (*ip, pos))
                .collect();
            group.sort_by_key(|(ip, exp)| {
                let pos = in_call.get(ip).copied();
                (Reverse(*exp), pos.is_none(), pos.unwrap_or(usize::MAX))
            });
            for (ip, _) in group.split_off(max) {
                let zombie = Store::end_lifetime(
                    zombies,
                    zombie_checks,
                    mgr,
                    tx,
                    (ep, nid, ip),
                    now,
                    now,
                    recheck,
                    conns,
                );
                let st = if zombie {
                    EntryState::Zombie { expired: now }
                } else {
                    EntryState::Removed
                };
                ChangeLog::end(log, ep, nid, ip, st);
            }
        }

        if moved {
            ChangeLog::touch(log, ep, nid);
        }
        // The indexed key is at most `old_deadline` (see the module comment): a deadline that
        // moved later needs nothing, an earlier one (a new IP of shorter lifetime, a new
        // group) a key of its own; the older key, when it comes up, files the true deadline.
        let new_deadline = group.iter().map(|(_, e)| *e).min();
        if let Some(d) = new_deadline {
            if old_deadline.is_none_or(|old| d < old) {
                expiry.insert((d, ep, nid));
            }
        }
        if group.is_empty() {
            groups.remove(&nid);
        } else {
            *slot = std::mem::take(group).into_boxed_slice();
        }
    }

    /// When [`FqdnCache::expire`] is next to be called: no later than the earliest lookup
    /// expiry or zombie check (possibly earlier: the deadline index is lazy, and a call at a
    /// stale key only refiles it).
    pub fn next_expiry(&self) -> Option<Timestamp> {
        let lookups = self.store.expiry.first().map(|k| k.0);
        let zombies = self.store.zombie_checks.first().map(|k| k.0);
        match (lookups, zombies) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Ends every lifetime that is over at `now` (expiry ≤ now) and re-asks about zombies
    /// whose check is due. An IP with an open connection becomes (or stays) a zombie.
    pub fn expire(&mut self, now: Timestamp, conns: &dyn ConnectionSource) -> Changes {
        let recheck = self.recheck_secs();
        let mut tx = Tx::default();
        let Store {
            endpoints,
            expiry,
            zombie_checks,
        } = &mut self.store;
        let mgr = &mut self.mgr;
        let log = &mut self.log;
        while let Some(&(deadline, ep, nid)) = expiry.first() {
            if deadline > now {
                break;
            }
            expiry.pop_first();
            // A key may outlive its group (lazy index): nothing to end then.
            let Some(EndpointState { groups, zombies }) = endpoints.get_mut(&ep) else {
                continue;
            };
            let Some(slot) = groups.get_mut(&nid) else {
                continue;
            };
            let mut group = std::mem::take(slot).into_vec();
            let mut i = 0;
            while i < group.len() {
                let (ip, exp) = group[i];
                if exp <= now {
                    group.swap_remove(i);
                    let zombie = Store::end_lifetime(
                        zombies,
                        zombie_checks,
                        mgr,
                        &mut tx,
                        (ep, nid, ip),
                        exp,
                        now,
                        recheck,
                        conns,
                    );
                    // A plain expiry needs no record (restore drops it by its time).
                    if zombie {
                        ChangeLog::end(log, ep, nid, ip, EntryState::Zombie { expired: exp });
                    }
                } else {
                    i += 1;
                }
            }
            match group.iter().map(|(_, e)| *e).min() {
                Some(d) => {
                    expiry.insert((d, ep, nid));
                    *slot = group.into_boxed_slice();
                }
                None => {
                    groups.remove(&nid);
                }
            }
        }
        while let Some(&(check_at, ep, ip)) = zombie_checks.first() {
            if check_at > now {
                break;
            }
            zombie_checks.pop_first();
            let zombies = &mut endpoints.get_mut(&ep).expect("indexed endpoint").zombies;
            if conns.is_alive(ep, ip) {
                let next = now.add_secs(recheck);
                zombies.get_mut(&ip).expect("indexed zombie").check_at = next;
                zombie_checks.insert((next, ep, ip));
            } else {
                let zombie = zombies.remove(&ip).expect("indexed zombie");
                for (nid, _) in zombie.names {
                    ChangeLog::end(log, ep, nid, ip, EntryState::Removed);
                    mgr.release(nid, ip, &mut tx);
                }
            }
        }
        self.mgr.finish(tx)
    }

    /// Asks about every zombie (of one endpoint, or all) now, for a connection source that
    /// knows connections just closed (e.g. after a conntrack garbage collection).
    pub fn recheck_zombies(
        &mut self,
        endpoint: Option<EndpointId>,
        conns: &dyn ConnectionSource,
    ) -> Changes {
        let mut tx = Tx::default();
        let log = &mut self.log;
        for (&ep, state) in self.store.endpoints.iter_mut() {
            if endpoint.is_some_and(|e| e != ep) {
                continue;
            }
            let zombie_checks = &mut self.store.zombie_checks;
            let mgr = &mut self.mgr;
            state.zombies.retain(|&ip, zombie| {
                if conns.is_alive(ep, ip) {
                    return true;
                }
                zombie_checks.remove(&(zombie.check_at, ep, ip));
                for &(nid, _) in &zombie.names {
                    ChangeLog::end(log, ep, nid, ip, EntryState::Removed);
                    mgr.release(nid, ip, &mut tx);
                }
                false
            });
        }
        self.mgr.finish(tx)
    }

    /// Replaces the FQDN selectors in force (`Engine::fqdn_selectors()`). A new selector
    /// selects already-learned names at once, and its single-selector identities (one per
    /// family) are allocated even before any IP needs them; a removed one releases what only
    /// it needed.
    // FqdnSelector's order and hash are those of its text; the regex cache inside it that
    // clippy sees as mutable takes no part in them.
    #[allow(clippy::mutable_key_type)]
    pub fn set_selectors(&mut self, selectors: BTreeSet<FqdnSelector>) -> Changes {
        let mgr = &mut self.mgr;
        let removed: Vec<(FqdnSelector, SelId)> = mgr
            .selectors
            .iter()
            .filter(|(s, _)| !selectors.contains(*s))
            .map(|(s, &id)| (s.clone(), id))
            .collect();
        let added: Vec<FqdnSelector> = selectors
            .into_iter()
            .filter(|s| !mgr.selectors.contains_key(s))
            .collect();
        if removed.is_empty() && added.is_empty() {
            return Changes::default();
        }
        let mut tx = Tx::default();
        let removed_ids: HashSet<SelId> = removed.iter().map(|(_, id)| *id).collect();
        for (sel, id) in &removed {
            mgr.selectors.remove(sel);
            for set in mgr.pinned.remove(id).into_iter().flatten() {
                mgr.sets.get_mut(&set).expect("pinned set").pinned = false;
                tx.maybe_unused.push(set);
            }
        }
        let mut added_ids = Vec::with_capacity(added.len());
        for sel in added {
            let id = mgr.next_sel;
            mgr.next_sel = mgr.next_sel.checked_add(1).expect("selector ids left");
            mgr.selectors.insert(sel.clone(), id);
            mgr.selector_of.insert(id, sel);
            added_ids.push(id);
        }
        for (sel, id) in &removed {
            mgr.index.remove(*id, sel);
        }
        for &id in &added_ids {
            mgr.index.insert(id, &mgr.selector_of[&id]);
        }
        let added_index = PatternIndex::new(added_ids.iter().map(|id| (*id, &mgr.selector_of[id])));

        // One pass over the learned names, each matched against the new selectors only.
        let mut changed: HashSet<NameId> = HashSet::new();
        let mut sels: Vec<SelId> = Vec::new();
        for nid in 0..mgr.names.len() {
            let Some(state) = &mgr.names[nid] else {
                continue;
            };
            let old = state.sels;
            sels.clear();
            sels.extend(
                mgr.sel_lists[old as usize]
                    .0
                    .iter()
                    .filter(|&s| !removed_ids.contains(s)),
            );
            added_index.matches_into(&state.name, &mut sels);
            sels.sort_unstable();
            sels.dedup();
            if sels[..] != mgr.sel_lists[old as usize].0[..] {
                let new = mgr.acquire_sel_list(&sels);
                mgr.release_sel_list(old);
                mgr.names[nid].as_mut().expect("live").sels = new;
                changed.insert(nid as NameId);
            }
        }
        // The IPs held under those names, found through the endpoints' groups and zombies
        // (not by scanning every learned IP).
        if !changed.is_empty() {
            for state in self.store.endpoints.values() {
                for nid in &changed {
                    if let Some(group) = state.groups.get(nid) {
                        tx.touched.extend(group.iter().map(|(ip, _)| *ip));
                    }
                }
                for (ip, zombie) in &state.zombies {
                    if zombie.names.iter().any(|(n, _)| changed.contains(n)) {
                        tx.touched.insert(*ip);
                    }
                }
            }
        }
        for &id in &added_ids {
            let sets = Family::BOTH.map(|family| {
                let set = mgr.set_for(family, &[id], &mut tx);
                mgr.sets.get_mut(&set).expect("created").pinned = true;
                set
            });
            mgr.pinned.insert(id, sets);
        }
        let changes = mgr.finish(tx);
        for (_, id) in removed {
            mgr.selector_of.remove(&id);
        }
        changes
    }

    /// Forgets learned entries — lookups and zombies — of one endpoint or all, for names the
    /// selector matches or all. Their allows go with them.
    pub fn clean(&mut self, endpoint: Option<EndpointId>, name: Option<&FqdnSelector>) -> Changes {
        let mut tx = Tx::default();
        let mgr = &mut self.mgr;
        let Store {
            endpoints,
            expiry,
            zombie_checks,
        } = &mut self.store;
        let log = &mut self.log;
        for (&ep, state) in endpoints.iter_mut() {
            if endpoint.is_some_and(|e| e != ep) {
                continue;
            }
            let wanted =
                |mgr: &Manager, nid: NameId| name.is_none_or(|f| f.matches(&mgr.name(nid).name));
            let doomed: Vec<NameId> = state
                .groups
                .keys()
                .copied()
                .filter(|&nid| wanted(mgr, nid))
                .collect();
            for nid in doomed {
                let group = state.groups.remove(&nid).expect("listed");
                if let Some(d) = deadline_of(&group) {
                    expiry.remove(&(d, ep, nid));
                }
                for &(ip, _) in group.iter() {
                    ChangeLog::end(log, ep, nid, ip, EntryState::Removed);
                    mgr.release(nid, ip, &mut tx);
                }
            }
            state.zombies.retain(|&ip, zombie| {
                zombie.names.retain(|&(nid, _)| {
                    if wanted(mgr, nid) {
                        ChangeLog::end(log, ep, nid, ip, EntryState::Removed);
                        mgr.release(nid, ip, &mut tx);
                        false
                    } else {
                        true
                    }
                });
                if zombie.names.is_empty() {
                    zombie_checks.remove(&(zombie.check_at, ep, ip));
                    false
                } else {
                    true
                }
            });
        }
        self.mgr.finish(tx)
    }

    /// Forgets everything of an endpoint that is gone.
    pub fn remove_endpoint(&mut self, endpoint: EndpointId) -> Changes {
        let changes = self.clean(Some(endpoint), None);
        self.store.endpoints.remove(&endpoint);
        changes
    }

    /// Rows for `fqdn cache list`, sorted by endpoint, name, source, expiry.
    pub fn list(
        &self,
        endpoint: Option<EndpointId>,
        name: Option<&FqdnSelector>,
    ) -> Vec<ListEntry> {
        let mut rows: BTreeMap<(EndpointId, &DnsName, Source, Timestamp), Vec<IpAddr>> =
            BTreeMap::new();
        for (&ep, state) in &self.store.endpoints {
            if endpoint.is_some_and(|e| e != ep) {
                continue;
            }
            let wanted = |n: &DnsName| name.is_none_or(|f| f.matches(n));
            for (&nid, group) in &state.groups {
                let n = &self.mgr.name(nid).name;
                if wanted(n) {
                    for &(ip, exp) in group {
                        rows.entry((ep, n, Source::Lookup, exp))
                            .or_default()
                            .push(ip);
                    }
                }
            }
            for (&ip, zombie) in &state.zombies {
                for &(nid, ended) in &zombie.names {
                    let n = &self.mgr.name(nid).name;
                    if wanted(n) {
                        rows.entry((ep, n, Source::Zombie, ended))
                            .or_default()
                            .push(ip);
                    }
                }
            }
        }
        rows.into_iter()
            .map(|((endpoint, name, source, expires), mut ips)| {
                ips.sort_unstable();
                ListEntry {
                    endpoint,
                    name: name.clone(),
                    ips,
                    expires,
                    source,
                }
            })
            .collect()
    }

    /// The live (lookup) IPs of one endpoint's name with their expiries.
    pub fn lookup(&self, endpoint: EndpointId, name: &DnsName) -> Vec<(IpAddr, Timestamp)> {
        let Some(nid) = self.mgr.find_name(name.as_str()) else {
            return Vec::new();
        };
        self.store
            .endpoints
            .get(&endpoint)
            .and_then(|s| s.groups.get(&nid))
            .map(|g| g.to_vec())
            .unwrap_or_default()
    }

    /// Names an IP is held under (any endpoint, lookups and zombies).
    pub fn names_of(&self, ip: IpAddr) -> Vec<&DnsName> {
        self.mgr
            .ips
            .get(ip)
            .map(|s| {
                self.mgr
                    .ip_names(s)
                    .map(|n| &self.mgr.name(n).name)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The identity an IP carries in the ipcache, if its names match any selector.
    pub fn identity_of(&self, ip: IpAddr) -> Option<FqdnIdentity> {
        let id = self.mgr.ips.get(ip)?.identity;
        (id != NO_SET).then_some(FqdnIdentity(id))
    }

    /// The labels of an identity in use or preallocated.
    pub fn identity_labels(&self, id: FqdnIdentity) -> Option<&LabelSet> {
        self.mgr.sets.get(&id.0).map(|s| &s.labels)
    }

    /// Every identity in use or preallocated (unordered).
    pub fn identities(&self) -> impl Iterator<Item = (FqdnIdentity, &LabelSet)> {
        self.mgr
            .sets
            .iter()
            .map(|(&id, s)| (FqdnIdentity(id), &s.labels))
    }

    /// The selectors in force that match a name (through the index).
    pub fn selectors_matching(&self, name: &DnsName) -> Vec<&FqdnSelector> {
        self.mgr
            .index
            .matches(name)
            .into_iter()
            .map(|id| &self.mgr.selector_of[&id])
            .collect()
    }

    pub fn stats(&self) -> Stats {
        let mut stats = Stats {
            endpoints: self.store.endpoints.len(),
            names: self.mgr.name_table.len(),
            ips: self.mgr.ips.len(),
            identities: self.mgr.sets.len(),
            selectors: self.mgr.selectors.len(),
            ..Stats::default()
        };
        for state in self.store.endpoints.values() {
            stats.entries += state.groups.values().map(|g| g.len()).sum::<usize>();
            stats.zombies += state.zombies.values().map(|z| z.names.len()).sum::<usize>();
        }
        stats
    }

    /// The learned state for persistence. `endpoint_key` names each endpoint in a way that
    /// survives a restart (the configured endpoint name); endpoints without one are skipped.
    pub fn snapshot(&self, endpoint_key: impl Fn(EndpointId) -> Option<String>) -> Snapshot {
        let mut endpoints = Vec::new();
        for (&ep, state) in &self.store.endpoints {
            let Some(key) = endpoint_key(ep) else {
                continue;
            };
            let mut names: Vec<NameSnapshot> = state
                .groups
                .iter()
                .map(|(&nid, g)| {
                    let mut ips: Vec<IpSnapshot> = g
                        .iter()
                        .map(|&(ip, expires)| IpSnapshot { ip, expires })
                        .collect();
                    ips.sort_by_key(|e| e.ip);
                    NameSnapshot {
                        name: self.mgr.name(nid).name.as_str().to_string(),
                        ips,
                    }
                })
                .collect();
            names.sort_by(|a, b| a.name.cmp(&b.name));
            let mut zombies: Vec<ZombieSnapshot> = state
                .zombies
                .iter()
                .flat_map(|(&ip, z)| z.names.iter().map(move |&(nid, ended)| (ip, nid, ended)))
                .map(|(ip, nid, ended)| ZombieSnapshot {
                    ip,
                    name: self.mgr.name(nid).name.as_str().to_string(),
                    expired: ended,
                })
                .collect();
            zombies.sort_by(|a, b| (&a.name, a.ip).cmp(&(&b.name, b.ip)));
            if names.is_empty() && zombies.is_empty() {
                continue;
            }
            endpoints.push(EndpointSnapshot {
                endpoint: key,
                names,
                zombies,
            });
        }
        endpoints.sort_by(|a, b| a.endpoint.cmp(&b.endpoint));
        Snapshot::new(endpoints)
    }

    /// Starts logging changes for the journal (the agent does, once restored). From then
    /// on the log must be taken ([`FqdnCache::take_changes`]) regularly: it holds one entry
    /// per (endpoint, name, IP) changed since it was last taken.
    pub fn enable_change_log(&mut self) {
        if self.log.is_none() {
            self.log = Some(ChangeLog::default());
            self.mgr.parked = Some(HashMap::new());
        }
    }

    /// Takes the changes logged so far, leaving an empty log. Constant time, whatever was
    /// logged: the entries are encoded afterwards, in steps.
    pub fn take_changes(&mut self) -> PendingChanges {
        let Some(log) = &mut self.log else {
            return PendingChanges::default();
        };
        // The next log starts with room for as many changes as this one held (up to a
        // second's worth under heavy load): growing it from nothing would rehash it, under
        // the caller's lock, in the middle of a learn. Capped, because a one-off burst (a
        // restore, a clean of everything) must not leave a huge sparse table behind.
        let ChangeLog { groups, ends } = std::mem::replace(
            log,
            ChangeLog {
                groups: HashSet::with_capacity(log.groups.len().min(MAX_LOG_ROOM)),
                ends: HashMap::with_capacity(log.ends.len().min(MAX_LOG_ROOM)),
            },
        );
        PendingChanges {
            len: groups.len() + ends.len(),
            groups: groups.into_iter(),
            ends: ends.into_iter(),
            parked: self
                .mgr
                .parked
                .as_mut()
                .map(std::mem::take)
                .unwrap_or_default(),
            _parked_names: std::mem::take(&mut self.mgr.parked_names),
        }
    }

    /// Encodes about `max` more records of the taken changes into `out` (a changed
    /// (endpoint, name) gives one record per lookup it holds now). Returns true once all are
    /// encoded. Cost: O(`max`) — the caller's lock need not be held for long.
    pub fn encode_changes(
        &self,
        pending: &mut PendingChanges,
        max: usize,
        out: &mut BatchEncoder,
    ) -> bool {
        // The id still names the same name: ids freed since the change was logged are
        // parked (in `pending` if freed before the take, in the cache's log if after).
        let name_of = |parked: &HashMap<NameId, DnsName>, nid: NameId| -> Option<String> {
            self.mgr.names[nid as usize]
                .as_ref()
                .map(|s| &s.name)
                .or_else(|| parked.get(&nid))
                .or_else(|| self.mgr.parked.as_ref().and_then(|p| p.get(&nid)))
                .map(|n| n.as_str().to_string())
        };
        let mut budget = max;
        // Keys that left the lookups first, then the changed groups' lookups as they are
        // now: a key in both (left, then learned again) is replayed as removed, then as the
        // lookup it is, whatever its expiry was before.
        while budget > 0 {
            let Some(((ep, nid, ip), st)) = pending.ends.next() else {
                break;
            };
            budget -= 1;
            let name = name_of(&pending.parked, nid);
            debug_assert!(name.is_some(), "a logged name id is live or parked");
            if let Some(name) = name {
                out.push(ep, &name, ip, st);
            }
        }
        while budget > 0 {
            let Some((ep, nid)) = pending.groups.next() else {
                break;
            };
            budget -= 1;
            // Gone since (expired, cleaned: the latter is in `ends`): nothing to record.
            let Some(state) = &self.mgr.names[nid as usize] else {
                continue;
            };
            let Some(group) = self
                .store
                .endpoints
                .get(&ep)
                .and_then(|s| s.groups.get(&nid))
            else {
                continue;
            };
            for &(ip, expires) in group.iter() {
                out.push(ep, state.name.as_str(), ip, EntryState::Lookup { expires });
            }
            budget = budget.saturating_sub(group.len());
        }
        pending.groups.len() == 0 && pending.ends.len() == 0
    }

    /// Returns the ids of names freed while `pending` was logged, once its changes are
    /// encoded (or given up on).
    pub fn release_changes(&mut self, pending: &mut PendingChanges) {
        self.mgr
            .free_names
            .extend(pending.parked.drain().map(|(nid, _)| nid));
    }

    /// One step of a snapshot taken while the cache keeps changing: copies into `out` the
    /// lookups (those alive at `now`) of the next names, up to about `max_entries`, and
    /// after the last name every zombie. Returns true when the snapshot is complete.
    ///
    /// A name learned, changed or forgotten after the step that passed it is missed or
    /// stale: the steps are for a compaction, whose journal logs every change from before
    /// the first step, and replaying it over the result gives the state at its end.
    pub fn snapshot_chunk(
        &self,
        cursor: &mut SnapshotCursor,
        max_entries: usize,
        now: Timestamp,
        out: &mut SnapshotChunk,
    ) -> bool {
        if cursor.done {
            return true;
        }
        let names = &self.mgr.names;
        while cursor.next_name < names.len() && out.entries() < max_entries {
            let nid = cursor.next_name as NameId;
            cursor.next_name += 1;
            let Some(state) = &names[nid as usize] else {
                continue;
            };
            let mut text = None;
            for (&ep, st) in &self.store.endpoints {
                let Some(group) = st.groups.get(&nid) else {
                    continue;
                };
                let start = out.ips.len();
                out.ips.extend(
                    group
                        .iter()
                        .filter(|(_, exp)| *exp > now)
                        .map(|&(ip, expires)| IpSnapshot { ip, expires }),
                );
                if out.ips.len() == start {
                    continue;
                }
                let name = *text.get_or_insert_with(|| out.push_name(state.name.as_str()));
                let ips = (start as u32, (out.ips.len() - start) as u32);
                out.groups.push((ep, name, ips));
            }
        }
        if cursor.next_name < names.len() {
            return false;
        }
        for (&ep, st) in &self.store.endpoints {
            for (&ip, zombie) in &st.zombies {
                for &(nid, ended) in &zombie.names {
                    let name = out.push_name(self.mgr.name(nid).name.as_str());
                    out.zombies.push((ep, name, ip, ended));
                }
            }
        }
        cursor.done = true;
        true
    }

    /// Takes back a persisted state (before the proxy answers its first query). Entries
    /// expired at `now` are dropped; endpoints `resolve` does not know are skipped; the limit
    /// per name applies. Zombies come back as zombies to be re-checked at the first
    /// [`FqdnCache::expire`] (their connections may have ended while the agent was down).
    pub fn restore(
        &mut self,
        snapshot: &Snapshot,
        resolve: impl Fn(&str) -> Option<EndpointId>,
        now: Timestamp,
    ) -> Changes {
        let mut tx = Tx::default();
        let mut entries: Vec<(IpAddr, Timestamp)> = Vec::new();
        for ep_snap in &snapshot.endpoints {
            let Some(ep) = resolve(&ep_snap.endpoint) else {
                continue;
            };
            for name_snap in &ep_snap.names {
                entries.clear();
                entries.extend(
                    name_snap
                        .ips
                        .iter()
                        .filter(|e| e.expires > now)
                        .map(|e| (e.ip, e.expires)),
                );
                if entries.is_empty() {
                    continue;
                }
                let nid = self.mgr.intern(&DnsName::new(&name_snap.name), &mut tx);
                self.file(ep, nid, &entries, now, &NoConnections, &mut tx);
            }
            for z in &ep_snap.zombies {
                let nid = self.mgr.intern(&DnsName::new(&z.name), &mut tx);
                let state = self.store.endpoints.entry(ep).or_default();
                let live = state
                    .groups
                    .get(&nid)
                    .is_some_and(|g| g.iter().any(|(ip, _)| *ip == z.ip));
                let zombie = state.zombies.entry(z.ip).or_insert_with(|| {
                    self.store.zombie_checks.insert((now, ep, z.ip));
                    Zombie {
                        names: Vec::new(),
                        check_at: now,
                    }
                });
                if live || zombie.names.iter().any(|(n, _)| *n == nid) {
                    if zombie.names.is_empty() {
                        self.store.zombie_checks.remove(&(now, ep, z.ip));
                        state.zombies.remove(&z.ip);
                    }
                    continue;
                }
                zombie.names.push((nid, z.expired));
                ChangeLog::end(
                    &mut self.log,
                    ep,
                    nid,
                    z.ip,
                    EntryState::Zombie { expired: z.expired },
                );
                self.mgr.hold(nid, z.ip, &mut tx);
            }
        }
        self.mgr.finish(tx)
    }
}
