//! The agent's L7 proxies end to end with the real `fqdnwall run`:
//! - with `datapath: none` (no root needed): the HTTP and Kafka proxies listen, `status`
//!   shows their ports, a policy with HTTP rules puts the HTTP proxy port into the policy map
//!   entry, and the metrics carry the L7 counters;
//! - with the eBPF datapath (root): real clients in an endpoint's network namespace talk to
//!   real servers in the world and are steered to the proxies without any setting in the
//!   client: curl to an HTTP server (an allowed path gets the server's 200, a denied path or
//!   method 403 `Access denied` from the proxy), kafka-python to a tansu broker (produce and
//!   consume by topic and role; refused requests get TOPIC_AUTHORIZATION_FAILED and never
//!   reach the broker), a tonic client to a tonic server (a denied method gets
//!   PERMISSION_DENIED, allowed calls on the same channel go on). `monitor --type l7` and the
//!   metrics show each request.
//!
//! ```text
//!  client ns (eth0 10.217.N.2) ── veth ── router ns: fle* 10.217.N.1   [agent]
//!  world ns  (eth0 10.218.N.2)  ── veth ── router ns: flo* 10.218.N.1
//! ```

mod common;

use std::io::Read;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::netns::*;
use common::*;

/// L7 rules of one port, as the `rules` of a `toPorts` entry holds them (YAML flow style).
const HTTP_RULES: &str = r#"http: [{method: GET, path: "/allowed.*"}]"#;
const KAFKA_PRODUCE_RULES: &str = "kafka: [{role: produce, topic: allowed}]";

/// The client endpoint's egress policy to the /24 of `world`: each (port, rules) in
/// `ports` is a TCP port with those L7 rules.
fn client_policy(world: &str, ports: &[(u16, &str)]) -> String {
    let mut s = format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n\
         metadata:\n  name: client-l7\n  namespace: default\n\
         spec:\n  endpointSelector:\n    matchLabels: {{app: client}}\n  \
         egress:\n    - toCIDR: [\"{world}/24\"]\n      toPorts:\n"
    );
    for (port, rules) in ports {
        s += &format!(
            "        - ports: [{{port: \"{port}\", protocol: TCP}}]\n          rules: {{{rules}}}\n"
        );
    }
    s
}

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
        client_policy(
            "127.0.100.0",
            &[(8080, HTTP_RULES), (9092, KAFKA_PRODUCE_RULES)],
        ),
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

/// The client endpoint and the world.
const LAYOUT: Layout = Layout {
    prefix: "fl",
    pin: "fqdnwall-l7test",
    legs: &[
        LegSpec {
            ns: 'c',
            host_if: 'e',
            v4: 217,
            last: 2,
            v6: None,
        },
        LegSpec {
            ns: 'w',
            host_if: 'o',
            v4: 218,
            last: 2,
            v6: None,
        },
    ],
};

/// Root, bpffs and the tools; a skip otherwise (a failure under CI=true).
fn prerequisites() -> bool {
    bpf_host("the L7 datapath tests")
        && require("curl", "curl").is_some()
        && require("python3", "python3").is_some()
        && require("nsenter", "util-linux").is_some()
}

/// A peer that scripts/setup-l7.sh installs: a skip without it (a failure under CI=true).
fn l7_peer(present: bool, what: &str) -> bool {
    if present {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{what} is missing but CI=true: scripts/setup-l7.sh installs it");
    }
    eprintln!("*** SKIPPED: {what} is missing; scripts/setup-l7.sh installs it");
    false
}

struct Bed(NetBed);

impl Deref for Bed {
    type Target = NetBed;
    fn deref(&self) -> &NetBed {
        &self.0
    }
}

impl DerefMut for Bed {
    fn deref_mut(&mut self) -> &mut NetBed {
        &mut self.0
    }
}

impl Bed {
    fn new() -> Bed {
        Bed(NetBed::new(&LAYOUT))
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
        let world = self.world.clone();
        let http = ["python3", "-m", "http.server", "8080", "--bind", "0.0.0.0"];
        self.spawn(&world, &http, &root);
        let url = format!("http://{}:8080/allowed.txt", self.world_ip());
        self.await_http(&world, &url);
    }

    /// The client policy of `ports` towards the world (see [`client_policy`]).
    fn policy(&self, ports: &[(u16, &str)]) -> String {
        client_policy(&format!("10.218.{}.0", self.n), ports)
    }

