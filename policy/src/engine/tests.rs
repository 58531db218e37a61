//! Engine tests: semantics per feature, and incremental computation checked against full
//! recomputation (same engine, and a fresh engine built from the final state).

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::*;
use crate::identity::{IdentityAllocator, LOCAL_IDENTITY_FLAG};
use crate::ipcache::Ipcache;
use crate::labels::{Label, LabelSet, NAMESPACE_LABEL};
use crate::mapstate::LookupVerdict;
use crate::model::{Endpoint, Policy, Protocol};
use crate::parse::parse_policies;

pub(crate) const PORTS: ProxyPorts = ProxyPorts {
    dns: 10053,
    http: 10080,
    kafka: 10090,
};

pub(crate) fn engine() -> Engine {
    Engine::new(IdentityAllocator::new(), PORTS)
}

pub(crate) fn pols(file: &str, yaml: &str) -> Vec<Policy> {
    parse_policies(file, yaml).unwrap_or_else(|d| {
        panic!(
            "{}",
            d.iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        )
    })
}

pub(crate) fn ep(id: u16, name: &str, ns: &str, labels: &[(&str, &str)], ips: &[&str]) -> Endpoint {
    let mut v: Vec<Label> = labels.iter().map(|(k, v)| Label::k8s(k, v)).collect();
    v.push(Label::k8s(NAMESPACE_LABEL, ns));
    Endpoint {
        id,
        name: name.to_string(),
        labels: LabelSet::new(v),
        ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
        named_ports: BTreeMap::new(),
        is_host: false,
    }
}

pub(crate) fn host(id: u16, labels: &[(&str, &str)], ips: &[&str]) -> Endpoint {
    Endpoint {
        id,
        name: "host".into(),
        labels: LabelSet::new(labels.iter().map(|(k, v)| Label::k8s(k, v)).collect()),
        ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
        named_ports: BTreeMap::new(),
        is_host: true,
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn look(
    e: &Engine,
    ep: u16,
    dir: Direction,
    peer: u32,
    proto: Protocol,
    port: u16,
) -> LookupVerdict {
    e.map_state(ep)
        .unwrap()
        .lookup(peer, dir, proto.number(), port)
        .verdict
}

fn id_of(e: &Engine, ep: u16) -> u32 {
    e.endpoint_identity(ep).unwrap()
}

use Direction::{Egress, Ingress};
use LookupVerdict::{Allow, Deny, NoMatch};

/// Every endpoint's stored map equals a from-scratch computation, selector users are right,
/// and the ipcache holds exactly what its sources say.
pub(crate) fn verify(e: &Engine) {
    for (id, st) in &e.endpoints {
        assert_eq!(
            st.rules,
            e.select_rules(&st.ep),
            "endpoint {id}: selected rules"
        );
        let pol = e.build_policy(&st.ep, None);
        let full = e.ctx().full_map(&st.ep, &pol);
        assert!(
            st.map == full,
            "endpoint {id}: incremental map differs from full recomputation: {:?}",
            st.map.diff(&full)
        );
        for dir in DIRS {
            for s in pol.get(dir).by_selector.keys() {
                assert!(
                    e.selector_users[s].contains(id),
                    "selector {s} misses user {id}"
                );
            }
        }
    }
    let mut want = Ipcache::new();
    want.upsert("0.0.0.0/0".parse().unwrap(), reserved::WORLD_IPV4);
    want.upsert("::/0".parse().unwrap(), reserved::WORLD_IPV6);
    for (p, pp) in &e.policy_prefixes {
        if let Some(id) = pp.identity {
            want.upsert(*p, id);
        }
    }
    for (p, id) in &e.fqdn_prefixes {
        want.upsert(*p, *id);
    }
    for (p, id) in &e.ep_prefixes {
        want.upsert(*p, *id);
    }
    assert_eq!(e.ipcache, want, "ipcache");
}

/// What a datapath holds after applying every `Changes` in order.
#[derive(Default)]
pub(crate) struct Mirror {
    maps: BTreeMap<u16, MapState>,
    ipcache: Ipcache,
}

impl Mirror {
    pub(crate) fn new(e: &Engine) -> Mirror {
        Mirror {
            maps: BTreeMap::new(),
            ipcache: e.ipcache.clone(),
        }
    }

    pub(crate) fn apply(&mut self, c: &Changes) {
        for (ep, d) in &c.maps {
            let m = self.maps.entry(*ep).or_default();
            for k in &d.deletes {
                assert!(m.remove(k).is_some(), "delete of absent key {k:?}");
            }
            for (k, v) in &d.adds {
                assert!(m.get(k) != Some(v), "no-op upsert of {k:?}");
                m.insert(*k, v.clone());
            }
        }
        for (p, id) in &c.ipcache_upserts {
            self.ipcache.upsert(*p, *id);
        }
        for p in &c.ipcache_deletes {
            assert!(self.ipcache.remove(p).is_some());
        }
        self.maps.retain(|_, m| !m.is_empty());
    }

    pub(crate) fn check(&self, e: &Engine) {
        let mut n = 0;
        for (id, st) in &e.endpoints {
            if st.map.is_empty() {
                continue;
            }
            n += 1;
            let m = self.maps.get(id).cloned().unwrap_or_default();
            assert!(
                m == st.map,
                "endpoint {id}: diffs do not add up: {:?}",
                m.diff(&st.map)
            );
        }
        assert_eq!(n, self.maps.len(), "maps of removed endpoints linger");
        assert_eq!(self.ipcache, e.ipcache);
    }
}

// ---------------------------------------------------------------- semantics per feature

const WEB_DB: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: db, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: db}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: web}}]
    toPorts: [{ports: [{port: "5432", protocol: TCP}]}]
"#;

#[test]
fn l3_l4_allow_and_default_deny() {
    let mut e = engine();
    let mut m = Mirror::new(&e);
    m.apply(&e.upsert_endpoint(ep(1, "web", "prod", &[("app", "web")], &["10.0.0.1"])));
    m.apply(&e.upsert_endpoint(ep(2, "db", "prod", &[("app", "db")], &["10.0.0.2"])));
    m.apply(&e.upsert_endpoint(ep(3, "web-dev", "dev", &[("app", "web")], &["10.0.0.3"])));
    m.apply(&e.set_policies("db.yaml", pols("db.yaml", WEB_DB)));
    m.check(&e);
    verify(&e);
    let (web, webdev) = (id_of(&e, 1), id_of(&e, 3));
    assert_eq!(
        e.enforcement(2),
        Some(PerDir {
            ingress: true,
            egress: false
        })
    );
    assert_eq!(
        e.enforcement(1),
        Some(PerDir {
            ingress: false,
            egress: false
        })
    );
    assert_eq!(look(&e, 2, Ingress, web, Protocol::Tcp, 5432), Allow);
    assert_eq!(look(&e, 2, Ingress, web, Protocol::Tcp, 5433), NoMatch);
    assert_eq!(look(&e, 2, Ingress, web, Protocol::Udp, 5432), NoMatch);
    // Namespaced: web in another namespace is not selected.
    assert_eq!(look(&e, 2, Ingress, webdev, Protocol::Tcp, 5432), NoMatch);
    assert_eq!(
        look(&e, 2, Ingress, reserved::WORLD, Protocol::Tcp, 5432),
        NoMatch
    );
    // Egress not enforced: allow-all entry.
    assert_eq!(
        look(&e, 2, Egress, reserved::WORLD, Protocol::Udp, 9),
        Allow
    );
    let l = e.map_state(2).unwrap().lookup(web, Ingress, 6, 5432);
    assert_eq!(&*l.entry.unwrap().rules[0].policy, "prod/db");
    assert_eq!(&*l.entry.unwrap().rules[0].file, "db.yaml");

    // A new web endpoint in prod with new labels: only its identity's entries appear in db.
    let c = e.upsert_endpoint(ep(
        4,
        "web2",
        "prod",
        &[("app", "web"), ("v", "2")],
        &["10.0.0.4"],
    ));
    m.apply(&c);
    m.check(&e);
    let web2 = id_of(&e, 4);
    let db_diff = &c.maps.iter().find(|(id, _)| *id == 2).unwrap().1;
    assert!(db_diff.deletes.is_empty());
    assert!(db_diff.adds.iter().all(|(k, _)| k.identity == web2));
    assert_eq!(look(&e, 2, Ingress, web2, Protocol::Tcp, 5432), Allow);
    // Removing the policy lifts enforcement everywhere.
    m.apply(&e.set_policies("db.yaml", vec![]));
    m.check(&e);
    verify(&e);
    assert_eq!(look(&e, 2, Ingress, web, Protocol::Tcp, 1), Allow);
    assert_eq!(e.map_state(2).unwrap().len(), 2);
    assert!(e.selector_cache().is_empty());
}

