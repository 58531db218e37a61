//! HTTP/2 streams through the proxy's relay with the `h2` crate on both ends (and curl,
//! h2load, a raw client): bodies larger than every flow-control window and trailers both
//! ways, a denied stream beside an allowed one, resets crossing the proxy with their reason,
//! back-pressure that holds a fast upstream back while the client does not read, 502 when
//! the upstream is down or not HTTP/2, CONNECT, the upstream's stream limit, a client's
//! window change mid-stream, responses using the upstream's dynamic table, informational
//! responses, GOAWAY from the upstream, a client without a header table, and client
//! protocol errors.

mod common;

use std::future::poll_fn;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
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
/// The same for `/watch-raw`.
static WATCHED_RAW: Mutex<Option<Result<(), Option<Reason>>>> = Mutex::new(None);

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
        "/early" => {
            let mut hints = Response::new(());
            *hints.status_mut() = StatusCode::from_u16(103).unwrap();
            hints
                .headers_mut()
                .insert("link", HeaderValue::from_static("</s.css>; rel=preload"));
            respond.send_informational(hints).unwrap();
            let mut tx = respond.send_response(Response::new(()), false).unwrap();
            tx.send_data(Bytes::from_static(b"hello"), true).unwrap();
        }
        "/hello" => {
            // (The client may have reset the stream meanwhile.)
            if let Ok(mut tx) = respond.send_response(Response::new(()), false) {
                let _ = tx.send_data(Bytes::from_static(b"hello"), true);
            }
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
        path @ ("/watch" | "/watch-raw") => {
            let _tx = respond.send_response(Response::new(()), false).unwrap();
            let end = read_all(&mut body)
                .await
                .map(|_| ())
                .map_err(|e| e.reason());
            let watched = if path == "/watch" {
                &WATCHED
            } else {
                &WATCHED_RAW
            };
            *watched.lock().unwrap() = Some(end);
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
            r("POST", "/watch-raw"),
            r("GET", "/hello"),
            r("GET", "/early"),
            r("GET", "/reset-mid-body"),
            r("GET", "/flood"),
        ],
        &SecretDir::new("/nonexistent"),
    )
    .unwrap()
}

/// Every GET allowed, whatever its path.
fn any_get() -> HttpPolicy {
    HttpPolicy::compile(
        &[HttpRule {
            method: Some("GET".into()),
            ..Default::default()
        }],
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

    // An informational response (103) goes through ahead of the final one.
    let mut send = send.ready().await.unwrap();
    let (resp, _) = send
        .send_request(request(Method::GET, "/early"), true)
        .unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    assert_eq!(read_all(&mut body).await.unwrap(), b"hello");
    assert_eq!(h.events.stats().http.snapshot().allowed, 4);
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

/// The upstream allows two streams at a time: twenty concurrent client streams wait for a
/// slot each rather than being refused upstream, and all are answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_beyond_the_upstream_stream_limit_wait_for_a_slot() {
    let active = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (a, p) = (active.clone(), peak.clone());
    let backend = serve_each(move |s| {
        let (a, p) = (a.clone(), p.clone());
        async move {
            let mut conn = h2::server::Builder::new()
                .max_concurrent_streams(2)
                .handshake::<_, Bytes>(s)
                .await
                .unwrap();
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                let (a, p) = (a.clone(), p.clone());
                tokio::spawn(async move {
                    p.fetch_max(a.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    a.fetch_sub(1, Ordering::SeqCst);
                    let path = req.uri().path().to_string();
                    let mut tx = respond.send_response(Response::new(()), false).unwrap();
                    tx.send_data(Bytes::from(path), true).unwrap();
                });
            }
        }
    })
    .await;
    let h = Harness::new();
    let proxy = start_http_proxy(&h, backend, any_get(), |_| {}).await;
    let send = client(proxy).await;
    let calls = (0..20).map(|i| {
        let send = send.clone();
        async move {
            let mut send = send.ready().await.unwrap();
            let (resp, _) = send
                .send_request(request(Method::GET, &format!("/n{i}")), true)
                .unwrap();
            let resp = resp.await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK, "stream {i}");
            let mut body = resp.into_body();
            assert_eq!(
                read_all(&mut body).await.unwrap(),
                format!("/n{i}").as_bytes()
            );
        }
    });
    tokio::time::timeout(
        Duration::from_secs(30),
        futures_util::future::join_all(calls),
    )
    .await
    .expect("streams hung");
    assert!(peak.load(Ordering::SeqCst) <= 2);
    let counts = h.events.stats().http.snapshot();
    assert_eq!((counts.allowed, counts.upstream_errors), (20, 0));
}

