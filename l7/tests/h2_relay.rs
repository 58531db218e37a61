//! HTTP/2 streams through the proxy with the `h2` crate on both ends (and curl): bodies larger
//! than every flow-control window and trailers both ways, a denied stream beside an allowed
//! one, resets crossing the proxy with their reason, back-pressure that holds a fast upstream
//! back while the client does not read, and 502 when the upstream is down.

mod common;

use std::future::poll_fn;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use l7::{HttpPolicy, SecretDir};
use policy::model::HttpRule;
use tokio::net::TcpStream;

use common::*;

const FLOOD: usize = 10 * 1024 * 1024;
/// What the backend managed to send of `/flood` so far.
static FLOOD_SENT: AtomicUsize = AtomicUsize::new(0);
/// How the request body of `/watch` ended at the backend.
static WATCHED: Mutex<Option<Result<(), Option<Reason>>>> = Mutex::new(None);

/// `len` bytes of a pattern that shows misplaced or lost chunks.
fn pattern(len: usize) -> Bytes {
    (0..len).map(|i| (i % 251) as u8).collect()
}

async fn send_all(tx: &mut SendStream<Bytes>, mut data: Bytes) {
    while !data.is_empty() {
        tx.reserve_capacity(data.len());
        let cap = poll_fn(|cx| tx.poll_capacity(cx))
            .await
            .expect("stream open")
            .expect("capacity");
        let n = cap.min(data.len());
        if n > 0 {
            tx.send_data(data.split_to(n), false).unwrap();
        }
    }
}

async fn read_all(rx: &mut RecvStream) -> Result<Vec<u8>, h2::Error> {
    let mut out = Vec::new();
    while let Some(d) = rx.data().await {
        let d = d?;
        rx.flow_control().release_capacity(d.len()).unwrap();
        out.extend_from_slice(&d);
    }
    Ok(out)
}

/// The upstream: an HTTP/2 server whose paths do what the tests need.
async fn start_backend() -> SocketAddr {
    serve_each(|s| async move {
        let mut conn = h2::server::handshake(s).await.unwrap();
        while let Some(Ok((req, respond))) = conn.accept().await {
            tokio::spawn(backend_stream(req, respond));
        }
    })
    .await
}

async fn backend_stream(req: Request<RecvStream>, mut respond: h2::server::SendResponse<Bytes>) {
    let (head, mut body) = req.into_parts();
    if head.method == Method::CONNECT {
        // A tunnel that echoes what comes through it.
        let mut tx = respond.send_response(Response::new(()), false).unwrap();
        while let Some(Ok(d)) = body.data().await {
            body.flow_control().release_capacity(d.len()).unwrap();
            tx.send_data(d, false).unwrap();
        }
        let _ = tx.send_data(Bytes::new(), true);
        return;
    }
    match head.uri.path() {
        // The request body and trailers read whole, then as many bytes as asked for and
        // trailers telling what came.
        "/echo" => {
            let got = read_all(&mut body).await.unwrap();
            let trailers = body.trailers().await.unwrap().unwrap_or_default();
            assert_eq!(got, pattern(got.len()), "request body damaged");
            let want: usize = head.headers["x-reply-bytes"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            let mut tx = respond.send_response(Response::new(()), false).unwrap();
            send_all(&mut tx, pattern(want)).await;
            let mut t = HeaderMap::new();
            t.insert("x-got-bytes", HeaderValue::from(got.len()));
            if let Some(v) = trailers.get("x-req-trailer") {
                t.insert("x-got-trailer", v.clone());
            }
            tx.send_trailers(t).unwrap();
        }
        "/hello" => {
            let mut tx = respond.send_response(Response::new(()), false).unwrap();
            tx.send_data(Bytes::from_static(b"hello"), true).unwrap();
        }
        "/reset-mid-body" => {
            let mut tx = respond.send_response(Response::new(()), false).unwrap();
            tx.send_data(Bytes::from_static(b"0123456789"), false)
                .unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            tx.send_reset(Reason::ENHANCE_YOUR_CALM);
        }
        "/flood" => {
            let mut tx = respond.send_response(Response::new(()), false).unwrap();
            let mut left = FLOOD;
            while left > 0 {
                tx.reserve_capacity(left.min(64 * 1024));
                let Some(Ok(cap)) = poll_fn(|cx| tx.poll_capacity(cx)).await else {
                    return;
                };
                let n = cap.min(left);
                if n > 0 {
                    tx.send_data(pattern(n), false).unwrap();
                    FLOOD_SENT.fetch_add(n, Ordering::SeqCst);
                    left -= n;
                }
            }
            tx.send_data(Bytes::new(), true).unwrap();
        }
        "/watch" => {
            let _tx = respond.send_response(Response::new(()), false).unwrap();
            let end = read_all(&mut body)
                .await
                .map(|_| ())
                .map_err(|e| e.reason());
            *WATCHED.lock().unwrap() = Some(end);
        }
        _ => {
            let mut resp = Response::new(());
            *resp.status_mut() = StatusCode::NOT_FOUND;
            let _ = respond.send_response(resp, true);
        }
    }
}

fn policy() -> HttpPolicy {
    let r = |m: &str, p: &str| HttpRule {
        method: Some(m.into()),
        path: Some(p.into()),
        ..Default::default()
    };
    HttpPolicy::compile(
        &[
            r("POST", "/echo"),
            r("POST", "/watch"),
            r("GET", "/hello"),
            r("GET", "/reset-mid-body"),
            r("GET", "/flood"),
        ],
        &SecretDir::new("/nonexistent"),
    )
    .unwrap()
}

/// An HTTP/2 client connection to `addr` (flow-control windows at the protocol's default,
/// 64 KiB, far below the proxy's).
async fn client(addr: SocketAddr) -> h2::client::SendRequest<Bytes> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send.ready().await.unwrap()
}

