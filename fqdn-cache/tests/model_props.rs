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
            prop_assert_eq!(cache.next_expiry().map(|t| t.as_unix_millis()), model.values().min().copied());
        }
    }
}
