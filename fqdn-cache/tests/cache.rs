//! Behaviour of the FQDN cache and name manager through its public API.
// FqdnSelector orders and hashes by its text; clippy sees the regex cache inside it.
#![allow(clippy::mutable_key_type)]

use std::collections::{BTreeSet, HashSet};
use std::net::IpAddr;

use fqdn_cache::{
    Answer, Changes, Config, EndpointId, FqdnCache, FqdnIdentity, NoConnections, Source, Timestamp,
};
use ipnet::IpNet;
use policy::fqdn::{DnsName, FqdnPattern};
use policy::labels::{Label, LabelSet};
use policy::model::FqdnSelector;

fn n(s: &str) -> DnsName {
    DnsName::new(s)
}
fn pat(s: &str) -> FqdnSelector {
    FqdnSelector::MatchPattern(FqdnPattern::parse(s).unwrap())
}
fn exact(s: &str) -> FqdnSelector {
    FqdnSelector::MatchName(DnsName::parse_match_name(s).unwrap())
}
fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}
fn net(s: &str) -> IpNet {
    IpNet::from(ip(s))
}
/// Seconds after an arbitrary start.
fn t(secs: u64) -> Timestamp {
    Timestamp::from_unix_secs(1_795_693_645 + secs)
}
fn config(max: usize) -> Config {
    Config {
        min_ttl: 0,
        max_ips_per_hostname: max,
        zombie_recheck_secs: 5,
    }
}
fn sels(list: &[FqdnSelector]) -> BTreeSet<FqdnSelector> {
    list.iter().cloned().collect()
}
/// Labels of the IPv4 identity of these selectors.
fn labels(selectors: &[&str]) -> LabelSet {
    family_labels(selectors, "world-ipv4")
}
fn labels6(selectors: &[&str]) -> LabelSet {
    family_labels(selectors, "world-ipv6")
}
fn family_labels(selectors: &[&str], family: &str) -> LabelSet {
    let mut l: Vec<Label> = selectors
        .iter()
        .map(|s| Label::new("fqdn", s, ""))
        .collect();
    l.push(Label::reserved("world"));
    l.push(Label::reserved(family));
    LabelSet::new(l)
}
/// The identity added with these labels.
fn added(ch: &Changes, labels: &LabelSet) -> FqdnIdentity {
    ch.identities_added
        .iter()
        .find(|(_, l)| l == labels)
        .unwrap_or_else(|| panic!("no identity {labels:?} in {ch:?}"))
        .0
}

fn learn(
    c: &mut FqdnCache,
    ep: EndpointId,
    q: &str,
    chain: &[&str],
    ips: &[&str],
    ttl: u32,
    now: Timestamp,
) -> Changes {
    let chain: Vec<DnsName> = chain.iter().map(|s| n(s)).collect();
    let ips: Vec<IpAddr> = ips.iter().map(|s| ip(s)).collect();
    c.learn(
        &Answer {
            endpoint: ep,
            qname: &n(q),
            chain: &chain,
            ips: &ips,
            ttl,
        },
        now,
        &NoConnections,
    )
}

fn lookup_ips(c: &FqdnCache, ep: EndpointId, name: &str) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = c.lookup(ep, &n(name)).into_iter().map(|(i, _)| i).collect();
    v.sort();
    v
}

#[test]
fn a_new_selector_gets_its_identity_at_once() {
    let mut c = FqdnCache::new(config(1000));
    let ch = c.set_selectors(sels(&[pat("*.example.com")]));
    // One per address family.
    assert_eq!(ch.identities_added.len(), 2);
    added(&ch, &labels(&["*.example.com."]));
    added(&ch, &labels6(&["*.example.com."]));
    assert!(ch.ipcache_upserts.is_empty() && ch.identities_released.is_empty());
    // The same selectors again change nothing.
    assert!(c.set_selectors(sels(&[pat("*.example.com")])).is_empty());
}

