//! The HTTP proxy's HTTP/1.1 client side: one upstream connection, driven by the downstream
//! connection's request handler itself.
//!
//! Why not hyper's client connection: it runs as a future of its own, and a request, its
//! response head and each part of the body cross between it and the handler through channels,
//! each crossing a wake-up and another pass over both state machines; that hand-over cost
//! more than the proxy's other per-request work together. Here the handler writes the request
//! and reads the response head on the socket, and the response body is read from the socket
//! as the client side (hyper's server) polls it. When the body is complete the connection
//! goes back to its [`IdleSlot`] for the next request.
//!
//! What is sent: the request head as the proxy left it (origin-form, hop-by-hop headers
//! removed), always as HTTP/1.1, the body framed by its known length (`content-length`) or
//! chunked. What is read (RFC 9112 §6.3): informational (1xx) heads are skipped; no body for
//! HEAD, 204 and 304; chunked when the last transfer coding is chunked; else the
//! content-length (all values equal); else until the server closes. A connection is reused
//! only when the server keeps it alive (HTTP/1.1 without `Connection: close`, HTTP/1.0 with
//! `keep-alive`), the body had a length of its own, and nothing unasked followed it.
//! Upgrades and CONNECT do not come here (hyper's client handles them).

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// Most header lines a response head (or a chunked body's trailers) may have.
const MAX_HEADERS: usize = 100;
/// Largest response head, chunk-size line or trailer section accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Room made in the read buffer before each read.
const READ_SIZE: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientError {
    #[error("writing to the upstream: {0}")]
    Write(io::Error),
    #[error("reading from the upstream: {0}")]
    Read(io::Error),
    #[error("the upstream closed the connection {0}")]
    Closed(&'static str),
    #[error("malformed response from the upstream: {0}")]
    Malformed(&'static str),
    #[error("reading the request body: {0}")]
    RequestBody(hyper::Error),
}

/// A failed exchange, and whether the request may be sent again on a new connection (the
/// failure came before the server answered anything, the request had no body and its method
/// is idempotent: what a kept-alive connection the server closed meanwhile looks like).
#[derive(Debug)]
pub(crate) struct SendError {
    pub error: ClientError,
    pub retry: bool,
}

/// Where the upstream connection of a downstream connection waits between two requests.
pub(crate) type IdleSlot = Arc<Mutex<Option<Upstream>>>;

/// One upstream HTTP/1.1 connection.
pub(crate) struct Upstream {
    io: TcpStream,
    /// Read but not yet used.
    buf: BytesMut,
    /// The last request's head, kept for its allocation.
    spare: Vec<u8>,
}

impl Upstream {
    pub fn new(io: TcpStream) -> Upstream {
        Upstream {
            io,
            buf: BytesMut::new(),
            spare: Vec::new(),
        }
    }

    /// A buffer for the next request's head (the last one's, cleared).
    pub fn head_buffer(&mut self) -> Vec<u8> {
        let mut b = std::mem::take(&mut self.spare);
        b.clear();
        b
    }

    /// Whether an idle connection can take a request: the server has neither closed it nor
    /// sent anything unasked. Costs no system call while the socket has nothing to read.
    pub fn is_usable(&self) -> bool {
        if !self.buf.is_empty() {
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

    /// Reads what the socket has into `buf`; 0 at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < READ_SIZE / 4 {
            self.buf.reserve(READ_SIZE);
        }
        let spare = self.buf.spare_capacity_mut();
        let mut rb = ReadBuf::uninit(spare);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut rb))?;
        let n = rb.filled().len();
        // SAFETY: the read initialized the first `n` bytes of the spare capacity.
        unsafe { self.buf.set_len(self.buf.len() + n) };
        Poll::Ready(Ok(n))
    }

    async fn fill(&mut self) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_fill(cx)).await
    }
}

/// How the request body goes upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RequestFraming {
    None,
    Length,
    Chunked,
}

/// A request ready to send: its head serialized, its body still to be read.
pub(crate) struct Outgoing {
    head: Vec<u8>,
    body: Incoming,
    framing: RequestFraming,
    head_request: bool,
    idempotent: bool,
}

