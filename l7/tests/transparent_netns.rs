//! Transparent mode end to end in network namespaces: the client's connection to a "world"
//! server is steered to the proxy's IP_TRANSPARENT listener (here by nftables TPROXY, the
//! same socket assignment the eBPF datapath makes with bpf_sk_assign), the proxy learns the
//! original destination from the socket, judges the request, and connects onwards with a
//! mark that the steering rule skips. Root only.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use l7::{
    EventSink, HttpPolicy, HttpProxy, HttpProxyConfig, L7EventKind, L7Verdict, ProxyMode,
    SecretDir, SwappablePolicy,
};
use policy::model::HttpRule;

use common::*;

const MARK: u32 = 0x2;
const PROXY_PORT: u16 = 15080;

struct Netns(Vec<String>);

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `f` on a new thread inside network namespace `ns`.
fn in_netns<F>(ns: &str, f: F) -> std::thread::JoinHandle<()>
where
    F: FnOnce() + Send + 'static,
{
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let fd = std::fs::File::open(&path).unwrap();
        // SAFETY: setns on a valid namespace fd affects only this thread.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&fd), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f();
    })
}

#[test]
fn steered_connection_reaches_proxy_and_goes_on_to_original_destination() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !require(root, "root (network namespaces)")
        || !require(have_command("nft", "--version"), "nft")
        || !require(have_command("curl", "--version"), "curl")
    {
        return;
    }
    let id = std::process::id();
    let (a, b) = (format!("l7ta{id}"), format!("l7tb{id}"));
    let (va, vb) = (format!("l7a{id}"), format!("l7b{id}"));
    let _guard = Netns(vec![a.clone(), b.clone()]);
    sh(&["ip", "netns", "add", &a]);
    sh(&["ip", "netns", "add", &b]);
    sh(&[
        "ip", "link", "add", &va, "type", "veth", "peer", "name", &vb,
    ]);
    sh(&["ip", "link", "set", &va, "netns", &a]);
    sh(&["ip", "link", "set", &vb, "netns", &b]);
    sh(&["ip", "-n", &a, "addr", "add", "10.77.0.1/24", "dev", &va]);
    sh(&["ip", "-n", &b, "addr", "add", "10.77.0.2/24", "dev", &vb]);
    for (ns, dev) in [(&a, &va), (&b, &vb)] {
        sh(&["ip", "-n", ns, "link", "set", dev, "up"]);
        sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
    }
    sh(&[
        "ip",
        "netns",
        "exec",
        &a,
        "sysctl",
        "-qw",
        "net.ipv4.conf.all.rp_filter=0",
        "net.ipv4.conf.lo.rp_filter=0",
    ]);
    sh(&[
        "ip", "-n", &a, "rule", "add", "fwmark", "0x1", "lookup", "100",
    ]);
    sh(&[
        "ip",
        "-n",
        &a,
        "route",
        "add",
        "local",
        "0.0.0.0/0",
        "dev",
        "lo",
        "table",
        "100",
    ]);
    let rules = format!(
        "table ip l7t {{
  chain out {{ type route hook output priority mangle; meta mark {MARK:#x} return; ip daddr 10.77.0.2 tcp dport 8080 meta mark set 0x1; }}
  chain pre {{ type filter hook prerouting priority mangle; ip daddr 10.77.0.2 tcp dport 8080 meta mark 0x1 tproxy to 127.0.0.1:{PROXY_PORT} accept; }}
}}"
    );
    let nft = Command::new("ip")
        .args(["netns", "exec", &a, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(rules.as_bytes())?;
            c.wait()
        })
        .unwrap();
    assert!(nft.success());

    // The world server in namespace b.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    in_netns(&b, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::bind("10.77.0.2:8080")
                .await
                .unwrap();
            ready_tx.send(()).unwrap();
            loop {
                let (s, peer) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req: Request<Incoming>| async move {
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!(
                                "world saw {} from {}\n",
                                req.uri(),
                                peer.ip()
                            )))))
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
    });
    ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();

    // The proxy in namespace a.
    let policy = Arc::new(SwappablePolicy::new());
    policy.set_http(redirect(
        HttpPolicy::compile(
            &[HttpRule {
                method: Some("GET".into()),
                path: Some("/public/.*".into()),
                ..Default::default()
            }],
            &SecretDir::new("/nonexistent"),
        )
        .unwrap(),
    ));
    let events = EventSink::new(64);
    let mut rx = events.subscribe();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (p, e) = (policy.clone(), events.clone());
    in_netns(&a, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listen: SocketAddr = format!("127.0.0.1:{PROXY_PORT}").parse().unwrap();
            let proxy = HttpProxy::bind(
                HttpProxyConfig::new(listen, ProxyMode::Transparent { mark: Some(MARK) }),
                p,
                e,
            )
            .unwrap();
            ready_tx.send(()).unwrap();
            proxy.run().await;
        });
    });
    ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();

    let curl = |path: &str| {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &a,
                "curl",
                "-sS",
                "--max-time",
                "5",
                "-w",
                "\n%{http_code}",
            ])
            .arg(format!("http://10.77.0.2:8080{path}"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "curl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    // Allowed: the world server answers, and sees the proxy's connection from namespace a.
    assert_eq!(
        curl("/public/x"),
        "world saw /public/x from 10.77.0.1\n\n200"
    );
    // Denied by the proxy: the world server is never asked.
    assert_eq!(curl("/private"), "Access denied\n403");

    let mut seen = Vec::new();
    while let Ok(ev) = rx.try_recv() {
        let L7EventKind::Http { path, .. } = &ev.kind else {
            panic!()
        };
        // The original destination, read from the steered socket.
        assert_eq!(ev.dst, "10.77.0.2:8080".parse::<SocketAddr>().unwrap());
        assert_eq!(ev.src.ip().to_string(), "10.77.0.1");
        seen.push((path.clone(), ev.verdict));
    }
    assert_eq!(
        seen,
        vec![
            ("/public/x".to_string(), L7Verdict::Allowed),
            ("/private".to_string(), L7Verdict::Denied)
        ]
    );
}
