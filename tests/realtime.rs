//! `dns.realtimePriority` end to end: `fqdnwall run` with a real unbound upstream runs the DNS
//! proxy's UDP receiving threads (and only them) at SCHED_FIFO priority by default, as the
//! kernel reports in /proc; a flood of queries sends all of them back to normal priority (the
//! CPU and rate budget) while it lasts and they return after it; `off` leaves every thread at
//! normal priority. The metrics say so. Root: realtime priority needs CAP_SYS_NICE.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::*;

/// Every thread of `pid`: (name, scheduling policy, realtime priority), from /proc.
fn threads(pid: u32) -> Vec<(String, u32, u32)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = t.unwrap().path();
        let Ok(stat) = std::fs::read_to_string(dir.join("stat")) else {
            continue;
        };
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        // Fields after the parenthesised name: state is field 3, rt_priority 40, policy 41.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split(' ').collect();
        out.push((
            comm.trim().to_string(),
            f[41 - 3].parse().unwrap(),
            f[40 - 3].parse().unwrap(),
        ));
    }
    out.sort();
    out
}

fn is_receiving_thread(name: &str) -> bool {
    name.starts_with("dns-in-") || name.starts_with("dns-up-")
}

const SCHED_OTHER: u32 = 0;
const SCHED_FIFO: u32 = 1;

/// Answers to `n` queries sent one at a time, each tried up to three times (the proxy
/// serves; an answer may be lost while the upstream works off a flood).
fn answered(dns: SocketAddr, n: u16) -> u16 {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 1500];
    let mut got = 0;
    for id in 0..n {
        'tries: for _ in 0..3 {
            s.send_to(&www_example_test_query(id), dns).unwrap();
            // Answers to earlier tries may come late: skip them.
            while let Ok(len) = s.recv(&mut buf) {
                if len > 12 && buf[..2] == id.to_be_bytes() {
                    got += 1;
                    break 'tries;
                }
            }
        }
    }
    got
}

/// Sends queries to `dns` as fast as one thread can for `dur`, from several sockets (so
/// every shard gets some), reading and dropping the answers.
fn flood(dns: SocketAddr, dur: Duration) {
    let sockets: Vec<UdpSocket> = (0..8)
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            s.connect(dns).unwrap();
            s.set_nonblocking(true).unwrap();
            s
        })
        .collect();
    let start = Instant::now();
    let mut buf = [0u8; 1500];
    let mut id = 0u16;
    while start.elapsed() < dur {
        for s in &sockets {
            for _ in 0..16 {
                let _ = s.send(&www_example_test_query(id));
                id = id.wrapping_add(1);
            }
            while s.recv(&mut buf).is_ok() {}
        }
    }
}

fn start(dir: &std::path::Path, upstream: SocketAddr, extra: &str) -> Agent {
    write(
        dir,
        "config.yaml",
        &format!(
            "policyDir: policies\nstateDir: state\ndatapath: none\ndns:\n  listen: [\"127.0.0.1:0\"]\n  upstreams: [\"{upstream}\"]\n{extra}metrics:\n  listen: 127.0.0.1:0\n"
        ),
    );
    let cfg = dir.join("config.yaml").display().to_string();
    Agent::start(&["--config", &cfg], &dir.join("api.sock"))
}

fn needs_root() -> bool {
    if is_root() {
        return true;
    }
    assert_ne!(
        std::env::var("CI").as_deref(),
        Ok("true"),
        "the realtime priority tests run as root in CI"
    );
    eprintln!("*** SKIPPED: realtime priority needs root");
    false
}

#[test]
fn the_receiving_threads_run_at_realtime_priority_until_a_flood() {
    if !needs_root() {
        return;
    }
    let Some(ub) = Unbound::start() else { return };
    let d = tempdir();
    // The default configuration: no realtimePriority key.
    let agent = start(d.path(), ub.addr, "");
    assert!(agent.metrics.is_some(), "metrics address in the banner");
    let pid = agent.pid();

    let all = threads(pid);
    let receiving: Vec<_> = all.iter().filter(|t| is_receiving_thread(&t.0)).collect();
    assert!(
        receiving.iter().any(|t| t.0.starts_with("dns-in-"))
            && receiving.iter().any(|t| t.0.starts_with("dns-up-")),
        "listener and upstream threads: {all:?}"
    );
    for (name, policy, prio) in &all {
        if is_receiving_thread(name) {
            assert_eq!((*policy, *prio), (SCHED_FIFO, 1), "{name} at realtime 1");
        } else {
            assert_eq!(*policy, SCHED_OTHER, "{name} at normal priority");
        }
    }
    assert_eq!(
        agent.metric("fqdnwall_dns_realtime_threads"),
        Some(receiving.len() as f64)
    );
    assert_eq!(answered(agent.dns, 20), 20, "the proxy answers");

    // A flood: the threads go to normal priority while it lasts (counted).
    let dns = agent.dns;
    let flooder = std::thread::spawn(move || flood(dns, Duration::from_secs(5)));
    eventually(
        Duration::from_secs(4),
        "the receiving threads leave realtime priority under a flood",
        || {
            threads(pid)
                .iter()
                .filter(|t| is_receiving_thread(&t.0))
                .all(|t| t.1 == SCHED_OTHER)
                .then_some(())
        },
    );
    assert!(
        agent
            .metric("fqdnwall_dns_realtime_demotions_total")
            .unwrap()
            >= 1.0,
        "the demotion is counted"
    );
    assert_eq!(agent.metric("fqdnwall_dns_realtime_threads"), Some(0.0));
    flooder.join().unwrap();

    // After it, with queries at an ordinary rate (the threads decide when they wake), they
    // return, and the proxy still serves.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        answered(agent.dns, 1);
        let now = threads(pid);
        if now
            .iter()
            .filter(|t| is_receiving_thread(&t.0))
            .all(|t| t.1 == SCHED_FIFO)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the receiving threads did not return to realtime priority: {now:?}, {:?} demotions",
            agent.metric("fqdnwall_dns_realtime_demotions_total")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        answered(agent.dns, 20),
        20,
        "the proxy answers after the flood"
    );
    eventually(
        Duration::from_secs(2),
        "the gauge counts them again",
        || {
            (agent.metric("fqdnwall_dns_realtime_threads") == Some(receiving.len() as f64))
                .then_some(())
        },
    );
    drop(agent);
}

#[test]
fn off_leaves_every_thread_at_normal_priority() {
    if !needs_root() {
        return;
    }
    let Some(ub) = Unbound::start() else { return };
    let d = tempdir();
    let agent = start(d.path(), ub.addr, "  realtimePriority: off\n");
    assert!(agent.metrics.is_some(), "metrics address in the banner");
    assert_eq!(answered(agent.dns, 5), 5, "the proxy answers");
    let all = threads(agent.pid());
    assert!(all.iter().any(|t| is_receiving_thread(&t.0)), "{all:?}");
    for (name, policy, _) in &all {
        assert_eq!(*policy, SCHED_OTHER, "{name} at normal priority");
    }
    assert_eq!(agent.metric("fqdnwall_dns_realtime_threads"), Some(0.0));
    drop(agent);
}
