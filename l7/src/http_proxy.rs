//! The HTTP proxy: HTTP/1.1 and HTTP/2 (h2c, so gRPC) on one listener, every request judged
//! on its own against the rules in force when it arrives.
//!
//! Each downstream connection gets its own upstream connection to the original destination
//! (HTTP/1.1 for HTTP/1.1, HTTP/2 for HTTP/2), opened on first use and reopened if the
//! upstream closed it. HTTP/1.1 requests on a connection are served in order (hyper reads the
//! next one only after the previous response is written), so pipelined requests stay in
//! order and a denied request in between is answered in its place. Bodies stream in both
//! directions; nothing is buffered whole.
//!
//! Denied: 403 with the configured message; a gRPC call (content-type `application/grpc*`)
//! gets HTTP 200 with `grpc-status: 7` (PERMISSION_DENIED) in a trailers-only response, so
//! the client sees a clean RPC error and other streams of the connection go on.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1 as client1, http2 as client2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Mutex;

use crate::error::L7Error;
use crate::events::{EventSink, L7Event, L7EventKind, L7Protocol, L7Verdict, ProtocolStats};
use crate::http_rules::{HeaderAction, HttpDecision, HttpPolicy, HttpRequestView};
use crate::net::{self, ProxyMode};
use crate::policy::{FlowKey, L7PolicySource, Redirect};

type Body = BoxBody<Bytes, hyper::Error>;

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
    /// How long a client may take to send a request head.
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

    /// Accepts connections until the task is dropped.
    pub async fn run(self) {
        let mode = self.service.shared.cfg.mode;
        let svc = self.service;
        net::accept_loop(self.listener, mode, "http", move |stream, src, dst| {
            let svc = svc.clone();
            async move { svc.serve(stream, src, dst).await }
        })
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

    /// Serves one client connection whose requests go to `dst`.
    pub async fn serve<IO>(&self, io: IO, src: SocketAddr, dst: SocketAddr)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        ProtocolStats::bump(&self.stats().connections);
        if self.shared.cfg.mode.is_transparent() && is_self(dst, self.shared.local) {
            tracing::debug!(%src, "http proxy: refusing a connection made to the proxy itself");
            return;
        }
        let conn = Arc::new(Conn {
            shared: self.shared.clone(),
            src,
            dst,
            h1: Mutex::new(None),
            h2: Mutex::new(None),
        });
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.shared.cfg.header_read_timeout);
        builder.http2().timer(TokioTimer::new());
        let svc = hyper::service::service_fn(move |req| {
            let conn = conn.clone();
            async move { Ok::<_, Infallible>(conn.handle(req).await) }
        });
        if let Err(e) = builder
            .serve_connection_with_upgrades(TokioIo::new(io), svc)
            .await
        {
            let malformed = e
                .downcast_ref::<hyper::Error>()
                .is_some_and(|e| e.is_parse() || e.is_parse_too_large());
            if malformed {
                // hyper has answered 400 (or 431/414) before closing.
                ProtocolStats::bump(&self.stats().malformed);
                tracing::debug!(%src, error = %e, "http proxy: malformed request");
            } else {
                tracing::debug!(%src, error = %e, "http proxy: connection ended with an error");
            }
        }
    }
}

fn is_self(dst: SocketAddr, local: SocketAddr) -> bool {
    dst == local
        || (local.ip().is_unspecified() && dst.port() == local.port() && dst.ip().is_loopback())
}

/// One downstream connection and its upstream connections.
struct Conn {
    shared: Arc<Shared>,
    src: SocketAddr,
    dst: SocketAddr,
    h1: Mutex<Option<client1::SendRequest<Incoming>>>,
    h2: Mutex<Option<client2::SendRequest<Incoming>>>,
}

/// What the event needs to know about a request.
struct Seen {
    version: &'static str,
    method: String,
    path: String,
    host: String,
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
}

