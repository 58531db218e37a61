//! The HTTP/1.x relay on raw bytes: requests that could be smuggled are refused, heads of
//! every kind, `Expect: 100-continue`, HTTP/1.0 clients, either side closing mid-body,
//! backpressure, and pipelined requests with bodies.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use l7::{HttpPolicy, SecretDir};
use policy::model::HttpRule;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::*;

/// What the backend saw: every request head (as text) and whether its body came whole.
#[derive(Default)]
struct Seen {
    heads: Mutex<Vec<String>>,
    incomplete_bodies: AtomicUsize,
}

/// Reads one request from `s` (head, then a content-length or chunked body, decoded), `None`
/// at the end of the stream or when the body does not come whole (counted).
async fn read_request(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
    seen: &Seen,
) -> Option<(String, Vec<u8>)> {
    async fn more(s: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
        let mut chunk = [0u8; 16384];
        match s.read(&mut chunk).await {
            Ok(n) if n > 0 => {
                buf.extend_from_slice(&chunk[..n]);
                true
            }
            _ => false,
        }
    }
    let end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        if !more(s, buf).await {
            return None;
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    buf.drain(..end + 4);
    seen.heads.lock().unwrap().push(head.clone());
    let lower = head.to_ascii_lowercase();
    let mut body = Vec::new();
    if let Some(l) = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
    {
        let n: usize = l.trim().parse().unwrap();
        while buf.len() < n {
            if !more(s, buf).await {
                seen.incomplete_bodies.fetch_add(1, Ordering::SeqCst);
                return None;
            }
        }
        body = buf.drain(..n).collect();
    } else if lower.contains("transfer-encoding: chunked") {
        loop {
            let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") else {
                if !more(s, buf).await {
                    seen.incomplete_bodies.fetch_add(1, Ordering::SeqCst);
                    return None;
                }
                continue;
            };
            let size = usize::from_str_radix(
                std::str::from_utf8(&buf[..eol])
                    .unwrap()
                    .split(';')
                    .next()
                    .unwrap(),
                16,
            )
            .unwrap();
            while buf.len() < eol + 2 + size + 2 {
                if !more(s, buf).await {
                    seen.incomplete_bodies.fetch_add(1, Ordering::SeqCst);
                    return None;
                }
            }
            body.extend_from_slice(&buf[eol + 2..eol + 2 + size]);
            buf.drain(..eol + 2 + size + 2);
            if size == 0 {
                break;
            }
        }
    }
    Some((head, body))
}

