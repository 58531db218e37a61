//! The HTTP/1.x relay: one task per client connection, owning the client socket and the
//! connection's upstream connection, serving the client's requests one after the other.
//!
//! A request: its head is parsed where it was read ([`head::parse_request`]), judged on those
//! views, and the head for the upstream written at once (origin-form, hop-by-hop fields left
//! out, header actions applied); the body goes on by its framing with what else was read,
//! in one write per read; the response head is parsed and written for the client
//! ([`head::parse_response`]) together with the start of the body, and the rest of the body
//! relayed likewise. Each side's buffer is used again for the next request and holds at most
//! what one read brings (a head: at most [`head::MAX_HEAD`]), so a slow reader on either side
//! stops the relay reading from the other instead of making it buffer.
//!
//! Pipelined requests wait in the client's buffer until the previous exchange is over, so
//! answers go in order and a denied request is answered in its place. An upgrade (WebSocket
//! and the like, CONNECT) the rules and the configuration allow is handed with the bytes
//! read so far to hyper's server (`serve_hyper`), which handles the switch.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::head::{
    self, push_decimal, push_field, push_fields, push_hex, BodyLen, ChunkOut, Chunked, ClientSide,
    HeadError, RequestHead, RespLen, Response, ResponseHead, ToClient, Upgrade,
};
use crate::events::{L7Verdict, ProtocolStats};
use crate::http_proxy::{
    describe_action, grpc_percent_encode, h2_relay, Activity, Allowed, Conn, Rewound, Seen,
    UpstreamError,
};
use crate::http_rules::{HeaderAction, HttpDecision};
use crate::policy::FlowKey;

/// Room a buffer has before a read (and what it starts with).
const READ_SIZE: usize = 16 * 1024;
/// Data at least this large goes from a read buffer to the other side without a copy.
const DIRECT: usize = 4096;
/// How much of a denied request's body is read and dropped to keep its connection; past it
/// the connection is closed.
const SKIP_MAX: u64 = 1024 * 1024;
/// How long a connection closed on an error reads what the client still sends.
const LINGER: std::time::Duration = std::time::Duration::from_secs(1);

/// Bytes read from one side and not used yet.
struct Inbox {
    data: Vec<u8>,
    start: usize,
    end: usize,
}

