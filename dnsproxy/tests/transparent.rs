//! Transparent interception end to end, in network namespaces this test creates: a client
//! namespace asks a DNS server in a "world" namespace; a router namespace between them steers
//! the client's port-53 traffic to the proxy with nftables TPROXY (what the eBPF datapath does
//! with bpf_sk_assign). The proxy must read the original destination from its sockets, forward
//! there with its mark, and answer from the server's address, so `dig` never notices — except
//! that a denied name gets REFUSED, which the real server would never say.

mod common;

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use common::{require, AllowList, MemDatapath};
use dnsproxy::{DnsProxy, ProxyConfig, ProxyMetrics, Verdict};

const PROXY_PORT: u16 = 10053;
const SERVER: &str = "10.77.2.2";
const CLIENT: &str = "10.77.1.2";

fn sh(cmd: &str) {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .expect("run sh");
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The three namespaces; removed on drop.
struct Topology {
    client: String,
    router: String,
    world: String,
    unbound: Option<std::process::Child>,
}

impl Drop for Topology {
    fn drop(&mut self) {
        if let Some(mut child) = self.unbound.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in [&self.client, &self.router, &self.world] {
            // Killing what runs inside first (unbound), then the namespace.
            let _ = Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "ip netns pids {ns} 2>/dev/null | xargs -r kill; ip netns del {ns}"
                ))
                .status();
        }
    }
}

impl Topology {
    fn create() -> Topology {
        let id = std::process::id();
        let t = Topology {
            client: format!("fwdns-c-{id}"),
            router: format!("fwdns-r-{id}"),
            world: format!("fwdns-w-{id}"),
            unbound: None,
        };
        let (c, r, w) = (&t.client, &t.router, &t.world);
        for ns in [c, r, w] {
            sh(&format!("ip netns add {ns} && ip -n {ns} link set lo up"));
        }
        sh(&format!(
            "ip link add c0 netns {c} type veth peer name r0 netns {r}"
        ));
        sh(&format!(
            "ip link add r1 netns {r} type veth peer name w0 netns {w}"
        ));
        sh(&format!(
            "ip -n {c} addr add {CLIENT}/24 dev c0 && ip -n {c} link set c0 up"
        ));
        sh(&format!("ip -n {c} route add default via 10.77.1.1"));
        sh(&format!(
            "ip -n {r} addr add 10.77.1.1/24 dev r0 && ip -n {r} link set r0 up"
        ));
        sh(&format!(
            "ip -n {r} addr add 10.77.2.1/24 dev r1 && ip -n {r} link set r1 up"
        ));
        sh(&format!(
            "ip netns exec {r} sysctl -qw net.ipv4.ip_forward=1"
        ));
        sh(&format!(
            "ip -n {w} addr add {SERVER}/24 dev w0 && ip -n {w} link set w0 up"
        ));
        sh(&format!("ip -n {w} route add default via 10.77.2.1"));
        // The router steers DNS to any server to the proxy's transparent sockets.
        sh(&format!("ip -n {r} rule add fwmark 1 lookup 100"));
        sh(&format!(
            "ip -n {r} route add local 0.0.0.0/0 dev lo table 100"
        ));
        let rules = format!(
            "table ip fwdns {{\n  chain pre {{\n    type filter hook prerouting priority mangle;\n    \
             iifname \"r0\" udp dport 53 tproxy to :{PROXY_PORT} meta mark set 1 accept\n    \
             iifname \"r0\" tcp dport 53 tproxy to :{PROXY_PORT} meta mark set 1 accept\n  }}\n  \
             chain out {{\n    type filter hook output priority 0;\n    \
             meta mark 0x4657 th dport 53 counter\n  }}\n}}\n"
        );
        let file = std::env::temp_dir().join(format!("{r}.nft"));
        std::fs::write(&file, rules).unwrap();
        sh(&format!("ip netns exec {r} nft -f {}", file.display()));
        let _ = std::fs::remove_file(file);
        t
    }

    fn start_unbound(&mut self, bin: &std::path::Path) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("{}-unbound", self.world));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("test.zone"), common::ZONE).unwrap();
        let conf = format!(
            "server:\n  interface: {SERVER}\n  port: 53\n  do-daemonize: no\n  chroot: \"\"\n  \
             username: \"\"\n  directory: \"{d}\"\n  pidfile: \"\"\n  use-syslog: no\n  \
             logfile: \"\"\n  verbosity: 0\n  num-threads: 1\n  access-control: 0.0.0.0/0 allow\n  \
             module-config: \"iterator\"\n  do-ip6: no\n  local-zone: \"test.\" nodefault\n\
             auth-zone:\n  name: \"test.\"\n  zonefile: \"{d}/test.zone\"\n  for-downstream: yes\n  \
             for-upstream: yes\nremote-control:\n  control-enable: no\n",
            d = dir.display()
        );
        std::fs::write(dir.join("unbound.conf"), conf).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.world])
            .arg(bin)
            .args(["-d", "-c"])
            .arg(dir.join("unbound.conf"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start unbound in the world namespace");
        self.unbound = Some(child);
        dir
    }

    fn dig(&self, args: &[&str]) -> common::DigResult {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.client, "dig", "+tries=1", "+time=2"])
            .arg(format!("@{SERVER}"))
            .args(args)
            .output()
            .expect("dig in the client namespace");
        common::parse_dig_output(&String::from_utf8_lossy(&out.stdout))
    }
}