#[test]
fn deny_wins_across_policies_and_kinds() {
    let mut e = engine();
    let mut m = Mirror::new(&e);
    m.apply(&e.upsert_endpoint(ep(1, "a", "x", &[("app", "a")], &["10.0.0.1"])));
    m.apply(&e.upsert_endpoint(ep(2, "b", "x", &[("app", "b")], &["10.0.0.2"])));
    m.apply(&e.set_policies(
        "allow.yaml",
        pols(
            "allow.yaml",
            r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: allow-all-ingress, namespace: x}
spec:
  endpointSelector: {}
  ingress: [{fromEntities: [all]}]
"#,
        ),
    ));
    m.apply(&e.set_policies(
        "deny.yaml",
        pols(
            "deny.yaml",
            r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: no-b-to-a}
spec:
  endpointSelector: {matchLabels: {app: a}}
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: b}}]
    toPorts: [{ports: [{port: "8000", endPort: 8100, protocol: TCP}]}]
"#,
        ),
    ));
    m.check(&e);
    verify(&e);
    let b = id_of(&e, 2);
    assert_eq!(look(&e, 1, Ingress, b, Protocol::Tcp, 8050), Deny);
    assert_eq!(look(&e, 1, Ingress, b, Protocol::Tcp, 8101), Allow);
    assert_eq!(look(&e, 1, Ingress, b, Protocol::Udp, 8050), Allow);
    assert_eq!(
        look(&e, 1, Ingress, reserved::WORLD, Protocol::Tcp, 8050),
        Allow
    );
    let l = e.map_state(1).unwrap().lookup(b, Ingress, 6, 8050);
    assert_eq!(&*l.entry.unwrap().rules[0].policy, "no-b-to-a");
    assert_eq!(
        l.entry.unwrap().rules[0].kind,
        crate::model::PolicyKind::CiliumClusterwideNetworkPolicy
    );
}

#[test]
fn deny_only_policy_enforces_but_enable_default_deny_false_does_not() {
    let mut e = engine();
    e.upsert_endpoint(ep(1, "a", "x", &[("app", "a")], &[]));
    e.set_policies(
        "p.yaml",
        pols(
            "p.yaml",
            r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: soft, namespace: x}
spec:
  endpointSelector: {}
  enableDefaultDeny: {egress: false}
  egress:
  - toEntities: [world]
    toPorts: [{ports: [{port: "443", protocol: TCP}]}]
  egressDeny:
  - toCIDR: [192.0.2.0/24]
"#,
        ),
    );
    verify(&e);
    assert_eq!(
        e.enforcement(1),
        Some(PerDir {
            ingress: false,
            egress: false
        })
    );
    assert_eq!(
        look(&e, 1, Egress, reserved::WORLD_IPV4, Protocol::Udp, 53),
        Allow
    );
    let bad = e.ipcache().identity_of(ip("192.0.2.7"));
    assert_eq!(look(&e, 1, Egress, bad, Protocol::Tcp, 443), Deny);
    // Without the opt-out the deny section alone puts egress into default deny.
    e.set_policies(
        "p.yaml",
        pols(
            "p.yaml",
            r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: hard, namespace: x}
spec:
  endpointSelector: {}
  egressDeny: [{toCIDR: [192.0.2.0/24]}]
"#,
        ),
    );
    verify(&e);
    assert_eq!(
        e.enforcement(1),
        Some(PerDir {
            ingress: false,
            egress: true
        })
    );
    assert_eq!(
        look(&e, 1, Egress, reserved::WORLD_IPV4, Protocol::Udp, 53),
        NoMatch
    );
    assert_eq!(e.enforcing_rules(1, Egress).len(), 1);
}

#[test]
fn cidr_except_and_world_through_the_ipcache() {
    let mut e = engine();
    let mut m = Mirror::new(&e);
    m.apply(&e.upsert_endpoint(ep(1, "a", "x", &[("app", "a")], &["10.9.0.1"])));
    let c = e.set_policies(
        "p.yaml",
        pols(
            "p.yaml",
            r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: out, namespace: x}
spec:
  endpointSelector: {}
  egress:
  - toCIDRSet: [{cidr: 0.0.0.0/0, except: [10.0.0.0/8]}]
    toPorts: [{ports: [{port: "443"}]}]
  - toCIDR: [10.1.0.0/16]
"#,
        ),
    );
    assert!(c.prefixes_changed);
    assert_eq!(c.identities_added.len(), 2);
    m.apply(&c);
    m.check(&e);
    verify(&e);
    let v = |e: &Engine, a: &str, proto, port| {
        look(e, 1, Egress, e.ipcache().identity_of(ip(a)), proto, port)
    };
    assert_eq!(v(&e, "8.8.8.8", Protocol::Tcp, 443), Allow);
    assert_eq!(v(&e, "8.8.8.8", Protocol::Udp, 443), Allow);
    assert_eq!(v(&e, "8.8.8.8", Protocol::Sctp, 443), Allow);
    assert_eq!(v(&e, "8.8.8.8", Protocol::Tcp, 80), NoMatch);
    assert_eq!(v(&e, "10.2.0.1", Protocol::Tcp, 443), NoMatch);
    assert_eq!(v(&e, "10.1.0.1", Protocol::Tcp, 22), Allow);
    assert_eq!(v(&e, "10.1.0.1", Protocol::Icmp, 8), Allow);
    // The endpoint's own address is the endpoint, not a CIDR: not selected by toCIDR.
    assert_eq!(e.ipcache().identity_of(ip("10.9.0.1")), id_of(&e, 1));
    assert_eq!(v(&e, "10.9.0.1", Protocol::Tcp, 443), NoMatch);
    // An FQDN-learned address inside 10.1/16 carries that prefix as a label.
    let labels = e.fqdn_identity_labels(&[], ip("10.1.2.3"));
    assert!(labels
        .labels()
        .contains(&Label::new("cidr", "10.1.0.0/16", "")));
    assert!(labels
        .labels()
        .contains(&Label::new("cidr", "10.0.0.0/8", "")));
    assert!(labels
        .labels()
        .contains(&Label::new("cidr", "0.0.0.0/0", "")));
    let (fid, c) = e.upsert_identity(labels);
    m.apply(&c);
    m.apply(&e.upsert_prefix("10.1.2.3/32".parse().unwrap(), fid));
    m.check(&e);
    assert_eq!(v(&e, "10.1.2.3", Protocol::Tcp, 22), Allow);
    // Policy gone: prefixes and their identities leave; the learned prefix stays.
    let c = e.set_policies("p.yaml", vec![]);
    assert_eq!(c.identities_removed.len(), 2);
    m.apply(&c);
    m.check(&e);
    verify(&e);
    assert_eq!(e.ipcache().len(), 4);
}

