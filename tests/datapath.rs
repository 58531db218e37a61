//! End to end with the eBPF datapath on the real kernel (root): the `fqdnwall run` binary in a
//! router network namespace, a client namespace per endpoint on a veth whose host side the
//! programs guard, and a "world" namespace with a real DNS server (unbound) and servers.
//!
//! ```text
//!  client ns (eth0 10.213.N.2, fd13:N::2) ── veth ── router ns: fwe* 10.213.N.1   [agent]
//!  world ns  (eth0 10.214.N.2-.9, fd14:N::2-3) ── veth ── router ns: fwo* 10.214.N.1
//! ```
//! Nothing in the client is told about the proxy: its DNS goes to the world's server and the
//! datapath intercepts it. Everything (namespaces, links, pins, processes) is removed by Drop
//! guards, also when a test fails.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::ops::{Deref, DerefMut};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::netns::*;
use common::*;

/// Root, bpffs, iproute2 and the peers; a skip otherwise (a failure under CI=true).
fn prerequisites() -> bool {
    bpf_host("the datapath tests")
        && require("unbound", "unbound").is_some()
        && require("dig", "bind9-dnsutils").is_some()
        && require("curl", "curl").is_some()
        && require("socat", "socat").is_some()
        && require("python3", "python3").is_some()
        && require("nsenter", "util-linux").is_some()
        && require("ping", "iputils-ping").is_some()
}

/// client (legs[0]), world (legs[1]) with eight IPv4 and two IPv6 addresses, and a second
/// endpoint (legs[2], labels app=other) that no policy selects.
const LAYOUT: Layout = Layout {
    prefix: "fw",
    pin: "fqdnwall-test",
    legs: &[
        LegSpec {
            ns: 'c',
            host_if: 'e',
            v4: 213,
            last: 2,
            v6: Some(("fd13", 2)),
        },
        LegSpec {
            ns: 'w',
            host_if: 'o',
            v4: 214,
            last: 9,
            v6: Some(("fd14", 3)),
        },
        LegSpec {
            ns: 'x',
            host_if: 'f',
            v4: 212,
            last: 2,
            v6: None,
        },
    ],
};

/// A test bed: the namespaces, the servers of the world, the agent's files.
struct Bed {
    net: NetBed,
    other: String,
    other_if: String,
}

impl Deref for Bed {
    type Target = NetBed;
    fn deref(&self) -> &NetBed {
        &self.net
    }
}

impl DerefMut for Bed {
    fn deref_mut(&mut self) -> &mut NetBed {
        &mut self.net
    }
}

const POLICY: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: client-egress
  namespace: default
spec:
  endpointSelector:
    matchLabels:
      app: client
  egress:
    - toCIDR: ["10.214.N.2/32"]
      toPorts:
        - ports: [{port: "53", protocol: ANY}]
          rules:
            dns:
              - matchName: allowed.wall.test
              - matchName: long.wall.test
              - matchName: short.wall.test
              - matchPattern: "*.v6.wall.test"
    - toFQDNs:
        - matchName: allowed.wall.test
        - matchName: long.wall.test
        - matchName: short.wall.test
        - matchPattern: "*.v6.wall.test"
      toPorts:
        - ports: [{port: "8080", protocol: TCP}, {port: "9000", protocol: TCP}]
    - toCIDRSet:
        - cidr: 10.214.N.0/24
          except: [10.214.N.8/32]
      toPorts:
        - ports: [{port: "9000", endPort: 9010, protocol: TCP}]
    - toCIDR: ["10.214.N.7/32"]
      icmps:
        - fields: [{type: 8, family: IPv4}]
"#;

const DENY: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: client-deny
  namespace: default
spec:
  endpointSelector:
    matchLabels:
      app: client
  egressDeny:
    - toCIDR: ["10.214.N.9/32"]
"#;

impl Bed {
    /// The namespaces, with the world's servers answering.
    fn new() -> Bed {
        let net = NetBed::new(&LAYOUT);
        let other = net.legs[2].clone();
        let mut bed = Bed {
            net,
            other: other.ns,
            other_if: other.ifname,
        };
        bed.start_world();
        bed
    }

