//! The agent (`fqdnwall run`) end to end: start-up, the local API and every live command, DNS
//! through the proxy with a real unbound upstream and real `dig`, learning and its effect on
//! `policy trace`, expiry, restart with restored state, policy hot reload, metrics, monitor,
//! and a clean stop on SIGTERM.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The upstream's address: port 53, because DNS rules name the port the query goes to, on a
/// loopback address of its own so it never meets a resolver of the machine.
const UPSTREAM_IP: &str = "127.0.0.153";

fn config(dir: &Path, upstream: SocketAddr) -> String {
    let text = format!(
        r#"policyDir: policies
stateDir: state
datapath: none
dns:
  listen: ["127.0.0.1:0"]
  upstreams: ["{upstream}"]
  forwardTimeout: 3s
endpoints:
  - name: frontend
    labels: {{app: frontend}}
    ips: ["127.0.0.2"]
  - name: backend
    labels: {{app: backend}}
    ips: ["127.0.0.3"]
metrics:
  listen: 127.0.0.1:0
"#
    );
    write(dir, "config.yaml", &text);
    dir.join("config.yaml").display().to_string()
}

const POLICY: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: frontend-dns
spec:
  endpointSelector:
    matchLabels: {app: frontend}
  egress:
    - toCIDR: ["127.0.0.153/32"]
      toPorts:
        - ports: [{port: "53", protocol: ANY}]
          rules:
            dns:
              - matchName: www.example.test
              - matchPattern: "short.example.*"
    - toFQDNs:
        - matchName: www.example.test
        - matchPattern: "short.example.test"
      toPorts:
        - ports: [{port: "443", protocol: TCP}]
    - toCIDR: ["192.0.2.0/24"]
      toPorts:
        - ports: [{port: "80", protocol: TCP}]
"#;

/// Whether the test runs as root; if not, it is skipped (`why` says what needs root), and
/// under CI it fails.
fn root(why: &str) -> bool {
    if is_root() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("the agent tests run as root in CI");
    }
    eprintln!("*** SKIPPED: {why} needs root");
    false
}

/// A real unbound on `ip`, port 53 (DNS rules name the port queries go to). Root, unbound and
/// dig are needed; without them the test is skipped (CI fails).
fn upstream_on(ip: &str) -> Option<Unbound> {
    if !root("an upstream DNS server on port 53") {
        return None;
    }
    require("dig", "bind9-dnsutils")?;
    Unbound::start_on(ip.parse().unwrap(), 53)
}

fn upstream() -> Option<Unbound> {
    upstream_on(UPSTREAM_IP)
}

fn trace_verdict(a: &Agent, dst: &str, dport: &str) -> (i32, String) {
    let o = a.cmd(&[
        "-o",
        "json",
        "policy",
        "trace",
        "--src",
        "endpoint:frontend",
        "--dst",
        dst,
        "--dport",
        dport,
    ]);
    let c = code(&o);
    assert!(c == 0 || c == 1, "trace failed: {}", stderr(&o));
    let v = json(&o);
    assert_eq!(v["mode"], "live");
    (c, v["verdict"].as_str().unwrap().to_string())
}

