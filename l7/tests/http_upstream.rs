//! The HTTP proxy's HTTP/1.1 upstream side against a backend that writes its answers by hand:
//! every way a response body can be framed, informational heads, and when the upstream
//! connection is reused, given up or replaced.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use l7::{HttpPolicy, HttpProxyConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::*;

/// Reads one request (head, and a content-length or chunked body) from `s` into `buf`;
/// `None` at the end of the stream.
async fn read_request(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(String, Vec<u8>)> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            buf.drain(..end + 4);
            let lower = head.to_ascii_lowercase();
            let mut body = Vec::new();
            if let Some(l) = lower
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
            {
                let n: usize = l.trim().parse().unwrap();
                while buf.len() < n {
                    let mut more = [0u8; 4096];
                    let got = s.read(&mut more).await.unwrap();
                    assert!(got > 0, "closed within a body");
                    buf.extend_from_slice(&more[..got]);
                }
                body = buf.drain(..n).collect();
            } else if lower.contains("transfer-encoding: chunked") {
                // The whole chunked body, undecoded (up to the last chunk and the final CRLF).
                loop {
                    if let Some(end) = buf.windows(5).position(|w| w == b"0\r\n\r\n") {
                        body = buf.drain(..end + 5).collect();
                        break;
                    }
                    let mut more = [0u8; 4096];
                    let got = s.read(&mut more).await.unwrap();
                    assert!(got > 0, "closed within a chunked body");
                    buf.extend_from_slice(&more[..got]);
                }
            }
            return Some((head, body));
        }
        let mut more = [0u8; 4096];
        let got = s.read(&mut more).await.ok()?;
        if got == 0 {
            return None;
        }
        buf.extend_from_slice(&more[..got]);
    }
}

/// A backend answering by the request path; counts the connections it accepted.
async fn start_backend() -> (SocketAddr, Arc<AtomicUsize>) {
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let addr = serve_each(move |mut s| {
        count.fetch_add(1, Ordering::SeqCst);
        async move {
                let mut buf = Vec::new();
                while let Some((head, body)) = read_request(&mut s, &mut buf).await {
                    let path = head.split(' ').nth(1).unwrap_or("").to_string();
                    let answer: Vec<u8> = match path.as_str() {
                        "/length" => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
                        "/chunked" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-sum\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\nx-sum: 11\r\n\r\n".to_vec(),
                        "/informational" => b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal".to_vec(),
                        "/head" => b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n".to_vec(),
                        "/empty" => b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(),
                        "/echo" => {
                            let mut a = format!(
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                                body.len()
                            )
                            .into_bytes();
                            a.extend_from_slice(&body);
                            a
                        }
                        "/until-close" | "/bye" | "/stale" => {
                            let a: &[u8] = match path.as_str() {
                                "/until-close" => b"HTTP/1.1 200 OK\r\n\r\nuntil the end",
                                "/bye" => b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nbye",
                                _ => b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale",
                            };
                            let _ = s.write_all(a).await;
                            // The server closes (after /stale without saying so).
                            return;
                        }
                        "/slow" => {
                            tokio::time::sleep(std::time::Duration::from_millis(600)).await;
                            b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow".to_vec()
                        }
                        "/bad-length" => {
                            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok"
                                .to_vec()
                        }
                        _ => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec(),
                    };
                    if s.write_all(&answer).await.is_err() {
                        return;
                    }
                }
        }
    })
    .await;
    (addr, accepted)
}

async fn start_proxy(h: &Harness, backend: SocketAddr) -> SocketAddr {
    start_proxy_with(h, backend, |_| {}).await
}

async fn start_proxy_with(
    h: &Harness,
    backend: SocketAddr,
    tune: impl FnOnce(&mut HttpProxyConfig),
) -> SocketAddr {
    start_http_proxy(h, backend, HttpPolicy::allow_all(), tune).await
}

struct Answer {
    status: u16,
    body: Bytes,
    trailers: Option<http::HeaderMap>,
    headers: http::HeaderMap,
}

/// One keep-alive client connection to the proxy.
struct Client(hyper::client::conn::http1::SendRequest<Full<Bytes>>);

impl Client {
    async fn connect(proxy: SocketAddr) -> Client {
        let s = TcpStream::connect(proxy).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
            .await
            .unwrap();
        tokio::spawn(conn);
        Client(sender)
    }

    async fn ask(&mut self, method: &str, path: &str, body: &'static [u8]) -> Answer {
        self.0.ready().await.unwrap();
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "backend")
            .header("te", "trailers")
            .body(Full::new(Bytes::from_static(body)))
            .unwrap();
        let r = self.0.send_request(req).await.unwrap();
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let collected = r.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned();
        Answer {
            status,
            body: collected.to_bytes(),
            trailers,
            headers,
        }
    }
}

