//! Random bytes at the proxies' parsers: they must answer with a protocol error or close,
//! never panic or hang, and keep serving.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use l7::{
    EventSink, HttpPolicy, HttpProxyConfig, HttpProxyService, KafkaPolicy, KafkaProxyConfig,
    KafkaProxyService, ProxyMode,
};
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::*;

/// A port nothing listens on: allowed requests fail upstream (502), which is fine here.
fn dead_upstream() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

fn http_service() -> (HttpProxyService, SocketAddr) {
    let h = Harness::new();
    let policy = HttpPolicy::compile(
        &[policy::model::HttpRule {
            method: Some("GET".into()),
            path: Some("/a.*".into()),
            ..Default::default()
        }],
        &l7::SecretDir::new("/nonexistent"),
    )
    .unwrap();
    h.policy.set_http(redirect(policy));
    let upstream = dead_upstream();
    let mut cfg = HttpProxyConfig::new(
        loopback0(),
        ProxyMode::Fixed {
            upstream,
            mark: None,
        },
    );
    cfg.header_read_timeout = Duration::from_millis(200);
    (
        HttpProxyService::new(cfg, h.policy.clone(), EventSink::new(16)),
        upstream,
    )
}

/// A broker stand-in that accepts and swallows everything (started once).
fn sink_upstream() -> SocketAddr {
    static ADDR: std::sync::OnceLock<SocketAddr> = std::sync::OnceLock::new();
    *ADDR.get_or_init(|| {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { break };
                std::thread::spawn(move || {
                    let mut sink = Vec::new();
                    let _ = std::io::Read::read_to_end(&mut s, &mut sink);
                });
            }
        });
        addr
    })
}

fn kafka_service() -> (KafkaProxyService, SocketAddr) {
    let h = Harness::new();
    h.policy.set_kafka(redirect(
        KafkaPolicy::compile(&[policy::model::KafkaRule {
            topic: Some("t".into()),
            ..Default::default()
        }])
        .unwrap(),
    ));
    // The upstream must accept for the Kafka proxy to read requests at all.
    let addr = sink_upstream();
    let svc = KafkaProxyService::new(
        KafkaProxyConfig::new(
            loopback0(),
            ProxyMode::Fixed {
                upstream: addr,
                mark: None,
            },
        ),
        h.policy.clone(),
        EventSink::new(16),
    );
    (svc, addr)
}

/// Feeds `input` to one connection and returns what came back.
async fn exchange<F, Fut>(serve: F, input: Vec<u8>) -> Vec<u8>
where
    F: FnOnce(tokio::io::DuplexStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (mut client, server) = tokio::io::duplex(1 << 16);
    let task = tokio::spawn(serve(server));
    client.write_all(&input).await.unwrap();
    client.shutdown().await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut out))
        .await
        .expect("proxy hung")
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("connection task hung")
        .expect("connection task panicked");
    out
}

fn http_input() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..512),
        // Plausible requests with random damage.
        (
            prop_oneof![Just("GET"), Just("POST"), Just("G\0T"), Just("PRI")],
            "[ -~]{0,40}",
            proptest::collection::vec(("[a-zA-Z-]{0,12}", "[ -~\t]{0,20}"), 0..6),
            proptest::collection::vec(any::<u8>(), 0..64),
        )
            .prop_map(|(m, path, headers, body)| {
                let mut v = format!("{m} /{path} HTTP/1.1\r\nHost: h\r\n").into_bytes();
                for (k, val) in headers {
                    v.extend_from_slice(format!("{k}: {val}\r\n").as_bytes());
                }
                v.extend_from_slice(b"\r\n");
                v.extend_from_slice(&body);
                v
            }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn http_proxy_survives_random_input(input in http_input()) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (svc, dst) = http_service();
            let src: SocketAddr = "127.0.0.1:1".parse().unwrap();
            let out = exchange(move |io| async move { svc.serve(io, src, dst).await }, input).await;
            // Whatever came back is HTTP responses.
            if !out.is_empty() {
                prop_assert!(out.starts_with(b"HTTP/1."), "{:?}", String::from_utf8_lossy(&out));
            }
            Ok(())
        })?;
    }

    #[test]
    fn kafka_proxy_survives_random_input(input in proptest::collection::vec(any::<u8>(), 0..512)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (svc, dst) = kafka_service();
            let src: SocketAddr = "127.0.0.1:1".parse().unwrap();
            let _ = exchange(move |io| async move { svc.serve(io, src, dst).await }, input).await;
        });
    }
}
