//! Network namespaces for the root-only end-to-end tests with the eBPF datapath: a router
//! namespace that runs `fqdnwall run`, and namespaces hanging off it on veth pairs (a guarded
//! endpoint's client, the "world" with its servers, more endpoints). The programs guard the
//! router-side end of an endpoint's veth.
//!
//! ```text
//!  client ns (eth0 10.C.N.2) ── veth ── router ns: <p>e* 10.C.N.1   [agent]
//!  world ns  (eth0 10.W.N.2…) ── veth ── router ns: <p>o* 10.W.N.1
//! ```
//! Everything a bed makes (namespaces, and with them the links; the bpffs pin directory; the
//! processes it started) goes when it is dropped, also when a test fails.

use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{code, eventually, fqdnwall, is_root, json, stderr, tempdir, BIN};

pub fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"))
}

pub fn must(cmd: &str, args: &[&str]) {
    let o = run(cmd, args);
    assert!(
        o.status.success(),
        "{cmd} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Root and bpffs, which every test here needs; a skip otherwise (a failure under CI=true).
pub fn bpf_host(what: &str) -> bool {
    let root = is_root();
    let bpffs = Path::new("/sys/fs/bpf").exists();
    if root && bpffs {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{what} need root and bpffs (root={root}, bpffs={bpffs})");
    }
    eprintln!("*** SKIPPED: {what} need root and bpffs");
    false
}

/// One namespace on a veth to the router.
pub struct LegSpec {
    /// The letter that names the namespace (`<prefix><letter><tag>`).
    pub ns: char,
    /// The letter that names the router-side interface.
    pub host_if: char,
    /// IPv4 subnet 10.`v4`.N.0/24: the router has .1, the namespace .2 up to .`last`.
    pub v4: u8,
    pub last: u8,
    /// IPv6 subnet `prefix`:N::/64 and its last host, the same way.
    pub v6: Option<(&'static str, u8)>,
}

/// The shape of a bed: names, the pin directory, the namespaces. `legs[0]` is the client
/// endpoint, `legs[1]` the world; any others are further endpoints.
pub struct Layout {
    pub prefix: &'static str,
    pub pin: &'static str,
    pub legs: &'static [LegSpec],
}

#[derive(Clone, Debug)]
pub struct Leg {
    pub ns: String,
    /// The router-side end of the veth.
    pub ifname: String,
}

pub struct NetBed {
    /// The third octet of every subnet, distinct per bed of this process.
    pub n: u32,
    pub router: String,
    pub legs: Vec<Leg>,
    /// `legs[0].ns`, `legs[0].ifname` and `legs[1].ns`.
    pub client: String,
    pub ifname: String,
    pub world: String,
    pub pin: PathBuf,
    pub dir: tempfile::TempDir,
    /// Stopped (SIGKILL) before the namespaces go.
    pub children: Vec<Child>,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl Drop for NetBed {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for leg in &self.legs {
            let _ = run("ip", &["netns", "del", &leg.ns]);
        }
        let _ = run("ip", &["netns", "del", &self.router]);
        let _ = std::fs::remove_dir_all(&self.pin);
    }
}

/// `ip -n NS ARGS...`, which must succeed.
fn ip_in(ns: &str, args: &[&str]) {
    let mut v = vec!["-n", ns];
    v.extend_from_slice(args);
    must("ip", &v);
}

impl NetBed {
    pub fn new(layout: &Layout) -> NetBed {
        let seq = SEQ.fetch_add(1, Ordering::SeqCst);
        let n = (std::process::id() % 40) * 6 + seq % 6 + 1;
        let tag = format!("{}{seq}", std::process::id() % 100_000);
        let p = layout.prefix;
        let legs: Vec<Leg> = layout
            .legs
            .iter()
            .map(|s| Leg {
                ns: format!("{p}{}{tag}", s.ns),
                ifname: format!("{p}{}{tag}", s.host_if),
            })
            .collect();
        assert!(legs.len() >= 2, "a bed has a client and a world");
        let mut bed = NetBed {
            n,
            router: format!("{p}r{tag}"),
            client: legs[0].ns.clone(),
            ifname: legs[0].ifname.clone(),
            world: legs[1].ns.clone(),
            legs: Vec::new(),
            pin: PathBuf::from(format!("/sys/fs/bpf/{}-{tag}", layout.pin)),
            dir: tempdir(),
            children: Vec::new(),
        };
        let _ = std::fs::remove_dir_all(&bed.pin);
        let _ = run("ip", &["netns", "del", &bed.router]);
        must("ip", &["netns", "add", &bed.router]);
        ip_in(&bed.router, &["link", "set", "lo", "up"]);
        for (spec, leg) in layout.legs.iter().zip(legs) {
            // Registered before it exists, so that a failure half-way still removes it.
            bed.legs.push(leg.clone());
            bed.add_leg(spec, &leg);
        }
        let mut sysctl = vec!["netns", "exec", &bed.router, "sysctl", "-qw"];
        sysctl.push("net.ipv4.ip_forward=1");
        if layout.legs.iter().any(|s| s.v6.is_some()) {
            sysctl.push("net.ipv6.conf.all.forwarding=1");
        }
        must("ip", &sysctl);
        bed
    }

    fn add_leg(&self, spec: &LegSpec, leg: &Leg) {
        let (n, r, ns) = (self.n, self.router.as_str(), leg.ns.as_str());
        let _ = run("ip", &["netns", "del", ns]);
        must("ip", &["netns", "add", ns]);
        ip_in(ns, &["link", "set", "lo", "up"]);
        must(
            "ip",
            &[
                "link",
                "add",
                &leg.ifname,
                "netns",
                r,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns,
            ],
        );
        let net = format!("10.{}.{n}", spec.v4);
        ip_in(
            r,
            &["addr", "add", &format!("{net}.1/24"), "dev", &leg.ifname],
        );
        for host in 2..=spec.last {
            ip_in(
                ns,
                &["addr", "add", &format!("{net}.{host}/24"), "dev", "eth0"],
            );
        }
        if let Some((prefix, last)) = spec.v6 {
            let net6 = format!("{prefix}:{n}:");
            let router6 = format!("{net6}:1/64");
            ip_in(
                r,
                &["-6", "addr", "add", &router6, "dev", &leg.ifname, "nodad"],
            );
            for host in 2..=last {
                let a = format!("{net6}:{host}/64");
                ip_in(ns, &["-6", "addr", "add", &a, "dev", "eth0", "nodad"]);
            }
        }
        ip_in(r, &["link", "set", &leg.ifname, "up"]);
        ip_in(ns, &["link", "set", "eth0", "up"]);
        ip_in(ns, &["route", "add", "default", "via", &format!("{net}.1")]);
        if let Some((prefix, _)) = spec.v6 {
            let gw = format!("{prefix}:{n}::1");
            ip_in(ns, &["-6", "route", "add", "default", "via", &gw]);
        }
    }

    /// A command in a namespace of the bed.
    pub fn exec(&self, ns: &str, args: &[&str]) -> Output {
        let mut v = vec!["netns", "exec", ns];
        v.extend_from_slice(args);
        run("ip", &v)
    }

    /// Starts a server in a namespace (output discarded); it is stopped with the bed.
    pub fn spawn(&mut self, ns: &str, args: &[&str], cwd: &Path) {
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {args:?}: {e}"));
        self.children.push(child);
    }

    /// Waits until `curl URL` from inside `ns` succeeds (a server of the bed is up).
    pub fn await_http(&self, ns: &str, url: &str) {
        eventually(Duration::from_secs(10), &format!("{url} from {ns}"), || {
            let o = self.exec(ns, &["curl", "-s", "-o", "/dev/null", "-m", "2", url]);
            o.status.success().then_some(())
        });
    }

    /// `fqdnwall run --config CFG EXTRA...` in the router namespace, started with the bed's
    /// pin directory; returns once its banner is out. nsenter keeps the host's mounts, so the
    /// pins land in the real bpffs and can outlive the process.
    pub fn agent(&self, cfg: &Path, extra: &[&str]) -> NsAgent {
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
        let lines = lines_of(&mut child);
        let mut agent = NsAgent {
            child: Some(child),
            sock,
            log: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !agent
            .log
            .last()
            .is_some_and(|l| l.starts_with("Add a policy:"))
        {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(l) = lines.recv_timeout(left) else {
                panic!("no banner from fqdnwall run:\n{}", agent.log.join("\n"));
            };
            agent.log.push(l);
        }
        // Keep draining, so the agent never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        agent
    }
}

/// stdout and stderr of a child, line by line.
pub fn lines_of(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let out = child
        .stdout
        .take()
        .map(|o| Box::new(o) as Box<dyn std::io::Read + Send>);
    let err = child
        .stderr
        .take()
        .map(|e| Box::new(e) as Box<dyn std::io::Read + Send>);
    for stream in [out, err].into_iter().flatten() {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(stream).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
    }
    rx
}

/// Runs `f` on a thread of its own that has joined the network namespace `ns` first: the
/// sockets it opens live there. The rest of the process stays where it is.
pub fn thread_in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: setns on this thread only, with a namespace fd we hold open.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            panic!("setns {path}: {}", std::io::Error::last_os_error());
        }
        f()
    })
}

