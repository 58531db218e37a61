//! Helpers for the end-to-end tests of the `fqdnwall` binary: running it, starting an agent
//! in a temporary directory, and a real unbound as the upstream DNS server.

#![allow(dead_code)] // each test binary uses a different part of this module

pub mod netns;

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_fqdnwall");

pub fn fqdnwall(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("FQDNWALL_API_SOCKET")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run fqdnwall")
}

pub fn code(o: &Output) -> i32 {
    o.status.code().expect("exited with a status")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
            stdout(o),
            stderr(o)
        )
    })
}

/// A binary the test needs: its path, or a skip (a failure under CI=true, where the test
/// script must have installed it).
pub fn require(bin: &str, package: &str) -> Option<PathBuf> {
    for dir in ["/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/local/bin"] {
        let p = Path::new(dir).join(bin);
        if p.exists() {
            return Some(p);
        }
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{bin} is not installed but CI=true: scripts/test.sh must install {package}");
    }
    eprintln!("*** SKIPPED: `{bin}` not found; install it with `apt-get install -y {package}`");
    None
}

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

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

pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("fqdnwall-e2e-")
        .tempdir()
        .expect("temp dir")
}

/// A running `fqdnwall run`, stopped with SIGTERM when dropped.
pub struct Agent {
    child: Option<Child>,
    pub socket: PathBuf,
    pub dns: SocketAddr,
    pub metrics: Option<SocketAddr>,
    /// Every line printed on stdout up to the end of the start-up banner.
    pub banner: Vec<String>,
    stderr_lines: mpsc::Receiver<String>,
    pub stderr_seen: Vec<String>,
}