impl Conn {
    async fn handle(self: &Arc<Self>, mut req: Request<Incoming>) -> Response<Body> {
        let version = match req.version() {
            Version::HTTP_2 => "HTTP/2",
            Version::HTTP_10 => "HTTP/1.0",
            _ => "HTTP/1.1",
        };
        let is_h2 = req.version() == Version::HTTP_2;
        let host = request_host(&req, is_h2);
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_default();
        let seen = Seen {
            version,
            method: req.method().as_str().to_string(),
            path,
            host,
        };
        let is_grpc = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("application/grpc"));
        // An offer to upgrade to h2c (`curl --http2` on http://) may be ignored by the
        // server (RFC 9113 leaves it optional): drop the offer and serve HTTP/1.1, rather
        // than refuse the request as an upgrade.
        if !is_h2 && offers_only_h2c(req.headers()) {
            req.headers_mut().remove(header::UPGRADE);
            req.headers_mut().remove("http2-settings");
        }
        let wants_upgrade = (!is_h2 && req.headers().contains_key(header::UPGRADE))
            || req.method() == Method::CONNECT;

        let flow = FlowKey {
            src: self.src,
            dst: self.dst,
        };
        let redirect = self.shared.policy.http(&flow);
        let decision = match &redirect {
            None => HttpDecision::Denied,
            Some(r) => r.policy.check(&HttpRequestView {
                method: &seen.method,
                path: &seen.path,
                host: &seen.host,
                headers: req.headers(),
            }),
        };
        let actions = match decision {
            HttpDecision::Allowed { actions, .. }
                if !wants_upgrade || self.shared.cfg.allow_upgrades =>
            {
                actions
            }
            _ => {
                let resp = denied_response(&self.shared.cfg.denied_message, is_grpc);
                self.emit(
                    redirect.as_ref(),
                    L7Verdict::Denied,
                    seen,
                    resp.status().as_u16(),
                    is_grpc.then_some(7),
                    Vec::new(),
                );
                return resp;
            }
        };
        for a in &actions {
            a.apply(req.headers_mut());
        }
        let action_notes: Vec<String> = actions.iter().map(describe_action).collect();
        if actions
            .iter()
            .any(|a| matches!(a, HeaderAction::Log { .. }))
        {
            tracing::info!(src = %self.src, dst = %self.dst, actions = ?action_notes, "http headerMatches mismatch");
        }

