//! The relay itself: one task per client connection owns the client's socket and the
//! upstream connection(s), reads frames from both, and writes what each side gets in one
//! buffer per direction, written once per wake-up.
//!
//! Streams: a client stream is judged by its head; an allowed one gets a stream of our own
//! on the upstream connection (ids of our own, so denied streams leave no gap upstream),
//! opened when the upstream has a free slot under its SETTINGS_MAX_CONCURRENT_STREAMS
//! (queued until then, and while the connection is being opened). Each direction of a
//! stream is a [`Pipe`]: DATA goes on as far as the receiver's stream and connection windows
//! allow, the rest waits in the pipe, and the sender's windows are given back only as bytes
//! are passed on, so what waits is bounded by the windows we advertised and a receiver that
//! does not read holds the sender back. Trailers follow the data; END_STREAM and resets cross
//! to the other side.
//!
//! Header blocks: requests are decoded whole (the rules need the head as a request) and
//! encoded again for the upstream without indexing; response blocks (and trailers both ways)
//! are transcoded: each field checked as it goes by, each representation copied with its
//! strings as they came, only its use of the dynamic table changed (see
//! [`Decoder::transcode`]), so nothing we send the client depends on a table.

use std::collections::{HashMap, VecDeque};
use std::future::{poll_fn, Future};
use std::hash::{BuildHasherDefault, Hasher};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_LENGTH};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, Uri, Version};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::frame::{self, settings, ConnError, Frame, Reader};
use super::hpack::{self, put_field, Decoder};
use super::{
    date_now, CLIENT_CONN_WINDOW, CLIENT_STREAM_WINDOW, MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE,
    MAX_LOCAL_ERROR_RESET_STREAMS, SERVER_CONN_WINDOW, SERVER_MAX_CONCURRENT_STREAMS,
    SERVER_STREAM_WINDOW,
};
use crate::events::ProtocolStats;
use crate::http_proxy::{
    strip_hop_by_hop_present, Body, BodyKind, Conn, Judged, UpstreamError, HOP_ANY,
};

/// How much a read takes at most (at least a frame of our SETTINGS_MAX_FRAME_SIZE and its
/// header must fit).
const READ_BUF: usize = 64 * 1024;
/// Output waiting for a peer above which no side is read (what a read produces is bounded
/// by flow control and the stream limit; this bounds what answers to PING, SETTINGS and
/// the like can pile up when a peer does not read).
const OUT_HIGH: usize = 512 * 1024;
/// The most a header block may take before it is decoded.
const MAX_BLOCK: usize = 64 * 1024;
/// How often a stream the upstream refused (REFUSED_STREAM before anything of it was
/// processed) is sent again.
const MAX_RETRIES: u8 = 3;
/// Client resets of open streams allowed at once, and how many more a second (a token bucket,
/// nghttp2's defaults): against the rapid-reset attack (CVE-2023-44487), where a client opens
/// and cancels streams at once so each costs the upstream work without counting against the
/// stream limit.
const RESET_BURST: f64 = 1000.0;
const RESET_RATE: f64 = 33.0;
/// How long input is still read after a GOAWAY for an error (see [`Relay::linger`]).
const LINGER: std::time::Duration = std::time::Duration::from_secs(1);
/// Stream ids we may use upstream (31 bits, odd).
const MAX_STREAM_ID: u32 = (1 << 31) - 1;

/// Why an upstream stream or connection failed (for the 502 and the log).
#[derive(Debug)]
pub(crate) enum H2Failure {
    /// The upstream reset the stream with this code.
    Reset(u32),
    /// Its response broke a rule of RFC 9113 §8.
    Malformed(&'static str),
    /// The connection failed or closed (`None`: closed, `Some`: a protocol error).
    Connection(Option<ConnError>),
    /// The upstream said GOAWAY and will not process the stream.
    Refused,
}

impl std::fmt::Display for H2Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            H2Failure::Reset(code) => write!(f, "stream reset with code {code:#x}"),
            H2Failure::Malformed(why) => write!(f, "malformed response: {why}"),
            H2Failure::Connection(None) => f.write_str("connection closed"),
            H2Failure::Connection(Some(e)) => {
                write!(f, "protocol error {:#x}: {}", e.code, e.why)
            }
            H2Failure::Refused => f.write_str("refused by GOAWAY"),
        }
    }
}

/// Hashes stream ids (small odd integers) with one multiplication.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8 | *b as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.0 = (n as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type IdMap<V> = HashMap<u32, V, BuildHasherDefault<IdHasher>>;

/// A socket with its input and output buffers.
struct Io<T> {
    io: T,
    /// `rbuf[rstart..rend]` is read and not yet parsed; the whole buffer stays initialized.
    rbuf: Vec<u8>,
    rstart: usize,
    rend: usize,
    /// `wbuf[wpos..]` is still to be written.
    wbuf: Vec<u8>,
    wpos: usize,
}

impl<T: AsyncRead + AsyncWrite + Unpin> Io<T> {
    fn new(io: T) -> Io<T> {
        Io {
            io,
            rbuf: vec![0; READ_BUF],
            rstart: 0,
            rend: 0,
            wbuf: Vec::new(),
            wpos: 0,
        }
    }

