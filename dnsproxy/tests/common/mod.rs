//! Test support: a real unbound serving a test zone on loopback, real `dig`, and a small
//! in-memory policy and datapath that keep the proxy's contract (the agent's end-to-end tests
//! use the real engine).

#![allow(dead_code)] // each test binary uses a different part of this module

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dnsproxy::{
    Decision, DnsPolicy, EndpointId, HoldOutcome, LearnedAnswer, Learner, QueryContext, QueryEvent,
    Transport,
};
use policy::fqdn::{DnsName, FqdnPattern};
use tokio::sync::watch;

/// Finds a Debian-packaged binary. Missing: a loud skip on a developer machine, a failure in
/// CI (CI=true), where the test script installs the packages.
pub fn require(bin: &str, package: &str) -> Option<PathBuf> {
    for dir in [
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
        "/usr/local/sbin",
        "/usr/local/bin",
    ] {
        let p = Path::new(dir).join(bin);
        if p.exists() {
            return Some(p);
        }
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{bin} is not installed but CI=true: the test script must install {package}");
    }
    eprintln!(
        "\n\n*** SKIPPED: `{bin}` not found; install it with `apt-get install -y {package}` \
         (CI fails here instead of skipping) ***\n\n"
    );
    None
}

/// A free port on `ip` for both UDP and TCP (checked at the time of asking).
pub fn free_port(ip: IpAddr) -> u16 {
    for _ in 0..100 {
        let u = UdpSocket::bind(SocketAddr::new(ip, 0)).unwrap();
        let port = u.local_addr().unwrap().port();
        if TcpListener::bind(SocketAddr::new(ip, port)).is_ok() {
            return port;
        }
    }
    panic!("no free port on {ip}");
}

pub const ZONE: &str = r#"$ORIGIN test.
$TTL 300
@ IN SOA ns.test. admin.test. 1 3600 600 86400 5
@ IN NS ns.test.
ns IN A 127.0.0.1
www 60 IN A 192.0.2.10
www 30 IN AAAA 2001:db8::10
alias 120 IN CNAME mid.test.
mid 20 IN CNAME target.test.
target 90 IN A 192.0.2.20
target 90 IN AAAA 2001:db8::20
svc 45 IN HTTPS 1 . alpn=h2 ipv4hint=192.0.2.30 ipv6hint=2001:db8::30
short 2 IN A 192.0.2.40
other 60 IN A 192.0.2.50
"#;

/// A real unbound (authoritative for `test.` through an auth-zone) on 127.0.0.1, a free port.
pub struct Unbound {
    child: Child,
    pub addr: SocketAddr,
    dir: PathBuf,
}