/// Runs the proxy with its sockets inside the router namespace: a thread that entered the
/// namespace builds the runtime, so every socket and thread of the proxy lives there.
fn start_proxy_in(
    netns: &str,
) -> (
    Arc<ProxyMetrics>,
    Arc<MemDatapath>,
    mpsc::Sender<()>,
    std::thread::JoinHandle<()>,
) {
    let ns = std::fs::File::open(format!("/var/run/netns/{netns}")).expect("netns file");
    let (ready_tx, ready_rx) = mpsc::channel();
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let thread = std::thread::spawn(move || {
        // SAFETY: setns on this thread only, with a namespace file descriptor we own.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut c =
                ProxyConfig::new(vec![SocketAddr::from(([0, 0, 0, 0], PROXY_PORT))], vec![]);
            c.transparent = true;
            c.upstream_mark = Some(0x4657);
            c.udp_sockets_per_listen = 2;
            c.forward_timeout = Duration::from_secs(2);
            let policy = AllowList::new(&[(CLIENT, 5, &["www.test", "alias.test"])]);
            let dp = MemDatapath::new(Duration::from_millis(20));
            let proxy = DnsProxy::start(c, policy, dp.clone(), None).await.unwrap();
            ready_tx.send((proxy.metrics(), dp)).unwrap();
            // Serve (TCP runs on this runtime) until told to stop.
            loop {
                if stop_rx.try_recv().is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            drop(proxy);
        });
    });
    let (metrics, dp) = ready_rx.recv().expect("proxy started");
    (metrics, dp, stop_tx, thread)
}

#[test]
fn intercepted_queries_go_to_their_original_server_and_answers_come_from_it() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "the transparent test needs root in CI"
        );
        eprintln!("\n\n*** SKIPPED: network namespaces and TPROXY need root ***\n\n");
        return;
    }
    let (Some(unbound), Some(_), Some(_), Some(_)) = (
        require("unbound", "unbound"),
        require("dig", "bind9-dnsutils"),
        require("nft", "nftables"),
        require("ip", "iproute2"),
    ) else {
        return;
    };
    let mut topo = Topology::create();
    let dir = topo.start_unbound(&unbound);
    let (metrics, dp, stop, thread) = start_proxy_in(&topo.router);

    // The server needs a moment; the first answered query proves the whole path.
    let mut first = topo.dig(&["www.test", "A"]);
    for _ in 0..50 {
        if first.status.as_deref() == Some("NOERROR") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        first = topo.dig(&["www.test", "A"]);
    }
    assert_eq!(first.status.as_deref(), Some("NOERROR"), "{}", first.raw);
    assert_eq!(first.answers, ["www.test. 60 IN A 192.0.2.10"]);
    assert!(
        first.raw.contains(&format!("SERVER: {SERVER}#53")),
        "{}",
        first.raw
    );

    let tcp = topo.dig(&["alias.test", "A", "+tcp"]);
    assert_eq!(tcp.status.as_deref(), Some("NOERROR"), "{}", tcp.raw);
    assert_eq!(tcp.answers.len(), 3);

    // Denied: REFUSED, something the real server would never answer.
    let denied = topo.dig(&["other.test", "A"]);
    assert_eq!(denied.status.as_deref(), Some("REFUSED"), "{}", denied.raw);

    assert!(metrics.query_count(Verdict::Allowed, "NOERROR") >= 2);
    assert_eq!(metrics.query_count(Verdict::Denied, "REFUSED"), 1);
    let learned = dp.learned();
    let last = learned.last().expect("learned");
    assert_eq!(
        last.0.server,
        format!("{SERVER}:53").parse::<SocketAddr>().unwrap()
    );
    assert_eq!(last.0.client.ip().to_string(), CLIENT);
    assert!(dp.enforceable(5, "192.0.2.20"));

    // The proxy's own queries to the server carried its mark (the datapath's cue not to
    // redirect them again).
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &topo.router,
            "nft",
            "list",
            "chain",
            "ip",
            "fwdns",
            "out",
        ])
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    let marked: u64 = listing
        .split("counter packets ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(marked >= 2, "marked upstream packets: {listing}");

    stop.send(()).unwrap();
    thread.join().unwrap();
    drop(topo);
    let _ = std::fs::remove_dir_all(dir);
}