const FQDN_POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: fqdn, namespace: x}
spec:
  endpointSelector: {matchLabels: {app: a}}
  egress:
  - toEndpoints: [{matchLabels: {"k8s:io.kubernetes.pod.namespace": kube-system, k8s-app: kube-dns}}]
    toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules: {dns: [{matchPattern: "*.example.com"}]}
  - toFQDNs: [{matchPattern: "*.example.com"}]
    toPorts: [{ports: [{port: "443", protocol: TCP}]}]
"#;

fn fqdn_labels(sels: &[&str]) -> LabelSet {
    let mut v: Vec<Label> = sels.iter().map(|s| Label::new("fqdn", s, "")).collect();
    v.push(Label::reserved("world"));
    LabelSet::new(v)
}

#[test]
fn fqdn_identity_is_incremental() {
    let mut e = engine();
    let mut m = Mirror::new(&e);
    for i in 0..5u16 {
        m.apply(&e.upsert_endpoint(ep(
            i + 1,
            &format!("a{i}"),
            "x",
            &[("app", "a"), ("i", &i.to_string())],
            &[],
        )));
    }
    m.apply(&e.upsert_endpoint(ep(
        9,
        "dns",
        "kube-system",
        &[("k8s-app", "kube-dns")],
        &["10.96.0.10"],
    )));
    m.apply(&e.set_policies("f.yaml", pols("f.yaml", FQDN_POLICY)));
    m.check(&e);
    let sel: Vec<String> = e.fqdn_selectors().iter().map(|s| s.label_value()).collect();
    assert_eq!(sel, vec!["*.example.com.".to_string()]);
    let (fid, c) = e.upsert_identity(fqdn_labels(&["*.example.com."]));
    assert!(fid & LOCAL_IDENTITY_FLAG != 0);
    assert_eq!(c.identities_added, vec![fid]);
    // Exactly one new entry per selecting endpoint.
    assert_eq!(c.maps.len(), 5);
    for (_, d) in &c.maps {
        assert_eq!(d.deletes.len(), 0);
        assert_eq!(d.adds.len(), 1);
        let (k, v) = &d.adds[0];
        assert_eq!(
            (k.identity, k.direction, k.protocol, k.port, k.prefix_len),
            (fid, Egress, 6, 443, 16)
        );
        assert!(!v.deny && v.proxy_port == 0);
    }
    m.apply(&c);
    m.apply(&e.upsert_prefix("93.184.216.34/32".parse().unwrap(), fid));
    m.check(&e);
    verify(&e);
    let dst = e.ipcache().identity_of(ip("93.184.216.34"));
    assert_eq!(dst, fid);
    assert_eq!(look(&e, 1, Egress, dst, Protocol::Tcp, 443), Allow);
    assert_eq!(look(&e, 1, Egress, dst, Protocol::Tcp, 80), NoMatch);
    // An identity nobody selects changes no map.
    let (other, c) = e.upsert_identity(fqdn_labels(&["other.org."]));
    assert!(c.maps.is_empty());
    // A second user: no change; releasing once: no change; last release: entries go.
    let (again, c) = e.upsert_identity(fqdn_labels(&["*.example.com."]));
    assert_eq!((again, c.is_empty()), (fid, true));
    assert!(e.release_identity(fid).is_empty());
    m.apply(&e.delete_prefix("93.184.216.34/32".parse().unwrap()));
    let c = e.release_identity(fid);
    assert_eq!(c.identities_removed, vec![fid]);
    assert_eq!(c.maps.len(), 5);
    assert!(c
        .maps
        .iter()
        .all(|(_, d)| d.adds.is_empty() && d.deletes.len() == 1));
    m.apply(&c);
    m.apply(&e.release_identity(other));
    m.check(&e);
    verify(&e);
}

#[test]
fn dns_rules_for_semantics() {
    let mut e = engine();
    e.upsert_endpoint(ep(1, "a", "x", &[("app", "a")], &[]));
    e.upsert_endpoint(ep(2, "b", "x", &[("app", "b")], &[]));
    e.upsert_endpoint(ep(
        9,
        "dns",
        "kube-system",
        &[("k8s-app", "kube-dns")],
        &["10.96.0.10"],
    ));
    e.set_policies("f.yaml", pols("f.yaml", FQDN_POLICY));
    let dns = id_of(&e, 9);
    let yes = DnsName::new("api.example.com");
    let no = DnsName::new("example.org");
    let v = e.dns_rules_for(1, dns, 53, Protocol::Udp).unwrap();
    assert!(matches!(
        v,
        DnsVerdict::Rules {
            allow_all: false,
            ..
        }
    ));
    assert!(v.allows(&yes) && !v.allows(&no));
    assert_eq!(&*v.matching_rule(&yes).unwrap().policy, "x/fqdn");
    assert!(e
        .dns_rules_for(1, dns, 53, Protocol::Tcp)
        .unwrap()
        .allows(&yes));
    // Another server: not allowed at L3 (egress enforced).
    let v = e
        .dns_rules_for(1, reserved::WORLD_IPV4, 53, Protocol::Udp)
        .unwrap();
    assert!(matches!(&v, DnsVerdict::Denied { rules } if rules.len() == 1));
    // No policy for b: every name, still learned.
    assert_eq!(
        e.dns_rules_for(2, dns, 53, Protocol::Udp),
        Some(DnsVerdict::Unrestricted)
    );
    assert_eq!(e.dns_rules_for(77, dns, 53, Protocol::Udp), None);
    // An L4-only allow of the same server and port ORs in every name; the redirect stays.
    e.set_policies(
        "g.yaml",
        pols(
            "g.yaml",
            r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: dns-l4, namespace: x}
spec:
  endpointSelector: {}
  egress:
  - toEndpoints: [{matchLabels: {"k8s:io.kubernetes.pod.namespace": kube-system}}]
    toPorts: [{ports: [{port: "53", protocol: UDP}]}]
"#,
        ),
    );
    verify(&e);
    let v = e.dns_rules_for(1, dns, 53, Protocol::Udp).unwrap();
    assert!(matches!(
        v,
        DnsVerdict::Rules {
            allow_all: true,
            ..
        }
    ));
    assert!(v.allows(&no));
    let l = e.map_state(1).unwrap().lookup(dns, Egress, 17, 53);
    assert_eq!(l.proxy_port, PORTS.dns);
    assert_eq!(l.entry.unwrap().rules.len(), 2);
    // TCP is not covered by the L4-only rule: the DNS rules alone decide.
    assert!(!e
        .dns_rules_for(1, dns, 53, Protocol::Tcp)
        .unwrap()
        .allows(&no));
    // For b (only the L4 rule) there is no redirect: unrestricted.
    assert_eq!(
        e.dns_rules_for(2, dns, 53, Protocol::Udp),
        Some(DnsVerdict::Unrestricted)
    );
}

