//! The cache's emitted changes, applied in order, always leave the ipcache and identities
//! that a plain model of the learned entries calls for.
// FqdnSelector orders and hashes by its text; clippy sees the regex cache inside it.
#![allow(clippy::mutable_key_type)]

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use fqdn_cache::{Answer, Changes, Config, FqdnCache, FqdnIdentity, NoConnections, Timestamp};
use ipnet::IpNet;
use policy::fqdn::{DnsName, FqdnPattern};
use policy::labels::{Label, LabelSet};
use policy::model::FqdnSelector;
use proptest::prelude::*;

const NAMES: &[&str] = &[
    "a.example.com.",
    "b.example.com.",
    "x.a.example.com.",
    "example.com.",
    "bb.example.org.",
    "c.example.org.",
];

fn selector_pool() -> Vec<FqdnSelector> {
    let p = |s: &str| FqdnSelector::MatchPattern(FqdnPattern::parse(s).unwrap());
    vec![
        p("*.example.com"),
        p("**.example.com"),
        FqdnSelector::MatchName(DnsName::parse_match_name("a.example.com").unwrap()),
        p("*"),
        p("b*.example.org"),
    ]
}

#[derive(Debug, Clone)]
enum Op {
    Learn {
        ep: u16,
        name: usize,
        chain: Option<usize>,
        ips: Vec<u8>,
        ttl: u32,
    },
    Advance(u64),
    Select(Vec<bool>),
    Clean(Option<u16>, Option<usize>),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0u16..3, 0..NAMES.len(), prop::option::of(0..NAMES.len()),
              prop::collection::vec(0u8..6, 1..4), 0u32..20)
            .prop_map(|(ep, name, chain, ips, ttl)| Op::Learn { ep, name, chain, ips, ttl }),
        3 => (0u64..12_000).prop_map(Op::Advance),
        1 => prop::collection::vec(any::<bool>(), 5).prop_map(Op::Select),
        1 => (prop::option::of(0u16..3), prop::option::of(0..NAMES.len()))
            .prop_map(|(e, n)| Op::Clean(e, n)),
    ]
}

fn addr(i: u8) -> IpAddr {
    if i.is_multiple_of(2) {
        IpAddr::from([192, 0, 2, i])
    } else {
        format!("2001:db8::{i}").parse().unwrap()
    }
}

#[derive(Default)]
struct Applied {
    ipcache: HashMap<IpNet, FqdnIdentity>,
    identities: HashMap<FqdnIdentity, LabelSet>,
}

impl Applied {
    fn apply(&mut self, ch: Changes) -> Result<(), TestCaseError> {
        for (id, labels) in ch.identities_added {
            prop_assert!(self.identities.insert(id, labels).is_none(), "added twice");
        }
        let mut seen = BTreeSet::new();
        for (net, id) in ch.ipcache_upserts {
            prop_assert!(
                self.identities.contains_key(&id),
                "upsert to unknown identity"
            );
            prop_assert!(seen.insert(net));
            self.ipcache.insert(net, id);
        }
        for net in ch.ipcache_deletes {
            prop_assert!(seen.insert(net), "upsert and delete of one prefix");
            prop_assert!(
                self.ipcache.remove(&net).is_some(),
                "delete of absent prefix"
            );
        }
        for id in ch.identities_released {
            prop_assert!(self.identities.remove(&id).is_some(), "release of unknown");
            prop_assert!(!self.ipcache.values().any(|&v| v == id), "released in use");
        }
        Ok(())
    }
}