impl Outgoing {
    /// Serializes the head of `req` (origin-form target, hop-by-hop headers already removed)
    /// into `head` (empty). The body is framed by its known length, or chunked when it has none.
    pub fn new(req: Request<Incoming>, mut head: Vec<u8>) -> Outgoing {
        let (parts, body) = req.into_parts();
        let framing = match http_body::Body::size_hint(&body).exact() {
            Some(0) if http_body::Body::is_end_stream(&body) => RequestFraming::None,
            Some(_) => RequestFraming::Length,
            None => RequestFraming::Chunked,
        };
        head.reserve(256);
        head.extend_from_slice(parts.method.as_str().as_bytes());
        head.push(b' ');
        match parts.uri.path_and_query() {
            Some(pq) if !pq.as_str().is_empty() => head.extend_from_slice(pq.as_str().as_bytes()),
            _ => head.push(b'/'),
        }
        head.extend_from_slice(b" HTTP/1.1\r\n");
        let length = match framing {
            RequestFraming::Length => http_body::Body::size_hint(&body).exact(),
            _ => None,
        };
        for (name, value) in &parts.headers {
            // The framing written below is the one the body is sent with.
            if *name == header::CONTENT_LENGTH && framing != RequestFraming::None {
                continue;
            }
            head.extend_from_slice(name.as_str().as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        match framing {
            RequestFraming::Length => {
                head.extend_from_slice(b"content-length: ");
                head.extend_from_slice(length.unwrap_or(0).to_string().as_bytes());
                head.extend_from_slice(b"\r\n");
            }
            RequestFraming::Chunked => head.extend_from_slice(b"transfer-encoding: chunked\r\n"),
            RequestFraming::None => {}
        }
        head.extend_from_slice(b"\r\n");
        Outgoing {
            head,
            body,
            framing,
            head_request: parts.method == Method::HEAD,
            idempotent: matches!(
                parts.method,
                Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
            ),
        }
    }
}

/// Sends `req` on `up` and reads the response head. The response's body reads the rest from
/// the connection, which then goes back to `slot` when the server keeps it alive.
pub(crate) async fn send(
    mut up: Upstream,
    req: &mut Outgoing,
    slot: &IdleSlot,
) -> Result<Response<UpstreamBody>, SendError> {
    let before_answer = |error: ClientError, req: &Outgoing| SendError {
        retry: req.framing == RequestFraming::None && req.idempotent,
        error,
    };
    if let Err(e) = up.io.write_all(&req.head).await {
        return Err(before_answer(ClientError::Write(e), req));
    }
    if req.framing != RequestFraming::None {
        send_body(&mut up, req).await.map_err(|error| SendError {
            error,
            retry: false,
        })?;
    }
    loop {
        match parse_head(&mut up.buf, req.head_request) {
            Ok(Some(Parsed::Informational)) => continue,
            Ok(Some(Parsed::Final(head))) => {
                up.spare = std::mem::take(&mut req.head);
                return Ok(respond(up, head, slot));
            }
            Ok(None) => {}
            Err(error) => {
                return Err(SendError {
                    error,
                    retry: false,
                })
            }
        }
        if up.buf.len() >= MAX_HEAD {
            return Err(SendError {
                error: ClientError::Malformed("response head too large"),
                retry: false,
            });
        }
        let answered = !up.buf.is_empty();
        match up.fill().await {
            Ok(0) if answered => {
                return Err(SendError {
                    error: ClientError::Closed("within the response head"),
                    retry: false,
                })
            }
            Ok(0) => return Err(before_answer(ClientError::Closed("before answering"), req)),
            Ok(_) => {}
            Err(e) if answered => {
                return Err(SendError {
                    error: ClientError::Read(e),
                    retry: false,
                })
            }
            Err(e) => return Err(before_answer(ClientError::Read(e), req)),
        }
    }
}

async fn send_body(up: &mut Upstream, req: &mut Outgoing) -> Result<(), ClientError> {
    let chunked = req.framing == RequestFraming::Chunked;
    let mut trailers: Option<HeaderMap> = None;
    let mut out: Vec<u8> = Vec::new();
    while let Some(frame) = req.body.frame().await {
        let frame = frame.map_err(ClientError::RequestBody)?;
        let data = match frame.into_data() {
            Ok(d) => d,
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    trailers.get_or_insert_with(HeaderMap::new).extend(t);
                }
                continue;
            }
        };
        if data.is_empty() {
            continue;
        }
        if chunked {
            out.clear();
            out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
            up.io.write_all(&out).await.map_err(ClientError::Write)?;
            up.io.write_all(&data).await.map_err(ClientError::Write)?;
            up.io.write_all(b"\r\n").await.map_err(ClientError::Write)?;
        } else {
            up.io.write_all(&data).await.map_err(ClientError::Write)?;
        }
    }
    if chunked {
        out.clear();
        out.extend_from_slice(b"0\r\n");
        for (name, value) in trailers.iter().flatten() {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        up.io.write_all(&out).await.map_err(ClientError::Write)?;
    }
    Ok(())
}

/// A final response head and how its body is framed.
struct FinalHead {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    framing: Framing,
    keep_alive: bool,
}

enum Parsed {
    /// A 1xx head, consumed.
    Informational,
    Final(FinalHead),
}

/// Parses a response head at the start of `buf` (consuming it), `None` while incomplete.
///
/// The hop-by-hop headers (RFC 9110 §7.6.1) are read here for the framing and the connection's
/// reuse, and not kept: the client side frames the response to the client itself. So are the
/// headers the Connection header names.
fn parse_head(buf: &mut BytesMut, head_request: bool) -> Result<Option<Parsed>, ClientError> {
    if buf.is_empty() {
        return Ok(None);
    }
    // The head is parsed out of its own `Bytes`, so the values are taken as slices of it (no
    // copy); what follows the head (the start of the body) goes back to `buf`.
    let all = buf.split().freeze();
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, &all, &mut slots);
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => {
            buf.extend_from_slice(&all);
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(ClientError::Malformed("too many headers"))
        }
        Err(_) => return Err(ClientError::Malformed("invalid response head")),
    };
    buf.extend_from_slice(&all[len..]);
    let code = resp.code.unwrap_or(0);
    let status =
        StatusCode::from_u16(code).map_err(|_| ClientError::Malformed("invalid status code"))?;
    if status.is_informational() {
        if code == 101 {
            return Err(ClientError::Malformed("switching protocols unasked"));
        }
        return Ok(Some(Parsed::Informational));
    }
    let version = if resp.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let mut headers = HeaderMap::with_capacity(resp.headers.len());
    let mut close = false;
    let mut keep_alive_option = false;
    let mut te_chunked: Option<bool> = None;
    let mut length: Option<u64> = None;
    let mut named: Vec<HeaderName> = Vec::new();
    for h in resp.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| ClientError::Malformed("invalid header name"))?;
        let value = h.value;
        match name.as_str() {
            "connection" => {
                for token in value.split(|b| *b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        keep_alive_option = true;
                    } else if let Ok(n) = HeaderName::from_bytes(token) {
                        named.push(n);
                    }
                }
                continue;
            }
            "transfer-encoding" => {
                // The last coding of the last value counts.
                let last = value.rsplit(|b| *b == b',').next().unwrap_or(b"");
                te_chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
                continue;
            }
            "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "upgrade" => continue,
            "content-length" => length = content_length(value, length)?,
            _ => {}
        }
        // SAFETY: httparse accepts in a header value only HTAB, SP and bytes 0x21-0x7E and
        // 0x80-0xFF, exactly the bytes a `HeaderValue` may hold (hyper's own parser relies on
        // the same).
        let value = unsafe { HeaderValue::from_maybe_shared_unchecked(all.slice_ref(value)) };
        headers.append(name, value);
    }
    for n in named {
        headers.remove(n);
    }
    let mut keep_alive = match version {
        Version::HTTP_10 => keep_alive_option && !close,
        _ => !close,
    };
    let framing = if head_request || code == 204 || code == 304 {
        Framing::Length(0)
    } else if let Some(chunked) = te_chunked {
        // A transfer coding overrides any content-length (which then must not reach the
        // client); a connection that carried both is not trusted further.
        if headers.remove(header::CONTENT_LENGTH).is_some() {
            keep_alive = false;
        }
        if chunked {
            Framing::Chunked(Chunk::Size)
        } else {
            Framing::Close
        }
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        Framing::Close
    };
    if matches!(framing, Framing::Close) {
        keep_alive = false;
    }
    Ok(Some(Parsed::Final(FinalHead {
        status,
        version,
        headers,
        framing,
        keep_alive,
    })))
}

