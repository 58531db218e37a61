//! `dns.cpuWakeLatency` end to end: `fqdnwall run` with a real unbound upstream holds the
//! kernel's CPU wake-up latency bound (`/dev/cpu_dma_latency`, which reads back the bound in
//! force) while queries arrive at 1,000/s or more, and withdraws it after a quiet second; the
//! metrics say so. Root: the PM QoS file is root's.

mod common;

use std::io::Read;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::*;

/// The wake-up latency bound in force on the machine (µs), as the kernel reports it.
fn bound_in_force() -> i32 {
    let mut f = std::fs::File::open("/dev/cpu_dma_latency").expect("open /dev/cpu_dma_latency");
    let mut b = [0u8; 4];
    f.read_exact(&mut b).expect("read /dev/cpu_dma_latency");
    i32::from_ne_bytes(b)
}

/// Sends `qps` queries a second to `dns` for `dur`, reading answers as they come; returns
/// the answers read.
fn load(dns: SocketAddr, qps: u32, dur: Duration) -> u32 {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.connect(dns).unwrap();
    s.set_nonblocking(true).unwrap();
    let start = Instant::now();
    let (mut sent, mut answered) = (0u32, 0u32);
    let mut buf = [0u8; 1500];
    while start.elapsed() < dur {
        let due = (start.elapsed().as_secs_f64() * f64::from(qps)) as u32;
        while sent < due {
            let _ = s.send(&www_example_test_query(sent as u16));
            sent += 1;
        }
        while s.recv(&mut buf).is_ok() {
            answered += 1;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    answered
}

#[test]
fn the_wake_latency_bound_is_held_only_while_the_proxy_is_busy() {
    if !is_root() {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "the wake-up latency test runs as root in CI"
        );
        eprintln!("*** SKIPPED: /dev/cpu_dma_latency needs root");
        return;
    }
    let Some(ub) = Unbound::start() else { return };
    let before = bound_in_force();
    assert!(
        before > 0,
        "another process holds a wake-up latency bound of {before} µs; this test needs none held"
    );
    let d = tempdir();
    write(
        d.path(),
        "config.yaml",
        &format!(
            "policyDir: policies\nstateDir: state\ndatapath: none\ndns:\n  listen: [\"127.0.0.1:0\"]\n  upstreams: [\"{}\"]\n  cpuWakeLatency: 0us\nmetrics:\n  listen: 127.0.0.1:0\n",
            ub.addr
        ),
    );
    let cfg = d.path().join("config.yaml").display().to_string();
    let agent = Agent::start(&["--config", &cfg], &d.path().join("api.sock"));
    assert!(agent.metrics.is_some(), "metrics address in the banner");

    // A trickle (well under 1,000 queries a second) takes no bound.
    let answered = load(agent.dns, 200, Duration::from_millis(1500));
    assert!(answered > 100, "the proxy answers ({answered} answers)");
    assert_eq!(bound_in_force(), before, "no bound under a trickle");
    assert_eq!(agent.metric("fqdnwall_dns_cpu_wake_bound_held"), Some(0.0));

    // Under load the bound is held; the kernel reports it as the one in force.
    let dns = agent.dns;
    let loader = std::thread::spawn(move || load(dns, 3000, Duration::from_secs(4)));
    eventually(
        Duration::from_secs(3),
        "the bound is held under load",
        || (bound_in_force() == 0).then_some(()),
    );
    assert_eq!(agent.metric("fqdnwall_dns_cpu_wake_bound_held"), Some(1.0));
    let answered = loader.join().unwrap();
    assert!(
        answered > 6000,
        "the proxy kept answering ({answered} answers)"
    );

    // A quiet second later it is withdrawn.
    eventually(Duration::from_secs(4), "the bound is withdrawn", || {
        (bound_in_force() == before).then_some(())
    });
    assert_eq!(agent.metric("fqdnwall_dns_cpu_wake_bound_held"), Some(0.0));
    assert_eq!(
        agent.metric("fqdnwall_dns_cpu_wake_bound_engagements_total"),
        Some(1.0)
    );
    drop(agent);
}
