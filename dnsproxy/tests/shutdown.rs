//! Stopping the proxy: every UDP thread ends and every socket closes. A test binary of its
//! own, so the threads it counts are this proxy's only.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::{AllowList, MemDatapath};
use dnsproxy::{DnsProxy, ProxyConfig};

/// Threads of this process whose name starts with `prefix`.
fn threads(prefix: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with(prefix))
        .count()
}

/// A query for `name` (type A, RD) with `id`.
fn query(id: u16, name: &str) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.').filter(|l| !l.is_empty()) {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

fn recv(s: &UdpSocket) -> Vec<u8> {
    let mut buf = [0u8; 512];
    let (n, _) = s.recv_from(&mut buf).expect("a datagram in time");
    buf[..n].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_ends_every_udp_thread_and_closes_every_socket() {
    // The upstream is this test: it answers the one forwarded query itself.
    let upstream = UdpSocket::bind("127.0.0.1:0").unwrap();
    upstream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut config = ProxyConfig::new(
        vec!["127.0.0.1:0".parse().unwrap()],
        vec![upstream.local_addr().unwrap()],
    );
    config.udp_sockets_per_listen = 2;
    config.upstream_udp_sockets = 2;
    let policy = AllowList::new(&[("127.0.0.1", 1, &["allowed.test"])]);
    let proxy = DnsProxy::start(config, policy, MemDatapath::new(Duration::ZERO), None)
        .await
        .unwrap();
    let addr: SocketAddr = proxy.udp_addrs()[0];
    // A thread names itself once it runs, which may be just after the proxy started.
    let deadline = Instant::now() + Duration::from_secs(5);
    let all_named =
        || threads("dns-in-") == 2 && threads("dns-udp-") == 2 && threads("dns-up-") >= 4;
    while !all_named() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(threads("dns-in-"), 2, "a listener thread per shard");
    // Per shard: one socket connected to the upstream, IPv4 and IPv6 for other servers.
    assert!(
        threads("dns-up-") >= 4,
        "receive threads of the upstream sockets"
    );
    assert_eq!(threads("dns-udp-"), 2, "a runtime thread per shard");

    // Both kinds of thread work: the proxy's own answer (a refusal) and a forwarded one.
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    client.send_to(&query(7, "denied.test"), addr).unwrap();
    let refused = recv(&client);
    assert_eq!((refused[0], refused[1], refused[3] & 0x0f), (0, 7, 5));
    client.send_to(&query(8, "allowed.test"), addr).unwrap();
    let mut buf = [0u8; 512];
    let (n, from) = upstream.recv_from(&mut buf).unwrap();
    let mut answer = buf[..n].to_vec();
    answer[2] |= 0x80; // QR: a response, no records (NOERROR, nothing to learn)
    upstream.send_to(&answer, from).unwrap();
    let answered = recv(&client);
    assert_eq!((answered[0], answered[1], answered[3] & 0x0f), (0, 8, 0));

    drop(proxy);
    let deadline = Instant::now() + Duration::from_secs(5);
    while threads("dns-") > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(threads("dns-"), 0, "every UDP thread of the proxy ended");
    // Without SO_REUSEPORT this bind fails while any socket of the listener group is open.
    UdpSocket::bind(addr).expect("the listen address is free again");
}