fn metrics(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

#[test]
fn live_api_dns_learning_trace_reload_and_restart() {
    let Some(ub) = upstream() else { return };
    let d = tempdir();
    let cfg = config(d.path(), ub.addr);
    write(d.path(), "policies/frontend.yaml", POLICY);
    let sock = d.path().join("api.sock");
    let mut a = Agent::start(&["--config", &cfg], &sock);
    assert!(a.banner[0].contains("datapath none"), "{:?}", a.banner);
    assert!(
        a.banner
            .iter()
            .any(|l| l.starts_with("Policies: 1 from 1 files")),
        "{:?}",
        a.banner
    );

    // The API socket is private to its owner.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    // status
    let st = a.json(&["status"]);
    assert_eq!(st["health"], "ok");
    assert_eq!(st["datapath"], "none");
    assert_eq!(st["endpoints"], 3);
    assert_eq!(st["dnsListen"][0], a.dns.to_string());
    assert_eq!(st["proxyPorts"]["dns"], a.dns.port());
    assert_eq!(st["policyRevision"], 1);

    // endpoint list / get
    let eps = a.json(&["endpoint", "list"]);
    let eps = eps.as_array().unwrap();
    assert_eq!(eps.len(), 3);
    let fe = eps.iter().find(|e| e["name"] == "frontend").unwrap();
    for key in [
        "id",
        "name",
        "identity",
        "labels",
        "ips",
        "policyEnforcement",
        "auditMode",
    ] {
        assert!(fe.get(key).is_some(), "endpoint list lacks {key}");
    }
    assert_eq!(fe["labels"]["k8s:app"], "frontend");
    assert_eq!(fe["ips"], serde_json::json!(["127.0.0.2"]));
    assert_eq!(
        fe["policyEnforcement"],
        serde_json::json!({"ingress": false, "egress": true})
    );
    assert_eq!(fe["auditMode"], false);
    let by_id = a.json(&["endpoint", "get", &fe["id"].to_string()]);
    assert_eq!(by_id["name"], "frontend");
    let o = a.cmd(&["endpoint", "get", "nope"]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("no endpoint \"nope\""));

    // identity list / get
    let ids = a.json(&["identity", "list"]);
    let fe_id = fe["identity"].as_u64().unwrap();
    let mine = ids
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == fe_id)
        .unwrap();
    assert!(mine["labels"]
        .as_array()
        .unwrap()
        .contains(&serde_json::json!("k8s:app=frontend")));
    assert_eq!(
        a.json(&["identity", "get", "2"])["labels"],
        serde_json::json!(["reserved:world"])
    );

    // bpf policy get: the DNS redirect to the proxy and the toFQDNs entry.
    let rows = a.json(&["bpf", "policy", "get", "frontend"]);
    let rows = rows.as_array().unwrap();
    for key in [
        "policy",
        "direction",
        "identity",
        "port",
        "endPort",
        "protocol",
        "proxyPort",
        "packets",
        "bytes",
    ] {
        assert!(rows[0].get(key).is_some(), "bpf policy get lacks {key}");
    }
    assert!(
        rows.iter().any(|r| r["direction"] == "Egress"
            && r["port"] == 53
            && r["proxyPort"] == a.dns.port()),
        "{rows:?}"
    );

    // Before any lookup the learned IP is not allowed (but its CIDR's port is).
    assert_eq!(
        trace_verdict(&a, "ip:192.0.2.10", "443"),
        (1, "denied".into())
    );
    assert_eq!(
        trace_verdict(&a, "ip:192.0.2.10", "80"),
        (0, "allowed".into())
    );

    // DNS: allowed names resolve, others are refused, over UDP and TCP.
    let r = dig(&a.dns, "127.0.0.2", "www.example.test", "A", false).expect("reply");
    assert_eq!(r.status, "NOERROR");
    assert_eq!(r.answers, vec!["192.0.2.10"]);
    let r = dig(&a.dns, "127.0.0.2", "WWW.Example.Test.", "A", true).expect("reply");
    assert_eq!(r.status, "NOERROR", "names compare case-insensitively");
    let r = dig(&a.dns, "127.0.0.2", "api.example.test", "A", false).expect("reply");
    assert_eq!(r.status, "REFUSED");
    assert!(r.answers.is_empty());
    let r = dig(&a.dns, "127.0.0.2", "api.example.test", "A", true).expect("reply");
    assert_eq!(r.status, "REFUSED");
    // The backend has no policy: allowed, and learned for visibility.
    let r = dig(&a.dns, "127.0.0.3", "api.example.test", "A", false).expect("reply");
    assert_eq!(r.status, "NOERROR");
    // An address that belongs to no endpoint is refused.
    let r = dig(&a.dns, "127.0.0.9", "www.example.test", "A", false).expect("reply");
    assert_eq!(r.status, "REFUSED");

    // The learned IP is allowed on the toFQDNs port now, and only there.
    assert_eq!(
        trace_verdict(&a, "ip:192.0.2.10", "443"),
        (0, "allowed".into())
    );
    assert_eq!(
        trace_verdict(&a, "ip:192.0.2.10", "8443"),
        (1, "denied".into())
    );
    // The learned /32 shadows the /24 in the ipcache; the CIDR rule still selects it.
    assert_eq!(
        trace_verdict(&a, "ip:192.0.2.10", "80"),
        (0, "allowed".into())
    );

    // fqdn cache list
    let rows = a.json(&["fqdn", "cache", "list", "--endpoint", "frontend"]);
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["endpoint"], "frontend");
    assert_eq!(rows[0]["name"], "www.example.test.");
    assert_eq!(rows[0]["ips"], serde_json::json!(["192.0.2.10"]));
    assert_eq!(rows[0]["source"], "lookup");
    let ttl = rows[0]["ttl"].as_u64().unwrap();
    assert!(ttl > 50 && ttl <= 60, "ttl {ttl}");
    assert!(rows[0]["expiresAt"].as_str().unwrap().ends_with('Z'));
    let all = a.json(&["fqdn", "cache", "list"]);
    assert!(all
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["endpoint"] == "backend" && r["name"] == "api.example.test."));

    // A pattern filter, and the text renderings of the live commands.
    let rows = a.json(&["fqdn", "cache", "list", "--name", "*.example.test"]);
    assert_eq!(rows.as_array().unwrap().len(), 2, "{rows}");
    let rows = a.json(&["fqdn", "cache", "list", "--name", "www.example.test"]);
    assert_eq!(rows.as_array().unwrap().len(), 1, "{rows}");
    let o = a.cmd(&["fqdn", "cache", "list", "--name", "bad name!"]);
    assert_eq!(code(&o), 2);
    for (args, needle) in [
        (vec!["status"], "Health:        ok"),
        (vec!["endpoint", "list"], "frontend"),
        (vec!["endpoint", "get", "frontend"], "Identity:"),
        (vec!["identity", "list"], "reserved:world"),
        (vec!["bpf", "policy", "get", "frontend"], "DIRECTION"),
        (vec!["bpf", "ipcache", "list"], "192.0.2.10/32"),
        (vec!["fqdn", "cache", "list"], "www.example.test."),
        (
            vec!["policy", "get"],
            "CiliumNetworkPolicy default/frontend-dns (1 rule)",
        ),
    ] {
        let o = a.cmd(&args);
        assert_eq!(code(&o), 0, "{args:?}: {}", stderr(&o));
        assert!(stdout(&o).contains(needle), "{args:?}: {}", stdout(&o));
    }

    // ipcache and identities show the learned IP's FQDN identity.
    let ipc = a.json(&["bpf", "ipcache", "list"]);
    let entry = ipc
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["prefix"] == "192.0.2.10/32")
        .expect("learned IP in the ipcache");
    let fqdn_id = entry["identity"].as_u64().unwrap();
    assert!(fqdn_id >= 1 << 24, "node-local identity, got {fqdn_id}");
    let id = a.json(&["identity", "get", &fqdn_id.to_string()]);
    let labels = id["labels"].as_array().unwrap();
    assert!(labels.contains(&serde_json::json!("fqdn:www.example.test.")));
    assert!(
        labels.contains(&serde_json::json!("cidr:192.0.2.0/24")),
        "{labels:?}"
    );

    // Short TTL: allowed right after the lookup, denied right after expiry (TTL 2 s).
    let r = dig(&a.dns, "127.0.0.2", "short.example.test", "A", false).expect("reply");
    assert_eq!(r.status, "NOERROR");
    assert_eq!(
        trace_verdict(&a, "ip:192.0.2.40", "443"),
        (0, "allowed".into())
    );
    let learned = Instant::now();
    let (c, v) = eventually(Duration::from_secs(6), "short TTL to expire", || {
        let t = trace_verdict(&a, "ip:192.0.2.40", "443");
        (t.0 == 1).then_some(t)
    });
    assert_eq!((c, v.as_str()), (1, "denied"));
    assert!(learned.elapsed() >= Duration::from_millis(1500));

    // Metrics count the queries by verdict and rcode.
    let m = metrics(a.metrics.expect("metrics address"));
    assert!(
        m.contains("fqdnwall_dns_queries_total{verdict=\"allowed\",rcode=\"NOERROR\"}"),
        "{m}"
    );
    assert!(
        m.contains("fqdnwall_dns_queries_total{verdict=\"denied\",rcode=\"REFUSED\"}"),
        "{m}"
    );
    assert!(m.contains("fqdnwall_dns_hold_seconds_bucket"));
    assert!(m.contains("fqdnwall_endpoints 3"));

    // Audit mode: global, then per endpoint.
    assert_eq!(
        a.json(&["config", "PolicyAuditMode=true"])["PolicyAuditMode"],
        true
    );
    assert_eq!(
        trace_verdict(&a, "ip:192.0.2.99", "443"),
        (0, "audit".into())
    );
    a.json(&["config", "PolicyAuditMode=false"]);
    assert_eq!(
        trace_verdict(&a, "ip:192.0.2.99", "443"),
        (1, "denied".into())
    );
    let ep = a.json(&["endpoint", "config", "frontend", "PolicyAuditMode=Enabled"]);
    assert_eq!(ep["auditMode"], true);
    assert_eq!(a.json(&["endpoint", "get", "frontend"])["auditMode"], true);
    assert_eq!(
        trace_verdict(&a, "ip:192.0.2.99", "443"),
        (0, "audit".into())
    );
    a.json(&["endpoint", "config", "frontend", "PolicyAuditMode=Disabled"]);
    let o = a.cmd(&["config", "Foo=1"]);
    assert_eq!(code(&o), 2);

    // Hot reload: a new file is applied within a second or two.
    write(
        d.path(),
        "policies/backend.yaml",
        r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: backend-ingress
spec:
  endpointSelector:
    matchLabels: {app: backend}
  ingress:
    - fromEndpoints:
        - matchLabels: {app: frontend}
      toPorts:
        - ports: [{port: "8080", protocol: TCP}]
"#,
    );
    let p = eventually(Duration::from_secs(5), "the new policy", || {
        let p = a.json(&["policy", "get"]);
        (p["policies"].as_array().unwrap().len() == 2).then_some(p)
    });
    assert!(p["revision"].as_u64().unwrap() >= 2);
    let o = a.cmd(&[
        "policy",
        "trace",
        "--src",
        "labels:app=other",
        "--dst",
        "endpoint:backend",
        "--dport",
        "8080",
    ]);
    assert_eq!(code(&o), 1, "backend ingress now enforced");

    // A broken edit keeps the previous content in force and is reported.
    write(
        d.path(),
        "policies/backend.yaml",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: backend-ingress\nspec:\n  endpointSelector: {}\n  ingres: []\n",
    );
    let st = eventually(Duration::from_secs(5), "the refusal in status", || {
        let st = a.json(&["status"]);
        (st["health"] == "degraded").then_some(st)
    });
    let errors: Vec<&str> = st["policyErrors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert!(
        errors.iter().any(|e| e.ends_with(
            "backend.yaml:7:3: spec.ingres: unknown field `ingres` (did you mean `ingress`?)"
        )),
        "{errors:?}"
    );
    a.wait_log("spec.ingres: unknown field", Duration::from_secs(5));
    assert_eq!(
        a.json(&["policy", "get"])["policies"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let o = a.cmd(&[
        "policy",
        "trace",
        "--src",
        "labels:app=other",
        "--dst",
        "endpoint:backend",
        "--dport",
        "8080",
    ]);
    assert_eq!(code(&o), 1, "the previous backend policy stays in force");
    // Removing the file removes its policy.
    std::fs::remove_file(d.path().join("policies/backend.yaml")).unwrap();
    eventually(Duration::from_secs(5), "the removal", || {
        let p = a.json(&["policy", "get"]);
        (p["policies"].as_array().unwrap().len() == 1).then_some(())
    });
    assert_eq!(a.json(&["status"])["health"], "ok");

    // Restart: learned state comes back before any new query.
    let status = a.stop();
    assert_eq!(status.code(), Some(0), "clean stop on SIGTERM");
    assert!(!sock.exists(), "the API socket is removed on stop");
    let a = Agent::start(&["--config", &cfg], &sock);
    assert_eq!(
        trace_verdict(&a, "ip:192.0.2.10", "443"),
        (0, "allowed".into()),
        "restored before any query"
    );

    // fqdn cache clean forgets the name, and its allow goes with it.
    let done = a.json(&[
        "fqdn",
        "cache",
        "clean",
        "--endpoint",
        "frontend",
        "--name",
        "www.example.test",
    ]);
    assert_eq!(done["removed"], 1);
    assert_eq!(
        trace_verdict(&a, "ip:192.0.2.10", "443"),
        (1, "denied".into())
    );
    assert!(a
        .json(&["fqdn", "cache", "list", "--endpoint", "frontend"])
        .as_array()
        .unwrap()
        .is_empty());
    assert_eq!(a.stop().code(), Some(0));
    drop(ub);
}

#[test]
fn monitor_streams_dns_events() {
    let Some(ub) = upstream_other() else { return };
    let d = tempdir();
    let cfg = config(d.path(), ub.addr);
    let sock = d.path().join("api.sock");
    let mut a = Agent::start(&["--config", &cfg], &sock);
    let mut mon = Command::new(BIN)
        .args(["--api-socket", sock.to_str().unwrap()])
        .args([
            "-o",
            "json",
            "monitor",
            "--type",
            "dns",
            "--type",
            "policy-verdict",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = mon.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(l) = line else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    // The monitor subscribes asynchronously: query until both kinds of event show up.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut dns_line = None;
    let mut verdict_line = None;
    while dns_line.is_none() || verdict_line.is_none() {
        let r = dig(&a.dns, "127.0.0.3", "www.example.test", "A", false).expect("reply");
        assert_eq!(r.status, "NOERROR");
        while let Ok(l) = rx.recv_timeout(Duration::from_millis(300)) {
            let v: serde_json::Value = serde_json::from_str(&l).unwrap();
            match v["type"].as_str() {
                Some("dns") => dns_line = Some(l),
                Some("policy-verdict") => verdict_line = Some(l),
                other => panic!("unexpected event type {other:?}: {l}"),
            }
        }
        assert!(Instant::now() < deadline, "no monitor events");
    }
    let _ = mon.kill();
    let _ = mon.wait();
    let pv: serde_json::Value = serde_json::from_str(&verdict_line.unwrap()).unwrap();
    assert_eq!(pv["endpoint"], "backend");
    assert_eq!(pv["direction"], "egress");
    assert_eq!(pv["dport"], 53);
    assert_eq!(pv["protocol"], "UDP");
    assert_eq!(pv["verdict"], "allowed", "no policy: egress not enforced");
    let line = dns_line.unwrap();
    let ev: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(ev["type"], "dns");
    assert_eq!(ev["endpoint"], "backend");
    assert_eq!(ev["srcIp"], "127.0.0.3");
    assert_eq!(ev["verdict"], "allowed");
    assert_eq!(ev["query"], "www.example.test.");
    assert_eq!(ev["qtype"], "A");
    assert_eq!(ev["rcode"], "NOERROR");
    assert_eq!(ev["ips"], serde_json::json!(["192.0.2.10"]));
    assert_eq!(ev["ttl"], 60);
    for key in [
        "time",
        "direction",
        "dstIp",
        "dport",
        "protocol",
        "srcIdentity",
        "dstIdentity",
    ] {
        assert!(ev.get(key).is_some(), "monitor event lacks {key}");
    }
    // No policy in force: every query is logged too.
    let log = a.wait_log("query=www.example.test.", Duration::from_secs(5));
    assert!(
        log.contains("endpoint=\"backend\"") || log.contains("endpoint=backend"),
        "{log}"
    );
    assert!(
        log.contains("verdict=\"allowed\"") || log.contains("verdict=allowed"),
        "{log}"
    );
    assert_eq!(a.stop().code(), Some(0));
}

/// A second upstream on another address, so the two tests can run at the same time.
fn upstream_other() -> Option<Unbound> {
    upstream_on("127.0.0.154")
}

#[test]
fn run_on_the_embedded_default_prints_where_it_listens_and_stops_on_sigterm() {
    if !root("the embedded default (/var/lib, /run)") {
        return;
    }
    if Path::new("/etc/fqdnwall/config.yaml").exists() {
        eprintln!("*** SKIPPED: /etc/fqdnwall/config.yaml exists, so `run` would not use the embedded default");
        return;
    }
    let busy = |addr: &str| std::net::UdpSocket::bind(addr).is_err();
    if busy("127.0.0.1:5353") || std::net::TcpListener::bind("127.0.0.1:9962").is_err() {
        panic!("127.0.0.1:5353 or 127.0.0.1:9962 is taken: the embedded default needs them");
    }
    let d = tempdir();
    let sock = d.path().join("api.sock");
    let a = Agent::start(&[], &sock);
    assert_eq!(
        a.banner[0],
        format!(
            "fqdnwall {} running: datapath none, config embedded default",
            env!("CARGO_PKG_VERSION")
        )
    );
    assert!(
        a.banner[1]
            .starts_with("DNS proxy listening on 127.0.0.1:5353 (UDP and TCP), forwarding to "),
        "{:?}",
        a.banner
    );
    assert_eq!(a.dns, "127.0.0.1:5353".parse().unwrap());
    assert!(a
        .banner
        .iter()
        .any(|l| l.contains("/etc/fqdnwall/policies")));
    assert!(a
        .banner
        .iter()
        .any(|l| l.starts_with("Add a policy: check it with `fqdnwall policy validate FILE`")));
    let st = a.json(&["status"]);
    assert_eq!(st["config"], "embedded default");
    assert_eq!(st["endpoints"], 1);
    let eps = a.json(&["endpoint", "list"]);
    assert_eq!(eps[0]["name"], "host");
    assert_eq!(eps[0]["labels"]["reserved:host"], "");
    assert_eq!(a.stop().code(), Some(0));
    assert!(!sock.exists());
}

const HOST_POLICY: &str = r#"apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata:
  name: host-egress
spec:
  nodeSelector:
    matchLabels: {node-role.kubernetes.io/worker: ""}
  egress:
    - toEntities: [world]
      toPorts:
        - ports: [{port: "53", protocol: ANY}, {port: "443", protocol: TCP}]
"#;

#[test]
fn host_endpoint_under_a_clusterwide_node_policy_with_name_error_replies() {
    let Some(ub) = upstream_on("127.0.0.155") else {
        return;
    };
    let d = tempdir();
    write(
        d.path(),
        "config.yaml",
        &format!(
            "policyDir: policies\nstateDir: state\ndatapath: none\ndns:\n  listen: [\"127.0.0.1:0\"]\n  upstreams: [\"{}\"]\n  rejectResponseCode: nameError\nhost:\n  labels: {{node-role.kubernetes.io/worker: \"\"}}\nmetrics:\n  listen: null\n",
            ub.addr
        ),
    );
    write(d.path(), "policies/host.yaml", HOST_POLICY);
    let sock = d.path().join("api.sock");
    let a = Agent::start(
        &["--config", d.path().join("config.yaml").to_str().unwrap()],
        &sock,
    );
    assert!(a.metrics.is_none(), "metrics switched off");
    let host = a.json(&["endpoint", "get", "host"]);
    assert_eq!(host["policyEnforcement"]["egress"], true);
    // Port 53 to the world is allowed at L4, with no DNS rules: every name resolves.
    let r = dig(&a.dns, "127.0.0.1", "www.example.test", "A", false).expect("reply");
    assert_eq!(r.status, "NOERROR");
    let o = a.cmd(&[
        "policy",
        "trace",
        "--src",
        "endpoint:host",
        "--dst",
        "ip:192.0.2.10",
        "--dport",
        "443",
    ]);
    assert_eq!(code(&o), 0, "{}", stdout(&o));
    assert!(
        stdout(&o).contains("rule host-egress (CiliumClusterwideNetworkPolicy)"),
        "{}",
        stdout(&o)
    );
    // Without port 53 the host's egress denies the DNS flow: queries get NXDOMAIN.
    write(
        d.path(),
        "policies/host.yaml",
        &HOST_POLICY.replace(r#"{port: "53", protocol: ANY}, "#, ""),
    );
    eventually(Duration::from_secs(5), "the edit to apply", || {
        (a.json(&["policy", "get"])["revision"] == 2).then_some(())
    });
    let r = dig(&a.dns, "127.0.0.1", "www.example.test", "A", false).expect("reply");
    assert_eq!(r.status, "NXDOMAIN", "rejectResponseCode: nameError");
    let r = dig(&a.dns, "127.0.0.1", "www.example.test", "AAAA", true).expect("reply");
    assert_eq!(r.status, "NXDOMAIN");
    assert!(r.answers.is_empty());
    assert_eq!(a.stop_with("INT").code(), Some(0), "clean stop on SIGINT");
}

const CHAIN_ZONE: &str = r#"$ORIGIN chain.test.
$TTL 300
@ IN SOA ns.chain.test. admin.chain.test. 1 3600 600 86400 5
@ IN NS ns.chain.test.
ns IN A 127.0.0.1
alias 120 IN CNAME mid.chain.test.
mid 90 IN CNAME edge.chain.test.
edge 60 IN A 192.0.2.77
other 60 IN A 192.0.2.78
"#;

const CHAIN_POLICY: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: chain
spec:
  endpointSelector:
    matchLabels: {app: frontend}
  egress:
    - toCIDR: ["127.0.0.156/32"]
      toPorts:
        - ports: [{port: "53", protocol: ANY}]
          rules:
            dns:
              - matchPattern: "*.chain.test"
    - toFQDNs:
        - matchName: edge.chain.test
      toPorts:
        - ports: [{port: "443", protocol: TCP}]
"#;

/// A lookup of a name that is a CNAME chain files the final IPs under the question name and
/// every target: a toFQDNs selector on the last target allows them, with the chain's
/// smallest TTL, though the client never asked for that name.
#[test]
fn cname_chain_targets_are_selectable_by_their_own_names() {
    if !root("an upstream DNS server on port 53") {
        return;
    }
    let Some(ub) = Unbound::start_zones(
        "127.0.0.156".parse().unwrap(),
        53,
        &[("chain.test.", CHAIN_ZONE)],
        "edge.chain.test",
    ) else {
        return;
    };
    let d = tempdir();
    let cfg = config(d.path(), ub.addr);
    write(d.path(), "policies/chain.yaml", CHAIN_POLICY);
    let sock = d.path().join("api.sock");
    let a = Agent::start(&["--config", &cfg], &sock);
    assert_eq!(
        trace_verdict(&a, "ip:192.0.2.77", "443"),
        (1, "denied".into()),
        "nothing learned yet"
    );

    let r = dig(&a.dns, "127.0.0.2", "alias.chain.test", "A", false).expect("reply");
    assert_eq!(r.status, "NOERROR");
    assert!(
        r.answers.iter().any(|l| l.contains("192.0.2.77")),
        "{:?}",
        r.answers
    );
    assert_eq!(
        trace_verdict(&a, "ip:192.0.2.77", "443"),
        (0, "allowed".into())
    );
    let rows = a.json(&["fqdn", "cache", "list", "--endpoint", "frontend"]);
    let rows = rows.as_array().unwrap();
    let mut names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
    names.sort();
    assert_eq!(
        names,
        ["alias.chain.test.", "edge.chain.test.", "mid.chain.test."],
        "{rows:?}"
    );
    for row in rows {
        assert_eq!(row["ips"], serde_json::json!(["192.0.2.77"]), "{row}");
        let ttl = row["ttl"].as_u64().unwrap();
        assert!(ttl > 50 && ttl <= 60, "the chain's smallest TTL: {row}");
    }

    // A name outside the chain teaches nothing the selector picks.
    let r = dig(&a.dns, "127.0.0.2", "other.chain.test", "A", false).expect("reply");
    assert_eq!(r.status, "NOERROR");
    assert_eq!(
        trace_verdict(&a, "ip:192.0.2.78", "443"),
        (1, "denied".into())
    );
    assert_eq!(a.stop().code(), Some(0));
}

const PERSIST_POLICY: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: frontend-persist
spec:
  endpointSelector:
    matchLabels: {app: frontend}
  egress:
    - toCIDR: ["127.0.0.157/32"]
      toPorts:
        - ports: [{port: "53", protocol: ANY}]
          rules:
            dns:
              - matchPattern: "*.example.test"
    - toFQDNs:
        - matchName: www.example.test
        - matchName: api.example.test
      toPorts:
        - ports: [{port: "443", protocol: TCP}]
"#;

/// The persistence tests' bed: an upstream on `ip` (a loopback address of the test's own),
/// a config and `PERSIST_POLICY` naming it; (upstream, directory, config path, API socket).
fn persist_bed(ip: &str) -> Option<(Unbound, tempfile::TempDir, String, std::path::PathBuf)> {
    let ub = upstream_on(ip)?;
    let d = tempdir();
    let cfg = config(d.path(), ub.addr);
    write(
        d.path(),
        "policies/frontend.yaml",
        &PERSIST_POLICY.replace("127.0.0.157", ip),
    );
    let sock = d.path().join("api.sock");
    Some((ub, d, cfg, sock))
}

/// Learned names reach the journal within a second and survive a `kill -9` (no clean stop,
/// no final save); a restart folds the journal into a new snapshot, and names learned after
/// that compaction survive the next `kill -9` too.
#[test]
fn learned_names_survive_kill_9_through_the_journal_and_a_compaction() {
    let Some((ub, d, cfg, sock)) = persist_bed("127.0.0.157") else {
        return;
    };
    let journal = d.path().join("state/fqdn-cache.journal");
    let snapshot = d.path().join("state/fqdn-cache.json");
    let journal_len = || std::fs::metadata(&journal).map(|m| m.len()).unwrap_or(0);
    let header = 8;

    let a = Agent::start(&["--config", &cfg], &sock);
    assert_eq!(
        trace_verdict(&a, "ip:192.0.2.10", "443"),
        (1, "denied".into())
    );
    let r = dig(&a.dns, "127.0.0.2", "www.example.test", "A", false).expect("reply");
    assert_eq!(r.status, "NOERROR");
    eventually(Duration::from_secs(5), "the journal's flush", || {
        (journal_len() > header).then_some(())
    });
    assert!(
        !snapshot.exists(),
        "only the journal is written while it is small"
    );
    let status = a.stop_with("KILL");
    assert!(!status.success(), "killed: {status:?}");

    // Allowed before any new query: restored from the journal alone.
    let mut a = Agent::start(&["--config", &cfg], &sock);
    assert_eq!(
        trace_verdict(&a, "ip:192.0.2.10", "443"),
        (0, "allowed".into()),
        "restored from the journal"
    );
    // The restored journal is folded into a new snapshot, and a new journal begins.
    a.wait_log(
        "learned names compacted into a new snapshot",
        Duration::from_secs(10),
    );
    let text = std::fs::read_to_string(&snapshot).unwrap();
    assert!(text.contains("\"www.example.test.\""), "{text}");
    assert_eq!(journal_len(), header, "a new journal after the compaction");

    // Learned after the compaction: in the new journal only.
    let r = dig(&a.dns, "127.0.0.2", "api.example.test", "A", false).expect("reply");
    assert_eq!(r.status, "NOERROR");
    eventually(Duration::from_secs(5), "the journal's flush", || {
        (journal_len() > header).then_some(())
    });
    let status = a.stop_with("KILL");
    assert!(!status.success(), "killed: {status:?}");

    let a = Agent::start(&["--config", &cfg], &sock);
    assert_eq!(
        trace_verdict(&a, "ip:192.0.2.10", "443"),
        (0, "allowed".into()),
        "from the snapshot"
    );
    assert_eq!(
        trace_verdict(&a, "ip:192.0.2.11", "443"),
        (0, "allowed".into()),
        "from the journal after the compaction"
    );
    let rows = a.json(&["fqdn", "cache", "list", "--endpoint", "frontend"]);
    let mut names: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["api.example.test.", "www.example.test."]);
    assert_eq!(a.stop().code(), Some(0));
    drop(ub);
}

/// A journal whose middle is damaged restores the batches before the damage, says where it
/// stopped (file and byte offset), sets the file aside, and the agent serves on.
#[test]
fn a_damaged_journal_restores_its_good_prefix_and_is_set_aside() {
    let Some((ub, d, text, sock)) = persist_bed("127.0.0.158") else {
        return;
    };
    let journal = d.path().join("state/fqdn-cache.journal");
    let journal_len = || std::fs::metadata(&journal).map(|m| m.len()).unwrap_or(0);

    let a = Agent::start(&["--config", &text], &sock);
    let r = dig(&a.dns, "127.0.0.2", "www.example.test", "A", false).expect("reply");
    assert_eq!(r.status, "NOERROR");
    eventually(Duration::from_secs(5), "the first batch", || {
        (journal_len() > 8).then_some(())
    });
    let first = journal_len();
    let r = dig(&a.dns, "127.0.0.2", "api.example.test", "A", false).expect("reply");
    assert_eq!(r.status, "NOERROR");
    eventually(Duration::from_secs(5), "the second batch", || {
        (journal_len() > first).then_some(())
    });
    assert!(!a.stop_with("KILL").success());

    // A flipped byte in the second batch's payload (past its 8-byte frame header).
    let mut bytes = std::fs::read(&journal).unwrap();
    let at = first as usize + 12;
    bytes[at] ^= 0xff;
    // Something after it, so the damage is not the file's torn end.
    bytes.extend_from_slice(&[0u8; 16]);
    std::fs::write(&journal, &bytes).unwrap();

    let mut a = Agent::start(&["--config", &text], &sock);
    let line = a.wait_log("fqdn-cache.journal", Duration::from_secs(5));
    assert!(
        line.contains(&format!("corrupt at byte {first}")) && line.contains("set aside"),
        "{line}"
    );
    assert_eq!(
        trace_verdict(&a, "ip:192.0.2.10", "443"),
        (0, "allowed".into()),
        "the batch before the damage"
    );
    assert_eq!(
        trace_verdict(&a, "ip:192.0.2.11", "443"),
        (1, "denied".into()),
        "the damaged batch"
    );
    let aside: Vec<String> = std::fs::read_dir(d.path().join("state"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("fqdn-cache.journal.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    // Serving on: learning again works and is journaled.
    let r = dig(&a.dns, "127.0.0.2", "api.example.test", "A", false).expect("reply");
    assert_eq!(r.status, "NOERROR");
    assert_eq!(
        trace_verdict(&a, "ip:192.0.2.11", "443"),
        (0, "allowed".into())
    );
    assert_eq!(a.stop().code(), Some(0));
    drop(ub);
}

/// A journal that could not be created at start (here: its temporary file's name is taken
/// by a directory) is created once the obstacle is gone: the next change's compaction
/// starts it, and later changes are journaled again (not a full snapshot every second).
#[test]
fn a_journal_that_could_not_be_created_is_started_by_the_next_compaction() {
    let Some((ub, d, cfg, sock)) = persist_bed("127.0.0.159") else {
        return;
    };
    let journal = d.path().join("state/fqdn-cache.journal");
    let snapshot = d.path().join("state/fqdn-cache.json");
    let obstacle = d.path().join("state/fqdn-cache.tmp");
    std::fs::create_dir_all(&obstacle).unwrap();
    let journal_len = || std::fs::metadata(&journal).map(|m| m.len()).unwrap_or(0);

    let mut a = Agent::start(&["--config", &cfg], &sock);
    a.wait_log("cannot create", Duration::from_secs(5));
    let r = dig(&a.dns, "127.0.0.2", "www.example.test", "A", false).expect("reply");
    assert_eq!(r.status, "NOERROR");
    // The change cannot be journaled: a new snapshot holds it instead.
    eventually(Duration::from_secs(10), "a snapshot with the name", || {
        std::fs::read_to_string(&snapshot)
            .is_ok_and(|t| t.contains("\"www.example.test.\""))
            .then_some(())
    });
    assert!(!journal.exists());

    std::fs::remove_dir(&obstacle).unwrap();
    let r = dig(&a.dns, "127.0.0.2", "api.example.test", "A", false).expect("reply");
    assert_eq!(r.status, "NOERROR");
    eventually(Duration::from_secs(10), "the journal started", || {
        (journal_len() >= 8).then_some(())
    });
    // From now on changes go to the journal.
    std::thread::sleep(Duration::from_millis(1100));
    let r = dig(&a.dns, "127.0.0.2", "www.example.test", "A", false).expect("reply");
    assert_eq!(r.status, "NOERROR");
    eventually(Duration::from_secs(10), "a journaled batch", || {
        (journal_len() > 8).then_some(())
    });
    assert!(!a.stop_with("KILL").success());

    let a = Agent::start(&["--config", &cfg], &sock);
    assert_eq!(
        trace_verdict(&a, "ip:192.0.2.10", "443"),
        (0, "allowed".into())
    );
    assert_eq!(
        trace_verdict(&a, "ip:192.0.2.11", "443"),
        (0, "allowed".into())
    );
    assert_eq!(a.stop().code(), Some(0));
    drop(ub);
}

/// A clean stop whose last batch cannot be journaled (the journal could not be created)
/// writes a new snapshot instead: what was learned since the last one is not lost.
#[test]
fn a_clean_stop_that_cannot_journal_writes_a_snapshot() {
    let Some((ub, d, cfg, sock)) = persist_bed("127.0.0.160") else {
        return;
    };
    let obstacle = d.path().join("state/fqdn-cache.tmp");
    std::fs::create_dir_all(&obstacle).unwrap();

    let mut a = Agent::start(&["--config", &cfg], &sock);
    a.wait_log("cannot create", Duration::from_secs(5));
    // The first (empty) snapshot of the save loop is written before the name is learned.
    a.wait_log("cannot start a new journal", Duration::from_secs(5));
    let r = dig(&a.dns, "127.0.0.2", "www.example.test", "A", false).expect("reply");
    assert_eq!(r.status, "NOERROR");
    assert_eq!(a.stop().code(), Some(0));

    let a = Agent::start(&["--config", &cfg], &sock);
    assert_eq!(
        trace_verdict(&a, "ip:192.0.2.10", "443"),
        (0, "allowed".into()),
        "learned just before the clean stop"
    );
    assert_eq!(a.stop().code(), Some(0));
    drop(ub);
}
