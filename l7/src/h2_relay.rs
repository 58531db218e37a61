//! HTTP/2 client connections (h2c, so gRPC): every stream judged by its head and relayed
//! onto one HTTP/2 connection to the upstream, on the `h2` crate directly.
//!
//! Why not hyper's HTTP/2 server and client: for each stream they spawn a task on each side
//! (the service future, the request body pipe, the response future) and hand the request
//! over a channel to the client connection's task; those spawns, moves and hand-overs cost
//! about half as much again as the HTTP/2 work itself (71.8k against 53.1k instructions per
//! request relayed, `bench/l7/instructions.sh` with PROTO=h2; the `h2` crate's framing,
//! HPACK and stream bookkeeping are now most of what is left). Here one task serves a
//! client connection: it accepts the streams and polls each stream's relay in place (a
//! `FuturesUnordered`, woken one by one), and one more task drives the upstream connection. What the protocol needs (HPACK,
//! SETTINGS, flow control, RST_STREAM, GOAWAY, CONTINUATION) stays the `h2` crate's.
//!
//! A stream's relay copies each direction frame by frame: DATA as it comes, a chunk read
//! only once the receiving side has capacity for more (so at most a frame per stream waits
//! in the proxy, the rest is held back by flow control), its flow-control window released
//! upstream as the chunk is passed on, then the trailers or the end of the stream. A reset on
//! one side resets the other (with the same reason when the peer gave one); a stream whose
//! upstream request fails before a response gets 502, as an HTTP/1.1 request would.

use std::future::{poll_fn, Future};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex, PoisonError};
use std::task::Poll;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use h2::client::{self, ResponseFuture, SendRequest};
use h2::server::{self, SendResponse};
use h2::{Reason, RecvStream, SendStream};
use http::header::{self, HeaderValue};
use http::{Request, Response};
use tokio::io::{AsyncRead, AsyncWrite};

#[path = "h2/frame.rs"]
#[cfg_attr(not(test), allow(dead_code))]
mod frame;
#[path = "h2/hpack.rs"]
#[cfg_attr(not(test), allow(dead_code))]
mod hpack;
#[path = "h2/huffman.rs"]
#[cfg_attr(not(test), allow(dead_code))]
mod huffman;
#[path = "h2/relay.rs"]
#[allow(dead_code)]
mod relay;

pub(super) use relay::H2Failure;

use super::{
    strip_hop_by_hop, strip_hop_by_hop_present, Body, BodyKind, Conn, Judged, UpstreamError,
    HOP_ANY,
};

// Settings as hyper's HTTP/2 server and client had them (the proxy's behaviour towards
// clients and upstreams stays as it was).
const SERVER_STREAM_WINDOW: u32 = 1024 * 1024;
const SERVER_CONN_WINDOW: u32 = 1024 * 1024;
const SERVER_MAX_SEND_BUF: usize = 400 * 1024;
const SERVER_MAX_CONCURRENT_STREAMS: u32 = 200;
const CLIENT_STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CLIENT_CONN_WINDOW: u32 = 5 * 1024 * 1024;
const CLIENT_MAX_SEND_BUF: usize = 1024 * 1024;
const CLIENT_INITIAL_MAX_SEND_STREAMS: usize = 100;
const MAX_FRAME_SIZE: u32 = 16 * 1024;
const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;

/// A client connection's HTTP/2 connection to its upstream, opened by its first allowed
/// stream and opened again by the next one after it closed.
#[derive(Default)]
pub(super) struct UpstreamSlot {
    /// The one in use (a plain mutex: held only to look or to put one in).
    ready: StdMutex<Option<Upstream>>,
    /// Held while connecting, so concurrent first streams share one connection.
    connecting: tokio::sync::Mutex<()>,
}

struct Upstream {
    sender: SendRequest<Bytes>,
    /// Set when its connection task ended.
    closed: Arc<AtomicBool>,
}

impl UpstreamSlot {
    /// A handle on the connection in use, and its closed flag.
    fn current(&self) -> Option<(SendRequest<Bytes>, Arc<AtomicBool>)> {
        let ready = self.ready.lock().unwrap_or_else(PoisonError::into_inner);
        ready
            .as_ref()
            .filter(|u| !u.closed.load(Ordering::Relaxed))
            .map(|u| (u.sender.clone(), u.closed.clone()))
    }
}

