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

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Root, bpffs, iproute2 and the peers; a skip otherwise (a failure under CI=true).
fn prerequisites() -> bool {
    let root = is_root();
    let bpffs = Path::new("/sys/fs/bpf").exists();
    if !(root && bpffs) {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("the datapath tests need root and bpffs (root={root}, bpffs={bpffs})");
        }
        eprintln!("*** SKIPPED: the datapath tests need root and bpffs");
        return false;
    }
    require("unbound", "unbound").is_some()
        && require("dig", "bind9-dnsutils").is_some()
        && require("curl", "curl").is_some()
        && require("socat", "socat").is_some()
        && require("python3", "python3").is_some()
        && require("nsenter", "util-linux").is_some()
        && require("ping", "iputils-ping").is_some()
}

fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"))
}

fn must(cmd: &str, args: &[&str]) {
    let o = run(cmd, args);
    assert!(
        o.status.success(),
        "{cmd} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A test bed: three namespaces, the servers of the world, the agent's files.
struct Bed {
    n: u32,
    router: String,
    client: String,
    /// A second endpoint (labels app=other) that no policy selects.
    other: String,
    other_if: String,
    world: String,
    /// Host side of the client's veth, in the router namespace.
    ifname: String,
    pin: PathBuf,
    dir: tempfile::TempDir,
    children: Vec<Child>,
}

impl Drop for Bed {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in [&self.client, &self.other, &self.world, &self.router] {
            let _ = run("ip", &["netns", "del", ns]);
        }
        // Links go with the interfaces; the pins (and the maps they hold) go here.
        let _ = std::fs::remove_dir_all(&self.pin);
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
    fn new() -> Bed {
        let seq = SEQ.fetch_add(1, Ordering::SeqCst);
        let n = (std::process::id() % 40) * 6 + seq % 6 + 1;
        let tag = format!("{}{seq}", std::process::id() % 100_000);
        let bed = Bed {
            n,
            router: format!("fwr{tag}"),
            client: format!("fwc{tag}"),
            other: format!("fwx{tag}"),
            other_if: format!("fwf{tag}"),
            world: format!("fww{tag}"),
            ifname: format!("fwe{tag}"),
            pin: PathBuf::from(format!("/sys/fs/bpf/fqdnwall-test-{tag}")),
            dir: tempdir(),
            children: Vec::new(),
        };
        let _ = std::fs::remove_dir_all(&bed.pin);
        for ns in [&bed.router, &bed.client, &bed.other, &bed.world] {
            let _ = run("ip", &["netns", "del", ns]);
            must("ip", &["netns", "add", ns]);
            must("ip", &["-n", ns, "link", "set", "lo", "up"]);
        }
        let wside = format!("fwo{tag}");
        // client <-> router
        must(
            "ip",
            &[
                "link",
                "add",
                &bed.ifname,
                "netns",
                &bed.router,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &bed.client,
            ],
        );
        must(
            "ip",
            &[
                "link",
                "add",
                &wside,
                "netns",
                &bed.router,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &bed.world,
            ],
        );
        let r = &bed.router;
        let c = &bed.client;
        let w = &bed.world;
        let a = |ns: &str, args: &[&str]| {
            let mut v = vec!["-n", ns];
            v.extend_from_slice(args);
            must("ip", &v);
        };
        a(
            r,
            &[
                "addr",
                "add",
                &format!("10.213.{n}.1/24"),
                "dev",
                &bed.ifname,
            ],
        );
        a(
            r,
            &[
                "-6",
                "addr",
                "add",
                &format!("fd13:{n}::1/64"),
                "dev",
                &bed.ifname,
                "nodad",
            ],
        );
        a(
            r,
            &["addr", "add", &format!("10.214.{n}.1/24"), "dev", &wside],
        );
        a(
            r,
            &[
                "-6",
                "addr",
                "add",
                &format!("fd14:{n}::1/64"),
                "dev",
                &wside,
                "nodad",
            ],
        );
        a(r, &["link", "set", &bed.ifname, "up"]);
        a(r, &["link", "set", &wside, "up"]);
        a(
            c,
            &["addr", "add", &format!("10.213.{n}.2/24"), "dev", "eth0"],
        );
        a(
            c,
            &[
                "-6",
                "addr",
                "add",
                &format!("fd13:{n}::2/64"),
                "dev",
                "eth0",
                "nodad",
            ],
        );
        a(c, &["link", "set", "eth0", "up"]);
        a(
            c,
            &["route", "add", "default", "via", &format!("10.213.{n}.1")],
        );
        a(
            c,
            &[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &format!("fd13:{n}::1"),
            ],
        );
        for host in 2..=9 {
            a(
                w,
                &[
                    "addr",
                    "add",
                    &format!("10.214.{n}.{host}/24"),
                    "dev",
                    "eth0",
                ],
            );
        }
        for host in 2..=3 {
            a(
                w,
                &[
                    "-6",
                    "addr",
                    "add",
                    &format!("fd14:{n}::{host}/64"),
                    "dev",
                    "eth0",
                    "nodad",
                ],
            );
        }
        a(w, &["link", "set", "eth0", "up"]);
        a(
            w,
            &["route", "add", "default", "via", &format!("10.214.{n}.1")],
        );
        a(
            w,
            &[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &format!("fd14:{n}::1"),
            ],
        );
        let o = &bed.other;
        must(
            "ip",
            &[
                "link",
                "add",
                &bed.other_if,
                "netns",
                r,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                o,
            ],
        );
        a(
            r,
            &[
                "addr",
                "add",
                &format!("10.212.{n}.1/24"),
                "dev",
                &bed.other_if,
            ],
        );
        a(r, &["link", "set", &bed.other_if, "up"]);
        a(
            o,
            &["addr", "add", &format!("10.212.{n}.2/24"), "dev", "eth0"],
        );
        a(o, &["link", "set", "eth0", "up"]);
        a(
            o,
            &["route", "add", "default", "via", &format!("10.212.{n}.1")],
        );
        must(
            "ip",
            &[
                "netns",
                "exec",
                r,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
            ],
        );
        bed
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
        let unbound = Command::new("ip")
            .args(["netns", "exec", &self.world, "unbound", "-d", "-c"])
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start unbound");
        self.children.push(unbound);
        let http = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.world,
                "python3",
                "-m",
                "http.server",
                "8080",
                "--bind",
                "::",
            ])
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the HTTP server");
        self.children.push(http);
        for port in ["9000", "9005", "9020"] {
            let echo = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &self.world,
                    "socat",
                    &format!("TCP-LISTEN:{port},fork,reuseaddr"),
                    "EXEC:cat",
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start socat");
            self.children.push(echo);
        }
        // The world answers on its own before any agent is involved.
        let world = self.world.clone();
        let server = self.v4(2);
        eventually(Duration::from_secs(10), "the world's DNS server", || {
            let o = run(
                "ip",
                &[
                    "netns",
                    "exec",
                    &world,
                    "dig",
                    &format!("@{server}"),
                    "+short",
                    "+time=1",
                    "+tries=1",
                    "allowed.wall.test",
                ],
            );
            String::from_utf8_lossy(&o.stdout)
                .contains("10.214.")
                .then_some(())
        });
        let url = format!("http://{}:8080/", self.v4(4));
        eventually(Duration::from_secs(10), "the world's HTTP server", || {
            run(
                "ip",
                &[
                    "netns",
                    "exec",
                    &world,
                    "curl",
                    "-s",
                    "-o",
                    "/dev/null",
                    &url,
                ],
            )
            .status
            .success()
            .then_some(())
        });
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

    /// `fqdnwall run` in the router namespace (nsenter keeps the host's mounts, so the pins
    /// land in the real bpffs and outlive the process).
    fn agent(&self, cfg: &Path, extra: &[&str]) -> NsAgent {
        let sock = self.dir.path().join("api.sock");
        let mut child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.router))
            .arg(BIN)
            .arg("run")
            .arg("--config")
            .arg(cfg)
            .arg("--api-socket")
            .arg(&sock)
            .args(extra)
            .env("RUST_LOG", "info")
            .env("FQDNWALL_BPF_PIN_DIR", &self.pin)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start fqdnwall run");
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let tx2 = tx.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx2.send(l);
            }
        });
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(l) => {
                    let done = l.starts_with("Add a policy:");
                    seen.push(l);
                    if done {
                        break;
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("no banner from fqdnwall run:\n{}", seen.join("\n"));
                }
            }
        }
        std::thread::spawn(move || for _ in rx {});
        NsAgent {
            child: Some(child),
            sock,
            log: seen,
        }
    }

    /// A command in the client namespace.
    fn client(&self, args: &[&str]) -> Output {
        let mut v = vec!["netns", "exec", &self.client];
        v.extend_from_slice(args);
        run("ip", &v)
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
        let path = format!("/run/netns/{}", self.client);
        std::thread::spawn(move || {
            let f = std::fs::File::open(&path)?;
            // SAFETY: setns on this thread only, with a namespace fd we hold open.
            if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        })
        .join()
        .unwrap()
    }
}