#[test]
fn l7_redirects_and_l4_lifts() {
    let mut e = engine();
    e.upsert_endpoint(ep(1, "api", "x", &[("app", "api")], &[]));
    e.upsert_endpoint(ep(2, "c", "x", &[("app", "c")], &[]));
    e.upsert_endpoint(ep(3, "d", "x", &[("app", "d")], &[]));
    e.set_policies(
        "h.yaml",
        pols(
            "h.yaml",
            r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: http, namespace: x}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: c}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules: {http: [{method: GET, path: "/v1/.*"}]}
  - fromEndpoints: [{matchLabels: {app: d}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules: {http: [{method: POST}]}
  - fromEndpoints: [{matchLabels: {app: d}}]
"#,
        ),
    );
    verify(&e);
    let (c, d) = (id_of(&e, 2), id_of(&e, 3));
    let ms = e.map_state(1).unwrap();
    let lc = ms.lookup(c, Ingress, 6, 80);
    assert_eq!((lc.verdict, lc.proxy_port), (Allow, PORTS.http));
    assert_eq!(ms.lookup(c, Ingress, 6, 81).verdict, NoMatch);
    let p = e.l7_policy(1, Ingress, c, 6, 80).unwrap();
    assert_eq!(
        (p.kind, p.allow_all, p.rules.len()),
        (L7Kind::Http, false, 1)
    );
    // d: the L3-only rule ORs in everything on port 80 (redirect kept, proxy allows all).
    let ld = ms.lookup(d, Ingress, 6, 80);
    assert_eq!(ld.proxy_port, PORTS.http);
    let p = e.l7_policy(1, Ingress, d, 6, 80).unwrap();
    assert!(p.allow_all);
    assert_eq!(p.rules.len(), 1);
    assert_eq!(ms.lookup(d, Ingress, 6, 22).proxy_port, 0);
    assert!(e.l7_policy(1, Ingress, d, 6, 22).is_none());
    // Proxy ports move: every redirect follows.
    let c2 = e.set_proxy_ports(ProxyPorts {
        http: 20080,
        ..PORTS
    });
    assert_eq!(c2.maps.len(), 1);
    assert_eq!(
        e.map_state(1).unwrap().lookup(c, Ingress, 6, 80).proxy_port,
        20080
    );
}

#[test]
fn ports_ranges_any_and_icmp() {
    let mut e = engine();
    e.upsert_endpoint(ep(1, "a", "x", &[("app", "a")], &[]));
    e.set_policies(
        "p.yaml",
        pols(
            "p.yaml",
            r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: ports, namespace: x}
spec:
  endpointSelector: {}
  egress:
  - toEntities: [world]
    toPorts: [{ports: [{port: "1000", endPort: 1999}, {port: "53", protocol: UDP}]}]
  - toEntities: [world]
    icmps: [{fields: [{type: 8, family: IPv4}, {type: 128, family: IPv6}]}]
"#,
        ),
    );
    verify(&e);
    let w = reserved::WORLD_IPV4;
    for (proto, port, want) in [
        (Protocol::Tcp, 1000, Allow),
        (Protocol::Tcp, 1999, Allow),
        (Protocol::Tcp, 2000, NoMatch),
        (Protocol::Tcp, 999, NoMatch),
        (Protocol::Udp, 1500, Allow),
        (Protocol::Sctp, 1024, Allow),
        (Protocol::Udp, 53, Allow),
        (Protocol::Tcp, 53, NoMatch),
        (Protocol::Icmp, 8, Allow),
        (Protocol::Icmp, 0, NoMatch),
        (Protocol::Icmpv6, 128, Allow),
        (Protocol::Icmpv6, 8, NoMatch),
    ] {
        assert_eq!(
            look(&e, 1, Egress, w, proto, port),
            want,
            "{proto:?}/{port}"
        );
    }
    // 1000-1999 is split into aligned blocks: 1000/13, 1008/12, 1024/7, 1536/8, 1792/9, 1920/10, 1984/12
    let tcp_keys = e
        .map_state(1)
        .unwrap()
        .identity_entries(Egress, w)
        .iter()
        .filter(|(k, _)| k.protocol == 6)
        .count();
    assert_eq!(tcp_keys, port_range_keys(1000, 1999).len());
}

#[test]
fn named_ports() {
    let mut e = engine();
    let mut web = ep(1, "web", "x", &[("app", "web")], &[]);
    web.named_ports.insert("http".into(), (8080, Protocol::Tcp));
    let mut web2 = ep(2, "web2", "x", &[("app", "web"), ("v", "2")], &[]);
    web2.named_ports
        .insert("http".into(), (9090, Protocol::Tcp));
    let client = ep(3, "client", "x", &[("app", "client")], &[]);
    let mut m = Mirror::new(&e);
    m.apply(&e.upsert_endpoint(web));
    m.apply(&e.upsert_endpoint(client));
    m.apply(&e.set_policies(
        "p.yaml",
        pols(
            "p.yaml",
            r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: named, namespace: x}
spec:
  endpointSelector: {}
  ingress:
  - toPorts: [{ports: [{port: http}]}]
  egress:
  - toEndpoints: [{matchLabels: {app: web}}]
    toPorts: [{ports: [{port: http, protocol: TCP}]}]
"#,
        ),
    ));
    let w1 = id_of(&e, 1);
    assert_eq!(
        look(&e, 1, Ingress, reserved::WORLD, Protocol::Tcp, 8080),
        Allow
    );
    assert_eq!(
        look(&e, 1, Ingress, reserved::WORLD, Protocol::Tcp, 9090),
        NoMatch
    );
    assert_eq!(look(&e, 3, Egress, w1, Protocol::Tcp, 8080), Allow);
    // A second web endpoint with another port: its identity gets its own port only.
    m.apply(&e.upsert_endpoint(web2));
    m.check(&e);
    verify(&e);
    let w2 = id_of(&e, 2);
    assert_eq!(look(&e, 3, Egress, w2, Protocol::Tcp, 9090), Allow);
    assert_eq!(look(&e, 3, Egress, w2, Protocol::Tcp, 8080), NoMatch);
    assert_eq!(look(&e, 3, Egress, w1, Protocol::Tcp, 9090), NoMatch);
    assert_eq!(
        look(&e, 2, Ingress, reserved::WORLD, Protocol::Tcp, 9090),
        Allow
    );
    // Ports renamed: egress of the client follows.
    let mut web2b = ep(2, "web2", "x", &[("app", "web"), ("v", "2")], &[]);
    web2b
        .named_ports
        .insert("http".into(), (7070, Protocol::Tcp));
    m.apply(&e.upsert_endpoint(web2b));
    m.check(&e);
    verify(&e);
    assert_eq!(look(&e, 3, Egress, w2, Protocol::Tcp, 7070), Allow);
    assert_eq!(look(&e, 3, Egress, w2, Protocol::Tcp, 9090), NoMatch);
}

