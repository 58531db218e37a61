//! DNS rules in host policies (`nodeSelector`): the host endpoint gets DNS verdicts and
//! `toFQDNs` selections exactly as a workload endpoint with the same rules does. This is what
//! lets a machine with no workloads — the host as its only endpoint — restrict the names its
//! own processes resolve.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use policy::engine::{DnsVerdict, Engine, ProxyPorts};
use policy::fqdn::{DnsName, FqdnPattern};
use policy::identity::{reserved, IdentityAllocator, NumericIdentity};
use policy::labels::{Label, LabelSet};
use policy::mapstate::LookupVerdict;
use policy::model::{Direction, Endpoint, FqdnSelector, L7Kind, Protocol};
use policy::parse::parse_policies;
use policy::trace::{trace, AuditModes, TracePeer, Verdict};

const PROXY: ProxyPorts = ProxyPorts {
    dns: 10053,
    http: 10080,
    kafka: 10092,
};

const HOST_ID: u16 = 1;
const WORKLOAD_ID: u16 = 7;
/// A resolver that is none of the node's addresses (identity world-ipv4).
const RESOLVER: &str = "127.0.0.153";
/// A resolver on one of the host's own addresses (identity host).
const LOCAL_RESOLVER: &str = "127.0.0.1";

/// The host policy, and the same egress rules for a workload (`app: vm`).
const RULES: &str = r#"  egress:
  - toEntities: [world]
    toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules:
        dns:
        - matchPattern: "*.allowed.test"
        - matchName: exact.other.test
  - toEntities: [host]
    toPorts:
    - ports: [{port: "53", protocol: UDP}]
      rules:
        dns:
        - matchPattern: "**.local.test"
  - toFQDNs:
    - matchPattern: "*.allowed.test"
    toPorts:
    - ports: [{port: "443", protocol: TCP}]
"#;

fn host_policy(selector: &str) -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata:\n  name: host-dns\nspec:\n  nodeSelector: {selector}\n{RULES}"
    )
}

fn workload_policy() -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: vm-dns\n  namespace: default\nspec:\n  endpointSelector:\n    matchLabels: {{app: vm}}\n{RULES}"
    )
}