/// A backend answering by path: `/echo` echoes the body, `/big` sends a large body as fast as
/// it can (counting what it wrote in `written`), `/cut` sends part of its body and closes,
/// anything else a short fixed answer.
async fn start_backend(seen: Arc<Seen>, written: Arc<AtomicUsize>) -> SocketAddr {
    serve_each(move |mut s| {
        let seen = seen.clone();
        let written = written.clone();
        async move {
            let mut buf = Vec::new();
            while let Some((head, body)) = read_request(&mut s, &mut buf, &seen).await {
                let path = head.split(' ').nth(1).unwrap_or("").to_string();
                match path.as_str() {
                    "/echo" => {
                        let mut a =
                            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len())
                                .into_bytes();
                        a.extend_from_slice(&body);
                        if s.write_all(&a).await.is_err() {
                            return;
                        }
                    }
                    "/big" => {
                        let total = BIG;
                        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {total}\r\n\r\n");
                        if s.write_all(head.as_bytes()).await.is_err() {
                            return;
                        }
                        let chunk = vec![b'b'; 64 * 1024];
                        let mut sent = 0;
                        while sent < total {
                            let n = chunk.len().min(total - sent);
                            if s.write_all(&chunk[..n]).await.is_err() {
                                return;
                            }
                            sent += n;
                            written.store(sent, Ordering::SeqCst);
                        }
                    }
                    "/cut" => {
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b")
                            .await;
                        return;
                    }
                    _ => {
                        let a = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{}",
                            path.len(),
                            path
                        );
                        if s.write_all(a.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    })
    .await
}

const BIG: usize = 128 * 1024 * 1024;

struct Bed {
    proxy: SocketAddr,
    seen: Arc<Seen>,
    written: Arc<AtomicUsize>,
    h: Harness,
}

/// Everything allowed but paths under `/denied`.
fn all_but_denied() -> HttpPolicy {
    HttpPolicy::compile(
        &[HttpRule {
            path: Some("/[^d].*".into()),
            ..Default::default()
        }],
        &SecretDir::new("/nonexistent"),
    )
    .unwrap()
}

/// The proxy in front of the backend; everything allowed but paths under `/denied`.
async fn bed() -> Bed {
    let seen = Arc::new(Seen::default());
    let written = Arc::new(AtomicUsize::new(0));
    let backend = start_backend(seen.clone(), written.clone()).await;
    let h = Harness::new();
    let policy = all_but_denied();
    let proxy = start_http_proxy(&h, backend, policy, |_| {}).await;
    Bed {
        proxy,
        seen,
        written,
        h,
    }
}

/// Everything the proxy sends until it closes the connection (within 5 s).
async fn until_closed(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    // (A reset after the answer is a close too.)
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("the proxy did not close the connection");
    String::from_utf8_lossy(&out).to_string()
}

/// Reads `n` responses with content-length bodies: (status line, body) each.
async fn responses(s: &mut TcpStream, n: usize) -> Vec<(String, String)> {
    let mut got = Vec::new();
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65536];
    while out.len() < n {
        loop {
            let text = String::from_utf8_lossy(&got).to_string();
            let Some((head, rest)) = text.split_once("\r\n\r\n") else {
                break;
            };
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if rest.len() < len {
                break;
            }
            out.push((
                head.lines().next().unwrap().to_string(),
                rest[..len].to_string(),
            ));
            got.drain(..head.len() + 4 + len);
            if out.len() == n {
                return out;
            }
        }
        let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("no answer");
        let k = r.unwrap();
        assert!(
            k > 0,
            "closed after {out:?} {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..k]);
    }
    out
}

/// Requests whose framing is ambiguous or invalid (RFC 9112 §6.1, §6.3: request smuggling),
/// or whose head uses obs-fold or a bare CR, are answered 400 and the connection closed;
/// nothing reaches the backend, and the proxy counts them as malformed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_or_invalid_requests_are_refused() {
    let b = bed().await;
    let cases: &[&[u8]] = &[
        b"POST /echo HTTP/1.1\r\nHost: b\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
        b"POST /echo HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        b"POST /echo HTTP/1.1\r\nHost: b\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        b"POST /echo HTTP/1.1\r\nHost: b\r\nContent-Length: 5, 6\r\n\r\nhello!",
        b"POST /echo HTTP/1.1\r\nHost: b\r\nContent-Length: +5\r\n\r\nhello",
        b"POST /echo HTTP/1.1\r\nHost: b\r\nContent-Length: 0x5\r\n\r\nhello",
        b"POST /echo HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        b"POST /echo HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: identity\r\n\r\nhello",
        b"POST /echo HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: b\r\nX-Folded: a\r\n b\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: b\r\nX-Bare: a\rb\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: b\r\nHost: c\r\n\r\n",
    ];
    for (i, case) in cases.iter().enumerate() {
        let mut s = TcpStream::connect(b.proxy).await.unwrap();
        s.write_all(case).await.unwrap();
        let text = until_closed(&mut s).await;
        assert!(
            text.starts_with("HTTP/1.1 400 ") && text.matches("HTTP/1.1").count() == 1,
            "case {i}: {text}"
        );
    }
    assert!(
        b.seen.heads.lock().unwrap().is_empty(),
        "{:?}",
        b.seen.heads
    );
    assert_eq!(
        b.h.events.stats().http.snapshot().malformed,
        cases.len() as u64
    );
    // A bad chunk inside a body: the request is cut off there, and the client gets a 400.
    let mut s = TcpStream::connect(b.proxy).await.unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n\r\n")
        .await
        .unwrap();
    let text = until_closed(&mut s).await;
    assert!(text.starts_with("HTTP/1.1 400 "), "{text}");
}

/// A head larger than the limit gets 431 and the connection is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_head_gets_431() {
    let b = bed().await;
    let mut s = TcpStream::connect(b.proxy).await.unwrap();
    let mut req = b"GET /a HTTP/1.1\r\nHost: b\r\nX-Big: ".to_vec();
    req.resize(100 * 1024, b'x');
    // The proxy may close before it has read all of it.
    let _ = s.write_all(&req).await;
    let text = until_closed(&mut s).await;
    assert!(text.starts_with("HTTP/1.1 431 "), "{text}");
    assert!(b.seen.heads.lock().unwrap().is_empty());
    // Just under the limit passes.
    let mut s = TcpStream::connect(b.proxy).await.unwrap();
    let mut req = b"GET /a HTTP/1.1\r\nHost: b\r\nX-Big: ".to_vec();
    req.resize(60 * 1024, b'x');
    req.extend_from_slice(b"\r\n\r\n");
    s.write_all(&req).await.unwrap();
    let got = responses(&mut s, 1).await;
    assert_eq!(got[0].0, "HTTP/1.1 200 OK");
}

/// `Expect: 100-continue`: the client gets a 100 (Continue) before it sends the body, then the
/// answer; a denied request gets its 403 without a 100, and the connection closes (the
/// client never sends the body).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_continue_gets_a_100_before_the_body() {
    let b = bed().await;
    let mut s = TcpStream::connect(b.proxy).await.unwrap();
    s.write_all(
        b"POST /echo HTTP/1.1\r\nHost: b\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
        .await
        .expect("no 100 (Continue) while the client waits")
        .unwrap();
    assert_eq!(&buf[..n], b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(b"hello").await.unwrap();
    let got = responses(&mut s, 1).await;
    assert_eq!(got[0], ("HTTP/1.1 200 OK".into(), "hello".into()));

    let mut s = TcpStream::connect(b.proxy).await.unwrap();
    s.write_all(
        b"POST /denied HTTP/1.1\r\nHost: b\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    let text = until_closed(&mut s).await;
    assert!(text.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{text}");
    assert!(!text.contains("100 Continue"), "{text}");
}

/// An HTTP/1.0 client gets HTTP/1.0 answers and its connection closed after each, unless it
/// asked to keep it; a chunked answer reaches it as plain data ended by the close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_clients_close_unless_they_ask() {
    let b = bed().await;
    let mut s = TcpStream::connect(b.proxy).await.unwrap();
    s.write_all(b"GET /old HTTP/1.0\r\n\r\n").await.unwrap();
    let text = until_closed(&mut s).await;
    assert!(text.starts_with("HTTP/1.0 200 OK\r\n"), "{text}");
    assert!(text.ends_with("\r\n\r\n/old"), "{text}");
    // Upstream, the request went as HTTP/1.1.
    assert!(b.seen.heads.lock().unwrap()[0].starts_with("GET /old HTTP/1.1"));

    let mut s = TcpStream::connect(b.proxy).await.unwrap();
    s.write_all(b"GET /one HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        .await
        .unwrap();
    let got = responses(&mut s, 1).await;
    assert_eq!(got[0], ("HTTP/1.0 200 OK".into(), "/one".into()));
    s.write_all(b"GET /two HTTP/1.0\r\n\r\n").await.unwrap();
    let text = until_closed(&mut s).await;
    assert!(
        text.starts_with("HTTP/1.0 200 OK\r\n") && text.ends_with("/two"),
        "{text}"
    );
}

/// A client that closes in the middle of its request body: the upstream connection is closed
/// too (the backend sees the body cut off, not a request completed by what follows), and the
/// proxy goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_closing_mid_body_closes_the_upstream() {
    let b = bed().await;
    let mut s = TcpStream::connect(b.proxy).await.unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: b\r\nContent-Length: 100000\r\n\r\nonly the start")
        .await
        .unwrap();
    // Let the start reach the backend before the close.
    for _ in 0..100 {
        if !b.seen.heads.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(s);
    for _ in 0..200 {
        if b.seen.incomplete_bodies.load(Ordering::SeqCst) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(b.seen.incomplete_bodies.load(Ordering::SeqCst), 1);
    let mut s = TcpStream::connect(b.proxy).await.unwrap();
    s.write_all(b"GET /after HTTP/1.1\r\nHost: b\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(responses(&mut s, 1).await[0].1, "/after");
}

/// An upstream that closes in the middle of its response body: the client's connection is
/// closed after what came (it cannot mistake the rest of the stream for the next answer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_closing_mid_body_closes_the_client() {
    let b = bed().await;
    let mut s = TcpStream::connect(b.proxy).await.unwrap();
    s.write_all(b"GET /cut HTTP/1.1\r\nHost: b\r\n\r\n")
        .await
        .unwrap();
    let text = until_closed(&mut s).await;
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.ends_with("\r\n\r\nonly ten b"), "{text}");
}

/// A client that does not read a large answer: the proxy stops reading from the upstream
/// instead of buffering the body (the backend can write only what the sockets' buffers
/// hold), and the whole body still arrives once the client reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_holds_the_upstream_back() {
    let b = bed().await;
    let mut s = TcpStream::connect(b.proxy).await.unwrap();
    s.write_all(b"GET /big HTTP/1.1\r\nHost: b\r\n\r\n")
        .await
        .unwrap();
    // Until the backend's writes stall.
    let mut last = usize::MAX;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = b.written.load(Ordering::SeqCst);
        if now == last && now > 0 {
            break;
        }
        last = now;
    }
    let stalled = b.written.load(Ordering::SeqCst);
    assert!(
        stalled < 32 * 1024 * 1024,
        "the backend wrote {stalled} bytes to a client that reads nothing"
    );
    let mut total = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    let mut head_done = false;
    let mut pending = Vec::new();
    while total < BIG {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("stalled")
            .unwrap();
        assert!(n > 0, "closed after {total}");
        if head_done {
            total += n;
        } else {
            pending.extend_from_slice(&buf[..n]);
            if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                head_done = true;
                total = pending.len() - end - 4;
            }
        }
    }
    assert_eq!(total, BIG);
}

/// Pipelined requests with bodies (content-length and chunked), and a denied one among them,
/// sent at once: answered in order, each body to its request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_with_bodies_are_answered_in_order() {
    let b = bed().await;
    let mut s = TcpStream::connect(b.proxy).await.unwrap();
    s.write_all(
        b"POST /echo HTTP/1.1\r\nHost: b\r\nContent-Length: 5\r\n\r\nfirstPOST /denied HTTP/1.1\r\nHost: b\r\nContent-Length: 6\r\n\r\nsecondPOST /echo HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nthi\r\n2\r\nrd\r\n0\r\n\r\nGET /fourth HTTP/1.1\r\nHost: b\r\n\r\n",
    )
    .await
    .unwrap();
    let got = responses(&mut s, 4).await;
    assert_eq!(
        got,
        [
            ("HTTP/1.1 200 OK".to_string(), "first".to_string()),
            (
                "HTTP/1.1 403 Forbidden".to_string(),
                "Access denied".to_string()
            ),
            ("HTTP/1.1 200 OK".to_string(), "third".to_string()),
            ("HTTP/1.1 200 OK".to_string(), "/fourth".to_string()),
        ]
    );
    // Each request as sent: the denied one's body was skipped, not taken for the start of the
    // next head.
    let heads = b.seen.heads.lock().unwrap().clone();
    let lines: Vec<&str> = heads.iter().map(|h| h.lines().next().unwrap()).collect();
    assert_eq!(
        lines,
        [
            "POST /echo HTTP/1.1",
            "POST /echo HTTP/1.1",
            "GET /fourth HTTP/1.1"
        ]
    );
    let c = b.h.events.stats().http.snapshot();
    assert_eq!((c.allowed, c.denied, c.connections), (3, 1, 1));
}

