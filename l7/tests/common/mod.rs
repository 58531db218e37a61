//! Helpers shared by the proxy tests: prerequisites, the proxy under test, policies.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use l7::{EventSink, HttpPolicy, HttpProxy, HttpProxyConfig, ProxyMode, Redirect, SwappablePolicy};

/// Whether a prerequisite is missing in a way the test should skip on (developer machine)
/// or fail on (`CI=true`, where `scripts/setup-l7.sh` has run).
pub fn require(ok: bool, what: &str) -> bool {
    if ok {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("prerequisite missing: {what} (run scripts/setup-l7.sh)");
    }
    eprintln!("SKIP: prerequisite missing: {what} (run scripts/setup-l7.sh)");
    false
}

pub fn have_command(cmd: &str, arg: &str) -> bool {
    Command::new(cmd)
        .arg(arg)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

pub fn find_program(name: &str, env: &str) -> Option<PathBuf> {
    if let Ok(p) = std::env::var(env) {
        return Some(PathBuf::from(p));
    }
    for dir in ["/usr/local/bin", "/usr/bin"] {
        let p = PathBuf::from(dir).join(name);
        if p.exists() {
            return Some(p);
        }
    }
    None
}

pub fn redirect<P>(policy: P) -> Option<Redirect<P>> {
    Some(Redirect {
        endpoint_id: 7,
        endpoint: Arc::from("client"),
        remote_identity: 4242,
        policy: Arc::new(policy),
    })
}

pub struct Harness {
    pub policy: Arc<SwappablePolicy>,
    pub events: EventSink,
}

impl Harness {
    pub fn new() -> Self {
        Harness {
            policy: Arc::new(SwappablePolicy::new()),
            events: EventSink::new(1024),
        }
    }
}

pub fn loopback0() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Starts an HTTP proxy (non-transparent) in front of `backend` under `policy`, with `tune`
/// applied to its config first; its address.
pub async fn start_http_proxy(
    h: &Harness,
    backend: SocketAddr,
    policy: HttpPolicy,
    tune: impl FnOnce(&mut HttpProxyConfig),
) -> SocketAddr {
    h.policy.set_http(redirect(policy));
    let mut cfg = HttpProxyConfig::new(
        loopback0(),
        ProxyMode::Fixed {
            upstream: backend,
            mark: None,
        },
    );
    tune(&mut cfg);
    let proxy = HttpProxy::bind(cfg, h.policy.clone(), h.events.clone()).unwrap();
    let addr = proxy.local_addr();
    tokio::spawn(proxy.run());
    addr
}

/// A loopback TCP server for a test (a backend behind the proxy): every accepted connection
/// goes to `serve`, on a task of its own. Its address.
pub async fn serve_each<F, Fut>(serve: F) -> SocketAddr
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = listener.accept().await.unwrap();
            tokio::spawn(serve(s));
        }
    });
    addr
}