#[test]
fn ttl_ends_at_the_exact_instant() {
    let mut c = FqdnCache::new(config(1000));
    let ch = c.set_selectors(sels(&[pat("*.example.com")]));
    let id = added(&ch, &labels(&["*.example.com."]));
    let ch = learn(&mut c, 1, "a.example.com", &[], &["192.0.2.1"], 5, t(0));
    // The identity was preallocated: the answer needs only an ipcache write.
    assert!(ch.identities_added.is_empty());
    assert_eq!(ch.ipcache_upserts, vec![(net("192.0.2.1"), id)]);
    assert_eq!(c.next_expiry(), Some(t(5)));
    let just_before = Timestamp::from_unix_millis(t(5).as_unix_millis() - 1);
    assert!(c.expire(just_before, &NoConnections).is_empty());
    assert_eq!(lookup_ips(&c, 1, "a.example.com"), vec![ip("192.0.2.1")]);
    let ch = c.expire(t(5), &NoConnections);
    assert_eq!(ch.ipcache_deletes, vec![net("192.0.2.1")]);
    assert!(
        ch.identities_released.is_empty(),
        "pinned while the selector is in force"
    );
    assert!(lookup_ips(&c, 1, "a.example.com").is_empty());
    assert_eq!(c.next_expiry(), None);
    assert_eq!(c.identity_of(ip("192.0.2.1")), None);
    assert_eq!(c.stats().names, 0);
}

#[test]
fn min_ttl_raises_short_ttls_and_zero_lifetime_files_nothing() {
    let mut c = FqdnCache::new(Config {
        min_ttl: 10,
        ..config(1000)
    });
    learn(&mut c, 1, "a.example.com", &[], &["192.0.2.1"], 1, t(0));
    assert_eq!(c.next_expiry(), Some(t(10)));
    learn(&mut c, 1, "b.example.com", &[], &["192.0.2.2"], 60, t(0));
    assert_eq!(c.lookup(1, &n("b.example.com"))[0].1, t(60));

    let mut c = FqdnCache::new(config(1000));
    c.set_selectors(sels(&[pat("*")]));
    assert!(learn(&mut c, 1, "a.example.com", &[], &["192.0.2.1"], 0, t(0)).is_empty());
    assert_eq!(c.stats().entries, 0);
}

#[test]
fn a_later_answer_extends_but_never_shortens() {
    let mut c = FqdnCache::new(config(1000));
    learn(&mut c, 1, "a.example.com", &[], &["192.0.2.1"], 100, t(0));
    learn(&mut c, 1, "a.example.com", &[], &["192.0.2.1"], 10, t(5));
    assert_eq!(
        c.lookup(1, &n("a.example.com")),
        vec![(ip("192.0.2.1"), t(100))]
    );
    learn(&mut c, 1, "a.example.com", &[], &["192.0.2.1"], 200, t(6));
    assert_eq!(
        c.lookup(1, &n("a.example.com")),
        vec![(ip("192.0.2.1"), t(206))]
    );
    // The deadline index is lazy: the first deadline is still due for a call, which ends
    // nothing and files the true one.
    assert_eq!(c.next_expiry(), Some(t(100)));
    assert!(c.expire(t(100), &NoConnections).is_empty());
    assert_eq!(c.stats().entries, 1);
    assert_eq!(c.next_expiry(), Some(t(206)));
    c.expire(t(206), &NoConnections);
    assert_eq!(c.stats().entries, 0);
    assert_eq!(c.next_expiry(), None);
}