impl Inbox {
    fn new() -> Inbox {
        Inbox {
            data: vec![0; READ_SIZE],
            start: 0,
            end: 0,
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    fn take(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads what `io` has after what is here; 0 at the end of the stream.
    async fn fill<R: AsyncRead + Unpin>(&mut self, io: &mut R) -> io::Result<usize> {
        if self.data.len() - self.end < READ_SIZE / 4 {
            if self.start > 0 {
                self.data.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.data.len() - self.end < READ_SIZE / 4 {
                // Only a head, chunk line or trailer section in the making gets here; their
                // parsers bound them.
                let grown = (self.data.len() * 2).max(READ_SIZE);
                self.data.resize(grown, 0);
            }
        }
        let n = io.read(&mut self.data[self.end..]).await?;
        self.end += n;
        Ok(n)
    }
}

/// The upstream connection.
struct Upstream {
    io: TcpStream,
    inbox: Inbox,
}

impl Upstream {
    fn new(io: TcpStream) -> Upstream {
        Upstream {
            io,
            inbox: Inbox::new(),
        }
    }

    /// Whether an idle connection can take a request: the server has neither closed it nor
    /// sent anything unasked. Costs no system call while the socket has nothing to read.
    fn is_usable(&self) -> bool {
        use std::task::Waker;
        if !self.inbox.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        match self.io.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }
}

/// What the next request gets, decided on its head.
enum Plan {
    /// Refused unread: 400 (or 431), then the connection closes.
    Bad(HeadError),
    /// Answered by the proxy (the answer is in `to_client`); its body, if any, is skipped.
    Denied {
        body: BodyLen,
        close: bool,
        len: usize,
    },
    /// An allowed upgrade or CONNECT: the connection goes to hyper's server.
    HandOver,
    Forward(Exchange),
}

/// An allowed request on its way (its head for the upstream is in `to_up`).
struct Exchange {
    allowed: Allowed,
    body: BodyLen,
    client: ClientSide,
    expect_continue: bool,
    idempotent: bool,
    len: usize,
}

/// How an exchange ended.
enum Next {
    /// The connection goes on with the next request.
    Continue,
    Close,
    /// Closed while the client may still be sending: what it sends is read and dropped for a
    /// moment, so that its socket is not reset before it has read the answer.
    Linger,
}

enum End {
    Closed,
    HandOver,
}

struct Relay<IO> {
    conn: Arc<Conn>,
    io: IO,
    inbox: Inbox,
    up: Option<Upstream>,
    /// Towards the upstream: a request head (kept until it is answered, to send it again on
    /// a new connection when that is safe), then body.
    to_up: Vec<u8>,
    to_client: Vec<u8>,
}

/// Serves an HTTP/1.x client connection; the connection back (its unread bytes in front) when
/// an allowed upgrade is to be handed to hyper's server.
pub(crate) async fn serve<IO>(conn: Arc<Conn>, io: Rewound<IO>) -> Option<Rewound<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let timeout = conn.shared.cfg.header_read_timeout;
    let src = conn.src;
    let (head, pos, len, io) = io.into_parts();
    let mut relay = Relay {
        conn,
        io,
        inbox: Inbox {
            data: head,
            start: pos,
            end: len,
        },
        up: None,
        to_up: Vec::new(),
        to_client: Vec::new(),
    };
    let activity = Activity::default();
    let end = {
        let mut run = std::pin::pin!(relay.run(&activity));
        let mut timer = HeadTimer::new(timeout);
        std::future::poll_fn(|cx| {
            if let Poll::Ready(end) = run.as_mut().poll(cx) {
                return Poll::Ready(end);
            }
            if timer.expired(cx, &activity) {
                tracing::debug!(%src, "http proxy: no request head within the timeout");
                return Poll::Ready(End::Closed);
            }
            Poll::Pending
        })
        .await
    };
    match end {
        End::Closed => None,
        End::HandOver => {
            let rest = relay.inbox.bytes().to_vec();
            let len = rest.len();
            Some(Rewound::from_parts(rest, 0, len, relay.io))
        }
    }
}

/// The head timeout of `head_timeout` (idle or sending a head for `timeout`, checked a
/// quarter of it at a time), with its timer looked at only when it has gone off: the relay
/// wakes several times per request, and polling a sleep each time cost more than the check.
struct HeadTimer {
    sleep: Pin<Box<tokio::time::Sleep>>,
    tick: std::time::Duration,
    armed: bool,
    seen: u64,
    idle_ticks: u32,
}

impl HeadTimer {
    const TICKS: u32 = 4;

    fn new(timeout: std::time::Duration) -> HeadTimer {
        let tick = (timeout / Self::TICKS).max(std::time::Duration::from_millis(1));
        HeadTimer {
            sleep: Box::pin(tokio::time::sleep(tick)),
            tick,
            armed: false,
            seen: 0,
            idle_ticks: 0,
        }
    }

    /// Whether the connection has been idle, or in a head, for the timeout.
    fn expired(&mut self, cx: &mut Context<'_>, activity: &Activity) -> bool {
        if self.armed && !self.sleep.is_elapsed() {
            return false;
        }
        loop {
            if self.armed {
                let now = activity.changes.load(Ordering::Relaxed);
                if now != self.seen || activity.under_way.load(Ordering::Relaxed) > 0 {
                    self.seen = now;
                    self.idle_ticks = 0;
                } else {
                    // Idle since at most one tick before the first idle tick.
                    self.idle_ticks += 1;
                    if self.idle_ticks > Self::TICKS {
                        return true;
                    }
                }
                let next = tokio::time::Instant::now() + self.tick;
                self.sleep.as_mut().reset(next);
            }
            self.armed = true;
            if self.sleep.as_mut().poll(cx).is_pending() {
                return false;
            }
        }
    }
}

/// Whether `bytes` may hold the end of a head: the empty line after its last field ends is
/// `\n\n` or `\n\r\n` (any other `\n\r` is a bare CR, refused once parsed).
fn head_may_end(bytes: &[u8]) -> bool {
    bytes
        .windows(2)
        .any(|w| w[0] == b'\n' && matches!(w[1], b'\n' | b'\r'))
}

fn started(activity: &Activity) {
    activity.changes.fetch_add(1, Ordering::Relaxed);
    activity.under_way.fetch_add(1, Ordering::Relaxed);
}

fn ended(activity: &Activity) {
    activity.under_way.fetch_sub(1, Ordering::Relaxed);
    activity.changes.fetch_add(1, Ordering::Relaxed);
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Relay<IO> {
    async fn run(&mut self, activity: &Activity) -> End {
        loop {
            // How much of an incomplete head was parsed: it is parsed again only once what
            // came since may end it (a head sent a byte at a time would otherwise be parsed
            // whole after each byte: quadratic work for the client's linear).
            let mut looked = 0usize;
            let plan = loop {
                let bytes = self.inbox.bytes();
                if !bytes.is_empty()
                    && (looked == 0
                        || bytes.len() >= head::MAX_HEAD
                        || head_may_end(&bytes[looked.saturating_sub(2)..]))
                {
                    if let Some(plan) = self.plan() {
                        break plan;
                    }
                }
                looked = self.inbox.bytes().len();
                match self.inbox.fill(&mut self.io).await {
                    Ok(0) | Err(_) => return End::Closed,
                    Ok(_) => {}
                }
            };
            let next = match plan {
                Plan::Bad(e) => {
                    self.bad_request(e).await;
                    Next::Linger
                }
                Plan::HandOver => return End::HandOver,
                Plan::Denied { body, close, len } => {
                    // Not under way: skipping the body of a request already answered counts
                    // as idle, so a body that never comes whole does not hold the connection
                    // past the head timeout.
                    activity.changes.fetch_add(1, Ordering::Relaxed);
                    self.inbox.take(len);
                    let next = self.denied(body, close).await;
                    activity.changes.fetch_add(1, Ordering::Relaxed);
                    next
                }
                Plan::Forward(ex) => {
                    started(activity);
                    let next = self.forward(ex).await;
                    ended(activity);
                    next
                }
            };
            match next {
                Next::Continue => {}
                Next::Close => {
                    let _ = self.io.shutdown().await;
                    return End::Closed;
                }
                Next::Linger => {
                    self.linger().await;
                    return End::Closed;
                }
            }
        }
    }

    /// Parses and judges the request head at the start of the client's buffer: `None` while
    /// it is incomplete. An allowed request's head for the upstream is left in `to_up`, a
    /// denied one's answer in `to_client`.
    fn plan(&mut self) -> Option<Plan> {
        let mut slots = head::slots();
        let req = match head::parse_request(self.inbox.bytes(), &mut slots) {
            Ok(Some(req)) => req,
            Ok(None) => return None,
            Err(e) => return Some(Plan::Bad(e)),
        };
        let conn = &*self.conn;
        let shared = &*conn.shared;
        let wants_upgrade = req.upgrade == Upgrade::Wanted;
        let flow = FlowKey {
            src: conn.src,
            dst: conn.dst,
        };
        // The path as the upstream gets it (`http://h?q` goes as `/?q`).
        let slashed;
        let path = if req.path_needs_slash {
            slashed = format!("/{}", req.path);
            slashed.as_str()
        } else {
            req.path
        };
        let redirect = shared.policy.http(&flow);
        let decision = match &redirect {
            None => HttpDecision::Denied,
            Some(r) => r
                .policy
                .check_parts(req.method, path, req.host(), &req.fields),
        };
        let seen = shared.events.has_subscribers().then(|| Seen {
            version: if req.http10 { "HTTP/1.0" } else { "HTTP/1.1" },
            method: req.method.to_string(),
            path: path.to_string(),
            host: req.host().to_string(),
        });
        let actions = match decision {
            HttpDecision::Allowed { actions, .. }
                if !wants_upgrade || shared.cfg.allow_upgrades =>
            {
                actions
            }
            _ => {
                // The body, if any, is read and dropped to keep the connection, unless the
                // client waits for a 100 (Continue) before sending it, or it is too long.
                let close = !req.keep_alive
                    || match req.body {
                        BodyLen::None => false,
                        BodyLen::Length(n) => n > SKIP_MAX || req.expect_continue,
                        BodyLen::Chunked => req.expect_continue,
                    };
                self.to_client.clear();
                let status = write_denied(conn, req.grpc, req.http10, !close, &mut self.to_client);
                conn.emit(
                    redirect.as_ref(),
                    L7Verdict::Denied,
                    seen,
                    status,
                    req.grpc.then_some(7),
                    Vec::new(),
                );
                return Some(Plan::Denied {
                    body: req.body,
                    close,
                    len: req.len,
                });
            }
        };
        if wants_upgrade {
            // hyper's server takes it from here (and judges it again there).
            return Some(Plan::HandOver);
        }
        let action_notes: Vec<String> = actions.iter().map(describe_action).collect();
        if actions
            .iter()
            .any(|a| matches!(a, HeaderAction::Log { .. }))
        {
            tracing::info!(src = %conn.src, dst = %conn.dst, actions = ?action_notes, "http headerMatches mismatch");
        }
        self.to_up.clear();
        write_request_head(self.inbox.bytes(), &req, &actions, &mut self.to_up);
        Some(Plan::Forward(Exchange {
            allowed: Allowed {
                redirect,
                seen,
                action_notes,
                hop: 0,
            },
            body: req.body,
            client: ClientSide {
                http10: req.http10,
                keep_alive: req.keep_alive,
                head_request: req.is_head(),
            },
            expect_continue: req.expect_continue,
            idempotent: req.idempotent(),
            len: req.len,
        }))
    }

    /// Closes the sending side and reads what the client still sends (at most [`LINGER`]
    /// for at most [`SKIP_MAX`] bytes) before the connection is dropped.
    async fn linger(&mut self) {
        let _ = self.io.shutdown().await;
        let deadline = tokio::time::sleep(LINGER);
        tokio::pin!(deadline);
        let mut drained = 0u64;
        while drained < SKIP_MAX {
            self.inbox.take(self.inbox.bytes().len());
            tokio::select! {
                () = &mut deadline => return,
                r = self.inbox.fill(&mut self.io) => match r {
                    Ok(n) if n > 0 => drained += n as u64,
                    _ => return,
                },
            }
        }
    }

    async fn bad_request(&mut self, e: HeadError) {
        ProtocolStats::bump(&self.conn.shared.events.stats().http.malformed);
        let answer: &[u8] = match e {
            HeadError::TooLarge => {
                tracing::debug!(src = %self.conn.src, "http proxy: request head too large");
                b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            }
            HeadError::Bad(why) => {
                tracing::debug!(src = %self.conn.src, why, "http proxy: malformed request");
                b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            }
        };
        let _ = self.io.write_all(answer).await;
    }

    /// Writes a denial (in `to_client`), then skips the request's body.
    async fn denied(&mut self, body: BodyLen, close: bool) -> Next {
        if self.io.write_all(&self.to_client).await.is_err() {
            return Next::Close;
        }
        self.to_client.clear();
        if close {
            return if body == BodyLen::None {
                Next::Close
            } else {
                Next::Linger
            };
        }
        let mut sink = Vec::new();
        match body {
            BodyLen::None => Next::Continue,
            BodyLen::Length(mut left) => loop {
                let take = left.min(self.inbox.bytes().len() as u64);
                self.inbox.take(take as usize);
                left -= take;
                if left == 0 {
                    return Next::Continue;
                }
                if !matches!(self.inbox.fill(&mut self.io).await, Ok(n) if n > 0) {
                    return Next::Close;
                }
            },
            BodyLen::Chunked => {
                let mut state = Chunked::Size;
                let mut skipped = 0u64;
                loop {
                    match head::decode_chunked(
                        &mut state,
                        self.inbox.bytes(),
                        ChunkOut::Skip,
                        &mut sink,
                    ) {
                        Ok(n) => {
                            self.inbox.take(n);
                            skipped += n as u64;
                        }
                        Err(_) => return Next::Close,
                    }
                    if state == Chunked::Done {
                        return Next::Continue;
                    }
                    if skipped > SKIP_MAX
                        || !matches!(self.inbox.fill(&mut self.io).await, Ok(n) if n > 0)
                    {
                        return Next::Close;
                    }
                }
            }
        }
    }

    /// An allowed request: to the upstream, and its answer back.
    async fn forward(&mut self, ex: Exchange) -> Next {
        self.inbox.take(ex.len);
        let idle = self.up.take().filter(Upstream::is_usable);
        let reused = idle.is_some();
        let mut up = match idle {
            Some(up) => up,
            None => match self.conn.connect_boxed().await {
                Ok(io) => Upstream::new(io),
                Err(e) => {
                    // The body is still to come: not to be read as the next request.
                    let body_left = ex.body != BodyLen::None;
                    return self.upstream_failed(ex, &e, body_left).await;
                }
            },
        };
        if ex.expect_continue
            && ex.body != BodyLen::None
            && !ex.client.http10
            && self.inbox.is_empty()
            && self
                .io
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await
                .is_err()
        {
            return Next::Close;
        }
        match self.send_body(&mut up, ex.body).await {
            Ok(()) => {}
            Err(Failed::Client) => {
                // Gone mid-body: nothing to answer, and the upstream has half a request.
                self.conn.allowed(ex.allowed, 499);
                return Next::Close;
            }
            Err(Failed::Malformed(why)) => {
                ProtocolStats::bump(&self.conn.shared.events.stats().http.malformed);
                tracing::debug!(src = %self.conn.src, why, "http proxy: malformed request body");
                self.conn.allowed(ex.allowed, 400);
                let _ = self
                    .io
                    .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await;
                return Next::Linger;
            }
            Err(Failed::Upstream(e)) => {
                let retry = reused && ex.body == BodyLen::None && ex.idempotent;
                match self.retry_or(retry, e, &mut up).await {
                    Ok(()) => {}
                    Err(e) => {
                        let body_left = ex.body != BodyLen::None;
                        return self.upstream_failed(ex, &e, body_left).await;
                    }
                }
            }
        }
        let head = match self.read_response(&mut up, &ex, reused).await {
            Ok(head) => head,
            Err(e) => return self.upstream_failed(ex, &e, false).await,
        };
        self.conn.allowed(ex.allowed, head.status);
        if self.send_response_body(&mut up, &head).await.is_err() {
            // The upstream closed or failed mid-body, or the client did: the client's
            // connection ends (not a truncated answer on a connection that goes on).
            return Next::Close;
        }
        if head.upstream_keep_alive && up.inbox.is_empty() {
            self.up = Some(up);
        }
        if head.client_keep_alive {
            Next::Continue
        } else {
            Next::Close
        }
    }

    /// After a failed write of a request without body on a kept-alive connection: once more
    /// on a new one when `retry`.
    async fn retry_or(
        &mut self,
        retry: bool,
        e: UpstreamError,
        up: &mut Upstream,
    ) -> Result<(), UpstreamError> {
        if !retry {
            return Err(e);
        }
        *up = Upstream::new(self.conn.connect_boxed().await?);
        up.io
            .write_all(&self.to_up)
            .await
            .map_err(UpstreamError::H1Write)
    }

    /// Sends the request head in `to_up` and the body after it.
    async fn send_body(&mut self, up: &mut Upstream, body: BodyLen) -> Result<(), Failed> {
        let write = async |up: &mut Upstream, bytes: &[u8]| {
            up.io
                .write_all(bytes)
                .await
                .map_err(|e| Failed::Upstream(UpstreamError::H1Write(e)))
        };
        let mut left = match body {
            BodyLen::None => return write(up, &self.to_up).await,
            BodyLen::Length(n) => n,
            BodyLen::Chunked => 0,
        };
        let mut state = Chunked::Size;
        // The head stays in `to_up` until it is written with what of the body came with it.
        loop {
            let done = match body {
                BodyLen::Chunked => {
                    let n = head::decode_chunked(
                        &mut state,
                        self.inbox.bytes(),
                        ChunkOut::Chunks,
                        &mut self.to_up,
                    )
                    .map_err(Failed::Malformed)?;
                    self.inbox.take(n);
                    state == Chunked::Done
                }
                _ => {
                    let take = left.min(self.inbox.bytes().len() as u64) as usize;
                    if self.to_up.is_empty() && take >= DIRECT {
                        write(up, &self.inbox.bytes()[..take]).await?;
                    } else {
                        self.to_up.extend_from_slice(&self.inbox.bytes()[..take]);
                    }
                    self.inbox.take(take);
                    left -= take as u64;
                    left == 0
                }
            };
            if !self.to_up.is_empty() {
                write(up, &self.to_up).await?;
                self.to_up.clear();
            }
            if done {
                return Ok(());
            }
            match self.inbox.fill(&mut self.io).await {
                Ok(0) | Err(_) => return Err(Failed::Client),
                Ok(_) => {}
            }
        }
    }

    /// Reads the final response head (informational ones are skipped) and writes the client's
    /// version of it to `to_client`.
    async fn read_response(
        &mut self,
        up: &mut Upstream,
        ex: &Exchange,
        reused: bool,
    ) -> Result<ResponseHead, UpstreamError> {
        let mut answered = false;
        let mut retried = false;
        self.to_client.clear();
        loop {
            if !up.inbox.is_empty() {
                answered = true;
                match head::parse_response(up.inbox.bytes(), ex.client, &mut self.to_client) {
                    Ok(Response::Partial) => {}
                    Ok(Response::Informational(n)) => {
                        up.inbox.take(n);
                        continue;
                    }
                    Ok(Response::Final(h)) => {
                        up.inbox.take(h.len);
                        return Ok(h);
                    }
                    Err(why) => return Err(UpstreamError::H1Malformed(why)),
                }
            }
            let e = match up.inbox.fill(&mut up.io).await {
                Ok(0) => UpstreamError::H1Closed(if answered {
                    "within the response head"
                } else {
                    "before answering"
                }),
                Ok(_) => continue,
                Err(e) => UpstreamError::H1Read(e),
            };
            // A kept-alive connection the server closed meanwhile: once more on a new one,
            // when that is safe.
            if answered || retried || !reused || ex.body != BodyLen::None || !ex.idempotent {
                return Err(e);
            }
            retried = true;
            *up = Upstream::new(self.conn.connect_boxed().await?);
            up.io
                .write_all(&self.to_up)
                .await
                .map_err(UpstreamError::H1Write)?;
        }
    }

    /// Writes the response head in `to_client` and the body after it, as `head` frames it.
    async fn send_response_body(
        &mut self,
        up: &mut Upstream,
        head: &ResponseHead,
    ) -> Result<(), ()> {
        let mut left = match head.body {
            RespLen::Length(n) => n,
            _ => 0,
        };
        let mut state = Chunked::Size;
        let chunk_mode = if head.to_client == ToClient::Dechunk {
            ChunkOut::Data
        } else {
            ChunkOut::Chunks
        };
        loop {
            let done = match head.body {
                RespLen::None => true,
                RespLen::Length(_) => {
                    let take = left.min(up.inbox.bytes().len() as u64) as usize;
                    if self.to_client.is_empty() && take >= DIRECT {
                        self.io
                            .write_all(&up.inbox.bytes()[..take])
                            .await
                            .map_err(drop)?;
                    } else {
                        self.to_client.extend_from_slice(&up.inbox.bytes()[..take]);
                    }
                    up.inbox.take(take);
                    left -= take as u64;
                    left == 0
                }
                RespLen::Chunked => {
                    let n = head::decode_chunked(
                        &mut state,
                        up.inbox.bytes(),
                        chunk_mode,
                        &mut self.to_client,
                    )
                    .map_err(|why| {
                        tracing::debug!(dst = %self.conn.dst, why, "http proxy: malformed response body");
                    })?;
                    up.inbox.take(n);
                    state == Chunked::Done
                }
                RespLen::Close => {
                    let data = up.inbox.bytes();
                    if !data.is_empty() {
                        if head.to_client == ToClient::Chunk {
                            push_hex(&mut self.to_client, data.len() as u64);
                            self.to_client.extend_from_slice(b"\r\n");
                            self.to_client.extend_from_slice(data);
                            self.to_client.extend_from_slice(b"\r\n");
                        } else {
                            self.to_client.extend_from_slice(data);
                        }
                        let n = data.len();
                        up.inbox.take(n);
                    }
                    false
                }
            };
            // Written before the next read, which may wait.
            if !self.to_client.is_empty() {
                self.io.write_all(&self.to_client).await.map_err(drop)?;
                self.to_client.clear();
            }
            if done {
                return Ok(());
            }
            match up.inbox.fill(&mut up.io).await {
                Ok(0) if head.body == RespLen::Close => {
                    if head.to_client == ToClient::Chunk {
                        self.io.write_all(b"0\r\n\r\n").await.map_err(drop)?;
                    }
                    return Ok(());
                }
                Ok(0) | Err(_) => {
                    tracing::debug!(dst = %self.conn.dst, "http proxy: upstream closed within a response body");
                    return Err(());
                }
                Ok(_) => {}
            }
        }
    }

    /// The answer to an allowed request the upstream did not answer: 502, counted. The
    /// connection goes on unless the request's body was not read (`body_left`).
    async fn upstream_failed(&mut self, ex: Exchange, e: &UpstreamError, body_left: bool) -> Next {
        let _ = self.conn.upstream_failed(ex.allowed, e);
        let close = body_left || !ex.client.keep_alive;
        self.to_client.clear();
        push_local(
            &mut self.to_client,
            ex.client.http10,
            b"502 Bad Gateway",
            b"text/plain",
            b"Bad gateway",
            !close,
        );
        if self.io.write_all(&self.to_client).await.is_err() {
            return Next::Close;
        }
        match (close, body_left) {
            (false, _) => Next::Continue,
            (true, false) => Next::Close,
            (true, true) => Next::Linger,
        }
    }
}

/// Why a request body did not reach the upstream.
enum Failed {
    Client,
    Malformed(&'static str),
    Upstream(UpstreamError),
}

/// An answer of the proxy's own: status, content type and body.
fn push_local(
    out: &mut Vec<u8>,
    http10: bool,
    status: &[u8],
    content_type: &[u8],
    body: &[u8],
    keep_alive: bool,
) {
    out.extend_from_slice(if http10 { b"HTTP/1.0 " } else { b"HTTP/1.1 " });
    out.extend_from_slice(status);
    out.extend_from_slice(b"\r\n");
    push_field(out, b"content-type", content_type);
    out.extend_from_slice(b"content-length: ");
    push_decimal(out, body.len() as u64);
    out.extend_from_slice(b"\r\n");
    push_date_and_close(out, http10, keep_alive);
    out.extend_from_slice(body);
}

/// The end of a head the proxy writes itself: `date`, `connection` when the version's
/// default is not what happens next, and the blank line.
fn push_date_and_close(out: &mut Vec<u8>, http10: bool, keep_alive: bool) {
    push_field(out, b"date", h2_relay::date_now().as_bytes());
    if http10 && keep_alive {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    } else if !http10 && !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// 403 with the configured message; for gRPC a trailers-only PERMISSION_DENIED (HTTP 200,
/// `grpc-status: 7`). The status sent.
fn write_denied(conn: &Conn, grpc: bool, http10: bool, keep_alive: bool, out: &mut Vec<u8>) -> u16 {
    let shared = &*conn.shared;
    if !grpc {
        push_local(
            out,
            http10,
            b"403 Forbidden",
            b"text/plain",
            &shared.denied_body,
            keep_alive,
        );
        return 403;
    }
    out.extend_from_slice(if http10 {
        b"HTTP/1.0 200 OK\r\n"
    } else {
        b"HTTP/1.1 200 OK\r\n"
    });
    push_field(out, b"content-type", b"application/grpc");
    push_field(out, b"grpc-status", b"7");
    let message = grpc_percent_encode(&shared.cfg.denied_message);
    push_field(out, b"grpc-message", message.as_bytes());
    out.extend_from_slice(b"content-length: 0\r\n");
    push_date_and_close(out, http10, keep_alive);
    200
}

/// Whether a field named `name` says how a request body is framed.
fn frames_the_body(name: &str) -> bool {
    name.eq_ignore_ascii_case("content-length") || name.eq_ignore_ascii_case("transfer-encoding")
}

/// The head the upstream gets: origin-form, always HTTP/1.1, the fields as they came less the
/// hop-by-hop ones (`te: trailers` kept), header actions applied.
fn write_request_head(
    raw: &[u8],
    req: &RequestHead<'_>,
    actions: &[HeaderAction],
    out: &mut Vec<u8>,
) {
    out.reserve(req.len + 64);
    out.extend_from_slice(req.method.as_bytes());
    out.push(b' ');
    if req.authority.is_some() {
        if req.path_needs_slash {
            out.push(b'/');
        }
        out.extend_from_slice(req.path.as_bytes());
    } else {
        out.extend_from_slice(req.target.as_bytes());
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    // DELETE and REPLACE take out every field of their name as it came. The framing fields
    // are left as they came: the body goes on framed as the head said, and an upstream told
    // otherwise would take (part of) it for a request nobody judged.
    let removed = |name: &str| {
        !frames_the_body(name)
            && actions.iter().any(|a| match a {
                HeaderAction::Delete { name: n } | HeaderAction::Replace { name: n, .. } => {
                    n.as_str().len() == name.len() && n.as_str().eq_ignore_ascii_case(name)
                }
                _ => false,
            })
    };
    let mut drop = req.fields.drop;
    if !actions.is_empty() {
        for (i, f) in req.fields.list.iter().enumerate() {
            if removed(f.name) {
                drop |= 1 << i;
            }
        }
    }
    let mut host_left = false;
    if req.authority.is_some() {
        host_left = req
            .fields
            .list
            .iter()
            .enumerate()
            .any(|(i, f)| drop & (1 << i) == 0 && f.name.eq_ignore_ascii_case("host"));
    }
    push_fields(out, &raw[..req.len], req.fields.list, drop);
    if req.te_trailers {
        out.extend_from_slice(b"te: trailers\r\n");
    }
    if req.length_rewrite {
        if let BodyLen::Length(n) = req.body {
            out.extend_from_slice(b"content-length: ");
            push_decimal(out, n);
            out.extend_from_slice(b"\r\n");
        } else {
            out.extend_from_slice(b"content-length: 0\r\n");
        }
    }
    // The values the actions leave, in order (a later DELETE or REPLACE takes out an earlier
    // ADD's).
    if !actions.is_empty() {
        let mut added: Vec<(&http::HeaderName, &http::HeaderValue)> = Vec::new();
        for a in actions {
            match a {
                HeaderAction::Log { .. } => {}
                HeaderAction::Add { name, value } => added.push((name, value)),
                HeaderAction::Delete { name } => added.retain(|(n, _)| *n != name),
                HeaderAction::Replace { name, value } => {
                    added.retain(|(n, _)| *n != name);
                    added.push((name, value));
                }
            }
        }
        for (name, value) in added {
            if frames_the_body(name.as_str()) {
                continue;
            }
            host_left |= name == http::header::HOST;
            push_field(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
    if let (Some(authority), false) = (req.authority, host_left) {
        push_field(out, b"host", authority.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderName, HeaderValue};

    fn upstream_head(text: &[u8], actions: &[HeaderAction]) -> String {
        let mut slots = head::slots();
        let req = head::parse_request(text, &mut slots).unwrap().unwrap();
        let mut out = Vec::new();
        write_request_head(text, &req, actions, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn request_heads_go_upstream_as_they_came_less_hop_by_hop() {
        assert_eq!(
            upstream_head(b"GET /a HTTP/1.1\r\nHost: h\r\nAccept: */*\r\n\r\n", &[]),
            "GET /a HTTP/1.1\r\nHost: h\r\nAccept: */*\r\n\r\n"
        );
        assert_eq!(
            upstream_head(
                b"POST /u HTTP/1.0\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nTE: gzip, trailers\r\nContent-Length: 2, 2\r\nUpgrade: h2c\r\nHTTP2-Settings: x\r\n\r\n",
                &[]
            ),
            "POST /u HTTP/1.1\r\nte: trailers\r\ncontent-length: 2\r\n\r\n"
        );
        assert_eq!(
            upstream_head(b"GET http://example.com:81?q HTTP/1.1\r\n\r\n", &[]),
            "GET /?q HTTP/1.1\r\nhost: example.com:81\r\n\r\n"
        );
        assert_eq!(
            upstream_head(
                b"GET http://example.com/p HTTP/1.1\r\nHost: other\r\n\r\n",
                &[]
            ),
            "GET /p HTTP/1.1\r\nHost: other\r\n\r\n"
        );
        assert_eq!(
            upstream_head(
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                &[]
            ),
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
    }

    #[test]
    fn lines_go_as_they_came_only_when_they_end_in_crlf() {
        assert_eq!(
            upstream_head(b"GET /a HTTP/1.1\nHost: h\nX-A:  1 \r\nX-B: 2\n\n", &[]),
            "GET /a HTTP/1.1\r\nHost: h\r\nX-A:  1 \r\nX-B: 2\r\n\r\n"
        );
        assert_eq!(
            upstream_head(
                b"GET /a HTTP/1.1\r\nHost: h\r\nX-A:\t1\r\nX-B: 2\r\n\n",
                &[]
            ),
            "GET /a HTTP/1.1\r\nHost: h\r\nX-A:\t1\r\nX-B: 2\r\n\r\n"
        );
    }

    #[test]
    fn a_head_may_end_only_at_an_empty_line() {
        assert!(head_may_end(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"));
        assert!(head_may_end(b"\n\r"));
        assert!(head_may_end(b"a\n\n"));
        assert!(!head_may_end(b"GET / HTTP/1.1\r\nHost: h\r\nX-A: 1"));
        assert!(!head_may_end(b"\r\n"));
        assert!(!head_may_end(b"\n"));
        // Split anywhere, the part from two bytes before the split on shows the end.
        let text = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n";
        for split in 1..text.len() {
            let ends = head_may_end(&text[split.saturating_sub(2)..]);
            assert!(ends, "{split}");
        }
    }

    #[test]
    fn the_upstream_gets_the_host_the_rules_judged() {
        // Connection cannot take the Host field away (the target's authority would take its
        // place).
        assert_eq!(
            upstream_head(
                b"GET http://other/p HTTP/1.1\r\nHost: judged\r\nConnection: host\r\n\r\n",
                &[]
            ),
            "GET /p HTTP/1.1\r\nHost: judged\r\n\r\n"
        );
        // A Host field that is not text cannot be judged: refused.
        let mut slots = head::slots();
        assert!(matches!(
            head::parse_request(
                b"GET http://judged/p HTTP/1.1\r\nHost: other\xff\r\n\r\n",
                &mut slots
            ),
            Err(HeadError::Bad(_))
        ));
    }

    #[test]
    fn header_actions_leave_the_body_framing_alone() {
        let name = |n: &'static str| HeaderName::from_static(n);
        let value = |v: &'static str| HeaderValue::from_static(v);
        let actions = [
            HeaderAction::Delete {
                name: name("content-length"),
            },
            HeaderAction::Replace {
                name: name("transfer-encoding"),
                value: value("identity"),
            },
            HeaderAction::Add {
                name: name("content-length"),
                value: value("0"),
            },
        ];
        assert_eq!(
            upstream_head(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n", &actions),
            "POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n"
        );
        assert_eq!(
            upstream_head(
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                &actions
            ),
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
    }

    #[test]
    fn header_actions_apply_in_order() {
        let name = |n: &'static str| HeaderName::from_static(n);
        let value = |v: &'static str| HeaderValue::from_static(v);
        let actions = [
            HeaderAction::Add {
                name: name("x-add"),
                value: value("1"),
            },
            HeaderAction::Delete {
                name: name("x-del"),
            },
            HeaderAction::Replace {
                name: name("x-rep"),
                value: value("new"),
            },
            HeaderAction::Log {
                name: name("x-log"),
            },
            HeaderAction::Add {
                name: name("x-gone"),
                value: value("1"),
            },
            HeaderAction::Delete {
                name: name("x-gone"),
            },
        ];
        assert_eq!(
            upstream_head(
                b"GET / HTTP/1.1\r\nX-Add: 0\r\nX-Del: a\r\nx-del: b\r\nX-Rep: old\r\nX-Log: l\r\n\r\n",
                &actions
            ),
            "GET / HTTP/1.1\r\nX-Add: 0\r\nX-Log: l\r\nx-add: 1\r\nx-rep: new\r\n\r\n"
        );
    }
}
