//! A standalone machine with no workloads: the host is the only endpoint, and a host policy
//! (CiliumClusterwideNetworkPolicy with `nodeSelector`) restricts the names the host's own
//! processes may resolve. Real `fqdnwall run`, a real unbound upstream serving a test zone,
//! real `dig` sending from the host's loopback addresses.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use common::*;

/// The upstream's address: a loopback address of its own (none of the host's addresses in
/// the config), so it never meets a resolver of the machine or another test's upstream.
const UPSTREAM_IP: &str = "127.0.0.163";
/// Addresses the host's processes send from (both are `host.ips`).
const HOST_IPS: [&str; 2] = ["127.0.0.1", "127.0.0.61"];
/// An address that belongs to no endpoint.
const STRANGER: &str = "127.0.0.62";

const ZONES: &[(&str, &str)] = &[
    (
        "allowed.test.",
        r#"$ORIGIN allowed.test.
$TTL 300
@ IN SOA ns.allowed.test. admin.allowed.test. 1 3600 600 86400 5
@ IN NS ns.allowed.test.
@ 60 IN A 192.0.2.1
ns IN A 127.0.0.1
www 60 IN A 192.0.2.10
api 60 IN A 192.0.2.11
api 60 IN AAAA 2001:db8::11
deep.sub 60 IN A 192.0.2.12
"#,
    ),
    (
        "denied.test.",
        r#"$ORIGIN denied.test.
$TTL 300
@ IN SOA ns.denied.test. admin.denied.test. 1 3600 600 86400 5
@ IN NS ns.denied.test.
ns IN A 127.0.0.1
www 60 IN A 192.0.2.66
"#,
    ),
];

/// The whole config of a VM firewall: no `endpoints`, the host and its addresses.
fn config(dir: &Path, upstream: SocketAddr) -> String {
    let text = format!(
        r#"policyDir: policies
stateDir: state
datapath: none
dns:
  listen: ["127.0.0.1:0"]
  upstreams: ["{upstream}"]
  forwardTimeout: 3s
host:
  labels: {{role: vm}}
  ips: ["{}", "{}", "::1"]
metrics:
  listen: 127.0.0.1:0
"#,
        HOST_IPS[0], HOST_IPS[1]
    );
    write(dir, "config.yaml", &text);
    dir.join("config.yaml").display().to_string()
}

/// The host may resolve `*.allowed.test` through the upstream, and reach the learned IPs on
/// port 443.
fn host_policy(upstream: SocketAddr) -> String {
    format!(
        r#"apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata:
  name: host-dns
spec:
  nodeSelector:
    matchLabels: {{role: vm}}
  egress:
    - toCIDR: ["{ip}/32"]
      toPorts:
        - ports: [{{port: "{port}", protocol: ANY}}]
          rules:
            dns:
              - matchPattern: "*.allowed.test"
    - toFQDNs:
        - matchPattern: "*.allowed.test"
      toPorts:
        - ports: [{{port: "443", protocol: TCP}}]
"#,
        ip = upstream.ip(),
        port = upstream.port()
    )
}

fn status(a: &Agent, src: &str, name: &str, qtype: &str, tcp: bool) -> (String, Vec<String>) {
    let r = dig(&a.dns, src, name, qtype, tcp)
        .unwrap_or_else(|| panic!("no reply for {name} {qtype} from {src} (tcp: {tcp})"));
    (r.status, r.answers)
}

fn trace_host(a: &Agent, dst: &str, dport: &str) -> String {
    let o = a.cmd(&[
        "-o",
        "json",
        "policy",
        "trace",
        "--src",
        "entity:host",
        "--dst",
        dst,
        "--dport",
        dport,
    ]);
    let c = code(&o);
    assert!(c == 0 || c == 1, "trace failed: {}", stderr(&o));
    json(&o)["verdict"].as_str().unwrap().to_string()
}