/// A client that starts with stream windows of 0 and opens them by SETTINGS later: the
/// response body waits in the proxy, then flows once the new initial window applies to the
/// open stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_settings_change_of_the_initial_window_applies_to_open_streams() {
    let h = Harness::new();
    let proxy = start_http_proxy(&h, start_backend().await, policy(), |_| {}).await;
    let tcp = TcpStream::connect(proxy).await.unwrap();
    let (send, mut conn) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, Bytes>(tcp)
        .await
        .unwrap();
    let (open_tx, open_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        tokio::select! {
            _ = &mut conn => return,
            _ = open_rx => {}
        }
        conn.set_initial_window_size(1 << 20).unwrap();
        let _ = conn.await;
    });
    let mut send = send.ready().await.unwrap();
    let want = 200_000;
    let mut req = request(Method::POST, "/echo");
    req.headers_mut()
        .insert("x-reply-bytes", HeaderValue::from(want));
    let (resp, _) = send.send_request(req, true).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("no response head")
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    // Nothing may come through a window of 0.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), body.data())
            .await
            .is_err(),
        "DATA beyond the client's stream window"
    );
    open_tx.send(()).unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), read_all(&mut body))
        .await
        .expect("the body never came after the window opened")
        .unwrap();
    assert!(got == pattern(want), "response body damaged");
    let trailers = body.trailers().await.unwrap().expect("trailers");
    assert_eq!(trailers["x-got-bytes"], "0");
}

/// The `h2` crate's encoder adds response fields to its dynamic table and refers to them
/// later (with evictions, the values being large): each response still arrives with its own
/// fields, sequentially and concurrently, also after responses the proxy had to encode again
/// (a hop-by-hop field dropped, so the client's table does not learn what the upstream's
/// did). The upstream closes its connection after every ten
/// streams, so the client's one connection sees several upstream tables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_using_the_upstream_dynamic_table_arrive_intact() {
    let backend = serve_each(|s| async move {
        let mut conn = h2::server::handshake(s).await.unwrap();
        let mut served = 0;
        while let Some(Ok((req, mut respond))) = conn.accept().await {
            served += 1;
            if served == 10 {
                conn.graceful_shutdown();
            }
            let n: usize = req.uri().path()[1..].parse().unwrap();
            let mut resp = Response::new(());
            let h = resp.headers_mut();
            h.insert("x-seq", HeaderValue::from(n));
            h.insert("x-fixed", HeaderValue::from_static("same every time"));
            h.insert("cache-control", HeaderValue::from_static("private"));
            h.insert("x-big", HeaderValue::from_str(&big_value(n)).unwrap());
            if n % 7 == 3 {
                // A hop-by-hop field the proxy drops: the block is encoded again there.
                h.insert("proxy-authenticate", HeaderValue::from_static("Basic"));
                h.insert("x-dropped-beside", HeaderValue::from(n % 3));
            }
            let mut tx = respond.send_response(resp, false).unwrap();
            tx.send_data(Bytes::from_static(b"ok"), false).unwrap();
            let mut t = HeaderMap::new();
            t.insert("x-trailer", HeaderValue::from(n * 2));
            t.insert("x-fixed", HeaderValue::from_static("same every time"));
            tx.send_trailers(t).unwrap();
        }
    })
    .await;
    fn big_value(n: usize) -> String {
        // Large enough that a few fill the 4 KiB table; the same for every fifth.
        format!("{}-{}", n % 5, "v".repeat(900))
    }
    let h = Harness::new();
    let proxy = start_http_proxy(&h, backend, any_get(), |_| {}).await;
    let send = client(proxy).await;
    let one = |n: usize| {
        let send = send.clone();
        async move {
            let mut send = send.ready().await.unwrap();
            let (resp, _) = send
                .send_request(request(Method::GET, &format!("/{n}")), true)
                .unwrap();
            let resp = resp.await.unwrap();
            let h = resp.headers();
            assert_eq!(h["x-seq"], n.to_string().as_str());
            assert_eq!(h["x-fixed"], "same every time");
            assert_eq!(h["cache-control"], "private");
            assert_eq!(h["x-big"], big_value(n).as_str());
            assert_eq!(h.get_all("x-seq").iter().count(), 1);
            assert!(h.contains_key("date"));
            assert!(!h.contains_key("proxy-authenticate"));
            assert_eq!(
                h.get("x-dropped-beside")
                    .map(|v| v.to_str().unwrap().to_string()),
                (n % 7 == 3).then(|| (n % 3).to_string())
            );
            let mut body = resp.into_body();
            assert_eq!(read_all(&mut body).await.unwrap(), b"ok");
            let t = body.trailers().await.unwrap().expect("trailers");
            assert_eq!(t["x-trailer"], (n * 2).to_string().as_str());
            assert_eq!(t["x-fixed"], "same every time");
        }
    };
    tokio::time::timeout(Duration::from_secs(30), async {
        for n in 0..40 {
            one(n).await;
        }
        futures_util::future::join_all((40..80).map(one)).await;
    })
    .await
    .expect("streams hung");
}