/// Bodies of every framing come through whole, on one upstream connection while the backend
/// keeps it alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_bodies_of_every_framing_pass_and_the_connection_is_reused() {
    let (backend, accepted) = start_backend().await;
    let h = Harness::new();
    let proxy = start_proxy(&h, backend).await;
    let mut c = Client::connect(proxy).await;

    let a = c.ask("GET", "/length", b"").await;
    assert_eq!((a.status, &a.body[..]), (200, &b"ok"[..]));
    let a = c.ask("GET", "/chunked", b"").await;
    assert_eq!((a.status, &a.body[..]), (200, &b"hello world"[..]));
    assert_eq!(a.trailers.unwrap().get("x-sum").unwrap(), "11");
    let a = c.ask("GET", "/informational", b"").await;
    assert_eq!((a.status, &a.body[..]), (200, &b"final"[..]));
    let a = c.ask("HEAD", "/head", b"").await;
    assert_eq!(a.status, 200);
    assert!(a.body.is_empty());
    assert_eq!(a.headers.get("content-length").unwrap(), "5");
    let a = c.ask("GET", "/empty", b"").await;
    assert_eq!((a.status, a.body.len()), (204, 0));
    let a = c.ask("POST", "/echo", b"a body of some length").await;
    assert_eq!(
        (a.status, &a.body[..]),
        (200, &b"a body of some length"[..])
    );
    let a = c.ask("GET", "/length", b"").await;
    assert_eq!((a.status, &a.body[..]), (200, &b"ok"[..]));
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "one upstream connection"
    );
}

/// A chunked upload is sent upstream chunked, and its answer comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_upload_goes_upstream_chunked() {
    let (backend, _) = start_backend().await;
    let h = Harness::new();
    let proxy = start_proxy(&h, backend).await;
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(
        b"POST /echo HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n3\r\nefg\r\n0\r\n\r\n",
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&got).contains("0\r\n\r\n") {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got).to_string();
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    // The backend echoes the body as it arrived: chunked, the chunks as sent.
    assert!(
        text.contains("4\r\nabcd\r\n3\r\nefg\r\n0\r\n\r\n"),
        "{text}"
    );
}

/// A connection the backend closes (saying so, by framing the body until the close, or without
/// notice between two requests) is not used again: the next request gets a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_upstream_connections_are_replaced() {
    let (backend, accepted) = start_backend().await;
    let h = Harness::new();
    let proxy = start_proxy(&h, backend).await;
    let mut c = Client::connect(proxy).await;
    let a = c.ask("GET", "/bye", b"").await;
    assert_eq!((a.status, &a.body[..]), (200, &b"bye"[..]));
    let a = c.ask("GET", "/until-close", b"").await;
    assert_eq!((a.status, &a.body[..]), (200, &b"until the end"[..]));
    let a = c.ask("GET", "/stale", b"").await;
    assert_eq!((a.status, &a.body[..]), (200, &b"stale"[..]));
    // Whether or not the close was seen before: the request is answered.
    let a = c.ask("GET", "/length", b"").await;
    assert_eq!((a.status, &a.body[..]), (200, &b"ok"[..]));
    assert_eq!(accepted.load(Ordering::SeqCst), 4);
}

/// A malformed upstream answer is a 502 for that request; the client keeps its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_upstream_answer_is_bad_gateway() {
    let (backend, _) = start_backend().await;
    let h = Harness::new();
    let proxy = start_proxy(&h, backend).await;
    let mut c = Client::connect(proxy).await;
    let a = c.ask("GET", "/bad-length", b"").await;
    assert_eq!(a.status, 502);
    let a = c.ask("GET", "/length", b"").await;
    assert_eq!((a.status, &a.body[..]), (200, &b"ok"[..]));
    assert_eq!(h.events.stats().http.snapshot().upstream_errors, 1);
}

/// The head timeout: a client that sends no complete head (nothing, or part of one) within it
/// is disconnected, and so is a keep-alive connection left idle; a request whose answer takes
/// longer is not cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_timeout_closes_idle_and_slow_clients_only() {
    use std::time::{Duration, Instant};
    let (backend, _) = start_backend().await;
    let h = Harness::new();
    let timeout = Duration::from_millis(200);
    let proxy = start_proxy_with(&h, backend, |c| c.header_read_timeout = timeout).await;
    async fn closed_after(s: &mut TcpStream) -> Duration {
        let start = Instant::now();
        let mut buf = [0u8; 256];
        loop {
            match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return start.elapsed(),
                Ok(Ok(_)) => continue,
                Err(_) => panic!("not closed"),
            }
        }
    }
    // Nothing sent.
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let t = closed_after(&mut s).await;
    assert!(t >= timeout - Duration::from_millis(20), "{t:?}");
    // Part of a head.
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(b"GET /length HTTP/1.1\r\nHost: b\r\n")
        .await
        .unwrap();
    let t = closed_after(&mut s).await;
    assert!(t >= timeout - Duration::from_millis(20), "{t:?}");
    // An answer slower than the timeout comes through, then the idle connection is closed.
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(b"GET /slow HTTP/1.1\r\nHost: b\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !got.ends_with(b"slow") {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 200 OK"));
    let t = closed_after(&mut s).await;
    assert!(t >= timeout - Duration::from_millis(20), "{t:?}");
}
