//! The agent's L7 proxies end to end with the real `fqdnwall run`:
//! - with `datapath: none` (no root needed): the HTTP and Kafka proxies listen, `status`
//!   shows their ports, a policy with HTTP rules puts the HTTP proxy port into the policy map
//!   entry, and the metrics carry the L7 counters;
//! - with the eBPF datapath (root): curl from an endpoint's network namespace to a world HTTP
//!   server is steered to the proxy without any setting in the client: an allowed path gets
//!   the server's 200, a denied path or method gets 403 `Access denied` from the proxy, and
//!   `monitor --type l7` shows each request.
//!
//! ```text
//!  client ns (eth0 10.217.N.2) ── veth ── router ns: fle* 10.217.N.1   [agent]
//!  world ns  (eth0 10.218.N.2)  ── veth ── router ns: flo* 10.218.N.1
//! ```

mod common;

use std::io::{BufRead, BufReader, Read};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

const HTTP_POLICY: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: client-http
  namespace: default
spec:
  endpointSelector:
    matchLabels: {app: client}
  egress:
    - toCIDR: ["WORLD/24"]
      toPorts:
        - ports: [{port: "8080", protocol: TCP}]
          rules:
            http:
              - method: GET
                path: "/allowed.*"
        - ports: [{port: "9092", protocol: TCP}]
          rules:
            kafka:
              - role: produce
                topic: allowed
"#;

fn entry_for_port(rows: &serde_json::Value, port: u64) -> serde_json::Value {
    rows.as_array()
        .expect("bpf policy get is an array")
        .iter()
        .find(|r| r["port"] == port && r["direction"] == "Egress" && r["policy"] == "Allow")
        .cloned()
        .unwrap_or_else(|| panic!("no egress entry for port {port}: {rows}"))
}

#[test]
fn proxies_listen_and_http_rules_redirect_to_the_http_proxy_port() {
    let dir = tempdir();
    let d = dir.path();
    std::fs::create_dir_all(d.join("policies")).unwrap();
    std::fs::write(
        d.join("policies/http.yaml"),
        HTTP_POLICY.replace("WORLD", "127.0.100.0"),
    )
    .unwrap();
    let cfg = d.join("config.yaml");
    let fixed = free_port("127.0.0.1".parse().unwrap());
    std::fs::write(
        &cfg,
        format!(
            "policyDir: policies\nstateDir: state\ndatapath: none\ndns:\n  listen: [\"127.0.0.1:0\"]\n  \
             upstreams: [\"127.0.0.1:9\"]\nendpoints:\n  - name: client\n    namespace: default\n    \
             labels: {{app: client}}\n    ips: [\"127.0.0.2\"]\nmetrics:\n  listen: 127.0.0.1:0\n\
             l7:\n  httpPort: {fixed}\n  deniedMessage: Not here\n  secretsDir: secrets\n"
        ),
    )
    .unwrap();
    let agent = Agent::start(&["--config", cfg.to_str().unwrap()], &d.join("api.sock"));

    let st = agent.json(&["status"]);
    let http = st["proxyPorts"]["http"].as_u64().expect("http proxy port");
    let kafka = st["proxyPorts"]["kafka"]
        .as_u64()
        .expect("kafka proxy port");
    assert_eq!(http, u64::from(fixed), "{st}");
    assert!(kafka != 0 && http != kafka, "{st}");

    // The L7 rules' entry carries the HTTP proxy's port.
    let rows = agent.json(&["bpf", "policy", "get", "client"]);
    let e = entry_for_port(&rows, 8080);
    assert_eq!(e["proxyPort"], http, "{rows}");
    assert_eq!(e["protocol"], "TCP");
    assert_eq!(entry_for_port(&rows, 9092)["proxyPort"], kafka, "{rows}");

    // Both proxies are listening on their ports.
    for port in [http, kafka] {
        let addr = SocketAddr::new("127.0.0.1".parse().unwrap(), port as u16);
        TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("nothing listens on the proxy port {addr}: {e}"));
    }

    // A connection made straight to the proxy has no other destination: it is closed, not
    // forwarded to the proxy itself.
    let mut s = TcpStream::connect(("127.0.0.1", http as u16)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    use std::io::Write;
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(buf.is_empty(), "{}", String::from_utf8_lossy(&buf));

    // The metrics carry the L7 counters.
    let m = agent.metrics.expect("metrics address");
    let text = http_get(m, "/metrics");
    assert!(
        text.contains("fqdnwall_l7_requests_total{protocol=\"http\",verdict=\"denied\"} 0"),
        "{text}"
    );
    assert!(text.contains("fqdnwall_l7_connections_total{protocol=\"kafka\"}"));
    assert!(agent.stop().success());
}