#[test]
fn host_policy_dns_rules_restrict_the_hosts_own_names() {
    let ip: IpAddr = UPSTREAM_IP.parse().unwrap();
    let Some(up) = Unbound::start_zones(ip, free_port(ip), ZONES, "www.denied.test") else {
        return;
    };
    let d = tempdir();
    let cfg = config(d.path(), up.addr);
    write(d.path(), "policies/host.yaml", &host_policy(up.addr));
    let sock = d.path().join("api.sock");
    let a = Agent::start(&["--config", &cfg], &sock);

    // The host is the only endpoint, and the host policy enforces its egress.
    let st = a.json(&["status"]);
    assert_eq!(st["endpoints"], 1, "{st}");
    let eps = a.json(&["endpoint", "list"]);
    let eps = eps.as_array().unwrap();
    assert_eq!(eps.len(), 1, "{eps:?}");
    assert_eq!(eps[0]["name"], "host");
    assert_eq!(eps[0]["identity"], 1);
    assert_eq!(
        eps[0]["policyEnforcement"],
        serde_json::json!({"ingress": false, "egress": true})
    );
    // The DNS flow to the upstream is redirected to the proxy.
    let rows = a.json(&["bpf", "policy", "get", "host"]);
    assert!(
        rows.as_array()
            .unwrap()
            .iter()
            .any(|r| r["direction"] == "Egress"
                && r["port"] == up.addr.port()
                && r["proxyPort"] == a.dns.port()),
        "{rows}"
    );

    // Before any lookup the IP is not reachable on 443.
    assert_eq!(trace_host(&a, "ip:192.0.2.10", "443"), "denied");

    // Allowed names answer, from every host address, over UDP and TCP.
    for src in HOST_IPS {
        for tcp in [false, true] {
            let (s, ans) = status(&a, src, "www.allowed.test", "A", tcp);
            assert_eq!(s, "NOERROR", "from {src} (tcp: {tcp})");
            assert_eq!(ans, vec!["192.0.2.10"]);
        }
    }
    let (s, ans) = status(&a, HOST_IPS[1], "API.Allowed.Test.", "AAAA", false);
    assert_eq!(s, "NOERROR", "names compare case-insensitively");
    assert_eq!(ans, vec!["2001:db8::11"]);

    // Every other name gets REFUSED with no answer: another zone, the zone's apex, two
    // labels under it (`*` never spans a dot), a name that only ends like it.
    for (name, tcp) in [
        ("www.denied.test", false),
        ("www.denied.test", true),
        ("allowed.test", false),
        ("deep.sub.allowed.test", false),
        ("www.allowed.test.denied.test", false),
    ] {
        for src in HOST_IPS {
            let (s, ans) = status(&a, src, name, "A", tcp);
            assert_eq!(s, "REFUSED", "{name} from {src} (tcp: {tcp})");
            assert!(ans.is_empty(), "{name}: {ans:?}");
        }
    }
    // An address that belongs to no endpoint is refused too.
    assert_eq!(
        status(&a, STRANGER, "www.allowed.test", "A", false).0,
        "REFUSED"
    );

    // The answers were learned for the host, and the toFQDNs rule selects them.
    let rows = a.json(&["fqdn", "cache", "list", "--endpoint", "host"]);
    let names: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"www.allowed.test."), "{rows}");
    assert!(!names.iter().any(|n| n.contains("denied")), "{rows}");
    assert_eq!(trace_host(&a, "ip:192.0.2.10", "443"), "allowed");
    assert_eq!(trace_host(&a, "ip:192.0.2.10", "80"), "denied");

    // Without the policy the host may resolve anything again (hot reload).
    std::fs::remove_file(d.path().join("policies/host.yaml")).unwrap();
    eventually(Duration::from_secs(10), "the policy to go", || {
        let (s, _) = status(&a, HOST_IPS[1], "www.denied.test", "A", false);
        (s == "NOERROR").then_some(())
    });
    a.stop();
}