/// Reads a content-length value into `seen` (the value of an earlier one): every value, and
/// every item of a list, must be the same number.
fn content_length(value: &[u8], seen: Option<u64>) -> Result<Option<u64>, ClientError> {
    let mut length = seen;
    for item in value.split(|b| *b == b',') {
        let item = item.trim_ascii();
        if item.is_empty() || item.len() > 19 || !item.iter().all(u8::is_ascii_digit) {
            return Err(ClientError::Malformed("invalid content-length"));
        }
        let n = item
            .iter()
            .fold(0u64, |acc, d| acc * 10 + u64::from(d - b'0'));
        if length.is_some_and(|l| l != n) {
            return Err(ClientError::Malformed("conflicting content-length"));
        }
        length = Some(n);
    }
    Ok(length)
}

fn respond(up: Upstream, head: FinalHead, slot: &IdleSlot) -> Response<UpstreamBody> {
    let mut body = UpstreamBody {
        conn: Some(up),
        framing: head.framing,
        keep_alive: head.keep_alive,
        slot: slot.clone(),
    };
    if body.is_done() {
        body.finish();
    }
    let mut resp = Response::new(body);
    *resp.status_mut() = head.status;
    *resp.version_mut() = head.version;
    *resp.headers_mut() = head.headers;
    resp
}

