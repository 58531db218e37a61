//! The persistence format: round trip, expiry on restore, corrupt input rejected.
// FqdnSelector orders and hashes by its text; clippy sees the regex cache inside it.
#![allow(clippy::mutable_key_type)]

use std::collections::{BTreeSet, HashSet};
use std::net::IpAddr;

use fqdn_cache::{
    Answer, Config, EndpointId, Error, FqdnCache, NoConnections, Snapshot, Source, Timestamp,
};
use policy::fqdn::{DnsName, FqdnPattern};
use policy::model::FqdnSelector;

fn t(secs: u64) -> Timestamp {
    Timestamp::from_unix_secs(1_795_693_645 + secs)
}
fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}
fn learn(c: &mut FqdnCache, ep: EndpointId, q: &str, ips: &[&str], ttl: u32, now: Timestamp) {
    let ips: Vec<IpAddr> = ips.iter().map(|s| ip(s)).collect();
    c.learn(
        &Answer {
            endpoint: ep,
            qname: &DnsName::new(q),
            chain: &[],
            ips: &ips,
            ttl,
        },
        now,
        &NoConnections,
    );
}
fn key(ep: EndpointId) -> Option<String> {
    match ep {
        1 => Some("frontend".into()),
        2 => Some("backend".into()),
        _ => None,
    }
}
fn all() -> BTreeSet<FqdnSelector> {
    [FqdnSelector::MatchPattern(FqdnPattern::parse("*").unwrap())]
        .into_iter()
        .collect()
}

fn sample() -> FqdnCache {
    let mut c = FqdnCache::new(Config::default());
    learn(
        &mut c,
        1,
        "a.example.com",
        &["192.0.2.1", "2001:db8::1"],
        60,
        t(0),
    );
    learn(&mut c, 1, "short.example.com", &["192.0.2.2"], 5, t(0));
    learn(&mut c, 2, "b.example.com", &["192.0.2.3"], 120, t(0));
    learn(&mut c, 3, "unnamed.example.com", &["192.0.2.4"], 120, t(0));
    c
}

#[test]
fn round_trip_keeps_what_is_still_alive() {
    let c = sample();
    let bytes = c.snapshot(key).encode();
    let snap = Snapshot::decode(&bytes).unwrap();
    assert_eq!(snap, c.snapshot(key));

    // Restored with endpoints renumbered: entries follow the endpoint's name.
    let mut r = FqdnCache::new(Config::default());
    let resolve = |name: &str| match name {
        "frontend" => Some(11),
        "backend" => Some(12),
        _ => None,
    };
    r.set_selectors(all());
    let ch = r.restore(&snap, resolve, t(10));
    // Allowed before any new query: the ipcache changes come out of restore.
    let mut ups: Vec<String> = ch
        .ipcache_upserts
        .iter()
        .map(|(n, _)| n.to_string())
        .collect();
    ups.sort();
    assert_eq!(ups, ["192.0.2.1/32", "192.0.2.3/32", "2001:db8::1/128"]);
    assert_eq!(
        r.lookup(11, &DnsName::new("a.example.com")),
        c.lookup(1, &DnsName::new("a.example.com"))
    );
    assert_eq!(r.lookup(12, &DnsName::new("b.example.com")).len(), 1);
    // Expired while down: dropped. Unknown endpoints: skipped.
    assert!(r.lookup(11, &DnsName::new("short.example.com")).is_empty());
    assert_eq!(r.stats().entries, 3);
    assert_eq!(r.next_expiry(), Some(t(60)));
}

#[test]
fn zombies_come_back_to_be_checked() {
    let mut c = FqdnCache::new(Config::default());
    learn(
        &mut c,
        1,
        "a.example.com",
        &["192.0.2.1", "192.0.2.2"],
        5,
        t(0),
    );
    c.expire(t(5), &|_: EndpointId, _: IpAddr| true);
    assert_eq!(c.stats().zombies, 2);
    let snap = Snapshot::decode(&c.snapshot(key).encode()).unwrap();

    let mut r = FqdnCache::new(Config::default());
    r.set_selectors(all());
    let ch = r.restore(&snap, |_| Some(1), t(100));
    assert_eq!(ch.ipcache_upserts.len(), 2);
    assert_eq!(r.list(None, None)[0].source, Source::Zombie);
    assert_eq!(r.next_expiry(), Some(t(100)));
    let mut open = HashSet::new();
    open.insert((1, ip("192.0.2.2")));
    let ch = r.expire(t(100), &open);
    assert_eq!(ch.ipcache_deletes, vec!["192.0.2.1/32".parse().unwrap()]);
    assert_eq!(r.stats().zombies, 1);
}

#[test]
fn corrupt_input_is_an_error_naming_the_place() {
    let e = Snapshot::decode(b"{\"version\": 1, \"endpoints\": [").unwrap_err();
    assert!(matches!(e, Error::Corrupt { line: 1, .. }), "{e}");
    let e = Snapshot::decode(b"\x00\x01garbage").unwrap_err();
    assert!(matches!(e, Error::Corrupt { .. }), "{e}");
    let e = Snapshot::decode(b"{\"version\": 2, \"endpoints\": []}").unwrap_err();
    assert!(
        matches!(
            e,
            Error::Version {
                found: 2,
                expected: 1
            }
        ),
        "{e}"
    );
    let e = Snapshot::decode(b"{\"version\": 1, \"endpoints\": [], \"extra\": 1}").unwrap_err();
    assert!(e.to_string().contains("extra"), "{e}");
    let bad_ip = br#"{"version": 1, "endpoints": [{"endpoint": "f", "names": [{"name": "a.", "ips": [{"ip": "300.1.1.1", "expires": 1}]}]}]}"#;
    assert!(matches!(
        Snapshot::decode(bad_ip).unwrap_err(),
        Error::Corrupt { .. }
    ));
    let bad_name = br#"{"version": 1, "endpoints": [{"endpoint": "f", "names": [{"name": "A.Example", "ips": []}]}]}"#;
    let e = Snapshot::decode(bad_name).unwrap_err();
    assert_eq!(
        e.to_string(),
        "FQDN state: endpoints[0].names[0].name: \"A.Example\" is not a DNS name in normal form"
    );
    // Empty state is valid.
    let empty = FqdnCache::default().snapshot(key).encode();
    assert_eq!(empty, b"{\"version\":1,\"endpoints\":[]}");
    assert!(Snapshot::decode(&empty).unwrap().endpoints.is_empty());
}