struct NsAgent {
    child: Option<Child>,
    sock: PathBuf,
    log: Vec<String>,
}

impl NsAgent {
    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--api-socket", self.sock.to_str().unwrap(), "-o", "json"];
        all.extend_from_slice(args);
        let o = fqdnwall(&all);
        assert_eq!(code(&o), 0, "{args:?}: {}", stderr(&o));
        json(&o)
    }

    fn kill9(mut self) {
        let mut c = self.child.take().unwrap();
        let _ = c.kill();
        let _ = c.wait();
    }

    fn stop(mut self) -> i32 {
        let mut c = self.child.take().unwrap();
        let _ = run("kill", &["-TERM", &c.id().to_string()]);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s.code().unwrap_or(-1);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!("fqdnwall did not stop on SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NsAgent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
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
    let mut bed = Bed::new();
    bed.start_world();
    let cfg = bed.write_config(false);
    let agent = bed.agent(&cfg, &["--unload-on-stop"]);
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
    let mut bed = Bed::new();
    bed.start_world();
    let cfg = bed.write_config(false);
    let agent = bed.agent(&cfg, &[]);
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

    let agent = bed.agent(&cfg, &["--unload-on-stop"]);
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
    let mut bed = Bed::new();
    bed.start_world();
    let cfg = bed.write_config(true);
    let agent = bed.agent(&cfg, &["--unload-on-stop"]);
    let mut mon = Command::new(BIN)
        .args(["--api-socket", agent.sock.to_str().unwrap(), "-o", "json"])
        .args(["monitor", "--type", "policy-verdict", "--type", "drop"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = mon.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    // Never resolved, and not in any rule: audit lets it pass.
    bed.curl(&format!("http://{}:8080/", bed.v4(5)), "5")
        .expect("audit mode passes the flow");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut found = None;
    while let Ok(l) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        if v["verdict"] == "audit" && v["dstIp"] == bed.v4(5).as_str() {
            found = Some(v);
            break;
        }
    }
    let ev = found.expect("an audit event for the flow");
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
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut drop_ev = None;
    while let Ok(l) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        if v["type"] == "drop" && v["dstIp"] == bed.v4(5).as_str() {
            drop_ev = Some(v);
            break;
        }
    }
    let _ = mon.kill();
    let _ = mon.wait();
    let ev = drop_ev.expect("a drop event once audit mode is off");
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
    let mut bed = Bed::new();
    bed.start_world();
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