    /// Reads what is there: the number of octets (0 at the end of the stream).
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        if self.rstart == self.rend {
            self.rstart = 0;
            self.rend = 0;
        } else if self.rend == self.rbuf.len() {
            self.rbuf.copy_within(self.rstart..self.rend, 0);
            self.rend -= self.rstart;
            self.rstart = 0;
        }
        let mut rb = ReadBuf::new(&mut self.rbuf[self.rend..]);
        match Pin::new(&mut self.io).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                self.rend += n;
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Writes the output buffer out.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while self.wpos < self.wbuf.len() {
            match Pin::new(&mut self.io).poll_write(cx, &self.wbuf[self.wpos..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => self.wpos += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        self.wbuf.clear();
        self.wpos = 0;
        if self.wbuf.capacity() > 4 * OUT_HIGH {
            self.wbuf = Vec::new();
        }
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn pending_out(&self) -> usize {
        self.wbuf.len() - self.wpos
    }
}

/// Our HTTP/2 state towards one peer.
struct Side {
    reader: Reader,
    decoder: Decoder,
    /// The peer's SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE and
    /// SETTINGS_MAX_CONCURRENT_STREAMS.
    peer_window: i64,
    peer_max_frame: usize,
    peer_max_streams: usize,
    /// The peer's decoder table size as we last signalled it, and a size update owed at the
    /// start of the next block (after the peer lowered SETTINGS_HEADER_TABLE_SIZE).
    table_size: usize,
    table_update: Option<usize>,
    /// Connection window for the DATA we send.
    send_window: i64,
    /// Connection window the peer may still use, what it consumed that we passed on and
    /// have not given back yet, and the window we keep it at.
    recv_window: i64,
    recv_unacked: u32,
    conn_window: u32,
    stream_window: u32,
}

impl Side {
    fn new(is_client: bool) -> Side {
        let (conn_window, stream_window) = if is_client {
            (SERVER_CONN_WINDOW, SERVER_STREAM_WINDOW)
        } else {
            (CLIENT_CONN_WINDOW, CLIENT_STREAM_WINDOW)
        };
        Side {
            reader: Reader::new(is_client, MAX_FRAME_SIZE as usize, MAX_BLOCK),
            decoder: Decoder::default(),
            peer_window: frame::DEFAULT_WINDOW as i64,
            peer_max_frame: frame::DEFAULT_MAX_FRAME,
            peer_max_streams: usize::MAX,
            table_size: hpack::DEFAULT_TABLE_SIZE,
            table_update: None,
            send_window: frame::DEFAULT_WINDOW as i64,
            recv_window: conn_window as i64,
            recv_unacked: 0,
            conn_window,
            stream_window,
        }
    }

    /// What we send first: our SETTINGS and the connection window beyond the default.
    fn put_preface(&self, out: &mut Vec<u8>, is_client: bool) {
        if !is_client {
            out.extend_from_slice(frame::PREFACE);
            frame::put_settings(
                out,
                &[
                    (frame::SETTINGS_ENABLE_PUSH, 0),
                    (frame::SETTINGS_INITIAL_WINDOW_SIZE, self.stream_window),
                    (frame::SETTINGS_MAX_FRAME_SIZE, MAX_FRAME_SIZE),
                    (frame::SETTINGS_MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST_SIZE),
                ],
            );
        } else {
            frame::put_settings(
                out,
                &[
                    (
                        frame::SETTINGS_MAX_CONCURRENT_STREAMS,
                        SERVER_MAX_CONCURRENT_STREAMS,
                    ),
                    (frame::SETTINGS_INITIAL_WINDOW_SIZE, self.stream_window),
                    (frame::SETTINGS_MAX_FRAME_SIZE, MAX_FRAME_SIZE),
                    (frame::SETTINGS_MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST_SIZE),
                ],
            );
        }
        frame::put_window_update(out, 0, self.conn_window - frame::DEFAULT_WINDOW);
    }

    /// Applies the peer's SETTINGS (checked by the reader); returns the change of its
    /// initial stream window.
    fn apply_settings(&mut self, params: &[u8], is_client: bool) -> Result<i64, ConnError> {
        let mut delta = 0;
        for (id, value) in settings(params) {
            match id {
                frame::SETTINGS_HEADER_TABLE_SIZE => {
                    let v = value as usize;
                    if v < self.table_size {
                        self.table_size = v;
                        self.table_update = Some(v);
                    }
                }
                frame::SETTINGS_ENABLE_PUSH if !is_client && value != 0 => {
                    return Err(frame::conn_error(
                        frame::PROTOCOL_ERROR,
                        "a server enabled push",
                    ));
                }
                frame::SETTINGS_MAX_CONCURRENT_STREAMS => {
                    self.peer_max_streams = value as usize;
                }
                frame::SETTINGS_INITIAL_WINDOW_SIZE => {
                    delta += value as i64 - self.peer_window;
                    self.peer_window = value as i64;
                }
                frame::SETTINGS_MAX_FRAME_SIZE => self.peer_max_frame = value as usize,
                _ => {}
            }
        }
        Ok(delta)
    }

    /// Counts `n` octets of the peer's DATA as passed on (or dropped), giving the connection
    /// window back once half of it is used.
    fn credit(&mut self, out: &mut Vec<u8>, n: usize) {
        self.recv_unacked += n as u32;
        if self.recv_unacked >= self.conn_window / 2 {
            frame::put_window_update(out, 0, self.recv_unacked);
            self.recv_window += self.recv_unacked as i64;
            self.recv_unacked = 0;
        }
    }

    /// Appends a header block for `stream` as HEADERS (and CONTINUATION), starting it with
    /// the dynamic table size update owed, if any (the blocks we make never use the peer's
    /// table, so the update goes with whichever block is written first).
    fn put_block(&mut self, out: &mut Vec<u8>, stream: u32, block: &[u8], end: bool) {
        if let Some(size) = self.table_update.take() {
            let mut b = Vec::with_capacity(block.len() + 6);
            hpack::put_size_update(&mut b, size);
            b.extend_from_slice(block);
            frame::put_headers(out, stream, &b, end, self.peer_max_frame);
        } else {
            frame::put_headers(out, stream, block, end, self.peer_max_frame);
        }
    }
}

/// One direction of a stream.
struct Pipe {
    /// DATA waiting for the receiver's windows.
    buf: BytesMut,
    /// The sender ended the stream (after `buf` and `trailers`).
    end: bool,
    /// Trailers to send after `buf`, with END_STREAM.
    trailers: Option<Vec<u8>>,
    /// The receiver's stream window for us.
    send_window: i64,
    /// What the sender may still send on the stream, and what it sent that we passed on and
    /// did not give back yet.
    recv_window: i64,
    recv_unacked: u32,
    /// What the content-length declared and has not come yet (`None`: none declared, or
    /// not checked: the response to HEAD, 204, 304).
    length: Option<u64>,
}

impl Pipe {
    fn new(recv_window: u32) -> Pipe {
        Pipe {
            buf: BytesMut::new(),
            end: false,
            trailers: None,
            length: None,
            send_window: 0,
            recv_window: recv_window as i64,
            recv_unacked: 0,
        }
    }

    /// Counts `n` octets of DATA against the content-length (RFC 9113 §8.1.1): false when
    /// they go past it, or `end` comes before all of it.
    fn count(&mut self, n: usize, end: bool) -> bool {
        match &mut self.length {
            None => true,
            Some(left) => {
                if n as u64 > *left {
                    return false;
                }
                *left -= n as u64;
                !end || *left == 0
            }
        }
    }

    /// Takes a DATA frame's payload `data` (`flow`: the octets it counts against flow
    /// control, padding included): kept to be passed on when `keep`, else dropped. Returns
    /// what counts as passed on at once (padding, or all of it when dropped).
    fn accept(&mut self, data: &[u8], flow: usize, end: bool, keep: bool) -> usize {
        if end {
            self.end = true;
        }
        if keep {
            self.buf.extend_from_slice(data);
            flow - data.len()
        } else {
            flow
        }
    }

    /// Writes what waits in `buf` to `out` as DATA on `stream`, as far as the receiver's
    /// stream window, its connection window (`side`) and its frame size allow, then the
    /// trailers or an empty END_STREAM once all is through and the sender ended. Returns
    /// the octets passed on and whether the stream is now ended towards the receiver.
    fn drain(&mut self, out: &mut Vec<u8>, side: &mut Side, stream: u32) -> (usize, bool) {
        let mut passed = 0;
        let mut ended = false;
        while !self.buf.is_empty() {
            let n = (self.buf.len() as i64)
                .min(self.send_window)
                .min(side.send_window)
                .min(side.peer_max_frame as i64);
            if n <= 0 {
                break;
            }
            let n = n as usize;
            let last = n == self.buf.len() && self.end && self.trailers.is_none();
            frame::put_head(
                out,
                n,
                frame::DATA,
                if last { frame::END_STREAM } else { 0 },
                stream,
            );
            out.extend_from_slice(&self.buf[..n]);
            self.buf.advance(n);
            self.send_window -= n as i64;
            side.send_window -= n as i64;
            passed += n;
            ended = last;
        }
        if self.buf.is_empty() && !ended && self.end {
            match self.trailers.take() {
                Some(t) => side.put_block(out, stream, &t, true),
                None => frame::put_data(out, stream, &[], true, side.peer_max_frame),
            }
            ended = true;
        }
        (passed, ended)
    }

    /// Counts `n` octets the sender sent on the stream as passed on; gives the stream window
    /// back once half of it is used, while the sender may still send.
    fn credit(&mut self, out: &mut Vec<u8>, stream: u32, n: usize, window: u32) {
        if self.end {
            return;
        }
        self.recv_unacked += n as u32;
        if self.recv_unacked >= window / 2 {
            frame::put_window_update(out, stream, self.recv_unacked);
            self.recv_window += self.recv_unacked as i64;
            self.recv_unacked = 0;
        }
    }
}

/// Where a stream's request goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Link {
    /// Answered here (denied, 502): the request's body is dropped.
    Local,
    /// Waiting for an upstream connection or a free slot on it.
    Queued,
    /// Stream `id` of upstream connection `gen`.
    Open { gen: u64, id: u32 },
    /// Its upstream stream is over (both ways).
    Done,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum RespState {
    /// No final response yet (informational ones may have come).
    Head,
    /// The final head went to the client: DATA, then trailers or the end.
    Body,
}

struct Stream {
    /// Until the final response (or failure) is counted.
    allowed: Option<crate::http_proxy::Allowed>,
    link: Link,
    /// The request head as encoded for the upstream, kept while the stream may be sent
    /// again (refused before anything beyond its head went out).
    head: Option<Vec<u8>>,
    retries: u8,
    /// Client to upstream, upstream to client.
    req: Pipe,
    resp: Pipe,
    resp_state: RespState,
    /// The client ended or reset its side / we ended or reset ours towards it.
    c_recv_closed: bool,
    c_send_closed: bool,
    /// The same towards the upstream.
    u_recv_closed: bool,
    u_send_closed: bool,
    /// Something beyond the head went upstream (no retry).
    body_sent: bool,
    /// A HEAD request (its response's content-length counts no DATA).
    head_request: bool,
}

/// An upstream HTTP/2 connection.
struct Upstream {
    io: Io<TcpStream>,
    side: Side,
    gen: u64,
    /// Its SETTINGS came (its stream limit is known).
    ready: bool,
    /// No new streams (GOAWAY came, or ids ran out).
    draining: bool,
    /// Failed or closed: its streams are being failed, it is dropped.
    dead: bool,
    next_id: u32,
    /// Our upstream stream id to the client's.
    streams: IdMap<u32>,
}

type Connecting = Pin<Box<dyn Future<Output = Result<TcpStream, UpstreamError>> + Send>>;

/// Serves one client connection that opened with the HTTP/2 preface.
pub(crate) async fn serve<IO>(conn: Arc<Conn>, io: IO)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut relay = Relay::new(conn, io);
    poll_fn(|cx| relay.poll(cx)).await;
}

struct Relay<IO> {
    conn: Arc<Conn>,
    client: Io<IO>,
    cside: Side,
    ups: Vec<Upstream>,
    connecting: Option<Connecting>,
    /// By the client's stream id.
    streams: IdMap<Stream>,
    /// Client stream ids waiting for an upstream stream, in order.
    queue: VecDeque<u32>,
    /// The highest client stream id seen (lower ones not in `streams` are closed).
    max_client_id: u32,
    next_gen: u64,
    /// A GOAWAY went to the client: write it out, then close.
    closing: bool,
    /// After the GOAWAY is out and our side shut down: how long input is still read (and
    /// dropped) so that the client gets to read the GOAWAY before the connection goes (closing
    /// a socket with unread input resets it, which can drop what the client has not read).
    linger: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Streams we reset for the client's protocol errors.
    error_resets: usize,
    /// Tokens for the client's resets of open streams (see [`RESET_BURST`]), as of when.
    reset_tokens: f64,
    reset_at: std::time::Instant,
    want_dispatch: bool,
    scratch: Vec<u8>,
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Relay<IO> {
    fn new(conn: Arc<Conn>, io: IO) -> Relay<IO> {
        let mut client = Io::new(io);
        let cside = Side::new(true);
        cside.put_preface(&mut client.wbuf, true);
        Relay {
            conn,
            client,
            cside,
            ups: Vec::new(),
            connecting: None,
            streams: IdMap::default(),
            queue: VecDeque::new(),
            max_client_id: 0,
            next_gen: 0,
            closing: false,
            linger: None,
            error_resets: 0,
            reset_tokens: RESET_BURST,
            reset_at: std::time::Instant::now(),
            want_dispatch: false,
            scratch: Vec::new(),
        }
    }

    fn out_high(&self) -> bool {
        self.client.pending_out() > OUT_HIGH
            || self.ups.iter().any(|u| u.io.pending_out() > OUT_HIGH)
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let mut progress = false;
            if let Some(c) = self.connecting.as_mut() {
                if let Poll::Ready(r) = c.as_mut().poll(cx) {
                    self.connecting = None;
                    self.connected(r);
                    progress = true;
                }
            }
            let high = self.out_high();
            if !high && !self.closing {
                match self.client.poll_fill(cx) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(()),
                    Poll::Ready(Ok(_)) => {
                        self.client_input();
                        progress = true;
                    }
                    Poll::Ready(Err(e)) => {
                        tracing::debug!(src = %self.conn.src, error = %e, "http proxy: http/2 client connection failed");
                        return Poll::Ready(());
                    }
                    Poll::Pending => {}
                }
                let mut i = 0;
                while i < self.ups.len() && !self.closing {
                    if !self.ups[i].dead {
                        match self.ups[i].io.poll_fill(cx) {
                            Poll::Ready(Ok(0)) => {
                                self.upstream_down(i, None);
                                progress = true;
                            }
                            Poll::Ready(Ok(_)) => {
                                self.upstream_input(i);
                                progress = true;
                            }
                            Poll::Ready(Err(e)) => {
                                tracing::debug!(error = %e, "http proxy: upstream http/2 connection failed");
                                self.upstream_down(i, None);
                                progress = true;
                            }
                            Poll::Pending => {}
                        }
                    }
                    i += 1;
                }
            }
            if self.want_dispatch {
                self.want_dispatch = false;
                self.dispatch();
            }
            if let Poll::Ready(Err(e)) = self.client.poll_drain(cx) {
                tracing::debug!(src = %self.conn.src, error = %e, "http proxy: writing to an http/2 client");
                return Poll::Ready(());
            }
            for i in 0..self.ups.len() {
                if let Poll::Ready(Err(e)) = self.ups[i].io.poll_drain(cx) {
                    tracing::debug!(error = %e, "http proxy: writing to an upstream http/2 connection");
                    self.upstream_down(i, None);
                    progress = true;
                }
            }
            // Draining connections with nothing left, and dead ones, go (a dead one's last
            // output, a GOAWAY, had its one try above).
            self.ups.retain(|u| {
                !(u.dead || (u.draining && u.streams.is_empty() && u.io.pending_out() == 0))
            });
            if self.closing && self.client.pending_out() == 0 {
                return self.poll_linger(cx);
            }
            if high && !self.out_high() {
                progress = true;
            }
            if !progress {
                return Poll::Pending;
            }
        }
    }

    /// Shuts our side of the client connection down, then reads and drops what still comes
    /// until the client closes or a second passes.
    fn poll_linger(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        // The upstream streams cannot be answered any more.
        self.ups.clear();
        self.connecting = None;
        if self.linger.is_none() {
            if Pin::new(&mut self.client.io).poll_shutdown(cx).is_pending() {
                return Poll::Pending;
            }
            self.linger = Some(Box::pin(tokio::time::sleep(LINGER)));
        }
        loop {
            match self.client.poll_fill(cx) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Ready(Ok(_)) => self.client.rstart = self.client.rend,
                Poll::Pending => break,
            }
        }
        match self.linger.as_mut() {
            Some(l) => l.as_mut().poll(cx),
            None => Poll::Ready(()),
        }
    }