        let result = if wants_upgrade {
            self.forward_upgrade(req).await
        } else if is_h2 {
            self.forward_h2(req).await
        } else {
            self.forward_h1(req).await
        };
        match result {
            Ok(resp) => {
                self.emit(
                    redirect.as_ref(),
                    L7Verdict::Allowed,
                    seen,
                    resp.status().as_u16(),
                    None,
                    action_notes,
                );
                resp
            }
            Err(e) => {
                ProtocolStats::bump(&self.shared.events.stats().http.upstream_errors);
                tracing::debug!(src = %self.src, dst = %self.dst, error = %e, "http proxy: upstream failed");
                let resp = plain(StatusCode::BAD_GATEWAY, "Bad gateway");
                self.emit(
                    redirect.as_ref(),
                    L7Verdict::Allowed,
                    seen,
                    502,
                    None,
                    action_notes,
                );
                resp
            }
        }
    }

    fn emit(
        &self,
        redirect: Option<&Redirect<HttpPolicy>>,
        verdict: L7Verdict,
        seen: Seen,
        status: u16,
        grpc_status: Option<u16>,
        header_actions: Vec<String>,
    ) {
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

    async fn connect(&self) -> Result<TokioIo<tokio::net::TcpStream>, UpstreamError> {
        let cfg = &self.shared.cfg;
        match tokio::time::timeout(
            cfg.connect_timeout,
            net::connect_marked(self.dst, cfg.mode.mark()),
        )
        .await
        {
            Ok(Ok(s)) => Ok(TokioIo::new(s)),
            Ok(Err(e)) => Err(UpstreamError::Connect(self.dst, e)),
            Err(_) => Err(UpstreamError::ConnectTimeout(self.dst)),
        }
    }

    async fn new_h1(&self) -> Result<client1::SendRequest<Incoming>, UpstreamError> {
        let io = self.connect().await?;
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

    async fn forward_h1(
        &self,
        mut req: Request<Incoming>,
    ) -> Result<Response<Body>, UpstreamError> {
        to_origin_form(&mut req);
        strip_hop_by_hop(req.headers_mut());
        let mut slot = self.h1.lock().await;
        let mut sender = match slot.take() {
            Some(s) if !s.is_closed() => s,
            _ => self.new_h1().await?,
        };
        // A kept-alive upstream connection may have been closed by the server between two
        // requests; when the request was not sent at all, send it once more on a new one.
        let resp = match sender.ready().await {
            Ok(()) => sender.try_send_request(req).await,
            Err(_) => {
                sender = self.new_h1().await?;
                sender.try_send_request(req).await
            }
        };
        let resp = match resp {
            Ok(r) => r,
            Err(mut e) => match e.take_message() {
                Some(req) => {
                    sender = self.new_h1().await?;
                    sender
                        .send_request(req)
                        .await
                        .map_err(UpstreamError::Request)?
                }
                None => return Err(UpstreamError::Request(e.into_error())),
            },
        };
        *slot = Some(sender);
        drop(slot);
        let mut resp = resp;
        strip_hop_by_hop(resp.headers_mut());
        Ok(resp.map(|b| b.boxed()))
    }

    async fn forward_h2(&self, req: Request<Incoming>) -> Result<Response<Body>, UpstreamError> {
        let mut sender = {
            let mut slot = self.h2.lock().await;
            match slot.as_ref() {
                Some(s) if !s.is_closed() => s.clone(),
                _ => {
                    let io = self.connect().await?;
                    let (sender, conn) = client2::Builder::new(TokioExecutor::new())
                        .timer(TokioTimer::new())
                        .handshake(io)
                        .await
                        .map_err(|e| UpstreamError::Handshake(self.dst, e))?;
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::debug!(error = %e, "http proxy: upstream h2 connection ended");
                        }
                    });
                    *slot = Some(sender.clone());
                    sender
                }
            }
        };
        sender.ready().await.map_err(UpstreamError::Request)?;
        let mut resp = sender
            .send_request(req)
            .await
            .map_err(UpstreamError::Request)?;
        strip_hop_by_hop(resp.headers_mut());
        Ok(resp.map(|b| b.boxed()))
    }

    /// An allowed upgrade: a connection of its own upstream, then bytes copied both ways.
    async fn forward_upgrade(
        &self,
        mut req: Request<Incoming>,
    ) -> Result<Response<Body>, UpstreamError> {
        to_origin_form(&mut req);
        let downstream = hyper::upgrade::on(&mut req);
        let mut sender = self.new_h1().await?;
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
        Ok(resp.map(|b| b.boxed()))
    }
}

/// The authority a request names: `:authority` for HTTP/2, the Host header for HTTP/1.x
/// (either falls back to the other).
fn request_host(req: &Request<Incoming>, is_h2: bool) -> String {
    let from_uri = req.uri().authority().map(|a| a.as_str().to_string());
    let from_header = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string);
    if is_h2 {
        from_uri.or(from_header)
    } else {
        from_header.or(from_uri)
    }
    .unwrap_or_default()
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

/// Removes headers that belong to one connection (RFC 9110 §7.6.1), including those the
/// Connection header names. `te: trailers` stays (gRPC needs it end to end).
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        if n != header::TE {
            headers.remove(n);
        }
    }
    for n in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(n);
    }
    let te_trailers = headers
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    headers.remove(header::TE);
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

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

fn plain(status: StatusCode, msg: &str) -> Response<Body> {
    let mut r = Response::new(full(msg.to_string()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

/// 403 with the message; for gRPC a trailers-only PERMISSION_DENIED.
fn denied_response(message: &str, grpc: bool) -> Response<Body> {
    if !grpc {
        return plain(StatusCode::FORBIDDEN, message);
    }
    let mut r = Response::new(full(Bytes::new()));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", HeaderValue::from_static("7"));
    if let Ok(v) = HeaderValue::from_str(&grpc_percent_encode(message)) {
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