#[test]
fn host_endpoint_node_selector_and_host_entity() {
    let mut e = engine();
    let mut m = Mirror::new(&e);
    m.apply(&e.upsert_endpoint(ep(1, "a", "x", &[("app", "a")], &["10.0.0.1"])));
    m.apply(&e.upsert_endpoint(host(100, &[("node-role", "worker")], &["192.168.1.10"])));
    m.apply(&e.set_policies(
        "host.yaml",
        pols(
            "host.yaml",
            r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: host-fw}
spec:
  nodeSelector: {matchLabels: {node-role: worker}}
  ingress:
  - fromEntities: [cluster]
    toPorts: [{ports: [{port: "22", protocol: TCP}]}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: to-host, namespace: x}
spec:
  endpointSelector: {}
  egress: [{toEntities: [host]}]
"#,
        ),
    ));
    m.check(&e);
    verify(&e);
    assert_eq!(e.endpoint_identity(100), Some(reserved::HOST));
    assert_eq!(e.ipcache().identity_of(ip("192.168.1.10")), reserved::HOST);
    assert_eq!(
        e.enforcement(100),
        Some(PerDir {
            ingress: true,
            egress: false
        })
    );
    // The endpoint selector `{}` does not select the host.
    assert_eq!(
        e.enforcement(1),
        Some(PerDir {
            ingress: false,
            egress: true
        })
    );
    let a = id_of(&e, 1);
    assert_eq!(look(&e, 100, Ingress, a, Protocol::Tcp, 22), Allow);
    assert_eq!(
        look(&e, 100, Ingress, reserved::WORLD_IPV4, Protocol::Tcp, 22),
        NoMatch
    );
    assert_eq!(
        look(&e, 1, Egress, reserved::HOST, Protocol::Tcp, 22),
        Allow
    );
    assert_eq!(
        look(&e, 1, Egress, reserved::WORLD_IPV4, Protocol::Tcp, 22),
        NoMatch
    );
    m.apply(&e.remove_endpoint(100));
    m.check(&e);
    verify(&e);
    assert_eq!(
        e.identities()
            .get(reserved::HOST)
            .unwrap()
            .labels
            .labels()
            .len(),
        1
    );
}

#[test]
fn network_policy_namespace_selector_and_ipblock() {
    let mut e = engine();
    let mut tagged = ep(2, "b", "y", &[("app", "b")], &[]);
    let mut v = tagged.labels.labels().to_vec();
    v.push(Label::k8s("io.cilium.k8s.namespace.labels.team", "blue"));
    tagged.labels = LabelSet::new(v);
    e.upsert_endpoint(ep(1, "a", "x", &[("app", "a")], &[]));
    e.upsert_endpoint(tagged);
    e.upsert_endpoint(ep(3, "c", "z", &[("app", "c")], &[]));
    e.set_policies(
        "np.yaml",
        pols(
            "np.yaml",
            r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: np, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress]
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {team: blue}}
    - ipBlock: {cidr: 172.16.0.0/12, except: [172.16.1.0/24]}
    ports: [{port: 80}]
"#,
        ),
    );
    verify(&e);
    let (b, c) = (id_of(&e, 2), id_of(&e, 3));
    assert_eq!(look(&e, 1, Ingress, b, Protocol::Tcp, 80), Allow);
    assert_eq!(look(&e, 1, Ingress, c, Protocol::Tcp, 80), NoMatch);
    let inside = e.ipcache().identity_of(ip("172.17.0.1"));
    let hole = e.ipcache().identity_of(ip("172.16.1.9"));
    assert_eq!(look(&e, 1, Ingress, inside, Protocol::Tcp, 80), Allow);
    assert_eq!(look(&e, 1, Ingress, hole, Protocol::Tcp, 80), NoMatch);
    assert_eq!(
        e.enforcement(1),
        Some(PerDir {
            ingress: true,
            egress: false
        })
    );
}

#[test]
fn identities_survive_a_restart() {
    let mut e = engine();
    e.upsert_endpoint(ep(1, "a", "x", &[("app", "a")], &[]));
    e.set_policies("f.yaml", pols("f.yaml", FQDN_POLICY));
    let (fid, _) = e.upsert_identity(fqdn_labels(&["*.example.com."]));
    let a = id_of(&e, 1);
    let saved = e.identities().to_persisted();
    let mut f = Engine::new(IdentityAllocator::from_persisted(&saved).unwrap(), PORTS);
    f.upsert_identity(fqdn_labels(&["*.example.com."]));
    f.set_policies("f.yaml", pols("f.yaml", FQDN_POLICY));
    f.upsert_endpoint(ep(1, "a", "x", &[("app", "a")], &[]));
    assert_eq!(f.endpoint_identity(1), Some(a));
    assert_eq!(
        f.identities().lookup(&fqdn_labels(&["*.example.com."])),
        Some(fid)
    );
    assert!(f.map_state(1).unwrap() == e.map_state(1).unwrap());
}

#[test]
fn changes_merge_folds_batches() {
    let mut e = engine();
    let mut m1 = Mirror::new(&e);
    let mut m2 = Mirror::new(&e);
    let mut all = Changes::default();
    for c in [
        e.upsert_endpoint(ep(1, "a", "x", &[("app", "a")], &["10.0.0.1"])),
        e.set_policies("f.yaml", pols("f.yaml", FQDN_POLICY)),
        e.upsert_identity(fqdn_labels(&["*.example.com."])).1,
        e.set_policies("f.yaml", vec![]),
        e.upsert_endpoint(ep(1, "a", "x", &[("app", "a")], &["10.0.0.2"])),
    ] {
        m1.apply(&c);
        all.merge(c);
    }
    // The merged batch lands on the same state (no-op upserts are allowed here).
    for (ep, d) in &all.maps {
        let m = m2.maps.entry(*ep).or_default();
        m.apply(d);
    }
    for (p, id) in &all.ipcache_upserts {
        m2.ipcache.upsert(*p, *id);
    }
    for p in &all.ipcache_deletes {
        m2.ipcache.remove(p);
    }
    m2.maps.retain(|_, m| !m.is_empty());
    m1.check(&e);
    m2.check(&e);
}

// ---------------------------------------------------------------- incremental == full

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
}

const VARIANTS: &[(&str, &str)] = &[
    (
        "a.yaml",
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: a1, namespace: x}
spec:
  endpointSelector: {matchLabels: {app: db}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: web}}]
    toPorts: [{ports: [{port: "5432", protocol: TCP}, {port: "6000", endPort: 6100}]}]
  - fromEndpoints: [{matchLabels: {app: a}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules: {http: [{method: GET}]}
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: web, v: "2"}}]
    toPorts: [{ports: [{port: "6050", protocol: TCP}]}]
"#,
    ),
    (
        "a.yaml",
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: a2, namespace: x}
spec:
  endpointSelector: {}
  ingress:
  - fromEndpoints: [{}]
  - fromEntities: [world]
    toPorts: [{ports: [{port: http}]}]
  egress:
  - toEndpoints: [{matchLabels: {app: db}}]
    toPorts: [{ports: [{port: http, protocol: TCP}]}]
  - toEndpoints: [{matchExpressions: [{key: app, operator: NotIn, values: [web]}]}]
"#,
    ),
    (
        "b.yaml",
        r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: b1}
