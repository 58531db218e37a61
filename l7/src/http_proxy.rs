//! The HTTP proxy: HTTP/1.1 and HTTP/2 (h2c, so gRPC) on one listener, every request judged
//! on its own against the rules in force when it arrives.
//!
//! A connection's first bytes tell the protocol: the HTTP/2 preface (prior knowledge, as gRPC
//! clients and `curl --http2-prior-knowledge` send it) goes to `h2_relay`, anything else is
//! HTTP/1.x and goes to `h1_relay`. Each is a relay of our own: one task per client
//! connection owning the client socket and the connection's upstream connection to the
//! original destination (HTTP/1.1 for HTTP/1.x, HTTP/2 for HTTP/2), opened on first use and
//! reopened if the upstream closed it.
//!
//! HTTP/1.x (`h1_relay`): requests on a connection are served one after the other, so
//! pipelined requests are answered in order and a denied one is answered in its place. A
//! request head is parsed by httparse into views of the bytes as they came, judged on them,
//! and forwarded as those bytes less the hop-by-hop fields (and those the Connection field
//! names), with the header actions applied and an absolute-form target made origin-form; the
//! response head likewise (hop-by-hop fields left out). Bodies are relayed by their framing
//! (content-length, chunked chunk by chunk with trailers, until the upstream closes; none for
//! HEAD, 204, 304 and 1xx) through buffers of the connection's own that hold one read, so
//! nothing is buffered whole. The framing rules are held strictly (both Content-Length and
//! Transfer-Encoding, differing lengths, a last coding other than chunked, obs-fold, bare CR:
//! 400 and close): a relay that frames a body differently from its upstream lets requests be
//! smuggled past the rules. An upgrade (WebSocket and the like) or CONNECT that the rules and
//! `allow_upgrades` allow is handed, with the bytes read so far, to hyper's server, which
//! switches protocols and copies the bytes both ways; for that one exchange only.
//!
//! Why relays of our own: the proxy sits in the path of every request it judges, and with
//! hyper's HTTP/1.1 server most of its cost per request was hyper's (its dispatcher, a header
//! map built for each request and response, URI objects, the hand-over of each request and
//! body between state machines: 19.5k instructions per request relayed to nginx,
//! `bench/l7/instructions.sh`; see `h1_relay` for the figures now); HTTP/2 on the `h2` crate
//! cost 3.5 times what its relay costs now (see `h2_relay`). The strings of an event are built only while a `monitor` client listens.
//!
//! Denied: 403 with the configured message; a gRPC call (content-type `application/grpc*`)
//! gets HTTP 200 with `grpc-status: 7` (PERMISSION_DENIED) in a trailers-only response, so
//! the client sees a clean RPC error and other streams of the connection go on.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1 as client1;
use hyper::server::conn::http1 as server1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;

use crate::error::L7Error;
use crate::events::{EventSink, L7Event, L7EventKind, L7Protocol, L7Verdict, ProtocolStats};
use crate::http_rules::{HeaderAction, HttpDecision, HttpPolicy, HttpRequestView};
use crate::net::{self, ConnectionWorkers, ProxyMode};
use crate::policy::{FlowKey, L7PolicySource, Redirect};

#[path = "h1_relay.rs"]
mod h1_relay;
#[path = "h2_relay.rs"]
mod h2_relay;

/// The body of an answer to the client through hyper's server (an upgrade) or the HTTP/2
/// relay: the upstream's, streamed through, or one the proxy made (403, 502). An enum rather
/// than a boxed body: no allocation per response.
enum BodyKind {
    Upstream(Incoming),
    Local(Option<Bytes>),
}

struct Body {
    kind: BodyKind,
    /// Marks the request's exchange as over when the body is dropped (written, or given up).
    _done: Option<Exchange>,
}

impl Body {
    fn local(b: Bytes) -> Body {
        Body::of(BodyKind::Local((!b.is_empty()).then_some(b)))
    }