#[test]
fn cname_chain_files_the_ips_under_every_name() {
    let mut c = FqdnCache::new(config(1000));
    let ch = c.set_selectors(sels(&[exact("edge.cdn.net")]));
    let id = added(&ch, &labels(&["edge.cdn.net."]));
    let id6 = added(&ch, &labels6(&["edge.cdn.net."]));
    let ch = learn(
        &mut c,
        1,
        "www.example.com",
        &["www.example.com.cdn.example.net", "edge.cdn.net"],
        &["192.0.2.1", "2001:db8::1"],
        30,
        t(0),
    );
    for name in [
        "www.example.com",
        "www.example.com.cdn.example.net",
        "edge.cdn.net",
    ] {
        assert_eq!(
            lookup_ips(&c, 1, name),
            vec![ip("192.0.2.1"), ip("2001:db8::1")],
            "{name}"
        );
    }
    // A toFQDNs on the chain's target selects the IPs; IPv6 as /128.
    let mut ups = ch.ipcache_upserts.clone();
    ups.sort();
    // One identity per family.
    assert_eq!(ups, vec![(net("192.0.2.1"), id), (net("2001:db8::1"), id6)]);
    assert_eq!(net("2001:db8::1").prefix_len(), 128);
    let mut names: Vec<String> = c
        .names_of(ip("192.0.2.1"))
        .iter()
        .map(|n| n.to_string())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "edge.cdn.net.",
            "www.example.com.",
            "www.example.com.cdn.example.net."
        ]
    );
}

#[test]
fn selectors_added_and_removed_select_learned_names() {
    let mut c = FqdnCache::new(config(1000));
    // Learned with no selector in force: nothing to enforce yet.
    assert!(learn(&mut c, 1, "api.example.com", &[], &["192.0.2.1"], 60, t(0)).is_empty());
    assert!(learn(&mut c, 1, "www.other.org", &[], &["192.0.2.2"], 60, t(0)).is_empty());

    let ch = c.set_selectors(sels(&[pat("*.example.com")]));
    assert_eq!(ch.identities_added.len(), 2);
    let id = added(&ch, &labels(&["*.example.com."]));
    let id6 = added(&ch, &labels6(&["*.example.com."]));
    assert_eq!(ch.ipcache_upserts, vec![(net("192.0.2.1"), id)]);

    // A second selector on the same name: the IP moves to the identity of the pair.
    let ch = c.set_selectors(sels(&[pat("*.example.com"), exact("api.example.com")]));
    assert_eq!(ch.identities_added.len(), 3, "{ch:?}"); // the pair + the new singles
    let pair = added(&ch, &labels(&["*.example.com.", "api.example.com."]));
    assert_eq!(ch.ipcache_upserts, vec![(net("192.0.2.1"), pair)]);
    assert!(ch.identities_released.is_empty());

    // Back to the single selector: the pair identity is released.
    let ch = c.set_selectors(sels(&[pat("*.example.com")]));
    assert_eq!(ch.ipcache_upserts, vec![(net("192.0.2.1"), id)]);
    assert_eq!(ch.identities_released.len(), 3);
    assert!(ch.identities_released.contains(&pair));

    // No selector: the IP leaves the ipcache, the preallocated identity goes.
    let ch = c.set_selectors(BTreeSet::new());
    assert_eq!(ch.ipcache_deletes, vec![net("192.0.2.1")]);
    assert_eq!(ch.identities_released, vec![id, id6]);
    assert_eq!(c.identities().count(), 0);
    // The learned state itself stays.
    assert_eq!(c.stats().entries, 2);
}

#[test]
fn a_name_with_thousands_of_ips_costs_one_identity() {
    let mut c = FqdnCache::new(config(10_000));
    c.set_selectors(sels(&[pat("**.example.com"), pat("*.cdn.example.com")]));
    let ips: Vec<String> = (0..5000u32)
        .map(|i| format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255))
        .collect();
    let refs: Vec<&str> = ips.iter().map(String::as_str).collect();
    let ch = learn(&mut c, 1, "a.cdn.example.com", &[], &refs, 60, t(0));
    assert_eq!(ch.ipcache_upserts.len(), 5000);
    let ids: HashSet<FqdnIdentity> = ch.ipcache_upserts.iter().map(|(_, id)| *id).collect();
    assert_eq!(ids.len(), 1);
    assert_eq!(ch.identities_added.len(), 1, "the pair, allocated once");
    assert_eq!(
        ch.identities_added[0].1,
        labels(&["**.example.com.", "*.cdn.example.com."])
    );
    // Two preallocated singles per family + the pair.
    assert_eq!(c.identities().count(), 5);
}