spec:
  endpointSelector: {matchLabels: {app: web}}
  egress:
  - toEntities: [cluster]
  - toCIDRSet: [{cidr: 0.0.0.0/0, except: [10.0.0.0/8, 192.168.0.0/16]}]
    toPorts: [{ports: [{port: "443"}]}]
  - toCIDR: [10.1.0.0/16, "fd00::/8"]
  egressDeny:
  - toCIDR: [10.1.2.0/24]
    toPorts: [{ports: [{port: "22", protocol: TCP}]}]
---
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: b-host}
spec:
  nodeSelector: {}
  ingress:
  - fromEntities: [cluster, remote-node]
  - fromCIDR: [10.0.0.0/8]
    toPorts: [{ports: [{port: "22", protocol: TCP}]}]
"#,
    ),
    (
        "b.yaml",
        r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: b2}
spec:
  endpointSelector: {}
  enableDefaultDeny: {ingress: false}
  ingressDeny:
  - fromEntities: [world]
    icmps: [{fields: [{type: 8, family: IPv4}]}]
  ingress:
  - fromCIDRSet: [{cidr: 10.0.0.0/8, except: [10.1.0.0/16]}]
"#,
    ),
    (
        "c.yaml",
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: c1, namespace: x}
spec:
  endpointSelector: {matchLabels: {app: a}}
  egress:
  - toEndpoints: [{matchLabels: {"k8s:io.kubernetes.pod.namespace": y}}]
    toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules: {dns: [{matchPattern: "*.example.com"}, {matchName: api.example.com}]}
  - toFQDNs: [{matchPattern: "*.example.com"}]
    toPorts: [{ports: [{port: "443", protocol: TCP}]}]
  - toFQDNs: [{matchName: api.example.com}, {matchPattern: "*.org"}]
"#,
    ),
    (
        "c.yaml",
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: c2, namespace: y}
spec:
  endpointSelector: {}
  egress:
  - toFQDNs: [{matchPattern: "*.org"}]
    toPorts: [{ports: [{port: "80", protocol: TCP}, {port: "8000", endPort: 8080, protocol: TCP}]}]
  - toEntities: [world-ipv4]
    toPorts: [{ports: [{port: "123", protocol: UDP}]}]
"#,
    ),
    (
        "d.yaml",
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: d1, namespace: y}
spec:
  podSelector: {matchLabels: {app: db}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from:
    - namespaceSelector: {}
      podSelector: {matchLabels: {app: web}}
    - ipBlock: {cidr: 192.168.0.0/16, except: [192.168.7.0/24]}
    ports: [{port: http}, {port: 9000, endPort: 9010, protocol: UDP}]
  egress:
  - to: [{podSelector: {}}]
"#,
    ),
];

const FQDN_SELS: &[&str] = &["*.example.com.", "api.example.com.", "*.org."];
const IPS: &[&str] = &[
    "10.0.0.1",
    "10.0.0.2",
    "10.1.2.3",
    "10.1.9.9",
    "192.168.7.1",
    "192.168.8.1",
    "8.8.8.8",
    "fd00::5",
    "2001:db8::1",
];

fn random_endpoint(r: &mut Rng) -> Endpoint {
    let id = 1 + r.below(6) as u16;
    let app = *r.pick(&["a", "web", "db", "b"]);
    let ns = *r.pick(&["x", "y"]);
    let mut labels = vec![("app", app)];
    if r.below(3) == 0 {
        labels.push(("v", "2"));
    }
    // Addresses are unique per endpoint id so that two endpoints never share one.
    let ips: Vec<String> = match r.below(3) {
        0 => vec![],
        1 => vec![format!("10.0.1.{id}")],
        _ => vec![format!("10.0.1.{id}"), format!("fd00::1:{id}")],
    };
    let ips: Vec<&str> = ips.iter().map(|s| s.as_str()).collect();
    let mut e = ep(id, &format!("ep{id}"), ns, &labels, &ips);
    if r.below(2) == 0 {
        let port = *r.pick(&[80u16, 8080, 9005]);
        let proto = *r.pick(&[Protocol::Tcp, Protocol::Udp]);
        e.named_ports.insert("http".into(), (port, proto));
    }
    e
}

fn rebuild_fresh(e: &Engine, held: &[LabelSet]) -> Engine {
    let ids = IdentityAllocator::from_persisted(&e.identities().to_persisted()).unwrap();
    let mut f = Engine::new(ids, e.proxy_ports());
    let sources: Vec<(String, Vec<Policy>)> = e
        .sources
        .iter()
        .map(|(s, (pols, _))| (s.clone(), pols.iter().map(|p| (**p).clone()).collect()))
        .collect();
    f.set_policy_sources(sources);
    for l in held {
        f.upsert_identity(l.clone());
    }
    for st in e.endpoints.values() {
        f.upsert_endpoint(st.ep.clone());
    }
    for (p, id) in &e.fqdn_prefixes {
        f.upsert_prefix(*p, *id);
    }
    f
}

fn compare_fresh(e: &Engine, held: &[LabelSet]) {
    let f = rebuild_fresh(e, held);
    for i in e.identities().iter() {
        assert_eq!(
            f.identities().get(i.id),
            Some(i),
            "identity {} ({} users) missing in fresh engine; endpoints: {:?}",
            i.id,
            e.identities().refs(i.id),
            e.endpoints
                .values()
                .map(|s| (s.ep.id, s.identity))
                .collect::<Vec<_>>()
        );
    }
    assert_eq!(f.ipcache, e.ipcache, "fresh ipcache");
    for (id, st) in &e.endpoints {
        let fm = f.map_state(*id).unwrap();
        assert_eq!(f.endpoint_identity(*id), Some(st.identity));
        assert!(
            *fm == st.map,
            "endpoint {id}: fresh engine differs: {:?}",
            st.map.diff(fm)
        );
    }
}