    // ---- the client side ----

    fn client_input(&mut self) {
        let rbuf = std::mem::take(&mut self.client.rbuf);
        let mut reader = std::mem::replace(&mut self.cside.reader, Reader::new(false, 0, 0));
        let mut pos = self.client.rstart;
        let end = self.client.rend;
        while !self.closing {
            match reader.next(&rbuf[pos..end]) {
                Ok(Some((f, n))) => {
                    pos += n;
                    if let Err(e) = self.client_frame(f) {
                        self.client_conn_error(e);
                    }
                }
                Ok(None) => break,
                Err(e) => self.client_conn_error(e),
            }
        }
        self.client.rstart = pos;
        self.client.rbuf = rbuf;
        self.cside.reader = reader;
    }

    /// Sends GOAWAY to the client and closes once it is written.
    fn client_conn_error(&mut self, e: ConnError) {
        tracing::debug!(src = %self.conn.src, code = e.code, why = e.why, "http proxy: http/2 client connection error");
        frame::put_goaway(
            &mut self.client.wbuf,
            self.max_client_id,
            e.code,
            e.why.as_bytes(),
        );
        self.closing = true;
    }

    fn client_frame(&mut self, f: Frame<'_>) -> Result<(), ConnError> {
        match f {
            Frame::Data {
                stream,
                data,
                flow,
                end,
            } => self.client_data(stream, data, flow, end),
            Frame::Headers {
                stream,
                block,
                end,
                bad_priority,
            } => self.client_headers(stream, block, end, bad_priority),
            Frame::Reset { stream, code } => {
                self.check_client_id(stream)?;
                if self.streams.contains_key(&stream) {
                    self.take_reset_token()?;
                    self.reset_stream(stream, None, Some(code));
                }
                Ok(())
            }
            Frame::Settings { ack: false, params } => {
                let delta = self.cside.apply_settings(params, true)?;
                frame::put_settings_ack(&mut self.client.wbuf);
                if delta != 0 {
                    for s in self.streams.values_mut() {
                        s.resp.send_window += delta;
                        if s.resp.send_window > frame::MAX_WINDOW {
                            return Err(frame::conn_error(
                                frame::FLOW_CONTROL_ERROR,
                                "SETTINGS_INITIAL_WINDOW_SIZE overflows a window",
                            ));
                        }
                    }
                    if delta > 0 {
                        self.flush_all_resp();
                    }
                }
                Ok(())
            }
            Frame::Settings { ack: true, .. } => Ok(()),
            Frame::Ping { ack, data } => {
                if !ack {
                    frame::put_ping_ack(&mut self.client.wbuf, &data);
                }
                Ok(())
            }
            // The client will open no more streams; those open finish.
            Frame::GoAway { .. } => Ok(()),
            Frame::WindowUpdate {
                stream: 0,
                increment,
            } => {
                self.cside.send_window += increment as i64;
                if self.cside.send_window > frame::MAX_WINDOW {
                    return Err(frame::conn_error(
                        frame::FLOW_CONTROL_ERROR,
                        "connection window above 2^31-1",
                    ));
                }
                self.flush_all_resp();
                Ok(())
            }
            Frame::WindowUpdate { stream, increment } => {
                self.check_client_id(stream)?;
                let Some(s) = self.streams.get_mut(&stream) else {
                    return Ok(());
                };
                s.resp.send_window += increment as i64;
                if s.resp.send_window > frame::MAX_WINDOW {
                    self.client_stream_error(stream, frame::FLOW_CONTROL_ERROR)?;
                } else {
                    self.flush_resp(stream);
                }
                Ok(())
            }
            Frame::StreamError { stream, code } => self.client_stream_error(stream, code),
            Frame::Skip => Ok(()),
        }
    }

    /// Counts a client's reset of an open stream against the bucket.
    fn take_reset_token(&mut self) -> Result<(), ConnError> {
        let now = std::time::Instant::now();
        let refill = now.duration_since(self.reset_at).as_secs_f64() * RESET_RATE;
        self.reset_tokens = (self.reset_tokens + refill).min(RESET_BURST);
        self.reset_at = now;
        if self.reset_tokens < 1.0 {
            return Err(frame::conn_error(
                frame::ENHANCE_YOUR_CALM,
                "too many streams reset",
            ));
        }
        self.reset_tokens -= 1.0;
        Ok(())
    }

    /// A frame other than HEADERS and PRIORITY on a client stream id: the client's, and not
    /// idle.
    fn check_client_id(&self, stream: u32) -> Result<(), ConnError> {
        if stream.is_multiple_of(2) || stream > self.max_client_id {
            return Err(frame::conn_error(
                frame::PROTOCOL_ERROR,
                "frame on an idle or server stream",
            ));
        }
        Ok(())
    }

    /// Resets a client stream for the client's error (and the upstream stream with CANCEL).
    fn client_stream_error(&mut self, stream: u32, code: u32) -> Result<(), ConnError> {
        self.error_resets += 1;
        if self.error_resets > MAX_LOCAL_ERROR_RESET_STREAMS {
            return Err(frame::conn_error(
                frame::ENHANCE_YOUR_CALM,
                "too many stream errors",
            ));
        }
        if self.streams.contains_key(&stream) {
            self.reset_stream(stream, Some(code), Some(frame::CANCEL));
        } else if stream > self.max_client_id {
            // No RST_STREAM on an idle stream (RFC 9113 §6.4).
            return Err(frame::conn_error(code, "stream error on an idle stream"));
        } else {
            frame::put_reset(&mut self.client.wbuf, stream, code);
        }
        Ok(())
    }

    fn client_data(
        &mut self,
        stream: u32,
        data: &[u8],
        flow: usize,
        end: bool,
    ) -> Result<(), ConnError> {
        self.check_client_id(stream)?;
        if flow as i64 > self.cside.recv_window {
            return Err(frame::conn_error(
                frame::FLOW_CONTROL_ERROR,
                "DATA beyond the connection window",
            ));
        }
        self.cside.recv_window -= flow as i64;
        let Some(s) = self.streams.get_mut(&stream) else {
            // A closed stream (reset meanwhile): nothing to pass on.
            self.cside.credit(&mut self.client.wbuf, flow);
            return Ok(());
        };
        if s.c_recv_closed || flow as i64 > s.req.recv_window {
            self.cside.credit(&mut self.client.wbuf, flow);
            let code = if s.c_recv_closed {
                frame::STREAM_CLOSED
            } else {
                frame::FLOW_CONTROL_ERROR
            };
            return self.client_stream_error(stream, code);
        }
        s.req.recv_window -= flow as i64;
        if !s.req.count(data.len(), end) {
            self.cside.credit(&mut self.client.wbuf, flow);
            ProtocolStats::bump(&self.conn.shared.events.stats().http.malformed);
            return self.client_stream_error(stream, frame::PROTOCOL_ERROR);
        }
        let keep = !matches!(s.link, Link::Local | Link::Done) && !s.u_send_closed;
        let passed = s.req.accept(data, flow, end, keep);
        if end {
            s.c_recv_closed = true;
        }
        s.req.credit(
            &mut self.client.wbuf,
            stream,
            passed,
            self.cside.stream_window,
        );
        self.cside.credit(&mut self.client.wbuf, passed);
        self.flush_req(stream);
        self.settle(stream);
        Ok(())
    }