fn labels_for(selectors: &[&FqdnSelector], v6: bool) -> LabelSet {
    let mut l: Vec<Label> = selectors
        .iter()
        .map(|s| Label::new("fqdn", &s.label_value(), ""))
        .collect();
    l.push(Label::reserved("world"));
    l.push(Label::reserved(if v6 {
        "world-ipv6"
    } else {
        "world-ipv4"
    }));
    LabelSet::new(l)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn changes_track_the_model(ops in prop::collection::vec(op(), 1..40)) {
        let pool = selector_pool();
        let mut cache = FqdnCache::new(Config { min_ttl: 0, max_ips_per_hostname: 0, zombie_recheck_secs: 5 });
        let mut applied = Applied::default();
        let mut model: HashMap<(u16, usize, IpAddr), u64> = HashMap::new();
        let mut selected: Vec<bool> = vec![false; pool.len()];
        let mut now = 1_000_000u64;
        for op in ops {
            match op {
                Op::Learn { ep, name, chain, ips, ttl } => {
                    let qname = DnsName::new(NAMES[name]);
                    let chain: Vec<DnsName> = chain.map(|c| DnsName::new(NAMES[c])).into_iter().collect();
                    let ips: Vec<IpAddr> = ips.into_iter().map(addr).collect();
                    let ch = cache.learn(&Answer { endpoint: ep, qname: &qname, chain: &chain, ips: &ips, ttl },
                        Timestamp::from_unix_millis(now), &NoConnections);
                    applied.apply(ch)?;
                    if ttl > 0 {
                        let exp = now + u64::from(ttl) * 1000;
                        let names: BTreeSet<usize> = std::iter::once(name)
                            .chain(chain.iter().map(|c| NAMES.iter().position(|n| *n == c.as_str()).unwrap()))
                            .collect();
                        for n in names {
                            for &ip in &ips {
                                let e = model.entry((ep, n, ip)).or_insert(0);
                                *e = (*e).max(exp);
                            }
                        }
                    }
                }
                Op::Advance(ms) => {
                    now += ms;
                    applied.apply(cache.expire(Timestamp::from_unix_millis(now), &NoConnections))?;
                    model.retain(|_, &mut exp| exp > now);
                }
                Op::Select(mask) => {
                    selected = mask;
                    let set: BTreeSet<FqdnSelector> = pool.iter().zip(&selected)
                        .filter(|(_, &on)| on).map(|(s, _)| s.clone()).collect();
                    applied.apply(cache.set_selectors(set))?;
                }
                Op::Clean(ep, name) => {
                    let filter = name.map(|n| FqdnSelector::MatchName(DnsName::new(NAMES[n])));
                    applied.apply(cache.clean(ep, filter.as_ref()))?;
                    model.retain(|&(e, n, _), _| !(ep.is_none_or(|x| x == e) && name.is_none_or(|x| x == n)));
                }
            }
            // The ipcache holds exactly the IPs whose names some selector matches, each with
            // the identity of exactly those selectors.
            let active: Vec<&FqdnSelector> = pool.iter().zip(&selected).filter(|(_, &on)| on).map(|(s, _)| s).collect();
            let mut expected: HashMap<IpNet, LabelSet> = HashMap::new();
            let mut ips: HashMap<IpAddr, BTreeSet<usize>> = HashMap::new();
            for &(_, n, ip) in model.keys() {
                ips.entry(ip).or_default().insert(n);
            }
            for (ip, names) in &ips {
                let matching: Vec<&FqdnSelector> = active.iter().copied()
                    .filter(|s| names.iter().any(|&n| s.matches(&DnsName::new(NAMES[n])))).collect();
                if !matching.is_empty() {
                    expected.insert(IpNet::from(*ip), labels_for(&matching, ip.is_ipv6()));
                }
            }
            let actual: HashMap<IpNet, LabelSet> = applied.ipcache.iter()
                .map(|(net, id)| (*net, applied.identities[id].clone())).collect();
            prop_assert_eq!(&actual, &expected);
            // Identities: those in use plus one preallocated per selector, nothing leaked.
            let mut wanted: BTreeSet<LabelSet> = expected.values().cloned().collect();
            wanted.extend(active.iter().map(|s| labels_for(&[s], false)));
            wanted.extend(active.iter().map(|s| labels_for(&[s], true)));
            let have: BTreeSet<LabelSet> = applied.identities.values().cloned().collect();
            prop_assert_eq!(have.len(), applied.identities.len(), "one identity per label set");
            prop_assert_eq!(have, wanted);
            prop_assert_eq!(cache.stats().entries, model.len());
            // The deadline index is lazy: the next call may come early (and end nothing), never
            // late. That no lifetime outlasts its expiry is checked by the model at each step.
            if let Some(&earliest) = model.values().min() {
                let next = cache.next_expiry().map(|t| t.as_unix_millis());
                prop_assert!(next.is_some_and(|n| n <= earliest), "next {:?}, earliest {}", next, earliest);
            }
        }
    }
}

#[derive(Debug, Clone)]
enum ZOp {
    Learn {
        ep: u16,
        name: usize,
        chain: Option<usize>,
        ips: Vec<u8>,
        ttl: u32,
    },
    Advance(u64),
    Select(Vec<bool>),
    Clean(Option<u16>, Option<usize>),
    /// Opens or closes the connection of (endpoint, ip).
    Connection(u16, u8, bool),
    Recheck(Option<u16>),
}