    /// `fqdnwall run` (with `extra` arguments) on the test policies, audit mode as given.
    fn start_agent(&self, audit: bool, extra: &[&str]) -> NsAgent {
        let cfg = self.write_config(audit);
        self.agent(&cfg, extra)
    }

    fn sub(&self, s: &str) -> String {
        s.replace(".N.", &format!(".{}.", self.n))
            .replace(":N:", &format!(":{}:", self.n))
    }

    fn v4(&self, host: u8) -> String {
        format!("10.214.{}.{host}", self.n)
    }

    /// Starts unbound with the test zone, an HTTP server, and TCP echo servers in the world.
    fn start_world(&mut self) {
        let n = self.n;
        let zone = self.dir.path().join("wall.zone");
        std::fs::write(
            &zone,
            format!(
                "$ORIGIN wall.test.\n$TTL 300\n\
                 @ IN SOA ns.wall.test. admin.wall.test. 1 3600 600 86400 5\n\
                 @ IN NS ns.wall.test.\n\
                 ns IN A 10.214.{n}.2\n\
                 allowed 3 IN A 10.214.{n}.3\n\
                 long 300 IN A 10.214.{n}.4\n\
                 denied 300 IN A 10.214.{n}.5\n\
                 short 2 IN A 10.214.{n}.6\n\
                 www.v6 300 IN AAAA fd14:{n}::3\n"
            ),
        )
        .unwrap();
        let conf = self.dir.path().join("unbound.conf");
        std::fs::write(
            &conf,
            format!(
                "server:\n  interface: 10.214.{n}.2\n  interface: fd14:{n}::2\n  port: 53\n  \
                 chroot: \"\"\n  username: \"\"\n  directory: \"{d}\"\n  pidfile: \"\"\n  \
                 use-syslog: no\n  logfile: \"\"\n  do-daemonize: no\n  \
                 access-control: 0.0.0.0/0 allow\n  access-control: ::/0 allow\n  \
                 num-threads: 1\n  module-config: \"iterator\"\n  \
                 local-zone: \"test.\" nodefault\n\
                 auth-zone:\n  name: \"wall.test.\"\n  zonefile: \"{z}\"\n  for-upstream: yes\n  \
                 for-downstream: yes\nremote-control:\n  control-enable: no\n",
                d = self.dir.path().display(),
                z = zone.display()
            ),
        )
        .unwrap();
        let (world, dir) = (self.world.clone(), self.dir.path().to_path_buf());
        let conf = conf.to_str().unwrap();
        self.spawn(&world, &["unbound", "-d", "-c", conf], &dir);
        let http = ["python3", "-m", "http.server", "8080", "--bind", "::"];
        self.spawn(&world, &http, &dir);
        for port in ["9000", "9005", "9020"] {
            let listen = format!("TCP-LISTEN:{port},fork,reuseaddr");
            self.spawn(&world, &["socat", &listen, "EXEC:cat"], &dir);
        }
        // The world answers on its own before any agent is involved.
        let server = format!("@{}", self.v4(2));
        eventually(Duration::from_secs(10), "the world's DNS server", || {
            let dig = ["dig", &server, "+short", "+time=1", "+tries=1"];
            let o = self.exec(&world, &[&dig[..], &["allowed.wall.test"]].concat());
            String::from_utf8_lossy(&o.stdout)
                .contains("10.214.")
                .then_some(())
        });
        self.await_http(&world, &format!("http://{}:8080/", self.v4(4)));
    }

