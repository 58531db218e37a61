//! The HTTP proxy's request path on arbitrary bytes: the HTTP/1.x relay's head parser and
//! framing checks, chunked body decoding, the rule matcher on the borrowed head and the
//! denial/forwarding decision (and hyper's server for an upgrade). Allowed requests go to a
//! closed port (502), so nothing leaves the process.
#![no_main]

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use l7::{
    EventSink, HttpPolicy, HttpProxyConfig, HttpProxyService, ProxyMode, Redirect, SwappablePolicy,
};
use libfuzzer_sys::fuzz_target;
use policy::model::{HeaderMatch, HeaderRule, HttpRule, MismatchAction};
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
                method: Some("GET|HEAD".into()),
                path: Some("/api/v[0-9]+/.*".into()),
                ..Default::default()
            },
            HttpRule {
                host: Some(r"example\.com(:[0-9]+)?".into()),
                headers: vec![HeaderRule {
                    name: "x-token".into(),
                    value: Some("t".into()),
                }],
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
        cfg.header_read_timeout = Duration::from_millis(100);
        cfg.connect_timeout = Duration::from_millis(100);
        let svc = HttpProxyService::new(cfg, policy, EventSink::new(4));
        Env { rt, svc, upstream }
    })
}

fuzz_target!(|data: &[u8]| {
    let env = env();
    env.rt.block_on(async {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let svc = env.svc.clone();
        let upstream = env.upstream;
        let task = tokio::spawn(async move {
            svc.serve(server, "127.0.0.1:1".parse().unwrap(), upstream)
                .await
        });
        let _ = client.write_all(data).await;
        let _ = client.shutdown().await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), client.read_to_end(&mut out))
            .await
            .expect("proxy hung");
        tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .expect("connection task hung")
            .expect("connection task panicked");
        // HTTP/1.x gets HTTP/1.x responses; the HTTP/2 preface selects HTTP/2, whose frames
        // are checked by the HTTP/2 relay (see the h2_frames target).
        let h2 = data.starts_with(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        assert!(h2 || out.is_empty() || out.starts_with(b"HTTP/1."));
    });
});