/// Serves one client connection that opened with the HTTP/2 preface.
pub(super) async fn serve<IO>(conn: Arc<Conn>, io: IO)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = server::Builder::new();
    builder
        .initial_window_size(SERVER_STREAM_WINDOW)
        .initial_connection_window_size(SERVER_CONN_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESET_STREAMS))
        .max_send_buffer_size(SERVER_MAX_SEND_BUF)
        .max_concurrent_streams(SERVER_MAX_CONCURRENT_STREAMS);
    let mut server = match builder.handshake::<_, Bytes>(io).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(src = %conn.src, error = %e, "http proxy: http/2 handshake failed");
            return;
        }
    };
    let mut streams = FuturesUnordered::new();
    let result = poll_fn(|cx| {
        loop {
            // The streams first: what they send is written by the connection's poll below.
            while let Poll::Ready(Some(())) = streams.poll_next_unpin(cx) {}
            let mut accepted = false;
            loop {
                match server.poll_accept(cx) {
                    Poll::Ready(Some(Ok((req, respond)))) => {
                        streams.push(relay(conn.clone(), req, respond));
                        accepted = true;
                    }
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                    // Closed: streams still here cannot send anything any more.
                    Poll::Ready(None) => return Poll::Ready(Ok(())),
                    Poll::Pending => break,
                }
            }
            if !accepted {
                return Poll::Pending;
            }
        }
    })
    .await;
    if let Err(e) = result {
        tracing::debug!(src = %conn.src, error = %e, "http proxy: http/2 connection ended with an error");
    }
}

/// One stream: judged, then relayed upstream or answered here.
async fn relay(conn: Arc<Conn>, req: Request<RecvStream>, mut respond: SendResponse<Bytes>) {
    let (parts, body) = req.into_parts();
    let mut head = Request::from_parts(parts, ());
    let allowed = match conn.judge(&mut head, true) {
        Judged::Denied(resp) => return send_local(&mut respond, resp),
        Judged::Allowed(a) => a,
    };
    // Hop-by-hop headers go (h2 refuses the connection-specific ones from the client, so
    // these are Proxy-Authorization and the like, or what header actions added).
    if allowed.hop & HOP_ANY != 0 {
        strip_hop_by_hop_present(head.headers_mut(), allowed.hop);
    }
    let end = body.is_end_stream();
    let (response, request_tx) = match send_request(&conn, head, end).await {
        Ok(sent) => sent,
        Err(e) => return send_local(&mut respond, conn.upstream_failed(allowed, &e)),
    };
    let request_body = async {
        if !end {
            pump(body, request_tx).await;
        }
    };
    let response = async {
        // The response, unless the client gives up on the stream first (dropping the
        // upstream's handles then resets the upstream stream).
        let mut response = response;
        let resp = poll_fn(|cx| {
            if let Poll::Ready(r) = std::pin::Pin::new(&mut response).poll(cx) {
                return Poll::Ready(Some(r));
            }
            respond.poll_reset(cx).map(|_| None)
        })
        .await;
        match resp {
            Some(Ok(resp)) => {
                conn.allowed(allowed, resp.status().as_u16());
                let (mut parts, rx) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                // RFC 9110 §6.6.1: a response forwarded without a Date gets one.
                if !parts.headers.contains_key(header::DATE) {
                    parts.headers.insert(header::DATE, date_now());
                }
                let end = rx.is_end_stream();
                match respond.send_response(Response::from_parts(parts, ()), end) {
                    Ok(tx) if !end => pump(rx, tx).await,
                    Ok(_) => {}
                    Err(e) => tracing::debug!(error = %e, "http proxy: sending an http/2 response"),
                }
            }
            Some(Err(e)) => {
                let resp = conn.upstream_failed(allowed, &UpstreamError::H2(e));
                send_local(&mut respond, resp);
            }
            None => {}
        }
    };
    tokio::join!(request_body, response);
}

/// Sends the request's head upstream, on the connection in use or a new one. A connection
/// found unusable before the request went out is replaced once.
async fn send_request(
    conn: &Conn,
    head: Request<()>,
    end: bool,
) -> Result<(ResponseFuture, SendStream<Bytes>), UpstreamError> {
    let (mut sender, closed) = match conn.h2.current() {
        Some(s) => s,
        None => connect(conn).await?,
    };
    if let Err(e) = poll_fn(|cx| sender.poll_ready(cx)).await {
        tracing::debug!(error = %e, "http proxy: upstream http/2 connection unusable");
        // Its task may still run (a GOAWAY lets open streams finish); new streams go to a
        // new connection.
        closed.store(true, Ordering::Relaxed);
        (sender, _) = connect(conn).await?;
        poll_fn(|cx| sender.poll_ready(cx))
            .await
            .map_err(UpstreamError::H2)?;
    }
    sender.send_request(head, end).map_err(UpstreamError::H2)
}

