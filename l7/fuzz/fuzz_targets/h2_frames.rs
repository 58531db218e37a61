//! The HTTP proxy's HTTP/2 relay on arbitrary frames from a client: framing checks,
//! CONTINUATION joining, HPACK decoding (dynamic table, Huffman), request checks, the rule
//! matcher, stream states and flow control. The input follows the client preface and an
//! empty SETTINGS frame; allowed streams go to a closed port (502), so nothing leaves the
//! process. What the relay writes must be whole frames, opening with its SETTINGS.
#![no_main]

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use l7::{
    EventSink, HttpPolicy, HttpProxyConfig, HttpProxyService, ProxyMode, Redirect, SwappablePolicy,
};
use libfuzzer_sys::fuzz_target;
use policy::model::{HeaderMatch, HttpRule, MismatchAction};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Env {
    rt: tokio::runtime::Runtime,
    svc: HttpProxyService,
    upstream: SocketAddr,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let upstream = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let rules = vec![
            HttpRule {
                method: Some("GET|POST".into()),
                path: Some("/api/.*".into()),
                ..Default::default()
            },
            HttpRule {
                host: Some(r"example\.com".into()),
                header_matches: vec![HeaderMatch {
                    name: "x-env".into(),
                    value: Some("prod".into()),
                    secret: None,
                    mismatch: Some(MismatchAction::Replace),
                }],
                ..Default::default()
            },
        ];
        let policy = Arc::new(SwappablePolicy::new());
        policy.set_http(Some(Redirect {
            endpoint_id: 1,
            endpoint: Arc::from("fuzz"),
            remote_identity: 2,
            policy: Arc::new(
                HttpPolicy::compile(&rules, &l7::SecretDir::new("/nonexistent")).unwrap(),
            ),
        }));
        let mut cfg = HttpProxyConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            ProxyMode::Fixed {
                upstream,
                mark: None,
            },
        );
        cfg.allow_upgrades = true;
        cfg.header_read_timeout = Duration::from_millis(100);
        cfg.connect_timeout = Duration::from_millis(100);
        let svc = HttpProxyService::new(cfg, policy, EventSink::new(4));
        Env { rt, svc, upstream }
    })
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";

fuzz_target!(|data: &[u8]| {
    let env = env();
    env.rt.block_on(async {
        // Large enough that nothing the relay writes waits for the reader.
        let (mut client, server) = tokio::io::duplex(1 << 22);
        let svc = env.svc.clone();
        let upstream = env.upstream;
        let task = tokio::spawn(async move {
            svc.serve(server, "127.0.0.1:1".parse().unwrap(), upstream)
                .await
        });
        let _ = client.write_all(PREFACE).await;
        let _ = client.write_all(data).await;
        // Time for streams to reach the (closed) upstream and be answered.
        tokio::time::sleep(Duration::from_millis(1)).await;
        let _ = client.shutdown().await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), client.read_to_end(&mut out))
            .await
            .expect("relay hung");
        tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .expect("connection task hung")
            .expect("connection task panicked");
        // Whole frames, the first our SETTINGS.
        assert!(out.len() >= 9 && out[3] == 4, "no SETTINGS first: {out:?}");
        let mut pos = 0;
        while pos < out.len() {
            assert!(pos + 9 <= out.len(), "a cut frame header");
            let len =
                (out[pos] as usize) << 16 | (out[pos + 1] as usize) << 8 | out[pos + 2] as usize;
            pos += 9 + len;
        }
        assert_eq!(pos, out.len(), "a cut frame");
    });
});
