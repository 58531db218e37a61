//! The proxy against a real unbound, driven by real `dig` (and raw sockets where dig cannot
//! send what a test needs: garbage, two questions, pipelined TCP).

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{dig, free_port, AllowList, DigResult, MemDatapath, Unbound};
use dnsproxy::{DnsProxy, OriginalDst, ProxyConfig, RejectCode, Transport, Verdict};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// ep 1 (127.0.0.2) may resolve anything under test.; ep 2 (127.0.0.3) only www.test;
/// anything else is an unknown endpoint.
fn allowlist() -> Arc<AllowList> {
    AllowList::new(&[
        ("127.0.0.2", 1, &["*.test", "**.test"]),
        ("127.0.0.3", 2, &["www.test"]),
        ("127.0.0.4", 3, &["*.test"]),
        ("::1", 4, &["www.test"]),
    ])
}

fn config(upstream: SocketAddr) -> ProxyConfig {
    let mut c = ProxyConfig::new(vec!["127.0.0.1:0".parse().unwrap()], vec![upstream]);
    c.udp_sockets_per_listen = 2;
    c.upstream_udp_sockets = 2;
    c.response_max_delay = Duration::from_secs(2);
    c.forward_timeout = Duration::from_secs(3);
    c
}

async fn start(config: ProxyConfig, dp: Arc<MemDatapath>) -> (DnsProxy, SocketAddr) {
    let proxy = DnsProxy::start(config, allowlist(), dp, None)
        .await
        .unwrap();
    let addr = proxy.udp_addrs()[0];
    (proxy, addr)
}

/// `dig` off the runtime's threads.
async fn d(src: &str, server: SocketAddr, args: &[&str]) -> DigResult {
    let src = src.to_string();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        dig(&src, server, &a).expect("dig present (checked with unbound)")
    })
    .await
    .unwrap()
}

fn status(r: &DigResult) -> &str {
    r.status.as_deref().unwrap_or("NO REPLY")
}