/// An upstream that closes its connection gracefully after its first stream (GOAWAY, then
/// the stream finishes): a stream opened while the old connection drains, and each later
/// one, goes on a new upstream connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_upstream_goaway_the_next_stream_opens_a_new_connection() {
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let backend = serve_each(move |s| {
        count.fetch_add(1, Ordering::SeqCst);
        async move {
            let mut conn = h2::server::handshake(s).await.unwrap();
            if let Some(Ok((req, mut respond))) = conn.accept().await {
                conn.graceful_shutdown();
                tokio::spawn(async move {
                    if req.uri().path() == "/slow" {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    let mut tx = respond.send_response(Response::new(()), false).unwrap();
                    tx.send_data(Bytes::from_static(b"once"), true).unwrap();
                });
            }
            while let Some(Ok(_)) = conn.accept().await {}
        }
    })
    .await;
    let h = Harness::new();
    let proxy = start_http_proxy(&h, backend, any_get(), |_| {}).await;
    let send = client(proxy).await;
    let get = |path: &'static str, after: u64| {
        let send = send.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(after)).await;
            let mut send = send.ready().await.unwrap();
            let (resp, _) = send.send_request(request(Method::GET, path), true).unwrap();
            let resp = tokio::time::timeout(Duration::from_secs(10), resp)
                .await
                .expect("no response")
                .unwrap();
            assert_eq!(resp.status(), StatusCode::OK, "{path}");
            let mut body = resp.into_body();
            assert_eq!(read_all(&mut body).await.unwrap(), b"once");
        }
    };
    // The second stream starts while the first holds the first connection open.
    tokio::join!(get("/slow", 0), get("/fast", 100));
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    let mut send = send.ready().await.unwrap();
    for _ in 0..3 {
        let (resp, _) = send
            .send_request(request(Method::GET, "/hello"), true)
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(10), resp)
            .await
            .expect("no response")
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body();
        assert_eq!(read_all(&mut body).await.unwrap(), b"once");
        // Until the proxy has seen the GOAWAY, a request could still go to the old
        // connection (which would refuse it; the proxy sends it again on a new one).
        send = send.ready().await.unwrap();
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 5);
    assert_eq!(h.events.stats().http.snapshot().upstream_errors, 0);
}

/// An upstream that does not speak HTTP/2: 502 for the stream, and no loop of new
/// connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_is_not_http2_gets_502_without_reconnecting() {
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let backend = serve_each(move |mut s| {
        count.fetch_add(1, Ordering::SeqCst);
        async move {
            use tokio::io::AsyncWriteExt;
            let _ = s
                .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                .await;
        }
    })
    .await;
    let h = Harness::new();
    let proxy = start_http_proxy(&h, backend, policy(), |_| {}).await;
    let mut send = client(proxy).await;
    let (resp, _) = send
        .send_request(request(Method::GET, "/hello"), true)
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("no response")
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    assert_eq!(h.events.stats().http.snapshot().upstream_errors, 1);
}

/// A raw HTTP/2 client for protocol errors no well-behaved client library makes.
struct RawClient {
    tcp: TcpStream,
    buf: Vec<u8>,
}

/// A literal header field without indexing, new name, no Huffman (RFC 7541 §6.2.2).
fn literal(name: &str, value: &str) -> Vec<u8> {
    assert!(name.len() < 127 && value.len() < 127);
    let mut out = vec![0, name.len() as u8];
    out.extend_from_slice(name.as_bytes());
    out.push(value.len() as u8);
    out.extend_from_slice(value.as_bytes());
    out
}