#[test]
fn incremental_equals_full_random_sequences() {
    let (mut seen_local, mut seen_deny, mut seen_redirect) = (false, false, false);
    for seed in 1..=12u64 {
        let mut r = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let mut e = engine();
        let mut m = Mirror::new(&e);
        let policies: Vec<(String, Vec<Policy>)> = VARIANTS
            .iter()
            .map(|(f, y)| (f.to_string(), pols(f, y)))
            .collect();
        let mut held: Vec<(u32, LabelSet)> = Vec::new();
        for step in 0..120 {
            let c = match r.below(9) {
                0 | 1 => {
                    let (file, p) = r.pick(&policies).clone();
                    let p = if r.below(4) == 0 { vec![] } else { p };
                    e.set_policies(&file, p)
                }
                2 | 3 => e.upsert_endpoint(random_endpoint(&mut r)),
                4 => e.remove_endpoint(1 + r.below(6) as u16),
                5 => {
                    let mut sels: Vec<FqdnSelector> = Vec::new();
                    for s in FQDN_SELS {
                        if r.below(2) == 0 {
                            let sel = if s.contains('*') {
                                FqdnSelector::MatchPattern(
                                    crate::fqdn::FqdnPattern::parse(s).unwrap(),
                                )
                            } else {
                                FqdnSelector::MatchName(DnsName::parse_match_name(s).unwrap())
                            };
                            sels.push(sel);
                        }
                    }
                    let a: IpAddr = r.pick(IPS).parse().unwrap();
                    let labels = e.fqdn_identity_labels(&sels, a);
                    let (id, c) = e.upsert_identity(labels.clone());
                    held.push((id, labels));
                    let c2 = e.upsert_prefix(IpNet::from(a), id);
                    m.apply(&c);
                    c2
                }
                6 if !held.is_empty() => {
                    let i = r.below(held.len());
                    let (id, _) = held.swap_remove(i);
                    let mut c = Changes::default();
                    if !held.iter().any(|(h, _)| *h == id) {
                        let stale: Vec<IpNet> = e
                            .fqdn_prefixes
                            .iter()
                            .filter(|(_, v)| **v == id)
                            .map(|(p, _)| *p)
                            .collect();
                        for p in stale {
                            let d = e.delete_prefix(p);
                            m.apply(&d);
                        }
                    }
                    c.merge(e.release_identity(id));
                    c
                }
                7 => {
                    if r.below(3) == 0 {
                        e.remove_endpoint(100)
                    } else {
                        let role = *r.pick(&["worker", "edge"]);
                        e.upsert_endpoint(host(100, &[("node-role", role)], &["192.168.1.10"]))
                    }
                }
                _ => {
                    let ports = if r.below(2) == 0 {
                        PORTS
                    } else {
                        ProxyPorts { http: 1, ..PORTS }
                    };
                    e.set_proxy_ports(ports)
                }
            };
            m.apply(&c);
            m.check(&e);
            verify(&e);
            for st in e.endpoints.values() {
                for (k, v) in st.map.entries() {
                    seen_local |= k.identity & LOCAL_IDENTITY_FLAG != 0;
                    seen_deny |= v.deny;
                    seen_redirect |= v.proxy_port != 0;
                }
            }
            if step % 15 == 14 {
                let labels: Vec<LabelSet> = held.iter().map(|(_, l)| l.clone()).collect();
                compare_fresh(&e, &labels);
            }
        }
    }
    // The sequences reach the interesting cases.
    assert!(seen_local && seen_deny && seen_redirect);
}

// ---------------------------------------------------------------- scale

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// The issue's scale: 1,000 endpoints × 10,000 rules. Run with
/// `cargo test --release -p policy --lib scale -- --ignored --nocapture`.
#[test]
#[ignore]
fn scale_full_incremental_and_lookup() {
    use crate::error::Span;
    use crate::fqdn::FqdnPattern;
    use crate::labels::{LabelKey, LabelSelector, Operator, Requirement};
    use crate::model::{
        CidrSelector, Entity, PeerRule, PeerSelector, PolicyKind, PortProtocol, PortRule, Rule,
        Subject,
    };
    use std::time::Instant;

    let sel = |pairs: &[(&str, String)]| LabelSelector {
        requirements: pairs
            .iter()
            .map(|(k, v)| Requirement {
                key: LabelKey::parse(k),
                op: Operator::In(vec![v.clone()]),
            })
            .collect(),
    };
    let ns = ("k8s:io.kubernetes.pod.namespace", "default".to_string());
    let port = |p: u16, end: Option<u16>, proto| PortRule {
        ports: vec![PortProtocol {
            port: Port::Number(p),
            end_port: end,
            protocol: proto,
        }],
        l7: None,
        server_names: vec![],
    };
    let mut files: Vec<(String, Vec<Policy>)> = Vec::new();
    for f in 0..10 {
        let mut rules = Vec::new();
        for j in 0..1000 {
            let i = f * 1000 + j;
            let peer = |peers, ports| PeerRule {
                peers,
                ports,
                icmps: vec![],
                span: Span::new(j as u32 + 1, 3),
            };
            let (ingress, egress) = match i % 5 {
                0 => (
                    vec![],
                    vec![peer(
                        Peers::Selectors(vec![PeerSelector::Endpoints(sel(&[
                            ("app", format!("app-{}", (i * 7) % 100)),
                            ns.clone(),
                        ]))]),
                        vec![port(80 + (i % 50) as u16, None, Protocol::Tcp)],
                    )],
                ),
                1 => (
                    vec![],
                    vec![peer(
                        Peers::Selectors(vec![PeerSelector::Cidr(CidrSelector {
                            cidr: format!("10.{}.0.0/16", i % 256).parse().unwrap(),
                            except: vec![format!("10.{}.1.0/24", i % 256).parse().unwrap()],
                        })]),
                        vec![port(443, None, Protocol::Tcp)],
                    )],
                ),
                2 => (
                    vec![],
                    vec![peer(
                        Peers::Selectors(vec![PeerSelector::Entity(if i % 2 == 0 {
                            Entity::World
                        } else {
                            Entity::Cluster
                        })]),
                        vec![port(8000, Some(8000 + (i % 100) as u16), Protocol::Any)],
                    )],
                ),
                3 => (
                    vec![],
                    vec![peer(
                        Peers::Fqdns(vec![FqdnSelector::MatchPattern(
                            FqdnPattern::parse(&format!("*.svc{}.example.com", i % 10)).unwrap(),
                        )]),
                        vec![port(443, None, Protocol::Tcp)],
                    )],
                ),
                _ => (
                    vec![peer(
                        Peers::Selectors(vec![PeerSelector::Endpoints(sel(&[
                            ("app", format!("app-{}", (i * 3) % 100)),
                            ns.clone(),
                        ]))]),
                        vec![],
                    )],
                    vec![],
                ),
            };
            rules.push(Rule {
                subject: Subject::Endpoints(sel(&[
                    ("app", format!("app-{}", i % 100)),
                    ns.clone(),
                ])),
                allow: PerDir { ingress, egress },
                deny: PerDir::default(),
                default_deny: PerDir {
                    ingress: true,
                    egress: true,
                },
                has_direction: PerDir {
                    ingress: true,
                    egress: true,
                },
                requires: PerDir::default(),
                description: None,
                span: Span::new(j as u32 + 1, 1),
            });
        }
        let file = format!("f{f}.yaml");
        files.push((
            file.clone(),
            vec![Policy {
                kind: PolicyKind::CiliumNetworkPolicy,
                name: format!("p{f}"),
                namespace: Some("default".into()),
                file: file.as_str().into(),
                span: Span::new(1, 1),
                rules,
            }],
        ));
    }
    let endpoints: Vec<Endpoint> = (0..1000u16)
        .map(|j| {
            let mut e = ep(
                j + 1,
                &format!("ep{j}"),
                "default",
                &[
                    ("app", &format!("app-{}", j % 100)),
                    ("idx", &j.to_string()),
                ],
                &[],
            );
            e.ips = vec![IpAddr::from([10, 200, (j / 256) as u8, (j % 256) as u8])];
            e
        })
        .collect();

    let rss0 = peak_rss_kib();
    let mut e = engine();
    let t = Instant::now();
    for x in &endpoints {
        e.upsert_endpoint(x.clone());
    }
    let t_eps = t.elapsed();
    let t = Instant::now();
    let c = e.set_policy_sources(files.clone());
    let t_full = t.elapsed();
    let entries: usize = e.endpoints.values().map(|s| s.map.len()).sum();
    println!(
        "full: endpoints {t_eps:?}, 10,000 rules onto 1,000 endpoints {t_full:?}; {entries} entries, {} endpoint diffs; peak RSS {} MiB (+{} MiB)",
        c.maps.len(),
        peak_rss_kib() / 1024,
        (peak_rss_kib() - rss0) / 1024
    );
    drop(c);

    // One FQDN identity that the rules of 100 endpoints select.
    let labels = fqdn_labels(&["*.svc3.example.com."]);
    let t = Instant::now();
    let (fid, c) = e.upsert_identity(labels);
    let t_incr = t.elapsed();
    // The rules of 100 endpoints name the selector; `world` rules of others select it too.
    assert!(c.maps.len() >= 100);
    println!(
        "incremental: one FQDN identity for {} endpoints {t_incr:?} ({} entries); ratio to full {:.0}x",
        c.maps.len(),
        c.maps.iter().map(|(_, d)| d.adds.len()).sum::<usize>(),
        t_full.as_secs_f64() / t_incr.as_secs_f64()
    );
    let t = Instant::now();
    let c = e.release_identity(fid);
    println!(
        "incremental release: {:?} ({} endpoints)",
        t.elapsed(),
        c.maps.len()
    );
    for sels in [
        &["*.svc8.example.com."][..],
        &["*.svc3.example.com.", "*.svc8.example.com."],
        &["*.svc3.example.com."],
    ] {
        let (mut adds, mut rels) = (Vec::new(), Vec::new());
        let (mut n_add, mut n_rel) = (0, 0);
        for _ in 0..25 {
            let t = Instant::now();
            let (id, c) = e.upsert_identity(fqdn_labels(sels));
            adds.push(t.elapsed());
            let t = Instant::now();
            let r = e.release_identity(id);
            rels.push(t.elapsed());
            (n_add, n_rel) = (c.maps.len(), r.maps.len());
        }
        adds.sort();
        rels.sort();
        println!(
            "incremental {sels:?} (25 runs): add min {:?} median {:?} ({n_add} endpoints), \
             release min {:?} median {:?} ({n_rel} endpoints)",
            adds[0], adds[12], rels[0], rels[12]
        );
    }

    // Policies first, then endpoints.
    let mut e2 = engine();
    let t = Instant::now();
    e2.set_policy_sources(files);
    let t_pol = t.elapsed();
    let t = Instant::now();
    for x in &endpoints {
        e2.upsert_endpoint(x.clone());
    }
    println!(
        "full (policies first): policies {t_pol:?}, then endpoints {:?}",
        t.elapsed()
    );
    drop(e2);

    // Lookups.
    let ms = e.map_state(1).unwrap();
    let ids: Vec<u32> = e.identities().iter().map(|i| i.id).collect();
    let n = 2_000_000u32;
    let t = Instant::now();
    let mut allowed = 0u32;
    for k in 0..n {
        let id = ids[(k as usize * 7919) % ids.len()];
        let l = ms.lookup(id, Egress, 6, 80 + (k % 64) as u16);
        allowed += u32::from(l.verdict == Allow);
    }
    let per = t.elapsed() / n;
    println!(
        "lookup: {per:?} per verdict ({allowed} allowed of {n}); map of endpoint 1: {} entries",
        ms.len()
    );
}