impl Drop for Unbound {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Unbound {
    pub fn start() -> Option<Unbound> {
        let bin = require("unbound", "unbound")?;
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let port = free_port(ip);
        let dir =
            std::env::temp_dir().join(format!("dnsproxy-unbound-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut zone = ZONE.to_string();
        // Enough A records to exceed 512 bytes: a UDP answer with TC for small buffers.
        for i in 1..=60 {
            zone.push_str(&format!("big 60 IN A 198.51.100.{i}\n"));
        }
        std::fs::write(dir.join("test.zone"), zone).unwrap();
        let conf = format!(
            r#"server:
  interface: {ip}@{port}
  port: {port}
  do-daemonize: no
  chroot: ""
  username: ""
  directory: "{dir}"
  pidfile: ""
  use-syslog: no
  logfile: ""
  verbosity: 0
  num-threads: 1
  access-control: 127.0.0.0/8 allow
  module-config: "iterator"
  do-ip6: no
  local-zone: "test." nodefault
auth-zone:
  name: "test."
  zonefile: "{dir}/test.zone"
  for-downstream: yes
  for-upstream: yes
remote-control:
  control-enable: no
"#,
            dir = dir.display()
        );
        std::fs::write(dir.join("unbound.conf"), conf).unwrap();
        let child = Command::new(bin)
            .arg("-d")
            .arg("-c")
            .arg(dir.join("unbound.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start unbound");
        let ub = Unbound {
            child,
            addr: SocketAddr::new(ip, port),
            dir,
        };
        ub.wait_ready();
        Some(ub)
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        // A query for www.test A, ID 0x4242.
        let q =
            b"\x42\x42\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03www\x04test\x00\x00\x01\x00\x01";
        let mut buf = [0u8; 512];
        while Instant::now() < deadline {
            sock.send_to(q, self.addr).unwrap();
            if let Ok((n, _)) = sock.recv_from(&mut buf) {
                if n > 12 && buf[0] == 0x42 {
                    return;
                }
            }
        }
        panic!("unbound on {} did not answer within 10 s", self.addr);
    }
}

/// What `dig` printed, parsed.
#[derive(Debug, Clone)]
pub struct DigResult {
    /// `None`: no answer (timed out).
    pub status: Option<String>,
    pub id: Option<u16>,
    pub flags: Vec<String>,
    /// Answer section lines, whitespace-normalised (`name ttl class type data`).
    pub answers: Vec<String>,
    /// Question section lines (without the leading `;`).
    pub question: Vec<String>,
    pub edns: Option<String>,
    pub elapsed: Duration,
    pub raw: String,
}

/// Runs the real `dig` from `src_ip` against `server` with extra arguments.
pub fn dig(src_ip: &str, server: SocketAddr, args: &[&str]) -> Option<DigResult> {
    let bin = require("dig", "bind9-dnsutils")?;
    let started = Instant::now();
    let out = Command::new(bin)
        .arg("-b")
        .arg(src_ip)
        .arg("-p")
        .arg(server.port().to_string())
        .arg(format!("@{}", server.ip()))
        .args(["+tries=1", "+time=2"])
        .args(args)
        .output()
        .expect("run dig");
    let elapsed = started.elapsed();
    let raw = String::from_utf8_lossy(&out.stdout).into_owned();
    Some(parse_dig(&raw, elapsed))
}

/// Parses output of a `dig` run elsewhere (e.g. in a network namespace).
pub fn parse_dig_output(raw: &str) -> DigResult {
    parse_dig(raw, Duration::ZERO)
}

fn parse_dig(raw: &str, elapsed: Duration) -> DigResult {
    let mut r = DigResult {
        status: None,
        id: None,
        flags: Vec::new(),
        answers: Vec::new(),
        question: Vec::new(),
        edns: None,
        elapsed,
        raw: raw.to_string(),
    };
    let mut section = "";
    for line in raw.lines() {
        if let Some(h) = line.strip_prefix(";; ->>HEADER<<- ") {
            for part in h.split(", ") {
                if let Some(s) = part.strip_prefix("status: ") {
                    r.status = Some(s.to_string());
                }
                if let Some(s) = part.strip_prefix("id: ") {
                    r.id = s.trim().parse().ok();
                }
            }
        } else if let Some(f) = line.strip_prefix(";; flags: ") {
            let flags = f.split(';').next().unwrap_or("");
            r.flags = flags.split_whitespace().map(String::from).collect();
        } else if let Some(e) = line.strip_prefix("; EDNS: ") {
            r.edns = Some(e.to_string());
        } else if line.starts_with(";; QUESTION SECTION") {
            section = "q";
        } else if line.starts_with(";; ANSWER SECTION") {
            section = "a";
        } else if line.starts_with(";;") || line.trim().is_empty() {
            section = if line.trim().is_empty() { "" } else { section };
        } else if section == "q" {
            r.question.push(
                line.trim_start_matches(';')
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" "),
            );
        } else if section == "a" {
            r.answers
                .push(line.split_whitespace().collect::<Vec<_>>().join(" "));
        }
    }
    r
}

/// An allowlist policy: source IP → endpoint and the patterns it may resolve.
pub struct AllowList {
    endpoints: HashMap<IpAddr, (EndpointId, Vec<FqdnPattern>)>,
}

impl AllowList {
    pub fn new(entries: &[(&str, EndpointId, &[&str])]) -> Arc<AllowList> {
        Arc::new(AllowList {
            endpoints: entries
                .iter()
                .map(|(ip, id, pats)| {
                    (
                        ip.parse().unwrap(),
                        (
                            *id,
                            pats.iter()
                                .map(|p| FqdnPattern::parse(p).unwrap())
                                .collect(),
                        ),
                    )
                })
                .collect(),
        })
    }
}

impl DnsPolicy for AllowList {
    fn check(
        &self,
        client: SocketAddr,
        _server: SocketAddr,
        _t: Transport,
        qname: &DnsName,
    ) -> Decision {
        match self.endpoints.get(&client.ip()) {
            None => Decision::UnknownEndpoint,
            Some((id, pats)) if pats.iter().any(|p| p.matches(qname)) => {
                Decision::Allow { endpoint_id: *id }
            }
            Some((id, _)) => Decision::Deny { endpoint_id: *id },
        }
    }
}

#[derive(Default)]
struct DpState {
    applied: HashSet<(EndpointId, IpAddr)>,
    in_flight: HashMap<(EndpointId, IpAddr), watch::Receiver<bool>>,
    learned: Vec<(QueryContext, LearnedAnswer)>,
    events: Vec<QueryEvent>,
    updates: usize,
}

/// An in-memory datapath that applies each batch of new IPs after `apply_delay` (or never,
/// when stalled) and keeps the ordering invariant: a learn resolves only when every IP of its
/// answer is applied, including IPs whose update another request started.
#[derive(Clone)]
pub struct MemDatapath {
    state: Arc<Mutex<DpState>>,
    apply_delay: Duration,
    stalled: bool,
}

impl MemDatapath {
    pub fn new(apply_delay: Duration) -> Arc<MemDatapath> {
        Arc::new(MemDatapath {
            state: Default::default(),
            apply_delay,
            stalled: false,
        })
    }
    pub fn stalled() -> Arc<MemDatapath> {
        Arc::new(MemDatapath {
            state: Default::default(),
            apply_delay: Duration::ZERO,
            stalled: true,
        })
    }
    pub fn learned(&self) -> Vec<(QueryContext, LearnedAnswer)> {
        self.state.lock().unwrap().learned.clone()
    }
    pub fn events(&self) -> Vec<QueryEvent> {
        self.state.lock().unwrap().events.clone()
    }
    pub fn enforceable(&self, ep: EndpointId, ip: &str) -> bool {
        self.state
            .lock()
            .unwrap()
            .applied
            .contains(&(ep, ip.parse().unwrap()))
    }
    /// Datapath updates started (one per batch of IPs not yet known).
    pub fn updates(&self) -> usize {
        self.state.lock().unwrap().updates
    }
}

impl Learner for MemDatapath {
    fn learn(
        &self,
        ctx: &QueryContext,
        answer: &LearnedAnswer,
    ) -> impl Future<Output = HoldOutcome> + Send + Unpin + 'static {
        let mut waits = Vec::new();
        let mut st = self.state.lock().unwrap();
        st.learned.push((ctx.clone(), answer.clone()));
        let mut new = Vec::new();
        for ip in &answer.ips {
            let key = (ctx.endpoint_id, *ip);
            if st.applied.contains(&key) {
                continue;
            }
            match st.in_flight.get(&key) {
                Some(rx) => waits.push(rx.clone()),
                None => new.push(key),
            }
        }
        if !new.is_empty() {
            st.updates += 1;
            let (tx, rx) = watch::channel(false);
            for k in &new {
                st.in_flight.insert(*k, rx.clone());
            }
            waits.push(rx);
            let state = self.state.clone();
            let delay = self.apply_delay;
            let stalled = self.stalled;
            tokio::spawn(async move {
                if stalled {
                    // Hold the sender forever: the update never completes.
                    std::future::pending::<()>().await;
                }
                tokio::time::sleep(delay).await;
                let mut st = state.lock().unwrap();
                for k in new {
                    st.in_flight.remove(&k);
                    st.applied.insert(k);
                }
                drop(st);
                let _ = tx.send(true);
            });
        }
        drop(st);
        Box::pin(async move {
            for mut rx in waits {
                if rx.wait_for(|done| *done).await.is_err() {
                    return HoldOutcome::Failed("datapath update abandoned".into());
                }
            }
            HoldOutcome::Enforceable
        })
    }

    fn observe(&self, event: &QueryEvent) {
        self.state.lock().unwrap().events.push(event.clone());
    }
}