fn zop() -> impl Strategy<Value = ZOp> {
    prop_oneof![
        5 => (0u16..3, 0..NAMES.len(), prop::option::of(0..NAMES.len()),
              prop::collection::vec(0u8..6, 1..5), 0u32..20)
            .prop_map(|(ep, name, chain, ips, ttl)| ZOp::Learn { ep, name, chain, ips, ttl }),
        3 => (0u64..12_000).prop_map(ZOp::Advance),
        1 => prop::collection::vec(any::<bool>(), 5).prop_map(ZOp::Select),
        1 => (prop::option::of(0u16..3), prop::option::of(0..NAMES.len()))
            .prop_map(|(e, n)| ZOp::Clean(e, n)),
        3 => (0u16..3, 0u8..6, any::<bool>()).prop_map(|(e, i, open)| ZOp::Connection(e, i, open)),
        1 => prop::option::of(0u16..3).prop_map(ZOp::Recheck),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// With zombies and `maxIPsPerHostname` in play, the applied changes always match what
    /// the cache itself lists (lookups and zombies), and when every connection closes and
    /// every TTL ends nothing is left but the preallocated identities.
    #[test]
    fn changes_track_the_listed_state(ops in prop::collection::vec(zop(), 1..50)) {
        let pool = selector_pool();
        let mut cache = FqdnCache::new(Config { min_ttl: 0, max_ips_per_hostname: 2, zombie_recheck_secs: 5 });
        let mut applied = Applied::default();
        let mut open: std::collections::HashSet<(u16, IpAddr)> = Default::default();
        let mut selected: Vec<bool> = vec![false; pool.len()];
        let mut now = 1_000_000u64;
        for op in ops {
            let t = Timestamp::from_unix_millis(now);
            match op {
                ZOp::Learn { ep, name, chain, ips, ttl } => {
                    let qname = DnsName::new(NAMES[name]);
                    let chain: Vec<DnsName> = chain.map(|c| DnsName::new(NAMES[c])).into_iter().collect();
                    let ips: Vec<IpAddr> = ips.into_iter().map(addr).collect();
                    applied.apply(cache.learn(&Answer { endpoint: ep, qname: &qname, chain: &chain, ips: &ips, ttl }, t, &open))?;
                }
                ZOp::Advance(ms) => {
                    now += ms;
                    applied.apply(cache.expire(Timestamp::from_unix_millis(now), &open))?;
                }
                ZOp::Select(mask) => {
                    selected = mask;
                    let set: BTreeSet<FqdnSelector> = pool.iter().zip(&selected)
                        .filter(|(_, &on)| on).map(|(s, _)| s.clone()).collect();
                    applied.apply(cache.set_selectors(set))?;
                }
                ZOp::Clean(ep, name) => {
                    let filter = name.map(|n| FqdnSelector::MatchName(DnsName::new(NAMES[n])));
                    applied.apply(cache.clean(ep, filter.as_ref()))?;
                }
                ZOp::Connection(ep, i, is_open) => {
                    if is_open { open.insert((ep, addr(i))); } else { open.remove(&(ep, addr(i))); }
                }
                ZOp::Recheck(ep) => applied.apply(cache.recheck_zombies(ep, &open))?,
            }
            let active: Vec<&FqdnSelector> = pool.iter().zip(&selected).filter(|(_, &on)| on).map(|(s, _)| s).collect();
            let mut names_of: HashMap<IpAddr, BTreeSet<DnsName>> = HashMap::new();
            let mut per_name: HashMap<(u16, DnsName), usize> = HashMap::new();
            for row in cache.list(None, None) {
                for ip in &row.ips {
                    names_of.entry(*ip).or_default().insert(row.name.clone());
                }
                if row.source == fqdn_cache::Source::Lookup {
                    *per_name.entry((row.endpoint, row.name.clone())).or_default() += row.ips.len();
                }
            }
            prop_assert!(per_name.values().all(|&n| n <= 2), "maxIPsPerHostname exceeded");
            let mut expected: HashMap<IpNet, LabelSet> = HashMap::new();
            for (ip, names) in &names_of {
                let matching: Vec<&FqdnSelector> = active.iter().copied()
                    .filter(|s| names.iter().any(|n| s.matches(n))).collect();
                if !matching.is_empty() {
                    expected.insert(IpNet::from(*ip), labels_for(&matching, ip.is_ipv6()));
                }
            }
            let actual: HashMap<IpNet, LabelSet> = applied.ipcache.iter()
                .map(|(net, id)| (*net, applied.identities[id].clone())).collect();
            prop_assert_eq!(&actual, &expected);
        }
        // Every connection closes and every lifetime ends: only the preallocated remain.
        open.clear();
        applied.apply(cache.recheck_zombies(None, &open))?;
        now += 1_000_000;
        applied.apply(cache.expire(Timestamp::from_unix_millis(now), &open))?;
        prop_assert!(applied.ipcache.is_empty());
        prop_assert_eq!(cache.next_expiry(), None);
        let stats = cache.stats();
        prop_assert_eq!((stats.names, stats.ips, stats.entries, stats.zombies), (0, 0, 0, 0));
        prop_assert_eq!(applied.identities.len(), 2 * selected.iter().filter(|&&on| on).count());
        prop_assert_eq!(stats.identities, applied.identities.len());
    }
}