    fn client_headers(
        &mut self,
        stream: u32,
        block: &[u8],
        end: bool,
        bad_priority: bool,
    ) -> Result<(), ConnError> {
        if stream.is_multiple_of(2) {
            return Err(frame::conn_error(
                frame::PROTOCOL_ERROR,
                "HEADERS on a server stream id",
            ));
        }
        if self.streams.contains_key(&stream) {
            return self.client_trailers(stream, block, end);
        }
        if stream <= self.max_client_id {
            // A closed stream: its block still changes the decoder's table.
            self.cside
                .decoder
                .decode(block, |_, _, _| {})
                .map_err(compression_error)?;
            return Ok(());
        }
        self.max_client_id = stream;
        let mut head = RequestHead::default();
        self.cside
            .decoder
            .decode(block, |n, v, never| head.field(n, v, never))
            .map_err(compression_error)?;
        if self.streams.len() >= SERVER_MAX_CONCURRENT_STREAMS as usize {
            frame::put_reset(&mut self.client.wbuf, stream, frame::REFUSED_STREAM);
            return Ok(());
        }
        let mut s = Stream {
            allowed: None,
            link: Link::Local,
            head: None,
            retries: 0,
            req: Pipe::new(self.cside.stream_window),
            resp: Pipe::new(0),
            resp_state: RespState::Head,
            c_recv_closed: end,
            c_send_closed: false,
            u_recv_closed: true,
            u_send_closed: true,
            body_sent: false,
            head_request: false,
        };
        s.req.end = end;
        s.resp.send_window = self.cside.peer_window;
        if head.too_large {
            self.streams.insert(stream, s);
            let mut resp = Response::new(Body::local(bytes::Bytes::new()));
            *resp.status_mut() = http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE;
            self.send_local(stream, resp);
            return Ok(());
        }
        let parsed = match (bad_priority, head.into_request()) {
            (false, Ok((req, scheme))) => content_length(req.headers()).map(|l| (req, scheme, l)),
            (true, _) | (_, Err(_)) => None,
        };
        let Some((mut req, scheme, length)) = parsed else {
            ProtocolStats::bump(&self.conn.shared.events.stats().http.malformed);
            return self.client_stream_error(stream, frame::PROTOCOL_ERROR);
        };
        s.req.length = length;
        s.head_request = req.method() == Method::HEAD;
        if !s.req.count(0, end) {
            ProtocolStats::bump(&self.conn.shared.events.stats().http.malformed);
            return self.client_stream_error(stream, frame::PROTOCOL_ERROR);
        }
        let allowed = match self.conn.judge(&mut req, true) {
            Judged::Denied(resp) => {
                self.streams.insert(stream, s);
                self.send_local(stream, resp);
                return Ok(());
            }
            Judged::Allowed(a) => a,
        };
        if allowed.hop & HOP_ANY != 0 {
            strip_hop_by_hop_present(req.headers_mut(), allowed.hop);
        }
        s.allowed = Some(allowed);
        s.head = Some(encode_request(&req, scheme.as_ref()));
        s.link = Link::Queued;
        s.u_recv_closed = false;
        s.u_send_closed = false;
        self.streams.insert(stream, s);
        self.queue.push_back(stream);
        self.want_dispatch = true;
        Ok(())
    }

    fn client_trailers(&mut self, stream: u32, block: &[u8], end: bool) -> Result<(), ConnError> {
        let mut check = FieldCheck::new(true);
        let mut out = Vec::new();
        let s = self.streams.get_mut(&stream).expect("checked");
        relay_block(&mut self.cside.decoder, block, &mut check, &mut out)
            .map_err(compression_error)?;
        if s.c_recv_closed {
            return self.client_stream_error(stream, frame::STREAM_CLOSED);
        }
        if !end || check.error.is_some() || !s.req.count(0, true) {
            ProtocolStats::bump(&self.conn.shared.events.stats().http.malformed);
            return self.client_stream_error(stream, frame::PROTOCOL_ERROR);
        }
        s.c_recv_closed = true;
        s.req.end = true;
        if !matches!(s.link, Link::Local | Link::Done) && !s.u_send_closed {
            s.req.trailers = Some(out);
        }
        self.flush_req(stream);
        self.settle(stream);
        Ok(())
    }

    /// Sends an answer made here (denial, 502, 431) on a client stream.
    fn send_local(&mut self, stream: u32, resp: Response<Body>) {
        let (parts, body) = resp.into_parts();
        let data = match body.kind {
            BodyKind::Local(data) => data,
            _ => None,
        };
        let mut block = std::mem::take(&mut self.scratch);
        block.clear();
        put_field(
            &mut block,
            b":status",
            parts.status.as_str().as_bytes(),
            false,
        );
        for (n, v) in &parts.headers {
            if n != CONTENT_LENGTH && n != http::header::DATE {
                put_field(
                    &mut block,
                    n.as_str().as_bytes(),
                    v.as_bytes(),
                    v.is_sensitive(),
                );
            }
        }
        if let Some(d) = &data {
            put_field(
                &mut block,
                b"content-length",
                d.len().to_string().as_bytes(),
                false,
            );
        }
        put_field(&mut block, b"date", date_now().as_bytes(), false);
        let s = self.streams.get_mut(&stream).expect("a stream of ours");
        s.link = Link::Local;
        s.u_recv_closed = true;
        s.u_send_closed = true;
        s.resp_state = RespState::Body;
        s.resp.buf.clear();
        s.resp.trailers = None;
        s.resp.end = true;
        self.cside
            .put_block(&mut self.client.wbuf, stream, &block, data.is_none());
        if data.is_none() {
            s.c_send_closed = true;
        }
        if let Some(d) = data {
            s.resp.buf.extend_from_slice(&d);
        }
        self.scratch = block;
        self.flush_resp(stream);
        self.settle(stream);
    }

    /// Moves what waits for the client on `stream` as far as its windows allow, and ends the
    /// stream towards it when everything is through.
    fn flush_resp(&mut self, stream: u32) {
        let Some(s) = self.streams.get_mut(&stream) else {
            return;
        };
        if s.c_send_closed {
            return;
        }
        let (passed, ended) = s.resp.drain(&mut self.client.wbuf, &mut self.cside, stream);
        if ended {
            s.c_send_closed = true;
        }
        if passed > 0 {
            if let Link::Open { gen, id } = s.link {
                if let Some(u) = self.ups.iter_mut().find(|u| u.gen == gen) {
                    s.resp
                        .credit(&mut u.io.wbuf, id, passed, u.side.stream_window);
                    u.side.credit(&mut u.io.wbuf, passed);
                }
            }
        }
        // A complete answer while the client still sends a body nobody will read: tell it
        // to stop (RFC 9113 §8.1).
        if s.c_send_closed && !s.c_recv_closed && s.u_send_closed {
            frame::put_reset(&mut self.client.wbuf, stream, frame::NO_ERROR);
            s.c_recv_closed = true;
        }
    }