fn request(method: Method, path: &str) -> Request<()> {
    Request::builder()
        .method(method)
        .uri(format!("http://backend{path}"))
        .body(())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_and_trailers_cross_both_ways_beside_a_denied_stream() {
    let h = Harness::new();
    let proxy = start_http_proxy(&h, start_backend().await, policy(), |_| {}).await;
    let send = client(proxy).await;

    let big = 3 * 1024 * 1024 + 17;
    let echo = {
        let mut send = send.clone();
        async move {
            let mut req = request(Method::POST, "/echo");
            req.headers_mut()
                .insert("x-reply-bytes", HeaderValue::from(big + 1));
            send = send.ready().await.unwrap();
            let (resp, mut tx) = send.send_request(req, false).unwrap();
            send_all(&mut tx, pattern(big)).await;
            let mut t = HeaderMap::new();
            t.insert("x-req-trailer", HeaderValue::from_static("t1"));
            tx.send_trailers(t).unwrap();
            let resp = resp.await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            // The backend sent no Date; a forwarded response gets one.
            assert!(resp.headers().contains_key("date"));
            let mut body = resp.into_body();
            let got = read_all(&mut body).await.unwrap();
            assert_eq!(got.len(), big + 1);
            assert!(got == pattern(big + 1), "response body damaged");
            let trailers = body.trailers().await.unwrap().expect("trailers");
            assert_eq!(trailers["x-got-bytes"], big.to_string().as_str());
            assert_eq!(trailers["x-got-trailer"], "t1");
        }
    };
    let denied = {
        let send = send.clone();
        async move {
            let mut send = send.ready().await.unwrap();
            let (resp, _) = send
                .send_request(request(Method::GET, "/admin"), true)
                .unwrap();
            let resp = resp.await.unwrap();
            assert_eq!(resp.status(), StatusCode::FORBIDDEN);
            assert_eq!(resp.headers()["content-length"], "13");
            assert!(resp.headers()["date"].to_str().unwrap().ends_with(" GMT"));
            let mut body = resp.into_body();
            assert_eq!(read_all(&mut body).await.unwrap(), b"Access denied");
        }
    };
    tokio::time::timeout(Duration::from_secs(30), async {
        tokio::join!(echo, denied)
    })
    .await
    .expect("streams hung");
    let counts = h.events.stats().http.snapshot();
    assert_eq!((counts.allowed, counts.denied), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_cross_the_proxy_with_their_reason() {
    let h = Harness::new();
    let proxy = start_http_proxy(&h, start_backend().await, policy(), |_| {}).await;
    let mut send = client(proxy).await;

    // The upstream resets a stream in the middle of its body: the client sees that reason.
    let (resp, _) = send
        .send_request(request(Method::GET, "/reset-mid-body"), true)
        .unwrap();
    let mut body = resp.await.unwrap().into_body();
    let mut got = Vec::new();
    let err = loop {
        match body.data().await {
            Some(Ok(d)) => got.extend_from_slice(&d),
            Some(Err(e)) => break e,
            None => panic!("the stream ended cleanly"),
        }
    };
    assert_eq!(got, b"0123456789");
    assert_eq!(err.reason(), Some(Reason::ENHANCE_YOUR_CALM), "{err:?}");

    // The client resets a stream while sending its body: the upstream sees that reason.
    let mut send = send.ready().await.unwrap();
    let (resp, mut tx) = send
        .send_request(request(Method::POST, "/watch"), false)
        .unwrap();
    tx.send_data(pattern(100), false).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    tx.send_reset(Reason::CANCEL);
    let watched = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(w) = WATCHED.lock().unwrap().take() {
                return w;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the upstream never saw the stream end");
    assert_eq!(watched, Err(Some(Reason::CANCEL)));

    // The connection still serves other streams.
    let mut send = send.ready().await.unwrap();
    let (resp, _) = send
        .send_request(request(Method::GET, "/hello"), true)
        .unwrap();
    let mut body = resp.await.unwrap().into_body();
    assert_eq!(read_all(&mut body).await.unwrap(), b"hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_holds_the_upstream_back() {
    let h = Harness::new();
    let proxy = start_http_proxy(&h, start_backend().await, policy(), |_| {}).await;
    let mut send = client(proxy).await;
    let (resp, _) = send
        .send_request(request(Method::GET, "/flood"), true)
        .unwrap();
    let mut body = resp.await.unwrap().into_body();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // What flow control lets through: the proxy's upstream stream window (2 MiB), the
    // client's (64 KiB) and about a frame in the proxy.
    let sent = FLOOD_SENT.load(Ordering::SeqCst);
    assert!(
        (64 * 1024..3 * 1024 * 1024).contains(&sent),
        "the upstream sent {sent} bytes to a client that reads nothing"
    );
    let got = tokio::time::timeout(Duration::from_secs(30), read_all(&mut body))
        .await
        .expect("body hung")
        .unwrap();
    assert_eq!(got.len(), FLOOD);
    assert_eq!(FLOOD_SENT.load(Ordering::SeqCst), FLOOD);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_prior_knowledge_and_a_dead_upstream() {
    let h = Harness::new();
    let proxy = start_http_proxy(&h, start_backend().await, policy(), |_| {}).await;
    let curl = |addr: SocketAddr, path: &str| {
        let out = Command::new("curl")
            .args(["-sS", "--http2-prior-knowledge", "--max-time", "10"])
            .args(["-w", "\n%{http_version} %{http_code}"])
            .arg(format!("http://{addr}{path}"))
            .output()
            .expect("run curl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let (a, b) = (proxy, proxy);
    let hello = tokio::task::spawn_blocking(move || curl(a, "/hello"));
    let denied = tokio::task::spawn_blocking(move || curl(b, "/admin"));
    assert_eq!(hello.await.unwrap(), "hello\n2 200");
    assert_eq!(denied.await.unwrap(), "Access denied\n2 403");

    // Nothing listens upstream: 502, counted as an upstream error.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let h = Harness::new();
    let proxy = start_http_proxy(&h, dead_addr, policy(), |_| {}).await;
    let out = tokio::task::spawn_blocking(move || curl(proxy, "/hello"));
    assert_eq!(out.await.unwrap(), "Bad gateway\n2 502");
    assert_eq!(h.events.stats().http.snapshot().upstream_errors, 1);
}

/// CONNECT over HTTP/2 (RFC 9113 §8.5) is refused unless upgrades are allowed; allowed, the
/// tunnel is a stream of the upstream connection and bytes cross it both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_tunnels_only_when_upgrades_are_allowed() {
    let backend = start_backend().await;
    let connect_rule = || {
        HttpPolicy::compile(
            &[HttpRule {
                method: Some("CONNECT".into()),
                ..Default::default()
            }],
            &SecretDir::new("/nonexistent"),
        )
        .unwrap()
    };
    let connect = || {
        Request::builder()
            .method(Method::CONNECT)
            .uri("tunnel.example:443")
            .body(())
            .unwrap()
    };

    let h = Harness::new();
    let proxy = start_http_proxy(&h, backend, connect_rule(), |_| {}).await;
    let mut send = client(proxy).await;
    let (resp, _) = send.send_request(connect(), false).unwrap();
    assert_eq!(resp.await.unwrap().status(), StatusCode::FORBIDDEN);

    let h = Harness::new();
    let proxy =
        start_http_proxy(&h, backend, connect_rule(), |cfg| cfg.allow_upgrades = true).await;
    let mut send = client(proxy).await;
    let (resp, mut tx) = send.send_request(connect(), false).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut rx = resp.into_body();
    for word in ["ping", "pong"] {
        tx.send_data(Bytes::from(word), false).unwrap();
        let got = rx.data().await.unwrap().unwrap();
        rx.flow_control().release_capacity(got.len()).unwrap();
        assert_eq!(got, word);
    }
    tx.send_data(Bytes::new(), true).unwrap();
    let rest = read_all(&mut rx).await;
    assert_eq!(rest.as_deref().ok(), Some(&b""[..]), "{rest:?}");
}