fn host() -> Endpoint {
    Endpoint {
        id: HOST_ID,
        name: "host".into(),
        labels: LabelSet::new(vec![Label::reserved("host"), Label::k8s("role", "vm")]),
        ips: vec!["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()],
        named_ports: BTreeMap::new(),
        is_host: true,
    }
}

fn workload() -> Endpoint {
    Endpoint {
        id: WORKLOAD_ID,
        name: "vm".into(),
        labels: LabelSet::new(vec![
            Label::k8s("app", "vm"),
            Label::k8s("io.kubernetes.pod.namespace", "default"),
        ]),
        ips: vec!["127.0.0.7".parse().unwrap()],
        named_ports: BTreeMap::new(),
        is_host: false,
    }
}

fn engine(files: &[(&str, String)]) -> Engine {
    let mut e = Engine::new(IdentityAllocator::new(), PROXY);
    e.upsert_endpoint(host());
    e.upsert_endpoint(workload());
    for (file, text) in files {
        let p = parse_policies(file, text).unwrap_or_else(|d| {
            panic!(
                "{file}: {}",
                d.iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        });
        e.set_policies(file, p);
    }
    e
}

fn server_identity(e: &Engine, ip: &str) -> NumericIdentity {
    e.ipcache().identity_of(ip.parse().unwrap())
}

/// Whether endpoint `ep` may resolve `name` through `server` on `port`/`proto`, as the DNS
/// proxy asks it (the cached, indexed matcher), checked against the plain verdict.
fn allows(e: &Engine, ep: u16, server: &str, port: u16, proto: Protocol, name: &str) -> bool {
    let id = server_identity(e, server);
    let m = e.dns_matcher(ep, id, port, proto).expect("known endpoint");
    let v = e
        .dns_rules_for(ep, id, port, proto)
        .expect("known endpoint");
    let n = DnsName::new(name);
    assert_eq!(
        m.allows(&n),
        v.allows(&n),
        "matcher and verdict disagree on {name} for endpoint {ep}"
    );
    m.allows(&n)
}

const NAMES: &[&str] = &[
    "a.allowed.test",
    "WWW.Allowed.Test.",
    "allowed.test",
    "a.b.allowed.test",
    "a.allowed.test.evil",
    "exact.other.test",
    "sub.exact.other.test",
    "denied.test",
    "x.local.test",
    "x.y.local.test",
    "local.test",
];

#[test]
fn the_host_endpoint_gets_dns_verdicts_from_its_host_policy() {
    let e = engine(&[("host.yaml", host_policy("{matchLabels: {role: vm}}"))]);
    assert_eq!(server_identity(&e, RESOLVER), reserved::WORLD_IPV4);
    assert_eq!(server_identity(&e, LOCAL_RESOLVER), reserved::HOST);
    assert_eq!(e.endpoint_identity(HOST_ID), Some(reserved::HOST));

    // The host's egress to a resolver on port 53 is redirected to the DNS proxy.
    let map = e.map_state(HOST_ID).unwrap();
    for proto in [Protocol::Udp, Protocol::Tcp] {
        let l = map.lookup(reserved::WORLD_IPV4, Direction::Egress, proto.number(), 53);
        assert_eq!(l.verdict, LookupVerdict::Allow);
        assert_eq!(l.proxy_port, PROXY.dns);
        assert_eq!(l.entry.unwrap().l7, Some(L7Kind::Dns));
    }
    assert!(e.enforcement(HOST_ID).unwrap().egress);

    // Through the remote resolver: `*.allowed.test` and the exact name, over UDP and TCP.
    for proto in [Protocol::Udp, Protocol::Tcp] {
        let got: Vec<&str> = NAMES
            .iter()
            .copied()
            .filter(|n| allows(&e, HOST_ID, RESOLVER, 53, proto, n))
            .collect();
        assert_eq!(
            got,
            ["a.allowed.test", "WWW.Allowed.Test.", "exact.other.test"],
            "{proto:?}"
        );
    }
    // Through the resolver on the host's own address (entity host): `**.local.test`, UDP only.
    let got: Vec<&str> = NAMES
        .iter()
        .copied()
        .filter(|n| allows(&e, HOST_ID, LOCAL_RESOLVER, 53, Protocol::Udp, n))
        .collect();
    assert_eq!(got, ["x.local.test", "x.y.local.test"]);
    assert!(!allows(
        &e,
        HOST_ID,
        LOCAL_RESOLVER,
        53,
        Protocol::Tcp,
        "x.local.test"
    ));

    // The verdict names the host policy; a port nothing allows is denied by default deny,
    // with the enforcing rule.
    let id = server_identity(&e, RESOLVER);
    let m = e.dns_matcher(HOST_ID, id, 53, Protocol::Udp).unwrap();
    let rule = m.matching_rule(&DnsName::new("a.allowed.test")).unwrap();
    assert_eq!(&*rule.policy, "host-dns");
    assert_eq!(&*rule.file, "host.yaml");
    match e.dns_rules_for(HOST_ID, id, 5353, Protocol::Udp).unwrap() {
        DnsVerdict::Denied { rules } => {
            assert!(rules.iter().any(|r| &*r.policy == "host-dns"), "{rules:?}")
        }
        v => panic!("port 5353 should be denied, got {v:?}"),
    }

    // The workload is not selected by a nodeSelector: unrestricted.
    assert_eq!(
        e.dns_rules_for(WORKLOAD_ID, id, 53, Protocol::Udp),
        Some(DnsVerdict::Unrestricted)
    );
}

#[test]
fn a_node_selector_that_does_not_match_leaves_the_host_unrestricted() {
    let e = engine(&[("host.yaml", host_policy("{matchLabels: {role: db}}"))]);
    let id = server_identity(&e, RESOLVER);
    assert_eq!(
        e.dns_rules_for(HOST_ID, id, 53, Protocol::Udp),
        Some(DnsVerdict::Unrestricted)
    );
    assert!(allows(
        &e,
        HOST_ID,
        RESOLVER,
        53,
        Protocol::Udp,
        "denied.test"
    ));
}

#[test]
fn the_host_is_judged_exactly_like_a_workload_with_the_same_rules() {
    let mut e = engine(&[
        ("host.yaml", host_policy("{}")),
        ("vm.yaml", workload_policy()),
    ]);
    let servers = [RESOLVER, LOCAL_RESOLVER, "192.0.2.53"];
    let compare = |e: &Engine| {
        for server in servers {
            for port in [53, 5353] {
                for proto in [Protocol::Udp, Protocol::Tcp, Protocol::Sctp] {
                    for name in NAMES {
                        assert_eq!(
                            allows(e, HOST_ID, server, port, proto, name),
                            allows(e, WORKLOAD_ID, server, port, proto, name),
                            "{name} via {server}:{port}/{proto:?}"
                        );
                    }
                }
            }
        }
    };
    compare(&e);

    // toFQDNs: an IP learned for a.allowed.test is selected for both, on port 443 only.
    let sel = FqdnSelector::MatchPattern(FqdnPattern::parse("*.allowed.test").unwrap());
    assert!(e.fqdn_selectors().contains(&sel));
    let ip: IpAddr = "192.0.2.10".parse().unwrap();
    let before = |e: &Engine, ep: u16| {
        let id = e.ipcache().identity_of(ip);
        e.map_state(ep)
            .unwrap()
            .lookup(id, Direction::Egress, Protocol::Tcp.number(), 443)
            .verdict
    };
    assert_ne!(before(&e, HOST_ID), LookupVerdict::Allow);
    assert_ne!(before(&e, WORKLOAD_ID), LookupVerdict::Allow);
    let labels = e.fqdn_identity_labels(std::slice::from_ref(&sel), ip);
    let (fid, changes) = e.upsert_identity(labels);
    assert!(
        changes.maps.iter().any(|(ep, _)| *ep == HOST_ID),
        "the new FQDN identity changes the host's map: {:?}",
        changes.maps
    );
    e.upsert_prefix(IpNet::from(ip), fid);
    for ep in [HOST_ID, WORKLOAD_ID] {
        let map = e.map_state(ep).unwrap();
        let tcp = Protocol::Tcp.number();
        assert_eq!(
            map.lookup(fid, Direction::Egress, tcp, 443).verdict,
            LookupVerdict::Allow
        );
        assert_ne!(
            map.lookup(fid, Direction::Egress, tcp, 80).verdict,
            LookupVerdict::Allow
        );
    }
    // `policy trace` from the host says the same.
    let t = trace(
        &e,
        &TracePeer::Endpoint("host".into()),
        &TracePeer::Ip(ip),
        443,
        Protocol::Tcp,
        &AuditModes::default(),
    )
    .unwrap();
    assert_eq!(t.egress.verdict, Verdict::Allowed);
    assert!(t.egress.rules.iter().any(|r| &*r.policy == "host-dns"));
    let t = trace(
        &e,
        &TracePeer::Endpoint("host".into()),
        &TracePeer::Ip(ip),
        80,
        Protocol::Tcp,
        &AuditModes::default(),
    )
    .unwrap();
    assert_eq!(t.egress.verdict, Verdict::Denied);
    // Learning keeps both verdicts the same.
    compare(&e);
}

#[test]
fn removing_the_host_policy_lifts_the_name_restriction() {
    let mut e = engine(&[("host.yaml", host_policy("{}"))]);
    assert!(!allows(
        &e,
        HOST_ID,
        RESOLVER,
        53,
        Protocol::Udp,
        "denied.test"
    ));
    e.set_policies("host.yaml", vec![]);
    assert!(allows(
        &e,
        HOST_ID,
        RESOLVER,
        53,
        Protocol::Udp,
        "denied.test"
    ));
    assert_eq!(
        e.dns_rules_for(HOST_ID, reserved::WORLD_IPV4, 53, Protocol::Udp),
        Some(DnsVerdict::Unrestricted)
    );
    // And putting it back restricts again (the cached matcher does not survive the change).
    let p = parse_policies("host.yaml", &host_policy("{}")).unwrap();
    e.set_policies("host.yaml", p);
    assert!(!allows(
        &e,
        HOST_ID,
        RESOLVER,
        53,
        Protocol::Udp,
        "denied.test"
    ));
    assert!(allows(
        &e,
        HOST_ID,
        RESOLVER,
        53,
        Protocol::Udp,
        "ok.allowed.test"
    ));
}