    fn of(kind: BodyKind) -> Body {
        Body { kind, _done: None }
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match &mut self.get_mut().kind {
            BodyKind::Upstream(b) => Pin::new(b).poll_frame(cx),
            BodyKind::Local(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            BodyKind::Upstream(b) => b.is_end_stream(),
            BodyKind::Local(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            BodyKind::Upstream(b) => b.size_hint(),
            BodyKind::Local(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}

/// What the client side of an HTTP/1.x connection is doing, for its head timeout: how many
/// request exchanges started and ended (a change means activity) and how many are under way
/// (from the head until the response is written).
#[derive(Default)]
struct Activity {
    changes: AtomicU64,
    under_way: AtomicUsize,
}

impl Activity {
    fn start(self: &Arc<Self>) -> Exchange {
        self.changes.fetch_add(1, Ordering::Relaxed);
        self.under_way.fetch_add(1, Ordering::Relaxed);
        Exchange(self.clone())
    }
}

/// One request's exchange under way (see [`Activity`]).
struct Exchange(Arc<Activity>);

impl Drop for Exchange {
    fn drop(&mut self) {
        self.0.under_way.fetch_sub(1, Ordering::Relaxed);
        self.0.changes.fetch_add(1, Ordering::Relaxed);
    }
}

/// Ends when an HTTP/1.x client has been idle or sending a request head for `timeout` (at
/// most a quarter more): nothing under way and no exchange started or ended meanwhile. One
/// timer per connection rather than hyper's header read timeout, which arms a timer for every
/// request (a tenth of the proxy's cost per request).
async fn head_timeout(activity: &Activity, timeout: Duration) {
    const TICKS: u32 = 4;
    let tick = (timeout / TICKS).max(Duration::from_millis(1));
    let mut seen = activity.changes.load(Ordering::Relaxed);
    let mut idle_ticks = 0;
    loop {
        tokio::time::sleep(tick).await;
        let now = activity.changes.load(Ordering::Relaxed);
        if now != seen || activity.under_way.load(Ordering::Relaxed) > 0 {
            seen = now;
            idle_ticks = 0;
            continue;
        }
        // Idle since at most one tick before the first idle tick.
        idle_ticks += 1;
        if idle_ticks > TICKS {
            return;
        }
    }
}

/// The connection preface of an HTTP/2 client (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How much the first read of a connection may take: the buffer it reads into becomes the
/// HTTP/1.x relay's read buffer.
const FIRST_READ: usize = 16 * 1024;

/// The client's connection with the bytes read so far put back in front (those read to tell
/// HTTP/1.x from HTTP/2, or those of an upgrade request handed to hyper's server).
struct Rewound<IO> {
    head: Vec<u8>,
    /// `head[pos..len]` is still to be read.
    pos: usize,
    len: usize,
    io: IO,
}

impl<IO> Rewound<IO> {
    fn from_parts(head: Vec<u8>, pos: usize, len: usize, io: IO) -> Rewound<IO> {
        Rewound { head, pos, len, io }
    }

    /// The buffer (with `head[pos..len]` unread) and the connection.
    fn into_parts(self) -> (Vec<u8>, usize, usize, IO) {
        (self.head, self.pos, self.len, self.io)
    }
}

impl<IO: AsyncRead + Unpin> Rewound<IO> {
    /// Reads until the bytes are the HTTP/2 preface or cannot be: whether they are, and the
    /// connection to read on (nothing to read when it ended before the first byte). The first
    /// read takes what the client sent (most often a whole request).
    async fn sniff(mut io: IO) -> std::io::Result<(bool, Rewound<IO>)> {
        use tokio::io::AsyncReadExt;
        let mut head = vec![0u8; FIRST_READ];
        let mut len = 0;
        while len < H2_PREFACE.len() {
            let n = io.read(&mut head[len..]).await?;
            if n == 0 {
                break;
            }
            len += n;
            let seen = len.min(H2_PREFACE.len());
            if head[..seen] != H2_PREFACE[..seen] {
                break;
            }
        }
        let is_h2 = len >= H2_PREFACE.len() && head[..H2_PREFACE.len()] == *H2_PREFACE;
        Ok((is_h2, Rewound::from_parts(head, 0, len, io)))
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Rewound<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.len {
            let rest = &this.head[this.pos..this.len];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.pos += n;
            if this.pos == this.len {
                this.head = Vec::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Rewound<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Configuration of one HTTP proxy listener.
#[derive(Debug, Clone)]
pub struct HttpProxyConfig {
    pub listen: SocketAddr,
    pub mode: ProxyMode,
    /// Body of the 403 answer (and `grpc-message` of a denied gRPC call).
    pub denied_message: String,
    /// Whether `Upgrade` (WebSocket and the like) and `CONNECT` may pass when the rules allow
    /// the request. Off: such requests are denied, since what follows an upgrade is not HTTP
    /// and could not be judged.
    pub allow_upgrades: bool,
    /// How long an HTTP/1.x client may take to send a request head, counted from the
    /// connection's start or the end of the previous exchange (so also how long a keep-alive
    /// connection may stay idle); checked a quarter of it at a time, so up to 1.25 times this.
    pub header_read_timeout: Duration,
    pub connect_timeout: Duration,
}

impl HttpProxyConfig {
    pub fn new(listen: SocketAddr, mode: ProxyMode) -> Self {
        HttpProxyConfig {
            listen,
            mode,
            denied_message: "Access denied".to_string(),
            allow_upgrades: false,
            header_read_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

struct Shared {
    cfg: HttpProxyConfig,
    /// `cfg.denied_message`, ready to send without copying.
    denied_body: Bytes,
    policy: Arc<dyn L7PolicySource>,
    events: EventSink,
    /// The listener's own address (to refuse connections made to it directly in transparent
    /// mode: they have no other destination and would loop).
    local: SocketAddr,
}

/// Serves HTTP connections however they were accepted. Cheap to clone.
#[derive(Clone)]
pub struct HttpProxyService {
    shared: Arc<Shared>,
}

/// A bound HTTP proxy listener.
pub struct HttpProxy {
    listener: TcpListener,
    service: HttpProxyService,
}

impl HttpProxy {
    /// Binds the listener (with `IP_TRANSPARENT` in transparent mode). Call within a Tokio
    /// runtime.
    pub fn bind(
        cfg: HttpProxyConfig,
        policy: Arc<dyn L7PolicySource>,
        events: EventSink,
    ) -> Result<HttpProxy, L7Error> {
        let listener =
            net::bind_listener(cfg.listen, cfg.mode.is_transparent()).map_err(|source| {
                L7Error::Bind {
                    addr: cfg.listen,
                    source,
                }
            })?;
        let local = listener.local_addr().map_err(|source| L7Error::Io {
            what: "reading the listener's address",
            source,
        })?;
        Ok(HttpProxy {
            listener,
            service: HttpProxyService::with_local(cfg, policy, events, local),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.service.shared.local
    }

    pub fn service(&self) -> HttpProxyService {
        self.service.clone()
    }

    /// Accepts connections until the task is dropped, serving each on a task of the current
    /// runtime.
    pub async fn run(self) {
        self.run_on_workers(None).await
    }

    /// Accepts connections until the task is dropped, serving each on the least busy of
    /// `workers` (see [`ConnectionWorkers`] for why), or on the current runtime when `None`.
    pub async fn run_on_workers(self, workers: Option<Arc<ConnectionWorkers>>) {
        let mode = self.service.shared.cfg.mode;
        let svc = self.service;
        net::accept_loop_on(
            self.listener,
            mode,
            "http",
            workers,
            move |stream, src, dst| {
                let svc = svc.clone();
                async move { svc.serve(stream, src, dst).await }
            },
        )
        .await
    }
}

impl HttpProxyService {
    /// A service without a listener (the caller accepts connections itself).
    pub fn new(
        cfg: HttpProxyConfig,
        policy: Arc<dyn L7PolicySource>,
        events: EventSink,
    ) -> HttpProxyService {
        let local = cfg.listen;
        Self::with_local(cfg, policy, events, local)
    }

    fn with_local(
        cfg: HttpProxyConfig,
        policy: Arc<dyn L7PolicySource>,
        events: EventSink,
        local: SocketAddr,
    ) -> HttpProxyService {
        HttpProxyService {
            shared: Arc::new(Shared {
                denied_body: Bytes::from(cfg.denied_message.clone()),
                cfg,
                policy,
                events,
                local,
            }),
        }
    }

    fn stats(&self) -> &ProtocolStats {
        &self.shared.events.stats().http
    }

    /// Serves one client connection whose requests go to `dst`. The returned future also
    /// drives the connection's upstream connection, so a request and its response stay on
    /// one task.
    pub async fn serve<IO>(&self, io: IO, src: SocketAddr, dst: SocketAddr)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        ProtocolStats::bump(&self.stats().connections);
        if self.shared.cfg.mode.is_transparent() && is_self(dst, self.shared.local) {
            tracing::debug!(%src, "http proxy: refusing a connection made to the proxy itself");
            return;
        }
        let timeout = self.shared.cfg.header_read_timeout;
        let (is_h2, io) = match tokio::time::timeout(timeout, Rewound::sniff(io)).await {
            Ok(Ok(sniffed)) => sniffed,
            Ok(Err(e)) => {
                tracing::debug!(%src, error = %e, "http proxy: connection failed before a request");
                return;
            }
            Err(_) => {
                tracing::debug!(%src, "http proxy: no request head within the timeout");
                return;
            }
        };
        if io.len == 0 {
            return;
        }
        let conn = Arc::new(Conn {
            shared: self.shared.clone(),
            src,
            dst,
        });
        if is_h2 {
            // No head timeout: an HTTP/2 connection may stay open between requests.
            return h2_relay::serve(conn, io).await;
        }
        if let Some(io) = h1_relay::serve(conn.clone(), io).await {
            serve_hyper(conn, io).await;
        }
    }
}

/// Serves an HTTP/1.x connection with hyper's server, from an allowed upgrade request (WebSocket
/// and the like, CONNECT) on: the switch and what follows it. Only this exchange: the
/// connection closes after it when there was no switch (the client opens another).
async fn serve_hyper<IO>(conn: Arc<Conn>, io: Rewound<IO>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let src = conn.src;
    let timeout = conn.shared.cfg.header_read_timeout;
    let stats = conn.shared.clone();
    let activity = Arc::new(Activity::default());
    let svc = {
        let activity = activity.clone();
        hyper::service::service_fn(move |req| {
            let conn = conn.clone();
            let exchange = activity.start();
            async move {
                let mut resp = conn.handle(req).await;
                resp.body_mut()._done = Some(exchange);
                Ok::<_, Infallible>(resp)
            }
        })
    };
    // No timer: hyper would arm a header read timeout for every request; `head_timeout`
    // below keeps one per connection.
    let server = server1::Builder::new()
        .keep_alive(false)
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades();
    let result = tokio::select! {
        r = server => r,
        () = head_timeout(&activity, timeout) => {
            tracing::debug!(%src, "http proxy: no request head within the timeout");
            return;
        }
    };
    if let Err(e) = result {
        let malformed = e.is_parse() || e.is_parse_too_large();
        if malformed {
            // hyper has answered 400 (or 431/414) before closing.
            ProtocolStats::bump(&stats.events.stats().http.malformed);
            tracing::debug!(%src, error = %e, "http proxy: malformed request");
        } else {
            tracing::debug!(%src, error = %e, "http proxy: connection ended with an error");
        }
    }
}

fn is_self(dst: SocketAddr, local: SocketAddr) -> bool {
    dst == local
        || (local.ip().is_unspecified() && dst.port() == local.port() && dst.ip().is_loopback())
}

/// One downstream connection (its upstream connection is its relay's).
struct Conn {
    shared: Arc<Shared>,
    src: SocketAddr,
    dst: SocketAddr,
}

/// What the event needs to know about a request (built only while someone listens).
struct Seen {
    version: &'static str,
    method: String,
    path: String,
    host: String,
}

impl Seen {
    fn of<B>(req: &Request<B>) -> Seen {
        let is_h2 = req.version() == Version::HTTP_2;
        Seen {
            version: match req.version() {
                Version::HTTP_2 => "HTTP/2",
                Version::HTTP_10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            },
            method: req.method().as_str().to_string(),
            path: request_path(req).to_string(),
            host: request_host(req, is_h2).to_string(),
        }
    }
}

/// A request's verdict (see [`Conn::judge`]).
enum Judged {
    /// The answer to send in its place (the denial already counted and published).
    Denied(Response<Body>),
    Allowed(Allowed),
}

/// What an allowed request's event and forwarding need.
struct Allowed {
    redirect: Option<Redirect<HttpPolicy>>,
    /// `Some` when someone listened for events as the request arrived.
    seen: Option<Seen>,
    action_notes: Vec<String>,
    /// The [`hop_by_hop_bits`] of the request's headers (header actions applied).
    hop: u16,
}

#[derive(Debug, thiserror::Error)]
enum UpstreamError {
    #[error("connecting to {0}: {1}")]
    Connect(SocketAddr, std::io::Error),
    #[error("connecting to {0}: timed out")]
    ConnectTimeout(SocketAddr),
    #[error("http handshake with {0}: {1}")]
    Handshake(SocketAddr, hyper::Error),
    #[error("upstream request: {0}")]
    Request(hyper::Error),
    #[error("writing to the upstream: {0}")]
    H1Write(std::io::Error),
    #[error("reading from the upstream: {0}")]
    H1Read(std::io::Error),
    #[error("the upstream closed the connection {0}")]
    H1Closed(&'static str),
    #[error("malformed response from the upstream: {0}")]
    H1Malformed(&'static str),
    #[error("upstream http/2: {0}")]
    H2(h2_relay::H2Failure),
}

impl Conn {
    /// An HTTP/1.x request served by hyper's server (an upgrade): judged, then forwarded or
    /// answered.
    async fn handle(self: &Arc<Self>, mut req: Request<Incoming>) -> Response<Body> {
        let allowed = match self.judge(&mut req, false) {
            Judged::Denied(resp) => return resp,
            Judged::Allowed(a) => a,
        };
        match self.forward_upgrade(req).await {
            Ok(resp) => {
                self.allowed(allowed, resp.status().as_u16());
                resp
            }
            Err(e) => self.upstream_failed(allowed, &e),
        }
    }

    /// Judges a request (HTTP/1.x or a stream of HTTP/2) by its head, applying the header
    /// actions of an allowed one. A denial is counted and published here.
    fn judge<B>(&self, req: &mut Request<B>, is_h2: bool) -> Judged {
        let is_grpc = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("application/grpc"));
        // An offer to upgrade to h2c (`curl --http2` on http://) may be ignored by the
        // server (RFC 9113 leaves it optional): drop the offer and serve HTTP/1.1, rather
        // than refuse the request as an upgrade.
        let mut hop = hop_by_hop_bits(req.headers());
        let mut has_upgrade = !is_h2 && hop & HOP_UPGRADE != 0;
        if has_upgrade && offers_only_h2c(req.headers()) {
            req.headers_mut().remove(header::UPGRADE);
            req.headers_mut().remove("http2-settings");
            has_upgrade = false;
            hop &= !HOP_UPGRADE;
        }
        let wants_upgrade = has_upgrade || req.method() == Method::CONNECT;

        let flow = FlowKey {
            src: self.src,
            dst: self.dst,
        };
        let redirect = self.shared.policy.http(&flow);
        let decision = match &redirect {
            None => HttpDecision::Denied,
            Some(r) => r.policy.check(&HttpRequestView {
                method: req.method().as_str(),
                path: request_path(req),
                host: request_host(req, is_h2),
                headers: req.headers(),
            }),
        };
        // As the client sent it, before header actions.
        let seen = self.shared.events.has_subscribers().then(|| Seen::of(req));
        let actions = match decision {
            HttpDecision::Allowed { actions, .. }
                if !wants_upgrade || self.shared.cfg.allow_upgrades =>
            {
                actions
            }
            _ => {
                let resp = denied_response(&self.shared, is_grpc);
                self.emit(
                    redirect.as_ref(),
                    L7Verdict::Denied,
                    seen,
                    resp.status().as_u16(),
                    is_grpc.then_some(7),
                    Vec::new(),
                );
                return Judged::Denied(resp);
            }
        };
        for a in &actions {
            a.apply(req.headers_mut());
        }
        if !actions.is_empty() {
            hop = hop_by_hop_bits(req.headers());
        }
        let action_notes: Vec<String> = actions.iter().map(describe_action).collect();
        if actions
            .iter()
            .any(|a| matches!(a, HeaderAction::Log { .. }))
        {
            tracing::info!(src = %self.src, dst = %self.dst, actions = ?action_notes, "http headerMatches mismatch");
        }
        Judged::Allowed(Allowed {
            redirect,
            seen,
            action_notes,
            hop,
        })
    }

    /// Counts and publishes an allowed request answered by the upstream with `status`.
    fn allowed(&self, a: Allowed, status: u16) {
        self.emit(
            a.redirect.as_ref(),
            L7Verdict::Allowed,
            a.seen,
            status,
            None,
            a.action_notes,
        );
    }

    /// The answer to an allowed request the upstream did not answer: 502, counted.
    fn upstream_failed(&self, a: Allowed, e: &UpstreamError) -> Response<Body> {
        ProtocolStats::bump(&self.shared.events.stats().http.upstream_errors);
        tracing::debug!(src = %self.src, dst = %self.dst, error = %e, "http proxy: upstream failed");
        self.allowed(a, 502);
        plain(StatusCode::BAD_GATEWAY, Bytes::from_static(b"Bad gateway"))
    }

    /// Counts the verdict, and publishes the event when someone listens (`seen` is `None`
    /// when nobody did as the request arrived).
    fn emit(
        &self,
        redirect: Option<&Redirect<HttpPolicy>>,
        verdict: L7Verdict,
        seen: Option<Seen>,
        status: u16,
        grpc_status: Option<u16>,
        header_actions: Vec<String>,
    ) {
        let Some(seen) = seen else {
            self.shared.events.stats().http.verdict(verdict);
            return;
        };
        self.shared.events.emit(L7Event {
            time: SystemTime::now(),
            protocol: L7Protocol::Http,
            src: self.src,
            dst: self.dst,
            endpoint_id: redirect.map(|r| r.endpoint_id),
            endpoint: redirect.map(|r| r.endpoint.clone()),
            remote_identity: redirect.map(|r| r.remote_identity),
            verdict,
            kind: L7EventKind::Http {
                version: seen.version,
                method: seen.method,
                path: seen.path,
                host: seen.host,
                status,
                grpc_status,
                header_actions,
            },
        });
    }

    async fn connect(&self) -> Result<tokio::net::TcpStream, UpstreamError> {
        let cfg = &self.shared.cfg;
        match tokio::time::timeout(
            cfg.connect_timeout,
            net::connect_marked(self.dst, cfg.mode.mark()),
        )
        .await
        {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(UpstreamError::Connect(self.dst, e)),
            Err(_) => Err(UpstreamError::ConnectTimeout(self.dst)),
        }
    }

    /// Connecting, boxed: it happens once per connection, and its future inline would make
    /// every request's future larger.
    fn connect_boxed(
        &self,
    ) -> Pin<Box<dyn Future<Output = Result<tokio::net::TcpStream, UpstreamError>> + Send + '_>>
    {
        Box::pin(self.connect())
    }

    /// Opens an HTTP/1.1 upstream connection with hyper's client for an upgrade (it outlives
    /// the downstream HTTP connection, so it gets a task of its own).
    async fn new_upgrade_h1(&self) -> Result<client1::SendRequest<Incoming>, UpstreamError> {
        let io = TokioIo::new(self.connect().await?);
        let (sender, conn) = client1::handshake(io)
            .await
            .map_err(|e| UpstreamError::Handshake(self.dst, e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "http proxy: upstream connection ended");
            }
        });
        Ok(sender)
    }

    /// An allowed upgrade: a connection of its own upstream, then bytes copied both ways
    /// (a request that is no upgrade after all, because the rules changed meanwhile, is
    /// simply answered on it).
    async fn forward_upgrade(
        &self,
        mut req: Request<Incoming>,
    ) -> Result<Response<Body>, UpstreamError> {
        to_origin_form(&mut req);
        let downstream = hyper::upgrade::on(&mut req);
        let mut sender = self.new_upgrade_h1().await?;
        let mut resp = sender
            .send_request(req)
            .await
            .map_err(UpstreamError::Request)?;
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let upstream = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                match tokio::try_join!(downstream, upstream) {
                    Ok((d, u)) => {
                        let mut d = TokioIo::new(d);
                        let mut u = TokioIo::new(u);
                        let _ = tokio::io::copy_bidirectional(&mut d, &mut u).await;
                    }
                    Err(e) => tracing::debug!(error = %e, "http proxy: upgrade failed"),
                }
            });
        }
        Ok(resp.map(|b| Body::of(BodyKind::Upstream(b))))
    }
}

/// The request target as sent (path and query).
fn request_path<B>(req: &Request<B>) -> &str {
    req.uri().path_and_query().map_or("", |p| p.as_str())
}

/// The authority a request names: `:authority` for HTTP/2, the Host header for HTTP/1.x
/// (either falls back to the other).
fn request_host<B>(req: &Request<B>, is_h2: bool) -> &str {
    let from_uri = req.uri().authority().map(|a| a.as_str());
    let from_header = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok());
    if is_h2 {
        from_uri.or(from_header)
    } else {
        from_header.or(from_uri)
    }
    .unwrap_or("")
}

fn offers_only_h2c(headers: &HeaderMap) -> bool {
    let mut values = headers.get_all(header::UPGRADE).iter().peekable();
    values.peek().is_some()
        && values.all(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').all(|p| p.trim().eq_ignore_ascii_case("h2c")))
        })
}

/// An absolute-form target (`GET http://h/p`) goes upstream as origin-form with a Host.
fn to_origin_form(req: &mut Request<Incoming>) {
    if req.method() == Method::CONNECT || req.uri().scheme().is_none() {
        return;
    }
    if let Some(auth) = req.uri().authority().cloned() {
        if !req.headers().contains_key(header::HOST) {
            if let Ok(v) = HeaderValue::from_str(auth.as_str()) {
                req.headers_mut().insert(header::HOST, v);
            }
        }
    }
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".to_string());
    if let Ok(u) = pq.parse::<Uri>() {
        *req.uri_mut() = u;
    }
}

/// The hop-by-hop headers (RFC 9110 §7.6.1, and the pre-standard ones still seen), one bit
/// each, so one pass over a message's header names tells which are there.
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];
const HOP_CONNECTION: u16 = 1;
const HOP_TE: u16 = 1 << 5;
const HOP_UPGRADE: u16 = 1 << 7;
/// Every bit of [`HOP_BY_HOP`].
const HOP_ANY: u16 = 0xff;
/// Not hop-by-hop: a header named `close`, which `Connection: close` names (the usual
/// Connection option, so told apart without a lookup).
const NAMED_CLOSE: u16 = 1 << 8;

fn hop_by_hop_bit(name: &HeaderName) -> u16 {
    // A match on the text compiles to a switch on the length and a compare or two; most
    // names have a length no hop-by-hop name has.
    match name.as_str() {
        "connection" => 1,
        "keep-alive" => 1 << 1,
        "proxy-connection" => 1 << 2,
        "proxy-authenticate" => 1 << 3,
        "proxy-authorization" => 1 << 4,
        "te" => 1 << 5,
        "transfer-encoding" => 1 << 6,
        "upgrade" => 1 << 7,
        "close" => NAMED_CLOSE,
        _ => 0,
    }
}

/// The [`hop_by_hop_bit`]s of the names in `headers`.
fn hop_by_hop_bits(headers: &HeaderMap) -> u16 {
    headers.keys().fold(0, |acc, n| acc | hop_by_hop_bit(n))
}

/// Whether a Connection option (any case) names a header of [`HOP_BY_HOP`].
fn is_hop_by_hop_token(token: &[u8]) -> bool {
    HOP_BY_HOP.iter().any(|h| {
        let h = h.as_str().as_bytes();
        h.len() == token.len() && h.eq_ignore_ascii_case(token)
    })
}

/// Removes headers that belong to one connection (RFC 9110 §7.6.1), including those the
/// Connection header names. `te: trailers` stays (gRPC needs it end to end). (HTTP/2
/// responses are checked field by field in `h2_relay` instead.)
#[cfg(test)]
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    strip_hop_by_hop_present(headers, hop_by_hop_bits(headers))
}

/// `strip_hop_by_hop` with the headers' [`hop_by_hop_bits`] known.
fn strip_hop_by_hop_present(headers: &mut HeaderMap, present: u16) {
    if present & HOP_ANY == 0 {
        return;
    }
    if present & HOP_CONNECTION != 0 {
        // Headers that Connection names (most often none: `keep-alive`, `close`), other than
        // the hop-by-hop ones removed below anyway.
        let mut named: Vec<HeaderName> = Vec::new();
        for v in headers.get_all(header::CONNECTION) {
            for token in v.as_bytes().split(|b| *b == b',') {
                let token = token.trim_ascii();
                if token.is_empty() || is_hop_by_hop_token(token) {
                    continue;
                }
                if token.eq_ignore_ascii_case(b"close") {
                    if present & NAMED_CLOSE != 0 {
                        named.push(HeaderName::from_static("close"));
                    }
                    continue;
                }
                // Looked up before a name is made (which would copy a custom one).
                let present = std::str::from_utf8(token).is_ok_and(|t| headers.contains_key(t));
                if present {
                    if let Ok(n) = HeaderName::from_bytes(token) {
                        named.push(n);
                    }
                }
            }
        }
        for n in named {
            headers.remove(n);
        }
    }
    let te_trailers = present & HOP_TE != 0
        && headers.get_all(header::TE).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
            })
        });
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

fn describe_action(a: &HeaderAction) -> String {
    match a {
        HeaderAction::Log { name } => format!("LOG {name}"),
        HeaderAction::Add { name, .. } => format!("ADD {name}"),
        HeaderAction::Delete { name } => format!("DELETE {name}"),
        HeaderAction::Replace { name, .. } => format!("REPLACE {name}"),
    }
}

fn plain(status: StatusCode, msg: Bytes) -> Response<Body> {
    let mut r = Response::new(Body::local(msg));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

/// 403 with the message; for gRPC a trailers-only PERMISSION_DENIED.
fn denied_response(shared: &Shared, grpc: bool) -> Response<Body> {
    if !grpc {
        return plain(StatusCode::FORBIDDEN, shared.denied_body.clone());
    }
    let mut r = Response::new(Body::local(Bytes::new()));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", HeaderValue::from_static("7"));
    if let Ok(v) = HeaderValue::from_str(&grpc_percent_encode(&shared.cfg.denied_message)) {
        h.insert("grpc-message", v);
    }
    r
}

/// `grpc-message` is percent-encoded (gRPC over HTTP/2 spec).
fn grpc_percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::SwappablePolicy;
    use crate::secret::SecretDir;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The proxy on [`ConnectionWorkers`]: one keep-alive connection gets an allowed request
    /// answered by the backend, a denied one answered 403 in its place, and a policy change
    /// applies to its next request.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serves_keep_alive_connection_on_workers() {
        let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend_addr = backend.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (s, _) = backend.accept().await.unwrap();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        let body = format!("backend saw {}", req.uri());
                        Ok::<_, Infallible>(Response::new(http_body_util::Full::new(Bytes::from(
                            body,
                        ))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        let rules = |path: &str| {
            let rule = policy::model::HttpRule {
                method: Some("GET".into()),
                path: Some(path.into()),
                ..Default::default()
            };
            Some(Redirect {
                endpoint_id: 1,
                endpoint: Arc::from("test"),
                remote_identity: 2,
                policy: Arc::new(
                    HttpPolicy::compile(&[rule], &SecretDir::new("/nonexistent")).unwrap(),
                ),
            })
        };
        let policy = Arc::new(SwappablePolicy::new());
        policy.set_http(rules("/allowed.*"));
        let events = EventSink::new(16);
        let proxy = HttpProxy::bind(
            HttpProxyConfig::new(
                "127.0.0.1:0".parse().unwrap(),
                ProxyMode::Fixed {
                    upstream: backend_addr,
                    mark: None,
                },
            ),
            policy.clone(),
            events.clone(),
        )
        .unwrap();
        let addr = proxy.local_addr();
        let workers = Arc::new(ConnectionWorkers::start(2, "test-http").unwrap());
        tokio::spawn(proxy.run_on_workers(Some(workers.clone())));

        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut ask = async |path: &str| {
            let req = format!("GET {path} HTTP/1.1\r\nHost: backend\r\n\r\n");
            c.write_all(req.as_bytes()).await.unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 1024];
            // Enough of the answer: the head and a body of known length.
            loop {
                let n = c.read(&mut buf).await.unwrap();
                assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
                got.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&got).to_string();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length: ")
                                .map(|v| v.trim().parse().unwrap())
                        })
                        .unwrap();
                    if body.len() >= len {
                        return (head.lines().next().unwrap().to_string(), body.to_string());
                    }
                }
            }
        };
        let (status, body) = ask("/allowed/1").await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert_eq!(body, "backend saw /allowed/1");
        let (status, body) = ask("/other").await;
        assert_eq!(status, "HTTP/1.1 403 Forbidden");
        assert_eq!(body, "Access denied");
        policy.set_http(rules("/other"));
        let (status, body) = ask("/other").await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert_eq!(body, "backend saw /other");
        let (status, _) = ask("/allowed/2").await;
        assert_eq!(status, "HTTP/1.1 403 Forbidden");
        assert_eq!(workers.load().iter().sum::<usize>(), 1);
        let counts = events.stats().http.snapshot();
        assert_eq!((counts.allowed, counts.denied), (2, 2));
    }

    #[test]
    fn hop_by_hop_bits_follow_the_list() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_bit(name), 1 << i, "{name}");
        }
        assert_eq!(hop_by_hop_bit(&header::CONTENT_LENGTH), 0);
        assert_eq!(
            hop_by_hop_bit(&HeaderName::from_static("close")),
            NAMED_CLOSE
        );
        assert_eq!(HOP_BY_HOP.len(), HOP_ANY.count_ones() as usize);
        assert_eq!(hop_by_hop_bit(&header::UPGRADE), HOP_UPGRADE);
        assert_eq!(hop_by_hop_bit(&header::TE), HOP_TE);
        assert_eq!(hop_by_hop_bit(&HeaderName::from_static("x-te")), 0);
    }

    #[test]
    fn strips_hop_by_hop_headers_and_those_connection_names() {
        let mut h = HeaderMap::new();
        h.append(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Hop"),
        );
        h.append(header::CONNECTION, HeaderValue::from_static("close"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("close", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_static("Basic x"),
        );
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.append(header::TE, HeaderValue::from_static("gzip"));
        h.append(header::TE, HeaderValue::from_static("Trailers"));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        h.insert("x-end-to-end", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        let mut left: Vec<(String, String)> = h
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_string()))
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                ("content-type".to_string(), "text/plain".to_string()),
                ("te".to_string(), "trailers".to_string()),
                ("x-end-to-end".to_string(), "1".to_string()),
            ]
        );

        // Nothing hop-by-hop: nothing changes; te without trailers goes.
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("a"));
        h.insert("x-connection", HeaderValue::from_static("1"));
        let before = h.clone();
        strip_hop_by_hop(&mut h);
        assert_eq!(h, before);
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h, before);
    }
}