    fn write_config(&self, audit: bool) -> PathBuf {
        let n = self.n;
        std::fs::create_dir_all(self.dir.path().join("policies")).unwrap();
        std::fs::write(
            self.dir.path().join("policies/egress.yaml"),
            self.sub(POLICY),
        )
        .unwrap();
        std::fs::write(self.dir.path().join("policies/deny.yaml"), self.sub(DENY)).unwrap();
        let cfg = self.dir.path().join("config.yaml");
        std::fs::write(
            &cfg,
            format!(
                "policyDir: policies\nstateDir: state\ndatapath: bpf\npolicyAuditMode: {audit}\n\
                 dns:\n  listen: [\"127.0.0.1:10053\"]\n  upstreams: [\"10.214.{n}.2:53\"]\n  \
                 transparent: true\n  responseMaxDelay: 1s\n\
                 endpoints:\n  - name: client\n    namespace: default\n    labels: {{app: client}}\n    \
                 ips: [\"10.213.{n}.2\", \"fd13:{n}::2\"]\n    interface: {i}\n\
                 \x20 - name: other\n    namespace: default\n    labels: {{app: other}}\n    \
                 ips: [\"10.212.{n}.2\"]\n    interface: {o}\n\
                 metrics:\n  listen: null\n",
                i = self.ifname,
                o = self.other_if
            ),
        )
        .unwrap();
        cfg
    }

    /// A command in the client namespace.
    fn client(&self, args: &[&str]) -> Output {
        self.exec(&self.client, args)
    }

    /// `curl` from the client: Ok(time to connect in seconds) or Err(curl's exit code).
    fn curl(&self, url: &str, max: &str) -> Result<f64, i32> {
        let o = self.client(&[
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "--max-time",
            max,
            "-w",
            "%{time_connect}",
            url,
        ]);
        if o.status.success() {
            Ok(String::from_utf8_lossy(&o.stdout).trim().parse().unwrap())
        } else {
            Err(o.status.code().unwrap_or(-1))
        }
    }

