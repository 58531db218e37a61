//! The HTTP proxy in front of a real hyper backend, driven by real curl.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use l7::{HttpPolicy, L7EventKind, L7Verdict, SecretDir};
use policy::model::{HeaderMatch, HeaderRule, HttpRule, MismatchAction, SecretRef};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::*;

/// A backend that answers every request with what it received: request line, then each
/// header, then the body length.
async fn start_backend() -> SocketAddr {
    serve_each(|s| async move {
        let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
            let mut out = format!("{} {}\n", req.method(), req.uri());
            let mut names: Vec<_> = req.headers().iter().collect();
            names.sort_by_key(|(k, _)| k.as_str().to_string());
            for (k, v) in names {
                out.push_str(&format!("{}: {}\n", k, v.to_str().unwrap_or("?")));
            }
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            out.push_str(&format!("body-length: {}\n", body.len()));
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(out))))
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(s), svc)
            .await;
    })
    .await
}

fn rules(secret_dir: &std::path::Path) -> HttpPolicy {
    let r = |method: Option<&str>, path: &str| HttpRule {
        method: method.map(Into::into),
        path: Some(path.into()),
        ..Default::default()
    };
    let mut host_rule = r(Some("GET"), "/host-only");
    host_rule.host = Some(r"api\.example\.com".into());
    let mut header_rule = r(Some("GET"), "/needs-header");
    header_rule.headers = vec![HeaderRule {
        name: "X-Token".into(),
        value: Some("abc".into()),
    }];
    let mut hm_rule = r(Some("GET"), "/header-matches");
    hm_rule.header_matches = vec![
        HeaderMatch {
            name: "x-added".into(),
            value: Some("by-proxy".into()),
            secret: None,
            mismatch: Some(MismatchAction::Add),
        },
        HeaderMatch {
            name: "x-removed".into(),
            value: Some("keep".into()),
            secret: None,
            mismatch: Some(MismatchAction::Delete),
        },
        HeaderMatch {
            name: "authorization".into(),
            value: None,
            secret: Some(SecretRef {
                namespace: Some("default".into()),
                name: "api-token".into(),
            }),
            mismatch: Some(MismatchAction::Replace),
        },
        HeaderMatch {
            name: "x-logged".into(),
            value: Some("1".into()),
            secret: None,
            mismatch: Some(MismatchAction::Log),
        },
    ];
    let mut strict = r(Some("GET"), "/strict");
    strict.header_matches = vec![HeaderMatch {
        name: "x-key".into(),
        value: Some("k1".into()),
        secret: None,
        mismatch: None,
    }];
    HttpPolicy::compile(
        &[
            r(Some("GET"), "/public/.*"),
            r(Some("POST"), "/upload"),
            host_rule,
            header_rule,
            hm_rule,
            strict,
        ],
        &SecretDir::new(secret_dir),
    )
    .unwrap()
}

struct Curl {
    status: u16,
    body: String,
}

fn curl(proxy: SocketAddr, path: &str, args: &[&str]) -> Curl {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--http1.1",
            "--max-time",
            "10",
            "-w",
            "\n%{http_code}",
        ])
        .args(args)
        .arg(format!("http://{proxy}{path}"))
        .output()
        .expect("run curl");
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, code) = text.rsplit_once('\n').unwrap();
    Curl {
        status: code.trim().parse().unwrap(),
        body: body.to_string(),
    }
}

async fn start(h: &Harness, backend: SocketAddr, policy: HttpPolicy) -> SocketAddr {
    start_http_proxy(h, backend, policy, |_| {}).await
}