#[test]
fn an_ip_goes_when_its_last_lifetime_ends() {
    let mut c = FqdnCache::new(config(1000));
    let ch = c.set_selectors(sels(&[exact("a.example.com"), exact("b.example.com")]));
    let b = added(&ch, &labels(&["b.example.com."]));
    learn(&mut c, 1, "a.example.com", &[], &["192.0.2.1"], 10, t(0));
    let ch2 = learn(&mut c, 1, "b.example.com", &[], &["192.0.2.1"], 20, t(0));
    assert_eq!(
        ch2.identities_added[0].1,
        labels(&["a.example.com.", "b.example.com."])
    );
    let pair = ch2.identities_added[0].0;
    assert_eq!(ch2.ipcache_upserts, vec![(net("192.0.2.1"), pair)]);
    // a's lifetime ends: the IP keeps only b's selector.
    let ch = c.expire(t(10), &NoConnections);
    assert_eq!(ch.ipcache_upserts, vec![(net("192.0.2.1"), b)]);
    assert_eq!(ch.identities_released, vec![pair]);
    // b's ends too: gone.
    let ch = c.expire(t(20), &NoConnections);
    assert_eq!(ch.ipcache_deletes, vec![net("192.0.2.1")]);
}

#[test]
fn endpoints_hold_ips_independently() {
    let mut c = FqdnCache::new(config(1000));
    let ch = c.set_selectors(sels(&[pat("*.example.com")]));
    let id = added(&ch, &labels(&["*.example.com."]));
    learn(&mut c, 1, "a.example.com", &[], &["192.0.2.1"], 10, t(0));
    let ch = learn(&mut c, 2, "a.example.com", &[], &["192.0.2.1"], 30, t(0));
    assert!(ch.is_empty(), "already enforceable: {ch:?}");
    assert!(c.expire(t(10), &NoConnections).is_empty());
    assert!(lookup_ips(&c, 1, "a.example.com").is_empty());
    assert_eq!(c.identity_of(ip("192.0.2.1")), Some(id));
    assert_eq!(
        c.expire(t(30), &NoConnections).ipcache_deletes,
        vec![net("192.0.2.1")]
    );
}

#[test]
fn max_ips_per_hostname_evicts_the_earliest_expiring() {
    let mut c = FqdnCache::new(config(2));
    c.set_selectors(sels(&[pat("*.example.com")]));
    learn(&mut c, 1, "a.example.com", &[], &["192.0.2.1"], 100, t(0));
    learn(&mut c, 1, "a.example.com", &[], &["192.0.2.2"], 50, t(0));
    let ch = learn(&mut c, 1, "a.example.com", &[], &["192.0.2.3"], 70, t(0));
    assert_eq!(ch.ipcache_deletes, vec![net("192.0.2.2")]);
    assert_eq!(
        lookup_ips(&c, 1, "a.example.com"),
        vec![ip("192.0.2.1"), ip("192.0.2.3")]
    );
    // A new IP that would itself expire first is the one that goes.
    let ch = learn(&mut c, 1, "a.example.com", &[], &["192.0.2.4"], 10, t(0));
    assert!(ch.is_empty(), "{ch:?}");
    assert_eq!(
        lookup_ips(&c, 1, "a.example.com"),
        vec![ip("192.0.2.1"), ip("192.0.2.3")]
    );
    // On a tie the IPs of the new answer stay, its first ones first.
    let ch = learn(
        &mut c,
        1,
        "a.example.com",
        &[],
        &["192.0.2.9", "192.0.2.8", "192.0.2.7"],
        100,
        t(0),
    );
    assert_eq!(
        lookup_ips(&c, 1, "a.example.com"),
        vec![ip("192.0.2.8"), ip("192.0.2.9")]
    );
    let mut deleted = ch.ipcache_deletes.clone();
    deleted.sort();
    assert_eq!(deleted, vec![net("192.0.2.1"), net("192.0.2.3")]);
    // The limit is per name and per endpoint.
    learn(
        &mut c,
        2,
        "a.example.com",
        &[],
        &["192.0.2.1", "192.0.2.3"],
        100,
        t(0),
    );
    learn(
        &mut c,
        1,
        "b.example.com",
        &[],
        &["192.0.2.5", "192.0.2.6"],
        100,
        t(0),
    );
    assert_eq!(c.stats().entries, 6);
    // Lazy deadline index: the evicted IPs' deadline (50) is still a key; a call then ends
    // nothing, and the true one comes next.
    assert_eq!(c.next_expiry(), Some(t(50)));
    assert!(c.expire(t(99), &NoConnections).is_empty());
    assert_eq!(c.stats().entries, 6);
    assert_eq!(c.next_expiry(), Some(t(100)));
}