    fn flush_all_resp(&mut self) {
        let ids: Vec<u32> = self
            .streams
            .iter()
            .filter(|(_, s)| !s.resp.buf.is_empty() || (s.resp.end && !s.c_send_closed))
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.flush_resp(id);
            self.settle(id);
        }
    }

    /// Resets a stream: towards the client with `client_code` (None: the client reset it),
    /// towards the upstream with `up_code` when its upstream stream is open. The stream goes.
    fn reset_stream(&mut self, stream: u32, client_code: Option<u32>, up_code: Option<u32>) {
        let Some(s) = self.streams.remove(&stream) else {
            return;
        };
        if let Some(code) = client_code {
            if !(s.c_recv_closed && s.c_send_closed) {
                frame::put_reset(&mut self.client.wbuf, stream, code);
            }
        }
        // What the client sent that is dropped here.
        if !s.req.buf.is_empty() {
            self.cside.credit(&mut self.client.wbuf, s.req.buf.len());
        }
        match s.link {
            Link::Open { gen, id } => {
                if let Some(u) = self.ups.iter_mut().find(|u| u.gen == gen) {
                    if !(s.u_recv_closed && s.u_send_closed) {
                        frame::put_reset(&mut u.io.wbuf, id, up_code.unwrap_or(frame::CANCEL));
                    }
                    if !s.resp.buf.is_empty() {
                        u.side.credit(&mut u.io.wbuf, s.resp.buf.len());
                    }
                    u.streams.remove(&id);
                    self.want_dispatch = true;
                }
            }
            Link::Queued => self.queue.retain(|&q| q != stream),
            Link::Local | Link::Done => {}
        }
    }

    /// Removes what is over: the upstream stream once closed both ways, the stream once
    /// also closed both ways towards the client.
    fn settle(&mut self, stream: u32) {
        let Some(s) = self.streams.get_mut(&stream) else {
            return;
        };
        if let Link::Open { gen, id } = s.link {
            if s.u_recv_closed && s.u_send_closed {
                if let Some(u) = self.ups.iter_mut().find(|u| u.gen == gen) {
                    u.streams.remove(&id);
                }
                s.link = Link::Done;
                self.want_dispatch = true;
            }
        }
        if s.c_recv_closed && s.c_send_closed && !matches!(s.link, Link::Open { .. } | Link::Queued)
        {
            if !s.req.buf.is_empty() {
                let n = s.req.buf.len();
                self.cside.credit(&mut self.client.wbuf, n);
            }
            self.streams.remove(&stream);
        }
    }

    // ---- the upstream side ----

    /// Opens queued streams on the upstream connection in use (opening one when needed).
    fn dispatch(&mut self) {
        while let Some(&stream) = self.queue.front() {
            let Some(i) = self.ups.iter().position(|u| !u.draining && !u.dead) else {
                if self.connecting.is_none() {
                    let conn = self.conn.clone();
                    self.connecting = Some(Box::pin(async move { conn.connect().await }));
                }
                return;
            };
            let u = &mut self.ups[i];
            if !u.ready || u.streams.len() >= u.side.peer_max_streams {
                return;
            }
            if u.next_id > MAX_STREAM_ID {
                u.draining = true;
                continue;
            }
            self.queue.pop_front();
            let Some(s) = self.streams.get_mut(&stream) else {
                continue;
            };
            let id = u.next_id;
            u.next_id += 2;
            u.streams.insert(id, stream);
            s.link = Link::Open { gen: u.gen, id };
            s.req.send_window = u.side.peer_window;
            // (Its send window is the client's for the stream, kept.)
            s.resp.recv_window = u.side.stream_window as i64;
            s.resp.recv_unacked = 0;
            s.u_recv_closed = false;
            s.u_send_closed = false;
            let end = s.req.end && s.req.buf.is_empty() && s.req.trailers.is_none();
            let head = s.head.as_deref().unwrap_or_default();
            u.side.put_block(&mut u.io.wbuf, id, head, end);
            if end {
                s.u_send_closed = true;
            }
            self.flush_req(stream);
            self.settle(stream);
        }
    }

    /// The upstream connection opened, or could not be.
    fn connected(&mut self, r: Result<TcpStream, UpstreamError>) {
        match r {
            Ok(tcp) => {
                let side = Side::new(false);
                let mut io = Io::new(tcp);
                side.put_preface(&mut io.wbuf, false);
                self.next_gen += 1;
                self.ups.push(Upstream {
                    io,
                    side,
                    gen: self.next_gen,
                    ready: false,
                    draining: false,
                    dead: false,
                    next_id: 1,
                    streams: IdMap::default(),
                });
            }
            Err(e) => self.fail_queued(&e),
        }
    }

    /// Answers every queued stream 502.
    fn fail_queued(&mut self, e: &UpstreamError) {
        while let Some(stream) = self.queue.pop_front() {
            let Some(s) = self.streams.get_mut(&stream) else {
                continue;
            };
            s.link = Link::Local;
            match s.allowed.take() {
                Some(a) => {
                    let resp = self.conn.upstream_failed(a, e);
                    self.send_local(stream, resp);
                }
                None => self.reset_stream(stream, Some(frame::REFUSED_STREAM), None),
            }
        }
    }

    fn upstream_input(&mut self, i: usize) {
        let rbuf = std::mem::take(&mut self.ups[i].io.rbuf);
        let mut reader = std::mem::replace(&mut self.ups[i].side.reader, Reader::new(false, 0, 0));
        let mut pos = self.ups[i].io.rstart;
        let end = self.ups[i].io.rend;
        let mut failed = None;
        while failed.is_none() && !self.closing {
            match reader.next(&rbuf[pos..end]) {
                Ok(Some((f, n))) => {
                    pos += n;
                    if let Err(e) = self.upstream_frame(i, f) {
                        failed = Some(e);
                    }
                }
                Ok(None) => break,
                Err(e) => failed = Some(e),
            }
        }
        let u = &mut self.ups[i];
        u.io.rstart = pos;
        u.io.rbuf = rbuf;
        u.side.reader = reader;
        if let Some(e) = failed {
            tracing::debug!(dst = %self.conn.dst, code = e.code, why = e.why, "http proxy: upstream http/2 connection error");
            let last = u.next_id.saturating_sub(2);
            frame::put_goaway(&mut u.io.wbuf, last, e.code, e.why.as_bytes());
            // Written once more before it goes (best effort).
            self.upstream_down(i, Some(e));
        }
    }

    /// The upstream connection `i` closed or failed: its streams fail.
    fn upstream_down(&mut self, i: usize, e: Option<ConnError>) {
        let u = &mut self.ups[i];
        if u.dead {
            return;
        }
        u.dead = true;
        let was_ready = u.ready;
        let mut ids: Vec<(u32, u32)> = u.streams.drain().collect();
        ids.sort_unstable();
        for (_, stream) in ids {
            self.upstream_stream_failed(stream, H2Failure::Connection(e), frame::INTERNAL_ERROR);
        }
        if !was_ready {
            // Not an HTTP/2 server (or it failed at once): trying again would loop.
            self.fail_queued(&UpstreamError::H2(H2Failure::Connection(e)));
        }
        self.want_dispatch = true;
    }

    /// An upstream stream failed: 502 for the client when no final response came yet, else
    /// a reset with `code`.
    fn upstream_stream_failed(&mut self, stream: u32, why: H2Failure, code: u32) {
        let Some(s) = self.streams.get_mut(&stream) else {
            return;
        };
        if s.resp.end && matches!(why, H2Failure::Connection(_)) {
            // The whole response came (only the request was still going): it still goes
            // to the client.
            self.upstream_done_early(stream);
            return;
        }
        s.u_recv_closed = true;
        s.u_send_closed = true;
        if let Link::Open { gen, id } = s.link {
            if let Some(u) = self.ups.iter_mut().find(|u| u.gen == gen) {
                u.streams.remove(&id);
                if !s.resp.buf.is_empty() {
                    u.side.credit(&mut u.io.wbuf, s.resp.buf.len());
                }
            }
        }
        s.link = Link::Done;
        s.resp.buf.clear();
        s.resp.trailers = None;
        self.want_dispatch = true;
        if s.resp_state == RespState::Head && !s.c_send_closed {
            if let Some(a) = s.allowed.take() {
                let resp = self.conn.upstream_failed(a, &UpstreamError::H2(why));
                self.send_local(stream, resp);
                return;
            }
        }
        self.reset_stream(stream, Some(code), None);
    }

    fn upstream_frame(&mut self, i: usize, f: Frame<'_>) -> Result<(), ConnError> {
        match f {
            Frame::Data {
                stream: id,
                data,
                flow,
                end,
            } => self.upstream_data(i, id, data, flow, end),
            Frame::Headers {
                stream: id,
                block,
                end,
                ..
            } => self.upstream_headers(i, id, block, end),
            Frame::Reset { stream: id, code } => {
                let Some(stream) = self.upstream_stream(i, id)? else {
                    return Ok(());
                };
                self.upstream_reset(stream, code);
                Ok(())
            }
            Frame::Settings { ack: false, params } => {
                let u = &mut self.ups[i];
                let delta = u.side.apply_settings(params, false)?;
                frame::put_settings_ack(&mut u.io.wbuf);
                let ids: Vec<u32> = u.streams.values().copied().collect();
                for &stream in &ids {
                    if let Some(s) = self.streams.get_mut(&stream) {
                        s.req.send_window += delta;
                        if s.req.send_window > frame::MAX_WINDOW {
                            return Err(frame::conn_error(
                                frame::FLOW_CONTROL_ERROR,
                                "SETTINGS_INITIAL_WINDOW_SIZE overflows a window",
                            ));
                        }
                    }
                }
                if !self.ups[i].ready {
                    self.ups[i].ready = true;
                    self.want_dispatch = true;
                }
                if delta > 0 {
                    for stream in ids {
                        self.flush_req(stream);
                        self.settle(stream);
                    }
                }
                // A lower stream limit or a larger one: queued streams may go now.
                self.want_dispatch = true;
                Ok(())
            }
            Frame::Settings { ack: true, .. } => Ok(()),
            Frame::Ping { ack, data } => {
                if !ack {
                    frame::put_ping_ack(&mut self.ups[i].io.wbuf, &data);
                }
                Ok(())
            }
            Frame::GoAway { last, code } => {
                self.upstream_goaway(i, last, code);
                Ok(())
            }
            Frame::WindowUpdate {
                stream: 0,
                increment,
            } => {
                let u = &mut self.ups[i];
                u.side.send_window += increment as i64;
                if u.side.send_window > frame::MAX_WINDOW {
                    return Err(frame::conn_error(
                        frame::FLOW_CONTROL_ERROR,
                        "connection window above 2^31-1",
                    ));
                }
                let ids: Vec<u32> = u.streams.values().copied().collect();
                for stream in ids {
                    self.flush_req(stream);
                    self.settle(stream);
                }
                Ok(())
            }
            Frame::WindowUpdate {
                stream: id,
                increment,
            } => {
                let Some(stream) = self.upstream_stream(i, id)? else {
                    return Ok(());
                };
                let s = self.streams.get_mut(&stream).expect("mapped streams exist");
                s.req.send_window += increment as i64;
                if s.req.send_window > frame::MAX_WINDOW {
                    self.upstream_stream_error(
                        i,
                        id,
                        stream,
                        frame::FLOW_CONTROL_ERROR,
                        "stream window above 2^31-1",
                    );
                } else {
                    self.flush_req(stream);
                    self.settle(stream);
                }
                Ok(())
            }
            Frame::StreamError { stream: id, code } => {
                if let Some(stream) = self.upstream_stream(i, id)? {
                    self.upstream_stream_error(i, id, stream, code, "stream error in framing");
                }
                Ok(())
            }
            Frame::Skip => Ok(()),
        }
    }

    /// The client stream for upstream stream `id`: `None` when it is closed; an error when
    /// it is idle or not ours.
    fn upstream_stream(&self, i: usize, id: u32) -> Result<Option<u32>, ConnError> {
        let u = &self.ups[i];
        if let Some(&stream) = u.streams.get(&id) {
            return Ok(Some(stream));
        }
        if id.is_multiple_of(2) || id >= u.next_id {
            return Err(frame::conn_error(
                frame::PROTOCOL_ERROR,
                "frame on an idle or server-initiated stream",
            ));
        }
        Ok(None)
    }

    /// Resets upstream stream `id` for the upstream's error; the client gets 502 or a reset.
    fn upstream_stream_error(
        &mut self,
        i: usize,
        id: u32,
        stream: u32,
        code: u32,
        why: &'static str,
    ) {
        frame::put_reset(&mut self.ups[i].io.wbuf, id, code);
        let client_code = if code == frame::FLOW_CONTROL_ERROR {
            frame::INTERNAL_ERROR
        } else {
            code
        };
        self.upstream_stream_failed(stream, H2Failure::Malformed(why), client_code);
    }

    fn upstream_data(
        &mut self,
        i: usize,
        id: u32,
        data: &[u8],
        flow: usize,
        end: bool,
    ) -> Result<(), ConnError> {
        let u = &mut self.ups[i];
        if flow as i64 > u.side.recv_window {
            return Err(frame::conn_error(
                frame::FLOW_CONTROL_ERROR,
                "DATA beyond the connection window",
            ));
        }
        u.side.recv_window -= flow as i64;
        let Some(stream) = self.upstream_stream(i, id)? else {
            let u = &mut self.ups[i];
            u.side.credit(&mut u.io.wbuf, flow);
            return Ok(());
        };
        let u = &mut self.ups[i];
        let s = self.streams.get_mut(&stream).expect("mapped streams exist");
        if s.u_recv_closed || s.resp_state != RespState::Body || flow as i64 > s.resp.recv_window {
            u.side.credit(&mut u.io.wbuf, flow);
            let (code, why) = if s.u_recv_closed {
                (frame::STREAM_CLOSED, "DATA after the end of the stream")
            } else if s.resp_state != RespState::Body {
                (frame::PROTOCOL_ERROR, "DATA before the response head")
            } else {
                (frame::FLOW_CONTROL_ERROR, "DATA beyond the stream window")
            };
            self.upstream_stream_error(i, id, stream, code, why);
            return Ok(());
        }
        s.resp.recv_window -= flow as i64;
        if !s.resp.count(data.len(), end) {
            u.side.credit(&mut u.io.wbuf, flow);
            self.upstream_stream_error(
                i,
                id,
                stream,
                frame::PROTOCOL_ERROR,
                "DATA not matching the content-length",
            );
            return Ok(());
        }
        let passed = s.resp.accept(data, flow, end, !s.c_send_closed);
        if end {
            s.u_recv_closed = true;
        }
        s.resp
            .credit(&mut u.io.wbuf, id, passed, u.side.stream_window);
        u.side.credit(&mut u.io.wbuf, passed);
        self.flush_resp(stream);
        self.settle(stream);
        Ok(())
    }

    fn upstream_headers(
        &mut self,
        i: usize,
        id: u32,
        block: &[u8],
        end: bool,
    ) -> Result<(), ConnError> {
        let Some(stream) = self.upstream_stream(i, id)? else {
            // A closed stream: its block still changes the decoder's table.
            self.ups[i]
                .side
                .decoder
                .decode(block, |_, _, _| {})
                .map_err(compression_error)?;
            return Ok(());
        };
        let s = self.streams.get_mut(&stream).expect("mapped streams exist");
        let trailers = s.resp_state == RespState::Body;
        let mut check = FieldCheck::new(trailers);
        let mut out = std::mem::take(&mut self.scratch);
        out.clear();
        relay_block(&mut self.ups[i].side.decoder, block, &mut check, &mut out)
            .map_err(compression_error)?;
        let s = self.streams.get_mut(&stream).expect("mapped streams exist");
        let malformed = if s.u_recv_closed {
            Some("HEADERS after the end of the stream")
        } else if let Some(why) = check.error {
            Some(why)
        } else if trailers && !end {
            Some("trailers without END_STREAM")
        } else if trailers && !s.resp.count(0, true) {
            Some("fewer DATA octets than the content-length")
        } else if !trailers && check.status.is_none() {
            Some("no :status")
        } else if !trailers
            && check.status.is_some_and(|st| st < 200)
            && (end || check.status == Some(101))
        {
            Some("informational response ending the stream or 101")
        } else {
            None
        };
        if let Some(why) = malformed {
            self.scratch = out;
            let code = if s.u_recv_closed {
                frame::STREAM_CLOSED
            } else {
                frame::PROTOCOL_ERROR
            };
            self.upstream_stream_error(i, id, stream, code, why);
            return Ok(());
        }
        if trailers {
            s.resp.trailers = Some(out.clone());
            s.resp.end = true;
            s.u_recv_closed = true;
        } else {
            let status = check.status.expect("checked");
            if status >= 200 {
                s.resp.length = if s.head_request || status == 204 || status == 304 {
                    None
                } else {
                    check.content_length
                };
                if !s.resp.count(0, end) {
                    self.scratch = out;
                    self.upstream_stream_error(
                        i,
                        id,
                        stream,
                        frame::PROTOCOL_ERROR,
                        "no DATA for the content-length",
                    );
                    return Ok(());
                }
                if !check.has_date {
                    put_field(&mut out, b"date", date_now().as_bytes(), false);
                }
                if let Some(a) = s.allowed.take() {
                    self.conn.allowed(a, status);
                }
                s.head = None;
                s.resp_state = RespState::Body;
                if end {
                    s.u_recv_closed = true;
                    s.resp.end = true;
                }
            }
            if !s.c_send_closed {
                let end_now = status >= 200 && end;
                self.cside
                    .put_block(&mut self.client.wbuf, stream, &out, end_now);
                if end_now {
                    s.c_send_closed = true;
                }
            }
        }
        self.scratch = out;
        self.flush_resp(stream);
        self.settle(stream);
        Ok(())
    }

    fn upstream_reset(&mut self, stream: u32, code: u32) {
        let s = self.streams.get_mut(&stream).expect("mapped streams exist");
        if code == frame::REFUSED_STREAM
            && s.resp_state == RespState::Head
            && !s.body_sent
            && s.head.is_some()
            && s.retries < MAX_RETRIES
            && !s.c_send_closed
        {
            // Not processed (RFC 9113 §8.7): once more, on whatever connection is in use.
            if let Link::Open { gen, id } = s.link {
                if let Some(u) = self.ups.iter_mut().find(|u| u.gen == gen) {
                    u.streams.remove(&id);
                }
            }
            s.retries += 1;
            s.link = Link::Queued;
            self.queue.push_front(stream);
            self.want_dispatch = true;
            return;
        }
        if code == frame::NO_ERROR && s.resp.end {
            self.upstream_done_early(stream);
            return;
        }
        if let Some(s) = self.streams.get_mut(&stream) {
            // Already closed both ways upstream by the reset.
            s.u_recv_closed = true;
            s.u_send_closed = true;
        }
        self.upstream_stream_failed(stream, H2Failure::Reset(code), code);
    }

    /// The response is complete and the upstream wants no more of the request (RST_STREAM
    /// NO_ERROR, or the connection closed): the rest of the response still goes to the
    /// client, then the client is told to stop sending.
    fn upstream_done_early(&mut self, stream: u32) {
        let Some(s) = self.streams.get_mut(&stream) else {
            return;
        };
        s.u_send_closed = true;
        s.u_recv_closed = true;
        let n = s.req.buf.len();
        s.req.buf.clear();
        s.req.trailers = None;
        s.req.end = true;
        if n > 0 {
            self.cside.credit(&mut self.client.wbuf, n);
        }
        self.flush_resp(stream);
        self.settle(stream);
    }

    fn upstream_goaway(&mut self, i: usize, last: u32, code: u32) {
        let u = &mut self.ups[i];
        u.draining = true;
        if code != frame::NO_ERROR {
            tracing::debug!(dst = %self.conn.dst, code, "http proxy: upstream http/2 GOAWAY");
        }
        let mut above: Vec<(u32, u32)> = u
            .streams
            .iter()
            .filter(|(&id, _)| id > last)
            .map(|(&id, &s)| (id, s))
            .collect();
        above.sort_unstable();
        for (id, _) in &above {
            u.streams.remove(id);
        }
        // Not processed: sent again on a new connection when nothing beyond the head went.
        for (_, stream) in above.into_iter().rev() {
            let Some(s) = self.streams.get_mut(&stream) else {
                continue;
            };
            if s.head.is_some() && !s.body_sent && s.resp_state == RespState::Head {
                s.link = Link::Queued;
                self.queue.push_front(stream);
            } else {
                s.u_recv_closed = true;
                s.u_send_closed = true;
                s.link = Link::Done;
                if let Some(a) = s.allowed.take() {
                    // Counted as the upstream's failure; the client may retry (RFC 9113 §8.7).
                    let _ = self
                        .conn
                        .upstream_failed(a, &UpstreamError::H2(H2Failure::Refused));
                }
                self.reset_stream(stream, Some(frame::REFUSED_STREAM), None);
            }
        }
        self.want_dispatch = true;
    }

    /// Moves what waits for the upstream on `stream` as far as its windows allow, then the
    /// trailers or the end.
    fn flush_req(&mut self, stream: u32) {
        let Some(s) = self.streams.get_mut(&stream) else {
            return;
        };
        let Link::Open { gen, id } = s.link else {
            return;
        };
        if s.u_send_closed {
            return;
        }
        let Some(u) = self.ups.iter_mut().find(|u| u.gen == gen) else {
            return;
        };
        let (passed, ended) = s.req.drain(&mut u.io.wbuf, &mut u.side, id);
        if ended {
            s.u_send_closed = true;
            s.body_sent = true;
        }
        if passed > 0 {
            s.body_sent = true;
            s.head = None;
            s.req.credit(
                &mut self.client.wbuf,
                stream,
                passed,
                self.cside.stream_window,
            );
            self.cside.credit(&mut self.client.wbuf, passed);
        }
        // The upstream answered in full and the request is through: nothing more to relay.
        if s.u_send_closed && s.c_send_closed && !s.c_recv_closed {
            frame::put_reset(&mut self.client.wbuf, stream, frame::NO_ERROR);
            s.c_recv_closed = true;
        }
    }
}