    /// `dig` from the client to the world's server (no proxy address anywhere): (status, answers).
    fn dig(&self, name: &str, qtype: &str) -> (String, Vec<String>) {
        let server = format!("@{}", self.v4(2));
        let o = self.client(&["dig", &server, "+time=3", "+tries=1", name, qtype]);
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        let status = text
            .split("status: ")
            .nth(1)
            .and_then(|s| s.split(',').next())
            .unwrap_or("NO-REPLY")
            .to_string();
        let answers = text
            .split(";; ANSWER SECTION:")
            .nth(1)
            .map(|s| {
                s.lines()
                    .skip(1)
                    .take_while(|l| !l.trim().is_empty())
                    .filter_map(|l| l.split_whitespace().last().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        (status, answers)
    }

    /// TCP segments the client retransmitted so far.
    fn retransmits(&self) -> u64 {
        let o = self.client(&["cat", "/proc/net/snmp"]);
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        let tcp: Vec<&str> = text.lines().filter(|l| l.starts_with("Tcp:")).collect();
        let names: Vec<&str> = tcp[0].split_whitespace().collect();
        let values: Vec<&str> = tcp[1].split_whitespace().collect();
        let i = names.iter().position(|n| *n == "RetransSegs").unwrap();
        values[i].parse().unwrap()
    }

    /// A TCP connection opened from inside the client namespace.
    fn connect(&self, addr: SocketAddr) -> std::io::Result<TcpStream> {
        in_netns(&self.client, move || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        })
    }
}

fn echo(s: &mut TcpStream, msg: &str) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    if s.write_all(msg.as_bytes()).is_err() {
        return false;
    }
    let mut buf = vec![0u8; msg.len()];
    s.read_exact(&mut buf).is_ok() && buf == msg.as_bytes()
}

#[test]
fn fqdn_allows_follow_intercepted_dns_in_the_kernel() {
    if !prerequisites() {
        return;
    }
    let bed = Bed::new();
    let agent = bed.start_agent(false, &["--unload-on-stop"]);
    assert!(
        agent.log.iter().any(|l| l.contains("datapath bpf")),
        "{:?}",
        agent.log
    );
    let st = agent.json(&["status"]);
    assert_eq!(st["datapath"], "bpf");
    let att = st["bpf"]["attachments"].as_array().unwrap();
    assert!(
        att.iter().any(|a| a["interface"] == bed.ifname.as_str()),
        "{st}"
    );
    assert!(!st["bpf"]["maps"].as_array().unwrap().is_empty());

    let allowed = format!("http://{}:8080/", bed.v4(3));
    // Before the name is resolved its IP is unreachable.
    assert!(
        bed.curl(&allowed, "2").is_err(),
        "reached before any lookup"
    );

    // DNS to the world's server is intercepted: a denied name gets REFUSED, which the real
    // (authoritative) server never says for its own zone.
    let (status, answers) = bed.dig("denied.wall.test", "A");
    assert_eq!(status, "REFUSED");
    assert!(answers.is_empty());

    // An allowed name is answered, and its IP is enforceable before the answer arrives: the
    // first SYN makes it.
    let (status, answers) = bed.dig("allowed.wall.test", "A");
    assert_eq!(status, "NOERROR");
    assert_eq!(answers, vec![bed.v4(3)]);
    let before = bed.retransmits();
    let t = bed.curl(&allowed, "5").expect("allowed after the lookup");
    assert!(t < 0.9, "connect took {t}s: a SYN was lost");
    assert_eq!(bed.retransmits(), before, "SYN retransmitted");

    // The kernel map shows the entries with their counters.
    let rows = agent.json(&["bpf", "policy", "get", "client"]);
    assert!(
        rows.as_array()
            .unwrap()
            .iter()
            .any(|r| r["port"] == 8080 && r["packets"].as_u64().unwrap() > 0),
        "{rows}"
    );

    // A connection open across the expiry (TTL 3) keeps working until it closes.
    let mut conn = bed
        .connect(format!("{}:9000", bed.v4(3)).parse().unwrap())
        .expect("echo connection");
    assert!(echo(&mut conn, "hello\n"));
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(7) {
        assert!(
            echo(&mut conn, "still there\n"),
            "connection broken after {:?}",
            started.elapsed()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let cache = agent.json(&["fqdn", "cache", "list"]);
    assert!(
        cache
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["source"] == "zombie"),
        "{cache}"
    );
    drop(conn);
    // Once it is closed the allow goes.
    eventually(Duration::from_secs(20), "the zombie to go", || {
        bed.curl(&allowed, "1").is_err().then_some(())
    });

    // After the TTL with no connection, the IP is dropped again.
    let short = format!("http://{}:8080/", bed.v4(6));
    let (status, _) = bed.dig("short.wall.test", "A");
    assert_eq!(status, "NOERROR");
    std::thread::sleep(Duration::from_secs(4));
    assert!(bed.curl(&short, "2").is_err(), "allowed after its TTL");

    // CIDR with except, port ranges, ICMP, deny precedence.
    assert!(bed
        .connect(format!("{}:9005", bed.v4(7)).parse().unwrap())
        .is_ok());
    assert!(bed
        .connect(format!("{}:9005", bed.v4(8)).parse().unwrap())
        .is_err());
    assert!(bed
        .connect(format!("{}:9020", bed.v4(7)).parse().unwrap())
        .is_err());
    let ping = |ip: String| {
        bed.client(&["ping", "-c", "1", "-W", "1", &ip])
            .status
            .success()
    };
    assert!(ping(bed.v4(7)), "ICMP echo allowed by `icmps` did not pass");
    assert!(!ping(bed.v4(6)));
    assert!(bed
        .connect(format!("{}:9005", bed.v4(9)).parse().unwrap())
        .is_err());

    // Endpoint labels: the policy selects app=client only; the other endpoint's egress is
    // not enforced.
    let five = format!("http://{}:8080/", bed.v4(5));
    assert!(bed.curl(&five, "2").is_err());
    let o = run(
        "ip",
        &[
            "netns",
            "exec",
            &bed.other,
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-m",
            "5",
            &five,
        ],
    );
    assert!(o.status.success(), "the unselected endpoint was blocked");

    // IPv6: AAAA learned, then reachable.
    let v6url = format!("http://[fd14:{}::3]:8080/", bed.n);
    assert!(bed.curl(&v6url, "2").is_err());
    let (status, answers) = bed.dig("www.v6.wall.test", "AAAA");
    assert_eq!(status, "NOERROR");
    assert_eq!(answers, vec![format!("fd14:{}::3", bed.n)]);
    bed.curl(&v6url, "5")
        .expect("IPv6 allowed after the lookup");

    assert_eq!(agent.stop(), 0);
    // --unload-on-stop: no pins left.
    let left: Vec<_> = std::fs::read_dir(bed.pin.join("links"))
        .map(|d| d.flatten().collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn kill_9_keeps_enforcing_and_a_restart_adopts() {
    if !prerequisites() {
        return;
    }
    let bed = Bed::new();
    let agent = bed.start_agent(false, &[]);
    let (status, _) = bed.dig("long.wall.test", "A");
    assert_eq!(status, "NOERROR");
    // Learned state reaches the state directory in batches (at most a second late).
    std::thread::sleep(Duration::from_millis(1500));
    let long = format!("http://{}:8080/", bed.v4(4));
    let denied = format!("http://{}:8080/", bed.v4(5));
    bed.curl(&long, "5").expect("allowed");
    let mut conn = bed
        .connect(format!("{}:9000", bed.v4(4)).parse().unwrap())
        .expect("echo connection");
    assert!(echo(&mut conn, "before\n"));

    agent.kill9();
    for _ in 0..5 {
        assert!(echo(&mut conn, "during\n"), "allowed flow broke");
        std::thread::sleep(Duration::from_millis(200));
    }
    bed.curl(&long, "5")
        .expect("new allowed connection while the agent is down");
    assert!(
        bed.curl(&denied, "2").is_err(),
        "denied while the agent is down"
    );
    assert!(bed.pin.join("maps").exists(), "pins must survive the agent");

    let agent = bed.start_agent(false, &["--unload-on-stop"]);
    let st = agent.json(&["status"]);
    assert_eq!(st["bpf"]["adopted"], true, "{st}");
    assert!(echo(&mut conn, "after\n"), "allowed flow broke on restart");
    bed.curl(&long, "5").expect("allowed after the restart");
    assert!(bed.curl(&denied, "2").is_err());
    let (status, _) = bed.dig("denied.wall.test", "A");
    assert_eq!(status, "REFUSED");
    let (status, _) = bed.dig("allowed.wall.test", "A");
    assert_eq!(status, "NOERROR");
    bed.curl(&format!("http://{}:8080/", bed.v4(3)), "5")
        .expect("new lookup works");
    assert_eq!(agent.stop(), 0);
}

#[test]
fn audit_mode_passes_traffic_and_reports_it() {
    if !prerequisites() {
        return;
    }
    let bed = Bed::new();
    let agent = bed.start_agent(true, &["--unload-on-stop"]);
    let mon = agent.monitor(&["policy-verdict", "drop"]);
    // Never resolved, and not in any rule: audit lets it pass.
    bed.curl(&format!("http://{}:8080/", bed.v4(5)), "5")
        .expect("audit mode passes the flow");
    let five = bed.v4(5);
    let ev = mon.find(Duration::from_secs(5), "the audited flow", |v| {
        v["verdict"] == "audit" && v["dstIp"] == five.as_str()
    });
    assert_eq!(ev["type"], "policy-verdict");
    assert_eq!(ev["endpoint"], "client");
    assert_eq!(ev["dport"], 8080);

    // Audit off, live: the same flow is dropped, and the drop streams.
    let o = fqdnwall(&[
        "--api-socket",
        agent.sock.to_str().unwrap(),
        "config",
        "PolicyAuditMode=false",
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(bed
        .curl(&format!("http://{}:8080/", bed.v4(5)), "2")
        .is_err());
    let ev = mon.find(Duration::from_secs(5), "the drop once audit is off", |v| {
        v["type"] == "drop" && v["dstIp"] == five.as_str()
    });
    drop(mon);
    assert_eq!(ev["verdict"], "denied");
    assert_eq!(ev["endpoint"], "client");
    assert_eq!(agent.stop(), 0);
}

const LOCKDOWN_POLICY: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: tool
  namespace: default
spec:
  endpointSelector:
    matchLabels:
      app: tool
  egress:
    - toCIDR: ["10.214.N.2/32"]
      toPorts:
        - ports: [{port: "53", protocol: ANY}]
          rules:
            dns:
              - matchName: long.wall.test
    - toFQDNs:
        - matchName: long.wall.test
      toPorts:
        - ports: [{port: "8080", protocol: TCP}]
"#;

#[test]
fn lockdown_allows_a_permitted_name_and_blocks_another() {
    if !prerequisites() || require("nft", "nftables").is_none() {
        return;
    }
    let bed = Bed::new();
    // Lockdown's namespace hangs off the host: the world is reached from the host through
    // the router namespace (a veth of its own and routes both ways).
    let tag = format!("fwh{}", bed.ifname.trim_start_matches("fwe"));
    let n = bed.n;
    let _ = run("ip", &["link", "del", &tag]);
    must(
        "ip",
        &[
            "link",
            "add",
            &tag,
            "type",
            "veth",
            "peer",
            "name",
            "uplink",
            "netns",
            &bed.router,
        ],
    );
    struct Link(String);
    impl Drop for Link {
        fn drop(&mut self) {
            let _ = run("ip", &["link", "del", &self.0]);
        }
    }
    let _link = Link(tag.clone());
    must(
        "ip",
        &["addr", "add", &format!("10.217.{n}.2/24"), "dev", &tag],
    );
    must("ip", &["link", "set", &tag, "up"]);
    must(
        "ip",
        &[
            "route",
            "add",
            &format!("10.214.{n}.0/24"),
            "via",
            &format!("10.217.{n}.1"),
        ],
    );
    let r = bed.router.clone();
    must(
        "ip",
        &[
            "-n",
            &r,
            "addr",
            "add",
            &format!("10.217.{n}.1/24"),
            "dev",
            "uplink",
        ],
    );
    must("ip", &["-n", &r, "link", "set", "uplink", "up"]);
    must(
        "ip",
        &[
            "netns",
            "exec",
            &bed.world,
            "ip",
            "route",
            "add",
            "10.217.0.0/16",
            "via",
            &format!("10.214.{n}.1"),
        ],
    );
    let policy = bed.dir.path().join("tool.yaml");
    std::fs::write(&policy, bed.sub(LOCKDOWN_POLICY)).unwrap();
    let script = format!(
        "dig @10.214.{n}.2 +time=3 +tries=1 +short long.wall.test; \
         curl -s -o /dev/null -m 5 -w 'allowed:%{{http_code}}\\n' http://10.214.{n}.4:8080/; \
         dig @10.214.{n}.2 +time=3 +tries=1 denied.wall.test | grep -o 'status: [A-Z]*'; \
         curl -s -o /dev/null -m 2 http://10.214.{n}.5:8080/ || echo denied-blocked; \
         exit 7"
    );
    let o = Command::new(BIN)
        .args(["lockdown", "--policy"])
        .arg(&policy)
        .args(["--label", "app=tool", "--", "sh", "-c", &script])
        .env("RUST_LOG", "warn")
        .env("FQDNWALL_BPF_PIN_DIR", bed.pin.join("lockdown"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let out = stdout(&o);
    let err = stderr(&o);
    assert_eq!(code(&o), 7, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains(&format!("10.214.{n}.4")), "{out}\n{err}");
    assert!(out.contains("allowed:200"), "{out}\n{err}");
    assert!(out.contains("status: REFUSED"), "{out}\n{err}");
    assert!(out.contains("denied-blocked"), "{out}\n{err}");
    assert!(err.contains("names allowed: long.wall.test."), "{err}");
    assert!(err.contains("names denied: denied.wall.test."), "{err}");
    assert!(err.contains("flows denied: TCP"), "{err}");
    // Nothing left behind.
    let links = String::from_utf8_lossy(&run("ip", &["-o", "link"]).stdout).into_owned();
    let pid_tag = "fwl";
    assert!(
        !links
            .lines()
            .any(|l| l.contains(pid_tag) && l.contains("h@")),
        "{links}"
    );
}
