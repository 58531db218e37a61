//! Kafka through the proxy: a real broker (tansu) and a real client (kafka-python).

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use l7::{KafkaPolicy, KafkaProxy, KafkaProxyConfig, L7EventKind, L7Verdict, ProxyMode};
use policy::model::{KafkaRole, KafkaRule};

use common::*;

struct Broker(Child);

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts tansu listening on a free port and advertising `advertised` (the proxy), so every
/// connection the client makes after bootstrap goes through the proxy too.
fn start_broker(tansu: &Path, advertised: SocketAddr) -> (Broker, SocketAddr) {
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let child = Command::new(tansu)
        .args([
            "broker",
            "--listener-url",
            &format!("tcp://{addr}"),
            "--advertised-listener-url",
            &format!("tcp://{advertised}"),
            "--storage-engine",
            "memory://tansu/",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start tansu");
    let broker = Broker(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            Instant::now() < deadline,
            "tansu did not start listening on {addr}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (broker, addr)
}

fn client(proxy: SocketAddr, args: &[&str]) -> String {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/kafka_client.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(args[0])
        .arg(proxy.to_string())
        .args(&args[1..])
        .output()
        .expect("run python3");
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success(),
        "client failed: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

fn python_has_kafka() -> bool {
    Command::new("python3")
        .args(["-c", "import kafka"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_and_consume_through_the_proxy() {
    let tansu = find_program("tansu", "FQDNWALL_TANSU");
    if !require(
        tansu
            .as_ref()
            .is_some_and(|t| have_command(t.to_str().unwrap(), "--version")),
        "tansu",
    ) || !require(python_has_kafka(), "python3 with kafka-python")
    {
        return;
    }
    let tansu = tansu.unwrap();
    let h = Harness::new();
    let mut events = h.events.subscribe();
    h.policy.set_kafka(redirect(KafkaPolicy::allow_all()));

    // The proxy needs the broker's address and the broker the proxy's: take the proxy's
    // port first, then point the proxy at the broker.
    let proxy_port = free_port();
    let proxy_addr: SocketAddr = format!("127.0.0.1:{proxy_port}").parse().unwrap();
    let (_broker, broker_addr) = start_broker(&tansu, proxy_addr);
    let cfg = KafkaProxyConfig::new(
        proxy_addr,
        ProxyMode::Fixed {
            upstream: broker_addr,
            mark: None,
        },
    );
    let proxy = KafkaProxy::bind(cfg, h.policy.clone(), h.events.clone()).unwrap();
    tokio::spawn(proxy.run());

    let policy = h.policy.clone();
    tokio::task::spawn_blocking(move || {
        assert_eq!(client(proxy_addr, &["create", "orders", "secrets"]), "OK");

        // Role produce on topic orders.
        policy.set_kafka(redirect(
            KafkaPolicy::compile(&[KafkaRule {
                role: Some(KafkaRole::Produce),
                topic: Some("orders".into()),
                ..Default::default()
            }])
            .unwrap(),
        ));
        let r = client(proxy_addr, &["produce", "orders", "m1"]);
        assert!(r.starts_with("OK "), "{r}");
        let r = client(proxy_addr, &["produce", "secrets", "leak1"]);
        assert!(r.starts_with("ERR TopicAuthorizationFailedError"), "{r}");

        // Metadata for everything, Produce only to orders: the Produce request itself is
        // what gets denied.
        policy.set_kafka(redirect(
            KafkaPolicy::compile(&[
                KafkaRule {
                    api_keys: vec![3],
                    ..Default::default()
                },
                KafkaRule {
                    api_keys: vec![18],
                    ..Default::default()
                },
                KafkaRule {
                    api_keys: vec![0],
                    topic: Some("orders".into()),
                    ..Default::default()
                },
            ])
            .unwrap(),
        ));
        let r = client(proxy_addr, &["produce", "secrets", "leak2"]);
        assert!(r.starts_with("ERR TopicAuthorizationFailedError"), "{r}");

        // Role consume: fetch passes, produce is refused.
        policy.set_kafka(redirect(
            KafkaPolicy::compile(&[KafkaRule {
                role: Some(KafkaRole::Consume),
                topic: Some("orders".into()),
                ..Default::default()
            }])
            .unwrap(),
        ));
        assert_eq!(client(proxy_addr, &["consume", "orders"]), "OK m1");
        let r = client(proxy_addr, &["produce", "orders", "m2"]);
        assert!(r.starts_with("ERR TopicAuthorizationFailedError"), "{r}");
        let r = client(proxy_addr, &["consume", "secrets"]);
        assert!(
            r.starts_with("ERR TopicAuthorizationFailedError") || r == "OK ",
            "{r}"
        );

        // With everything allowed again: the denied records never reached the broker.
        policy.set_kafka(redirect(KafkaPolicy::allow_all()));
        assert_eq!(client(proxy_addr, &["consume", "secrets"]), "OK");
        assert_eq!(client(proxy_addr, &["consume", "orders"]), "OK m1");
    })
    .await
    .unwrap();

    let mut denied_produce = 0;
    while let Ok(ev) = events.try_recv() {
        let L7EventKind::Kafka {
            api_key,
            topics,
            error_code,
            client_id,
            ..
        } = &ev.kind
        else {
            panic!("kafka event")
        };
        assert_eq!(client_id.as_deref(), Some("fqdnwall-test"));
        if *api_key == 0 {
            if ev.verdict == L7Verdict::Allowed {
                assert_eq!(
                    topics,
                    &vec!["orders".to_string()],
                    "only orders is ever produced to"
                );
            } else {
                assert_eq!(*error_code, Some(29));
                denied_produce += 1;
            }
        }
    }
    // At least the produce-level denial and the consume-role produce; under the produce role
    // the client may also have sent a Produce for `secrets` (it can learn the partitions
    // from a Metadata request for all topics, which carries no topic and so passes).
    assert!(denied_produce >= 2, "{denied_produce}");
    let c = h.events.stats().kafka.snapshot();
    assert!(c.denied >= 4 && c.allowed > 10, "{c:?}");
    assert_eq!(c.malformed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_close_the_connection_and_are_counted() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A broker that accepts and never answers is enough: nothing may reach it.
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    let got = tokio::spawn(async move {
        let (mut s, _) = upstream.accept().await.unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf).await;
        buf
    });
    let h = Harness::new();
    h.policy.set_kafka(redirect(KafkaPolicy::allow_all()));
    let cfg = KafkaProxyConfig::new(
        loopback0(),
        ProxyMode::Fixed {
            upstream: upstream_addr,
            mark: None,
        },
    );
    let proxy = KafkaProxy::bind(cfg, h.policy.clone(), h.events.clone()).unwrap();
    let addr = proxy.local_addr();
    tokio::spawn(proxy.run());

    // A frame too short to hold a request header.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(&[0, 0, 0, 3, 1, 2, 3]).await.unwrap();
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("the proxy closes the connection");
    // Closed without an answer: an orderly close, or a reset when the close races the
    // client's own segments.
    match closed {
        Ok(n) => assert_eq!(n, 0, "closed without an answer"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    assert!(buf.is_empty(), "no answer: {buf:?}");
    assert_eq!(
        got.await.unwrap(),
        Vec::<u8>::new(),
        "nothing reached the broker"
    );
    assert_eq!(h.events.stats().kafka.snapshot().malformed, 1);
}