/// `f`'s result, run inside `ns` (see [`thread_in_netns`]); a panic in `f` is re-raised.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    match thread_in_netns(ns, f).join() {
        Ok(v) => v,
        Err(p) => std::panic::resume_unwind(p),
    }
}

/// The agent started by [`NetBed::agent`]; killed when dropped.
pub struct NsAgent {
    child: Option<Child>,
    pub sock: PathBuf,
    /// Its output up to the end of the banner.
    pub log: Vec<String>,
}

impl NsAgent {
    /// A client command with `-o json` that must succeed; its JSON.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--api-socket", self.sock.to_str().unwrap(), "-o", "json"];
        all.extend_from_slice(args);
        let o = fqdnwall(&all);
        assert_eq!(code(&o), 0, "{args:?}: {}", stderr(&o));
        json(&o)
    }

    /// `monitor -o json --type T...`: the monitor (stopped when dropped) and its lines.
    pub fn monitor(&self, types: &[&str]) -> Monitor {
        let mut cmd = Command::new(BIN);
        cmd.args(["--api-socket", self.sock.to_str().unwrap(), "-o", "json"])
            .arg("monitor");
        for t in types {
            cmd.args(["--type", t]);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start monitor");
        let lines = lines_of(&mut child);
        // Give it time to subscribe before the traffic it is to see.
        std::thread::sleep(Duration::from_millis(300));
        Monitor { child, lines }
    }

    pub fn kill9(mut self) {
        let mut c = self.child.take().unwrap();
        let _ = c.kill();
        let _ = c.wait();
    }

    /// SIGTERM; the exit code.
    pub fn stop(mut self) -> i32 {
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

/// A running `monitor`.
pub struct Monitor {
    child: Child,
    pub lines: mpsc::Receiver<String>,
}

impl Monitor {
    /// The JSON events that arrive within `timeout` until `done` says the list is complete;
    /// a panic with what came when it never does.
    pub fn collect(
        &self,
        timeout: Duration,
        done: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        while !done(&seen) {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(l) = self.lines.recv_timeout(left) else {
                panic!("monitor showed only {seen:#?}");
            };
            if let Ok(v) = serde_json::from_str(&l) {
                seen.push(v);
            }
        }
        seen
    }

    /// The first event within `timeout` for which `pred` holds; a panic naming `what` when
    /// none comes.
    pub fn find(
        &self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let seen = self.collect(timeout, |s| s.last().is_some_and(&pred));
        match seen.last() {
            Some(v) => v.clone(),
            None => panic!("no monitor event for {what}"),
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