fn get_block(path: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut b = literal(":method", "GET");
    b.extend(literal(":scheme", "http"));
    b.extend(literal(":authority", "backend"));
    b.extend(literal(":path", path));
    for (n, v) in extra {
        b.extend(literal(n, v));
    }
    b
}

impl RawClient {
    async fn connect(addr: SocketAddr) -> RawClient {
        use tokio::io::AsyncWriteExt;
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .await
            .unwrap();
        RawClient {
            tcp,
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        use tokio::io::AsyncWriteExt;
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        self.tcp.write_all(&f).await.unwrap();
    }

    /// The next frame: (type, flags, stream, payload); `None` when the proxy closed.
    async fn next(&mut self) -> Option<(u8, u8, u32, Vec<u8>)> {
        use tokio::io::AsyncReadExt;
        loop {
            if self.buf.len() >= 9 {
                let len = (self.buf[0] as usize) << 16
                    | (self.buf[1] as usize) << 8
                    | self.buf[2] as usize;
                if self.buf.len() >= 9 + len {
                    let f: Vec<u8> = self.buf.drain(..9 + len).collect();
                    let stream = u32::from_be_bytes([f[5], f[6], f[7], f[8]]) & 0x7fff_ffff;
                    return Some((f[3], f[4], stream, f[9..].to_vec()));
                }
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(10), self.tcp.read(&mut chunk))
                .await
                .expect("the proxy said nothing")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Skips frames until one of type `kind` (SETTINGS, their acks, WINDOW_UPDATE and the
    /// like go by).
    async fn expect(&mut self, kind: u8) -> (u8, u32, Vec<u8>) {
        loop {
            let (k, flags, stream, payload) = self.next().await.expect("closed");
            if k == kind {
                return (flags, stream, payload);
            }
        }
    }
}

const RST_STREAM: u8 = 3;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const WINDOW_UPDATE: u8 = 8;

fn code(payload: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([
        payload[at],
        payload[at + 1],
        payload[at + 2],
        payload[at + 3],
    ])
}

/// Protocol errors of a client: stream errors reset the stream (and the upstream's), the
/// connection goes on; connection errors end it with GOAWAY and the right code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_protocol_errors_reset_the_stream_or_end_the_connection() {
    let h = Harness::new();
    let proxy = start_http_proxy(&h, start_backend().await, policy(), |_| {}).await;

    let mut c = RawClient::connect(proxy).await;
    c.send(PING, 0, 0, b"12345678").await;
    let (flags, _, payload) = c.expect(PING).await;
    assert_eq!((flags, payload.as_slice()), (1, &b"12345678"[..]));
    // An uppercase field name: the stream is malformed (PROTOCOL_ERROR), counted.
    c.send(1, 0x5, 1, &get_block("/hello", &[("X-Upper", "1")]))
        .await;
    let (_, stream, payload) = c.expect(RST_STREAM).await;
    assert_eq!((stream, code(&payload, 0)), (1, 1));
    assert_eq!(h.events.stats().http.snapshot().malformed, 1);
    // The connection goes on.
    c.send(1, 0x5, 3, &get_block("/hello", &[])).await;
    let (_, stream, _) = c.expect(1).await;
    assert_eq!(stream, 3);
    // A stream whose window would pass 2^31-1: FLOW_CONTROL_ERROR for it; the upstream's
    // stream is reset too.
    let mut block = literal(":method", "POST");
    block.extend(literal(":scheme", "http"));
    block.extend(literal(":authority", "backend"));
    block.extend(literal(":path", "/watch-raw"));
    c.send(1, 0x4, 5, &block).await;
    let (_, stream, _) = c.expect(1).await;
    assert_eq!(stream, 5);
    c.send(WINDOW_UPDATE, 0, 5, &0x7fff_ffffu32.to_be_bytes())
        .await;
    let (_, stream, payload) = c.expect(RST_STREAM).await;
    assert_eq!((stream, code(&payload, 0)), (5, 3));
    let watched = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(w) = WATCHED_RAW.lock().unwrap().take() {
                return w;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the upstream never saw the stream end");
    assert_eq!(watched, Err(Some(Reason::CANCEL)));
    // A request ending before the DATA its content-length announced: malformed.
    c.send(1, 0x5, 7, &get_block("/hello", &[("content-length", "10")]))
        .await;
    let (_, stream, payload) = c.expect(RST_STREAM).await;
    assert_eq!((stream, code(&payload, 0)), (7, 1));
    assert_eq!(h.events.stats().http.snapshot().malformed, 2);
    // The connection window past 2^31-1: GOAWAY FLOW_CONTROL_ERROR naming the last stream.
    c.send(WINDOW_UPDATE, 0, 0, &0x7fff_ffffu32.to_be_bytes())
        .await;
    let (_, _, payload) = c.expect(GOAWAY).await;
    assert_eq!((code(&payload, 0), code(&payload, 4)), (7, 3));
    assert!(c.next().await.is_none(), "still open after GOAWAY");

    for (frames, want) in [
        // A frame larger than our SETTINGS_MAX_FRAME_SIZE.
        (vec![(0u8, 0u8, 1u32, vec![0u8; 16_385])], 6u32),
        // DATA on stream 0; CONTINUATION out of the blue; DATA on an idle stream.
        (vec![(0, 0, 0, vec![0; 4])], 1),
        (vec![(9, 0x4, 1, vec![0x82])], 1),
        (vec![(0, 0, 7, vec![0; 4])], 1),
        // Padding longer than the payload.
        (vec![(1, 0x4 | 0x8, 1, vec![200, 0x82])], 1),
        // HEADERS cut by a PING before its CONTINUATION.
        (
            vec![(1, 0, 1, get_block("/hello", &[])), (6, 0, 0, vec![0; 8])],
            1,
        ),
        // A header block that is not HPACK (index 0).
        (vec![(1, 0x5, 1, vec![0x80])], 9),
        // A zero WINDOW_UPDATE for the connection.
        (vec![(8, 0, 0, vec![0; 4])], 1),
    ] {
        let mut c = RawClient::connect(proxy).await;
        for (kind, flags, stream, payload) in &frames {
            c.send(*kind, *flags, *stream, payload).await;
        }
        let (_, _, payload) = c.expect(GOAWAY).await;
        assert_eq!(code(&payload, 4), want, "{frames:?}");
        assert!(c.next().await.is_none(), "still open after GOAWAY");
    }
}

/// nghttp2's client (h2load) with a decoder table of 0 octets: it requires the dynamic table
/// size update that the proxy owes it at the start of the next header block, and every
/// response must decode without the table (the upstream's encoder indexes its fields).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nghttp2_with_no_header_table_gets_every_response() {
    if !require(have_command("h2load", "--version"), "h2load") {
        return;
    }
    let h = Harness::new();
    let proxy = start_http_proxy(&h, start_backend().await, policy(), |_| {}).await;
    let out = tokio::task::spawn_blocking(move || {
        Command::new("h2load")
            .args(["-n", "200", "-c", "2", "-m", "10", "--header-table-size=0"])
            .arg(format!("http://{proxy}/hello"))
            .output()
            .expect("run h2load")
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("200 succeeded, 0 failed, 0 errored"),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("status codes: 200 2xx"), "{text}");
}

/// A client that opens streams and resets them at once (the rapid-reset attack): past the
/// burst the proxy allows, the connection ends with ENHANCE_YOUR_CALM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_resets_end_the_connection() {
    let h = Harness::new();
    let proxy = start_http_proxy(&h, start_backend().await, policy(), |_| {}).await;
    let mut c = RawClient::connect(proxy).await;
    let block = get_block("/hello", &[]);
    let mut id = 1;
    let goaway = loop {
        assert!(id < 2 * 2000, "no GOAWAY after {} resets", id / 2);
        // Ten streams opened and cancelled at a time.
        for _ in 0..10 {
            c.send(1, 0x5, id, &block).await;
            c.send(RST_STREAM, 0, id, &8u32.to_be_bytes()).await;
            id += 2;
        }
        // What the proxy said meanwhile (answers to streams it got to first, a GOAWAY).
        let mut found = None;
        while let Ok(Some(f)) = tokio::time::timeout(Duration::from_millis(1), c.next()).await {
            if f.0 == GOAWAY {
                found = Some(f.3);
                break;
            }
        }
        if let Some(g) = found {
            break g;
        }
    };
    assert_eq!(code(&goaway, 4), 0xb);
    // At least the burst went by first.
    assert!(id / 2 > 1000, "GOAWAY after only {} streams", id / 2);
}