/// How much of a response body is left.
#[derive(Debug, Clone, Copy)]
enum Framing {
    Length(u64),
    Chunked(Chunk),
    /// Until the server closes.
    Close,
    Done,
}

#[derive(Debug, Clone, Copy)]
enum Chunk {
    /// At a chunk-size line.
    Size,
    Data(u64),
    /// At the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailers (or none) and the final CRLF.
    Trailers,
}

/// A response body read from its upstream connection as it is polled.
pub(crate) struct UpstreamBody {
    /// `None` once done (the connection went back to its slot, or was dropped).
    conn: Option<Upstream>,
    framing: Framing,
    keep_alive: bool,
    slot: IdleSlot,
}

impl UpstreamBody {
    fn is_done(&self) -> bool {
        matches!(self.framing, Framing::Length(0) | Framing::Done)
    }

    /// The body is complete: the connection goes back for the next request when it may.
    fn finish(&mut self) {
        self.framing = Framing::Done;
        if let Some(up) = self.conn.take() {
            if self.keep_alive && up.buf.is_empty() {
                *self.slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(up);
            }
        }
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        loop {
            let Some(up) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match self.framing {
                Framing::Done | Framing::Length(0) => {
                    self.finish();
                    return Poll::Ready(None);
                }
                Framing::Length(left) => {
                    if up.buf.is_empty() {
                        if ready!(up.poll_fill(cx)).map_err(ClientError::Read)? == 0 {
                            return Poll::Ready(Some(Err(ClientError::Closed(
                                "before the end of the body",
                            )
                            .into())));
                        }
                        continue;
                    }
                    let take = left.min(up.buf.len() as u64);
                    let data = up.buf.split_to(take as usize).freeze();
                    self.framing = Framing::Length(left - take);
                    if left == take {
                        self.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Framing::Close => {
                    if up.buf.is_empty() {
                        if ready!(up.poll_fill(cx)).map_err(ClientError::Read)? == 0 {
                            self.finish();
                            return Poll::Ready(None);
                        }
                        continue;
                    }
                    let data = up.buf.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Framing::Chunked(state) => match decode_chunk(&mut up.buf, state)? {
                    Decoded::More => {
                        if up.buf.len() >= MAX_HEAD {
                            return Poll::Ready(Some(Err(ClientError::Malformed(
                                "chunk line or trailers too large",
                            )
                            .into())));
                        }
                        if ready!(up.poll_fill(cx)).map_err(ClientError::Read)? == 0 {
                            return Poll::Ready(Some(Err(ClientError::Closed(
                                "before the end of the chunked body",
                            )
                            .into())));
                        }
                    }
                    Decoded::State(next) => self.framing = Framing::Chunked(next),
                    Decoded::Data(data, next) => {
                        self.framing = Framing::Chunked(next);
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Decoded::End(trailers) => {
                        self.finish();
                        return Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))));
                    }
                },
            }
        }
    }
}