fn compression_error(e: hpack::HpackError) -> ConnError {
    tracing::debug!(error = %e, "http proxy: http/2 header block");
    frame::conn_error(frame::COMPRESSION_ERROR, "header block cannot be decoded")
}

/// Decodes a peer's header block and appends what to forward to `out` (see
/// [`Decoder::transcode`]), without the hop-by-hop fields an HTTP/2 message may carry; `check`
/// sees every field.
fn relay_block(
    decoder: &mut Decoder,
    block: &[u8],
    check: &mut FieldCheck,
    out: &mut Vec<u8>,
) -> Result<(), hpack::HpackError> {
    decoder.transcode(block, out, |n, v| {
        check.field(n, v);
        !is_dropped(n)
    })
}

/// Hop-by-hop fields an HTTP/2 message may carry and the relay drops (the
/// connection-specific ones make it malformed instead).
fn is_dropped(name: &[u8]) -> bool {
    matches!(name, b"proxy-authenticate" | b"proxy-authorization")
}

/// Field name octets (RFC 9110 §5.6.2 token characters, lowercase as RFC 9113 §8.2.1 wants).
static NAME_CHAR: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = b'a';
    while c <= b'z' {
        t[c as usize] = true;
        c += 1;
    }
    let mut c = b'0';
    while c <= b'9' {
        t[c as usize] = true;
        c += 1;
    }
    let extra = b"!#$%&'*+-.^_`|~";
    let mut i = 0;
    while i < extra.len() {
        t[extra[i] as usize] = true;
        i += 1;
    }
    t
};