fn secrets() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("default")).unwrap();
    std::fs::write(dir.path().join("default/api-token"), "Bearer s3cret\n").unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_allowed_and_denied_requests() {
    if !require(have_command("curl", "--version"), "curl") {
        return;
    }
    let secret_dir = secrets();
    let backend = start_backend().await;
    let h = Harness::new();
    let mut events = h.events.subscribe();
    let proxy = start(&h, backend, rules(secret_dir.path())).await;

    tokio::task::spawn_blocking(move || {
        // Allowed method + path reaches the backend.
        let r = curl(proxy, "/public/a", &[]);
        assert_eq!(r.status, 200);
        assert!(r.body.starts_with("GET /public/a\n"), "{}", r.body);
        // Other path, other method: 403 with the body.
        for (path, args) in [
            ("/private", vec![]),
            ("/public/a", vec!["-X", "DELETE"]),
            ("/publicity", vec![]),
        ] {
            let r = curl(proxy, path, &args);
            assert_eq!(
                (r.status, r.body.as_str()),
                (403, "Access denied"),
                "{path} {args:?}"
            );
        }
        // Host.
        assert_eq!(
            curl(proxy, "/host-only", &["-H", "Host: api.example.com"]).status,
            200
        );
        let r = curl(proxy, "/host-only", &["-H", "Host: other.example.com"]);
        assert_eq!((r.status, r.body.as_str()), (403, "Access denied"));
        // Missing or wrong header.
        assert_eq!(
            curl(proxy, "/needs-header", &["-H", "X-Token: abc"]).status,
            200
        );
        assert_eq!(curl(proxy, "/needs-header", &[]).status, 403);
        assert_eq!(
            curl(proxy, "/needs-header", &["-H", "X-Token: abd"]).status,
            403
        );
        // headerMatches without an action: a mismatch denies.
        assert_eq!(curl(proxy, "/strict", &["-H", "x-key: k1"]).status, 200);
        assert_eq!(curl(proxy, "/strict", &["-H", "x-key: k2"]).status, 403);
    })
    .await
    .unwrap();

    let mut denied = 0;
    while let Ok(ev) = events.try_recv() {
        if ev.verdict == L7Verdict::Denied {
            denied += 1;
            assert_eq!(ev.remote_identity, Some(4242));
            let L7EventKind::Http { status, .. } = ev.kind else {
                panic!("http event")
            };
            assert_eq!(status, 403);
        }
    }
    assert_eq!(denied, 7);
    let c = h.events.stats().http.snapshot();
    assert_eq!((c.allowed, c.denied), (4, 7));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_match_actions_are_visible_at_the_backend() {
    if !require(have_command("curl", "--version"), "curl") {
        return;
    }
    let secret_dir = secrets();
    let backend = start_backend().await;
    let h = Harness::new();
    let proxy = start(&h, backend, rules(secret_dir.path())).await;
    let body = tokio::task::spawn_blocking(move || {
        let r = curl(
            proxy,
            "/header-matches",
            &[
                "-H",
                "x-removed: wrong",
                "-H",
                "Authorization: Bearer guess",
                "-H",
                "x-logged: 2",
            ],
        );
        assert_eq!(r.status, 200);
        r.body
    })
    .await
    .unwrap();
    assert!(body.contains("x-added: by-proxy\n"), "ADD: {body}");
    assert!(!body.contains("x-removed"), "DELETE: {body}");
    assert!(
        body.contains("authorization: Bearer s3cret\n"),
        "REPLACE from secret: {body}"
    );
    assert!(!body.contains("Bearer guess"), "{body}");
    assert!(
        body.contains("x-logged: 2\n"),
        "LOG leaves the header: {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_connection_mixes_allowed_and_denied() {
    if !require(have_command("curl", "--version"), "curl") {
        return;
    }
    let secret_dir = secrets();
    let backend = start_backend().await;
    let h = Harness::new();
    let proxy = start(&h, backend, rules(secret_dir.path())).await;
    let out = tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--http1.1", "--max-time", "10"]);
        for path in ["/public/1", "/private", "/public/2", "/nope", "/public/3"] {
            cmd.args(["-o", "/dev/null", "-w", "%{http_code} %{num_connects}\n"]);
            cmd.arg(format!("http://{proxy}{path}"));
        }
        cmd.output().unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        ["200 1", "403 0", "200 0", "403 0", "200 0"],
        "one connection: {text}"
    );
    assert_eq!(h.events.stats().http.snapshot().connections, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_upload_streams_and_upgrade_is_refused() {
    if !require(have_command("curl", "--version"), "curl") {
        return;
    }
    let secret_dir = secrets();
    let backend = start_backend().await;
    let h = Harness::new();
    let proxy = start(&h, backend, rules(secret_dir.path())).await;
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), vec![b'x'; 300_000]).unwrap();
    let path = file.path().to_str().unwrap().to_string();
    tokio::task::spawn_blocking(move || {
        let r = curl(
            proxy,
            "/upload",
            &[
                "-X",
                "POST",
                "-H",
                "Transfer-Encoding: chunked",
                "--data-binary",
                &format!("@{path}"),
            ],
        );
        assert_eq!(r.status, 200);
        assert!(
            r.body.contains("transfer-encoding: chunked\n"),
            "{}",
            r.body
        );
        assert!(r.body.contains("body-length: 300000\n"), "{}", r.body);
        let r = curl(
            proxy,
            "/public/ws",
            &["-H", "Connection: Upgrade", "-H", "Upgrade: websocket"],
        );
        assert_eq!((r.status, r.body.as_str()), (403, "Access denied"));
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_request_gets_400_and_proxy_keeps_serving() {
    let secret_dir = secrets();
    let backend = start_backend().await;
    let h = Harness::new();
    let proxy = start(&h, backend, rules(secret_dir.path())).await;
    let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
    s.write_all(b"GARBAGE \x01\x02 nonsense\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    // Give the connection task a moment to record the error.
    for _ in 0..50 {
        if h.events.stats().http.malformed.load(Ordering::Relaxed) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(h.events.stats().http.snapshot().malformed, 1);
    let (status, _) = hyper_get(proxy, "/public/after").await;
    assert_eq!(status, 200);
}

/// A policy change applies to the next request of an open connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_change_applies_to_next_request_on_open_connection() {
    let secret_dir = secrets();
    let backend = start_backend().await;
    let h = Harness::new();
    let proxy = start(&h, backend, rules(secret_dir.path())).await;
    let stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let get = |path: &str| {
        Request::get(path)
            .header("host", "backend")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap()
    };
    let r = sender.send_request(get("/later")).await.unwrap();
    assert_eq!(r.status(), 403);
    r.into_body().collect().await.unwrap();
    h.policy.set_http(redirect(HttpPolicy::allow_all()));
    sender.ready().await.unwrap();
    let r = sender.send_request(get("/later")).await.unwrap();
    assert_eq!(r.status(), 200);
    r.into_body().collect().await.unwrap();
    // No policy at all for the flow: fail closed.
    h.policy.set_http(None);
    sender.ready().await.unwrap();
    let r = sender.send_request(get("/public/a")).await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(h.events.stats().http.snapshot().connections, 1);
}

async fn hyper_get(addr: SocketAddr, path: &str) -> (u16, Bytes) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", "backend")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let r = sender.send_request(req).await.unwrap();
    let status = r.status().as_u16();
    (status, r.into_body().collect().await.unwrap().to_bytes())
}

/// A denied request with a body does not cost the client its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_request_with_body_keeps_the_connection() {
    if !require(have_command("curl", "--version"), "curl") {
        return;
    }
    let secret_dir = secrets();
    let backend = start_backend().await;
    let h = Harness::new();
    let proxy = start(&h, backend, rules(secret_dir.path())).await;
    let out = tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--http1.1", "--max-time", "10"]);
        cmd.args(["-o", "/dev/null", "-w", "%{http_code} %{num_connects}\n"]);
        cmd.args(["-X", "POST", "--data-binary", "some=form&data=1"]);
        cmd.arg(format!("http://{proxy}/private"));
        cmd.arg("--next");
        cmd.args(["-o", "/dev/null", "-w", "%{http_code} %{num_connects}\n"]);
        cmd.arg(format!("http://{proxy}/public/1"));
        cmd.output().unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        ["403 1", "200 0"],
        "{text}"
    );
}

/// With upgrades allowed, an allowed upgrade request switches protocols end to end and the
/// bytes after it flow both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_upgrade_switches_protocols() {
    let backend = serve_each(|s| async move {
        let svc = hyper::service::service_fn(|mut req: Request<Incoming>| async move {
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(up) = on.await {
                    let mut io = TokioIo::new(up);
                    let mut buf = [0u8; 64];
                    while let Ok(n) = io.read(&mut buf).await {
                        if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            });
            Ok::<_, Infallible>(
                Response::builder()
                    .status(101)
                    .header("connection", "upgrade")
                    .header("upgrade", "echo")
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(s), svc)
            .with_upgrades()
            .await;
    })
    .await;
    let h = Harness::new();
    let addr = start_http_proxy(&h, backend, HttpPolicy::allow_all(), |cfg| {
        cfg.allow_upgrades = true
    })
    .await;

    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /chat HTTP/1.1\r\nHost: b\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut byte))
            .await
            .unwrap()
            .unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: echo"),
        "{head}"
    );
    s.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"ping");
}

/// `curl --http2` on http:// offers an h2c upgrade; the proxy serves it as HTTP/1.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_upgrade_offer_is_served_as_http11() {
    if !require(have_command("curl", "--version"), "curl") {
        return;
    }
    let secret_dir = secrets();
    let backend = start_backend().await;
    let h = Harness::new();
    let proxy = start(&h, backend, rules(secret_dir.path())).await;
    let r = tokio::task::spawn_blocking(move || {
        let out = Command::new("curl")
            .args(["-sS", "--http2", "--max-time", "10", "-w", "\n%{http_code}"])
            .arg(format!("http://{proxy}/public/h2c"))
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    })
    .await
    .unwrap();
    assert!(r.starts_with("GET /public/h2c\n"), "{r}");
    assert!(!r.contains("upgrade:"), "the offer is not passed on: {r}");
    assert!(r.ends_with("\n200"), "{r}");
}