    /// The agent's config with the client policy of `ports` as the only policy file.
    fn write_config(&self, ports: &[(u16, &str)]) -> PathBuf {
        let n = self.n;
        std::fs::create_dir_all(self.dir.path().join("policies")).unwrap();
        std::fs::write(self.dir.path().join("policies/l7.yaml"), self.policy(ports)).unwrap();
        let cfg = self.dir.path().join("config.yaml");
        std::fs::write(
            &cfg,
            format!(
                "policyDir: policies\nstateDir: state\ndatapath: bpf\n\
                 dns:\n  listen: [\"127.0.0.1:0\"]\n  upstreams: [\"10.218.{n}.2:53\"]\n  \
                 transparent: false\n\
                 endpoints:\n  - name: client\n    namespace: default\n    labels: {{app: client}}\n    \
                 ips: [\"10.217.{n}.2\"]\n    interface: {i}\n\
                 metrics:\n  listen: 127.0.0.1:0\n",
                i = self.ifname
            ),
        )
        .unwrap();
        cfg
    }

    /// curl from the client: (HTTP status, body).
    fn curl(&self, method: &str, url: &str) -> (u32, String) {
        let o = self.exec(
            &self.client,
            &[
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

/// A bed and the agent with the client policy of `ports` in force; each of those ports'
/// policy map entry carries the port of its proxy (HTTP or Kafka, after its rules' kind).
fn bed_and_agent(ports: &[(u16, &str)]) -> (Bed, NsAgent) {
    let bed = Bed::new();
    let cfg = bed.write_config(ports);
    let agent = bed.agent(&cfg, &["--unload-on-stop"]);
    let st = agent.json(&["status"]);
    assert_eq!(st["datapath"], "bpf", "{st}");
    let rows = agent.json(&["bpf", "policy", "get", "client"]);
    for (port, rules) in ports {
        let kind = rules.split(':').next().unwrap();
        let proxy = &st["proxyPorts"][kind];
        assert!(proxy.as_u64().is_some_and(|p| p != 0), "{st}");
        let entry = entry_for_port(&rows, u64::from(*port));
        assert_eq!(&entry["proxyPort"], proxy, "{rows}");
    }
    (bed, agent)
}

/// The agent's metrics page, fetched inside the router namespace where it listens.
fn agent_metrics(bed: &Bed, agent: &NsAgent) -> String {
    let addr: SocketAddr = agent
        .log
        .iter()
        .find_map(|l| l.strip_prefix("Metrics: http://"))
        .and_then(|a| a.trim_end_matches("/metrics").parse().ok())
        .unwrap_or_else(|| panic!("no metrics address in {:?}", agent.log));
    in_netns(&bed.router, move || http_get(addr, "/metrics"))
}

/// The value of one sample of the metrics page.
fn sample(metrics: &str, name_and_labels: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {name_and_labels}:\n{metrics}"))
}

#[test]
fn http_rules_are_enforced_on_steered_flows_in_the_kernel_datapath() {
    if !prerequisites() {
        return;
    }
    let (mut bed, agent) = bed_and_agent(&[(8080, HTTP_RULES), (9092, KAFKA_PRODUCE_RULES)]);
    bed.start_world();

    // Watch the L7 events while the requests run.
    let monitor = agent.monitor(&["l7"]);

    let base = format!("http://{}:8080", bed.world_ip());
    let (code, body) = bed.curl("GET", &format!("{base}/allowed.txt"));
    assert_eq!((code, body.as_str()), (200, "allowed content\n"));
    let (code, body) = bed.curl("GET", &format!("{base}/denied.txt"));
    assert_eq!((code, body.as_str()), (403, "Access denied"));
    // The path is allowed, the method is not.
    let (code, body) = bed.curl("HEAD", &format!("{base}/allowed.txt"));
    assert_eq!(code, 403, "{body}");

    // Each request appears in the monitor with its verdict and HTTP fields.
    let seen = monitor.collect(Duration::from_secs(10), |s| s.len() >= 3);
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
    let before = agent.json(&["policy", "get"])["revision"].clone();
    let widened = bed
        .policy(&[(8080, HTTP_RULES), (9092, KAFKA_PRODUCE_RULES)])
        .replace("/allowed.*", "/(allowed|denied).*");
    let tmp = bed.dir.path().join("policies/.l7.yaml.tmp");
    std::fs::write(&tmp, widened).unwrap();
    std::fs::rename(&tmp, bed.dir.path().join("policies/l7.yaml")).unwrap();
    eventually(
        Duration::from_secs(10),
        "the widened policy in force",
        || (agent.json(&["policy", "get"])["revision"] != before).then_some(()),
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

// ---- Kafka: tansu in the world, kafka-python in the client ----

const KAFKA_RULES: &str = "kafka: [{role: produce, topic: allowed}, \
                           {role: consume, topic: allowed}, {role: consume, topic: readonly}]";

/// The Kafka client of the l7 crate's tests (kafka-python): `MODE BOOTSTRAP ARGS...` run in
/// `ns`; its one line, `OK ...` or `ERR <exception class> ...`.
fn kafka(bed: &Bed, ns: &str, mode: &str, args: &[&str]) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/l7/tests/kafka_client.py");
    let bootstrap = format!("{}:9092", bed.world_ip());
    let o = bed.exec(ns, &[&["python3", script, mode, &bootstrap], args].concat());
    let text = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert!(
        o.status.success(),
        "kafka client {mode} {args:?} failed: {text}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    text
}

fn python_has_kafka() -> bool {
    Command::new("python3")
        .args(["-c", "import kafka"])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn kafka_rules_are_enforced_between_a_real_client_and_broker() {
    if !prerequisites()
        || !l7_peer(python_has_kafka(), "python3 with kafka-python")
        || !l7_peer(require_quiet("tansu"), "tansu")
    {
        return;
    }
    let (mut bed, agent) = bed_and_agent(&[(9092, KAFKA_RULES)]);
    // The broker listens in the world and advertises its own address, so every connection
    // the client makes (bootstrap and the partition leader) is one the datapath steers.
    let listener = format!("tcp://{}:9092", bed.world_ip());
    let (world, dir) = (bed.world.clone(), bed.dir.path().to_path_buf());
    bed.spawn(
        &world,
        &[
            "tansu",
            "broker",
            "--listener-url",
            &listener,
            "--advertised-listener-url",
            &listener,
            "--storage-engine",
            "memory://tansu/",
        ],
        &dir,
    );
    let broker: SocketAddr = format!("{}:9092", bed.world_ip()).parse().unwrap();
    eventually(Duration::from_secs(20), "tansu listening", || {
        in_netns(&world, move || {
            TcpStream::connect_timeout(&broker, Duration::from_millis(500)).ok()
        })
    });
    // Set up at the broker itself (the world is no endpoint): the topics, and a record to
    // read from the topic the client may only consume.
    assert_eq!(
        kafka(&bed, &world, "create", &["allowed", "denied", "readonly"]),
        "OK"
    );
    let r = kafka(&bed, &world, "produce", &["readonly", "seeded"]);
    assert!(r.starts_with("OK "), "{r}");

    let monitor = agent.monitor(&["l7"]);

    // Role produce on `allowed`: the record is written and can be read back (role consume).
    let client = bed.client.clone();
    let r = kafka(&bed, &client, "produce", &["allowed", "m1"]);
    assert!(r.starts_with("OK "), "{r}");
    assert_eq!(kafka(&bed, &client, "consume", &["allowed"]), "OK m1");
    // No rule for `denied`.
    let r = kafka(&bed, &client, "produce", &["denied", "leak"]);
    assert!(r.starts_with("ERR TopicAuthorizationFailedError"), "{r}");
    // Role consume on `readonly`: fetch passes, produce is refused.
    assert_eq!(kafka(&bed, &client, "consume", &["readonly"]), "OK seeded");
    let r = kafka(&bed, &client, "produce", &["readonly", "m2"]);
    assert!(r.starts_with("ERR TopicAuthorizationFailedError"), "{r}");

    // At the broker: the refused records never arrived. (Each read waits for the consumer's
    // idle timeout, so the three run at once.)
    let topics = ["denied", "readonly", "allowed"];
    let at_broker: Vec<String> = std::thread::scope(|s| {
        let reads: Vec<_> = topics
            .map(|t| s.spawn(|| kafka(&bed, &world, "consume", &[t])))
            .into_iter()
            .collect();
        reads.into_iter().map(|r| r.join().unwrap()).collect()
    });
    assert_eq!(at_broker, ["OK", "OK seeded", "OK m1"]);

    // The verdicts in the monitor: an allowed Produce to `allowed`, and the Produce requests
    // to `denied` and `readonly` refused with TOPIC_AUTHORIZATION_FAILED (the client learns
    // the partitions from a Metadata request for every topic, which names none and passes).
    let denied_topic = |s: &[serde_json::Value], t: &str| {
        s.iter().any(|e| {
            e["verdict"] == "denied" && e["apiKey"] == 0 && e["topic"] == t && e["errorCode"] == 29
        })
    };
    let seen = monitor.collect(Duration::from_secs(10), |s| {
        denied_topic(s, "denied") && denied_topic(s, "readonly")
    });
    assert!(seen.iter().all(|e| e["type"] == "l7"
        && e["l7Protocol"] == "kafka"
        && e["endpoint"] == "client"
        && e["dport"] == 9092
        && e["clientID"] == "fqdnwall-test"));
    let produced: Vec<&serde_json::Value> = seen.iter().filter(|e| e["apiKey"] == 0).collect();
    assert!(
        produced
            .iter()
            .any(|e| e["verdict"] == "allowed" && e["topic"] == "allowed"),
        "{seen:#?}"
    );
    assert!(
        produced
            .iter()
            .all(|e| e["verdict"] == "denied" || e["topic"] == "allowed"),
        "{seen:#?}"
    );
    assert!(seen
        .iter()
        .any(|e| e["apiKey"] == 1 && e["verdict"] == "allowed" && e["topic"] == "readonly"));

    let m = agent_metrics(&bed, &agent);
    let kafka_req = |v: &str| {
        sample(
            &m,
            &format!("fqdnwall_l7_requests_total{{protocol=\"kafka\",verdict=\"{v}\"}}"),
        )
    };
    assert!(kafka_req("denied") >= 2.0, "{m}");
    assert!(kafka_req("allowed") >= 4.0, "{m}");
    assert_eq!(
        sample(
            &m,
            "fqdnwall_l7_malformed_requests_total{protocol=\"kafka\"}"
        ),
        0.0
    );
    assert_eq!(agent.stop(), 0);
}

/// Whether `bin` is on the usual paths (no message).
fn require_quiet(bin: &str) -> bool {
    ["/usr/local/bin", "/usr/bin", "/bin"]
        .iter()
        .any(|d| Path::new(d).join(bin).exists())
}

// ---- gRPC: a tonic server in the world, a tonic client in the client ----

const GRPC_RULES: &str = r#"http: [{method: POST, path: "/wall\\.Greeter/Hello"}]"#;

/// `wall.Greeter` with the methods `Hello` and `Admin`, written out by hand (what
/// tonic-build would generate for one string field each way) so that no protoc is needed.
mod greeter {
    use std::convert::Infallible;
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use tonic::{Request, Response, Status};

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Text {
        #[prost(string, tag = "1")]
        pub text: String,
    }

    type Fut<T> = Pin<Box<dyn Future<Output = T> + Send>>;

    #[derive(Clone)]
    pub struct Greeter;

    impl tonic::server::NamedService for Greeter {
        const NAME: &'static str = "wall.Greeter";
    }

    /// One method: answers with the method's name and the request's text.
    struct Method(&'static str);

    impl tonic::server::UnaryService<Text> for Method {
        type Response = Text;
        type Future = Fut<Result<Response<Text>, Status>>;
        fn call(&mut self, req: Request<Text>) -> Self::Future {
            let text = format!("{} {}", self.0, req.into_inner().text);
            Box::pin(async move { Ok(Response::new(Text { text })) })
        }
    }

    type HttpRequest = http::Request<tonic::body::Body>;
    type HttpResponse = http::Response<tonic::body::Body>;

    impl tower_service::Service<HttpRequest> for Greeter {
        type Response = HttpResponse;
        type Error = Infallible;
        type Future = Fut<Result<HttpResponse, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: HttpRequest) -> Self::Future {
            let method = req.uri().path().strip_prefix("/wall.Greeter/");
            let method = match method {
                Some("Hello") => Method("Hello"),
                Some("Admin") => Method("Admin"),
                _ => return Box::pin(async { Ok(Status::unimplemented("").into_http()) }),
            };
            Box::pin(async move {
                let codec = tonic_prost::ProstCodec::<Text, Text>::default();
                Ok(tonic::server::Grpc::new(codec).unary(method, req).await)
            })
        }
    }

    /// One unary call on `channel`: the answer's text, or the status's code and message.
    pub async fn call(
        channel: &tonic::transport::Channel,
        method: &'static str,
        text: &str,
    ) -> Result<String, (tonic::Code, String)> {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready()
            .await
            .map_err(|e| (tonic::Code::Unavailable, e.to_string()))?;
        let codec = tonic_prost::ProstCodec::<Text, Text>::default();
        let path = http::uri::PathAndQuery::from_static(method);
        let req = Request::new(Text { text: text.into() });
        match grpc.unary(req, path, codec).await {
            Ok(r) => Ok(r.into_inner().text),
            Err(s) => Err((s.code(), s.message().to_string())),
        }
    }
}

/// A tonic server running on a thread inside a namespace; stopped and joined when dropped.
struct GrpcServer {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl GrpcServer {
    fn start(ns: &str, addr: SocketAddr) -> GrpcServer {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (bound, is_bound) = std::sync::mpsc::channel();
        let thread = thread_in_netns(ns, move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let l = tokio::net::TcpListener::bind(addr)
                    .await
                    .unwrap_or_else(|e| panic!("gRPC server on {addr}: {e}"));
                let _ = bound.send(());
                tonic::transport::Server::builder()
                    .add_service(greeter::Greeter)
                    .serve_with_incoming_shutdown(
                        tokio_stream::wrappers::TcpListenerStream::new(l),
                        async {
                            let _ = stopped.await;
                        },
                    )
                    .await
                    .unwrap();
            });
        });
        let server = GrpcServer {
            stop: Some(stop),
            thread: Some(thread),
        };
        is_bound
            .recv_timeout(Duration::from_secs(10))
            .expect("the gRPC server listening");
        server
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn grpc_methods_are_enforced_per_call_on_one_channel() {
    if !prerequisites() {
        return;
    }
    let (bed, agent) = bed_and_agent(&[(50051, GRPC_RULES)]);
    let addr: SocketAddr = format!("{}:50051", bed.world_ip()).parse().unwrap();
    let _server = GrpcServer::start(&bed.world, addr);
    let monitor = agent.monitor(&["l7"]);

    // One channel (one HTTP/2 connection): allowed, denied, allowed again, then a denied and
    // an allowed call at the same time.
    let results = in_netns(&bed.client, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect_timeout(Duration::from_secs(5))
                .timeout(Duration::from_secs(5))
                .connect()
                .await
                .expect("connect to the world's gRPC server");
            let mut out = Vec::new();
            out.push(greeter::call(&channel, "/wall.Greeter/Hello", "one").await);
            out.push(greeter::call(&channel, "/wall.Greeter/Admin", "two").await);
            out.push(greeter::call(&channel, "/wall.Greeter/Hello", "three").await);
            let (a, b) = tokio::join!(
                greeter::call(&channel, "/wall.Greeter/Admin", "four"),
                greeter::call(&channel, "/wall.Greeter/Hello", "five"),
            );
            out.extend([a, b]);
            out
        })
    });
    let denied = Err((tonic::Code::PermissionDenied, "Access denied".to_string()));
    assert_eq!(
        results,
        [
            Ok("Hello one".to_string()),
            denied.clone(),
            Ok("Hello three".to_string()),
            denied,
            Ok("Hello five".to_string()),
        ]
    );

    let seen = monitor.collect(Duration::from_secs(10), |s| s.len() >= 5);
    for e in &seen {
        assert_eq!(e["httpVersion"], "HTTP/2", "{e}");
        assert_eq!(e["method"], "POST", "{e}");
        assert_eq!(e["status"], 200, "{e}");
        assert_eq!(e["dport"], 50051, "{e}");
        match e["path"].as_str() {
            Some("/wall.Greeter/Hello") => {
                assert_eq!(e["verdict"], "allowed", "{e}");
                assert!(e.get("grpcStatus").is_none(), "{e}");
            }
            Some("/wall.Greeter/Admin") => {
                assert_eq!(e["verdict"], "denied", "{e}");
                assert_eq!(e["grpcStatus"], 7, "{e}");
            }
            _ => panic!("unexpected event {e}"),
        }
    }
    // The five calls travelled on one connection.
    let m = agent_metrics(&bed, &agent);
    assert_eq!(
        sample(&m, "fqdnwall_l7_connections_total{protocol=\"http\"}"),
        1.0,
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            "fqdnwall_l7_requests_total{protocol=\"http\",verdict=\"denied\"}"
        ),
        2.0
    );
    assert_eq!(agent.stop(), 0);
}