pub(crate) type BodyError = Box<dyn std::error::Error + Send + Sync>;

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.get_mut().poll_next(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            Framing::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

/// What one step of decoding a chunked body gave.
#[derive(Debug)]
enum Decoded {
    /// More bytes are needed.
    More,
    State(Chunk),
    Data(Bytes, Chunk),
    /// The body is complete (with its trailers, if any).
    End(Option<HeaderMap>),
}

/// One step of decoding a chunked body (RFC 9112 §7.1) from the start of `buf`.
fn decode_chunk(buf: &mut BytesMut, state: Chunk) -> Result<Decoded, ClientError> {
    match state {
        Chunk::Size => {
            let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") else {
                return Ok(Decoded::More);
            };
            let line = &buf[..eol];
            let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
            if digits == 0 || digits > 15 {
                return Err(ClientError::Malformed("invalid chunk size"));
            }
            // After the size: only whitespace and chunk extensions.
            let rest = line[digits..].trim_ascii_start();
            if !(rest.is_empty() || rest[0] == b';') {
                return Err(ClientError::Malformed("invalid chunk size"));
            }
            let size = line[..digits].iter().fold(0u64, |acc, d| {
                acc * 16 + u64::from((*d as char).to_digit(16).unwrap_or(0))
            });
            buf.advance(eol + 2);
            Ok(Decoded::State(if size == 0 {
                Chunk::Trailers
            } else {
                Chunk::Data(size)
            }))
        }
        Chunk::Data(left) => {
            if buf.is_empty() {
                return Ok(Decoded::More);
            }
            let take = left.min(buf.len() as u64);
            let data = buf.split_to(take as usize).freeze();
            let next = if take == left {
                Chunk::DataEnd
            } else {
                Chunk::Data(left - take)
            };
            Ok(Decoded::Data(data, next))
        }
        Chunk::DataEnd => {
            if buf.len() < 2 {
                return Ok(Decoded::More);
            }
            if &buf[..2] != b"\r\n" {
                return Err(ClientError::Malformed("chunk data longer than its size"));
            }
            buf.advance(2);
            Ok(Decoded::State(Chunk::Size))
        }
        Chunk::Trailers => {
            if buf.starts_with(b"\r\n") {
                buf.advance(2);
                return Ok(Decoded::End(None));
            }
            let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
            match httparse::parse_headers(buf, &mut slots) {
                Ok(httparse::Status::Complete((len, parsed))) => {
                    let mut trailers = HeaderMap::with_capacity(parsed.len());
                    for h in parsed {
                        let name = HeaderName::from_bytes(h.name.as_bytes())
                            .map_err(|_| ClientError::Malformed("invalid trailer name"))?;
                        let value = HeaderValue::from_bytes(h.value)
                            .map_err(|_| ClientError::Malformed("invalid trailer value"))?;
                        trailers.append(name, value);
                    }
                    buf.advance(len);
                    Ok(Decoded::End(Some(trailers)))
                }
                Ok(httparse::Status::Partial) => Ok(Decoded::More),
                Err(_) => Err(ClientError::Malformed("invalid trailers")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8], split: usize) -> Result<(Vec<u8>, Option<HeaderMap>), ClientError> {
        let mut buf = BytesMut::new();
        let mut fed = 0;
        let mut state = Chunk::Size;
        let mut out = Vec::new();
        loop {
            match decode_chunk(&mut buf, state)? {
                Decoded::More => {
                    if fed == input.len() {
                        return Err(ClientError::Closed("test input ended"));
                    }
                    let end = (fed + split).min(input.len());
                    buf.extend_from_slice(&input[fed..end]);
                    fed = end;
                }
                Decoded::State(s) => state = s,
                Decoded::Data(d, s) => {
                    out.extend_from_slice(&d);
                    state = s;
                }
                Decoded::End(t) => {
                    assert!(buf.is_empty(), "left over: {buf:?}");
                    return Ok((out, t));
                }
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_however_they_arrive() {
        let input = b"5\r\nhello\r\n1;ext=1\r\n \r\nA\r\n0123456789\r\n0\r\n\r\n";
        for split in [1, 2, 3, 7, input.len()] {
            let (body, trailers) = decode_all(input, split).unwrap();
            assert_eq!(body, b"hello 0123456789", "{split}");
            assert!(trailers.is_none());
        }
        let (body, trailers) =
            decode_all(b"2\r\nok\r\n0\r\nx-sum: 1\r\nx-b: 2\r\n\r\n", 4).unwrap();
        assert_eq!(body, b"ok");
        let trailers = trailers.unwrap();
        assert_eq!(trailers.get("x-sum").unwrap(), "1");
        assert_eq!(trailers.get("x-b").unwrap(), "2");
        for bad in [
            &b"x\r\n"[..],
            b"5\r\nhello!\r\n0\r\n\r\n",
            b"5 x\r\nhello\r\n0\r\n\r\n",
            b"10000000000000000\r\n",
        ] {
            assert!(
                matches!(decode_all(bad, 64), Err(ClientError::Malformed(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    fn head(text: &str, head_request: bool) -> Result<Option<Parsed>, ClientError> {
        let mut buf = BytesMut::from(text.as_bytes());
        parse_head(&mut buf, head_request)
    }

    fn final_head(text: &str) -> FinalHead {
        match head(text, false) {
            Ok(Some(Parsed::Final(h))) => h,
            Ok(_) => panic!("not a final head: {text:?}"),
            Err(e) => panic!("{e}: {text:?}"),
        }
    }

    #[test]
    fn response_framing_and_keep_alive() {
        let h = final_head("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nServer: x\r\n\r\nok\n");
        assert!(matches!(h.framing, Framing::Length(3)) && h.keep_alive);
        assert_eq!(h.headers.get("server").unwrap(), "x");
        assert_eq!(h.headers.get("content-length").unwrap(), "3");
        // Hop-by-hop headers, and those the Connection header names, are not kept.
        let h = final_head(
            "HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nKeep-Alive: timeout=5\r\nX-Hop: 1\r\nTransfer-Encoding: chunked\r\nUpgrade: h2c\r\nProxy-Authenticate: Basic\r\nX-End: 2\r\n\r\n",
        );
        let names: Vec<&str> = h.headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-end"]);
        assert!(h.keep_alive);
        let h = final_head("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: Close\r\n\r\n");
        assert!(matches!(h.framing, Framing::Length(3)) && !h.keep_alive);
        let h = final_head("HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\n");
        assert!(!h.keep_alive);
        assert_eq!(h.version, Version::HTTP_10);
        let h =
            final_head("HTTP/1.0 200 OK\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\n");
        assert!(h.keep_alive);
        let h = final_head("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n");
        assert!(matches!(h.framing, Framing::Chunked(Chunk::Size)) && h.keep_alive);
        let h = final_head(
            "HTTP/1.1 200 OK\r\nContent-Length: 9\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        assert!(matches!(h.framing, Framing::Chunked(_)) && !h.keep_alive);
        assert!(h.headers.get("content-length").is_none());
        let h = final_head("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n");
        assert!(matches!(h.framing, Framing::Close) && !h.keep_alive);
        let h = final_head("HTTP/1.1 200 OK\r\n\r\n");
        assert!(matches!(h.framing, Framing::Close) && !h.keep_alive);
        let h = final_head("HTTP/1.1 204 No Content\r\n\r\n");
        assert!(matches!(h.framing, Framing::Length(0)) && h.keep_alive);
        let h = final_head("HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n");
        assert!(matches!(h.framing, Framing::Length(0)));
        let Ok(Some(Parsed::Final(h))) =
            head("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", true)
        else {
            panic!()
        };
        assert!(matches!(h.framing, Framing::Length(0)));
        assert_eq!(h.headers.get("content-length").unwrap(), "10");
        let h = final_head("HTTP/1.1 200 OK\r\nContent-Length: 4, 4\r\ncontent-length: 4\r\n\r\n");
        assert!(matches!(h.framing, Framing::Length(4)));
    }

    #[test]
    fn informational_and_malformed_heads() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"[..],
        );
        assert!(matches!(
            parse_head(&mut buf, false),
            Ok(Some(Parsed::Informational))
        ));
        assert!(matches!(
            parse_head(&mut buf, false),
            Ok(Some(Parsed::Final(_)))
        ));
        assert!(buf.is_empty());
        assert!(matches!(
            head("HTTP/1.1 200 OK\r\nContent-Le", false),
            Ok(None)
        ));
        for bad in [
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -3\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 3x\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\n\r\n",
            "HTTP/1.1 2000 OK\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX-A: a\x7fb\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX-A: a\x01b\r\n\r\n",
            "NOTHTTP\r\n\r\n",
        ] {
            assert!(
                matches!(head(bad, false), Err(ClientError::Malformed(_))),
                "{bad:?}"
            );
        }
    }
}