/// A close-delimited answer reaches an HTTP/1.1 client chunked, and its connection goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_delimited_answer_is_chunked_to_the_client() {
    let backend = serve_each(|mut s| async move {
        let seen = Seen::default();
        let mut buf = Vec::new();
        if read_request(&mut s, &mut buf, &seen).await.is_some() {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nX-Kept: 1\r\n\r\nuntil the end")
                .await;
        }
    })
    .await;
    let h = Harness::new();
    let proxy = start_http_proxy(&h, backend, HttpPolicy::allow_all(), |_| {}).await;
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.ends_with(b"0\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("HTTP/1.1 200 OK\r\nX-Kept: 1\r\ntransfer-encoding: chunked\r\n\r\n"),
        "{text}"
    );
    assert!(text.ends_with("\r\nuntil the end\r\n0\r\n\r\n"), "{text}");
    s.write_all(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n")
        .await
        .unwrap();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200 OK"),
        "the connection went on"
    );
}

/// An allowed request with a body whose upstream cannot be reached: its 502 closes the
/// connection, and its body (unread) is never taken for the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream_does_not_read_the_body_as_a_request() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let h = Harness::new();
    let policy = all_but_denied();
    let proxy = start_http_proxy(&h, dead, policy, |_| {}).await;
    let inner = b"GET /denied HTTP/1.1\r\nHost: b\r\n\r\n";
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let mut req = format!(
        "POST /echo HTTP/1.1\r\nHost: b\r\nContent-Length: {}\r\n\r\n",
        inner.len()
    )
    .into_bytes();
    req.extend_from_slice(inner);
    s.write_all(&req).await.unwrap();
    let text = until_closed(&mut s).await;
    assert!(text.starts_with("HTTP/1.1 502 "), "{text}");
    assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "{text}");
}