fn valid_name(name: &[u8]) -> bool {
    !name.is_empty() && name.iter().all(|&b| NAME_CHAR[b as usize])
}

/// As `HeaderValue` takes them: visible octets, space and tab (so no NUL, CR or LF, which
/// RFC 9113 §8.2.1 forbids).
fn valid_value(value: &[u8]) -> bool {
    value
        .iter()
        .all(|&b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

/// The checks on a response head or trailers (either way) as its fields go by.
struct FieldCheck {
    trailers: bool,
    status: Option<u16>,
    regular: bool,
    has_date: bool,
    size: usize,
    content_length: Option<u64>,
    error: Option<&'static str>,
}

impl FieldCheck {
    fn new(trailers: bool) -> FieldCheck {
        FieldCheck {
            trailers,
            content_length: None,
            status: None,
            regular: false,
            has_date: false,
            size: 0,
            error: None,
        }
    }

    fn field(&mut self, name: &[u8], value: &[u8]) {
        if self.error.is_some() {
            return;
        }
        self.size += name.len() + value.len() + 32;
        if self.size > MAX_HEADER_LIST_SIZE as usize {
            self.error = Some("header list too large");
            return;
        }
        if name.first() == Some(&b':') {
            self.error = if self.trailers {
                Some("pseudo-header in trailers")
            } else if self.regular {
                Some("pseudo-header after a regular field")
            } else if name != b":status" {
                Some("pseudo-header other than :status in a response")
            } else if self.status.is_some() {
                Some("two :status fields")
            } else {
                match value {
                    [a @ b'1'..=b'9', b @ b'0'..=b'9', c @ b'0'..=b'9'] => {
                        self.status = Some(
                            (a - b'0') as u16 * 100 + (b - b'0') as u16 * 10 + (c - b'0') as u16,
                        );
                        None
                    }
                    _ => Some("invalid :status"),
                }
            };
            return;
        }
        self.regular = true;
        if !valid_name(name) {
            self.error = Some("invalid field name");
            return;
        }
        if !valid_value(value) {
            self.error = Some("invalid field value");
            return;
        }
        match name {
            b"connection" | b"keep-alive" | b"proxy-connection" | b"transfer-encoding"
            | b"upgrade" => self.error = Some("connection-specific field"),
            b"te" if value != b"trailers" => self.error = Some("te other than trailers"),
            b"date" => self.has_date = true,
            b"content-length" => match (parse_length(value), self.content_length) {
                (Some(l), None) => self.content_length = Some(l),
                (Some(l), Some(before)) if l == before => {}
                _ => self.error = Some("invalid content-length"),
            },
            _ => {}
        }
    }
}

/// A content-length value: digits only (RFC 9110 §8.6).
fn parse_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(value.iter().fold(0, |n, d| n * 10 + (d - b'0') as u64))
}

/// The content-length of a request's fields: `Some(None)` without one, `None` when invalid
/// (or several that differ).
fn content_length(headers: &HeaderMap) -> Option<Option<u64>> {
    let mut length = None;
    for v in headers.get_all(CONTENT_LENGTH) {
        let l = parse_length(v.as_bytes())?;
        if length.is_some_and(|before| before != l) {
            return None;
        }
        length = Some(l);
    }
    Some(length)
}

/// A request head as its fields are decoded (RFC 9113 §8.3.1 checks on the way).
#[derive(Default)]
struct RequestHead {
    method: Option<Method>,
    scheme: Option<Scheme>,
    authority: Option<Authority>,
    path: Option<PathAndQuery>,
    headers: HeaderMap,
    regular: bool,
    size: usize,
    too_large: bool,
    error: Option<&'static str>,
}

impl RequestHead {
    fn field(&mut self, name: &[u8], value: &[u8], never: bool) {
        if self.error.is_some() || self.too_large {
            return;
        }
        self.size += name.len() + value.len() + 32;
        if self.size > MAX_HEADER_LIST_SIZE as usize {
            self.too_large = true;
            return;
        }
        if let Some(pseudo) = name.strip_prefix(b":") {
            if self.regular {
                self.error = Some("pseudo-header after a regular field");
                return;
            }
            let ok = match pseudo {
                b"method" if self.method.is_none() => Method::from_bytes(value)
                    .map(|m| self.method = Some(m))
                    .is_ok(),
                b"scheme" if self.scheme.is_none() => Scheme::try_from(value)
                    .map(|s| self.scheme = Some(s))
                    .is_ok(),
                b"authority" if self.authority.is_none() => Authority::try_from(value)
                    .map(|a| self.authority = Some(a))
                    .is_ok(),
                b"path" if self.path.is_none() && !value.is_empty() => {
                    PathAndQuery::try_from(value)
                        .map(|p| self.path = Some(p))
                        .is_ok()
                }
                _ => false,
            };
            if !ok {
                self.error = Some("invalid, repeated or unknown pseudo-header");
            }
            return;
        }
        self.regular = true;
        if !valid_name(name) {
            self.error = Some("invalid field name");
            return;
        }
        match name {
            b"connection" | b"keep-alive" | b"proxy-connection" | b"transfer-encoding"
            | b"upgrade" => {
                self.error = Some("connection-specific field");
                return;
            }
            b"te" if value != b"trailers" => {
                self.error = Some("te other than trailers");
                return;
            }
            _ => {}
        }
        match (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            (Ok(n), Ok(mut v)) => {
                v.set_sensitive(never);
                self.headers.append(n, v);
            }
            _ => self.error = Some("invalid field"),
        }
    }

    /// The request (and its :scheme, which the URI drops when there is no :authority).
    fn into_request(self) -> Result<(Request<()>, Option<Scheme>), &'static str> {
        if let Some(e) = self.error {
            return Err(e);
        }
        let method = self.method.ok_or("no :method")?;
        let mut parts = http::uri::Parts::default();
        let scheme = if method == Method::CONNECT {
            if self.scheme.is_some() || self.path.is_some() {
                return Err(":scheme or :path in CONNECT");
            }
            parts.authority = Some(self.authority.ok_or("CONNECT without :authority")?);
            None
        } else {
            let scheme = self.scheme.ok_or("no :scheme")?;
            parts.path_and_query = Some(self.path.ok_or("no :path")?);
            if self.authority.is_some() {
                parts.scheme = Some(scheme.clone());
                parts.authority = self.authority;
            }
            Some(scheme)
        };
        let uri = Uri::from_parts(parts).map_err(|_| "invalid request target")?;
        let mut req = Request::new(());
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.version_mut() = Version::HTTP_2;
        *req.headers_mut() = self.headers;
        Ok((req, scheme))
    }
}