/// Opens the upstream connection unless another stream did meanwhile.
async fn connect(conn: &Conn) -> Result<(SendRequest<Bytes>, Arc<AtomicBool>), UpstreamError> {
    let _connecting = conn.h2.connecting.lock().await;
    if let Some(s) = conn.h2.current() {
        return Ok(s);
    }
    let io = conn.connect_boxed().await?;
    let mut builder = client::Builder::new();
    builder
        .initial_max_send_streams(CLIENT_INITIAL_MAX_SEND_STREAMS)
        .initial_window_size(CLIENT_STREAM_WINDOW)
        .initial_connection_window_size(CLIENT_CONN_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .max_send_buffer_size(CLIENT_MAX_SEND_BUF)
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESET_STREAMS))
        .enable_push(false);
    let (sender, connection) = builder
        .handshake::<_, Bytes>(io)
        .await
        .map_err(|e| UpstreamError::H2Handshake(conn.dst, e))?;
    let closed = Arc::new(AtomicBool::new(false));
    let done = closed.clone();
    // Ends when the upstream closes it, or once no handle and no stream is left (the client
    // connection and its streams gone).
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "http proxy: upstream http/2 connection ended");
        }
        done.store(true, Ordering::Relaxed);
    });
    *conn.h2.ready.lock().unwrap_or_else(PoisonError::into_inner) = Some(Upstream {
        sender: sender.clone(),
        closed: closed.clone(),
    });
    Ok((sender, closed))
}

/// Copies one direction of a stream from `rx` to `tx`: DATA, then trailers or the end. A
/// reset of `tx` ends it (dropping `rx` then resets its side); an error on `rx` resets `tx`.
async fn pump(mut rx: RecvStream, mut tx: SendStream<Bytes>) {
    loop {
        let next = poll_fn(|cx| match rx.poll_data(cx) {
            Poll::Ready(d) => Poll::Ready(Some(d)),
            Poll::Pending => tx.poll_reset(cx).map(|_| None),
        })
        .await;
        let Some(next) = next else { return };
        match next {
            Some(Ok(data)) => {
                let len = data.len();
                // Known ended (no trailers waiting): the last DATA frame carries the end.
                let end = rx.is_end_stream();
                if let Err(e) = tx.send_data(data, end) {
                    tracing::debug!(error = %e, "http proxy: relaying http/2 data");
                    return;
                }
                // Passed on: the sender may send that much more.
                let _ = rx.flow_control().release_capacity(len);
                if end {
                    return;
                }
                // The next chunk only once this one fits the receiver's window (h2 holds
                // what does not yet; its capacity counts that).
                tx.reserve_capacity(1);
                if tx.capacity() == 0 {
                    match poll_fn(|cx| tx.poll_capacity(cx)).await {
                        Some(Ok(_)) => {}
                        Some(Err(_)) | None => return,
                    }
                }
            }
            Some(Err(e)) => return tx.send_reset(reason(&e)),
            None => {
                match poll_fn(|cx| rx.poll_trailers(cx)).await {
                    Ok(Some(trailers)) => {
                        if let Err(e) = tx.send_trailers(trailers) {
                            tracing::debug!(error = %e, "http proxy: relaying http/2 trailers");
                        }
                    }
                    Ok(None) => {
                        let _ = tx.send_data(Bytes::new(), true);
                    }
                    Err(e) => tx.send_reset(reason(&e)),
                }
                return;
            }
        }
    }
}

/// The reason to reset the other side of a stream with after `e` on one side: the peer's
/// when it reset the stream, else INTERNAL_ERROR.
fn reason(e: &h2::Error) -> Reason {
    e.reason().unwrap_or(Reason::INTERNAL_ERROR)
}

/// Sends an answer made by the proxy (denial, 502).
fn send_local(respond: &mut SendResponse<Bytes>, resp: Response<Body>) {
    let (mut parts, body) = resp.into_parts();
    let data = match body.kind {
        BodyKind::Local(data) => data,
        _ => None,
    };
    if let Some(d) = &data {
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(d.len()));
    }
    parts.headers.insert(header::DATE, date_now());
    match respond.send_response(Response::from_parts(parts, ()), data.is_none()) {
        // A short message: h2 holds it until the window lets it go.
        Ok(mut tx) => {
            if let Some(d) = data {
                let _ = tx.send_data(d, true);
            }
        }
        Err(e) => tracing::debug!(error = %e, "http proxy: answering an http/2 stream"),
    }
}

/// The Date header value for now (the text made once a second per thread).
fn date_now() -> HeaderValue {
    thread_local! {
        static LAST: std::cell::RefCell<(u64, HeaderValue)> =
            const { std::cell::RefCell::new((u64::MAX, HeaderValue::from_static(""))) };
    }
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        if last.0 != secs {
            let text = httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(secs));
            *last = (secs, HeaderValue::from_str(&text).expect("ASCII date"));
        }
        last.1.clone()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn date_is_this_second_as_an_http_date() {
        let before = SystemTime::now() - Duration::from_secs(1);
        let text = date_now();
        let at = httpdate::parse_http_date(text.to_str().unwrap()).unwrap();
        assert!(at >= before && at <= SystemTime::now(), "{text:?}");
    }
}