#[test]
fn a_policy_change_touches_only_selected_endpoints_and_keeps_identities() {
    let mut e = engine();
    let mut m = Mirror::new(&e);
    m.apply(&e.upsert_endpoint(ep(1, "a", "x", &[("app", "a")], &[])));
    m.apply(&e.upsert_endpoint(ep(2, "b", "x", &[("app", "b")], &[])));
    m.apply(&e.set_policies(
        "world.yaml",
        pols(
            "world.yaml",
            r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: b-out, namespace: x}
spec:
  endpointSelector: {matchLabels: {app: b}}
  egress: [{toCIDR: [0.0.0.0/0]}]
"#,
        ),
    ));
    let v1 = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: a-out, namespace: x}
spec:
  endpointSelector: {matchLabels: {app: a}}
  egress:
  - toCIDR: [10.0.0.0/8]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"#;
    let c = e.set_policies("a.yaml", pols("a.yaml", v1));
    m.apply(&c);
    // a is recomputed; b only gains the new CIDR identity (its 0.0.0.0/0 rule selects it).
    let cidr = c.identities_added[0];
    let b_diff = &c.maps.iter().find(|(id, _)| *id == 2).unwrap().1;
    assert!(b_diff.adds.iter().all(|(k, _)| k.identity == cidr));
    assert!(b_diff.deletes.is_empty());
    // Same prefix, another port: the identity stays, only a changes.
    let v2 = v1.replace("\"80\"", "\"443\"");
    let c = e.set_policies("a.yaml", pols("a.yaml", &v2));
    assert!(c.identities_added.is_empty() && c.identities_removed.is_empty());
    assert!(c.ipcache_upserts.is_empty() && c.ipcache_deletes.is_empty());
    assert!(!c.prefixes_changed);
    assert_eq!(
        c.maps.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        vec![1]
    );
    m.apply(&c);
    m.check(&e);
    verify(&e);
    assert_eq!(look(&e, 1, Egress, cidr, Protocol::Tcp, 443), Allow);
    assert_eq!(look(&e, 1, Egress, cidr, Protocol::Tcp, 80), NoMatch);
    // An unrelated file changes nothing in either map.
    let c = e.set_policies(
        "other.yaml",
        pols(
            "other.yaml",
            r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: other, namespace: y}
spec:
  endpointSelector: {}
  ingress: [{}]
"#,
        ),
    );
    assert!(c.maps.is_empty());
    assert_eq!(
        e.sources().collect::<Vec<_>>(),
        vec!["a.yaml", "other.yaml", "world.yaml"]
    );
    assert_eq!(e.policies().count(), 3);
}

#[test]
fn dns_matcher_is_cached_and_follows_policy_changes() {
    let mut e = engine();
    e.upsert_endpoint(ep(1, "a", "x", &[("app", "a")], &[]));
    e.upsert_endpoint(ep(
        9,
        "dns",
        "kube-system",
        &[("k8s-app", "kube-dns")],
        &["10.96.0.10"],
    ));
    e.set_policies("f.yaml", pols("f.yaml", FQDN_POLICY));
    let dns = id_of(&e, 9);
    let yes = DnsName::new("api.example.com");
    let m1 = e.dns_matcher(1, dns, 53, Protocol::Udp).unwrap();
    assert!(m1.allows(&yes) && !m1.allows(&DnsName::new("example.org")));
    assert_eq!(
        m1.verdict(),
        &e.dns_rules_for(1, dns, 53, Protocol::Udp).unwrap()
    );
    let m2 = e.dns_matcher(1, dns, 53, Protocol::Udp).unwrap();
    assert!(Arc::ptr_eq(&m1, &m2));
    // Learning (identities, prefixes) keeps the prepared matcher.
    let (fid, _) = e.upsert_identity(fqdn_labels(&["*.example.com."]));
    e.upsert_prefix("93.184.216.34/32".parse().unwrap(), fid);
    assert!(Arc::ptr_eq(
        &m1,
        &e.dns_matcher(1, dns, 53, Protocol::Udp).unwrap()
    ));
    // A policy change starts over.
    e.set_policies("f.yaml", vec![]);
    let m3 = e.dns_matcher(1, dns, 53, Protocol::Udp).unwrap();
    assert!(!Arc::ptr_eq(&m1, &m3));
    assert_eq!(m3.verdict(), &DnsVerdict::Unrestricted);
    assert!(e.dns_matcher(42, dns, 53, Protocol::Udp).is_none());
}