#[test]
fn an_ip_with_an_open_connection_stays_as_a_zombie() {
    let mut c = FqdnCache::new(config(1000));
    let ch = c.set_selectors(sels(&[pat("*.example.com")]));
    let id = added(&ch, &labels(&["*.example.com."]));
    learn(
        &mut c,
        1,
        "a.example.com",
        &[],
        &["192.0.2.1", "192.0.2.2"],
        10,
        t(0),
    );
    let mut open: HashSet<(EndpointId, IpAddr)> = HashSet::new();
    open.insert((1, ip("192.0.2.1")));

    let ch = c.expire(t(10), &open);
    assert_eq!(ch.ipcache_deletes, vec![net("192.0.2.2")]);
    assert_eq!(c.identity_of(ip("192.0.2.1")), Some(id));
    let rows = c.list(Some(1), None);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].source, Source::Zombie);
    assert_eq!(rows[0].ips, vec![ip("192.0.2.1")]);
    assert_eq!(rows[0].expires, t(10));
    assert_eq!(c.stats().zombies, 1);

    // Still open at the recheck: stays.
    assert_eq!(c.next_expiry(), Some(t(15)));
    assert!(c.expire(t(15), &open).is_empty());
    assert_eq!(c.next_expiry(), Some(t(20)));
    // Closed: goes at the next check, or at once when the datapath says so.
    let none: HashSet<(EndpointId, IpAddr)> = HashSet::new();
    let ch = c.recheck_zombies(Some(1), &none);
    assert_eq!(ch.ipcache_deletes, vec![net("192.0.2.1")]);
    assert_eq!(c.next_expiry(), None);
    assert_eq!(c.stats().zombies, 0);
}

#[test]
fn a_zombie_learned_again_is_a_lookup_again() {
    let mut c = FqdnCache::new(config(1000));
    c.set_selectors(sels(&[pat("*.example.com")]));
    learn(&mut c, 1, "a.example.com", &[], &["192.0.2.1"], 10, t(0));
    let alive = |_: EndpointId, _: IpAddr| true;
    assert!(c.expire(t(10), &alive).is_empty());
    assert!(learn(&mut c, 1, "a.example.com", &[], &["192.0.2.1"], 10, t(12)).is_empty());
    assert_eq!(c.stats().zombies, 0);
    assert_eq!(c.list(None, None)[0].source, Source::Lookup);
    assert_eq!(c.next_expiry(), Some(t(22)));
    assert_eq!(
        c.expire(t(22), &NoConnections).ipcache_deletes,
        vec![net("192.0.2.1")]
    );
}

#[test]
fn an_evicted_ip_with_a_connection_is_a_zombie() {
    let mut c = FqdnCache::new(config(1));
    c.set_selectors(sels(&[pat("*.example.com")]));
    learn(&mut c, 1, "a.example.com", &[], &["192.0.2.1"], 10, t(0));
    let alive = |_: EndpointId, ip: IpAddr| ip == "192.0.2.1".parse::<IpAddr>().unwrap();
    let ch = c.learn(
        &Answer {
            endpoint: 1,
            qname: &n("a.example.com"),
            chain: &[],
            ips: &[ip("192.0.2.2")],
            ttl: 20,
        },
        t(1),
        &alive,
    );
    assert_eq!(ch.ipcache_upserts.len(), 1);
    assert!(ch.ipcache_deletes.is_empty());
    let rows = c.list(None, None);
    assert_eq!(rows.len(), 2);
    assert_eq!(
        (rows[0].source, rows[0].ips[0]),
        (Source::Lookup, ip("192.0.2.2"))
    );
    assert_eq!(
        (rows[1].source, rows[1].ips[0]),
        (Source::Zombie, ip("192.0.2.1"))
    );
}