/// The request head for the upstream: pseudo-header fields, then the fields as judged.
fn encode_request(req: &Request<()>, scheme: Option<&Scheme>) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    put_field(
        &mut out,
        b":method",
        req.method().as_str().as_bytes(),
        false,
    );
    if let Some(s) = scheme {
        put_field(&mut out, b":scheme", s.as_str().as_bytes(), false);
    }
    if let Some(a) = req.uri().authority() {
        put_field(&mut out, b":authority", a.as_str().as_bytes(), false);
    }
    if req.method() != Method::CONNECT {
        if let Some(p) = req.uri().path_and_query() {
            put_field(&mut out, b":path", p.as_str().as_bytes(), false);
        }
    }
    for (n, v) in req.headers() {
        put_field(
            &mut out,
            n.as_str().as_bytes(),
            v.as_bytes(),
            v.is_sensitive(),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(fields: &[(&str, &str)]) -> Result<Request<()>, &'static str> {
        let mut h = RequestHead::default();
        for (n, v) in fields {
            h.field(n.as_bytes(), v.as_bytes(), false);
        }
        h.into_request().map(|(r, _)| r)
    }

    #[test]
    fn request_heads_are_checked_as_rfc_9113_says() {
        let base = [
            (":method", "GET"),
            (":scheme", "http"),
            (":authority", "a.example"),
            (":path", "/p?q"),
        ];
        let r = request(&base).unwrap();
        assert_eq!(r.uri(), "http://a.example/p?q");
        assert_eq!(r.version(), Version::HTTP_2);
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut f = base.to_vec();
            f.extend_from_slice(extra);
            request(&f)
        };
        assert!(with(&[("x-a", "1"), ("te", "trailers")]).is_ok());
        for bad in [
            ("Upper", "1"),
            ("connection", "close"),
            ("keep-alive", "1"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("te", "gzip"),
            (":path", "/again"),
            (":unknown", "1"),
            ("x-bad", "a\nb"),
            ("", "1"),
        ] {
            assert!(with(&[bad]).is_err(), "{bad:?}");
        }
        // A pseudo-header after a regular field.
        assert!(request(&[
            (":method", "GET"),
            ("x", "1"),
            (":scheme", "http"),
            (":path", "/")
        ])
        .is_err());
        // Missing pieces; no :authority is fine (the path alone).
        assert!(request(&[(":method", "GET"), (":scheme", "http")]).is_err());
        assert!(request(&[(":method", "GET"), (":path", "/")]).is_err());
        assert!(request(&[(":method", "GET"), (":scheme", "http"), (":path", "")]).is_err());
        assert_eq!(
            request(&[(":method", "GET"), (":scheme", "http"), (":path", "/x")])
                .unwrap()
                .uri(),
            "/x"
        );
        // CONNECT: :authority only.
        let c = request(&[(":method", "CONNECT"), (":authority", "h:443")]).unwrap();
        assert_eq!(c.uri().authority().unwrap(), "h:443");
        assert!(request(&[
            (":method", "CONNECT"),
            (":authority", "h:443"),
            (":path", "/")
        ])
        .is_err());
        assert!(request(&[(":method", "CONNECT")]).is_err());
    }

    #[test]
    fn request_encoding_decodes_back() {
        let mut req = request(&[
            (":method", "POST"),
            (":scheme", "https"),
            (":authority", "a.example"),
            (":path", "/svc/M"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ])
        .unwrap();
        let mut secret = HeaderValue::from_static("Bearer x");
        secret.set_sensitive(true);
        req.headers_mut().insert("authorization", secret);
        let block = encode_request(&req, Some(&Scheme::HTTPS));
        let got = context_free(&block);
        let s = |a: &str, b: &str, n: bool| (a.to_string(), b.to_string(), n);
        assert_eq!(
            got,
            [
                s(":method", "POST", false),
                s(":scheme", "https", false),
                s(":authority", "a.example", false),
                s(":path", "/svc/M", false),
                s("content-type", "application/grpc", false),
                s("te", "trailers", false),
                s("authorization", "Bearer x", true),
            ]
        );
    }

    #[test]
    fn content_lengths_are_parsed_and_counted() {
        assert_eq!(parse_length(b"0"), Some(0));
        assert_eq!(parse_length(b"18446744073709551615"), None);
        assert_eq!(
            parse_length(b"1234567890123456789"),
            Some(1234567890123456789)
        );
        for bad in [&b""[..], b"-1", b"1 ", b"+1", b"0x10", b"1,1"] {
            assert_eq!(parse_length(bad), None, "{bad:?}");
        }
        let mut h = HeaderMap::new();
        assert_eq!(content_length(&h), Some(None));
        h.append(CONTENT_LENGTH, HeaderValue::from_static("5"));
        h.append(CONTENT_LENGTH, HeaderValue::from_static("5"));
        assert_eq!(content_length(&h), Some(Some(5)));
        h.append(CONTENT_LENGTH, HeaderValue::from_static("6"));
        assert_eq!(content_length(&h), None);

        let mut p = Pipe::new(0);
        assert!(p.count(100, true), "nothing declared: anything goes");
        p.length = Some(10);
        assert!(p.count(4, false) && p.count(6, false) && p.count(0, true));
        p.length = Some(10);
        assert!(!p.count(11, false), "more than declared");
        p.length = Some(10);
        assert!(!p.count(9, true), "ended short");
        let c = check(&[(":status", "200"), ("content-length", "7")], false);
        assert_eq!((c.content_length, c.error), (Some(7), None));
        let c = check(
            &[
                (":status", "200"),
                ("content-length", "7"),
                ("content-length", "8"),
            ],
            false,
        );
        assert!(c.error.is_some());
        assert!(check(&[(":status", "200"), ("content-length", "x")], false)
            .error
            .is_some());
    }

    fn check(fields: &[(&str, &str)], trailers: bool) -> FieldCheck {
        let mut c = FieldCheck::new(trailers);
        for (n, v) in fields {
            c.field(n.as_bytes(), v.as_bytes());
        }
        c
    }

    #[test]
    fn response_fields_are_checked() {
        let c = check(
            &[(":status", "200"), ("date", "x"), ("content-type", "t")],
            false,
        );
        assert_eq!((c.status, c.has_date, c.error), (Some(200), true, None));
        let c = check(
            &[(":status", "404"), ("proxy-authenticate", "Basic")],
            false,
        );
        assert!(c.error.is_none() && !c.has_date);
        for bad in [
            &[(":status", "20")][..],
            &[(":status", "200"), (":status", "200")],
            &[("x", "1"), (":status", "200")],
            &[(":status", "200"), ("connection", "close")],
            &[(":status", "200"), ("Server", "x")],
            &[(":status", "200"), ("server", "a\rb")],
            &[(":path", "/")],
        ] {
            assert!(check(bad, false).error.is_some(), "{bad:?}");
        }
        assert!(check(&[(":status", "200")], true).error.is_some());
        assert!(check(&[("grpc-status", "0")], true).error.is_none());
    }

    /// The fields of `block` as a decoder with an empty table reads them, which must leave
    /// the table empty (the block is context-free).
    fn context_free(block: &[u8]) -> Vec<(String, String, bool)> {
        let mut d = Decoder::default();
        let mut got = Vec::new();
        d.decode(block, |n, v, never| {
            got.push((
                String::from_utf8(n.to_vec()).unwrap(),
                String::from_utf8(v.to_vec()).unwrap(),
                never,
            ))
        })
        .unwrap();
        let mut out = Vec::new();
        d.transcode(&[0xbe], &mut out, |_, _| true)
            .expect_err("the block added to the table");
        got
    }

    #[test]
    fn blocks_go_as_they_came_when_context_free_and_without_hop_by_hop_fields() {
        let f = |n: &str, v: &str| (n.to_string(), v.to_string(), false);
        // Context-free with a Huffman value: copied as is.
        let mut block = vec![0x88];
        block.push(0x0f);
        block.push(0x27); // server (54)
        let mut enc = Vec::new();
        super::super::huffman::encode(b"nginx", &mut enc);
        hpack::put_int(&mut block, enc.len(), 7, 0x80);
        block.extend_from_slice(&enc);
        let mut d = Decoder::default();
        let mut check = FieldCheck::new(false);
        let mut out = Vec::new();
        relay_block(&mut d, &block, &mut check, &mut out).unwrap();
        assert_eq!(out, block);
        assert_eq!(check.status, Some(200));
        // With a field to drop: the rest as it came.
        let mut with_drop = block.clone();
        put_field(&mut with_drop, b"proxy-authenticate", b"Basic", false);
        let mut check = FieldCheck::new(false);
        let mut out = Vec::new();
        relay_block(&mut d, &with_drop, &mut check, &mut out).unwrap();
        assert_eq!(out, block);
        // Incremental indexing (as nginx sends every field): the table learns it, and the
        // output is context-free.
        let mut indexing = vec![0x88, 0x40];
        hpack::put_int(&mut indexing, 5, 7, 0);
        indexing.extend_from_slice(b"x-one");
        hpack::put_int(&mut indexing, 1, 7, 0);
        indexing.extend_from_slice(b"1");
        for _ in 0..2 {
            let mut check = FieldCheck::new(false);
            let mut out = Vec::new();
            relay_block(&mut d, &indexing, &mut check, &mut out).unwrap();
            assert_eq!(context_free(&out), [f(":status", "200"), f("x-one", "1")]);
        }
        // A reference to what was indexed.
        let mut check = FieldCheck::new(false);
        let mut out = Vec::new();
        relay_block(&mut d, &[0x88, 0xbe], &mut check, &mut out).unwrap();
        assert_eq!(context_free(&out), [f(":status", "200"), f("x-one", "1")]);
    }
}