#[test]
fn bad_l7_settings_are_config_errors_with_their_position() {
    let dir = tempdir();
    let cfg = dir.path().join("config.yaml");
    std::fs::write(
        &cfg,
        "datapath: none\nl7:\n  httpPort: 70000\n  kafkaPort: 9092\n  denied: x\n",
    )
    .unwrap();
    let o = fqdnwall(&["run", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains(":3:") && err.contains("l7.httpPort"), "{err}");
    assert!(err.contains(":5:") && err.contains("denied"), "{err}");
}

/// A plain HTTP/1.0 GET; the response body.
fn http_get(addr: SocketAddr, path: &str) -> String {
    use std::io::Write;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

// ---- the eBPF datapath (root) ----

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Root, bpffs and the tools; a skip otherwise (a failure under CI=true).
fn prerequisites() -> bool {
    let root = is_root();
    let bpffs = Path::new("/sys/fs/bpf").exists();
    if !(root && bpffs) {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("the L7 datapath test needs root and bpffs (root={root}, bpffs={bpffs})");
        }
        eprintln!("*** SKIPPED: the L7 datapath test needs root and bpffs");
        return false;
    }
    require("curl", "curl").is_some()
        && require("python3", "python3").is_some()
        && require("nsenter", "util-linux").is_some()
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

/// Three namespaces (router with the agent, client endpoint, world), removed on drop.
struct Bed {
    n: u32,
    router: String,
    client: String,
    world: String,
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
        for ns in [&self.client, &self.world, &self.router] {
            let _ = run("ip", &["netns", "del", ns]);
        }
        let _ = std::fs::remove_dir_all(&self.pin);
    }
}

impl Bed {
    fn new() -> Bed {
        let seq = SEQ.fetch_add(1, Ordering::SeqCst);
        let n = (std::process::id() % 40) * 6 + seq % 6 + 1;
        let tag = format!("{}{seq}", std::process::id() % 100_000);
        let bed = Bed {
            n,
            router: format!("flr{tag}"),
            client: format!("flc{tag}"),
            world: format!("flw{tag}"),
            ifname: format!("fle{tag}"),
            pin: PathBuf::from(format!("/sys/fs/bpf/fqdnwall-l7test-{tag}")),
            dir: tempdir(),
            children: Vec::new(),
        };
        let _ = std::fs::remove_dir_all(&bed.pin);
        for ns in [&bed.router, &bed.client, &bed.world] {
            let _ = run("ip", &["netns", "del", ns]);
            must("ip", &["netns", "add", ns]);
            must("ip", &["-n", ns, "link", "set", "lo", "up"]);
        }
        let wside = format!("flo{tag}");
        let (r, c, w) = (&bed.router, &bed.client, &bed.world);
        must(
            "ip",
            &[
                "link",
                "add",
                &bed.ifname,
                "netns",
                r,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                c,
            ],
        );
        must(
            "ip",
            &[
                "link", "add", &wside, "netns", r, "type", "veth", "peer", "name", "eth0", "netns",
                w,
            ],
        );
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
                &format!("10.217.{n}.1/24"),
                "dev",
                &bed.ifname,
            ],
        );
        a(
            r,
            &["addr", "add", &format!("10.218.{n}.1/24"), "dev", &wside],
        );
        a(r, &["link", "set", &bed.ifname, "up"]);
        a(r, &["link", "set", &wside, "up"]);
        a(
            c,
            &["addr", "add", &format!("10.217.{n}.2/24"), "dev", "eth0"],
        );
        a(c, &["link", "set", "eth0", "up"]);
        a(
            c,
            &["route", "add", "default", "via", &format!("10.217.{n}.1")],
        );
        a(
            w,
            &["addr", "add", &format!("10.218.{n}.2/24"), "dev", "eth0"],
        );
        a(w, &["link", "set", "eth0", "up"]);
        a(
            w,
            &["route", "add", "default", "via", &format!("10.218.{n}.1")],
        );
        must(
            "ip",
            &["netns", "exec", r, "sysctl", "-qw", "net.ipv4.ip_forward=1"],
        );
        bed
    }

    fn world_ip(&self) -> String {
        format!("10.218.{}.2", self.n)
    }

    /// An HTTP server in the world serving `allowed.txt` and `denied.txt`.
    fn start_world(&mut self) {
        let root = self.dir.path().join("www");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("allowed.txt"), "allowed content\n").unwrap();
        std::fs::write(root.join("denied.txt"), "denied content\n").unwrap();
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
                "0.0.0.0",
            ])
            .current_dir(&root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the HTTP server");
        self.children.push(http);
        let url = format!("http://{}:8080/allowed.txt", self.world_ip());
        let world = self.world.clone();
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

    fn write_config(&self) -> PathBuf {
        let n = self.n;
        std::fs::create_dir_all(self.dir.path().join("policies")).unwrap();
        std::fs::write(
            self.dir.path().join("policies/http.yaml"),
            HTTP_POLICY.replace("WORLD", &format!("10.218.{n}.0")),
        )
        .unwrap();
        let cfg = self.dir.path().join("config.yaml");
        std::fs::write(
            &cfg,
            format!(
                "policyDir: policies\nstateDir: state\ndatapath: bpf\n\
                 dns:\n  listen: [\"127.0.0.1:0\"]\n  upstreams: [\"10.218.{n}.2:53\"]\n  \
                 transparent: false\n\
                 endpoints:\n  - name: client\n    namespace: default\n    labels: {{app: client}}\n    \
                 ips: [\"10.217.{n}.2\"]\n    interface: {i}\n\
                 metrics:\n  listen: null\n",
                i = self.ifname
            ),
        )
        .unwrap();
        cfg
    }

    /// `fqdnwall run` in the router namespace; returns once its banner is out.
    fn agent(&mut self, cfg: &Path) -> PathBuf {
        let sock = self.dir.path().join("api.sock");
        let mut child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.router))
            .arg(BIN)
            .arg("run")
            .arg("--config")
            .arg(cfg)
            .arg("--api-socket")
            .arg(&sock)
            .arg("--unload-on-stop")
            .env("RUST_LOG", "info")
            .env("FQDNWALL_BPF_PIN_DIR", &self.pin)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start fqdnwall run");
        let lines = lines_of(&mut child);
        self.children.push(child);
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(l) => {
                    let done = l.starts_with("Add a policy:");
                    seen.push(l);
                    if done {
                        break;
                    }
                }
                Err(_) => panic!("no banner from fqdnwall run:\n{}", seen.join("\n")),
            }
        }
        std::thread::spawn(move || for _ in lines {});
        sock
    }

    /// curl from the client: (HTTP status, body).
    fn curl(&self, method: &str, url: &str) -> (u32, String) {
        let o = run(
            "ip",
            &[
                "netns",
                "exec",
                &self.client,
                "curl",
                "-s",
                "--max-time",
                "5",
                "-X",
                method,
                "-w",
                "\n%{http_code}",
                url,
            ],
        );
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }
}