impl Agent {
    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the agent runs").id()
    }

    /// The value of the unlabelled metric `name` on the agent's metrics listener; `None`
    /// when it is not exported or the listener does not answer.
    pub fn metric(&self, name: &str) -> Option<f64> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(self.metrics?).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    /// Starts the agent with `args` after `run` and waits for its banner.
    pub fn start(args: &[&str], socket: &Path) -> Agent {
        let mut child = Command::new(BIN)
            .arg("run")
            .args(args)
            .arg("--api-socket")
            .arg(socket)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start fqdnwall run");
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (otx, orx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if otx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut banner = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut dns = None;
        let mut metrics = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match orx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix("DNS proxy listening on ") {
                        let addr = rest.split(' ').next().unwrap().trim_end_matches(',');
                        dns = Some(addr.parse().expect("listen address"));
                    }
                    if let Some(rest) = line.strip_prefix("Metrics: http://") {
                        metrics = Some(rest.trim_end_matches("/metrics").parse().unwrap());
                    }
                    let done = line.starts_with("Add a policy:");
                    banner.push(line);
                    if done {
                        break;
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let errs: Vec<String> = rx.try_iter().collect();
                    panic!(
                        "fqdnwall run printed no banner in time; stdout so far: {banner:?}\nstderr:\n{}",
                        errs.join("\n")
                    );
                }
            }
        }
        // Keep draining stdout so the agent never blocks on a full pipe.
        std::thread::spawn(move || for _ in orx {});
        Agent {
            child: Some(child),
            socket: socket.to_path_buf(),
            dns: dns.expect("banner names the DNS address"),
            metrics,
            banner,
            stderr_lines: rx,
            stderr_seen: Vec::new(),
        }
    }

    /// Runs a client command against this agent.
    pub fn cmd(&self, args: &[&str]) -> Output {
        let mut all = vec!["--api-socket", self.socket.to_str().unwrap()];
        all.extend_from_slice(args);
        fqdnwall(&all)
    }

    /// A client command with `-o json` that must succeed; its JSON.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["-o", "json"];
        all.extend_from_slice(args);
        let o = self.cmd(&all);
        assert_eq!(code(&o), 0, "{args:?} failed: {}", stderr(&o));
        json(&o)
    }

    /// Waits until a log line containing `needle` appears on stderr.
    pub fn wait_log(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        if let Some(l) = self.stderr_seen.iter().find(|l| l.contains(needle)) {
            return l.clone();
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr_lines.recv_timeout(left) {
                Ok(line) => {
                    self.stderr_seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no log line containing {needle:?}; seen:\n{}",
                    self.stderr_seen.join("\n")
                ),
            }
        }
    }

    /// Sends SIGTERM and returns the exit status.
    pub fn stop(self) -> std::process::ExitStatus {
        self.stop_with("TERM")
    }

    /// Sends the signal (`TERM`, `INT`) and returns the exit status.
    pub fn stop_with(mut self, signal: &str) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        let _ = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("fqdnwall did not stop within 15 s of SIG{signal}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn terminate(child: &Child) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&c);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout`.
pub fn eventually<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub const ZONE: &str = r#"$ORIGIN example.test.
$TTL 300
@ IN SOA ns.example.test. admin.example.test. 1 3600 600 86400 5
@ IN NS ns.example.test.
ns IN A 127.0.0.1
www 60 IN A 192.0.2.10
api 60 IN A 192.0.2.11
short 2 IN A 192.0.2.40
blocked 60 IN A 192.0.2.66
"#;

/// A real unbound serving `example.test.` on a loopback port.
pub struct Unbound {
    child: Child,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Unbound {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Unbound {
    /// On 127.0.0.1 and a free port.
    pub fn start() -> Option<Unbound> {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        Unbound::start_on(ip, free_port(ip))
    }

    pub fn start_on(ip: IpAddr, port: u16) -> Option<Unbound> {
        Unbound::start_zones(ip, port, &[("example.test.", ZONE)], "www.example.test")
    }

    /// Authoritative for each (zone name with trailing dot, zone file text) of `zones`;
    /// ready once `probe` (a name with an A record) resolves. `None` when unbound or dig is
    /// missing (a skip; a failure under CI=true).
    pub fn start_zones(
        ip: IpAddr,
        port: u16,
        zones: &[(&str, &str)],
        probe: &str,
    ) -> Option<Unbound> {
        require("dig", "bind9-dnsutils")?;
        let bin = require("unbound", "unbound")?;
        let dir = tempdir();
        let mut auth = String::new();
        for (zone, text) in zones {
            let file = dir.path().join(format!("{zone}zone"));
            std::fs::write(&file, text).unwrap();
            auth.push_str(&format!(
                "auth-zone:\n  name: \"{zone}\"\n  zonefile: \"{}\"\n  for-downstream: yes\n  for-upstream: yes\n",
                file.display()
            ));
        }
        let conf = format!(
            r#"server:
  interface: {ip}@{port}
  do-daemonize: no
  chroot: ""
  username: ""
  directory: "{d}"
  pidfile: ""
  use-syslog: no
  logfile: ""
  verbosity: 0
  num-threads: 1
  access-control: 127.0.0.0/8 allow
  module-config: "iterator"
  do-ip6: no
  local-zone: "test." nodefault
{auth}remote-control:
  control-enable: no
"#,
            d = dir.path().display()
        );
        std::fs::write(dir.path().join("unbound.conf"), conf).unwrap();
        let child = Command::new(bin)
            .arg("-d")
            .arg("-c")
            .arg(dir.path().join("unbound.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start unbound");
        let ub = Unbound {
            child,
            addr: SocketAddr::new(ip, port),
            _dir: dir,
        };
        let ok = eventually(Duration::from_secs(10), "unbound to answer", || {
            dig(&ub.addr, "127.0.0.1", probe, "A", false)
                .filter(|r| r.status == "NOERROR")
                .map(|_| true)
        });
        assert!(ok);
        Some(ub)
    }
}

/// Writes `dir/name` (creating its directory) by writing a temporary file and renaming it,
/// as editors and deploy tools do: the agent's policy watcher never sees half a file.
/// A DNS query (recursion desired) for www.example.test A with id `id`, as sent on the wire.
pub fn www_example_test_query(id: u16) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in ["www", "example", "test"] {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

pub fn write(dir: &Path, name: &str, text: &str) {
    let p = dir.join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    let tmp = dir.join(format!(".{}.tmp", name.replace('/', "_")));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &p).unwrap();
}

#[derive(Debug)]
pub struct Dig {
    pub status: String,
    pub answers: Vec<String>,
}

/// `dig @server -p port -b source name type` (+tcp); `None` when no reply came.
pub fn dig(server: &SocketAddr, source: &str, name: &str, qtype: &str, tcp: bool) -> Option<Dig> {
    let mut cmd = Command::new("dig");
    cmd.arg(format!("@{}", server.ip()))
        .arg("-p")
        .arg(server.port().to_string())
        .arg("-b")
        .arg(source)
        .arg(name)
        .arg(qtype)
        .arg("+tries=1")
        .arg("+time=3")
        .arg("+noall")
        .arg("+comments")
        .arg("+answer");
    if tcp {
        cmd.arg("+tcp");
    }
    let out = cmd.output().expect("run dig");
    let text = String::from_utf8_lossy(&out.stdout);
    let status = text
        .lines()
        .find_map(|l| l.split("status: ").nth(1))
        .map(|s| s.split(',').next().unwrap().to_string())?;
    let answers = text
        .lines()
        .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().last().map(|s| s.to_string()))
        .collect();
    Some(Dig { status, answers })
}