/// An absolute-form target without a path (`http://host?query`) is judged as the origin-form
/// target the upstream gets (`/?query`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_without_path_is_judged_as_forwarded() {
    let b = bed().await;
    let mut s = TcpStream::connect(b.proxy).await.unwrap();
    s.write_all(b"GET http://b?q=1 HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let got = responses(&mut s, 1).await;
    assert_eq!(got[0], ("HTTP/1.1 200 OK".into(), "/?q=1".into()));
}

/// A head that comes a few bytes at a time, split anywhere (within its final empty line too),
/// is served once it is whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_arriving_in_pieces_are_served() {
    let b = bed().await;
    let text = b"GET /piece HTTP/1.1\r\nHost: b\r\n\r\n";
    for size in [1, 2, 3] {
        let mut s = TcpStream::connect(b.proxy).await.unwrap();
        s.set_nodelay(true).unwrap();
        for piece in text.chunks(size) {
            s.write_all(piece).await.unwrap();
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        let got = responses(&mut s, 1).await;
        assert_eq!(
            got[0],
            ("HTTP/1.1 200 OK".into(), "/piece".into()),
            "{size}"
        );
    }
}

/// A denied request whose body never comes whole does not hold its connection open: the
/// skipping of its body counts as idle for the head timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_denied_body_times_out() {
    let backend = start_backend(Arc::new(Seen::default()), Arc::new(AtomicUsize::new(0))).await;
    let h = Harness::new();
    let policy = all_but_denied();
    let proxy = start_http_proxy(&h, backend, policy, |c| {
        c.header_read_timeout = Duration::from_millis(200);
    })
    .await;
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(b"POST /denied HTTP/1.1\r\nHost: b\r\nContent-Length: 100\r\n\r\nonly some")
        .await
        .unwrap();
    let text = until_closed(&mut s).await;
    assert!(text.starts_with("HTTP/1.1 403 "), "{text}");
}