/// stdout and stderr of a child, line by line.
fn lines_of(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    if let Some(out) = child.stdout.take() {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
    }
    if let Some(err) = child.stderr.take() {
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
    }
    rx
}

fn api_json(sock: &Path, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--api-socket", sock.to_str().unwrap(), "-o", "json"];
    all.extend_from_slice(args);
    let o = fqdnwall(&all);
    assert_eq!(code(&o), 0, "{args:?}: {}", stderr(&o));
    json(&o)
}

#[test]
fn http_rules_are_enforced_on_steered_flows_in_the_kernel_datapath() {
    if !prerequisites() {
        return;
    }
    let mut bed = Bed::new();
    bed.start_world();
    let cfg = bed.write_config();
    let sock = bed.agent(&cfg);

    let st = api_json(&sock, &["status"]);
    assert_eq!(st["datapath"], "bpf", "{st}");
    let http = st["proxyPorts"]["http"].as_u64().unwrap();
    assert_ne!(http, 0);
    let rows = api_json(&sock, &["bpf", "policy", "get", "client"]);
    assert_eq!(entry_for_port(&rows, 8080)["proxyPort"], http, "{rows}");

    // Watch the L7 events while the requests run.
    let mut monitor = Command::new(BIN)
        .args(["--api-socket", sock.to_str().unwrap(), "-o", "json"])
        .args(["monitor", "--type", "l7"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start monitor");
    let events = lines_of(&mut monitor);
    bed.children.push(monitor);
    std::thread::sleep(Duration::from_millis(300));

    let base = format!("http://{}:8080", bed.world_ip());
    let (code, body) = bed.curl("GET", &format!("{base}/allowed.txt"));
    assert_eq!((code, body.as_str()), (200, "allowed content\n"));
    let (code, body) = bed.curl("GET", &format!("{base}/denied.txt"));
    assert_eq!((code, body.as_str()), (403, "Access denied"));
    // The path is allowed, the method is not.
    let (code, body) = bed.curl("HEAD", &format!("{base}/allowed.txt"));
    assert_eq!(code, 403, "{body}");

    // Each request appears in the monitor with its verdict and HTTP fields.
    let mut seen: Vec<serde_json::Value> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.len() < 3 {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(l) = events.recv_timeout(left) else {
            panic!("monitor showed only {seen:?}");
        };
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&l) {
            seen.push(v);
        }
    }
    let ok = &seen[0];
    assert_eq!(ok["type"], "l7");
    assert_eq!(ok["verdict"], "allowed");
    assert_eq!(ok["method"], "GET");
    assert_eq!(ok["path"], "/allowed.txt");
    assert_eq!(ok["status"], 200);
    assert_eq!(ok["endpoint"], "client");
    assert_eq!(ok["direction"], "egress");
    assert_eq!(ok["dport"], 8080);
    assert_eq!(ok["dstIp"], bed.world_ip());
    assert_eq!(ok["srcIp"], format!("10.217.{}.2", bed.n));
    let denied = &seen[1];
    assert_eq!(denied["verdict"], "denied");
    assert_eq!(denied["path"], "/denied.txt");
    assert_eq!(denied["status"], 403);
    assert_eq!(seen[2]["method"], "HEAD");
    assert_eq!(seen[2]["verdict"], "denied");
    let _: IpAddr = ok["dstIp"].as_str().unwrap().parse().unwrap();

    // A policy change applies to the next request of an open connection: a keep-alive client
    // is denied, the policy starts allowing the path, the same connection is allowed.
    let ready = bed.dir.path().join("ready");
    let go = bed.dir.path().join("go");
    let script = format!(
        "import http.client, os, time\n\
         c = http.client.HTTPConnection('{ip}', 8080, timeout=5)\n\
         c.request('GET', '/denied.txt'); r = c.getresponse(); r.read()\n\
         p1 = c.sock.getsockname()[1]\n\
         print(r.status, flush=True)\n\
         open('{ready}', 'w').close()\n\
         for _ in range(400):\n    \
             if os.path.exists('{go}'): break\n    \
             time.sleep(0.05)\n\
         c.request('GET', '/denied.txt'); p2 = c.sock.getsockname()[1]\n\
         r = c.getresponse(); body = r.read().decode().strip()\n\
         print(r.status, body, p1 == p2, flush=True)\n",
        ip = bed.world_ip(),
        ready = ready.display(),
        go = go.display(),
    );
    let client = Command::new("ip")
        .args(["netns", "exec", &bed.client, "python3", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the keep-alive client");
    eventually(
        Duration::from_secs(10),
        "the first keep-alive request",
        || ready.exists().then_some(()),
    );
    let before = api_json(&sock, &["policy", "get"])["revision"].clone();
    let widened = HTTP_POLICY
        .replace("WORLD", &format!("10.218.{}.0", bed.n))
        .replace("/allowed.*", "/(allowed|denied).*");
    let tmp = bed.dir.path().join("policies/.http.yaml.tmp");
    std::fs::write(&tmp, widened).unwrap();
    std::fs::rename(&tmp, bed.dir.path().join("policies/http.yaml")).unwrap();
    eventually(
        Duration::from_secs(10),
        "the widened policy in force",
        || (api_json(&sock, &["policy", "get"])["revision"] != before).then_some(()),
    );
    std::fs::write(&go, "").unwrap();
    let out = client.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        ["403", "200 denied content True"],
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