#[test]
fn clean_forgets_by_endpoint_and_name() {
    let mut c = FqdnCache::new(config(1000));
    c.set_selectors(sels(&[pat("*")]));
    learn(&mut c, 1, "a.example.com", &[], &["192.0.2.1"], 60, t(0));
    learn(&mut c, 1, "b.example.org", &[], &["192.0.2.2"], 60, t(0));
    learn(&mut c, 2, "a.example.com", &[], &["192.0.2.3"], 60, t(0));

    let ch = c.clean(Some(1), Some(&pat("*.example.com")));
    assert_eq!(ch.ipcache_deletes, vec![net("192.0.2.1")]);
    assert_eq!(c.stats().entries, 2);
    let ch = c.clean(None, None);
    let mut d = ch.ipcache_deletes.clone();
    d.sort();
    assert_eq!(d, vec![net("192.0.2.2"), net("192.0.2.3")]);
    assert_eq!(c.next_expiry(), None);
    assert_eq!(c.stats().names, 0);
    // Nothing left: cleaning again changes nothing.
    assert!(c.clean(None, None).is_empty());
}

#[test]
fn a_removed_endpoint_takes_its_zombies_along() {
    let mut c = FqdnCache::new(config(1000));
    c.set_selectors(sels(&[pat("*")]));
    learn(&mut c, 7, "a.example.com", &[], &["192.0.2.1"], 5, t(0));
    learn(&mut c, 7, "b.example.com", &[], &["192.0.2.2"], 60, t(0));
    c.expire(t(5), &|_: EndpointId, _: IpAddr| true);
    let ch = c.remove_endpoint(7);
    let mut d = ch.ipcache_deletes.clone();
    d.sort();
    assert_eq!(d, vec![net("192.0.2.1"), net("192.0.2.2")]);
    assert_eq!(
        c.stats(),
        fqdn_cache::Stats {
            identities: 2,
            selectors: 1,
            ..Default::default()
        }
    );
    assert_eq!(c.next_expiry(), None);
}

#[test]
fn list_groups_ips_by_name_and_expiry() {
    let mut c = FqdnCache::new(config(1000));
    learn(
        &mut c,
        1,
        "a.example.com",
        &[],
        &["192.0.2.2", "192.0.2.1"],
        60,
        t(0),
    );
    learn(&mut c, 1, "a.example.com", &[], &["192.0.2.3"], 30, t(0));
    learn(&mut c, 2, "b.example.com", &[], &["192.0.2.4"], 30, t(0));
    let rows = c.list(None, None);
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0].name, n("a.example.com"));
    assert_eq!(rows[0].ips, vec![ip("192.0.2.3")]);
    assert_eq!(rows[0].expires, t(30));
    assert_eq!(rows[1].ips, vec![ip("192.0.2.1"), ip("192.0.2.2")]);
    assert_eq!(rows[1].expires.secs_left(t(0)), 60);
    assert_eq!(rows[2].endpoint, 2);
    assert_eq!(c.list(Some(2), None).len(), 1);
    assert_eq!(c.list(None, Some(&exact("b.example.com"))).len(), 1);
    assert_eq!(c.list(None, Some(&pat("*.example.com"))).len(), 3);
    assert!(c.list(Some(3), None).is_empty());
}

#[test]
fn selectors_matching_uses_the_index() {
    let mut c = FqdnCache::new(config(1000));
    c.set_selectors(sels(&[pat("*.example.com"), pat("**.com"), exact("x.org")]));
    let mut m: Vec<String> = c
        .selectors_matching(&n("a.example.com"))
        .iter()
        .map(|s| s.label_value())
        .collect();
    m.sort();
    assert_eq!(m, ["**.com.", "*.example.com."]);
    assert!(c.selectors_matching(&n("example.net")).is_empty());
}