macro_rules! unbound_or_skip {
    () => {
        match Unbound::start() {
            Some(u) => {
                if common::require("dig", "bind9-dnsutils").is_none() {
                    return;
                }
                u
            }
            None => return,
        }
    };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_and_deny_with_refused_over_udp_and_tcp() {
    let ub = unbound_or_skip!();
    let dp = MemDatapath::new(Duration::ZERO);
    let (proxy, addr) = start(config(ub.addr), dp.clone()).await;

    let ok = d("127.0.0.3", addr, &["www.test", "A"]).await;
    assert_eq!(status(&ok), "NOERROR", "{}", ok.raw);
    assert_eq!(ok.answers, ["www.test. 60 IN A 192.0.2.10"]);

    // Case and trailing dot do not matter to the policy; the question keeps its case.
    let mixed = d("127.0.0.3", addr, &["WwW.TeSt.", "A"]).await;
    assert_eq!(status(&mixed), "NOERROR", "{}", mixed.raw);
    assert_eq!(mixed.question, ["WwW.TeSt. IN A"]);

    for transport in ["+notcp", "+tcp"] {
        let denied = d("127.0.0.3", addr, &["other.test", "A", transport]).await;
        assert_eq!(status(&denied), "REFUSED", "{}", denied.raw);
        assert!(denied.answers.is_empty());
        assert_eq!(denied.question, ["other.test. IN A"]);
        assert!(
            denied.flags.contains(&"rd".to_string()) && denied.flags.contains(&"ra".to_string())
        );
        // dig sends EDNS: the proxy's own answer carries OPT back.
        assert!(denied.edns.is_some(), "{}", denied.raw);
    }

    let unknown = d("127.0.0.9", addr, &["www.test", "A"]).await;
    assert_eq!(status(&unknown), "REFUSED");

    let tcp = d("127.0.0.3", addr, &["www.test", "AAAA", "+tcp"]).await;
    assert_eq!(tcp.answers, ["www.test. 30 IN AAAA 2001:db8::10"]);

    let m = proxy.metrics();
    assert_eq!(m.query_count(Verdict::Denied, "REFUSED"), 2);
    assert_eq!(m.query_count(Verdict::UnknownEndpoint, "REFUSED"), 1);
    assert_eq!(m.query_count(Verdict::Allowed, "NOERROR"), 3);
    let events = dp.events();
    assert_eq!(events.len(), 6);
    assert!(events
        .iter()
        .any(|e| e.transport == Transport::Tcp && e.rcode == Some(5)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_with_nxdomain_when_configured() {
    let ub = unbound_or_skip!();
    let mut c = config(ub.addr);
    c.reject_code = RejectCode::NameError;
    let (proxy, addr) = start(c, MemDatapath::new(Duration::ZERO)).await;
    for transport in ["+notcp", "+tcp"] {
        let r = d("127.0.0.3", addr, &["alias.test", "A", transport]).await;
        assert_eq!(status(&r), "NXDOMAIN", "{}", r.raw);
        assert!(r.answers.is_empty());
        assert_eq!(r.question, ["alias.test. IN A"]);
    }
    assert_eq!(proxy.metrics().query_count(Verdict::Denied, "NXDOMAIN"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learns_cname_chains_aaaa_svcb_hints_and_min_ttl() {
    let ub = unbound_or_skip!();
    let dp = MemDatapath::new(Duration::ZERO);
    let (_proxy, addr) = start(config(ub.addr), dp.clone()).await;

    let r = d("127.0.0.2", addr, &["alias.test", "A"]).await;
    assert_eq!(r.answers.len(), 3, "{}", r.raw);
    let r = d("127.0.0.2", addr, &["alias.test", "AAAA", "+tcp"]).await;
    assert_eq!(r.answers.len(), 3, "{}", r.raw);
    d("127.0.0.2", addr, &["svc.test", "HTTPS"]).await;
    d("127.0.0.2", addr, &["www.test", "AAAA"]).await;
    let nx = d("127.0.0.2", addr, &["nothere.test", "A"]).await;
    assert_eq!(status(&nx), "NXDOMAIN");

    let learned = dp.learned();
    let names = |i: usize| -> Vec<String> {
        let (ctx, answer) = &learned[i];
        std::iter::once(&ctx.qname)
            .chain(&answer.chain)
            .map(|n| n.to_string())
            .collect()
    };
    let ips =
        |i: usize| -> Vec<String> { learned[i].1.ips.iter().map(|n| n.to_string()).collect() };
    assert_eq!(learned.len(), 4, "NXDOMAIN teaches nothing: {learned:#?}");
    assert_eq!(names(0), ["alias.test.", "mid.test.", "target.test."]);
    assert_eq!(ips(0), ["192.0.2.20"]);
    assert_eq!(learned[0].1.ttl, 20, "smallest TTL of the chain");
    assert_eq!(learned[0].0.endpoint_id, 1);
    assert_eq!(learned[0].0.qtype, 1);
    assert_eq!(ips(1), ["2001:db8::20"]);
    assert_eq!(learned[1].0.transport, Transport::Tcp);
    assert_eq!(ips(2), ["192.0.2.30", "2001:db8::30"]);
    assert_eq!(learned[2].1.ttl, 45);
    assert_eq!(ips(3), ["2001:db8::10"]);
    assert_eq!(learned[3].1.ttl, 30);
    assert!(dp.enforceable(1, "192.0.2.20") && dp.enforceable(1, "192.0.2.30"));

    // minTTL raises short TTLs.
    let mut c = config(ub.addr);
    c.min_ttl = 60;
    let dp2 = MemDatapath::new(Duration::ZERO);
    let (_p2, addr2) = start(c, dp2.clone()).await;
    let r = d("127.0.0.2", addr2, &["short.test", "A"]).await;
    assert_eq!(
        r.answers,
        ["short.test. 2 IN A 192.0.2.40"],
        "the client sees the real TTL"
    );
    assert_eq!(dp2.learned()[0].1.ttl, 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edns_and_tc_pass_through() {
    let ub = unbound_or_skip!();
    let (_proxy, addr) = start(config(ub.addr), MemDatapath::new(Duration::ZERO)).await;
    let r = d(
        "127.0.0.2",
        addr,
        &["www.test", "A", "+dnssec", "+bufsize=1400"],
    )
    .await;
    let edns = r.edns.clone().expect("OPT in the answer");
    assert!(edns.contains("flags: do"), "{edns}");
    let r = d(
        "127.0.0.2",
        addr,
        &["big.test", "A", "+bufsize=512", "+ignore"],
    )
    .await;
    assert!(r.flags.contains(&"tc".to_string()), "{}", r.raw);
    let r = d("127.0.0.2", addr, &["big.test", "A", "+tcp"]).await;
    assert_eq!(r.answers.len(), 60);
    assert!(!r.flags.contains(&"tc".to_string()));
}

fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = Vec::new();
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&[0, 1]);
    q
}

async fn udp_exchange(
    sock: &UdpSocket,
    addr: SocketAddr,
    msg: &[u8],
    wait: Duration,
) -> Option<Vec<u8>> {
    sock.send_to(msg, addr).await.unwrap();
    let mut buf = vec![0u8; 4096];
    match tokio::time::timeout(wait, sock.recv_from(&mut buf)).await {
        Ok(Ok((n, _))) => Some(buf[..n].to_vec()),
        _ => None,
    }
}

fn rcode(msg: &[u8]) -> u8 {
    msg[3] & 0x0f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_packets_are_answered_or_dropped_and_serving_goes_on() {
    let ub = unbound_or_skip!();
    let (proxy, addr) = start(config(ub.addr), MemDatapath::new(Duration::ZERO)).await;
    let sock = UdpSocket::bind("127.0.0.2:0").await.unwrap();
    let short = Duration::from_millis(300);

    // Garbage shorter than a header, and a response instead of a query: dropped.
    assert!(udp_exchange(&sock, addr, b"\xde\xad\xbe", short)
        .await
        .is_none());
    let mut resp = query(7, "www.test", 1);
    resp[2] |= 0x80;
    assert!(udp_exchange(&sock, addr, &resp, short).await.is_none());

    // Two questions: FORMERR with the ID, no question.
    let mut two = query(0x1111, "www.test", 1);
    two[5] = 2;
    two.extend_from_slice(&query(0, "alias.test", 1)[12..]);
    let a = udp_exchange(&sock, addr, &two, short)
        .await
        .expect("FORMERR");
    assert_eq!((rcode(&a), &a[0..2], a[5]), (1, &[0x11u8, 0x11][..], 0));

    // Truncated in the middle of the question: FORMERR.
    let q = query(0x2222, "www.test", 1);
    let a = udp_exchange(&sock, addr, &q[..q.len() - 3], short)
        .await
        .expect("FORMERR");
    assert_eq!((rcode(&a), &a[0..2]), (1, &[0x22u8, 0x22][..]));

    // A claimed additional record that is not there: FORMERR with the question echoed.
    let mut q = query(0x2323, "www.test", 1);
    q[11] = 1;
    let a = udp_exchange(&sock, addr, &q, short).await.expect("FORMERR");
    assert_eq!((rcode(&a), a[5]), (1, 1));

    // Opcode NOTIFY: NOTIMP, question echoed.
    let mut notify = query(0x3333, "www.test", 6);
    notify[2] = 4 << 3;
    let a = udp_exchange(&sock, addr, &notify, short)
        .await
        .expect("NOTIMP");
    assert_eq!((rcode(&a), a[2] >> 3 & 0x0f, a[5]), (4, 4, 1));

    // Garbage over TCP: a frame too short to be a query is dropped, the connection serves on.
    let sock4 = tokio::net::TcpSocket::new_v4().unwrap();
    sock4.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut tcp = sock4.connect(addr).await.unwrap();
    let good = query(0x4444, "www.test", 1);
    let mut frames = vec![0u8, 3, 1, 2, 3];
    frames.extend_from_slice(&(good.len() as u16).to_be_bytes());
    frames.extend_from_slice(&good);
    tcp.write_all(&frames).await.unwrap();
    let len = tcp.read_u16().await.unwrap();
    let mut a = vec![0u8; len as usize];
    tcp.read_exact(&mut a).await.unwrap();
    assert_eq!((&a[0..2], rcode(&a)), (&[0x44u8, 0x44][..], 0));

    // Still serving, and the client's ID comes back although the upstream saw another.
    let a = udp_exchange(
        &sock,
        addr,
        &query(0xbeef, "www.test", 1),
        Duration::from_secs(2),
    )
    .await
    .expect("answer");
    assert_eq!((&a[0..2], rcode(&a)), (&[0xbe, 0xef][..], 0));
    let r = d("127.0.0.2", addr, &["www.test", "A"]).await;
    assert_eq!(status(&r), "NOERROR");

    let m = proxy.metrics();
    assert_eq!(m.malformed_dropped.load(Relaxed), 3);
    assert_eq!(m.query_count(Verdict::Invalid, "FORMERR"), 3);
    assert_eq!(m.query_count(Verdict::Invalid, "NOTIMP"), 1);
}

async fn read_frame(tcp: &mut TcpStream) -> Vec<u8> {
    let len = tcp.read_u16().await.unwrap();
    let mut a = vec![0u8; len as usize];
    tcp.read_exact(&mut a).await.unwrap();
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_pipelined_answers_out_of_order_idle_timeout_and_limit() {
    let ub = unbound_or_skip!();
    // Learning www.test A takes 400 ms in the datapath; nothere.test (NXDOMAIN) and www.test
    // MX (no data) teach nothing and are answered at once.
    let mut c = config(ub.addr);
    c.tcp_idle_timeout = Duration::from_millis(300);
    c.tcp_max_connections = 2;
    let (proxy, addr) = start(c, MemDatapath::new(Duration::from_millis(400))).await;
    let mut frames = Vec::new();
    for q in [
        query(1, "www.test", 1),
        query(2, "nothere.test", 1),
        query(3, "www.test", 15),
    ] {
        frames.extend_from_slice(&(q.len() as u16).to_be_bytes());
        frames.extend_from_slice(&q);
    }
    // All three in one write, from ep 1's address.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut tcp = sock.connect(addr).await.unwrap();
    tcp.write_all(&frames).await.unwrap();
    let mut order = Vec::new();
    for _ in 0..3 {
        let a = read_frame(&mut tcp).await;
        order.push(u16::from_be_bytes([a[0], a[1]]));
    }
    assert_eq!(
        order.last(),
        Some(&1),
        "the held answer comes last: {order:?}"
    );
    assert!(order.contains(&2) && order.contains(&3));

    // Idle: closed after the timeout.
    let started = Instant::now();
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(3), tcp.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 0);
    assert!(started.elapsed() >= Duration::from_millis(250));

    // Limit: two open connections, the third is closed at once.
    let _a = TcpStream::connect(addr).await.unwrap();
    let _b = TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut c3 = TcpStream::connect(addr).await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(2), c3.read(&mut buf)).await;
    assert!(
        matches!(n, Ok(Ok(0)) | Ok(Err(_))),
        "third connection closed: {n:?}"
    );
    assert_eq!(proxy.metrics().tcp_rejected.load(Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_is_servfail() {
    let ub = unbound_or_skip!();
    drop(ub); // nothing listens there any more: ICMP port unreachable, TCP refused
    let dead = SocketAddr::new(
        "127.0.0.1".parse().unwrap(),
        free_port("127.0.0.1".parse().unwrap()),
    );
    let (proxy, addr) = start(config(dead), MemDatapath::new(Duration::ZERO)).await;
    for transport in ["+notcp", "+tcp"] {
        let r = d("127.0.0.2", addr, &["www.test", "A", transport]).await;
        assert_eq!(status(&r), "SERVFAIL", "{}", r.raw);
        // Well before the 3 s forward timeout: the refusal is reported, not waited out.
        assert!(
            r.elapsed < Duration::from_secs(2),
            "refusal is fast: {:?}",
            r.elapsed
        );
    }
    assert_eq!(proxy.metrics().upstream_failures.load(Relaxed), 2);
    assert_eq!(proxy.metrics().query_count(Verdict::Allowed, "SERVFAIL"), 2);
}

/// A UDP "server" that reads queries and never answers.
async fn blackhole() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = s.local_addr().unwrap();
    let t = tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        loop {
            let _ = s.recv_from(&mut buf).await;
        }
    });
    (addr, t)
}

/// A UDP relay to `to` that delays every query by `delay`.
async fn slow_relay(to: SocketAddr, delay: Duration) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let addr = front.local_addr().unwrap();
    let t = tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        loop {
            let Ok((n, from)) = front.recv_from(&mut buf).await else {
                continue;
            };
            let q = buf[..n].to_vec();
            let front = front.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let back = UdpSocket::bind("127.0.0.1:0").await.unwrap();
                back.send_to(&q, to).await.unwrap();
                let mut a = [0u8; 4096];
                if let Ok(Ok((n, _))) =
                    tokio::time::timeout(Duration::from_secs(2), back.recv_from(&mut a)).await
                {
                    let _ = front.send_to(&a[..n], from).await;
                }
            });
        }
    });
    (addr, t)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_timeout_means_no_reply_and_slow_upstream_is_waited_for() {
    let ub = unbound_or_skip!();
    let (hole, hole_task) = blackhole().await;
    let mut c = config(hole);
    c.forward_timeout = Duration::from_millis(500);
    let (proxy, addr) = start(c, MemDatapath::new(Duration::ZERO)).await;
    let r = d("127.0.0.2", addr, &["www.test", "A"]).await;
    assert_eq!(r.status, None, "no reply on upstream timeout: {}", r.raw);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(proxy.metrics().upstream_timeouts.load(Relaxed), 1);
    assert_eq!(proxy.metrics().query_count(Verdict::Allowed, "NOREPLY"), 1);
    hole_task.abort();

    let (relay, relay_task) = slow_relay(ub.addr, Duration::from_millis(300)).await;
    let (proxy, addr) = start(config(relay), MemDatapath::new(Duration::ZERO)).await;
    let r = d("127.0.0.2", addr, &["www.test", "A"]).await;
    assert_eq!(status(&r), "NOERROR", "{}", r.raw);
    assert!(r.elapsed >= Duration::from_millis(300));
    let lat = proxy.metrics().upstream_latency.snapshot();
    assert_eq!(lat.count, 1);
    assert!(lat.sum_seconds >= 0.3, "{lat:?}");
    relay_task.abort();
}

/// An upstream that first sends two answers that must be ignored (another question with the
/// right ID, the right question with another ID), then relays the real answer from `to`.
async fn lying_relay(to: SocketAddr) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let addr = front.local_addr().unwrap();
    let t = tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        loop {
            let Ok((n, from)) = front.recv_from(&mut buf).await else {
                continue;
            };
            let q = buf[..n].to_vec();
            let id = u16::from_be_bytes([q[0], q[1]]);
            let mut wrong_question = query(id, "other.test", 1);
            wrong_question[2] |= 0x80;
            let mut wrong_id = q.clone();
            wrong_id[0] ^= 0xff;
            wrong_id[2] |= 0x80;
            front.send_to(&wrong_question, from).await.unwrap();
            front.send_to(&wrong_id, from).await.unwrap();
            let back = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            back.send_to(&q, to).await.unwrap();
            let mut a = [0u8; 4096];
            if let Ok(Ok((n, _))) =
                tokio::time::timeout(Duration::from_secs(2), back.recv_from(&mut a)).await
            {
                let _ = front.send_to(&a[..n], from).await;
            }
        }
    });
    (addr, t)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_for_other_questions_or_ids_are_ignored() {
    let ub = unbound_or_skip!();
    let (relay, relay_task) = lying_relay(ub.addr).await;
    let (proxy, addr) = start(config(relay), MemDatapath::new(Duration::ZERO)).await;
    let r = d("127.0.0.2", addr, &["www.test", "A"]).await;
    assert_eq!(status(&r), "NOERROR", "{}", r.raw);
    assert_eq!(r.answers, ["www.test. 60 IN A 192.0.2.10"]);
    assert_eq!(proxy.metrics().upstream_mismatches.load(Relaxed), 2);
    relay_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_is_held_until_enforceable_for_every_request_of_a_name() {
    let ub = unbound_or_skip!();
    let dp = MemDatapath::new(Duration::from_millis(400));
    let (proxy, addr) = start(config(ub.addr), dp.clone()).await;
    let started = Instant::now();
    let first = tokio::spawn(d("127.0.0.2", addr, &["target.test", "A"]));
    tokio::time::sleep(Duration::from_millis(150)).await;
    // A second request for the same name while the first one's update is in flight: it must
    // not be released before that update lands.
    let dp2 = dp.clone();
    let second = tokio::spawn(async move {
        let r = d("127.0.0.2", addr, &["target.test", "A"]).await;
        (r, dp2.enforceable(1, "192.0.2.20"), Instant::now())
    });
    let first = first.await.unwrap();
    let (second, enforceable_at_release, second_done) = second.await.unwrap();
    assert_eq!(status(&first), "NOERROR");
    assert_eq!(status(&second), "NOERROR");
    assert!(
        first.elapsed >= Duration::from_millis(400),
        "{:?}",
        first.elapsed
    );
    assert!(second_done - started >= Duration::from_millis(400));
    assert!(enforceable_at_release);
    assert_eq!(dp.updates(), 1, "one datapath update for both requests");
    // Known and applied now: released at once.
    let third = d("127.0.0.2", addr, &["target.test", "A"]).await;
    assert_eq!(status(&third), "NOERROR");
    let held = dp.events().last().expect("observed").hold;
    assert!(held < Duration::from_millis(100), "{held:?}");
    assert_eq!(dp.updates(), 1);
    let hold = proxy.metrics().hold_time.snapshot();
    assert_eq!(hold.count, 3);
    assert_eq!(proxy.metrics().hold_timeouts.load(Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_timeout_releases_counts_and_goes_on() {
    let ub = unbound_or_skip!();
    let mut c = config(ub.addr);
    c.response_max_delay = Duration::from_millis(200);
    let (proxy, addr) = start(c, MemDatapath::stalled()).await;
    let r = d("127.0.0.2", addr, &["www.test", "A"]).await;
    assert_eq!(status(&r), "NOERROR");
    assert_eq!(r.answers, ["www.test. 60 IN A 192.0.2.10"]);
    assert!(r.elapsed >= Duration::from_millis(200));
    assert_eq!(proxy.metrics().hold_timeouts.load(Relaxed), 1);
    let hold = proxy.metrics().hold_time.snapshot();
    assert!(hold.sum_seconds >= 0.2);
}

/// The datapath told us where 127.0.0.4's queries were really going.
struct ToUnbound(SocketAddr);
impl OriginalDst for ToUnbound {
    fn original_dst(
        &self,
        client: SocketAddr,
        _on: SocketAddr,
        _t: Transport,
    ) -> Option<SocketAddr> {
        (client.ip().to_string() == "127.0.0.4").then_some(self.0)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transparent_sockets_and_original_destination_hook() {
    let ub = unbound_or_skip!();
    // IP_TRANSPARENT needs CAP_NET_ADMIN.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("transparent test needs root in CI");
        }
        eprintln!("\n\n*** SKIPPED: transparent sockets need root ***\n\n");
        return;
    }
    let (hole, hole_task) = blackhole().await;
    let mut c = config(hole);
    c.transparent = true;
    c.forward_timeout = Duration::from_millis(400);
    // Marked upstream sockets (SO_MARK needs CAP_NET_ADMIN too): queries still flow.
    c.upstream_mark = Some(0x4657);
    let proxy = DnsProxy::start(
        c,
        allowlist(),
        MemDatapath::new(Duration::ZERO),
        Some(Arc::new(ToUnbound(ub.addr))),
    )
    .await
    .unwrap();
    let addr = proxy.udp_addrs()[0];
    for transport in ["+notcp", "+tcp"] {
        let r = d("127.0.0.4", addr, &["www.test", "A", transport]).await;
        assert_eq!(status(&r), "NOERROR", "{}", r.raw);
    }
    // Sent to the proxy itself with no original destination: the configured upstream (here
    // silent).
    let r = d("127.0.0.2", addr, &["www.test", "A"]).await;
    assert_eq!(r.status, None);
    hole_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_listen_address_serves_ipv4_and_ipv6() {
    let ub = unbound_or_skip!();
    let mut c = config(ub.addr);
    c.listen = vec!["127.0.0.1:0".parse().unwrap(), "[::1]:0".parse().unwrap()];
    let (proxy, v4) = start(c, MemDatapath::new(Duration::ZERO)).await;
    let v6 = proxy.udp_addrs()[1];
    assert!(v6.is_ipv6() && proxy.tcp_addrs()[1] == v6);
    for transport in ["+notcp", "+tcp"] {
        let r = d("::1", v6, &["www.test", "AAAA", transport]).await;
        assert_eq!(
            r.answers,
            ["www.test. 30 IN AAAA 2001:db8::10"],
            "{}",
            r.raw
        );
        let r = d("::1", v6, &["alias.test", "A", transport]).await;
        assert_eq!(status(&r), "REFUSED", "{}", r.raw);
    }
    let r = d("127.0.0.3", v4, &["www.test", "A"]).await;
    assert_eq!(status(&r), "NOERROR");
}
